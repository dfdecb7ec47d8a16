"""Timing helpers: the copy-bandwidth ceiling, kernel-launch counts and the steady-state measurement."""

from __future__ import annotations

import datetime
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

# 256 MiB a buffer on CPU, 2 GiB on GPU: far above any last-level cache, and well above the L2 of a GPU.
_COPY_BYTES = {"cpu": 256 << 20, "cuda": 2 << 30}
# Calls before timing: compiled CUDA-graph trees record their graph on the second or third call.
WARMUP_CALLS = 3
# On GPU a timed round is several calls and one synchronize, so the ~10 us sync latency stays negligible.
_MIN_ROUND_S = 10e-3


def apply_threads() -> None:
    """Set torch's intra-op threads from ``EMA_BENCH_THREADS``, if set.

    On a CPU shared with other processes, a 2-thread op can wait at its OpenMP barrier for a descheduled
    thread: with 4 to 7 runnable processes on 2 cores, a ResNet-50 update measured 20x slower than on a
    quiet machine, and by different factors per contender. One thread per op keeps ratios meaningful there.
    """
    threads = os.environ.get("EMA_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(fn: Callable[[], None], device: torch.device) -> float:
    """Call ``fn`` until it is in steady state; returns the seconds of the first call, which pays for
    compilation, autotuning and lazy allocation."""
    start = time.perf_counter()
    fn()
    synchronize(device)
    first = time.perf_counter() - start
    for _ in range(WARMUP_CALLS):
        fn()
    synchronize(device)
    return first


def calls_per_round(fn: Callable[[], None], device: torch.device) -> int:
    """How many calls of ``fn`` (already warm) to time between two synchronizes: 1 on CPU."""
    if device.type != "cuda":
        return 1
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return max(1, round(_MIN_ROUND_S / (time.perf_counter() - start)))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict[str, str]:
    """What the report prints above the figures."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"
    return {
        "device": device_name(device),
        # CPU timings on a shared machine depend on what else runs: say how busy it was.
        "load": f"{load} (1, 5, 15 min) on {os.cpu_count()} CPUs",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 20) -> float:
    """GB/s of one large ``dst.copy_(src)``, counting the bytes read plus the bytes written."""
    n = (nbytes or _COPY_BYTES[device.type]) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    calls = calls_per_round(lambda: dst.copy_(src), device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            dst.copy_(src)
        synchronize(device)
        times.append((time.perf_counter() - start) / calls)
    return 2 * n * 4 / statistics.median(times) / 1e9


def count_launches(fn: Callable[[], None]) -> dict[str, int]:
    """Host-side launch calls and device-side kernels of one call, from ``torch.profiler`` (CUDA only).

    A replayed CUDA graph is one launch however many kernels it holds, hence both counts.
    """
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    launches = kernels = 0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            if not event.name.startswith(("Memcpy", "Memset")):
                kernels += 1
        elif "LaunchKernel" in event.name or event.name.startswith(("cudaGraphLaunch", "cuGraphLaunch")):
            launches += 1
    return {"launches": launches, "kernels": kernels}


def count_page_faults(fn: Callable[[], None]) -> int:
    """Minor page faults of one call (CPU): fresh allocations the allocator has to take from the kernel.

    A call that allocates large temporaries can fault on every page of them, each fault costing more than
    the memory traffic it precedes; this count is what tells that apart from a slow kernel.
    """
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def measure(
    benchmark,
    fn: Callable[[], None],
    *,
    device: torch.device,
    bytes_moved: int,
    copy_gbps: float,
    setup_s: float,
) -> None:
    """Time ``fn`` in steady state with pytest-benchmark and record bandwidth figures in ``extra_info``.

    The first call (autotuning, compilation, lazy allocation) is timed on its own and never enters the
    steady-state statistics.
    """
    info = benchmark.extra_info
    info["first_call_s"] = warm_up(fn, device)
    info["setup_s"] = setup_s
    if device.type == "cuda":
        info.update(count_launches(fn))
    else:
        info["page_faults"] = count_page_faults(fn)
    calls = calls_per_round(fn, device)

    def round_() -> None:
        for _ in range(calls):
            fn()
        synchronize(device)

    benchmark(round_)
    info.update(bytes_moved=bytes_moved, calls_per_round=calls, copy_gbps=copy_gbps)
    # benchmark.stats is None under --benchmark-disable, where the call above ran once, untimed.
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median / calls
        info["median_s"] = median
        info["gbps"] = bytes_moved / median / 1e9
        info["fraction_of_copy"] = info["gbps"] / copy_gbps


def step_hook_calls(step: Callable[[], None]) -> int:
    """How many times one ``step()`` runs a global optimizer step pre-hook (one per optimizer step taken).

    A wrapper whose ``step`` is itself a hooked ``Optimizer.step`` around the inner one runs them twice.
    """
    calls = 0

    def hook(optimizer, args, kwargs) -> None:
        nonlocal calls
        calls += 1

    handle = register_optimizer_step_pre_hook(hook)
    try:
        step()
    finally:
        handle.remove()
    return calls


def profiled_optimizer_steps(step: Callable[[], None]) -> int:
    """``Optimizer.step#...`` records that ``torch.profiler`` shows for one ``step()``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for e in prof.events() if e.name.startswith("Optimizer.step#"))
