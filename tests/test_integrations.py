"""The wrapper under the tools that drive it in real training: LR schedulers across a resume, Accelerate, transformers.

Each of these replaces or re-reads the optimizer's ``param_groups`` behind the wrapper's back (``load_state_dict``
inside a resume or inside ``Accelerator.prepare``), so the checks are on what the *inner* optimizer actually used at
every step, read with a step pre-hook on the inner optimizer, not on what the wrapper or the scheduler report.
"""

from __future__ import annotations

import io
import os

# Before anything imports huggingface_hub, which reads it once: the transformers test builds its model from a
# config and must never reach for the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from reference64 import Ema64, tol
from torch import nn

from triton_ema import EMAOptimizerWrapper

LR, GAMMA, STEP_SIZE = 0.1, 0.5, 2
EMA_CONFIG = {"decay": 0.8, "warmup": "litema"}
REF_CONFIG = {"decay": 0.8, "warmup": "litema"}  # the same schedule in reference64's names


def steplr(t: int) -> float:
    """StepLR's learning rate for 0-based step ``t``, from its definition."""
    return LR * GAMMA ** (t // STEP_SIZE)


def clone(tensors) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def assert_equal(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> None:
    assert len(actual) == len(expected), f"{what}: {len(actual)} tensors, expected {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and torch.equal(a, e), f"{what}[{i}] differs"


def record_lr(inner: torch.optim.Optimizer) -> list[float]:
    """The learning rate the inner optimizer reads at each of its steps (its live groups, whatever replaced them)."""
    lrs: list[float] = []
    inner.register_step_pre_hook(lambda o, args, kwargs: lrs.append(float(o.param_groups[0]["lr"])))
    return lrs


def make_model(seed: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(dtype)


def make_batches(seed: int, n: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed + 1)
    return [(torch.randn(5, 4, generator=g).to(dtype), torch.randn(5, 2, generator=g).to(dtype)) for _ in range(n)]


def make_wrapper(model: nn.Module) -> tuple[EMAOptimizerWrapper, torch.optim.lr_scheduler.LRScheduler, list[float]]:
    inner = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    lrs = record_lr(inner)
    opt = EMAOptimizerWrapper(inner, **EMA_CONFIG)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=STEP_SIZE, gamma=GAMMA), lrs


def train(model, opt, sched, batches) -> None:
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x).float(), y.float()).backward()
        opt.step()
        sched.step()


PARAM_DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("param_dtype", PARAM_DTYPES)
@pytest.mark.parametrize("resume", ["same-wrapper", "fresh-wrapper"])
def test_steplr_resume_matches_uninterrupted_run(seed, param_dtype, resume):
    steps, cut = 7, 3
    batches = make_batches(seed, steps, param_dtype)

    model_a = make_model(seed, param_dtype)
    opt_a, sched_a, lrs_a = make_wrapper(model_a)
    ref = Ema64(list(model_a.parameters()), **REF_CONFIG)
    for batch in batches:
        train(model_a, opt_a, sched_a, [batch])
        ref.step(list(model_a.parameters()))
    assert lrs_a == [steplr(t) for t in range(steps)]
    for s, r in zip(opt_a.ema_params(), ref.shadows):
        torch.testing.assert_close(s.double(), r, **tol(torch.float32))

    model_b = make_model(seed, param_dtype)
    opt_b, sched_b, lrs_b = make_wrapper(model_b)
    lrs_before: list[float] = []
    train(model_b, opt_b, sched_b, batches[:cut])
    if resume == "same-wrapper":
        opt_b.load_state_dict(opt_b.state_dict())
    else:
        # Through bytes and torch.load's default (weights_only) unpickler, into a model, wrapper and scheduler
        # that start from other weights.
        buf = io.BytesIO()
        torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict(), "sched": sched_b.state_dict()}, buf)
        buf.seek(0)
        ckpt = torch.load(buf)
        model_b = make_model(seed + 1, param_dtype)
        lrs_before = lrs_b
        opt_b, sched_b, lrs_b = make_wrapper(model_b)
        model_b.load_state_dict(ckpt["model"])
        opt_b.load_state_dict(ckpt["opt"])
        sched_b.load_state_dict(ckpt["sched"])
        assert opt_b.num_steps == cut
    train(model_b, opt_b, sched_b, batches[cut:])

    assert lrs_before + lrs_b == lrs_a, "the inner optimizer must follow the scheduler after the load"
    assert opt_b.num_steps == opt_a.num_steps == steps
    assert_equal(clone(model_b.parameters()), clone(model_a.parameters()), "parameters")
    assert_equal(clone(opt_b.ema_params()), clone(opt_a.ema_params()), "EMA")
    assert opt_b.param_groups is opt_b.optimizer.param_groups and opt_b.state is opt_b.optimizer.state
    assert opt_b.defaults is opt_b.optimizer.defaults


def test_add_param_group_after_load_tracks_the_new_parameters(seed):
    first, second = nn.Linear(3, 2), nn.Linear(2, 4)
    opt = EMAOptimizerWrapper(torch.optim.SGD(first.parameters(), lr=0.1), **EMA_CONFIG)
    opt.load_state_dict(opt.state_dict())
    opt.add_param_group({"params": list(second.parameters()), "lr": 0.05})

    params = [*first.parameters(), *second.parameters()]
    assert len(opt.ema_params()) == len(params), "the new group's parameters have no EMA"
    assert opt.param_groups is opt.optimizer.param_groups and len(opt.param_groups) == 2
    ref = Ema64(params, **REF_CONFIG)
    x = torch.randn(6, 3)
    for _ in range(3):
        opt.zero_grad()
        second(first(x)).pow(2).mean().backward()
        opt.step()
        ref.step(params)
    assert opt.num_steps == 3
    for s, r in zip(opt.ema_params(), ref.shadows):
        torch.testing.assert_close(s.double(), r, **tol(torch.float32))
    # The new group's EMA moved away from its initial weights and the optimizer stepped them.
    assert not torch.equal(ref.shadows[-1], second.bias.detach().double())
    # A second save and load carries the new group's EMA too.
    sd = opt.state_dict()
    opt2 = EMAOptimizerWrapper(torch.optim.SGD(nn.Linear(3, 2).parameters(), lr=0.1), **EMA_CONFIG)
    opt2.add_param_group({"params": list(nn.Linear(2, 4).parameters()), "lr": 0.05})
    opt2.load_state_dict(sd)
    assert_equal(clone(opt2.ema_params()), clone(opt.ema_params()), "EMA after a second load")


def test_accelerate_prepare_drives_the_inner_optimizer(seed, fresh_accelerate_state):
    from accelerate import Accelerator

    steps = 6
    batches = make_batches(seed, steps, torch.float32)
    probe = torch.randn(3, 4)

    model = make_model(seed, torch.float32)
    opt, sched, lrs = make_wrapper(model)
    accelerator = Accelerator(cpu=True)
    # prepare() reloads the optimizer's own state dict into it (device placement): the wrapper must keep
    # driving the inner optimizer's live groups after that.
    p_model, p_opt, p_sched = accelerator.prepare(model, opt, sched)
    initial = clone(p_model.parameters())
    for x, y in batches:
        p_opt.zero_grad()
        accelerator.backward(nn.functional.mse_loss(p_model(x), y))
        p_opt.step()
        p_sched.step()

    assert lrs == [steplr(t) for t in range(steps)]
    assert opt.num_steps == steps

    # The same loop without Accelerate, as the float64 reference of the EMA and for a bit-exact comparison.
    plain = make_model(seed, torch.float32)
    plain_opt, plain_sched, plain_lrs = make_wrapper(plain)
    ref = Ema64(list(plain.parameters()), **REF_CONFIG)
    for batch in batches:
        train(plain, plain_opt, plain_sched, [batch])
        ref.step(list(plain.parameters()))
    assert plain_lrs == lrs
    assert_equal(clone(p_model.parameters()), clone(plain.parameters()), "parameters")
    assert_equal(clone(opt.ema_params()), clone(plain_opt.ema_params()), "EMA")
    for s, r in zip(opt.ema_params(), ref.shadows):
        torch.testing.assert_close(s.double(), r, **tol(torch.float32))
    assert all(not torch.equal(s, p) for s, p in zip(opt.ema_params(), initial)), "the EMA must have moved"

    trained = clone(p_model.parameters())
    with torch.no_grad():
        names = [name for name, _ in p_model.named_parameters()]
        expected = torch.func.functional_call(p_model, dict(zip(names, opt.ema_params())), (probe,))
        with opt.ema_weights():
            assert_equal(clone(p_model.parameters()), clone(opt.ema_params()), "prepared model inside ema_weights()")
            assert torch.equal(p_model(probe), expected)
    assert_equal(clone(p_model.parameters()), trained, "prepared model after ema_weights()")


def test_transformers_trainer_drives_the_inner_optimizer(seed, tmp_path, fresh_accelerate_state):
    transformers = pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    steps, warmup, base_lr = 6, 2, 1e-2
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    model = GPT2LMHeadModel(config)  # randomly initialised from the config: nothing is downloaded
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (4 * steps, 12), generator=g)
    dataset = [{"input_ids": row, "labels": row} for row in ids]

    inner = torch.optim.AdamW(model.parameters(), lr=base_lr)
    lrs = record_lr(inner)
    opt = EMAOptimizerWrapper(inner, **EMA_CONFIG)
    sched = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=steps)
    params = list(model.parameters())
    ref = Ema64(params, **REF_CONFIG)

    class Check(TrainerCallback):
        """Before each optimizer step, the scheduler's lr is the inner optimizer's; after it, feed the reference."""

        def __init__(self) -> None:
            self.pairs: list[tuple[float, float]] = []

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.pairs.append((sched.get_last_lr()[0], inner.param_groups[0]["lr"]))

        def on_optimizer_step(self, args, state, control, **kwargs):
            ref.step(params)

    check = Check()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        max_steps=steps,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=seed,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, optimizers=(opt, sched), callbacks=[check])
    trainer.train()

    # The linear warmup-then-decay schedule, from its definition; step 0 runs at lr 0 and still counts.
    expected = [base_lr * (t / warmup if t < warmup else (steps - t) / (steps - warmup)) for t in range(steps)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=0)
    assert [inner_lr for _, inner_lr in check.pairs] == lrs
    assert [sched_lr for sched_lr, _ in check.pairs] == lrs, "the inner optimizer must use the scheduler's lr"
    logged = [row["learning_rate"] for row in trainer.state.log_history if "learning_rate" in row]
    assert logged == pytest.approx(lrs, rel=1e-6)
    assert opt.num_steps == steps == ref.t

    assert all(a is b for a, b in zip(model.parameters(), params)), "the Trainer trains the parameters we track"
    for s, r in zip(opt.ema_params(), ref.shadows):
        torch.testing.assert_close(s.double(), r, **tol(torch.float32))
    assert any(not torch.equal(s, p.detach()) for s, p in zip(opt.ema_params(), params)), "the EMA lags the weights"
