"""Lightning integration: validate, test and predict with the EMA weights; keep the EMA in checkpoints.

Needs ``lightning`` (``pip install triton-ema[lightning]``); ``import triton_ema`` does not import this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import torch
from torch.optim import Optimizer

from triton_ema.snapshot_schedule import evaluation_only
from triton_ema.wrapper import EMAOptimizerWrapper

try:
    import lightning.pytorch as pl
    from lightning.pytorch.trainer.states import TrainerFn
    from lightning.pytorch.utilities import rank_zero_warn
except ImportError as e:  # pragma: no cover - exercised only without lightning
    raise ImportError("triton_ema.lightning needs the lightning package: pip install 'triton-ema[lightning]'") from e

__all__ = ["EMACallback"]


def _unwrap(optimizer: Any) -> Any:
    """The optimizer behind a ``LightningOptimizer`` (``trainer.optimizers`` holds plain ones, ``optimizers()`` not)."""
    return getattr(optimizer, "_optimizer", optimizer)


def _optimizers_in(config: Any) -> Iterator[Optimizer]:
    """The optimizers of a ``configure_optimizers()`` result, in the order Lightning numbers them.

    Every documented form (an optimizer, a list or tuple of them, ``(optimizers, schedulers)``, a dict with an
    ``"optimizer"`` key, a list of such dicts) nests optimizers only in lists, tuples and dicts, and a scheduler
    is never an ``Optimizer``, so a walk in order finds exactly Lightning's list.
    """
    if isinstance(config, Optimizer):
        yield config
    elif isinstance(config, dict):
        for value in config.values():
            yield from _optimizers_in(value)
    elif isinstance(config, list | tuple):
        for item in config:
            yield from _optimizers_in(item)


def _clone_tensors(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return type(obj)((k, _clone_tensors(v)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(_clone_tensors(v) for v in obj)
    return obj


def _outside_inference_mode() -> ExitStack:
    stack = ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.no_grad())
    return stack


class EMACallback(pl.Callback):
    r"""Runs validation, test (and optionally predict) with the EMA weights of an :class:`EMAOptimizerWrapper`.

    Return an :class:`~triton_ema.EMAOptimizerWrapper` from ``configure_optimizers`` and add this callback:
    on ``on_validation_start`` / ``on_test_start`` it enters :meth:`EMAOptimizerWrapper.ema_weights` of every
    wrapper in ``trainer.optimizers``, so the model holds the averaged weights in place (no copy of the model),
    and it leaves on ``on_validation_end`` / ``on_test_end``, on an exception (``on_exception``) and at
    ``teardown`` at the latest. Training steps never see the EMA weights.

    Checkpoints (``checkpoint_weights="ema"``, the default) hold the EMA as the model's weights in
    ``"state_dict"``, so ``LightningModule.load_from_checkpoint(path)`` and ``ModelCheckpoint``'s best model give
    the EMA model that was evaluated and ranked. The trained weights travel in the callback's state
    (``checkpoint["callbacks"]["EMACallback"]["trained_state_dict"]``) and the EMA, with its step count, in
    ``"optimizer_states"``; when a trainer with this callback loads the checkpoint (``fit(ckpt_path=...)``,
    ``test(ckpt_path="best")``) it puts the trained weights back into the model, so a resume continues the
    training bit-exactly. ``checkpoint_weights="raw"`` keeps the trained weights in ``"state_dict"`` (the layout
    of earlier versions). Either way a checkpoint written inside the swap (``trainer.save_checkpoint`` from a
    validation hook) is laid out the same. A weights-only checkpoint (Lightning calls no callback hook for those)
    holds what the model holds when it is written: the EMA inside validation, the trained weights outside.

    For ``trainer.validate/test/predict(ckpt_path=...)`` outside ``fit`` the optimizers are not restored by
    Lightning, so the callback rebuilds them with ``configure_optimizers()`` and loads the EMA from the
    checkpoint's ``"optimizer_states"``, pairing the checkpoint's weights with the checkpoint's average. Without
    a checkpoint, an evaluation after ``fit`` on the same trainer uses the live wrappers.

    Args:
        validate: use the EMA weights in validation (also the sanity check); ``"both"`` also runs each validation
            batch with the trained weights and logs what ``validation_step`` logs under ``raw_`` + its name
            (``raw_val_loss``).
        test: use the EMA weights in ``trainer.test``.
        predict: use the EMA weights in ``trainer.predict``.
        checkpoint_weights: ``"ema"`` or ``"raw"``: which weights a checkpoint's ``"state_dict"`` holds.

    Example:
        >>> class Model(L.LightningModule):
        ...     def configure_optimizers(self):
        ...         return EMAOptimizerWrapper(torch.optim.AdamW(self.parameters(), lr=1e-3), decay=0.999)
        >>> trainer = L.Trainer(callbacks=[EMACallback()])  # doctest: +SKIP
        >>> trainer.fit(Model(), datamodule=dm)  # validation metrics are the EMA model's  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        validate: bool | str = True,
        test: bool = True,
        predict: bool = False,
        checkpoint_weights: str = "ema",
    ) -> None:
        super().__init__()
        if validate not in (True, False, "both"):
            raise ValueError(f"validate must be True, False or 'both', got {validate!r}")
        if checkpoint_weights not in ("ema", "raw"):
            raise ValueError(f"checkpoint_weights must be 'ema' or 'raw', got {checkpoint_weights!r}")
        self.validate = validate
        self.checkpoint_weights = checkpoint_weights
        self.test = test
        self.predict = predict
        self._stack: ExitStack | None = None
        # Optimizer states of a checkpoint loaded for an evaluation-only run, and the wrappers rebuilt from it.
        self._loaded_states: list[dict[str, Any]] | None = None
        self._eval_wrappers: list[EMAOptimizerWrapper] | None = None
        self._warned = False

    @property
    def swapped(self) -> bool:
        """Whether the EMA weights are in the model right now."""
        return self._stack is not None

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            rank_zero_warn(f"EMACallback: {message}")

    def _wrappers(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[EMAOptimizerWrapper]:
        if self._loaded_states is not None:
            if self._eval_wrappers is None:
                self._eval_wrappers = self._rebuild_from_checkpoint(pl_module, self._loaded_states)
            return self._eval_wrappers
        wrappers = [o for o in map(_unwrap, trainer.optimizers) if isinstance(o, EMAOptimizerWrapper)]
        if not wrappers:
            self._warn_once(
                "no EMAOptimizerWrapper in trainer.optimizers (return one from configure_optimizers); "
                "evaluating with the raw weights"
            )
        return wrappers

    def _rebuild_from_checkpoint(
        self, pl_module: pl.LightningModule, states: list[dict[str, Any]]
    ) -> list[EMAOptimizerWrapper]:
        # Outside fit, Lightning loads the checkpoint's weights but not its optimizers; the live wrappers (if
        # any) hold another run's average. A fresh wrapper over the same parameters, loaded from the
        # checkpoint, has the average that belongs to these weights.
        try:
            with evaluation_only():  # beside the live wrapper, which may be writing its snapshots
                optimizers = list(_optimizers_in(pl_module.configure_optimizers()))
        except Exception as e:
            self._warn_once(f"configure_optimizers() failed outside fit ({e!r}); evaluating with the raw weights")
            return []
        wrappers = []
        for i, opt in enumerate(optimizers):
            if not isinstance(opt, EMAOptimizerWrapper):
                continue
            if i >= len(states):
                self._warn_once(
                    f"the checkpoint has no state for optimizer {i} (saved with weights only?); "
                    "evaluating with the raw weights"
                )
                return []
            opt.load_state_dict(states[i])
            wrappers.append(opt)
        if not wrappers:
            self._warn_once("configure_optimizers() returns no EMAOptimizerWrapper; evaluating with the raw weights")
        return wrappers

    def _swap_in(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._stack is not None:
            return
        wrappers = self._wrappers(trainer, pl_module)
        if not wrappers:
            return
        stack = ExitStack()
        # Validation runs under torch.inference_mode; the swap's tensors must stay usable outside it.
        with _outside_inference_mode():
            try:
                for wrapper in wrappers:
                    stack.enter_context(wrapper.ema_weights())
            except BaseException:
                # Leave the wrappers already entered, so that a failure here never strands the EMA in the model.
                stack.close()
                raise
        self._stack = stack

    def _swap_out(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            with _outside_inference_mode():
                stack.close()

    # ------------------------------------------------------------------ evaluation hooks
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.validate:
            self._swap_in(trainer, pl_module)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.validate != "both" or self._stack is None:
            return
        # The same batch again with the trained weights; what validation_step logs goes under "raw_" + its name.
        log, log_dict = pl_module.log, pl_module.log_dict
        pl_module.log = lambda name, value, *args, **kwargs: log(f"raw_{name}", value, *args, **kwargs)
        pl_module.log_dict = lambda values, *args, **kwargs: log_dict(
            {f"raw_{k}": v for k, v in values.items()}, *args, **kwargs
        )
        self._swap_out()
        try:
            step_args = (batch, batch_idx, dataloader_idx) if len(trainer.num_val_batches) > 1 else (batch, batch_idx)
            pl_module.validation_step(*step_args)
        finally:
            del pl_module.log, pl_module.log_dict  # the instance attributes: the methods are back
            self._swap_in(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.test:
            self._swap_in(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.predict:
            self._swap_in(trainer, pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._swap_out()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._swap_out()
        self._loaded_states = None
        self._eval_wrappers = None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        # Never empty, so that Lightning keeps an entry for this callback, where on_save_checkpoint puts the
        # trained weights.
        return {"checkpoint_weights": self.checkpoint_weights}

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        wrappers = self._wrappers(trainer, pl_module) if self.checkpoint_weights == "ema" else []
        if self._stack is not None:
            # Saved inside the swap: "state_dict" was taken from a model that holds the EMA. Take the trained
            # weights (copies, since the EMA goes back in before the file is written). The wrapper's own
            # state_dict already copies the shadows while swapped, so "optimizer_states" is right as it is.
            ema = _clone_tensors(checkpoint["state_dict"])
            self._swap_out()
            try:
                trained = _clone_tensors(trainer.strategy.lightning_module_state_dict())
            finally:
                self._swap_in(trainer, pl_module)
        else:
            trained = checkpoint["state_dict"]  # the file is written before training changes these
            ema = None
            if wrappers:
                self._swap_in(trainer, pl_module)
                try:
                    ema = _clone_tensors(trainer.strategy.lightning_module_state_dict())
                finally:
                    self._swap_out()
        if not wrappers or ema is None:
            checkpoint["state_dict"] = trained
            return
        checkpoint["state_dict"] = ema
        checkpoint.setdefault("callbacks", {}).setdefault(self.state_key, {})["trained_state_dict"] = trained

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning has loaded "state_dict" (the EMA, in this callback's layout) into the model already: the trained
        # weights go back in, for a resume as for an evaluation that swaps the checkpoint's EMA in.
        trained = checkpoint.get("callbacks", {}).get(self.state_key, {}).get("trained_state_dict")
        if trained is not None:
            checkpoint["state_dict"] = trained
            trainer.strategy.load_model_state_dict(checkpoint, strict=pl_module.strict_loading)
        # During fit Lightning restores the optimizers (and with them the EMA) itself.
        if trainer.state.fn != TrainerFn.FITTING:
            self._loaded_states = checkpoint.get("optimizer_states", [])
            self._eval_wrappers = None
