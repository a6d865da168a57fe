"""Every ``>>>`` example in the package's docstrings runs, and every model it builds runs.

``pytest`` collects the docstrings with ``--doctest-modules`` only when ``metaweight/`` is among
the paths it is given; this test runs them from ``tests/`` as well. A doctest passes as long as
its printed lines match, so an example that builds a :class:`~metaweight.MultiExit` whose stages
do not chain (a stage taking the wrong number of features) would still pass when the example
never calls the model: each ``MultiExit`` an example builds is also called on a batch of the
width its first layer takes.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest
import torch
from torch import nn

import metaweight
import metaweight as mw


def _modules() -> list[str]:
    names = ["metaweight"]
    for info in pkgutil.iter_modules(metaweight.__path__):
        if info.name == "__main__":
            continue
        names.append(f"metaweight.{info.name}")
    return names


def _doctests() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder()
    tests = []
    for name in _modules():
        try:
            module = importlib.import_module(name)
        except ImportError:  # an optional integration (lightning) that is not installed
            continue
        tests.extend(t for t in finder.find(module) if t.examples)
    return sorted(tests, key=lambda t: t.name)


DOCTESTS = _doctests()


def _input_width(model: mw.MultiExit) -> int | None:
    """The number of features the first stage takes, where its first layer is an ``nn.Linear``."""
    for module in model.stages[0].modules():
        if isinstance(module, nn.Linear):
            return module.in_features
        if not isinstance(module, nn.Sequential):
            return None
    return None


def test_the_package_has_docstring_examples() -> None:
    names = {t.name for t in DOCTESTS}
    assert metaweight.__file__.startswith(str(Path(__file__).resolve().parents[1]))  # this checkout's package
    for expected in ("metaweight", "metaweight._weighting.LossWeighting", "metaweight._sdn.SDNSchedule",
                     "metaweight._multiexit.MultiExit", "metaweight._early_exit.EarlyExit"):
        assert expected in names


@pytest.mark.parametrize("test", DOCTESTS, ids=[t.name for t in DOCTESTS])
def test_docstring_example_runs(test: doctest.DocTest, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[mw.MultiExit] = []
    init = mw.MultiExit.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(mw.MultiExit, "__init__", recording_init)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    failures: list[str] = []

    def report(out: str) -> None:
        failures.append(out)

    test = doctest.DocTest(test.examples, dict(test.globs), test.name, test.filename, test.lineno, test.docstring)
    result = runner.run(test, out=report, clear_globs=False)
    assert result.failed == 0, "".join(failures)
    for model in built:
        width = _input_width(model)
        if width is None:
            continue
        with torch.no_grad():
            try:
                logits = model.eval()(torch.randn(2, width))
            except RuntimeError as error:
                pytest.fail(f"{test.name} builds a MultiExit whose stages do not chain: {error}")
        assert len(logits) == len(model.stages)
