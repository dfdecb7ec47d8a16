"""Host copies of snapshot tensors for :class:`~triton_ema.snapshot.SnapshotWriter`: pooled buffers, CUDA copies
on a side stream, CPU copies on a thread of their own.

A snapshot step must not wait for its copy: on a GPU the copy runs on a side stream that the training stream
waits for (on the GPU); on the CPU :meth:`HostCopies.later` runs it on one copy thread (torch's copies release the
GIL), and the caller fences it: nothing may write the source tensors until the returned future is done.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor


class HostCopies:
    """Host buffers taken back once their file is written, and the copies into them."""

    def __init__(self, rank: int = 0) -> None:
        self._pool: dict[tuple, list[Tensor]] = {}
        self._need: dict[tuple, int] = {}  # buffers of each key one snapshot takes
        self._lock = threading.Lock()
        self._stream = None
        self._rank = rank
        self._thread: ThreadPoolExecutor | None = None
        self._last: Future | None = None

    def reserve(self, tensor_sets: list[Mapping[str, Tensor]], dtype: torch.dtype | None) -> None:
        """Remember how many buffers of each kind one snapshot takes: that many are kept for the next one."""
        need: dict[tuple, int] = {}
        for tensors in tensor_sets:
            for x in tensors.values():
                key = (tuple(x.shape), dtype or x.dtype, x.is_cuda)
                need[key] = need.get(key, 0) + 1
        with self._lock:
            self._need.update(need)

    def take(self, shape: torch.Size, dtype: torch.dtype, pinned: bool) -> Tensor:
        with self._lock:
            free = self._pool.get((tuple(shape), dtype, pinned))
            if free:
                return free.pop()
        return torch.empty(shape, dtype=dtype, pin_memory=pinned)

    def release(self, tensors: dict[str, Tensor]) -> None:
        with self._lock:
            for buf in tensors.values():
                key = (tuple(buf.shape), buf.dtype, buf.is_pinned())
                free = self._pool.setdefault(key, [])
                # Keep what one snapshot takes (every profile's copy of every tensor of this shape), so that the
                # next snapshot allocates nothing and faults in no fresh pages.
                if len(free) < self._need.get(key, 1):
                    free.append(buf)
        tensors.clear()

    @staticmethod
    def fill(buf: Tensor, x: Tensor) -> None:
        """One CPU copy (on the copy thread for a deferred snapshot)."""
        buf.copy_(x)

    def copy(self, tensors: Mapping[str, Tensor], dtype: torch.dtype | None, wait: bool) -> tuple[dict, Any]:
        """Copies of ``tensors`` now (CPU) or on a side stream (CUDA); returns them and the CUDA event or None."""
        copies: dict[str, Tensor] = {}
        cuda_items = []
        for name, x in tensors.items():
            x = x.detach()
            if x.is_cuda:
                cuda_items.append((name, x, dtype or x.dtype))
            else:
                # A contiguous copy: safetensors needs contiguous tensors, and the caller keeps updating x.
                copies[name] = self.take(x.shape, dtype or x.dtype, False)
                self.fill(copies[name], x)
        event = self._copy_cuda(cuda_items, copies, wait) if cuda_items else None
        return {name: copies[name] for name in tensors}, event  # the caller's order

    def _copy_cuda(self, items: list, copies: dict[str, Tensor], wait: bool) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=items[0][1].device)
        side = self._stream
        side.wait_stream(torch.cuda.current_stream(items[0][1].device))
        with torch.cuda.stream(side):
            for name, x, target in items:
                buf = self.take(x.shape, target, True)
                buf.copy_(x, non_blocking=True)
                # The source was allocated on the caller's stream; keep its memory from being reused early.
                x.record_stream(side)
                copies[name] = buf
            event = torch.cuda.Event()
            event.record(side)
        if wait:
            torch.cuda.current_stream(items[0][1].device).wait_event(event)
        return event

    def later(self, work: Callable[[], None]) -> None:
        """Run ``work`` on the copy thread, after the work given before (which must report its own failures)."""
        if self._thread is None:
            self._thread = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"triton-ema-snapshot-copy-r{self._rank}"
            )
        self._last = self._thread.submit(work)

    def wait(self) -> None:
        """Return once the work given to :meth:`later` so far is done."""
        if self._last is not None:
            self._last.result()

    def close(self) -> None:
        self.wait()
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
        self._pool.clear()
