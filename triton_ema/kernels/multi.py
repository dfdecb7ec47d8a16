"""The fused K-profile EMA update: one launch updates K shadows of every tensor of a table.

Tracking several EMA profiles (issue 8, "Several profiles, one pass") with K
single-profile launches reads each parameter K times: ``K * (P + 2S)`` bytes
per element for a parameter of P bytes and shadows of S bytes. This kernel
loads a parameter block once and updates every profile's shadow from it, for
``P + 2K * S`` bytes (fp32: 4 + 8K instead of 12K).

The caller computes the K weights ``w_k = 1 - d_k`` on the device (from the
device step counter), so nothing is computed or synchronised on the host per
step and the launch can be captured in a CUDA graph. A profile whose weight is
0 this step is not touched at all: its shadow is neither read nor written.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from triton_ema.kernels import MAX_PROFILES  # noqa: E402  (the kernel takes one address argument per profile)
from triton_ema.kernels.ema_update import _TL_DTYPES, _round
from triton_ema.kernels.launch import CONFIGS_NARROW, TableKernel, configs_for_dtypes
from triton_ema.kernels.table import (
    ENTRY,
    TensorTable,
    build_table,
    load_pairs_16,
    pair_offsets,
    tensor_ptr,
    walk_entries,
)


@triton.jit
def _lerp(p, s, w):
    """``s + w * (p - s)`` in fp32 with the single-profile kernel's (and torch's lerp's) bits.

    The same expression as ``ema_update._ema_block``: lerp's two-sided form with explicit
    fmas (``w - 1`` is exact for ``w >= 0.5``), and a copy that takes ``p`` itself at ``w == 1``
    so that it also resets a shadow holding inf or NaN.
    """
    diff = p - s
    return tl.where(w < 0.5, tl.fma(w, diff, s), tl.where(w == 1.0, p, tl.fma(w - 1.0, diff, p)))


@triton.jit
def _shadow_ptr(
    addrs_ptr,
    idx,
    fallback,
    K: tl.constexpr,
    SHADOW_DTYPE: tl.constexpr,
    N_PROFILES: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Profile ``K``'s shadow pointer; ``fallback`` (never dereferenced) past ``N_PROFILES``."""
    ptr = fallback
    if K < N_PROFILES:
        ptr = tensor_ptr(addrs_ptr, idx, SHADOW_DTYPE, ALIGNED)
    return ptr


@triton.jit
def _multi_entry(idx, args, meta: tl.constexpr):
    """The entry's parameter pointer and its K shadow pointers: the addresses are read once per entry."""
    param_addrs_ptr, shadow_addrs, _ = args
    PARAM_DTYPE: tl.constexpr = meta[0]
    SHADOW_DTYPE: tl.constexpr = meta[1]
    N_PROFILES: tl.constexpr = meta[2]
    ALIGNED: tl.constexpr = meta[3]
    a0, a1, a2, a3, a4, a5, a6, a7 = shadow_addrs
    p = tensor_ptr(param_addrs_ptr, idx, PARAM_DTYPE, ALIGNED)
    s0 = tensor_ptr(a0, idx, SHADOW_DTYPE, ALIGNED)
    return (
        p,
        s0,
        _shadow_ptr(a1, idx, s0, 1, SHADOW_DTYPE, N_PROFILES, ALIGNED),
        _shadow_ptr(a2, idx, s0, 2, SHADOW_DTYPE, N_PROFILES, ALIGNED),
        _shadow_ptr(a3, idx, s0, 3, SHADOW_DTYPE, N_PROFILES, ALIGNED),
        _shadow_ptr(a4, idx, s0, 4, SHADOW_DTYPE, N_PROFILES, ALIGNED),
        _shadow_ptr(a5, idx, s0, 5, SHADOW_DTYPE, N_PROFILES, ALIGNED),
        _shadow_ptr(a6, idx, s0, 6, SHADOW_DTYPE, N_PROFILES, ALIGNED),
        _shadow_ptr(a7, idx, s0, 7, SHADOW_DTYPE, N_PROFILES, ALIGNED),
    )


@triton.jit
def _shadow_mask(offs, n, w, MASKED: tl.constexpr):
    # w == 0 is "no update this step": the shadow is neither read nor written (a predicated access,
    # so that the K loads stay in flight together). Computing s + 0 * (p - s) would turn -0.0 into
    # +0.0 and copy a NaN or inf of the parameter into the shadow.
    # (The flag goes through int32: the interpreter's scalar comparisons make no boolean mask.)
    on = (w != 0.0).to(tl.int32)
    if MASKED:
        mask = offs < n * on
    else:
        # Uniform over the block (a splat), so the access keeps its vector width.
        mask = tl.zeros(offs.shape, tl.int32) + on != 0
    return mask


@triton.jit
def _load_shadow(ptr, offs, n, w, p, K: tl.constexpr, N_PROFILES: tl.constexpr, MASKED: tl.constexpr):
    s = p
    if K < N_PROFILES:
        s = tl.load(ptr + offs, mask=_shadow_mask(offs, n, w, MASKED), other=0.0).to(tl.float32)
    return s


@triton.jit
def _store_shadow(
    ptr, offs, n, w, p, s, K: tl.constexpr, N_PROFILES: tl.constexpr, SHADOW_DTYPE: tl.constexpr, MASKED: tl.constexpr
):
    if K < N_PROFILES:
        tl.store(ptr + offs, _round(_lerp(p, s, w), SHADOW_DTYPE), mask=_shadow_mask(offs, n, w, MASKED))


@triton.jit
def _multi_block(ptrs, base, offs, n, state, args, meta: tl.constexpr, MASKED: tl.constexpr):
    """One block of every profile: the parameter and all K shadows are loaded before any store."""
    param_ptr, p0, p1, p2, p3, p4, p5, p6, p7 = ptrs
    w0, w1, w2, w3, w4, w5, w6, w7 = args[2]
    SHADOW_DTYPE: tl.constexpr = meta[1]
    N: tl.constexpr = meta[2]
    PARAM_DTYPE: tl.constexpr = meta[0]
    BLOCK: tl.constexpr = offs.shape[0]
    # A 16-bit parameter beside 32-bit shadows, up to 4 profiles (their configs give a thread 8 elements;
    # more profiles keep 4, for registers), on aligned tables: each side in 128-bit accesses (see
    # ``table.pair_offsets``).
    WIDE: tl.constexpr = (
        meta[3] and N <= 4 and PARAM_DTYPE.primitive_bitwidth == 16 and SHADOW_DTYPE.primitive_bitwidth == 32
    )
    if WIDE:
        offs = pair_offsets(base, BLOCK)
        p = load_pairs_16(param_ptr, base, n, BLOCK, MASKED).to(tl.float32)
    elif MASKED:
        p = tl.load(param_ptr + offs, mask=offs < n).to(tl.float32)
    else:
        p = tl.load(param_ptr + offs).to(tl.float32)
    s0 = _load_shadow(p0, offs, n, w0, p, 0, N, MASKED)
    s1 = _load_shadow(p1, offs, n, w1, p, 1, N, MASKED)
    s2 = _load_shadow(p2, offs, n, w2, p, 2, N, MASKED)
    s3 = _load_shadow(p3, offs, n, w3, p, 3, N, MASKED)
    s4 = _load_shadow(p4, offs, n, w4, p, 4, N, MASKED)
    s5 = _load_shadow(p5, offs, n, w5, p, 5, N, MASKED)
    s6 = _load_shadow(p6, offs, n, w6, p, 6, N, MASKED)
    s7 = _load_shadow(p7, offs, n, w7, p, 7, N, MASKED)
    _store_shadow(p0, offs, n, w0, p, s0, 0, N, SHADOW_DTYPE, MASKED)
    _store_shadow(p1, offs, n, w1, p, s1, 1, N, SHADOW_DTYPE, MASKED)
    _store_shadow(p2, offs, n, w2, p, s2, 2, N, SHADOW_DTYPE, MASKED)
    _store_shadow(p3, offs, n, w3, p, s3, 3, N, SHADOW_DTYPE, MASKED)
    _store_shadow(p4, offs, n, w4, p, s4, 4, N, SHADOW_DTYPE, MASKED)
    _store_shadow(p5, offs, n, w5, p, s5, 5, N, SHADOW_DTYPE, MASKED)
    _store_shadow(p6, offs, n, w6, p, s6, 6, N, SHADOW_DTYPE, MASKED)
    _store_shadow(p7, offs, n, w7, p, s7, 7, N, SHADOW_DTYPE, MASKED)
    return state


@triton.jit
def _profile_weight(weights_ptr, K: tl.constexpr, N_PROFILES: tl.constexpr):
    """Profile ``K``'s weight, loaded once per program; 0 (never used) past ``N_PROFILES``."""
    w = tl.load(weights_ptr)
    if K < N_PROFILES:
        w = tl.load(weights_ptr + K)
    return w


@triton.jit
def _ema_update_multi_kernel(
    param_addrs_ptr,
    shadow0_addrs_ptr,
    shadow1_addrs_ptr,
    shadow2_addrs_ptr,
    shadow3_addrs_ptr,
    shadow4_addrs_ptr,
    shadow5_addrs_ptr,
    shadow6_addrs_ptr,
    shadow7_addrs_ptr,
    numels_ptr,
    entry_tensor_ptr,
    entry_block_ptr,
    n_entries,
    weights_ptr,
    skip_ptr,
    SIZE_BUCKET,  # noqa: ARG001  (read by the autotuner's key only)
    PARAM_DTYPE: tl.constexpr,
    SHADOW_DTYPE: tl.constexpr,
    N_PROFILES: tl.constexpr,
    GUARDED: tl.constexpr,
    ALIGNED: tl.constexpr,
    ENTRY: tl.constexpr,
    BLOCK: tl.constexpr,
    ENTRIES_PER_PROGRAM: tl.constexpr,
):
    active = True
    if GUARDED:
        # A compile-time branch: the unguarded kernel never loads the flag.
        active = tl.load(skip_ptr) == 0
    if active:
        shadows = (
            shadow0_addrs_ptr,
            shadow1_addrs_ptr,
            shadow2_addrs_ptr,
            shadow3_addrs_ptr,
            shadow4_addrs_ptr,
            shadow5_addrs_ptr,
            shadow6_addrs_ptr,
            shadow7_addrs_ptr,
        )
        weights = (
            _profile_weight(weights_ptr, 0, N_PROFILES),
            _profile_weight(weights_ptr, 1, N_PROFILES),
            _profile_weight(weights_ptr, 2, N_PROFILES),
            _profile_weight(weights_ptr, 3, N_PROFILES),
            _profile_weight(weights_ptr, 4, N_PROFILES),
            _profile_weight(weights_ptr, 5, N_PROFILES),
            _profile_weight(weights_ptr, 6, N_PROFILES),
            _profile_weight(weights_ptr, 7, N_PROFILES),
        )
        walk_entries(
            _multi_entry,
            _multi_block,
            n_entries * 0,
            (param_addrs_ptr, shadows, weights),
            (PARAM_DTYPE, SHADOW_DTYPE, N_PROFILES, ALIGNED),
            numels_ptr,
            entry_tensor_ptr,
            entry_block_ptr,
            n_entries,
            ENTRY,
            BLOCK,
            ENTRIES_PER_PROGRAM,
        )


_update_multi = TableKernel(
    _ema_update_multi_kernel,
    key=["SIZE_BUCKET", "PARAM_DTYPE", "SHADOW_DTYPE", "N_PROFILES", "GUARDED", "ALIGNED"],
    # Past 4 profiles, 8 elements per thread would take 140 to 240 registers: 4 then.
    configs=lambda kw: (
        CONFIGS_NARROW if kw["N_PROFILES"] > 4 else configs_for_dtypes((kw["PARAM_DTYPE"], kw["SHADOW_DTYPE"]))
    ),
)


def _table_args(table: TensorTable, param_dtype: torch.dtype, shadow_dtype: torch.dtype, n_profiles: int) -> dict:
    shadows = table.addrs[1 : 1 + n_profiles]
    # Profiles past n_profiles are never dereferenced (the profile loop is unrolled to
    # N_PROFILES): any address vector will do for their arguments.
    shadows = shadows + [shadows[0]] * (MAX_PROFILES - n_profiles)
    return {
        "param_addrs_ptr": table.addrs[0],
        **{f"shadow{k}_addrs_ptr": a for k, a in enumerate(shadows)},
        "numels_ptr": table.numels,
        "entry_tensor_ptr": table.entry_tensor,
        "entry_block_ptr": table.entry_block,
        "n_entries": table.n_entries,
        "SIZE_BUCKET": table.bucket,
        "PARAM_DTYPE": _TL_DTYPES[param_dtype],
        "SHADOW_DTYPE": _TL_DTYPES[shadow_dtype],
        "N_PROFILES": n_profiles,
        "ALIGNED": table.aligned,
        "ENTRY": ENTRY,
    }


def ema_update_multi(
    table: TensorTable,
    weights: Tensor,
    param_dtype: torch.dtype,
    shadow_dtype: torch.dtype,
    n_profiles: int,
    skip: Tensor | None = None,
) -> None:
    """``shadow_k += weights[k] * (param - shadow_k)`` for every tensor and profile of ``table``: one launch.

    ``table`` has the slots ``[params, shadows_0, ..., shadows_{K-1}]`` with
    ``K = n_profiles`` (1 to :data:`MAX_PROFILES`), as built by
    ``build_tables(params, *shadow_lists)``. ``weights`` is a float32 tensor of
    shape ``[K]`` on the table's device holding ``w_k = 1 - d_k`` for this
    update. Each profile gets the bits the single-profile ``ema_update`` (and
    the torch path's ``lerp``) would give it for the same fp32 weight;
    ``w_k == 1`` copies the parameter exactly, and ``w_k == 0`` leaves shadow
    ``k`` bit for bit as it was (the kernel does not touch it). With ``skip``
    (a one-element int32 tensor on the same device, as filled by
    ``nonfinite_``), nothing is written when ``skip[0] != 0``, and the host
    never reads the flag.

    The parameter is read once for all profiles: ``P + 2K * S`` bytes per
    element for parameters of P and shadows of S bytes.
    """
    if not isinstance(n_profiles, int) or isinstance(n_profiles, bool) or not 1 <= n_profiles <= MAX_PROFILES:
        raise ValueError(f"Invalid n_profiles value: {n_profiles!r}. It must be an int in [1, {MAX_PROFILES}].")
    if len(table.addrs) != 1 + n_profiles:
        raise ValueError(
            f"the table has {len(table.addrs)} slots; n_profiles={n_profiles} needs {1 + n_profiles} "
            "(the parameters, then one slot of shadows per profile)"
        )
    if weights.dtype != torch.float32 or weights.shape != (n_profiles,):
        raise ValueError(
            f"weights must be a float32 tensor of shape [{n_profiles}], got {weights.dtype} {list(weights.shape)}"
        )
    _update_multi.cached(
        table,
        (weights, skip, param_dtype, shadow_dtype, n_profiles),
        lambda: _multi_launch(table, weights, param_dtype, shadow_dtype, n_profiles, skip),
    )


def _multi_launch(
    table: TensorTable,
    weights: Tensor,
    param_dtype: torch.dtype,
    shadow_dtype: torch.dtype,
    n_profiles: int,
    skip: Tensor | None,
) -> tuple:
    kwargs = {
        **_table_args(table, param_dtype, shadow_dtype, n_profiles),
        "weights_ptr": weights,
        # Unguarded, the pointer is never dereferenced (GUARDED is a constexpr): any tensor will do.
        "skip_ptr": weights if skip is None else skip,
        "GUARDED": skip is not None,
    }

    def scratch() -> tuple[int, dict]:
        device = weights.device
        n = table.bucket
        scratch_table = build_table(
            [torch.empty(n, dtype=param_dtype, device=device)],
            *([torch.zeros(n, dtype=shadow_dtype, device=device)] for _ in range(n_profiles)),
        )
        scratch_kwargs = {**kwargs, **_table_args(scratch_table, param_dtype, shadow_dtype, n_profiles)}
        # Keep the live key: the scratch buffers stand in for this group's shape class. Tune the
        # path that updates every profile, whatever the live weights and flag say.
        scratch_kwargs.update(
            SIZE_BUCKET=table.bucket,
            ALIGNED=table.aligned,
            weights_ptr=torch.full_like(weights, 0.25),
        )
        if skip is not None:
            scratch_kwargs["skip_ptr"] = torch.zeros_like(skip)
        return scratch_table.n_entries, scratch_kwargs

    return scratch, kwargs


@triton.jit
def _profile_weights_kernel(
    step_ptr,
    out_ptr,
    consts_ptr,
    update_after_step,
    update_every,
    POWER_PROFILES: tl.constexpr,
    WARMUP: tl.constexpr,
    N_PROFILES: tl.constexpr,
):
    """``out[k]``: profile k's weight for step ``step[0]``, 0 when the step makes no update. One program.

    ``consts`` (float64): ``c_0 .. c_7, max_weight, warmup_gamma, warmup_power``. Power-function profiles
    (``c_k = γ_k + 1``): ``w = 1 - (1 - Δt/u) ** c_k`` with ``Δt = update_every``, a copy while ``u <= Δt``.
    Decays (``c_k = 1 - decay_k``): ``ema_update._weight``'s formulas with each profile's smallest weight.
    In float64, so that ``1 - β`` keeps its precision at ``u`` up to 1e9; the constants come in a float64
    tensor because Python floats reach a kernel as fp32, rounded before any of this math.
    """
    t = tl.load(step_ptr)
    u = (t - update_after_step).to(tl.float64)
    due = t % update_every == 0
    max_weight = tl.load(consts_ptr + 8)
    warmup_gamma = tl.load(consts_ptr + 9)
    warmup_power = tl.load(consts_ptr + 10)
    for k in tl.static_range(N_PROFILES):
        c = tl.load(consts_ptr + k)
        if POWER_PROFILES:
            dt = (u * 0.0) + update_every
            # A float64 ``/`` compiles to div.rn.f64, correctly rounded (div_rn takes fp32 only).
            ratio = dt / tl.maximum(u, dt + 1.0)
            w = 1.0 - tl.exp2(c * tl.log2(1.0 - ratio))
            w = tl.where(u <= dt, 1.0, w)
        else:
            if WARMUP == 1:
                w = tl.maximum(c, 9.0 / (10.0 + tl.maximum(u, 0.0)))
            elif WARMUP == 2:
                base = 1.0 + tl.maximum(u - 1.0, 0.0) / warmup_gamma
                w = tl.maximum(c, tl.exp2(-warmup_power * tl.log2(base)))
            else:
                w = c
            w = tl.minimum(w, max_weight)
            copy = u <= 0.0
            if WARMUP == 2:
                copy = copy | (u == 1.0)
            w = tl.where(copy, 1.0, w)
        tl.store(out_ptr + k, tl.where(due, w, 0.0).to(tl.float32))


def profile_weights_(step: Tensor, profiles, out: Tensor) -> Tensor:
    """Fill ``out`` (float32 ``[K]``) with the K profiles' weights for step ``step[0]``: one launch, no host sync.

    ``profiles`` is a ``schedules.ProfileSet``; the result equals its ``weights()`` (float64 on the host)
    rounded to float32, with 0 on steps that make no update. The arguments are bound once per ``out``.
    """
    from triton_ema.schedules import PowerProfile

    first = profiles.members[0]
    power = isinstance(first, PowerProfile)
    key = (out, step, profiles.members)
    launch = _weights_launches.get(key)
    if launch is None:
        consts = [m.gamma + 1.0 if power else m.min_weight for m in profiles.members]
        consts += [0.0] * (MAX_PROFILES - len(consts))
        consts += [1.0, 1.0, 1.0] if power else [first.max_weight, first.warmup_gamma, first.warmup_power]
        kwargs = {
            "step_ptr": step,
            "out_ptr": out,
            # Kept alive by the bound launch: built once per key, not per step.
            "consts_ptr": torch.tensor(consts, dtype=torch.float64, device=step.device),
            "update_after_step": int(first.update_after_step),
            "update_every": int(first.update_every),
            "POWER_PROFILES": power,
            "WARMUP": 0 if power else first.warmup_code,
            "N_PROFILES": len(profiles.members),
        }
        launch = _weights_launches[key] = functools.partial(_profile_weights_kernel[(1,)], **kwargs)
    launch()
    return out


#: Bound launches of the weights kernel, per output buffer, counter and profile set. Tensors hash
#: by identity and the key keeps them alive, so an address is never reused under an entry.
_weights_launches: dict = {}
