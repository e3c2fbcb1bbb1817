"""scFoundation gene context embeddings in the layout GEARS consumes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np

from scfm.errors import InvalidInputError

if TYPE_CHECKING:
    from scfm.model._scfoundation import ScFoundation

__all__ = ["scfoundation_gears_embeddings"]


def scfoundation_gears_embeddings(
    model: ScFoundation,
    adata: ad.AnnData | None = None,
    indices: Sequence[int] | None = None,
    genes: Sequence[str] | None = None,
    *,
    batch_size: int | None = 4,
    progress_bar: bool = True,
) -> np.ndarray:
    """Per-cell gene context embeddings as input of GEARS perturbation prediction.

    The scFoundation GEARS integration replaces GEARS' learned gene embedding by the
    decoder output of the ``'gene'`` model for each (control) cell, with the target depth
    equal to the observed one (``T = S``; the reference's ``pre_normalized='A'`` input with
    ``highres=0``). Raw counts set up with ``pre_normalized="F"`` give the same input as
    the reference's normalised values plus total-count column.

    Parameters
    ----------
    model
        A :class:`~scfm.model.ScFoundation` with the ``'gene'`` weights:
        ``ScFoundation.from_pretrained(path, adata, weights="gene")``.
    adata
        AnnData set up for scFoundation (any genes); ``None`` uses the model's.
    indices
        Cells (typically the control cells of a perturbation batch).
    genes
        Gene symbols in the order of the GEARS gene list (all must be in
        ``model.vocabulary``); ``None``: the whole 19,264-gene list.
    batch_size
        Cells decoded at once (each takes ``19,266 x 512`` floats per layer).
    progress_bar
        Show a progress bar.

    Returns
    -------
    ``(n_cells, n_genes, 512)`` float32 array: ``out[c, g]`` is the embedding of gene
    ``g`` in cell ``c`` (GEARS ``hidden_size`` = 512).

    Raises
    ------
    InvalidInputError
        If the model holds released weights other than ``'gene'``.
    """
    if model.weights not in (None, "gene"):
        raise InvalidInputError(
            f"The model holds the {model.weights!r} weights; the GEARS integration uses the "
            "'gene' model: ScFoundation.from_pretrained(path, adata, weights='gene')."
        )
    return model.get_cell_gene_embeddings(
        adata,
        indices,
        genes,
        batch_size,
        progress_bar=progress_bar,
        tgthighres="f1",
        key_max="sample",
    )
