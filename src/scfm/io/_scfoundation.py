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
from scfm.io._common import Release, load_finite_torch_file, resolve_local_path

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
        If the file is not a tab-separated table with ``gene_name`` / ``index`` columns,
        the index is not ``0..n-1`` or a gene name is empty or repeated.
    """
    if path is None:
        ref = resources.files("scfm.data") / "resources" / "scfoundation" / GENE_LIST_NAME
        where = f"the shipped {GENE_LIST_NAME}"
        with ref.open("r") as fh:
            table = _read_gene_table(fh, where)
    else:
        where = str(path)
        table = _read_gene_table(resolve_local_path(path, what="gene list"), where)
    if not {"gene_name", "index"} <= set(table.columns):
        raise CheckpointFormatError(
            f"{where} has columns {list(table.columns)}; 'gene_name' and 'index' are "
            f"expected (tab-separated). Pass the {GENE_LIST_NAME} of the scFoundation release."
        )
    index = pd.to_numeric(table["index"], errors="coerce")
    if len(table) == 0 or sorted(index.tolist()) != list(range(len(table))):
        raise CheckpointFormatError(
            f"The 'index' column of {where} is not a permutation of 0..{len(table) - 1} "
            "(missing, repeated or non-integer gene indices)."
        )
    names = table["gene_name"].iloc[index.to_numpy().argsort()].fillna("").astype(str)
    empty = int((names.str.strip() == "").sum())
    repeated = names[names.duplicated()].unique().tolist()
    if empty or repeated:
        detail = f"{empty} empty gene names" if empty else f"repeated genes {repeated[:5]}"
        raise CheckpointFormatError(
            f"{where} has {detail}; every gene of the list must be named once."
        )
    return names.tolist()


def _read_gene_table(source: Any, where: str) -> pd.DataFrame:
    try:
        return pd.read_csv(source, sep="\t", dtype={"gene_name": str})
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise CheckpointFormatError(
            f"{where} cannot be read as a tab-separated gene list ({err}). Pass the "
            f"{GENE_LIST_NAME} of the scFoundation release."
        ) from None


def flatten_scfoundation_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten a release config as the reference loader does.

    ``config['model_config'][config['model']]`` first, then ``config['dataset_config']['rnaseq']``
    (which overrides), plus ``model_type``. An already flat config is returned as a copy.

    Raises
    ------
    CheckpointFormatError
        If a level of the nested config is not a dict.
    """
    if not isinstance(config, Mapping):
        raise CheckpointFormatError(
            f"The scFoundation config is a {type(config).__name__}, not a dict."
        )
    if "model_config" not in config:
        return dict(config)
    name = config.get("model", "mae_autobin")
    model_config = config["model_config"]
    if not isinstance(model_config, Mapping) or not isinstance(model_config.get(name), Mapping):
        raise CheckpointFormatError(
            f"The scFoundation config has no dict 'model_config'[{name!r}] (the architecture)."
        )
    dataset = config.get("dataset_config", {})
    rnaseq = dataset.get("rnaseq", {}) if isinstance(dataset, Mapping) else None
    if not isinstance(rnaseq, Mapping):
        raise CheckpointFormatError(
            "The scFoundation config key 'dataset_config'['rnaseq'] is not a dict."
        )
    flat = dict(model_config[name])
    flat.update(rnaseq)
    flat["model_type"] = name
    return flat


def _strip_prefix(key: str) -> str:
    """``model.encoder.norm.weight`` -> ``encoder.norm.weight`` (up to the first ``model.``)."""
    return key.split(_KEY_PREFIX, 1)[1] if _KEY_PREFIX in key else key


def read_scfoundation_checkpoint(
    path: str | os.PathLike, weights: str = "cell", *, trust_checkpoint: bool = False
) -> Release:
    """Read one of the three models of the released ``models.ckpt`` and its gene list.

    Only the requested model is read: the file is memory-mapped (when it is in torch's zip
    format), so the two other models never enter memory, and the returned tensors are views
    of the file until they are written to.

    Parameters
    ----------
    path
        The ``models.ckpt`` file, or a folder holding ``models/models.ckpt`` or
        ``models.ckpt`` (see :func:`resolve_scfoundation_files`).
    weights
        ``"cell"`` (cell embeddings), ``"rde"`` (read-depth enhancement) or ``"gene"``
        (gene embeddings, decoded expression).
    trust_checkpoint
        Allow full unpickling if safe ``weights_only=True`` loading refuses the file.

    Returns
    -------
    :class:`~scfm.io._common.Release`: the flattened config, the state dict with the
    ``model.`` prefix stripped, the gene symbols (``vocabulary``) and the files read
    (``"weights"``, and ``"genes"`` when the gene list came from the release folder).

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
    ckpt, gene_file = resolve_scfoundation_files(path)
    # Memory-mapped unless in torch's legacy format: the file holds three full models (~1.4 GB
    # at release size) but only the pages of the one asked for are ever read, and its tensors
    # stay views of the file (no second copy when the module takes them with ``assign=True``).
    # Its NaN / inf check maps the file a window at a time, so what the model never reads (the
    # decoder, for cell embeddings) stays out of memory; the model loads with
    # check_finite=False.
    obj, state = load_finite_torch_file(
        ckpt, lambda o: _weight_set(o, ckpt, weights), trust_checkpoint=trust_checkpoint
    )
    config = obj[weights]["config"]
    del obj  # the two other models are not kept
    genes = read_scfoundation_gene_list(gene_file)
    files = {"weights": ckpt} if gene_file is None else {"weights": ckpt, "genes": gene_file}
    logger.info("Read the scFoundation %r model from %s", weights, ckpt)
    return Release(
        config=flatten_scfoundation_config(config),
        state_dict=dict(state),
        vocabulary=genes,
        files=files,
    )


def _weight_set(obj: Any, ckpt: Path, weights: str) -> dict[str, torch.Tensor]:
    """The state dict of the ``weights`` model of a loaded ``models.ckpt``, ``model.`` stripped.

    Raises
    ------
    CheckpointFormatError
        If ``obj`` is not a scFoundation release container, lacks ``weights`` or the entry is
        not ``{'config': ..., 'state_dict': {name: tensor}}``.
    """
    if not isinstance(obj, Mapping) or not any(k in obj for k in SCFOUNDATION_WEIGHTS):
        keys = (
            f" with keys {', '.join(map(str, list(obj)[:5]))}" if isinstance(obj, Mapping) else ""
        )
        raise CheckpointFormatError(
            f"{str(ckpt)!r} is not a scFoundation models.ckpt: expected a dict with the keys "
            f"'cell', 'rde', 'gene', got {type(obj).__name__}{keys}."
        )
    if weights not in obj:
        raise CheckpointFormatError(
            f"{str(ckpt)!r} has no {weights!r} model (it holds "
            f"{', '.join(map(repr, obj))}). Pass weights= one of those."
        )
    entry = obj[weights]
    if not isinstance(entry, Mapping) or "state_dict" not in entry or "config" not in entry:
        raise CheckpointFormatError(
            f"The {weights!r} entry of {str(ckpt)!r} lacks 'config' / 'state_dict'; the file "
            "is not a scFoundation release checkpoint."
        )
    raw_state = entry["state_dict"]
    if not isinstance(raw_state, Mapping) or not all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in raw_state.items()
    ):
        raise CheckpointFormatError(
            f"The {weights!r} state_dict of {str(ckpt)!r} is not a mapping of names to tensors."
        )
    return {_strip_prefix(k): v for k, v in raw_state.items()}
