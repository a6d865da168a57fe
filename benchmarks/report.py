"""Turn a folder of reproduction results into the paper's Table 2 layout, paired differences and plots.

    python benchmarks/report.py results/cpu                  # prints the tables
    python benchmarks/report.py results/cpu --write          # + <setting>/report.md, budget.png, exits.png, gamma.png

Tables: exits as rows, configurations as columns, mean +- sample standard deviation (n-1) over
seeds of the test accuracy (%), top-1 and top-5, with each exit's cost in MMACs. Paired
differences: for each exit, the mean over seeds of (HDKD - baseline) on the same seed (same
data split, same initialisation), with a 95% Student-t interval on n-1 degrees of freedom. The
budget plot averages, for every q of MSDNet's grid, the expected cost and the accuracy over
seeds; the gamma plot shows each term's weight over training (seed 0).

A folder of tuning runs (``tune``, with a selection split) gets a table of the selection
split's accuracy instead: settings are chosen on it, never on the test set.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import metaweight as mw  # noqa: E402

METHODS = list(mw.METHODS)
TITLES = {"msdnet": "MSDNet", "dbt": "DBT", "naive_dkd": "NaiveDKD", "hmsdnet": "HMSDNet", "hdbt": "HDBT",
          "hdkd": "HDKD", "msdnet_long": "MSDNet×4 epochs", "hdkd_every4": "HDKD every 4",
          "hdkd_fast": "HDKD fast", "hdkd_init_last": "HDKD γ₀ last", "hdkd_init_random": "HDKD γ₀ random",
          "hdkd_alpha0": "HDKD α=0", "hdkd_alpha1": "HDKD α=1", "hdkd_sgd": "HDKD SGD on γ",
          "hdkd_normalize": "HDKD Σγ held"}
# the other loss weightings (benchmarks/reproduce.py's weightings grid): on the dense-KD terms, and on the CE terms
WEIGHTING_TITLES = {"uw": "UW", "dwa": "DWA", "gradnorm": "GradNorm", "rlw": "RLW", "famo": "FAMO",
                    "sdn": "SDN schedule"}
TITLES.update({**WEIGHTING_TITLES, **{f"{w}_ce": f"{t} (CE)" for w, t in WEIGHTING_TITLES.items()}})
# configurations compared with HDKD itself, paired (mode="fast", the ablation)
VARIANTS = ["hdkd_fast", "hdkd_init_last", "hdkd_init_random", "hdkd_alpha0", "hdkd_alpha1", "hdkd_sgd",
            "hdkd_normalize"]
# Student t quantile t_{0.975, df} (df = 1..30), for 95% intervals without scipy
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (normal beyond 30)."""
    return T975[df - 1] if 1 <= df <= len(T975) else 1.96


def name_of(run: dict[str, Any]) -> str:
    return run["config"].get("tag") or run["config"]["method"]


def load(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """``{configuration: [result of each seed]}`` from the JSON files of one setting's folder."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for file in sorted(folder.glob("*.json")):
        data = json.loads(file.read_text())
        if "config" in data and "test" in data:  # a training run (not, e.g., horizon.py's measurements)
            runs.setdefault(name_of(data), []).append(data)
    return runs


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def half_width(values: list[float]) -> float:
    """The half-width of the 95% t interval of the mean of ``values`` (nan for fewer than two)."""
    n = len(values)
    return t975(n - 1) * statistics.stdev(values) / math.sqrt(n) if n > 1 else math.nan


def paired(a: list[dict[str, Any]], b: list[dict[str, Any]], k: str = "top1") -> list[tuple[float, float, int]]:
    """Per exit: (mean of a - b over the seeds both have, half-width of its 95% t interval, n)."""
    by_seed = {r["config"]["seed"]: r for r in b}
    pairs = [(r, by_seed[r["config"]["seed"]]) for r in a if r["config"]["seed"] in by_seed]
    if not pairs:
        return []
    out = []
    for e in range(len(pairs[0][0]["test"][k])):
        diffs = [ra["test"][k][e] - rb["test"][k][e] for ra, rb in pairs]
        out.append((statistics.fmean(diffs), half_width(diffs), len(diffs)))
    return out


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per configuration and exit: mean and std over seeds of top-1/top-5; mean budget curve; wall time."""
    out: dict[str, Any] = {"methods": {}}
    order = [m for m in TITLES if m in runs] + sorted(m for m in runs if m not in TITLES)
    for method in order:
        results = runs[method]
        entry: dict[str, Any] = {"seeds": sorted(r["config"]["seed"] for r in results)}
        for k in ("top1", "top5"):
            per_exit = list(zip(*[r["test"][k] for r in results]))
            entry[k] = [mean_std(list(v)) for v in per_exit]
        for split in ("selection", "val"):
            if all(split in r for r in results):
                entry[split] = [mean_std(list(v)) for v in zip(*[r[split]["top1"] for r in results])]
        entry["train_seconds"] = mean_std([r["train_seconds"] for r in results])
        curves = [r["budget"]["points"] for r in results if "budget" in r]
        if curves:
            entry["budget"] = [(statistics.fmean(p["cost"] for p in pts), statistics.fmean(p["accuracy"] for p in pts))
                               for pts in zip(*curves)]
        moves = [gamma_movement(r) for r in results]
        if all(m is not None for m in moves):
            entry["gamma_movement"] = mean_std(moves)  # type: ignore[arg-type]
        out["methods"][method] = entry
    first = next(iter(runs.values()))[0]
    out["macs"] = first.get("costs", {}).get("macs")
    out["data"] = first["data"]
    out["test_images"] = first["test"]["num_samples"]
    return out


def gamma_movement(run: dict[str, Any]) -> float | None:
    """The largest relative change of an active term's gamma from its start (None if gamma is fixed)."""
    if not run["config"]["method"] in mw.METHODS or not mw.METHODS[run["config"]["method"]].learn:
        return None
    history = run.get("gamma_history") or []
    if not history:
        return None
    start = history[0]["gamma"]  # the first record is after the first meta steps; close to the start
    end = run["gamma"]
    moved = [abs(e - s) / s for s, e in zip(start, end) if s > 0]
    return max(moved) if moved else None


def table(summary: dict[str, Any], k: str, methods: list[str] | None = None) -> str:
    methods = methods or list(summary["methods"])
    head = "| exit | MMACs | " + " | ".join(TITLES.get(m, m) for m in methods) + " |"
    rows = [head, "|" + "---|" * (len(methods) + 2)]
    exits = len(summary["methods"][methods[0]][k])
    for e in range(exits):
        cells = []
        best = max(summary["methods"][m][k][e][0] for m in methods)
        for m in methods:
            mean, std = summary["methods"][m][k][e]
            cell = f"{mean:.2f} ± {std:.2f}"
            cells.append(f"**{cell}**" if mean == best else cell)
        macs = f"{summary['macs'][e] / 1e6:.2f}" if summary.get("macs") else ""
        rows.append(f"| {e + 1} | {macs} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def difference(mean: float, half: float) -> str:
    """A paired difference as ``+m ± h``, starred where the interval excludes 0 (``+m`` alone for one seed)."""
    if math.isnan(half):
        return f"{mean:+.2f}"
    return f"{mean:+.2f} ± {half:.2f}" + ("" if abs(mean) <= half else " *")


def paired_table(runs: dict[str, list[dict[str, Any]]], subject: str, baselines: list[str]) -> str:
    baselines = [b for b in baselines if b in runs and b != subject]
    if subject not in runs or not baselines:
        return ""
    cols = {b: paired(runs[subject], runs[b]) for b in baselines}
    cols = {b: d for b, d in cols.items() if d}
    baselines = list(cols)
    if not cols:
        return ""
    rows = ["| exit | " + " | ".join(f"{TITLES.get(subject, subject)} − {TITLES.get(b, b)} (n={cols[b][0][2]})"
                                     for b in baselines) + " |",
            "|" + "---|" * (len(baselines) + 1)]
    for e in range(len(next(iter(cols.values())))):
        cells = []
        for b in baselines:
            mean, half, _ = cols[b][e]
            cells.append(difference(mean, half))
        rows.append(f"| {e + 1} | " + " | ".join(cells) + " |")
    return ("Paired differences in top-1 (points; same seed, same split), mean ± 95% t half-width over the n "
            "seeds both have; * = interval excludes 0:\n\n" + "\n".join(rows))


def best_other_table(summary: dict[str, Any], runs: dict[str, list[dict[str, Any]]]) -> str:
    """Per exit, HDKD against the other preset with the best mean top-1 there and, where it was run,
    against the best of those and MSDNet×4 epochs; paired over the seeds both have."""
    presets = [m for m in summary["methods"] if m in METHODS and m != "hdkd"]
    if "hdkd" not in runs or not presets:
        return ""
    scopes = [("best other preset", presets)]
    if "msdnet_long" in summary["methods"]:
        scopes.append(("best of those and MSDNet×4 epochs", presets + ["msdnet_long"]))

    def cell(pool: list[str], e: int) -> str:
        best = max(pool, key=lambda m: summary["methods"][m]["top1"][e][0])
        mean, half, n = paired(runs["hdkd"], runs[best])[e]
        return f"{TITLES.get(best, best)} ({summary['methods'][best]['top1'][e][0]:.2f}): {difference(mean, half)} (n={n})"

    rows = ["| exit | " + " | ".join(f"HDKD − {title}" for title, _ in scopes) + " |", "|---" * (len(scopes) + 1) + "|"]
    for e in range(len(summary["methods"]["hdkd"]["top1"])):
        rows.append(f"| {e + 1} | " + " | ".join(cell(pool, e) for _, pool in scopes) + " |")
    return ("HDKD against the best other method at each exit (its mean top-1; the paired difference, 95% t "
            "half-width; * = excludes 0):\n\n" + "\n".join(rows))


FIXED = ["msdnet", "dbt", "naive_dkd"]  # the presets with fixed (uniform) weights


def weighting_table(summary: dict[str, Any], runs: dict[str, list[dict[str, Any]]]) -> str:
    """Every loss weighting (and HDKD) against the best fixed preset at each exit: its mean top-1 and
    the paired difference (95% t half-width over the seeds both have), and its mean training time
    relative to MSDNet's. The best preset is picked per exit by its mean test top-1, which favours
    the preset: a difference that is not significant here is not one either way."""
    subjects = [m for m in ["hdkd", *WEIGHTING_TITLES, *(f"{w}_ce" for w in WEIGHTING_TITLES)] if m in runs]
    fixed = [m for m in FIXED if m in runs]
    if not fixed or not any(m in WEIGHTING_TITLES or m.endswith("_ce") for m in subjects):
        return ""
    methods = summary["methods"]
    exits = len(methods[fixed[0]]["top1"])
    best = [max(fixed, key=lambda m: methods[m]["top1"][e][0]) for e in range(exits)]
    base_seconds = methods["msdnet"]["train_seconds"][0] if "msdnet" in methods else None
    head = "| method | terms | n | " + " | ".join(f"exit {e + 1}" for e in range(exits)) + " | time ÷ MSDNet |"
    rows = [head, "|" + "---|" * (exits + 4),
            "| best fixed preset | | | " + " | ".join(
                f"{TITLES[best[e]]} {methods[best[e]]['top1'][e][0]:.2f}" for e in range(exits)) + " | |"]
    for m in subjects:
        cells = []
        for e in range(exits):
            diffs = paired(runs[m], runs[best[e]])
            if not diffs:
                cells.append(f"{methods[m]['top1'][e][0]:.2f}")
                continue
            mean, half, _ = diffs[e]
            cells.append(f"{methods[m]['top1'][e][0]:.2f} ({difference(mean, half)})")
        n = len(methods[m]["seeds"])
        terms = "CE" if m.endswith("_ce") else "CE + dense KD"
        ratio = f"{methods[m]['train_seconds'][0] / base_seconds:.2f}" if base_seconds else ""
        title = TITLES.get(m, m).replace(" (CE)", "")
        rows.append(f"| {title} | {terms} | {n} | " + " | ".join(cells) + f" | {ratio} |")
    return ("Loss weightings against the best fixed-weight preset (MSDNet, DBT, NaiveDKD) at each exit: mean "
            "top-1 (%) and, in brackets, the paired difference to that preset (points, same seeds, 95% t "
            "half-width; * = the interval excludes 0). The preset is the best by mean test top-1 at that exit, "
            "which favours it. Time: mean training wall time relative to MSDNet's (runs two at a time beside "
            "other work: noisy; the per-iteration cost is in docs/guides/cost.md).\n\n" + "\n".join(rows))


def markdown(summary: dict[str, Any], runs: dict[str, list[dict[str, Any]]] | None = None) -> str:
    seeds = {m: len(v["seeds"]) for m, v in summary["methods"].items()}
    counts = sorted(set(seeds.values()))
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    weightings = set(WEIGHTING_TITLES) | {f"{w}_ce" for w in WEIGHTING_TITLES}  # in their own table below
    main = [m for m in summary["methods"] if m not in weightings] or list(summary["methods"])
    parts = [f"**{summary['data']}**, test accuracy (%) on {summary['test_images']} images, mean ± std over "
             f"{n} seed{'s' if counts[-1] > 1 else ''} (bold: best mean; seeds per column: "
             + ", ".join(f"{TITLES.get(m, m)} {c}" for m, c in seeds.items()) + ").", "", "Top-1:", "",
             table(summary, "top1", main), "",
             "Top-5:", "", table(summary, "top5", main), ""]
    if runs:
        for subject in ("hdkd", "hdbt", "hmsdnet"):
            base = {"hdkd": ["msdnet", "dbt", "naive_dkd", "hmsdnet", "hdbt", "msdnet_long", "hdkd_every4"],
                    "hdbt": ["dbt"], "hmsdnet": ["msdnet"]}[subject]
            text = paired_table(runs, subject, base)
            if text:
                parts += [text, ""]
        text = best_other_table(summary, runs)
        if text:
            parts += [text, ""]
        text = weighting_table(summary, runs)
        if text:
            parts += [text, ""]
        for subject in VARIANTS:
            text = paired_table(runs, subject, ["hdkd"])
            if text:
                parts += [text, ""]
        text = trajectory_table(runs, [v for v in VARIANTS if v in runs])
        if text:
            parts += [text, ""]
        text = sign_table(runs)
        if text:
            parts += [text, ""]
    moved = {m: v["gamma_movement"] for m, v in summary["methods"].items() if "gamma_movement" in v}
    if moved:
        parts += ["Largest relative change of a learned weight over training: " + ", ".join(
            f"{TITLES.get(m, m)} {100 * v[0]:.0f}%" for m, v in moved.items()) + ".", ""]
    parts.append("Training time per run (s, mean): " + ", ".join(
        f"{TITLES.get(m, m)} {v['train_seconds'][0]:.0f}" for m, v in summary["methods"].items()) + ".")
    return "\n".join(parts)


def _trajectory_gap(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Mean over records and active terms of |gamma_a - gamma_b| at the same iteration."""
    gb = {h["step"]: h["gamma"] for h in b["gamma_history"]}
    gaps = [abs(x - y) for h in a["gamma_history"] if h["step"] in gb
            for x, y in zip(h["gamma"], gb[h["step"]]) if x > 0 or y > 0]
    return statistics.fmean(gaps) if gaps else math.nan


def trajectory_table(runs: dict[str, list[dict[str, Any]]], subjects: list[str]) -> str:
    """How far each variant's gamma trajectory is from HDKD's on the same seed, beside how far HDKD's own
    trajectories are from each other across seeds (the seed noise of a trajectory)."""
    if "hdkd" not in runs or not subjects:
        return ""
    exact = {r["config"]["seed"]: r for r in runs["hdkd"] if r.get("gamma_history")}
    seeds = sorted(exact)
    noise = [_trajectory_gap(exact[i], exact[j]) for i in seeds for j in seeds if i < j]
    rows = []
    for m in subjects:
        gaps = [_trajectory_gap(r, exact[r["config"]["seed"]]) for r in runs[m]
                if r.get("gamma_history") and r["config"]["seed"] in exact]
        if gaps:
            rows.append(f"| {TITLES.get(m, m)} | {statistics.fmean(gaps):.3f} (n={len(gaps)}) |")
    if not rows:
        return ""
    noise_text = f"{statistics.fmean(noise):.3f} (n={len(noise)} pairs)" if noise else "–"
    return ("γ trajectories against HDKD's: the mean over records and active terms of |γ − γ_HDKD| on the same "
            "seed; for scale, HDKD against itself on other seeds: " + noise_text + ".\n\n"
            "| configuration | mean gap to HDKD's γ |\n|---|---|\n" + "\n".join(rows))


def push_down_shares(run: dict[str, Any]) -> dict[str, float] | None:
    """For each active term, the share of recorded meta-gradients (means over the steps between records)
    that are positive, i.e. that push the term's weight down."""
    records = [h["gamma_grad_mean"] for h in run.get("gamma_history", []) if h.get("gamma_grad_mean")]
    if not records:
        return None
    active = [k for k, g in enumerate(run["gamma_history"][0]["gamma"]) if g > 0 or run["gamma"][k] > 0]
    return {run["term_names"][k]: sum(1 for r in records if r[k] > 0) / len(records) for k in active}


def sign_table(runs: dict[str, list[dict[str, Any]]]) -> str:
    """Per learned configuration: how often the one-step meta-gradient pushed CE and KD weights down."""
    rows = []
    for m, results in runs.items():
        shares = [push_down_shares(r) for r in results]
        shares = [s for s in shares if s]
        if not shares:
            continue
        ce = [v for s in shares for n, v in s.items() if n.startswith("ce")]
        kd = [v for s in shares for n, v in s.items() if n.startswith("kd")]
        final = [r["gamma"] for r in results]
        names = results[0]["term_names"]
        mean_final = {n: statistics.fmean(f[k] for f in final) for k, n in enumerate(names)}
        ce_w = statistics.fmean(v for n, v in mean_final.items() if n.startswith("ce"))
        started = results[0]["gamma_history"][0]["gamma"]  # active terms: weight > 0 at the first record
        kd_vals = [v for k, (n, v) in enumerate(mean_final.items()) if n.startswith("kd") and started[k] > 0]
        rows.append(f"| {TITLES.get(m, m)} | {100 * statistics.fmean(ce):.0f}% | "
                    + (f"{100 * statistics.fmean(kd):.0f}%" if kd else "–") + f" | {ce_w:.2f} | "
                    + (f"{statistics.fmean(kd_vals):.2f}" if kd_vals else "–") + " |")
    if not rows:
        return ""
    return ("How the one-step meta-gradient pushes the weights: the share of records (each the mean "
            "meta-gradient over 1% of training) that push a term's weight *down*, averaged over the CE and "
            "the KD terms and over seeds, and the mean final weight of each group (start: 1):\n\n"
            "| configuration | CE pushed down | KD pushed down | final CE weight | final KD weight |\n"
            "|---|---|---|---|---|\n" + "\n".join(rows))


def tuning_markdown(summary: dict[str, Any]) -> str:
    """The selection split's per-exit top-1 of each candidate, and how far gamma moved."""
    methods = list(summary["methods"])
    exits = len(summary["methods"][methods[0]]["selection"])
    rows = ["| candidate | " + " | ".join(f"exit {e + 1}" for e in range(exits)) + " | mean | γ moved |",
            "|" + "---|" * (exits + 3)]
    for m in methods:
        sel = [v[0] for v in summary["methods"][m]["selection"]]
        move = summary["methods"][m].get("gamma_movement", (math.nan, 0))[0]
        rows.append(f"| {m} | " + " | ".join(f"{a:.2f}" for a in sel) + f" | {statistics.fmean(sel):.2f} | "
                    f"{100 * move:.0f}% |")
    return (f"**{summary['data']}**, selection split (training images outside the pool; not the test set), "
            f"top-1 (%):\n\n" + "\n".join(rows))


def plot(summary: dict[str, Any], path: Path) -> Path:
    curves = {}
    for m, v in summary["methods"].items():
        if "budget" in v:
            points = [mw.BudgetPoint(None, [], cost, acc, []) for cost, acc in v["budget"]]
            curves[TITLES.get(m, m)] = mw.BudgetCurve(points, summary.get("macs") or [])
    return mw.plot_budget_curves(curves, path, title=f"{summary['data']}: budgeted classification (mean over seeds)")


def plot_exits(summary: dict[str, Any], path: Path) -> Path:
    """Mean top-1 per exit over seeds, one bar per configuration (the paper's anytime view)."""
    results = {TITLES.get(m, m): mw.AnytimeResult({1: [mean for mean, _ in v["top1"]]}, summary["test_images"])
               for m, v in summary["methods"].items()}
    return mw.plot_anytime(results, path, title=f"{summary['data']}: top-1 per exit (mean over seeds)")


def plot_gamma(runs: dict[str, list[dict[str, Any]]], path: Path, configs: list[str]) -> Path | None:
    """Each term's gamma over training, one panel per configuration (its lowest seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [c for c in configs if c in runs and runs[c][0].get("gamma_history")]
    if not configs:
        return None
    fig, axes = plt.subplots(1, len(configs), figsize=(4.2 * len(configs), 3.4), squeeze=False)
    for ax, c in zip(axes[0], configs):
        run = min(runs[c], key=lambda r: r["config"]["seed"])
        steps = [h["step"] for h in run["gamma_history"]]
        gammas = list(zip(*[h["gamma"] for h in run["gamma_history"]]))
        for name, g in zip(run["term_names"], gammas):
            if max(g) > 0:
                ax.plot(steps, g, lw=1.2 if name.startswith("ce") else 0.8,
                        ls="-" if name.startswith("ce") else "--", label=name)
        ax.set_title(f"{TITLES.get(c, c)} (seed {run['config']['seed']})")
        ax.set_xlabel("iteration")
        ax.set_ylabel("γ")
    axes[0][-1].legend(fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="results/GRID: one sub-folder per setting (or a setting folder itself)")
    p.add_argument("--write", action="store_true", help="write report.md, budget.png and gamma.png into each folder")
    args = p.parse_args(argv)
    folder = Path(args.folder)
    settings = [folder] if list(folder.glob("*.json")) else sorted(d for d in folder.iterdir() if d.is_dir())
    settings += [d for s in list(settings) for d in sorted(s.iterdir()) if d.is_dir() and list(d.glob("*.json"))]
    for setting in settings:
        runs = load(setting)
        if not runs:
            continue
        if setting.name == "ablation" and "hdkd" not in runs:  # pair the ablation with HDKD's own runs
            parent = load(setting.parent)
            if "hdkd" in parent:
                runs = {"hdkd": parent["hdkd"], **runs}
        summary = summarize(runs)
        tuning = all("selection" in v for v in summary["methods"].values())
        text = tuning_markdown(summary) if tuning else markdown(summary, runs)
        print(f"## {setting.name}\n\n{text}\n")
        if args.write:
            (setting / "report.md").write_text(text + "\n")
            if not tuning:
                plot(summary, setting / "budget.png")
                plot_exits(summary, setting / "exits.png")
            plot_gamma(runs, setting / "gamma.png", [m for m in summary["methods"]
                                                     if (m in mw.METHODS and mw.METHODS[m].learn) or m in VARIANTS]
                       if not tuning else list(summary["methods"]))


if __name__ == "__main__":
    main()
