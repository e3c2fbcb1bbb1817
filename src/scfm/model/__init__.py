"""User-facing models: one scvi-tools ``BaseModelClass`` per foundation model."""

from ._cellfm import CellFM
from ._cellplm import CellPLM
from ._geneformer import Geneformer
from ._sccello import ScCello
from ._scfoundation import ScFoundation

__all__: list[str] = ["CellFM", "CellPLM", "Geneformer", "ScCello", "ScFoundation"]
