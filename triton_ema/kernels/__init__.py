"""Triton kernels. Importing this package never fails: without Triton, ``HAS_TRITON`` is False."""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401  (imported to probe availability)
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    HAS_TRITON = False
else:
    HAS_TRITON = True


#: The most EMA profiles the fused K-profile kernel updates in one launch (one address argument each).
MAX_PROFILES = 8

#: Parameter and shadow dtypes the kernels take; anything else goes through the torch path.
KERNEL_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter.

    The variable must be set before ``triton`` is first imported for the
    interpreter to be active; it is read here to decide which tensors the
    kernels may take and that the autotuner cannot time anything.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
