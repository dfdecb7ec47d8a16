"""Demo: how much an EMA of the weights helps noisy SGD, on scikit-learn's digits.

Run ``python -m triton_ema.demo --help``. A small MLP is trained on ``load_digits`` (1797 8x8 images, shipped
with scikit-learn, no download) with deliberately noisy SGD: a high learning rate, tiny batches and a fraction of
the training labels flipped at random. The raw weights then jitter around a good solution from step to step,
while the EMA of the weights averages that jitter out. After every epoch both are evaluated on a held-out split;
a table and a PNG of both curves are written.

``--posthoc`` runs the same training with two power-function EMA profiles (EDM2) instead, snapshots both once an
epoch, and after training reconstructs the EMA of a whole grid of relative widths ``σ_rel`` from the snapshots
(:mod:`triton_ema.posthoc`); a table and a PNG of held-out accuracy and loss against ``σ_rel`` are written, with
the raw weights and the two tracked profiles for reference.

scikit-learn, matplotlib and tqdm are imported inside :func:`main`, so ``import triton_ema`` never needs them.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from triton_ema import EMAOptimizerWrapper

#: The relative widths reconstructed by ``--posthoc`` (it adds the tracked ones if they are missing).
POSTHOC_GRID = (0.02, 0.03, 0.04, 0.05, 0.07, 0.10, 0.13, 0.16, 0.20, 0.25)
#: The two power-function profiles ``--posthoc`` tracks during training.
POSTHOC_PROFILES = (0.05, 0.10)


def _sigma_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m triton_ema.demo",
        description="Train an MLP on scikit-learn digits with noisy SGD; compare raw and EMA weights.",
    )
    parser.add_argument("--epochs", type=int, default=30, help="training epochs (default: %(default)s)")
    parser.add_argument("--decay", type=float, default=0.998, help="EMA decay (default: %(default)s)")
    parser.add_argument(
        "--warmup",
        choices=("none", "litema", "power"),
        default="power",
        help="EMA decay warmup (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for split, label noise, init (default: 0)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 0 keeps torch's default (default: %(default)s: batches of 8 gain nothing from "
        "more, and on a shared machine extra threads' spin-waits made the run 5-25x slower)",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda if available, else cpu)",
    )
    parser.add_argument(
        "--out", default=None, help="path of the PNG plot (default: ema_demo.png, with --posthoc ema_posthoc.png)"
    )
    parser.add_argument("--lr", type=float, default=0.08, help="SGD learning rate (default: %(default)s)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch size (default: %(default)s)")
    parser.add_argument(
        "--label-noise",
        type=float,
        default=0.2,
        help="fraction of training labels replaced by random ones (default: %(default)s)",
    )
    posthoc = parser.add_argument_group("post-hoc EMA (--posthoc; --decay and --warmup do not apply)")
    posthoc.add_argument(
        "--posthoc",
        action="store_true",
        help="track two power-function profiles, snapshot them once an epoch, and after training reconstruct "
        "and evaluate a grid of EMA widths sigma_rel",
    )
    posthoc.add_argument(
        "--profiles",
        type=_sigma_list,
        default=POSTHOC_PROFILES,
        help="sigma_rel of the tracked profiles, comma-separated (default: 0.05,0.10)",
    )
    posthoc.add_argument(
        "--sigma-rel",
        type=_sigma_list,
        default=POSTHOC_GRID,
        help="sigma_rel values to reconstruct after training, comma-separated (default: "
        + ",".join(f"{s:g}" for s in POSTHOC_GRID)
        + ")",
    )
    posthoc.add_argument(
        "--snapshot-dir",
        default=None,
        help="where the snapshots go; must not hold any yet (default: a temporary directory, deleted at the end)",
    )
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if args.posthoc:
        if len(set(args.profiles)) < 2:
            parser.error(f"--profiles needs at least two distinct sigma_rel values, got {args.profiles}")
        if args.snapshot_dir is not None and os.path.isdir(args.snapshot_dir) and os.listdir(args.snapshot_dir):
            # A continued index would mix this run's snapshots with an older run's later ones.
            parser.error(f"--snapshot-dir {args.snapshot_dir!r} is not empty")
    if args.out is None:
        args.out = "ema_posthoc.png" if args.posthoc else "ema_demo.png"
    return args


def _make_model(n_features: int, n_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(n_features, 128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Linear(128, n_classes),
    )


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, y).item()
    acc = (logits.argmax(dim=1) == y).float().mean().item()
    return acc, loss


def _sgd(params: Any, args: argparse.Namespace) -> torch.optim.SGD:
    # Weight decay keeps the net from memorising the flipped labels, so test accuracy does not decay over the run
    # and what remains between raw and EMA weights is the step-to-step jitter.
    return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=3e-3)


def _train_epoch(model: nn.Module, opt: EMAOptimizerWrapper, x: torch.Tensor, y: torch.Tensor, gen, args, bar):
    model.train()
    order = torch.randperm(len(y), generator=gen).to(x.device)
    for idx in order.split(args.batch_size):
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # Clipping lets the high learning rate stay noisy without the occasional run diverging.
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.update()
    model.eval()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the demo.

    Returns the per-epoch history (``raw_acc``, ``ema_acc``, ``raw_loss``, ``ema_loss``), or with ``--posthoc``
    the results of :func:`_posthoc` (``sigma_rel``, ``acc``, ``loss``, ``raw_acc``, ``raw_loss``, ``tracked``).
    """
    args = _parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        # Batches of 8 through a 128-wide MLP are far too small to split across threads: a second one only
        # adds synchronisation, and on a 2-vCPU machine shared with other jobs its spin-waits made the default
        # run take 26-110 s instead of 3-6 s. The results are the same bits either way at these sizes.
        torch.set_num_threads(args.threads)
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace) -> dict[str, Any]:
    # Optional dependencies, imported here so that the package itself never needs them.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler
    from tqdm.auto import tqdm

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        data.data, data.target, test_size=0.3, stratify=data.target, random_state=args.seed
    )
    scaler = StandardScaler().fit(x_tr)
    x_tr = torch.tensor(scaler.transform(x_tr), dtype=torch.float32, device=device)
    x_te = torch.tensor(scaler.transform(x_te), dtype=torch.float32, device=device)
    y_tr = torch.tensor(y_tr, device=device)
    y_te = torch.tensor(y_te, device=device)
    n_classes = int(data.target.max()) + 1

    # Label noise on the training split only: the gradients stay noisy however long we train, which is the
    # regime in which averaging the weights pays off; the test split keeps its true labels.
    flip = torch.rand(len(y_tr), generator=gen) < args.label_noise
    random_labels = torch.randint(0, n_classes, (len(y_tr),), generator=gen)
    y_tr = torch.where(flip.to(device), random_labels.to(device), y_tr)

    model = _make_model(x_tr.shape[1], n_classes).to(device)
    steps_per_epoch = (len(y_tr) + args.batch_size - 1) // args.batch_size
    if args.posthoc:
        train = (x_tr, y_tr, gen, steps_per_epoch)
        return _posthoc(args, model, train, (x_te, y_te), plt, tqdm)

    opt = EMAOptimizerWrapper(
        _sgd(model.parameters(), args),
        decay=args.decay,
        warmup=None if args.warmup == "none" else args.warmup,
    )

    history: dict[str, list[float]] = {"raw_acc": [], "ema_acc": [], "raw_loss": [], "ema_loss": []}
    header = f"{'epoch':>5} | {'raw acc':>8} {'ema acc':>8} | {'raw loss':>8} {'ema loss':>8}"
    rows = [header, "-" * len(header)]
    start = time.perf_counter()
    bar = tqdm(total=args.epochs * steps_per_epoch, desc="training", unit="step")
    for epoch in range(1, args.epochs + 1):
        _train_epoch(model, opt, x_tr, y_tr, gen, args, bar)
        raw_acc, raw_loss = _evaluate(model, x_te, y_te)
        # The EMA is swapped into the model in place and swapped back on exit: no copy of the model needed.
        with opt.ema_weights():
            ema_acc, ema_loss = _evaluate(model, x_te, y_te)
        for key, value in zip(history, (raw_acc, ema_acc, raw_loss, ema_loss)):
            history[key].append(value)
        rows.append(f"{epoch:>5} | {raw_acc:>8.4f} {ema_acc:>8.4f} | {raw_loss:>8.4f} {ema_loss:>8.4f}")
        bar.set_postfix(raw=f"{raw_acc:.3f}", ema=f"{ema_acc:.3f}")
    bar.close()
    elapsed = time.perf_counter() - start

    print("\n".join(rows))
    n_last = max(1, args.epochs // 4)
    mean = {k: sum(v[-n_last:]) / n_last for k, v in history.items()}
    print(
        f"last {n_last} epochs, mean test accuracy: raw {mean['raw_acc']:.4f}, EMA {mean['ema_acc']:.4f}; "
        f"mean test loss: raw {mean['raw_loss']:.4f}, EMA {mean['ema_loss']:.4f}"
    )
    print(f"{opt.num_steps} steps in {elapsed:.1f} s on {device}")

    epochs = range(1, args.epochs + 1)
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    ax_acc.plot(epochs, history["raw_acc"], label="raw weights")
    ax_acc.plot(epochs, history["ema_acc"], label=f"EMA (decay {args.decay})")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="held-out accuracy")
    ax_loss.plot(epochs, history["raw_loss"], label="raw weights")
    ax_loss.plot(epochs, history["ema_loss"], label=f"EMA (decay {args.decay})")
    ax_loss.set(xlabel="epoch", ylabel="test cross-entropy", title="held-out loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"digits MLP, SGD lr={args.lr}, batch {args.batch_size}, {args.label_noise:.0%} label noise")
    fig.savefig(args.out, dpi=120)
    plt.close(fig)
    print(f"plot written to {args.out}")
    return history


def _posthoc(args: argparse.Namespace, model: nn.Module, train: tuple, test: tuple, plt, tqdm) -> dict[str, Any]:
    """Train with two power-function profiles and snapshots, then reconstruct and evaluate a grid of σ_rel."""
    from triton_ema import posthoc
    from triton_ema.snapshot import read_index

    x_tr, y_tr, gen, steps_per_epoch = train
    x_te, y_te = test
    profiles = tuple(args.profiles)
    grid = sorted(set(args.sigma_rel) | set(profiles))
    own_dir = args.snapshot_dir is None
    snapshot_dir = tempfile.mkdtemp(prefix="triton-ema-posthoc-") if own_dir else args.snapshot_dir
    try:
        # The parameter names from named_parameters() key the snapshot files, so the reconstructions load straight
        # into the model. One snapshot per profile at the end of every epoch, the last at the end of training:
        # the reconstruction targets the last snapshot's step, where the tracked profiles are evaluated too.
        opt = EMAOptimizerWrapper(
            _sgd(model.named_parameters(), args),
            sigma_rel=profiles,
            snapshot_every=steps_per_epoch,
            snapshot_dir=snapshot_dir,
        )
        start = time.perf_counter()
        bar = tqdm(total=args.epochs * steps_per_epoch, desc="training", unit="step")
        for _ in range(args.epochs):
            _train_epoch(model, opt, x_tr, y_tr, gen, args, bar)
        bar.close()
        opt.flush()  # every snapshot on disk before reading them back
        train_s = time.perf_counter() - start

        raw_acc, raw_loss = _evaluate(model, x_te, y_te)
        tracked: dict[float, tuple[float, float]] = {}
        for k, s in enumerate(profiles):
            with opt.ema_weights(profile=k):
                tracked[s] = _evaluate(model, x_te, y_te)

        start = time.perf_counter()
        # One pass over the snapshot files for the whole grid.
        states = posthoc.reconstruct_many(snapshot_dir, grid)
        n_files = sum(len(entries) for entries in read_index(snapshot_dir).values())
        probe = copy.deepcopy(model)
        accs, losses = [], []
        for state in states:
            result = probe.load_state_dict(state, strict=False)
            if result.missing_keys or result.unexpected_keys:
                # strict=False would otherwise evaluate the raw weights without a word.
                raise RuntimeError(f"the snapshots' names do not match the model's: {result}")
            acc, loss = _evaluate(probe, x_te, y_te)
            accs.append(acc)
            losses.append(loss)
        reconstruct_s = time.perf_counter() - start
    finally:
        if own_dir:
            shutil.rmtree(snapshot_dir, ignore_errors=True)

    steps = opt.num_steps
    header = f"{'sigma_rel':>9} {'~steps':>7} | {'test acc':>8} {'test loss':>9} | {'vs raw':>7}"
    rows = [header, "-" * len(header)]
    for s, acc, loss in zip(grid, accs, losses):
        note = f"  tracked: {tracked[s][0]:.4f} {tracked[s][1]:.4f}" if s in tracked else ""
        rows.append(f"{s:>9.3f} {s * steps:>7.0f} | {acc:>8.4f} {loss:>9.4f} | {acc - raw_acc:>+7.4f}{note}")
    rows.append(f"{'raw':>9} {'':>7} | {raw_acc:>8.4f} {raw_loss:>9.4f} |")
    print("\n".join(rows))
    best = max(range(len(grid)), key=lambda i: (accs[i], -losses[i]))
    print(
        f"best reconstructed: sigma_rel {grid[best]:g}, test accuracy {accs[best]:.4f} "
        f"(raw weights {raw_acc:.4f}); lowest test loss {min(losses):.4f} at sigma_rel "
        f"{grid[losses.index(min(losses))]:g} (raw {raw_loss:.4f})"
    )
    print(
        f"{steps} steps and {n_files} snapshots in {train_s:.1f} s, {len(grid)} reconstructions in "
        f"{reconstruct_s:.1f} s on {x_tr.device}"
    )

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, values, raw, j, label in (
        (ax_acc, accs, raw_acc, 0, "test accuracy"),
        (ax_loss, losses, raw_loss, 1, "test cross-entropy"),
    ):
        ax.plot(grid, values, "o-", label="reconstructed after training")
        ax.plot(
            list(tracked),
            [v[j] for v in tracked.values()],
            "*",
            markersize=14,
            color="C3",
            label="tracked during training",
        )
        ax.axhline(raw, color="C7", linestyle="--", label="raw trained weights")
        # A log axis spreads the narrow widths, where the curve changes fastest; labels only at round values.
        ax.set_xscale("log")
        ticks = [s for s in (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.25, 0.3) if grid[0] <= s <= grid[-1]]
        ax.set_xticks(ticks, [f"{s:g}" for s in ticks])
        ax.minorticks_off()
        ax.set(xlabel=f"EMA width σ_rel (std / run length; 0.1 = {0.1 * steps:.0f} steps)", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_acc.set_title("held-out accuracy")
    ax_loss.set_title("held-out loss")
    tracked_names = ", ".join(f"{s:g}" for s in profiles)
    fig.suptitle(
        f"post-hoc EMA from {n_files // len(profiles)} snapshots each of σ_rel {tracked_names}: digits MLP, "
        f"SGD lr={args.lr}, batch {args.batch_size}, {args.label_noise:.0%} label noise"
    )
    fig.savefig(args.out, dpi=120)
    plt.close(fig)
    print(f"plot written to {args.out}")
    return {
        "sigma_rel": grid,
        "acc": accs,
        "loss": losses,
        "raw_acc": raw_acc,
        "raw_loss": raw_loss,
        "tracked": tracked,
        "snapshots": n_files,
    }


if __name__ == "__main__":
    main()
