"""Reader of released Geneformer HF BERT directories (Theodoris lab, V1 and V2).

A release directory holds ``config.json`` and ``model.safetensors`` and/or
``pytorch_model.bin`` (``BertForMaskedLM``, or ``BertForSequenceClassification`` for fine-tuned
cell classifiers). The HF key layout is the module's own, so the rename table only drops what
HF itself ignores: the ``position_ids`` buffer and the decoder weight / bias that are tied to
the word embedding / ``cls.predictions.bias``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scfm.errors import CheckpointFormatError, CheckpointNotFoundError
from scfm.io._common import load_safetensors_file, load_torch_file

logger = logging.getLogger(__name__)

__all__ = ["GeneformerCheckpoint", "read_geneformer_checkpoint"]

#: Checkpoint keys that HF ignores on load (buffer) or ties to other tensors.
DROPPED_KEYS = (
    "bert.embeddings.position_ids",
    "cls.predictions.decoder.weight",
    "cls.predictions.decoder.bias",
)
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class GeneformerCheckpoint:
    """Contents of a Geneformer HF directory.

    Attributes
    ----------
    config
        The parsed ``config.json``.
    state_dict
        Tensors renamed onto :class:`~scfm.module.GeneformerModule` (dropped keys removed).
    architecture
        ``"BertForMaskedLM"`` or ``"BertForSequenceClassification"``.
    labels
        Class names of a fine-tuned classifier (``config.id2label`` order), else ``None``.
    weights_file
        The file the weights came from.
    """

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    architecture: str
    labels: list[str] | None
    weights_file: Path


def read_geneformer_checkpoint(
    path: str | Path, *, trust_checkpoint: bool = False
) -> GeneformerCheckpoint:
    """Read ``config.json`` and the weights of a Geneformer HF directory.

    ``model.safetensors`` is preferred; ``pytorch_model.bin`` is read with
    ``weights_only=True`` (``trust_checkpoint=True`` allows full unpickling).

    Raises
    ------
    CheckpointNotFoundError
        If ``config.json`` or both weight files are missing.
    CheckpointFormatError
        If the config is not a BERT config.
    """
    directory = Path(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointNotFoundError(
            f"{str(directory)!r} has no config.json. Pass the Geneformer model directory "
            "(e.g. Geneformer-V2-104M/ or Geneformer-V1-10M/) as released."
        )
    config = json.loads(config_file.read_text())
    if config.get("model_type", "bert") != "bert":
        raise CheckpointFormatError(
            f"{str(config_file)!r} describes a {config.get('model_type')!r} model, not a "
            "Geneformer BERT. Pass a Geneformer model directory."
        )
    weights = next((directory / f for f in _WEIGHT_FILES if (directory / f).is_file()), None)
    if weights is None:
        raise CheckpointNotFoundError(
            f"{str(directory)!r} holds neither model.safetensors nor pytorch_model.bin. "
            "Download the weight file of the release (Git LFS objects are not the weights)."
        )
    if weights.suffix == ".safetensors":
        state = load_safetensors_file(weights)
    else:
        state = load_torch_file(weights, trust_checkpoint=trust_checkpoint)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{str(weights)!r} does not hold a state dict.")
    _check_tied(state)
    renamed = {k: v for k, v in state.items() if k not in DROPPED_KEYS}
    architectures = config.get("architectures") or ["BertForMaskedLM"]
    architecture = str(architectures[0])
    labels = None
    if architecture == "BertForSequenceClassification":
        id2label = config.get("id2label") or {
            str(i): f"LABEL_{i}" for i in range(int(config.get("num_labels", 2)))
        }
        labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
    logger.info("Read %d tensors from %s (%s).", len(renamed), weights, architecture)
    return GeneformerCheckpoint(config, renamed, architecture, labels, weights)


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
