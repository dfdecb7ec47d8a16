"""Workload selection and the copy-bandwidth ceiling shared by every benchmark of a run.

Workloads are chosen with environment variables (comma lists), read at collection:
``EMA_BENCH_WORKLOADS`` (default ``workloads.DEFAULT_WORKLOADS``), ``EMA_BENCH_DTYPES`` (default
``fp32,bf16``), ``EMA_BENCH_DEVICE`` (default ``cuda`` when available) and ``EMA_BENCH_THREADS`` (torch's
intra-op threads; default torch's own).
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks import harness, workloads

_COPY_GBPS = pytest.StashKey[float]()
harness.apply_threads()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "workload" in metafunc.fixturenames:
        device = workloads.default_device()
        specs = workloads.selected(device)
        # Module scope: each parameter set is built once and shared by every contender, one at a time.
        metafunc.parametrize(
            "workload",
            [(arch, dtype, device) for arch, dtype in specs],
            ids=[f"{arch}-{dtype}" for arch, dtype in specs],
            indirect=True,
            scope="module",
        )


@pytest.fixture(scope="session", autouse=True)
def _no_interpreter() -> None:
    # Interpreter timings say nothing about the kernels, and would be reported as if they did.
    if os.environ.get("TRITON_INTERPRET"):
        pytest.exit("TRITON_INTERPRET is set: unset it to benchmark the compiled kernels.", returncode=4)


@pytest.fixture(scope="module")
def workload(request: pytest.FixtureRequest) -> workloads.Workload:
    arch, dtype, device = request.param
    return workloads.make_workload(arch, dtype, device)


@pytest.fixture(scope="session")
def copy_gbps(pytestconfig: pytest.Config) -> float:
    """The device's copy bandwidth, measured once at the start of the run."""
    gbps = harness.copy_bandwidth(torch.device(workloads.default_device()))
    pytestconfig.stash[_COPY_GBPS] = gbps
    return gbps


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    device = torch.device(workloads.default_device())
    machine_info["triton_ema"] = {**harness.environment(device), "copy_gbps": config.stash.get(_COPY_GBPS, None)}
