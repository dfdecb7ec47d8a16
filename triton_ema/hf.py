"""transformers integration: a ``Trainer`` that trains with an EMA, evaluates and saves the EMA model.

Needs ``transformers`` (``pip install 'triton-ema[hf]'``); ``import triton_ema`` does not import this module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from triton_ema.wrapper import EMAOptimizerWrapper

try:
    import safetensors.torch
    from transformers import Trainer
    from transformers.utils import logging
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("triton_ema.hf needs the transformers package: pip install 'triton-ema[hf]'") from e

__all__ = ["EMA_WEIGHTS_NAME", "EMATrainer", "EMATrainerMixin"]

#: The file, in every checkpoint directory, that holds the EMA keyed by the model's parameter (and buffer) names;
#: profile ``k > 0`` under ``profile{k}/<name>``.
EMA_WEIGHTS_NAME = "ema.safetensors"
EMA_EVAL = ("ema", "both", "raw")

logger = logging.get_logger(__name__)


class EMATrainerMixin:
    r"""Trains with an :class:`~triton_ema.EMAOptimizerWrapper`; evaluates, predicts and saves with the EMA.

    Put it in front of any ``transformers.Trainer`` subclass (``class MyTrainer(EMATrainerMixin, SFTTrainer)``);
    :class:`EMATrainer` is the mixin on ``Trainer`` itself.

    - The optimizer the Trainer creates (or the one given in ``optimizers=``) is wrapped as
      ``EMAOptimizerWrapper(optimizer, **ema_kwargs)``, before the LR scheduler is built and before accelerate
      prepares it, so both drive the wrapper. ``trainer.ema`` is the wrapper (``None`` until ``train()`` creates
      the optimizer); an optimizer that already is a wrapper is used as it is.
    - ``evaluate()`` and ``predict()`` run with the EMA swapped into the model (in place, no copy) and the
      trained weights are back afterwards, also when they raise. ``ema_eval="both"`` also evaluates the trained
      weights and adds their metrics with ``raw_`` after the metric prefix (``eval_raw_loss``) to the same log
      row, so ``metric_for_best_model`` can rank either (``predict()`` uses the EMA alone); ``"raw"`` evaluates
      and predicts with the trained weights. Inside the user's own ``with trainer.ema.ema_weights():`` both run
      with the EMA that is in the model already.
    - ``save_model()`` writes the EMA in the model's own ``save_pretrained`` format.
    - Checkpoints written during training keep the *trained* weights in the model files and the EMA in the
      optimizer state, so ``train(resume_from_checkpoint=...)`` continues bit-exactly. Each checkpoint also holds
      :data:`EMA_WEIGHTS_NAME`, the EMA keyed like the model, also with ``save_only_model=True``: it is loaded
      back with the best model (``load_best_model_at_end``), and on a resume from a checkpoint without optimizer
      state (where the EMA's step count, like the optimizer's, starts over).

    Args:
        ema_kwargs: keyword arguments of :class:`~triton_ema.EMAOptimizerWrapper` (``decay``, ``warmup``, ...).
        ema_eval: ``"ema"`` (default), ``"both"`` or ``"raw"``.

    Example:
        >>> trainer = EMATrainer(model=model, args=args, train_dataset=ds, eval_dataset=ds,  # doctest: +SKIP
        ...                      ema_kwargs={"decay": 0.999, "warmup": "litema"})
        >>> trainer.train()  # doctest: +SKIP
        >>> trainer.evaluate()  # the EMA model's metrics  # doctest: +SKIP
        >>> trainer.save_model("out")  # the EMA model, for from_pretrained("out")  # doctest: +SKIP
    """

    def __init__(self, *args: Any, ema_kwargs: dict[str, Any] | None = None, ema_eval: str = "ema", **kwargs: Any):
        if ema_eval not in EMA_EVAL:
            raise ValueError(f"ema_eval must be one of {', '.join(map(repr, EMA_EVAL))}, got {ema_eval!r}")
        self.ema_kwargs = dict(ema_kwargs or {})
        self.ema_eval = ema_eval
        self._ema: EMAOptimizerWrapper | None = None
        self._ema_swapped = False
        self._ema_in_checkpoint = False
        self._ema_raw_metrics: dict[str, float] = {}
        super().__init__(*args, **kwargs)

    @property
    def ema(self) -> EMAOptimizerWrapper | None:
        """The :class:`~triton_ema.EMAOptimizerWrapper` (``None`` until the optimizer is created)."""
        return self._ema

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        super().create_optimizer(*args, **kwargs)
        # A second train() finds accelerate's AcceleratedOptimizer around the wrapper of the first.
        found = self.optimizer
        while found is not None and not isinstance(found, EMAOptimizerWrapper):
            found = getattr(found, "optimizer", None)
        if found is None:
            self.optimizer = found = EMAOptimizerWrapper(self.optimizer, **self.ema_kwargs)
        self._ema = found
        return self.optimizer

    @contextmanager
    def ema_weights(self, evaluating: bool = False) -> Iterator[None]:
        """The EMA in the model inside; a no-op without a wrapper, when already in, and for evaluation with
        ``ema_eval="raw"``."""
        # Already in: by this trainer, or by the user's own ``with trainer.ema.ema_weights():`` (which does not nest).
        already = self._ema_swapped or (self._ema is not None and self._ema._dispatch.swapped)
        if self._ema is None or already or (evaluating and self.ema_eval == "raw"):
            yield
            return
        with self._ema.ema_weights():
            self._ema_swapped = True
            try:
                yield
            finally:
                self._ema_swapped = False

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"):
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, dict):  # Trainer.evaluate calls evaluate() again for each dataset
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.ema_eval == "both" and self._ema is not None and not self._ema_swapped:
            # The trained weights' metrics first, with neither a log row nor callbacks of their own: they join
            # the EMA's row (see log()), so callbacks and the best-model choice see both at once.
            loop = self.evaluation_loop(
                self.get_eval_dataloader(eval_dataset),
                description="Evaluation (trained weights)",
                prediction_loss_only=True if self.compute_metrics is None else None,
                ignore_keys=ignore_keys,
                metric_key_prefix=f"{metric_key_prefix}_raw",
            )
            self._ema_raw_metrics = dict(loop.metrics)
        try:
            with self.ema_weights(evaluating=True):
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._ema_raw_metrics = {}

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # In place: ``logs`` is the dict that evaluate() then passes to on_evaluate and returns.
        raw, self._ema_raw_metrics = self._ema_raw_metrics, {}
        logs.update(raw)
        super().log(logs, *args, **kwargs)

    def predict(self, test_dataset: Any, ignore_keys: list[str] | None = None, metric_key_prefix: str = "test"):
        with self.ema_weights(evaluating=True):
            return super().predict(test_dataset, ignore_keys, metric_key_prefix)

    # ------------------------------------------------------------------ saving
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self._ema_in_checkpoint:
            # A checkpoint: the trained weights, so that a resume continues training; the EMA beside them.
            super().save_model(output_dir, _internal_call)
            self._save_ema_file(output_dir if output_dir is not None else self.args.output_dir)
            return
        if self._ema is None:
            logger.warning("EMATrainer.save_model: no EMA yet (train() creates it); saving the model's weights")
        with self.ema_weights():
            super().save_model(output_dir, _internal_call)

    def _save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        self._ema_in_checkpoint = True
        try:
            super()._save_checkpoint(*args, **kwargs)
        finally:
            self._ema_in_checkpoint = False

    def _ema_names(self) -> tuple[list[str], list[str]]:
        """The model's names of the wrapper's parameters and buffers, in the wrapper's order."""
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        # A tied tensor under its first name, as named_parameters() gives it (GPT-2's wte, not lm_head).
        names = {id(t): n for n, t in model.named_parameters()}
        names.update({id(t): n for n, t in model.named_buffers()})
        # The tracked tensors, in the order of ema_params() and ema_buffers() (each tensor once).
        params, buffers = self._ema._tracked.params, self._ema._tracked.buffers
        return (
            [names.get(id(p), f"param.{i}") for i, p in enumerate(params)],
            [names.get(id(b), f"buffer.{i}") for i, b in enumerate(buffers)],
        )

    def _ema_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(file key, live EMA tensor) for every profile, parameter and buffer."""
        param_names, buffer_names = self._ema_names()
        for k in range(len(self._ema.profiles)):
            prefix = "" if k == 0 else f"profile{k}/"
            yield from ((prefix + n, t) for n, t in zip(param_names, self._ema.ema_params(k)))
            yield from ((prefix + n, t) for n, t in zip(buffer_names, self._ema.ema_buffers(k)))

    def _save_ema_file(self, output_dir: str) -> None:
        if self._ema is None or not self.args.should_save:
            return
        tensors = {name: t.detach().cpu().contiguous().clone() for name, t in self._ema_tensors()}
        os.makedirs(output_dir, exist_ok=True)
        safetensors.torch.save_file(tensors, os.path.join(output_dir, EMA_WEIGHTS_NAME), metadata={"format": "pt"})

    def _load_ema_file(self, checkpoint_dir: str | None) -> bool:
        """Copy a checkpoint's EMA file into the wrapper's shadows; False when there is no file or no wrapper."""
        path = os.path.join(checkpoint_dir, EMA_WEIGHTS_NAME) if checkpoint_dir else None
        if self._ema is None or path is None or not os.path.isfile(path):
            return False
        saved = safetensors.torch.load_file(path)
        live = dict(self._ema_tensors())
        if set(saved) != set(live):
            missing, extra = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
            raise ValueError(f"{path} does not fit the EMA: missing {missing[:5]}, unexpected {extra[:5]}")
        with torch.no_grad():
            for name, shadow in live.items():
                shadow.copy_(saved[name])
        return True

    # ------------------------------------------------------------------ loading
    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        # With the optimizer's state the EMA is back already (step count and schedule included); a checkpoint
        # saved with save_only_model=True has only the EMA file.
        if checkpoint is not None and self._ema is not None and self._ema.num_steps == 0:
            if self._load_ema_file(checkpoint):
                logger.warning(
                    f"{checkpoint} has no optimizer state: the EMA is loaded from {EMA_WEIGHTS_NAME}, and its "
                    "step count starts over with the optimizer's"
                )

    def _load_best_model(self) -> None:
        super()._load_best_model()
        self._load_ema_file(self.state.best_model_checkpoint)


class EMATrainer(EMATrainerMixin, Trainer):
    """A ``transformers.Trainer`` with an EMA of the weights: see :class:`EMATrainerMixin`."""
