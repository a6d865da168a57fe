import random
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import metaweight as mw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # references/: the oracles


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same seeds, and leaves torch's process-wide settings as it found them (Lightning's
    ``Trainer(deterministic=True)`` turns deterministic algorithms on for the process, whose filling of new
    memory then showed in a later test's op count)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    settings = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.get_default_dtype(), torch.get_num_threads())
    yield
    if settings != (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                    torch.get_default_dtype(), torch.get_num_threads()):
        torch.use_deterministic_algorithms(settings[0], warn_only=settings[1])
        torch.set_default_dtype(settings[2])
        torch.set_num_threads(settings[3])


def tiny_net(num_exits: int = 3, features: int = 6, width: int = 10, classes: int = 5,
             dtype: torch.dtype = torch.float32, batchnorm: bool = True) -> mw.MultiExit:
    """A small multi-exit MLP with BatchNorm and smooth activations (finite differences behave)."""
    stages = []
    for k in range(num_exits):
        layers: list[nn.Module] = [nn.Linear(features if k == 0 else width, width)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(nn.Tanh())
        stages.append(nn.Sequential(*layers))
    heads = [nn.Linear(width, classes) for _ in range(num_exits)]
    return mw.MultiExit(stages, heads).to(dtype)


def batch(n: int = 16, features: int = 6, classes: int = 5, dtype: torch.dtype = torch.float32):
    return torch.randn(n, features, dtype=dtype), torch.randint(0, classes, (n,))


class ScaledLoss(nn.Module):
    """DenseDistillLoss times a learned scale of its own (``log_s``): a criterion's parameter, which an optimizer
    may hold beside the model's."""

    def __init__(self, num_exits: int = 3):
        super().__init__()
        self.inner, self.num_exits = mw.DenseDistillLoss(num_exits), num_exits
        self.log_s = nn.Parameter(torch.zeros(()))

    def forward(self, outputs, y, teacher_outputs=None):
        return self.inner(outputs, y, teacher_outputs=teacher_outputs) * self.log_s.exp()

    term_names = property(lambda self: self.inner.term_names)


def fast_two_calls(weighter, model, optimizer, train, val):
    """One iteration of the user's own loop with mode="fast": loss, backward, step, then the meta step."""
    optimizer.zero_grad()
    weighter.loss(model(train[0]), train[1]).backward()
    optimizer.step()
    return weighter.meta_step(train, val)


@contextmanager
def quiet():
    """Warnings silenced, for calls that warn by design (skipped steps)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
