"""Readers of the original checkpoint formats, mapping them strictly onto scfm modules."""

from ._common import (
    load_pickle_dict,
    load_safetensors_file,
    load_state_dict_strict,
    load_torch_file,
    resolve_local_path,
)

__all__ = [
    "load_pickle_dict",
    "load_safetensors_file",
    "load_state_dict_strict",
    "load_torch_file",
    "resolve_local_path",
]
