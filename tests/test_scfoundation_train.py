"""scFoundation training: the read-depth-aware masked objective and classification fine-tuning."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

from conftest import data_file, fixture_dir
from scfm.errors import AnnDataKeyError, InvalidInputError
from scfm.model import ScFoundation

pytestmark = pytest.mark.usefixtures("one_torch_thread")

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


def _counts(n_cells: int, n_genes: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.tensor(rng.poisson(3.0, (n_cells, n_genes)), dtype=torch.float32)


def _model(x: torch.Tensor) -> ScFoundation:
    adata = ad.AnnData(x.numpy())
    adata.var_names = [f"G{i}" for i in range(x.shape[1])]
    ScFoundation.setup_anndata(adata, check_gene_overlap=False)
    return ScFoundation(adata, config=TINY, gene_list=list(adata.var_names))


def test_pretraining_objective_masks_and_downsamples():
    x = _counts(64, 50)
    module = _model(x).module
    module.downsample_prob = 0.0  # masking alone (downsampling: the next test)
    g = 50
    with torch.no_grad():
        out = module.inference(x, mask=True, generator=torch.Generator().manual_seed(0))
    masked, target = out.extra["masked"], out.extra["target"]
    assert out.expression.shape == (64, g) and out.cell_embedding.shape == (64, 4 * 32)
    # the target is the original profile
    torch.testing.assert_close(target, torch.log1p(x / x.sum(1, keepdim=True) * 1e4))
    # about 30% of non-zero and 3% of zero inputs are masked
    nonzero = x > 0
    assert 0.25 < masked[nonzero].float().mean() < 0.35
    assert masked[~nonzero].float().mean() < 0.08
    # the same generator state gives the same example; another one a different example
    with torch.no_grad():
        again = module.inference(x, mask=True, generator=torch.Generator().manual_seed(0))
        other = module.inference(x, mask=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.extra["masked"], masked)
    torch.testing.assert_close(again.expression, out.expression)
    assert not torch.equal(other.extra["masked"], masked)
    # evaluation without mask=True: no masking, no downsampling
    with torch.no_grad():
        plain = module.inference(x)
    assert plain.extra == {} and plain.expression is None


def test_masked_example_keeps_masked_genes_out_of_the_encoder():
    x = _counts(32, 40, seed=1)
    module = _model(x).module
    module.downsample_prob = 1.0
    generator = torch.Generator().manual_seed(2)
    kind = torch.zeros(32, dtype=torch.long)
    values, keep, dec, masked, target = module._masked_example(x, kind, None, generator)
    g = 40
    # S is the thinned depth, T the original one
    np.testing.assert_allclose(values[:, g].numpy(), np.log10(x.sum(1).numpy()), rtol=1e-6)
    assert (values[:, g + 1] < values[:, g]).float().mean() > 0.9
    assert not (keep[:, :g] & masked).any() and keep[:, g:].all()
    share_mask_value = (dec[:, :g][masked] == 102).float().mean()
    assert 0.7 < share_mask_value < 0.9
    assert (dec[:, :g][~masked] == values[:, :g][~masked]).all()
    assert target.shape == (32, g)


def _fixed_loss(model: ScFoundation, x: torch.Tensor) -> float:
    """Objective on all cells with a fixed draw of downsampling and masks."""
    module = model.module
    with torch.no_grad():
        out = module.inference(x, mask=True, generator=torch.Generator().manual_seed(123))
        return float(module.loss({}, out, {}).loss)


def test_train_lowers_the_loss_on_real_data():
    adata = ad.read_h5ad(data_file("pbmc68k_reduced_counts.h5ad"))[:96].copy()
    ScFoundation.setup_anndata(adata)
    genes = list(adata.var_names)
    model = ScFoundation(adata, config=TINY, gene_list=genes)
    x = torch.as_tensor(adata.X.toarray(), dtype=torch.float32)
    before = _fixed_loss(model, x)
    model.train(max_epochs=6, lr=3e-3, batch_size=32, train_size=1.0, enable_progress_bar=False)
    after = _fixed_loss(model, x)
    assert after < 0.7 * before, (before, after)
    assert len(model.history["train_loss"]) == 6
    assert not model.module.training


def test_finetune_learns_cell_types_and_predict(tmp_path):
    fx = fixture_dir("scfoundation")
    adata = ad.read_h5ad(fx / "input.h5ad")
    ScFoundation.setup_anndata(adata)
    model = ScFoundation.from_pretrained(fx / "checkpoint", adata)
    embedding = model.module.pos_emb.weight.detach().clone()
    model.finetune(
        "cell_type", max_epochs=15, lr=3e-3, batch_size=16, train_size=1.0,
        early_stopping=False, enable_progress_bar=False,
    )  # fmt: skip
    assert model.classifier_labels == ["B cell", "T cell", "monocyte"]
    assert not torch.equal(model.module.pos_emb.weight, embedding)  # the encoder trained too
    labels = model.predict(progress_bar=False, key_added="pred")
    accuracy = float((adata.obs["pred"].astype(str) == adata.obs["cell_type"].astype(str)).mean())
    assert accuracy > 0.8  # 3 classes: chance is ~0.33
    np.testing.assert_array_equal(labels, adata.obs["pred"].astype(str).to_numpy())
    probs = model.predict(indices=[3, 1], soft=True, progress_bar=False)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert list(probs.columns) == model.classifier_labels
    # the head survives save / load and a lone cell is predicted like in a minibatch
    model.save(tmp_path / "ft", overwrite=True)
    again = ScFoundation.load(tmp_path / "ft", adata=adata)
    again_probs = again.predict(indices=[3, 1], soft=True, batch_size=1, progress_bar=False)
    np.testing.assert_allclose(again_probs.to_numpy(), probs.to_numpy(), atol=1e-5)


def test_finetune_with_a_frozen_encoder_or_lora_keeps_the_encoder():
    fx = fixture_dir("scfoundation")
    adata = ad.read_h5ad(fx / "input.h5ad")
    ScFoundation.setup_anndata(adata)
    for options in ({"freeze_encoder": True}, {"lora_rank": 2}):
        model = ScFoundation.from_pretrained(fx / "checkpoint", adata)
        before = {k: v.clone() for k, v in model.module.encoder.state_dict().items()}
        model.finetune("cell_type", max_epochs=2, batch_size=16, enable_progress_bar=False,
                       **options)  # fmt: skip
        after = model.module.encoder.state_dict()
        for key, value in before.items():
            # LoRA wraps a Linear: its own weights move to "<name>.base_layer.<param>"
            head, _, param = key.rpartition(".")
            torch.testing.assert_close(
                after.get(key, after.get(f"{head}.base_layer.{param}")), value
            )
        assert any("lora_" in k for k in after) == ("lora_rank" in options)
        assert model.predict(indices=[0, 1], progress_bar=False).shape == (2,)


def test_predict_needs_a_head_and_finetune_needs_labels():
    fx = fixture_dir("scfoundation")
    adata = ad.read_h5ad(fx / "input.h5ad")
    ScFoundation.setup_anndata(adata)
    model = ScFoundation.from_pretrained(fx / "checkpoint", adata)
    with pytest.raises(AnnDataKeyError, match="labels_key"):
        model.finetune("no_such_column", max_epochs=1)
    with pytest.raises(InvalidInputError, match="finetune"):
        model.predict()
