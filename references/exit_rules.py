"""Exit rules and early exit by plain per-sample loops: the oracle for the vectorised rules."""

import math


def softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def argmax(row):
    best = 0
    for i, v in enumerate(row):
        if v > row[best]:
            best = i
    return best


def score(rule, logits_of_sample, k):
    """The score of exit ``k`` for one sample, from its logits at exits 0..k (lists of floats); NaN
    where exit ``k``'s logits hold a NaN."""
    if any(math.isnan(v) for v in logits_of_sample[k]):
        return math.nan
    p = softmax(logits_of_sample[k])
    if rule == "max_probability":
        return max(p)
    if rule == "entropy":
        return sum(q * math.log(q) for q in p if q > 0)
    if rule == "margin":
        ranked = sorted(p, reverse=True)
        return 1.0 if len(ranked) == 1 else ranked[0] - ranked[1]
    if rule == "patience":
        count = 0
        for j in range(k, 0, -1):
            if any(math.isnan(v) for v in logits_of_sample[j - 1]):
                break
            if argmax(softmax(logits_of_sample[j])) == argmax(softmax(logits_of_sample[j - 1])):
                count += 1
            else:
                break
        return float(count)
    raise ValueError(rule)


def loop_assign(rule, logits, thresholds):
    """For each sample, the first exit (before the last) whose score reaches its threshold, else the
    last; a NaN score never passes. Returns (exits, predictions) as lists."""
    K, N = len(logits), len(logits[0])
    exits, predictions = [], []
    for i in range(N):
        sample = [logits[k][i] for k in range(K)]
        for k in range(K):
            s = score(rule, sample, k) if k < K - 1 else math.inf
            if k == K - 1 or (not math.isnan(s) and s >= thresholds[k]):
                exits.append(k)
                predictions.append(argmax(softmax(sample[k])) if not any(math.isnan(v) for v in sample[k]) else None)
                break
    return exits, predictions
