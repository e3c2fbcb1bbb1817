"""scCello parity with the reference fixture, any AnnData, per-cell independence, loading."""

from __future__ import annotations

import json
import pickle
import shutil
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import scfm
from conftest import fixture_dir
from scfm.errors import (
    AnnDataKeyError,
    CheckpointFormatError,
    CheckpointKeyError,
    InvalidInputError,
    OntologyError,
)
from scfm.model import ScCello
from scfm.model._sccello import CELL_TYPE_KEY

ATOL = 1e-4
LOSSES = {
    "mlm_loss": "mlm_loss",
    "relational_alignment_loss": "relational_alignment_loss",
    "cell_type_coherence_loss": "cell_type_coherence_loss",
    "cell_type_coherence_reg_loss": "cell_type_coherence_reg_loss",
    "total_loss": "total_pretrain_loss",
}


@pytest.fixture(scope="module")
def root():
    return fixture_dir("sccello")


@pytest.fixture(scope="module")
def expected(root):
    return dict(np.load(root / "expected.npz"))


@pytest.fixture(scope="module")
def loaded(root, one_torch_thread):
    adata = ad.read_h5ad(root / "input.h5ad")
    ScCello.setup_anndata(adata)
    model = ScCello.from_pretrained(root / "checkpoint", adata)
    return adata, model


def _subset(adata, idx=slice(None), genes=slice(None)):
    """A fresh AnnData (a ``.copy()`` would share scvi's registration uuid)."""
    return ad.AnnData(
        X=adata.X[idx][:, genes].copy(),
        obs=adata.obs.iloc[idx].copy(),
        var=adata.var.iloc[genes].copy(),
    )


def _latent(model, adata=None, **kwargs):
    return model.get_latent_representation(adata, progress_bar=False, **kwargs)


def _release_pickle(root, name):
    with open(root / "checkpoint" / "data" / name, "rb") as fh:
        return pickle.load(fh)


def _unknown_type(model):
    """A Cell Ontology id that is not one of the model's pretraining types."""
    return next(c for c in model.ontology.ids if c not in model.label_clids)


# ---------------------------------------------------------------------- loading + tokens
def test_from_pretrained_reads_release(loaded, expected, root):
    adata, model = loaded
    assert not model.module.training
    clid2label = _release_pickle(root, "new_pretrain/pretrain_frac100_clid2name.pkl")
    assert model.label_clids == sorted(clid2label, key=clid2label.get)
    for name, clid in _release_pickle(root, "new_pretrain/general_CLid2cellname.pkl"):
        assert model.cell_type_names[clid] == name
    tokens = _release_pickle(root, "token_vocabulary/token_dictionary.pkl")
    # the model gene space is the token dictionary in id order, <cls> appended as the reference
    assert list(model.vocabulary[: len(tokens)]) == sorted(tokens, key=tokens.get)
    assert model.vocabulary[-1] == "<cls>" and len(model.vocabulary) == len(tokens) + 1
    assert model.gene_alignment.n_matched == int(adata.var["in_vocabulary"].sum())
    np.testing.assert_array_equal(model.module.ctgraph_sim.numpy(), expected["ctgraph_sim"])
    np.testing.assert_array_equal(
        model.module.cell_type_ancestor_mask.numpy(), expected["cell_type_ancestor_mask"]
    )


def test_tokens_match_reference(loaded, expected):
    _, model = loaded
    ids, lengths = model.get_tokens()
    np.testing.assert_array_equal(lengths, expected["lengths"])
    assert ids.shape == expected["input_ids"].shape  # 35 cells hit the 128-token limit
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(ids != 0, expected["attention_mask"].astype(bool))
    sub_ids, sub_lengths = model.get_tokens(indices=[7, 2, 7], batch_size=2)
    np.testing.assert_array_equal(sub_lengths, expected["lengths"][[7, 2, 7]])
    np.testing.assert_array_equal(sub_ids, expected["input_ids"][[7, 2, 7], : sub_ids.shape[1]])


def test_cell_without_vocabulary_gene_gets_only_cls(loaded):
    adata, model = loaded
    sub = _subset(adata, np.arange(3))
    x = sub.X.toarray()
    x[1] = 0
    x[1, ~sub.var["in_vocabulary"].to_numpy()] = 5  # only out-of-vocabulary genes
    sub.X = sp.csr_matrix(x)
    ScCello.setup_anndata(sub)
    ids, lengths = model.get_tokens(sub)
    cls_id = model.vocabulary.get_loc("<cls>")
    assert lengths[1] == 1 and ids[1, 0] == cls_id and (ids[1, 1:] == 0).all()
    assert np.isfinite(_latent(model, sub)).all()


# ---------------------------------------------------------------------- embeddings
def test_zero_shot_embedding_matches_reference(loaded, expected):
    _, model = loaded
    np.testing.assert_allclose(_latent(model), expected["cell_embeddings"], atol=ATOL, rtol=0)


@pytest.mark.parametrize(("hidden_layer", "column"), [(0, 0), (1, 1), (2, 2), (-1, 2), (-2, 1)])
def test_all_layer_cls_states_match_reference(loaded, expected, hidden_layer, column):
    _, model = loaded
    np.testing.assert_allclose(
        _latent(model, hidden_layer=hidden_layer),
        expected["cls_all_layers"][:, column],
        atol=ATOL,
        rtol=0,
    )


def test_cell_embeddings_alone_skip_the_other_tokens_of_the_layer_read(loaded, expected):
    """The "latent" call asks for no token states: the layer read runs for <cls> alone and
    gives the <cls> state of the full forward; a classifier still reads the last layer."""
    _, model = loaded
    kwargs = model._inference_kwargs("latent", hidden_layer=1)
    assert kwargs == {"token_states": False, "hidden_layer": 1}
    call = model._prepare(None, list(range(6)), 6, "latent", {"hidden_layer": 1})
    inputs = model.module._get_inference_input(next(iter(model._loader(call))))
    with torch.inference_mode():
        full = model.module.inference(**inputs, hidden_layer=1)
        alone = model.module.inference(**inputs, **kwargs)
    assert alone.token_states is None and alone.token_genes is None
    assert "last_hidden_state" not in alone.extra  # layer 2 was never run
    torch.testing.assert_close(alone.cell_embedding, full.cell_embedding)
    np.testing.assert_allclose(
        alone.cell_embedding.numpy(), expected["cls_all_layers"][:6, 1], atol=ATOL, rtol=0
    )


@pytest.mark.parametrize(
    ("representation", "key"),
    [
        ("cls", "cell_embeddings"),
        ("cell_cls", "cell_cls_embeddings"),
        ("cell_cls_normalized", "cdr_embeddings"),
        ("prototype_scores", "prototype_scores"),
    ],
)
def test_head_outputs_match_reference(loaded, expected, representation, key):
    _, model = loaded
    np.testing.assert_allclose(
        _latent(model, representation=representation), expected[key], atol=ATOL, rtol=0
    )


def test_indices_and_batch_size_keep_rows(loaded, expected):
    _, model = loaded
    idx = [41, 3, 17, 3]
    z = model.get_latent_representation(indices=idx, batch_size=3, progress_bar=False)
    np.testing.assert_allclose(z, expected["cell_embeddings"][idx], atol=ATOL, rtol=0)


def test_query_with_unknown_or_absent_cell_types_is_embedded(loaded, expected):
    """Zero-shot embedding of new cells needs no labels, nor labels the model was set up with."""
    adata, model = loaded
    idx = [0, 5, 9]
    unknown = _subset(adata, idx)
    unknown.obs[CELL_TYPE_KEY] = pd.Categorical([_unknown_type(model)] * len(idx))
    ScCello.setup_anndata(unknown)
    np.testing.assert_allclose(
        _latent(model, unknown), expected["cell_embeddings"][idx], atol=ATOL, rtol=0
    )
    absent = _subset(adata, idx)
    del absent.obs[CELL_TYPE_KEY]
    np.testing.assert_allclose(  # never set up: the model registers it with its own setup
        _latent(model, absent), expected["cell_embeddings"][idx], atol=ATOL, rtol=0
    )


def test_embed_and_gene_embeddings(loaded, expected):
    adata, model = loaded
    target = _subset(adata)
    model.embed(target, progress_bar=False)
    np.testing.assert_allclose(
        target.obsm["X_sccello"], expected["cell_embeddings"], atol=ATOL, rtol=0
    )
    genes = model.get_gene_embeddings(progress_bar=False)
    assert genes.index.name == "gene_id" and genes.index.str.startswith("ENSG").all()
    assert genes.shape[1] == model.module.config.hidden_size
    # a gene's embedding is the mean of its last-layer states over the cells' tokens
    ids, lengths = model.get_tokens()
    with torch.inference_mode():
        hidden = model.module.encode(torch.as_tensor(ids), torch.as_tensor(lengths))
    states = hidden.last_hidden_state.numpy()
    for gene in (genes.index[0], genes.index[-1]):
        token = model.vocabulary.get_loc(gene)
        np.testing.assert_allclose(
            genes.loc[gene].to_numpy(), states[ids == token].mean(0), atol=1e-5, rtol=0
        )
    assert not set(genes.index) & {"<cls>", "<pad>", "<mask>"}
    first = model.get_gene_embeddings(hidden_layer=0, progress_bar=False)
    assert not np.allclose(first.to_numpy(), genes.loc[first.index].to_numpy())


def test_bad_options_fail_before_any_forward(loaded):
    _, model = loaded
    with pytest.raises(InvalidInputError, match="representation"):
        _latent(model, representation="mean")
    with pytest.raises(InvalidInputError, match="hidden_layer"):
        _latent(model, hidden_layer=3)
    with pytest.raises(InvalidInputError, match="hidden_layer"):
        _latent(model, hidden_layer=1.0)
    with pytest.raises(InvalidInputError, match="pooling"):
        _latent(model, pooling="mean")
    with pytest.raises(InvalidInputError, match="representation"):
        model.get_gene_embeddings(representation="cls", progress_bar=False)
    with pytest.raises(InvalidInputError, match="decoder"):
        model.get_normalized_expression()


# ---------------------------------------------------------------------- any AnnData
def test_query_with_other_genes_equals_original_on_shared_genes(loaded):
    """Missing genes, extra genes and another column order: same as the shared genes."""
    adata, model = loaded
    rng = np.random.default_rng(0)
    keep = np.sort(rng.choice(adata.n_vars, adata.n_vars - 40, replace=False))
    n_extra = 25
    extra = sp.csr_matrix(rng.poisson(3.0, size=(adata.n_obs, n_extra)).astype(np.float32))
    x = sp.hstack([adata.X[:, keep], extra]).tocsr()
    var = pd.DataFrame(index=[*adata.var_names[keep], *[f"ENSG9{i:010d}" for i in range(n_extra)]])
    order = rng.permutation(x.shape[1])
    query = ad.AnnData(X=x[:, order].tocsr(), obs=adata.obs.copy(), var=var.iloc[order])
    shared = _subset(adata, genes=keep)
    ScCello.setup_anndata(shared)
    z_query = _latent(model, query, batch_size=7)
    z_shared = _latent(model, shared)
    np.testing.assert_allclose(z_query, z_shared, atol=1e-5, rtol=0)
    # the dropped in-vocabulary genes change the cells: the test can see a wrong alignment
    assert np.abs(z_shared - _latent(model)).max() > 1e-3
    ids_q, _ = model.get_tokens(query)
    ids_s, _ = model.get_tokens(shared)
    np.testing.assert_array_equal(ids_q, ids_s)


def test_mostly_ensembl_ids_with_some_symbols_keep_every_ensembl_id(loaded):
    adata, model = loaded
    query = _subset(adata)
    names = query.var_names.to_numpy().astype(object)
    symbols = query.var["gene_symbols"].astype(str).to_numpy()
    swap = np.flatnonzero(query.var["in_vocabulary"].to_numpy())[::20]  # 5% become symbols
    names[swap] = symbols[swap]
    query.var_names = names
    ScCello.setup_anndata(query)
    alignment = model._align_genes(model._validate_anndata(query))
    in_vocab = np.flatnonzero(query.var["in_vocabulary"].to_numpy())
    kept = np.setdiff1d(in_vocab, swap)
    assert np.isin(kept, alignment.var_index).all()  # every Ensembl id is kept
    # the tokens are those of the original cells restricted to the matched genes
    matched = _subset(adata, genes=np.sort(alignment.var_index))
    ScCello.setup_anndata(matched)
    np.testing.assert_array_equal(model.get_tokens(query)[0], model.get_tokens(matched)[0])


def test_lower_case_and_versioned_ensembl_ids_match(loaded, expected):
    adata, model = loaded
    query = _subset(adata)
    query.var_names = [
        (g.lower() if i % 2 else g) + (f".{i % 7 + 1}" if i % 3 else "")
        for i, g in enumerate(adata.var_names)
    ]
    ScCello.setup_anndata(query)
    ids, _ = model.get_tokens(query)
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_allclose(
        _latent(model, query), expected["cell_embeddings"], atol=ATOL, rtol=0
    )


def test_ensembl_ids_column_is_used_like_the_reference(root, expected, one_torch_thread):
    adata = ad.read_h5ad(root / "input.h5ad")
    adata.var["ensembl_ids"] = adata.var_names.to_numpy()
    adata.var_names = [f"gene{i}" for i in range(adata.n_vars)]
    ScCello.setup_anndata(adata)
    model = ScCello.from_pretrained(root / "checkpoint", adata)
    assert model.setup_args["gene_id_key"] == "ensembl_ids"
    ids, _ = model.get_tokens()
    np.testing.assert_array_equal(ids, expected["input_ids"])


# ---------------------------------------------------------------------- per-cell independence
def test_cells_deeper_than_the_input_size_do_not_depend_on_batch_mates(loaded):
    """Truncation to max_position_embeddings is per cell: batch-mates and size never matter."""
    adata, model = loaded
    rng = np.random.default_rng(1)
    vocab_cols = np.flatnonzero(adata.var["in_vocabulary"].to_numpy())
    n_deep = 4
    deep = np.zeros((n_deep, adata.n_vars), dtype=np.float32)
    deep[:, vocab_cols] = rng.integers(1, 500, size=(n_deep, len(vocab_cols)))  # 300 genes
    x = sp.vstack([sp.csr_matrix(deep), adata.X[:20]]).tocsr()
    cells = ad.AnnData(
        X=x, obs=pd.DataFrame(index=[f"c{i}" for i in range(x.shape[0])]), var=adata.var
    )
    ScCello.setup_anndata(cells)
    cap = model.module.config.max_position_embeddings
    ids, lengths = model.get_tokens(cells)
    assert (lengths[:n_deep] == cap).all() and len(vocab_cols) + 1 > cap
    alone = np.concatenate(
        [_latent(model, cells, indices=[i], batch_size=1) for i in range(n_deep)]
    )
    for batch_size in (2, 5, 24):
        z = _latent(model, cells, batch_size=batch_size)
        np.testing.assert_allclose(z[:n_deep], alone, atol=1e-5, rtol=0)
        shuffled = np.random.default_rng(batch_size).permutation(x.shape[0])
        z_perm = _latent(model, cells, indices=shuffled, batch_size=batch_size)
        np.testing.assert_allclose(z_perm, z[shuffled], atol=1e-5, rtol=0)
    for i in range(n_deep):
        alone_ids, _ = model.get_tokens(cells, indices=[i])
        np.testing.assert_array_equal(alone_ids[0], ids[i, :cap])
    # truncation keeps the top-ranked genes: the tokens are the cell's own ranking's head
    x_norm = deep[0, vocab_cols] / deep[0, vocab_cols].sum()
    medians = model.module.gene_medians.numpy()
    tokens = np.array([model.vocabulary.get_loc(g) for g in adata.var_names[vocab_cols]])
    order = np.argsort(-(x_norm / medians[tokens]), kind="stable")
    np.testing.assert_array_equal(ids[0, 1:cap], tokens[order[: cap - 1]])


# ---------------------------------------------------------------------- release variants
def _copy_release(root, tmp_path):
    dst = tmp_path / "release"
    shutil.copytree(root / "checkpoint", dst)
    return dst


def test_safetensors_without_tied_aliases(loaded, root, tmp_path, expected):
    """transformers < 4.40 dropped ``dense_2.bias``: the tie must be restored, not left at 0."""
    from safetensors.torch import save_file

    adata, _ = loaded
    dst = _copy_release(root, tmp_path)
    state = torch.load(dst / "pytorch_model.bin", weights_only=True)
    (dst / "pytorch_model.bin").unlink()
    for head in ("cls", "cell_cls"):
        del state[f"{head}.predictions.dense_2.bias"]
    save_file({k: v.contiguous() for k, v in state.items()}, dst / "model.safetensors")
    model = ScCello.from_pretrained(dst, adata)
    for head in ("cls", "cell_cls"):
        bias = getattr(model.module, head).predictions.bias.detach()
        torch.testing.assert_close(bias, state[f"{head}.predictions.bias"], atol=0, rtol=0)
        assert bias.abs().sum() > 0
    np.testing.assert_allclose(
        _latent(model, representation="cell_cls"),
        expected["cell_cls_embeddings"],
        atol=ATOL,
        rtol=0,
    )


def test_only_dense_2_alias_present(loaded, root, tmp_path, expected):
    adata, _ = loaded
    dst = _copy_release(root, tmp_path)
    state = torch.load(dst / "pytorch_model.bin", weights_only=True)
    del state["cell_cls.predictions.bias"]
    torch.save(state, dst / "pytorch_model.bin")
    model = ScCello.from_pretrained(dst, adata)
    np.testing.assert_allclose(
        _latent(model, representation="cell_cls"),
        expected["cell_cls_embeddings"],
        atol=ATOL,
        rtol=0,
    )


def test_inconsistent_aliases_missing_keys_and_nan_fail(loaded, root, tmp_path):
    adata, _ = loaded
    dst = _copy_release(root, tmp_path)
    state = torch.load(dst / "pytorch_model.bin", weights_only=True)
    bad = dict(state)
    bad["cls.predictions.dense_2.bias"] = bad["cls.predictions.dense_2.bias"] + 1
    torch.save(bad, dst / "pytorch_model.bin")
    with pytest.raises(CheckpointFormatError, match="differ"):
        ScCello.from_pretrained(dst, adata)
    bad = {k: v for k, v in state.items() if k != "learned_centroid.weight"}
    bad["bert.extra.weight"] = torch.zeros(2)
    torch.save(bad, dst / "pytorch_model.bin")
    with pytest.raises(CheckpointKeyError) as err:
        ScCello.from_pretrained(dst, adata)
    assert "learned_centroid.weight" in str(err.value) and "bert.extra.weight" in str(err.value)
    bad = dict(state)
    bad["affine_projection.weight"] = bad["affine_projection.weight"].clone()
    bad["affine_projection.weight"][0, 0] = float("nan")
    torch.save(bad, dst / "pytorch_model.bin")
    with pytest.raises(CheckpointFormatError, match=r"affine_projection\.weight"):
        ScCello.from_pretrained(dst, adata)


def test_release_without_data_folder_needs_matching_vocabulary(loaded, root, tmp_path):
    adata, _ = loaded
    dst = _copy_release(root, tmp_path)
    shutil.rmtree(dst / "data")
    vocab_size = json.loads((dst / "config.json").read_text())["vocab_size"]
    with pytest.raises(CheckpointFormatError, match=f"vocab_size={vocab_size}"):
        ScCello.from_pretrained(dst, adata)
    # the data folder can also be passed explicitly
    model = ScCello.from_pretrained(dst, adata, data_dir=root / "checkpoint" / "data")
    assert model.label_clids is not None


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("num_hidden_layers", 1e6, "num_hidden_layers"),  # a float: wrong type
        ("num_hidden_layers", 1_000_000, "num_hidden_layers"),  # absurd
        ("num_hidden_layers", 3, "num_hidden_layers"),  # disagrees with the weights
        ("hidden_size", -32, "hidden_size"),
        ("hidden_size", "32", "hidden_size"),
        ("intermediate_size", 65, "intermediate_size"),
        ("max_position_embeddings", 64, "max_position_embeddings"),
        ("vocab_size", 10**12, "vocab_size"),
        ("tau", 0, "tau"),
        ("hidden_act", "swiglu", "hidden_act"),
        ("hidden_dropout_prob", 1.5, "hidden_dropout_prob"),
        ("data_branch", "../../etc", "data_branch"),
    ],
)
def test_bad_config_fails_fast_naming_the_key(loaded, root, tmp_path, key, value, match):
    adata, _ = loaded
    dst = _copy_release(root, tmp_path)
    config = json.loads((dst / "config.json").read_text())
    config[key] = value
    (dst / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(CheckpointFormatError, match=match):
        ScCello.from_pretrained(dst, adata)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_malformed_config_file(loaded, root, tmp_path, text):
    adata, _ = loaded
    dst = _copy_release(root, tmp_path)
    (dst / "config.json").write_text(text)
    with pytest.raises(CheckpointFormatError, match=r"config\.json"):
        ScCello.from_pretrained(dst, adata)


@pytest.mark.parametrize(
    ("file", "corrupt", "match"),
    [
        ("token_dictionary.pkl", lambda d: {**d, "ENSGDUP": 5}, "same token id"),
        ("token_dictionary.pkl", lambda d: {**d, "ENSGFAR": 10_000}, "not 0"),
        ("token_dictionary.pkl", lambda d: {**d, "ENSGTXT": "x"}, "integer"),
        ("token_dictionary.pkl", lambda d: {k: v for k, v in d.items() if k != "<pad>"}, "pad"),
        ("gene_median_dictionary.pkl", lambda d: {**d, next(iter(d)): 0.0}, "median"),
        ("gene_median_dictionary.pkl", lambda d: {**d, next(iter(d)): float("nan")}, "median"),
        ("gene_median_dictionary.pkl", lambda d: {**d, next(iter(d)): -1.0}, "median"),
        ("gene_median_dictionary.pkl", lambda d: {**d, next(iter(d)): "a"}, "median"),
    ],
)
def test_corrupt_vocabulary_is_refused(loaded, root, tmp_path, file, corrupt, match):
    adata, _ = loaded
    dst = _copy_release(root, tmp_path)
    path = dst / "data" / "token_vocabulary" / file
    with open(path, "rb") as fh:
        data = pickle.load(fh)
    with open(path, "wb") as fh:
        pickle.dump(corrupt(data), fh)
    with pytest.raises(CheckpointFormatError, match=match):
        ScCello.from_pretrained(dst, adata)


def test_save_load_round_trip(loaded, tmp_path, expected):
    adata, model = loaded
    model.save(tmp_path / "saved", overwrite=True)
    again = ScCello.load(tmp_path / "saved", adata=adata)
    np.testing.assert_array_equal(_latent(again), _latent(model))
    np.testing.assert_array_equal(again.module.ctgraph_sim.numpy(), expected["ctgraph_sim"])
    assert again.label_clids == model.label_clids
    # with another AnnData (other genes) too
    other = _subset(adata, np.arange(10), np.arange(adata.n_vars)[::-1])
    loaded_other = ScCello.load(tmp_path / "saved", adata=other)
    np.testing.assert_allclose(
        _latent(loaded_other), expected["cell_embeddings"][:10], atol=ATOL, rtol=0
    )


# ---------------------------------------------------------------------- fine-tuning
def test_finetune_and_predict_use_the_linear_probe(loaded, tmp_path):
    adata, base = loaded
    base.save(tmp_path / "base", overwrite=True)
    model = ScCello.load(tmp_path / "base", adata=_subset(adata))
    encoder_before = model.module.bert.encoder.layer[0].attention.self.query.weight.clone()
    model.finetune(
        "cell_type",
        max_epochs=2,
        batch_size=16,
        freeze_encoder=True,
        accelerator="cpu",
        enable_progress_bar=False,
    )
    assert model.classifier_labels == sorted(adata.obs["cell_type"].unique())
    torch.testing.assert_close(
        model.module.bert.encoder.layer[0].attention.self.query.weight, encoder_before
    )
    probs = model.predict(soft=True, progress_bar=False)
    assert list(probs.columns) == model.classifier_labels
    # the head reads the raw last-layer <cls> state (the reference's linear probe)
    ids, lengths = model.get_tokens()
    with torch.inference_mode():
        h = model.module.encode(torch.as_tensor(ids), torch.as_tensor(lengths))
        logits = model.module.classifier(h.last_hidden_state[:, 0])
    np.testing.assert_allclose(
        probs.to_numpy(), torch.softmax(logits, -1).numpy(), atol=1e-5, rtol=0
    )
    labels = model.predict(indices=[3, 1], progress_bar=False)
    np.testing.assert_array_equal(labels, probs.idxmax(axis=1).to_numpy()[[3, 1]])


def test_lora_finetune_targets_attention_and_round_trips(loaded, tmp_path):
    adata, base = loaded
    base.save(tmp_path / "base", overwrite=True)
    model = ScCello.load(tmp_path / "base", adata=_subset(adata))
    model.finetune(
        "cell_type", max_epochs=1, lora_rank=2, accelerator="cpu", enable_progress_bar=False
    )
    n_layers = model.module.config.num_hidden_layers
    assert len(model.lora_config["targets"]) == 3 * n_layers
    assert all(t.split(".")[-1] in {"query", "key", "value"} for t in model.lora_config["targets"])
    model.save(tmp_path / "tuned", overwrite=True)
    again = ScCello.load(tmp_path / "tuned", adata=_subset(adata, np.arange(9)))
    np.testing.assert_array_equal(
        again.predict(soft=True, progress_bar=False).to_numpy(),
        model.predict(indices=np.arange(9), soft=True, progress_bar=False).to_numpy(),
    )


# ---------------------------------------------------------------------- losses
def _fixed_mask(ids, lengths):
    pos = np.arange(ids.shape[1])[None, :]
    return (pos % 7 == 3) & (pos < lengths[:, None])


def test_pretraining_losses_match_reference(loaded, expected):
    _, model = loaded
    ids, lengths = model.get_tokens(indices=np.arange(24))
    mask = _fixed_mask(ids, lengths)
    np.testing.assert_array_equal(np.argwhere(mask), expected["mlm_positions"])
    out = model.get_pretraining_losses(indices=np.arange(24), mlm_mask=mask)
    for ours, ref in LOSSES.items():
        np.testing.assert_allclose(out[ours], expected[ref], atol=ATOL, rtol=0, err_msg=ours)
    np.testing.assert_allclose(out["mlm_scores"], expected["mlm_scores_masked"], atol=ATOL, rtol=0)
    # rows of mlm_mask follow `indices`, whatever their order
    order = np.arange(24)[::-1]
    again = model.get_pretraining_losses(indices=order, mlm_mask=mask[order])
    for key in LOSSES:
        np.testing.assert_allclose(again[key], out[key], atol=1e-5, rtol=0, err_msg=key)


def test_random_masking_rule_and_seed(loaded):
    _, model = loaded
    ids, lengths = model.get_tokens()
    ids_t, lengths_t = torch.as_tensor(ids), torch.as_tensor(lengths)
    generator = torch.Generator().manual_seed(0)
    masked, labels = model.module.mask_tokens(ids_t, lengths_t, generator=generator)
    selected = labels != -100
    assert not selected[:, 0].any()  # never <cls>
    assert not selected[ids_t == 0].any()  # never padding
    frac = selected.sum().item() / (lengths.sum() - len(lengths))
    assert 0.10 < frac < 0.20
    assert (labels[selected] == ids_t[selected]).all()
    assert 0.7 < (masked[selected] == 1).float().mean().item() < 0.9
    cells = np.arange(12)
    first = model.get_pretraining_losses(indices=cells, seed=3)
    np.testing.assert_array_equal(
        model.get_pretraining_losses(indices=cells, seed=3)["mlm_scores"], first["mlm_scores"]
    )
    other = model.get_pretraining_losses(indices=cells, seed=4)
    assert other["mlm_loss"] != first["mlm_loss"]


def test_unknown_cell_types_are_reported(loaded):
    adata, model = loaded
    sub = _subset(adata, np.arange(6))
    other = _unknown_type(model)
    known = model.label_clids[0]
    sub.obs[CELL_TYPE_KEY] = [known] * 3 + [other, "bogus", "bogus"]
    ScCello.setup_anndata(sub)
    with pytest.raises(OntologyError, match="bogus") as err:
        model.get_pretraining_losses(sub)
    assert other in str(err.value)
    with pytest.raises(OntologyError, match="not in the cell ontology"):
        ScCello(sub, ontology=str(model.ontology_path))
    absent = _subset(adata, np.arange(6))
    del absent.obs[CELL_TYPE_KEY]
    with pytest.raises(AnnDataKeyError, match=CELL_TYPE_KEY):
        model.get_pretraining_losses(absent)


# ---------------------------------------------------------------------- novel cell types
def test_novel_cell_types_match_reference(loaded, expected):
    adata, model = loaded
    target = _subset(adata)
    ScCello.setup_anndata(target)
    names = list(expected["novel_target_names"])
    key = "novel"
    probs = scfm.tl.classify_novel_cell_types(
        model, target, names, reference_key="cell_type", key_added=key
    )
    info = target.uns[key]
    np.testing.assert_allclose(info["celltype_repr"], expected["celltype_repr"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(info["voting_sim"], expected["novel_voting_sim"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(
        target.obsm[f"{key}_sim"].to_numpy(), expected["novel_sim_x"], atol=ATOL, rtol=0
    )
    np.testing.assert_allclose(
        target.obsm[f"{key}_logits"].to_numpy(), expected["novel_logits"], atol=ATOL, rtol=0
    )
    np.testing.assert_allclose(probs.to_numpy(), expected["novel_probs"], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(target.obs[key].cat.codes.to_numpy(), expected["novel_pred"])
    assert set(target.obs[f"{key}_id"]) <= set(info["candidate_ids"])
    taxonomy = json.loads(
        (
            fixture_dir("sccello") / "checkpoint/data/cell_taxonomy/celltype_relationship.json"
        ).read_text()
    )
    by_name = {e["name"].lower(): e["id"] for e in taxonomy}
    assert list(info["candidate_ids"]) == [by_name[n.lower()] for n in names]


def test_novel_cell_types_with_cl_ids_and_errors(loaded, expected):
    adata, model = loaded
    sub = _subset(adata, np.arange(10))
    ScCello.setup_anndata(sub)
    ids = model.lookup_cell_types(list(expected["novel_target_names"]))
    scfm.tl.classify_novel_cell_types(model, sub, ids, reference=adata, key_added="n2")
    np.testing.assert_allclose(
        sub.obsm["n2_logits"].to_numpy(), expected["novel_logits"][:10], atol=ATOL, rtol=0
    )
    with pytest.raises(OntologyError, match="no such cell"):
        scfm.tl.classify_novel_cell_types(model, sub, ["no such cell"])
    with pytest.raises(AnnDataKeyError):
        scfm.tl.classify_novel_cell_types(model, sub, ids, reference_key="missing")


def test_spearman_rows_equals_scipy():
    from scipy.stats import spearmanr

    from scfm.tl._novel_cell_types import spearman_rows

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 9))
    x[0, :3] = 0  # ties
    y = rng.normal(size=(3, 9))
    ours = spearman_rows(x, y)
    for i in range(4):
        ref = spearmanr(x[i], y, axis=1)[0][0][1:]
        np.testing.assert_allclose(ours[i], ref, atol=1e-12)


def test_novel_cell_types_label_mapping(loaded, expected):
    """The reference places pretraining types by name; a name it cannot find gets zeros."""
    adata, model = loaded
    names = list(expected["novel_target_names"])
    saved = dict(model.taxonomy_names)
    try:
        label = len(model.label_clids) - 1
        del model.taxonomy_names[model.cell_type_names[model.label_clids[label]].lower()]
        sub = _subset(adata, np.arange(5))
        ScCello.setup_anndata(sub)
        kwargs = {"reference": adata, "reference_key": "cell_type"}
        scfm.tl.classify_novel_cell_types(model, sub, names, key_added="by_name", **kwargs)
        np.testing.assert_array_equal(sub.uns["by_name"]["voting_sim"][:, label], 0)
        scfm.tl.classify_novel_cell_types(
            model, sub, names, key_added="by_id", label_mapping="ids", **kwargs
        )
        np.testing.assert_allclose(
            sub.uns["by_id"]["voting_sim"], expected["novel_voting_sim"], atol=ATOL, rtol=0
        )
    finally:
        model.taxonomy_names = saved
    with pytest.raises(InvalidInputError, match="label_mapping"):
        scfm.tl.classify_novel_cell_types(model, adata, names, label_mapping="both")


def test_novel_cell_type_plot(loaded, expected):
    import matplotlib

    matplotlib.use("Agg")
    adata, model = loaded
    target = _subset(adata)
    ScCello.setup_anndata(target)
    names = list(expected["novel_target_names"])
    scfm.tl.classify_novel_cell_types(
        model, target, names, reference_key="cell_type", key_added="p"
    )
    ax = scfm.pl.novel_cell_types(target, "cell_type", key="p")
    shown = ax.images[0].get_array()
    assert shown.shape == (target.obs["cell_type"].nunique(), len(names))
    np.testing.assert_allclose(shown.sum(1), 1, atol=1e-6)  # rows are mean probabilities
    with pytest.raises(AnnDataKeyError, match="classify_novel_cell_types"):
        scfm.pl.novel_cell_types(target, "cell_type", key="missing")
