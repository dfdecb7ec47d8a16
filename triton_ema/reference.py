"""The torch path: the EMA update and the swap with ``torch._foreach_*`` ops.

It runs wherever Triton does not (CPU tensors, ``backend="torch"``, layouts
the kernels do not take) and is the readable statement of what the kernels
compute. Every function takes lists of tensors that share one device and one
dtype pair.
"""

from __future__ import annotations

import torch
from torch import Tensor

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@torch.no_grad()
def ema_update_(params: list[Tensor], shadows: list[Tensor], weight: float) -> None:
    """``shadow += weight * (param - shadow)`` for every pair, in the shadow's dtype.

    ``weight == 1`` copies exactly. The update goes through ``lerp``, which
    evaluates ``param - (param - shadow) * (1 - weight)`` for weights of 0.5
    and above, so the copy at weight 1 and the Triton kernel agree.
    """
    if not params:
        return
    if weight == 1.0:
        torch._foreach_copy_(shadows, params)
        return
    if params[0].dtype != shadows[0].dtype:
        # lerp wants equal dtypes: a bf16 parameter is upcast to the fp32 shadow's dtype first.
        params = [p.to(s.dtype) for p, s in zip(params, shadows)]
    torch._foreach_lerp_(shadows, params, weight)


@torch.no_grad()
def swap_(a: list[Tensor], b: list[Tensor]) -> None:
    """Exchange the contents of equal-dtype pairs in place, with no temporary.

    Three XORs of the bit patterns swap two tensors exactly (NaN payloads and
    signed zeros included) without allocating anything.
    """
    for x, y in zip(a, b):
        xi = x.view(_INT_VIEW[x.element_size()])
        yi = y.view(_INT_VIEW[y.element_size()])
        xi.bitwise_xor_(yi)
        yi.bitwise_xor_(xi)
        xi.bitwise_xor_(yi)


@torch.no_grad()
def backup_and_load_(params: list[Tensor], shadows: list[Tensor]) -> list[Tensor]:
    """Copy ``params`` into backups of their own dtype, then load the shadows into them.

    Used when the shadow is wider than the parameter: the fp32 shadow is
    rounded into the parameter for evaluation but is itself never touched.
    """
    backups = [p.clone() for p in params]
    torch._foreach_copy_(params, shadows)
    return backups


@torch.no_grad()
def restore_(params: list[Tensor], backups: list[Tensor]) -> None:
    torch._foreach_copy_(params, backups)
