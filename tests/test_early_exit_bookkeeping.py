"""EarlyExit's per-exit bookkeeping, trimmed for launch-bound devices, against its references: the
threshold comparison (reaches, by type promotion) on adversarial values, the rows without a softmax
read from the NaN scores of the built-in rules, the predictions written once at the end; and the
launch-equivalent ops of the bookkeeping, counted."""

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import metaweight as mw
from metaweight._early_exit import _undefined_scores_nan
from metaweight._exit_rules import RULES, as_rule, reaches
from test_early_exit import _Lookup, _lookup_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import overhead  # noqa: E402

INF = math.inf


def f32(v):
    return torch.tensor(v, dtype=torch.float32)


def up(v, steps=1):
    """The float32 ``steps`` ulps above float32 ``v`` (below for negative ``steps``)."""
    t = f32(v)
    for _ in range(abs(steps)):
        t = torch.nextafter(t, f32(INF if steps > 0 else -INF))
    return float(t)


def adversarial_thresholds():
    """float64 thresholds: on float32 values, one ulp around them, between two float32 neighbours (no
    float32 equals those), 0, 1, infinities, beyond float32's largest, subnormals of both widths."""
    largest, tiny = float(torch.finfo(torch.float32).max), float(torch.finfo(torch.float32).tiny)
    values = [0.0, -0.0, 1.0, -1.0, INF, -INF, 1e39, -1e39, 1e-50, -1e-50, 5e-324, largest, tiny, 1e-45, 0.2013]
    for v in (0.2013, 0.5, 1.0, 1e-40, float(torch.finfo(torch.float32).max), 3.0):
        for s in (-1, 0, 1):
            w = up(v, s)
            values += [w, (w + up(w, 1)) / 2, (w + up(w, -1)) / 2]
    return torch.tensor(values, dtype=torch.float64)


def adversarial_scores(thresholds):
    """float32 scores at, and one and two ulps around, every threshold's float32 rounding, and NaN."""
    near = [up(float(f32(t)), s) for t in thresholds.tolist() for s in (-2, -1, 0, 1, 2)]
    return torch.tensor(near + [math.nan, INF, -INF, 0.0, 1e-45], dtype=torch.float32)


def test_reaches_compares_in_float64_by_promotion_on_adversarial_values():
    thresholds = adversarial_thresholds()
    scores = adversarial_scores(thresholds)
    expected = scores.double()[None, :] >= thresholds[:, None]
    # one threshold at a time (0-d, as EarlyExit passes thresholds[k]), a column of them, and 0-d scores
    for k, t in enumerate(thresholds):
        got = reaches(scores, t)
        assert got.dtype == torch.bool and got.shape == scores.shape
        assert torch.equal(got, expected[k])
    assert torch.equal(reaches(scores[None, :].expand(len(thresholds), -1), thresholds[:, None]), expected)
    for i in range(0, len(scores), 7):
        for k in range(0, len(thresholds), 5):
            got = reaches(scores[i], thresholds[k])
            assert got.shape == () and bool(got) == bool(expected[k, i])
    # float16 and float64 scores compare exactly too (float16 widens exactly)
    half = scores.half()
    assert torch.equal(reaches(half, thresholds[3]), half.double() >= thresholds[3])
    wide = scores.double() + 1e-12
    assert torch.equal(reaches(wide, thresholds[:, None]), wide[None, :] >= thresholds[:, None])
    # the case promotion would get wrong beside a 0-d float64 threshold: 0.2013 rounded to float32 is below it
    s = f32(0.2013)
    assert float(s) < 0.2013 and bool((s[None] >= torch.tensor(0.2013, dtype=torch.float64))[0])  # (torch's 0-d rule)
    assert not bool(reaches(s[None], torch.tensor(0.2013, dtype=torch.float64))[0])


@pytest.mark.parametrize("C", [1, 2, 5])
def test_the_rules_early_exit_reads_undefined_rows_from_score_them_nan(C):
    """EarlyExit learns from the NaN scores of max_probability, entropy and margin (C > 1) whether a row
    had no softmax: every such row (all -inf, a +inf, +inf with -inf) must score NaN. A row mixing -inf
    and finite logits has a softmax (finite score). Margin with one class scores 1 whatever the row."""
    finite = torch.tensor([0.5, -1.0, 2.0, 0.0, 3e38])[:C]
    rows = {"all -inf": torch.full((C,), -INF), "+inf": finite.clone().index_fill_(0, torch.tensor([0]), INF),
            "all +inf": torch.full((C,), INF), "nan": finite.clone().index_fill_(0, torch.tensor([0]), math.nan)}
    if C > 1:
        rows["+inf and -inf"] = torch.full((C,), -INF).index_fill_(0, torch.tensor([C - 1]), INF)
    masked = finite.clone().index_fill_(0, torch.arange(1, C), -INF)  # one class left: fine
    for name, rule in RULES.items():
        for dtype in (torch.float32, torch.float64):
            logits = torch.stack(list(rows.values()) + [masked, finite]).to(dtype)
            reads_nan = _undefined_scores_nan(rule(), logits)
            assert reads_nan == (name in ("max_probability", "entropy") or (name == "margin" and C > 1))
            if not reads_nan:
                continue
            scores = rule().scores(logits[None])[0]
            assert torch.isnan(scores[:len(rows)]).all(), (name, C, dtype, scores)
            assert torch.isfinite(scores[len(rows):]).all(), (name, C, dtype, scores)


def staged(table):
    """A staged model whose exit ``k`` gives ``table[k]``'s rows of the samples it is given."""
    return _lookup_model(table)


def attached(table):
    K, N = table.shape[:2]
    body = nn.Sequential(*[nn.Identity() for _ in range(K - 1)], _Lookup(table, K - 1))
    return mw.attach_exits(body, [str(k) for k in range(K - 1)], heads=[_Lookup(table, k) for k in range(K - 1)],
                           example_input=torch.zeros(N, 1, dtype=torch.float64))


def early_exit(build, table, thresholds, rule):
    index = torch.arange(table.shape[1], dtype=torch.float64)[:, None]
    return mw.EarlyExit(build(table), thresholds, rule=rule)(index)


def thresholds_on_scores(scores, g, shift):
    """One threshold per exit on a score of it (not NaN), moved by ``shift``: 0 (exactly on it), one
    float32 ulp up or down, or half an ulp up (between two float32 neighbours: float64 only)."""
    chosen = []
    for k in range(scores.shape[0]):
        kept = scores[k][~torch.isnan(scores[k])]
        s = float(kept[int(torch.randint(0, kept.numel(), (1,), generator=g))]) if kept.numel() else 0.5
        if scores.dtype != torch.float32:
            chosen.append(s)
        elif shift == 0.5:
            chosen.append((s + up(s, 1)) / 2)
        else:
            chosen.append(up(s, int(shift)))
    return torch.tensor(chosen, dtype=torch.float64)


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("build", [staged, attached])
def test_early_exit_equals_exit_assignment_with_thresholds_on_scores_and_one_ulp_away(rule, build):
    g = torch.Generator().manual_seed(1)
    for C in (1, 2, 6):
        for dtype in (torch.float32, torch.float64, torch.float16):
            K, N = 4, 48
            table = (torch.randn(K, N, C, generator=g) * 2).to(dtype)
            table[:, ::5] = table[:, 1:2]  # tied scores
            if C > 2:
                table[:, 3::7, 1:] = -INF  # masked classes: a softmax still
            scores = as_rule(rule).scores(table.float() if dtype == torch.float16 else table)
            taken = set()
            for shift in (0, 1, -1, 0.5):
                thresholds = thresholds_on_scores(scores, g, shift)
                expected = mw.exit_assignment(table, thresholds, rule=rule)
                predictions, exits = early_exit(build, table, thresholds, rule)
                assert torch.equal(exits, expected.exits) and torch.equal(predictions, expected.predictions)
                assert predictions.dtype == exits.dtype == torch.long
                taken |= set(exits.tolist())
            assert C == 1 or rule == "patience" or len(taken) > 1


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("build", [staged, attached])
@pytest.mark.parametrize("C", [1, 3])
def test_rows_without_a_softmax_are_refused_where_a_sample_reaches_them_with_their_count(rule, build, C):
    """At a first (non-last) exit and at the last, rows without a softmax are refused with the same
    message and count as before the trims (a NaN row beside them goes on, and is not counted); rows
    mixing -inf and finite logits are not refused."""
    g = torch.Generator().manual_seed(2)
    K, N = 3, 12
    clean = torch.randn(K, N, C, generator=g)
    never = torch.tensor([2.0, 2.0, 0.0])  # no score reaches 2 (patience's are 0 or 1 at exits 1 and 2)
    for k in (0, 1, K - 1):
        for bad in ([-INF] * C, [INF] + [0.0] * (C - 1), [INF] + [-INF] * (C - 1)):
            table = clean.clone()
            table[k, 3] = torch.tensor(bad)
            table[k, 8] = torch.tensor(bad)
            if C > 1:
                table[k, 5, 1:] = -INF  # masked classes, one left: fine
            with pytest.raises(ValueError, match=rf"^Exit {k + 1} gave 2 sample\(s\) logits that are all -inf "):
                early_exit(build, table, never, rule)
            with pytest.raises(ValueError, match="no softmax"):
                mw.exit_assignment(table, never, rule=rule)
            if k < K - 1:
                table[k, 6] = math.nan  # a NaN row at an exit it goes on from: not counted
                with pytest.raises(ValueError, match=rf"^Exit {k + 1} gave 2 sample\(s\)"):
                    early_exit(build, table, never, rule)
        if C > 1:
            table = clean.clone()
            table[k, :, 1:] = -INF
            predictions, exits = early_exit(build, table, never, rule)
            expected = mw.exit_assignment(table, never, rule=rule)
            assert torch.equal(exits, expected.exits) and torch.equal(predictions, expected.predictions)


@pytest.mark.parametrize("build", [staged, attached])
def test_nan_rows_go_on_and_margin_with_one_class_refuses_a_nan_row_that_would_leave(build):
    g = torch.Generator().manual_seed(3)
    table = torch.randn(3, 10, 4, generator=g)
    table[0, 2] = math.nan
    table[1, 2, 0] = math.nan
    for rule in ("max_probability", "entropy", "margin"):
        thresholds = mw.find_thresholds(torch.nan_to_num(table), mw.geometric_exit_distribution(1.0, 3), rule=rule)
        predictions, exits = early_exit(build, table, thresholds, rule)
        expected = mw.exit_assignment(table, thresholds, rule=rule)
        assert exits[2] == 2 and torch.equal(exits, expected.exits) and torch.equal(predictions, expected.predictions)
    # one class: margin scores 1 whatever the row, so the NaN row left at exit 1 and was predicted class 0
    # (exit_assignment refuses it): refused now
    single = torch.randn(3, 5, 1, generator=g)
    single[0, 1] = math.nan
    with pytest.raises(ValueError, match=r"NaN logits \(exit 1: 1 NaN values, in 1 sample\(s\) predicted there\)"):
        mw.exit_assignment(single, [0.5, 0.5, 0.0], rule="margin")
    with pytest.raises(ValueError, match=r"NaN logits \(exit 1: 1 NaN values, in 1 sample\(s\) predicted there\)"):
        early_exit(build, single, torch.tensor([0.5, 0.5, 0.0]), "margin")


def test_the_bookkeeping_of_an_exit_costs_few_launch_equivalent_ops():
    """Stages and heads that compute nothing (identities), so every op counted is EarlyExit's own: 3 exits
    at batch 64, samples leaving at each. Per exit: the prediction (argmax) and score (softmax, max),
    the comparison (its float64 promotion: one op counted), the NaN-score and leaver counts (isnan, stack,
    sum: 4 on the CPU), one stable sort of the mask (3 on the CPU), the gathers of the leavers' indices
    and classes and the exits' index_fill (none of the two gathers before a first sample leaves); at
    the last, argmax and the finiteness read (amax, sub, sum); at the end two cats and one index_copy.
    Before the trims: 62 (a float64 cast per exit, softmax_undefined's 5 ops, two nonzero_static and a
    negation, two index_put per exit)."""
    torch.manual_seed(0)
    net = mw.MultiExit([nn.Identity()] * 3, [nn.Identity()] * 3).eval()
    x = torch.randn(64, 10)
    predictor = mw.EarlyExit(net, [0.3, 0.25, 0.0])
    exits = predictor(x).exits
    assert exits.bincount().tolist() == [34, 13, 17]
    counts = overhead.count(lambda: predictor(x), "cpu", iterations=2, breakdown=True)
    assert counts["kernel_ops"] <= 37, counts["by_op"]
    assert not {"aten::_index_put_impl_", "aten::nonzero_static", "aten::abs"} & set(counts["by_op"])


@pytest.mark.parametrize("where", ["instance", "class"])
@pytest.mark.parametrize("build", [staged, attached])
def test_a_built_in_rule_instance_with_its_own_scores_is_not_trusted_to_score_undefined_rows_nan(build, where,
                                                                                               monkeypatch):
    """A MaxProbability whose scores were replaced on the instance or on the class (its type is still
    MaxProbability) and never give NaN: a row without a softmax is refused where it is reached, as
    before the trims and as exit_assignment does, not read from NaN scores it never gives (it left
    silently at exit 1 with a prediction); a NaN row it lets leave is refused too."""
    g = torch.Generator().manual_seed(4)
    table = torch.randn(2, 4, 3, generator=g)
    table[0, 1, 0] = INF
    rule = mw.MaxProbability()
    built_in = mw.MaxProbability.scores
    if where == "instance":
        rule.scores = lambda logits: torch.nan_to_num(built_in(rule, logits), nan=0.99)
    else:
        monkeypatch.setattr(mw.MaxProbability, "scores", lambda self, logits: torch.nan_to_num(
            built_in(self, logits), nan=0.99))
    assert not _undefined_scores_nan(rule, table[0])
    with pytest.raises(ValueError, match="no softmax"):
        mw.exit_assignment(table, [0.5, 0.0], rule=rule)
    with pytest.raises(ValueError, match=r"^Exit 1 gave 1 sample\(s\) logits that are all -inf "):
        early_exit(build, table, torch.tensor([0.5, 0.0]), rule)
    table[0, 1] = math.nan
    with pytest.raises(ValueError, match=r"NaN logits \(exit 1: 3 NaN values, in 1 sample\(s\) predicted there\)"):
        mw.exit_assignment(table, [0.5, 0.0], rule=rule)
    with pytest.raises(ValueError, match=r"NaN logits \(exit 1: 3 NaN values, in 1 sample\(s\) predicted there\)"):
        early_exit(build, table, torch.tensor([0.5, 0.0]), rule)
