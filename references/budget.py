"""The per-sample loop that MSDNet's budgeted evaluation describes: the oracle for tests and benchmarks."""

import math

import torch


def loop_thresholds(probs, distribution):
    """Per-sample reference: walk the samples of each exit from most to least confident, skipping
    those already gone, and take the confidence of the n-th one still there."""
    return loop_thresholds_from_scores(probs.max(dim=2).values, distribution)


def loop_thresholds_from_scores(conf, distribution):
    """The same walk over any exit scores ``[K, N]`` (NaN scores are never counted nor pass)."""
    K, N = conf.shape
    conf = torch.where(torch.isnan(conf), torch.full_like(conf, -math.inf), conf)
    order = conf.sort(dim=1, descending=True, stable=True).indices
    gone = [False] * N
    T = [1e8] * K
    for k in range(K - 1):
        target = math.floor(float(N * distribution[k]))
        seen = 0
        for i in order[k].tolist():
            if not gone[i] and conf[k, i] != -math.inf:
                seen += 1
                if seen == target:
                    T[k] = float(conf[k, i])
                    break
        for i in range(N):
            if float(conf[k, i]) >= torch.tensor(T[k], dtype=torch.float32).item():
                gone[i] = True
    T[K - 1] = -1e8
    return torch.tensor(T, dtype=torch.float32)


def loop_evaluate(probs, labels, T, costs, predictions=None):
    """MSDNet's loop: each sample at the first exit whose top probability reaches the threshold,
    predicted as the index of that probability (``probs.max``), or by ``predictions [K, N]``."""
    K, N, _ = probs.shape
    conf, pred = probs.max(dim=2)
    pred = pred if predictions is None else predictions
    correct, taken = 0, [0] * K
    for i in range(N):
        for k in range(K):
            if conf[k, i] >= T[k]:
                correct += int(pred[k, i] == labels[i])
                taken[k] += 1
                break
    return 100.0 * correct / N, sum(t / N * c for t, c in zip(taken, costs)), [t / N for t in taken]
