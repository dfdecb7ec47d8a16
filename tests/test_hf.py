"""triton_ema.hf through the real transformers Trainer, on a tiny GPT-2 built from a config (nothing downloaded)."""

from __future__ import annotations

import os
import subprocess
import sys

# Before anything imports huggingface_hub, which reads it once: nothing may reach for the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from triton_ema import EMAOptimizerWrapper  # noqa: E402

EMA_KWARGS = {"decay": 0.8, "warmup": "litema"}


@pytest.fixture(autouse=True)
def _fresh_accelerate(fresh_accelerate_state):
    yield


def tiny_gpt2(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return GPT2LMHeadModel(config)  # randomly initialised from the config


def dataset(seed: int, rows: int) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, 64, (rows, 12), generator=torch.Generator().manual_seed(seed + 1))
    return [{"input_ids": row, "labels": row} for row in ids]


def arguments(out, seed: int, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(out),
        use_cpu=True,
        report_to=[],
        max_steps=4,
        learning_rate=1e-2,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=seed,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def snapshot(tensors) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def assert_bits(actual, expected, what: str) -> None:
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and torch.equal(a, e), f"{what}[{i}] differs"


def lm_loss(model, rows) -> float:
    ids = torch.stack([r["input_ids"] for r in rows])
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def named_ema(model, ema: EMAOptimizerWrapper) -> dict[str, torch.Tensor]:
    """The EMA by the model's parameter names (ema_params() follows param_groups, not the model's order)."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for group in ema.param_groups for p in group["params"]]
    return {names[id(p)]: shadow for p, shadow in zip(params, ema.ema_params())}


def test_import_triton_ema_never_imports_transformers():
    code = (
        "import sys, triton_ema\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('transformers', 'lightning')], 'imported'\n"
        "import triton_ema.hf\n"
        "assert 'transformers' in sys.modules\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]


def test_trainer_evaluates_predicts_and_saves_the_ema(seed, tmp_path):
    from triton_ema.hf import EMATrainer

    model = tiny_gpt2(seed)
    train, held_out = dataset(seed, 16), dataset(seed + 7, 8)
    steps, warmup = 4, 2
    args = arguments(tmp_path / "run", seed, max_steps=steps, warmup_steps=warmup, lr_scheduler_type="linear")
    inner_lrs: list[float] = []

    class RecordLR(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):  # the inner optimizer's live groups
            inner_lrs.append(trainer.ema.optimizer.param_groups[0]["lr"])

    trainer = EMATrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=held_out,
        ema_kwargs=EMA_KWARGS,
        ema_eval="both",
        callbacks=[RecordLR()],
    )
    assert trainer.ema is None, "the optimizer is created by train()"
    trainer.train()
    ema = trainer.ema
    assert isinstance(ema, EMAOptimizerWrapper) and ema.num_steps == steps
    assert ema.schedule.decay == 0.8, "ema_kwargs reach the wrapper"
    # accelerate's AcceleratedOptimizer and the LR scheduler drive the wrapper, which drives the inner optimizer
    assert trainer.optimizer.optimizer is ema and trainer.lr_scheduler.optimizer.optimizer is ema
    expected = [1e-2 * (t / warmup if t < warmup else (steps - t) / (steps - warmup)) for t in range(steps)]
    assert inner_lrs == pytest.approx(expected, rel=1e-12, abs=0)

    # The expected losses: the plain Trainer's evaluation, with the EMA swapped in by hand and without.
    raw = snapshot(model.parameters())
    with ema.ema_weights():
        ema_loss = Trainer.evaluate(trainer)["eval_loss"]
    raw_loss = Trainer.evaluate(trainer)["eval_loss"]
    assert ema_loss != raw_loss

    metrics = trainer.evaluate()
    assert_bits(snapshot(model.parameters()), raw, "trained weights after evaluate()")
    assert metrics["eval_loss"] == pytest.approx(ema_loss, rel=1e-5)
    assert metrics["eval_raw_loss"] == pytest.approx(raw_loss, rel=1e-5)
    logged = trainer.state.log_history[-1]
    assert logged["eval_loss"] == metrics["eval_loss"] and logged["eval_raw_loss"] == metrics["eval_raw_loss"]
    named = trainer.evaluate(metric_key_prefix="held")
    assert named["held_loss"] == pytest.approx(ema_loss, rel=1e-5) and "held_raw_loss" in named

    prediction = trainer.predict(held_out)
    assert prediction.metrics["test_loss"] == pytest.approx(ema_loss, rel=1e-5)
    assert_bits(snapshot(model.parameters()), raw, "trained weights after predict()")

    # An evaluation that raises leaves the trained weights in the model.
    def broken(*a, **k):
        assert not torch.equal(next(model.parameters()), raw[0]), "evaluation runs with the EMA swapped in"
        raise RuntimeError("boom")

    trainer.ema_eval = "ema"

    trainer.prediction_step = broken
    with pytest.raises(RuntimeError, match="boom"):
        trainer.evaluate()
    with pytest.raises(RuntimeError, match="boom"):
        trainer.predict(held_out)
    del trainer.prediction_step
    assert_bits(snapshot(model.parameters()), raw, "trained weights after a failed evaluation")

    # save_model: the EMA, in save_pretrained's format; the trainer keeps training the raw weights.
    trainer.save_model(str(tmp_path / "export"))
    assert_bits(snapshot(model.parameters()), raw, "trained weights after save_model()")
    loaded = GPT2LMHeadModel.from_pretrained(str(tmp_path / "export"))
    with ema.ema_weights():
        assert lm_loss(loaded, held_out) == lm_loss(model, held_out)
    exported = dict(loaded.named_parameters())
    for name, shadow in named_ema(model, ema).items():
        assert torch.equal(exported[name], shadow), name


def test_mixin_goes_in_front_of_other_trainer_subclasses(seed, tmp_path):
    from triton_ema.hf import EMATrainerMixin

    class OtherTrainer(Trainer):  # stands for TRL's SFTTrainer and the like
        def compute_loss(self, model, inputs, *args, **kwargs):
            self.losses_computed = getattr(self, "losses_computed", 0) + 1
            return super().compute_loss(model, inputs, *args, **kwargs)

    class MyTrainer(EMATrainerMixin, OtherTrainer):
        pass

    model = tiny_gpt2(seed)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = MyTrainer(
        model=model,
        args=arguments(tmp_path, seed),
        train_dataset=dataset(seed, 16),
        optimizers=(inner, None),
        ema_kwargs=EMA_KWARGS,
    )
    trainer.train()
    assert trainer.losses_computed == 4
    assert trainer.ema.optimizer is inner and trainer.ema.num_steps == 4
    # A second train() goes on with the same wrapper (inside accelerate's AcceleratedOptimizer by then).
    ema = trainer.ema
    trainer.train()
    assert trainer.ema is ema and ema.num_steps == 8 and trainer.optimizer.optimizer is ema
    # ema_eval="raw" evaluates the trained weights, as the plain Trainer does.
    trainer.ema_eval = "raw"
    held_out = dataset(seed + 7, 8)
    assert trainer.evaluate(held_out)["eval_loss"] == Trainer.evaluate(trainer, held_out)["eval_loss"]
    with trainer.ema.ema_weights():
        ema_loss = Trainer.evaluate(trainer, held_out)["eval_loss"]
    assert trainer.evaluate(held_out)["eval_loss"] != ema_loss
    with pytest.raises(ValueError, match="ema_eval"):
        MyTrainer(model=model, args=arguments(tmp_path, seed), ema_eval="yes")


def train_run(out, seed: int, resume: str | None = None, **overrides):
    from triton_ema.hf import EMATrainer

    model = tiny_gpt2(seed if resume is None else seed + 1)  # a resume must not depend on the initial weights
    args = arguments(
        out,
        seed,
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
        eval_strategy="steps",
        eval_steps=3,
        lr_scheduler_type="linear",
        **overrides,
    )
    trainer = EMATrainer(
        model=model,
        args=args,
        train_dataset=dataset(seed, 24),
        eval_dataset=dataset(seed + 7, 8),
        ema_kwargs=EMA_KWARGS,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model


def test_resume_from_checkpoint_is_bit_exact(seed, tmp_path):
    whole, whole_model = train_run(tmp_path / "whole", seed)
    checkpoint = tmp_path / "whole" / "checkpoint-3"
    # The checkpoint keeps the trained weights for the model and the EMA beside them (and in the optimizer state).
    files = os.listdir(checkpoint)
    assert "model.safetensors" in files and "ema.safetensors" in files and "optimizer.pt" in files
    weights = safetensors_torch.load_file(str(checkpoint / "model.safetensors"))
    ema_file = safetensors_torch.load_file(str(checkpoint / "ema.safetensors"))
    name = "transformer.h.0.mlp.c_fc.weight"
    assert not torch.equal(weights[name], ema_file[name])

    resumed, resumed_model = train_run(tmp_path / "resumed", seed, resume=str(checkpoint))
    assert resumed.ema.num_steps == whole.ema.num_steps == 6
    assert_bits(snapshot(resumed_model.parameters()), snapshot(whole_model.parameters()), "trained weights")
    assert_bits(snapshot(resumed.ema.ema_params()), snapshot(whole.ema.ema_params()), "EMA")


def test_save_only_model_checkpoints_and_the_best_model_carry_the_ema(seed, tmp_path):
    from triton_ema.hf import EMATrainer

    model = tiny_gpt2(seed)
    calls = []

    def rank_first_best(_prediction):  # the first evaluation is the best, so the best is not the last checkpoint
        calls.append(1)
        return {"rank": -len(calls)}

    args = arguments(
        tmp_path,
        seed,
        max_steps=6,
        save_strategy="steps",
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        save_only_model=True,
        load_best_model_at_end=True,
        metric_for_best_model="rank",
        greater_is_better=True,
    )
    trainer = EMATrainer(
        model=model,
        args=args,
        train_dataset=dataset(seed, 24),
        eval_dataset=dataset(seed + 7, 8),
        compute_metrics=rank_first_best,
        ema_kwargs=EMA_KWARGS,
    )
    trainer.train()
    best = tmp_path / "checkpoint-2"
    assert trainer.state.best_model_checkpoint == str(best)
    for step in (2, 4, 6):
        files = os.listdir(tmp_path / f"checkpoint-{step}")
        assert "ema.safetensors" in files and "optimizer.pt" not in files
    weights = safetensors_torch.load_file(str(best / "model.safetensors"))
    ema_file = safetensors_torch.load_file(str(best / "ema.safetensors"))
    shadows = named_ema(model, trainer.ema)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[name]), f"best weights: {name}"
        assert torch.equal(shadows[name], ema_file[name]), f"best checkpoint's EMA: {name}"

    # A resume from a weights-only checkpoint takes the EMA from the file: what the first step starts from.
    at_start: dict[str, torch.Tensor] = {}

    class AtStart(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            at_start.update({n: t.clone() for n, t in named_ema(model, again.ema).items()})
            at_start.update({"weights." + n: p.detach().clone() for n, p in model.named_parameters()})

    again = EMATrainer(
        model=tiny_gpt2(seed + 1),
        args=arguments(tmp_path / "again", seed, max_steps=3),
        train_dataset=dataset(seed, 24),
        ema_kwargs=EMA_KWARGS,
        callbacks=[AtStart()],
    )
    again.train(resume_from_checkpoint=str(best))
    for name in weights:
        assert torch.equal(at_start["weights." + name], weights[name]), name
        assert torch.equal(at_start[name], ema_file[name]), name
