"""Choose the EMA length after training: post-hoc reconstruction from power-function EMA snapshots (EDM2).

A run that tracked at least two power-function profiles and saved their snapshots (see
:mod:`triton_ema.snapshot` for the directory format) can produce the EMA of any other relative width
``σ_rel`` afterwards, as a least-squares combination of the snapshots:

1. over the snapshots ``i`` taken up to the target time (every profile, every time), ``A_ij = ⟨p_i, p_j⟩`` and
   ``b_i = ⟨p_i, p_target⟩`` (:func:`triton_ema.profiles.profile_inner_product`);
2. ``A x = b`` is solved in float64 and ``x`` normalised to ``Σ x = 1``;
3. the EMA is ``Σ x_i θ_i``, accumulated in fp32 one snapshot file at a time, so peak memory is about one model
   per requested ``σ_rel`` plus one tensor being read.

The target time defaults to the last snapshot's; ``step=`` picks an earlier snapshot step (any other step is
refused, naming the nearest snapshot steps), and then only the snapshots taken up to it are used (later ones hold
weights from after it).

**Ranks.** ``rank=r`` reconstructs rank ``r``'s tensors as stored (its local shards) from its own index. ``rank=None``
returns the one rank's tensors when the directory holds one rank; with several, each snapshot is assembled from the
pieces of the ranks that wrote it, placed where the index's shard placements say (along any dimension; the number of
ranks may change at a resume), and a snapshot missing a rank's piece is left out with a warning. Reconstruction is
elementwise linear, so the result is bit-exact against one process's snapshots. Tensors held whole by several ranks
(no placement) are refused: pass ``rank=``. Only the live snapshots of one run are used (see
:mod:`triton_ema.snapshot` for runs and lineages); :func:`prune` deletes superseded ones.

Example:
    >>> from triton_ema import posthoc                                   # doctest: +SKIP
    >>> state = posthoc.reconstruct("runs/ema", sigma_rel=0.15)         # doctest: +SKIP
    >>> posthoc.load_into(model, "runs/ema", sigma_rel=0.15)             # doctest: +SKIP

Command line (one file per σ_rel, one pass over the snapshots, with a progress bar)::

    python -m triton_ema.posthoc runs/ema --sigma-rel 0.08,0.12,0.15 --out runs/ema-posthoc/
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from triton_ema.profiles import _check_sigma_rel, sigma_rel_to_gamma, solve_coefficients
from triton_ema.snapshot_index import index_name, prune, read_indexes


def _load(directory: str) -> dict[int, list[dict[str, Any]]]:
    if not os.path.isdir(directory):
        raise ValueError(f"{directory!r} is not a directory")
    parsed = read_indexes(directory)
    if not parsed:
        raise ValueError(f"no snapshot index (index-r*.jsonl) in {directory!r}")
    # Reconstruction never mixes runs: every rank's index must belong to the same one.
    runs = {index.run for index in parsed.values() if index.run is not None}
    if len(runs) > 1:
        raise ValueError(f"{directory!r} holds the indexes of several runs ({sorted(runs)}): runs are never mixed")
    return {rank: index.live() for rank, index in parsed.items()}


def _plan(entries: Sequence[dict[str, Any]], step: int | None, where: str) -> tuple[list[dict[str, Any]], int, float]:
    """The entries used, the target step and the target time."""
    if not entries:
        raise ValueError(f"{where} lists no snapshots")
    last = max(entries, key=lambda e: (e["step"], e["t"]))
    if step is None:
        step, target_t = int(last["step"]), float(last["t"])
    else:
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        if step > last["step"]:
            raise ValueError(
                f"Invalid step value: {step}. It is after the last snapshot (step {last['step']}) in {where}; "
                "a reconstruction can only target times the snapshots cover."
            )
        at_step = [e for e in entries if e["step"] == step]
        if not at_step:
            # Between snapshots the weights after the last one before it are unknown: never label a
            # reconstruction with a step it does not represent.
            steps = sorted({int(e["step"]) for e in entries})
            before = [s for s in steps if s < step][-1:]
            after = [s for s in steps if s > step][:1]
            nearest = " and ".join(f"{s}" for s in before + after)
            raise ValueError(
                f"Invalid step value: {step}. It is not a snapshot step in {where}; a reconstruction targets the "
                f"step of a snapshot: the nearest are {nearest} (of {len(steps)} snapshot steps, {steps[0]} to "
                f"{steps[-1]})"
            )
        target_t = float(at_step[0]["t"])
    if not target_t > 0:
        raise ValueError(f"the target step {step} has time t = {target_t} <= 0 (before update_after_step)")
    # Later snapshots hold weights from after the target. (At a snapshot time they would get zero weight anyway:
    # on [0, t] each is a multiple of a snapshot at t, and its tail beyond t is orthogonal to the target.)
    used = sorted((e for e in entries if float(e["t"]) <= target_t), key=lambda e: (e["step"], e["profile"]))
    gammas = {float(e["gamma"]) for e in used}
    if len(gammas) < 2:
        raise ValueError(
            f"post-hoc reconstruction needs snapshots of at least two distinct profiles (gamma values) up to step "
            f"{step}; {where} has {len(used)} snapshot(s) with gamma in {sorted(gammas)}"
        )
    return used, step, target_t


def _coefficients(used: Sequence[dict[str, Any]], target_t: float, gammas: list[float]) -> dict[str, tuple]:
    """Per tensor name: ``({entry index: row}, coefficients [rows, targets])``.

    A tensor is reconstructed from the snapshots that hold it: one added mid-run (``add_param_group``) appears
    only in later snapshots, and its shadow started as a copy of the parameter, as if the parameter had held
    that value from time 0. The least squares is solved once per distinct set of snapshots (usually one set).
    """
    holders: dict[str, list[int]] = {}
    shapes: dict[str, tuple[list, str]] = {}
    for i, e in enumerate(used):
        for name, meta in e["tensors"].items():
            holders.setdefault(name, []).append(i)
            if name not in shapes:
                shapes[name] = (list(meta["shape"]), e["file"])
            elif list(meta["shape"]) != shapes[name][0]:
                raise ValueError(
                    f"mismatched shapes between snapshots: {name!r} is {shapes[name][0]} in {shapes[name][1]} but "
                    f"{list(meta['shape'])} in {e['file']}"
                )
    solved: dict[tuple[int, ...], tuple] = {}
    out = {}
    for name, rows in holders.items():
        key = tuple(rows)
        if key not in solved:
            if len({float(used[i]["gamma"]) for i in rows}) < 2:
                raise ValueError(
                    f"tensor {name!r} is held by {len(rows)} snapshot(s) of a single profile up to the target step "
                    f"(from {used[rows[0]]['file']}); its reconstruction needs two distinct profiles"
                )
            snaps = [(float(used[i]["t"]), float(used[i]["gamma"])) for i in rows]
            solved[key] = ({i: j for j, i in enumerate(rows)}, solve_coefficients(snaps, target_t, gammas))
        out[name] = solved[key]
    return out


def _merged(used: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One index entry's ``tensors`` and ``shards`` over several entries (tensors added mid-run included)."""
    tensors: dict[str, Any] = {}
    shards: dict[str, Any] = {}
    for e in used:
        tensors.update(e["tensors"])
        shards.update(e.get("shards") or {})
    return {"tensors": tensors, "shards": shards}


def _accumulated_dtype(stored: str, dtype: torch.dtype) -> torch.dtype:
    """``dtype``, or its complex counterpart for a complex tensor (its imaginary part is averaged too)."""
    if not stored.startswith("complex"):
        return dtype
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _progress(total: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional; the reconstruction does not need it
        return None
    return tqdm(total=total, desc=desc, unit="file")


def _accumulate(
    directory: str,
    used: Sequence[dict[str, Any]],
    coeffs: dict[str, tuple],
    dtype: torch.dtype,
    bar: Any,
) -> list[dict[str, Tensor]]:
    """``Σ coeffs[i, k] · snapshot_i`` for each k, one file at a time. An entry merged over ranks (``"pieces"``)
    adds each rank's piece where its shard placement puts it: elementwise, so bit-exact against one process."""
    from safetensors import safe_open

    merged = _merged(used)["tensors"]
    shapes = {n: tuple(m["shape"]) for n, m in merged.items()}
    count = next(iter(coeffs.values()))[1].shape[1]
    outs = [
        {n: torch.zeros(shapes[n], dtype=_accumulated_dtype(m["dtype"], dtype)) for n, m in merged.items()}
        for _ in range(count)
    ]
    for i, entry in enumerate(used):
        merged_entry = "pieces" in entry
        for piece in entry["pieces"] if merged_entry else [entry]:
            path = os.path.join(directory, piece["file"])
            if not os.path.exists(path):
                raise ValueError(f"the index lists {piece['file']}, which is not in {directory!r}")
            try:
                f = safe_open(path, framework="pt", device="cpu")
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for damaged files
                raise ValueError(f"{path} cannot be read (truncated or damaged?): {exc}") from None
            places = (piece.get("shards") or {}) if merged_entry else {}
            with f:
                present = set(f.keys())
                for n in piece["tensors"]:
                    if n not in present:
                        raise ValueError(f"{piece['file']} does not hold tensor {n!r} that its index entry lists")
                    x = f.get_tensor(n)
                    want = list(piece["tensors"][n]["shape"]) if merged_entry else list(shapes[n])
                    if list(x.shape) != want:
                        raise ValueError(
                            f"mismatched shapes between snapshots: {n!r} is {want} in the index but "
                            f"{list(x.shape)} in {piece['file']}"
                        )
                    rows, x_coeffs = coeffs[n]
                    x = x.to(outs[0][n].dtype)
                    place = places.get(n)
                    for k, out in enumerate(outs):
                        target = out[n]
                        if place is not None:
                            target = target.narrow(place["dim"], place["offset"], x.shape[place["dim"]])
                        target.add_(x, alpha=float(x_coeffs[rows[i], k]))
                    del x
        if bar is not None:
            bar.update(1)
    return outs


def _merge_ranks(indexes: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One entry per (step, profile) over the ranks that wrote it, holding full shapes and each rank's piece.

    A snapshot counts when its pieces cover every tensor: a resume on another number of ranks changes who wrote
    what, and a rank that stopped early (or failed a write) leaves steps that are left out, with a warning.
    """
    by_key: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in sorted(indexes):
        for e in indexes[r]:
            by_key.setdefault((e["step"], e["profile"]), []).append(e)
    merged, partial = [], []
    for key in sorted(by_key):
        pieces = by_key[key]
        full: dict[str, dict[str, Any]] = {}
        covered: dict[str, int] = {}
        for e in pieces:
            for n, meta in e["tensors"].items():
                place = (e.get("shards") or {}).get(n)
                if place is None:
                    holders = [p["rank"] for p in pieces if n in p["tensors"]]
                    if len(holders) > 1:
                        raise ValueError(
                            f"{len(holders)} ranks' snapshots, but rank {e['rank']}'s tensor {n!r} has no shard "
                            "placement; pass rank= to reconstruct one rank's tensors"
                        )
                    full[n] = {"dtype": meta["dtype"], "shape": list(meta["shape"]), "dim": None}
                    continue
                shape = list(place["global_shape"])
                if n in full and (full[n]["dim"] != place["dim"] or full[n]["shape"] != shape):
                    raise ValueError(f"the ranks disagree on how {n!r} is sharded at step {key[0]}")
                full[n] = {"dtype": meta["dtype"], "shape": shape, "dim": place["dim"]}
                covered[n] = covered.get(n, 0) + meta["shape"][place["dim"]]
        whole = all(m["dim"] is None or covered[n] == m["shape"][m["dim"]] for n, m in full.items())
        entry = {k: pieces[0][k] for k in ("step", "t", "gamma", "sigma_rel", "profile", "file")}
        entry["tensors"] = {n: {"dtype": m["dtype"], "shape": m["shape"]} for n, m in full.items()}
        entry["pieces"] = pieces
        (merged if whole else partial).append(entry)
    if partial:
        warnings.warn(
            f"{len(partial)} snapshot(s) miss a rank's piece (a rank stopped early or failed a write), from step "
            f"{partial[0]['step']} on; using the {len(merged)} whole ones",
            stacklevel=4,
        )
    return merged


def _save(path: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({n: t.contiguous() for n, t in tensors.items()}, tmp, metadata={k: str(v) for k, v in meta.items()})
    os.replace(tmp, path)


def output_name(sigma_rel: float, step: int, rank: int | None = None) -> str:
    """The CLI's file name for one reconstruction: ``ema-posthoc-sigma{σ}-s{step:09d}[-r{rank}].safetensors``."""
    suffix = "" if rank is None else f"-r{rank}"
    return f"ema-posthoc-sigma{sigma_rel:g}-s{step:09d}{suffix}.safetensors"


def _reconstruct(
    directory: str | os.PathLike,
    sigma_rels: Iterable[float],
    step: int | None,
    rank: int | None,
    progress: bool,
    dtype: torch.dtype,
) -> tuple[list[dict[str, Tensor]], dict[str, Any]]:
    """The reconstructions and what they target: ``{"step", "t", "snapshots"}``."""
    sigmas = [_check_sigma_rel(s) for s in sigma_rels]
    if not sigmas:
        raise ValueError("reconstruct_many needs at least one sigma_rel")
    gammas = [sigma_rel_to_gamma(s) for s in sigmas]
    directory = os.fspath(directory)
    indexes = _load(directory)
    if rank is not None:
        if rank not in indexes:
            raise ValueError(f"Invalid rank value: {rank}. {directory!r} holds the indexes of ranks {sorted(indexes)}")
        indexes = {rank: indexes[rank]}
    elif len(indexes) > 1:
        # Each snapshot assembled from the ranks that wrote it (their number may change at a resume).
        indexes = {-1: _merge_ranks(indexes)}
    where = {r: os.path.join(directory, index_name(r)) for r in indexes}
    where[-1] = f"the indexes in {directory!r}"
    plans = {r: _plan(entries, step, where[r]) for r, entries in indexes.items()}
    bar = _progress(sum(len(p[0]) for p in plans.values()), progress, "posthoc EMA")
    per_rank: dict[int, list[dict[str, Tensor]]] = {}
    try:
        for r, (used, _, target_t) in plans.items():
            per_rank[r] = _accumulate(directory, used, _coefficients(used, target_t, gammas), dtype, bar)
    finally:
        if bar is not None:
            bar.close()
    (results,) = per_rank.values()
    used, target_step, target_t = next(iter(plans.values()))
    return results, {"step": target_step, "t": target_t, "snapshots": len(used), "sigmas": sigmas, "gammas": gammas}


def _write_outputs(out_dir: str, results: list[dict[str, Tensor]], info: dict[str, Any], rank: int | None) -> list:
    paths = []
    for s, g, tensors in zip(info["sigmas"], info["gammas"], results):
        path = os.path.join(out_dir, output_name(s, info["step"], rank))
        meta = {"sigma_rel": s, "gamma": g, "step": info["step"], "t": info["t"], "snapshots": info["snapshots"]}
        _save(path, tensors, meta)
        paths.append(path)
    return paths


def reconstruct_many(
    directory: str | os.PathLike,
    sigma_rels: Iterable[float],
    *,
    step: int | None = None,
    rank: int | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = False,
    dtype: torch.dtype = torch.float32,
) -> list[dict[str, Tensor]]:
    """The EMAs of several relative widths in one pass over the snapshot files: one ``{name: tensor}`` each.

    Args:
        directory: a snapshot directory written by :class:`triton_ema.snapshot.SnapshotWriter`.
        sigma_rels: the relative widths wanted, each in ``(0, 12**-0.5)``.
        step: the target step (default: the last snapshot's, whatever order the index lists them in); it must be
            a snapshot step (any other is refused, naming the nearest ones).
        rank: which rank's tensors (see the module docstring); ``None``: the only rank, or all ranks assembled.
        out_dir: if given, also write one safetensors file per σ_rel there, named by :func:`output_name`.
        progress: show a tqdm progress bar over the files (if tqdm is installed).
        dtype: the accumulation and output dtype (fp32; float64 doubles the memory).

    Raises:
        ValueError: σ_rel out of range, no index in ``directory``, mismatched shapes or tensors between
            snapshots, fewer than two distinct profiles, a target step after the last snapshot, or an unknown rank.
    """
    results, info = _reconstruct(directory, sigma_rels, step, rank, progress, dtype)
    if out_dir is not None:
        _write_outputs(os.fspath(out_dir), results, info, rank)
    return results


def reconstruct(
    directory: str | os.PathLike,
    sigma_rel: float,
    step: int | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = False,
    *,
    rank: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """The EMA of relative width ``sigma_rel`` at ``step`` (default: the last snapshot), as ``{name: tensor}``.

    Keys are the names the snapshots were saved under (the model's ``state_dict()`` keys when the wrapper knew the
    names); :func:`load_into` loads the result into a model and checks the keys. With ``out=`` the result is also
    written to that safetensors file. See :func:`reconstruct_many` for the other arguments and the errors.
    """
    (result,), info = _reconstruct(directory, [sigma_rel], step, rank, progress, dtype)
    if out is not None:
        meta = {"sigma_rel": info["sigmas"][0], "gamma": info["gammas"][0]}
        meta.update({k: info[k] for k in ("step", "t", "snapshots")})
        _save(os.fspath(out), result, meta)
    return result


def load_into(
    model: torch.nn.Module,
    directory: str | os.PathLike,
    sigma_rel: float,
    step: int | None = None,
    *,
    rank: int | None = None,
) -> dict[str, Tensor]:
    """Reconstruct the EMA of width ``sigma_rel`` and load it into ``model`` strictly; returns the reconstruction.

    Every reconstructed tensor must be one of the model's ``state_dict()`` keys with the same shape, and every
    parameter of the model must be reconstructed: otherwise ``ValueError`` names the keys and the model is left
    unchanged. Buffers the snapshots do not hold keep the model's values: integer ones (BatchNorm's
    ``num_batches_tracked``) are never averaged, floating ones were not tracked (``buffers=``), which is warned
    about. A model wrapped by torch.compile or DDP is loaded through the module inside.

    Example:
        >>> posthoc.load_into(model, "runs/ema", sigma_rel=0.15)  # doctest: +SKIP
    """
    state = reconstruct(directory, sigma_rel, step=step, rank=rank)
    plain = model
    while isinstance(getattr(plain, "_orig_mod", None), torch.nn.Module) or (
        type(plain).__name__ in ("DistributedDataParallel", "DataParallel")
    ):
        plain = getattr(plain, "_orig_mod", None) or plain.module
    own = plain.state_dict()
    where = os.fspath(directory)
    unexpected = [n for n in state if n not in own]
    if unexpected:
        raise ValueError(
            f"the reconstruction from {where!r} holds tensors the model does not have: {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''} (snapshots of another model, or named by position: give the "
            "wrapper model= or the optimizer model.named_parameters())"
        )
    shapes = [f"{n}: {list(t.shape)} vs {list(own[n].shape)}" for n, t in state.items() if t.shape != own[n].shape]
    if shapes:
        raise ValueError(f"the reconstruction from {where!r} and the model disagree on shapes: {shapes[:10]}")
    params = {n for n, _ in plain.named_parameters(remove_duplicate=False)}
    missing = [n for n in own if n not in state and n in params]
    if missing:
        raise ValueError(f"the reconstruction from {where!r} lacks the model's parameters {missing[:10]}")
    kept = [n for n in own if n not in state and own[n].is_floating_point()]
    if kept:
        warnings.warn(
            f"the snapshots hold no EMA of the buffers {kept[:10]}: they keep the model's values", stacklevel=2
        )
    plain.load_state_dict({**own, **state}, strict=True)
    return state


def _parse_sigmas(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--sigma-rel takes comma-separated numbers, got {text!r}") from exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m triton_ema.posthoc",
        description="Reconstruct EMAs of any relative width from power-function EMA snapshots (EDM2 post-hoc EMA).",
    )
    parser.add_argument("directory", help="the snapshot directory (holds index-r*.jsonl)")
    parser.add_argument("--sigma-rel", type=_parse_sigmas, help="comma-separated, e.g. 0.08,0.12")
    parser.add_argument("--out", help="output directory: one safetensors file per sigma_rel")
    parser.add_argument("--step", type=int, default=None, help="target step (default: the last snapshot)")
    parser.add_argument("--rank", type=int, default=None, help="one rank's shards (default: all, assembled)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--prune", action="store_true", help="delete the files of superseded snapshots (abandoned branches) first"
    )
    args = parser.parse_args(argv)
    if not args.prune and (args.sigma_rel is None or args.out is None):
        parser.error("--sigma-rel and --out are required (unless --prune alone)")
    if (args.sigma_rel is None) != (args.out is None):
        parser.error("--sigma-rel and --out go together")
    try:
        if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
            raise ValueError(f"--out {args.out!r} is a file; it must be a directory (one file per sigma_rel)")
        if args.prune:
            if not os.path.isdir(args.directory):
                raise ValueError(f"{args.directory!r} is not a directory")
            for name in prune(args.directory):
                print(f"removed {os.path.join(args.directory, name)}")
        if args.sigma_rel is None:
            return 0
        progress = not args.no_progress
        results, info = _reconstruct(args.directory, args.sigma_rel, args.step, args.rank, progress, torch.float32)
        for path in _write_outputs(args.out, results, info, args.rank):
            print(path)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
