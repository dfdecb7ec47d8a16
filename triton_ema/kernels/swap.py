"""Swapping the EMA into the parameters and back, one launch per group.

``MODE_SWAP`` exchanges parameter and shadow in place when their dtypes are
equal: no temporary at all. When the shadow is wider (fp32 for a bf16
parameter), ``MODE_BACKUP_AND_LOAD`` saves the parameter into a backup of its
own dtype and writes the rounded shadow into it, and ``MODE_RESTORE`` copies
the backup back; the shadow itself is only read, so it is never rounded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from triton_ema.kernels.ema_update import _TL_DTYPES, _round
from triton_ema.kernels.launch import TableKernel, configs_for_dtypes
from triton_ema.kernels.table import ENTRY, TensorTable, build_table, build_tables, tensor_ptr, walk_entries

MODE_SWAP = 0
MODE_BACKUP_AND_LOAD = 1
MODE_RESTORE = 2


@triton.jit
def _swap_entry(idx, args, meta: tl.constexpr):
    """The entry's (a, b, c) pointers; the slots the mode never touches are not read (a stands in)."""
    a_addrs_ptr, b_addrs_ptr, c_addrs_ptr = args
    A_DTYPE: tl.constexpr = meta[0]
    B_DTYPE: tl.constexpr = meta[1]
    MODE: tl.constexpr = meta[2]
    ALIGNED: tl.constexpr = meta[3]
    a_ptr = tensor_ptr(a_addrs_ptr, idx, A_DTYPE, ALIGNED)
    b_ptr = a_ptr.to(tl.pointer_type(B_DTYPE))
    c_ptr = a_ptr
    if MODE != 2:
        b_ptr = tensor_ptr(b_addrs_ptr, idx, B_DTYPE, ALIGNED)
    if MODE != 0:
        c_ptr = tensor_ptr(c_addrs_ptr, idx, A_DTYPE, ALIGNED)
    return a_ptr, b_ptr, c_ptr


@triton.jit
def _swap_block(ptrs, base, offs, n, state, args, meta: tl.constexpr, MASKED: tl.constexpr):
    a_ptr, b_ptr, c_ptr = ptrs
    A_DTYPE: tl.constexpr = meta[0]
    MODE: tl.constexpr = meta[2]
    mask = offs < n if MASKED else None
    if MODE == 0:
        a = tl.load(a_ptr + offs, mask=mask)
        b = tl.load(b_ptr + offs, mask=mask)
        tl.store(a_ptr + offs, b, mask=mask)
        tl.store(b_ptr + offs, a, mask=mask)
    elif MODE == 1:
        a = tl.load(a_ptr + offs, mask=mask)
        b = tl.load(b_ptr + offs, mask=mask)
        tl.store(c_ptr + offs, a, mask=mask)
        tl.store(a_ptr + offs, _round(b.to(tl.float32), A_DTYPE), mask=mask)
    else:
        c = tl.load(c_ptr + offs, mask=mask)
        tl.store(a_ptr + offs, c, mask=mask)
    return state


@triton.jit
def _swap_kernel(
    a_addrs_ptr,
    b_addrs_ptr,
    c_addrs_ptr,
    numels_ptr,
    entry_tensor_ptr,
    entry_block_ptr,
    n_entries,
    SIZE_BUCKET,  # noqa: ARG001  (read by the autotuner's key only)
    A_DTYPE: tl.constexpr,
    B_DTYPE: tl.constexpr,
    MODE: tl.constexpr,
    ALIGNED: tl.constexpr,
    ENTRY: tl.constexpr,
    BLOCK: tl.constexpr,
    ENTRIES_PER_PROGRAM: tl.constexpr,
):
    walk_entries(
        _swap_entry,
        _swap_block,
        n_entries * 0,
        (a_addrs_ptr, b_addrs_ptr, c_addrs_ptr),
        (A_DTYPE, B_DTYPE, MODE, ALIGNED),
        numels_ptr,
        entry_tensor_ptr,
        entry_block_ptr,
        n_entries,
        ENTRY,
        BLOCK,
        ENTRIES_PER_PROGRAM,
    )


_swap = TableKernel(
    _swap_kernel,
    key=["SIZE_BUCKET", "A_DTYPE", "B_DTYPE", "MODE", "ALIGNED"],
    # Configs by the parameter's dtype, for every mode: the backup reads the wider shadow too, but stores
    # only in the parameter's dtype, so its shadow load takes the stores' 8 elements per thread (two
    # 128-bit loads) and no layout is converted.
    configs=lambda kw: configs_for_dtypes((kw["A_DTYPE"],)),
)


def _launch(table: TensorTable, mode: int, a_dtype: torch.dtype, b_dtype: torch.dtype) -> None:
    def args(t: TensorTable) -> dict:
        # Slots a table does not have point at slot 0; the mode never touches them.
        a, b, c = (t.addrs + [t.addrs[0]] * 2)[:3]
        return {
            "a_addrs_ptr": a,
            "b_addrs_ptr": b,
            "c_addrs_ptr": c,
            "numels_ptr": t.numels,
            "entry_tensor_ptr": t.entry_tensor,
            "entry_block_ptr": t.entry_block,
            "n_entries": t.n_entries,
            "SIZE_BUCKET": table.bucket,
            "A_DTYPE": _TL_DTYPES[a_dtype],
            "B_DTYPE": _TL_DTYPES[b_dtype],
            "MODE": mode,
            "ALIGNED": table.aligned,
            "ENTRY": ENTRY,
        }

    def scratch() -> tuple[int, dict]:
        device = table.numels.device
        n = table.bucket
        slots = [[torch.zeros(n, dtype=a_dtype, device=device)], [torch.zeros(n, dtype=b_dtype, device=device)]]
        if mode != MODE_SWAP:
            slots.append([torch.zeros(n, dtype=a_dtype, device=device)])
        scratch_table = build_table(*slots)
        return scratch_table.n_entries, args(scratch_table)

    _swap(scratch, **args(table))


def swap_(table: TensorTable, dtype: torch.dtype) -> None:
    """Exchange the contents of slots 0 and 1 of ``table`` (equal dtypes) in place."""
    _launch(table, MODE_SWAP, dtype, dtype)


def backup_and_load_(params: list[Tensor], shadows: list[Tensor]) -> tuple[list[Tensor], list[TensorTable]]:
    """Back the parameters up in their own dtype, then write the shadows into them.

    Returns the backups and the tables to pass to :func:`restore_`.
    """
    backups = [torch.empty_like(p) for p in params]
    tables = build_tables(params, shadows, backups)
    for table in tables:
        _launch(table, MODE_BACKUP_AND_LOAD, params[0].dtype, shadows[0].dtype)
    return backups, tables


def restore_(tables: list[TensorTable], param_dtype: torch.dtype, shadow_dtype: torch.dtype) -> None:
    """Copy the backups of :func:`backup_and_load_` tables back into the parameters."""
    for table in tables:
        _launch(table, MODE_RESTORE, param_dtype, shadow_dtype)
