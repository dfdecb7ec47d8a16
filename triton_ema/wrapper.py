"""EMAOptimizerWrapper: when to update the EMA, how to swap it in, how to checkpoint it."""

from __future__ import annotations

import os
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from triton_ema.dispatch import BACKENDS, Dispatcher
from triton_ema.schedules import PowerProfile, ProfileSet, Schedule, profile_from_dict
from triton_ema.tracking import Tracker
from triton_ema.util import as_global, is_dtensor, local_shard

_FORMAT_VERSION = 2
_UNSET: Any = object()


class EMAOptimizerWrapper(Optimizer):
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
        warmup: ``None``, ``"litema"`` or ``"power"``.
        warmup_gamma, warmup_power: the ``"power"`` schedule's constants.
        min_decay: the smallest decay, in ``[0, decay]``.
        update_after_step: steps before this one copy the parameters.
        update_every: update on every ``update_every``-th step only.
        ema_dtype: the shadows' dtype is ``torch.promote_types(param.dtype, ema_dtype)``;
            ``None`` keeps the parameter's dtype.
        backend: ``"auto"`` (Triton for CUDA tensors, torch ops otherwise),
            ``"triton"`` or ``"torch"``.
        buffers: module buffers to track too (e.g. ``model.buffers()`` for
            BatchNorm statistics): floating ones are averaged like parameters,
            the others copied on each update; all are swapped by
            :meth:`ema_weights`. Default: none, the parameters only.
        ema_device: ``"cpu"`` keeps the shadows of CUDA parameters in pinned host
            memory, updated by a worker thread after an asynchronous copy, so the
            training stream never waits for the EMA (not for CUDA graphs).
            Default: the parameter's device.
        skip_nonfinite: leave every shadow of a device bit-exactly alone for an
            update whose parameters hold NaN or inf, and count it in
            :attr:`skipped_updates` (decided on the device). Default: off, a
            non-finite parameter propagates into its shadow, as in other EMA
            libraries.
        sigma_rel: instead of ``decay``/``warmup``: one or more EDM2
            power-function profiles of these relative widths (``0 < sigma_rel <
            12 ** -0.5``), the time being the step count.
        snapshot_every, snapshot_dir, snapshot_dtype: with ``sigma_rel``, every
            ``snapshot_every`` updates write each profile to ``snapshot_dir`` as
            safetensors (asynchronously; :meth:`flush` waits), for
            :func:`triton_ema.posthoc.reconstruct` to build the EMA of any width
            after training. ``snapshot_dtype`` defaults to the shadows' dtype.
        model: names snapshot tensors after ``model.named_parameters()`` and
            ``named_buffers()`` when the inner optimizer was not built from
            ``named_parameters()`` (whose names are used otherwise).

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
        decay: float | Sequence[float] = _UNSET,
        *,
        warmup: str | None = None,
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
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, EMAOptimizerWrapper):
            raise TypeError("optimizer is already an EMAOptimizerWrapper")
        profiles = _profiles(
            decay, sigma_rel, warmup, warmup_gamma, warmup_power, min_decay, update_after_step, update_every
        )
        if snapshot_every is not None or snapshot_dir is not None:
            if snapshot_every is None or snapshot_dir is None:
                raise ValueError("snapshots need both snapshot_every and snapshot_dir")
            if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int) or snapshot_every < 1:
                raise ValueError(f"Invalid snapshot_every value: {snapshot_every!r}. It must be an int >= 1.")
            if not isinstance(profiles.members[0], PowerProfile):
                raise ValueError(
                    "snapshots are for post-hoc reconstruction, which needs power-function profiles: pass sigma_rel=..."
                )
        if snapshot_dtype is not None and (
            not isinstance(snapshot_dtype, torch.dtype) or not snapshot_dtype.is_floating_point
        ):
            raise ValueError(f"snapshot_dtype must be a floating torch.dtype or None, got {snapshot_dtype!r}")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"Unknown backend {backend!r}; expected one of {', '.join(map(repr, BACKENDS))}")
        if ema_dtype is not None and (not isinstance(ema_dtype, torch.dtype) or not ema_dtype.is_floating_point):
            raise ValueError(f"ema_dtype must be a floating torch.dtype or None, got {ema_dtype!r}")
        if not isinstance(skip_nonfinite, bool):
            raise TypeError(f"skip_nonfinite must be a bool, got {type(skip_nonfinite).__name__}")
        buffers = list(buffers) if buffers is not None else []
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
        self._snapshot = _SnapshotConfig(snapshot_every, snapshot_dir, snapshot_dtype, model)
        self._writer = None
        self._dispatch = Dispatcher(backend, ema_device, skip_nonfinite, n_profiles=len(profiles))
        self._tracked = Tracker(self._dispatch, ema_dtype)
        self._tracked.track(self._tracked.all_params(self.param_groups), buffers, self._step)

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
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Callable] = OrderedDict()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer and track its parameters; on any error neither changes."""
        self._check_not_swapped("add_param_group")
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, Tensor) else list(params)
        named = self._tracked.named(group, len(self._tracked.params))
        plan = self._tracked.plan(named, [])
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
        self._check_not_swapped("step")
        if not self.optimizer.state and _lr_is_zero(self.optimizer.param_groups) and _initialising_state():
            # torch.distributed.checkpoint creates optimizer state by stepping with zero
            # gradients and learning rates; that is not a training step.
            return self.optimizer.step() if closure is None else self.optimizer.step(closure)
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
        if self._snapshot.every is not None:
            self._maybe_snapshot()

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

    # ------------------------------------------------------------------ snapshots
    def _maybe_snapshot(self) -> None:
        every = self.profiles.update_every
        if self._step % every or (self._step // every) % self._snapshot.every:
            return
        if (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_rank() != 0
            and not any(is_dtensor(e.owner) for e in self._tracked.entries)
        ):
            return  # replicas (DDP) hold the same EMA: rank 0 writes it once
        writer = self._snapshot_writer()
        names = self._snapshot_names()
        t = self._step - self.profiles.members[0].update_after_step
        for k, profile in enumerate(self.profiles.members):
            holders = self._tracked.holders(k)
            tensors, shards = {}, {}
            for name, (i, owner) in names.items():
                tensors[name] = holders[i]
                shard = _shard_info(owner)
                if shard is not None:
                    shards[name] = shard
            writer.submit(
                self._step,
                t,
                profile.gamma,
                profile.sigma_rel,
                k,
                tensors,
                dtype=self._snapshot.dtype,
                shards=shards or None,
            )

    def _snapshot_writer(self):
        if self._writer is None:
            from triton_ema.snapshot import SnapshotWriter

            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            self._writer = SnapshotWriter(self._snapshot.dir, rank=rank)
        return self._writer

    def _snapshot_names(self) -> dict[str, tuple[int, Tensor]]:
        """Snapshot tensor name -> (entry, tracked tensor): parameter names where known, else positions."""
        by_id: dict[int, str] = {}
        for group in self.param_groups:
            names = group.get("param_names")
            if isinstance(names, (list, tuple)) and len(names) == len(group["params"]):
                by_id.update({id(p): n for p, n in zip(group["params"], names)})
        model = self._snapshot.model
        if model is not None:
            for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
                by_id.setdefault(id(t), n)
        out: dict[str, tuple[int, Tensor]] = {}
        seen: set[int] = set()
        items = [(p, i, f"param.{j}") for j, (p, i) in enumerate(zip(self._tracked.params, self._tracked.param_entry))]
        items += [
            (b, i, f"buffer.{j}") for j, (b, i) in enumerate(zip(self._tracked.buffers, self._tracked.buffer_entry))
        ]
        for t, i, fallback in items:
            if i in seen or self._dispatch.groups[self._tracked.entries[i].key].kind == "copy":
                continue
            seen.add(i)
            out[by_id.get(id(t), fallback)] = (i, t)
        return out

    def flush(self) -> None:
        """Return once every snapshot taken so far is on disk; raises if writing one failed."""
        if self._writer is not None:
            self._writer.flush()

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

    @torch.no_grad()
    def copy_ema_to_params(self, profile: int = 0) -> None:
        """Write a profile's EMA into the parameters (and buffers) for good, e.g. before exporting the model."""
        self._check_profile(profile)
        self._check_not_swapped("copy_ema_to_params")
        self._dispatch.join()
        self._dispatch.refresh()
        for g in self._dispatch.groups.values():
            torch._foreach_copy_(g.params, g.real_shadows_of(g.own_profile(profile)))

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
    def _ema_meta(self) -> dict[str, Any]:
        return {
            "format_version": _FORMAT_VERSION,
            "step": self.num_steps,
            "skipped_updates": self.skipped_updates,
            "schedule": self.schedule.to_dict(),
            "profiles": self.profiles.to_list(),
        }

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict, with the EMA in it.

        Every parameter's entry in ``"state"`` also holds ``"ema_shadow"``, its
        EMA (a DTensor for DTensor parameters), and every entry of
        ``"param_groups"`` holds ``"ema"``: the format version, the step count,
        the skipped-update count and the schedule. So tools that key optimizer
        state by parameter name and reshard it (``torch.distributed.checkpoint``'s
        ``get_optimizer_state_dict``) carry the EMA with them. Buffer EMAs are in
        ``"ema_buffers"``. Shadows are the live tensors (as in
        ``Optimizer.state_dict``), except inside :meth:`ema_weights`, where they
        are copies.
        """
        for hook in list(self._optimizer_state_dict_pre_hooks.values()):
            hook(self)
        self.flush()
        state = self.optimizer.state_dict()
        profiles = []
        for k in range(len(self.profiles)):
            holders = self._tracked.holders(k)
            if self._dispatch.swapped:
                holders = [h.clone() for h in holders]
            profiles.append(holders)
        packed_state = dict(state["state"])
        position = 0
        for group in state["param_groups"]:
            for key in group["params"]:
                p = self._tracked.params[position]
                # A copy of the entry: the inner state dict's values are the optimizer's live dicts.
                entry = dict(packed_state.get(key, {}))
                for k, holders in enumerate(profiles):
                    entry[_shadow_key(k)] = as_global(holders[self._tracked.param_entry[position]], p)
                packed_state[key] = entry
                position += 1
            group["ema"] = self._ema_meta()
        state["state"] = packed_state
        if self._tracked.buffers:
            for k, holders in enumerate(profiles):
                state[_buffers_key(k)] = [
                    as_global(holders[i], b) for i, b in zip(self._tracked.buffer_entry, self._tracked.buffers)
                ]
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
        inner, meta, shadows, buffer_shadows, profiles = self._parse(state_dict)

        self._dispatch.join()
        self.optimizer.load_state_dict(inner)
        with torch.no_grad():
            for k, per_profile in enumerate(shadows):
                for position, source in enumerate(per_profile):
                    entry = self._tracked.entries[self._tracked.param_entry[position]]
                    entry.shadows[min(k, len(entry.shadows) - 1)].copy_(local_shard(source))
            if buffer_shadows is not None:
                for k, per_profile in enumerate(buffer_shadows):
                    for position, source in enumerate(per_profile):
                        entry = self._tracked.entries[self._tracked.buffer_entry[position]]
                        entry.shadows[min(k, len(entry.shadows) - 1)].copy_(local_shard(source))
        self.profiles = profiles
        self._step = meta["step"]
        if self._snapshot.every is not None:
            # A run resumed from here drops what an abandoned run snapshotted after it.
            self._snapshot_writer().discard_after(self._step)
        self._dispatch.set_step(self._step)
        self._dispatch.set_skipped(meta["skipped_updates"])
        for hook in list(self._optimizer_load_state_dict_post_hooks.values()):
            hook(self)

    def _parse(self, state_dict: Any) -> tuple[dict, dict, list[list[Tensor]], list[list[Tensor]] | None, ProfileSet]:
        """Split a state dict into the inner optimizer's part and the EMA, checking everything."""
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"state dict must be a mapping, got {type(state_dict).__name__}")
        state, groups = state_dict.get("state"), state_dict.get("param_groups")
        if not isinstance(state, Mapping):
            raise ValueError("state dict has no 'state' mapping: it is not an optimizer state dict")
        if not isinstance(groups, list):
            raise ValueError("state dict has no 'param_groups' list: it is not an optimizer state dict")
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"state dict has {len(groups)} parameter groups, this optimizer has {len(self.param_groups)}"
            )
        for i, (saved, ours) in enumerate(zip(groups, self.param_groups)):
            if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), (list, tuple)):
                raise ValueError(f"parameter group {i} in the state dict is not a dict with a 'params' list")
            if len(saved["params"]) != len(ours["params"]):
                raise ValueError(
                    f"parameter group {i} has {len(saved['params'])} parameters in the state dict, "
                    f"{len(ours['params'])} here"
                )
        keys = [k for g in groups for k in g["params"]]

        if "ema" in state_dict:  # format 1
            meta = state_dict["ema"]
            if not isinstance(meta, Mapping) or meta.get("format_version") != 1:
                raise ValueError("the state dict's 'ema' entry is not an EMA state of format 1")
            missing = {"step", "schedule", "shadows", "buffer_shadows", "other_buffer_shadows"} - meta.keys()
            if missing:
                raise ValueError(f"EMA state is missing {sorted(missing)}")
            for kind in ("shadows", "buffer_shadows", "other_buffer_shadows"):
                if not isinstance(meta[kind], list):
                    raise ValueError(f"EMA {kind} must be a list, got {type(meta[kind]).__name__}")
            shadows = meta["shadows"]
            floats, others = iter(meta["buffer_shadows"]), iter(meta["other_buffer_shadows"])
            n_float = sum(b.is_floating_point() for b in self._tracked.buffers)
            if (
                len(meta["buffer_shadows"]) != n_float
                or len(meta["other_buffer_shadows"]) != len(self._tracked.buffers) - n_float
            ):
                raise ValueError(
                    f"state dict has {len(meta['buffer_shadows'])} + {len(meta['other_buffer_shadows'])} buffer "
                    f"shadows, this wrapper tracks {len(self._tracked.buffers)} buffers"
                )
            buffer_shadows = [[next(floats) if b.is_floating_point() else next(others) for b in self._tracked.buffers]]
            shadows = [shadows]
            meta = {**meta, "skipped_updates": 0}
            inner = {k: v for k, v in state_dict.items() if k != "ema"}
        else:
            metas = [g.get("ema") for g in groups]
            if not metas or not isinstance(metas[0], Mapping):
                raise ValueError(
                    "state dict has no EMA in it: it was not saved by EMAOptimizerWrapper "
                    "(to load only the wrapped optimizer's state, call wrapper.optimizer.load_state_dict)"
                )
            meta = metas[0]
            if any(m != meta for m in metas[1:]):
                raise ValueError("the parameter groups of the state dict disagree about the EMA's step or schedule")
            if meta.get("format_version") != _FORMAT_VERSION:
                raise ValueError(f"unknown EMA state format {meta.get('format_version')!r}; expected {_FORMAT_VERSION}")
            meta = {"skipped_updates": 0, **meta}
            n_saved = len(meta["profiles"]) if isinstance(meta.get("profiles"), list) else 1
            shadows = [[] for _ in range(n_saved)]
            for position, key in enumerate(keys):
                entry = state.get(key)
                for k in range(n_saved):
                    if not isinstance(entry, Mapping) or _shadow_key(k) not in entry:
                        raise ValueError(
                            f"state dict has no {_shadow_key(k)!r} for {self._tracked.entry_name(position)} "
                            f"(key {key!r})"
                        )
                    shadows[k].append(entry[_shadow_key(k)])
            buffer_shadows = [state_dict.get(_buffers_key(k)) for k in range(n_saved)]
            if any(b is None for b in buffer_shadows):
                buffer_shadows = None
            if buffer_shadows is None and self._tracked.buffers:
                warnings.warn(
                    "the state dict has no buffer EMAs ('ema_buffers'; torch.distributed.checkpoint's helpers "
                    "carry only per-parameter state): the tracked buffers keep their current EMA",
                    stacklevel=3,
                )
            for per_profile in buffer_shadows or []:
                if not isinstance(per_profile, list) or len(per_profile) != len(self._tracked.buffers):
                    n = len(per_profile) if isinstance(per_profile, list) else type(per_profile).__name__
                    raise ValueError(
                        f"state dict has {n} buffer shadows, this wrapper tracks {len(self._tracked.buffers)} buffers"
                    )
            strip = {k: {n: v for n, v in e.items() if not _is_shadow_key(n)} for k, e in state.items()}
            inner = {
                k: v
                for k, v in state_dict.items()
                if k not in ("state", "param_groups") and not (isinstance(k, str) and k.startswith("ema_buffers"))
            }
            inner["state"] = {k: v for k, v in strip.items() if v}
            inner["param_groups"] = [{n: v for n, v in g.items() if n != "ema"} for g in groups]

        step, skipped = meta.get("step"), meta.get("skipped_updates")
        for name, value in (("step", step), ("skipped_updates", skipped)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"EMA {name} must be a non-negative int, got {value!r}")
        saved_profiles = meta.get("profiles")
        if saved_profiles is None:
            if not isinstance(meta.get("schedule"), Mapping):
                raise ValueError("EMA state has no schedule")
            saved_profiles = [{"kind": "decay", **meta["schedule"]}]
        if not isinstance(saved_profiles, list) or not all(isinstance(d, Mapping) for d in saved_profiles):
            raise ValueError("EMA profiles in the state dict must be a list of dicts")
        try:
            profiles = ProfileSet(tuple(profile_from_dict(d) for d in saved_profiles))
            if isinstance(meta.get("schedule"), Mapping) and profile_from_dict(meta["schedule"]) != profiles.members[0]:
                raise ValueError("its 'schedule' and first profile differ")
        except (TypeError, ValueError) as e:
            raise ValueError(f"EMA schedule in the state dict is invalid: {e}") from e
        if len(profiles) != len(self.profiles):
            raise ValueError(f"state dict has {len(profiles)} EMA profiles, this wrapper tracks {len(self.profiles)}")
        for k, per_profile in enumerate(shadows):
            if not isinstance(per_profile, list) or len(per_profile) != len(self._tracked.params):
                n = len(per_profile) if isinstance(per_profile, list) else type(per_profile).__name__
                raise ValueError(f"state dict has {n} shadows, this wrapper tracks {len(self._tracked.params)}")
            for position, (s, p) in enumerate(zip(per_profile, self._tracked.params)):
                where = f"shadows[{position}]" if k == 0 else f"profile {k} shadows[{position}]"
                self._check_shadow(s, p, where, averaged=True)
        for k, per_profile in enumerate(buffer_shadows or []):
            for position, (s, b) in enumerate(zip(per_profile, self._tracked.buffers)):
                where = f"buffer_shadows[{position}]" if k == 0 else f"profile {k} buffer_shadows[{position}]"
                self._check_shadow(s, b, where, averaged=b.is_floating_point() or b.is_complex())
        return inner, meta, shadows, buffer_shadows, profiles

    @staticmethod
    def _check_shadow(s: Any, ours: Tensor, kind: str, averaged: bool) -> None:
        if not isinstance(s, Tensor):
            raise ValueError(f"{kind} in the state dict is a {type(s).__name__}, not a tensor")
        if s.device.type == "meta":
            raise ValueError(f"{kind} in the state dict is on the meta device: it holds no values")
        if s.shape != ours.shape:
            raise ValueError(f"{kind} has shape {tuple(s.shape)} in the state dict, {tuple(ours.shape)} here")
        if local_shard(s).shape != local_shard(ours).shape:
            raise ValueError(
                f"{kind} has local shard shape {tuple(local_shard(s).shape)} in the state dict, "
                f"{tuple(local_shard(ours).shape)} here"
            )
        if averaged:
            if ours.is_complex() and not s.is_complex():
                raise ValueError(
                    f"{kind} has dtype {s.dtype} in the state dict; a complex parameter needs a complex EMA"
                )
            if not ours.is_complex() and not s.is_floating_point():
                raise ValueError(
                    f"{kind} has dtype {s.dtype} in the state dict; an EMA of real values must be floating"
                )
        elif s.dtype != ours.dtype:
            raise ValueError(f"{kind} has dtype {s.dtype} in the state dict, {ours.dtype} here")

    # ------------------------------------------------------------------ copying and pickling
    def __getstate__(self) -> dict[str, Any]:
        if self._dispatch.swapped:
            raise RuntimeError("cannot copy or pickle the wrapper inside ema_weights(); leave the context first")
        self._dispatch.join()
        return {
            "optimizer": self.optimizer,
            "profiles": self.profiles.members,
            "snapshot": self._snapshot,
            "ema_dtype": self.ema_dtype,
            "backend": self.backend,
            "ema_device": self._dispatch.ema_device,
            "skip_nonfinite": self._dispatch.skip_nonfinite,
            **self._tracked.pickled(),
            "step": self.num_steps,
            "skipped_updates": self.skipped_updates,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.optimizer = state["optimizer"]
        self.profiles = ProfileSet(tuple(state["profiles"]))
        self._snapshot = state["snapshot"]
        self._writer = None
        self.ema_dtype = state["ema_dtype"]
        self.backend = state["backend"]
        self._init_hooks()
        self._step = state["step"]
        self._dispatch = Dispatcher(
            self.backend, state["ema_device"], state["skip_nonfinite"], n_profiles=len(self.profiles)
        )
        self._tracked = Tracker(self._dispatch, self.ema_dtype)
        self._tracked.unpickle(state, self._step)
        self._dispatch.set_skipped(state["skipped_updates"])

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


@dataclass
class _SnapshotConfig:
    every: int | None
    dir: str | os.PathLike | None
    dtype: torch.dtype | None
    model: torch.nn.Module | None


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
    from triton_ema.kernels import MAX_PROFILES

    def as_tuple(value: Any, name: str) -> tuple:
        values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if not values:
            raise ValueError(f"{name} must not be empty")
        if len(values) > MAX_PROFILES:
            raise ValueError(f"at most {MAX_PROFILES} EMA profiles, got {len(values)} {name} values")
        return values

    if sigma_rel is not None:
        if decay is not _UNSET or warmup is not None:
            raise ValueError(
                "sigma_rel selects power-function profiles, which have no decay or warmup: pass either "
                "sigma_rel=... or decay=.../warmup=..., not both"
            )
        members = tuple(PowerProfile(s, update_after_step, update_every) for s in as_tuple(sigma_rel, "sigma_rel"))
    else:
        decays = as_tuple(0.9999 if decay is _UNSET else decay, "decay")
        members = tuple(
            Schedule(d, warmup, warmup_gamma, warmup_power, min_decay, update_after_step, update_every) for d in decays
        )
    return ProfileSet(members)


def _shadow_key(k: int) -> str:
    return "ema_shadow" if k == 0 else f"ema_shadow_{k}"


def _buffers_key(k: int) -> str:
    return "ema_buffers" if k == 0 else f"ema_buffers_{k}"


def _is_shadow_key(name: Any) -> bool:
    return isinstance(name, str) and (name == "ema_shadow" or name.startswith("ema_shadow_"))


def _shard_info(t: Tensor) -> dict[str, Any] | None:
    """Where a DTensor's local shard sits in the full tensor (one sharded dimension), for snapshots."""
    if not is_dtensor(t):
        return None
    try:
        from torch.distributed.tensor import Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        dims = [p.dim for p in t.placements if isinstance(p, Shard)]
        if len(set(dims)) != 1:
            return None
        _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return {"dim": dims[0], "offset": int(offset[dims[0]]), "global_shape": list(t.shape)}
    except Exception:  # noqa: BLE001 - placement details vary across torch versions; snapshots work without
        return None


def _lr_is_zero(groups: list[dict[str, Any]]) -> bool:
    """What the state initialisation below sets first: a cheap test before looking at frames."""
    lr = groups[0].get("lr") if groups else None
    if isinstance(lr, Tensor):
        # Reading a CUDA lr would wait for the device; the helper sets a CPU tensor anyway.
        return lr.device.type == "cpu" and not bool(lr != 0)
    return lr is not None and lr == 0


def _initialising_state() -> bool:
    """True when the caller is torch.distributed.checkpoint's optimizer-state initialisation.

    ``_init_optim_state`` steps a fresh optimizer once with zero gradients and
    learning rates so that its state exists before loading; counting that as an
    EMA step would move the average and the step count. It is recognised by its
    frame (a few levels up, past wrappers such as an LR scheduler's step counter).
    """
    frame = sys._getframe(2)
    for _ in range(6):
        if frame is None:
            return False
        if frame.f_code.co_name == "_init_optim_state" and frame.f_globals.get("__name__", "").startswith(
            "torch.distributed.checkpoint"
        ):
            return True
        frame = frame.f_back
    return False
