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

#: Entries per program tried on a GPU, with every (BLOCK, num_warps) below.
ENTRIES_PER_PROGRAM = (1, 4, 16)

#: (BLOCK, num_warps) per kind of data, so that every access is 128 bits wide and no config converts
#: layouts through shared memory (read from the sm_90 code: ``python -m benchmarks.codegen``).
#: 32-bit data only: 4 elements per thread and access; 8 or 4 per thread, both whole vectors.
SHAPES_32 = ((1024, 4), (1024, 8))
#: 16-bit data only: 8 elements per thread make a 128-bit access.
SHAPES_16 = ((1024, 4), (2048, 8))
#: A 16-bit parameter with 32-bit shadows: 8 elements per thread. Triton stores at most 128 bits (4 fp32)
#: per thread and access in a 1-D layout, so the kernels arrange a full block's 32-bit side as
#: ``[2, BLOCK // 2]`` (``table.pair_offsets``): a thread's 8 elements are consecutive, the 16-bit side is
#: one 128-bit access and the 32-bit side two, in the same registers (no conversion).
SHAPES_MIXED = ((1024, 4), (2048, 8))
#: 4 elements per thread, whatever the dtypes (the 16-bit side of a mixed pair in 64-bit accesses): for
#: kernels that hold many values per element (the K-profile update with K > 4), so that registers stay
#: under 128 per thread.
SHAPES_NARROW = ((1024, 8),)


def _configs(shapes: tuple[tuple[int, int], ...]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK": block, "ENTRIES_PER_PROGRAM": per_program}, num_warps=warps)
        for block, warps in shapes
        for per_program in ENTRIES_PER_PROGRAM
    ]


CONFIGS_32, CONFIGS_16, CONFIGS_MIXED = _configs(SHAPES_32), _configs(SHAPES_16), _configs(SHAPES_MIXED)

#: One entry per program: with more, the unrolled entry loop takes up to 148 registers (bf16, K = 8).
CONFIGS_NARROW = [c for c in _configs(SHAPES_NARROW) if c.kwargs["ENTRIES_PER_PROGRAM"] == 1]

#: Every config any kernel may be launched with. Every BLOCK divides the table's ENTRY.
CONFIGS = _configs(tuple(dict.fromkeys(SHAPES_32 + SHAPES_16 + SHAPES_MIXED + SHAPES_NARROW)))


def configs_for_dtypes(dtypes: tuple[Any, ...]) -> list[triton.Config]:
    """The configs for a kernel whose data has these element types (``tl`` dtypes)."""
    bits = {d.primitive_bitwidth for d in dtypes}
    if bits == {32}:
        return CONFIGS_32
    if bits == {16}:
        return CONFIGS_16
    return CONFIGS_MIXED


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

    def __init__(self, kernel: Any, key: list[str], configs: Callable[[dict[str, Any]], list[triton.Config]]) -> None:
        """``configs(kwargs)``: the configs for a launch, one of this module's lists (chosen by the key's dtypes)."""
        self.kernel = kernel
        self.key = key
        self.configs = configs
        self.autotuners: dict[int, Any] = {}
        self.chosen: dict[tuple[Any, ...], triton.Config] = {}

    def make_autotuner(self, configs: list[triton.Config]) -> Any:
        return triton.autotune(configs=configs, key=self.key)(self.kernel)

    def configs_for(self, kwargs: dict[str, Any]) -> list[triton.Config]:
        """The configs the autotuner may pick for a launch with ``kwargs``."""
        return self.configs(kwargs)

    def _tune(self, scratch: Callable[[], tuple[int, dict[str, Any]]], kwargs: dict[str, Any]) -> triton.Config:
        configs = self.configs_for(kwargs)
        tuned = self.autotuners.get(id(configs))
        if tuned is None:
            tuned = self.autotuners[id(configs)] = self.make_autotuner(configs)
        scratch_entries, scratch_kwargs = scratch()
        tuned[_grid(scratch_entries)](**scratch_kwargs)
        return tuned.best_config

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
            config = self.chosen[key] = self._tune(scratch, kwargs)
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
            config = self.chosen[tuned_key] = self._tune(scratch, kwargs)
        launch = functools.partial(self.kernel[_grid(n_entries)], **kwargs, **config.all_kwargs())
        store[ident] = launch
        launch()
