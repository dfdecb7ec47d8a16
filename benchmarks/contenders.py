"""The EMA implementations under test, as plain objects shared by the benchmarks and the smoke test.

Each contender is built from a parameter list and a decay, owns fp32 shadows that start as a copy of the
parameters, and exposes the timed operation as a method: ``update()`` (one EMA update; kind ``update``, or
``profiles`` for K EMA profiles at once), ``step()`` (optimizer step, plus the EMA update for the wrapper) or
``swap(inside)`` (evaluate with EMA weights: ``inside`` runs while the parameters hold them).
``tests/test_benchmarks_smoke.py`` checks every one of them against a float64 reference, so what is timed is
what is tested.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.workloads import SHADOW_DTYPE
from triton_ema import EMAOptimizerWrapper

Params = list[torch.Tensor]
# The benchmarks' decay: the common default (timm, LitEma, the article).
DECAY = 0.9999
# Small, so that thousands of benchmark steps leave the parameters finite.
LR = 1e-3
# The non-finite guard is new in the core: its contender runs only where the wrapper has the option.
HAS_SKIP_NONFINITE = "skip_nonfinite" in inspect.signature(EMAOptimizerWrapper.__init__).parameters


def _noop() -> None:
    pass


def fp32_shadows(params: Params) -> Params:
    return [p.detach().to(SHADOW_DTYPE, copy=True) for p in params]


class ArticleEma:
    """The founding article's ``EMA`` class (timm ``ModelEmaV2``): one Python expression per tensor.

    ``decay * e + (1 - decay) * m`` allocates three temporaries per tensor and launches four kernels.
    """

    def __init__(self, params: Params, decay: float) -> None:
        self.params, self.shadows, self.decay = params, fp32_shadows(params), decay

    @torch.no_grad()
    def update(self) -> None:
        decay = self.decay
        for ema_v, model_v in zip(self.shadows, self.params, strict=True):
            ema_v.copy_(decay * ema_v + (1.0 - decay) * model_v)


class LitEma:
    """latent-diffusion's ``LitEma``: warmup decay ``min(decay, (1 + n) / (10 + n))`` computed on the host.

    The shadows live in a list rather than in name-keyed buffers; the arithmetic and the store / copy_to /
    restore swap are the original's.
    """

    def __init__(self, params: Params, decay: float) -> None:
        self.params, self.shadows, self.decay = params, fp32_shadows(params), decay
        self.num_updates = 0
        self.collected_params: Params = []

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        one_minus_decay = 1.0 - decay
        for shadow, param in zip(self.shadows, self.params, strict=True):
            shadow.sub_(one_minus_decay * (shadow - param))

    def store(self) -> None:
        self.collected_params = [param.clone() for param in self.params]

    def copy_to(self) -> None:
        for param, shadow in zip(self.params, self.shadows, strict=True):
            param.data.copy_(shadow.data)

    def restore(self) -> None:
        for c_param, param in zip(self.collected_params, self.params, strict=True):
            param.data.copy_(c_param.data)

    def swap(self, inside: Callable[[], None] = _noop) -> None:
        self.store()
        self.copy_to()
        inside()
        self.restore()


class LitEmaPrealloc(LitEma):
    """LitEma's swap in its fault-free form: the backup allocated once, each of store / copy_to / restore
    one ``_foreach_copy_``.

    The fastest a store / copy_to / restore swap gets: no allocation (hence no page faults) and no Python
    loop per tensor. The backup has the parameters' dtype, like LitEma's clone.
    """

    def __init__(self, params: Params, decay: float) -> None:
        super().__init__(params, decay)
        self.collected_params = [torch.empty_like(p) for p in params]

    @torch.no_grad()
    def store(self) -> None:
        torch._foreach_copy_(self.collected_params, self.params)

    @torch.no_grad()
    def copy_to(self) -> None:
        torch._foreach_copy_(self.params, self.shadows)

    @torch.no_grad()
    def restore(self) -> None:
        torch._foreach_copy_(self.params, self.collected_params)


class ForeachLerp:
    """``torch._foreach_lerp_`` over the lists (timm ``ModelEmaV3``, ``torch.optim.swa_utils.AveragedModel``).

    ``_foreach_lerp_`` wants one dtype, so bf16 parameters are first upcast into a preallocated fp32 copy;
    that copy is part of the cost.
    """

    def __init__(self, params: Params, decay: float) -> None:
        self.params, self.shadows, self.weight = params, fp32_shadows(params), 1.0 - decay
        mixed = any(p.dtype != s.dtype for p, s in zip(params, self.shadows, strict=True))
        self._upcast = [torch.empty_like(s) for s in self.shadows] if mixed else None

    @torch.no_grad()
    def update(self) -> None:
        ends = self.params
        if self._upcast is not None:
            torch._foreach_copy_(self._upcast, self.params)
            ends = self._upcast
        torch._foreach_lerp_(self.shadows, ends, self.weight)


class NemoForeach:
    """NeMo ``EMAOptimizer``: ``_foreach_mul_`` by the decay, then ``_foreach_add_`` with alpha ``1 - decay``."""

    def __init__(self, params: Params, decay: float) -> None:
        self.params, self.shadows, self.decay = params, fp32_shadows(params), decay

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_mul_(self.shadows, self.decay)
        torch._foreach_add_(self.shadows, self.params, alpha=1.0 - self.decay)


def foreach_update_tensor_weight(shadows: Params, params: Params, weight: torch.Tensor) -> None:
    """``shadow += weight * (param - shadow)`` with ``weight = 1 - decay`` a 0-dim device tensor.

    ``_foreach_lerp_`` has no tensor-weight overload, hence sub / mul / add, which Inductor fuses.
    """
    ends = [p.to(s.dtype) for p, s in zip(params, shadows, strict=True)]
    delta = torch._foreach_sub(ends, shadows)
    torch._foreach_mul_(delta, weight)
    torch._foreach_add_(shadows, delta)


class CompiledForeach:
    """``foreach_update_tensor_weight`` under ``torch.compile`` (GPU only in the benchmarks).

    The decay lives in a device tensor, so a schedule that changes it every step neither recompiles nor
    syncs. The first call compiles; the harness reports it apart from the steady state.
    """

    def __init__(self, params: Params, decay: float, mode: str | None = None) -> None:
        self.params, self.shadows = params, fp32_shadows(params)
        device = params[0].device
        self.weight = torch.tensor(1.0 - decay, dtype=SHADOW_DTYPE, device=device)
        if mode == "reduce-overhead":
            # CUDA-graph trees only update inputs in place when their addresses are static; otherwise they
            # copy every input into the graph's own buffers on each replay, or fall back to eager.
            for t in (*self.params, *self.shadows, self.weight):
                torch._dynamo.mark_static_address(t)
        self._fn = torch.compile(foreach_update_tensor_weight, mode=mode, fullgraph=True)

    @torch.no_grad()
    def update(self) -> None:
        self._fn(self.shadows, self.params, self.weight)


class GraphedForeachLerp:
    """``ForeachLerp`` captured once in a CUDA graph and replayed: one launch per update."""

    def __init__(self, params: Params, decay: float) -> None:
        self._lerp = ForeachLerp(params, decay)
        self.shadows = self._lerp.shadows
        saved = [s.clone() for s in self.shadows]
        # Capture must be preceded by a run on a side stream (torch.cuda.graphs' documented warm-up).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._lerp.update()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._lerp.update()
        # Undo the warm-up so that the shadows still start as the parameters.
        torch._foreach_copy_(self.shadows, saved)

    def update(self) -> None:
        self.graph.replay()


class Wrapper:
    """``triton_ema.EMAOptimizerWrapper`` around plain SGD, with its defaults (backend="auto")."""

    def __init__(self, params: Params, decay: float) -> None:
        self.opt = EMAOptimizerWrapper(torch.optim.SGD(params, lr=LR), decay=decay, warmup=None)

    @property
    def shadows(self) -> Params:
        return self.opt.ema_params()

    def update(self) -> None:
        self.opt.update_ema()

    def step(self) -> None:
        self.opt.step()

    def swap(self, inside: Callable[[], None] = _noop) -> None:
        with self.opt.ema_weights():
            inside()


class GuardedWrapper(Wrapper):
    """The wrapper with ``skip_nonfinite=True``: a device-side check that skips updates with inf or NaN."""

    def __init__(self, params: Params, decay: float) -> None:
        self.opt = EMAOptimizerWrapper(torch.optim.SGD(params, lr=LR), decay=decay, warmup=None, skip_nonfinite=True)


class OffloadWrapper(Wrapper):
    """The wrapper with ``ema_device="cpu"``: pinned host shadows, updated off the training stream.

    Timed on ``step()``: what a training step costs when the EMA lives on the host (the device-to-host copy
    of the parameters and the CPU update, as far as they hold the step up).
    """

    def __init__(self, params: Params, decay: float) -> None:
        self.opt = EMAOptimizerWrapper(torch.optim.SGD(params, lr=LR), decay=decay, warmup=None, ema_device="cpu")


def profile_decays(decay: float, k: int) -> tuple[float, ...]:
    """``k`` decays, shortest horizon first, each horizon a tenth of the next, the last ``decay`` itself.

    With the benchmarks' 0.9999: ``(0.999, 0.9999)`` for K=2 and ``(0.9, 0.99, 0.999, 0.9999)`` for K=4, the
    pairs users track. The values do not change the cost of an update, only what the smoke test checks.
    """
    # Rounded so that 0.9999 gives 0.999, not 0.9990000000000001 (1 - 0.9999 is not 1e-4 in binary).
    decays = tuple(round(1.0 - (1.0 - decay) * 10.0 ** (k - 1 - j), 12) for j in range(k))
    if decays[0] < 0.0:
        raise ValueError(f"decay {decay} is too short a horizon for {k} profiles a factor of 10 apart")
    return decays


# The power-function profiles of issue 8's example (EDM2's pair).
SIGMA_RELS = (0.05, 0.10)


def _profile_configs(decay: float, k: int, sigma_rel: bool) -> list[dict[str, float]]:
    if sigma_rel:
        return [{"sigma_rel": s} for s in SIGMA_RELS[:k]]
    return [{"decay": d, "warmup": None} for d in profile_decays(decay, k)]


class ProfilesWrapper:
    """The wrapper tracking K EMA profiles in one pass (``decay=(d1, ..., dK)`` or ``sigma_rel=(s1, s2)``).

    One update reads each parameter once for all K shadows: ``P + 2K·S`` bytes per element.
    """

    def __init__(self, params: Params, decay: float, k: int = 2, sigma_rel: bool = False) -> None:
        self.configs = _profile_configs(decay, k, sigma_rel)
        key = "sigma_rel" if sigma_rel else "decay"
        constant = {} if sigma_rel else {"warmup": None}
        self.opt = EMAOptimizerWrapper(
            torch.optim.SGD(params, lr=LR), **{key: tuple(c[key] for c in self.configs)}, **constant
        )

    @property
    def profile_shadows(self) -> list[Params]:
        return [self.opt.ema_params(profile=k) for k in range(len(self.configs))]

    def update(self) -> None:
        self.opt.update_ema()


class SeparateWrappers:
    """K single-profile wrappers over the same parameters, one ``update_ema()`` each: what a user without
    multi-profile support writes. K passes: ``K·(P + 2S)`` bytes per element, K times the host overhead."""

    def __init__(self, params: Params, decay: float, k: int = 2, sigma_rel: bool = False) -> None:
        self.configs = _profile_configs(decay, k, sigma_rel)
        self.opts = [EMAOptimizerWrapper(torch.optim.SGD(params, lr=LR), **c) for c in self.configs]

    @property
    def profile_shadows(self) -> list[Params]:
        return [opt.ema_params() for opt in self.opts]

    def update(self) -> None:
        for opt in self.opts:
            opt.update_ema()


class BareSGD:
    """The wrapper's inner optimizer alone, on the same (pre-filled) gradients."""

    def __init__(self, params: Params, decay: float) -> None:
        self.opt = torch.optim.SGD(params, lr=LR)

    def step(self) -> None:
        self.opt.step()


def _update_traffic(param_size: int) -> int:
    # Read the parameter and the shadow, write the shadow.
    return param_size + 2 * SHADOW_DTYPE.itemsize


def _profiles_traffic(param_size: int, k: int) -> int:
    # Read the parameter once, read and write each of the K shadows: 4 + 8K B/param fp32, 2 + 8K bf16.
    return param_size + 2 * k * SHADOW_DTYPE.itemsize


def _sgd_traffic(param_size: int) -> int:
    # Read the parameter and its gradient, write the parameter.
    return 3 * param_size


def _step_traffic(param_size: int) -> int:
    return _sgd_traffic(param_size) + _update_traffic(param_size)


def _swap_traffic(param_size: int) -> int:
    # Swapping in and swapping back each read and write both the parameter and the shadow.
    return 4 * (param_size + SHADOW_DTYPE.itemsize)


@dataclass(frozen=True)
class Contender:
    """One benchmarked implementation.

    ``traffic`` maps the parameter element size to the bytes an ideal implementation moves per parameter
    element: the same figure for every contender of a kind, so GB/s compares times over equal work.
    """

    name: str
    kind: str  # "update" | "profiles" | "step" | "swap": the benchmark group
    factory: Callable[[Params, float], Any]
    traffic: Callable[[int], int]
    cuda_only: bool = False
    warmup: str | None = None  # decay warmup, in EMAOptimizerWrapper's vocabulary
    # Why the contender cannot run in this build, if it cannot (a core option it needs is missing).
    missing: str | None = None
    # The method timed; the kind's name by default ("profiles" contenders time update()).
    method: str | None = None
    # EMA profiles the contender updates per call (the "profiles" kind).
    profiles: int = 1

    def unavailable(self, device: torch.device | str) -> str | None:
        """The reason this contender is skipped on ``device``, or ``None`` if it runs."""
        if self.cuda_only and torch.device(device).type != "cuda":
            return "needs CUDA"
        return self.missing

    def build(self, params: Params, decay: float) -> tuple[Any, Callable[..., None]]:
        """The implementation object and its timed method."""
        impl = self.factory(params, decay)
        return impl, getattr(impl, self.method or self.kind)

    def bytes_moved(self, numel: int, param_size: int) -> int:
        return numel * self.traffic(param_size)


CONTENDERS = [
    Contender("article_loop", "update", ArticleEma, _update_traffic),
    Contender("litema_loop", "update", LitEma, _update_traffic, warmup="litema"),
    Contender("foreach_lerp", "update", ForeachLerp, _update_traffic),
    Contender("nemo_foreach", "update", NemoForeach, _update_traffic),
    Contender("compile_foreach", "update", CompiledForeach, _update_traffic, cuda_only=True),
    Contender(
        "compile_foreach_ro",
        "update",
        functools.partial(CompiledForeach, mode="reduce-overhead"),
        _update_traffic,
        cuda_only=True,
    ),
    Contender("cuda_graph_lerp", "update", GraphedForeachLerp, _update_traffic, cuda_only=True),
    Contender("wrapper_update", "update", Wrapper, _update_traffic),
    Contender(
        "wrapper_update_guarded",
        "update",
        GuardedWrapper,
        _update_traffic,
        missing=None if HAS_SKIP_NONFINITE else "EMAOptimizerWrapper has no skip_nonfinite option in this build",
    ),
    *(
        Contender(
            f"{prefix}_update_{tag}{k}",
            "profiles",
            functools.partial(factory, k=k, sigma_rel=tag == "sr"),
            functools.partial(_profiles_traffic, k=k),
            method="update",
            profiles=k,
        )
        for tag, k in (("k", 2), ("k", 4), ("sr", 2))
        for prefix, factory in (("wrapper", ProfilesWrapper), ("separate", SeparateWrappers))
    ),
    Contender("sgd_step", "step", BareSGD, _sgd_traffic),
    Contender("wrapper_step", "step", Wrapper, _step_traffic),
    Contender("wrapper_step_offload", "step", OffloadWrapper, _step_traffic, cuda_only=True),
    Contender("litema_swap", "swap", LitEma, _swap_traffic),
    Contender("litema_swap_prealloc", "swap", LitEmaPrealloc, _swap_traffic),
    Contender("wrapper_swap", "swap", Wrapper, _swap_traffic),
]
# The contender every other one of its kind is compared with in the report.
# "profiles" contenders are compared with the single-profile update (K=1), from the "update" kind.
BASELINES = {"update": "foreach_lerp", "profiles": "wrapper_update", "step": "sgd_step", "swap": "litema_swap"}
