"""CellPLM parity with the reference pipelines (fixture tests/data/fixtures/cellplm) and loading."""

from __future__ import annotations

import json
import math
import shutil
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import scfm
from conftest import fixture_dir, needs_smaps, resident_bytes
from scfm.data._cellplm_sentences import cellplm_gene_rank, label_codes
from scfm.data._loader import GeneSpace
from scfm.errors import (
    AnnDataKeyError,
    CheckpointFormatError,
    CheckpointKeyError,
    CheckpointNotFoundError,
    CountDataError,
    InvalidInputError,
    SpatialCoordinateError,
)

ATOL = 1e-4
VAE, GMVAE = "20231027_85M", "20230926_85M"
#: What the reference reads: sentences from obs["batch"]; coordinates in obsm["spatial"].
REFERENCE_KEYS = {"batch_key": "batch", "spatial_key": "spatial"}
PREFIXES = {VAE: "", GMVAE: "gmvae_"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    scfm.model.CellPLM.setup_anndata(adata, **{**REFERENCE_KEYS, **setup})
    return adata


@pytest.fixture(scope="module")
def models(fx):
    adata = _adata(fx)
    return adata, {
        p: scfm.model.CellPLM.from_pretrained(fx / "checkpoint", adata, prefix=p) for p in PREFIXES
    }


def _close(actual, desired, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual), desired, atol=atol, rtol=0)


def _z(model, adata=None, **options):
    return model.get_latent_representation(adata, progress_bar=False, **options)


def _expr(model, adata=None, **options):
    return model.get_normalized_expression(adata, progress_bar=False, **options)


@pytest.mark.parametrize("prefix", list(PREFIXES))
def test_intermediates(models, expected, prefix):
    _, m = models
    px = PREFIXES[prefix]
    _close(_z(m[prefix], hidden_layer=0), expected[px + "h_embed"])
    _close(_z(m[prefix], hidden_layer=-1), expected[px + "h_encoder"])
    _close(_z(m[prefix], hidden_layer=2), expected[px + "h_encoder"])
    _close(_z(m[prefix], output="pre_latent"), expected[px + "h_prelatent"])
    with pytest.raises(InvalidInputError, match="hidden_layer"):
        _z(m[prefix], hidden_layer=3)
    with pytest.raises(InvalidInputError, match="layer"):
        _z(m[prefix], layer=-1)  # ``layer`` is the AnnData layer of setup_anndata only


def test_module_checks_call_options_against_the_architecture():
    """The options of a call are checked (and defaulted) by the module, before any work."""
    config = scfm.module.CellPLMConfig(
        enc_hid=8, enc_layers=2, enc_head=2, latent_mod="vae", post_latent_dim=4, dec_hid=8,
        out_dim=5,
    )  # fmt: skip
    with torch.device("meta"):  # checking options needs no weights
        module = scfm.module.CellPLMModule(config)
    sentence = {"sentence": "batch", "chunk_size": None, "tile_size": None}
    assert module.check_options("genes") == sentence
    assert module.check_options("genes", tile_size=np.float32(2.5))["tile_size"] == 2.5
    assert module.check_options("latent", hidden_layer=-3, seed=np.int64(1)) == {
        **sentence, "hidden_layer": -3, "output": "embedding", "seed": 1
    }  # fmt: skip
    for task, options, match in [
        ("genes", {"seed": 1}, "no option 'seed' here"),
        ("latent", {"hidden_layer": 3}, "hidden_layer=3: use an int <= 2"),
        ("latent", {"hidden_layer": True}, "hidden_layer=True"),
        ("latent", {"output": "cluster"}, "needs a GMVAE latent"),
        ("latent", {"hidden_layer": 1, "output": "pre_latent"}, "not both"),
        ("expression", {"chunk_size": 0}, "chunk_size=0: use None or an int >= 1"),
        ("train", {"mask_node_rate": 1.5}, r"use None or in \[0, 1\]"),
        ("train", {"sentence": "tiles"}, "'batch' or 'spatial'"),
        ("latent", {"tile_size": math.inf}, "tile_size=inf: use None or a positive number"),
        ("train", {"mask_node_rate": np.float32("nan")}, r"mask_node_rate=.*nan.*: use None"),
    ]:
        with pytest.raises(InvalidInputError, match=match):
            module.check_options(task, **options)


def test_vae_embeddings(models, expected, settings):
    adata, m = models
    model = m[VAE]
    assert model.config.latent_mod == "vae"
    z = _z(model)
    _close(z, expected["cell_embeddings"])
    # obsm["spatial"] is registered but the released model ignores coordinates
    assert model.setup_args["spatial_key"] == "spatial"
    _close(z, expected["cell_embeddings_spatial"])
    _close(_z(model, chunk_size=settings["chunk"]), expected["cell_embeddings_chunked"])
    # the VAE release is deterministic: seed changes nothing
    np.testing.assert_array_equal(_z(model, seed=5), z)
    # the reference's sentence order: labels sorted, cells in AnnData order
    labels = adata.obs["batch"].astype(str).to_numpy()
    order = np.concatenate([np.flatnonzero(labels == b) for b in sorted(set(labels))])
    np.testing.assert_array_equal(order, expected["feed_order"])


def test_gmvae_embeddings(models, expected, settings):
    _, m = models
    model = m[GMVAE]
    seed = settings["emb_seed"]
    # deterministic by default: each cell's most probable cluster
    _close(_z(model), expected["gmvae_cell_embeddings_argmax"])
    _close(_z(model), expected["gmvae_cell_embeddings_argmax"])
    _close(_z(model, output="cluster_logits"), expected["gmvae_latent_logits"])
    # seed=s: the reference's Gumbel sampling after torch.manual_seed(s), bit for bit
    z = _z(model, seed=seed)
    _close(z, expected["gmvae_cell_embeddings"])
    _close(z, expected["gmvae_cell_embeddings_spatial"])
    np.testing.assert_array_equal(
        _z(model, output="cluster", seed=seed), expected["gmvae_latent_y"]
    )
    kw = {"seed": seed, "chunk_size": settings["chunk"]}
    _close(_z(model, **kw), expected["gmvae_cell_embeddings_chunked"])
    np.testing.assert_array_equal(
        _z(model, output="cluster", **kw), expected["gmvae_chunked_latent_y"]
    )
    # the noise belongs to the call, not to minibatches: batch_size changes nothing
    _close(_z(model, seed=seed, batch_size=1), z, atol=1e-6)
    if np.abs(expected["gmvae_cell_embeddings"] - expected["gmvae_cell_embeddings_argmax"]).max():
        # sampling matters for this model: another seed gives other clusters somewhere
        assert np.abs(_z(model, seed=seed + 1) - z).max() > 1e-3
    with pytest.raises(InvalidInputError, match="GMVAE"):
        _z(m[VAE], output="cluster")
    with pytest.raises(InvalidInputError, match="seed"):
        _z(model, seed=-1)


def test_embed_writes_obsm(fx, expected):
    adata = _adata(fx)
    model = scfm.model.CellPLM.from_pretrained(fx / "checkpoint", adata, prefix=VAE)
    model.embed(adata, key_added="emb", progress_bar=False)
    _close(adata.obsm["emb"], expected["cell_embeddings"])
    assert adata.uns["scfm"]["obsm"]["emb"]["model"] == "CellPLM"
    assert "checkpoint" in adata.uns["scfm"]["obsm"]["emb"]["checkpoint"]


def test_kept_genes_and_embedder_input(models, expected):
    """Alignment to the config gene list, and log1p of the model-space counts summed in the
    AnnData's column order (the reference's order) = the embedder input of the reference."""
    adata, m = models
    alignment = m[VAE].gene_alignment
    np.testing.assert_array_equal(adata.var_names[alignment.var_index], expected["kept_genes"])
    np.testing.assert_array_equal(alignment.vocab_index, expected["kept_gene_vocab_index"])
    assert adata.uns["scfm"]["gene_alignment"]["cellplm"]["n_matched"] == len(
        expected["kept_genes"]
    )
    vocab = m[VAE].vocabulary
    space = GeneSpace.from_pairs(
        alignment.var_index, alignment.vocab_index, adata.n_vars, len(vocab)
    )
    cells = np.arange(adata.n_obs)
    rank = cellplm_gene_rank(alignment, adata.var_names, vocab, np.zeros(adata.n_obs), cells)
    assert rank.shape == (adata.n_obs, len(vocab)) and rank.table.shape == (1, len(vocab))
    row = rank.table[0]  # one row for all cells: no (cells x genes) array anywhere
    np.testing.assert_array_equal(np.asarray(rank[cells[:5]]), np.tile(row, (5, 1)))
    cols = np.flatnonzero(row)
    cols = cols[np.argsort(row[cols])]
    np.testing.assert_array_equal(cols, expected["kept_gene_vocab_index"])
    x = space.map(adata.X)
    _close(np.log1p(x[:, cols]), expected["x_log1p_dense"], atol=1e-6)
    # the compact minibatch holds the same counts, only in the expressed columns
    values, columns = space.map_compact(adata.X)
    assert len(columns) < len(vocab) and (values != 0).any(axis=0).all()
    np.testing.assert_array_equal(values, x[:, columns])
    np.testing.assert_array_equal(x[:, np.setdiff1d(np.arange(len(vocab)), columns)], 0)
    # the embedder's tokens from a compact minibatch equal those from the dense one
    table = torch.as_tensor(rank.table)
    embedder = m[VAE].module.embedder.eval()
    with torch.no_grad():
        dense = embedder(torch.as_tensor(x), gene_rank=table)
        columns = torch.as_tensor(columns)
        compact = embedder(torch.as_tensor(values), gene_rank=table, gene_columns=columns)
        # the columns' order does not matter: genes are summed in the AnnData's order
        perm = torch.as_tensor(np.random.default_rng(0).permutation(len(columns)))
        shuffled = embedder(
            torch.as_tensor(values)[:, perm], gene_rank=table, gene_columns=columns[perm]
        )
    np.testing.assert_array_equal(compact.numpy(), dense.numpy())
    np.testing.assert_array_equal(shuffled.numpy(), dense.numpy())
    _close(compact, expected["h_embed"])


def test_sentences(models, expected, settings):
    adata, _ = models
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
        assert len(pos) <= 2 * settings["chunk"] or len(ids) == 1
    # numeric labels sort as numbers (sklearn LabelEncoder), strings as strings
    np.testing.assert_array_equal(label_codes(np.array([10, 2, 1])), [2, 1, 0])
    np.testing.assert_array_equal(label_codes(np.array(["10", "2", "1"])), [1, 2, 0])


def test_gene_embeddings_are_embedding_rows(models, fx):
    _, m = models
    genes = m[VAE].get_gene_embeddings(progress_bar=False)
    state = torch.load(fx / "checkpoint" / f"{VAE}.best.ckpt", weights_only=True)
    emb = state["model_state_dict"]["embedder.feat_enc.emb"].numpy()
    assert sorted(genes.index) == sorted(m[VAE].vocabulary)
    _close(genes.to_numpy(), emb[m[VAE].vocabulary.get_indexer(genes.index)], atol=0)


def test_indices_subset_order(models, expected):
    _, m = models
    idx = np.array([5, 3, 59, 3])
    z = _z(m[VAE], indices=idx)
    full = _z(m[VAE], indices=np.unique(idx))
    _close(z, full[[1, 0, 2, 0]], atol=0)
    # a sentence of fewer cells gives different embeddings (cells attend to each other)
    assert np.abs(z[1] - expected["cell_embeddings"][3]).max() > 1e-3


def test_batch_size_and_deep_cells(models):
    """CellPLM has no token cap (every gene of a cell enters its token); whatever the
    minibatch size, whole sentences are packed, so outputs do not depend on it."""
    adata, m = models
    deep = adata.copy()
    x = deep.X.toarray()
    x[::7] = np.random.default_rng(0).poisson(5.0, size=x[::7].shape) + 1  # every gene expressed
    deep.X = sp.csr_matrix(x)
    scfm.model.CellPLM.setup_anndata(deep, **REFERENCE_KEYS)
    for model, kw in ((m[VAE], {}), (m[GMVAE], {"seed": 3})):
        ref = _z(model, deep, **kw)
        for batch_size in (1, 20, 40):
            _close(_z(model, deep, batch_size=batch_size, **kw), ref, atol=1e-6)
        e = _expr(model, deep, **kw)
        _close(_expr(model, deep, batch_size=1, **kw), e.to_numpy(), atol=1e-3)


def test_any_anndata(models):
    """A query with genes missing, extra unknown genes and shuffled columns embeds like the
    original AnnData restricted to the shared genes."""
    adata, m = models
    rng = np.random.default_rng(1)
    keep = np.sort(rng.choice(adata.n_vars, 150, replace=False))
    sub = adata[:, keep].copy()
    extra = ad.AnnData(sp.csr_matrix(rng.poisson(1.0, (adata.n_obs, 20)).astype(np.float32)))
    extra.obs_names = adata.obs_names
    extra.var_names = [f"ENSG99999{i:06d}" for i in range(20)]
    query = ad.concat([sub, extra], axis=1)
    query.obs = adata.obs.copy()
    query = query[:, rng.permutation(query.n_vars)].copy()
    scfm.model.CellPLM.setup_anndata(sub, batch_key="batch")
    scfm.model.CellPLM.setup_anndata(query, batch_key="batch")
    for model in m.values():
        _close(_z(model, query), _z(model, sub), atol=1e-5)
        want = _expr(model, sub)
        got = _expr(model, query)
        np.testing.assert_allclose(got[want.columns].to_numpy(), want.to_numpy(), rtol=1e-4)


def test_query_with_new_or_absent_batch_labels_and_coordinates(models, expected, fx):
    """A new batch label is a sentence of its own; without the column, one sentence.
    Coordinates are needed only where the model reads them."""
    adata, m = models
    first = adata.obs["batch"].astype(str).to_numpy()[0]
    idx = np.flatnonzero(adata.obs["batch"].astype(str).to_numpy() == first)
    renamed = adata[idx].copy()  # shares the fixture's scvi-tools id, as copies do
    renamed.obs["batch"] = pd.Categorical(["a sample the model never saw"] * len(idx))
    _close(_z(m[VAE], renamed), expected["cell_embeddings"][idx])
    absent = adata[idx].copy()
    del absent.obs["batch"], absent.obsm["spatial"]
    scfm.model.CellPLM.setup_anndata(absent)
    _close(_z(m[VAE], absent), expected["cell_embeddings"][idx])
    with pytest.raises(InvalidInputError, match="spatial_key"):
        _z(m[VAE], absent, sentence="spatial")
    spatial = scfm.model.CellPLM.from_pretrained(
        fx / "checkpoint", adata, prefix=VAE, spatial_encoding=True
    )
    no_coords = adata[idx].copy()
    del no_coords.obsm["spatial"]
    with pytest.raises((SpatialCoordinateError, InvalidInputError), match="spatial"):
        _z(spatial, no_coords)


@pytest.mark.parametrize("prefix", list(PREFIXES))
def test_imputation(fx, expected, settings, prefix):
    px = PREFIXES[prefix]
    kw = {"seed": settings["imp_seed"]} if px else {}
    adata = ad.read_h5ad(fx / "input.h5ad")
    targets = [str(g) for g in expected["imputation_target_genes"]]
    pos = adata.var_names.get_indexer(targets)
    x = adata.X.toarray()
    np.testing.assert_array_equal(x[:, pos], expected["imputation_truth"])
    x[:, pos] = 0
    adata.X = x
    scfm.model.CellPLM.setup_anndata(adata, batch_key="batch")
    model = scfm.model.CellPLM.from_pretrained(fx / "checkpoint", adata, prefix=prefix)
    out = scfm.tl.impute(model, progress_bar=False, **kw)
    assert list(out.columns) == [str(g) for g in expected["kept_genes"]]
    _close(out, expected[px + "imputed_all_kept_genes"])
    _close(adata.layers["cellplm_imputed"][:, adata.var_names.get_indexer(out.columns)], out)
    assert "cellplm_imputed" in adata.uns["scfm"]["layers"]
    _close(_expr(model, gene_list=targets, **kw), expected[px + "imputed_target_genes"])
    raw = _expr(model, gene_list=list(model.vocabulary), rescale=False, **kw)
    _close(raw, expected[px + "imputation_dec_mean_raw"])
    if px:
        _close(_expr(model), expected[px + "imputed_all_kept_genes_argmax"])
        y = _z(model, output="cluster", **kw)
        np.testing.assert_array_equal(y, expected["gmvae_imputation_latent_y"])


@pytest.mark.parametrize("prefix", list(PREFIXES))
def test_reconstruction(models, expected, settings, prefix):
    _, m = models
    px = PREFIXES[prefix]
    kw = {"seed": settings["imp_seed"]} if px else {}
    _close(_expr(m[prefix], **kw), expected[px + "reconstructed_expression"])
    with pytest.raises(InvalidInputError, match="rescale"):
        _expr(m[prefix], rescale="yes")


# ---------------------------------------------------------------------------- loading variants
def test_path_forms(fx, tmp_path, expected):
    adata = _adata(fx)
    ckpt = fx / "checkpoint"
    for path in (ckpt / f"{VAE}.best.ckpt", ckpt / f"{VAE}.config.json"):
        m = scfm.model.CellPLM.from_pretrained(path, adata)
        _close(_z(m), expected["cell_embeddings"])
    # the folder alone gives the newest release (20231027_85M)
    m = scfm.model.CellPLM.from_pretrained(ckpt, adata)
    assert m.config.latent_mod == "vae"
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
    _close(_z(m), expected["gmvae_cell_embeddings_argmax"])
    torch.save(state["model_state_dict"], single / f"{GMVAE}.best.ckpt")
    m = scfm.model.CellPLM.from_pretrained(single, adata)
    _close(_z(m), expected["gmvae_cell_embeddings_argmax"])


def _release(fx, tmp_path, config=None, state=None, prefix=VAE):
    """A copy of a fixture release with the config / weights replaced."""
    src = fx / "checkpoint"
    raw = json.loads((src / f"{prefix}.config.json").read_text())
    sd = torch.load(src / f"{prefix}.best.ckpt", weights_only=True)["model_state_dict"]
    raw = raw if config is None else config(raw)
    (tmp_path / f"{prefix}.config.json").write_text(json.dumps(raw))
    torch.save(
        {"model_state_dict": sd if state is None else state(sd)}, tmp_path / f"{prefix}.best.ckpt"
    )
    return tmp_path


def test_strict_keys(fx, tmp_path):
    adata = _adata(fx)

    def load(state):
        path = _release(fx, tmp_path, state=state)
        return scfm.model.CellPLM.from_pretrained(path, adata)

    # the unused keys the spec lists may be absent
    load(
        lambda sd: {
            k: v for k, v in sd.items() if not k.startswith(("embedder.norm0", "embedder.pe_enc"))
        }
    )
    with pytest.raises(CheckpointKeyError, match=r"encoder\.layers\.1\.norm2\.weight") as err:
        load(lambda sd: {k: v for k, v in sd.items() if k != "encoder.layers.1.norm2.weight"})
    assert err.value.missing == ["encoder.layers.1.norm2.weight"]
    with pytest.raises(CheckpointKeyError, match=r"head\.weight"):
        load(lambda sd: {**sd, "head.weight": torch.zeros(2)})
    with pytest.raises(CheckpointFormatError, match="dec_disp"):  # shape checked before build
        load(lambda sd: {**sd, "decoder.out_layer.dec_disp": torch.zeros(300, 1)})
    # NaN / inf weights are refused, naming the tensor
    with pytest.raises(CheckpointFormatError, match=r"encoder\.layers\.0\.norm1\.bias"):
        load(
            lambda sd: {
                **sd,
                "encoder.layers.0.norm1.bias": torch.full_like(
                    sd["encoder.layers.0.norm1.bias"], float("nan")
                ),
            }
        )
    # a GMVAE state dict under a VAE config fails before any module is built
    gm = torch.load(fx / "checkpoint" / f"{GMVAE}.best.ckpt", weights_only=True)
    with pytest.raises(CheckpointFormatError, match="latent_mod"):
        load(lambda _: gm["model_state_dict"])


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("enc_layers", 1_000_000, "enc_layers"),
        ("enc_layers", 1e6, "enc_layers"),
        ("enc_hid", -24, "enc_hid"),
        ("enc_hid", "24", "enc_hid"),
        ("enc_layers", 3, "enc_layers"),  # disagrees with the weights
        ("post_latent_dim", 16, "post_latent_dim"),
        ("batch_num", 21, "batch_num"),
        ("enc_head", 5, "enc_head"),
        ("out_dim", 301, "out_dim"),
        ("latent_mod", "ae", "latent_mod"),
        ("model_dropout", 1.5, "model_dropout"),
        ("dae", "yes", "dae"),
        ("enc_mod", "performer", "performer"),
    ],
)
def test_bad_configs_fail_fast(fx, tmp_path, key, value, match):
    adata = _adata(fx)
    path = _release(fx, tmp_path, config=lambda raw: {**raw, key: value})
    start = time.perf_counter()
    with pytest.raises(CheckpointFormatError, match=match):
        scfm.model.CellPLM.from_pretrained(path, adata)
    assert time.perf_counter() - start < 1.0


def test_malformed_release_files(fx, tmp_path):
    adata = _adata(fx)
    path = _release(fx, tmp_path)
    config = path / f"{VAE}.config.json"
    raw = json.loads(config.read_text())
    for text, match in [
        ("{not json", "not a readable JSON"),
        (json.dumps([1, 2]), "gene_list"),
        (json.dumps({**raw, "gene_list": "ENSG1"}), "gene_list"),
        (
            json.dumps({**raw, "gene_list": [*raw["gene_list"][:-1], raw["gene_list"][0]]}),
            "duplicated",
        ),
        (json.dumps({**raw, "gene_list": [*raw["gene_list"][:-1], 7]}), "gene_list"),
    ]:
        config.write_text(text)
        with pytest.raises(CheckpointFormatError, match=match):
            scfm.model.CellPLM.from_pretrained(path, adata)
    config.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(CheckpointFormatError):
        scfm.model.CellPLM.from_pretrained(path, adata)
    config.write_text(json.dumps(raw))
    (path / f"{VAE}.best.ckpt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointFormatError):
        scfm.model.CellPLM.from_pretrained(path, adata)
    torch.save({"model_state_dict": [1, 2]}, path / f"{VAE}.best.ckpt")
    with pytest.raises(CheckpointFormatError, match="model_state_dict"):
        scfm.model.CellPLM.from_pretrained(path, adata)


def test_config_defaults(fx):
    raw, genes = scfm.io.read_cellplm_config(fx / "checkpoint" / f"{VAE}.config.json")
    config = scfm.module.CellPLMConfig.from_dict(raw)
    assert config.enc_head == 8 and config.pe_type == "sin" and config.out_dim == len(genes) == 300
    assert "epochs" in config.extra
    release = scfm.io.read_cellplm_release(fx / "checkpoint")
    assert release.files["weights"].name == f"{VAE}.best.ckpt"  # the newest release
    assert list(release.vocabulary) == genes


def test_save_load_roundtrip(models, fx, tmp_path):
    adata, m = models
    other = _adata(fx)[:, ::-1].copy()  # another AnnData: other gene order
    scfm.model.CellPLM.setup_anndata(other, **REFERENCE_KEYS)
    for prefix, model in m.items():
        z = _z(model, seed=2)
        model.save(tmp_path / prefix, overwrite=True)
        loaded = scfm.model.CellPLM.load(tmp_path / prefix, adata=adata)
        np.testing.assert_array_equal(_z(loaded, seed=2), z)
        assert loaded.config == model.config
        again = scfm.model.CellPLM.load(tmp_path / prefix, adata=other)
        _close(_z(again, other, seed=2), z, atol=1e-5)


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
        scfm.model.CellPLM.setup_anndata(bad, spatial_key="spatial")
    bad.obsm["spatial"] = np.array([["a", "b"]] * bad.n_obs)
    with pytest.raises(SpatialCoordinateError, match="numeric"):
        scfm.model.CellPLM.setup_anndata(bad, spatial_key="spatial")
    scfm.model.CellPLM.setup_anndata(bad)  # coordinates not named: never read
    norm = adata.copy()
    norm.X = np.log1p(norm.X.toarray())
    with pytest.raises(CountDataError, match="raw counts"):
        scfm.model.CellPLM.setup_anndata(norm)
    norm.layers["counts"] = adata.X.copy()
    scfm.model.CellPLM.setup_anndata(norm, layer="counts")
    # defaults read only what is named: obs["batch"] and obsm["spatial"] exist but are not
    # used, so all cells form one sentence (as without the column)
    plain = ad.AnnData(adata.X.copy(), var=adata.var.copy())
    scfm.model.CellPLM.setup_anndata(plain)
    one = scfm.model.CellPLM.from_pretrained(fx / "checkpoint", plain, prefix=VAE)
    unnamed = adata.copy()
    scfm.model.CellPLM.setup_anndata(unnamed)
    model = scfm.model.CellPLM.from_pretrained(fx / "checkpoint", unnamed, prefix=VAE)
    assert model.setup_args["batch_key"] is None and model.setup_args["spatial_key"] is None
    z = _z(model)
    np.testing.assert_array_equal(z, _z(one))
    assert np.abs(z - expected["cell_embeddings"]).max() > 1e-3  # not the per-batch sentences
    with pytest.raises(InvalidInputError, match="spatial_key"):
        _z(model, sentence="spatial")
    assert set(adata.obs.columns) == {"batch", "cell_type"}  # the user's AnnData is untouched


def test_gene_id_key_with_symbols(fx, expected):
    adata = ad.read_h5ad(fx / "input.h5ad")
    adata.var_names = [f"gene{i}" for i in range(adata.n_vars)]
    scfm.model.CellPLM.setup_anndata(adata, gene_id_key="ensembl_id", batch_key="batch")
    model = scfm.model.CellPLM.from_pretrained(fx / "checkpoint", adata, prefix=VAE)
    _close(_z(model), expected["cell_embeddings"])


@needs_smaps
def test_weights_inference_never_reads_stay_out_of_memory(fx, tmp_path):
    """The .best.ckpt is memory-mapped and checked a window at a time: after loading and
    embedding, the pages of the decoder (which embedding never reads) are not resident, yet
    the decoder is there when asked for (expression) and a NaN in it is still refused."""
    batches, dec_hid = 4000, 512  # a covariate table of 8 MB, far above page granularity
    raw = json.loads((fx / "checkpoint" / f"{VAE}.config.json").read_text())
    state = torch.load(fx / "checkpoint" / f"{VAE}.best.ckpt", weights_only=True)
    module = scfm.module.CellPLMModule(
        scfm.module.CellPLMConfig.from_dict({**raw, "batch_num": batches, "dec_hid": dec_hid})
    )
    decoder = {"decoder." + k: v for k, v in module.decoder.state_dict().items()}
    decoder_bytes = sum(v.nbytes for v in decoder.values())
    assert decoder_bytes > 8e6
    sd = {k: v for k, v in state["model_state_dict"].items() if not k.startswith("decoder.")}
    release = tmp_path / "release"
    release.mkdir()
    (release / f"{VAE}.config.json").write_text(
        json.dumps({**raw, "batch_num": batches, "dec_hid": dec_hid})
    )
    ckpt = release / f"{VAE}.best.ckpt"
    torch.save({"model_state_dict": {**sd, **decoder}}, ckpt)

    adata = _adata(fx)
    model = scfm.model.CellPLM.from_pretrained(release, adata)
    assert np.isfinite(_z(model)).all()
    assert resident_bytes(ckpt) < ckpt.stat().st_size - decoder_bytes / 2
    assert np.isfinite(_expr(model).to_numpy()).all()  # the decoder is read when needed
    del model
    bad = {k: v.clone() for k, v in decoder.items()}
    bad["decoder.covariate_layers.0.batch.0.weight"][-1, -1] = float("nan")
    torch.save({"model_state_dict": {**sd, **bad}}, ckpt)
    with pytest.raises(CheckpointFormatError, match=r"covariate_layers\.0\.batch\.0\.weight"):
        scfm.model.CellPLM.from_pretrained(release, adata)
