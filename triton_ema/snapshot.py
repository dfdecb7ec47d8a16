"""Asynchronous EMA snapshots as safetensors files, with a crash-safe, append-only index.

A snapshot is one profile's shadows at one step. :class:`SnapshotWriter` takes a host copy of the tensors and
returns; one worker thread writes the files in submission order. :mod:`triton_ema.snapshot_index` reads them back.

**Directory format** (version 2; readable without this package: the files are plain safetensors, the index plain
JSON lines, one object a line, each ending in ``\\n``):

* One file per (snapshot, profile) and rank: ``ema-s{step:09d}-p{profile}-r{rank}.safetensors`` for the run's
  first lineage, ``ema-s{step:09d}-p{profile}-r{rank}-{lineage}.safetensors`` for later ones, so that a resumed
  run never overwrites what an abandoned branch wrote. Its tensors are the shadows, keyed by parameter name (or
  position), each the rank's local piece for a sharded tensor; its safetensors metadata repeats the scalar fields
  as strings (``format``, ``run``, ``lineage``, ``step``, ``t``, ``gamma``, ``sigma_rel``, ``profile``, ``rank``).
* One index per rank, ``index-r{rank}.jsonl``, only ever appended to. Its lines, told apart by ``"kind"``:

  - ``{"kind": "header", "format": "triton-ema-snapshots", "version": 2, "rank": 0, "run": "<run id>"}``: the
    first line. The run id (32 hex digits) names the training run; the wrapper's state dict carries it, so a
    resumed run keeps it, and a fresh run is refused a directory that holds another run's index.
  - ``{"kind": "lineage", "lineage": "L0", "parent": null, "at": 0}``: a stretch of the run starts. ``L0`` is the
    run from its start; ``{"lineage": "L2000", "parent": "L0", "at": 2000}`` the run resumed from a checkpoint of
    lineage ``L0`` at step 2,000 (ids are ``L{at}``, with ``.1``, ``.2``, ... for a repeated resume from the
    same step). A lineage with ``"parent": null`` and ``"at": s`` started at step ``s`` with nothing before it in
    this directory.
  - ``{"kind": "tensors", "id": 0, "tensors": {"layer.weight": {"dtype": "float32", "shape": [64, 32]}, ...},
    "shards": {"layer.weight": {"dim": 0, "offset": 0, "global_shape": [128, 32]}}}``: a tensor list, written
    once and referred to by id (a new one only when the tensors change). ``tensors`` lists the names with dtype and
    (local) shape, in the wrapper's order (the parameters' order); a file's own layout is safetensors' business.
    ``shards`` (or ``null``) says, for each tensor that is this rank's piece of a larger one (FSDP2), along which
    dimension, at which offset, and the full shape.
  - ``{"kind": "snapshot", "file": "ema-s000002000-p0-r0.safetensors", "lineage": "L0", "step": 2000, "t": 2000.0,
    "gamma": 16.97, "sigma_rel": 0.05, "profile": 0, "dtype": "float32", "tensors": 0}``: a complete file. ``t`` is
    the profile's time (``step − update_after_step``), ``gamma`` its exponent, ``dtype`` the stored dtype
    (``"mixed"`` if the tensors differ), ``tensors`` the id of its tensor list.

  **Which snapshots count.** The lineage recorded last, from after its ``at`` on; then its parent's up to that
  ``at`` (included), and so on to a lineage without parent. Snapshots of lineages off that chain, and a parent's
  after the step its child resumed from, belong to an abandoned branch: *superseded*. They stay on disk until
  :func:`triton_ema.snapshot_index.prune` (or ``python -m triton_ema.posthoc DIR --prune``) removes them.
* ``.lock-r{rank}``: ``"{pid} {hostname}"`` of the live writer; a second live wrapper is refused the directory.

Version 1 directories (one ``index-r{rank}.json`` document holding every entry, no run id) are still read.

**Crash safety.** A file is written under a temporary name (``.ema-...safetensors.tmp-{pid}``), fsynced, renamed
into place, the directory fsynced; only then is its line appended to the index (one ``write``). A
crash at any moment leaves an index whose every line names a complete file; at worst a stray temporary file and a
snapshot missing from the index. Index lines are fsynced by :meth:`SnapshotWriter.flush` (the wrapper's
``flush()``, ``state_dict()``, ``close()``), not one by one: a power loss can drop the lines since then, whose files
are then unlisted, as after a crash mid-write. A failed write (disk full, an I/O error) is reported once as a warning
naming the file, leaves neither a temporary nor an unlisted file, and counts in :attr:`SnapshotWriter.failures`; later
snapshots are still attempted.

Example:
    >>> import tempfile, torch
    >>> from triton_ema.snapshot import SnapshotWriter, read_index
    >>> d = tempfile.mkdtemp()
    >>> with SnapshotWriter(d) as w:
    ...     w.submit(step=100, t=100, gamma=6.94, sigma_rel=0.10, profile=0, tensors={"w": torch.ones(3)})
    >>> [e["file"] for e in read_index(d)[0]]
    ['ema-s000000100-p0-r0.safetensors']
"""

from __future__ import annotations

import atexit
import json
import math
import os
import queue
import threading
import warnings
import weakref
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from triton_ema.snapshot_copy import HostCopies
from triton_ema.snapshot_index import (  # noqa: F401 - read_index, prune, FORMAT: this module's public names too
    FORMAT,
    VERSION,
    dtype_name,
    fsync_dir,
    index_files,
    index_name,
    new_run_id,
    prune,
    read_index,
    read_rank,
    snapshot_name,
)


@dataclass
class _Job:
    entry: dict[str, Any]
    tensors: dict[str, Tensor]
    lines: list[dict[str, Any]]  # lineage and tensor-list lines that must precede the snapshot's own
    event: Any = None  # torch.cuda.Event the host copies wait on, None for CPU sources
    metadata: dict[str, str] = field(default_factory=dict)
    renamed: bool = False  # the file is in place: a failure after this removes it (the index never listed it)
    error: BaseException | None = None  # the deferred copy failed: only ``lines`` are kept, for the next snapshot


_STOP = object()


class SnapshotWriter:
    """Writes EMA snapshots to ``directory`` asynchronously, one safetensors file per (snapshot, profile).

    :meth:`submit` takes a host copy of the tensors and returns; a single worker thread writes the files in order
    and appends to ``index-r{rank}.jsonl`` (see the module docstring for the format). An existing index in the
    directory is continued (its run id kept), so a resumed run appends to it.

    Args:
        directory: where the files go (created if missing).
        rank: this process's rank; each rank writes its own files and index.
        run: the run id for a new index (default: a fresh one); an existing index of another run is refused.
        max_pending: at most this many submitted snapshots wait for the disk; :meth:`submit` blocks beyond that,
            so a slow disk cannot fill host memory with copies.

    .. note::
        Tensors are copied into host buffers (pinned for CUDA sources, on a side stream) that are reused once their
        file is written. With ``wait=True`` (default) the caller's current stream waits for a CUDA copy on the GPU
        (no host synchronisation), so later kernels cannot overwrite the tensors first; with ``wait=False`` the
        caller must wait on the returned event itself before writing to them.
    """

    def __init__(
        self, directory: str | os.PathLike, rank: int = 0, *, run: str | None = None, max_pending: int = 8
    ) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"Invalid rank value: {rank!r}. It must be an int >= 0.")
        if max_pending < 1:
            raise ValueError(f"Invalid max_pending value: {max_pending}. It must be >= 1.")
        self.directory = os.fspath(directory)
        self.rank = rank
        os.makedirs(self.directory, exist_ok=True)
        self._index_path = os.path.join(self.directory, index_name(rank))
        existing = index_files(self.directory).get(rank)
        if existing is not None and existing != self._index_path:
            raise ValueError(
                f"{existing} was written by an older version of triton-ema (index version 1); it stays readable, "
                "but new snapshots need another directory"
            )
        index = read_rank(existing) if existing is not None else None
        if index is not None and run is not None and index.run != run:
            raise ValueError(f"{self._index_path} belongs to run {index.run}, not {run}: runs are never mixed")
        self.run: str = index.run if index is not None else (run or new_run_id())
        self._has_header = index is not None
        self._lineages: dict[str, dict[str, Any]] = dict(index.lineages) if index else {}
        self.lineage: str | None = next(reversed(self._lineages)) if self._lineages else None
        self._lists: dict[tuple, int] = {}
        for list_id, listed in index.tensor_lists.items() if index else ():
            self._lists[self._list_key(listed["tensors"], listed["shards"])] = list_id
        self._entries: list[dict[str, Any]] = list(index.snapshots) if index else []
        self._lines_due: list[dict[str, Any]] = []  # lines the next submitted snapshot takes to the worker
        self._unwritten: list[dict[str, Any]] = []  # lines the worker still owes the index (after a failure)
        self._index_dirty = False
        self.failures = 0
        self.failed_files: list[str] = []
        self._copies = HostCopies(rank)
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"triton-ema-snapshots-r{rank}", daemon=True)
        self._thread.start()
        # A weak reference so that the atexit hook does not keep a forgotten writer alive.
        ref = weakref.ref(self)
        self._atexit = lambda: (w := ref()) is not None and w.close()
        atexit.register(self._atexit)

    def __enter__(self) -> SnapshotWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SnapshotWriter({self.directory!r}, rank={self.rank}, run={self.run}, entries={len(self._entries)})"

    @property
    def entries(self) -> list[dict[str, Any]]:
        """Every snapshot line of the index so far, superseded ones included (copies)."""
        with self._lock:
            return [dict(e) for e in self._entries]

    def begin_lineage(self, parent: str | None, at: int) -> str:
        """Start a lineage: the run resumed at step ``at`` from ``parent`` (``None``: nothing before it here).

        Returns its id; its line is written before the next snapshot, so a lineage that takes no snapshot leaves
        no trace on disk.
        """
        base = f"L{int(at)}"
        lineage, n = base, 0
        while lineage in self._lineages:
            n += 1
            lineage = f"{base}.{n}"
        self._lineages[lineage] = {"parent": parent, "at": int(at)}
        self._lines_due.append({"kind": "lineage", "lineage": lineage, "parent": parent, "at": int(at)})
        self.lineage = lineage
        return lineage

    @staticmethod
    def _list_key(tensors: Mapping[str, Any], shards: Mapping[str, Any] | None) -> tuple:
        return (
            tuple((n, m["dtype"], tuple(m["shape"])) for n, m in tensors.items()),
            tuple((n, p["dim"], p["offset"], tuple(p["global_shape"])) for n, p in (shards or {}).items()),
        )

    def submit(
        self,
        step: int,
        t: float,
        gamma: float,
        sigma_rel: float,
        profile: int,
        tensors: Mapping[str, Tensor],
        dtype: torch.dtype | None = None,
        *,
        shards: Mapping[str, Mapping[str, Any]] | None = None,
        wait: bool = True,
    ) -> Any:
        """Queue one profile's shadows taken at ``step`` for writing; returns the CUDA copy event or ``None``.

        Args:
            step: the optimizer step count (names the file).
            t: the profile's time, ``step − update_after_step`` (> 0).
            gamma, sigma_rel: the profile's exponent and relative width (recorded, not checked against each other).
            profile: the profile's index.
            tensors: ``{name: tensor}``; names must be strings, tensors dense.
            dtype: the stored dtype (``None`` keeps each tensor's own).
            shards: optional ``{name: {"dim": d, "offset": o, "global_shape": [...]}}`` for tensors that are this
                rank's piece of a larger one; recorded in the index so that :mod:`triton_ema.posthoc` can assemble.
            wait: CUDA only; see the class note.
        """
        item = {"step": step, "t": t, "gamma": gamma, "sigma_rel": sigma_rel, "profile": profile, "tensors": tensors}
        return self.submit_many([item], dtype, shards=shards, wait=wait)

    def submit_many(
        self,
        items: list[dict[str, Any]],
        dtype: torch.dtype | None = None,
        *,
        shards: Mapping[str, Mapping[str, Any]] | None = None,
        wait: bool = True,
        defer: bool = False,
    ) -> Any:
        """:meth:`submit` several profiles at once: every copy is taken before any write is queued.

        With ``defer=True`` the copies of CPU tensors are taken on the copy thread and a
        :class:`~concurrent.futures.Future` is returned, done once they are (never an exception: a failed copy is
        reported and counted like a failed write): the caller must not write the tensors before. CUDA tensors
        are copied on the side stream as without it, the future done at once.
        """
        if self._closed:
            raise RuntimeError("SnapshotWriter is closed")
        for item in items:
            self._check(item)
        if self.lineage is None:
            self.begin_lineage(None, 0)
        self._copies.reserve([item["tensors"] for item in items], dtype)
        if defer and not any(x.is_cuda for item in items for x in item["tensors"].values()):
            return self._submit_later(items, dtype, shards)
        self._copies.wait()  # the queue stays in submission order
        event = None
        jobs = []
        for item in items:
            copies, event = self._copies.copy(item["tensors"], dtype, wait)
            jobs.append(self._job(item, copies, shards, event))
        for job in jobs:
            self._queue.put(job)
        if defer:
            done: Future = Future()
            done.set_result(None)
            return done
        return event

    def _submit_later(self, items: list[dict[str, Any]], dtype: torch.dtype | None, shards: Any) -> Future:
        pairs, jobs = [], []
        for item in items:
            copies = {}
            for name, x in item["tensors"].items():
                copies[name] = self._copies.take(x.shape, dtype or x.dtype, False)
                pairs.append((copies[name], x.detach()))
            jobs.append(self._job(item, copies, shards, None))
        copied: Future = Future()

        def copy_then_queue() -> None:
            try:
                for buf, x in pairs:
                    self._copies.fill(buf, x)
            except BaseException as exc:  # noqa: B036 - reported by the writer thread, in order, like a failed write
                buffers = {f"{k}/{n}": b for k, job in enumerate(jobs) for n, b in job.tensors.items()}
                lines = [line for job in jobs for line in job.lines]
                jobs[:] = [_Job({"step": items[0]["step"]}, buffers, lines, error=exc)]
            finally:
                # Every profile is copied (or the copy failed) before any write is queued.
                copied.set_result(None)
            for job in jobs:
                self._queue.put(job)

        self._copies.later(copy_then_queue)
        return copied

    def _check(self, item: dict[str, Any]) -> None:
        for name in ("step", "profile"):
            value = item[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Invalid {name} value: {value!r}. It must be an int >= 0.")
        if not (math.isfinite(item["t"]) and item["t"] > 0):
            raise ValueError(f"Invalid t value: {item['t']}. A snapshot's time must be > 0 (after update_after_step).")
        if not (math.isfinite(item["gamma"]) and item["gamma"] >= 0):
            raise ValueError(f"Invalid gamma value: {item['gamma']}. It must be a finite number >= 0.")
        if not item["tensors"]:
            raise ValueError("submit needs at least one tensor")
        for name in item["tensors"]:
            if not isinstance(name, str):
                raise TypeError(f"tensor names must be str, got {type(name).__name__}")

    def _job(self, item: dict[str, Any], copies: dict[str, Tensor], shards: Any, event: Any) -> _Job:
        listed = {n: {"dtype": dtype_name(c.dtype), "shape": list(c.shape)} for n, c in copies.items()}
        placed = None
        if shards:
            unknown = set(shards) - set(copies)
            if unknown:
                raise ValueError(f"shards names tensors that were not given: {sorted(unknown)}")
            placed = {
                n: {"dim": int(p["dim"]), "offset": int(p["offset"]), "global_shape": list(map(int, p["global_shape"]))}
                for n, p in shards.items()
            }
        lines, self._lines_due = self._lines_due, []
        key = self._list_key(listed, placed)
        list_id = self._lists.get(key)
        if list_id is None:
            list_id = self._lists[key] = len(self._lists)
            lines.append({"kind": "tensors", "id": list_id, "tensors": listed, "shards": placed})
        dtypes = {m["dtype"] for m in listed.values()}
        step, profile = item["step"], item["profile"]
        line = {
            "kind": "snapshot",
            "file": snapshot_name(step, profile, self.rank, self.lineage),
            "lineage": self.lineage,
            "step": step,
            "t": float(item["t"]),
            "gamma": float(item["gamma"]),
            "sigma_rel": float(item["sigma_rel"]),
            "profile": profile,
            "dtype": dtypes.pop() if len(dtypes) == 1 else "mixed",
            "tensors": list_id,
        }
        metadata = {"format": FORMAT, "run": self.run, "rank": str(self.rank)}
        metadata.update({k: str(line[k]) for k in ("lineage", "step", "t", "gamma", "sigma_rel", "profile")})
        entry = {**line, "rank": self.rank, "tensors": listed, "tensor_list": list_id}
        if placed:
            entry["shards"] = placed
        return _Job(entry, copies, lines, event, metadata)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is _STOP:
                    return
                if job.error is not None:
                    self._unwritten.extend(job.lines)  # the lineage and tensor lines go with the next snapshot
                    raise job.error
                self._write(job)
            except BaseException as exc:  # noqa: B036 - a snapshot must never stop training: warn and go on
                self._failed(job, exc)
            finally:
                if job is not _STOP:
                    self._copies.release(job.tensors)
                self._queue.task_done()

    def _failed(self, job: _Job, exc: BaseException) -> None:
        if job.error is not None:
            with self._lock:
                self.failures += 1
            warnings.warn(
                f"triton-ema: the snapshot at step {job.entry['step']} was not taken: copying it failed ({exc!r})",
                RuntimeWarning,
                stacklevel=1,
            )
            return
        name = job.entry["file"]
        final = os.path.join(self.directory, name)
        for path in (self._tmp_path(name), final if job.renamed else None):
            if path is not None:
                try:
                    os.remove(path)
                except OSError:
                    pass
        with self._lock:
            self.failures += 1
            self.failed_files.append(final)
        warnings.warn(
            f"triton-ema: writing the snapshot {final} failed ({exc!r}); it is left out of the index and later "
            "snapshots are still attempted",
            RuntimeWarning,
            stacklevel=1,
        )

    def _tmp_path(self, name: str) -> str:
        return os.path.join(self.directory, f".{name}.tmp-{os.getpid()}")

    def _append(self, lines: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines).encode()
        created = not os.path.exists(self._index_path)
        fd = os.open(self._index_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            # One write: a process killed mid-append leaves the line whole or absent. Not fsynced per line (that
            # would be most of the writer's time on a small model): flush() fsyncs it, so a power loss can drop
            # the lines since the last flush, whose files are then unlisted, never a line without its file.
            os.write(fd, data)
        except OSError:
            if created:  # leave no empty index behind (it would read as a damaged one)
                os.remove(self._index_path)
            raise
        finally:
            os.close(fd)
        self._index_dirty = True
        if created:
            fsync_dir(self.directory)

    def _sync_index(self) -> None:
        if self._index_dirty:
            self._index_dirty = False
            fd = os.open(self._index_path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _write(self, job: _Job) -> None:
        from safetensors.torch import save_file

        self._unwritten.extend(job.lines)
        job.lines = []
        if self._unwritten or not self._has_header:
            header = [] if self._has_header else [self._header()]
            self._append(header + self._unwritten)
            self._has_header, self._unwritten = True, []
        if job.event is not None:
            job.event.synchronize()
        name = job.entry["file"]
        final = os.path.join(self.directory, name)
        if os.path.exists(final):
            raise FileExistsError(f"{final} exists: snapshot files are never overwritten")
        tmp = self._tmp_path(name)
        save_file(job.tensors, tmp, metadata=job.metadata)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        job.renamed = True
        fsync_dir(self.directory)
        self._copies.release(job.tensors)  # the host copy goes back to the pool before the (small) index write
        line = {k: v for k, v in job.entry.items() if k not in ("rank", "tensors", "tensor_list", "shards")}
        line["tensors"] = job.entry["tensor_list"]
        self._append([line])
        with self._lock:
            self._entries.append(job.entry)

    def _header(self) -> dict[str, Any]:
        return {"kind": "header", "format": FORMAT, "version": VERSION, "rank": self.rank, "run": self.run}

    def flush(self) -> None:
        """Return once every snapshot submitted so far is written (the index fsynced) or has failed (see
        :attr:`failures`)."""
        self._copies.wait()
        if self._thread.is_alive():
            self._queue.join()
        try:
            self._sync_index()
        except OSError as exc:  # reported like a failed snapshot: the lines are written, only not yet durable
            warnings.warn(f"triton-ema: fsync of {self._index_path} failed: {exc!r}", RuntimeWarning, stacklevel=2)

    def close(self) -> None:
        """Flush, then stop the worker thread. Idempotent; further :meth:`submit` calls raise."""
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
        finally:
            self._queue.put(_STOP)
            self._thread.join()
            atexit.unregister(self._atexit)
            self._copies.close()
