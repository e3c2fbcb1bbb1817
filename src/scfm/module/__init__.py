"""Networks and losses: one ``BaseModuleClass`` per foundation model."""

from ._cellfm import CellFMModule
from ._cellplm import CellPLMConfig, CellPLMModule
from ._geneformer import GeneformerModule
from ._sccello import ScCelloConfig, ScCelloModule
from ._scfoundation import ScFoundationConfig, ScFoundationModule

__all__: list[str] = [
    "CellFMModule",
    "CellPLMConfig",
    "CellPLMModule",
    "GeneformerModule",
    "ScCelloConfig",
    "ScCelloModule",
    "ScFoundationConfig",
    "ScFoundationModule",
]
