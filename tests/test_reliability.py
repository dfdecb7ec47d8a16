"""What a hostile user does: aliased tensors, faults in the middle of a swap, tensors changed under the
wrapper, copies and pickles, malformed state dicts, hooks, complex parameters."""

from __future__ import annotations

import copy
import io
import pickle
import signal

import pytest
import torch
import torch.optim.optimizer as optimizer_module
from reference64 import Ema64, tol
from torch import nn

from triton_ema import EMAOptimizerWrapper
from triton_ema.kernels import interpreting

BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not interpreting(), reason="CPU Triton needs the interpreter")),
]


class Mixed(nn.Module):
    """fp32 and bf16 parameters, an unaligned bf16 view, a complex parameter and integer/bool buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(4, 5))
        self.b = nn.Parameter(torch.randn(7, dtype=torch.bfloat16))
        flat = torch.randn(1 + 9, dtype=torch.bfloat16)
        self.c = nn.Parameter(flat[1:10].view(3, 3))  # 2-byte offset: its own (unaligned) table
        self.z = nn.Parameter(torch.randn(3, dtype=torch.complex64))
        self.register_buffer("count", torch.tensor(5, dtype=torch.int64))
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.register_buffer("phase", torch.randn(2, dtype=torch.complex128))


def mixed_opt(backend: str, **kwargs) -> tuple[Mixed, EMAOptimizerWrapper]:
    model = Mixed()
    kwargs.setdefault("decay", 0.5)
    opt = EMAOptimizerWrapper(
        torch.optim.SGD(model.parameters(), lr=0.1), backend=backend, buffers=model.buffers(), **kwargs
    )
    return model, opt


def perturb(model: Mixed, opt: EMAOptimizerWrapper, steps: int = 2) -> None:
    """Move parameters and buffers and update the EMA, so that trained and EMA values differ everywhere."""
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model.count.add_(1)
            model.mask.logical_not_()
            model.phase.mul_(1.5)
        opt.update_ema()


def snapshot(model: nn.Module, opt: EMAOptimizerWrapper) -> list[torch.Tensor]:
    tensors = list(model.parameters()) + list(model.buffers())
    for k in range(len(opt.profiles)):
        tensors += opt.ema_params(profile=k) + opt.ema_buffers(profile=k)
    return [t.detach().clone() for t in tensors]


def bits_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    def bits(t: torch.Tensor) -> torch.Tensor:
        t = torch.view_as_real(t) if t.is_complex() else t
        return t.contiguous().reshape(-1).view(torch.uint8) if t.dtype != torch.bool else t

    return len(a) == len(b) and all(torch.equal(bits(x), bits(y)) for x, y in zip(a, b))


class Fault:
    """Raises at the k-th call of the patched operation, before it runs or just after (a late interrupt)."""

    def __init__(self, fn, k: int, after: bool = False, forever: bool = False, exc: type = KeyboardInterrupt):
        self.fn, self.k, self.after, self.forever, self.exc, self.calls = fn, k, after, forever, exc, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        hit = self.calls == self.k or (self.forever and self.calls >= self.k)
        if hit and not self.after:
            raise self.exc(f"fault at call {self.calls}")
        out = self.fn(*args, **kwargs)
        if hit:
            raise self.exc(f"fault after call {self.calls}")
        return out


def patch_ops(monkeypatch, backend: str, make):
    """Patch every primitive a swap is built of with ``make(original)``; returns the patched callables."""
    import triton_ema.exchange as exchange

    patched = [make(torch._foreach_copy_)]
    monkeypatch.setattr(torch, "_foreach_copy_", patched[0])
    if backend == "triton":
        swap = exchange._swap_kernels()
        patched.append(make(swap._launch))
        monkeypatch.setattr(swap, "_launch", patched[-1])
    return patched


class Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def count_ops(monkeypatch, backend: str, action) -> int:
    with monkeypatch.context() as m:
        counters = patch_ops(m, backend, Counter)
        action()
    return sum(c.calls for c in counters)


class SharedFault:
    """One fault position counted over all patched primitives together.

    ``after=True`` raises once the operation has run; ``after="half"`` runs a foreach
    operation on the first half of its lists only, as a foreach op failing part-way does.
    """

    def __init__(self, k: int, after: bool | str, forever: bool = False):
        self.k, self.after, self.forever, self.calls = k, after, forever, 0

    def wrap(self, fn):
        def call(*args, **kwargs):
            self.calls += 1
            hit = self.calls == self.k or (self.forever and self.calls >= self.k)
            if hit and self.after == "half" and isinstance(args[0], (list, tuple)):
                half = len(args[0]) // 2
                if half:
                    fn(args[0][:half], args[1][:half])
                raise KeyboardInterrupt(f"half-way through call {self.calls}")
            if hit and (not self.after or self.after == "half"):  # a kernel launch is all or nothing
                raise KeyboardInterrupt(f"before call {self.calls}")
            out = fn(*args, **kwargs)
            if hit:
                raise KeyboardInterrupt(f"after call {self.calls}")
            return out

        return call


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("after", [False, True, "half"], ids=["before-op", "after-op", "half-op"])
@pytest.mark.parametrize("profile", [None, 1], ids=["one-profile", "profile1-of-2"])
def test_fault_anywhere_in_swap_in_changes_nothing(seed, monkeypatch, backend, after, profile):
    if after is True and backend == "triton":
        pytest.skip("a kernel launch cannot fail after running; late signals are deferred (tested below)")
    model, opt = mixed_opt(backend, **({} if profile is None else {"decay": (0.5, 0.9)}))
    perturb(model, opt)
    profile = profile or 0
    ctx = opt.ema_weights(profile)  # held: a dropped generator context would swap out when collected
    n = count_ops(monkeypatch, backend, ctx.__enter__)
    ctx.__exit__(None, None, None)
    assert n >= 6
    for k in range(1, n + 1):
        before = snapshot(model, opt)
        fault = SharedFault(k, after)
        with monkeypatch.context() as m:
            patch_ops(m, backend, fault.wrap)
            with pytest.raises(KeyboardInterrupt):
                with opt.ema_weights(profile):
                    pytest.fail("the body must not run when swapping in failed")
        assert bits_equal(snapshot(model, opt), before), f"swap in interrupted at op {k} of {n} changed something"
        with opt.ema_weights(profile):  # usable again, and right
            assert bits_equal([p.detach() for p in model.parameters()][:1], [opt.ema_params(profile)[0]])
        assert bits_equal(snapshot(model, opt), before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("after", [False, True], ids=["before-op", "after-op"])
def test_fault_anywhere_in_swap_out_is_rolled_back_and_retried(seed, monkeypatch, backend, after):
    if after and backend == "triton":
        pytest.skip("a kernel launch cannot fail after running; late signals are deferred (tested below)")
    model, opt = mixed_opt(backend)
    perturb(model, opt)
    trained = snapshot(model, opt)
    ctx = opt.ema_weights()
    ctx.__enter__()
    n = count_ops(monkeypatch, backend, lambda: ctx.__exit__(None, None, None))
    assert n >= 6
    for k in range(1, n + 1):
        ctx = opt.ema_weights()
        ctx.__enter__()
        fault = SharedFault(k, after)
        with monkeypatch.context() as m:
            patch_ops(m, backend, fault.wrap)
            with pytest.raises(KeyboardInterrupt):  # the interrupt still reaches the user ...
                ctx.__exit__(None, None, None)
        assert fault.calls > k, "the retry ran"
        # ... after a retry has put the trained weights back
        assert bits_equal(snapshot(model, opt), trained), f"swap out interrupted at op {k} of {n}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("after", [False, "half"], ids=["before-op", "half-op"])
def test_swap_out_that_fails_anywhere_leaves_the_ema_in(seed, monkeypatch, backend, after):
    """The dispatcher's swap out on its own (no retry): a failure rolls it back to fully swapped in."""
    model, opt = mixed_opt(backend)
    perturb(model, opt)
    ctx = opt.ema_weights()
    ctx.__enter__()
    swapped_in = snapshot(model, opt)
    n = count_ops(monkeypatch, backend, opt._dispatch.swap_out)
    opt._dispatch.swap_in()
    for k in range(1, n + 1):
        with monkeypatch.context() as m:
            patch_ops(m, backend, SharedFault(k, after).wrap)
            with pytest.raises(KeyboardInterrupt):
                opt._dispatch.swap_out()
        assert opt._dispatch.swapped and bits_equal(snapshot(model, opt), swapped_in), f"op {k} of {n}"
    ctx.__exit__(None, None, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_exit_leaves_the_ema_in_and_recovers(seed, backend):
    """A parameter replaced inside the body (another shape) makes the exit fail: it touches nothing,
    says how to recover, and the trained weights come back once the parameter is put right."""
    model, opt = mixed_opt(backend)
    perturb(model, opt)
    trained = snapshot(model, opt)
    with opt.ema_weights():
        swapped_in = snapshot(model, opt)
    storage = model.b.data
    with pytest.raises(RuntimeError, match="restore_trained_weights"):
        with opt.ema_weights():
            model.b.data = torch.zeros(3, dtype=torch.bfloat16)
    model.b.data = storage
    assert bits_equal(snapshot(model, opt), swapped_in), "a failed swap out must leave the EMA fully in"
    with pytest.raises(RuntimeError, match="restore_trained_weights"):
        opt.step()
    with pytest.raises(RuntimeError, match="restore_trained_weights"):
        with opt.ema_weights():
            pass
    opt.restore_trained_weights()
    assert bits_equal(snapshot(model, opt), trained)
    with opt.ema_weights():
        assert bits_equal(snapshot(model, opt), swapped_in)


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_sigint_during_swap_is_delivered_after_it(seed, monkeypatch, backend):
    """A Ctrl-C that arrives between two copies of a swap is held until the swap is whole."""
    model, opt = mixed_opt(backend)
    perturb(model, opt)
    trained = snapshot(model, opt)
    for k in (1, 3):
        fired = []

        def interrupt(fn, fired=fired, k=k):
            def call(*args, **kwargs):
                out = fn(*args, **kwargs)
                if len(fired) < 1 and call.n == k:
                    fired.append(True)
                    signal.raise_signal(signal.SIGINT)
                call.n += 1
                return out

            call.n = 1
            return call

        with monkeypatch.context() as m:
            patch_ops(m, backend, interrupt)
            with pytest.raises(KeyboardInterrupt):
                with opt.ema_weights():
                    pytest.fail("the interrupt must arrive before the body")
        assert fired and bits_equal(snapshot(model, opt), trained)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_replaced_shape_on_the_torch_path_is_refused_before_touching_anything(seed):
    model, opt = mixed_opt("torch")
    perturb(model, opt)
    model.a.data = torch.randn(1, 5)  # broadcastable to the old (4, 5): foreach ops would broadcast silently
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"parameter 0 changed after it was wrapped.*\(4, 5\).*\(1, 5\)"):
        with opt.ema_weights():
            pass
    with pytest.raises(RuntimeError, match="changed after it was wrapped"):
        opt.update_ema()
    assert bits_equal(snapshot(model, opt), before) and opt.num_steps == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change", ["to-bf16", "half", "view-dtype", "transpose", "shape"])
def test_changed_parameter_is_detected_on_update_and_swap(seed, backend, change):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    opt = EMAOptimizerWrapper(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.5, backend=backend)
    opt.update_ema()
    shadows = [s.clone() for s in opt.ema_params()]
    w = model[0].weight
    if change == "to-bf16":
        model.to(torch.bfloat16)
    elif change == "half":
        model.half()
    elif change == "view-dtype":
        w.data = w.data.view(torch.float16)  # same memory, reinterpreted
    elif change == "transpose":
        w.data = w.data.t()  # same memory, other layout
    else:
        w.data = w.data[:2]  # same address, fewer elements
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="changed after it was wrapped"):
        opt.update_ema()
    with pytest.raises(RuntimeError, match="changed after it was wrapped"):
        with opt.ema_weights():
            pass
    assert all(torch.equal(a, b) for a, b in zip(opt.ema_params(), shadows))
    assert bits_equal(list(model.parameters()), params)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alias", ["param-twice", "two-parameters-one-storage", "state-dict-buffers", "buffer-twice"])
def test_aliased_tensors_are_one_entry(seed, backend, alias):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    params, buffers = list(model.parameters()), []
    if alias == "param-twice":
        params = params + params[:1]
    elif alias == "two-parameters-one-storage":
        params.append(nn.Parameter(model[0].weight.data))  # another Parameter over the same memory
    elif alias == "state-dict-buffers":
        buffers = list(model.state_dict().values())  # holds the parameters too
    else:
        buffers = [model[1].running_mean, model[1].running_mean, model[1].num_batches_tracked]
    with pytest.warns(UserWarning) if alias == "param-twice" else _nothing():
        opt = EMAOptimizerWrapper(
            torch.optim.SGD(params, lr=0.1), decay=0.5, warmup=None, backend=backend, buffers=buffers
        )
    ref = Ema64(list(model.parameters()), decay=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 3)).pow(2).mean().backward()
        opt.step()
        ref.step(list(model.parameters()))
    for s, r in zip(opt.ema_params(), ref.shadows):
        torch.testing.assert_close(s.double(), r, **tol(torch.float32))
    trained = [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]
    ema = [s.clone() for s in opt.ema_params()[:4]]
    with opt.ema_weights():
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), ema))
    after = [t.detach() for t in list(model.parameters()) + list(model.buffers())]
    assert all(torch.equal(a, b) for a, b in zip(after, trained)), "the trained weights must come back"


@pytest.mark.parametrize("alias", ["param-twice", "two-parameters-one-storage"])
def test_state_dict_saves_each_parameters_own_shadow_when_aliased(seed, alias):
    """Shadows are looked up by entry: with an alias and tracked buffers, positions and entries differ."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    params = list(model.parameters())
    params.append(params[0] if alias == "param-twice" else nn.Parameter(model[0].weight.data))
    with pytest.warns(UserWarning) if alias == "param-twice" else _nothing():
        opt = EMAOptimizerWrapper(torch.optim.SGD(params, lr=0.1), decay=0.5, buffers=model.buffers())
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 3)).pow(2).mean().backward()
        opt.step()
    sd = opt.state_dict()
    keys = [k for g in sd["param_groups"] for k in g["params"]]
    for position, (key, ema) in enumerate(zip(keys, opt.ema_params(), strict=True)):
        assert torch.equal(sd["state"][key]["ema_shadow"], ema), f"parameter {position} saved another shadow"
    assert all(torch.equal(a, b) for a, b in zip(sd["ema_buffers"], opt.ema_buffers(), strict=True))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_partial_overlap_is_refused_naming_both():
    flat = torch.randn(10)
    a, b = nn.Parameter(flat[0:6]), nn.Parameter(flat[4:10])
    with pytest.raises(ValueError, match=r"parameter 1 and parameter 0 overlap in memory"):
        EMAOptimizerWrapper(torch.optim.SGD([a, b], lr=0.1))
    model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"buffer 0 and parameter 0 overlap"):
        EMAOptimizerWrapper(torch.optim.SGD(model.parameters(), lr=0.1), buffers=[model.weight.data[1:]])
    with pytest.raises(ValueError, match=r"buffer 0 and parameter 0 overlap"):
        EMAOptimizerWrapper(torch.optim.SGD(model.parameters(), lr=0.1), buffers=[model.weight.data.t()])
    one = [nn.Parameter(flat[0:5]), nn.Parameter(flat[4:10])]  # element 4 is in both
    with pytest.raises(ValueError, match=r"parameter 1 and parameter 0 overlap in memory"):
        EMAOptimizerWrapper(torch.optim.SGD(one, lr=0.1))
    named = torch.optim.SGD([{"params": [a, b], "param_names": ["x.a", "x.b"]}], lr=0.1)
    with pytest.raises(ValueError, match=r"'x.b'.*'x.a'"):
        EMAOptimizerWrapper(named)


@pytest.mark.parametrize("backend", BACKENDS)
def test_complex_parameters_are_averaged_swapped_and_saved(seed, backend):
    z = nn.Parameter(torch.randn(5, 3, dtype=torch.complex64))
    opt = EMAOptimizerWrapper(torch.optim.SGD([z], lr=0.1), decay=0.7, warmup="litema", backend=backend)
    ref = Ema64([torch.view_as_real(z.detach())], decay=0.7, warmup="litema")
    for _ in range(4):
        with torch.no_grad():
            z.add_(torch.randn_like(z))
        opt.update_ema()
        ref.step([torch.view_as_real(z.detach())])
    ema = opt.ema_params()[0].clone()
    assert ema.dtype == torch.complex64
    torch.testing.assert_close(torch.view_as_real(ema).double(), ref.shadows[0], **tol(torch.float32))
    trained = z.detach().clone()
    with opt.ema_weights():
        assert torch.equal(z.detach(), ema)
    assert torch.equal(z.detach(), trained)
    sd = copy.deepcopy(opt.state_dict())
    opt2 = EMAOptimizerWrapper(torch.optim.SGD([z], lr=0.1), decay=0.7, backend=backend)
    opt2.load_state_dict(sd)
    assert torch.equal(opt2.ema_params()[0], ema)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_floating_buffers_of_any_dtype_swap(seed, backend):
    model, opt = mixed_opt(backend)
    perturb(model, opt)
    with torch.no_grad():
        model.count.add_(10)  # trained values move past their EMA copies
        model.mask.logical_not_()
    trained = [b.clone() for b in model.buffers()]
    ema = [b.clone() for b in opt.ema_buffers()]
    assert int(ema[0]) == 7 and ema[2].dtype == torch.complex128
    with opt.ema_weights():
        assert bits_equal(list(model.buffers()), ema)
    assert bits_equal(list(model.buffers()), trained)


def test_deepcopy_of_model_and_wrapper_is_independent(seed):
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    opt = EMAOptimizerWrapper(torch.optim.AdamW(model.parameters(), lr=1e-2), decay=0.5, buffers=model.buffers())
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.num_steps == 2 and opt2.param_groups[0]["params"][0] is model2[0].weight
    assert all(torch.equal(a, b) for a, b in zip(opt2.ema_params(), opt.ema_params()))
    x = torch.randn(4, 3)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(opt2.ema_params(), opt.ema_params()))
    opt2.zero_grad()
    model2(x).sum().backward()
    opt2.step()  # only the copy moves
    assert opt.num_steps == 3 and opt2.num_steps == 4
    assert not torch.equal(opt2.ema_params()[0], opt.ema_params()[0])
    with opt2.ema_weights():
        assert torch.equal(model2[0].weight, opt2.ema_params()[0])
        assert not torch.equal(model[0].weight, opt.ema_params()[0])
    with opt.ema_weights(), pytest.raises(RuntimeError, match="inside ema_weights"):
        copy.deepcopy(opt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("via", ["pickle", "torch.save"])
def test_pickled_wrapper_keeps_shadows_and_step(seed, via, backend):
    """On the Triton path the step count lives in a device counter, from which the kernel computes the warmup."""
    model = nn.Linear(3, 2)
    opt = EMAOptimizerWrapper(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.5, warmup="litema", backend=backend)
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(1)
        opt.update_ema()
    if via == "pickle":
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    else:
        buf = io.BytesIO()
        torch.save((model, opt), buf)
        buf.seek(0)
        model2, opt2 = torch.load(buf, weights_only=False)
    assert opt2.num_steps == 3 and opt2.schedule == opt.schedule
    assert all(torch.equal(a, b) for a, b in zip(opt2.ema_params(), opt.ema_params()))
    assert opt2.param_groups[0]["params"][0] is model2.weight
    for _ in range(2):
        with torch.no_grad():
            model.weight.add_(1)
            model2.weight.add_(1)
        opt.update_ema()
        opt2.update_ema()
    assert opt2.num_steps == 5
    assert all(torch.equal(a, b) for a, b in zip(opt2.ema_params(), opt.ema_params()))


def _trained_opt():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = EMAOptimizerWrapper(torch.optim.AdamW(model.parameters(), lr=1e-2), decay=0.9)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 3)).sum().backward()
        opt.step()
    return model, opt


def _corrupt(name: str, sd: dict) -> dict:
    sd = copy.deepcopy(sd)
    first = sd["param_groups"][0]["params"][0]
    if name == "tuple-shadows-v1":
        ema = {
            "format_version": 1,
            "step": 2,
            "schedule": sd["param_groups"][0]["ema"]["schedule"],
            "shadows": tuple(sd["state"][k]["ema_shadow"] for k in sd["param_groups"][0]["params"]),
            "buffer_shadows": [],
            "other_buffer_shadows": [],
        }
        return {
            "state": {},
            "param_groups": [{k: v for k, v in g.items() if k != "ema"} for g in sd["param_groups"]],
            "ema": ema,
        }
    if name == "meta-shadow":
        sd["state"][first]["ema_shadow"] = torch.empty_like(sd["state"][first]["ema_shadow"], device="meta")
    elif name == "int-shadow":
        sd["state"][first]["ema_shadow"] = sd["state"][first]["ema_shadow"].to(torch.int32)
    elif name == "complex-shadow":
        sd["state"][first]["ema_shadow"] = sd["state"][first]["ema_shadow"].to(torch.complex64)
    elif name == "group-not-a-dict":
        sd["param_groups"][0] = [1, 2]
    elif name == "group-without-params":
        del sd["param_groups"][0]["params"]
    elif name == "no-state":
        del sd["state"]
    elif name == "negative-step":
        for g in sd["param_groups"]:
            g["ema"]["step"] = -1
    elif name == "bad-schedule":
        for g in sd["param_groups"]:
            g["ema"]["schedule"]["decay"] = 1.5
    elif name == "bad-profiles":
        for g in sd["param_groups"]:
            g["ema"]["profiles"][0]["decay"] = 1.5
    elif name == "extra-profile":
        for g in sd["param_groups"]:
            g["ema"]["profiles"] = g["ema"]["profiles"] * 2
    elif name == "missing-shadow":
        del sd["state"][first]["ema_shadow"]
    elif name == "not-a-mapping":
        return [sd]
    return sd


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("tuple-shadows-v1", "shadows must be a list"),
        ("meta-shadow", "meta device"),
        ("int-shadow", "must be floating"),
        ("complex-shadow", "must be floating"),
        ("group-not-a-dict", "parameter group 0 in the state dict is not a dict"),
        ("group-without-params", "parameter group 0 in the state dict is not a dict with a 'params' list"),
        ("no-state", "no 'state' mapping"),
        ("negative-step", "step must be a non-negative int"),
        ("bad-schedule", "schedule in the state dict is invalid"),
        ("bad-profiles", "schedule in the state dict is invalid"),
        ("extra-profile", "no 'ema_shadow_1'"),
        ("missing-shadow", "no 'ema_shadow' for parameter 0"),
        ("not-a-mapping", "must be a mapping"),
    ],
)
def test_bad_state_dict_is_refused_and_changes_nothing(seed, name, match):
    model, opt = _trained_opt()
    good = opt.state_dict()
    other_model, other = _trained_opt()
    for _ in range(2):
        other.zero_grad()
        other_model(torch.randn(5, 3)).sum().backward()
        other.step()
    inner_before = copy.deepcopy(opt.optimizer.state_dict())
    ema_before = [s.clone() for s in opt.ema_params()]
    bad = _corrupt(name, other.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    assert opt.num_steps == 2
    assert all(torch.equal(a, b) for a, b in zip(opt.ema_params(), ema_before))
    after = opt.optimizer.state_dict()
    assert after["param_groups"] == inner_before["param_groups"]
    for k, v in inner_before["state"].items():
        assert all(torch.equal(v[n], after["state"][k][n]) for n in v)
    opt.load_state_dict(good)  # a good one still loads


def test_format_1_state_dict_still_loads(seed):
    model, opt = _trained_opt()
    sd = opt.state_dict()
    keys = sd["param_groups"][0]["params"]
    v1 = {
        "state": {k: {n: v for n, v in e.items() if n != "ema_shadow"} for k, e in sd["state"].items()},
        "param_groups": [{k: v for k, v in g.items() if k != "ema"} for g in sd["param_groups"]],
        "ema": {
            "format_version": 1,
            "step": 2,
            "schedule": sd["param_groups"][0]["ema"]["schedule"],
            "shadows": [sd["state"][k]["ema_shadow"].clone() for k in keys],
            "buffer_shadows": [],
            "other_buffer_shadows": [],
        },
    }
    _, fresh = _trained_opt()
    fresh.load_state_dict(v1)
    assert fresh.num_steps == 2 and all(torch.equal(a, b) for a, b in zip(fresh.ema_params(), opt.ema_params()))


def test_load_follows_the_saved_keys_like_torch(seed):
    """Keys may be names (as torch.distributed.checkpoint writes them); positions decide, as in torch."""
    model, opt = _trained_opt()
    sd = opt.state_dict()
    names = [n for n, _ in model.named_parameters()]
    rename = dict(zip(sd["param_groups"][0]["params"], names))
    sd["state"] = {rename[k]: v for k, v in sd["state"].items()}
    sd["param_groups"][0]["params"] = names
    _, fresh = _trained_opt()
    fresh.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(fresh.ema_params(), opt.ema_params()))
    assert fresh.optimizer.state_dict()["state"][0]["exp_avg"].equal(opt.optimizer.state_dict()["state"][0]["exp_avg"])


def test_load_keeps_bf16_shadows_in_fp32(seed):
    p = nn.Parameter(torch.randn(10, dtype=torch.bfloat16))
    opt = EMAOptimizerWrapper(torch.optim.Adam([p], lr=0.1), decay=0.9)
    opt.zero_grad()
    p.sum().backward()
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    assert set(opt.optimizer.state[p]) == {"step", "exp_avg", "exp_avg_sq"}, "state_dict() must not write inner state"
    opt2 = EMAOptimizerWrapper(torch.optim.Adam([p], lr=0.1), decay=0.9)
    opt2.load_state_dict(sd)
    assert opt2.ema_params()[0].dtype == torch.float32 and torch.equal(opt2.ema_params()[0], opt.ema_params()[0])
    assert opt2.optimizer.state[p]["exp_avg"].dtype == torch.bfloat16 and "ema_shadow" not in opt2.optimizer.state[p]


def test_add_param_group_is_atomic():
    a = nn.Parameter(torch.randn(3))
    opt = EMAOptimizerWrapper(torch.optim.SGD([a], lr=0.1), decay=0.5)
    with pytest.raises(ValueError, match="floating-point"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2)), torch.zeros(2, dtype=torch.int64)]})
    assert len(opt.param_groups) == 1 and len(opt.optimizer.param_groups) == 1 and len(opt.ema_params()) == 1
    flat = a.data
    with pytest.raises(ValueError, match="overlap"):
        opt.add_param_group({"params": [nn.Parameter(flat[1:])]})
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        opt.add_param_group({"params": [a]})  # the inner optimizer refuses it: nothing tracked either
    b = nn.Parameter(torch.randn(4))
    opt.add_param_group({"params": b, "lr": 0.2})
    assert len(opt.ema_params()) == 2 and torch.equal(opt.ema_params()[1], b.detach())
    assert opt.param_groups[1]["lr"] == 0.2


def test_hooks_registered_on_the_wrapper_run_once(seed):
    model = nn.Linear(3, 2)
    opt = EMAOptimizerWrapper(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.5)
    calls: list[str] = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd-post") or {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(
        lambda o, sd: calls.append("load-pre") or {k: v for k, v in sd.items() if k != "extra"}
    )
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    opt.register_step_pre_hook(lambda o, a, k: calls.append("step-pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("step-post"))
    handles = [
        optimizer_module.register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global-pre")),
        optimizer_module.register_optimizer_step_post_hook(lambda o, a, k: calls.append("global-post")),
    ]
    try:
        model(torch.randn(2, 3)).sum().backward()
        opt.step()
        sd = opt.state_dict()
        assert sd["extra"] == 1
        opt.load_state_dict(sd)
    finally:
        for h in handles:
            h.remove()
    assert calls == ["step-pre", "global-pre", "global-post", "step-post", "sd-pre", "sd-post", "load-pre", "load-post"]
    with torch.profiler.profile() as prof:
        opt.step()
    steps = [e.name for e in prof.events() if e.name.startswith("Optimizer.step#")]
    assert steps == ["Optimizer.step#SGD.step"]


def test_ema_device_cpu_0_with_cpu_parameters_is_plain(seed):
    model = nn.Linear(3, 2)
    opt = EMAOptimizerWrapper(torch.optim.SGD(model.parameters(), lr=0.1), decay=0.5, ema_device="cpu:0")
    assert all(key[-1] != "offload" for key in opt._dispatch.groups)
    opt.update_ema()
    assert all(s.device == torch.device("cpu") for s in opt.ema_params())


def test_dcp_helpers_carry_the_ema_and_do_not_count_their_init_step(seed):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = EMAOptimizerWrapper(torch.optim.Adam(model.parameters(), lr=1e-2), decay=0.8, warmup="litema")
    sd = get_optimizer_state_dict(model, opt)  # fresh: the helper steps once to create Adam's state
    assert opt.num_steps == 0 and all(torch.equal(p, s) for p, s in zip(model.parameters(), opt.ema_params()))
    assert set(sd["state"]) == {n for n, _ in model.named_parameters()}
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 3)).sum().backward()
        opt.step()
    sd = copy.deepcopy(get_optimizer_state_dict(model, opt))
    assert all("ema_shadow" in e for e in sd["state"].values()) and sd["param_groups"][0]["ema"]["step"] == 3

    model2 = copy.deepcopy(model)
    opt2 = EMAOptimizerWrapper(torch.optim.Adam(model2.parameters(), lr=1e-2), decay=0.5)
    set_optimizer_state_dict(model2, opt2, sd)
    assert opt2.num_steps == 3 and opt2.schedule == opt.schedule
    assert all(torch.equal(a, b) for a, b in zip(opt2.ema_params(), opt.ema_params()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_skip_nonfinite_leaves_every_shadow_alone_and_counts(seed, backend, bad):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).to(torch.bfloat16)
    extra = nn.Parameter(torch.randn(5))
    params = list(model.parameters()) + [extra]
    opt = EMAOptimizerWrapper(
        torch.optim.SGD(params, lr=0.1), decay=0.5, warmup="litema", backend=backend, skip_nonfinite=True
    )
    plain = EMAOptimizerWrapper(torch.optim.SGD(params, lr=0.1), decay=0.5, warmup="litema", backend=backend)
    for _ in range(2):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        opt.update_ema()
        plain.update_ema()
    assert all(torch.equal(a, b) for a, b in zip(opt.ema_params(), plain.ema_params())), "clean updates are equal"
    before = [s.clone() for s in opt.ema_params()]
    with torch.no_grad():
        model[1].weight[1, 2] = bad  # one element of a bf16 parameter poisons the whole update
    opt.update_ema()
    assert opt.skipped_updates == 1 and opt.num_steps == 3
    assert bits_equal(opt.ema_params(), before), "a skipped update leaves every shadow bit-exactly alone"
    with torch.no_grad():
        model[1].weight[1, 2] = 0.0
    opt.update_ema()
    assert opt.skipped_updates == 1 and all(s.isfinite().all() for s in opt.ema_params())
    sd = copy.deepcopy(opt.state_dict())
    assert sd["param_groups"][0]["ema"]["skipped_updates"] == 1
    again = EMAOptimizerWrapper(torch.optim.SGD(params, lr=0.1), decay=0.5, backend=backend, skip_nonfinite=True)
    again.load_state_dict(sd)
    assert again.skipped_updates == 1 and again.num_steps == 4


def test_without_the_guard_a_nan_poisons_the_shadow_for_good(seed):
    p = nn.Parameter(torch.randn(4))
    opt = EMAOptimizerWrapper(torch.optim.SGD([p], lr=0.1), decay=0.9)
    with torch.no_grad():
        p[0] = float("nan")
    opt.update_ema()
    with torch.no_grad():
        p[0] = 1.0
    for _ in range(1000):
        opt.update_ema()
    assert opt.ema_params()[0][0].isnan() and opt.skipped_updates == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_counter_counts_only_steps_that_update(seed, backend):
    p = nn.Parameter(torch.randn(6))
    opt = EMAOptimizerWrapper(
        torch.optim.SGD([p], lr=0.1), decay=0.5, update_every=2, backend=backend, skip_nonfinite=True
    )
    with torch.no_grad():
        p[3] = float("nan")
    for _ in range(5):
        opt.update_ema()
    assert opt.skipped_updates == 2 and opt.num_steps == 5  # steps 2 and 4 update; 1, 3, 5 do not


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_nonfinite_never_scans_integer_buffers(seed, monkeypatch, backend):
    """Copies of integer buffers are not averaged, so the guard leaves them out; it scans the rest."""
    from triton_ema import reference
    from triton_ema.kernels import ema_update

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    # An int32 buffer whose bits read as a float32 NaN: a scan that took it for floats would skip every update.
    nan_bits = torch.tensor([0x7FC00000], dtype=torch.int32)
    buffers = [*model.buffers(), nan_bits]
    opt = EMAOptimizerWrapper(
        torch.optim.SGD(model.parameters(), lr=0.1), decay=0.5, backend=backend, buffers=buffers, skip_nonfinite=True
    )
    scanned = []

    def spy(fn, tensors):
        def call(what, flag):
            scanned.extend(tensors(what))
            return fn(what, flag)

        return call

    monkeypatch.setattr(reference, "nonfinite_", spy(reference.nonfinite_, list))
    monkeypatch.setattr(ema_update, "nonfinite_", spy(ema_update.nonfinite_, lambda table: table.tensors[0]))
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 3)).pow(2).mean().backward()
        opt.step()
    assert opt.skipped_updates == 0 and int(opt.ema_buffers()[2]) == 2
    integers = [t.dtype for t in scanned if not t.is_floating_point()]
    assert scanned and not integers, f"the guard scanned {integers}"
    # Not even reinterpreted as floats.
    assert not any(t.data_ptr() in (b.data_ptr() for b in buffers[2:]) for t in scanned)


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("weight", [0.3, 0.7, 1.0])
def test_device_side_guarded_update_equals_the_plain_one(seed, param_dtype, weight):
    """The CUDA torch path decides on the device (torch.where); checked here on CPU tensors."""
    from triton_ema import reference

    params = [torch.randn(n, dtype=param_dtype) for n in (1, 300, 17)]
    params.append(torch.randn(2, 3, 4, 5, dtype=param_dtype).contiguous(memory_format=torch.channels_last))
    shadows = [torch.empty_like(p, dtype=torch.float32).copy_(torch.randn(p.shape)) for p in params]
    shadows[1][0] = -0.0
    shadows[2][3] = float("nan")
    expected = [s.clone() for s in shadows]
    reference.ema_update_(params, expected, weight)
    clean, skipped = [s.clone() for s in shadows], [s.clone() for s in shadows]
    reference.guarded_update_(params, clean, weight, torch.zeros(1, dtype=torch.int32), max_elements=64)
    reference.guarded_update_(params, skipped, weight, torch.ones(1, dtype=torch.int32), max_elements=64)
    assert bits_equal(clean, expected) and bits_equal(skipped, shadows)
