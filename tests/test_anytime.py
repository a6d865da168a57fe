"""Anytime accuracy against a brute-force per-sample count."""

import pytest
import torch

import metaweight as mw


def brute_force_topk(logits, labels, k):
    K, N, C = logits.shape
    acc = []
    for e in range(K):
        hits = 0
        for n in range(N):
            rank = sum(1 for c in range(C) if logits[e, n, c] > logits[e, n, labels[n]])
            hits += rank < k
        acc.append(100.0 * hits / N)
    return acc


def test_topk_accuracy_matches_brute_force():
    logits = torch.randn(4, 50, 7)
    labels = torch.randint(0, 7, (50,))
    result = mw.anytime_accuracy_from_logits(logits, labels, topk=(1, 3, 5))
    for k in (1, 3, 5):
        assert result.accuracy[k] == pytest.approx(brute_force_topk(logits, labels, k))
    assert result.num_samples == 50
    assert "exit" in str(result) and len(str(result).splitlines()) == 2 + 4
    assert result.to_dict()["top3"] == result.accuracy[3]


def test_anytime_accuracy_over_a_loader_restores_train_mode():
    net = mw.MultiExit([torch.nn.Linear(5, 5), torch.nn.Linear(5, 5)], [torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)])
    loader = [(torch.randn(8, 5), torch.randint(0, 3, (8,))) for _ in range(3)]
    logits, labels = mw.collect_logits(net, loader)
    assert logits.shape == (2, 24, 3) and labels.shape == (24,)
    result = mw.anytime_accuracy(net, loader, topk=(1,))
    assert result.accuracy[1] == pytest.approx(brute_force_topk(logits, labels, 1))
    assert net.training


def test_empty_loader_is_refused():
    net = mw.MultiExit([torch.nn.Identity()], [torch.nn.Identity()])
    with pytest.raises(ValueError, match="no batch"):
        mw.anytime_accuracy(net, [])


class Outputs(torch.nn.Module):
    """A 3-exit model whose forward returns what ``make`` makes of its three logits tensors."""

    def __init__(self, make):
        super().__init__()
        self.make, self.heads = make, torch.nn.ModuleList([torch.nn.Linear(5, 3) for _ in range(3)])

    def forward(self, x):
        return self.make([head(x) for head in self.heads])


@pytest.mark.parametrize("call", ["collect_logits", "anytime_accuracy", "exit_costs"])
def test_outputs_that_are_not_a_list_of_logits_are_refused_without_a_count_nobody_gave(call):
    """The evaluation functions take the number of exits from the model: a dict of outputs is refused asking
    for K logits tensors (the message said "1 logits tensor" of a 3-exit model), an empty list as such, and a
    later batch with another number of exits than the first names both."""
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    run = {"collect_logits": lambda m, batches: mw.collect_logits(m, batches),
           "anytime_accuracy": lambda m, batches: mw.anytime_accuracy(m, batches),
           "exit_costs": lambda m, batches: mw.exit_costs(m, batches[0][0])}[call]
    with pytest.raises(ValueError, match=r"list or tuple of K logits tensors, one per exit.*keys \['exit_logits'\]"):
        run(Outputs(lambda z: {"exit_logits": z}), [(x, y)])
    with pytest.raises(ValueError, match="empty list: a multi-exit model returns one logits tensor per exit"):
        run(Outputs(lambda z: []), [(x, y)])
    if call != "exit_costs":  # (one example input)
        calls = iter([3, 2])
        with pytest.raises(ValueError, match="model output of batch 1 has 2 exits, but the first batch's had 3"):
            run(Outputs(lambda z: z[:next(calls)]), [(x, y), (x, y)])


def first_index_rank(row, label):
    """The label's rank with ties to the lower class index (argmax's rule), written as a loop."""
    return sum(1 for c in range(len(row)) if row[c] > row[label] or (row[c] == row[label] and c < label))


def test_every_public_prediction_breaks_ties_to_the_first_class():
    """Tied logits: anytime accuracy (from logits and from a model), evaluate_thresholds,
    budgeted_curve, thresholds_for_budget, exit_assignment, EarlyExit and the ECE all predict as
    ``predict`` does (argmax's first index), checked against a per-sample loop."""
    rows = torch.tensor([[0.0, 5.0, 5.0, 0.0], [0.0, 5.0, 5.0, 0.0], [3.0, 3.0, 3.0, 3.0],
                         [3.0, 3.0, 3.0, 3.0], [1.0, 2.0, 1.0, 2.0], [2.0, 0.0, 2.0, 0.0]])
    labels = torch.tensor([1, 2, 0, 3, 3, 0])
    logits = rows[None].repeat(2, 1, 1)
    want = {k: 100.0 * sum(first_index_rank(r.tolist(), int(y)) < k for r, y in zip(rows, labels)) / 6
            for k in (1, 2, 3)}
    assert want[1] == 50.0  # rows 0, 2 and 5 right: the first of the tied classes is predicted
    assert mw.predict(rows).tolist() == [1, 1, 0, 0, 1, 0]
    result = mw.anytime_accuracy_from_logits(logits, labels, topk=(1, 2, 3)).accuracy
    assert all(result[k] == pytest.approx([v, v], abs=1e-12) for k, v in want.items())
    net = mw.MultiExit([torch.nn.Identity()] * 2, [torch.nn.Identity()] * 2)
    result = mw.anytime_accuracy(net, [(rows, labels)], topk=(1, 2)).accuracy
    assert result[1] == [want[1]] * 2 and result[2] == pytest.approx([want[2]] * 2, abs=1e-12)
    thresholds = [0.0, 0.0]
    assert mw.evaluate_thresholds(logits, labels, thresholds, [1.0, 2.0]).accuracy == want[1]
    assert mw.budgeted_curve(logits, labels, logits, labels, [1.0, 2.0]).points[0].accuracy == want[1]
    assert mw.thresholds_for_budget(logits, labels, [1.0, 2.0], 1.0).accuracy == want[1]
    exits, predictions = mw.exit_assignment(logits, thresholds)
    assert predictions.tolist() == [1, 1, 0, 0, 1, 0]
    got, _ = mw.EarlyExit(net, thresholds)(rows)
    assert got.tolist() == [1, 1, 0, 0, 1, 0]
    confidence = torch.softmax(rows.double(), -1).amax(-1)  # the ECE's accuracy side uses the same predictions
    correct = (mw.predict(rows) == labels).double()
    ece = 100.0 * sum(float(((confidence == c).double().mean()) * (correct[confidence == c].mean() - c).abs())
                      for c in confidence.unique())  # each distinct confidence falls in its own bin here
    assert mw.expected_calibration_error(logits, labels, bins=15) == pytest.approx([ece, ece])


def test_to_device_moves_tensors_inside_every_mapping_and_sequence_keeping_their_types():
    """A Hugging Face BatchEncoding is a UserDict, not a dict: its tensors were left where they were
    (on the CPU for a GPU model). Every Mapping, namedtuple, list and tuple, nested, is moved; the
    given containers are not changed."""
    from collections import OrderedDict, UserDict, defaultdict, namedtuple
    from types import MappingProxyType
    from metaweight._anytime import to_device

    class Encoding(UserDict):  # as BatchEncoding: a UserDict with attributes of its own
        def __init__(self, data=None, encodings="kept"):
            super().__init__(data)
            self.encodings = encodings

    Pair = namedtuple("Pair", "a b")
    t = lambda: torch.randn(2, 3)  # noqa: E731
    batch = {"enc": Encoding({"input_ids": t(), "mask": [t(), (t(),)]}, encodings="mine"),
             "od": OrderedDict(x=t()), "dd": defaultdict(list, y=t()), "proxy": MappingProxyType({"z": t()}),
             "pair": Pair(t(), {"w": t()}), "n": 3}
    moved = to_device(batch, "meta")

    def devices(value):
        if isinstance(value, torch.Tensor):
            return [value.device.type]
        if isinstance(value, dict) or hasattr(value, "keys"):
            return [d for v in value.values() for d in devices(v)]
        if isinstance(value, (list, tuple)):
            return [d for v in value for d in devices(v)]
        return []

    assert set(devices(moved)) == {"meta"} and len(devices(moved)) == 8
    assert set(devices(batch)) == {"cpu"}  # the given containers are left as they were
    assert type(moved["enc"]) is Encoding and moved["enc"].encodings == "mine"
    assert type(moved["od"]) is OrderedDict and type(moved["dd"]) is defaultdict and moved["dd"].default_factory is list
    assert isinstance(moved["proxy"], MappingProxyType) and type(moved["pair"]) is Pair and moved["n"] == 3
    assert isinstance(moved["enc"]["mask"][1], tuple)


def test_to_device_moves_objects_that_move_themselves_by_their_own_to():
    """A PackedSequence is a namedtuple whose batch_sizes must stay on the CPU: it was rebuilt as a
    plain tuple (and could not be rebuilt as a PackedSequence with batch_sizes moved). It, and any
    non-container with a .to method, is moved by that method; a module is left alone."""
    from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

    from metaweight._anytime import to_device
    packed = pack_padded_sequence(torch.randn(3, 4, 2), torch.tensor([4, 3, 1]), batch_first=True)
    moved = to_device({"x": packed}, "meta")["x"]
    assert isinstance(moved, PackedSequence) and moved.data.is_meta and moved.batch_sizes.device.type == "cpu"
    assert torch.equal(moved.batch_sizes, packed.batch_sizes) and not packed.data.is_meta

    class Graph:
        def __init__(self, x):
            self.x = x

        def to(self, device):
            return Graph(self.x.to(device))

    assert to_device([Graph(torch.ones(2))], "meta")[0].x.is_meta
    layer = torch.nn.Linear(2, 2)
    assert to_device((layer,), "meta")[0] is layer and not layer.weight.is_meta


def test_topk_not_below_the_number_of_classes_is_left_out_by_default_and_refused_when_asked():
    """The default topk=(1, 5) reported top-5 = 100% at every exit with 5 or fewer classes, whatever
    the model predicts. By default such a k is left out; asked for explicitly, it is refused (top-1
    always kept); a repeated k is reported once. Counted against the brute-force ranks."""
    for C in (1, 2, 4, 5, 6, 10):
        logits, labels = torch.randn(3, 20, C), torch.randint(0, C, (20,))
        result = mw.anytime_accuracy_from_logits(logits, labels)
        assert list(result.accuracy) == ([1, 5] if C > 5 else [1]), C
        for k in result.accuracy:
            assert result.accuracy[k] == pytest.approx(brute_force_topk(logits, labels, k))
        net = mw.MultiExit([torch.nn.Identity()] * 3, [torch.nn.Identity()] * 3)
        assert list(mw.anytime_accuracy(net, [(logits[0], labels)]).accuracy) == list(result.accuracy)
        for topk in [(1, C)] * (C > 1) + [(C + 1,), (2, 1, 5)] * (C <= 5):
            with pytest.raises(ValueError, match=rf"Invalid topk.*{C} classes.*100%"):
                mw.anytime_accuracy_from_logits(logits, labels, topk=topk)
            with pytest.raises(ValueError, match=rf"Invalid topk.*{C} classes.*100%"):
                mw.anytime_accuracy(net, [(logits[0], labels)], topk=topk)
    assert list(mw.anytime_accuracy_from_logits(logits, labels, topk=(5, 1, 5)).accuracy) == [5, 1]


def test_a_label_on_a_masked_class_is_never_in_the_top_k():
    """With fewer unmasked classes than k, the -inf ties filled the top-k and a label on a masked
    class counted as a hit. By hand: logits [2, 1, -inf, -inf], labels 0..3, top-3: classes 0 and 1
    are hits, the masked 2 and 3 are not (the old count gave 2 a hit: 75%)."""
    logits = torch.tensor([2.0, 1.0, -float("inf"), -float("inf")]).expand(1, 4, 4)
    result = mw.anytime_accuracy_from_logits(logits, torch.tensor([0, 1, 2, 3]), topk=(1, 3))
    assert result.accuracy == {1: [25.0], 3: [50.0]}


@pytest.mark.parametrize("mask", [torch.finfo(torch.float32).min, -1e9, -1e4])
def test_a_label_on_a_class_masked_with_a_large_finite_value_is_never_in_the_top_k(mask):
    """Hugging Face-style masks (finfo.min, -1e9, -1e4) counted as hits where -inf did not (top-5
    read 100% with every label masked). By hand: logits [-2, -3, m, m] (the largest negative, so a
    -1e4 mask lies less than 1e4 below it), labels 0..3, top-3: classes 0 and 1 are hits, 2 and 3
    not."""
    logits = torch.tensor([-2.0, -3.0, mask, mask]).expand(1, 4, 4)
    result = mw.anytime_accuracy_from_logits(logits, torch.tensor([0, 1, 2, 3]), topk=(1, 3))
    assert result.accuracy == {1: [25.0], 3: [50.0]}


def test_nan_logits_are_refused_not_scored_as_class_0():
    """A NaN row has no prediction (its argmax is the first NaN: class 0 here, a hit for label 0, which read 75%
    where 50% is right). Refused, counted per exit, as the threshold and temperature fits refuse them."""
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [0.0, 5.0], [0.0, 5.0]]).expand(2, 4, 2).clone()
    logits[1, 3] = float("nan")
    labels = torch.tensor([0, 1, 0, 0])
    assert mw.anytime_accuracy_from_logits(logits[:1], labels).accuracy == {1: [50.0]}
    with pytest.raises(ValueError, match=r"NaN logits \(exit 2: 2 NaN values, in 1 sample\(s\)\).*anytime accuracy"):
        mw.anytime_accuracy_from_logits(logits, labels)


def sorted_topk(logits, labels, k):
    """Top-k accuracy by sorting each row (stable: lower class index first on ties), independent of
    the library's rank count."""
    K, N, C = logits.shape
    acc = []
    for e in range(K):
        hits = 0
        for n in range(N):
            order = sorted(range(C), key=lambda c: -float(logits[e, n, c]))  # stable sort: ties by index
            hits += int(labels[n]) in order[:k]
        acc.append(100.0 * hits / N)
    return acc


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e2, 1e4])
def test_top_k_depends_on_the_ranks_only_not_on_the_scale_of_the_logits(scale):
    """A class 1e3 or more below its row's largest logit counted as masked and was never in the top k:
    top-5 read 49.8% on logits and 12.7% on logits * 1e4 (Calibration.apply at T = 1e-4), with the
    same ranks. Now the same as sorting the rows, at every scale."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 300, 10, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 10, (300,), generator=g)
    expected = {k: sorted_topk(logits, labels, k) for k in (1, 3, 5)}
    result = mw.anytime_accuracy_from_logits(logits * scale, labels, topk=(1, 3, 5))
    for k in (1, 3, 5):
        assert result.accuracy[k] == pytest.approx(expected[k], abs=1e-12), k
    calibration = mw.Calibration([1e-4, 1e-2], [0.0] * 2, [0.0] * 2, [0.0] * 2, [0.0] * 2)
    applied = mw.anytime_accuracy_from_logits(calibration.apply(logits), labels, topk=(1, 3, 5))
    assert applied.accuracy == result.accuracy


@pytest.mark.parametrize("scale", [1.0, 10.0, 1e5])
def test_classes_masked_with_a_constant_are_never_in_the_top_k_and_other_ties_are_ranked(scale):
    """The masked classes of the tests above, by rank: [-2, -3, m, m] with m = -1e4 (and the row times 10 or
    1e5: the mask stays -1e4 or less). By hand: classes 0 and 1 are the row's only classes above the mask,
    top-3 holds them alone: 50%. Ties at a row's bottom that no mask made (a ReLU'd row, all 0 but a few;
    saturated fp16 logits) are ranked as top-1 ranks them, by index (review: [4, 1, 1, 1, 1, 1, 1], label 1,
    ranks second, was not counted in the top 5). A row whose classes all tie keeps the tie-break of top-1
    (class 0 first): labels 0..3 of [0, 0, 0, 0, 0] are in the top 4, label 4 is not."""
    logits = (torch.tensor([-2.0, -3.0, -1e4, -1e4], dtype=torch.float64) * scale).expand(1, 4, 4)
    result = mw.anytime_accuracy_from_logits(logits, torch.tensor([0, 1, 2, 3]), topk=(1, 3))
    assert result.accuracy == {1: [25.0], 3: [50.0]}
    flat = torch.zeros(1, 5, 5)
    result = mw.anytime_accuracy_from_logits(flat, torch.tensor([0, 1, 2, 3, 4]), topk=(1, 4))
    assert result.accuracy == {1: [20.0], 4: [80.0]}
    saturated = torch.tensor([4.0, 1, 1, 1, 1, 1, 1]).half().float().expand(1, 7, 7)
    result = mw.anytime_accuracy_from_logits(saturated, torch.arange(7), topk=(1, 5))
    assert result.accuracy[5] == [pytest.approx(500 / 7)]  # labels 0..4: ranks 0..4 (1..4 by index)
    relu = torch.zeros(1, 2, 100)
    relu[0, :, 5], relu[0, :, 7] = 3.0, 2.0
    result = mw.anytime_accuracy_from_logits(relu * scale, torch.tensor([0, 4]), topk=(1, 5))
    assert result.accuracy[5] == [50.0]  # class 0 ranks third (after 5 and 7), class 4 seventh
    stored = torch.tensor([-2.0, -3.0, -1e4, -1e4]).bfloat16().float().expand(1, 4, 4)  # -1e4 kept as -9984
    assert mw.anytime_accuracy_from_logits(stored, torch.arange(4), topk=(1, 3)).accuracy[3] == [50.0]
    mixed = torch.tensor([3.0, -1e9, -1e9, float("-inf")]).expand(1, 4, 4)  # two masks in one row (review)
    result = mw.anytime_accuracy_from_logits(mixed, torch.arange(4), topk=(1, 3))
    assert result.accuracy[3] == [25.0]  # only class 0: the -1e9 pair is masked too, not only the row's lowest


def test_labels_in_a_column_are_refused_saying_how_to_pass_them():
    """Labels [N, 1] (a column, as a data frame or a loader of targets may give them) are refused with the fix; a
    column of another length is refused without it."""
    logits, labels = torch.randn(3, 8, 5), torch.randint(0, 5, (8,))
    with pytest.raises(ValueError, match=r"labels \[N\]\. Found \(3, 8, 5\) and \(8, 1\)\. .*labels.squeeze\(1\)"):
        mw.anytime_accuracy_from_logits(logits, labels[:, None])
    with pytest.raises(ValueError, match=r"Found \(3, 8, 5\) and \(7, 1\)\.$"):
        mw.anytime_accuracy_from_logits(logits, labels[:7, None])
    with pytest.raises(ValueError, match="target.squeeze"):
        mw.DenseDistillLoss(3)(list(logits), labels[:, None])


def test_a_loader_of_triples_is_refused_with_its_length_and_how_to_wrap_it():
    """A loader of ``(x, y, index)`` batches was refused as "should be a pair ... Found `tuple`", which reads as
    no reason (a pair is a tuple): the message says the length and how to pass pairs."""
    net = mw.MultiExit([torch.nn.Linear(4, 4)] * 2, [torch.nn.Linear(4, 3)] * 2)
    triples = [(torch.randn(2, 4), torch.tensor([0, 1]), torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match=r"Found `tuple` of length 3: .*for x, y, \*_ in loader"):
        mw.collect_logits(net, triples)
