"""The training loop to copy: HDKD inside a plain PyTorch loop, in the two-call form.

Your model, data, optimizer and schedule stay yours; metaweight adds a held-out batch per
iteration and two calls. (``examples/train.py`` is the full command-line job behind the
reproduction; this file is what to read first.)

    python examples/loop.py                 # scikit-learn digits, a 3-exit CNN; about 40 s on one CPU core of a busy machine
    python examples/loop.py --epochs 2      # a shorter run
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import metaweight as mw  # noqa: E402
from branchynet import branchynet  # noqa: E402
from data import load_digits  # noqa: E402


def main(epochs: int = 15) -> mw.AnytimeResult:
    torch.manual_seed(0)
    data = load_digits()                                   # train / held-out validation / test
    model = branchynet(10, in_channels=1, num_exits=3, width=16, branch_width=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    batches = [(data.x_train[i:i + 64], data.y_train[i:i + 64]) for i in range(0, len(data.y_train), 64)]
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(batches))
    held_out = itertools.cycle([(data.x_val[i:i + 64], data.y_val[i:i + 64]) for i in range(0, len(data.y_val), 64)])

    method = mw.preset("hdkd", num_exits=3, temperature=3.0)          # or msdnet, dbt, naive_dkd, ...
    weighter = method.weighter(model, optimizer, mw.BalancedValidation(3))

    for _ in range(epochs):
        model.train()
        for x, y in batches:
            weighter.meta_step((x, y), next(held_out))    # 1. learn the loss weights on a held-out batch
            loss = weighter.loss(model(x), y)              # 2. the weighted loss, for your own backward
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()

    result = mw.anytime_accuracy(model, [(data.x_test, data.y_test)], topk=(1,))
    print(result)
    print({name: round(g, 3) for name, g in weighter.gamma_dict().items()})
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15, help="passes over the training split (default: %(default)s)")
    epochs = parser.parse_args().epochs
    # this model's ops are too small to split across threads: one is fastest, and on a busy machine
    # several threads fight over the cores (as examples/train.py's --threads says)
    torch.set_num_threads(1)
    main(epochs)
