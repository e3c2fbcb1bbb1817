"""Expression imputation / denoising with a generative foundation model."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from scfm.errors import InvalidInputError
from scfm.model.base._foundation import record_in_uns

logger = logging.getLogger(__name__)

__all__ = ["impute", "impute_spatial"]


def impute(
    model: Any,
    adata: ad.AnnData | None = None,
    genes: Sequence[str] | str = "input",
    *,
    key_added: str | None = None,
    **kwargs: Any,
) -> pd.DataFrame:
    """Impute / denoise expression and write it to ``adata.layers[key_added]``.

    The model predicts the expression of each gene from the cell (and, for CellPLM, from the
    other cells of its sentence). Genes held out of the input (set to 0) are thereby imputed;
    measured genes are denoised. Values are on the count scale (see the model's
    ``get_imputed_expression``).

    Parameters
    ----------
    model
        A loaded model with a ``get_imputed_expression`` method (e.g.
        :class:`scfm.model.CellPLM`).
    adata
        AnnData set up like the model's; ``None`` uses the model's AnnData.
    genes
        ``"input"`` (the input genes the model knows) or a list of input gene names.
    key_added
        Layer name; default ``"<model name>_imputed"``. Genes the model cannot predict hold
        0 in the layer; the call is recorded in ``adata.uns["scfm"]["layers"][key_added]``.
    **kwargs
        Passed to ``get_imputed_expression`` (``sentence``, ``chunk_size``, ``sample``, ...).

    Returns
    -------
    The imputed values, cells x genes.
    """
    if not hasattr(model, "get_imputed_expression"):
        raise InvalidInputError(
            f"{type(model).__name__} has no expression decoder; imputation needs a generative "
            "model such as scfm.model.CellPLM."
        )
    target = model._validate_anndata(adata)
    frame = model.get_imputed_expression(target, genes=genes, **kwargs)
    key = key_added or f"{model._model_name}_imputed"
    pos = target.var_names.get_indexer(frame.columns)
    if (pos < 0).any():
        raise InvalidInputError(
            "impute writes a layer, so genes must be input genes; for genes absent from the "
            "input use scfm.tl.impute_spatial or model.get_imputed_expression(genes=...)."
        )
    layer = np.zeros(target.shape, dtype=np.float32)
    layer[:, pos] = frame.to_numpy(dtype=np.float32)
    target.layers[key] = layer
    info = {"model": type(model).__name__, "n_genes": len(pos)}
    info.update({k: v for k, v in kwargs.items() if isinstance(v, str | int | float | bool)})
    record_in_uns(target, "layers", key, info)
    return frame


def impute_spatial(
    model: Any,
    query: ad.AnnData,
    genes: Sequence[str],
    *,
    key_added: str | None = None,
    **kwargs: Any,
) -> pd.DataFrame:
    """Predict genes that a spatial query did not measure (e.g. from an scRNA-seq panel).

    The reference ``ImputationPipeline`` recipe: the query's cells are embedded sentence by
    sentence (field of view / tile), the decoder predicts every vocabulary gene, and the
    prediction is rescaled so the query's MEASURED genes sum to each cell's observed total.
    ``genes`` typically are genes of an scRNA-seq reference that the query panel lacks.
    Zero-shot, ``query`` is the spatial data alone. To fine-tune first, concatenate query
    (missing genes zero-filled) and scRNA reference with one ``batch_key`` label per dataset,
    call ``model.train_imputation(measured_genes)``, then call this with the same
    ``measured_genes``.

    Parameters
    ----------
    model
        A loaded :class:`scfm.model.CellPLM` whose vocabulary holds ``genes``.
    query
        The spatial AnnData (set up like the model's).
    genes
        Vocabulary (Ensembl) ids to predict.
    key_added
        ``adata.obsm`` key of the result (a DataFrame of cells x ``genes``, NaN for cells not
        selected); default ``"<model name>_imputed_genes"``.
    **kwargs
        Passed to ``get_imputed_expression``: ``measured_genes`` (``{batch label: genes}``
        for concatenated panels), ``sentence="spatial"``, ``tile_size``, ``indices``, ...

    Returns
    -------
    The predicted expression (count scale), cells x ``genes``.
    """
    if not hasattr(model, "get_imputed_expression"):
        raise InvalidInputError(f"{type(model).__name__} has no expression decoder.")
    query = model._validate_anndata(query)
    frame = model.get_imputed_expression(query, genes=list(genes), **kwargs)
    key = key_added or f"{model._model_name}_imputed_genes"
    # cells left out through ``indices`` get NaN rows
    query.obsm[key] = frame[~frame.index.duplicated()].reindex(query.obs_names)
    record_in_uns(query, "obsm", key, {"model": type(model).__name__, "n_genes": len(genes)})
    return frame
