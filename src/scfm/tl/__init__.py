"""Downstream tasks working on ``(model, adata)``; results are written with ``key_added``."""

from ._benchmark import benchmark_embeddings
from ._cellfm_integration import cellfm_integration
from ._enhance_depth import enhance_depth
from ._gene_function import GeneFunctionResult, gene_function
from ._imputation import impute, impute_spatial
from ._label_transfer import transfer_labels
from ._marker_genes import marker_genes
from ._novel_cell_types import classify_novel_cell_types
from ._perturbation import in_silico_perturbation, perturb_tokens
from ._scfoundation_perturbation import scfoundation_gears_embeddings

__all__: list[str] = [
    "GeneFunctionResult",
    "benchmark_embeddings",
    "cellfm_integration",
    "classify_novel_cell_types",
    "enhance_depth",
    "gene_function",
    "impute",
    "impute_spatial",
    "in_silico_perturbation",
    "marker_genes",
    "perturb_tokens",
    "scfoundation_gears_embeddings",
    "transfer_labels",
]
from ._perturbation_stats import perturbation_statistics

__all__ += ["perturbation_statistics"]
