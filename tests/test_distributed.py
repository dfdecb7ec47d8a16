"""CPU processes (gloo): FSDP2 (``fully_shard``) and DDP models match a single-process run, and so does a run
resumed from a torch.distributed.checkpoint saved on two FSDP2 ranks and loaded on one or three; EMA snapshots
written shard by shard on two FSDP2 ranks reconstruct (post hoc) exactly what one process's snapshots do.

Each rank trains on its half of every batch; gradients are averaged, so the sharded or replicated EMA must
equal the EMA of one process that sees whole batches. Inside each worker the checks that need the live
process group run (shard-local swap, state dict round trip); rank 0 writes its gathered tensors for the
comparison with the single-process reference, which this process computes.
"""

from __future__ import annotations

import io
import os
import random
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from triton_ema import EMAOptimizerWrapper, posthoc
from triton_ema.snapshot import read_index

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

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
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _exit_before_finalization()


def _exit_before_finalization() -> None:
    """End a worker that succeeded without running the interpreter's finalization.

    destroy_process_group() does not stop gloo's threads: ProcessGroupGloo has no shutdown() in this torch (the
    Backend default does nothing), and the process-group objects stay referenced after it, so every worker still
    runs its ``pt_gloo_runloop`` and ``gloo_tcp_loop`` threads when it returns. If one of them takes the GIL while
    Python finalizes (releasing a finished collective's tensors), CPython < 3.14 ends it with pthread_exit, whose unwind
    through a noexcept destructor aborts the process: "terminate called without an active exception", SIGABRT.
    Every rank has passed the barrier after its last collective and written its results, so nothing is lost.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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


def launch(target, nprocs: int, args: tuple, what: str) -> None:
    """Run ``target(rank, *args)`` in ``nprocs`` fresh processes; a worker's exception fails the test."""
    ctx = mp.start_processes(target, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    # join() raises with the worker's traceback as soon as one fails (and terminates the others).
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{what} workers did not finish within {TIMEOUT_S} s")


def run_workers(kind: str, seed: int, tmp_path: Path) -> dict:
    out = tmp_path / f"{kind}.pt"
    # A file store: no TCP port to pick, so parallel test runs cannot collide.
    init_file = tmp_path / "store"
    launch(_worker, WORLD_SIZE, (kind, seed, str(init_file), str(out)), kind)
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


# torch.distributed.checkpoint: save on two FSDP2 ranks, load on one (an unsharded model) and on three (FSDP2),
# continue, and compare with one process that trained without interruption.
DCP_STEPS = (4, 3)  # steps before the checkpoint, steps after it
DCP_BATCH = 6


def dcp_data(seed: int, steps: int = sum(DCP_STEPS)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed + 2)
    shapes = ((DCP_BATCH, 5), (DCP_BATCH, 1))
    return [tuple(torch.randn(s, generator=g) for s in shapes) for _ in range(steps)]


def dcp_distribute(model: nn.Module, world: int, mesh: DeviceMesh | None = None) -> nn.Module:
    """FSDP2 with gradients summed, never divided, over ranks (one process keeps the plain module).

    Only rank 0 back-propagates the loss (the others a zero loss, so that FSDP2's collectives still run), so
    the sum is rank 0's whole-batch gradient exactly: the sharded run is then bit-identical to one process,
    and any difference the comparison finds comes from the checkpoint, not from rounding in a reduction.
    """
    if world == 1:
        return model
    from torch.distributed.fsdp import FSDPModule

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    model = fully_shard(model, mesh=mesh)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    return model


def dcp_step(model: nn.Module, opt: EMAOptimizerWrapper, x: torch.Tensor, y: torch.Tensor, rank: int) -> None:
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    (loss if rank == 0 else 0 * loss).backward()
    opt.step()


def gathered(model: nn.Module, opt: EMAOptimizerWrapper) -> dict:
    """Whole tensors (every rank takes part in the gathers) and the step count."""
    return {
        "num_steps": opt.num_steps,
        "params": [full(p).detach().clone() for p in model.parameters()],
        "ema": [full(s).clone() for s in opt.ema_params()],
    }


def dcp_save(rank: int, world: int, seed: int, ckpt: str, group) -> dict:
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.device_mesh import DeviceMesh

    model = dcp_distribute(make_model(seed), world, DeviceMesh.from_group(group, "cpu"))
    opt = make_optimizer(model)
    for x, y in dcp_data(seed)[: DCP_STEPS[0]]:
        dcp_step(model, opt, x, y, rank)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    assert opt.num_steps == DCP_STEPS[0], "reading the state dict of a trained wrapper changes nothing"
    dcp.save(state, checkpoint_id=ckpt, process_group=group)
    return gathered(model, opt)


def dcp_resume(rank: int, world: int, seed: int, ckpt: str) -> dict:
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    before, _ = DCP_STEPS
    # Other initial weights, so that everything the run continues from must come from the checkpoint.
    model = dcp_distribute(make_model(seed + 100), world)
    opt = make_optimizer(model)
    initial = snapshot(model.parameters())
    # On a fresh wrapper the helper initialises the optimizer state with a step at zero gradients and zero
    # learning rate: that is no training step, so the EMA must not count it.
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    assert opt.num_steps == 0, f"rank {rank}: the state-initialising step counted as an EMA step"
    assert_equal(snapshot(model.parameters()), initial, f"rank {rank}: parameters after the init step")
    assert_equal(snapshot(opt.ema_params()), initial, f"rank {rank}: EMA after the init step")
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    assert opt.num_steps == before, f"rank {rank}: the step count must be restored exactly"
    for x, y in dcp_data(seed)[before:]:
        dcp_step(model, opt, x, y, rank)
    return gathered(model, opt)


def _dcp_worker(rank: int, world: int, seed: int, init_file: str, tmp: str) -> None:
    """Save on the first WORLD_SIZE ranks, then load on all ``world`` of them; then the first WORLD_SIZE ranks
    train with snapshots (:func:`snapshot_run`). One launch, as processes are slow to start on a small machine. A
    failure of the load or of the snapshot run is written down for the tests to report."""
    from torch.distributed.device_mesh import DeviceMesh

    tmp_dir = Path(tmp)
    timeout = timedelta(seconds=TIMEOUT_S // 2)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timeout)
    try:
        save_group = dist.new_group(list(range(WORLD_SIZE)))
        if rank < WORLD_SIZE:
            saved = dcp_save(rank, WORLD_SIZE, seed, str(tmp_dir / "ckpt"), save_group)
            if rank == 0:
                torch.save(saved, tmp_dir / "saved.pt")
        dist.barrier()
        try:
            resumed = dcp_resume(rank, world, seed, str(tmp_dir / "ckpt"))
            if rank == 0:
                torch.save(resumed, tmp_dir / f"resumed-{world}.pt")
        except Exception:
            (tmp_dir / f"resume-error-{rank}.txt").write_text(traceback.format_exc())
        if rank < WORLD_SIZE:
            try:
                mesh = DeviceMesh.from_group(save_group, "cpu")
                got = snapshot_run(rank, WORLD_SIZE, seed, tmp_dir / "snapshots-fsdp2", mesh)
                torch.save(got, tmp_dir / f"snapshot-{rank}.pt")
            except Exception:
                (tmp_dir / f"snapshot-error-{rank}.txt").write_text(traceback.format_exc())
        try:
            snapshot_resharded_run(rank, world, seed, tmp_dir, save_group)
        except Exception:
            (tmp_dir / f"resharded-error-{rank}.txt").write_text(traceback.format_exc())
        # Rank 2 is done long before the snapshot run: no rank tears down while another still communicates.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _exit_before_finalization()


def dcp_reference(seed: int, steps: int) -> dict:
    batches = dcp_data(seed)
    model = make_model(seed)
    opt = make_optimizer(model)
    for x, y in batches[:steps]:
        dcp_step(model, opt, x, y, 0)
    return gathered(model, opt)


def assert_same_run(got: dict, expected: dict, what: str) -> None:
    assert got["num_steps"] == expected["num_steps"], what
    assert_equal(got["params"], expected["params"], f"{what}: parameters")
    assert_equal(got["ema"], expected["ema"], f"{what}: EMA")


DCP_LOAD_WORLD = 3


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    """One launch of three gloo processes (see :func:`_dcp_worker`) and the seed it used.

    Two FSDP2 ranks save a DCP checkpoint after DCP_STEPS[0] steps and three load it and go on training; then
    the two train with snapshots. The folder holds ``ckpt``, ``saved.pt``, ``resumed-3.pt``, ``snapshot-{rank}.pt``
    and ``snapshots-fsdp2/`` (or the tracebacks of what failed).
    """
    if fully_shard is None:
        pytest.skip("needs torch.distributed.fsdp.fully_shard (torch >= 2.6)")
    seed = random.SystemRandom().randrange(2**31)
    tmp = tmp_path_factory.mktemp("fsdp2")
    with pytest.MonkeyPatch.context() as env:
        # Gloo picks a network interface from the hostname, which need not resolve in a sandbox.
        env.setenv("GLOO_SOCKET_IFNAME", os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
        args = (DCP_LOAD_WORLD, seed, str(tmp / "store"), str(tmp))
        launch(_dcp_worker, DCP_LOAD_WORLD, args, "dcp save and load, snapshots")
    return tmp, seed


# DCP's note that it loads in one process, which is the point of the unsharded case.
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled, unavailable or uninitialized")
@pytest.mark.parametrize("world", [1, DCP_LOAD_WORLD], ids=["load-on-1-unsharded", "load-on-3-fsdp2"])
def test_dcp_checkpoint_reshards_and_resumes_bit_exactly(fsdp2_run, world, request):
    tmp, seed = fsdp2_run
    request.node.user_properties.append(("seed", seed))
    before, after = DCP_STEPS
    # The save itself: two sharded ranks trained exactly like one process.
    assert_same_run(torch.load(tmp / "saved.pt", weights_only=False), dcp_reference(seed, before), "at the save")
    if world == 1:
        # An unsharded model in this process, with no process group at all: DCP reassembles the shards.
        got = dcp_resume(0, 1, seed, str(tmp / "ckpt"))
    else:
        errors = sorted(tmp.glob("resume-error-*.txt"))
        if errors:
            pytest.fail(f"loading on {world} ranks failed; {errors[0].stem}:\n{errors[0].read_text()}")
        got = torch.load(tmp / f"resumed-{world}.pt", weights_only=False)
    assert_same_run(got, dcp_reference(seed, before + after), f"resumed on {world}")


def test_dcp_init_step_is_no_ema_step_for_a_stateless_optimizer_behind_wrappers(seed):
    """Plain SGD keeps no state, so the helpers re-run their zero-gradient step on every call, also mid-training;
    it must never count, with an LR scheduler's step counter and a step hook around the wrapper's step."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    batches = dcp_data(seed)
    model = make_model(seed)
    opt = EMAOptimizerWrapper(torch.optim.SGD(model.parameters(), lr=0.1), **EMA_CONFIG)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    # A hook puts one more frame between the helper and the wrapper's step, as the scheduler's counter does.
    opt.register_step_pre_hook(lambda o, args, kwargs: None)
    for x, y in batches[:2]:
        get_optimizer_state_dict(model, opt)
        dcp_step(model, opt, x, y, 0)
        sched.step()
        opt.zero_grad(set_to_none=True)  # no gradients: the helper steps again on its next call
    assert not opt.state, "SGD without momentum keeps no state"
    trained, ema = snapshot(model.parameters()), snapshot(opt.ema_params())
    osd = get_optimizer_state_dict(model, opt)
    assert opt.num_steps == 2
    assert_equal(snapshot(model.parameters()), trained, "parameters after the init step")
    assert_equal(snapshot(opt.ema_params()), ema, "EMA after the init step")
    assert {g["ema"]["step"] for g in osd["param_groups"]} == {2}
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2), "the helper restores the learning rate"


# Post-hoc EMA snapshots with FSDP2: each rank writes its shards of every profile and its own index; the shards
# assembled from the index's placements must reconstruct what one process's snapshots do, bit for bit. They do
# because every element goes through the same operations in the same order: dcp_distribute makes the sharded
# run's gradients, hence its parameters and shadows, bit-identical to one process's; every rank's index lists the
# same (t, gamma) snapshots, so the float64 solve gives the same coefficients; and reconstruct accumulates
# elementwise (out += x_i * c_i, one snapshot after another in step order), which no shard boundary changes.
SNAPSHOT_STEPS = 8
SNAPSHOT_EVERY = 2
SNAPSHOT_SIGMAS = (0.05, 0.10)
POSTHOC_SIGMA = 0.15


def snapshot_run(rank: int, world: int, seed: int, directory: Path, mesh: DeviceMesh | None = None) -> dict:
    """Train with two power-function profiles and snapshots; the shadows, names and parameters as this rank holds
    them (``local``) and gathered (``full``)."""
    model = dcp_distribute(make_model(seed), world, mesh)
    opt = EMAOptimizerWrapper(
        torch.optim.AdamW(model.named_parameters(), lr=0.05),
        sigma_rel=SNAPSHOT_SIGMAS,
        snapshot_every=SNAPSHOT_EVERY,
        snapshot_dir=directory,
    )
    for x, y in dcp_data(seed, SNAPSHOT_STEPS):
        dcp_step(model, opt, x, y, rank)
    opt.flush()
    assert opt.num_steps == SNAPSHOT_STEPS
    named = list(model.named_parameters())
    if world > 1:
        from torch.distributed.tensor import DTensor, Shard

        for n, p in named:
            assert isinstance(p, DTensor) and p.placements == (Shard(0),), f"{n}: {p.placements}"
    profiles = range(len(SNAPSHOT_SIGMAS))
    return {
        "names": [n for n, _ in named],
        "local_params": {n: local(p).detach().clone() for n, p in named},
        "full_params": {n: full(p).detach().clone() for n, p in named},
        "local_ema": [[local(s).clone() for s in opt.ema_params(profile=k)] for k in profiles],
        "full_ema": [[full(s).clone() for s in opt.ema_params(profile=k)] for k in profiles],
    }


def test_fsdp2_snapshots_reconstruct_exactly_like_one_process(fsdp2_run, tmp_path, request):
    from safetensors.torch import load_file

    tmp, seed = fsdp2_run
    request.node.user_properties.append(("seed", seed))
    errors = sorted(tmp.glob("snapshot-error-*.txt"))
    if errors:
        pytest.fail(f"the FSDP2 snapshot run failed; {errors[0].stem}:\n{errors[0].read_text()}")
    ranks = [torch.load(tmp / f"snapshot-{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    sharded = tmp / "snapshots-fsdp2"
    single_dir = tmp_path / "snapshots-single"
    single = snapshot_run(0, 1, seed, single_dir)
    names = single["names"]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias"], "named_parameters() names the snapshots"

    # The sharded run trained exactly like one process, every profile included.
    for r, got in enumerate(ranks):
        assert got["names"] == names
        assert_equal(list(got["full_params"].values()), list(single["full_params"].values()), f"rank {r}: params")
        for k in range(len(SNAPSHOT_SIGMAS)):
            assert_equal(got["full_ema"][k], single["full_ema"][k], f"rank {r}: profile {k} gathered")

    # Each rank wrote its own index and files, the files holding its local shards where the index says they sit.
    assert sorted(p.name for p in sharded.glob("index-r*.jsonl")) == [f"index-r{r}.jsonl" for r in range(WORLD_SIZE)]
    indexes = read_index(sharded)
    (single_entries,) = read_index(single_dir).values()

    def when(e: dict) -> tuple:
        return (e["step"], e["t"], e["gamma"], e["sigma_rel"], e["profile"])

    expected_steps = list(range(SNAPSHOT_EVERY, SNAPSHOT_STEPS + 1, SNAPSHOT_EVERY))
    assert sorted({e["step"] for e in single_entries}) == expected_steps
    assert len(single_entries) == len(expected_steps) * len(SNAPSHOT_SIGMAS)
    offsets: dict[int, dict[str, int]] = {}
    for r, got in enumerate(ranks):
        entries = indexes[r]
        assert sorted(map(when, entries)) == sorted(map(when, single_entries)), f"rank {r}: snapshot set"
        offsets[r] = {}
        for e in entries:
            assert e["file"].endswith(f"-r{r}.safetensors") and e["rank"] == r
            assert list(e["tensors"]) == names
            for n in names:
                place, piece = e["shards"][n], got["local_params"][n]
                whole = single["full_params"][n]
                assert e["tensors"][n]["shape"] == list(piece.shape), f"rank {r}: {n} stored as the local shard"
                assert place["dim"] == 0 and place["global_shape"] == list(whole.shape), f"rank {r}: {n}: {place}"
                assert_equal([whole.narrow(0, place["offset"], piece.shape[0])], [piece], f"rank {r}: {n} placed")
                offsets[r][n] = place["offset"]
        # The last snapshot is the final shadow of each profile, shard by shard.
        for k in range(len(SNAPSHOT_SIGMAS)):
            (last,) = [e for e in entries if e["step"] == SNAPSHOT_STEPS and e["profile"] == k]
            stored = load_file(str(sharded / last["file"]))
            assert_equal([stored[n] for n in names], got["local_ema"][k], f"rank {r}: last snapshot of profile {k}")

    expected = posthoc.reconstruct(single_dir, sigma_rel=POSTHOC_SIGMA)
    got = posthoc.reconstruct(sharded, sigma_rel=POSTHOC_SIGMA)
    assert list(got) == list(expected) == names
    assert_equal(list(got.values()), list(expected.values()), "gathered reconstruction")
    # Per rank (rank=r returns the local shards): the same rows of the same reconstruction.
    for r in range(WORLD_SIZE):
        mine = posthoc.reconstruct(sharded, sigma_rel=POSTHOC_SIGMA, rank=r)
        for n in names:
            rows = ranks[r]["local_params"][n].shape[0]
            assert_equal([mine[n]], [expected[n].narrow(0, offsets[r][n], rows)], f"rank {r}: {n} reconstructed")
    # A reconstruction that is neither tracked profile, so that the comparison above is one of new tensors.
    for k in range(len(SNAPSHOT_SIGMAS)):
        assert not torch.equal(expected["0.weight"], single["full_ema"][k][0])


# Snapshots across a resume on another number of ranks (issue 14): two FSDP2 ranks train with snapshots and save a
# DCP checkpoint, three resume it into the same snapshot directory (snapshot_resume=True) and go on. Every snapshot,
# before and after the resume, is assembled from the ranks that wrote it, and the reconstruction is bit-exact against
# one process's run of all the steps.
RESHARD_STEPS = (4, 4)


def _snapshot_wrapper(model: nn.Module, directory: Path, resume: bool = False) -> EMAOptimizerWrapper:
    return EMAOptimizerWrapper(
        torch.optim.AdamW(model.named_parameters(), lr=0.05),
        sigma_rel=SNAPSHOT_SIGMAS,
        snapshot_every=SNAPSHOT_EVERY,
        snapshot_dir=directory,
        snapshot_resume=resume,
    )


def snapshot_resharded_run(rank: int, world: int, seed: int, tmp_dir: Path, save_group) -> None:
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import DeviceMesh

    directory, ckpt = tmp_dir / "snapshots-resharded", str(tmp_dir / "ckpt-resharded")
    batches = dcp_data(seed, sum(RESHARD_STEPS))
    if rank < WORLD_SIZE:
        model = dcp_distribute(make_model(seed), WORLD_SIZE, DeviceMesh.from_group(save_group, "cpu"))
        opt = _snapshot_wrapper(model, directory)
        for x, y in batches[: RESHARD_STEPS[0]]:
            dcp_step(model, opt, x, y, rank)
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.save(state, checkpoint_id=ckpt, process_group=save_group)
        opt.close()
    dist.barrier()
    model = dcp_distribute(make_model(seed + 100), world)
    opt = _snapshot_wrapper(model, directory, resume=True)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    for x, y in batches[RESHARD_STEPS[0] :]:
        dcp_step(model, opt, x, y, rank)
    opt.close()


def test_fsdp2_snapshots_resumed_on_three_ranks_reconstruct_exactly(fsdp2_run, tmp_path, request):
    from triton_ema.snapshot_index import read_indexes

    tmp, seed = fsdp2_run
    request.node.user_properties.append(("seed", seed))
    errors = sorted(tmp.glob("resharded-error-*.txt"))
    if errors:
        pytest.fail(f"the resharded snapshot run failed; {errors[0].stem}:\n{errors[0].read_text()}")
    single_dir = tmp_path / "single"
    model = make_model(seed)
    opt = _snapshot_wrapper(model, single_dir)
    for x, y in dcp_data(seed, sum(RESHARD_STEPS)):
        dcp_step(model, opt, x, y, 0)
    opt.close()
    sharded = tmp / "snapshots-resharded"
    indexes = read_indexes(sharded)
    assert sorted(indexes) == [0, 1, 2]
    steps = {r: sorted({e["step"] for e in index.live()}) for r, index in indexes.items()}
    assert steps == {0: [2, 4, 6, 8], 1: [2, 4, 6, 8], 2: [6, 8]}, "two ranks before the resume, three after"
    assert len({index.run for index in indexes.values()}) == 1, "one run id on every rank"
    for step in (None, 4, 6):
        expected = posthoc.reconstruct(single_dir, sigma_rel=POSTHOC_SIGMA, step=step)
        got = posthoc.reconstruct(sharded, sigma_rel=POSTHOC_SIGMA, step=step)
        assert list(got) == list(expected)
        assert_equal(list(got.values()), list(expected.values()), f"reconstruction at step {step}")
