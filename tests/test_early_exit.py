"""Real early exit against a per-sample loop over the full forward's logits, at every batch size
and with every rule, and the host reads of its batch path counted with torch.profiler: at most one
per exit (the count that sizes the samples that continue)."""

import collections
import copy
import enum
import math
import re
import sys
import types
import warnings
from collections import namedtuple
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile

import metaweight as mw
import metaweight._early_exit
import metaweight._graphs as graphs
from conftest import tiny_net
from metaweight._graphs import _flatten_output
from metaweight._exit_rules import as_rule
from references.exit_rules import loop_assign

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from msdnet import msdnet_cifar  # noqa: E402

RULES = ["max_probability", "entropy", "margin", "patience"]
K = 4


class _Graphed(mw.EarlyExit):
    """EarlyExit with ``cuda_graphs=True`` wherever the model has stages to capture."""

    def __init__(self, model, thresholds, **options):
        options.setdefault("cuda_graphs", callable(getattr(model, "exit_stages", None)))
        super().__init__(model, thresholds, **options)

    def forward(self, *args, **kwargs):
        """Each call twice: the first makes the graphs the call needs (running the stages as they
        are), the second replays them; both give the same."""
        first = super().forward(*args, **kwargs)
        if self._graphs is None:  # (exits attached by name: no stages, nothing captured)
            return first
        again = super().forward(*args, **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(first, again)), (first, again)
        return again


class _InPlaceGraph:
    """Replays as a CUDA graph does: the tensors its capture gave are the same objects at every
    replay, written again in place (those the stage passed through as it took them are its inputs)."""

    def __init__(self, run, captured, k):
        self.run, self.captured, self.k = run, captured, k

    def replay(self):
        fresh = self.run()
        for old, new in zip(_flatten_output(self.captured, self.k)[0], _flatten_output(fresh, self.k)[0]):
            if isinstance(old, Tensor) and old is not new:
                old.copy_(new)


def _in_place_graph(device, run, k):
    warm = run()
    captured = run()
    return warm, captured, _InPlaceGraph(run, captured, k)


@pytest.fixture(autouse=True, params=["eager", "cuda_graphs", "cuda_graphs, replayed in place"])
def cuda_graphs(request, monkeypatch):
    """Every test of this module runs three times: as written; with ``EarlyExit(cuda_graphs=True)``
    (the stages run on the samples padded to a power of two, from the structure each graph keeps;
    on the CPU nothing is captured); and so again with each graph's outputs kept and written in
    place at every replay, as a CUDA graph's are (its capture replaced by :class:`_InPlaceGraph`:
    what is left untested on the CPU is torch's capture itself). Each call then runs captured
    stages where an earlier call of the test made them (``tests/test_cuda_graphs.py``)."""
    if request.param != "eager":
        monkeypatch.setattr(mw, "EarlyExit", _Graphed)
    if request.param.endswith("in place"):
        monkeypatch.setattr(graphs, "_capture_device", lambda tensors: tensors[0].device if tensors else None)
        monkeypatch.setattr(graphs, "_cuda_graph", _in_place_graph)
    return request.param != "eager"


def mlp():
    return tiny_net(K, dtype=torch.float64).eval()


def small_msdnet():
    """4 exits whose stages pass lists of feature maps (MSDNet's scales) from one to the next."""
    return msdnet_cifar(10, K, channels=4, growth_rate=2).double().eval()


def split(scores):
    """A threshold between the two middle distinct scores (so rounding moves no sample across it),
    or None when all scores are equal."""
    values = sorted(set(v for v in scores.tolist() if not math.isnan(v)))
    mid = len(values) // 2
    return (values[mid - 1] + values[mid]) / 2 if len(values) > 1 else None


def thresholds_with_every_case(scores):
    """About half the samples leave at the first exit whose scores differ, nobody at the exits
    before it, everyone still in at the next one (but a sample with NaN scores: it goes on to the
    last). Patience's first scores are all 0, so its split comes later."""
    for k in range(K - 1):
        threshold = split(scores[k])
        if threshold is not None:
            return torch.tensor([1e8] * k + [threshold] + [-1e8] * (K - 1 - k))
    raise AssertionError("no exit separates the samples: the test needs another seed")


def inputs_for(model, n):
    if isinstance(model, mw.MultiExit):
        x = torch.randn(n, 6, dtype=torch.float64) * 3
    else:
        x = torch.randn(n, 3, 32, 32, dtype=torch.float64)
    x[n // 2] = float("nan")  # a sample whose scores are all NaN: it leaves at the last exit only
    return x


@pytest.mark.parametrize("make, rule", [(mlp, rule) for rule in RULES] + [(small_msdnet, "max_probability")])
def test_early_exit_equals_a_per_sample_loop_at_every_batch_size(make, rule):
    model = make()
    x = inputs_for(model, 16)
    with torch.no_grad():
        logits = torch.stack(model(x))
    thresholds = thresholds_with_every_case(as_rule(rule).scores(logits))
    ref_exits, ref_predictions = loop_assign(rule, logits.tolist(), thresholds.tolist())
    assert len(set(ref_exits[:8] + ref_exits[9:])) == 2 and ref_exits[8] == K - 1  # mixed; NaN goes to the last
    predictor = mw.EarlyExit(model, thresholds, rule=rule)
    for size in (16, 5, 1):  # a mixed batch, small ones, and batch 1 one sample at a time
        predictions, exits = [], []
        for start in range(0, 16, size):
            if start <= 8 < start + size:  # the NaN sample would be predicted (class 0) at the last exit: refused
                with pytest.raises(ValueError, match=rf"exit {K}: \d+ NaN values, in 1 sample\(s\) predicted there"):
                    predictor(x[start:start + size])
                batch = torch.cat([x[start:8], x[9:start + size]])
                p, e = predictor(batch) if len(batch) else (torch.zeros(0), torch.zeros(0))
                p, e = p.tolist(), e.tolist()
                p[8 - start:8 - start] = [None]  # where the refused sample was
                e[8 - start:8 - start] = [K - 1]  # the loop's exit for it (checked above)
            else:
                p, e = predictor(x[start:start + size])
                p, e = p.tolist(), e.tolist()
            predictions += p
            exits += e
        assert exits == ref_exits
        assert all(r is None or p == r for p, r in zip(predictions, ref_predictions))


READS = {"tolist", "item", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"}


class _Reads(TorchFunctionMode):
    """Counts the calls that bring a tensor's values to the host (each a synchronisation on a GPU):
    ``.tolist()``, ``.item()``, ``.numpy()``, ``.cpu()``, ``bool``/``int``/``float``/``index`` of a tensor."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", None) in READS
        return func(*args, **(kwargs or {}))


def host_reads(run):
    """Host reads of ``run()``: the calls :class:`_Reads` counts, and ``aten::nonzero`` from the profiler
    (a boolean mask's indexing or ``nonzero`` sizes its output on the host; ``nonzero_static`` does not)."""
    with _Reads() as reads, profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return reads.count + sum(e.name == "aten::nonzero" for e in prof.events())


def test_early_exit_reads_the_host_at_most_once_per_exit(cuda_graphs):
    calls = 2 if cuda_graphs else 1  # (_Graphed calls twice)
    model = small_msdnet()
    x = torch.randn(32, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        scores = as_rule("max_probability").scores(torch.stack(model(x)))
    # a quarter of the samples leave at each exit: every exit selects the samples that continue
    thresholds = torch.tensor([float(scores[k].quantile(0.75)) for k in range(K - 1)] + [-1e8])
    predictor = mw.EarlyExit(model, thresholds)
    assert len(set(predictor(x)[1].tolist())) == K
    # one read per exit: how many continue (and the rows with no softmax or NaN); at the last, the refusals'
    assert host_reads(lambda: predictor(x)) == K * calls
    assert host_reads(lambda: predictor(x[:1])) <= K * calls
    # a rule that keeps earlier exits' logits for the samples still in
    model = mlp()
    x = inputs_for(model, 16)
    x = torch.cat([x[:8], x[9:]])  # without the NaN sample (refused at the last exit, where it went)
    with torch.no_grad():
        scores = as_rule("patience").scores(torch.stack(model(x)))
    thresholds = thresholds_with_every_case(scores)
    k = int((thresholds != 1e8).nonzero()[0])  # the first exit that splits the samples
    thresholds[k + 1] = split(scores[k + 1][scores[k] < thresholds[k]])  # the next splits those left: 3 exits taken
    predictor = mw.EarlyExit(model, thresholds, rule="patience")
    assert len(set(predictor(x)[1].tolist())) == 3
    assert host_reads(lambda: predictor(x)) <= K * calls


def test_early_exit_with_attached_exits_reads_the_host_at_most_once_per_exit():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 5)).double()
    attached = mw.attach_exits(body, ["1", "3"], [nn.Linear(10, 5).double(), nn.Linear(10, 5).double()]).eval()
    x = torch.randn(40, 6, dtype=torch.float64) * 3
    with torch.no_grad():
        logits = torch.stack(attached(x))
    confidence = torch.softmax(logits, -1).max(-1).values
    thresholds = torch.tensor([float(confidence[0].median()), float(confidence[1].median()), -1.0])
    predictor = mw.EarlyExit(attached, thresholds)
    predictions, exits = predictor(x)
    expected_exits, expected = mw.exit_assignment(logits, thresholds)
    assert torch.equal(exits, expected_exits) and torch.equal(predictions, expected)
    assert host_reads(lambda: predictor(x)) <= 3


def test_meta_tensors_are_refused_up_front_where_values_are_needed():
    """EarlyExit, executed costs and collect_logits/anytime_accuracy need values: a model or
    inputs on the meta device are refused with a ValueError before anything runs; the dependency
    costs (executed=False) still count on meta tensors."""
    meta = mw.MultiExit([nn.Linear(6, 6, device="meta") for _ in range(2)],
                        [nn.Linear(6, 5, device="meta") for _ in range(2)])
    real = mw.MultiExit([nn.Linear(6, 6) for _ in range(2)], [nn.Linear(6, 5) for _ in range(2)])
    x, y = torch.randn(3, 6), torch.zeros(3, dtype=torch.long)
    assert mw.exit_costs(meta, torch.randn(1, 6, device="meta")).macs == [66, 132]
    attached = mw.attach_exits(nn.Sequential(nn.Linear(6, 6, device="meta"), nn.Linear(6, 5, device="meta")), ["0"],
                               [nn.Linear(6, 5, device="meta")])
    runs = [lambda: mw.EarlyExit(meta, [0.5, 0.0]), lambda: mw.EarlyExit(attached, [0.5, 0.0]),
            lambda: mw.EarlyExit(real, [0.5, 0.0])(x.to("meta")),
            lambda: mw.exit_costs(meta, torch.randn(1, 6, device="meta"), executed=True),
            lambda: mw.exit_costs(real, torch.randn(1, 6, device="meta"), executed=True),
            lambda: mw.anytime_accuracy(real, [(x, y)], device="meta"), lambda: mw.collect_logits(meta, [(x, y)])]
    for run in runs:
        with pytest.raises(ValueError, match="meta device|device=meta"):
            run()


def calibrated_deployment():
    """A 3-exit net with over-confident heads (temperatures well above 1), a held-out batch, its
    calibration and thresholds found on the calibrated logits."""
    torch.manual_seed(0)
    net = mw.MultiExit([nn.Linear(4, 8), nn.Sequential(nn.Tanh(), nn.Linear(8, 8)),
                        nn.Sequential(nn.Tanh(), nn.Linear(8, 8))], [nn.Linear(8, 3) for _ in range(3)]).eval()
    with torch.no_grad():
        for head in net.heads:
            head.weight.mul_(8)
        x, y = torch.randn(600, 4), torch.randint(0, 3, (600,))
        z = torch.stack(net(x))
    calibration = mw.calibrate(z, y)
    return net, x, z, calibration, mw.find_thresholds(calibration.apply(z), [0.5, 0.3, 0.2])


def test_early_exit_scores_calibrated_logits_when_given_the_temperatures():
    """Thresholds found on calibrated logits deploy with the same temperatures: the exits equal
    exit_assignment on the calibrated logits of a full forward (raw scores would not)."""
    net, x, z, calibration, thresholds = calibrated_deployment()
    expected_exits, expected_classes = mw.exit_assignment(calibration.apply(z), thresholds)
    with torch.no_grad():
        for given in (calibration, calibration.temperatures):
            predictions, exits = mw.EarlyExit(net, thresholds, temperatures=given)(x)
            assert torch.equal(exits, expected_exits) and torch.equal(predictions, expected_classes)
        raw = mw.EarlyExit(net, thresholds)(x)[1]
    assert not torch.equal(raw, expected_exits)
    for bad in ([1.0, 2.0], [1.0, 0.0, 1.0], "warm"):
        with pytest.raises(ValueError, match="temperatures"):
            mw.EarlyExit(net, thresholds, temperatures=bad)


def test_state_dict_keeps_the_temperatures_and_rule_the_thresholds_were_fitted_with(tmp_path):
    """A predictor saved with state_dict() and loaded into one built without temperatures predicts
    as the saved one: the exits equal exit_assignment on the calibrated logits (the raw scores'
    exits differ). A state of another rule, or with temperatures that do not fit, is refused
    before the thresholds change; a state saved without the extra state loads the thresholds."""
    net, x, z, calibration, thresholds = calibrated_deployment()
    expected_exits, expected_classes = mw.exit_assignment(calibration.apply(z), thresholds)
    torch.save(mw.EarlyExit(net, thresholds, temperatures=calibration).state_dict(), tmp_path / "predictor.pt")
    state = torch.load(tmp_path / "predictor.pt", weights_only=True)  # plain numbers and names: safe to load
    loaded = mw.EarlyExit(net, [0.0, 0.0, 0.0])
    loaded.load_state_dict(state)
    with torch.no_grad():
        predictions, exits = loaded(x)
        assert torch.equal(exits, expected_exits) and torch.equal(predictions, expected_classes)
        assert not torch.equal(mw.EarlyExit(net, thresholds)(x)[1], expected_exits)
    assert loaded.temperatures == pytest.approx(calibration.temperatures)

    given = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)  # the buffer's dtype and device: no cast
    wrong_rule, untouched = mw.EarlyExit(net, given, rule="entropy"), given.clone()
    with pytest.raises(ValueError, match="saved with rule 'max_probability'.*rule='max_probability'"):
        wrong_rule.load_state_dict(state)
    bad = dict(state, _extra_state={"rule": "max_probability", "temperatures": [1.0, -2.0, 1.0]})
    nan = dict(state, thresholds=torch.tensor([float("nan"), 0.3, 0.0]))  # the constructor refuses it too
    partial = {"thresholds": state["thresholds"]}  # (torch copies what it can before refusing a strict load)
    weights = [p.detach().clone() for p in net.parameters()]
    for target, loaded_state, error in ((wrong_rule, state, "left as it was"), (mw.EarlyExit(net, given), bad, "left"),
                                        (mw.EarlyExit(net, given), nan, "left as it was"),
                                        (mw.EarlyExit(net, given), partial, "Missing key")):
        with pytest.raises(RuntimeError if error == "Missing key" else ValueError, match=error):
            target.load_state_dict(loaded_state)
        assert torch.equal(target.thresholds, untouched) and target.temperatures is None
    assert all(torch.equal(a, b) for a, b in zip(weights, net.parameters()))
    mw.EarlyExit(net, given).load_state_dict(state)
    assert torch.equal(given, untouched), "the caller's thresholds tensor is not the predictor's buffer"

    older = mw.EarlyExit(net, [0.0, 0.0, 0.0], temperatures=[2.0, 2.0, 2.0])
    older.load_state_dict({key: value for key, value in state.items() if key != "_extra_state"})
    assert torch.equal(older.thresholds, thresholds.to(older.thresholds)) and older.temperatures == [2.0] * 3


class MaskedForward(nn.Module):
    """A multi-exit model whose forward takes ``(x, mask=None)``, stages and heads from MultiExit."""

    def __init__(self):
        super().__init__()
        self.net = mw.MultiExit([nn.Linear(4, 4), nn.Linear(4, 4)], [nn.Linear(4, 3), nn.Linear(4, 3)])

    def forward(self, x, mask=None):
        return self.net(x)

    def exit_stages(self):
        return self.net.exit_stages()


def test_inputs_the_forward_cannot_take_are_refused_saying_how_inputs_are_passed():
    """A dict whose keys are not the forward's parameters, or a tuple, handed to a forward (or a
    stage 1) annotated to take a Tensor: a TypeError that names the input, the forward and how
    inputs are passed, before anything runs; not torch's `linear(): ... must be Tensor, not dict`."""
    torch.manual_seed(0)
    masked, net = MaskedForward().eval(), mw.MultiExit([nn.Linear(4, 4)] * 2, [nn.Linear(4, 3)] * 2).train()
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    before = [copy.deepcopy(m.state_dict()) for m in (masked, net)]
    cases = [
        (lambda: mw.EarlyExit(masked, [0.5, 0.0])({"inp": x}), r"dict with keys \['inp'\].*`Linear.forward\(input"),
        (lambda: mw.EarlyExit(net, [0.5, 0.0])({"inp": x}), r"dict with keys \['inp'\].*`MultiExit.forward\(x"),
        (lambda: mw.exit_costs(net, (x, x)), r"exit_costs was given a tuple of 2.*`MultiExit.forward\(x"),
        (lambda: mw.exit_costs(net, (x, x), executed=True), r"tuple of 2.*`MultiExit.forward\(x"),
        (lambda: mw.collect_logits(net, [((x, x), y)]), r"collect_logits was given a tuple of 2"),
    ]
    for call, match in cases:
        with pytest.raises(TypeError, match=match) as info:
            call()
        assert "passed as keyword arguments" in str(info.value) and "takes a Tensor there" in str(info.value)
    for model, state in zip((masked, net), before):
        assert all(torch.equal(a, b) for a, b in zip(state.values(), model.state_dict().values()))
    assert not masked.training and net.training and all(m.training for m in net.modules())
    # what the forward does take still runs, and agrees with the tensor itself
    for model in (masked, net):
        expected = mw.EarlyExit(model, [0.5, 0.0])(x)
        for got in (mw.EarlyExit(model, [0.5, 0.0])({"x": x}), mw.EarlyExit(model, [0.5, 0.0])(x=x)):
            assert all(torch.equal(a, b) for a, b in zip(got, expected))


class _Output(dict):
    """A stage's output read by attribute, as Hugging Face's ``ModelOutput`` is."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class _AttributeStage(nn.Module):
    def __init__(self, first):
        super().__init__()
        self.linear, self.first = nn.Linear(5 if first else 6, 6), first

    def forward(self, f):
        hidden = self.linear(f if self.first else f.hidden * f.mask)  # by attribute: a plain dict has none
        return _Output(hidden=torch.tanh(hidden), mask=torch.ones(1, 6))


class _AttributeHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 3)

    def forward(self, f):
        return self.linear(f.hidden)


def test_dict_features_keep_their_type_when_samples_leave():
    """Features in a dict subclass read by attribute (a ModelOutput): selected in their own type, so
    a batch where some samples leave agrees with a per-sample loop; it raised AttributeError on the
    plain dict the selection made, while batches of one (nothing selected) ran."""
    torch.manual_seed(0)
    net = mw.MultiExit([_AttributeStage(k == 0) for k in range(3)], [_AttributeHead() for _ in range(3)]).eval()
    x = torch.randn(40, 5)
    with torch.no_grad():
        logits = torch.stack(net(x))
    thresholds = mw.find_thresholds(logits, mw.geometric_exit_distribution(1.0, 3))
    exits, predictions = loop_assign("max_probability", logits.tolist(), thresholds.tolist())
    got = mw.EarlyExit(net, thresholds)(x)
    assert sorted(set(exits)) == [0, 1, 2]  # samples leave at every exit: the features are selected twice
    assert got.exits.tolist() == exits and got.predictions.tolist() == predictions


def test_inputs_without_a_tensor_are_refused_naming_what_came_not_an_internal_type():
    """A NumPy batch (or keywords without a tensor): the TypeError names the inputs' types and says
    to pass tensors, never the library's internal ``ModelCall``; the model is left as it was."""
    torch.manual_seed(0)
    net = mw.MultiExit([nn.Linear(4, 4)] * 2, [nn.Linear(4, 3)] * 2).train()
    x = torch.randn(5, 4)
    before = copy.deepcopy(net.state_dict())
    predictor = mw.EarlyExit(net, [0.4, 0.0])
    for call, found in ((lambda: predictor(x.numpy()), r"\(ndarray\)"), (lambda: predictor(x=x.tolist()), r"\(x=list\)")):
        with pytest.raises(TypeError, match=found + r".*torch\.as_tensor") as info:
            call()
        assert "ModelCall" not in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before.values(), net.state_dict().values()))
    assert all(m.training for m in net.modules())
    with torch.no_grad():
        expected = mw.exit_assignment(torch.stack(net.eval()(x)), [0.4, 0.0])
    got = predictor(torch.as_tensor(x.numpy()))
    assert torch.equal(got.exits, expected.exits) and torch.equal(got.predictions, expected.predictions)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_calibrated_half_precision_logits_score_alike_in_find_thresholds_and_early_exit(dtype):
    """The documented recipe on a half-precision model: find_thresholds(calibration.apply(z)) then
    EarlyExit(temperatures=calibration). apply divided in bfloat16 and EarlyExit in float32 (58 of
    20,000 samples left at another exit); both now divide with one rule, in float32."""
    torch.manual_seed(0)
    net = mw.MultiExit([nn.Linear(4, 16), nn.Sequential(nn.Tanh(), nn.Linear(16, 16)),
                        nn.Sequential(nn.Tanh(), nn.Linear(16, 16))], [nn.Linear(16, 10) for _ in range(3)]).eval()
    with torch.no_grad():
        for k, head in enumerate(net.heads):
            head.weight.mul_(6 * (k + 1))
        net = net.to(dtype)
        x = torch.randn(4000, 4, dtype=dtype)
        z = torch.stack(net(x))
    y = torch.randint(0, 10, (4000,))
    y[:2000] = z[2, :2000].argmax(-1)
    calibration = mw.calibrate(z, y)
    applied = calibration.apply(z)
    assert applied.dtype == torch.float32
    thresholds = mw.find_thresholds(applied, [0.4, 0.3, 0.3])
    expected_exits, expected_classes = mw.exit_assignment(applied, thresholds)
    with torch.no_grad():
        predictions, exits = mw.EarlyExit(net, thresholds, temperatures=calibration)(x)
    differ = (exits != expected_exits).nonzero().flatten()
    # at most a tie: a stage run on a sub-batch rounding a logit in the last bit (see EarlyExit)
    scores = mw.MaxProbability().scores(applied)
    for n in differ.tolist():
        k = int(min(exits[n], expected_exits[n]))
        assert abs(float(scores[k, n]) - float(thresholds[k])) < 1e-6
    assert differ.numel() <= 2
    same = exits == expected_exits
    assert torch.equal(predictions[same], expected_classes[same])


def test_thresholds_use_float32_on_a_device_without_float64(monkeypatch):
    """MPS has no float64: EarlyExit converted its thresholds to float64 on the model's device (a
    TypeError there, reported as "`thresholds` should be K numbers"), and .to() kept them float64.
    One helper (decision_dtype) decides for EarlyExit and reaches; monkeypatched to say the CPU
    lacks float64, the thresholds are float32, and a device problem is not blamed on them."""
    from metaweight import _exit_rules
    net = tiny_net(num_exits=2).eval()
    monkeypatch.setattr(_exit_rules, "supports_float64", lambda device: False)
    predictor = mw.EarlyExit(net, [0.5, 0.0])
    assert predictor.thresholds.dtype == torch.float32
    assert predictor.to("cpu").thresholds.dtype == torch.float32
    assert predictor.double().thresholds.dtype == torch.float32  # a cast never changes them
    x = torch.randn(8, 6, dtype=torch.float64)
    assert predictor(x)[1].shape == (8,)
    monkeypatch.undo()
    assert predictor.to("cpu").thresholds.dtype == torch.float64  # back where float64 exists
    assert predictor.half().thresholds.dtype == torch.float64
    assert mw.EarlyExit(net, torch.tensor([0.5, 0.0])).thresholds.dtype == torch.float64


def test_temperatures_accept_numpy_numbers_and_arrays_as_tensors_are():
    np = pytest.importorskip("numpy")
    net = tiny_net(num_exits=2).eval()
    for given in (np.array([1.5, 2.0]), list(np.array([1.5, 2.0], np.float32)), torch.tensor([1.5, 2.0]),
                  (np.float64(1.5), 2)):
        assert mw.EarlyExit(net, [0.5, 0.0], temperatures=given).temperatures == [1.5, 2.0]
    for bad in (np.array([1.5, np.nan]), np.array([[1.5, 2.0]]), [np.True_, 2.0], np.array(["a", "b"])):
        with pytest.raises(ValueError, match="temperatures"):
            mw.EarlyExit(net, [0.5, 0.0], temperatures=bad)


class _MaskLargeFirstFeature(nn.Module):
    """A head that masks every class (all -inf) of each sample whose first feature is over 10."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, h):
        return self.fc(h).masked_fill((h[:, 0] > 10)[:, None], -math.inf)


@pytest.mark.parametrize("attached", [False, True])
def test_a_sample_that_left_is_not_refused_for_a_later_exit_with_no_softmax(attached):
    """Sample 0 leaves at exit 1; exit 2 masks all its classes. Attached exits compute exit 2 for
    every sample, but only those that reach it count: predicted, as MultiExit predicts it. Once
    sample 0 reaches exit 2, both refuse it."""
    torch.manual_seed(0)
    first, second = nn.Linear(3, 3, bias=False), _MaskLargeFirstFeature()
    first.weight.data = torch.eye(3)
    x = torch.randn(4, 3)
    x[0] = torch.tensor([50.0, -50.0, 0.0])  # confident at exit 1, masked at exit 2
    if attached:
        model = mw.attach_exits(nn.Sequential(nn.Identity(), second), ["0"], heads=[first], example_input=x)
    else:
        model = mw.MultiExit([nn.Identity(), nn.Identity()], [first, second])
    predictions, exits = mw.EarlyExit(model, [0.999, 0.0])(x)
    assert exits.tolist() == [0, 1, 1, 1] and predictions[0].item() == 0
    with pytest.raises(ValueError, match=r"Exit 2 gave 1 sample\(s\) logits that are all -inf"):
        mw.EarlyExit(model, [2.0, 0.0])(x)  # nobody leaves at exit 1: sample 0 reaches exit 2


class _Lookup(nn.Module):
    """Exit ``k``'s head: the logits ``table[k]`` of the samples whose indices the features carry."""

    def __init__(self, table, k):
        super().__init__()
        self.table, self.k = table, k

    def forward(self, index):
        return self.table[self.k][index[:, 0].long()]


def _lookup_model(table):
    K = table.shape[0]
    return mw.MultiExit([nn.Identity() for _ in range(K)], [_Lookup(table, k) for k in range(K)])


@pytest.mark.parametrize("rule", sorted(__import__("metaweight._exit_rules", fromlist=["RULES"]).RULES))
def test_rows_after_the_exit_a_sample_takes_are_never_judged_as_early_exit_never_computes_them(rule):
    """exit_assignment and evaluate_thresholds see every sample at every exit; EarlyExit computes an exit
    only for the samples still in. A row with no softmax (all -inf) after the exit a sample takes must
    not refuse it; one at an exit the sample reaches is refused by both."""
    g = torch.Generator().manual_seed(3)
    K, N, C = 4, 96, 5
    clean = torch.randn(K, N, C, generator=g, dtype=torch.float64) * 2
    clean += 1.5 * torch.nn.functional.one_hot(torch.randint(0, C, (N,), generator=g), C)  # exits often agree
    thresholds = (torch.tensor([1.0, 1.0, 1.0, 0.0]) if rule == "patience" else  # leave once two exits agree
                  mw.find_thresholds(clean, mw.geometric_exit_distribution(1.0, K), rule=rule))
    exits, predictions = mw.exit_assignment(clean, thresholds, rule=rule)
    assert 0 < int((exits < K - 1).sum()) and exits.unique().numel() > 2  # samples leave at several exits
    logits = clean.clone()
    after = torch.arange(K)[:, None] > exits[None]
    chosen = after & (torch.rand(K, N, generator=g) < 0.7)
    logits[chosen] = -math.inf  # whole rows: no softmax, at exits those samples never reach
    assert int(chosen.sum()) > N // 4
    index = torch.arange(N, dtype=torch.float64)[:, None]
    got_exits, got_predictions = mw.exit_assignment(logits, thresholds, rule=rule)
    ee_predictions, ee_exits = mw.EarlyExit(_lookup_model(logits), thresholds, rule=rule)(index)
    assert torch.equal(got_exits, exits) and torch.equal(got_predictions, predictions)
    assert torch.equal(ee_exits, exits) and torch.equal(ee_predictions, predictions)
    labels = torch.randint(0, C, (N,), generator=g)
    costs = [1.0, 2.0, 3.0, 4.0]
    assert mw.evaluate_thresholds(logits, labels, thresholds, costs, rule=rule) == \
        mw.evaluate_thresholds(clean, labels, thresholds, costs, rule=rule)
    # a row with no softmax at an exit the sample reaches (the one it takes, or one before): both refuse
    late = int((exits == K - 1).nonzero()[0])
    for k, n in ((int(exits[0]), 0), (0, late), (K - 1, late)):
        bad = logits.clone()
        bad[k, n] = -math.inf
        with pytest.raises(ValueError, match="no softmax"):
            mw.exit_assignment(bad, thresholds, rule=rule)
        with pytest.raises(ValueError, match="no softmax"):
            mw.evaluate_thresholds(bad, labels, thresholds, costs, rule=rule)
        with pytest.raises(ValueError, match="no softmax"):
            mw.EarlyExit(_lookup_model(bad), thresholds, rule=rule)(index)


class TwoArguments(nn.Module):
    """forward(x, mask): two required parameters, neither annotated."""

    def __init__(self):
        super().__init__()
        self.net = mw.MultiExit([nn.Linear(4, 4), nn.Linear(4, 4)], [nn.Linear(4, 3), nn.Linear(4, 3)])

    def forward(self, x, mask):
        return self.net(x * mask)


def test_inputs_a_forward_of_two_arguments_cannot_take_alone_are_refused_naming_the_dict_to_pass():
    """forward(x, mask) given the batch ((x, mask), y), [x, mask], or a dict with a key the forward does not
    take: Python's bare "forward() missing 1 required positional argument: 'mask'" from inside the model
    (after the weighter had begun its step); now a TypeError before anything runs, naming the dict to pass."""
    torch.manual_seed(0)
    model = TwoArguments()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(2), mw.BalancedValidation(2))
    x, mask, y = torch.randn(6, 4), torch.ones(6, 4), torch.randint(0, 3, (6,))
    before = copy.deepcopy((model.state_dict(), optimizer.state_dict(), w.state_dict()))
    for inputs in [(x, mask), [x, mask], {"x": x, "mask": mask, "scale": 2.0}]:
        for call, who in [(lambda: w.step((inputs, y), (inputs, y)), "metaweight"),
                          (lambda: mw.collect_logits(model, [(inputs, y)]), "collect_logits"),
                          (lambda: mw.exit_costs(model, inputs), "exit_costs")]:
            with pytest.raises(TypeError, match=rf"{who} was given .*`TwoArguments.forward\(x, mask\)`, which cannot "
                                                r"take it alone .*'mask'.*\{'x': \.\.\., 'mask': \.\.\.\}|"
                                                r"keys \['x', 'mask', 'scale'\].*\['scale'\].*cannot take it alone"):
                call()
    after = (model.state_dict(), optimizer.state_dict(), w.state_dict())
    assert repr(before) == repr(after) and w.num_calls == 0
    # the dict of the forward's keyword parameters runs, and agrees with the call by hand
    record = w.step(({"x": x, "mask": mask}, y), ({"x": x, "mask": mask}, y))
    assert record.meta_step == 1
    with torch.no_grad():
        expected = torch.stack(model(x, mask))
    assert torch.equal(mw.collect_logits(model, [({"x": x, "mask": mask}, y)])[0], expected)


@pytest.mark.parametrize("attached", [False, True])
def test_early_exit_refuses_a_sample_it_would_predict_from_nan_logits(attached):
    """A NaN input gives NaN logits at every exit; a NaN score never leaves, so the sample reached the
    last exit, which takes everyone, and EarlyExit returned class 0 for it (the argmax of NaN), as it
    refuses an all -inf row "rather than guess". Refused now, naming the exit and the count; the
    other samples are predicted as exit_assignment predicts them (the reference of the tests above)."""
    torch.manual_seed(0)
    if attached:
        body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        model = mw.attach_exits(body, ["1"], [nn.Linear(8, 3)]).eval()
    else:
        model = mw.MultiExit([nn.Linear(4, 8), nn.Linear(8, 8)], [nn.Linear(8, 3), nn.Linear(8, 3)]).eval()
    x = torch.randn(5, 4)
    x[2, 0] = float("nan")
    predictor = mw.EarlyExit(model, [2.0, 0.0])  # nobody leaves at exit 1: all predicted at exit 2
    with pytest.raises(ValueError, match=r"^The exit logits of `\w+` hold NaN logits \(exit 2: 3 NaN values, in 1 "
                                         r"sample\(s\) predicted there\), and EarlyExit .*leave those samples out"):
        predictor(x)
    kept = x[[0, 1, 3, 4]]
    predictions, exits = predictor(kept)
    with torch.no_grad():
        logits = torch.stack(model(kept))
    assert exits.tolist() == [1] * 4 and predictions.tolist() == logits[1].argmax(-1).tolist()
    if not attached:  # a sample with NaN only at an exit it goes on from is predicted from the next one
        x[2, 0] = 0.0
        assert predictor(x)[1].tolist() == [1] * 5


# ------------------------------------------------------- what is per sample in inputs and features
def per_sample_reference(model, calls, thresholds):
    """Exits and predictions from the full model run on each sample alone (``calls``: one model call
    per sample), assigned by the plain loop: no batch, so nothing to select."""
    with torch.no_grad():
        logits = torch.stack([torch.stack(call(model)) for call in calls], 1)[:, :, 0]  # [K, N, C]
    return loop_assign("max_probability", logits.tolist(), thresholds.tolist())


def leave_in_thirds(model, x):
    """Thresholds sending a third of the samples out at exit 1 and half the rest at exit 2 (of 3),
    each halfway between two distinct scores, from a full forward."""
    with torch.no_grad():
        scores = as_rule("max_probability").scores(torch.stack(model(x)))
    n = x.shape[0]
    one = scores[0].sort(descending=True).values
    t1 = float(one[n // 3 - 1] + one[n // 3]) / 2
    rest = scores[1][scores[0] < t1].sort(descending=True).values
    m = rest.numel() // 2
    return torch.tensor([t1, float(rest[m - 1] + rest[m]) / 2, -1.0], dtype=torch.float64)


class _Extras(nn.Module):
    """A stage returning ``(h, extra)``; the next reads ``extra`` where it is a tensor (a table to
    sum, a mask to broadcast), as a transformer layer reads its mask or position table."""

    def __init__(self, make_extra, first):
        super().__init__()
        self.linear = nn.Linear(5 if first else 6, 6).double()
        self.make_extra, self.first = make_extra, first
        self.table = nn.Parameter(torch.randn(24, 6, dtype=torch.float64))  # as many rows as the batch

    def forward(self, f):
        h, extra = (f, None) if self.first else (f[0], f[1])
        if isinstance(extra, tuple):  # a namedtuple: read its field
            extra = extra.rows
        if isinstance(extra, dict):
            extra = extra["rows"]
        if isinstance(extra, Tensor) and extra.dim() > 0:
            h = h + extra.sum(0) if extra.shape[0] != 1 else h * extra
        out = torch.tanh(self.linear(h))
        return out, (self.make_extra(self) if self.first else f[1])  # extras are made once, carried on


_Rows = namedtuple("_Rows", "rows")


_EXTRAS = {
    "None": lambda s: None,
    "int": lambda s: 7,
    "str": lambda s: "tokens",
    "0-d tensor": lambda s: torch.tensor(2.0, dtype=torch.float64),
    "broadcast mask [1, H]": lambda s: torch.ones(1, 6, dtype=torch.float64) * 0.5,
    "parameter with the batch's rows": lambda s: s.table,
    "table made once, rows = samples left after exit 1": lambda s: s.table[:16] * 0.1,
    "namedtuple of a table": lambda s: _Rows(s.table[:16] * 0.1),
    "dict of a table": lambda s: {"rows": s.table[:16] * 0.1, "note": None},
}


@pytest.mark.parametrize("extra", list(_EXTRAS))
def test_features_that_are_not_per_sample_pass_on_unchanged(extra):
    """A stage's features beside the per-sample tensor: non-tensors were refused, a [1, H] mask gave a
    bare IndexError, and a table with as many rows as the samples in the network was indexed by
    sample as if batch-first (predictions differing from the full forward, no error). Now only
    per-sample tensors are selected: exits and predictions equal the model run on each sample alone.
    The table of 16 rows is carried from stage 1: 16 samples are in the network when exit 2 selects."""
    torch.manual_seed(0)
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(6, 4).double()

        def forward(self, f):
            return self.linear(f[0]) * 3

    stages = [_Extras(_EXTRAS[extra], first=(k == 0)) for k in range(3)]
    model = mw.MultiExit(stages, [Head() for _ in range(3)]).eval()
    x = torch.randn(24, 5, dtype=torch.float64)
    thresholds = leave_in_thirds(model, x)
    ref_exits, ref_predictions = per_sample_reference(model, [lambda m, i=i: m(x[i:i + 1]) for i in range(24)],
                                                      thresholds)
    assert ref_exits.count(0) == 8 and ref_exits.count(1) == 8  # 16 in at exit 2, which selects 8
    predictions, exits = mw.EarlyExit(model, thresholds)(x)
    assert exits.tolist() == ref_exits and predictions.tolist() == ref_predictions


class _ScaleFirst(nn.Module):
    """A stage 1 taking the model's two inputs, a scale (0-d, [1] or a [10] table) before the batch."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(5, 6).double()

    def forward(self, scale, x):
        return torch.tanh(self.linear(x) * scale.sum())


class _ScaleFirstNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([_ScaleFirst(), nn.Sequential(nn.Linear(6, 6), nn.Tanh()).double(),
                                     nn.Sequential(nn.Linear(6, 6), nn.Tanh()).double()])
        self.heads = nn.ModuleList([nn.Linear(6, 4).double() for _ in range(3)])

    def exit_stages(self):
        return list(self.stages), list(self.heads)

    def forward(self, scale, x):
        h, out = self.stages[0](scale, x), []
        for k, head in enumerate(self.heads):
            h = h if k == 0 else self.stages[k](h)
            out.append(head(h))
        return out


@pytest.mark.parametrize("scale", [torch.tensor(2.0), torch.tensor([2.0]), torch.full((10,), 0.2)],
                         ids=["0-d", "[1]", "[10]"])
@pytest.mark.parametrize("call", ["positional", "dict, scale first", "keywords"])
def test_the_batch_is_the_samples_of_exit_1_whatever_the_order_of_the_inputs(scale, call):
    """The batch was the first dimension of the first tensor of the inputs: a 0-d scale before it gave
    a bare IndexError, a [1] one a 'put the batch first' error. Now the batch is the rows of exit 1's
    logits (stage 1 and head 1 see every sample), found as the first dimension of an input; at
    batch 1 too, beside a [10] input."""
    torch.manual_seed(0)
    model = _ScaleFirstNet().eval()
    scale = scale.double()
    x = torch.randn(24, 5, dtype=torch.float64)
    with torch.no_grad():
        scores = as_rule("max_probability").scores(torch.stack(model(scale, x)))
    thresholds = torch.tensor([split(scores[0]), split(scores[1]), -1.0], dtype=torch.float64)
    ref_exits, ref_predictions = per_sample_reference(
        model, [lambda m, i=i: m(scale, x[i:i + 1]) for i in range(24)], thresholds)
    assert len(set(ref_exits)) == 3
    predictor = mw.EarlyExit(model, thresholds)
    for size in (24, 1):
        got_exits, got_predictions = [], []
        for start in range(0, 24, size):
            batch = x[start:start + size]
            p, e = {"positional": lambda: predictor(scale, batch),
                    "dict, scale first": lambda: predictor({"scale": scale, "x": batch}),
                    "keywords": lambda: predictor(scale=scale, x=batch)}[call]()
            got_exits += e.tolist()
            got_predictions += p.tolist()
        assert got_exits == ref_exits and got_predictions == ref_predictions


def test_inputs_without_the_batch_first_are_refused_saying_what_was_found():
    model = _ScaleFirstNet().eval()
    predictor = mw.EarlyExit(model, [0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match=r"only 0-d tensors \(2\)"):
        predictor(torch.tensor(2.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    # a batch of 6 in the second dimension: exit 1 has 6 rows, no input has 6 in its first dimension
    class Transposed(_ScaleFirst):
        def forward(self, scale, x):
            return super().forward(scale, x.T)

    model.stages[0] = Transposed().double()
    with pytest.raises(ValueError, match=r"for 6 samples and no tensor of the inputs has 6 as its first dimension "
                                         r"\(found \(\), \(5, 6\)\).*batch_first=True"):
        predictor(torch.tensor(2.0, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64))


class _Holder:
    def __init__(self, h):
        self.h = h


class _Wraps(nn.Module):
    def __init__(self, wrap):
        super().__init__()
        self.linear, self.wrap = nn.Linear(4, 4), wrap

    def forward(self, f):
        h = f if isinstance(f, Tensor) else f.h if isinstance(f, _Holder) else \
            torch.nn.utils.rnn.pad_packed_sequence(f, batch_first=True)[0][:, 0]
        h = torch.tanh(self.linear(h))
        return self.wrap(h)


class _HeadOf(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, f):
        h = f if isinstance(f, Tensor) else f.h if isinstance(f, _Holder) else \
            torch.nn.utils.rnn.pad_packed_sequence(f, batch_first=True)[0][:, 0]
        return self.linear(h)


@pytest.mark.parametrize("wrap, match", [
    (_Holder, r"Stage 1 returned a `_Holder` \(features\) holding tensors whose first dimension is the number of "
              r"samples in the network \(8\).*tuple, list or dict"),
    (lambda h: torch.nn.utils.rnn.pack_sequence(list(h[:, None])), r"Stage 1 returned a PackedSequence.*padded"),
])
def test_features_whose_samples_cannot_be_selected_are_refused_naming_them(wrap, match, cuda_graphs):
    """Per-sample tensors inside an object EarlyExit does not look into, or interleaved in a
    PackedSequence, would go on with the samples that left (a PackedSequence's `sorted_indices`,
    [batch], would be selected alone): refused with a TypeError naming what to return instead."""
    torch.manual_seed(0)
    model = mw.MultiExit([_Wraps(wrap) for _ in range(2)], [_HeadOf() for _ in range(2)]).eval()
    x = torch.randn(8, 4)
    with torch.no_grad():
        scores = as_rule("max_probability").scores(torch.stack(model(x)))
    if cuda_graphs and wrap is _Holder:  # refused where the first graph is made, before any sample leaves
        match = r"cuda_graphs=True\): stage 1's features is a `_Holder`.*tuples, lists or dicts"
    with pytest.raises(TypeError, match=match):
        mw.EarlyExit(model, [float(scores[0].median()), 0.0])(x)



@dataclass
class _Held:
    scale: object


@dataclass(slots=True)
class _Slotted:
    scale: object


class _SlotBase:
    __slots__ = ("scale",)


class _SlotChild(_SlotBase):  # the slot is its base class's
    __slots__ = ("other",)

    def __init__(self, scale):
        self.scale = scale


class _Cyclic:
    def __init__(self, scale):
        self.scale, self.me = scale, self


class _Tagged(list):  # a list subclass: its items are selected, an attribute is not
    pass


class _Mapping(Mapping):  # a Mapping that is not a dict: selected as one
    def __init__(self, items):
        self._items = dict(items)

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)


class _Proxy:  # slots only, and a __getattr__ that raises for any other name (`__dict__` included)
    __slots__ = ("scale",)

    def __init__(self, scale):
        self.scale = scale

    def __getattr__(self, name):
        raise RuntimeError(f"no {name}")


def _tagged(scale):
    tagged = _Tagged([0])
    tagged.scale = scale
    return tagged


# how each kind of object holds the per-sample scale, how the next stage reads it, and where the refusal finds it
# (None: EarlyExit selects its samples itself, so the predictions are exit_assignment's)
_HOLDERS = {
    "dataclass": (_Held, lambda w: w.scale, ".scale"),
    "dataclass(slots=True)": (_Slotted, lambda w: w.scale, ".scale"),
    "a base class's __slots__": (_SlotChild, lambda w: w.scale, ".scale"),
    "an object in an object": (lambda t: _Held(_Held(t)), lambda w: w.scale.scale, ".scale.scale"),
    "a dict in an object": (lambda t: _Held({"s": t}), lambda w: w.scale["s"], ".scale['s']"),
    "a list in an object": (lambda t: _Held([t]), lambda w: w.scale[0], ".scale[0]"),
    "a deque": (lambda t: collections.deque([t]), lambda w: w[0], "[0]"),
    "a set": (lambda t: {t}, lambda w: next(iter(w)), "[0]"),
    "a frozenset": (lambda t: frozenset([t]), lambda w: next(iter(w)), "[0]"),
    "an object in a deque": (lambda t: collections.deque([_Slotted(t)]), lambda w: w[0].scale, "[0].scale"),
    "an attribute of a list subclass": (_tagged, lambda w: w.scale, ".scale"),
    "a cycle": (_Cyclic, lambda w: w.scale, ".scale"),
    "an object whose __getattr__ raises": (_Proxy, lambda w: w.scale, ".scale"),
    "a Mapping that is not a dict": (lambda t: _Mapping({"s": t}), lambda w: w["s"], None),
}


class _ScaleStage(nn.Module):
    """Stage 1 hands on its features and a per-sample scale held as ``wrap`` holds it; later stages
    scale by it and hand it on."""

    def __init__(self, wrap, unwrap, first):
        super().__init__()
        self.linear, self.wrap, self.unwrap, self.first = nn.Linear(4, 4), wrap, unwrap, first

    def forward(self, f):
        if self.first:
            return torch.tanh(self.linear(f)), self.wrap(f[:, :1].abs() + 1)
        h, held = f
        return torch.tanh(self.linear(h)) * self.unwrap(held)[: h.shape[0]], held


class _ScaleHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, f):
        return self.linear(f[0])


def _scale_case(wrap, unwrap):
    """A 3-exit model of _ScaleStage (stage 1 hands on ``wrap(scale)``, later stages read ``unwrap(held)``), 12
    inputs, thresholds sending half the samples out at exit 1, and exit_assignment's answer for them."""
    model = mw.MultiExit([_ScaleStage(wrap, unwrap, k == 0) for k in range(3)],
                         [_ScaleHead() for _ in range(3)]).double().eval()
    x = torch.randn(12, 4, dtype=torch.float64)
    with torch.no_grad():
        logits = torch.stack(model(x))
    thresholds = mw.find_thresholds(logits, [0.5, 0.25, 0.25])
    return model, x, thresholds, mw.exit_assignment(logits, thresholds)


@pytest.mark.parametrize("kind", list(_HOLDERS))
def test_a_per_sample_tensor_held_in_any_object_is_refused_or_selected(kind, cuda_graphs):
    """A per-sample tensor in an object EarlyExit does not select in (a dataclass, with slots or not,
    an object in an object, a deque, a set, an attribute, a cycle) went on with the samples that left,
    where only an object's own __dict__ was looked at: the next stage read other samples' rows and 1
    of 12 exits differed from exit_assignment's, with no sign. At any depth of any of them it is
    refused naming where it is; what EarlyExit selects itself (a Mapping) equals exit_assignment."""
    wrap, unwrap, where = _HOLDERS[kind]
    torch.manual_seed(0)
    model, x, thresholds, expected = _scale_case(wrap, unwrap)
    assert 0 < int((expected.exits == 0).sum()) < 12  # samples leave at exit 1, others go on
    if where is None:
        predictions, exits = mw.EarlyExit(model, thresholds)(x)
        assert torch.equal(exits, expected.exits) and torch.equal(predictions, expected.predictions)
        return
    match = ("cuda_graphs=True\\): stage 1's features\\[1\\] is a" if cuda_graphs else
             f"Stage 1 returned a `.*` \\(features\\[1\\]\\) holding tensors whose first dimension is the number "
             f"of samples in the network \\(12\\): {re.escape('features[1]' + where)} \\(12, 1\\)")
    with pytest.raises(TypeError, match=match):
        mw.EarlyExit(model, thresholds)(x)


class _Colour(enum.Enum):
    RED = 1


def test_an_object_too_large_to_look_into_is_refused_and_one_holding_no_per_sample_tensor_goes_on(cuda_graphs):
    """An object between stages is looked into up to HIDDEN_WALK_LIMIT values that could hold a tensor
    (objects, containers, tensors): a larger one is refused (it could hide a per-sample tensor), one
    holding tensors that are not per sample (a parameter, a table of another first dimension) goes
    on, and the predictions are exit_assignment's. Atoms are not counted: a vocabulary of more than
    HIDDEN_WALK_LIMIT strings and numbers (GPT-2's has 50,257 entries, keys and values 100,514
    values) goes on; it was refused as too large to check, and below the limit the walk took 4 times
    as long as the whole call did before it. With cuda_graphs every one is refused, as any object
    that is not a tuple, list or dict."""
    torch.manual_seed(0)
    limit = mw._early_exit.HIDDEN_WALK_LIMIT
    table = torch.randn(5, 1, dtype=torch.float64)
    held = {"big": (lambda t: _Held([_Held(i) for i in range(limit + 1)]), None),
            "no per-sample tensor": (lambda t: _Cyclic((table, nn.Parameter(torch.ones(12, 1)))),
                                     lambda w: w.scale[0][:1]),
            "a vocabulary": (lambda t: _Held({"vocab": {f"tok{i}": i for i in range(limit + 1)},
                                              "atoms": [None, 1.5, b"x", 2j, _Colour.RED, torch.float64,
                                                        torch.device("cpu"), range(3), "s"] * (limit // 9 + 1),
                                              "table": table}),
                             lambda w: w.scale["table"][:1])}
    for kind, (wrap, unwrap) in held.items():
        unwrap = unwrap or (lambda w: torch.ones(1, 1, dtype=torch.float64))
        model, x, thresholds, expected = _scale_case(wrap, unwrap)
        if cuda_graphs:  # a graph holds no object but tensors and plain values
            with pytest.raises(TypeError, match=r"cuda_graphs=True\): stage 1's features\[1\] is a `_"):
                mw.EarlyExit(model, thresholds)(x)
        elif kind == "big":
            with pytest.raises(TypeError, match=r"Stage 1 returned a `_Held` \(features\[1\]\) holding more "
                                                r"than 100000 values that could hold a tensor.*keep large objects "
                                                r"in the module"):
                mw.EarlyExit(model, thresholds)(x)
        else:
            predictions, exits = mw.EarlyExit(model, thresholds)(x)
            assert torch.equal(exits, expected.exits) and torch.equal(predictions, expected.predictions)


class _TableStage(nn.Module):
    """Stage 1 hands on its features and ``held``, an object holding a fixed [rows, 4] table (a
    rotary-embedding cache); later stages add the table's first row and hand it on."""

    def __init__(self, held, unwrap, first):
        super().__init__()
        self.linear, self.held, self.unwrap, self.first = nn.Linear(4, 4), held, unwrap, first

    def forward(self, f):
        if self.first:
            return torch.tanh(self.linear(f)), self.held
        h, held = f
        return torch.tanh(self.linear(h) + self.unwrap(held)[0]), held


# how an object holds the table and how a stage reads it (a tuple: what EarlyExit selects in itself)
_TABLE_HOLDERS = {
    "an attribute": (_Held, lambda w: w.scale, ".scale"),
    "dataclass(slots=True)": (_Slotted, lambda w: w.scale, ".scale"),
    "a dict in an object": (lambda t: _Held({"cos": t}), lambda w: w.scale["cos"], ".scale['cos']"),
    "an object in a deque": (lambda t: collections.deque([_Held(t)]), lambda w: w[0].scale, "[0].scale"),
    "a tuple": (lambda t: (t,), lambda w: w[0], None),
}


def _table_model(kind, rows):
    wrap, unwrap, _ = _TABLE_HOLDERS[kind]
    torch.manual_seed(0)
    held = wrap(torch.randn(rows, 4, dtype=torch.float64))
    return mw.MultiExit([_TableStage(held, unwrap, k == 0) for k in range(3)],
                        [_ScaleHead() for _ in range(3)]).double().eval()


@pytest.mark.parametrize("kind", list(_TABLE_HOLDERS))
@pytest.mark.parametrize("rows", [5, 6, 7])
def test_a_table_an_object_passes_on_unchanged_is_not_per_sample_whatever_the_samples_left(kind, rows, cuda_graphs):
    """A table an object carries through the stages (a [6, 4] cache of a rotary embedding) was
    refused as per sample at the exit where exactly 6 samples were still in, and went on where one
    more had left: whether a batch was answered depended on how many samples stayed. A tensor seen
    in an object at an earlier exit, of another first dimension, is passed on unchanged there, so it
    is not per sample at a later exit either, as a tensor in a tuple (and the predictions are
    exit_assignment's, whatever the samples still in). With cuda_graphs an object is refused, as any
    object that is not a tuple, list or dict; a tuple goes on there too."""
    model = _table_model(kind, 6)
    x = torch.randn(24, 4, dtype=torch.float64)
    with torch.no_grad():
        logits = torch.stack(model(x))
    scores = as_rule("max_probability").scores(logits)
    first = float(scores[0].sort().values[rows])  # `rows` samples go on past exit 1, the others leave
    staying = scores[0] < first
    second = float(scores[1][staying].sort().values[rows // 2])  # some leave at exit 2, others go on
    thresholds = torch.tensor([first, second, 0.0], dtype=torch.float64)
    expected = mw.exit_assignment(logits, thresholds)
    assert int((expected.exits > 0).sum()) == rows and 0 < int((expected.exits == 2).sum()) < rows
    if cuda_graphs and _TABLE_HOLDERS[kind][2] is not None:
        with pytest.raises(TypeError, match=r"cuda_graphs=True\): stage 1's features\[1\] is a `"):
            mw.EarlyExit(model, thresholds)(x)
        return
    predictions, exits = mw.EarlyExit(model, thresholds)(x)
    assert torch.equal(exits, expected.exits) and torch.equal(predictions, expected.predictions)


@pytest.mark.parametrize("kind", [k for k, (_, _, where) in _TABLE_HOLDERS.items() if where is not None])
def test_a_table_in_an_object_whose_rows_are_the_whole_batch_at_its_first_exit_is_refused(kind, cuda_graphs):
    """Where a table is first handed on between stages, a first dimension equal to the samples in
    the network cannot be told from a per-sample tensor's (a [6, 4] table with a batch of 6): in a
    tuple it is selected (the documented limit), in an object, where EarlyExit cannot select it, it
    is refused naming where it is and what to do, at exit 1, whatever the samples leaving there.
    With cuda_graphs any such object is refused, as not a tuple, list or dict."""
    where = _TABLE_HOLDERS[kind][2]
    model = _table_model(kind, 6)
    x = torch.randn(6, 4, dtype=torch.float64)
    with torch.no_grad():
        logits = torch.stack(model(x))
    scores = as_rule("max_probability").scores(logits)
    thresholds = torch.tensor([float(scores[0].median()), 0.0, 0.0], dtype=torch.float64)
    if cuda_graphs:
        with pytest.raises(TypeError, match=r"cuda_graphs=True\): stage 1's features\[1\] is a `"):
            mw.EarlyExit(model, thresholds)(x)
        return
    with pytest.raises(TypeError, match=rf"Stage 1 returned a `.*` \(features\[1\]\) holding tensors whose first "
                                        rf"dimension is the number of samples in the network \(6\): "
                                        rf"{re.escape('features[1]' + where)} \(6, 4\).*only happens to equal"):
        mw.EarlyExit(model, thresholds)(x)


# ------------------------------------------------------- layers that use the statistics of the batch
def _bn_net(where, **options):
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(4, 8), nn.ReLU()) for _ in range(3)]
    stages[1:] = [nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2)]
    heads = [nn.Linear(8, 3) for _ in range(3)]
    norm = nn.BatchNorm1d(8, **options)
    if where == "stage 1":
        stages[0] = nn.Sequential(nn.Linear(4, 8), norm, nn.ReLU())
    elif where == "stage 2":
        stages[1] = nn.Sequential(nn.Linear(8, 8), norm, nn.ReLU())
    else:
        heads[2] = nn.Sequential(norm, nn.Linear(8, 3))
    return mw.MultiExit(stages, heads).double().eval()


def test_batch_statistics_are_refused_where_a_layer_runs_on_the_samples_still_in():
    """A BatchNorm without running statistics normalises with the batch's statistics in eval mode
    too: on the samples still in, EarlyExit gave other predictions than the full forward (11 of 31
    at exit 2), with no sign. In a stage or head after the first it is refused with a ValueError
    naming the layer and the fix, when built and at a call where such a layer was put in later,
    changing nothing. Stage 1 and head 1 see the whole batch, and exit_costs(executed=True) makes
    every sample leave at one exit: there batch statistics give the full forward's values and run.
    A BatchNorm with running statistics left in train mode runs in eval mode, as the full forward in
    eval mode."""
    for where, name in (("stage 2", "stages.1.1"), ("head 3", "heads.2.0")):
        match = rf"`{name}` \(BatchNorm1d, track_running_stats=False\).*track_running_stats=True"
        with pytest.raises(ValueError, match=match):
            mw.EarlyExit(_bn_net(where, track_running_stats=False), [0.5, 0.5, 0.0])
        model = _bn_net(where)
        predictor = mw.EarlyExit(model, [0.5, 0.5, 0.0])
        model.train()
        part = model.stages[1] if where == "stage 2" else model.heads[2]
        part[int(name[-1])] = nn.BatchNorm1d(8, track_running_stats=False).double()
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(ValueError, match=match):
            predictor(torch.randn(6, 4, dtype=torch.float64))
        assert all(m.training for m in model.modules())
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        # running statistics set to None: torch's own test for batch statistics in eval mode
        model = _bn_net(where)
        norm = model.get_submodule(name)
        norm.running_mean = norm.running_var = None
        with pytest.raises(ValueError, match=rf"`{name}` \(BatchNorm1d, track_running_stats=True\)"):
            mw.EarlyExit(model, [0.5, 0.5, 0.0])
    # where every sample is still in: accepted, as the full forward
    model = _bn_net("stage 1", track_running_stats=False)
    x = torch.randn(30, 4, dtype=torch.float64) * 2
    with torch.no_grad():
        logits = torch.stack(model(x))
    thresholds = torch.tensor([split(as_rule("max_probability").scores(logits)[k]) for k in range(2)] + [-1.0],
                              dtype=torch.float64)
    expected_exits, expected = mw.exit_assignment(logits, thresholds)
    predictions, exits = mw.EarlyExit(model, thresholds)(x)
    assert torch.equal(exits, expected_exits) and torch.equal(predictions, expected)
    batch_statistics = _bn_net("stage 2", track_running_stats=False)
    assert mw.exit_costs(batch_statistics, x[:2], executed=True).macs == \
        mw.exit_costs(_bn_net("stage 2"), x[:2], executed=True).macs
    model = _bn_net("stage 2").train()
    with torch.no_grad():
        model(torch.randn(64, 4, dtype=torch.float64) + 1)  # running statistics other than x's
    predictions, exits = mw.EarlyExit(model, thresholds)(x)
    assert model.training
    with torch.no_grad():
        expected_exits, expected = mw.exit_assignment(torch.stack(model.eval()(x)), thresholds)
    assert torch.equal(exits, expected_exits) and torch.equal(predictions, expected)
    assert len(set(exits.tolist())) == 3


def test_a_forward_pre_hook_that_unpacks_the_inputs_is_left_to_do_so():
    """forward(x, mask) given (x, mask) through a forward pre-hook that unpacks it: the signature check must not
    refuse what the hook makes callable (review of the check: it did)."""
    torch.manual_seed(0)
    model = TwoArguments()
    model.register_forward_pre_hook(lambda module, args: args[0] if len(args) == 1 else args)
    x, mask, y = torch.randn(6, 4), torch.ones(6, 4), torch.randint(0, 3, (6,))
    with torch.no_grad():
        expected = torch.stack(model(x, mask))
    assert torch.equal(mw.collect_logits(model, [((x, mask), y)])[0], expected)
    w = mw.HarmonizedWeighter(model, torch.optim.SGD(model.parameters(), lr=0.1), mw.DenseDistillLoss(2))
    assert w.step(((x, mask), y), ((x, mask), y)).meta_step == 1


@pytest.mark.parametrize("attached", [False, True])
def test_early_exit_returns_a_named_tuple_whose_fields_are_its_old_positions(attached):
    model = mlp()
    x = torch.randn(12, 6, dtype=torch.float64) * 3
    with torch.no_grad():
        logits = torch.stack(model(x))
    thresholds = thresholds_with_every_case(as_rule("max_probability").scores(logits))
    if attached:
        net = nn.Sequential(*model.stages)
        model = mw.attach_exits(net, [str(k) for k in range(K)], list(model.heads), include_output=False).eval()
    result = mw.EarlyExit(model, thresholds)(x)
    assert isinstance(result, mw.EarlyExitResult) and isinstance(result, tuple) and len(result) == 2
    assert result._fields == ("predictions", "exits")
    predictions, exits = result  # unpacks as the pair it was
    assert result.predictions is predictions and result.exits is exits
    assert result[0] is result.predictions and result[1] is result.exits
    ref_exits, ref_predictions = loop_assign("max_probability", logits.tolist(), thresholds.tolist())
    assert result.exits.tolist() == ref_exits and result.predictions.tolist() == ref_predictions
    assert len(set(ref_exits)) > 1  # samples leave at different exits: the fields cannot be swapped unseen


def test_exit_assignment_returns_a_named_tuple_whose_fields_are_its_old_positions():
    model = mlp()
    with torch.no_grad():
        logits = torch.stack(model(torch.randn(12, 6, dtype=torch.float64) * 3))
    thresholds = thresholds_with_every_case(as_rule("max_probability").scores(logits))
    result = mw.exit_assignment(logits, thresholds)
    assert isinstance(result, mw.ExitAssignment) and isinstance(result, tuple) and len(result) == 2
    assert result._fields == ("exits", "predictions")
    exits, predictions = result  # unpacks as the pair it was
    assert result[0] is result.exits is exits and result[1] is result.predictions is predictions
    ref_exits, ref_predictions = loop_assign("max_probability", logits.tolist(), thresholds.tolist())
    assert result.exits.tolist() == ref_exits and result.predictions.tolist() == ref_predictions
    assert len(set(ref_exits)) > 1


class _Scaled(mw.ExitRule):
    """A rule of one's own without a name: the max probability, halved (thresholds on another scale)."""

    def scores(self, logits):
        return torch.softmax(logits.float(), -1).amax(-1) / 2


class _Plain(mw.ExitRule):
    def scores(self, logits):
        return torch.softmax(logits.float(), -1).amax(-1)


def test_rules_of_one_s_own_without_a_name_are_told_apart_in_saved_state():
    """Every ExitRule subclass without a name was "rule", so an EarlyExit saved with one rule of one's own
    loaded into one scoring with another, its thresholds read on the other's scale; each is now named by its
    module and class, a state saved with another is refused naming the class to pass, and a state saved
    before rules had names ("rule") still loads into an unnamed rule."""
    net, x, z, calibration, thresholds = calibrated_deployment()
    assert _Scaled.name.endswith("test_early_exit._Scaled") and _Scaled.name != _Plain.name
    assert mw.MaxProbability.name == "max_probability"  # the built-in names stay
    state = mw.EarlyExit(net, thresholds / 2, rule=_Scaled()).state_dict()
    other = mw.EarlyExit(net, thresholds, rule=_Plain())
    before = other.thresholds.clone()
    with pytest.raises(ValueError, match=r"saved with rule '.*_Scaled'.*rule=_Scaled\(\) \(an instance of"):
        other.load_state_dict(state)
    assert torch.equal(other.thresholds, before)
    same = mw.EarlyExit(net, [0.0, 0.0, 0.0], rule=_Scaled())
    same.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(same(x)[1], mw.EarlyExit(net, thresholds, rule=_Plain())(x)[1])  # halved both sides
    older = dict(state, _extra_state={**state["_extra_state"], "rule": "rule"})
    mw.EarlyExit(net, [0.0, 0.0, 0.0], rule=_Scaled()).load_state_dict(older)


class _MaxProbabilityOfMine(mw.MaxProbability):
    """A subclass that keeps the built-in's scores (a docstring, a repr, ...)."""


class _HalfOfMine(_Scaled):
    pass


def test_a_subclass_keeping_its_parent_s_scores_keeps_its_parent_s_name():
    """A subclass of a rule that does not define its own scores scores on its parent's scale: it keeps the parent's
    name, so a state saved with the built-in (or with the subclass before rules were named by class) loads into
    it (it was renamed by its class and refused, helper-109's report). One that defines its scores is named anew,
    and the refusal says how to declare the same scale (name = ... in its class)."""
    net, x, z, calibration, thresholds = calibrated_deployment()
    assert _MaxProbabilityOfMine.name == "max_probability" and _HalfOfMine.name == _Scaled.name

    class LogitScale:  # a mixin bringing other scores ahead of the built-in's (helper-112: kept its name)
        def scores(self, logits):
            return logits.float().amax(-1) * 100

    class Mixed(LogitScale, mw.MaxProbability):
        pass

    assert Mixed.name.endswith("Mixed")
    state = mw.EarlyExit(net, thresholds).state_dict()
    mine = mw.EarlyExit(net, [0.0, 0.0, 0.0], rule=_MaxProbabilityOfMine())
    mine.load_state_dict(state)
    assert torch.equal(mine.thresholds, mw.EarlyExit(net, thresholds).thresholds)
    with pytest.raises(ValueError, match=r"saved with rule 'max_probability'.*set name = 'max_probability' in its "
                                         r"class"):
        mw.EarlyExit(net, [0.0, 0.0, 0.0], rule=_Plain()).load_state_dict(state)


class _PairHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, h):
        return self.linear(h), h


class _DictHead(_PairHead):
    def forward(self, h):
        return {"logits": self.linear(h)}


@pytest.mark.parametrize("head, found", [(_PairHead, r"a `tuple` of 2 \(Tensor \(\d+, 3\), Tensor \(\d+, 4\)\)"),
                                         (_DictHead, r"a `dict` with keys \['logits'\]")])
def test_a_head_that_returns_no_tensor_is_refused_the_same_way_wherever_it_runs(head, found, cuda_graphs):
    """A head returning (logits, features) or {"logits": ...} met a bare AttributeError ('tuple' object
    has no attribute 'shape') in MultiExit's forward, EarlyExit, collect_logits, exit_costs and exits
    attached by name: each now refuses it with one TypeError naming the exit, the head and what it
    returned, and how to fix it, from one check every caller of a head goes through."""
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    net = mw.MultiExit([nn.Linear(4, 4), nn.Linear(4, 4)], [head(), head()]).eval()
    attached = mw.attach_exits(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)), ["1"], [head()])
    calls = {"MultiExit": lambda: net(x), "EarlyExit": lambda: mw.EarlyExit(net, [0.5, 0.0])(x),
             "collect_logits": lambda: mw.collect_logits(net, [(x, torch.zeros(5, dtype=torch.long))]),
             "exit_costs": lambda: mw.exit_costs(net, x[:1]),
             "exit_costs executed": lambda: mw.exit_costs(net, x[:1], executed=True),
             "AttachedExits": lambda: attached(x), "AttachedExits.run_until": lambda: attached.run_until(x, None)}
    if not cuda_graphs:  # (exits attached by name have no stages to capture)
        calls["EarlyExit on attached exits"] = lambda: mw.EarlyExit(attached, [0.5, 0.0])(x)
    for name, call in calls.items():
        where = r"AttachedExits \(after '1'\)" if name.startswith(("Attached", "EarlyExit on")) else r"`?MultiExit`?"
        with pytest.raises(TypeError, match=rf"The head of exit 1 of {where} \(`{head.__name__}`\) returned {found}, "
                                            rf"and a head must return one logits tensor \[batch, classes\]\. Wrap "
                                            rf"the head in a module whose forward returns only the logits"):
            call()


class _Normalized(mw.MultiExit):
    """A MultiExit whose own forward normalises the input before stage 1, which exit_stages() does not."""

    def forward(self, x):
        return super().forward((x - 5.0) / 3.0)


class _OwnStages(nn.Module):
    """A model defining exit_stages() itself, whose forward scales the features between stage 1 and 2 (a step
    that is in no stage): only exit 2 and later differ."""

    def __init__(self, scale: float):
        super().__init__()
        self.inner, self.scale = tiny_net(3, batchnorm=False), scale

    def exit_stages(self):
        return self.inner.exit_stages()

    def forward(self, x):
        stages, heads = self.exit_stages()
        h = stages[0](x)
        out = [heads[0](h)]
        h = h * self.scale
        for stage, head in zip(stages[1:], heads[1:]):
            h = stage(h)
            out.append(head(h))
        return out


def _pre_hooked():
    net = tiny_net(3, batchnorm=False)
    net.register_forward_pre_hook(lambda module, args: (args[0] * 2.0,))
    return net


def _post_hooked():
    net = tiny_net(3, batchnorm=False)
    net.register_forward_hook(lambda module, args, output: [o * 2.0 for o in output])
    return net


@pytest.mark.parametrize("build, exit_", [
    (lambda: _Normalized(tiny_net(3, batchnorm=False).stages, tiny_net(3, batchnorm=False).heads), 1),
    (lambda: _OwnStages(2.0), 2),
    (_pre_hooked, 1),
    (_post_hooked, 1),
], ids=["overridden forward", "step between stages", "forward pre-hook", "forward hook"])
def test_a_forward_that_computes_other_logits_than_the_stages_is_refused(build, exit_):
    """EarlyExit runs exit_stages(); a model whose forward does something outside them (an overridden forward,
    a step between stages, a hook on the model itself) would silently predict from other logits than model(x)
    and exit_assignment on its logits: refused at the first call, naming the exit, as is exit_costs(executed=True)
    (whose costs would be the stages' alone). The same computation with the step moved into stage 1 agrees with
    exit_assignment on the forward's logits, sample by sample."""
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(64, 6) * 3 + 5
    with pytest.raises(ValueError, match=rf"forward computes something else.*exit {exit_}'s logits"):
        mw.EarlyExit(model, [0.6, 0.6, 0.0])(x)
    with pytest.raises(ValueError, match=r"forward computes something else"):
        mw.exit_costs(model, x[:1], executed=True)
    # a subclass whose forward is the stages' (a docstring, a log line) passes, and so does the step as a stage
    torch.manual_seed(0)
    plain = tiny_net(3, batchnorm=False)

    class Logged(mw.MultiExit):
        def forward(self, x):
            return super().forward(x)

    fixed = Logged([nn.Sequential(Affine(), plain.stages[0]), *plain.stages[1:]], plain.heads).eval()
    with torch.no_grad():
        logits = torch.stack(fixed(x))
    confidence = logits.softmax(-1).amax(-1)
    thresholds = [float(confidence[0].median()), float(confidence[1].median()), 0.0]
    result = mw.EarlyExit(fixed, thresholds)(x)
    expected = mw.exit_assignment(logits, torch.tensor(thresholds))
    assert torch.equal(result.exits, expected.exits) and torch.equal(result.predictions, expected.predictions)
    assert 0 < int((result.exits == 0).sum()) < 64  # a real mix


class Affine(nn.Module):
    def forward(self, x):
        return (x - 5.0) / 3.0


class _Wrapping(nn.Module):
    """exit_stages() wraps each head anew at every call (``nn.Sequential(norm, head)``): new module objects each
    time, the same computation."""

    def __init__(self):
        super().__init__()
        self.inner, self.norm = tiny_net(3, batchnorm=False), nn.LayerNorm(10)

    def exit_stages(self):
        return self.inner.stages, [nn.Sequential(self.norm, head) for head in self.inner.heads]

    def forward(self, x):
        stages, heads = self.exit_stages()
        out = []
        for stage, head in zip(stages, heads):
            x = stage(x)
            out.append(head(x))
        return out


def _forward_calls(model):
    """The batch sizes of the model's forward calls, as they come."""
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    return calls


def test_the_forward_check_runs_once_per_structure_and_again_for_a_new_head():
    """The check (a forward of the batch's first 8 samples and the stages on them) runs at the first call only,
    and again once a module of the model or its own hooks change, counted by the model's forward calls; stages
    and heads that exit_stages() wraps anew at each call are the same structure (their new ids had the check run
    at every call, and counted by exit_costs(executed=True); helper-167)."""
    net = tiny_net(3, batchnorm=False).eval()
    calls = _forward_calls(net)
    predictor = mw.EarlyExit(net, [0.5, 0.5, 0.0])
    for _ in range(3):
        predictor(torch.randn(12, 6))
    assert calls == [8]
    net.heads[1] = nn.Linear(10, 5)
    predictor(torch.randn(12, 6))
    predictor(torch.randn(3, 6))
    assert calls == [8, 8]
    net.register_forward_hook(lambda module, args, output: [o * 10.0 for o in output])
    with pytest.raises(ValueError, match="forward computes something else"):
        predictor(torch.randn(8, 6))
    wrapping = _Wrapping().eval()
    calls = _forward_calls(wrapping)
    predictor = mw.EarlyExit(wrapping, [0.5, 0.5, 0.0])
    for _ in range(3):
        predictor(torch.randn(1, 6))
    assert calls == [1]
    assert mw.exit_costs(wrapping, torch.randn(1, 6), executed=True).macs == \
        mw.exit_costs(wrapping, torch.randn(1, 6)).macs


class _MonteCarlo(mw.MultiExit):
    """Dropout on in eval mode (MC dropout): the forward and the stages draw alike from one generator state."""

    def __init__(self):
        net = tiny_net(3, batchnorm=False)
        super().__init__([nn.Sequential(stage, _AlwaysDropout()) for stage in net.stages], net.heads)


class _AlwaysDropout(nn.Module):
    def forward(self, x):
        return F.dropout(x, 0.3, training=True)


class _LogProbabilities(mw.MultiExit):
    """A forward giving log_softmax of the heads' logits: the same softmax, every rule's scores alike."""

    def forward(self, x):
        return [torch.log_softmax(z, -1) for z in super().forward(x)]


class _InPlace(mw.MultiExit):
    """A forward normalising its input in place before stage 1 (the stages then read the input as given)."""

    def forward(self, x):
        return super().forward(x.sub_(5.0).div_(3.0))


class _Clamped(mw.MultiExit):
    """A forward clamping its input: only the samples out of range change (the 8 checked hold some)."""

    def forward(self, x):
        return super().forward(x.clamp(-1.0, 1.0))


def test_the_forward_check_takes_what_agrees_and_refuses_what_does_not():
    """helper-167: MC dropout (randomness in eval mode) and a forward giving log-probabilities were refused; a
    forward normalising its input in place and one clamping some samples went unseen; inputs the check cannot cut
    (a sparse tensor) crashed the first call. Each is now taken or refused as it agrees or not, the random
    generators left as the call found them."""
    torch.manual_seed(0)
    plain = tiny_net(3, batchnorm=False)
    x = torch.randn(12, 6) * 3
    for agrees in (_MonteCarlo(), _LogProbabilities(plain.stages, plain.heads)):
        agrees.eval()
        state = torch.get_rng_state()
        # (the class itself: _Graphed's replay of a random model gives other predictions, as it should)
        metaweight._early_exit.EarlyExit(agrees, [0.5, 0.5, 0.0])(x)
        if isinstance(agrees, _LogProbabilities):
            assert torch.equal(torch.get_rng_state(), state)
    masked = [nn.Sequential(head, _MaskLast()) for head in plain.heads]  # (a class masked with -1e9 at every exit)
    for differs in (_InPlace(plain.stages, plain.heads), _Clamped(plain.stages, plain.heads),
                    _Normalized(plain.stages, masked)):
        with pytest.raises(ValueError, match="forward computes something else"):
            mw.EarlyExit(differs.eval(), [0.5, 0.5, 0.0])(x.clone())
    # random in eval mode from a generator out of the library's reach (a module-level one): the forward differs from
    # itself, so nothing is compared (it was refused as a forward doing something else; helper-168)
    noisy = mw.MultiExit([nn.Sequential(stage, _OutOfReach()) for stage in plain.stages], plain.heads).eval()
    with pytest.warns(RuntimeWarning, match="could not check that the stages"):  # (said: helper-169)
        metaweight._early_exit.EarlyExit(noisy, [0.5, 0.5, 0.0])(x)
    # a running normaliser inside stage 1, as the refusal advises, in every form a module holds and updates its
    # state (a buffer updated in place, through .data or replaced, a tensor attribute updated in place or replaced,
    # a Python call counter): each pass starts from the state the call left, put back after, so no warning and the
    # model's state is what the call alone makes (helper-170: in place in a buffer; helper-171: the other forms,
    # moved four times by one call; helper-176: through .data, and the counter)
    for kind in _Normaliser.KINDS:
        inside = _Streaming(plain.stages, plain.heads).eval()
        inside.stages[0] = nn.Sequential(_Normaliser(kind), inside.stages[0])
        inside.forward = types.MethodType(mw.MultiExit.forward, inside)  # (its forward the stages': nothing outside)
        twin = copy.deepcopy(inside)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            metaweight._early_exit.EarlyExit(inside, [0.5, 0.5, 0.0])(x)
        with torch.no_grad():
            twin.stages[0](x)  # (the call's one pass of every sample through stage 1)
        assert torch.equal(inside.stages[0][0].mean, twin.stages[0][0].mean), kind
        assert inside.stages[0][0].calls == twin.stages[0][0].calls == 1, kind
        # outside the stages, the forward normalising first: it passed silently as differing from itself
        # (helper-169); each pass from the same state, it is refused, and the state is as before the call
        outside = _Streaming(plain.stages, plain.heads, kind).eval()
        before = outside.mean.clone()
        with pytest.raises(ValueError, match="forward computes something else"):
            metaweight._early_exit.EarlyExit(outside, [0.5, 0.5, 0.0])(x)
        assert torch.equal(outside.mean, before), kind
    # a lazy cache (None until the forward makes it a tensor) in a stage no sample reaches: the check deleted the
    # attribute, and the next forward failed; an alias of a weight (weight.detach()) was written through, warned of
    # as a parameter changed in place (helper-173). Each as it was, nothing warned
    lazy = _Streaming(plain.stages, plain.heads).eval()
    lazy.stages[2] = nn.Sequential(_Cached(), lazy.stages[2])
    lazy.stages[1] = nn.Sequential(_Aliased(lazy.stages[1]), lazy.stages[1])
    lazy.forward = types.MethodType(mw.MultiExit.forward, lazy)
    weights = [p.detach().clone() for p in lazy.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, exits = metaweight._early_exit.EarlyExit(lazy, [-math.inf, 0.5, 0.0])(x)  # (every sample leaves first)
    assert (exits == 0).all() and lazy.stages[2][0].scale is None
    assert all(torch.equal(a, b) for a, b in zip(weights, lazy.parameters()))
    lazy(x)
    # lazy modules the check's passes initialise (every sample of the call leaves at exit 1): their first forward
    # sets their sizes, and their class changes; the first call failed on the uninitialised parameters, and a check
    # putting back the sizes would delete them (helper-178). They are left initialised, the model usable
    lazy_model = mw.MultiExit([nn.Sequential(nn.Linear(6, 8), nn.Tanh()), nn.Sequential(nn.LazyLinear(8), nn.Tanh())],
                              [nn.Linear(8, 3), nn.LazyLinear(3)]).eval()
    _, exits = metaweight._early_exit.EarlyExit(lazy_model, [-math.inf, 0.0])(x)
    assert (exits == 0).all() and lazy_model.stages[1][0].in_features == 8 and lazy_model.heads[1].in_features == 8
    assert metaweight._early_exit.EarlyExit(lazy_model, [math.inf, 0.0])(x)[1].eq(1).all()
    lazy_model.train()(x)
    # a cache keyed by the shape of the last batch (a tuple attribute) beside its tensor: the check put the tensor
    # back, not the key, and the stages' pass met a cache of another batch size (helper-178)
    keyed = mw.MultiExit([nn.Sequential(plain.stages[0], _ShapeKeyed()), *plain.stages[1:]], plain.heads).eval()
    metaweight._early_exit.EarlyExit(keyed, [0.5, 0.5, 0.0])(x)
    assert keyed.stages[0][1].key == (x.shape[0], 10) and keyed.stages[0][1].calls == 1
    # the key first a list, in a stage the call does not reach: the forward's tuple was taken for an attribute added,
    # and deleted, and the model broke (helper-179); every attribute rebound is put back as it was
    listed = mw.MultiExit([plain.stages[0], nn.Sequential(plain.stages[1], _ShapeKeyed([])), plain.stages[2]],
                          plain.heads).eval()
    _, exits = metaweight._early_exit.EarlyExit(listed, [-math.inf, 0.5, 0.0])(x)
    assert (exits == 0).all() and listed.stages[1][1].key == [] and listed.stages[1][1].calls == 0
    listed(x)
    # a cache an earlier forward made under torch.inference_mode(): an inference tensor has no version counter,
    # and the first call failed on it, under no_grad and inference_mode alike (helper-176)
    for mode in (torch.no_grad, torch.inference_mode):
        served = mw.MultiExit([nn.Sequential(_Cached(), stage) for stage in plain.stages], plain.heads).eval()
        with torch.inference_mode():
            served(x)
        caches = [stage[0].scale for stage in served.stages]
        with mode():
            predictions, _ = metaweight._early_exit.EarlyExit(served, [0.5, 0.5, 0.0])(x)
        assert all(stage[0].scale is cache for stage, cache in zip(served.stages, caches))
        with torch.no_grad():
            assert torch.equal(predictions, mw.exit_assignment(torch.stack(served(x)), [0.5, 0.5, 0.0]).predictions)
    # a running mean held in an nn.Parameter, which the check does not copy (the weights: the model's memory again),
    # is moved by the check's passes: said, naming it
    inside = _Streaming(plain.stages, plain.heads).eval()
    inside.stages[0] = nn.Sequential(_Normaliser("parameter"), inside.stages[0])
    inside.forward = types.MethodType(mw.MultiExit.forward, inside)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        metaweight._early_exit.EarlyExit(inside, [0.5, 0.5, 0.0])(x)
    said = [str(w.message) for w in said]
    assert any("changed the parameter(s) ['stages.0.0.mean'] in place" in w for w in said), said
    assert all("could not check" in w or "in place" in w for w in said), said  # (its passes differ: not checked)
    # a sparse batch, which the check cannot take samples of (indexing a sparse tensor): not checked, answered
    sparse = mw.MultiExit([nn.Sequential(_Dense(), plain.stages[0]), *plain.stages[1:]], plain.heads).eval()
    eager = metaweight._early_exit.EarlyExit  # (a CUDA graph cannot copy a sparse input: the eager path's)
    result = eager(sparse, [0.5, 0.5, 0.0])(x.to_sparse())
    assert torch.equal(result.exits, eager(sparse, [0.5, 0.5, 0.0])(x).exits)


class _Dense(nn.Module):
    def forward(self, x):
        return x.to_dense()


class _MaskLast(nn.Module):
    def forward(self, z):
        return torch.cat([z[:, :-1], torch.full_like(z[:, -1:], -1e9)], -1)


_OUT_OF_REACH = torch.Generator().manual_seed(0)


class _Cached(nn.Module):
    """A cache made at the first forward (None until then)."""

    def __init__(self):
        super().__init__()
        self.scale = None

    def forward(self, h):
        if self.scale is None:
            self.scale = torch.ones(h.shape[-1])
        return h * self.scale


class _ShapeKeyed(nn.Module):
    """A mask cached for the shape of the last batch: the key a torch.Size, the mask a tensor attribute."""

    def __init__(self, key=None):
        super().__init__()
        self.key, self.mask, self.calls = key, None, 0

    def forward(self, h):
        self.calls += 1
        if len(self.key or ()) != 2 or self.key != h.shape:
            self.key, self.mask = h.shape, torch.ones_like(h)
        return h * self.mask


class _Aliased(nn.Module):
    """Holds an alias of a weight of another module (its transpose, detached), which the forward reads."""

    def __init__(self, stage):
        super().__init__()
        linear = next(m for m in stage.modules() if isinstance(m, nn.Linear))
        self.alias = linear.weight.detach().t()

    def forward(self, h):
        return h + 0.0 * self.alias.sum()


class _Normaliser(nn.Module):
    """A running mean of the inputs, held as ``kind`` says and updated at each call."""

    KINDS = ("buffer", "buffer replaced", "attribute", "attribute replaced", "buffer through .data",
             "buffer's .data replaced")

    def __init__(self, kind="buffer"):
        super().__init__()
        self.kind = kind
        self.calls = 0  # (a Python call counter beside it)
        _hold(self, kind)

    def forward(self, x):
        self.calls += 1
        return x - _update(self, x)


def _hold(module, kind):
    if kind.startswith("buffer"):
        module.register_buffer("mean", torch.zeros(6))
    elif kind == "parameter":
        module.mean = nn.Parameter(torch.zeros(6), requires_grad=False)
    else:
        module.mean = torch.zeros(6)


def _update(module, x):
    if module.kind == "buffer through .data":  # (.data has a version counter of its own: the buffer's does not move)
        module.mean.data.mul_(0.9).add_(0.1 * x.mean(0))
    elif module.kind == "buffer's .data replaced":
        module.mean.data = 0.9 * module.mean.data + 0.1 * x.mean(0)
    elif module.kind.endswith("replaced"):
        module.mean = 0.9 * module.mean + 0.1 * x.mean(0)
    else:
        module.mean.mul_(0.9).add_(0.1 * x.mean(0))
    return module.mean


class _Streaming(mw.MultiExit):
    def __init__(self, stages, heads, kind="buffer"):
        super().__init__(stages, heads)
        self.kind = kind
        _hold(self, kind)

    def forward(self, x):
        return super().forward(x - _update(self, x))


class _OutOfReach(nn.Module):
    def forward(self, h):
        return h + 0.5 * torch.randn(h.shape, generator=_OUT_OF_REACH, dtype=h.dtype)
