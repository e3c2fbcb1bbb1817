"""Expression imputation / denoising with a generative foundation model."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from scfm.data._validation import check_key_added
from scfm.errors import InvalidInputError
from scfm.model.base._foundation import record_in_uns

logger = logging.getLogger(__name__)

__all__ = ["impute", "impute_spatial"]


def _require_decoder(model: Any) -> None:
    if not getattr(model, "_has_decoder", False):
        raise InvalidInputError(
            f"{type(model).__name__} has no expression decoder; imputation needs a model that "
            "decodes expression: scfm.model.ScFoundation, CellFM or CellPLM."
        )


def impute(
    model: Any,
    adata: ad.AnnData | None = None,
    gene_list: Sequence[str] | None = None,
    *,
    key_added: str | None = None,
    **options: Any,
) -> pd.DataFrame:
    """Impute / denoise expression and write it to ``adata.layers[key_added]``.

    The model predicts the expression of each gene from the cell (and, for CellPLM, from the
    other cells of its sentence). Genes held out of the input (set to 0) are thereby imputed;
    measured genes are denoised. Works for every model with an expression decoder
    (ScFoundation, CellFM, CellPLM) through :meth:`get_normalized_expression`; values are on
    that model's scale (see its documentation).

    Parameters
    ----------
    model
        A loaded model with an expression decoder.
    adata
        AnnData set up like the model's; ``None`` uses the model's AnnData.
    gene_list
        Input genes (``adata.var_names``) to impute; ``None``: every input gene the model knows.
    key_added
        Layer name; default ``"<model name>_imputed"``. Genes the model cannot predict hold
        0 in the layer; the call is recorded in ``adata.uns["scfm"]["layers"][key_added]``.
    **options
        Passed to ``get_normalized_expression`` (``batch_size``, model options).

    Returns
    -------
    The imputed values, cells x genes.
    """
    _require_decoder(model)
    key = check_key_added(
        f"{model._model_name}_imputed" if key_added is None else key_added, where="adata.layers"
    )
    target = model._validate_anndata(adata)
    if gene_list is not None:
        absent = [g for g in gene_list if g not in target.var_names]
        if absent:
            raise InvalidInputError(
                "impute writes a layer, so gene_list must hold input genes "
                f"({', '.join(absent[:3])} are not in adata.var_names); for other genes use "
                "model.get_normalized_expression(gene_list=...)."
            )
    frame = model.get_normalized_expression(target, gene_list=gene_list, **options)
    pos = target.var_names.get_indexer(frame.columns)
    layer = np.zeros(target.shape, dtype=np.float32)
    layer[:, pos] = frame.to_numpy(dtype=np.float32)
    info = {"model": type(model).__name__, "n_genes": len(pos)}
    info.update({k: v for k, v in options.items() if isinstance(v, str | int | float | bool)})
    record_in_uns(target, "layers", key, info)
    target.layers[key] = layer
    return frame


def impute_spatial(
    model: Any,
    query: ad.AnnData,
    genes: Sequence[str],
    *,
    key_added: str | None = None,
    **options: Any,
) -> pd.DataFrame:
    """Predict genes that a spatial query did not measure (e.g. from an scRNA-seq panel).

    The reference ``ImputationPipeline`` recipe: the query's cells are embedded sentence by
    sentence (field of view / tile), the decoder predicts every vocabulary gene, and the
    prediction is rescaled so the query's MEASURED genes sum to each cell's observed total.
    ``genes`` typically are genes of an scRNA-seq reference that the query panel lacks.

    Parameters
    ----------
    model
        A loaded model with an expression decoder whose vocabulary holds ``genes``
        (:class:`scfm.model.CellPLM` for spatial data).
    query
        The spatial AnnData (set up like the model's).
    genes
        Vocabulary ids to predict.
    key_added
        ``adata.obsm`` key of the result (a DataFrame of cells x ``genes``); default
        ``"<model name>_imputed_genes"``.
    **options
        Passed to ``get_normalized_expression`` (CellPLM: ``sentence="spatial"``,
        ``tile_size``, ``measured_genes``, ...).

    Returns
    -------
    The predicted expression, cells x ``genes``.
    """
    _require_decoder(model)
    key = check_key_added(
        f"{model._model_name}_imputed_genes" if key_added is None else key_added,
        where="adata.obsm",
    )
    query = model._validate_anndata(query)
    frame = model.get_normalized_expression(query, gene_list=list(genes), **options)
    record_in_uns(query, "obsm", key, {"model": type(model).__name__, "n_genes": len(genes)})
    query.obsm[key] = frame.reindex(query.obs_names)
    return frame
