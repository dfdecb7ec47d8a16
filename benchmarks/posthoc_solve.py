"""The post-hoc coefficient solve against EDM2's own, side by side on the same snapshot times (issue 14).

EDM2 (Karras et al. 2024, ``solve_posthoc_coefficients``) builds the Gram matrix of the snapshot profiles with
NumPy broadcasting and solves it with ``np.linalg.solve`` (LU, no pivoting for rank). The baseline below is that
published algorithm, written here from the paper's formula for ``⟨p_a, p_b⟩`` (the same closed form as
:func:`triton_ema.profiles.profile_inner_product`); :func:`triton_ema.profiles.solve_coefficients` builds the
same matrix with torch and solves it by rank-revealing least squares (``gelsy``) in float64.

Both get the same ``(t, γ)`` arrays (the exponents solved once per profile, outside the timing: EDM2's
``std_to_exp`` would add one ``np.roots`` per snapshot to its side) and one target. Rounds alternate the two in
rotating order; the figures are medians over rounds, and the ratio is of the medians. ``--threads`` sets both
torch's and NumPy's BLAS threads (1 by default: the machine is shared).

Also reported, per contender, the relative L2 error of the reconstructed profile ``‖Σ x_i p_i − p_target‖ /
‖p_target‖``, integrated on a fine grid in float64 (not through the ill-conditioned Gram matrix itself): the
solve's accuracy, not only its speed.

    python -m benchmarks.posthoc_solve [--snapshots 100,400,1200] [--rounds 7] [--threads 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def edm2_p_dot_p(t_a, gamma_a, t_b, gamma_b):  # noqa: ANN001, ANN201 - numpy arrays, as in the paper's code
    """EDM2's closed form of ``∫ p_a p_b`` (eq. 127 of the paper's appendix), broadcast."""
    import numpy as np

    t_ratio = t_a / t_b
    t_exp = np.where(t_a < t_b, gamma_b, -gamma_a)
    t_max = np.maximum(t_a, t_b)
    num = (gamma_a + 1) * (gamma_b + 1) * t_ratio**t_exp
    den = (gamma_a + gamma_b + 1) * t_max
    return num / den


def edm2_solve(in_t, in_gamma, out_t, out_gamma):  # noqa: ANN001, ANN201
    """EDM2's solve: Gram matrix and right-hand side by broadcasting, ``np.linalg.solve``, NaN/inf to 0."""
    import numpy as np

    rv = lambda x: np.float64(x).reshape(-1, 1)  # noqa: E731 - the paper's shorthand
    cv = lambda x: np.float64(x).reshape(1, -1)  # noqa: E731
    a = edm2_p_dot_p(rv(in_t), rv(in_gamma), cv(in_t), cv(in_gamma))
    b = edm2_p_dot_p(rv(in_t), rv(in_gamma), cv(out_t), cv(out_gamma))
    x = np.linalg.solve(a, b)
    return np.nan_to_num(x, nan=0, posinf=0, neginf=0)


def snapshot_times(
    n: int, every: int = 2000, sigma_rels: tuple[float, ...] = (0.05, 0.10)
) -> list[tuple[float, float]]:
    """``n`` snapshots: ``n / len(sigma_rels)`` times ``every`` apart, each with every profile."""
    from triton_ema.profiles import sigma_rel_to_gamma

    gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
    return [(float(every * i), g) for i in range(1, n // len(gammas) + 1) for g in gammas]


def profile_error(
    snaps: list[tuple[float, float]], x: object, target_t: float, target_gamma: float, points: int
) -> float:
    """``‖Σ x_i p_i − p_target‖₂ / ‖p_target‖₂`` on ``[0, target_t]``, by the midpoint rule on ``points`` points."""
    import torch

    tau = (torch.arange(points, dtype=torch.float64) + 0.5) / points * target_t
    ts = torch.tensor([t for t, _ in snaps], dtype=torch.float64)[:, None]
    gs = torch.tensor([g for _, g in snaps], dtype=torch.float64)[:, None]
    p = torch.where(tau[None, :] <= ts, (gs + 1) * (tau[None, :] / ts) ** gs / ts, torch.zeros(()))
    want = (target_gamma + 1) * (tau / target_t) ** target_gamma / target_t
    got = torch.as_tensor(x, dtype=torch.float64) @ p
    return float((got - want).norm() / want.norm())


def measure(n: int, rounds: int, points: int = 20_000, target_sigma_rel: float = 0.13) -> dict:
    """Median seconds of both solves on ``n`` snapshots, their ratio, and each one's profile error."""
    import numpy as np

    from triton_ema.profiles import sigma_rel_to_gamma, solve_coefficients

    snaps = snapshot_times(n)
    target_t, target_gamma = snaps[-1][0], sigma_rel_to_gamma(target_sigma_rel)
    in_t = np.array([t for t, _ in snaps])
    in_g = np.array([g for _, g in snaps])

    def ours():
        return solve_coefficients(snaps, target_t, target_gamma)

    def edm2():
        return edm2_solve(in_t, in_g, target_t, target_gamma)[:, 0]

    contenders = {"triton_ema": ours, "edm2": edm2}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for fn in contenders.values():
        fn()  # warm-up: LAPACK's first call, torch's first pow
    order = list(contenders)
    for r in range(rounds):
        for name in order[r % 2 :] + order[: r % 2]:
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    x_edm2 = edm2()
    return {
        "snapshots": n,
        "median_s": med,
        "ratio": med["triton_ema"] / med["edm2"],
        "profile_error": {
            "triton_ema": profile_error(snaps, ours(), target_t, target_gamma, points),
            "edm2": profile_error(snaps, x_edm2, target_t, target_gamma, points),
            "edm2_sum_of_coefficients": float(x_edm2.sum()),
        },
    }


def environment() -> dict:
    import numpy as np
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.posthoc_solve", description=__doc__.split("\n")[0])
    parser.add_argument("--snapshots", default="100,400,1200", help="comma-separated snapshot counts")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    # Before NumPy loads its BLAS: the thread count is read once, at import.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    results = {"environment": environment(), "results": []}
    print(json.dumps(results["environment"]))
    print(f"{'snapshots':>9} {'triton_ema s':>12} {'edm2 s':>9} {'ratio':>6} {'error ours':>11} {'error edm2':>11}")
    for n in (int(s) for s in args.snapshots.split(",")):
        r = measure(n, args.rounds)
        results["results"].append(r)
        m, e = r["median_s"], r["profile_error"]
        print(
            f"{n:>9} {m['triton_ema']:>12.4f} {m['edm2']:>9.4f} {r['ratio']:>6.2f} "
            f"{e['triton_ema']:>11.2e} {e['edm2']:>11.2e}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
