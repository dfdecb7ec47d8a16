"""Groups (tensor, shadow) pairs by device and dtypes and runs each group on Triton or torch.

Every operation that writes parameters or shadows checks first that no tracked
tensor changed dtype, shape, layout or device since it was wrapped (a replaced
storage of the same kind is followed), so nothing is ever read or written
through a stale description. The swap is a transaction: an exception or a
``KeyboardInterrupt`` at any point of swapping in or out leaves every tensor as
it was before that operation.
"""

from __future__ import annotations

import _signal  # signal's C core: the enum wrapping of the signal module costs tens of us a call
import functools
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from operator import attrgetter

import torch
from torch import Tensor

from triton_ema import reference
from triton_ema.kernels import HAS_TRITON, KERNEL_DTYPES, interpreting
from triton_ema.reference import Exchanger, Upcaster, is_dense
from triton_ema.schedules import Schedule

BACKENDS = ("auto", "triton", "torch")

#: What must not change under the wrapper, read for a whole list without a Python loop. A device
#: change moves the storage (a new address), which sends the check down the full path.
_META = attrgetter("dtype", "shape", "device")
_FAST_META = attrgetter("dtype", "shape")


def _kernels():
    # Imported on first use so that ``import triton_ema`` never imports Triton's kernels.
    from triton_ema.kernels import ema_update, swap

    return ema_update, swap


def real_view(t: Tensor) -> Tensor:
    """The tensor the update and the swap work on: complex tensors as their (re, im) float pairs."""
    return torch.view_as_real(t) if t.is_complex() else t


def describe(t: Tensor) -> str:
    return f"{t.dtype} {tuple(t.shape)} stride {t.stride()} on {t.device}"


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


@dataclass
class Group:
    """Tensors of one device and dtype pair, with their shadows.

    ``sources`` are the tracked tensor objects themselves (the ``Parameter``, not a
    detached alias), so that a later ``p.data = ...`` is seen; ``params`` are the
    views the operations take (a complex tensor's real view), rebuilt when a
    source's storage moves. ``kind`` is ``"ema"`` (averaged) or ``"copy"``
    (non-floating buffers: copied on each update, exchanged by the swap).
    """

    device: torch.device
    param_dtype: torch.dtype
    shadow_dtype: torch.dtype
    use_triton: bool
    kind: str = "ema"
    sources: list[Tensor] = field(default_factory=list)
    shadows: list[Tensor] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    params: list[Tensor] = field(default_factory=list)
    _meta: list[tuple] = field(default_factory=list)
    _strides: list[tuple] = field(default_factory=list)
    _ptrs: list[int] | None = None
    _tables: list = field(default_factory=list)
    _upcaster: Upcaster | None = None
    _exchanger: Exchanger | None = None

    def add(self, source: Tensor, shadow: Tensor, name: str) -> None:
        self.sources.append(source)
        self.shadows.append(shadow)
        self.names.append(name)
        self._meta.append(_META(source))
        self._strides.append(source.stride())
        self._ptrs = None

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
            # Detached views: the in-place updates then record nothing for autograd without a
            # no_grad context per step; they are rebuilt whenever a source's storage moves.
            self.params = [real_view(t.detach()) for t in self.sources]
            self._tables = []
            self._upcaster = None
            self._exchanger = None
            self._ptrs = ptrs

    def upcaster(self) -> Upcaster | None:
        """Scratch for the torch path when the shadows are wider than the parameters."""
        if self.exchanges:
            return None
        if self._upcaster is None:
            self._upcaster = Upcaster(self.params, self.real_shadows)
        return self._upcaster

    def exchanger(self) -> Exchanger:
        if self._exchanger is None:
            self._exchanger = Exchanger(self.params, self.real_shadows)
        return self._exchanger

    @functools.cached_property
    def real_shadows(self) -> list[Tensor]:
        return [real_view(s) for s in self.shadows]

    def tables(self) -> list:
        """The kernels' tensor tables, built after :meth:`refresh` found the storage moved."""
        if not self._tables:
            from triton_ema.kernels.table import build_tables

            self._tables = build_tables(self.params, self.real_shadows)
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

    @property
    def exchanges(self) -> bool:
        return False

    def add(self, source: Tensor, shadow: Tensor, name: str) -> None:
        super().add(source, shadow, name)
        self.staging.append(torch.empty_like(real_view(shadow), dtype=real_view(source).dtype).pin_memory())
        self._upcaster = None

    def refresh(self) -> None:
        upcaster = self._upcaster
        super().refresh()
        self._upcaster = upcaster  # works on the staging buffers, which do not move

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
            self._upcaster = Upcaster(self.staging, self.real_shadows)
        upcaster = self._upcaster

        def cpu_update() -> None:
            copied.synchronize()
            reference.ema_update_(self.staging, self.real_shadows, weight, upcaster)

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


@dataclass
class DeviceState:
    """Per-device tensors: the step counter (CUDA and Triton devices) and the non-finite guard's flag."""

    counter: Tensor | None = None
    flag: Tensor | None = None
    skipped: Tensor | None = None


class Dispatcher:
    """Runs the update and the swap over all groups: one kernel launch per Triton group."""

    def __init__(self, backend: str, ema_device: torch.device | None = None, skip_nonfinite: bool = False) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"Unknown backend {backend!r}; expected one of {', '.join(map(repr, BACKENDS))}")
        self.backend = backend
        self.ema_device = ema_device
        self.skip_nonfinite = skip_nonfinite
        self.groups: dict[tuple, Group] = {}
        self.devices: dict[torch.device, DeviceState] = {}
        self._swap_state: list[tuple[Group, object]] | None = None
        self._has_cuda = False
        self._offloaded: list[OffloadedGroup] = []
        self._all_sources: list[Tensor] = []
        self._all_ptrs: list[int] | None = None
        self._all_meta: list[tuple] = []
        self._all_strides: list[tuple] = []

    # ------------------------------------------------------------------ tracking
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
        # Dtypes the kernels do not take (float64, a complex128 buffer) and layouts no kernel
        # can walk (gaps or overlaps) take the torch path even here.
        return fits

    def offloaded(self, param: Tensor) -> bool:
        return self.ema_device is not None and self.ema_device != param.device

    def plan(self, source: Tensor, shadow_dtype: torch.dtype, copy: bool = False) -> tuple[tuple, Tensor]:
        """The group key and a new (uninitialised) shadow for ``source``; changes nothing."""
        if copy:
            shadow = torch.empty_like(source, requires_grad=False)
            return (source.device, source.dtype, source.dtype, "copy"), shadow
        if self.offloaded(source):
            if source.device.type != "cuda" or self.ema_device.type != "cpu":
                raise ValueError(f"ema_device={self.ema_device} is supported for CUDA parameters only, as 'cpu'")
            shadow = torch.empty_strided(source.shape, source.stride(), dtype=shadow_dtype, pin_memory=True)
            return (source.device, real_view(source).dtype, real_view(shadow).dtype, "offload"), shadow
        shadow = torch.empty_like(source, dtype=shadow_dtype, requires_grad=False)
        use_triton = self._use_triton(real_view(source), real_view(shadow))
        return (source.device, real_view(source).dtype, real_view(shadow).dtype, use_triton), shadow

    def add(self, key: tuple, source: Tensor, shadow: Tensor, name: str, step: int) -> int:
        """Register a pair planned by :meth:`plan` and return its slot in the group. ``step`` seeds a new counter."""
        device, param_dtype, shadow_dtype, how = key
        group = self.groups.get(key)
        if group is None:
            if how == "offload":
                group = OffloadedGroup(device, param_dtype, shadow_dtype)
                self._offloaded.append(group)
            else:
                group = Group(
                    device, param_dtype, shadow_dtype, use_triton=how is True, kind=how if how == "copy" else "ema"
                )
            self.groups[key] = group
        state = self.devices.setdefault(device, DeviceState())
        # CUDA groups keep the count on the device even on the torch path, so that it
        # advances through CUDA graph replays.
        if (group.use_triton or device.type == "cuda") and how != "offload" and state.counter is None:
            state.counter = torch.full((1,), step, dtype=torch.int64, device=device)
        if self.skip_nonfinite and state.flag is None:
            state.flag = torch.zeros(1, dtype=torch.int32, device=device)
            state.skipped = torch.zeros(1, dtype=torch.int64, device=device)
        self._has_cuda = self._has_cuda or device.type == "cuda"
        group.add(source, shadow, name)
        group.__dict__.pop("real_shadows", None)
        self._all_ptrs = None  # the next refresh takes the full path
        return len(group.sources) - 1

    # ------------------------------------------------------------------ updating
    def before_step(self) -> None:
        for g in self._offloaded:
            g.before_step()

    def join(self) -> None:
        """Wait for offloaded updates still running, before anything reads or writes the shadows."""
        for g in self._offloaded:
            g.join()

    def refresh(self) -> None:
        """Check every tracked tensor (see :meth:`Group.refresh`): three C-level passes over one list."""
        sources = self._all_sources
        if (
            list(map(Tensor.data_ptr, sources)) == self._all_ptrs
            and list(map(_FAST_META, sources)) == self._all_meta
            and list(map(Tensor.stride, sources)) == self._all_strides
        ):
            return
        for g in self.groups.values():
            g.refresh()
        self._all_sources = [t for g in self.groups.values() for t in g.sources]
        self._all_ptrs = list(map(Tensor.data_ptr, self._all_sources))
        self._all_meta = list(map(_FAST_META, self._all_sources))
        self._all_strides = list(map(Tensor.stride, self._all_sources))

    def update(self, step: int, schedule: Schedule) -> None:
        """Apply step ``step``: the device counters move first, then one launch per Triton group."""
        self.refresh()
        if self._has_cuda and torch.cuda.is_current_stream_capturing():
            self._check_capturable(schedule)
        for state in self.devices.values():
            if state.counter is not None:
                state.counter.add_(1)
        weight = schedule.weight(step)
        if self.skip_nonfinite:
            self._check_finite(weight)
        for g in self.groups.values():
            flag = self.devices[g.device].flag
            if isinstance(g, OffloadedGroup):
                if weight is not None:
                    g.update(weight)
            elif g.kind == "copy":
                if weight is not None:
                    torch._foreach_copy_(g.shadows, g.params)
            elif g.use_triton:
                ema_update, _ = _kernels()
                counter = self.devices[g.device].counter
                for table in g.tables():
                    if flag is None:
                        ema_update.ema_update(table, counter, schedule, g.param_dtype, g.shadow_dtype)
                    else:
                        ema_update.ema_update(table, counter, schedule, g.param_dtype, g.shadow_dtype, skip=flag)
            elif weight is not None:
                if flag is None:
                    reference.update_(g.params, g.real_shadows, weight, g.upcaster())
                elif g.device.type == "cpu":
                    # Reading a CPU flag waits for nothing: branch on the host and update at full speed.
                    if not flag.item():
                        reference.update_(g.params, g.real_shadows, weight, g.upcaster())
                else:
                    reference.guarded_update_(g.params, g.real_shadows, weight, flag)
        if self.skip_nonfinite:
            for state in self.devices.values():
                if state.counter is not None:
                    # The kernels decide on the device whether this step updates at all.
                    due = state.counter.remainder(schedule.update_every).eq(0)
                    state.skipped.add_(state.flag * due)
                elif weight is not None:
                    state.skipped.add_(state.flag)

    def _check_finite(self, weight: float | None) -> None:
        """Raise each device's flag if one of its averaged tensors holds NaN or inf (on the device)."""
        for state in self.devices.values():
            state.flag.zero_()
        for g in self.groups.values():
            if g.kind == "copy" or isinstance(g, OffloadedGroup):
                continue
            flag = self.devices[g.device].flag
            if g.use_triton:
                ema_update, _ = _kernels()
                for table in g.tables():
                    ema_update.nonfinite_(table, flag)
            elif weight is not None:
                reference.nonfinite_(g.params, flag)

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
        for state in self.devices.values():
            if state.counter is not None:
                return int(state.counter.item())
        return None

    def set_step(self, step: int) -> None:
        for state in self.devices.values():
            if state.counter is not None:
                state.counter.fill_(step)

    def skipped_updates(self) -> int:
        """Updates skipped by the non-finite guard (the most of any device)."""
        counts = [int(s.skipped.item()) for s in self.devices.values() if s.skipped is not None]
        return max(counts, default=0)

    def set_skipped(self, n: int) -> None:
        for state in self.devices.values():
            if state.skipped is not None:
                state.skipped.fill_(n)

    # ------------------------------------------------------------------ swapping
    @property
    def swapped(self) -> bool:
        return self._swap_state is not None

    def ema_holder(self, group: Group) -> list[Tensor]:
        """The tensors that hold the EMA right now: the params while an equal-dtype swap is in."""
        self.join()
        if self.swapped and group.exchanges:
            return group.sources
        return group.shadows

    @staticmethod
    def _exchange(g: Group, journal: list[int]) -> None:
        """Exchange parameters and shadows of an equal-dtype group in place; its own inverse."""
        if g.use_triton:
            for i, table in enumerate(g.tables()):
                journal[0] = i
                _kernels()[1].swap_(table, g.param_dtype)
                journal[0] = i + 1
        else:
            g.exchanger().run(journal)

    @staticmethod
    def _unexchange(g: Group, journal: list[int]) -> None:
        if g.use_triton:
            for table in reversed(g.tables()[: journal[0]]):
                _kernels()[1].swap_(table, g.param_dtype)
        else:
            g.exchanger().undo(journal)

    @staticmethod
    def _load(g: Group) -> object:
        """Back the parameters up in their own dtype, then write the (wider) shadows into them.

        If the load fails part-way, the parameters are put back from the backup before it re-raises.
        """
        if g.use_triton:
            from triton_ema.kernels.table import build_tables

            swap = _kernels()[1]
            backups = [torch.empty_like(p) for p in g.params]
            tables = build_tables(g.params, g.real_shadows, backups)
            launched = 0
            try:
                for table in tables:
                    swap._launch(table, swap.MODE_BACKUP_AND_LOAD, g.param_dtype, g.shadow_dtype)
                    launched += 1
            except BaseException:
                for table in tables[:launched]:
                    swap._launch(table, swap.MODE_RESTORE, g.param_dtype, g.shadow_dtype)
                raise
            return tables
        backups = [torch.empty_like(p) for p in g.params]
        torch._foreach_copy_(backups, g.params)
        try:
            torch._foreach_copy_(g.params, g.real_shadows)
        except BaseException:
            torch._foreach_copy_(g.params, backups)
            raise
        return backups

    @staticmethod
    def _restore(g: Group, backup: object) -> None:
        if g.use_triton:
            _kernels()[1].restore_(backup, g.param_dtype, g.shadow_dtype)
        else:
            torch._foreach_copy_(g.params, backup)

    @torch.no_grad()
    def swap_in(self) -> None:
        """Put the EMA into every tracked tensor. On any failure nothing has changed, and it re-raises."""
        self.join()
        self.refresh()
        done: list[tuple[Group, object]] = []
        with interrupts_deferred():
            try:
                for g in self.groups.values():
                    if g.exchanges:
                        journal = [0, 0]
                        try:
                            self._exchange(g, journal)
                        except BaseException:
                            self._unexchange(g, journal)
                            raise
                        done.append((g, None))
                    else:
                        done.append((g, self._load(g)))
            except BaseException:
                self._undo(done)
                raise
            self._swap_state = done

    def _undo(self, done: list[tuple[Group, object]]) -> None:
        for g, backup in reversed(done):
            if backup is None:
                self._exchange(g, [0, 0])
            else:
                self._restore(g, backup)

    @torch.no_grad()
    def swap_out(self) -> None:
        """Put the trained values back. On failure the EMA stays swapped in, as it was, and it re-raises."""
        state = self._swap_state or []
        self.refresh()
        with interrupts_deferred():
            undone: list[tuple[Group, object]] = []
            try:
                for g, backup in reversed(state):
                    if backup is None:
                        journal = [0, 0]
                        try:
                            self._exchange(g, journal)
                        except BaseException:
                            self._unexchange(g, journal)
                            raise
                    else:
                        # Idempotent: a failure half-way leaves the EMA partly loaded, and the loop
                        # below loads it again from the shadows.
                        try:
                            self._restore(g, backup)
                        except BaseException:
                            self._reload(g)
                            raise
                    undone.append((g, backup))
            except BaseException:
                for g, backup in reversed(undone):
                    if backup is None:
                        self._exchange(g, [0, 0])
                    else:
                        self._reload(g)
                raise
            self._swap_state = None

    def _reload(self, g: Group) -> None:
        """Write the shadows into the parameters again (after a restore that failed or was undone)."""
        torch._foreach_copy_(g.params, g.real_shadows)
