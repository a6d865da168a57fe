"""Nothing silently wrong outside the training step: attached exits, evaluation, early exit, logging,
checkpoints, devices and masked classes. Each test pins the right value, against an independent
computation where there is one."""

import argparse
import copy
import csv
import datetime
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import metaweight as mw
from conftest import batch, tiny_net

ROOT = Path(__file__).resolve().parents[1]


class TwiceShared(nn.Module):
    """A weight-shared block applied ``calls`` times."""

    def __init__(self, calls: int = 2) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.block = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 3)
        self.calls = calls

    def forward(self, x):
        h = self.stem(x)
        for _ in range(self.calls):
            h = torch.tanh(self.block(h))
        return self.fc(h)


def test_an_exit_after_a_module_called_twice_is_refused_with_its_name_and_count():
    with pytest.raises(ValueError, match=r"`block` 3 times"):
        mw.attach_exits(TwiceShared(3), ["block"], [nn.Linear(8, 3)], example_input=torch.randn(2, 4))
    model = mw.attach_exits(TwiceShared(2), ["block"], [nn.Linear(8, 3)])  # no example: refused at the first forward
    with pytest.raises(ValueError, match=r"`block` 2 times"):
        model(torch.randn(5, 4))
    for thresholds in ([2.0, -1.0], [-1.0, -1.0]):  # nobody leaves at the attached exit; everyone does
        predictor = mw.EarlyExit(model, torch.tensor(thresholds))  # its first call runs the whole forward
        with pytest.raises(ValueError, match=r"`block` 2 times"):
            predictor(torch.randn(50, 4))
        with pytest.raises(ValueError, match=r"`block` 2 times"):
            mw.exit_costs(model, torch.randn(1, 4), executed=True)


def test_attaching_to_a_multi_exit_model_keeps_all_its_exits_in_order():
    torch.manual_seed(0)
    inner = tiny_net(num_exits=2, batchnorm=False)
    x = torch.randn(7, 6)
    head = nn.Linear(10, 5)
    for example in (None, x):  # MultiExit tells its num_exits; the example shows it too
        model = mw.attach_exits(inner, ["stages.0"], [head], example_input=example)
        assert model.num_exits == 3
        got = model(x)
        expected = [head(inner.stages[0](x))] + inner(x)  # independent: the modules called by hand
        assert len(got) == 3 and all(torch.equal(g, e) for g, e in zip(got, expected))
    # attached again: only before the first exit (deeper ones would be numbered out of depth order)
    with pytest.raises(ValueError, match="run after `AttachedExits`'s own first exit"):
        mw.attach_exits(model, ["model.stages.1"], [nn.Linear(10, 5)], example_input=x)
    twice = mw.attach_exits(model, ["model.stages.0.0"], [nn.Linear(10, 5)], example_input=x)
    assert twice.num_exits == 4 and len(twice(x)) == 4
    # early exit over them: the same exits and predictions as the first confident exit of a full forward
    thresholds = torch.tensor([0.5, 0.3, 0.4, -1.0])
    predictions, exits = mw.EarlyExit(twice, thresholds)(x)
    with torch.no_grad():
        first, classes = mw.exit_assignment(torch.stack(twice(x)), thresholds)
    assert torch.equal(exits, first) and torch.equal(predictions, classes)
    plain = nn.Sequential(nn.Linear(6, 5))
    plain.num_exits = 2  # says 2 exits, returns a tensor
    lying = mw.attach_exits(plain, ["0"], [nn.Linear(5, 5)])
    with pytest.raises(ValueError, match=r"declares num_exits=2, but its forward returned 1 exit\(s\)"):
        lying(x)


def frozen_bn_model():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    model.train()
    model[1].eval()  # a frozen BatchNorm in a training model
    return model


def modes(model):
    return {name: m.training for name, m in model.named_modules()}


def test_helpers_that_switch_to_eval_give_each_module_its_own_mode_back():
    model = frozen_bn_model()
    before = modes(model)
    attached = mw.attach_exits(model, ["2"], lambda name, f: nn.Linear(f.shape[-1], 3),
                               example_input=torch.randn(4, 4))
    assert modes(model) == before
    attached.train()
    model[1].eval()
    wrapped = modes(attached)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    mw.collect_logits(attached, [(x, y)])
    assert modes(attached) == wrapped
    mw.exit_costs(attached, x[:1])
    assert modes(attached) == wrapped
    mw.exit_costs(attached, x[:1], executed=True)
    assert modes(attached) == wrapped
    mw.EarlyExit(attached, torch.tensor([0.9, -1.0]))(x)
    assert modes(attached) == wrapped
    stats = model[1].running_mean.clone()
    attached(x)  # a training forward: the frozen BatchNorm's statistics do not move
    assert torch.equal(model[1].running_mean, stats)


class KeywordStage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 10)

    def forward(self, x, scale=None):
        return torch.tanh(self.linear(x if scale is None else x * scale))


class KeywordNet(mw.MultiExit):
    """A multi-exit model called with keyword inputs, ``model(**{"x": ..., "scale": ...})``."""

    def __init__(self) -> None:
        super().__init__([KeywordStage(), nn.Sequential(nn.Linear(10, 10), nn.Tanh())],
                         [nn.Linear(10, 5), nn.Linear(10, 5)])

    def forward(self, x, scale=None):
        features = self.stages[0](x, scale)
        return [self.heads[0](features), self.heads[1](self.stages[1](features))]


def test_early_exit_and_executed_costs_take_dict_inputs():
    net = KeywordNet().eval()
    inputs = {"x": torch.randn(9, 6), "scale": torch.full((9, 1), 2.0)}
    thresholds = torch.tensor([0.3, -1.0])
    predictions, exits = mw.EarlyExit(net, thresholds)(inputs)
    with torch.no_grad():
        first, classes = mw.exit_assignment(torch.stack(net(**inputs)), thresholds)
    assert torch.equal(exits, first) and torch.equal(predictions, classes)
    assert 0 < int((exits == 0).sum()) < 9  # some leave early, some do not: samples were selected in the dict
    attached = mw.attach_exits(net, ["stages.0"], [nn.Linear(10, 5)], example_input=inputs)
    p, e = mw.EarlyExit(attached, torch.tensor([0.3, 0.3, -1.0]))(inputs)
    assert p.shape == e.shape == (9,)
    executed = mw.exit_costs(net, {k: v[:1] for k, v in inputs.items()}, executed=True)
    assert executed.macs == mw.exit_costs(net, {k: v[:1] for k, v in inputs.items()}).macs == [6 * 10 + 10 * 5, 6 * 10 + 10 * 5 + 10 * 10 + 10 * 5]
    predictor = mw.EarlyExit(net, thresholds)
    with pytest.raises(TypeError, match="at least one tensor"):
        list(map(predictor, [{"x": "not a tensor"}]))  # not a silent [] from a StopIteration


class TwoInputs(nn.Module):
    """A model called as ``model(x, mask)`` or ``model(x=..., mask=...)``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 10)
        self.fc = nn.Linear(10, 5)

    def forward(self, x, mask=None):
        h = torch.tanh(self.body(x if mask is None else x * mask))
        return self.fc(h)


def _same_call_forms(x, **extra):
    """Every way a user calls a model with inputs ``x`` (and keyword inputs ``extra``)."""
    named = {"x": x, **extra}
    forms = [((named,), {}), ((), named)]  # one dict of the forward's keywords, and keywords
    if not extra:
        forms.append(((x,), {}))  # a tensor
    else:
        forms.append(((x, *extra.values()), {}))  # positionally
    return forms


def test_every_wrapper_takes_the_input_forms_its_model_takes():
    """AttachedExits, EarlyExit (on MultiExit and on attached exits) and executed exit_costs are
    called in every form the model takes (a tensor, x=..., a dict, several arguments) and give
    what the model's own forward gives."""
    torch.manual_seed(0)
    x, mask = torch.randn(9, 6), (torch.rand(9, 6) > 0.3).float()
    net = mw.MultiExit([nn.Sequential(nn.Linear(6, 10), nn.Tanh()), nn.Sequential(nn.Linear(10, 10), nn.Tanh())],
                       [nn.Linear(10, 5), nn.Linear(10, 5)]).eval()  # stage 1 a plain Linear: takes no dict
    thresholds = torch.tensor([0.3, -1.0])
    expected = mw.exit_assignment(torch.stack(net(x)).detach(), thresholds)
    predictor = mw.EarlyExit(net, thresholds)
    for args, kwargs in _same_call_forms(x):
        exits, classes = expected
        predictions, got = predictor(*args, **kwargs)
        assert torch.equal(got, exits) and torch.equal(predictions, classes), (args, kwargs)
    assert 0 < int((expected[0] == 0).sum()) < 9
    reference = mw.exit_costs(net, x[:1]).macs
    assert mw.exit_costs(net, {"x": x[:1]}, executed=True).macs == reference == [6 * 10 + 10 * 5,
                                                                                  6 * 10 + 10 * 5 + 10 * 10 + 10 * 5]

    base = TwoInputs().eval()
    head = nn.Linear(10, 5)
    attached = mw.attach_exits(base, ["body"], [head]).eval()
    with torch.no_grad():
        want = [head(base.body(x * mask)), base(x, mask)]  # independent: the head on the module's output
        for args, kwargs in _same_call_forms(x, mask=mask):
            got = attached(*args, **kwargs)
            assert len(got) == 2 and all(torch.allclose(g, w) for g, w in zip(got, want)), (args, kwargs)
    early = mw.EarlyExit(attached, torch.tensor([0.3, -1.0]))
    reference = mw.exit_assignment(torch.stack(want), torch.tensor([0.3, -1.0]))
    for args, kwargs in _same_call_forms(x, mask=mask):
        predictions, exits = early(*args, **kwargs)
        assert torch.equal(exits, reference[0]) and torch.equal(predictions, reference[1]), (args, kwargs)
    twice = mw.attach_exits(attached, ["model.body"], [nn.Linear(10, 5)])
    assert len(twice(x=x, mask=mask)) == 3  # a wrapper of a wrapper forwards keywords too


@pytest.mark.parametrize("call, message", [
    (lambda: mw.EarlyExit(mw.MultiExit([nn.Linear(6, 5)], [nn.Linear(5, 5)]), [-1.0])(y=torch.randn(2, 6)),
     r"MultiExit.forward\(x\)`, which cannot take \(y=\)"),
    (lambda: mw.attach_exits(TwoInputs(), ["body"], [nn.Linear(10, 5)])(torch.randn(2, 6), nope=1),
     r"TwoInputs.forward\(x, mask=None\)`.*unexpected keyword argument 'nope'"),
    (lambda: mw.EarlyExit(tiny_net(2), [0.5, -1.0])(torch.randn(2, 6), torch.randn(2, 6)), "too many positional"),
])
def test_a_call_the_model_cannot_take_is_refused_before_it_runs(call, message):
    with pytest.raises(TypeError, match=message):
        call()


def test_attaching_to_a_wrapped_model_suggests_the_prefixed_name():
    once = mw.attach_exits(TwoInputs(), ["body"], [nn.Linear(10, 5)])
    with pytest.raises(ValueError, match=r"did you mean \['model.body'\]\?.*prefix: `model.`"):
        mw.attach_exits(once, ["body"], [nn.Linear(10, 5)])


def test_what_the_library_creates_follows_the_device_and_dtype_it_is_given():
    """Under ``torch.device("meta")`` as the default device, any tensor the library made without
    saying where would land on ``meta`` and clash with the CPU inputs; the results must come out on
    the CPU, equal to those computed without the context."""
    torch.manual_seed(0)
    val, test = torch.randn(3, 60, 4, dtype=torch.float64), torch.randn(3, 40, 4, dtype=torch.float64)
    yv, yt = torch.randint(0, 4, (60,)), torch.randint(0, 4, (40,))
    distribution = torch.tensor([0.5, 0.3, 0.2])
    net = tiny_net(2, batchnorm=False, dtype=torch.float64).eval()
    x = torch.randn(8, 6, dtype=torch.float64)
    criterion = mw.DenseDistillLoss(2)
    predictor = mw.EarlyExit(net, torch.tensor([0.4, -1.0]))
    given = torch.tensor([0.5, 0.5, -1.0])

    def run():
        temperatures = mw.fit_temperatures(val, yv)
        return [temperatures, mw.calibrate(val, yv, test, yt).ece_after, mw.find_thresholds(val, distribution),
                mw.budgeted_curve(val, yv, test, yt, [1.0, 2.0, 3.0], qs=[0.5, 1.0]).to_dict()["points"],
                mw.thresholds_for_budget(val, yv, [1.0, 2.0, 3.0], 1.5).thresholds,
                mw.thresholds_for_accuracy(val, yv, 0.2, candidates=5).thresholds,
                mw.Entropy().scores(val), predictor(x), criterion(net(x), yt[:8]),
                mw.expected_calibration_error(val, yv), mw.anytime_accuracy_from_logits(val, yv).accuracy,
                mw.evaluate_thresholds(val, yv, given, [1.0, 2.0, 3.0])]

    plain = run()
    with torch.device("meta"):
        placed = run()
    for a, b in zip(plain, placed):
        assert repr(a) == repr(b)  # tensors print their device when it is not the CPU
    assert plain[0].dtype == torch.float64 and plain[0].device == val.device
    attached = mw.attach_exits(tiny_net(2, batchnorm=False).double(), ["stages.0"],
                               lambda name, f: nn.Linear(f.shape[-1], 5), example_input=x)
    assert attached.heads[0].weight.dtype == torch.float64  # the factory's float32 head follows the features


def entropy_without(logits, masked):
    """Minus the entropy over the classes that are not masked (an independent computation)."""
    keep = [c for c in range(logits.shape[-1]) if c not in masked]
    p = torch.softmax(logits[..., keep].double(), -1)
    return (p * p.log()).sum(-1)


def test_masked_classes_take_the_limit_zero_log_zero():
    torch.manual_seed(0)
    logits = torch.randn(3, 20, 6)
    masked = logits.clone()
    masked[..., [1, 4]] = -math.inf
    scores = mw.Entropy().scores(masked)
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores.double(), entropy_without(logits, [1, 4]), rtol=1e-5, atol=1e-6)
    thresholds = mw.find_thresholds(masked, mw.geometric_exit_distribution(0.5, 3), rule="entropy")
    first, _ = mw.exit_assignment(masked, thresholds, rule="entropy")
    assert (first == 0).any()  # samples leave early again
    nan = masked.clone()
    nan[0, 0, 0] = math.nan
    assert torch.isnan(mw.Entropy().scores(nan)[0, 0])  # a NaN logit still gives a NaN score

    criterion = mw.DenseDistillLoss(3, temperature=2.0)
    outputs = [z.clone().double().requires_grad_(True) for z in masked]
    labels = torch.randint(0, 6, (20,))
    labels[labels == 1] = 0
    labels[labels == 4] = 0
    values = criterion(outputs, labels)
    kept = [z.double()[:, [0, 2, 3, 5]] for z in logits]
    reference = mw.DenseDistillLoss(3, temperature=2.0)(kept, torch.tensor([[0, 0, 1, 2, 0, 3][c] for c in labels]))
    torch.testing.assert_close(values, reference)
    values.sum().backward()
    assert all(torch.isfinite(z.grad).all() for z in outputs)


def test_the_default_validation_objective_ignores_what_the_criterion_ignores():
    net = tiny_net(2, batchnorm=False)
    criterion = mw.DenseDistillLoss(2, ignore_index=-1)
    weighter = mw.HarmonizedWeighter(net, torch.optim.SGD(net.parameters(), lr=0.1), criterion)
    assert weighter.validation.ignore_index == -1
    x, y = batch(8)
    padded = y.clone()
    padded[5:] = -1
    objective = weighter.validation(net(x), padded)  # not refused: -1 is padding
    reference = mw.BalancedValidation(2)([z[:5] for z in net(x)], y[:5])
    torch.testing.assert_close(objective, reference)


@pytest.mark.parametrize("distribution", [[4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.1, 0.1, 0.1, 0.1]])
def test_find_thresholds_refuses_a_distribution_not_summing_to_one(distribution):
    logits = torch.randn(4, 30, 5)
    with pytest.raises(ValueError, match="should sum to 1"):
        mw.find_thresholds(logits, torch.tensor(distribution))
    normalised = torch.tensor(distribution) / sum(distribution)
    assert mw.find_thresholds(logits, normalised).shape == (4,)


def record(iteration):
    return {"iteration": iteration, "meta_step": iteration, "val_objective": 1.0 / iteration,
            "val_exit_losses": [1.0, 2.0], "gamma": {"ce[1]": 1.0}, "terms": {"ce[1]": 0.5}}


def rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_csv_logger_appends_on_resume_and_never_truncates_unasked(tmp_path):
    path = tmp_path / "logs" / "run.csv"
    logger = mw.CSVLogger(path)
    assert not path.parent.exists()  # nothing written before the first record
    for i in (1, 2, 3):
        logger(record(i))
    with pytest.raises(ValueError, match="Another CSVLogger"):
        mw.CSVLogger(path)  # two live loggers on one file would each write every row
    logger.close()
    resumed = mw.CSVLogger(path)  # a resumed run, a new logger on the same path
    for i in (4, 5):
        resumed(record(i))
    table = rows(path)
    assert table[0][:3] == ["iteration", "meta_step", "val_objective"]
    assert [r[0] for r in table[1:]] == ["1", "2", "3", "4", "5"]  # one header, every row
    resumed.close()
    other = dict(record(6), gamma={"kd[2->1]": 1.0})
    before = path.read_text()
    diverted = mw.CSVLogger(path)
    with pytest.warns(RuntimeWarning, match="has the columns.*left as it is"):
        diverted(other)  # after the step: no raise, the old log kept, this run's beside it
    assert path.read_text() == before and diverted.path == path.with_name("run-2.csv")
    assert [r[0] for r in rows(diverted.path)] == ["iteration", "6"]
    diverted.close()
    fresh = mw.CSVLogger(path, overwrite=True)
    assert path.read_text() == before  # not truncated until a record comes
    fresh(record(1))
    assert [r[0] for r in rows(path)] == ["iteration", "1"]


def _run(weighter, batches, keep_at=None):
    """Steps over ``batches``; the state after step ``keep_at`` (a checkpoint), if asked."""
    saved = None
    for i, (train, val) in enumerate(batches, start=1):
        weighter.step(train, val)
        if i == keep_at:
            saved = copy.deepcopy({"model": weighter.model.state_dict(), "optimizer": weighter.optimizer.state_dict(),
                                   "weighter": weighter.state_dict()})
    return saved


def _logged(kind, where):
    """What a logger's file or folder holds: ``[(iteration, val_objective)]`` as a reader sees it."""
    if kind == "csv":
        return [(int(r["iteration"]), float(r["val_objective"])) for r in csv.DictReader(open(where, newline=""))]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(where))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("metaweight/val_objective")]


@pytest.mark.parametrize("kind", ["csv", "tensorboard"])
def test_a_resumed_run_logs_every_iteration_once_with_the_values_that_stand(tmp_path, kind):
    """Iterations 1-5 logged, the checkpoint at 3, a crash; the resumed run logs 4 and 5 again. Every
    logger then shows 1-5 once: 1-3 of the first attempt, 4-5 of the resumed run (the values its
    own records carry)."""
    if kind == "tensorboard":
        pytest.importorskip("tensorboard")
    where = tmp_path / ("log.csv" if kind == "csv" else "tb")
    make = (lambda: mw.CSVLogger(where)) if kind == "csv" else (lambda: mw.TensorBoardLogger(where))
    torch.manual_seed(0)
    batches = [(batch(8), batch(8)) for _ in range(5)]

    def weighter(heard, logger):
        torch.manual_seed(1)
        net = tiny_net(2, batchnorm=False)
        return mw.HarmonizedWeighter(net, torch.optim.SGD(net.parameters(), lr=0.1), mw.DenseDistillLoss(2),
                                     callbacks=[heard.append, logger])

    first_heard, first_logger = [], make()
    checkpoint = _run(weighter(first_heard, first_logger), batches, keep_at=3)
    first_logger.close()  # the path is given up for the resumed run's logger
    if kind == "tensorboard":
        __import__("time").sleep(1.1)  # event files are named by the second they were opened
    resumed_heard, resumed_logger = [], make()
    resumed = weighter(resumed_heard, resumed_logger)
    resumed.model.load_state_dict(checkpoint["model"])
    resumed.optimizer.load_state_dict(checkpoint["optimizer"])
    resumed.load_state_dict(checkpoint["weighter"])
    torch.manual_seed(2)
    _run(resumed, [(batch(8), batch(8)) for _ in range(2)])  # other batches (another shuffle): other values
    if kind == "tensorboard":
        resumed_logger.writer.close()
    expected = [(r.iteration, r.val_objective) for r in first_heard[:3] + resumed_heard]
    assert [i for i, _ in expected] == [1, 2, 3, 4, 5]
    assert all(abs(a.val_objective - b.val_objective) > 1e-4 for a, b in zip(first_heard[3:], resumed_heard))
    got = _logged(kind, where)
    assert [i for i, _ in got] == [1, 2, 3, 4, 5]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_csv_logger_drops_a_torn_last_line_and_refuses_to_drop_a_whole_log(tmp_path):
    path = tmp_path / "run.csv"
    logger = mw.CSVLogger(path)
    for i in (1, 2, 3):
        logger(record(i))
    logger.close()
    text = path.read_text()
    path.write_text(text + "4,4,0.2")  # a crash in the middle of writing row 4: no newline
    path.chmod(0o640)
    mw.CSVLogger(path)(record(4))  # resumed from iteration 3: the partial row is no record
    assert path.stat().st_mode & 0o777 == 0o640  # rewritten in place of the old: its permissions kept
    table = rows(path)
    assert [r[0] for r in table] == ["iteration", "1", "2", "3", "4"]
    assert all(len(r) == len(table[0]) for r in table) and float(table[-1][2]) == 1.0 / 4
    before = path.read_bytes()
    new_run = mw.CSVLogger(path)
    with pytest.warns(RuntimeWarning, match=r"iterations 1 to 4.*iteration 1.*overwrite=True"):
        new_run(record(1))  # a new run on an old log: nothing to resume, nothing dropped
    assert path.read_bytes() == before
    assert [r[0] for r in rows(tmp_path / "run-2.csv")] == ["iteration", "1"]
    new_run.close()
    (tmp_path / "run-2.csv").unlink()
    rolled = mw.CSVLogger(path)
    rolled(record(5))
    rolled(record(3))  # the weighter rolled back in this process: rows 3 and later were undone
    assert [r[0] for r in rows(path)] == ["iteration", "1", "2", "3"]
    assert float(rows(path)[-1][2]) == 1.0 / 3
    assert not [p for p in tmp_path.iterdir() if p.name != "run.csv"]  # no temporary file left behind


def _bad_logs(tmp_path):
    """(what, make the path, the error expected): everything the file alone tells."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    (tmp_path / "afile").write_text("x")
    return [("folder", tmp_path / "folder", "is a folder"),
            ("other columns", tmp_path / "other.csv", "not a metaweight log"),
            ("under a file", tmp_path / "afile" / "log.csv", "is a file, not a folder")]


def test_csv_logger_refuses_bad_files_when_made_and_a_weighter_never_steps_twice(tmp_path):
    """Every refusal comes from the constructor, before any step; a file on disk stays as it was."""
    for what, path, message in _bad_logs(tmp_path):
        before = path.read_bytes() if path.is_file() else None
        with pytest.raises(ValueError, match=message):
            mw.CSVLogger(path)
        assert (path.read_bytes() if path.is_file() else None) == before, what
    assert mw.CSVLogger(tmp_path / "other.csv", overwrite=True).path.name == "other.csv"  # asked for: allowed
    # a new run on an old log: judged only at the first record, after the step; the step is taken
    # once, the old log kept, the new run logged beside it (a retry would otherwise step twice)
    old = tmp_path / "old.csv"

    def weighter(logger):
        torch.manual_seed(0)
        net = tiny_net(2, batchnorm=False)
        return mw.HarmonizedWeighter(net, torch.optim.SGD(net.parameters(), lr=0.1), mw.DenseDistillLoss(2),
                                     callbacks=[logger])

    first = mw.CSVLogger(old)
    run_a = weighter(first)
    for _ in range(3):
        run_a.step(batch(8), batch(8))
    first.close()
    before = old.read_bytes()
    w = weighter(mw.CSVLogger(old))
    with pytest.raises(ValueError, match="Another CSVLogger"):  # a second logger on the same file
        mw.CSVLogger(old)
    with pytest.warns(RuntimeWarning, match="new run"):
        w.step(batch(8), batch(8))
    w.step(batch(8), batch(8))
    assert w.num_calls == 2 and old.read_bytes() == before
    assert [r[0] for r in rows(tmp_path / "old-2.csv")] == ["iteration", "1", "2"]


def test_tensorboard_logger_keeps_another_run_and_refuses_bad_folders(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def steps(folder):
        events = EventAccumulator(str(folder))
        events.Reload()
        return [e.step for e in events.Scalars("metaweight/val_objective")]

    (tmp_path / "afile").write_text("x")
    for bad in (tmp_path / "afile", tmp_path / "afile" / "tb"):
        with pytest.raises(ValueError, match="is a file"):
            mw.TensorBoardLogger(bad)
    folder = tmp_path / "tb"
    first = mw.TensorBoardLogger(folder)
    with pytest.raises(ValueError, match="Another TensorBoardLogger"):
        mw.TensorBoardLogger(folder)
    for i in (1, 2, 3):
        first(record(i))
    first.close()
    assert steps(folder) == [1, 2, 3]
    second = mw.TensorBoardLogger(folder)
    with pytest.warns(RuntimeWarning, match="new run"):
        second(record(1))  # a new run from iteration 1 would hide run A: it goes beside it
    second.close()
    assert steps(folder) == [1, 2, 3] and second.log_dir == str(tmp_path / "tb-2")
    assert steps(tmp_path / "tb-2") == [1]
    resumed = mw.TensorBoardLogger(folder)
    # a first record at 3: run A resumed from its checkpoint at 2, or run B (one step: no stride to tell)
    # continued; either reading would hide or mix another run's points, so neither folder is touched
    with pytest.warns(RuntimeWarning, match="could each be this run's") as said:
        resumed(record(3))
    resumed.close()
    assert len(said) == 1
    assert resumed.log_dir == str(tmp_path / "tb-3") and steps(folder) == [1, 2, 3] and steps(tmp_path / "tb-2") == [1]


class Flaky(nn.Module):
    """DenseDistillLoss whose ``fail_at``-th call gives non-finite terms."""

    def __init__(self, fail_at):
        super().__init__()
        self.inner = mw.DenseDistillLoss(2)
        self.term_names, self.num_exits, self.active = self.inner.term_names, 2, self.inner.active
        self.calls, self.fail_at = 0, fail_at

    def forward(self, outputs, target, *, teacher_outputs=None):
        self.calls += 1
        values = self.inner(outputs, target, teacher_outputs=teacher_outputs)
        return values * math.inf if self.calls == self.fail_at else values


def test_a_meta_step_undone_with_its_model_step_is_never_logged(tmp_path):
    torch.manual_seed(0)
    net = tiny_net(2, batchnorm=False)
    train, val = batch(8), batch(8)
    probe = Flaky(fail_at=0)
    copied = copy.deepcopy(net)
    mw.HarmonizedWeighter(copied, torch.optim.SGD(copied.parameters(), lr=0.1), probe).step(train, val)
    heard = []
    criterion = Flaky(fail_at=probe.calls)  # the model step's own terms, the last call of step()
    weighter = mw.HarmonizedWeighter(net, torch.optim.SGD(net.parameters(), lr=0.1), criterion,
                                     nonfinite="skip", callbacks=[heard.append])
    gamma = weighter.gamma.detach().clone()
    with pytest.warns(RuntimeWarning):
        result = weighter.step(train, val)
    assert result.model_step_skipped and torch.equal(weighter.gamma.detach(), gamma)
    assert heard == []  # the meta step was undone with the model step: nothing reported
    weighter.step(train, val)
    assert len(heard) == 1 and heard[0].meta_step == 1


@pytest.mark.parametrize("value", [np.float64(0.25), np.int64(3), argparse.Namespace(lr=0.1, out=Path("runs")),
                                   Path("runs/x.ckpt"), np.arange(3.0)])
def test_load_checkpoint_loads_common_safe_types_with_weights_only(tmp_path, value):
    path = mw.save_checkpoint({"value": value, "weights": torch.ones(2)}, tmp_path / "c.ckpt")
    loaded = mw.load_checkpoint(path)["value"]
    assert type(loaded) is type(value) and repr(loaded) == repr(value)


def test_load_checkpoint_loads_a_history_of_meta_step_records_with_weights_only(tmp_path):
    """A history of the records step() returns (a training checkpoint's) was refused by load_checkpoint's
    weights_only unpickler (found by helper-136): every field comes back, the tensor's values too."""
    import dataclasses

    torch.manual_seed(0)
    model = mw.MultiExit([nn.Linear(4, 4), nn.Linear(4, 4)], [nn.Linear(4, 3), nn.Linear(4, 3)])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(2), gamma_lr=0.01)
    history = [w.step((torch.randn(8, 4), torch.randint(0, 3, (8,))), (torch.randn(8, 4), torch.randint(0, 3, (8,))))
               for _ in range(2)]
    loaded = mw.load_checkpoint(mw.save_checkpoint({"history": history}, tmp_path / "h.pt"))["history"]
    for got, record in zip(loaded, history):
        assert type(got) is mw.MetaStepRecord and got.gamma_grad is not None
        for f in dataclasses.fields(record):
            a, b = getattr(got, f.name), getattr(record, f.name)
            assert torch.equal(a, b) if isinstance(b, torch.Tensor) else a == b, f.name


def test_load_checkpoint_loads_every_result_of_the_library_with_weights_only(tmp_path):
    # a deployment checkpoint: the costs, the thresholds chosen for accuracy, early exit's outputs
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(3, 60, 4, generator=g) * 3, torch.randint(0, 4, (60,), generator=g)
    net = mw.MultiExit([nn.Linear(4, 4), nn.Linear(4, 4)], [nn.Linear(4, 3), nn.Linear(4, 3)])
    state = {"costs": mw.exit_costs(net, torch.randn(1, 4)),
             "target": mw.thresholds_for_accuracy(logits, labels, 0.2, costs=[1.0, 2.0, 3.0]),
             "assignment": mw.exit_assignment(logits, [0.9, 0.8, 0.0]),
             "early_exit": mw.EarlyExit(net.eval(), [0.6, 0.0])(torch.randn(5, 4))}
    loaded = mw.load_checkpoint(mw.save_checkpoint(state, tmp_path / "deploy.pt"))
    assert loaded["costs"] == state["costs"] and loaded["costs"].macs == [4 * 4 + 4 * 3, 2 * (4 * 4 + 4 * 3)]
    assert loaded["target"] == state["target"]
    for key in ("assignment", "early_exit"):
        assert type(loaded[key]) is type(state[key])
        assert all(torch.equal(a, b) for a, b in zip(loaded[key], state[key]))


def test_load_checkpoint_tells_an_intact_file_needing_trust_from_a_damaged_one(tmp_path):
    path = mw.save_checkpoint({"when": datetime.datetime(2024, 1, 1)}, tmp_path / "c.ckpt")
    with pytest.raises(ValueError, match=r"is intact.*datetime\.datetime.*weights_only=False"):
        mw.load_checkpoint(path)
    assert mw.load_checkpoint(path, weights_only=False)["when"].year == 2024
    damaged = tmp_path / "d.ckpt"
    damaged.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="is damaged"):
        mw.load_checkpoint(damaged)


def test_load_checkpoint_tells_other_zips_damage_and_pickles_apart(tmp_path):
    import pickle
    import zipfile

    plain = tmp_path / "plain.zip"
    with zipfile.ZipFile(plain, "w") as archive:
        archive.writestr("hello.txt", "hi")
    np.savez(tmp_path / "arr.npz", a=np.arange(3))
    pickled = tmp_path / "p.pkl"
    pickled.write_bytes(pickle.dumps({"a": 1}))
    for path, weights_only, message in [(plain, True, "not one torch.save writes"),
                                        (tmp_path / "arr.npz", True, "numpy.load"),
                                        (pickled, True, "weights_only=False"),
                                        (pickled, False, "even with weights_only=False.*pickle.load")]:
        with pytest.raises(ValueError, match=message) as caught:
            mw.load_checkpoint(path, weights_only=weights_only)
        assert "intact" not in str(caught.value)
    if True:  # told to use weights_only=False when it was: no
        with pytest.raises(ValueError) as caught:
            mw.load_checkpoint(pickled, weights_only=False)
        assert "load it with load_checkpoint(path, weights_only=False)" not in str(caught.value)


@pytest.mark.parametrize("verify", [True, False])
def test_load_checkpoint_calls_bytes_before_the_archive_damage_not_an_intact_file(tmp_path, verify):
    """Bytes before a valid archive (Python's zipfile reads past them, torch's reader refuses them) were
    called "an intact torch.save archive", with torch's advice to load with weights_only=False. Now the
    file is damaged, and how many bytes come before the archive is said."""
    good = mw.save_checkpoint({"w": torch.arange(6.0), "n": 1}, tmp_path / "good.pt")
    prefixed = tmp_path / "prefixed.pt"
    prefixed.write_bytes(b"garbage" + good.read_bytes())
    with pytest.raises(ValueError) as caught:
        mw.load_checkpoint(prefixed, verify=verify)
    message = str(caught.value)
    assert "is damaged" in message and "7 bytes before the archive" in message, message
    assert "intact" not in message and "weights_only=False" not in message, message


def test_every_single_byte_flip_of_a_checkpoint_loads_the_same_or_is_called_damaged(tmp_path):
    """Walk every byte of a small checkpoint: a flip either changes nothing that was saved, or is
    refused as damaged; never loaded different, never called intact."""
    state = {"w": torch.arange(6.0).reshape(2, 3), "step": 3}
    raw = mw.save_checkpoint(state, tmp_path / "ok.pt").read_bytes()
    flipped, outcomes = tmp_path / "flip.pt", {"same": 0, "damaged": 0}
    for position in range(len(raw)):
        damaged = bytearray(raw)
        damaged[position] ^= 0x01
        flipped.write_bytes(bytes(damaged))
        try:
            loaded = mw.load_checkpoint(flipped)
        except ValueError as error:
            assert "is damaged" in str(error) and "intact" not in str(error), (position, str(error))
            outcomes["damaged"] += 1
        else:
            assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 3, position
            outcomes["same"] += 1
    assert outcomes["damaged"] > len(raw) // 2


@pytest.mark.parametrize("call, error, name", [
    (lambda p: mw.load_checkpoint(p, map_location="nodevice"), ValueError, "map_location"),
    (lambda p: mw.load_checkpoint(p, map_location={"cpu": "nodevice"}), ValueError, "map_location"),
    (lambda p: mw.load_checkpoint(p, map_location=3.5), TypeError, "map_location"),
    (lambda p: mw.load_checkpoint(p, map_location="cpu:1"), ValueError, r"Invalid map_location: 'cpu:1'.*one device"),
    (lambda p: mw.load_checkpoint(p, map_location=torch.device("cpu", 1)), ValueError, "'cpu:1'.*use 'cpu'"),
    (lambda p: mw.load_checkpoint(p, map_location={"cpu": "cpu:1"}), ValueError, "map_location: 'cpu:1'"),
    (lambda p: mw.load_checkpoint(p, map_location=f"cuda:{torch.cuda.device_count()}"), ValueError,
     "Invalid map_location: 'cuda:.*(is_available|numbered from 0)"),
    (lambda p: mw.save_checkpoint({"w": torch.zeros(2), "f": lambda: 0}, p), TypeError,
     r"`state\['f'\]` \(a function\) cannot be saved.*Nothing was written"),
    (lambda p: mw.save_checkpoint({"opt": [1, {"lock": __import__("threading").Lock()}]}, p), TypeError,
     r"`state\['opt'\]\[1\]\['lock'\]` \(a lock\) cannot be saved"),
    (lambda p: mw.save_checkpoint({"f": lambda: 0}, p.parent / "new" / "deeper" / "c.pt"), TypeError,
     r"`state\['f'\]`"),
    (lambda p: mw.save_checkpoint({"a": 1}, p.parent), ValueError, "is a folder"),
    (lambda p: mw.save_checkpoint({"a": 1}, p / "x.pt"), ValueError, "is a file, not a folder"),
])
def test_checkpoint_arguments_are_refused_before_anything_changes(tmp_path, call, error, name):
    path = mw.save_checkpoint({"w": torch.ones(2)}, tmp_path / "ok.pt")
    before = sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir())
    with pytest.raises(error, match=name):
        call(path)
    assert sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir()) == before  # no temp file, no folder
    assert torch.equal(mw.load_checkpoint(path, map_location="cpu")["w"], torch.ones(2))


def _no_write(monkeypatch, *denied):
    """``os.access`` as for a user without write permission on ``denied`` (a root user, as in CI, has it)."""
    real = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and Path(path) in denied:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def test_save_checkpoint_refuses_a_write_protected_file_and_an_unwritable_folder_naming_them(tmp_path, monkeypatch):
    """A checkpoint made read-only (chmod 444) to keep it was replaced silently (the rename ignores the
    file's mode) where torch.save refuses; in a folder that cannot be written the error was a bare
    PermissionError naming a temporary file the user never asked for. Now both are refused before
    anything is written, naming the file, or the folder and the path."""
    path = mw.save_checkpoint({"epoch": 10}, tmp_path / "best.pt")
    before = sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir())
    _no_write(monkeypatch, path)
    with pytest.raises(PermissionError, match=rf"{path} is write-protected.*Nothing was written"):
        mw.save_checkpoint({"epoch": 11}, path)
    monkeypatch.undo()
    _no_write(monkeypatch, tmp_path)
    for target, said in [(path, "renamed to best.pt"), (tmp_path / "new.pt", "renamed to new.pt"),
                         (tmp_path / "runs" / "c.pt", f"the folder {tmp_path / 'runs'} cannot be created")]:
        with pytest.raises(PermissionError) as caught:
            mw.save_checkpoint({"epoch": 11}, target)
        message = str(caught.value)
        assert f"{target} cannot be written: no write permission on the folder {tmp_path} (" in message, message
        assert said in message and "Nothing was written" in message and ".tmp" not in message, message
    assert sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir()) == before
    assert mw.load_checkpoint(path) == {"epoch": 10}


@pytest.mark.parametrize("location", ["cpu:0", torch.device("cpu", 0), {"cpu": "cpu:0"},
                                      {"cpu": torch.device("cpu", 0)}])
def test_checkpoint_loads_with_map_location_cpu_0(tmp_path, location):
    # 'cpu:0' is the name the cpu:1 error suggests; torch.load itself fails on it ("don't know how to
    # restore data location ... cpu:0"), every other torch call takes it
    state = {"w": torch.arange(6.0).reshape(2, 3), "nested": {"b": torch.tensor([7, 8])}}
    path = mw.save_checkpoint(state, tmp_path / "c.pt")
    loaded = mw.load_checkpoint(path, map_location=location)
    assert torch.equal(loaded["w"], state["w"]) and loaded["w"].device == torch.device("cpu")
    assert torch.equal(loaded["nested"]["b"], state["nested"]["b"])


def test_balanced_validation_refuses_a_state_of_another_number_of_exits():
    two, three = mw.BalancedValidation(2), mw.BalancedValidation(3)
    three.update(torch.tensor([1.0, 2.0, 3.0]))
    before = {k: v.clone() for k, v in two.state_dict().items()}
    with pytest.raises(ValueError, match="3 exits.*num_exits=2"):
        two.load_state_dict(three.state_dict())
    assert all(torch.equal(v, before[k]) for k, v in two.state_dict().items())
    two.load_state_dict(mw.BalancedValidation(2).state_dict())  # the same number: loads


def _all_masked_row(k=0, n=2):
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 4)
    logits[k, n] = -math.inf  # every class of one sample masked at one exit
    return logits


@pytest.mark.parametrize("call", [
    lambda L, y: mw.find_thresholds(L, torch.tensor([0.5, 0.5])),
    lambda L, y: mw.exit_assignment(L, torch.tensor([0.5, -1.0])),
    lambda L, y: mw.evaluate_thresholds(L, y, torch.tensor([0.5, -1.0]), [1, 2]),
    lambda L, y: mw.budgeted_curve(L, y, L, y, [1, 2]),
    lambda L, y: mw.thresholds_for_budget(L, y, [1, 2], 1.5),
    lambda L, y: mw.thresholds_for_accuracy(L, y, 0.1, costs=[1, 2]),
    lambda L, y: mw.anytime_accuracy_from_logits(L, y),
    lambda L, y: mw.fit_temperatures(L, y),
    lambda L, y: mw.calibrate(L, y),
    lambda L, y: mw.expected_calibration_error(L, y),
    lambda L, y: mw.find_thresholds(L, [0.5, 0.5], rule="entropy"),
])
def test_a_row_with_every_class_masked_is_refused_by_what_decides_with_it(call):
    """0/0 has no softmax: no confidence, no prediction. Every function that decides with exit scores
    refuses it and names the row, instead of a NaN score that silently keeps the sample in."""
    logits, labels = _all_masked_row(0, 2), torch.arange(6) % 4
    with pytest.raises(ValueError, match=r"\[0, 2\] \(exit 1, sample 2\) are all -inf"):
        call(logits, labels)
    overflow = logits.clone()
    overflow[0, 2] = torch.tensor([0.0, math.inf, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"exit 1, sample 2\) hold \+inf"):
        call(overflow, labels)
    partly = logits.clone()
    partly[0, 2, 2] = 0.0  # one class left, the label's (a label on a masked class is refused by the NLL fits)
    call(partly, labels)


class MaskedHead(nn.Module):
    """A head that masks every class of sample ``masked`` (at a given exit)."""

    def __init__(self, masked):
        super().__init__()
        self.fc, self.masked = nn.Linear(10, 5), masked

    def forward(self, h):
        z = self.fc(h)
        return z.index_fill(0, torch.tensor(self.masked, dtype=torch.long), -math.inf) if self.masked else z


@pytest.mark.parametrize("masked_at", [0, 1])
def test_early_exit_refuses_a_sample_with_every_class_masked(masked_at):
    torch.manual_seed(0)
    heads = [MaskedHead([3] if k == masked_at else []) for k in range(2)]
    net = mw.MultiExit([nn.Sequential(nn.Linear(6, 10), nn.Tanh()), nn.Sequential(nn.Linear(10, 10), nn.Tanh())],
                       heads).eval()
    x = torch.randn(8, 6)
    for predictor in (mw.EarlyExit(net, [2.0, -1.0]),  # nobody leaves early: both exits run
                      mw.EarlyExit(mw.attach_exits(nn.Sequential(net.stages[0], net.stages[1], heads[1]),
                                                   ["0"], [heads[0]]), [2.0, -1.0])):
        with pytest.raises(ValueError, match=rf"Exit {masked_at + 1} gave 1 sample\(s\) logits that are all -inf"):
            predictor(x)
    heads[masked_at].masked = []
    assert mw.EarlyExit(net, [2.0, -1.0])(x)[1].tolist() == [1] * 8


def test_find_thresholds_takes_int_proportions_and_lists():
    torch.manual_seed(0)
    logits = torch.randn(3, 40, 5)
    assert torch.equal(mw.find_thresholds(logits, [0, 0, 1]), mw.find_thresholds(logits, torch.tensor([0.0, 0.0, 1.0])))
    assert mw.find_thresholds(logits, torch.tensor([0, 0, 1])).tolist() == [1e8, 1e8, -1e8]  # all at the last exit
    assert torch.equal(mw.find_thresholds(logits, [0.5, 0.25, 0.25]),
                       mw.find_thresholds(logits, torch.tensor([0.5, 0.25, 0.25])))
    with pytest.raises(ValueError, match=r"sums to 10\. Normalise it"):
        mw.find_thresholds(logits, [4, 3, 3])  # counts are not a distribution: said so, not "finite fractions"
    thresholds = mw.find_thresholds(logits, [0.5, 0.25, 0.25])
    assert all(torch.equal(a, b) for a, b in zip(mw.exit_assignment(logits, thresholds.tolist()),
                                                 mw.exit_assignment(logits, thresholds)))


def _old_format(tmp_path):
    torch.save({"weights": torch.arange(300.0), "step": 3}, tmp_path / "old.ckpt", _use_new_zipfile_serialization=False)
    return (tmp_path / "old.ckpt").read_bytes()


@pytest.mark.parametrize("weights_only", [True, False])
def test_a_truncated_old_format_checkpoint_is_called_damaged_like_a_new_one(tmp_path, weights_only):
    """An old-format torch.save (five pickles, then the tensor data) cut anywhere after its first
    pickle: called damaged and truncated, as a cut zip archive is, whichever part the cut falls in;
    not "a pickle stream ... written by pickle.dump". The intact file loads."""
    good = _old_format(tmp_path)
    assert mw.load_checkpoint(tmp_path / "old.ckpt", weights_only=weights_only)["step"] == 3
    path = tmp_path / "cut.ckpt"
    for cut in (15, 16, 100, len(good) // 2, len(good) - 1200, len(good) - 1):
        path.write_bytes(good[:cut])
        with pytest.raises(ValueError) as caught:
            mw.load_checkpoint(path, weights_only=weights_only)
        text = str(caught.value)
        assert text.startswith(f"The checkpoint {path} is damaged: an old-format torch.save ({cut} bytes;"), (cut, text)
        assert "truncated" in text and text.endswith("Resume from an earlier checkpoint."), (cut, text)
    corrupt = bytearray(good)
    corrupt[40] = 0xFF  # an opcode pickle does not have, inside the second pickle
    path.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match=r"is damaged: an old-format torch.save.*corrupt near byte"):
        mw.load_checkpoint(path, weights_only=weights_only)


@pytest.mark.parametrize("damage, message", [
    (lambda good: b"", r"is empty \(0 bytes\).*earlier checkpoint"),
    (lambda good: good[: len(good) // 2], r"is damaged: it starts as a torch.save archive but its end is missing"),
    (lambda good: good[:100] + bytes(50) + good[150:], r"is damaged: .*'archive/data.pkl' fails its checksum"),
    (lambda good: b"step,loss\n1,0.5\n" * 20, r"is not a torch checkpoint.*starts with b'step,los'.*Check the path"),
    (lambda good: __import__("pickle").dumps({"a": 1}), r"is a pickle stream.*pickle.load"),
    (lambda good: __import__("pickle").dumps({"a": list(range(50))})[:60],
     r"is damaged: a pickle stream \(60 bytes\).*end early.*truncated.*earlier checkpoint"),
])
def test_load_checkpoint_says_what_is_wrong_with_a_file_in_full(tmp_path, damage, message):
    good = mw.save_checkpoint({"weights": torch.arange(300.0)}, tmp_path / "good.ckpt").read_bytes()
    path = tmp_path / "bad.ckpt"
    path.write_bytes(damage(good))
    with pytest.raises(ValueError, match=message) as caught:
        mw.load_checkpoint(path)
    text = str(caught.value)
    assert text.startswith(f"The checkpoint {path} ") and text.endswith(".")  # the file named; nothing cut short


def test_load_checkpoint_refuses_a_flipped_byte_in_the_weights_that_torch_load_takes(tmp_path):
    path = mw.save_checkpoint({"weights": torch.arange(1000.0)}, tmp_path / "c.ckpt")
    data = bytearray(path.read_bytes())
    at = bytes(data).index(torch.arange(1000.0)[500:502].numpy().tobytes())  # inside the tensor's bytes
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    loaded = torch.load(path, weights_only=True)["weights"]  # torch itself: a wrong weight, no word said
    assert not torch.equal(loaded, torch.arange(1000.0))
    with pytest.raises(ValueError, match=r"is damaged: .*/data/0' fails its checksum"):
        mw.load_checkpoint(path)
    assert not torch.equal(mw.load_checkpoint(path, verify=False)["weights"], torch.arange(1000.0))  # asked for
    with pytest.raises(TypeError, match="`verify`"):
        mw.load_checkpoint(path, verify="no")


def test_load_checkpoint_calls_an_intact_file_intact_when_loading_fails_elsewhere(tmp_path):
    path = mw.save_checkpoint({"weights": torch.ones(2)}, tmp_path / "c.ckpt")
    def fails(storage, location):
        raise RuntimeError("no such device here")

    with pytest.raises(ValueError, match=r"is an intact torch.save archive.*no such device here"):
        mw.load_checkpoint(path, map_location=fails)
    with pytest.raises(ValueError, match=r"Invalid map_location: 'nowhere'"):  # judged before the file is read
        mw.load_checkpoint(path, map_location="nowhere")
    with pytest.raises(FileNotFoundError, match="is a folder"):
        mw.load_checkpoint(tmp_path)


def test_every_python_file_compiles_without_warnings():
    files = [p for d in ("metaweight", "examples", "benchmarks", "tests", "references", "docs")
             for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 20
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # SyntaxWarning (3.12+) / DeprecationWarning: invalid escapes
            compile(path.read_text(), str(path), "exec")


@pytest.mark.parametrize("call, message", [
    (lambda: mw.calibrate(torch.randn(2, 5, 3), torch.zeros(5, dtype=torch.long), torch.randn(2, 5, 3)),
     "together"),
    (lambda: mw.calibrate(torch.randn(2, 5, 3), torch.zeros(5, dtype=torch.long), torch.randn(3, 5, 3),
                          torch.zeros(5, dtype=torch.long)), "same exits"),
    (lambda: mw.fit_temperatures(torch.randn(2, 5, 3), torch.zeros(5, dtype=torch.long), iterations=0),
     "iterations"),
    (lambda: mw.find_thresholds(torch.randn(2, 5, 3), torch.tensor([True, False])), "real numbers"),
    (lambda: mw.find_thresholds(torch.randn(2, 5, 3), torch.tensor([-1.0, 2.0])), "finite fractions"),
    (lambda: mw.CSVLogger(3), "path"),
    (lambda: mw.load_checkpoint(__file__, weights_only="yes"), "weights_only"),
    (lambda: mw.load_checkpoint(3), "`path`"),
    (lambda: mw.save_checkpoint({}, 3), "`path`"),
    (lambda: mw.EarlyExit("net", [0.5, -1.0]), "`model`"),
    (lambda: mw.EarlyExit(tiny_net(2), "abc"), "`thresholds`"),
    (lambda: mw.exit_costs(tiny_net(2), torch.randn(1, 6), num_exits="2"), "num_exits"),
    (lambda: mw.budgeted_curve(torch.randn(2, 5, 3), torch.zeros(5, dtype=torch.long), torch.randn(2, 5, 3),
                               torch.zeros(5, dtype=torch.long), [1, 2], qs=None), "qs"),
    (lambda: mw.thresholds_for_budget(torch.randn(2, 5, 3), torch.zeros(5, dtype=torch.long), [1, 2], 1.5,
                                      iterations=-1), "iterations"),
    (lambda: mw.collect_logits(tiny_net(2), [(torch.randn(2, 6), torch.zeros(2, dtype=torch.long))],
                               device="nope"), "device"),
    (lambda: mw.collect_logits(tiny_net(2), 3), "`loader`"),
    (lambda: mw.TensorBoardLogger(3), "log_dir_or_writer"),
    (lambda: mw.plot_budget_curves({}, "unused.png"), "`curves`"),  # was a bare StopIteration
    (lambda: mw.plot_anytime({}, "unused.png"), "`results`"),
    (lambda: mw.geometric_exit_distribution(-1.0, 3), "q"),
])
def test_arguments_are_judged_before_torch_sees_them(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_the_plot_command_writes_under_runs_by_default_and_says_where(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    from metaweight.__main__ import main

    curve = mw.budgeted_curve(torch.randn(2, 20, 3), torch.randint(0, 3, (20,)), torch.randn(2, 10, 3),
                              torch.randint(0, 3, (10,)), [1.0, 2.0], qs=[0.5, 1.0])
    result = tmp_path / "hdkd.json"
    result.write_text(__import__("json").dumps({"config": {"method": "hdkd"}, "budget": curve.to_dict()}))
    monkeypatch.chdir(tmp_path)
    main(["plot", str(result)])
    printed = capsys.readouterr().out.split()
    assert printed == [str(Path("runs") / "plots" / "budget.png")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hdkd.json", "runs"]  # nothing beside runs/


class BatchDict(nn.Module):
    """``forward(batch)`` reading ``batch["batch"]``: a dict whose one key is its one parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.fc = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, batch):
        return self.fc(torch.relu(self.body(batch["batch"])))


class BatchDictAnnotated(BatchDict):
    def forward(self, batch: dict):
        return self.fc(torch.relu(self.body(batch["batch"])))


class TensorAnnotated(BatchDict):
    def forward(self, batch: torch.Tensor):
        return self.fc(torch.relu(self.body(batch)))


def test_a_dict_keyed_by_the_one_parameter_is_read_by_its_annotation_or_refused():
    """{"batch": v} for forward(batch): the annotation decides (dict: the dict; Tensor: the value as
    batch=), else attach_exits, the wrapper and collect_logits refuse naming both readings; the
    answer equals the model's own forward called by hand."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 4), torch.zeros(6, dtype=torch.long)
    head = nn.Linear(8, 3)
    for cls, by_hand in ((BatchDictAnnotated, lambda m: m({"batch": x})), (TensorAnnotated, lambda m: m(x))):
        model = cls()
        attached = mw.attach_exits(model, ["body"], [head], example_input={"batch": x[:2]})
        with torch.no_grad():
            want = [head(model.body(x)), by_hand(model)]
            assert all(torch.equal(a, b) for a, b in zip(attached({"batch": x}), want))
            logits, _ = mw.collect_logits(attached, [({"batch": x}, y)])
        assert torch.allclose(logits, torch.stack(want))
    model = BatchDict()
    message = r"one key is the name of its one parameter.*`batch: Tensor`.*`batch: dict`"
    with pytest.raises(TypeError, match=message):
        mw.attach_exits(model, ["body"], [head], example_input={"batch": x[:2]})
    attached = mw.attach_exits(model, ["body"], [head])
    for run in (lambda: attached({"batch": x}), lambda: mw.collect_logits(attached, [({"batch": x}, y)]),
                lambda: mw.EarlyExit(attached, [0.5, 0.0])({"batch": x})):
        with pytest.raises(TypeError, match=message):
            run()


class MaskedNet(mw.MultiExit):
    """A multi-exit model whose forward takes ``(x, mask)`` while its stage 1 takes ``x`` alone."""

    def __init__(self) -> None:
        super().__init__([nn.Linear(6, 10), nn.Linear(10, 10)], [nn.Linear(10, 5), nn.Linear(10, 5)])

    def forward(self, x, mask=None):
        return super().forward(x if mask is None else x * mask)


def test_stage_one_that_cannot_take_the_models_arguments_is_refused_clearly():
    torch.manual_seed(0)
    net, x, mask = MaskedNet().eval(), torch.randn(9, 6), torch.ones(9, 6)
    predictor = mw.EarlyExit(net, [0.3, -1.0])
    for args, kwargs in (((x, mask), {}), (({"x": x, "mask": mask},), {}), ((), {"x": x, "mask": mask})):
        with pytest.raises(TypeError, match=r"stage 1 of `MaskedNet` \(`Linear.forward\(input\)`\).*cannot take"):
            predictor(*args, **kwargs)
    with torch.no_grad():
        want = mw.exit_assignment(torch.stack(net(x)), [0.3, -1.0])
    for args, kwargs in (((x,), {}), ((), {"x": x})):  # the one input stage 1 takes
        predictions, exits = predictor(*args, **kwargs)
        assert torch.equal(exits, want[0]) and torch.equal(predictions, want[1])


def test_a_validation_objective_that_scores_the_criterions_padding_is_refused():
    """An explicit BalancedValidation with another ignore_index than the criterion's would score the
    padding as a class: refused at construction; with one ignore_index, the meta step's validation
    losses leave the padding out (per-exit CE over the other samples, computed independently)."""
    torch.manual_seed(0)
    net = tiny_net(2, batchnorm=False)  # (BatchNorm's batch statistics would see the padded samples)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    crit = mw.DenseDistillLoss(2, ignore_index=0)
    with pytest.raises(ValueError, match=r"ignore_index=0.*leaves out -100.*BalancedValidation\(2, ignore_index=0\)"):
        mw.HarmonizedWeighter(net, opt, crit, mw.BalancedValidation(2))
    x, y = batch(16)
    y[:8] = 0
    net2, opt2 = copy.deepcopy((net, opt))
    w = mw.HarmonizedWeighter(net, opt, crit, mw.BalancedValidation(2, ignore_index=0))
    record = w.meta_step((x, y), (x, y))
    # the same look-ahead scored on the validation samples without padding
    alone = mw.HarmonizedWeighter(net2, opt2, crit, mw.BalancedValidation(2, ignore_index=0))
    expected = alone.meta_step((x, y), (x[8:], y[8:]))["val_exit_losses"]
    assert record["val_exit_losses"] == pytest.approx(expected, rel=1e-5)


def test_a_logger_that_cannot_write_warns_and_never_raises_after_the_step(tmp_path):
    import shutil

    torch.manual_seed(0)
    net = tiny_net(2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    folder = tmp_path / "logs"
    logger = mw.CSVLogger(folder / "log.csv")
    w = mw.HarmonizedWeighter(net, opt, mw.DenseDistillLoss(2), callbacks=[logger])
    b = batch(16)
    w.step(b, b)
    shutil.rmtree(folder)
    folder.write_text("a file where the folder was")  # a deleted folder is made again; this cannot be
    with pytest.warns(RuntimeWarning, match="could not write iteration 2.*training step stands"):
        w.step(b, b)
    assert w.num_calls == 2
    logger.close()


def test_csv_logger_never_loses_rows_nor_raises_for_what_it_meets_mid_run(tmp_path):
    """Each thing a logger meets after its first row: a new weighter on it (iterations from 1 again),
    a record with new columns, one without some, the file deleted, a record it cannot read. Rows are
    never lost unasked and nothing raises out of the hook (the step it reports stands)."""
    # a new weighter counting from 1 with the same logger: every row would go -> NAME-2.csv, warned
    path = tmp_path / "run.csv"
    logger = mw.CSVLogger(path)
    for i in (1, 2, 3, 4):
        logger(record(i))
    before = path.read_bytes()
    with pytest.warns(RuntimeWarning, match=r"iterations 1 to 4.*iteration 1.*new run.*run-2\.csv"):
        logger(record(1))
    logger(record(2))
    assert path.read_bytes() == before and logger.path == tmp_path / "run-2.csv"
    assert [r[0] for r in rows(logger.path)] == ["iteration", "1", "2"]
    logger.close()
    # a real new weighter handed the same logger (a second stage of training)
    path = tmp_path / "stages.csv"
    logger = mw.CSVLogger(path)
    for lr in (0.1, 0.01):
        torch.manual_seed(0)
        net = tiny_net(2, batchnorm=False)
        w = mw.HarmonizedWeighter(net, torch.optim.SGD(net.parameters(), lr=lr), mw.DenseDistillLoss(2),
                                  callbacks=[logger])
        with warnings.catch_warnings(record=True) as heard:
            warnings.simplefilter("always")
            for _ in range(3):
                w.step(batch(8), batch(8))
        assert [str(h.message) for h in heard if "new run" in str(h.message)] == ([] if lr == 0.1 else [
            str(heard[0].message)])
    assert [r[0] for r in rows(path)] == ["iteration", "1", "2", "3"]
    assert [r[0] for r in rows(tmp_path / "stages-2.csv")] == ["iteration", "1", "2", "3"]
    logger.close()
    # new columns mid-run (RLW: a meta_step without loss() has no terms, the next step() has)
    path = tmp_path / "columns.csv"
    torch.manual_seed(0)
    net = tiny_net(2, batchnorm=False)
    logger = mw.CSVLogger(path)
    w = mw.RLW(net, torch.optim.SGD(net.parameters(), lr=0.1), mw.DenseDistillLoss(2), callbacks=[logger])
    b = batch(8)
    w.optimizer.step()  # (a step on no gradient: a meta_step with no step since the weighting was built learns nothing)
    w.meta_step(b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing lost, nothing to warn about
        second = w.step(b)
    table = list(csv.DictReader(open(path, newline="")))
    assert [r["iteration"] for r in table] == ["1", "2"] and w.num_calls == 2
    assert table[0]["term/ce[1]"] == "" and float(table[1]["term/ce[1]"]) == pytest.approx(second["terms"]["ce[1]"])
    header = rows(path)[0]
    assert header[:2] == ["iteration", "meta_step"] and all(len(r) == len(header) for r in rows(path))
    # a record without some columns: blanks, under the same header
    short = {k: v for k, v in dict(second).items() if k != "terms"}
    logger(dict(short, iteration=3))
    assert rows(path)[0] == header and rows(path)[-1][0] == "3" and rows(path)[-1][-1] == ""
    # the file deleted mid-run: it starts again with its header, warned
    path.unlink()
    with pytest.warns(RuntimeWarning, match="deleted or emptied"):
        logger(record(4))
    assert rows(path)[0][:len(header)] == header and "val_objective" in rows(path)[0]
    assert [r[0] for r in rows(path)] == ["iteration", "4"]
    # a record the logger cannot read: warned, never raised
    with pytest.warns(RuntimeWarning, match="could not write iteration None.*training step stands"):
        logger({"iteration": None, "meta_step": 0, "gamma": {}})
    logger.close()


def test_tensorboard_logger_never_raises_out_of_the_hook(tmp_path):
    pytest.importorskip("tensorboard")

    class Broken:
        def add_scalar(self, tag, value, step):
            raise RuntimeError("the writer is closed")

    logger = mw.TensorBoardLogger(Broken())
    with pytest.warns(RuntimeWarning, match="could not write iteration 1.*RuntimeError.*training step stands"):
        logger(record(1))


def test_a_file_rewritten_in_place_keeps_its_permissions_and_its_symbolic_link(tmp_path):
    """What ``open(path, "w")`` / ``torch.save(state, path)`` keep, every atomic rewrite keeps: the
    replaced file's permissions, a new file's permissions from the umask (not mkstemp's 0o600), and a
    symbolic link at the path (its target is written)."""
    import os
    import stat

    def mode(p):
        return stat.S_IMODE(os.stat(p).st_mode)

    old = os.umask(0o027)
    try:
        fresh = mw.save_checkpoint({"a": 1}, tmp_path / "new.pt")
        assert mode(fresh) == 0o640  # as open() under this umask
    finally:
        os.umask(old)
    existing = tmp_path / "c.pt"
    torch.save({"a": 1}, existing)
    existing.chmod(0o604)
    mw.save_checkpoint({"a": 2}, existing)
    assert mode(existing) == 0o604 and mw.load_checkpoint(existing) == {"a": 2}
    (tmp_path / "run3").mkdir()
    target = mw.save_checkpoint({"a": 3}, tmp_path / "run3" / "ckpt.pt")
    link = tmp_path / "latest.pt"
    link.symlink_to(Path("run3") / "ckpt.pt")
    assert mw.save_checkpoint({"a": 4}, link) == link
    assert link.is_symlink() and torch.load(target)["a"] == 4
    assert sorted(p.name for p in (tmp_path / "run3").iterdir()) == ["ckpt.pt"]  # no temporary file left
    # the CSV log's rewrite (a torn last line dropped) through a link, and its permissions
    log = tmp_path / "logs" / "run.csv"
    log.parent.mkdir()
    log.write_text("iteration,meta_step,val_objective,val_ce[1],val_ce[2],gamma/ce[1],term/ce[1]\n"
                   "1,1,1.0,1.0,2.0,1.0,0.5\n2,2,0.5")
    log.chmod(0o604)
    (tmp_path / "log.csv").symlink_to(log)
    logger = mw.CSVLogger(tmp_path / "log.csv")
    logger(record(2))
    logger.close()
    assert (tmp_path / "log.csv").is_symlink() and mode(log) == 0o604
    assert [r[0] for r in rows(log)] == ["iteration", "1", "2"]


@pytest.mark.parametrize("kind", ["named pipe", "character device"])
def test_a_path_that_is_no_file_is_written_to_and_never_replaced(tmp_path, kind):
    """``save_checkpoint(state, os.devnull)`` put a regular file in place of the null device (its atomic rename),
    as root destroying /dev/null; a CSVLogger took it, then warned of a log "deleted or emptied" at every row. A
    device or a pipe is now written to as torch.save writes it, left what it is; a logger, which reads its log back
    and rewrites it, refuses it when made; load_checkpoint names what it is. (A null device of the test's own,
    where one can be made, and a named pipe read by another thread.)"""
    import io
    import stat
    import threading

    node = tmp_path / "node"
    if kind == "named pipe":
        os.mkfifo(node)
        check = stat.S_ISFIFO
    else:
        try:
            os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # (Linux's null device: writes are dropped)
        except (OSError, AttributeError):
            pytest.skip("this user cannot make a device node")
        check = stat.S_ISCHR
    state = {"a": torch.arange(3.0), "b": "x"}
    read: list[bytes] = []
    reader = threading.Thread(target=lambda: read.append(node.open("rb").read()), daemon=True)
    if kind == "named pipe":
        reader.start()
    assert mw.save_checkpoint(state, node) == node
    assert check(os.stat(node).st_mode), "replaced by a regular file"
    if kind == "named pipe":
        reader.join(timeout=30)
        got = torch.load(io.BytesIO(read[0]))
        assert torch.equal(got["a"], state["a"]) and got["b"] == "x"
    with pytest.raises(TypeError, match=r"state\['f'\]` \(a function\) cannot be saved"):  # refused whole: nothing written
        mw.save_checkpoint({"f": lambda: 0}, node)
    assert check(os.stat(node).st_mode)
    what = r"a named pipe \(FIFO\)" if kind == "named pipe" else "a character device"
    with pytest.raises(ValueError, match=f"is {what}.*not a file.*to log nothing, pass no CSVLogger"):
        mw.CSVLogger(node)
    with pytest.raises(FileNotFoundError, match=f"is {what}, not a checkpoint file"):
        mw.load_checkpoint(node)
    assert check(os.stat(node).st_mode)


@pytest.mark.parametrize("make", ["calibration", "budget_curve", "budget_point", "anytime"])
def test_the_librarys_own_results_load_with_weights_only(tmp_path, make):
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 30, 3), torch.randint(0, 3, (30,))
    value = {
        "calibration": lambda: mw.calibrate(logits, labels),
        "budget_curve": lambda: mw.budgeted_curve(logits, labels, logits, labels, [1.0, 2.0], qs=[0.5, 1.0]),
        "budget_point": lambda: mw.evaluate_thresholds(logits, labels, [0.5, 0.0], [1.0, 2.0]),
        "anytime": lambda: mw.anytime_accuracy_from_logits(logits, labels, topk=[1, 2]),
    }[make]()
    path = mw.save_checkpoint({"result": value}, tmp_path / "r.pt")
    loaded = mw.load_checkpoint(path)["result"]  # weights_only=True, the default
    assert type(loaded) is type(value) and loaded == value


def test_the_lightning_callback_moves_validation_batches_as_the_library_does():
    """One mover for every batch form (namedtuple, dict of inputs, nested lists): the callback uses the
    library's ``to_device``, not a copy of its own."""
    import collections
    import types

    pytest.importorskip("lightning")
    from metaweight import _anytime
    from metaweight import lightning as mwl

    assert not hasattr(mwl, "_to")
    Pair = collections.namedtuple("Pair", "x y")
    batches = [Pair(torch.randn(2, 4), torch.tensor([0, 1])),
               ({"x": torch.randn(2, 4), "mask": [torch.ones(2)]}, torch.tensor([0, 1]))]
    callback = mwl.HarmonizedCallback(mw.DenseDistillLoss(2), batches)
    heard = []
    callback.weighter = types.SimpleNamespace(mode="exact", meta_step=lambda train, val: heard.append(val))
    callback._val = iter(batches)
    module = types.SimpleNamespace(device=torch.device("meta"))
    for _ in batches:
        callback.on_train_batch_start(None, module, None, 0)
    assert type(heard[0]) is Pair and heard[0].x.is_meta and heard[0].y.is_meta
    assert heard[1][0]["x"].is_meta and heard[1][0]["mask"][0].is_meta and heard[1][1].is_meta
    expected = _anytime.to_device(batches[1], "meta")
    assert heard[1][0].keys() == expected[0].keys()


def test_the_plot_command_labels_every_run_apart_and_names_a_bad_file(tmp_path, capsys, monkeypatch):
    """Three runs of one method (seeds in s0, s1, s2) are three labelled runs, none overwritten; a
    missing file, a file that is not JSON, and a result lacking ``num_samples`` each stop the command
    with a message naming the file, before anything is written."""
    pytest.importorskip("matplotlib")
    import json

    import metaweight.__main__ as cli

    files = []
    for seed in range(3):
        (tmp_path / f"s{seed}").mkdir()
        files.append(tmp_path / f"s{seed}" / "result.json")
        files[-1].write_text(json.dumps({"config": {"method": "hdkd"},
                                         "test": {"num_samples": 10, "top1": [10.0 + seed, 20.0 + seed]},
                                         "gamma_history": [{"step": 1, "gamma": [0.5, 0.5]}],
                                         "term_names": ["ce[1]", "ce[2]"]}))
    other = tmp_path / "uw.json"
    other.write_text(json.dumps({"config": {"method": "uw"}, "test": {"num_samples": 10, "top1": [1.0, 2.0]}}))
    seen = {}
    real = cli.plot_anytime
    monkeypatch.setattr(cli, "plot_anytime", lambda results, path, **k: (seen.update(results), real(results, path,
                                                                                                      **k))[1])
    out = tmp_path / "plots"
    cli.main(["plot", *map(str, files), str(other), "--out", str(out)])
    assert {n: r.accuracy[1] for n, r in seen.items()} == {
        "hdkd (s0)": [10.0, 20.0], "hdkd (s1)": [11.0, 21.0], "hdkd (s2)": [12.0, 22.0], "uw": [1.0, 2.0]}
    assert sorted(p.name for p in out.iterdir()) == ["anytime.png", "gamma-hdkd__s0_.png", "gamma-hdkd__s1_.png",
                                                     "gamma-hdkd__s2_.png"]
    capsys.readouterr()
    (tmp_path / "bad.json").write_text(json.dumps({"test": {"top1": [1.0]}}))
    (tmp_path / "text.json").write_text("not json")
    for argv, message in [([str(tmp_path / "missing.json")], "missing.json: no such file"),
                          ([str(tmp_path / "text.json")], "text.json is not a JSON file"),
                          ([str(tmp_path / "bad.json")], "bad.json: its 'test' entry lacks the key 'num_samples'"),
                          ([str(files[0]), str(files[0])], "given twice")]:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["plot", *argv, "--out", str(tmp_path / "never")])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "never").exists()


def _plot_calls(tmp_path):
    """(what, call, error, message): every plot_* argument the library can judge before drawing."""
    torch.manual_seed(0)
    L, y = torch.randn(3, 50, 4), torch.randint(0, 4, (50,))
    curve = mw.budgeted_curve(L, y, L, y, [1.0, 2.0, 3.0], qs=[0.5, 1.0])
    a3 = mw.anytime_accuracy_from_logits(L, y, topk=[1])
    a2 = mw.anytime_accuracy_from_logits(L[:2], y, topk=[1])
    out = tmp_path / "new" / "deeper"
    nan = L.clone()
    nan[1, 3, 2] = float("nan")
    other_unit = mw.BudgetCurve(curve.points, curve.costs, cost_unit="FLOPs")
    return [
        ("one temperature for 3 exits", lambda: mw.plot_reliability(L, y, out / "r.png", temperatures=[2.0]),
         ValueError, "3 positive finite numbers"),
        ("negative temperature", lambda: mw.plot_reliability(L, y, out / "r.png", temperatures=[-1.0, 0.0, 1.0]),
         ValueError, "positive finite"),
        ("labels [N, 1]", lambda: mw.plot_reliability(L, y[:, None], out / "r.png"), ValueError, r"shape \(50,\)"),
        ("bins 0", lambda: mw.plot_reliability(L, y, out / "r.png", bins=0), ValueError, "Invalid bins"),
        ("NaN logits", lambda: mw.plot_reliability(nan, y, out / "r.png"), ValueError, "exit 2: 1 NaN"),
        ("logits [N, C]", lambda: mw.plot_reliability(L[0], y, out / "r.png"), ValueError, r"\[K, N, C\]"),
        ("bad suffix", lambda: mw.plot_budget_curves({"a": curve}, out / "x.unknownext"), ValueError,
         "suffix of an image format"),
        ("a folder", lambda: mw.plot_budget_curves({"a": curve}, tmp_path), ValueError, "is a folder"),
        ("scale 0", lambda: mw.plot_budget_curves({"a": curve}, out / "b.png", scale=0), ValueError,
         "Invalid scale"),
        ("not a curve", lambda: mw.plot_budget_curves({"a": [1, 2]}, out / "b.png"), TypeError, "BudgetCurve"),
        ("two cost units", lambda: mw.plot_budget_curves({"a": curve, "b": other_unit}, out / "b.png"), ValueError,
         "different costs"),
        ("exits differ", lambda: mw.plot_anytime({"a": a3, "b": a2}, out / "a.png"), ValueError,
         r"different numbers of exits \{'a': 3, 'b': 2\}"),
        ("not a result", lambda: mw.plot_anytime({"a": {1: [1.0]}}, out / "a.png"), TypeError, "AnytimeResult"),
        ("k not an int", lambda: mw.plot_anytime({"a": a3}, out / "a.png", k="1"), TypeError, "`k`"),
        ("steps and gammas", lambda: mw.plot_gamma_history([1, 2], [[0.1, 0.2]], ["ce[1]", "ce[2]"], out / "g.png"),
         ValueError, "one snapshot per step"),
        ("gammas and names", lambda: mw.plot_gamma_history([1], [[0.1, 0.2]], ["ce[1]", "ce[2]", "kd[2->1]"],
                                                           out / "g.png"), ValueError, "3 finite weights"),
        ("title", lambda: mw.plot_anytime({"a": a3}, out / "a.png", title=3), TypeError, "`title`"),
    ]


def test_every_name_is_in_the_legend_even_one_starting_with_an_underscore(tmp_path, monkeypatch):
    """matplotlib leaves labels starting with "_" out of a legend: a method "_baseline" or a term
    "_aux" is drawn and still named."""
    pytest.importorskip("matplotlib")
    import metaweight._plots as plots

    legends, save = {}, plots._save

    def spy(fig, path):
        legends[path.name] = " | ".join(t.get_text() for ax in fig.axes if ax.get_legend()
                                        for t in ax.get_legend().get_texts())
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    result = mw.AnytimeResult({1: [40.0, 50.0]}, 10)
    point = mw.BudgetPoint(q=0.5, thresholds=[0.5, 0.0], cost=1.5, accuracy=60.0, exit_fractions=[0.5, 0.5])
    mw.plot_anytime({"_baseline": result, "hdkd": result}, tmp_path / "a.png")
    curve = mw.BudgetCurve([point], [1.0, 2.0])
    mw.plot_budget_curves({"_baseline": curve, "hdkd": curve}, tmp_path / "b.png")
    mw.plot_gamma_history([1, 2], [[0.5, 0.5], [0.4, 0.6]], ["_aux", "ce[2]"], tmp_path / "g.png")
    for file, names in (("a.png", ["_baseline", "hdkd"]), ("b.png", ["_baseline", "hdkd"]),
                        ("g.png", ["_aux", "ce[2]"])):
        assert all(name in legends[file] for name in names), (file, legends[file])


def test_plots_judge_every_argument_before_drawing_and_leave_no_folder(tmp_path):
    pytest.importorskip("matplotlib")
    for what, call, error, message in _plot_calls(tmp_path):
        with pytest.raises(error, match=message):
            call()
        assert not (tmp_path / "new").exists(), what
    # a save that fails after all: the folders made for it are gone again
    import matplotlib.figure

    torch.manual_seed(0)
    L, y = torch.randn(3, 50, 4), torch.randint(0, 4, (50,))
    cal = mw.calibrate(L, y)
    original = matplotlib.figure.Figure.savefig
    try:
        matplotlib.figure.Figure.savefig = lambda *a, **k: (_ for _ in ()).throw(OSError("disk full"))
        with pytest.raises(OSError, match="disk full"):
            mw.plot_reliability(L, y, tmp_path / "new" / "r.png", temperatures=cal)
    finally:
        matplotlib.figure.Figure.savefig = original
    assert not (tmp_path / "new").exists()
    # a Calibration is the temperatures it holds: the same figure as its list
    a = mw.plot_reliability(L, y, tmp_path / "a.svg", temperatures=cal)
    b = mw.plot_reliability(L, y, tmp_path / "b.svg", temperatures=cal.temperatures)
    assert a.is_file() and b.is_file()


class _MaskLast(nn.Module):
    """An exit head whose last class is masked (-inf) for every sample."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).masked_fill(torch.arange(3) == 2, -math.inf)


@pytest.mark.parametrize("where", ["train", "val"])
def test_a_step_refused_for_a_label_on_a_masked_class_names_the_cause(where):
    """A label on a -inf logit makes its CE term +inf (not NaN); the refused step said only "check the
    data and the learning rates". Now it names the masked class and the fix; nothing is changed."""
    torch.manual_seed(0)
    net = mw.MultiExit([nn.Linear(4, 4), nn.Linear(4, 4)], [_MaskLast(), _MaskLast()])
    weighter = mw.HarmonizedWeighter(net, torch.optim.SGD(net.parameters(), lr=0.1), mw.DenseDistillLoss(2))
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    bad = y.clone()
    bad[0] = 2
    before = copy.deepcopy(net.state_dict())
    batches = ((x, bad), (x, y)) if where == "train" else ((x, y), (x, bad))
    with pytest.raises(ValueError, match=r"infinite \(not NaN\) cross-entropy means a label sits on a class whose "
                                         r"logit is -inf .*do not mask the true class"):
        weighter.step(*batches)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_load_checkpoint_names_a_torchscript_archive(tmp_path):
    """A torch.jit.save file was called "an intact torch.save archive, but torch.load failed" (found by
    helper-142): it is named as TorchScript, with torch.jit.load to load it."""
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(path))
    with pytest.raises(ValueError, match=r"is a TorchScript archive \(torch\.jit\.save.*load it with torch\.jit\.load"):
        mw.load_checkpoint(path)
