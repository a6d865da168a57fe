"""A custom term beside the paper's: a feature hint between exits, harmonized with dense distillation.

The model returns its exit logits *and* each stage's pooled features. The criterion is the
paper's dense distillation (``DenseDistillLoss``) on the logits plus, for every exit but the
last, a hint: the mean squared distance of the exit's features (through a small projection)
to the last stage's features, held fixed. The held-out objective stays HDKD's balanced one on
the logits, through ``mw.OnOutputs``, which keeps its moving average (updated and checkpointed).

    python examples/hint_terms.py           # about 30 seconds on 2 CPU cores
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import metaweight as mw  # noqa: E402
from data import load_digits  # noqa: E402


class HintNet(nn.Module):
    """A small CNN with an exit after each stage; forward returns logits and pooled features."""

    def __init__(self, num_exits: int = 3, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        chans = [width * 2**k for k in range(num_exits)]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(1 if k == 0 else chans[k - 1], c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
            for k, c in enumerate(chans))
        self.heads = nn.ModuleList(nn.Linear(c, classes) for c in chans)
        self.project = nn.ModuleList(nn.Linear(c, chans[-1]) for c in chans[:-1])  # exit features -> last's

    def forward(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        logits, features = [], []
        for stage, head in zip(self.stages, self.heads):
            x = stage(x)
            f = x.mean((2, 3))
            logits.append(head(f))
            features.append(f)
        hints = [proj(f) for proj, f in zip(self.project, features[:-1])]
        return {"logits": logits, "hints": hints, "last": features[-1]}


class KDPlusHints(nn.Module):
    """Dense distillation's K + K(K-1)/2 terms on the logits, then one hint term per early exit."""

    def __init__(self, num_exits: int, temperature: float = 3.0) -> None:
        super().__init__()
        self.kd = mw.DenseDistillLoss(num_exits, temperature)
        self.term_names = self.kd.term_names + [f"hint[{num_exits}->{k + 1}]" for k in range(num_exits - 1)]

    def forward(self, outputs: dict[str, Any], target: torch.Tensor, teacher_outputs: Any = None) -> torch.Tensor:
        fixed = teacher_outputs if teacher_outputs is not None else outputs  # the targets, held fixed
        kd = self.kd(outputs["logits"], target, teacher_outputs=fixed["logits"] if teacher_outputs is not None else None)
        target_features = fixed["last"].detach()
        hints = [F.mse_loss(h, target_features) for h in outputs["hints"]]
        return torch.cat([kd, torch.stack(hints)])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    split = load_digits(seed=args.seed)
    model = HintNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    weighter = mw.HarmonizedWeighter(model, optimizer, KDPlusHints(3),
                                     mw.OnOutputs(mw.BalancedValidation(3), "logits"), gamma_optimizer="adam",
                                     gamma_lr=0.01)
    train = [(split.x_train[i:i + 64], split.y_train[i:i + 64]) for i in range(0, len(split.y_train), 64)]
    val = itertools.cycle([(split.x_val[i:i + 64], split.y_val[i:i + 64]) for i in range(0, len(split.y_val), 64)])
    for _ in range(args.epochs):
        for batch in train:
            weighter.step(batch, next(val))
    model.eval()
    with torch.no_grad():
        logits = torch.stack(model(split.x_test)["logits"])
    result = mw.anytime_accuracy_from_logits(logits, split.y_test, topk=(1,))
    print(result)
    print("learned weights:", {k: round(v, 3) for k, v in weighter.gamma_dict().items()})
    return {"top1": result.accuracy[1], "gamma": weighter.gamma_dict()}


if __name__ == "__main__":
    torch.set_num_threads(1)  # a small model: one thread is fastest, and several fight over a busy machine's cores
    main()
