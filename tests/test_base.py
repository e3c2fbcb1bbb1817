"""The shared model mixin, checked through a tiny model defined here.

The toy model embeds a cell as ``W @ log1p(counts of matched genes)`` and a gene in a cell as
``log1p(count) * W[:, gene]``, so every number the mixin returns can be recomputed with numpy.
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


class _ToyModule(BaseModuleClass):
    def __init__(self, n_vocab: int, n_latent: int, var_to_vocab: np.ndarray):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n_latent, n_vocab))
        self.register_buffer("var_to_vocab", torch.as_tensor(var_to_vocab), persistent=False)

    def _get_inference_input(self, tensors):
        return {"x": tensors[REGISTRY_KEYS.X_KEY]}

    @auto_move_data
    def inference(self, x):
        keep = self.var_to_vocab >= 0
        z = torch.log1p(x[:, keep]) @ self.weight[:, self.var_to_vocab[keep]].T
        return {"z": z}

    def _get_generative_input(self, tensors, inference_outputs):
        return {}

    def generative(self):
        return {}

    def loss(self, tensors, inference_outputs, generative_outputs):
        loss = inference_outputs["z"].pow(2).mean()
        return LossOutput(loss=loss, n_obs_minibatch=inference_outputs["z"].shape[0])


class ToyModel(FoundationModelMixin, UnsupervisedTrainingMixin, BaseModelClass):
    _model_name = "toy"
    _default_batch_size = 7

    def __init__(self, adata, vocab: list[str], n_latent: int = 4):
        super().__init__(adata)
        alignment = scfm.data.align_genes(adata.var, vocab, id_type="symbol", model_name="toy")
        torch.manual_seed(0)
        self.module = _ToyModule(len(vocab), n_latent, alignment.var_to_vocab())
        self._set_gene_alignment(adata, alignment)
        self.init_params_ = self._get_init_params(locals())

    @classmethod
    def _from_pretrained(cls, path, adata, n_latent: int = 4):
        vocab = (path / "vocab.txt").read_text().split()
        model = cls(adata, vocab=vocab, n_latent=n_latent)
        model.module.weight.data = torch.load(path / "weight.pt", weights_only=True)
        return model

    def _latent_minibatch(self, tensors, **kwargs):
        return self.module.inference(tensors[REGISTRY_KEYS.X_KEY])["z"]

    def _gene_embedding_minibatch(self, tensors, **kwargs):
        x = tensors[REGISTRY_KEYS.X_KEY]
        cell, var = torch.nonzero(x, as_tuple=True)
        vocab = self.module.var_to_vocab[var]
        keep = vocab >= 0
        cell, var, vocab = cell[keep], var[keep], vocab[keep]
        emb = torch.log1p(x[cell, var])[:, None] * self.module.weight[:, vocab].T
        return vocab, emb

    def _vocab_names(self):
        return self.init_params_["non_kwargs"]["vocab"]


class ShuffledGroupsToy(ToyModel):
    """Groups cells in a scrambled order, as length-sorting models do."""

    def _minibatch_indices(self, adata, cells, batch_size):
        rng = np.random.default_rng(1)
        perm = rng.permutation(cells)
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
    summary = model._model_summary_string
    assert str(checkpoint) in summary
    n_matched = len(pbmc.var_names[::2])
    assert f"{n_matched} of {pbmc.n_vars} genes matched" in summary
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
    with pytest.raises(CheckpointNotFoundError, match="never downloads"):
        ToyModel.from_pretrained("ctheodoris/Geneformer", pbmc)


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

    _length_window_batches = 2

    def _length_columns(self):
        return self.gene_alignment.var_index


def test_length_grouping_trims_padding_and_keeps_row_order(pbmc, checkpoint, vocab, tmp_path):
    from scfm.data._matrix import count_expressed

    LengthSortedToy.setup_anndata(pbmc)
    model = LengthSortedToy.from_pretrained(checkpoint, pbmc)
    cells = np.arange(pbmc.n_obs)
    groups = model._minibatch_indices(pbmc, cells, 5)
    lengths = count_expressed(pbmc.X, cells, model.gene_alignment.var_index)
    x = pbmc.X.toarray()[:, model.gene_alignment.var_index]
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
        count_expressed(backed.X, cells[::-1], model.gene_alignment.var_index, chunk_size=7),
        lengths[::-1],
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


def test_other_anndata_must_have_the_model_genes(pbmc, checkpoint):
    ToyModel.setup_anndata(pbmc)
    model = ToyModel.from_pretrained(checkpoint, pbmc)
    reordered = pbmc[:, pbmc.var_names[::-1]].copy()
    ToyModel.setup_anndata(reordered)
    with pytest.raises(InvalidInputError, match="var_names differ"):
        model.get_latent_representation(reordered, progress_bar=False)
    fewer = pbmc[:, :50].copy()  # a copy with other genes: not scvi-tools' transfer error
    with pytest.raises(InvalidInputError, match="50 vs 765 genes"):
        model.get_latent_representation(fewer, progress_bar=False)
    same = pbmc[:5].copy()  # inherits pbmc's scvi-tools id
    ToyModel.setup_anndata(same)
    assert same.uns["_scvi_uuid"] != pbmc.uns["_scvi_uuid"]
    np.testing.assert_allclose(
        model.get_latent_representation(same, progress_bar=False),
        model.get_latent_representation(indices=np.arange(5), progress_bar=False),
        atol=1e-6,
    )
    # the original is still registered and usable
    assert model.get_latent_representation(pbmc, progress_bar=False).shape[0] == pbmc.n_obs


def test_query_with_new_or_absent_batch_and_label_columns(pbmc, checkpoint, vocab):
    """Embedding a query never needs the model's batch / label categories."""
    reference = pbmc[:40].copy()
    ToyModel.setup_anndata(reference, batch_key="phase", labels_key="bulk_labels")
    model = ToyModel.from_pretrained(checkpoint, reference)
    expected = _numpy_latent(pbmc[40:], vocab, model.module.weight.detach().numpy())

    unseen = pbmc[40:].copy()  # a copy: inherits the reference's scvi-tools id
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
