"""Reader of the released scFoundation ``models.ckpt`` and its gene list.

The release is one ``torch.save`` file holding three full models under the keys ``'cell'``,
``'rde'`` and ``'gene'``; each is ``{'config': nested dict, 'state_dict': {...}}`` with
Lightning-style ``model.``-prefixed keys. The gene list ``OS_scRNA_gene_index.19264.tsv``
(``gene_name<TAB>index``) fixes the gene order; a copy ships with scfm.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from scfm.errors import CheckpointFormatError, CheckpointNotFoundError, InvalidInputError
from scfm.io._common import load_torch_file, resolve_local_path

logger = logging.getLogger(__name__)

__all__ = [
    "SCFOUNDATION_WEIGHTS",
    "flatten_scfoundation_config",
    "read_scfoundation_checkpoint",
    "read_scfoundation_gene_list",
    "resolve_scfoundation_files",
]

#: The three models of the release: cell embeddings, read-depth enhancement, gene embeddings.
SCFOUNDATION_WEIGHTS = ("cell", "rde", "gene")
CHECKPOINT_NAME = "models.ckpt"
GENE_LIST_NAME = "OS_scRNA_gene_index.19264.tsv"
#: Lightning / MMF prefix of every state-dict key (everything up to it is stripped).
_KEY_PREFIX = "model."


def resolve_scfoundation_files(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """Locate ``models.ckpt`` and an optional gene list next to it.

    Parameters
    ----------
    path
        The checkpoint file itself, or a folder holding ``models/models.ckpt`` (the
        reference layout) or ``models.ckpt``.

    Returns
    -------
    The checkpoint file and the gene list found in the given folder, the checkpoint's folder
    or its parent (``None`` if there is none; the shipped list is used then).

    Raises
    ------
    CheckpointNotFoundError
        If no ``models.ckpt`` is found.
    """
    p = resolve_local_path(path)
    if p.is_file():
        ckpt, roots = p, [p.parent, p.parent.parent]
    else:
        candidates = [p / "models" / CHECKPOINT_NAME, p / CHECKPOINT_NAME]
        ckpt = next((c for c in candidates if c.is_file()), None)
        if ckpt is None:
            raise CheckpointNotFoundError(
                f"No {CHECKPOINT_NAME} in {str(p)!r} (looked for models/{CHECKPOINT_NAME} and "
                f"{CHECKPOINT_NAME}). Download the scFoundation release file and pass its "
                "folder or the file itself."
            )
        roots = [p, ckpt.parent]
    gene_list = next((r / GENE_LIST_NAME for r in roots if (r / GENE_LIST_NAME).is_file()), None)
    return ckpt, gene_list


def read_scfoundation_gene_list(path: str | os.PathLike | None = None) -> list[str]:
    """Read ``OS_scRNA_gene_index.19264.tsv`` (``gene_name<TAB>index``) in index order.

    Parameters
    ----------
    path
        The file; ``None`` reads the copy shipped with scfm (Apache-2.0, from the
        scFoundation repository).

    Raises
    ------
    CheckpointFormatError
        If the file lacks the ``gene_name`` / ``index`` columns or the index is not
        ``0..n-1``.
    """
    if path is None:
        ref = resources.files("scfm.data") / "resources" / "scfoundation" / GENE_LIST_NAME
        with ref.open("r") as fh:
            table = pd.read_csv(fh, sep="\t", dtype={"gene_name": str})
        where = f"the shipped {GENE_LIST_NAME}"
    else:
        table = pd.read_csv(path, sep="\t", dtype={"gene_name": str})
        where = str(path)
    if not {"gene_name", "index"} <= set(table.columns):
        raise CheckpointFormatError(
            f"{where} has columns {list(table.columns)}; 'gene_name' and 'index' are "
            f"expected (tab-separated). Pass the {GENE_LIST_NAME} of the scFoundation release."
        )
    table = table.sort_values("index")
    if not (table["index"].to_numpy() == range(len(table))).all():
        raise CheckpointFormatError(f"The 'index' column of {where} is not 0..{len(table) - 1}.")
    return table["gene_name"].tolist()


def flatten_scfoundation_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten a release config as the reference loader does.

    ``config['model_config'][config['model']]`` first, then ``config['dataset_config']['rnaseq']``
    (which overrides), plus ``model_type``. An already flat config is returned as a copy.
    """
    if "model_config" not in config:
        return dict(config)
    name = config.get("model", "mae_autobin")
    flat = dict(config["model_config"][name])
    flat.update(config.get("dataset_config", {}).get("rnaseq", {}))
    flat["model_type"] = name
    return flat


def _strip_prefix(key: str) -> str:
    """``model.encoder.norm.weight`` -> ``encoder.norm.weight`` (up to the first ``model.``)."""
    return key.split(_KEY_PREFIX, 1)[1] if _KEY_PREFIX in key else key


def read_scfoundation_checkpoint(
    path: str | os.PathLike, weights: str = "cell", *, trust_checkpoint: bool = False
) -> dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """Read the released ``models.ckpt``.

    Parameters
    ----------
    path
        The ``models.ckpt`` file.
    weights
        The model to check for (``"cell"``, ``"rde"`` or ``"gene"``); all models present
        are returned.
    trust_checkpoint
        Allow full unpickling if safe ``weights_only=True`` loading refuses the file.

    Returns
    -------
    ``{name: (flattened config, state dict with the "model." prefix stripped)}`` for every
    model in the file.

    Raises
    ------
    InvalidInputError
        If ``weights`` is not one of the release's models.
    CheckpointFormatError
        If the file is not a scFoundation release container or lacks ``weights``.
    """
    if weights not in SCFOUNDATION_WEIGHTS:
        raise InvalidInputError(
            f"weights={weights!r} is not a scFoundation model; use one of "
            f"{', '.join(map(repr, SCFOUNDATION_WEIGHTS))}."
        )
    obj = load_torch_file(path, trust_checkpoint=trust_checkpoint)
    if not isinstance(obj, Mapping) or not any(k in obj for k in SCFOUNDATION_WEIGHTS):
        keys = (
            f" with keys {', '.join(map(str, list(obj)[:5]))}" if isinstance(obj, Mapping) else ""
        )
        raise CheckpointFormatError(
            f"{str(path)!r} is not a scFoundation models.ckpt: expected a dict with the keys "
            f"'cell', 'rde', 'gene', got {type(obj).__name__}{keys}."
        )
    if weights not in obj:
        raise CheckpointFormatError(
            f"{str(path)!r} has no {weights!r} model (it holds {', '.join(map(repr, obj))}). "
            "Pass weights= one of those."
        )
    out = {}
    for name in SCFOUNDATION_WEIGHTS:
        entry = obj.get(name)
        if entry is None:
            continue
        if not isinstance(entry, Mapping) or "state_dict" not in entry or "config" not in entry:
            raise CheckpointFormatError(
                f"The {name!r} entry of {str(path)!r} lacks 'config' / 'state_dict'; the file "
                "is not a scFoundation release checkpoint."
            )
        state = {_strip_prefix(k): v for k, v in entry["state_dict"].items()}
        out[name] = (flatten_scfoundation_config(entry["config"]), state)
    logger.info("Read scFoundation models %s from %s", ", ".join(out), path)
    return out
