"""Reader of released Geneformer HF BERT directories (Theodoris lab, V1 and V2).

A release directory holds ``config.json`` and ``model.safetensors`` and/or
``pytorch_model.bin`` (``BertForMaskedLM``, or ``BertForSequenceClassification`` for fine-tuned
cell classifiers), plus (or next to) the pickled token / median / name / mapping dictionaries.
The HF key layout is the module's own, so no key is renamed; the keys HF itself ignores
(``position_ids``, the tied decoder) are declared in
:attr:`GeneformerModule._keys_to_ignore_on_load_unexpected`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from scfm.data._geneformer_tokenizer import GeneformerDictionaries, load_geneformer_dictionaries
from scfm.errors import CheckpointFormatError, CheckpointNotFoundError
from scfm.io._common import Release, load_safetensors_file, load_torch_file
from scfm.module._geneformer import GeneformerConfig

logger = logging.getLogger(__name__)

__all__ = ["classifier_labels", "read_geneformer_checkpoint"]

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
#: ``vocab_size`` of the V1 (gc30M) releases; every other size is read as V2 first.
V1_VOCAB_SIZE = 25426


def read_json_config(path: Path) -> dict[str, Any]:
    """Parse a release's JSON config into a dict.

    Raises
    ------
    CheckpointFormatError
        If the file is not UTF-8 JSON holding an object.
    """
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointFormatError(
            f"{str(path)!r} is not valid JSON ({err}). The file is damaged: download the "
            "release's config.json again."
        ) from None
    if not isinstance(config, dict):
        raise CheckpointFormatError(
            f"{str(path)!r} holds a JSON {type(config).__name__}, not an object: it is not a "
            "model config."
        )
    return config


def resolve_config(config: dict[str, Any], dictionaries: GeneformerDictionaries) -> dict[str, Any]:
    """The release config with what the dictionaries decide: variant and special token ids.

    A vocabulary with ``<cls>`` and ``<eos>`` is V2 (4096 input, both added around the genes),
    one without is V1 (2048 input, no special tokens in a cell).
    """
    variant = "V2" if dictionaries.has_special_tokens else "V1"
    resolved = {**config, "variant": variant, **dictionaries.special_token_ids(variant)}
    resolved.pop("input_size", None)  # the variant's default, bounded by the positions
    GeneformerConfig.from_dict(resolved)  # fails early, before the weights are read
    return resolved


def classifier_labels(config: dict[str, Any]) -> list[str] | None:
    """Class names of a ``BertForSequenceClassification`` config (``id2label`` order).

    ``None`` for any other architecture (``BertForMaskedLM``, the pretrained releases).

    Raises
    ------
    CheckpointFormatError
        If ``id2label`` / ``num_labels`` are malformed.
    """
    architectures = config.get("architectures") or ["BertForMaskedLM"]
    if not isinstance(architectures, list) or str(architectures[0]) != (
        "BertForSequenceClassification"
    ):
        return None
    try:
        n = int(config.get("num_labels", len(config.get("id2label") or {}) or 2))
        id2label = config.get("id2label") or {str(i): f"LABEL_{i}" for i in range(n)}
        labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
    except (TypeError, ValueError, AttributeError, KeyError) as err:
        raise CheckpointFormatError(
            f"The classifier config has a malformed id2label / num_labels ({err!r}); expected "
            '{"0": "<class name>", ...}.'
        ) from None
    if not labels or len(set(labels)) < len(labels):
        raise CheckpointFormatError(
            f"The classifier config's id2label must name distinct classes, got {labels}."
        )
    return labels


def read_geneformer_checkpoint(
    path: str | os.PathLike,
    *,
    token_dictionary_file: str | os.PathLike | None = None,
    gene_median_file: str | os.PathLike | None = None,
    gene_name_id_file: str | os.PathLike | None = None,
    gene_mapping_file: str | os.PathLike | None = None,
    trust_checkpoint: bool = False,
) -> Release:
    """Read a Geneformer HF directory: config, weights and dictionaries.

    The config is validated first (before any weight is read); ``model.safetensors`` is
    preferred, ``pytorch_model.bin`` is read with ``weights_only=True``
    (``trust_checkpoint=True`` allows full unpickling).

    Parameters
    ----------
    path
        The model directory (``config.json`` + weights).
    token_dictionary_file, gene_median_file, gene_name_id_file, gene_mapping_file
        Dictionary pickles; default: the ``*.pkl`` files found in ``path`` (those of the
        release whose token dictionary has ``vocab_size`` entries), else the V1 dictionaries
        shipped with scfm (a V2 model needs its median dictionary).
    trust_checkpoint
        Allow full unpickling of ``pytorch_model.bin`` files that need it.

    Returns
    -------
    :class:`~scfm.io._common.Release` whose ``config`` is the ``config.json`` dict completed
    with ``variant`` and the special token ids, ``vocabulary`` the
    :class:`~scfm.data.GeneformerDictionaries` and ``files`` the files read.

    Raises
    ------
    CheckpointNotFoundError
        If ``config.json``, both weight files or a needed dictionary are missing.
    CheckpointFormatError
        If the config is not a valid BERT config or a file is damaged.
    """
    directory = Path(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointNotFoundError(
            f"{str(directory)!r} has no config.json. Pass the Geneformer model directory "
            "(e.g. Geneformer-V2-104M/ or Geneformer-V1-10M/) as released."
        )
    config = read_json_config(config_file)
    if config.get("model_type", "bert") != "bert":
        raise CheckpointFormatError(
            f"{str(config_file)!r} describes a {config.get('model_type')!r} model, not a "
            "Geneformer BERT. Pass a Geneformer model directory."
        )
    # Shapes and types first: an absurd config fails here in milliseconds.
    vocab_size = GeneformerConfig.from_dict(config, input_size=1).vocab_size
    dictionaries = load_geneformer_dictionaries(
        directory,
        version="V1" if vocab_size == V1_VOCAB_SIZE else "V2",
        token_dictionary_file=token_dictionary_file,
        gene_median_file=gene_median_file,
        gene_name_id_file=gene_name_id_file,
        gene_mapping_file=gene_mapping_file,
        vocab_size=vocab_size,
    )
    config = resolve_config(config, dictionaries)
    weights = next((directory / f for f in _WEIGHT_FILES if (directory / f).is_file()), None)
    if weights is None:
        raise CheckpointNotFoundError(
            f"{str(directory)!r} holds neither model.safetensors nor pytorch_model.bin. "
            "Download the weight file of the release (Git LFS pointers are not the weights)."
        )
    if weights.suffix == ".safetensors":
        state = load_safetensors_file(weights)
    else:
        state = load_torch_file(weights, trust_checkpoint=trust_checkpoint)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointFormatError(f"{str(weights)!r} does not hold a state dict of tensors.")
    _check_tied(state)
    logger.info("Read %d tensors from %s.", len(state), weights)
    return Release(
        config=config,
        state_dict=state,
        vocabulary=dictionaries,
        files={"config": config_file, "weights": weights},
    )


def _check_tied(state: dict[str, torch.Tensor]) -> None:
    """Warn if a stored decoder weight differs from the word embedding HF ties it to."""
    dec = state.get("cls.predictions.decoder.weight")
    word = state.get("bert.embeddings.word_embeddings.weight")
    if dec is not None and word is not None and dec.shape == word.shape:
        if not torch.equal(dec, word):
            logger.warning(
                "cls.predictions.decoder.weight differs from the word embeddings; HF ties "
                "them on load, so the stored decoder weight is ignored as in the reference."
            )
