"""EarlyExit(cuda_graphs=True): which graphs a call makes and replays, seen through the rows each
stage runs on (a forward pre-hook), against EarlyExit without graphs; what makes a graph stale;
what is refused. On the CPU nothing is captured: a "replay" runs the stage on the padded tensors a
graph keeps, which is what the captured graph computes on CUDA (the test at the end, on a GPU only,
checks the capture itself). The rest of EarlyExit's tests run with cuda_graphs=True too
(``tests/test_early_exit.py``, its ``cuda_graphs`` fixture)."""

import copy
import pickle

import pytest
import torch
from torch import nn

import metaweight as mw


def _net(features=6, width=8, classes=4, exits=3):
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(features if k == 0 else width, width), nn.Tanh()) for k in range(exits)]
    heads = [nn.Linear(width, classes) for _ in range(exits)]
    return mw.MultiExit(stages, heads).double().eval()


def _rows(model):
    """The number of rows each stage runs on, per call of the stage, in order."""
    seen = {k: [] for k in range(len(model.stages))}
    for k, stage in enumerate(model.stages):
        stage.register_forward_pre_hook(lambda m, args, k=k: seen[k].append(args[0].shape[0]))
    return seen


def _thresholds_for(model, x, leave):
    """Thresholds sending the first ``leave[k]`` samples (by score) out at exit ``k``, the rest to the last."""
    with torch.no_grad():
        scores = torch.softmax(torch.stack(model(x)), -1).max(-1).values
    thresholds, alive = [], torch.ones(x.shape[0], dtype=torch.bool)
    for k, n in enumerate(leave):
        ranked = scores[k][alive].sort(descending=True).values
        t = float(ranked[n - 1] + ranked[n]) / 2
        thresholds.append(t)
        alive &= scores[k] < t
    return torch.tensor(thresholds + [-1.0], dtype=torch.float64)


def test_a_graph_per_padded_size_is_made_once_then_replayed_and_gives_what_eager_early_exit_gives():
    model = _net()
    x = torch.randn(16, 6, dtype=torch.float64)
    thresholds = _thresholds_for(model, x, [11, 2])  # 5 samples reach stage 2, 3 reach stage 3
    eager = mw.EarlyExit(model, thresholds)
    expected = eager(x)
    seen = _rows(model)
    predictor = mw.EarlyExit(model, thresholds, cuda_graphs=True)
    for call in range(3):
        got = predictor(x)
        assert torch.equal(got.predictions, expected.predictions) and torch.equal(got.exits, expected.exits)
    # first call: each stage eagerly on the samples in, then once more on them padded (what is captured), then
    # the check that the stages give the forward's logits (8 samples through the forward, then the stages);
    # later calls: the padded stage only (the replay). Stage 1 sees the whole batch, unpadded.
    assert seen == {0: [16, 16, 8, 8, 16, 16], 1: [5, 8, 8, 8, 8, 8], 2: [3, 4, 8, 8, 4, 4]}
    # 7 samples reach stage 2 (the graph for 8 is replayed), 1 reaches stage 3 (a graph for 1 is made)
    thresholds = _thresholds_for(model, x, [9, 6])
    predictor.thresholds.copy_(thresholds)
    reference = mw.EarlyExit(model, thresholds)
    reference(x)  # (its first call, with its check: not counted below)
    seen.update({k: [] for k in seen})
    for call in range(2):
        got = predictor(x)
        expected = reference(x)
        assert torch.equal(got.predictions, expected.predictions) and torch.equal(got.exits, expected.exits)
    # (the eager reference's calls in between: 16, 7 and 1 rows)
    assert seen == {0: [16, 16, 16, 16], 1: [8, 7, 8, 7], 2: [1, 1, 1, 1, 1]}
    # a batch of another size: stage 1 is captured for it (it sees the batch as the model does)
    seen.update({k: [] for k in seen})
    predictor(x[:12])
    assert seen[0] == [12, 12]


@pytest.mark.parametrize("change", [
    "parameter replaced", "load_state_dict(assign=True)", ".data replaced", "submodule replaced in a stage",
    "model cast", "buffer replaced", "written into _parameters directly"])
def test_a_graph_is_made_again_when_what_it_reads_is_replaced_or_moved(change):
    """A captured graph reads the parameters and buffers where they were at capture: a parameter
    replaced (a new head weight, load_state_dict(assign=True)), moved or cast, or a submodule swapped
    inside a stage, would leave it reading the old memory. Each is seen at the next call: the stage
    runs eagerly (on the samples as they are) and is captured again. A change in place (an optimizer
    step) is read by the graph: nothing is captured again. (On the CPU a "replay" runs the modules
    as they are now, so what is checked here is that the graph is made again.)"""
    model = _net()
    model.stages[1].register_buffer("shift", torch.zeros(8, dtype=torch.float64))
    model.stages[1].register_forward_hook(lambda m, args, out: out + m.shift)
    x = torch.randn(16, 6, dtype=torch.float64)
    thresholds = _thresholds_for(model, x, [11, 2])
    predictor = mw.EarlyExit(model, thresholds, cuda_graphs=True)
    predictor(x)
    seen = _rows(model)
    predictor(x)
    assert seen[1] == [8]
    with torch.no_grad():  # in place: the graph reads it
        model.stages[1][0].weight.mul_(1.5)
    predictor(x)
    assert seen[1] == [8, 8]
    stage = model.stages[1]
    if change == "parameter replaced":
        stage[0].weight = nn.Parameter(stage[0].weight.detach().clone())
    elif change == "load_state_dict(assign=True)":
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(state, assign=True)
    elif change == ".data replaced":
        stage[0].weight.data = stage[0].weight.data.clone()
    elif change == "submodule replaced in a stage":
        stage[1] = nn.Tanh()  # (no parameters: seen by the module's identity)
    elif change == "model cast":
        model.float()
        x = x.float()
    elif change == "written into _parameters directly":  # (as accelerate's set_module_tensor_to_device does)
        stage[0]._parameters["weight"] = nn.Parameter(stage[0].weight.detach().clone())
    elif change == "buffer replaced":
        stage.shift = torch.zeros(8, dtype=torch.float64)
    seen[1].clear()
    got = predictor(x)
    # (a module of the model replaced: the check that the stages give the forward's logits runs again, 8 samples
    # through the forward and 8 through the stages)
    again = [8, 8] if change == "submodule replaced in a stage" else []
    assert seen[1] == [5, 8, *again], "the stage was not captured again"
    seen[1].clear()
    got = predictor(x)
    assert seen[1] == [8]
    eager = mw.EarlyExit(model, thresholds)(x)
    assert torch.equal(got.exits, eager.exits) and torch.equal(got.predictions, eager.predictions)


class _GivesCount(nn.Module):
    """A stage whose output holds a Python value that depends on the number of samples."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8).double()

    def forward(self, h):
        return self.linear(h), h.shape[0]


class _Holds:
    def __init__(self, h):
        self.h = h


class _GivesObject(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8).double()

    def forward(self, h):
        return _Holds(self.linear(h))


class _TakesCount(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 4).double()

    def forward(self, f):
        return self.linear(f[0] if isinstance(f, tuple) else f.h)


def test_what_a_graph_cannot_hold_is_refused_saying_what_to_do():
    model = _net()
    with pytest.raises(TypeError, match="`cuda_graphs` should be True or False"):
        mw.EarlyExit(model, [0.5, 0.5, -1.0], cuda_graphs=1)
    body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    attached = mw.attach_exits(body, ["1"], [nn.Linear(8, 4).double()])
    with pytest.raises(ValueError, match="attached by name.*no stages to capture.*exit_stages"):
        mw.EarlyExit(attached, [0.5, -1.0], cuda_graphs=True)
    x = torch.randn(16, 6, dtype=torch.float64)
    # a Python value that changes with the number of samples: a graph would replay the captured one
    model = mw.MultiExit([nn.Sequential(nn.Linear(6, 8), nn.Tanh()).double(), _GivesCount()],
                         [nn.Linear(8, 4).double(), _TakesCount()]).eval()
    predictor = mw.EarlyExit(model, _thresholds_for(model, x, [11]), cuda_graphs=True)  # 5 samples, padded to 8
    with pytest.raises(ValueError, match=r"stage 2 or head 2 gave 8 for 8 samples \(padded\) where it gave 5 for 5 \(value 2 of its output\).*"
                       r"cuda_graphs=False"):
        predictor(x)
    # an object the graph would give back as captured
    model = mw.MultiExit([nn.Sequential(nn.Linear(6, 8), nn.Tanh()).double(), _GivesObject()],
                         [nn.Linear(8, 4).double(), _TakesCount()]).eval()
    with pytest.raises(TypeError, match=r"stage 2's features is a `_Holds`.*tuples, lists or dicts.*cuda_graphs=False"):
        mw.EarlyExit(model, _thresholds_for(model, x, [11]), cuda_graphs=True)(x)


def test_copies_pickles_and_moves_drop_the_graphs_and_predict_alike():
    model = _net()
    x = torch.randn(16, 6, dtype=torch.float64)
    thresholds = _thresholds_for(model, x, [11, 2])
    predictor = mw.EarlyExit(model, thresholds, cuda_graphs=True)
    expected = predictor(x)
    for other in (copy.deepcopy(predictor), pickle.loads(pickle.dumps(predictor))):
        seen = _rows(other.model)
        got = other(x)
        assert torch.equal(got.exits, expected.exits) and torch.equal(got.predictions, expected.predictions)
        # made anew for the copy, on its own model; then the first call's check (8 samples through the forward and
        # the stages), which the copy, whose model is another, runs again
        assert seen[1] == [5, 8, 8, 8]
    seen = _rows(model)
    predictor.to(torch.float64)  # a move (here to where it is) drops the graphs
    predictor(x)
    assert seen[1] == [5, 8]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graphs_on_a_gpu_give_what_eager_early_exit_gives_over_many_calls():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from msdnet import msdnet_cifar
    torch.manual_seed(0)
    model = msdnet_cifar(10, 4, channels=8).cuda().eval()
    x = torch.randn(64, 3, 32, 32, device="cuda")
    with torch.no_grad():
        logits = torch.stack(model(x))
    thresholds = mw.find_thresholds(logits, mw.geometric_exit_distribution(1.0, 4))
    eager = mw.EarlyExit(model, thresholds)
    graphed = mw.EarlyExit(model, thresholds, cuda_graphs=True)
    for i in range(6):
        batch = torch.randn(64 if i % 3 else 37, 3, 32, 32, device="cuda")
        expected, got = eager(batch), graphed(batch)
        assert torch.equal(got.exits, expected.exits) and torch.equal(got.predictions, expected.predictions)
    assert any(g.graph is not None for kept in graphed._graphs.graphs.values() for g in kept)


class _Carry(nn.Module):
    """Stage 1 makes a table ``T`` of 5 rows (made at every call, not per sample); stage 2 adds a
    parameter ``P`` of 8 rows; each stage passes both on unchanged. Exit 3's logits favour class 0
    by ``100 * (T.sum() + P.sum() - 12.5)``: +50 with the whole tables, negative where a row of
    either was dropped as if it were a sample."""

    def __init__(self, k):
        super().__init__()
        self.k = k
        self.linear = nn.Linear(6 if k == 0 else 8, 8).double()
        if k == 1:
            self.P = nn.Parameter(torch.ones(8, 1, dtype=torch.float64))

    def forward(self, f):
        if self.k == 0:
            return torch.tanh(self.linear(f)), torch.ones(5, 1, dtype=torch.float64)
        if self.k == 1:
            return torch.tanh(self.linear(f[0])), f[1], self.P
        return torch.tanh(self.linear(f[0])), f[1], f[2]


class _CarryHead(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k
        self.linear = nn.Linear(8, 4).double()

    def forward(self, f):
        logits = self.linear(f[0])
        if self.k < 2:
            return logits
        bias = 100 * (f[1].sum() + f[2].sum() - 12.5)
        return logits + torch.stack([bias, bias * 0, bias * 0, bias * 0])


@pytest.mark.parametrize("reach", [[(8, 4), (5, 3)], [(5, 3), (8, 4)]], ids=["captured with 8 and 4", "5 and 3 first"])
def test_tensors_passed_on_unchanged_stay_whole_through_replayed_stages(reach):
    """EarlyExit passes on unchanged, whatever their first dimension, a parameter and a tensor
    already passed on at an earlier exit: a replayed graph gives back the tensors it took whole as
    the call gave them (not its own copy, which EarlyExit would take for a new per-sample tensor and
    select), and never cuts a parameter whose rows happened to be the samples' at capture."""
    torch.manual_seed(0)
    model = mw.MultiExit([_Carry(k) for k in range(3)], [_CarryHead(k) for k in range(3)]).eval()
    x = torch.randn(16, 6, dtype=torch.float64)
    predictor = mw.EarlyExit(model, [0.5, 0.5, -1.0], cuda_graphs=True)
    for second, third in reach * 2:  # samples that reach stage 2 (padded to 8) and stage 3 (to 4)
        thresholds = _thresholds_for(model, x, [16 - second, second - third])
        predictor.thresholds.copy_(thresholds)
        got, expected = predictor(x), mw.EarlyExit(model, thresholds)(x)
        assert int((expected.exits == 2).sum()) == third
        assert (expected.predictions[expected.exits == 2] == 0).all()  # the whole tables reached exit 3
        assert torch.equal(got.exits, expected.exits) and torch.equal(got.predictions, expected.predictions)


class _Table(nn.Module):
    """Stage 2 gives a buffer of 8 rows (not per sample) beside the features; exit 3 predicts class 0
    iff it reaches stage 3 whole. Exits 1 and 2 leave by the inputs' columns 0 and 1."""

    def __init__(self, k):
        super().__init__()
        self.k = k
        self.register_buffer("table", torch.ones(8, 1))

    def forward(self, f):
        return f if self.k == 0 else (f, self.table) if self.k == 1 else (f[0], f[1])


class _TableHead(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, f):
        if self.k < 2:
            x = f if self.k == 0 else f[0]
            return torch.stack([x[:, self.k] * 10, torch.zeros_like(x[:, 0])], -1)
        return torch.stack([f[0][:, 0] * 0 + f[1].sum() - 6.5, torch.zeros_like(f[0][:, 0])], -1)


def test_a_table_of_the_padded_size_at_capture_is_not_cut_at_later_calls():
    """Captured with exactly 8 samples at stage 2 (the padded size), every output of 8 rows looked per
    sample: the table of 8 rows was cut to the rows of later calls (5), where EarlyExit passes it on."""
    model = mw.MultiExit([_Table(k) for k in range(3)], [_TableHead(k) for k in range(3)]).eval()
    eager, graphed = mw.EarlyExit(model, [0.9, 0.9, -1.0]), mw.EarlyExit(model, [0.9, 0.9, -1.0], cuda_graphs=True)
    for stay in [8, 5, 5]:
        x = torch.ones(16, 2)
        x[:stay, 0] = 0
        x[:3, 1] = 0
        expected, got = eager(x), graphed(x)
        assert torch.equal(got.exits, expected.exits) and torch.equal(got.predictions, expected.predictions)


class _Writes(nn.Module):
    """Stage 1 makes a table of 5 rows; stages 2 and 3 add 1 to it in place and pass it on; exit 3 favours
    class 0 only after both writes. Stage 1 also shifts its input in place (the caller's tensor)."""

    def __init__(self, k):
        super().__init__()
        self.k = k
        self.linear = nn.Linear(4, 4).double()

    def forward(self, f):
        if self.k == 0:
            f.sub_(0.5)
            return torch.tanh(self.linear(f)), torch.zeros(5, 1, dtype=torch.float64)
        f[1].add_(1.0)
        return torch.tanh(self.linear(f[0])), f[1]


class _WritesHead(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k
        self.linear = nn.Linear(4, 2).double()

    def forward(self, f):
        if self.k < 2:
            return self.linear(f[0]) * (5.0 if self.k == 0 else 0.0)
        bias = f[1].sum() * 10 - 75
        return self.linear(f[0]) + torch.stack([bias, -bias])


def test_what_a_stage_writes_in_place_into_what_it_takes_is_written_into_the_calls_tensors():
    torch.manual_seed(0)
    model = mw.MultiExit([_Writes(k) for k in range(3)], [_WritesHead(k) for k in range(3)]).eval()
    x = torch.randn(16, 4, dtype=torch.float64)
    xe, xg = x.clone(), x.clone()
    eager, graphed = mw.EarlyExit(model, [0.8, 0.8, -1.0]), mw.EarlyExit(model, [0.8, 0.8, -1.0], cuda_graphs=True)
    for call in range(3):
        expected, got = eager(xe), graphed(xg)
        assert torch.equal(got.exits, expected.exits) and torch.equal(got.predictions, expected.predictions)
        assert (expected.exits == 2).any() and torch.equal(xe, xg)


class _Last(nn.Module):
    """Stages 2 and 3 read each sample's last token through gather(lengths - 1): a padded row of
    zeros (length 0) would index -1."""

    def __init__(self, k):
        super().__init__()
        self.k = k
        self.linear = nn.Linear(4, 4)

    def forward(self, f):
        tokens, lengths = (f, (f[:, :, 0] > -0.5).sum(1).clamp(min=1)) if self.k == 0 else (f[0], f[1])
        last = tokens.gather(1, (lengths - 1).view(-1, 1, 1).expand(-1, 1, tokens.shape[-1]))[:, 0]
        return torch.tanh(self.linear(tokens)), lengths, last


def test_padded_rows_hold_a_real_sample():
    torch.manual_seed(0)
    heads = [nn.Sequential(nn.Linear(4, 3)) for _ in range(3)]
    model = mw.MultiExit([_Last(k) for k in range(3)], [_LastHead(h) for h in heads]).eval()
    tokens = torch.randn(16, 7, 4)
    eager, graphed = mw.EarlyExit(model, [0.7, 0.7, -1.0]), mw.EarlyExit(model, [0.7, 0.7, -1.0], cuda_graphs=True)
    for n in [16, 15, 16, 13]:
        expected, got = eager(tokens[:n]), graphed(tokens[:n])
        assert torch.equal(got.exits, expected.exits) and torch.equal(got.predictions, expected.predictions)
    assert any(g.padded and g.size > 1 for kept in graphed._graphs.graphs.values() for g in kept)


class _LastHead(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, f):
        return self.linear(f[2]) * 4


class _Flags(nn.Module):
    """A stage giving, beside its features, a NaN constant and whether its input is contiguous."""

    def __init__(self, k):
        super().__init__()
        self.linear = nn.Linear(6 if k == 0 else 8, 8).double()

    def forward(self, f):
        h = f[0] if isinstance(f, tuple) else f
        return torch.tanh(self.linear(h)), float("nan"), h.is_contiguous()


def test_constants_that_stay_the_same_are_taken_and_an_empty_batch_is_predicted_empty():
    """A NaN beside the features is the same value at every call, and a non-contiguous input keeps its
    layout in the graph's copy (stage 1 is not padded): both are taken. No sample in: nothing is padded."""
    torch.manual_seed(0)
    model = mw.MultiExit([_Flags(k) for k in range(3)], [_CarryHead(0) for _ in range(3)]).eval()
    x = torch.randn(6, 16, dtype=torch.float64).t()  # [16, 6], not contiguous
    thresholds = _thresholds_for(model, x, [11, 2])
    eager, graphed = mw.EarlyExit(model, thresholds), mw.EarlyExit(model, thresholds, cuda_graphs=True)
    for _ in range(3):
        expected, got = eager(x), graphed(x)
        assert torch.equal(got.exits, expected.exits) and torch.equal(got.predictions, expected.predictions)
    empty = graphed(x[:0])
    assert empty.exits.shape == empty.predictions.shape == (0,)
