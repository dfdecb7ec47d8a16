"""Post-hoc EMA snapshots through a run's life (issues 14 and 17): nothing on disk is lost on resume, write failures
never stop training, the writer thread ends with the wrapper, runs never mix, the CLI answers errors in one line.

Faults are injected for real: ``OSError(ENOSPC)`` from the file write, ``os.replace`` and ``os.fsync`` inside the
writer thread only.
"""

from __future__ import annotations

import copy
import errno
import gc
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from triton_ema import EMAOptimizerWrapper, posthoc
from triton_ema import snapshot as snapshot_module
from triton_ema.snapshot import SnapshotWriter, read_index
from triton_ema.snapshot_index import read_indexes

REPO = Path(__file__).resolve().parents[1]
SIGMAS = (0.05, 0.10)


def make(directory: Path, seed: int = 0, **kwargs) -> tuple[nn.Module, EMAOptimizerWrapper]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    kwargs = {"sigma_rel": SIGMAS, "snapshot_every": 2, "snapshot_dir": directory, **kwargs}
    return model, EMAOptimizerWrapper(torch.optim.SGD(model.named_parameters(), lr=0.1), **kwargs)


def train(model: nn.Module, opt: EMAOptimizerWrapper, steps: range, salt: int = 0) -> None:
    """Deterministic gradients per step number, so that a resumed run retraces the uninterrupted one."""
    for step in steps:
        g = torch.Generator().manual_seed(1000 * salt + step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def disk(directory: Path) -> dict[str, tuple[str, int]]:
    """Every file's content hash and modification time (a rewrite with the same bytes shows too)."""
    out = {}
    for p in sorted(directory.iterdir()):
        if p.is_file():
            out[p.name] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("triton-ema-snapshots")]


# --- nothing on disk is lost ------------------------------------------------------------------------------------


def test_loading_state_dicts_never_touches_the_files(tmp_path):
    model, opt = make(tmp_path)
    train(model, opt, range(1, 5))
    early = copy.deepcopy(opt.state_dict())
    train(model, opt, range(5, 11))
    opt.flush()
    before = disk(tmp_path)
    opt.load_state_dict(opt.state_dict())  # a round trip at the current step (accelerate's prepare does one)
    opt.flush()
    assert disk(tmp_path) == before
    opt.load_state_dict(early)  # evaluating an earlier checkpoint (Lightning's test(ckpt_path="best"))
    opt.flush()
    assert disk(tmp_path) == before, "loading an earlier checkpoint changed the snapshot directory"
    assert [e["step"] for e in read_index(tmp_path)[0]][::2] == [2, 4, 6, 8, 10]
    opt.close()


def test_a_resumed_run_is_a_lineage_and_reconstructs_like_the_uninterrupted_one(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    model, opt = make(straight)
    train(model, opt, range(1, 13))
    opt.close()
    want = posthoc.reconstruct_many(straight, [0.07, 0.12])

    model, opt = make(resumed)
    train(model, opt, range(1, 7))
    checkpoint = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    train(model, opt, range(7, 11), salt=1)  # an abandoned branch: snapshots at 8 and 10, then a crash
    opt.close()
    abandoned = disk(resumed)

    model, opt = make(resumed, snapshot_resume=True)
    model.load_state_dict(checkpoint[0])
    opt.load_state_dict(checkpoint[1])
    train(model, opt, range(7, 13))
    opt.close()
    for name, (digest, _) in abandoned.items():
        if name.startswith("ema-"):
            assert disk(resumed)[name][0] == digest, f"{name} was rewritten or deleted"
    (index,) = read_indexes(resumed).values()
    assert list(index.lineages) == ["L0", "L6"] and index.lineages["L6"] == {"parent": "L0", "at": 6}
    superseded = sorted(e["file"] for e in index.superseded())
    assert superseded == sorted(f"ema-s{s:09d}-p{k}-r0.safetensors" for s in (8, 10) for k in (0, 1))
    got = posthoc.reconstruct_many(resumed, [0.07, 0.12])
    for g, w in zip(got, want):
        assert g.keys() == w.keys() and all(torch.equal(g[n], w[n]) for n in w)
    assert posthoc.prune(resumed) == superseded
    assert not any((resumed / f).exists() for f in superseded)
    after = posthoc.reconstruct_many(resumed, [0.07, 0.12])
    assert all(torch.equal(a[n], g[n]) for a, g in zip(after, got) for n in g)


def test_cli_prune(tmp_path):
    with SnapshotWriter(tmp_path) as w:
        for step in (1, 2, 3):
            w.submit(step, step, 6.94, 0.1, 0, {"x": torch.ones(2)})
        w.begin_lineage("L0", 1)
        w.submit(2, 2, 6.94, 0.1, 0, {"x": torch.zeros(2)})
    assert posthoc.main([str(tmp_path), "--prune"]) == 0
    assert sorted(p.name for p in tmp_path.glob("ema-*")) == [
        "ema-s000000001-p0-r0.safetensors",
        "ema-s000000002-p0-r0-L1.safetensors",
    ]


# --- write failures ---------------------------------------------------------------------------------------------


def _in_writer() -> bool:
    return threading.current_thread().name.startswith("triton-ema-snapshots")


def _partial_save(real):
    def save_file(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")  # a file begun, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", path)

    return save_file


@pytest.mark.parametrize("where", ["write", "replace", "fsync", "index"])
def test_write_failures_warn_once_and_training_goes_on(tmp_path, monkeypatch, where):
    import safetensors.torch

    failing = threading.Event()
    if where == "write":
        real = safetensors.torch.save_file
        partial = _partial_save(real)
        monkeypatch.setattr(
            safetensors.torch,
            "save_file",
            lambda *a, **k: (partial if failing.is_set() and _in_writer() else real)(*a, **k),
        )
    else:
        name = "write" if where == "index" else where  # os.write is only used to append index lines
        real = getattr(os, name)

        def fault(*args, **kwargs):
            if failing.is_set() and _in_writer():
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*args, **kwargs)

        monkeypatch.setattr(os, name, fault)
    model, opt = make(tmp_path)
    train(model, opt, range(1, 3))
    opt.flush()
    failing.set()
    with pytest.warns(RuntimeWarning, match="ema-s000000004-p0-r0.safetensors") as caught:
        train(model, opt, range(3, 5))  # never raises
        opt.flush()
        state = opt.state_dict()  # never raises either
    failing.clear()
    named = [w for w in caught if "ema-s000000004-p0" in str(w.message)]
    assert len(named) == 1, "one warning per failed file"
    assert opt.snapshot_failures == 2 and "ema" in state["param_groups"][0]
    train(model, opt, range(5, 7))
    opt.close()
    assert [e["step"] for e in read_index(tmp_path)[0]] == [2, 2, 6, 6]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert not [n for n in left if ".tmp-" in n or n.startswith("ema-s000000004")], left
    assert posthoc.reconstruct(tmp_path, 0.08).keys() == dict(model.named_parameters()).keys()


def test_writer_calls_fsync_then_rename_then_index(tmp_path, monkeypatch):
    """The data file is fsynced before it is renamed, and renamed before the index names it."""
    calls: list[tuple[str, str]] = []
    real = {name: getattr(os, name) for name in ("fsync", "replace", "write")}

    def path_of(fd: int) -> str:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))

    def fsync(fd):
        calls.append(("fsync", path_of(fd)))
        return real["fsync"](fd)

    def replace(src, dst):
        calls.append(("replace", os.path.basename(dst)))
        return real["replace"](src, dst)

    def write(fd, data):
        if path_of(fd).startswith("index-"):
            calls.append(("index", data.decode()))
        return real["write"](fd, data)

    for name, fn in (("fsync", fsync), ("replace", replace), ("write", write)):
        monkeypatch.setattr(os, name, fn)
    with SnapshotWriter(tmp_path) as w:
        w.submit(7, 7, 6.94, 0.1, 0, {"x": torch.ones(3)})
    name = "ema-s000000007-p0-r0.safetensors"
    data_fsync = calls.index(("fsync", f".{name}.tmp-{os.getpid()}"))
    renamed = calls.index(("replace", name))
    listed = next(i for i, c in enumerate(calls) if c[0] == "index" and name in c[1])
    assert data_fsync < renamed < listed, calls


# --- the writer thread's life -----------------------------------------------------------------------------------


def test_close_is_idempotent_and_stops_the_writer(tmp_path):
    model, opt = make(tmp_path)
    before = len(writer_threads())
    train(model, opt, range(1, 3))
    assert len(writer_threads()) == before + 1
    opt.close()
    opt.close()
    assert len(writer_threads()) == before
    assert not (tmp_path / ".lock-r0").exists()
    assert len(read_index(tmp_path)[0]) == 2


def test_dropped_wrappers_leave_no_threads(tmp_path):
    gc.collect()
    before = len(writer_threads())
    for i in range(20):
        model, opt = make(tmp_path / str(i))
        train(model, opt, range(1, 3))
        del model, opt
    gc.collect()
    assert len(writer_threads()) == before
    assert all(len(read_index(tmp_path / str(i))[0]) == 2 for i in range(20)), "flushed before stopping"


def test_pending_snapshots_are_written_at_exit(tmp_path):
    code = textwrap.dedent(
        f"""
        import torch
        from triton_ema import EMAOptimizerWrapper
        p = torch.nn.Parameter(torch.zeros(512, 512))
        opt = EMAOptimizerWrapper(torch.optim.SGD([p], lr=0.1), sigma_rel=(0.05, 0.1), snapshot_every=1,
                                  snapshot_dir={str(tmp_path)!r})
        for _ in range(5):
            p.grad = torch.randn_like(p)
            opt.step()
        # no flush, no close
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120, env=env)
    assert [e["step"] for e in read_index(tmp_path)[0]] == [s for s in range(1, 6) for _ in range(2)]


# --- run identity -----------------------------------------------------------------------------------------------


def test_a_fresh_run_is_refused_a_directory_of_another_run(tmp_path):
    model, opt = make(tmp_path)
    train(model, opt, range(1, 5))
    opt.close()
    before = disk(tmp_path)
    run = read_indexes(tmp_path)[0].run
    with pytest.raises(ValueError, match=f"holds the snapshots of run {run}.*snapshot_resume=True"):
        make(tmp_path)
    assert disk(tmp_path) == before


def test_two_live_wrappers_never_write_one_directory(tmp_path):
    model, opt = make(tmp_path)
    with pytest.raises(ValueError, match="another live wrapper"):
        make(tmp_path, snapshot_resume=True)
    opt.close()
    _, other = make(tmp_path, snapshot_resume=True)
    other.close()


def test_a_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (tmp_path / ".lock-r0").write_text(f"{dead.stdout.strip()} {socket.gethostname()}\n")
    _, opt = make(tmp_path)
    opt.close()
    (tmp_path / ".lock-r0").write_text(f"1 {socket.gethostname()}\n")  # pid 1 is alive
    with pytest.raises(ValueError, match="written by another process"):
        make(tmp_path)


def test_the_state_dict_carries_the_run_and_older_state_dicts_load(tmp_path):
    model, opt = make(tmp_path)
    train(model, opt, range(1, 5))
    opt.flush()
    state = opt.state_dict()
    identity = state["param_groups"][0]["ema"]["snapshots"]
    assert identity == {"run": read_indexes(tmp_path)[0].run, "lineage": "L0", "at": None}
    old = copy.deepcopy(state)
    for g in old["param_groups"]:
        del g["ema"]["snapshots"]  # format 2 as written before run ids
    opt.load_state_dict(old)
    opt.close()
    # Another run's state dict is refused by a wrapper that writes its own run, before anything changes.
    model2, other = make(tmp_path / "other")
    train(model2, other, range(1, 3))
    ema = [t.clone() for t in other.ema_params()]
    with pytest.raises(ValueError, match="runs are never mixed"):
        other.load_state_dict(state)
    assert other.num_steps == 2 and all(torch.equal(a, b) for a, b in zip(ema, other.ema_params()))
    other.close()


def test_the_snapshot_directory_is_checked_at_construction(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cannot be created"):
        make(tmp_path / "file" / "snapshots")
    _, opt = make(tmp_path / "new" / "dir")
    assert (tmp_path / "new" / "dir").is_dir()
    opt.close()
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(ValueError, match="not writable"):
            make(ro)


# --- when snapshots are taken -----------------------------------------------------------------------------------


def test_no_snapshot_while_the_ema_time_is_not_positive(tmp_path):
    model, opt = make(tmp_path, snapshot_every=1, update_after_step=5)
    train(model, opt, range(1, 9))  # steps 1..5 have t <= 0: no snapshot, no exception
    opt.close()
    assert opt.snapshot_failures == 0
    assert sorted({e["step"] for e in read_index(tmp_path)[0]}) == [6, 7, 8]
    assert {e["t"] for e in read_index(tmp_path)[0]} == {1.0, 2.0, 3.0}


def test_snapshots_count_updates_from_update_after_step(tmp_path):
    model, opt = make(tmp_path, snapshot_every=3, update_every=2, update_after_step=5)
    train(model, opt, range(1, 24))
    opt.close()
    # Updates at even steps; after step 5 they are 6, 8, 10, ...: every third is a snapshot.
    assert sorted({e["step"] for e in read_index(tmp_path)[0]}) == [10, 16, 22]


def test_only_rank_zero_writes_under_ddp(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    model, opt = make(tmp_path / "rank1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even an attempt that fails
        train(model, opt, range(1, 5))
    opt.close()
    assert opt.snapshot_failures == 0
    assert not (tmp_path / "rank1").exists(), "a rank that does not write creates no files and no index"
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    model, opt = make(tmp_path / "rank0")
    train(model, opt, range(1, 5))
    opt.close()
    assert [e["step"] for e in read_index(tmp_path / "rank0")[0]] == [2, 2, 4, 4]


# --- at scale ---------------------------------------------------------------------------------------------------


def test_a_snapshots_index_cost_does_not_grow(tmp_path, monkeypatch):
    """300 tensors: the tensor list is written once; each snapshot appends one short line."""
    written: list[int] = []
    real_write = os.write

    def write(fd, data):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith("index-"):
            written.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    tensors = {f"layer{i}.weight": torch.full((2,), float(i)) for i in range(300)}
    with SnapshotWriter(tmp_path) as w:
        for step in range(1, 61):
            w.submit(step, step, 6.94, 0.1, 0, tensors)
    assert written[0] > 300 * 30, "the first append holds the header, the lineage and the tensor list"
    assert max(written[1:]) < 400 and max(written[1:]) - min(written[1:]) < 10, written[1:]
    lines = (tmp_path / "index-r0.jsonl").read_text().splitlines()
    assert len(lines) == 3 + 60 and all(json.loads(line)["kind"] == "snapshot" for line in lines[3:])


# --- the command line -------------------------------------------------------------------------------------------


def _cli_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    model, opt = make(run)
    train(model, opt, range(1, 9))
    opt.close()
    return run


@pytest.mark.parametrize("damage", ["missing-file", "truncated-file", "truncated-index", "step-before", "out-file"])
def test_cli_errors_in_one_line(tmp_path, capsys, damage):
    run = _cli_run(tmp_path)
    first = read_index(run)[0][0]["file"]
    args = [str(run), "--sigma-rel", "0.08", "--out", str(tmp_path / "out"), "--no-progress"]
    expect = first
    if damage == "missing-file":
        (run / first).unlink()
    elif damage == "truncated-file":
        data = (run / first).read_bytes()
        (run / first).write_bytes(data[: len(data) // 2])
    elif damage == "truncated-index":
        data = (run / "index-r0.jsonl").read_bytes()
        (run / "index-r0.jsonl").write_bytes(data[:-20])
        expect = "index-r0.jsonl"
    elif damage == "step-before":
        args += ["--step", "1"]
        expect = "step value: 1"
    else:
        (tmp_path / "out").write_text("")
        expect = "is a file"
    capsys.readouterr()
    assert posthoc.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expect in err, err
    assert "Traceback" not in err


def test_snapshot_module_reexports():
    assert snapshot_module.read_index is read_index and callable(posthoc.prune)
    assert load_file  # safetensors files are plain: read without this package


# --- ranks ------------------------------------------------------------------------------------------------------


def _snapshots(steps: range, seed: int = 0) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        (s, k): {"w": torch.randn(4, 6, generator=g), "b": torch.randn(6, generator=g)} for s in steps for k in (0, 1)
    }


def _write(directory: Path, snaps: dict, rank: int = 0, run: str = "ab" * 16, cut=None, lineage=None) -> None:
    """Write ``snaps`` as ``rank``; ``cut(name, tensor) -> (piece, placement)`` shards them."""
    from triton_ema.profiles import sigma_rel_to_gamma

    with SnapshotWriter(directory, rank=rank, run=run) as w:
        if lineage is not None:
            w.begin_lineage(*lineage)
        for (step, k), tensors in sorted(snaps.items()):
            pieces, shards = dict(tensors), {}
            if cut is not None:
                for n, t in tensors.items():
                    pieces[n], shards[n] = cut(n, t)
            w.submit(step, step, sigma_rel_to_gamma(SIGMAS[k]), SIGMAS[k], k, pieces, shards=shards or None)


def _columns(rank: int, world: int):
    """Shard ``w`` along dimension 1 (columns) and ``b`` along 0, unevenly, as FSDP2 with Shard(1) would."""

    def cut(name: str, t: torch.Tensor):
        dim = 1 if name == "w" else 0
        size = -(-t.shape[dim] // world)
        offset = min(rank * size, t.shape[dim])
        length = min(size, t.shape[dim] - offset)
        return t.narrow(dim, offset, length).clone(), {"dim": dim, "offset": offset, "global_shape": list(t.shape)}

    return cut


def test_shards_along_another_dimension_reassemble_exactly(tmp_path):
    snaps = _snapshots(range(10, 70, 10))
    _write(tmp_path / "one", snaps)
    for r in range(3):
        _write(tmp_path / "three", snaps, rank=r, cut=_columns(r, 3))
    want = posthoc.reconstruct(tmp_path / "one", 0.13)
    got = posthoc.reconstruct(tmp_path / "three", 0.13)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_a_resume_on_another_number_of_ranks_reassembles_every_snapshot(tmp_path):
    """Two ranks wrote steps 10..40; the run resumed at 40 on three ranks wrote 50..80: each snapshot is assembled
    from the ranks that wrote it, bit-exact against one process."""
    before, after = _snapshots(range(10, 50, 10)), _snapshots(range(50, 90, 10), seed=1)
    _write(tmp_path / "one", {**before, **after})
    for r in range(2):
        _write(tmp_path / "sharded", before, rank=r, cut=_columns(r, 2))
    for r in range(3):
        _write(tmp_path / "sharded", after, rank=r, cut=_columns(r, 3), lineage=("L0", 40))
    for step in (None, 40, 80):
        want = posthoc.reconstruct(tmp_path / "one", 0.13, step=step)
        got = posthoc.reconstruct(tmp_path / "sharded", 0.13, step=step)
        assert all(torch.equal(got[n], want[n]) for n in want), step


def test_ranks_that_stopped_at_different_steps_are_reconciled(tmp_path):
    snaps = _snapshots(range(10, 70, 10))
    common = {key: t for key, t in snaps.items() if key[0] <= 40}
    _write(tmp_path / "one", common)
    _write(tmp_path / "sharded", snaps, rank=0, cut=_columns(0, 2))
    _write(tmp_path / "sharded", common, rank=1, cut=_columns(1, 2))  # rank 1 stopped after step 40
    want = posthoc.reconstruct(tmp_path / "one", 0.13)
    with pytest.warns(UserWarning, match="miss a rank's piece"):
        got = posthoc.reconstruct(tmp_path / "sharded", 0.13)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_reconstruction_never_mixes_runs(tmp_path):
    snaps = _snapshots(range(10, 40, 10))
    _write(tmp_path, snaps, rank=0, run="a" * 32, cut=_columns(0, 2))
    _write(tmp_path, snaps, rank=1, run="b" * 32, cut=_columns(1, 2))
    with pytest.raises(ValueError, match="several runs"):
        posthoc.reconstruct(tmp_path, 0.13)


def test_version_1_directories_are_still_read(tmp_path):
    """A directory as version 1 wrote it (one JSON document per rank, no run id) reconstructs as before; a wrapper
    is refused it for writing, with nothing changed."""
    model, opt = make(tmp_path)
    train(model, opt, range(1, 9))
    opt.close()
    want = posthoc.reconstruct(tmp_path, 0.08)
    entries = [
        {k: v for k, v in e.items() if k not in ("lineage", "tensor_list", "kind")} for e in read_index(tmp_path)[0]
    ]
    (tmp_path / "index-r0.json").write_text(
        json.dumps({"format": "triton-ema-snapshots", "version": 1, "rank": 0, "entries": entries})
    )
    (tmp_path / "index-r0.jsonl").unlink()
    got = posthoc.reconstruct(tmp_path, 0.08)
    assert all(torch.equal(got[n], want[n]) for n in want)
    before = disk(tmp_path)
    with pytest.raises(ValueError, match="older version"):
        make(tmp_path, snapshot_resume=True)
    assert disk(tmp_path) == before


def test_resuming_without_a_checkpoint_starts_over_and_says_so(tmp_path):
    model, opt = make(tmp_path)
    train(model, opt, range(1, 7))
    opt.close()
    before = disk(tmp_path)
    model, opt = make(tmp_path, snapshot_resume=True)
    with pytest.warns(RuntimeWarning, match="starts over"):
        train(model, opt, range(1, 5))
        opt.close()
    assert all(disk(tmp_path)[name][0] == digest for name, (digest, _) in before.items() if name.startswith("ema-"))
    (index,) = read_indexes(tmp_path).values()
    assert list(index.lineages) == ["L0", "L0.1"] and len(index.superseded()) == 6
    assert {e["lineage"] for e in index.live()} == {"L0.1"}


def test_every_profile_is_copied_before_any_write_is_queued_and_buffers_are_reused(tmp_path):
    events: list[str] = []
    taken: list[list[int]] = [[], []]
    with SnapshotWriter(tmp_path) as w:
        real_take, real_put = w._copies.take, w._queue.put

        def take(*args):
            buf = real_take(*args)
            events.append("copy")
            taken[len(taken[0]) >= 4].append(buf.data_ptr())
            return buf

        def put(job, *args, **kwargs):
            events.append("queue")
            return real_put(job, *args, **kwargs)

        w._copies.take, w._queue.put = take, put
        tensors = {"a": torch.randn(64), "b": torch.randn(8, 8)}
        items = [
            {"step": 2, "t": 2.0, "gamma": g, "sigma_rel": s, "profile": k, "tensors": tensors}
            for k, (g, s) in enumerate(((16.97, 0.05), (6.94, 0.10)))
        ]
        w.submit_many(items)
        assert events == ["copy"] * 4 + ["queue"] * 2
        w.flush()
        w.submit_many([{**item, "step": 4, "t": 4.0} for item in items])
    assert sorted(taken[1]) == sorted(taken[0]), "the second snapshot's copies go into the first one's buffers"
