"""Turn a folder of reproduction results into the paper's Table 2 layout and Fig. 2 plot.

    python benchmarks/report.py results/cpu                         # prints the tables
    python benchmarks/report.py results/cpu --write                 # + results/cpu/<setting>/report.md and budget.png

Tables: exits as rows, methods as columns, mean +- sample standard deviation (n-1) over seeds
of the test accuracy (%), top-1 and top-5, with each exit's cost in MMACs. The budget plot
averages, for every q of MSDNet's grid, the expected cost and the accuracy over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ["msdnet", "dbt", "naive_dkd", "hmsdnet", "hdbt", "hdkd"]
TITLES = {"msdnet": "MSDNet", "dbt": "DBT", "naive_dkd": "NaiveDKD", "hmsdnet": "HMSDNet", "hdbt": "HDBT",
          "hdkd": "HDKD"}


def load(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """``{method: [result of each seed]}`` from the JSON files of one setting's folder."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for file in sorted(folder.glob("*.json")):
        data = json.loads(file.read_text())
        runs.setdefault(data["config"]["method"], []).append(data)
    return runs


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per method and exit: mean and std over seeds of top-1/top-5; mean budget curve; wall time."""
    out: dict[str, Any] = {"methods": {}}
    for method in [m for m in METHODS if m in runs] + [m for m in runs if m not in METHODS]:
        results = runs[method]
        entry: dict[str, Any] = {"seeds": sorted(r["config"]["seed"] for r in results)}
        for k in ("top1", "top5"):
            per_exit = list(zip(*[r["test"][k] for r in results]))
            entry[k] = [mean_std(list(v)) for v in per_exit]
        entry["train_seconds"] = mean_std([r["train_seconds"] for r in results])
        curves = [r["budget"]["points"] for r in results if "budget" in r]
        if curves:
            entry["budget"] = [(statistics.fmean(p["cost"] for p in pts), statistics.fmean(p["accuracy"] for p in pts))
                               for pts in zip(*curves)]
        out["methods"][method] = entry
    first = next(iter(runs.values()))[0]
    out["macs"] = first.get("costs", {}).get("macs")
    out["data"] = first["data"]
    out["test_images"] = first["test"]["num_samples"]
    return out


def table(summary: dict[str, Any], k: str) -> str:
    methods = list(summary["methods"])
    head = "| exit | MMACs | " + " | ".join(TITLES.get(m, m) for m in methods) + " |"
    rows = [head, "|" + "---|" * (len(methods) + 2)]
    exits = len(next(iter(summary["methods"].values()))[k])
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


def markdown(summary: dict[str, Any]) -> str:
    seeds = {m: len(v["seeds"]) for m, v in summary["methods"].items()}
    n = min(seeds.values())
    parts = [f"**{summary['data']}**, test accuracy (%) on {summary['test_images']} images, mean ± std over "
             f"{n} seed{'s' if n > 1 else ''} (bold: best mean).", "", "Top-1:", "", table(summary, "top1"), "",
             "Top-5:", "", table(summary, "top5"), "",
             "Training time per run (s, mean): " + ", ".join(
                 f"{TITLES.get(m, m)} {v['train_seconds'][0]:.0f}" for m, v in summary["methods"].items()) + "."]
    return "\n".join(parts)


def plot(summary: dict[str, Any], path: Path) -> Path:
    import metaweight as mw

    curves = {}
    for m, v in summary["methods"].items():
        if "budget" in v:
            points = [mw.BudgetPoint(None, [], cost, acc, []) for cost, acc in v["budget"]]
            curves[TITLES.get(m, m)] = mw.BudgetCurve(points, summary.get("macs") or [])
    return mw.plot_budget_curves(curves, path, title=f"{summary['data']}: budgeted classification (mean over seeds)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="results/GRID: one sub-folder per setting (or a setting folder itself)")
    p.add_argument("--write", action="store_true", help="write report.md and budget.png into each setting folder")
    args = p.parse_args(argv)
    folder = Path(args.folder)
    settings = [folder] if list(folder.glob("*.json")) else sorted(d for d in folder.iterdir() if d.is_dir())
    for setting in settings:
        runs = load(setting)
        if not runs:
            continue
        summary = summarize(runs)
        text = markdown(summary)
        print(f"## {setting.name}\n\n{text}\n")
        if args.write:
            (setting / "report.md").write_text(text + "\n")
            plot(summary, setting / "budget.png")


if __name__ == "__main__":
    main()
