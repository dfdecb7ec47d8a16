"""torch.compile (inductor, CPU): compiled models see the in-place swap; the wrapper steps compiled models."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from triton_ema import EMAOptimizerWrapper

pytestmark = [
    pytest.mark.skipif(not hasattr(torch, "compile"), reason="needs torch.compile"),
    # Raised inside inductor's own imports; nothing this package calls.
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

STEPS = 4


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # Compiled code and recompile counters must not leak from one test into the next.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def no_recompile() -> contextlib.AbstractContextManager:
    """Fail if the swap made dynamo recompile: a swap that changes guards would recompile every evaluation."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("fail_on_recompile") if set_stance is not None else contextlib.nullcontext()


def make_model() -> nn.Module:
    # BatchNorm: its running statistics are buffers, swapped with the parameters when passed as buffers=.
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def make_opt(model: nn.Module) -> EMAOptimizerWrapper:
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return EMAOptimizerWrapper(sgd, decay=0.7, warmup="litema", buffers=model.buffers())


def train(forward, model: nn.Module, opt: EMAOptimizerWrapper, data: list[torch.Tensor]) -> None:
    model.train()
    for x in data:
        opt.zero_grad()
        forward(x).pow(2).mean().backward()
        opt.step()


def ema_copy(model: nn.Module, opt: EMAOptimizerWrapper) -> nn.Module:
    """An eager copy of ``model`` that holds the EMA weights and buffers for good."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p, s in zip(ref.parameters(), opt.ema_params()):
            p.copy_(s)
        for b, s in zip(ref.buffers(), opt.ema_buffers()):
            b.copy_(s)
    return ref


def test_compiled_model_sees_swapped_weights(seed):
    model = make_model()
    opt = make_opt(model)
    train(model, model, opt, [torch.randn(8, 6) for _ in range(STEPS)])
    reference = ema_copy(model, opt).eval()

    compiled = torch.compile(model, backend="inductor")
    model.eval()
    x = torch.randn(5, 6)
    with torch.no_grad():
        trained_out = compiled(x)
        with no_recompile():
            with opt.ema_weights():
                ema_out = compiled(x)
            after_out = compiled(x)
        expected = reference(x)

    # Inductor fuses differently from eager: close, not bit-equal, to an eager model holding the shadows.
    torch.testing.assert_close(ema_out, expected)
    assert not torch.allclose(ema_out, trained_out), "the EMA must differ from the weights to test a swap"
    # The same compiled code on the same weights: the swap back restored them bit for bit.
    torch.testing.assert_close(after_out, trained_out, rtol=0, atol=0)


def test_wrapper_steps_a_compiled_model(seed):
    eager = make_model()
    model = copy.deepcopy(eager)
    eager_opt, opt = make_opt(eager), make_opt(model)
    data = [torch.randn(8, 6) for _ in range(STEPS)]

    train(eager, eager, eager_opt, data)
    train(torch.compile(model, backend="inductor"), model, opt, data)

    assert opt.num_steps == eager_opt.num_steps == STEPS
    torch.testing.assert_close(list(model.parameters()), list(eager.parameters()))
    torch.testing.assert_close(opt.ema_params(), eager_opt.ema_params())
    torch.testing.assert_close(opt.ema_buffers(), eager_opt.ema_buffers())


def test_compiled_training_step_including_wrapper_step(seed):
    eager = make_model()
    model = copy.deepcopy(eager)
    eager_opt, opt = make_opt(eager), make_opt(model)
    data = [torch.randn(8, 6) for _ in range(STEPS)]

    def step(m: nn.Module, o: EMAOptimizerWrapper, x: torch.Tensor) -> None:
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()

    compiled_step = torch.compile(step, backend="inductor")
    eager.train()
    model.train()
    for x in data:
        step(eager, eager_opt, x)
        compiled_step(model, opt, x)

    torch.testing.assert_close(list(model.parameters()), list(eager.parameters()))
    assert opt.num_steps == eager_opt.num_steps == STEPS
    torch.testing.assert_close(opt.ema_params(), eager_opt.ema_params())
