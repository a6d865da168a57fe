"""``python -m metaweight plot RESULT.json [...] --out DIR``: the plots of training result files.

The result files are those ``examples/train.py --out`` writes: per-exit accuracy
(``test``), a budget curve (``budget``) and the loss-weight history (``gamma_history``).
Writes ``budget.png``, ``anytime.png`` and one ``gamma-<name>.png`` per file (``--format svg``
for SVG) into ``--out`` (``runs/plots`` by default, beside the runs, which git ignores), and
prints the path of every file written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from metaweight._anytime import AnytimeResult
from metaweight._budget import BudgetCurve
from metaweight._plots import plot_anytime, plot_budget_curves, plot_gamma_history


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m metaweight", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = argparse.ArgumentDefaultsHelpFormatter
    sub = parser.add_subparsers(dest="command", required=True)
    plot = sub.add_parser("plot", help="plot training result files", formatter_class=defaults)
    plot.add_argument("results", nargs="+", help="JSON files written by examples/train.py --out")
    plot.add_argument("--out", default=str(Path("runs") / "plots"), help="output folder (created if missing)")
    plot.add_argument("--format", default="png", choices=["png", "svg", "pdf"], help="image format")
    args = parser.parse_args(argv)
    runs = {}
    for file in args.results:
        data = json.loads(Path(file).read_text())
        name = data.get("config", {}).get("method", Path(file).stem)
        if name in runs:
            name = f"{name} ({Path(file).stem})"
        runs[name] = data
    out = Path(args.out)
    written = []
    curves = {n: BudgetCurve.from_dict(d["budget"]) for n, d in runs.items() if "budget" in d}
    if curves:
        written.append(plot_budget_curves(curves, out / f"budget.{args.format}"))
    anytime = {n: AnytimeResult({int(k[3:]): v for k, v in d["test"].items() if k.startswith("top")},
                                d["test"]["num_samples"]) for n, d in runs.items() if "test" in d}
    if anytime:
        written.append(plot_anytime(anytime, out / f"anytime.{args.format}"))
    for n, d in runs.items():
        history = d.get("gamma_history")
        if history:
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in n)
            written.append(plot_gamma_history([h["step"] for h in history], [h["gamma"] for h in history],
                                              d["term_names"], out / f"gamma-{safe}.{args.format}", title=n))
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
