"""Expected calibration error by a per-sample loop: the oracle for the vectorised version."""

import math


def loop_ece(probs_rows, labels, bins):
    """probs_rows: one list of class probabilities per sample; bins right-closed, (b-1)/bins < conf <= b/bins
    (a confidence of 0 falls in the first bin)."""
    members = [[] for _ in range(bins)]
    for row, y in zip(probs_rows, labels):
        conf = max(row)
        pred = row.index(conf)
        b = min(max(math.ceil(conf * bins), 1), bins) - 1
        members[b].append((conf, int(pred == y)))
    n = len(labels)
    total = 0.0
    for group in members:
        if group:
            acc = sum(c for _, c in group) / len(group)
            conf = sum(p for p, _ in group) / len(group)
            total += len(group) / n * abs(acc - conf)
    return 100.0 * total
