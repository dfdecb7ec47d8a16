"""Post-hoc EMA (issue 8): profile math, snapshots on disk, reconstruction, the CLI.

The oracle is ``tests/posthoc64.py``: the algorithm rewritten from the issue's text, solved in 50-digit decimal.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import posthoc64 as oracle
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from triton_ema import posthoc
from triton_ema.profiles import (
    SIGMA_REL_MAX,
    gamma_to_sigma_rel,
    power_weight,
    profile_inner_product,
    sigma_rel_to_gamma,
    solve_coefficients,
)
from triton_ema.snapshot import SnapshotWriter, read_index

REPO = Path(__file__).resolve().parents[1]
BAD_SIGMAS = [0.0, -0.1, SIGMA_REL_MAX, 0.3, 1.0, math.nan, math.inf]


# --- exponent and width -----------------------------------------------------------------------------------------


def test_gamma_check_values() -> None:
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=5e-3)


@pytest.mark.parametrize("sigma_rel", [1e-4, 1e-3, 0.01, 0.05, 0.08, 0.10, 0.15, 0.2, 0.28, 0.2886])
def test_sigma_rel_round_trip(sigma_rel: float) -> None:
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma == pytest.approx(oracle.gamma64(sigma_rel), rel=1e-12)
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12, abs=0)
    # the largest root: the cubic is zero there and positive beyond it
    s2 = sigma_rel**-2
    cubic = lambda g: g**3 + 7 * g**2 + (16 - s2) * g + (12 - s2)
    assert abs(cubic(gamma)) <= 1e-9 * (gamma**3 + s2 * gamma + s2)
    assert cubic(gamma * (1 + 1e-9) + 1e-12) > 0


@pytest.mark.parametrize("gamma", [0.01, 0.5, 1.0, 3.5, 6.94, 16.97, 100.0, 1e4])
def test_gamma_round_trip(gamma: float) -> None:
    assert gamma_to_sigma_rel(gamma) == pytest.approx(oracle.sigma_rel64(gamma), rel=1e-14)
    assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-12)


@pytest.mark.parametrize("sigma_rel", BAD_SIGMAS, ids=str)
def test_sigma_rel_out_of_range(sigma_rel: float) -> None:
    with pytest.raises(ValueError, match=f"Invalid sigma_rel value: {sigma_rel}"):
        sigma_rel_to_gamma(sigma_rel)


@pytest.mark.parametrize("gamma", [-0.5, math.nan, math.inf])
def test_gamma_out_of_range(gamma: float) -> None:
    with pytest.raises(ValueError, match="Invalid gamma value"):
        gamma_to_sigma_rel(gamma)


# --- the tracking weight ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.5, 3.5578, 6.9372, 16.972, 96.99])
@pytest.mark.parametrize("dt", [1, 10, 100])
@pytest.mark.parametrize("t", [2, 3, 11, 150, 1000, 10**6, 10**9 - 7, 10**9])
def test_power_weight_precision(t: int, dt: int, gamma: float) -> None:
    """Against 50-digit decimal: the issue asks for 1e-6 relative up to t = 1e9; the host form keeps ~1e-15."""
    w = power_weight(t, dt, gamma)
    exact = oracle.weight_exact(t, dt, gamma)
    assert abs(Decimal(w) - exact) <= Decimal("1e-12") * exact


@pytest.mark.parametrize("t", [3, 1001, 10**9])
def test_power_weight_exact_rational(t: int) -> None:
    """Integer γ = 2: ``w = 1 − (1 − Δt/t)³`` exactly in fractions."""
    exact = 1 - (1 - Fraction(1, t)) ** 3
    assert abs(Fraction(power_weight(t, 1, 2.0)) - exact) <= Fraction(1, 10**12) * exact


def test_power_weight_first_update_is_a_copy() -> None:
    assert power_weight(10, 10, 6.94) == 1.0
    assert power_weight(5, 10, 6.94) == 1.0  # update_after_step not a multiple of update_every
    assert power_weight(11, 10, 6.94) < 1.0
    with pytest.raises(ValueError):
        power_weight(0, 1, 6.94)


def _tracked_weights(gamma: float, every: int, after: int, n_updates: int, dt: int | None = None) -> list:
    """One-hot histories: the weight the EMA gives each update's parameter, at a few measuring times."""
    dt = every if dt is None else dt
    steps = [s for s in range(every, (n_updates + 1) * every + after + 1, every) if s - after > 0]
    steps = steps[:n_updates]
    shadow = torch.zeros(len(steps), dtype=torch.float64)
    taus = torch.tensor([s - after for s in steps], dtype=torch.float64)
    measured = []
    for i, s in enumerate(steps):
        # (the first update is a copy anyway; forced so that the dt=1 control keeps a normalised weighting)
        w = 1.0 if i == 0 else power_weight(s - after, dt, gamma)
        shadow.mul_(1 - w)
        shadow[i] += w
        if i + 1 in (n_updates // 4, n_updates // 2, n_updates):
            measured.append((s - after, taus[: i + 1].clone(), shadow[: i + 1].clone()))
    return measured


def _moments(t: float, taus: torch.Tensor, weights: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation of the weighting over normalised time τ/t."""
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
    mean = (weights * taus).sum()
    return float(mean / t), float(((weights * (taus - mean) ** 2).sum()).sqrt() / t)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10, 0.15])
@pytest.mark.parametrize("every,after", [(1, 0), (10, 0), (100, 0), (10, 37)], ids=lambda v: str(v))
def test_tracked_width(sigma_rel: float, every: int, after: int) -> None:
    """The profile's measured σ_rel is the requested one, whatever update_every (time counts steps)."""
    gamma = sigma_rel_to_gamma(sigma_rel)
    for t, taus, weights in _tracked_weights(gamma, every, after, n_updates=1600):
        mean, width = _moments(t, taus, weights)
        assert width == pytest.approx(sigma_rel, rel=1e-2)
        assert mean == pytest.approx((gamma + 1) / (gamma + 2), rel=1e-2)  # the density's mean, (γ+1)/(γ+2)
    if every > 1:
        # The measurement sees the mistake the issue found in ema-pytorch 0.8.3 (Δt = 1 while updating every k).
        mean, width = _moments(*_tracked_weights(gamma, every, after, n_updates=1600, dt=1)[-1])
        assert abs(width / sigma_rel - 1) > 0.1 or abs(mean * (gamma + 2) / (gamma + 1) - 1) > 0.1


# --- coefficients -----------------------------------------------------------------------------------------------


def test_inner_product_is_the_integral() -> None:
    for ta, ga, tb, gb in [(1000, 6.94, 3000, 16.97), (3000, 6.94, 1000, 16.97), (500, 3.0, 500, 3.0)]:
        exact = float(oracle.inner_exact(ta, ga, tb, gb))
        assert profile_inner_product(ta, ga, tb, gb) == pytest.approx(exact, rel=1e-12)
        assert profile_inner_product(tb, gb, ta, ga) == pytest.approx(exact, rel=1e-12)


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("n_times", [8, 19, 32])
def test_coefficients_match_oracle(n_times: int, seed: int) -> None:
    rng = random.Random(seed)
    every, offset = rng.randint(50, 5000), rng.randint(0, 49)
    gammas = [sigma_rel_to_gamma(rng.uniform(0.03, 0.08)), sigma_rel_to_gamma(rng.uniform(0.09, 0.2))]
    times = [every * i - offset for i in range(1, n_times + 1)]
    snaps = [(t, g) for t in times for g in gammas]
    target_t = rng.choice(times[n_times // 2 :])
    snaps = [(t, g) for t, g in snaps if t <= target_t]
    target_gamma = sigma_rel_to_gamma(rng.uniform(0.04, 0.25))
    x = solve_coefficients(snaps, target_t, target_gamma)
    assert x.dtype == torch.float64 and x.shape == (len(snaps),)
    torch.testing.assert_close(x, oracle.coefficients64(snaps, target_t, target_gamma), atol=1e-10, rtol=0)
    # Several targets from one factorisation give the same columns, up to rounding. One and two right-hand sides
    # take different blocked paths through LAPACK's gelsd (MKL on one thread: up to 7e-13 apart at 64 snapshots),
    # so each column is its own backward-stable solve of the square, nonsingular A x = b. LAPACK's error bound
    # for it (Users' Guide §4.5, zero residual, p(n) taken as 1) is ‖x̂ − x‖₂ ≤ κ₂(A) ε ‖x‖₂; two such solves
    # lie within twice that of each other. (The normalisation by Σx ≈ 1 adds rounding of order ε.) Observed
    # over 500 seeds on one thread: at most 1% of the bound; a coefficient off by 1e-9 relative exceeds it.
    bound = 2 * oracle.condition64(snaps) * torch.finfo(torch.float64).eps * float(x.norm())
    for threads in sorted({1, torch.get_num_threads()}):
        with num_threads(threads):
            many = solve_coefficients(snaps, target_t, [target_gamma, gammas[0]])
        torch.testing.assert_close(
            many[:, 0], x, atol=bound, rtol=0, msg=lambda m, t=threads: f"{t} thread(s), bound {bound:.2e}: {m}"
        )


def test_coefficients_reproduce_a_stored_profile() -> None:
    """Asking for a profile that is among the snapshots picks exactly that snapshot."""
    g = [sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)]
    snaps = [(1000.0 * i, gg) for i in range(1, 9) for gg in g]
    x = solve_coefficients(snaps, 8000.0, g[1])
    expected = torch.zeros(len(snaps), dtype=torch.float64)
    expected[-1] = 1
    torch.testing.assert_close(x, expected, atol=1e-9, rtol=0)


# --- snapshots and reconstruction -------------------------------------------------------------------------------


def _write_run(
    directory: Path,
    *,
    shapes: dict[str, tuple[int, ...]],
    n_snapshots: int = 8,
    every: int = 50,
    sigmas: tuple[float, ...] = (0.05, 0.10),
    dtype: torch.dtype | None = None,
    rank: int = 0,
    after: int = 0,
    run: str | None = None,
) -> dict[int, dict[int, dict[str, torch.Tensor]]]:
    """Random-walk parameters tracked by float64 power EMAs; snapshots through SnapshotWriter.

    Returns ``{step: {profile: {name: float64 shadow}}}`` of what was written.
    """
    names = list(shapes)
    params = [torch.zeros(shapes[n], dtype=torch.float64) for n in names]
    gammas = [sigma_rel_to_gamma(s) for s in sigmas]
    emas = [oracle.PowerEma64(params, g, after=after) for g in gammas]
    written: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    with SnapshotWriter(directory, rank=rank, run=run) as writer:
        for step in range(1, n_snapshots * every + after + 1):
            params = [p + torch.randn_like(p) for p in params]
            for e in emas:
                e.step(params)
            if step > after and (step - after) % every == 0:
                written[step] = {}
                for k, (e, g, s) in enumerate(zip(emas, gammas, sigmas)):
                    tensors = dict(zip(names, e.shadows))
                    writer.submit(step, step - after, g, s, k, tensors, dtype=dtype or torch.float32)
                    written[step][k] = {n: t.clone() for n, t in tensors.items()}
    return written


SHAPES = {"layer.weight": (7, 5), "layer.bias": (7,), "scale": ()}
RUN = "0123456789abcdef" * 2  # the run id several ranks' writers share (the wrapper agrees on one under FSDP2)


def _oracle_sum(written: dict, sigma_rel: float, upto: int | None = None, after: int = 0) -> dict[str, torch.Tensor]:
    steps = sorted(s for s in written if upto is None or s <= upto)
    entries = [(s, k) for s in steps for k in sorted(written[s])]
    gammas = {k: sigma_rel_to_gamma(s) for k, s in enumerate((0.05, 0.10))}
    snaps = [(s - after, gammas[k]) for s, k in entries]
    x = oracle.coefficients64(snaps, steps[-1] - after, oracle.gamma64(sigma_rel))
    names = list(written[steps[0]][0])
    return {n: sum(float(xi) * written[s][k][n] for xi, (s, k) in zip(x, entries)) for n in names}


def test_index_format(tmp_path: Path) -> None:
    """The version 2 index read as plain JSON lines, as the module docstring describes it."""
    _write_run(tmp_path, shapes=SHAPES, n_snapshots=3, dtype=torch.bfloat16, after=7)
    lines = [json.loads(line) for line in (tmp_path / "index-r0.jsonl").read_text().splitlines()]
    header, lineage, listed, *entries = lines
    assert header["kind"] == "header" and header["format"] == "triton-ema-snapshots" and header["version"] == 2
    assert header["rank"] == 0 and len(header["run"]) == 32
    assert lineage == {"kind": "lineage", "lineage": "L0", "parent": None, "at": 0}
    assert listed["kind"] == "tensors" and listed["id"] == 0 and listed["shards"] is None
    # Stored once: every snapshot line refers to the list by id.
    assert listed["tensors"] == {n: {"dtype": "bfloat16", "shape": list(s)} for n, s in SHAPES.items()}
    assert {e["kind"] for e in entries} == {"snapshot"} and {e["tensors"] for e in entries} == {0}
    assert [(e["step"], e["profile"]) for e in entries] == [(s, k) for s in (57, 107, 157) for k in (0, 1)]
    e = entries[0]
    assert e["file"] == "ema-s000000057-p0-r0.safetensors" and e["lineage"] == "L0"
    assert e["t"] == 50.0 and e["gamma"] == pytest.approx(16.97, abs=5e-3) and e["sigma_rel"] == 0.05
    assert e["dtype"] == "bfloat16"
    (read,) = read_index(tmp_path).values()
    assert read[0]["tensors"] == listed["tensors"] and read[0]["file"] == e["file"]
    with safe_open(str(tmp_path / e["file"]), framework="pt") as f:
        assert set(f.keys()) == set(SHAPES)
        meta = f.metadata()
        assert meta["step"] == "57" and meta["t"] == "50.0" and meta["profile"] == "0"
        assert meta["run"] == header["run"] and meta["lineage"] == "L0"
        assert f.get_tensor("layer.weight").dtype == torch.bfloat16
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_writer_copies_on_submit(tmp_path: Path) -> None:
    x = torch.ones(4)
    with SnapshotWriter(tmp_path) as w:
        w.submit(1, 1, 6.94, 0.1, 0, {"x": x})
        x.fill_(5)  # the caller keeps training; the snapshot holds the value at submit time
    assert load_file(str(tmp_path / "ema-s000000001-p0-r0.safetensors"))["x"].tolist() == [1.0] * 4


def test_writer_resumes_as_a_lineage_and_keeps_every_file(tmp_path: Path) -> None:
    """(Was: discard_after deleted the abandoned run's later files.) A resume at 20 is a lineage: the abandoned
    snapshot at 30 stays on disk, superseded; the snapshot at 20 itself is kept; the index is only appended to."""
    with SnapshotWriter(tmp_path) as w:
        for step in (10, 20, 30):
            w.submit(step, step, 6.94, 0.1, 0, {"x": torch.full((2,), float(step))})
    run = w.run
    before = (tmp_path / "index-r0.jsonl").read_bytes()
    with SnapshotWriter(tmp_path) as w:
        assert w.run == run and [e["step"] for e in w.entries] == [10, 20, 30]
        assert w.begin_lineage("L0", 20) == "L20"
        w.submit(30, 30, 6.94, 0.1, 0, {"x": torch.full((2,), -1.0)})
    assert (tmp_path / "index-r0.jsonl").read_bytes().startswith(before), "the index is only appended to"
    (entries,) = read_index(tmp_path).values()
    assert [(e["step"], e["lineage"]) for e in entries] == [(10, "L0"), (20, "L0"), (30, "L20")]
    assert load_file(str(tmp_path / entries[2]["file"]))["x"].tolist() == [-1.0, -1.0]
    abandoned = tmp_path / "ema-s000000030-p0-r0.safetensors"
    assert load_file(str(abandoned))["x"].tolist() == [30.0, 30.0]
    assert posthoc.prune(tmp_path) == [abandoned.name] and not abandoned.exists()
    assert [(e["step"], e["lineage"]) for e in read_index(tmp_path)[0]] == [(10, "L0"), (20, "L0"), (30, "L20")]


def test_writer_reports_write_errors_and_goes_on(tmp_path: Path) -> None:
    w = SnapshotWriter(tmp_path)
    # A directory where the file should go makes the write fail in the worker thread.
    (tmp_path / "ema-s000000005-p0-r0.safetensors").mkdir()
    with pytest.warns(RuntimeWarning, match="ema-s000000005-p0-r0.safetensors"):
        w.submit(5, 5, 6.94, 0.1, 0, {"x": torch.ones(2)})
        w.flush()
    assert w.failures == 1
    w.submit(6, 6, 6.94, 0.1, 0, {"x": torch.ones(2)})
    w.close()
    w.close()
    assert [e["step"] for e in read_index(tmp_path)[0]] == [6]
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    with pytest.raises(RuntimeError, match="closed"):
        w.submit(7, 7, 6.94, 0.1, 0, {"x": torch.ones(2)})


def test_writer_validates(tmp_path: Path) -> None:
    with SnapshotWriter(tmp_path) as w:
        with pytest.raises(ValueError, match="Invalid t value: 0"):
            w.submit(3, 0, 6.94, 0.1, 0, {"x": torch.ones(2)})
        with pytest.raises(ValueError, match="Invalid step value"):
            w.submit(-1, 1, 6.94, 0.1, 0, {"x": torch.ones(2)})
        with pytest.raises(ValueError, match="Invalid gamma value"):
            w.submit(1, 1, math.nan, 0.1, 0, {"x": torch.ones(2)})
        with pytest.raises(ValueError, match="shards names"):
            shards = {"y": {"dim": 0, "offset": 0, "global_shape": [2]}}
            w.submit(1, 1, 6.94, 0.1, 0, {"x": torch.ones(2)}, shards=shards)


@pytest.mark.gpu
def test_writer_cuda_copies_before_later_kernels(tmp_path: Path) -> None:
    """A CUDA tensor is copied on a side stream; the caller's stream waits, so a later in-place op cannot race it."""
    x = torch.arange(1 << 20, device="cuda", dtype=torch.float32)
    with SnapshotWriter(tmp_path) as w:
        event = w.submit(1, 1, 6.94, 0.1, 0, {"x": x, "h": x[::2]}, dtype=torch.bfloat16)
        x.mul_(-1)  # queued after the copy on the current stream
        assert isinstance(event, torch.cuda.Event)
    saved = load_file(str(tmp_path / "ema-s000000001-p0-r0.safetensors"))
    want = torch.arange(1 << 20, dtype=torch.float32).to(torch.bfloat16)
    assert torch.equal(saved["x"], want) and torch.equal(saved["h"], want[::2])


def test_doc_examples() -> None:
    import doctest

    from triton_ema import profiles, snapshot

    for module in (profiles, snapshot):
        failed, tried = doctest.testmod(module)
        assert tried > 0 and failed == 0


def test_atexit_flushes(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import torch
        from triton_ema.snapshot import SnapshotWriter
        w = SnapshotWriter({str(tmp_path)!r})
        for step in range(1, 6):
            w.submit(step, step, 6.94, 0.1, 0, {{"x": torch.randn(256, 256)}})
        # no flush, no close: the interpreter's exit must finish the writes
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)
    (entries,) = read_index(tmp_path).values()
    assert [e["step"] for e in entries] == [1, 2, 3, 4, 5]


def test_reconstruction_accuracy(tmp_path: Path, seed: int) -> None:
    """σ_rel 0.15 from profiles (0.05, 0.10), 32 snapshots, against a directly tracked σ_rel 0.15 EMA."""
    every, n = 100, 32
    theta = torch.zeros(256, dtype=torch.float64)
    g = [sigma_rel_to_gamma(s) for s in (0.05, 0.10)]
    tracked = [oracle.PowerEma64([theta], gg) for gg in g]
    direct = oracle.PowerEma64([theta], oracle.gamma64(0.15))
    with SnapshotWriter(tmp_path) as writer:
        for step in range(1, every * n + 1):
            theta = theta + torch.randn_like(theta)
            for e in (*tracked, direct):
                e.step([theta])
            if step % every == 0:
                for k, e in enumerate(tracked):
                    writer.submit(step, step, g[k], (0.05, 0.10)[k], k, {"theta": e.shadows[0]})
    want = direct.shadows[0]
    rel = lambda sigma: float((posthoc.reconstruct(tmp_path, sigma)["theta"].double() - want).norm() / want.norm())
    assert rel(0.15) <= 1e-2
    # ... and the comparison would notice the wrong length
    assert rel(0.12) > 1e-2


def test_reconstruct_equals_oracle_sum(tmp_path: Path, seed: int) -> None:
    written = _write_run(tmp_path, shapes=SHAPES, n_snapshots=10, after=13)
    state = posthoc.reconstruct(tmp_path, 0.13)
    assert list(state) == list(SHAPES) and all(v.dtype == torch.float32 for v in state.values())
    want = _oracle_sum(written, 0.13, after=13)
    for n in SHAPES:
        torch.testing.assert_close(state[n].double(), want[n], atol=1e-4, rtol=1e-5)
    # an earlier target uses only the snapshots up to it
    steps = sorted(written)
    early = posthoc.reconstruct(tmp_path, 0.13, step=steps[5], dtype=torch.float64)
    want = _oracle_sum(written, 0.13, upto=steps[5], after=13)
    for n in SHAPES:
        torch.testing.assert_close(early[n], want[n], atol=1e-4, rtol=1e-5)


def test_reconstruct_many_one_pass(tmp_path: Path, seed: int) -> None:
    _write_run(tmp_path, shapes=SHAPES, n_snapshots=6)
    sigmas = [0.06, 0.11, 0.2]
    many = posthoc.reconstruct_many(tmp_path, sigmas, out_dir=tmp_path / "out", progress=True)
    for s, got in zip(sigmas, many):
        one = posthoc.reconstruct(tmp_path, s)
        for n in SHAPES:
            torch.testing.assert_close(got[n], one[n], atol=1e-6, rtol=1e-6)
        saved = load_file(str(tmp_path / "out" / posthoc.output_name(s, 300)))
        assert saved.keys() == got.keys() and all(torch.equal(saved[n], got[n]) for n in got)
    out = tmp_path / "one.safetensors"
    state = posthoc.reconstruct(tmp_path, 0.11, out=out)
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["sigma_rel"] == "0.11" and f.metadata()["step"] == "300"
        assert torch.equal(f.get_tensor("layer.weight"), state["layer.weight"])


def test_sharded_reconstruction_assembles(tmp_path: Path, seed: int) -> None:
    """Two ranks' row shards reconstruct to the unsharded run's tensors (reconstruction is elementwise linear)."""
    full_dir, shard_dir = tmp_path / "full", tmp_path / "sharded"
    written = _write_run(full_dir, shapes={"w": (5, 3), "b": (5,)}, n_snapshots=6)
    rows = {0: (0, 3), 1: (3, 2)}  # FSDP2-like uneven split of 5 rows
    for rank, (offset, length) in rows.items():
        with SnapshotWriter(shard_dir, rank=rank, run=RUN) as writer:
            for step in sorted(written):
                for k, tensors in written[step].items():
                    pieces = {n: t.narrow(0, offset, length) for n, t in tensors.items()}
                    shards = {
                        n: {"dim": 0, "offset": offset, "global_shape": list(t.shape)} for n, t in tensors.items()
                    }
                    g = sigma_rel_to_gamma((0.05, 0.10)[k])
                    writer.submit(step, step, g, (0.05, 0.10)[k], k, pieces, torch.float32, shards=shards)
    want = posthoc.reconstruct(full_dir, 0.15)
    got = posthoc.reconstruct(shard_dir, 0.15)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-6)
    local = posthoc.reconstruct(shard_dir, 0.15, rank=1)
    torch.testing.assert_close(local["w"], want["w"][3:], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="Invalid rank value: 2"):
        posthoc.reconstruct(shard_dir, 0.15, rank=2)


def test_several_ranks_without_placements_refused(tmp_path: Path) -> None:
    for rank in (0, 1):
        _write_run(tmp_path, shapes={"w": (3,)}, n_snapshots=3, rank=rank, run=RUN)
    with pytest.raises(ValueError, match="no shard placement; pass rank="):
        posthoc.reconstruct(tmp_path, 0.15)
    assert posthoc.reconstruct(tmp_path, 0.15, rank=1)["w"].shape == (3,)


# --- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_rel", BAD_SIGMAS, ids=str)
def test_reconstruct_sigma_out_of_range(tmp_path: Path, sigma_rel: float) -> None:
    with pytest.raises(ValueError, match="Invalid sigma_rel value"):
        posthoc.reconstruct(tmp_path, sigma_rel)


def test_reconstruct_without_index(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no snapshot index"):
        posthoc.reconstruct(tmp_path, 0.1)
    with pytest.raises(ValueError, match="not a directory"):
        posthoc.reconstruct(tmp_path / "missing", 0.1)


def test_reconstruct_mismatched_shapes(tmp_path: Path) -> None:
    with SnapshotWriter(tmp_path) as w:
        for k, g in enumerate((16.97, 6.94)):
            w.submit(100, 100, g, 0.1, k, {"w": torch.ones(4)})
            w.submit(200, 200, g, 0.1, k, {"w": torch.ones(4 if k else 5)})
    with pytest.raises(ValueError, match="mismatched shapes between snapshots: 'w'"):
        posthoc.reconstruct(tmp_path, 0.1)


def test_reconstruct_mismatched_file(tmp_path: Path) -> None:
    """A file whose tensor disagrees with its index entry (replaced by hand) is caught while streaming."""
    _write_run(tmp_path, shapes={"w": (4,)}, n_snapshots=2)
    from safetensors.torch import save_file

    save_file({"w": torch.ones(3)}, str(tmp_path / "ema-s000000100-p1-r0.safetensors"))
    with pytest.raises(ValueError, match="mismatched shapes"):
        posthoc.reconstruct(tmp_path, 0.1)


def test_reconstruct_needs_two_profiles(tmp_path: Path) -> None:
    _write_run(tmp_path, shapes={"w": (4,)}, n_snapshots=3, sigmas=(0.05,))
    with pytest.raises(ValueError, match="at least two distinct profiles"):
        posthoc.reconstruct(tmp_path, 0.1)


def test_reconstruct_target_after_last_snapshot(tmp_path: Path) -> None:
    _write_run(tmp_path, shapes={"w": (4,)}, n_snapshots=3)
    with pytest.raises(ValueError, match="Invalid step value: 151. It is after the last snapshot"):
        posthoc.reconstruct(tmp_path, 0.1, step=151)
    posthoc.reconstruct(tmp_path, 0.1, step=150)


# --- crash safety and the CLI -----------------------------------------------------------------------------------


CRASHING_WRITER = """
import sys, torch
from triton_ema.snapshot import SnapshotWriter
w = SnapshotWriter(sys.argv[1])
x = torch.randn(2_000_000)
step = 0
while True:
    step += 100
    for k, g in enumerate((16.97, 6.94)):
        w.submit(step, step, g, 0.1, k, {"x": x, "y": x[:1000]})
"""


def test_killed_mid_write_leaves_a_readable_index(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_WRITER, str(tmp_path)], cwd=REPO)
    caught_mid_write = False
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            names = os.listdir(tmp_path)
            entries = read_index(tmp_path).get(0, []) if "index-r0.jsonl" in names else []
            if len(entries) >= 4 and any(".safetensors.tmp-" in n for n in names):
                os.kill(proc.pid, signal.SIGKILL)
                caught_mid_write = True
                break
            time.sleep(0.001)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert caught_mid_write, "the writer never got to four snapshots"
    (entries,) = read_index(tmp_path).values()
    for e in entries:  # every listed file is complete
        tensors = load_file(str(tmp_path / e["file"]))
        assert {n: list(t.shape) for n, t in tensors.items()} == {"x": [2_000_000], "y": [1000]}
    state = posthoc.reconstruct(tmp_path, 0.08)
    assert state["x"].shape == (2_000_000,) and torch.isfinite(state["x"]).all()


def test_cli(tmp_path: Path, seed: int) -> None:
    _write_run(tmp_path / "run", shapes=SHAPES, n_snapshots=4)
    cmd = [sys.executable, "-m", "triton_ema.posthoc", str(tmp_path / "run"), "--sigma-rel", "0.08,0.12,0.15"]
    done = subprocess.run([*cmd, "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    expected = [posthoc.output_name(s, 200) for s in (0.08, 0.12, 0.15)]
    assert sorted(os.listdir(tmp_path / "out")) == sorted(expected)
    assert done.stdout.split() == [str(tmp_path / "out" / n) for n in expected]
    for s, name in zip((0.08, 0.12, 0.15), expected):
        saved = load_file(str(tmp_path / "out" / name))
        want = posthoc.reconstruct(tmp_path / "run", s)
        assert all(torch.equal(saved[n], want[n]) for n in want)


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _write_run(tmp_path, shapes={"w": (2,)}, n_snapshots=2)
    assert posthoc.main([str(tmp_path), "--sigma-rel", "0.1,0.5", "--out", str(tmp_path / "out")]) == 2
    assert "Invalid sigma_rel value: 0.5" in capsys.readouterr().err
    assert posthoc.main([str(tmp_path / "none"), "--sigma-rel", "0.1", "--out", str(tmp_path / "out")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
