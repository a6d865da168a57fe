"""The loss-weighting methods (UW, DWA, GradNorm, RLW, FAMO, SDN's schedule) against per-step references
written from the papers (references/weightings.py), and the properties every method shares: the two
calls equal step(), bit-exact resume, bad input refused with nothing changed, AMP, hooks and loggers."""

import copy
import functools
import math
import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import metaweight as mw
from conftest import batch, tiny_net
from references import weightings as ref

NAMES = list(mw.WEIGHTINGS)


def options(name, model):
    """The options each method needs (the others take the papers' defaults)."""
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {"dwa": {"window": 2}, "sdn": {"epochs": 3, "steps_per_epoch": 2},
            "gradnorm": {"shared_parameters": list(module.stages[0].parameters())},
            "rlw": {"seed": 3}}.get(name, {})


def build(name, *, teachers="dense", seed=0, **extra):
    torch.manual_seed(seed)
    model = tiny_net(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    w = mw.WEIGHTINGS[name](model, optimizer, mw.DenseDistillLoss(3, teachers=teachers),
                            **options(name, model), **extra)
    return w, model, optimizer


def batches(n=6, size=16):
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(size, 6, generator=g), torch.randint(0, 5, (size,), generator=g)) for _ in range(n)]


# ------------------------------------------------------------------ against the references
class Scripted(nn.Module):
    """A 'model' whose outputs are loss terms written by hand: x = (values [K], gradients [K, P]) gives
    terms equal to the values, whose gradients on ``shared`` are the rows of the gradients."""

    def __init__(self, P=3):
        super().__init__()
        self.shared = nn.Parameter(torch.zeros(P, dtype=torch.float64))

    def forward(self, x):
        values, grads = x
        return values + grads @ self.shared


def scripted(name, K, **kw):
    model = Scripted()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    names = [f"ce[{k + 1}]" for k in range(K)]
    return mw.WEIGHTINGS[name](model, opt, lambda outputs, target: outputs, term_names=names, **kw), model


LOSSES = [[2.3, 1.9, 0.7], [2.1, 1.5, 0.72], [1.8, 1.4, 0.5], [1.7, 1.0, 0.52], [1.2, 0.9, 0.3], [1.1, 0.5, 0.31],
          [0.9, 0.45, 0.2], [0.8, 0.44, 0.19]]
ZERO_START = [[L[0], 0.0 if t < 2 else L[1], L[2]] for t, L in enumerate(LOSSES)]  # (a term exactly 0 at first)
AFTER = [[v * f for v, f in zip(L, (0.97, 0.9, 1.01))] for L in LOSSES]
GRADS = [[[0.5, -1.0, 2.0], [0.1, 0.2, 0.3], [1.5, 0.0, -0.5]], [[0.4, -0.9, 1.5], [0.2, 0.2, 0.2], [1.0, 0.1, -0.4]],
         [[0.3, -0.5, 1.0], [0.3, 0.1, 0.2], [0.9, 0.1, -0.2]], [[0.2, -0.4, 0.9], [0.5, 0.1, 0.1], [0.5, 0.1, -0.1]],
         [[0.2, -0.3, 0.5], [0.6, 0.1, 0.0], [0.3, 0.2, -0.1]], [[0.1, -0.2, 0.4], [0.5, 0.2, 0.1], [0.2, 0.1, 0.0]],
         [[0.1, -0.1, 0.3], [0.4, 0.2, 0.1], [0.2, 0.0, 0.1]], [[0.1, -0.1, 0.2], [0.4, 0.1, 0.1], [0.1, 0.1, 0.1]]]


def run_scripted(w, before=LOSSES, after=None, grads=None):
    """Feed the terms by hand through the two calls; the weights of every iteration (and the last's)."""
    zeros = torch.zeros(3, 3, dtype=torch.float64)
    out = [w.gamma.tolist()]
    for t, L in enumerate(before):
        g = torch.tensor(grads[t], dtype=torch.float64) if grads else zeros
        w.loss(w.model((torch.tensor(L, dtype=torch.float64), g)), None)
        w.optimizer.step()  # (the model's step, here none: no gradient; a meta_step after no step learns nothing)
        train = ((torch.tensor(after[t], dtype=torch.float64), zeros), None) if after else None
        w.meta_step(train)
        out.append(w.gamma.tolist())
    return out


def assert_close(got, expected, rtol=1e-5, atol=1e-7):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, rel=rtol, abs=atol), (got, expected)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_update_is_torch_adams_step(weight_decay):
    """The methods' own Adam step (pure: new tensors, nothing in place) equals ``torch.optim.Adam``'s."""
    from metaweight._weighting import adam_update

    g = torch.Generator().manual_seed(0)
    param = torch.randn(5, dtype=torch.float64, generator=g)
    real = param.clone().requires_grad_(True)
    adam = torch.optim.Adam([real], lr=0.03, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay)
    m, v = torch.zeros_like(param), torch.zeros_like(param)
    for step in range(1, 6):
        grad = torch.randn(5, dtype=torch.float64, generator=g)
        real.grad = grad.clone()
        adam.step()
        param, m, v = adam_update(param, grad, m, v, step, lr=0.03, betas=(0.8, 0.99), eps=1e-6,
                                  weight_decay=weight_decay)
        torch.testing.assert_close(param, real.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(m, adam.state[real]["exp_avg"], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(v, adam.state[real]["exp_avg_sq"], rtol=1e-12, atol=1e-14)


def test_uw_matches_the_reference():
    w, _ = scripted("uw", 3)
    assert_close(run_scripted(w), ref.uw(LOSSES, lr=0.01))
    w, _ = scripted("uw", 3, lr=0.3)  # a larger step, so the weights move far from 1
    got = run_scripted(w)
    assert_close(got, ref.uw(LOSSES, lr=0.3))
    assert max(abs(v - 1) for v in got[-1]) > 0.5


def test_uw_loss_is_the_papers_classification_form():
    w, model = scripted("uw", 3, lr=0.3)
    run_scripted(w)
    L = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    s = w.log_vars.double()
    assert float(w.loss(L, None)) == pytest.approx(float((torch.exp(-s) * L + s / 2).sum()), rel=1e-6)


@pytest.mark.parametrize("window", [1, 2, 3])
@pytest.mark.parametrize("losses", ["", "a term 0 at the first two iterations"])
def test_dwa_matches_the_reference_and_sums_to_the_number_of_terms(window, losses):
    """DWA against Eq. 7; a term exactly 0 over a window (distillation between heads initialised to zero) has no
    rate there: 1 (dividing by its average of 0 refused every later update, the averages never moving on)."""
    losses = ZERO_START if losses else LOSSES
    w, _ = scripted("dwa", 3, window=window)
    got = run_scripted(w, before=losses)
    assert_close(got, ref.dwa(losses, window))
    for g in got:
        assert sum(g) == pytest.approx(3, rel=1e-6)
    assert got[-1] != [1.0, 1.0, 1.0]


def test_dwa_temperature():
    w, _ = scripted("dwa", 3, window=1, temperature=0.5)
    assert_close(run_scripted(w), ref.dwa(LOSSES, 1, temperature=0.5))


def test_rlw_matches_the_reference_softmax_of_its_seeded_draws():
    w, _ = scripted("rlw", 3, seed=5)
    got = run_scripted(w)
    g = torch.Generator().manual_seed(5)
    draws = [torch.randn(3, generator=g).tolist() for _ in range(len(got))]
    assert_close(got, ref.rlw(draws), rtol=1e-6)
    for v in got:
        assert all(x > 0 for x in v) and sum(v) == pytest.approx(1, rel=1e-6)


def test_famo_matches_the_reference():
    w, _ = scripted("famo", 3)
    got = run_scripted(w, after=AFTER)
    zs, _ = ref.famo(LOSSES, AFTER)
    assert_close(got, zs)
    w, _ = scripted("famo", 3, lr=0.5, weight_decay=0.01, min_losses=[0.1, 0.0, 0.05])
    got = run_scripted(w, after=AFTER)
    zs, effective = ref.famo(LOSSES, AFTER, lr=0.5, weight_decay=0.01, min_losses=[0.1, 0.0, 0.05])
    assert_close(got, zs)
    assert max(got[-1]) - min(got[-1]) > 0.05  # the weights moved


def test_famo_gradient_weights_each_term_by_z_over_c_d():
    w, _ = scripted("famo", 3, lr=0.5)
    zs, effective = ref.famo(LOSSES, AFTER, lr=0.5)
    zeros = torch.zeros(3, 3, dtype=torch.float64)
    for t, L in enumerate(LOSSES):
        terms = torch.tensor(L, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(w.loss(terms, None), terms)
        assert_close(grad.tolist(), effective[t])
        w.optimizer.step()  # (the model's step, here none: a meta_step after no step learns nothing)
        w.meta_step(((torch.tensor(AFTER[t], dtype=torch.float64), zeros), None))


@pytest.mark.parametrize("losses", [LOSSES, ZERO_START], ids=["", "a term 0 at the first two iterations"])
@pytest.mark.parametrize("alpha", [1.5, 0.5])
def test_gradnorm_matches_the_reference(alpha, losses):
    """GradNorm against the paper's Alg. 1; a term exactly 0 at the first iteration (distillation between heads
    initialised to zero) has no rate: r_k = 1, the mean of the rates over the others (with L_k(0) = 0 its rate
    was NaN, which torch.sign made 0: its weight never learned, and nothing was refused)."""
    w, _ = scripted_gradnorm(alpha)
    got = run_scripted(w, before=losses, grads=GRADS)
    norms = [[math.sqrt(sum(v * v for v in row)) for row in G] for G in GRADS]
    assert_close(got, ref.gradnorm(losses, norms, alpha=alpha, lr=0.01))
    for g in got:
        assert sum(g) == pytest.approx(3, rel=1e-6)


def scripted_gradnorm(alpha, lr=0.01):
    model = Scripted()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = mw.GradNorm(model, opt, lambda outputs, target: outputs, term_names=["a", "b", "c"],
                    shared_parameters=[model.shared], alpha=alpha, lr=lr)
    return w, model


def test_gradnorm_per_term_loop_equals_the_batched_backward():
    w1, _ = scripted_gradnorm(1.5, lr=0.1)
    w2, _ = scripted_gradnorm(1.5, lr=0.1)
    w2._batched = False
    assert run_scripted(w1, grads=GRADS) == run_scripted(w2, grads=GRADS)


@pytest.mark.parametrize("first", [1, 0], ids=["exits ce[1] ...", "exits ce[0] ..."])
def test_sdn_matches_the_authors_schedule(first):
    """The default C_k = k/K by the exits' order, numbered from 1 or from 0 (from 0, C_k = k/K of the numbers gave
    the first exit C = 0, refused as if the user had passed max_weights)."""
    model = Scripted()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    w = mw.SDNSchedule(model, optimizer, lambda o, t: o,
                       term_names=[f"ce[{k + first}]" for k in range(4)], epochs=3, steps_per_epoch=2)
    got = [w.gamma.tolist()]
    for _ in range(8):
        optimizer.step()  # (the model's step: no loss() call needed, as the schedule reads no terms)
        w.meta_step()
        got.append(w.gamma.tolist())
    assert_close(got, ref.sdn([0.25, 0.5, 0.75, None], 3, 2, 9))
    assert got[-1] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # held at C_k after the last epoch


def test_sdn_loads_a_checkpoint_whose_schedule_counted_the_meta_step_calls():
    """Before its schedule counted the model steps taken, SDN's counted the meta_step calls (a GradScaler's skipped
    step among them): such a checkpoint, whose weights are the schedule's at num_calls, loads (it was refused as
    edited); one whose weights are neither is refused."""
    w, model, _ = build("sdn")
    for b in batches(3):
        w.step(b)
    saved = w.state_dict()
    old = {**saved, "num_calls": saved["num_calls"] + 2}
    old["gamma"] = (w._weights_at(old["num_calls"]) * w._terms.active).float()
    assert not torch.allclose(old["gamma"], saved["gamma"])
    w.load_state_dict(old)
    assert torch.equal(w.gamma.cpu(), old["gamma"])
    with pytest.raises(ValueError, match="rule"):
        w.load_state_dict({**old, "gamma": old["gamma"] * 1.5})


def test_sdn_max_weights_by_name():
    w, *_ = build("sdn", teachers="none", max_weights={"ce[1]": 0.15, "ce[2]": 0.3})
    assert w.gamma_dict()["ce[1]"] == pytest.approx(0.01 + 0.15 / 3)
    assert w.gamma_dict()["ce[3]"] == 1.0 and w.gamma_dict()["kd[2->1]"] == 0.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.floats(0.01, 10.0), min_size=4, max_size=4), min_size=2, max_size=6),
       st.floats(0.1, 5.0))
def test_invariances_dwa_sums_to_k_famo_is_a_softmax(losses, temperature):
    w, _ = scripted("dwa", 4, window=1, temperature=temperature)
    z = torch.zeros(4, 3, dtype=torch.float64)
    f, _ = scripted("famo", 4, lr=0.3)
    for L in losses:
        v = torch.tensor(L, dtype=torch.float64)
        w.loss(v, None)
        w.meta_step()
        assert float(w.gamma.sum()) == pytest.approx(4, rel=1e-5) and (w.gamma >= 0).all()
        f.loss(v, None)
        f.meta_step(((v * 0.9, z), None))
        assert torch.allclose(f.gamma, torch.softmax(f.logits, 0)) and float(f.gamma.sum()) == pytest.approx(1)


# ------------------------------------------------------------------ properties every method has
def same_state(a, b):
    """Whether two state dicts hold the same values, tensors bit for bit (not whether each was saved between an
    optimizer step and its meta step: the iteration's, not the method's state)."""
    if isinstance(a, dict) and "meta_step_due" in a:
        a, b = ({k: v for k, v in d.items() if k != "meta_step_due"} for d in (a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("name", NAMES)
def test_two_calls_equal_step(name):
    w1, m1, o1 = build(name)
    w2, m2, o2 = build(name)
    for x, y in batches(5):
        r1 = w1.step((x, y))
        o2.zero_grad()
        loss = w2.loss(m2(x), y)
        loss.backward()
        o2.step()
        r2 = w2.meta_step((x, y))
        assert r1.gamma == r2.gamma and r1.loss == float(loss.detach())
    assert torch.equal(w1.gamma, w2.gamma)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_weights_finite_non_negative_and_zero_on_inactive_terms(name):
    w, *_ = build(name, teachers="last")
    for b in batches(6):
        record = w.step(b)
    active = w.criterion.active
    assert torch.isfinite(w.gamma).all() and (w.gamma >= 0).all()
    assert (w.gamma[~active] == 0).all() and (w.gamma[active] > 0).all()
    assert record.iteration == 6 and record.ran and set(record.gamma) == set(w.term_names)
    assert w.num_meta_steps == 6
    total = {"dwa": 5, "gradnorm": 5, "rlw": 1, "famo": 1}.get(name)
    if total is not None:
        assert float(w.gamma.sum()) == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_resume_is_bit_exact(name):
    data = batches(7)
    w, model, opt = build(name)
    for b in data[:3]:
        w.step(b)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), copy.deepcopy(w.state_dict()))
    for b in data[3:]:
        w.step(b)
    w2, model2, opt2 = build(name, seed=123)  # a fresh start elsewhere: everything comes from the checkpoint
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    w2.load_state_dict(saved[2])
    for b in data[3:]:
        w2.step(b)
    assert torch.equal(w.gamma, w2.gamma)
    assert same_state(w.state_dict(), w2.state_dict())
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_bad_checkpoints_are_refused_changing_nothing(name):
    w, *_ = build(name)
    for b in batches(3):
        w.step(b)
    good = w.state_dict()
    other = "uw" if name != "uw" else "dwa"
    bad = [
        ([], TypeError, "should be a dict"),
        ({k: v for k, v in good.items() if k != "gamma"}, ValueError, "lacks"),
        ({**good, "weighting": "Other"}, ValueError, "weighting 'Other'"),
        ({**good, "term_names": good["term_names"][::-1]}, ValueError, "for the terms"),
        ({**good, "gamma": good["gamma"][:2]}, ValueError, "shape"),
        ({**good, "gamma": torch.full_like(good["gamma"], math.nan)}, ValueError, "non-finite"),
        ({**good, "num_calls": -1}, ValueError, "counters"),
        (build(other)[0].state_dict(), ValueError, "weighting"),
    ]
    for w_ in batches(1):
        w.loss(w.model(w_[0]), w_[1])
    before = copy.deepcopy(w.state_dict())
    for state, error, match in bad:
        with pytest.raises(error, match=match):
            w.load_state_dict(state)
        assert same_state(before, w.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_terms_are_refused_changing_nothing(name):
    w, model, opt = build(name)
    x, y = batch()
    for b in batches(2):
        w.step(b)
    before = copy.deepcopy(w.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    bad_x = x.clone()
    bad_x[0, 0] = math.nan
    with pytest.raises(ValueError, match="not finite"):
        w.step((bad_x, y))
    assert same_state(before, w.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    if name != "famo":  # a loop guarding the backward alone: the step took no gradient of the NaN terms, which
        # were refused as terms the model stepped on (helper-178); skipped, nothing changed
        w.loss([o * math.nan for o in model(x)], y)
        opt.step()  # (no gradient is left from the refused step(): a step changing nothing)
        assert w.meta_step((x, y)).skipped
        before["num_calls"] += 1
        assert same_state(before, w.state_dict())


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
@pytest.mark.parametrize("name", NAMES)
def test_a_step_taken_on_non_finite_terms_is_refused_by_every_rule(name, nonfinite):
    """The loop steps on a NaN loss (no GradScaler to skip it), then calls meta_step: every weighting refuses the
    update (raise) or skips it (skip: warned, counted), its weights and state unchanged, as step() does; RLW and
    SDN, whose rules read no terms, drew new weights or moved their schedule on. The model's own step was the
    loop's."""
    w, model, optimizer = build(name, nonfinite=nonfinite)
    for b in batches(2):
        w.step(b)
    before = copy.deepcopy(w.state_dict())
    x, y = batch()
    loss = w.loss([o * math.nan for o in model(x)], y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if nonfinite == "raise":
        with pytest.raises(ValueError, match="non-finite values|are not finite"):
            w.meta_step((x, y))
    else:
        with pytest.warns(RuntimeWarning, match="Skipped an update"):
            assert w.meta_step((x, y)).skipped
        assert (w.num_skipped, w.num_meta_steps) == (1, 2)
        before["num_calls"] += 1
        before["num_skipped"] += 1
    assert same_state(before, w.state_dict())


def test_a_weighting_s_step_made_non_finite_by_an_eps_that_is_0_in_float16_says_so():
    """The weightings' step() names an Adam eps that is 0 in float16 parameters, as the weighter does."""
    torch.manual_seed(0)
    model = tiny_net(3, dtype=torch.float16)
    w = mw.UW(model, torch.optim.Adam(model.parameters(), lr=1e-2), mw.DenseDistillLoss(3))
    with pytest.raises(ValueError, match=r"eps \(1e-08\) is 0 in float16"):
        for _ in range(3):
            w.step(batch(dtype=torch.float16))


@pytest.mark.parametrize("name", NAMES)
def test_skip_counts_and_warns(name):
    w, *_ = build(name, nonfinite="skip")
    x, y = batch()
    x[0, 0] = math.nan
    with pytest.warns(RuntimeWarning, match="Skipped"):
        record = w.step((x, y))
    assert record.model_step_skipped and w.num_skipped == 1 and w.num_meta_steps == 0


@pytest.mark.parametrize("name", [n for n in NAMES if mw.WEIGHTINGS[n].needs_terms])
def test_meta_step_before_loss_is_refused(name):
    """A meta_step after an optimizer step with no loss() call is refused (the terms it reads are the loss() calls'),
    changing nothing. One with no optimizer step since the weighting was built (a loop calling it at the top of each
    iteration, or a batch skipped before any loss() call: Lightning's manual optimization, helper-173) is skipped."""
    w, model, optimizer = build(name)
    before = copy.deepcopy(w.state_dict())
    assert w.meta_step(batch()).skipped and w.num_calls == 1
    optimizer.step()
    with pytest.raises(ValueError, match="call loss = weighting.loss"):
        w.meta_step(batch())
    assert torch.equal(before["gamma"], w.state_dict()["gamma"]) and w.num_calls == 1


def test_famo_needs_the_train_batch():
    w, model, optimizer = build("famo")
    x, y = batch()
    w.loss(model(x), y).backward()
    optimizer.step()
    with pytest.raises(ValueError, match="needs the batch"):
        w.meta_step()
    with pytest.raises(ValueError, match="pair"):
        w.meta_step([x])
    w.meta_step((x, y))  # the pending terms survived the refusals


def test_famo_extra_forward_leaves_buffers_and_random_state_alone():
    w, model, opt = build("famo")
    x, y = batch()
    w.loss(model(x), y).backward()
    opt.step()
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    w.meta_step((x, y))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert torch.equal(rng, torch.get_rng_state())


@pytest.mark.parametrize("autocast", [False, True])
def test_famo_without_a_step_sees_no_change(autocast):
    """No model step between the two forwards: delta is 0 and xi stays 0, also when only loss() ran under
    autocast (the forward after the step repeats it)."""
    w, model, _ = build("famo")
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        w.loss(model(x), y)
    w.meta_step((x, y))
    assert torch.equal(w.logits, torch.zeros_like(w.logits))


NEGATIVE = {"negative from the start": [[-L[0], L[1], L[2]] for L in LOSSES],
            "a change of sign": [[L[0], L[1] - 1.2, L[2]] for L in LOSSES]}  # (b: 0.7, 0.3, 0.2, -0.2, ...)


@pytest.mark.parametrize("alpha", [1.0, 2.0, 1.5])
@pytest.mark.parametrize("case", list(NEGATIVE))
def test_gradnorm_refuses_negative_terms_whatever_alpha(case, alpha):
    """GradNorm's rates L_k(t)/L_k(0) need terms >= 0 (Chen et al. 2018, Alg. 1; helper-144): a term negative from
    the start gave a rate that grows as the term falls, its weight learned the wrong way without a word, and a
    change of sign was refused only where alpha is fractional (a negative rate to a fractional power is NaN).
    Whatever alpha, the first update with a negative term is refused, naming it, and changes nothing; until then
    the weights are the reference's."""
    w, _ = scripted_gradnorm(alpha)
    losses = NEGATIVE[case]
    first = next(t for t, L in enumerate(losses) if min(L) < 0)
    if first:
        assert_close(run_scripted(w, before=losses[:first], grads=GRADS[:first]), ref.gradnorm(losses[:first], [
            [math.sqrt(sum(v * v for v in row)) for row in G] for G in GRADS[:first]], alpha=alpha, lr=0.01))
    w.loss(w.model((torch.tensor(losses[first], dtype=torch.float64), torch.tensor(GRADS[first], dtype=torch.float64))),
           None)
    w.optimizer.step()  # (the model's step, here none: a meta_step after no step learns nothing)
    before = copy.deepcopy(w.state_dict())
    with pytest.raises(ValueError, match=r"GradNorm.*need terms >= 0.*\['a'\] are negative" if first == 0 else
                       r"GradNorm.*need terms >= 0.*\['b'\] are negative"):
        w.meta_step(None)
    after = w.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]) if isinstance(before[k], torch.Tensor) else before[k] == after[k], k


class _ShiftedTerms(nn.Module):
    """Three squared errors, each shifted by a constant (the gradient is the same; the sign is not)."""

    term_names = ["a", "b", "c"]

    def __init__(self, shift):
        super().__init__()
        self.shift = torch.tensor(shift)

    def forward(self, outputs, target):
        return (outputs - target).pow(2).mean(0) + self.shift


def test_gradnorm_step_refuses_a_negative_term_before_the_model_s_step():
    """step() with nonfinite='raise' refuses a step whose terms GradNorm cannot learn from before the model's
    step (helper-148: it took the model's step, then raised that nothing had changed, num_calls 0): the model,
    optimizer state, weights and counters are as before, and the same step with the terms shifted >= 0 goes through.
    With nonfinite='skip' the model steps (its gradient is finite) and the update is skipped, with a warning.
    A checkpoint whose L_k(0) is negative, which no run makes, is refused."""
    x, y = torch.randn(8, 4), torch.randn(8, 3)

    def make(shift, **options):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, optimizer, mw.GradNorm(model, optimizer, _ShiftedTerms(shift),
                                             shared_parameters=list(model[0].parameters()), **options)

    model, optimizer, w = make([0.0, 0.0, 0.0])
    w.step((x, y))  # (a step first: optimizer state and L_k(0) to keep)
    before = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), copy.deepcopy(w.state_dict()))
    w.criterion.shift = torch.tensor([0.0, -5.0, 0.0])
    with pytest.raises(ValueError, match=r"GradNorm cannot update.*\['b'\] are negative.*step was not taken"):
        w.step((x, y))
    after = (model.state_dict(), optimizer.state_dict(), w.state_dict())
    assert (w.num_calls, w.num_meta_steps, w.num_skipped) == (1, 1, 0)
    assert repr(after) == repr(before)  # (every tensor printed whole: 4 to 12 values each)
    assert all(p.grad is None for p in model.parameters())
    w.criterion.shift = torch.tensor([0.0, 5.0, 0.0])
    w.step((x, y))
    assert (w.num_calls, w.num_meta_steps) == (2, 2)

    model, optimizer, w = make([0.0, -5.0, 0.0], nonfinite="skip")
    start = copy.deepcopy(model.state_dict())
    with pytest.warns(RuntimeWarning, match=r"\['b'\] are negative"):
        record = w.step((x, y))
    assert not record.model_step_skipped and (w.num_calls, w.num_meta_steps, w.num_skipped) == (1, 0, 1)
    assert not torch.equal(start["0.weight"], model[0].weight)
    assert torch.equal(w.gamma, torch.ones(3))

    state = make([0.0, 0.0, 0.0])[2].state_dict()
    state["initial_losses"] = torch.tensor([0.5, -1.0, 0.5])
    with pytest.raises(ValueError, match=r"initial_losses.*negative.*L_k\(0\)"):
        w.load_state_dict(state)


def test_an_update_refused_after_step_s_model_step_says_the_model_stepped():
    """UW with a term negative (its weight grows without bound; helper-150): the terms grow until the update is not
    finite, which step() learns only in meta_step, after the model's step, finite, was taken. The refusal said the
    weights and state were unchanged, as if nothing had happened; it says the model's step was taken and stays,
    and that is what happened."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    w = mw.UW(model, torch.optim.SGD(model.parameters(), lr=0.1), _ShiftedTerms([0.0, -5.0, 0.0]), lr=0.5)
    for _ in range(100):
        before = [p.detach().clone() for p in model.parameters()]
        gamma = w.gamma.clone()
        try:
            w.step((x, y))
        except ValueError as exc:
            assert "gave non-finite values" in str(exc) and "The model's step of this step() call was taken" in str(exc)
            assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())) and torch.equal(gamma, w.gamma)
            return
    raise AssertionError("the update never went non-finite")


def test_gradnorm_refuses_a_loss_without_graph():
    w, model, _ = build("gradnorm")
    x, y = batch()
    with torch.no_grad():
        w.loss(model(x), y)
    with pytest.raises(ValueError, match="no graph"):
        w.meta_step((x, y))


BAD_OPTIONS = [
    ("uw", {"lr": -1}, "Invalid lr"),
    ("uw", {"betas": (0.9, 1.0)}, "Invalid betas"),
    ("dwa", {"window": 0}, "Invalid window"),
    ("dwa", {"window": 2, "temperature": 0}, "Invalid temperature"),
    ("famo", {"weight_decay": math.nan}, "Invalid weight_decay"),
    ("famo", {"min_losses": [0.0]}, "min_losses"),
    ("rlw", {"seed": -1}, "Invalid seed"),
    ("rlw", {"nonfinite": "ignore"}, "Invalid nonfinite"),
    ("sdn", {"epochs": 0, "steps_per_epoch": 1}, "Invalid epochs"),
    ("sdn", {"epochs": 2, "steps_per_epoch": 1, "max_weights": {"ce[9]": 0.5}}, "does not have"),
    ("sdn", {"epochs": 2, "steps_per_epoch": 1, "max_weights": {"ce[1]": -0.5}}, "> 0"),
    # the cap is named, not only "> 0" (2e6 is > 0)
    ("sdn", {"epochs": 2, "steps_per_epoch": 1, "max_weights": {"ce[1]": 2e6}}, r"at most 1e6.*2000000\.0"),
    ("gradnorm", {"shared_parameters": []}, "shared_parameters"),
    ("gradnorm", {"shared_parameters": [torch.zeros(3, requires_grad=True)]}, "parameters of `model`"),
    ("gradnorm", {"shared_parameters": [torch.zeros(3)], "alpha": -1.0}, "Invalid alpha"),
]


@pytest.mark.parametrize("name,bad,match", BAD_OPTIONS)
def test_bad_options_are_refused(name, bad, match):
    model = tiny_net(3)
    with pytest.raises((ValueError, TypeError), match=match):
        mw.WEIGHTINGS[name](model, torch.optim.SGD(model.parameters(), lr=0.1), mw.DenseDistillLoss(3), **bad)


def test_bad_model_optimizer_and_criterion_are_refused():
    model = tiny_net(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="`model`"):
        mw.UW("net", opt, mw.DenseDistillLoss(3))
    with pytest.raises(TypeError, match="`optimizer`"):
        mw.UW(model, None, mw.DenseDistillLoss(3))
    with pytest.raises(ValueError, match="Name the loss terms"):
        mw.UW(model, opt, lambda o, t: torch.zeros(3))
    with pytest.raises(ValueError, match="named ce"):
        mw.SDNSchedule(model, opt, lambda o, t: torch.zeros(2), term_names=["a", "b"], epochs=1, steps_per_epoch=1)


@pytest.mark.parametrize("name", NAMES)
def test_any_terms_criterion_works(name):
    """A custom criterion of named terms (two heads' CE and an L2 penalty), not a DenseDistillLoss."""
    torch.manual_seed(0)
    model = tiny_net(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def criterion(outputs, target):
        ce = torch.stack([nn.functional.cross_entropy(o, target) for o in outputs])
        return torch.cat([ce, (outputs[-1] ** 2).mean().reshape(1)])

    extra = {"dwa": {"window": 2}, "gradnorm": {"shared_parameters": list(model.stages[0].parameters())},
             "sdn": {"epochs": 2, "steps_per_epoch": 2}}.get(name, {})
    w = mw.WEIGHTINGS[name](model, opt, criterion, term_names=["ce[1]", "ce[2]", "l2"], **extra)
    for b in batches(4):
        record = w.step(b)
    assert set(record.gamma) == {"ce[1]", "ce[2]", "l2"} and torch.isfinite(w.gamma).all()


@pytest.mark.parametrize("name", NAMES)
def test_amp_autocast_two_calls(name):
    w, model, opt = build(name)
    for x, y in batches(3):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = w.loss(model(x), y)
        assert loss.dtype == torch.float32
        loss.backward()
        opt.step()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            record = w.meta_step((x, y))
    assert record.ran and torch.isfinite(w.gamma).all()


@pytest.mark.parametrize("name", NAMES)
def test_hooks_and_loggers_receive_the_record(name, tmp_path):
    seen = []
    path = tmp_path / "log.csv"
    w, *_ = build(name, callbacks=[mw.CSVLogger(path)])
    handle = w.register_meta_step_hook(seen.append)
    for b in batches(3):
        w.step(b)
    handle.remove()
    w.step(batches(1)[0])
    assert len(seen) == 3 and all(isinstance(r, mw.MetaStepRecord) for r in seen)
    lines = path.read_text().splitlines()
    assert len(lines) == 5 and "gamma/ce[1]" in lines[0] and "term/kd[2->1]" in lines[0]


@pytest.mark.parametrize("name", NAMES)
def test_repr_names_the_settings(name):
    w, *_ = build(name)
    text = repr(w)
    assert text.startswith(type(w).__name__) and "ce[1]" in text


def test_every_method_and_the_harmonized_weighter_satisfy_one_protocol():
    model = tiny_net(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert isinstance(mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(3)), mw.LossWeighting)
    for name in NAMES:
        assert isinstance(build(name)[0], mw.LossWeighting), name


@pytest.mark.parametrize("name", NAMES)
def test_a_grad_scaler_changes_nothing(name):
    """The weights never see the scaled loss: with a GradScaler (a power of 2, so exact in float32) the
    weights and the model follow the unscaled run bit for bit."""
    w1, m1, o1 = build(name)
    w2, m2, o2 = build(name)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for x, y in batches(4):
        w1.step((x, y))
        o2.zero_grad()
        scaler.scale(w2.loss(m2(x), y)).backward()
        scaler.step(o2)
        scaler.update()
        w2.meta_step((x, y))
    assert torch.equal(w1.gamma, w2.gamma)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


@pytest.mark.parametrize("name", ["HarmonizedWeighter"] + sorted(mw.WEIGHTINGS))
def test_term_names_of_another_length_are_named(name):
    """term_names with fewer or more names than the criterion's terms: the lengths, not the mask."""
    model = tiny_net(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    make = mw.HarmonizedWeighter if name == "HarmonizedWeighter" else mw.WEIGHTINGS[name]
    extra = {} if name == "HarmonizedWeighter" else options(name, model)
    for names in (["a"], ["a", "b", "c", "d"]):
        with pytest.raises(ValueError, match=rf"`term_names` has {len(names)} names, but `DenseDistillLoss` has 3"):
            make(model, optimizer, mw.DenseDistillLoss(2), term_names=names, **extra)
    same = ["ce[1]", "ce[2]", "kd[2->1]"]  # as many names as terms: taken as given
    assert make(model, optimizer, mw.DenseDistillLoss(2), term_names=same, **extra).term_names == same


@pytest.mark.parametrize("name", NAMES)
def test_gradient_accumulation_gives_the_whole_batch_s_update(name):
    """Four micro-batch losses, each divided by four, backpropagated before one optimizer step: meta_step reads
    the iteration's terms (and GradNorm its terms' gradients) as the whole batch gives them, their mean over the
    loss() calls by samples, not the last call's; also where a meta_step followed every micro-batch (skipped
    until the step; SDN's schedule too, which counted those calls; with an auxiliary loss summed after
    weighting.loss, on a parameter only it reaches, too: the kept calls were dropped; also where its gradient
    is zeros, 0 * p.sum(): that gradient, all zeros, was read as a zeroing). A loss() under torch.no_grad() (logging) between is not summed,
    loss() calls of an iteration whose meta_step never came, or whose step was skipped (zero_grad after them), are
    not carried into the next (a fused optimizer's step counted, a subclass's chained step() counted once), and a
    parameter changed in place between micro-batches (a clamp) starts no new one."""
    torch.manual_seed(0)
    net = mw.MultiExit([nn.Sequential(nn.Linear(6, 16), nn.Tanh()), nn.Sequential(nn.Linear(16, 16), nn.Tanh()),
                        nn.Sequential(nn.Linear(16, 16), nn.Tanh())], [nn.Linear(16, 5) for _ in range(3)]).double()
    runs = {}
    class ChainedSGD(torch.optim.SGD):  # (torch runs the step hooks once per level of step())
        def step(self, closure=None):
            return super().step(closure)

    forms = ("whole", "accumulated", "accumulated, stale", "accumulated, clamped", "accumulated, skipped",
             "accumulated, chained", "accumulated, meta_step after each", "accumulated, meta_step after each, aux",
             "accumulated, meta_step after each, zero aux")
    for form in forms:
        model = copy.deepcopy(net)
        model.aux = nn.Parameter(torch.ones(3, dtype=torch.float64))  # (reached by an auxiliary loss only)
        kind = ChainedSGD if form.endswith("chained") else functools.partial(torch.optim.SGD, fused=True)
        optimizer = kind(model.parameters(), lr=0.1)  # (a fused kernel bumps no parameter versions)
        w = mw.WEIGHTINGS[name](model, optimizer, mw.DenseDistillLoss(3), **options(name, model))
        gammas = []
        for i, (x, y) in enumerate(batches(4, size=16)):
            x = x.double()
            optimizer.zero_grad()
            if form == "whole":
                w.loss(model(x), y).backward()
            else:
                if form.endswith("skipped") and i == 2:  # an iteration whose step was skipped, and its meta_step
                    for part in range(4):
                        (w.loss(model(x[4 * part:4 * part + 4]), y[4 * part:4 * part + 4]) / 4).backward()
                    optimizer.zero_grad()
                if form.endswith("stale") and i == 2:  # an iteration whose meta_step never came (undone)
                    previous = [p.detach().clone() for p in model.parameters()]
                    w.loss(model(x), y).backward()
                    optimizer.step()
                    optimizer.zero_grad()
                    with torch.no_grad():
                        for p, q in zip(model.parameters(), previous):
                            p.copy_(q)
                for part in range(4):
                    cut = slice(4 * part, 4 * part + 4)
                    loss = w.loss(model(x[cut]), y[cut])
                    if form.endswith("zero aux"):  # (DDP's unused-parameter idiom: writes zeros, no zero_grad)
                        loss = loss + 0 * model.aux.sum()
                    elif form.endswith("aux"):  # summed after: autograd writes its gradient before the hook on loss
                        loss = loss + model.aux.square().sum()
                    (loss / 4).backward()
                    with torch.no_grad():
                        w.loss(model(x[:1]), y[:1])  # logged, not summed
                        if form.endswith("clamped"):  # an in-place change that is not a step
                            for p in model.parameters():
                                p.clamp_(-10, 10)
                    if "after each" in form and part < 3:  # Accelerate's accumulate(): no step yet, warned
                        with pytest.warns(RuntimeWarning, match="after a micro-batch it did not step on"):
                            assert w.meta_step((x[cut], y[cut])).skipped
            optimizer.step()
            gammas.append(w.meta_step((x, y)).gamma)
        runs[form] = gammas
    # FAMO's loss is not linear in the terms (log D_k, D_k the micro-batch's own): the model's accumulated step is
    # not the whole batch's, and the weights follow it to about 1e-6 (reading the last call's terms: 1e-1)
    tolerance = 1e-4 if name == "famo" else 1e-9
    for form in forms[1:]:
        for a, b in zip(runs["whole"], runs[form]):
            assert all(math.isclose(a[k], b[k], rel_tol=tolerance, abs_tol=1e-12) for k in a), (form, a, b)


def test_famo_refuses_a_part_of_an_accumulated_batch_changing_nothing():
    w, model, optimizer = build("famo")
    (x, y), _ = batches(2)
    for part in (slice(0, 8), slice(8, 16)):
        (w.loss(model(x[part]), y[part]) / 2).backward()
    optimizer.step()
    before = copy.deepcopy(w.state_dict())
    with pytest.raises(ValueError, match="got a batch of 8 samples, but this iteration's 2 loss\\(\\) calls .* scored "
                                         "16.*torch.cat\\(xs\\).*Nothing was changed"):
        w.meta_step((x[8:], y[8:]))
    assert str(w.state_dict()) == str(before)
    assert w.meta_step((x, y)).ran


def test_a_logger_given_to_a_second_weighter_logs_that_one_alone(tmp_path):
    """Two weightings compared side by side with one CSVLogger: the second's records (its own iterations 1, 2, ...)
    read to the logger as the first's run going back to a checkpoint, which dropped the first's rows. The logger
    logs the weighter given it last; the other's records are not written (one warning), no row is dropped."""
    logger = mw.CSVLogger(tmp_path / "log.csv")
    first, _, _ = build("uw", callbacks=[logger])
    second, _, _ = build("dwa", callbacks=[logger])
    with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        for x, y in batches(4):
            first.step((x, y))
            second.step((x, y))
    said = [str(h.message) for h in heard]
    assert len(said) == 1 and "CSVLogger was given to another weighter since" in said[0], said
    with open(logger.path) as f:
        rows = [line.split(",")[0] for line in f.read().splitlines()]
    assert logger.path == tmp_path / "log.csv" and rows == ["iteration", "1", "2", "3", "4"]
    assert first.num_meta_steps == 4  # (the first weighting's own updates go on)
    import pickle
    copied = pickle.loads(pickle.dumps(second))  # (the loggers' weak references are not pickled: made anew)
    assert copied.callbacks[0]._metaweight_owner() is copied and copy.deepcopy(second).num_meta_steps == 4
    del second  # handed over for good: the first's records do not come back when the second is gone
    import gc
    gc.collect()
    first.step(batches(1)[0])
    with open(logger.path) as f:
        assert [line.split(",")[0] for line in f.read().splitlines()] == ["iteration", "1", "2", "3", "4"]


def test_gradnorm_warns_of_shared_parameters_some_term_does_not_reach():
    """Shared parameters in the second stage: the first exit's terms (ce[1], kd[2->1], kd[3->1]) never pass through
    them, their gradient norm there is exactly 0 at every step, and GradNorm raises their weights without bound:
    a warning names them at the third meta step. Zero-initialised heads (a norm of 0 at the first step only) do
    not warn."""
    import warnings

    for shared, zero_heads, expected in ((1, False, ["ce[1]', 'kd[2->1]', 'kd[3->1]"]), (0, True, [])):
        torch.manual_seed(0)
        model = tiny_net(3)
        if zero_heads:
            with torch.no_grad():
                for p in model.heads.parameters():
                    p.zero_()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        w = mw.GradNorm(model, optimizer, mw.DenseDistillLoss(3),
                        shared_parameters=list(model.stages[shared].parameters()))
        with warnings.catch_warnings(record=True) as heard:
            warnings.simplefilter("always")
            for x, y in batches(4):
                w.step((x, y))
        said = [str(h.message) for h in heard if "GradNorm" in str(h.message)]
        assert len(said) == len(expected) and all(e in m and "first 3 meta steps" in m for e, m in zip(expected, said))


def test_a_checkpoint_loads_only_into_the_options_its_state_depends_on():
    """DWA's window, SDN's epochs, RLW's seed and which terms the criterion computes give the saved state its
    meaning: a checkpoint saved under others is refused by name, nothing changed. Another method's checkpoint
    is named as such; a learning rate may change on resume."""
    cases = [("dwa", {"window": 5}, r"window=2 \(this one: 5\)"), ("sdn", {"epochs": 50}, r"epochs=3 \(this one: 50\)"),
             ("rlw", {"seed": 7}, r"seed=3 \(this one: 7\)"), ("uw", {"teachers": "last"}, "criterion.active differs"),
             ("sdn", {"max_weights": {"ce[1]": 0.2}}, r"max_weights=\{'ce\[1\]': 0.3333.*this one: \{'ce\[1\]': 0.2\}")]
    for name, changed, match in cases:
        w, _, _ = build(name)
        w.step(batches(1)[0])
        saved = w.state_dict()
        torch.manual_seed(0)
        model = tiny_net(3)
        teachers = changed.pop("teachers", "dense")
        other = mw.WEIGHTINGS[name](model, torch.optim.SGD(model.parameters(), lr=0.1),
                                    mw.DenseDistillLoss(3, teachers=teachers), **{**options(name, model), **changed})
        before = copy.deepcopy(other.state_dict())
        with pytest.raises(ValueError, match=match + ".*Nothing was changed"):
            other.load_state_dict(saved)
        assert str(other.state_dict()) == str(before)
    uw, _, _ = build("uw")
    torch.manual_seed(0)
    two = tiny_net(2)  # (a checkpoint for other terms is named by its own terms, not blamed on teachers=)
    saved = mw.UW(two, torch.optim.SGD(two.parameters(), lr=0.1), mw.DenseDistillLoss(2)).state_dict()
    with pytest.raises(ValueError, match=re.escape("is for the terms ['ce[1]', 'ce[2]', 'kd[2->1]']")):
        uw.load_state_dict(saved)
    dwa, _, _ = build("dwa")
    with pytest.raises(ValueError, match="is of the weighting 'UW', not 'DWA'"):
        dwa.load_state_dict(uw.state_dict())
    faster, _, _ = build("uw", lr=0.1)
    faster.load_state_dict(uw.state_dict())
    harmonized = mw.HarmonizedWeighter(uw.model, uw.optimizer, mw.DenseDistillLoss(3))
    with pytest.raises(ValueError, match="a HarmonizedWeighter's, not a UW's"):
        uw.load_state_dict(harmonized.state_dict())
    before = copy.deepcopy(harmonized.state_dict())
    with pytest.raises(ValueError, match="is a UW's \\(a loss weighting\\), not a HarmonizedWeighter's.*Nothing"):
        harmonized.load_state_dict(uw.state_dict())
    assert str(harmonized.state_dict()) == str(before)



def test_accumulated_token_terms_are_weighted_by_their_scored_labels():
    """Token-level labels with padding spread unevenly over two micro-batches: the criterion's terms are means
    over the scored labels, and so is the iteration's mean the update reads (by samples it was not)."""
    torch.manual_seed(0)
    heads = [nn.Linear(5, 4) for _ in range(2)]
    model = nn.Module()
    model.heads = nn.ModuleList(heads)
    model.forward = lambda x: [h(x) for h in model.heads]
    x = torch.randn(4, 6, 5)
    y = torch.randint(0, 4, (4, 6))
    y[:2, 1:] = -100  # the first micro-batch: 2 labels scored, the second: 12
    criterion = mw.DenseDistillLoss(2)
    w = mw.UW(model, torch.optim.SGD(model.parameters(), lr=0.0), criterion)
    whole = criterion(model(x), y)
    for cut in (slice(0, 2), slice(2, 4)):
        (w.loss(model(x[cut]), y[cut]) / 2).backward()
    w.optimizer.step()
    record = w.meta_step((x, y))
    assert all(math.isclose(record.terms[n], float(t), rel_tol=1e-6) for n, t in zip(w.term_names, whole))


def test_a_copy_of_a_weighting_starts_a_new_iteration():
    """The pending loss() calls are keyed by the original optimizer's step count: a deepcopy (or a pickle) holds
    none, and asks for its own loss() (it read a stale earlier call before)."""
    w, model, optimizer = build("uw")
    x, y = batches(1)[0]
    w.loss(model(x), y).backward()
    copied = copy.deepcopy(w)
    with pytest.raises(ValueError, match="call loss = weighting.loss"):
        copied.meta_step((x, y))
    optimizer.step()
    assert w.meta_step((x, y)).ran


@pytest.mark.parametrize("probe", [False, True])
def test_an_iteration_whose_step_was_skipped_is_not_read_by_the_next_in_the_guide_s_order(probe):
    """The guide's loop, loss = w.loss(...); optimizer.zero_grad(); loss.backward(), with the usual guard
    `if torch.isfinite(loss): optimizer.step(); w.meta_step(...)`: a NaN batch's iteration takes no step and no
    meta step, and the next meta step reads its own iteration's terms (it read the mean with the NaN one, and
    raised). With `probe` the optimizer holds the heads only (the stages keep requires_grad and their gradients:
    what the optimizer's zero_grad clears decides). A loss() evaluated with autograd on and never
    backpropagated (a validation loss) is not read either."""
    torch.manual_seed(0)
    model = tiny_net(3)
    params = model.heads.parameters() if probe else model.parameters()
    optimizer = torch.optim.SGD(params, lr=0.1)
    w = mw.UW(model, optimizer, mw.DenseDistillLoss(3))
    read = []
    for i, (x, y) in enumerate(batches(4)):
        if i == 1:
            x = x.clone()
            x[0, 0] = float("nan")
        loss = w.loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        with torch.no_grad():
            expected = w.criterion(model(x), y)
        w.loss(model(batches(1)[0][0]), batches(1)[0][1])  # a validation loss, autograd on, no backward
        if torch.isfinite(loss):
            optimizer.step()
            read.append((w.meta_step((x, y)).terms, expected))
    assert len(read) == 3
    for got, expected in read:
        assert all(math.isclose(got[n], float(e), rel_tol=1e-6) for n, e in zip(w.term_names, expected)), got


@pytest.mark.parametrize("how", ["one backward", "autograd.grad", "retained graph"])
def test_calls_backpropagated_together_or_through_autograd_grad_count_once_each(how):
    """Two loss() calls in one backward (a sum of two micro-batches' losses), micro-batches through
    torch.autograd.grad (which writes no .grad), and one call backpropagated twice through a retained graph:
    meta_step reads the whole batch's terms, and FAMO takes the whole batch (it dropped a call, or counted one
    twice)."""
    for name in ("uw", "famo"):
        torch.manual_seed(0)
        model = tiny_net(3, batchnorm=False)  # (halves give the whole batch's terms)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        w = mw.WEIGHTINGS[name](model, optimizer, mw.DenseDistillLoss(3))
        x, y = batches(1)[0]
        with torch.no_grad():
            expected = w.criterion(model(x), y)
        halves = (slice(0, 8), slice(8, 16))
        if how == "one backward":
            (w.loss(model(x[halves[0]]), y[halves[0]]) / 2 + w.loss(model(x[halves[1]]), y[halves[1]]) / 2).backward()
        elif how == "autograd.grad":
            params = list(model.parameters())
            summed = [torch.zeros_like(p) for p in params]
            for half in halves:
                grads = torch.autograd.grad(w.loss(model(x[half]), y[half]) / 2, params, allow_unused=True)
                summed = [s if g is None else s + g for s, g in zip(summed, grads)]
            for p, g in zip(params, summed):  # (into .grad once all micro-batches are through)
                p.grad = g
        else:
            loss = w.loss(model(x), y) / 2
            loss.backward(retain_graph=True)
            loss.backward()
        optimizer.step()
        record = w.meta_step((x, y))
        assert all(math.isclose(record.terms[n], float(e), rel_tol=1e-5) for n, e in zip(w.term_names, expected)), \
            (name, record.terms)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_put_into_grad_by_hand_with_a_meta_step_per_micro_batch_learn_once_per_step(name):
    """Gradient accumulation through torch.autograd.grad, the gradients put into .grad by hand, and meta_step after
    every micro-batch (Accelerate's accumulate() pattern): the micro-batches' meta steps before the optimizer's step
    learned from one micro-batch's terms each, as if a step had been taken (SDN's schedule moved on twice per step;
    helper-176). As with backward: the update at each step reads the whole batch, the fit equals the backward's."""
    runs = []
    for by_hand in (False, True):
        w, model, optimizer = build(name)
        params = [p for p in model.parameters() if p.requires_grad]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # (meta_step before the step: warned, both runs)
            data = batches(6, size=8)
            for i, (x, y) in enumerate(data):
                loss = w.loss(model(x), y) / 3
                if by_hand:
                    for p, g in zip(params, torch.autograd.grad(loss, params)):
                        p.grad = g if p.grad is None else p.grad + g
                else:
                    loss.backward()
                if i % 3 == 2:
                    optimizer.step()
                    optimizer.zero_grad()
                    x, y = (torch.cat(part) for part in zip(*data[i - 2:i + 1]))  # (FAMO scores the step's batch)
                w.meta_step((x, y))
        runs.append((w.num_meta_steps, w.gamma.clone(), [p.detach().clone() for p in params]))
    (steps, gamma, weights), (steps_by_hand, gamma_by_hand, weights_by_hand) = runs
    assert steps == steps_by_hand == 2
    assert torch.allclose(gamma, gamma_by_hand, rtol=1e-6, atol=1e-7), (gamma, gamma_by_hand)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(weights, weights_by_hand))


@pytest.mark.parametrize("name", ["uw", "dwa", "gradnorm"])
def test_a_logging_loss_without_graph_between_loss_and_meta_step_is_not_learned_from(name):
    """A loop that calls meta_step before its backward and logs a validation loss with weighting.loss under
    torch.no_grad() between: meta_step reads the training call's terms, not the logged ones (it read them at
    the first iteration); gamma and the model follow the loop without the logging call exactly. (FAMO refuses
    the order: the next test.)"""
    runs = []
    for log in (False, True):
        w, model, optimizer = build(name)
        val = batches(1, size=8)[0]
        for x, y in batches(4):
            loss = w.loss(model(x), y)
            if log:
                with torch.no_grad():
                    w.loss(model(val[0]), val[1])
            w.meta_step((x, y))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        runs.append((w.gamma.clone(), [p.detach().clone() for p in model.parameters()]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_famo_meta_step_before_the_backward_of_its_batch_says_so():
    """FAMO compares a batch's terms before and after the step taken on it: a loop calling meta_step((x, y))
    before that batch's backward and step is told to call it after optimizer.step() (it was told the labels
    were not this iteration's), and nothing changes."""
    w, model, optimizer = build("famo")
    for i, (x, y) in enumerate(batches(2)):
        loss = w.loss(model(x), y)
        if i == 0:
            w.meta_step((x, y))  # (no step came before: delta 0, as test_famo_without_a_step_sees_no_change)
        else:
            state = {k: v.clone() for k, v in w.state_dict().items() if isinstance(v, torch.Tensor)}
            with pytest.raises(ValueError, match="no backward and no optimizer step have followed yet"):
                w.meta_step((x, y))
            assert all(torch.equal(v, w.state_dict()[k]) for k, v in state.items())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", [n for n in NAMES if mw.WEIGHTINGS[n].needs_terms])
def test_a_weighting_copied_between_loss_and_meta_step_says_it_is_a_copy(name, how):
    """A copy (copy.deepcopy, pickle) made between ``loss()`` and ``meta_step`` keeps the state, not the
    iteration's loss() calls: its meta_step is refused, and it said only "call loss() first", which the user had
    done before copying (helper-160; the HarmonizedWeighter's said why). It says it is a copy; the original's
    iteration goes on, and a copy made after meta_step says nothing of copies (its meta_step, with no step since,
    is skipped)."""
    import pickle

    w, model, optimizer = build(name)
    (x, y), val = batches(2)

    def copied():
        return copy.deepcopy(w) if how == "deepcopy" else pickle.loads(pickle.dumps(w))

    optimizer.zero_grad()
    w.loss(model(x), y).backward()
    optimizer.step()
    during = copied()
    with pytest.raises(ValueError, match=r"call loss = weighting.loss.*Nothing was changed. \(It is a copy "
                                         r"\(copy.deepcopy, pickle\) made since its last loss\(\) call"):
        during.meta_step((x, y), val)
    assert w.meta_step((x, y), val).ran  # the original's iteration goes on
    after = copied().meta_step((x, y), val)  # (no loss() call and no step since its last meta step: nothing to learn)
    assert after.skipped and "copy" not in after.message


@pytest.mark.parametrize("order", ["owner last", "owner first"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_logger_shared_by_two_weighters_copied_together_logs_the_one_it_logged(tmp_path, how, order):
    """A logger given to a first weighting, then to a second (it logs the second alone), the two copied together
    (a whole-object checkpoint of both): the copy logged whichever copy was unpickled first, the first (helper-161),
    and both copies wrote the one log, each dropping the other's rows. The copy logs the second's copy; the first's
    records are skipped with one warning, and the log reads 1-4 once, the second's."""
    import pickle
    import warnings

    logger = mw.CSVLogger(tmp_path / "log.csv")
    first, _, _ = build("uw", callbacks=[logger])
    second, _, _ = build("uw", seed=1, callbacks=[logger])
    data = batches(4)
    first.step(data[0])
    gammas = [second.step(data[0]).gamma["ce[1]"]]
    both = (first, second) if order == "owner last" else (second, first)  # (helper-163: the owner's copy first)
    both = copy.deepcopy(both) if how == "deepcopy" else pickle.loads(pickle.dumps(both))
    first, second = both if order == "owner last" else both[::-1]
    assert first.callbacks[0] is second.callbacks[0] and second.callbacks[0]._metaweight_owner() is second
    logger.close()
    with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        for x, y in data[1:]:
            first.step((x, y))
            gammas.append(second.step((x, y)).gamma["ce[1]"])
    said = [str(h.message) for h in heard]
    assert len(said) == 1 and "given to another weighter since" in said[0], said
    with open(logger.path) as f:
        table = [line.split(",") for line in f.read().splitlines()]
    column = table[0].index("gamma/ce[1]")
    assert [r[0] for r in table[1:]] == ["1", "2", "3", "4"]
    assert [float(r[column]) for r in table[1:]] == pytest.approx(gammas, rel=1e-6)


def test_a_shallow_copy_of_a_weighter_leaves_its_live_logger_to_it(tmp_path):
    """``copy.copy(weighter)`` shares the live logger (and its hooks): the copy took the logger over from the
    weighter it logs, so the logger handed to a new weighter passed the copy over, not the weighter, and both wrote
    one log, each dropping the other's rows (helper-162). The logger stays with the weighter it logs: handed over,
    it logs the new one alone (its own file), the first's rows kept."""
    import warnings

    logger = mw.CSVLogger(tmp_path / "log.csv")
    first, _, _ = build("uw", callbacks=[logger])
    data = batches(3)
    for x, y in data[:2]:
        first.step((x, y))
    snapshot = copy.copy(first)
    assert logger._metaweight_owner() is first and snapshot.callbacks == [logger]
    second, _, _ = build("uw", seed=1, callbacks=[logger])
    with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        for x, y in data:
            first.step((x, y))
            second.step((x, y))
    said = [str(h.message) for h in heard]
    assert len([m for m in said if "given to another weighter since" in m]) == 1, said
    with open(tmp_path / "log.csv") as f:
        assert [line.split(",")[0] for line in f.read().splitlines()[1:]] == ["1", "2"]
    with open(tmp_path / "log-2.csv") as f:
        assert [line.split(",")[0] for line in f.read().splitlines()[1:]] == ["1", "2", "3"]
    again = copy.copy(first)  # (a shallow copy of the weighter passed over: passed over too, helper-163)
    with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        again.step(data[0])
    assert len(heard) == 1 and "given to another weighter since" in str(heard[0].message)
    with open(tmp_path / "log-2.csv") as f:
        assert [line.split(",")[0] for line in f.read().splitlines()[1:]] == ["1", "2", "3"]


class _RaiseOnce:
    def __init__(self):
        self.raised = False

    def __call__(self, record):
        if not self.raised:
            self.raised = True
            raise RuntimeError("the user's hook failed")


@pytest.mark.parametrize("then", ["a hook raising at its first meta step", "pickled and resumed"])
def test_a_shallow_copy_kept_in_place_of_its_weighter_logs_as_it(tmp_path, then):
    """``w = copy.copy(w)``, the weighter copied then gone: its logger still named the weighter gone, so a put-back
    row at the first meta step read as a new run (log-2.csv), and the copy pickled and resumed was passed over
    (every row dropped; helper-163). The copy's run is logged as the weighter's would have been."""
    import gc
    import pickle
    import warnings

    hooks = [_RaiseOnce()] if then.startswith("a hook") else []
    logger = mw.CSVLogger(tmp_path / "log.csv")
    w, _, _ = build("uw", callbacks=[logger, *hooks])
    w = copy.copy(w)
    gc.collect()
    data = batches(6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, (x, y) in enumerate(data):
            if hooks and i == 0:
                with pytest.raises(RuntimeError, match="the user's hook failed"):
                    w.step((x, y))
                continue
            if not hooks and i == 3:
                logger.close()
                w = pickle.loads(pickle.dumps(w))
                logger = w.callbacks[0]
            w.step((x, y))
    logger.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv"]
    with open(tmp_path / "log.csv") as f:
        rows = [line.split(",")[0] for line in f.read().splitlines()[1:]]
    assert rows == (["2", "3", "4", "5", "6"] if hooks else ["1", "2", "3", "4", "5", "6"])


def _log_rows(path):
    with open(path) as f:
        return [line.split(",")[0] for line in f.read().splitlines()[1:]]


@pytest.mark.parametrize("how", ["pickle", "copy.copy"])
def test_a_copy_of_a_weighter_passed_over_is_passed_over_once_the_new_owner_is_gone(tmp_path, how):
    """A logger handed from a first weighter to a second, the second then gone: a copy of the first (pickled, or a
    shallow copy in its place) counted the logger's dead owner as its own and wrote its rows into the second's log,
    dropping the second's later rows as undone (helper-164, HIGH). Passed over, as the first itself is: the log
    keeps the second's rows alone."""
    import gc
    import pickle
    import warnings

    logger = mw.CSVLogger(tmp_path / "log.csv")
    first, _, _ = build("uw", callbacks=[logger])
    data = batches(5)
    first.step(data[0])
    second, _, _ = build("uw", seed=1, callbacks=[logger])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x, y in data:
            second.step((x, y))
    del second
    gc.collect()
    copied = pickle.loads(pickle.dumps(first)) if how == "pickle" else copy.copy(first)
    with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        for x, y in data[:3]:
            copied.step((x, y))
    assert any("given to another weighter since" in str(h.message) for h in heard)
    copied.callbacks[0].close()
    logger.close()
    assert _log_rows(tmp_path / "log.csv") == ["1"] and _log_rows(tmp_path / "log-2.csv") == ["1", "2", "3", "4", "5"]


class _Saver:
    """A callback that saves the whole run (``torch.save((model, optimizer, weighter))``) at iteration 3."""

    def __init__(self):
        self.run, self.saved = None, None

    def __call__(self, record):
        if record.iteration == 3 and self.run is not None:
            import io

            buffer = io.BytesIO()
            torch.save(self.run, buffer)
            self.saved = buffer.getvalue()


@pytest.mark.parametrize("name", ["uw", "hdkd"])
def test_a_whole_object_checkpoint_saved_by_a_callback_resumes_with_every_row(tmp_path, name):
    """``callbacks=[logger, saver]``, the saver writing ``torch.save((model, optimizer, weighter))`` at iteration 3:
    the weighter counted the iteration as logged only once every hook had returned, so the run resumed from that
    checkpoint dropped row 3 as undone (helper-164, HIGH). The resumed run's log is the uninterrupted run's rows 1-3,
    then its own 4-6 (the first run's 4-5, taken after the checkpoint, dropped)."""
    import io
    import warnings

    saver = _Saver()
    logger = mw.CSVLogger(tmp_path / "log.csv")
    torch.manual_seed(0)
    model = tiny_net(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    criterion = mw.DenseDistillLoss(3)
    if name == "hdkd":
        w = mw.HarmonizedWeighter(model, optimizer, criterion, callbacks=[logger, saver])
    else:
        w = mw.UW(model, optimizer, criterion, callbacks=[logger, saver])
    saver.run = (model, optimizer, w)
    data = batches(6)
    val = batches(6, size=8)[::-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(5):
            w.step(data[i], val[i])
        checkpoint, saver.run = saver.saved, None
        logger.close()  # (the first run ends: its logger holds the log until closed)
        model, optimizer, w = torch.load(io.BytesIO(checkpoint), weights_only=False)
        assert w.num_calls == 3
        for i in range(3, 6):
            w.step(data[i], val[i])
    w.callbacks[0].close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv"]
    assert _log_rows(tmp_path / "log.csv") == ["1", "2", "3", "4", "5", "6"]


@pytest.mark.parametrize("how", ["none", "pickle", "deepcopy"])
def test_a_run_copied_after_a_meta_step_put_back_logs_as_the_run_not_copied(tmp_path, how):
    """A hook after the logger raising at the second meta step (put back: its row undone), then the run copied whole
    before the next: the copy's log moved to log-2.csv as a new run (helper-164). A copy is a checkpoint and its load:
    its log is the run's own, the put-back row dropped as without the copy. (Before the first meta step kept, a copy
    is a new run: see the test of a template copied when built.)"""
    import pickle
    import warnings

    logger = mw.CSVLogger(tmp_path / "log.csv")
    w, _, _ = build("uw", callbacks=[logger, _RaiseAt(2)])
    data = batches(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w.step(data[0])
        with pytest.raises(RuntimeError, match="the user's hook failed"):
            w.step(data[1])
        if how != "none":
            w = copy.deepcopy(w) if how == "deepcopy" else pickle.loads(pickle.dumps(w))
            logger.close()  # (the copied run goes on: the logger copied with it takes the log)
        for x, y in data[2:]:
            w.step((x, y))
    w.callbacks[0].close()
    logger.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv"]
    assert _log_rows(tmp_path / "log.csv") == ["1", "3", "4"]


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "load_state_dict"])
def test_a_checkpoint_taken_after_a_warm_up_without_meta_steps_resumes_its_log(tmp_path, how):
    """``learn=False`` for iterations 1-2 (a warm-up), a checkpoint at iteration 2, the run on to 4, then resumed from
    the checkpoint to 6: a whole-object checkpoint followed its last kept meta step, none (0), so it was taken for a
    template copied when built and logged to log-2.csv as a new run, log.csv keeping rows 3-4 of steps undone
    (helper-171), where ``load_state_dict`` resumed the log. A copy follows the iteration it was taken at, as a load
    does: one log, rows 3-6, the undone 3-4 dropped."""
    import io
    import warnings

    def weighter(model, optimizer, logger):
        return mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), callbacks=[logger])

    torch.manual_seed(0)
    model = tiny_net(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    logger = mw.CSVLogger(tmp_path / "log.csv")
    w = weighter(model, optimizer, logger)
    w.learn = False
    data, val = batches(6), batches(6, size=8)[::-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(4):
            w.step(data[i], val[i])
            if i == 1:
                w.learn = True
                saved = io.BytesIO()
                torch.save((model, optimizer, w) if how != "load_state_dict" else
                           (model.state_dict(), optimizer.state_dict(), w.state_dict()), saved)
                copied = copy.deepcopy((model, optimizer, w)) if how == "deepcopy" else None
        logger.close()  # (the first run ends)
        if how == "load_state_dict":
            states = torch.load(io.BytesIO(saved.getvalue()), weights_only=False)
            model = tiny_net(3)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            model.load_state_dict(states[0])
            optimizer.load_state_dict(states[1])
            w = weighter(model, optimizer, mw.CSVLogger(tmp_path / "log.csv"))
            w.load_state_dict(states[2])
        else:
            model, optimizer, w = copied or torch.load(io.BytesIO(saved.getvalue()), weights_only=False)
        assert (w.num_calls, w.num_meta_steps) == (2, 0)
        for i in range(2, 6):
            w.step(data[i], val[i])
    w.callbacks[0].close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv"]
    assert _log_rows(tmp_path / "log.csv") == ["3", "4", "5", "6"]


class _RaiseAt:
    def __init__(self, call):
        self.call, self.calls = call, 0

    def __call__(self, record):
        self.calls += 1
        if self.calls == self.call:
            raise RuntimeError("the user's hook failed")


@pytest.mark.parametrize("kind", ["csv", "tensorboard"])
@pytest.mark.parametrize("how, overwrite", [("deepcopy", False), ("pickle", False), ("load_state_dict", False),
                                            ("deepcopy", True), ("pickle", True)])
def test_a_template_copied_or_loaded_before_its_first_step_is_a_new_run_that_keeps_the_old_log(tmp_path, how, kind,
                                                                                              overwrite):
    """A run copied when built (a template for the next run, a fold), the first run trained and gone, then the copy
    trained: the copy counted as restored at iteration 0 took the log as its own and dropped the first run's rows
    (helper-167, HIGH); so did a state_dict saved before the first step and loaded into a new run; a
    TensorBoardLogger copied before it had written did not look at its folder and hid the first run (helper-168,
    HIGH); with ``overwrite=True`` the copy overwrote it (CSV: the rows gone; helper-169). Restored at iteration 0,
    every row would go: a new run (log-2.csv, tb-2), the first run's log kept; a copy never overwrites."""
    import gc
    import pickle
    import warnings

    from test_logging_transactions import _tb_steps

    def logger_for(name):
        return mw.CSVLogger(tmp_path / f"{name}.csv", overwrite=overwrite) if kind == "csv" else \
            mw.TensorBoardLogger(tmp_path / name, overwrite=overwrite)

    def steps(name):
        return [int(s) for s in _log_rows(tmp_path / f"{name}.csv")] if kind == "csv" else _tb_steps(tmp_path / name)

    torch.manual_seed(0)
    model = tiny_net(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    logger = logger_for("log")
    w = mw.UW(model, optimizer, mw.DenseDistillLoss(3), callbacks=[logger])
    saved = w.state_dict()
    template = copy.deepcopy((model, optimizer, w)) if how == "deepcopy" else \
        pickle.loads(pickle.dumps((model, optimizer, w))) if how == "pickle" else None
    data = batches(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x, y in data:
            w.step((x, y))
        logger.close()
        del w
        gc.collect()
        if template is None:
            model, optimizer = tiny_net(3), None
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            template = (model, optimizer, mw.UW(model, optimizer, mw.DenseDistillLoss(3),
                                                callbacks=[logger_for("log")]))
            template[2].load_state_dict(saved)
        for x, y in data[:2]:
            template[2].step((x, y))
    template[2].callbacks[0].close()
    assert steps("log") == [1, 2, 3, 4, 5] and steps("log-2") == [1, 2]


def test_your_own_logger_of_step_records_keeps_a_plain_row_after_a_meta_step_put_back(tmp_path):
    """Your own CSVLogger fed every ``step()`` record with ``meta_every=2``, a hook raising at the first meta step
    (put back; its model step stands): the plain row of iteration 2 (its model step stood) was taken for a row of
    a step undone and the run moved to own-2.csv (helper-164): a record of no meta step says nothing of what it
    follows, and was taken to confirm every iteration before it. The log is one file, rows 2 to 4."""
    import warnings

    raised = _RaiseOnce()
    torch.manual_seed(0)
    model = tiny_net(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), meta_every=2, callbacks=[raised])
    own = mw.CSVLogger(tmp_path / "own.csv")
    data, val = batches(4), batches(4, size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(4):
            try:
                own(w.step(data[i], val[i]))
            except RuntimeError:
                assert i == 0
    own.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["own.csv"]
    assert _log_rows(tmp_path / "own.csv") == ["2", "3", "4"]
