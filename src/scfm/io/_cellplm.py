"""Reader of the original CellPLM release files: ``<prefix>.config.json`` + ``<prefix>.best.ckpt``.

The released checkpoint (e.g. ``20231027_85M``, ``20230926_85M``) is a pair of files sharing a
prefix inside one directory. The ``.best.ckpt`` is a ``torch.save`` dict whose entry
``model_state_dict`` holds the weights under the same names as :class:`scfm.module.CellPLMModule`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from scfm.errors import CheckpointFormatError, CheckpointNotFoundError
from scfm.io._common import load_state_dict_strict, load_torch_file

logger = logging.getLogger(__name__)

__all__ = [
    "find_cellplm_checkpoint",
    "load_cellplm_weights",
    "read_cellplm_config",
    "read_cellplm_state_dict",
]

CONFIG_SUFFIX = ".config.json"
CKPT_SUFFIX = ".best.ckpt"
#: Checkpoint keys the released forward pass never uses (``norm0`` is built but not applied;
#: the positional-encoding table is replaced by 0 in the reference, upstream issue #19).
UNUSED_PREFIXES = ("embedder.norm0.", "embedder.pe_enc.")


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


def read_cellplm_config(path: str | os.PathLike) -> tuple[dict[str, Any], list[str]]:
    """Read ``<prefix>.config.json``: the raw config dict (without gene list) and the gene list.

    Raises
    ------
    CheckpointFormatError
        If the file is not JSON or lacks ``gene_list``.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointFormatError(
            f"{str(path)!r} is not a readable JSON config ({err}). Older CellPLM releases "
            "used '.config.pkl'; download the current release with '.config.json'."
        ) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("gene_list"), list):
        raise CheckpointFormatError(
            f"{str(path)!r} has no 'gene_list': it is not a CellPLM config.json."
        )
    genes = [str(g) for g in raw.pop("gene_list")]
    return raw, genes


def read_cellplm_state_dict(
    path: str | os.PathLike, *, trust_checkpoint: bool = False
) -> dict[str, torch.Tensor]:
    """Read the weights (``model_state_dict`` entry) of ``<prefix>.best.ckpt`` on CPU."""
    obj = load_torch_file(path, trust_checkpoint=trust_checkpoint)
    if isinstance(obj, dict) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointFormatError(
            f"{str(path)!r} holds no 'model_state_dict' of tensors: it is not a CellPLM "
            ".best.ckpt file."
        )
    return dict(obj)


def load_cellplm_weights(
    module: torch.nn.Module, state_dict: dict[str, torch.Tensor], *, what: str = "checkpoint"
) -> None:
    """Load a released state dict strictly into a :class:`~scfm.module.CellPLMModule`.

    Only the unused embedder keys (``embedder.norm0.*``, ``embedder.pe_enc.*``) may be
    absent from the module; every other missing, unexpected or mis-shaped key raises
    :class:`~scfm.errors.CheckpointKeyError`. With ``spatial_encoding=True`` the learned
    ``embedder.pe_enc.missing_pe`` is loaded.
    """
    target = set(module.state_dict())
    unused = [k for k in state_dict if k.startswith(UNUSED_PREFIXES) and k not in target]
    if unused:
        logger.debug("Ignoring unused CellPLM keys: %s", ", ".join(unused))
    load_state_dict_strict(module, state_dict, what=what, ignore_unexpected=unused)
