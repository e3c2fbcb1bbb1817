"""User-facing models: one scvi-tools ``BaseModelClass`` per foundation model.

Each class is imported on first use, so ``import scfm.model`` stays cheap and one model's
import cost is paid only by its users.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Class name -> private module defining it.
_MODELS = {
    "CellFM": "_cellfm",
    "CellPLM": "_cellplm",
    "Geneformer": "_geneformer",
    "ScCello": "_sccello",
    "ScFoundation": "_scfoundation",
}

if TYPE_CHECKING:  # pragma: no cover - static analysers see the eager imports
    from ._cellfm import CellFM
    from ._cellplm import CellPLM
    from ._geneformer import Geneformer
    from ._sccello import ScCello
    from ._scfoundation import ScFoundation


def __getattr__(name: str) -> Any:
    """Import ``scfm.model.<Name>`` on first access (PEP 562)."""
    if name in _MODELS:
        cls = getattr(importlib.import_module(f"{__name__}.{_MODELS[name]}"), name)
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODELS])


__all__: list[str] = ["CellFM", "CellPLM", "Geneformer", "ScCello", "ScFoundation"]
