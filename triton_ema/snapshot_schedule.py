"""When the wrapper takes a snapshot and what its tensors are called; :mod:`triton_ema.snapshot` writes it.

Every ``snapshot_every`` updates, each profile's EMA is handed to the
:class:`~triton_ema.snapshot.SnapshotWriter`, keyed by the plain model's
``state_dict()`` key (the inner optimizer's unique ``param_names``, else the
``model=`` given to the wrapper, else the position; see
:meth:`SnapshotSchedule.names`). Under torch.distributed with replicated parameters (DDP)
only rank 0 writes; with DTensor parameters (FSDP2) every rank writes its shard.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import InitVar, dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from triton_ema.schedules import ProfileSet
from triton_ema.snapshot import SnapshotWriter
from triton_ema.tracking import Tracker
from triton_ema.util import is_dtensor


@dataclass
class SnapshotConfig:
    """What the wrapper was asked for: a snapshot every ``every`` updates into ``dir``, stored as ``dtype``."""

    every: int | None
    dir: str | os.PathLike | None
    dtype: torch.dtype | None
    model: torch.nn.Module | None
    power_profiles: InitVar[bool] = True  # what the wrapper averages: snapshots need power-function profiles
    sigma_rels: InitVar[tuple] = ()  # their widths: a reconstruction needs two distinct ones

    def __post_init__(self, power_profiles: bool, sigma_rels: tuple = ()) -> None:
        if self.every is not None or self.dir is not None:
            if self.every is None or self.dir is None:
                raise ValueError("snapshots need both snapshot_every and snapshot_dir")
            if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
                raise ValueError(f"Invalid snapshot_every value: {self.every!r}. It must be an int >= 1.")
            if not power_profiles:
                raise ValueError(
                    "snapshots are for post-hoc reconstruction, which needs power-function profiles: pass sigma_rel=..."
                )
            if sigma_rels and (len(sigma_rels) < 2 or len(set(sigma_rels)) != len(sigma_rels)):
                given = sigma_rels if len(sigma_rels) > 1 else sigma_rels[0]
                raise ValueError(
                    "snapshots are for post-hoc reconstruction, which needs at least two distinct sigma_rel values "
                    f"(two profiles of different widths); got sigma_rel={given}"
                )
        if self.dtype is not None and (not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point):
            raise ValueError(f"snapshot_dtype must be a floating torch.dtype or None, got {self.dtype!r}")
        if self.model is not None and not isinstance(self.model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")


class SnapshotSchedule:
    """When the wrapper's snapshots are taken and what their tensors are called; owns the writer."""

    def __init__(self, config: SnapshotConfig) -> None:
        self.config = config
        self.writer: SnapshotWriter | None = None
        self._names: tuple | None = None

    def after_update(
        self, step: int, profiles: ProfileSet, tracked: Tracker, param_groups: list[dict[str, Any]]
    ) -> None:
        """Take a snapshot of every profile if update ``step`` is one that has one."""
        if self.config.every is None:
            return
        every = profiles.update_every
        if step % every or (step // every) % self.config.every:
            return
        if (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_rank() != 0
            and not any(is_dtensor(e.owner) for e in tracked.entries)
        ):
            return  # replicas (DDP) hold the same EMA: rank 0 writes it once
        writer = self._writer()
        names = self.names(tracked, param_groups)
        t = step - profiles.members[0].update_after_step
        for k, profile in enumerate(profiles.members):
            holders = tracked.holders(k)
            tensors, shards = {}, {}
            for name, (i, owner) in names.items():
                tensors[name] = holders[i]
                shard = shard_info(owner)
                if shard is not None:
                    shards[name] = shard
            writer.submit(
                step,
                t,
                profile.gamma,
                profile.sigma_rel,
                k,
                tensors,
                dtype=self.config.dtype,
                shards=shards or None,
            )

    def _writer(self) -> SnapshotWriter:
        if self.writer is None:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            self.writer = SnapshotWriter(self.config.dir, rank=rank)
        return self.writer

    def names(self, tracked: Tracker, param_groups: list[dict[str, Any]]) -> dict[str, tuple[int, Tensor]]:
        """Snapshot tensor name -> (entry, tracked tensor), worked out once per set of tracked tensors.

        The names are the plain model's ``state_dict()`` keys: the inner optimizer's ``param_names`` where they
        are unique (they win over ``model=``), with torch.compile's ``_orig_mod.`` and DDP's leading ``module.``
        taken out; a name that several tensors share (one named group per submodule gives ``weight`` twice) is
        replaced by the tensor's name in ``model=`` (unwrapped the same way); tensors that neither names get
        their position (``param.{j}``, ``buffer.{j}``). Names still shared are refused (``ValueError``, naming
        them), at construction and by ``add_param_group``, which also refuses a name earlier snapshots use: a
        tensor keeps its name for the whole run.
        """
        key = (len(tracked.params), len(tracked.buffers), len(tracked.entries), tuple(map(id, param_groups)))
        if self._names is None or self._names[0] != key:
            kept = {} if self._names is None else {i: n for n, (i, _) in self._names[1].items()}
            self._names = (key, _names(tracked, param_groups, self.config.model, kept))
        return self._names[1]

    def check_names(self, tracked: Tracker, param_groups: list[dict[str, Any]], plan: tuple | None = None) -> None:
        """Refuse names that are not unique now (at construction), or once ``add_param_group``'s ``plan`` for
        ``param_groups[-1]`` is committed (before anything changes); names given before stay as they were."""
        if self.config.every is None:
            return
        if plan is None:
            named = self.names(tracked, param_groups)
        else:
            kept = {i: n for n, (i, _) in self.names(tracked, param_groups[:-1]).items()}
            pending = _pending(tracked, plan, list(param_groups[-1]["params"]))
            named = _names(pending, param_groups, self.config.model, kept)
        complex_names = [n for n, (_, t) in named.items() if t.is_complex()]
        if complex_names and self.config.dtype is not None:
            raise ValueError(
                f"snapshot_dtype={self.config.dtype} would store only the real part of the complex tensors "
                f"{complex_names[:5]}: leave snapshot_dtype unset to keep each tensor's own dtype"
            )

    def flush(self) -> None:
        """Return once every snapshot taken so far is on disk; raises if writing one failed."""
        if self.writer is not None:
            self.writer.flush()

    def resumed_at(self, step: int) -> None:
        """A state dict of ``step`` was loaded."""
        if self.config.every is not None:
            # A run resumed from here drops what an abandoned run snapshotted after it.
            self._writer().discard_after(step)


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


def _names(
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


def _pending(tracked: Tracker, plan: tuple, params: list[Tensor]) -> Any:
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


def shard_info(t: Tensor) -> dict[str, Any] | None:
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
