"""The fused EMA update: one launch updates every tensor of a (device, dtype, dtype) group.

The kernel reads the step counter from device memory and evaluates the decay
schedule itself, so nothing is computed or synchronised on the host per step
and the launch can be captured in a CUDA graph.

The non-finite guard works the same way: :func:`nonfinite_` raises a flag in
device memory when a parameter holds NaN or inf, and a guarded
:func:`ema_update` reads that flag and writes nothing when it is raised.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from triton_ema.kernels.launch import TableKernel, configs_for_dtypes
from triton_ema.kernels.table import (
    ENTRY,
    TensorTable,
    build_table,
    load_pairs_16,
    pair_offsets,
    tensor_ptr,
    walk_entries,
)
from triton_ema.schedules import Schedule

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _weight(t, min_weight, max_weight, warmup_gamma, warmup_power, update_after_step, WARMUP: tl.constexpr):
    """``w = 1 - d`` of step ``t`` in fp32; see ``Schedule.weight`` for the host twin."""
    u = t - update_after_step
    uf = u.to(tl.float32)
    if WARMUP == 1:
        # 1 - (1 + u) / (10 + u), written without the cancelling subtraction.
        # div_rn: a plain ``/`` compiles to div.full.f32 (a reciprocal, then a multiply), which
        # differs from the correctly rounded weight of the torch path on about a quarter of steps.
        w = tl.maximum(min_weight, tl.math.div_rn(uf * 0.0 + 9.0, 10.0 + uf))
    elif WARMUP == 2:
        # Clamped at 0 so that u <= 0 (a copy anyway) takes no log of zero.
        base = 1.0 + tl.math.div_rn(tl.maximum(uf - 1.0, 0.0), uf * 0.0 + warmup_gamma)
        w = tl.maximum(min_weight, tl.exp2(-warmup_power * tl.log2(base)))
    else:
        w = min_weight
    w = tl.minimum(w, max_weight)
    copy = u <= 0
    if WARMUP == 2:
        copy = copy | (u == 1)
    return tl.where(copy, 1.0, w)


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """fp32 ``x`` in ``DTYPE``, rounded to nearest even.

    bf16 is rounded by hand: the interpreter truncates fp32 to bf16 (with or
    without ``fp_downcast_rounding``), and the bit arithmetic costs nothing in
    a memory-bound kernel, so the GPU and the interpreter give the same bits.
    """
    if DTYPE == tl.float32:
        return x
    elif DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # A NaN whose payload sits in the low bits would round to inf: keep it a (quiet) NaN.
        quiet_nan = (bits >> 16) | 0x40
        return tl.where(x != x, quiet_nan, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _ema_entry(idx, args, meta: tl.constexpr):
    """The entry's (parameter, shadow) pointers."""
    param_addrs_ptr, shadow_addrs_ptr, _ = args
    PARAM_DTYPE: tl.constexpr = meta[0]
    SHADOW_DTYPE: tl.constexpr = meta[1]
    ALIGNED: tl.constexpr = meta[2]
    return (
        tensor_ptr(param_addrs_ptr, idx, PARAM_DTYPE, ALIGNED),
        tensor_ptr(shadow_addrs_ptr, idx, SHADOW_DTYPE, ALIGNED),
    )


@triton.jit
def _ema_block(ptrs, base, offs, n, state, args, meta: tl.constexpr, MASKED: tl.constexpr):
    param_ptr, shadow_ptr = ptrs
    w = args[2]
    PARAM_DTYPE: tl.constexpr = meta[0]
    SHADOW_DTYPE: tl.constexpr = meta[1]
    BLOCK: tl.constexpr = offs.shape[0]
    ALIGNED: tl.constexpr = meta[2]
    # Scalar accesses anyway on an unaligned table: the plain layout, which needs no rearranging.
    WIDE: tl.constexpr = ALIGNED and PARAM_DTYPE.primitive_bitwidth == 16 and SHADOW_DTYPE.primitive_bitwidth == 32
    if WIDE:
        # A 16-bit parameter beside a 32-bit shadow: 8 elements per thread, each side in 128-bit accesses.
        offs = pair_offsets(base, BLOCK)
        mask = offs < n if MASKED else None
        p = load_pairs_16(param_ptr, base, n, BLOCK, MASKED).to(tl.float32)
        s = tl.load(shadow_ptr + offs, mask=mask).to(tl.float32)
    elif MASKED:
        mask = offs < n
        p = tl.load(param_ptr + offs, mask=mask).to(tl.float32)
        s = tl.load(shadow_ptr + offs, mask=mask).to(tl.float32)
    else:
        mask = None
        p = tl.load(param_ptr + offs).to(tl.float32)
        s = tl.load(shadow_ptr + offs).to(tl.float32)
    diff = p - s
    # lerp's two-sided form, what torch._foreach_lerp_ computes, with its fused multiply-adds:
    # torch's CUDA lerp is contracted to fma by nvcc and its vectorised CPU lerp calls fmadd, so
    # explicit fmas give the torch path's bits on the GPU and in the interpreter alike (w - 1 is
    # exact for w >= 0.5). A copy (w == 1) takes the parameter itself, so that it also resets a
    # shadow that holds inf or NaN.
    new = tl.where(w < 0.5, tl.fma(w, diff, s), tl.where(w == 1.0, p, tl.fma(w - 1.0, diff, p)))
    tl.store(shadow_ptr + offs, _round(new, SHADOW_DTYPE), mask=mask)
    return state


@triton.jit
def _ema_update_kernel(
    param_addrs_ptr,
    shadow_addrs_ptr,
    numels_ptr,
    entry_tensor_ptr,
    entry_block_ptr,
    n_entries,
    step_ptr,
    skip_ptr,
    min_weight,
    max_weight,
    warmup_gamma,
    warmup_power,
    update_after_step,
    update_every,
    SIZE_BUCKET,  # noqa: ARG001  (read by the autotuner's key only)
    PARAM_DTYPE: tl.constexpr,
    SHADOW_DTYPE: tl.constexpr,
    WARMUP: tl.constexpr,
    GUARDED: tl.constexpr,
    ALIGNED: tl.constexpr,
    ENTRY: tl.constexpr,
    BLOCK: tl.constexpr,
    ENTRIES_PER_PROGRAM: tl.constexpr,
):
    t = tl.load(step_ptr)
    active = t % update_every == 0
    if GUARDED:
        # A compile-time branch: the unguarded kernel never loads the flag.
        active = active & (tl.load(skip_ptr) == 0)
    if active:
        w = _weight(t, min_weight, max_weight, warmup_gamma, warmup_power, update_after_step, WARMUP)
        walk_entries(
            _ema_entry,
            _ema_block,
            n_entries * 0,
            (param_addrs_ptr, shadow_addrs_ptr, w),
            (PARAM_DTYPE, SHADOW_DTYPE, ALIGNED),
            numels_ptr,
            entry_tensor_ptr,
            entry_block_ptr,
            n_entries,
            ENTRY,
            BLOCK,
            ENTRIES_PER_PROGRAM,
        )


_update = TableKernel(
    _ema_update_kernel,
    key=["SIZE_BUCKET", "PARAM_DTYPE", "SHADOW_DTYPE", "WARMUP", "GUARDED", "ALIGNED"],
    configs=lambda kw: configs_for_dtypes((kw["PARAM_DTYPE"], kw["SHADOW_DTYPE"])),
)


@triton.jit
def _nonfinite_entry(idx, args, meta: tl.constexpr):
    return tensor_ptr(args[0], idx, meta[0], meta[1])


@triton.jit
def _nonfinite_block(x_ptr, base, offs, n, top, args, meta: tl.constexpr, MASKED: tl.constexpr):
    """``top`` raised to the element's exponent bits where they are higher.

    NaN and +-inf are the values whose exponent bits are all set, the largest the exponent field
    can hold: the running maximum of ``bits & EXPONENT`` reaches ``EXPONENT`` exactly when one of
    them was seen. The bits are read in the element's own width: no conversion to fp32.
    """
    DTYPE: tl.constexpr = meta[0]
    if DTYPE == tl.float32:
        bits_ptr = x_ptr.to(tl.pointer_type(tl.int32))
        exponent = 0x7F800000
    else:
        # Widened to int32 with the sign: the mask below drops it.
        bits_ptr = x_ptr.to(tl.pointer_type(tl.int16))
        exponent = 0x7F80 if DTYPE == tl.bfloat16 else 0x7C00
    if MASKED:
        bits = tl.load(bits_ptr + offs, mask=offs < n, other=0)
    else:
        bits = tl.load(bits_ptr + offs)
    return tl.maximum(top, bits.to(tl.int32) & exponent)


@triton.jit
def _nonfinite_kernel(
    addrs_ptr,
    numels_ptr,
    entry_tensor_ptr,
    entry_block_ptr,
    n_entries,
    flag_ptr,
    SIZE_BUCKET,  # noqa: ARG001  (read by the autotuner's key only)
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    ENTRY: tl.constexpr,
    BLOCK: tl.constexpr,
    ENTRIES_PER_PROGRAM: tl.constexpr,
):
    # Accumulated per lane and reduced once per program: a reduction per block would cost
    # shared-memory round trips in a kernel that should run at copy speed.
    top = walk_entries(
        _nonfinite_entry,
        _nonfinite_block,
        tl.zeros([BLOCK], dtype=tl.int32),
        (addrs_ptr,),
        (DTYPE, ALIGNED),
        numels_ptr,
        entry_tensor_ptr,
        entry_block_ptr,
        n_entries,
        ENTRY,
        BLOCK,
        ENTRIES_PER_PROGRAM,
    )
    exponent = 0x7F800000 if DTYPE == tl.float32 else (0x7F80 if DTYPE == tl.bfloat16 else 0x7C00)
    # Programs only ever store the same 1, so concurrent stores need no atomics; a clean
    # program stores nothing and cannot lower a flag another program raised.
    tl.store(flag_ptr, 1, mask=tl.max(top, axis=0) == exponent)


_nonfinite = TableKernel(
    _nonfinite_kernel, key=["SIZE_BUCKET", "DTYPE", "ALIGNED"], configs=lambda kw: configs_for_dtypes((kw["DTYPE"],))
)


def _schedule_args(schedule: Schedule) -> dict:
    return {
        "min_weight": schedule.min_weight,
        "max_weight": schedule.max_weight,
        "warmup_gamma": float(schedule.warmup_gamma),
        "warmup_power": float(schedule.warmup_power),
        "update_after_step": schedule.update_after_step,
        "update_every": schedule.update_every,
        "WARMUP": schedule.warmup_code,
    }


def _table_args(table: TensorTable, param_dtype: torch.dtype, shadow_dtype: torch.dtype) -> dict:
    return {
        "param_addrs_ptr": table.addrs[0],
        "shadow_addrs_ptr": table.addrs[1],
        "numels_ptr": table.numels,
        "entry_tensor_ptr": table.entry_tensor,
        "entry_block_ptr": table.entry_block,
        "n_entries": table.n_entries,
        "SIZE_BUCKET": table.bucket,
        "PARAM_DTYPE": _TL_DTYPES[param_dtype],
        "SHADOW_DTYPE": _TL_DTYPES[shadow_dtype],
        "ALIGNED": table.aligned,
        "ENTRY": ENTRY,
    }


def ema_update(
    table: TensorTable,
    step: Tensor,
    schedule: Schedule,
    param_dtype: torch.dtype,
    shadow_dtype: torch.dtype,
    skip: Tensor | None = None,
) -> None:
    """Apply step ``step[0]`` of ``schedule`` to every (parameter, shadow) pair of ``table``: one launch.

    ``step`` is a one-element int64 tensor on the table's device holding the
    count of successful steps, already incremented for this one. With
    ``skip`` (a one-element int32 tensor on the same device, as filled by
    :func:`nonfinite_`), the kernel writes nothing when ``skip[0] != 0``:
    the shadows keep their exact bits, and the host never reads the flag.
    """
    _update.cached(
        table,
        (step, skip, schedule, param_dtype, shadow_dtype),
        lambda: _update_launch(table, step, schedule, param_dtype, shadow_dtype, skip),
    )


def _update_launch(
    table: TensorTable,
    step: Tensor,
    schedule: Schedule,
    param_dtype: torch.dtype,
    shadow_dtype: torch.dtype,
    skip: Tensor | None,
) -> tuple:
    kwargs = {
        **_table_args(table, param_dtype, shadow_dtype),
        "step_ptr": step,
        # Unguarded, the pointer is never dereferenced (GUARDED is a constexpr): any tensor will do.
        "skip_ptr": step if skip is None else skip,
        "GUARDED": skip is not None,
        **_schedule_args(schedule),
    }

    def scratch() -> tuple[int, dict]:
        device = step.device
        n = table.bucket
        scratch_table = build_table(
            [torch.empty(n, dtype=param_dtype, device=device)], [torch.zeros(n, dtype=shadow_dtype, device=device)]
        )
        scratch_kwargs = {**kwargs, **_table_args(scratch_table, param_dtype, shadow_dtype)}
        # Keep the live key: the scratch buffers stand in for this group's shape class.
        scratch_kwargs.update(SIZE_BUCKET=table.bucket, ALIGNED=table.aligned, step_ptr=torch.ones_like(step))
        if skip is not None:
            # Tune the path that updates, whatever the live flag says.
            scratch_kwargs["skip_ptr"] = torch.zeros_like(skip)
        return scratch_table.n_entries, scratch_kwargs

    return scratch, kwargs


def nonfinite_(table: TensorTable, flag: Tensor) -> None:
    """Set ``flag[0] = 1`` if any tensor of slot 0 of ``table`` (the parameters) holds NaN or +-inf: one launch.

    ``flag`` is a one-element int32 tensor on the table's device that the
    caller zeroes once before the first table of an update; the kernel only
    ever raises it, so several tables (groups of one device) can share it.
    Nothing is read back on the host.
    """
    if table.n_entries == 0:
        return
    dtype = table.tensors[0][0].dtype

    def args(t: TensorTable, flag: Tensor) -> dict:
        return {
            "addrs_ptr": t.addrs[0],
            "numels_ptr": t.numels,
            "entry_tensor_ptr": t.entry_tensor,
            "entry_block_ptr": t.entry_block,
            "n_entries": t.n_entries,
            "flag_ptr": flag,
            "SIZE_BUCKET": table.bucket,
            "DTYPE": _TL_DTYPES[dtype],
            "ALIGNED": table.aligned,
            "ENTRY": ENTRY,
        }

    def scratch() -> tuple[int, dict]:
        scratch_table = build_table([torch.zeros(table.bucket, dtype=dtype, device=flag.device)])
        return scratch_table.n_entries, args(scratch_table, torch.zeros_like(flag))

    _nonfinite.cached(table, (flag,), lambda: (scratch, args(table, flag)))
