"""Plots of in silico perturbation screens (:func:`scfm.tl.in_silico_perturbation`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd

from scfm.errors import AnnDataKeyError, InvalidInputError

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["perturbation_shifts", "perturbation_top_genes"]


def _screen(adata: ad.AnnData, key: str) -> Mapping[str, Any]:
    entry = adata.uns.get(key)
    if not isinstance(entry, Mapping) or "cells" not in entry:
        raise AnnDataKeyError(
            f"adata.uns[{key!r}] holds no perturbation screen; run "
            f"scfm.tl.in_silico_perturbation(model, adata, ..., key_added={key!r}) first."
        )
    return entry


def _default_column(entry: Mapping[str, Any]) -> str:
    states = entry["params"].get("cell_states_to_model")
    return f"shift_to_{states['goal_state']}" if states else "cos_sim"


def _show(ax: Axes, show: bool | None) -> Axes | None:
    if show:
        import matplotlib.pyplot as plt

        plt.show()
        return None
    return ax


def perturbation_shifts(
    adata: ad.AnnData,
    key: str = "perturbation",
    *,
    column: str | None = None,
    genes: Sequence[str] | None = None,
    bins: int = 50,
    ax: Axes | None = None,
    show: bool | None = None,
) -> Axes | None:
    """Distribution of a screen's per-(cell, perturbation) values.

    Parameters
    ----------
    adata
        AnnData on which :func:`scfm.tl.in_silico_perturbation` ran.
    key
        Its ``key_added``.
    column
        Column of the screen's table: default the shift towards the goal state for an in silico
        treatment, else ``"cos_sim"`` (1 = the cell embedding did not move).
    genes
        Perturbed genes (ids, or symbols of the screen's gene table) whose values are drawn on
        top of the whole distribution.
    bins
        Histogram bins.
    ax
        Axes to draw into; a new figure otherwise.
    show
        Show the figure (scanpy convention); ``None``/``False`` returns the axes.

    Returns
    -------
    The axes unless ``show`` is ``True``.
    """
    import matplotlib.pyplot as plt

    entry = _screen(adata, key)
    cells = entry["cells"]
    column = column or _default_column(entry)
    if column not in cells.columns:
        raise InvalidInputError(
            f"column={column!r} is not in the screen's table; use one of {list(cells.columns)}."
        )
    if ax is None:
        _, ax = plt.subplots(figsize=(5.0, 3.2))
    values = cells[column].to_numpy(np.float64)
    edges = np.histogram_bin_edges(values[np.isfinite(values)], bins=bins)
    ax.hist(values, bins=edges, color="lightgray", label="all perturbations", density=True)
    names = entry["gene_names"]
    by_symbol = dict(zip(names["symbol"].astype(str), names["gene_id"].astype(str)))
    for gene in genes or ():
        gid = by_symbol.get(gene, gene)
        sel = cells["perturbed"].astype(str).to_numpy() == gid
        if not sel.any():
            raise InvalidInputError(f"{gene!r} was not perturbed in this screen.")
        ax.hist(values[sel], bins=edges, histtype="step", density=True, lw=1.5, label=gene)
    if column.startswith("shift_to_") or column == "cos_sim":
        ax.axvline(1.0 if column == "cos_sim" else 0.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel(column)
    ax.set_ylabel("density")
    ax.legend(frameon=False, fontsize="small")
    return _show(ax, show)


def perturbation_top_genes(
    data: ad.AnnData | pd.DataFrame,
    key: str = "perturbation_goal_state_shift",
    n_top: int = 10,
    *,
    column: str = "shift_to_goal",
    ax: Axes | None = None,
    show: bool | None = None,
) -> Axes | None:
    """Genes whose perturbation moves cells most towards / away from the goal state.

    Parameters
    ----------
    data
        A table of :func:`scfm.tl.perturbation_statistics` (``mode="goal_state_shift"``), or an
        AnnData holding it in ``uns[key]``.
    key
        Where the table is in ``adata.uns`` (default: the statistics' default key).
    n_top
        Genes shown on each side.
    column
        The shift column to rank by.
    ax
        Axes to draw into; a new figure otherwise.
    show
        Show the figure (scanpy convention); ``None``/``False`` returns the axes.

    Returns
    -------
    The axes unless ``show`` is ``True``. Bars: red towards the goal, blue away from it;
    ``*`` marks FDR < 0.05.
    """
    import matplotlib.pyplot as plt

    table = data
    if isinstance(data, ad.AnnData):
        table = data.uns.get(key)
        if not isinstance(table, pd.DataFrame):
            raise AnnDataKeyError(
                f"adata.uns[{key!r}] holds no statistics table; run "
                "scfm.tl.perturbation_statistics(adata, 'goal_state_shift', ...) first."
            )
    if column not in table.columns:
        raise InvalidInputError(
            f"column={column!r} is not in the table; use one of {list(table.columns)}."
        )
    ranked = table.sort_values(column, ascending=False)
    toward = ranked[ranked[column] > 0].head(n_top)
    away = ranked[ranked[column] < 0].tail(n_top)
    shown = pd.concat([toward, away])
    labels = [
        (str(s) if isinstance(s, str) and s else str(g)) + ("*" if bool(sig) else "")
        for s, g, sig in zip(
            shown.get("symbol", shown["gene"]),
            shown["gene"],
            shown.get("significant", pd.Series(False, index=shown.index)),
        )
    ]
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 0.25 * len(shown) + 1.2))
    y = np.arange(len(shown))[::-1]
    values = shown[column].to_numpy(np.float64)
    ax.barh(y, values, color=np.where(values > 0, "tab:red", "tab:blue"))
    ax.set_yticks(y, labels)
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_xlabel(f"{column} (mean over cells)")
    ax.set_title("towards (red) / away from (blue) the goal state")
    return _show(ax, show)
