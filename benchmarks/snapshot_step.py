"""What a step that takes a post-hoc EMA snapshot costs, against a median step (issue 8).

The wrapper around SGD tracks ``sigma_rel=(0.05, 0.10)`` and snapshots every ``--every`` updates into a
temporary directory (removed at the end). Each ``opt.step()`` is timed alone, on the workload's parameters
and pre-filled gradients, for ``--snapshots`` snapshot periods after one period of warm-up (the writer
thread started, safetensors imported, the first files written). A snapshot step copies every profile's
shadows (a host clone on the CPU, a device-to-host copy into pinned buffers on a GPU) and queues them; a
worker thread writes the files, so the steps after a snapshot share the machine with that write: they are
reported too. Before each snapshot step the previous snapshot's write is waited for, untimed (``flush()``),
as it would have finished long before in a run that snapshots every few thousand steps; how long that wait
was (``pending_write_s``: 0 when the disk kept up with ``--every``) is reported, not hidden.

On the CPU the copy itself runs on the writer's copy thread and the next update waits for it: with nothing between
two ``opt.step()`` calls (the default) the next step absorbs what the copy did not overlap. ``--gap-ms N`` runs N ms
of untimed 256x256 matmuls on the training thread between steps, a stand-in for forward and backward (compute-bound:
it leaves the memory bandwidth to the copy), to show how much of the copy such work hides.

    python -m benchmarks.snapshot_step [--workloads small3,resnet50] [--dtypes fp32] [--every 20]
                                       [--snapshots 6] [--tmp-root DIR] [--threads 1] [--gap-ms 0] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import harness, workloads
from benchmarks.contenders import LR, SIGMA_RELS
from triton_ema import EMAOptimizerWrapper
from triton_ema.snapshot import read_index

DEFAULT_WORKLOADS = "small3,resnet50"


def between_steps(gap_s: float) -> None:
    """Untimed work on the training thread, standing in for forward and backward."""
    if gap_s <= 0:
        return
    a = torch.randn(256, 256)
    end = time.perf_counter() + gap_s
    while time.perf_counter() < end:
        a = torch.tanh(a @ a)


def measure(arch: str, dtype: str, every: int, snapshots: int, tmp_root: str | None = None, gap_ms: float = 0) -> dict:
    """Per-step times of a snapshotting wrapper on ``arch``/``dtype``; snapshot steps against the median."""
    if every < 2 or snapshots < 1:
        raise ValueError("needs every >= 2 (steps without a snapshot to compare with) and snapshots >= 1")
    workload = workloads.make_workload(arch, dtype, workloads.default_device())
    device = workload.device
    with tempfile.TemporaryDirectory(prefix="triton-ema-snapshot-bench-", dir=tmp_root) as directory:
        opt = EMAOptimizerWrapper(
            torch.optim.SGD(workload.params, lr=LR), sigma_rel=SIGMA_RELS, snapshot_every=every, snapshot_dir=directory
        )
        for _ in range(every):
            opt.step()
        opt.flush()
        times: list[float] = []
        snapshot_at: list[bool] = []
        pending: list[float] = []
        faults: list[int] = []
        for _ in range(every * snapshots):
            if (opt.num_steps + 1) % every == 0:
                # Untimed: the snapshot step should measure its own copy and queueing, not a disk that a
                # benchmark's short period outran (max_pending would block it).
                start = time.perf_counter()
                opt.flush()
                pending.append(time.perf_counter() - start)
            between_steps(gap_ms / 1e3)
            harness.synchronize(device)
            faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            opt.step()
            harness.synchronize(device)
            times.append(time.perf_counter() - start)
            # Minor page faults of the process (the writer thread's too): fresh host copies fault in.
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
            # update_every is 1: the update that makes the count a multiple of `every` took a snapshot.
            snapshot_at.append(opt.num_steps % every == 0)
        start = time.perf_counter()
        opt.flush()
        flush_s = time.perf_counter() - start
        entries = [e for rank in read_index(directory).values() for e in rank]
        snapshot_bytes = sum(s.numel() * s.element_size() for k in range(len(SIGMA_RELS)) for s in opt.ema_params(k))
        del opt
    snap = [t for t, s in zip(times, snapshot_at, strict=True) if s]
    plain = [t for t, s in zip(times, snapshot_at, strict=True) if not s]
    # The step right after each snapshot (the last snapshot has none inside the timed window).
    after = [times[i + 1] for i, s in enumerate(snapshot_at[:-1]) if s]
    median = statistics.median(times)
    return {
        "workload": workload.label,
        "tensors": len(workload.params),
        "numel": workload.numel,
        "every": every,
        "gap_ms": gap_ms,
        "snapshots": len(snap),
        "profiles": len(SIGMA_RELS),
        "bytes_per_snapshot": snapshot_bytes,
        "median_step_s": median,
        "median_plain_step_s": statistics.median(plain),
        "snapshot_steps_s": snap,
        "median_snapshot_step_s": statistics.median(snap),
        "max_snapshot_step_s": max(snap),
        "median_after_snapshot_s": statistics.median(after) if after else None,
        "mean_step_s": statistics.fmean(times),
        "flush_s": flush_s,
        "pending_write_s": statistics.median(pending),
        "page_faults_snapshot_step": statistics.median(f for f, s in zip(faults, snapshot_at, strict=True) if s),
        "page_faults_plain_step": statistics.median(f for f, s in zip(faults, snapshot_at, strict=True) if not s),
        "files_written": len(entries),
        "files_expected": (snapshots + 1) * len(SIGMA_RELS),
        "snapshot_over_median": statistics.median(snap) / median,
        "max_snapshot_over_median": max(snap) / median,
        "after_over_median": statistics.median(after) / median if after else None,
        # What snapshotting adds per step on average over the window (queueing, the write's competition).
        "mean_over_plain_median": statistics.fmean(times) / statistics.median(plain),
    }


def run(
    archs: list[str], dtypes: list[str], every: int, snapshots: int, tmp_root: str | None = None, gap_ms: float = 0
) -> dict:
    if os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("TRITON_INTERPRET is set: unset it to benchmark the compiled kernels.")
    harness.apply_threads()
    device = torch.device(workloads.default_device())
    results = [measure(a, d, every, snapshots, tmp_root, gap_ms) for a in archs for d in dtypes]
    return {"environment": harness.environment(device), "results": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=DEFAULT_WORKLOADS)
    parser.add_argument("--dtypes", default="fp32")
    parser.add_argument("--every", type=int, default=20, help="snapshot_every (updates between snapshots)")
    parser.add_argument("--snapshots", type=int, default=6, help="snapshot periods timed")
    parser.add_argument("--tmp-root", help="where the temporary snapshot directory goes (default: the system's)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (sets EMA_BENCH_THREADS)")
    parser.add_argument("--gap-ms", type=float, default=0, help="untimed matmuls between steps (forward/backward)")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        os.environ["EMA_BENCH_THREADS"] = str(args.threads)
    specs = workloads.selected("cpu", args.workloads, args.dtypes)
    archs, dtypes = list(dict.fromkeys(a for a, _ in specs)), list(dict.fromkeys(d for _, d in specs))
    data = run(archs, dtypes, args.every, args.snapshots, args.tmp_root, args.gap_ms)
    if args.json:
        args.json.write_text(json.dumps(data, indent=1))
    for r in data["results"]:
        after = r["after_over_median"]
        print(
            f"{r['workload']}: median step {r['median_step_s'] * 1e3:.3f} ms, snapshot step "
            f"{r['median_snapshot_step_s'] * 1e3:.3f} ms = {r['snapshot_over_median']:.2f}x (max "
            f"{r['max_snapshot_over_median']:.2f}x), next step {'-' if after is None else f'{after:.2f}x'}, "
            f"pending write {r['pending_write_s'] * 1e3:.1f} ms, final flush {r['flush_s'] * 1e3:.1f} ms, "
            f"{r['files_written']} files, page faults {r['page_faults_snapshot_step']:.0f} (snapshot step) / "
            f"{r['page_faults_plain_step']:.0f} (other steps)"
        )


if __name__ == "__main__":
    main()
