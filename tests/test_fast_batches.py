"""mode="fast": what the loop does around its loss, and the batches it passes, are read as the loop meant them.

* A ``loss()`` whose result no backward reaches (logging: on the training forward's outputs, or on another
  forward's) is no part of the step: the meta-gradient is the plain loop's, to rounding. It used to take the
  forward's record away from the real ``loss()`` (refused: "came from no forward of the model"), or to count as
  a micro-batch that changed the gradients (refused after a declared clipping); in mode="exact" it hid the
  warning of a meta_step after the step.
* Gradient accumulation: ``meta_step`` gets the whole batch, the micro-batches concatenated in order, and cuts
  it by what each micro-batch's forward and ``loss()`` got, every tensor on its own: labels that are a tuple,
  labels flattened over tokens, inputs given as keyword arguments, a tensor each forward got whole, micro-batches
  of unequal sizes, inputs concatenated along the batch dimension of a sequence-first model. The meta-gradient is
  that of the plain loop on the whole batch, to rounding. It used to be refused unless the labels were one tensor
  with one row per input. The fast ``step()`` took validation labels only one per input.

Each run is compared with the plain loop on twins of the model, optimizer and weighter (float64, the same random
numbers for the training forward and for the meta step).
"""

from __future__ import annotations

import collections
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


# ------------------------------------------------------------------------------ gradient accumulation
class MultiTask(nn.Module):
    """A trunk and two task heads: outputs a dict, labels a tuple (classes, regression targets)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk, self.cls, self.reg = nn.Linear(6, 8), nn.Linear(8, 4), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.trunk(x))
        return {"cls": self.cls(h), "reg": self.reg(h).squeeze(-1)}


def multitask_terms(out, target):
    return torch.stack([F.cross_entropy(out["cls"], target[0]), F.mse_loss(out["reg"], target[1])])


def multitask_objective(out, target):
    return F.cross_entropy(out["cls"], target[0]) + F.mse_loss(out["reg"], target[1])


class _TwoExits(nn.Module):
    """Two stages (6 -> 8 -> 8) and two heads (8 -> 4); subclasses say how inputs reach them."""

    def __init__(self) -> None:
        super().__init__()
        self.s1, self.s2, self.h1, self.h2 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)


class Tokens(_TwoExits):
    """Inputs (B, T, 6); each exit's logits flattened over tokens, (B*T, 4)."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = torch.tanh(self.s1(x))
        b = torch.tanh(self.s2(a))
        return [self.h1(a).flatten(0, 1), self.h2(b).flatten(0, 1)]


class Keywords(_TwoExits):
    """Called with keyword arguments, model(**inputs): features and a shift every forward gets whole."""

    def forward(self, features: torch.Tensor, shift: torch.Tensor) -> list[torch.Tensor]:
        a = torch.tanh(self.s1(features + shift))
        b = torch.tanh(self.s2(a))
        return [self.h1(a), self.h2(b)]


class SequenceFirst(_TwoExits):
    """Inputs (T, B, 6), batch second (nn.LSTM's and nn.Transformer's default); logits (B, 4) per exit."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = torch.tanh(self.s1(x))
        b = torch.tanh(self.s2(a))
        return [self.h1(a).mean(0), self.h2(b).mean(0)]


def cat(parts, dim=0):
    return torch.cat(parts, dim)


def case_data(name: str, g: torch.Generator):
    """The model, criterion, objective, the micro-batches, the whole batch as the loop concatenates it, and a
    validation batch."""
    def labels(n):
        return torch.randint(0, 4, (n,), generator=g)

    sizes = {"unequal micro-batches, tuple labels": (10, 6),
             "sequence-first inputs, as many steps as samples (T == B)": (4, 4)}.get(name, (8, 8))
    if name in ("tuple labels", "unequal micro-batches, tuple labels", "tuple labels with a shared entry"):
        micro = [(torch.randn(n, 6, dtype=F64, generator=g), (labels(n), torch.randn(n, dtype=F64, generator=g)))
                 for n in sizes]
        if name == "tuple labels with a shared entry":  # a 0-dim entry each loss() gets whole (a weight)
            weight = torch.tensor(0.5, dtype=F64)
            micro = [(x, (t[0], t[1], weight)) for x, t in micro]
        whole = (cat([x for x, _ in micro]), tuple(cat([t[j] for _, t in micro]) for j in range(2)))
        if name == "tuple labels with a shared entry":
            whole = (whole[0], (*whole[1], weight))
        val = (torch.randn(16, 6, dtype=F64, generator=g), (labels(16), torch.randn(16, dtype=F64, generator=g)))
        if name == "tuple labels with a shared entry":
            val = (val[0], (*val[1], torch.tensor(0.5, dtype=F64)))

            def terms(out, target):
                return torch.stack([F.cross_entropy(out["cls"], target[0]),
                                    target[2] * F.mse_loss(out["reg"], target[1])])
        else:
            terms = multitask_terms
        terms.term_names = ("ce", "mse")
        return MultiTask(), terms, multitask_objective, micro, whole, val
    criterion, objective = mw.DenseDistillLoss(2, temperature=2.0), mw.BalancedValidation(2)
    if name == "labels flattened over tokens":
        micro = [(torch.randn(n, 3, 6, dtype=F64, generator=g), labels(3 * n)) for n in sizes]
        whole = (cat([x for x, _ in micro]), cat([y for _, y in micro]))
        return Tokens(), criterion, objective, micro, whole, (torch.randn(16, 3, 6, dtype=F64, generator=g),
                                                              labels(48))
    if name in ("keyword inputs, a tensor each forward gets whole", "a mapping that is no pytree",
                "keyword inputs, a tensor of equal values built afresh for each forward"):
        shift = torch.randn(6, dtype=F64, generator=g)
        kind = dict if name.startswith("keyword") else collections.UserDict
        # afresh: a new tensor object for each forward and for the whole batch (torch.full((6,), 0.1) in the loop)
        again = (lambda: shift.clone()) if name.endswith("afresh for each forward") else (lambda: shift)
        micro = [(kind(features=torch.randn(n, 6, dtype=F64, generator=g), shift=again()), labels(n)) for n in sizes]
        whole = (kind(features=cat([x["features"] for x, _ in micro]), shift=again()), cat([y for _, y in micro]))
        return Keywords(), criterion, objective, micro, whole, (
            kind(features=torch.randn(16, 6, dtype=F64, generator=g), shift=again()), labels(16))
    assert name in ("sequence-first inputs, concatenated along the batch",
                    "sequence-first inputs, as many steps as samples (T == B)")
    steps = sum(sizes)  # (T == B: (8, 8, 6) for the whole batch, cut along its second dimension)
    if name == "sequence-first inputs, concatenated along the batch":
        steps = 5
    micro = [(torch.randn(steps, n, 6, dtype=F64, generator=g), labels(n)) for n in sizes]
    whole = (cat([x for x, _ in micro], dim=1), cat([y for _, y in micro]))
    return SequenceFirst(), criterion, objective, micro, whole, (torch.randn(steps, 16, 6, dtype=F64, generator=g),
                                                                 labels(16))


def call(model, x):
    return model(**x) if isinstance(x, collections.abc.Mapping) else model(x)


ACCUMULATION = ["tuple labels", "unequal micro-batches, tuple labels", "tuple labels with a shared entry",
                "labels flattened over tokens", "keyword inputs, a tensor each forward gets whole",
                "a mapping that is no pytree", "sequence-first inputs, concatenated along the batch",
                "keyword inputs, a tensor of equal values built afresh for each forward",
                "sequence-first inputs, as many steps as samples (T == B)"]


def accumulated(name: str, micro_batches: bool):
    """The meta step of one iteration on the case's batch: as its micro-batches (each loss weighted by its share
    of the batch) or as the whole batch in one loss."""
    model, criterion, objective, micro, whole, val = case_data(name, torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    model = type(model)().to(F64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    w = mw.HarmonizedWeighter(model, optimizer, criterion, objective, mode="fast", gamma_optimizer="sgd",
                              term_names=list(criterion.term_names))
    optimizer.zero_grad()
    if micro_batches:
        rows = [len(y[0]) if isinstance(y, tuple) else len(y) for _, y in micro]
        for (x, y), n in zip(micro, rows):
            (w.loss(call(model, x), y) * (n / sum(rows))).backward()
    else:
        w.loss(call(model, whole[0]), whole[1]).backward()
    optimizer.step()
    record = w.meta_step(whole, val)
    assert record.ran and not record.skipped, record.message
    return record


@pytest.mark.parametrize("name", ACCUMULATION)
def test_an_accumulated_step_is_cut_by_what_each_micro_batch_got(name):
    """The whole batch, the micro-batches concatenated as the loop's data are: the meta-gradient of the
    accumulated step is that of the same step taken on the whole batch at once (each was refused)."""
    whole, parts = accumulated(name, False), accumulated(name, True)
    assert whole.gamma_grad.abs().max() > 0
    err = float((parts.gamma_grad.double() - whole.gamma_grad.double()).norm() / whole.gamma_grad.double().norm())
    assert err < 1e-7, (name, err)


def test_a_batch_that_is_not_the_micro_batches_concatenated_is_refused_saying_what_it_got():
    """Labels cut short, inputs of other sizes, a label tensor left out, one micro-batch's labels only, another
    batch of the same shapes: refused, nothing changed."""
    model, criterion, objective, micro, whole, val = case_data("tuple labels", torch.Generator().manual_seed(3))
    model = model.to(F64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    w = mw.HarmonizedWeighter(model, optimizer, criterion, objective, mode="fast", term_names=["ce", "mse"])
    optimizer.zero_grad()
    for x, y in micro:
        (w.loss(model(x), y) / 2).backward()
    optimizer.step()
    before = copy.deepcopy((w.state_dict(), model.state_dict()))
    for batch, match in [
            ((whole[0], (whole[1][0][:12], whole[1][1])),
             r"accumulated the gradients of 2 weighter.loss calls \(micro-batches of \[8, 8\] samples\).*whole "
             r"batch.*label 0 of shape \(12,\), where the micro-batches got \(8,\), \(8,\)"),
            # (a tensor of the whole's shape each got is taken as got whole, and its values compared)
            ((whole[0], (micro[0][1][0], whole[1][1])), r"labels whose values differ.*one micro-batch's labels "
                                                        r"passed for all"),
            ((whole[0], (micro[0][1][0], micro[0][1][1])), r"labels whose values differ"),
            ((whole[0][:12], whole[1]), r"accumulated the gradients of 2.*input 0 of shape \(12, 6\), where the "
                                        r"micro-batches got \(8, 6\), \(8, 6\): not their concatenation, nor a "
                                        r"tensor of the whole's shape each got whole"),
            ((whole[0], whole[1][:1]), r"accumulated the gradients of 2.*1 label tensors, where micro-batch 0 had 2"),
            ((whole[0], (whole[1][0].flip(0), whole[1][1])), r"labels whose values differ")]:
        with pytest.raises(ValueError, match=match):
            w.meta_step(batch, val)
        assert repr(copy.deepcopy((w.state_dict(), model.state_dict()))) == repr(before)
    assert w.meta_step(whole, val).ran


def test_a_tensor_built_afresh_for_each_forward_is_taken_whole_only_where_its_values_are_those_each_got():
    """A tensor of the whole's shape that each micro-batch's forward got as a new object (a shift built by
    torch.full in the loop) is passed whole (the accumulation case above; it was refused: "not their
    concatenation, nor one tensor each got whole"), its values checked: where the micro-batches got other
    values (or the whole holds others), refused, nothing changed."""
    g = torch.Generator().manual_seed(3)
    features = [torch.randn(8, 6, dtype=F64, generator=g) for _ in range(2)]
    labels = [torch.randint(0, 4, (8,), generator=g) for _ in range(2)]
    shifts = [torch.full((6,), 0.1, dtype=F64), torch.full((6,), 0.2, dtype=F64)]  # (another value each)
    val = ({"features": torch.randn(16, 6, dtype=F64, generator=g), "shift": torch.full((6,), 0.1, dtype=F64)},
           torch.randint(0, 4, (16,), generator=g))
    torch.manual_seed(0)
    model = Keywords().to(F64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(2), mw.BalancedValidation(2), mode="fast")
    optimizer.zero_grad()
    for xb, yb, shift in zip(features, labels, shifts):
        (w.loss(model(features=xb, shift=shift), yb) / 2).backward()
    optimizer.step()
    before = copy.deepcopy((w.state_dict(), model.state_dict()))
    for shift in (torch.full((6,), 0.1, dtype=F64), shifts[1].clone()):
        with pytest.raises(ValueError, match=r"inputs or labels whose values differ from those the model"):
            w.meta_step(({"features": cat(features), "shift": shift}, cat(labels)), val)
        assert repr(copy.deepcopy((w.state_dict(), model.state_dict()))) == repr(before)


def fast_step(model_type, batch, val):
    """The fast step() of a fresh model (seed 0, float64) on the batch: its record."""
    torch.manual_seed(0)
    model = model_type().to(F64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(2, temperature=2.0), mw.BalancedValidation(2),
                              mode="fast", gamma_optimizer="sgd")
    record = w.step(batch, val)
    assert record.ran and not record.skipped, record.message
    return record, w, model, optimizer


def relative(a, b):
    return float((a.gamma_grad.double() - b.gamma_grad.double()).norm() / b.gamma_grad.double().norm())


class BatchFirst(SequenceFirst):
    """SequenceFirst's twin (the same parameters from the same seed) called with (B, T, 6)."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return super().forward(x.transpose(0, 1))


@pytest.mark.parametrize("val_steps", [3, 5])
def test_the_fast_step_takes_labels_flattened_over_tokens_as_the_training_batch_has_them(val_steps):
    """step() of mode="fast" checks the validation batch before the model's step: it refused labels flattened
    over tokens ((B*T,) for inputs (B, T, 6): "8 inputs but 24 labels"), which the training batch had too and
    mode="exact" takes, and then a validation batch padded to another length than the training batch ((8, 5, 6)
    with 40 labels: "Pass 3 labels per input"). Its meta step is that of the same model given each token as an
    input of its own; a validation batch labelled otherwise than the training batch is still refused, nothing
    changed."""
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(8, 3, 6, dtype=F64, generator=g), torch.randint(0, 4, (24,), generator=g)
    xv = torch.randn(8, val_steps, 6, dtype=F64, generator=g)
    yv = torch.randint(0, 4, (8 * val_steps,), generator=g)
    tokens, _, _, _ = fast_step(Tokens, (x, y), (xv, yv))
    # (each token an input of its own: one label per input)
    own, w, model, optimizer = fast_step(Tokens, (x.reshape(24, 1, 6), y), (xv.reshape(-1, 1, 6), yv))
    assert relative(tokens, own) < 1e-9
    before = copy.deepcopy((w.state_dict(), model.state_dict(), optimizer.state_dict()))
    with pytest.raises(ValueError, match=r"validation batch has inputs of shape \(24, 1, 6\) but 8 labels, where 24 "
                                         r"would be labelled as the training batch is \(24 labels for inputs of shape "
                                         r"\(24, 1, 6\)\)"):
        w.step((x.reshape(24, 1, 6), y), (xv[:, :3].reshape(24, 1, 6), yv[:8]))
    assert repr(copy.deepcopy((w.state_dict(), model.state_dict(), optimizer.state_dict()))) == repr(before)
    torch.manual_seed(0)
    model = Tokens().to(F64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(2), mw.BalancedValidation(2), mode="fast")
    before = copy.deepcopy((w.state_dict(), model.state_dict(), optimizer.state_dict()))
    for labels in (8, 8 * val_steps + 8, 8 * val_steps - 1):  # (one per input; a whole multiple of 8 too)
        with pytest.raises(ValueError, match=rf"validation batch has inputs of shape \(8, {val_steps}, 6\) but "
                                             rf"{labels} labels, where {8 * val_steps} would be labelled as the "
                                             rf"training batch is \(24 labels for inputs of shape \(8, 3, 6\)\)"):
            w.step((x, y), (xv, torch.randint(0, 4, (labels,), generator=g)))
        assert repr(copy.deepcopy((w.state_dict(), model.state_dict(), optimizer.state_dict()))) == repr(before)


@pytest.mark.parametrize("steps", [5, 8])
def test_the_fast_step_takes_sequence_first_batches(steps):
    """step() of mode="fast" refused a sequence-first validation batch ((T, B, 6), B labels: "The validation
    batch has 5 inputs but 16 labels"): its meta step is that of the batch-first twin. Training batches with
    T == B (steps=8: (8, 8, 6)) fit both one label per row and one per column: either is taken for the
    validation batch; one per neither is refused, nothing changed."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(steps, 8, 6, dtype=F64, generator=g), torch.randint(0, 4, (8,), generator=g)
    xv, yv = torch.randn(7, 16, 6, dtype=F64, generator=g), torch.randint(0, 4, (16,), generator=g)
    first, w, model, optimizer = fast_step(SequenceFirst, (x, y), (xv, yv))
    batch_first, _, _, _ = fast_step(BatchFirst, (x.transpose(0, 1), y), (xv.transpose(0, 1), yv))
    assert relative(first, batch_first) < 1e-12
    before = copy.deepcopy((w.state_dict(), model.state_dict(), optimizer.state_dict()))
    with pytest.raises(ValueError, match=r"validation batch has inputs of shape \(7, 16, 6\) but 12 labels, where "
                                         + ("16 would" if steps != 8 else "7 or 16 would")):
        w.step((x, y), (xv, yv[:12]))
    assert repr(copy.deepcopy((w.state_dict(), model.state_dict(), optimizer.state_dict()))) == repr(before)


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
