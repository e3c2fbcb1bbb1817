"""Reader of scCello releases: an HF directory plus the reference repository's ``data/`` files.

A release directory holds ``config.json`` and ``pytorch_model.bin`` or ``model.safetensors``
(HF ``PrototypeContrastiveForMaskedLM.save_pretrained``). The vocabulary, medians, label maps
and ontology files live in the reference repository's ``data/`` folder, looked up as
``<dir>/data`` or passed as ``data_dir``:

``token_vocabulary/token_dictionary.pkl``
    Ensembl id -> token id with ``<pad>`` = 0, ``<mask>`` = 1; ``<cls>`` is not stored and is
    appended as ``len(dict)``.
``token_vocabulary/gene_median_dictionary.pkl``
    Ensembl id -> non-zero median.
``new_pretrain/pretrain_frac100_clid2name.pkl``
    CL id -> pretraining label id (the rows of ``ctgraph_sim``); ``frac100`` is the
    ``data_branch`` of ``config.json``.
``new_pretrain/general_CLid2cellname.pkl``
    Set of ``(name, CL id)`` pairs.
``cell_taxonomy/cl.owl`` and ``cell_taxonomy/celltype_relationship.json``
    The Cell Ontology graph and Cell Taxonomy names (used to map names to CL ids).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scfm.errors import CheckpointFormatError, CheckpointNotFoundError
from scfm.io._common import (
    _RestrictedUnpickler,
    load_pickle_dict,
    load_safetensors_file,
    load_torch_file,
    resolve_local_path,
)

logger = logging.getLogger(__name__)

__all__ = ["ScCelloRelease", "convert_sccello_state_dict", "read_sccello_release"]

#: Token names of the scCello vocabulary.
PAD_TOKEN, MASK_TOKEN, CLS_TOKEN = "<pad>", "<mask>", "<cls>"

#: Checkpoint keys that hold nothing the model uses: the position-id buffer (an arange), the
#: reference's never-called ``binary_ce_loss_transform_*`` layers and the sequence
#: classification class's pooler (its forward ignores it).
_UNUSED_PREFIXES = (
    "bert.embeddings.position_ids",
    "binary_ce_loss_transform_cell.",
    "binary_ce_loss_transform_prototype.",
    "binary_ce_loss_transform_cellprot.",
    "bert.pooler.",
)
#: The two prediction heads whose ``bias`` is shared with ``dense_2.bias`` in the reference.
_TIED_HEADS = ("cls", "cell_cls")

_DATA_FILES = {
    "token_dictionary": "token_vocabulary/token_dictionary.pkl",
    "gene_medians": "token_vocabulary/gene_median_dictionary.pkl",
    # {branch} is config.json's data_branch ("frac100" in the release)
    "clid2labelid": "new_pretrain/pretrain_{branch}_clid2name.pkl",
    "clid2cellname": "new_pretrain/general_CLid2cellname.pkl",
    "ontology": "cell_taxonomy/cl.owl",
    "taxonomy": "cell_taxonomy/celltype_relationship.json",
}


@dataclass
class ScCelloRelease:
    """Everything read from an scCello release.

    Attributes
    ----------
    config
        The raw ``config.json``.
    state_dict
        Weights renamed onto :class:`~scfm.module.ScCelloModule` (head-bias tie restored).
    token_dictionary
        Token name -> id, ``<cls>`` included.
    gene_medians
        Ensembl id -> non-zero median.
    label_clids
        CL id of each pretraining label id (position = label id); ``None`` if no label map.
    cell_type_names
        CL id -> cell-type name of the pretraining labels.
    taxonomy_names
        Lower-cased Cell Taxonomy name -> CL id (the reference's name lookup).
    ontology_path
        The release's ``cl.owl`` if present.
    """

    config: dict
    state_dict: dict[str, torch.Tensor]
    token_dictionary: dict[str, int]
    gene_medians: dict[str, float]
    label_clids: list[str] | None = None
    cell_type_names: dict[str, str] = field(default_factory=dict)
    taxonomy_names: dict[str, str] = field(default_factory=dict)
    ontology_path: str | None = None


def convert_sccello_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a reference state dict onto :class:`~scfm.module.ScCelloModule` names.

    Unused entries are dropped (see ``_UNUSED_PREFIXES``). For each head the shared bias is
    stored under ``<head>.predictions.bias``: a file written by ``save_pretrained`` with
    safetensors (transformers < 4.40) keeps only that alias, a ``.bin`` keeps both, so a
    missing ``dense_2.bias`` is filled from ``bias`` (and vice versa) instead of staying zero.

    Raises
    ------
    CheckpointFormatError
        If both aliases are present but differ (the file was not written by scCello).
    """
    out = {k: v for k, v in state_dict.items() if not k.startswith(_UNUSED_PREFIXES)}
    for head in _TIED_HEADS:
        bias_key = f"{head}.predictions.bias"
        alias_key = f"{head}.predictions.dense_2.bias"
        alias = out.pop(alias_key, None)
        if alias is None:
            if bias_key in out:
                logger.info(
                    "Restored the tie %s = %s (alias absent from file).", alias_key, bias_key
                )
            continue
        bias = out.get(bias_key)
        if bias is None:
            out[bias_key] = alias
        elif bias.shape != alias.shape or not torch.equal(bias, alias):
            raise CheckpointFormatError(
                f"{bias_key} and {alias_key} differ, but scCello shares one bias between "
                "them. The checkpoint was modified or is not an scCello release."
            )
    return out


def _load_weights(directory: Path, trust_checkpoint: bool) -> dict[str, torch.Tensor]:
    safetensors_file = directory / "model.safetensors"
    bin_file = directory / "pytorch_model.bin"
    if safetensors_file.is_file():
        return load_safetensors_file(safetensors_file)
    if bin_file.is_file():
        state = load_torch_file(bin_file, trust_checkpoint=trust_checkpoint)
        if not isinstance(state, dict):
            raise CheckpointFormatError(f"{str(bin_file)!r} does not hold a state dict.")
        return state
    raise CheckpointNotFoundError(
        f"No model.safetensors or pytorch_model.bin in {str(directory)!r}. Download the "
        "scCello release (e.g. katarinayuan/scCello-zeroshot) and pass its directory."
    )


def _load_plain_pickle(path: Path, what: str) -> object:
    """A pickle of plain data that may be a set (``general_CLid2cellname.pkl``)."""
    try:
        with open(path, "rb") as fh:
            return _RestrictedUnpickler(fh).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as err:
        raise CheckpointFormatError(f"The {what} {str(path)!r} cannot be read ({err}).") from None


def _find_data_dir(directory: Path, data_dir: str | os.PathLike | None) -> Path | None:
    if data_dir is not None:
        return resolve_local_path(data_dir, what="scCello data directory")
    for candidate in (directory / "data", directory):
        if (candidate / _DATA_FILES["token_dictionary"]).is_file():
            return candidate
    return None


def read_sccello_release(
    path: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    trust_checkpoint: bool = False,
) -> ScCelloRelease:
    """Read an scCello release directory (weights, config, vocabulary, label maps).

    Parameters
    ----------
    path
        HF directory with ``config.json`` and ``pytorch_model.bin`` / ``model.safetensors``.
    data_dir
        The reference repository's ``data/`` folder; default ``<path>/data``. Without it the
        Geneformer V1 dictionaries shipped with scfm are used (scCello's vocabulary is
        Geneformer's) and no label map is available.
    trust_checkpoint
        Allow full unpickling of a ``.bin`` that ``weights_only`` loading refuses.

    Raises
    ------
    CheckpointNotFoundError
        If the config or the weights are missing.
    CheckpointFormatError
        If a file is unreadable or inconsistent with the others.
    """
    directory = resolve_local_path(path)
    if directory.is_file():
        directory = directory.parent
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointNotFoundError(
            f"{str(directory)!r} has no config.json. Pass the scCello release directory "
            "(config.json + pytorch_model.bin or model.safetensors)."
        )
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointFormatError(f"{str(config_file)!r} is not valid JSON ({err}).") from None
    state_dict = convert_sccello_state_dict(_load_weights(directory, trust_checkpoint))

    data = _find_data_dir(directory, data_dir)
    if data is None:
        from scfm.data._geneformer_tokenizer import load_geneformer_dictionaries

        logger.warning(
            "No scCello data/ folder in %s: using the Geneformer V1 dictionaries shipped with "
            "scfm (scCello's vocabulary) and no pretraining label map. Pass data_dir= to use "
            "the release's files.",
            directory,
        )
        dicts = load_geneformer_dictionaries(version="V1")
        tokens = dict(dicts.token_dictionary)
        medians = dict(dicts.gene_median_dictionary)
        label_clids, names, taxonomy, ontology = None, {}, {}, None
    else:
        tokens = {
            str(k): int(v)
            for k, v in load_pickle_dict(
                data / _DATA_FILES["token_dictionary"], what="scCello token dictionary"
            ).items()
        }
        medians = {
            str(k): float(v)
            for k, v in load_pickle_dict(
                data / _DATA_FILES["gene_medians"], what="scCello gene median dictionary"
            ).items()
        }
        label_clids, names = _read_labels(data, str(config.get("data_branch", "frac100")))
        taxonomy = _read_taxonomy_names(data / _DATA_FILES["taxonomy"])
        owl = data / _DATA_FILES["ontology"]
        ontology = str(owl) if owl.is_file() else None
    if CLS_TOKEN not in tokens:
        # the reference appends <cls> after the stored tokens
        tokens[CLS_TOKEN] = len(tokens)
    vocab_size = int(config.get("vocab_size", len(tokens)))
    if max(tokens.values()) + 1 != vocab_size:
        raise CheckpointFormatError(
            f"The token dictionary has {max(tokens.values()) + 1} tokens (with <cls>) but "
            f"config.json says vocab_size={vocab_size}. Pass the data/ folder of this release."
        )
    if label_clids is not None and "ctgraph_sim" in state_dict:
        n = state_dict["ctgraph_sim"].shape[0]
        if n != len(label_clids):
            raise CheckpointFormatError(
                f"The label map has {len(label_clids)} cell types but the checkpoint's "
                f"ctgraph_sim has {n}. Pass the data/ folder of this release."
            )
    return ScCelloRelease(
        config=config,
        state_dict=state_dict,
        token_dictionary=tokens,
        gene_medians=medians,
        label_clids=label_clids,
        cell_type_names=names,
        taxonomy_names=taxonomy,
        ontology_path=ontology,
    )


def _read_labels(data: Path, branch: str) -> tuple[list[str] | None, dict[str, str]]:
    """Label id order of the pretraining CL ids, and their names."""
    label_file = data / _DATA_FILES["clid2labelid"].format(branch=branch)
    if not label_file.is_file():
        return None, {}
    clid2label = load_pickle_dict(label_file, what="scCello label map")
    ids = sorted(int(v) for v in clid2label.values())
    if ids != list(range(len(ids))):
        raise CheckpointFormatError(
            f"{str(label_file)!r} does not map onto label ids 0..{len(ids) - 1}."
        )
    label_clids = [""] * len(ids)
    for clid, label in clid2label.items():
        label_clids[int(label)] = str(clid)
    names: dict[str, str] = {}
    name_file = data / _DATA_FILES["clid2cellname"]
    if name_file.is_file():
        pairs = _load_plain_pickle(name_file, "scCello cell-type name map")
        if isinstance(pairs, dict):
            pairs = pairs.items()
        for name, clid in pairs:  # type: ignore[union-attr]
            names[str(clid)] = str(name)
    return label_clids, names


def _read_taxonomy_names(path: Path) -> dict[str, str]:
    """Lower-cased name -> CL id from Cell Taxonomy's ``celltype_relationship.json``."""
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointFormatError(f"{str(path)!r} is not valid JSON ({err}).") from None
    clid2name: dict[str, str] = {}
    for entry in entries:
        if isinstance(entry, dict) and "id" in entry and "name" in entry:
            clid2name.setdefault(str(entry["id"]), str(entry["name"]))
    # as the reference's dict comprehension: a later id wins for a shared name
    return {name.lower(): clid for clid, name in clid2name.items()}
