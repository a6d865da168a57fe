"""Every public real-number option takes what NumPy arithmetic and torch give for a real (a NumPy
float scalar, a 0-d array, a 0-d tensor) as it takes a Python float, through the one rule
(``real_scalar`` / ``real_option``), and stores it as that float; bools, strings and values the
option forbids are refused, with the option named and the message the plain float gets, before
anything changes (as ``test_integer_options.py`` does for integers)."""

import copy
import math
import re

import numpy as np
import pytest
import torch

import metaweight as mw
from metaweight._plots import _check_budget_curves

torch.manual_seed(0)
NET = mw.MultiExit([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)], [torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)])
OPT = torch.optim.SGD(NET.parameters(), lr=0.1, momentum=0.9)


def _weighter(cls, **options):
    return cls(NET, OPT, mw.DenseDistillLoss(2), **options)


LABELS = torch.arange(64) % 4
LOGITS = torch.randn(3, 64, 4, generator=torch.Generator().manual_seed(0)) + 2 * torch.nn.functional.one_hot(LABELS, 4)
CURVE = mw.BudgetCurve([mw.BudgetPoint(0.5, [0.5, 0.5, 0.0], 2.0, 50.0, [0.5, 0.25, 0.25])], [1.0, 2.0, 3.0])

# (option, a call building with its value -> the stored value as a float, a good value, a bad value).
# Good values are exact in float32, so np.float32(good) holds the same number.
OPTIONS = [
    ("alpha", lambda v: mw.BalancedValidation(2, alpha=v).alpha, 0.25, 1.5),
    ("momentum", lambda v: mw.BalancedValidation(2, momentum=v).momentum, 0.75, 1.0),
    ("max_norm", lambda v: mw.ClipGradNorm(v).max_norm, 1.5, 0.0),
    ("norm_type", lambda v: mw.ClipGradNorm(1.0, norm_type=v).norm_type, 3.0, 0.5),
    ("temperature", lambda v: mw.DenseDistillLoss(2, temperature=v).temperature, 2.5, -1.0),
    ("label_smoothing", lambda v: mw.DenseDistillLoss(2, label_smoothing=v).label_smoothing, 0.125, 1.0),
    ("temperature", lambda v: mw.preset("hdkd", 2, temperature=v).criterion.temperature, 2.5, math.inf),
    ("temperature", lambda v: _weighter(mw.DWA, window=2, temperature=v).temperature, 2.5, 0.0),
    ("lr", lambda v: _weighter(mw.FAMO, lr=v).lr, 0.03125, -0.5),
    ("weight_decay", lambda v: _weighter(mw.FAMO, weight_decay=v).weight_decay, 0.0625, math.nan),
    ("alpha", lambda v: _weighter(mw.GradNorm, shared_parameters=NET.stages[0].parameters(), alpha=v).alpha,
     1.5, -1.0),
    ("lr", lambda v: _weighter(mw.GradNorm, shared_parameters=NET.stages[0].parameters(), lr=v).lr, 0.03125,
     math.inf),
    ("lr", lambda v: _weighter(mw.UW, lr=v).lr, 0.03125, -1.0),
    ("betas", lambda v: _weighter(mw.UW, betas=(v, 0.5)).betas[0], 0.75, 1.0),
    ("max_weights", lambda v: _weighter(mw.SDNSchedule, epochs=2, steps_per_epoch=3,
                                        max_weights={"kd[2->1]": v}).max_weights["kd[2->1]"], 0.5, 0.0),
    ("gamma_lr", lambda v: _weighter(mw.HarmonizedWeighter, gamma_lr=v).gamma_lr, 0.03125, -1.0),
    ("fd_epsilon", lambda v: _weighter(mw.HarmonizedWeighter, backend="finite_difference",
                                       fd_epsilon=v).fd_epsilon, 0.0009765625, 0.0),
    ("clip_grad_norm", lambda v: _weighter(mw.HarmonizedWeighter, mode="fast",
                                           clip_grad_norm=v).clip_grad_norm.max_norm,
     1.5, -1.0),
    ("q", lambda v: mw.geometric_exit_distribution(v, 3).tolist(), 0.5, 0.0),
    ("budget", lambda v: mw.thresholds_for_budget(LOGITS, LABELS, [1, 2, 3], v, iterations=5).cost, 2.0, math.nan),
    ("delta", lambda v: mw.thresholds_for_accuracy(LOGITS, LABELS, v, candidates=10).delta, 0.25, 1.0),
    ("confidence", lambda v: mw.thresholds_for_accuracy(LOGITS, LABELS, 0.25, confidence=v,
                                                        candidates=10).confidence, 0.75, 0.0),
    ("scale", lambda v: _check_budget_curves({"a": CURVE}, "x.png", scale=v, unit="M", title=None)[1], 1024.0, 0.0),
]
IDS = [f"{o[0]}-{i}" for i, o in enumerate(OPTIONS)]


def _forms(x):
    return [np.float32(x), np.float64(x), np.array(x), torch.tensor(x), torch.tensor(x, dtype=torch.float64)]


def _floats(value):
    return [_floats(v) for v in value] if isinstance(value, list) else value


@pytest.mark.parametrize("name, call, good, bad", OPTIONS, ids=IDS)
def test_real_options_take_numpy_and_tensor_reals(name, call, good, bad):
    plain = call(good)
    for value in _forms(good):
        stored = call(value)
        assert stored == plain, (name, value)
        assert type(stored) is type(plain), (name, value, type(stored))
    if isinstance(plain, float) and name != "budget":  # (the budget's result is the cost reached)
        assert plain == good


def _state():
    return copy.deepcopy((NET.state_dict(), OPT.state_dict()))


def _message(call, value):
    with pytest.raises((ValueError, TypeError)) as info:
        call(value)
    return type(info.value), str(info.value)


@pytest.mark.parametrize("name, call, good, bad", OPTIONS, ids=IDS)
def test_real_options_refuse_bad_values_alike(name, call, good, bad):
    before = _state()
    kind, message = _message(call, bad)
    assert name in message
    for value in _forms(bad):
        # the same refusal, the value shown as it came
        assert _message(call, value) == (kind, message.replace(repr(bad), repr(value), 1)), (name, value)
    for value in (True, np.bool_(False), str(good), torch.tensor([good, good]), torch.tensor(1 + 0.5j),
                  # past float's range, sparse, and a number with a dimension (tensor and array alike)
                  10**400, -10**400, torch.tensor(good).to_sparse(), torch.tensor([good]).to_sparse(),
                  torch.tensor([good]), np.array([good])):
        with pytest.raises((ValueError, TypeError), match=name):
            call(value)
    after = _state()
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def _float32_loses(x):
    """An independent reading of float32 (NumPy's): a non-zero number it stores as 0, a finite one as inf."""
    with np.errstate(over="ignore", under="ignore"):
        stored = np.float32(x)
    return (x != 0 and stored == 0) or (math.isfinite(x) and math.isinf(stored))


# options computed with in float32, by name: the values to try beyond float32 (as the option, or as
# 1/T and T² for a temperature), each of which the option's own range allows.
LOST = {"alpha": (1e-50,), "momentum": (1e-50,), "max_norm": (1e-50, 1e39), "clip_grad_norm": (1e-50, 1e39), "norm_type": (1e39,),
        "label_smoothing": (1e-50,), "lr": (1e-50, 1e39), "weight_decay": (1e-50, 1e39),
        "gamma_lr": (1e-50, 1e39), "fd_epsilon": (1e-50, 1e39), "temperature": (1e-50, 1e-45, 1e-40, 1e39, 1e300),
        "betas": (1e-50,)}  # (UW's betas scale its float32 Adam moments)


@pytest.mark.parametrize("name, call, good, bad", [o for o in OPTIONS if o[0] in LOST],
                         ids=[i for i, o in zip(IDS, OPTIONS) if o[0] in LOST])
def test_real_options_refuse_values_float32_turns_to_0_or_inf(name, call, good, bad):
    """``DenseDistillLoss(2, temperature=1e-50)`` was accepted and every KD term was NaN, blamed
    later on the data and the learning rates; an option used in float32 arithmetic now refuses,
    up front, a value that float32 turns into 0 or inf (as ``init`` does), saying what float32
    holds. A temperature divides logits and scales KD by T² (DWA divides by T), so T = 1e-40,
    which float32 holds, is refused there too: 1/T is beyond it."""
    before = _state()
    for value in LOST[name]:
        with pytest.raises(ValueError, match=rf"Invalid {name}(\[0\])?: {re.escape(repr(value))}\..*"
                                             r"float32 holds non-zero magnitudes "
                                             r"from 1\.4e-45 to 3\.4e\+38"):
            call(value)
    assert _float32_loses(1e-50) and _float32_loses(1e39) and not _float32_loses(1e-40)
    assert _float32_loses(1 / 1e-40) and _float32_loses(1e-45 ** -1)
    call(0.5 if name in ("alpha", "momentum", "label_smoothing", "betas") else 2.0)  # in range: taken
    torch.testing.assert_close(_state(), before, rtol=0, atol=0)


@pytest.mark.parametrize("temperatures", [[1e-50, 1.0], [1e-40, 1.0], [1.0, 1e39], [1.0, 1e300]])
def test_exit_temperatures_refuse_values_float32_turns_to_0_or_inf(temperatures):
    """``EarlyExit(net, thr, temperatures=[1e-50, 1.0])`` was accepted, then every forward blamed
    the model's logits: the logits are divided by T in float32, so T (and 1/T) must be numbers
    float32 holds; the exit with the bad temperature is named."""
    k = next(i for i, t in enumerate(temperatures) if t != 1.0)
    with pytest.raises(ValueError, match=rf"Invalid temperatures\[{k}\]: .*float32 holds non-zero magnitudes"):
        mw.EarlyExit(NET, [0.5, 0.0], temperatures=temperatures)
    assert mw.EarlyExit(NET, [0.5, 0.0], temperatures=[1e-30, 1e30]).temperatures == [1e-30, 1e30]


# options used only in Python (float64) arithmetic, never in float32: the float32 rule does not apply,
# and a value float32 cannot hold is taken (q: float32 only where every q**k is a normal float32,
# log space in float64 beyond; budget: compared with the costs; delta, confidence: binomial p-values;
# scale: divides NumPy float64 costs)
FLOAT64 = {"q": (1e-50, 1e39), "budget": (1e39,), "delta": (1e-50,), "confidence": (1e-50,), "scale": (1e-50, 1e39)}


@pytest.mark.parametrize("name, call, good, bad", [o for o in OPTIONS if o[0] in FLOAT64],
                         ids=[i for i, o in zip(IDS, OPTIONS) if o[0] in FLOAT64])
def test_options_used_in_float64_take_values_float32_cannot_hold(name, call, good, bad):
    for value in FLOAT64[name]:
        assert _float32_loses(value)
        call(value)
    assert mw.geometric_exit_distribution(1e-50, 3).tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("name, call", [
    ("costs", lambda v: mw.evaluate_thresholds(LOGITS, LABELS, [0.5, 0.5, 0.0], v)),
    ("costs", lambda v: mw.thresholds_for_budget(LOGITS, LABELS, v, 2.0, iterations=3)),
    ("qs", lambda v: mw.budgeted_curve(LOGITS, LABELS, LOGITS, LABELS, [1, 2, 3], qs=v)),
    ("distribution", lambda v: mw.find_thresholds(LOGITS, v)),
    ("thresholds", lambda v: mw.exit_assignment(LOGITS, v)),
    ("thresholds", lambda v: mw.evaluate_thresholds(LOGITS, LABELS, v, [1, 2, 3]))])
def test_lists_of_numbers_are_read_by_the_one_reader(name, call):
    """``costs`` and ``qs`` had a reader of their own beside ``real_numbers``, the one reading of a list
    of numbers: they now take what every other list option takes (a dict's ``.values()`` too, which
    they refused), and refuse what it refuses, naming the option and the item that is not a number.
    So do ``distribution`` and ``thresholds`` (``real_tensor`` read only a Sequence: a dict's
    ``.values()`` was refused, and a 2-d array got past it to a shape error)."""
    good = {"costs": [1.0, 2.0, 3.0], "qs": [0.5, 1.0, 2.0], "distribution": [0.25, 0.25, 0.5],
            "thresholds": [0.5, 0.5, 0.0]}[name]
    expected = call(good)
    for same in (tuple(good), np.array(good), torch.tensor(good), [np.float32(v) for v in good],
                 [torch.tensor(v) for v in good], dict(zip("abc", good)).values()):
        assert repr(call(same)) == repr(expected), same
    for bad, item in (([good[0], "2", good[2]], "'2'"), ([good[0], True, good[2]], "True"),
                      ([good[0], [2.0], good[2]], r"\[2.0\]"), ([good[0], torch.tensor([2.0]), good[2]], r"tensor\(\[2\.\]\)")):
        with pytest.raises(TypeError, match=rf"`{name}` should be .*Found {item} in \["):
            call(bad)
    for bad, found in (("1,2,3", "`str`"), (torch.ones(3, 1), r"a torch.float32 torch.strided tensor of shape \(3, 1\)"),
                       (np.ones((3, 1)), r"a NumPy array of float64 of shape \(3, 1\)"), ({1, 2, 3}, "`set`")):
        with pytest.raises(TypeError, match=rf"`{name}` should be .*Found {found}\."):
            call(bad)


def test_a_checkpoints_gamma_sum_is_read_as_every_number_is():
    """``load_state_dict`` read ``gamma_sum`` with an ``isinstance(..., (int, float))`` of its own, which took
    ``True`` for 1 and refused a NumPy or 0-d tensor number; it is read by ``real_scalar`` now."""
    weighter = _weighter(mw.HarmonizedWeighter)
    state = weighter.state_dict()
    for value in (True, "1.0", math.nan, -1.0):
        with pytest.raises(ValueError, match="gamma_sum"):
            weighter.load_state_dict({**state, "gamma_sum": value})
    for value in (np.float64(state["gamma_sum"]), torch.tensor(state["gamma_sum"])):
        weighter.load_state_dict({**state, "gamma_sum": value})
