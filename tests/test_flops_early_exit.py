"""FLOPs per exit against a hand count; early exit against the full forward."""

import functools
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaweight as mw

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from branchynet import branchynet  # noqa: E402
from msdnet import msdnet_cifar  # noqa: E402


def test_exit_costs_match_a_hand_count():
    conv = nn.Conv2d(3, 8, 3, padding=1)  # 8x8 output: 8*8 * 8 * 3*3*3 multiply-adds
    net = mw.MultiExit(
        [nn.Sequential(conv, nn.ReLU()), nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(8, 4, 1))],
        [nn.Sequential(nn.Flatten(), nn.Linear(8 * 64, 5)), nn.Sequential(nn.Flatten(), nn.Linear(4 * 16, 5))])
    costs = mw.exit_costs(net, torch.randn(1, 3, 8, 8))
    stage1, head1 = 64 * 8 * 27, 8 * 64 * 5
    stage2, head2 = 16 * 4 * 8, 4 * 16 * 5
    assert costs.macs == [stage1 + head1, stage1 + head1 + stage2 + head2]
    assert costs.incremental_macs == [stage1 + head1, stage2 + head2]
    p = [sum(x.numel() for x in m.parameters()) for m in (net.stages[0], net.heads[0], net.stages[1], net.heads[1])]
    assert costs.params == [p[0] + p[1], sum(p)]
    assert costs.flops == [2 * m for m in costs.macs]


def test_exit_costs_are_per_sample_and_sum_to_the_flop_counter_total():
    from torch.utils.flop_counter import FlopCounterMode

    net = msdnet_cifar(10, 3, channels=4, growth_rate=2).eval()
    one = mw.exit_costs(net, torch.randn(1, 3, 32, 32))
    four = mw.exit_costs(net, torch.randn(4, 3, 32, 32))
    assert one.macs == four.macs
    with FlopCounterMode(display=False) as counter:
        net(torch.randn(1, 3, 32, 32))
    assert one.flops[-1] == counter.get_total_flops()
    assert one.params[-1] == sum(p.numel() for p in net.parameters())


def test_shared_trunk_counted_once_when_a_head_reads_an_earlier_stage():
    """A model that is not a chain: exit 2 also reads stage 1's features; stage 1 counts once."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.s1, self.s2 = nn.Linear(6, 6), nn.Linear(6, 6)
            self.h1, self.h2 = nn.Linear(6, 2), nn.Linear(12, 2)

        def forward(self, x):
            a = self.s1(x)
            b = self.s2(a)
            return [self.h1(a), self.h2(torch.cat([a, b], 1))]

    costs = mw.exit_costs(Net(), torch.randn(1, 6))
    assert costs.macs == [36 + 12, 36 + 12 + 36 + 24]


def full_forward_first_exit(model, x, thresholds):
    with torch.no_grad():
        logits = torch.stack(model(x))
    first, prediction = mw.exit_assignment(logits, thresholds)
    return prediction, first


@pytest.mark.parametrize("make", [lambda: msdnet_cifar(10, 4, channels=4, growth_rate=2),
                                  lambda: branchynet(10, 3, num_exits=3, width=8)])
def test_early_exit_equals_first_exit_over_threshold_of_the_full_forward(make):
    net = make().double().eval()
    x = torch.randn(40, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        logits = torch.stack(net(x))
    K = logits.shape[0]
    for q in (0.3, 1.0, 2.0):
        T = mw.find_thresholds(logits[:, :20], mw.geometric_exit_distribution(q, K))
        predictions, exits = mw.EarlyExit(net, T)(x)
        ref_pred, ref_exit = full_forward_first_exit(net, x, T)
        assert torch.equal(exits, ref_exit) and torch.equal(predictions, ref_pred)
        assert len(set(exits.tolist())) > 1 or q == 0.3


def test_early_exit_needs_exposed_stages():
    with pytest.raises(TypeError, match="stages"):
        mw.EarlyExit(nn.Linear(3, 3), [0.5])
    with pytest.raises(ValueError, match="2 thresholds"):
        mw.EarlyExit(mw.MultiExit([nn.Identity()] * 2, [nn.Identity()] * 2), [0.5])


# --- layers whose work is outside torch.utils.flop_counter's registry, and in-place writes ---

from transformer import counting_task, transformer_multi_exit  # noqa: E402


class Body(nn.Module):
    """``body`` (called by ``call``), then ``Linear(16, 3)`` on what it returns."""

    def __init__(self, body, call=lambda b, x: b(x)):
        super().__init__()
        self.body, self.call, self.head = body, call, nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.call(self.body, x))


def one_exit(body, call=lambda b, x: b(x)):
    return mw.MultiExit([Body(body, call)], [nn.Identity()])


HEAD = 16 * 3
T = 10  # sequence length


def attention(t, d):  # QK^T and AV of one head of width d over t tokens
    return 2 * t * t * d


def encoder_layer(t, d, ff):  # q, k, v and output projections, attention, feed-forward
    return t * (4 * d * d + 2 * d * ff) + attention(t, d)


@pytest.mark.parametrize("executed", [False, True])
def test_transformer_example_counts_projections_attention_and_feed_forward(executed):
    """torch's fast path (eval, no gradients) runs an encoder layer as one fused op; it is turned
    off while counting, so the layer counts as its products, and is back on afterwards."""
    net = transformer_multi_exit(16, 4, num_layers=2)  # d_model 64, feed-forward 128, 4 heads
    ids, _ = counting_task(1, seq_len=32)
    per_exit = encoder_layer(32, 64, 128) + 64 * 4  # the head: Linear(64, 4) on the mean token
    assert mw.exit_costs(net, ids, executed=executed).macs == [per_exit, 2 * per_exit]
    assert torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        mw.exit_costs(net, ids, executed=executed)
        assert not torch.backends.mha.get_fastpath_enabled()  # the user's setting, kept
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


@pytest.mark.parametrize("body, call, x, macs", [
    (nn.TransformerEncoderLayer(16, 2, 32, 0.0, batch_first=True), lambda b, x: b(x).mean(1),
     torch.randn(1, T, 16), encoder_layer(T, 16, 32)),
    (nn.MultiheadAttention(16, 2, batch_first=True), lambda b, x: b(x, x, x, need_weights=False)[0].mean(1),
     torch.randn(1, T, 16), T * 4 * 16 * 16 + attention(T, 16)),
    (nn.Identity(), lambda b, x: F.scaled_dot_product_attention(x, x, x).transpose(1, 2).flatten(2).mean(1),
     torch.randn(1, 2, T, 8), 2 * attention(T, 8)),  # 2 heads of width 8
    (nn.Identity(), lambda b, x: F.scaled_dot_product_attention(x, x, x, is_causal=True).transpose(1, 2)
     .flatten(2).mean(1), torch.randn(1, 2, T, 8), 2 * attention(T, 8)),  # torch counts the masked half too
    (nn.LSTM(8, 16, batch_first=True), lambda b, x: b(x)[0][:, -1], torch.randn(1, T, 8),
     T * 4 * (8 + 16) * 16),  # 4 gates x (input + hidden) x hidden, per step
    (nn.LSTM(8, 8, num_layers=2, bidirectional=True, batch_first=True), lambda b, x: b(x)[0][:, -1],
     torch.randn(1, T, 8), 2 * T * 4 * (8 + 8) * 8 + 2 * T * 4 * (16 + 8) * 8),  # 2nd layer reads both directions
    (nn.Bilinear(8, 8, 16), lambda b, x: b(x, x), torch.randn(1, 8),
     16 * (8 * 8 + 8)),  # y_k = (x^T W_k) x: x^T W_k, then its dot with x, for each of 16 outputs
], ids=["encoder-layer", "multihead-attention", "sdpa", "sdpa-causal", "lstm", "lstm-2-layers-bidirectional",
        "bilinear"])
def test_layers_outside_torchs_flop_registry_are_counted(body, call, x, macs):
    for executed in (False, True):
        assert mw.exit_costs(one_exit(body, call), x, executed=executed).macs == [macs + HEAD]


def test_recurrent_kernels_count_what_their_decomposition_counts():
    """On CPU, nn.LSTM runs oneDNN's fused kernel; without oneDNN it decomposes into matrix
    products torch counts: the two agree, and with GRU and RNN (always decomposed) match by hand."""
    x = torch.randn(1, T, 8)
    lstm = one_exit(nn.LSTM(8, 16, batch_first=True), lambda b, x: b(x)[0][:, -1])
    fused = mw.exit_costs(lstm, x).macs
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "TF32", UserWarning)  # torch's note on setting the flags
        with torch.backends.mkldnn.flags(enabled=False):
            decomposed = mw.exit_costs(lstm, x).macs
    assert decomposed == fused == [T * 4 * (8 + 16) * 16 + HEAD]
    for layer, gates in ((nn.GRU(8, 16, batch_first=True), 3), (nn.RNN(8, 16, batch_first=True), 1)):
        assert mw.exit_costs(one_exit(layer, lambda b, x: b(x)[0][:, -1]), x).macs == [T * gates * (8 + 16) * 16 + HEAD]


@functools.lru_cache(maxsize=None)
def custom_projections():
    """Two custom ops computing ``x @ w``: one unknown to any FLOP counter, one with a formula
    registered with torch (once per process: torch refuses a second registration)."""
    ops = []
    for name in ("project", "project_counted"):
        @torch.library.custom_op(f"metaweight_test::{name}", mutates_args=())
        def project(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return x @ w

        @project.register_fake
        def _(x, w):
            return x.new_empty(x.shape[0], w.shape[1])

        ops.append(getattr(torch.ops.metaweight_test, name))

    @torch.utils.flop_counter.register_flop_formula(ops[1])
    def _(x_shape, w_shape, *args, out_shape=None, **kwargs):
        return 2 * x_shape[0] * x_shape[1] * w_shape[1]

    return ops


def test_an_op_without_a_formula_warns_once_naming_it_and_a_registered_formula_counts():
    if not hasattr(torch.library, "custom_op"):
        pytest.skip("torch.library.custom_op needs torch 2.4")
    project, project_counted = custom_projections()
    w = torch.randn(8, 16)
    plain = mw.MultiExit([nn.Identity()], [nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))])
    uncounted = one_exit(nn.Identity(), lambda b, x: project(x, w))
    counted = one_exit(nn.Identity(), lambda b, x: project_counted(x, w))
    x = torch.randn(1, 8)
    for executed in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert mw.exit_costs(uncounted, x, executed=executed).macs == [HEAD]  # the op's 8 x 16 left out
        assert len(caught) == 1 and caught[0].category is RuntimeWarning
        assert "metaweight_test.project.default (1 call per forward)" in str(caught[0].message)
        assert "left out" in str(caught[0].message) and caught[0].filename == __file__
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert mw.exit_costs(counted, x, executed=executed).macs == [8 * 16 + HEAD]
            assert mw.exit_costs(plain, x, executed=executed).macs == [8 * 8 + 8 * 3]


def test_common_layers_are_counted_and_none_warns():
    """A model of the usual layers: what has multiply-adds is counted by hand, the rest (norms,
    pooling, activations, embeddings, dropout, resampling, data movement) is known to be cheap."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(2), nn.Upsample(scale_factor=2, mode="bilinear"),
                                      nn.GroupNorm(2, 4), nn.Hardswish(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
            self.embed = nn.Embedding(10, 16)
            self.lstm = nn.LSTM(16, 16, batch_first=True)
            self.attn = nn.TransformerEncoderLayer(16, 2, 32, 0.1, batch_first=True, activation="gelu")
            self.h1, self.h2 = nn.Linear(16, 3), nn.Sequential(nn.LayerNorm(16), nn.Dropout(0.1), nn.Linear(16, 3))

        def forward(self, image, tokens):
            a = self.conv(image) + self.embed(tokens).mean(1)
            h = self.lstm(self.embed(tokens))[0]
            h = self.attn(h).softmax(-1).sort(-1).values.cumsum(-1)
            return [self.h1(a), self.h2(h.max(1).values + a)]

    image, tokens = torch.randn(1, 3, 8, 8), torch.randint(0, 10, (1, T))
    conv, lstm = 8 * 8 * 4 * 3 * 9, T * 4 * (16 + 16) * 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        costs = mw.exit_costs(Net(), {"image": image, "tokens": tokens})
    assert costs.macs == [conv + HEAD, conv + HEAD + lstm + encoder_layer(T, 16, 32) + HEAD]


class WithLoss(nn.Module):
    """A two-exit classifier that, like a Hugging Face model given its labels, computes a loss in its forward."""

    def __init__(self, loss):
        super().__init__()
        self.stage1, self.stage2, self.h1, self.h2 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 5), nn.Linear(8, 5)
        self.loss = loss

    def forward(self, x, labels=None):
        a = self.stage1(x)
        b = self.stage2(a)
        exits = [self.h1(a), self.h2(b)]
        if labels is not None:
            self.last_loss = sum(self.loss(z, labels) for z in exits)
        return exits


@pytest.mark.parametrize("loss", [
    F.cross_entropy, functools.partial(F.cross_entropy, label_smoothing=0.1), F.multi_margin_loss,
    lambda z, y: F.nll_loss(z.log_softmax(-1), y), lambda z, y: F.mse_loss(z, F.one_hot(y, 5).float()),
    lambda z, y: F.binary_cross_entropy_with_logits(z, F.one_hot(y, 5).float()),
    lambda z, y: F.binary_cross_entropy(z.sigmoid(), F.one_hot(y, 5).float()),
    lambda z, y: F.smooth_l1_loss(z, F.one_hot(y, 5).float()), lambda z, y: F.huber_loss(z, F.one_hot(y, 5).float()),
    lambda z, y: F.cross_entropy(z[:, :, None, None], y[:, None, None])])  # (nll_loss2d)
def test_a_loss_computed_in_the_forward_is_cheap_and_does_not_warn(loss):
    """A batch passed with its labels (a Hugging Face model computes its loss then) warned that the loss
    kernel (aten.nll_loss_forward, aten.mse_loss, ...) had no formula and the costs were lower bounds: a
    loss is a gather or pointwise work and a reduction, cheap as torch.utils.flop_counter counts."""
    x, y = torch.randn(1, 6), torch.tensor([3])
    expected = [6 * 8 + 8 * 5, 6 * 8 + 8 * 5 + 8 * 8 + 8 * 5]  # by hand
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mw.exit_costs(WithLoss(loss), {"x": x, "labels": y}).macs == expected


@pytest.mark.parametrize("op", [
    lambda h: torch.isin(h.round(), torch.tensor([0.0, 1.0])).float(), lambda h: torch.complex(h, h).real,
    lambda h: torch.polar(h.abs(), h).imag, lambda h: torch.view_as_real(torch.complex(h, h))[..., 0],
    lambda h: h + float(torch.allclose(h, h)), lambda h: h + torch.trace(h[:, :1]),
    lambda h: torch.block_diag(h, h)[:1, :8], lambda h: h + torch.triu_indices(3, 3).sum() + torch.tril_indices(3, 3).sum(),
    lambda h: h.to_sparse().to_dense(), lambda h: h.to_sparse().coalesce().to_dense(),
    lambda h: h + h.to_sparse()._nnz() + h.to_sparse().values().sum() * 0])
def test_ops_without_multiply_adds_and_without_a_pointwise_tag_do_not_warn(op):
    """Membership, complex construction, comparisons, diagonals, index tables and layout changes: torch gives
    them no pointwise or reduction tag, so exit_costs warned that their work was left out and the costs were
    lower bounds (helper-97's report); they are as cheap as the ops that have the tag."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stage, self.h1, self.h2 = nn.Linear(6, 8), nn.Linear(8, 5), nn.Linear(8, 5)

        def forward(self, x):
            h = self.stage(x)
            return [self.h1(h), self.h2(op(h))]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mw.exit_costs(Net(), torch.randn(1, 6)).macs == [6 * 8 + 8 * 5, 6 * 8 + 8 * 5 + 8 * 5]  # by hand


class Filled(nn.Module):
    """A stage that writes a linear layer's output into a slice of a zero tensor, in place."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 16)

    def forward(self, x):
        out = x.new_zeros(x.shape[0], 32)
        out[:, :16] = self.linear(x)
        return out


class Concatenated(Filled):
    def forward(self, x):
        return torch.cat([self.linear(x), x.new_zeros(x.shape[0], 16)], 1)  # the same values


@pytest.mark.parametrize("executed", [False, True])
def test_work_written_in_place_into_a_view_is_charged_to_the_exits_that_read_it(executed):
    for stage in (Concatenated(), Filled()):
        net = mw.MultiExit([stage], [nn.Linear(32, 3)])
        costs = mw.exit_costs(net, torch.randn(1, 8), executed=executed)
        assert costs.macs == [8 * 16 + 32 * 3]
        assert costs.params == [(8 * 16 + 16) + (32 * 3 + 3)]


class OneBuffer(nn.Module):
    """Both exits' logits written into slices of one buffer, then read back as views of it."""

    def __init__(self, columns):
        super().__init__()
        self.columns = columns
        self.s1, self.s2, self.h1, self.h2 = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x):
        if self.columns:  # interleaved in memory when the batch has more than one sample
            out = x.new_zeros(x.shape[0], 3, 2)
            a = self.s1(x)
            out[:, :, 0] = self.h1(a)
            out[:, :, 1] = self.h2(self.s2(a))
            return [out[..., 0], out[..., 1]]
        out = x.new_zeros(2, x.shape[0], 3)
        a = self.s1(x)
        out[0] = self.h1(a)
        out[1] = self.h2(self.s2(a))
        return list(out.unbind(0))


@pytest.mark.parametrize("columns", [False, True])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_a_view_of_a_buffer_depends_only_on_what_was_written_where_it_reads(columns, batch_size):
    net = OneBuffer(columns)
    costs = mw.exit_costs(net, torch.randn(batch_size, 6))
    assert costs.macs == [36 + 18, 36 + 18 + 36 + 18]  # exit 1 is not charged stage 2 and head 2
    assert costs.params == [42 + 21, 2 * (42 + 21)]


def test_work_that_reaches_later_layers_through_a_host_value_is_charged_only_by_the_executed_count():
    """The documented limit (evaluation.md, Cost per exit): dependencies are followed through tensors
    only, so b's 32 multiply-adds, which reach the exits through .item(), are charged to no exit by
    the default count (no warning); executed=True counts what runs, b included."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(4, 8)

        def forward(self, x):
            return self.a(x) * self.b(x).abs().sum().item()

    torch.manual_seed(0)
    net = mw.MultiExit([Scaled(), nn.Linear(8, 8)], [nn.Linear(8, 3), nn.Linear(8, 3)]).eval()
    x = torch.randn(1, 4)
    hand = [32 + 32 + 24, 32 + 32 + 24 + 64 + 24]  # a, b, head 1; + stage 2, head 2
    assert mw.exit_costs(net, x, executed=True).macs == hand
    assert mw.exit_costs(net, x).macs == [h - 32 for h in hand]


def test_profiler_markers_in_a_forward_cost_nothing_and_warn_nothing():
    """``torch.profiler.record_function`` in a forward (and DistributedDataParallel's own markers) are ops of the
    ``profiler`` namespace: exit_costs warned that they went uncounted and called the costs lower bounds
    (helper-166). They cost nothing: the costs are the layers' (4x8 then 8x3 multiply-adds), with no warning."""
    import warnings

    class Annotated(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk, self.first, self.second = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(8, 3)

        def forward(self, x):
            with torch.profiler.record_function("trunk"):
                h = self.trunk(x)
            return [self.first(h), self.second(h)]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        costs = mw.exit_costs(Annotated(), torch.randn(1, 4))
    assert costs.macs == [4 * 8 + 8 * 3, 4 * 8 + 2 * 8 * 3]
