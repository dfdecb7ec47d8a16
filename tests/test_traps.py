"""Silent traps become warnings (once per wrapper), and the adversarial pass's findings outside the snapshot code."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from triton_ema import EMAOptimizerWrapper, strip_ema


def step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(4, 3)).pow(2).mean().backward()
    opt.step()


def caught(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fn()
    return [str(x.message) for x in w if issubclass(x.category, UserWarning)]


def test_ema_weights_before_any_update_warns_once():
    model = nn.Linear(3, 2)
    opt = EMAOptimizerWrapper(torch.optim.SGD(model.parameters(), lr=0.1), model=model)

    def enter():
        with opt.ema_weights():
            pass

    assert any("before any EMA update" in m for m in caught(enter))
    assert not caught(enter), "once per wrapper"
    step(model, opt)
    other = EMAOptimizerWrapper(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    step(model, other)

    def enter_other():
        with other.ema_weights():
            pass

    assert not caught(enter_other)


def test_inner_optimizer_stepped_without_the_ema_warns_once():
    model = nn.Linear(3, 2)
    opt = EMAOptimizerWrapper(torch.optim.Adam(model.parameters(), lr=0.1), decay=0.5)
    # Through the wrapper, and the documented manual mode (inner step, then update_ema): no warning.
    assert not caught(lambda: [step(model, opt) for _ in range(3)])

    def manual():
        for _ in range(3):
            step(model, opt.optimizer)
            opt.update_ema()

    assert not caught(manual)
    messages = caught(lambda: [step(model, opt.optimizer) for _ in range(3)])
    assert len(messages) == 1 and "stepped twice without an EMA update" in messages[0]
    assert not caught(lambda: [step(model, opt.optimizer) for _ in range(3)]), "once per wrapper"


def test_loaded_schedule_replacing_the_codes_warns_naming_both():
    model = nn.Linear(3, 2)
    saved = EMAOptimizerWrapper(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.9, warmup="litema")
    step(model, saved)
    opt = EMAOptimizerWrapper(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.999)
    messages = caught(lambda: opt.load_state_dict(saved.state_dict()))
    assert len(messages) == 1 and "0.9" in messages[0] and "0.999" in messages[0] and "litema" in messages[0]
    assert opt.schedule.decay == 0.9
    same = EMAOptimizerWrapper(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.9, warmup="litema")
    assert not caught(lambda: same.load_state_dict(saved.state_dict()))


def test_strip_ema_and_a_stale_ema_behind_a_plain_optimizer(seed):
    model = nn.Linear(3, 2)
    opt = EMAOptimizerWrapper(torch.optim.Adam(model.parameters(), lr=0.1), decay=0.5)
    for _ in range(2):
        step(model, opt)
    sd = copy.deepcopy(opt.state_dict())  # as torch.save and torch.load give it, not the live tensors
    plain_sd = strip_ema(sd)
    assert "ema_shadow" in sd["state"][0] and "ema" in sd["param_groups"][0], "the input is left alone"
    assert all("ema_shadow" not in e for e in plain_sd["state"].values())
    assert all("ema" not in g for g in plain_sd["param_groups"])
    plain = torch.optim.Adam(model.parameters(), lr=0.1)
    plain.load_state_dict(plain_sd)
    assert set(plain.state[model.weight]) == {"step", "exp_avg", "exp_avg_sq"}
    # A plain optimizer that loads the whole state dict carries the EMA along, stale, into its next save.
    careless = torch.optim.Adam(model.parameters(), lr=0.1)
    careless.load_state_dict(copy.deepcopy(sd))
    for _ in range(3):
        step(model, careless)
    fresh = EMAOptimizerWrapper(torch.optim.Adam(model.parameters(), lr=0.1), decay=0.5)
    messages = caught(lambda: fresh.load_state_dict(careless.state_dict()))
    assert any("older than the optimizer state" in m and "strip_ema" in m for m in messages), messages
    # The wrapper's own state dict, and one of a wrapper made around an already trained optimizer, are not stale.
    assert not caught(
        lambda: EMAOptimizerWrapper(torch.optim.Adam(model.parameters(), lr=0.1), decay=0.5).load_state_dict(sd)
    )
    late = EMAOptimizerWrapper(careless, decay=0.5)
    step(model, late)
    assert not caught(
        lambda: EMAOptimizerWrapper(torch.optim.Adam(model.parameters(), lr=0.1), decay=0.5).load_state_dict(
            late.state_dict()
        )
    )
    with pytest.raises(ValueError, match="optimizer state dict"):
        strip_ema({"param_groups": []})
