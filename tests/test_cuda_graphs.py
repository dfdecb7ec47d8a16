"""A whole training step, EMA update included, captured in a CUDA graph and replayed, matches eager steps.

The Triton path reads the step counter from device memory and evaluates the decay schedule in the kernel, so
one captured launch serves every later step: warmup schedules, ``update_after_step`` and ``update_every``
included. The torch path computes the decay on the host, and a captured graph keeps the decay of the step it
was captured at: the wrapper refuses to capture it with a changing decay, and it is tested with a constant
one. The step count lives on the device for every CUDA group, so it advances with replays on both paths.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from triton_ema import EMAOptimizerWrapper

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

WARMUP_STEPS = 3  # eager steps on a side stream before capture: Adam's state, kernel tables, autotuning
REPLAYS = 7

CONFIGS = [
    pytest.param("auto", {"decay": 0.9}, id="triton-constant"),
    pytest.param("auto", {"decay": 0.99, "warmup": "litema"}, id="triton-litema"),
    pytest.param(
        "auto",
        {"decay": 0.999, "warmup": "power", "update_after_step": 4, "update_every": 2},
        id="triton-power-after4-every2",
    ),
    pytest.param("torch", {"decay": 0.9, "warmup": None}, id="torch-constant"),
    pytest.param("auto", {"decay": (0.9, 0.99), "warmup": "litema"}, id="triton-two-decays"),
    pytest.param("auto", {"sigma_rel": (0.05, 0.10), "update_every": 2}, id="triton-two-sigma-rel-every2"),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def build(backend: str, config: dict, dtype: torch.dtype) -> tuple[nn.Module, EMAOptimizerWrapper]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 1023), nn.GELU(), nn.Linear(1023, 8))
    model = model.to(device="cuda", dtype=dtype)
    adam = torch.optim.Adam(model.parameters(), lr=1e-2, capturable=True)
    return model, EMAOptimizerWrapper(adam, backend=backend, **config)


def train_step(model: nn.Module, opt: EMAOptimizerWrapper, x: torch.Tensor, y: torch.Tensor) -> None:
    nn.functional.mse_loss(model(x).float(), y).backward()
    opt.step()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("backend", "config"), CONFIGS)
def test_captured_step_matches_eager(backend, config, dtype):
    g = torch.Generator(device="cuda").manual_seed(1)
    data = [
        (torch.randn(16, 32, device="cuda", generator=g).to(dtype), torch.randn(16, 8, device="cuda", generator=g))
        for _ in range(WARMUP_STEPS + REPLAYS)
    ]
    graphed, g_opt = build(backend, config, dtype)
    eager, e_opt = build(backend, config, dtype)
    static_x, static_y = data[0][0].clone(), data[0][1].clone()

    # Warm up on a side stream, as torch.cuda.graph requires; the eager copy takes the same steps.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in data[:WARMUP_STEPS]:
            static_x.copy_(x)
            static_y.copy_(y)
            g_opt.zero_grad(set_to_none=True)
            train_step(graphed, g_opt, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    for x, y in data[:WARMUP_STEPS]:
        e_opt.zero_grad(set_to_none=True)
        train_step(eager, e_opt, x, y)

    # Capture one whole step: forward, backward, the inner Adam step and the EMA update. Capturing runs
    # nothing, so both copies are still at WARMUP_STEPS. Gradients set to None here are allocated in the
    # graph's pool by the captured backward and overwritten (not accumulated) by every replay.
    g_opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(graphed, g_opt, static_x, static_y)
    assert g_opt.num_steps == WARMUP_STEPS

    for i, (x, y) in enumerate(data[WARMUP_STEPS:], start=WARMUP_STEPS + 1):
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        e_opt.zero_grad(set_to_none=True)
        train_step(eager, e_opt, x, y)
        # The count lives on the device and advances with every replay, so checkpoints stay right.
        assert g_opt.num_steps == e_opt.num_steps == i

    torch.cuda.synchronize()
    torch.testing.assert_close(list(graphed.parameters()), list(eager.parameters()))
    for k in range(len(g_opt.profiles)):
        torch.testing.assert_close(g_opt.ema_params(profile=k), e_opt.ema_params(profile=k))
    assert all(s.dtype == torch.float32 for s in g_opt.ema_params())
    assert g_opt.state_dict()["param_groups"][0]["ema"]["step"] == WARMUP_STEPS + REPLAYS

    probe = data[0][0]
    with torch.no_grad(), g_opt.ema_weights(), e_opt.ema_weights():
        torch.testing.assert_close(graphed(probe), eager(probe))


def test_replays_keep_updating_the_ema():
    """Guards the test above against a vacuous pass: the replayed EMA moves, and not like the weights."""
    model, opt = build("auto", {"decay": 0.9, "warmup": "litema"}, torch.float32)
    x, y = torch.randn(16, 32, device="cuda"), torch.randn(16, 8, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_STEPS):
            opt.zero_grad(set_to_none=True)
            train_step(model, opt, x, y)
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(model, opt, x, y)

    before = [s.clone() for s in opt.ema_params()]
    graph.replay()
    after = [s.clone() for s in opt.ema_params()]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    assert any(not torch.equal(a, p) for a, p in zip(after, model.parameters()))
