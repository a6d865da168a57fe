"""Issue 22, second review: nothing silently wrong outside the training step. One test per kind of
fault, walking the members found of it: evaluation that mixes devices, what a model returns judged
too loosely, early exit that keeps a stale structure or casts away the model's precision, argument
checks that come after the work or accept a truthy stand-in, raw errors for inputs the library can
judge (meta tensors, sequence-first batches, NumPy and 0-d tensor scalars), user heads of another
dtype. References: plain per-sample loops (references/exit_rules.py) and Python's own floats."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import metaweight as mw
import metaweight._anytime as anytime_module
from conftest import tiny_net

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from references.exit_rules import loop_assign, score  # noqa: E402


def test_labels_on_another_device_than_the_model_are_taken_where_the_logits_are():
    """A CPU model asked to run on another device is refused up front, not from inside the model
    (the device is where the inputs go; the model is not moved). The CPU cannot hold a second device,
    so the availability check is lifted here: the refusal must come before anything touches it."""
    net = tiny_net(2).eval()
    loader = [(torch.randn(4, 6), torch.randint(0, 5, (4,)))]
    original = anytime_module.check_device_available
    anytime_module.check_device_available = lambda device, name="device": None
    try:
        for call in (lambda: mw.collect_logits(net, loader, device="cuda"),
                     lambda: mw.anytime_accuracy(net, loader, topk=(1,), device="cuda:0")):
            with pytest.raises(ValueError, match=r"model's parameters are on 'cpu'.*model.to\('cuda"):
                call()
    finally:
        anytime_module.check_device_available = original
    # on the model's own device, CPU labels and padding: the labels kept are exactly the unpadded ones
    labels = torch.tensor([0, -100, 2, 1])
    logits, kept = mw.collect_logits(net, [(torch.randn(4, 6), labels)], device="cpu")
    assert kept.tolist() == [0, 2, 1] and logits.shape == (2, 3, 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: labels on the CPU, model on the GPU")
def test_cpu_labels_for_a_gpu_model_in_every_evaluation():
    net = tiny_net(2).cuda().eval()
    x, y = torch.randn(8, 6), torch.tensor([0, 1, 2, 3, 4, -100, 1, 2])
    logits, labels = mw.collect_logits(net, [(x, y)])  # inputs moved, CPU labels with padding
    assert labels.tolist() == [0, 1, 2, 3, 4, 1, 2]
    mw.anytime_accuracy(net, [(x, y)], topk=(1,))
    outputs = net(x.cuda())
    mw.DenseDistillLoss(2)(outputs, y)  # padding left out, labels on the CPU
    mw.BalancedValidation(2)(outputs, y)
    z = torch.stack(outputs).detach()
    mw.anytime_accuracy_from_logits(z[:, :5], y[:5], topk=(1,))
    mw.evaluate_thresholds(z[:, :5], y[:5], [0.5, -1.0], [1.0, 2.0])
    mw.exit_assignment(z, torch.tensor([0.5, -1.0]))
    mw.EarlyExit(net, torch.tensor([0.5, -1.0]))(x.cuda())


def test_what_the_model_returns_is_declared_never_guessed():
    class Probabilities(nn.Module):  # (logits, probabilities): one exit, not two
        def __init__(self):
            super().__init__()
            self.body, self.out = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x):
            z = self.out(torch.relu(self.body(x)))
            return z, z.softmax(-1)

    x = torch.randn(2, 4)
    for example_input in (x, None):  # with and without: neither path takes the probabilities as an exit
        with pytest.raises(ValueError, match=r"model.num_exits = 1"):
            mw.attach_exits(Probabilities(), ["body"], [nn.Linear(8, 3)], example_input=example_input)(x)
    model = Probabilities()
    model.num_exits = 1  # declared: the first tensor is the logits
    attached = mw.attach_exits(model, ["body"], [nn.Linear(8, 3)], example_input=x)
    out = attached(x)
    assert attached.num_exits == 2 and len(out) == 2 and torch.equal(out[1], model(x)[0])
    # a multi-exit model says how many it returns: all kept, in order
    net = tiny_net(2, features=4).eval()
    attached = mw.attach_exits(net, ["stages.0"], [nn.Linear(10, 5)], example_input=torch.randn(3, 4))
    x3 = torch.randn(3, 4)
    out = attached(x3)
    assert attached.num_exits == 3 and len(out) == 3 and all(torch.equal(a, b) for a, b in zip(out[1:], net(x3)))
    # (logits, hidden) of other shapes: the first is the logits, as documented
    class Hidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.out = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return self.out(h), h

    assert mw.attach_exits(Hidden(), ["body"], [nn.Linear(8, 3)], example_input=x).num_exits == 2


def test_early_exit_reads_the_model_at_every_call():
    net = mw.MultiExit([nn.Linear(4, 4), nn.Linear(4, 4)], [nn.Linear(4, 3), nn.Linear(4, 3)]).eval()
    predictor = mw.EarlyExit(net, [-1.0, -1.0])  # everyone leaves at exit 1
    x = torch.randn(6, 4)
    net.heads[0] = nn.Linear(4, 3)  # replaced after construction: the new head decides
    assert predictor(x)[0].tolist() == net(x)[0].argmax(-1).tolist()
    # a stage replaced later, the model in train mode: it is switched to eval too (no dropout)
    net.stages[0] = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.9))
    net.train()
    first, second = predictor(x), predictor(x)
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[0], net.eval()(x)[0].argmax(-1)) and net.train().stages[0][1].training
    # a head added: the thresholds no longer match, said so
    net.stages.append(nn.Linear(4, 4))
    net.heads.append(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="now has 3 exits.*2 thresholds"):
        predictor(x)


def test_early_exit_decides_in_the_model_dtype_and_keeps_its_thresholds():
    # float64: logits one float32 ulp apart; the model (and a Python loop) predicts class 1
    net = mw.MultiExit([nn.Identity(), nn.Identity()], [nn.Identity(), nn.Identity()]).double()
    x = torch.tensor([[1.0, 1.0 + 1e-12, 0.0]], dtype=torch.float64)
    logits = torch.stack(net(x))
    _, reference = loop_assign("max_probability", logits.tolist(), [-1.0, -1.0])
    exits, classes = mw.exit_assignment(logits, [-1.0, -1.0])
    predictions, early = mw.EarlyExit(net, [-1.0, -1.0])(x)
    assert reference == [1] and classes.tolist() == [1] and predictions.tolist() == [1] and early.tolist() == [0]
    # float64 scores: a threshold between two float64 scores closer than float32 can tell apart
    z = torch.tensor([[[0.0, 1e-9], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    s = [score("max_probability", [z[0, i].tolist()], 0) for i in range(2)]
    threshold = (s[0] + s[1]) / 2  # sample 0 (score above 0.5) leaves, sample 1 (exactly 0.5) stays
    assert mw.exit_assignment(z, [threshold, -1.0])[0].tolist() == loop_assign("max_probability", z.tolist(),
                                                                                  [threshold, -1.0])[0] == [0, 1]
    # casting the predictor casts the model, never the thresholds
    torch.manual_seed(0)
    net = mw.MultiExit([nn.Linear(16, 16), nn.Linear(16, 16)], [nn.Linear(16, 10), nn.Linear(16, 10)]).eval()
    given = torch.tensor([0.2013, -1e8])
    for cast in (lambda m: m.bfloat16(), lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.float()):
        model = mw.MultiExit([nn.Linear(16, 16), nn.Linear(16, 16)], [nn.Linear(16, 10), nn.Linear(16, 10)]).eval()
        model.load_state_dict(net.state_dict())
        predictor = cast(mw.EarlyExit(model, given))
        assert predictor.thresholds.dtype == torch.float64 and predictor.thresholds.tolist() == given.double().tolist()
        dtype = next(model.parameters()).dtype
        x = torch.randn(2000, 16).to(dtype)
        predictions, early = predictor(x)
        z = torch.stack(model(x))
        expected_exits, expected_classes = mw.exit_assignment(z, given)
        assert torch.equal(early, expected_exits) and torch.equal(predictions, expected_classes)
        ref_exits, ref_classes = loop_assign("max_probability", z.float().tolist(), given.tolist())
        scores = torch.softmax(z[0].float(), -1).amax(-1)
        clear = (scores.double() - float(given[0])).abs() > 1e-6  # float32 scores vs the loop's float64
        assert early[clear].tolist() == torch.tensor(ref_exits)[clear].tolist()
    # a state dict of float32 thresholds loads into the float64 buffer
    predictor = mw.EarlyExit(net, given)
    predictor.load_state_dict({k: v.float() if k == "thresholds" else v for k, v in predictor.state_dict().items()})
    assert predictor.thresholds.dtype == torch.float64


def test_arguments_are_checked_before_any_work_and_flags_are_bools():
    consumed = []

    def loader():
        for i in range(3):
            consumed.append(i)
            yield torch.randn(5, 6), torch.randint(0, 5, (5,))

    net = tiny_net(2)
    with pytest.raises(ValueError, match="Invalid topk: 5"):
        mw.anytime_accuracy(net, loader(), topk=5)
    assert consumed == []
    # one ignore_index check, as the losses'
    for bad in (True, 1.0, None, "pad"):
        for call in (lambda: mw.collect_logits(net, [(torch.randn(5, 6), torch.tensor([0, 1, 2, 1, 0]))],
                                               ignore_index=bad),
                     lambda: mw.anytime_accuracy(net, loader(), ignore_index=bad),
                     lambda: mw.DenseDistillLoss(2, ignore_index=bad),
                     lambda: mw.BalancedValidation(2, ignore_index=bad)):
            with pytest.raises(TypeError, match=r"Invalid ignore_index: .*Expected an int"):
                call()
    assert consumed == []
    # bool flags: a truthy string is not True
    seq = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    for call, name in ((lambda: mw.attach_exits(seq, ["0"], [nn.Linear(4, 3)], include_output="no"), "include_output"),
                       (lambda: mw.exit_costs(net, torch.randn(1, 6), executed=1), "executed"),
                       (lambda: mw.HarmonizedWeighter(net, torch.optim.SGD(net.parameters(), 0.1),
                                                      mw.DenseDistillLoss(2), learn="no"), "learn"),
                       (lambda: mw.HarmonizedWeighter(net, torch.optim.SGD(net.parameters(), 0.1),
                                                      mw.DenseDistillLoss(2), reuse_forward=0), "reuse_forward")):
        with pytest.raises(TypeError, match=f"`{name}` should be a bool"):
            call()
    assert mw.attach_exits(seq, ["0"], [nn.Linear(4, 3)], include_output=np.bool_(False)).num_exits == 1
    for bad in ("x", [[1.0, 2.0]]):
        with pytest.raises(TypeError, match="`logits` should be a Tensor"):
            mw.predict(bad)
    # topk as any sequence of ints, duplicates once
    z, y = torch.randn(2, 10, 4), torch.randint(0, 4, (10,))
    assert mw.anytime_accuracy_from_logits(z, y, topk=range(1, 3)).accuracy.keys() == {1, 2}


def test_batch_not_first_is_named_not_a_raw_error():
    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 3)

        def forward(self, h):
            return self.linear(h.mean(0))  # [T, B, H] -> [B, C]

    torch.manual_seed(0)
    stages = [nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0) for _ in range(2)]
    net = mw.MultiExit(stages, [Pool(), Pool()]).eval()
    for T, B in ((5, 4), (4, 4)):  # T == B: only seen once samples have left
        x = torch.randn(T, B, 8)
        thresholds = mw.find_thresholds(torch.stack(net(x)), [0.5, 0.5])
        with pytest.raises(ValueError, match="batch as the first dimension.*batch_first=True"):
            mw.EarlyExit(net, thresholds)(x)


def test_budget_functions_take_real_scalars_and_refuse_meta_values():
    torch.manual_seed(0)
    z, y = torch.randn(3, 50, 4), torch.randint(0, 4, (50,))
    for call in (lambda: mw.find_thresholds(z, torch.tensor([0.5, 0.3, 0.2], device="meta")),
                 lambda: mw.exit_assignment(z, torch.zeros(3, device="meta")),
                 lambda: mw.evaluate_thresholds(z, y, torch.zeros(3, device="meta"), [1, 2, 3]),
                 lambda: mw.evaluate_thresholds(z, y, [0.5, 0.5, 0.0], torch.ones(3, device="meta"))):
        with pytest.raises(ValueError, match="meta device"):
            call()
    # 0-d tensors and NumPy scalars are numbers, as in `costs`
    point = mw.thresholds_for_budget(z, y, [1, 2, 3], 2.0)
    for budget in (torch.tensor(2.0), np.float32(2.0), np.int64(2)):
        assert mw.thresholds_for_budget(z, y, [1, 2, 3], budget).thresholds == point.thresholds
    target = mw.thresholds_for_accuracy(z, y, 0.1)
    for delta in (torch.tensor(0.1), np.float64(0.1)):
        assert mw.thresholds_for_accuracy(z, y, delta).thresholds == target.thresholds
    assert mw.geometric_exit_distribution(np.float32(0.5), 3).tolist() == \
        mw.geometric_exit_distribution(0.5, 3).tolist()
    assert mw.exit_assignment(z, np.array([0.5, 0.5, 0.0]))[0].tolist() == \
        mw.exit_assignment(z, [0.5, 0.5, 0.0])[0].tolist()
    for bad in (True, "2", torch.tensor([1.0, 2.0]), float("nan")):
        with pytest.raises(ValueError, match="Invalid budget"):
            mw.thresholds_for_budget(z, y, [1, 2, 3], bad)
    # the curve's extra fields survive a round trip
    curve = mw.budgeted_curve(z, y, z, y, [1, 2, 3], qs=[0.5], rule="entropy")
    again = mw.BudgetCurve.from_dict(curve.to_dict())
    assert again.extra == {"rule": "entropy"} and again.to_dict() == curve.to_dict()


def test_user_heads_of_another_dtype_are_named():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"head of exit 1 \(after '1'\) holds torch.float32.*torch.float64"):
        mw.attach_exits(net, ["1"], [nn.Linear(8, 3)], example_input=x)
    attached = mw.attach_exits(net, ["1"], [nn.Linear(8, 3)])
    with pytest.raises(ValueError, match=r"heads\[0\].to\(dtype=torch.float64"):
        attached(x)
    attached = mw.attach_exits(net, ["1"], [nn.Linear(8, 3).double()], example_input=x)
    assert [t.dtype for t in attached(x)] == [torch.float64, torch.float64]
    # a factory's head follows the model, as documented
    built = mw.attach_exits(net, ["1"], lambda name, f: nn.Linear(f.shape[-1], 3), example_input=x)
    assert built.heads[0].weight.dtype == torch.float64
    assert math.isfinite(float(built(x)[0].detach().sum()))


def test_a_tilde_in_a_path_means_the_home_folder(tmp_path, monkeypatch):
    """``CSVLogger("~/x.csv")`` created a folder literally named ``~`` in the working folder; every path
    the library takes from its users (loggers, checkpoints, plots) reads ``~`` as the home folder."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    record = {"iteration": 1, "meta_step": 1, "gamma": {"a": 1.0}}
    csv_logger = mw.CSVLogger("~/log.csv")
    csv_logger(record)
    csv_logger.close()
    assert csv_logger.path == home / "log.csv" and (home / "log.csv").is_file()
    pytest.importorskip("tensorboard")
    tb_logger = mw.TensorBoardLogger("~/tb")
    tb_logger(record)
    tb_logger.close()
    assert tb_logger.log_dir == str(home / "tb") and list((home / "tb").glob("*tfevents*"))
    mw.save_checkpoint({"step": 3}, "~/ck.pt")
    assert (home / "ck.pt").is_file() and mw.load_checkpoint("~/ck.pt")["step"] == 3
    pytest.importorskip("matplotlib")
    assert mw.plot_gamma_history([1, 2], [[0.5], [0.6]], ["ce[1]"], "~/gamma.png") == home / "gamma.png"
    assert (home / "gamma.png").is_file() and not (work / "~").exists()
