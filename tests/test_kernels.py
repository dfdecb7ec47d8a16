"""Every kernel against the float64 reference: through Triton's interpreter on CPU, for real on CUDA."""

from __future__ import annotations

import pytest
import torch
from bits import assert_same_bits, int_view, sprinkle_, torch_lerp_fused
from reference64 import decay64, poison_, tol

from triton_ema import reference
from triton_ema.kernels import interpreting, launch
from triton_ema.kernels.ema_update import _nonfinite, _update, ema_update, nonfinite_
from triton_ema.kernels.launch import CONFIGS, INTERPRET_CONFIG
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
    nonfinite_(build_table(params), torch.zeros(1, dtype=torch.int32))
    assert _update.autotuners == {} and _update.chosen == {}
    assert _nonfinite.autotuners == {} and _nonfinite.chosen == {}


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

    calls = []

    class Recorder:
        def __init__(self, name):
            self.name = name
            self.best_config = triton.Config({"BLOCK": 4096, "ENTRIES_PER_PROGRAM": 4}, num_warps=8)

        def __getitem__(self, grid):
            return lambda **kw: calls.append((self.name, grid({**kw, **self.best_config.all_kwargs()}), kw))

    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(triton, "autotune", lambda **_: lambda kernel: Recorder("autotuner"))
    table_kernel = launch.TableKernel(Recorder("kernel"), key=["SIZE_BUCKET"], configs=lambda kw: launch.CONFIGS_32)
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


def test_cached_launch_binds_once_per_table_and_key_then_replays(monkeypatch):
    """On a GPU the per-step launch replays arguments bound on the first call (no argument building);
    a new table, step tensor or schedule binds afresh, and tuning still runs once per tuning key."""
    import triton

    calls, made = [], []

    class Recorder:
        def __init__(self, name):
            self.name = name
            self.best_config = triton.Config({"BLOCK": 1024, "ENTRIES_PER_PROGRAM": 2}, num_warps=4)

        def __getitem__(self, grid):
            return lambda **kw: calls.append((self.name, grid({**kw, **self.best_config.all_kwargs()}), kw["which"]))

    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(triton, "autotune", lambda **_: lambda kernel: Recorder("autotuner"))
    table_kernel = launch.TableKernel(Recorder("kernel"), key=["SIZE_BUCKET"], configs=lambda kw: launch.CONFIGS_32)

    class Table:
        pass

    def make(which, n=10):
        def build():
            made.append(which)
            scratch = lambda: (3, {"n_entries": 3, "SIZE_BUCKET": 4096, "which": "scratch"})  # noqa: E731
            return scratch, {"n_entries": n, "SIZE_BUCKET": 4096, "which": which}

        return build

    t1, t2, step = Table(), Table(), torch.zeros(1)
    for _ in range(3):
        table_kernel.cached(t1, (step, "schedule-a"), make("t1-a"))
    table_kernel.cached(t1, (step, "schedule-b"), make("t1-b"))
    table_kernel.cached(t2, (step, "schedule-a"), make("t2-a", n=4))
    table_kernel.cached(t2, (torch.zeros(1), "schedule-a"), make("t2-other-step", n=4))
    assert made == ["t1-a", "t1-b", "t2-a", "t2-other-step"], "arguments are built once per table and key"
    assert [(name, which) for name, _, which in calls] == [
        ("autotuner", "scratch"),
        ("kernel", "t1-a"),
        ("kernel", "t1-a"),
        ("kernel", "t1-a"),
        ("kernel", "t1-b"),
        ("kernel", "t2-a"),
        ("kernel", "t2-other-step"),
    ]
    assert calls[1][1] == (5,) and calls[5][1] == (2,), "grids: 10 and 4 entries at 2 per program"


NAN, INF = float("nan"), float("inf")
# The interpreter's numpy warns on every NaN or inf it computes with: here that is the data.
NAN_DATA = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning", "ignore:overflow encountered:RuntimeWarning"
)
PAIRS = [
    pytest.param(torch.float32, torch.float32, id="fp32-fp32"),
    pytest.param(torch.bfloat16, torch.float32, id="bf16-fp32"),
    pytest.param(torch.float16, torch.float32, id="fp16-fp32"),
    pytest.param(torch.bfloat16, torch.bfloat16, id="bf16-bf16"),
    pytest.param(torch.float16, torch.float16, id="fp16-fp16"),
]


def weight_schedules():
    return [
        pytest.param(Schedule(decay=0.3), 3, id="w0.7"),
        pytest.param(Schedule(decay=0.9), 3, id="w0.1"),
        # A copy at t = 1, then weights from 9/11 down to 9/21: both sides of lerp's 0.5 switch.
        pytest.param(Schedule(decay=0.97, warmup="litema", update_after_step=1), 12, id="copy-litema"),
    ]


@NAN_DATA
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("param_dtype", "shadow_dtype"), PAIRS)
@pytest.mark.parametrize(("schedule", "steps"), weight_schedules())
def test_update_matches_torch_bitwise(seed, device, param_dtype, shadow_dtype, schedule, steps):
    """The kernel writes the torch path's bits (``reference.ema_update_``), NaN and inf included.

    The power warmup is left out: the kernel evaluates it with fp32 exp2/log2, the host in float64.
    """
    if not torch_lerp_fused(device):
        pytest.skip("torch's CPU lerp without SIMD rounds the product and the sum apart")
    params = make_params(device, param_dtype)
    shadows = shadows_like(params, shadow_dtype)
    sprinkle_(shadows, (-INF, NAN, INF))
    expected = [s.clone() for s in shadows]
    for t in range(1, steps + 1):
        for p in params:
            p.copy_(torch.randn(p.shape))
        sprinkle_(params, (NAN, INF, -INF) if t % 2 else (INF, -INF, NAN))
        for table in build_tables(params, shadows):
            ema_update(table, torch.tensor([t], device=device), schedule, param_dtype, shadow_dtype)
        reference.ema_update_(params, expected, schedule.weight(t))
        assert_same_bits(shadows, expected)


def rounding_cases(device: str) -> torch.Tensor:
    """fp32 values whose rounding to 16 bits is easy to get wrong, then random ones."""
    bits = [
        0x7FFFFFFF,  # the canonical NaN of CUDA's arithmetic: its low bits would carry into the sign
        0xFFFFFFFF,
        0x7F800001,  # a signalling NaN whose payload sits in the low bits only
        0x7FC00000,
        0x7F800000,  # +inf, -inf
        0xFF800000,
        0x7F7FFFFF,  # the largest float: rounds to inf in bf16
        0x3F808000,  # exactly between two bf16 values: ties to even (down), then (up)
        0x3F818000,
        0x3F808001,  # just above a tie
        0x80000000,  # -0.0
        0x00000001,  # the smallest subnormal
    ]
    special = torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in bits], dtype=torch.int32).view(torch.float32)
    return torch.cat([special, torch.randn(4096 + 7) * 100]).to(device)


@NAN_DATA
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_rounding_to_16_bits_matches_torch(device, dtype):
    """Narrowing fp32 is round-to-nearest-even with NaN kept NaN, as torch's conversion does.

    The swap's load of an fp32 shadow into a bf16 parameter, and a copy step into a narrower
    shadow, are where the kernels' ``_round`` meets arbitrary fp32 bits.
    """
    values = rounding_cases(device)
    params = [torch.zeros_like(values, dtype=dtype), torch.zeros(1, dtype=dtype, device=device)]
    shadows = [values.clone(), values[:1].clone()]
    backup_and_load_(params, shadows)
    expected = [torch.zeros_like(p) for p in params]
    reference.backup_and_load_(expected, shadows)
    assert_same_bits(params, expected)

    narrow = [torch.zeros_like(s, dtype=dtype) for s in shadows]
    ema_update(
        build_table(shadows, narrow),
        torch.tensor([1], device=device),
        Schedule(update_after_step=1),
        torch.float32,
        dtype,
    )
    assert_same_bits(narrow, [s.to(dtype) for s in shadows])


def fp32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


def weight_of(schedule: Schedule, t: int, device: str) -> float:
    """The weight the kernel applies at step ``t``: with parameter 1 and shadow 0 the update leaves exactly w."""
    param, shadow = torch.ones(1, device=device), torch.zeros(1, device=device)
    ema_update(build_table([param], [shadow]), torch.tensor([t], device=device), schedule, torch.float32, torch.float32)
    return shadow.item()


EDGE_SCHEDULES = {
    # min_decay > 0 caps every weight below 1, so a copy that the kernel forgets shows as 1 - min_decay.
    "power-after3-min0.1": Schedule(decay=0.999, warmup="power", min_decay=0.1, update_after_step=3),
    "power-gamma3-after2-every2": Schedule(
        decay=0.99, warmup="power", warmup_gamma=3.0, min_decay=0.05, update_after_step=2, update_every=2
    ),
    "litema-after2-min0.2": Schedule(decay=0.999, warmup="litema", min_decay=0.2, update_after_step=2),
    "none-after1-min0.5": Schedule(decay=0.9, min_decay=0.5, update_after_step=1),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", EDGE_SCHEDULES)
def test_schedule_edges_with_min_decay_and_update_after_step(device, name):
    """Copies for ``u <= 0`` and for the power warmup's ``u == 1``, the clamp elsewhere: kernel, host, oracle."""
    schedule = EDGE_SCHEDULES[name]
    oracle = {
        "decay": schedule.decay,
        "warmup": schedule.warmup,
        "gamma": schedule.warmup_gamma,
        "power": schedule.warmup_power,
        "min_decay": schedule.min_decay,
        "after": schedule.update_after_step,
        "every": schedule.update_every,
    }
    copies = []
    for t in range(1, 11):
        d64 = decay64(t, **oracle)
        host = schedule.weight(t)
        kernel = weight_of(schedule, t, device)
        if d64 is None:
            assert host is None and kernel == 0.0, (t, host, kernel)
            continue
        assert host == pytest.approx(1 - d64, rel=1e-12), t
        if d64 == 0.0:
            copies.append(t)
            assert host == 1.0 and kernel == 1.0, (t, host, kernel)
        else:
            assert host <= schedule.max_weight and kernel <= fp32(schedule.max_weight), t
            # Exact but for the power warmup's fp32 exp2/log2.
            assert kernel == pytest.approx(host, rel=1e-6, abs=0), (t, host, kernel)
    # The cases are the point: the copies are exactly the steps the definitions name.
    last_copy = schedule.update_after_step + (1 if schedule.warmup == "power" else 0)
    assert copies == [t for t in range(1, last_copy + 1) if t % schedule.update_every == 0], copies


GUARD_SIZES = [1, ENTRY + 1, 3 * ENTRY + 5, 17]


def guard_params(device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    flat = [torch.randn(n, device=device).to(dtype) for n in GUARD_SIZES]
    # Not 16-byte aligned: a table of its own, so the flag is shared between two launches.
    unaligned = torch.randn(ENTRY + 3, device=device).to(dtype)[1:]
    return [*flat, unaligned]


def nonfinite_flag(params: list[torch.Tensor], flag: torch.Tensor | None = None) -> torch.Tensor:
    if flag is None:
        flag = torch.zeros(1, dtype=torch.int32, device=params[0].device)
    for table in build_tables(params):
        nonfinite_(table, flag)
    return flag


@NAN_DATA
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    ("tensor", "where"),
    [(0, "first"), (1, "first"), (1, "middle"), (1, "last"), (2, "middle"), (4, "last")],
    ids=["n1", "n4097-first", "n4097-middle", "n4097-last", "n12293-middle", "unaligned-last"],
)
def test_nonfinite_flags_nan_and_inf(seed, device, dtype, value, tensor, where):
    params = guard_params(device, dtype)
    assert nonfinite_flag(params).item() == 0
    n = params[tensor].numel()
    params[tensor][{"first": 0, "middle": n // 2, "last": n - 1}[where]] = value
    flag = nonfinite_flag(params)
    assert flag.dtype == torch.int32 and flag.item() == 1


@NAN_DATA
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_ignores_finite_extremes_and_never_lowers_the_flag(device, dtype):
    info = torch.finfo(dtype)
    extremes = torch.tensor([info.max, -info.max, info.tiny, info.tiny / 4, -0.0, 0.0, info.eps], dtype=dtype)
    params = [*guard_params(device, dtype), extremes.to(device)]
    assert nonfinite_flag(params).item() == 0
    # Groups of one device share the flag: a clean group after a bad one must leave it raised.
    bad = [torch.tensor([1.0, NAN], dtype=dtype, device=device)]
    assert nonfinite_flag(params, nonfinite_flag(bad)).item() == 1


def guarded_update(params, shadows, t, schedule, param_dtype, shadow_dtype, flag) -> None:
    for table in build_tables(params, shadows):
        ema_update(table, torch.tensor([t], device=flag.device), schedule, param_dtype, shadow_dtype, skip=flag)


@NAN_DATA
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("param_dtype", "shadow_dtype"), PAIRS)
@pytest.mark.parametrize("t", [1, 4], ids=["copy", "update"])
def test_guarded_update_skipped_leaves_shadows_bitwise(seed, device, param_dtype, shadow_dtype, t):
    params = make_params(device, param_dtype)
    params[4][-1] = NAN
    shadows = shadows_like(params, shadow_dtype)
    before = [int_view(s).clone() for s in shadows]
    flag = nonfinite_flag(params)
    assert flag.item() == 1
    guarded_update(params, shadows, t, Schedule(decay=0.9, update_after_step=2), param_dtype, shadow_dtype, flag)
    for s, b in zip(shadows, before):
        assert torch.equal(int_view(s), b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("param_dtype", "shadow_dtype"), PAIRS)
def test_clean_guarded_update_equals_unguarded(seed, device, param_dtype, shadow_dtype):
    params = make_params(device, param_dtype)
    shadows = shadows_like(params, shadow_dtype)
    before = [s.clone() for s in shadows]
    unguarded = [s.clone() for s in shadows]
    schedule = Schedule(decay=0.9, warmup="litema")
    flag = nonfinite_flag(params)
    assert flag.item() == 0
    for t in (1, 30):
        guarded_update(params, shadows, t, schedule, param_dtype, shadow_dtype, flag)
        for table in build_tables(params, unguarded):
            ema_update(table, torch.tensor([t], device=device), schedule, param_dtype, shadow_dtype)
    assert all(torch.equal(int_view(a), int_view(b)) for a, b in zip(shadows, unguarded))
    assert not any(torch.equal(a, b) for a, b in zip(shadows, before)), "the guarded update ran"


@NAN_DATA
@pytest.mark.parametrize("device", DEVICES)
def test_one_flag_guards_every_group_of_a_device(seed, device):
    """The flag of all groups is computed before any update: a NaN in the bf16 group also holds the fp32 one."""
    groups = [
        (guard_params(device, torch.float32), torch.float32),
        (guard_params(device, torch.bfloat16), torch.bfloat16),
    ]
    groups[1][0][2][ENTRY] = INF
    shadows = [shadows_like(params, torch.float32) for params, _ in groups]
    before = [[s.clone() for s in group] for group in shadows]
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    for params, _ in groups:
        nonfinite_flag(params, flag)
    for (params, dtype), group in zip(groups, shadows):
        guarded_update(params, group, 5, Schedule(decay=0.9), dtype, torch.float32, flag)
    assert all(torch.equal(s, b) for group, old in zip(shadows, before) for s, b in zip(group, old))


def test_every_config_tiles_the_entry():
    for c in CONFIGS:
        assert ENTRY % c.kwargs["BLOCK"] == 0, c


def sweep_params(device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    # Full blocks and tails for BLOCK 1024 and 4096; then one-entry tensors, so that the 25
    # entries of the aligned table leave the last program of every ENTRIES_PER_PROGRAM part-filled.
    flat = [torch.randn(n, device=device).to(dtype) for n in (1, 1023, 1025, ENTRY - 1, ENTRY + 1, 2 * ENTRY + 1000)]
    small = [torch.randn(n, device=device).to(dtype) for n in (3, 64, 5, 1, 33, 7, 2, 9, 100, 11, 13, 4, 8, 16, 31, 6)]
    unaligned = torch.randn(ENTRY + 2, device=device).to(dtype)[1:]
    return [*flat, *small, unaligned]


def assert_matches_torch(device, shadows, expected):
    if torch_lerp_fused(device):
        assert_same_bits(shadows, expected)
    else:
        for s, e in zip(shadows, expected):
            torch.testing.assert_close(s.double(), e.double(), **tol(s.dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("param_dtype", "shadow_dtype"), [PAIRS[0], PAIRS[1], PAIRS[3]])
def test_update_every_config(seed, device, forced_config, param_dtype, shadow_dtype):
    params = sweep_params(device, param_dtype)
    shadows = shadows_like(params, shadow_dtype)
    poison_(shadows)
    expected = [s.clone() for s in shadows]
    schedule = Schedule(decay=0.9, warmup="litema", update_after_step=1)
    # A copy over poisoned shadows (an element no program writes stays NaN), then w = 0.82 and 0.23.
    for t in (1, 2, 31):
        for p in params:
            p.copy_(torch.randn(p.shape))
        for table in build_tables(params, shadows):
            ema_update(table, torch.tensor([t], device=device), schedule, param_dtype, shadow_dtype)
        reference.ema_update_(params, expected, schedule.weight(t))
        assert_matches_torch(device, shadows, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_swaps_every_config(seed, device, forced_config):
    a, b = sweep_params(device, torch.float32), sweep_params(device, torch.float32)
    a0, b0 = [x.clone() for x in a], [x.clone() for x in b]
    for table in build_tables(a, b):
        swap_(table, torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a, b0)) and all(torch.equal(x, y) for x, y in zip(b, a0))

    params, shadows = sweep_params(device, torch.bfloat16), sweep_params(device, torch.float32)
    p0 = [p.clone() for p in params]
    backups, tables = backup_and_load_(params, shadows)
    assert all(torch.equal(p, s.to(torch.bfloat16)) for p, s in zip(params, shadows))
    assert all(torch.equal(b, p) for b, p in zip(backups, p0))
    poison_(params)
    restore_(tables, torch.bfloat16, torch.float32)
    assert all(torch.equal(p, q) for p, q in zip(params, p0))


@NAN_DATA
@pytest.mark.parametrize("device", DEVICES)
def test_guard_every_config(seed, device, forced_config):
    params = sweep_params(device, torch.bfloat16)
    assert nonfinite_flag(params).item() == 0
    # The first element, a tail block, the last one-entry tensor, the unaligned table.
    for tensor, index in ((0, 0), (5, -1), (21, -1), (22, ENTRY - 1)):
        saved = params[tensor][index].item()
        params[tensor][index] = INF
        assert nonfinite_flag(params).item() == 1, (tensor, index)
        params[tensor][index] = saved
    params[4][ENTRY] = NAN
    shadows = shadows_like(params, torch.float32)
    before = [s.clone() for s in shadows]
    guarded_update(params, shadows, 3, Schedule(decay=0.5), torch.bfloat16, torch.float32, nonfinite_flag(params))
    assert all(torch.equal(s, b) for s, b in zip(shadows, before))
