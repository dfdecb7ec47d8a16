"""Silent traps made loud: each is a ``UserWarning``, given once per wrapper.

* :meth:`~triton_ema.EMAOptimizerWrapper.ema_weights` before any update: the EMA
  is still the initial weights.
* The wrapped optimizer stepped without the EMA (``opt.optimizer.step()``, or a
  framework holding the inner optimizer): a step post-hook on the inner optimizer
  sees two of its steps with no EMA update between them.
* ``load_state_dict`` replacing the schedule given in code with the saved one.
* A loaded EMA older than the optimizer state beside it: the state dict was saved
  by a plain optimizer that had loaded a wrapper's state dict and trained on
  (:func:`triton_ema.strip_ema` gives it a state dict without the EMA).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

from torch import Tensor

from triton_ema.util import lr_is_zero


def inner_step(state: dict[str, Any]) -> float | None:
    """The inner optimizer's own step count in a state dict's ``state`` (Adam's ``"step"``), if it keeps one."""
    for entry in state.values():
        step = entry.get("step") if isinstance(entry, dict) else None
        if step is not None:
            return float(step.item() if isinstance(step, Tensor) else step)
    return None


class _InnerStepWatch:
    """A step post-hook of the inner optimizer (it holds the wrapper weakly: no cycle, nothing to pickle)."""

    def __init__(self, traps: Traps) -> None:
        self.traps = weakref.ref(traps)

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        traps = self.traps()
        if traps is not None:
            traps.inner_stepped(optimizer)


class Traps:
    """One wrapper's once-only warnings, and the hook that watches its inner optimizer."""

    def __init__(self, opt: Any) -> None:
        self.opt = weakref.ref(opt)
        self.warned: set[str] = set()
        self.seen_at: int | None = None
        self.handle = opt.optimizer.register_step_post_hook(_InnerStepWatch(self))

    def warn(self, kind: str, message: str) -> None:
        if kind not in self.warned:
            self.warned.add(kind)
            warnings.warn(message, UserWarning, stacklevel=4)

    def inner_stepped(self, optimizer: Any) -> None:
        opt = self.opt()
        # torch.distributed.checkpoint's state initialisation steps at a zero learning rate; it changes nothing.
        if opt is None or lr_is_zero(optimizer.param_groups):
            return
        if self.seen_at == opt._step:
            self.warn(
                "inner",
                f"the wrapped {type(optimizer).__name__} stepped twice without an EMA update in between: step "
                "the EMAOptimizerWrapper (opt.step()), not opt.optimizer, or call opt.update_ema() after each "
                "inner step; the EMA misses these steps",
            )
        self.seen_at = opt._step

    def before_swap(self, step: int) -> None:
        if step == 0:
            self.warn(
                "early",
                "ema_weights() before any EMA update: the EMA is still the initial weights (step the "
                "EMAOptimizerWrapper, or load a state dict, first)",
            )

    def loading(self, opt: Any, parsed: tuple) -> None:
        """Called with :func:`triton_ema.checkpoint.parse`'s result before it is loaded."""
        inner, meta, _, _, profiles = parsed
        ours, theirs = opt.profiles.to_list(), profiles.to_list()
        if ours != theirs:
            self.warn(
                "schedule",
                f"the state dict's EMA schedule {theirs} replaces the one given in code {ours}: the loaded "
                "one is used from now on, as load_state_dict restores a learning rate",
            )
        saved, now = meta.get("inner_step"), inner_step(inner.get("state", {}))
        if saved is not None and now is not None and now > saved:
            self.warn(
                "stale",
                f"the EMA in this state dict is older than the optimizer state beside it (the optimizer was at "
                f"step {saved:g} when the EMA was saved, its state here is at step {now:g}): it was saved by a "
                "plain optimizer that had loaded a wrapper's state dict and trained on without updating the "
                "EMA. Load triton_ema.strip_ema(state_dict) into plain optimizers.",
            )
