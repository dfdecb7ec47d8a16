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


@pytest.mark.parametrize("how", ["own-shadow", "other-parameter", "other-shadow"])
def test_storage_overlapping_a_shadow_or_another_tensor_is_refused(how):
    a, b = nn.Parameter(torch.ones(4)), nn.Parameter(torch.full((4,), 2.0))
    opt = EMAOptimizerWrapper(torch.optim.SGD([a, b], lr=0.1), decay=0.5, warmup=None)
    opt.step()
    ema_b = opt.ema_params()[1].clone()
    a.data = {"own-shadow": opt.ema_params()[0], "other-parameter": b.data, "other-shadow": opt.ema_params()[1]}[how]
    with pytest.raises(RuntimeError, match="overlap in memory"):
        opt.step()
    with pytest.raises(RuntimeError, match="overlap in memory"), opt.ema_weights():
        pass
    assert torch.equal(opt.ema_params()[1], ema_b), "nothing was updated"
    a.data = torch.zeros(4)  # storage of its own is followed, as before
    opt.step()
    torch.testing.assert_close(opt.ema_params()[0], torch.full((4,), 0.5))


def test_parameters_added_behind_the_wrapper_are_named_at_the_next_step():
    model = nn.Linear(3, 2)
    opt = EMAOptimizerWrapper(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.5)
    step(model, opt)
    extra = nn.Parameter(torch.ones(2))
    opt.param_groups[0]["params"].append(extra)
    for call in (opt.step, opt.state_dict):
        with pytest.raises(ValueError, match=r"parameter 2 was added behind the wrapper.*opt\.add_param_group"):
            call()
    opt.param_groups[0]["params"].pop()
    opt.optimizer.add_param_group({"params": [extra]})
    with pytest.raises(ValueError, match=r"parameter 2 was added"):
        opt.step()
    opt.optimizer.param_groups.pop()
    opt.add_param_group({"params": [extra]})
    step(model, opt)
    assert len(opt.state_dict()["param_groups"]) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ema_weights_keeps_working_after_a_call_under_inference_mode(dtype):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(dtype)
    opt = EMAOptimizerWrapper(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.5, model=model)

    def train():
        opt.zero_grad()
        model(torch.randn(4, 3, dtype=dtype)).float().pow(2).mean().backward()
        opt.step()

    train()
    with torch.inference_mode(), opt.ema_weights():  # Lightning's validation loop
        model(torch.randn(2, 3, dtype=dtype))
    train()
    with opt.ema_weights():
        model(torch.randn(2, 3, dtype=dtype))
    train()
    assert opt.num_steps == 3


def test_dcp_flattened_optimizer_state_dict_is_refused_with_the_reason():
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    model = nn.Linear(3, 2)
    opt = EMAOptimizerWrapper(torch.optim.Adam(model.parameters(), lr=0.1), decay=0.5)
    step(model, opt)
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    with pytest.raises(ValueError, match="flatten_optimizer_state_dict=True\\) is not supported"):
        get_optimizer_state_dict(model, opt, options=flat)
    saved = copy.deepcopy(get_optimizer_state_dict(model, opt))
    before = [e.clone() for e in opt.ema_params()]
    with pytest.raises(ValueError, match="flatten_optimizer_state_dict=True\\) is not supported"):
        set_optimizer_state_dict(model, opt, saved, options=flat)
    assert all(torch.equal(a, b) for a, b in zip(opt.ema_params(), before))
    set_optimizer_state_dict(model, opt, saved)  # the default layout round-trips


def test_state_dicts_inside_ema_weights_are_detached_and_dcp_works_with_stateless_sgd():
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    opt = EMAOptimizerWrapper(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.5, model=model)
    step(model, opt)
    opt.zero_grad()  # no gradients: DCP's helper steps the stateless optimizer to create its state
    ema = [e.clone() for e in opt.ema_params()]
    with opt.ema_weights():
        sd = opt.state_dict()
        osd = get_optimizer_state_dict(model, opt)
    shadows = [e["ema_shadow"] for e in sd["state"].values()] + sd["ema_buffers"]
    assert all(not t.requires_grad and t.grad_fn is None for t in shadows)
    assert all(torch.equal(a, b) for a, b in zip([e["ema_shadow"] for e in sd["state"].values()], ema))
    assert torch.equal(osd["state"]["0.weight"]["ema_shadow"], ema[0]) and opt.num_steps == 1


def test_meta_and_sparse_parameters_are_refused_saying_so():
    with torch.device("meta"):
        meta = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="on the meta device"):
        EMAOptimizerWrapper(torch.optim.SGD(meta.parameters(), lr=0.1))
    sparse = nn.Parameter(torch.eye(3).to_sparse())
    with pytest.raises(ValueError, match="sparse_coo tensor.*dense"):
        EMAOptimizerWrapper(torch.optim.SGD([sparse], lr=0.1))
    emb = nn.Embedding(4, 3, sparse=True)  # sparse gradients of a dense weight are fine
    opt = EMAOptimizerWrapper(torch.optim.SGD(emb.parameters(), lr=0.1), decay=0.5)
    emb(torch.tensor([1])).sum().backward()
    opt.step()


def test_ema_weights_in_lightning_validate_under_inference_mode_then_training_goes_on(tmp_path):
    """trainer.validate() runs under torch.inference_mode(): a swap there must leave later training working."""
    import lightning.pytorch as L

    from triton_ema import find_ema

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
            self.opt, self.swaps = None, 0

        def training_step(self, batch, _):
            assert find_ema(self.optimizers()) is self.opt
            return self.net(batch[0]).pow(2).mean()

        def validation_step(self, batch, _):
            assert torch.is_inference_mode_enabled()
            with self.opt.ema_weights():
                self.swaps += 1
                self.net(batch[0])

        def configure_optimizers(self):
            if self.opt is None:  # the same wrapper for every fit(), as in one long-lived training script
                self.opt = EMAOptimizerWrapper(torch.optim.SGD(self.parameters(), lr=0.1), decay=0.9, model=self)
            return self.opt

    def trainer():
        return L.Trainer(
            max_epochs=1,
            default_root_dir=tmp_path,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            accelerator="cpu",
        )

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 3)), batch_size=4)
    module = Module()
    trainer().fit(module, data)
    L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu").validate(
        module, data, verbose=False
    )
    trainer().fit(module, data)
    with module.opt.ema_weights():  # outside inference_mode: the scratch kept from the first swap is written
        module.net(torch.randn(2, 3))
    assert module.swaps == 4 and module.opt.num_steps == 8
