"""Reader of the released CellFM files (MindSpore ``.ckpt`` + gene list ``.csv``).

Releases (HuggingFace ``ShangguanNingyuan/CellFM``, CC BY-NC-ND 4.0)::

    CellFM_80M_weight.ckpt + expand_gene_info.csv   (27,855 genes, d=1536, 2 layers, 48 heads)
    base_weight.ckpt       + gene_info.csv          (24,078 genes, d=1536, 40 layers, 48 heads)

No configuration is stored in the files: width, depth, vocabulary rows and optional parts
(read-depth "ST" tokens, zero-probability heads, decoders) are read from the tensor names and
shapes; only the head count must be known (48 for the released width). The gene lists are
licensed CC BY-NC-ND and therefore never shipped with scfm: they are read from beside the
checkpoint.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from scfm.errors import CheckpointFormatError, CheckpointNotFoundError, InvalidInputError
from scfm.io._common import Release, resolve_local_path
from scfm.io._mindspore import MindSporeCheckpoint
from scfm.module._cellfm import VALUE_BINS, CellFMConfig
from scfm.module._checks import is_int

logger = logging.getLogger(__name__)

__all__ = [
    "CELLFM_RELEASES",
    "CellFMConfig",
    "config_from_shapes",
    "find_cellfm_files",
    "read_cellfm_checkpoint",
    "read_cellfm_genes",
    "read_cellfm_release",
]

#: Released checkpoint file -> its gene list (token id = 1 + row).
CELLFM_RELEASES: dict[str, str] = {
    "CellFM_80M_weight.ckpt": "expand_gene_info.csv",
    "base_weight.ckpt": "gene_info.csv",
}
#: Head count of the released models, by width (not recoverable from the weights).
RELEASED_NUM_HEADS: dict[int, int] = {1536: 48}
#: The gene table has ``n_genes + 1`` rows rounded up to a multiple of this.
GENE_ROW_MULTIPLE = 8
#: MindSpore LayerNorm parameter names -> torch names.
_RENAMES = ((re.compile(r"\.gamma$"), ".weight"), (re.compile(r"\.beta$"), ".bias"))


def config_from_shapes(
    shapes: Mapping[str, tuple[int, ...]], n_heads: int | None = None
) -> dict[str, Any]:
    """The architecture of a CellFM checkpoint, from its tensor names and shapes.

    Parameters
    ----------
    shapes
        Parameter name -> dims (MindSpore or scfm names), optimizer entries included or not.
    n_heads
        Head count; ``None`` uses the released value for the released width.

    Returns
    -------
    The :class:`~scfm.module._cellfm.CellFMConfig` fields except ``n_genes`` (which the gene
    list gives).

    Raises
    ------
    CheckpointFormatError
        If the file has no CellFM gene table / encoder, or ``n_heads`` does not divide
        its width.
    InvalidInputError
        If ``n_heads`` is needed but not given, or is not an integer.
    """
    gene_emb = shapes.get("gene_emb")
    if gene_emb is None or len(gene_emb) != 2:
        raise CheckpointFormatError(
            "The checkpoint has no 2-d 'gene_emb' tensor: it is not a CellFM checkpoint."
        )
    gene_rows, d = (int(v) for v in gene_emb)
    layers = {
        int(m.group(1))
        for k in shapes
        if (m := re.match(r"^encoder\.(\d+)\.attn\.q_proj\.weight$", k))
    }
    if not layers or layers != set(range(len(layers))):
        raise CheckpointFormatError(
            f"The checkpoint's encoder layers are {sorted(layers)}: expected "
            "encoder.0 ... encoder.N-1 (a CellFM retention encoder)."
        )
    if n_heads is None:
        if d not in RELEASED_NUM_HEADS:
            raise InvalidInputError(
                f"The checkpoint has width {d}, which no released CellFM has, and the head "
                "count is not stored in CellFM checkpoints. Pass n_heads=<number of "
                "retention heads> (the enc_num_heads of the config it was trained with)."
            )
        n_heads = RELEASED_NUM_HEADS[d]
    if not is_int(n_heads):
        raise InvalidInputError(f"n_heads must be an integer, got {n_heads!r}.")
    if n_heads < 1 or d % n_heads:
        # the head count is the one config value the file does not hold: checked against it
        raise CheckpointFormatError(
            f"n_heads={n_heads} does not divide the width {d} of the checkpoint's weights; "
            "pass the enc_num_heads it was trained with (a positive divisor of the width)."
        )
    bins = shapes.get("value_enc.value_enc.w1.weight", (VALUE_BINS, 1))[0]
    lora_a = [
        v for k, v in shapes.items() if re.search(r"^encoder\.0\.attn\.lora_q\.A\.weight$", k)
    ]
    return {
        "enc_dims": d,
        "enc_nlayers": len(layers),
        "enc_num_heads": int(n_heads),
        "gene_rows": gene_rows,
        "value_bins": int(bins),
        "st_tokens": "ST_emb" in shapes,
        "add_zero": any(re.match(r"^(value|cellwise)_dec\.zero_logit\.", k) for k in shapes),
        "lora": int(lora_a[0][0]) if lora_a else 0,
    }


def rename_mindspore_key(name: str) -> str:
    """MindSpore parameter name -> scfm name (LayerNorm ``gamma/beta`` -> ``weight/bias``)."""
    for pattern, repl in _RENAMES:
        name = pattern.sub(repl, name)
    return name


def find_cellfm_files(
    path: str | os.PathLike, gene_file: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    """Locate the ``.ckpt`` and its gene list.

    Parameters
    ----------
    path
        A released ``.ckpt`` file or the directory holding it.
    gene_file
        Gene list to use instead of the one released with the checkpoint.

    Returns
    -------
    ``(checkpoint file, gene list file)``.

    Raises
    ------
    CheckpointNotFoundError
        If no checkpoint or no matching gene list is found.
    """
    path = resolve_local_path(path)
    if path.is_dir():
        known = [path / name for name in CELLFM_RELEASES if (path / name).is_file()]
        candidates = known or sorted(path.glob("*.ckpt"))
        if len(candidates) != 1:
            raise CheckpointNotFoundError(
                f"Found {len(candidates)} CellFM checkpoints in {str(path)!r} "
                f"({', '.join(p.name for p in candidates) or 'none'}). Pass the .ckpt file "
                f"itself (released names: {', '.join(CELLFM_RELEASES)})."
            )
        ckpt = candidates[0]
    else:
        ckpt = path
    if gene_file is not None:
        return ckpt, resolve_local_path(gene_file, what="CellFM gene list")
    expected = CELLFM_RELEASES.get(ckpt.name)
    names = [expected] if expected else list(dict.fromkeys(CELLFM_RELEASES.values()))
    for folder in (ckpt.parent, ckpt.parent / "csv"):
        for name in names:
            if (folder / name).is_file():
                return ckpt, folder / name
    raise CheckpointNotFoundError(
        f"No CellFM gene list ({' or '.join(names)}) next to {str(ckpt)!r}. The gene lists "
        "(CC BY-NC-ND) are not shipped with scfm: download the one released with the "
        "checkpoint from github.com/biomed-AI/CellFM (csv/) into the same folder, or pass "
        "gene_file='<path to the csv>'. The 80M model needs expand_gene_info.csv, the 800M "
        "model (base_weight.ckpt) gene_info.csv."
    )


def read_cellfm_genes(path: str | os.PathLike) -> list[str]:
    """Read and validate a CellFM gene list (``HGNC_gene`` index column); token id = 1 + row.

    Raises
    ------
    CheckpointFormatError
        If the file is not a CellFM gene list, or names a gene twice or not at all.
    """
    path = resolve_local_path(path, what="CellFM gene list")
    try:
        table = pd.read_csv(path, index_col=0)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise CheckpointFormatError(
            f"{str(path)!r} is not a readable CellFM gene list ({err})."
        ) from None
    if table.index.name not in ("HGNC_gene", None) or len(table) == 0:
        raise CheckpointFormatError(
            f"{str(path)!r} does not look like a CellFM gene list (first column "
            f"{table.index.name!r}, expected 'HGNC_gene'). Pass gene_info.csv or "
            "expand_gene_info.csv from the CellFM release."
        )
    if table.index.isna().any() or (table.index.astype(str).str.strip() == "").any():
        raise CheckpointFormatError(
            f"{str(path)!r} has rows without a gene symbol; the file is damaged: use the "
            "gene list released with the checkpoint."
        )
    genes = [str(g) for g in table.index]
    duplicated = pd.Index(genes)[pd.Index(genes).duplicated()].unique()
    if len(duplicated):
        raise CheckpointFormatError(
            f"{str(path)!r} lists {len(duplicated)} genes twice (e.g. "
            f"{', '.join(duplicated[:3])}): two token ids for one gene. Use the gene list "
            "released with the checkpoint."
        )
    return genes


def read_cellfm_checkpoint(
    path: str | os.PathLike, n_heads: int | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a CellFM MindSpore checkpoint: its architecture and its tensors, renamed for scfm.

    Tensors are views of the memory-mapped file (nothing is read until they are copied into
    the module). Optimizer state (``moment1.*``, ...) is kept in the dict for the module's
    declared load rules to drop; 0-d training counters are dropped here (no CellFM parameter
    is a scalar, and their set in the released files is not known).

    Parameters
    ----------
    path
        The ``.ckpt`` file.
    n_heads
        Head count (``None``: the released value for the released width).

    Returns
    -------
    ``(config fields from :func:`config_from_shapes`, {scfm name: tensor})``.
    """
    ckpt = MindSporeCheckpoint(path)
    keys = [k for k in ckpt if ckpt.shape(k) != ()]
    config = config_from_shapes({k: ckpt.shape(k) for k in keys}, n_heads)
    return config, {rename_mindspore_key(k): ckpt[k] for k in keys}


def read_cellfm_release(
    path: str | os.PathLike,
    n_heads: int | None = None,
    gene_file: str | os.PathLike | None = None,
) -> Release:
    """Read a CellFM release: checkpoint, gene list and the configuration they imply.

    Parameters
    ----------
    path
        A released ``.ckpt`` file or the folder holding it.
    n_heads
        Retention heads (not stored in checkpoints); ``None``: 48 for the released width.
    gene_file
        Gene list to use instead of the one found beside the checkpoint.

    Returns
    -------
    :class:`~scfm.io._common.Release` with ``config`` (the :class:`CellFMConfig` fields,
    ``n_genes`` from the gene list), the renamed state dict, ``vocabulary`` (the gene list,
    token id = 1 + position) and ``files`` (``weights``, ``genes``).
    """
    ckpt_file, genes_file = find_cellfm_files(path, gene_file)
    genes = read_cellfm_genes(genes_file)
    config, state = read_cellfm_checkpoint(ckpt_file, n_heads)
    config["n_genes"] = len(genes)
    expected_rows = len(genes) + 1 + (-len(genes) - 1) % GENE_ROW_MULTIPLE
    if config["gene_rows"] > len(genes) and config["gene_rows"] != expected_rows:
        logger.warning(
            "%s has %d gene rows; %s with %d genes implies %d. Check that the gene list "
            "belongs to this checkpoint.",
            ckpt_file.name,
            config["gene_rows"],
            genes_file.name,
            len(genes),
            expected_rows,
        )
    return Release(
        config=config,
        state_dict=state,
        vocabulary=genes,
        files={"weights": ckpt_file, "genes": genes_file},
    )
