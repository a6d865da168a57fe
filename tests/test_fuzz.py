"""Property-based tests of the public API (Hypothesis): random shapes, dtypes, NaN/inf placements,
empty batches and wrong lengths. Every call either returns finite, correctly shaped results or
raises a ValueError/TypeError; on any error the model, the optimizer, gamma and the validation
average are bitwise unchanged. Derandomized, so CI runs the same examples every time;
``METAWEIGHT_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz.py`` searches longer."""

import copy
import math
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import metaweight as mw
from conftest import quiet, tiny_net
from test_errors import assert_same, snapshot

FUZZ = settings(max_examples=int(os.environ.get("METAWEIGHT_FUZZ_EXAMPLES", "80")), deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LABEL_DTYPES = [torch.int64, torch.int32, torch.int16, torch.uint8, torch.float32, torch.bool]
SPECIALS = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.0]


@st.composite
def exit_outputs(draw, max_exits=4):
    """A possibly malformed list of exit logits and labels, and whether it is well formed."""
    K = draw(st.integers(1, max_exits))
    n_out = draw(st.sampled_from([K, K, K, K - 1, K + 1]))
    B = draw(st.integers(0, 5))
    C = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    outputs = [torch.randn(B, C, generator=g).to(dtype) for _ in range(max(n_out, 0))]
    finite = True
    if outputs and B and draw(st.booleans()):
        value = draw(st.sampled_from(SPECIALS))
        k, b, c = draw(st.integers(0, len(outputs) - 1)), draw(st.integers(0, B - 1)), draw(st.integers(0, C - 1))
        outputs[k][b, c] = value
        finite = math.isfinite(float(outputs[k][b, c]))
    label_dtype = draw(st.sampled_from(LABEL_DTYPES))
    low, high = draw(st.sampled_from([(0, C), (0, C), (-2, C), (0, C + 3)]))
    labels = torch.randint(low, max(high, low + 1), (B,), generator=g)
    labels = labels.to(label_dtype) if label_dtype != torch.uint8 else labels.clamp(min=0).to(torch.uint8)
    if draw(st.integers(0, 9)) == 0:
        labels = labels[:-1] if B else torch.zeros(1, dtype=torch.long)
    if draw(st.integers(0, 9)) == 0 and outputs:
        outputs[-1] = outputs[-1][:, :-1] if C > 1 else outputs[-1][None]
    shape = outputs[0].shape if outputs else None
    classes = shape[-1] if shape is not None else 0
    in_range = bool(labels.numel() == 0 or (labels.to(torch.int64).min() >= 0
                                            and labels.to(torch.int64).max() < classes))
    well_formed = (n_out == K and B > 0 and labels.shape == (B,) and label_dtype not in (torch.float32, torch.bool)
                   and in_range and all(o.shape == (B, classes) for o in outputs))
    return K, outputs, labels, well_formed, finite


@FUZZ
@given(exit_outputs(), st.sampled_from(["dense", "last", "none"]))
def test_criterion_and_validation_either_score_or_refuse(case, teachers):
    K, outputs, labels, well_formed, finite = case
    criterion, validation = mw.DenseDistillLoss(K, teachers=teachers), mw.BalancedValidation(K)
    for fn, length in ((criterion, criterion.num_terms), (validation.exit_losses, K)):
        try:
            values = fn(outputs, labels)
        except (ValueError, TypeError) as exc:
            assert not well_formed, f"refused a well-formed input: {exc}"
            continue
        assert well_formed, "accepted a malformed input"
        assert values.shape == (length,)
        if finite and all(o.dtype in (torch.float32, torch.float64) for o in outputs):
            assert torch.isfinite(values).all()


def _state(model, opt, w):
    return snapshot(model, opt, w)


@st.composite
def training_call(draw):
    """Arguments for one weighter call: batches with NaN/inf, bad labels, wrong shapes or types."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def one_batch(kind):
        n = draw(st.integers(0, 6)) if kind == "size" else 6
        x, y = torch.randn(n, 6, generator=g), torch.randint(0, 5, (n,), generator=g)
        if kind == "special" and n:
            x[draw(st.integers(0, n - 1)), draw(st.integers(0, 5))] = draw(st.sampled_from(SPECIALS))
        elif kind == "label":
            y[0] = draw(st.sampled_from([-1, 5, 100]))
        elif kind == "label_dtype":
            y = y.to(draw(st.sampled_from([torch.float32, torch.bool, torch.int32])))
        elif kind == "width":
            x = torch.randn(n, draw(st.sampled_from([5, 7])), generator=g)
        elif kind == "type":
            return draw(st.sampled_from([None, "batch", (x,), (x, y, y), x]))
        return (x, y)

    kinds = ["ok", "ok", "special", "label", "label_dtype", "width", "type", "size"]
    return one_batch(draw(st.sampled_from(kinds))), one_batch(draw(st.sampled_from(kinds)))


@FUZZ
@given(training_call(), st.sampled_from(["raise", "skip"]), st.sampled_from(["jvp", "finite_difference"]),
       st.sampled_from(["step", "meta_step"]))
def test_weighter_call_either_trains_or_changes_nothing(call, nonfinite, backend, which):
    torch.manual_seed(0)
    model = tiny_net(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    w = mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(3), gamma_lr=0.1, nonfinite=nonfinite, backend=backend)
    g = torch.Generator().manual_seed(1)
    w.step((torch.randn(6, 6, generator=g), torch.randint(0, 5, (6,), generator=g)),
           (torch.randn(6, 6, generator=g), torch.randint(0, 5, (6,), generator=g)))
    before = _state(model, opt, w)
    train, val = call
    try:
        with quiet():
            metrics = getattr(w, which)(train, val)
    except (ValueError, TypeError, RuntimeError):  # RuntimeError: the model's own (e.g. a wrong input width)
        assert_same(before, _state(model, opt, w))
        return
    skipped = metrics.get("skipped") or metrics.get("model_step_skipped")
    if skipped:
        if which == "step" or metrics.get("model_step_skipped"):
            assert_same(before, _state(model, opt, w))
        else:
            assert torch.equal(w.gamma, before[2]["gamma"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(b).all() for b in model.buffers() if b.is_floating_point())
    assert torch.isfinite(w.gamma).all() and (w.gamma >= 0).all()
    assert torch.isfinite(w.validation.expected).all()


@st.composite
def logits_and_labels(draw):
    K, N, C = draw(st.integers(0, 4)), draw(st.integers(0, 6)), draw(st.integers(0, 5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    logits = torch.randn(K, N, C, generator=g).to(draw(st.sampled_from(DTYPES + [torch.int64])))
    if logits.numel() and logits.is_floating_point() and draw(st.booleans()):
        logits.view(-1)[draw(st.integers(0, logits.numel() - 1))] = draw(st.sampled_from(SPECIALS))
    labels = torch.randint(-1 if draw(st.integers(0, 5)) == 0 else 0, max(C, 1) + (draw(st.integers(0, 5)) == 0),
                           (N,), generator=g)
    if draw(st.integers(0, 7)) == 0:
        labels = labels.float()
    return logits, labels


@FUZZ
@given(logits_and_labels(), st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=5),
       st.floats(allow_nan=True, allow_infinity=True))
def test_evaluation_either_scores_or_refuses(data, thresholds, budget):
    logits, labels = data
    K = logits.shape[0]
    costs = [float(k + 1) for k in range(K)]
    calls = [
        lambda: mw.anytime_accuracy_from_logits(logits, labels, topk=(1, 2)),
        lambda: mw.budgeted_curve(logits, labels, logits, labels, costs, qs=(0.5, 1.0)),
        lambda: mw.evaluate_thresholds(logits, labels, torch.tensor(thresholds), costs),
        lambda: mw.exit_assignment(logits, torch.tensor(thresholds)),
        lambda: mw.thresholds_for_budget(logits, labels, costs, budget, iterations=4),
    ]
    for call in calls:
        try:
            out = call()
        except (ValueError, TypeError):
            continue
        if isinstance(out, mw.AnytimeResult):
            assert all(0 <= a <= 100 for v in out.accuracy.values() for a in v)
            assert out.num_exits == K
        elif isinstance(out, mw.BudgetCurve):
            assert all(math.isfinite(p.cost) and 0 <= p.accuracy <= 100 for p in out.points)
        elif isinstance(out, mw.BudgetPoint):
            assert math.isfinite(out.cost) and 0 <= out.accuracy <= 100
            assert len(out.thresholds) == K and len(out.exit_fractions) == K
        else:
            exits, predictions = out
            assert exits.shape == predictions.shape == (logits.shape[1],)
            assert ((exits >= 0) & (exits < K)).all()


KEYS = ["term_names", "teachers", "learn", "gamma", "gamma_optimizer", "gamma_optimizer_type", "validation",
        "num_meta_steps", "num_calls", "num_skipped", "gamma_sum", "pending_calls", "meta_step_due"]
JUNK = [None, float("nan"), -1, "x", [], {}, torch.tensor(float("nan")), torch.ones(3), torch.full((6,), -1.0),
        torch.full((6,), float("inf"))]


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from(range(len(JUNK) + 1))), min_size=1, max_size=3))
def test_corrupted_weighter_state_is_refused_or_loaded_whole(edits):
    torch.manual_seed(0)
    model = tiny_net(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = mw.HarmonizedWeighter(model, opt, mw.DenseDistillLoss(3), gamma_lr=0.1)
    g = torch.Generator().manual_seed(2)
    b = (torch.randn(6, 6, generator=g), torch.randint(0, 5, (6,), generator=g))
    w.step(b, b)
    state = copy.deepcopy(w.state_dict())
    w.step(b, b)
    before = _state(model, opt, w)
    for key, j in edits:
        if j == len(JUNK):
            state.pop(key, None)
        else:
            state[key] = copy.deepcopy(JUNK[j])
    try:
        w.load_state_dict(state)
    except (ValueError, TypeError):
        assert_same(before, _state(model, opt, w))
        return
    # accepted: then everything loaded is usable and finite
    assert torch.isfinite(w.gamma).all() and (w.gamma >= 0).all()
    w.step(b, b)
    assert torch.isfinite(w.gamma).all()
