"""Groups (parameter, shadow) pairs by device and dtypes and runs each group on Triton or torch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from triton_ema import reference
from triton_ema.kernels import HAS_TRITON, interpreting
from triton_ema.schedules import Schedule

BACKENDS = ("auto", "triton", "torch")


def is_dense(t: Tensor) -> bool:
    """True when ``t`` covers its memory without gaps or overlaps, in any dimension order."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda ss: ss[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _kernels():
    # Imported on first use so that ``import triton_ema`` never imports Triton's kernels.
    from triton_ema.kernels import ema_update, swap

    return ema_update, swap


@dataclass
class Group:
    device: torch.device
    param_dtype: torch.dtype
    shadow_dtype: torch.dtype
    use_triton: bool
    params: list[Tensor] = field(default_factory=list)
    shadows: list[Tensor] = field(default_factory=list)
    _table: object = None
    _ptrs: list[int] | None = None

    def table(self):
        """The kernels' tensor table, rebuilt when a parameter's storage moved.

        Reading the addresses costs a Python loop over the group's tensors per
        launch (microseconds); it is what keeps a stale table from writing
        through freed memory after ``p.data = ...`` or similar.
        """
        ptrs = [p.data_ptr() for p in self.params]
        if ptrs != self._ptrs:
            from triton_ema.kernels.table import build_table

            for p, s in zip(self.params, self.shadows):
                if p.shape != s.shape or p.stride() != s.stride():
                    raise RuntimeError(
                        f"a parameter changed shape or layout after wrapping ({tuple(s.shape)} -> {tuple(p.shape)})"
                    )
            self._table = build_table(self.params, self.shadows)
            self._ptrs = ptrs
        return self._table


class Dispatcher:
    """Runs the update and the swap over all groups: one kernel launch per Triton group."""

    def __init__(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"Unknown backend {backend!r}; expected one of {', '.join(map(repr, BACKENDS))}")
        self.backend = backend
        self.groups: dict[tuple, Group] = {}
        self.counters: dict[torch.device, Tensor] = {}
        self._backups: list[tuple[Group, object]] | None = None

    def _use_triton(self, p: Tensor, s: Tensor) -> bool:
        if self.backend == "torch":
            return False
        from triton_ema.kernels.ema_update import SUPPORTED_DTYPES

        fits = p.dtype in SUPPORTED_DTYPES and s.dtype in SUPPORTED_DTYPES and is_dense(p) and p.stride() == s.stride()
        if self.backend == "auto":
            return HAS_TRITON and p.device.type == "cuda" and not interpreting() and fits
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package, which is not installed")
        if p.device.type == "cpu" and not interpreting():
            raise RuntimeError(
                "backend='triton' with CPU tensors runs in Triton's interpreter: set TRITON_INTERPRET=1 "
                "before triton is first imported, or use backend='torch'"
            )
        if p.dtype not in SUPPORTED_DTYPES or s.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"backend='triton' supports float32, bfloat16 and float16 tensors, got {p.dtype}/{s.dtype}"
            )
        # Layouts no kernel can walk (gaps or overlaps) take the torch path even here.
        return fits

    def add(self, param: Tensor, shadow: Tensor, step: int) -> None:
        """Track a (local parameter, local shadow) pair. ``step`` seeds a new device counter."""
        use_triton = self._use_triton(param, shadow)
        key = (param.device, param.dtype, shadow.dtype, use_triton)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = Group(param.device, param.dtype, shadow.dtype, use_triton)
        group.params.append(param)
        group.shadows.append(shadow)
        group._ptrs = None
        if use_triton and param.device not in self.counters:
            self.counters[param.device] = torch.full((1,), step, dtype=torch.int64, device=param.device)

    @torch.no_grad()
    def update(self, step: int, schedule: Schedule) -> None:
        """Apply step ``step``: the device counters move first, then one launch per Triton group."""
        for counter in self.counters.values():
            counter.add_(1)
        weight = schedule.weight(step)
        for g in self.groups.values():
            if g.use_triton:
                ema_update, _ = _kernels()
                ema_update.ema_update(g.table(), self.counters[g.device], schedule, g.param_dtype, g.shadow_dtype)
            elif weight is not None:
                reference.ema_update_(g.params, g.shadows, weight)

    def device_step(self) -> int | None:
        """The step count held on a device (it can run ahead of the host after CUDA graph replays)."""
        for counter in self.counters.values():
            return int(counter.item())
        return None

    def set_step(self, step: int) -> None:
        for counter in self.counters.values():
            counter.fill_(step)

    @property
    def swapped(self) -> bool:
        return self._backups is not None

    def ema_holder(self, group: Group) -> list[Tensor]:
        """The tensors that hold the EMA right now: the params while an equal-dtype swap is in."""
        if self.swapped and group.param_dtype == group.shadow_dtype:
            return group.params
        return group.shadows

    @torch.no_grad()
    def swap_in(self) -> None:
        backups: list[tuple[Group, object]] = []
        self._backups = backups
        for g in self.groups.values():
            if g.param_dtype == g.shadow_dtype:
                if g.use_triton:
                    _kernels()[1].swap_(g.table(), g.param_dtype)
                else:
                    reference.swap_(g.params, g.shadows)
                backups.append((g, None))
            elif g.use_triton:
                backups.append((g, _kernels()[1].backup_and_load_(g.params, g.shadows)[1]))
            else:
                backups.append((g, reference.backup_and_load_(g.params, g.shadows)))

    @torch.no_grad()
    def swap_out(self) -> None:
        backups, self._backups = self._backups or [], None
        for g, backup in backups:
            if backup is None:
                if g.use_triton:
                    _kernels()[1].swap_(g.table(), g.param_dtype)
                else:
                    reference.swap_(g.params, g.shadows)
            elif g.use_triton:
                _kernels()[1].restore_(backup, g.param_dtype, g.shadow_dtype)
            else:
                reference.restore_(g.params, backup)
