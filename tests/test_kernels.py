"""Every kernel against the float64 reference: through Triton's interpreter on CPU, for real on CUDA."""

from __future__ import annotations

import pytest
import torch
from reference64 import decay64, poison_, tol

from triton_ema.kernels import interpreting
from triton_ema.kernels.ema_update import _update, ema_update
from triton_ema.kernels.launch import INTERPRET_CONFIG
from triton_ema.kernels.swap import backup_and_load_, restore_, swap_
from triton_ema.kernels.table import ENTRY, build_table, build_tables
from triton_ema.schedules import Schedule

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not interpreting(), reason="CPU tensors need the interpreter")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float32, torch.bfloat16, torch.float16)]
BLOCK = INTERPRET_CONFIG["BLOCK"]
# Around the interpreter's block size and the table's entry size, plus a few odd ones.
SIZES = [1, 17, BLOCK - 1, BLOCK, BLOCK + 1, ENTRY - 1, ENTRY + 1, 3 * ENTRY + 5, 2500]


def make_params(device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    flat = [torch.randn(n, device=device).to(dtype) for n in SIZES]
    conv = torch.randn(6, 5, 3, 7, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    # A view one element into a larger buffer: not 16-byte aligned, so the scalar path runs.
    unaligned = torch.randn(ENTRY + 3, device=device).to(dtype)[1:]
    return [*flat, conv, unaligned]


def shadows_like(params: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    return [torch.empty_like(p, dtype=dtype).copy_(torch.randn(p.shape)) for p in params]


def apply64(shadows64, params, d):
    return [s * d + p.double() * (1 - d) for s, p in zip(shadows64, params)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("param_dtype", DTYPES)
@pytest.mark.parametrize("warmup", [None, "litema", "power"])
def test_update_matches_float64(seed, device, param_dtype, warmup):
    schedule = Schedule(decay=0.97, warmup=warmup, update_after_step=1, update_every=2, min_decay=0.05)
    params = make_params(device, param_dtype)
    shadows = shadows_like(params, torch.float32)
    ref = [s.double() for s in shadows]
    table = build_table(params, shadows)
    for t in range(1, 9):
        for p in params:
            p.copy_(torch.randn(p.shape))
        ema_update(table, torch.tensor([t], device=device), schedule, param_dtype, torch.float32)
        d = decay64(t, decay=0.97, warmup=warmup, min_decay=0.05, after=1, every=2)
        if d is not None:
            ref = apply64(ref, params, d)
    for s, r in zip(shadows, ref):
        torch.testing.assert_close(s.double(), r, **tol(torch.float32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("param_dtype", DTYPES)
def test_copy_step_writes_every_element(seed, device, param_dtype):
    """A copy (t <= update_after_step) must overwrite poisoned shadows exactly, element by element."""
    params = make_params(device, param_dtype)
    shadows = shadows_like(params, torch.float32)
    poison_(shadows)
    ema_update(
        build_table(params, shadows),
        torch.tensor([1], device=device),
        Schedule(update_after_step=3),
        param_dtype,
        torch.float32,
    )
    for s, p in zip(shadows, params):
        assert torch.equal(s, p.float())


@pytest.mark.parametrize("device", DEVICES)
def test_skipped_step_leaves_shadows_alone(seed, device):
    params = make_params(device, torch.float32)
    shadows = shadows_like(params, torch.float32)
    before = [s.clone() for s in shadows]
    ema_update(
        build_table(params, shadows),
        torch.tensor([3], device=device),
        Schedule(update_every=2),
        torch.float32,
        torch.float32,
    )
    assert all(torch.equal(s, b) for s, b in zip(shadows, before))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("schedule", "t", "weight"),
    [
        (Schedule(decay=0.9999), 7, 1e-4),
        (Schedule(decay=0.99999), 7, 1e-5),
        (Schedule(decay=0.9999, warmup="litema"), 50_000, 9 / 50_010),
        (Schedule(decay=0.9999, warmup="power", warmup_power=0.75), 20_000, 20_000**-0.75),
    ],
    ids=["1e-4", "1e-5", "litema", "power"],
)
def test_weight_keeps_precision(device, schedule, t, weight):
    """``w`` must be accurate to fp32 resolution, not to ``1 - 0.9999`` evaluated in fp32 (1.7e-5 off)."""
    param = torch.ones(ENTRY, device=device)
    shadow = torch.zeros(ENTRY, device=device)
    ema_update(build_table([param], [shadow]), torch.tensor([t], device=device), schedule, torch.float32, torch.float32)
    torch.testing.assert_close(shadow.double(), torch.full_like(shadow, weight, dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_many_tensors_one_table(seed, device):
    params = [torch.randn(int(n), device=device) for n in torch.randint(1, 300, (200,))]
    shadows = shadows_like(params, torch.float32)
    ref = apply64([s.double() for s in shadows], params, 0.9)
    ema_update(
        build_table(params, shadows),
        torch.tensor([5], device=device),
        Schedule(decay=0.9),
        torch.float32,
        torch.float32,
    )
    for s, r in zip(shadows, ref):
        torch.testing.assert_close(s.double(), r, **tol(torch.float32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swap_exchanges_bit_exactly(seed, device, dtype):
    a = make_params(device, dtype)
    b = [
        torch.randn(x.shape, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
        if x.dim() == 4
        else torch.randn(x.shape, device=device).to(dtype)
        for x in a
    ]
    a0, b0 = [x.clone() for x in a], [x.clone() for x in b]
    table = build_table(a, b)
    swap_(table, dtype)
    assert all(torch.equal(x, y) for x, y in zip(a, b0)) and all(torch.equal(x, y) for x, y in zip(b, a0))
    swap_(table, dtype)
    assert all(torch.equal(x, y) for x, y in zip(a, a0)) and all(torch.equal(x, y) for x, y in zip(b, b0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_backup_load_restore(seed, device, dtype):
    params = make_params(device, dtype)
    shadows = shadows_like(params, torch.float32)
    p0, s0 = [p.clone() for p in params], [s.clone() for s in shadows]
    backups, tables = backup_and_load_(params, shadows)
    assert [t.aligned for t in tables] == [True, False], "the unaligned view gets a table of its own"
    assert all(torch.equal(p, s.to(dtype)) for p, s in zip(params, shadows))
    assert all(torch.equal(b, p) for b, p in zip(backups, p0))
    poison_(params)
    restore_(tables, dtype, torch.float32)
    assert all(torch.equal(p, q) for p, q in zip(params, p0))
    assert all(torch.equal(s, q) for s, q in zip(shadows, s0)), "the fp32 shadow must never be rounded"


def test_unaligned_tensors_get_their_own_table():
    buffer = torch.randn(100)
    tensors = [torch.randn(8), buffer[1:9], torch.randn(8), buffer[16:24]]
    shadows = [torch.randn(8) for _ in tensors]
    aligned, unaligned = build_tables(tensors, shadows)
    assert aligned.aligned and not unaligned.aligned
    assert [t.data_ptr() for t in aligned.tensors[0]] == [
        tensors[0].data_ptr(),
        tensors[2].data_ptr(),
        tensors[3].data_ptr(),
    ]
    assert [t.data_ptr() for t in unaligned.tensors[0]] == [tensors[1].data_ptr()]


@pytest.mark.skipif(not interpreting(), reason="interpreter only")
def test_interpreter_never_autotunes():
    params, shadows = [torch.randn(10)], [torch.zeros(10)]
    ema_update(build_table(params, shadows), torch.tensor([1]), Schedule(), torch.float32, torch.float32)
    assert _update.tuned.cache == {} and _update.chosen == {}


@pytest.mark.gpu
def test_tuning_applies_the_update_once_and_clones_nothing(seed):
    """The first launch of a new key tunes on scratch buffers: the live update still happens exactly once."""
    n = 3 * (1 << 20) + 7  # a size bucket no other test uses
    param = torch.randn(n, device="cuda")
    shadow = torch.randn(n, device="cuda")
    expected = shadow.double() * 0.9 + param.double() * 0.1
    table = build_table([param], [shadow])
    ema_update(table, torch.tensor([4], device="cuda"), Schedule(decay=0.9), torch.float32, torch.float32)
    torch.testing.assert_close(shadow.double(), expected, **tol(torch.float32))
    assert any(key[0] == table.bucket for key in _update.chosen), "the choice is cached under the live key"


@pytest.mark.gpu
def test_loads_are_vectorised():
    """With 16-byte aligned tables the fp32 loads must be 128-bit (v4) loads."""
    import triton

    from triton_ema.kernels.ema_update import _ema_update_kernel, _schedule_args, _table_args

    params, shadows = [torch.randn(ENTRY, device="cuda")], [torch.randn(ENTRY, device="cuda")]
    table = build_table(params, shadows)
    kwargs = {
        **_table_args(table, torch.float32, torch.float32),
        "step_ptr": torch.ones(1, dtype=torch.int64, device="cuda"),
        **_schedule_args(Schedule()),
    }
    compiled = _ema_update_kernel[(table.n_entries,)](**kwargs, BLOCK=1024, ENTRIES_PER_PROGRAM=1, num_warps=4)
    ptx = compiled.asm["ptx"]
    assert "ld.global.v4" in ptx or "ld.global.nc.v4" in ptx, triton.__version__


def test_tuning_runs_on_scratch_once_per_key_and_live_launches_once(monkeypatch):
    """The launch policy on a GPU, with recording stand-ins for the kernel and the autotuner.

    Tuning (which runs a kernel many times) must only ever see the scratch
    arguments; the live arguments must be launched exactly once per call,
    with the config the tuning chose, and a second call must not tune again.
    """
    import triton

    from triton_ema.kernels import launch

    calls = []

    class Recorder:
        def __init__(self, name):
            self.name = name
            self.best_config = triton.Config({"BLOCK": 4096, "ENTRIES_PER_PROGRAM": 4}, num_warps=8)

        def __getitem__(self, grid):
            return lambda **kw: calls.append((self.name, grid({**kw, **self.best_config.all_kwargs()}), kw))

    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(triton, "autotune", lambda **_: lambda kernel: Recorder("autotuner"))
    table_kernel = launch.TableKernel(Recorder("kernel"), key=["SIZE_BUCKET"])
    scratch_calls = []

    def scratch():
        scratch_calls.append(1)
        return 3, {"n_entries": 3, "SIZE_BUCKET": 4096, "which": "scratch"}

    for _ in range(2):
        table_kernel(scratch, n_entries=10, SIZE_BUCKET=4096, which="live")
    assert len(scratch_calls) == 1
    assert [(name, kw["which"]) for name, _, kw in calls] == [
        ("autotuner", "scratch"),
        ("kernel", "live"),
        ("kernel", "live"),
    ]
    live = calls[1]
    assert live[1] == (3,), "grid: 10 entries at 4 per program"
    assert live[2]["BLOCK"] == 4096 and live[2]["num_warps"] == 8
