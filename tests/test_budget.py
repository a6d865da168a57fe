"""Budgeted batch classification against a straightforward per-sample loop (MSDNet's procedure)."""

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
