"""Budgeted batch classification against a straightforward per-sample loop (MSDNet's procedure)."""

import warnings

import pytest
import torch

import metaweight as mw
from references.budget import loop_evaluate, loop_thresholds


def logits_with_ties(K=4, N=300, C=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(K, N, C, generator=g) * 2
    logits[:, ::7] = logits[:, 3:4]  # many samples with identical confidence
    logits[1, 10:40] = 0.0  # uniform predictions: confidence exactly 1/C, ties at the argmax too
    labels = torch.randint(0, C, (N,), generator=g)
    return logits, labels


@pytest.mark.parametrize("seed", [0, 1])
def test_thresholds_and_points_agree_exactly_with_the_loop(seed):
    val, val_labels = logits_with_ties(seed=seed)
    test, test_labels = logits_with_ties(seed=seed + 10, N=257)
    costs = [1.0, 2.5, 4.0, 7.0]
    curve = mw.budgeted_curve(val, val_labels, test, test_labels, costs)
    assert len(curve.points) == 39
    for point in curve.points:
        dist = mw.geometric_exit_distribution(point.q, 4)
        T = loop_thresholds(torch.softmax(val, -1), dist)
        assert point.thresholds == T.tolist()
        acc, cost, fractions = loop_evaluate(torch.softmax(test, -1), test_labels, T, costs)
        assert point.accuracy == pytest.approx(acc, abs=1e-12)
        assert point.cost == pytest.approx(cost, rel=1e-12)
        assert point.exit_fractions == pytest.approx(fractions, abs=1e-12)


def test_where_two_logits_round_to_tied_probabilities_only_the_prediction_differs_from_msdnets_loop():
    """MSDNet's code predicts with probs.max after a float32 softmax, metaweight with the logits'
    argmax: the docs said the two agree exactly, and with the top two logits of every row one ulp
    apart some rows' probabilities tie and are predicted differently. The thresholds, exit shares
    and costs are the loop's still, and the accuracy is the loop's with the logits' argmax."""
    torch.manual_seed(0)
    K, N, C = 2, 1000, 10
    val, test = torch.randn(K, N, C), torch.randn(K, N, C)
    top = test.argmax(-1, keepdim=True)
    other = (top + 1) % C
    test.scatter_(-1, other, torch.nextafter(test.gather(-1, top), torch.tensor(float("inf"))))
    val_labels = torch.randint(0, C, (N,))
    test_labels = torch.minimum(top, other).squeeze(-1)[-1]  # the first of the pair: what probs.max picks on a tie
    probs = torch.softmax(test, -1)
    assert bool((probs.argmax(-1) != test.argmax(-1)).any())  # some rows tie in float32
    costs = [1.0, 2.0]
    curve = mw.budgeted_curve(val, val_labels, test, test_labels, costs)
    differ = 0
    for point in curve.points:
        T = loop_thresholds(torch.softmax(val, -1), mw.geometric_exit_distribution(point.q, K))
        assert point.thresholds == T.tolist()
        acc, cost, fractions = loop_evaluate(probs, test_labels, T, costs)
        assert point.cost == pytest.approx(cost, rel=1e-12)
        assert point.exit_fractions == pytest.approx(fractions, abs=1e-12)
        by_logits, _, _ = loop_evaluate(probs, test_labels, T, costs, predictions=test.argmax(-1))
        assert point.accuracy == pytest.approx(by_logits, abs=1e-12)
        differ += abs(point.accuracy - acc) > 1e-9
    assert differ > 0


def test_exits_nobody_takes_and_extreme_distributions():
    val, labels = logits_with_ties()
    # q tiny: everything at exit 1 is wanted; q huge: nothing before the last exit
    for dist in (torch.tensor([1.0, 0, 0, 0]), torch.tensor([0.0, 0, 0, 1]), torch.tensor([0.0, 0.5, 0, 0.5])):
        T = mw.find_thresholds(val, dist)
        assert T.tolist() == loop_thresholds(torch.softmax(val, -1), dist).tolist()
        point = mw.evaluate_thresholds(val, labels, T, [1, 2, 3, 4])
        acc, cost, fractions = loop_evaluate(torch.softmax(val, -1), labels, T, [1, 2, 3, 4])
        assert (point.accuracy, point.cost) == (pytest.approx(acc), pytest.approx(cost))
    assert mw.find_thresholds(val, torch.tensor([0.0, 0, 0, 1]))[:3].tolist() == [1e8] * 3


def test_geometric_distribution_is_msdnets():
    d = mw.geometric_exit_distribution(0.5, 4)
    ref = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    assert torch.allclose(d, ref / ref.sum())


def test_threshold_for_a_budget_meets_it_on_validation_data():
    val, labels = logits_with_ties(N=400)
    costs = [1.0, 2.0, 3.0, 4.0]
    for budget in (1.5, 2.2, 3.0, 3.9):
        point = mw.thresholds_for_budget(val, labels, costs, budget)
        check = mw.evaluate_thresholds(val, labels, torch.tensor(point.thresholds), costs)
        assert check.cost <= budget + 1e-12 and check.cost > budget - 0.5
    with pytest.raises(ValueError, match="below the cost of the first exit"):
        mw.thresholds_for_budget(val, labels, costs, 0.5)


def test_curve_round_trips_through_json():
    val, labels = logits_with_ties(N=50)
    curve = mw.budgeted_curve(val, labels, val, labels, [1, 2, 3, 4], qs=(0.5, 1.0))
    import json
    again = mw.BudgetCurve.from_dict(json.loads(curve.to_json()))
    assert again.points == curve.points


@pytest.mark.parametrize("change, match", [
    ({"accuracy": "50.0"}, "accuracy of point 0 should be a percentage"),
    ({"accuracy": float("nan")}, "accuracy of point 0 should be a percentage"),
    ({"accuracy": 250.0}, "in percent, not fractions"),
    ({"cost": -1.0}, "cost of point 0 should be a finite number >= 0"),
    ({"cost": float("inf")}, "cost of point 0"),
    ({"q": "0.5"}, "q='0.5'"),
    ({"extra_key": 1}, "unknown \\['extra_key'\\]"),
    # one number per exit, as many as 'costs' (accepted before: 5 thresholds or 2 shares for 4 exits, helper-147)
    ({"thresholds": [0.5] * 5}, "thresholds=.*expected 4 numbers, one per exit"),
    ({"thresholds": None}, "thresholds=None: expected 4 numbers"),
    ({"exit_fractions": [0.5, 0.5]}, "exit_fractions=.*expected 4 shares in \\[0, 1\\]"),
    ({"exit_fractions": "abc"}, "exit_fractions='abc'"),
    ({"exit_fractions": [50.0, 30.0, 20.0, 0.0]}, "shares in \\[0, 1\\]"),
])
def test_curve_from_dict_refuses_what_to_dict_never_writes(change, match):
    """A hand-edited or damaged dict is refused with the point and the field named, never drawn
    (a str accuracy as a category, NaN as a gap, 250 % off the axis)."""
    val, labels = logits_with_ties(N=50)
    d = mw.budgeted_curve(val, labels, val, labels, [1, 2, 3, 4], qs=(0.5, 1.0)).to_dict()
    d["points"][0].update(change)
    with pytest.raises(ValueError, match=match):
        mw.BudgetCurve.from_dict(d)
    for bad, match in [([], "a dict with 'points'"), ({"points": []}, "lacks the key 'costs'"),
                       ({"points": "x", "costs": [1]}, "list of dicts"),
                       ({"points": [], "costs": [1, float("nan")]}, "'costs' should be finite")]:
        with pytest.raises(ValueError, match=match):
            mw.BudgetCurve.from_dict(bad)


@pytest.mark.parametrize("cost, accuracy, match", [
    (1e6, float("nan"), "accuracy of `curves\\['m'\\].points\\[0\\]`"), (1e6, 250.0, "percentage in \\[0, 100\\]"),
    (1e6, "50.0", "percentage"), (-1e6, 50.0, "cost of"), (float("inf"), 50.0, "finite number >= 0"),
])
def test_plot_budget_curves_refuses_points_out_of_range(tmp_path, cost, accuracy, match):
    """plot_budget_curves (and the command line, through its check function) refuses a point it
    would draw silently wrong; nothing is written."""
    pytest.importorskip("matplotlib")
    from metaweight._budget import BudgetPoint
    from metaweight._plots import _check_budget_curves
    point = BudgetPoint(q=0.5, thresholds=[0.5, 0.0], cost=cost, accuracy=accuracy, exit_fractions=[0.5, 0.5])
    curves = {"m": mw.BudgetCurve([point], [1.0, 2.0])}
    with pytest.raises(ValueError, match=match):
        mw.plot_budget_curves(curves, tmp_path / "b.png")
    with pytest.raises(ValueError, match=match):
        _check_budget_curves(curves, tmp_path / "b.png", scale=1e6, unit="M", title=None)
    assert not (tmp_path / "b.png").exists()


def test_every_label_check_names_the_classes_and_the_padding_fix():
    """evaluate_thresholds checks labels against C as the others do; a negative label (padding)
    gets the hint to pass ignore_index (where the function takes one) or to leave it out."""
    logits, labels = torch.randn(3, 8, 4), torch.randint(0, 4, (8,))
    net = mw.MultiExit([torch.nn.Identity()] * 3, [torch.nn.Identity()] * 3)
    too_high, padded = labels.clone(), labels.clone()
    too_high[0], padded[0] = 4, -1
    takes_labels = [
        lambda y: mw.evaluate_thresholds(logits, y, [0.5, 0.5, 0.0], [1.0, 2.0, 3.0]),
        lambda y: mw.budgeted_curve(logits, y, logits, y, [1.0, 2.0, 3.0]),
        lambda y: mw.anytime_accuracy_from_logits(logits, y),
        lambda y: mw.expected_calibration_error(logits, y),
    ]
    for run in takes_labels:
        with pytest.raises(ValueError, match=r"labels in \[0, 4\], but the logits have 4 classes.*\[0, 3\]"):
            run(too_high)
        with pytest.raises(ValueError, match=r"labels in \[-1, 3\].*If -1 marks padding, leave those positions out"):
            run(padded)
    for run in (lambda y: mw.collect_logits(net, [(logits[0], y)]), lambda y: mw.anytime_accuracy(net, [(logits[0], y)])):
        with pytest.raises(ValueError, match=r"If -1 marks padding, pass ignore_index=-1 \(it is -100 now\)"):
            run(padded)
        assert mw.collect_logits(net, [(logits[0], padded)], ignore_index=-1)[1].tolist() == \
            labels[1:].tolist()


def _exact_geometric(q, num_exits):
    """q**k / sum q**j in exact rationals, then as floats: the reference, free of overflow."""
    from fractions import Fraction

    powers = [Fraction(q) ** k for k in range(1, num_exits + 1)]
    total = sum(powers)
    return [float(p / total) for p in powers]


@pytest.mark.parametrize("q, num_exits", [(1000.0, 13), (1e30, 3), (50.0, 24), (1e-30, 3), (0.5, 4), (1.95, 40),
                                          (0.05, 30), (1.0, 7)])
def test_geometric_distribution_never_overflows(q, num_exits):
    d = mw.geometric_exit_distribution(q, num_exits)
    assert d.dtype == torch.float32 and torch.isfinite(d).all()
    expected = torch.tensor(_exact_geometric(q, num_exits), dtype=torch.float64)
    assert torch.allclose(d.double(), expected, rtol=1e-5, atol=1e-30)  # float32 exp(k log q): ~k ulp


@pytest.mark.parametrize("num_exits", [13, 16])
def test_budget_at_the_last_exit_with_many_exits(num_exits):
    """A budget of K with costs 1..K asks q=1000: its distribution used to be NaN and refused."""
    torch.manual_seed(0)
    logits, labels = torch.randn(num_exits, 200, 10) * 3, torch.randint(0, 10, (200,))
    result = mw.thresholds_for_budget(logits, labels, list(range(1, num_exits + 1)), float(num_exits))
    assert result.cost <= num_exits


@pytest.mark.parametrize("num_exits, n", [(2, 3000), (3, 2000)])
def test_a_budget_of_the_last_exit_sends_everyone_there(num_exits, n):
    """A budget of the whole network's cost spends all of it, as a per-sample loop counts: q = 1e3, the
    end of the bisection, still sent floor(N / 1e3) samples out early (cost 1.99905 of 2 at N = 20,000)."""
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(num_exits, n, 10, generator=g), torch.randint(0, 10, (n,), generator=g)
    costs = [float(k + 1) for k in range(num_exits)]
    for budget in (costs[-1], costs[-1] + 0.5):
        point = mw.thresholds_for_budget(logits, labels, costs, budget)
        scores = logits.softmax(-1).amax(-1)
        spent = correct = 0.0
        for i in range(n):  # the first exit whose confidence reaches its threshold, the last takes the rest
            k = next((k for k in range(num_exits - 1) if scores[k, i] >= point.thresholds[k]), num_exits - 1)
            spent += costs[k]
            correct += int(logits[k, i].argmax() == labels[i])
        assert point.val_cost == spent / n == costs[-1]
        assert point.val_accuracy == pytest.approx(100.0 * correct / n, rel=1e-12)
        assert point.val_accuracy == pytest.approx(100.0 * float((logits[-1].argmax(-1) == labels).double().mean()))


def test_find_thresholds_takes_half_precision_distributions():
    torch.manual_seed(0)
    logits = torch.randn(3, 100, 5)
    expected = mw.find_thresholds(logits, [1 / 3] * 3)
    for dtype in (torch.float16, torch.bfloat16):
        thirds = torch.full((3,), 1 / 3).to(dtype)
        assert abs(float(thirds.double().sum()) - 1) > 1e-4  # what the float32 tolerance refused
        assert torch.equal(mw.find_thresholds(logits, thirds), expected)  # floor(100 * 0.3333) either way
        assert mw.find_thresholds(logits, thirds / thirds.sum()).shape == (3,)
    with pytest.raises(ValueError, match="should sum to 1"):
        mw.find_thresholds(logits, torch.tensor([0.5, 0.5, 0.1]).half())  # a wrong sum is still refused


@pytest.mark.parametrize("device, error", [("nodev", ValueError), (3.5, TypeError)])
def test_geometric_distribution_refuses_a_bad_device(device, error):
    with pytest.raises(error, match="device"):
        mw.geometric_exit_distribution(0.5, 3, device=device)


@pytest.mark.parametrize("call, error, name", [
    (lambda z, y: mw.budgeted_curve(z, y, z, y, [1, 2, 3], qs=["a"]), TypeError, "qs"),
    (lambda z, y: mw.budgeted_curve(z, y, z, y, [1, 2, 3], qs=[None]), TypeError, "qs"),
    (lambda z, y: mw.budgeted_curve(z, y, z, y, [1, 2, 3], qs=[[0.5]]), TypeError, "qs"),
    (lambda z, y: mw.budgeted_curve(z, y, z, y, [1, 2, 3], qs=torch.ones(2, 2)), TypeError, "qs"),
    (lambda z, y: mw.budgeted_curve(z, y, z, y, [1, 2, 3], qs=[True]), TypeError, "qs"),
    (lambda z, y: mw.budgeted_curve(z, y, z, y, [1, 2, 3], qs=[]), ValueError, "qs"),
    (lambda z, y: mw.evaluate_thresholds(z, y, [0.5, 0.5, 0], [1, None, 3]), TypeError, "costs"),
    (lambda z, y: mw.budgeted_curve(z, y, z, y, [1, 2, 3], cost_unit=5), TypeError, "cost_unit"),
    (lambda z, y: mw.evaluate_thresholds(z, y, [0.5, 0.5, 0], torch.ones(3, 1)), TypeError, "costs"),
    (lambda z, y: mw.thresholds_for_budget(z, y, [1, "2", 3], 2.0), TypeError, "costs"),
    (lambda z, y: mw.thresholds_for_accuracy(z, y, 0.1, costs=[1, [2], 3]), TypeError, "costs"),
])
def test_bad_qs_and_costs_are_named(call, error, name):
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 8, 4), torch.randint(0, 4, (8,))
    with pytest.raises(error, match=f"`?{name}`?"):
        call(logits, labels)


def test_qs_and_costs_as_tensors_are_the_lists():
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 50, 4), torch.randint(0, 4, (50,))
    as_list = mw.budgeted_curve(logits, labels, logits, labels, [1, 2, 3], qs=[0.5, 1.5])
    as_tensor = mw.budgeted_curve(logits, labels, logits, labels, torch.tensor([1.0, 2, 3]),
                                  qs=torch.tensor([0.5, 1.5], dtype=torch.float64))
    assert [p.cost for p in as_list.points] == [p.cost for p in as_tensor.points]


@pytest.mark.parametrize("call", [
    lambda z, y: mw.find_thresholds(z, [0.3, 0.3, 0.4]),
    lambda z, y: mw.exit_assignment(z, [0.5, 0.5, 0.0]),
    lambda z, y: mw.evaluate_thresholds(z, y, [0.5, 0.5, 0.0], [1, 2, 3]),
    lambda z, y: mw.budgeted_curve(z, y, z, y, [1, 2, 3], qs=[0.5, 1.5]),
    lambda z, y: mw.thresholds_for_budget(z, y, [1, 2, 3], 2.0),
    lambda z, y: mw.thresholds_for_accuracy(z, y, 0.1),
    lambda z, y: mw.fit_temperatures(z, y),
    lambda z, y: mw.calibrate(z, y),
    lambda z, y: mw.calibrate(z, y, z, y),
    lambda z, y: mw.expected_calibration_error(z, y),
    lambda z, y: mw.anytime_accuracy_from_logits(z, y),
])
def test_logits_that_require_grad_give_plain_values_without_warnings(call):
    """Logits stacked outside torch.no_grad() carry autograd history: every evaluation, calibration
    included, reads their values only, with no graph built (fit_temperatures built one at each
    bisection step, and torch warned from inside it: 'Converting a tensor with requires_grad=True
    to a scalar'), and gives what it gives on the same logits without history."""
    import warnings

    torch.manual_seed(0)
    labels = torch.randint(0, 4, (20,))  # logits that predict the labels, not perfectly: temperatures fit
    logits = torch.randn(3, 20, 4) + 1.5 * torch.nn.functional.one_hot(labels, 4)
    expected = call(logits, labels)
    saved = []
    with warnings.catch_warnings(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                                             lambda t: t):
        warnings.simplefilter("error")  # "Converting a tensor with requires_grad=True to a scalar"
        got = call(logits.clone().requires_grad_(True), labels)
    assert saved == []  # no op kept a tensor for a backward: no graph was built
    tensors = [v for v in (got if isinstance(got, tuple) else (got,)) if isinstance(v, torch.Tensor)]
    assert all(t.grad_fn is None and not t.requires_grad for t in tensors)
    assert repr(got) == repr(expected)


def test_costs_take_an_exit_costs_and_refuse_decreasing_ones():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 50, 4), torch.randint(0, 4, (50,))
    net = mw.MultiExit([torch.nn.Linear(3, 8), torch.nn.Linear(8, 8)], [torch.nn.Linear(8, 4)] * 2)
    costs = mw.exit_costs(net, torch.randn(1, 3))
    thresholds = torch.tensor([0.5, 0.0])
    assert mw.evaluate_thresholds(logits, labels, thresholds, costs) == \
        mw.evaluate_thresholds(logits, labels, thresholds, [float(c) for c in costs.macs])
    with pytest.raises(ValueError, match=r"decrease.*cumulative"):
        mw.evaluate_thresholds(logits, labels, thresholds, [3.0, 2.0])


def loop_shares(scores, thresholds):
    """The share of samples leaving at each exit, sample by sample: the first exit whose score reaches
    its threshold, the last exit for everyone left."""
    K, N = scores.shape
    counts = [0] * K
    for n in range(N):
        for k in range(K):
            if k == K - 1 or float(scores[k, n]) >= float(thresholds[k]):
                counts[k] += 1
                break
    return [round(c / N, 4) for c in counts]


def saturated_logits(N=100, seed=0):
    """Half the samples with a logit gap of 200 at exit 1 (softmax exactly 1.0 in float32: tied)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, N, 5, generator=g)
    logits[0, : N // 2, 0] += 200.0
    return logits


@pytest.mark.parametrize("logits, rule, asked, cause", [
    (saturated_logits(), "max_probability", [0.1, 0.2, 0.7],
     r"tied max_probability scores at exit 1: 50 samples score exactly 1, the threshold, so 50 left where 10 were "
     r"asked.*temperatures"),
    (torch.randn(3, 200, 5, generator=torch.Generator().manual_seed(1)), "patience", [0.3, 0.3, 0.4],
     r"tied patience scores at exit 1: 200 samples score exactly 0, the threshold, so 200 left where 60 were "
     r"asked; exit 2: 60 asked to leave, 0 samples left to take.*patience scores are counts"),
], ids=["saturated_softmax", "patience"])
def test_find_thresholds_warns_when_ties_keep_it_from_the_shares_asked(logits, rule, asked, cause):
    """Tied scores sent [0.5, 0.2, 0.3] for [0.1, 0.2, 0.7] (a saturated softmax) and everyone to exit 1
    for [0.3, 0.3, 0.4] (patience), silently. Now a RuntimeWarning names the asked shares and the
    realised ones, which equal a per-sample loop's, and the tied exit."""
    with pytest.warns(RuntimeWarning, match=cause) as caught:
        thresholds = mw.find_thresholds(logits, asked, rule=rule)
    realised = loop_shares({"max_probability": mw.MaxProbability(), "patience": mw.Patience()}[rule].scores(logits),
                           thresholds)
    assert realised != asked
    message = str(caught[0].message)
    assert f"shares {asked} were asked" in message and f"the thresholds send {realised}" in message
    exits, _ = mw.exit_assignment(logits, thresholds, rule=rule)  # the realised shares are exit_assignment's
    assert (torch.bincount(exits, minlength=3) / logits.shape[1]).tolist() == pytest.approx(realised)


def test_find_thresholds_is_silent_when_the_shares_are_met():
    """Without ties the shares asked are met (the loop's), and nothing is said; one sample off (two
    samples tied at a threshold) is within what the sample count allows."""
    logits = torch.randn(3, 100, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        thresholds = mw.find_thresholds(logits, [0.1, 0.2, 0.7])
        assert loop_shares(mw.MaxProbability().scores(logits), thresholds) == [0.1, 0.2, 0.7]
        scores = mw.MaxProbability().scores(logits)
        order = scores[0].argsort(descending=True)
        logits[0, order[10]] = logits[0, order[9]]  # the 11th most confident ties the 10th: 11 leave, not 10
        thresholds = mw.find_thresholds(logits, [0.1, 0.2, 0.7])
        assert loop_shares(mw.MaxProbability().scores(logits), thresholds)[0] == 0.11


def _nan_at_the_last_exit():
    """K=2, N=5, C=3; sample 2 all NaN at both exits (a NaN input), label 0; threshold 2.0 at exit 1
    (above any probability): everyone goes on to exit 2, which takes all. By hand, exit 2's
    predictions of the other samples are 1, 2, 1, 0 for labels 1, 2, 0, 0: 3 of 4 right, 75%."""
    logits = torch.tensor([[[2.0, 1.0, 0.0]] * 5,
                           [[0.0, 3.0, 1.0], [0.0, 1.0, 4.0], [0.0, 0.0, 0.0], [1.0, 2.0, 0.0], [5.0, 1.0, 2.0]]])
    logits[:, 2] = float("nan")
    return logits, torch.tensor([1, 2, 0, 0, 0])


@pytest.mark.parametrize("call, name", [
    (lambda z, y: mw.exit_assignment(z, [2.0, 0.0]), "logits"),
    (lambda z, y: mw.evaluate_thresholds(z, y, [2.0, 0.0], [1.0, 2.0]), "logits"),
    (lambda z, y: mw.budgeted_curve(z[:, [0, 1, 3, 4]], y[[0, 1, 3, 4]], z, y, [1.0, 2.0], qs=(0.5, 1.0)),
     "test_logits"),
])
def test_a_sample_predicted_from_nan_logits_is_refused_not_scored_as_class_0(call, name):
    """The NaN sample reached the last exit (a NaN score never leaves) and was predicted class 0 there,
    a hit for its label 0: evaluate_thresholds read 80% (4 of 5) where 75% is right for the 4 real
    samples. Refused now as anytime accuracy refuses NaN, naming the input, the exit and the count."""
    logits, labels = _nan_at_the_last_exit()
    with pytest.raises(ValueError, match=rf"^`{name}` hold NaN logits \(exit 2: 3 NaN values, in 1 sample\(s\) "
                                         rf"predicted there\).*leave those samples out"):
        call(logits, labels)
    kept = [0, 1, 3, 4]  # the fix the message names
    point = mw.evaluate_thresholds(logits[:, kept], labels[kept], [2.0, 0.0], [1.0, 2.0])
    assert point.accuracy == 75.0 and point.exit_fractions == [0.0, 1.0]
    # NaN at an exit a sample goes on from is kept: a NaN score never passes a threshold, and the
    # prediction comes from the next exit's finite logits. By hand: sample 2's exit-2 logits [0, 0, 9]
    # (class 2, its label); threshold 0.5: samples 0, 1, 3, 4 leave at exit 1 (probability of
    # [2, 1, 0]: 0.665) predicting 0 (labels 1, 2, 0, 0: 2 right), sample 2 at exit 2, right: 60%.
    logits[1, 2], labels[2] = torch.tensor([0.0, 0.0, 9.0]), 2
    point = mw.evaluate_thresholds(logits, labels, [0.5, 0.0], [1.0, 2.0])
    assert point.accuracy == 60.0 and point.exit_fractions == [0.8, 0.2]
    exits, predictions = mw.exit_assignment(logits, [0.5, 0.0])
    assert exits.tolist() == [0, 0, 1, 0, 0] and predictions.tolist() == [0, 0, 2, 0, 0]


def patience_points(logits, labels, t, costs):
    """PABEE with patience t by a per-sample loop: leave at the first exit where t + 1 exits in a row
    (ending there) predict one class, else at the last. Returns (cost, accuracy %)."""
    K, N = logits.shape[0], logits.shape[1]
    predictions = logits.argmax(-1).tolist()
    cost = correct = 0
    for n in range(N):
        run = 0
        for k in range(K):
            run = run + 1 if k and predictions[k][n] == predictions[k - 1][n] else 0
            if run >= t or k == K - 1:
                cost += costs[k]
                correct += predictions[k][n] == int(labels[n])
                break
    return cost / N, 100.0 * correct / N


def test_patience_budget_warns_that_the_tied_first_exit_takes_everyone():
    """Patience scores at exit 1 are all 0, so MSDNet's threshold there is 0 for every q: all 39
    points were 'cost 1.0, everyone at exit 1' and thresholds_for_budget(budget=2.0) gave cost 1.0,
    silently. Now both warn, as find_thresholds does, naming the tie and PABEE's own points, which
    evaluate_thresholds gives (checked against a per-sample loop)."""
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(3, 200, 4, generator=g), torch.randint(0, 4, (200,), generator=g)
    logits[1:, :120] = logits[0, :120]  # 120 samples agree at every exit: patience grows for them
    costs = [1.0, 2.0, 3.0]
    with pytest.warns(RuntimeWarning, match=r"budgeted_curve could not realise MSDNet's distribution on `val_logits` "
                                            r"at 39 of the 39 values of q, because of tied scores: .*tied patience "
                                            r"scores at exit 1: 200 samples score exactly 0.*held-out costs over the "
                                            r"curve: \[1\.0\]\).*rule='patience'\) for t = 0..K-1"):
        curve = mw.budgeted_curve(logits, labels, logits, labels, costs, rule="patience")
    assert {p.cost for p in curve.points} == {1.0}  # what the warning says
    with pytest.warns(RuntimeWarning, match=r"thresholds_for_budget\(budget=2\) reached a cost of 1 .*tied patience "
                                            r"scores at exit 1"):
        assert mw.thresholds_for_budget(logits, labels, costs, 2.0, rule="patience").cost == 1.0
    for t in range(3):
        point = mw.evaluate_thresholds(logits, labels, [t] * 3, costs, rule="patience")
        assert (point.cost, point.accuracy) == pytest.approx(patience_points(logits, labels, t, costs))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # continuous scores without ties: no warning
        mw.budgeted_curve(logits, labels, logits, labels, costs, rule="entropy")
        mw.thresholds_for_budget(logits, labels, costs, 2.0, rule="entropy")


@pytest.mark.parametrize("rule", ["max_probability", "entropy"])
def test_thresholds_for_budget_reports_the_held_out_cost_and_accuracy_of_a_per_sample_loop(rule):
    val, labels = logits_with_ties(N=120)
    costs = [1.0, 2.0, 3.5, 5.0]
    for budget in (1.0, 1.7, 2.6, 4.2, 5.0):  # 1.0: everyone at the first exit
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the tie warning (the ties are the point here)
            point = mw.thresholds_for_budget(val, labels, costs, budget, rule=rule)
        spent, correct = 0.0, 0
        for i in range(val.shape[1]):  # one sample at a time, through exit_assignment
            exit_, prediction = mw.exit_assignment(val[:, i:i + 1], point.thresholds, rule=rule)
            spent += costs[int(exit_)]
            correct += int(prediction) == int(labels[i])
        assert point.val_cost == pytest.approx(spent / val.shape[1], rel=1e-12)
        assert point.val_accuracy == pytest.approx(100.0 * correct / val.shape[1], rel=1e-12)
        assert point.val_cost <= budget + 1e-12
        assert (point.cost, point.accuracy) == (point.val_cost, point.val_accuracy)
