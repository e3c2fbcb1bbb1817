"""The API reference renders docstrings with their parameters (not raw RST), cheaply.

The test builds a one-page Sphinx project with the real ``docs/conf.py`` and templates and
the models section of ``docs/api.md``; ``.ci/run`` builds the whole site (tutorials
executed) and runs ``test_built_site`` on it.
"""

from __future__ import annotations

import html
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

DOCS = REPO / "docs"
SUBPACKAGES = ("model", "tl", "pl", "datasets")


def _text(page: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", page.read_text()))


def _assert_geneformer_page(page: Path) -> None:
    text = _text(page)
    assert ".. autoclass::" not in text and ".. autosummary::" not in text  # rendered, not raw
    assert "Parameters" in text
    for documented in (
        "adata",
        "config",
        "dictionaries",
        "collapse_gene_ids",  # constructor parameters
        "from_pretrained",
        "get_latent_representation",
        "embed_genes",
        "finetune",
        "predict",  # the shared API, inherited from the base
        "hidden_layer",
        "key_added",
    ):
        assert documented in text, documented


def test_api_page_lists_every_public_name():
    """docs/api.md names everything the user-facing subpackages export (or their package)."""
    import importlib
    import importlib.util

    api = (DOCS / "api.md").read_text()
    missing = []
    for sub in SUBPACKAGES:
        module = importlib.import_module(f"scfm.{sub}")
        missing += [f"scfm.{sub}.{n}" for n in module.__all__ if f"scfm.{sub}.{n}" not in api]
    for package in ("scfm.data", "scfm.io", "scfm.errors", "scfm.module", "scfm.nn", "scfm.hub"):
        if importlib.util.find_spec(package) is not None:
            assert re.search(rf"^\s+{re.escape(package)}$", api, re.M), package
    assert not missing, f"not in docs/api.md: {missing}"


def test_geneformer_api_page_renders_its_parameters(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "conf.py").write_text((DOCS / "conf.py").read_text())
    (src / "_templates").symlink_to(DOCS / "_templates", target_is_directory=True)
    (src / "references.bib").symlink_to(DOCS / "references.bib")
    (src / "index.md").write_text(
        "# scfm\n\n```{eval-rst}\n.. autosummary::\n   :toctree: generated\n"
        "   :template: model_class\n\n   scfm.model.Geneformer\n```\n\n"
        "```{bibliography}\n```\n"
    )
    out = tmp_path / "html"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-q",
            "-b",
            "html",
            "-D",
            "nb_execution_mode=off",
            str(src),
            str(out),
        ],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "SCFM_DOCS_EXECUTE": "0"},
    )
    assert done.returncode == 0, done.stderr
    _assert_geneformer_page(out / "generated" / "scfm.model.Geneformer.html")
    assert not (src / "generated" / "scfm.model.Geneformer.md").exists()  # RST stubs, .rst


def test_built_site(request):
    """After the full docs build (``.ci/run``): API pages rendered, tutorials executed."""
    site = DOCS / "_build" / "html"
    if not (site / "index.html").exists():
        pytest.skip("docs/_build/html does not exist: build the docs first (.ci/run does)")
    _assert_geneformer_page(site / "generated" / "scfm.model.Geneformer.html")
    for name in ("Geneformer", "ScFoundation", "CellFM", "ScCello", "CellPLM"):
        assert "Parameters" in _text(site / "generated" / f"scfm.model.{name}.html"), name
    for page in sorted((site / "models").glob("*.html")) + sorted(
        (site / "tutorials").glob("*.html")
    ):
        text = page.read_text()
        assert "cell_output" in text, f"{page.name} shows no executed outputs"
        assert "Traceback" not in _text(page), f"{page.name} shows a traceback"
