"""Faults found by an adversarial review (issue 13): each test failed before its fix.

Nothing lost: on every refused input the model, the optimizer state, gamma and the validation
average stay bitwise as they were; evaluation refuses what it cannot score."""

import abc
import copy
import dataclasses
import functools
import math
import typing
import warnings

import pytest
import torch
from torch import nn

import metaweight as mw
from conftest import batch, fast_two_calls, quiet, tiny_net
from test_errors import assert_same, snapshot


def make(K=3, optimizer="sgd", **kwargs):
    model = tiny_net(K)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
    return model, opt, mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(K), **kwargs)


def nan_batch():
    x, y = batch()
    x[0, 0] = float("nan")
    return x, y


# ------------------------------------------------------------------ 1. skip must not destroy the model
@pytest.mark.parametrize("learn", [True, False])
def test_skip_leaves_the_model_untouched_on_a_nan_training_batch(learn):
    model, opt, w = make(nonfinite="skip", learn=learn)
    w.step(batch(), batch())  # momentum buffers exist
    before = snapshot(model, opt, w)
    with pytest.warns(RuntimeWarning, match="Skipped"):
        metrics = w.step(nan_batch(), batch())
    assert metrics["model_step_skipped"] is True
    assert w.num_skipped >= 1
    assert_same(before, snapshot(model, opt, w))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    w.step(batch(), batch())  # training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("learn", [True, False])
def test_raise_refuses_a_nan_training_batch_and_changes_nothing(learn):
    model, opt, w = make(learn=learn)
    w.step(batch(), batch())
    before = snapshot(model, opt, w)
    with pytest.raises(ValueError, match="[Nn]on-finite|not finite"):
        w.step(nan_batch(), batch())
    assert_same(before, snapshot(model, opt, w))


def test_exploding_learning_rate_is_refused_before_the_parameters_overflow():
    model, opt, w = make(nonfinite="skip", learn=False)
    for group in opt.param_groups:
        group["lr"] = 1e38
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(6):
            w.step(batch(), batch())
    # parameters may have grown huge but never hold inf or NaN
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------ 2. balanced objective at zero loss
def test_balanced_objective_is_finite_when_an_exit_loss_is_exactly_zero():
    v = mw.BalancedValidation(3, alpha=0.5)
    losses = torch.tensor([0.0, 0.7, 0.0], requires_grad=True)
    objective = v.objective(losses)
    assert torch.isfinite(objective)
    # by the formula: 0.5 * 0.7 + 0.5 * (softplus(-1) + softplus(0) + softplus(-1)) before the first update
    expected = 0.5 * 0.7 + 0.5 * (2 * math.log1p(math.exp(-1.0)) + math.log(2.0))
    assert float(objective.detach()) == pytest.approx(expected, rel=1e-6)
    (grad,) = torch.autograd.grad(objective, losses)
    assert torch.isfinite(grad).all()


def test_meta_step_learns_when_a_validation_loss_is_exactly_zero():
    model = tiny_net(2, batchnorm=False)
    with torch.no_grad():  # the first exit is certain of class 0 on every input: CE exactly 0
        model.heads[0].weight.zero_()
        model.heads[0].bias.copy_(torch.tensor([1e4, 0, 0, 0, 0]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(2), gamma_lr=0.1)
    xv = torch.randn(8, 6)
    metrics = w.meta_step(batch(), (xv, torch.zeros(8, dtype=torch.long)))
    assert metrics["skipped"] is False and metrics["val_exit_losses"][0] == 0.0
    assert math.isfinite(metrics["val_objective"]) and w.num_meta_steps == 1


# ------------------------------------------------------------------ 3. checkpoints checked as a whole
def test_checkpoint_of_another_gamma_optimizer_is_refused():
    _, _, sgd = make(gamma_optimizer="sgd")
    sgd.step(batch(), batch())
    model, opt, adam = make(gamma_optimizer="adam")
    adam.step(batch(), batch())
    before = snapshot(model, opt, adam)
    with pytest.raises(ValueError, match="gamma optimizer is SGD.*Adam"):
        adam.load_state_dict(sgd.state_dict())
    old_style = sgd.state_dict()
    del old_style["gamma_optimizer_type"]  # checkpoints written before the type was recorded
    with pytest.raises(ValueError, match="settings"):
        adam.load_state_dict(old_style)
    assert_same(before, snapshot(model, opt, adam))
    adam.step(batch(), batch())  # still usable


def test_checkpoint_of_another_constraint_is_refused():
    """A checkpoint of a weighter with constraint='clamp' (gamma's sum free to move) loaded into one with
    constraint='normalize' without a word, and gamma jumped back to the sum it started from at the next meta
    step (helper-151). Now refused, changing nothing; one saved before the constraint was recorded loads as
    before."""
    _, _, clamped = make(constraint="clamp", gamma_lr=0.5)
    for _ in range(4):
        clamped.step(batch(), batch())
    model, opt, kept = make(constraint="normalize", gamma_lr=0.5)
    kept.step(batch(), batch())
    before = snapshot(model, opt, kept)
    with pytest.raises(ValueError, match="constraint='clamp', but this one has constraint='normalize'.*Nothing was"):
        kept.load_state_dict(clamped.state_dict())
    assert_same(before, snapshot(model, opt, kept))
    old_style = clamped.state_dict()
    del old_style["constraint"]  # checkpoints written before the constraint was recorded
    kept.load_state_dict(old_style)
    assert kept.gamma.sum() == clamped.gamma.sum()
    _, _, fixed = make(constraint="clamp", learn=False)  # fixed weights keep no sum (helper-152: refused)
    make(constraint="normalize", learn=False)[2].load_state_dict(fixed.state_dict())


def test_checkpoint_of_a_learned_gamma_is_refused_by_a_fixed_weighter_and_the_reverse():
    """A fixed-weight weighter (learn=False, preset naive_dkd) took an hdkd checkpoint's learned gamma
    without a word and trained on it from then on: the checkpoint did not record learn. Now it does,
    and a checkpoint of the other kind is refused, changing nothing; one saved before learn was
    recorded loads as before."""
    def built(name):
        model = tiny_net(3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, opt, mw.preset(name, 3).weighter(model, opt, mw.BalancedValidation(3), gamma_lr=0.2)

    _, _, learned = built("hdkd")
    for _ in range(3):
        learned.step(batch(), batch())
    _, _, fixed = built("naive_dkd")
    fixed.step(batch())
    assert learned.state_dict()["learn"] is True and fixed.state_dict()["learn"] is False
    for source, target, said in [(learned, "naive_dkd", "holds a learned gamma.*built with learn=False"),
                                 (fixed, "hdkd", "holds a fixed gamma.*built with learn=True")]:
        model, opt, weighter = built(target)
        weighter.step(batch(), batch()) if weighter.learn else weighter.step(batch())
        before = snapshot(model, opt, weighter)
        with pytest.raises(ValueError, match=rf"{said}.*Build the weighter the checkpoint was saved with.*"
                                             rf"Nothing was changed"):
            weighter.load_state_dict(source.state_dict())
        assert_same(before, snapshot(model, opt, weighter))
    model, opt, weighter = built("naive_dkd")
    with pytest.raises(ValueError, match="learn should be a bool"):
        weighter.load_state_dict({**fixed.state_dict(), "learn": "no"})
    old_style = fixed.state_dict()
    del old_style["learn"]  # checkpoints written before learn was recorded
    weighter.load_state_dict(old_style)
    assert torch.equal(weighter.gamma.detach(), fixed.gamma.detach())


@pytest.mark.parametrize("key", ["gamma", "gamma_optimizer", "validation", "num_meta_steps", "gamma_sum",
                                 "term_names"])
def test_checkpoint_missing_a_key_is_refused_before_anything_changes(key):
    model, opt, w = make()
    w.step(batch(), batch())
    state = w.state_dict()
    w.step(batch(), batch())
    before = snapshot(model, opt, w)
    del state[key]
    with pytest.raises(ValueError, match=key):
        w.load_state_dict(state)
    assert_same(before, snapshot(model, opt, w))


@pytest.mark.parametrize("corrupt", [
    lambda s: s["gamma"].__setitem__(0, float("nan")),
    lambda s: s["gamma"].__setitem__(1, float("inf")),
    lambda s: s["gamma"].__setitem__(2, -0.5),
    lambda s: s["validation"]["expected"].__setitem__(0, float("nan")),
    lambda s: s.__setitem__("num_meta_steps", -1),
    lambda s: s.__setitem__("gamma_sum", float("nan")),
    lambda s: s["gamma_optimizer"]["param_groups"].append({}),
    lambda s: s.__setitem__("num_meta_steps", s["num_calls"] + 1),  # (loaded before, as the weightings refuse it)
    lambda s: s["validation"]["num_updates"].fill_(-3),  # (loaded before: read as no average yet)
])
def test_checkpoint_with_bad_values_is_refused(corrupt):
    model, opt, w = make()
    w.step(batch(), batch())
    state = copy.deepcopy(w.state_dict())
    corrupt(state)
    before = snapshot(model, opt, w)
    with pytest.raises(ValueError):
        w.load_state_dict(state)
    assert_same(before, snapshot(model, opt, w))


def test_load_state_dict_of_a_non_dict_is_a_type_error():
    _, _, w = make()
    with pytest.raises(TypeError, match="state_dict"):
        w.load_state_dict(None)


# ------------------------------------------------------------------ 4. gamma's own step, hyper-parameters
class _NanSGD(torch.optim.SGD):
    """An optimizer whose step gives NaN weights, its options in range."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.fill_(float("nan"))


def test_gamma_optimizer_producing_nan_is_refused_and_gamma_kept():
    # (a step that goes wrong with options in range: a NaN lr is refused when the weighter is built, below)
    model, opt, w = make(gamma_optimizer=lambda p: _NanSGD(p, lr=0.1))
    before = snapshot(model, opt, w)
    gamma_opt_state = copy.deepcopy(w.gamma_optimizer.state_dict())
    with pytest.raises(ValueError, match="gamma's own optimizer step"):
        w.meta_step(batch(), batch())
    assert_same(before, snapshot(model, opt, w))
    assert w.gamma_optimizer.state_dict() == gamma_opt_state
    assert torch.isfinite(w.gamma).all()


@pytest.mark.parametrize("options,match", [
    ({"gamma_lr": float("inf")}, "gamma_lr"),
    ({"gamma_lr": float("nan")}, "gamma_lr"),
    ({"fd_epsilon": float("inf")}, "fd_epsilon"),
    ({"init": torch.zeros(6), "constraint": "normalize"}, "normalize"),
    ({"gamma_optimizer": "rmsprop"}, "gamma_optimizer"),
])
def test_non_finite_or_useless_settings_are_refused(options, match):
    model = tiny_net(3)
    with pytest.raises(ValueError, match=match):
        mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=0.1), mw.DenseDistillLoss(3), **options)


@pytest.mark.parametrize("temperature", [float("inf"), float("nan"), 0, -1, True])
def test_bad_temperature_is_refused(temperature):
    with pytest.raises(ValueError, match="temperature"):
        mw.DenseDistillLoss(3, temperature=temperature)


# ------------------------------------------------------------------ 5. evaluation as careful as training
def test_anytime_accuracy_refuses_out_of_range_labels_and_empty_input():
    logits = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="labels in"):
        mw.anytime_accuracy_from_logits(logits, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="no exit, sample or class"):
        mw.anytime_accuracy_from_logits(torch.randn(2, 0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="topk"):
        mw.anytime_accuracy_from_logits(logits, torch.tensor([0, 1, 2, 2]), topk=(0,))


def test_budget_functions_refuse_empty_nan_and_wrong_thresholds():
    val, yv = torch.randn(3, 50, 4), torch.randint(0, 4, (50,))
    costs = [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="no exit, sample or class"):
        mw.budgeted_curve(torch.randn(3, 0, 4), yv[:0], val, yv, costs)
    with pytest.raises(ValueError, match="budget"):
        mw.thresholds_for_budget(val, yv, costs, float("nan"))
    with pytest.raises(TypeError, match="3 thresholds.*1-d tensor"):  # refused as a 0-d `costs` is: not a list
        mw.exit_assignment(val, torch.tensor(0.5))  # one threshold would broadcast over every exit
    with pytest.raises(ValueError, match="3 thresholds"):
        mw.evaluate_thresholds(val, yv, torch.tensor([0.5, 0.5]), costs)
    with pytest.raises(ValueError, match=r"NaN.*give every exit a number.*float\('inf'\) for an exit no sample"):
        mw.evaluate_thresholds(val, yv, torch.tensor([0.5, float("nan"), 0.0]), costs)
    # the fix it gives: inf for the exit no sample should leave at (as MSDNet's 1e8, which no probability reaches)
    fixed = mw.evaluate_thresholds(val, yv, torch.tensor([0.5, float("inf"), 0.0]), costs)
    msdnet = mw.evaluate_thresholds(val, yv, torch.tensor([0.5, 1e8, 0.0]), costs)
    assert (fixed.cost, fixed.accuracy, fixed.exit_fractions) == (msdnet.cost, msdnet.accuracy, msdnet.exit_fractions)
    assert mw.exit_assignment(val, torch.tensor([0.5, float("inf"), 0.0])).exits.ne(1).all()
    with pytest.raises(ValueError, match="one cost per exit"):
        mw.budgeted_curve(val, yv, val, yv, [1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        mw.budgeted_curve(val, yv, val, yv, [1.0, float("nan"), 3.0])
    with pytest.raises(ValueError, match="labels in"):
        mw.budgeted_curve(val, yv + 10, val, yv, costs)


def test_exit_costs_refuses_an_empty_input():
    net = mw.MultiExit([nn.Linear(4, 4)], [nn.Linear(4, 2)])
    with pytest.raises(ValueError, match="batch size 0"):
        mw.exit_costs(net, torch.randn(0, 4))


class PairInput(nn.Module):
    """A model taking a pair (or a dict) of tensors as its one input, as the weighter allows."""

    def __init__(self):
        super().__init__()
        self.net = tiny_net(2)

    def forward(self, inputs):
        a, b = (inputs["a"], inputs["b"]) if isinstance(inputs, dict) else inputs
        return self.net(a + b)


def test_collect_logits_takes_tuple_and_dict_inputs_like_the_weighter():
    model = PairInput().eval()
    a, b, y = torch.randn(5, 6), torch.randn(5, 6), torch.randint(0, 5, (5,))
    reference = torch.stack(model(a + b) if False else model((a, b)))
    for inputs in ((a, b), [a, b], {"a": a, "b": b}):
        logits, labels = mw.collect_logits(model, [(inputs, y)])
        assert torch.equal(logits, reference) and torch.equal(labels, y)
    w = mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=0.1), mw.DenseDistillLoss(2))
    w.step(((a, b), y), ({"a": a, "b": b}, y))


def test_early_exit_on_a_model_left_in_train_mode_predicts_in_eval_mode_and_keeps_its_statistics():
    model = tiny_net(3)
    model.train()
    x = torch.randn(20, 6)
    for _ in range(3):
        model(torch.randn(32, 6) * 3 + 1)  # running statistics far from the test batch's
    stats = copy.deepcopy(model.state_dict())
    thresholds = torch.tensor([0.5, 0.4, 0.0])
    predictions, exits = mw.EarlyExit(model, thresholds)(x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, stats[k]), k
    assert model.training  # its mode is given back
    model.eval()
    expected_exits, expected_predictions = mw.exit_assignment(torch.stack(model(x)), thresholds)
    assert torch.equal(exits, expected_exits) and torch.equal(predictions, expected_predictions)


# ------------------------------------------------------------------ 6. clear errors
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.int8])
def test_integer_labels_of_any_width_are_accepted_as_long(dtype):
    logits = [torch.randn(4, 5, dtype=torch.float64) for _ in range(3)]
    y = torch.tensor([0, 1, 4, 2])
    criterion, validation = mw.DenseDistillLoss(3), mw.BalancedValidation(3)
    assert torch.equal(criterion(logits, y.to(dtype)), criterion(logits, y))
    assert torch.equal(validation(logits, y.to(dtype)), validation(logits, y))
    result = mw.anytime_accuracy_from_logits(torch.stack(logits), y.to(dtype))
    assert result.accuracy == mw.anytime_accuracy_from_logits(torch.stack(logits), y).accuracy


def test_model_returning_logits_and_features_gets_the_right_advice():
    logits = [torch.randn(4, 5) for _ in range(3)]
    with pytest.raises(ValueError, match=r"\(exit_logits, extras\)"):
        mw.DenseDistillLoss(3)((logits, torch.randn(4, 8)), torch.tensor([0, 1, 2, 3]))


def test_wrong_argument_types_name_the_argument():
    with pytest.raises(TypeError, match="`name`"):
        mw.preset(None, 3)
    with pytest.raises(TypeError, match="label_smoothing"):
        mw.DenseDistillLoss(3, label_smoothing="0.1")
    with pytest.raises(TypeError, match="exit_losses"):
        mw.BalancedValidation(3).objective([1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="thresholds"):
        mw.exit_assignment(torch.randn(3, 4, 5), ["0.5", "0.5", "0.5"])  # a list of numbers is fine, as for EarlyExit
    with pytest.raises(TypeError, match="logits"):
        mw.anytime_accuracy_from_logits([[0.1]], torch.tensor([0]))


# ------------------------------------------------------------------ checkpoints on disk
def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, w = make()
    path = tmp_path / "run.pt"
    mw.save_checkpoint({"weighter": w.state_dict()}, path)
    good = path.read_bytes()

    def dies(*args, **kwargs):
        raise KeyboardInterrupt  # the job is killed halfway through writing

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        mw.save_checkpoint({"weighter": w.state_dict()}, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]  # no temporary file left behind


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_checkpoint_file_gets_a_clear_error_and_changes_nothing(tmp_path, damage):
    model, opt, w = make()
    w.step(batch(), batch())
    path = tmp_path / "run.pt"
    mw.save_checkpoint({"weighter": w.state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00not a checkpoint" * 10,
                      "empty": b""}[damage])
    before = snapshot(model, opt, w)
    with pytest.raises(ValueError, match="damaged"):
        w.load_state_dict(mw.load_checkpoint(path)["weighter"])
    assert_same(before, snapshot(model, opt, w))


def test_checkpoint_round_trip_resumes_bit_for_bit(tmp_path):
    model, opt, w = make(gamma_optimizer="adam", gamma_lr=0.05)
    w.step(batch(), batch())
    mw.save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(), "weighter": w.state_dict()},
                       tmp_path / "c.pt")
    state = mw.load_checkpoint(tmp_path / "c.pt")
    model2, opt2, w2 = make(gamma_optimizer="adam", gamma_lr=0.05)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    w2.load_state_dict(state["weighter"])
    b, v = batch(), batch()
    w.step(b, v)
    w2.step(b, v)
    assert torch.equal(w.gamma, w2.gamma)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------ 6. warnings point at the caller's line
@pytest.mark.parametrize("mode,call,bad", [("exact", "step", "train"), ("exact", "step", "val"),
                                           ("exact", "meta_step", "val"), ("fast", "step", "train"),
                                           ("fast", "step", "val"), ("fast", "two_calls", "val")])
def test_skip_warnings_point_at_the_callers_line(mode, call, bad):
    model, opt, w = make(nonfinite="skip", mode=mode)
    w.step(batch(), batch())
    train, val = (nan_batch(), batch()) if bad == "train" else (batch(), nan_batch())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if call == "two_calls":
            fast_two_calls(w, model, opt, train, val)
        else:
            getattr(w, call)(train, val)
    skipped = [c for c in caught if "Skipped" in str(c.message)]
    assert skipped, [str(c.message) for c in caught]
    # fast_two_calls lives in conftest: there the caller's line is the weighter call inside it
    assert {c.filename for c in skipped} == {fast_two_calls.__code__.co_filename if call == "two_calls"
                                             else __file__}, [(c.filename, c.lineno) for c in skipped]


class _BufferBlowsUp(nn.Module):
    """A model whose real forward (not the look-ahead's, which runs on copies of the buffers)
    can be made to write inf into a buffer: the meta step succeeds, the model step is refused."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.register_buffer("seen", torch.zeros(()))
        self.blow_up = False

    def forward(self, x):
        if self.training:
            self.seen.add_(float("inf") if self.blow_up else 1.0)
        return self.net(x)


@pytest.mark.parametrize("reuse", [False, True])
def test_refused_model_step_after_a_meta_step_puts_the_validation_average_back(reuse):
    torch.manual_seed(0)
    model = _BufferBlowsUp(tiny_net(3))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    w = mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(3), nonfinite="skip", reuse_forward=reuse)
    w.step(batch(), batch())
    w.step(batch(), batch())
    before = snapshot(model, opt, w)
    expected = w.validation.expected.clone()
    model.blow_up = True
    with pytest.warns(RuntimeWarning, match="Skipped a model step"):
        record = w.step(batch(), batch())
    assert record["model_step_skipped"] is True
    assert torch.equal(w.validation.expected, expected)  # the meta step's update of the average undone
    assert_same(before, snapshot(model, opt, w))
    assert str(before[2]["gamma_optimizer"]) == str(w.state_dict()["gamma_optimizer"])


def test_state_dict_is_a_copy_that_later_training_does_not_change():
    model, opt, w = make(gamma_optimizer="adam")
    w.step(batch(), batch())
    saved = w.state_dict()
    kept = copy.deepcopy(saved)
    w.step(batch(), batch())
    for k in kept["validation"]:
        assert torch.equal(saved["validation"][k], kept["validation"][k]), k
    assert torch.equal(saved["gamma"], kept["gamma"])
    assert str(saved["gamma_optimizer"]) == str(kept["gamma_optimizer"])


# ------------------------------------------------------------------ optimizer option values, the user's and gamma's
def _no_weighter_hooks(opt):
    return not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


@pytest.mark.parametrize("build,match", [
    (lambda ps: torch.optim.SGD(ps, lr=float("nan")), "lr=nan, not finite"),
    (lambda ps: torch.optim.SGD(ps, lr=float("inf")), "lr=inf, not finite"),
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=float("nan")), "momentum=nan"),
    (lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=float("inf")), "weight_decay=inf"),
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=1.5), "dampening=1.5, above 1"),
    (lambda ps: torch.optim.Adam(ps, lr=0.01, eps=0.0), r"eps=0.0, not above 0"),
    (lambda ps: torch.optim.AdamW(ps, lr=float("inf")), "lr=inf"),
    (lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=float("inf")), "weight_decay=inf"),
])
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_non_finite_or_out_of_range_optimizer_options_are_refused_at_construction(build, match, mode):
    """torch's constructors let NaN and inf through (``lr < 0`` is False for NaN) and accept eps=0: the look-ahead
    replayed them, and the meta step came out NaN (or the refusal blamed the validation objective)."""
    model = tiny_net(3)
    opt = build(model.parameters())
    with pytest.raises(ValueError, match=r"The optimizer has " + match + r".*parameter group 0.*Nothing was changed"):
        mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(3), mode=mode)
    assert _no_weighter_hooks(opt)


@pytest.mark.parametrize("build,match", [
    (lambda g: torch.optim.Adam(g, lr=0.01, eps=0.0), "eps=0.0, not above 0"),
    (lambda g: torch.optim.SGD(g, lr=0.01, momentum=float("nan")), "momentum=nan"),
    (lambda g: torch.optim.Adam(g, lr=0.01, weight_decay=float("inf")), "weight_decay=inf"),
])
def test_gamma_optimizer_options_are_checked_by_the_same_table(build, match):
    model = tiny_net(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"gamma's optimizer .*has " + match):
        mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(3), gamma_optimizer=build)
    assert _no_weighter_hooks(opt)


SET_LATER = [
    ("model", "lr", float("nan"), "lr=nan, not finite"),
    ("model", "lr", float("inf"), "lr=inf, not finite"),
    ("model", "lr", torch.tensor([float("nan")]), "lr=nan, not finite"),  # (a 1-element tensor, read on the CPU)
    ("model", "betas", (1.5, 0.999), r"betas\[0\]=1.5, not below 1"),
    ("model", "betas", (0.9, float("nan")), r"betas\[1\]=nan"),
    ("model", "eps", -1.0, "eps=-1.0, not above 0"),
    ("model", "weight_decay", float("nan"), "weight_decay=nan"),
    ("gamma", "lr", float("nan"), "lr=nan, not finite"),
    ("gamma", "betas", (0.9, 1.0), r"betas\[1\]=1.0, not below 1"),
    ("gamma", "eps", 0.0, "eps=0.0"),
]


@pytest.mark.parametrize("owner,name,value,match", SET_LATER)
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_option_values_set_between_steps_are_refused_by_step_changing_nothing(owner, name, value, match, mode):
    """A scheduler (or a hand) may set an option between steps: checked before every meta step, not only when the
    weighter was built; before, a NaN lr came out as a 'non-finite validation objective' and betas or eps out of
    range were replayed as they were."""
    model, opt, w = make(optimizer="adam", mode=mode)
    with quiet():
        w.step(batch(), batch())  # (a first step: state to keep)
    target = opt if owner == "model" else w.gamma_optimizer
    target.param_groups[0][name] = value
    before = snapshot(model, opt, w)
    gamma_state = copy.deepcopy(w.gamma_optimizer.state_dict())
    who = "The optimizer" if owner == "model" else "gamma's optimizer"
    with pytest.raises(ValueError, match=who + r".* has " + match + r".*Nothing was changed"):
        w.step(batch(), batch())
    assert_same(before, snapshot(model, opt, w))
    assert str(w.gamma_optimizer.state_dict()) == str(gamma_state)


@pytest.mark.parametrize("owner,name,value,match", SET_LATER[::2])
def test_option_values_set_between_steps_are_refused_by_the_two_call_form(owner, name, value, match):
    model, opt, w = make(optimizer="adam", mode="fast")
    fast_two_calls(w, model, opt, batch(), batch())
    (opt if owner == "model" else w.gamma_optimizer).param_groups[0][name] = value
    gamma, gamma_state = w.gamma.clone(), copy.deepcopy(w.gamma_optimizer.state_dict())
    with pytest.raises(ValueError, match=r" has " + match):
        with quiet():
            fast_two_calls(w, model, opt, batch(), batch())
    assert torch.equal(gamma, w.gamma) and str(w.gamma_optimizer.state_dict()) == str(gamma_state)


@pytest.mark.parametrize("kind,option,value", [
    (torch.optim.SGD, "lr", -0.1), (torch.optim.SGD, "momentum", -0.5), (torch.optim.SGD, "weight_decay", -1e-4),
    (torch.optim.Adam, "lr", -1e-3), (torch.optim.Adam, "eps", -1e-8), (torch.optim.Adam, "betas", (1.0, 0.999)),
    (torch.optim.Adam, "betas", (0.9, -0.1)), (torch.optim.Adam, "weight_decay", -0.01),
    (torch.optim.AdamW, "betas", (-0.1, 0.999)), (torch.optim.RMSprop, "alpha", -0.5),
    (torch.optim.RMSprop, "eps", -1.0), (torch.optim.RMSprop, "momentum", -0.1),
])
def test_every_value_torch_refuses_is_refused_when_set_after_construction(kind, option, value):
    """The independent reference: torch's own constructor. What it refuses, set on a built optimizer (where torch
    never looks again), the weighter refuses too."""
    with pytest.raises(ValueError):
        kind([nn.Parameter(torch.zeros(2))], **{option: value})
    model = tiny_net(2)
    opt = kind(model.parameters(), lr=0.01)
    with quiet():
        w = mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(2))
    opt.param_groups[0][option] = value
    label = option if not isinstance(value, tuple) else option + r"\[\d\]"
    with pytest.raises(ValueError, match=r"The optimizer has " + label + "="):
        w.meta_step(batch(), batch())


# ------------------------------------------------------------------ gamma's optimizer state from a checkpoint
def _set(key, value):
    return lambda s: s.__setitem__(key, value)


@pytest.mark.parametrize("gamma_optimizer,corrupt,match", [
    ("adam", lambda s: s["exp_avg_sq"].__setitem__(2, -1e-3), r"'exp_avg_sq' \(parameter 0\) has negative entries"),
    ("adam", _set("step", torch.tensor(-3.0)), r"'step' \(parameter 0\) is -3.0: a step count is a whole number"),
    ("adam", _set("step", torch.tensor(2.5)), r"'step' .* is 2.5: a step count"),
    ("adam", _set("step", -1), r"'step' .* is -1: a step count"),
    ("adam", _set("step", 2.5), r"'step' .* is 2.5: a step count"),
    ("adam", _set("step", torch.tensor([1.0, 1.0])), r"'step' .* is \[1.0, 1.0\]: a step count"),
    ("adam", _set("step", torch.tensor(float("inf"))), r"'step' .* is inf: a step count"),
    ("adam", lambda s: s["exp_avg"].__setitem__(0, float("nan")), r"'exp_avg' .* non-finite"),
    ("adam", lambda s: s.__setitem__("exp_avg", s["exp_avg"].long()), r"'exp_avg' .* torch.int64 tensor"),
    ("adam", lambda s: s.__setitem__("exp_avg_sq", s["exp_avg_sq"][:3]), r"'exp_avg_sq' .* shape \(3,\)"),
    ("momentum", lambda s: s["momentum_buffer"].__setitem__(0, float("inf")), r"'momentum_buffer' .* non-finite"),
])
def test_impossible_gamma_optimizer_state_in_a_checkpoint_is_refused_before_loading(gamma_optimizer, corrupt, match):
    """torch's load_state_dict takes negative second moments, negative or fractional step counts and integer
    moments; the next meta step was then NaN, complex ('ComplexFloat can't be cast'), a division by zero, or
    silently off (step 2.5)."""
    if gamma_optimizer == "momentum":
        gamma_optimizer = lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)  # noqa: E731
    model, opt, w = make(gamma_optimizer=gamma_optimizer)
    w.step(batch(), batch())
    good = copy.deepcopy(w.state_dict())
    state = copy.deepcopy(good)
    corrupt(state["gamma_optimizer"]["state"][0])
    before, gamma_state = snapshot(model, opt, w), copy.deepcopy(w.gamma_optimizer.state_dict())
    with pytest.raises(ValueError, match=r"The checkpoint's gamma optimizer's state " + match):
        w.load_state_dict(state)
    assert_same(before, snapshot(model, opt, w))
    assert str(w.gamma_optimizer.state_dict()) == str(gamma_state)
    # what is possible still loads: zeros, a step count as a Python int
    for name, value in good["gamma_optimizer"]["state"][0].items():
        if name == "step":
            good["gamma_optimizer"]["state"][0][name] = int(value)
        elif name in ("exp_avg_sq", "exp_avg"):
            value.zero_()
    w.load_state_dict(good)
    w.step(batch(), batch())



# ------------------------------------------------------------------ warnings of a construction that is refused
@pytest.mark.parametrize("options,error", [
    ({"gamma_optimizer": lambda g: "not an optimizer"}, TypeError),
    ({"gamma_optimizer": lambda g: torch.optim.Adam(g, lr=0.01, eps=0.0)}, ValueError),
    ({"init": torch.ones(5)}, ValueError),
])
def test_a_refused_construction_warns_nothing_and_a_built_one_warns_once_at_the_callers_line(options, error):
    """The fallback to backend='higher' for an optimizer the fast backends do not know was warned of while the
    constructor still validated: a construction refused after it warned of a fallback that never happened."""
    model = tiny_net(3)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(error):
            mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(3), **options)
    assert [str(c.message) for c in caught] == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w = mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(3))
    assert [c.filename for c in caught if "falling back" in str(c.message)] == [__file__]
    assert w.backend == "higher"


@pytest.mark.parametrize("build,error", [
    (lambda m, o, c, cb: mw.HarmonizedWeighter(m, o, c, callbacks=cb, gamma_optimizer=lambda g: "not an optimizer"),
     TypeError),
    (lambda m, o, c, cb: mw.HarmonizedWeighter(m, o, c, callbacks=cb, constraint="normalize", init=[0.0] * 6),
     ValueError),
    (lambda m, o, c, cb: mw.HarmonizedWeighter(m, o, c, callbacks=cb, capturable=True), ValueError),
    (lambda m, o, c, cb: mw.HarmonizedWeighter(m, o, c, callbacks=[*cb, "not callable"]), TypeError),
    (lambda m, o, c, cb: mw.GradNorm(m, o, c, callbacks=cb, shared_parameters=[m.heads[0].weight]), ValueError),
    (lambda m, o, c, cb: mw.FAMO(m, o, c, callbacks=cb, min_losses=[0.1]), ValueError),
    (lambda m, o, c, cb: mw.SDNSchedule(m, o, c, callbacks=cb, epochs=2, steps_per_epoch=3,
                                        max_weights={"nope": 0.5}), ValueError),
    (lambda m, o, c, cb: mw.UW(m, o, c, callbacks=[*cb, 3]), TypeError),
], ids=["gamma_optimizer", "normalize", "capturable", "a callback", "gradnorm", "famo", "sdn", "uw callback"])
def test_a_refused_construction_takes_no_logger_from_the_run_that_holds_it(tmp_path, build, error):
    """A library logger logs the weighter given it last. The constructors registered their callbacks before their
    last checks (the gamma optimizer, init, capturable, a weighting's own options, a later callback that is not
    callable): a weighter refused there had taken the logger, and the run holding it was no longer logged ("given
    to another weighter since", its rows lost). Refused, a constructor takes nothing: the run logs on."""
    model = tiny_net(3)
    frozen = model.heads[0].weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    logger = mw.CSVLogger(tmp_path / "log.csv")
    running = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), callbacks=[logger])
    running.step(batch(), batch())
    frozen.requires_grad_(False)  # (for GradNorm: shared parameters must be trainable)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(error):
            build(model, optimizer, mw.DenseDistillLoss(3), [logger])
        frozen.requires_grad_(True)
        running.step(batch(), batch())
    assert [str(c.message) for c in caught if "Logger" in str(c.message)] == []
    assert [line.split(",")[0] for line in (tmp_path / "log.csv").read_text().splitlines()[1:]] == ["1", "2"]


class _PerDocstring(mw.Weighting):  # (the class docstring's recipe: _initial_gamma and _propose, no __init__)
    def _propose(self, terms, train_batch):
        return {"gamma": self.gamma * 0.9}


class _OwnGamma(mw.Weighting):  # (sets gamma itself, not through _setup)
    def __init__(self, model, optimizer, criterion, **kwargs):
        super().__init__(model, optimizer, criterion, **kwargs)
        self.gamma = torch.ones(self._terms.num_terms) * self._active

    def _propose(self, terms, train_batch):
        return {"gamma": self.gamma * 0.9}


class _ChecksLast(mw.Weighting):  # (its own option checked after _setup)
    def __init__(self, model, optimizer, criterion, rate=0.9, **kwargs):
        super().__init__(model, optimizer, criterion, **kwargs)
        self._setup()
        if not 0 < rate < 1:
            raise ValueError("rate should be in (0, 1)")
        self.rate = rate

    def _propose(self, terms, train_batch):
        return {"gamma": self.gamma * self.rate}


class _PropertyGamma(mw.Weighting):  # (gamma a property over log-weights its __init__ sets)
    def __init__(self, model, optimizer, criterion, **kwargs):
        super().__init__(model, optimizer, criterion, **kwargs)
        self.log_gamma = torch.full((self._terms.num_terms,), 0.5)
        self.register_meta_step_hook(_own_hook)  # (a hook of its own: after the constructor's callbacks)

    @property
    def gamma(self):
        return self.log_gamma.exp()

    @gamma.setter
    def gamma(self, value):
        self.log_gamma = value.log()

    def _propose(self, terms, train_batch):
        return {"gamma": self.gamma * 0.9}


def _own_hook(record):
    pass


class _Mixin:
    def __init__(self, *args, rate=0.9, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0 < rate < 1:
            raise ValueError("rate should be in (0, 1)")


class _MixinFirst(_Mixin, mw.UW):  # (a mixin's __init__ the outermost constructor)
    pass


class _WrapsInit(mw.UW):  # (its __init__ made with functools.wraps(UW.__init__), which copies attributes)
    @functools.wraps(mw.UW.__init__)
    def __init__(self, *args, rate=0.9, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0 < rate < 1:
            raise ValueError("rate should be in (0, 1)")


class _ClassDefault(mw.Weighting):  # (a class-level gamma = None: no value of its own)
    gamma = None

    def _propose(self, terms, train_batch):
        return {"gamma": self.gamma * 0.9}


@dataclasses.dataclass(eq=False, repr=False)
class _Dataclass(mw.Weighting):  # (a dataclass: its generated __init__, then __post_init__ calls Weighting's)
    net: nn.Module
    opt: torch.optim.Optimizer
    crit: object
    rate: float = 0.9
    callbacks_given: object = ()

    def __post_init__(self):
        callbacks, self.callbacks_given = self.callbacks_given, ()  # (a generator given: not kept, nor copied)
        super().__init__(self.net, self.opt, self.crit, callbacks=callbacks)
        if not 0 < self.rate < 1:
            raise ValueError("rate should be in (0, 1)")

    def _propose(self, terms, train_batch):
        return {"gamma": self.gamma * self.rate}


class _CachedGamma(mw.Weighting):  # (gamma a functools.cached_property: a value of its own, read when first used)
    @functools.cached_property
    def gamma(self):
        return torch.tensor([1.0, 2.0, 3.0, 0.5, 0.5, 0.5]) * self._active

    def _propose(self, terms, train_batch):
        return {"gamma": self.gamma * 0.9}


class _Slots(mw.Weighting):  # (its option and gamma in __slots__)
    __slots__ = ("rate", "gamma")

    def __init__(self, *args, rate=0.9, **kwargs):
        super().__init__(*args, **kwargs)
        self.rate = rate

    def _propose(self, terms, train_batch):
        return {"gamma": self.gamma * self.rate}


class _HarmonizedChecksLast(mw.HarmonizedWeighter):  # (the weighter's subclass, fast mode: hooks on the model)
    def __init__(self, *args, rate=0.9, **kwargs):
        super().__init__(*args, mode="fast", **kwargs)
        if not 0 < rate < 1:
            raise ValueError("rate should be in (0, 1)")


def _build(cls, model, optimizer, criterion, **kwargs):
    if cls is _Dataclass:
        kwargs["callbacks_given"] = kwargs.pop("callbacks", ())
    return cls(model, optimizer, criterion, **kwargs)


@pytest.mark.parametrize("cls", [_PerDocstring, _OwnGamma, _ChecksLast, _PropertyGamma, _MixinFirst, _ClassDefault,
                                 _Dataclass, _CachedGamma, _Slots])
@pytest.mark.parametrize("given", ["list", "generator"])
def test_a_weighting_of_your_own_gets_its_callbacks_once_built_and_none_refused(tmp_path, cls, given):
    """A loss weighting of your own, written as the class docstring says (``_initial_gamma`` and ``_propose``), or
    setting ``gamma`` itself, or checking its own option after ``_setup``: built, its callbacks are registered (the
    first was refused, 'no attribute gamma'; the second lost them silently once they were registered in
    ``_setup``), from a list or any iterable (a generator was refused once they were checked as a sequence);
    refused, it takes no logger from the run holding it and does not move the criterion, a mixin's constructor
    listed first included (helper-162). A gamma property its __init__ sets is kept (it was set again from
    _initial_gamma), and the constructor's callbacks come before the hooks the subclass registers itself."""
    model = tiny_net(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    logger = mw.CSVLogger(tmp_path / "log.csv")
    running = mw.UW(model, optimizer, mw.DenseDistillLoss(3), callbacks=[logger])
    running.step(batch())
    criterion = mw.DenseDistillLoss(3)
    moved = []
    criterion.to = lambda *args, **kwargs: moved.append(args) or criterion
    seen = []
    hooks = [lambda record: seen.append(record.iteration)]
    hooked = (len(model._forward_pre_hooks), len(model._forward_hooks), len(optimizer._optimizer_step_pre_hooks))
    for refused in (_ChecksLast, _MixinFirst, _WrapsInit, _Dataclass, _HarmonizedChecksLast):
        with pytest.raises(ValueError, match="rate should be"):
            _build(refused, model, optimizer, criterion, rate=2.0, callbacks=[logger])
    assert moved == []
    assert (len(model._forward_pre_hooks), len(model._forward_hooks),
            len(optimizer._optimizer_step_pre_hooks)) == hooked  # (the fast weighter's: none left)
    w = _build(cls, model, optimizer, criterion, callbacks=hooks if given == "list" else (h for h in hooks))
    assert w.callbacks == hooks + ([_own_hook] if cls is _PropertyGamma else []) and len(moved) == 1
    if cls is _PropertyGamma:  # (the weights its __init__ set, not _initial_gamma's)
        assert torch.allclose(w.gamma, torch.full((6,), 0.5).exp())
    if cls is _CachedGamma:
        assert w.gamma.tolist() == [1.0, 2.0, 3.0, 0.5, 0.5, 0.5]
    data = [batch(), batch()]
    w.step(data[0])
    assert seen == [1]
    copied = copy.deepcopy(w)  # (a copy goes on as the weighting does: its slots too)
    assert copied.step(data[1]).gamma == w.step(data[1]).gamma and seen == [1, 2, 2]
    assert torch.equal(copied.gamma, w.gamma)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        running.step(batch())
    assert [str(c.message) for c in caught if "Logger" in str(c.message)] == []
    assert [line.split(",")[0] for line in (tmp_path / "log.csv").read_text().splitlines()[1:]] == ["1", "2"]


# ------------------------------------------------------------------ a non-finite meta-gradient, said so
def test_a_non_finite_meta_gradient_of_finite_losses_names_its_terms_and_what_to_do():
    """The message listed the validation objective, its exit losses and the non-finite training terms, all finite
    here, and said 'check the data': it did not say that the meta-gradient was what went non-finite, for which
    terms, nor why that happens with finite losses."""
    model, opt, w = make()
    real = w._exact.backend.meta_gradient

    def overflowing(*args, **kwargs):  # (as an overflowing step derivative gives: finite losses, an inf slope)
        result = real(*args, **kwargs)
        result.gamma_grad[[1, 4]] = float("inf")
        return result

    w._exact.backend.meta_gradient = overflowing
    before = snapshot(model, opt, w)
    with pytest.raises(ValueError, match=r"non-finite meta-gradient \(d L_val / d gamma\) for the terms "
                                         r"\['ce\[2\]', 'kd\[3->1\]'\].*derivative through the look-ahead step.*eps"):
        w.meta_step(batch(), batch())
    assert_same(before, snapshot(model, opt, w))


def _fresh(kind):
    """A model, its SGD and a fast HarmonizedWeighter (``kind`` "fast") or the loss weighting ``kind``, of one seed."""
    torch.manual_seed(0)
    model = tiny_net(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if kind == "fast":
        return model, optimizer, mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), mode="fast")
    return model, optimizer, mw.WEIGHTINGS[kind](model, optimizer, mw.DenseDistillLoss(3))


def _resumed(kind, state):
    """:func:`_fresh` objects loaded with ``state`` (the model's, the optimizer's and the weighter's state dicts)."""
    model, optimizer, w = _fresh(kind)
    model.load_state_dict(state[0])
    optimizer.load_state_dict(state[1])
    w.load_state_dict(state[2])
    return model, optimizer, w


@pytest.mark.parametrize("kind", ["fast", "uw", "famo"])
def test_a_checkpoint_taken_between_the_step_and_meta_step_says_why_meta_step_finds_no_loss(kind):
    """Saved after optimizer.step() and before meta_step, a weighter resumed into fresh objects has no loss() call
    of that iteration (a checkpoint keeps the state only): its meta_step is refused, saying so (it said only to
    call loss() first, which the user had done before saving); after a loss() call of its own (for logging), the
    fast mode's refusal of a meta_step without a training one does not say it."""
    train, val = batch(), batch()
    model, optimizer, w = _fresh(kind)
    w.loss(model(train[0]), train[1]).backward()
    optimizer.step()
    state = copy.deepcopy((model.state_dict(), optimizer.state_dict(), w.state_dict()))
    model, optimizer, resumed = _resumed(kind, state)
    with pytest.raises(ValueError, match=r"this iteration.*loaded from a checkpoint since its last loss\(\) call.*save it "
                                         r"after meta_step"):
        resumed.meta_step(train, val)
    with torch.no_grad():
        resumed.loss(model(train[0]), train[1])  # (a loss for logging: no training call, but a call since the load)
    if kind == "fast":  # (the loss weightings read a logged call's terms; the fast mode has no step since the load
        # to score, so it skips, saying nothing of the checkpoint; after a step, it refuses, saying nothing of it)
        skipped = resumed.meta_step(train, val)
        assert skipped.skipped and "checkpoint" not in skipped.message
        optimizer.step()
        with pytest.raises(ValueError) as refused:
            resumed.meta_step(train, val)
        assert "checkpoint" not in str(refused.value)


@pytest.mark.parametrize("kind", ["fast", "uw", "famo", "rlw"])
def test_a_batch_skipped_before_its_loss_right_after_a_resume_is_skipped(kind):
    """A checkpoint saved at an iteration's end (after meta_step), resumed into fresh objects, then a batch the loop
    skips before its loss() call (Lightning's manual optimization returning early) and a meta_step: refused as a
    checkpoint saved between the step and meta_step, which it was not, and the resumed fit died (helper-178). The
    checkpoint says whether it was saved so (meta_step_due): this one was not, so the meta step is skipped,
    changing nothing; the test above shows one that was still refused."""
    train, val = batch(), batch()
    model, optimizer, w = _fresh(kind)
    w.loss(model(train[0]), train[1]).backward()
    optimizer.step()
    assert w.meta_step(train, val).ran
    state = copy.deepcopy((model.state_dict(), optimizer.state_dict(), w.state_dict()))
    assert state[2]["meta_step_due"] is False
    model, optimizer, resumed = _resumed(kind, state)
    kept = copy.deepcopy(resumed.state_dict())
    record = resumed.meta_step(train, val)
    assert record.skipped and not record.ran and "checkpoint" not in record.message
    assert torch.equal(resumed.state_dict()["gamma"], kept["gamma"])
    optimizer.zero_grad()
    resumed.loss(model(train[0]), train[1]).backward()
    optimizer.step()
    assert resumed.meta_step(train, val).ran


def _accumulating(kind):
    torch.manual_seed(0)
    model = tiny_net(3, batchnorm=False)  # (no running statistics: a micro-batch run again leaves the model as once)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if kind == "fast":
        return model, optimizer, mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), mode="fast")
    if kind == "gradnorm":
        return model, optimizer, mw.GradNorm(model, optimizer, mw.DenseDistillLoss(3),
                                             shared_parameters=list(model.stages[0].parameters()))
    options = {"window": 1} if kind == "dwa" else {}
    return model, optimizer, mw.WEIGHTINGS[kind](model, optimizer, mw.DenseDistillLoss(3), **options)


def _micro(model, optimizer, w, train, val, part):
    """One of an accumulated step's two micro-batches (8 samples each); the second steps and meta-steps."""
    x, y = train
    if part == 0:
        optimizer.zero_grad()
    (w.loss(model(x[8 * part:8 * part + 8]), y[8 * part:8 * part + 8]) / 2).backward()
    if part == 1:
        optimizer.step()
        return w.meta_step(train, val)


@pytest.mark.parametrize("kind", ["uw", "gradnorm", "dwa", "famo", "fast"])
def test_a_checkpoint_taken_in_the_middle_of_an_accumulated_step_refuses_the_meta_step_missing_its_calls(kind):
    """Saved after an accumulated step's first micro-batch and resumed with its .grad restored, the step used both
    micro-batches' gradients while the weighting held the second's terms alone: UW, GradNorm and DWA learned from
    them without a word (UW's ce[1] 1.75152 where the whole batch's is 1.69834), FAMO and the fast mode refused
    the whole batch as another one, not naming the load. The checkpoint now counts the step's loss() calls made, and
    that meta_step is refused, changing nothing, saying how to save and how to resume; the next iteration runs. A
    resume that starts the step over is the uninterrupted run, bit for bit."""
    batches = [(batch(), batch()) for _ in range(3)]
    model, optimizer, w = _accumulating(kind)
    for train, val in batches:
        _micro(model, optimizer, w, train, val, 0)
        _micro(model, optimizer, w, train, val, 1)
    uninterrupted = (copy.deepcopy(model.state_dict()), w.gamma.clone())

    model, optimizer, w = _accumulating(kind)
    _micro(model, optimizer, w, *batches[0], 0)
    _micro(model, optimizer, w, *batches[0], 1)
    assert w.state_dict()["pending_calls"] == 0
    _micro(model, optimizer, w, *batches[1], 0)
    state = copy.deepcopy((model.state_dict(), optimizer.state_dict(), w.state_dict(),
                           [p.grad for p in model.parameters()]))
    assert state[2]["pending_calls"] == 1

    def resumed():
        model, optimizer, w = _accumulating(kind)
        saved = copy.deepcopy(state)  # (torch's optimizer takes the momentum tensors as they are, and steps them)
        model.load_state_dict(saved[0])
        optimizer.load_state_dict(saved[1])
        w.load_state_dict(saved[2])
        return model, optimizer, w

    model, optimizer, w = resumed()  # the .grad restored too: the step to come carries the first micro-batch's
    for p, g in zip(model.parameters(), state[3]):
        p.grad = g.clone()
    before = copy.deepcopy(w.state_dict())
    with pytest.raises(ValueError, match=r"saved in the middle of an accumulated step, with 1 loss\(\) call of it "
                                         r"made.*unchanged.*Save checkpoints after optimizer.step\(\) and meta_step; "
                                         r"to resume from this one, start its step over"):
        _micro(model, optimizer, w, *batches[1], 1)
    after = w.state_dict()

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return torch.equal(a, b)
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(v, b[k]) for k, v in a.items())
        return a == b

    assert before.pop("pending_calls") == 1 and after.pop("pending_calls") == 0  # (the step is taken since)
    assert before.pop("meta_step_due") is False and after.pop("meta_step_due") is True  # (its meta_step refused)
    assert same(before, after)
    with quiet():
        _micro(model, optimizer, w, *batches[2], 0)
        assert _micro(model, optimizer, w, *batches[2], 1).meta_step == 2

    if kind in ("uw", "gradnorm", "dwa"):  # a checkpoint of an older metaweight (no count) loads as before
        model, optimizer, w = _accumulating(kind)
        saved = copy.deepcopy(state)
        saved[2].pop("pending_calls")
        model.load_state_dict(saved[0])
        optimizer.load_state_dict(saved[1])
        w.load_state_dict(saved[2])
        for p, g in zip(model.parameters(), saved[3]):
            p.grad = g
        assert _micro(model, optimizer, w, *batches[1], 1).meta_step == 2

    model, optimizer, w = resumed()  # the step started over: both micro-batches again
    for train, val in batches[1:]:
        _micro(model, optimizer, w, train, val, 0)
        _micro(model, optimizer, w, train, val, 1)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in uninterrupted[0].items())
    assert torch.equal(w.gamma, uninterrupted[1])


@pytest.mark.parametrize("kind", ["uw", "famo", "fast"])
def test_a_mid_step_checkpoint_loaded_back_and_its_step_run_again_in_the_readme_order_is_taken(kind):
    """Loaded back into the same objects after the step went on (a rollback), the step run again in the README's
    order (loss(), then optimizer.zero_grad(), backward, step, meta_step): the gradients the last step left were
    still there at loss(), and the meta_step was refused as carrying the checkpoint's calls, though zero_grad had
    cleared them before the backward (found by helper-142). Whether the step carries them is now judged at the
    backward: the run again is taken, and gives the model and gamma of the first pass, bit for bit."""
    batches = [(batch(), batch()) for _ in range(2)]
    model, optimizer, w = _accumulating(kind)

    def micro(train, val, part):  # (the README's order: zero_grad after loss(), before the backward)
        x, y = train
        loss = w.loss(model(x[8 * part:8 * part + 8]), y[8 * part:8 * part + 8]) / 2
        if part == 0:
            optimizer.zero_grad()
        loss.backward()
        if part == 1:
            optimizer.step()
            return w.meta_step(train, val)

    micro(*batches[0], 0)
    micro(*batches[0], 1)
    micro(*batches[1], 0)
    state = copy.deepcopy((model.state_dict(), optimizer.state_dict(), w.state_dict()))
    assert state[2]["pending_calls"] == 1
    micro(*batches[1], 1)
    first = (copy.deepcopy(model.state_dict()), w.gamma.clone())
    model.load_state_dict(state[0])
    optimizer.load_state_dict(copy.deepcopy(state[1]))
    w.load_state_dict(state[2])
    micro(*batches[1], 0)
    assert micro(*batches[1], 1).ran
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in first[0].items())
    assert torch.equal(w.gamma, first[1])


@pytest.mark.parametrize("kind", ["famo", "fast"])
def test_a_batch_refused_after_a_load_in_the_middle_of_an_iteration_says_the_load(kind):
    """Resumed from a checkpoint saved after an accumulated step's first micro-batch, without its .grad (the step
    takes the second alone), FAMO's check of the labels and the fast mode's check of the batch refuse the whole
    batch, as the step's loss() calls since the load are the second micro-batch only: the refusal now says that
    the load is why (it said only that the batch was another)."""
    train, val = batch(), batch()
    model, optimizer, w = _accumulating(kind)
    _micro(model, optimizer, w, train, val, 0)
    state = copy.deepcopy((model.state_dict(), optimizer.state_dict(), w.state_dict()))
    for pending in (True, False):
        model, optimizer, w = _accumulating(kind)
        model.load_state_dict(state[0])
        optimizer.load_state_dict(copy.deepcopy(state[1]))
        saved = dict(state[2])
        if not pending:
            saved.pop("pending_calls")  # (a checkpoint of an older metaweight: the calls are not known)
        w.load_state_dict(saved)
        with pytest.raises(ValueError, match=r"(labels are not those|another training batch).*loaded from a "
                                             r"checkpoint during this iteration.*save it after optimizer.step\(\) "
                                             r"and meta_step"):
            _micro(model, optimizer, w, train, val, 1)


@pytest.mark.parametrize("kind", ["uw", "fast"])
def test_pending_calls_of_a_checkpoint_are_checked_and_kept_by_a_save_before_the_next_call(kind):
    """The checkpoint's count of an accumulated step's loss() calls is refused where no run writes it (a bool, a
    negative number, a string), changing nothing; loaded and saved again before the next training loss(), it is
    kept (the resume of a resume is still one in the middle of that step)."""
    train, val = batch(), batch()
    model, optimizer, w = _accumulating(kind)
    _micro(model, optimizer, w, train, val, 0)
    _micro(model, optimizer, w, train, val, 0)  # (its zero_grad cleared the first call's gradients: not counted)
    (w.loss(model(train[0][8:]), train[1][8:]) / 2).backward()
    state = copy.deepcopy(w.state_dict())
    assert state["pending_calls"] == 2
    model, optimizer, w = _accumulating(kind)
    before = copy.deepcopy(w.state_dict())
    for bad in (True, -1, "1", 1.0):
        with pytest.raises(ValueError, match=r"`pending_calls` should be an int >= 0"):
            w.load_state_dict({**state, "pending_calls": bad})
        assert torch.equal(w.gamma, before["gamma"]) and w.state_dict()["pending_calls"] == 0
    w.load_state_dict(state)
    assert w.state_dict()["pending_calls"] == 2


class _Abstract(abc.ABC):  # (an abstract mixin: ABCMeta)
    @abc.abstractmethod
    def describe(self): ...


class _WithAbstract(mw.RLW, _Abstract):
    def describe(self):
        return "rlw"


class _Declared(mw.UW, mw.LossWeighting):  # (the library's own Protocol listed as a base)
    pass


@typing.runtime_checkable
class _Steps(typing.Protocol):
    def step(self, train_batch, val_batch=None): ...


class _ProtocolFirst(_Steps, mw.UW):  # (a Protocol of the user's listed first: typing's stand-in constructor)
    pass


class _Decorator:
    """A decorator object over a constructor: a descriptor with ``__get__`` and ``__call__``, not a function."""

    def __init__(self, function):
        self.function = function

    def __get__(self, instance, owner=None):
        return self if instance is None else functools.partial(self.function, instance)

    def __call__(self, *args, **kwargs):
        return self.function(*args, **kwargs)


class _Halving(mw.Weighting):
    """A weighting of the public base that defines its initial weights and its rule only."""

    def _initial_gamma(self):
        return torch.full((self._terms.num_terms,), 2.0)

    def _propose(self, terms, train_batch):
        return {"gamma": self.gamma / 2}


def test_init_called_again_builds_the_weighter_anew():
    """``__init__`` called again on a built weighter (a reset) is a new build: a subclass defining ``_initial_gamma``
    only kept its trained weights (silently; of the old number of terms after a criterion of another K, and the next
    step crashed), and a fast HarmonizedWeighter kept the last build's hooks on the model and the optimizer beside
    the new ones (helper-171). The weights are the new build's, and one set of hooks is left."""
    model = tiny_net(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    w = _Halving(model, optimizer, mw.DenseDistillLoss(3))
    for _ in range(3):
        w.step(batch())
    assert w.gamma.tolist() == [0.25] * 6
    w.__init__(model, optimizer, mw.DenseDistillLoss(3))
    assert w.gamma.tolist() == [2.0] * 6 and w.num_meta_steps == 0
    w.__init__(model, optimizer, mw.DenseDistillLoss(3, teachers="none"))  # (the distillation terms inactive)
    assert w.gamma.tolist() == [2.0] * 3 + [0.0] * 3
    w.step(batch())
    assert w.gamma.tolist() == [1.0] * 3 + [0.0] * 3

    def hooks():
        return (len(model._forward_pre_hooks), len(model._forward_hooks), len(optimizer._optimizer_step_pre_hooks),
                len(optimizer._optimizer_step_post_hooks))

    before = hooks()
    fast = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), mode="fast")
    built = hooks()
    assert built == tuple(n + 1 for n in before)
    fast.__init__(model, optimizer, mw.DenseDistillLoss(3), mode="fast")
    assert hooks() == built
    # a re-build refused leaves the weighter as it was, its hooks too (its weights and hooks were gone: helper-173);
    # a shallow copy re-built leaves the original's hooks, which it shared
    trained = w.gamma.clone()
    with pytest.raises(ValueError, match="nonfinite"):
        w.__init__(model, optimizer, mw.DenseDistillLoss(3, teachers="none"), nonfinite="bogus")
    assert torch.equal(w.gamma, trained) and w.step(batch()).ran
    with pytest.raises(ValueError, match="nonfinite"):
        fast.__init__(model, optimizer, mw.DenseDistillLoss(3), mode="fast", nonfinite="bogus")
    assert hooks() == built
    copy.copy(fast).__init__(model, optimizer, mw.DenseDistillLoss(3))
    assert hooks() == built
    fast.__init__(model, optimizer, mw.DenseDistillLoss(3))  # (exact: none of the fast mode's hooks)
    assert hooks() == before


class _Decorated(mw.UW):
    @_Decorator
    def __init__(self, *args, rate=0.9, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0 < rate < 1:
            raise ValueError("rate should be in (0, 1)")


class _ChildOfDecorated(_Decorated):
    pass


def test_a_weighting_with_a_metaclass_of_its_own_or_built_in_two_calls_is_built_whole(tmp_path):
    """A metaclass running the constructor whole (helper-167) conflicted with abc.ABC and Protocol bases, and
    skipped a weighting made as ``cls.__new__(cls)`` then ``__init__`` (a factory): its callbacks never registered, a
    fast HarmonizedWeighter never hooked its two calls. The constructor is wrapped at the class's first instance
    instead: each is built, its callbacks registered, and a fast weighter made in two calls learns."""
    model = tiny_net(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []

    def hook(record):
        seen.append(record.iteration)

    for cls in (_WithAbstract, _Declared, _ProtocolFirst):
        w = cls(model, optimizer, mw.DenseDistillLoss(3), callbacks=[hook])
        assert w.callbacks == [hook]
    # a factory calling the constructor of a parent with one of its own, never instantiated before (helper-168: its
    # constructor was wrapped only at its class's first instance, so the callbacks never came)
    class Parent(mw.UW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)

    class Child(Parent):
        @classmethod
        def create(cls, *args, **kwargs):
            made = cls.__new__(cls)
            super(Child, made).__init__(*args, **kwargs)
            return made

    assert Child.create(model, optimizer, mw.DenseDistillLoss(3), callbacks=[hook]).callbacks == [hook]

    # a constructor decorated by a decorator object, raising after super().__init__, called by a factory on a
    # subclass: it was left unwrapped and the refused object took the running weighter's logger (helper-170)
    logger = mw.CSVLogger(tmp_path / "log.csv")
    running = mw.UW(model, optimizer, mw.DenseDistillLoss(3), callbacks=[logger])
    made = _ChildOfDecorated.__new__(_ChildOfDecorated)
    with pytest.raises(ValueError, match="rate should be"):
        _Decorated.__init__(made, model, optimizer, mw.DenseDistillLoss(3), rate=2.0, callbacks=[logger])
    running.step(batch())
    assert logger._metaweight_owner() is running and (tmp_path / "log.csv").exists()

    class Tuned(mw.UW):  # (a constructor that is a descriptor, not a function: helper-169)
        __init__ = functools.partialmethod(mw.UW.__init__, lr=0.05)

    tuned = Tuned(model, optimizer, mw.DenseDistillLoss(3), callbacks=[hook])
    assert tuned.callbacks == [hook] and tuned.lr == 0.05
    made = mw.UW.__new__(mw.UW)
    made.__init__(model, optimizer, mw.DenseDistillLoss(3), callbacks=[hook])
    made.step(batch())
    assert seen == [1]
    fast = mw.HarmonizedWeighter.__new__(mw.HarmonizedWeighter)
    fast.__init__(model, optimizer, mw.DenseDistillLoss(3), mode="fast", callbacks=[hook])
    x, y = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = fast.loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        record = fast.meta_step((x, y), batch())
    assert record.ran and seen == [1, 1]


@pytest.mark.parametrize("form", ["weighting " + name for name in sorted(mw.WEIGHTINGS)] +
                         ["learn=False", "exact jvp", "exact higher", "fast", "capturable"])
def test_a_step_refused_as_nonfinite_is_recorded_as_skipped_in_every_form(form):
    """``record.skipped`` says what ``num_skipped`` counts (helper-186, LOW: the loss weightings' and the fast mode's
    ``step()`` reported ``skipped=False`` for a model step refused as non-finite while ``num_skipped`` went to 1, the
    exact mode ``True``: a logger filtering on it counted refused steps as updates), in every one-call form."""
    from test_errors import STEP_FORMS
    options = dict(STEP_FORMS.get(form, {"mode": "fast", "capturable": True}))
    name = options.pop("weighting", None)
    torch.manual_seed(0)
    model = tiny_net(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=form == "capturable" or None)
    if name is not None:
        extra = {"dwa": {"window": 2}, "sdn": {"epochs": 3, "steps_per_epoch": 2},
                 "gradnorm": {"shared_parameters": list(model.stages[0].parameters())}}.get(name, {})
        w = mw.WEIGHTINGS[name](model, optimizer, mw.DenseDistillLoss(3), nonfinite="skip", **extra)
    else:
        w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), nonfinite="skip", **options)
    with quiet():
        assert not w.step(batch(), batch()).skipped
    with pytest.warns(RuntimeWarning, match="Skipped"):
        record = w.step(nan_batch(), batch())
    assert record.model_step_skipped and record.skipped and record.message, record
    assert w.num_skipped == 1
