"""Which tensors the wrapper tracks: each parameter and buffer, the memory region it covers, and its shadows.

An :class:`Entry` is one memory region: the tensor the user gave and its shadows
(one per profile). A tensor that is exactly one already tracked (the same
parameter twice, a buffer that is a parameter) maps to the same entry; a partial
overlap of memory is refused. Adding tensors is planned first, without changing
anything, and committed only once every check has passed (``add_param_group``
adds the inner optimizer's group in between).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from triton_ema.dispatch import Dispatcher
from triton_ema.util import local_shard


@dataclass
class Entry:
    """One tracked memory region: the tensor the user gave (``owner``) and its shadows (one per profile)."""

    owner: Tensor
    shadows: list[Tensor]
    name: str
    key: tuple
    span: tuple | None
    slot: int = -1  # its place in the dispatcher's group


class Tracker:
    """The tracked parameters (in ``param_groups`` order) and buffers, and the entries they map to."""

    def __init__(self, dispatch: Dispatcher, ema_dtype: torch.dtype | None) -> None:
        self.dispatch = dispatch
        self.ema_dtype = ema_dtype
        self.params: list[Tensor] = []
        self.param_entry: list[int] = []
        self.buffers: list[Tensor] = []
        self.buffer_entry: list[int] = []
        self.entries: list[Entry] = []
        self.regions: dict[tuple, int] = {}

    def all_params(self, param_groups: list[dict[str, Any]]) -> list[tuple[Tensor, str]]:
        out = []
        for group in param_groups:
            out.extend(self.named(group, len(out)))
        return out

    @staticmethod
    def named(group: dict[str, Any], start: int) -> list[tuple[Tensor, str]]:
        params = list(group["params"])
        names = group.get("param_names")
        if not isinstance(names, (list, tuple)) or len(names) != len(params):
            names = [None] * len(params)
        return [
            (p, f"parameter {start + i}" + (f" ({n!r})" if n is not None else ""))
            for i, (p, n) in enumerate(zip(params, names))
        ]

    def check_groups(self, param_groups: list[dict[str, Any]]) -> None:
        """Refuse parameters added (or removed) behind the wrapper: to its live ``param_groups`` or the inner optimizer.

        Only counts on the fast path; the names are worked out once a count differs.
        """
        if sum(len(g["params"]) for g in param_groups) == len(self.params):
            return
        tracked = {id(p) for p in self.params}
        new = [name for p, name in self.all_params(param_groups) if id(p) not in tracked]
        what = f"{', '.join(new)} {'was' if len(new) == 1 else 'were'} added" if new else "parameters were removed"
        raise ValueError(
            f"{what} behind the wrapper (to its param_groups or to the wrapped optimizer), so the EMA does not "
            "track them; add parameter groups with opt.add_param_group(...) on the EMAOptimizerWrapper instead"
        )

    def shadow_dtype(self, t: Tensor) -> torch.dtype:
        return t.dtype if self.ema_dtype is None else torch.promote_types(t.dtype, self.ema_dtype)

    def plan(self, params: list[tuple[Tensor, str]], buffers: list[Tensor]) -> tuple[list, list, list, list]:
        """Work out the entries for new parameters and buffers, without changing anything.

        A tensor that is exactly one already tracked (the same parameter twice, a
        buffer that is a parameter) maps to the same entry; a partial overlap of
        memory is refused, since swapping one would corrupt the other.
        """
        new_entries: list[Entry] = []
        regions = dict(self.regions)
        spans = [(e.span, e.name) for e in self.entries if e.span is not None]
        param_entry, buffer_entry = [], []
        items = [(p, name, False) for p, name in params]
        items += [(b, f"buffer {len(self.buffers) + i}", True) for i, b in enumerate(buffers)]
        for t, name, is_buffer in items:
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} is a {type(t).__name__}, not a tensor")
            check_storage(t, name)
            local = local_shard(t)
            averaged = t.is_floating_point() or t.is_complex()
            if not averaged and not is_buffer:
                raise ValueError(f"{name} has dtype {t.dtype}; an EMA needs floating-point parameters")
            key = region_key(local)
            index = regions.get(key)
            if index is None:
                span = span_of(local)
                if span is not None:
                    for other_span, other_name in spans:
                        if other_span[0] == span[0] and other_span[1] < span[2] and span[1] < other_span[2]:
                            raise ValueError(
                                f"{name} and {other_name} overlap in memory without being the same tensor; "
                                "the EMA cannot average or swap one without corrupting the other; pass "
                                "tensors that are either disjoint or the very same view."
                            )
                    spans.append((span, name))
                with torch.no_grad():
                    shadow_dtype = self.shadow_dtype(t) if averaged else t.dtype
                    group_key, shadow = self.dispatch.plan(local, shadow_dtype, copy=not averaged)
                index = len(self.entries) + len(new_entries)
                regions[key] = index
                new_entries.append(Entry(owner=t, shadows=shadow, name=name, key=group_key, span=span))
            (buffer_entry if is_buffer else param_entry).append(index)
        return new_entries, param_entry, buffer_entry, [regions]

    def commit(self, plan: tuple, params: list[tuple[Tensor, str]], buffers: list[Tensor], step: int) -> None:
        new_entries, param_entry, buffer_entry, (regions,) = plan
        with torch.no_grad():
            for e in new_entries:
                for shadow in e.shadows:
                    shadow.copy_(local_shard(e.owner))
                e.slot = self.dispatch.add(e.key, local_shard(e.owner), e.shadows, e.name, step)
        self.entries.extend(new_entries)
        self.regions = regions
        self.params.extend(p for p, _ in params)
        self.param_entry.extend(param_entry)
        self.buffers.extend(buffers)
        self.buffer_entry.extend(buffer_entry)

    def track(self, params: list[tuple[Tensor, str]], buffers: list[Tensor], step: int) -> None:
        self.commit(self.plan(params, buffers), params, buffers, step)

    def pickled(self) -> dict[str, Any]:
        """What :meth:`unpickle` rebuilds the tracker from (the wrapper's pickling state holds it)."""
        return {
            "params": self.params,
            "param_entry": self.param_entry,
            "buffers": self.buffers,
            "buffer_entry": self.buffer_entry,
            "entries": [(e.owner, e.shadows, e.name) for e in self.entries],
        }

    def unpickle(self, state: dict[str, Any], step: int) -> None:
        """Track again what :meth:`pickled` returned, with the shadows it holds (into an empty tracker)."""
        self.params = list(state["params"])
        self.param_entry = list(state["param_entry"])
        self.buffers = list(state["buffers"])
        self.buffer_entry = list(state["buffer_entry"])
        self.entries, self.regions = [], {}
        for owner, shadows, name in state["entries"]:
            local = local_shard(owner)
            averaged = owner.is_floating_point() or owner.is_complex()
            key, _ = self.dispatch.plan(local, shadows[0].dtype, copy=not averaged)
            slot = self.dispatch.add(key, local, shadows, name, step)
            self.regions[region_key(local)] = len(self.entries)
            self.entries.append(Entry(owner=owner, shadows=shadows, name=name, key=key, span=span_of(local), slot=slot))

    def entry_name(self, position: int) -> str:
        return self.entries[self.param_entry[position]].name

    def holders(self, profile: int = 0) -> list[Tensor]:
        """Per entry, the local tensor that holds profile ``profile``'s EMA right now."""
        self.dispatch.join()
        groups = self.dispatch.groups
        return [self.dispatch.ema_holder(groups[e.key], profile)[e.slot] for e in self.entries]


def check_storage(t: Tensor, name: str) -> None:
    """Refuse tensors with no values to average: on the meta device, or sparse (no strided storage)."""
    if t.device.type == "meta":
        raise ValueError(
            f"{name} is on the meta device: it holds no values to average. Materialise the model first "
            "(model.to_empty(device=...) and its initialisation, or load_state_dict(..., assign=True)), then wrap"
        )
    if t.layout != torch.strided:
        raise ValueError(
            f"{name} is a {t.layout} tensor: the EMA needs dense (strided) parameters; sparse gradients "
            "(nn.Embedding(sparse=True)) are fine, sparse parameters are not"
        )


def region_key(t: Tensor) -> tuple:
    """Equal exactly for tensors that are the same view of the same memory."""
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


def span_of(t: Tensor) -> tuple | None:
    """``(device, first byte, end byte)`` of the memory ``t`` can reach, or None when it holds no elements."""
    if t.numel() == 0:
        return None
    size = t.element_size()
    low = sum(min(0, (n - 1) * st) for n, st in zip(t.shape, t.stride())) * size
    high = (sum(max(0, (n - 1) * st) for n, st in zip(t.shape, t.stride())) + 1) * size
    return (t.device, t.data_ptr() + low, t.data_ptr() + high)


def split_named(group: dict[str, Any]) -> dict[str, Any]:
    """A parameter group whose ``params`` are ``(name, tensor)`` pairs (torch >= 2.6), as the optimizer stores
    it: tensors in ``params``, names in ``param_names``; other groups unchanged."""
    pairs = group["params"]
    if not any(isinstance(p, tuple) for p in pairs):
        return group
    if not all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in pairs):
        raise ValueError("a parameter group's params must be all tensors or all (name, tensor) pairs")
    return {**group, "params": [p for _, p in pairs], "param_names": [n for n, _ in pairs]}
