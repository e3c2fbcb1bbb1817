"""Sphinx configuration of the scfm documentation.

``python -m sphinx -b html docs docs/_build/html`` builds everything and EXECUTES the
tutorials (myst-nb, cached in ``docs/_build/.jupyter_cache``); a failing cell fails the build.
``SCFM_DOCS_EXECUTE=0`` renders them without running anything (a quick look at the text).
"""

from __future__ import annotations

import os
from importlib.metadata import version as _version
from pathlib import Path

project = "scfm"
author = "scfm developers"
copyright = "2026, scfm developers"
release = _version("scfm")

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinxcontrib.bibtex",
]
bibtex_bibfiles = ["references.bib"]
bibtex_reference_style = "author_year"

# ".rst" first: autosummary writes its stub pages (RST) with the first suffix whose parser
# reads reStructuredText. With ".md" first they were written as .md and rendered as raw text.
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"
exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store", "README.md"]
templates_path = ["_templates"]

# API reference: one page per public object, with every public method and its parameters.
autosummary_generate = True
autosummary_imported_members = False
# Package pages list what the package exports in __all__ (re-exported from private modules).
autosummary_ignore_module_all = False
autodoc_member_order = "groupwise"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_default_options = {"members": True, "show-inheritance": True}
autoclass_content = "class"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False

myst_enable_extensions = ["colon_fence", "dollarmath"]
# Tutorials are executed in every build (cached by content); a cell that raises fails the
# build instead of rendering a traceback. SCFM_DOCS_EXECUTE=0 switches execution off.
nb_execution_mode = "off" if os.environ.get("SCFM_DOCS_EXECUTE") == "0" else "cache"
# Next to the HTML (relative paths would be taken from the working directory).
nb_execution_cache_path = str(Path(__file__).parent / "_build" / ".jupyter_cache")
nb_execution_timeout = 900
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True

intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "scvi": ("https://docs.scvi-tools.org/en/stable/", None),
    "torch": ("https://pytorch.org/docs/stable/", None),
}
# Cross-links to other projects need their inventories from the network: only where
# SCFM_DOCS_INTERSPHINX=1 (the CI machines here are offline).
if os.environ.get("SCFM_DOCS_INTERSPHINX") == "1":
    extensions.append("sphinx.ext.intersphinx")
suppress_warnings = ["myst.header"]
nitpicky = False

html_theme = "alabaster"
html_title = "scfm"
html_theme_options = {"page_width": "1100px", "sidebar_width": "240px"}
