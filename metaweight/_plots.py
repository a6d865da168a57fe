"""Plots (matplotlib, an optional dependency, imported only when a plot is asked for)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from metaweight._anytime import AnytimeResult
from metaweight._budget import BudgetCurve, BudgetPoint, check_point_values
from metaweight._calibration import _check as check_logits_and_labels
from metaweight._checks import check_bins, check_temperatures, integer_value, real_numbers, real_option
from metaweight._exit_rules import predict
from metaweight._files import user_path


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("Plotting needs matplotlib: pip install 'metaweight[plot]'.") from exc
    return plt


def _check_path(path: Any) -> Path:
    """Refuse, before any figure is drawn, a path the figure cannot be saved to: not a path, a folder, a
    suffix matplotlib does not write, under a file, or with a name longer than the file system takes."""
    path = user_path(path, absolute=False)  # saved at once, not held: shown as given
    if path.is_dir():
        raise ValueError(f"`path` {path} is a folder; pass a file path in it, such as {path / 'plot.png'}.")
    _pyplot()  # matplotlib's own ImportError hint first
    from matplotlib.backend_bases import FigureCanvasBase

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if path.suffix[1:].lower() not in formats:
        raise ValueError(f"`path` {path} should end with the suffix of an image format matplotlib writes "
                         f"({', '.join('.' + f for f in formats)}), which gives the format. Found "
                         f"{path.suffix or 'no suffix'!r}.")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"`path` {path} cannot be created: {ancestor} is a file, not a folder.")
    try:
        name_max = os.pathconf(ancestor, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # not known here (or not POSIX): the common limit
        name_max = 255
    for part in path.relative_to(ancestor).parts:
        if len(os.fsencode(part)) > name_max:
            raise ValueError(f"`path` {path} cannot be created: its part {part[:40]!r}... is "
                             f"{len(os.fsencode(part))} bytes long, and this file system takes names of at most "
                             f"{name_max}. Pass a shorter file name.")
    return path


def _save(fig: Any, path: Path) -> Path:
    """Save and close ``fig``; the folders made for it are removed again if the save fails."""
    plt = _pyplot()
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    missing = path.parent.relative_to(ancestor).parts
    created = [ancestor.joinpath(*missing[:i + 1]) for i in range(len(missing))]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, bbox_inches="tight", dpi=150)
    except BaseException:
        for folder in reversed(created):  # as if never called
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    finally:
        plt.close(fig)
    return path


def _legend_label(name: str) -> str:
    """``name`` as a legend label matplotlib shows: it leaves out of the legend every label starting
    with ``_`` (a method ``_baseline``, a term ``_aux``), so such a name gets a leading space."""
    return " " + name if name.startswith("_") else name


def _check_title(title: Any) -> None:
    if title is not None and not isinstance(title, str):
        raise TypeError(f"`title` should be a str or None. Found {title!r}.")


def _check_named(values: Any, kind: type, name: str, what: str) -> None:
    """``values`` is a non-empty ``{name: kind}`` with str names."""
    if not isinstance(values, Mapping) or not values:
        raise ValueError(f"`{name}` should be a non-empty dict {{method name: {what}}}. Found {values!r}.")
    for key, value in values.items():
        if not isinstance(key, str):
            raise TypeError(f"`{name}` should be keyed by method names (str). Found the key {key!r}.")
        if not isinstance(value, kind):
            raise TypeError(f"`{name}[{key!r}]` should be a {what}. Found `{type(value).__name__}`.")


def _positive(value: Any, name: str) -> float:
    import torch

    # (a plot's scale divides NumPy float64 costs: no float32 rule)
    return real_option(value, name, "a positive finite number", lambda v: math.isfinite(v) and v > 0,
                       dtype=torch.float64)


def plot_budget_curves(curves: Mapping[str, BudgetCurve], path: str | Path, *, scale: float = 1e6,
                       unit: str = "M", title: str | None = None) -> Path:
    """Accuracy against expected cost per sample, one line per method (the paper's Fig. 2).

    Args:
        curves: ``{method name: BudgetCurve}``.
        path: the file to write; PNG, SVG or PDF by its suffix.
        scale: costs are divided by it on the x axis (1e6: millions).
        unit: the label of that scale.
        title: an optional title.

    Returns:
        ``path``.

    Raises:
        ValueError: ``curves`` empty, a curve without points, a point whose cost is not a finite
            number >= 0 or whose accuracy is not a percentage in ``[0, 100]`` (NaN, ``250``, a str),
            curves counting different costs (``cost_unit``), ``scale`` not a positive finite
            number, or a ``path`` that cannot be written (a folder, an image format matplotlib
            does not write, under a file).
        TypeError: a value of ``curves`` that is not a :class:`BudgetCurve`, a point that is not a
            :class:`BudgetPoint`, ``unit`` or ``title`` not a str.
    """
    path, scale = _check_budget_curves(curves, path, scale=scale, unit=unit, title=title)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, curve in curves.items():
        points = sorted(check_point_values(p.cost, p.accuracy, "") for p in curve.points)
        ax.plot([cost / scale for cost, _ in points], [accuracy for _, accuracy in points], marker=".",
                label=_legend_label(name))
    some = next(iter(curves.values()))
    ax.set_xlabel(f"average {some.cost_unit} per sample ({unit})" if unit else f"average {some.cost_unit} per sample")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, path)


def _check_budget_curves(curves: Any, path: Any, *, scale: Any, unit: Any, title: Any) -> tuple[Path, float]:
    """Every check of :func:`plot_budget_curves`, nothing drawn: the path and the scale."""
    _check_named(curves, BudgetCurve, "curves", "BudgetCurve")
    empty = [name for name, curve in curves.items() if not curve.points]
    if empty:
        raise ValueError(f"The curves of {empty} have no points: nothing to plot. Pass curves from budgeted_curve.")
    for name, curve in curves.items():
        for i, point in enumerate(curve.points):
            if not isinstance(point, BudgetPoint):
                raise TypeError(f"`curves[{name!r}].points[{i}]` should be a BudgetPoint. Found "
                                f"`{type(point).__name__}`.")
            check_point_values(point.cost, point.accuracy, f"`curves[{name!r}].points[{i}]`")
    units = {name: curve.cost_unit for name, curve in curves.items()}
    if len(set(units.values())) > 1:
        raise ValueError(f"The curves count different costs {units}: one x axis cannot show them. Plot each cost "
                         f"unit on its own.")
    scale = _positive(scale, "scale")
    if not isinstance(unit, str):
        raise TypeError(f"`unit` should be a str (the label of `scale`). Found {unit!r}.")
    _check_title(title)
    return _check_path(path), scale


def plot_anytime(results: Mapping[str, AnytimeResult], path: str | Path, *, k: int = 1,
                 title: str | None = None) -> Path:
    """Per-exit top-``k`` accuracy as grouped bars, one colour per method.

    Args:
        results: ``{method name: AnytimeResult}``.
        path: the file to write; PNG, SVG or PDF by its suffix.
        k: which top-k accuracy to plot.
        title: an optional title.

    Returns:
        ``path``.

    Raises:
        ValueError: ``results`` empty, a result without top-``k`` accuracy, accuracies that are
            not one percentage in ``[0, 100]`` per exit (none, NaN, ``250``), results of different
            numbers of exits, or a ``path`` that cannot be written.
        TypeError: a value of ``results`` that is not an :class:`AnytimeResult`, ``k`` not an int,
            ``title`` not a str.
    """
    path, k, accuracy = _check_anytime(results, path, k=k, title=title)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(results)
    exits = next(iter(results.values())).num_exits
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [e + 1 + (i - (len(names) - 1) / 2) * width for e in range(exits)]
        ax.bar(xs, accuracy[name], width=width, label=_legend_label(name))
    ax.set_xticks(range(1, exits + 1))
    ax.set_xlabel("exit")
    ax.set_ylabel(f"top-{k} accuracy (%)")
    lows = [min(values) for values in accuracy.values()]  # type: ignore[type-var]
    ax.set_ylim(max(0.0, min(lows) - 5), 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, path)


def _check_anytime(results: Any, path: Any, *, k: Any, title: Any) -> tuple[Path, int, dict[str, list[float]]]:
    """Every check of :func:`plot_anytime`, nothing drawn: the path, ``k`` and the accuracies."""
    _check_named(results, AnytimeResult, "results", "AnytimeResult")
    if integer_value(k) is None:
        raise TypeError(f"`k` should be an int (which top-k accuracy). Found {k!r}.")
    k = int(k)
    missing = [name for name, r in results.items() if k not in r.accuracy]
    if missing:
        raise ValueError(f"No top-{k} accuracy in the results of {missing}; pass k= one of the top-k they hold.")
    accuracy = {name: real_numbers(r.accuracy[k]) for name, r in results.items()}
    for name, values in accuracy.items():
        if not values or not all(0.0 <= v <= 100.0 for v in values):  # (NaN fails both comparisons)
            raise ValueError(f"`results[{name!r}]` should hold one top-{k} accuracy per exit, each a percentage in "
                             f"[0, 100]. Found {results[name].accuracy[k]!r}. Pass the AnytimeResult that "
                             f"anytime_accuracy or anytime_accuracy_from_logits returned (accuracies in percent, "
                             f"not fractions of 1).")
    exits = {name: len(r.accuracy[k]) for name, r in results.items()}
    if len(set(exits.values())) > 1:
        raise ValueError(f"The results have different numbers of exits {exits}: their bars cannot share the exit "
                         f"axis. Plot models of one number of exits together.")
    _check_title(title)
    return _check_path(path), k, accuracy


def plot_gamma_history(steps: Sequence[int], gammas: Sequence[Sequence[float]], term_names: Sequence[str],
                       path: str | Path, *, title: str | None = None) -> Path:
    """The trajectory of every loss weight over training: one line per term (CE solid, KD dashed).

    Args:
        steps: the iteration of each snapshot.
        gammas: one list of weights per snapshot, in the order of ``term_names``.
        term_names: the names of the terms (``HarmonizedWeighter.term_names``).
        path: the file to write; PNG, SVG or PDF by its suffix.
        title: an optional title.

    Returns:
        ``path``.

    Raises:
        ValueError: ``steps`` empty, not finite numbers or not increasing, a term named twice in
            ``term_names``, ``gammas`` not one snapshot per step, a
            snapshot not one weight per term, a weight not a finite number, or a ``path`` that
            cannot be written.
        TypeError: ``term_names`` not strs, ``title`` not a str.
    """
    path, steps, gammas = _check_gamma_history(steps, gammas, term_names, path, title=title)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    drawn = 0
    for j, name in enumerate(term_names):
        values = [g[j] for g in gammas]
        if any(values):  # a term whose weight stays 0 (switched off) is left out of the legend
            ax.plot(steps, values, linestyle="-" if name.startswith("ce") else "--",
                    label=_legend_label(name))
            drawn += 1
    if not drawn:  # every weight 0 throughout: say so on the figure rather than leave it blank
        ax.plot(steps, [0.0] * len(steps), color="0.5", label="every term: 0")
    ax.set_xlabel("iteration")
    ax.set_ylabel("gamma")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def _check_gamma_history(steps: Any, gammas: Any, term_names: Any, path: Any, *, title: Any
                         ) -> tuple[Path, list[float], list[list[float]]]:
    """Every check of :func:`plot_gamma_history`, nothing drawn: the path, the steps and the snapshots."""
    numbers = real_numbers(steps)
    if not numbers or not all(math.isfinite(s) for s in numbers):
        raise ValueError(f"`steps` should be a non-empty list of iterations (finite numbers: ints, floats, NumPy "
                         f"numbers or an array). Found {steps!r}.")
    steps = numbers
    back = [(a, b) for a, b in zip(steps, steps[1:]) if b <= a]
    if back:
        raise ValueError(f"`steps` should increase from one snapshot to the next (one snapshot per iteration, in "
                         f"order). Found {back[0][1]:g} after {back[0][0]:g} ({len(back)} such pair(s)): a history "
                         f"logged twice, or of two runs joined? Pass one run's snapshots in the order they were "
                         f"taken.")
    if isinstance(term_names, (str, bytes)) or not isinstance(term_names, Sequence) or not term_names or \
            not all(isinstance(n, str) for n in term_names):
        raise TypeError(f"`term_names` should be a non-empty list of term names (str). Found {term_names!r}.")
    repeated = sorted({n for n in term_names if list(term_names).count(n) > 1})
    if repeated:
        raise ValueError(f"`term_names` should name each term once: {repeated} repeated in {list(term_names)!r}, so "
                         f"their lines would share one label. Pass the names the loss gives its terms.")
    if isinstance(gammas, (str, bytes)) or not hasattr(gammas, "__len__") or len(gammas) != len(steps):
        raise ValueError(f"`gammas` should hold one snapshot per step ({len(steps)}). Found "
                         f"{len(gammas) if hasattr(gammas, '__len__') else type(gammas).__name__}.")
    snapshots = []
    for i, g in enumerate(gammas):
        values = real_numbers(g)
        if values is None or len(values) != len(term_names) or not all(math.isfinite(v) for v in values):
            raise ValueError(f"`gammas[{i}]` should be {len(term_names)} finite weights, one per term of "
                             f"`term_names`. Found {g!r}.")
        snapshots.append(values)
    gammas = snapshots
    _check_title(title)
    return _check_path(path), steps, gammas


def plot_reliability(logits: Any, labels: Any, path: str | Path, *, temperatures: Any = None,
                     bins: int = 15, title: str | None = None) -> Path:
    """Reliability diagram of every exit: accuracy against confidence per bin, before (and, with
    ``temperatures``, after) temperature scaling.

    Args:
        logits: ``[K, N, C]``.
        labels: ``[N]``.
        path: the file to write.
        temperatures: a :class:`Calibration` (from :func:`calibrate`) or ``K`` positive
            temperatures, one per exit (none is broadcast to every exit).
        bins: equal-width confidence bins.
        title: the figure's title.

    Returns:
        ``path``.

    Raises:
        ValueError: as :func:`calibrate` for the logits and labels (shape ``[K, N, C]`` and
            ``[N]``, NaN, ``+inf``, labels out of range), ``temperatures`` not ``K`` positive
            finite numbers, a bad ``bins``, or a ``path`` that cannot be written.
        TypeError: ``title`` not a str.
    """
    import torch

    labels = check_logits_and_labels(logits, labels, "logits", "plot_reliability").to(logits.device)
    K = logits.shape[0]
    scale = check_temperatures(temperatures, K)
    bins = check_bins(bins)
    _check_title(title)
    path = _check_path(path)
    plt = _pyplot()
    fig, axes = plt.subplots(1, K, figsize=(2.6 * K, 2.8), squeeze=False)
    variants = [("before", logits.double())]
    if scale is not None:
        variants.append(("after", logits.double() / torch.tensor(scale, dtype=torch.float64,
                                                                   device=logits.device).view(-1, 1, 1)))
    for k, ax in enumerate(axes[0]):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        for name, z in variants:
            conf, pred = torch.softmax(z[k], -1).amax(-1), predict(z[k])
            correct = (pred == labels).double()
            index = (conf * bins).ceil().long().clamp(1, bins) - 1
            xs, ys = [], []
            for b in range(bins):
                members = index == b
                if members.any():
                    xs.append(float(conf[members].mean()))
                    ys.append(float(correct[members].mean()))
            ax.plot(xs, ys, marker="o", ms=3, label=_legend_label(name))
        ax.set_title(f"exit {k + 1}")
        ax.set_xlabel("confidence")
        if k == 0:
            ax.set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
