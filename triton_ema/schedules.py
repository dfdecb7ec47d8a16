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

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

#: Warmup names accepted by :class:`Schedule`, mapped to the kernel's constexpr code.
WARMUPS: dict[str | None, int] = {None: 0, "litema": 1, "power": 2}


def _elapsed(t: int, update_after_step: int, update_every: int) -> int | None:
    """``u = t - update_after_step`` for a step ``t`` that updates, ``None`` for one that does not."""
    if t < 1:
        raise ValueError(f"step counts start at 1, got {t}")
    if t % update_every:
        return None
    return t - update_after_step


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
        u = _elapsed(t, self.update_after_step, self.update_every)
        if u is None:
            return None
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


@dataclass(frozen=True)
class PowerProfile:
    """An EDM2 power-function EMA profile of relative width ``sigma_rel`` (Karras et al. 2024).

    With ``u = t - update_after_step`` the time after step ``t`` and ``Δt = update_every``
    the time between updates, an update moves the shadow with weight
    ``w = 1 - (1 - Δt/u) ** (γ + 1)``, ``γ = sigma_rel_to_gamma(sigma_rel)``; the first
    update (``u <= Δt``) and steps with ``u <= 0`` copy. Time counts optimizer steps,
    so the profile keeps its width whatever ``update_every`` is.
    """

    sigma_rel: float
    update_after_step: int = 0
    update_every: int = 1

    def __post_init__(self) -> None:
        from triton_ema.profiles import sigma_rel_to_gamma

        if isinstance(self.sigma_rel, bool) or not isinstance(self.sigma_rel, (int, float)):
            raise TypeError(f"sigma_rel must be a float, got {type(self.sigma_rel).__name__}")
        sigma_rel_to_gamma(float(self.sigma_rel))  # validates the range
        Schedule(update_after_step=self.update_after_step, update_every=self.update_every)

    @functools.cached_property
    def gamma(self) -> float:
        """The exponent, solved once (a root of a cubic: tens of microseconds, too much for every step)."""
        from triton_ema.profiles import sigma_rel_to_gamma

        return sigma_rel_to_gamma(float(self.sigma_rel))

    @property
    def is_constant(self) -> bool:
        return False

    def weight(self, t: int) -> float | None:
        from triton_ema.profiles import power_weight

        u = _elapsed(t, self.update_after_step, self.update_every)
        if u is None:
            return None
        if u <= 0:
            return 1.0
        return power_weight(u, self.update_every, self.gamma)

    def decay_at(self, t: int) -> float | None:
        w = self.weight(t)
        return None if w is None else 1.0 - w

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "power", **asdict(self)}


Profile = Schedule | PowerProfile


def profile_from_dict(d: dict[str, Any]) -> Profile:
    d = dict(d)
    kind = d.pop("kind", "decay")
    if kind == "power":
        return PowerProfile(**d)
    if kind != "decay":
        raise ValueError(f"unknown EMA profile kind {kind!r}")
    return Schedule(**d)


def profile_to_dict(p: Profile) -> dict[str, Any]:
    return p.to_dict() if isinstance(p, PowerProfile) else {"kind": "decay", **p.to_dict()}


class ProfileSet:
    """The K profiles a wrapper tracks. They share ``update_after_step`` and ``update_every``.

    :meth:`weights` gives the host's weights (the torch path);
    ``kernels.multi.profile_weights_`` computes the same on the device from the step
    counter, so the fused K-profile kernel needs nothing from the host and CUDA graphs
    keep working.
    """

    def __init__(self, members: tuple[Profile, ...]) -> None:
        if not members:
            raise ValueError("at least one EMA profile is needed")
        first = members[0]
        for m in members:
            if (m.update_after_step, m.update_every) != (first.update_after_step, first.update_every):
                raise ValueError("EMA profiles must share update_after_step and update_every")
            if type(m) is not type(first):
                raise ValueError("EMA profiles must be all decays or all sigma_rel")
            if isinstance(m, Schedule) and (m.warmup, m.warmup_gamma, m.warmup_power, m.min_decay) != (
                first.warmup,
                first.warmup_gamma,
                first.warmup_power,
                first.min_decay,
            ):
                raise ValueError("EMA profiles given as decays must share the warmup and min_decay")
        self.members = tuple(members)

    def __len__(self) -> int:
        return len(self.members)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ProfileSet) and self.members == other.members

    @property
    def single_schedule(self) -> Schedule | None:
        """The one classic schedule, when that is all there is (the single-profile kernel computes it itself)."""
        m = self.members[0]
        return m if len(self.members) == 1 and isinstance(m, Schedule) else None

    @property
    def update_every(self) -> int:
        return self.members[0].update_every

    @property
    def is_constant(self) -> bool:
        return all(m.is_constant for m in self.members)

    def weights(self, t: int) -> list[float] | None:
        ws = [m.weight(t) for m in self.members]
        return None if ws[0] is None else ws

    def to_list(self) -> list[dict[str, Any]]:
        return [profile_to_dict(m) for m in self.members]
