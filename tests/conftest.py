"""Shared test helpers: paths to the parity fixtures and the real data in ../shared."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"
DATA = SHARED / "data"


def fixture_dir(model: str) -> Path:
    """``../shared/fixtures/<model>``, or skip the test when it is absent (user checkout)."""
    path = FIXTURES / model
    if not path.is_dir():
        pytest.skip(f"parity fixture {path} is absent (only CI and developers have ../shared)")
    return path


def data_file(name: str) -> Path:
    """``../shared/data/<name>``, or skip the test when it is absent."""
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"data file {path} is absent (only CI and developers have ../shared)")
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests with one torch thread (restored afterwards).

    On a 2-core machine shared by parallel jobs, two spinning threads per job thrash.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _quiet_scvi(monkeypatch):
    """Keep scvi-tools / lightning quiet and deterministic in tests."""
    import scvi

    monkeypatch.setattr(scvi.settings, "progress_bar_style", "tqdm", raising=False)
    yield
