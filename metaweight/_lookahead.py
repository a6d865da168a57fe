"""The look-ahead weights :math:`\\theta'` as a differentiable function of :math:`\\gamma` (higher backend).

`higher`'s differentiable optimizers replay an optimizer step on fast weights while recording
the graph. The replayed step itself is :mod:`metaweight._optimizers`'s; the state of the
user's optimizer is copied, never written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import higher
import higher.optim
import higher.patch
import torch
from torch import nn

from metaweight._optimizers import differentiable_optimizer_type


class _Group(nn.Module):
    """What a bare ``nn.Module()`` (a container grouping children, no forward of its own) is while ``higher``
    copies the model: its patched class derives from the module's class and from ``higher``'s base, itself an
    ``nn.Module``, which for ``nn.Module`` itself has no consistent method resolution order (a ``TypeError``)."""


@contextlib.contextmanager
def patchable(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Inside the block, ``higher`` can copy the model of ``modules`` (its walk): each bare ``nn.Module()`` is
    a :class:`_Group` (the same object and attributes; its class put back on exit)."""
    bare = [m for m in modules if type(m) is nn.Module]
    for m in bare:
        m.__class__ = _Group
    try:
        yield
    finally:
        for m in bare:
            m.__class__ = nn.Module


def patched_call(fmodel: nn.Module, args: Any, kwargs: Any) -> Any:
    """``fmodel(*args, **kwargs)``, refused with a ``ValueError`` where the forward built a submodule on the patched
    copy (``self.mask = nn.Identity()`` at the first call): ``higher`` cannot run a module it did not patch (an
    ``AttributeError`` on ``_param_names``, or the module's own parameters, which the look-ahead does not move).
    The model itself is not touched by that forward."""
    try:
        out = fmodel(*args, **kwargs)
    except Exception:
        _refuse_built(fmodel)
        raise
    _refuse_built(fmodel)
    return out


def _refuse_built(fmodel: nn.Module) -> None:
    for name, m in fmodel.named_modules():
        if not isinstance(m, higher.patch._MonkeyPatchBase):
            raise ValueError(
                f"The model's forward built a submodule ({name} = {type(m).__name__}(...)): backend='higher' runs a "
                f"patched copy of the model made before the forward, which cannot run a module built inside it. "
                f"Build it in __init__ (or call the model once before building the weighter), or use backend='jvp' "
                f"or 'finite_difference', which run the model itself. gamma and everything else are unchanged."
            ) from None


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
