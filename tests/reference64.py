"""The tests' oracle: the schedule and the update in float64, written from the definitions.

It shares no code with ``triton_ema`` on purpose, so a mistake in the
package's schedule cannot hide behind the same mistake here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def decay64(
    t: int,
    *,
    decay: float,
    warmup: str | None = None,
    gamma: float = 1.0,
    power: float = 2 / 3,
    min_decay: float = 0.0,
    after: int = 0,
    every: int = 1,
) -> float | None:
    """The decay ``d`` of step ``t`` (1-based), 0.0 for a copy, or None when step ``t`` makes no update."""
    if t % every != 0:
        return None
    if t <= after:
        return 0.0
    u = t - after
    if warmup == "litema":
        d = min(decay, (1 + u) / (10 + u))
    elif warmup == "power":
        if u == 1:
            return 0.0
        d = 1 - (1 + (u - 1) / gamma) ** -power
    else:
        d = decay
    return min(max(d, min_decay), decay)


class Ema64:
    """A float64 EMA of a list of tensors following ``decay64``."""

    def __init__(self, params: Sequence[Tensor], **schedule) -> None:
        self.shadows = [p.detach().double().clone() for p in params]
        self.schedule = schedule
        self.t = 0

    def step(self, params: Sequence[Tensor]) -> None:
        self.t += 1
        d = decay64(self.t, **self.schedule)
        if d is None:
            return
        for s, p in zip(self.shadows, params):
            s.mul_(d).add_(p.detach().double(), alpha=1 - d)


def poison_(tensors: Sequence[Tensor]) -> None:
    """Fill with NaN so that an element a kernel never writes fails the comparison."""
    for t in tensors:
        t.fill_(float("nan"))


def tol(dtype: torch.dtype) -> dict:
    """Tolerances against float64 for a shadow of ``dtype``."""
    return {
        torch.float32: {"atol": 2e-6, "rtol": 2e-6},
        torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
        torch.float16: {"atol": 2e-3, "rtol": 2e-3},
        torch.float64: {"atol": 1e-12, "rtol": 1e-12},
    }[dtype]
