"""Streaming TileDB-SOMA / CELLxGENE Census data for training any scfm model.

The heavy lifting is done by existing engines: ``tiledbsoma`` reads the data,
``tiledbsoma_ml`` shuffles, batches and shards it across DDP ranks and DataLoader workers,
and scvi-tools' :class:`~scvi.dataloaders.TileDBDataModule` turns it into a Lightning data
module. :class:`SomaDataModule` only adds what an scfm model needs: the query's gene axis is
mapped ONCE onto the model's gene space (through the model's AnnData, which the model aligned
to its vocabulary), so every minibatch arrives as counts in exactly the layout the module
reads, as from the in-memory loader. Per-cell plans that need a whole AnnData (e.g. CellFM's
all-gene totals) are not available while streaming; modules fall back to their in-batch
values.

Example (CELLxGENE Census, with the cell filter of the BioNeMo sc-FM model card)::

    import cellxgene_census, tiledbsoma
    census = cellxgene_census.open_soma(census_version="stable")
    query = census["census_data"]["homo_sapiens"].axis_query(
        "RNA", obs_query=tiledbsoma.AxisQuery(value_filter=scfm.data.CENSUS_BIONEMO_FILTER)
    )
    template = scfm.data.soma_template(query, n_cells=2_000)   # small in-memory AnnData
    scfm.model.Geneformer.setup_anndata(template, gene_id_key="feature_id")
    model = scfm.model.Geneformer(template)
    dm = scfm.data.SomaDataModule(query, model, batch_size=32)
    model.train(datamodule=dm, max_epochs=1, accelerator="gpu", devices=8, strategy="ddp")
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from scvi import REGISTRY_KEYS
from scvi.dataloaders import TileDBDataModule

from scfm.errors import InvalidInputError

if TYPE_CHECKING:
    import tiledbsoma

logger = logging.getLogger(__name__)

__all__ = ["CENSUS_BIONEMO_FILTER", "SomaDataModule", "embed_soma", "soma_template"]

#: Census obs filter of the BioNeMo Geneformer (sc-FM) model card: primary data, healthy
#: donors, cells with a known suspension type.
CENSUS_BIONEMO_FILTER = (
    "is_primary_data == True and disease == 'normal' and suspension_type != 'na'"
)
#: Constant batch label used when no batch column is given.
_NO_BATCH = "0"


def soma_template(
    query: tiledbsoma.ExperimentAxisQuery,
    *,
    X_name: str = "raw",
    n_cells: int = 1_000,
    var_id_column: str | None = None,
    obs_columns: list[str] | None = None,
) -> ad.AnnData:
    """A small in-memory AnnData with the query's genes and its first ``n_cells`` cells.

    It is what a model is built and set up with before streaming the whole query: the gene
    axis (and so the vocabulary alignment) is the query's.

    Parameters
    ----------
    query
        The SOMA ``ExperimentAxisQuery``.
    X_name
        X layer with raw counts (``"raw"`` in the Census).
    n_cells
        Cells read into memory (for ``setup_anndata``'s count checks).
    var_id_column
        ``var`` column used as ``var_names`` (default ``"feature_id"`` if present, e.g. the
        Census' Ensembl ids, else the first non-joinid column).
    obs_columns
        ``obs`` columns to read (default: all).

    Returns
    -------
    AnnData with ``min(n_cells, query.n_obs)`` cells and all query genes.
    """
    obs_ids = query.obs_joinids().to_numpy()[: max(1, int(n_cells))]
    exp = query.experiment
    measurement = query.measurement_name
    var = query.var().concat().to_pandas()
    column = _var_id_column(var, var_id_column)
    with exp.axis_query(
        measurement,
        obs_query=_coords_query(obs_ids),
        var_query=_coords_query(query.var_joinids().to_numpy()),
    ) as small:
        adata = small.to_anndata(
            X_name=X_name, column_names={"obs": obs_columns} if obs_columns else None
        )
    adata.var_names = pd.Index(var[column].astype(str).to_numpy())
    adata.obs_names = adata.obs_names.astype(str)
    return adata


def embed_soma(
    model: Any,
    query: tiledbsoma.ExperimentAxisQuery,
    *,
    X_name: str = "raw",
    chunk_size: int = 10_000,
    var_id_column: str | None = None,
    progress_bar: bool = True,
    **kwargs: Any,
) -> np.ndarray:
    """Cell embeddings of every cell of a SOMA query, read ``chunk_size`` cells at a time.

    Memory is bounded by the chunk, whatever the size of the query. Each chunk is read with
    its genes reordered onto the model's genes (as in :class:`SomaDataModule`) and embedded
    with ``model.get_latent_representation``.

    Parameters
    ----------
    model
        A set-up scfm model.
    query
        SOMA ``ExperimentAxisQuery``.
    X_name
        X layer with raw counts.
    chunk_size
        Cells read into memory at once.
    var_id_column
        Query ``var`` column matched against the model's gene ids (default ``feature_id``).
    progress_bar
        Show a progress bar over chunks.
    **kwargs
        Passed to ``model.get_latent_representation`` (``batch_size``, model options).

    Returns
    -------
    Array ``(query.n_obs, n_latent)``, rows in the query's ``soma_joinid`` order.
    """
    from tqdm.auto import tqdm

    gene_index = SomaDataModule._map_genes(query, model, var_id_column).numpy()
    found = gene_index >= 0
    var_ids = query.var_joinids().to_numpy()
    obs_ids = np.sort(query.obs_joinids().to_numpy())
    exp, measurement = query.experiment, query.measurement_name
    template = model.adata
    setup = model.setup_args
    obs_columns = [c for c in (setup.get("batch_key"), setup.get("labels_key")) if c]
    chunks = [obs_ids[i : i + chunk_size] for i in range(0, len(obs_ids), chunk_size)]
    out = []
    for ids in tqdm(chunks, desc="SOMA chunks", unit="chunk", disable=not progress_bar):
        with exp.axis_query(
            measurement, obs_query=_coords_query(ids), var_query=_coords_query(var_ids)
        ) as chunk_query:
            chunk = chunk_query.to_anndata(
                X_name=X_name, column_names={"obs": ["soma_joinid", *obs_columns]}
            )
        rows = np.argsort(chunk.obs["soma_joinid"].to_numpy())  # soma_joinid order
        x = sp.csr_matrix(chunk.X)[rows]
        cols = np.where(found, gene_index, 0)
        # genes the query lacks are zero columns
        x = x[:, cols].multiply(found[None, :].astype(np.float32)).tocsr()
        obs = chunk.obs.iloc[rows][obs_columns].reset_index(drop=True)
        obs.index = ids.astype(str)
        piece = ad.AnnData(X=x.astype(np.float32), obs=obs, var=template.var.copy())
        out.append(model.get_latent_representation(piece, progress_bar=False, **kwargs))
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def _coords_query(ids: np.ndarray):
    import tiledbsoma

    return tiledbsoma.AxisQuery(coords=(ids,))


def _var_id_column(var: pd.DataFrame, var_id_column: str | None) -> str:
    if var_id_column is not None:
        if var_id_column not in var.columns:
            raise InvalidInputError(
                f"var_id_column={var_id_column!r} is not a var column of the query (columns: "
                f"{', '.join(var.columns)})."
            )
        return var_id_column
    if "feature_id" in var.columns:
        return "feature_id"
    candidates = [c for c in var.columns if c != "soma_joinid"]
    if not candidates:
        raise InvalidInputError("The query's var has no id column; pass var_id_column.")
    return candidates[0]


class SomaDataModule(TileDBDataModule):
    """Lightning data module streaming a SOMA query into an scfm model's training loop.

    A thin subclass of scvi-tools' :class:`~scvi.dataloaders.TileDBDataModule`: minibatches
    are read, shuffled and sharded across DDP ranks by ``tiledbsoma_ml`` (each rank sees a
    disjoint part of the cells), then the gene axis is reordered onto the model's genes (once
    computed index; genes the query lacks are zero) and the batch / label columns are encoded.

    Parameters
    ----------
    query
        SOMA ``ExperimentAxisQuery`` (e.g. from ``cellxgene_census.open_soma()``).
    model
        The scfm model to train; its AnnData's ``var`` (``setup_anndata``'s ``gene_id_key``
        column, or ``var_names``) defines the gene order of the minibatches.
    X_name
        X layer with raw counts (``"raw"`` in the Census).
    batch_key
        obs column(s) forming the batch label; ``None``: one batch.
    labels_key
        obs column(s) forming the cell label (fine-tuning); ``None``: no labels.
    var_id_column
        Query ``var`` column matched against the model's gene ids (default ``feature_id``).
    batch_size
        Cells per minibatch.
    shuffle
        Shuffle cells (in chunks, as ``tiledbsoma_ml`` does) every epoch.
    seed
        Shuffle seed.
    train_size
        Fraction of cells used for training (the rest for validation).
    **kwargs
        Passed to :class:`tiledbsoma_ml.ExperimentDataset` (e.g. ``io_batch_size``).
    """

    def __init__(
        self,
        query: tiledbsoma.ExperimentAxisQuery,
        model: Any,
        *,
        X_name: str = "raw",
        batch_key: str | list[str] | None = None,
        labels_key: str | list[str] | None = None,
        var_id_column: str | None = None,
        batch_size: int = 32,
        shuffle: bool = True,
        seed: int = 0,
        train_size: float = 1.0,
        dataloader_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._has_batch = batch_key is not None
        batch_columns = [batch_key] if isinstance(batch_key, str) else list(batch_key or [])
        if not batch_columns:
            # tiledbsoma_ml needs one obs column to read; ignored by _add_batch_col.
            batch_columns = ["soma_joinid"]
        label_columns = [labels_key] if isinstance(labels_key, str) else labels_key
        super().__init__(
            query,
            layer_name=X_name,
            batch_size=batch_size,
            shuffle=shuffle,
            seed=seed,
            batch_column_names=batch_columns,
            batch_labels=None if self._has_batch else [_NO_BATCH],
            label_keys=label_columns,
            train_size=float(train_size),
            split_seed=seed,
            dataloader_kwargs=dataloader_kwargs,
            model_name=type(model).__name__,
            **kwargs,
        )
        self.gene_index = self._map_genes(query, model, var_id_column)
        # The template AnnData's genes -> the model's gene space (what module.inference reads).
        self.gene_space = model._gene_space(model.adata)[1]
        self.model = model
        # Batch / label codes must be the model's own (its registry from setup_anndata), not
        # an encoding fitted on this query, so that e.g. label 3 means the same cell type.
        self._model_codes = {
            key: self._registry_categories(model, key, arg)
            for key, arg in (
                (REGISTRY_KEYS.BATCH_KEY, "batch_key" if self._has_batch else None),
                (REGISTRY_KEYS.LABELS_KEY, "labels_key" if labels_key is not None else None),
            )
        }

    @staticmethod
    def _registry_categories(model: Any, registry_key: str, arg: str | None) -> pd.Index | None:
        if arg is None or model.setup_args.get(arg) is None:
            return None
        state = model.adata_manager.get_state_registry(registry_key)
        return pd.Index(np.asarray(state.categorical_mapping).astype(str))

    def _encode(self, registry_key: str, values: pd.Series) -> torch.Tensor | None:
        categories = self._model_codes[registry_key]
        if categories is None:
            return None
        codes = categories.get_indexer(values.astype(str))
        if (codes < 0).any():
            unknown = sorted(set(values.astype(str)[codes < 0]))[:5]
            raise InvalidInputError(
                f"The SOMA query has {registry_key} values the model was not set up with "
                f"({', '.join(unknown)}). Set the model up with a template holding every "
                "category, or filter the query."
            )
        return torch.as_tensor(codes, dtype=torch.long)[:, None]

    @staticmethod
    def _map_genes(query, model, var_id_column: str | None) -> torch.Tensor:
        """For each model gene, its column in the query's X (``-1``: absent)."""
        var = query.var().concat().to_pandas()
        column = _var_id_column(var, var_id_column)
        position = pd.Index(var[column].astype(str)).get_indexer
        gene_id_key = model.setup_args.get("gene_id_key")
        model_var = model.adata.var
        model_ids = model_var[gene_id_key] if gene_id_key else model_var.index
        index = position(pd.Index(model_ids.astype(str)))
        n_found = int((index >= 0).sum())
        if n_found == 0:
            raise InvalidInputError(
                f"None of the model's {len(index)} genes is in the query's var[{column!r}]. "
                "Pass var_id_column=<the var column with the model's gene ids>."
            )
        logger.info("SOMA query: %d of the model's %d genes found", n_found, len(index))
        return torch.as_tensor(index, dtype=torch.long)

    def _add_batch_col(self, obs_df: pd.DataFrame, inplace: bool = False) -> pd.DataFrame:
        if self._has_batch:
            return super()._add_batch_col(obs_df, inplace=inplace)
        if not inplace:
            obs_df = obs_df.copy()
        obs_df[self.batch_colname] = _NO_BATCH
        if self.labels is not None:
            obs_df[self.label_colname] = (
                obs_df[self.label_keys].astype(str).agg(self.labels_colsep.join, axis=1)
            )
        return obs_df

    def on_before_batch_transfer(self, batch, dataloader_idx: int) -> dict[str, torch.Tensor]:
        tensors = super().on_before_batch_transfer(batch, dataloader_idx)
        obs = batch[1]  # the parent added its batch / label columns to it
        for key, column in (
            (REGISTRY_KEYS.BATCH_KEY, self.batch_colname),
            (REGISTRY_KEYS.LABELS_KEY, self.label_colname),
        ):
            codes = self._encode(key, obs[column]) if column in obs else None
            if codes is not None:
                tensors[key] = codes
        x = tensors[REGISTRY_KEYS.X_KEY]
        if x.ndim == 1:  # tiledbsoma_ml returns a 1-d row for batch_size=1
            x = x[None, :]
        found = self.gene_index >= 0
        out = torch.zeros(x.shape[0], len(self.gene_index), dtype=torch.float32)
        out[:, found] = x[:, self.gene_index[found]].float()
        tensors[REGISTRY_KEYS.X_KEY] = torch.from_numpy(self.gene_space.map(out.numpy()))
        for key, values in self.model._streamed_plan(obs, "train").items():
            tensors[key] = torch.as_tensor(np.asarray(values))
        if tensors[REGISTRY_KEYS.LABELS_KEY].numel() == 0:
            tensors[REGISTRY_KEYS.LABELS_KEY] = torch.zeros(x.shape[0], 1, dtype=torch.long)
        return {k: v for k, v in tensors.items() if v is not None}
