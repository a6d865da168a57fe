"""Plots (matplotlib, an optional dependency, imported only when a plot is asked for)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from metaweight._anytime import AnytimeResult
from metaweight._budget import BudgetCurve
from metaweight._exit_rules import predict


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("Plotting needs matplotlib: pip install 'metaweight[plot]'.") from exc
    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight", dpi=150)
    _pyplot().close(fig)
    return path


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
    """
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError(f"`curves` should be a non-empty dict {{method name: BudgetCurve}}. Found {curves!r}.")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, curve in curves.items():
        points = sorted(curve.points, key=lambda p: p.cost)
        ax.plot([p.cost / scale for p in points], [p.accuracy for p in points], marker=".", label=name)
    some = next(iter(curves.values()))
    ax.set_xlabel(f"average {some.cost_unit} per sample ({unit})" if unit else f"average {some.cost_unit} per sample")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_anytime(results: Mapping[str, AnytimeResult], path: str | Path, *, k: int = 1,
                 title: str | None = None) -> Path:
    """Per-exit top-``k`` accuracy as grouped bars, one colour per method.

    Args:
        results: ``{method name: AnytimeResult}``.
        path: the file to write; PNG, SVG or PDF by its suffix.
        k: which top-k accuracy to plot.
        title: an optional title.
    """
    if not isinstance(results, Mapping) or not results:
        raise ValueError(f"`results` should be a non-empty dict {{method name: AnytimeResult}}. Found {results!r}.")
    missing = [name for name, r in results.items() if k not in r.accuracy]
    if missing:
        raise ValueError(f"No top-{k} accuracy in the results of {missing}; pass k= one of the top-k they hold.")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(results)
    exits = next(iter(results.values())).num_exits
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [e + 1 + (i - (len(names) - 1) / 2) * width for e in range(exits)]
        ax.bar(xs, results[name].accuracy[k], width=width, label=name)
    ax.set_xticks(range(1, exits + 1))
    ax.set_xlabel("exit")
    ax.set_ylabel(f"top-{k} accuracy (%)")
    lows = [min(r.accuracy[k]) for r in results.values()]
    ax.set_ylim(max(0.0, min(lows) - 5), 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_gamma_history(steps: Sequence[int], gammas: Sequence[Sequence[float]], term_names: Sequence[str],
                       path: str | Path, *, title: str | None = None) -> Path:
    """The trajectory of every loss weight over training: one line per term (CE solid, KD dashed).

    Args:
        steps: the iteration of each snapshot.
        gammas: one list of weights per snapshot, in the order of ``term_names``.
        term_names: the names of the terms (``HarmonizedWeighter.term_names``).
        path: the file to write; PNG, SVG or PDF by its suffix.
        title: an optional title.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for j, name in enumerate(term_names):
        values = [g[j] for g in gammas]
        if any(values):
            ax.plot(steps, values, linestyle="-" if name.startswith("ce") else "--", label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("gamma")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_reliability(logits: Any, labels: Any, path: str | Path, *, temperatures: Sequence[float] | None = None,
                     bins: int = 15, title: str | None = None) -> Path:
    """Reliability diagram of every exit: accuracy against confidence per bin, before (and, with
    ``temperatures``, after) temperature scaling.

    Args:
        logits: ``[K, N, C]``.
        labels: ``[N]``.
        path: the file to write.
        temperatures: per-exit temperatures (e.g. ``calibrate(...).temperatures``).
        bins: equal-width confidence bins.
        title: the figure's title.
    """
    import torch

    plt = _pyplot()
    K = logits.shape[0]
    fig, axes = plt.subplots(1, K, figsize=(2.6 * K, 2.8), squeeze=False)
    variants = [("before", logits.double())]
    if temperatures is not None:
        variants.append(("after", logits.double() / torch.tensor(list(temperatures), dtype=torch.float64,
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
            ax.plot(xs, ys, marker="o", ms=3, label=name)
        ax.set_title(f"exit {k + 1}")
        ax.set_xlabel("confidence")
        if k == 0:
            ax.set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
