"""The shared model base, checked through a tiny model defined here.

The toy module embeds a cell as ``W @ log1p(counts)`` over its vocabulary (gene space), a gene
in a cell as ``log1p(count) * W[:, gene]``, and decodes ``2 * log1p(counts)``, so every number
the base returns can be recomputed with numpy.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scvi import REGISTRY_KEYS
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data

import scfm
from conftest import data_file
from scfm.errors import CheckpointNotFoundError, InvalidInputError, NotSetupError
from scfm.model.base import FoundationModelMixin
from scfm.module._outputs import ModuleOutput


class _ToyModule(BaseModuleClass):
    def __init__(self, n_vocab: int, n_latent: int):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(n_latent, n_vocab, generator=generator))
        self.classifier = None

    def add_classifier(self, n_labels: int) -> None:
        self.classifier = torch.nn.Linear(self.weight.shape[0], n_labels)

    def _get_inference_input(self, tensors):
        return {"x": tensors[REGISTRY_KEYS.X_KEY]}

    @auto_move_data
    def inference(self, x, mask: bool = False):
        h = torch.log1p(x)
        if mask:
            h = torch.nn.functional.dropout(h, 0.5, training=True)
        z = h @ self.weight.T
        genes = torch.arange(x.shape[1], device=x.device).expand_as(x)
        return ModuleOutput(
            cell_embedding=z,
            token_states=h[..., None] * self.weight.T[None],
            token_genes=torch.where(x > 0, genes, -1),
            logits=None if self.classifier is None else self.classifier(z),
            expression=2 * torch.log1p(x),
        )

    def _get_generative_input(self, tensors, inference_outputs):
        return {}

    def generative(self):
        return {}

    def loss(self, tensors, inference_outputs, generative_outputs):
        loss = inference_outputs.cell_embedding.pow(2).mean()
        return LossOutput(loss=loss, n_obs_minibatch=inference_outputs.cell_embedding.shape[0])


class ToyModel(FoundationModelMixin, UnsupervisedTrainingMixin, BaseModelClass):
    _model_name = "toy"
    _default_batch_size = 7
    _has_decoder = True

    def __init__(self, adata, vocab: list[str], n_latent: int = 4):
        super().__init__(adata)
        self._vocab = pd.Index(vocab)
        self.module = _ToyModule(len(vocab), n_latent)
        self.init_params_ = self._get_init_params(locals())

    @property
    def vocabulary(self) -> pd.Index:
        return self._vocab

    def _align_genes(self, adata):
        return scfm.data.align_genes(adata.var, list(self._vocab), id_type="symbol")

    @classmethod
    def _from_pretrained(cls, path, adata, n_latent: int = 4):
        vocab = (path / "vocab.txt").read_text().split()
        model = cls(adata, vocab=vocab, n_latent=n_latent)
        model.module.weight.data = torch.load(path / "weight.pt", weights_only=True)
        return model


class ShuffledGroupsToy(ToyModel):
    """Groups cells in a scrambled order, as length-sorting models do."""

    def _minibatch_groups(self, adata, cells, batch_size, plan, space):
        perm = np.random.default_rng(1).permutation(len(cells))
        return [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]


@pytest.fixture
def pbmc():
    adata = ad.read_h5ad(data_file("pbmc68k_reduced_counts.h5ad"))
    return adata[:60].copy()


@pytest.fixture
def vocab(pbmc):
    # every other gene of the data plus genes the data does not have
    return ["<pad>", *pbmc.var_names[::2], "NOTAGENE1", "NOTAGENE2"]


@pytest.fixture
def checkpoint(tmp_path, vocab):
    path = tmp_path / "toy_ckpt"
    path.mkdir()
    (path / "vocab.txt").write_text("\n".join(vocab))
    torch.manual_seed(3)
    torch.save(torch.randn(4, len(vocab)), path / "weight.pt")
    return path


def _numpy_latent(adata, vocab, weight):
    x = np.asarray(adata.X.todense()) if sp.issparse(adata.X) else adata.X
    pos = {g: i for i, g in enumerate(vocab)}
    cols = [i for i, g in enumerate(adata.var_names) if g in pos]
    w = weight[:, [pos[adata.var_names[i]] for i in cols]]
    return np.log1p(x[:, cols]) @ w.T


def test_latent_matches_numpy_in_adata_order(pbmc, checkpoint, vocab):
    ShuffledGroupsToy.setup_anndata(pbmc)
    model = ShuffledGroupsToy.from_pretrained(checkpoint, pbmc)
    expected = _numpy_latent(pbmc, vocab, model.module.weight.detach().numpy())
    z = model.get_latent_representation(progress_bar=False)
    np.testing.assert_allclose(z, expected, atol=1e-5, rtol=0)
    # any batch size, any subset order, duplicates: rows follow `indices`
    idx = np.array([5, 3, 59, 3, 0])
    z_sub = model.get_latent_representation(indices=idx, batch_size=2, progress_bar=False)
    np.testing.assert_allclose(z_sub, expected[idx], atol=1e-5, rtol=0)
    mask = np.zeros(pbmc.n_obs, dtype=bool)
    mask[[1, 4]] = True
    np.testing.assert_allclose(
        model.get_latent_representation(indices=mask, progress_bar=False),
        expected[[1, 4]],
        atol=1e-5,
    )


def test_bad_indices_and_batch_size(pbmc, checkpoint):
    ToyModel.setup_anndata(pbmc)
    model = ToyModel.from_pretrained(checkpoint, pbmc)
    with pytest.raises(InvalidInputError, match="indices"):
        model.get_latent_representation(indices=[0, pbmc.n_obs], progress_bar=False)
    with pytest.raises(InvalidInputError, match="batch_size"):
        model.get_latent_representation(batch_size=0, progress_bar=False)


def test_gene_embeddings_are_means_over_cells(pbmc, checkpoint, vocab):
    ToyModel.setup_anndata(pbmc)
    model = ToyModel.from_pretrained(checkpoint, pbmc)
    genes = model.get_gene_embeddings(progress_bar=False)
    weight = model.module.weight.detach().numpy()
    x = np.asarray(pbmc.X.todense())
    g = vocab[1]  # first data gene in the vocabulary
    col = list(pbmc.var_names).index(g)
    expressed = x[:, col] > 0
    expected = np.log1p(x[expressed, col]).mean() * weight[:, vocab.index(g)]
    assert list(genes.index) == sorted(genes.index)
    assert "NOTAGENE1" not in genes.index
    np.testing.assert_allclose(genes.loc[g].to_numpy(), expected, atol=1e-5, rtol=0)


def test_key_added_writers_touch_only_documented_keys(pbmc, checkpoint):
    keys_before = {attr: set(getattr(pbmc, attr).keys()) for attr in ("obs", "uns", "obsm", "varm")}
    ToyModel.setup_anndata(pbmc)
    model = ToyModel.from_pretrained(checkpoint, pbmc)
    before_obs = pbmc.obs.copy()
    before_x = pbmc.X.copy()
    model.embed(key_added="X_mine", progress_bar=False)
    genes = model.embed_genes(progress_bar=False)
    assert pbmc.obsm["X_mine"].shape == (pbmc.n_obs, 4)
    assert pbmc.uns["scfm"]["obsm"]["X_mine"]["model"] == "ToyModel"
    varm = pbmc.varm["X_toy"]
    assert varm.shape == (pbmc.n_vars, 4)
    # genes outside the vocabulary get NaN rows; known ones equal the DataFrame rows
    assert np.isnan(varm[1]).all()
    np.testing.assert_allclose(varm[0], genes.loc[pbmc.var_names[0]].to_numpy(), atol=1e-6)
    pd.testing.assert_frame_equal(pbmc.obs, before_obs)
    assert (pbmc.X != before_x).nnz == 0
    # exactly the documented keys were added (scvi-tools registration + scfm results)
    added = {attr: set(getattr(pbmc, attr).keys()) - keys_before[attr] for attr in keys_before}
    assert added == {
        "obs": {"_scvi_batch", "_scvi_labels"},
        "uns": {"_scvi_uuid", "_scvi_manager_uuid", "scfm"},
        "obsm": {"X_mine"},
        "varm": {"X_toy"},
    }
    assert set(pbmc.uns["scfm"]) == {"gene_alignment", "obsm", "varm"}
    # the result is writable as h5ad
    pbmc.write_h5ad(checkpoint / "out.h5ad")


def test_repr_reports_checkpoint_and_gene_match(pbmc, checkpoint, vocab):
    ToyModel.setup_anndata(pbmc)
    model = ToyModel.from_pretrained(checkpoint, pbmc)
    assert str(checkpoint) in model._model_summary_string
    n_matched = len(pbmc.var_names[::2])
    assert f"{n_matched} of {pbmc.n_vars} genes matched" in str(model.gene_alignment)
    report = pbmc.uns["scfm"]["gene_alignment"]["toy"]
    assert report["n_matched"] == n_matched
    assert report["n_vars"] == pbmc.n_vars


def test_save_load_round_trip(pbmc, checkpoint, tmp_path):
    ToyModel.setup_anndata(pbmc)
    model = ToyModel.from_pretrained(checkpoint, pbmc)
    z = model.get_latent_representation(progress_bar=False)
    model.save(tmp_path / "saved", overwrite=True)
    loaded = ToyModel.load(tmp_path / "saved", adata=pbmc)
    np.testing.assert_array_equal(loaded.get_latent_representation(progress_bar=False), z)


def test_from_pretrained_errors(pbmc, checkpoint, tmp_path):
    with pytest.raises(NotSetupError, match="setup_anndata"):
        ToyModel.from_pretrained(checkpoint, pbmc)
    ToyModel.setup_anndata(pbmc)
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        ToyModel.from_pretrained(tmp_path / "missing", pbmc)
    with pytest.raises(CheckpointNotFoundError):
        ToyModel.from_pretrained("ctheodoris/Geneformer", pbmc)
    assert "scfm" not in pbmc.uns  # a failed load leaves nothing behind


def test_backed_anndata_is_embedded_in_chunks(pbmc, checkpoint, vocab, tmp_path):
    pbmc.write_h5ad(tmp_path / "pbmc.h5ad")
    backed = ad.read_h5ad(tmp_path / "pbmc.h5ad", backed="r")
    ShuffledGroupsToy.setup_anndata(backed)
    model = ShuffledGroupsToy.from_pretrained(checkpoint, backed)
    expected = _numpy_latent(pbmc, vocab, model.module.weight.detach().numpy())
    z = model.get_latent_representation(batch_size=8, progress_bar=False)
    np.testing.assert_allclose(z, expected, atol=1e-5, rtol=0)


def test_mudata_rna_modality(pbmc, checkpoint, vocab):
    import mudata as md

    adt = ad.AnnData(
        np.ones((pbmc.n_obs, 3), dtype=np.float32), obs=pd.DataFrame(index=pbmc.obs_names)
    )
    mdata = md.MuData({"rna": pbmc, "adt": adt})
    with pytest.raises(scfm.errors.AnnDataKeyError, match="modalities"):
        ToyModel.setup_mudata(mdata, rna_modality="gex")
    with pytest.raises(NotSetupError, match="setup_mudata"):
        ToyModel.from_pretrained(checkpoint, mdata)
    ToyModel.setup_mudata(mdata, rna_modality="rna", batch_key="phase")
    model = ToyModel.from_pretrained(checkpoint, mdata)
    model.embed(mdata, progress_bar=False)
    expected = _numpy_latent(pbmc, vocab, model.module.weight.detach().numpy())
    np.testing.assert_allclose(mdata.mod["rna"].obsm["X_toy"], expected, atol=1e-5, rtol=0)
    assert "X_toy" not in mdata.mod["adt"].obsm
    np.testing.assert_allclose(
        model.get_latent_representation(mdata, progress_bar=False), expected, atol=1e-5
    )


class LengthSortedToy(ToyModel):
    """Groups cells by their number of expressed vocabulary genes."""

    _sort_by_length = True
    _length_window_batches = 2


def test_length_grouping_trims_padding_and_keeps_row_order(pbmc, checkpoint, vocab, tmp_path):
    from scfm.data._matrix import count_expressed

    LengthSortedToy.setup_anndata(pbmc)
    model = LengthSortedToy.from_pretrained(checkpoint, pbmc)
    cells = np.arange(pbmc.n_obs)
    _, space = model._gene_space(pbmc)
    groups = model._minibatch_groups(pbmc, cells, 5, {}, space)
    var_index = model.gene_alignment.var_index
    lengths = count_expressed(pbmc.X, cells, var_index)
    x = pbmc.X.toarray()[:, var_index]
    np.testing.assert_array_equal(lengths, (x > 0).sum(1))
    # every cell once; within each window of 2 batches, lengths never increase
    assert sorted(np.concatenate(groups)) == list(cells)
    for w in range(0, len(groups), 2):
        window = np.concatenate(groups[w : w + 2])
        assert np.all(np.diff(lengths[window]) <= 0)
    expected = _numpy_latent(pbmc, vocab, model.module.weight.detach().numpy())
    np.testing.assert_allclose(
        model.get_latent_representation(batch_size=5, progress_bar=False), expected, atol=1e-5
    )
    # backed: same counts, read in chunks
    pbmc.write_h5ad(tmp_path / "b.h5ad")
    backed = ad.read_h5ad(tmp_path / "b.h5ad", backed="r")
    np.testing.assert_array_equal(
        count_expressed(backed.X, cells[::-1], var_index, chunk_size=7), lengths[::-1]
    )


def test_inference_precision_autocast(pbmc, checkpoint):
    ToyModel.setup_anndata(pbmc)
    model = ToyModel.from_pretrained(checkpoint, pbmc)
    z32 = model.get_latent_representation(progress_bar=False)
    with model.inference_precision("bf16"):
        z16 = model.get_latent_representation(progress_bar=False)
    assert not np.array_equal(z16, z32)  # bf16 matmuls really ran
    np.testing.assert_allclose(z16, z32, rtol=0.05, atol=0.05 * np.abs(z32).max())
    np.testing.assert_array_equal(model.get_latent_representation(progress_bar=False), z32)
    with pytest.raises(InvalidInputError, match="precision"):
        with model.inference_precision("fp8"):
            pass


def test_training_precision_passes_through_to_lightning(pbmc, checkpoint):
    ToyModel.setup_anndata(pbmc)
    model = ToyModel.from_pretrained(checkpoint, pbmc)
    model.train(max_epochs=1, precision="bf16-mixed", accelerator="cpu", enable_progress_bar=False)
    assert model.trainer.precision == "bf16-mixed"
    assert np.isfinite(model.history["train_loss"].iloc[:, 0].to_numpy(dtype=float)).all()


def test_any_anndata_is_aligned_to_the_vocabulary(pbmc, checkpoint, vocab):
    """A query with missing, extra and reordered genes embeds like the original restricted."""
    ToyModel.setup_anndata(pbmc)
    model = ToyModel.from_pretrained(checkpoint, pbmc)
    rng = np.random.default_rng(0)
    kept = pbmc.var_names[rng.permutation(pbmc.n_vars)[:500]]  # some genes missing, shuffled
    extra = ad.AnnData(
        sp.csr_matrix(rng.poisson(1.0, (pbmc.n_obs, 20)).astype(np.float32)),
        obs=pd.DataFrame(index=pbmc.obs_names),
        var=pd.DataFrame(index=[f"EXTRA{i}" for i in range(20)]),
    )
    query = ad.concat([pbmc[:, kept], extra], axis=1)
    query.obs = pbmc.obs[["bulk_labels"]].copy()
    restricted = pbmc[:, pbmc.var_names.isin(kept)].copy()
    ToyModel.setup_anndata(query)
    ToyModel.setup_anndata(restricted)
    z_query = model.get_latent_representation(query, progress_bar=False)
    z_restricted = model.get_latent_representation(restricted, progress_bar=False)
    np.testing.assert_allclose(z_query, z_restricted, atol=1e-5, rtol=0)
    expected = _numpy_latent(restricted, vocab, model.module.weight.detach().numpy())
    np.testing.assert_allclose(z_query, expected, atol=1e-5, rtol=0)
    assert not np.allclose(z_query, model.get_latent_representation(progress_bar=False))
    # a query that was never set up gets the model's setup; one with a copied id its own
    fresh = pbmc[:, kept].copy()
    del fresh.uns["_scvi_uuid"], fresh.uns["_scvi_manager_uuid"]
    np.testing.assert_allclose(
        model.get_latent_representation(fresh, progress_bar=False), z_restricted, atol=1e-5
    )
    same = pbmc[:5].copy()  # inherits pbmc's scvi-tools id
    np.testing.assert_allclose(
        model.get_latent_representation(same, progress_bar=False),
        model.get_latent_representation(indices=np.arange(5), progress_bar=False),
        atol=1e-6,
    )
    assert same.uns["_scvi_uuid"] != pbmc.uns["_scvi_uuid"]
    # the original is still registered and usable
    assert model.get_latent_representation(pbmc, progress_bar=False).shape[0] == pbmc.n_obs


def test_views_are_refused_with_the_fix(pbmc, checkpoint):
    ToyModel.setup_anndata(pbmc)
    model = ToyModel.from_pretrained(checkpoint, pbmc)
    with pytest.raises(InvalidInputError, match="copy"):
        model.get_latent_representation(pbmc[:5], progress_bar=False)
    with pytest.raises(InvalidInputError, match="copy"):
        ToyModel.setup_anndata(pbmc[:5])


def test_query_with_new_or_absent_batch_and_label_columns(pbmc, checkpoint, vocab):
    """Embedding a query never needs the model's batch / label categories."""
    reference = pbmc[:40].copy()
    ToyModel.setup_anndata(reference, batch_key="phase", labels_key="bulk_labels")
    model = ToyModel.from_pretrained(checkpoint, reference)
    expected = _numpy_latent(pbmc[40:], vocab, model.module.weight.detach().numpy())

    unseen = pbmc[40:].copy()  # never set up: gets the model's setup
    unseen.obs["phase"] = pd.Categorical(["new sample"] * unseen.n_obs)
    unseen.obs["bulk_labels"] = pd.Categorical(["a cell type the model never saw"] * 20)
    before = unseen.obs.copy()
    z = model.get_latent_representation(unseen, progress_bar=False)
    np.testing.assert_allclose(z, expected, atol=1e-5)
    pd.testing.assert_frame_equal(unseen.obs[before.columns], before)  # user columns intact

    absent = pbmc[40:].copy()
    del absent.obs["phase"], absent.obs["bulk_labels"]
    ToyModel.setup_anndata(absent)  # set up without batch / labels, as a user would
    np.testing.assert_allclose(
        model.get_latent_representation(absent, progress_bar=False), expected, atol=1e-5
    )
    # the model's own AnnData keeps its registration (codes of its categories)
    codes = model.adata_manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY).ravel()
    assert codes.max() < reference.obs["bulk_labels"].nunique()


# ---------------------------------------------------------------------- the shared contract
def test_finetune_and_predict_through_lightning(pbmc, checkpoint, tmp_path):
    pbmc = ad.read_h5ad(data_file("pbmc68k_reduced_counts.h5ad"))[:150].copy()
    ToyModel.setup_anndata(pbmc)
    model = ToyModel.from_pretrained(checkpoint, pbmc)
    with pytest.raises(InvalidInputError, match="finetune"):
        model.predict(progress_bar=False)
    z_before = model.get_latent_representation(progress_bar=False)
    model.finetune(
        "bulk_labels", max_epochs=4, lr=1e-2, accelerator="cpu", enable_progress_bar=False
    )
    classes = sorted(pbmc.obs["bulk_labels"].astype(str).unique())
    assert model.classifier_labels == [c for c in pbmc.obs["bulk_labels"].cat.categories]
    assert set(model.classifier_labels) == set(classes)
    history = model.history
    assert {"train_loss", "validation_loss", "validation_accuracy"} <= set(history)
    assert len(history["train_loss"]) >= 1
    # the encoder trained too (freeze_encoder=False)
    assert not np.allclose(model.get_latent_representation(progress_bar=False), z_before)
    # predict == argmax of softmax(head(embedding)), recomputed by hand
    z = model.get_latent_representation(progress_bar=False)
    head = model.module.classifier
    logits = z @ head.weight.detach().numpy().T + head.bias.detach().numpy()
    expected = np.asarray(model.classifier_labels)[logits.argmax(1)]
    labels = model.predict(progress_bar=False)
    np.testing.assert_array_equal(labels, expected)
    probs = model.predict(indices=[7, 2], soft=True, progress_bar=False)
    assert list(probs.index) == list(pbmc.obs_names[[7, 2]])
    np.testing.assert_allclose(probs.to_numpy().sum(1), 1.0, atol=1e-6)
    assert "pred" not in pbmc.obs
    model.predict(key_added="pred", progress_bar=False)
    np.testing.assert_array_equal(pbmc.obs["pred"].astype(str).to_numpy(), expected)
    # the head survives a safe save / load round trip exactly
    model.save(tmp_path / "ft")
    loaded = ToyModel.load(tmp_path / "ft", pbmc)
    assert loaded.classifier_labels == model.classifier_labels
    pd.testing.assert_frame_equal(
        loaded.predict(soft=True, progress_bar=False), model.predict(soft=True, progress_bar=False)
    )
    assert set(loaded.history) == set(model.history)


def test_finetune_frozen_encoder_trains_only_the_head(pbmc, checkpoint):
    ToyModel.setup_anndata(pbmc)
    model = ToyModel.from_pretrained(checkpoint, pbmc)
    weight = model.module.weight.detach().clone()
    model.finetune(
        "bulk_labels",
        max_epochs=2,
        freeze_encoder=True,
        accelerator="cpu",
        enable_progress_bar=False,
    )
    torch.testing.assert_close(model.module.weight.detach(), weight, rtol=0, atol=0)
    with pytest.raises(InvalidInputError, match="LoRA"):
        model.finetune("bulk_labels", max_epochs=1, lora_rank=2, accelerator="cpu")
    with pytest.raises(scfm.errors.AnnDataKeyError, match="labels_key"):
        model.finetune("nope")


def test_get_normalized_expression_any_genes(pbmc, checkpoint, vocab):
    ToyModel.setup_anndata(pbmc)
    model = ToyModel.from_pretrained(checkpoint, pbmc)
    x = np.asarray(pbmc.X.todense())
    frame = model.get_normalized_expression(progress_bar=False)
    known = [g for g in pbmc.var_names if g in vocab]
    assert list(frame.columns) == known
    cols = pbmc.var_names.get_indexer(known)
    np.testing.assert_allclose(frame.to_numpy(), 2 * np.log1p(x[:, cols]), atol=1e-6)
    # vocabulary genes the AnnData lacks are decoded (the toy decodes them as 0)
    sub = model.get_normalized_expression(
        indices=[3, 0], gene_list=[known[1], "NOTAGENE1"], progress_bar=False
    )
    assert list(sub.index) == list(pbmc.obs_names[[3, 0]])
    np.testing.assert_allclose(sub[known[1]], 2 * np.log1p(x[[3, 0], cols[1]]), atol=1e-6)
    with pytest.raises(scfm.errors.GeneVocabularyError, match="not decoded"):
        model.get_normalized_expression(gene_list=["NOT_A_GENE_AT_ALL"], progress_bar=False)
    frame2 = scfm.tl.impute(model, pbmc, gene_list=known[:3], progress_bar=False)
    np.testing.assert_allclose(pbmc.layers["toy_imputed"][:, cols[:3]], frame2.to_numpy())


def test_save_never_unpickles(pbmc, checkpoint, tmp_path):
    """A saved model is safetensors + JSON; a pickle payload planted in it never runs."""
    import json
    import pickle

    ToyModel.setup_anndata(pbmc)
    model = ToyModel.from_pretrained(checkpoint, pbmc)
    model.save(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [
        "model.safetensors",
        "scfm_model.json",
    ]
    with pytest.raises(InvalidInputError, match="overwrite"):
        model.save(tmp_path / "saved")
    model.save(tmp_path / "saved", overwrite=True)
    # another AnnData (other genes) loads the same weights
    query = pbmc[:, pbmc.var_names[::3]].copy()
    loaded = ToyModel.load(tmp_path / "saved", query)
    torch.testing.assert_close(loaded.module.weight, model.module.weight, rtol=0, atol=0)

    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    # a scvi-tools-format folder whose model.pt carries a code-executing object
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save({"attr_dict": {"x": Payload()}, "model_state_dict": {}}, legacy / "model.pt")
    with pytest.raises(scfm.errors.UnsafeCheckpointError, match="trust_checkpoint"):
        ToyModel.load(legacy, pbmc)
    assert not marker.exists()
    # a JSON that names a class outside scfm is refused, not imported
    attrs = json.loads((tmp_path / "saved" / "scfm_model.json").read_text())
    attrs["init_params"]["non_kwargs"]["vocab"] = {"__dataclass__": "os:system", "fields": {}}
    (tmp_path / "saved" / "scfm_model.json").write_text(json.dumps(attrs))
    with pytest.raises(scfm.errors.UnsafeCheckpointError, match="outside scfm"):
        ToyModel.load(tmp_path / "saved", pbmc)
    # the weights file is never a pickle: planting one is a format error, never executed
    (tmp_path / "saved" / "model.safetensors").write_bytes(pickle.dumps(Payload()))
    attrs["init_params"]["non_kwargs"]["vocab"] = list(model.vocabulary)
    (tmp_path / "saved" / "scfm_model.json").write_text(json.dumps(attrs))
    with pytest.raises(scfm.errors.CheckpointFormatError):
        ToyModel.load(tmp_path / "saved", pbmc)
    assert not marker.exists()


def test_every_minibatch_is_checked_and_nothing_is_written(pbmc, checkpoint):
    ToyModel.setup_anndata(pbmc)
    model = ToyModel.from_pretrained(checkpoint, pbmc)
    uns_before = {k: v for k, v in pbmc.uns.items()}
    # the model's own AnnData normalised in place after loading (the usual notebook order)
    import scanpy as sc

    sc.pp.normalize_total(pbmc)
    sc.pp.log1p(pbmc)
    with pytest.raises(scfm.errors.CountDataError, match="non-integer"):
        model.embed(progress_bar=False)
    assert "X_toy" not in pbmc.obsm
    assert set(pbmc.uns) == set(uns_before) | {"log1p"}
    pbmc.X = pbmc.X.copy()
    pbmc.X.data[5] = np.nan  # one NaN in a late minibatch
    with pytest.raises(scfm.errors.CountDataError, match="NaN"):
        model.get_latent_representation(batch_size=7, progress_bar=False)


def test_non_finite_outputs_raise_before_writing(pbmc, checkpoint):
    ToyModel.setup_anndata(pbmc)
    model = ToyModel.from_pretrained(checkpoint, pbmc)
    with torch.no_grad():
        model.module.weight[0, 1] = float("nan")
    with pytest.raises(scfm.errors.NonFiniteOutputError, match="nothing was written"):
        model.embed(progress_bar=False)
    assert "X_toy" not in pbmc.obsm
    assert "obsm" not in pbmc.uns["scfm"]


def test_key_added_is_validated_before_work(pbmc, checkpoint):
    ToyModel.setup_anndata(pbmc)
    model = ToyModel.from_pretrained(checkpoint, pbmc)
    for bad in ["a/b", "", 3]:
        with pytest.raises(InvalidInputError, match="key_added"):
            model.embed(key_added=bad, progress_bar=False)
        with pytest.raises(InvalidInputError, match="key_added"):
            model.embed_genes(key_added=bad, progress_bar=False)
    assert set(pbmc.obsm) == {"X_umap"} and not pbmc.varm
    pbmc.uns["scfm"] = "not a dict"
    with pytest.raises(InvalidInputError, match="not a dict"):
        model.embed(progress_bar=False)
    assert pbmc.uns["scfm"] == "not a dict"


def test_too_small_gene_overlap_is_refused(pbmc, checkpoint, tmp_path):
    mouse = pbmc.copy()
    mouse.var_names = [g.capitalize() for g in pbmc.var_names]  # mouse-style symbols
    ToyModel.setup_anndata(mouse)
    with pytest.raises(scfm.errors.GeneVocabularyError, match="species"):
        ToyModel.from_pretrained(checkpoint, mouse)
    assert "scfm" not in mouse.uns
    tiny = pbmc[:, pbmc.var_names[:6:2]].copy()  # 3 real genes
    ToyModel.setup_anndata(tiny)
    with pytest.raises(scfm.errors.GeneVocabularyError, match="check_gene_overlap=False"):
        ToyModel.from_pretrained(checkpoint, tiny)
    ToyModel.setup_anndata(tiny, check_gene_overlap=False)
    model = ToyModel.from_pretrained(checkpoint, tiny)
    assert model.get_latent_representation(progress_bar=False).shape == (tiny.n_obs, 4)


def test_non_integer_counts_opt_in(pbmc, checkpoint):
    soup = pbmc.copy()
    soup.X = soup.X.astype(np.float32) * 0.5  # SoupX-like corrected counts
    with pytest.raises(scfm.errors.CountDataError, match="allow_non_integer"):
        ToyModel.setup_anndata(soup)
    with pytest.warns(UserWarning, match="non-integer"):
        ToyModel.setup_anndata(soup, allow_non_integer=True)
    model = ToyModel.from_pretrained(checkpoint, soup)
    assert np.isfinite(model.get_latent_representation(progress_bar=False)).all()


def test_compact_minibatches_and_table_plans():
    """Opt-in compact minibatches hold exactly the dense minibatch's non-zero columns (genes
    renamed, duplicates summed, unknown genes dropped, any row order); a TableRows plan rides
    as its small table plus each cell's row, and indexes lazily."""
    from scfm.data._loader import (
        GENE_COLUMNS_KEY,
        TABLE_ROW_SUFFIX,
        CellDataset,
        GeneSpace,
        TableRows,
    )

    rng = np.random.default_rng(0)
    x = sp.csr_matrix(rng.poisson(0.4, (30, 12)).astype(np.float32))
    x.data[0] = 0.0  # a stored zero
    adata = ad.AnnData(x, var=pd.DataFrame(index=[f"g{i}" for i in range(12)]))
    ToyModel.setup_anndata(adata)
    manager = ToyModel._get_most_recent_anndata_manager(adata, required=True)
    one_to_one = GeneSpace.from_pairs(np.arange(10), rng.permutation(20)[:10], 12, 20)
    summed = GeneSpace.from_pairs([0, 1, 2, 3], [4, 4, 7, 1], 12, 8)  # columns 0, 1 -> gene 4
    plan = {
        "rank": TableRows(np.arange(40).reshape(2, 20), rng.integers(0, 2, 30)),
        "id": np.arange(30) * 10,
    }
    for space in (one_to_one, summed):
        assert (space._relabel is None) == (space is summed)
        cells = np.arange(30)
        dense = CellDataset(manager, cells, space, plan)
        compact = CellDataset(manager, cells, space, plan, compact=True)
        for positions in (np.arange(30), np.array([7, 2, 29, 2])):
            d, c = dense[positions], compact[positions]
            full = d[REGISTRY_KEYS.X_KEY].numpy()
            columns = c[GENE_COLUMNS_KEY].numpy()
            np.testing.assert_array_equal(c[REGISTRY_KEYS.X_KEY].numpy(), full[:, columns])
            assert len(set(columns)) == len(columns)
            others = np.setdiff1d(np.arange(space.n_genes), columns)
            np.testing.assert_array_equal(full[:, others], 0)  # nothing expressed is left out
            np.testing.assert_array_equal(d["id"].numpy(), positions * 10)
            for batch in (d, c):  # the table once, each cell's row number
                np.testing.assert_array_equal(batch["rank"].numpy(), plan["rank"].table)
                rows = batch["rank" + TABLE_ROW_SUFFIX].numpy()
                np.testing.assert_array_equal(rows, plan["rank"].index[positions])
    # lazy indexing (training reorders plans) and the array it stands for
    rows = plan["rank"][np.array([4, 0])]
    assert isinstance(rows, TableRows) and rows.shape == (2, 20)
    np.testing.assert_array_equal(np.asarray(rows), plan["rank"].table[plan["rank"].index[[4, 0]]])
    with pytest.raises(ValueError, match="rank"):
        CellDataset(manager, np.arange(5), one_to_one, plan)
