"""Compiles the kernels for sm_90 and prints their global memory instructions (run by test_codegen.py)."""

from __future__ import annotations

import json
import re
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from triton_ema.kernels.ema_update import _ema_update_kernel, _nonfinite_kernel
from triton_ema.kernels.swap import MODE_BACKUP_AND_LOAD, MODE_SWAP, _swap_kernel
from triton_ema.kernels.table import ENTRY

TABLE = {
    "numels_ptr": "*i64",
    "entry_tensor_ptr": "*i32",
    "entry_block_ptr": "*i32",
    "n_entries": "i32",
}
SCHEDULE = {
    "step_ptr": "*i64",
    "skip_ptr": "*i32",
    "min_weight": "fp32",
    "max_weight": "fp32",
    "warmup_gamma": "fp32",
    "warmup_power": "fp32",
    "update_after_step": "i32",
    "update_every": "i32",
    "SIZE_BUCKET": "i32",
}
LAUNCH = {"ENTRY": ENTRY, "BLOCK": 1024, "ENTRIES_PER_PROGRAM": 4}


def global_memory_ops(kernel, signature: dict, constexprs: dict) -> list[str]:
    signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    compiled = triton.compile(
        ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}
    )
    # Every occurrence, so that tests can count instructions as well as look for them.
    return re.findall(r"(?:ld|st)\.global[.\w]*", compiled.asm["ptx"])


DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16}


def case_ops(kind: str, dtype: str, aligned: bool) -> list[str]:
    if kind in ("update", "guarded"):
        signature = {"param_addrs_ptr": "*i64", "shadow_addrs_ptr": "*i64", **TABLE, **SCHEDULE}
        constexprs = {
            "PARAM_DTYPE": DTYPES[dtype],
            "SHADOW_DTYPE": tl.float32,
            "WARMUP": 1,
            "GUARDED": kind == "guarded",
            "ALIGNED": aligned,
        }
        kernel = _ema_update_kernel
    elif kind == "nonfinite":
        signature = {"addrs_ptr": "*i64", **TABLE, "flag_ptr": "*i32", "SIZE_BUCKET": "i32"}
        constexprs = {"DTYPE": DTYPES[dtype], "ALIGNED": aligned}
        kernel = _nonfinite_kernel
    else:
        signature = {"a_addrs_ptr": "*i64", "b_addrs_ptr": "*i64", "c_addrs_ptr": "*i64", **TABLE, "SIZE_BUCKET": "i32"}
        mode = MODE_SWAP if kind == "swap" else MODE_BACKUP_AND_LOAD
        constexprs = {"A_DTYPE": DTYPES[dtype], "B_DTYPE": tl.float32, "MODE": mode, "ALIGNED": aligned}
        kernel = _swap_kernel
    return sorted(global_memory_ops(kernel, signature, {**constexprs, **LAUNCH}))


if __name__ == "__main__":
    cases = json.loads(sys.argv[1])
    print(json.dumps({name: case_ops(*args) for name, args in cases.items()}))
