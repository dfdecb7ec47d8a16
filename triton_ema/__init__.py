"""triton-ema: a fused, CUDA-graph-friendly exponential moving average of a model's weights."""

from triton_ema.checkpoint import strip_ema
from triton_ema.find import find_ema
from triton_ema.schedules import PowerProfile, Schedule
from triton_ema.wrapper import EMAOptimizerWrapper

__all__ = ["EMAOptimizerWrapper", "PowerProfile", "Schedule", "find_ema", "strip_ema"]
__version__ = "0.1.0"
