"""Asynchronous EMA snapshots as safetensors files, with a crash-safe JSON index.

A snapshot is one profile's shadows at one step. :class:`SnapshotWriter` takes a host copy of the tensors and
returns; one worker thread writes the files in submission order.

**Directory format** (version 1; readable without this package: the files are plain safetensors and the index is
plain JSON):

* One file per (snapshot, profile) and rank: ``ema-s{step:09d}-p{profile}-r{rank}.safetensors``. Its tensors are
  the shadows, keyed by parameter name (or position); its safetensors metadata repeats the index entry's scalar
  fields as strings (``step``, ``t``, ``gamma``, ``sigma_rel``, ``profile``, ``rank``, ``format``), so each file
  also describes itself.
* One index per rank: ``index-r{rank}.json``::

      {"format": "triton-ema-snapshots", "version": 1, "rank": 0,
       "entries": [
         {"file": "ema-s000002000-p0-r0.safetensors", "step": 2000, "t": 2000.0,
          "gamma": 16.97, "sigma_rel": 0.05, "profile": 0, "rank": 0, "dtype": "float32",
          "tensors": {"layer.weight": {"dtype": "float32", "shape": [64, 32]}, ...},
          "shards": {"layer.weight": {"dim": 0, "offset": 0, "global_shape": [128, 32]}}},
         ...]}

  ``t`` is the profile's time (``step − update_after_step``), ``gamma`` its exponent, ``dtype`` the stored dtype
  (``"mixed"`` if the tensors differ), ``tensors`` the names in file order with dtype and shape. ``shards`` is
  optional: for a sharded tensor (FSDP2 shards along one dimension), where this rank's piece sits in the full
  tensor. Entries are in the order their files were completed; a later entry for the same ``(step, profile)``
  replaces an earlier one.

**Crash safety.** A file is written under a temporary name (``.ema-...safetensors.tmp-{pid}``), fsynced and renamed
into place; only then is its entry appended to the index, which is itself rewritten to a temporary name, fsynced
and renamed. A crash at any moment therefore leaves an index whose every entry names a complete file; at worst a
stray temporary file and a snapshot missing from the index.

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
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

FORMAT = "triton-ema-snapshots"
VERSION = 1


def index_name(rank: int) -> str:
    return f"index-r{rank}.json"


def snapshot_name(step: int, profile: int, rank: int) -> str:
    return f"ema-s{step:09d}-p{profile}-r{rank}.safetensors"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fsync_dir(directory: str) -> None:
    # Makes the rename itself durable; some platforms (Windows) cannot open a directory, which is fine there.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def read_index(directory: str | os.PathLike) -> dict[int, list[dict[str, Any]]]:
    """Every rank's index in ``directory``: ``{rank: entries}``; ``{}`` if there is none."""
    directory = os.fspath(directory)
    out: dict[int, list[dict[str, Any]]] = {}
    if not os.path.isdir(directory):
        return out
    for name in sorted(os.listdir(directory)):
        if not (name.startswith("index-r") and name.endswith(".json")):
            continue
        with open(os.path.join(directory, name)) as f:
            doc = json.load(f)
        if doc.get("format") != FORMAT:
            raise ValueError(f"{name} in {directory} is not a {FORMAT} index (format={doc.get('format')!r})")
        if doc.get("version", 0) > VERSION:
            raise ValueError(f"{name} has index version {doc['version']}; this reader knows up to {VERSION}")
        out[int(doc["rank"])] = list(doc["entries"])
    return out


@dataclass
class _Job:
    entry: dict[str, Any]
    tensors: dict[str, Tensor]
    event: Any = None  # torch.cuda.Event the host copies wait on, None for CPU sources
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class _Discard:
    step: int


_STOP = object()


class SnapshotWriter:
    """Writes EMA snapshots to ``directory`` asynchronously, one safetensors file per (snapshot, profile).

    :meth:`submit` takes a host copy of the tensors and returns; a single worker thread writes the files in order
    and keeps ``index-r{rank}.json`` up to date (see the module docstring for the format). An existing index in
    the directory is continued, so a resumed run appends to it.

    Args:
        directory: where the files go (created if missing).
        rank: this process's rank; each rank writes its own files and index.
        max_pending: at most this many submitted snapshots wait for the disk; :meth:`submit` blocks beyond that,
            so a slow disk cannot fill host memory with copies.

    .. note::
        CPU tensors are cloned (converted to ``dtype`` if given). CUDA tensors are copied into pinned host buffers
        on a side stream; the worker waits for the copy's event before writing. With ``wait=True`` (default) the
        caller's current stream waits for the copy on the GPU (no host synchronisation), so later kernels cannot
        overwrite the tensors first; with ``wait=False`` the caller must wait on the returned event itself before
        writing to them.
    """

    def __init__(self, directory: str | os.PathLike, rank: int = 0, *, max_pending: int = 8) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"Invalid rank value: {rank!r}. It must be an int >= 0.")
        if max_pending < 1:
            raise ValueError(f"Invalid max_pending value: {max_pending}. It must be >= 1.")
        self.directory = os.fspath(directory)
        self.rank = rank
        os.makedirs(self.directory, exist_ok=True)
        self._index_path = os.path.join(self.directory, index_name(rank))
        self._entries: list[dict[str, Any]] = read_index(self.directory).get(rank, [])
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._stream = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"triton-ema-snapshots-r{rank}", daemon=True)
        self._thread.start()
        # A weak reference so that the atexit hook does not keep a forgotten writer alive.
        ref = weakref.ref(self)
        self._atexit = lambda: (w := ref()) is not None and w._atexit_flush()
        atexit.register(self._atexit)

    def __enter__(self) -> SnapshotWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SnapshotWriter({self.directory!r}, rank={self.rank}, entries={len(self._entries)})"

    @property
    def entries(self) -> list[dict[str, Any]]:
        """The index entries written so far (a copy)."""
        with self._lock:
            return [dict(e) for e in self._entries]

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
        if self._closed:
            raise RuntimeError("SnapshotWriter is closed")
        self._raise_error()
        for name, value in (("step", step), ("profile", profile)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Invalid {name} value: {value!r}. It must be an int >= 0.")
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"Invalid t value: {t}. A snapshot's time must be > 0 (after update_after_step).")
        if not (math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"Invalid gamma value: {gamma}. It must be a finite number >= 0.")
        if not tensors:
            raise ValueError("submit needs at least one tensor")
        copies: dict[str, Tensor] = {}
        event = None
        cuda_items = []
        for name, x in tensors.items():
            if not isinstance(name, str):
                raise TypeError(f"tensor names must be str, got {type(name).__name__}")
            x = x.detach()
            target = dtype or x.dtype
            if x.is_cuda:
                cuda_items.append((name, x, target))
            else:
                # A fresh contiguous copy: safetensors needs contiguous tensors, and the caller keeps updating x.
                copies[name] = torch.empty(x.shape, dtype=target).copy_(x)
        if cuda_items:
            event = self._copy_cuda(cuda_items, copies, wait)
        # Keep the caller's order (the dict above filled CPU tensors first).
        copies = {name: copies[name] for name in tensors}
        dtypes = {dtype_name(c.dtype) for c in copies.values()}
        entry: dict[str, Any] = {
            "file": snapshot_name(step, profile, self.rank),
            "step": step,
            "t": float(t),
            "gamma": float(gamma),
            "sigma_rel": float(sigma_rel),
            "profile": profile,
            "rank": self.rank,
            "dtype": dtypes.pop() if len(dtypes) == 1 else "mixed",
            "tensors": {n: {"dtype": dtype_name(c.dtype), "shape": list(c.shape)} for n, c in copies.items()},
        }
        if shards:
            unknown = set(shards) - set(copies)
            if unknown:
                raise ValueError(f"shards names tensors that were not given: {sorted(unknown)}")
            entry["shards"] = {
                n: {"dim": int(p["dim"]), "offset": int(p["offset"]), "global_shape": list(map(int, p["global_shape"]))}
                for n, p in shards.items()
            }
        metadata = {"format": FORMAT}
        metadata.update({k: str(entry[k]) for k in ("step", "t", "gamma", "sigma_rel", "profile", "rank")})
        self._queue.put(_Job(entry, copies, event, metadata))
        return event

    def _copy_cuda(self, items: list, copies: dict[str, Tensor], wait: bool) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=items[0][1].device)
        side = self._stream
        side.wait_stream(torch.cuda.current_stream(items[0][1].device))
        with torch.cuda.stream(side):
            for name, x, target in items:
                buf = torch.empty(x.shape, dtype=target, pin_memory=True)
                buf.copy_(x, non_blocking=True)
                # The source was allocated on the caller's stream; keep its memory from being reused early.
                x.record_stream(side)
                copies[name] = buf
            event = torch.cuda.Event()
            event.record(side)
        if wait:
            torch.cuda.current_stream(items[0][1].device).wait_event(event)
        return event

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is _STOP:
                    return
                if self._errors:
                    continue  # after a failure, drop the rest: flush() reports the first error
                if isinstance(job, _Discard):
                    self._discard(job.step)
                else:
                    self._write(job)
            except BaseException as exc:  # noqa: B036 - reported to the caller by flush()
                with self._lock:
                    self._errors.append(exc)
            finally:
                self._queue.task_done()

    def _write(self, job: _Job) -> None:
        from safetensors.torch import save_file

        if job.event is not None:
            job.event.synchronize()
        name = job.entry["file"]
        final = os.path.join(self.directory, name)
        tmp = os.path.join(self.directory, f".{name}.tmp-{os.getpid()}")
        save_file(job.tensors, tmp, metadata=job.metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.directory)
        job.tensors.clear()  # free the host copy before the (small) index write
        with self._lock:
            key = (job.entry["step"], job.entry["profile"])
            self._entries = [e for e in self._entries if (e["step"], e["profile"]) != key]
            self._entries.append(job.entry)
            doc = {"format": FORMAT, "version": VERSION, "rank": self.rank, "entries": list(self._entries)}
        _write_json_atomic(self._index_path, doc)

    def discard_after(self, step: int) -> None:
        """Drop the entries (and delete the files) of snapshots taken after ``step``, in submission order.

        For a run resumed from a checkpoint at ``step``: snapshots the abandoned run took later would otherwise stay
        in the index until the resumed run overwrote them.
        """
        if self._closed:
            raise RuntimeError("SnapshotWriter is closed")
        self._queue.put(_Discard(int(step)))

    def _discard(self, step: int) -> None:
        with self._lock:
            dropped = [e for e in self._entries if e["step"] > step]
            self._entries = [e for e in self._entries if e["step"] <= step]
            doc = {"format": FORMAT, "version": VERSION, "rank": self.rank, "entries": list(self._entries)}
        # The index first: a crash in between leaves unlisted files, never entries without files.
        _write_json_atomic(self._index_path, doc)
        for e in dropped:
            try:
                os.remove(os.path.join(self.directory, e["file"]))
            except FileNotFoundError:
                pass

    def _raise_error(self) -> None:
        with self._lock:
            if self._errors:
                raise RuntimeError(f"writing a snapshot to {self.directory} failed") from self._errors[0]

    def flush(self) -> None:
        """Return once every snapshot submitted so far is on disk; raise if a write failed."""
        if self._thread.is_alive():
            self._queue.join()
        self._raise_error()

    def close(self) -> None:
        """Flush, then stop the worker thread. Further :meth:`submit` calls raise."""
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
        finally:
            self._queue.put(_STOP)
            self._thread.join()
            atexit.unregister(self._atexit)

    def _atexit_flush(self) -> None:
        # At interpreter exit the daemon worker would be killed mid-file: finish the queue first.
        try:
            self.close()
        except Exception as exc:  # noqa: BLE001 - atexit must not raise; say what was lost instead
            import warnings

            warnings.warn(f"triton-ema: a snapshot write failed at exit: {exc!r}", stacklevel=1)
