"""Bad input gets a ValueError/TypeError naming what was expected and what came, and changes nothing."""

import contextlib
import copy
import pickle

import pytest
import torch
from torch import nn

import metaweight as mw
from conftest import batch, tiny_net

LOGITS = [torch.randn(4, 5) for _ in range(3)]
Y = torch.tensor([0, 1, 2, 4])


@pytest.mark.parametrize("outputs,target,match", [
    (LOGITS[:2], Y, "has 2 exits, but num_exits=3"),
    (torch.stack(LOGITS), Y, "list or tuple of 3 logits.*Found `Tensor`"),
    ({"a": 1}, Y, "list or tuple"),
    ([LOGITS[0], LOGITS[1], torch.randn(4, 6)], Y, r"Exit 1 gives \(4, 5\), exit 3 gives \(4, 6\)"),
    ([LOGITS[0], LOGITS[1], torch.randn(4, 5, 1)], Y, r"one shape.*\(4, 5, 1\)"),
    ([z[:, None, None] for z in LOGITS], Y, r"\[batch, classes\].*\[batch, tokens, classes\]"),
    ([z[:, None] for z in LOGITS], Y, r"shape \(4, 1\) to match the logits' batch and tokens"),
    ([LOGITS[0], LOGITS[1], "x"], Y, "Exit 3.*str"),
    (LOGITS, torch.tensor([0, 1, 2, 5]), r"labels in \[0, 5\].*5 classes.*\[0, 4\]"),
    (LOGITS, torch.tensor([-1, 1, 2, 3]), r"labels in \[-1, 3\]"),
    (LOGITS, torch.tensor([0, 1, 2]), r"shape \(4,\)"),
    (LOGITS, Y[:, None], r"shape \(4,\).*\(4, 1\).*target.squeeze\(-1\)"),
    (LOGITS, torch.tensor([0.0, 1, 2, 3]), "integer class indices"),
    (LOGITS, torch.softmax(torch.randn(4, 5), -1), r"shape \(4, 5\).*soft.*class indices of shape \(4,\)"),
    (LOGITS, torch.nn.functional.one_hot(Y, 5), r"one-hot.*target.argmax\(-1\)"),
    (LOGITS, Y.to_sparse(), r"sparse_coo tensor.*target.to_dense\(\)"),
    ([z[:0] for z in LOGITS], Y[:0], "empty"),
])
@pytest.mark.parametrize("which", ["criterion", "validation"])
def test_bad_outputs_and_targets(outputs, target, match, which):
    fn = mw.DenseDistillLoss(3) if which == "criterion" else mw.BalancedValidation(3)
    with pytest.raises(ValueError, match=match):
        fn(outputs, target)


def make(K=3, **kwargs):
    model = tiny_net(K)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, opt, mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(K), **kwargs)


def snapshot(model, opt, w):
    return copy.deepcopy((model.state_dict(), opt.state_dict(), w.state_dict()))


def assert_same(a, b):
    for x, y in zip(a[0].values(), b[0].values()):
        assert torch.equal(x, y)
    assert str(a[1]) == str(b[1])
    assert torch.equal(a[2]["gamma"], b[2]["gamma"])
    assert a[2]["validation"].keys() == b[2]["validation"].keys()
    assert all(torch.equal(a[2]["validation"][k], b[2]["validation"][k]) for k in a[2]["validation"])
    assert a[2]["num_meta_steps"] == b[2]["num_meta_steps"]


class WrongExits(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)[:2]


def test_model_with_wrong_number_of_exits_is_refused_before_anything_changes():
    net = tiny_net(3)
    model = WrongExits(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(3))
    before = snapshot(model, opt, w)
    with pytest.raises(ValueError, match="has 2 exits, but num_exits=3"):
        w.step(batch(), batch())
    assert_same(before, snapshot(model, opt, w))


def test_nonfinite_validation_loss_raises_and_keeps_gamma_and_average():
    model, opt, w = make()
    w.meta_step(batch(), batch())
    before = snapshot(model, opt, w)
    x, y = batch()
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="Non-finite meta step.*left unchanged"):
        w.meta_step(batch(), (x, y))
    assert_same(before, snapshot(model, opt, w))
    with pytest.raises(ValueError, match="non-finite training terms"):
        w.meta_step((x, y), batch())
    assert_same(before, snapshot(model, opt, w))


def test_nonfinite_skip_returns_skipped():
    model, opt, w = make(nonfinite="skip")
    before = snapshot(model, opt, w)
    x, y = batch()
    x[:] = float("inf")
    assert w.meta_step(batch(), (x, y))["skipped"] is True
    assert_same(before, snapshot(model, opt, w))


def test_label_out_of_range_in_meta_step_changes_nothing():
    model, opt, w = make()
    before = snapshot(model, opt, w)
    with pytest.raises(ValueError, match=r"labels in \[0, 9\]"):
        w.step(batch(), (torch.randn(4, 6), torch.tensor([0, 9, 1, 2])))
    assert_same(before, snapshot(model, opt, w))


def test_constructor_checks():
    model = tiny_net(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = mw.DenseDistillLoss(3)
    with pytest.raises(TypeError, match="`model`"):
        mw.HarmonizedWeighter(lambda x: x, opt, crit)
    with pytest.raises(TypeError, match="`optimizer`"):
        mw.HarmonizedWeighter(model, "sgd", crit)
    with pytest.raises(TypeError, match="`criterion`"):
        mw.HarmonizedWeighter(model, opt, "dense")
    with pytest.raises(ValueError, match="term_names"):  # any callable works, once its terms are named
        mw.HarmonizedWeighter(model, opt, nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="num_exits=3 but the validation objective has num_exits=4"):
        mw.HarmonizedWeighter(model, opt, crit, mw.BalancedValidation(4))
    with pytest.raises(TypeError, match="cannot replay a `LBFGS`.*learn=False"):
        mw.HarmonizedWeighter(model, torch.optim.LBFGS(model.parameters()), crit)
    with pytest.raises(ValueError, match="maximize"):
        mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=0.1, maximize=True), crit)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        mw.HarmonizedWeighter(model, torch.optim.SGD(tiny_net(3).parameters(), lr=0.1), crit)
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        mw.HarmonizedWeighter(model, opt, crit, init=torch.ones(5))
    with pytest.raises(ValueError, match=">= 0"):
        mw.HarmonizedWeighter(model, opt, crit, init=-torch.ones(6))
    with pytest.raises(ValueError, match=r"kd\[2->1\]"):
        mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(3, teachers="last"), init=torch.ones(6))
    with pytest.raises(ValueError, match="init"):
        mw.HarmonizedWeighter(model, opt, crit, init="ds")
    with pytest.raises(ValueError, match="gamma_lr"):
        mw.HarmonizedWeighter(model, opt, crit, gamma_lr=-1)
    with pytest.raises(ValueError, match="pair"):
        mw.HarmonizedWeighter(model, opt, crit).meta_step(batch()[0], batch())


def test_multiexit_checks():
    with pytest.raises(ValueError, match="2 stages and 1 heads"):
        mw.MultiExit([nn.Identity(), nn.Identity()], [nn.Identity()])
    with pytest.raises(ValueError, match="empty"):
        mw.MultiExit([], [])
    with pytest.raises(TypeError, match=r"heads\[0\]"):
        mw.MultiExit([nn.Identity()], [lambda x: x])


def _meta_calls():
    """Every public function that reads the values of logits, labels or a model's outputs, each
    given meta tensors in one argument (the argument's name as the message shows it)."""
    K, N, C = 2, 6, 3
    z, y = torch.randn(K, N, C), torch.randint(0, C, (N,))
    zm, ym = z.to("meta"), y.to("meta")
    costs = [1.0, 2.0]
    return [
        ("calibrate", "`val_logits`", lambda: mw.calibrate(zm, y)),
        ("calibrate test", "`test_logits`", lambda: mw.calibrate(z, y, zm, y)),
        ("fit_temperatures", "`val_logits`", lambda: mw.fit_temperatures(zm, y)),
        ("expected_calibration_error", "`logits`", lambda: mw.expected_calibration_error(zm, y)),
        ("calibrate labels", "`val_labels`", lambda: mw.calibrate(z, ym)),
        ("anytime_accuracy_from_logits", "`logits`", lambda: mw.anytime_accuracy_from_logits(zm, y)),
        ("anytime labels", "`labels`", lambda: mw.anytime_accuracy_from_logits(z, ym)),
        ("find_thresholds", "`logits`", lambda: mw.find_thresholds(zm, [0.5, 0.5])),
        ("exit_assignment", "`logits`", lambda: mw.exit_assignment(zm, [0.5, 0.0])),
        ("evaluate_thresholds", "`logits`", lambda: mw.evaluate_thresholds(zm, y, [0.5, 0.0], costs)),
        ("budgeted_curve val", "`val_logits`", lambda: mw.budgeted_curve(zm, y, z, y, costs)),
        ("budgeted_curve test", "`test_logits`", lambda: mw.budgeted_curve(z, y, zm, y, costs)),
        ("thresholds_for_budget", "`val_logits`", lambda: mw.thresholds_for_budget(zm, y, costs, 1.5)),
        ("thresholds_for_accuracy", "`val_logits`", lambda: mw.thresholds_for_accuracy(zm, y, 0.1)),
        ("DenseDistillLoss", "The model output", lambda: mw.DenseDistillLoss(K)(list(zm), y)),
        ("DenseDistillLoss labels", "`target`", lambda: mw.DenseDistillLoss(K)(list(z), ym)),
        ("BalancedValidation", "The model output on the validation batch",
         lambda: mw.BalancedValidation(K)(list(zm), y)),
    ]


@pytest.mark.parametrize("index", range(len(_meta_calls())), ids=[c[0] for c in _meta_calls()])
def test_meta_tensors_are_refused_by_name_where_values_are_read(index):
    """Logits and labels on the meta device (shapes, no values) are refused up front with a
    ValueError naming the argument and saying how to get real tensors: no torch error about
    .item() or a device mismatch from inside the library."""
    _, name, call = _meta_calls()[index]
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert message.startswith(f"{name} is on the meta device") and "to_empty" in message and "load_state_dict" in message


def test_exit_costs_refuses_a_meta_model_with_real_inputs_and_the_reverse():
    """exit_costs counts on meta tensors when the model and the input are both there; one without
    the other is refused before the forward runs, saying both ways out."""
    meta = mw.MultiExit([nn.Linear(6, 6, device="meta") for _ in range(2)],
                        [nn.Linear(6, 5, device="meta") for _ in range(2)])
    real = mw.MultiExit([nn.Linear(6, 6) for _ in range(2)], [nn.Linear(6, 5) for _ in range(2)])
    before = copy.deepcopy(real.state_dict())
    for model, x, where in ((meta, torch.randn(1, 6), "the model's parameters are on the meta device"),
                            (real, torch.randn(1, 6, device="meta"), "`example_input` is on the meta device")):
        with pytest.raises(ValueError, match=where) as info:
            mw.exit_costs(model, x)
        assert "device='meta'" in str(info.value) and "to_empty" in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before.values(), real.state_dict().values()))
    assert mw.exit_costs(meta, torch.randn(1, 6, device="meta")).macs == [66, 132]


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_optimizer_state_left_in_another_dtype_by_model_to_is_refused_before_anything_changes(mode, opt_name):
    """``model.to(torch.bfloat16)`` after the optimizer stepped leaves its state in float32: the look-ahead
    would mix the two (torch's Adam refuses to step). A clear refusal naming the state and the fix, nothing
    changed; after the fix the step runs."""
    torch.manual_seed(0)
    model = tiny_net(3)
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if opt_name == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-3))
    w = mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(3), mode=mode)
    w.step(batch(), batch())
    model.to(torch.bfloat16)
    x, y = batch()
    bf16 = (x.bfloat16(), y)
    before = snapshot(model, opt, w)
    state = "momentum_buffer" if opt_name == "sgd" else "exp_avg"
    with pytest.raises(ValueError, match=rf"state '{state}' .* is torch.float32 on cpu, but the parameter is "
                                         rf"torch.bfloat16.*optimizer.load_state_dict\(optimizer.state_dict\(\)\)"):
        w.step(bf16, bf16)
    assert_same(before, snapshot(model, opt, w))
    assert w.num_calls == 1
    opt.load_state_dict(opt.state_dict())  # the fix the message gives
    assert w.step(bf16, bf16).ran and w.num_meta_steps == 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_optimizer_state_check_refuses_no_state_torch_s_own_optimizers_make(dtype):
    """torch keeps 0-d state (step counts, ASGD's eta and mu, NAdam's mu_product) in its scalar dtype, whatever the
    parameters' (a scalar parameter included): not a conversion left behind, not refused. Converting the model
    after the step is, for every optimizer with state of the parameters' shape."""
    from metaweight._optimizers import check_optimizer_state

    kinds = [c for c in vars(torch.optim).values() if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)
             and c.__name__ not in ("Optimizer", "LBFGS", "SparseAdam", "Muon")]  # (closures, sparse, 2-d only)
    assert len(kinds) >= 12
    for kind in kinds:
        torch.manual_seed(0)
        model = nn.Linear(3, 2).to(dtype)
        scale = nn.Parameter(torch.ones((), dtype=dtype))
        opt = kind([*model.parameters(), scale], **({"lr": 0.1, "momentum": 0.9} if kind is torch.optim.SGD else {}))
        (model(torch.randn(4, 3, dtype=dtype)).sum() * scale).backward()
        opt.step()
        check_optimizer_state(opt)
        if any(v.dim() > 0 for s in opt.state.values() for v in s.values() if torch.is_tensor(v)):
            model.to(torch.float32)
            with pytest.raises(ValueError, match="the model was converted"):
                check_optimizer_state(opt)
            model.to(dtype)
        if "exp_avg" in opt.state[scale]:  # a 0-d parameter's moments are its own, not scalars by design
            scale.data = scale.data.float()
            with pytest.raises(ValueError, match="'exp_avg' of a parameter of shape \\(\\)"):
                check_optimizer_state(opt)


def _replace_by_loading(model):
    model.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)


def _replace_a_head(model):
    model.heads[1] = nn.Linear(10, 5)


@pytest.mark.parametrize("replace", [_replace_by_loading, _replace_a_head], ids=["assign", "head"])
@pytest.mark.parametrize("form", ["step learn=False", "step", "step fast", "meta_step", "meta_step fast",
                                  "uw meta_step", "famo meta_step"])
def test_parameters_replaced_after_the_optimizer_was_built_are_refused_at_the_next_call(form, replace):
    """The optimizer holds tensors the model no longer has (load_state_dict(..., assign=True), a module replaced,
    after the optimizer was built): refused at the next call of every form, naming the first parameter replaced,
    before anything changes. The weighter's step() had run, gamma learning, and left the model as it was; a two-call
    loop trained nothing while meta_step learned. (A tensor the optimizer holds that never was the model's, a
    criterion's learned scale, is left alone: tests/test_transaction.py.)"""
    torch.manual_seed(0)
    model = tiny_net(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kind = form.split()[0] if form.split()[0] in mw.WEIGHTINGS else None
    if kind is not None:
        w = mw.WEIGHTINGS[kind](model, optimizer, mw.DenseDistillLoss(3))
    else:
        options = {"learn": False} if "learn=False" in form else {"mode": "fast"} if "fast" in form else {}
        w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), **options)
    train, val = batch(8), batch(8)
    meta_first = form == "meta_step"  # (the exact two-call form: meta_step, then the loop's own step)

    def loop_step():
        loss = w.loss(model(train[0]), train[1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def iteration():
        if form.startswith("step"):
            return w.step(train, val)
        if meta_first:
            w.meta_step(train, val)
            return loop_step()
        loop_step()
        return w.meta_step(train, val)

    iteration()
    replace(model)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    gamma, state = w.gamma.detach().clone(), copy.deepcopy(optimizer.state_dict())
    name = r"heads\.1\.weight" if replace is _replace_a_head else r"stages\.0\.0\.weight"
    who = "HarmonizedWeighter" if kind is None else type(w).__name__
    with pytest.raises(ValueError, match=rf"{who}\.(meta_)?step: the optimizer \(parameter group 0\) holds the "
                                         rf"tensor that was the model's parameter `{name}` \(shape "):
        if form.startswith("step"):
            w.step(train, val)
        else:
            if not meta_first:  # (the loop's forward and backward first; its step would move the old tensors)
                w.loss(model(train[0]), train[1]).backward()
            w.meta_step(train, val)
    assert all(torch.equal(params[n], p) for n, p in model.named_parameters())
    assert torch.equal(w.gamma, gamma)
    assert str(optimizer.state_dict()) == str(state)


def _weighter_and_iteration(form, model, optimizer, train, val):
    """The weighter of ``form`` over ``model`` and one iteration of its loop (the two-call forms: the loop's own
    forward, backward and step, meta_step before it in the exact form, after it in the fast one)."""
    kind = form.split()[0] if form.split()[0] in mw.WEIGHTINGS else None
    if kind is not None:
        w = mw.WEIGHTINGS[kind](model, optimizer, mw.DenseDistillLoss(3))
    elif form == "device_step":
        w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), mode="fast", capturable=True,
                                  nonfinite="skip")
    else:
        w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3),
                                  **({"mode": "fast"} if "fast" in form else {}))

    def iteration():
        if form == "step":
            return w.step(train, val)
        if form == "device_step":
            return w.device_step(train, val)
        if form == "meta_step":
            w.meta_step(train, val)
        optimizer.zero_grad()
        w.loss(model(train[0]), train[1]).backward()
        optimizer.step()
        if form != "meta_step":
            w.meta_step(train, val)
    return w, iteration


@pytest.mark.parametrize("form, first", [(form, "refused") for form in
                                         ("step", "device_step", "meta_step", "meta_step fast", "uw meta_step")] +
                         [(form, "val_batch missing") for form in ("step", "meta_step", "meta_step fast")])
def test_a_parameter_replaced_is_refused_again_at_the_next_call_until_the_loop_is_mended(form, first):
    """A call that raised (this refusal, or another: the validation batch left out) does not take the model as it
    is now for the next call's comparison: the walk kept is the last call's that returned, so the refusal repeats
    (a retried call, a notebook cell run again, had run, the optimizer stepping the old tensor and the model left
    as it was) until the loop is mended (here, the new head added with add_param_group). device_step(), the
    capturable step called directly, is checked as step() is (it took the new model in unchecked, and step()
    then too)."""
    torch.manual_seed(0)
    model = tiny_net(3)
    fused = {"fused": True} if form == "device_step" else {}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, **fused)
    train, val = batch(8), batch(8)
    w, iteration = _weighter_and_iteration(form, model, optimizer, train, val)
    iteration()
    iteration()
    model.heads[1] = nn.Linear(10, 5)
    new = model.heads[1].weight.detach().clone()
    refused = r"the optimizer \(parameter group 0\) holds the tensor that was the model's parameter `heads\.1\.weight`"
    if first == "refused":
        with pytest.raises(ValueError, match=refused):
            iteration()
    else:  # (no validation batch: refused before the check of replaced parameters)
        with pytest.raises(ValueError, match="learns gamma on a validation batch"):
            (w.step if form == "step" else w.meta_step)(train)
    with pytest.raises(ValueError, match=refused):
        iteration()
    assert torch.equal(model.heads[1].weight, new)
    optimizer.add_param_group({"params": list(model.heads[1].parameters()), **fused})
    iteration()
    iteration()
    assert not torch.equal(model.heads[1].weight, new)


def _tie(model):
    model.heads[1].weight = model.heads[0].weight


def _swap_and_add(model, optimizer):
    model.heads[1] = nn.Linear(10, 5)
    optimizer.add_param_group({"params": list(model.heads[1].parameters())})


@pytest.mark.parametrize("change", ["tie", "swap and add_param_group"])
@pytest.mark.parametrize("form", ["step", "meta_step", "meta_step fast", "uw meta_step", "famo meta_step"])
def test_an_old_tensor_left_in_the_optimizer_beside_its_successor_is_not_refused(form, change):
    """A parameter replaced whose successor the optimizer holds too trains: a weight tied to one the optimizer holds
    (heads[1].weight = heads[0].weight), a head swapped for a new one added with optimizer.add_param_group (torch's
    way to add what should train). The old tensor left in the optimizer gets no gradient and steps nothing of the
    model, as a tensor that never was the model's: not refused (it had been, "the model holds another now")."""
    torch.manual_seed(0)
    model = tiny_net(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train, val = batch(8), batch(8)
    w, iteration = _weighter_and_iteration(form, model, optimizer, train, val)
    iteration()
    _tie(model) if change == "tie" else _swap_and_add(model, optimizer)
    heads = {n: p.detach().clone() for n, p in model.heads.named_parameters()}
    iteration()
    iteration()
    assert all(not torch.equal(heads[n], p) for n, p in model.heads.named_parameters())


class DetachedTerms(mw.DenseDistillLoss):
    """A criterion computing its terms outside autograd's graph."""

    def forward(self, outputs, target, **kwargs):
        return super().forward([o.detach() for o in outputs], target, **kwargs)


def error_rate(outputs, target):
    """A validation objective without a gradient: the last exit's error rate."""
    return (outputs[-1].argmax(1) != target).float().mean()


STEP_FORMS = {**{f"weighting {name}": {"weighting": name} for name in mw.WEIGHTINGS},
              "learn=False": {"learn": False}, "exact jvp": {}, "exact finite_difference": {"backend":
                                                                                          "finite_difference"},
              "exact higher": {"backend": "higher"}, "fast": {"mode": "fast"}}


def build_form(form, model, optimizer, criterion=None, validation=None, window=2):
    """The weighter or weighting of a form of STEP_FORMS (or "capturable") on ``model`` and ``optimizer``."""
    options = dict(STEP_FORMS.get(form, {"mode": "fast", "capturable": True, "nonfinite": "skip"}))
    name = options.pop("weighting", None)
    criterion = mw.DenseDistillLoss(3) if criterion is None else criterion
    if name is not None:
        options = {"dwa": {"window": window}, "sdn": {"epochs": 3, "steps_per_epoch": 2},
                   "gradnorm": {"shared_parameters": list(model.stages[0].parameters())}}.get(name, {})
        return mw.WEIGHTINGS[name](model, optimizer, criterion, **options)
    return mw.HarmonizedWeighter(model, optimizer, criterion, validation or mw.BalancedValidation(3), **options)


@pytest.mark.parametrize("what", ["criterion", "validation objective"])
@pytest.mark.parametrize("form", list(STEP_FORMS))
def test_a_loss_without_a_gradient_is_refused_by_name_changing_nothing(form, what):
    """A criterion whose terms are detached, or a validation objective with no gradient (an error rate), in every
    one-call step and meta step form: a ValueError that names which and what to do (it was torch's bare 'element
    0 of tensors does not require grad'), the model, its optimizer and the weights unchanged (the fast mode's
    step() excepted for the validation objective: its model step comes first, and the error's note says so)."""
    options = dict(STEP_FORMS[form])
    name = options.pop("weighting", None)
    if what == "validation objective" and (name is not None or options.get("learn") is False):
        pytest.skip("no validation objective")
    torch.manual_seed(0)
    model = tiny_net(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    w = build_form(form, model, optimizer, DetachedTerms(3) if what == "criterion" else None,
                   error_rate if what == "validation objective" else None)
    (x, y), (xv, yv) = batch(), batch()
    before = copy.deepcopy((model.state_dict(), optimizer.state_dict(), w.state_dict()))
    match = "training loss has no gradient" if what == "criterion" else "validation objective has no gradient"
    with pytest.raises(ValueError, match=match) as caught:
        w.step((x, y), (xv, yv))
    after = (model.state_dict(), optimizer.state_dict(), w.state_dict())
    if form == "fast" and what == "validation objective":
        assert "after the model's step" in " ".join(getattr(caught.value, "__notes__", []))
    else:
        assert str(after) == str(before)


@pytest.mark.parametrize("call", ["step", "meta_step"])
@pytest.mark.parametrize("form", [*STEP_FORMS, "capturable"])
def test_a_call_under_inference_mode_is_refused_saying_so_changing_nothing(form, call):
    """``step()`` (and the meta step of the HarmonizedWeighter's two calls) under ``torch.inference_mode()``, where
    autograd records nothing and ``torch.enable_grad()`` cannot turn it back on: refused as a criterion or
    objective with no gradient, whose message sent the user to fix a criterion that is right (helper-159), and the
    step's snapshots it had allocated there were inference tensors, so the same call outside it failed too
    ("Inplace update to inference tensor"). Refused first, saying why, with the model, its optimizer and the
    weights unchanged; outside it the same call runs."""
    options = dict(STEP_FORMS.get(form, {"mode": "fast", "capturable": True, "nonfinite": "skip"}))
    name = options.pop("weighting", None)
    if call == "meta_step" and (name is not None or options.get("learn") is False or "capturable" in options):
        pytest.skip("a weighting's meta_step (and learn=False's) needs no gradient: it runs")
    call = "device_step" if "capturable" in options and call == "step" else call
    torch.manual_seed(0)
    model = tiny_net(3, batchnorm="capturable" not in options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused="capturable" in options or None)
    w = build_form(form, model, optimizer)
    train, val = batch(), batch()
    if call == "meta_step" and w.mode == "fast":  # (its meta_step comes after the user's step)
        optimizer.zero_grad()
        w.loss(model(train[0]), train[1]).backward()
        optimizer.step()
    before = copy.deepcopy((model.state_dict(), optimizer.state_dict(), w.state_dict()))
    with pytest.raises(RuntimeError, match=r"\.(meta_|device_)?step was called under torch.inference_mode\(\).*outside the "
                                           r"`with torch.inference_mode\(\):` block.*Nothing was changed"):
        with torch.inference_mode():
            getattr(w, call)(train, val)
    assert str((model.state_dict(), optimizer.state_dict(), w.state_dict())) == str(before)
    getattr(w, call)(train, val)  # (outside it, the same call runs)


@pytest.mark.parametrize("form", list(STEP_FORMS))
def test_step_under_no_grad_is_the_step_outside_it_in_every_form(form):
    """``step()`` under ``torch.no_grad()`` (an evaluation block the loop did not leave) turns gradients back on, as
    the docs say: the HarmonizedWeighter's did, the loss weightings' were refused as a criterion with no gradient
    (helper-161). Every form gives, bit for bit, what the same steps give outside it."""
    def run(context):
        torch.manual_seed(0)
        model = tiny_net(3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        w = build_form(form, model, optimizer, window=1)
        for _ in range(3):
            train, val = batch(), batch()
            with context():
                w.step(train, val)
        return [p.detach().clone() for p in model.parameters()] + [w.gamma.detach().clone()]

    outside, inside = run(contextlib.nullcontext), run(torch.no_grad)
    assert all(torch.equal(a, b) for a, b in zip(outside, inside))


@pytest.mark.parametrize("kind", ["exact", "fast", "uw", "famo"])
def test_a_weighter_built_or_loaded_under_inference_mode_is_refused_or_works_after_it(kind):
    """A weighter built under ``torch.inference_mode()`` made gamma and its state as inference tensors: built, it
    failed at every step after it ("Inplace update to inference tensor", "Inference tensors cannot be saved for
    backward"), as did a HarmonizedWeighter whose checkpoint was loaded there (its gamma optimizer's state made
    anew; helper-161), or copied there (helper-162). All are refused first, saying so, with nothing changed; a loss
    weighting's load_state_dict, which copies into the tensors it holds, runs there, and the steps after it are
    those of a load outside."""
    def build():
        torch.manual_seed(0)
        model = tiny_net(3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if kind in ("exact", "fast"):
            return model, mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), mw.BalancedValidation(3),
                                                mode=kind)
        return model, mw.WEIGHTINGS[kind](model, optimizer, mw.DenseDistillLoss(3))

    with pytest.raises(RuntimeError, match=r"\(\) was called under torch.inference_mode\(\): the tensors it would "
                                           r"make there .* inference tensors.*Nothing was changed"):
        with torch.inference_mode():
            build()
    torch.manual_seed(1)
    train, val = batch(), batch()
    model, w = build()
    w.step(train, val)
    for copier in (copy.deepcopy, lambda w: pickle.loads(pickle.dumps(w))):  # (a copy made there: the same)
        with pytest.raises(RuntimeError, match=r"Copying or loading a \w+ \(copy.copy, copy.deepcopy, pickle, "
                                               r"torch.load\) was called under torch.inference_mode\(\)"):
            with torch.inference_mode():
                copier(w)
    saved = copy.deepcopy(w.state_dict())
    runs = []
    for inference in (False, True):
        model, w = build()
        before = str(w.state_dict())
        if inference and kind in ("exact", "fast"):
            with pytest.raises(RuntimeError, match=r"load_state_dict was called under torch.inference_mode\(\)"):
                with torch.inference_mode():
                    w.load_state_dict(saved)
            assert str(w.state_dict()) == before
        with torch.inference_mode() if inference and kind not in ("exact", "fast") else contextlib.nullcontext():
            w.load_state_dict(saved)
        w.step(train, val)
        runs.append([p.detach().clone() for p in model.parameters()] + [w.gamma.detach().clone()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("name", sorted(mw.WEIGHTINGS))
def test_a_weightings_meta_step_under_inference_mode_leaves_a_run_that_goes_on(name):
    """A loss weighting's meta_step runs under ``torch.inference_mode()`` (an evaluation block around it): FAMO's made
    its scratch copies there as inference tensors, so every later meta_step failed ("Inplace update to inference
    tensor outside InferenceMode"; helper-164). Every method's run after it is, bit for bit, the run with that
    meta_step outside it."""
    options = {"dwa": {"window": 2}, "sdn": {"epochs": 2, "steps_per_epoch": 2}}.get(name, {})
    torch.manual_seed(1)
    data = [batch() for _ in range(3)]
    runs = []
    for inference in (False, True):
        torch.manual_seed(0)
        model = tiny_net(3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if name == "gradnorm":
            options = {"shared_parameters": list(model.stages[0].parameters())}
        w = mw.WEIGHTINGS[name](model, optimizer, mw.DenseDistillLoss(3), **options)
        for i, (x, y) in enumerate(data):
            optimizer.zero_grad()
            w.loss(model(x), y).backward()
            optimizer.step()
            with torch.inference_mode() if inference and i == 0 else contextlib.nullcontext():
                w.meta_step((x, y))
        runs.append([p.detach().clone() for p in model.parameters()] + [w.gamma.detach().clone()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_a_one_sample_validation_batch_through_batchnorm_says_which_batch_and_what_to_do(mode):
    """A held-out loader's last batch of one sample: torch's BatchNorm refuses it in training mode, where the look-ahead
    runs the model, with its bare "Expected more than 1 value per channel when training", saying nothing of the
    validation batch (helper-165). The error names it and drop_last=True; in the exact mode nothing changed."""
    torch.manual_seed(0)
    model = tiny_net(3)  # (BatchNorm1d in every stage)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), mw.BalancedValidation(3), mode=mode)
    before = copy.deepcopy(model.state_dict())
    x, y = batch()
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel.*the validation batch holds one "
                                         r"sample.*drop_last=True"):
        w.step((x, y), (x[:1], y[:1]))
    if mode == "exact":
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and w.num_calls == 0


def _logits_calls(tmp_path):
    """How to call each public function that takes the exits' stacked logits, given them (``L``)."""
    y = torch.randint(0, 5, (20,), generator=torch.Generator().manual_seed(0))
    costs = [1.0, 2.0, 3.0]
    return {
        "anytime_accuracy_from_logits": lambda L: mw.anytime_accuracy_from_logits(L, y),
        "budgeted_curve": lambda L: mw.budgeted_curve(L, y, L, y, costs),
        "calibrate": lambda L: mw.calibrate(L, y, L, y),
        "evaluate_thresholds": lambda L: mw.evaluate_thresholds(L, y, [0.5, 0.5, 0.0], costs),
        "exit_assignment": lambda L: mw.exit_assignment(L, [0.5, 0.5, 0.0]),
        "expected_calibration_error": lambda L: mw.expected_calibration_error(L, y),
        "find_thresholds": lambda L: mw.find_thresholds(L, [0.3, 0.3, 0.4]),
        "fit_temperatures": lambda L: mw.fit_temperatures(L, y, iterations=5),
        "plot_reliability": lambda L: mw.plot_reliability(L, y, tmp_path / "reliability.png"),
        "predict": lambda L: mw.predict(L),
        "thresholds_for_accuracy": lambda L: mw.thresholds_for_accuracy(L, y, 0.1, costs=costs),
        "thresholds_for_budget": lambda L: mw.thresholds_for_budget(L, y, costs, 2.0, iterations=5),
    }


def test_every_function_taking_stacked_logits_says_how_to_stack_a_list_of_them(tmp_path):
    """The exits' logits as a model's forward returns them, a list of [N, C] tensors, where [K, N, C] is expected: the
    refusal said only that a list is not a tensor ("should be Tensors. Found `list`"; predict advised
    torch.as_tensor, which fails on a list of tensors) (helper-172). Every public function with a logits
    parameter (found by its signature, so a new one joins the walk) names torch.stack and collect_logits, and takes
    the stacked tensor."""
    import inspect
    import warnings

    calls = _logits_calls(tmp_path)
    public = {name for name in mw.__all__ if callable(getattr(mw, name)) and not inspect.isclass(getattr(mw, name))
              and any("logits" in p for p in inspect.signature(getattr(mw, name)).parameters)}
    assert public == set(calls), f"add how to call {public - set(calls)} to _logits_calls"
    exits = [torch.randn(20, 5, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    for name, call in calls.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call(torch.stack(exits))
        with pytest.raises((TypeError, ValueError)) as refused:
            call(exits)
        assert "torch.stack(logits)" in str(refused.value) and "collect_logits" in str(refused.value), name
    # per-token exits' logits: the hint says how to score the tokens as samples, which is then taken (following the
    # stacking alone was refused again, helper-173); EarlyExit's result (predictions and exits) gets no such hint
    tokens = [torch.randn(5, 4, 5, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    labels = torch.randint(0, 5, (5, 4), generator=torch.Generator().manual_seed(9))
    with pytest.raises(TypeError, match=r"flatten\(1, 2\).*labels.flatten\(\)"):
        mw.anytime_accuracy_from_logits(tokens, labels.flatten())
    mw.anytime_accuracy_from_logits(torch.stack(tokens).flatten(1, 2), labels.flatten())
    result = mw.EarlyExit(tiny_net(3).eval(), [0.5, 0.5, 0.0])(torch.randn(4, 6))
    with pytest.raises(TypeError) as refused:
        mw.predict(result)
    assert "torch.stack" not in str(refused.value)
