"""Budgeted batch classification (Huang et al. 2018, "Multi-Scale Dense Networks"), vectorised.

A sample leaves at the first exit whose softmax confidence reaches that exit's threshold.
Thresholds are set on held-out logits so that a target fraction of samples leaves at each
exit: MSDNet uses a geometric distribution, fraction of exit ``k`` proportional to ``q**k``,
over the grid ``q = p/20``, ``p = 1..39``. Applied to test logits, every ``q`` gives one
point (expected cost per sample, accuracy). The reference code loops over samples in
Python; here every step is a tensor op over all samples, and the thresholds, exits and costs
agree exactly with such a loop (tested against one, tied scores included). The predictions agree
but in one kind of row: MSDNet's code predicts the index of the largest float32 softmax
probability (``probs.max``, the first of tied ones), metaweight the argmax of the logits in their
own dtype (as :class:`EarlyExit` does), so where two logits of a row are close enough that their
probabilities round to one float32 value (two logits one ulp apart can), the two can predict
different classes and score that sample differently.

Every value here is an accuracy or a cost, never a log-likelihood: a label on a class masked
(``-inf``) at an exit is a wrong prediction there (the exit never predicts that class), a finite
value, so such labels are scored, not refused (:func:`fit_temperatures` refuses them: their NLL is
infinite).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metaweight._checks import (check_device_available, check_fit_logits, check_has_values, check_nan_logits,
                                check_softmax_rows, check_target, check_thresholds, integer_value, real_list,
                                real_numbers, real_option, real_scalar, real_tensor, unstacked_hint)
from metaweight._exit_rules import Entropy, ExitRule, Margin, MaxProbability, as_rule, predict, reaches
from metaweight._warn import warn_user

NO_EXIT = 1e8  # a threshold no confidence reaches (MSDNet's value)

# the largest score of each built-in rule and what its scores are, by the very function (taken at import: a scores
# replaced later is not known)
_HIGHEST = {MaxProbability.scores: (1.0, "probabilities: 90 % is 0.9"),
            Margin.scores: (1.0, "differences of two probabilities"),
            Entropy.scores: (0.0, "minus the entropy: for 'an entropy of at most 0.3' pass -0.3")}


def warn_unreachable(thresholds: Tensor, rule: ExitRule, what: str) -> None:
    """Warn where a threshold of an exit before the last is above every score ``rule`` gives (a built-in rule's),
    so that no sample can leave there, unless it says so: ``float('inf')`` or :data:`NO_EXIT` (MSDNet's value). Such
    a threshold is the sign of another scale (a percentage, the entropy where its negative is scored)."""
    known = _HIGHEST.get(getattr(rule.scores, "__func__", None))
    if known is None:
        return
    highest, scale = known
    values = thresholds.tolist()[:-1]
    above = [k for k, t in enumerate(values) if highest < t < NO_EXIT]
    if above:
        warn_user(f"{what}: the threshold{'s' if len(above) > 1 else ''} {[values[k] for k in above]} of exit"
                  f"{'s' if len(above) > 1 else ''} {[k + 1 for k in above]} {'are' if len(above) > 1 else 'is'} "
                  f"above every score of the rule {rule.name!r}, which are {scale} (at most {highest:g}), so no "
                  f"sample leaves there. Pass thresholds on that scale; for an exit no sample should leave at, "
                  f"float('inf') says so without this warning.")


def _confidence(logits: Tensor, name: str = "logits", rule: ExitRule | str = "max_probability", *,
                fit: str | None = None, what: str = "evaluating exit thresholds",
                every_row: bool = True) -> tuple[Tensor, Tensor]:
    """Every exit's score under ``rule`` and its predicted class, ``[K, N]`` each. ``fit`` (the
    function's name) marks logits that thresholds are fitted on: NaN and ``+inf`` are refused there
    (see :func:`check_fit_logits`); logits only evaluated keep the exit rules' convention that a NaN
    score never leaves, as in :class:`EarlyExit`, and the caller refuses NaN rows a prediction is
    taken from (:func:`check_nan_logits`, once the exits are known). ``every_row=False`` leaves rows
    with no softmax to the caller, which checks only the rows samples reach (:func:`_assigned`)."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"`{name}` should be a Tensor [K, N, C]. Found `{type(logits).__name__}`."
                        f"{unstacked_hint(logits)}")
    if logits.dim() != 3:
        raise ValueError(f"Expected `{name}` of shape [K, N, C]. Found {tuple(logits.shape)}.")
    if 0 in logits.shape:
        raise ValueError(f"`{name}` {tuple(logits.shape)} hold no exit, sample or class: nothing to evaluate.")
    if not logits.is_floating_point():
        raise ValueError(f"`{name}` should be floating point. Found {logits.dtype}.")
    logits = logits.detach()  # evaluation: thresholds and scores carry no graph (and no grad warnings)
    if fit is not None:
        check_fit_logits(logits, name, fit)
    else:
        check_has_values(logits, f"`{name}`", what)
        if every_row:
            check_softmax_rows(logits, name)
    prediction = predict(logits)
    return as_rule(rule).scores(logits), prediction  # float32, float64 for float64 logits


def _check_costs(costs: Sequence[float], num_exits: int) -> list[float]:
    """The cumulative cost of reaching each exit as floats (an :class:`ExitCosts` gives its ``macs``)."""
    from metaweight._flops import ExitCosts

    if isinstance(costs, ExitCosts):
        costs = costs.macs
    values = real_list(costs, "costs", f"{num_exits} numbers, one cost per exit (or an ExitCosts)",
                       "choosing exits")
    if len(values) != num_exits:
        raise ValueError(f"Expected one cost per exit ({num_exits}). Found {len(values)}.")
    if not all(math.isfinite(c) and c >= 0 for c in values):
        raise ValueError(f"The costs {values} should be finite and >= 0.")
    if any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"The costs {values} decrease, but costs[k] is the cumulative cost of reaching exit k (every "
                         f"earlier exit is passed on the way), so they never do: pass cumulative costs, e.g. "
                         f"exit_costs(model, x).macs.")
    return values


def _check_device(device: object, name: str = "device") -> torch.device | None:
    """``device`` as a ``torch.device`` (``None`` kept), or a ValueError that names it."""
    if device is None:
        return device
    if not isinstance(device, (str, int, torch.device)) or isinstance(device, bool):
        raise TypeError(f"`{name}` should be a torch.device, a str such as 'cpu' or 'cuda:0', or None. "
                        f"Found `{type(device).__name__}`.")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"Invalid {name}: {device!r}. Expected a device such as 'cpu' or 'cuda:0' "
                         f"({exc}).") from None
    check_device_available(parsed, name)
    return parsed


def geometric_exit_distribution(q: float, num_exits: int, *, device: torch.device | str | None = None) -> Tensor:
    """MSDNet's target distribution of samples over exits, proportional to ``q**k`` (float32).

    Computed as MSDNet's code computes it (``exp(log(q) * k)`` in float32, normalised), so its
    thresholds are MSDNet's, wherever every ``q**k`` fits a float32; beyond (``q = 1000`` with
    13 exits, ``q = 1e30``), where float32 would overflow to ``inf / inf = NaN``, in log space
    and float64, then rounded to float32.

    Args:
        q: the ratio between consecutive exits (< 1 favours early exits).
        num_exits: ``K``; the distribution is over ``k = 1..K``.
        device: where to create it (the default device if ``None``).
    """
    # q meets float32 only where every q**k is a normal float32, float64 (log space) beyond: no float32 rule
    q = real_option(q, "q", "a finite number > 0 (an int, a float, a NumPy or 0-d tensor scalar)",
                    lambda v: math.isfinite(v) and v > 0, dtype=torch.float64)
    if integer_value(num_exits) is None or integer_value(num_exits) < 1:  # type: ignore[operator]
        raise ValueError(f"Invalid num_exits: {num_exits!r}. Expected a positive int (a Python or NumPy int, or a "
                         f"0-d integer tensor).")
    num_exits = int(integer_value(num_exits))  # type: ignore[arg-type]
    device = _check_device(device)
    if num_exits * abs(math.log(q)) <= 80.0:  # every q**k a normal float32 (exp(88.7) overflows)
        k = torch.arange(1, num_exits + 1, dtype=torch.float32, device=device)
        probs = torch.exp(torch.log(torch.tensor([q], dtype=torch.float32, device=device)) * k)
        return probs / probs.sum()
    log_probs = torch.arange(1, num_exits + 1, dtype=torch.float64, device=device) * math.log(q)
    probs = torch.exp(log_probs - log_probs.max())
    return (probs / probs.sum()).float()


def find_thresholds(logits: Tensor, distribution: Tensor | Sequence[float], *,
                    rule: ExitRule | str = "max_probability") -> Tensor:
    """Confidence thresholds that make ``distribution[k]`` of the samples leave at exit ``k``.

    Going through exits 1..K-1, the threshold of exit ``k`` is the confidence of the
    ``floor(N * distribution[k])``-th most confident sample among those still in the network
    (``NO_EXIT`` if there are fewer, or that count is 0); the last exit takes everyone left.

    Args:
        logits: held-out logits ``[K, N, C]``.
        distribution: ``[K]`` target fractions, summing to 1 (within ``1e-4``, or ``K`` times the
            machine epsilon of a float16/bfloat16 distribution; anything else is refused: ``[4, 3, 2, 1]`` is not a distribution), as a tensor or a list; integers
            are fractions too (``[0, 0, 1]``: everyone at the last exit).
        rule: the exit rule whose scores are thresholded (an :class:`ExitRule` or its name).

    Every sample whose score equals a threshold leaves there, so tied scores (PABEE's patience,
    0 for every sample at exit 1; a softmax saturated at exactly 1.0) can send more than the share
    asked, and later exits fewer. The shares these thresholds realise are computed with the rule
    :func:`exit_assignment` and :class:`EarlyExit` use; where one differs from its target
    (``floor(N * distribution[k])`` samples, the last exit the rest) by more than one sample, a
    ``RuntimeWarning`` names the asked and realised shares and the exits whose scores tie
    (:func:`budgeted_curve` and :func:`thresholds_for_budget` warn alike).

    Returns:
        Thresholds ``[K]`` in the scores' dtype (float32; float64 for float64 logits), the last
        one ``-NO_EXIT``. (The realised shares: ``exit_assignment`` on the same logits, or
        :func:`evaluate_thresholds`' ``exit_fractions``.)

    Raises:
        ValueError: logits or a distribution on the meta device; logits not ``[K, N, C]`` floats,
            holding NaN (counted per exit), or with a row that has no softmax (``+inf``, or all
            ``-inf``: every class masked; ``-inf`` for some classes is fine); a distribution of
            another length, negative, or not summing to 1.
        TypeError: a distribution that is not numbers (bools included).
    """
    confidence, prediction = _confidence(logits, rule=rule, fit="find_thresholds")
    distribution = _distribution(distribution, confidence.shape[0])
    taken: list[tuple[int, int, int]] = []
    thresholds = _thresholds(confidence, distribution, taken)
    _warn_unrealised(confidence, prediction, thresholds, distribution, taken, as_rule(rule).name)
    return thresholds


def _warn_unrealised(confidence: Tensor, prediction: Tensor, thresholds: Tensor, distribution: Tensor,
                     taken: list[tuple[int, int, int]], rule: str) -> None:
    """Warn when the shares ``thresholds`` realise (:func:`_assign`, the rule of :func:`exit_assignment`
    and :class:`EarlyExit`) differ from the targets of :func:`_thresholds` by more than one sample;
    ``taken`` is its record per exit ``1..K-1``: (samples wanted, samples left to choose from,
    samples that reached the threshold)."""
    found = _unrealised(confidence, prediction, thresholds, distribution, taken, rule)
    if found is None:
        return
    shares, causes = found
    warn_user(f"find_thresholds could not realise the distribution: {shares}. Cause: {causes}. A threshold cannot "
              f"split samples with one score: all of them leave, and exits after have fewer to take. Use "
              f"{_tie_fix(rule)}; or ask for shares the ties allow.", RuntimeWarning)


def _unrealised(confidence: Tensor, prediction: Tensor, thresholds: Tensor, distribution: Tensor,
                taken: list[tuple[int, int, int]], rule: str, *, ties_only: bool = False
                ) -> tuple[str, str] | None:
    """``None`` when the shares ``thresholds`` realise are the targets within one sample per exit
    (with ``ties_only``: also when no exit sends more than asked because of tied scores); else the
    asked and realised shares and the causes, as text."""
    K, N = confidence.shape
    first, _ = _assign(confidence, prediction, thresholds)
    realised = torch.bincount(first, minlength=K).tolist()
    targets = [wanted for wanted, _, _ in taken]
    targets.append(N - sum(targets))
    if all(abs(r - t) <= 1 for r, t in zip(realised, targets)):
        return None
    causes = []
    tied = False
    for k, (wanted, available, leaving) in enumerate(taken):
        if leaving > wanted + 1:
            tied = True
            count = int((confidence[k] == thresholds[k]).sum())
            causes.append(f"tied {rule} scores at exit {k + 1}: {count} samples score exactly "
                          f"{float(thresholds[k]):.9g}, the threshold, so {leaving} left where {wanted} were asked")
        elif available < wanted:
            causes.append(f"exit {k + 1}: {wanted} asked to leave, {available} samples left to take")
    if ties_only and not tied:
        return None
    asked = [round(float(d), 4) for d in distribution]
    got = [round(r / N, 4) for r in realised]
    return (f"of the {N} samples, shares {asked} were asked to leave at exits 1..{K}, the thresholds send {got} "
            f"(the rule of exit_assignment and EarlyExit)", "; ".join(causes))


def _tie_fix(rule: str) -> str:
    """What to use instead when ``rule``'s tied scores keep thresholds from realising the shares."""
    if rule == "patience":
        return ("a rule whose scores vary continuously ('entropy', 'max_probability', 'margin'): patience scores are "
                "counts, 0 for every sample at exit 1")
    return ("logits divided by temperatures (calibrate: T > 1 undoes a softmax saturated at 1.0), float64 logits, or "
            "a rule whose scores saturate less ('entropy')")


PATIENCE_POINTS = ("PABEE's own operating points are one patience t at every exit (a sample leaves once t + 1 exits "
                   "in a row agree): evaluate_thresholds(logits, labels, [t] * K, costs, rule='patience') for "
                   "t = 0..K-1")


def _distribution(distribution: Tensor | Sequence[float], K: int) -> Tensor:
    """The checked target shares of :func:`find_thresholds` (``K`` finite fractions >= 0 summing to 1)
    as a floating-point tensor; a tensor so returned passes again unchanged."""
    distribution = real_tensor(distribution, "distribution", f"{K} fractions, one per exit")
    if distribution.shape != (K,):
        raise ValueError(f"distribution should have shape ({K},). Found {tuple(distribution.shape)}.")
    if not distribution.is_floating_point():  # [0, 0, 1] as ints: the same proportions
        distribution = distribution.float()
    if not torch.isfinite(distribution).all() or (distribution < 0).any():
        raise ValueError(f"distribution {distribution.tolist()} should hold finite fractions >= 0.")
    total = float(distribution.double().sum())
    # each fraction rounded to the input's precision: fp16's [1/3] * 3 sums to 0.999756, bf16's to 1.00195
    tolerance = max(1e-4, K * torch.finfo(distribution.dtype).eps)
    if abs(total - 1.0) > tolerance:
        raise ValueError(f"distribution {distribution.tolist()} should sum to 1 (the share of the samples leaving "
                         f"at each exit, within {tolerance:.3g} for {distribution.dtype}); it sums to {total:.6g}. "
                         f"Normalise it: distribution / distribution.sum().")
    return distribution


def _thresholds(confidence: Tensor, distribution: Tensor | Sequence[float],
                taken: list[tuple[int, int, int]] | None = None) -> Tensor:
    """The thresholds of :func:`find_thresholds` on scores ``[K, N]``; with ``taken``, one record per exit
    ``1..K-1`` appended to it: (samples wanted there, samples left to choose from, samples that reach
    the threshold among them)."""
    K, N = confidence.shape
    distribution = _distribution(distribution, K)
    thresholds = torch.full((K,), NO_EXIT, dtype=confidence.dtype, device=confidence.device)
    remaining = torch.ones(N, dtype=torch.bool, device=confidence.device)
    for k in range(K - 1):
        wanted = math.floor(float(N * distribution[k].float()))  # in float32, as the reference computes it
        candidates = confidence[k][remaining]
        candidates = candidates[~torch.isnan(candidates)]  # a NaN score never passes a threshold
        if 1 <= wanted <= candidates.numel():
            thresholds[k] = candidates.topk(wanted).values[-1]
        if taken is not None:
            taken.append((wanted, candidates.numel(), int((candidates >= thresholds[k]).sum())))
        remaining &= confidence[k] < thresholds[k]
    thresholds[K - 1] = -NO_EXIT
    return thresholds


class ExitAssignment(NamedTuple):
    """What :func:`exit_assignment` returns: a named tuple, so ``exits, predictions = exit_assignment(...)``
    unpacks it as the plain tuple it was before.

    Attributes:
        exits: the exit each sample leaves at, 0-based, ``[N]`` (``torch.long``).
        predictions: the class that exit predicts for the sample, ``[N]`` (``torch.long``).
    """

    exits: Tensor
    predictions: Tensor


def exit_assignment(logits: Tensor, thresholds: Tensor | Sequence[float], *, rule: ExitRule | str = "max_probability"
                    ) -> ExitAssignment:
    """For every sample, the first exit whose confidence reaches its threshold, and that exit's prediction.

    Args:
        logits: ``[K, N, C]``.
        thresholds: ``[K]`` thresholds on the rule's scores (the last exit takes every sample left), a
            tensor or a list.
        rule: the exit rule (an :class:`ExitRule` or its name).

    Returns:
        An :class:`ExitAssignment` ``(exits, predictions)``: the exit index (0-based) ``[N]`` and the
        predicted class ``[N]``; it unpacks as a pair.

    Raises:
        ValueError: logits not ``[K, N, C]`` floats or on the meta device; a row with no softmax at
            an exit its sample reaches; NaN logits at the exit a sample is predicted at (counted per
            exit: the argmax of a NaN row is not a prediction; a NaN score never leaves an earlier
            exit, so such a sample reaches the last one, which takes everyone). NaN at an exit a
            sample goes on from is kept: it decides nothing.
    """
    return ExitAssignment(*_assigned(logits, thresholds, rule, "exit_assignment")[3:])


def _assigned(logits: Tensor, thresholds: object, rule: ExitRule | str, what: str
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The scores, predictions, thresholds, exits and exits' predictions of early exit on ``logits``,
    refusing, as :class:`EarlyExit` does, a row with no softmax at an exit its sample reaches (its own
    or an earlier one), and a NaN row at the exit a sample is predicted at; the rows of exits after
    the one a sample takes are never judged, as :class:`EarlyExit` never computes them."""
    confidence, prediction = _confidence(logits, rule=rule, what=what, every_row=False)
    checked = check_thresholds(thresholds, confidence.shape[0])
    warn_unreachable(checked, as_rule(rule), what)
    first, chosen = _assign(confidence, prediction, checked)
    exits = torch.arange(confidence.shape[0], device=first.device)[:, None]
    check_softmax_rows(logits.detach(), "logits", reached=exits <= first[None])
    check_nan_logits(logits, "logits", what, scored=exits == first[None])  # where a prediction is taken
    return confidence, prediction, checked, first, chosen


def _assign(confidence: Tensor, prediction: Tensor, thresholds: Tensor) -> tuple[Tensor, Tensor]:
    passes = reaches(confidence, thresholds.view(-1, 1))
    passes[-1] = True
    # along the last dimension of an [N, K] copy: torch's CPU argmax along dim 0 of [K, N] took 0.49 s per call
    # at K = 3, N = 1e6 against 0.12 s (budgeted_curve calls it twice per q)
    first = passes.to(torch.uint8).t().contiguous().argmax(dim=1)
    return first, prediction.gather(0, first.view(1, -1)).squeeze(0)


def check_point_values(cost: object, accuracy: object, where: str) -> tuple[float, float]:
    """A budget point's cost and accuracy as floats, or a ValueError naming ``where``: the cost a
    finite number >= 0, the accuracy a percentage in ``[0, 100]`` (not a str, not NaN)."""
    number = real_scalar(cost)
    if number is None or not math.isfinite(number) or number < 0:
        raise ValueError(f"The cost of {where} should be a finite number >= 0 (the expected cost per sample). "
                         f"Found {cost!r}.")
    percent = real_scalar(accuracy)
    if percent is None or not 0.0 <= percent <= 100.0:  # (NaN fails both comparisons)
        raise ValueError(f"The accuracy of {where} should be a percentage in [0, 100]. Found {accuracy!r}. "
                         f"Accuracies are in percent, not fractions of 1 (evaluate_thresholds and budgeted_curve "
                         f"give them so).")
    return number, percent


@dataclass
class BudgetPoint:
    """One operating point of budgeted classification.

    Attributes:
        q: the geometric ratio the thresholds were found for (None if given directly).
        thresholds: the confidence threshold of each exit.
        cost: the expected cost per sample on the evaluated data.
        accuracy: top-1 accuracy in percent on the evaluated data.
        exit_fractions: the share of samples leaving at each exit.
        val_cost: the expected cost on the held-out data the thresholds came from.
        val_accuracy: the accuracy on that held-out data.
    """

    q: float | None
    thresholds: list[float]
    cost: float
    accuracy: float
    exit_fractions: list[float]
    val_cost: float | None = None
    val_accuracy: float | None = None


def evaluate_thresholds(logits: Tensor, labels: Tensor, thresholds: Tensor | Sequence[float],
                        costs: Sequence[float], *, rule: ExitRule | str = "max_probability") -> BudgetPoint:
    """Accuracy and expected cost per sample of early exit with ``thresholds``.

    Args:
        logits: ``[K, N, C]``.
        labels: ``[N]`` class indices.
        thresholds: ``[K]`` thresholds on the rule's scores, a tensor or a list.
        costs: ``costs[k]`` is the cost of reaching exit ``k`` (cumulative, e.g. ``ExitCosts.macs``).
        rule: the exit rule (an :class:`ExitRule` or its name).

    Raises:
        ValueError: as :func:`exit_assignment` (NaN logits at the exit a sample is predicted at
            among them: such a sample would be scored as class 0), or bad labels or costs.
    """
    confidence, prediction, checked, _, _ = _assigned(logits, thresholds, rule, "evaluate_thresholds")
    check_target(labels, confidence.shape[1], logits.shape[2], name="labels")
    return _evaluate(confidence, prediction, labels, checked, costs)


def _evaluate(confidence: Tensor, prediction: Tensor, labels: Tensor, thresholds: Tensor,
              costs: Sequence[float], scored: Tensor | None = None) -> BudgetPoint:
    """The point of ``thresholds``; with ``scored`` (``[K, N]`` bool), the rows predictions are taken
    from are marked in it (for :func:`check_nan_logits`)."""
    K, N = confidence.shape
    costs = _check_costs(costs, K)
    labels = check_target(labels, N, None)
    first, prediction = _assign(confidence, prediction, thresholds)
    if scored is not None:
        scored |= torch.arange(K, device=first.device)[:, None] == first[None]
    counts = torch.bincount(first, minlength=K).double()
    cost = float((counts / N * torch.tensor(costs, dtype=torch.float64, device=counts.device)).sum())
    accuracy = float((prediction == labels.to(prediction.device)).double().mean() * 100)
    return BudgetPoint(None, thresholds.tolist(), cost, accuracy, (counts / N).tolist())


@dataclass
class BudgetCurve:
    """Accuracy against expected cost per sample over a grid of exit distributions.

    Attributes:
        points: one :class:`BudgetPoint` per ``q``.
        costs: the cost of reaching each exit.
        cost_unit: what the costs count (``"MACs"`` by default).
        extra: further fields to carry into :meth:`to_dict`.
    """

    points: list[BudgetPoint]
    costs: list[float]
    cost_unit: str = "MACs"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"costs": self.costs, "cost_unit": self.cost_unit, "points": [asdict(p) for p in self.points],
                **self.extra}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BudgetCurve:
        """The curve :meth:`to_dict` wrote, its extra fields (the exit rule, a data set's name) included.

        Raises:
            ValueError: ``d`` not such a dict: a missing or unknown key, a cost or an accuracy that
                is not a number (``"50.0"``), a cost that is negative or not finite, an accuracy
                outside ``[0, 100]`` percent or NaN, a point's ``thresholds`` or ``exit_fractions``
                not one number per exit (as many as ``costs``; shares in ``[0, 1]``).
        """
        fix = "Pass what BudgetCurve.to_dict (or budgeted_curve(...).to_dict()) wrote, unchanged."
        if not isinstance(d, Mapping):
            raise ValueError(f"BudgetCurve.from_dict needs a dict with 'points' and 'costs'. Found "
                             f"`{type(d).__name__}`. {fix}")
        for key in ("points", "costs"):
            if key not in d:
                raise ValueError(f"The budget curve's dict lacks the key {key!r}. {fix}")
        raw = d["points"]
        if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
            raise ValueError(f"The budget curve's 'points' should be a list of dicts, one per point. Found "
                             f"`{type(raw).__name__}`. {fix}")
        names = [f.name for f in fields(BudgetPoint)]
        required = [f.name for f in fields(BudgetPoint) if f.name not in ("val_cost", "val_accuracy")]
        points = []
        for i, p in enumerate(raw):
            if not isinstance(p, Mapping):
                raise ValueError(f"Point {i} of the budget curve should be a dict. Found `{type(p).__name__}`. {fix}")
            missing = [k for k in required if k not in p]
            unknown = [k for k in p if k not in names]
            if missing or unknown:
                raise ValueError(f"Point {i} of the budget curve has the keys {sorted(map(str, p))}: "
                                 f"{'missing ' + str(missing) if missing else ''}"
                                 f"{', ' if missing and unknown else ''}"
                                 f"{'unknown ' + str(unknown) if unknown else ''}. A point has {names}. {fix}")
            values = dict(p)
            values["cost"], values["accuracy"] = check_point_values(p["cost"], p["accuracy"], f"point {i}")
            for key in ("val_cost", "val_accuracy", "q"):
                if values.get(key) is not None:
                    number = real_scalar(values[key])
                    if number is None or not math.isfinite(number):
                        raise ValueError(f"Point {i} of the budget curve has {key}={values[key]!r}: expected a "
                                         f"finite number or None. {fix}")
                    values[key] = number
            points.append(BudgetPoint(**values))
        costs = real_numbers(d["costs"])
        if costs is None or not all(math.isfinite(c) and c >= 0 for c in costs):
            raise ValueError(f"The budget curve's 'costs' should be finite numbers >= 0, one per exit. Found "
                             f"{d['costs']!r}. {fix}")
        for i, point in enumerate(points):  # one number per exit, as many exits as costs
            for key in ("thresholds", "exit_fractions"):
                numbers = real_numbers(getattr(point, key))
                if numbers is None or len(numbers) != len(costs) or (
                        key == "exit_fractions" and not all(0.0 <= f <= 1.0 for f in numbers)):
                    what = "shares in [0, 1]" if key == "exit_fractions" else "numbers"
                    raise ValueError(f"Point {i} of the budget curve has {key}={getattr(point, key)!r}: expected "
                                     f"{len(costs)} {what}, one per exit, as 'costs' has. {fix}")
                setattr(point, key, numbers)
        unit = d.get("cost_unit", "MACs")
        if not isinstance(unit, str):
            raise ValueError(f"The budget curve's 'cost_unit' should be a str (e.g. 'MACs'). Found {unit!r}. {fix}")
        extra = {k: v for k, v in d.items() if k not in ("points", "costs", "cost_unit")}
        return cls(points, costs, unit, extra)

    def __str__(self) -> str:
        rows = [f"{'q':>5} {'cost':>12} {'accuracy':>9}"]
        for p in self.points:
            rows.append(f"{p.q if p.q is not None else float('nan'):>5.2f} {p.cost:>12.4g} {p.accuracy:>8.2f}%")
        return "\n".join(rows)


DEFAULT_QS = tuple(p / 20 for p in range(1, 40))


def budgeted_curve(val_logits: Tensor, val_labels: Tensor, test_logits: Tensor, test_labels: Tensor,
                   costs: Sequence[float], *, qs: Sequence[float] = DEFAULT_QS,
                   cost_unit: str = "MACs", rule: ExitRule | str = "max_probability") -> BudgetCurve:
    """MSDNet's budgeted batch classification: thresholds from held-out logits, points on test logits.

    The thresholds, exits and costs are those of MSDNet's procedure; a prediction is the argmax of
    the logits, where MSDNet's code takes that of the float32 softmax, which differs only where two
    logits round to tied probabilities (see the module's docstring).

    Args:
        val_logits: held-out logits ``[K, N_val, C]`` (not used for training the weights).
        val_labels: ``[N_val]``.
        test_logits: ``[K, N_test, C]``.
        test_labels: ``[N_test]``.
        costs: the cost of reaching each exit (cumulative), e.g. ``exit_costs(...).macs``.
        qs: the geometric ratios; MSDNet's grid ``p/20``, ``p = 1..39`` by default.
        cost_unit: what the costs count, for labels.
        rule: the exit rule whose scores are thresholded (an :class:`ExitRule` or its name).

    Thresholds are MSDNet's: the score of the ``floor(N * share)``-th most confident sample, every
    sample at or above it leaving. Where tied scores keep them from realising the shares asked on
    ``val_logits`` (PABEE's patience: 0 for every sample at exit 1, so its threshold there is 0 and
    everyone leaves at exit 1 for every ``q``), a ``RuntimeWarning`` says at how many ``q`` and why,
    as :func:`find_thresholds` warns: a threshold cannot split samples with one score. For the
    patience rule, PABEE's own operating points are one patience ``t`` at every exit:
    ``evaluate_thresholds(logits, labels, [t] * K, costs, rule="patience")``.

    Raises:
        ValueError: ``val_logits`` on the meta device or holding NaN or ``+inf`` (the thresholds
            are fitted on them; ``-inf`` for a masked class is fine), ``test_logits`` on the meta
            device or holding NaN at an exit a sample is predicted at for some ``q`` (it would be
            scored as class 0), or other bad arguments.

    Example:
        >>> import torch, metaweight as mw
        >>> val, test = torch.randn(3, 200, 10), torch.randn(3, 100, 10)
        >>> curve = mw.budgeted_curve(val, torch.randint(0, 10, (200,)), test, torch.randint(0, 10, (100,)),
        ...                           costs=[1.0, 2.0, 3.0])
        >>> len(curve.points), all(1.0 <= p.cost <= 3.0 for p in curve.points)
        (39, True)
    """
    val_conf, val_pred = _confidence(val_logits, "val_logits", rule, fit="budgeted_curve")  # the scores once, not once per q
    test_conf, test_pred = _confidence(test_logits, "test_logits", rule, what="budgeted_curve")
    K = val_conf.shape[0]
    if test_conf.shape[0] != K or val_logits.shape[2] != test_logits.shape[2]:
        raise ValueError(f"val_logits {tuple(val_logits.shape)} and test_logits {tuple(test_logits.shape)} should "
                         f"have the same exits and classes.")
    costs = _check_costs(costs, K)
    check_target(val_labels, val_conf.shape[1], val_logits.shape[2], name="val_labels")
    check_target(test_labels, test_conf.shape[1], test_logits.shape[2], name="test_labels")
    if not isinstance(cost_unit, str):
        raise TypeError(f"`cost_unit` should be a str naming what the costs count (e.g. 'MACs'). Found {cost_unit!r}.")
    qs = real_list(qs, "qs", "the geometric ratios, numbers > 0", "choosing exits")
    if not qs or not all(math.isfinite(q) and q > 0 for q in qs):
        raise ValueError(f"Invalid qs: {qs!r}. Expected a non-empty sequence of finite numbers > 0.")
    points = []
    name = as_rule(rule).name
    scored = torch.zeros(test_conf.shape, dtype=torch.bool, device=test_conf.device)  # rows a prediction is taken from
    unrealised: list[tuple[float, tuple[str, str]]] = []
    for q in qs:
        distribution = geometric_exit_distribution(float(q), K, device=val_conf.device)
        taken: list[tuple[int, int, int]] = []
        thresholds = _thresholds(val_conf, distribution, taken)
        found = _unrealised(val_conf, val_pred, thresholds, distribution, taken, name, ties_only=True)
        if found is not None:
            unrealised.append((float(q), found))
        val = _evaluate(val_conf, val_pred, val_labels, thresholds, costs)
        point = _evaluate(test_conf, test_pred, test_labels, thresholds, costs, scored)
        point.q, point.val_cost, point.val_accuracy = float(q), val.cost, val.accuracy
        points.append(point)
    check_nan_logits(test_logits, "test_logits", "budgeted_curve", scored=scored)
    if unrealised:
        q, (shares, causes) = unrealised[0]
        distinct = sorted({round(p.val_cost, 6) for p in points})
        warn_user(f"budgeted_curve could not realise MSDNet's distribution on `val_logits` at {len(unrealised)} of the "
                  f"{len(points)} values of q, because of tied scores: at q={q:g}, {shares}; {causes}. A threshold "
                  f"cannot split samples with one score: all of them leave, and exits after have fewer to take, so "
                  f"those points are not the shares asked (held-out costs over the curve: "
                  f"{distinct[:6]}{' ...' if len(distinct) > 6 else ''}). Use {_tie_fix(name)}"
                  f"{'. ' + PATIENCE_POINTS if name == 'patience' else ''}.", RuntimeWarning)
    return BudgetCurve(points, [float(c) for c in costs], cost_unit, extra={"rule": name})


def thresholds_for_budget(val_logits: Tensor, val_labels: Tensor, costs: Sequence[float], budget: float,
                          *, iterations: int = 60, rule: ExitRule | str = "max_probability") -> BudgetPoint:
    """The thresholds that spend the most of an average ``budget`` per sample on held-out data.

    Bisects MSDNet's geometric ``q`` (a larger ``q`` sends more samples deeper) for the largest
    expected cost at or under ``budget`` on ``val_logits``. The cost rises with ``q`` only up to the
    rounding of each exit's share to whole samples, so on a small held-out set another ``q`` may
    spend a little more within the budget than the one found (seen: 1.277 against 1.262 of a budget
    of 1.3 on 65 samples, one sample's move: one of 60 pairs of 12 random sets of 20 to 400
    samples and 5 budgets, against a grid of 600 values of ``q``).

    Args:
        val_logits: held-out logits ``[K, N, C]``.
        val_labels: ``[N]``.
        costs: the cost of reaching each exit (cumulative).
        budget: the average cost per sample to stay within.
        iterations: bisection steps over ``log q``.
        rule: the exit rule (an :class:`ExitRule` or its name).

    Returns:
        The :class:`BudgetPoint` on the held-out data, with its thresholds: ``val_cost`` is the
        expected cost per sample it reached on ``val_logits`` (at or under ``budget``, in the units
        of ``costs``) and ``val_accuracy`` the top-1 accuracy there (percent); ``cost`` and
        ``accuracy`` are the same numbers, as the data evaluated is the held-out data (apply the
        thresholds to test logits with :func:`evaluate_thresholds`). A budget of the last exit's
        cost or more sends everyone to the last exit, and one below every ``q``'s cost everyone to
        the first (``q`` is ``None`` for both). Where tied scores keep
        its thresholds from realising MSDNet's shares (the patience rule: everyone leaves at exit
        1), the cost jumps past the budget between neighbouring ``q`` and the point may spend far
        less than the budget: a ``RuntimeWarning`` says so (see :func:`budgeted_curve`).

    Raises:
        ValueError: ``val_logits`` on the meta device or holding NaN or ``+inf`` (thresholds are
            not fitted on them; ``-inf`` for a masked class is fine), or other bad arguments.
    """
    confidence, prediction = _confidence(val_logits, "val_logits", rule, fit="thresholds_for_budget")
    K = confidence.shape[0]
    costs = _check_costs(costs, K)
    check_target(val_labels, confidence.shape[1], val_logits.shape[2], name="val_labels")
    budget = real_option(budget, "budget", "a finite number (an int, a float, a NumPy or 0-d tensor scalar)",
                         dtype=torch.float64)  # compared with costs in Python floats: no float32 rule
    if integer_value(iterations) is None or integer_value(iterations) < 1:  # type: ignore[operator]
        raise ValueError(f"Invalid iterations: {iterations!r}. Expected an int >= 1 (bisection steps over log q).")
    iterations = int(integer_value(iterations))  # type: ignore[arg-type]
    if budget < costs[0]:
        raise ValueError(f"A budget of {budget} is below the cost of the first exit ({costs[0]}).")

    def held_out(point: BudgetPoint) -> BudgetPoint:
        point.val_cost, point.val_accuracy = point.cost, point.accuracy  # evaluated on the held-out data
        return point

    def at(q: float) -> BudgetPoint:
        thresholds = _thresholds(confidence, geometric_exit_distribution(q, K, device=confidence.device))
        point = held_out(_evaluate(confidence, prediction, val_labels, thresholds, costs))
        point.q = q
        return point

    def warn_if_tied(point: BudgetPoint) -> BudgetPoint:
        """Warn when tied scores kept the chosen thresholds from realising MSDNet's shares."""
        distribution = geometric_exit_distribution(point.q, K, device=confidence.device)  # type: ignore[arg-type]
        taken: list[tuple[int, int, int]] = []
        thresholds = _thresholds(confidence, distribution, taken)
        name = as_rule(rule).name
        found = _unrealised(confidence, prediction, thresholds, distribution, taken, name, ties_only=True)
        if found is not None:
            shares, causes = found
            warn_user(f"thresholds_for_budget(budget={budget:g}) reached a cost of {point.cost:.6g} on `val_logits`, "
                      f"and tied scores kept its thresholds from realising MSDNet's distribution (q={point.q:.6g}): "
                      f"{shares}; {causes}. A threshold cannot split samples with one score, so the cost jumps past "
                      f"the budget between values of q, and the point may spend far less than the budget. Use "
                      f"{_tie_fix(name)}{'. ' + PATIENCE_POINTS if name == 'patience' else ''}.", RuntimeWarning)
        return point

    lo, hi = math.log(1e-3), math.log(1e3)
    if budget >= costs[-1]:  # q -> infinity, everyone at the last exit, spends the most any thresholds can
        # (q = 1e3 still sends floor(N / 1e3) samples out early: 20 of 20,000 over two exits)
        last = torch.full((K,), NO_EXIT, dtype=confidence.dtype, device=confidence.device)
        last[-1] = -NO_EXIT
        return held_out(_evaluate(confidence, prediction, val_labels, last, costs))
    best = at(math.exp(lo))
    if best.cost > budget:  # even q -> 0 exceeds it: everyone at the first exit
        return held_out(_evaluate(confidence, prediction, val_labels,
                                  torch.full((K,), -NO_EXIT, device=confidence.device), costs))
    for _ in range(iterations):
        mid = (lo + hi) / 2
        point = at(math.exp(mid))
        if point.cost <= budget:
            lo, best = mid, point if point.cost >= best.cost else best
        else:
            hi = mid
    return warn_if_tied(best)
