"""The fused K-profile update (``kernels/multi.py``): float64, the torch path's bits, the single-profile kernel's bits.

Through Triton's interpreter on CPU, for real on CUDA. The generated code for an
H100 is checked ahead of time (no GPU needed) in a subprocess: this module is
also the probe that compiles it (``python tests/test_multi_kernels.py CASES``).
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
import torch
from bits import assert_same_bits, int_view, sprinkle_, torch_lerp_fused
from reference64 import poison_, tol

from triton_ema import reference
from triton_ema.kernels import interpreting
from triton_ema.kernels.ema_update import ema_update
from triton_ema.kernels.multi import MAX_PROFILES, _update_multi, ema_update_multi
from triton_ema.kernels.table import ENTRY, build_table, build_tables
from triton_ema.schedules import Schedule

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not interpreting(), reason="CPU tensors need the interpreter")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
NAN, INF = float("nan"), float("inf")
# The interpreter's numpy warns on every NaN or inf it computes with: here that is the data.
NAN_DATA = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning", "ignore:overflow encountered:RuntimeWarning"
)
PAIRS = {
    "fp32-fp32": (torch.float32, torch.float32),
    "bf16-fp32": (torch.bfloat16, torch.float32),
    "fp16-fp32": (torch.float16, torch.float32),
    "bf16-bf16": (torch.bfloat16, torch.bfloat16),
    "fp16-fp16": (torch.float16, torch.float16),
}
FLOAT64_PAIRS = ["fp32-fp32", "bf16-fp32", "fp16-fp32", "bf16-bf16"]
# Per step, a weight per profile: a copy, then both sides of lerp's 0.5 switch and a skipped profile.
WEIGHT_STEPS = [
    [1.0, 1.0, 1.0],
    [0.1, 0.6, 0.0],
    [0.45, 0.5, 0.9],
    [0.02, 0.0, 0.75],
]


def make_params(device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """Sizes around the interpreter's block (1024) and the table entry (4096), channels_last, an unaligned view."""
    flat = [torch.randn(n, device=device).to(dtype) for n in (1, 17, 1025, ENTRY + 1)]
    conv = torch.randn(6, 5, 3, 7, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    # One element into a larger buffer: not 16-byte aligned, so a table (and launch) of its own.
    unaligned = torch.randn(ENTRY + 3, device=device).to(dtype)[1:]
    return [*flat, conv, unaligned]


def shadows_like(params: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    return [torch.empty_like(p, dtype=dtype).copy_(torch.randn(p.shape)) for p in params]


def refill_(params: list[torch.Tensor]) -> None:
    for p in params:
        p.copy_(torch.randn(p.shape))


def fp32_weights(values: list[float], device: str) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def update_multi(params, profiles, weights, param_dtype, shadow_dtype, skip=None) -> None:
    tables = build_tables(params, *profiles)
    assert len(tables) == 2, "the unaligned view gets a table of its own"
    for table in tables:
        ema_update_multi(table, weights, param_dtype, shadow_dtype, len(profiles), skip=skip)


def assert_untouched(actual: list[torch.Tensor], before: list[torch.Tensor]) -> None:
    """Every bit as it was, NaN payloads included: nothing was written."""
    for i, (a, b) in enumerate(zip(actual, before)):
        assert torch.equal(int_view(a), b), f"tensor {i}: {int((int_view(a) != b).sum())} elements changed"


def assert_matches_torch(device, shadows, expected):
    if torch_lerp_fused(device):
        assert_same_bits(shadows, expected)
    else:
        for s, e in zip(shadows, expected):
            torch.testing.assert_close(s.double(), e.double(), **tol(s.dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pair", FLOAT64_PAIRS)
@pytest.mark.parametrize("k", [1, 2, 3], ids=lambda k: f"k{k}")
def test_matches_float64(seed, device, pair, k):
    param_dtype, shadow_dtype = PAIRS[pair]
    params = make_params(device, param_dtype)
    profiles = [shadows_like(params, shadow_dtype) for _ in range(k)]
    ref = [[s.double() for s in shadows] for shadows in profiles]
    for step in WEIGHT_STEPS:
        refill_(params)
        weights = fp32_weights(step[:k], device)
        update_multi(params, profiles, weights, param_dtype, shadow_dtype)
        for r, w in zip(ref, weights.double().tolist()):
            for i, p in enumerate(params):
                r[i] = r[i] * (1 - w) + p.double() * w
    for shadows, r in zip(profiles, ref):
        for s, e in zip(shadows, r):
            torch.testing.assert_close(s.double(), e, **tol(shadow_dtype))


@NAN_DATA
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("k", [1, 2, 3], ids=lambda k: f"k{k}")
def test_matches_torch_bitwise(seed, device, pair, k):
    """Each profile gets the bits of ``reference.ema_update_`` (the torch path) for its weight, NaN and inf too."""
    if not torch_lerp_fused(device):
        pytest.skip("torch's CPU lerp without SIMD rounds the product and the sum apart")
    param_dtype, shadow_dtype = PAIRS[pair]
    params = make_params(device, param_dtype)
    profiles = [shadows_like(params, shadow_dtype) for _ in range(k)]
    for shadows in profiles:
        sprinkle_(shadows, (-INF, NAN, INF))
    expected = [[s.clone() for s in shadows] for shadows in profiles]
    # Zero weights are left out: the torch path's lerp at weight 0 is not "no update" (see below).
    # 0.23 and 0.01 are not powers of two: their products round, so an unfused multiply-add shows.
    steps = [[1.0, 0.7, 0.3], [0.23, 0.5, 1.0], [0.8, 0.01, 0.4999]]
    for t, step in enumerate(steps):
        refill_(params)
        sprinkle_(params, (NAN, INF, -INF) if t % 2 else (INF, -INF, NAN))
        weights = fp32_weights(step[:k], device)
        update_multi(params, profiles, weights, param_dtype, shadow_dtype)
        for shadows, e, w in zip(profiles, expected, weights.tolist()):
            reference.ema_update_(params, e, w)
            assert_same_bits(shadows, e)


@NAN_DATA
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pair", PAIRS)
def test_matches_single_profile_kernel_bitwise(seed, device, pair):
    """K profiles in one launch write what K launches of ``ema_update`` write, on any torch build."""
    param_dtype, shadow_dtype = PAIRS[pair]
    decays = [0.9, 0.3, 0.999]
    params = make_params(device, param_dtype)
    profiles = [shadows_like(params, shadow_dtype) for _ in decays]
    for shadows in profiles:
        sprinkle_(shadows, (NAN, -INF, INF))
    single = [[s.clone() for s in shadows] for shadows in profiles]
    for t in range(1, 4):
        refill_(params)
        sprinkle_(params, (INF, NAN, -INF))
        # The single-profile kernel's weight is Schedule.min_weight (1 - decay in float64) in fp32.
        weights = fp32_weights([Schedule(decay=d).min_weight for d in decays], device)
        update_multi(params, profiles, weights, param_dtype, shadow_dtype)
        for shadows, d in zip(single, decays):
            for table in build_tables(params, shadows):
                ema_update(table, torch.tensor([t], device=device), Schedule(decay=d), param_dtype, shadow_dtype)
    for shadows, s1 in zip(profiles, single):
        assert_same_bits(shadows, s1)


def special_shadows_(shadows: list[torch.Tensor]) -> None:
    """-0.0, +0.0, a NaN with an odd payload and inf in every 1-d shadow: values an update by 0 would change."""
    nan = {4: torch.tensor([0x7FA00001], dtype=torch.int32), 2: torch.tensor([0x7FA1], dtype=torch.int16)}
    for s in shadows:
        if s.dim() == 1 and s.numel() >= 4:
            s[:4] = torch.tensor([-0.0, 0.0, 0.0, INF], dtype=s.dtype, device=s.device)
            int_view(s)[2] = nan[s.element_size()].to(s.device)
        elif s.dim() == 1:
            s[0] = -0.0


@NAN_DATA
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("zero", [0, 1, 2], ids=lambda z: f"zero{z}")
def test_zero_weight_leaves_the_shadow_bitwise(seed, device, pair, zero):
    """``w_k == 0`` leaves profile k alone (-0.0 and NaN payloads kept, NaN parameters kept out); the rest update."""
    param_dtype, shadow_dtype = PAIRS[pair]
    params = make_params(device, param_dtype)
    sprinkle_(params, (NAN, INF, NAN))
    # The parameter's NaN and inf sit where the shadow's -0.0 and NaN are.
    for p in params:
        if p.dim() == 1 and p.numel() >= 4:
            p[:4] = torch.tensor([NAN, -1.0, INF, NAN], dtype=p.dtype, device=p.device)
    values = [0.3, 0.8, 1.0]
    values[zero] = 0.0
    profiles = [shadows_like(params, shadow_dtype) for _ in values]
    special_shadows_(profiles[zero])
    copy = values.index(1.0) if 1.0 in values else None
    if copy is not None:
        poison_(profiles[copy])
    before = [int_view(s).clone() for s in profiles[zero]]
    expected = [[s.clone() for s in shadows] for shadows in profiles]
    update_multi(params, profiles, fp32_weights(values, device), param_dtype, shadow_dtype)
    assert_untouched(profiles[zero], before)
    for k, w in enumerate(values):
        if k != zero:
            reference.ema_update_(params, expected[k], w)
            assert_matches_torch(device, profiles[k], expected[k])


@NAN_DATA
@pytest.mark.parametrize("device", DEVICES)
def test_all_weights_zero_write_nothing(seed, device):
    params = make_params(device, torch.bfloat16)
    sprinkle_(params, (NAN, INF, -INF))
    profiles = [shadows_like(params, torch.float32) for _ in range(3)]
    for shadows in profiles:
        special_shadows_(shadows)
    before = [[int_view(s).clone() for s in shadows] for shadows in profiles]
    update_multi(params, profiles, fp32_weights([0.0, 0.0, 0.0], device), torch.bfloat16, torch.float32)
    for shadows, b in zip(profiles, before):
        assert_untouched(shadows, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pair", FLOAT64_PAIRS)
@pytest.mark.parametrize("k", [1, 3, MAX_PROFILES], ids=lambda k: f"k{k}")
def test_weight_one_copies_every_element(seed, device, pair, k):
    """A copy overwrites poisoned shadows of every profile exactly, element by element."""
    param_dtype, shadow_dtype = PAIRS[pair]
    params = make_params(device, param_dtype)
    profiles = [shadows_like(params, shadow_dtype) for _ in range(k)]
    for shadows in profiles:
        poison_(shadows)
    update_multi(params, profiles, fp32_weights([1.0] * k, device), param_dtype, shadow_dtype)
    for shadows in profiles:
        assert_same_bits(shadows, [p.to(shadow_dtype) for p in params])


@pytest.mark.parametrize("device", DEVICES)
def test_profiles_are_not_mixed_up(seed, device):
    """Eight profiles with eight different weights: profile k gets weight k and shadow k."""
    params = make_params(device, torch.float32)
    profiles = [shadows_like(params, torch.float32) for _ in range(MAX_PROFILES)]
    values = [1.0, 0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75]
    expected = [[s.clone() for s in shadows] for shadows in profiles]
    update_multi(params, profiles, fp32_weights(values, device), torch.float32, torch.float32)
    for shadows, e, w in zip(profiles, expected, values):
        if w:
            reference.ema_update_(params, e, w)
        assert_matches_torch(device, shadows, e)


@NAN_DATA
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pair", ["fp32-fp32", "bf16-bf16"])
def test_skip_leaves_everything_alone(seed, device, pair):
    param_dtype, shadow_dtype = PAIRS[pair]
    params = make_params(device, param_dtype)
    params[2][5] = NAN
    profiles = [shadows_like(params, shadow_dtype) for _ in range(3)]
    weights = fp32_weights([1.0, 0.5, 0.2], device)
    before = [[int_view(s).clone() for s in shadows] for shadows in profiles]
    raised = torch.ones(1, dtype=torch.int32, device=device)
    update_multi(params, profiles, weights, param_dtype, shadow_dtype, skip=raised)
    for shadows, b in zip(profiles, before):
        assert_untouched(shadows, b)

    params[2][5] = 1.0
    unguarded = [[s.clone() for s in shadows] for shadows in profiles]
    update_multi(params, profiles, weights, param_dtype, shadow_dtype, skip=torch.zeros_like(raised))
    update_multi(params, unguarded, weights, param_dtype, shadow_dtype)
    for shadows, u, b in zip(profiles, unguarded, before):
        assert_same_bits(shadows, u)
        assert not any(torch.equal(int_view(s), x) for s, x in zip(shadows, b)), "the clean guarded update ran"


def test_refuses_bad_arguments():
    params = [torch.randn(10)]
    profiles = [[torch.zeros(10)], [torch.zeros(10)]]
    table = build_table(params, *profiles)
    weights = torch.full((2,), 0.5)
    for n in (0, MAX_PROFILES + 1, 2.0, True):
        with pytest.raises(ValueError, match=re.escape(f"Invalid n_profiles value: {n!r}")):
            ema_update_multi(table, weights, torch.float32, torch.float32, n)
    with pytest.raises(ValueError, match="the table has 3 slots; n_profiles=1 needs 2"):
        ema_update_multi(table, weights[:1], torch.float32, torch.float32, 1)
    for bad in (weights.double(), weights[:1], weights.view(2, 1)):
        with pytest.raises(ValueError, match=r"weights must be a float32 tensor of shape \[2\]"):
            ema_update_multi(table, bad, torch.float32, torch.float32, 2)
    assert all(torch.equal(s[0], torch.zeros(10)) for s in profiles), "nothing ran"


@pytest.mark.skipif(not interpreting(), reason="interpreter only")
def test_interpreter_never_autotunes():
    params, profiles = [torch.randn(10)], [[torch.zeros(10)], [torch.zeros(10)]]
    ema_update_multi(build_table(params, *profiles), torch.full((2,), 0.5), torch.float32, torch.float32, 2)
    assert _update_multi.autotuners == {} and _update_multi.chosen == {}


@pytest.mark.gpu
def test_tuning_applies_the_update_once(seed):
    """The first launch of a new key tunes on scratch buffers: the live update still happens exactly once."""
    n = 3 * (1 << 20) + 11  # a size bucket no other test uses
    param = torch.randn(n, device="cuda")
    profiles = [[torch.randn(n, device="cuda")] for _ in range(2)]
    values = [0.1, 0.6]
    expected = [s[0].double() * (1 - w) + param.double() * w for s, w in zip(profiles, values)]
    table = build_table([param], *profiles)
    ema_update_multi(table, fp32_weights(values, "cuda"), torch.float32, torch.float32, 2)
    for s, e in zip(profiles, expected):
        torch.testing.assert_close(s[0].double(), e, **tol(torch.float32))
    assert any(key[0] == table.bucket and key[3] == 2 for key in _update_multi.chosen), "cached under the live key"


def sweep_params(device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    # Full blocks and tails for BLOCK 1024 and 4096; then one-entry tensors, so that the 15
    # entries of the aligned table leave the last program of every ENTRIES_PER_PROGRAM part-filled.
    flat = [torch.randn(n, device=device).to(dtype) for n in (1, 1023, 1025, ENTRY + 1, 2 * ENTRY + 1000)]
    small = [torch.randn(n, device=device).to(dtype) for n in (3, 64, 5, 1, 33, 7)]
    unaligned = torch.randn(ENTRY + 2, device=device).to(dtype)[1:]
    return [*flat, *small, unaligned]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pair", ["fp32-fp32", "bf16-fp32", "bf16-bf16"])
def test_every_config(seed, device, forced_config, pair):
    param_dtype, shadow_dtype = PAIRS[pair]
    params = sweep_params(device, param_dtype)
    profiles = [shadows_like(params, shadow_dtype) for _ in range(3)]
    for shadows in profiles:
        poison_(shadows)
    expected = [[s.clone() for s in shadows] for shadows in profiles]
    # A copy over poisoned shadows (an element no program writes stays NaN), then updates with a skipped profile.
    for step in ([1.0, 1.0, 1.0], [0.82, 0.0, 0.23], [0.3, 0.6, 0.0]):
        refill_(params)
        before = [[int_view(s).clone() for s in shadows] for shadows in profiles]
        for table in build_tables(params, *profiles):
            ema_update_multi(table, fp32_weights(step, device), param_dtype, shadow_dtype, 3)
        for shadows, e, b, w in zip(profiles, expected, before, step):
            if w == 0.0:
                assert_untouched(shadows, b)
                continue
            reference.ema_update_(params, e, w)
            assert_matches_torch(device, shadows, e)


# Generated code: (param dtype, shadow dtype, profiles, aligned, guarded) per case.
CODEGEN_CASES = {
    **{f"bf16-fp32-k{k}": ("bf16", "fp32", k, True, False) for k in (1, 2, 3)},
    "bf16-fp32-k3-guarded": ("bf16", "fp32", 3, True, True),
    "fp32-fp32-k3": ("fp32", "fp32", 3, True, False),
    "fp32-fp32-k3-unaligned": ("fp32", "fp32", 3, False, False),
}


def probe(cases: dict) -> dict[str, dict[str, int]]:
    """Compile each case for sm_90 and count its global memory instructions (no GPU needed)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from triton_ema.kernels.multi import _ema_update_multi_kernel

    dtypes = {"fp32": tl.float32, "bf16": tl.bfloat16}
    signature = {
        "param_addrs_ptr": "*i64",
        **{f"shadow{k}_addrs_ptr": "*i64" for k in range(MAX_PROFILES)},
        "numels_ptr": "*i64",
        "entry_tensor_ptr": "*i32",
        "entry_block_ptr": "*i32",
        "n_entries": "i32",
        "weights_ptr": "*fp32",
        "skip_ptr": "*i32",
        "SIZE_BUCKET": "i32",
    }
    out = {}
    for name, (param, shadow, k, aligned, guarded) in cases.items():
        constexprs = {
            "PARAM_DTYPE": dtypes[param],
            "SHADOW_DTYPE": dtypes[shadow],
            "N_PROFILES": k,
            "GUARDED": guarded,
            "ALIGNED": aligned,
            "ENTRY": ENTRY,
            "BLOCK": 1024,
            "ENTRIES_PER_PROGRAM": 4,
        }
        full_signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
        source = ASTSource(_ema_update_multi_kernel, full_signature, constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        out[name] = dict(Counter(re.findall(r"(?:ld|st)\.global[.\w]*", compiled.asm["ptx"])))
    return out


@pytest.fixture(scope="module")
def ptx_ops() -> dict[str, Counter]:
    pytest.importorskip("triton")
    # The interpreter, if on in this session, replaces kernels with Python functions: compile elsewhere.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run(
        [sys.executable, __file__, json.dumps(CODEGEN_CASES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return {name: Counter(ops) for name, ops in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def test_the_parameter_is_read_once_for_all_profiles(ptx_ops):
    """Each extra profile adds the same instructions, none of them a 16-bit access: the bf16 parameter's."""
    k1, k2, k3 = (ptx_ops[f"bf16-fp32-k{k}"] for k in (1, 2, 3))
    per_profile = k2 - k1
    assert not k1 - k2 and not k2 - k3, "a profile removed instructions"
    assert k3 - k2 == per_profile, (k1, k2, k3)
    assert not any(".b16" in op for op in per_profile), per_profile
    # One profile: its shadow read and written with 128-bit accesses.
    assert per_profile["ld.global.v4.b32"] > 0 and per_profile["st.global.v4.b32"] > 0, per_profile
    assert any(".b16" in op for op in k1), k1


def test_aligned_tables_get_128_bit_accesses(ptx_ops):
    for case in ("fp32-fp32-k3", "bf16-fp32-k3"):
        assert ptx_ops[case]["ld.global.v4.b32"] > 0 and ptx_ops[case]["st.global.v4.b32"] > 0, ptx_ops[case]
    assert not any(re.search(r"\.v[248]\.", op) for op in ptx_ops["fp32-fp32-k3-unaligned"]), ptx_ops


def test_unguarded_update_never_reads_the_flag(ptx_ops):
    guarded, unguarded = ptx_ops["bf16-fp32-k3-guarded"], ptx_ops["bf16-fp32-k3"]
    assert guarded - unguarded == Counter({"ld.global.b32": 1}), (guarded, unguarded)
    assert not unguarded - guarded, (guarded, unguarded)


if __name__ == "__main__":
    print(json.dumps(probe(json.loads(sys.argv[1]))))
