"""Evaluation mode for a while, then every module's own train/eval mode back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule of ``model`` in eval mode, and give each its own mode back afterwards.

    ``model.train(was)`` would not do: it sets every submodule to the top-level mode, so a
    BatchNorm the user froze in a training model (``model.train(); model.bn.eval()``) would come
    back in training mode and its running statistics would move again.
    """
    training = [m for m in model.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield
    finally:
        for m in training:
            m.training = True
