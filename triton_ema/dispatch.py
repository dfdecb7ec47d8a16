"""Groups (tensor, shadow) pairs by device and dtypes and runs each group on Triton or torch.

Every operation that writes parameters or shadows checks first that no tracked
tensor changed dtype, shape, layout or device since it was wrapped (a replaced
storage of the same kind is followed), so nothing is ever read or written
through a stale description. The swap is a transaction: an exception or a
``KeyboardInterrupt`` at any point of swapping in or out leaves every tensor as
it was before that operation.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from operator import attrgetter

import torch
from torch import Tensor

from triton_ema import reference
from triton_ema.exchange import Swap
from triton_ema.groups import Group, OffloadedGroup, real_view
from triton_ema.kernels import HAS_TRITON, KERNEL_DTYPES, interpreting
from triton_ema.kernels import MAX_PROFILES as _KERNEL_MAX_PROFILES
from triton_ema.reference import is_dense
from triton_ema.schedules import ProfileSet

BACKENDS = ("auto", "triton", "torch")

#: The most EMA profiles one wrapper keeps: the fused K-profile kernel takes one address argument each.
MAX_PROFILES = _KERNEL_MAX_PROFILES

#: The per-update check reads address, dtype, element count and strides (building a ``torch.Size`` per
#: tensor would cost about four times more). Any change of storage, device, dtype, length or layout shows
#: there and sends the check down the full path, which compares shapes and devices too; a new shape with
#: the same address, dtype, element count and strides can only be made with ``as_strided`` on purpose.
_FAST_DTYPE = attrgetter("dtype")


def _kernels():
    # Imported on first use so that ``import triton_ema`` never imports Triton's kernels.
    from triton_ema.kernels import ema_update, swap

    return ema_update, swap


@dataclass
class DeviceState:
    """Per-device tensors: the step counter (CUDA and Triton devices) and the non-finite guard's flag."""

    counter: Tensor | None = None
    flag: Tensor | None = None
    skipped: Tensor | None = None
    weights: Tensor | None = None  # the K profiles' weights of the current update (fused K-profile kernel)


class Dispatcher:
    """Runs the update and the swap over all groups: one kernel launch per Triton group."""

    def __init__(
        self,
        backend: str,
        ema_device: torch.device | None = None,
        skip_nonfinite: bool = False,
        n_profiles: int = 1,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"Unknown backend {backend!r}; expected one of {', '.join(map(repr, BACKENDS))}")
        self.backend = backend
        self.ema_device = ema_device
        self.skip_nonfinite = skip_nonfinite
        self.n_profiles = n_profiles
        self.groups: dict[tuple, Group] = {}
        self.devices: dict[torch.device, DeviceState] = {}
        self._swap = Swap()
        self._has_cuda = False
        self._offloaded: list[OffloadedGroup] = []
        self._reads: list[Future] = []  # work on other threads still reading the shadows (snapshot copies)
        self._all_sources: list[Tensor] = []
        self._all_ptrs: list[int] | None = None
        self._all_dtypes: list[torch.dtype] = []
        self._all_numels: list[int] = []
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

    def plan(self, source: Tensor, shadow_dtype: torch.dtype, copy: bool = False) -> tuple[tuple, list[Tensor]]:
        """The group key and new (uninitialised) shadows for ``source``, one per profile; changes nothing."""
        if copy:
            return (source.device, source.dtype, source.dtype, "copy"), [torch.empty_like(source, requires_grad=False)]
        if self.offloaded(source):
            if source.device.type != "cuda" or self.ema_device.type != "cpu":
                raise ValueError(f"ema_device={self.ema_device} is supported for CUDA parameters only, as 'cpu'")
            shadows = [
                torch.empty_strided(source.shape, source.stride(), dtype=shadow_dtype, pin_memory=True)
                for _ in range(self.n_profiles)
            ]
            return (source.device, real_view(source).dtype, real_view(shadows[0]).dtype, "offload"), shadows
        shadows = [torch.empty_like(source, dtype=shadow_dtype, requires_grad=False) for _ in range(self.n_profiles)]
        use_triton = self._use_triton(real_view(source), real_view(shadows[0]))
        return (source.device, real_view(source).dtype, real_view(shadows[0]).dtype, use_triton), shadows

    def add(self, key: tuple, source: Tensor, shadows: list[Tensor], name: str, step: int) -> int:
        """Register a tensor planned by :meth:`plan`; returns its slot in the group. ``step`` seeds a new counter."""
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
        group.add(source, shadows, name)
        self._all_ptrs = None  # the next refresh takes the full path
        return len(group.sources) - 1

    # ------------------------------------------------------------------ updating
    def before_step(self) -> None:
        for g in self._offloaded:
            g.before_step()

    def defer_read(self, done: Future) -> None:
        """Register work that still reads the shadows on another thread (a snapshot's host copy): :meth:`join`
        and :meth:`update` wait for ``done`` before anything writes or reads them."""
        self._reads.append(done)

    def _wait_reads(self) -> None:
        while self._reads:
            self._reads[0].result()
            del self._reads[0]

    def join(self) -> None:
        """Wait for offloaded updates and deferred reads still running, before anything reads or writes the
        shadows."""
        self._wait_reads()
        for g in self._offloaded:
            g.join()

    def refresh(self) -> None:
        """Check every tracked tensor (see :meth:`Group.refresh`): four C-level passes over one list."""
        sources = self._all_sources
        if (
            list(map(Tensor.data_ptr, sources)) == self._all_ptrs
            and list(map(_FAST_DTYPE, sources)) == self._all_dtypes
            and list(map(Tensor.numel, sources)) == self._all_numels
            and list(map(Tensor.stride, sources)) == self._all_strides
        ):
            return
        for g in self.groups.values():
            g.refresh()
        self._all_sources = [t for g in self.groups.values() for t in g.sources]
        self._all_ptrs = list(map(Tensor.data_ptr, self._all_sources))
        self._all_dtypes = list(map(_FAST_DTYPE, self._all_sources))
        self._all_numels = list(map(Tensor.numel, self._all_sources))
        self._all_strides = list(map(Tensor.stride, self._all_sources))

    def update(self, step: int, profiles: ProfileSet) -> None:
        """Apply step ``step``: the device counters move first, then one launch per Triton group and table.

        A single classic schedule runs the kernel that evaluates it from the counter;
        several profiles (or power-function ones) run the fused K-profile kernel with
        weights computed on the device from the counter.
        """
        self._wait_reads()  # a snapshot's copy reads the shadows this update writes
        self.refresh()
        if self._has_cuda and torch.cuda.is_current_stream_capturing():
            self._check_capturable(profiles)
        for state in self.devices.values():
            if state.counter is not None:
                state.counter.add_(1)
        single = profiles.single_schedule
        weights = profiles.weights(step)
        if self.skip_nonfinite:
            self._check_finite(weights is not None)
        device_weights: dict[torch.device, Tensor] = {}
        for g in self.groups.values():
            flag = self.devices[g.device].flag
            if isinstance(g, OffloadedGroup):
                if weights is not None:
                    g.update(weights)
            elif g.kind == "copy":
                if weights is not None:
                    torch._foreach_copy_(g.shadows, g.params)
            elif g.use_triton:
                counter = self.devices[g.device].counter
                if single is not None:
                    ema_update, _ = _kernels()
                    for table in g.tables():
                        if flag is None:
                            ema_update.ema_update(table, counter, single, g.param_dtype, g.shadow_dtype)
                        else:
                            ema_update.ema_update(table, counter, single, g.param_dtype, g.shadow_dtype, skip=flag)
                elif weights is not None or g.device.type != "cpu":
                    # On a CPU (the interpreter: no CUDA graphs) the host's count is the truth and a
                    # step without an update launches nothing; on a GPU the kernel decides.
                    from triton_ema.kernels.multi import ema_update_multi, profile_weights_

                    w = device_weights.get(g.device)
                    if w is None:
                        # One persistent buffer per device, filled by one tiny launch from the counter:
                        # the update kernel's bound launch keeps pointing at it.
                        state = self.devices[g.device]
                        if state.weights is None or len(state.weights) != len(profiles):
                            state.weights = torch.empty(len(profiles), dtype=torch.float32, device=g.device)
                        w = device_weights[g.device] = profile_weights_(counter, profiles, state.weights)
                    for table in g.multi_tables():
                        ema_update_multi(table, w, g.param_dtype, g.shadow_dtype, g.n_profiles, skip=flag)
            elif weights is not None:
                if flag is None:
                    reference.update_multi_(g.params, g.all_real_shadows(), weights, g.upcaster())
                elif g.device.type == "cpu":
                    # Reading a CPU flag waits for nothing: branch on the host and update at full speed.
                    if not flag.item():
                        reference.update_multi_(g.params, g.all_real_shadows(), weights, g.upcaster())
                else:
                    for shadows, w in zip(g.all_real_shadows(), weights):
                        reference.guarded_update_(g.params, shadows, w, flag)
        if self.skip_nonfinite:
            for state in self.devices.values():
                if state.counter is not None:
                    # The kernels decide on the device whether this step updates at all.
                    due = state.counter.remainder(profiles.update_every).eq(0)
                    state.skipped.add_(state.flag * due)
                elif weights is not None:
                    state.skipped.add_(state.flag)

    def _check_finite(self, updating: bool) -> None:
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
            elif updating:
                reference.nonfinite_(g.params, flag)

    def _check_capturable(self, profiles: ProfileSet) -> None:
        for g in self.groups.values():
            if isinstance(g, OffloadedGroup):
                raise RuntimeError("ema_device='cpu' updates cannot be captured in a CUDA graph")
            if not g.use_triton and not profiles.is_constant:
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

    @torch.no_grad()
    def copy_to_params(self, profile: int = 0) -> None:
        """Write profile ``profile``'s EMA into every tracked tensor for good."""
        self.join()
        self.refresh()
        for g in self.groups.values():
            torch._foreach_copy_(g.params, g.real_shadows_of(g.own_profile(profile)))

    # ------------------------------------------------------------------ swapping (see triton_ema.exchange)
    @property
    def swapped(self) -> bool:
        return self._swap.swapped

    @property
    def restore_failed(self) -> bool:
        """True after :meth:`leave` could not put the trained weights back."""
        return self._swap.restore_failed

    def ema_holder(self, group: Group, profile: int = 0) -> list[Tensor]:
        """The tensors that hold a profile's EMA right now: the params while an equal-dtype swap of it is in.

        Call :meth:`join` first when offloaded updates may still be running.
        """
        return self._swap.ema_holder(group, profile)

    @torch.inference_mode(False)  # backups and scratch kept for later swaps must not be inference tensors
    def swap_in(self, profile: int = 0) -> None:
        """Put profile ``profile``'s EMA into every tracked tensor. On any failure nothing has changed."""
        self.join()
        self.refresh()
        self._swap.swap_in(list(self.groups.values()), profile)

    @torch.inference_mode(False)
    def swap_out(self) -> None:
        """Put the trained values back. On failure the EMA stays swapped in, as it was, and it re-raises."""
        self.refresh()
        self._swap.swap_out(list(self.groups.values()))

    def leave(self) -> None:
        """:meth:`swap_out`, tried twice; a second failure sets :attr:`restore_failed` and raises RuntimeError."""
        self._swap.leave(self.swap_out)

    def restore_trained(self) -> None:
        """Put the trained weights back after a failed :meth:`leave`; a no-op otherwise."""
        if self.swapped:
            self.swap_out()
        self._swap.restore_failed = False
