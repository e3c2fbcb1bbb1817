"""Geneformer parity with the reference fixture, any-AnnData queries and per-cell independence."""

from __future__ import annotations

import logging
import pickle

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import scfm
from conftest import fixture_dir
from scfm.errors import GeneVocabularyError, InvalidInputError
from scfm.model import Geneformer

ATOL = 1e-4
TINY = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 8}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fx():
    path = fixture_dir("geneformer")
    return path, np.load(path / "expected.npz")


def _adata(path, **setup) -> ad.AnnData:
    adata = ad.read_h5ad(path / "input.h5ad")
    Geneformer.setup_anndata(adata, **setup)
    return adata


@pytest.fixture(scope="module")
def loaded(fx):
    path, _ = fx
    adata = _adata(path)
    return Geneformer.from_pretrained(path / "checkpoint", adata), adata


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_function_matches_fixture(fx):
    path, exp = fx
    adata = ad.read_h5ad(path / "input.h5ad")
    dicts = scfm.data.load_geneformer_dictionaries(path / "checkpoint")
    token_ids, medians = scfm.data.geneformer_gene_tokens(adata.var_names, dicts)
    # the two alias ids are collapsed onto in-vocabulary genes, 12 unknown genes dropped
    assert (token_ids >= 0).sum() == 222 and len(np.unique(token_ids[token_ids >= 0])) == 220
    ids, lengths = scfm.data.rank_value_encode(
        torch.tensor(adata.X.toarray()),
        torch.tensor(token_ids),
        torch.tensor(np.nan_to_num(medians)),
        max_length=4096,
        cls_token_id=2,
        eos_token_id=3,
    )
    expected = np.where(exp["input_ids"] < 0, 0, exp["input_ids"])
    np.testing.assert_array_equal(lengths.numpy(), exp["lengths"])
    np.testing.assert_array_equal(ids.numpy(), expected[:, : ids.shape[1]])


def test_tokenizer_truncation_and_token_space():
    counts = torch.tensor([[5.0, 0.0, 1.0, 3.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    tokens = torch.tensor([10, 11, 12, -1])
    medians = torch.tensor([1.0, 1.0, 0.5, 1.0])
    ids, lengths = scfm.data.rank_value_encode(counts, tokens, medians, max_length=2)
    # V1: no special tokens; cell 0 ranks 10 (5/1) before 12 (1/0.5=2); unknown gene dropped
    assert ids.tolist() == [[10, 12], [0, 0], [12, 10]]
    assert lengths.tolist() == [2, 0, 2]
    ids, lengths = scfm.data.rank_value_encode(
        counts, tokens, medians, max_length=3, cls_token_id=2, eos_token_id=3
    )
    assert ids.tolist() == [[2, 10, 3], [2, 3, 0], [2, 12, 3]]
    assert lengths.tolist() == [3, 2, 3]
    # token space: column j is token j; a column without median (special token) never counts
    x = torch.tensor([[9.0, 5.0, 0.0, 1.0, 3.0]])
    med = torch.tensor([0.0, 1.0, 1.0, 0.5, 1.0])
    ids, lengths = scfm.data.rank_value_encode(x, None, med, max_length=8)
    assert ids.tolist() == [[1, 4, 3]] and lengths.tolist() == [3]


def test_model_tokens_match_fixture(loaded, fx):
    model, _ = loaded
    _, exp = fx
    ids, lengths = model.get_tokens()
    np.testing.assert_array_equal(lengths, exp["lengths"])
    np.testing.assert_array_equal(ids, exp["input_ids"][:, : ids.shape[1]])
    assert model.config.variant == "V2"
    assert model.vocabulary[:4].tolist() == ["<pad>", "<mask>", "<cls>", "<eos>"]
    assert len(model.vocabulary) == 244 == model.module.n_tokens


# ---------------------------------------------------------------- embeddings / logits

EMBEDDINGS = [
    ("cell_embeddings", {}),
    ("cell_embeddings_meanpool", {"pooling": "mean"}),
    ("cell_embeddings_cls_lastlayer", {"hidden_layer": -1}),
    ("cell_embeddings_meanpool_lastlayer", {"pooling": "mean", "hidden_layer": -1}),
]


@pytest.mark.parametrize(("key", "options"), EMBEDDINGS)
def test_cell_embeddings_match_fixture(loaded, fx, key, options):
    model, _ = loaded
    _, exp = fx
    z = model.get_latent_representation(progress_bar=False, **options)
    assert exp["cell_index"].tolist() == list(range(len(z)))
    np.testing.assert_allclose(z, exp[key], atol=ATOL, rtol=0)


def test_rows_follow_indices_and_batch_size(loaded, fx):
    model, _ = loaded
    _, exp = fx
    idx = np.random.default_rng(0).permutation(64)[:40]
    z = model.get_latent_representation(indices=idx, batch_size=7, progress_bar=False)
    np.testing.assert_allclose(z, exp["cell_embeddings"][idx], atol=ATOL, rtol=0)


def test_gene_embeddings_match_fixture(loaded, fx):
    model, adata = loaded
    _, exp = fx
    genes = model.get_gene_embeddings(progress_bar=False)
    assert genes.index.tolist() == exp["gene_embedding_ids"].tolist()
    np.testing.assert_allclose(genes.to_numpy(), exp["gene_embeddings"], atol=ATOL, rtol=0)
    model.embed_genes(adata, key_added="gf", progress_bar=False)
    row = adata.var_names.get_loc(exp["gene_embedding_ids"][5])
    np.testing.assert_allclose(adata.varm["gf"][row], exp["gene_embeddings"][5], atol=ATOL)


def test_mlm_logits_match_fixture(loaded, fx):
    model, _ = loaded
    _, exp = fx
    ids = exp["input_ids"][:5, :113]
    np.testing.assert_allclose(
        model.get_mlm_logits(ids), exp["mlm_logits_first5"], atol=ATOL, rtol=0
    )
    masked = model.get_mlm_logits(exp["mlm_masked_input_ids_first5"])
    pos = exp["mlm_masked_positions"]
    np.testing.assert_allclose(
        masked[pos[:, 0], pos[:, 1]], exp["mlm_masked_logits"], atol=ATOL, rtol=0
    )


def test_embed_writes_obsm(loaded, fx):
    model, adata = loaded
    _, exp = fx
    model.embed(adata, key_added="X_gf", progress_bar=False)
    np.testing.assert_allclose(adata.obsm["X_gf"], exp["cell_embeddings"], atol=ATOL, rtol=0)
    assert adata.uns["scfm"]["obsm"]["X_gf"]["model"] == "Geneformer"


def test_invalid_options(loaded):
    model, _ = loaded
    with pytest.raises(InvalidInputError, match="hidden_layer=7"):
        model.get_latent_representation(hidden_layer=7, progress_bar=False)
    with pytest.raises(InvalidInputError, match="pooling"):
        model.get_latent_representation(pooling="max", progress_bar=False)
    with pytest.raises(InvalidInputError, match="layer"):
        model.get_latent_representation(layer=-1, progress_bar=False)  # AnnData layer only
    with pytest.raises(InvalidInputError, match="pooling"):
        model.get_gene_embeddings(pooling="mean", progress_bar=False)
    with pytest.raises(InvalidInputError, match="decoder"):
        model.get_normalized_expression(progress_bar=False)


def test_module_inference_api(loaded, fx):
    """The documented module API (used by in-silico perturbation): counts or token ids."""
    model, adata = loaded
    _, exp = fx
    module = model.module
    x = np.zeros((3, module.n_tokens), dtype=np.float32)
    alignment = model.gene_alignment
    counts = adata.X[:3].toarray()[:, alignment.var_index]
    np.add.at(x, (slice(None), alignment.vocab_index), counts)
    with torch.inference_mode():
        ids, lengths = module.tokenize(torch.from_numpy(x))
        from_counts = module.inference(torch.from_numpy(x), hidden_layer=-2, pooling="cls")
        from_ids = module.inference(input_ids=ids, lengths=lengths, hidden_layer=-2, pooling="cls")
    n = exp["lengths"][0]
    np.testing.assert_array_equal(ids[0, :n].numpy(), exp["input_ids"][0, :n])
    np.testing.assert_allclose(from_ids.cell_embedding, exp["cell_embeddings"][:3], atol=ATOL)
    torch.testing.assert_close(from_counts.cell_embedding, from_ids.cell_embedding)
    assert from_ids.token_states.shape == (*ids.shape, 64)
    real = torch.arange(ids.shape[1])[None] < lengths[:, None]
    assert (from_ids.token_genes[~real] == -1).all()
    assert (from_ids.token_genes[real] == ids[real]).all()
    assert "mlm_labels" not in from_ids.extra  # eval mode: never masked
    # cell embeddings only (the "latent" call): a <cls> read skips the other tokens
    with torch.inference_mode():
        cls_only = module.inference(
            input_ids=ids, lengths=lengths, hidden_layer=-2, pooling="cls", token_states=False
        )
        mean = module.inference(
            input_ids=ids, lengths=lengths, hidden_layer=-2, pooling="mean", token_states=False
        )
    assert cls_only.token_states is None and cls_only.token_genes is None
    torch.testing.assert_close(cls_only.cell_embedding, from_ids.cell_embedding)
    assert mean.token_states.shape == (*ids.shape, 64)  # a mean reads every token
    assert model._inference_kwargs("latent")["token_states"] is False
    gen = torch.Generator().manual_seed(0)
    masked = module.inference(input_ids=ids, lengths=lengths, mask=True, generator=gen)
    assert (masked.extra["mlm_labels"] != -100).any()


def test_mixed_precision_inference(loaded, fx):
    model, _ = loaded
    _, exp = fx
    with model.inference_precision("bf16"):
        z = model.get_latent_representation(progress_bar=False)
    np.testing.assert_allclose(z, exp["cell_embeddings"], atol=0.15, rtol=0)


# ---------------------------------------------------------------- any AnnData


def test_query_with_other_genes_matches_shared_genes(loaded, fx):
    """Missing genes, extra genes and another order: same embedding as the shared genes."""
    model, original = loaded
    rng = np.random.default_rng(1)
    keep = np.sort(rng.choice(original.n_vars, 180, replace=False))
    part = original[:, keep].to_memory()
    extra = ad.AnnData(
        sp.csr_matrix(rng.poisson(2.0, (original.n_obs, 15)).astype(np.float32)),
        obs=original.obs[[]].copy(),
        var=pd.DataFrame(index=[f"ENSG99{i:09d}" for i in range(15)]),
    )
    query = ad.concat([part, extra], axis=1, merge="first")
    query = query[:, rng.permutation(query.n_vars)].copy()
    query.obs = original.obs.copy()
    Geneformer.setup_anndata(query)
    shared = original[:, keep].copy()
    Geneformer.setup_anndata(shared)
    for options in ({}, {"pooling": "mean", "hidden_layer": -1}):
        z_query = model.get_latent_representation(query, progress_bar=False, **options)
        z_shared = model.get_latent_representation(shared, progress_bar=False, **options)
        np.testing.assert_allclose(z_query, z_shared, atol=1e-5, rtol=0)
    genes_q = model.get_gene_embeddings(query, progress_bar=False)
    genes_s = model.get_gene_embeddings(shared, progress_bar=False)
    pd.testing.assert_frame_equal(genes_q, genes_s, atol=1e-5, check_exact=False)
    np.testing.assert_array_equal(model.get_tokens(query)[0], model.get_tokens(shared)[0])


def test_mostly_ensembl_with_symbols_keeps_ensembl_ids(loaded, fx):
    """26 of 234 ids replaced by symbols: the Ensembl ids stay, the symbols map back."""
    model, _ = loaded
    _, exp = fx
    adata = ad.read_h5ad(fx[0] / "input.h5ad")
    names = adata.var_names.to_numpy().astype(object)
    names[::9] = adata.var["gene_symbols"].astype(str).to_numpy()[::9]
    adata.var_names = pd.Index(names).astype(str)
    Geneformer.setup_anndata(adata)
    alignment = model._align_genes(model._validate_anndata(adata))
    own = model.gene_alignment
    assert alignment.n_matched == own.n_matched == 222  # 40 before: symbols dropped Ensembl ids
    np.testing.assert_array_equal(alignment.var_index, own.var_index)
    np.testing.assert_array_equal(alignment.vocab_index, own.vocab_index)
    z = model.get_latent_representation(adata, progress_bar=False)
    np.testing.assert_allclose(z, exp["cell_embeddings"], atol=ATOL, rtol=0)


def test_case_and_version_suffixes_match(loaded, fx):
    model, _ = loaded
    _, exp = fx
    adata = ad.read_h5ad(fx[0] / "input.h5ad")
    names = [f"{g.lower()}.{i % 7 + 1}" if i % 2 else g for i, g in enumerate(adata.var_names)]
    adata.var_names = names
    Geneformer.setup_anndata(adata)
    assert model._align_genes(model._validate_anndata(adata)).n_matched == 222
    z = model.get_latent_representation(adata, progress_bar=False)
    np.testing.assert_allclose(z, exp["cell_embeddings"], atol=ATOL, rtol=0)


def test_duplicate_ids_warning_says_summed(loaded, fx, caplog):
    model, _ = loaded
    adata = ad.read_h5ad(fx[0] / "input.h5ad")
    Geneformer.setup_anndata(adata)
    with caplog.at_level(logging.WARNING, logger="scfm.model._geneformer"):
        model._align_genes(model._validate_anndata(adata))
    text = caplog.text
    assert "summed" in text and "first occurrence" not in text
    assert "ENSG90000000000" in text


def test_gene_id_error_shows_real_examples(loaded):
    model, _ = loaded
    adata = ad.AnnData(
        sp.csr_matrix(np.ones((4, 3), dtype=np.float32)),
        var=pd.DataFrame(index=["zz_unknown_1", "zz_unknown_2", "zz_unknown_3"]),
    )
    Geneformer.setup_anndata(adata)
    with pytest.raises(GeneVocabularyError, match="zz_unknown_1") as err:
        model.get_latent_representation(adata, progress_bar=False)
    assert "''" not in str(err.value)


# ---------------------------------------------------------------- per-cell independence


def _deep_cells(var_names, n_cells, depth, rng):
    """Counts where cells express ``depth`` distinct genes with distinct values."""
    x = np.zeros((n_cells, len(var_names)), dtype=np.float32)
    for i in range(n_cells):
        d = depth[i]
        cols = rng.choice(len(var_names), d, replace=False)
        x[i, cols] = rng.permutation(np.arange(1, d + 1)) + 0.0
    adata = ad.AnnData(sp.csr_matrix(x), var=pd.DataFrame(index=var_names))
    adata.obs_names = [f"c{i}" for i in range(n_cells)]
    Geneformer.setup_anndata(adata)
    return adata


def test_cells_deeper_than_input_size_are_independent_of_batch():
    """V1 vocabulary (25k genes), cells with up to 2,500 expressed genes vs a 2,048 input."""
    dicts = scfm.data.load_geneformer_dictionaries(version="V1")
    genes = [g for g in dicts.token_dictionary if not g.startswith("<")][:4000]
    rng = np.random.default_rng(3)
    adata = _deep_cells(genes, 6, [2500, 40, 2100, 3, 2048, 1800], rng)
    gen = torch.Generator().manual_seed(0)
    model = Geneformer(
        adata,
        {
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 8,
        },
    )
    with torch.no_grad():
        for p in model.module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    ids, lengths = model.get_tokens(batch_size=6)
    assert lengths.tolist() == [2048, 40, 2048, 3, 2048, 1800]
    # reference: per cell, the top 2048 genes by count / total * 1e4 / median
    medians = np.array([dicts.gene_median_dictionary[g] for g in genes])
    x = adata.X.toarray()
    for i in (0, 2):
        norm = x[i] / x[i].sum() * 1e4 / medians
        nz = np.flatnonzero(x[i])
        top = nz[np.argsort(-norm[nz], kind="stable")][:2048]
        np.testing.assert_array_equal(ids[i], [dicts.token_dictionary[genes[j]] for j in top])
    alone = np.concatenate(
        [model.get_latent_representation(indices=[i], progress_bar=False) for i in range(6)]
    )
    for batch_size in (2, 6):
        together = model.get_latent_representation(batch_size=batch_size, progress_bar=False)
        np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)
    order = [4, 1, 0, 5]
    shuffled = model.get_latent_representation(indices=order, batch_size=3, progress_bar=False)
    np.testing.assert_allclose(shuffled, alone[order], atol=1e-5, rtol=0)


def test_v2_truncation_keeps_cls_and_eos_per_cell(fx):
    """A small input size forces V2 truncation: <cls> + top genes + <eos>, per cell."""
    path, _ = fx
    dicts = scfm.data.load_geneformer_dictionaries(path / "checkpoint")
    genes = [g for g in dicts.token_dictionary if not g.startswith("<")]
    adata = _deep_cells(genes, 5, [200, 10, 150, 31, 240], np.random.default_rng(4))
    config = {**TINY, "variant": "V2", "input_size": 32, "max_position_embeddings": 64}
    model = Geneformer(adata, config, dicts)
    ids, lengths = model.get_tokens(batch_size=2)
    assert lengths.tolist() == [32, 12, 32, 32, 32]
    assert (ids[:, 0] == 2).all() and (ids[np.arange(5), lengths - 1] == 3).all()
    alone = np.concatenate(
        [model.get_latent_representation(indices=[i], progress_bar=False) for i in range(5)]
    )
    together = model.get_latent_representation(batch_size=5, progress_bar=False)
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- vocabulary and defaults


def test_default_v1_dictionaries_ship(fx):
    path, _ = fx
    adata = _adata(path)
    model = Geneformer(
        adata,
        {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 8,
        },
    )
    assert model.module.config.vocab_size == 25426 == len(model.vocabulary)
    assert model.config.variant == "V1" and model.config.input_size == 2048
    ids, _lengths = model.get_tokens()
    assert (ids[:, 0] >= 2).all()  # no <cls>: the first token is a gene
    z = model.get_latent_representation(progress_bar=False)  # V1 default: mean, layer -2
    assert z.shape == (64, 32) and np.isfinite(z).all()


def test_v2_without_medians_is_explained(fx):
    path, _ = fx
    with pytest.raises(InvalidInputError, match="V2 dictionaries"):
        Geneformer(_adata(path), {"variant": "V2"})


def test_corrupt_dictionaries_are_refused(fx, tmp_path):
    from scfm.errors import CheckpointFormatError

    path, _ = fx
    with open(path / "checkpoint" / "gene_median_dictionary_gc104M.pkl", "rb") as fh:
        medians = pickle.load(fh)
    with open(path / "checkpoint" / "token_dictionary_gc104M.pkl", "rb") as fh:
        tokens = pickle.load(fh)
    gene = next(iter(medians))
    for bad in (0.0, -1.0, float("nan")):
        (tmp_path / "m.pkl").write_bytes(pickle.dumps({**medians, gene: bad}))
        with pytest.raises(CheckpointFormatError, match=gene):
            scfm.data.load_geneformer_dictionaries(
                path / "checkpoint", gene_median_file=tmp_path / "m.pkl"
            )
    two = list(tokens)[5:7]
    (tmp_path / "t.pkl").write_bytes(pickle.dumps({**tokens, two[1]: tokens[two[0]]}))
    with pytest.raises(CheckpointFormatError, match="token id"):
        scfm.data.load_geneformer_dictionaries(
            path / "checkpoint", token_dictionary_file=tmp_path / "t.pkl"
        )
