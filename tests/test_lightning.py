"""EMACallback with a real lightning.Trainer on CPU: EMA evaluation, checkpoints, resume, exceptions."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from triton_ema import EMAOptimizerWrapper

L = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from triton_ema.lightning import EMACallback  # noqa: E402

pytestmark = [
    # The resumed trainers deliberately lack the ModelCheckpoint that wrote the file.
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),
    # Emitted inside Lightning 2.6 against torch's newer pytree API; nothing this package does.
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*"),
]

N_TRAIN, BATCH = 16, 4  # 4 optimizer steps an epoch


def make_data(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN + 8, 4, generator=g)
    y = x @ torch.randn(4, 1, generator=g) + 0.3 * torch.randn(N_TRAIN + 8, 1, generator=g)
    return TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[N_TRAIN:], y[N_TRAIN:])


class Regressor(L.LightningModule):
    """A tiny MLP with Adam (closure-based, as Lightning's automatic optimization calls it) and an EMA."""

    def __init__(self, init_seed: int = 0, wrap: bool = True, fail_on_val: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(init_seed)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.wrap = wrap
        self.fail_on_val = fail_on_val
        self.val_calls = 0
        # The weights each evaluation step saw, to compare with the shadows.
        self.seen: dict[str, list[list[torch.Tensor]]] = {"val": [], "test": [], "predict": []}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        self.seen[stage].append([p.detach().clone() for p in self.parameters()])
        x, y = batch
        self.log(f"{stage}_loss", nn.functional.mse_loss(self(x), y))

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.val_calls += 1
        if self.val_calls == self.fail_on_val:
            raise RuntimeError("validation failed on purpose")
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen["predict"].append([p.detach().clone() for p in self.parameters()])
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        adam = torch.optim.Adam(self.parameters(), lr=0.05)
        return EMAOptimizerWrapper(adam, decay=0.8, warmup="litema") if self.wrap else adam


def make_trainer(tmp_path, max_epochs: int, callbacks: list, **kwargs) -> L.Trainer:
    kwargs.setdefault("enable_checkpointing", any(isinstance(c, ModelCheckpoint) for c in callbacks))
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        **kwargs,
    )


def loaders(seed: int = 0) -> tuple[DataLoader, DataLoader]:
    train, val = make_data(seed)
    # No shuffling: an interrupted and an uninterrupted run must see the same batches.
    return DataLoader(train, batch_size=BATCH), DataLoader(val, batch_size=len(val))


def assert_equal(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def assert_differ(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert any(not torch.equal(x, y) for x, y in zip(a, b))


def clone(tensors) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


class Recorder(L.Callback):
    """Snapshots of the trained weights and the EMA after chosen optimizer steps (and at train start)."""

    def __init__(self, steps: tuple[int, ...] = ()) -> None:
        self.steps = steps
        self.at: dict[int, tuple[list[torch.Tensor], list[torch.Tensor], int]] = {}
        self.start: tuple[list[torch.Tensor], int] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        opt = trainer.optimizers[0]
        self.start = (clone(opt.ema_params()), opt.num_steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.steps:
            opt = trainer.optimizers[0]
            self.at[trainer.global_step] = (clone(pl_module.parameters()), clone(opt.ema_params()), opt.num_steps)


def test_fit_matches_manual_loop_and_validates_with_ema(tmp_path):
    train_loader, val_loader = loaders()
    model = Regressor()
    manual = copy.deepcopy(model)
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[EMACallback()])
    trainer.fit(model, train_loader, val_loader)

    opt = trainer.optimizers[0]
    assert isinstance(opt, EMAOptimizerWrapper)
    assert opt.num_steps == 2 * N_TRAIN // BATCH

    # The same training by hand: Lightning's closure path must give the same trained weights and EMA.
    manual_opt = manual.configure_optimizers()
    for _ in range(2):
        for batch in train_loader:

            def closure(batch=batch):
                manual_opt.zero_grad()
                loss = manual.training_step(batch, 0)
                loss.backward()
                return loss

            manual_opt.step(closure)
    torch.testing.assert_close(list(model.parameters()), list(manual.parameters()))
    torch.testing.assert_close(opt.ema_params(), manual_opt.ema_params())

    # Validation ran after each epoch with the EMA weights in the model; the last one is the final EMA.
    assert len(model.seen["val"]) == 2
    assert_equal(model.seen["val"][-1], opt.ema_params())
    assert_differ(model.seen["val"][-1], list(model.parameters()))
    # The logged metric is the EMA model's loss, recomputed here from the shadows alone.
    x, y = val_loader.dataset.tensors
    shadows = dict(zip((n for n, _ in model.named_parameters()), opt.ema_params()))
    with torch.no_grad():
        expected = nn.functional.mse_loss(torch.func.functional_call(model, shadows, (x,)), y)
    torch.testing.assert_close(trainer.callback_metrics["val_loss"], expected)
    # Training never saw the EMA: the model holds what the manual loop trained.
    assert_equal(list(model.parameters()), list(manual.parameters()))


def saved_ema(optimizer_state: dict) -> tuple[int, list[torch.Tensor]]:
    """The step count and the shadows in a wrapper's state dict (format 2: a shadow in each parameter's entry)."""
    groups = optimizer_state["param_groups"]
    assert all(g["ema"]["format_version"] == 2 for g in groups)
    (step,) = {g["ema"]["step"] for g in groups}
    return step, [optimizer_state["state"][i]["ema_shadow"] for g in groups for i in g["params"]]


@pytest.mark.parametrize("layout", ["ema", "raw"])
def test_checkpoints_hold_ema_weights_and_the_trained_ones_in_the_callback_state(tmp_path, layout):
    """ModelCheckpoint on validation end, and a save from inside the swap, are laid out alike: the model's weights
    are the EMA (the trained ones in the callback's state), or with checkpoint_weights="raw" the trained ones."""

    class SaveInsideSwap(L.Callback):
        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            assert ema_cb.swapped
            trainer.save_checkpoint(tmp_path / "inside.ckpt")
            # The EMA is back in the model for the rest of the validation.
            assert_equal(clone(pl_module.parameters()), clone(trainer.optimizers[0].ema_params()))

    class SaveOutsideSwap(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            assert not ema_cb.swapped
            trainer.save_checkpoint(tmp_path / "outside.ckpt")

    ema_cb = EMACallback(checkpoint_weights=layout)
    recorder = Recorder(steps=(N_TRAIN // BATCH,))
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, filename="val-end", monitor="val_loss", save_on_train_epoch_end=False)
    model = Regressor()
    callbacks = [ckpt_cb, ema_cb, SaveInsideSwap(), SaveOutsideSwap(), recorder]
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=callbacks)
    trainer.fit(model, *loaders())

    trained, ema, steps = recorder.at[N_TRAIN // BATCH]
    assert_differ(trained, ema)
    assert_equal(list(model.parameters()), trained)
    assert not ema_cb.swapped
    for name in ("val-end.ckpt", "inside.ckpt", "outside.ckpt"):
        ckpt = torch.load(tmp_path / name, weights_only=False)
        state = ckpt["callbacks"]["EMACallback"]
        if layout == "ema":
            assert_equal(list(ckpt["state_dict"].values()), ema)
            assert_equal(list(state["trained_state_dict"].values()), trained)
        else:
            assert_equal(list(ckpt["state_dict"].values()), trained)
            assert "trained_state_dict" not in state
        saved = ckpt["optimizer_states"][0]
        assert all(g["ema"]["step"] == steps for g in saved["param_groups"])
        assert_equal([saved["state"][k]["ema_shadow"] for k in saved["param_groups"][0]["params"]], ema)


def test_load_from_checkpoint_and_the_best_checkpoint_give_the_ranked_ema(tmp_path):
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=1, save_on_train_epoch_end=False)
    model = Regressor()
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[EMACallback(), ckpt_cb])
    trainer.fit(model, *loaders())
    trained = clone(model.parameters())

    epoch = int(str(ckpt_cb.best_model_path).split("epoch=")[1].split("-")[0])
    ranked = model.seen["val"][epoch]  # the weights validation saw in that epoch: the EMA then
    loaded = Regressor.load_from_checkpoint(ckpt_cb.best_model_path)
    assert_equal(list(loaded.parameters()), ranked)
    x, y = loaders()[1].dataset.tensors
    with torch.no_grad():
        torch.testing.assert_close(nn.functional.mse_loss(loaded(x), y), ckpt_cb.best_model_score)

    # A trainer with the callback takes the trained weights back from the checkpoint and tests with its EMA.
    trainer.test(model, loaders()[1], ckpt_path="best", verbose=False)
    assert_equal(model.seen["test"][-1], ranked)
    best = torch.load(ckpt_cb.best_model_path, weights_only=False)
    assert_equal(list(model.parameters()), list(best["callbacks"]["EMACallback"]["trained_state_dict"].values()))
    if epoch != 2:
        assert_differ(list(model.parameters()), trained)


def test_validate_both_logs_the_trained_weights_metrics_too(tmp_path):
    model = Regressor()
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[EMACallback(validate="both")])
    trainer.fit(model, *loaders())
    opt = trainer.optimizers[0]
    x, y = loaders()[1].dataset.tensors
    shadows = dict(zip((n for n, _ in model.named_parameters()), opt.ema_params()))
    with torch.no_grad():
        ema_loss = nn.functional.mse_loss(torch.func.functional_call(model, shadows, (x,)), y)
        raw_loss = nn.functional.mse_loss(model(x), y)
    assert not torch.equal(ema_loss, raw_loss)
    torch.testing.assert_close(trainer.callback_metrics["val_loss"], ema_loss)
    torch.testing.assert_close(trainer.callback_metrics["raw_val_loss"], raw_loss)
    # The EMA pass, then the trained weights' pass, and the trained weights in the model afterwards.
    assert_equal(model.seen["val"][-2], opt.ema_params())
    assert_equal(model.seen["val"][-1], list(model.parameters()))
    # The swaps made during validation (torch.inference_mode there) leave the wrapper usable outside it.
    ema = clone(opt.ema_params())
    with opt.ema_weights():
        assert_equal(clone(model.parameters()), ema)
    with pytest.raises(ValueError, match="validate"):
        EMACallback(validate="raw")


def test_resume_restores_ema_and_continues_like_uninterrupted_run(tmp_path):
    steps_per_epoch = N_TRAIN // BATCH
    full = Recorder(steps=(2 * steps_per_epoch, 3 * steps_per_epoch))
    model_a = Regressor()
    make_trainer(tmp_path / "a", max_epochs=3, callbacks=[EMACallback(), full]).fit(model_a, *loaders())

    # Interrupted after two epochs, with the checkpoint ModelCheckpoint writes at validation end ...
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "b", filename="last", save_on_train_epoch_end=False)
    model_b = Regressor()
    make_trainer(tmp_path / "b", max_epochs=2, callbacks=[EMACallback(), ckpt_cb]).fit(model_b, *loaders())

    # ... and resumed into a model and optimizer that start from other weights.
    resumed = Recorder(steps=(3 * steps_per_epoch,))
    model_c = Regressor(init_seed=1)
    trainer_c = make_trainer(tmp_path / "c", max_epochs=3, callbacks=[EMACallback(), resumed])
    trainer_c.fit(model_c, *loaders(), ckpt_path=tmp_path / "b" / "last.ckpt")

    _, ema_2, steps_2 = full.at[2 * steps_per_epoch]
    shadows_at_start, steps_at_start = resumed.start
    assert steps_at_start == steps_2 == 2 * steps_per_epoch
    assert_equal(shadows_at_start, ema_2)

    trained_3, ema_3, steps_3 = full.at[3 * steps_per_epoch]
    assert resumed.at[3 * steps_per_epoch][2] == steps_3
    assert_equal(resumed.at[3 * steps_per_epoch][0], trained_3)
    assert_equal(resumed.at[3 * steps_per_epoch][1], ema_3)
    assert_equal(list(model_c.parameters()), list(model_a.parameters()))
    assert_equal(trainer_c.optimizers[0].ema_params(), ema_3)
    assert trainer_c.optimizers[0].num_steps == steps_3


class ScheduledRegressor(Regressor):
    """The Regressor with a StepLR stepped after every optimizer step; records the lr each inner step used."""

    def __init__(self, init_seed: int = 0) -> None:
        super().__init__(init_seed)
        self.lrs: list[float] = []

    def configure_optimizers(self) -> dict:
        adam = torch.optim.Adam(self.parameters(), lr=0.05)
        # Read from the inner optimizer's live groups at each of its steps: what it trains with, whatever the
        # wrapper or the scheduler believe.
        adam.register_step_pre_hook(lambda o, args, kwargs: self.lrs.append(float(o.param_groups[0]["lr"])))
        opt = EMAOptimizerWrapper(adam, decay=0.8, warmup="litema")
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_resume_with_lr_scheduler_matches_uninterrupted_run(tmp_path):
    steps_per_epoch = N_TRAIN // BATCH
    full = Recorder(steps=(2 * steps_per_epoch, 3 * steps_per_epoch))
    model_a = ScheduledRegressor()
    make_trainer(tmp_path / "a", max_epochs=3, callbacks=[EMACallback(), full]).fit(model_a, *loaders())
    assert model_a.lrs == [0.05 * 0.5 ** (t // 3) for t in range(3 * steps_per_epoch)]

    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "b", filename="last", save_on_train_epoch_end=False)
    model_b = ScheduledRegressor()
    make_trainer(tmp_path / "b", max_epochs=2, callbacks=[EMACallback(), ckpt_cb]).fit(model_b, *loaders())
    assert model_b.lrs == model_a.lrs[: 2 * steps_per_epoch]

    # Lightning builds the wrapper and its scheduler first, then loads the optimizer state into the wrapper:
    # the scheduler must go on driving the inner optimizer after that load.
    resumed = Recorder(steps=(3 * steps_per_epoch,))
    model_c = ScheduledRegressor(init_seed=1)
    trainer_c = make_trainer(tmp_path / "c", max_epochs=3, callbacks=[EMACallback(), resumed])
    trainer_c.fit(model_c, *loaders(), ckpt_path=tmp_path / "b" / "last.ckpt")
    assert model_c.lrs == model_a.lrs[2 * steps_per_epoch :]

    _, ema_2, steps_2 = full.at[2 * steps_per_epoch]
    assert resumed.start[1] == steps_2
    assert_equal(resumed.start[0], ema_2)
    trained_3, ema_3, steps_3 = full.at[3 * steps_per_epoch]
    assert resumed.at[3 * steps_per_epoch][2] == steps_3 == 3 * steps_per_epoch
    assert_equal(resumed.at[3 * steps_per_epoch][0], trained_3)
    assert_equal(resumed.at[3 * steps_per_epoch][1], ema_3)
    assert_equal(list(model_c.parameters()), list(model_a.parameters()))
    opt_c = trainer_c.optimizers[0]
    assert opt_c.param_groups is opt_c.optimizer.param_groups


def test_test_after_fit_and_from_checkpoint_use_matching_ema(tmp_path):
    train_loader, val_loader = loaders()
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, filename="epoch1", save_on_train_epoch_end=False)
    model = Regressor()
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[EMACallback(predict=True), ckpt_cb])
    trainer.fit(model, train_loader, val_loader)
    ema_1 = clone(trainer.optimizers[0].ema_params())
    trained_1 = clone(model.parameters())

    # Same trainer, current weights: the live wrapper's EMA, and the trained weights back afterwards.
    trainer.test(model, val_loader, verbose=False)
    assert_equal(model.seen["test"][-1], ema_1)
    assert_equal(list(model.parameters()), trained_1)
    trainer.predict(model, val_loader)
    assert_equal(model.seen["predict"][-1], ema_1)
    assert_equal(list(model.parameters()), trained_1)

    # A fresh trainer and model: weights and EMA both come from the checkpoint.
    fresh = Regressor(init_seed=3)
    tester = make_trainer(tmp_path, max_epochs=1, callbacks=[EMACallback()])
    tester.test(fresh, val_loader, ckpt_path=tmp_path / "epoch1.ckpt", verbose=False)
    assert_equal(fresh.seen["test"][-1], ema_1)
    assert_equal(list(fresh.parameters()), trained_1)


def test_exception_in_validation_leaves_trained_weights(tmp_path):
    ema_cb = EMACallback()
    recorder = Recorder(steps=(N_TRAIN // BATCH,))
    model = Regressor(fail_on_val=1)
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[ema_cb, recorder])
    with pytest.raises(RuntimeError, match="validation failed on purpose"):
        trainer.fit(model, *loaders())
    assert not ema_cb.swapped
    trained, ema, _ = recorder.at[N_TRAIN // BATCH]
    assert_equal(list(model.parameters()), trained)
    opt = trainer.optimizers[0]
    with opt.ema_weights():  # not left active: entering again works
        assert_equal(clone(model.parameters()), ema)


def test_plain_optimizer_warns_and_validates_raw_weights(tmp_path):
    model = Regressor(wrap=False)
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[EMACallback()])
    with pytest.warns(UserWarning, match="no EMAOptimizerWrapper"):
        trainer.fit(model, *loaders())
    assert_equal(model.seen["val"][-1], list(model.parameters()))


def test_optimizers_found_in_every_configure_optimizers_form():
    from triton_ema.lightning import _optimizers_in

    p = nn.Parameter(torch.zeros(1))
    a, b = torch.optim.SGD([p], lr=0.1), EMAOptimizerWrapper(torch.optim.SGD([p], lr=0.1), decay=0.9)
    sched = torch.optim.lr_scheduler.StepLR(a, 1)
    forms = [
        (b, [b]),
        ([a, b], [a, b]),
        (([a, b], [sched]), [a, b]),
        ({"optimizer": b, "lr_scheduler": {"scheduler": sched, "interval": "step"}}, [b]),
        ([{"optimizer": a, "lr_scheduler": sched}, {"optimizer": b}], [a, b]),
        (None, []),
    ]
    for config, expected in forms:
        assert list(_optimizers_in(config)) == expected
