"""scfm: single-cell foundation models as scverse / scvi-tools models.

Submodules are imported on first use (``scfm.model``, ``scfm.tl``, ...), so ``import scfm``
and the ``scfm`` command line start without loading torch, scvi-tools or scanpy.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("scfm")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

#: Public submodules, imported lazily by :func:`__getattr__`.
_SUBMODULES = ("data", "datasets", "errors", "hub", "io", "model", "module", "nn", "pl", "tl")

if TYPE_CHECKING:  # pragma: no cover - static analysers see the eager imports
    from . import data, datasets, errors, hub, io, model, module, nn, pl, tl


def __getattr__(name: str) -> Any:
    """Import the submodule ``scfm.<name>`` on first access (PEP 562)."""
    if name in _SUBMODULES:
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise  # a dependency of the submodule is missing: say so
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBMODULES])


__all__ = [
    "__version__",
    "data",
    "datasets",
    "errors",
    "hub",
    "io",
    "model",
    "module",
    "nn",
    "pl",
    "tl",
]
