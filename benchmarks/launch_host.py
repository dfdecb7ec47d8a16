"""Host cost of the Triton path, measured on the CPU with the kernel launches stubbed (in this process only).

On a GPU, ``opt.update_ema()`` on the Triton path is Python up to the launch: the schedule, the counter,
the group walk, the table check, the launch arguments, the grid. For a model of a few small tensors, or of
thousands, that host time can exceed the kernel's. This measures it on any machine: the CPU tensors go
into ``backend="triton"`` groups (which needs ``TRITON_INTERPRET=1``, set here before Triton is imported),
and every ``TableKernel`` of the package gets a stand-in for its ``@triton.jit`` kernel and its autotuner
whose ``kernel[grid](**kwargs)`` evaluates the grid and launches nothing. ``TableKernel`` takes its GPU
branch (config chosen once per key, then launched directly), as on a GPU. The interpreter never runs: a
call that reached a real kernel would take seconds and is refused.

Not included: the launch itself (a Triton launch from Python costs tens of us on a GPU), and on a GPU the
stream-capture check and the counter increment's CUDA launch (here a CPU op).

    python -m benchmarks.launch_host [--workloads small3,resnet50,many5k] [--dtypes fp32,bf16] [--json FILE]
"""

from __future__ import annotations

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    raise SystemExit("benchmarks.launch_host must be imported before triton: it sets TRITON_INTERPRET=1")
# Only so that CPU tensors may form Triton groups; the stubs below keep the interpreter from running.
os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

from benchmarks import harness, workloads  # noqa: E402
from benchmarks.contenders import DECAY, LR  # noqa: E402
from triton_ema import EMAOptimizerWrapper  # noqa: E402
from triton_ema.kernels import launch  # noqa: E402

DEFAULT_WORKLOADS = "small3,resnet50,many5k"
# The config the stubbed autotuner "chooses": any valid one, the grid is evaluated with it.
_CONFIG = triton.Config({"BLOCK": 1024, "ENTRIES_PER_PROGRAM": 4}, num_warps=4)


class StubKernel:
    """Stands in for a ``@triton.jit`` kernel or its autotuned twin: ``kernel[grid](**kwargs)`` evaluates
    the grid with the launch's meta-parameters, counts the launch, and runs nothing."""

    def __init__(self) -> None:
        self.launches = 0
        self.best_config = _CONFIG

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch_(**kwargs: Any) -> None:
            meta = {**kwargs, **_CONFIG.all_kwargs()}
            grid(meta) if callable(grid) else grid
            self.launches += 1

        return launch_


def stub_launches() -> list[StubKernel]:
    """Replace the jit kernel and the autotuner of every ``TableKernel`` of the package; returns the stubs."""
    from triton_ema.kernels import ema_update, swap

    stubs = []
    for module in (ema_update, swap):
        for obj in vars(module).values():
            if isinstance(obj, launch.TableKernel):
                stub = StubKernel()
                obj.kernel = stub
                obj.make_autotuner = lambda configs, stub=stub: stub
                stubs.append(stub)
    if not stubs:
        raise RuntimeError("no TableKernel found in triton_ema.kernels: the stubs would not be used")
    # The GPU branch of TableKernel.__call__ (config per key, then a direct launch), as on a GPU.
    launch.interpreting = lambda: False
    return stubs


def _times(fn: Callable[[], None], min_time_s: float = 0.5, max_calls: int = 20_000) -> list[float]:
    """Seconds of single calls of ``fn``, for about ``min_time_s``, sorted."""
    fn()
    times: list[float] = []
    deadline = time.perf_counter() + min_time_s
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < max_calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)


def measure(arch: str, dtype: str, stubs: list[StubKernel]) -> dict:
    workload = workloads.make_workload(arch, dtype, "cpu")
    opt = EMAOptimizerWrapper(torch.optim.SGD(workload.params, lr=LR), decay=DECAY, warmup=None, backend="triton")

    def swap() -> None:
        with opt.ema_weights():
            pass

    out = {"workload": workload.label, "tensors": len(workload.params), "numel": workload.numel}
    for name, fn in (("update", opt.update_ema), ("swap", swap)):
        start = time.perf_counter()
        fn()  # the first call builds the tables and "tunes" (on the stubs)
        first = time.perf_counter() - start
        if first > 5.0:
            raise RuntimeError(f"{name} took {first:.1f} s: a real (interpreted) kernel ran")
        before = sum(s.launches for s in stubs)
        fn()
        launches = sum(s.launches for s in stubs) - before
        if launches == 0:
            raise RuntimeError(f"{name} launched no stubbed kernel: it did not take the Triton path")
        times = _times(fn)
        out[name] = {
            "median_s": statistics.median(times),
            # The machine is shared: the fastest tenth is the figure least disturbed by other processes.
            "p10_s": times[len(times) // 10],
            "calls": len(times),
            "launches_per_call": launches,
            "first_call_s": first,
        }
    return out


def run(archs: list[str], dtypes: list[str]) -> dict:
    harness.apply_threads()
    stubs = stub_launches()
    results = [measure(arch, dtype, stubs) for arch in archs for dtype in dtypes]
    return {"environment": harness.environment(torch.device("cpu")), "results": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=DEFAULT_WORKLOADS)
    parser.add_argument("--dtypes", default=workloads.DEFAULT_DTYPES)
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    specs = workloads.selected("cpu", args.workloads, args.dtypes)
    data = run(list(dict.fromkeys(a for a, _ in specs)), list(dict.fromkeys(d for _, d in specs)))
    if args.json:
        args.json.write_text(json.dumps(data, indent=1))
    for r in data["results"]:
        cells = [
            f"{k} {r[k]['median_s'] * 1e6:.1f} us ({r[k]['launches_per_call']} launches)" for k in ("update", "swap")
        ]
        print(f"{r['workload']} ({r['tensors']} tensors): " + ", ".join(cells))


if __name__ == "__main__":
    main()
