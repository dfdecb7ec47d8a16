"""The EMA's checkpoint format: building the state dict, parsing and validating it, pickling.

**State dict** (format 2). The wrapped optimizer's own state dict, with the EMA
added where the tools that reshard optimizer state carry it:

* ``state[key]["ema_shadow"]``: the EMA of the parameter with that key (a DTensor
  for a DTensor parameter), and ``"ema_shadow_{k}"`` for profile ``k > 0``.
  Tools that key optimizer state by parameter name (``torch.distributed.checkpoint``'s
  ``get_optimizer_state_dict``) therefore move it with the parameter.
* ``param_groups[i]["ema"]``, the same in every group: ``format_version`` (2),
  ``step``, ``skipped_updates``, ``schedule`` (the first profile) and ``profiles``
  (one dict per profile, see :func:`triton_ema.schedules.profile_from_dict`);
  ``inner_step``: the wrapped optimizer's own step count when saved (Adam's ``"step"``,
  ``None`` for a stateless one), by which loading tells an EMA older than the state beside it;
  and ``snapshots``: ``{"run", "lineage", "at"}``, the post-hoc snapshot run this
  state belongs to (:meth:`~triton_ema.snapshot_schedule.SnapshotSchedule.identity`;
  absent from older state dicts, which still load).
* ``"ema_buffers"`` (and ``"ema_buffers_{k}"``): the buffer EMAs (copies for
  integer buffers), in the order the buffers were given; absent without buffers.

Format 1 (an ``"ema"`` entry at the top level holding the step, the schedule and
lists of shadows) still loads. A state dict is checked entirely before anything
changes: a mismatch raises ``ValueError`` and leaves the wrapper as it was.

**Pickling** (``copy.deepcopy``, ``pickle``, ``torch.save`` of the wrapper)
stores the inner optimizer, the configuration, the tracked tensors with their
shadows, the step count and the skipped-update count.

Also here: the recognition of ``torch.distributed.checkpoint``'s state-initialising
step, which must not count as a training step.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from triton_ema.dispatch import Dispatcher
from triton_ema.schedules import ProfileSet, profile_from_dict
from triton_ema.snapshot_schedule import SnapshotSchedule
from triton_ema.tracking import Tracker
from triton_ema.traps import Traps, inner_step
from triton_ema.util import as_global, local_shard, lr_is_zero

FORMAT_VERSION = 2


def shadow_key(k: int) -> str:
    return "ema_shadow" if k == 0 else f"ema_shadow_{k}"


def buffers_key(k: int) -> str:
    return "ema_buffers" if k == 0 else f"ema_buffers_{k}"


def is_shadow_key(name: Any) -> bool:
    return isinstance(name, str) and (name == "ema_shadow" or name.startswith("ema_shadow_"))


def ema_meta(opt: Any, optimizer_step: float | None = None) -> dict[str, Any]:
    """The ``"ema"`` entry of every parameter group."""
    # The wrapped optimizer's own step count when saved: on loading, a larger one means a stale EMA (traps.py).
    return {
        "inner_step": optimizer_step,
        "format_version": FORMAT_VERSION,
        "step": opt.num_steps,
        "skipped_updates": opt.skipped_updates,
        "schedule": opt.schedule.to_dict(),
        "profiles": opt.profiles.to_list(),
        "snapshots": opt._snapshots.identity(),
    }


def pack(opt: Any, state: dict[str, Any]) -> dict[str, Any]:
    """The inner optimizer's ``state`` with the wrapper's EMA added (see the module's docstring)."""
    opt._tracked.check_groups(opt.param_groups)
    refuse_flattened_dcp()
    profiles = []
    for k in range(len(opt.profiles)):
        # Detached: inside ema_weights() the holders are the parameters themselves (copied, not kept).
        holders = [h.detach() for h in opt._tracked.holders(k)]
        if opt._dispatch.swapped:
            holders = [h.clone() for h in holders]
        profiles.append(holders)
    packed_state = dict(state["state"])
    meta = ema_meta(opt, inner_step(packed_state))
    position = 0
    for group in state["param_groups"]:
        for key in group["params"]:
            p = opt._tracked.params[position]
            # A copy of the entry: the inner state dict's values are the optimizer's live dicts.
            entry = dict(packed_state.get(key, {}))
            for k, holders in enumerate(profiles):
                entry[shadow_key(k)] = as_global(holders[opt._tracked.param_entry[position]], p)
            packed_state[key] = entry
            position += 1
        group["ema"] = dict(meta)
    state["state"] = packed_state
    if opt._tracked.buffers:
        for k, holders in enumerate(profiles):
            state[buffers_key(k)] = [
                as_global(holders[i], b) for i, b in zip(opt._tracked.buffer_entry, opt._tracked.buffers)
            ]
    return state


def parse(opt: Any, state_dict: Any) -> tuple[dict, dict, list[list[Tensor]], list[list[Tensor]] | None, ProfileSet]:
    """Split a state dict into the inner optimizer's part and the EMA, checking everything."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"state dict must be a mapping, got {type(state_dict).__name__}")
    refuse_flattened_dcp()
    state, groups = state_dict.get("state"), state_dict.get("param_groups")
    if not isinstance(state, Mapping):
        raise ValueError("state dict has no 'state' mapping: it is not an optimizer state dict")
    if not isinstance(groups, list):
        raise ValueError("state dict has no 'param_groups' list: it is not an optimizer state dict")
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"state dict has {len(groups)} parameter groups, this optimizer has {len(opt.param_groups)}")
    for i, (saved, ours) in enumerate(zip(groups, opt.param_groups)):
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
        n_float = sum(b.is_floating_point() for b in opt._tracked.buffers)
        if (
            len(meta["buffer_shadows"]) != n_float
            or len(meta["other_buffer_shadows"]) != len(opt._tracked.buffers) - n_float
        ):
            raise ValueError(
                f"state dict has {len(meta['buffer_shadows'])} + {len(meta['other_buffer_shadows'])} buffer "
                f"shadows, this wrapper tracks {len(opt._tracked.buffers)} buffers"
            )
        buffer_shadows = [[next(floats) if b.is_floating_point() else next(others) for b in opt._tracked.buffers]]
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
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unknown EMA state format {meta.get('format_version')!r}; expected {FORMAT_VERSION}")
        meta = {"skipped_updates": 0, **meta}
        n_saved = len(meta["profiles"]) if isinstance(meta.get("profiles"), list) else 1
        shadows = [[] for _ in range(n_saved)]
        for position, key in enumerate(keys):
            entry = state.get(key)
            for k in range(n_saved):
                if not isinstance(entry, Mapping) or shadow_key(k) not in entry:
                    raise ValueError(
                        f"state dict has no {shadow_key(k)!r} for {opt._tracked.entry_name(position)} (key {key!r})"
                    )
                shadows[k].append(entry[shadow_key(k)])
        buffer_shadows = [state_dict.get(buffers_key(k)) for k in range(n_saved)]
        if any(b is None for b in buffer_shadows):
            buffer_shadows = None
        if buffer_shadows is None and opt._tracked.buffers:
            warnings.warn(
                "the state dict has no buffer EMAs ('ema_buffers'; torch.distributed.checkpoint's helpers "
                "carry only per-parameter state): the tracked buffers keep their current EMA",
                stacklevel=3,
            )
        for per_profile in buffer_shadows or []:
            if not isinstance(per_profile, list) or len(per_profile) != len(opt._tracked.buffers):
                n = len(per_profile) if isinstance(per_profile, list) else type(per_profile).__name__
                raise ValueError(
                    f"state dict has {n} buffer shadows, this wrapper tracks {len(opt._tracked.buffers)} buffers"
                )
        strip = {k: {n: v for n, v in e.items() if not is_shadow_key(n)} for k, e in state.items()}
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
    kinds = [type(ps.members[0]).__name__ for ps in (profiles, opt.profiles)]
    if kinds[0] != kinds[1]:
        what = {"Schedule": "decay=", "PowerProfile": "sigma_rel="}
        raise ValueError(
            f"the state dict's EMA profiles are {what[kinds[0]]} profiles, this wrapper tracks {what[kinds[1]]} "
            "profiles: a checkpoint loads only into a wrapper of the same kind"
        )
    if len(profiles) != len(opt.profiles):
        raise ValueError(f"state dict has {len(profiles)} EMA profiles, this wrapper tracks {len(opt.profiles)}")
    for k, per_profile in enumerate(shadows):
        if not isinstance(per_profile, list) or len(per_profile) != len(opt._tracked.params):
            n = len(per_profile) if isinstance(per_profile, list) else type(per_profile).__name__
            raise ValueError(f"state dict has {n} shadows, this wrapper tracks {len(opt._tracked.params)}")
        for position, (s, p) in enumerate(zip(per_profile, opt._tracked.params)):
            where = f"shadows[{position}]" if k == 0 else f"profile {k} shadows[{position}]"
            check_shadow(s, p, where, averaged=True)
    for k, per_profile in enumerate(buffer_shadows or []):
        for position, (s, b) in enumerate(zip(per_profile, opt._tracked.buffers)):
            where = f"buffer_shadows[{position}]" if k == 0 else f"profile {k} buffer_shadows[{position}]"
            check_shadow(s, b, where, averaged=b.is_floating_point() or b.is_complex())
    return inner, meta, shadows, buffer_shadows, profiles


def strip_ema(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a wrapper's state dict without the EMA: what the wrapped optimizer alone saves.

    A plain optimizer that loads the wrapper's state dict keeps every ``"ema_shadow"``
    in its state (a second copy of the model that it then saves again); load
    ``strip_ema(state_dict)`` instead. Format 1 state dicts are stripped too.
    """
    if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get("state"), Mapping):
        raise ValueError(f"expected an optimizer state dict, got {type(state_dict).__name__}")
    out = {
        k: v for k, v in state_dict.items() if not (isinstance(k, str) and (k == "ema" or k.startswith("ema_buffers")))
    }
    out["state"] = {k: {n: v for n, v in e.items() if not is_shadow_key(n)} for k, e in state_dict["state"].items()}
    out["state"] = {k: e for k, e in out["state"].items() if e}
    out["param_groups"] = [{n: v for n, v in g.items() if n != "ema"} for g in state_dict.get("param_groups", [])]
    return out


def check_shadow(s: Any, ours: Tensor, kind: str, averaged: bool) -> None:
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
            raise ValueError(f"{kind} has dtype {s.dtype} in the state dict; a complex parameter needs a complex EMA")
        if not ours.is_complex() and not s.is_floating_point():
            raise ValueError(f"{kind} has dtype {s.dtype} in the state dict; an EMA of real values must be floating")
    elif s.dtype != ours.dtype:
        raise ValueError(f"{kind} has dtype {s.dtype} in the state dict, {ours.dtype} here")


def load(
    opt: Any,
    inner: dict,
    meta: dict,
    shadows: list[list[Tensor]],
    buffer_shadows: list[list[Tensor]] | None,
    profiles: ProfileSet,
) -> None:
    """Load what :func:`parse` accepted into the inner optimizer, the shadows and the step count."""
    opt._traps.loading(opt, (inner, meta, shadows, buffer_shadows, profiles))
    opt._dispatch.join()
    opt.optimizer.load_state_dict(inner)
    with torch.no_grad():
        for k, per_profile in enumerate(shadows):
            for position, source in enumerate(per_profile):
                entry = opt._tracked.entries[opt._tracked.param_entry[position]]
                entry.shadows[min(k, len(entry.shadows) - 1)].copy_(local_shard(source))
        if buffer_shadows is not None:
            for k, per_profile in enumerate(buffer_shadows):
                for position, source in enumerate(per_profile):
                    entry = opt._tracked.entries[opt._tracked.buffer_entry[position]]
                    entry.shadows[min(k, len(entry.shadows) - 1)].copy_(local_shard(source))
    opt.profiles = profiles
    opt._step = meta["step"]
    opt._dispatch.set_step(opt._step)
    opt._dispatch.set_skipped(meta["skipped_updates"])


def pickled(opt: Any) -> dict[str, Any]:
    """The wrapper's pickling state: the inner optimizer, the configuration, the tracked tensors and shadows."""
    opt._dispatch.join()
    return {
        "optimizer": opt.optimizer,
        "profiles": opt.profiles.members,
        "snapshot": opt._snapshots.config,
        "ema_dtype": opt.ema_dtype,
        "backend": opt.backend,
        "ema_device": opt._dispatch.ema_device,
        "skip_nonfinite": opt._dispatch.skip_nonfinite,
        **opt._tracked.pickled(),
        "step": opt.num_steps,
        "skipped_updates": opt.skipped_updates,
        "snapshot_identity": opt._snapshots.identity(),
    }


def unpickle(opt: Any, state: dict[str, Any]) -> None:
    """Rebuild a wrapper (``opt``, made without ``__init__``) from :func:`pickled`'s state."""
    opt.optimizer = state["optimizer"]
    opt.profiles = ProfileSet(tuple(state["profiles"]))
    opt._snapshots = SnapshotSchedule(state["snapshot"])
    if "snapshot_identity" in state:  # a copy is a branch of the run: its own lineage from its step on
        saved = state["snapshot_identity"]
        at = state["step"] if saved["at"] is None else saved["at"]
        opt._snapshots.resumed((saved["run"], saved["lineage"], at))
    opt.ema_dtype = state["ema_dtype"]
    opt.backend = state["backend"]
    opt._init_hooks()
    opt._step = state["step"]
    opt._dispatch = Dispatcher(opt.backend, state["ema_device"], state["skip_nonfinite"], n_profiles=len(opt.profiles))
    opt._tracked = Tracker(opt._dispatch, opt.ema_dtype)
    opt._tracked.unpickle(state, opt._step)
    opt._traps = Traps(opt)
    opt._dispatch.set_skipped(state["skipped_updates"])


FLATTENED_DCP = (
    "torch.distributed.checkpoint's StateDictOptions(flatten_optimizer_state_dict=True) is not supported: "
    "set_optimizer_state_dict rebuilds the flattened state from the optimizer's own state and group keys, "
    "so the EMA (each parameter's 'ema_shadow' and the groups' 'ema') would be dropped on loading. Save the "
    "optimizer with flatten_optimizer_state_dict=False (the default), or save opt.ema_state_dict() beside it"
)


def refuse_flattened_dcp() -> None:
    """Raise when torch.distributed.checkpoint's helpers run with ``flatten_optimizer_state_dict=True``.

    Recognised by the helper's frame a few levels up and its ``info`` (looked at only when saving and
    loading state dicts, never per step).
    """
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return
        info = (
            frame.f_locals.get("info")
            if frame.f_code.co_name in ("_get_optim_state_dict", "_load_optim_state_dict")
            else None
        )
        if getattr(info, "flatten_optimizer_state_dict", False) and frame.f_globals.get("__name__", "").startswith(
            "torch.distributed.checkpoint"
        ):
            raise ValueError(FLATTENED_DCP)
        frame = frame.f_back


def initialising_state(optimizer: torch.optim.Optimizer) -> bool:
    """True when the caller steps ``optimizer`` for torch.distributed.checkpoint's state initialisation.

    ``_init_optim_state`` steps a fresh optimizer once with zero gradients and
    learning rates so that its state exists before loading; counting that as an
    EMA step would move the average and the step count. It is recognised by its
    frame (a few levels up, past wrappers such as an LR scheduler's step counter),
    looked at only when the optimizer has no state and a zero learning rate.
    """
    if optimizer.state or not lr_is_zero(optimizer.param_groups):
        return False
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
