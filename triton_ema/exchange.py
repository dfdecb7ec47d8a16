"""The transactional swap: the EMA into the tracked tensors and back, undone on any failure.

Equal-dtype groups exchange parameter and shadow in place (an exchange is its
own inverse); groups whose shadows are wider back the parameters up in their own
dtype and load the shadows into them. Every step is journalled, so an exception
or a ``KeyboardInterrupt`` (held back by :func:`~triton_ema.util.interrupts_deferred`)
at any point of swapping in or out leaves every tensor as it was before that
operation. On the torch path the exchange goes through :class:`Exchanger`'s
small cache-sized chunks; on the Triton path one swap launch per table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from triton_ema.reference import is_dense
from triton_ema.util import interrupts_deferred

if TYPE_CHECKING:  # for annotations only: groups.py imports this module, never the reverse
    from triton_ema.groups import Group


def _swap_kernels():
    # Imported on first use so that ``import triton_ema`` never imports Triton's kernels.
    from triton_ema.kernels import swap

    return swap


def flat_bytes(t: Tensor) -> Tensor:
    """The bytes of a dense tensor with non-negative strides, in memory order, as a 1-D uint8 view."""
    n = t.numel() * t.element_size()
    flat = torch.empty(0, dtype=torch.uint8, device=t.device)
    return flat.set_(t.untyped_storage(), t.storage_offset() * t.element_size(), (n,), (1,))


def _byte_pieces(t: Tensor) -> Tensor | None:
    if t.numel() == 0:
        return None
    if is_dense(t) and all(st >= 0 for st in t.stride()):
        return flat_bytes(t)
    return None


class Exchanger:
    """Exchanges the contents of tensor pairs in place through one small reusable scratch buffer.

    Each pair is walked as raw bytes (any dtype; NaN payloads and signed zeros are
    kept, since nothing is computed) in chunks of at most ``max_bytes``: copy ``a`` to
    the scratch, ``b`` to ``a``, the scratch to ``b``. A chunk that fits in the cache
    is read from memory once and written once per side, half the traffic of an XOR
    swap, and nothing model-sized is allocated. Tensors that are not dense (gaps or
    overlaps in memory) get a scratch of their own size.

    :meth:`run` records its progress in a journal, and :meth:`undo` puts every
    tensor back as it was from any journal state, including an operation that
    failed or was interrupted half-way (each undo step is valid whether or not the
    operation after the recorded one also ran).
    """

    def __init__(self, a: list[Tensor], b: list[Tensor], max_bytes: int | None = None) -> None:
        if max_bytes is None:
            # 256 KiB a chunk on a CPU: the chunk of each side and the scratch (768 KiB) stay in the
            # L2 cache between the three copies. On ResNet-50 fp32, one thread, interleaved with a
            # preallocated-backup swap: 0.97-1.03x its time at 256 KiB, 1.16-1.30x at 1 MiB. On a GPU
            # larger chunks mean fewer launches.
            max_bytes = 1 << 18 if (a and a[0].device.type == "cpu") else 1 << 26
        pieces: list[tuple[Tensor, Tensor]] = []
        odd: list[tuple[Tensor, Tensor]] = []
        for x, y in zip(a, b):
            bx, by = _byte_pieces(x), _byte_pieces(y)
            if bx is not None and by is not None and x.stride() == y.stride():
                for start in range(0, bx.numel(), max_bytes):
                    pieces.append((bx[start : start + max_bytes], by[start : start + max_bytes]))
            elif x.numel():
                odd.append((x, y))
        device = a[0].device if a else torch.device("cpu")
        capacity = min(max_bytes, sum(x.numel() for x, _ in pieces)) if pieces else 0
        self.scratch = torch.empty(capacity, dtype=torch.uint8, device=device)
        self.chunks: list[tuple[list[Tensor], list[Tensor], list[Tensor]]] = []
        offset = capacity
        for x, y in pieces:
            if offset + x.numel() > capacity:
                self.chunks.append(([], [], []))
                offset = 0
            for chunk_list, t in zip(self.chunks[-1], (x, y, self.scratch[offset : offset + x.numel()])):
                chunk_list.append(t)
            offset += x.numel()
        for x, y in odd:
            self.chunks.append(([x], [y], [torch.empty_like(x)]))

    def run(self, journal: list[int]) -> None:
        """Exchange every pair. ``journal`` is ``[chunk, copies done in it]``, kept up to date."""
        for c, (xs, ys, tmp) in enumerate(self.chunks):
            journal[0], journal[1] = c, 0
            torch._foreach_copy_(tmp, xs)
            journal[1] = 1
            torch._foreach_copy_(xs, ys)
            journal[1] = 2
            torch._foreach_copy_(ys, tmp)
            journal[1] = 3
        journal[0], journal[1] = len(self.chunks), 0

    def undo(self, journal: list[int]) -> None:
        """Put back what :meth:`run` did up to ``journal``."""
        c, done = journal
        if c < len(self.chunks):
            xs, ys, tmp = self.chunks[c]
            # After copy 1 the scratch holds the old ``a``; after copy 2 ``a`` holds the old
            # ``b``. Both steps below are right whether or not the next copy also ran.
            if done >= 2:
                torch._foreach_copy_(ys, xs)
            if done >= 1:
                torch._foreach_copy_(xs, tmp)
        for k in reversed(range(min(c, len(self.chunks)))):
            self.run_chunk(k)

    def run_chunk(self, k: int) -> None:
        xs, ys, tmp = self.chunks[k]
        torch._foreach_copy_(tmp, xs)
        torch._foreach_copy_(xs, ys)
        torch._foreach_copy_(ys, tmp)


class Swap:
    """Which groups are swapped in, and how to put each one back."""

    def __init__(self) -> None:
        self._swap_state: list[tuple[Group, object]] | None = None
        self.restore_failed = False

    @property
    def swapped(self) -> bool:
        return self._swap_state is not None

    def ema_holder(self, group: Group, profile: int = 0) -> list[Tensor]:
        """The tensors that hold a profile's EMA right now: the params while an equal-dtype swap of it is in.

        Call :meth:`join` first when offloaded updates may still be running.
        """
        k = group.own_profile(profile)
        if self.swapped and group.exchanges and k == group.profile:
            return group.sources
        return group.profile_shadows[k]

    @staticmethod
    def _exchange(g: Group, journal: list[int]) -> None:
        """Exchange parameters and shadows of an equal-dtype group in place; its own inverse."""
        if g.use_triton:
            for i, table in enumerate(g.tables()):
                journal[0] = i
                _swap_kernels().swap_(table, g.param_dtype)
                journal[0] = i + 1
        else:
            g.exchanger().run(journal)

    def _exchange_whole(self, g: Group) -> None:
        """Exchange a group in place; if that fails part-way, undo what was done and re-raise."""
        journal = [0, 0]
        try:
            self._exchange(g, journal)
        except BaseException:
            self._unexchange(g, journal)
            raise

    @staticmethod
    def _unexchange(g: Group, journal: list[int]) -> None:
        if g.use_triton:
            for table in reversed(g.tables()[: journal[0]]):
                _swap_kernels().swap_(table, g.param_dtype)
        else:
            g.exchanger().undo(journal)

    @staticmethod
    def _load(g: Group) -> object:
        """Back the parameters up in their own dtype, then write the (wider) shadows into them.

        If the load fails part-way, the parameters are put back from the backup before it re-raises.
        """
        if g.use_triton:
            from triton_ema.kernels.table import build_tables

            swap = _swap_kernels()
            backups = [torch.empty_like(p) for p in g.params]
            tables = build_tables(g.params, g.real_shadows, backups)
            launched = 0
            try:
                for table in tables:
                    swap._launch(table, swap.MODE_BACKUP_AND_LOAD, g.param_dtype, g.shadow_dtype)
                    launched += 1
            except BaseException:
                for table in tables[:launched]:
                    swap._launch(table, swap.MODE_RESTORE, g.param_dtype, g.shadow_dtype)
                raise
            return tables
        backups = [torch.empty_like(p) for p in g.params]
        torch._foreach_copy_(backups, g.params)
        try:
            torch._foreach_copy_(g.params, g.real_shadows)
        except BaseException:
            torch._foreach_copy_(g.params, backups)
            raise
        return backups

    @staticmethod
    def _restore(g: Group, backup: object) -> None:
        if g.use_triton:
            _swap_kernels().restore_(backup, g.param_dtype, g.shadow_dtype)
        else:
            torch._foreach_copy_(g.params, backup)

    @torch.no_grad()
    def swap_in(self, groups: list[Group], profile: int = 0) -> None:
        """Put profile ``profile``'s EMA into every group's tensors. On any failure nothing has changed."""
        done: list[tuple[Group, object]] = []
        with interrupts_deferred():
            for g in groups:
                g.profile = g.own_profile(profile)
            try:
                for g in groups:
                    if g.exchanges:
                        self._exchange_whole(g)
                        done.append((g, None))
                    else:
                        done.append((g, self._load(g)))
            except BaseException:
                self._undo(done)
                self._reset_profiles(groups)
                raise
            self._swap_state = done

    @staticmethod
    def _reset_profiles(groups: list[Group]) -> None:
        for g in groups:
            g.profile = 0

    def _undo(self, done: list[tuple[Group, object]]) -> None:
        for g, backup in reversed(done):
            if backup is None:
                self._exchange(g, [0, 0])
            else:
                self._restore(g, backup)

    @torch.no_grad()
    def swap_out(self, groups: list[Group]) -> None:
        """Put the trained values back. On failure the EMA stays swapped in, as it was, and it re-raises."""
        state = self._swap_state or []
        with interrupts_deferred():
            undone: list[tuple[Group, object]] = []
            try:
                for g, backup in reversed(state):
                    if backup is None:
                        self._exchange_whole(g)
                    else:
                        # Idempotent: a failure half-way leaves the EMA partly loaded, and the loop
                        # below loads it again from the shadows.
                        try:
                            self._restore(g, backup)
                        except BaseException:
                            self._reload(g)
                            raise
                    undone.append((g, backup))
            except BaseException:
                for g, backup in reversed(undone):
                    if backup is None:
                        self._exchange(g, [0, 0])
                    else:
                        self._reload(g)
                raise
            self._swap_state = None
            self._reset_profiles(groups)

    def leave(self, swap_out: Callable[[], None]) -> None:
        """Run ``swap_out``; on failure try once more, and if that fails too, say how to recover."""
        try:
            swap_out()
        except BaseException as first:
            # Rolled back: the EMA is still fully in the model. One more try covers a passing fault.
            try:
                swap_out()
            except BaseException as e:
                self.restore_failed = True
                raise RuntimeError(
                    "could not put the trained weights back after ema_weights(); the model holds the EMA and "
                    "the trained weights are kept by the wrapper: call restore_trained_weights() once the "
                    f"cause is fixed ({type(e).__name__}: {e})"
                ) from e
            raise first
        self.restore_failed = False

    @staticmethod
    def _reload(g: Group) -> None:
        """Write the shadows into the parameters again (after a restore that failed or was undone)."""
        torch._foreach_copy_(g.params, g.real_shadows)
