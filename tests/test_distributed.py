"""Two CPU processes (gloo): FSDP2 (``fully_shard``) and DDP models match a single-process run.

Each rank trains on its half of every batch; gradients are averaged, so the sharded or replicated EMA must
equal the EMA of one process that sees whole batches. Inside each worker the checks that need the live
process group run (shard-local swap, state dict round trip); rank 0 writes its gathered tensors for the
comparison with the single-process reference, which this process computes.
"""

from __future__ import annotations

import io
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from triton_ema import EMAOptimizerWrapper

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6 has FSDP2 under a private name only
    fully_shard = None

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)

WORLD_SIZE = 2
STEPS = 6
BATCH = 8  # split in two halves, one per rank
TIMEOUT_S = 90
EMA_CONFIG = {"decay": 0.8, "warmup": "litema"}


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    # Output sizes 7 and 1 shard unevenly over two ranks (4 + 3 rows, 1 + 0 rows): rank 1 holds an empty
    # shard of the last layer.
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1))


def make_data(seed: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(BATCH, 5, generator=g), torch.randn(BATCH, 1, generator=g)) for _ in range(STEPS + 1)]
    probe = torch.randn(3, 5, generator=g)
    return batches, probe


def make_optimizer(model: nn.Module) -> EMAOptimizerWrapper:
    return EMAOptimizerWrapper(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **EMA_CONFIG)


def train_step(model: nn.Module, opt: EMAOptimizerWrapper, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def snapshot(tensors) -> list[torch.Tensor]:
    return [local(t).detach().clone() for t in tensors]


def assert_equal(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, rtol=0, atol=0, msg=lambda m, i=i: f"{what}[{i}]: {m}")


def distribute(kind: str, model: nn.Module) -> nn.Module:
    if kind == "fsdp2":
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        return fully_shard(model)
    return nn.parallel.DistributedDataParallel(model)


def _worker(rank: int, kind: str, seed: int, init_file: str, out: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=TIMEOUT_S // 2),
    )
    try:
        _check(rank, kind, seed, Path(out))
    finally:
        dist.destroy_process_group()


def _check(rank: int, kind: str, seed: int, out: Path) -> None:
    batches, probe = make_data(seed)
    model = distribute(kind, make_model(seed))
    opt = make_optimizer(model)
    params = list(model.parameters())
    for x, y in batches[:STEPS]:
        train_step(model, opt, x.chunk(WORLD_SIZE)[rank], y.chunk(WORLD_SIZE)[rank])
    assert opt.num_steps == STEPS

    ema = opt.ema_params()
    if kind == "fsdp2":
        from torch.distributed.tensor import DTensor

        for p, s in zip(params, ema):
            assert isinstance(p, DTensor) and isinstance(s, DTensor), "FSDP2 parameters and their EMA are DTensors"
            assert s.placements == p.placements and s.shape == p.shape
            assert local(s).shape == local(p).shape, "the shadow of a shard is a shard of the same size"
    trained, averaged = snapshot(params), snapshot(ema)

    # The swap works shard by shard: each rank's local parameter holds its local EMA, and a forward pass
    # (FSDP2 all-gathers from those shards) computes with the averaged weights.
    with torch.no_grad(), opt.ema_weights():
        assert_equal(snapshot(params), averaged, f"rank {rank}: parameters inside ema_weights()")
        ema_out = model(probe)
    assert_equal(snapshot(params), trained, f"rank {rank}: parameters after ema_weights()")
    with torch.no_grad():
        raw_out = model(probe)

    result = {
        "num_steps": opt.num_steps,
        "params": [full(p).detach().clone() for p in params],
        "ema": [full(s).clone() for s in opt.ema_params()],
        "ema_out": ema_out,
        "raw_out": raw_out,
    }
    if kind == "ddp":
        # Replicas must agree bit for bit, not only closely: compare with rank 0's copy.
        for s in result["ema"]:
            reference = s.clone()
            dist.broadcast(reference, src=0)
            torch.testing.assert_close(s, reference, rtol=0, atol=0)

    # State dict round trip through bytes, into a model and wrapper that start from other weights; then both
    # take the same step and must stay identical.
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    model2 = distribute(kind, make_model(seed + 100))
    opt2 = make_optimizer(model2)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.num_steps == STEPS
    assert_equal(snapshot(opt2.ema_params()), averaged, f"rank {rank}: EMA after load_state_dict")
    x, y = batches[STEPS]
    for m, o in ((model, opt), (model2, opt2)):
        train_step(m, o, x.chunk(WORLD_SIZE)[rank], y.chunk(WORLD_SIZE)[rank])
    assert_equal(snapshot(model2.parameters()), snapshot(model.parameters()), f"rank {rank}: params after resume")
    assert_equal(snapshot(opt2.ema_params()), snapshot(opt.ema_params()), f"rank {rank}: EMA after resume")

    if rank == 0:
        torch.save(result, out)


def run_workers(kind: str, seed: int, tmp_path: Path) -> dict:
    out = tmp_path / f"{kind}.pt"
    # A file store: no TCP port to pick, so parallel test runs cannot collide.
    init_file = tmp_path / "store"
    ctx = mp.start_processes(
        _worker,
        args=(kind, seed, str(init_file), str(out)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    # join() raises with the worker's traceback as soon as one fails (and terminates the other).
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{kind} workers did not finish within {TIMEOUT_S} s")
    return torch.load(out, weights_only=False)


def single_process_reference(seed: int) -> dict:
    batches, probe = make_data(seed)
    model = make_model(seed)
    opt = make_optimizer(model)
    for x, y in batches[:STEPS]:
        train_step(model, opt, x, y)
    with torch.no_grad():
        raw_out = model(probe)
        with opt.ema_weights():
            ema_out = model(probe)
    return {
        "num_steps": opt.num_steps,
        "params": [p.detach().clone() for p in model.parameters()],
        "ema": [s.clone() for s in opt.ema_params()],
        "ema_out": ema_out,
        "raw_out": raw_out,
    }


@pytest.mark.parametrize("kind", ["fsdp2", "ddp"])
def test_distributed_ema_matches_single_process(kind, seed, tmp_path, monkeypatch):
    if kind == "fsdp2" and fully_shard is None:
        pytest.skip("needs torch.distributed.fsdp.fully_shard (torch >= 2.6)")
    # Gloo picks a network interface from the hostname, which need not resolve in a sandbox.
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    got = run_workers(kind, seed, tmp_path)
    expected = single_process_reference(seed)

    assert got["num_steps"] == expected["num_steps"] == STEPS
    # Averaging gradients over ranks rounds differently from one whole-batch mean: close, not equal.
    tight = {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(got["params"], expected["params"], **tight)
    torch.testing.assert_close(got["ema"], expected["ema"], **tight)
    torch.testing.assert_close(got["ema_out"], expected["ema_out"], **tight)
    torch.testing.assert_close(got["raw_out"], expected["raw_out"], **tight)
    assert not torch.allclose(got["ema_out"], got["raw_out"]), "the EMA must differ from the weights to test a swap"
