"""Any named loss terms against any validation objective (issue 11): the meta-gradient of every backend
against finite differences of real optimizer steps, on a custom criterion with a detached part, a
multi-task model that is not multi-exit, and a custom validation objective."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaweight as mw
from conftest import batch, tiny_net
from test_errors import assert_same, snapshot
from test_weighter import F64, OPTIMIZERS, finite_difference_gamma_grad, rel_err


class HintTerms(nn.Module):
    """Label-smoothed CE per exit, a hint from the last exit's (detached) probabilities to the first,
    and an auxiliary penalty on the first exit's logits. Holds its detached target fixed when given
    ``teacher_outputs`` (for the finite-difference backend)."""

    term_names = ("ce[1]", "ce[2]", "ce[3]", "hint[3->1]", "aux")

    def forward(self, outputs, target, teacher_outputs=None):
        teacher = (teacher_outputs if teacher_outputs is not None else outputs)[2].detach()
        ce = [F.cross_entropy(z, target, label_smoothing=0.1) for z in outputs]
        hint = F.mse_loss(outputs[0].softmax(-1), teacher.softmax(-1))
        aux = outputs[0].pow(2).mean() * 1e-2
        return torch.stack([*ce, hint, aux])


def first_two_exits(outputs, target):
    """A custom validation objective: plain CE of the first two exits."""
    return F.cross_entropy(outputs[0], target) + F.cross_entropy(outputs[1], target)


class MultiTask(nn.Module):
    """A shared trunk with a classification and a regression head (not a multi-exit net)."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh())
        self.cls = nn.Linear(12, 4)
        self.reg = nn.Linear(12, 1)

    def forward(self, x):
        h = self.trunk(x)
        return {"cls": self.cls(h), "reg": self.reg(h).squeeze(-1)}


def task_terms(outputs, target, teacher_outputs=None):
    labels, values = target
    return torch.stack([F.cross_entropy(outputs["cls"], labels), F.mse_loss(outputs["reg"], values),
                        outputs["reg"].pow(2).mean() * 0.1])


def task_validation(outputs, target):
    labels, values = target
    return F.cross_entropy(outputs["cls"], labels) + 0.5 * F.mse_loss(outputs["reg"], values)


def task_batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=F64)
    return x, (torch.randint(0, 4, (n,), generator=g), torch.randn(n, generator=g, dtype=F64))


class _Oracle:
    """Adapts a plain criterion to the finite-difference oracle (which reads ``active``)."""

    def __init__(self, fn, n):
        self.fn, self.active = fn, torch.ones(n, dtype=torch.bool)

    def __call__(self, outputs, target):
        return self.fn(outputs, target)


def warm(model, optimizer, make_batch, loss):
    for s in range(2):
        x, y = make_batch(s)
        optimizer.zero_grad()
        loss(model(x), y).backward()
        optimizer.step()


CASES = {
    "hint_terms": lambda: (tiny_net(3, dtype=F64), HintTerms(), first_two_exits, None,
                           lambda s: batch(dtype=F64), lambda s: batch(n=12, dtype=F64),
                           lambda out, y: sum(F.cross_entropy(z, y) for z in out)),
    "multi_task": lambda: (MultiTask().double(), task_terms, task_validation, ["ce", "mse", "aux"],
                           lambda s: task_batch(seed=s), lambda s: task_batch(n=12, seed=10 + s),
                           lambda out, y: task_validation(out, y)),
}


@pytest.mark.parametrize("backend", ["jvp", "higher", "finite_difference"])
@pytest.mark.parametrize("opt_name", ["nesterov_wd", "adam"])
@pytest.mark.parametrize("case", list(CASES))
def test_meta_gradient_of_custom_terms_matches_real_optimizer_steps(case, opt_name, backend):
    torch.manual_seed(0)
    model, criterion, validation, names, train_batch, val_batch, warm_loss = CASES[case]()
    optimizer = OPTIMIZERS[opt_name](model.parameters())
    warm(model, optimizer, train_batch, warm_loss)
    w = mw.HarmonizedWeighter(model, optimizer, criterion, validation, term_names=names, backend=backend,
                              init=torch.tensor([1.0, 0.7, 0.4, 1.3, 0.9][:len(names or criterion.term_names)]))
    train, val = train_batch(5), val_batch(6)
    oracle = _Oracle(criterion, len(w.term_names))
    ref = finite_difference_gamma_grad(model, optimizer, oracle, validation, w.gamma.detach().clone(), train, val)
    before = snapshot(model, optimizer, w)
    out = w.meta_step(train, val)
    for a, b in zip(before[0].values(), model.state_dict().values()):  # parameters and buffers untouched
        assert torch.equal(a, b)
    assert str(before[1]) == str(optimizer.state_dict())
    assert ref.norm() > 0 and (ref[3:] != 0).any() if case == "hint_terms" else ref.norm() > 0
    assert rel_err(out["gamma_grad"], ref) < (2e-2 if backend == "finite_difference" else 1e-6)


class IgnoresTeacherOutputs(HintTerms):
    def forward(self, outputs, target, teacher_outputs=None):
        return super().forward(outputs, target)


def test_detached_part_must_be_held_fixed_by_the_finite_difference_backend():
    """Holding the hint's detached target fixed is what makes the difference agree with jvp: a criterion
    that ignores ``teacher_outputs`` differentiates the teacher too, and disagrees."""
    grads = {}
    for name, terms, backend in (("jvp", HintTerms(), "jvp"), ("fixed", HintTerms(), "finite_difference"),
                                 ("moving", IgnoresTeacherOutputs(), "finite_difference")):
        torch.manual_seed(0)
        model = tiny_net(3, dtype=F64)
        w = mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=0.2), terms, first_two_exits,
                                  backend=backend, check_gradients=name != "moving")
        torch.manual_seed(1)
        grads[name] = w.meta_step(batch(dtype=F64), batch(n=12, dtype=F64))["gamma_grad"]
    assert rel_err(grads["fixed"], grads["jvp"]) < 1e-3
    assert rel_err(grads["moving"], grads["jvp"]) > 10 * rel_err(grads["fixed"], grads["jvp"])
    # ... which the weighter's gradient check refuses (autograd's step differentiates the teacher too)
    torch.manual_seed(0)
    model = tiny_net(3, dtype=F64)
    w = mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=0.2), IgnoresTeacherOutputs(),
                              first_two_exits, backend="finite_difference")
    with pytest.raises(ValueError, match="training terms differs from the derivative of their values"):
        w.meta_step(batch(dtype=F64), batch(n=12, dtype=F64))


def test_plain_function_without_teacher_outputs_is_refused_by_the_finite_difference_backend():
    model = tiny_net(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="teacher_outputs"):
        mw.HarmonizedWeighter(model, opt, lambda out, y: torch.stack([F.cross_entropy(z, y) for z in out]),
                              first_two_exits, term_names=["a", "b", "c"], backend="finite_difference")


def test_custom_terms_train_save_and_resume():
    torch.manual_seed(0)
    model = tiny_net(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    w = mw.HarmonizedWeighter(model, opt, HintTerms(), first_two_exits, gamma_lr=0.1)
    for _ in range(3):
        w.step(batch(), batch())
    assert list(w.gamma_dict()) == list(HintTerms.term_names)
    state = w.state_dict()
    assert state["validation"] == {} and state["teachers"] is None
    twin_model = copy.deepcopy(model)
    twin = mw.HarmonizedWeighter(twin_model, torch.optim.SGD(twin_model.parameters(), lr=0.1), HintTerms(),
                                 first_two_exits, gamma_lr=0.1)
    twin.load_state_dict(state)
    assert torch.equal(twin.gamma, w.gamma)


@pytest.mark.parametrize("make,match", [
    (lambda: dict(criterion=lambda o, y: torch.zeros(2), term_names=["a", "b", "c"]), r"shape \(3,\)"),
    (lambda: dict(criterion=lambda o, y: [0.0, 1.0, 2.0], term_names=["a", "b", "c"]), r"shape \(3,\).*list"),
    (lambda: dict(validation=lambda o, y: torch.stack([F.cross_entropy(z, y) for z in o])), "scalar"),
    (lambda: dict(validation=lambda o, y: 3.0), "scalar"),
])
def test_bad_custom_outputs_are_refused_and_change_nothing(make, match):
    torch.manual_seed(0)
    model = tiny_net(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    options = {"criterion": HintTerms(), "validation": first_two_exits, **make()}
    w = mw.HarmonizedWeighter(model, opt, options.pop("criterion"), options.pop("validation"), **options)
    before = snapshot(model, opt, w)
    with pytest.raises(ValueError, match=match):
        w.step(batch(), batch())
    assert_same(before, snapshot(model, opt, w))


@pytest.mark.parametrize("names,match", [
    (["a", "a", "b"], "unique"),
    (["a", "", "b"], "non-empty"),
    ([1, 2, 3], "non-empty string"),
    ("abc", "list of strings"),
    ([], "list of strings"),
])
def test_bad_term_names_are_refused(names, match):
    model = tiny_net(3)
    with pytest.raises(ValueError, match=match):
        mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda o, y: torch.zeros(3),
                              first_two_exits, term_names=names)


def test_criterion_without_num_exits_needs_a_validation_objective():
    model = tiny_net(3)
    with pytest.raises(ValueError, match="Pass a validation objective"):
        mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=0.1), HintTerms())


def test_a_criterion_may_return_a_dict_of_named_terms():
    """A criterion returning {name: loss}, the natural shape of named terms, was refused ("It returned `dict`", a
    list too, without a hint; helper-174). A dict keyed by the term names is stacked in their order, the same
    weighter and the same steps as the tensor's; wrong keys, non-scalars and a list are refused saying what to do,
    changing nothing. A checkpoint of other terms is refused without counting exits of terms that are no exits."""
    import copy

    import torch.nn.functional as F

    names = ("ce", "aux")

    def as_tensor(outputs, target):
        return torch.stack([F.cross_entropy(outputs[-1], target), outputs[0].pow(2).mean()])

    def as_dict(outputs, target):
        ce, aux = as_tensor(outputs, target)
        return {"aux": aux, "ce": ce}  # (any order)

    runs = []
    for criterion in (as_tensor, as_dict):
        torch.manual_seed(0)
        model = tiny_net(2)
        w = mw.UW(model, torch.optim.SGD(model.parameters(), lr=0.1), criterion, term_names=names)
        for _ in range(2):
            w.step(batch())
        runs.append((w.gamma.clone(), [p.detach().clone() for p in model.parameters()]))
    assert torch.equal(runs[0][0], runs[1][0]) and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    for wrong, said in ((lambda o, t: {"ce": as_tensor(o, t)[0]}, r"missing \['aux'\]"),
                        (lambda o, t: {"ce": as_tensor(o, t)[0], "aux": as_tensor(o, t)[1], "x": as_tensor(o, t)[0]},
                         r"not terms \['x'\]"),
                        (lambda o, t: {"ce": as_tensor(o, t), "aux": as_tensor(o, t)[1]}, r"\['ce'\] are not"),
                        (lambda o, t: list(as_tensor(o, t)), r"torch.stack\(terms\)")):
        refused = mw.UW(model, torch.optim.SGD(model.parameters(), lr=0.1), wrong, term_names=names)
        before = copy.deepcopy(refused.state_dict())
        weights = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(ValueError, match=said):
            refused.step(batch())
        assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                   for a, b in zip(before.values(), refused.state_dict().values()))
        assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    validation = mw.BalancedValidation(2)
    saved = mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=0.1), as_dict, validation,
                                  term_names=names).state_dict()
    other = mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=0.1), as_tensor, validation,
                                  term_names=("ce", "extra"))
    with pytest.raises(ValueError, match=r"for the terms \['ce', 'aux'\], but this weighter has") as refused:
        other.load_state_dict(saved)
    assert "exits" not in str(refused.value)


class _DictOutputs(nn.Module):
    """A multi-exit net returning its exits' logits beside another output, as many real models do."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return {"hidden": x.sum(1), "exits": self.net(x)}


def _run(model, criterion, validation, mode, batches, **kw):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    w = mw.HarmonizedWeighter(model, optimizer, criterion, validation, mode=mode, gamma_lr=0.5, **kw)
    for train, val in batches:
        w.step(train, val)
    return w, model


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_on_outputs_scores_part_of_the_outputs_as_the_loss_itself_scores_a_list(mode):
    """A model returning {"exits": [...], "hidden": h} could be given DenseDistillLoss and BalancedValidation only
    through lambdas, which hid BalancedValidation's update: its moving average never moved, and the gradient check
    refused the run blaming the model (helper-181). OnOutputs picks the part and keeps the protocol: the run equals
    the same net's run with its list of logits given to the two directly, the average folded at every meta step and
    checkpointed (a resume from the middle ends where the uninterrupted run does)."""
    torch.manual_seed(0)
    batches = [(batch(), batch()) for _ in range(4)]
    torch.manual_seed(1)
    net = tiny_net()
    ref, ref_model = _run(copy.deepcopy(net), mw.DenseDistillLoss(3), mw.BalancedValidation(3), mode, batches)
    wrapped = _DictOutputs(copy.deepcopy(net))
    got, _ = _run(wrapped, mw.OnOutputs(mw.DenseDistillLoss(3), "exits"),
                  mw.OnOutputs(mw.BalancedValidation(3), lambda out: out["exits"]), mode, batches)
    assert torch.equal(got.gamma, ref.gamma)
    assert int(got.validation.loss.num_updates) == int(ref.validation.num_updates) == 4
    assert torch.equal(got.validation.loss.expected, ref.validation.expected)
    assert all(torch.equal(a, b) for a, b in zip(wrapped.net.parameters(), ref_model.parameters()))
    # the average is checkpointed: two steps, a save, two steps in fresh objects from it
    first = _DictOutputs(copy.deepcopy(net))
    half, _ = _run(first, mw.OnOutputs(mw.DenseDistillLoss(3), "exits"),
                   mw.OnOutputs(mw.BalancedValidation(3), "exits"), mode, batches[:2])
    state, model_state, optim_state = copy.deepcopy((half.state_dict(), first.state_dict(),
                                                     half.optimizer.state_dict()))
    assert int(state["validation"]["num_updates"]) == 2 and state["teachers"] == "dense"  # (as without OnOutputs)
    resumed = _DictOutputs(copy.deepcopy(net))
    resumed.load_state_dict(model_state)
    optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    optimizer.load_state_dict(optim_state)
    w = mw.HarmonizedWeighter(resumed, optimizer, mw.OnOutputs(mw.DenseDistillLoss(3), "exits"),
                              mw.OnOutputs(mw.BalancedValidation(3), "exits"), mode=mode, gamma_lr=0.5)
    w.load_state_dict(state)
    for train, val in batches[2:]:
        w.step(train, val)
    assert torch.equal(w.gamma, ref.gamma) and torch.equal(w.validation.loss.expected, ref.validation.expected)


def test_on_outputs_keeps_the_criterion_s_protocol():
    """term_names, active (teachers="last"), num_exits and the teacher_outputs keyword read through OnOutputs (the
    finite-difference backend takes the criterion, and gets the same meta-gradient as on the list of logits); a
    loss weighting takes it too; outputs without the key are refused naming what they hold."""
    criterion = mw.OnOutputs(mw.DenseDistillLoss(3, teachers="last"), "exits")
    inner = criterion.loss
    assert criterion.term_names == inner.term_names and torch.equal(criterion.active, inner.active)
    assert criterion.num_exits == 3 and criterion.teachers == "last" and criterion.pairs == inner.pairs
    assert not hasattr(mw.OnOutputs(F.cross_entropy, 0), "term_names")
    torch.manual_seed(0)
    batches = [(batch(), batch()) for _ in range(2)]
    torch.manual_seed(1)
    net = tiny_net()
    ref, _ = _run(copy.deepcopy(net), mw.DenseDistillLoss(3, teachers="last"), mw.BalancedValidation(3), "exact",
                  batches, backend="finite_difference")
    got, _ = _run(_DictOutputs(copy.deepcopy(net)), criterion, mw.OnOutputs(mw.BalancedValidation(3), "exits"),
                  "exact", batches, backend="finite_difference")
    assert torch.equal(got.gamma, ref.gamma)
    with pytest.raises(ValueError, match="teacher_outputs"):  # (a criterion without the keyword: refused, as is)
        terms = mw.OnOutputs(lambda o, y: torch.stack([F.cross_entropy(z, y) for z in o]), "exits")
        _run(_DictOutputs(copy.deepcopy(net)), terms, mw.BalancedValidation(3), "exact", batches,
             backend="finite_difference", term_names=["a", "b", "c"])
    weightings = []
    for model, terms in ((copy.deepcopy(net), mw.DenseDistillLoss(3)),
                         (_DictOutputs(copy.deepcopy(net)), mw.OnOutputs(mw.DenseDistillLoss(3), "exits"))):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        uw = mw.UW(model, optimizer, terms)
        for train, _ in batches:
            uw.step(train)
        weightings.append((uw.log_vars, list(uw.gamma_dict().values()), [p.detach() for p in model.parameters()]))
    (a, gamma_a, params_a), (b, gamma_b, params_b) = weightings
    assert torch.equal(a, b) and gamma_a == gamma_b and all(torch.equal(p, q) for p, q in zip(params_a, params_b))
    with pytest.raises(ValueError, match=r"no 'logits'.*keys \['hidden', 'exits'\]"):
        mw.OnOutputs(mw.DenseDistillLoss(3), "logits")(_DictOutputs(net)(batch()[0]), batch()[1])


def test_a_stateful_objective_called_through_a_wrapper_that_hides_it_is_refused_or_said():
    """Every way a validation objective can call BalancedValidation without having its exit_losses, objective and
    update: the weighter could never update its average, which stayed where it was for the whole run (with
    check_gradients=False without a word; helper-181). Where the objective's code names it (a lambda naming it, a
    closure, a default argument, its bound method, functools.partial, an OnOutputs of a lambda): refused at
    construction, naming it and OnOutputs. Where an object or module holds it (looked into, a model keeping one for
    its reports was refused although it never called it; helper-183): warned of when it runs. A wrapper of a
    stateless loss is taken, and so is a function naming an object whose __getattr__ raises KeyError (it crashed
    the check; helper-183)."""
    import functools

    global _balanced, _settings, _null_logger, _mock, _config, _forwarding, _public_logger
    import types

    _balanced = mw.BalancedValidation(3)
    _config = types.ModuleType("config")  # (a config module of the user's holding one: helper-188)
    _config.balanced, _config.smoothing = mw.BalancedValidation(3), 0.1
    _config.sub = types.ModuleType("config.sub")  # (a package's module: helper-189)
    _config.sub.balanced = mw.BalancedValidation(3)

    class Forwarding:  # (a wrapper passing on the attributes it lacks, as torch.compile's module does)
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

    _forwarding = Forwarding(mw.BalancedValidation(3))
    held = mw.BalancedValidation(3)

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.balanced = mw.BalancedValidation(3)

        def forward(self, outputs, y):
            return self.balanced(outputs, y)

    class Plain:
        def __init__(self):
            self.inner = [mw.BalancedValidation(3)]

        def __call__(self, outputs, y):
            return self.inner[0](outputs, y)

    class NamesAGlobal:
        def __call__(self, outputs, y):
            return _balanced(outputs, y)

    class MethodNamesAGlobal:
        def score(self, outputs, y):
            return _balanced(outputs, y)

    def nested(outputs, y):  # (a lambda inside the function names it: helper-186)
        inner = lambda o: _balanced(o, y)  # noqa: E731
        return inner(outputs)

    def reads_its_average(outputs, y):  # (the state itself, read as an attribute: helper-187)
        losses = torch.stack([F.cross_entropy(z, y) for z in outputs])
        return (losses / _balanced.expected.clamp_min(1e-3)).sum()

    refused = {
        "a lambda naming a global": lambda o, y: _balanced(o, y),
        "a closure": lambda o, y: held(o, y),
        "a default argument": lambda o, y, b=held: b(o, y),
        "a bound method": held.forward,
        "functools.partial": functools.partial(held.__call__),
        "an OnOutputs of a lambda": mw.OnOutputs(lambda o, y: held(o, y), lambda o: o),
        "a lambda inside a function": nested,
        "a method whose code names a global": MethodNamesAGlobal().score,
        "a function reading its average": reads_its_average,
        "a config module's": lambda o, y: _config.balanced(o, y),
        "a config module's average": lambda o, y: (torch.stack([F.cross_entropy(z, y) for z in o]) /
                                                   _config.balanced.expected.clamp_min(1e-3)).sum(),
        "a package's module's average": lambda o, y: (torch.stack([F.cross_entropy(z, y) for z in o]) /
                                                      _config.sub.balanced.expected.clamp_min(1e-3)).sum(),
        "a forwarding wrapper's average": lambda o, y: (torch.stack([F.cross_entropy(z, y) for z in o]) /
                                                        _forwarding.expected.clamp_min(1e-3)).sum(),
    }
    for how, validation in refused.items():
        model = tiny_net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(ValueError, match=r"uses a `(BalancedValidation|Forwarding)`.*mw\.OnOutputs"):
            mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), validation, check_gradients=False)
        assert how and not optimizer.state
    for how, validation in {"a module holding it": Holder(), "an object holding it in a list": Plain(),
                            "a class naming a global": NamesAGlobal()}.items():
        model = tiny_net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), validation, check_gradients=False)
        with pytest.warns(RuntimeWarning, match=r"called a `BalancedValidation`.*mw\.OnOutputs"):
            w.step(batch(), batch())
        # with the gradient check, its gap (BalancedValidation's own detach before a first update) is refused as
        # what it is, not as a stop-gradient of the model's (helper-184)
        model = tiny_net()
        w = mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=0.1), mw.DenseDistillLoss(3),
                                  type(validation)())
        kept = copy.deepcopy(model.state_dict())
        with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match=r"called a `BalancedValidation`"):
            w.step(batch(), batch())
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in kept.items()) and w.num_meta_steps == 0
    model = tiny_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    class Reporting(nn.Module):  # (keeps one for its reports; the objective never calls it)
        def __init__(self):
            super().__init__()
            self.report = mw.BalancedValidation(3)

        def last_exit_loss(self, outputs, y):
            return F.cross_entropy(outputs[-1], y)

    class Settings(dict):
        __getattr__ = dict.__getitem__

    _settings = Settings(smoothing=0.1, _balanced=False)
    # an attribute named like a global BalancedValidation (helper-186: co_names holds attribute names too, and it
    # was refused)
    taken = [lambda o, y: F.cross_entropy(o[-1], y), Reporting().last_exit_loss,
             lambda o, y: F.cross_entropy(o[-1], y, label_smoothing=_settings.smoothing),
             lambda o, y: F.cross_entropy(o[-1], y) * (2.0 if _settings._balanced else 1.0)]

    class NullLogger:  # (what other ranks often hold in a logger's place: any method, doing nothing)
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    from unittest import mock

    # objects whose __getattr__ answers any name (exit_losses, objective, update too) were refused as stateful
    # objectives (helper-188)
    class PublicLogger:  # (a catch-all of public names only, as many are for copy and pickle: helper-190)
        def __getattr__(self, name):
            if name.startswith("_"):
                raise AttributeError(name)
            return lambda *args, **kwargs: None

    _null_logger, _mock, _public_logger = NullLogger(), mock.MagicMock(), PublicLogger()

    def logs(outputs, y):
        _null_logger.log({"seen": len(outputs)})
        _mock.record(len(outputs))
        _public_logger.log({"seen": len(outputs)})
        return F.cross_entropy(outputs[-1], y)

    taken += [logs, lambda o, y: F.cross_entropy(o[-1], y, label_smoothing=_config.smoothing)]
    plain_sum = mw.BalancedValidation(3, alpha=1.0)  # (reads no average: taken through a lambda)
    taken.append(lambda o, y: plain_sum(o, y))
    for validation in taken:
        w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), validation)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            w.step(batch(), batch())


def test_a_stateful_objective_s_state_is_checkpointed_where_it_can_be():
    """An objective of one's own with the three methods: without state_dict it is warned of (its state is not
    checkpointed), with state_dict and load_state_dict checkpointed, through OnOutputs too (a module holding a plain
    object, whose own state_dict left the object's out: the resumed run differed silently; helper-183). With no
    validation objective and an OnOutputs criterion, the default BalancedValidation scores the same part."""
    class Protocol:  # (the three methods, no state_dict)
        def __init__(self):
            self.inner = mw.BalancedValidation(3)

        def exit_losses(self, o, y):
            return self.inner.exit_losses(o, y)

        def objective(self, losses):
            return self.inner.objective(losses)

        def update(self, losses):
            self.inner.update(losses)

        def __call__(self, o, y):
            return self.objective(self.exit_losses(o, y))

    class Saved(Protocol):
        def state_dict(self):
            return self.inner.state_dict()

        def load_state_dict(self, state):
            self.inner.load_state_dict(state)

    model = tiny_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for validation in (Protocol(), mw.OnOutputs(Protocol(), lambda o: o)):
        with pytest.warns(RuntimeWarning, match="no state_dict"):
            mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), validation)
    for validation in (Saved(), mw.OnOutputs(Saved(), lambda o: o)):
        w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), validation)
        w.step(batch(), batch())
        state = w.state_dict()["validation"]
        assert int(state["num_updates"]) == 1, state
        fresh = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), type(validation)(Saved(), lambda o: o)
                                      if isinstance(validation, mw.OnOutputs) else Saved())
        fresh.load_state_dict(w.state_dict())
        assert int(unwrap(fresh.validation).inner.num_updates) == 1
    net = _DictOutputs(tiny_net())
    w = mw.HarmonizedWeighter(net, torch.optim.SGD(net.parameters(), lr=0.1), mw.OnOutputs(mw.DenseDistillLoss(3),
                                                                                            "exits"))
    w.step(batch(), batch())
    assert isinstance(w.validation, mw.OnOutputs) and int(w.validation.loss.num_updates) == 1


def unwrap(validation):
    return validation.loss if isinstance(validation, mw.OnOutputs) else validation
