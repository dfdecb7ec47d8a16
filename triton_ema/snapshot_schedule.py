"""When the wrapper takes a snapshot and what its tensors are called; :mod:`triton_ema.snapshot` writes it.

Every ``snapshot_every`` updates, each profile's EMA is handed to the
:class:`~triton_ema.snapshot.SnapshotWriter`, keyed by the plain model's
``state_dict()`` key (the inner optimizer's unique ``param_names``, else the
``model=`` given to the wrapper, else the position; see
:meth:`SnapshotSchedule.names`). Under torch.distributed with replicated parameters (DDP)
only rank 0 writes; with DTensor parameters (FSDP2) every rank writes its shard.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import threading
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import InitVar, dataclass
from typing import Any

import torch
from torch import Tensor

from triton_ema.schedules import ProfileSet
from triton_ema.snapshot import SnapshotWriter, new_run_id
from triton_ema.snapshot_index import index_files, index_name, lock_name, read_rank
from triton_ema.snapshot_names import pending_tracker, snapshot_names
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


_EVALUATION_ONLY = threading.local()


@contextmanager
def evaluation_only() -> Iterator[None]:
    """Wrappers built inside take no snapshots and touch no directory: they only evaluate a checkpoint's EMA
    (Lightning's ``test(ckpt_path=...)`` rebuilds one beside the live wrapper that writes the directory)."""
    before = getattr(_EVALUATION_ONLY, "on", False)
    _EVALUATION_ONLY.on = True
    try:
        yield
    finally:
        _EVALUATION_ONLY.on = before


class SnapshotControls:
    """The wrapper's snapshot methods (a mixin of :class:`~triton_ema.wrapper.EMAOptimizerWrapper`)."""

    _snapshots: SnapshotSchedule

    def flush(self) -> None:
        """Return once every snapshot taken so far is on disk or has failed (see :attr:`snapshot_failures`)."""
        self._snapshots.flush()

    @property
    def snapshot_failures(self) -> int:
        """Snapshots that could not be taken or written (each reported once by a ``RuntimeWarning``)."""
        return self._snapshots.failures

    def close(self) -> None:
        """Flush the snapshots, stop the writer thread and release ``snapshot_dir``; idempotent.

        Done too when the wrapper is garbage-collected, and at interpreter exit (pending writes flushed first).
        Training may go on after it: the next snapshot starts a writer again.
        """
        self._snapshots.close()


class SnapshotSchedule:
    """When the wrapper's snapshots are taken and what their tensors are called; owns the writer."""

    def __init__(self, config: SnapshotConfig) -> None:
        if getattr(_EVALUATION_ONLY, "on", False) and config.every is not None:
            config = SnapshotConfig(None, None, config.dtype, config.model)
        self.config = config
        self._names: tuple | None = None
        self.run = new_run_id()
        self.lineage: str | None = None  # the lineage written to, once recorded on disk
        self.pending: tuple[str | None, int] | None = (None, 0)  # (parent, step) of a lineage not recorded yet
        self.resources = _Resources()
        # Stops the writer thread and releases the lock when the wrapper goes; at exit too (flushing first).
        self._finalizer = weakref.finalize(self, self.resources.close)

    @property
    def writer(self) -> SnapshotWriter | None:
        return self.resources.writer

    def after_update(
        self, step: int, profiles: ProfileSet, tracked: Tracker, param_groups: list[dict[str, Any]]
    ) -> None:
        """Take a snapshot of every profile if update ``step`` is one that has one; never raises for a snapshot.

        Snapshots are taken every ``every`` *updates* counted from ``update_after_step``: at the steps that update
        (multiples of ``update_every``) whose count of updates after ``update_after_step`` is a multiple of
        ``every``. A failure (the directory, the lock, the copy) is warned about and counted in :attr:`failures`.
        """
        if self.config.every is None:
            return
        every, after = profiles.update_every, profiles.members[0].update_after_step
        updates = step // every - after // every  # updates in (update_after_step, step]
        if step % every or updates <= 0 or updates % self.config.every or step - after <= 0:
            return
        if not _writes(tracked):
            return  # replicas (DDP) hold the same EMA: rank 0 writes it once
        try:
            writer = self._writer()
            names = self.names(tracked, param_groups)
            restart = self.pending is not None and self.pending[0] is None and writer.lineage is not None
            if self.pending is not None:
                self.lineage = writer.begin_lineage(*self.pending)
                self.pending = None
            writer.lineage = self.lineage
            items, shards = [], {}
            for k, profile in enumerate(profiles.members):
                holders = tracked.holders(k)
                tensors = {}
                for name, (i, owner) in names.items():
                    tensors[name] = holders[i]
                    shard = shard_info(owner)
                    if shard is not None:
                        shards[name] = shard
                item = {"step": step, "t": step - after, "gamma": profile.gamma, "sigma_rel": profile.sigma_rel}
                items.append({**item, "profile": k, "tensors": tensors})
            # The CPU copies run on the writer's copy thread, overlapping the next step: the dispatcher's
            # fence (before the next update, swap, export or checkpoint) waits for them.
            copied = writer.submit_many(items, dtype=self.config.dtype, shards=shards or None, defer=True)
            tracked.dispatch.defer_read(copied)
            if restart:
                warnings.warn(
                    f"triton-ema: the run starts over in {os.fspath(self.config.dir)!r}: no checkpoint of it was "
                    "loaded (or one saved before its first snapshot), so its earlier snapshots there stay on disk, "
                    "superseded (posthoc.prune removes them)",
                    RuntimeWarning,
                    stacklevel=4,
                )
        except Exception as exc:  # noqa: BLE001 - step() never raises because of a snapshot
            self.resources.own_failures += 1
            warnings.warn(f"triton-ema: the snapshot at step {step} was not taken: {exc}", RuntimeWarning, stacklevel=4)

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
            self._names = (key, snapshot_names(tracked, param_groups, self.config.model, kept))
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
            pending = pending_tracker(tracked, plan, list(param_groups[-1]["params"]))
            named = snapshot_names(pending, param_groups, self.config.model, kept)
        complex_names = [n for n, (_, t) in named.items() if t.is_complex()]
        if complex_names and self.config.dtype is not None:
            raise ValueError(
                f"snapshot_dtype={self.config.dtype} would store only the real part of the complex tensors "
                f"{complex_names[:5]}: leave snapshot_dtype unset to keep each tensor's own dtype"
            )

    # ------------------------------------------------------------------ the directory, the run and its lineage
    def open(self, tracked: Tracker, resume: bool) -> None:
        """At construction: create and check the directory, take its lock and settle the run id.

        A directory holding another run's index is refused unless ``resume``; then this wrapper continues that run
        (its checkpoint, loaded next, says from where; without one the run starts over from step 0, the earlier
        snapshots kept on disk, superseded). Ranks that do not write (DDP replicas) touch nothing.
        """
        if not isinstance(resume, bool):
            raise TypeError(f"snapshot_resume must be a bool, got {type(resume).__name__}")
        if self.config.every is None or not _writes(tracked):
            return
        directory = os.fspath(self.config.dir)
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"snapshot_dir {directory!r} cannot be created: {exc}") from None
        runs = {}
        for rank, path in index_files(directory).items():
            if path.endswith(".json"):
                raise ValueError(
                    f"snapshot_dir {directory!r} holds {os.path.basename(path)}, written by an older version of "
                    "triton-ema (index version 1): it stays readable, but new snapshots need another directory"
                )
            runs[rank] = _header_run(path)
        if runs and not resume:
            raise ValueError(
                f"snapshot_dir {directory!r} holds the snapshots of run {sorted(set(runs.values()))[0]} "
                f"({', '.join(map(index_name, sorted(runs)))}). To continue that run, pass snapshot_resume=True and "
                "load its checkpoint with load_state_dict(); to start a new run, choose another directory. Nothing "
                "in it was changed."
            )
        if len(set(runs.values())) > 1:
            raise ValueError(f"snapshot_dir {directory!r} holds the indexes of several runs: {runs}")
        self.run = _agree(next(iter(runs.values())) if runs else self.run, tracked)
        self.resources.lock(directory, _rank())

    def identity(self) -> dict[str, Any]:
        """What the state dict carries: the run, and the lineage the state belongs to (``at``: where it branched
        off that lineage, for a resumed run that has taken no snapshot yet)."""
        if self.pending is None:
            return {"run": self.run, "lineage": self.lineage, "at": None}
        return {"run": self.run, "lineage": self.pending[0], "at": self.pending[1]}

    def resume_plan(self, saved: Any, step: int, current: int) -> tuple[str, str | None, int] | None:
        """Check a loaded state dict's ``identity()`` (``None`` for an older state dict) and ``step`` (the
        wrapper being at step ``current``) against this wrapper.

        Returns the resume to apply once the state dict is loaded, or ``None`` when it changes nothing (a round
        trip at the current position); raises ``ValueError``, before anything changes, for another run's state
        dict when this wrapper writes a directory of its own run.
        """
        if saved is None:  # an older state dict: the run it belongs to is this directory's
            if step == current and self.pending is None:
                return None
            return (self.run, self.lineage or self.resources.last_lineage, step)
        if not isinstance(saved, dict) or not isinstance(saved.get("run"), str):
            raise ValueError(f"the state dict's snapshot identity is not a dict with a run id: {saved!r}")
        lineage, at = saved.get("lineage"), saved.get("at")
        if saved == self.identity() and (at is not None or step == current):
            return None
        owned = self.config.every is not None and (self.lineage is not None or self.resources.last_lineage)
        if saved["run"] != self.run and owned:
            raise ValueError(
                f"the state dict belongs to run {saved['run']}, but this wrapper writes the snapshots of run "
                f"{self.run} in {os.fspath(self.config.dir)!r}: runs are never mixed (use another snapshot_dir)"
            )
        return (saved["run"], lineage, step if at is None else int(at))

    def resumed(self, plan: tuple[str, str | None, int] | None) -> None:
        """Apply :meth:`resume_plan`'s result: recorded on disk with the next snapshot, never before."""
        if plan is not None:
            self.run, parent, at = plan
            self.lineage, self.pending = None, (parent, at)

    def _writer(self) -> SnapshotWriter:
        if self.resources.writer is None:
            directory = os.fspath(self.config.dir)
            self.resources.lock(directory, _rank())
            self.resources.writer = SnapshotWriter(directory, rank=_rank(), run=self.run)
        return self.resources.writer

    @property
    def failures(self) -> int:
        writer = self.resources.writer
        return self.resources.own_failures + (writer.failures if writer is not None else 0)

    def flush(self) -> None:
        """Return once every snapshot taken so far is written or has failed (warned, counted); never raises."""
        if self.resources.writer is not None:
            self.resources.writer.flush()

    def close(self) -> None:
        self.resources.close()


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


def _rank() -> int:
    return (
        torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    )


def _writes(tracked: Tracker) -> bool:
    return _rank() == 0 or any(is_dtensor(e.owner) for e in tracked.entries)


def _header_run(path: str) -> str | None:
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    try:
        return json.loads(first).get("run")
    except (ValueError, AttributeError):
        raise ValueError(f"{path} is not a snapshot index (its first line is not a header)") from None


def _agree(run: str, tracked: Tracker) -> str:
    """Under FSDP2 every rank writes: they take rank 0's run id (of the first sharded tensor's mesh)."""
    owners = [e.owner for e in tracked.entries if is_dtensor(e.owner)]
    if not owners or owners[0].device_mesh.ndim != 1:
        return run
    group = owners[0].device_mesh.get_group()
    box = [run]
    torch.distributed.broadcast_object_list(box, src=torch.distributed.get_global_rank(group, 0), group=group)
    return box[0]


# Directories locked by a wrapper of this process: realpath -> the resources holding it.
_LOCKED: dict[str, weakref.ref] = {}


class _Resources:
    """What a schedule holds outside Python: the writer thread and the directory's lock file.

    Kept apart from the schedule so that ``weakref.finalize`` can release them when the wrapper is collected.
    """

    def __init__(self) -> None:
        self.writer: SnapshotWriter | None = None
        self.lock_path: str | None = None
        self.own_failures = 0
        self.last_lineage: str | None = None

    def lock(self, directory: str, rank: int) -> None:
        if self.lock_path is not None:
            return
        path = os.path.join(directory, lock_name(rank))
        key = os.path.realpath(path)
        holder = _LOCKED.get(key)
        if holder is not None and holder() is not None:
            gc.collect()  # a dropped wrapper in a reference cycle lets go of it here
        holder = _LOCKED.get(key)
        if holder is not None and holder() is not None:
            raise ValueError(
                f"snapshot_dir {directory!r} is written by another live wrapper of this process: two wrappers never "
                "write one directory (close() the other one first, or choose another directory)"
            )
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if not _stale(path):
                    raise ValueError(
                        f"snapshot_dir {directory!r} is written by another process ({_read(path)!r} in {path}); if "
                        "that process is gone, remove the lock file"
                    ) from None
                os.remove(path)
                continue
            except OSError as exc:
                raise ValueError(f"snapshot_dir {directory!r} is not writable: {exc}") from None
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {socket.gethostname()}\n")
            break
        self.lock_path = path
        _LOCKED[key] = weakref.ref(self)
        index = os.path.join(directory, index_name(rank))
        if os.path.exists(index):
            self.last_lineage = next(reversed(read_rank(index).lineages), None)

    def close(self) -> None:
        """Flush and stop the writer, then release the lock; idempotent."""
        writer, self.writer = self.writer, None
        try:
            if writer is not None:
                writer.close()
        finally:
            path, self.lock_path = self.lock_path, None
            if path is not None:
                _LOCKED.pop(os.path.realpath(path), None)
                try:
                    os.remove(path)
                except OSError:
                    pass


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


def _stale(path: str) -> bool:
    """A lock left by a process of this host that is gone (or by this process, whose registry has let go)."""
    parts = _read(path).split()
    if len(parts) != 2 or not parts[0].isdigit() or parts[1] != socket.gethostname():
        return len(parts) == 0  # an empty lock: its writer died before writing it
    pid = int(parts[0])
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
