"""Replaying the user's optimizer: one place for its update, its Jacobian and its checks.

The look-ahead :math:`\\theta' = \\theta - U(g)` needs the step the user's optimizer *would* take,
without taking it. Two front ends use the same arithmetic:

* :func:`lookahead_update` — the step out of place from the optimizer's current state, and its
  diagonal Jacobian :math:`D = \\partial U / \\partial g` (the ``jvp`` and ``finite_difference``
  backends);
* :class:`DifferentiableAdam` / :class:`DifferentiableAdamW` — the same step inside `higher`'s
  differentiable optimizers (the ``higher`` backend; higher's own SGD matches torch's, its Adam
  puts ``eps`` elsewhere and it has no AdamW).

Adam's moments and denominator are written once, in :func:`_adam_moments`. Nothing here writes
to the user's optimizer or its state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import higher
import higher.optim
import torch
from torch import Tensor, nn

EXACT_UPDATE_TYPES = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def supports_exact_update(optimizer: torch.optim.Optimizer) -> bool:
    """Whether :func:`lookahead_update` knows this optimizer's step in closed form."""
    return type(optimizer) in EXACT_UPDATE_TYPES


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers such as Accelerate's AcceleratedOptimizer or Lightning's."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if supports_exact_update(optimizer) or not isinstance(inner, torch.optim.Optimizer):
            return optimizer
        optimizer = inner
    return optimizer


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


# ----------------------------------------------------------------------------------------- Adam, once
def _safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` whose gradient is 0, not inf, where ``x == 0`` (entries with no gradient yet)."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def _adam_moments(p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any], decoupled: bool,
                  ) -> dict[str, Any]:
    """One Adam/AdamW/AMSGrad step from ``state``, out of place and differentiable, as torch.optim computes it.

    Returns the new parameter (``new``), the new moments (``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq`` with AMSGrad), ``step``, and what the Jacobian needs: ``d`` (the gradient
    after coupled weight decay), ``second`` (the second moment used), ``flows`` (where it depends
    on this step's gradient), ``denom``, ``bc1``, ``sbc2`` and ``lr``.
    """
    beta1, beta2 = (float(b) for b in group["betas"])
    lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
    step = int(state.get("step", 0)) + 1
    base, d = p, g
    if wd:
        if decoupled:
            base = p * (1 - lr * wd)
        else:
            d = g + wd * p
    m0, v0 = state.get("exp_avg"), state.get("exp_avg_sq")
    m = d * (1 - beta1) if m0 is None else m0 * beta1 + d * (1 - beta1)
    v = d * d * (1 - beta2) if v0 is None else v0 * beta2 + d * d * (1 - beta2)
    second, flows, vmax = v, v > 0, None
    if group.get("amsgrad", False):
        vmax0 = state.get("max_exp_avg_sq")
        if vmax0 is not None:
            second = torch.maximum(vmax0, v)
            flows = flows & (v > vmax0)
        vmax = second
    bc1, sbc2 = 1 - beta1**step, math.sqrt(1 - beta2**step)
    denom = _safe_sqrt(second) / sbc2 + eps
    return {"new": base - (lr / bc1) * m / denom, "exp_avg": m, "exp_avg_sq": v, "max_exp_avg_sq": vmax,
            "step": step, "d": d, "second": second, "flows": flows, "denom": denom, "bc1": bc1, "sbc2": sbc2,
            "lr": lr, "beta2": beta2}


def _sgd_step(p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> tuple[Tensor, float]:
    """One SGD step (momentum, dampening, Nesterov, weight decay) and its constant dU/dg."""
    lr, wd = float(group["lr"]), float(group["weight_decay"])
    mu, damp, nesterov = float(group["momentum"]), float(group["dampening"]), bool(group["nesterov"])
    d = g + wd * p if wd else g
    c = 1.0
    if mu:
        buf0 = state.get("momentum_buffer")
        buf, c_buf = (d, 1.0) if buf0 is None else (buf0 * mu + d * (1 - damp), 1 - damp)
        d, c = (d + mu * buf, 1 + mu * c_buf) if nesterov else (buf, c_buf)
    return p - lr * d, lr * c


def lookahead_update(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor], grads: Sequence[Tensor | None]
) -> tuple[list[Tensor], list[Tensor | float]]:
    """One step of ``optimizer`` from ``params`` with ``grads``, out of place, and its diagonal Jacobian.

    Returns ``(new_params, D)`` with ``new_params[i] = params[i] - U(grads)[i]`` exactly as
    ``optimizer.step()`` would compute it from its current state, and ``D[i] = dU_i/dg_i``
    (a tensor, or a float where it is constant). Parameters the optimizer does not hold, or
    without a gradient, stay where they are with ``D = 0``. Nothing is written anywhere.
    """
    where = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    new: list[Tensor] = []
    jac: list[Tensor | float] = []
    adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    decoupled = isinstance(optimizer, torch.optim.AdamW)
    for p, g in zip(params, grads):
        group = where.get(id(p))
        if group is None or g is None:
            new.append(p.detach())
            jac.append(0.0)
            continue
        state = optimizer.state.get(p, {})  # keyed by the parameter itself: look up before detaching
        p, g = p.detach(), g.detach()
        if adam:
            a = _adam_moments(p, g, state, group, decoupled)
            new.append(a["new"])
            sq = a["second"].sqrt()
            flows = a["flows"]
            # d U / d g = lr/bc1 * ((1-beta1)/denom - m * d(denom)/dg / denom^2), d(sqrt v)/dg = (1-beta2) d / sqrt v
            dsq = torch.where(flows, (1 - a["beta2"]) * a["d"] / torch.where(flows, sq, torch.ones_like(sq)),
                              torch.zeros_like(sq))
            beta1 = float(group["betas"][0])
            jac.append((a["lr"] / a["bc1"]) * ((1 - beta1) / a["denom"]
                                                - a["exp_avg"] * (dsq / a["sbc2"]) / (a["denom"] * a["denom"])))
        else:
            p_new, c = _sgd_step(p, g, state, group)
            new.append(p_new)
            jac.append(c)
    return new, jac


class DifferentiableAdam(higher.optim.DifferentiableOptimizer):
    """``torch.optim.Adam`` (and AdamW with ``decoupled=True``) as a differentiable step for `higher`."""

    decoupled = False

    def _update(self, grouped_grads, **kwargs) -> None:  # type: ignore[no-untyped-def]
        for group_idx, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
            for p_idx, (p, g) in enumerate(zip(group["params"], grads)):
                if g is None:
                    continue
                state = self.state[group_idx][p_idx]
                a = _adam_moments(p, g, state, group, self.decoupled)
                state.update(step=a["step"], exp_avg=a["exp_avg"], exp_avg_sq=a["exp_avg_sq"])
                if a["max_exp_avg_sq"] is not None:
                    state["max_exp_avg_sq"] = a["max_exp_avg_sq"]
                group["params"][p_idx] = a["new"]


class DifferentiableAdamW(DifferentiableAdam):
    """``torch.optim.AdamW`` as a differentiable step (decoupled weight decay)."""

    decoupled = True


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

