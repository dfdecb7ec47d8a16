"""Decay schedules, written once.

The Triton kernel evaluates the same formulas on the device from the step
counter; :meth:`Schedule.weight` is the host version used by the torch path
and by the tests' reference.

Everything is expressed through the update weight ``w = 1 - d`` rather than
the decay ``d``: with ``d = 0.9999`` the subtraction ``1 - d`` in fp32 is off
by about 1.7e-5 relative, so each form below avoids subtracting two numbers
close to one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

#: Warmup names accepted by :class:`Schedule`, mapped to the kernel's constexpr code.
WARMUPS: dict[str | None, int] = {None: 0, "litema": 1, "power": 2}


@dataclass(frozen=True)
class Schedule:
    """When to update the EMA and with what weight.

    With ``t`` the number of successful optimizer steps (1 on the first) and
    ``u = t - update_after_step``:

    * no update unless ``t % update_every == 0``;
    * ``u <= 0``: the shadow is set to the parameter (weight 1, a copy);
    * ``warmup=None``: ``d = decay``;
    * ``warmup="litema"``: ``d = min(decay, (1 + u) / (10 + u))``;
    * ``warmup="power"``: a copy when ``u == 1``, else
      ``d = 1 - (1 + (u - 1) / warmup_gamma) ** -warmup_power``;
    * then ``d`` is clamped to ``[min_decay, decay]`` (the copy is not).
    """

    decay: float = 0.9999
    warmup: str | None = None
    warmup_gamma: float = 1.0
    warmup_power: float = 2.0 / 3.0
    min_decay: float = 0.0
    update_after_step: int = 0
    update_every: int = 1

    def __post_init__(self) -> None:
        for name in ("decay", "min_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"{name} must be a float, got {type(value).__name__}")
            if not 0.0 <= value <= 1.0:  # also refuses NaN
                raise ValueError(f"Invalid {name} value: {value}. Please provide a value in [0, 1] range.")
        if self.min_decay > self.decay:
            raise ValueError(f"min_decay ({self.min_decay}) must not exceed decay ({self.decay})")
        if self.warmup not in WARMUPS:
            known = ", ".join(repr(k) for k in WARMUPS)
            raise ValueError(f"Unknown warmup {self.warmup!r}; expected one of {known}")
        if not (math.isfinite(self.warmup_gamma) and self.warmup_gamma > 0):
            raise ValueError(f"Invalid warmup_gamma value: {self.warmup_gamma}. It must be a finite number > 0.")
        if not (math.isfinite(self.warmup_power) and self.warmup_power > 0):
            raise ValueError(f"Invalid warmup_power value: {self.warmup_power}. It must be a finite number > 0.")
        for name in ("update_after_step", "update_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if self.update_after_step < 0:
            raise ValueError(f"Invalid update_after_step value: {self.update_after_step}. It must be >= 0.")
        if self.update_every < 1:
            raise ValueError(f"Invalid update_every value: {self.update_every}. It must be >= 1.")

    @property
    def warmup_code(self) -> int:
        return WARMUPS[self.warmup]

    @property
    def is_constant(self) -> bool:
        """True when every step updates with the same weight (so a host-computed weight may be replayed)."""
        return self.warmup is None and self.update_after_step == 0 and self.update_every == 1

    @property
    def min_weight(self) -> float:
        """``1 - decay``, the smallest weight, computed in float64."""
        return 1.0 - self.decay

    @property
    def max_weight(self) -> float:
        """``1 - min_decay``, the largest weight outside copies."""
        return 1.0 - self.min_decay

    def weight(self, t: int) -> float | None:
        """The weight ``w = 1 - d`` of step ``t`` in float64, or ``None`` if step ``t`` makes no update."""
        if t < 1:
            raise ValueError(f"step counts start at 1, got {t}")
        if t % self.update_every:
            return None
        u = t - self.update_after_step
        if u <= 0:
            return 1.0
        if self.warmup == "litema":
            w = max(self.min_weight, 9.0 / (10.0 + u))
        elif self.warmup == "power":
            if u == 1:
                return 1.0
            w = max(self.min_weight, (1.0 + (u - 1) / self.warmup_gamma) ** -self.warmup_power)
        else:
            w = self.min_weight
        return min(w, self.max_weight)

    def decay_at(self, t: int) -> float | None:
        """The decay ``d`` of step ``t`` (for display; the update uses :meth:`weight`)."""
        w = self.weight(t)
        return None if w is None else 1.0 - w

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
