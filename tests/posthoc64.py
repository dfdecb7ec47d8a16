"""The tests' oracle for post-hoc EMA, written from issue 8's text (EDM2 eqs. 121–127), sharing no code with
``triton_ema``.

It solves differently on purpose: the exponent by bisection on ``σ_rel(γ)`` (the package runs Newton on the
cubic), the inner products and the linear system in 50-digit decimal arithmetic with Gaussian elimination (the
package uses float64 SVD least squares), so the package's float64 answer is compared with the exact one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from decimal import Decimal, localcontext

import torch
from torch import Tensor

DIGITS = 50


def sigma_rel64(gamma: float) -> float:
    """``sqrt((γ+1) / ((γ+2)² (γ+3)))``."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma64(sigma_rel: float) -> float:
    """The γ ≥ 0 with ``sigma_rel64(γ) == sigma_rel``, by bisection (σ_rel falls monotonically with γ)."""
    lo, hi = 0.0, 1.0
    while sigma_rel64(hi) > sigma_rel:
        lo, hi = hi, hi * 2
    while True:
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            return mid
        if sigma_rel64(mid) > sigma_rel:
            lo = mid
        else:
            hi = mid


def _dec(x: float | int) -> Decimal:
    # Decimal(float) is the binary value exactly, so the oracle sees the same inputs as the package.
    return Decimal(x)


@functools.lru_cache(maxsize=4096)
def _ln(x: float) -> Decimal:
    with localcontext() as ctx:
        ctx.prec = DIGITS
        return _dec(x).ln()


def inner_exact(t_a: float, g_a: float, t_b: float, g_b: float) -> Decimal:
    """``∫_0^min(t_a,t_b) p_a(τ) p_b(τ) dτ`` with ``p(τ) = (γ+1) τ^γ / t^(γ+1)``, integrated by hand, in decimal."""
    with localcontext() as ctx:
        ctx.prec = DIGITS
        ga, gb = _dec(g_a), _dec(g_b)
        # ∫_0^m τ^(ga+gb) dτ = m^(ga+gb+1) / (ga+gb+1), divided by the normalisers t_a^(ga+1) t_b^(gb+1)
        log = (ga + gb + 1) * _ln(min(t_a, t_b)) - (ga + 1) * _ln(t_a) - (gb + 1) * _ln(t_b)
        return (ga + 1) * (gb + 1) / (ga + gb + 1) * log.exp()


def _gauss_solve(a: list[list[Decimal]], b: list[Decimal]) -> list[Decimal]:
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[piv] = m[piv], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            if f:
                for c in range(col, n + 1):
                    m[r][c] -= f * m[col][c]
    x = [Decimal(0)] * n
    for r in range(n - 1, -1, -1):
        s = m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))
        x[r] = s / m[r][r]
    return x


def coefficients64(snapshots: Sequence[tuple[float, float]], target_t: float, target_gamma: float) -> Tensor:
    """``x`` solving ``A x = b`` (``A_ij = ⟨p_i, p_j⟩``, ``b_i = ⟨p_i, p_target⟩``), normalised to ``Σ x = 1``."""
    with localcontext() as ctx:
        ctx.prec = DIGITS
        n = len(snapshots)
        a = [[Decimal(0)] * n for _ in range(n)]
        for i, (ti, gi) in enumerate(snapshots):
            for j in range(i, n):
                a[i][j] = a[j][i] = inner_exact(ti, gi, *snapshots[j])
        b = [inner_exact(ti, gi, target_t, target_gamma) for ti, gi in snapshots]
        x = _gauss_solve(a, b)
        total = sum(x)
        return torch.tensor([float(v / total) for v in x], dtype=torch.float64)


def condition64(snapshots: Sequence[tuple[float, float]]) -> float:
    """The 2-norm condition number of ``A`` (to keep the coefficient comparison a well-posed one)."""
    a = torch.tensor([[float(inner_exact(ti, gi, tj, gj)) for tj, gj in snapshots] for ti, gi in snapshots])
    return float(torch.linalg.cond(a.double()))


def weight_exact(t: int, dt: int, gamma: float) -> Decimal:
    """``1 − (1 − dt/t)^(γ+1)`` in decimal (1 for the first update, ``dt >= t``)."""
    with localcontext() as ctx:
        ctx.prec = DIGITS
        if dt >= t:
            return Decimal(1)
        base = 1 - Decimal(dt) / Decimal(t)
        return 1 - (base ** (_dec(gamma) + 1))


class PowerEma64:
    """A float64 power-function EMA of a list of tensors, stepped once per optimizer step.

    Updates on steps with ``step % every == 0``; with ``u = step − after``, a copy while ``u <= every`` is not yet
    past the first update, else ``β = (1 − every/u)^(γ+1)``.
    """

    def __init__(self, params: Sequence[Tensor], gamma: float, every: int = 1, after: int = 0) -> None:
        self.shadows = [p.detach().double().clone() for p in params]
        self.gamma, self.every, self.after = gamma, every, after
        self.step_count = 0

    def step(self, params: Sequence[Tensor]) -> None:
        self.step_count += 1
        if self.step_count % self.every:
            return
        u = self.step_count - self.after
        w = 1.0 if u <= self.every else float(weight_exact(u, self.every, self.gamma))
        for s, p in zip(self.shadows, params):
            s.mul_(1 - w).add_(p.detach().double(), alpha=w)
