"""Parameter lists to benchmark on: an architecture's shapes, a parameter dtype, a device."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from benchmarks.shapes import ARCHITECTURES

# Shadows are fp32 in every contender: bf16 workloads are bf16 parameters with fp32 shadows.
SHADOW_DTYPE = torch.float32
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# The real architectures are far above an H100's 50 MB L2, so GPU timings see HBM, not cache. small3 and
# mlp3 (3 tensors) and many5k (5,000 small tensors) measure the host overhead per step and per tensor. On
# CPU the big models stay out by default: the whole suite then takes a few minutes on two cores. On GPU
# many5k is opt-in: torch.compile of a 5,000-tensor foreach could take minutes, more than one device call
# has (benchmarks.launch_host measures its host cost on any machine).
DEFAULT_WORKLOADS = {
    "cuda": "small3,resnet50,vit_b16,gpt2,decoder_1p3b",
    "cpu": "small3,mlp3,resnet50,many5k",
}
# Workloads the interleaved side-by-side runner takes by default: the ones the targets are stated for.
PAIRED_WORKLOADS = ("small3", "mlp3", "resnet50", "many5k")
DEFAULT_DTYPES = "fp32,bf16"


@dataclass
class Workload:
    arch: str
    dtype: str
    params: list[torch.nn.Parameter]

    @property
    def label(self) -> str:
        return f"{self.arch}-{self.dtype}"

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def param_size(self) -> int:
        """Bytes per parameter element."""
        return self.params[0].element_size()


def make_workload(arch: str, dtype: str, device: str | torch.device, seed: int = 0) -> Workload:
    """Random parameters (and gradients, for the step benchmarks) with ``arch``'s shapes."""
    gen = torch.Generator(device).manual_seed(seed)
    params = []
    for shape in ARCHITECTURES[arch]():
        # Sampled in fp32 and rounded, so both dtypes of one architecture hold the same values.
        data = torch.randn(shape, generator=gen, device=device).to(DTYPES[dtype])
        param = torch.nn.Parameter(data)
        param.grad = torch.randn(shape, generator=gen, device=device).mul_(1e-3).to(data.dtype)
        params.append(param)
    return Workload(arch, dtype, params)


def default_device() -> str:
    return os.environ.get("EMA_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def selected(device: str, workloads: str | None = None, dtypes: str | None = None) -> list[tuple[str, str]]:
    """(arch, dtype) pairs from comma lists; ``None`` reads ``EMA_BENCH_WORKLOADS`` / ``EMA_BENCH_DTYPES``."""
    workloads = workloads or os.environ.get("EMA_BENCH_WORKLOADS") or DEFAULT_WORKLOADS[torch.device(device).type]
    dtypes = dtypes or os.environ.get("EMA_BENCH_DTYPES") or DEFAULT_DTYPES
    archs = [a.strip() for a in workloads.split(",") if a.strip()]
    kinds = [d.strip() for d in dtypes.split(",") if d.strip()]
    for names, table in ((archs, ARCHITECTURES), (kinds, DTYPES)):
        unknown = sorted(set(names) - table.keys())
        if unknown:
            raise ValueError(f"Unknown {unknown}; choose from {sorted(table)}")
    return [(a, d) for a in archs for d in kinds]
