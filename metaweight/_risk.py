"""Thresholds with a stated accuracy guarantee: keep early exit within delta of the last exit's accuracy
with a chosen confidence (risk control by fixed-sequence testing with binomial p-values)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from metaweight._budget import NO_EXIT, _assign, _check_costs, _confidence
from metaweight._checks import check_target, integer_value, real_option
from metaweight._exit_rules import ExitRule, decision_dtype
from metaweight._warn import warn_user


def binomial_cdf(k: int, n: int, p: float) -> float:
    """``P(Binomial(n, p) <= k)``, summed in log space."""
    if k >= n:
        return 1.0
    if k < 0:
        return 0.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    j = torch.arange(k + 1, dtype=torch.float64, device="cpu")  # the k + 1 terms at once, in float64, on the
    # CPU whatever the default device (a host value, read once)
    terms = math.lgamma(n + 1) - torch.lgamma(j + 1) - torch.lgamma(n - j + 1) + j * log_p + (n - j) * log_q
    return min(float(terms.exp().sum()), 1.0)


@dataclass
class AccuracyTarget:
    """Thresholds chosen to keep accuracy within ``delta`` of the last exit.

    Attributes:
        thresholds: one per exit (the last ``-1e8``: it takes everyone left), values of the scores'
            dtype as :func:`find_thresholds` gives them (float32; float64 for float64 logits).
        delta: the accuracy drop allowed, as a fraction (0.01: one point).
        confidence: the probability, over the draw of the held-out data, that the guarantee holds.
        loss_rate: on the held-out data, the share of samples the last exit gets right and early
            exit gets wrong (it bounds the accuracy drop from above).
        p_value: the binomial p-value of "the loss rate exceeds delta" for these thresholds.
        val_accuracy: early exit's accuracy (%) on the held-out data.
        val_last_accuracy: the last exit's accuracy (%) there.
        exit_fractions: the share of held-out samples leaving at each exit.
        val_cost: the expected cost per sample on the held-out data, if costs were given.
    """

    thresholds: list[float]
    delta: float
    confidence: float
    loss_rate: float
    p_value: float
    val_accuracy: float
    val_last_accuracy: float
    exit_fractions: list[float]
    val_cost: float | None = None


def _quantiles(values: Tensor, q: Tensor) -> Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) for a 1-d tensor of any length: by a sort
    and an index, where ``torch.quantile`` refuses inputs over 2**24 elements."""
    ordered = values.sort().values
    position = q.to(ordered.dtype) * (ordered.numel() - 1)
    low = position.floor().long()
    high = position.ceil().long()
    between = torch.lerp(ordered[low], ordered[high], position - low.to(ordered.dtype))
    # (between two infinite values, or an infinite and a finite one, lerp gives NaN: the lower one instead)
    return torch.where(between.isnan(), ordered[low], between)


def losses_at_levels(scores: Tensor, prediction: Tensor, labels: Tensor, levels: Tensor) -> Tensor:
    """``[L]``: for each shared threshold in ``levels`` (exits ``1..K-1``; the last takes everyone left), the
    number of samples the last exit gets right and early exit gets wrong; what :func:`_assign` gives level by
    level, for all levels at once. A sample leaves at the first exit whose score reaches the level
    (:func:`reaches`: in :func:`decision_dtype`; NaN reaches nothing), so it has left by exit ``k`` where the
    largest of its first ``k`` scores reaches it: the loss is a sum over exits of counts of those running
    maxima at or above the level (sorted once, searched per level), ``O(K N log N)`` in all."""
    dtype = decision_dtype(scores.device)
    early = scores[:-1].to(dtype)
    # NaN as -inf (infinities kept), and whether a sample has had a score that is not NaN by exit k: one whose
    # scores so far are all NaN reaches no level, -inf included
    reached = torch.where(early.isnan(), -math.inf, early).cummax(0).values  # [K-1, N] running maxima
    scored = (~early.isnan()).to(torch.int8).cummax(0).values.bool()
    last_right = prediction[-1] == labels
    wrong = (last_right & (prediction != labels)).to(torch.int64)  # [K, N]
    change = wrong[:-1] - wrong[1:]  # leaving at exit k instead of later changes the loss by this much
    queries = levels.to(dtype).contiguous()
    total = wrong[-1].sum().expand(queries.shape).clone()
    lowest = queries == -math.inf
    for k in range(reached.shape[0]):
        for sign in (1, -1):
            chosen = change[k] == sign
            values = reached[k][chosen].sort().values
            unscored = (chosen & ~scored[k]).sum()
            total += sign * (values.numel() - torch.searchsorted(values, queries, side="left") - unscored * lowest)
    return total


def _fixed_levels(candidates: int | Sequence[float] | Tensor) -> list[float] | None:
    """``candidates`` given as score levels (a sequence or 1-d tensor of finite numbers), as floats; ``None``
    for a count (an int >= 1). Anything else is refused with a ``ValueError``."""
    levels = isinstance(candidates, (list, tuple)) or (isinstance(candidates, Tensor) and candidates.dim() == 1
                                                       and candidates.is_floating_point())  # (an int tensor: a count)
    if not levels and integer_value(candidates) is not None:  # (a count: an int, a NumPy or 0-d tensor integer)
        if integer_value(candidates) < 1:  # type: ignore[operator]
            raise ValueError(f"Invalid candidates: {candidates!r}. Expected an int >= 1, or the score levels to test.")
        return None
    if isinstance(candidates, Tensor):
        values = candidates.detach().double().cpu().tolist() if levels else None
    elif isinstance(candidates, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                       for v in candidates):
        values = [float(v) for v in candidates]
    else:
        values = None
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"Invalid candidates: {candidates!r}. Expected an int >= 1 (that many quantiles of the "
                         f"held-out scores), or a non-empty list or 1-d floating-point tensor of finite score levels chosen "
                         f"before the held-out data are seen (e.g. torch.linspace(1, 0, 201) for max_probability).")
    return values


def thresholds_for_accuracy(val_logits: Tensor, val_labels: Tensor, delta: float, *, confidence: float = 0.9,
                            costs: Sequence[float] | None = None, rule: ExitRule | str = "max_probability",
                            candidates: int | Sequence[float] = 200) -> AccuracyTarget:
    """The most aggressive exit thresholds whose accuracy drop from the last exit is at most ``delta``
    with probability ``confidence``.

    The bound: for thresholds ``t``, the loss ``l_i(t) = 1[last exit right, early exit wrong]``
    bounds the accuracy drop ``acc(last) - acc(early exit)`` from above, sample by sample. For a
    list of candidate thresholds (one shared score threshold ``s`` for exits ``1..K-1``, from the
    most conservative, nobody leaves early, to the least), each hypothesis "the expected loss
    exceeds ``delta``" gets the exact binomial p-value ``P(Binomial(n, delta) <= sum_i l_i)``;
    testing them in that fixed order at level ``1 - confidence`` and stopping at the first one
    not rejected controls the chance of picking any unsafe candidate at ``1 - confidence``
    (Bates et al. 2021, Learn then Test; Angelopoulos et al. 2021). The held-out data must not
    have trained the model (nor learned its loss weights: a split that scored a weighter's meta
    steps has), and the guarantee is on the expected drop over new data from the same
    distribution. The order is fixed only if the candidates are: by default (``candidates`` an
    int) they are quantiles of the same held-out scores, which the theorem does not cover (a
    simulation, 300 draws of 300 samples at delta 0.03 and 90 % confidence, broke the drop in
    5.7 % of the draws, inside the 10 % allowed, but with no proof); for the guarantee as
    proved, pass the levels themselves, chosen before the held-out data are seen (e.g.
    ``torch.linspace(1, 0, 201)`` for ``max_probability``, whose scores lie in ``[0, 1]``). The loss is 0 or 1, never a log-likelihood: a label on a class masked
    (``-inf``) at an exit is a wrong prediction there, scored as such (a finite value).

    Args:
        val_logits: held-out logits ``[K, N, C]``.
        val_labels: ``[N]``.
        delta: the accuracy drop allowed, a fraction in ``(0, 1)``.
        confidence: the probability the guarantee holds, in ``(0, 1)``.
        costs: the cost of reaching each exit (cumulative), to report ``val_cost``.
        rule: the exit rule (an :class:`ExitRule` or its name).
        candidates: how many shared thresholds to test (quantiles of the held-out scores), or
            the score levels themselves (a list or tuple of finite numbers, or a 1-d floating-point
            tensor, in any order: tested from the highest down), fixed before the held-out data
            are seen.

    Raises:
        ValueError: ``val_logits`` on the meta device or holding NaN (counted per exit) or ``+inf``
            (``-inf`` for a masked class is fine), or other bad arguments.
    """
    scores, prediction = _confidence(val_logits, "val_logits", rule, fit="thresholds_for_accuracy")
    K, N = scores.shape
    labels = check_target(val_labels, N, val_logits.shape[2], name="val_labels").to(prediction.device)
    # both used in Python floats (the binomial p-values): no float32 rule
    delta, confidence = (real_option(given, name, "a number in (0, 1) (an int, a float, a NumPy or 0-d tensor "
                                     "scalar)", lambda v: 0.0 < v < 1.0, dtype=torch.float64)
                         for name, given in (("delta", delta), ("confidence", confidence)))
    fixed = _fixed_levels(candidates)
    cost_list = _check_costs(costs, K) if costs is not None else None
    alpha = 1.0 - confidence
    last_right = prediction[-1] == labels
    if fixed is not None:  # chosen before the data: the order the theorem needs
        levels = fixed
    else:
        count = int(integer_value(candidates))  # type: ignore[arg-type]
        finite = scores[:-1][~torch.isnan(scores[:-1])]
        levels = _quantiles(finite.double(), torch.linspace(1, 0, count + 1, dtype=torch.float64,
                                                            device=finite.device)[1:]).tolist() \
            if finite.numel() else []
    grid = [NO_EXIT] + sorted(set(float(v) for v in levels if float(v) < NO_EXIT), reverse=True)  # conservative first

    def evaluate(level: float) -> tuple[Tensor, int, float]:
        thresholds = torch.full((K,), float(level), dtype=scores.dtype, device=scores.device)  # as find_thresholds
        thresholds[-1] = -NO_EXIT
        first, pred = _assign(scores, prediction, thresholds)
        losses = int((last_right & (pred != labels)).sum())
        return thresholds, losses, binomial_cdf(losses, N, delta)

    # every level's loss at once, in the thresholds' dtype as evaluate() casts them
    counts_at = losses_at_levels(scores, prediction, labels, torch.tensor(grid[1:], dtype=scores.dtype,
                                                                                  device=scores.device)).tolist()
    chosen = evaluate(NO_EXIT)
    for level, losses in zip(grid[1:], counts_at):
        if binomial_cdf(losses, N, delta) > alpha:  # not rejected: stop, keep the last safe one
            break
        chosen = level
    if not isinstance(chosen, tuple):
        chosen = evaluate(chosen)
    thresholds, losses, p_value = chosen
    first, pred = _assign(scores, prediction, thresholds)
    counts = torch.bincount(first, minlength=K).double() / N
    early = float(counts[:-1].sum())  # the share leaving before the last exit
    if p_value > alpha and early > 0:  # (the most conservative level, and still exits)
        warn_user(f"thresholds_for_accuracy: no candidate meets the guarantee, and even the most conservative "
                  f"thresholds ({NO_EXIT:g}) let {early * 100:.3g} % of the held-out samples leave "
                  f"early: their scores reach {NO_EXIT:g} (+inf from a rule of one's own, or a rule's scale that "
                  f"large), so no threshold keeps them. The thresholds returned do not hold the accuracy drop to "
                  f"delta (loss rate {losses / N:.3g}, p-value {p_value:.3g}): give the rule finite scores below "
                  f"{NO_EXIT:g} for samples that should be able to stay.", UserWarning)
    val_cost = float(sum(f * c for f, c in zip(counts.tolist(), cost_list))) if cost_list is not None else None
    return AccuracyTarget(thresholds.tolist(), float(delta), float(confidence), losses / N, p_value,
                          float((pred == labels).double().mean() * 100), float(last_right.double().mean() * 100),
                          counts.tolist(), val_cost)

