"""Embeddings against simple baselines with scib-metrics, as the foundation-model papers report."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scfm.data._validation import check_counts, check_obs_keys, get_matrix
from scfm.errors import AnnDataKeyError, InvalidInputError

logger = logging.getLogger(__name__)

__all__ = ["benchmark_embeddings"]

#: scib-metrics aggregate names -> the names used in the FM papers.
_AGGREGATES = {"Bio conservation": "AvgBIO", "Batch correction": "AvgBATCH", "Total": "Total"}
BASELINES = ("pca", "scvi")


def _pca_on_hvg(
    counts: sp.spmatrix | np.ndarray,
    obs: pd.DataFrame,
    batch_key: str,
    n_top_genes: int,
    n_comps: int,
    seed: int,
) -> np.ndarray:
    """PCA on log-normalised highly variable genes (the standard scanpy baseline)."""
    import scanpy as sc

    work = ad.AnnData(X=sp.csr_matrix(counts, dtype=np.float32), obs=obs.copy())
    sc.pp.normalize_total(work, target_sum=1e4)
    sc.pp.log1p(work)
    n_top = min(n_top_genes, work.n_vars)
    sc.pp.highly_variable_genes(work, n_top_genes=n_top, batch_key=batch_key, subset=True)
    n_comps = min(n_comps, work.n_obs - 1, work.n_vars - 1)
    sc.pp.pca(work, n_comps=n_comps, random_state=seed)
    return np.asarray(work.obsm["X_pca"])


def _scvi_latent(
    counts: sp.spmatrix | np.ndarray,
    obs: pd.DataFrame,
    batch_key: str,
    max_epochs: int | None,
    seed: int,
    progress_bar: bool,
) -> np.ndarray:
    """Latent space of scVI trained on the counts with the batch as covariate."""
    import scvi

    scvi.settings.seed = seed
    work = ad.AnnData(X=sp.csr_matrix(counts, dtype=np.float32), obs=obs.copy())
    scvi.model.SCVI.setup_anndata(work, batch_key=batch_key)
    model = scvi.model.SCVI(work, n_latent=30)
    model.train(max_epochs=max_epochs, enable_progress_bar=progress_bar)
    return model.get_latent_representation()


def benchmark_embeddings(
    adata: ad.AnnData,
    embedding_keys: Sequence[str],
    labels_key: str,
    batch_key: str,
    *,
    baselines: Sequence[str] = BASELINES,
    layer: str | None = None,
    n_top_genes: int = 2000,
    n_comps: int = 30,
    scvi_max_epochs: int | None = None,
    n_jobs: int = 1,
    seed: int = 0,
    key_added: str = "scfm_benchmark",
    progress_bar: bool = True,
) -> pd.DataFrame:
    """Score embeddings with scib-metrics against PCA-on-HVG and scVI baselines.

    The baselines are computed in the same call from the raw counts, so every embedding is
    judged on the same cells with the same metrics: bio conservation (isolated labels,
    k-means NMI / ARI, silhouette of labels, cLISI) and batch correction (BRAS, iLISI, kBET,
    graph connectivity, PCR comparison), aggregated as **AvgBIO** and **AvgBATCH** (the
    means of each group, as the foundation-model papers report) and scIB's **Total**
    (0.4 AvgBATCH + 0.6 AvgBIO).

    Parameters
    ----------
    adata
        AnnData of raw counts with the embeddings in ``.obsm``.
    embedding_keys
        ``.obsm`` keys to score (e.g. ``["X_geneformer", "X_cellplm"]``).
    labels_key
        ``.obs`` column with cell types.
    batch_key
        ``.obs`` column with batches (at least two).
    baselines
        Any of ``"pca"`` (PCA on highly variable genes of log-normalised counts, stored as
        ``X_pca_hvg``) and ``"scvi"`` (scVI latent with the batch as covariate, ``X_scvi``).
    layer
        Layer with raw counts for the baselines; ``None`` uses ``adata.X``.
    n_top_genes, n_comps
        HVG count and number of PCs of the PCA baseline.
    scvi_max_epochs
        scVI training epochs (``None``: scvi-tools' heuristic).
    n_jobs
        Parallel jobs of scib-metrics' neighbour search.
    seed
        Random seed of PCA and scVI.
    key_added
        The results are stored as ``adata.uns[key_added]`` (tidy DataFrame).
    progress_bar
        Show progress bars.

    Returns
    -------
    Tidy DataFrame with columns ``embedding``, ``metric``, ``metric_type`` (``"Bio
    conservation"``, ``"Batch correction"`` or ``"Aggregate score"``) and ``value``.
    Baselines appear as embeddings ``"PCA (HVG)"`` and ``"scVI"``.
    """
    from scib_metrics.benchmark import Benchmarker

    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise InvalidInputError(f"Unknown baselines {unknown}; choose from {list(BASELINES)}.")
    check_obs_keys(adata, [("labels_key", labels_key), ("batch_key", batch_key)])
    for key in embedding_keys:
        if key not in adata.obsm:
            raise AnnDataKeyError(
                f"{key!r} is not in adata.obsm (keys: {', '.join(adata.obsm.keys()) or 'none'})."
                " Compute it first, e.g. model.embed(adata, key_added=...)."
            )
    if adata.obs[batch_key].nunique() < 2:
        raise InvalidInputError(
            f"adata.obs[{batch_key!r}] has a single batch; batch-correction metrics need at "
            "least two."
        )
    check_counts(adata, layer)
    counts = get_matrix(adata, layer)
    obs = adata.obs[[labels_key, batch_key]].astype(str).astype("category")

    work = ad.AnnData(obs=obs.copy())
    names = {}
    for key in embedding_keys:
        work.obsm[key] = np.asarray(adata.obsm[key], dtype=np.float32)
        names[key] = key
    # PCR comparison needs the unintegrated PCA; computed even if not listed as a baseline.
    work.obsm["X_pca_hvg"] = _pca_on_hvg(counts, obs, batch_key, n_top_genes, n_comps, seed)
    if "pca" in baselines:
        names["X_pca_hvg"] = "PCA (HVG)"
    if "scvi" in baselines:
        work.obsm["X_scvi"] = _scvi_latent(
            counts, obs, batch_key, scvi_max_epochs, seed, progress_bar
        )
        names["X_scvi"] = "scVI"

    bench = Benchmarker(
        work,
        batch_key=batch_key,
        label_key=labels_key,
        embedding_obsm_keys=list(names),
        pre_integrated_embedding_obsm_key="X_pca_hvg",
        n_jobs=n_jobs,
        progress_bar=progress_bar,
    )
    bench.benchmark()
    wide = bench.get_results(min_max_scale=False)
    metric_type = wide.loc["Metric Type"]
    wide = wide.drop(index="Metric Type")
    tidy = (
        wide.reset_index(names="embedding")
        .melt(id_vars="embedding", var_name="metric", value_name="value")
        .assign(
            metric_type=lambda df: df["metric"].map(metric_type),
            embedding=lambda df: df["embedding"].map(names),
            metric=lambda df: df["metric"].replace(_AGGREGATES),
        )
    )
    tidy["value"] = tidy["value"].astype(float)
    tidy = tidy[["embedding", "metric", "metric_type", "value"]].reset_index(drop=True)
    adata.uns[key_added] = tidy
    return tidy
