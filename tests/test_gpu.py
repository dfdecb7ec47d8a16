"""What only a real GPU can show: kernel launches per step, and a steady-state step that never waits for the device.

On CUDA the update is one fused launch per (device, dtype, shadow dtype) group, and the non-finite guard one
more per group; the step count and the guard's flag live on the device, so after warm-up (tables built, configs
tuned) a ``step()`` issues kernels and returns without a single host synchronisation. These tests count the
launches on the host and in the profiler's CUDA trace, and run steps under
``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising torch call.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from triton_ema import EMAOptimizerWrapper
from triton_ema.kernels import ema_update, launch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

WARMUP_STEPS = 3  # tables built, every kernel's config tuned on scratch
STEPS = 4


class Mixed(nn.Module):
    """An fp32 layer and a bf16 layer: two parameter dtypes, so two update groups."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(64, 1023)
        self.second = nn.Linear(1023, 8).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(nn.functional.gelu(self.first(x)).to(torch.bfloat16)).float()


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1e-3, momentum=0.9)


def build(inner: Callable = sgd, **options) -> tuple[Mixed, EMAOptimizerWrapper]:
    """A model with gradients in place and a wrapper past its warm-up steps."""
    torch.manual_seed(0)
    model = Mixed().cuda()
    opt = EMAOptimizerWrapper(inner(model.parameters()), decay=0.999, warmup=None, **options)
    nn.functional.mse_loss(model(torch.randn(32, 64, device="cuda")), torch.randn(32, 8, device="cuda")).backward()
    for _ in range(WARMUP_STEPS):
        opt.step()
    torch.cuda.synchronize()
    return model, opt


def ema_snapshot(model: nn.Module, opt: EMAOptimizerWrapper) -> list[torch.Tensor]:
    with opt.ema_weights():
        return [p.detach().clone() for p in model.parameters()]


def same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    ints = {2: torch.int16, 4: torch.int32}
    return all(torch.equal(x.view(ints[x.element_size()]), y.view(ints[y.element_size()])) for x, y in zip(a, b))


@pytest.mark.parametrize("skip_nonfinite", [False, True], ids=["unguarded", "guarded"])
@pytest.mark.parametrize("ema_dtype", [torch.float32, None], ids=["fp32-shadows", "own-dtype-shadows"])
def test_one_launch_per_group_per_step(monkeypatch, ema_dtype, skip_nonfinite):
    """fp32 and bf16 parameters make two groups: two update launches a step, two guard launches more if guarded."""
    model, opt = build(warmup="litema", ema_dtype=ema_dtype, skip_nonfinite=skip_nonfinite)
    n_groups = len({p.dtype for p in model.parameters()})
    assert n_groups == 2

    names = {id(ema_update._update): "_ema_update_kernel", id(ema_update._nonfinite): "_nonfinite_kernel"}
    calls: list[str] = []
    table_call = launch.TableKernel.__call__

    def counting_call(self, scratch, **kwargs):
        calls.append(names.get(id(self), "other"))
        return table_call(self, scratch, **kwargs)

    monkeypatch.setattr(launch.TableKernel, "__call__", counting_call)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            opt.step()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]

    expected = {"_ema_update_kernel": n_groups, "_nonfinite_kernel": n_groups if skip_nonfinite else 0}
    assert sorted(calls) == sorted(name for name, n in expected.items() for _ in range(n * STEPS)), calls
    for name, n in expected.items():
        # On the device too: tuning is over, so every call is exactly one launch.
        assert sum(name in k for k in kernels) == n * STEPS, (name, sorted(set(kernels)))


@pytest.mark.parametrize("skip_nonfinite", [False, True], ids=["unguarded", "guarded"])
def test_steady_state_step_never_syncs(skip_nonfinite):
    model, opt = build(warmup="litema", skip_nonfinite=skip_nonfinite)
    before = ema_snapshot(model, opt)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(STEPS):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not same_bits(ema_snapshot(model, opt), before), "the steps updated the EMA"


def test_guarded_step_skips_a_nan_without_syncing():
    """A NaN in one group skips the update of every group of the device, counted on the device."""
    model, opt = build(warmup="litema", skip_nonfinite=True)
    assert opt.skipped_updates == 0
    before = ema_snapshot(model, opt)
    with torch.no_grad():
        model.second.weight[3, 5] = float("nan")  # the bf16 group: the fp32 group must hold still too
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.skipped_updates == 2
    assert same_bits(ema_snapshot(model, opt), before)

    with torch.no_grad():
        model.second.weight[3, 5] = 0.0
    opt.step()
    assert opt.skipped_updates == 2
    assert not same_bits(ema_snapshot(model, opt), before), "updates resume once the parameters are finite"


def test_guarded_step_in_a_cuda_graph():
    """The flag and the counts live on the device: one captured step skips or updates per replay."""
    model, opt = build(lambda params: torch.optim.Adam(params, lr=1e-3, capturable=True), skip_nonfinite=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()

    before = ema_snapshot(model, opt)
    graph.replay()
    torch.cuda.synchronize()
    assert opt.skipped_updates == 0
    replayed = ema_snapshot(model, opt)
    assert not same_bits(replayed, before), "a clean replay updates"
    with torch.no_grad():
        model.first.bias[0] = float("inf")
    graph.replay()
    torch.cuda.synchronize()
    assert opt.skipped_updates == 1
    assert same_bits(ema_snapshot(model, opt), replayed)
