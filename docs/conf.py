"""Sphinx configuration of the scfm documentation."""

from __future__ import annotations

import os
from importlib.metadata import version as _version

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

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}
master_doc = "index"
exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]

autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False

myst_enable_extensions = ["colon_fence", "dollarmath"]
# Tutorials are executed when SCFM_DOCS_EXECUTE=1 (CI's docs job); a plain build only renders.
nb_execution_mode = "cache" if os.environ.get("SCFM_DOCS_EXECUTE") == "1" else "off"
nb_execution_timeout = 600
# A tutorial that stops working fails the docs build (and CI) instead of rendering a traceback.
nb_execution_raise_on_error = True

intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "scvi": ("https://docs.scvi-tools.org/en/stable/", None),
    "torch": ("https://pytorch.org/docs/stable/", None),
}
# Cross-links to other projects need their inventories from the network: only where
# SCFM_DOCS_INTERSPHINX=1 (CI here is offline).
if os.environ.get("SCFM_DOCS_INTERSPHINX") == "1":
    extensions.append("sphinx.ext.intersphinx")
suppress_warnings = ["myst.header"]

html_theme = "alabaster"
html_title = "scfm"
