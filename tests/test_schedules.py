"""Property tests of the schedules and of the update, against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference64 import Ema64, decay64, tol

from triton_ema import EMAOptimizerWrapper, Schedule
from triton_ema.kernels import interpreting


@st.composite
def schedules(draw) -> dict:
    decay = draw(st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.9, 0.999, 0.9999, 0.99999, 1.0])))
    return {
        "decay": decay,
        "warmup": draw(st.sampled_from([None, "litema", "power"])),
        "warmup_gamma": draw(st.floats(0.1, 10.0)),
        "warmup_power": draw(st.floats(0.1, 2.0)),
        "min_decay": draw(st.floats(0.0, decay)),
        "update_after_step": draw(st.integers(0, 20)),
        "update_every": draw(st.integers(1, 5)),
    }


def reference_kwargs(config: dict) -> dict:
    names = {"warmup_gamma": "gamma", "warmup_power": "power", "update_after_step": "after", "update_every": "every"}
    return {names.get(k, k): v for k, v in config.items()}


@given(config=schedules(), t=st.integers(1, 10**7))
def test_weight_matches_reference(config, t):
    w = Schedule(**config).weight(t)
    d = decay64(t, **reference_kwargs(config))
    if d is None:
        assert w is None
    else:
        assert 0.0 <= w <= 1.0
        # The schedule's form avoids the cancellation the reference's 1 - d suffers; both agree within it.
        assert abs(w - (1.0 - d)) <= 1e-12 + 1e-9 * w


@pytest.mark.parametrize(
    "backend",
    ["torch", pytest.param("triton", marks=pytest.mark.skipif(not interpreting(), reason="needs the interpreter"))],
)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=schedules(), steps=st.integers(1, 12), sizes=st.lists(st.integers(1, 2000), min_size=1, max_size=4))
def test_update_matches_reference(backend, config, steps, sizes):
    params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    opt = EMAOptimizerWrapper(torch.optim.SGD(params, lr=0.1), backend=backend, **config)
    ref = Ema64(params, **reference_kwargs(config))
    for _ in range(steps):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        opt.update_ema()
        ref.step(params)
    for s, r in zip(opt.ema_params(), ref.shadows):
        torch.testing.assert_close(s.double(), r, **tol(torch.float32))
