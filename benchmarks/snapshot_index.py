"""What the snapshot index costs the writer thread as a run grows (issue 14): the append-only index (version 2)
against the whole-index rewrite of version 1, side by side on the same snapshots.

A 300-tensor model is snapshotted ``--snapshots`` times through :class:`triton_ema.snapshot.SnapshotWriter` into a
temporary directory. The writer's time is split, by wrapping its steps, into the snapshot file (safetensors write,
fsync, rename, directory fsync) and the index (the appended lines; their fsync, which version 2 does at ``flush()``
and ``close()`` rather than per line: once here, at the end). For version 1 the same entries are written the way it
did after every snapshot: the whole index as one JSON document to a temporary file, fsynced and renamed (its
``_write_json_atomic``), timed alone at 11 sizes from one entry to all of them and interpolated in between (the cost
is linear in the entries). Reported: the index's share of the writer's time, the index time per snapshot over the
first and the last tenth of the run (flat when the cost does not grow), and the same for the version 1 rewrite.

    python -m benchmarks.snapshot_index [--snapshots 1000] [--tensors 300] [--numel 256] [--tmp-root DIR] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from triton_ema import snapshot
from triton_ema.snapshot import SnapshotWriter


def _v1_rewrite(path: str, entries: list[dict]) -> None:
    """Version 1's index write after each snapshot: the whole document, fsynced, renamed."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"format": snapshot.FORMAT, "version": 1, "rank": 0, "entries": entries}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def measure(snapshots: int, tensors: int, numel: int, tmp_root: str | None = None) -> dict:
    model = {f"blocks.{i}.weight": torch.randn(numel) for i in range(tensors)}
    with tempfile.TemporaryDirectory(prefix="triton-ema-index-bench-", dir=tmp_root) as directory:
        writer = SnapshotWriter(directory)
        index_s: list[float] = []
        file_s: list[float] = []
        real_append, real_write, real_sync = writer._append, writer._write, writer._sync_index

        def append(lines):
            start = time.perf_counter()
            real_append(lines)
            index_s.append(time.perf_counter() - start)

        def write(job):
            start = time.perf_counter()
            real_write(job)
            file_s.append(time.perf_counter() - start)

        def sync():
            start = time.perf_counter()
            real_sync()
            sync_s.append(time.perf_counter() - start)

        sync_s: list[float] = []
        writer._append, writer._write, writer._sync_index = append, write, sync
        for step in range(1, snapshots + 1):
            writer.submit(step, float(step), 6.94, 0.1, 0, model)
        writer.close()
        entries = writer.entries
        # The first append of the run also holds the header, the lineage and the tensor list: counted.
        total_writer = sum(file_s) + sum(sync_s)
        index_total = sum(index_s) + sum(sync_s)
        v1_dir = os.path.join(directory, "v1")
        os.makedirs(v1_dir)
        v1_path = os.path.join(v1_dir, "index-r0.json")
        sizes = sorted({max(1, round(len(entries) * i / 10)) for i in range(11)})
        sampled = []
        for n in sizes:
            start = time.perf_counter()
            _v1_rewrite(v1_path, entries[:n])
            sampled.append(time.perf_counter() - start)
        v1_s = [float(v) for v in np.interp(range(1, len(entries) + 1), sizes, sampled)]
        v2_bytes = os.path.getsize(os.path.join(directory, "index-r0.jsonl"))
        v1_bytes = os.path.getsize(v1_path)
    tenth = max(1, snapshots // 10)
    snapshot_lines = index_s[1:] if len(index_s) == snapshots + 1 else index_s
    return {
        "snapshots": snapshots,
        "tensors": tensors,
        "numel": numel,
        "writer_s": total_writer,
        "index_s": index_total,
        "index_share": index_total / total_writer,
        "index_first_tenth_ms": 1e3 * statistics.median(snapshot_lines[:tenth]),
        "index_last_tenth_ms": 1e3 * statistics.median(snapshot_lines[-tenth:]),
        "v2_index_bytes": v2_bytes,
        "v1_rewrite_s": sum(v1_s),
        "v1_share_if_added": sum(v1_s) / (total_writer - index_total + sum(v1_s)),
        "v1_first_tenth_ms": 1e3 * statistics.median(v1_s[:tenth]),
        "v1_last_tenth_ms": 1e3 * statistics.median(v1_s[-tenth:]),
        "v1_index_bytes_last": v1_bytes,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snapshots", type=int, default=1000)
    parser.add_argument("--tensors", type=int, default=300)
    parser.add_argument("--numel", type=int, default=256, help="elements per tensor")
    parser.add_argument("--tmp-root", help="where the temporary directory goes (default: the system's)")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    r = measure(args.snapshots, args.tensors, args.numel, args.tmp_root)
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    print(
        f"{r['snapshots']} snapshots of {r['tensors']} tensors x {r['numel']}: writer {r['writer_s']:.2f} s, index "
        f"{r['index_s']:.3f} s = {100 * r['index_share']:.2f}% (per snapshot {r['index_first_tenth_ms']:.3f} ms "
        f"in the first tenth, {r['index_last_tenth_ms']:.3f} ms in the last; {r['v2_index_bytes']} bytes). "
        f"Version 1's rewrite: {r['v1_rewrite_s']:.2f} s = {100 * r['v1_share_if_added']:.1f}% of such a writer "
        f"(per snapshot {r['v1_first_tenth_ms']:.3f} -> {r['v1_last_tenth_ms']:.3f} ms; "
        f"{r['v1_index_bytes_last']} bytes at the end)"
    )


if __name__ == "__main__":
    main()
