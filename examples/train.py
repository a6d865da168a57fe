"""Train a multi-exit network with one of the paper's methods, on data available offline.

    python examples/train.py                       # HDKD, BranchyNet-style CNN, scikit-learn digits
    python examples/train.py --method msdnet       # the uniform-CE baseline, same everything else
    python examples/train.py --method famo         # another weighting of the dense-KD terms (mw.WEIGHTINGS)
    python examples/train.py --method uw --teachers none   # ... or of the exits' cross-entropies only
    python examples/train.py --dataset cifar10 --data-dir PATH --model msdnet --epochs 30

A stratified 10% of the training pool is held out, never augmented, and feeds the meta step
(and would feed threshold search). At the end the per-exit accuracy on the test set is
printed as a table; ``--out FILE`` also writes everything as JSON.

The methods (``--method``; ``--help`` lists each with its paper): the HDKD paper's presets, whose
loss terms are the exits' cross-entropies (CE) and knowledge distillation (KD) between exits,
``msdnet`` (CE, fixed weights), ``dbt`` (CE + KD from the last exit), ``naive_dkd`` (CE + KD from
every later exit) and their versions with weights learned by a meta step on held-out batches,
``hmsdnet``, ``hdbt`` and ``hdkd``; and the loss weightings of the multi-task literature applied
to HDKD's terms (``uw``, ``dwa``, ``gradnorm``, ``rlw``, ``famo``, ``sdn``; ``--teachers none``: to the
CE terms only).

How long a run takes (measured on this project's 2-core machine, torch 2.13, one thread, while
other jobs kept both cores busy): the default job (HDKD on digits, 30 epochs, 600 iterations)
took 20-24 s of CPU time (41-96 s of wall clock); on another of the project's 2-core machines, alone on
its core, 50 s of CPU time (51 s of wall clock); ``--method msdnet``, without the meta step,
7.6 s, and ``--method dwa`` 7.7 s. The CIFAR-10(150) runs of docs/results.md (100 epochs) took
721 s per HDKD run and 254 s per MSDNet run on average, two runs sharing the 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default shown, the module docstring kept as written."""


SMALL_DATASETS = ("digits", "fashion-mnist")

# What each loss weighting does (the presets' own descriptions are in mw.METHODS); docs/guides/weighting.md
# has each rule with its defaults and costs.
WEIGHTING_SUMMARIES = {
    "uw": "uncertainty weighting: one learned log-variance per term (Kendall et al., CVPR 2018)",
    "dwa": "Dynamic Weight Average: weights from how fast each term's loss falls over an epoch "
           "(Liu et al., CVPR 2019)",
    "gradnorm": "GradNorm: weights balancing the terms' gradient norms on a shared layer (Chen et al., ICML 2018); "
                "a backward per term",
    "rlw": "Random Loss Weighting: new random weights summing to 1 at every iteration (Lin et al., TMLR 2022)",
    "famo": "FAMO: weights that make every term's log-loss fall at the same rate (Liu et al., NeurIPS 2023)",
    "sdn": "SDN's schedule: each internal exit's weight grows linearly over training (Kaya et al., ICML 2019)",
}


def method_summaries() -> str:
    """One line per ``--method``: the paper's presets (from ``mw.METHODS``) and the loss weightings."""
    lines = ["methods (--method):"]
    for name, method in mw.METHODS.items():
        lines.append(f"  {name:<10} {method.description}; {method.citation}")
    for name in mw.WEIGHTINGS:
        lines.append(f"  {name:<10} {WEIGHTING_SUMMARIES[name]}")
    return "\n".join(lines)


def default_threads(dataset: str) -> int:
    """1 thread for the small data sets; half the usable cores (at least 1) for CIFAR.

    The small models' ops are too small to split across threads, and on a machine another job
    keeps busy, spinning OpenMP threads fight over the cores: with 60 iterations of the default
    digits job on 2 busy cores, 1 thread took 26 s and 2 threads 147 s.
    """
    if dataset in SMALL_DATASETS:
        return 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, usable // 2)


def build_parser() -> argparse.ArgumentParser:
    """The command line: every option with its help and default (``--help``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter, epilog=method_summaries())
    p.add_argument("--method", default="hdkd", choices=list(mw.METHODS) + list(mw.WEIGHTINGS),
                   help="one of the HDKD paper's presets (msdnet, dbt, naive_dkd, hmsdnet, hdbt, hdkd), or a loss "
                        "weighting (uw, dwa, gradnorm, rlw, famo, sdn): each is described at the end")
    p.add_argument("--teachers", default=None, choices=["dense", "last", "none"],
                   help="the terms a loss weighting weighs (None: dense, CE + KD between every pair of exits; "
                        "none: the exits' CE only); the presets fix their own")
    p.add_argument("--dataset", default="digits", choices=["digits", "fashion-mnist", "cifar10", "cifar100"],
                   help="the data set; the CIFAR-10 JPEG folder/tarball is decoded once into runs/cache/SOURCE.npz "
                        "under the working folder (about 176 MiB: 60,000 images of 3,072 bytes), see "
                        "examples/data.py")
    p.add_argument("--data-dir", default=None, help="where the data set lives (see examples/data.py)")
    p.add_argument("--per-class", type=int, default=None, help="use X random images per class: CIFAR(X)")
    p.add_argument("--model", default=None, choices=["branchynet", "msdnet"],
                   help="the network (None: branchynet for digits, msdnet otherwise)")
    p.add_argument("--exits", type=int, default=None, help="number of exits (None: 3 branchynet, 8 msdnet)")
    p.add_argument("--width", type=int, default=None, help="channels: branchynet width / msdnet stem channels "
                                                          "(None: the model's default)")
    p.add_argument("--growth-rate", type=int, default=6, help="msdnet growth rate (6 in the paper)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (None: 1 for digits and fashion-mnist, half the usable cores for CIFAR; "
                        "more threads than free cores slow a run down many times over)")
    p.add_argument("--epochs", type=int, default=30, help="passes over the training split")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size")
    p.add_argument("--val-batch-size", type=int, default=None, help="meta step's held-out batch size (None: the "
                                                                   "batch size)")
    p.add_argument("--lr", type=float, default=0.1, help="the model's SGD learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="the model's SGD weight decay")
    p.add_argument("--gamma-lr", type=float, default=0.01, help="the learning rate of the loss weights gamma")
    p.add_argument("--gamma-optimizer", default="adam", choices=["sgd", "adam"],
                   help="the optimizer of gamma (sgd: the paper's plain SGD)")
    p.add_argument("--gamma-init", default="uniform", choices=["uniform", "last", "random"],
                   help="gamma's start: uniform (DS-like), last (DBT-like), random")
    p.add_argument("--constraint", default="clamp", choices=["clamp", "normalize"],
                   help="how gamma is kept valid after each step: clamp at 0, or also rescale it to keep the sum it "
                        "started with")
    p.add_argument("--meta-every", type=int, default=1, help="a meta step every N iterations")
    p.add_argument("--mode", default="exact", choices=["exact", "fast"],
                   help="exact: the paper's order (gamma first, then the model's step); fast: the model steps "
                        "with the gamma it has and that step is the look-ahead (docs/guides/cost.md)")
    p.add_argument("--select-per-class", type=int, default=0,
                   help="CIFAR: also score a selection split of N images per class from outside the pool")
    p.add_argument("--temperature", type=float, default=3.0, help="the distillation temperature T")
    p.add_argument("--alpha", type=float, default=0.5, help="the balanced validation objective's alpha (Eq. 10)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the training pool held out for the "
                                                                   "meta step")
    p.add_argument("--seed", type=int, default=0, help="the random seed (data split, initialisation, batches)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to train")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many iterations (smoke tests)")
    p.add_argument("--tag", default=None, help="a name for this configuration, recorded in the JSON (reports)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--checkpoint", default=None,
                   help="save the run here every --checkpoint-every iterations and resume from it if it exists")
    p.add_argument("--checkpoint-every", type=int, default=200, help="iterations between checkpoints")
    p.add_argument("--plot", default=None, help="budget-curve plot file (None: runs/budget-DATASET-METHOD.png)")
    p.add_argument("--no-plot", action="store_true", help="do not write the budget-curve plot")
    p.add_argument("--no-progress", action="store_true", help="do not print the progress line")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    for name in ("data_dir", "out", "checkpoint", "plot"):  # ~ as a shell reads it (it leaves --out=~/x as it is)
        if getattr(args, name) is not None:
            setattr(args, name, os.path.expanduser(getattr(args, name)))
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads should be at least 1 (or left out for the default). Found {args.threads}.")
    fixed = args.method in mw.METHODS and not mw.METHODS[args.method].learn  # (gamma_init sets its weights)
    if args.method in mw.WEIGHTINGS or fixed:  # these options would be recorded in the results, unused
        unused = HARMONIZED_ONLY if not fixed else tuple(k for k in HARMONIZED_ONLY if k != "gamma_init")
        given = [f"--{k.replace('_', '-')}" for k in unused if getattr(args, k) != p.get_default(k)]
        if given:
            what = "the loss weighting" if not fixed else "the preset, whose weights are fixed,"
            p.error(f"{' '.join(given)} set the harmonized weighter's gamma (where it starts, how it is "
                    f"learned); {what} {args.method!r} does not use them (they would be recorded in the results, "
                    f"unused). Leave them out, or pick a preset that learns (--method hdkd, hdbt, hmsdnet).")
    return args


def load(args: argparse.Namespace) -> Split:
    if args.dataset == "digits":
        return load_digits(val_fraction=args.val_fraction, seed=args.seed)
    if args.dataset == "fashion-mnist":
        return load_fashion_mnist(args.data_dir, per_class=args.per_class, val_fraction=args.val_fraction,
                                  seed=args.seed)
    return load_cifar(args.data_dir, hundred=args.dataset == "cifar100", per_class=args.per_class,
                      val_fraction=args.val_fraction, seed=args.seed, select_per_class=args.select_per_class)


def build_model(args: argparse.Namespace, split: Split) -> torch.nn.Module:
    kind = args.model or ("branchynet" if args.dataset == "digits" else "msdnet")
    channels = split.x_train.shape[1]
    if kind == "branchynet":
        # digits: 4 channels in the first stage (8, 16 after): small enough that depth pays, so the
        # exits differ and the budget curve rises; CIFAR and Fashion-MNIST default to 16
        width = args.width or (4 if args.dataset == "digits" else 16)
        return branchynet(split.num_classes, channels, num_exits=args.exits or 3, width=width, branch_width=width)
    return msdnet_cifar(split.num_classes, args.exits or 8, channels=args.width or 16, growth_rate=args.growth_rate,
                        in_channels=channels)


def _generator(*parts: int) -> torch.Generator:
    """A generator seeded from integers: every batch is a function of (seed, epoch, step), so a run
    resumed from a checkpoint sees exactly the batches it would have seen."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + part) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def epoch_batches(x: torch.Tensor, y: torch.Tensor, size: int, seed: int, epoch: int, first_step: int,
                  train_augment: bool, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of one epoch from its ``start``-th on, the ragged last one dropped."""
    order = torch.randperm(len(y), generator=_generator(seed, 1, epoch))
    size = min(size, len(y))
    for b, i in enumerate(range(0, len(y) - size + 1, size)):
        if b < start:
            continue
        idx = order[i:i + size]
        xb = augment(x[idx], generator=_generator(seed, 2, first_step + b)) if train_augment else x[idx]
        yield xb, y[idx]


def val_batch(x: torch.Tensor, y: torch.Tensor, size: int, seed: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``index``-th validation batch of an endless un-augmented stream of shuffled epochs."""
    size = min(size, len(y))
    per_epoch = len(y) // size
    epoch, b = divmod(index, per_epoch)
    idx = torch.randperm(len(y), generator=_generator(seed, 3, epoch))[b * size:(b + 1) * size]
    return x[idx], y[idx]


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


# settings that do not change what a run computes: a checkpoint resumes under other values of them
RUN_ONLY = ("threads", "no_progress", "no_plot", "plot", "checkpoint_every", "out", "tag")
# the options of the harmonized weighter, which the loss weightings do not take
HARMONIZED_ONLY = ("gamma_lr", "gamma_optimizer", "gamma_init", "constraint", "meta_every", "mode")


def _differences(saved: dict, now: dict) -> list[str]:
    """The settings (outside :data:`RUN_ONLY`) in which a checkpoint's run and this one differ."""
    return sorted(k for k in set(saved) | set(now) if k not in RUN_ONLY and saved.get(k) != now.get(k))


def _config(args: argparse.Namespace) -> dict:
    """The run's settings as recorded: the data folder by name only (no machine paths)."""
    config = dict(vars(args))
    for key in ("data_dir", "out", "plot", "checkpoint"):
        if config.get(key):
            config[key] = Path(config[key]).name
    return config


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> mw.AnytimeResult:
    chunks = [(x[i:i + 512], y[i:i + 512]) for i in range(0, len(y), 512)]
    logits, labels = mw.collect_logits(model, chunks, device=device)
    return mw.anytime_accuracy_from_logits(logits, labels, topk=(1, 5))


def shared_layer(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """GradNorm's shared layer for the examples' models: the last convolution of the first stage
    (BranchyNet) or block (MSDNet), the deepest weights every exit's loss depends on."""
    first = model.stages[0] if hasattr(model, "stages") else model.blocks[0]
    convs = [m for m in first.modules() if isinstance(m, torch.nn.Conv2d)]
    return [convs[-1].weight]


def weighting(args: argparse.Namespace, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              criterion: mw.DenseDistillLoss, steps_per_epoch: int, total: int) -> mw.Weighting:
    """A loss weighting of ``mw.WEIGHTINGS`` with the papers' defaults; the options that depend on the run."""
    epochs = max(1, -(-total // steps_per_epoch))  # the epochs this run trains (fewer with --max-steps)
    options = {
        "dwa": {"window": steps_per_epoch},  # the paper's per-epoch averages
        "gradnorm": {"shared_parameters": shared_layer(model)},
        "rlw": {"seed": args.seed},
        "sdn": {"epochs": epochs, "steps_per_epoch": steps_per_epoch},
    }.get(args.method, {})
    return mw.WEIGHTINGS[args.method](model, optimizer, criterion, **options)


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    threads = args.threads or default_threads(args.dataset)
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    split = load(args)
    print(split.describe())
    model = build_model(args, split).to(device)
    num_exits = len(model(split.x_train[:2].to(device)))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay,
                                nesterov=True)
    batch_size = min(args.batch_size, len(split.y_train))
    steps_per_epoch = max(1, len(split.y_train) // batch_size)
    total = steps_per_epoch * args.epochs
    if args.max_steps:
        total = min(total, args.max_steps)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=[int(0.5 * total), int(0.75 * total)], gamma=0.1)  # per iteration: /10 at 50%, 75%
    validation = mw.BalancedValidation(num_exits, alpha=args.alpha)
    if args.method in mw.WEIGHTINGS:
        criterion = mw.DenseDistillLoss(num_exits, temperature=args.temperature, teachers=args.teachers or "dense")
        weighter = weighting(args, model, optimizer, criterion, steps_per_epoch, total)
        description = f"{weighter!r} on the {criterion.teachers} terms"
    else:
        if args.teachers is not None:
            raise SystemExit(f"--teachers is for the loss weightings; the preset {args.method!r} fixes its own.")
        method = mw.preset(args.method, num_exits, temperature=args.temperature, init=args.gamma_init)
        criterion = method.criterion
        weighter = method.weighter(model, optimizer, validation, gamma_lr=args.gamma_lr,
                                   gamma_optimizer=args.gamma_optimizer, constraint=args.constraint,
                                   meta_every=args.meta_every, mode=args.mode,
                                   generator=torch.Generator().manual_seed(args.seed))
        description = method.method.description
    print(f"method {args.method}: {description}; {sum(p.numel() for p in model.parameters())} "
          f"parameters, {num_exits} exits, {criterion.active.sum().item()} active loss terms")

    history: list[dict] = []
    grads: list[torch.Tensor] = []  # d L_val / d gamma of each meta step since the last record
    step, seconds = 0, 0.0
    # the last successful meta step's L_val, for the records: kept here and in the checkpoint (the weighter's
    # state_dict does not hold its last record, and with --meta-every > 1 a resumed run's first records need it)
    val_objective = None
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    if checkpoint is not None and checkpoint.exists():
        state = mw.load_checkpoint(checkpoint, map_location=device)  # (checked: a damaged file is said so)
        config = _config(args)
        differ = _differences(state["config"], config)
        if differ:
            raise SystemExit(f"{checkpoint} was saved by a run with other settings ("
                             + ", ".join(f"{k}: {state['config'].get(k)!r} there, {config.get(k)!r} here"
                                         for k in differ)
                             + "); remove it or change --checkpoint.")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        weighter.load_state_dict(state["weighter"])
        torch.set_rng_state(state["rng"])
        step, seconds, history = state["step"], state["seconds"], state["history"]
        grads = list(state.get("grads", []))  # the meta steps since the last record (none in older checkpoints)
        val_objective = state.get("val_objective")
        print(f"resumed from {checkpoint} at iteration {step}")

    val_size = min(args.val_batch_size or args.batch_size, len(split.y_val))
    augment_train = args.dataset.startswith("cifar")
    progress = Progress(total, not args.no_progress)
    record_every = max(1, total // 100)
    start = time.time() - seconds
    model.train()
    while step < total:
        epoch, offset = divmod(step, steps_per_epoch)
        for xb, yb in epoch_batches(split.x_train, split.y_train, batch_size, args.seed, epoch,
                                    epoch * steps_per_epoch, augment_train, start=offset):
            xv, yv = val_batch(split.x_val, split.y_val, val_size, args.seed, step)
            metrics = weighter.step((xb.to(device), yb.to(device)), (xv.to(device), yv.to(device)))
            if "gamma_grad" in metrics:
                grads.append(metrics["gamma_grad"].detach().cpu())
            if metrics.ran and not metrics.skipped and not metrics.model_step_skipped:
                val_objective = metrics.val_objective
            scheduler.step()
            step += 1
            if step % record_every == 0 or step == total:
                history.append({"step": step, "loss": metrics["loss"], "gamma": weighter.gamma.tolist(),
                                "val_objective": val_objective,
                                "gamma_grad_mean": torch.stack(grads).mean(0).tolist() if grads else None,
                                "gamma_grad_norm": float(torch.stack(grads).norm(dim=1).mean()) if grads else None,
                                "lr": optimizer.param_groups[0]["lr"]})
                grads = []
            progress.update(step, f"loss {metrics['loss']:.3f}", force=step == total)
            if checkpoint is not None and step % args.checkpoint_every == 0 and step < total:
                # (atomic: an interrupted save leaves the last checkpoint)
                mw.save_checkpoint({"config": _config(args), "model": model.state_dict(),
                                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                    "weighter": weighter.state_dict(), "rng": torch.get_rng_state(), "step": step,
                                    "seconds": time.time() - start, "history": history, "grads": grads,
                                    "val_objective": val_objective},
                                   checkpoint)
            if step >= total:
                break
    progress.close()
    seconds = time.time() - start

    def chunks(x, y):
        return [(x[i:i + 512], y[i:i + 512]) for i in range(0, len(y), 512)]

    val_logits, val_labels = mw.collect_logits(model, chunks(split.x_val, split.y_val), device=device)
    test_logits, test_labels = mw.collect_logits(model, chunks(split.x_test, split.y_test), device=device)
    result = mw.anytime_accuracy_from_logits(test_logits, test_labels, topk=(1, 5))
    val_result = mw.anytime_accuracy_from_logits(val_logits, val_labels, topk=(1, 5))
    with torch.no_grad():
        val_exit_losses = validation.exit_losses(list(val_logits), val_labels)
    # what early exit runs to each exit, as MSDNet counts it (the default leaves out an MSDNet block's finer scales)
    costs = mw.exit_costs(model, split.x_test[:1].to(device), executed=True)
    curve = mw.budgeted_curve(val_logits, val_labels, test_logits, test_labels, costs.macs)
    print(f"\ntrained {step} iterations in {seconds:.1f}s; final loss weights (gamma):")
    for name, value in weighter.gamma_dict().items():
        if criterion.active[criterion.index(name)]:
            print(f"  {name:>9} {value:.4f}")
    print("\nbudgeted batch classification (thresholds from the held-out split, accuracy on test):")
    for point in curve.points[::6] + curve.points[-1:]:
        print(f"  q={point.q:4.2f}  {point.cost / 1e6:8.3f} MMACs/image  top-1 {point.accuracy:6.2f}%  "
              f"exits {' '.join(f'{f:.2f}' for f in point.exit_fractions)}")
    calibration = mw.calibrate(val_logits, val_labels, test_logits, test_labels)
    print("\ncalibration (one temperature per exit, fitted on the held-out split; NLL and ECE on test):")
    print(calibration)
    target = mw.thresholds_for_accuracy(val_logits, val_labels, 0.02, confidence=0.9, costs=costs.macs)
    kept = mw.evaluate_thresholds(test_logits, test_labels, target.thresholds, costs.macs)
    scored = isinstance(weighter, mw.HarmonizedWeighter) and weighter.num_meta_steps > 0  # (gamma learned on it)
    caveat = ("; it also scored the meta steps that learned gamma, which the guarantee assumes it did not: certify "
              "on a split of its own" if scored else "")
    print(f"\nthresholds for at most a 2-point drop from the last exit with 90% confidence (held-out split{caveat}): "
          f"test top-1 {kept.accuracy:.2f}% at {kept.cost / 1e6:.3f} MMACs/image, exits "
          f"{' '.join(f'{f:.2f}' for f in kept.exit_fractions)}")
    if not args.no_plot:
        plot = Path(args.plot or f"runs/budget-{args.dataset}-{args.method}.png")  # runs do not overwrite each other
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
    out = {"config": _config(args), "data": split.name, "num_exits": num_exits, "iterations": step,
           "train_seconds": seconds, "term_names": weighter.term_names, "gamma": weighter.gamma.tolist(),
           "gamma_history": history, "test": result.to_dict(), "val": val_result.to_dict(),
           "held_out": {"exit_losses": val_exit_losses.tolist(),
                        "objective": float(mw.BalancedValidation(num_exits, alpha=args.alpha).objective(
                            val_exit_losses))},
           "costs": costs.to_dict(), "budget": curve.to_dict(), "calibration": vars(calibration),
           "accuracy_target": {**vars(target), "test_accuracy": kept.accuracy, "test_cost": kept.cost,
                               "test_exit_fractions": kept.exit_fractions}}
    if split.y_select is not None:
        out["selection"] = _accuracy(model, split.x_select, split.y_select, device).to_dict()
        print(f"selection split top-1 per exit: {[round(a, 2) for a in out['selection']['top1']]}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    if checkpoint is not None and checkpoint.exists():  # the JSON is the finished run
        # (a symbolic link, which save_checkpoint writes through: the file it points to goes, the link stays)
        Path(os.path.realpath(checkpoint)).unlink()
    return out


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
