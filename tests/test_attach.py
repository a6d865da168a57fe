"""Exits attached by module name: the same logits as a hand-written multi-exit version of the same
network (float64, BatchNorm and dropout), the meta-gradient against real optimizer steps, early
exit that stops the forward, and clear errors."""

import collections
import copy
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import metaweight as mw
from test_weighter import F64, OPTIMIZERS, finite_difference_gamma_grad, rel_err

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from resnet import ResNet, exit_head  # noqa: E402


def resnet_pair(dropout=0.2):
    """A ResNet with exits attached by name, and the hand-written MultiExit over the very same modules."""
    torch.manual_seed(0)
    resnet = ResNet(5, in_channels=3, width=4, dropout=dropout).double()
    x = torch.randn(2, 3, 8, 8, dtype=F64)
    attached = mw.attach_exits(resnet, ["layer1", "layer2"], lambda n, f: exit_head(n, f, 5).double(),
                               example_input=x)
    by_hand = mw.MultiExit(
        [nn.Sequential(resnet.stem, resnet.layer1), resnet.layer2, resnet.layer3],
        [attached.heads[0], attached.heads[1], nn.Sequential(resnet.pool, nn.Flatten(), resnet.fc)])
    return attached, by_hand


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_attached_exits_equal_a_hand_written_multi_exit_network(mode):
    attached, by_hand = resnet_pair()
    attached.train(mode == "train")
    by_hand.train(mode == "train")
    x = torch.randn(6, 3, 8, 8, dtype=F64)
    state = copy.deepcopy(attached.state_dict())
    torch.manual_seed(7)
    ours = attached(x)
    after_ours = copy.deepcopy(attached.state_dict())  # BatchNorm statistics moved once (train mode)
    attached.load_state_dict(state)
    torch.manual_seed(7)
    theirs = by_hand(x)
    assert len(ours) == 3
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    for k, v in attached.state_dict().items():
        assert torch.equal(v, after_ours[k]), k


def test_state_dict_round_trips_and_the_model_still_runs_alone():
    attached, _ = resnet_pair()
    twin, _ = resnet_pair()
    for p in twin.parameters():
        p.data.add_(1.0)
    twin.load_state_dict(attached.state_dict())
    x = torch.randn(3, 3, 8, 8, dtype=F64)
    attached.eval()
    twin.eval()
    assert all(torch.equal(a, b) for a, b in zip(attached(x), twin(x)))
    assert torch.equal(attached.model(x), attached(x)[-1])  # the original forward, no hooks left behind
    assert not any(m._forward_hooks for m in attached.model.modules())


@pytest.mark.parametrize("backend", ["jvp", "higher"])
def test_meta_gradient_through_attached_exits_matches_real_optimizer_steps(backend):
    attached, _ = resnet_pair(dropout=0.0)
    optimizer = OPTIMIZERS["nesterov_wd"](attached.parameters())
    criterion = mw.DenseDistillLoss(3, temperature=2.0)
    validation = mw.BalancedValidation(3)
    validation.update(torch.tensor([1.7, 1.6, 1.5], dtype=F64))
    w = mw.HarmonizedWeighter(attached, optimizer, criterion, validation, backend=backend,
                              init=torch.tensor([1.0, 0.8, 1.2, 0.5, 0.9, 1.1]))
    g = torch.Generator().manual_seed(3)
    train = (torch.randn(8, 3, 8, 8, generator=g, dtype=F64), torch.randint(0, 5, (8,), generator=g))
    val = (torch.randn(6, 3, 8, 8, generator=g, dtype=F64), torch.randint(0, 5, (6,), generator=g))
    ref = finite_difference_gamma_grad(attached, optimizer, criterion, validation, w.gamma.detach().clone(),
                                       train, val)
    out = w.meta_step(train, val)
    assert ref.norm() > 0 and rel_err(out["gamma_grad"], ref) < 1e-6


def test_early_exit_stops_the_forward_once_every_sample_has_left():
    attached, _ = resnet_pair(dropout=0.0)
    attached.eval()
    x = torch.randn(10, 3, 8, 8, dtype=F64)
    calls = []
    handle = attached.model.layer3.register_forward_hook(lambda *a: calls.append(1))
    # everyone confident enough at exit 1: layer2's exit and layer3 never run
    predictions, exits = mw.EarlyExit(attached, torch.tensor([0.0, 0.0, -1.0]))(x)
    assert exits.tolist() == [0] * 10 and calls == []
    # thresholds nobody reaches: everyone takes the model's own output, as the full forward says
    thresholds = torch.tensor([0.95, 0.95, -1.0])
    predictions, exits = mw.EarlyExit(attached, thresholds)(x)
    assert calls == [1]
    with torch.no_grad():
        expected_exits, expected = mw.exit_assignment(torch.stack(attached(x)), thresholds)
    assert torch.equal(exits, expected_exits) and torch.equal(predictions, expected)
    handle.remove()


def test_mixed_thresholds_agree_with_the_full_forward():
    attached, _ = resnet_pair(dropout=0.0)
    attached.eval()
    x = torch.randn(40, 3, 8, 8, dtype=F64)
    with torch.no_grad():
        logits = torch.stack(attached(x))
    confidence = torch.softmax(logits, -1).max(-1).values
    thresholds = torch.tensor([float(confidence[0].median()), float(confidence[1].median()), -1.0])
    predictions, exits = mw.EarlyExit(attached, thresholds)(x)
    expected_exits, expected = mw.exit_assignment(logits, thresholds)
    assert torch.equal(exits, expected_exits) and torch.equal(predictions, expected)
    assert set(exits.tolist()) == {0, 1, 2}


def test_bad_names_and_heads_are_refused():
    resnet = ResNet(5, width=4)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="no submodule named 'layer4'.*did you mean"):
        mw.attach_exits(resnet, ["layer1", "layer4"], lambda n, f: exit_head(n, f, 5), example_input=x)
    with pytest.raises(ValueError, match="different shapes"):
        mw.attach_exits(resnet, ["layer1"], lambda n, f: exit_head(n, f, 7), example_input=x)
    with pytest.raises(ValueError, match="example_input"):
        mw.attach_exits(resnet, ["layer1"], lambda n, f: exit_head(n, f, 5))
    with pytest.raises(ValueError, match="one head module per name"):
        mw.attach_exits(resnet, ["layer1", "layer2"], [nn.Linear(4, 5)])
    with pytest.raises(ValueError, match="twice"):
        mw.attach_exits(resnet, ["layer1", "layer1"], [nn.Linear(4, 5), nn.Linear(4, 5)])


class Conditional(nn.Module):
    """``a -> b -> c -> out``, where ``skip`` names a module the forward then leaves out."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.skip = None

    def forward(self, x):
        h = torch.tanh(self.a(x))
        for name in ("b", "c"):
            if self.skip != name:
                h = torch.tanh(getattr(self, name)(h))
        return self.out(h)


def test_exits_attached_out_of_execution_order_are_refused_with_the_order_seen():
    """Every path that runs the forward (attaching with an example, forward, EarlyExit's first call,
    executed costs) refuses ``after`` listed deep to shallow, and says what to pass; in the order
    given, EarlyExit equals the full forward + exit_assignment."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    x = torch.randn(400, 4) * 3
    heads = [nn.Linear(8, 3), nn.Linear(8, 3)]
    message = r"run in the order \['1', '3'\], but `after` lists them as \['3', '1'\].*pass after=\['1', '3'\]"
    with pytest.raises(ValueError, match=message):
        mw.attach_exits(net, ["3", "1"], heads, example_input=x[:2])
    runs = [lambda m: m(x), lambda m: mw.EarlyExit(m, [0.0, 0.0, 0.0])(x), lambda m: mw.EarlyExit(m, [2.0, 2.0, 0.0])(x),
            lambda m: mw.exit_costs(m, x[:1], executed=True), lambda m: mw.exit_costs(m, x[:1])]
    for run in runs:
        with pytest.raises(ValueError, match=message):
            run(mw.attach_exits(net, ["3", "1"], heads))  # no example: the first forward
    model = mw.attach_exits(net, ["1", "3"], heads[::-1], example_input=x[:2])
    with torch.no_grad():
        logits = torch.stack(model(x))
    thresholds = mw.find_thresholds(logits, [0.3, 0.3, 0.4])
    exits, predictions = mw.exit_assignment(logits, thresholds)
    got_predictions, got_exits = mw.EarlyExit(model, thresholds)(x)
    assert torch.equal(got_exits, exits) and torch.equal(got_predictions, predictions)
    assert torch.bincount(exits, minlength=3).tolist() == [120, 120, 160]
    costs = mw.exit_costs(model, x[:1], executed=True).macs
    assert costs == sorted(costs)


@pytest.mark.parametrize("with_example", [True, False])
def test_a_module_the_forward_skips_is_refused_by_every_path(with_example):
    """A conditional forward that leaves out a named module: forward, EarlyExit at every threshold
    that reaches past it, and executed costs refuse it alike; no exit is mislabelled."""
    torch.manual_seed(0)
    base = Conditional().eval()
    x = torch.randn(6, 4)
    for skip in ("b", "c"):
        model = mw.attach_exits(base, ["b", "c"], [nn.Linear(8, 3), nn.Linear(8, 3)],
                                example_input=x[:2] if with_example else None)
        base.skip = skip
        runs = [lambda: model(x), lambda: mw.EarlyExit(model, [2.0, 0.0, 0.0])(x),
                lambda: mw.EarlyExit(model, [2.0, 2.0, 0.0])(x), lambda: mw.exit_costs(model, x[:1], executed=True)]
        if skip == "b" or not with_example:  # before anyone left (or at the first, whole forward)
            runs.append(lambda: mw.EarlyExit(model, [0.0, 0.0, 0.0])(x))
        for run in runs:
            with pytest.raises(RuntimeError, match=rf"\['{skip}'\] did not run"):
                run()
        base.skip = None
    if with_example:  # everyone leaves at b before c would run: the answer is exit b's, and right
        base.skip = "c"
        predictions, exits = mw.EarlyExit(model, [0.0, 0.0, 0.0])(x)
        base.skip = None
        with torch.no_grad():
            assert torch.equal(predictions, mw.predict(model(x)[0])) and exits.tolist() == [0] * 6


def test_a_multi_exit_model_traces_and_exits_of_different_classes_are_refused_in_the_trace_too():
    """Under torch.jit.trace (and the TorchScript-based torch.onnx.export) each size is a 0-d tensor: the check of the
    exits' classes saw K different counts and refused every MultiExit (helper-146). Traced, it gives the eager
    outputs; heads of different classes are refused there as eagerly."""
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    model = mw.MultiExit([nn.Sequential(nn.Linear(4, 4), nn.ReLU())] * 2,
                         [nn.Linear(4, 3), nn.Sequential(nn.Linear(4, 3), nn.Tanh())]).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # (torch.jit.trace is deprecated in torch 2.13)
        warnings.simplefilter("error", torch.jit.TracerWarning)  # (none of ours; the list output is torch's own)
        warnings.filterwarnings("ignore", "Encountering a list at the output", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, x)
        assert all(torch.equal(a, b) for a, b in zip(traced(x), model(x)))
        undeclared = mw.MultiExit([nn.Linear(4, 4)] * 2, [nn.Linear(4, 3), nn.Sequential(nn.Linear(4, 5), nn.Tanh())])
        with pytest.raises(ValueError, match=r"different numbers of classes.*'exit 1': 3, 'exit 2': 5"):
            torch.jit.trace(undeclared, x)


def test_exits_of_different_classes_are_refused_at_construction_or_first_forward():
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"different numbers of classes.*'exit 1': 3, 'exit 2': 5"):
        mw.MultiExit([nn.Linear(4, 4)] * 2, [nn.Linear(4, 3), nn.Sequential(nn.ReLU(), nn.Linear(4, 5))])
    undeclared = mw.MultiExit([nn.Linear(4, 4)] * 2, [nn.Linear(4, 3), nn.Sequential(nn.Linear(4, 5), nn.Tanh())])
    with pytest.raises(ValueError, match="different numbers of classes"):
        undeclared(x)
    with pytest.raises(ValueError, match="different numbers of classes"):
        mw.EarlyExit(undeclared, [2.0, 0.0])(x)  # a sample reaches exit 2


    class Parts(nn.Module):  # a model of its own speaking the protocol: its heads are checked by EarlyExit
        def exit_stages(self):
            return [nn.Linear(4, 4)] * 2, [nn.Linear(4, 3), nn.Linear(4, 5)]

    with pytest.raises(ValueError, match="different numbers of classes"):
        mw.EarlyExit(Parts(), [0.0, 0.0])
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="different shapes"):
        mw.attach_exits(net, ["1"], [nn.Linear(8, 5)], example_input=x)
    for thresholds in ([0.0, 0.0], [2.0, 0.0]):  # everyone would leave at the attached exit; nobody would
        with pytest.raises(ValueError, match=r"different shapes.*\(5, 5\).*\(5, 3\)"):
            mw.EarlyExit(mw.attach_exits(net, ["1"], [nn.Linear(8, 5)]), thresholds)(x)


def test_factory_heads_take_the_models_dtype_not_autocasts():
    """Heads built from features computed under ``torch.autocast`` (bf16 for that call only) are
    in the dtype of the model's parameters, so the model runs outside autocast afterwards."""
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    for dtype in (torch.float32, torch.float64):
        net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model = mw.attach_exits(net, ["0"], lambda name, f: nn.Linear(f.shape[-1], 3), example_input=x.to(dtype))
        assert model.heads[0].weight.dtype == dtype
        assert [z.dtype for z in model(x.to(dtype))] == [dtype, dtype]


class _Float32NormBfloat16Body(nn.Module):
    """A model of two dtypes: a float32 input norm, then a bfloat16 body (its first parameter is float32)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).bfloat16()

    def forward(self, x):
        return self.body(self.norm(x).bfloat16())


def test_factory_heads_take_the_dtype_of_the_features_they_read_in_a_model_of_two_dtypes():
    """A factory's heads were cast to the dtype of the model's first parameter: float32 here, where the
    features are bfloat16, so the first forward refused the head with a message saying to pass a factory
    (which had been passed, and whose head, even built in bfloat16, was cast back). They are now in the
    features' dtype; under autocast, in the features' dtype outside autocast (the body's bfloat16)."""
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    net = _Float32NormBfloat16Body()
    model = mw.attach_exits(net, ["body.1"], lambda name, f: nn.Linear(f.shape[-1], 3), example_input=x)
    assert model.heads[0].weight.dtype == torch.bfloat16
    with torch.no_grad():
        exits = model(x)
        features = net.body[1](net.body[0](net.norm(x).bfloat16()))  # by hand
        assert torch.equal(exits[0], model.heads[0](features)) and torch.equal(exits[1], net(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model = mw.attach_exits(net, ["body.1"], lambda name, f: nn.Linear(f.shape[-1], 3), example_input=x)
    assert model.heads[0].weight.dtype == torch.bfloat16
    assert [z.dtype for z in model(x)] == [torch.bfloat16, torch.bfloat16]  # outside autocast afterwards


class _Float32NormBfloat16BodyThenActivation(nn.Module):
    """As above, with a module holding no parameters after the body at the model's top level."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8)).bfloat16()
        self.act = nn.Tanh()
        self.out = nn.Linear(8, 3).bfloat16()

    def forward(self, x):
        return self.out(self.act(self.body(self.norm(x).bfloat16())))


@pytest.mark.parametrize("after", ["act", "body.1"])
def test_factory_heads_built_under_autocast_after_a_module_without_parameters_take_the_features_dtype(after):
    """Under autocast the head of an exit after a module with no parameters took the dtype of the first
    parameter of the enclosing module: at the model's top level, the float32 input norm's, where the features
    it reads outside autocast are bfloat16, so the model then refused its own head (helper-100's report). It
    now takes the features' dtype outside autocast; the same head as one built outside it."""
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    net = _Float32NormBfloat16BodyThenActivation()
    plain = mw.attach_exits(net, [after], lambda name, f: nn.Linear(f.shape[-1], 3), example_input=x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model = mw.attach_exits(net, [after], lambda name, f: nn.Linear(f.shape[-1], 3), example_input=x)
    assert model.heads[0].weight.dtype == plain.heads[0].weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert [z.dtype for z in model(x)] == [torch.bfloat16, torch.bfloat16]  # outside autocast afterwards


def test_exit_after_relu_behind_a_float32_kept_norm_of_a_bfloat16_model_runs_outside_autocast():
    """A bfloat16 model whose LayerNorm is kept in float32 (a common mixed-precision recipe): its output is
    bfloat16 outside autocast (the norm keeps its input's dtype). 15ce2bd built a bfloat16 head for an exit
    after the ReLU behind it; e03c128 took the norm's float32 and the model refused its own head. Heads now
    take the features' dtype outside autocast, seen by running the example forward with autocast off."""
    bf = torch.bfloat16
    body = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3)).to(bf)
    body[1].float()
    x = torch.randn(4, 8, dtype=bf)
    with torch.autocast("cpu", dtype=bf):
        model = mw.attach_exits(body, ["2"], lambda name, f: nn.Linear(f.shape[-1], 3), example_input=x)
        assert model.heads[0].weight.dtype == bf
        assert len(model(x)) == 2  # inside autocast too
    assert all(o.dtype == bf for o in model(x))  # outside autocast


class _NormRegisteredAfterTheBody(nn.Module):
    """A float32 input norm registered after the bfloat16 body it runs before."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8).bfloat16()
        self.norm = nn.LayerNorm(4)
        self.act = nn.ReLU()
        self.out = nn.Linear(8, 3).bfloat16()

    def forward(self, x):
        return self.out(self.act(self.body(self.norm(x).bfloat16())))


def test_factory_heads_under_autocast_follow_the_execution_order_not_the_registration_order():
    """The last parameter registered before the exit's module (the norm's float32) is not the last the
    features passed (the body's bfloat16): the head is bfloat16, as the features are outside autocast."""
    x = torch.randn(5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model = mw.attach_exits(_NormRegisteredAfterTheBody(), ["act"], lambda name, f: nn.Linear(f.shape[-1], 3),
                                example_input=x)
    assert model.heads[0].weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert [z.dtype for z in model(x)] == [torch.bfloat16, torch.bfloat16]


def test_the_forward_outside_autocast_leaves_modes_and_running_statistics_alone():
    """The example forward run again with autocast off runs in eval mode without gradients, as the first: a
    BatchNorm's running statistics do not move, and every module gets its own train/eval mode back."""
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    net.train()
    net[3].eval()
    before = (net[1].running_mean.clone(), net[1].running_var.clone(), int(net[1].num_batches_tracked))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model = mw.attach_exits(net, ["2"], lambda name, f: nn.Linear(f.shape[-1], 3), example_input=torch.randn(6, 4))
    assert model.heads[0].weight.dtype == torch.float32 and model.heads[0].weight.grad is None
    assert torch.equal(net[1].running_mean, before[0]) and torch.equal(net[1].running_var, before[1])
    assert int(net[1].num_batches_tracked) == before[2]
    assert [m.training for m in net] == [True, True, True, False]


class _RunsUnderAutocastOnly(nn.Module):
    """A float32 layer feeding a bfloat16 one without a cast: it runs under autocast only."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.act = nn.ReLU()
        self.b = nn.Linear(8, 3).bfloat16()

    def forward(self, x):
        return self.b(self.act(self.a(x)))


def test_a_model_that_runs_under_autocast_only_gets_the_dtype_of_the_last_parameter_its_features_passed():
    """Where the forward with autocast off raises, a factory's head falls back on the parameters' rule."""
    x = torch.randn(5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model = mw.attach_exits(_RunsUnderAutocastOnly(), ["act"], lambda name, f: nn.Linear(f.shape[-1], 3),
                                example_input=x)
        assert model.heads[0].weight.dtype == torch.float32
        assert len(model(x)) == 2


class _PaddedEncoder(nn.Module):
    """Token ids and a padding mask through torch's nn.TransformerEncoder, pooled over the real tokens."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, d)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 2, 32, batch_first=True, dropout=0.0), 3)
        self.out = nn.Linear(d, 3)

    def forward(self, ids, mask):
        h = self.enc(self.emb(ids), src_key_padding_mask=mask == 0)
        m = mask.unsqueeze(-1).float()
        return self.out((h * m).sum(1) / m.sum(1))


class _MeanHead(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.linear = nn.Linear(d, 3)

    def forward(self, h):
        return self.linear(h.mean(1))


def test_exits_after_transformer_encoder_layers_read_padded_outputs_without_gradients_too():
    """In eval mode without gradients (early exit, collect_logits, attaching with example_input), torch's
    fast path hands an nn.TransformerEncoder's layers a nested tensor when there is a padding mask, so the
    heads attached after them got nested outputs: attach_exits failed with torch's "Could not run
    'aten::mean.dim' with arguments from the 'NestedTensorCPU' backend". The layers now give the padded
    outputs training gives: the logits are those of a forward with gradients, and the heads' by hand."""
    torch.manual_seed(0)
    net = _PaddedEncoder().eval()
    ids, mask = torch.randint(0, 20, (6, 7)), torch.ones(6, 7, dtype=torch.long)
    mask[:3, 5:] = 0
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model = mw.attach_exits(net, ["enc.layers.0", "enc.layers.1"], [_MeanHead(), _MeanHead()],
                            example_input={"ids": ids, "mask": mask})
    trained = model(ids, mask)  # with gradients: torch's plain path, as in training
    with torch.no_grad():
        h1 = net.enc.layers[0](net.emb(ids), src_key_padding_mask=mask == 0)
    by_hand = [model.heads[0](h1), model.heads[1](net.enc.layers[1](h1, src_key_padding_mask=mask == 0))]
    for z, expected in zip(trained[:2], by_hand):
        assert torch.allclose(z, expected, atol=1e-6)
    with torch.no_grad():
        evaluated = model(ids, mask)
    assert all(torch.equal(a, b) for a, b in zip(evaluated, trained))
    logits, _ = mw.collect_logits(model, [({"ids": ids, "mask": mask}, torch.zeros(6, dtype=torch.long))])
    assert torch.equal(logits, torch.stack(evaluated))
    thresholds = [0.4, 0.4, 0.0]
    result = mw.EarlyExit(model, thresholds)(ids, mask)
    expected = mw.exit_assignment(torch.stack(trained).detach(), thresholds)
    assert torch.equal(result.exits, expected.exits) and torch.equal(result.predictions, expected.predictions)
    assert torch.backends.mha.get_fastpath_enabled() == fastpath  # put back


def test_exits_attached_to_a_model_on_the_meta_device_are_counted_there():
    """exit_costs counts on the meta device (shapes only), but attaching exits to a meta model with
    example_input, or counting one, failed with torch's "unknown device type for autocast": the head
    check asked torch.is_autocast_enabled('meta'), which raises. The costs are the hand computation's
    and those of the same model on the CPU."""
    def build(device):
        torch.manual_seed(0)
        with torch.device(device):
            return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                 nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def factory(name, features):
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(features.shape[1], 10))

    conv1, conv2, linear = 3 * 8 * 9 * 16 * 16, 8 * 8 * 9 * 16 * 16, 8 * 10  # multiply-adds, by hand
    expected = [conv1 + linear, conv1 + linear + conv2 + linear]
    for device in ("cpu", "meta"):
        x = torch.randn(1, 3, 16, 16, device=device)
        built = mw.attach_exits(build(device), ["2"], factory, example_input=x)
        with torch.device(device):
            head = factory("2", torch.empty(1, 8, 1, 1))
        given = mw.attach_exits(build(device), ["2"], [head])
        assert built.heads[0][2].weight.device.type == device
        assert mw.exit_costs(built, x).macs == expected and mw.exit_costs(given, x).macs == expected


class _DeepSupervision(nn.Module):
    """One exit (its forward returns one logits tensor), and a `heads` list: an auxiliary head of deep
    supervision on block 1, read by a training-time side loss, and the final head."""

    def __init__(self) -> None:
        super().__init__()
        self.block1, self.block2, self.block3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.heads = nn.ModuleList([nn.Linear(8, 3), nn.Linear(8, 3)])

    def forward(self, x):
        h = torch.relu(self.block1(x))
        self.aux = self.heads[0](h)
        return self.heads[1](torch.relu(self.block3(torch.relu(self.block2(h)))))


def test_a_model_of_one_exit_with_a_heads_list_takes_exits_after_its_first_head():
    """The order check of a multi-exit model (attached exits run before its own first exit, heads[0])
    applied to any model with a `heads` list: one that returns a single exit, with an auxiliary head in
    that list, had an exit after block 2 refused as running after 'its own first exit'. It applies to
    models that return several exits of their own (a declared num_exits above 1)."""
    torch.manual_seed(0)
    net, x = _DeepSupervision(), torch.randn(5, 4)
    head = nn.Linear(8, 3)
    model = mw.attach_exits(net, ["block2"], [head], example_input=x[:2])
    assert model.num_exits == 2
    exits = model(x)
    with torch.no_grad():
        by_hand = head(net.block2(torch.relu(net.block1(x))))
        assert torch.equal(exits[0], by_hand) and torch.equal(exits[1], net(x))
    multi = mw.MultiExit([nn.Linear(4, 8), nn.Linear(8, 8)], [nn.Linear(8, 3), nn.Linear(8, 3)])
    with pytest.raises(ValueError, match="run after `MultiExit`'s own first exit"):  # still refused there
        mw.attach_exits(multi, ["stages.1"], [nn.Linear(8, 3)], example_input=x[:2])


class _Classifiers(nn.Module):
    """A multi-exit model in the examples' MSDNet style: `blocks` and `classifiers`, exit_stages(), num_exits."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 8), nn.ReLU())])
        self.classifiers = nn.ModuleList([nn.Linear(8, 3), nn.Linear(8, 3)])

    @property
    def num_exits(self) -> int:
        return len(self.classifiers)

    def exit_stages(self):
        return list(self.blocks), list(self.classifiers)

    def forward(self, x):
        out = []
        for block, classifier in zip(self.blocks, self.classifiers):
            x = block(x)
            out.append(classifier(x))
        return out


def test_exits_after_the_first_exit_of_a_model_with_exit_stages_are_refused():
    """Attached exits come first, so they must run before the model's own first exit. That was checked
    on a `heads` list only: on a model whose exits are its exit_stages() heads under another name
    (`classifiers`, as the examples' MSDNet), an exit after block 2 was accepted and numbered exit 1,
    before the exit after block 1: exits no longer went shallow to deep. Refused now; one after block 1
    is exit 1, by hand."""
    torch.manual_seed(0)
    net, x = _Classifiers(), torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"\['blocks.1'\] run after `_Classifiers`'s own first exit"):
        mw.attach_exits(net, ["blocks.1"], [nn.Linear(8, 3)], example_input=x[:2])
    head = nn.Linear(8, 3)
    model = mw.attach_exits(net, ["blocks.0"], [head], example_input=x[:2])
    exits = model(x)
    with torch.no_grad():
        assert len(exits) == 3 and torch.equal(exits[0], head(net.blocks[0](x)))
        assert all(torch.equal(a, b) for a, b in zip(exits[1:], net(x)))


class _EncoderBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 2, 32, batch_first=True, dropout=0.0), 2)

    def forward(self, h, padding):
        return self.enc(h, src_key_padding_mask=padding)


class _WrappedEncoder(nn.Module):
    """_PaddedEncoder's encoder inside a block of the model's own, and a projection reading its output."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, d)
        self.block = _EncoderBlock(d)
        self.proj = nn.Linear(d, d)
        self.out = nn.Linear(d, 3)

    def encode(self, ids, mask):
        return self.block(self.emb(ids), mask == 0)

    def forward(self, ids, mask):
        h = self.proj(self.encode(ids, mask))
        m = mask.unsqueeze(-1).float()
        return self.out((h * m).sum(1) / m.sum(1))


def test_exits_after_a_module_holding_or_reading_a_transformer_encoder_read_training_s_values_too():
    """Without gradients torch's fast path puts zeros at the padded positions of an nn.TransformerEncoder's
    output: an exit after a module holding the encoder, or after one reading its output, pooled those zeros
    where training pooled the values computed there (exit logits 0.31 apart from a forward with gradients,
    silently; only exits after the encoder or its layers ran with the fast path off)."""
    torch.manual_seed(0)
    net = _WrappedEncoder().eval()
    ids, mask = torch.randint(0, 20, (6, 7)), torch.ones(6, 7, dtype=torch.long)
    mask[:3, 4:] = 0
    model = mw.attach_exits(net, ["block", "proj"], [_MeanHead(), _MeanHead()])
    with torch.enable_grad():  # torch's plain path, as in training: the heads by hand on its features
        h = net.encode(ids, mask)
        by_hand = [model.heads[0](h), model.heads[1](net.proj(h))]
    with torch.no_grad():
        evaluated = model(ids, mask)
    for z, expected in zip(evaluated[:2], by_hand):
        assert torch.allclose(z, expected, atol=1e-6), (z - expected).abs().max()
    logits, _ = mw.collect_logits(model, [({"ids": ids, "mask": mask}, torch.zeros(6, dtype=torch.long))])
    assert torch.equal(logits, torch.stack(evaluated))


def test_exits_attached_to_a_multi_exit_model_must_run_before_its_own():
    """Attached exits are numbered before the model's own; one that runs after the model's first exit
    would break the shallow-to-deep order: refused (attach twice, or to a MultiExit); shallower ones
    keep the order, as the costs of the exits show (each at least the one before)."""
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    example = torch.randn(2, 4)
    once = mw.attach_exits(net, ["1"], [nn.Linear(8, 3)], example_input=example)
    with pytest.raises(ValueError, match=r"\['model.3'\] run after `AttachedExits`'s own first exit.*in one call"):
        mw.attach_exits(once, ["model.3"], [nn.Linear(8, 3)], example_input=example)
    twice = mw.attach_exits(once, ["model.0"], [nn.Linear(8, 3)], example_input=example)
    macs = mw.exit_costs(twice, example[:1]).macs
    assert macs == sorted(macs) and len(macs) == 3
    stages = [nn.Sequential(nn.Linear(4 if k == 0 else 8, 8), nn.ReLU()) for k in range(3)]
    multi = mw.MultiExit(stages, [nn.Linear(8, 3) for _ in range(3)])
    with pytest.raises(ValueError, match=r"\['stages.2'\] run after `MultiExit`'s own first exit"):
        mw.attach_exits(multi, ["stages.2"], [nn.Linear(8, 3)], example_input=example)
    shallow = mw.attach_exits(multi, ["stages.0.0"], [nn.Linear(8, 3)], example_input=example)
    macs = mw.exit_costs(shallow, example[:1]).macs
    assert macs == sorted(macs) and len(macs) == 4


def test_a_deeper_exit_attached_over_one_attached_exit_without_the_output_is_refused_too():
    """attach_exits over attached exits of one exit (include_output=False: num_exits 1) took a deeper module's exit
    as exit 1 and the shallower attached one as exit 2, silently: the check that attached exits run before the
    model's own first exit was kept for models declaring several exits only (a model of one exit may hold a heads
    list for other uses), and an attached exit is an exit whatever their number. Exit order against the
    modules' depth (the costs), as in the test above."""
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    example = torch.randn(2, 4)
    inner = mw.attach_exits(net, ["1"], [nn.Linear(8, 3)], include_output=False)
    assert inner.num_exits == 1
    with pytest.raises(ValueError, match=r"\['model.3'\] run after `AttachedExits`'s own first exit.*in one call"):
        mw.attach_exits(inner, ["model.3"], [nn.Linear(8, 3)], example_input=example)
    shallow = mw.attach_exits(inner, ["model.0"], [nn.Linear(8, 3)], example_input=example)
    macs = mw.exit_costs(shallow, example[:1]).macs
    assert macs == sorted(macs) and len(macs) == 2


class _DeclaresExits(nn.Module):
    def __init__(self, declared):
        super().__init__()
        self.body, self.a, self.b, self.num_exits = nn.Linear(4, 4), nn.Linear(4, 3), nn.Linear(4, 3), declared

    def forward(self, x):
        h = self.body(x)
        return self.a(h), self.b(h)


@pytest.mark.parametrize("with_example", [True, False])
def test_a_declared_num_exits_the_output_does_not_have_is_refused_naming_both(with_example):
    """num_exits=3 on a model returning 2 exits was accepted with example_input (3 exits claimed, 3
    returned by accident of counting) and blamed on a missing example_input without one."""
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"declares num_exits=3, but its forward returned 2 exit"):
        exits = mw.attach_exits(_DeclaresExits(3), ["body"], [nn.Linear(4, 3)],
                                example_input=x if with_example else None)
        exits(x)


def test_a_numpy_integer_num_exits_is_a_declaration():
    np = pytest.importorskip("numpy")
    x = torch.randn(5, 4)
    exits = mw.attach_exits(_DeclaresExits(np.int64(2)), ["body"], [nn.Linear(4, 3)], example_input=x)
    assert exits.num_exits == 3 and len(exits(x)) == 3


class _KeywordNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x, scale=1.0):  # unannotated: a dict could be what it reads
        return self.out(self.b(self.a(x) * scale))


def _assert_noted(error, mapping):
    """``error`` is torch's or Python's own, with metaweight's one note on the mapping it passed (PEP 678)."""
    notes = getattr(error, "__notes__", [])
    assert len(notes) == 1 and re.search(rf"metaweight passed {mapping}.*as the one positional argument .*; if the "
                                         rf"forward does not take a mapping, name the keys after its parameters",
                                         notes[0]), notes


class _ReadsDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, batch):
        return self.out(self.a(batch["features"]))


def test_a_dict_whose_keys_the_forward_does_not_take_is_explained_at_every_entry():
    """Through attach_exits' wrapper, a dict batch whose keys are not the forward's parameters went to
    the forward as its one argument and torch failed inside (``linear(): argument 'input' must be
    Tensor, not dict``), where MultiExit's annotated forward gets the library's message. Every entry
    that runs the model (collect_logits, anytime_accuracy, EarlyExit, the wrapper itself) now says
    which keys are not parameters and how inputs are passed; a forward that does read a dict still
    runs, and an error of the model's own is left as it is."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 6), torch.zeros(4, dtype=torch.long)
    models = [mw.attach_exits(nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3)), ["0"], [nn.Linear(8, 3)]),
              mw.attach_exits(_KeywordNet(), ["a"], [nn.Linear(8, 3)])]
    for model in models:
        model.eval()
        before = copy.deepcopy(model.state_dict())
        for call in (lambda: mw.collect_logits(model, [({"y": x}, y)]),
                     lambda: mw.anytime_accuracy(model, [({"y": x}, y)], topk=(1,)),
                     lambda: mw.EarlyExit(model, [0.5, 0.0])({"y": x}),
                     lambda: model({"y": x})):
            with pytest.raises(TypeError, match=r"must be Tensor, not dict") as info:
                call()
            _assert_noted(info.value, r"the dict with keys \['y'\] \(of which \['y'\] are not parameters of the "
                                      r"forward\)")
        torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)
    keyword = models[1]
    assert torch.equal(mw.EarlyExit(keyword, [0.5, 0.0])({"x": x, "scale": 2.0})[0],
                       mw.EarlyExit(keyword, [0.5, 0.0])(x, scale=2.0)[0])
    reads = mw.attach_exits(_ReadsDict(), ["a"], [nn.Linear(8, 3)]).eval()
    assert mw.collect_logits(reads, [({"features": x}, y)])[0].shape == (2, 4, 3)
    with pytest.raises(KeyError):  # the model's own error, not rewritten
        mw.collect_logits(reads, [({"y": x}, y)])


class _NestedDict(nn.Module):
    """Takes a dict batch as it should; fails on a dict inside it (its own bug), or on the batch itself."""

    def __init__(self, fail):
        super().__init__()
        self.fail, self.a, self.b = fail, nn.Linear(4, 3), nn.Linear(4, 3)
        self.num_exits = 2

    def forward(self, batch):
        x = batch["image"]
        if self.fail == "attribute":
            batch["meta"].shape  # 'dict' object has no attribute 'shape': the inner dict
        elif self.fail == "torch":
            self.b(batch["meta"])  # linear(): ... must be Tensor, not dict: the inner dict
        elif self.fail == "itself":
            batch.shape  # the batch itself read as a tensor
        elif self.fail == "inline":
            torch.relu(batch["meta"])  # relu(): ... must be Tensor, not dict, raised in this very frame
        elif self.fail == "inline itself":
            torch.relu(batch)  # the batch itself handed to a torch op
        return [self.a(x), self.b(x)]


class _TensorForward(nn.Module):
    """A forward written for a tensor (it never reads its argument as a mapping), given a dict."""

    def __init__(self, fail):
        super().__init__()
        self.fail, self.a, self.b = fail, nn.Linear(4, 3), nn.Linear(4, 3)
        self.num_exits = 2

    def forward(self, x):
        if self.fail == "itself":
            x.shape  # the batch itself read as a tensor
        else:
            torch.relu(x)  # the batch itself handed to a torch op
        return [self.a(x), self.b(x)]


def test_a_models_own_error_on_a_dict_inside_its_batch_is_left_as_it_is():
    """A forward that takes a dict legitimately and fails on a dict inside it (``batch["meta"].shape``,
    ``linear(batch["meta"])``) was re-raised as "keys not parameters of the forward", with advice
    to rename keys; only an error on the very mapping passed (an AttributeError on that object, or
    torch's TypeError raised where the calling code holds it) is explained so now."""
    y = torch.zeros(5, dtype=torch.long)
    good = {"image": torch.randn(5, 4), "meta": torch.zeros(5, 4)}
    bad = {"image": torch.randn(5, 4), "meta": {"id": torch.zeros(5)}}
    assert mw.collect_logits(_NestedDict(None), [(good, y)])[0].shape == (2, 5, 3)
    for fail, kind, own in (("attribute", AttributeError, "'dict' object has no attribute 'shape'"),
                            ("torch", TypeError, "must be Tensor, not dict")):
        model = _NestedDict(fail)
        with pytest.raises(kind) as plain:
            model(bad)
        assert own in str(plain.value)
        for run in (lambda: mw.collect_logits(model, [(bad, y)]),
                    lambda: mw.attach_exits(model, ["a"], [nn.Linear(3, 3)], example_input=good)(bad)):
            with pytest.raises(kind) as info:
                run()
            assert type(info.value) is kind and str(info.value) == str(plain.value)  # the model's own, unchanged
            assert getattr(info.value, "__notes__", []) == []
    with pytest.raises(AttributeError) as info:
        mw.collect_logits(_TensorForward("itself"), [(good, y)])
    assert str(info.value) == "'dict' object has no attribute 'shape'"  # Python's own message
    _assert_noted(info.value, r"the dict with keys \['image', 'meta'\] \(of which \['image', 'meta'\] are not")


def test_a_models_own_inline_torch_error_on_a_dict_inside_its_batch_is_left_as_it_is():
    """``torch.relu(batch["meta"])`` inline in the forward, ``batch["meta"]`` a dict: torch's "must be
    Tensor, not dict" is raised in the forward's own frame, which holds the batch, so it was re-raised
    as "keys not parameters of the forward". Torch names only the type and the batch holds a dict, so
    the error is the model's own and is left as torch raised it; the batch itself handed to a torch op
    (nothing of its type inside) is still explained."""
    y = torch.zeros(5, dtype=torch.long)
    good = {"image": torch.randn(5, 4), "meta": torch.zeros(5, 4)}
    bad = {"image": torch.randn(5, 4), "meta": {"id": torch.zeros(5)}}
    model = _NestedDict("inline")
    with pytest.raises(TypeError) as plain:
        model(bad)
    assert "must be Tensor, not dict" in str(plain.value)
    for run in (lambda: mw.collect_logits(model, [(bad, y)]),
                lambda: mw.attach_exits(model, ["a"], [nn.Linear(3, 3)], example_input=good)(bad)):
        with pytest.raises(TypeError) as info:
            run()
        assert type(info.value) is TypeError and str(info.value) == str(plain.value)  # the model's own, unchanged
        assert getattr(info.value, "__notes__", []) == []
    with pytest.raises(TypeError) as info:
        mw.collect_logits(_TensorForward("inline itself"), [(good, y)])
    assert str(info.value).endswith("must be Tensor, not dict")  # torch's own message
    _assert_noted(info.value, r"the dict with keys \['image', 'meta'\] \(of which \['image', 'meta'\] are not")


class _PassesItsDictOn(nn.Module):
    """Takes the dict (reads ``batch["x"]``); its own bug then hands the whole dict to a submodule."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, batch):
        return [self.a(batch["x"]), self.b(batch)]


def _gets(batch): return batch.get("x")  # noqa: E704 - each a forward that uses its argument as a mapping
def _items(batch): return [v for _, v in batch.items()]  # noqa: E704
def _tests_in(batch): return "x" in batch  # noqa: E704
def _unpacks(batch): return dict(**batch)  # noqa: E704
def _spreads(batch): return {**batch}  # noqa: E704


_MAPPING_USES = (_gets, _items, _tests_in, _unpacks, _spreads)


def test_a_forward_that_takes_the_dict_gets_torchs_error_when_its_own_code_passes_the_dict_on():
    """A forward that reads ``batch["x"]`` takes the dict; ``self.b(batch)`` is the model's own bug. The
    dict's keys are not the forward's parameters, so it was re-raised as "the dict was passed as the one
    positional argument ... Name the keys after the forward's parameters", advice that cannot help. The
    forward's source uses its argument as a mapping, so torch's error is left as it is; a forward that
    never reads it as a mapping (``_TensorForward``) is still explained."""
    x, y = torch.randn(8, 4), torch.zeros(8, dtype=torch.long)
    model = _PassesItsDictOn()
    with pytest.raises(TypeError) as plain:
        model({"x": x, "y2": x})
    with pytest.raises(TypeError) as info:
        mw.collect_logits(model, [({"x": x, "y2": x}, y)])
    assert type(info.value) is TypeError and str(info.value) == str(plain.value)
    assert "must be Tensor, not dict" in str(info.value)
    for forward in _MAPPING_USES:
        assert mw._protocols._reads_as_mapping(forward), forward.__name__
    assert mw._protocols._reads_as_mapping(_PassesItsDictOn().forward)
    assert not mw._protocols._reads_as_mapping(_TensorForward("itself").forward)


class _Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, batch):
        return [self.a(batch["x"]), self.b(batch)]  # the model's own bug: passes the whole dict on


class _Delegates(nn.Module):
    """A forward that takes the dict and delegates it (``self.body(batch)``): its source never indexes it."""

    def __init__(self):
        super().__init__()
        self.body, self.num_exits = _Body(), 2

    def forward(self, batch):
        return self.body(batch)


class _AttributeDict(collections.UserDict):
    """Keys read as attributes, as Hugging Face's BatchEncoding allows."""

    def __getattr__(self, key):
        try:
            return self.data[key]
        except KeyError:
            raise AttributeError(key) from None


class _ReadsAttributes(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.num_exits = nn.Linear(4, 3), nn.Linear(4, 3), 2

    def forward(self, batch):
        return [self.a(batch.x), self.b(batch)]  # reads the mapping by attribute; its own bug after


@pytest.mark.parametrize("model, inputs", [(_Delegates(), {"x": torch.randn(5, 4)}),
                                           (_ReadsAttributes(), _AttributeDict(x=torch.randn(5, 4)))],
                         ids=["delegates", "attribute access"])
def test_a_mapping_error_keeps_torchs_type_and_message_with_a_conditional_note(model, inputs):
    """A forward that takes the mapping (delegating it, or reading it as ``batch.x``) and whose own code
    then misuses it had torch's error replaced by "passed the dict as the one positional argument ...
    Name the keys after the forward's parameters", advice that cannot help. The error is now torch's
    own, same type and message, with a note worded as a possibility."""
    y = torch.zeros(5, dtype=torch.long)
    with pytest.raises(TypeError) as plain:
        model(inputs)
    with pytest.raises(TypeError) as info:
        mw.collect_logits(model, [(inputs, y)])
    assert type(info.value) is TypeError and str(info.value) == str(plain.value)
    _assert_noted(info.value, rf"the {type(inputs).__name__} with keys \['x'\]")


class _InPlaceBlock(nn.Module):
    """torchvision's residual block order: bn2, then ``out += identity`` and ``relu(inplace=True)`` on it."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


def _in_place_net():
    torch.manual_seed(0)
    return nn.Sequential(_InPlaceBlock(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).double()


def _by_hand(net, x):
    """The features after bn1 and bn2 and the model's output, computed without any in-place op."""
    block = net[0]
    bn1 = block.bn1(block.conv1(x))
    bn2 = block.bn2(block.conv2(bn1.relu()))
    return bn1, bn2, net[2](net[1]((bn2 + x).relu()))


@pytest.mark.parametrize("after,head_in_place,match", [
    (["0.bn1"], False, r"output of '0.bn1' was changed in place later"),   # nn.ReLU(inplace=True) after it
    (["0.bn2"], False, r"output of '0.bn2' was changed in place later"),   # out += x after it
    (["0"], True, r"head of exit 1 \(after '0'\) changes its input in place"),
])
def test_features_changed_in_place_are_refused_in_training_and_early_exit_alike(after, head_in_place, match):
    """The heads ran after the forward on the tensor the hook kept: one changed in place later (ReLU(inplace=True)
    after a BatchNorm, torchvision's `out += identity`) was read changed in training, as the module returned it by
    early exit (which runs the head at once): other predictions. Refused wherever it is seen, with grad or not."""
    def head():
        layers = [nn.ReLU(inplace=True)] if head_in_place else []
        return nn.Sequential(*layers, nn.Conv2d(3, 2, 1), nn.Flatten(), nn.Linear(2 * 4 * 4, 5)).double()

    attached = mw.attach_exits(_in_place_net(), after, [head() for _ in after])
    x = torch.randn(6, 3, 4, 4, dtype=F64)
    with pytest.raises(ValueError, match=match):
        attached(x)
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        attached.eval()(x)
    with pytest.raises(ValueError, match=match):
        mw.EarlyExit(attached, [0.5] * (len(after) + 1))(x)


def test_an_in_place_op_on_other_tensors_and_a_checkpointed_block_are_fine():
    """After the whole block (whose own in-place ops act on its inner tensors) the exits equal the network computed
    by hand, and an exit inside a block under non-reentrant activation checkpointing gets the gradients it gets
    without checkpointing (the heads run after the forward, outside the checkpointed region)."""
    torch.manual_seed(0)
    net = _in_place_net()
    plain = mw.attach_exits(net, ["0"], [nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).double()])
    x = torch.randn(6, 3, 4, 4, dtype=F64)
    _, _, output = _by_hand(net, x)
    block = net[0]
    with torch.no_grad():
        features = (block.bn2(block.conv2(block.bn1(block.conv1(x)).relu())) + x).relu()
    logits = plain(x)
    torch.testing.assert_close(logits[0], plain.heads[0](features), rtol=0, atol=0)
    torch.testing.assert_close(logits[1], output, rtol=0, atol=0)

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.pool = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8)), nn.Linear(8, 3)

        def forward(self, x, checkpointed=True):
            h = checkpoint(self.block, x, use_reentrant=False) if checkpointed else self.block(x)
            return self.pool(h.tanh())

    torch.manual_seed(1)
    model = Checkpointed().double()
    attached = mw.attach_exits(model, ["block.0", "block"], [nn.Linear(8, 3).double(), nn.Linear(8, 3).double()])
    x = torch.randn(5, 4, dtype=F64)
    grads = []
    for checkpointed in (True, False):
        attached.zero_grad()
        sum((z * torch.arange(3, dtype=F64)).sum() for z in attached(x, checkpointed=checkpointed)).backward()
        grads.append([p.grad.clone() for p in attached.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_a_compiled_model_is_refused_saying_to_attach_first():
    """torch.compile's forward runs no hooks on the modules inside: attached to a compiled model, the exits
    were refused as 'did not run (a conditional forward?)' after the _orig_mod. prefix the name check hinted."""
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"compiled.*torch.compile\(mw.attach_exits\(model"):
        mw.attach_exits(torch.compile(net), ["_orig_mod.0"], [nn.Linear(8, 3)])


def test_a_models_own_output_as_a_dict_is_read_by_its_logits_key():
    """A forward returning {"logits": ..., "aux": ...} (the key Hugging Face outputs carry): was refused as
    'Cannot find logits ... type dict'; a dict without that key is refused naming its keys."""
    torch.manual_seed(0)

    class DictOut(nn.Module):
        def __init__(self, key):
            super().__init__()
            self.body, self.fc, self.key = nn.Linear(4, 8), nn.Linear(8, 3), key

        def forward(self, x):
            h = self.body(x)
            return {"hidden": h, self.key: self.fc(h.relu())}

    net = DictOut("logits")
    attached = mw.attach_exits(net, ["body"], [nn.Linear(8, 3)])
    x = torch.randn(5, 4)
    logits = attached(x)
    assert len(logits) == 2 and torch.equal(logits[1], net(x)["logits"])
    assert torch.equal(logits[0], attached.heads[0](net.body(x)))
    with pytest.raises(TypeError, match=r"keys \['hidden', 'scores'\], none of them 'logits'"):
        mw.attach_exits(DictOut("scores"), ["body"], [nn.Linear(8, 3)])(x)


def test_the_attention_fast_path_stays_off_while_any_forward_of_ours_is_inside_and_then_comes_back():
    """torch.backends.mha's setting is one for the process: a forward that put back what it found on entering
    turned the fast path on again while another was still inside (a second thread's forward, interleaved
    generators), whose encoder then handed its layers a nested tensor in the middle of its forward. Entered
    and left interleaved here, as two threads may; exit_costs' counting shares the setting."""
    from metaweight._attach import _padded_layers
    from metaweight._flops import _counting

    mha = torch.backends.mha
    before = mha.get_fastpath_enabled()
    try:
        for user in (True, False):
            mha.set_fastpath_enabled(user)
            first, second = _padded_layers(True), _counting()
            first.__enter__()
            second.__enter__()
            first.__exit__(None, None, None)
            assert not mha.get_fastpath_enabled()  # the second is still inside
            second.__exit__(None, None, None)
            assert mha.get_fastpath_enabled() == user
            with pytest.raises(RuntimeError):  # put back after an exception too
                with _padded_layers(True):
                    raise RuntimeError
            assert mha.get_fastpath_enabled() == user
    finally:
        mha.set_fastpath_enabled(before)


def test_a_module_an_exit_is_attached_after_that_is_gone_is_refused_naming_it_everywhere():
    """A module an exit was attached after, removed or replaced since (a block fused for deployment),
    met a bare KeyError: 'layer1.1' at the next forward. Every way of running the exits (the
    forward, run_until, EarlyExit, collect_logits, exit_costs, exits attached again around them)
    refuses it with one ValueError naming the module and the exit and saying to attach again, with
    no hook left on the model."""
    def build():
        net = nn.Sequential()
        net.add_module("layer1", nn.Sequential(nn.Linear(4, 8), nn.ReLU()))
        net.add_module("layer2", nn.Sequential(nn.Linear(8, 8), nn.ReLU()))
        net.add_module("fc", nn.Linear(8, 3))
        return net

    x = torch.randn(3, 4)
    net = build()
    exits = mw.attach_exits(net, ["layer1.1", "layer2"], lambda n, f: nn.Linear(8, 3), example_input=x)
    outer_net = build()
    inner = mw.attach_exits(outer_net, ["layer1.1"], lambda n, f: nn.Linear(8, 3), example_input=x)
    outer = mw.attach_exits(inner, ["model.layer1.0"], lambda n, f: nn.Linear(8, 3), example_input=x)
    net.layer1 = nn.Sequential(nn.Linear(4, 8))  # fused: no ReLU submodule any more
    outer_net.layer1 = nn.Sequential(nn.Linear(4, 8))
    calls = {"forward": lambda m: m(x), "run_until": lambda m: m.run_until(x, lambda k, z: False),
             "EarlyExit": lambda m: mw.EarlyExit(m, [0.5] * (m.num_exits - 1) + [0.0])(x),
             "collect_logits": lambda m: mw.collect_logits(m, [(x, torch.zeros(3, dtype=torch.long))]),
             "exit_costs": lambda m: mw.exit_costs(m, x[:1])}
    for model, base in ((exits, net), (outer, outer_net)):
        for name, call in calls.items():
            with pytest.raises(ValueError, match=r"`Sequential` has no submodule named 'layer1\.1' any more: it "
                                                 r"was removed or replaced since the exits were attached \(exit 1 "
                                                 r"after 'layer1\.1'\).*Attach the exits again"):  # (the inner's)
                call(model)
            assert not any(m._forward_hooks for m in base.modules()), name


def test_attached_exits_and_the_model_alone_run_side_by_side_in_threads():
    """The hooks are on the model's modules while a wrapper call runs: a forward of the model alone in another
    thread fired them (metaweight's errors in a plain forward, and an early exit stopped by the other thread's
    modules), and two threads calling the wrapper counted each other's calls as a module run twice (helper-166).
    Each thread's calls give what they give alone."""
    import threading

    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    exits = mw.attach_exits(body, ["1", "3"], lambda name, f: nn.Linear(f.shape[-1], 5),
                            example_input=torch.randn(2, 16)).eval()
    predictor = mw.EarlyExit(exits, [0.0, 0.0, 0.0])  # every sample leaves at exit 1: the forward stops there
    inputs = [torch.randn(8, 16), torch.randn(8, 16) + 3]
    with torch.no_grad():
        alone = [body(inputs[1]), exits(inputs[0])]
    early = predictor(inputs[0])
    failures = []
    start = threading.Barrier(3)

    def run(work):
        start.wait()
        for _ in range(150):
            try:
                work()
            except Exception as exc:  # noqa: BLE001 - counted and shown
                failures.append(f"{type(exc).__name__}: {exc}"[:200])

    def check(got, expected):
        if not torch.equal(got, expected):
            failures.append("another value")

    def plain():
        with torch.no_grad():
            check(body(inputs[1]), alone[0])

    def wrapped():
        with torch.no_grad():
            for got, expected in zip(exits(inputs[0]), alone[1]):
                check(got, expected)

    def early_exit():
        result = predictor(inputs[0])
        check(result.predictions, early.predictions)
        check(result.exits, early.exits)

    threads = [threading.Thread(target=run, args=(work,)) for work in (plain, wrapped, early_exit)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


class _Offloaded(nn.Module):
    """A forward running its first block in a worker thread (a pipeline stage, a prefetch)."""

    def __init__(self, pool):
        super().__init__()
        self.pool, self.a, self.b = pool, nn.Sequential(nn.Linear(6, 10), nn.Tanh()), nn.Linear(10, 5)

    def forward(self, x):
        return self.b(self.pool.submit(self.a, x).result())


def test_an_exit_after_a_module_run_in_a_worker_thread_is_refused_saying_so():
    """The exits' hooks act for the thread of the call: a module the forward runs in a worker thread of its own was
    refused as one that 'did not run in this forward (a conditional forward?)' (helper-167). The refusal says it ran
    in another thread, and what to do."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        exits = mw.attach_exits(_Offloaded(pool).eval(), ["a"], [nn.Linear(10, 5)])
        with pytest.raises(RuntimeError, match=r"ran in another thread than this forward.*in the thread that calls"):
            exits(torch.randn(4, 6))
