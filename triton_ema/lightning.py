"""Lightning integration: validate, test and predict with the EMA weights; keep the EMA in checkpoints.

Needs ``lightning`` (``pip install triton-ema[lightning]``); ``import triton_ema`` does not import this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import torch
from torch.optim import Optimizer

from triton_ema.wrapper import EMAOptimizerWrapper, evaluation_only

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


class EMACallback(pl.Callback):
    r"""Runs validation, test (and optionally predict) with the EMA weights of an :class:`EMAOptimizerWrapper`.

    Return an :class:`~triton_ema.EMAOptimizerWrapper` from ``configure_optimizers`` and add this callback:
    on ``on_validation_start`` / ``on_test_start`` it enters :meth:`EMAOptimizerWrapper.ema_weights` of every
    wrapper in ``trainer.optimizers``, so the model holds the averaged weights in place (no copy of the model),
    and it leaves on ``on_validation_end`` / ``on_test_end``, on an exception (``on_exception``) and at
    ``teardown`` at the latest. Training steps never see the EMA weights.

    Checkpoints need nothing from the callback: Lightning saves ``optimizer.state_dict()``, which carries the
    shadows and the step count under ``"ema"``, and ``trainer.fit(ckpt_path=...)`` restores them bit-exactly.
    What the callback guarantees is that a checkpoint always holds the *trained* weights in ``"state_dict"``,
    also one written while the EMA is swapped in (``trainer.save_checkpoint`` from a validation hook, say), so
    that resuming continues the training and not the average. ``ModelCheckpoint`` callbacks run after this one
    in every hook (Lightning moves them last), so their saves on validation end already see the trained
    weights. A weights-only checkpoint written inside the swap (Lightning calls no callback hook for those)
    holds what the model holds then: the EMA.

    For ``trainer.validate/test/predict(ckpt_path=...)`` outside ``fit`` the optimizers are not restored by
    Lightning, so the callback rebuilds them with ``configure_optimizers()`` and loads the EMA from the
    checkpoint's ``"optimizer_states"``, pairing the checkpoint's weights with the checkpoint's average. Without
    a checkpoint, an evaluation after ``fit`` on the same trainer uses the live wrappers.

    Args:
        validate: use the EMA weights in validation (also the sanity check).
        test: use the EMA weights in ``trainer.test``.
        predict: use the EMA weights in ``trainer.predict``.

    Example:
        >>> class Model(L.LightningModule):
        ...     def configure_optimizers(self):
        ...         return EMAOptimizerWrapper(torch.optim.AdamW(self.parameters(), lr=1e-3), decay=0.999)
        >>> trainer = L.Trainer(callbacks=[EMACallback()])  # doctest: +SKIP
        >>> trainer.fit(Model(), datamodule=dm)  # validation metrics are the EMA model's  # doctest: +SKIP
    """

    def __init__(self, *, validate: bool = True, test: bool = True, predict: bool = False) -> None:
        super().__init__()
        self.validate = validate
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
            stack.close()

    # ------------------------------------------------------------------ evaluation hooks
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.validate:
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
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._stack is None:
            return
        # Saved inside the swap: "state_dict" was taken from a model that holds the EMA. Take it again from the
        # trained weights (copies, since the EMA goes back in before the file is written). The wrapper's own
        # state_dict already copies the shadows while swapped, so "optimizer_states" is right as it is.
        self._swap_out()
        try:
            checkpoint["state_dict"] = _clone_tensors(trainer.strategy.lightning_module_state_dict())
        finally:
            self._swap_in(trainer, pl_module)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # During fit Lightning restores the optimizers (and with them the EMA) itself.
        if trainer.state.fn != TrainerFn.FITTING:
            self._loaded_states = checkpoint.get("optimizer_states", [])
            self._eval_wrappers = None
