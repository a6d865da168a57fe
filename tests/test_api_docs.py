"""Every public name has a docstring that mentions each of its arguments, and is in the API reference."""

import inspect
import re
from pathlib import Path

import pytest

import metaweight as mw

API_PAGE = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
DATA = {"METHODS", "WEIGHTINGS"}


@pytest.mark.parametrize("name", sorted(set(mw.__all__) - DATA))
def test_public_name_documents_its_arguments(name):
    obj = getattr(mw, name)
    doc = inspect.getdoc(obj) or ""
    assert len(doc) > 20, f"{name} has no docstring"
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return
    undocumented = [p for p in params if p not in ("self", "args", "kwargs") and not re.search(rf"\b{p}\b", doc)]
    assert not undocumented, f"{name}: arguments not described in the docstring: {undocumented}"


@pytest.mark.parametrize("name", sorted(set(mw.__all__) - DATA))
def test_public_name_is_in_the_api_reference(name):
    assert f"metaweight.{name}" in API_PAGE, f"{name} is missing from docs/api.md"


def test_all_is_sorted_and_complete():
    assert list(mw.__all__) == sorted(mw.__all__)
    public = {n for n in dir(mw) if not n.startswith("_") and n not in {"annotations"}}
    modules = {n for n in public if inspect.ismodule(getattr(mw, n))}
    assert public - modules - {"__version__"} <= set(mw.__all__)
