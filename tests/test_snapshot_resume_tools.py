"""Post-hoc EMA snapshots resumed through the real tools (issue 14): accelerate's prepare + save_state/load_state,
transformers' Trainer(resume_from_checkpoint=...), Lightning's fit(ckpt_path=...) and test(ckpt_path="best").

Each run is interrupted, resumed in a fresh model and wrapper (``snapshot_resume=True``) and must end in the same
reconstruction as the uninterrupted run, bit for bit, with every file written before still on disk.
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from triton_ema import EMAOptimizerWrapper, posthoc  # noqa: E402
from triton_ema.snapshot_index import read_indexes  # noqa: E402

SIGMAS = (0.05, 0.10)
TARGETS = [0.07, 0.13]


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.glob("ema-*.safetensors")}


def assert_same_reconstruction(got_dir: Path, want_dir: Path) -> None:
    got, want = posthoc.reconstruct_many(got_dir, TARGETS), posthoc.reconstruct_many(want_dir, TARGETS)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for n in w:
            assert torch.equal(g[n], w[n]), n


def assert_kept(directory: Path, before: dict[str, bytes]) -> None:
    now = files(directory)
    for name, data in before.items():
        assert now.get(name) == data, f"{name} was deleted or rewritten"


def test_accelerate_save_state_and_load_state(tmp_path, fresh_accelerate_state):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(step)
        return torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)

    def run(directory: Path, steps: range, resume_from: Path | None = None, save_at: int | None = None) -> None:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        opt = EMAOptimizerWrapper(
            torch.optim.AdamW(model.named_parameters(), lr=0.05),
            sigma_rel=SIGMAS,
            snapshot_every=2,
            snapshot_dir=directory,
            snapshot_resume=resume_from is not None,
        )
        accelerator = Accelerator(cpu=True)
        model, p_opt = accelerator.prepare(model, opt)  # round-trips the optimizer's state dict at step 0
        if resume_from is not None:
            accelerator.load_state(str(resume_from))
        for step in steps:
            x, y = batch(step)
            p_opt.zero_grad()
            accelerator.backward(nn.functional.mse_loss(model(x), y))
            p_opt.step()
            if step == save_at:
                accelerator.save_state(str(tmp_path / "ckpt"))
        opt.close()

    run(tmp_path / "straight", range(1, 11))
    run(tmp_path / "resumed", range(1, 8), save_at=5)  # checkpoint at 5, snapshots at 6 then a crash
    before = files(tmp_path / "resumed")
    run(tmp_path / "resumed", range(6, 11), resume_from=tmp_path / "ckpt")
    assert_kept(tmp_path / "resumed", before)
    (index,) = read_indexes(tmp_path / "resumed").values()
    assert index.lineages["L5"] == {"parent": "L0", "at": 5}
    assert {e["step"] for e in index.superseded()} == {6}
    assert_same_reconstruction(tmp_path / "resumed", tmp_path / "straight")


def test_transformers_trainer_resume_from_checkpoint(tmp_path, fresh_accelerate_state):
    transformers = pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    config = GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    ids = torch.randint(0, config.vocab_size, (4 * 6, 12), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": row} for row in ids]

    def run(directory: Path, out: Path, resume: str | None = None) -> EMAOptimizerWrapper:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)  # from the config: nothing is downloaded
        opt = EMAOptimizerWrapper(
            torch.optim.AdamW(model.named_parameters(), lr=1e-2),
            sigma_rel=SIGMAS,
            snapshot_every=1,
            snapshot_dir=directory,
            snapshot_resume=resume is not None,
        )
        sched = transformers.get_constant_schedule(opt)
        args = TrainingArguments(
            output_dir=str(out),
            use_cpu=True,
            report_to=[],
            max_steps=6,
            per_device_train_batch_size=4,
            save_strategy="steps",
            save_steps=3,
            disable_tqdm=True,
            dataloader_pin_memory=False,
            seed=0,
        )
        Trainer(model=model, args=args, train_dataset=dataset, optimizers=(opt, sched)).train(
            resume_from_checkpoint=resume
        )
        opt.close()
        return opt

    run(tmp_path / "straight", tmp_path / "out-straight")
    run(tmp_path / "resumed", tmp_path / "out")  # an interrupted run is replayed from its step-3 checkpoint
    before = files(tmp_path / "resumed")
    run(tmp_path / "resumed", tmp_path / "out", resume=str(tmp_path / "out" / "checkpoint-3"))
    assert_kept(tmp_path / "resumed", before)
    (index,) = read_indexes(tmp_path / "resumed").values()
    assert index.lineages["L3"] == {"parent": "L0", "at": 3}
    assert sorted({e["step"] for e in index.superseded()}) == [4, 5, 6]
    assert_same_reconstruction(tmp_path / "resumed", tmp_path / "straight")


def test_lightning_fit_ckpt_path_and_test_best(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from triton_ema.lightning import EMACallback

    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 4, generator=g)
    y = x @ torch.randn(4, 1, generator=g)
    train = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=4)  # 4 steps an epoch, no shuffling
    val = DataLoader(TensorDataset(x[16:], y[16:]), batch_size=8)

    class Regressor(L.LightningModule):
        def __init__(self, directory: Path, resume: bool) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
            self.directory, self.resume = directory, resume

        def training_step(self, batch, batch_idx):
            return nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", nn.functional.mse_loss(self.net(batch[0]), batch[1]))

        def test_step(self, batch, batch_idx):
            self.log("test_loss", nn.functional.mse_loss(self.net(batch[0]), batch[1]))

        def configure_optimizers(self):
            adam = torch.optim.Adam(self.net.named_parameters(), lr=0.05)
            return EMAOptimizerWrapper(
                adam, sigma_rel=SIGMAS, snapshot_every=2, snapshot_dir=self.directory, snapshot_resume=self.resume
            )

    def trainer(root: Path, epochs: int, callbacks: list) -> L.Trainer:
        return L.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=epochs,
            callbacks=[EMACallback(), *callbacks],
            enable_progress_bar=False,
            enable_model_summary=False,
            logger=False,
            num_sanity_val_steps=0,
            default_root_dir=root,
            enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        )

    straight = Regressor(tmp_path / "straight", False)
    trainer(tmp_path / "a", 3, []).fit(straight, train, val)
    straight.trainer.optimizers[0].close()

    # Two epochs with a checkpoint per epoch (the best kept), then test(ckpt_path="best") in the same process:
    # it loads an earlier checkpoint into the live wrapper, which must change nothing on disk.
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=-1, filename="{epoch}")
    first = Regressor(tmp_path / "resumed", False)
    t = trainer(tmp_path / "b", 2, [best])
    t.fit(first, train, val)
    before = files(tmp_path / "resumed")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.test(first, val, ckpt_path="best", verbose=False)
    assert not [w for w in caught if "EMACallback" in str(w.message)], [str(w.message) for w in caught]
    assert files(tmp_path / "resumed") == before
    t.optimizers[0].close()

    resumed = Regressor(tmp_path / "resumed", True)
    trainer(tmp_path / "c", 3, []).fit(resumed, train, val, ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt")
    resumed.trainer.optimizers[0].close()
    assert_kept(tmp_path / "resumed", before)
    (index,) = read_indexes(tmp_path / "resumed").values()
    assert list(index.lineages) == ["L0", "L8"] and not index.superseded()
    assert_same_reconstruction(tmp_path / "resumed", tmp_path / "straight")
