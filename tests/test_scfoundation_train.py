"""scFoundation training: the read-depth-aware masked objective and annotation fine-tuning."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

from conftest import data_file, fixture_dir
from scfm.errors import InvalidInputError
from scfm.model import ScFoundation

TINY = {
    "encoder_hidden_dim": 32,
    "encoder_depth": 1,
    "encoder_heads": 4,
    "encoder_dropout": 0.0,
    "decoder_hidden_dim": 16,
    "decoder_depth": 1,
    "decoder_heads": 2,
    "decoder_dim_head": 8,
    "bin_num": 8,
}


def _fixed_loss(model: ScFoundation, adata: ad.AnnData) -> float:
    """Objective on all cells with a fixed draw of downsampling and masks."""
    module = model.module
    module.eval()
    tensors = next(iter(model._make_data_loader(adata, batch_size=adata.n_obs)))
    torch.manual_seed(123)
    with torch.no_grad():
        _, _, out = module(tensors)
    return float(out.loss)


def test_pretraining_objective_masks_and_downsamples():
    torch.manual_seed(0)
    x = torch.tensor(np.random.default_rng(0).poisson(3.0, (64, 50)), dtype=torch.float32)
    adata = ad.AnnData(x.numpy(), var={"sym": [f"G{i}" for i in range(50)]})
    adata.var_names = adata.var["sym"].astype(str)
    ScFoundation.setup_anndata(adata)
    model = ScFoundation(adata, config={**TINY, "seq_len": 52}, gene_list=list(adata.var_names))
    module = model.module
    module.downsample_prob = 1.0
    out = module.inference(x)
    values, keep, dec, masked = out["values"], out["keep"], out["decoder_values"], out["masked"]
    g = 50
    # S is the thinned depth, T the original one, the target the original profile
    np.testing.assert_allclose(values[:, g].numpy(), np.log10(x.sum(1).numpy()), rtol=1e-6)
    assert (values[:, g + 1] < values[:, g]).float().mean() > 0.9
    expected_target = torch.log1p(x / x.sum(1, keepdim=True) * 1e4)
    torch.testing.assert_close(out["target"], expected_target)
    # about 30% of non-zero and 3% of zero inputs are masked; masked never enter the encoder
    nonzero = values[:, :g] > 0
    assert 0.25 < masked[nonzero].float().mean() < 0.35
    assert masked[~nonzero].float().mean() < 0.08
    assert not (keep[:, :g] & masked).any() and keep[:, g:].all()
    share_mask_value = (dec[:, :g][masked] == 102).float().mean()
    assert 0.7 < share_mask_value < 0.9
    assert (dec[:, :g][~masked] == values[:, :g][~masked]).all()


def test_train_lowers_the_loss_on_real_data():
    path = data_file("pbmc68k_reduced_counts.h5ad")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    adata = ad.read_h5ad(path)[:96].copy()
    ScFoundation.setup_anndata(adata)
    genes = list(adata.var_names)
    model = ScFoundation(adata, config={**TINY, "seq_len": len(genes) + 2}, gene_list=genes)
    before = _fixed_loss(model, adata)
    model.train(max_epochs=6, lr=3e-3, batch_size=32, train_size=1.0, enable_progress_bar=False)
    after = _fixed_loss(model, adata)
    assert after < 0.7 * before, (before, after)
    assert len(model.history["train_loss"]) == 6
    assert not model.module.training


def test_finetune_learns_cell_types_and_predict_writes_obs(tmp_path):
    fx = fixture_dir("scfoundation")
    torch.manual_seed(0)
    adata = ad.read_h5ad(fx / "input.h5ad")
    ScFoundation.setup_anndata(adata, labels_key="cell_type")
    model = ScFoundation.from_pretrained(fx / "checkpoint", adata)
    frozen = model.module.encoder.transformer_encoder[-1].linear1.weight.detach().clone()
    trained = model.module.encoder.transformer_encoder[-2].linear1.weight.detach().clone()
    history = model.finetune(max_epochs=15, lr=3e-3, batch_size=16)
    assert history[-1] < history[0]
    # the reference's choice: only transformer_encoder[-2] and the head are trained
    torch.testing.assert_close(model.module.encoder.transformer_encoder[-1].linear1.weight, frozen)
    assert not torch.equal(model.module.encoder.transformer_encoder[-2].linear1.weight, trained)
    probs = model.predict(progress_bar=False, key_added="pred")
    accuracy = float((adata.obs["pred"].astype(str) == adata.obs["cell_type"].astype(str)).mean())
    assert accuracy > 0.8  # 3 balanced-ish classes: chance is ~0.33
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(adata.obs["pred_probability"], probs.max(1), atol=1e-6)
    assert list(probs.columns) == model.classifier_labels
    # the head survives save / load
    model.save(tmp_path / "ft", overwrite=True)
    again = ScFoundation.load(tmp_path / "ft", adata=adata)
    np.testing.assert_allclose(
        again.predict(progress_bar=False, key_added="pred2").to_numpy(), probs.to_numpy(), atol=1e-6
    )


def test_finetune_needs_labels():
    fx = fixture_dir("scfoundation")
    adata = ad.read_h5ad(fx / "input.h5ad")
    ScFoundation.setup_anndata(adata)
    model = ScFoundation.from_pretrained(fx / "checkpoint", adata)
    with pytest.raises(InvalidInputError, match="labels_key"):
        model.finetune(max_epochs=1)
    with pytest.raises(InvalidInputError, match="finetune"):
        model.predict()
