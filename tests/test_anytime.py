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
