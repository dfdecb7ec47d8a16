"""Every contender of a kind (EMA update, K EMA profiles, optimizer step, EMA-weight swap) over the same
parameters.

One pytest-benchmark group per kind and workload, e.g. ``update resnet50-fp32`` or ``profiles resnet50-fp32``.
On GPU a timed round is ``extra_info["calls_per_round"]`` calls and one synchronize, so pytest-benchmark's own
table shows rounds; the figures in ``extra_info`` (``median_s``, ``gbps``, ``fraction_of_copy``) are per call
everywhere.
"""

from __future__ import annotations

import gc
import time

import pytest
import torch

from benchmarks import harness
from benchmarks.contenders import CONTENDERS, DECAY, Contender
from benchmarks.workloads import Workload


@pytest.mark.parametrize("contender", CONTENDERS, ids=lambda c: c.name)
def test_ema(benchmark, workload: Workload, contender: Contender, copy_gbps: float) -> None:
    device = workload.device
    reason = contender.unavailable(device)
    if reason:
        pytest.skip(reason)
    benchmark.group = f"{contender.kind} {workload.label}"
    benchmark.extra_info.update(
        kind=contender.kind, workload=workload.label, contender=contender.name, numel=workload.numel
    )
    start = time.perf_counter()
    impl, fn = contender.build(workload.params, DECAY)
    harness.synchronize(device)
    try:
        harness.measure(
            benchmark,
            fn,
            device=device,
            bytes_moved=contender.bytes_moved(workload.numel, workload.param_size),
            copy_gbps=copy_gbps,
            setup_s=time.perf_counter() - start,
        )
    finally:
        del impl, fn
        if device.type == "cuda":
            # Compiled CUDA-graph trees keep their inputs and memory pool alive; with 1.3B parameters two
            # contenders' leftovers would not fit beside the next one.
            torch._dynamo.reset()
            gc.collect()
            torch.cuda.empty_cache()
