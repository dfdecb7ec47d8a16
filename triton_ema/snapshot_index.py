"""Reading a snapshot directory's index: lines, runs, lineages, superseded snapshots; :func:`prune`.

The format itself is documented once, in :mod:`triton_ema.snapshot` (which writes it). Here it is read: each
rank's ``index-r{rank}.jsonl`` (version 2) is parsed line by line, and the snapshots that count are those of the
*active lineage chain*: the lineage recorded last, then its parent up to the step it was resumed at, and so on.
Snapshots of an abandoned branch (taken after the step the run was later resumed from) are *superseded*: they
stay on disk, and :func:`prune` removes them when asked. Version 1 directories (one ``index-r{rank}.json`` document
per rank, no run id, no lineage) are still read, as one root lineage.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

FORMAT = "triton-ema-snapshots"
VERSION = 2


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def new_run_id() -> str:
    return uuid.uuid4().hex


def fsync_dir(directory: str) -> None:
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


def index_name(rank: int) -> str:
    return f"index-r{rank}.jsonl"


def index_name_v1(rank: int) -> str:
    return f"index-r{rank}.json"


def lock_name(rank: int) -> str:
    return f".lock-r{rank}"


def snapshot_name(step: int, profile: int, rank: int, lineage: str = "L0") -> str:
    """``ema-s{step:09d}-p{profile}-r{rank}.safetensors``, with ``-{lineage}`` before the suffix after a resume."""
    suffix = "" if lineage == "L0" else f"-{lineage}"
    return f"ema-s{step:09d}-p{profile}-r{rank}{suffix}.safetensors"


@dataclass
class RankIndex:
    """One rank's index as read: its run, lineages, tensor lists and every snapshot line (tensors resolved)."""

    rank: int
    run: str | None
    version: int
    path: str
    lineages: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> {"parent", "at"}, in order
    tensor_lists: dict[int, dict[str, Any]] = field(default_factory=dict)
    snapshots: list[dict[str, Any]] = field(default_factory=list)

    def chain(self) -> list[tuple[str, int | None]]:
        """The active lineage chain, newest first: ``(lineage, last step it counts for)`` (``None``: no limit)."""
        if not self.lineages:
            return []
        out: list[tuple[str, int | None]] = []
        current, limit = next(reversed(self.lineages)), None
        seen: set[str] = set()
        while current is not None and current in self.lineages and current not in seen:
            seen.add(current)
            out.append((current, limit))
            record = self.lineages[current]
            limit = record["at"] if limit is None else min(limit, record["at"])
            current = record["parent"]
        return out

    def live(self) -> list[dict[str, Any]]:
        """The snapshots that count (the active chain's), in the order they were written."""
        # A lineage counts from after the step it started at up to the step its child resumed from, included.
        limits = dict(self.chain())
        out = []
        for e in self.snapshots:
            lineage = e["lineage"]
            if lineage in limits and e["step"] > self.lineages[lineage]["at"]:
                if limits[lineage] is None or e["step"] <= limits[lineage]:
                    out.append(e)
        # A later line for the same (step, profile) replaces an earlier one (version 1 rewrites).
        latest = {(e["step"], e["profile"]): e for e in out}
        return [e for e in out if latest[(e["step"], e["profile"])] is e]

    def superseded(self) -> list[dict[str, Any]]:
        live = {id(e) for e in self.live()}
        return [e for e in self.snapshots if id(e) not in live]


class IndexReadError(ValueError):
    """An index that cannot be read (truncated, not an index, a newer version); names the file."""


def _fail(path: str, what: str) -> IndexReadError:
    return IndexReadError(f"{path}: {what}")


def read_rank(path: str) -> RankIndex:
    """Parse one rank's index file (version 2 JSON lines, or a version 1 JSON document)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise _fail(path, f"cannot be read ({exc.strerror or exc})") from exc
    if path.endswith(".json"):
        return _read_v1(path, text)
    lines = text.split("\n")
    if not text.endswith("\n"):
        raise _fail(path, f"is truncated (its last line, line {len(lines)}, is incomplete)")
    rows = []
    for number, line in enumerate(lines[:-1], 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            raise _fail(path, f"line {number} is not a JSON object (a truncated or damaged index): {exc}") from None
        rows.append(row)
    if not rows or rows[0].get("kind") != "header" or rows[0].get("format") != FORMAT:
        raise _fail(path, f"is not a {FORMAT} index (no header line)")
    header = rows[0]
    if int(header.get("version", 0)) > VERSION:
        raise _fail(path, f"has index version {header['version']}; this reader knows up to {VERSION}")
    index = RankIndex(int(header["rank"]), header.get("run"), int(header["version"]), path)
    try:
        for row in rows[1:]:
            kind = row.get("kind")
            if kind == "lineage":
                index.lineages[row["lineage"]] = {"parent": row.get("parent"), "at": int(row["at"])}
            elif kind == "tensors":
                index.tensor_lists[int(row["id"])] = {"tensors": row["tensors"], "shards": row.get("shards")}
            elif kind == "snapshot":
                listed = index.tensor_lists[int(row["tensors"])]
                entry = {**row, "rank": index.rank, "tensors": listed["tensors"], "tensor_list": int(row["tensors"])}
                if listed["shards"]:
                    entry["shards"] = listed["shards"]
                index.snapshots.append(entry)
    except (KeyError, TypeError, ValueError) as exc:
        raise _fail(path, f"has an incomplete line ({type(exc).__name__}: {exc})") from None
    return index


def _read_v1(path: str, text: str) -> RankIndex:
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise _fail(path, f"is not valid JSON (truncated?): {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _fail(path, f"is not a {FORMAT} index (format={doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("version", 0) > 1:
        raise _fail(path, f"has index version {doc['version']} in a version 1 file")
    index = RankIndex(int(doc["rank"]), None, 1, path)
    index.lineages["L0"] = {"parent": None, "at": 0}
    for e in doc["entries"]:
        index.snapshots.append({**e, "lineage": "L0"})
    return index


def index_files(directory: str) -> dict[int, str]:
    """``{rank: path}`` of the index files in ``directory`` (version 2 preferred over version 1)."""
    out: dict[int, str] = {}
    if not os.path.isdir(directory):
        return out
    for name in sorted(os.listdir(directory)):
        for ext in (".json", ".jsonl"):  # .jsonl second: it wins where both exist
            if name.startswith("index-r") and name.endswith(ext) and name[len("index-r") : -len(ext)].isdigit():
                out[int(name[len("index-r") : -len(ext)])] = os.path.join(directory, name)
    return out


def read_indexes(directory: str | os.PathLike) -> dict[int, RankIndex]:
    """Every rank's index in ``directory``, parsed; ``{}`` if there is none."""
    return {rank: read_rank(path) for rank, path in index_files(os.fspath(directory)).items()}


def read_index(directory: str | os.PathLike) -> dict[int, list[dict[str, Any]]]:
    """Every rank's live snapshots in ``directory``: ``{rank: entries}``; ``{}`` if there is none.

    Superseded snapshots (those of an abandoned branch) are left out; :func:`read_indexes` has them all.
    """
    return {rank: index.live() for rank, index in read_indexes(directory).items()}


def prune(directory: str | os.PathLike, *, dry_run: bool = False) -> list[str]:
    """Delete the files of superseded snapshots (those an abandoned branch took after a resume); return their names.

    Live snapshots and the index stay (the index keeps its lines: readers skip superseded snapshots anyway). The
    temporary files a crashed write can leave (``.ema-*.safetensors.tmp-*``, never listed) are removed too. With
    ``dry_run=True`` nothing is removed, only listed.
    """
    directory = os.fspath(directory)
    removed = []
    for index in read_indexes(directory).values():
        for e in index.superseded():
            path = os.path.join(directory, e["file"])
            if os.path.exists(path):
                if not dry_run:
                    os.remove(path)
                removed.append(e["file"])
    for name in os.listdir(directory):
        if name.startswith(".ema-") and ".safetensors.tmp-" in name:
            if not dry_run:
                os.remove(os.path.join(directory, name))
            removed.append(name)
    return sorted(removed)
