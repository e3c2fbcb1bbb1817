"""scfm: single-cell foundation models as scverse / scvi-tools models."""

from importlib.metadata import PackageNotFoundError, version

from . import data, datasets, errors, io, model, module, nn, pl, tl

try:
    __version__ = version("scfm")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["__version__", "data", "datasets", "errors", "io", "model", "module", "nn", "pl", "tl"]
