"""Gene vocabularies, gene-id mapping, tokenizers and AnnData checks."""

from ._genes import GeneAlignment, align_genes, detect_id_type, gene_table, map_gene_ids, strip_version
from ._validation import check_anndata, check_counts, check_obs_keys, check_spatial

__all__ = [
    "GeneAlignment",
    "align_genes",
    "check_anndata",
    "check_counts",
    "check_obs_keys",
    "check_spatial",
    "detect_id_type",
    "gene_table",
    "map_gene_ids",
    "strip_version",
]
