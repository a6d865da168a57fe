"""Parameters that move outside the step the weighter scores, seen from fingerprints taken on the device.

The meta-gradient is that of one optimizer's step: :math:`\\theta' = \\theta - U(g)` over the
parameters that optimizer holds, the others fixed. Anything else that moves the parameters makes
that step another one, which no look-ahead replays: a second optimizer over some of the model's
parameters (an optimizer over the heads, another over the trunk), weight decay written by hand
between ``backward()`` and ``optimizer.step()``, a ``p.clamp_()`` or a projection after the step and
before ``meta_step``. Such moves are seen in two ways.

Within the fast two-call form's step, by comparing a fingerprint of the trainable parameters, the
float64 norm of each (``torch._foreach_norm``: a few kernels on a GPU, no host read of its own), at
each ``loss()`` (the gradients were taken there: a loss at a perturbed point, as
sharpness-aware minimization's second forward, is another step), before and after the optimizer's
step, and at ``meta_step`` (the validation gradient is taken at the parameters the step left); the
comparison is read with the step's one read. Between iterations the parameters may change (a
checkpoint reloaded, a projection after ``meta_step``): the next step starts from where they are.

Another optimizer's step, as it happens: one process-wide optimizer step post-hook
(``torch.optim.optimizer.register_optimizer_step_post_hook``, registered with the first weighter)
notes, for each weighter alive, a step of any other optimizer holding one of its model's parameters
(a second optimizer over the heads while the weighter's holds everything); the next meta step
refuses. It costs an identity test per optimizer step, and a scan of the parameters of optimizers
other than the weighters'.

What a norm cannot see: a move that keeps every parameter's norm to the last bit of float64 (a
permutation of a tensor's entries, a sign flip of a whole tensor).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from metaweight._hooks import OwnHook


@torch.no_grad()
def fingerprint(params: Sequence[Tensor]) -> Tensor | None:
    """The float64 norm of each of ``params``, stacked on the first one's device (``None`` for none)."""
    if not params:
        return None
    device = params[0].device
    norms = torch._foreach_norm([p.detach() for p in params], 2, dtype=torch.float64)
    return torch.stack([n.to(device) for n in norms])


def moved(before: Tensor | None, after: Tensor | None) -> Tensor:
    """On the device: whether any parameter's fingerprint differs (NaN equal to NaN: a parameter that
    was already NaN did not move by being NaN)."""
    if before is None or after is None:
        return torch.zeros((), dtype=torch.bool)
    if before.shape != after.shape:
        return torch.ones((), dtype=torch.bool, device=after.device)
    return moved_each(before, after).any()


def moved_each(before: Tensor, after: Tensor) -> Tensor:
    """On ``before``'s device: whether each tensor's fingerprint differs (two fingerprints of the same tensors; NaN
    equal to NaN)."""
    after = after.to(before.device)
    return (before != after) & ~(before.isnan() & after.isnan())


def shapes_of(tensors: Sequence[Tensor]) -> str:
    """The shapes of the first four of ``tensors``, for a message (``(5, 10), (5,) ...``)."""
    return ", ".join(str(tuple(p.shape)) for p in tensors[:4]) + (" ..." if len(tensors) > 4 else "")


def frozen_with_grad(optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> list[str]:
    """Parameters the optimizer holds that do not require gradients but have a ``.grad`` (zeroed with
    ``zero_grad(set_to_none=False)`` after being frozen): torch's optimizers step every parameter with a
    gradient, so weight decay, momentum and Adam's moments still move them (Python objects only)."""
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]
               if not p.requires_grad and p.grad is not None}
    return [n for n, p in module.named_parameters() if id(p) in stepped] if stepped else []


FROZEN_WITH_GRAD = (
    "The parameters {names} do not require gradients but have a .grad tensor (frozen after the backward that gave "
    "it, before optimizer.step(); or frozen, then zeroed with zero_grad(set_to_none=False)): torch's optimizer still "
    "steps them (on that gradient; weight decay, momentum, Adam's moments move a parameter whose gradient is zero), "
    "a move the meta-gradient does not see. Freeze between optimizer.step() and the next backward, zero with "
    "optimizer.zero_grad(set_to_none=True) (the default), set their .grad to None when you freeze them, or take them "
    "out of the optimizer.")

MOVED_BEFORE_STEP = (
    "The parameters changed between weighter.loss() and optimizer.step() by something other than the optimizer (e.g. "
    "weight decay written by hand, p.mul_(1 - lr * wd), or another optimizer's step): the gradients were taken at "
    "other parameters than those the step started from, and mode='fast' cannot score that step. Let the optimizer do "
    "it (weight_decay=, or AdamW for decoupled decay), do it after meta_step, or use mode='exact'. gamma is "
    "unchanged.")

MOVED_AFTER_STEP = (
    "The parameters changed between optimizer.step() and meta_step by something other than the step (e.g. "
    "p.clamp_(), a projection or renormalisation, another optimizer's step): mode='fast' scores the parameters the "
    "step left, and the change is not part of it. Call meta_step right after optimizer.step() and change the "
    "parameters after it. gamma is unchanged.")


FOREIGN_STEP = (
    "Another optimizer ({name}) stepped parameters of the model since the last meta step: the meta-gradient is that of "
    "the weighter's optimizer's step, and a second optimizer's move of the same model (it depends on gamma too, "
    "through the gradients) is not part of it. Give the weighter the one optimizer that steps the model (parameter "
    "groups for different settings); if you replaced the optimizer, build a new weighter with it (load the old "
    "one's state_dict to keep gamma). gamma and everything else are unchanged.")


class ForeignSteps(OwnHook):
    """The process-wide optimizer step post-hook: marks the weighters whose model another optimizer
    stepped (``weighter._foreign_step``, the optimizer's class name), for :data:`FOREIGN_STEP`; and, in
    the exact mode, those whose own optimizer stepped frozen parameters holding a ``.grad``
    (``weighter._frozen_step``, their names), for :data:`FROZEN_WITH_GRAD`."""

    watched: weakref.WeakSet = weakref.WeakSet()
    handle: Any = None

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for weighter in list(self.watched):
            if optimizer is weighter._inner_optimizer:
                if weighter.mode == "exact" and weighter._frozen_step is None:  # (the fast mode's capture checks)
                    weighter._frozen_step = frozen_with_grad(optimizer, weighter.module) or None
                continue
            if optimizer is weighter.gamma_optimizer or weighter._foreign_step is not None:
                continue
            if self._holds(optimizer, weighter):
                weighter._foreign_step = type(optimizer).__name__

    _seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> {weighter: (sizes, holds)}

    def _holds(self, optimizer: torch.optim.Optimizer, weighter: Any) -> bool:
        """Whether ``optimizer`` holds a parameter of ``weighter``'s model; the scan is redone only when
        the optimizer's parameter groups or the model's parameters change in number."""
        sizes = (tuple(len(group["params"]) for group in optimizer.param_groups),
                 sum(1 for _ in weighter.module.parameters()))
        known = self._seen.setdefault(optimizer, weakref.WeakKeyDictionary())  # (by the weighter: an id is reused)
        cached = known.get(weighter)
        if cached is not None and cached[0] == sizes:
            return cached[1]
        mine = {id(p) for p in weighter.module.parameters()}
        holds = any(id(p) in mine for group in optimizer.param_groups for p in group["params"])
        known[weighter] = (sizes, holds)
        return holds

    @classmethod
    def watch(cls, weighter: Any) -> None:
        """Watch ``weighter``'s model from now on (weakly)."""
        if cls.handle is None:
            cls.handle = register_optimizer_step_post_hook(cls())
        cls.watched.add(weighter)


def outside_model(optimizer: torch.optim.Optimizer, parameters: Iterable[Tensor]) -> list[Tensor]:
    """The trainable tensors ``optimizer`` holds that are not among ``parameters`` (the model's: a criterion's
    learned scale in a group of its own). Python objects only."""
    own = {id(p) for p in parameters}
    return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad and id(p) not in own]
