"""Train a multi-exit network with one of the paper's methods, on data available offline.

    python examples/train.py                       # HDKD, BranchyNet-style CNN, scikit-learn digits
    python examples/train.py --method msdnet       # the uniform-CE baseline, same everything else
    python examples/train.py --dataset cifar10 --data-dir PATH --model msdnet --epochs 30

A stratified 10% of the training pool is held out, never augmented, and feeds the meta step
(and would feed threshold search). At the end the per-exit accuracy on the test set is
printed as a table; ``--out FILE`` also writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import metaweight as mw  # noqa: E402
from branchynet import branchynet  # noqa: E402
from data import Split, augment, load_cifar, load_digits, load_fashion_mnist  # noqa: E402
from msdnet import msdnet_cifar  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="hdkd", choices=list(mw.METHODS))
    p.add_argument("--dataset", default="digits", choices=["digits", "fashion-mnist", "cifar10", "cifar100"])
    p.add_argument("--data-dir", default=None, help="where the data set lives (see examples/data.py)")
    p.add_argument("--per-class", type=int, default=None, help="use X random images per class: CIFAR(X)")
    p.add_argument("--model", default=None, choices=["branchynet", "msdnet"],
                   help="default: branchynet for digits, msdnet otherwise")
    p.add_argument("--exits", type=int, default=None, help="number of exits (default 3 branchynet, 8 msdnet)")
    p.add_argument("--width", type=int, default=None, help="channels: branchynet width / msdnet stem channels")
    p.add_argument("--growth-rate", type=int, default=6, help="msdnet growth rate (6 in the paper)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--val-batch-size", type=int, default=None, help="default: the batch size")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--gamma-lr", type=float, default=0.01)
    p.add_argument("--temperature", type=float, default=3.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many iterations (smoke tests)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--plot", default=None, help="budget-curve plot file (default runs/budget-METHOD.png)")
    p.add_argument("--no-plot", action="store_true", help="do not write the budget-curve plot")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def load(args: argparse.Namespace) -> Split:
    if args.dataset == "digits":
        return load_digits(val_fraction=args.val_fraction, seed=args.seed)
    if args.dataset == "fashion-mnist":
        return load_fashion_mnist(args.data_dir, per_class=args.per_class, val_fraction=args.val_fraction,
                                  seed=args.seed)
    return load_cifar(args.data_dir, hundred=args.dataset == "cifar100", per_class=args.per_class,
                      val_fraction=args.val_fraction, seed=args.seed)


def build_model(args: argparse.Namespace, split: Split) -> torch.nn.Module:
    kind = args.model or ("branchynet" if args.dataset == "digits" else "msdnet")
    channels = split.x_train.shape[1]
    if kind == "branchynet":
        return branchynet(split.num_classes, channels, num_exits=args.exits or 3, width=args.width or 16,
                          branch_width=args.width or 16)
    return msdnet_cifar(split.num_classes, args.exits or 8, channels=args.width or 16, growth_rate=args.growth_rate,
                        in_channels=channels)


def batches(x: torch.Tensor, y: torch.Tensor, size: int, generator: torch.Generator,
            train_augment: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(y), generator=generator)
    for i in range(0, len(y) - size + 1 if len(y) >= size else 1, size):  # drop the ragged last batch
        idx = order[i:i + size]
        xb = augment(x[idx], generator=generator) if train_augment else x[idx]
        yield xb, y[idx]


def forever(x: torch.Tensor, y: torch.Tensor, size: int, generator: torch.Generator):
    while True:
        yield from batches(x, y, size, generator, False)


class Progress:
    """A one-line progress bar on stderr (redrawn at most 5 times a second; one line per epoch off a TTY)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.tty = total, enabled, sys.stderr.isatty()
        self.start = self.last = time.time()

    def update(self, done: int, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.time()
        if not force and (not self.tty or now - self.last < 0.2):
            return
        self.last = now
        frac = done / self.total
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        eta = (now - self.start) / max(frac, 1e-9) * (1 - frac)
        line = f"[{bar}] {done}/{self.total} {text} eta {eta:4.0f}s"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    split = load(args)
    print(split.describe())
    model = build_model(args, split).to(device)
    num_exits = len(model(split.x_train[:2].to(device)))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay,
                                nesterov=True)
    steps_per_epoch = max(1, len(split.y_train) // args.batch_size)
    total = steps_per_epoch * args.epochs
    if args.max_steps:
        total = min(total, args.max_steps)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=[int(0.5 * total), int(0.75 * total)], gamma=0.1)  # per iteration: /10 at 50%, 75%
    method = mw.preset(args.method, num_exits, temperature=args.temperature)
    validation = mw.BalancedValidation(num_exits, alpha=args.alpha)
    weighter = method.weighter(model, optimizer, validation, gamma_lr=args.gamma_lr)
    print(f"method {args.method}: {method.method.description}; {sum(p.numel() for p in model.parameters())} "
          f"parameters, {num_exits} exits, {method.criterion.active.sum().item()} active loss terms")

    g = torch.Generator().manual_seed(args.seed)
    val_stream = forever(split.x_val, split.y_val, min(args.val_batch_size or args.batch_size, len(split.y_val)), g)
    augment_train = args.dataset.startswith("cifar")
    progress = Progress(total, not args.no_progress)
    history, step, start = [], 0, time.time()
    model.train()
    while step < total:
        for xb, yb in batches(split.x_train, split.y_train, args.batch_size, g, augment_train):
            xv, yv = next(val_stream)
            metrics = weighter.step((xb.to(device), yb.to(device)), (xv.to(device), yv.to(device)))
            scheduler.step()
            step += 1
            if step % max(1, total // 50) == 0 or step == total:
                history.append({"step": step, "loss": metrics["loss"], "gamma": weighter.gamma.tolist(),
                                "val_objective": metrics.get("val_objective")})
            progress.update(step, f"loss {metrics['loss']:.3f}", force=step == total)
            if step >= total:
                break
    progress.close()
    seconds = time.time() - start

    def chunks(x, y):
        return [(x[i:i + 512], y[i:i + 512]) for i in range(0, len(y), 512)]

    val_logits, val_labels = mw.collect_logits(model, chunks(split.x_val, split.y_val), device=device)
    test_logits, test_labels = mw.collect_logits(model, chunks(split.x_test, split.y_test), device=device)
    result = mw.anytime_accuracy_from_logits(test_logits, test_labels, topk=(1, 5))
    costs = mw.exit_costs(model, split.x_test[:1].to(device))
    curve = mw.budgeted_curve(val_logits, val_labels, test_logits, test_labels, costs.macs)
    print(f"\ntrained {step} iterations in {seconds:.1f}s; final loss weights (gamma):")
    for name, value in weighter.gamma_dict().items():
        if method.criterion.active[method.criterion.index(name)]:
            print(f"  {name:>9} {value:.4f}")
    print("\nbudgeted batch classification (thresholds from the held-out split, accuracy on test):")
    for point in curve.points[::6] + curve.points[-1:]:
        print(f"  q={point.q:4.2f}  {point.cost / 1e6:8.3f} MMACs/image  top-1 {point.accuracy:6.2f}%  "
              f"exits {' '.join(f'{f:.2f}' for f in point.exit_fractions)}")
    if not args.no_plot:
        plot = Path(args.plot or f"runs/budget-{args.method}.png")
        try:
            mw.plot_budget_curves({args.method: curve}, plot, title=f"{split.name}, {args.method}")
            print(f"budget curve plot: {plot}")
        except ImportError as exc:
            print(f"no budget plot: {exc}")
    print(f"\nper-exit test accuracy ({args.method}, {split.name}, {len(split.y_test)} images):")
    table = str(result).splitlines()
    table[0] += f"{'MMACs':>9}"
    table[1] += "-" * 9
    for k, m in enumerate(costs.macs):
        table[2 + k] += f"{m / 1e6:>9.3f}"
    print("\n".join(table))
    out = {"config": vars(args), "data": split.name, "num_exits": num_exits, "iterations": step,
           "train_seconds": seconds, "term_names": weighter.term_names, "gamma": weighter.gamma.tolist(),
           "gamma_history": history, "test": result.to_dict(), "costs": costs.to_dict(), "budget": curve.to_dict()}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
