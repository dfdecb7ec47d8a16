"""Crash safety of the wrapper's snapshots: a training process SIGKILLed while its snapshots are being written
leaves a directory whose index lists only complete files, and that ``posthoc.reconstruct`` reads.

The child trains a model of a few million parameters with ``sigma_rel=(0.05, 0.1)`` and ``snapshot_every=1``,
so the writer thread is busy nearly all the time; this process kills it once some snapshots are listed and a
file is being written (a temporary file, a finished file that the index does not list yet, or a listed file not
there yet, as a writer that lists before it writes would show). The snapshot module's own kill test
(tests/test_posthoc.py) drives the writer directly; this one goes through the wrapper.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from triton_ema import posthoc
from triton_ema.snapshot import FORMAT, read_index

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")

REPO = Path(__file__).resolve().parents[1]
LISTED_BEFORE_KILL = 6  # three steps of both profiles: enough for a reconstruction
TIMEOUT_S = 90
SHAPES = {"0.weight": [1536, 1024], "0.bias": [1536], "2.weight": [1024, 1536], "2.bias": [1024]}

# 3.2M parameters: 12.6 MB per file, two files per step, so writing takes longer than the step that feeds it.
# The step count is bounded so that a child left alone still ends; the test fails if it gets that far.
TRAIN = """
import sys, torch
from triton_ema import EMAOptimizerWrapper

torch.set_num_threads(1)  # leave a core to the test that watches the directory
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(1024, 1536), torch.nn.Tanh(), torch.nn.Linear(1536, 1024))
opt = EMAOptimizerWrapper(
    torch.optim.SGD(model.named_parameters(), lr=1e-2),
    sigma_rel=(0.05, 0.1),
    snapshot_every=1,
    snapshot_dir=sys.argv[1],
)
x = torch.randn(4, 1024)
for _ in range(2000):
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
"""


def unfinished(directory: Path) -> list[str]:
    """Signs of a snapshot write under way: temporary files, finished files the index does not list yet (both
    fine after a crash), and files the index lists that are not there (never fine)."""
    names = os.listdir(directory) if directory.is_dir() else []
    listed = [e["file"] for e in read_index(directory).get(0, [])] if "index-r0.jsonl" in names else []
    found = [n for n in names if n.startswith(".ema-") and ".safetensors.tmp-" in n]
    found += [n for n in names if n.startswith("ema-") and n.endswith(".safetensors") and n not in listed]
    return found + [n for n in listed if n not in names]


def kill_mid_snapshot(directory: Path) -> tuple[list[str], int]:
    """Run the training child until it is writing a snapshot with LISTED_BEFORE_KILL listed; SIGKILL it there.

    Returns what :func:`unfinished` saw and how many entries the index listed when the signal went out. A writer
    that shows no write under way is killed a second after LISTED_BEFORE_KILL are listed, at whatever it is
    doing then (and nothing was seen).
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", TRAIN, str(directory)], cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        enough_since = None
        while time.monotonic() < deadline and proc.poll() is None:
            listed = len(read_index(directory).get(0, []))
            busy = unfinished(directory)
            if listed >= LISTED_BEFORE_KILL:
                enough_since = enough_since or time.monotonic()
                if busy or time.monotonic() > enough_since + 1.0:
                    os.kill(proc.pid, signal.SIGKILL)
                    return busy, listed
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    pytest.fail(
        f"the training child (exit code {proc.returncode}) was never seen writing a snapshot with "
        f"{LISTED_BEFORE_KILL} listed within {TIMEOUT_S} s"
    )


def test_killed_mid_snapshot_leaves_an_index_of_complete_files(tmp_path: Path) -> None:
    # The signal goes out within a millisecond or so of seeing a write under way, while a file takes some 30 ms
    # to write: it nearly always lands mid-write. Should that write have finished first, the kill tested nothing
    # half done, so try again.
    for attempt in range(3):
        directory = tmp_path / f"ema-{attempt}"
        busy, listed = kill_mid_snapshot(directory)
        if not busy or unfinished(directory):
            break
    else:
        pytest.fail(f"three kills in a row landed between snapshot writes (last seen: {busy})")

    indexes = read_index(directory)
    assert list(indexes) == [0], f"one rank's index, got {sorted(indexes)}"
    entries = indexes[0]
    assert len(entries) >= listed, "entries listed before the kill are still listed"
    for e in entries:
        path = directory / e["file"]
        assert path.is_file(), (
            f"the index lists {e['file']}, which is not in the directory (seen before the kill: {busy})"
        )
        # safe_open checks that the header's offsets fit the file: a truncated file fails here.
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            assert meta["format"] == FORMAT
            assert (int(meta["step"]), int(meta["profile"])) == (e["step"], e["profile"]), e["file"]
            assert set(f.keys()) == set(e["tensors"]), e["file"]
            for n in f.keys():
                x = f.get_tensor(n)
                assert list(x.shape) == e["tensors"][n]["shape"] == SHAPES[n], f"{e['file']}: {n}"
                assert str(x.dtype).removeprefix("torch.") == e["tensors"][n]["dtype"] == "float32"
                assert torch.isfinite(x).all(), f"{e['file']}: {n} holds non-finite values"
    assert {e["profile"] for e in entries} == {0, 1}

    state = posthoc.reconstruct(directory, sigma_rel=0.08)
    assert {n: list(t.shape) for n, t in state.items()} == SHAPES
    assert all(torch.isfinite(t).all() for t in state.values())
