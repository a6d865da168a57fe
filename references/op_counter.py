"""MSDNet's way of costing each exit (Huang et al. 2018, the public code's ``op_counter.py``), written
from its description: one forward of a single sample, every leaf layer counted in the order it runs,
and exit ``k`` charged the running total when classifier ``k``'s linear layer runs, i.e. every op run
before it (the finer scales of block ``k`` that only later exits need included).

Only the multiply-adds of convolutions and linear layers (weights, no bias) are counted here: those
are what ``metaweight.exit_costs`` counts. MSDNet's counter also counts ReLU and pooling (and a
linear layer's bias), which this leaves out.
"""

from __future__ import annotations

import torch
from torch import nn


def msdnet_exit_macs(model: nn.Module, example: torch.Tensor, classifier_linears: list[nn.Linear]) -> list[int]:
    """Cumulative conv and linear multiply-adds of one sample at each classifier's linear layer."""
    total, at_exits = [0], []

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            total[0] += (module.in_channels // module.groups) * module.out_channels * \
                module.kernel_size[0] * module.kernel_size[1] * output.shape[-2] * output.shape[-1]
        elif isinstance(module, nn.Linear):
            total[0] += module.in_features * module.out_features
            if any(module is linear for linear in classifier_linears):
                at_exits.append(total[0])

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    return at_exits
