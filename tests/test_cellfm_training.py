"""CellFM training: masked value recovery, annotation fine-tuning (LoRA / frozen), tl recipes."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import scfm
from conftest import fixture_dir
from scfm.data import cellfm_mask_tokens
from scfm.errors import InvalidInputError
from scfm.model import CellFM
from scfm.module._cellfm import PLAN_DEPTH, PLAN_SEED

N_HEADS = 4
QUIET = {
    "enable_progress_bar": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fx():
    return fixture_dir("cellfm")


def _adata(fx, **setup):
    adata = ad.read_h5ad(fx / "input.h5ad")
    CellFM.setup_anndata(adata, **setup)
    return adata


def _recovery_loss(model, adata) -> dict[str, float]:
    """Masked value recovery loss of every cell with a fixed per-cell mask (seed 0)."""
    cells = np.arange(adata.n_obs)
    _, space = model._gene_space(adata)
    plan = model._cell_plan(adata, cells, "expression", seed=0)
    module = model.module
    with torch.no_grad():
        out = module.inference(
            torch.as_tensor(space.map(adata.X)),
            torch.as_tensor(plan[PLAN_DEPTH]),
            torch.as_tensor(plan[PLAN_SEED]),
            mask=True,
        )
        loss = module.loss({}, out, module.generative(**module._get_generative_input({}, out)))
    return {k: float(v) for k, v in loss.extra_metrics.items()}


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
    model = CellFM.from_pretrained(fx / "checkpoint", adata, n_heads=N_HEADS, mask_ratio=0.5)
    before = _recovery_loss(model, adata)
    frozen = model.module.encoder[0].attn.q_proj.weight.detach().clone()
    model.train(
        max_epochs=6,
        batch_size=20,
        train_size=0.8,
        check_val_every_n_epoch=1,
        plan_kwargs={"lr": 3e-3},
        **QUIET,
    )
    after = _recovery_loss(model, adata)
    assert not model.module.training
    assert not torch.equal(frozen, model.module.encoder[0].attn.q_proj.weight)
    assert after["loss_gw"] < 0.5 * before["loss_gw"]
    assert after["loss_cw"] < before["loss_cw"]
    history = model.history
    assert len(history["train_loss"]) == 6 and len(history["validation_loss"]) == 6
    assert float(history["loss_gw_validation"].iloc[-1, 0]) > 0  # validation masks too


def test_training_from_scratch_with_read_depth_augmentation(fx):
    adata = _adata(fx)
    config = {"enc_dims": 32, "enc_nlayers": 2, "enc_num_heads": 4, "read_depth_augment": True}
    model = CellFM(adata, config=config)
    assert len(model.vocabulary) == 300 and list(model.vocabulary) == sorted(adata.var_names)
    before = _recovery_loss(model, adata)
    model.train(max_epochs=6, batch_size=20, train_size=1.0, plan_kwargs={"lr": 1e-2}, **QUIET)
    after = _recovery_loss(model, adata)
    assert after["loss_gw"] < before["loss_gw"]
    z = model.get_latent_representation(progress_bar=False)
    assert z.shape == (60, 32) and np.isfinite(z).all()


def test_thinning_keeps_genes_and_lowers_depth(fx):
    adata = _adata(fx)
    model = CellFM(adata, config={"enc_dims": 16, "enc_nlayers": 2, "enc_num_heads": 2})
    _, space = model._gene_space(adata)
    x = torch.as_tensor(space.map(adata.X))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = model.module.inference(x, mask=True, thin=True, generator=g)
    source, target = out.extra["st_feat"].T
    thinned = source < target
    assert 10 < int(thinned.sum()) < 50 and bool((source <= target).all())
    assert torch.equal(out.extra["gene_ids"], model.module.tokenize(x).gene_ids)


def test_annotation_finetuning_with_lora_and_predict(fx, tmp_path):
    adata = _adata(fx)
    model = CellFM.from_pretrained(fx / "checkpoint", adata, n_heads=N_HEADS)
    base = model.module.encoder[1].ffn.o_proj.weight.detach().clone()
    model.finetune(
        "cell_type",
        lora_rank=4,
        max_epochs=12,
        lr=5e-3,
        batch_size=20,
        train_size=0.8,
        early_stopping=False,
        **QUIET,
    )
    module = model.module
    head = module.classifier
    assert head.cluster_emb.shape == (3, 64) and len(head.query_layer) == 2
    # the reference's LoRA targets: every retention and GLU projection of the encoder
    assert len(model.lora_config["targets"]) == 2 * 8
    assert torch.equal(base, module.encoder[1].ffn.o_proj.base_layer.weight)
    assert float(module.encoder[1].ffn.o_proj.lora_B["default"].weight.detach().abs().sum()) > 0
    labels = model.predict(progress_bar=False)
    probs = model.predict(soft=True, progress_bar=False)
    assert probs.shape == (60, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    acc = float((labels == adata.obs["cell_type"].astype(str).to_numpy()).mean())
    chance = adata.obs["cell_type"].value_counts(normalize=True).max()
    assert acc > chance + 0.2
    assert len(model.history["validation_accuracy"]) == 12
    # a cell's prediction does not depend on its batch-mates
    np.testing.assert_allclose(
        model.predict(indices=[7, 3], soft=True, batch_size=1, progress_bar=False).to_numpy(),
        probs.to_numpy()[[7, 3]],
        atol=1e-5,
    )
    # the fine-tuned model (adapters + head) survives save / load
    model.save(tmp_path / "ft", overwrite=True)
    loaded = CellFM.load(tmp_path / "ft", adata=_adata(fx))
    assert loaded.classifier_labels == model.classifier_labels
    saved, restored = model.module.state_dict(), loaded.module.state_dict()
    assert set(saved) == set(restored)
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    # same weights; BLAS may round a 64-term dot product differently by memory alignment
    np.testing.assert_allclose(
        loaded.predict(soft=True, progress_bar=False).to_numpy(), probs.to_numpy(), atol=1e-6
    )


def test_frozen_encoder_trains_only_the_head(fx):
    adata = _adata(fx)
    model = CellFM.from_pretrained(fx / "checkpoint", adata, n_heads=N_HEADS)
    before = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    model.finetune("cell_type", freeze_encoder=True, max_epochs=2, batch_size=30, lr=1e-3, **QUIET)
    after = model.module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not changed  # the encoder and decoders keep their weights
    assert any(k.startswith("classifier.") for k in after)
    z = model.get_latent_representation(progress_bar=False)
    np.testing.assert_allclose(
        z, np.load(fx / "expected.npz")["cell_embeddings"], atol=1e-4, rtol=0
    )


def test_annotation_head_loss_is_the_reference_sum(fx):
    adata = _adata(fx)
    model = CellFM.from_pretrained(fx / "checkpoint", adata, n_heads=N_HEADS)
    model.module.add_classifier(3)
    _, space = model._gene_space(adata)
    x = torch.as_tensor(space.map(adata.X[:4]))
    with torch.no_grad():
        out = model.module.inference(x)
    labels = torch.tensor([0, 1, 2, 0])
    expected = torch.nn.functional.cross_entropy(out.logits, labels)
    expected = expected + torch.nn.functional.cross_entropy(out.extra["cluster_logits"], labels)
    np.testing.assert_allclose(model.module.classification_loss(out, labels), expected)
    # labelpred2 = (query-updated CLS) . cluster_emb^T
    assert out.logits.shape == out.extra["cluster_logits"].shape == (4, 3)


def test_predict_needs_a_head(fx):
    model = CellFM.from_pretrained(fx / "checkpoint", _adata(fx), n_heads=N_HEADS)
    with pytest.raises(InvalidInputError, match="finetune"):
        model.predict(progress_bar=False)


def _gene_labels():
    table = scfm.data.gene_table().drop_duplicates("symbol").set_index("symbol")
    return table["biotype"]


def test_gene_function_learns_labels_encoded_in_embeddings(fx):
    """Binary and multiclass gene labels derived offline from the shipped GENCODE table."""
    adata = _adata(fx)
    model = CellFM.from_pretrained(fx / "checkpoint", adata, n_heads=N_HEADS)
    biotype = _gene_labels().reindex(model.vocabulary).dropna()
    coding = (biotype == "protein_coding").map({True: "coding", False: "non-coding"})
    # Plant the label into the static gene table: the recipe must recover it.
    rng = np.random.default_rng(0)
    with torch.no_grad():
        table = model.module.gene_emb
        names = list(model.vocabulary)
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
    # the seed fixes the split, the initialisation and dropout: same result again
    again = scfm.tl.gene_function(model, coding, epochs=100, hidden=64, key_added=None)
    pd.testing.assert_frame_equal(again.probabilities, result.probabilities)
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
