"""Guards of the loss-weighting methods (and the HarmonizedWeighter where it shares them): inactive terms that
hold NaN, impossible checkpoints, meta steps after an optimizer that did not step, optimizers that do not fit
the model, and the options around them. Each test compares against a run that never met the problem."""

import contextlib
import copy
import itertools
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaweight as mw
from conftest import batch, tiny_net
from test_weightings import _ShiftedTerms

NAMES = sorted(mw.WEIGHTINGS)


def options(name, model):
    return {"dwa": {"window": 2}, "sdn": {"epochs": 3, "steps_per_epoch": 2},
            "gradnorm": {"shared_parameters": list(model.stages[0].parameters())},
            "rlw": {"seed": 3}}.get(name, {})


def build(name, criterion=None, *, seed=0, params=None, make=None, **extra):
    torch.manual_seed(seed)
    model = tiny_net(3)
    held = model.parameters() if params is None else params(model)
    optimizer = torch.optim.SGD(held, lr=0.1, momentum=0.9) if make is None else make(held)
    criterion = criterion if criterion is not None else mw.DenseDistillLoss(3)
    return mw.WEIGHTINGS[name](model, optimizer, criterion, **{**options(name, model), **extra}), model, optimizer


def batches(n=4, size=16):
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(size, 6, generator=g), torch.randint(0, 5, (size,), generator=g)) for _ in range(n)]


class PoisonedInactive(mw.DenseDistillLoss):
    """DenseDistillLoss that puts NaN (and inf) where its terms are inactive, as a criterion that skips a term by
    writing NaN might: the weighted loss must not see them."""

    def forward(self, outputs, target, **kwargs):
        values = super().forward(outputs, target, **kwargs)
        poison = torch.tensor([math.nan, math.inf], dtype=values.dtype).repeat(len(values))[:len(values)]
        return torch.where(self.active, values, poison)


# ------------------------------------------------------------------ 5: inactive terms cannot poison the loss
@pytest.mark.parametrize("name", NAMES)
def test_nan_in_an_inactive_term_changes_nothing(name):
    """With teachers='last' most distillation terms are inactive; NaN/inf written there must give the same loss,
    weights and model as the clean criterion (0 * NaN is NaN: the combination selects, not multiplies)."""
    clean, m1, _ = build(name, mw.DenseDistillLoss(3, teachers="last"))
    poisoned, m2, _ = build(name, PoisonedInactive(3, teachers="last"))
    assert not bool(poisoned._terms.active.all())
    for x, y in batches(3):
        r1, r2 = clean.step((x, y)), poisoned.step((x, y))
        assert math.isfinite(r2.loss) and r1.loss == r2.loss
        assert r1.gamma == r2.gamma
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    # the two calls: the loss itself, and its reference sum over the active terms
    x, y = batch()
    loss = poisoned.loss(m2(x), y)
    reference = clean.loss(m2(x), y)
    assert torch.isfinite(loss) and torch.equal(loss, reference)


def test_nan_in_an_inactive_term_leaves_the_harmonized_weighter_finite():
    torch.manual_seed(0)
    model = tiny_net(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = mw.HarmonizedWeighter(model, opt, PoisonedInactive(3, teachers="last"), learn=False)
    x, y = batch()
    outputs = model(x)
    loss = w.loss(outputs, y)
    outputs = [o.detach() for o in outputs]
    active = w._terms.active
    reference = sum(float(g) * float(t) for g, t, a in
                    zip(w.gamma.detach(), mw.DenseDistillLoss(3, teachers="last")(outputs, y), active) if a)
    assert math.isclose(loss.item() if not loss.requires_grad else float(loss.detach()), reference, rel_tol=1e-6)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ------------------------------------------------------------------ 2: a meta step after no optimizer step
def state(w):
    return {k: v for k, v in w.state_dict().items()
            if k not in ("num_calls", "num_meta_steps", "num_skipped", "pending_calls", "meta_step_due")}  # (counters)


def same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("name", NAMES)
def test_a_meta_step_after_no_optimizer_step_is_skipped_and_changes_nothing(name):
    """loss, backward, no optimizer step (the loop did not take it), meta_step: no loss changed, so the call is
    reported skipped, the weights and state are as before, and the run goes on as if that iteration never was
    (a twin that never had it ends equal). The gradients being finite, no GradScaler skipped the step: the call
    warns that meta_step came before optimizer.step() (it was silent, its record blaming a GradScaler)."""
    w1, m1, o1 = build(name)
    w2, m2, o2 = build(name)
    data = batches(4)
    for i, (x, y) in enumerate(data):
        if i == 2:
            before = state(w1)
            o1.zero_grad()
            w1.loss(m1(x), y).backward()
            with pytest.warns(RuntimeWarning, match="gradients are finite, so no GradScaler skipped it: meta_step was "
                                                    "called before optimizer.step"):
                record = w1.meta_step((x, y))
            assert record.skipped and not record.ran and "did not step" in record.message
            assert record.meta_step == w1.num_meta_steps == 2 and w1.num_calls == 3 and w1.num_skipped == 0
            assert same(state(w1), before)
        for w, m, o in ((w1, m1, o1), (w2, m2, o2)):
            o.zero_grad()
            w.loss(m(x), y).backward()
            o.step()
            assert not w.meta_step((x, y)).skipped
    if name == "sdn":  # (its schedule is by iteration, the skipped one included: one position ahead of the twin)
        return
    assert torch.equal(w1.gamma, w2.gamma) and same(state(w1), state(w2))
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


@pytest.mark.parametrize("before", ["", "deepcopy", "load_state_dict", "a step without it"])
@pytest.mark.parametrize("at", [0, 2], ids=["first iteration", "third iteration"])
@pytest.mark.parametrize("loss_is", ["finite", "nan"])
@pytest.mark.parametrize("name", NAMES)
def test_an_iteration_the_loop_skipped_is_skipped_and_changes_nothing(name, loss_is, at, before):
    """loss = weighting.loss(...), then no backward and no optimizer step (the loop checked torch.isfinite(loss) and
    skipped the batch, as the guides advise), then meta_step: the update read the terms of the batch no step was
    taken on (every rule learned from it; SDN's schedule moved on) and, with a NaN loss, refused it under
    nonfinite="raise" as terms "the model stepped on" (helper-172). Skipped, nothing changed, nothing refused; a
    finite loss skipped is warned of once; the run goes on as a twin's that never had the batch. The same after the
    weighting was copied or loaded (the rule was off until the next meta step) and, for a NaN loss, after an
    optimizer step the weighting did not see (a warm-up on a loss of one's own; helper-173). (A finite loss after
    such a step is read: a meta_step before the backward looks the same.)"""
    if before == "a step without it" and loss_is == "finite":
        pytest.skip("a finite loss after a step the weighting did not see is read")
    w1, m1, o1 = build(name)
    w2, m2, o2 = build(name)
    data = batches(5)
    for i, (x, y) in enumerate(data):
        if i == at:
            if before == "deepcopy":
                w1, m1, o1 = copy.deepcopy((w1, m1, o1))
            elif before == "load_state_dict":
                w1.load_state_dict(copy.deepcopy(w1.state_dict()))
            elif before == "a step without it":
                for m, o in ((m1, o1), (m2, o2)):  # (the same plain step on both)
                    o.zero_grad()
                    sum(F.cross_entropy(out, y) for out in m(x)).backward()
                    o.step()
            kept = state(w1)
            calls, steps = w1.num_calls, w1.num_meta_steps
            outputs = m1(x)
            loss = w1.loss([o * math.nan for o in outputs] if loss_is == "nan" else outputs, y)
            assert torch.isfinite(loss).item() == (loss_is == "finite")
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                record = w1.meta_step((x, y))
            assert [str(w.message) for w in said if "skipped" in str(w.message)] == \
                   ([] if loss_is == "nan" else [record.message + " (Said once.)"])
            assert record.skipped and not record.ran and "the loop skipped" in record.message
            assert (w1.num_calls, w1.num_meta_steps, w1.num_skipped) == (calls + 1, steps, 0)
            assert same(state(w1), kept)
            if loss_is == "finite":  # (said once: a second skipped batch is not warned of again)
                w1.loss(m1(x), y)
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    assert w1.meta_step((x, y)).skipped
            continue
        for w, m, o in ((w1, m1, o1), (w2, m2, o2)):
            o.zero_grad()
            w.loss(m(x), y).backward()
            o.step()
            assert not w.meta_step((x, y)).skipped
    assert torch.equal(w1.gamma, w2.gamma) and same(state(w1), state(w2))
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert w1.num_meta_steps == w2.num_meta_steps == 4


@pytest.mark.parametrize("at", [1, 3])
@pytest.mark.parametrize("loop", ["a warm-up without meta steps", "the backward guarded alone"])
@pytest.mark.parametrize("name", NAMES)
def test_a_nan_batch_skipped_after_a_warm_up_or_stepped_on_no_gradient_is_skipped(name, loop, at):
    """A NaN batch the loop skipped, after a warm-up of loss/backward/step without meta steps: the meta step learned
    from the warm-up's last step (a step taken since its last meta step); a loop guarding the backward alone
    (``if isfinite(loss): loss.backward()``), then stepping: refused as terms the model stepped on, where the step
    took no gradient of them (helper-178). Both skipped: the run equals a twin's without the batch. After one step
    of warm-up as after three (fb36eb2 learned from the one step, and FAMO raised; helper-184)."""
    w1, m1, o1 = build(name)
    w2, m2, o2 = build(name)
    warm = loop == "a warm-up without meta steps"
    for i, (x, y) in enumerate(batches(6)):
        if i == at:
            o1.zero_grad()
            loss = w1.loss([o * math.nan for o in m1(x)], y)
            assert not torch.isfinite(loss)
            if not warm:
                o1.step()  # (no gradient: nothing moves)
            kept = state(w1)
            record = w1.meta_step((x, y))
            assert record.skipped and not record.ran and same(state(w1), kept)
            continue
        for w, m, o in ((w1, m1, o1), (w2, m2, o2)):
            o.zero_grad()
            w.loss(m(x), y).backward()
            o.step()
            if not warm or i > at:
                assert not w.meta_step((x, y)).skipped
    assert torch.equal(w1.gamma, w2.gamma) and same(state(w1), state(w2))
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert w1.num_meta_steps == w2.num_meta_steps == (5 - at if warm else 5)


@pytest.mark.parametrize("name", NAMES)
def test_a_nan_loss_logged_with_a_graph_after_the_step_says_how_to_log(name):
    """loss, backward, step, then a loss logged with its graph (not under no_grad) on a held-out batch holding a NaN,
    then meta_step: it reads as a batch the loop skipped after the step (which a loop skipping a NaN batch after
    steps without meta steps makes too, and which is skipped), and the update is skipped. The message said no step
    came (helper-182); it now says a step came, and to log under torch.no_grad(). Telling the two apart by the
    number of steps since the last meta step (fb36eb2) made one step of warm-up behave otherwise than two, and
    FAMO raise (helper-184). Logged under no_grad, the run equals its twin's without the logging."""
    for logged in ("with its graph", "under no_grad"):
        w1, m1, o1 = build(name)
        w2, m2, o2 = build(name)
        data = batches(5)
        for i, (x, y) in enumerate(data[:4]):
            for w, m, o in ((w1, m1, o1), (w2, m2, o2)):
                o.zero_grad()
                w.loss(m(x), y).backward()
                o.step()
                if w is w1 and i == 1:
                    xv = data[4][0].clone()
                    xv[0, 0] = math.nan
                    with torch.no_grad() if logged == "under no_grad" else contextlib.nullcontext():
                        assert not torch.isfinite(w.loss(m(xv), data[4][1]))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    record = w.meta_step((x, y))
                if w is w1 and i == 1 and logged == "with its graph":
                    assert record.skipped and "made after the optimizer's step" in record.message, record.message
                    assert "torch.no_grad()" in record.message
                else:
                    assert record.ran and not record.skipped, record.message
        if logged == "under no_grad":
            assert torch.equal(w1.gamma, w2.gamma) and same(state(w1), state(w2))
            assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


@pytest.mark.parametrize("name", NAMES)
def test_a_step_taken_on_a_nan_loss_is_refused_after_a_loss_logged_with_a_graph(name):
    """The loop does not check the loss: backward and step on NaN terms, then a loss logged on a held-out batch with
    its graph (not under no_grad), NaN too as the model now is, then meta_step: taken for a batch the loop skipped
    (the last loss() call not finite, reached by no backward), it was skipped silently at every iteration, the weights
    frozen for the rest of the run (helper-176). The step's terms are read, and refused, as without the logging."""
    w, model, optimizer = build(name)
    (x, y), (xv, yv) = batches(2)
    w.step((x, y))
    kept = state(w)
    optimizer.zero_grad()
    w.loss([o * math.nan for o in model(x)], y).backward()
    optimizer.step()
    w.loss(model(xv), yv)  # (logged with its graph)
    with pytest.raises(ValueError, match="not finite|non-finite"):
        w.meta_step((x, y))
    assert same(state(w), kept)


@pytest.mark.parametrize("name", NAMES)
def test_a_load_between_the_step_and_meta_step_is_said(name):
    """loss, backward, step, then load_state_dict, then meta_step: the methods reading terms refuse it, saying the
    loss() calls stayed out of the checkpoint; RLW and SDN, which read none, skipped it saying that no step and no
    loss() call had come since the last meta step, both false (helper-176). They now say what happened."""
    w, model, optimizer = build(name)
    (x, y), (x1, y1) = batches(2)
    w.step((x, y))
    saved = copy.deepcopy(w.state_dict())
    optimizer.zero_grad()
    w.loss(model(x1), y1).backward()
    optimizer.step()
    w.load_state_dict(saved)
    kept = state(w)
    if w.needs_terms:
        with pytest.raises(ValueError, match="loaded from a checkpoint since its last loss"):
            w.meta_step((x1, y1))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            record = w.meta_step((x1, y1))
        assert record.skipped and "since this" in record.message and "was loaded or copied" in record.message
        assert "loaded from a checkpoint since its last loss() call" in record.message
    assert same(state(w), kept)


@pytest.mark.parametrize("name", NAMES)
def test_a_meta_step_before_the_backward_leaves_that_loss_s_gradients_as_they_were(name):
    """loss = weighting.loss(...); weighting.meta_step(...); loss.backward(): the meta step updates the weights
    in place, which made the backward fail with autograd's in-place error; the loss keeps the weights it was
    computed with, so its gradients equal a twin's that took no meta step between."""
    w, model, optimizer = build(name)
    (x0, y0), (x, y) = batches(2)
    w.step((x0, y0))
    optimizer.zero_grad()
    optimizer.step()  # (a model step since the last meta step, which changes nothing: else nothing to learn from)
    twin, twin_model = copy.deepcopy((w, model))
    for weighting, net in ((twin, twin_model), (w, model)):
        optimizer.zero_grad()
        loss = weighting.loss(net(x), y)
        if weighting is w:
            weights = w.gamma.clone()
            assert w.meta_step((x, y)).ran
            assert name == "dwa" or not torch.equal(weights, w.gamma)  # (DWA: still in its first window)
        loss.backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), twin_model.parameters()))


@pytest.mark.parametrize("name", ["uw", "dwa", "gradnorm", "famo"])
def test_a_loop_calling_meta_step_before_the_step_every_iteration_is_skipped_and_warned_every_time(name):
    """meta_step between backward and optimizer.step() in every iteration: each call is skipped with a warning and
    nothing is learned, the model training as without the weighting's updates. The calls a skipped meta_step keeps
    for an accumulated step are not read as this loop's (they alternated: a stale update every other iteration,
    and FAMO refused the next iteration's batch as another's)."""
    w, model, optimizer = build(name)
    before = state(w)
    for x, y in batches(4):
        optimizer.zero_grad()
        w.loss(model(x), y).backward()
        with pytest.warns(RuntimeWarning, match="called before optimizer.step"):
            record = w.meta_step((x, y))
        optimizer.step()
        assert record.skipped and not record.ran
    assert w.num_meta_steps == 0 and same(state(w), before)


@pytest.mark.parametrize("aux", [False, True], ids=["", "aux loss summed after"])
@pytest.mark.parametrize("where", ["after meta_step", "after loss()"])
@pytest.mark.parametrize("what", ["zero_grad", "zero_grad in place", "another loss's backward"])
@pytest.mark.parametrize("name", ["uw", "dwa", "gradnorm"])
@pytest.mark.parametrize("kept", [True, False], ids=["kept by meta_step", "no meta_step between"])
def test_calls_kept_by_a_meta_step_after_no_step_are_dropped_when_their_gradients_are_zeroed(kept, name, what, where,
                                                                                             aux):
    """A meta_step after no step keeps its loss() calls for the step's meta_step (gradient accumulation); a
    zero_grad after it (to None, or zeros in place; before the next loss(), or between it and its backward) clears
    their gradients, so the step that follows uses the next call's alone and its update is that call's alone, as
    a twin's that only had it; a backward of another loss adds to them: the update is the two calls', as a twin's
    that accumulated them with no meta_step between. With an
    auxiliary loss on a parameter only it reaches, summed after weighting.loss, autograd writes that gradient
    before the hook on the weighted loss runs: an addition, not a zeroing (the kept calls were dropped). The same
    with no meta_step between the two calls (a zeroing in place before the second loss() was looked for only after
    a meta_step: the update read both calls)."""
    w, model, optimizer = build(name)
    twin, twin_model, twin_optimizer = build(name)
    for net, opt in ((model, optimizer), (twin_model, twin_optimizer)):
        net.aux = nn.Parameter(torch.ones(3))  # (the outputs do not depend on it)
        opt.add_param_group({"params": [net.aux]})
    (x1, y1), (x2, y2) = batches(2)
    disturb = {"zero_grad": lambda: optimizer.zero_grad(),
               "zero_grad in place": lambda: optimizer.zero_grad(set_to_none=False),
               "another loss's backward": lambda: model.aux.square().sum().backward()}[what]
    w.loss(model(x1), y1).backward()
    if kept:
        with pytest.warns(RuntimeWarning, match="called before optimizer.step"):
            assert w.meta_step((x1, y1)).skipped
    if where == "after meta_step":
        disturb()
    loss = w.loss(model(x2), y2)
    if aux:
        loss = loss + model.aux.square().sum()
    if where == "after loss()":
        disturb()
    loss.backward()
    optimizer.step()
    records = [w.meta_step((x2, y2))]
    for x, y in ([(x1, y1)] if what == "another loss's backward" else []) + [(x2, y2)]:  # the twin: the step's calls
        twin.loss(twin_model(x), y).backward()
    twin_optimizer.step()
    records.append(twin.meta_step((x2, y2)))
    for a, b in zip(records[0].terms.values(), records[1].terms.values()):
        assert math.isclose(a, b, rel_tol=1e-6)
    assert torch.allclose(w.gamma, twin.gamma, rtol=1e-6, atol=0)


def test_a_step_a_grad_scaler_skipped_does_not_move_famo():
    """FAMO reads the loss change of the step: a GradScaler that skips the step (inf gradients) leaves its logits,
    moments and weights as they were, and the record says skipped."""
    w, model, optimizer = build("famo")
    (x, y), (x2, y2) = batches(2)
    w.step((x, y))
    before = state(w)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    optimizer.zero_grad()
    scaler.scale(w.loss(model(x2), y2)).backward()
    next(model.parameters()).grad[0, 0] = math.inf  # an overflow of the scaled gradients
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() < 2.0 ** 10  # (the step was skipped)
    record = w.meta_step((x2, y2))
    assert record.skipped and not record.ran
    assert same(state(w), before)


# ------------------------------------------------------------------ 3: DWA's windows count the updates kept
def test_dwa_windows_count_updates_kept_not_calls():
    """A skipped meta step (non-finite terms, nonfinite='skip') adds nothing to the window's sum; the window must
    not close one update early and divide a short sum by `window`: the weights follow a twin without the call,
    and the counters are host-side ints."""
    w1, m1, o1 = build("dwa", nonfinite="skip", window=3)
    w2, m2, o2 = build("dwa", nonfinite="skip", window=3)
    assert type(w1.num_windows) is int and type(w1.calls_in_window) is int
    for i, (x, y) in enumerate(batches(9)):
        if i == 1:
            with torch.no_grad(), pytest.warns(RuntimeWarning, match="Skipped an update"):
                w1.loss(m1(torch.full_like(x, math.nan)), y)
                o1.zero_grad()
                o1.step()  # (the loop stepped on it: a step that changes nothing, no gradient)
                assert w1.meta_step((x, y)).skipped
        w1.step((x, y))
        w2.step((x, y))
        assert torch.equal(w1.gamma, w2.gamma), i
    assert w1.num_windows == w2.num_windows == 3 and type(w1.num_windows) is int
    assert not torch.equal(w1.gamma, torch.ones(len(w1.gamma)))  # (the rule ran)


# ------------------------------------------------------------------ 7: impossible checkpoints
def impossible(name, good):
    """Checkpoints of the right keys, shapes, dtypes and finite values that no run of the method can save."""
    gamma = good["gamma"]
    out = [({**good, "num_meta_steps": good["num_calls"] + 1}, "num_meta_steps <= num_calls")]
    if "exp_avg_sq" in good:
        out.append(({**good, "exp_avg_sq": -good["exp_avg_sq"] - 1.0}, "negative"))
    if name == "famo":  # gamma is softmax(logits)
        out.append(({**good, "logits": good["logits"] + torch.arange(len(gamma), dtype=torch.float32)}, "rule"))
    if name == "uw":  # gamma is exp(-log_vars)
        out.append(({**good, "log_vars": good["log_vars"] - 0.5}, "rule"))
    if name in ("dwa", "gradnorm", "rlw", "famo", "sdn"):  # weights kept at a fixed sum (SDN's: its schedule's)
        out.append(({**good, "gamma": gamma * 2.0}, "sum|rule"))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_impossible_checkpoints_are_refused_changing_nothing(name):
    w, model, _ = build(name)
    for b in batches(3):
        w.step(b)
    good = w.state_dict()
    before = w.state_dict()
    cases = impossible(name, good)
    assert len(cases) >= 2
    for state, match in cases:
        with pytest.raises(ValueError, match=match):
            w.load_state_dict(state)
        assert same(w.state_dict(), before)
    w.load_state_dict(good)  # (the real one loads)
    assert same(w.state_dict(), before)


# ------------------------------------------------------------------ 10: no validation batch with learn=False
def harmonized(learn, seed=0, **kw):
    torch.manual_seed(seed)
    model = tiny_net(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(3), learn=learn, **kw), model, opt


def test_learn_false_needs_no_validation_batch():
    """gamma fixed: step(train) and meta_step(train) are the calls with a validation batch (which is not read)."""
    w1, m1, o1 = harmonized(False)
    w2, m2, o2 = harmonized(False)
    val = batch()
    for x, y in batches(3):
        r1, r2 = w1.step((x, y)), w2.step((x, y), val)
        assert r1.loss == r2.loss and not r1.ran
        o1.zero_grad()
        w1.loss(m1(x), y).backward()
        o1.step()
        assert not w1.meta_step((x, y)).ran
        o2.zero_grad()
        w2.loss(m2(x), y).backward()
        o2.step()
        w2.meta_step((x, y), val)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert w1.gamma_dict() == w2.gamma_dict()


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_learning_without_a_validation_batch_is_refused_changing_nothing(mode):
    w, model, _ = harmonized(True, mode=mode)
    params = [p.detach().clone() for p in model.parameters()]
    for call in ("step", "meta_step"):
        with pytest.raises(ValueError, match="validation batch"):
            getattr(w, call)(batch())
    assert w.num_calls == 0 and all(torch.equal(a, b) for a, b in zip(params, model.parameters()))


# ------------------------------------------------------------------ 6, 11: what step() needs of the optimizer
def snapshot(model, optimizer, w):
    return ([t.detach().clone() for t in list(model.parameters()) + list(model.buffers())],
            str(optimizer.state_dict()), w.num_calls, w.num_skipped)


def unchanged(a, b):
    return all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and a[1:] == b[1:]


@pytest.mark.parametrize("name", NAMES)
def test_step_refuses_an_optimizer_over_part_of_the_model_changing_nothing(name):
    w, model, optimizer = build(name, params=lambda m: m.heads.parameters())
    before = snapshot(model, optimizer, w)
    with pytest.raises(ValueError, match=r"does not hold the model's trainable parameters \['stages.0.0.weight'"):
        w.step(batch())
    assert unchanged(before, snapshot(model, optimizer, w))
    for p in model.stages.parameters():  # frozen on purpose: the step runs
        p.requires_grad_(False)
    if name != "gradnorm":  # (its shared parameters must train)
        assert w.step(batch()).meta_step == 1


HARMONIZED_WITHOUT_META = {"exact, learn=False": dict(learn=False, mode="exact"),
                           "fast, learn=False": dict(learn=False, mode="fast"),
                           "fast, meta_every=2": dict(learn=True, mode="fast", meta_every=2),
                           "exact, meta_every=2": dict(learn=True, mode="exact", meta_every=2)}


@pytest.mark.parametrize("name", NAMES + sorted(HARMONIZED_WITHOUT_META))
def test_an_optimizer_step_that_raises_inside_step_changes_nothing(name):
    """The model converted to float64 after Adam's first step, its moments left float32 (torch's Adam counts
    the step, then refuses to mix them, from inside optimizer.step()): step() says so with the fix, the
    model's parameters, buffers (the forward's BatchNorm statistics) and the optimizer's state as before;
    after the fix the run equals a twin that converted its optimizer's state at once. The weightings, and
    HarmonizedWeighter's steps with no meta step to check the optimizer first."""
    runs = []
    for fail_first in (True, False):
        if name in HARMONIZED_WITHOUT_META:
            torch.manual_seed(0)
            model = tiny_net(3)
            optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
            w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), **HARMONIZED_WITHOUT_META[name])
            xv, yv = batches(1, 8)[0]
            step = (lambda b, w=w, m=model: w.step(b, (xv.to(next(m.parameters()).dtype), yv))) if w.learn else w.step
        else:
            w, model, optimizer = build(name, make=lambda held: torch.optim.Adam(held, lr=0.01))
            step = w.step
        data = batches()
        step(data[0])
        model.double()
        if fail_first:
            before = snapshot(model, optimizer, w), w.state_dict()
            with pytest.raises(ValueError, match=r"(?s)'exp_avg'.*torch.float32.*parameter is torch.float64.*"
                                                 r"optimizer.load_state_dict\(optimizer.state_dict\(\)\)"):
                step((data[1][0].double(), data[1][1]))
            after = snapshot(model, optimizer, w), w.state_dict()
            assert unchanged(before[0], after[0])
            assert same(before[1], after[1])
        optimizer.load_state_dict(optimizer.state_dict())  # the fix the message gives
        for x, y in data[1:]:
            step((x.double(), y))
        runs.append((snapshot(model, optimizer, w)[0], w.state_dict()))
    assert unchanged((runs[0][0], 0), (runs[1][0], 0))
    assert same(runs[0][1], runs[1][1])


def test_step_refuses_an_optimizer_holding_other_tensors():
    w, model, optimizer = build("uw")
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    with pytest.raises(ValueError, match="holds 1 tensors that are not parameters of the model"):
        w.step(batch())


@pytest.mark.parametrize("name", NAMES)
def test_an_optimizer_holding_none_of_the_model_s_parameters_is_refused_at_construction(name):
    """The optimizer built over the model before it was replaced by a copy: the loop's step trains nothing of the
    model the weighting watches (its two calls learned weights all the same). Refused when built; an optimizer over
    a part of the model is still the two calls' to use."""
    import copy

    torch.manual_seed(0)
    model = tiny_net(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model = copy.deepcopy(model)  # (a reloaded or copied model; the optimizer holds the old one's parameters)
    with pytest.raises(ValueError, match="`optimizer` holds none of the model's parameters"):
        mw.WEIGHTINGS[name](model, optimizer, mw.DenseDistillLoss(3), **options(name, model))
    part = torch.optim.SGD(model.heads.parameters(), lr=0.1)
    mw.WEIGHTINGS[name](model, part, mw.DenseDistillLoss(3), **options(name, model))


@pytest.mark.parametrize("set_to_none", [True, False], ids=["zero_grad", "zero_grad in place"])
@pytest.mark.parametrize("name", NAMES)
def test_step_refuses_lbfgs_changing_nothing_and_the_two_calls_run_it(name, set_to_none):
    """LBFGS needs a closure, which step() has not: refused before the forward (BatchNorm statistics and all
    unchanged); the two calls with the user's closure read its last evaluation, whether the closure clears the
    gradients to None or in place (in place, the update read the mean of every evaluation's terms)."""
    w, model, optimizer = build(name, make=lambda held: torch.optim.LBFGS(held, lr=0.1, max_iter=3))
    before = snapshot(model, optimizer, w)
    with pytest.raises(ValueError, match="needs one"):
        w.step(batch())
    assert unchanged(before, snapshot(model, optimizer, w))
    x, y = batch()

    evaluations = []

    def closure():
        optimizer.zero_grad(set_to_none=set_to_none)
        loss = w.loss(model(x), y)
        loss.backward()
        evaluations.append(w.terms_dict())
        return loss

    optimizer.step(closure)
    record = w.meta_step((x, y))
    assert record.meta_step == 1 and len(evaluations) > 1 and evaluations[0] != evaluations[-1]
    assert record.terms == evaluations[-1]
    with torch.no_grad():  # the last evaluation's terms: the closure's at the parameters before the last change
        assert record.terms == w.terms_dict()


# ------------------------------------------------------------------ 1: FAMO under autocast
def famo_run(autocast, form):
    """Five iterations of FAMO (lr 0.5, so the logits move) in one of three loops: step() under autocast, the two
    calls with meta_step after the autocast region, or with it inside (the whole body under autocast)."""
    torch.manual_seed(0)
    model = tiny_net(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    w = mw.FAMO(model, optimizer, mw.DenseDistillLoss(3), lr=0.5)
    for x, y in batches(5):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if form == "step":
                w.step((x, y))
                continue
            loss = w.loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if form == "inside":
                w.meta_step((x, y))
        if form == "after":
            w.meta_step((x, y))
    return w.logits


def test_famo_under_autocast_reads_the_step_in_every_loop_form():
    """The terms after the step are computed at the new parameters whatever autocast region the call is in
    (autocast's cache held the parameters cast before the step: the one call's delta was about 0); the logits
    are those of float32 to the rounding of bfloat16."""
    reference = famo_run(False, "after")
    after = famo_run(True, "after")
    assert torch.allclose(after, reference, atol=0.1), (after, reference)
    for form in ("step", "inside"):
        assert torch.equal(famo_run(True, form), after), form


# ------------------------------------------------------------------ 9: FAMO's min_losses in its refusals
def test_famo_says_which_terms_are_not_above_min_losses():
    """A term at or below its bound makes log(L - L*) non-finite: both refusals (the one call's, the update's)
    name those terms and their bounds, and say what to pass; nothing changes."""
    w, model, optimizer = build("famo", min_losses=[1.0] * 6)
    x, y = batch()
    with torch.no_grad():
        terms = dict(zip(w.term_names, mw.DenseDistillLoss(3)(model(x), y).tolist()))
    low = [n for n, v in terms.items() if v <= 1.0]
    assert low and len(low) < len(terms)
    pattern = f"these terms are at or below their min_losses: {re.escape(low[0])}.*Pass min_losses under"
    with pytest.raises(ValueError, match=pattern):
        w.step((x, y))
    with torch.no_grad():
        w.loss(model(x), y)
    optimizer.step()  # (a step, none of the refused step() left a gradient: else meta_step has nothing to learn from)
    with pytest.raises(ValueError, match=pattern) as error:
        w.meta_step((x, y))
    assert all(n in str(error.value).split("min_losses:")[1].split("(the log")[0] for n in low)
    assert all(n not in str(error.value).split("min_losses:")[1].split("(the log")[0] for n in terms if n not in low)
    assert w.num_calls == 0 and torch.equal(w.logits, torch.zeros(6))


# ------------------------------------------------------------------ 8: FAMO's meta_step on the step's batch
def test_famo_refuses_another_batch_after_the_step_changing_nothing():
    """delta compares the terms of one batch before and after the step: meta_step with other labels (another
    batch, or the micro-batches out of order) is refused before anything changes; the same labels (a copy too)
    run."""
    w, model, optimizer = build("famo")
    (x, y), (x2, y2), (x3, y3) = batches(3)
    w.step((x, y))
    before = state(w)
    optimizer.zero_grad()
    w.loss(model(x2), y2).backward()
    optimizer.step()
    for bad in [(x3, y3), (x2, y2[:8]), (x2, y2.flip(0))]:
        with pytest.raises(ValueError, match="labels are not those of this iteration"):
            w.meta_step(bad)
        assert same(state(w), before) and w.num_calls == 1
    assert w.meta_step((x2.clone(), y2.clone())).meta_step == 2
    # accumulation: the micro-batches concatenated in order, not the other way round
    optimizer.zero_grad()
    for xs, ys in ((x, y), (x3, y3)):
        w.loss(model(xs), ys).backward()
    optimizer.step()
    with pytest.raises(ValueError, match="concatenated in order"):
        w.meta_step((torch.cat([x3, x]), torch.cat([y3, y])))
    assert w.meta_step((torch.cat([x, x3]), torch.cat([y, y3]))).meta_step == 3


class SkippingWrapper:
    """An optimizer wrapper (as Accelerate's, with its own GradScaler) whose step() may not step."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.skip = False

    def step(self):
        if not self.skip:
            self.optimizer.step()

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)


def test_step_reports_a_step_its_optimizer_skipped():
    """step() whose optimizer wrapper skipped the step: the record says model_step_skipped and the meta step
    skipped, and nothing of the weighting changed."""
    w, model, optimizer = build("uw")
    wrapper = SkippingWrapper(optimizer)
    w = mw.UW(model, wrapper, mw.DenseDistillLoss(3))
    assert not w.step(batch()).model_step_skipped
    before = state(w)
    wrapper.skip = True
    with pytest.warns(RuntimeWarning) as heard:  # (step() orders its calls: no warning of a wrong order)
        record = w.step(batch())
    said = [str(h.message) for h in heard]
    assert len(said) == 1 and "did not take the step step() asked" in said[0] and "Accelerate" in said[0], said
    assert record.model_step_skipped and record.skipped and not record.ran and "did not take the step" in record.message
    assert same(state(w), before) and w.num_meta_steps == 1


def test_dwa_loads_a_checkpoint_of_the_earlier_format():
    """Before the counters were host-side ints, num_windows was a tensor beside the others and the window's
    position was num_calls % window: such a checkpoint resumes as the run that saved it would have."""
    w1, *_ = build("dwa", window=3)
    w2, *_ = build("dwa", window=3)
    data = batches(7)
    for b in data[:4]:
        w1.step(b)
        w2.step(b)  # (the same model)
    saved = w1.state_dict()
    assert saved["extra"] == {"num_windows": 1, "calls_in_window": 1}
    old = {**{k: v for k, v in saved.items() if k != "extra"}, "extra": {}, "num_windows": torch.tensor(1)}
    w2.load_state_dict(build("dwa", window=3)[0].state_dict())  # (another state, which the load replaces)
    w2.load_state_dict(old)
    for b in data[4:]:
        w1.step(b)
        w2.step(b)
        assert torch.equal(w1.gamma, w2.gamma)
    assert w2.num_windows == 2 and type(w2.num_windows) is int


def _overflowing_step(name, zero, freeze_trunk=False):
    """A GradScaler that skips the step (its scale overflows the gradients), ``zero(optimizer)`` after it, then
    meta_step; ``freeze_trunk``: an earlier phase left finite .grad on a trunk frozen since."""
    torch.manual_seed(0)
    model = tiny_net(3, batchnorm=False)
    params = model.parameters()
    if freeze_trunk:
        model(batch(4)[0])[2].sum().backward()
        model.stages.requires_grad_(False)
        params = model.heads.parameters()
    optimizer = torch.optim.SGD(params, lr=0.1)
    w = (mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), mode="fast") if name == "fast"
         else mw.WEIGHTINGS[name](model, optimizer, mw.DenseDistillLoss(3)))
    (x, y), val = batch(16), batch(16)
    scaler = torch.amp.GradScaler("cpu", init_scale=3e38)
    scaler.scale(w.loss(model(x), y)).backward()
    scaler.step(optimizer)
    scaler.update()
    zero(optimizer)
    return w.meta_step((x, y), val)


@pytest.mark.parametrize("name", ["fast", "uw", "famo"])
@pytest.mark.parametrize("case", ["zeros after the skip", "frozen trunk with stale gradients"])
def test_a_grad_scaler_s_skip_does_not_warn_of_a_wrong_order(name, case):
    """The order warning reads the gradients of the trainable parameters, and all-zero ones as cleared: a
    zero_grad(set_to_none=False) after the scaler's skip, or finite .grad left on parameters frozen since, made
    the skip look like meta_step before optimizer.step() (found by helper-90)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        if case == "zeros after the skip":
            record = _overflowing_step(name, lambda o: o.zero_grad(set_to_none=False))
        else:
            record = _overflowing_step(name, lambda o: o.zero_grad(), freeze_trunk=True)
    assert record.skipped and "GradScaler found inf/NaN" in record.message


def test_fast_meta_step_after_a_batch_the_loop_skipped_warns_only_of_a_finite_loss_once():
    """The fast mode's meta_step after a loss() the loop skipped (no backward, no step) is skipped, as it was; it
    warned every time that meta_step came before the backward, where a loop skipping a non-finite loss (as the
    guides advise) did nothing wrong (helper-172). A non-finite loss skipped is not warned of; a finite one, once."""
    torch.manual_seed(0)
    model = tiny_net(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), mode="fast")
    (x, y), val = batch(16), batch(16)
    for loss_is, warned in (("nan", False), ("finite", True), ("finite", False), ("nan", False)):
        outputs = model(x)
        w.loss([o * math.nan for o in outputs] if loss_is == "nan" else outputs, y)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            record = w.meta_step((x, y), val)
        assert record.skipped and w.num_meta_steps == 0 and "the loop skipped this batch" in record.message
        assert [str(m.message) for m in said] == ([record.message + " (Said once.)"] if warned else []), loss_is


def test_fast_meta_step_before_the_backward_warns():
    """loss(), meta_step, then backward and step: no backward had gone through the loss, there was nothing to
    score, and the record was skipped every iteration without a word (found by helper-90)."""
    torch.manual_seed(0)
    model = tiny_net(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), mode="fast")
    (x, y), val = batch(16), batch(16)
    optimizer.zero_grad()
    loss = w.loss(model(x), y)
    with pytest.warns(RuntimeWarning, match=r"meta_step came before loss.backward\(\) and optimizer.step\(\)"):
        record = w.meta_step((x, y), val)
    assert record.skipped and w.num_meta_steps == 0
    loss.backward()
    optimizer.step()


def test_a_partial_conversion_that_torch_s_step_stops_part_way_is_not_reported_as_nothing_changed():
    """Only some of the optimizer's state converted with the model (the first parameter's): the cheap check reads
    the first parameter holding state and passes; torch's Adam (foreach=False) steps that parameter and raises the
    step counts before refusing the next. The refusal named the cause but ended 'Nothing was changed.', which was
    false: it now says torch stopped part way and what may have moved (helper-109's report)."""
    w, model, opt = build(NAMES[0], make=lambda h: torch.optim.Adam(h, lr=0.01, foreach=False))
    data = batches()
    w.step(data[0])
    params = list(model.parameters())
    model.double()
    for key, value in list(opt.state[params[0]].items()):
        if value.dim() > 0:
            opt.state[params[0]][key] = value.double()
    before = params[0].detach().clone()
    with pytest.raises(ValueError, match="exp_avg") as info:
        w.step((data[1][0].double(), data[1][1]))
    moved = not torch.equal(before, params[0])
    assert moved  # (what torch did: the message must not deny it)
    assert "Nothing was changed" not in str(info.value)
    assert "part way" in str(info.value) and "checkpoint" in str(info.value)


@pytest.mark.parametrize("between", ["nothing", "a step a GradScaler skipped"])
@pytest.mark.parametrize("name", NAMES)
def test_a_meta_step_after_no_step_since_the_last_changes_nothing(name, between):
    """A meta_step with no optimizer step and no weighting.loss call since the last meta step (a second call after
    step(); a GradScaler's skipped step in a loop that weighs the terms itself): for RLW and SDN, which read no
    terms, a skipped record, the weights and the method's state unchanged, and the run goes on as a twin's that
    never made the call (RLW drew new weights and SDN's schedule moved on; a refusal crashed the loop at the
    GradScaler's skip). The methods that read the terms too (they said they needed them, where there is nothing to
    learn from: a batch skipped before its loss() call, Lightning's manual optimization, crashed the fit)."""
    w, model, optimizer = build(name)
    twin, twin_model, _ = build(name)
    data = batches(3)
    for weighting in (w, twin):
        weighting.step(data[0])
    before = state(w)
    if between == "a step a GradScaler skipped":  # (the terms weighed by the loop: gradients of inf, no step)
        optimizer.zero_grad()
        (w.gamma * mw.DenseDistillLoss(3)(model(data[1][0]), data[1][1])).sum().mul(math.inf).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        record = w.meta_step(data[0])
    assert record.skipped and not record.ran
    assert same(state(w), before)
    optimizer.zero_grad()
    for x, y in data[1:]:
        w.step((x, y)), twin.step((x, y))
    assert same(state(w), state(twin))



@pytest.mark.parametrize("clear", ["zero_()", "= None"])
@pytest.mark.parametrize("name", ["uw", "dwa", "gradnorm"])
def test_a_part_of_the_gradients_cleared_between_micro_batches_keeps_the_earlier_ones(name, clear):
    """Gradient accumulation where the loop clears the gradients of a part of the model after each backward (a
    head frozen in the loop, in place or to None): no zero_grad, so the update reads both micro-batches' terms, as
    a twin that clears nothing (the look for an in-place zero_grad between a backward and the next loss() took it
    for one and read the last micro-batch alone)."""
    records = []
    for freeze in (True, False):
        w, model, optimizer = build(name)
        optimizer.zero_grad()
        for x, y in batches(2):
            (w.loss(model(x), y) / 2).backward()
            if freeze:
                for p in model.heads[0].parameters():
                    if clear == "zero_()":
                        p.grad.zero_()
                    else:
                        p.grad = None
        optimizer.step()
        records.append(w.meta_step(batches(2)[-1]))
    assert records[0].terms == pytest.approx(records[1].terms, rel=1e-6)


def test_refused_updates_say_what_to_change_after_the_step_too_and_never_the_option_in_use():
    """helper-151: FAMO's hint looked only at the terms before the step, so a term pushed below its min_losses by
    the step was refused with 'check the data and the learning rates'; the hint now names it, 'after the step'
    (a stale record of an earlier call's is not read). And a refusal under nonfinite='skip' no longer advises
    nonfinite='skip', and says the update was skipped, not refused."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    criterion = _ShiftedTerms([0.0, 0.0, 0.0])
    with torch.no_grad():
        terms = criterion(model(x), y)
    w = mw.FAMO(model, torch.optim.SGD(model.parameters(), lr=0.1), criterion, min_losses=(terms - 1e-3).tolist())
    with pytest.raises(ValueError, match=r"at or below their min_losses: a = [0-9.]+ <= [0-9.]+ after the step") as info:
        w.step((x, y))
    assert "The model's step of this step() call was taken" in str(info.value)

    for nonfinite in ("skip", "raise"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
        w = mw.UW(model, torch.optim.SGD(model.parameters(), lr=0.1), _ShiftedTerms([0.0, -5.0, 0.0]), lr=0.5,
                  nonfinite=nonfinite)
        said = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(100):  # (the negative term's weight grows until the update is not finite)
                try:
                    record = w.step((x, y))
                except ValueError as error:
                    said = str(error)
                    break
                if record.skipped:
                    said = record.message
                    break
        assert said is not None
        assert ("nonfinite='skip'" in said) == (nonfinite == "raise"), said
        assert said.endswith("only the weights' update was " + ("skipped." if nonfinite == "skip" else "refused.")), said


def _near_bound_said(w, model, optimizer, x, y, iterations=2):
    """FAMO's warnings of terms near their bound over ``iterations`` of the two calls on one batch."""
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for _ in range(iterations):
            optimizer.zero_grad()
            w.loss(model(x), y).backward()
            optimizer.step()
            w.meta_step((x, y))
    return [str(m.message) for m in said if "near their bound" in str(m.message)]


def test_famo_warns_once_of_a_term_at_or_near_its_bound():
    """A term exactly at its bound (a margin penalty met, 0 with min_losses 0) took nearly all of FAMO's weight, z /
    (L - min + 1e-8) over their sum, and the others' fell to about 1e-8 of theirs: the model stopped training on
    them without a word (helper-174). A term near it stalls them as much (1e-5 above: the others' share about 1e-5;
    warned of only within 1e-6 until helper-176). Warned of once where a term takes more than 99.9 % of the weight,
    naming it and the fix; with a bound below the values the term reaches, not warned of, and the model trains on
    the others."""
    class Terms:
        term_names = ("ce", "margin")

        def __init__(self, offset):
            self.offset = offset

        def __call__(self, outputs, target):
            return torch.stack([F.cross_entropy(outputs, target), F.relu(outputs.abs().max() - 100.0) + self.offset])

    x, y = batch()
    norms = {}
    for bound, offset, warned in ((-1.0, 0.0, False), (0.0, 0.0, True), (0.0, 1e-5, True)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        w = mw.FAMO(model, optimizer, Terms(offset), min_losses=[0.0, bound])
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            for _ in range(3):
                optimizer.zero_grad()
                w.loss(model(x), y).backward()
                norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
                optimizer.step()
                w.meta_step((x, y))
        near = [str(m.message) for m in said if "near their bound" in str(m.message)]
        assert len(near) == (1 if warned else 0), (bound, offset, near)
        assert not warned or f"margin = {offset:.6g} (min_losses 0)" in near[0], near
        norms[bound, offset] = float(norm)
    free = norms[-1.0, 0.0]  # (the stalled steps the warning is about, against the step with the bound below)
    assert norms[0.0, 0.0] < 1e-6 * free and norms[0.0, 1e-5] < 1e-3 * free, norms
    # two margins met, which share the weight half and half: no term alone takes 99.9 %, both together do (the rule
    # looked at the heaviest term alone, and said nothing; helper-178)
    class Two(Terms):
        term_names = ("ce", "margin_a", "margin_b")

        def __call__(self, outputs, target):
            ce, margin = super().__call__(outputs, target)
            return torch.stack([ce, margin, margin])

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    w = mw.FAMO(model, optimizer, Two(0.0))
    near = _near_bound_said(w, model, optimizer, x, y)
    assert len(near) == 1 and "margin_a = 0 (min_losses 0), margin_b = 0 (min_losses 0)" in near[0], near


def _famo_run(criterion, exits, epochs, **options):
    """FAMO's step() over 8 batches of a learnable task for ``epochs``: its warnings of terms near their bound and
    the last record."""
    torch.manual_seed(0)
    weights = torch.randn(6, 5)
    data = [(x, (x @ weights).argmax(1)) for x in (torch.randn(64, 6) for _ in range(8))]
    torch.manual_seed(1)
    model = tiny_net(exits, batchnorm=False)
    w = mw.FAMO(model, torch.optim.SGD(model.parameters(), lr=0.1), criterion, **options)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for _ in range(epochs):
            for batch_ in data:
                record = w.step(batch_)
    return [str(m.message) for m in said if "near their bound" in str(m.message)], record


def test_famo_warns_of_a_penalty_near_its_floor_in_a_real_run():
    """Three cross-entropies and a penalty whose floor is 1e-3, min_losses left at 0: after 80 steps the penalty
    takes 99.79 % of the step's weight, each cross-entropy about 0.07 %, and they stop improving (helper-183). The
    rule of 00cc89d looked for the 1000-fold gap only where the share first passed 99.9 %, and said nothing; the
    gap is now looked for at every split."""
    def terms(outputs, y):
        ce = [F.cross_entropy(z, y) for z in outputs]
        return torch.stack([*ce, 1e-3 + 1e-3 * outputs[0].pow(2).mean()])

    near, record = _famo_run(terms, 3, 10, term_names=["ce[1]", "ce[2]", "ce[3]", "penalty"])
    assert len(near) == 1 and "the term(s) penalty = " in near[0], near
    share = {n: record.gamma[n] / record.terms[n] for n in record.terms}
    assert share["penalty"] > 1000 * max(v for n, v in share.items() if n != "penalty"), share


def test_famo_warns_of_cross_entropies_stalled_under_distillation_terms_near_0():
    """Dense distillation over 3 exits, 480 steps, min_losses left at 0: the distillation terms fall to 5e-4-2e-3 and
    take 99.9 % of the weight, each cross-entropy about 0.04 % and stuck near chance, and nothing was said: the
    rule of f7bf183 looked for a 1000-fold gap between neighbouring weights, which the graded distillation terms
    hid (helper-184). A term weighing under 1/1000 of the heaviest is now warned of."""
    near, record = _famo_run(mw.DenseDistillLoss(3), 3, 60)
    assert len(near) == 1 and "kd[3->2] = " in near[0] and "ce[3] = " in near[0].split("each weigh under")[0], near
    share = {n: record.gamma[n] / record.terms[n] for n in record.terms}
    assert max(v for n, v in share.items() if n.startswith("ce")) < 1e-3 * sum(share.values()), share


def test_famo_says_nothing_of_terms_far_from_their_bound_whose_scales_differ():
    """Dense distillation over 8 exits and 100 classes: 28 distillation terms near 0.08 and 8 cross-entropies near
    4.6 at the start, all far above their bound 0. FAMO's weights z / L follow the scales, and the heaviest 35 terms
    took more than 99.9 % of them: the warning named them, cross-entropies of 4.6 included, as "near their bound"
    (the rule took any terms but all that took that share). A term is near its bound for the warning only where its
    weight is 1000 times any other's (these differ by about 250 times)."""
    class Exits(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(8))
            self.heads = nn.ModuleList(nn.Linear(16, 100) for _ in range(8))
            for head in self.heads:  # (outputs near uniform: the distillation terms small, as at initialisation)
                nn.init.normal_(head.weight, std=0.01)

        def forward(self, x):
            outputs = []
            for block, head in zip(self.blocks, self.heads):
                x = block(x)
                outputs.append(head(x))
            return outputs

    torch.manual_seed(0)
    model = Exits()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    w = mw.FAMO(model, optimizer, mw.DenseDistillLoss(8))
    x, y = torch.randn(32, 16), torch.randint(0, 100, (32,))
    near = _near_bound_said(w, model, optimizer, x, y)
    terms = w.terms_dict()
    kd = [v for n, v in terms.items() if n.startswith("kd")]
    ce = [v for n, v in terms.items() if n.startswith("ce")]
    assert len(kd) == 28 and len(ce) == 8 and max(kd) < 0.1 * min(ce), terms  # (the scales the rule misread)
    assert not near, near[0][:400]


def test_famo_judges_an_accumulated_step_by_the_mean_of_its_calls_terms():
    """Under gradient accumulation each loss() call weighs its terms by their own distances from their bounds, and
    the warning reads the mean of the calls' terms (helper-186 asked for each call's). Judging each call alone
    (6b6d27e) warned of a term at 0 in a trailing micro-batch of 2 samples, in a run that trained as without
    accumulation, using up the once-only warning (helper-187); judging the calls' shares per rank (4718336) warned
    on one rank only under DDP (helper-188). A task without labels in one micro-batch leaves the other task trained
    on the rest, and is not warned of; a task without labels in every micro-batch stalls the other, and is."""
    class TwoTasks(nn.Module):
        term_names = ["task_a", "task_b"]

        def forward(self, outputs, y):
            labelled = y[:, 1] >= 0
            b = F.cross_entropy(outputs[1][labelled], y[labelled, 1]) if labelled.any() else outputs[1].sum() * 0
            return torch.stack([F.cross_entropy(outputs[0], y[:, 0]), b])

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk, self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 3), nn.Linear(16, 3)

        def forward(self, x):
            h = torch.tanh(self.trunk(x))
            return [self.a(h), self.b(h)]

    def run(parts, unlabelled):
        torch.manual_seed(0)
        model = Net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        w = mw.FAMO(model, optimizer, TwoTasks())
        x, y = torch.randn(32, 8), torch.randint(0, 3, (32, 2))
        y[unlabelled, 1] = -1
        cuts = [0, *itertools.accumulate(parts)]
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            for _ in range(2):
                optimizer.zero_grad()
                for start, end in zip(cuts, cuts[1:]):
                    (w.loss(model(x[start:end]), y[start:end]) * (end - start) / 32).backward()
                optimizer.step()
                w.meta_step((x, y))
        return [str(m.message) for m in said]

    assert run([16, 16], slice(0, 16)) == []  # (task_b unlabelled in the first micro-batch: task_a trains on the 2nd)
    assert run([30, 2], slice(30, 32)) == []  # (in a trailing micro-batch of 2: 6b6d27e warned)
    assert run([16, 16], slice(0, 0)) == []  # (labels of both tasks everywhere)
    said = run([16, 16], slice(0, 32))  # (task_b without labels in every micro-batch: at its bound, 0, in each)
    assert len(said) == 1 and "the term(s) task_b = 0 " in said[0], said
    assert "task_a = " in said[0].split("each weigh under")[0], said
