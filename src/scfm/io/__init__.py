"""Readers of the original checkpoint formats, mapping them strictly onto scfm modules."""

from ._bionemo import read_bionemo_geneformer
from ._cellfm import CellFMConfig, read_cellfm_checkpoint, read_cellfm_genes
from ._cellplm import (
    find_cellplm_checkpoint,
    read_cellplm_config,
    read_cellplm_release,
    read_cellplm_state_dict,
)
from ._common import (
    load_pickle_dict,
    load_safetensors_file,
    load_state_dict_strict,
    load_torch_file,
    resolve_local_path,
)
from ._geneformer import read_geneformer_checkpoint
from ._mindspore import MindSporeCheckpoint, read_mindspore_checkpoint, write_mindspore_checkpoint
from ._sccello import ScCelloRelease, convert_sccello_state_dict, read_sccello_release
from ._scfoundation import (
    read_scfoundation_checkpoint,
    read_scfoundation_gene_list,
    resolve_scfoundation_files,
)

__all__ = [
    "CellFMConfig",
    "MindSporeCheckpoint",
    "ScCelloRelease",
    "convert_sccello_state_dict",
    "find_cellplm_checkpoint",
    "load_pickle_dict",
    "load_safetensors_file",
    "load_state_dict_strict",
    "load_torch_file",
    "read_bionemo_geneformer",
    "read_cellfm_checkpoint",
    "read_cellfm_genes",
    "read_cellplm_config",
    "read_cellplm_release",
    "read_cellplm_state_dict",
    "read_geneformer_checkpoint",
    "read_mindspore_checkpoint",
    "read_sccello_release",
    "read_scfoundation_checkpoint",
    "read_scfoundation_gene_list",
    "resolve_local_path",
    "resolve_scfoundation_files",
    "write_mindspore_checkpoint",
]
