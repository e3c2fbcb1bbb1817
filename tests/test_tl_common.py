"""Model-independent tasks: kNN label transfer and benchmarking against baselines."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scanpy as sc

import scfm
from conftest import data_file
from scfm.errors import AnnDataKeyError, InvalidInputError


@pytest.fixture(scope="module")
def pbmc_pca():
    adata = ad.read_h5ad(data_file("pbmc68k_reduced_counts.h5ad"))
    norm = adata.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    sc.pp.pca(norm, n_comps=20, random_state=0)
    adata.obsm["X_pca"] = norm.obsm["X_pca"]
    return adata


def test_transfer_labels_recovers_held_out_cell_types(pbmc_pca):
    rng = np.random.default_rng(0)
    is_ref = rng.random(pbmc_pca.n_obs) < 0.5
    ref, query = pbmc_pca[is_ref].copy(), pbmc_pca[~is_ref].copy()
    truth = query.obs["bulk_labels"].astype(str).to_numpy()
    query.obs = query.obs.drop(columns="bulk_labels")
    result = scfm.tl.transfer_labels(ref, query, "bulk_labels", use_rep="X_pca", key_added="pred")
    accuracy = np.mean(query.obs["pred"].astype(str).to_numpy() == truth)
    chance = ref.obs["bulk_labels"].value_counts(normalize=True).max()
    assert accuracy > chance + 0.2, (accuracy, chance)
    conf = query.obs["pred_confidence"].to_numpy()
    assert np.all((conf > 0) & (conf <= 1))
    # confident calls are more often right than unsure ones
    right = query.obs["pred"].astype(str).to_numpy() == truth
    assert right[conf >= np.median(conf)].mean() >= right[conf < np.median(conf)].mean()
    assert list(result.index) == list(query.obs_names)


def test_transfer_labels_unanimous_neighbours_give_confidence_one():
    ref = ad.AnnData(np.zeros((4, 1)), obs={"ct": ["a", "a", "b", "b"]})
    ref.obsm["z"] = np.array([[0.0], [0.1], [10.0], [10.1]])
    query = ad.AnnData(np.zeros((2, 1)))
    query.obsm["z"] = np.array([[0.05], [10.05]])
    query.obs["ct"] = ["true a", "true b"]  # the query's own labels are never overwritten
    result = scfm.tl.transfer_labels(ref, query, "ct", use_rep="z", n_neighbors=2)
    assert result["label"].astype(str).tolist() == ["a", "b"]
    np.testing.assert_allclose(result["confidence"], [1.0, 1.0])
    assert query.obs["ct"].tolist() == ["true a", "true b"]
    assert query.obs["ct_transferred"].astype(str).tolist() == ["a", "b"]
    np.testing.assert_allclose(query.obs["ct_transferred_confidence"], [1.0, 1.0])


def test_transfer_labels_errors(pbmc_pca):
    query = pbmc_pca[:10].copy()
    with pytest.raises(AnnDataKeyError, match="use_rep='X_nope'"):
        scfm.tl.transfer_labels(pbmc_pca, query, "bulk_labels", use_rep="X_nope")
    query.obsm["X_pca"] = query.obsm["X_pca"][:, :5]
    with pytest.raises(InvalidInputError, match="same model"):
        scfm.tl.transfer_labels(pbmc_pca, query, "bulk_labels", use_rep="X_pca")
    with pytest.raises(AnnDataKeyError, match="labels_key"):
        scfm.tl.transfer_labels(pbmc_pca, query, "nope", use_rep="X_pca")
    with pytest.raises(InvalidInputError, match="'/'"):
        scfm.tl.transfer_labels(pbmc_pca, query, "bulk_labels", use_rep="X_pca", key_added="a/b")


@pytest.mark.slow
def test_benchmark_embeddings_against_baselines(tmp_path):
    adata = ad.read_h5ad(data_file("scirpy_wu2020_200_v0_11.h5ad"))
    norm = adata.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    sc.pp.pca(norm, n_comps=20, random_state=0)
    adata.obsm["X_mine"] = norm.obsm["X_pca"]
    rng = np.random.default_rng(0)
    adata.obsm["X_noise"] = rng.normal(size=(adata.n_obs, 20))
    res = scfm.tl.benchmark_embeddings(
        adata,
        ["X_mine", "X_noise"],
        "cluster_orig",
        "patient",
        scvi_max_epochs=5,
        progress_bar=False,
    )
    agg = res[res.metric_type == "Aggregate score"].pivot(
        index="embedding", columns="metric", values="value"
    )
    assert set(agg.index) == {"X_mine", "X_noise", "PCA (HVG)", "scVI"}
    assert set(agg.columns) == {"AvgBIO", "AvgBATCH", "Total"}
    # a real embedding conserves biology better than noise
    assert agg.loc["X_mine", "AvgBIO"] > agg.loc["X_noise", "AvgBIO"] + 0.05
    np.testing.assert_allclose(agg["Total"], 0.4 * agg["AvgBATCH"] + 0.6 * agg["AvgBIO"], atol=1e-6)
    assert adata.uns["scfm_benchmark"].equals(res)
    ax = scfm.pl.benchmark(res, show=False)
    ax.figure.savefig(tmp_path / "bench.png")


def test_benchmark_input_errors():
    adata = ad.read_h5ad(data_file("scirpy_wu2020_200_v0_11.h5ad"))
    with pytest.raises(AnnDataKeyError, match="X_missing"):
        scfm.tl.benchmark_embeddings(adata, ["X_missing"], "cluster_orig", "patient")
    adata.obsm["X_a"] = np.zeros((adata.n_obs, 2))
    with pytest.raises(InvalidInputError, match="single batch"):
        adata.obs["one"] = "b"
        scfm.tl.benchmark_embeddings(adata, ["X_a"], "cluster_orig", "one")
    with pytest.raises(InvalidInputError, match="Unknown baselines"):
        scfm.tl.benchmark_embeddings(adata, ["X_a"], "cluster_orig", "patient", baselines=["umap"])
