"""Plots of scfm results (matplotlib / scanpy style)."""

from ._benchmark import benchmark
from ._perturbation import perturbation_shifts
from ._sccello import novel_cell_types

__all__: list[str] = ["benchmark", "novel_cell_types", "perturbation_shifts"]
from ._perturbation import perturbation_top_genes

__all__ += ["perturbation_top_genes"]
