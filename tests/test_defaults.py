"""The constructor's defaults: an EMA that moves within a short run, the literal decay in help(), buffers that
follow the model."""

from __future__ import annotations

import inspect
import pydoc
import re

import pytest
import torch
from torch import nn

from triton_ema import EMAOptimizerWrapper


def ramp_covered(steps: int = 1000, **kwargs) -> float:
    """How far the EMA has followed a parameter ramping from 0 to 1 over ``steps`` steps (float64)."""
    p = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = EMAOptimizerWrapper(torch.optim.SGD([p], lr=0.0), **kwargs)
    for t in range(1, steps + 1):
        with torch.no_grad():
            p.fill_(t / steps)
        opt.step()
    return opt.ema_params()[0].item()


def test_defaults_cover_most_of_a_1000_step_ramp():
    assert ramp_covered() >= 0.8
    # What the old default (a constant 0.9999) gave, and what warmup=None still gives when asked for.
    assert ramp_covered(warmup=None) < 0.1


def test_help_shows_the_literal_decay_and_sigma_rel_still_refuses_a_decay():
    sig = inspect.signature(EMAOptimizerWrapper)
    assert sig.parameters["decay"].default == 0.9999 and sig.parameters["warmup"].default == "power"
    assert re.search(r"\(optimizer: [^,]*, decay: [^=]*= 0\.9999, ", pydoc.render_doc(EMAOptimizerWrapper))
    params = [nn.Parameter(torch.ones(3))]
    for kwargs in ({"decay": 0.99}, {"decay": (0.9, 0.99)}, {"warmup": None}, {"warmup": "litema"}):
        with pytest.raises(ValueError, match="not both"):
            EMAOptimizerWrapper(torch.optim.SGD(params, lr=0.1), sigma_rel=0.1, **kwargs)
    EMAOptimizerWrapper(torch.optim.SGD(params, lr=0.1), sigma_rel=0.1)


def test_model_buffers_are_tracked_by_default(seed):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    opt = EMAOptimizerWrapper(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.5, warmup=None, model=model)
    bn = model[1]
    expected = bn.running_mean.double().clone()
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4) + 3).sum().backward()
        opt.step()
        expected = 0.5 * expected + 0.5 * bn.running_mean.double()
    mean, _, count = (b.clone() for b in opt.ema_buffers())
    torch.testing.assert_close(mean.double(), expected, rtol=1e-6, atol=1e-6)
    assert count.dtype == torch.int64 and int(count) == 3, "integer buffers are copied"
    with opt.ema_weights():
        assert torch.equal(bn.running_mean, mean)
    none = EMAOptimizerWrapper(torch.optim.SGD(model.parameters(), lr=0.1), model=model, buffers=[])
    assert none.ema_buffers() == []
    some = EMAOptimizerWrapper(torch.optim.SGD(model.parameters(), lr=0.1), model=model, buffers=[bn.running_var])
    assert len(some.ema_buffers()) == 1
