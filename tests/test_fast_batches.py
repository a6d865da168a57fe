"""mode="fast", two-call form: a ``loss()`` whose result no backward reaches is no part of the step.

A ``loss()`` for logging (on the training forward's outputs, or on another forward's) used to take the forward's
record away from the real ``loss()`` (refused: "came from no forward of the model"), or to count as a micro-batch
that changed the gradients (refused after a declared clipping); in mode="exact" it hid the warning of a meta_step
after the step. The meta-gradient is the plain loop's, to rounding: each run is compared with the plain loop on
twins of the model, optimizer and weighter (float64, the same random numbers for the training forward and for the
meta step).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaweight as mw

F64 = torch.float64


# ------------------------------------------------------------------------------ a loss() for logging
class Net(nn.Module):
    """Three exits, dropout: a forward the weighter takes for the training one replays other random numbers."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList([nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8)])
        self.heads = nn.ModuleList([nn.Linear(8, 4) for _ in range(3)])
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, outputs = x, []
        for stage, head in zip(self.stages, self.heads):
            h = self.drop(torch.tanh(stage(h)))
            outputs.append(head(h))
        return outputs


def logging_setup(clip: float | None = None):
    torch.manual_seed(0)
    model = Net().to(F64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3, temperature=2.0), mw.BalancedValidation(3),
                              mode="fast", gamma_optimizer="sgd", init=torch.tensor([1.0, 0.7, 1.3, 0.5, 0.9, 1.1]),
                              **({"clip_grad_norm": mw.ClipGradNorm(clip)} if clip is not None else {}))
    return model, optimizer, w


def run_logged(log: str, micro_batches: int = 1, clip: float | None = None):
    """One iteration of the loop with the ``loss()`` for logging ``log`` (``""``: none) placed where it is named;
    the training forwards and the meta step under fixed random numbers. Returns the meta step's record."""
    model, optimizer, w = logging_setup(clip)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, dtype=F64, generator=g), torch.randint(0, 4, (16,), generator=g)
    val = torch.randn(16, 6, dtype=F64, generator=g), torch.randint(0, 4, (16,), generator=g)

    def logged(outputs, target):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(w.loss(outputs, target))  # (its result reaches no backward)

    optimizer.zero_grad()
    for i, (xi, yi) in enumerate(zip(x.chunk(micro_batches), y.chunk(micro_batches))):
        if log == "another forward, before the training forward":
            logged(model(val[0]), val[1])
        torch.manual_seed(100 + i)  # the training forward's random numbers, whatever came before
        out = model(xi)
        if log == "the same outputs, before the loss":
            logged(out, yi)
        elif log == "another forward, between the training forward and its loss":
            logged(model(val[0]), val[1])
        elif log == "another forward's outputs, taken between the training forward and its loss":
            other = model(val[0])
        loss = w.loss(out, yi) / micro_batches
        if log == "another forward's outputs, taken between the training forward and its loss":
            logged(other, val[1])
        loss.backward()
        if log == "the same outputs, after the backward":
            logged(out, yi)
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    if log == "the same outputs, after the clipping":
        logged(out, yi)
    optimizer.step()
    torch.manual_seed(7)  # the meta step's own random numbers
    record = w.meta_step((x, y), val)
    assert record.ran and not record.skipped, record.message
    return record


LOGS = ["the same outputs, before the loss", "another forward, between the training forward and its loss",
        "another forward's outputs, taken between the training forward and its loss",
        "another forward, before the training forward", "the same outputs, after the backward",
        "the same outputs, after the clipping"]


def test_a_loss_for_logging_is_no_part_of_the_step():
    """Every placement of a loss() for logging, alone, with accumulation and with a declared clipping: the
    meta-gradient is the plain loop's (the first three were refused as outputs of no forward, the last as a
    change of the gradients between two backwards)."""
    for micro_batches in (1, 2):
        for clip in (None, 0.05):
            plain = run_logged("", micro_batches, clip)
            assert plain.gamma_grad.abs().max() > 0
            for log in LOGS:
                if log == "the same outputs, after the clipping" and clip is None:
                    continue
                record = run_logged(log, micro_batches, clip)
                err = float((record.gamma_grad.double() - plain.gamma_grad.double()).norm()
                            / plain.gamma_grad.double().norm())
                assert err < 1e-9, (log, micro_batches, clip, err)


def test_what_the_watch_cannot_tell_is_said_as_it_is():
    """More forwards with gradients between the training forward and its loss() than the weighter keeps: refused
    saying so (it said the outputs came from no forward of the model, and to call model(x)); a loss() for logging
    another forward's outputs after the training loss, with no backward yet: meta_step warns that it came before
    the backward (it refused the batch as another than the loss() before it)."""
    model, optimizer, w = logging_setup()
    x, y = torch.randn(16, 6, dtype=F64), torch.randint(0, 4, (16,))
    out = model(x)
    for _ in range(4):
        model(x)  # (views for logging, with gradients)
    optimizer.zero_grad()
    w.loss(out, y).backward()
    optimizer.step()
    with pytest.raises(ValueError, match=r"more than 4 other forwards with gradients enabled followed.*keeps the "
                                         r"records.*last 4 forwards only.*torch.no_grad\(\)"):
        w.meta_step((x, y), (x, y))

    model, optimizer, w = logging_setup()
    w.loss(model(x), y)
    float(w.loss(model(x + 1), torch.zeros_like(y)))
    with pytest.warns(RuntimeWarning, match=r"meta_step came before loss.backward\(\)"):
        assert w.meta_step((x, y), (x, y)).skipped


@pytest.mark.parametrize("log", ["the same outputs", "another forward"])
def test_a_loss_for_logging_leaves_the_exact_mode_s_order_warning_as_it_is(log):
    """mode="exact" warns when its first meta_step comes after the step it should precede, where the step's
    loss() calls were the batch passed; a loss() for logging (on the training outputs, or on another forward's)
    was counted as a call of the step, and the warning was not given."""
    for logged in (False, True):
        torch.manual_seed(0)
        model = Net().to(F64)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), mw.BalancedValidation(3))
        x, y = torch.randn(16, 6, dtype=F64), torch.randint(0, 4, (16,))
        out = model(x)
        if logged:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                float(w.loss(out, y) if log == "the same outputs" else w.loss(model(x + 1), y.flip(0)))
        optimizer.zero_grad()
        w.loss(out, y).backward()
        optimizer.step()
        with pytest.warns(RuntimeWarning, match=r"This loop called it after the step, on the batch already stepped"):
            w.meta_step((x, y), (x, y))
