"""In-silico marker gene prediction with scCello (gene masking), in scanpy's format.

The reference (``run_marker_gene_prediction.py``) scores each gene of a cell by masking it:
the cell's token sequence is copied once per gene, the gene at position ``k`` is replaced by
``<mask>`` in copy ``k`` (the length is unchanged), and the score is
``1 - cos(<cls>_original, <cls>_masked)`` of the last layer's ``<cls>`` states. Genes whose
removal moves the cell most are its predicted markers.

Here the per-cell scores are kept in ``adata.layers`` and averaged per group of cells, and
the ranking is written to ``adata.uns`` exactly like :func:`scanpy.tl.rank_genes_groups`, so
``sc.pl.rank_genes_groups(adata, key=key_added)`` and ``sc.get.rank_genes_groups_df`` work.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from scfm.errors import AnnDataKeyError, InvalidInputError

if TYPE_CHECKING:
    from scfm.model import ScCello

logger = logging.getLogger(__name__)

__all__ = ["marker_genes"]


@torch.inference_mode()
def _cell_marker_scores(model: ScCello, ids: torch.Tensor, max_genes: int | None, batch_size: int):
    """Scores ``[n_genes]`` of the first ``n_genes`` gene positions of one cell's tokens."""
    module = model.module
    length = len(ids)
    n_genes = length - 1 if max_genes is None else min(length - 1, max_genes)
    copies = ids.repeat(n_genes + 1, 1)  # row 0 is the original cell
    rows = torch.arange(1, n_genes + 1, device=ids.device)
    copies[rows, rows] = module.mask_token_id
    lengths = torch.full((len(copies),), length, device=ids.device)
    states = []
    for start in range(0, len(copies), batch_size):
        chunk = copies[start : start + batch_size]
        out = module.encode(chunk, lengths[start : start + batch_size]).last_hidden_state
        states.append(out[:, 0])
    cls = F.normalize(torch.cat(states), dim=-1)
    return 1 - (cls[:1] * cls[1:]).sum(-1)


def marker_genes(
    model: ScCello,
    adata: ad.AnnData | None = None,
    groupby: str | None = None,
    *,
    groups: Sequence[str] | None = None,
    max_genes: int | None = None,
    n_genes: int | None = None,
    batch_size: int = 32,
    key_added: str = "sccello_marker_genes",
    progress_bar: bool = True,
) -> pd.DataFrame:
    """Predict marker genes by masking each gene of each cell (scCello's in-silico screen).

    Parameters
    ----------
    model
        A pretrained :class:`~scfm.model.ScCello`.
    adata
        Cells set up with :meth:`~scfm.model.ScCello.setup_anndata`; ``None`` uses the
        model's AnnData.
    groupby
        ``adata.obs`` column grouping the cells (e.g. ``"cell_type"``); ``None`` scores all
        cells as one group ``"all"``.
    groups
        Only these groups (default all).
    max_genes
        Mask only the ``max_genes`` highest-ranked genes of each cell (``None``: every gene,
        as the reference; costs one forward pass per gene of a cell).
    n_genes
        Genes kept in the ranking per group (default: every scored gene).
    batch_size
        Masked copies per forward pass.
    key_added
        ``adata.uns`` key of the ranking and ``adata.layers`` key of the per-cell scores.
    progress_bar
        Show a progress bar over cells.

    Returns
    -------
    DataFrame (genes x groups) of the mean score of each gene over the group's cells that
    express it (``NaN`` where none does), indexed by ``adata.var_names``.

    Notes
    -----
    Writes ``adata.layers[key_added]`` (sparse per-cell scores at the scored genes) and
    ``adata.uns[key_added]`` in :func:`scanpy.tl.rank_genes_groups` layout (``names``,
    ``scores`` record arrays and ``params``; ``method`` is ``"sccello_gene_masking"``;
    ``logfoldchanges`` / ``pvals`` / ``pvals_adj`` are NaN since no test is run).
    """
    adata = model._validate_anndata(adata)
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}.")
    if max_genes is not None and max_genes < 1:
        raise InvalidInputError(f"max_genes must be >= 1 or None, got {max_genes}.")
    if groupby is not None and groupby not in adata.obs.columns:
        raise AnnDataKeyError(
            f"groupby={groupby!r} is not a column of adata.obs; pass an existing column or None."
        )
    labels = (
        pd.Series("all", index=adata.obs_names)
        if groupby is None
        else adata.obs[groupby].astype(str)
    )
    group_names = list(dict.fromkeys(labels)) if groups is None else [str(g) for g in groups]
    unknown = sorted(set(group_names) - set(labels))
    if unknown:
        raise InvalidInputError(f"groups {unknown} are not values of obs[{groupby!r}].")
    cells = np.flatnonzero(labels.isin(group_names).to_numpy())

    # token id -> adata column (the first column feeding it, when duplicates are summed)
    alignment, _ = model._gene_space(adata)
    var_of_token = np.full(len(model.vocabulary), -1, dtype=np.int64)
    var_of_token[alignment.vocab_index[::-1]] = alignment.var_index[::-1]
    model.module.eval()
    all_ids, all_lengths = model.get_tokens(adata, cells) if len(cells) else (None, None)
    rows, cols, vals = [], [], []
    for i, cell in enumerate(tqdm(cells, desc="scCello marker genes", disable=not progress_bar)):
        token_ids = torch.as_tensor(all_ids[i, : all_lengths[i]], device=model.device)
        if len(token_ids) < 2:
            continue
        scores = _cell_marker_scores(model, token_ids, max_genes, batch_size).cpu().numpy()
        genes = var_of_token[token_ids[1 : len(scores) + 1].cpu().numpy()]
        rows.append(np.full(len(genes), cell))
        cols.append(genes)
        vals.append(scores.astype(np.float32))
    rows_a = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    cols_a = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    vals_a = np.concatenate(vals) if vals else np.zeros(0, dtype=np.float32)
    per_cell = sp.csr_matrix((vals_a, (rows_a, cols_a)), shape=adata.shape, dtype=np.float32)
    scored = sp.csr_matrix(
        (np.ones_like(vals_a), (rows_a, cols_a)), shape=adata.shape, dtype=np.float32
    )
    adata.layers[key_added] = per_cell

    means = {}
    for group in group_names:
        member = (labels == group).to_numpy()
        total = np.asarray(per_cell[member].sum(0)).ravel()
        count = np.asarray(scored[member].sum(0)).ravel()
        with np.errstate(invalid="ignore", divide="ignore"):
            means[group] = np.where(count > 0, total / count, np.nan)
    frame = pd.DataFrame(means, index=adata.var_names)

    n_rank = n_genes or int(max((frame[g].notna().sum() for g in group_names), default=0))
    names_cols, score_cols = [], []
    for group in group_names:
        col = frame[group].dropna().sort_values(ascending=False, kind="stable")
        col = col.iloc[:n_rank]
        pad = n_rank - len(col)
        names_cols.append(np.concatenate([col.index.to_numpy(dtype=object), [""] * pad]))
        score_cols.append(np.concatenate([col.to_numpy(np.float32), np.full(pad, np.nan)]))
    adata.uns[key_added] = {
        "params": {
            "groupby": groupby if groupby is not None else "all",
            "reference": "rest",
            "method": "sccello_gene_masking",
            "use_raw": False,
            "layer": None,
            "corr_method": "none",
        },
        "names": np.rec.fromarrays(names_cols, names=group_names),
        "scores": np.rec.fromarrays([c.astype(np.float32) for c in score_cols], names=group_names),
    }
    # No statistical test is involved: the columns scanpy's readers expect are NaN.
    empty = [np.full(n_rank, np.nan, dtype=np.float32) for _ in group_names]
    for field in ("logfoldchanges", "pvals", "pvals_adj"):
        adata.uns[key_added][field] = np.rec.fromarrays(empty, names=group_names)
    return frame
