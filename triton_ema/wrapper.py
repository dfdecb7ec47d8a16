"""EMAOptimizerWrapper: when to update the EMA, how to swap it in, how to checkpoint it."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from triton_ema.dispatch import BACKENDS, Dispatcher
from triton_ema.schedules import Schedule

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - builds without distributed support
    DTensor = None

_FORMAT_VERSION = 1


def _is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _local(t: Tensor) -> Tensor:
    """The tensor the kernels work on: a DTensor's local shard, else ``t`` itself."""
    return t._local_tensor if _is_dtensor(t) else t


class EMAOptimizerWrapper(Optimizer):
    r"""Wraps an optimizer and keeps an exponential moving average of its parameters.

    After every successful :meth:`step` of the wrapped optimizer, each parameter's
    shadow copy moves towards it:

    .. math::
        \text{ema} \leftarrow \text{ema} + (1 - d_t)\,(\theta - \text{ema})

    where ``t`` counts successful steps and ``d_t`` follows the warmup schedule
    (``u = t - update_after_step``):

    ============  =============================================================
    ``warmup``    ``d_t``
    ============  =============================================================
    ``None``      ``decay``
    ``"litema"``  ``min(decay, (1 + u) / (10 + u))`` (LitEma, torch_ema)
    ``"power"``   ``1 - (1 + (u - 1) / warmup_gamma) ** -warmup_power``, a copy
                  at ``u == 1`` (timm ModelEmaV3, diffusers, ema-pytorch)
    ============  =============================================================

    ``d_t`` is then clamped to ``[min_decay, decay]``; steps with
    ``t <= update_after_step`` copy the parameter, and only steps with
    ``t % update_every == 0`` update at all. The EMA averages roughly the last
    ``1 / (1 - decay)`` steps.

    The wrapper *is* an optimizer: ``param_groups``, ``state`` and ``defaults``
    are the wrapped optimizer's own objects, so LR schedulers, ``GradScaler``
    and trainers work on it unchanged.

    Args:
        optimizer: the optimizer to wrap.
        decay: the largest decay, in ``[0, 1]``.
        warmup: ``None``, ``"litema"`` or ``"power"``.
        warmup_gamma, warmup_power: the ``"power"`` schedule's constants.
        min_decay: the smallest decay, in ``[0, decay]``.
        update_after_step: steps before this one copy the parameters.
        update_every: update on every ``update_every``-th step only.
        ema_dtype: the shadows' dtype is ``torch.promote_types(param.dtype, ema_dtype)``;
            ``None`` keeps the parameter's dtype.
        backend: ``"auto"`` (Triton for CUDA tensors, torch ops otherwise),
            ``"triton"`` or ``"torch"``.
        buffers: module buffers to track too (e.g. ``model.buffers()`` for
            BatchNorm statistics): floating ones are averaged like parameters,
            the others copied on each update; all are swapped by
            :meth:`ema_weights`. Default: none, the parameters only.
        ema_device: ``"cpu"`` keeps the shadows of CUDA parameters in pinned host
            memory, updated by a worker thread after an asynchronous copy, so the
            training stream never waits for the EMA (not for CUDA graphs).
            Default: the parameter's device.

    .. note::
        A bf16 or fp16 parameter gets an fp32 shadow by default: with
        ``decay=0.9999`` a step moves the average by ``1e-4`` of the difference,
        below bf16's resolution, so a bf16 shadow would stop moving. On CUDA the
        update is one fused Triton launch per (device, dtype, shadow dtype) group
        that reads the step count from device memory: no host synchronisation,
        so a whole ``step()`` can be captured in a CUDA graph. DTensor parameters
        (FSDP2) are updated and swapped shard by shard, without gathering.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = EMAOptimizerWrapper(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.999, warmup="litema")
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> opt.step()
        >>> with opt.ema_weights():
        ...     _ = model(torch.randn(1, 4))  # evaluated with the averaged weights
    """

    def __init__(
        self,
        optimizer: Optimizer,
        decay: float = 0.9999,
        *,
        warmup: str | None = None,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2.0 / 3.0,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        update_every: int = 1,
        ema_dtype: torch.dtype | None = torch.float32,
        backend: str = "auto",
        buffers: Iterable[Tensor] | None = None,
        ema_device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, EMAOptimizerWrapper):
            raise TypeError("optimizer is already an EMAOptimizerWrapper")
        schedule = Schedule(decay, warmup, warmup_gamma, warmup_power, min_decay, update_after_step, update_every)
        if backend not in BACKENDS:
            raise ValueError(f"Unknown backend {backend!r}; expected one of {', '.join(map(repr, BACKENDS))}")
        if ema_dtype is not None and (not isinstance(ema_dtype, torch.dtype) or not ema_dtype.is_floating_point):
            raise ValueError(f"ema_dtype must be a floating torch.dtype or None, got {ema_dtype!r}")
        buffers = list(buffers) if buffers is not None else []
        for i, b in enumerate(buffers):
            if not isinstance(b, Tensor):
                raise TypeError(f"buffers[{i}] is a {type(b).__name__}, not a tensor")

        self.optimizer = optimizer
        self.schedule = schedule
        self.ema_dtype = ema_dtype
        self.backend = backend
        # Shared, not copied: a scheduler that changes our lr changes the inner one.
        self.param_groups = optimizer.param_groups
        self.defaults = optimizer.defaults
        self.state = optimizer.state
        # What Optimizer.__init__ would create; it is not called because it would add the groups again.
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._patch_step_function()

        self._step = 0
        self._params: list[Tensor] = []
        self._shadows: list[Tensor] = []
        self._dispatch = Dispatcher(backend, torch.device(ema_device) if ema_device is not None else None)
        self._buffers = buffers
        self._float_buffers = [b for b in buffers if b.is_floating_point()]
        self._other_buffers = [b for b in buffers if not b.is_floating_point()]
        self._other_buffer_shadows = [b.detach().clone() for b in self._other_buffers]
        self._buffer_shadows = [self._track(b) for b in self._float_buffers]
        self._track_new_params()

    # ------------------------------------------------------------------ tracking
    def _shadow_dtype(self, t: Tensor) -> torch.dtype:
        return t.dtype if self.ema_dtype is None else torch.promote_types(t.dtype, self.ema_dtype)

    def _track(self, t: Tensor) -> Tensor:
        """Create ``t``'s shadow (a copy in the shadow dtype, same layout) and register the pair."""
        # The parameter object itself (not a detached alias), so that the group sees a later
        # ``p.data = ...`` and rebuilds its table; a DTensor contributes its local shard.
        with torch.no_grad():
            return self._dispatch.add(_local(t), self._shadow_dtype(t), self._step)

    def _track_new_params(self) -> None:
        params = [p for group in self.param_groups for p in group["params"]]
        new = params[len(self._params) :]
        for i, p in enumerate(new, start=len(self._params)):
            if not p.is_floating_point():
                raise ValueError(f"parameter {i} has dtype {p.dtype}; an EMA needs floating-point parameters")
        for p in new:
            self._shadows.append(self._track(p))
            self._params.append(p)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._check_not_swapped("add_param_group")
        self.optimizer.add_param_group(param_group)
        self._track_new_params()

    # ------------------------------------------------------------------ stepping
    def _check_not_swapped(self, what: str) -> None:
        if self._dispatch.swapped:
            raise RuntimeError(f"{what}() called inside ema_weights(); leave the context first")

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take a step of the wrapped optimizer, then update the EMA. Returns what the inner step returns."""
        self._check_not_swapped("step")
        self._dispatch.before_step()
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        self.update_ema()
        return loss

    # Runs eagerly even when step() is traced by torch.compile: dynamo would drop the
    # step-count mutation on the optimizer object, and the kernels launch on their own.
    @torch.compiler.disable
    @torch.no_grad()
    def update_ema(self) -> None:
        """Count one successful step and update the EMA; :meth:`step` calls it after the inner step.

        Call it yourself only when you step the wrapped optimizer directly.
        """
        self._check_not_swapped("update_ema")
        self._step += 1
        self._dispatch.update(self._step, self.schedule)
        if self._other_buffers and self.schedule.weight(self._step) is not None:
            torch._foreach_copy_(self._other_buffer_shadows, self._other_buffers)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def num_steps(self) -> int:
        """Successful steps so far (read from the device when the kernels keep the count there)."""
        device_step = self._dispatch.device_step()
        return self._step if device_step is None else device_step

    def current_decay(self) -> float | None:
        """The decay the next step will use, or ``None`` if it makes no update."""
        return self.schedule.decay_at(self.num_steps + 1)

    # ------------------------------------------------------------------ reading and swapping
    def _ema_locals(self) -> list[Tensor]:
        """Local tensors holding the EMA of each parameter and floating buffer, in order."""
        holder = {}
        for g in self._dispatch.groups.values():
            for s, h in zip(g.shadows, self._dispatch.ema_holder(g)):
                holder[id(s)] = h
        return [holder[id(s)] for s in self._shadows + self._buffer_shadows]

    def _other_ema(self) -> list[Tensor]:
        """The tensors that hold the copies of the non-floating buffers right now (swapped, like the rest)."""
        return self._other_buffers if self._dispatch.swapped else self._other_buffer_shadows

    def _as_global(self, local: Tensor, like: Tensor) -> Tensor:
        if _is_dtensor(like):
            return DTensor.from_local(
                local, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
            )
        return local

    def ema_params(self) -> list[Tensor]:
        """The EMA of each parameter, in ``param_groups`` order (DTensors for DTensor parameters).

        These are the live shadows: modify them at your own risk. Inside
        :meth:`ema_weights` the EMA lives in the parameters, and the returned
        tensors are the parameters themselves where dtypes are equal.
        """
        locals_ = self._ema_locals()[: len(self._params)]
        return [self._as_global(s, p) for s, p in zip(locals_, self._params)]

    def ema_buffers(self) -> list[Tensor]:
        """The EMA of each floating buffer and the copy of each other buffer, in the order given."""
        float_iter = iter(self._ema_locals()[len(self._params) :])
        other_iter = iter(self._other_ema())
        return [next(float_iter) if b.is_floating_point() else next(other_iter) for b in self._buffers]

    @torch.no_grad()
    def copy_ema_to_params(self) -> None:
        """Write the EMA into the parameters (and buffers) for good, e.g. before exporting the model."""
        self._check_not_swapped("copy_ema_to_params")
        self._dispatch.join()
        for g in self._dispatch.groups.values():
            torch._foreach_copy_(g.params, g.shadows)
        if self._other_buffers:
            torch._foreach_copy_(self._other_buffers, self._other_buffer_shadows)

    @contextmanager
    def ema_weights(self) -> Iterator[EMAOptimizerWrapper]:
        """Context manager: inside, every tracked parameter (and buffer) holds its EMA value.

        The swap is in place, so a compiled model or anything else holding the
        parameters sees it. On exit, also when the body raises, the trained
        values come back bit-exactly and the shadows are as they were, provided
        the body did not modify the parameters. It does not nest, and
        :meth:`step` inside it raises.
        """
        if self._dispatch.swapped:
            raise RuntimeError("ema_weights() is already active; it does not nest")
        from triton_ema.reference import swap_

        buffers_swapped = False
        try:
            self._dispatch.swap_in()
            if self._other_buffers:
                swap_(self._other_buffers, self._other_buffer_shadows)
                buffers_swapped = True
            yield self
        finally:
            # Undo exactly what was done, also when the swap itself failed part-way.
            if buffers_swapped:
                swap_(self._other_buffers, self._other_buffer_shadows)
            self._dispatch.swap_out()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict with an ``"ema"`` entry: shadows, step count and configuration.

        Shadows are the live tensors (as in ``Optimizer.state_dict``), except
        inside :meth:`ema_weights`, where they are copies.
        """
        state = self.optimizer.state_dict()
        holders = self._ema_locals()
        others = self._other_ema()
        if self._dispatch.swapped:
            holders = [h.clone() for h in holders]
            others = [o.clone() for o in others]
        n = len(self._params)
        state["ema"] = {
            "format_version": _FORMAT_VERSION,
            "step": self.num_steps,
            "schedule": self.schedule.to_dict(),
            "shadows": [self._as_global(h, p) for h, p in zip(holders[:n], self._params)],
            "buffer_shadows": [self._as_global(h, b) for h, b in zip(holders[n:], self._float_buffers)],
            "other_buffer_shadows": list(others),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`. A state dict that does not fit raises ``ValueError`` and changes nothing.

        The schedule is restored too (as ``Optimizer.load_state_dict`` restores
        the learning rate); the backend and ``ema_dtype`` stay as constructed,
        and shadows are copied into the existing ones.
        """
        self._check_not_swapped("load_state_dict")
        state_dict = dict(state_dict)
        ema = state_dict.pop("ema", None)
        if not isinstance(ema, dict):
            raise ValueError(
                "state dict has no 'ema' entry: it was not saved by EMAOptimizerWrapper "
                "(to load only the wrapped optimizer's state, call wrapper.optimizer.load_state_dict)"
            )
        self._validate(state_dict, ema)
        schedule = Schedule(**ema["schedule"])

        self._dispatch.join()
        self.optimizer.load_state_dict(state_dict)
        with torch.no_grad():
            targets = self._shadows + self._buffer_shadows + self._other_buffer_shadows
            sources = ema["shadows"] + ema["buffer_shadows"] + ema["other_buffer_shadows"]
            for target, source in zip(targets, sources):
                target.copy_(_local(source))
        self.schedule = schedule
        self._step = int(ema["step"])
        self._dispatch.set_step(self._step)

    def _validate(self, state_dict: dict[str, Any], ema: dict[str, Any]) -> None:
        if ema.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"unknown EMA state format {ema.get('format_version')!r}; expected {_FORMAT_VERSION}")
        missing = {"step", "schedule", "shadows", "buffer_shadows", "other_buffer_shadows"} - ema.keys()
        if missing:
            raise ValueError(f"EMA state is missing {sorted(missing)}")
        step = ema["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"EMA step must be a non-negative int, got {step!r}")
        try:
            Schedule(**ema["schedule"])
        except TypeError as e:
            raise ValueError(f"EMA schedule in the state dict is invalid: {e}") from e

        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            n = len(groups) if isinstance(groups, list) else None
            raise ValueError(f"state dict has {n} parameter groups, this optimizer has {len(self.param_groups)}")
        for i, (saved, ours) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(ours["params"]):
                raise ValueError(
                    f"parameter group {i} has {len(saved['params'])} parameters in the state dict, "
                    f"{len(ours['params'])} here"
                )

        def check(kind: str, saved: list, ours: list[Tensor]) -> None:
            if len(saved) != len(ours):
                raise ValueError(f"state dict has {len(saved)} {kind}, this wrapper tracks {len(ours)}")
            for i, (s, o) in enumerate(zip(saved, ours)):
                if not isinstance(s, Tensor) or s.shape != o.shape:
                    got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
                    raise ValueError(f"{kind}[{i}] has shape {got} in the state dict, {tuple(o.shape)} here")
                if _local(s).shape != _local(o).shape:
                    raise ValueError(
                        f"{kind}[{i}] has local shard shape {tuple(_local(s).shape)} in the state dict, "
                        f"{tuple(_local(o).shape)} here"
                    )

        check("shadows", ema["shadows"], self._params)
        check("buffer_shadows", ema["buffer_shadows"], self._float_buffers)
        check("other_buffer_shadows", ema["other_buffer_shadows"], self._other_buffers)

    # ------------------------------------------------------------------ display
    def __repr__(self) -> str:
        s = self.schedule
        inner = "\n".join("  " + line for line in repr(self.optimizer).splitlines())
        return (
            f"{type(self).__name__}(decay={s.decay}, warmup={s.warmup!r}, min_decay={s.min_decay}, "
            f"update_after_step={s.update_after_step}, update_every={s.update_every}, "
            f"ema_dtype={self.ema_dtype}, backend={self.backend!r}, ema_device={self._dispatch.ema_device}, "
            f"steps={self._step})(\n{inner}\n)"
        )
