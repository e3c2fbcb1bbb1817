"""Gene vocabularies, gene-id mapping, tokenizers and AnnData checks."""

from ._cellfm_tokenize import CellFMTokens, cellfm_mask_tokens, cellfm_normalize, cellfm_tokenize
from ._cellplm_sentences import (
    cellplm_gumbel_noise,
    cellplm_pack_sentences,
    cellplm_sentence_ids,
    spatial_tiles,
)
from ._geneformer_tokenizer import (
    GeneformerDictionaries,
    geneformer_gene_tokens,
    load_geneformer_dictionaries,
    rank_value_encode,
)
from ._genes import (
    GeneAlignment,
    align_genes,
    detect_id_type,
    gene_table,
    map_gene_ids,
    strip_version,
)
from ._ontology import (
    CellOntology,
    load_cell_ontology,
    personalized_pagerank,
    ppr_to_levels,
    read_cl_json,
    read_cl_owl,
)
from ._scfoundation_tokenizer import (
    parse_tgthighres,
    scfoundation_align_counts,
    scfoundation_gather,
    scfoundation_preprocess,
)
from ._soma import CENSUS_BIONEMO_FILTER, SomaDataModule, embed_soma, soma_template
from ._validation import check_anndata, check_counts, check_obs_keys, check_spatial

__all__ = [
    "CENSUS_BIONEMO_FILTER",
    "CellFMTokens",
    "CellOntology",
    "GeneAlignment",
    "GeneformerDictionaries",
    "SomaDataModule",
    "align_genes",
    "cellfm_mask_tokens",
    "cellfm_normalize",
    "cellfm_tokenize",
    "cellplm_gumbel_noise",
    "cellplm_pack_sentences",
    "cellplm_sentence_ids",
    "check_anndata",
    "check_counts",
    "check_obs_keys",
    "check_spatial",
    "detect_id_type",
    "embed_soma",
    "gene_table",
    "geneformer_gene_tokens",
    "load_cell_ontology",
    "load_geneformer_dictionaries",
    "map_gene_ids",
    "parse_tgthighres",
    "personalized_pagerank",
    "ppr_to_levels",
    "rank_value_encode",
    "read_cl_json",
    "read_cl_owl",
    "scfoundation_align_counts",
    "scfoundation_gather",
    "scfoundation_preprocess",
    "soma_template",
    "spatial_tiles",
    "strip_version",
]
