"""Token-level exits: logits [B, T, C] with padding (ignore_index) in dense distillation, the balanced
objective, the meta step and evaluation, against per-token loops."""

import math

import pytest
import torch
from torch import nn

import metaweight as mw
from test_errors import assert_same, snapshot
from test_weighter import F64, finite_difference_gamma_grad, rel_err

PAD = -100


def token_batch(B=3, T=5, C=4, K=3, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(B, T, C, generator=g, dtype=dtype) for _ in range(K)]
    labels = torch.randint(0, C, (B, T), generator=g)
    labels[0, 3:] = PAD  # padding at the end of two sequences
    labels[2, 4:] = PAD
    return logits, labels


def loop_terms(logits, labels, T_kd):
    """Every term by a plain loop over the scored tokens: CE_k and T^2 KL(teacher || student)."""
    K = len(logits)
    positions = [(b, t) for b in range(labels.shape[0]) for t in range(labels.shape[1]) if labels[b, t] != PAD]
    ce = []
    for k in range(K):
        total = 0.0
        for b, t in positions:
            z = logits[k][b, t]
            total += float(torch.logsumexp(z, 0) - z[labels[b, t]])
        ce.append(total / len(positions))
    kd = []
    for i in range(1, K):
        for j in range(i):
            total = 0.0
            for b, t in positions:
                p_t = torch.softmax(logits[i][b, t] / T_kd, 0)
                total += float((p_t * (torch.log(p_t) - torch.log_softmax(logits[j][b, t] / T_kd, 0))).sum())
            kd.append(T_kd * T_kd * total / len(positions))
    return torch.tensor(ce + kd, dtype=F64)


def test_token_level_dense_distillation_equals_a_per_token_loop():
    logits, labels = token_batch()
    criterion = mw.DenseDistillLoss(3, temperature=2.0)
    assert torch.allclose(criterion(logits, labels), loop_terms(logits, labels, 2.0), rtol=1e-10)
    validation = mw.BalancedValidation(3)
    assert torch.allclose(validation.exit_losses(logits, labels), loop_terms(logits, labels, 2.0)[:3], rtol=1e-10)


def test_token_level_evaluation_scores_every_token_but_padding():
    logits, labels = token_batch()
    model_logits = torch.stack(logits)

    class Fixed(nn.Module):
        def forward(self, x):
            return [z for z in model_logits]

    collected, flat = mw.collect_logits(Fixed(), [(torch.zeros(3), labels)])
    scored = (labels != PAD).sum().item()
    assert collected.shape == (3, scored, 4) and flat.shape == (scored,)
    result = mw.anytime_accuracy_from_logits(collected, flat, topk=(1,))
    for k in range(3):
        hits = [int(model_logits[k, b, t].argmax() == labels[b, t]) for b in range(3) for t in range(5)
                if labels[b, t] != PAD]
        assert result.accuracy[1][k] == pytest.approx(100 * sum(hits) / len(hits))
    curve = mw.budgeted_curve(collected, flat, collected, flat, [1.0, 2.0, 3.0])
    assert all(1.0 <= p.cost <= 3.0 for p in curve.points)


class TokenExits(nn.Module):
    """A tiny token model: embeddings, then a Tanh layer and a classifier per exit, on every token."""

    def __init__(self, vocab=7, width=6, classes=4, K=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(K))
        self.heads = nn.ModuleList(nn.Linear(width, classes) for _ in range(K))

    def forward(self, ids):
        h, out = self.embed(ids), []
        for layer, head in zip(self.layers, self.heads):
            h = layer(h)
            out.append(head(h))
        return out


def ids_batch(seed, B=4, T=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 7, (B, T), generator=g)
    labels = torch.randint(0, 4, (B, T), generator=g)
    labels[1, 2:] = PAD
    return ids, labels


@pytest.mark.parametrize("backend", ["jvp", "higher", "finite_difference"])
def test_token_level_meta_gradient_matches_real_optimizer_steps(backend):
    torch.manual_seed(0)
    model = TokenExits().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    criterion, validation = mw.DenseDistillLoss(3, temperature=2.0), mw.BalancedValidation(3)
    validation.update(torch.tensor([1.5, 1.4, 1.3], dtype=F64))  # the average as a constant, as in the oracle
    w = mw.HarmonizedWeighter(model, optimizer, criterion, validation, backend=backend,
                              init=torch.tensor([1.0, 0.8, 1.2, 0.5, 0.9, 1.1]))
    train, val = ids_batch(1), ids_batch(2)
    ref = finite_difference_gamma_grad(model, optimizer, criterion, validation, w.gamma.detach().clone(), train, val)
    out = w.meta_step(train, val)
    assert ref.norm() > 0
    assert rel_err(out["gamma_grad"], ref) < (2e-2 if backend == "finite_difference" else 1e-6)
    record = w.step(train, val)
    assert math.isfinite(record.loss)


def test_a_padding_mask_covering_every_token_is_refused_and_changes_nothing():
    torch.manual_seed(0)
    model = TokenExits()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3))
    w.step(ids_batch(1), ids_batch(2))
    before = snapshot(model, optimizer, w)
    ids, labels = ids_batch(3)
    with pytest.raises(ValueError, match="ignore_index=-100.*nothing to score"):
        w.step(ids_batch(4), (ids, torch.full_like(labels, PAD)))
    with pytest.raises(ValueError, match="nothing to score"):
        w.step((ids, torch.full_like(labels, PAD)), ids_batch(4))
    assert_same(before, snapshot(model, optimizer, w))


def test_early_exit_refuses_token_level_logits_with_a_clear_error():
    model = mw.MultiExit([nn.Embedding(7, 6), nn.Linear(6, 6)], [nn.Linear(6, 4), nn.Linear(6, 4)])
    with pytest.raises(ValueError, match="per sample.*per token"):
        mw.EarlyExit(model, torch.tensor([0.5, -1.0]))(torch.randint(0, 7, (2, 5)))


@pytest.mark.parametrize("options", [{}, {"learn": False}, {"mode": "fast"},
                                     {"mode": "fast", "capturable": True, "nonfinite": "skip"}],
                         ids=["exact", "learn=False", "fast", "fast, capturable"])
def test_every_step_form_trains_on_token_id_inputs(options):
    """Token ids are integer inputs, with no floating-point entry: the fast mode's check of the validation inputs'
    finiteness got an empty list, which torch's grouping by device and dtype refuses (every step raised). Each
    form steps, its loss finite, the model moved, and gamma learned where it learns."""
    torch.manual_seed(0)
    model = TokenExits()
    fused = {"fused": True} if options.get("capturable") else {}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, **fused)
    w = mw.HarmonizedWeighter(model, optimizer, mw.DenseDistillLoss(3), mw.BalancedValidation(3), **options)
    gamma, weight = w.gamma.detach().clone(), model.heads[0].weight.detach().clone()
    def unpadded(seed):  # (capturable=True refuses padding: a selection a graph cannot hold)
        ids, labels = ids_batch(seed)
        return ids, labels.clamp(min=0)

    for seed in range(3):
        record = w.step(unpadded(seed), unpadded(seed + 10))
        assert math.isfinite(record.loss) and not record.model_step_skipped, (options, seed)
    assert not torch.equal(model.heads[0].weight, weight)
    assert torch.equal(w.gamma, gamma) == (options.get("learn") is False), options
