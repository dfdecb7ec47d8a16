"""Groups (parameter, shadow) pairs by device and dtypes and runs each group on Triton or torch."""

from __future__ import annotations

import functools
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

from triton_ema import reference
from triton_ema.kernels import HAS_TRITON, KERNEL_DTYPES, interpreting
from triton_ema.reference import Upcaster, is_dense
from triton_ema.schedules import Schedule

BACKENDS = ("auto", "triton", "torch")


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
    _tables: list = field(default_factory=list)
    _ptrs: list[int] | None = None
    _upcaster: Upcaster | None = None

    def add(self, param: Tensor, shadow: Tensor) -> None:
        self.params.append(param)
        self.shadows.append(shadow)
        # Tables and scratch cover the tensor list as it was: rebuilt on next use.
        self._ptrs = None
        self._upcaster = None

    def upcaster(self) -> Upcaster | None:
        """Scratch for the torch path when the shadows are wider than the parameters."""
        if self.param_dtype == self.shadow_dtype:
            return None
        if self._upcaster is None:
            self._upcaster = Upcaster(self.params, self.shadows)
        return self._upcaster

    def tables(self) -> list:
        """The kernels' tensor tables, rebuilt when a parameter's storage moved.

        Reading the addresses costs a Python loop over the group's tensors per
        launch (microseconds); it is what keeps a stale table from writing
        through freed memory after ``p.data = ...`` or similar.
        """
        ptrs = [p.data_ptr() for p in self.params]
        if ptrs != self._ptrs:
            from triton_ema.kernels.table import build_tables

            for p, s in zip(self.params, self.shadows):
                if p.shape != s.shape or p.stride() != s.stride():
                    raise RuntimeError(
                        f"a parameter changed shape or layout after wrapping ({tuple(s.shape)} -> {tuple(p.shape)})"
                    )
            self._tables = build_tables(self.params, self.shadows)
            self._ptrs = ptrs
        return self._tables


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

    def add(self, param: Tensor, shadow: Tensor) -> None:
        super().add(param, shadow)
        self.staging.append(torch.empty_like(shadow, dtype=param.dtype).pin_memory())

    def update(self, weight: float) -> None:
        self.join()
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            for buf, p in zip(self.staging, self.params):
                buf.copy_(p, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record(self._stream)
        copied = self._copied

        if self._upcaster is None and self.param_dtype != self.shadow_dtype:
            self._upcaster = Upcaster(self.staging, self.shadows)
        upcaster = self._upcaster

        def cpu_update() -> None:
            copied.synchronize()
            reference.ema_update_(self.staging, self.shadows, weight, upcaster)

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


class Dispatcher:
    """Runs the update and the swap over all groups: one kernel launch per Triton group."""

    def __init__(self, backend: str, ema_device: torch.device | None = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"Unknown backend {backend!r}; expected one of {', '.join(map(repr, BACKENDS))}")
        self.backend = backend
        self.ema_device = ema_device
        self.groups: dict[tuple, Group] = {}
        self.counters: dict[torch.device, Tensor] = {}
        self._backups: list[tuple[Group, object]] | None = None

    def _use_triton(self, p: Tensor, s: Tensor) -> bool:
        if self.backend == "torch":
            return False
        fits = p.dtype in KERNEL_DTYPES and s.dtype in KERNEL_DTYPES and is_dense(p) and p.stride() == s.stride()
        if self.backend == "auto":
            return HAS_TRITON and p.device.type == "cuda" and not interpreting() and fits
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package, which is not installed")
        if p.device.type == "cpu" and not interpreting():
            raise RuntimeError(
                "backend='triton' with CPU tensors runs in Triton's interpreter: set TRITON_INTERPRET=1 "
                "before triton is first imported, or use backend='torch'"
            )
        if p.dtype not in KERNEL_DTYPES or s.dtype not in KERNEL_DTYPES:
            raise ValueError(
                f"backend='triton' supports float32, bfloat16 and float16 tensors, got {p.dtype}/{s.dtype}"
            )
        # Layouts no kernel can walk (gaps or overlaps) take the torch path even here.
        return fits

    def offloaded(self, param: Tensor) -> bool:
        return self.ema_device is not None and self.ema_device != param.device

    def add(self, param: Tensor, shadow_dtype: torch.dtype, step: int) -> Tensor:
        """Track a local parameter and return its new shadow. ``step`` seeds a new device counter."""
        if self.offloaded(param):
            if param.device.type != "cuda" or self.ema_device.type != "cpu":
                raise ValueError(f"ema_device={self.ema_device} is supported for CUDA parameters only, as 'cpu'")
            shadow = torch.empty_strided(param.shape, param.stride(), dtype=shadow_dtype, pin_memory=True)
            key = (param.device, param.dtype, shadow_dtype, "offload")
            make = OffloadedGroup
        else:
            shadow = torch.empty_like(param, dtype=shadow_dtype, requires_grad=False)
            use_triton = self._use_triton(param, shadow)
            key = (param.device, param.dtype, shadow_dtype, use_triton)
            make = functools.partial(Group, use_triton=use_triton)
            # CUDA groups keep the count on the device even on the torch path, so that it
            # advances through CUDA graph replays.
            if (use_triton or param.device.type == "cuda") and param.device not in self.counters:
                self.counters[param.device] = torch.full((1,), step, dtype=torch.int64, device=param.device)
        shadow.copy_(param)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = make(param.device, param.dtype, shadow_dtype)
        group.add(param, shadow)
        return shadow

    def before_step(self) -> None:
        for g in self.groups.values():
            if isinstance(g, OffloadedGroup):
                g.before_step()

    def join(self) -> None:
        """Wait for offloaded updates still running, before anything reads or writes the shadows."""
        for g in self.groups.values():
            if isinstance(g, OffloadedGroup):
                g.join()

    @torch.no_grad()
    def update(self, step: int, schedule: Schedule) -> None:
        """Apply step ``step``: the device counters move first, then one launch per Triton group."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            self._check_capturable(schedule)
        for counter in self.counters.values():
            counter.add_(1)
        weight = schedule.weight(step)
        for g in self.groups.values():
            if isinstance(g, OffloadedGroup):
                if weight is not None:
                    g.update(weight)
            elif g.use_triton:
                ema_update, _ = _kernels()
                for table in g.tables():
                    ema_update.ema_update(table, self.counters[g.device], schedule, g.param_dtype, g.shadow_dtype)
            elif weight is not None:
                reference.ema_update_(g.params, g.shadows, weight, g.upcaster())

    def _check_capturable(self, schedule: Schedule) -> None:
        for g in self.groups.values():
            if isinstance(g, OffloadedGroup):
                raise RuntimeError("ema_device='cpu' updates cannot be captured in a CUDA graph")
            if not g.use_triton and not schedule.is_constant:
                raise RuntimeError(
                    "the torch path computes the decay on the host, so a CUDA graph would replay the decay of "
                    "the captured step: capture with backend='triton' (the default for CUDA tensors), or use a "
                    "schedule without warmup, update_after_step or update_every"
                )

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
        self.join()
        if self.swapped and group.param_dtype == group.shadow_dtype and not isinstance(group, OffloadedGroup):
            return group.params
        return group.shadows

    @staticmethod
    def _exchange(g: Group) -> None:
        """Swap parameters and shadows of an equal-dtype group in place; its own inverse."""
        if g.use_triton:
            for table in g.tables():
                _kernels()[1].swap_(table, g.param_dtype)
        else:
            reference.swap_(g.params, g.shadows)

    @torch.no_grad()
    def swap_in(self) -> None:
        self.join()
        backups: list[tuple[Group, object]] = []
        self._backups = backups
        for g in self.groups.values():
            if g.param_dtype == g.shadow_dtype and not isinstance(g, OffloadedGroup):
                self._exchange(g)
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
                self._exchange(g)
            elif g.use_triton:
                _kernels()[1].restore_(backup, g.param_dtype, g.shadow_dtype)
            else:
                reference.restore_(g.params, backup)
