"""A plain ResNet written the ordinary way, made multi-exit without touching its code.

``ResNet`` below is what a codebase already has (He et al. 2016's CIFAR layout: a stem, three
stages of basic blocks, pooling and a linear classifier). Exits go after ``layer1`` and
``layer2`` by name; the model's own output is the last exit:

    model = mw.attach_exits(resnet, ["layer1", "layer2"],
                            lambda name, f: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                                          nn.Linear(f.shape[1], 10)),
                            example_input=x[:2])

    python examples/resnet.py               # HDKD on scikit-learn's digits; ~1 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import metaweight as mw  # noqa: E402
from data import load_digits  # noqa: E402


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.drop = nn.Dropout(dropout)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(self.drop(out)))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small CIFAR-style ResNet: ``layer1``..``layer3`` of basic blocks, then ``fc``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16, blocks: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, c = [], width
        for k in range(3):
            c_out = width * 2**k
            layers.append(nn.Sequential(*[BasicBlock(c if b == 0 else c_out, c_out, 2 if (k and b == 0) else 1,
                                                     dropout) for b in range(blocks)]))
            c = c_out
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


def exit_head(name: str, features: torch.Tensor, num_classes: int = 10) -> nn.Module:
    """Pool the stage's feature map and classify it."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(features.shape[1], num_classes))


def main(argv: list[str] | None = None) -> mw.AnytimeResult:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=10)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    data = load_digits()
    resnet = ResNet(10, in_channels=1, width=16)
    model = mw.attach_exits(resnet, ["layer1", "layer2"], exit_head, example_input=data.x_train[:2])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    weighter = mw.preset("hdkd", model.num_exits).weighter(model, optimizer)
    train = [(data.x_train[i:i + 64], data.y_train[i:i + 64]) for i in range(0, len(data.y_train), 64)]
    val = itertools.cycle([(data.x_val[i:i + 64], data.y_val[i:i + 64]) for i in range(0, len(data.y_val), 64)])
    for _ in range(args.epochs):
        model.train()
        for batch in train:
            weighter.step(batch, next(val))
    result = mw.anytime_accuracy(model, [(data.x_test, data.y_test)], topk=(1,))
    print(result)
    return result


if __name__ == "__main__":
    main()
