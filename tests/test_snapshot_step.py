"""The snapshot step's copy runs on the writer's copy thread (issue 14): it is fenced, so that nothing writes the
shadows (the next update, ema_weights(), load_state_dict()) or reads them for export until it is done, and a failed
copy is warned about and counted like a failed write, training going on.

The copy is made slow (or failing) by replacing ``HostCopies.fill``, the one CPU copy the copy thread makes.
"""

from __future__ import annotations

import pickle
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from triton_ema import EMAOptimizerWrapper
from triton_ema.snapshot import SnapshotWriter, read_index
from triton_ema.snapshot_copy import HostCopies

SIGMAS = (0.05, 0.10)


@pytest.fixture
def make(monkeypatch):
    """Builds the wrapper; closes it (its copy thread done) before ``monkeypatch`` puts ``fill`` back, even when a
    test fails midway."""
    made = []

    def build(directory: Path) -> tuple[nn.Module, EMAOptimizerWrapper]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4), nn.Linear(4, 2))
        opt = EMAOptimizerWrapper(
            torch.optim.SGD(model.named_parameters(), lr=0.5),
            sigma_rel=SIGMAS,
            snapshot_every=2,
            snapshot_dir=directory,
        )
        made.append(opt)
        return model, opt

    yield build
    for opt in made:
        opt.close()


def step(model: nn.Module, opt: EMAOptimizerWrapper) -> None:
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()


class SlowCopy:
    """``HostCopies.fill`` that sleeps before each copy, so that whatever runs meanwhile could overtake it."""

    def __init__(self, delay: float = 0.02) -> None:
        self.delay, self.done, self.lock = delay, 0, threading.Lock()

    def __call__(self, buf: torch.Tensor, x: torch.Tensor) -> None:
        time.sleep(self.delay)
        buf.copy_(x)
        with self.lock:
            self.done += 1


def shadows(model: nn.Module, opt: EMAOptimizerWrapper) -> list[dict[str, torch.Tensor]]:
    """Each profile's shadows by snapshot name, cloned without going through the fence (a read, like the copy)."""
    names = [n for n, _ in model.named_parameters()]
    return [
        {n: opt._tracked.entries[opt._tracked.param_entry[i]].shadows[k].clone() for i, n in enumerate(names)}
        for k in range(len(SIGMAS))
    ]


def snapshot_files(directory: Path, at: int) -> list[dict[str, torch.Tensor]]:
    entries = sorted((e for e in read_index(directory)[0] if e["step"] == at), key=lambda e: e["profile"])
    assert [e["profile"] for e in entries] == [0, 1]
    return [load_file(directory / e["file"]) for e in entries]


def assert_same(got: list[dict[str, torch.Tensor]], expected: list[dict[str, torch.Tensor]]) -> None:
    for g, e in zip(got, expected, strict=True):
        assert g.keys() == e.keys()
        for name in e:
            torch.testing.assert_close(g[name], e[name], rtol=0, atol=0, msg=f"{name} differs from its step's EMA")


def test_the_next_update_waits_for_the_copy_and_the_file_holds_the_snapshot_steps_values(tmp_path, monkeypatch, make):
    model, opt = make(tmp_path)
    slow = SlowCopy()
    monkeypatch.setattr(HostCopies, "fill", staticmethod(slow))
    step(model, opt)
    step(model, opt)  # a snapshot of both profiles, 6 tensors each, copied on the copy thread
    expected = shadows(model, opt)
    assert slow.done < 12, "the snapshot step returned before its copy was done"
    seen_by_update = []
    update = opt._dispatch.refresh

    def refresh() -> None:  # the update's first look at the tensors, after the fence
        seen_by_update.append(slow.done)
        update()

    monkeypatch.setattr(opt._dispatch, "refresh", refresh)
    step(model, opt)  # writes the shadows: it must wait for the copy
    assert seen_by_update == [12], "the update ran before the snapshot's copy was done"
    opt.flush()
    assert_same(snapshot_files(tmp_path, 2), expected)
    assert opt.snapshot_failures == 0
    opt.close()


@pytest.mark.parametrize("use", ["ema_weights", "load_state_dict", "state_dict", "pickle", "ema_params"])
def test_what_touches_the_shadows_right_after_a_snapshot_step_waits_for_its_copy(tmp_path, monkeypatch, make, use):
    model, opt = make(tmp_path)
    step(model, opt)
    earlier = opt.state_dict()
    slow = SlowCopy()
    monkeypatch.setattr(HostCopies, "fill", staticmethod(slow))
    step(model, opt)
    expected = shadows(model, opt)
    assert slow.done < 12
    if use == "ema_weights":  # swaps the shadows into the parameters in place: it writes them
        with opt.ema_weights():
            assert slow.done == 12
            got = [{n: p.detach().clone() for n, p in model.named_parameters()}]
        assert_same(got, expected[:1])
    elif use == "load_state_dict":  # writes step 1's shadows back
        opt.load_state_dict(earlier)
        assert slow.done == 12
    elif use == "state_dict":
        sd = opt.state_dict()
        assert slow.done == 12
        assert_same([{n: sd["state"][i]["ema_shadow_1"] for i, n in enumerate(expected[1])}], expected[1:])
    elif use == "pickle":
        clone = pickle.loads(pickle.dumps(opt))
        assert slow.done == 12
        assert_same([dict(zip(expected[1], clone.ema_params(1), strict=True))], expected[1:])
    else:
        values = opt.ema_params(0)
        assert slow.done == 12
        assert_same([dict(zip(expected[0], values, strict=True))], expected[:1])
    opt.flush()
    assert_same(snapshot_files(tmp_path, 2), expected)
    opt.close()


def test_a_failed_background_copy_is_warned_and_counted_and_training_goes_on(tmp_path, monkeypatch, make):
    model, opt = make(tmp_path)
    calls = []

    def failing(buf: torch.Tensor, x: torch.Tensor) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("copy failed on purpose")
        buf.copy_(x)

    monkeypatch.setattr(HostCopies, "fill", staticmethod(failing))
    step(model, opt)
    with pytest.warns(RuntimeWarning, match=r"snapshot at step 2 was not taken: copying it failed.*on purpose"):
        step(model, opt)  # never raises
        step(model, opt)
        opt.flush()
    assert opt.snapshot_failures == 1
    assert read_index(tmp_path) == {} or read_index(tmp_path)[0] == []
    step(model, opt)  # a snapshot at step 4, written with the lineage and tensor lines the failed one left
    expected = shadows(model, opt)
    opt.flush()
    assert opt.snapshot_failures == 1 and opt.num_steps == 4
    assert [e["step"] for e in read_index(tmp_path)[0]] == [4, 4]
    assert_same(snapshot_files(tmp_path, 4), expected)
    opt.close()


def test_deferred_submit_copies_every_profile_before_any_write_is_queued(tmp_path, monkeypatch):
    events: list[str] = []
    slow = SlowCopy(delay=0.005)
    with SnapshotWriter(tmp_path) as w:
        real_put = w._queue.put

        def fill(buf, x):
            slow(buf, x)
            events.append("copy")

        def put(job, *args, **kwargs):
            events.append("queue")
            return real_put(job, *args, **kwargs)

        monkeypatch.setattr(w._copies, "fill", fill)
        w._queue.put = put
        tensors = {"a": torch.randn(64), "b": torch.randn(8, 8)}
        items = [
            {"step": 2, "t": 2.0, "gamma": g, "sigma_rel": s, "profile": k, "tensors": tensors}
            for k, (g, s) in enumerate(((16.97, 0.05), (6.94, 0.10)))
        ]
        done = w.submit_many(items, defer=True)
        done.result()
        w.flush()
        assert events == ["copy"] * 4 + ["queue"] * 2
    index = read_index(tmp_path)[0]
    assert [e["profile"] for e in index] == [0, 1]
    for e in index:
        got = load_file(tmp_path / e["file"])
        assert torch.equal(got["a"], tensors["a"]) and torch.equal(got["b"], tensors["b"])
