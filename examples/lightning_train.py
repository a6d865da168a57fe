"""HDKD with PyTorch Lightning: BranchyNet on scikit-learn's digits, the meta step in a callback.

    pip install lightning
    python examples/lightning_train.py --method hdkd --max-steps 300
    python examples/lightning_train.py --method famo --max-steps 300    # or uw, dwa, gradnorm, rlw, sdn
    python examples/lightning_train.py --mode fast --accumulate-grad-batches 4 --gradient-clip-val 1.0

The Trainer's gradient accumulation and clipping by norm are the callback's to read: with
``--mode fast`` the meta step scores the clipped step on the accumulated batches (the clipping is
declared to the weighter); ``--mode exact`` looks ahead before the step, unclipped, on the first
batch of each accumulated step (docs/guides/distributed.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

import metaweight as mw  # noqa: E402
from branchynet import branchynet  # noqa: E402
from data import load_digits  # noqa: E402
from metaweight.lightning import HarmonizedCallback, WeightingCallback  # noqa: E402


class MultiExitModule(lightning.LightningModule):
    """Any multi-exit network as a LightningModule; the loss comes from the callback's weighter."""

    def __init__(self, net: torch.nn.Module, lr: float = 0.1) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.weighter.loss(self(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, nesterov=True, weight_decay=1e-4)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="hdkd", choices=list(mw.METHODS) + list(mw.WEIGHTINGS))
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", default="exact", choices=["exact", "fast"],
                   help="fast: the meta step after each optimizer step (docs/guides/cost.md)")
    p.add_argument("--accumulate-grad-batches", type=int, default=1, help="the Trainer's accumulate_grad_batches")
    p.add_argument("--gradient-clip-val", type=float, default=None,
                   help="the Trainer's gradient_clip_val (clipping by the 2-norm of all gradients)")
    args = p.parse_args(argv)
    lightning.seed_everything(args.seed, verbose=False)
    split = load_digits(seed=args.seed)
    train_loader = DataLoader(TensorDataset(split.x_train, split.y_train), batch_size=64, shuffle=True, drop_last=True)
    val_loader = DataLoader(TensorDataset(split.x_val, split.y_val), batch_size=64, shuffle=True)
    module = MultiExitModule(branchynet(10, 1, num_exits=3, width=16, branch_width=16))
    if args.method in mw.WEIGHTINGS:
        criterion = mw.DenseDistillLoss(3)
        steps = len(train_loader)
        options = {"dwa": {"window": steps}, "rlw": {"seed": args.seed},
                   "gradnorm": {"shared_parameters": [module.net.stages[0][3].weight]},  # stage 1's last conv
                   "sdn": {"epochs": -(-args.max_steps // steps), "steps_per_epoch": steps}}.get(args.method, {})
        callback = WeightingCallback(lambda model, optimizer: mw.WEIGHTINGS[args.method](model, optimizer, criterion,
                                                                                          **options))
    else:
        method = mw.preset(args.method, 3)
        callback = HarmonizedCallback(method.criterion, val_loader, **method.weighter_options, gamma_lr=0.01,
                                      mode=args.mode)
    trainer = lightning.Trainer(max_steps=args.max_steps, accelerator="cpu", devices=1, logger=False, callbacks=[callback],
                                enable_checkpointing=False, enable_model_summary=False,
                                enable_progress_bar=sys.stderr.isatty(),
                                accumulate_grad_batches=args.accumulate_grad_batches,
                                gradient_clip_val=args.gradient_clip_val)
    trainer.fit(module, train_loader)
    result = mw.anytime_accuracy(module.net, [(split.x_test, split.y_test)], topk=(1,))
    print(f"\nper-exit test accuracy ({args.method}, digits, Lightning):")
    print(result)
    return {"test": result.to_dict(), "gamma": module.weighter.gamma_dict(), "steps": trainer.global_step}


if __name__ == "__main__":
    main()
