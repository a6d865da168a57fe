"""``python -m metaweight plot RESULT.json [...] --out DIR``: the plots of training result files.

The result files are those ``examples/train.py --out`` writes: per-exit accuracy
(``test``), a budget curve (``budget``) and the loss-weight history (``gamma_history``).
Writes ``budget.png``, ``anytime.png`` and one ``gamma-<name>.png`` per file (``--format svg``
for SVG) into ``--out`` (``runs/plots`` under the current folder by default; git ignores ``runs/`` at the
root of a metaweight checkout only), and
prints the path of every file written. Plot files already in ``--out`` (from an earlier command)
stop the command unless ``--overwrite`` is given: they may be plots of other result files. Every run is labelled by its method; runs of one
method by their folder too (``hdkd (s0)``, ``hdkd (s1)``), or by their file name where they share a folder
(``hdkd (hdkd-seed0)``), so none hides another. A missing or
malformed result file (``num_samples`` not a positive integer, a ``top<k>`` key without a positive
``k``, loss-weight snapshots whose steps do not increase or terms named twice), a file with nothing to
plot (none of the entries above; an entry that is ``null``, ``[]`` or ``{}`` is absent,
one rule for all three), results that cannot be plotted together (different numbers of exits) or an
``--out`` that is not a folder (or a file name too long for it) stop the command with a message naming it (status 2), before
anything is written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from metaweight._anytime import AnytimeResult
from metaweight._budget import BudgetCurve
from metaweight._checks import integer_value, real_numbers
from metaweight._files import user_path
from metaweight._plots import (_check_anytime, _check_budget_curves, _check_gamma_history, plot_anytime,
                               plot_budget_curves, plot_gamma_history)


def _labels(files: list[Path], methods: list[str]) -> list[str]:
    """One label per result file, all different: the method's name, and for files sharing one, their
    folder (``hdkd (s0)``), else their file name without its suffix (``hdkd (hdkd-seed0)``: seeds of one
    method written to one folder), else both (``hdkd (s0/hdkd-seed0)``: seeds of one method in folders of one
    setting each), else their path."""
    labels = list(methods)
    for method in set(methods):
        same = [i for i, m in enumerate(methods) if m == method]
        if len(same) < 2:
            continue
        folders = [files[i].resolve().parent.name for i in same]
        stems = [files[i].stem for i in same]
        both = [f"{folder}/{stem}" for folder, stem in zip(folders, stems)]
        parts = next((p for p in (folders, stems, both) if len(set(p)) == len(p)), [str(files[i]) for i in same])
        for i, part in zip(same, parts):
            labels[i] = f"{method} ({part})"
    # a label built above may still read as another (a method named "hdkd (s0)"): a counter, never a
    # label shared, so that no run replaces another
    unique: list[str] = []
    for label in labels:
        new, n = label, 2
        while new in unique or (new != label and new in labels):
            new, n = f"{label} #{n}", n + 1
        unique.append(new)
    return unique


def _read(file: str, parser: argparse.ArgumentParser) -> dict:
    path = Path(file)
    if not path.is_file():
        parser.error(f"{file}: no such file" + (" (it is a folder)" if path.is_dir() else "") +
                     "; pass the JSON files examples/train.py --out wrote.")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        parser.error(f"{file} is not a JSON file ({exc}); pass the JSON files examples/train.py --out wrote.")
    if not isinstance(data, dict):
        parser.error(f"{file} holds a JSON {type(data).__name__}, not the object examples/train.py --out writes.")
    return data


def _parse(file: str, what: str, parser: argparse.ArgumentParser, make: Any) -> Any:
    """``make()``, or a clear error naming the file and the entry that is missing or malformed."""
    try:
        return make()
    except KeyError as exc:
        parser.error(f"{file}: its {what!r} entry lacks the key {exc}; is it a result file examples/train.py "
                     f"--out wrote?")
    except (TypeError, ValueError, AttributeError, StopIteration) as exc:
        parser.error(f"{file}: its {what!r} entry is malformed ({type(exc).__name__}: {exc}); is it a result file "
                     f"examples/train.py --out wrote?")


_PLOTTED = ("budget", "test", "gamma_history")  # the entries of a result file this command plots


def _present(data: dict[str, Any], key: str) -> bool:
    """The one rule for an entry: ``null``, ``[]`` and ``{}`` are absent (a run without a budget or
    a loss-weight history writes nothing to plot there); anything else is plotted, or refused as
    malformed."""
    value = data.get(key)
    return not (value is None or (isinstance(value, (list, dict)) and not value))


def _anytime(test: Any) -> AnytimeResult:
    """The ``test`` entry of a result file as an :class:`AnytimeResult`: ``num_samples`` a positive
    integer and each ``top<k>`` key a positive ``k``, refused (``ValueError``) rather than rounded."""
    num_samples = test["num_samples"]
    if integer_value(num_samples) is None or num_samples < 1:
        raise ValueError(f"'num_samples' should be a positive integer (how many samples were scored). Found "
                         f"{num_samples!r}.")
    accuracy = {}
    for key, values in test.items():
        if not key.startswith("top"):
            continue
        k = key[3:]
        if not (k.isascii() and k.isdigit()) or int(k) < 1:
            raise ValueError(f"{key!r} is not a top-k accuracy key: they are 'top1', 'top5', ... (k a positive "
                             f"integer).")
        numbers = real_numbers(values)
        if numbers is None:
            raise ValueError(f"{key!r} should be a list of accuracies, one per exit. Found {values!r}.")
        accuracy[int(k)] = numbers
    if not accuracy:
        raise ValueError("it holds no top-k accuracy ('top1', 'top5', ...).")
    return AnytimeResult(accuracy, int(num_samples))


def main(argv: list[str] | None = None) -> None:
    """Run the command line; a bad argument or result file exits with a message naming it (status 2)."""
    parser = argparse.ArgumentParser(prog="python -m metaweight", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = argparse.ArgumentDefaultsHelpFormatter
    sub = parser.add_subparsers(dest="command", required=True)
    plot = sub.add_parser("plot", help="plot training result files", formatter_class=defaults)
    plot.add_argument("results", nargs="+", help="JSON files written by examples/train.py --out")
    plot.add_argument("--out", default=str(Path("runs") / "plots"), help="output folder (created if missing)")
    plot.add_argument("--format", default="png", choices=["png", "svg", "pdf"], help="image format")
    plot.add_argument("--overwrite", action="store_true",
                      help="replace plot files already in --out (from an earlier command) instead of stopping")
    args = parser.parse_args(argv)
    args.results = [str(user_path(f, absolute=False)) for f in args.results]  # ~ as a shell expands it (--out=~/x it does not)
    args.out = str(user_path(args.out, absolute=False))
    files = [Path(f) for f in args.results]
    seen: dict[Path, str] = {}
    for file in args.results:
        key = Path(file).resolve()
        if key in seen:
            plot.error(f"{file} is given twice (as {seen[key]} before); pass each result file once.")
        seen[key] = file
    datas = [_read(file, plot) for file in args.results]
    configs = [d.get("config") if isinstance(d.get("config"), dict) else {} for d in datas]
    methods = [str(c.get("method", Path(file).stem)) for c, file in zip(configs, args.results)]
    runs = dict(zip(_labels(files, methods), zip(args.results, datas)))
    out = Path(args.out)
    curves = {n: _parse(f, "budget", plot, lambda d=d: BudgetCurve.from_dict(d["budget"]))
              for n, (f, d) in runs.items() if _present(d, "budget")}
    empty = [f for f, d in runs.values() if not any(_present(d, key) for key in _PLOTTED)]
    if empty:
        plot.error(f"nothing to plot in {', '.join(empty)}: it holds no {', '.join(map(repr, _PLOTTED))} entry (or "
                   f"only empty ones), the entries this command plots; nothing was written. Pass result files "
                   f"examples/train.py --out wrote.")
    anytime = {n: _parse(f, "test", plot, lambda d=d: _anytime(d["test"]))
               for n, (f, d) in runs.items() if _present(d, "test")}
    histories = {n: _parse(f, "gamma_history", plot, lambda d=d: (
        [h["step"] for h in d["gamma_history"]], [h["gamma"] for h in d["gamma_history"]], d["term_names"]))
        for n, (f, d) in runs.items() if _present(d, "gamma_history")}
    ancestor = out
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        plot.error(f"--out {out} cannot be a folder: {ancestor} is a file. Pass a folder for the plots (created if "
                   f"missing).")
    # every plot is judged (its arguments, its path) before the first is drawn: a problem stops the
    # command with a usage error and nothing written
    together = ", ".join(f for f, _ in runs.values())
    jobs: list[tuple[Any, Any, tuple, dict, str]] = []
    if curves:
        jobs.append((plot_budget_curves, _check_budget_curves, (curves, out / f"budget.{args.format}"),
                     {}, f"the 'budget' entries of {together} cannot be plotted together"))
    if anytime:
        jobs.append((plot_anytime, _check_anytime, (anytime, out / f"anytime.{args.format}"),
                     {}, f"the 'test' entries of {together} cannot be plotted together"))
    names: set[str] = set()
    for n, (steps, gammas, term_names) in histories.items():
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in n)[:100]  # a file name, not a title
        stem, i = safe, 2
        while stem in names:  # two labels that read alike once made safe for a file name
            stem, i = f"{safe}-{i}", i + 1
        names.add(stem)
        jobs.append((plot_gamma_history, _check_gamma_history,
                     (steps, gammas, term_names, out / f"gamma-{stem}.{args.format}"), {"title": n},
                     f"{runs[n][0]}: its 'gamma_history' entry cannot be plotted"))
    defaults = {plot_budget_curves: {"scale": 1e6, "unit": "M", "title": None}, plot_anytime: {"k": 1, "title": None},
                plot_gamma_history: {"title": None}}
    folders = [str(job[2][-1]) for job in jobs if Path(job[2][-1]).is_dir()]  # job[2]: the draw's arguments
    if folders:  # (a problem of --out, not of the result files: said so before their checks)
        plot.error(f"--out {out} holds a folder where a plot is to be written ({', '.join(folders)}); nothing was "
                   f"written. Move or remove it, or pass another --out.")
    for draw, check, positional, keywords, what in jobs:
        try:
            check(*positional, **{**defaults[draw], **keywords})
        except (TypeError, ValueError) as exc:
            plot.error(f"{what} ({exc}); is each a result file examples/train.py --out wrote? Plot files that "
                       f"cannot share a figure in separate commands.")
    there = [str(job[2][-1]) for job in jobs if Path(job[2][-1]).exists()]
    if there and not args.overwrite:
        plot.error(f"--out {out} already holds {', '.join(there)} (from an earlier command, perhaps of other result "
                   f"files); nothing was written. Pass --overwrite to replace them, or another --out.")
    written = [draw(*positional, **keywords) for draw, _, positional, keywords, _ in jobs]
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
