"""Differentiable copies of the user's optimizer for the one-step look-ahead (higher backend).

`higher`'s differentiable optimizers replay an optimizer step on fast weights while
recording the graph, so that the look-ahead weights :math:`\\theta'` are a differentiable
function of the loss weights :math:`\\gamma`. We use higher's SGD as it is (it matches
``torch.optim.SGD``); higher's Adam puts ``eps`` elsewhere than ``torch.optim.Adam`` and
higher has no AdamW, so those two are written here, following torch's update exactly.
The state of the user's optimizer is copied, never written.
"""

from __future__ import annotations

import math

import higher
import higher.optim
import torch
from torch import Tensor, nn


def _safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` whose gradient is 0, not inf, where ``x == 0`` (entries with no gradient yet)."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


class DifferentiableAdam(higher.optim.DifferentiableOptimizer):
    """``torch.optim.Adam`` (and AdamW with ``decoupled=True``) as a differentiable step."""

    decoupled = False

    def _update(self, grouped_grads, **kwargs) -> None:  # type: ignore[no-untyped-def]
        for group_idx, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
            beta1, beta2 = (float(b) for b in group["betas"])
            lr, eps, weight_decay = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
            for p_idx, (p, g) in enumerate(zip(group["params"], grads)):
                if g is None:
                    continue
                state = self.state[group_idx][p_idx]
                step = int(state.get("step", 0)) + 1
                exp_avg = state.get("exp_avg", torch.zeros_like(p))
                exp_avg_sq = state.get("exp_avg_sq", torch.zeros_like(p))
                if weight_decay != 0:
                    if self.decoupled:
                        p = p * (1 - lr * weight_decay)
                    else:
                        g = g + weight_decay * p
                exp_avg = exp_avg * beta1 + (1 - beta1) * g
                exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * g * g
                second = exp_avg_sq
                if group.get("amsgrad", False):
                    second = torch.maximum(state.get("max_exp_avg_sq", torch.zeros_like(p)), exp_avg_sq)
                    state["max_exp_avg_sq"] = second
                bias_correction1 = 1 - beta1**step
                bias_correction2 = 1 - beta2**step
                denom = _safe_sqrt(second) / math.sqrt(bias_correction2) + eps
                state.update(step=step, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
                group["params"][p_idx] = p - (lr / bias_correction1) * exp_avg / denom


class DifferentiableAdamW(DifferentiableAdam):
    """``torch.optim.AdamW`` as a differentiable step (decoupled weight decay)."""

    decoupled = True


# Exact types first: AdamW is not a subclass of Adam in torch, but keep the lookup explicit.
_OURS: dict[type, type] = {
    torch.optim.SGD: higher.optim.DifferentiableSGD,
    torch.optim.Adam: DifferentiableAdam,
    torch.optim.AdamW: DifferentiableAdamW,
}


def differentiable_optimizer_type(optimizer: torch.optim.Optimizer) -> type:
    """The differentiable optimizer class that replays ``optimizer``'s step, or a TypeError."""
    for torch_type, diff_type in _OURS.items():
        if type(optimizer) is torch_type:
            return diff_type
    higher_types = higher.optim._opt_mapping  # Adagrad, RMSprop, ... as higher implements them
    if type(optimizer) in higher_types:
        return higher_types[type(optimizer)]
    supported = sorted({t.__name__ for t in _OURS} | {t.__name__ for t in higher_types})
    raise TypeError(
        f"The look-ahead cannot replay a `{type(optimizer).__name__}` step. Supported optimizers: "
        f"{', '.join(supported)}. Use one of them, or pass learn=False to keep the loss weights fixed."
    )


def check_optimizer_options(optimizer: torch.optim.Optimizer) -> None:
    """Reject optimizer options the look-ahead would silently get wrong."""
    for i, group in enumerate(optimizer.param_groups):
        if group.get("maximize", False):
            raise ValueError(
                f"Parameter group {i} of the optimizer has maximize=True; the look-ahead assumes the "
                f"optimizer minimizes the training loss. Use maximize=False."
            )
        if isinstance(optimizer, torch.optim.SGD) and group.get("dampening", 0) and group.get("nesterov", False):
            raise ValueError("Nesterov momentum requires dampening=0, as in torch.optim.SGD.")


def check_optimizer_covers_model(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Every parameter the optimizer updates must be a parameter of the model."""
    model_params = {id(p) for p in model.parameters()}
    for i, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in model_params:
                raise ValueError(
                    f"Parameter group {i} of the optimizer holds a tensor of shape {tuple(p.shape)} that is not "
                    f"a parameter of the model. Give HarmonizedWeighter the model whose parameters the "
                    f"optimizer updates (for DistributedDataParallel, the wrapped model)."
                )


def lookahead(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[nn.Module, higher.optim.DifferentiableOptimizer]:
    """A functional copy of ``model`` and a differentiable copy of ``optimizer`` for one look-ahead step.

    The functional model starts from the model's own parameters (no copy) and holds
    its own copies of the buffers, so running it in train mode leaves BatchNorm
    statistics of ``model`` untouched. The differentiable optimizer copies the
    optimizer's hyper-parameters (read now, so schedulers are respected) and state.
    """
    fmodel = higher.patch.monkeypatch(model, copy_initial_weights=False, track_higher_grads=True)
    diffopt = differentiable_optimizer_type(optimizer)(
        optimizer, model.parameters(), fmodel=fmodel, track_higher_grads=True
    )
    return fmodel, diffopt
