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
import math
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from scfm.data._genes import strip_version
from scfm.errors import CheckpointFormatError, CheckpointNotFoundError
from scfm.io._common import (
    Release,
    _RestrictedUnpickler,
    load_pickle_dict,
    load_safetensors_file,
    load_torch_file,
    resolve_local_path,
)
from scfm.module._checks import is_int

logger = logging.getLogger(__name__)

__all__ = [
    "ScCelloRelease",
    "ScCelloVocabulary",
    "convert_sccello_state_dict",
    "read_sccello_release",
    "sccello_vocabulary",
    "validate_vocabulary",
]

#: Token names of the scCello vocabulary.
PAD_TOKEN, MASK_TOKEN, CLS_TOKEN = "<pad>", "<mask>", "<cls>"

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


@dataclass(frozen=True)
class ScCelloVocabulary:
    """scCello's token vocabulary: token ids and the medians of the genes.

    Attributes
    ----------
    token_dictionary
        Token name -> id, ``<pad>`` = 0, ``<mask>`` = 1 and ``<cls>`` included; the ids are
        exactly ``0 .. n - 1``.
    gene_medians
        Ensembl id -> finite positive non-zero median.
    """

    token_dictionary: dict[str, int]
    gene_medians: dict[str, float]

    @cached_property
    def names(self) -> tuple[str, ...]:
        """Token names ordered by token id (position = id)."""
        names = [""] * len(self.token_dictionary)
        for name, token in self.token_dictionary.items():
            names[token] = name
        return tuple(names)

    def medians_by_token(self) -> np.ndarray:
        """float64 ``[n_tokens]`` median of each token's gene, ``NaN`` for non-genes."""
        return np.array([self.gene_medians.get(n, np.nan) for n in self.names], dtype=np.float64)


def validate_vocabulary(
    tokens: Mapping[object, object], medians: Mapping[object, object], *, what: str
) -> ScCelloVocabulary:
    """Check and normalise a token dictionary (``<cls>`` appended if absent) and medians.

    Raises
    ------
    CheckpointFormatError
        For non-integer or repeated token ids, ids that are not ``0 .. n - 1``, a missing
        ``<pad>`` / ``<mask>``, gene ids that repeat up to case / version, or medians that
        are not finite positive numbers.
    """
    out: dict[str, int] = {}
    for name, token in tokens.items():
        if not is_int(token):
            raise CheckpointFormatError(
                f"The {what} token dictionary maps {name!r} to {token!r}, not an integer id."
            )
        out[str(name)] = int(token)
    if CLS_TOKEN not in out:
        # the reference appends <cls> after the stored tokens
        out[CLS_TOKEN] = len(out)
    for special, expected in ((PAD_TOKEN, 0), (MASK_TOKEN, None)):
        if special not in out or (expected is not None and out[special] != expected):
            raise CheckpointFormatError(
                f"The {what} token dictionary lacks {special}"
                + (f" = {expected}" if expected is not None else "")
                + "; it is not an scCello / Geneformer V1 token dictionary."
            )
    ids = np.sort(np.fromiter(out.values(), dtype=np.int64, count=len(out)))
    if len(np.unique(ids)) < len(ids):
        repeated = sorted({int(t) for t in ids[1:][np.diff(ids) == 0]})[:5]
        raise CheckpointFormatError(
            f"The {what} token dictionary gives several genes the same token id ({repeated})."
        )
    if ids[0] != 0 or ids[-1] != len(ids) - 1:
        raise CheckpointFormatError(
            f"The {what} token ids are not 0..{len(ids) - 1} (found {ids[0]}..{ids[-1]})."
        )
    genes = [n for n in out if n not in (PAD_TOKEN, MASK_TOKEN, CLS_TOKEN)]
    normalised = strip_version(pd.Index(genes).str.upper())
    if normalised.has_duplicates:
        twice = sorted(set(normalised[normalised.duplicated()]))[:5]
        raise CheckpointFormatError(f"The {what} token dictionary lists genes twice: {twice}.")
    clean: dict[str, float] = {}
    for gene, value in medians.items():
        try:
            median = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            median = math.nan
        if not (math.isfinite(median) and median > 0):
            raise CheckpointFormatError(
                f"The {what} gene median dictionary gives {gene!r} the median {value!r}; "
                "medians must be finite positive numbers."
            )
        clean[str(gene)] = median
    if not any(g in clean for g in genes):
        raise CheckpointFormatError(
            f"No gene of the {what} token dictionary has a median: the two files do not belong "
            "together."
        )
    return ScCelloVocabulary(token_dictionary=out, gene_medians=clean)


def sccello_vocabulary(
    token_dictionary: Mapping[str, int] | None = None,
    gene_medians: Mapping[str, float] | None = None,
) -> ScCelloVocabulary:
    """The validated vocabulary; what is ``None`` comes from scfm's Geneformer V1 files."""
    if token_dictionary is None or gene_medians is None:
        from scfm.data._geneformer_tokenizer import load_geneformer_dictionaries

        shipped = load_geneformer_dictionaries(version="V1")
        token_dictionary = token_dictionary or shipped.token_dictionary
        gene_medians = gene_medians or shipped.gene_median_dictionary
    return validate_vocabulary(token_dictionary, gene_medians, what="scCello")


@dataclass
class ScCelloRelease(Release):
    """Everything read from an scCello release (a :class:`~scfm.io._common.Release`).

    ``config`` is the raw ``config.json``, ``state_dict`` the weights renamed onto
    :class:`~scfm.module.ScCelloModule` (head-bias tie restored), ``vocabulary`` a
    :class:`ScCelloVocabulary`, ``files`` the files read by role.

    Attributes
    ----------
    label_clids
        CL id of each pretraining label id (position = label id); ``None`` if no label map.
    cell_type_names
        CL id -> cell-type name of the pretraining labels.
    taxonomy_names
        Lower-cased Cell Taxonomy name -> CL id (the reference's name lookup).
    """

    label_clids: list[str] | None = None
    cell_type_names: dict[str, str] = field(default_factory=dict)
    taxonomy_names: dict[str, str] = field(default_factory=dict)

    @property
    def ontology_path(self) -> str | None:
        """The release's ``cl.owl`` if present."""
        path = self.files.get("ontology")
        return None if path is None else str(path)


def convert_sccello_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a reference state dict onto :class:`~scfm.module.ScCelloModule` names.

    Unused entries stay; the module's load rules ignore them. For each head the shared bias is
    stored under ``<head>.predictions.bias``: a file written by ``save_pretrained`` with
    safetensors (transformers < 4.40) keeps only that alias, a ``.bin`` keeps both, so a
    missing ``dense_2.bias`` is filled from ``bias`` (and vice versa) instead of staying zero.

    Raises
    ------
    CheckpointFormatError
        If both aliases are present but differ (the file was not written by scCello).
    """
    out = dict(state_dict)
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


def _load_weights(directory: Path, trust_checkpoint: bool) -> tuple[Path, dict[str, torch.Tensor]]:
    safetensors_file = directory / "model.safetensors"
    bin_file = directory / "pytorch_model.bin"
    if safetensors_file.is_file():
        return safetensors_file, load_safetensors_file(safetensors_file)
    if bin_file.is_file():
        state = load_torch_file(bin_file, trust_checkpoint=trust_checkpoint)
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()
        ):
            raise CheckpointFormatError(f"{str(bin_file)!r} does not hold a state dict.")
        return bin_file, state
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
        If a file is unreadable, malformed or inconsistent with the others.
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
    if not isinstance(config, dict):
        raise CheckpointFormatError(f"{str(config_file)!r} does not hold a JSON object.")
    weights_file, raw_state = _load_weights(directory, trust_checkpoint)
    state_dict = convert_sccello_state_dict(raw_state)
    files = {"config": config_file, "weights": weights_file}

    data = _find_data_dir(directory, data_dir)
    if data is None:
        logger.warning(
            "No scCello data/ folder in %s: using the Geneformer V1 dictionaries shipped with "
            "scfm (scCello's vocabulary) and no pretraining label map. Pass data_dir= to use "
            "the release's files.",
            directory,
        )
        vocabulary = sccello_vocabulary()
        label_clids, names, taxonomy = None, {}, {}
    else:
        token_file = data / _DATA_FILES["token_dictionary"]
        median_file = data / _DATA_FILES["gene_medians"]
        vocabulary = validate_vocabulary(
            load_pickle_dict(token_file, what="scCello token dictionary"),
            load_pickle_dict(median_file, what="scCello gene median dictionary"),
            what=str(token_file.parent),
        )
        files.update(token_dictionary=token_file, gene_medians=median_file)
        branch = config.get("data_branch", "frac100")
        if not isinstance(branch, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", branch):
            raise CheckpointFormatError(
                f"{str(config_file)!r}: data_branch={branch!r} is not a string."
            )
        label_clids, names = _read_labels(data, branch)
        taxonomy = _read_taxonomy_names(data / _DATA_FILES["taxonomy"])
        owl = data / _DATA_FILES["ontology"]
        if owl.is_file():
            files["ontology"] = owl
    vocab_size = config.get("vocab_size", len(vocabulary.token_dictionary))
    if vocab_size != len(vocabulary.token_dictionary):
        raise CheckpointFormatError(
            f"The token dictionary has {len(vocabulary.token_dictionary)} tokens (with <cls>) "
            f"but config.json says vocab_size={vocab_size}. Pass the data/ folder of this "
            "release."
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
        vocabulary=vocabulary,
        files=files,
        label_clids=label_clids,
        cell_type_names=names,
        taxonomy_names=taxonomy,
    )


def _read_labels(data: Path, branch: str) -> tuple[list[str] | None, dict[str, str]]:
    """Label id order of the pretraining CL ids, and their names."""
    label_file = data / _DATA_FILES["clid2labelid"].format(branch=branch)
    if not label_file.is_file():
        return None, {}
    clid2label = load_pickle_dict(label_file, what="scCello label map")
    if not all(is_int(v) for v in clid2label.values()):
        raise CheckpointFormatError(f"{str(label_file)!r} does not map CL ids to integer labels.")
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
        if not isinstance(pairs, set | frozenset | list | tuple | type({}.items())) or not all(
            isinstance(p, tuple | list) and len(p) == 2 for p in pairs
        ):
            raise CheckpointFormatError(f"{str(name_file)!r} does not hold (name, CL id) pairs.")
        for name, clid in pairs:
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
    if not isinstance(entries, list):
        raise CheckpointFormatError(f"{str(path)!r} does not hold a list of Cell Taxonomy entries.")
    clid2name: dict[str, str] = {}
    for entry in entries:
        if isinstance(entry, dict) and "id" in entry and "name" in entry:
            clid2name.setdefault(str(entry["id"]), str(entry["name"]))
    # as the reference's dict comprehension: a later id wins for a shared name
    return {name.lower(): clid for clid, name in clid2name.items()}
