"""Side-by-side ratios of the EMA update: every contender timed in turn, round after round.

pytest-benchmark times one contender after the other, each for about a second; on a shared machine the
load can change between two of them and skew their ratio. Here each round calls every contender once, in
a rotating order, so slow drifts in load hit all of them alike and the ratio of medians stays fair.

    python -m benchmarks.paired [--workload resnet50] [--dtypes fp32,bf16] [--rounds 21] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch

from benchmarks import harness, workloads
from benchmarks.contenders import CONTENDERS, DECAY


def targets(device_type: str, dtype: str) -> list[tuple[str, str, str, float]]:
    """The project's targets as time ratios ``(numerator, denominator, op, bound)``; GPU ones are for ResNet-50."""
    if device_type == "cuda":
        return [
            ("foreach_lerp", "wrapper_update", ">=", 1.1 if dtype == "fp32" else 1.6),
            ("article_loop", "wrapper_update", ">=", 20.0),
        ]
    return [("wrapper_update", "foreach_lerp", "<=", 1.25), ("litema_loop", "wrapper_update", ">=", 3.0)]


def check_targets(medians: dict[str, float], device_type: str, dtype: str) -> list[dict]:
    """Each target with its measured time ratio and whether it is met."""
    out = []
    for num, den, op, bound in targets(device_type, dtype):
        if num in medians and den in medians:
            ratio = medians[num] / medians[den]
            met = ratio <= bound if op == "<=" else ratio >= bound
            out.append({"ratio": f"{num} / {den}", "target": f"{op} {bound}", "measured": ratio, "met": met})
    return out


def paired_medians(workload: workloads.Workload, rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per call of every available update contender over ``workload``'s parameters, and on
    CPU the median minor page faults per call (empty on GPU)."""
    device = workload.device
    fns = {}
    for c in CONTENDERS:
        if c.kind == "update" and (device.type == "cuda" or not c.cuda_only):
            _, fn = c.build(workload.params, DECAY)
            # Compilation, autotuning and graph recording happen here, outside the timed rounds.
            harness.warm_up(fn, device)
            fns[c.name] = (fn, harness.calls_per_round(fn, device))
    times: dict[str, list[float]] = {name: [] for name in fns}
    faults: dict[str, list[int]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, calls = fns[name]
            harness.synchronize(device)
            faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            harness.synchronize(device)
            times[name].append((time.perf_counter() - start) / calls)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
    medians = {name: statistics.median(t) for name, t in times.items()}
    # Faults are a CPU diagnostic: on GPU they would count host-side noise, not the update.
    if device.type == "cuda":
        return medians, {}
    return medians, {name: statistics.median(f) for name, f in faults.items()}


def run(arch: str, dtypes: list[str], rounds: int) -> dict:
    if os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("TRITON_INTERPRET is set: unset it to benchmark the compiled kernels.")
    device = torch.device(workloads.default_device())
    results = []
    for dtype in dtypes:
        workload = workloads.make_workload(arch, dtype, device)
        medians, faults = paired_medians(workload, rounds)
        results.append(
            {
                "workload": workload.label,
                "rounds": rounds,
                "median_s": medians,
                "page_faults": faults,
                "targets": check_targets(medians, device.type, dtype),
            }
        )
        del workload
    return {"environment": harness.environment(device), "results": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="resnet50")
    parser.add_argument("--dtypes", default=workloads.DEFAULT_DTYPES)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--json", type=Path, help="write the medians here as JSON")
    args = parser.parse_args(argv)
    data = run(args.workload, args.dtypes.split(","), args.rounds)
    if args.json:
        args.json.write_text(json.dumps(data, indent=1))
    for result in data["results"]:
        medians = result["median_s"]
        print(result["workload"], {name: f"{t * 1e3:.3f} ms" for name, t in medians.items()})
        for target in result["targets"]:
            print(f"  {target['ratio']} = {target['measured']:.2f} (target {target['target']}): met={target['met']}")


if __name__ == "__main__":
    main()
