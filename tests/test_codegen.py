"""The kernels' generated code for an H100 (sm_90), compiled ahead of time: no GPU needed.

Loads through a pointer table are scalar unless the kernel states the
alignment; these tests check that full blocks of aligned tables compile to
128-bit (v4) loads and stores, and that unaligned tables do not claim it.
The compiler runs in a subprocess: this test session may have Triton's
interpreter on, which replaces the kernels with Python functions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("triton")

CASES = {
    "update-fp32-aligned": ("update", "fp32", True),
    "update-bf16-aligned": ("update", "bf16", True),
    "update-fp32-unaligned": ("update", "fp32", False),
    "update-bf16-unaligned": ("update", "bf16", False),
    "update-bf16-guarded": ("guarded", "bf16", True),
    "swap-fp32": ("swap", "fp32", True),
    "backup-bf16": ("backup", "bf16", True),
    "nonfinite-fp32-aligned": ("nonfinite", "fp32", True),
    "nonfinite-bf16-aligned": ("nonfinite", "bf16", True),
    "nonfinite-bf16-unaligned": ("nonfinite", "bf16", False),
}


@pytest.fixture(scope="module")
def ptx_ops() -> dict[str, list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("codegen_probe.py")), json.dumps(CASES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][2]])
def test_aligned_tables_get_128_bit_accesses(ptx_ops, case):
    ops = set(ptx_ops[case])
    assert "ld.global.v4.b32" in ops, ops
    # The guard only reads the tensors; its one store is the flag's.
    if CASES[case][0] != "nonfinite":
        assert "st.global.v4.b32" in ops, ops


def test_unguarded_update_never_reads_the_flag(ptx_ops):
    """The guard is a constexpr: only the guarded kernel loads the 32-bit skip flag."""
    guarded, unguarded = Counter(ptx_ops["update-bf16-guarded"]), Counter(ptx_ops["update-bf16-aligned"])
    assert guarded - unguarded == Counter({"ld.global.b32": 1}), (guarded, unguarded)
    assert not unguarded - guarded, (guarded, unguarded)


@pytest.mark.parametrize("case", [c for c in CASES if not CASES[c][2]])
def test_unaligned_tables_stay_scalar(ptx_ops, case):
    ops = set(ptx_ops[case])
    assert not any(re.search(r"\.v[248]\.", op) for op in ops), ops


def test_profile_weights_kernel_compiles_for_sm90_in_float64():
    """The K-profile weights kernel does its math in float64 (libdevice on a GPU): it must compile for sm_90
    in every mode and store exactly one weight per profile."""
    code = r"""
import json, re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton_ema.kernels.multi import _profile_weights_kernel
sig = {"step_ptr": "*i64", "out_ptr": "*fp32", **{f"c{k}": "fp32" for k in range(8)}, "max_weight": "fp32",
       "warmup_gamma": "fp32", "warmup_power": "fp32", "update_after_step": "i32", "update_every": "i32"}
out = {}
for power, warmup in ((True, 0), (False, 0), (False, 1), (False, 2)):
    ce = {"POWER_PROFILES": power, "WARMUP": warmup, "N_PROFILES": 3}
    compiled = triton.compile(ASTSource(_profile_weights_kernel, {**sig, **dict.fromkeys(ce, "constexpr")}, ce),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
    ptx = compiled.asm["ptx"]
    out[f"{power}-{warmup}"] = [len(re.findall(r"st\.global", ptx)), len(re.findall(r"\.f64", ptx))]
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for mode, (stores, f64_ops) in result.items():
        assert stores == 3, f"{mode}: one store per profile"
        assert f64_ops > 0, f"{mode}: the weights are computed in float64"
