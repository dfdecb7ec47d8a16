"""The EMA as the model's own state dict, and as a safetensors file written one tensor at a time.

:func:`ema_state_dict` is keyed like ``model.state_dict()`` of the plain model:
``torch.compile``'s ``_orig_mod.`` and DDP's ``module.`` are taken off. Tracked
tensors give their EMA (in the model tensor's dtype), the rest the model's own
values. Under FSDP2 the values are DTensors placed like the parameters, so
``torch.distributed.checkpoint`` saves them sharded.

:func:`save_ema` writes the safetensors format directly: the header is known from
the tensors' global shapes, then each tensor is gathered (``full_tensor()`` for a
DTensor, a collective every rank joins), written by rank 0 and dropped, so no rank
holds more than its shards and one full tensor.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import torch
from torch import Tensor

from triton_ema.util import is_dtensor

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model under torch.compile's and DDP's (or DataParallel's) wrappers, whose keys users load."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def plain_key(key: str) -> str:
    # A compiled submodule leaves "_orig_mod." inside the key (model.block = torch.compile(block)).
    return ".".join(part for part in key.split(".") if part != "_orig_mod")


def named_ema(opt: Any, profile: int, model: torch.nn.Module | None) -> list[tuple[str, Tensor, torch.dtype]]:
    """``(plain key, value, the model tensor's dtype)`` in ``model.state_dict()`` order; EMAs not yet cast."""
    model = model if model is not None else opt._snapshots.config.model
    if model is None:
        raise ValueError("ema_state_dict() needs the model: pass model= here or to EMAOptimizerWrapper(...)")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = plain_model(model)
    ema: dict[int, Tensor] = {}
    for tensors, values in (
        (opt._tracked.params, opt.ema_params(profile)),
        (opt._tracked.buffers, opt.ema_buffers(profile)),
    ):
        for t, v in zip(tensors, values):
            ema[id(t)] = v.detach()
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    live = {name: ema[id(t)] for name, t in named if id(t) in ema}
    return [(plain_key(k), live.get(k, v), v.dtype) for k, v in model.state_dict().items()]


def ema_state_dict(opt: Any, profile: int, model: torch.nn.Module | None) -> dict[str, Tensor]:
    """See :meth:`EMAExport.ema_state_dict`."""
    out = {}
    for key, value, dtype in named_ema(opt, profile, model):
        # Inside ema_weights() the EMA lives in the model itself, and goes away on leaving: copies then.
        out[key] = value.to(dtype, copy=opt._dispatch.swapped)
    return out


class EMAExport:
    """The wrapper's export methods (a base of :class:`~triton_ema.EMAOptimizerWrapper`)."""

    def ema_state_dict(self, profile: int = 0, model: torch.nn.Module | None = None) -> dict[str, Tensor]:
        """The EMA keyed exactly like ``model.state_dict()``, for ``model.load_state_dict`` or DCP.

        ``model`` defaults to the one given to the constructor. Tracked tensors give
        profile ``profile``'s EMA, cast to the model tensor's dtype; untracked ones the
        model's own values. Keys are the plain model's: ``torch.compile``'s ``_orig_mod.``
        and DDP's ``module.`` are left out. Under FSDP2 the values are DTensors
        sharded like the parameters. Values are live shadows (copies inside
        :meth:`ema_weights`), detached.

        Example:
            >>> fresh.load_state_dict(opt.ema_state_dict())  # doctest: +SKIP
        """
        return ema_state_dict(self, self._check_profile(profile), model)

    def save_ema(self, path: str | os.PathLike, profile: int = 0, dtype: torch.dtype | None = None) -> None:
        """Write :meth:`ema_state_dict` to ``path`` as safetensors; a fresh model loads it with ``strict=True``.

        ``dtype`` casts the floating tensors (default: the model's own dtypes). Under
        FSDP2 (or any initialised process group) every rank calls it and rank 0
        writes, gathering one tensor at a time. The file appears whole
        (written beside it, then renamed).

        Example:
            >>> opt.save_ema("ema.safetensors")  # doctest: +SKIP
            >>> model.load_state_dict(safetensors.torch.load_file("ema.safetensors"))  # doctest: +SKIP
        """
        save_ema(self, path, self._check_profile(profile), dtype)


def safetensors_header(tensors: list[tuple[str, torch.dtype, torch.Size]], metadata: dict[str, str]) -> bytes:
    """The header of a safetensors file holding ``tensors`` in order: dtypes, global shapes, byte ranges."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in tensors:
        if dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"{name} has dtype {dtype}, which safetensors cannot hold")
        size = shape.numel() * dtype.itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def save_ema(opt: Any, path: str | os.PathLike, profile: int, dtype: torch.dtype | None) -> None:
    """See :meth:`EMAExport.save_ema`."""
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    # Nothing is cast or copied up front: each tensor is cast and gathered on its own turn.
    entries = [
        (key, value, dtype if dtype is not None and model_dtype.is_floating_point else model_dtype)
        for key, value, model_dtype in named_ema(opt, profile, None)
    ]
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    writer = not distributed or torch.distributed.get_rank() == 0
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    header = safetensors_header([(k, d, v.shape) for k, v, d in entries], {"format": "pt"})
    f = open(tmp, "wb") if writer else None
    try:
        if f is not None:
            f.write(header)
        for _, value, out_dtype in entries:
            # Every rank gathers each DTensor (a collective); only the writer keeps the bytes, one tensor at a time.
            # Cast the shard first: gathers move the output dtype's bytes, and a cast holds one shard more.
            full = value.to(out_dtype)
            full = full.full_tensor() if is_dtensor(full) else full
            if f is not None and full.numel():
                f.write(full.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del full
        if f is not None:
            f.flush()
            os.fsync(f.fileno())
    finally:
        if f is not None:
            f.close()
    if writer:
        os.replace(tmp, path)
    if distributed:
        torch.distributed.barrier()
