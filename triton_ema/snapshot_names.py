"""What each snapshot tensor is called: the plain model's ``state_dict()`` keys, unique, stable for a run.

The inner optimizer's ``param_names`` win where they are unique; a name several tensors share is replaced by
the tensor's name in ``model=``; torch.compile's ``_orig_mod.`` and DDP's leading ``module.`` are taken out;
tensors that nothing names get their position. See :meth:`SnapshotSchedule.names
<triton_ema.snapshot_schedule.SnapshotSchedule.names>`.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # annotations only
    from triton_ema.tracking import Tracker


def plain_name(name: str, ddp: bool) -> str:
    """``name`` as the unwrapped model calls it: without torch.compile's ``_orig_mod.`` parts, and without the
    leading ``module.`` when ``ddp`` (every name of a DDP-wrapped model has one)."""
    parts = [p for p in name.split(".") if p != "_orig_mod"]
    if ddp and parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP/FSDP1-style (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module) and type(model).__name__ in (
            "DistributedDataParallel",
            "DataParallel",
        ):
            inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def snapshot_names(
    tracked: Any, param_groups: list[dict[str, Any]], model: torch.nn.Module | None, kept: dict[int, str]
) -> dict[str, tuple[int, Tensor]]:
    """The snapshot names (see :meth:`SnapshotSchedule.names`); entries in ``kept`` keep the name they had."""
    given: dict[int, str] = {}
    for group in param_groups:
        names = group.get("param_names")
        if isinstance(names, (list, tuple)) and len(names) == len(group["params"]):
            given.update({id(p): str(n) for p, n in zip(group["params"], names)})
    ddp = bool(given) and all(plain_name(n, False).startswith("module.") for n in given.values())
    given = {i: plain_name(n, ddp) for i, n in given.items()}
    from_model: dict[int, str] = {}
    if model is not None:
        plain = unwrapped(model)
        for n, t in [*plain.named_parameters(remove_duplicate=False), *plain.named_buffers(remove_duplicate=False)]:
            from_model.setdefault(id(t), n)
    items = [(p, i, f"param.{j}") for j, (p, i) in enumerate(zip(tracked.params, tracked.param_entry))]
    items += [(b, i, f"buffer.{j}") for j, (b, i) in enumerate(zip(tracked.buffers, tracked.buffer_entry))]
    out = {n: (i, t) for t, i, _ in items for n in [kept.get(i)] if n is not None}
    chosen: list[tuple[Tensor, int, str]] = []
    seen: set[int] = set(kept)
    for t, i, fallback in items:
        group = tracked.dispatch.groups.get(tracked.entries[i].key)
        if i in seen or (group is not None and group.kind == "copy"):
            continue
        seen.add(i)
        chosen.append((t, i, given.get(id(t)) or from_model.get(id(t)) or fallback))
    counts = Counter(n for _, _, n in chosen)
    shared: dict[str, list[str]] = {}
    taken = set(out)
    for t, i, n in chosen:
        if counts[n] > 1 and n not in taken:
            # A name several new tensors share: the model's name tells them apart. (One that earlier snapshots
            # already use is refused instead: renaming that tensor mid-run would split its history.)
            n = from_model.get(id(t), n)
        if n in out or counts[n] > 1:
            shared.setdefault(n, []).append(tracked.entries[i].name)
            continue
        out[n] = (i, t)
    if shared:
        listed = "; ".join(f"{n!r} for {', '.join(w)}" for n, w in shared.items())
        hint = "" if model is not None else "; pass model= to name them after the model"
        raise ValueError(
            f"snapshot tensor names must be unique, and several tracked tensors are called the same: {listed}{hint}, "
            "or give the optimizer model.named_parameters()"
        )
    return out


def pending_tracker(tracked: Tracker, plan: tuple, params: list[Tensor]) -> Any:
    """A view of ``tracked`` with an ``add_param_group`` plan's parameters added, for naming them beforehand."""
    new_entries, param_entry, _, _ = plan
    return SimpleNamespace(
        params=[*tracked.params, *params],
        param_entry=[*tracked.param_entry, *param_entry],
        buffers=tracked.buffers,
        buffer_entry=tracked.buffer_entry,
        entries=[*tracked.entries, *new_entries],
        dispatch=tracked.dispatch,
    )
