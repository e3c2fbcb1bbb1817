"""scFoundation: parity with the reference fixture, loader variants, tokeniser, API behaviour."""

from __future__ import annotations

import copy
import shutil

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import scfm
from conftest import fixture_dir
from scfm.errors import (
    CheckpointFormatError,
    CheckpointKeyError,
    CheckpointNotFoundError,
    InvalidInputError,
    UnsafeCheckpointError,
)
from scfm.model import ScFoundation
from scfm.module._scfoundation import MAX_GROUP_TOKENS, _token_groups

ATOL = 1e-4


@pytest.fixture(scope="module")
def fx():
    return fixture_dir("scfoundation")


@pytest.fixture(scope="module")
def expected(fx):
    return dict(np.load(fx / "expected.npz"))


def _adata(fx) -> ad.AnnData:
    adata = ad.read_h5ad(fx / "input.h5ad")
    ScFoundation.setup_anndata(adata)
    return adata


@pytest.fixture(scope="module")
def loaded(fx):
    torch.set_num_threads(1)
    adata = _adata(fx)
    model = ScFoundation.from_pretrained(fx / "checkpoint", adata)
    return model, adata


# ---------------------------------------------------------------- parity (public API)
@pytest.mark.parametrize(
    ("key", "kwargs"),
    [
        ("cell_embeddings", {}),
        ("cell_embeddings_pool_max", {"pool_type": "max"}),
        ("cell_embeddings_f1", {"tgthighres": "f1"}),
        ("cell_embeddings_rde_a5", {"tgthighres": "a5", "weights": "rde"}),
    ],
)
def test_cell_embeddings_match_reference(loaded, expected, key, kwargs):
    model, _ = loaded
    z = model.get_latent_representation(progress_bar=False, **kwargs)
    np.testing.assert_allclose(z, expected[key], atol=ATOL, rtol=0)


def test_gene_embeddings_match_reference(loaded, expected):
    model, _ = loaded
    g = model.get_cell_gene_embeddings(indices=[0, 1, 2], batch_size=2, progress_bar=False)
    np.testing.assert_allclose(g, expected["gene_embeddings"], atol=ATOL, rtol=0)
    # the reference gene_batch mode: one batch, key max over the whole batch
    gb = model.get_cell_gene_embeddings(
        indices=[0, 1, 2], batch_size=3, key_max="batch", progress_bar=False
    )
    np.testing.assert_allclose(gb, expected["gene_embeddings_batch3"], atol=ATOL, rtol=0)
    # the two modes really differ (so the batch option is not a no-op)
    assert np.abs(gb - g).max() > 1e-5


def test_reconstructed_expression_matches_reference(loaded, expected):
    model, adata = loaded
    r = model.get_reconstructed_expression(indices=range(5), progress_bar=False)
    np.testing.assert_allclose(
        r.to_numpy(), expected["reconstructed_expression"], atol=ATOL, rtol=0
    )
    assert list(r.columns) == list(expected["vocab_genes"])
    assert list(r.index) == list(adata.obs_names[:5])


def test_enhance_depth_writes_reference_outputs(fx, expected):
    adata = _adata(fx)
    model = ScFoundation.from_pretrained(fx / "checkpoint", adata)
    z = scfm.tl.enhance_depth(
        model, adata, tgthighres="a5", expression=True, key_added="X_enh", progress_bar=False
    )
    np.testing.assert_allclose(z, expected["cell_embeddings_rde_a5"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(adata.obsm["X_enh"], z)
    assert adata.uns["scfm"]["obsm"]["X_enh"]["weights"] == "rde"
    # expression at T = S + 5 with the 'gene' model, laid out along adata.var
    recon = model.get_reconstructed_expression(tgthighres="a5", progress_bar=False)
    align = model.gene_alignment
    layer = adata.layers["X_enh"]
    np.testing.assert_allclose(
        layer[:, align.var_index], recon.to_numpy()[:, align.vocab_index], atol=ATOL, rtol=0
    )
    unmatched = np.setdiff1d(np.arange(adata.n_vars), align.var_index)
    assert np.isnan(layer[:, unmatched]).all()
    # t4 expression equals the fixture (first 5 cells)
    scfm.tl.enhance_depth(model, adata, tgthighres="t4", expression=True, progress_bar=False)
    got = adata.layers["X_scfoundation_enhanced"][:5, align.var_index]
    np.testing.assert_allclose(
        got, expected["reconstructed_expression"][:, align.vocab_index], atol=ATOL, rtol=0
    )
    with pytest.raises(InvalidInputError, match="does not raise"):
        scfm.tl.enhance_depth(model, adata, tgthighres="f1")


def test_gears_embeddings_are_gene_model_at_observed_depth(loaded):
    model, _ = loaded
    genes = list(model.gene_list[:7])
    out = scfm.tl.scfoundation_gears_embeddings(
        model, indices=[4, 2], genes=genes, progress_bar=False
    )
    assert out.shape == (2, 7, model.module.config.decoder_hidden_dim)
    ref = model.get_cell_gene_embeddings(
        indices=[4, 2], genes=genes, tgthighres="f1", weights="gene", progress_bar=False
    )
    np.testing.assert_allclose(out, ref, atol=1e-6, rtol=0)
    t4 = model.get_cell_gene_embeddings(indices=[4, 2], genes=genes, progress_bar=False)
    assert np.abs(out - t4).max() > 1e-4  # T = S really differs from the default t4


# ---------------------------------------------------------------- tokeniser
def test_tokeniser_matches_reference_arrays(loaded, expected):
    model, adata = loaded
    x = torch.as_tensor(adata.X.toarray(), dtype=torch.float64)
    align = model.gene_alignment
    aligned = scfm.data.scfoundation_align_counts(
        x, torch.as_tensor(align.var_index), torch.as_tensor(align.vocab_index), 220
    )
    np.testing.assert_array_equal(aligned.numpy(), expected["aligned_counts"])
    values = scfm.data.scfoundation_preprocess(aligned, "F", "t4")
    np.testing.assert_allclose(values.numpy(), expected["model_input"], atol=ATOL, rtol=0)
    gathered, ids, padding = scfm.data.scfoundation_gather(values)
    lengths = (~padding).sum(1).numpy()
    np.testing.assert_array_equal(lengths, expected["encoder_lengths"])
    np.testing.assert_array_equal(ids[~padding].numpy(), expected["encoder_gene_ids"])
    np.testing.assert_allclose(
        gathered[~padding].numpy(), expected["encoder_values"], atol=ATOL, rtol=0
    )
    assert (gathered[padding] == 103).all() and (ids[padding] == 222).all()
    # encoder output of cell 0 inside a padded batch equals the reference's batch of one
    with torch.inference_mode():
        hidden, _, pad = model.module.encode(values[:9])
    np.testing.assert_allclose(
        hidden[0][~pad[0]].numpy(), expected["encoder_out_cell0"], atol=ATOL, rtol=0
    )


def test_preprocess_depth_tokens():
    counts = torch.tensor([[1.0, 0.0, 9.0], [0.0, 2.0, 0.0]])
    log_s = np.log10([10.0, 2.0])
    for spec, target in [("t4", [4.0, 4.0]), ("t4.5", [4.5, 4.5]), ("f1", log_s),
                         ("f5", np.log10([50.0, 10.0])), ("a5", log_s + 5)]:  # fmt: skip
        v = scfm.data.scfoundation_preprocess(counts, "F", spec)
        np.testing.assert_allclose(v[:, -2].numpy(), target, rtol=1e-6)
        np.testing.assert_allclose(v[:, -1].numpy(), log_s, rtol=1e-6)
    v = scfm.data.scfoundation_preprocess(counts, "F", "t4")
    np.testing.assert_allclose(v[0, :3].numpy(), np.log1p([1e3, 0.0, 9e3]), rtol=1e-6)
    for bad in ["4", "x4", "t", "t-1", ""]:
        with pytest.raises(InvalidInputError, match="tgthighres"):
            scfm.data.parse_tgthighres(bad)
    with pytest.raises(InvalidInputError, match="total_counts_key"):
        scfm.data.scfoundation_preprocess(counts, "A", "t4")


# ---------------------------------------------------------------- batching and API
def test_batching_and_indices_do_not_change_results(loaded, expected):
    model, _ = loaded
    z1 = model.get_latent_representation(batch_size=1, progress_bar=False)
    z7 = model.get_latent_representation(batch_size=7, progress_bar=False)
    np.testing.assert_allclose(z1, z7, atol=1e-5, rtol=0)
    idx = [5, 0, 5, 33]
    zi = model.get_latent_representation(indices=idx, batch_size=3, progress_bar=False)
    np.testing.assert_allclose(zi, expected["cell_embeddings"][idx], atol=ATOL, rtol=0)


def test_minibatches_group_cells_by_length(loaded):
    model, adata = loaded
    groups = model._minibatch_indices(adata, np.arange(adata.n_obs), 10)
    nnz = np.asarray((adata.X[:, model.gene_alignment.var_index] > 0).sum(1)).ravel()
    spans = [nnz[g].max() - nnz[g].min() for g in groups]
    assert sorted(np.concatenate(groups).tolist()) == list(range(adata.n_obs))
    assert max(spans) < nnz.max() - nnz.min()


def test_packed_inference_equals_the_masked_padded_encoder(loaded, monkeypatch):
    """Inference packs cells (padding dropped, cells grouped by a token budget); training
    masks padded keys. Both give the same hidden states at real tokens, for any grouping."""
    model, adata = loaded
    module = model.module
    x = torch.as_tensor(adata.X[:6].toarray(), dtype=torch.float32)
    values = module.model_input(x)
    with torch.no_grad():
        packed, _, padding = module.encode(values)
        assert padding.any()  # cells of different lengths: the minibatch is really padded
        masked_module = copy.deepcopy(module)
        masked_module.encoder.train()  # the masked path; dropout switched off below
        for sub in masked_module.encoder.modules():
            if isinstance(sub, torch.nn.Dropout):
                sub.p = 0.0
            elif isinstance(getattr(sub, "dropout", None), float):
                sub.dropout = 0.0
        masked, _, _ = masked_module.encode(values)
        valid = ~padding
        np.testing.assert_allclose(packed[valid], masked[valid], atol=1e-5, rtol=0)
        assert bool((packed[padding] == 0).all())
        for budget in (1, 10**9):  # every cell alone / the whole minibatch as one group
            monkeypatch.setitem(MAX_GROUP_TOKENS, "cpu", budget)
            regrouped, _, _ = module.encode(values)
            np.testing.assert_allclose(regrouped, packed, atol=1e-5, rtol=0)


def test_token_groups_cover_cells_in_order_within_the_budget():
    groups = list(_token_groups([5, 3, 10, 1, 1, 2], max_tokens=8))
    assert groups == [([5, 3], slice(0, 8)), ([10], slice(8, 18)), ([1, 1, 2], slice(18, 22))]
    assert list(_token_groups([], max_tokens=8)) == []


def test_weights_switch_restores_loaded_model(loaded, expected):
    model, _ = loaded
    model.get_latent_representation(weights="rde", progress_bar=False)
    z = model.get_latent_representation(progress_bar=False)
    np.testing.assert_allclose(z, expected["cell_embeddings"], atol=ATOL, rtol=0)
    with pytest.raises(InvalidInputError, match="weights"):
        model.get_latent_representation(weights="other")


def test_keep_other_weights_false_keeps_only_the_loaded_model(fx, expected):
    adata = _adata(fx)
    model = ScFoundation.from_pretrained(fx / "checkpoint", adata, keep_other_weights=False)
    assert set(model._release_states) == {"cell"}
    with pytest.raises(InvalidInputError, match="weights='rde'"):
        model.get_latent_representation(weights="rde")


def test_embed_genes_averages_cell_gene_embeddings(fx):
    adata = _adata(fx)
    model = ScFoundation.from_pretrained(fx / "checkpoint", adata, weights="gene")
    frame = model.embed_genes(adata, key_added="g", indices=[0, 1, 2], progress_bar=False)
    per_cell = model.get_cell_gene_embeddings(indices=[0, 1, 2], progress_bar=False)
    align = model.gene_alignment
    np.testing.assert_allclose(
        adata.varm["g"][align.var_index],
        per_cell.mean(0)[align.vocab_index],
        atol=1e-5,
        rtol=0,
    )
    assert len(frame) == align.n_matched
    unmatched = np.setdiff1d(np.arange(adata.n_vars), align.var_index)
    assert np.isnan(adata.varm["g"][unmatched]).all()


def test_options_are_validated_before_work(loaded):
    model, _ = loaded
    with pytest.raises(InvalidInputError, match="tgthighres"):
        model.get_latent_representation(tgthighres="q4")
    with pytest.raises(InvalidInputError, match="pool_type"):
        model.get_latent_representation(pool_type="mean")
    with pytest.raises(InvalidInputError, match="key_max"):
        model.get_cell_gene_embeddings(indices=[0], key_max="global")
    with pytest.raises(InvalidInputError, match="not in the scFoundation gene list"):
        model.get_cell_gene_embeddings(indices=[0], genes=["NOT_A_GENE"])


def test_cell_without_vocabulary_counts_is_rejected(fx):
    adata = ad.read_h5ad(fx / "input.h5ad")
    x = adata.X.toarray()
    vocab = set(np.load(fx / "expected.npz")["vocab_genes"])
    in_vocab = np.array([g in vocab for g in adata.var_names])
    x[0, in_vocab] = 0
    x[0, np.flatnonzero(~in_vocab)[0]] += 1  # counts only outside the gene list
    adata.X = sp.csr_matrix(x)
    ScFoundation.setup_anndata(adata)
    model = ScFoundation.from_pretrained(fx / "checkpoint", adata)
    with pytest.raises(InvalidInputError, match="library size is 0"):
        model.get_latent_representation(progress_bar=False)


def test_pre_normalized_a_equals_counts(fx, expected):
    counts = ad.read_h5ad(fx / "input.h5ad")
    x = counts.X.toarray().astype(np.float64)
    vocab = set(expected["vocab_genes"])
    in_vocab = np.array([g in vocab for g in counts.var_names])
    total = x[:, in_vocab].sum(1)
    norm = ad.AnnData(
        np.log1p(x / total[:, None] * 1e4).astype(np.float32), obs=counts.obs.copy(),
        var=counts.var.copy(),
    )  # fmt: skip
    norm.obs["n_counts"] = total
    ScFoundation.setup_anndata(norm, pre_normalized="A", total_counts_key="n_counts")
    model = ScFoundation.from_pretrained(fx / "checkpoint", norm)
    z = model.get_latent_representation(progress_bar=False)
    np.testing.assert_allclose(z, expected["cell_embeddings"], atol=ATOL, rtol=0)
    # "T": the sum of the given values is used as total count (reference behaviour)
    ScFoundation.setup_anndata(norm, pre_normalized="T")
    model_t = ScFoundation.from_pretrained(fx / "checkpoint", norm)
    values = model_t._model_input(next(iter(model_t._make_data_loader(norm, batch_size=4))), "t4")
    np.testing.assert_allclose(
        values[:, -1].numpy(), np.log10(norm.X[:4, in_vocab].astype(np.float64).sum(1)), rtol=1e-6
    )
    with pytest.raises(InvalidInputError, match="total_counts_key"):
        ScFoundation.setup_anndata(norm, pre_normalized="A")
    with pytest.raises(InvalidInputError, match="pre_normalized"):
        ScFoundation.setup_anndata(norm, pre_normalized="X")


# ---------------------------------------------------------------- loader variants
def test_checkpoint_file_and_flat_layouts(fx, expected, tmp_path):
    adata = _adata(fx)
    # the checkpoint file itself (gene list found in the parent folder)
    model = ScFoundation.from_pretrained(fx / "checkpoint" / "models" / "models.ckpt", adata)
    z = model.get_latent_representation(progress_bar=False)
    np.testing.assert_allclose(z, expected["cell_embeddings"], atol=ATOL, rtol=0)
    # folder holding models.ckpt directly, config already flattened, weights="rde"
    ckpt = torch.load(fx / "checkpoint/models/models.ckpt", weights_only=True)
    for entry in ckpt.values():
        entry["config"] = scfm.io._scfoundation.flatten_scfoundation_config(entry["config"])
    flat = tmp_path / "flat"
    flat.mkdir()
    torch.save(ckpt, flat / "models.ckpt")
    shutil.copy(fx / "checkpoint" / "OS_scRNA_gene_index.19264.tsv", flat)
    model = ScFoundation.from_pretrained(flat, adata, weights="rde")
    z = model.get_latent_representation(tgthighres="a5", progress_bar=False)
    np.testing.assert_allclose(z, expected["cell_embeddings_rde_a5"], atol=ATOL, rtol=0)


def test_loader_errors(fx, tmp_path):
    adata = _adata(fx)
    ckpt = torch.load(fx / "checkpoint/models/models.ckpt", weights_only=True)
    genes = fx / "checkpoint" / "OS_scRNA_gene_index.19264.tsv"

    def write(obj, name):
        d = tmp_path / name
        (d / "models").mkdir(parents=True)
        torch.save(obj, d / "models" / "models.ckpt")
        shutil.copy(genes, d)
        return d

    with pytest.raises(CheckpointNotFoundError, match=r"models\.ckpt"):
        ScFoundation.from_pretrained(tmp_path, adata)
    with pytest.raises(InvalidInputError, match="weights"):
        ScFoundation.from_pretrained(fx / "checkpoint", adata, weights="cells")
    # a missing and an unexpected key are both reported
    bad = {k: {"config": v["config"], "state_dict": dict(v["state_dict"])} for k, v in ckpt.items()}
    sd = bad["cell"]["state_dict"]
    sd["model.extra.weight"] = sd.pop("model.to_final.bias")
    with pytest.raises(CheckpointKeyError, match=r"to_final\.bias[\s\S]*extra\.weight"):
        ScFoundation.from_pretrained(write(bad, "keys"), adata)
    with pytest.raises(CheckpointFormatError, match="'cell', 'rde', 'gene'"):
        ScFoundation.from_pretrained(write({"state_dict": {}}, "other"), adata)
    with pytest.raises(CheckpointFormatError, match="no 'gene' model"):
        ScFoundation.from_pretrained(
            write({"cell": ckpt["cell"]}, "cellonly"), adata, weights="gene"
        )
    # without the tiny gene list the shipped 19,264-gene list does not fit the tiny model
    nolist = tmp_path / "nolist"
    nolist.mkdir()
    shutil.copy(fx / "checkpoint/models/models.ckpt", nolist)
    with pytest.raises(CheckpointFormatError, match="19264"):
        ScFoundation.from_pretrained(nolist, adata)


def test_pickled_objects_need_consent(fx, expected, tmp_path):
    import argparse

    adata = _adata(fx)
    ckpt = torch.load(fx / "checkpoint/models/models.ckpt", weights_only=True)
    ckpt["cell"]["hyper_parameters"] = argparse.Namespace(lr=1e-4)  # a non-tensor object
    d = tmp_path / "unsafe"
    (d / "models").mkdir(parents=True)
    torch.save(ckpt, d / "models" / "models.ckpt")
    shutil.copy(fx / "checkpoint" / "OS_scRNA_gene_index.19264.tsv", d)
    with pytest.raises(UnsafeCheckpointError, match="trust_checkpoint=True"):
        ScFoundation.from_pretrained(d, adata)
    model = ScFoundation.from_pretrained(d, adata, trust_checkpoint=True)
    z = model.get_latent_representation(progress_bar=False)
    np.testing.assert_allclose(z, expected["cell_embeddings"], atol=ATOL, rtol=0)


def test_projection_matrices_come_from_the_file(fx):
    adata = _adata(fx)
    model = ScFoundation.from_pretrained(fx / "checkpoint", adata)
    ckpt = torch.load(fx / "checkpoint/models/models.ckpt", weights_only=True)
    key = "decoder.performer.net.layers.1.0.fn.fast_attention.projection_matrix"
    torch.testing.assert_close(
        model.module.state_dict()[key], ckpt["cell"]["state_dict"]["model." + key]
    )
    model.module.train()
    model.module.decode(torch.rand(2, 222) + 0.1)  # training-mode forward never redraws
    torch.testing.assert_close(
        model.module.state_dict()[key], ckpt["cell"]["state_dict"]["model." + key]
    )


def test_save_load_round_trip(loaded, expected, tmp_path):
    model, adata = loaded
    model.save(tmp_path / "m", overwrite=True)
    again = ScFoundation.load(tmp_path / "m", adata=adata)
    z = again.get_latent_representation(progress_bar=False)
    np.testing.assert_allclose(
        z, model.get_latent_representation(progress_bar=False), atol=0, rtol=0
    )
    np.testing.assert_allclose(z, expected["cell_embeddings"], atol=ATOL, rtol=0)
    assert again.gene_list == model.gene_list
    with pytest.raises(InvalidInputError, match="from_pretrained"):
        again.get_latent_representation(weights="rde")


def test_random_init_uses_shipped_gene_list():
    rng = np.random.default_rng(0)
    adata = ad.AnnData(
        rng.poisson(1.0, (6, 4)).astype(np.float32) + 1,
        var={"sym": ["TP53", "CD3E", "GAPDH", "NOT_A_GENE"]},
    )
    adata.var_names = ["g0", "g1", "g2", "g3"]
    ScFoundation.setup_anndata(adata, gene_id_key="sym")
    config = {"encoder_hidden_dim": 16, "encoder_depth": 1, "encoder_heads": 2,
              "decoder_hidden_dim": 8, "decoder_depth": 1, "decoder_heads": 2,
              "decoder_dim_head": 4, "bin_num": 4}  # fmt: skip
    model = ScFoundation(adata, config=config)
    assert len(model.gene_list) == 19264 and model.gene_alignment.n_matched == 3
    z = model.get_latent_representation(progress_bar=False)
    assert z.shape == (6, 64) and np.isfinite(z).all()


def test_symbols_are_read_from_var_gene_name_like_the_reference(fx, expected):
    adata = ad.read_h5ad(fx / "input.h5ad")
    adata.var["gene_name"] = adata.var_names
    adata.var_names = [f"id{i}" for i in range(adata.n_vars)]
    ScFoundation.setup_anndata(adata)
    model = ScFoundation.from_pretrained(fx / "checkpoint", adata)
    assert model.gene_alignment.n_matched == 180
    z = model.get_latent_representation(progress_bar=False)
    np.testing.assert_allclose(z, expected["cell_embeddings"], atol=ATOL, rtol=0)
