"""Accuracy-targeted thresholds: the binomial p-value against a direct sum, the guarantee on synthetic
data where the truth is known, over many draws."""

import math
import warnings

import pytest
import torch

import metaweight as mw
from metaweight._risk import binomial_cdf


def test_binomial_cdf_equals_the_direct_sum():
    for n, p, k in ((10, 0.3, 3), (50, 0.02, 0), (200, 0.1, 25), (7, 0.5, 7)):
        direct = sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k + 1))
        assert binomial_cdf(k, n, p) == pytest.approx(direct, rel=1e-10)


def draw(n, g):
    """A known world: 4 classes, 3 exits whose signal grows with depth, noise the same at each."""
    y = torch.randint(0, 4, (n,), generator=g)
    signal = torch.tensor([0.8, 1.6, 3.0]).view(3, 1, 1)
    logits = signal * torch.nn.functional.one_hot(y, 4).float() + torch.randn(3, n, 4, generator=g)
    return logits, y


def true_risk(thresholds, g, n=100_000):
    """The expected loss 1[last right, early exit wrong] under the world above, by a large fresh sample."""
    logits, y = draw(n, g)
    exits, pred = mw.exit_assignment(logits, torch.tensor(thresholds))
    last_right = logits[-1].argmax(1) == y
    return float((last_right & (pred != y)).double().mean())


@pytest.mark.slow  # a training run or end-to-end job: python -m pytest -m slow
def test_the_guarantee_holds_over_many_draws():
    delta, confidence, draws = 0.02, 0.9, 60
    g = torch.Generator().manual_seed(0)
    truth = torch.Generator().manual_seed(1)
    violations, early = 0, []
    for _ in range(draws):
        val, labels = draw(600, g)
        target = mw.thresholds_for_accuracy(val, labels, delta, confidence=confidence, candidates=40)
        violations += true_risk(target.thresholds, truth) > delta
        early.append(1 - target.exit_fractions[-1])
    alpha = 1 - confidence
    assert violations / draws <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / draws)
    assert sum(early) / draws > 0.05  # not vacuous: samples do leave early (about 15% here)


def test_a_tiny_held_out_split_keeps_everyone_to_the_last_exit():
    g = torch.Generator().manual_seed(0)
    val, labels = draw(20, g)  # 20 samples cannot certify a drop below 1% at 90%: nobody leaves early
    target = mw.thresholds_for_accuracy(val, labels, 0.01, confidence=0.9)
    assert target.exit_fractions[-1] == 1.0 and target.loss_rate == 0.0


def test_bad_arguments_are_refused():
    val, labels = draw(50, torch.Generator().manual_seed(0))
    for kwargs in ({"delta": 0.0}, {"delta": 1.5}, {"delta": 0.1, "confidence": 1.0}, {"delta": 0.1, "candidates": 0}):
        with pytest.raises(ValueError):
            mw.thresholds_for_accuracy(val, labels, **kwargs)


def test_quantiles_are_torchs_and_scale_past_its_limit():
    from metaweight._risk import _quantiles

    torch.manual_seed(0)
    q = torch.linspace(1, 0, 201, dtype=torch.float64)[1:]
    for n in (1, 2, 7, 1001):
        for values in (torch.randn(n, dtype=torch.float64), torch.randint(0, 3, (n,)).double()):  # ties too
            assert torch.equal(_quantiles(values, q), torch.quantile(values, q))
    big = torch.arange(2 ** 24 + 8, dtype=torch.float64).flip(0)  # torch.quantile refuses this many
    with pytest.raises(RuntimeError, match="too large"):
        torch.quantile(big, q)
    assert torch.equal(_quantiles(big, q), q * (big.numel() - 1))  # the sorted values are 0..n-1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_thresholds_are_in_the_scores_dtype_as_find_thresholds_gives_them(dtype):
    """float64 logits give float64 thresholds (not rounded to float32), as find_thresholds does; and
    the thresholds reproduce the reported exit fractions."""
    val, labels = draw(600, torch.Generator().manual_seed(0))
    val = val.to(dtype)
    target = mw.thresholds_for_accuracy(val, labels, 0.05, confidence=0.9, candidates=40)
    assert mw.find_thresholds(val, [0.5, 0.25, 0.25]).dtype == dtype
    early = target.thresholds[:-1]
    assert early[0] < 1e8  # some samples leave early: the thresholds are quantiles of the scores
    assert torch.tensor(early, dtype=dtype).tolist() == early  # values of the scores' dtype
    rounded = torch.tensor(early, dtype=torch.float32).tolist()
    assert (rounded == early) == (dtype == torch.float32)  # float64 ones are not float32's
    first, _ = mw.exit_assignment(val, torch.tensor(target.thresholds, dtype=dtype))
    assert (torch.bincount(first, minlength=3).double() / 600).tolist() == target.exit_fractions


@pytest.mark.parametrize("rule", ["max_probability", "entropy", "margin"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_losses_of_every_level_at_once_are_those_of_assigning_each_level(rule, dtype):
    """losses_at_levels (running maxima, sorted and searched once) against the assignment level by level
    (_assign, as EarlyExit decides), on scores with ties (rounded logits) and masked classes; and the
    thresholds chosen are those of the fixed-sequence test run level by level with the direct p-value."""
    from metaweight._budget import NO_EXIT, _assign, _confidence
    from metaweight._risk import losses_at_levels

    g = torch.Generator().manual_seed(3)
    logits, labels = draw(2000, g)
    logits = (logits * 2).round().to(dtype) / 2  # ties between samples and exits
    logits[:2, :100, 3] = -torch.inf  # a class masked at the first two exits for some samples
    scores, prediction = _confidence(logits, "val_logits", rule, fit="test")
    finite = scores[:-1][~torch.isnan(scores[:-1])].double()
    levels = torch.cat([torch.quantile(finite, torch.linspace(0, 1, 57, dtype=torch.float64)), finite[:20],
                        torch.tensor([NO_EXIT, -NO_EXIT, math.inf, -math.inf], dtype=torch.float64)])
    last_right = prediction[-1] == labels
    one_by_one = []
    for level in levels.tolist():
        thresholds = torch.full((3,), level, dtype=scores.dtype)
        thresholds[-1] = -NO_EXIT
        _, pred = _assign(scores, prediction, thresholds)
        one_by_one.append(int((last_right & (pred != labels)).sum()))
    assert losses_at_levels(scores, prediction, labels, levels.to(scores.dtype)).tolist() == one_by_one

    delta, alpha = 0.05, 0.1
    target = mw.thresholds_for_accuracy(logits, labels, delta, confidence=1 - alpha, rule=rule, candidates=60)
    q = torch.linspace(1, 0, 61, dtype=torch.float64)[1:]
    grid = sorted(set(torch.quantile(finite, q).tolist()), reverse=True)
    chosen = NO_EXIT
    for level in grid:  # the fixed-sequence test, level by level, with the direct binomial sum
        thresholds = torch.full((3,), level, dtype=scores.dtype)
        thresholds[-1] = -NO_EXIT
        _, pred = _assign(scores, prediction, thresholds)
        losses = int((last_right & (pred != labels)).sum())
        n = labels.numel()
        if sum(math.comb(n, j) * delta**j * (1 - delta) ** (n - j) for j in range(losses + 1)) > alpha:
            break
        chosen = level
    assert target.thresholds[0] == torch.tensor(chosen, dtype=scores.dtype).item()


def test_losses_at_levels_treat_nan_and_infinite_scores_as_the_assignment_does():
    """A NaN score reaches no level (not even -inf), a +inf score reaches +inf: as _assign decides
    (helper-113: nan_to_num also turned +inf into the largest float, and NaN into a -inf that reaches -inf)."""
    import math

    from metaweight._budget import _assign
    from metaweight._risk import losses_at_levels

    scores = torch.tensor([[math.nan, math.inf, -math.inf], [0.5, 0.5, 0.5]])
    prediction = torch.tensor([[1, 1, 0], [0, 0, 0]])
    labels = torch.zeros(3, dtype=torch.long)
    levels = torch.tensor([math.inf, 0.5, -math.inf])
    expected = []
    for level in levels.tolist():
        _, pred = _assign(scores, prediction, torch.tensor([level, -1e8]))
        expected.append(int(((prediction[-1] == labels) & (pred != labels)).sum()))
    assert losses_at_levels(scores, prediction, labels, levels).tolist() == expected


class _SureOrNot(mw.ExitRule):
    """A rule of one's own that scores some samples -inf (never leave) and others +inf (always leave)."""

    def scores(self, logits):
        p = torch.softmax(logits.float(), -1).amax(-1)
        return torch.where(p < 0.3, -math.inf, torch.where(p > 0.9, math.inf, p))


def test_infinite_scores_give_a_grid_without_nan_and_the_same_thresholds_each_run():
    """The candidate levels are quantiles of the scores: between two -inf scores linear interpolation gave NaN, and
    a set holding NaN sorted differently run to run, so the thresholds were NaN in one run and numbers in another
    (helper-109's report). The grid holds no NaN, the choice is the one of testing each level in order with its
    own assignment (the reference below), and two calls agree."""
    from metaweight._budget import _assign
    from metaweight._risk import _quantiles

    assert not _quantiles(torch.tensor([-math.inf, -math.inf, 0.5, math.inf, math.inf]),
                          torch.linspace(0, 1, 9, dtype=torch.float64)).isnan().any()
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 400, 5) * 2, torch.randint(0, 5, (400,))
    logits[:, :, 0] += 1.5
    a = mw.thresholds_for_accuracy(logits, labels, 0.2, rule=_SureOrNot(), candidates=30)
    b = mw.thresholds_for_accuracy(logits, labels, 0.2, rule=_SureOrNot(), candidates=30)
    assert not torch.as_tensor(a.thresholds).isnan().any()
    assert torch.equal(torch.as_tensor(a.thresholds), torch.as_tensor(b.thresholds))
    scores, prediction = _SureOrNot().scores(logits), logits.argmax(-1)
    losses = int(((prediction[-1] == labels) & (_assign(scores, prediction, torch.as_tensor(a.thresholds))[1]
                                                != labels)).sum())
    assert losses / 400 == pytest.approx(a.loss_rate) and binomial_cdf(losses, 400, 0.2) <= 0.1


class _AlwaysSure(mw.ExitRule):
    """A rule of one's own that scores its confident samples +inf: they leave at any threshold."""

    def scores(self, logits):
        p = torch.softmax(logits.float(), -1).amax(-1)
        return torch.where(p > 0.9, math.inf, p)


def test_scores_no_threshold_keeps_are_said_when_the_guarantee_cannot_hold():
    """An exit confidently wrong on every held-out sample, scored +inf: even the most conservative thresholds
    (1e8, 'nobody leaves early') let everyone leave, and the thresholds came back with a loss rate of 1 and a
    p-value of 1 without a word (helper-112). They come back with a warning saying why; an ordinary rule's
    fallback (a held-out split too small: everyone to the last exit) stays silent."""
    labels = torch.zeros(50, dtype=torch.long)
    logits = torch.zeros(2, 50, 3)
    logits[0, :, 1] = 10.0  # exit 1: sure, and wrong
    logits[1, :, 0] = 10.0  # the last exit: right
    with pytest.warns(UserWarning, match=r"no candidate meets the guarantee.*100 % of the held-out samples leave"):
        target = mw.thresholds_for_accuracy(logits, labels, 0.05, rule=_AlwaysSure())
    assert target.loss_rate == 1.0 and target.exit_fractions[0] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = mw.thresholds_for_accuracy(logits, labels, 0.05)
    assert small.exit_fractions == [0.0, 1.0]


def test_levels_fixed_in_advance_are_tested_in_that_order_and_anything_else_is_refused():
    """The quantile grid is drawn from the held-out scores themselves, an order the Learn-then-Test theorem does
    not cover (helper-157); levels chosen before the data are taken as given, highest first, and the thresholds
    are those of the fixed-sequence test run over them level by level with the direct binomial sum."""
    from metaweight._budget import NO_EXIT

    g = torch.Generator().manual_seed(4)
    logits, labels = draw(800, g)
    levels = torch.linspace(0, 1, 41)  # (in any order: tested from the highest down)
    delta, alpha = 0.05, 0.1
    target = mw.thresholds_for_accuracy(logits, labels, delta, confidence=1 - alpha, candidates=levels)
    probabilities = logits.softmax(-1)
    confidence, prediction = probabilities.max(-1)
    last_right = prediction[-1] == labels
    n, chosen = labels.numel(), NO_EXIT
    for level in sorted(levels.tolist(), reverse=True):
        leaves = confidence[:-1] >= torch.tensor(level, dtype=confidence.dtype)  # [K-1, N]
        first = torch.where(leaves.any(0), leaves.int().argmax(0), torch.tensor(2))
        predicted = prediction.gather(0, first.view(1, -1))[0]
        losses = int((last_right & (predicted != labels)).sum())
        if sum(math.comb(n, j) * delta**j * (1 - delta) ** (n - j) for j in range(losses + 1)) > alpha:
            break
        chosen = level
    assert target.thresholds[0] == pytest.approx(chosen) and 0 < target.exit_fractions[-1] < 1
    for bad in ([], [0.5, float("nan")], torch.ones(2, 2), "0.5", torch.tensor([True])):
        with pytest.raises(ValueError, match="Invalid candidates"):
            mw.thresholds_for_accuracy(logits, labels, delta, candidates=bad)
