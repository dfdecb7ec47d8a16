"""Several EMA profiles in one pass, power-function (EDM2) profiles, snapshots and post-hoc reconstruction,
all through the wrapper, on both backends (Triton under the interpreter)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from posthoc64 import gamma64
from reference64 import Ema64, tol
from torch import nn

from triton_ema import EMAOptimizerWrapper, posthoc
from triton_ema.kernels import interpreting
from triton_ema.snapshot import read_index

BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not interpreting(), reason="CPU Triton needs the interpreter")),
]


class Power64:
    """A float64 power-function EMA written from the issue's definition: beta_t = (1 - dt/t) ** (gamma + 1)."""

    def __init__(self, params, sigma_rel: float, after: int = 0, every: int = 1) -> None:
        self.shadows = [p.detach().double().clone() for p in params]
        self.gamma, self.after, self.every, self.t = gamma64(sigma_rel), after, every, 0

    def step(self, params) -> None:
        self.t += 1
        if self.t % self.every:
            return
        u = self.t - self.after
        beta = 0.0 if u <= self.every else (1.0 - self.every / u) ** (self.gamma + 1.0)
        for s, p in zip(self.shadows, params):
            s.mul_(beta).add_(p.detach().double(), alpha=1.0 - beta)


def walk(params, scale: float = 1.0) -> None:
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_several_decays_match_float64_and_separate_wrappers(seed, backend, param_dtype):
    params = [nn.Parameter(torch.randn(n, dtype=param_dtype)) for n in (5, 1025, 3)]
    config = {"warmup": "litema", "update_every": 2, "update_after_step": 1, "backend": backend}
    decays = (0.9, 0.99, 0.7)
    opt = EMAOptimizerWrapper(torch.optim.SGD(params, lr=0.1), decay=decays, **config)
    alone = [EMAOptimizerWrapper(torch.optim.SGD(params, lr=0.1), decay=d, **config) for d in decays]
    refs = [Ema64(params, decay=d, warmup="litema", every=2, after=1) for d in decays]
    for _ in range(7):
        walk(params)
        opt.update_ema()
        for a in alone:
            a.update_ema()
        for r in refs:
            r.step(params)
    for k in range(3):
        for ours, single, r in zip(opt.ema_params(profile=k), alone[k].ema_params(), refs[k].shadows):
            assert ours.dtype == torch.float32
            torch.testing.assert_close(ours.double(), r, **tol(torch.float32))
            assert torch.equal(ours, single), "one pass over K profiles gives each the bits of its own wrapper"


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigma_rel_profiles_match_float64(seed, backend):
    params = [nn.Parameter(torch.randn(n)) for n in (17, 4)]
    opt = EMAOptimizerWrapper(
        torch.optim.SGD(params, lr=0.1), sigma_rel=(0.05, 0.10), update_after_step=3, update_every=2, backend=backend
    )
    refs = [Power64(params, s, after=3, every=2) for s in (0.05, 0.10)]
    for _ in range(25):
        walk(params)
        opt.update_ema()
        for r in refs:
            r.step(params)
    for k, r in enumerate(refs):
        for ours, exact in zip(opt.ema_params(profile=k), r.shadows):
            torch.testing.assert_close(ours.double(), exact, **tol(torch.float32))
    assert not torch.allclose(opt.ema_params(profile=0)[0], opt.ema_params(profile=1)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigma_rel_update_at_u_zero_copies(seed, backend):
    """``update_after_step`` a multiple of ``update_every``: the first update has ``u == 0`` and copies."""
    p = nn.Parameter(torch.randn(5))
    opt = EMAOptimizerWrapper(
        torch.optim.SGD([p], lr=0.1), sigma_rel=(0.05, 0.2), update_after_step=2, update_every=2, backend=backend
    )
    assert opt.profiles.weights(2) == [1.0, 1.0]
    for _ in range(2):  # step 1 makes no update; step 2 has u = 0
        walk([p])
        opt.update_ema()
    for k in (0, 1):
        assert torch.equal(opt.ema_params(profile=k)[0], p.detach()), f"profile {k} did not copy at u == 0"


@pytest.mark.parametrize("backend", BACKENDS)
def test_loading_other_sigma_rel_values_updates_the_device_weights(seed, backend):
    """Both backends follow the loaded profiles, also after launches were bound for the constructor's ones."""
    start = torch.randn(6)
    walks = [torch.randn(6) for _ in range(6)]

    def make(sigma_rel, b):
        p = nn.Parameter(start.clone())
        return p, EMAOptimizerWrapper(torch.optim.SGD([p], lr=0.1), sigma_rel=sigma_rel, backend=b)

    def run(p, opt, steps):
        for x in steps:
            with torch.no_grad():
                p.add_(x)
            opt.update_ema()

    saved_p, saved = make((0.05, 0.10), "torch")
    run(saved_p, saved, walks[:3])
    sd = copy.deepcopy(saved.state_dict())
    p, opt = make((0.15, 0.25), backend)
    run(p, opt, walks[:3])  # binds the weights launch for (0.15, 0.25)
    opt.load_state_dict(sd)
    assert opt.profiles == saved.profiles
    with torch.no_grad():
        p.copy_(saved_p)
    refs = [Power64([p], s) for s in (0.05, 0.10)]
    for k, r in enumerate(refs):
        r.t, r.shadows = 3, [opt.ema_params(profile=k)[0].double()]
    for x in walks[3:]:
        run(p, opt, [x])
        run(saved_p, saved, [x])
        for r in refs:
            r.step([p])
    for k, r in enumerate(refs):
        ours = opt.ema_params(profile=k)[0]
        torch.testing.assert_close(ours.double(), r.shadows[0], **tol(torch.float32))
        torch.testing.assert_close(ours, saved.ema_params(profile=k)[0], **tol(torch.float32))


def measured_sigma_rel(backend: str, sigma_rel: float, every: int, updates: int) -> float:
    """Feed one-hot histories (the parameter is e_j at update j) and read the weight each update got."""
    p = nn.Parameter(torch.zeros(updates))
    opt = EMAOptimizerWrapper(torch.optim.SGD([p], lr=0.1), sigma_rel=sigma_rel, update_every=every, backend=backend)
    for t in range(1, updates * every + 1):
        if t % every == 0:
            with torch.no_grad():
                p.zero_()
                p[t // every - 1] = 1.0
        opt.update_ema()
    w = opt.ema_params()[0].double()
    tau = torch.arange(1, updates + 1, dtype=torch.float64) / updates  # update times over the final time
    total = w.sum()
    mean = (w * tau).sum() / total
    return float(((w * (tau - mean) ** 2).sum() / total).sqrt())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("every", [1, 10, 100])
@pytest.mark.parametrize("sigma_rel", [0.05, 0.10])
def test_tracked_width_is_the_requested_one_whatever_update_every(backend, every, sigma_rel):
    measured = measured_sigma_rel(backend, sigma_rel, every, updates=400)
    assert measured == pytest.approx(sigma_rel, rel=0.01), f"asked {sigma_rel}, tracked {measured:.4f}"


def test_counting_calls_instead_of_time_would_be_caught():
    """The control: a width measured as if each update were one time unit apart is far off (ema-pytorch's bug)."""
    p = nn.Parameter(torch.zeros(400))
    opt = EMAOptimizerWrapper(torch.optim.SGD([p], lr=0.1), sigma_rel=0.05, update_every=10)
    for t in range(1, 4001):
        if t % 10 == 0:
            with torch.no_grad():
                p.zero_()
                p[t // 10 - 1] = 1.0
        opt.update_ema()
    w = opt.ema_params()[0].double()
    assert w.sum() == pytest.approx(1.0, abs=1e-5)  # a proper average of what it saw
    # With calls counted as time, update j would sit at time j*10 but the profile would be computed with dt = 1:
    gamma = gamma64(0.05)
    wrong = torch.zeros(400, dtype=torch.float64)
    shadow_weights = torch.zeros(400, dtype=torch.float64)
    for j in range(1, 401):
        t = 10 * j
        beta = 0.0 if t <= 1 else (1.0 - 1.0 / t) ** (gamma + 1.0)
        shadow_weights *= beta
        shadow_weights[j - 1] += 1.0 - beta
    wrong[:] = shadow_weights
    assert not torch.allclose(w, wrong, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_profile_selects_what_is_swapped_read_and_exported(seed, backend):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(torch.bfloat16)
    model[1].float()  # fp32 and bf16 groups
    opt = EMAOptimizerWrapper(torch.optim.SGD(model.parameters(), lr=0.1), decay=(0.5, 0.9), backend=backend)
    for _ in range(3):
        walk(list(model.parameters()))
        opt.update_ema()
    trained = [p.detach().clone() for p in model.parameters()]
    for k in (0, 1):
        ema = [s.clone() for s in opt.ema_params(profile=k)]
        other = [s.clone() for s in opt.ema_params(profile=1 - k)]
        with opt.ema_weights(profile=k):
            assert all(torch.equal(p, e.to(p.dtype)) for p, e in zip(model.parameters(), ema))
            assert all(torch.equal(a, b) for a, b in zip(opt.ema_params(profile=k), ema))
            assert all(torch.equal(a, b) for a, b in zip(opt.ema_params(profile=1 - k), other))
        assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))
    with pytest.raises(ValueError, match="profile must be an int in"):
        opt.ema_weights(profile=2).__enter__()
    opt.copy_ema_to_params(profile=1)
    assert all(torch.equal(p, e.to(p.dtype)) for p, e in zip(model.parameters(), opt.ema_params(profile=1)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_profile_resumes_bit_exactly(seed, backend):
    torch.manual_seed(1)
    data = [[torch.randn(n) for n in (6, 2)] for _ in range(8)]
    torch.manual_seed(2)
    start = [torch.randn(n) for n in (6, 2)]

    def run(steps, sd=None):
        params = [nn.Parameter(s.clone()) for s in start]
        opt = EMAOptimizerWrapper(torch.optim.Adam(params, lr=0.1), sigma_rel=(0.05, 0.2), backend=backend)
        if sd is not None:
            opt.load_state_dict(sd)
            with torch.no_grad():
                for p, v in zip(params, sd["params"]):
                    p.copy_(v)
        for x in data[opt.num_steps : steps]:
            opt.zero_grad()
            sum((p * xi).sum() for p, xi in zip(params, x)).backward()
            opt.step()
        return params, opt

    ref_params, ref = run(8)
    params, opt = run(4)
    sd = copy.deepcopy({**opt.state_dict(), "params": [p.detach().clone() for p in params]})
    assert {"ema_shadow", "ema_shadow_1"} <= set(sd["state"][0])
    params2, opt2 = run(8, sd)
    for k in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(opt2.ema_params(profile=k), ref.ema_params(profile=k)))
    single = EMAOptimizerWrapper(torch.optim.Adam(params, lr=0.1), sigma_rel=0.05, backend=backend)
    with pytest.raises(ValueError, match="2 EMA profiles, this wrapper tracks 1"):
        single.load_state_dict(sd)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sigma_rel": 0.1, "decay": 0.99}, "not both"),
        ({"sigma_rel": 0.1, "warmup": "litema"}, "not both"),
        ({"sigma_rel": 0.3}, "sigma_rel"),
        ({"sigma_rel": 0.0}, "sigma_rel"),
        ({"decay": ()}, "must not be empty"),
        ({"decay": (0.9,) * 9}, "at most 8"),
        ({"decay": (0.9, 1.5)}, "Invalid decay value: 1.5"),
        ({"sigma_rel": 0.1, "snapshot_every": 10}, "both snapshot_every and snapshot_dir"),
        ({"decay": 0.9, "snapshot_every": 10, "snapshot_dir": "x"}, "needs power-function profiles"),
        ({"sigma_rel": 0.1, "snapshot_every": 0, "snapshot_dir": "x"}, "snapshot_every"),
    ],
)
def test_bad_profile_configuration_is_refused(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        EMAOptimizerWrapper(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_snapshots_name_tensors_and_reconstruct_a_tracked_profile(seed, tmp_path, backend):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = EMAOptimizerWrapper(
        torch.optim.SGD(model.named_parameters(), lr=0.1),
        sigma_rel=(0.05, 0.10),
        snapshot_every=3,
        snapshot_dir=tmp_path,
        backend=backend,
    )
    for _ in range(12):
        walk(list(model.parameters()))
        opt.update_ema()
    opt.flush()
    (entries,) = read_index(tmp_path).values()
    assert [(e["step"], e["profile"]) for e in entries] == [(s, k) for s in (3, 6, 9, 12) for k in (0, 1)]
    assert set(entries[0]["tensors"]) == {n for n, _ in model.named_parameters()}
    assert entries[1]["sigma_rel"] == 0.10 and entries[1]["gamma"] == pytest.approx(gamma64(0.10), rel=1e-9)
    # A target equal to a tracked profile at the last snapshot is that profile's EMA.
    state = posthoc.reconstruct(tmp_path, sigma_rel=0.10)
    for (name, _), ema in zip(model.named_parameters(), opt.ema_params(profile=1)):
        torch.testing.assert_close(state[name], ema, rtol=1e-4, atol=1e-5)


def test_reconstruction_through_the_wrapper_matches_a_tracked_profile(seed, tmp_path):
    """Random walk; sigma_rel 0.15 from (0.05, 0.10) with 32 snapshots vs a directly tracked 0.15 shadow."""
    torch.manual_seed(seed)
    p = nn.Parameter(torch.zeros(64))
    opt = EMAOptimizerWrapper(
        torch.optim.SGD([{"params": [p], "param_names": ["w"]}], lr=0.1),
        sigma_rel=(0.05, 0.10),
        snapshot_every=50,
        snapshot_dir=tmp_path,
    )
    direct = EMAOptimizerWrapper(torch.optim.SGD([p], lr=0.1), sigma_rel=0.15)
    for _ in range(32 * 50):
        walk([p], 0.1)
        opt.update_ema()
        direct.update_ema()
    opt.flush()
    rebuilt = posthoc.reconstruct(tmp_path, sigma_rel=0.15)["w"]
    truth = direct.ema_params()[0]
    rel = float((rebuilt - truth).norm() / truth.norm())
    assert rel < 1e-2, rel


def test_state_dict_flushes_snapshots(tmp_path, monkeypatch):
    p = nn.Parameter(torch.zeros(3))
    opt = EMAOptimizerWrapper(
        torch.optim.SGD([p], lr=0.1), sigma_rel=(0.05, 0.1), snapshot_every=1, snapshot_dir=tmp_path
    )
    flushed = []
    opt.update_ema()
    monkeypatch.setattr(opt._snapshots.writer, "flush", lambda: flushed.append(True))
    opt.state_dict()
    assert flushed == [True]


@pytest.mark.skipif(not interpreting(), reason="the weights kernel on CPU tensors needs the interpreter")
@pytest.mark.parametrize(
    "members",
    [
        ("power", {"update_every": 7}, (0.05, 0.2)),
        ("power", {"update_after_step": 3, "update_every": 10}, (0.05, 0.1, 0.15)),
        ("decay", {"warmup": "litema", "update_after_step": 2, "update_every": 2}, (0.99, 0.999)),
        ("decay", {"warmup": "power", "warmup_gamma": 2.0, "min_decay": 0.3, "update_after_step": 1}, (0.99, 0.9)),
        ("decay", {"min_decay": 0.2}, (0.9, 0.5, 0.999)),
    ],
    ids=["power-every7", "power-after3-every10", "litema", "power-warmup-min", "plain-min"],
)
def test_weights_kernel_equals_the_host_weights(members):
    """The K weights computed on the device from the counter keep float64's precision up to t = 1e9."""
    from triton_ema.kernels.multi import profile_weights_
    from triton_ema.schedules import PowerProfile, ProfileSet, Schedule

    kind, shared, values = members
    make = (lambda v: PowerProfile(v, **shared)) if kind == "power" else (lambda v: Schedule(v, **shared))
    profiles = ProfileSet(tuple(make(v) for v in values))
    out = torch.empty(len(values))
    for t in [*range(1, 40), 999, 7 * 10**6, 7 * 10**8, 10**9]:
        host = profiles.weights(t)
        device = profile_weights_(torch.tensor([t]), profiles, out).double().tolist()
        if host is None:
            assert device == [0.0] * len(values), t
        else:
            for h, d in zip(host, device):
                assert math.isclose(h, d, rel_tol=1e-6), (t, h, d)


def test_copies_and_pickles_keep_every_profile(seed, tmp_path):
    import pickle

    p = nn.Parameter(torch.randn(5))
    opt = EMAOptimizerWrapper(
        torch.optim.SGD([p], lr=0.1), sigma_rel=(0.05, 0.1), snapshot_every=2, snapshot_dir=tmp_path
    )
    for _ in range(3):
        walk([p])
        opt.update_ema()
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert other.profiles == opt.profiles and other.num_steps == 3
        for k in (0, 1):
            assert torch.equal(other.ema_params(profile=k)[0], opt.ema_params(profile=k)[0])
    assert "sigma_rel=(0.05, 0.1)" in repr(opt)


def test_snapshot_names_come_from_the_model_or_positions(tmp_path):
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    named = EMAOptimizerWrapper(
        torch.optim.SGD(model.parameters(), lr=0.1),
        sigma_rel=(0.05, 0.1),
        snapshot_every=1,
        snapshot_dir=tmp_path / "named",
        model=model,
        buffers=model.buffers(),
    )
    anonymous = EMAOptimizerWrapper(
        torch.optim.SGD(model.parameters(), lr=0.1),
        sigma_rel=(0.05, 0.1),
        snapshot_every=1,
        snapshot_dir=tmp_path / "anon",
    )
    for opt in (named, anonymous):
        opt.update_ema()
        opt.flush()
    entry = next(e for e in read_index(tmp_path / "named")[0] if e["profile"] == 0)
    floating = {n for n, b in model.named_buffers() if b.is_floating_point()}
    assert set(entry["tensors"]) == {n for n, _ in model.named_parameters()} | floating
    entry = next(e for e in read_index(tmp_path / "anon")[0] if e["profile"] == 0)
    assert set(entry["tensors"]) == {f"param.{j}" for j in range(4)}
