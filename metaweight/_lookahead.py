"""The look-ahead weights :math:`\\theta'` as a differentiable function of :math:`\\gamma` (higher backend).

`higher`'s differentiable optimizers replay an optimizer step on fast weights while recording
the graph. The replayed step itself is :mod:`metaweight._optimizers`'s; the state of the
user's optimizer is copied, never written.
"""

from __future__ import annotations

import higher
import higher.optim
import torch
from torch import nn

from metaweight._optimizers import differentiable_optimizer_type


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
