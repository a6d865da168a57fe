"""Short-horizon bias, measured: does distillation pay off only over many steps?

HDKD's one-step look-ahead scores each loss weight by how one training step on it moves the
held-out loss. Here the same question is asked at longer horizons. From points along a
NaiveDKD run (uniform weights; the grid's 4-exit CNN at width 8 on CIFAR-10(150), seed 0),
every arm trains ``H`` more steps on the same batches with the same augmentation, one group of
weights scaled by ``1 +/- delta``: the distillation (KD) terms, or the cross-entropy (CE)
terms. The response of the held-out loss, summed over the exits, to that scale is the central
difference

    dL/ds_group ~ (L(1 + delta) - L(1 - delta)) / (2 delta)

at H = 1, 10, 100, 400 (H = 1 is what the look-ahead sees; a negative value: more weight on
the group lowers the held-out loss). The held-out data is the selection split (100 images per
class from CIFAR-10's training images outside the pool: never trained on, not the test set),
scored twice: with the batch's own BatchNorm statistics, as the meta step scores it, and in
eval mode, as the network is used. At H = 1 the exact meta-gradient of the library (the same
criterion, the summed cross-entropy as objective, the selection split as validation batch),
``sum_k in group gamma_k dL/dgamma_k``, is given beside it.

    python benchmarks/horizon.py --data-dir ../shared/data/cifar10-jpg.tar.gz

Writes ``results/cpu/cifar10-150/horizon/horizon.json`` and ``report.md`` (resumable: finished
(start, replicate) cells are kept).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import metaweight as mw  # noqa: E402
from branchynet import branchynet  # noqa: E402
from data import load_cifar  # noqa: E402
from report import half_width  # noqa: E402
from train import epoch_batches  # noqa: E402

HORIZONS = [1, 10, 100, 400]
GROUPS = ["KD", "CE"]


def held_out(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """The summed cross-entropy over the exits (and mean top-1) on ``(x, y)``: with the batch's
    own BatchNorm statistics (``batch``, as the meta step scores it) and in eval mode (``eval``)."""
    out = {}
    with torch.no_grad():
        probe = copy.deepcopy(model).train()  # a copy: its running statistics move, the model's do not
        logits = probe(x)
        out["batch"] = float(sum(F.cross_entropy(z, y) for z in logits))
        training = [m for m in model.modules() if m.training]  # each module's own mode comes back, not model's
        model.eval()
        logits = [torch.cat(z) for z in zip(*(model(x[i:i + 500]) for i in range(0, len(y), 500)))]
        for m in training:
            m.train()
        exits = [float(F.cross_entropy(z, y)) for z in logits]
        top1 = [float((z.argmax(1) == y).float().mean()) * 100 for z in logits]
        out["eval"], out["eval_top1"] = sum(exits), statistics.fmean(top1)
        out["eval_exit1"], out["eval_top1_exit1"] = exits[0], top1[0]
        out["eval_last"], out["eval_top1_last"] = exits[-1], top1[-1]
    return out


def train_steps(model, optimizer, scheduler, criterion, gamma, split, seed: int, step: int, steps: int,
                steps_per_epoch: int, batch_size: int, evaluate_at=(), on_eval=None) -> int:
    """``steps`` iterations of the weighted loss ``gamma . terms`` from iteration ``step``; batches
    are a function of (seed, iteration), so every arm sees the same ones."""
    done = 0
    while done < steps:
        epoch, offset = divmod(step, steps_per_epoch)
        for xb, yb in epoch_batches(split.x_train, split.y_train, batch_size, seed, epoch, epoch * steps_per_epoch,
                                    True, start=offset):
            loss = (gamma * criterion(model(xb), yb)).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            done += 1
            if done in evaluate_at and on_eval is not None:
                on_eval(done)
            if done >= steps:
                break
    return step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--starts", nargs="+", type=int, default=[300, 900, 1300],
                   help="iterations of the NaiveDKD run to start from (of 2,100; lr 0.1 until 1,050, 0.01 to 1,575)")
    p.add_argument("--replicates", type=int, default=2, help="batch orders per start")
    p.add_argument("--delta", type=float, default=0.5)
    p.add_argument("--horizons", nargs="+", type=int, default=HORIZONS)
    p.add_argument("--out", default=str(ROOT / "results" / "cpu" / "cifar10-150" / "horizon"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result_file = out_dir / "horizon.json"
    results = json.loads(result_file.read_text()) if result_file.exists() else {"cells": []}
    results.update(setting="cifar10-150, branchynet 4 exits width 8, NaiveDKD seed 0, 100 epochs' schedule",
                   delta=args.delta, horizons=args.horizons, held_out="selection split, 100 per class")

    seed, epochs, batch_size = 0, 100, 64
    torch.manual_seed(seed)
    split = load_cifar(args.data_dir, per_class=150, seed=seed, select_per_class=100)
    model = branchynet(10, 3, num_exits=4, width=8, branch_width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    steps_per_epoch = len(split.y_train) // batch_size
    total = steps_per_epoch * epochs
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[int(0.5 * total), int(0.75 * total)],
                                                     gamma=0.1)
    method = mw.preset("naive_dkd", 4)
    criterion = method.criterion
    names = criterion.term_names
    gamma = criterion.active.float()
    groups = {g: torch.tensor([n.startswith(g.lower()) for n in names]) & criterion.active for g in GROUPS}
    assert all(groups[g].any() for g in GROUPS), names

    def restore(state: tuple[dict, dict, dict]) -> None:
        """Model, optimizer and schedule back to a start point (``load_state_dict`` keeps the optimizer's
        tensors, which its steps then change in place: it gets a copy)."""
        model.load_state_dict(state[0])
        optimizer.load_state_dict(copy.deepcopy(state[1]))
        scheduler.load_state_dict(state[2])
    xs, ys = split.x_select, split.y_select

    step = 0
    model.train()
    for start in sorted(args.starts):
        step = train_steps(model, optimizer, scheduler, criterion, gamma, split, seed, step, start - step,
                           steps_per_epoch, batch_size)
        state = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), scheduler.state_dict())
        for r in range(args.replicates):
            if any(c["start"] == start and c["replicate"] == r for c in results["cells"]):
                continue
            t0 = time.time()
            batch_seed = 100 + r
            # the exact one-step meta-gradient, on the first batch of this replicate
            restore(state)
            epoch, offset = divmod(start, steps_per_epoch)
            xb, yb = next(epoch_batches(split.x_train, split.y_train, batch_size, batch_seed, epoch,
                                        epoch * steps_per_epoch, True, start=offset))
            probe = copy.deepcopy(model)
            probe_opt = torch.optim.SGD(probe.parameters(), lr=0.1)
            probe_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
            w = mw.preset("hdkd", 4).weighter(probe, probe_opt, mw.BalancedValidation(4, alpha=1.0))
            grad = w.meta_step((xb, yb), (xs, ys))["gamma_grad"]
            exact = {g: float((gamma * grad)[groups[g]].sum()) for g in GROUPS}
            base = held_out(model, xs, ys)
            cell = {"start": start, "replicate": r, "lr": optimizer.param_groups[0]["lr"], "exact_one_step": exact,
                    "base": base, "arms": {}}
            for g in GROUPS:
                for sign in (+1, -1):
                    scaled = gamma.clone()
                    scaled[groups[g]] *= 1 + sign * args.delta
                    restore(state)
                    scores = {}
                    train_steps(model, optimizer, scheduler, criterion, scaled, split, batch_seed, start,
                                max(args.horizons), steps_per_epoch, batch_size, evaluate_at=set(args.horizons),
                                on_eval=lambda h: scores.__setitem__(str(h), held_out(model, xs, ys)))
                    cell["arms"][f"{g}{'+' if sign > 0 else '-'}"] = scores
            cell["seconds"] = time.time() - t0
            results["cells"].append(cell)
            result_file.write_text(json.dumps(results, indent=1))
            print(f"start {start} replicate {r}: {cell['seconds']:.0f}s", flush=True)
        restore(state)
    (out_dir / "report.md").write_text(report(results))
    print(report(results))


def _interval(values: list[float]) -> str:
    """``mean ± half-width`` of the 95% t-interval over the replicates."""
    mean, half = statistics.fmean(values), half_width(values)
    return f"{mean:+.4f}" if math.isnan(half) else f"{mean:+.4f} ± {half:.4f}"


def report(results: dict) -> str:
    """The slope in each group's scale per start and horizon, mean ± 95% interval over the
    replicates (batch orders), and KD − CE paired within each replicate; the exact one-step
    meta-gradient beside the H = 1 row."""
    delta = results["delta"]
    lines = [f"Central differences in the scale of the KD or CE weights (delta = {delta}), from points of a "
             f"NaiveDKD run; mean ± 95% interval over the batch orders (n per start in the first column). "
             f"KD − CE > 0: the held-out measure favours the CE weights over the KD weights.", ""]
    for stat, title in (("batch", "held-out loss (summed CE over exits), BatchNorm batch statistics (as the "
                                  "meta step scores it); negative: more weight lowers the loss"),
                        ("eval", "held-out loss, eval mode (as the network is used)"),
                        ("eval_top1", "held-out top-1 (mean over exits, points), eval mode; positive: more "
                                      "weight raises accuracy"),
                        ("eval_exit1", "exit 1's held-out loss, eval mode"),
                        ("eval_top1_exit1", "exit 1's held-out top-1 (points), eval mode"),
                        ("eval_last", "the last exit's held-out loss, eval mode"),
                        ("eval_top1_last", "the last exit's held-out top-1 (points), eval mode")):
        d = "dA/ds" if "top1" in stat else "dL/ds"
        have = [c for c in results["cells"] if stat in c["base"]]  # per-exit scores: later runs only
        if not have:
            continue
        lines += [f"**{title}**", "", f"| start (lr, n) | H | {d} KD | {d} CE | KD − CE |", "|---|---|---|---|---|"]
        for start in sorted({c["start"] for c in have}):
            cells = [c for c in have if c["start"] == start]
            head = f"{start} ({cells[0]['lr']:g}, {len(cells)})"
            if stat == "batch":
                ex = {g: [c["exact_one_step"][g] for c in cells] for g in GROUPS}
                lines.append(f"| {head} | exact, 1 | {_interval(ex['KD'])} | {_interval(ex['CE'])} | "
                             f"{_interval([a - b for a, b in zip(ex['KD'], ex['CE'])])} |")
            for h in results["horizons"]:
                slopes = {g: [(c["arms"][f"{g}+"][str(h)][stat] - c["arms"][f"{g}-"][str(h)][stat]) / (2 * delta)
                              for c in cells] for g in GROUPS}
                diff = [a - b for a, b in zip(slopes["KD"], slopes["CE"])]
                lines.append(f"| {head} | {h} | {_interval(slopes['KD'])} | {_interval(slopes['CE'])} | "
                             f"{_interval(diff)} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
