"""CellPLM parity with the reference pipelines (fixture ../shared/fixtures/cellplm) and loading."""

from __future__ import annotations

import json
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import scfm
from conftest import fixture_dir
from scfm.errors import (
    AnnDataKeyError,
    CheckpointKeyError,
    CheckpointNotFoundError,
    CountDataError,
    SpatialCoordinateError,
)

ATOL = 1e-4
VAE, GMVAE = "20231027_85M", "20230926_85M"
PREFIXES = {VAE: "", GMVAE: "gmvae_"}


@pytest.fixture(scope="module")
def fx():
    return fixture_dir("cellplm")


@pytest.fixture(scope="module")
def settings(fx):
    """Seeds and chunk size the reference was run with (run_info.json, README defaults)."""
    path = fx / "run_info.json"
    info = json.loads(path.read_text()) if path.exists() else {}
    return {"emb_seed": 11, "imp_seed": 12, "chunk": 16, **info.get("settings", {})}


@pytest.fixture(scope="module")
def expected(fx):
    return dict(np.load(fx / "expected.npz"))


def _adata(fx, **setup):
    adata = ad.read_h5ad(fx / "input.h5ad")
    scfm.model.CellPLM.setup_anndata(adata, **setup)
    return adata


@pytest.fixture(scope="module")
def models(fx):
    adata = _adata(fx)
    return adata, {
        p: scfm.model.CellPLM.from_pretrained(fx / "checkpoint", adata, prefix=p) for p in PREFIXES
    }


def _close(actual, desired):
    np.testing.assert_allclose(np.asarray(actual), desired, atol=ATOL, rtol=0)


@pytest.mark.parametrize("prefix", list(PREFIXES))
def test_intermediates(models, expected, prefix):
    _, m = models
    px = PREFIXES[prefix]
    for layer, key in [
        ("embedder", "h_embed"),
        ("encoder", "h_encoder"),
        ("pre_latent", "h_prelatent"),
    ]:
        _close(
            m[prefix].get_latent_representation(layer=layer, progress_bar=False), expected[px + key]
        )


def test_vae_embeddings(models, expected, settings):
    adata, m = models
    model = m[VAE]
    assert model.config.latent_mod == "vae"
    _close(model.get_latent_representation(progress_bar=False), expected["cell_embeddings"])
    # obsm["spatial"] is registered by default but the released model ignores coordinates
    assert model.setup_args["spatial_key"] == "spatial"
    _close(model.get_latent_representation(progress_bar=False), expected["cell_embeddings_spatial"])
    _close(
        model.get_latent_representation(chunk_size=settings["chunk"], progress_bar=False),
        expected["cell_embeddings_chunked"],
    )
    # packing several sentences per minibatch or one per minibatch gives the same numbers
    _close(
        model.get_latent_representation(batch_size=1, progress_bar=False),
        expected["cell_embeddings"],
    )
    # the reference's sentence order: labels sorted, cells in AnnData order
    labels = adata.obs["batch"].astype(str).to_numpy()
    order = np.concatenate([np.flatnonzero(labels == b) for b in sorted(set(labels))])
    np.testing.assert_array_equal(order, expected["feed_order"])


def test_gmvae_embeddings(models, expected, settings):
    _, m = models
    model = m[GMVAE]
    seed = settings["emb_seed"]
    _close(
        model.get_latent_representation(progress_bar=False),
        expected["gmvae_cell_embeddings_argmax"],
    )
    # deterministic by default
    _close(
        model.get_latent_representation(progress_bar=False),
        expected["gmvae_cell_embeddings_argmax"],
    )
    _close(
        model.get_latent_representation(layer="cluster_logits", progress_bar=False),
        expected["gmvae_latent_logits"],
    )
    z = model.get_latent_representation(sample=True, seed=seed, progress_bar=False)
    _close(z, expected["gmvae_cell_embeddings"])
    _close(z, expected["gmvae_cell_embeddings_spatial"])
    y = model.get_latent_representation(layer="cluster", sample=True, seed=seed, progress_bar=False)
    np.testing.assert_array_equal(y, expected["gmvae_latent_y"])
    kw = {"sample": True, "seed": seed, "chunk_size": settings["chunk"], "progress_bar": False}
    _close(model.get_latent_representation(**kw), expected["gmvae_cell_embeddings_chunked"])
    np.testing.assert_array_equal(
        model.get_latent_representation(layer="cluster", **kw), expected["gmvae_chunked_latent_y"]
    )
    # seed=None reproduces the reference after torch.manual_seed (global RNG)
    torch.manual_seed(seed)
    _close(
        model.get_latent_representation(sample=True, progress_bar=False),
        expected["gmvae_cell_embeddings"],
    )
    if (
        np.abs(expected["gmvae_cell_embeddings"] - expected["gmvae_cell_embeddings_argmax"]).max()
        > 0
    ):
        # sampling matters for this model: another seed gives other clusters somewhere
        other = model.get_latent_representation(sample=True, seed=seed + 1, progress_bar=False)
        assert np.abs(other - expected["gmvae_cell_embeddings"]).max() > 1e-3


def test_embed_writes_obsm(fx, expected):
    adata = _adata(fx)
    model = scfm.model.CellPLM.from_pretrained(fx / "checkpoint" / VAE, adata)
    model.embed(adata, key_added="emb", progress_bar=False)
    _close(adata.obsm["emb"], expected["cell_embeddings"])
    assert adata.uns["scfm"]["obsm"]["emb"]["checkpoint"].endswith(VAE)
    assert VAE in model._model_summary_string


def test_kept_genes(models, expected):
    adata, m = models
    alignment = m[VAE].gene_alignment
    np.testing.assert_array_equal(adata.var_names[alignment.var_index], expected["kept_genes"])
    np.testing.assert_array_equal(alignment.vocab_index, expected["kept_gene_vocab_index"])
    n_kept = len(expected["kept_genes"])
    assert adata.uns["scfm"]["gene_alignment"]["cellplm"]["n_matched"] == n_kept


def test_sentences(models, expected, settings):
    adata, _ = models
    from scfm.data._cellplm_sentences import label_codes

    groups = label_codes(adata.obs["batch"])
    sentence = scfm.data.cellplm_sentence_ids(groups)
    np.testing.assert_array_equal(np.bincount(sentence), expected["feed_batch_sizes"])
    np.testing.assert_array_equal(np.argsort(sentence, kind="stable"), expected["feed_order"])
    chunked = scfm.data.cellplm_sentence_ids(groups, chunk_size=settings["chunk"])
    np.testing.assert_array_equal(np.bincount(chunked), expected["chunked_chunk_sizes"])
    # packing keeps whole sentences together and respects batch_size where it can
    packs = scfm.data.cellplm_pack_sentences(chunked, batch_size=2 * settings["chunk"])
    assert sorted(np.concatenate(packs).tolist()) == list(range(len(chunked)))
    for pos in packs:
        ids = np.unique(chunked[pos])
        assert np.isin(np.flatnonzero(np.isin(chunked, ids)), pos).all()
    # numeric labels sort as numbers (sklearn LabelEncoder), strings as strings
    np.testing.assert_array_equal(label_codes(np.array([10, 2, 1])), [2, 1, 0])
    np.testing.assert_array_equal(label_codes(np.array(["10", "2", "1"])), [1, 2, 0])


def test_expression_input(models, expected, fx):
    adata, m = models
    alignment = m[VAE].gene_alignment
    x = torch.as_tensor(adata.X.toarray())
    tokens = scfm.data.cellplm_expression_input(x, torch.as_tensor(alignment.var_index))
    _close(tokens, expected["x_log1p_dense"])


def test_gene_embeddings_are_embedding_rows(models, fx):
    _, m = models
    genes = m[VAE].get_gene_embeddings(progress_bar=False)
    state = torch.load(fx / "checkpoint" / f"{VAE}.best.ckpt", weights_only=True)[
        "model_state_dict"
    ]
    gene_list = m[VAE].gene_list
    rows = [gene_list.index(g) for g in genes.index]
    _close(genes.to_numpy(), state["embedder.feat_enc.emb"][rows].numpy())


def test_indices_subset_order(models, expected):
    _, m = models
    idx = np.array([5, 3, 59, 3])
    z = m[VAE].get_latent_representation(indices=idx, progress_bar=False)
    full = m[VAE].get_latent_representation(indices=np.unique(idx), progress_bar=False)
    _close(z, full[[1, 0, 2, 0]])
    # a sentence of fewer cells gives different embeddings (cells attend to each other)
    assert np.abs(z[1] - expected["cell_embeddings"][3]).max() > 1e-3


def test_query_with_new_or_absent_batch_labels_and_coordinates(models, expected, fx):
    """A new batch label is a sentence of its own; without the column, one sentence.
    Coordinates are needed only where the model reads them."""
    adata, m = models
    first = adata.obs["batch"].astype(str).to_numpy()[0]
    idx = np.flatnonzero(adata.obs["batch"].astype(str).to_numpy() == first)
    renamed = adata[idx].copy()  # shares the fixture's scvi-tools id, as copies do
    renamed.obs["batch"] = pd.Categorical(["a sample the model never saw"] * len(idx))
    _close(m[VAE].get_latent_representation(renamed, progress_bar=False),
           expected["cell_embeddings"][idx])  # fmt: skip
    absent = adata[idx].copy()
    del absent.obs["batch"], absent.obsm["spatial"]
    scfm.model.CellPLM.setup_anndata(absent)
    _close(m[VAE].get_latent_representation(absent, progress_bar=False),
           expected["cell_embeddings"][idx])  # fmt: skip
    with pytest.raises(SpatialCoordinateError, match="obsm has no 'spatial'"):
        m[VAE].get_latent_representation(absent, sentence="spatial", progress_bar=False)
    spatial = scfm.model.CellPLM.from_pretrained(
        fx / "checkpoint", adata, prefix=VAE, spatial_encoding=True
    )
    with pytest.raises(SpatialCoordinateError, match="obsm has no 'spatial'"):
        spatial.get_latent_representation(absent, progress_bar=False)


@pytest.mark.parametrize("prefix", list(PREFIXES))
def test_imputation(fx, expected, settings, prefix):
    px = PREFIXES[prefix]
    kw = {"sample": True, "seed": settings["imp_seed"]} if px else {}
    adata = ad.read_h5ad(fx / "input.h5ad")
    targets = [str(g) for g in expected["imputation_target_genes"]]
    pos = adata.var_names.get_indexer(targets)
    x = adata.X.toarray()
    np.testing.assert_array_equal(x[:, pos], expected["imputation_truth"])
    x[:, pos] = 0
    adata.X = x
    scfm.model.CellPLM.setup_anndata(adata)
    model = scfm.model.CellPLM.from_pretrained(fx / "checkpoint", adata, prefix=prefix)
    out = scfm.tl.impute(model, progress_bar=False, **kw)
    assert list(out.columns) == [str(g) for g in expected["kept_genes"]]
    _close(out, expected[px + "imputed_all_kept_genes"])
    _close(adata.layers["cellplm_imputed"][:, adata.var_names.get_indexer(out.columns)], out)
    assert "cellplm_imputed" in adata.uns["scfm"]["layers"]
    _close(
        model.get_imputed_expression(genes=targets, progress_bar=False, **kw),
        expected[px + "imputed_target_genes"],
    )
    raw = model.get_imputed_expression(genes="vocabulary", rescale=False, progress_bar=False, **kw)
    _close(raw, expected[px + "imputation_dec_mean_raw"])
    if px:
        _close(
            model.get_imputed_expression(progress_bar=False),
            expected[px + "imputed_all_kept_genes_argmax"],
        )
        y = model.get_latent_representation(layer="cluster", progress_bar=False, **kw)
        np.testing.assert_array_equal(y, expected["gmvae_imputation_latent_y"])


@pytest.mark.parametrize("prefix", list(PREFIXES))
def test_reconstruction(models, expected, settings, prefix):
    _, m = models
    px = PREFIXES[prefix]
    kw = {"sample": True, "seed": settings["imp_seed"]} if px else {}
    _close(
        m[prefix].get_imputed_expression(progress_bar=False, **kw),
        expected[px + "reconstructed_expression"],
    )


# ---------------------------------------------------------------------------- loading variants
def test_path_forms(fx, tmp_path, expected):
    adata = _adata(fx)
    ckpt = fx / "checkpoint"
    for path, prefix in [
        (ckpt / VAE, None),
        (ckpt / f"{VAE}.best.ckpt", None),
        (ckpt / f"{VAE}.config.json", None),
    ]:
        m = scfm.model.CellPLM.from_pretrained(path, adata, prefix=prefix)
        _close(m.get_latent_representation(progress_bar=False), expected["cell_embeddings"])
    # the fixture contract: the folder alone gives the newest release (20231027_85M)
    m = scfm.model.CellPLM.from_pretrained(ckpt, adata)
    assert m.config.latent_mod == "vae"
    _close(m.get_latent_representation(progress_bar=False), expected["cell_embeddings"])
    with pytest.raises(CheckpointNotFoundError, match="20231027_85M"):
        scfm.model.CellPLM.from_pretrained(ckpt, adata, prefix="20990101_1M")
    # one model in the folder: prefix optional; a plain state dict + extra entries also load
    single = tmp_path / "ckpt"
    single.mkdir()
    shutil.copy(ckpt / f"{GMVAE}.config.json", single / f"{GMVAE}.config.json")
    state = torch.load(ckpt / f"{GMVAE}.best.ckpt", weights_only=True)
    torch.save({**state, "epoch": 3}, single / f"{GMVAE}.best.ckpt")
    m = scfm.model.CellPLM.from_pretrained(single, adata)
    assert m.config.latent_mod == "gmvae"
    _close(
        m.get_latent_representation(progress_bar=False), expected["gmvae_cell_embeddings_argmax"]
    )
    torch.save(state["model_state_dict"], single / f"{GMVAE}.best.ckpt")
    m = scfm.model.CellPLM.from_pretrained(single, adata)
    _close(
        m.get_latent_representation(progress_bar=False), expected["gmvae_cell_embeddings_argmax"]
    )


def test_strict_keys(fx, tmp_path):
    adata = _adata(fx)
    src = fx / "checkpoint"
    state = torch.load(src / f"{VAE}.best.ckpt", weights_only=True)["model_state_dict"]
    shutil.copy(src / f"{VAE}.config.json", tmp_path / f"{VAE}.config.json")

    def load(sd):
        torch.save({"model_state_dict": sd}, tmp_path / f"{VAE}.best.ckpt")
        return scfm.model.CellPLM.from_pretrained(tmp_path, adata)

    # the unused keys the spec lists may be absent
    trimmed = {
        k: v for k, v in state.items() if not k.startswith(("embedder.norm0", "embedder.pe_enc"))
    }
    load(trimmed)
    missing = {k: v for k, v in state.items() if k != "encoder.layers.1.norm2.weight"}
    with pytest.raises(CheckpointKeyError, match=r"encoder\.layers\.1\.norm2\.weight") as err:
        load(missing)
    assert err.value.missing == ["encoder.layers.1.norm2.weight"]
    with pytest.raises(CheckpointKeyError, match=r"head\.weight"):
        load({**state, "head.weight": torch.zeros(2)})
    bad = dict(state)
    bad["decoder.out_layer.dec_disp"] = torch.zeros(301)
    with pytest.raises(CheckpointKeyError, match="dec_disp"):
        load(bad)
    # a GMVAE state dict under a VAE config fails loudly
    gm = torch.load(src / f"{GMVAE}.best.ckpt", weights_only=True)["model_state_dict"]
    with pytest.raises(CheckpointKeyError, match="hid_2mu"):
        load(gm)


def test_config_defaults_and_unsupported(fx, tmp_path):
    raw, genes = scfm.io.read_cellplm_config(fx / "checkpoint" / f"{VAE}.config.json")
    config = scfm.module.CellPLMConfig.from_dict(raw)
    assert config.enc_head == 8 and config.pe_type == "sin" and config.out_dim == len(genes) == 300
    assert "epochs" in config.extra
    raw["enc_mod"] = "performer"
    with pytest.raises(ValueError, match="performer"):
        scfm.module.CellPLMConfig.from_dict(raw)
    (tmp_path / "x.config.json").write_text(json.dumps({"enc_hid": 8}))
    with pytest.raises(scfm.errors.CheckpointFormatError, match="gene_list"):
        scfm.io.read_cellplm_config(tmp_path / "x.config.json")


def test_save_load_roundtrip(models, tmp_path):
    adata, m = models
    for prefix, model in m.items():
        z = model.get_latent_representation(progress_bar=False)
        model.save(tmp_path / prefix, overwrite=True)
        loaded = scfm.model.CellPLM.load(tmp_path / prefix, adata=adata)
        np.testing.assert_array_equal(loaded.get_latent_representation(progress_bar=False), z)
        assert loaded.config.latent_mod == model.config.latent_mod


# ---------------------------------------------------------------------------- setup_anndata
def test_setup_errors(fx, expected):
    adata = ad.read_h5ad(fx / "input.h5ad")
    with pytest.raises(AnnDataKeyError, match="sample_id"):
        scfm.model.CellPLM.setup_anndata(adata.copy(), batch_key="sample_id")
    with pytest.raises(AnnDataKeyError, match="xy"):
        scfm.model.CellPLM.setup_anndata(adata.copy(), spatial_key="xy")
    bad = adata.copy()
    bad.obsm["spatial"] = bad.obsm["spatial"].astype(float)
    bad.obsm["spatial"][3, 0] = np.nan
    with pytest.raises(SpatialCoordinateError, match="NaN"):
        scfm.model.CellPLM.setup_anndata(bad)
    bad.obsm["spatial"] = np.array([["a", "b"]] * bad.n_obs)
    with pytest.raises(SpatialCoordinateError, match="numeric"):
        scfm.model.CellPLM.setup_anndata(bad)
    norm = adata.copy()
    norm.X = np.log1p(norm.X.toarray())
    with pytest.raises(CountDataError, match="raw counts"):
        scfm.model.CellPLM.setup_anndata(norm)
    norm.layers["counts"] = adata.X.copy()
    scfm.model.CellPLM.setup_anndata(norm, layer="counts")
    # defaults: no 'batch' column and no coordinates -> one sentence, nothing registered
    plain = ad.AnnData(adata.X.copy(), var=adata.var.copy())
    scfm.model.CellPLM.setup_anndata(plain)
    model = scfm.model.CellPLM.from_pretrained(fx / "checkpoint", plain, prefix=VAE)
    assert model.setup_args["batch_key"] is None and model.setup_args["spatial_key"] is None
    assert (
        model.get_latent_representation(progress_bar=False).shape
        == expected["cell_embeddings"].shape
    )
    assert set(adata.obs.columns) == {"batch", "cell_type"}  # the user's AnnData is untouched


def test_gene_id_key_with_symbols(fx, expected):
    adata = ad.read_h5ad(fx / "input.h5ad")
    adata.var_names = [f"gene{i}" for i in range(adata.n_vars)]
    scfm.model.CellPLM.setup_anndata(adata, gene_id_key="ensembl_id")
    model = scfm.model.CellPLM.from_pretrained(fx / "checkpoint", adata, prefix=VAE)
    _close(model.get_latent_representation(progress_bar=False), expected["cell_embeddings"])
