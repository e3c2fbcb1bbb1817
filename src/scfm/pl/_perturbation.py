"""Plot of an in-silico perturbation result (:func:`scfm.tl.in_silico_perturbation`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anndata as ad
import pandas as pd

from scfm.errors import AnnDataKeyError

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["perturbation_shifts"]


def perturbation_shifts(
    adata: ad.AnnData,
    key: str = "geneformer_isp",
    n_top: int = 20,
    *,
    gene_symbols: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
) -> Axes | None:
    """Bar plot of the genes whose embeddings shift most under a perturbation.

    Parameters
    ----------
    adata
        AnnData on which :func:`scfm.tl.in_silico_perturbation` ran.
    key
        Its ``key_added`` (the table in ``adata.uns[key]``).
    n_top
        Number of genes to show.
    gene_symbols
        Column of ``adata.var`` with display names for the (Ensembl) gene ids, indexed by
        ``adata.var_names``; ``"gencode"`` looks the symbols up in the bundled GENCODE v48
        table (useful when ``var_names`` were symbols converted to Ensembl ids); ``None``
        shows the ids.
    ax
        Axes to draw into; a new figure otherwise.
    show
        Show the figure (scanpy convention); ``None``/``False`` returns the axes.

    Returns
    -------
    The axes unless ``show`` is ``True``.
    """
    import matplotlib.pyplot as plt

    if key not in adata.uns or not isinstance(adata.uns[key], pd.DataFrame):
        raise AnnDataKeyError(
            f"adata.uns[{key!r}] holds no perturbation table; run "
            f"scfm.tl.in_silico_perturbation(model, adata, ..., key_added={key!r}) first."
        )
    table = adata.uns[key].sort_values("shift", ascending=False).head(n_top)
    labels = table.index.astype(str)
    if gene_symbols == "gencode":
        from scfm.data import map_gene_ids

        symbols = map_gene_ids(labels, to="symbol")
        labels = [s if isinstance(s, str) else g for g, s in zip(labels, symbols)]
    elif gene_symbols is not None:
        if gene_symbols not in adata.var.columns:
            raise AnnDataKeyError(f"gene_symbols={gene_symbols!r} is not a column of adata.var.")
        names = adata.var[gene_symbols].astype(str)
        labels = [names.get(g, g) for g in labels]
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 0.25 * len(table) + 1.0))
    ax.barh(range(len(table))[::-1], table["shift"].to_numpy(), color="tab:red")
    ax.set_yticks(range(len(table))[::-1], labels)
    ax.set_xlabel("embedding shift (1 - cosine similarity)")
    ax.set_title(adata.uns.get("scfm", {}).get("obs", {}).get(key, {}).get("genes", key))
    if show:
        plt.show()
        return None
    return ax
