"""The default step length of the finite differences (``mode="fast"``'s one-sided difference, order 1;
``backend="finite_difference"``'s central one, order 2): the relative error of gamma's gradient against
``backend="jvp"`` in float64 at the same point, for lengths ``factor * eps ** (1 / (order + 1)) * RMS(theta)``.

For each model and optimizer: a few plain steps for real optimizer state, then at each of ``--points``
points the reference (``jvp`` on a float64 copy of the model and the optimizer's state) and, for each
factor, the meta-gradient of a copy (the fast mode's after its real step, or the exact mode's
``finite_difference``) with ``fd_epsilon`` set to that length. Random data; fixed seeds. Prints each
point's errors and their median per factor. Usage::

    python benchmarks/step_length.py --models mlp branchynet msdnet --optimizers nesterov adamw --order 1
    python benchmarks/step_length.py --models mlp --order 2 --factors 1 4 16 --dtype float64
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import metaweight as mw  # noqa: E402
from branchynet import branchynet  # noqa: E402
from msdnet import msdnet_cifar  # noqa: E402


def mlp() -> tuple[nn.Module, int, tuple[int, ...], int]:
    """A 3-exit Tanh MLP, 20 features, width 32, 4 classes."""
    k, d, h, c = 3, 20, 32, 4
    stages = [nn.Sequential(nn.Linear(d, h), nn.Tanh())] + [nn.Sequential(nn.Linear(h, h), nn.Tanh()) for _ in range(k - 1)]
    return mw.MultiExit(stages, [nn.Linear(h, c) for _ in range(k)]), k, (d,), c


MODELS = {
    "mlp": mlp,
    "branchynet": lambda: (branchynet(10, 3, num_exits=3, width=16, branch_width=16), 3, (3, 32, 32), 10),
    "msdnet": lambda: (msdnet_cifar(10, 8), 8, (3, 32, 32), 10),
}
OPTIMIZERS = {
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3),
}


def validation_objective(outputs: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    return sum(F.cross_entropy(o, y) for o in outputs)


def run(model_name: str, optimizer_name: str, order: int, factors: list[float], batch: int, dtype: torch.dtype,
        points: int) -> dict[float, list[float]]:
    torch.manual_seed(0)
    model, k, shape, classes = MODELS[model_name]()
    model = model.to(dtype)
    generator = torch.Generator().manual_seed(1)

    def data() -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(batch, *shape, generator=generator).to(dtype),
                torch.randint(0, classes, (batch,), generator=generator))

    make = OPTIMIZERS[optimizer_name]
    optimizer = make(model.parameters())
    criterion = mw.DenseDistillLoss(k)

    def plain_step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad()
        sum(F.cross_entropy(o, y) for o in model(x)).backward()
        optimizer.step()

    for _ in range(3):  # real optimizer state
        plain_step(*data())
    n = sum(p.numel() for p in model.parameters())
    rms = math.sqrt(sum(float((p.double() ** 2).sum()) for p in model.parameters()) / n)
    unit = torch.finfo(dtype).eps ** (1 / (order + 1)) * max(rms, 1e-3)
    print(f"{model_name} {optimizer_name} {str(dtype)[6:]} order {order}: {n} parameters, RMS {rms:.3g}", flush=True)
    errors: dict[float, list[float]] = {f: [] for f in factors}
    for point in range(points):
        train, val = data(), data()
        twin = copy.deepcopy(model).double()
        twin_opt = make(twin.parameters())
        twin_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        ref = mw.HarmonizedWeighter(twin, twin_opt, criterion, validation_objective, gamma_optimizer="sgd",
                                    gamma_lr=0.0, check_gradients=False).meta_step(
            (train[0].double(), train[1]), (val[0].double(), val[1])).gamma_grad.double()
        for factor in factors:
            copy_model = copy.deepcopy(model)
            copy_opt = make(copy_model.parameters())
            copy_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
            options = dict(mode="fast") if order == 1 else dict(backend="finite_difference")
            w = mw.HarmonizedWeighter(copy_model, copy_opt, criterion, validation_objective, gamma_optimizer="sgd",
                                      gamma_lr=0.0, check_gradients=False, fd_epsilon=factor * unit, **options)
            if order == 1:
                copy_opt.zero_grad()
                w.loss(copy_model(train[0]), train[1]).backward()
                copy_opt.step()
            got = w.meta_step(train, val).gamma_grad.double()
            errors[factor].append(float((got - ref).norm() / ref.norm()))
        plain_step(*train)
        print(f"  point {point}: " + ", ".join(f"{f:g}: {e[-1]:.2g}" for f, e in errors.items()), flush=True)
    print("  median: " + ", ".join(f"{f:g}: {statistics.median(e):.2g}" for f, e in errors.items()), flush=True)
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "branchynet", "msdnet"], choices=sorted(MODELS))
    parser.add_argument("--optimizers", nargs="+", default=["nesterov", "adamw"], choices=sorted(OPTIMIZERS))
    parser.add_argument("--order", type=int, default=1, choices=[1, 2], help="1: the fast mode's, 2: central")
    parser.add_argument("--factors", nargs="+", type=float, default=[1, 4, 16, 64, 256, 1024])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--points", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    for model_name in args.models:
        for optimizer_name in args.optimizers:
            run(model_name, optimizer_name, args.order, args.factors, args.batch, getattr(torch, args.dtype),
                args.points)


if __name__ == "__main__":
    main()
