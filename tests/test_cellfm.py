"""CellFM: parity with the original MindSpore code, any AnnData, per-cell determinism, loading."""

from __future__ import annotations

import logging
import shutil
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from conftest import fixture_dir
from scfm.errors import (
    CheckpointFormatError,
    CheckpointKeyError,
    CheckpointNotFoundError,
    GeneVocabularyError,
    InvalidInputError,
)
from scfm.io import MindSporeCheckpoint, write_mindspore_checkpoint
from scfm.io._cellfm import config_from_shapes
from scfm.model import CellFM
from scfm.module._cellfm import PLAN_DEPTH, PLAN_SEED, CellFMConfig

ATOL = 1e-4
N_HEADS = 4  # the fixture's enc_num_heads (not stored in CellFM checkpoints)
QUIET = {"progress_bar": False}

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
    return CellFM.from_pretrained(fx / "checkpoint", _adata(fx), n_heads=N_HEADS)


def _module_inputs(model, adata, cells, seed=0):
    """What the loader hands the module: gene-space counts and the model's cell plan."""
    _, space = model._gene_space(adata)
    x = torch.as_tensor(space.map(adata.X[cells]))
    plan = model._cell_plan(adata, np.asarray(cells), "expression", seed=seed)
    return x, torch.as_tensor(plan[PLAN_DEPTH]), torch.as_tensor(plan[PLAN_SEED])


def test_tokens_match_reference(expected, model):
    vocab = np.asarray(model.vocabulary)
    alignment = model.gene_alignment
    kept = np.sort(vocab[alignment.vocab_index])  # the reference: np.intersect1d
    np.testing.assert_array_equal(kept, expected["kept_genes"])
    ids = {g: i + 1 for i, g in enumerate(vocab)}
    np.testing.assert_array_equal([ids[g] for g in kept], expected["kept_gene_ids"])
    x, depth, _ = _module_inputs(model, model.adata, np.arange(model.adata.n_obs))
    tokens = model.module.tokenize(x, depth)
    np.testing.assert_array_equal(tokens.n_tokens.numpy(), expected["n_tokens"])
    np.testing.assert_array_equal(tokens.gene_ids.numpy(), expected["token_gene_ids"])
    np.testing.assert_allclose(tokens.values.numpy(), expected["token_values"], atol=ATOL, rtol=0)
    # log1p(T / 1000) with T over kept genes after the deep-cell rounding (cell 1 > 1e5 counts,
    # scaled by its total over ALL genes of the AnnData)
    st = np.log1p(tokens.totals.numpy()[expected["recon_cells"]] / 1000)
    np.testing.assert_allclose(st, expected["recon_st_feat"][:, 1], atol=ATOL, rtol=0)


def test_cell_embeddings_match_reference(expected, model):
    np.testing.assert_array_equal(model.adata.obs_names, expected["obs_names"])
    z = model.get_latent_representation(batch_size=7, **QUIET)
    np.testing.assert_allclose(z, expected["cell_embeddings"], atol=ATOL, rtol=0)
    z_st = model.get_latent_representation(use_st=True, **QUIET)
    np.testing.assert_allclose(z_st, expected["cell_embeddings_st"], atol=ATOL, rtol=0)
    # rows follow `indices`, whatever the length-sorted minibatching
    idx = [5, 1, 40, 5]
    np.testing.assert_allclose(
        model.get_latent_representation(indices=idx, batch_size=3, **QUIET),
        expected["cell_embeddings"][idx],
        atol=ATOL,
        rtol=0,
    )


def test_contextual_gene_embeddings_match_reference(expected, model):
    genes = np.asarray(model.vocabulary)
    for row, cell in enumerate(expected["gene_embeddings_cells"]):
        n = expected["n_tokens"][cell]
        names = genes[expected["token_gene_ids"][cell, :n] - 1]
        frame = model.get_gene_embeddings(indices=[int(cell)], **QUIET)
        assert len(frame) == n
        np.testing.assert_allclose(
            frame.loc[names].to_numpy(), expected["gene_embeddings"][row, :n], atol=ATOL, rtol=0
        )


def test_masked_value_recovery_matches_reference(expected, model):
    cells = expected["recon_cells"]
    n_tok = expected["recon_n_tokens"]
    genes = np.asarray(model.vocabulary)
    options = {"indices": cells, "mask_ratio": 0.5, "seed": 1000, **QUIET}
    # the reference masks cell i after np.random.seed(1000 + i): seed + row in the AnnData
    gw = model.get_normalized_expression(decoder="genewise", **options)
    cw = model.get_normalized_expression(decoder="cellwise", gene_list=list(genes), **options)
    for r in range(len(cells)):
        names = genes[expected["recon_gene_ids"][r, : n_tok[r]] - 1]
        np.testing.assert_allclose(
            gw.iloc[r][names], expected["recon_gw_pred"][r, : n_tok[r]], atol=ATOL, rtol=0
        )
        np.testing.assert_allclose(
            cw.iloc[r][names], expected["recon_cw_pred"][r, : n_tok[r]], atol=ATOL, rtol=0
        )
    # the same forward pass, read at the module: inputs, masks, CLS and the two losses
    x, depth, seeds = _module_inputs(model, model.adata, cells, seed=1000)
    with torch.no_grad():
        out = model.module.inference(x, depth, seeds, mask=True, mask_ratio=0.5, decoder="genewise")
        loss = model.module.loss({}, out, model.module.generative(**_gen_inputs(model, out)))
    extra = {k: v.numpy() for k, v in out.extra.items()}
    width = expected["recon_gene_ids"].shape[1]
    np.testing.assert_array_equal(extra["gene_ids"][:, :width], expected["recon_gene_ids"])
    np.testing.assert_array_equal(extra["scored"][:, :width], expected["recon_mask_gene"])
    np.testing.assert_array_equal(extra["unmask"][:, :width], expected["recon_input_unmask"])
    input_value = (extra["target"] * extra["unmask"])[:, :width]
    np.testing.assert_allclose(input_value, expected["recon_input_value"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(extra["target"][:, :width], expected["recon_target"], atol=ATOL)
    np.testing.assert_allclose(extra["st_feat"], expected["recon_st_feat"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(extra["cls"], expected["recon_cls"], atol=ATOL, rtol=0)
    metrics = {k: float(v) for k, v in loss.extra_metrics.items()}
    np.testing.assert_allclose(metrics["loss_gw"], expected["recon_loss_gw"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(metrics["loss_cw"], expected["recon_loss_cw"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(metrics["loss_cw"], expected["recon_loss_construct_eval"], atol=ATOL)
    # another seed masks other genes: another prediction, int(0.5 n) genes scored per cell
    other = model.get_normalized_expression(decoder="genewise", **{**options, "seed": 7})
    assert not np.allclose(other.to_numpy(), gw.to_numpy(), atol=1e-3)


def _gen_inputs(model, out):
    return model.module._get_generative_input({}, out)


def test_decoding_without_mask_covers_every_gene(model):
    # the cell-wise decoder scores genes the AnnData lacks too
    absent = [g for g in model.vocabulary if g not in model.adata.var_names][:2]
    genes = [model.adata.var_names[0], *absent]
    frame = model.get_normalized_expression(indices=[0, 2], gene_list=genes, **QUIET)
    assert frame.shape == (2, 3) and np.isfinite(frame.to_numpy()).all()
    assert (frame.to_numpy() != 0).all()
    assert list(frame.index) == list(model.adata.obs_names[[0, 2]])
    with pytest.raises(InvalidInputError, match="decoder"):
        model.get_normalized_expression(decoder="both", **QUIET)
    with pytest.raises(InvalidInputError, match="mask_ratio"):
        model.get_normalized_expression(mask_ratio=1.5, **QUIET)


def test_static_gene_embeddings_are_gene_table_rows(fx, model):
    static = model.get_gene_embeddings(contextual=False)
    table = MindSporeCheckpoint(fx / "checkpoint" / "CellFM_80M_weight.ckpt")["gene_emb"]
    genes = list(model.vocabulary)
    np.testing.assert_array_equal(static.loc["ABCG8"].to_numpy(), table[genes.index("ABCG8") + 1])
    assert static.shape == (400, 64) and list(static.index) == sorted(genes)


def test_options_are_checked_before_any_forward(model):
    with pytest.raises(InvalidInputError, match="hidden_layer"):
        model.get_latent_representation(hidden_layer=3, **QUIET)
    with pytest.raises(InvalidInputError, match="pooling"):
        model.get_latent_representation(pooling="max", **QUIET)
    with pytest.raises(InvalidInputError, match="layer"):
        model.get_latent_representation(layer=1, **QUIET)  # `layer` is an AnnData layer only
    with pytest.raises(InvalidInputError, match="seed"):
        model.get_latent_representation(seed=-1, **QUIET)
    # hidden_layer indexes (embedding output, layer 1, layer 2): -1 == 2; 0 is the CLS input
    last = model.get_latent_representation(indices=[0, 1], **QUIET)
    np.testing.assert_array_equal(
        model.get_latent_representation(indices=[0, 1], hidden_layer=2, **QUIET), last
    )
    first = model.get_latent_representation(indices=[0, 1], hidden_layer=-3, **QUIET)
    np.testing.assert_allclose(first, model.module.cls_token.detach()[0].expand(2, -1))
    mean = model.get_latent_representation(indices=[0], pooling="mean", **QUIET)
    frame = model.get_gene_embeddings(indices=[0], **QUIET)
    np.testing.assert_allclose(mean[0], frame.to_numpy().mean(0), atol=1e-5)


def test_embed_writes_obsm_and_varm(fx, expected):
    adata = _adata(fx)
    m = CellFM.from_pretrained(fx / "checkpoint", adata, n_heads=N_HEADS)
    m.embed(adata, **QUIET)
    np.testing.assert_allclose(adata.obsm["X_cellfm"], expected["cell_embeddings"], atol=ATOL)
    m.embed_genes(adata, key_added="cellfm_genes", **QUIET)
    varm = adata.varm["cellfm_genes"]
    in_vocab = np.isin(adata.var_names, m.vocabulary)
    assert np.isnan(varm[~in_vocab]).all() and varm.shape == (300, 64)
    assert adata.uns["scfm"]["gene_alignment"]["cellfm"]["n_matched"] == 270


def test_query_with_other_genes_gets_the_same_embedding(fx, model):
    """Missing genes, extra genes, another order: same as the original on the shared genes."""
    original = ad.read_h5ad(fx / "input.h5ad")
    rng = np.random.default_rng(0)
    shared = np.sort(rng.choice(original.n_vars, 220, replace=False))
    extra = rng.poisson(2.0, size=(original.n_obs, 25)).astype(np.float32)
    # the reference scales cells deeper than 1e5 counts by their total over ALL their genes;
    # extra counts would change that total for the one such cell (cell001), so it gets none
    extra[1] = 0
    x = sp.hstack([original.X[:, shared], sp.csr_matrix(extra)]).tocsr()
    var = pd.DataFrame(index=[*original.var_names[shared], *[f"RANDOM{i}" for i in range(25)]])
    query = ad.AnnData(x, obs=original.obs[[]].copy(), var=var)
    query = query[:, rng.permutation(query.n_vars)].copy()
    CellFM.setup_anndata(query)
    restricted = original[:, shared].copy()
    CellFM.setup_anndata(restricted)
    z_query = model.get_latent_representation(query, **QUIET)
    z_restricted = model.get_latent_representation(restricted, **QUIET)
    np.testing.assert_allclose(z_query, z_restricted, atol=1e-5, rtol=0)
    # and a query that was never set up works with the model's setup
    plain = ad.AnnData(query.X.copy(), obs=query.obs[[]].copy(), var=query.var[[]].copy())
    np.testing.assert_allclose(
        model.get_latent_representation(plain, **QUIET), z_query, atol=1e-6, rtol=0
    )


def _deep_model(max_tokens=50):
    """A random model over 300 genes, and cells far deeper than ``max_tokens``."""
    rng = np.random.default_rng(5)
    genes = [f"G{i:03d}" for i in range(300)]
    counts = rng.poisson(1.5, size=(23, 300)).astype(np.float32)
    counts[[0, 4], 60:] = 0  # two shallow cells (< max_tokens genes) among deep ones
    counts[3, :] = 0
    counts[3, :20] = 3
    adata = ad.AnnData(sp.csr_matrix(counts), var=pd.DataFrame(index=genes))
    CellFM.setup_anndata(adata)
    config = {"enc_dims": 16, "enc_nlayers": 2, "enc_num_heads": 2, "max_tokens": max_tokens}
    return CellFM(adata, config=config, genes=genes), adata, counts


def test_deep_cells_do_not_depend_on_batch_mates_or_batch_size():
    model, adata, counts = _deep_model()
    assert ((counts > 0).sum(1) > 50).sum() >= 19  # most cells are subsampled
    ref = model.get_latent_representation(batch_size=1, **QUIET)
    for batch_size in (3, 7, 23):
        z = model.get_latent_representation(batch_size=batch_size, **QUIET)
        np.testing.assert_allclose(z, ref, atol=1e-5, rtol=0)
    perm = np.random.default_rng(2).permutation(adata.n_obs)
    z = model.get_latent_representation(indices=perm, batch_size=4, **QUIET)
    np.testing.assert_allclose(z, ref[perm], atol=1e-5, rtol=0)
    # a subset with other batch-mates
    z = model.get_latent_representation(indices=[22, 5, 9], batch_size=2, **QUIET)
    np.testing.assert_allclose(z, ref[[22, 5, 9]], atol=1e-5, rtol=0)
    # masked decoding is per cell too
    options = {"mask_ratio": 0.5, "decoder": "genewise", **QUIET}
    e1 = model.get_normalized_expression(batch_size=1, **options).to_numpy()
    e7 = model.get_normalized_expression(indices=perm, batch_size=7, **options).to_numpy()
    np.testing.assert_allclose(e7, e1[perm], atol=1e-5, rtol=0)
    # gene embeddings: sums over the same tokens, whatever the grouping
    g1 = model.get_gene_embeddings(batch_size=1, **QUIET)
    g7 = model.get_gene_embeddings(batch_size=7, **QUIET)
    pd.testing.assert_frame_equal(g1, g7, atol=1e-5, rtol=0, check_exact=False)
    # the seed drives the sample of deep cells only
    other = model.get_latent_representation(seed=1, **QUIET)
    deep = (counts > 0).sum(1) > 50
    assert np.abs(other[deep] - ref[deep]).max(axis=1).min() > 1e-3
    np.testing.assert_allclose(other[~deep], ref[~deep], atol=1e-6, rtol=0)


def test_deep_cells_keep_max_tokens_genes_in_order():
    model, adata, counts = _deep_model()
    _, space = model._gene_space(adata)
    x = torch.as_tensor(space.map(adata.X))
    seeds = torch.arange(adata.n_obs)
    tokens = model.module.tokenize(x, cell_seed=seeds)
    n_expr = (counts > 0).sum(1)
    assert tokens.n_tokens.tolist() == np.minimum(n_expr, 50).tolist()
    ids = tokens.gene_ids[1, :50]
    assert bool((ids[1:] > ids[:-1]).all())  # alphabetical = vocabulary order here
    again = model.module.tokenize(x[[5, 1]], cell_seed=seeds[[5, 1]])
    assert torch.equal(again.gene_ids[1, :50], ids)
    # without per-cell seeds (pretraining) a generator draws
    g = model.module.tokenize(x, generator=torch.Generator().manual_seed(0))
    assert g.n_tokens.tolist() == tokens.n_tokens.tolist()


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
    assert not m.config.st_tokens
    z = m.get_latent_representation(**QUIET)
    np.testing.assert_allclose(z, expected["cell_embeddings"], atol=ATOL, rtol=0)
    with pytest.raises(InvalidInputError, match="ST"):
        m.get_latent_representation(use_st=True, **QUIET)


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
    z = m.get_latent_representation(**QUIET)
    np.testing.assert_allclose(z, expected["cell_embeddings"], atol=ATOL, rtol=0)


def test_loading_errors(fx, tmp_path):
    adata = _adata(fx)
    with pytest.raises(InvalidInputError, match="n_heads"):
        CellFM.from_pretrained(fx / "checkpoint", adata)
    for heads in (5, 10**6):
        with pytest.raises(CheckpointFormatError, match="n_heads"):
            CellFM.from_pretrained(fx / "checkpoint", adata, n_heads=heads)
    with pytest.raises(InvalidInputError, match="mask_ratio"):
        CellFM.from_pretrained(fx / "checkpoint", adata, n_heads=N_HEADS, mask_ratio=1.5)
    with pytest.raises(InvalidInputError, match="Unknown"):
        CellFM.from_pretrained(fx / "checkpoint", adata, n_heads=N_HEADS, heads=4)
    # the gene list is not shipped: a checkpoint alone is refused with the fix
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(fx / "checkpoint" / "CellFM_80M_weight.ckpt", alone)
    with pytest.raises(CheckpointNotFoundError, match=r"expand_gene_info\.csv"):
        CellFM.from_pretrained(alone, adata, n_heads=N_HEADS)
    # a gene list longer than the gene table (80M / 800M mix-up)
    table = pd.read_csv(fx / "checkpoint" / "expand_gene_info.csv", index_col=0)
    longer = pd.concat([table, table.rename(index=lambda g: f"{g}_copy")])
    longer.to_csv(alone / "expand_gene_info.csv")
    with pytest.raises(CheckpointFormatError, match="another release"):
        CellFM.from_pretrained(alone, adata, n_heads=N_HEADS)
    # a corrupt gene list: one gene on two token ids
    table.index = [*table.index[:-1], table.index[0]]
    table.index.name = "HGNC_gene"
    table.to_csv(alone / "expand_gene_info.csv")
    with pytest.raises(CheckpointFormatError, match="twice"):
        CellFM.from_pretrained(alone, adata, n_heads=N_HEADS)
    assert "scfm" not in adata.uns  # a failed load leaves the AnnData as it was


def test_missing_unexpected_misshaped_and_nonfinite_keys_are_reported(fx, tmp_path):
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
    src = MindSporeCheckpoint(fx / "checkpoint" / "CellFM_80M_weight.ckpt")
    bad = src["encoder.0.ffn.v_proj.weight"].clone()
    bad[0, 0] = float("nan")
    nan = _rewrite(
        fx,
        tmp_path,
        "base_weight.ckpt",
        "gene_info.csv",
        extra={"encoder.0.ffn.v_proj.weight": bad},
    )
    with pytest.raises(CheckpointFormatError, match=r"encoder\.0\.ffn\.v_proj\.weight"):
        CellFM.from_pretrained(nan, adata, n_heads=N_HEADS)


def test_config_is_validated_before_anything_is_built():
    good = {"enc_dims": 64, "enc_nlayers": 2, "enc_num_heads": 4, "gene_rows": 408, "n_genes": 400}
    assert CellFMConfig.from_dict(good).enc_dims == 64
    start = time.perf_counter()
    with pytest.raises(CheckpointFormatError, match="enc_nlayers"):
        CellFMConfig.from_dict({**good, "enc_nlayers": 10**6})
    with pytest.raises(CheckpointFormatError, match="enc_nlayers"):  # in range, absurd in total
        CellFMConfig.from_dict({**good, "enc_dims": 16384, "enc_nlayers": 1000})
    assert time.perf_counter() - start < 1.0
    for key, value in [
        ("enc_dims", "64"),
        ("enc_dims", 0),
        ("enc_dims", 64.0),
        ("value_bins", -1),
        ("st_tokens", "yes"),
        ("mask_ratio", 1.0),
        ("max_tokens", 0),
    ]:
        with pytest.raises(CheckpointFormatError, match=key):
            CellFMConfig.from_dict({**good, key: value})
    with pytest.raises(CheckpointFormatError, match="enc_num_heads"):
        CellFMConfig.from_dict({**good, "enc_num_heads": 5})
    with pytest.raises(CheckpointFormatError, match="gene_rows"):
        CellFMConfig.from_dict({**good, "gene_rows": 400})
    with pytest.raises(CheckpointFormatError, match="Unknown"):
        CellFMConfig.from_dict({**good, "num_layers": 2})
    with pytest.raises(CheckpointFormatError, match="n_genes"):
        CellFMConfig.from_dict({k: v for k, v in good.items() if k != "n_genes"})
    config = CellFMConfig.from_dict(good)
    with pytest.raises(CheckpointFormatError, match="gene_emb"):
        config.check_shapes({"gene_emb": (408, 32)})
    with pytest.raises(CheckpointFormatError, match="enc_nlayers"):
        config.check_shapes({"gene_emb": (408, 64), "encoder.0.attn.q_proj.weight": (64, 64)})


def test_config_from_released_shapes_defaults_heads():
    d = 1536
    shapes = {"gene_emb": (24080, d), "cls_token": (1, 1, d), "moment1.gene_emb": (24080, d)}
    shapes.update({f"encoder.{i}.attn.q_proj.weight": (d, d) for i in range(40)})
    config = config_from_shapes(shapes)
    assert (config["enc_nlayers"], config["enc_num_heads"], config["gene_rows"]) == (40, 48, 24080)
    assert not config["st_tokens"] and not config["add_zero"] and config["lora"] == 0
    shapes["encoder.0.attn.lora_q.A.weight"] = (8, d)
    assert config_from_shapes(shapes, n_heads=24)["lora"] == 8
    with pytest.raises(CheckpointFormatError, match="encoder"):
        config_from_shapes({"gene_emb": (16, 8), "encoder.1.attn.q_proj.weight": (8, 8)})


def test_save_load_round_trip_with_another_anndata(fx, expected, model, tmp_path):
    model.save(tmp_path / "saved", overwrite=True)
    adata = _adata(fx)[:20].copy()
    loaded = CellFM.load(tmp_path / "saved", adata=adata)
    assert loaded.config == model.config and list(loaded.vocabulary) == list(model.vocabulary)
    z = loaded.get_latent_representation(**QUIET)
    np.testing.assert_array_equal(z, model.get_latent_representation(indices=range(20), **QUIET))
    np.testing.assert_allclose(z, expected["cell_embeddings"][:20], atol=ATOL, rtol=0)


def test_cell_without_vocabulary_genes_is_finite(fx):
    adata = ad.read_h5ad(fx / "input.h5ad")
    adata.X = adata.X.toarray()
    adata.X[0] = 0
    CellFM.setup_anndata(adata)
    m = CellFM.from_pretrained(fx / "checkpoint", adata, n_heads=N_HEADS)
    z = m.get_latent_representation(indices=[0, 1], **QUIET)
    assert np.isfinite(z).all()


def test_no_vocabulary_overlap_is_refused(fx):
    adata = ad.AnnData(np.ones((3, 4), np.float32), var=pd.DataFrame(index=list("ABCD")))
    CellFM.setup_anndata(adata)
    with pytest.raises(GeneVocabularyError):
        CellFM.from_pretrained(fx / "checkpoint", adata, n_heads=N_HEADS)


def test_bf16_autocast_stays_close_to_float32(expected, model):
    with model.inference_precision("bf16"):
        z = model.get_latent_representation(**QUIET)
    ref = expected["cell_embeddings"]
    cos = (z * ref).sum(1) / np.linalg.norm(z, axis=1) / np.linalg.norm(ref, axis=1)
    assert np.isfinite(z).all() and cos.min() > 0.99
    assert np.abs(z - ref).max() > 1e-6  # autocast really ran in reduced precision


def test_module_input_is_the_model_gene_space(model):
    """The module holds nothing AnnData-specific: its one buffer is the release's gene order."""
    assert "token_order" not in model.module.state_dict()  # rebuilt from the gene list
    assert len(model.module.token_order) == len(model.vocabulary) == model.config.n_genes
    order = model.module.token_order.numpy()
    names = np.asarray(model.vocabulary)[order]
    assert list(names) == sorted(names)


def _reference_retention_layer(layer, x, key_mask):
    """The MindSpore ``RetentionLayer`` op by op: the 1/sqrt(h) on Q and K, 1/sqrt(n) on V,
    ``SRMSNorm`` as x / max(||x / sqrt(h)||, 1e-12), padded [B, L, d] tokens."""
    attn, b, length, d = layer.attn, *x.shape
    heads, h = attn.num_heads, attn.head_dims

    def split(t):
        return t.reshape(b, length, heads, h).permute(0, 2, 1, 3)

    q = torch.relu(split(attn.q_proj(x))) / h**0.5
    k = torch.relu(split(attn.k_proj(x))) * key_mask[:, None, :, None] / h**0.5
    v = split(attn.v_proj(x)) * torch.rsqrt(key_mask.sum(1))[:, None, None, None]
    o = q @ (k.transpose(-1, -2) @ v)
    o = o / torch.linalg.vector_norm(o / h**0.5, dim=-1, keepdim=True).clamp_min(1e-12)
    o = (o * torch.nn.functional.silu(split(attn.u_proj(x)))).permute(0, 2, 1, 3)
    x = layer.post_norm1(x * layer.alpha + attn.o_proj(o.reshape(b, length, d)))
    ffn = layer.ffn
    return layer.post_norm2(x * layer.alpha + ffn.o_proj(ffn.u_proj(x) * ffn.v_proj(x)))


@pytest.mark.parametrize("grad", [False, True])
def test_packed_retention_matches_the_reference_layer(grad):
    """Packed sequences (no padding), without the scales that the per-head norm cancels,
    in place (no autograd) or not, give the reference layer's padded outputs."""
    from scfm.nn import RetentionLayer

    torch.manual_seed(0)
    layer = RetentionLayer(64, 4, n_layers=2).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.2)  # LayerNorm weights too: a scale slip cannot hide
    lengths = [7, 1, 12]
    x = torch.randn(len(lengths), max(lengths), 64)
    key_mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).float()
    with torch.no_grad():
        expected = _reference_retention_layer(layer, x, key_mask)
    packed = torch.cat([x[i, :n] for i, n in enumerate(lengths)])
    with torch.set_grad_enabled(grad):
        got = layer(packed.clone(), lengths=lengths)
        padded = layer(x.clone(), key_mask=key_mask)
    for i, (row, n) in enumerate(zip(got.split(lengths), lengths, strict=True)):
        torch.testing.assert_close(row, expected[i, :n], atol=2e-6, rtol=0)
        torch.testing.assert_close(padded[i, :n], expected[i, :n], atol=2e-6, rtol=0)
    if grad:  # the out-of-place path keeps the autograd graph
        got.sum().backward()
        assert layer.attn.q_proj.weight.grad is not None


@pytest.mark.parametrize("grad", [False, True])
def test_first_token_only_gives_the_layer_at_cls(grad):
    """first_token_only (a CLS read): the layer's queries, output and GLU run for each packed
    sequence's first token, over every token as key and value; equal to the reference layer's
    first rows, in place or not."""
    from scfm.nn import RetentionLayer

    torch.manual_seed(1)
    layer = RetentionLayer(64, 4, n_layers=2).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.2)
    lengths = [7, 1, 12, 12]
    x = torch.randn(len(lengths), max(lengths), 64)
    key_mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).float()
    with torch.no_grad():
        expected = _reference_retention_layer(layer, x, key_mask)[:, 0]
    packed = torch.cat([x[i, :n] for i, n in enumerate(lengths)])
    with torch.set_grad_enabled(grad):
        got = layer(packed.clone(), lengths=lengths, first_token_only=True)
    assert got.shape == (len(lengths), 64)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="packed"):
        layer(x, key_mask=key_mask, first_token_only=True)


def test_cell_embeddings_alone_run_the_last_layer_for_cls(model):
    """The "latent" call asks for no token states: the layer read runs for CLS alone and gives
    the CLS state of the full forward; masking, a decoder or mean pooling still see genes."""
    kwargs = model._inference_kwargs("latent")
    assert kwargs["token_states"] is False and kwargs["pooling"] == "cls"
    x, depth, seeds = _module_inputs(model, model.adata, [0, 1, 2, 3])
    with torch.inference_mode():
        full = model.module.inference(x, depth, seeds, hidden_layer=-1)
        alone = model.module.inference(x, depth, seeds, **kwargs)
        mean = model.module.inference(x, depth, seeds, pooling="mean", token_states=False)
    assert alone.token_states is None and alone.token_genes is None
    torch.testing.assert_close(alone.cell_embedding, full.cell_embedding, atol=2e-6, rtol=0)
    assert mean.token_states is not None


def test_padding_is_never_encoded(model):
    """Cells are encoded packed: a cell's embedding is the same alone as beside a longer one,
    and padded token states are zero."""
    adata = model.adata
    n = np.asarray((adata.X > 0).sum(1)).ravel()
    short, long = int(n.argmin()), int(n.argmax())
    x, depth, seeds = _module_inputs(model, adata, [short, long])
    with torch.inference_mode():
        both = model.module.inference(x, depth, seeds)
        alone = model.module.inference(x[:1], depth[:1], seeds[:1])
    torch.testing.assert_close(both.cell_embedding[0], alone.cell_embedding[0], atol=1e-6, rtol=0)
    pad = both.token_genes[0] < 0
    assert pad.any() and both.token_states[0][pad].abs().max() == 0
