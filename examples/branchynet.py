"""A BranchyNet-style CNN (Teerapittayanon et al., "BranchyNet: Fast Inference via Early Exiting
from Deep Neural Networks", ICPR 2016): a plain conv trunk with side branches, built with
:class:`metaweight.MultiExit` so that ``forward`` returns the list of exit logits.

Each stage is two conv-BN-ReLU layers, the stages after the first opening with a 2x2
max-pool; each side branch is one conv-BN-ReLU, global average pooling and a linear layer.
Works on images of at least ``2 ** (num_exits - 1)`` pixels per side (each stage after the
first halves them): scikit-learn's 8x8 digits take up to 4 exits, CIFAR's 32x32 up to 6.

This file defines the model; ``python examples/train.py --model branchynet`` trains it
(``python examples/branchynet.py`` prints its exits' costs).
"""

from __future__ import annotations

from torch import nn

import metaweight as mw


def _conv(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def branchynet(num_classes: int = 10, in_channels: int = 3, *, num_exits: int = 3, width: int = 32,
               branch_width: int = 32) -> mw.MultiExit:
    """A ``num_exits``-exit CNN; stage ``k`` has ``width * 2**k`` channels."""
    stages, heads = [], []
    c_in = in_channels
    for k in range(num_exits):
        c_out = width * 2**k
        layers = ([nn.MaxPool2d(2)] if k > 0 else []) + _conv(c_in, c_out) + _conv(c_out, c_out)
        stages.append(nn.Sequential(*layers))
        heads.append(nn.Sequential(*_conv(c_out, branch_width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                   nn.Linear(branch_width, num_classes)))
        c_in = c_out
    return mw.MultiExit(stages, heads)


if __name__ == "__main__":
    import argparse

    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exits", type=int, default=3, help="number of exits (default: %(default)s)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default: %(default)s)")
    args = parser.parse_args()
    if args.size < 2 ** (args.exits - 1):
        parser.error(f"{args.exits} exits need images of at least {2 ** (args.exits - 1)} pixels per side")
    net = branchynet(10, num_exits=args.exits)
    print(mw.exit_costs(net, torch.randn(1, 3, args.size, args.size), executed=True))
