"""Every code block of README.md and docs/ runs as written, so the docs cannot drift.

How the blocks are run:

* ``python`` blocks of one file run in order in ONE namespace, ``bash`` blocks through
  ``bash -e`` (each line a command), both in a fresh temporary folder (the reader's working
  directory). Executed tutorial cells (myst-nb ``{code-cell}``) are run by the docs build and
  by the slow test at the end.
* What a block names that a reader has and the test does not is put in that folder first:
  **release folders** are links to the tiny parity fixtures of the same format
  (``tests/data/fixtures/<model>/checkpoint``, table ``RELEASES``), data files are copies of
  the fixtures' inputs (``DATA``; on a model's own page, ``docs/models/<model>.md``,
  ``counts.h5ad`` is that model's fixture input, whose genes its tiny vocabulary knows).
  The fixtures' CellFM is 64 wide, so its head count (stored in no CellFM checkpoint) is
  passed for it (``FIXTURE_OPTIONS``).
* The README's one example "for every model" runs once per model with the class name and
  release folder changed, exactly as the README tells the reader to.
* An HTML comment right before a block, ``<!-- docs-test: skip (reason) -->`` or
  ``<!-- docs-test: slow (reason) -->``, skips it (it installs packages, needs the network or a
  GPU) or runs it only in the slow test. The reasons are in the docs, next to the block.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import FIXTURES, REPO

DOCS = REPO / "docs"
#: Release folder named in the docs -> fixture of the same format.
RELEASES = {
    "Geneformer-V2-104M": "geneformer",
    "scFoundation": "scfoundation",
    "CellFM": "cellfm",
    "scCello": "sccello",
    "CellPLM": "cellplm",
}
#: Data files named in the docs -> fixture whose input stands in for it.
DATA = {
    "counts.h5ad": "geneformer",
    "section.h5ad": "cellplm",
}
#: from_pretrained options the tiny fixtures need and the releases do not.
FIXTURE_OPTIONS = {"CellFM": {"n_heads": 4}}
#: The README example run for every model: class name, release folder, input of its fixture.
EVERY_MODEL = {
    "Geneformer": ("Geneformer-V2-104M/", "geneformer"),
    "ScFoundation": ("scFoundation/", "scfoundation"),
    "CellFM": ("CellFM/", "cellfm"),
    "ScCello": ("scCello/", "sccello"),
    "CellPLM": ("CellPLM/", "cellplm"),
}

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)\s*(?P<info>[^\n`]*)$")
_MARK = re.compile(r"<!--\s*docs-test:\s*(?P<what>skip|slow)\b(?P<why>[^>]*)-->")


@dataclass
class Block:
    path: Path
    line: int
    lang: str  # "python", "bash" or "code-cell"
    code: str
    mark: str | None  # None, "skip" or "slow"

    def __str__(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def doc_files() -> list[Path]:
    files = [REPO / "README.md"]
    for path in sorted(DOCS.rglob("*.md")):
        if not any(
            part.startswith(("_", ".")) or part == "generated"
            for part in path.parts[len(DOCS.parts) :]
        ):
            files.append(path)
    return files


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a markdown file (python, bash, myst code-cells)."""
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info = m["fence"], m["info"].strip()
        start = i
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(m["indent"]) :])
            i += 1
        i += 1
        lang = info.split()[0] if info else ""
        if lang.startswith("{code-cell}"):
            lang = "code-cell"
            body = [b for b in body if not b.startswith(":")]  # cell options
        if lang not in ("python", "bash", "code-cell"):
            continue
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        mark = _MARK.search(previous)
        out.append(Block(path, start + 1, lang, "\n".join(body), mark["what"] if mark else None))
    return out


def _reader_folder(tmp: Path) -> Path:
    """A working directory with the release folders and data files the docs name."""
    for name, model in RELEASES.items():
        (tmp / name).symlink_to(FIXTURES / model / "checkpoint", target_is_directory=True)
    for name, model in DATA.items():
        shutil.copyfile(FIXTURES / model / "input.h5ad", tmp / name)
    return tmp


@pytest.fixture
def reader(tmp_path, monkeypatch):
    """Run in a reader's folder; ``from_pretrained`` of a fixture gets its extra options."""
    import scfm.model
    from scfm.model.base import FoundationModelMixin

    folder = _reader_folder(tmp_path)
    monkeypatch.chdir(folder)
    original = FoundationModelMixin.from_pretrained.__func__

    def from_pretrained(cls, path, adata, **options):
        for name, extra in FIXTURE_OPTIONS.items():
            if cls is getattr(scfm.model, name):
                options = {**extra, **options}
        return original(cls, path, adata, **options)

    monkeypatch.setattr(FoundationModelMixin, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return folder


def _reader_folder_data(folder: Path, page: Path) -> None:
    """The data files of ``page`` (a model page reads its model's fixture input)."""
    if page.parent.name == "models" and (FIXTURES / page.stem).is_dir():
        shutil.copyfile(FIXTURES / page.stem / "input.h5ad", folder / "counts.h5ad")


def _run_bash(block: Block, cwd: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["PYTHONWARNINGS"] = "ignore"
    if "CellFM" in block.code and "--option n_heads" not in block.code:
        block.code = block.code.replace("--model CellFM", "--model CellFM --option n_heads=4")
    done = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", block.code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, f"{block} failed:\n{block.code}\n{done.stdout}\n{done.stderr}"


def _run_python(block: Block, namespace: dict) -> None:
    code = compile(block.code, str(block), "exec")
    try:
        exec(code, namespace)
    except Exception as err:
        raise AssertionError(f"{block} failed:\n{block.code}") from err


def _run_file(path: Path, folder: Path, *, slow: bool) -> int:
    import matplotlib

    matplotlib.use("Agg")
    namespace: dict = {"__name__": "__docs__"}
    n = 0
    for block in blocks(path):
        if block.mark == "skip" or (block.mark == "slow" and not slow):
            continue
        if block.lang == "code-cell" and not slow:
            continue
        if block.lang == "bash":
            _run_bash(block, folder)
        else:
            _run_python(block, namespace)
        n += 1
    matplotlib.pyplot.close("all")
    return n


# --------------------------------------------------------------------------- tests
def test_blocks_are_found_and_every_mark_has_a_reason():
    found = {path: blocks(path) for path in doc_files()}
    assert len(found[REPO / "README.md"]) >= 4
    for path, items in found.items():
        text = path.read_text()
        for mark in _MARK.finditer(text):
            assert mark["why"].strip().startswith("("), f"{path}: docs-test mark without reason"
        for block in items:
            assert block.code.strip(), f"{block} is empty"


@pytest.mark.parametrize(
    "path",
    [p for p in doc_files() if any(b.mark is None and b.lang != "code-cell" for b in blocks(p))],
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_code_blocks_run_as_written(path, reader):
    _reader_folder_data(reader, path)
    assert _run_file(path, reader, slow=False) > 0


@pytest.mark.parametrize("model", list(EVERY_MODEL))
def test_readme_example_works_for_every_model(model, reader):
    """The README's example, with only the class name (and release folder) changed."""
    readme = REPO / "README.md"
    example = next(b for b in blocks(readme) if b.lang == "python" and "Model = " in b.code)
    release, fixture = EVERY_MODEL[model]
    code = example.code.replace("scfm.model.Geneformer", f"scfm.model.{model}")
    code = code.replace('"Geneformer-V2-104M/"', f'"{release}"')
    shutil.copyfile(FIXTURES / fixture / "input.h5ad", reader / "counts.h5ad")
    namespace: dict = {}
    exec(compile(code, f"README example for {model}", "exec"), namespace)
    adata = namespace["adata"]
    key = f"X_{model.lower()}"
    assert adata.obsm[key].shape[0] == adata.n_obs
    assert key in adata.varm and "leiden" in adata.obs and "X_umap" in adata.obsm
    assert model.lower() in adata.uns["scfm"]["gene_alignment"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "path",
    [p for p in doc_files() if any(b.mark != "skip" for b in blocks(p))],
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_every_block_including_tutorials_and_slow_ones(path, reader, monkeypatch):
    """What the docs build executes, plus the blocks marked slow (the full demo)."""
    _reader_folder_data(reader, path)
    _run_file(path, reader, slow=True)
