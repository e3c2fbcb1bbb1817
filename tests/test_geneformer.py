"""Geneformer parity with the reference fixture and the release variants built from it."""

from __future__ import annotations

import json
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

import scfm
from conftest import fixture_dir
from scfm.errors import CheckpointKeyError, CheckpointNotFoundError, InvalidInputError
from scfm.model import Geneformer

ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fx():
    path = fixture_dir("geneformer")
    return path, np.load(path / "expected.npz")


def _adata(path) -> ad.AnnData:
    adata = ad.read_h5ad(path / "input.h5ad")
    Geneformer.setup_anndata(adata)
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


def test_tokenizer_truncation_and_v1_layout():
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


def test_model_tokens_match_fixture(loaded, fx):
    model, _ = loaded
    _, exp = fx
    ids, lengths = model.get_tokens()
    np.testing.assert_array_equal(lengths, exp["lengths"])
    np.testing.assert_array_equal(ids, exp["input_ids"][:, : ids.shape[1]])
    assert model.variant == "V2"


# ---------------------------------------------------------------- embeddings / logits

EMBEDDINGS = [
    ("cell_embeddings", {}),
    ("cell_embeddings_meanpool", {"pooling": "mean"}),
    ("cell_embeddings_cls_lastlayer", {"layer": -1}),
    ("cell_embeddings_meanpool_lastlayer", {"pooling": "mean", "layer": -1}),
]


@pytest.mark.parametrize(("key", "kwargs"), EMBEDDINGS)
def test_cell_embeddings_match_fixture(loaded, fx, key, kwargs):
    model, _ = loaded
    _, exp = fx
    z = model.get_latent_representation(progress_bar=False, **kwargs)
    assert exp["cell_index"].tolist() == list(range(len(z)))
    np.testing.assert_allclose(z, exp[key], atol=ATOL, rtol=0)


def test_rows_follow_indices_and_batch_size(loaded, fx):
    model, _ = loaded
    _, exp = fx
    rng = np.random.default_rng(0)
    idx = rng.permutation(64)[:40]
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


def test_invalid_layer_and_pooling(loaded):
    model, _ = loaded
    with pytest.raises(InvalidInputError, match="layer=7"):
        model.get_latent_representation(layer=7, progress_bar=False)
    with pytest.raises(InvalidInputError, match="pooling"):
        model.get_latent_representation(pooling="max", progress_bar=False)


# ---------------------------------------------------------------- release variants


def _copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_pytorch_bin_with_position_ids_and_tied_decoder(fx, tmp_path):
    path, exp = fx
    ckpt = _copy_checkpoint(path / "checkpoint", tmp_path / "v")
    state = load_file(ckpt / "model.safetensors")
    state["bert.embeddings.position_ids"] = torch.arange(4096)[None]
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
    state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
    torch.save(state, ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    adata = _adata(path)
    model = Geneformer.from_pretrained(ckpt, adata)
    z = model.get_latent_representation(progress_bar=False)
    np.testing.assert_allclose(z, exp["cell_embeddings"], atol=ATOL, rtol=0)


def test_strict_loading_lists_every_bad_key(fx, tmp_path):
    path, _ = fx
    ckpt = _copy_checkpoint(path / "checkpoint", tmp_path / "bad")
    state = load_file(ckpt / "model.safetensors")
    del state["bert.encoder.layer.1.output.dense.bias"]
    state["bert.encoder.layer.9.extra.weight"] = torch.zeros(2)
    state["cls.predictions.bias"] = torch.zeros(7)
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(CheckpointKeyError) as err:
        Geneformer.from_pretrained(ckpt, _adata(path))
    msg = str(err.value)
    assert "bert.encoder.layer.1.output.dense.bias" in msg
    assert "bert.encoder.layer.9.extra.weight" in msg
    assert "cls.predictions.bias" in msg


def test_missing_medians_for_v2_is_explained(fx, tmp_path):
    path, _ = fx
    ckpt = _copy_checkpoint(path / "checkpoint", tmp_path / "nomed")
    (ckpt / "gene_median_dictionary_gc104M.pkl").unlink()
    with pytest.raises(CheckpointNotFoundError, match="gene_median_file"):
        Geneformer.from_pretrained(ckpt, _adata(path))
    # passing the file explicitly works
    model = Geneformer.from_pretrained(
        ckpt,
        _adata(path),
        gene_median_file=path / "checkpoint" / "gene_median_dictionary_gc104M.pkl",
    )
    assert model.variant == "V2"


def test_sequence_classification_directory(fx, tmp_path):
    path, _ = fx
    ckpt = _copy_checkpoint(path / "checkpoint", tmp_path / "clf")
    state = {
        k: v for k, v in load_file(ckpt / "model.safetensors").items() if k.startswith("bert.")
    }
    gen = torch.Generator().manual_seed(0)
    state["bert.pooler.dense.weight"] = torch.randn(64, 64, generator=gen) * 0.2
    state["bert.pooler.dense.bias"] = torch.randn(64, generator=gen) * 0.1
    state["classifier.weight"] = torch.randn(3, 64, generator=gen)
    state["classifier.bias"] = torch.randn(3, generator=gen)
    save_file(state, ckpt / "model.safetensors")
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["BertForSequenceClassification"]
    config["id2label"] = {"0": "B cell", "1": "T cell", "2": "monocyte"}
    (ckpt / "config.json").write_text(json.dumps(config))
    adata = _adata(path)
    model = Geneformer.from_pretrained(ckpt, adata)
    probs = model.predict(adata, key_added="pred", progress_bar=False)
    # reference: tanh(dense(first token of the last layer)) -> classifier
    h = model.get_latent_representation(pooling="cls", layer=-1, progress_bar=False)
    pooled = np.tanh(
        h @ state["bert.pooler.dense.weight"].numpy().T + state["bert.pooler.dense.bias"].numpy()
    )
    logits = pooled @ state["classifier.weight"].numpy().T + state["classifier.bias"].numpy()
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(probs.to_numpy(), expected, atol=ATOL, rtol=0)
    assert list(adata.obs["pred"].cat.categories) == ["B cell", "T cell", "monocyte"]
    np.testing.assert_array_equal(
        adata.obs["pred"].astype(str).to_numpy(), np.array(probs.columns)[expected.argmax(1)]
    )
    np.testing.assert_allclose(adata.obs["pred_probability"], expected.max(1), atol=ATOL)


def test_save_load_roundtrip(loaded, fx, tmp_path):
    model, adata = loaded
    _, exp = fx
    model.save(tmp_path / "saved", overwrite=True)
    again = Geneformer.load(tmp_path / "saved", adata=adata)
    z = again.get_latent_representation(progress_bar=False)
    np.testing.assert_allclose(z, exp["cell_embeddings"], atol=ATOL, rtol=0)
    assert again.variant == "V2"


def test_minibatches_group_cells_by_length(loaded):
    model, adata = loaded
    lengths = model.get_tokens()[1]
    groups = model._minibatch_indices(adata, np.arange(adata.n_obs), 16)
    assert sorted(np.concatenate(groups).tolist()) == list(range(adata.n_obs))
    spans = [lengths[g].max() - lengths[g].min() for g in groups]
    consecutive = [lengths[i : i + 16].max() - lengths[i : i + 16].min() for i in range(0, 64, 16)]
    assert sum(spans) < sum(consecutive)


def test_symbols_are_mapped_with_name_dictionary(fx):
    path, _exp = fx
    adata = ad.read_h5ad(path / "input.h5ad")
    adata.var_names = adata.var["gene_symbols"].astype(str).to_numpy()
    adata.var_names_make_unique()
    Geneformer.setup_anndata(adata)
    model = Geneformer.from_pretrained(path / "checkpoint", adata)
    assert model.gene_alignment.n_matched >= 200
    assert isinstance(model.get_latent_representation(progress_bar=False), np.ndarray)


def test_default_v1_dictionaries_ship(fx):
    path, _ = fx
    adata = ad.read_h5ad(path / "input.h5ad")
    Geneformer.setup_anndata(adata)
    model = Geneformer(
        adata, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    assert model.module.config.vocab_size == 25426
    assert model.variant == "V1"
    ids, _lengths = model.get_tokens()
    assert (ids[:, 0] >= 2).all()  # no <cls>: the first token is a gene
    z = model.get_latent_representation(progress_bar=False)
    assert z.shape == (64, 32) and np.isfinite(z).all()
    assert isinstance(pd.Index(model._vocab_names()), pd.Index)


def test_other_gene_order_is_refused(loaded, fx):
    model, _ = loaded
    path, _ = fx
    other = ad.read_h5ad(path / "input.h5ad")[:, ::-1].copy()
    Geneformer.setup_anndata(other)
    with pytest.raises(InvalidInputError, match="var_names"):
        model.get_latent_representation(other, progress_bar=False)


def test_encoder_inference_chunking_matches_full_batch():
    from scfm.nn._bert import FFN_CHUNK_TOKENS

    config = scfm.nn.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    bert = scfm.nn.BertModel(config).eval()
    lengths = torch.tensor([4000, 3500, 10, 2999])
    assert int(lengths.sum()) > FFN_CHUNK_TOKENS
    ids = torch.randint(2, 50, (4, 4000))
    mask = scfm.nn.make_key_padding_mask(lengths)
    with torch.inference_mode():
        chunked = bert(ids, mask).last_hidden_state
    with torch.enable_grad():
        full = bert(ids, mask).last_hidden_state.detach()
    np.testing.assert_allclose(chunked[mask].numpy(), full[mask].numpy(), atol=1e-5, rtol=0)
