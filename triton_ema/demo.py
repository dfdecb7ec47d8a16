"""Demo: how much an EMA of the weights helps noisy SGD, on scikit-learn's digits.

Run ``python -m triton_ema.demo --help``. A small MLP is trained on ``load_digits`` (1797 8x8 images, shipped
with scikit-learn, no download) with deliberately noisy SGD: a high learning rate, tiny batches and a fraction of
the training labels flipped at random. The raw weights then jitter around a good solution from step to step,
while the EMA of the weights averages that jitter out. After every epoch both are evaluated on a held-out split;
a table and a PNG of both curves are written.

scikit-learn, matplotlib and tqdm are imported inside :func:`main`, so ``import triton_ema`` never needs them.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch
from torch import nn

from triton_ema import EMAOptimizerWrapper


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
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda if available, else cpu)",
    )
    parser.add_argument("--out", default="ema_demo.png", help="path of the PNG plot (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=0.08, help="SGD learning rate (default: %(default)s)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch size (default: %(default)s)")
    parser.add_argument(
        "--label-noise",
        type=float,
        default=0.2,
        help="fraction of training labels replaced by random ones (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
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


def main(argv: Sequence[str] | None = None) -> dict[str, list[float]]:
    """Run the demo; returns the per-epoch history (``raw_acc``, ``ema_acc``, ``raw_loss``, ``ema_loss``)."""
    args = _parse_args(argv)

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
    opt = EMAOptimizerWrapper(
        # Weight decay keeps the net from memorising the flipped labels, so test accuracy does not decay over
        # the run and what remains between raw and EMA weights is the step-to-step jitter.
        torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=3e-3),
        decay=args.decay,
        warmup=None if args.warmup == "none" else args.warmup,
    )

    history: dict[str, list[float]] = {"raw_acc": [], "ema_acc": [], "raw_loss": [], "ema_loss": []}
    header = f"{'epoch':>5} | {'raw acc':>8} {'ema acc':>8} | {'raw loss':>8} {'ema loss':>8}"
    rows = [header, "-" * len(header)]
    steps_per_epoch = (len(y_tr) + args.batch_size - 1) // args.batch_size
    start = time.perf_counter()
    bar = tqdm(total=args.epochs * steps_per_epoch, desc="training", unit="step")
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(y_tr), generator=gen).to(device)
        for idx in order.split(args.batch_size):
            loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # Clipping lets the high learning rate stay noisy without the occasional run diverging.
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            bar.update()

        model.eval()
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


if __name__ == "__main__":
    main()
