"""The EMA where users look for it: ``find_ema`` through accelerate and Lightning, ``ema_state_dict`` keyed like the
model (through torch.compile, DDP and FSDP2), ``save_ema`` as a safetensors file a fresh model loads strictly."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import triton_ema
from triton_ema import EMAOptimizerWrapper, find_ema


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).to(torch.bfloat16)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 4, dtype=torch.bfloat16)).float().pow(2).mean().backward()
        opt.step()


def test_find_ema_through_accelerate_and_lightning():
    from accelerate import Accelerator
    from lightning.pytorch.core.optimizer import LightningOptimizer

    model = make_model()
    opt = EMAOptimizerWrapper(torch.optim.SGD(model.parameters(), lr=0.1), model=model)
    _, prepared = Accelerator(cpu=True).prepare(model, opt)
    assert type(prepared).__name__ == "AcceleratedOptimizer"
    assert find_ema(prepared) is opt and find_ema(opt) is opt
    assert find_ema(LightningOptimizer(opt)) is opt
    with pytest.raises(TypeError, match="SGD"):
        find_ema(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="LightningSGD wrapping SGD"):
        find_ema(LightningOptimizer(torch.optim.SGD(model.parameters(), lr=0.1)))
    with pytest.raises(TypeError, match="int"):
        find_ema(3)


def test_ema_state_dict_is_keyed_like_the_model_through_compile(seed):
    model = make_model()
    compiled = torch.compile(model)  # the wrapper, never run: only its names matter here
    opt = EMAOptimizerWrapper(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.5, warmup=None, model=compiled)
    train(model, opt)
    expected = model.state_dict()
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    for sd in (opt.ema_state_dict(), opt.ema_state_dict(model=compiled), opt.ema_state_dict(model=model)):
        assert list(sd) == list(expected)
        emas = dict(zip([n for n, _ in model.named_parameters()], opt.ema_params()))
        emas.update(zip([n for n, _ in model.named_buffers()], opt.ema_buffers()))
        for k, v in sd.items():
            assert v.dtype == expected[k].dtype and not v.requires_grad
            torch.testing.assert_close(v, emas[k].to(v.dtype), rtol=0, atol=0)
        assert not torch.equal(sd["0.weight"], expected["0.weight"]), "tracked tensors give the EMA"
    # An untracked parameter gives the model's own value.
    partial = EMAOptimizerWrapper(torch.optim.SGD(model[0].parameters(), lr=0.1), buffers=[], model=model)
    train(model, partial)
    sd = partial.ema_state_dict()
    assert torch.equal(sd["3.weight"], model[3].weight.detach())
    assert torch.equal(sd["1.running_mean"], model[1].running_mean)
    with opt.ema_weights():
        inside = opt.ema_state_dict()
    assert torch.equal(inside["0.weight"], opt.ema_params()[0].to(torch.bfloat16)), "copies, not the live model"
    with pytest.raises(ValueError, match="needs the model"):
        EMAOptimizerWrapper(torch.optim.SGD(model.parameters(), lr=0.1)).ema_state_dict()


def test_save_ema_loads_strictly_into_a_fresh_gpt2(seed, tmp_path):
    """Tied weights (GPT-2's lm_head and wte) are written under both names, as model.state_dict() holds them."""
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=32, n_positions=16)
    model = GPT2LMHeadModel(config)
    opt = EMAOptimizerWrapper(torch.optim.AdamW(model.parameters(), lr=1e-2), decay=0.5, model=model)
    for _ in range(3):
        opt.zero_grad()
        ids = torch.randint(0, 32, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    opt.save_ema(tmp_path / "ema.safetensors")
    opt.save_ema(tmp_path / "ema16.safetensors", dtype=torch.float16)
    fresh = GPT2LMHeadModel(config)
    fresh.load_state_dict(load_file(tmp_path / "ema.safetensors"), strict=True)
    expected = opt.ema_state_dict()
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, expected[k]), k
    half = load_file(tmp_path / "ema16.safetensors")
    assert half["transformer.wte.weight"].dtype == torch.float16
    assert not (tmp_path / "ema.safetensors.tmp").exists()


# FSDP2 and DDP on gloo: every rank calls ema_state_dict and save_ema; rank 0 checks the file.
def _export_worker(rank: int, init_file: str, out: str) -> None:
    from safetensors.torch import load_file
    from test_distributed import WORLD_SIZE, dcp_data, fully_shard, make_model
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint import save as dcp_save

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=45)
    )
    try:
        out = Path(out)
        model = make_model(0)
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        opt = EMAOptimizerWrapper(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.5, model=model)
        for x, y in dcp_data(0, steps=3):
            opt.zero_grad()
            nn.functional.mse_loss(model(x[rank::2]), y[rank::2]).backward()
            opt.step()
        sd = opt.ema_state_dict()
        assert list(sd) == list(model.state_dict())
        assert all(type(v).__name__ == "DTensor" for v in sd.values())
        full = {k: v.full_tensor() for k, v in sd.items()}
        dcp_save(sd, checkpoint_id=str(out / "dcp"))
        back = {k: torch.zeros_like(v) for k, v in sd.items()}
        dcp_load(back, checkpoint_id=str(out / "dcp"))
        for k in sd:
            assert torch.equal(back[k].to_local(), sd[k].to_local()), k
        # save_ema holds one gathered tensor at a time: each earlier one is gone when the next is gathered.
        import weakref

        from torch.distributed.tensor import DTensor

        gathered, full_tensor = [], DTensor.full_tensor

        def watched(self, *args, **kwargs):
            assert all(ref() is None for ref in gathered), "an earlier full tensor is still alive"
            t = full_tensor(self, *args, **kwargs)
            gathered.append(weakref.ref(t))
            return t

        DTensor.full_tensor = watched
        try:
            opt.save_ema(out / "ema.safetensors")
        finally:
            DTensor.full_tensor = full_tensor
        assert len(gathered) == len(sd)
        ddp = nn.parallel.DistributedDataParallel(make_model(0))
        ddp_opt = EMAOptimizerWrapper(torch.optim.SGD(ddp.parameters(), lr=0.1), model=ddp)
        assert list(ddp_opt.ema_state_dict()) == list(make_model(0).state_dict())
        if rank == 0:
            fresh = make_model(1)
            fresh.load_state_dict(load_file(out / "ema.safetensors"), strict=True)
            for k, v in fresh.state_dict().items():
                assert torch.equal(v, full[k]), k
            assert not torch.equal(fresh[0].weight, make_model(0)[0].weight), "the EMA, not the initial weights"
    finally:
        dist.destroy_process_group()


def test_fsdp2_ema_state_dict_is_dtensors_and_save_ema_writes_the_full_model(tmp_path):
    from test_distributed import WORLD_SIZE, fully_shard, launch

    if not dist.is_available() or not dist.is_gloo_available() or fully_shard is None:
        pytest.skip("needs torch.distributed with gloo and fully_shard")
    launch(_export_worker, WORLD_SIZE, (str(tmp_path / "store"), str(tmp_path)), "export")
    assert (tmp_path / "ema.safetensors").exists()


def test_public_api():
    assert {"find_ema", "strip_ema"} <= set(triton_ema.__all__)
