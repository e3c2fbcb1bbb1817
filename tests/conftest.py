"""Shared test helpers: paths to the vendored parity fixtures and real data in tests/data."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = Path(__file__).resolve().parent / "data"
FIXTURES = TEST_DATA / "fixtures"
DATA = TEST_DATA / "data"


def fixture_dir(model: str) -> Path:
    """``tests/data/fixtures/<model>``: the vendored parity fixture (see tests/data/README.md)."""
    path = FIXTURES / model
    if not path.is_dir():
        raise FileNotFoundError(f"parity fixture {path} is missing from the repository")
    return path


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` resident in this process's memory mappings (Linux ``smaps``)."""
    total, mapped = 0, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                mapped = line.rstrip().endswith(str(path))
            elif mapped and line.startswith("Rss:"):
                total += int(head[1]) * 1024
    return total


#: Skip marker of the tests that read ``/proc/self/smaps``.
needs_smaps = pytest.mark.skipif(
    not Path("/proc/self/smaps").exists(), reason="reads Linux /proc/self/smaps"
)


def data_file(name: str) -> Path:
    """``tests/data/data/<name>``: a vendored real data file (see tests/data/README.md)."""
    path = DATA / name
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} is missing from the repository")
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


@pytest.fixture(autouse=True)
def _seeded():
    """Seed the global generators before every test.

    Random initial weights and training draws then do not depend on which tests ran before
    (the order, ``-k`` selections and a test added elsewhere would otherwise change them).
    """
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)  # noqa: NPY002 (the legacy global state is what unseeded callers draw from)
    torch.manual_seed(0)
