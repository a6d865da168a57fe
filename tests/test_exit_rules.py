"""Exit rules (max probability, entropy, margin, patience): scores, threshold search, assignments and
real early exit, each against a per-sample loop (ties, NaN scores, exits nobody takes)."""

import math

import pytest
import torch

import metaweight as mw
from metaweight._exit_rules import as_rule
from conftest import tiny_net
from references.budget import loop_thresholds_from_scores
from references.exit_rules import loop_assign, score

RULES = ["max_probability", "entropy", "margin", "patience"]


def tricky_logits(K=4, N=120, C=5, seed=0, nan=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(K, N, C, generator=g) * 2
    logits[:, ::6] = logits[:, 1:2]  # identical samples: tied scores
    logits[:, 5::9] = logits[0, 5::9]  # the same prediction at every exit: patience grows
    if nan:
        logits[2, 7] = float("nan")  # a NaN score at one exit
    labels = torch.randint(0, C, (N,), generator=g)
    return logits, labels


@pytest.mark.parametrize("rule", RULES)
def test_scores_equal_the_per_sample_formula(rule):
    logits, _ = tricky_logits()
    scores = as_rule(rule).scores(logits)
    for k in range(4):
        for i in range(0, 120, 7):
            ref = score(rule, [logits[j, i].tolist() for j in range(4)], k)
            got = float(scores[k, i])
            assert (math.isnan(ref) and math.isnan(got)) or got == pytest.approx(ref, rel=1e-5, abs=1e-6)


def separating_thresholds(scores):
    """Thresholds between distinct scores (so float32 and float64 agree on every side), one exit
    nobody takes (+inf-like), the last -1e8."""
    K = scores.shape[0]
    out = []
    for k in range(K - 1):
        values = sorted(set(v for v in scores[k].tolist() if not math.isnan(v)))
        mid = len(values) // 2
        out.append((values[mid - 1] + values[mid]) / 2 if k != 1 else 1e8)  # exit 2: nobody
    return torch.tensor(out + [-1e8])


@pytest.mark.parametrize("rule", RULES)
def test_assignment_and_early_exit_equal_a_per_sample_loop(rule):
    logits, labels = tricky_logits()
    scores = as_rule(rule).scores(logits)
    thresholds = separating_thresholds(scores)
    exits, predictions = mw.exit_assignment(logits, thresholds, rule=rule)
    ref_exits, ref_predictions = loop_assign(rule, logits.tolist(), thresholds.tolist())
    assert exits.tolist() == ref_exits
    assert all(r is None or p == r for p, r in zip(predictions.tolist(), ref_predictions))
    assert 1 not in exits.tolist()  # the exit nobody takes
    point = mw.evaluate_thresholds(logits, labels, thresholds, [1, 2, 3, 4], rule=rule)
    assert point.exit_fractions == pytest.approx([ref_exits.count(k) / 120 for k in range(4)])


@pytest.mark.parametrize("rule", RULES)
def test_threshold_search_reaches_the_wanted_fractions_and_curve_runs(rule):
    logits, labels = tricky_logits(N=400, seed=1, nan=False)  # thresholds are not fitted on NaN (refused)
    dist = torch.tensor([0.4, 0.3, 0.2, 0.1])
    with pytest.raises(ValueError, match=r"exit 3: 5 NaN values, in 1 sample"):
        mw.find_thresholds(tricky_logits(N=400, seed=1)[0], dist, rule=rule)
    thresholds = mw.find_thresholds(logits, dist, rule=rule)
    scores = as_rule(rule).scores(logits)  # checked against the formula above
    assert thresholds.tolist() == loop_thresholds_from_scores(scores, dist).tolist()
    exits, _ = mw.exit_assignment(logits, thresholds, rule=rule)
    taken = torch.bincount(exits, minlength=4).tolist()
    ties = int((scores[0] == thresholds[0]).sum())  # samples sharing the threshold's score all leave
    assert 160 <= taken[0] <= 160 + max(ties - 1, 0)
    curve = mw.budgeted_curve(logits, labels, logits, labels, [1.0, 2.0, 3.0, 4.0], rule=rule)
    assert curve.extra["rule"] == rule and all(1.0 <= p.cost <= 4.0 for p in curve.points)


@pytest.mark.parametrize("rule", RULES)
def test_real_early_exit_with_each_rule_equals_the_full_forward(rule):
    torch.manual_seed(0)
    model = tiny_net(4).eval()
    x = torch.randn(60, 6) * 3
    with torch.no_grad():
        logits = torch.stack(model(x))
    scores = as_rule(rule).scores(logits)
    thresholds = separating_thresholds(scores)
    predictions, exits = mw.EarlyExit(model, thresholds, rule=rule)(x)
    expected_exits, expected = mw.exit_assignment(logits, thresholds, rule=rule)
    assert torch.equal(exits, expected_exits) and torch.equal(predictions, expected)


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="exit rule"):
        mw.find_thresholds(torch.randn(2, 5, 3), torch.tensor([0.5, 0.5]), rule="confidence")


def test_thresholds_no_score_reaches_are_warned_of_and_one_short_says_so():
    """Thresholds on another scale than the rule's scores (DeeBERT's positive entropy where minus the entropy is
    scored, a percentage for a probability) sent every sample to the last exit with no word, and K-1 thresholds
    were refused as 'Expected K' (helper-166). A threshold above every score of a built-in rule at an exit before
    the last is warned of, by EarlyExit and exit_assignment alike, unless it says so (inf, MSDNet's 1e8); the
    refusal of K-1 says the last exit's is not used."""
    import warnings

    net = mw.MultiExit([torch.nn.Linear(4, 4)] * 3, [torch.nn.Linear(4, 3)] * 3).eval()
    x = torch.randn(6, 4)
    with torch.no_grad():
        logits = torch.stack(net(x))
    for rule, thresholds in (("entropy", [0.3, 0.3, 0.0]), ("max_probability", [90.0, 0.5, 0.0]),
                             ("margin", [0.2, 1.5, 0.0])):
        for call in (lambda: mw.EarlyExit(net, thresholds, rule=rule), lambda: mw.exit_assignment(logits, thresholds,
                                                                                                    rule=rule)):
            with pytest.warns(RuntimeWarning, match=rf"above every score of the rule '{rule}'.*no sample leaves"):
                call()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for thresholds in ([float("inf"), 1e8, 5.0], [1.0, -0.5, 0.0]):  # (said so; reachable; the last's unused)
            mw.EarlyExit(net, thresholds)
            mw.exit_assignment(logits, thresholds)
        mw.EarlyExit(net, [-0.3, -0.3, 0.0], rule="entropy")
    with pytest.raises(ValueError, match=r"Expected 3 thresholds.*One for each exit but the last\?.*append any"):
        mw.EarlyExit(net, [0.5, 0.5])
    predictor = mw.EarlyExit(net, [0.5, 0.5, 0.0])  # (a state loaded with them: warned alike; helper-168)
    state = {**predictor.state_dict(), "thresholds": torch.tensor([90.0, 0.5, 0.0], dtype=torch.float64)}
    with pytest.warns(RuntimeWarning, match=r"EarlyExit.load_state_dict: the threshold \[90.0\] of exit \[1\]"):
        predictor.load_state_dict(state)
