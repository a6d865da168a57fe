"""Calibration of every exit: temperature scaling fitted on held-out logits, and the expected
calibration error. Exit decisions are confidence decisions, so a calibrated confidence means a
threshold says what it promises."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metaweight._checks import (check_bins, check_fit_logits, check_has_values, check_labels_unmasked, check_target,
                                check_temperatures, integer_value, masked_classes, real_numbers, unstacked_hint)
from metaweight._exit_rules import calibrated, decision_dtype, predict
from metaweight._warn import warn_user


def _check(logits: Tensor, labels: Tensor, name: str = "logits", what: str = "calibration", *,
           labels_name: str = "labels", likelihood: bool = False) -> Tensor:
    """Check logits ``[K, N, C]`` and labels ``[N]`` (values: NaN and +inf refused, see
    :func:`check_fit_logits`; with ``likelihood``, labels on a masked class too, see
    :func:`check_labels_unmasked`); return the labels as ``torch.long``."""
    if not isinstance(logits, Tensor) or logits.dim() != 3 or 0 in logits.shape or not logits.is_floating_point():
        raise ValueError(f"`{name}` should be floating-point logits [K, N, C] with N, C > 0. Found "
                         f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}."
                         f"{unstacked_hint(logits)}")
    check_has_values(logits, f"`{name}`", what)
    labels = check_target(labels, logits.shape[1], logits.shape[2], name=labels_name)
    check_fit_logits(logits, name, what)
    if likelihood:
        check_labels_unmasked(logits, labels, name, labels_name, what)
    return labels


def _wide(logits: Tensor) -> Tensor:
    """Logits in the widest dtype their device holds (float64; float32 on MPS), without their autograd
    history: what the fits and measures read is values (logits stacked outside ``torch.no_grad()``
    would build a graph at every bisection step, and torch warns at each ``float()`` of one)."""
    return logits.detach().to(decision_dtype(logits.device))


def _nll(logits: Tensor, labels: Tensor, beta: float) -> float:
    return float(torch.nn.functional.cross_entropy(logits * beta, labels))


# What fit_temperatures says of an exit whose probabilities no temperature changes, by how its rows are flat
# (one message per kind, in this order; ``{exits}`` the exits' numbers from 1)
_FLAT_EXITS = {
    "one class": "exit(s) {exits} have one class, so no temperature changes their probabilities (1) and the NLL (0) "
                 "does not depend on it: T = 1 was returned.",
    "mixed": "in every held-out row of exit(s) {exits} the logits are either the same for every class (masked "
             "classes left out) or one class is 1e3 or more above every other (read as masked classes), so no "
             "temperature changes their probabilities (uniform or one-hot) and the NLL does not depend on it: T = 1 "
             "was returned. Check that these are the exit's logits (not scaled, nor masked), and train it.",
    "uniform": "the logits of exit(s) {exits} are the same for every class (masked classes left out) in every "
               "held-out row, so no temperature changes their probabilities (uniform) and the NLL does not depend "
               "on it: T = 1 was returned. The exit predicts nothing yet: train it, or check that these are its "
               "logits.",
    "certain": "in every held-out row of exit(s) {exits}, one class is 1e3 or more above every other (read as "
               "masked classes), so no temperature in the search changes their probabilities (one-hot, the top "
               "class) and the NLL does not depend on it: T = 1 was returned. The exit is certain of every held-out "
               "sample (and right: a label on another class is refused): check that these are its logits (not "
               "scaled, nor masked to one class).",
}


def fit_temperatures(val_logits: Tensor, val_labels: Tensor, *, iterations: int = 100) -> Tensor:
    """One temperature per exit minimising the held-out negative log-likelihood (Guo et al. 2017).

    The NLL of ``logits / T`` is convex in ``beta = 1/T`` (a log-sum-exp of linear functions),
    so its minimiser is found by bisection on the derivative's sign over ``beta`` in
    ``[1e-4, 1e4]``. An exit whose minimiser lies outside (``1e-4``: its held-out predictions are
    all right, so the NLL falls as far as ``T`` goes; ``1e4``: they are no better than chance) gets the
    bound, with a warning: such a temperature says more about the held-out set than about the
    exit. An exit whose logits are the same for every class in every row, its masked classes left
    out (its NLL is the same at every temperature), gets ``T = 1``, with a warning.

    Args:
        val_logits: held-out logits ``[K, N, C]`` (not used to train the model).
        val_labels: ``[N]``.
        iterations: bisection steps on ``log beta``.

    Returns:
        Temperatures ``[K]`` (float64, float32 on MPS; on the device of ``val_logits``); divide exit
        ``k``'s logits by ``T[k]``.

    Raises:
        ValueError: logits or labels on the meta device, logits holding NaN (counted per exit) or
            ``+inf``, or a row with every class masked (``-inf`` for some classes is fine), labels
            out of range or on a class masked at some exit (``-inf``, or a ``finfo.min``/``-1e9``/
            ``-1e4``-style mask: 1e3 or more below the row's largest logit, in a cluster far below the
            row's other classes, see :func:`~metaweight._checks.masked_classes`; their NLL is infinite
            or as large as the mask at every temperature: the fit would run to its bound), or a bad
            ``iterations``. An over-confident exit's wrong labels, however far below the top
            (``logits * 400``), are fitted: that is what a temperature corrects.
    """
    labels = _check(val_logits, val_labels, "val_logits", "fit_temperatures", labels_name="val_labels",
                    likelihood=True).to(val_logits.device)
    if integer_value(iterations) is None or iterations < 1:
        raise ValueError(f"Invalid iterations: {iterations!r}. Expected an int >= 1 (bisection steps).")
    iterations = int(iterations)
    out, flat = [], []
    for k, z in enumerate(_wide(val_logits)):
        # every row one value on the classes it does not mask: softmax(z / T) is uniform over them whatever T is
        masked = masked_classes(z)
        flat_rows = (z == z.amax(1, keepdim=True)) | masked
        z = z.clamp(min=torch.finfo(z.dtype).min)  # a masked class (-inf): p * z = 0 * (-max), not 0 * -inf = NaN
        if bool(flat_rows.all()):
            out.append(1.0)
            left = (~masked).sum(1) == 1  # (one class left in a row: certain of it; more: uniform over them)
            flat.append((k, "one class" if z.shape[1] == 1 else "certain" if bool(left.all())
                         else "uniform" if not bool(left.any()) else "mixed"))
            continue
        z_y = z.gather(1, labels[:, None]).squeeze(1)

        def slope(beta: float) -> float:  # d NLL / d beta = mean(E_p[z] - z_y)
            p = torch.softmax(z * beta, dim=1)
            return float(((p * z).sum(1) - z_y).mean())

        lo, hi = -4.0 * 2.302585092994046, 4.0 * 2.302585092994046  # log(1e-4), log(1e4)
        if slope(torch.e ** hi) <= 0:  # the NLL still falls at beta = 1e4: separable data
            out.append(1e-4)
            continue
        if slope(torch.e ** lo) >= 0:  # the NLL still falls as beta goes below 1e-4: predictions no better than chance
            out.append(1e4)
            continue
        for _ in range(iterations):
            mid = (lo + hi) / 2
            if slope(torch.e ** mid) > 0:
                hi = mid
            else:
                lo = mid
        out.append(1.0 / torch.e ** ((lo + hi) / 2))
    bounded = [f"exit {k + 1}: T = {t:g}" for k, t in enumerate(out) if t in (1e-4, 1e4)]
    if bounded:
        warn_user(f"fit_temperatures reached the bound of its search [1e-4, 1e4] ({'; '.join(bounded)}): the "
                  f"held-out NLL still falls beyond it (1e-4: every held-out prediction of the exit is right, the "
                  f"data are separable; 1e4: its predictions are no better than chance). Such a temperature fits this "
                  f"held-out set, not the exit: use more (or other) held-out data, or leave that exit "
                  f"uncalibrated.", UserWarning)
    for kind, said in _FLAT_EXITS.items():  # (T = 1 for each: the NLL does not depend on T there)
        exits = [k + 1 for k, flat_kind in flat if flat_kind == kind]
        if exits:
            warn_user("fit_temperatures: " + said.format(exits=", ".join(map(str, exits))), UserWarning)
    return torch.tensor(out, dtype=decision_dtype(val_logits.device), device=val_logits.device)


def expected_calibration_error(logits: Tensor, labels: Tensor, *, bins: int = 15) -> list[float]:
    """The expected calibration error of every exit, in percent: ``sum_b |B_b|/N |acc(B_b) - conf(B_b)|``
    over ``bins`` equal-width bins of the max-softmax confidence (a confidence of exactly ``b/bins``
    falls in bin ``b-1``, i.e. bins are right-closed).

    Args:
        logits: ``[K, N, C]``.
        labels: ``[N]``.
        bins: the number of equal-width confidence bins in ``[0, 1]``.

    A label on a class masked (``-inf``) at an exit is allowed here: the exit never predicts that
    class, so the sample counts as wrong, a finite value (no log-likelihood is taken).

    Raises:
        ValueError: as :func:`fit_temperatures` (NaN, ``+inf``, meta tensors), or a bad ``bins``.
    """
    labels = _check(logits, labels, what="expected_calibration_error").to(logits.device)
    bins = check_bins(bins)
    confidence, prediction = torch.softmax(_wide(logits), dim=-1).amax(dim=-1), predict(logits)
    correct = (prediction == labels[None]).to(confidence.dtype)
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1
    out = []
    for k in range(logits.shape[0]):
        total = 0.0
        for b in range(bins):
            members = index[k] == b
            if members.any():
                total += float(members.to(confidence.dtype).mean() * (correct[k][members].mean() - confidence[k][members].mean()).abs())
        out.append(100.0 * total)
    return out


def _own_temperatures(temperatures: object) -> list[float]:
    """A :class:`Calibration`'s temperatures as floats, by the rule ``EarlyExit(temperatures=)``
    applies (:func:`check_temperatures`): one positive finite number per exit. ``T = 0`` gives
    infinite logits, ``T < 0`` flips every prediction, NaN gives NaN, all without an error."""
    values = real_numbers(temperatures)
    try:
        if not values:
            raise ValueError
        return check_temperatures(values, len(values))  # type: ignore[return-value]
    except ValueError:
        raise ValueError(f"A Calibration's temperatures should be one positive finite number per exit. Found "
                         f"{temperatures!r}: 0 would give infinite logits, a negative one flip the predictions, "
                         f"NaN give NaN. Use the Calibration that calibrate returned (or fit_temperatures' "
                         f"values), or load the one it saved unchanged.") from None


@dataclass
class Calibration:
    """Per-exit temperatures and what they change, measured on the data given to :func:`calibrate`.

    Attributes:
        temperatures: one per exit; divide exit ``k``'s logits by ``temperatures[k]``.
        nll_before, nll_after: negative log-likelihood per exit before and after.
        ece_before, ece_after: expected calibration error (%) per exit before and after.
    """

    temperatures: list[float]
    nll_before: list[float]
    nll_after: list[float]
    ece_before: list[float]
    ece_after: list[float]

    def __post_init__(self) -> None:
        self.temperatures = _own_temperatures(self.temperatures)

    def apply(self, logits: Tensor) -> Tensor:
        """``logits [K, N, C]`` divided by each exit's temperature; ``K`` must be the number of
        fitted exits (a ``ValueError`` otherwise: no broadcast of one exit's logits to all).

        Returns float32 for float16, bfloat16 and float32 logits (the quotient of half precision
        logits is computed and kept in float32: ``T`` may be as small as ``1e-4``, which overflows
        float16, and bfloat16 would round it), float64 for float64 ones: the very scores
        :class:`EarlyExit` computes with ``temperatures=`` this calibration, so thresholds found on
        ``apply(logits)`` decide there exactly as found.

        Raises:
            ValueError: ``logits`` not ``[K, N, C]`` floating-point logits, or temperatures that
                are not ``K`` positive finite numbers (changed after the calibration was made):
                the same rule as ``EarlyExit(temperatures=)``."""
        temperatures = _own_temperatures(self.temperatures)
        K = len(temperatures)
        if not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[0] != K \
                or not logits.is_floating_point():
            found = f"shape {tuple(logits.shape)} ({logits.dtype})" if isinstance(logits, Tensor) else \
                f"`{type(logits).__name__}`"
            raise ValueError(f"`logits` should be floating-point logits [K, N, C] of the {K} exits the temperatures "
                             f"were fitted on. Found {found}. Stack the exits' logits (torch.stack) in exit order.")
        return calibrated(logits, temperatures)

    def __str__(self) -> str:
        rows = [f"{'exit':>4} {'T':>7} {'NLL before':>11} {'after':>7} {'ECE % before':>13} {'after':>7}"]
        for k, t in enumerate(self.temperatures):
            rows.append(f"{k + 1:>4} {t:>7.3f} {self.nll_before[k]:>11.4f} {self.nll_after[k]:>7.4f} "
                        f"{self.ece_before[k]:>13.2f} {self.ece_after[k]:>7.2f}")
        return "\n".join(rows)


def calibrate(val_logits: Tensor, val_labels: Tensor, test_logits: Tensor | None = None,
              test_labels: Tensor | None = None, *, bins: int = 15) -> Calibration:
    """Fit per-exit temperatures on held-out logits; report NLL and ECE before and after on the test
    logits (or, without them, on the held-out ones).

    Args:
        val_logits: held-out logits ``[K, N, C]`` to fit on.
        val_labels: ``[N]``.
        test_logits: logits to measure on (``[K, M, C]``); default the held-out ones.
        test_labels: ``[M]``.
        bins: confidence bins of the ECE.

    Raises:
        ValueError: as :func:`fit_temperatures`, for the held-out and the test logits alike (a
            label on a masked class in either: its NLL is infinite), before anything is fitted.
    """
    if (test_logits is None) != (test_labels is None):
        raise ValueError("Pass `test_logits` and `test_labels` together (or neither, to measure on the held-out "
                         "data).")
    logits, labels = (val_logits, val_labels) if test_logits is None else (test_logits, test_labels)
    _check(val_logits, val_labels, "val_logits", "calibrate", labels_name="val_labels", likelihood=True)
    tested = test_logits is not None
    labels = _check(logits, labels, "test_logits" if tested else "val_logits", "calibrate",
                    labels_name="test_labels" if tested else "val_labels", likelihood=True).to(logits.device)
    if logits.shape[0] != val_logits.shape[0] or logits.shape[2] != val_logits.shape[2]:
        raise ValueError(f"`test_logits` {tuple(logits.shape)} and `val_logits` {tuple(val_logits.shape)} should "
                         f"have the same exits and classes ([K, N, C]).")
    temperatures = fit_temperatures(val_logits, val_labels)
    scaled = _wide(logits) / temperatures.to(logits.device).view(-1, 1, 1)
    return Calibration(
        temperatures.tolist(),
        [_nll(z, labels, 1.0) for z in _wide(logits)],
        [_nll(z, labels, 1.0) for z in scaled],
        expected_calibration_error(logits, labels, bins=bins),
        expected_calibration_error(scaled, labels, bins=bins),
    )
