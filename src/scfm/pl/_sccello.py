"""Plots of scCello results."""

from __future__ import annotations

import anndata as ad
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.axes import Axes

from scfm.errors import AnnDataKeyError

__all__ = ["novel_cell_types"]


def novel_cell_types(
    adata: ad.AnnData,
    groupby: str,
    key: str = "sccello_novel_cell_type",
    *,
    ax: Axes | None = None,
    cmap: str = "viridis",
    show: bool = False,
) -> Axes:
    """Heatmap of the mean novel-cell-type probabilities per group of cells.

    Parameters
    ----------
    adata
        AnnData after :func:`scfm.tl.classify_novel_cell_types`.
    groupby
        ``adata.obs`` column defining the rows (e.g. the true cell types).
    key
        The ``key_added`` of :func:`scfm.tl.classify_novel_cell_types`.
    ax
        Axes to draw on; a new figure by default.
    cmap
        Colour map.
    show
        Call :func:`matplotlib.pyplot.show`.

    Returns
    -------
    The axes (rows: groups, columns: candidate types).
    """
    probs_key = f"{key}_probs"
    if probs_key not in adata.obsm:
        raise AnnDataKeyError(
            f"adata.obsm[{probs_key!r}] is missing; run scfm.tl.classify_novel_cell_types("
            f"model, adata, candidates, key_added={key!r}) first."
        )
    if groupby not in adata.obs.columns:
        raise AnnDataKeyError(f"groupby={groupby!r} is not a column of adata.obs.")
    probs = adata.obsm[probs_key]
    if not isinstance(probs, pd.DataFrame):
        probs = pd.DataFrame(probs, index=adata.obs_names)
    table = probs.groupby(adata.obs[groupby].astype(str).to_numpy()).mean()
    if ax is None:
        _, ax = plt.subplots(figsize=(1 + 0.6 * table.shape[1], 1 + 0.4 * table.shape[0]))
    image = ax.imshow(table.to_numpy(), aspect="auto", cmap=cmap, vmin=0)
    ax.set_xticks(range(table.shape[1]), [str(c) for c in table.columns], rotation=90)
    ax.set_yticks(range(table.shape[0]), [str(r) for r in table.index])
    ax.set_xlabel("predicted novel cell type")
    ax.set_ylabel(groupby)
    ax.figure.colorbar(image, ax=ax, label="mean probability")
    if show:
        plt.show()
    return ax
