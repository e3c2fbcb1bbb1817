"""CellFM training: masked value recovery, LoRA annotation fine-tuning, gene function."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import scfm
from conftest import fixture_dir
from scfm.data import cellfm_mask_tokens
from scfm.errors import InvalidInputError, NotSetupError
from scfm.model import CellFM

N_HEADS = 4
QUIET = {
    "enable_progress_bar": False,
    "logger": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "train_size": 1.0,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fx():
    return fixture_dir("cellfm")


def _adata(fx, **setup):
    adata = ad.read_h5ad(fx / "input.h5ad")
    CellFM.setup_anndata(adata, **setup)
    return adata


def test_random_mask_semantics():
    n = torch.tensor([10, 7, 0, 1])
    unmask, scored = cellfm_mask_tokens(n, 12, 0.5, generator=torch.Generator().manual_seed(0))
    assert scored.sum(1).tolist() == [5, 3, 0, 0]
    # int(0.8 l) of the scored positions are masked, the rest keep their value
    assert ((1 - unmask) * (torch.arange(12) < n[:, None])).sum(1).tolist() == [4, 2, 0, 0]
    assert bool(((1 - unmask) <= scored + (torch.arange(12) >= n[:, None])).all())
    assert float(unmask[:, 10:].sum()) == 0  # padding is never visible


def test_masked_value_recovery_training_reduces_loss(fx):
    adata = _adata(fx)
    torch.manual_seed(0)
    model = CellFM.from_pretrained(fx / "checkpoint", adata, n_heads=N_HEADS, mask_ratio=0.5)
    before = model.reconstruct(mask_seed=0)
    frozen = model.module.encoder[0].attn.q_proj.weight.detach().clone()
    model.train(max_epochs=6, batch_size=20, plan_kwargs={"lr": 3e-3}, **QUIET)
    after = model.reconstruct(mask_seed=0)
    assert not model.module.training
    assert not torch.equal(frozen, model.module.encoder[0].attn.q_proj.weight)
    assert after["loss_gw"] < 0.5 * before["loss_gw"]
    assert after["loss_cw"] < before["loss_cw"]


def test_training_from_scratch_with_read_depth_augmentation(fx):
    adata = _adata(fx)
    torch.manual_seed(0)
    model = CellFM(adata, enc_dims=32, enc_nlayers=2, enc_num_heads=4, read_depth_augment=True)
    assert len(model._vocab_names()) == 300  # vocabulary from the AnnData
    before = model.reconstruct(mask_seed=0)
    model.train(max_epochs=6, batch_size=20, plan_kwargs={"lr": 1e-2}, **QUIET)
    after = model.reconstruct(mask_seed=0)
    assert after["loss_gw"] < before["loss_gw"]
    z = model.get_latent_representation(progress_bar=False)
    assert z.shape == (60, 32) and np.isfinite(z).all()


def test_lora_annotation_finetuning_and_predict(fx, tmp_path):
    adata = _adata(fx, labels_key="cell_type")
    torch.manual_seed(0)
    model = CellFM.from_pretrained(fx / "checkpoint", adata, n_heads=N_HEADS)
    base = model.module.encoder[1].ffn.o_proj.weight.detach().clone()
    n_trainable = model.finetune_annotation(
        lora_rank=4, max_epochs=8, lr=5e-3, batch_size=20, **QUIET
    )
    d, layers, classes = 64, 2, 3
    lora = layers * 8 * (d * 4 + 4 * d)  # q,k,v,u,o + GLU u,v,o adapters
    head = d * 128 + 128 + 128 * classes + classes
    assert n_trainable == lora + head
    # base weights are frozen, adapters moved away from their zero start
    assert torch.equal(base, model.module.encoder[1].ffn.o_proj.weight)
    assert float(model.module.encoder[1].ffn.lora_o.B.weight.detach().abs().sum()) > 0
    probs = model.predict()
    assert probs.shape == (60, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    acc = float((adata.obs["cellfm_prediction"].astype(str) == adata.obs["cell_type"]).mean())
    chance = adata.obs["cell_type"].value_counts(normalize=True).max()
    assert acc > chance + 0.2
    assert adata.obs["cellfm_prediction_probability"].between(0, 1).all()
    # the fine-tuned model (adapters + head) survives save / load
    model.save(tmp_path / "ft", overwrite=True, save_anndata=False)
    adata2 = _adata(fx, labels_key="cell_type")
    loaded = CellFM.load(tmp_path / "ft", adata=adata2)
    np.testing.assert_allclose(loaded.predict().to_numpy(), probs.to_numpy(), atol=1e-6)
    # merging the adapters keeps the predictions and removes them
    loaded.merge_lora()
    assert not any(".lora_" in k for k in loaded.module.state_dict())
    np.testing.assert_allclose(loaded.predict().to_numpy(), probs.to_numpy(), atol=1e-5)


def test_finetuning_needs_labels(fx):
    adata = _adata(fx)
    model = CellFM.from_pretrained(fx / "checkpoint", adata, n_heads=N_HEADS)
    with pytest.raises(NotSetupError, match="labels_key"):
        model.finetune_annotation(max_epochs=1)
    with pytest.raises(NotSetupError, match="finetune_annotation"):
        model.predict()


def _gene_labels():
    table = scfm.data.gene_table().drop_duplicates("symbol").set_index("symbol")
    return table["biotype"]


def test_gene_function_learns_labels_encoded_in_embeddings(fx):
    """Binary and multiclass gene labels derived offline from the shipped GENCODE table."""
    adata = _adata(fx)
    model = CellFM.from_pretrained(fx / "checkpoint", adata, n_heads=N_HEADS)
    biotype = _gene_labels().reindex(model._vocab_names()).dropna()
    coding = (biotype == "protein_coding").map({True: "coding", False: "non-coding"})
    # Plant the label into the static gene table: the recipe must recover it.
    rng = np.random.default_rng(0)
    with torch.no_grad():
        table = model.module.gene_emb
        names = list(model._vocab_names())
        for gene, label in coding.items():
            row = names.index(gene) + 1
            table[row] = torch.as_tensor(rng.normal(size=64), dtype=table.dtype)
            table[row, :4] += 3.0 if label == "coding" else -3.0
    result = scfm.tl.gene_function(
        model, coding, adata, key_added="coding_pred", epochs=100, hidden=64
    )
    assert result.metrics["accuracy"] > 0.9 and result.metrics["auroc"] > 0.95
    assert result.metrics["accuracy"] > result.metrics["chance"]
    assert set(adata.var["coding_pred"].dropna()) <= {"coding", "non-coding"}
    assert "coding_pred" in adata.uns["scfm"]["gene_function"]
    # shuffled labels carry no signal: held-out balanced accuracy near 0.5
    shuffled = pd.Series(rng.permutation(coding.to_numpy()), index=coding.index)
    noise = scfm.tl.gene_function(model, shuffled, epochs=100, hidden=64, key_added=None)
    assert noise.metrics["balanced_accuracy"] < 0.75
    # multiclass (biotype groups) and multi-label runs
    groups = biotype.where(biotype.isin(["protein_coding", "lncRNA"]), "other")
    multi = scfm.tl.gene_function(model, groups, epochs=60, hidden=64, key_added=None)
    assert multi.probabilities.shape[1] == groups.nunique()
    onehot = pd.get_dummies(groups).astype(float)
    ml = scfm.tl.gene_function(model, onehot, epochs=60, hidden=64, key_added=None)
    assert "micro_f1" in ml.metrics
    with pytest.raises(InvalidInputError, match="labelled genes"):
        scfm.tl.gene_function(model, pd.Series({"NOTAGENE": "a"}), key_added=None)


def test_integration_recipe_scores_embedding(fx):
    adata = _adata(fx)
    model = CellFM.from_pretrained(fx / "checkpoint", adata, n_heads=N_HEADS)
    scores = scfm.tl.cellfm_integration(
        model, batch_key="batch", labels_key="cell_type", baseline=False, n_neighbors=10
    )
    np.testing.assert_allclose(
        adata.obsm["X_cellfm"], model.get_latent_representation(progress_bar=False), atol=1e-6
    )
    row = scores.loc["cellfm"]
    assert {"silhouette_label", "ilisi", "nmi", "total"} <= set(row.index)
    assert row[["silhouette_label", "silhouette_batch", "graph_connectivity"]].between(0, 1).all()
    assert adata.uns["scfm"]["integration"]["X_cellfm"]["finetune_epochs"] == 0
    with pytest.raises(scfm.errors.AnnDataKeyError):
        scfm.tl.cellfm_integration(model, batch_key="nope", labels_key="cell_type")
