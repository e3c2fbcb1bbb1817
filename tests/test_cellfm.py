"""CellFM: parity with the original MindSpore code, loading variants, errors, save/load."""

from __future__ import annotations

import logging
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import scfm
from conftest import fixture_dir
from scfm.errors import (
    CheckpointFormatError,
    CheckpointKeyError,
    CheckpointNotFoundError,
    InvalidInputError,
)
from scfm.io import MindSporeCheckpoint, write_mindspore_checkpoint
from scfm.model import CellFM

ATOL = 1e-4
N_HEADS = 4  # the fixture's enc_num_heads (not stored in CellFM checkpoints)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fx():
    return fixture_dir("cellfm")


@pytest.fixture(scope="module")
def expected(fx):
    return dict(np.load(fx / "expected.npz"))


def _adata(fx, **setup):
    adata = ad.read_h5ad(fx / "input.h5ad")
    CellFM.setup_anndata(adata, **setup)
    return adata


@pytest.fixture(scope="module")
def model(fx):
    adata = _adata(fx)
    return CellFM.from_pretrained(fx / "checkpoint", adata, n_heads=N_HEADS)


def test_tokens_match_reference(fx, expected, model):
    adata = model.adata
    genes = np.asarray(model._vocab_names())
    kept = model.module.kept_token_ids.numpy()
    np.testing.assert_array_equal(genes[kept - 1], expected["kept_genes"])
    np.testing.assert_array_equal(kept, expected["kept_gene_ids"])
    counts = torch.as_tensor(adata.X.toarray())
    tokens = scfm.data.cellfm_tokenize(
        counts, model.module.kept_var_index, model.module.kept_token_ids
    )
    np.testing.assert_array_equal(tokens.n_tokens.numpy(), expected["n_tokens"])
    np.testing.assert_array_equal(tokens.gene_ids.numpy(), expected["token_gene_ids"])
    np.testing.assert_allclose(tokens.values.numpy(), expected["token_values"], atol=ATOL, rtol=0)
    # log1p(T / 1000) with T over kept genes after the deep-cell rounding (cell 1 > 1e5 counts)
    st = np.log1p(tokens.totals.numpy()[expected["recon_cells"]] / 1000)
    np.testing.assert_allclose(st, expected["recon_st_feat"][:, 1], atol=ATOL, rtol=0)


def test_cell_embeddings_match_reference(expected, model):
    np.testing.assert_array_equal(model.adata.obs_names, expected["obs_names"])
    z = model.get_latent_representation(batch_size=7, progress_bar=False)
    np.testing.assert_allclose(z, expected["cell_embeddings"], atol=ATOL, rtol=0)
    z_st = model.get_latent_representation(use_st=True, progress_bar=False)
    np.testing.assert_allclose(z_st, expected["cell_embeddings_st"], atol=ATOL, rtol=0)
    # rows follow `indices`, whatever the length-sorted minibatching
    idx = [5, 1, 40, 5]
    np.testing.assert_allclose(
        model.get_latent_representation(indices=idx, progress_bar=False),
        expected["cell_embeddings"][idx],
        atol=ATOL,
        rtol=0,
    )


def test_contextual_gene_embeddings_match_reference(expected, model):
    genes = np.asarray(model._vocab_names())
    for row, cell in enumerate(expected["gene_embeddings_cells"]):
        n = expected["n_tokens"][cell]
        names = genes[expected["token_gene_ids"][cell, :n] - 1]
        frame = model.get_gene_embeddings(indices=[int(cell)], progress_bar=False)
        assert len(frame) == n
        np.testing.assert_allclose(
            frame.loc[names].to_numpy(), expected["gene_embeddings"][row, :n], atol=ATOL, rtol=0
        )


def test_masked_value_recovery_matches_reference(expected, model):
    out = model.reconstruct(indices=expected["recon_cells"], mask_ratio=0.5, mask_seed=1000)
    for key in ("gene_ids", "n_tokens", "mask_gene", "input_unmask"):
        np.testing.assert_array_equal(out[key], expected[f"recon_{key}"].astype(out[key].dtype))
    for key in ("input_value", "target", "st_feat", "gw_pred", "cw_pred", "cls"):
        np.testing.assert_allclose(out[key], expected[f"recon_{key}"], atol=ATOL, rtol=0)
    for key in ("loss_gw", "loss_cw"):
        np.testing.assert_allclose(out[key], expected[f"recon_{key}"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(out["loss_cw"], expected["recon_loss_construct_eval"], atol=ATOL)
    # a random mask scores int(0.5 n) genes per cell and changes the predictions
    rand = model.reconstruct(indices=expected["recon_cells"], mask_ratio=0.5)
    np.testing.assert_array_equal(
        rand["mask_gene"].sum(1), (0.5 * expected["recon_n_tokens"]).astype(int)
    )


def test_static_gene_embeddings_are_gene_table_rows(fx, model):
    static = model.get_gene_embeddings(contextual=False)
    table = MindSporeCheckpoint(fx / "checkpoint" / "CellFM_80M_weight.ckpt")["gene_emb"]
    genes = list(model._vocab_names())
    np.testing.assert_array_equal(static.loc["ABCG8"].to_numpy(), table[genes.index("ABCG8") + 1])
    assert static.shape == (400, 64)


def test_embed_writes_obsm_and_varm(fx, expected):
    adata = _adata(fx)
    m = CellFM.from_pretrained(fx / "checkpoint", adata, n_heads=N_HEADS)
    m.embed(adata)
    np.testing.assert_allclose(adata.obsm["X_cellfm"], expected["cell_embeddings"], atol=ATOL)
    m.embed_genes(adata, key_added="cellfm_genes")
    varm = adata.varm["cellfm_genes"]
    in_vocab = np.isin(adata.var_names, m._vocab_names())
    assert np.isnan(varm[~in_vocab]).all() and varm.shape == (300, 64)
    assert adata.uns["scfm"]["gene_alignment"]["cellfm"]["n_matched"] == 270


def _rewrite(fx, tmp_path, ckpt_name, csv_name, drop=(), extra=None):
    """Re-save the fixture checkpoint (model keys only) under another release layout."""
    src = MindSporeCheckpoint(fx / "checkpoint" / "CellFM_80M_weight.ckpt")
    tensors = {k: src[k] for k in src if not any(k.startswith(p) for p in drop)}
    tensors.update(extra or {})
    folder = tmp_path / ckpt_name.replace(".", "_")
    folder.mkdir()
    write_mindspore_checkpoint(tensors, folder / ckpt_name)
    shutil.copy(fx / "checkpoint" / "expand_gene_info.csv", folder / csv_name)
    return folder


def test_800m_layout_without_st_tokens_or_decoders(fx, expected, tmp_path, caplog):
    folder = _rewrite(
        fx,
        tmp_path,
        "base_weight.ckpt",
        "gene_info.csv",
        drop=("ST_", "value_dec", "cellwise_dec", "zero_emb", "moment", "global_step"),
    )
    adata = _adata(fx)
    with caplog.at_level(logging.WARNING):
        m = CellFM.from_pretrained(folder, adata, n_heads=N_HEADS)
    assert "random initialisation" in caplog.text
    assert not m.module.st_tokens
    z = m.get_latent_representation(progress_bar=False)
    np.testing.assert_allclose(z, expected["cell_embeddings"], atol=ATOL, rtol=0)
    with pytest.raises(InvalidInputError, match="ST"):
        m.get_latent_representation(use_st=True, progress_bar=False)


def test_zero_heads_and_file_path_are_loaded(fx, expected, tmp_path):
    d = 64
    extra = {
        "value_dec.zero_logit.0.weight": torch.randn(d, d),
        "value_dec.zero_logit.0.bias": torch.randn(d),
        "value_dec.zero_logit.2.weight": torch.randn(d, d),
        "value_dec.zero_logit.2.bias": torch.randn(d),
        "value_dec.zero_logit.4.weight": torch.randn(1, d),
        "value_dec.zero_logit.4.bias": torch.randn(1),
        "cellwise_dec.zero_logit.weight": torch.randn(d, d),
        "cellwise_dec.zero_logit.bias": torch.randn(d),
    }
    folder = _rewrite(fx, tmp_path, "CellFM_80M_weight.ckpt", "expand_gene_info.csv", extra=extra)
    adata = _adata(fx)
    m = CellFM.from_pretrained(folder / "CellFM_80M_weight.ckpt", adata, n_heads=N_HEADS)
    assert m.module.value_dec.zero_logit[4].weight.shape == (1, d)
    np.testing.assert_array_equal(
        m.module.cellwise_dec.zero_logit.bias.detach().numpy(),
        extra["cellwise_dec.zero_logit.bias"].numpy(),
    )
    z = m.get_latent_representation(progress_bar=False)
    np.testing.assert_allclose(z, expected["cell_embeddings"], atol=ATOL, rtol=0)


def test_loading_errors(fx, tmp_path):
    adata = _adata(fx)
    with pytest.raises(InvalidInputError, match="n_heads"):
        CellFM.from_pretrained(fx / "checkpoint", adata)
    with pytest.raises(InvalidInputError, match="divide"):
        CellFM.from_pretrained(fx / "checkpoint", adata, n_heads=5)
    # the gene list is not shipped: a checkpoint alone is refused with the fix
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(fx / "checkpoint" / "CellFM_80M_weight.ckpt", alone)
    with pytest.raises(CheckpointNotFoundError, match=r"expand_gene_info\.csv"):
        CellFM.from_pretrained(alone, adata, n_heads=N_HEADS)
    # a gene list longer than the gene table (80M / 800M mix-up)
    big = pd.read_csv(fx / "checkpoint" / "expand_gene_info.csv", index_col=0)
    longer = pd.concat([big, big.rename(index=lambda g: f"{g}_copy")])
    longer.to_csv(alone / "expand_gene_info.csv")
    with pytest.raises(CheckpointFormatError, match="another release"):
        CellFM.from_pretrained(alone, adata, n_heads=N_HEADS)


def test_missing_unexpected_and_misshaped_keys_are_reported(fx, tmp_path):
    adata = _adata(fx)
    folder = _rewrite(
        fx,
        tmp_path,
        "CellFM_80M_weight.ckpt",
        "expand_gene_info.csv",
        drop=("encoder.1.ffn.u_proj", "value_enc.mask_emb"),
        extra={"encoder.0.attn.extra.weight": torch.zeros(2, 2), "cls_token": torch.zeros(1, 2)},
    )
    with pytest.raises(CheckpointKeyError) as err:
        CellFM.from_pretrained(folder, adata, n_heads=N_HEADS)
    assert set(err.value.missing) == {"encoder.1.ffn.u_proj.weight", "value_enc.mask_emb"}
    assert err.value.unexpected == ["encoder.0.attn.extra.weight"]
    assert [m[0] for m in err.value.mismatched] == ["cls_token"]


def test_save_load_round_trip(fx, expected, model, tmp_path):
    model.save(tmp_path / "saved", overwrite=True, save_anndata=False)
    adata = _adata(fx)
    loaded = CellFM.load(tmp_path / "saved", adata=adata)
    z = loaded.get_latent_representation(progress_bar=False)
    np.testing.assert_array_equal(z, model.get_latent_representation(progress_bar=False))
    np.testing.assert_allclose(z, expected["cell_embeddings"], atol=ATOL, rtol=0)


def test_token_order_and_unknown_genes_do_not_matter(fx, expected):
    adata = ad.read_h5ad(fx / "input.h5ad")
    rng = np.random.default_rng(0)
    shuffled = adata[:, rng.permutation(adata.n_vars)].copy()
    CellFM.setup_anndata(shuffled)
    m = CellFM.from_pretrained(fx / "checkpoint", shuffled, n_heads=N_HEADS)
    z = m.get_latent_representation(progress_bar=False)
    np.testing.assert_allclose(z, expected["cell_embeddings"], atol=ATOL, rtol=0)


def test_deep_cells_are_subsampled_to_max_tokens(fx):
    genes = [f"G{i:04d}" for i in range(3000)]
    rng = np.random.default_rng(1)
    counts = rng.poisson(3.0, size=(4, 3000)).astype(np.float32) + 1
    counts[0, 100:] = 0  # a short cell stays whole
    adata = ad.AnnData(counts, var=pd.DataFrame(index=genes))
    CellFM.setup_anndata(adata)
    m = CellFM(adata, genes=genes, enc_dims=16, enc_nlayers=2, enc_num_heads=2, max_tokens=2048)
    batch = torch.as_tensor(counts)
    tokens = m.module.tokenize(batch, torch.Generator().manual_seed(0))
    assert tokens.n_tokens.tolist() == [100, 2048, 2048, 2048]
    # kept tokens stay in gene order and the sampling is reproducible with a seed
    assert bool((tokens.gene_ids[1, 1:2048] > tokens.gene_ids[1, :2047]).all())
    again = m.module.tokenize(batch, torch.Generator().manual_seed(0))
    assert torch.equal(tokens.gene_ids, again.gene_ids)
    z1 = m.get_latent_representation(seed=3, progress_bar=False)
    z2 = m.get_latent_representation(seed=3, progress_bar=False)
    np.testing.assert_array_equal(z1, z2)


def test_cell_without_vocabulary_genes_is_finite(fx, model):
    adata = ad.read_h5ad(fx / "input.h5ad")
    adata.X = adata.X.toarray()
    adata.X[0] = 0
    CellFM.setup_anndata(adata)
    m = CellFM.from_pretrained(fx / "checkpoint", adata, n_heads=N_HEADS)
    z = m.get_latent_representation(indices=[0, 1], progress_bar=False)
    assert np.isfinite(z).all()


def test_no_vocabulary_overlap_is_refused(fx):
    adata = ad.AnnData(np.ones((3, 4), np.float32), var=pd.DataFrame(index=list("ABCD")))
    CellFM.setup_anndata(adata)
    with pytest.raises(scfm.errors.GeneVocabularyError):
        CellFM.from_pretrained(fx / "checkpoint", adata, n_heads=N_HEADS)


def test_bf16_autocast_stays_close_to_float32(expected, model):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model.get_latent_representation(progress_bar=False)
    ref = expected["cell_embeddings"]
    cos = (z * ref).sum(1) / np.linalg.norm(z, axis=1) / np.linalg.norm(ref, axis=1)
    assert np.isfinite(z).all() and cos.min() > 0.99
    assert np.abs(z - ref).max() > 1e-6  # autocast really ran in reduced precision


def test_config_from_released_shapes_defaults_heads():
    from scfm.io import CellFMConfig

    d = 1536
    shapes = {"gene_emb": (24080, d), "cls_token": (1, 1, d), "moment1.gene_emb": (24080, d)}
    shapes.update({f"encoder.{i}.attn.q_proj.weight": (d, d) for i in range(40)})
    config = CellFMConfig.from_shapes(shapes)
    assert (config.enc_nlayers, config.enc_num_heads, config.gene_rows) == (40, 48, 24080)
    assert not config.st_tokens and not config.add_zero and config.lora == 0
    shapes["encoder.0.attn.lora_q.A.weight"] = (8, d)
    assert CellFMConfig.from_shapes(shapes, num_heads=24).lora == 8
    with pytest.raises(CheckpointFormatError, match="encoder"):
        CellFMConfig.from_shapes({"gene_emb": (16, 8), "encoder.1.attn.q_proj.weight": (8, 8)})
