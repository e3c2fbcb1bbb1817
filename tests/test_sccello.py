"""scCello parity with the reference fixture, loading variants, losses, novel cell types."""

from __future__ import annotations

import json
import pickle
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import scfm
from conftest import fixture_dir
from scfm.errors import CheckpointFormatError, CheckpointKeyError, OntologyError
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
def loaded(root):
    torch.set_num_threads(1)
    adata = ad.read_h5ad(root / "input.h5ad")
    ScCello.setup_anndata(adata)
    model = ScCello.from_pretrained(root / "checkpoint", adata)
    return adata, model


def _subset(adata, idx):
    """A fresh AnnData of some cells (a ``.copy()`` would share scvi's registration uuid)."""
    return ad.AnnData(X=adata.X[idx].copy(), obs=adata.obs.iloc[idx].copy(), var=adata.var.copy())


def _latent(model, **kwargs):
    return model.get_latent_representation(progress_bar=False, **kwargs)


# ---------------------------------------------------------------------- loading + tokens
def _release_pickle(root, name):
    with open(root / "checkpoint" / "data" / name, "rb") as fh:
        return pickle.load(fh)


def _unknown_type(model):
    """A Cell Ontology id that is not one of the model's pretraining types."""
    return next(c for c in model.ontology.ids if c not in model.label_clids)


def test_from_pretrained_reads_release(loaded, expected, root):
    adata, model = loaded
    assert not model.module.training
    clid2label = _release_pickle(root, "new_pretrain/pretrain_frac100_clid2name.pkl")
    assert model.label_clids == sorted(clid2label, key=clid2label.get)
    for name, clid in _release_pickle(root, "new_pretrain/general_CLid2cellname.pkl"):
        assert model.cell_type_names[clid] == name
    tokens = _release_pickle(root, "token_vocabulary/token_dictionary.pkl")
    assert model.token_dictionary["<cls>"] == len(tokens)  # appended, as the reference
    assert model.gene_alignment.n_matched == int(adata.var["in_vocabulary"].sum())
    np.testing.assert_array_equal(model.module.ctgraph_sim.numpy(), expected["ctgraph_sim"])
    np.testing.assert_array_equal(
        model.module.cell_type_ancestor_mask.numpy(), expected["cell_type_ancestor_mask"]
    )


def test_tokens_match_reference(loaded, expected):
    _, model = loaded
    ids, lengths = model.get_tokens()
    np.testing.assert_array_equal(lengths, expected["lengths"])
    width = expected["input_ids"].shape[1]
    assert ids.shape[1] == width  # 35 cells hit the 128-token limit
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(ids != 0, expected["attention_mask"].astype(bool))


def test_cell_without_vocabulary_gene_gets_only_cls(loaded):
    adata, model = loaded
    sub = _subset(adata, np.arange(3))
    x = sub.X.toarray()
    x[1] = 0
    x[1, ~sub.var["in_vocabulary"].to_numpy()] = 5  # only out-of-vocabulary genes
    sub.X = sp.csr_matrix(x)
    ScCello.setup_anndata(sub)
    ids, lengths = model.get_tokens(sub)
    cls_id = model.token_dictionary["<cls>"]
    assert lengths[1] == 1 and ids[1, 0] == cls_id and (ids[1, 1:] == 0).all()
    z = model.get_latent_representation(sub, progress_bar=False)
    assert np.isfinite(z).all()


# ---------------------------------------------------------------------- embeddings
def test_zero_shot_embedding_matches_reference(loaded, expected):
    _, model = loaded
    np.testing.assert_allclose(_latent(model), expected["cell_embeddings"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_all_layer_cls_states_match_reference(loaded, expected, layer):
    _, model = loaded
    np.testing.assert_allclose(
        _latent(model, layer=layer), expected["cls_all_layers"][:, layer], atol=ATOL, rtol=0
    )


@pytest.mark.parametrize(
    ("representation", "key"),
    [
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
    unknown = adata[idx].copy()  # shares the fixture's scvi-tools id, as copies do
    unknown.obs[CELL_TYPE_KEY] = pd.Categorical([_unknown_type(model)] * len(idx))
    np.testing.assert_allclose(
        _latent(model, adata=unknown), expected["cell_embeddings"][idx], atol=ATOL, rtol=0
    )
    absent = _subset(adata, idx)
    del absent.obs[CELL_TYPE_KEY]
    ScCello.setup_anndata(absent)
    np.testing.assert_allclose(
        _latent(model, adata=absent), expected["cell_embeddings"][idx], atol=ATOL, rtol=0
    )


def test_embed_writes_obsm(loaded, expected):
    adata, model = loaded
    model.embed(adata, progress_bar=False)
    np.testing.assert_allclose(
        adata.obsm["X_sccello"], expected["cell_embeddings"], atol=ATOL, rtol=0
    )
    genes = model.get_gene_embeddings(progress_bar=False)
    hidden = model.module.config.hidden_size
    assert genes.shape[1] == hidden and genes.index.str.startswith("ENSG").all()


def test_bad_representation_and_layer(loaded):
    _, model = loaded
    with pytest.raises(scfm.errors.InvalidInputError, match="representation"):
        _latent(model, representation="mean")
    with pytest.raises(scfm.errors.InvalidInputError, match="layer"):
        _latent(model, layer=3)


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


def test_inconsistent_aliases_and_missing_keys_fail(loaded, root, tmp_path):
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


def test_save_load_round_trip(loaded, tmp_path, expected):
    adata, model = loaded
    model.save(tmp_path / "saved", overwrite=True)
    again = ScCello.load(tmp_path / "saved", adata=adata)
    np.testing.assert_array_equal(_latent(again), _latent(model))
    np.testing.assert_array_equal(again.module.ctgraph_sim.numpy(), expected["ctgraph_sim"])


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


def test_random_masking_rule(loaded):
    _, model = loaded
    ids, lengths = model.get_tokens()
    ids_t, lengths_t = torch.as_tensor(ids), torch.as_tensor(lengths)
    torch.manual_seed(0)
    masked, labels = model.module.mask_tokens(ids_t, lengths_t)
    selected = labels != -100
    assert not selected[:, 0].any()  # never <cls>
    assert not selected[ids_t == 0].any()  # never padding
    frac = selected.sum().item() / (lengths.sum() - len(lengths))
    assert 0.10 < frac < 0.20
    assert (labels[selected] == ids_t[selected]).all()
    assert 0.7 < (masked[selected] == 1).float().mean().item() < 0.9


def test_unknown_cell_types_are_reported(loaded):
    adata, model = loaded
    sub = _subset(adata, np.arange(6))
    other = _unknown_type(model)
    known = model.label_clids[0]
    sub.obs["cell_type_ontology_term_id"] = [known] * 3 + [other, "bogus", "bogus"]
    ScCello.setup_anndata(sub)
    with pytest.raises(OntologyError, match="bogus") as err:
        model.get_pretraining_losses(sub)
    assert other in str(err.value)
    with pytest.raises(OntologyError, match="not in the cell ontology"):
        ScCello(sub, ontology=str(model.ontology_path))


# ---------------------------------------------------------------------- novel cell types
def test_novel_cell_types_match_reference(loaded, expected):
    adata, model = loaded
    names = list(expected["novel_target_names"])
    key = "novel"
    probs = scfm.tl.classify_novel_cell_types(
        model, adata, names, reference_key="cell_type", key_added=key
    )
    info = adata.uns[key]
    np.testing.assert_allclose(info["celltype_repr"], expected["celltype_repr"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(info["voting_sim"], expected["novel_voting_sim"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(
        adata.obsm[f"{key}_sim"].to_numpy(), expected["novel_sim_x"], atol=ATOL, rtol=0
    )
    np.testing.assert_allclose(
        adata.obsm[f"{key}_logits"].to_numpy(), expected["novel_logits"], atol=ATOL, rtol=0
    )
    np.testing.assert_allclose(probs.to_numpy(), expected["novel_probs"], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(adata.obs[key].cat.codes.to_numpy(), expected["novel_pred"])
    assert set(adata.obs[f"{key}_id"]) <= set(info["candidate_ids"])
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
    with pytest.raises(scfm.errors.AnnDataKeyError):
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


def test_ensembl_ids_column_is_used_like_the_reference(root, expected):
    adata = ad.read_h5ad(root / "input.h5ad")
    adata.var["ensembl_ids"] = adata.var_names.to_numpy()
    adata.var_names = [f"gene{i}" for i in range(adata.n_vars)]
    ScCello.setup_anndata(adata)
    model = ScCello.from_pretrained(root / "checkpoint", adata)
    assert model.setup_args["gene_id_key"] == "ensembl_ids"
    ids, _ = model.get_tokens()
    np.testing.assert_array_equal(ids, expected["input_ids"])


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
    with pytest.raises(scfm.errors.InvalidInputError, match="label_mapping"):
        scfm.tl.classify_novel_cell_types(model, adata, names, label_mapping="both")


def test_novel_cell_type_plot(loaded, expected):
    import matplotlib

    matplotlib.use("Agg")
    adata, model = loaded
    names = list(expected["novel_target_names"])
    scfm.tl.classify_novel_cell_types(model, adata, names, reference_key="cell_type", key_added="p")
    ax = scfm.pl.novel_cell_types(adata, "cell_type", key="p")
    shown = ax.images[0].get_array()
    assert shown.shape == (adata.obs["cell_type"].nunique(), len(names))
    np.testing.assert_allclose(shown.sum(1), 1, atol=1e-6)  # rows are mean probabilities
    with pytest.raises(scfm.errors.AnnDataKeyError, match="classify_novel_cell_types"):
        scfm.pl.novel_cell_types(adata, "cell_type", key="missing")
