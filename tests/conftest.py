"""Test set-up: Triton's interpreter on machines without CUDA, fresh random data every run."""

from __future__ import annotations

import os
import random

import torch

# The interpreter must be chosen before triton is first imported; with CUDA the
# kernels run for real instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from triton_ema.kernels import interpreting, launch  # noqa: E402
from triton_ema.kernels.launch import CONFIGS  # noqa: E402


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """A fresh seed per test, printed on failure so a run can be replayed."""
    value = random.SystemRandom().randrange(2**31)
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    return value


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> None:
    if call.when == "call" and call.excinfo is not None:
        for name, value in item.user_properties:
            if name == "seed":
                item.add_report_section("call", "seed", f"torch.manual_seed({value})")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _interpreter_stays_on() -> None:
    """Without CUDA every kernel test runs in the interpreter: fail loudly if anything switched it off."""
    if not torch.cuda.is_available():
        assert interpreting(), "TRITON_INTERPRET was removed from this session's environment"


@pytest.fixture(
    params=CONFIGS,
    ids=[f"b{c.kwargs['BLOCK']}-e{c.kwargs['ENTRIES_PER_PROGRAM']}-w{c.num_warps}" for c in CONFIGS],
)
def forced_config(request, monkeypatch):
    """Every launch in the test uses this autotune config, in the interpreter and on a GPU."""
    c = request.param
    if interpreting() and c.num_warps != CONFIGS[0].num_warps:
        # The interpreter runs a program as whole-block numpy ops, whatever num_warps says.
        pytest.skip(f"the interpreter launches num_warps={c.num_warps} exactly like num_warps={CONFIGS[0].num_warps}")
    monkeypatch.setattr(launch, "FORCED_CONFIG", c.all_kwargs())
    return c


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps its state in process-wide singletons: start and leave each test with none."""
    state = pytest.importorskip("accelerate.state")
    state.AcceleratorState._reset_state(True)
    state.GradientState._reset_state()
    yield
    state.AcceleratorState._reset_state(True)
    state.GradientState._reset_state()
