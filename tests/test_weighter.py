"""HarmonizedWeighter: the meta-gradient against independent references, and what it must not touch."""

import copy
import math
import pickle
import random
import re
import weakref

import numpy as np
import pytest
import torch
from torch.func import functional_call

import metaweight as mw
from conftest import batch, tiny_net

F64 = torch.float64

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.3),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9),
    "dampening": lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9, dampening=0.3),
    "nesterov_wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
    "amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    # PyTorch's Adam with decoupled weight decay steps exactly as AdamW: replayed from the option, not the class
    "adam_decoupled": lambda p: torch.optim.Adam(p, lr=2e-2, weight_decay=0.1, decoupled_weight_decay=True),
    # two parameter groups with their own options (and so two buckets of the flat replay)
    "adam_groups": lambda p: (lambda ps: torch.optim.Adam(
        [{"params": ps[:3], "weight_decay": 0.1, "decoupled_weight_decay": True},
         {"params": ps[3:], "lr": 5e-3, "weight_decay": 1e-2, "amsgrad": True}], lr=1e-2))(list(p)),
}


def setup(opt_name, warm_steps=2, K=3, teachers="dense", alpha=0.5, backend="jvp", **options):
    """A float64 model with BatchNorm, its optimizer with some state already, and a weighter."""
    model = tiny_net(K, dtype=F64)
    optimizer = OPTIMIZERS[opt_name](model.parameters())
    for _ in range(warm_steps):  # real optimizer state (momentum buffers, Adam moments, step counts)
        x, y = batch(dtype=F64)
        optimizer.zero_grad()
        sum(torch.nn.functional.cross_entropy(z, y) for z in model(x)).backward()
        optimizer.step()
    criterion = mw.DenseDistillLoss(K, temperature=2.0, teachers=teachers)
    validation = mw.BalancedValidation(K, alpha=alpha)
    validation.update(torch.tensor([1.7, 1.6, 1.5][:K], dtype=F64) * 1.1)
    init = torch.rand(criterion.num_terms) * criterion.active + 0.5 * criterion.active
    weighter = mw.HarmonizedWeighter(model, optimizer, criterion, validation, gamma_lr=0.05, init=init,
                                     backend=backend, **options)
    return model, optimizer, criterion, validation, weighter


def val_objective_after_real_step(model, optimizer, criterion, validation, gamma, train, val):
    """L_val(theta') with theta' from a *real* optimizer step on deep copies (independent of the library)."""
    model, optimizer = copy.deepcopy((model, optimizer))
    x, y = train
    optimizer.zero_grad()
    (gamma.to(F64) * criterion(model(x), y)).sum().backward()
    optimizer.step()
    with torch.no_grad():
        return float(validation(model(val[0]), val[1]))


def finite_difference_gamma_grad(model, optimizer, criterion, validation, gamma, train, val, h=1e-6):
    grad = torch.zeros(len(gamma), dtype=F64)
    for k in range(len(gamma)):
        if not criterion.active[k]:
            continue
        e = torch.zeros(len(gamma), dtype=F64)
        e[k] = h
        plus = val_objective_after_real_step(model, optimizer, criterion, validation, gamma.to(F64) + e, train, val)
        minus = val_objective_after_real_step(model, optimizer, criterion, validation, gamma.to(F64) - e, train, val)
        grad[k] = (plus - minus) / (2 * h)
    return grad


def rel_err(a, b):
    return float((a.to(F64) - b.to(F64)).norm() / b.to(F64).norm())


@pytest.mark.parametrize("backend", ["higher", "jvp"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_meta_gradient_matches_finite_differences_of_real_optimizer_steps(opt_name, backend):
    model, optimizer, criterion, validation, weighter = setup(opt_name, backend=backend)
    train, val = batch(dtype=F64), batch(n=12, dtype=F64)
    gamma = weighter.gamma.detach().clone()
    ref = finite_difference_gamma_grad(model, optimizer, criterion, validation, gamma, train, val)
    out = weighter.meta_step(train, val)
    assert ref.norm() > 0
    # observed ~1e-7; 1e-6 also catches higher's own Adam, which puts eps elsewhere (5e-6 here)
    assert rel_err(out["gamma_grad"], ref) < 1e-6


def per_term_grads(model, criterion, x, y):
    params = dict(model.named_parameters())
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    terms = criterion(functional_call(model, (params, buffers), (x,)), y)
    return [torch.autograd.grad(terms[k], list(params.values()), allow_unused=True, retain_graph=True)
            for k in range(len(terms))]


@pytest.mark.parametrize("backend", ["higher", "jvp"])
@pytest.mark.parametrize("opt_name", ["sgd", "momentum", "dampening", "nesterov_wd"])
def test_sgd_meta_gradient_is_minus_xi_c_inner_product(opt_name, backend):
    """The issue's closed form: theta' by hand from per-term gradients, then -xi*c*<grad L_val(theta'), grad L_k>."""
    model, optimizer, criterion, validation, weighter = setup(opt_name, backend=backend)
    (x, y), (xv, yv) = batch(dtype=F64), batch(n=12, dtype=F64)
    gamma = weighter.gamma.detach().to(F64)
    group = optimizer.param_groups[0]
    lr, mu, damp, wd, nesterov = group["lr"], group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"]
    g_terms = per_term_grads(model, criterion, x, y)
    names = [n for n, _ in model.named_parameters()]
    new_params = {}
    for idx, (name, p) in enumerate(model.named_parameters()):
        d = sum(gamma[k] * (g_terms[k][idx] if g_terms[k][idx] is not None else 0) for k in range(len(gamma)))
        d = d + wd * p.detach()
        if mu:
            buf = mu * optimizer.state[p]["momentum_buffer"] + (1 - damp) * d
            d = d + mu * buf if nesterov else buf
        new_params[name] = p.detach() - lr * d
    new_params = {k: v.requires_grad_() for k, v in new_params.items()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    val_obj = validation(functional_call(model, (new_params, buffers), (xv,)), yv)
    v = torch.autograd.grad(val_obj, [new_params[n] for n in names])
    # d theta' / d gamma_k = -lr * c * g_k: c = 1 - dampening (heavy ball), 1 + mu (1 - dampening) (Nesterov)
    c = (1 + mu * (1 - damp) if nesterov else 1 - damp) if mu else 1.0
    ref = torch.stack([
        -lr * c * sum((vi * gi).sum() for vi, gi in zip(v, g_terms[k]) if gi is not None)
        for k in range(len(gamma))
    ]) * criterion.active
    out = weighter.meta_step((x, y), (xv, yv))
    assert rel_err(out["gamma_grad"], ref) < 1e-4


@pytest.mark.parametrize("backend", ["higher", "jvp", "finite_difference"])
@pytest.mark.parametrize("opt_name", ["nesterov_wd", "adam"])
def test_meta_step_leaves_model_buffers_grads_and_optimizer_state_bitwise_unchanged(opt_name, backend):
    model, optimizer, criterion, validation, weighter = setup(opt_name, backend=backend)
    x, y = batch(dtype=F64)
    optimizer.zero_grad()
    weighter.loss(model(x), y).backward()  # leave some .grad in place to check it survives
    before = copy.deepcopy((model.state_dict(), optimizer.state_dict(), [p.grad for p in model.parameters()]))
    weighter.meta_step((x, y), batch(n=12, dtype=F64))
    after = (model.state_dict(), optimizer.state_dict(), [p.grad for p in model.parameters()])
    for name, tensor in before[0].items():
        assert torch.equal(tensor, after[0][name]), name
    assert "running_mean" in " ".join(before[0])  # the BatchNorm statistics were among them
    for pid, state in before[1]["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after[1]["state"][pid][key])), (pid, key)
    assert before[1]["param_groups"] == after[1]["param_groups"]
    for g0, g1 in zip(before[2], after[2]):
        assert torch.equal(g0, g1)


@pytest.mark.parametrize("gamma_optimizer", ["sgd", "adam"])
def test_gamma_update_is_its_optimizer_then_projection_and_masked_terms_stay_zero(gamma_optimizer):
    model, optimizer, criterion, validation, weighter = setup("momentum", teachers="last",
                                                             gamma_optimizer=gamma_optimizer)
    m = torch.zeros(criterion.num_terms, dtype=F64)
    v = torch.zeros(criterion.num_terms, dtype=F64)
    for t in range(1, 6):
        gamma = weighter.gamma.detach().clone().to(F64)
        out = weighter.meta_step(batch(dtype=F64), batch(dtype=F64))
        g = out["gamma_grad"].to(F64)
        assert torch.equal(g[~criterion.active], torch.zeros((~criterion.active).sum(), dtype=F64))
        if gamma_optimizer == "sgd":
            step = 0.05 * g
        else:  # Adam by hand: betas (0.9, 0.999), eps 1e-8, bias-corrected
            m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
            step = 0.05 * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
        expected = (gamma - step).clamp(min=0) * criterion.active
        assert torch.allclose(weighter.gamma.detach().to(F64), expected, atol=1e-6)
        assert torch.equal(weighter.gamma.detach()[~criterion.active], torch.zeros((~criterion.active).sum()))
    assert weighter.num_meta_steps == 5 and int(validation.num_updates) == 6
    if gamma_optimizer == "adam":  # torch's fused kernel (its step count on the device), checked by hand above
        assert weighter.gamma_optimizer.param_groups[0]["fused"]


def test_normalize_constraint_keeps_the_sum():
    model = tiny_net(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    w = mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(3), gamma_lr=1.0, constraint="normalize")
    for _ in range(3):
        w.meta_step(batch(), batch())
    assert float(w.gamma.sum()) == pytest.approx(6.0, rel=1e-5) and (w.gamma >= 0).all()


@pytest.mark.parametrize("backend,reuse", [("higher", False), ("jvp", False), ("jvp", True),
                                           ("finite_difference", False), ("finite_difference", True)])
def test_step_equals_meta_step_then_users_own_step(backend, reuse):
    """The one-call form (with or without reusing the training forward) equals the two-call form."""
    model, optimizer, criterion, validation, weighter = setup("nesterov_wd", backend=backend, reuse_forward=reuse)
    twin = copy.deepcopy((model, optimizer, criterion, validation))
    twin_w = mw.HarmonizedWeighter(*twin, gamma_lr=0.05, init=weighter.gamma.detach().clone(), backend=backend)
    train, val = batch(dtype=F64), batch(dtype=F64)
    metrics = weighter.step(train, val)
    twin_w.meta_step(train, val)
    loss = twin_w.loss(twin[0](train[0]), train[1])
    twin[1].zero_grad(); loss.backward(); twin[1].step()
    assert torch.allclose(weighter.gamma, twin_w.gamma, rtol=0, atol=1e-7)
    for a, b in zip(model.state_dict().values(), twin[0].state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)  # BatchNorm statistics updated exactly once
    assert metrics["loss"] == pytest.approx(loss.item())
    assert set(weighter.terms_dict()) == set(criterion.term_names)


@pytest.mark.parametrize("order", ["after the step", "before the step", "before, one batch throughout",
                                   "before, one batch throughout, after a warm-up", "after the step, accumulated",
                                   "after the step, accumulated, concatenated", "after the step, a view",
                                   "before the step, accumulated", "before, one batch throughout, accumulated"])
def test_an_exact_meta_step_after_the_step_warns_once_at_the_first_call(order):
    """mode='exact' scores the step to come: a loop calling meta_step after loss, backward and step (fast mode's
    order, the loss weightings') learned from a step never taken, silently; it now warns at the first meta
    step, and only there. The right order stays silent, also on one batch used every iteration. Also with
    gradient accumulation, the micro-batches' labels views of the batch's or equal to their concatenation (the
    loop of a loss weighting with accumulation switched to mode='exact': no warning before), and with the
    labels a view of the whole batch's (y[0:n])."""
    model, optimizer, criterion, validation, weighter = setup("nesterov_wd", backend="jvp")
    same = batch(dtype=F64)
    import warnings
    with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        if order.endswith("warm-up"):  # gamma fixed for a few steps first (full-batch training: one y tensor)
            for _ in range(2):
                loss = weighter.loss(model(same[0]), same[1])
                optimizer.zero_grad(); loss.backward(); optimizer.step()
        for i in range(3):
            train, val = same if "throughout" in order else batch(dtype=F64), batch(dtype=F64)
            if order.startswith("before"):
                weighter.meta_step(train, val)
            optimizer.zero_grad()
            if order.endswith(("accumulated", "concatenated")):
                n = len(train[1]) // 2
                for part in (slice(0, n), slice(n, None)):
                    y = train[1][part].clone() if order.endswith("concatenated") else train[1][part]
                    (weighter.loss(model(train[0][part]), y) / 2).backward()
            else:
                y = train[1][0:len(train[1])] if order.endswith("a view") else train[1]
                weighter.loss(model(train[0]), y).backward()
            optimizer.step()
            if order.startswith("after the step"):
                weighter.meta_step(train, val)
    said = [str(h.message) for h in heard if "comes before the model's step" in str(h.message)]
    assert len(said) == (1 if order.startswith("after the step") else 0), said
    assert not said or "build the weighter with mode='fast'" in said[0]


class DrawingNet(torch.nn.Module):
    """A multi-exit MLP whose forward draws from every generator the weighter replays: dropout (torch's
    global generator), a torch.Generator it holds, NumPy's global state and Python's random."""

    def __init__(self, num_exits=3):
        super().__init__()
        self.stages = torch.nn.ModuleList([torch.nn.Linear(6 if k == 0 else 8, 8) for k in range(num_exits)])
        self.heads = torch.nn.ModuleList([torch.nn.Linear(8, 5) for _ in range(num_exits)])
        self.drop = torch.nn.Dropout(0.3)
        self.g = torch.Generator().manual_seed(5)

    def forward(self, x):
        noise = torch.rand(x.shape, generator=self.g) * 0.1 + float(np.random.rand()) * 0.01 + random.random() * 0.01
        h, outputs = x * (1 + noise), []
        for stage, head in zip(self.stages, self.heads):
            h = self.drop(torch.tanh(stage(h)))
            outputs.append(head(h))
        return outputs


def _random_states(model):
    return torch.get_rng_state(), model.g.get_state(), np.random.get_state(), random.getstate()


def _same_random_states(a, b):
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2][0] == b[2][0] and \
        np.array_equal(a[2][1], b[2][1]) and a[2][2:] == b[2][2:] and a[3] == b[3]


@pytest.mark.parametrize("backend", ["jvp", "finite_difference"])
def test_reuse_forward_changes_nothing_with_dropout(backend):
    """reuse_forward=True gives the run of reuse_forward=False bit for bit, with dropout and the other generators
    a forward draws from: each step() leaves them where the user's own loop (one training forward per step) does,
    not past the validation forward's draws (which made the next step's dropout masks differ)."""
    train = [batch() for _ in range(3)]
    val = [batch() for _ in range(3)]

    def seeded():
        torch.manual_seed(1), np.random.seed(1), random.seed(1)

    torch.manual_seed(0)
    start = DrawingNet()
    seeded()
    for x, _ in train:  # the user's own loop: one training forward per iteration
        start(x)
    reference = _random_states(start)
    runs = {}
    for reuse in (False, True):
        model = copy.deepcopy(start)
        model.g.manual_seed(5)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        weighter = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), mw.BalancedValidation(3),
                                         gamma_lr=0.05, backend=backend, reuse_forward=reuse, check_gradients=False)
        seeded()
        for t, v in zip(train, val):
            weighter.step(t, v)
        runs[reuse] = (weighter.gamma.detach().clone(), copy.deepcopy(model.state_dict()),
                       copy.deepcopy(optimizer.state_dict()["state"]), _random_states(model))
    (gamma, params, state, rng), (gamma_reuse, params_reuse, state_reuse, rng_reuse) = runs[False], runs[True]
    assert _same_random_states(rng, reference) and _same_random_states(rng_reuse, reference)
    assert torch.equal(gamma, gamma_reuse)
    assert all(torch.equal(params[k], params_reuse[k]) for k in params)
    assert all(torch.equal(state[i][k], state_reuse[i][k]) for i in state for k in state[i])


class LazilyDrawingNet(DrawingNet):
    """Creates a generator in its first forward: the look-ahead refuses it, after its training forward drew."""

    def forward(self, x):
        if not hasattr(self, "lazy"):
            self.lazy = torch.Generator().manual_seed(3)
        return super().forward(x + torch.rand(x.shape, generator=self.lazy))


@pytest.mark.parametrize("reuse", [False, True])
def test_a_step_refused_in_its_look_ahead_leaves_the_random_state(reuse):
    model = LazilyDrawingNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # (check_gradients would refuse the generator first, before the look-ahead)
    weighter = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), reuse_forward=reuse,
                                     check_gradients=False)
    train, val = batch(), batch()
    before = _random_states(model)
    with pytest.raises(ValueError, match="created or replaced during the training forward"):
        weighter.step(train, val)
    assert _same_random_states(_random_states(model), before)


def test_learn_false_never_changes_gamma():
    model = tiny_net(3)
    opt = torch.optim.LBFGS(model.parameters())  # no look-ahead needed, so any optimizer is fine
    w = mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(3), learn=False)
    record = w.meta_step(batch(), batch())
    assert record.ran is False and "gamma_grad" not in record and "val_objective" not in record
    assert w.gamma.tolist() == [1.0] * 6


def test_scheduler_lr_is_read_at_meta_step_time():
    model, optimizer, criterion, validation, weighter = setup("sgd")
    train, val = batch(dtype=F64), batch(dtype=F64)
    g1 = weighter.meta_step(train, val)["gamma_grad"]
    optimizer.param_groups[0]["lr"] = 1e-8
    g2 = weighter.meta_step(train, val)["gamma_grad"]
    assert g2.norm() < 1e-5 * g1.norm()


def test_state_dict_round_trip_and_mismatch_refused():
    model, optimizer, criterion, validation, weighter = setup("momentum")
    gamma_opt = lambda p: torch.optim.Adam(p, lr=0.01)
    w = mw.HarmonizedWeighter(model, optimizer, criterion, validation, gamma_optimizer=gamma_opt)
    for _ in range(2):
        w.meta_step(batch(dtype=F64), batch(dtype=F64))
    state = copy.deepcopy(w.state_dict())
    fresh = mw.HarmonizedWeighter(model, optimizer, criterion, mw.BalancedValidation(3), gamma_optimizer=gamma_opt)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.gamma, w.gamma)
    assert torch.equal(fresh.validation.expected, w.validation.expected)
    assert fresh.gamma_optimizer.state_dict()["state"][0]["step"] == 2
    model4 = tiny_net(4)
    w4 = mw.HarmonizedWeighter(model4, torch.optim.SGD(model4.parameters(), lr=0.1), mw.DenseDistillLoss(4))
    before = w4.gamma.detach().clone()
    with pytest.raises(ValueError, match="3 exits.*4 exits"):
        w4.load_state_dict(state)
    assert torch.equal(w4.gamma, before) and not w4.validation.initialized
    last = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3, teachers="last"))
    with pytest.raises(ValueError, match="teachers"):
        last.load_state_dict(state)


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_a_resumed_weighter_steps_gamma_as_the_uninterrupted_run_and_reports_the_rate(name):
    """A scheduler on gamma's optimizer resumes exactly (torch's rule: the checkpoint's learning rate), whatever
    gamma_lr the resumed weighter was built with (gamma_lr keeps the rate it was built with, as documented)."""
    model, optimizer, criterion, _, _ = setup("momentum")  # (exact meta_step leaves the model as it is)

    def build(lr):
        w = mw.HarmonizedWeighter(model, optimizer, criterion, mw.BalancedValidation(3), gamma_lr=lr,
                                  gamma_optimizer=name)
        return w, torch.optim.lr_scheduler.ExponentialLR(w.gamma_optimizer, gamma=0.5)

    torch.manual_seed(3)
    batches = [(batch(dtype=F64), batch(dtype=F64)) for _ in range(4)]
    whole, whole_schedule = build(0.01)
    for train, val in batches[:2]:
        whole.meta_step(train, val)
        whole_schedule.step()
    state = copy.deepcopy((whole.state_dict(), whole_schedule.state_dict()))
    resumed, resumed_schedule = build(0.5)
    resumed.load_state_dict(state[0])
    resumed_schedule.load_state_dict(state[1])
    assert resumed.gamma_optimizer.param_groups[0]["lr"] == pytest.approx(0.0025) and resumed.gamma_lr == 0.5
    for train, val in batches[2:]:
        for w, schedule in ((whole, whole_schedule), (resumed, resumed_schedule)):
            w.meta_step(train, val)
            schedule.step()
        assert torch.equal(whole.gamma, resumed.gamma)


def test_a_gamma_optimizer_state_of_another_shape_is_refused_changing_nothing():
    """exp_avg of 5 values for 6 terms loaded, then every step failed with torch's 'The size of tensor a (5) must
    match the size of tensor b (6)'."""
    model, optimizer, criterion, validation, w = setup("momentum")
    w.meta_step(batch(dtype=F64), batch(dtype=F64))
    before = copy.deepcopy(w.state_dict())
    for change, match in [(lambda m: m[:-1], r"state 'exp_avg' .* of shape \(5,\), but the parameter .* \(6,\)"),
                          (lambda m: m.sum(), r"state 'exp_avg' .* of shape \(\), but the parameter .* \(6,\)")]:
        state = copy.deepcopy(w.state_dict())
        state["gamma_optimizer"]["state"][0]["exp_avg"] = change(state["gamma_optimizer"]["state"][0]["exp_avg"])
        with pytest.raises(ValueError, match=match):
            w.load_state_dict(state)
    state = copy.deepcopy(w.state_dict())
    state["gamma_optimizer"]["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"gamma optimizer has lr=-1.0, below 0.*ascend"):
        w.load_state_dict(state)
    assert repr(w.state_dict()) == repr(before)



def test_a_gamma_optimizer_that_raises_mid_step_leaves_gamma_and_its_state_as_they_were():
    """A user's gamma optimizer that wrote its state and then raised (torch's unfused Adam does, at lr=3e38: 'value
    cannot be converted to type float without overflow') left its moments and step count advanced."""
    class Failing(torch.optim.Adam):
        fail = False

        def step(self, closure=None):
            super().step(closure)
            if self.fail:
                raise RuntimeError("failed after writing its state")

    model, optimizer, criterion, validation, w = setup("momentum", gamma_optimizer=lambda p: Failing(p, lr=0.01))
    for _ in range(2):
        w.meta_step(batch(dtype=F64), batch(dtype=F64))
    before = copy.deepcopy((w.gamma, w.gamma_optimizer.state_dict()))
    w.gamma_optimizer.fail = True
    with pytest.raises(RuntimeError, match="failed after writing its state"):
        w.meta_step(batch(dtype=F64), batch(dtype=F64))
    assert torch.equal(w.gamma, before[0]) and w.num_meta_steps == 2
    for key, value in before[1]["state"][0].items():
        assert torch.equal(w.gamma_optimizer.state_dict()["state"][0][key], value), key


def test_gamma_s_default_adam_is_fused_only_where_the_device_has_the_kernel():
    """torch checks a fused Adam's device at its first step, not when it is built: the weighter asks first."""
    from metaweight._gamma import adam as _adam
    assert _adam(torch.zeros(3, requires_grad=True), 0.1).param_groups[0]["fused"]
    meta = _adam(torch.zeros(3, device="meta", requires_grad=True), 0.1)
    assert not meta.param_groups[0]["fused"]

def test_repr_shows_settings():
    model = tiny_net(2)
    w = mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=0.1), mw.DenseDistillLoss(2))
    assert "num_exits=2" in repr(w) and "SGD" in repr(w) and "alpha=0.5" in repr(w)


def test_one_record_for_meta_step_step_and_hooks():
    model = tiny_net(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen, late = [], []
    w = mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(3), callbacks=[seen.append])
    handle = w.register_meta_step_hook(late.append)
    record = w.meta_step(batch(), batch())
    assert isinstance(record, mw.MetaStepRecord) and record.ran and not record.skipped
    assert seen == [record] and late == [record]  # the hooks get the very record meta_step returns
    assert record["gamma"] == w.gamma_dict() and record.iteration == 1 and record.meta_step == 1
    assert set(record) >= {"val_objective", "val_exit_losses", "gamma_grad", "terms"} and "loss" not in record
    handle.remove()
    full = w.step(batch(), batch())
    assert len(seen) == 2 and len(late) == 1  # removed hooks are not called
    assert full.loss == full["loss"] and full.model_step_skipped is False and full.terms == w.terms_dict()
    assert w.callbacks == [seen.append]
    with pytest.raises(TypeError, match="hook"):
        w.register_meta_step_hook("print")


def test_weights_that_float32_cannot_hold_and_bad_generators_are_refused():
    """HarmonizedWeighter stored init=[1e-50, 1, 1] as [0, 1, 1] (its first term silently switched
    off) and 1e39 as inf; generator=5 with init='random' gave torch's own error. Every weighting
    that stores given weights in float32 (the initial gamma, FAMO's bounds, the SDN schedule's
    C_k) refuses a number float32 turns to 0 or inf, naming it."""
    net = tiny_net(num_exits=2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    before = copy.deepcopy((net.state_dict(), opt.state_dict()))
    calls = [("init", lambda v: mw.HarmonizedWeighter(net, opt, mw.DenseDistillLoss(2), init=[v, 1.0, 1.0])),
             ("min_losses", lambda v: mw.FAMO(net, opt, mw.DenseDistillLoss(2), min_losses=[v, 0.0, 0.0])),
             ("max_weights", lambda v: mw.SDNSchedule(net, opt, mw.DenseDistillLoss(2), epochs=2, steps_per_epoch=2,
                                                      max_weights={"ce[1]": v}))]
    for name, call in calls:
        call(1e-30)  # small, but a float32
        for value in (1e-50, 1e39) if name != "max_weights" else (1e-50,):  # (C_k is at most 1e6)
            with pytest.raises(ValueError, match=rf"`{name}` holds {re.escape(repr(value))} \(stored as (0.0|inf)\)"):
                call(value)
    for generator in (5, "x", torch.Generator().get_state()):
        with pytest.raises(TypeError, match="`generator` should be None or a CPU torch.Generator"):
            mw.HarmonizedWeighter(net, opt, mw.DenseDistillLoss(2), init="random", generator=generator)
    torch.testing.assert_close(copy.deepcopy((net.state_dict(), opt.state_dict())), before, rtol=0, atol=0)


def test_initial_weights_take_a_dict_by_term_name_and_its_values():
    """``HarmonizedWeighter(init=w.gamma_dict())`` and ``init=w.gamma_dict().values()`` were refused
    with a TypeError; per-term numbers (``init``, FAMO's ``min_losses``) now take any ordered
    collection of numbers (a dict's ``.values()``) and a dict by term name, in any key order (as
    ``SDNSchedule(max_weights=)`` does), whose missing and unknown names are refused, named."""
    net = tiny_net(num_exits=2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    names = ["ce[1]", "ce[2]", "kd[2->1]"]
    given = {"kd[2->1]": 0.25, "ce[2]": 0.5, "ce[1]": 2.0}  # not in the terms' order
    expected = [given[n] for n in names]  # the order of the terms, written out independently

    def init(v):
        return mw.HarmonizedWeighter(net, opt, mw.DenseDistillLoss(2), init=v).gamma.tolist()

    def bounds(v):
        return mw.FAMO(net, opt, mw.DenseDistillLoss(2), min_losses=v).min_losses.tolist()

    for read in (init, bounds):
        assert read(given) == expected
        assert read({n: given[n] for n in names}.values()) == expected
        assert read(dict(zip(names, [np.float32(2.0), torch.tensor(0.5), 0.25]))) == expected
    w = mw.HarmonizedWeighter(net, opt, mw.DenseDistillLoss(2), init=expected)
    assert init(w.gamma_dict()) == init(w.gamma_dict().values()) == expected
    before = copy.deepcopy((net.state_dict(), opt.state_dict()))
    for read, name in ((init, "init"), (bounds, "min_losses")):
        with pytest.raises(ValueError, match=rf"`{name}` should map every term name .*It leaves out \['kd\[2->1\]'\]"):
            read({"ce[1]": 1.0, "ce[2]": 1.0})
        with pytest.raises(ValueError, match=rf"`{name}` .*It names \['ce\[3\]'\], which are not terms"):
            read({**given, "ce[3]": 1.0})
        with pytest.raises((TypeError, ValueError), match=name):
            read({1.0, 2.0, 3.0})  # a set has no order
    torch.testing.assert_close(copy.deepcopy((net.state_dict(), opt.state_dict())), before, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_a_negative_learning_rate_set_after_construction_is_refused_like_maximize(mode):
    """lr set below 0 after the weighter was built (a scheduler gone wrong) turned the look-ahead into gradient
    ascent while maximize=True was refused."""
    model = tiny_net(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), mode=mode)
    before = [p.detach().clone() for p in model.parameters()] + [w.gamma.clone()]
    for lr in (-0.1, np.float32(-0.1)):
        optimizer.param_groups[0]["lr"] = lr
        with pytest.raises(ValueError, match=r"lr=-0.1\d*, below 0.*ascend"):
            w.step(batch(), batch())
    optimizer.param_groups[0]["lr"] = 0.1
    w.gamma_optimizer.param_groups[0]["lr"] = -0.5  # gamma's own (a scheduler on it)
    with pytest.raises(ValueError, match=r"gamma's optimizer .*has lr=-0.5, below 0"):
        w.step(batch(), batch())
    assert all(torch.equal(a, b) for a, b in zip(before, [*model.parameters(), w.gamma]))


def test_a_copied_weighter_refuses_another_optimizer_s_step_of_its_model_as_the_original_does():
    """Only the weighter built was watched for other optimizers' steps: a copy (copy.deepcopy, pickle)
    took a second optimizer's step of its model into its meta-gradient without a word."""
    import pickle

    torch.manual_seed(0)
    model = tiny_net(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), mw.BalancedValidation(3))
    w.step(batch(), batch())
    for copied in (w, copy.deepcopy(w), pickle.loads(pickle.dumps(w))):
        torch.optim.SGD(copied.model.parameters(), lr=0.1).step()
        before = copy.deepcopy(copied.state_dict())
        with pytest.raises(ValueError, match=r"Another optimizer \(SGD\) stepped parameters of the model"):
            copied.meta_step(batch(), batch())
        assert str(copied.state_dict()) == str(before)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_a_loss_taken_before_the_exact_meta_step_keeps_the_weights_it_was_taken_with(dtype):
    """loss() before meta_step in the exact two-call form (to log it, say): its backward failed with autograd's
    "modified by an inplace operation ... version 3; expected version 0" for a float32 model, whose loss had
    saved gamma itself, which meta_step updates in place (found by helper-137); a float64 model's loss used a
    copy. Now both backpropagate the weights as they were at the call: the step of the sum with those weights."""
    torch.manual_seed(0)
    model = tiny_net(3, dtype=dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), mw.BalancedValidation(3), gamma_lr=0.05)
    x, y = batch(dtype=dtype)
    gamma = w.gamma.clone()
    loss = w.loss(model(x), y)
    w.meta_step((x, y), batch(dtype=dtype))
    assert not torch.equal(w.gamma, gamma)  # (the meta step moved the weights)
    optimizer.zero_grad()
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    optimizer.zero_grad()
    (gamma.to(dtype) * w.criterion(model(x), y)).sum().backward()
    for a, p in zip(got, model.parameters()):
        torch.testing.assert_close(a, p.grad)


@pytest.mark.parametrize("second", ["meta_step", "step()"])
def test_an_exact_meta_step_again_with_no_step_or_loss_between_warns(second):
    """mode='exact': meta_step followed by step() (mixing the forms) or by meta_step again gave gamma two meta
    steps for one model step, silently (found by helper-137). It now warns, naming both calls; the loop's order
    (meta_step, loss, backward, step) is silent over iterations, and so is one whose GradScaler skipped a step
    (a loss() came between)."""
    import warnings
    model, optimizer, criterion, validation, weighter = setup("nesterov_wd", backend="jvp")
    train, val = batch(dtype=F64), batch(dtype=F64)
    with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        for skipped in (False, True, False):
            weighter.meta_step(train, val)
            optimizer.zero_grad()
            weighter.loss(model(train[0]), train[1]).backward()
            if not skipped:
                optimizer.step()
    assert not [h for h in heard if "two meta steps" in str(h.message)]
    with pytest.warns(RuntimeWarning, match=rf"weighter\.{re.escape(second)} runs a meta step, and "
                                            r"weighter\.meta_step ran one .* two meta steps for one model step"):
        weighter.meta_step(train, val)
        getattr(weighter, second.rstrip("()"))(train, val)


def test_an_exact_meta_step_per_micro_batch_of_an_accumulated_step_warns():
    """mode='exact' under gradient accumulation with meta_step before every micro-batch: gamma took a meta step per
    micro-batch, each the look-ahead of a step on that micro-batch alone, with no word (helper-177; a loss() call
    came between). A meta step after loss() calls whose gradients wait for the step now warns; one per step with the
    whole batch, and one after a GradScaler's skip (gradients not finite), do not."""
    import warnings
    model, optimizer, criterion, validation, weighter = setup("nesterov_wd", backend="jvp")
    (x, y), val = batch(dtype=F64), batch(dtype=F64)
    halves = list(zip(x.chunk(2), y.chunk(2)))
    with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        for nonfinite in (False, True):  # (the whole batch once per step; then a step skipped on inf gradients)
            weighter.meta_step((x, y), val)
            optimizer.zero_grad()
            for part in halves:
                (weighter.loss(model(part[0]), part[1]) / 2).backward()
            if nonfinite:
                next(model.parameters()).grad[0] = math.inf  # (as a GradScaler's skipped step leaves them)
            else:
                optimizer.step()
        optimizer.zero_grad()
    # nor a batch the loop skipped after loss(), before zero_grad and its backward: the last step's gradients stay,
    # unchanged (helper-179: warned of as accumulation)
    with warnings.catch_warnings(record=True) as skipped:
        warnings.simplefilter("always")
        for skip in (False, True, False):
            weighter.meta_step((x, y), val)
            loss = weighter.loss(model(x), y)
            if skip:
                continue
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert not [h for h in heard + skipped if "per micro-batch" in str(h.message)]
    optimizer.zero_grad()
    with pytest.warns(RuntimeWarning, match=r"no optimizer step since, only a backward whose gradients "
                                            r"wait for a step.*meta step per micro-batch.*whole batch"):
        for part in halves:
            weighter.meta_step(part, val)
            (weighter.loss(model(part[0]), part[1]) / 2).backward()
    # what the meta step keeps of the gradients holds none alive: bb8fb5f held the last ones through the next
    # backward (a copy of the model's gradients at the peak) and pickled them with the weighter (helper-180)
    optimizer.step()
    weighter.meta_step((x, y), val)
    held = [weakref.ref(p.grad) for p in model.parameters()]
    pickle.dumps(weighter)  # (its weak references are not pickled)
    optimizer.zero_grad()
    assert all(r() is None for r in held)


@pytest.mark.parametrize("call", ["step", "meta_step"])
def test_a_validation_batch_that_is_the_training_batch_is_warned_of_once(call):
    """weighter.step((x, y), (x, y)) learned gamma from the training data with no word (the class's own docstring
    example did it; found by helper-137): the first call warns, later ones do not; a held-out batch, or learn=False,
    never warns."""
    import warnings
    model, optimizer, criterion, validation, weighter = setup("nesterov_wd", backend="jvp")
    train, val = batch(dtype=F64), batch(dtype=F64)
    with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        getattr(weighter, call)(train, val)
        weighter.learn = False
        weighter.step(train, train)
        weighter.learn = True
    assert not [h for h in heard if "as its validation batch" in str(h.message)]
    with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        for _ in range(3):
            getattr(weighter, call)(train, (train[0], train[1]))
            if call == "meta_step":
                optimizer.zero_grad()
                weighter.loss(model(train[0]), train[1]).backward()
                optimizer.step()
    said = [str(h.message) for h in heard if "as its validation batch" in str(h.message)]
    assert len(said) == 1 and f"HarmonizedWeighter.{call} got the training batch's inputs" in said[0], said


@pytest.mark.parametrize("form", ["exact", "fast", "fast, decided first", "fast, capturable", "uw", "rlw"])
def test_the_hooks_get_the_very_record_step_returns_its_loss_too(form):
    """step()'s hooks got the record with its loss in mode='exact' only: the fast step's (and a capturable one's,
    and a loss weighting's) lacked loss and model_step_skipped, so a hook reading record["loss"] raised KeyError
    after the model's step (found by helper-136). Every form now gives the hooks the record step() returns."""
    torch.manual_seed(0)
    model = tiny_net(3)
    criterion = mw.DenseDistillLoss(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=form == "fast, capturable")
    if form == "fast, decided first":  # (a wrapper's step is decided before it is taken)
        accelerate_optimizer = pytest.importorskip("accelerate.optimizer")

        class Wrapper(accelerate_optimizer.AcceleratedOptimizer):
            def __init__(self, optimizer):
                self.optimizer = optimizer

            state = property(lambda self: self.optimizer.state)
            param_groups = property(lambda self: self.optimizer.param_groups)
            defaults = property(lambda self: self.optimizer.defaults)

            def step(self):
                self.optimizer.step()

            def zero_grad(self, set_to_none=True):
                self.optimizer.zero_grad(set_to_none=set_to_none)

        optimizer = Wrapper(optimizer)
    heard = []
    if form in ("uw", "rlw"):
        w = mw.WEIGHTINGS[form](model, optimizer, criterion, callbacks=[heard.append])
    else:
        options = {"capturable": True, "nonfinite": "skip"} if form == "fast, capturable" else {}
        w = mw.HarmonizedWeighter(model, optimizer, criterion, mode="exact" if form == "exact" else "fast",
                                  callbacks=[heard.append], check_gradients=False, **options)
    returned = [w.step(batch(), batch(n=12)) for _ in range(3)]
    assert len(heard) == 3
    for got, record in zip(heard, returned):
        assert got is record or form == "fast, capturable"  # (a capturable step's record is read back anew)
        assert set(got) == set(record) and all(
            torch.equal(got[k], record[k]) if isinstance(record[k], torch.Tensor) else got[k] == record[k]
            for k in record), (dict(got), dict(record))
        assert got["loss"] == record.loss and got["model_step_skipped"] is False
