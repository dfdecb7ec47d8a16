"""Run the benchmark suites and write a Markdown table and a PNG plot of the figures.

    python -m benchmarks.report [--workloads resnet50,gpt2] [--dtypes fp32,bf16] [--out DIR] [-- PYTEST_ARGS]

Runs ``pytest benchmarks/ --benchmark-only`` with ``--benchmark-json`` into a temporary file, then the
interleaved side-by-side ratios (``python -m benchmarks.paired``) on the selected workloads that have
targets (small3, mlp3, resnet50, many5k; else the first), then the Triton path's host cost with stubbed
launches (``python -m benchmarks.launch_host``), then the cost of a snapshot step (``python -m
benchmarks.snapshot_step``, fp32, small3 and resnet50 where selected, else the first), and writes
``results.md``, ``results.png`` and the raw ``results.json`` to ``DIR`` (default ``benchmarks/results``).
``--json DIR/results.json`` renders a previous run again without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from benchmarks import workloads
from benchmarks.contenders import BASELINES, CONTENDERS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results"
KINDS = ("update", "profiles", "step", "swap")
# What "bytes moved" counts, per kind: the minimum traffic, the same for every contender of a group.
TRAFFIC = {
    "update": "read param + shadow, write shadow: 12 B/param fp32, 10 B/param bf16 (fp32 shadow)",
    "profiles": "K EMA profiles: read param once, read + write K shadows: 4 + 8K B/param fp32, 2 + 8K bf16",
    "step": "SGD reads param + grad and writes param; wrapper_step adds the update's traffic",
    "swap": "in and out each read and write param + shadow: 32 B/param fp32, 24 B/param bf16",
}
# The contender of each kind that the side-by-side table divides by.
# "profiles" rows are divided by the single-profile update: the K-profile time as a multiple of K=1's.
WRAPPERS = {"update": "wrapper_update", "profiles": "wrapper_update", "step": "wrapper_step", "swap": "wrapper_swap"}
# Workloads the snapshot-step measurement takes from the selection: one host-bound, one bandwidth-bound.
SNAPSHOT_WORKLOADS = ("small3", "resnet50")
# The sequential (pytest-benchmark) bf16 target of issue 9: no slow mode in any run.
SEQUENTIAL_BF16 = ("wrapper_update", "foreach_lerp", 1.25, ("resnet50",))
# Options for a run that only checks that everything works (the smoke test): one timed round each.
QUICK = ["--benchmark-min-rounds=1", "--benchmark-max-time=0", "--benchmark-warmup=off"]


def run_all(args: argparse.Namespace) -> dict:
    """Run the suite, the paired ratios and the launch host cost in subprocesses; their JSON, as
    ``{"suite": ..., "paired": ..., "launch_host": ...}``."""
    # Never time Triton's interpreter, whatever the calling shell (or test session) set.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if args.workloads:
        env["EMA_BENCH_WORKLOADS"] = args.workloads
    if args.dtypes:
        env["EMA_BENCH_DTYPES"] = args.dtypes
    if args.threads:
        env["EMA_BENCH_THREADS"] = str(args.threads)
    specs = workloads.selected(workloads.default_device(), args.workloads, args.dtypes)
    dtypes = ",".join(dict.fromkeys(dtype for _, dtype in specs))
    archs = list(dict.fromkeys(arch for arch, _ in specs))
    paired_archs = ",".join([a for a in archs if a in workloads.PAIRED_WORKLOADS] or archs[:1])
    with tempfile.TemporaryDirectory() as tmp:
        suite, paired, host = Path(tmp) / "suite.json", Path(tmp) / "paired.json", Path(tmp) / "host.json"
        snap = Path(tmp) / "snapshot.json"
        cmd = [sys.executable, "-m", "pytest", str(ROOT / "benchmarks"), "--benchmark-only", "-q"]
        cmd += [f"--benchmark-json={suite}", *(QUICK if args.quick else []), *args.pytest_args]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        cmd = [sys.executable, "-m", "benchmarks.paired", "--workloads", paired_archs, "--dtypes", dtypes]
        cmd += ["--rounds", "3" if args.quick else "21", "--json", str(paired)]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        # Its own process: it sets TRITON_INTERPRET=1 for CPU Triton groups, and stubs every launch.
        cmd = [sys.executable, "-m", "benchmarks.launch_host", "--workloads", paired_archs, "--dtypes", dtypes]
        subprocess.run([*cmd, "--json", str(host)], cwd=ROOT, env=env, check=True)
        snap_archs = ",".join([a for a in archs if a in SNAPSHOT_WORKLOADS] or archs[:1])
        cmd = [sys.executable, "-m", "benchmarks.snapshot_step", "--workloads", snap_archs, "--dtypes", "fp32"]
        cmd += ["--every", "3", "--snapshots", "2"] if args.quick else []
        # The snapshots' temporary directory goes under this run's own, removed with it.
        subprocess.run([*cmd, "--tmp-root", tmp, "--json", str(snap)], cwd=ROOT, env=env, check=True)
        return {
            "suite": json.loads(suite.read_text()),
            "paired": json.loads(paired.read_text()),
            "launch_host": json.loads(host.read_text()),
            "snapshot_step": json.loads(snap.read_text()),
        }


def rows(data: dict) -> list[dict]:
    """One flat record per benchmark that ran, from pytest-benchmark's JSON."""
    out = []
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        if "gbps" in info:
            out.append({**info, "median_ms": info["median_s"] * 1e3})
    return out


def _groups(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        groups[r["kind"], r["workload"]].append(r)
    # Kinds in a fixed order, workloads in the order they ran (a stable sort keeps it).
    return {key: groups[key] for key in sorted(groups, key=lambda k: KINDS.index(k[0]))}


def _kind_of(name: str) -> str:
    return next((c.kind for c in CONTENDERS if c.name == name), "step")


def _us(t: float) -> str:
    return f"{t * 1e6:,.1f}"


def render_targets(data: dict) -> list[str]:
    """Every target of the run in one table: the interleaved ratios, the hook count, the sequential bf16."""
    lines = [
        "## Targets",
        "",
        "Time ratios from the interleaved side-by-side runs below, except the last rows (pytest-benchmark, "
        "sequential). `step_overhead` is `wrapper_step - sgd_step` in the same round.",
        "",
        "| workload | ratio | bound | measured | met |",
        "|---|---|---|---|---|",
    ]
    for result in data["paired"]["results"]:
        for t in result["targets"]:
            met = "yes" if t["met"] else "NO"
            lines.append(f"| {result['workload']} | {t['ratio']} | {t['target']} | {t['measured']:.2f} | {met} |")
        for t in result.get("ratios", []):
            if "gpu_goal" in t:
                bound = f"GPU goal {t['gpu_goal']}"
                lines.append(f"| {result['workload']} | {t['ratio']} | {bound} | {t['measured']:.2f} | not judged |")
        hooks = result.get("step_hooks_per_step")
        if hooks is not None:
            met = "yes" if hooks == 1 else "NO"
            lines.append(f"| {result['workload']} | global step hooks per `wrapper.step()` | == 1 | {hooks} | {met} |")
    num, den, bound, archs = SEQUENTIAL_BF16
    by_key = {(r["workload"], r["contender"]): r for r in rows(data["suite"])}
    for (workload, name), r in by_key.items():
        if name != num or not workload.endswith("-bf16") or (workload, den) not in by_key:
            continue
        ratio = r["median_ms"] / by_key[workload, den]["median_ms"]
        target = workload.rsplit("-", 1)[0] in archs
        met = ("yes" if ratio <= bound else "NO") if target else "-"
        lines.append(
            f"| {workload} | {num} / {den}, sequential | {f'<= {bound}' if target else '-'} | {ratio:.2f} | {met} |"
        )
    return [*lines, ""]


def render_paired(paired: dict) -> list[str]:
    lines = [
        "## Side by side, interleaved",
        "",
        "Every contender called in turn each round, in rotating order, over the same parameters, so that "
        "load changing during the run hits all of them alike (`python -m benchmarks.paired`). A round of a "
        "contender is one call, or several in a row when one call takes under 2 ms (`calls`). Ratios are of "
        f"median times per call. Load average at the end: {paired['environment']['load']}.",
        "",
    ]
    for result in paired["results"]:
        medians = result["median_s"]
        calls = result.get("calls_per_round", {})
        size = f", {result['tensors']:,} tensors, {result['numel']:,} parameters" if "tensors" in result else ""
        lines += [f"### {result['workload']}, {result['rounds']} rounds{size}", ""]
        faults = result.get("page_faults") or {}
        gbps = result.get("gbps") or {}
        header = ["contender", "kind", "median us", "time / wrapper's", "GB/s", "calls"]
        header += ["page faults"] if faults else []
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        ordered = sorted(medians.items(), key=lambda kv: (KINDS.index(_kind_of(kv[0])), kv[1]))
        for name, t in ordered:
            kind = _kind_of(name)
            ours = medians.get(WRAPPERS[kind]) if name in calls else None
            cells = [f"`{name}`", kind if name in calls else "derived", _us(t), f"{t / ours:.2f}" if ours else "-"]
            cells += [f"{gbps[name]:.1f}" if name in gbps else "-", str(calls.get(name, "-"))]
            cells += [f"{faults[name]:.0f}" if name in faults else "-"] if faults else []
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "| ratio (time) | measured | target | met |", "|---|---|---|---|"]
        for r in result.get("ratios", result["targets"]):
            met = "-" if r["target"] is None else ("yes" if r["met"] else "NO")
            target = r["target"] or (f"GPU goal {r['gpu_goal']}" if "gpu_goal" in r else "-")
            lines.append(f"| {r['ratio']} | {r['measured']:.2f} | {target} | {met} |")
        if "step_hooks_per_step" in result:
            lines += [
                "",
                f"One `wrapper.step()` ran global optimizer step hooks {result['step_hooks_per_step']} time(s) "
                f"and showed {result['profiled_steps_per_step']} `Optimizer.step#` record(s) in `torch.profiler` "
                "(untimed).",
            ]
        lines.append("")
    return lines


def render_launch_host(host: dict) -> list[str]:
    lines = [
        "## Triton path: host cost with the launches stubbed",
        "",
        '`backend="triton"` groups of CPU tensors, every `@triton.jit` launch replaced by a stub that '
        "evaluates the grid and runs nothing (`python -m benchmarks.launch_host`): the Python a GPU step "
        "pays up to its launches, without the launches themselves (tens of us each on a GPU), the stream-"
        "capture check, or the counter's own CUDA launch. Single calls timed for 0.5 s; p10 is the fastest "
        "tenth, the figure least disturbed by other processes.",
        "",
        "| workload | tensors | update us (p10) | update us per tensor | launches | swap in+out us (p10) | launches |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in host["results"]:
        u, w = r["update"], r["swap"]
        lines.append(
            f"| {r['workload']} | {r['tensors']:,} | {_us(u['median_s'])} ({_us(u['p10_s'])}) | "
            f"{u['median_s'] * 1e6 / r['tensors']:.3f} | {u['launches_per_call']} | "
            f"{_us(w['median_s'])} ({_us(w['p10_s'])}) | {w['launches_per_call']} |"
        )
    return [*lines, ""]


def render_snapshot(snap: dict) -> list[str]:
    lines = [
        "## Snapshot steps",
        "",
        "`opt.step()` of SGD with `sigma_rel=(0.05, 0.10)` and `snapshot_every=N` into a temporary directory, "
        "every step timed alone (`python -m benchmarks.snapshot_step`). A snapshot step copies both profiles' "
        "shadows and queues them for the writer thread; the next step shares the machine with the write. The "
        "previous snapshot's write is waited for, untimed, before each snapshot step (`pending write`: 0 when "
        "the disk kept up with N). Issue 8's goal, a snapshot step at most 1.1x a median step, is stated for a "
        "GPU.",
        "",
        "| workload | N | snapshots | MB per snapshot | median step ms | snapshot step ms | snapshot / median "
        "| max / median | next step / median | pending write ms | final flush ms | page faults snapshot / other |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in snap["results"]:
        after = r["after_over_median"]
        lines.append(
            f"| {r['workload']} | {r['every']} | {r['snapshots']} | {r['bytes_per_snapshot'] / 1e6:.1f} | "
            f"{r['median_step_s'] * 1e3:.3f} | {r['median_snapshot_step_s'] * 1e3:.3f} | "
            f"{r['snapshot_over_median']:.2f} | {r['max_snapshot_over_median']:.2f} | "
            f"{'-' if after is None else f'{after:.2f}'} | {r['pending_write_s'] * 1e3:.1f} | "
            f"{r['flush_s'] * 1e3:.1f} | {r['page_faults_snapshot_step']:.0f} / {r['page_faults_plain_step']:.0f} |"
        )
    return [*lines, ""]


def render_markdown(data: dict) -> str:
    suite = data["suite"]
    env = suite["machine_info"]["triton_ema"]
    records = rows(suite)
    gpu = any("launches" in r for r in records)
    lines = [
        "# triton-ema benchmarks",
        "",
        f"- Device: {env['device']}",
        f"- torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}",
        f"- Date: {env['date']}; load average at the end of the suite: {env['load']}",
        f"- OpenMP wait policy: {env.get('omp_wait_policy', 'default')}",
        f"- Copy bandwidth (one large `copy_`, read + write, same run): {env['copy_gbps']:.1f} GB/s",
        "",
        "GB/s is bytes moved per call over the median time; bytes moved is the minimum traffic of the "
        "operation, the same for every contender of a table, so GB/s and speed compare times over equal work. "
        "`of copy` is GB/s over the copy bandwidth; `speed` is the baseline's median time over this one's. "
        "`first call` (compilation, autotuning, lazy allocation) and `setup` are never part of the median. "
        "`page faults` (CPU) are the minor faults of one steady-state call: fresh memory taken from the kernel.",
        "",
        *render_targets(data),
        *render_paired(data["paired"]),
        *(render_launch_host(data["launch_host"]) if "launch_host" in data else []),
        *(render_snapshot(data["snapshot_step"]) if "snapshot_step" in data else []),
    ]
    if gpu:
        lines += ["## GPU target: the wrapper's update at >= 0.90 of copy bandwidth", ""]
        for r in records:
            if r["contender"] == "wrapper_update":
                met = "yes" if r["fraction_of_copy"] >= 0.90 else "NO"
                lines.append(f"- {r['workload']}: {r['fraction_of_copy']:.2f} of copy: met: {met}")
        lines.append("")
    by_key = {(r["workload"], r["contender"]): r for r in records}
    for (kind, workload), group in _groups(records).items():
        # The baseline may sit in another kind's group of the same workload ("profiles" against K=1).
        baseline = by_key.get((workload, BASELINES[kind]))
        lines += [
            f"## {kind} {workload}",
            "",
            f"{group[0]['numel']:,} parameters; bytes moved: {TRAFFIC[kind]}.",
            "",
        ]
        header = ["contender", "median ms", "MB moved", "GB/s", "of copy", f"speed vs {BASELINES[kind]}"]
        header += ["launches", "kernels"] if gpu else ["page faults"]
        header += ["first call ms", "setup ms"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in sorted(group, key=lambda r: r["median_ms"]):
            speed = f"{baseline['median_ms'] / r['median_ms']:.2f}x" if baseline else "-"
            cells = [
                f"`{r['contender']}`",
                f"{r['median_ms']:.3f}",
                f"{r['bytes_moved'] / 1e6:.1f}",
                f"{r['gbps']:.1f}",
            ]
            cells += [f"{r['fraction_of_copy']:.2f}", speed]
            cells += [str(r.get("launches", "-")), str(r.get("kernels", "-"))] if gpu else [str(r["page_faults"])]
            cells += [f"{r['first_call_s'] * 1e3:.1f}", f"{r['setup_s'] * 1e3:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    """Horizontal bars of GB/s per contender, one panel per kind, the copy bandwidth as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    env = data["machine_info"]["triton_ema"]
    copy = env["copy_gbps"]
    legend = [
        Patch(color="tab:orange", label="EMAOptimizerWrapper"),
        Patch(color="tab:blue", label="baselines"),
        Line2D([], [], color="black", linestyle="--", linewidth=1, label=f"copy_ {copy:.0f} GB/s"),
    ]
    groups = _groups(rows(data))
    kinds = [k for k in KINDS if any(kind == k for kind, _ in groups)]
    heights = [sum(len(g) + 1 for (kind, _), g in groups.items() if kind == k) for k in kinds]
    fig, axes = plt.subplots(
        len(kinds), 1, figsize=(10, 1.5 + 0.28 * sum(heights)), gridspec_kw={"height_ratios": heights}, squeeze=False
    )
    for ax, kind in zip(axes[:, 0], kinds, strict=True):
        bars = []  # (y, label, GB/s, is ours)
        y = 0
        for (k, workload), group in groups.items():
            if k != kind:
                continue
            for r in sorted(group, key=lambda r: -r["gbps"]):
                bars.append((y, f"{workload}  {r['contender']}", r["gbps"], r["contender"].startswith("wrapper")))
                y += 1
            y += 1  # a gap between workloads
        ys, labels, values, ours = zip(*bars, strict=True)
        ax.barh(ys, values, color=["tab:orange" if o else "tab:blue" for o in ours])
        ax.set_yticks(ys, labels, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(copy, color="black", linestyle="--", linewidth=1)
        for t, v in zip(ys, values, strict=True):
            ax.text(v, t, f" {v:.1f} GB/s ({v / copy:.2f} of copy)", va="center", fontsize=7)
        ax.set_xlim(0, max(copy, *values) * 1.45)
        ax.set_xlabel("GB/s (minimum bytes moved / median time)")
        ax.set_title(f"{kind}: {TRAFFIC[kind]}", fontsize=9)
        top = ax.secondary_xaxis("top", functions=(lambda x: x / copy, lambda f: f * copy))
        top.set_xlabel("fraction of copy bandwidth", fontsize=8)
    fig.suptitle(f"triton-ema on {env['device']} - torch {env['torch']}, triton {env['triton']} - {env['date']}")
    # One legend for all panels, under the title, where it covers no bar.
    fig.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, 0.965), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _without_raw_timings(data: dict) -> dict:
    """``data`` without pytest-benchmark's per-round timings (``stats.data``): tens of MB for a full run, and
    nothing here reads them; the summary statistics and ``extra_info`` stay."""
    suite = data.get("suite")
    if not suite:
        return data
    benchmarks = [{**b, "stats": {k: v for k, v in b["stats"].items() if k != "data"}} for b in suite["benchmarks"]]
    return {**data, "suite": {**suite, "benchmarks": benchmarks}}


def write(data: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_without_raw_timings(data), indent=1))
    (out / "results.md").write_text(render_markdown(data))
    plot(data["suite"], out / "results.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", help="comma list (sets EMA_BENCH_WORKLOADS), e.g. resnet50,gpt2")
    parser.add_argument("--dtypes", help="comma list (sets EMA_BENCH_DTYPES): fp32,bf16")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where results.md and results.png go")
    parser.add_argument("--json", type=Path, help="render this results.json of a previous run instead of running")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (sets EMA_BENCH_THREADS)")
    parser.add_argument("--quick", action="store_true", help="one timed round per benchmark (smoke runs)")
    parser.add_argument("pytest_args", nargs="*", help="passed on to pytest (after --)")
    args = parser.parse_args(argv)

    data = run_all(args) if args.json is None else json.loads(args.json.read_text())
    write(data, args.out)
    print(f"wrote results.md, results.png and results.json to {args.out}")


if __name__ == "__main__":
    main()
