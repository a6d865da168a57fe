"""Temperature scaling per exit against a 1-D grid search of the held-out NLL; the ECE against a
per-sample loop; the reliability plot."""

import math
import warnings

import pytest
import torch

import metaweight as mw
from references.calibration import loop_ece


def overconfident(K=3, N=400, C=5, scale=(3.0, 0.5, 1.0), seed=0):
    """Labels drawn from softmax(z); the exits report z times a scale (over- or under-confident)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, C, generator=g, dtype=torch.float64) * 1.5
    labels = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    return torch.stack([z * s for s in scale[:K]]), labels


def test_fitted_temperature_minimises_the_nll_like_a_grid_search():
    logits, labels = overconfident()
    temperatures = mw.fit_temperatures(logits, labels)
    grid = torch.logspace(-2, 2, 4001, dtype=torch.float64)
    for k in range(3):
        scaled = torch.log_softmax(logits[k][None] / grid[:, None, None], -1)  # every grid point at once
        nll = -scaled.gather(2, labels.expand(len(grid), -1)[..., None]).squeeze(2).mean(1)
        best = int(nll.argmin())
        fitted = float(torch.nn.functional.cross_entropy(logits[k] / temperatures[k], labels))
        assert fitted <= float(nll[best]) + 1e-9
        assert math.log(float(temperatures[k])) == pytest.approx(math.log(float(grid[best])), abs=2e-3)
    # the data were made with temperatures 3, 0.5 and 1: the fit finds them up to sampling noise
    assert temperatures.tolist() == pytest.approx([3.0, 0.5, 1.0], rel=0.15)


def test_calibration_lowers_the_held_out_nll_and_reports_ece():
    val, val_labels = overconfident(seed=1)
    test, test_labels = overconfident(seed=2)
    result = mw.calibrate(val, val_labels, test, test_labels)
    assert all(a <= b + 1e-9 for a, b in zip(result.nll_after, result.nll_before))
    assert result.ece_after[0] < result.ece_before[0] and result.ece_after[1] < result.ece_before[1]
    assert torch.allclose(result.apply(test), test / torch.tensor(result.temperatures, dtype=torch.float64).view(-1, 1, 1))
    assert "ECE" in str(result)


@pytest.mark.parametrize("bins", [1, 10, 15])
def test_ece_equals_a_per_sample_loop(bins):
    logits, labels = overconfident(N=250, seed=3)
    logits[:, ::10] = 0.0  # uniform rows: confidence exactly 1/C, on a bin edge for bins = 10, 15
    ece = mw.expected_calibration_error(logits, labels, bins=bins)
    for k in range(3):
        rows = torch.softmax(logits[k], 1).tolist()
        assert ece[k] == pytest.approx(loop_ece(rows, labels.tolist(), bins), abs=1e-9)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="logits"):
        mw.fit_temperatures(torch.randn(2, 0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="labels in"):
        mw.expected_calibration_error(torch.randn(2, 4, 3), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="bins"):
        mw.expected_calibration_error(torch.randn(2, 4, 3), torch.tensor([0, 1, 2, 2]), bins=0)


def test_reliability_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    logits, labels = overconfident(N=100)
    path = mw.plot_reliability(logits, labels, tmp_path / "r.png", temperatures=[3.0, 0.5, 1.0])
    assert path.stat().st_size > 0


def test_apply_refuses_logits_of_another_number_of_exits():
    """No broadcast: [N, C], [1, N, C] or [K', N, C] with K' != the fitted exits is refused; the
    fitted K divides each exit by its own temperature."""
    logits, labels = overconfident(K=3, N=60)
    calibration = mw.calibrate(logits, labels)
    for bad in (logits[0], logits[:1], logits[:2], torch.randn(4, 8, 5)):
        with pytest.raises(ValueError, match=r"logits \[K, N, C\] of the 3 exits.*Found shape"):
            calibration.apply(bad)
    scaled = calibration.apply(logits)
    for k in range(3):
        assert torch.allclose(scaled[k], logits[k] / calibration.temperatures[k])


FITS = {  # every entry point that fits (or measures) on logits, called on held-out logits z, labels y
    "fit_temperatures": lambda z, y: mw.fit_temperatures(z, y),
    "calibrate": lambda z, y: mw.calibrate(z, y),
    "expected_calibration_error": lambda z, y: mw.expected_calibration_error(z, y),
    "find_thresholds": lambda z, y: mw.find_thresholds(z, [0.5, 0.3, 0.2]),
    "budgeted_curve": lambda z, y: mw.budgeted_curve(z, y, z, y, [1.0, 2.0, 3.0], qs=(0.5, 1.0)),
    "thresholds_for_budget": lambda z, y: mw.thresholds_for_budget(z, y, [1.0, 2.0, 3.0], 2.0, iterations=8),
    "thresholds_for_accuracy": lambda z, y: mw.thresholds_for_accuracy(z, y, 0.1, candidates=20),
}


@pytest.mark.parametrize("value,match", [(float("nan"), r"hold NaN logits \(exit 2: 2 NaN values, in 1 sample"),
                                         (float("inf"), r"\[1, 7\] \(exit 2, sample 7\) hold \+inf")])
@pytest.mark.parametrize("name", sorted(FITS))
def test_fits_refuse_nan_and_plus_inf_logits_naming_the_exit(name, value, match):
    """NaN logits were silently replaced (nan_to_num) or scored: now refused with the exit and how
    many values, like +inf (a row with no softmax); the caller's logits are left as they were."""
    logits, labels = overconfident()
    logits[1, 7, :2] = value  # exit 2, one sample, two values
    before = logits.clone()
    with pytest.raises(ValueError, match=match) as info:
        FITS[name](logits, labels)
    if math.isnan(value):
        assert "exit 1" not in str(info.value) and name in str(info.value)
    assert torch.equal(logits.isnan(), before.isnan()) and torch.equal(logits.nan_to_num(), before.nan_to_num())


@pytest.mark.parametrize("name", sorted(FITS))
def test_a_class_masked_with_minus_inf_fits_as_if_it_were_absent(name):
    """-inf for a masked class stays legitimate: every fit equals the fit on the logits without
    that class (the softmax is the same)."""
    logits, labels = overconfident()
    labels = labels.clamp(max=3)  # class 4 is masked: no sample is labelled with it
    masked = logits.clone()
    masked[..., 4] = float("-inf")
    got, ref = FITS[name](masked, labels), FITS[name](logits[..., :4].contiguous(), labels)
    if isinstance(got, torch.Tensor):
        assert torch.allclose(got.double(), ref.double(), rtol=1e-6)
    elif isinstance(got, list):
        assert got == pytest.approx(ref, rel=1e-6)
    else:
        assert str(got) == str(ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_apply_divides_half_precision_logits_in_float32(dtype):
    """float16 logits / T = 1e-4 overflowed to inf in their own dtype (every function after refused
    them); apply divides in float32 and returns float32, the quotient of the float32 logits."""
    torch.manual_seed(0)
    z = torch.randn(2, 100, 4) * 3
    y = z[1].argmax(-1)  # exit 2 separates the labels: its temperature is the bound, 1e-4
    with pytest.warns(UserWarning, match=r"bound of its search.*exit 2: T = 0.0001"):
        c = mw.calibrate(z, y)
    assert c.temperatures[1] == 1e-4
    applied = c.apply(z.to(dtype))
    expected = z.to(dtype).float() / torch.tensor(c.temperatures, dtype=torch.float32).view(-1, 1, 1)
    assert applied.dtype == torch.float32 and torch.isfinite(applied).all()
    assert torch.equal(applied, expected)
    assert c.apply(z.double()).dtype == torch.float64
    mw.find_thresholds(applied, [0.5, 0.5])  # finite: accepted


def test_fit_temperatures_warns_only_at_its_bounds():
    z, labels = overconfident()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mw.fit_temperatures(z, labels)  # inside the bounds: silent
    with pytest.warns(UserWarning, match=r"exit 1: T = 10000"):
        mw.fit_temperatures(-z[:1], labels)  # worse than chance: the NLL falls as T grows


def test_fit_temperatures_of_logits_equal_in_every_row_is_one():
    """Logits equal across the classes of every row (an untrained exit, a head of zeros): their NLL, log C, is
    the same at every temperature; the fit says so and returns 1 instead of a bound of its search (whose
    warning would call the predictions all right, or worse than chance)."""
    z, labels = overconfident()
    flat = torch.stack([z[0], torch.full_like(z[0], 2.5)])  # exit 2: one value in every row
    for t in (0.01, 1.0, 100.0):  # (the premise: the NLL does not depend on T)
        assert torch.nn.functional.cross_entropy(flat[1] / t, labels).item() == pytest.approx(math.log(z.shape[-1]))
    with pytest.warns(UserWarning, match=r"exit\(s\) 2 are the same for every class.*T = 1 was returned"):
        t = mw.fit_temperatures(flat, labels)
    assert t[1] == 1.0 and t[0] == mw.fit_temperatures(z[:1], labels)[0]


@pytest.mark.parametrize("mask", [float("-inf"), torch.finfo(torch.float32).min, -1e9])
def test_fit_temperatures_of_logits_equal_but_for_masked_classes_is_one(mask):
    """An untrained exit whose head masks a class (a vocabulary mask, -inf or a finfo.min/-1e9 constant)
    gives logits equal on every other class: its NLL, log 3 here, is the same at every temperature. The
    flat test compared every class, the masked one too, so the fit ran to its bound and returned T = 1e-4
    with a warning that every held-out prediction was right (a third were)."""
    z, labels = overconfident()
    labels = labels % 3  # on the classes left unmasked
    flat = torch.zeros(2, z.shape[1], 4)
    flat[0] = z[0, :, :4]
    flat[1, :, 3] = mask  # exit 2: 0 on classes 0..2, masked on class 3, in every row
    for t in (0.01, 1.0, 100.0):  # (the premise: the NLL does not depend on T)
        assert torch.nn.functional.cross_entropy(flat[1] / t, labels).item() == pytest.approx(math.log(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = mw.fit_temperatures(flat, labels)
    messages = [str(w.message) for w in caught]
    assert t[1] == 1.0 and t[0] == mw.fit_temperatures(flat[:1], labels)[0]
    assert any("exit(s) 2 are the same for every class" in m and "T = 1 was returned" in m for m in messages)
    assert not any("bound of its search" in m and "exit 2" in m for m in messages)


def test_fit_temperatures_of_an_exit_certain_of_every_sample_says_so():
    """An exit whose top logit is 1e3 or more above every other in every row (the others read as masked):
    its NLL, 0 to float precision, is the same at every temperature the search reaches; T = 1 comes with a
    warning that it is certain of every sample, not that it predicts nothing (helper-100's report)."""
    z, labels = overconfident()
    certain = torch.stack([z[0], torch.nn.functional.one_hot(labels, z.shape[-1]).float() * 5e3])
    for t in (0.01, 1.0, 100.0):  # (the premise: the NLL does not depend on T)
        assert torch.nn.functional.cross_entropy(certain[1] / t, labels).item() == pytest.approx(0.0, abs=1e-6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = mw.fit_temperatures(certain, labels)
    messages = [str(w.message) for w in caught if "fit_temperatures" in str(w.message)]
    assert t[1] == 1.0 and t[0] == mw.fit_temperatures(certain[:1], labels)[0]
    assert any("exit(s) 2, one class is 1e3 or more above every other" in m and "certain" in m for m in messages)
    assert not any("predicts nothing" in m for m in messages)


def test_calibration_runs_in_float32_where_the_device_has_no_float64(monkeypatch):
    """MPS has no float64: the temperatures and the fit use the device's widest dtype (one helper
    decides, monkeypatched here to say the CPU lacks float64)."""
    from metaweight import _exit_rules
    z, labels = overconfident()
    monkeypatch.setattr(_exit_rules, "supports_float64", lambda device: False)
    t = mw.fit_temperatures(z.float(), labels)
    assert t.dtype == torch.float32
    monkeypatch.undo()
    assert torch.allclose(t.double(), mw.fit_temperatures(z, labels), rtol=1e-3)


@pytest.mark.parametrize("bad", [[0.0, 1.0], [-1.0, 1.0], [float("nan"), 1.0], [float("inf"), 1.0], []])
def test_calibration_refuses_temperatures_early_exit_refuses(bad):
    """A Calibration built by hand (or changed after it was made) with T = 0, T < 0, NaN or inf is
    refused at construction and by apply, by the rule EarlyExit(temperatures=) applies; apply never
    returns infinite, NaN or sign-flipped logits."""
    z = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="one positive finite number per exit"):
        mw.Calibration(bad, [0.0] * 2, [0.0] * 2, [0.0] * 2, [0.0] * 2)
    cal = mw.Calibration([1.0, 2.0], [0.0] * 2, [0.0] * 2, [0.0] * 2, [0.0] * 2)
    assert torch.equal(cal.apply(z), z / torch.tensor([1.0, 2.0]).view(-1, 1, 1))
    cal.temperatures = bad
    with pytest.raises(ValueError, match="one positive finite number per exit"):
        cal.apply(z)
    net = mw.MultiExit([torch.nn.Identity()] * 2, [torch.nn.Linear(3, 3)] * 2)
    with pytest.raises(ValueError, match="positive finite"):
        mw.EarlyExit(net, [0.5, 0.0], temperatures=cal)


def _labels_on_masked_classes():
    """K=2, N=6, C=4: class 2 masked (-inf) at both exits, class 3 at exit 1 only. By hand: sample 1
    (label 3) sits on a masked class at exit 1, sample 3 (label 2) at exits 1 and 2: 2 labels of 6,
    2 at exit 1, 1 at exit 2, the first sample 1 with class 3."""
    logits = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logits[:, :, 2] = -math.inf
    logits[0, :, 3] = -math.inf
    return logits, torch.tensor([0, 3, 1, 2, 0, 1])


@pytest.mark.parametrize("call, names", [
    (lambda z, y, zc, yc: mw.fit_temperatures(z, y), ("val_labels", "val_logits", "fit_temperatures")),
    (lambda z, y, zc, yc: mw.calibrate(z, y), ("val_labels", "val_logits", "calibrate")),
    (lambda z, y, zc, yc: mw.calibrate(zc, yc, z, y), ("test_labels", "test_logits", "calibrate")),
])
def test_labels_on_masked_classes_are_refused_before_any_fit(call, names):
    """A label on a -inf logit has an infinite NLL at every temperature: the fit ran to its bound
    (T = 1e4 at every exit) with a warning blaming the data's size, and calibrate reported NLL inf.
    Now refused before fitting, with the counts per exit computed by hand, and nothing changed."""
    logits, labels = _labels_on_masked_classes()
    clean_logits, clean_labels = logits[:, [0, 2, 4, 5]], labels[[0, 2, 4, 5]]  # the fix the message names
    before = logits.clone(), labels.clone()
    labels_name, logits_name, what = names
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fit ran: no warning about its bound
        with pytest.raises(ValueError, match=rf"^2 of the 6 labels in `{labels_name}` sit on a class masked "
                                             rf"\(-inf, or 1e3 or more below the row's largest logit, as "
                                             rf"finfo\.min, -1e9 or -1e4 masks are\) in `{logits_name}` \(exit 1: 2; "
                                             rf"exit 2: 1; the first: sample 1, class 3\)\. .*at every temperature, so {what} "
                                             rf".*Drop those samples"):
            call(logits, labels, clean_logits, clean_labels)
    assert torch.equal(logits, before[0]) and torch.equal(labels, before[1])
    result = mw.calibrate(clean_logits, clean_labels)  # those samples dropped: finite values
    assert all(math.isfinite(v) for v in result.nll_before + result.nll_after + result.temperatures)


def test_accuracies_score_a_label_on_a_masked_class_as_wrong():
    """No log-likelihood in the ECE: a label on a masked class is a wrong prediction, kept. By hand:
    logits [0, 0, -inf], label 2: confidence 1/2, wrong, so the ECE is |0 - 1/2| = 50%."""
    logits = torch.tensor([[[0.0, 0.0, -math.inf]]])
    assert mw.expected_calibration_error(logits, torch.tensor([2])) == pytest.approx([50.0])


@pytest.mark.parametrize("mask", [-math.inf, torch.finfo(torch.float64).min, torch.finfo(torch.float32).min, -1e9, -1e4])
@pytest.mark.parametrize("call, names", [
    (lambda z, y: mw.fit_temperatures(z, y), ("val_labels", "val_logits")),
    (lambda z, y: mw.calibrate(z[:, [0, 2, 4, 5]], y[[0, 2, 4, 5]], z, y), ("test_labels", "test_logits")),
])
def test_labels_on_classes_masked_with_a_large_finite_value_are_refused_too(mask, call, names):
    """Hugging Face-style code masks with finfo.min, -1e9 or -1e4, not -inf: the fit ran to its
    bound (T = 1e4 at every exit, a warning blaming the data) where -inf was refused. The same
    labels as above (counts by hand there), with the rows' largest logits negative so a -1e4 mask
    lies less than 1e4 below them."""
    logits, labels = _labels_on_masked_classes()
    logits = logits - 3.0  # every unmasked logit negative
    logits[logits == -math.inf] = mask
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=rf"^2 of the 6 labels in `{names[0]}` sit on a class masked .* in "
                                             rf"`{names[1]}` \(exit 1: 2; exit 2: 1; the first: sample 1, class 3\)"):
            call(logits, labels)


def test_a_logit_less_than_1e3_below_the_top_is_not_masked():
    """The mask rule's boundary: a label 999 below its row's largest logit is a genuine (if hopeless)
    prediction and is fitted; 1000 below is masked and refused."""
    logits, labels = torch.zeros(1, 2, 3, dtype=torch.float64), torch.tensor([2, 0])
    logits[0, :, 0] = 1.0
    logits[0, 0, 2] = 1.0 - 999.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # such a label is worse than chance: the fit runs to its bound
        mw.fit_temperatures(logits, labels)
    logits[0, 0, 2] = 1.0 - 1000.0
    with pytest.raises(ValueError, match=r"^1 of the 2 labels in `val_labels` sit"):
        mw.fit_temperatures(logits, labels)


@pytest.mark.parametrize("call, name", [
    (lambda z, y, bad: mw.fit_temperatures(z, bad), "val_labels"),
    (lambda z, y, bad: mw.calibrate(z, bad), "val_labels"),
    (lambda z, y, bad: mw.calibrate(z, y, z, bad), "test_labels"),
    (lambda z, y, bad: mw.expected_calibration_error(z, bad), "labels"),
    (lambda z, y, bad: None if bad is y else mw.evaluate_thresholds(z, bad, [0.5, 0.0], [1.0, 2.0]), "labels"),
    (lambda z, y, bad: mw.anytime_accuracy_from_logits(z, bad), "labels"),
])
def test_label_errors_name_the_argument(call, name):
    """"The labels should have shape (20,)" did not say which argument (calibrate's val_labels or
    test_labels), and "The labels holds labels" was bad grammar: each error now names the argument."""
    z, y = torch.randn(2, 20, 3), torch.randint(0, 3, (20,))
    if name != "labels" or call(z, y, y) is None:  # evaluate_thresholds' own check names `labels [N]` first
        with pytest.raises(ValueError, match=rf"^`{name}` should have shape \(20,\) to match"):
            call(z, y, torch.randint(0, 3, (21,)))
    out_of_range = y.clone()
    out_of_range[0] = 7
    with pytest.raises(ValueError, match=rf"^`{name}` has labels in \[0, 7\], but the logits have 3 classes"):
        call(z, y, out_of_range)


def test_an_over_confident_exit_is_calibrated_not_refused_as_masked():
    """Logits 400 times too sharp put some wrong labels 1e3 or more below the row's top, and the gap
    rule took them for masked classes: calibrate refused the very case calibration is for. A mask is
    a cluster far below the rest of the row; these labels are spread among the other classes. The
    NLL of logits * s / T is that of logits / (T / s), so the fitted temperatures scale with s
    (checked against the fit on the unscaled logits), and a -1e9 mask on the sharp logits is still
    refused."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (1000,), generator=g)
    logits = torch.randn(2, 1000, 10, generator=g, dtype=torch.float64)
    logits[:, torch.arange(1000), labels] += 2.0
    gaps = logits.amax(-1) * 400 - (logits * 400).gather(-1, labels.expand(2, -1)[..., None]).squeeze(-1)
    assert int((gaps >= 1e3).sum()) == 17  # labels the gap rule took for masked
    reference = mw.fit_temperatures(logits, labels)
    assert mw.fit_temperatures(logits * 400, labels).tolist() == pytest.approx((reference * 400).tolist(), rel=1e-6)
    result = mw.calibrate(logits * 400, labels)
    assert result.nll_after == pytest.approx(mw.calibrate(logits, labels).nll_after, rel=1e-6)
    masked = logits * 400
    masked[0, 3, labels[3]] = -1e9
    with pytest.raises(ValueError, match=r"^1 of the 1000 labels in `val_labels` sits on a class masked"):
        mw.calibrate(masked, labels)


def test_fit_temperatures_names_exits_half_certain_half_uniform_and_exits_of_one_class_as_they_are():
    """An exit whose rows are partly certain (one class 1e3 above the rest) and partly uniform was told 'the same
    for every class in every held-out row' (false for half its rows), and an exit of one class 'one class is 1e3
    above every other' (there is no other) (helper-110's report). Each gets T = 1 and a message that holds."""
    labels = torch.tensor([0, 1, 2, 0])
    mixed = torch.zeros(4, 3)
    mixed[0, 0] = mixed[1, 1] = 1500.0  # two certain rows (and right), two uniform
    for logits, says, never in ((mixed, "either the same for every class", "in every held-out row of exit(s) 1, "
                                 "one class is"),
                                (torch.randn(4, 1), "have one class", "above every other")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t = mw.fit_temperatures(logits[None], labels if logits.shape[1] > 1 else torch.zeros(4, dtype=torch.long))
        messages = [str(w.message) for w in caught if "fit_temperatures" in str(w.message)]
        assert t.tolist() == [1.0]
        assert len(messages) == 1 and says in messages[0] and never not in messages[0], messages
