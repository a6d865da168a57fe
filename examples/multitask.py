"""Harmonized weights for a model that is not multi-exit: a shared trunk with two task heads.

The weighter takes any vector of named loss terms. Here scikit-learn's digits give two tasks
from one image: which digit (10 classes, cross-entropy) and how much ink (a regression,
mean squared error), plus an auxiliary term (a penalty on the regression head's output). The
held-out objective is the digit error plus the ink error; the weighter learns how much each
training term should count for it.

    python examples/multitask.py            # about 10 seconds on 2 CPU cores
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


class TwoTasks(nn.Module):
    """A shared trunk, a classification head and a regression head; returns both outputs in a dict."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.digit = nn.Linear(width, 10)
        self.ink = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {"digit": self.digit(h), "ink": self.ink(h).squeeze(-1)}


class TaskTerms(nn.Module):
    """The training terms, one per name."""

    term_names = ("digit_ce", "ink_mse", "ink_aux")

    def forward(self, outputs: dict[str, torch.Tensor], target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        digit, ink = target
        return torch.stack([F.cross_entropy(outputs["digit"], digit), F.mse_loss(outputs["ink"], ink),
                            outputs["ink"].pow(2).mean()])


def held_out_objective(outputs: dict[str, torch.Tensor], target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    digit, ink = target
    return F.cross_entropy(outputs["digit"], digit) + F.mse_loss(outputs["ink"], ink)


def ink_of(x: torch.Tensor) -> torch.Tensor:
    """The second task's raw target: the image's mean intensity."""
    return x.flatten(1).mean(1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    split = load_digits(seed=args.seed)
    model = TwoTasks()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    weighter = mw.HarmonizedWeighter(model, optimizer, TaskTerms(), held_out_objective,
                                     gamma_optimizer="adam", gamma_lr=0.01)
    mean, std = ink_of(split.x_train).mean(), ink_of(split.x_train).std()  # standardised by the training set

    def with_ink(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        return x, (y, (ink_of(x) - mean) / std)

    train = [with_ink(split.x_train[i:i + 64], split.y_train[i:i + 64]) for i in range(0, len(split.y_train), 64)]
    val = itertools.cycle([with_ink(split.x_val[i:i + 64], split.y_val[i:i + 64])
                           for i in range(0, len(split.y_val), 64)])
    for _ in range(args.epochs):
        for batch in train:
            weighter.step(batch, next(val))
    model.eval()
    with torch.no_grad():
        x, (digit, ink) = with_ink(split.x_test, split.y_test)
        out = model(x)
        accuracy = float((out["digit"].argmax(1) == digit).float().mean() * 100)
        ink_error = float(F.mse_loss(out["ink"], ink))
    print(f"test: digit accuracy {accuracy:.2f}%, ink mean squared error {ink_error:.4f}")
    print("learned weights:", {k: round(v, 3) for k, v in weighter.gamma_dict().items()})
    return {"accuracy": accuracy, "ink_error": ink_error, "gamma": weighter.gamma_dict()}


if __name__ == "__main__":
    torch.set_num_threads(1)  # a small model: one thread is fastest, and several fight over a busy machine's cores
    main()
