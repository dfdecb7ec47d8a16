"""EMAOptimizerWrapper: when to update the EMA, how to swap it in, how to checkpoint it."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from triton_ema import checkpoint
from triton_ema.dispatch import BACKENDS, MAX_PROFILES, Dispatcher
from triton_ema.export import EMAExport
from triton_ema.schedules import PowerProfile, ProfileSet, Schedule
from triton_ema.snapshot_schedule import SnapshotConfig, SnapshotControls, SnapshotSchedule
from triton_ema.tracking import Tracker, split_named
from triton_ema.traps import Traps
from triton_ema.util import as_global


class EMAOptimizerWrapper(EMAExport, SnapshotControls, Optimizer):
    r"""Wraps an optimizer and keeps an exponential moving average of its parameters.

    After every successful :meth:`step` of the wrapped optimizer, each parameter's
    shadow copy moves towards it:

    .. math::
        \text{ema} \leftarrow \text{ema} + (1 - d_t)\,(\theta - \text{ema})

    where ``t`` counts successful steps and ``d_t`` follows the warmup schedule
    (``u = t - update_after_step``):

    ============  =============================================================
    ``warmup``    ``d_t``
    ============  =============================================================
    ``None``      ``decay``
    ``"litema"``  ``min(decay, (1 + u) / (10 + u))`` (LitEma, torch_ema)
    ``"power"``   ``1 - (1 + (u - 1) / warmup_gamma) ** -warmup_power``, a copy
                  at ``u == 1`` (timm ModelEmaV3, diffusers, ema-pytorch)
    ============  =============================================================

    ``d_t`` is then clamped to ``[min_decay, decay]``; steps with
    ``t <= update_after_step`` copy the parameter, and only steps with
    ``t % update_every == 0`` update at all. The EMA averages roughly the last
    ``1 / (1 - decay)`` steps.

    The wrapper *is* an optimizer: ``param_groups``, ``state`` and ``defaults``
    are the wrapped optimizer's own objects, so LR schedulers, ``GradScaler``
    and trainers work on it unchanged.

    Args:
        optimizer: the optimizer to wrap.
        decay: the largest decay, in ``[0, 1]`` (default 0.9999); a tuple of decays tracks
            one EMA profile per decay, all updated in one pass.
        warmup: ``"power"`` (default, as ema-pytorch and timm's ModelEmaV3), ``"litema"`` or ``None``.
        warmup_gamma, warmup_power: the ``"power"`` schedule's constants (default 1 and 2/3).
        min_decay: the smallest decay, in ``[0, decay]``.
        update_after_step: steps before this one copy the parameters.
        update_every: update on every ``update_every``-th step only.
        ema_dtype: the shadows' dtype is ``torch.promote_types(param.dtype, ema_dtype)``;
            ``None`` keeps the parameter's dtype.
        backend: ``"auto"`` (Triton for CUDA tensors, torch ops otherwise), ``"triton"`` or ``"torch"``.
        buffers: module buffers to track too (BatchNorm statistics): floating ones
            are averaged like parameters, the others copied on each update; all are
            swapped by :meth:`ema_weights`. Default: ``model.buffers()`` when
            ``model`` is given (as timm and ema-pytorch do), else none; ``[]`` for none.
        ema_device: ``"cpu"`` keeps the shadows of CUDA parameters in pinned host
            memory, updated by a worker thread after an asynchronous copy, so the
            training stream never waits for the EMA (not for CUDA graphs).
            Default: the parameter's device.
        skip_nonfinite: leave every averaged shadow of a device bit-exactly alone (integer buffers are still
            copied) for an update whose parameters hold NaN or inf, and count it in :attr:`skipped_updates`
            (decided on the device). Default: off, a NaN or inf propagates, as in other EMA libraries.
        sigma_rel: instead of ``decay``/``warmup``: one or more EDM2
            power-function profiles of these relative widths (``0 < sigma_rel <
            12 ** -0.5``), the time being the step count.
        snapshot_every, snapshot_dir, snapshot_dtype: with ``sigma_rel``, every
            ``snapshot_every`` updates write each profile to ``snapshot_dir`` as
            safetensors (asynchronously; :meth:`flush` waits), for
            :func:`triton_ema.posthoc.reconstruct` to build the EMA of any width
            after training. ``snapshot_dtype`` defaults to the shadows' dtype.
        model: the model trained: its buffers are tracked, :meth:`ema_state_dict` is keyed like its
            ``state_dict()``, and snapshot tensors take its names (those of the module inside torch.compile
            or DDP) where the inner optimizer's ``param_names`` are missing or not unique.
        snapshot_resume: continue the run whose snapshots ``snapshot_dir`` holds, from the checkpoint
            loaded next (default ``False``: such a directory is refused at construction).

    .. note::
        A bf16 or fp16 parameter gets an fp32 shadow by default: with
        ``decay=0.9999`` a step moves the average by ``1e-4`` of the difference,
        below bf16's resolution, so a bf16 shadow would stop moving. On CUDA the
        update is one fused Triton launch per (device, dtype, shadow dtype) group
        that reads the step count from device memory: no host synchronisation,
        so a whole ``step()`` can be captured in a CUDA graph. DTensor parameters
        (FSDP2) are updated and swapped shard by shard, without gathering.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = EMAOptimizerWrapper(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.999, warmup="litema")
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> opt.step()
        >>> with opt.ema_weights():
        ...     _ = model(torch.randn(1, 4))  # evaluated with the averaged weights
    """

    def __init__(
        self,
        optimizer: Optimizer,
        decay: float | Sequence[float] = 0.9999,
        *,
        warmup: str | None = "power",
        warmup_gamma: float = 1.0,
        warmup_power: float = 2.0 / 3.0,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        update_every: int = 1,
        ema_dtype: torch.dtype | None = torch.float32,
        backend: str = "auto",
        buffers: Iterable[Tensor] | None = None,
        ema_device: torch.device | str | None = None,
        skip_nonfinite: bool = False,
        sigma_rel: float | Sequence[float] | None = None,
        snapshot_every: int | None = None,
        snapshot_dir: str | os.PathLike | None = None,
        snapshot_dtype: torch.dtype | None = None,
        model: torch.nn.Module | None = None,
        snapshot_resume: bool = False,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, EMAOptimizerWrapper):
            raise TypeError("optimizer is already an EMAOptimizerWrapper")
        profiles = _profiles(
            decay, sigma_rel, warmup, warmup_gamma, warmup_power, min_decay, update_after_step, update_every
        )
        power = isinstance(profiles.members[0], PowerProfile)
        sigmas = tuple(getattr(m, "sigma_rel", None) for m in profiles.members)
        snapshots = SnapshotConfig(snapshot_every, snapshot_dir, snapshot_dtype, model, power, sigmas)
        if backend not in BACKENDS:
            raise ValueError(f"Unknown backend {backend!r}; expected one of {', '.join(map(repr, BACKENDS))}")
        if ema_dtype is not None and (not isinstance(ema_dtype, torch.dtype) or not ema_dtype.is_floating_point):
            raise ValueError(f"ema_dtype must be a floating torch.dtype or None, got {ema_dtype!r}")
        if not isinstance(skip_nonfinite, bool):
            raise TypeError(f"skip_nonfinite must be a bool, got {type(skip_nonfinite).__name__}")
        buffers = list(buffers if buffers is not None else model.buffers() if model is not None else [])
        for i, b in enumerate(buffers):
            if not isinstance(b, Tensor):
                raise TypeError(f"buffers[{i}] is a {type(b).__name__}, not a tensor")
        if ema_device is not None:
            ema_device = torch.device(ema_device)
            if ema_device.type == "cpu":
                ema_device = torch.device("cpu")  # "cpu:0" is the CPU too

        self.optimizer = optimizer
        self.profiles = profiles
        self.ema_dtype = ema_dtype
        self.backend = backend
        self._init_hooks()
        self._step = 0
        self._snapshots = SnapshotSchedule(snapshots)
        self._dispatch = Dispatcher(backend, ema_device, skip_nonfinite, n_profiles=len(profiles))
        self._tracked = Tracker(self._dispatch, ema_dtype)
        self._tracked.track(self._tracked.all_params(self.param_groups), buffers, self._step)
        self._snapshots.check_names(self._tracked, self.param_groups)
        self._snapshots.open(self._tracked, snapshot_resume)
        self._traps = Traps(self)

    @property
    def schedule(self) -> Schedule | PowerProfile:
        """The first EMA profile (the only one unless several decays or sigma_rel values were given)."""
        return self.profiles.members[0]

    # The inner optimizer's own objects, looked up on every access: Optimizer.load_state_dict
    # replaces the list and the dict, and a scheduler or trainer holding the wrapper must keep
    # driving the optimizer that steps.
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def _init_hooks(self) -> None:
        # What Optimizer.__init__ would create; it is not called because it would add the groups again.
        # The wrapper's step is not patched by Optimizer's profiling wrapper: the inner step already
        # runs the global hooks and shows in the profiler, once per step.
        for kind in ("step", "state_dict", "load_state_dict"):
            for when in ("pre", "post"):
                setattr(self, f"_optimizer_{kind}_{when}_hooks", OrderedDict())

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer and track its parameters; on any error neither changes."""
        self._check_not_swapped("add_param_group")
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, Tensor) else list(params)
        view = split_named(group)  # (name, tensor) pairs: the inner optimizer splits them itself
        named = self._tracked.named(view, len(self._tracked.params))
        plan = self._tracked.plan(named, [])
        self._snapshots.check_names(self._tracked, [*self.param_groups, view], plan)
        self.optimizer.add_param_group(group)
        self._tracked.commit(plan, named, [], self._step)

    # ------------------------------------------------------------------ stepping
    def _check_not_swapped(self, what: str) -> None:
        if self._dispatch.swapped:
            if self._dispatch.restore_failed:
                raise RuntimeError(
                    f"{what}() called while the EMA is still in the model: restoring the trained weights "
                    "after ema_weights() failed; call restore_trained_weights() first"
                )
            raise RuntimeError(f"{what}() called inside ema_weights(); leave the context first")

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take a step of the wrapped optimizer, then update the EMA. Returns what the inner step returns."""
        if self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks:
            return self._step_with_hooks(closure)
        return self._step_once(closure)

    def _step_with_hooks(self, closure: Callable[[], Any] | None) -> Any:
        args: tuple = (self,)
        kwargs: dict[str, Any] = {} if closure is None else {"closure": closure}
        for hook in list(self._optimizer_step_pre_hooks.values()):
            result = hook(self, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(f"a step pre-hook must return None or (args, kwargs), got {result!r}")
                args, kwargs = result
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        out = self._step_once(closure)
        for hook in list(self._optimizer_step_post_hooks.values()):
            hook(self, args, kwargs)
        return out

    def _step_once(self, closure: Callable[[], Any] | None) -> Any:
        if checkpoint.initialising_state(self.optimizer):
            # torch.distributed.checkpoint creates optimizer state by stepping with zero gradients and
            # learning rates: not a training step, and it changes no weight (so also inside ema_weights()).
            return self.optimizer.step() if closure is None else self.optimizer.step(closure)
        self._check_not_swapped("step")
        self._tracked.check_groups(self.param_groups)
        self._dispatch.before_step()
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        self.update_ema()
        return loss

    def update_ema(self) -> None:
        """Count one successful step and update the EMA; :meth:`step` calls it after the inner step.

        Call it yourself only when you step the wrapped optimizer directly.
        """
        if torch.compiler.is_compiling():
            return self._update_ema_eagerly()
        self._check_not_swapped("update_ema")
        # The dispatcher checks the tensors before it counts or touches anything, and works on
        # detached views (no autograd context needed).
        self._dispatch.update(self._step + 1, self.profiles)
        self._step += 1
        self._snapshots.after_update(self._step, self.profiles, self._tracked, self.param_groups)

    # Runs eagerly even when step() is traced by torch.compile: dynamo would drop the
    # step-count mutation on the optimizer object, and the kernels launch on their own.
    @torch.compiler.disable
    def _update_ema_eagerly(self) -> None:
        self.update_ema()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def num_steps(self) -> int:
        """Successful steps so far (read from the device when the kernels keep the count there)."""
        device_step = self._dispatch.device_step()
        return self._step if device_step is None else device_step

    @property
    def skipped_updates(self) -> int:
        """Updates left out by ``skip_nonfinite=True`` because a parameter held NaN or inf."""
        return self._dispatch.skipped_updates()

    def current_decay(self) -> float | None:
        """The decay the next step will use, or ``None`` if it makes no update."""
        return self.schedule.decay_at(self.num_steps + 1)

    # ------------------------------------------------------------------ reading and swapping
    def _check_profile(self, profile: int) -> int:
        if isinstance(profile, bool) or not isinstance(profile, int) or not 0 <= profile < len(self.profiles):
            raise ValueError(f"profile must be an int in [0, {len(self.profiles)}), got {profile!r}")
        return profile

    def ema_params(self, profile: int = 0) -> list[Tensor]:
        """The EMA of each parameter, in ``param_groups`` order (DTensors for DTensor parameters).

        These are the live shadows: modify them at your own risk. Inside
        :meth:`ema_weights` the EMA lives in the parameters, and the returned
        tensors are the parameters themselves where dtypes are equal.
        """
        holders = self._tracked.holders(self._check_profile(profile))
        return [as_global(holders[i], p) for i, p in zip(self._tracked.param_entry, self._tracked.params)]

    def ema_buffers(self, profile: int = 0) -> list[Tensor]:
        """The EMA of each floating buffer and the copy of each other buffer, in the order given."""
        holders = self._tracked.holders(self._check_profile(profile))
        return [as_global(holders[i], b) for i, b in zip(self._tracked.buffer_entry, self._tracked.buffers)]

    def copy_ema_to_params(self, profile: int = 0) -> None:
        """Write a profile's EMA into the parameters (and buffers) for good, e.g. before exporting the model."""
        self._check_profile(profile)
        self._check_not_swapped("copy_ema_to_params")
        self._dispatch.copy_to_params(profile)

    @contextmanager
    def ema_weights(self, profile: int = 0) -> Iterator[EMAOptimizerWrapper]:
        """Context manager: inside, every tracked parameter (and buffer) holds its EMA value.

        The swap is in place, so a compiled model or anything else holding the
        parameters sees it. On exit, also when the body raises, the trained
        values come back bit-exactly and the shadows are as they were, provided
        the body did not modify the parameters. It is a transaction: if swapping
        in or out fails part-way (an exception, ``KeyboardInterrupt``), every
        tensor is left as it was before that swap. It does not nest, and
        :meth:`step` inside it raises.
        """
        if self._dispatch.swapped and not self._dispatch.restore_failed:
            raise RuntimeError("ema_weights() is already active; it does not nest")
        self._check_not_swapped("ema_weights")
        self._check_profile(profile)
        self._traps.before_swap(self._step)
        try:
            self._dispatch.swap_in(profile)
            yield self
        finally:
            if self._dispatch.swapped:
                self._dispatch.leave()

    def restore_trained_weights(self) -> None:
        """Put the trained weights back after a failed exit from :meth:`ema_weights`; a no-op otherwise."""
        self._dispatch.restore_trained()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict, with the EMA in it (the format: :mod:`triton_ema.checkpoint`).

        Each parameter's state holds its EMA as ``"ema_shadow"``, so tools that reshard optimizer state carry
        it along. Shadows are the live tensors (as in ``Optimizer.state_dict``), copies inside :meth:`ema_weights`.
        """
        for hook in list(self._optimizer_state_dict_pre_hooks.values()):
            hook(self)
        self.flush()
        state = checkpoint.pack(self, self.optimizer.state_dict())
        for hook in list(self._optimizer_state_dict_post_hooks.values()):
            result = hook(self, state)
            if result is not None:
                state = result
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`. A state dict that does not fit raises ``ValueError`` and changes nothing.

        The schedule is restored too (as ``Optimizer.load_state_dict`` restores
        the learning rate); the backend, ``ema_dtype`` and ``ema_device`` stay as
        constructed, and shadows are copied into the existing ones. State dicts of
        format 1 (an ``"ema"`` entry at the top) load too.
        """
        self._check_not_swapped("load_state_dict")
        for hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        parsed = checkpoint.parse(self, state_dict)
        resume = self._snapshots.resume_plan(parsed[1].get("snapshots"), parsed[1]["step"], self._step)  # may raise
        checkpoint.load(self, *parsed)
        self._snapshots.resumed(resume)  # recorded on disk with the next snapshot, never before
        for hook in list(self._optimizer_load_state_dict_post_hooks.values()):
            hook(self)

    # ------------------------------------------------------------------ copying and pickling
    def __getstate__(self) -> dict[str, Any]:
        if self._dispatch.swapped:
            raise RuntimeError("cannot copy or pickle the wrapper inside ema_weights(); leave the context first")
        return checkpoint.pickled(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        checkpoint.unpickle(self, state)

    # ------------------------------------------------------------------ display
    def __repr__(self) -> str:
        s = self.schedule
        inner = "\n".join("  " + line for line in repr(self.optimizer).splitlines())
        if isinstance(s, PowerProfile):
            what = f"sigma_rel={tuple(m.sigma_rel for m in self.profiles.members)}"
        else:
            decays = [m.decay for m in self.profiles.members]
            what = f"decay={decays[0] if len(decays) == 1 else tuple(decays)}, warmup={s.warmup!r}, "
            what += f"min_decay={s.min_decay}"
        return (
            f"{type(self).__name__}({what}, "
            f"update_after_step={s.update_after_step}, update_every={s.update_every}, "
            f"ema_dtype={self.ema_dtype}, backend={self.backend!r}, ema_device={self._dispatch.ema_device}, "
            f"skip_nonfinite={self._dispatch.skip_nonfinite}, steps={self._step})(\n{inner}\n)"
        )


def _profiles(
    decay: Any,
    sigma_rel: Any,
    warmup: str | None,
    warmup_gamma: float,
    warmup_power: float,
    min_decay: float,
    update_after_step: int,
    update_every: int,
) -> ProfileSet:
    """The profiles asked for: one or more decays with their warmup, or power-function widths."""

    def as_tuple(value: Any, name: str) -> tuple:
        values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if not values:
            raise ValueError(f"{name} must not be empty")
        if len(values) > MAX_PROFILES:
            raise ValueError(f"at most {MAX_PROFILES} EMA profiles, got {len(values)} {name} values")
        return values

    if sigma_rel is not None:
        # The defaults are plain values (help() shows them): any other decay or warmup came from the caller.
        if decay != 0.9999 or warmup != "power":
            raise ValueError(
                "sigma_rel selects power-function profiles, which have no decay or warmup: pass either "
                "sigma_rel=... or decay=.../warmup=..., not both"
            )
        given = {"min_decay": (min_decay, 0.0), "warmup_gamma": (warmup_gamma, 1.0)}
        given["warmup_power"] = (warmup_power, 2.0 / 3.0)
        extra = [f"{n}={v!r}" for n, (v, default) in given.items() if v != default]
        if extra:
            raise ValueError(
                f"sigma_rel selects power-function profiles, which have no {', '.join(extra)}: their weights "
                "follow from sigma_rel alone; pass either sigma_rel=... or decay=... with those, not both"
            )
        members = tuple(PowerProfile(s, update_after_step, update_every) for s in as_tuple(sigma_rel, "sigma_rel"))
    else:
        decays = as_tuple(decay, "decay")
        members = tuple(
            Schedule(d, warmup, warmup_gamma, warmup_power, min_decay, update_after_step, update_every) for d in decays
        )
    return ProfileSet(members)
