"""Launching table kernels: autotuned on scratch buffers on a GPU, a fixed config in the interpreter.

Both kernels of this package write in place. Letting ``triton.autotune`` time
them on the live tensors would apply the update once per config and timing
repeat; its ``restore_value`` would prevent that by cloning every tuned tensor,
a full extra copy of the shadows. Instead the first launch for a key (size
bucket and dtypes) runs the autotuner on scratch tensors of the same shape
class, whose contents do not matter; the autotuner caches its choice under
that key, so the live launch that follows runs exactly once with it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import triton

from triton_ema.kernels import interpreting

#: Configs tried on a GPU. Every BLOCK divides the table's ENTRY.
CONFIGS = [
    triton.Config({"BLOCK": block, "ENTRIES_PER_PROGRAM": per_program}, num_warps=warps)
    for block in (1024, 4096)
    for per_program in (1, 4, 16)
    for warps in (4, 8)
]

#: The interpreter cannot time configs ("0 active drivers"). This one exercises the
#: full-block and tail paths and the per-program entry loop on small tensors.
INTERPRET_CONFIG = {"BLOCK": 1024, "ENTRIES_PER_PROGRAM": 2, "num_warps": 4}

#: When set (by tests), every launch uses this config, on a GPU too, with no tuning: one
#: otherwise only reached through the autotuner's choice can then be checked directly.
FORCED_CONFIG: dict[str, Any] | None = None


def _grid(n_entries: int) -> Callable[[dict[str, Any]], tuple[int]]:
    return lambda meta: (triton.cdiv(n_entries, meta["ENTRIES_PER_PROGRAM"]),)


class TableKernel:
    """A ``@triton.jit`` table kernel together with its autotuned twin and the configs chosen per key."""

    def __init__(self, kernel: Any, key: list[str]) -> None:
        self.kernel = kernel
        self.key = key
        self.tuned = triton.autotune(configs=CONFIGS, key=key)(kernel)
        self.chosen: dict[tuple[Any, ...], triton.Config] = {}

    def __call__(self, scratch: Callable[[], tuple[int, dict[str, Any]]], **kwargs: Any) -> None:
        """Launch over the ``n_entries`` table entries named in ``kwargs``.

        ``scratch()`` returns ``(n_entries, kwargs)`` for a launch on scratch
        tensors with the same key; it is called once per key, before the first
        live launch, and its tensors are dropped after tuning.
        """
        n_entries = kwargs["n_entries"]
        if n_entries == 0:
            return
        if FORCED_CONFIG is not None or interpreting():
            self.kernel[_grid(n_entries)](**kwargs, **(FORCED_CONFIG or INTERPRET_CONFIG))
            return
        key = tuple(kwargs[k] for k in self.key)
        config = self.chosen.get(key)
        if config is None:
            scratch_entries, scratch_kwargs = scratch()
            self.tuned[_grid(scratch_entries)](**scratch_kwargs)
            config = self.chosen[key] = self.tuned.best_config
        # Launch the chosen config directly: the autotuner's per-call key building is
        # host overhead on every step, and it has nothing left to decide.
        self.kernel[_grid(n_entries)](**kwargs, **config.all_kwargs())

    def cached(
        self,
        owner: Any,
        key: tuple[Any, ...],
        make: Callable[[], tuple[Callable[[], tuple[int, dict[str, Any]]], dict[str, Any]]],
    ) -> None:
        """Launch with arguments built once per ``owner`` (a table) and ``key``, then replayed.

        ``make()`` returns ``(scratch, kwargs)`` as :meth:`__call__` takes them. On
        a GPU the first call tunes (if needed) and binds the kernel, its grid and
        every argument into one callable kept on ``owner``; later calls only call
        it, so a step pays no argument building, key lookup or grid creation.
        Tensors in ``key`` hash and compare by identity (the dict's identity check
        comes before ``==``) and are kept alive by the stored key, so an address
        is never reused under it. Under the interpreter or a forced config nothing
        is kept (tests change them between launches).
        """
        store = owner.__dict__.setdefault("_launches", {})
        ident = (self, *key)
        launch = store.get(ident)
        if launch is not None:
            launch()
            return
        scratch, kwargs = make()
        n_entries = kwargs["n_entries"]
        if n_entries == 0 or FORCED_CONFIG is not None or interpreting():
            self(scratch, **kwargs)
            return
        tuned_key = tuple(kwargs[k] for k in self.key)
        config = self.chosen.get(tuned_key)
        if config is None:
            scratch_entries, scratch_kwargs = scratch()
            self.tuned[_grid(scratch_entries)](**scratch_kwargs)
            config = self.chosen[tuned_key] = self.tuned.best_config
        launch = functools.partial(self.kernel[_grid(n_entries)], **kwargs, **config.all_kwargs())
        store[ident] = launch
        launch()
