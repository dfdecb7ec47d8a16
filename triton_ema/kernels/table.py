"""A device-side table of tensors that lets one kernel launch cover many tensors.

Each tensor is cut into entries of ``ENTRY`` elements. The table holds, per
tensor, the element addresses of its slots (parameter, shadow, ...) and its
length, and per entry the tensor it belongs to and its index inside that
tensor. A program of a kernel handles a few consecutive entries, so the work
is spread evenly whatever the tensor sizes are, and no Python loop over
tensors runs at launch time.

:func:`walk_entries` is that loop, written once for every table kernel: entry,
then tensor, then the entry's blocks, unmasked when the entry is full and
masked only in a tensor's last entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

#: Elements per table entry. Every kernel BLOCK divides it, so entry starts stay aligned.
ENTRY = 4096

#: Autotuning happens once per bucket of total size: the next power of two, capped here.
MAX_BUCKET = 1 << 26


def size_bucket(n_elements: int) -> int:
    return min(MAX_BUCKET, max(ENTRY, 1 << max(0, n_elements - 1).bit_length()))


@dataclass
class TensorTable:
    """Addresses and entry map of a group of equally shaped tensor lists on one device."""

    addrs: list[Tensor]  # one int64 [n_tensors] address vector per slot
    numels: Tensor  # int64 [n_tensors]
    entry_tensor: Tensor  # int32 [n_entries]
    entry_block: Tensor  # int32 [n_entries]
    n_entries: int
    n_elements: int
    aligned: bool  # every address is 16-byte aligned
    # The tensors whose addresses the table holds. Keeping them referenced keeps their
    # storage alive, so a kernel never writes memory that was freed behind the table.
    tensors: tuple[list[Tensor], ...]

    @property
    def bucket(self) -> int:
        return size_bucket(self.n_elements)


def build_table(*slots: list[Tensor]) -> TensorTable:
    """Build the table for ``slots``: lists of dense tensors, pairwise of equal shape and strides.

    Dense but non-contiguous layouts (channels_last) work because every slot of
    a tensor shares its strides, so the i-th element in memory order is the same
    logical element in each slot.
    """
    first = slots[0]
    device = first[0].device
    numels = [t.numel() for t in first]
    blocks = [-(-n // ENTRY) for n in numels]
    entry_tensor = torch.repeat_interleave(torch.arange(len(first), dtype=torch.int32), torch.tensor(blocks))
    entry_block = torch.cat([torch.arange(b, dtype=torch.int32) for b in blocks]) if first else entry_tensor
    aligned = all(t.data_ptr() % 16 == 0 for slot in slots for t in slot)
    addrs = [torch.tensor([t.data_ptr() for t in slot], dtype=torch.int64) for slot in slots]
    return TensorTable(
        addrs=[a.to(device) for a in addrs],
        numels=torch.tensor(numels, dtype=torch.int64, device=device),
        entry_tensor=entry_tensor.to(device),
        entry_block=entry_block.to(device),
        n_entries=int(sum(blocks)),
        n_elements=int(sum(numels)),
        aligned=aligned,
        tensors=tuple([t.detach() for t in slot] for slot in slots),
    )


def build_tables(*slots: list[Tensor]) -> list[TensorTable]:
    """Tables for ``slots``, the 16-byte aligned tensors apart from the others.

    One launch per table: normally one, since allocations are aligned. A few
    tensors at odd offsets (views into a larger buffer) get a table of their
    own, so that they do not turn every access of the group scalar.
    """
    aligned = [all(slot[i].data_ptr() % 16 == 0 for slot in slots) for i in range(len(slots[0]))]
    tables = []
    for want in (True, False):
        index = [i for i, a in enumerate(aligned) if a == want]
        if index:
            tables.append(build_table(*([slot[i] for i in index] for slot in slots)))
    return tables


@triton.jit
def entry_range(e, entry_tensor_ptr, entry_block_ptr, numels_ptr, ENTRY: tl.constexpr):
    """Table entry ``e``: its tensor's index, the entry's first element in that tensor, the tensor's length."""
    idx = tl.load(entry_tensor_ptr + e)
    start = tl.load(entry_block_ptr + e).to(tl.int64) * ENTRY
    n = tl.load(numels_ptr + idx)
    return idx, start, n


@triton.jit
def tensor_ptr(addrs_ptr, idx, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Tensor ``idx``'s address from a slot's address vector, as a pointer to ``DTYPE``."""
    ptr = tl.load(addrs_ptr + idx).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        # An address loaded from memory carries no alignment facts; without this hint
        # every access through it would be scalar.
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def walk_entries(
    entry_fn: tl.constexpr,
    block_fn: tl.constexpr,
    state,
    args,
    meta: tl.constexpr,
    numels_ptr,
    entry_tensor_ptr,
    entry_block_ptr,
    n_entries,
    ENTRY: tl.constexpr,
    BLOCK: tl.constexpr,
    ENTRIES_PER_PROGRAM: tl.constexpr,
):
    """Run ``block_fn`` over every block of this program's entries; returns the carried ``state``.

    ``ptrs = entry_fn(idx, args, meta)`` is called once per entry with the entry's tensor index (the
    slot addresses are read there, once per entry); ``state = block_fn(ptrs, base, offs, n, state, args,
    meta, MASKED)`` once per block of ``BLOCK`` elements, ``base`` its first element and ``offs`` its
    elements (``base + tl.arange(0, BLOCK)``). ``args`` is a tuple of run-time values, ``meta`` one
    of compile-time values (dtypes, flags). Whether the entry is full is decided once: a full entry's
    blocks are unrolled and unmasked, so their loads can be in flight together; only a tensor's last
    entry takes the masked path. ``state`` must be a tensor (a loop carries it).
    """
    pid = tl.program_id(0).to(tl.int64)
    for i in range(ENTRIES_PER_PROGRAM):
        e = pid * ENTRIES_PER_PROGRAM + i
        if e < n_entries:
            idx, start, n = entry_range(e, entry_tensor_ptr, entry_block_ptr, numels_ptr, ENTRY)
            ptrs = entry_fn(idx, args, meta)
            if start + ENTRY <= n:
                for off in tl.static_range(0, ENTRY, BLOCK):
                    state = block_fn(ptrs, start + off, start + off + tl.arange(0, BLOCK), n, state, args, meta, False)
            else:
                for off in range(0, ENTRY, BLOCK):
                    if start + off < n:
                        state = block_fn(
                            ptrs, start + off, start + off + tl.arange(0, BLOCK), n, state, args, meta, True
                        )
    return state


@triton.jit
def pair_offsets(base, BLOCK: tl.constexpr):
    """A block's element offsets arranged ``[2, BLOCK // 2]`` so that a thread holds 8 consecutive elements.

    Column ``i`` holds elements ``8 * (i // 4) + i % 4`` (row 0) and 4 further on (row 1). Triton gives a
    32-bit store at most 4 consecutive elements per thread (128 bits; more would leave gaps in a warp's
    write), and in a 1-D block the next 4 go to the next thread, so a 16-bit load of 8 per thread had to be
    converted through shared memory. Here a thread gets 4 along the columns and both rows: its 8 elements
    are consecutive in memory (two 128-bit accesses) and match a 128-bit load of 8 16-bit values
    (:func:`load_pairs_16`) when ``BLOCK`` is 8 elements per thread (any other config is correct, only
    laid out differently).
    """
    i = tl.arange(0, BLOCK // 2)
    j = tl.arange(0, 2)
    return base + (i // 4 * 8 + i % 4)[None, :] + 4 * j[:, None]


@triton.jit
def load_pairs_16(ptr, base, n, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    """A block of 16-bit values, 8 per thread in one 128-bit load, in :func:`pair_offsets`' arrangement.

    The reshape, permute and reshape only rename registers: the loaded layout (8 consecutive values
    per thread) and the pair layout are the same linear layout, so no data moves between threads.
    """
    r = tl.arange(0, BLOCK // 8)
    c = tl.arange(0, 8)
    offs = base + r[:, None] * 8 + c[None, :]
    if MASKED:
        x = tl.load(ptr + offs, mask=offs < n)
    else:
        x = tl.load(ptr + offs)
    return tl.reshape(tl.permute(tl.reshape(x, [BLOCK // 8, 2, 4]), (1, 0, 2)), [2, BLOCK // 2])
