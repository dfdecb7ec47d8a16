"""Post-hoc EMA that refuses what it cannot do (issue 14's reconstruction half): the solve at scale, names that
match the model, target steps, complex parameters, tensors added mid-run, refusals at construction."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import posthoc64 as oracle
from triton_ema.profiles import inner_products, profile_inner_product, sigma_rel_to_gamma, solve_coefficients

REPO = Path(__file__).resolve().parents[1]


# --- the solve, vectorised ----------------------------------------------------------------------------------------


def test_inner_products_match_the_scalar_form(seed: int) -> None:
    ts = torch.rand(6, dtype=torch.float64) * 1000 + 1
    gs = torch.rand(6, dtype=torch.float64) * 20
    ts[3] = ts[2]  # equal times take the t_a >= t_b branch
    got = inner_products(ts[:, None], gs[:, None], ts[None, :], gs[None, :])
    want = torch.tensor([[profile_inner_product(*a, *b) for b in zip(ts.tolist(), gs.tolist())] for a in zip(
        ts.tolist(), gs.tolist())], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)


def test_solve_refuses_bad_snapshots() -> None:
    with pytest.raises(ValueError, match="snapshot times must be > 0, got -1"):
        solve_coefficients([(100.0, 3.0), (-1.0, 7.0)], 100.0, 5.0)
    with pytest.raises(ValueError, match="Invalid gamma value: nan"):
        solve_coefficients([(100.0, 3.0), (50.0, float("nan"))], 100.0, 5.0)


def test_coefficients_on_many_snapshots_match_edm2() -> None:
    """On 1,200 snapshots the solve agrees with EDM2's algorithm where that one is still accurate, and costs
    at most 4x as much (the issue's bar; measured about 1.3x, the old per-element loop about 90x)."""
    sys.path.insert(0, str(REPO))
    from benchmarks import posthoc_solve

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the benchmark runs: a shared machine's second thread only waits at barriers
    try:
        r = posthoc_solve.measure(1200, rounds=3, points=2000)
    finally:
        torch.set_num_threads(threads)
    assert r["ratio"] < 4, r
    assert r["profile_error"]["triton_ema"] <= 1.01 * r["profile_error"]["edm2"] + 1e-9, r


def test_coefficients_agree_with_oracle_on_repeats() -> None:
    """Repeated snapshots make A singular: the least-squares solve still gives the oracle's profile."""
    g = [sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)]
    snaps = [(1000.0 * i, gg) for i in range(1, 6) for gg in g]
    x = solve_coefficients(snaps + snaps[-2:], 5000.0, sigma_rel_to_gamma(0.07))
    ref = oracle.coefficients64(snaps, 5000.0, sigma_rel_to_gamma(0.07))
    folded = x[:-2].clone()
    folded[-2:] += x[-2:]  # a repeated snapshot's weight belongs to the one it repeats
    torch.testing.assert_close(folded, ref, atol=1e-9, rtol=0)
