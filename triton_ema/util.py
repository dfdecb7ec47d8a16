"""Small helpers below every other module: DTensor shards, and holding back SIGINT during a transaction."""

from __future__ import annotations

import _signal  # signal's C core: the enum wrapping of the signal module costs tens of us a call
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - builds without distributed support
    DTensor = None


def is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_shard(t: Tensor) -> Tensor:
    """The tensor the kernels work on: a DTensor's local shard, else ``t`` itself."""
    return t._local_tensor if is_dtensor(t) else t


def as_global(local: Tensor, like: Tensor) -> Tensor:
    """``local`` as a DTensor placed like ``like`` when that is one, else ``local`` itself."""
    if is_dtensor(like):
        return DTensor.from_local(
            local, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
        )
    return local


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold back SIGINT (``KeyboardInterrupt``) until the block is done, then deliver it.

    A swap is a sequence of in-place copies; interrupted between two of them it
    would leave a tensor half exchanged. Exceptions raised by the operations
    themselves are undone by the journal; this covers the signal, which Python
    may deliver between any two bytecodes. Only the main thread receives signals.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = _signal.getsignal(_signal.SIGINT)
    if not callable(previous):
        yield
        return
    received: list[tuple[int, object]] = []
    _signal.signal(_signal.SIGINT, lambda signum, frame: received.append((signum, frame)))
    try:
        yield
    finally:
        _signal.signal(_signal.SIGINT, previous)
        if received:
            previous(*received[0])


def lr_is_zero(groups: list[dict[str, Any]]) -> bool:
    """True when the first group's learning rate is zero (torch.distributed.checkpoint's state initialisation
    steps at lr 0); a CUDA tensor lr is never read, so this never waits for the device."""
    lr = groups[0].get("lr") if groups else None
    if isinstance(lr, Tensor):
        # Reading a CUDA lr would wait for the device; the helper sets a CPU tensor anyway.
        return lr.device.type == "cpu" and not bool(lr != 0)
    return lr is not None and lr == 0
