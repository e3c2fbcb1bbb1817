"""Reader of the original CellPLM release files: ``<prefix>.config.json`` + ``<prefix>.best.ckpt``.

The released checkpoint (e.g. ``20231027_85M``, ``20230926_85M``) is a pair of files sharing a
prefix inside one directory. The ``.best.ckpt`` is a ``torch.save`` dict whose entry
``model_state_dict`` holds the weights under the same names as :class:`scfm.module.CellPLMModule`
(the module class declares which release keys it ignores), so reading is checks, not renames.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from scfm.errors import CheckpointFormatError, CheckpointNotFoundError
from scfm.io._common import Release, load_finite_torch_file

logger = logging.getLogger(__name__)

__all__ = [
    "find_cellplm_checkpoint",
    "read_cellplm_config",
    "read_cellplm_release",
    "read_cellplm_state_dict",
]

CONFIG_SUFFIX = ".config.json"
CKPT_SUFFIX = ".best.ckpt"


def find_cellplm_checkpoint(
    path: str | os.PathLike, prefix: str | None = None
) -> tuple[Path, Path]:
    """Locate ``<prefix>.config.json`` and ``<prefix>.best.ckpt``.

    Parameters
    ----------
    path
        The checkpoint directory, a path ending in the prefix (``ckpt/20231027_85M``), or one
        of the two files.
    prefix
        File prefix (e.g. ``"20231027_85M"``); may be omitted when ``path`` names it or
        the directory holds one model. With several models and no prefix the newest release
        (the latest date prefix, e.g. ``20231027_85M``) is used.

    Returns
    -------
    The config and checkpoint paths.

    Raises
    ------
    CheckpointNotFoundError
        If the pair cannot be found, naming the prefixes that exist.
    """
    p = Path(os.fspath(path)).expanduser()
    name = p.name
    for suffix in (CONFIG_SUFFIX, CKPT_SUFFIX):
        if name.endswith(suffix) and p.is_file():
            p, name = p.parent, name[: -len(suffix)]
            prefix = prefix or name
            break
    else:
        if not p.is_dir() and (p.parent / f"{name}{CONFIG_SUFFIX}").exists():
            p, prefix = p.parent, prefix or name
    if not p.is_dir():
        raise CheckpointNotFoundError(
            f"The CellPLM checkpoint path {str(path)!r} does not exist. Pass the directory "
            "holding <prefix>.config.json and <prefix>.best.ckpt (e.g. './ckpt'), or "
            "'<directory>/<prefix>'."
        )
    available = sorted(f.name[: -len(CONFIG_SUFFIX)] for f in p.glob(f"*{CONFIG_SUFFIX}"))
    if prefix is None:
        if not available:
            raise CheckpointNotFoundError(
                f"{str(p)!r} holds no '<prefix>{CONFIG_SUFFIX}' file. Pass the directory "
                "of the downloaded CellPLM checkpoint (e.g. 20231027_85M.config.json + "
                "20231027_85M.best.ckpt)."
            )
        # Release prefixes start with their date: the newest one is the default, as the
        # released Dropbox folder holds both 20230926_85M and 20231027_85M.
        prefix = available[-1]
        if len(available) > 1:
            logger.info(
                "%s holds CellPLM releases %s; using the newest, %s (pass prefix= to choose).",
                p,
                ", ".join(available),
                prefix,
            )
    config, ckpt = p / f"{prefix}{CONFIG_SUFFIX}", p / f"{prefix}{CKPT_SUFFIX}"
    for f in (config, ckpt):
        if not f.is_file():
            raise CheckpointNotFoundError(
                f"{str(f)!r} does not exist. A CellPLM checkpoint is the pair "
                f"{prefix}{CONFIG_SUFFIX} + {prefix}{CKPT_SUFFIX}; prefixes with a config "
                f"here: {', '.join(available) or 'none'}."
            )
    return config, ckpt


def read_cellplm_release(
    path: str | os.PathLike, prefix: str | None = None, *, trust_checkpoint: bool = False
) -> Release:
    """Read one CellPLM release: config, weights and gene list.

    Parameters
    ----------
    path, prefix
        As in :func:`find_cellplm_checkpoint` (a folder with several releases gives the
        newest).
    trust_checkpoint
        Allow full unpickling if the ``.best.ckpt`` holds Python objects (trusted files only).

    Returns
    -------
    :class:`~scfm.io._common.Release` with the raw config (without ``gene_list``), the
    ``model_state_dict`` tensors, the gene list as a :class:`pandas.Index` and the files
    (``config``, ``weights``).
    """
    config_path, ckpt_path = find_cellplm_checkpoint(path, prefix)
    config, genes = read_cellplm_config(config_path)
    if config.get("out_dim", len(genes)) != len(genes):
        raise CheckpointFormatError(
            f"CellPLM config key 'out_dim' = {config['out_dim']!r} but 'gene_list' holds "
            f"{len(genes)} genes ({config_path}): one of them is damaged."
        )
    return Release(
        config=config,
        state_dict=read_cellplm_state_dict(ckpt_path, trust_checkpoint=trust_checkpoint),
        vocabulary=pd.Index(genes),
        files={"config": config_path, "weights": ckpt_path},
    )


def read_cellplm_config(path: str | os.PathLike) -> tuple[dict[str, Any], list[str]]:
    """Read ``<prefix>.config.json``: the raw config dict (without gene list) and the gene list.

    Raises
    ------
    CheckpointFormatError
        If the file is not a JSON object, or ``gene_list`` is missing, empty, not strings or
        holds duplicates.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointFormatError(
            f"{str(path)!r} is not a readable JSON config ({type(err).__name__}: {err}). Older "
            "CellPLM releases used '.config.pkl'; download the current release with "
            "'.config.json'."
        ) from None
    if not isinstance(raw, dict) or "gene_list" not in raw:
        raise CheckpointFormatError(
            f"{str(path)!r} has no 'gene_list': it is not a CellPLM config.json."
        )
    genes = raw.pop("gene_list")
    if (
        not isinstance(genes, list)
        or not genes
        or not all(isinstance(g, str) and g.strip() for g in genes)
    ):
        raise CheckpointFormatError(
            f"'gene_list' of {str(path)!r} must be a non-empty list of gene ids (strings)."
        )
    duplicated = pd.Index(genes)[pd.Index(genes).duplicated()]
    if len(duplicated):
        raise CheckpointFormatError(
            f"'gene_list' of {str(path)!r} holds {len(duplicated)} duplicated gene ids (e.g. "
            f"{', '.join(duplicated[:3])}); each gene must have one row of the gene embedding."
        )
    return raw, list(genes)


def read_cellplm_state_dict(
    path: str | os.PathLike, *, trust_checkpoint: bool = False
) -> dict[str, torch.Tensor]:
    """Read the weights (``model_state_dict`` entry) of ``<prefix>.best.ckpt`` on CPU.

    Every floating tensor is checked for NaN / inf, also those the forward never uses (a NaN
    there still means a bad file). A zip-format file (every release) is memory-mapped: the
    tensors stay views of the file, so the weights are held once when the module takes them
    (``assign=True``) and what inference never reads (the decoder, the rows of genes absent
    from the data, the positional table) never enters memory. Load it with
    ``load_state_dict_strict(..., check_finite=False)``: the check was made here, a window of
    the file at a time (:func:`~scfm.io._common.load_finite_torch_file`).
    """
    _, state = load_finite_torch_file(
        path, lambda obj: _model_state(obj, path), trust_checkpoint=trust_checkpoint
    )
    return dict(state)


def _model_state(obj: Any, path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    """The ``model_state_dict`` entry of a loaded ``.best.ckpt`` (or the object, if it has none).

    Raises
    ------
    CheckpointFormatError
        If it is not a non-empty dict of tensors by name.
    """
    state = obj["model_state_dict"] if isinstance(obj, dict) and "model_state_dict" in obj else obj
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise CheckpointFormatError(
            f"{str(path)!r} holds no 'model_state_dict' of tensors: it is not a CellPLM "
            ".best.ckpt file."
        )
    return state
