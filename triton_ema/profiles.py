"""Power-function EMA profiles (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2): the exponent/width conversion, the tracking weight and the post-hoc reconstruction's linear algebra.

Everything here runs on the host in float64; nothing needs the wrapper.

**Time.** Time counts optimizer steps: after optimizer step ``step`` the profile's time is
``t = step - update_after_step``, and an update made every ``update_every`` steps has ``Δt = update_every``, so a
profile keeps its width whatever ``update_every`` is. A snapshot taken at time ``t`` of a profile with exponent γ
averages the trajectory with the density

    p(τ) = (γ + 1) τ^γ / t^(γ + 1)    on [0, t],

whose relative width (standard deviation over ``t``) is ``σ_rel(γ) = sqrt((γ + 1) / ((γ + 2)² (γ + 3)))``.

Example:
    >>> from triton_ema.profiles import sigma_rel_to_gamma, gamma_to_sigma_rel, power_weight
    >>> round(sigma_rel_to_gamma(0.10), 2)
    6.94
    >>> round(gamma_to_sigma_rel(sigma_rel_to_gamma(0.05)), 12)
    0.05
    >>> power_weight(1, 1, 6.94)      # the first update is a copy
    1.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

#: The widest power-function profile: γ = 0, the uniform average over [0, t].
SIGMA_REL_MAX = 12.0**-0.5

#: Up to this many snapshots :func:`solve_coefficients` solves by SVD, beyond by pivoted QR (under 0.1 s here).
SVD_MAX_SNAPSHOTS = 512


def _check_sigma_rel(sigma_rel: float) -> float:
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)):
        raise TypeError(f"sigma_rel must be a float, got {type(sigma_rel).__name__}")
    if not 0.0 < sigma_rel < SIGMA_REL_MAX:  # also refuses NaN
        raise ValueError(
            f"Invalid sigma_rel value: {sigma_rel}. Please provide a value in the open range (0, 12**-0.5 = "
            f"{SIGMA_REL_MAX:.6f})."
        )
    return float(sigma_rel)


def _check_gamma(gamma: float) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"gamma must be a float, got {type(gamma).__name__}")
    if not (math.isfinite(gamma) and gamma >= 0.0):
        raise ValueError(f"Invalid gamma value: {gamma}. It must be a finite number >= 0.")
    return float(gamma)


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative width ``sqrt((γ+1) / ((γ+2)² (γ+3)))`` of the profile with exponent ``gamma >= 0``."""
    g = _check_gamma(gamma)
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent γ of the profile of relative width ``sigma_rel``, for ``0 < sigma_rel < 12**-0.5``.

    γ is the largest real root of ``f(γ) = γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²)``.
    """
    s2 = _check_sigma_rel(sigma_rel) ** -2
    c, d = 16.0 - s2, 12.0 - s2
    # f(0) = 12 - σ⁻² < 0 and f(σ⁻²) = s³ + 6s² + 15s + 12 > 0, so the largest root lies in (0, σ⁻²), where f is
    # increasing past its last turning point and convex (f'' = 6γ + 14 > 0): Newton's method started from σ⁻² falls
    # monotonically onto that root and never jumps to a smaller one.
    g = s2
    for _ in range(200):
        f = ((g + 7.0) * g + c) * g + d
        df = (3.0 * g + 14.0) * g + c
        step = f / df
        g_next = g - step
        if not g_next < g:  # monotone descent stalled: converged to the last ulp
            break
        g = g_next
    return g


def power_weight(t: float, dt: float, gamma: float) -> float:
    """The update weight ``w = 1 − β`` of a power-function profile, in float64.

    ``β = (1 − Δt/t)^(γ+1)`` with ``t`` the profile's time after the step (``step − update_after_step``) and
    ``Δt`` the time since its previous update (``update_every``); the update is ``shadow += w · (θ − shadow)``.
    The first update (``dt >= t``) is a copy: ``w = 1``.

    ``w`` is evaluated as ``−expm1((γ+1) · log1p(−Δt/t))``, which never subtracts two numbers close to one: at
    ``t = 1e9`` the weight is about ``(γ+1)·1e-9`` and keeps float64's relative precision.
    """
    if not (t > 0 and dt > 0):
        raise ValueError(f"power_weight needs t > 0 and dt > 0, got t={t}, dt={dt}")
    if dt >= t:
        return 1.0
    return -math.expm1((float(gamma) + 1.0) * math.log1p(-float(dt) / float(t)))


def profile_inner_product(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """``⟨p_a, p_b⟩ = ∫ p_a p_b dτ`` of two snapshot profiles (exponents γ, times t), in closed form.

    ``(γ_a+1)(γ_b+1) (t_a/t_b)^e / ((γ_a+γ_b+1) · max(t_a, t_b))`` with ``e = γ_b`` if ``t_a < t_b`` else ``−γ_a``.
    :func:`inner_products` is the same over arrays.
    """
    e = gamma_b if t_a < t_b else -gamma_a
    return (gamma_a + 1.0) * (gamma_b + 1.0) * (t_a / t_b) ** e / ((gamma_a + gamma_b + 1.0) * max(t_a, t_b))


def inner_products(t_a: Tensor, gamma_a: Tensor, t_b: Tensor, gamma_b: Tensor) -> Tensor:
    """:func:`profile_inner_product` elementwise over broadcast float64 tensors (``t_a[:, None]`` against
    ``t_b[None, :]`` gives the whole Gram matrix in a few array operations)."""
    e = torch.where(t_a < t_b, gamma_b, -gamma_a)
    return (gamma_a + 1.0) * (gamma_b + 1.0) * (t_a / t_b) ** e / ((gamma_a + gamma_b + 1.0) * torch.maximum(t_a, t_b))


def solve_coefficients(
    snapshots: Sequence[tuple[float, float]], target_t: float, target_gamma: float | Sequence[float]
) -> Tensor:
    """The least-squares weights ``x`` with ``Σ x_i p_i ≈ p_target``, normalised to ``Σ x = 1``; float64.

    ``snapshots`` is a list of ``(t, gamma)``, one per stored snapshot (every profile, every time). Solves
    ``A x = b`` with ``A_ij = ⟨p_i, p_j⟩`` and ``b_i = ⟨p_i, p_target⟩`` in float64, then divides by ``Σ x``.
    ``target_gamma`` may be a sequence: the result is then ``[len(snapshots), len(target_gamma)]``, one column per
    target, from one factorisation.

    ``A`` and ``b`` are built as arrays (:func:`inner_products`) and solved by LAPACK least squares, which copes
    with a numerically singular ``A`` (repeated snapshots, or the near-collinear profiles of many closely spaced
    snapshots) by dropping the directions below float64's resolution instead of amplifying them as a plain LU
    solve (EDM2's ``np.linalg.solve``) does. Up to :data:`SVD_MAX_SNAPSHOTS` snapshots the solver is the SVD
    (``gelsd``: the minimum-norm solution, reproducible to the last bits); beyond, where the SVD costs ten LU
    solves, a rank-revealing QR with column pivoting (``gelsy``: also minimum-norm, about 1.5 LU solves), whose
    coefficients can differ by about 1e-12 from run to run as the rank decision meets rounding.
    """
    if len(snapshots) == 0:
        raise ValueError("solve_coefficients needs at least one snapshot")
    many = not isinstance(target_gamma, (int, float))
    gammas_out = [_check_gamma(g) for g in target_gamma] if many else [_check_gamma(target_gamma)]
    if not target_t > 0:
        raise ValueError(f"target_t must be > 0, got {target_t}")
    pairs = torch.tensor([(float(t), float(g)) for t, g in snapshots], dtype=torch.float64)
    ts, gs = pairs[:, 0], pairs[:, 1]
    if not bool((ts > 0).all()):
        raise ValueError(f"snapshot times must be > 0, got {float(ts[~(ts > 0)][0])}")
    bad = ~(torch.isfinite(gs) & (gs >= 0))
    if bool(bad.any()):
        _check_gamma(float(gs[bad][0]))  # raises with the value
    ts = ts / float(target_t)  # A and b scale as 1/t: normalising keeps entries near 1
    a = inner_products(ts[:, None], gs[:, None], ts[None, :], gs[None, :])
    # One column at a time, each the same 1-D computation: a target's column must not depend on the others.
    b = torch.stack([inner_products(ts, gs, torch.ones_like(ts), torch.full_like(ts, g)) for g in gammas_out], 1)
    driver = "gelsd" if len(ts) <= SVD_MAX_SNAPSHOTS else "gelsy"
    x = torch.linalg.lstsq(a, b, driver=driver).solution
    x = x / x.sum(dim=0, keepdim=True)
    return x if many else x[:, 0]
