"""The kernels' generated code for an H100 (sm_90a), compiled ahead of time: no GPU needed.

``benchmarks.codegen`` compiles each kernel with the arguments its launcher passes, specialised as the JIT
specialises them, in every config the autotuner can pick for it, and reads the PTX and the SASS. These
tests hold the code to what a memory-bound kernel needs on a GPU: no local memory, 128-bit accesses on
aligned tables, no layout conversion through shared memory, no approximate division, at most 128 registers
per thread; and the weights to the host's bits. The compiler runs once per session, in a subprocess: this
session may have Triton's interpreter on, which replaces the kernels with Python functions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("triton")

from benchmarks.codegen import toolchain_missing  # noqa: E402
from triton_ema.schedules import PowerProfile, Schedule  # noqa: E402

pytestmark = pytest.mark.skipif(toolchain_missing() is not None, reason=f"no sm_90 toolchain: {toolchain_missing()}")

ROOT = Path(__file__).resolve().parents[1]

#: Every config of each kernel, for one dtype pair of each config list (32-bit, 16-bit, mixed, K > 4).
CASES = "|".join(
    [
        r"^update-(fp32-fp32|bf16-fp32|bf16-bf16)-b",
        r"^update-fp32-fp32-(litema|power|guarded|every4|unaligned)-b1024-e4-w8$",
        r"^multi-k(4|8)-(fp32-fp32|bf16-fp32|bf16-bf16)-b",
        r"^guard-(fp32|bf16)-b",
        r"^(swap-(fp32|bf16)|backup-bf16-fp32|restore-bf16-fp32)-b",
        r"^weights-(decay|litema|power|warmup-power)-k8$",
    ]
)


#: Compiles in parallel, one per core (2 on CI: the set takes about 85 s of CPU, 45 s of wall time there).
JOBS = max(2, os.cpu_count() or 1)


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> dict[str, dict]:
    # A report written before (by ``python -m benchmarks.codegen``, say on another tree) is read instead.
    given = os.environ.get("TRITON_EMA_CODEGEN_REPORT")
    if given:
        return {r["name"]: r for r in json.loads(Path(given).read_text())["cases"]}
    out = tmp_path_factory.mktemp("codegen")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    subprocess.run(
        [sys.executable, "-m", "benchmarks.codegen", "--out", str(out), "--only", CASES, "--jobs", str(JOBS)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    cases = json.loads((out / "report.json").read_text())["cases"]
    return {r["name"]: r for r in cases}


def _widths(name: str) -> set[int]:
    return {16 if d in ("bf16", "fp16") else 32 for d in re.findall(r"-(fp32|bf16|fp16)", name)}


def test_every_kernel_was_compiled(rows):
    kernels = {r["kernel"] for r in rows.values()}
    assert kernels == {"update", "multi", "guard", "swap", "backup", "restore", "weights"}, kernels


def test_no_local_memory(rows):
    spilled = {n: r["spills"] for n, r in rows.items() if r["spills"]}
    assert not spilled, spilled


def test_at_most_128_registers(rows):
    heavy = {n: r["registers"] for n, r in rows.items() if r["registers"] > 128}
    assert not heavy, heavy


def test_no_layout_conversion_through_shared_memory(rows):
    """A ``BAR.SYNC`` in a streaming kernel is a layout conversion (the guard's one is its final reduction)."""
    bars = {
        n: r["bar_sync"] for n, r in rows.items() if r["kernel"] in ("update", "multi", "swap", "backup", "restore")
    }
    assert not any(bars.values()), {n: b for n, b in bars.items() if b}


def test_no_approximate_division(rows):
    approx = {n: r["divisions"] for n, r in rows.items() if any(not d.startswith("div.rn") for d in r["divisions"])}
    assert not approx, approx


def test_aligned_tables_get_128_bit_accesses(rows):
    """Every data access is 128 bits wide, a 16-bit parameter beside 32-bit shadows included (a thread holds 8
    elements: one 128-bit access of the parameter, two of each shadow). With more than 4 profiles a thread
    holds 4 elements (registers): the 32-bit shadows' accesses stay 128-bit, 16-bit data moves in 64-bit ones."""
    for name, r in rows.items():
        if r["kernel"] == "weights" or "unaligned" in name:
            continue
        if r["kernel"] == "multi" and int(re.search(r"-k(\d)", name)[1]) > 4:
            assert r["access_bits"] is not None and r["access_bits"] >= 64, (name, r["access_bits"])
            if 32 in _widths(name):
                assert any(op.endswith(".v4.b32") for op in r["vector_accesses"]), (name, r["vector_accesses"])
        else:
            assert r["access_bits"] == 128, (name, r["access_bits"], r["vector_accesses"])


def test_mixed_dtypes_hold_8_elements_per_thread(rows):
    """The configs of a 16-bit parameter with 32-bit shadows give a thread 8 elements (no BAR.SYNC: checked above)."""
    mixed = [r for n, r in rows.items() if len(_widths(n)) > 1 and not re.search(r"-k[5-8]-", n)]
    assert mixed
    for r in mixed:
        c = r["config"]
        assert c["BLOCK"] // (32 * c["num_warps"]) == 8, (r["name"], c)


#: Ceilings on the SASS instructions per element of the unmasked full-block path (``analyse``), about 10% above
#: the i16b figures (benchmarks/RESULTS.md); the K-profile update's, per profile.
INSTRUCTIONS_PER_ELEMENT = {"update": 16.5, "multi": 16.0, "guard": 3.75, "swap": 2.5, "backup": 11.0, "restore": 1.25}


def test_instructions_per_element_do_not_regress(rows):
    high = {}
    for name, r in rows.items():
        if r["instr_per_elem"] is None:
            continue
        ceiling = INSTRUCTIONS_PER_ELEMENT[r["kernel"]]
        if r["kernel"] == "multi":
            ceiling *= int(re.search(r"-k(\d)", name)[1])
        if r["instr_per_elem"] > ceiling:
            high[name] = (r["instr_per_elem"], ceiling)
    assert not high, high


def test_unaligned_tables_stay_scalar(rows):
    assert rows["update-fp32-fp32-unaligned-b1024-e4-w8"]["vector_accesses"] == []


def _divide(ops: list[str], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a / b`` as the PTX's division instruction computes it."""
    (op,) = ops
    if op.startswith("div.rn"):
        return a / b
    # div.full.f32 and div.approx.f32: a reciprocal, then a multiply.
    assert op.startswith(("div.full.f32", "div.approx.f32")), op
    return a * (np.float32(1) / b)


U = np.arange(1, 10**6 + 1)


def test_litema_weight_equals_the_host_bitwise(rows):
    """The single-profile kernel's LitEma weight, with its division as compiled, over u = 1 ... 1e6."""
    ops = rows["update-fp32-fp32-litema-b1024-e4-w8"]["divisions"]
    uf = U.astype(np.float32)
    kernel = _divide(ops, np.float32(9), np.float32(10) + uf).astype(np.float32)
    schedule = Schedule(decay=1.0, warmup="litema")
    host = np.array([schedule.weight(int(t)) for t in U[::997]], dtype=np.float32)
    host_all = (9.0 / (10.0 + U.astype(np.float64))).astype(np.float32)
    assert np.array_equal(host, host_all[::997]), "the vectorised host formula is Schedule.weight's"
    differ = np.flatnonzero(kernel != host_all)
    assert differ.size == 0, f"{differ.size} of {U.size} weights differ, the first at u = {U[differ[:5]]}"


def test_power_warmup_base_is_correctly_rounded(rows):
    """The power warmup's ``(u - 1) / γ`` is divided correctly rounded (its exp2/log2 are fp32 approximations:
    the torch path's bits are not claimed for it)."""
    assert rows["update-fp32-fp32-power-b1024-e4-w8"]["divisions"] == ["div.rn.f32"]


def _typed(row: dict, name: str, value: float) -> float:
    """``value`` as the kernel receives it: rounded to fp32 when the JIT types its argument fp32."""
    return float(np.float32(value)) if row["float_args"].get(name) == "fp32" else value


@pytest.mark.parametrize("kind", ["decay", "litema", "power", "warmup-power"])
def test_profile_weights_kernel_constants_reach_it_in_float64(rows, kind):
    """Every float constant of the K-profile weights kernel arrives in float64; its divisions are correctly rounded."""
    row = rows[f"weights-{kind}-k8"]
    assert all(t != "fp32" for t in row["float_args"].values()), row["float_args"]
    assert set(row["divisions"]) <= {"div.rn.f64"}, row["divisions"]


def test_profile_weights_match_the_host_with_the_constants_as_typed(rows):
    """The power-profile weights with ``γ + 1`` as the kernel receives it, in float64 as the kernel computes
    them, against the host's ``-expm1((γ+1) log1p(-1/u))``: fp32 constants put about 8% one ulp off; the
    remaining 0.02% are the exp2/log2 form's own rounding, not the constants'."""
    row = rows["weights-power-k8"]
    u = U[1:].astype(np.float64)
    for k, sigma_rel in enumerate((0.05, 0.06, 0.07)):
        c = PowerProfile(sigma_rel).gamma + 1.0
        typed = _typed(row, f"c{k}", c)
        kernel = (1.0 - np.exp2(typed * np.log2(1.0 - 1.0 / u))).astype(np.float32)
        host = (-np.expm1(c * np.log1p(-1.0 / u))).astype(np.float32)
        assert (kernel != host).mean() < 1e-3, (sigma_rel, (kernel != host).mean())
