"""Bit-level helpers shared by the kernel test modules."""

from __future__ import annotations

import torch


def int_view(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_same_bits(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    """Bit for bit equal, signed zeros included; a NaN matches any NaN (payloads are the hardware's choice)."""
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.shape == e.shape, (i, a.dtype, e.dtype)
        nan = a.isnan()
        assert torch.equal(nan, e.isnan()), f"tensor {i}: NaN in {int((nan != e.isnan()).sum())} other elements"
        differ = ((int_view(a) != int_view(e)) & ~nan).flatten()
        if differ.any():
            first = int(differ.nonzero()[0])
            raise AssertionError(
                f"tensor {i} ({a.numel()} elements): {int(differ.sum())} differ, the first at {first}: "
                f"{a.flatten()[first].item()!r} != {e.flatten()[first].item()!r}"
            )


def torch_lerp_fused(device: str) -> bool:
    """Whether torch's lerp on ``device`` rounds once per multiply-add, as the kernel's fmas do.

    nvcc contracts torch's CUDA lerp to fma and the vectorised CPU kernels call fmadd; only the
    CPU build without SIMD (``ATEN_CPU_CAPABILITY=default``) rounds the product and the sum apart.
    """
    return device == "cuda" or torch.backends.cpu.get_cpu_capability() != "DEFAULT"


def sprinkle_(tensors: list[torch.Tensor], values: tuple[float, ...]) -> None:
    """Write ``values`` at the first, middle and last elements of every 1-d tensor."""
    for t in tensors:
        if t.dim() == 1:
            for i, v in zip((0, t.numel() // 2, t.numel() - 1), values):
                t[i] = v
