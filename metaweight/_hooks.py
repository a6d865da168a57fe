"""Hooks in the user's model: which ones the look-ahead can replay, checked at every meta step.

A hook changes what the model computes, or the gradient its optimizer steps on, outside what the
weighter can see: the look-ahead must compute at :math:`\\theta'` what the model computes there and
take the step the model takes. Hooks can be added at any time, so :func:`check_hooks` reads every
kind of hook at construction and again before every meta step, reading only Python dicts (no
tensor operation, no host read), and refuses, with a ``ValueError`` naming the hooks, those it
cannot replay:

* gradient hooks on parameters (``Tensor.register_hook``) and post-accumulate-grad hooks
  (``Tensor.register_post_accumulate_grad_hook``) change the gradient the optimizer steps on in
  ways no replay knows (``higher`` runs a copy of the parameters that carries no hooks; the
  closed-form replays and the fast mode's difference know the optimizer, not the hook): refused in
  every mode and backend;
* module backward hooks and pre-hooks (``register_full_backward_hook``,
  ``register_full_backward_pre_hook``, ``register_backward_hook``, and the global ones of
  ``torch.nn.modules.module``) change the gradients flowing through the model: refused in every
  mode and backend;
* module forward hooks and pre-hooks (and the global ones) change the model's outputs: the
  ``jvp`` and ``finite_difference`` backends and the fast mode run the model through
  ``functional_call``, which runs them; ``higher`` runs a patched copy of each module's
  ``forward`` without them: refused there. The legacy ``torch.nn.utils.spectral_norm`` (a forward
  pre-hook) is refused in every mode and backend, pointing to its parametrization, which they run.

Optimizer step hooks (per optimizer or global, pre or post: :func:`check_optimizer_hooks`) can
change the gradients a step uses or the parameters it leaves: refused in every mode and backend.

The weighter's own hooks (the fast mode's forward hooks on the model and step hook on the
optimizer) are passed over.
"""

from __future__ import annotations

import types
from collections.abc import Collection
from typing import Any

from torch import nn
from torch.nn.modules import module as _module
from torch.nn.utils.spectral_norm import SpectralNorm as _LegacySpectralNorm
from torch.optim import Optimizer
from torch.optim import optimizer as _optim

from metaweight._walk import walk

_REMOVE = ("Remove the hooks (hook.remove() on the handle register_* returned) for the weighter's meta steps: scale "
           "the loss or the learning rate instead of the gradients, clip with torch.nn.utils.clip_grad_norm_ "
           "declared by clip_grad_norm= (mode='fast'), or pass learn=False to keep the loss weights fixed. gamma and "
           "everything else are unchanged.")


def _names(found: list[str]) -> list[str]:
    return [n or "(the model)" for n in found]


def check_hooks(module: nn.Module, mode: str, backend: str | None, own: Collection[int] = ()) -> None:
    """Raise a ``ValueError`` naming the hooks of ``module`` (and the global module hooks) that the
    look-ahead of ``mode`` (``backend`` for ``mode="exact"``) would not run as the model's step
    does; ``own`` are the ids of the weighter's own hook handles."""
    walked = walk(module)
    # (one pass over the modules and one over the parameters, each dict tested for being empty first: this runs
    # before every meta step, where one pass per kind of hook, each a generator per module, took about 1 ms on the
    # CIFAR MSDNet's 770 modules)
    higher = mode == "exact" and backend == "higher"
    legacy: list[str] = []
    backward: list[str] = []
    forward: list[str] = []
    for n, m in walked.modules:
        pre = m._forward_pre_hooks
        if pre and any(isinstance(h, _LegacySpectralNorm) for h in pre.values()):
            legacy.append(n)
        if (m._backward_hooks or m._backward_pre_hooks) and \
                (_foreign(m._backward_hooks, own) or _foreign(m._backward_pre_hooks, own)):
            backward.append(n)
        if higher and (m._forward_hooks or pre) and (_foreign(m._forward_hooks, own) or _foreign(pre, own)):
            forward.append(n)
    if legacy:  # (each backend refused it by another's fix: higher its hooks, jvp and finite_difference a
        # stop-gradient)
        raise ValueError(
            f"The modules {_names(legacy)} use the legacy torch.nn.utils.spectral_norm, whose forward pre-hook runs "
            f"the power iteration: backend='higher' does not run forward hooks, and the other backends' check finds "
            f"its gradient differs from the derivative of its values (0.3% on a small MLP). Use "
            f"torch.nn.utils.parametrizations.spectral_norm instead, which every backend and mode='exact' runs. gamma "
            f"and everything else are unchanged.")
    gradient: list[str] = []
    accumulate: list[str] = []
    for n, p in walked.parameters:
        if p.requires_grad:
            if p._backward_hooks:
                gradient.append(n)
            if getattr(p, "_post_accumulate_grad_hooks", None):
                accumulate.append(n)
    where = f"mode={mode!r}" if mode == "fast" else f"backend={backend!r}"
    if gradient or accumulate:
        kinds = ([f"gradient hooks (Tensor.register_hook) on {gradient}"] if gradient else []) + \
            ([f"post-accumulate-grad hooks (Tensor.register_post_accumulate_grad_hook) on {accumulate}"]
             if accumulate else [])
        raise ValueError(
            f"The parameters have {' and '.join(kinds)}, which change the gradient the optimizer steps on; the "
            f"look-ahead ({where}; no mode or backend can) does not replay them, so its meta-gradient would be that "
            f"of another step. {_REMOVE}")
    if backward or _module._global_backward_hooks or _module._global_backward_pre_hooks:
        raise ValueError(
            f"The modules {_names(backward) or '(all: global hooks of torch.nn.modules.module)'} have backward "
            f"hooks (register_full_backward_hook, register_full_backward_pre_hook or register_backward_hook), which "
            f"change the gradients flowing through the model; the look-ahead ({where}; no mode or backend can) "
            f"does not replay them. {_REMOVE}")
    if higher and (forward or _module._global_forward_hooks or _module._global_forward_pre_hooks):
        raise ValueError(
            f"The modules {_names(forward) or '(all: global hooks of torch.nn.modules.module)'} have forward "
            f"hooks, which backend='higher' does not run (it runs a patched copy of each module's forward). Use "
            f"backend='jvp' or 'finite_difference', which run the model as it is. gamma and everything else "
            f"are unchanged.")


class OwnHook:
    """The class of the library's own hooks (a ``mode="fast"`` weighter's forward watch and step hooks, the
    process-wide optimizer step counters), which record and change nothing: the hook checks pass over them, a
    dropped weighter's and another weighter's too. Known by class, never by an attribute, which a user's hook
    object could answer (a ``unittest.mock.Mock`` answers any; a config object's ``__getattr__`` may raise)."""


def is_own_hook(hook: Any) -> bool:
    """Whether ``hook`` (the object or a bound method of it) is one of :class:`OwnHook`'s."""
    return isinstance(hook.__self__ if isinstance(hook, types.MethodType) else hook, OwnHook)


def check_optimizer_hooks(optimizer: Optimizer, own: Collection[int] = ()) -> None:
    """Raise a ``ValueError`` if ``optimizer`` (or every optimizer: the global hooks of
    ``torch.optim.optimizer``) has step pre- or post-hooks other than the weighter's own (``own``,
    handle ids): a pre-hook can change the gradients the step uses, a post-hook the parameters it
    leaves (e.g. a value clip, a clamp), and no look-ahead replays either."""
    hooks = {**getattr(optimizer, "_optimizer_step_pre_hooks", {}),
             **getattr(optimizer, "_optimizer_step_post_hooks", {})}
    mine = [k for k, hook in hooks.items() if k not in own and not is_own_hook(hook)]
    shared = any(not is_own_hook(hook) for hook in
                 (*_optim._global_optimizer_pre_hooks.values(), *_optim._global_optimizer_post_hooks.values()))
    if mine or shared:
        where = ("the optimizer has step hooks (register_step_pre_hook / register_step_post_hook)" if mine else
                 "every optimizer has step hooks (torch.optim.optimizer.register_optimizer_step_pre_hook / "
                 "register_optimizer_step_post_hook)")
        raise ValueError(f"{where[0].upper()}{where[1:]}: they can change the gradients a step uses or the parameters "
                         f"it leaves, which the look-ahead does not replay, so its meta-gradient would be that of "
                         f"another step. {_REMOVE}")


def _foreign(hooks: dict[int, object] | None, own: Collection[int]) -> bool:
    """Whether ``hooks`` hold one that is neither this weighter's (``own``) nor any weighter's (:class:`OwnHook`:
    a ``mode="fast"`` weighter's forward watch, which only records, left by a dropped weighter or held by another
    on the same model)."""
    return bool(hooks) and any(k not in own and not is_own_hook(h) for k, h in hooks.items())
