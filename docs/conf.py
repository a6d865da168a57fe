"""Sphinx configuration: API reference from the docstrings (autodoc + napoleon), guides in Markdown (MyST)."""

import metaweight

project = "metaweight"
author = "the metaweight developers"
release = version = metaweight.__version__
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["dollarmath", "amsmath"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_inherit_docstrings = False
html_theme = "furo"
html_title = "metaweight"
