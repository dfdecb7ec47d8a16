"""The tracked tensors of one device and dtype pair, with their shadows: what one launch or foreach call covers.

A :class:`Group` checks before every operation that none of its tensors changed
dtype, shape, layout or device since it was wrapped, and follows the ones whose
storage moved; it caches the views, tables and scratch its operations reuse.
:class:`OffloadedGroup` keeps the shadows of CUDA parameters in pinned host memory.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from operator import attrgetter

import torch
from torch import Tensor

from triton_ema import reference
from triton_ema.exchange import Exchanger
from triton_ema.reference import Upcaster

#: What must not change under the wrapper, read for a whole list without a Python loop.
_META = attrgetter("dtype", "shape", "device")


def real_view(t: Tensor) -> Tensor:
    """The tensor the update and the swap work on: complex tensors as their (re, im) float pairs."""
    return torch.view_as_real(t) if t.is_complex() else t


def _span(t: Tensor) -> tuple[int, int] | None:
    """The bytes ``[first, end)`` that ``t`` can reach, or None when it holds no elements."""
    if t.numel() == 0:
        return None
    size, reach = t.element_size(), list(zip(t.shape, t.stride()))
    low = sum(min(0, (n - 1) * st) for n, st in reach) * size
    high = (sum(max(0, (n - 1) * st) for n, st in reach) + 1) * size
    return (t.data_ptr() + low, t.data_ptr() + high)


def describe(t: Tensor) -> str:
    return f"{t.dtype} {tuple(t.shape)} stride {t.stride()} on {t.device}"


@dataclass
class Group:
    """Tensors of one device and dtype pair, with their shadows (one list per EMA profile).

    ``sources`` are the tracked tensor objects themselves (the ``Parameter``, not a
    detached alias), so that a later ``p.data = ...`` is seen; ``params`` are the
    views the operations take (a complex tensor's real view), rebuilt when a
    source's storage moves. ``kind`` is ``"ema"`` (averaged) or ``"copy"``
    (non-floating buffers: copied on each update, exchanged by the swap; one
    shadow whatever the number of profiles). ``profile`` selects the shadows
    that :attr:`shadows` and the swap use.
    """

    device: torch.device
    param_dtype: torch.dtype
    shadow_dtype: torch.dtype
    use_triton: bool
    kind: str = "ema"
    sources: list[Tensor] = field(default_factory=list)
    profile_shadows: list[list[Tensor]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    params: list[Tensor] = field(default_factory=list)
    profile: int = 0
    _meta: list[tuple] = field(default_factory=list)
    _strides: list[tuple] = field(default_factory=list)
    _ptrs: list[int] | None = None
    _cache: dict = field(default_factory=dict)

    def add(self, source: Tensor, shadows: list[Tensor], name: str) -> None:
        if not self.profile_shadows:
            self.profile_shadows = [[] for _ in shadows]
        for shadow_list, shadow in zip(self.profile_shadows, shadows, strict=True):
            shadow_list.append(shadow)
        self.sources.append(source)
        self.names.append(name)
        self._meta.append(_META(source))
        self._strides.append(source.stride())
        self._ptrs = None
        self._cache = {}

    @property
    def n_profiles(self) -> int:
        return len(self.profile_shadows)

    def own_profile(self, profile: int) -> int:
        """The index of ``profile`` among this group's shadows: copy groups keep one for every profile."""
        return profile if self.n_profiles > 1 else 0

    @property
    def shadows(self) -> list[Tensor]:
        return self.profile_shadows[self.profile]

    @property
    def exchanges(self) -> bool:
        """True when the swap exchanges parameter and shadow in place (equal dtypes)."""
        return self.param_dtype == self.shadow_dtype

    def refresh(self) -> None:
        """Check that no source changed kind, and follow the ones whose storage moved.

        A change of dtype, shape, layout or device raises ``RuntimeError`` before
        anything is touched. Costs three C-level passes over the group's tensors.
        """
        if list(map(_META, self.sources)) != self._meta or list(map(Tensor.stride, self.sources)) != self._strides:
            for name, t, meta, stride in zip(self.names, self.sources, self._meta, self._strides):
                if _META(t) != meta or t.stride() != stride:
                    was = f"{meta[0]} {tuple(meta[1])} stride {stride} on {meta[2]}"
                    raise RuntimeError(
                        f"{name} changed after it was wrapped: it was {was}, it is now {describe(t)}. "
                        "The EMA was not updated or swapped. Change dtype, device or layout before wrapping "
                        "(e.g. model.to(...) then EMAOptimizerWrapper(...)), or wrap again and load the old "
                        "wrapper's state_dict() into the new one."
                    )
        ptrs = list(map(Tensor.data_ptr, self.sources))
        if ptrs != self._ptrs:
            self._check_disjoint()
            # Detached views: the in-place updates then record nothing for autograd without a
            # no_grad context per step; they are rebuilt whenever a source's storage moves.
            with torch.inference_mode(False):  # views made under inference_mode could not be updated outside it
                self.params = [real_view(t.detach()) for t in self.sources]
            self._cache = {k: v for k, v in self._cache.items() if k[0] == "real"}
            self._ptrs = ptrs

    def _check_disjoint(self) -> None:
        """Refuse storage that overlaps a shadow or another source (``p.data = shadow``); on the slow path only.

        Sorted by first byte, a tensor overlaps another exactly when it starts before the furthest end so far.
        """
        spans = [(t, name) for t, name in zip(self.sources, self.names)]
        spans += [(s, f"the EMA of {name}") for shadows in self.profile_shadows for s, name in zip(shadows, self.names)]
        reach = sorted((str(t.device), *span, name) for t, name in spans if (span := _span(t)) is not None)
        dev, end, name = None, 0, ""
        for next_dev, start, next_end, next_name in reach:
            if dev == next_dev and start < end:
                raise RuntimeError(
                    f"{next_name} and {name} now overlap in memory (e.g. after p.data = a shadow or another "
                    "parameter): the EMA would average or swap a tensor into itself. The EMA was not updated or "
                    "swapped; give the parameter storage of its own."
                )
            if dev != next_dev or next_end > end:
                dev, end, name = next_dev, next_end, next_name

    def _cached(self, key: tuple, make):
        value = self._cache.get(key)
        if value is None:
            # Built outside inference_mode (a first ema_weights() in Lightning's validation), so later training
            # steps may still write to the views and scratch kept here.
            with torch.inference_mode(False):
                value = self._cache[key] = make()
        return value

    def real_shadows_of(self, k: int) -> list[Tensor]:
        return self._cached(("real", k), lambda: [real_view(s) for s in self.profile_shadows[k]])

    @property
    def real_shadows(self) -> list[Tensor]:
        return self.real_shadows_of(self.profile)

    def all_real_shadows(self) -> list[list[Tensor]]:
        return [self.real_shadows_of(k) for k in range(self.n_profiles)]

    def upcaster(self) -> Upcaster | None:
        """Scratch for the torch path when the shadows are wider than the parameters (serves every profile)."""
        if self.exchanges:
            return None

        def make() -> Upcaster:
            shadows = self.all_real_shadows()
            return Upcaster(self.params, shadows[0], more=tuple(shadows[1:]))

        return self._cached(("upcaster",), make)

    def exchanger(self) -> Exchanger:
        return self._cached(("exchanger", self.profile), lambda: Exchanger(self.params, self.real_shadows))

    def tables(self) -> list:
        """The kernels' tables of (params, the current profile's shadows), built after the storage moved."""
        from triton_ema.kernels.table import build_tables

        return self._cached(("tables", self.profile), lambda: build_tables(self.params, self.real_shadows))

    def multi_tables(self) -> list:
        """Tables of (params, every profile's shadows), for the fused K-profile update."""
        from triton_ema.kernels.table import build_tables

        return self._cached(("multi",), lambda: build_tables(self.params, *self.all_real_shadows()))


class OffloadedGroup(Group):
    """CUDA parameters whose shadows live in pinned host memory (``ema_device="cpu"``).

    An update records an event on the training stream, copies the parameters
    into pinned staging buffers on a side stream, and lets a worker thread
    run the foreach update on the CPU once the copy has landed. Neither the
    training stream nor the Python thread waits for it; the next optimizer
    step only makes the training stream wait (on the GPU) until the copy has
    read the parameters, and anything that reads the shadows joins the worker
    first. The weight comes from the host's step count, so this path is not
    for CUDA graphs.
    """

    def __init__(self, device: torch.device, param_dtype: torch.dtype, shadow_dtype: torch.dtype) -> None:
        super().__init__(device, param_dtype, shadow_dtype, use_triton=False)
        self.staging: list[Tensor] = []
        self._stream = torch.cuda.Stream(device)
        self._copied: torch.cuda.Event | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="triton-ema-offload")
        self._pending: Future | None = None
        self._upcaster: Upcaster | None = None

    @property
    def exchanges(self) -> bool:
        return False

    def add(self, source: Tensor, shadows: list[Tensor], name: str) -> None:
        super().add(source, shadows, name)
        self.staging.append(torch.empty_like(real_view(shadows[0]), dtype=real_view(source).dtype).pin_memory())
        self._upcaster = None

    def refresh(self) -> None:
        upcaster = self._upcaster
        super().refresh()
        self._upcaster = upcaster  # works on the staging buffers, which do not move

    def update(self, weights: list[float]) -> None:
        self.join()
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            for buf, p in zip(self.staging, self.params):
                buf.copy_(p, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record(self._stream)
        copied = self._copied

        shadows = self.all_real_shadows()
        if self._upcaster is None and self.param_dtype != self.shadow_dtype:
            self._upcaster = Upcaster(self.staging, shadows[0], more=tuple(shadows[1:]))
        upcaster = self._upcaster

        def cpu_update() -> None:
            copied.synchronize()
            with torch.no_grad():
                reference.update_multi_(self.staging, shadows, weights, upcaster)

        self._pending = self._worker.submit(cpu_update)

    def before_step(self) -> None:
        """Keep the next optimizer step from writing parameters the side stream is still reading."""
        if self._copied is not None:
            torch.cuda.current_stream(self.device).wait_event(self._copied)
            self._copied = None

    def join(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
