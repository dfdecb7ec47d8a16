"""Find the EMA behind the optimizer objects that training frameworks hand back."""

from __future__ import annotations

from typing import Any

from triton_ema.wrapper import EMAOptimizerWrapper


def find_ema(obj: Any) -> EMAOptimizerWrapper:
    """The :class:`EMAOptimizerWrapper` that ``obj`` is or wraps.

    ``obj`` may be the wrapper itself, accelerate's ``AcceleratedOptimizer`` or
    Lightning's ``LightningOptimizer`` around it (also one inside the other).
    Anything else raises ``TypeError`` naming what was found.

    Example:
        >>> ema = find_ema(trainer.optimizer)  # doctest: +SKIP
        >>> with ema.ema_weights(): ...  # doctest: +SKIP
    """
    chain, current = [], obj
    for _ in range(8):
        # Lightning's LightningOptimizer poses as an instance of the optimizer's class (a subclass made on the
        # fly, with a copy of its __dict__ whose step count goes stale): look inside it first.
        inner = getattr(current, "_optimizer", None)
        if inner is None and isinstance(current, EMAOptimizerWrapper):
            return current
        chain.append(type(current).__name__)
        # accelerate's AcceleratedOptimizer holds it as ``optimizer``.
        inner = inner if inner is not None else getattr(current, "optimizer", None)
        if inner is None or inner is current:
            break
        current = inner
    raise TypeError(
        f"no EMAOptimizerWrapper in {' wrapping '.join(chain)}: wrap the optimizer with "
        "triton_ema.EMAOptimizerWrapper before handing it to the framework"
    )
