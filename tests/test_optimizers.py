"""The closed-form replay of torch.optim.RMSprop (metaweight._optimizers): its step against torch's own, its diagonal
Jacobian against central differences of real torch steps, and the meta-gradient against backend='higher'."""

import copy
import re
import warnings

import pytest
import torch

import metaweight as mw
from conftest import batch, tiny_net
from metaweight._optimizers import lookahead_update

F64 = torch.float64


def _rmsprop(weight_decay=0.0, warm=2, **options):
    """Parameters of several shapes and an RMSprop over them, stepped ``warm`` times (square_avg filled in)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, dtype=F64)) for shape in [(3, 4), (4,), ()]]
    opt = torch.optim.RMSprop(params, lr=0.05, alpha=0.9, eps=1e-3, weight_decay=weight_decay, **options)
    for _ in range(warm):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    grads = [torch.randn_like(p) for p in params]
    grads[0][0, 0] = 0.0  # an entry with no gradient this step
    return params, opt, grads


def _real_step(params, opt, grads):
    """The parameters after one real torch.optim.RMSprop step with ``grads``, on copies (nothing changes)."""
    ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
    o = torch.optim.RMSprop(ps, **{k: v for k, v in opt.defaults.items()})
    state = copy.deepcopy(opt.state_dict())
    o.load_state_dict(state)
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    o.step()
    return [p.detach() for p in ps]


RMSPROP_OPTIONS = [{}, {"momentum": 0.9}, {"centered": True}, {"momentum": 0.5, "centered": True}]


@pytest.mark.parametrize("options", RMSPROP_OPTIONS, ids=str)
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("warm", [0, 2])
def test_rmsprop_step_and_jacobian_match_real_torch_steps(weight_decay, warm, options):
    """Momentum and centered (replayed since; they fell back to higher): the step is torch's, and the Jacobian,
    the same with momentum (its buffer's part does not depend on the gradient), that of central differences."""
    params, opt, grads = _rmsprop(weight_decay, warm, **options)
    new, jac = lookahead_update(opt, params, grads)
    for n, r in zip(new, _real_step(params, opt, grads)):
        torch.testing.assert_close(n, r, rtol=1e-12, atol=1e-14)
    h = 1e-6  # (elementwise: one central difference of the whole step gives every diagonal entry)
    plus = _real_step(params, opt, [g + h for g in grads])
    minus = _real_step(params, opt, [g - h for g in grads])
    for j, a, b, g in zip(jac, plus, minus, grads):
        fd = (b - a) / (2 * h)  # U = theta - theta'
        # where there is no gradient and no square_avg yet, the step lr g / (sqrt(1 - alpha) |g| + eps) has a kink
        # at 0: its derivative is lr / eps, which the central difference misses by about sqrt(1 - alpha) h / eps
        kink = (g == 0) & (warm == 0)
        torch.testing.assert_close(j[~kink], fd[~kink], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(j[kink], fd[kink], rtol=1e-3, atol=0.0)


@pytest.mark.parametrize("options", [{}, {"momentum": 0.9}, {"momentum": 0.5, "centered": True}], ids=str)
@pytest.mark.parametrize("mode,backend", [("exact", "jvp"), ("exact", "finite_difference"), ("fast", "jvp")])
def test_rmsprop_is_replayed_in_closed_form_with_higher_s_meta_gradient(mode, backend, options):
    """No fallback warning: the jvp backend (and the fast mode) replay RMSprop, with momentum and centered too;
    its meta-gradient is the one backend='higher' computes by differentiating through higher's own RMSprop."""
    initial = tiny_net(3, dtype=F64)
    warm, train, val = batch(dtype=F64), batch(dtype=F64), batch(dtype=F64)
    grads = {}
    for b in (backend, "higher"):
        model = copy.deepcopy(initial)
        opt = torch.optim.RMSprop(model.parameters(), lr=0.01, alpha=0.9, eps=1e-3, weight_decay=0.01, **options)
        w = mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(3), backend=b,
                                  mode=mode if b != "higher" else "exact")
        assert w.backend == b
        sum(o.sum() for o in model(warm[0])).backward()  # (a warm-up step: square_avg filled in)
        opt.step()
        opt.zero_grad()
        if mode == "fast" and b != "higher":  # (the step taken is the look-ahead)
            w.loss(model(train[0]), train[1]).backward()
            opt.step()
        grads[b] = w.meta_step(train, val).gamma_grad
    # exact for jvp; O(h^2) for finite_difference's central difference, O(h) for the fast mode's one-sided one
    tol = 1e-9 if (mode, backend) == ("exact", "jvp") else 1e-4
    assert grads["higher"].norm() > 0
    assert (grads[backend] - grads["higher"]).norm() / grads["higher"].norm() < tol


def test_rmsprop_momentum_given_as_a_tensor_is_read_like_a_number():
    """momentum=torch.tensor(0.9) once passed the closed-form check as if 0 (the jvp meta-gradient was that of
    RMSprop without momentum, 0.19 off higher's, with no warning): it is read as 0.9, and the meta-gradient is the
    one of momentum=0.9 given as a float, and higher's."""
    initial = tiny_net(3, dtype=F64)
    warm, train, val = batch(dtype=F64), batch(dtype=F64), batch(dtype=F64)
    grads = []
    for momentum, backend in ((torch.tensor(0.9, dtype=F64), "jvp"), (0.9, "jvp"), (0.9, "higher")):
        model = copy.deepcopy(initial)
        opt = torch.optim.RMSprop(model.parameters(), lr=0.01, momentum=momentum)
        w = mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(3), backend=backend)
        assert w.backend == backend
        sum(o.sum() for o in model(warm[0])).backward()  # (a warm-up step: a momentum buffer)
        opt.step()
        opt.zero_grad()
        grads.append(w.meta_step(train, val).gamma_grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-12, atol=0)
    assert (grads[0] - grads[2]).norm() / grads[2].norm() < 1e-9


def test_options_of_optimizers_outside_torch_s_table_are_read_by_their_own_meaning():
    """The ranges are torch's optimizers': Adafactor's eps is a pair (None, 1e-3) and an Adan-like optimizer has
    three betas; both were refused as gamma's optimizer ('not a real number', 'expected 2 numbers')."""
    class ThreeBetas(torch.optim.SGD):
        def __init__(self, params, lr, betas):
            super().__init__(params, lr=lr)
            for group in self.param_groups:
                group["betas"] = betas

    model = tiny_net(3)
    for make in (lambda p: torch.optim.Adafactor(p, lr=0.01), lambda p: ThreeBetas(p, 0.01, (0.98, 0.92, 0.99))):
        w = mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=0.1), mw.DenseDistillLoss(3),
                                  gamma_optimizer=make)
        before = w.gamma.clone()
        w.step(batch(), batch())
        assert not torch.equal(w.gamma, before)
        w.gamma_optimizer.param_groups[0]["lr"] = float("nan")  # lr means the same everywhere: still refused
        with pytest.raises(ValueError, match="lr=nan"):
            w.step(batch(), batch())
    with pytest.raises(TypeError, match="cannot replay a `Adafactor` step"):
        mw.HarmonizedWeighter(model, torch.optim.Adafactor(model.parameters(), lr=0.01), mw.DenseDistillLoss(3))


def _optimizer_classes():
    return [c for c in vars(torch.optim).values()
            if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer]


@pytest.mark.parametrize("kind", _optimizer_classes(), ids=lambda c: c.__name__)
def test_every_torch_optimizer_either_passes_gamma_a_meta_gradient_or_is_refused(kind):
    """The class of "an optimizer the look-ahead accepts but gamma cannot learn through": every optimizer of
    torch.optim (a later PyTorch's too) built over the model is refused at construction with learn=True, or its
    meta-gradient (the reference backend, higher, after a warm-up step) is non-zero. Rprop steps by the gradient's
    sign: accepted before, gamma never moved (the meta-gradient is exactly 0, checked here with higher directly),
    with higher's warning only; now refused, saying why and what to use, and still usable with learn=False."""
    torch.manual_seed(0)
    model = tiny_net(3, dtype=F64)
    try:
        opt = kind(model.parameters(), lr=0.01)
    except (TypeError, ValueError, RuntimeError):
        pytest.skip(f"{kind.__name__} cannot be built over a model with 1-d parameters")
    warm, train, val = batch(dtype=F64), batch(dtype=F64), batch(dtype=F64)
    try:
        w = mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(3), backend="higher")
    except (TypeError, ValueError) as exc:
        assert "learn=False" in str(exc)
        if kind is torch.optim.Rprop:
            assert "sign of its gradient" in str(exc) and "meta-gradient is zero" in str(exc)
            # the claim: differentiating through higher's own Rprop step gives gamma a gradient of exactly 0
            import higher
            terms, objective = mw.DenseDistillLoss(3), mw.BalancedValidation(3)
            gamma = torch.ones(terms.num_terms, dtype=F64, requires_grad=True)
            with higher.innerloop_ctx(model, opt, copy_initial_weights=True) as (fmodel, diffopt):
                diffopt.step((gamma * terms(fmodel(train[0]), train[1])).sum())
                (g,) = torch.autograd.grad(objective(fmodel(val[0]), val[1]), gamma, allow_unused=True)
            assert g is None or torch.equal(g, torch.zeros_like(g))
            fixed = mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(3), learn=False)
            before = [p.detach().clone() for p in model.parameters()]
            fixed.step(train)
            assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        return
    assert kind is not torch.optim.Rprop
    sum(o.sum() for o in model(warm[0])).backward()
    opt.step()
    opt.zero_grad()
    assert w.meta_step(train, val).gamma_grad.abs().sum() > 0


class _Lookahead(torch.optim.Optimizer):
    """Zhang et al. 2019's Lookahead with k=1 (as torch_optimizer's, holding the inner optimizer as .optimizer):
    after the inner step, each parameter moves back toward where it was, p <- slow + alpha (p - slow)."""

    def __init__(self, optimizer, alpha=0.5):
        self.optimizer, self.alpha = optimizer, alpha
        self.param_groups, self.defaults, self.state = optimizer.param_groups, optimizer.defaults, optimizer.state

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        slow = [p.detach().clone() for p in params]
        self.optimizer.step()
        with torch.no_grad():
            for s, p in zip(slow, params):
                p.copy_(s + self.alpha * (p - s))

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_a_wrapper_whose_step_may_do_more_than_the_inner_step_is_refused_by_name(mode):
    """The look-ahead replays the inner optimizer's step; Lookahead's own step moves the parameters elsewhere (the
    meta-gradient was that of another step: rel. error 1.0 against finite differences of the wrapper's step). Any
    wrapper holding a torch optimizer as .optimizer, other than those known to take the inner step, is refused at
    construction, naming both, nothing changed; also inside a known one (as Fabric around DeepSpeed's optimizer).
    The loss weightings, which replay no step, still take it."""
    accelerate_optimizer = pytest.importorskip("accelerate.optimizer")

    class Accelerated(accelerate_optimizer.AcceleratedOptimizer):  # (without the Accelerator state its step reads)
        def __init__(self, optimizer):
            self.optimizer = optimizer

        state = property(lambda self: self.optimizer.state)
        param_groups = property(lambda self: self.optimizer.param_groups)
        defaults = property(lambda self: self.optimizer.defaults)

    torch.manual_seed(0)
    model = tiny_net(3)
    sgd = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    x, y = batch()
    mw.DenseDistillLoss(3)(model(x), y).sum().backward()
    sgd.step()  # (state to compare)
    before = (copy.deepcopy(model.state_dict()), copy.deepcopy(sgd.state_dict()))
    for wrapper in (_Lookahead(sgd), Accelerated(_Lookahead(sgd))):
        with pytest.raises(TypeError) as caught:
            mw.HarmonizedWeighter(model, wrapper, mw.DenseDistillLoss(3), mode=mode)
        said = str(caught.value)
        assert "`_Lookahead`" in said and "`SGD`" in said and "Nothing was changed" in said, said
        assert "Pass the `SGD` itself" in said and "metaweight.UW" in said, said
        after = (model.state_dict(), sgd.state_dict())
        assert all(torch.equal(a, b) for a, b in zip(before[0].values(), after[0].values()))
        assert before[1]["param_groups"] == after[1]["param_groups"]
        assert all(torch.equal(before[1]["state"][k]["momentum_buffer"], v["momentum_buffer"])
                   for k, v in after[1]["state"].items())
    mw.HarmonizedWeighter(model, sgd, mw.DenseDistillLoss(3), mode=mode)  # the optimizer itself: accepted
    mw.HarmonizedWeighter(model, Accelerated(sgd), mw.DenseDistillLoss(3), mode=mode)  # a known wrapper: accepted
    uw = mw.UW(model, _Lookahead(sgd), mw.DenseDistillLoss(3))  # counts steps only: any wrapper
    assert uw.step(batch()).ran


class _SGDSubclass(torch.optim.SGD):
    """A subclass of SGD (its step may differ from SGD's: refused by every setting)."""


_SETTINGS = [dict(mode=m, backend=b, lookahead_params=r) for m in ("exact", "fast")
             for b in ("jvp", "finite_difference", "higher") for r in (None, "heads")]


def _built(kind, setting):
    """None where a weighter learning with ``setting`` is built over ``kind`` (or ``kind`` cannot be built over the
    model: "unbuildable"), else the error's message."""
    torch.manual_seed(0)
    model = tiny_net(3)
    try:
        optimizer = kind(model.parameters(), lr=0.01)
    except (TypeError, ValueError, RuntimeError):
        return "unbuildable"
    options = {**setting, "lookahead_params": (lambda name: "heads" in name) if setting["lookahead_params"] else None}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the fast backends' fallback to higher)
            mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), **options)
    except (TypeError, ValueError) as exc:
        return str(exc)
    return None


def test_a_refused_optimizer_is_told_what_the_settings_take_and_only_changes_that_take_it():
    """Every optimizer class of torch.optim and a subclass of SGD, under every mode, backend and lookahead_params:
    a refusal of the optimizer names exactly the classes these settings build a weighter with (found here by
    building one with each), every other setting it names builds one, and it suggests exactly the changes of one
    setting (mode, backend, dropping lookahead_params) with which one is built. Before, the exact mode listed
    Rprop, which it refuses, and the fast mode sent NAdam, Rprop, a subclass of SGD, ... to mode='exact', which
    refuses them too."""
    kinds = _optimizer_classes() + [_SGDSubclass]
    outcome = {(kind, i): _built(kind, setting) for kind in kinds for i, setting in enumerate(_SETTINGS)}
    kinds = [k for k in kinds if outcome[(k, 0)] != "unbuildable"]
    assert {torch.optim.NAdam, torch.optim.Rprop, torch.optim.Adagrad, _SGDSubclass} <= set(kinds)
    accepted = {i: {k.__name__ for k in kinds if outcome[(k, i)] is None} for i in range(len(_SETTINGS))}
    assert accepted[0] >= {"SGD", "Adam", "AdamW", "RMSprop", "Adagrad"} and "Rprop" not in accepted[0]
    assert accepted[6] == {"SGD", "Adam", "AdamW", "RMSprop"}  # (mode="fast", backend="jvp")
    checked = 0
    for kind in kinds:
        for i, setting in enumerate(_SETTINGS):
            said = outcome[(kind, i)]
            if said is None or f"`{kind.__name__}`" not in said:
                continue  # accepted, or refused for another reason (lookahead_params with mode="fast" or higher)
            checked += 1
            assert "learn=False" in said, said
            named = {k.__name__ for k in kinds if k is not kind and re.search(rf"\b{k.__name__}\b", said)}
            assert named == accepted[i], (kind, setting, said)
            for key, value in re.findall(r"\b(mode|backend|lookahead_params)=('\w+'|None)", said):
                change = {key: None if value == "None" else value.strip("'")}
                if change[key] != setting[key]:  # (a setting named other than the one refusing: it must take it)
                    assert outcome[(kind, _SETTINGS.index({**setting, **change}))] is None, (kind, setting, said)
            changes = [dict(mode=m) for m in ("exact", "fast") if m != setting["mode"]]
            changes += [dict(backend=b) for b in ("jvp", "finite_difference", "higher") if b != setting["backend"]]
            changes += [dict(lookahead_params=None)] if setting["lookahead_params"] else []
            taking = {", ".join(f"{k}={v!r}" for k, v in change.items()) for change in changes
                      if outcome[(kind, _SETTINGS.index({**setting, **change}))] is None}
            suggested = re.search(r"With (.*?), the weighter accepts", said)
            assert set(suggested.group(1).split(" or ") if suggested else ()) == taking, (kind, setting, said)
    assert checked > 60


def test_under_distributed_data_parallel_a_refusal_does_not_send_to_the_fallback():
    """Under DistributedDataParallel the fast backends cannot fall back to higher (each rank's own gradient):
    Adagrad with backend='jvp' is refused listing the closed-form classes, suggesting no backend (before: a
    warning of the fallback, then "use backend='jvp' or 'finite_difference'", the backend given). Spot-checked on
    the refusal itself: building a process group is test_distributed's."""
    from metaweight._backends import optimizer_refusal

    model = tiny_net(3)
    for backend in ("jvp", "finite_difference"):
        said = str(optimizer_refusal(torch.optim.Adagrad(model.parameters()), "exact", backend, distributed=True))
        assert "only: Adam, AdamW, RMSprop, SGD (" in said and "the weighter accepts" not in said, said
        assert "backend='jvp'" not in said.replace(f"backend={backend!r} (under", ""), said
    assert optimizer_refusal(torch.optim.SGD(model.parameters(), lr=0.1), "exact", "jvp", distributed=True) is None


@pytest.mark.parametrize("settings", [{"mode": "exact"}, {"mode": "exact", "backend": "higher"}, {"mode": "fast"}])
@pytest.mark.parametrize("kind", [torch.optim.NAdam, torch.optim.RAdam, torch.optim.Rprop])
def test_an_optimizer_refused_is_caught_as_a_type_error_and_a_value_error_in_every_mode(settings, kind):
    """The same refusal of an optimizer class was a TypeError with mode='exact' and a ValueError with mode='fast', so
    code catching one missed the other (helper-165). It is both, in every mode and backend (and Rprop, which only
    the sign of the gradient moves, too)."""
    model = tiny_net(3)
    for caught in (TypeError, ValueError):
        with pytest.raises(caught, match=kind.__name__):
            mw.HarmonizedWeighter(model, kind(model.parameters(), lr=0.1), mw.DenseDistillLoss(3), **settings)
