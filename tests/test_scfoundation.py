"""scFoundation: parity with the reference fixture, loader variants, tokeniser, API behaviour."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
import textwrap
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import scfm
from conftest import fixture_dir, needs_smaps, resident_bytes
from scfm.errors import (
    CheckpointFormatError,
    CheckpointKeyError,
    CheckpointNotFoundError,
    InvalidInputError,
    UnsafeCheckpointError,
)
from scfm.model import ScFoundation
from scfm.module import _scfoundation as sf_module
from scfm.module._scfoundation import ScFoundationConfig, _token_groups

ATOL = 1e-4
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fx():
    return fixture_dir("scfoundation")


@pytest.fixture(scope="module")
def expected(fx):
    return dict(np.load(fx / "expected.npz"))


def _adata(fx, **setup) -> ad.AnnData:
    adata = ad.read_h5ad(fx / "input.h5ad")
    ScFoundation.setup_anndata(adata, **setup)
    return adata


@pytest.fixture(scope="module")
def loaded(fx):
    adata = _adata(fx)
    return ScFoundation.from_pretrained(fx / "checkpoint", adata), adata


@pytest.fixture(scope="module")
def gene_model(fx):
    adata = _adata(fx)
    return ScFoundation.from_pretrained(fx / "checkpoint", adata, weights="gene"), adata


def _copy_release(fx, tmp_path, mutate=None, name="release"):
    """The fixture release in tmp_path, its 'cell' entry changed by ``mutate(entry)``."""
    ckpt = torch.load(fx / "checkpoint/models/models.ckpt", weights_only=True)
    ckpt = {k: {"config": copy.deepcopy(v["config"]), "state_dict": dict(v["state_dict"])}
            for k, v in ckpt.items()}  # fmt: skip
    if mutate is not None:
        mutate(ckpt)
    folder = tmp_path / name
    (folder / "models").mkdir(parents=True)
    torch.save(ckpt, folder / "models" / "models.ckpt")
    shutil.copy(fx / "checkpoint" / "OS_scRNA_gene_index.19264.tsv", folder)
    return folder


# ---------------------------------------------------------------- parity (public API)
@pytest.mark.parametrize(
    ("key", "weights", "options"),
    [
        ("cell_embeddings", "cell", {}),
        ("cell_embeddings_pool_max", "cell", {"pooling": "max"}),
        ("cell_embeddings_f1", "cell", {"tgthighres": "f1"}),
        ("cell_embeddings_rde_a5", "rde", {"tgthighres": "a5"}),
    ],
)
def test_cell_embeddings_match_reference(fx, loaded, expected, key, weights, options):
    model, adata = loaded
    if weights != "cell":
        model = ScFoundation.from_pretrained(fx / "checkpoint", adata, weights=weights)
    z = model.get_latent_representation(progress_bar=False, **options)
    np.testing.assert_allclose(z, expected[key], atol=ATOL, rtol=0)


def test_gene_embeddings_match_reference(gene_model, expected):
    model, _ = gene_model
    g = model.get_cell_gene_embeddings(indices=[0, 1, 2], batch_size=2, progress_bar=False)
    np.testing.assert_allclose(g, expected["gene_embeddings"], atol=ATOL, rtol=0)
    # the reference gene_batch mode: one batch, key max over the whole batch
    gb = model.get_cell_gene_embeddings(
        indices=[0, 1, 2], batch_size=3, key_max="batch", progress_bar=False
    )
    np.testing.assert_allclose(gb, expected["gene_embeddings_batch3"], atol=ATOL, rtol=0)
    assert np.abs(gb - g).max() > 1e-5  # the batch mode is not a no-op
    # gene embeddings: every gene's decoder state averaged over the cells
    frame = model.get_gene_embeddings(indices=[2, 0, 1], progress_bar=False)
    assert len(frame) == len(model.vocabulary) == 220
    np.testing.assert_allclose(
        frame.loc[list(expected["vocab_genes"])].to_numpy(),
        expected["gene_embeddings"].mean(0),
        atol=ATOL,
        rtol=0,
    )


def test_normalized_expression_matches_reference(gene_model, expected):
    model, adata = gene_model
    vocab = list(expected["vocab_genes"])
    r = model.get_normalized_expression(indices=range(5), gene_list=vocab, progress_bar=False)
    np.testing.assert_allclose(
        r.to_numpy(), expected["reconstructed_expression"], atol=ATOL, rtol=0
    )
    assert list(r.columns) == vocab and list(r.index) == list(adata.obs_names[:5])
    # default: the AnnData's matched genes, labelled by var_names
    own = model.get_normalized_expression(indices=[4, 1], progress_bar=False)
    align = model.gene_alignment
    assert list(own.columns) == list(adata.var_names[align.var_index])
    np.testing.assert_allclose(
        own.to_numpy(),
        expected["reconstructed_expression"][[4, 1]][:, align.vocab_index],
        atol=ATOL,
        rtol=0,
    )


def test_enhance_depth_writes_reference_outputs(fx, gene_model, expected):
    gene, _ = gene_model
    adata = _adata(fx)
    rde = ScFoundation.from_pretrained(fx / "checkpoint", adata, weights="rde")
    z = scfm.tl.enhance_depth(
        rde, adata, tgthighres="a5", expression_model=gene, key_added="X_enh", progress_bar=False
    )
    np.testing.assert_allclose(z, expected["cell_embeddings_rde_a5"], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(adata.obsm["X_enh"], z)
    assert adata.uns["scfm"]["obsm"]["X_enh"]["weights"] == "rde"
    assert adata.uns["scfm"]["layers"]["X_enh"]["weights"] == "gene"
    # expression at T = S + 5 with the 'gene' model, laid out along adata.var
    align = gene.gene_alignment
    recon = gene.get_normalized_expression(adata, tgthighres="a5", progress_bar=False)
    layer = adata.layers["X_enh"]
    np.testing.assert_allclose(layer[:, align.var_index], recon.to_numpy(), atol=1e-6, rtol=0)
    unmatched = np.setdiff1d(np.arange(adata.n_vars), align.var_index)
    assert len(unmatched) and np.isnan(layer[:, unmatched]).all()
    # t4 expression equals the fixture (first 5 cells)
    scfm.tl.enhance_depth(rde, adata, tgthighres="t4", expression_model=gene, progress_bar=False)
    got = adata.layers["X_scfoundation_enhanced"][:5, align.var_index]
    np.testing.assert_allclose(
        got, expected["reconstructed_expression"][:, align.vocab_index], atol=ATOL, rtol=0
    )
    with pytest.raises(InvalidInputError, match="does not raise"):
        scfm.tl.enhance_depth(rde, adata, tgthighres="f1")


def test_gears_embeddings_are_gene_model_at_observed_depth(loaded, gene_model):
    model, _ = gene_model
    genes = list(model.vocabulary[:7])
    out = scfm.tl.scfoundation_gears_embeddings(
        model, indices=[4, 2], genes=genes, progress_bar=False
    )
    assert out.shape == (2, 7, model.config.decoder_hidden_dim)
    ref = model.get_cell_gene_embeddings(
        indices=[4, 2], genes=genes, tgthighres="f1", progress_bar=False
    )
    np.testing.assert_allclose(out, ref, atol=1e-6, rtol=0)
    t4 = model.get_cell_gene_embeddings(indices=[4, 2], genes=genes, progress_bar=False)
    assert np.abs(out - t4).max() > 1e-4  # T = S really differs from the default t4
    with pytest.raises(InvalidInputError, match="weights='gene'"):
        scfm.tl.scfoundation_gears_embeddings(loaded[0], indices=[0])


# ---------------------------------------------------------------- tokeniser
def test_tokeniser_matches_reference_arrays(loaded, expected):
    model, adata = loaded
    x = torch.as_tensor(adata.X.toarray(), dtype=torch.float64)
    align = model.gene_alignment
    aligned = scfm.data.scfoundation_align_counts(
        x, torch.as_tensor(align.var_index), torch.as_tensor(align.vocab_index), 220
    )
    np.testing.assert_array_equal(aligned.numpy(), expected["aligned_counts"])
    values = scfm.data.scfoundation_preprocess(aligned, "F", "t4")
    np.testing.assert_allclose(values.numpy(), expected["model_input"], atol=ATOL, rtol=0)
    gathered, ids, padding = scfm.data.scfoundation_gather(values)
    lengths = (~padding).sum(1).numpy()
    np.testing.assert_array_equal(lengths, expected["encoder_lengths"])
    np.testing.assert_array_equal(ids[~padding].numpy(), expected["encoder_gene_ids"])
    np.testing.assert_allclose(
        gathered[~padding].numpy(), expected["encoder_values"], atol=ATOL, rtol=0
    )
    assert (gathered[padding] == 103).all() and (ids[padding] == 222).all()
    # encoder output of cell 0 inside a padded batch equals the reference's batch of one
    with torch.inference_mode():
        hidden, _, pad = model.module.encode(values[:9])
    np.testing.assert_allclose(
        hidden[0][~pad[0]].numpy(), expected["encoder_out_cell0"], atol=ATOL, rtol=0
    )


def test_preprocess_depth_tokens_and_input_kinds():
    counts = torch.tensor([[1.0, 0.0, 9.0], [0.0, 2.0, 0.0]])
    log_s = np.log10([10.0, 2.0])
    for spec, target in [("t4", [4.0, 4.0]), ("t4.5", [4.5, 4.5]), ("f1", log_s),
                         ("f5", np.log10([50.0, 10.0])), ("a5", log_s + 5)]:  # fmt: skip
        v = scfm.data.scfoundation_preprocess(counts, "F", spec)
        np.testing.assert_allclose(v[:, -2].numpy(), target, rtol=1e-6)
        np.testing.assert_allclose(v[:, -1].numpy(), log_s, rtol=1e-6)
    v = scfm.data.scfoundation_preprocess(counts, "F", "t4")
    np.testing.assert_allclose(v[0, :3].numpy(), np.log1p([1e3, 0.0, 9e3]), rtol=1e-6)
    # per-cell kinds (F, T, A) in one minibatch give each cell its own kind's input
    norm = v[:, :3]
    mixed = torch.stack([counts[0], norm[1], norm[0]])
    totals = torch.tensor([0.0, 0.0, 10.0])
    got = scfm.data.scfoundation_preprocess(mixed, torch.tensor([0, 1, 2]), "t4", totals)
    torch.testing.assert_close(got[0], v[0])
    torch.testing.assert_close(got[1, :3], norm[1])
    assert float(got[1, -1]) == pytest.approx(np.log10(float(norm[1].double().sum())))
    torch.testing.assert_close(got[2], v[0])
    for bad in ["4", "x4", "t", "t-1", ""]:
        with pytest.raises(InvalidInputError, match="tgthighres"):
            scfm.data.parse_tgthighres(bad)
    with pytest.raises(InvalidInputError, match="total_counts_key"):
        scfm.data.scfoundation_preprocess(counts, "A", "t4")


# ---------------------------------------------------------------- independence from batching
def test_batching_and_indices_do_not_change_results(loaded, expected):
    model, _ = loaded
    z1 = model.get_latent_representation(batch_size=1, progress_bar=False)
    z7 = model.get_latent_representation(batch_size=7, progress_bar=False)
    np.testing.assert_allclose(z1, z7, atol=1e-5, rtol=0)
    idx = [5, 0, 5, 33]
    zi = model.get_latent_representation(indices=idx, batch_size=3, progress_bar=False)
    np.testing.assert_allclose(zi, expected["cell_embeddings"][idx], atol=ATOL, rtol=0)


def _deep_cells(genes: list[str], n_deep: int, depth: int, n_shallow: int) -> ad.AnnData:
    """Raw counts: ``n_deep`` cells expressing ``depth`` genes, then shallow cells."""
    rng = np.random.default_rng(1)
    n = n_deep + n_shallow
    x = np.zeros((n, len(genes)), dtype=np.float32)
    for i in range(n):
        k = depth if i < n_deep else int(rng.integers(5, 40))
        x[i, rng.choice(len(genes), size=k, replace=False)] = rng.integers(1, 30, size=k)
    adata = ad.AnnData(sp.csr_matrix(x[rng.permutation(n)]))
    adata.var_names = genes
    ScFoundation.setup_anndata(adata)
    return adata


def test_cells_deeper_than_every_cap_do_not_depend_on_batch_mates():
    """Cells with more expressed genes than the packed encoder's token group (2,048 on CPU)
    and longer than a decoder chunk give the same outputs alone or in any minibatch."""
    genes = scfm.io.read_scfoundation_gene_list()
    adata = _deep_cells(genes, n_deep=3, depth=sf_module.MAX_GROUP_TOKENS["cpu"] + 300,
                        n_shallow=4)  # fmt: skip
    tiny = {"encoder_hidden_dim": 16, "encoder_depth": 1, "encoder_heads": 2,
            "decoder_hidden_dim": 8, "decoder_depth": 1, "decoder_heads": 2,
            "decoder_dim_head": 4, "bin_num": 4}  # fmt: skip
    model = ScFoundation(adata, config=tiny)
    assert model.module.config.seq_len > sf_module.MAX_DECODER_TOKENS["cpu"] / 2
    alone = model.get_latent_representation(batch_size=1, progress_bar=False)
    together = model.get_latent_representation(batch_size=7, progress_bar=False)
    order = [6, 2, 0, 5, 1, 3, 4]
    shuffled = model.get_latent_representation(indices=order, batch_size=3, progress_bar=False)
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)
    np.testing.assert_allclose(shuffled, alone[order], atol=1e-5, rtol=0)
    subset = list(genes[:50])
    e1 = model.get_normalized_expression(gene_list=subset, batch_size=1, progress_bar=False)
    e7 = model.get_normalized_expression(gene_list=subset, batch_size=7, progress_bar=False)
    np.testing.assert_allclose(e7.to_numpy(), e1.to_numpy(), atol=1e-5, rtol=0)
    g1 = model.get_cell_gene_embeddings(genes=subset, batch_size=1, progress_bar=False)
    g7 = model.get_cell_gene_embeddings(genes=subset, batch_size=7, progress_bar=False)
    np.testing.assert_allclose(g7, g1, atol=1e-5, rtol=0)


def test_packed_inference_equals_the_masked_padded_encoder(loaded, monkeypatch):
    """Inference packs cells (padding dropped, cells grouped by a token budget); training
    masks padded keys. Both give the same hidden states at real tokens, for any grouping."""
    model, adata = loaded
    module = model.module
    x = torch.as_tensor(adata.X[:6].toarray(), dtype=torch.float64)
    align = model.gene_alignment
    aligned = scfm.data.scfoundation_align_counts(
        x, torch.as_tensor(align.var_index), torch.as_tensor(align.vocab_index), 220
    )
    values = scfm.data.scfoundation_preprocess(aligned)
    with torch.no_grad():
        packed, _, padding = module.encode(values)
        assert padding.any()  # cells of different lengths: the minibatch is really padded
        masked_module = copy.deepcopy(module)
        masked_module.train()  # the masked path; dropout switched off below
        for sub in masked_module.modules():
            if isinstance(sub, torch.nn.Dropout):
                sub.p = 0.0
            elif isinstance(getattr(sub, "dropout", None), float):
                sub.dropout = 0.0
        masked, _, _ = masked_module.encode(values)
        valid = ~padding
        np.testing.assert_allclose(packed[valid], masked[valid], atol=1e-5, rtol=0)
        assert bool((packed[padding] == 0).all())
        for budget in (1, 10**9):  # every cell alone / the whole minibatch as one group
            monkeypatch.setitem(sf_module.MAX_GROUP_TOKENS, "cpu", budget)
            regrouped, _, _ = module.encode(values)
            np.testing.assert_allclose(regrouped, packed, atol=1e-5, rtol=0)
        # inference pools the packed rows cell by cell: the same as pooling the padded batch
        lengths = valid.sum(dim=1).tolist()
        for pooling in ("all", "max"):
            np.testing.assert_allclose(
                module.pool_packed(packed[valid], lengths, pooling),
                module.pool(packed, padding, pooling),
                atol=1e-6,
                rtol=0,
            )


def test_packed_pooling_of_a_cell_without_genes_matches_the_padded_pooling():
    hidden = torch.randn(1, 2, 4)  # only the T and S tokens
    padded = sf_module.ScFoundationModule.pool(hidden, torch.zeros(1, 2, dtype=bool), "all")
    packed = sf_module.ScFoundationModule.pool_packed(hidden[0], [2], "all")
    np.testing.assert_array_equal(packed.numpy(), padded.numpy())  # -inf max, NaN mean
    assert torch.isneginf(packed[0, 8:12]).all() and torch.isnan(packed[0, 12:]).all()


def test_decoder_chunks_do_not_change_results(gene_model, monkeypatch):
    model, _ = gene_model
    whole = model.get_normalized_expression(batch_size=9, progress_bar=False)
    monkeypatch.setitem(sf_module.MAX_DECODER_TOKENS, "cpu", 2 * 222)  # two cells a chunk
    chunked = model.get_normalized_expression(batch_size=9, progress_bar=False)
    np.testing.assert_allclose(chunked.to_numpy(), whole.to_numpy(), atol=1e-6, rtol=0)


def test_token_groups_cover_cells_in_order_within_the_budget():
    groups = list(_token_groups([5, 3, 10, 1, 1, 2], max_tokens=8))
    assert groups == [([5, 3], slice(0, 8)), ([10], slice(8, 18)), ([1, 1, 2], slice(18, 22))]
    assert list(_token_groups([], max_tokens=8)) == []


# ---------------------------------------------------------------- any AnnData
def test_query_with_other_genes_embeds_like_the_shared_genes(loaded, gene_model, fx):
    """Dropped genes, extra genes, shuffled columns: the same outputs as the original AnnData
    restricted to the shared genes."""
    model, adata = loaded
    rng = np.random.default_rng(3)
    keep = np.sort(rng.choice(adata.n_vars, size=150, replace=False))
    extra = rng.poisson(2.0, size=(adata.n_obs, 7)).astype(np.float32)
    x = sp.hstack([adata.X[:, keep], sp.csr_matrix(extra)]).tocsr()
    names = list(adata.var_names[keep]) + [f"NOT_A_GENE{i}" for i in range(7)]
    order = rng.permutation(len(names))
    query = ad.AnnData(x[:, order], obs=adata.obs[["cell_type"]].copy())
    query.var_names = [names[i] for i in order]
    ScFoundation.setup_anndata(query)
    shared = ad.AnnData(adata.X[:, keep], obs=adata.obs[["cell_type"]].copy())
    shared.var_names = adata.var_names[keep]
    ScFoundation.setup_anndata(shared)
    z_query = model.get_latent_representation(query, progress_bar=False)
    z_shared = model.get_latent_representation(shared, progress_bar=False)
    np.testing.assert_allclose(z_query, z_shared, atol=1e-5, rtol=0)
    assert np.abs(z_shared - model.get_latent_representation(progress_bar=False)).max() > 1e-3
    gene, _ = gene_model
    genes = list(gene.vocabulary[:30])
    e_query = gene.get_normalized_expression(query, gene_list=genes, progress_bar=False)
    e_shared = gene.get_normalized_expression(shared, gene_list=genes, progress_bar=False)
    np.testing.assert_allclose(e_query.to_numpy(), e_shared.to_numpy(), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- options and errors
def test_options_are_validated_before_work(loaded):
    model, _ = loaded
    with pytest.raises(InvalidInputError, match="tgthighres"):
        model.get_latent_representation(tgthighres="q4")
    with pytest.raises(InvalidInputError, match="pooling"):
        model.get_latent_representation(pooling="mean")
    with pytest.raises(InvalidInputError, match="pool_type"):
        model.get_latent_representation(pool_type="max")  # the old name is gone
    with pytest.raises(InvalidInputError, match="key_max"):
        model.get_cell_gene_embeddings(indices=[0], key_max="global")
    with pytest.raises(InvalidInputError, match="not in the scFoundation gene list"):
        model.get_cell_gene_embeddings(indices=[0], genes=["NOT_A_GENE"])
    with pytest.raises(InvalidInputError, match=r"from_pretrained\(path, adata, weights='rde'\)"):
        model.get_latent_representation(weights="rde")
    z = model.get_latent_representation(indices=[0], weights="cell", progress_bar=False)
    assert z.shape == (1, 128)


def test_only_the_requested_weights_are_loaded(fx, tmp_path):
    adata = _adata(fx)
    ckpt = torch.load(fx / "checkpoint/models/models.ckpt", weights_only=True)
    for name in ("cell", "rde", "gene"):
        model = ScFoundation.from_pretrained(fx / "checkpoint", adata, weights=name)
        assert model.weights == name
        state = model.module.state_dict()
        for key, value in ckpt[name]["state_dict"].items():
            torch.testing.assert_close(state[key.removeprefix("model.")], value)
        # nothing else on the model holds tensors (no copies of the other releases)
        held = [k for k, v in vars(model).items() if _holds_tensors(v)]
        assert held == []
    with pytest.raises(InvalidInputError, match="weights"):
        ScFoundation.from_pretrained(fx / "checkpoint", adata, weights="cells")


def test_release_without_the_redraw_counter_loads(fx, expected, tmp_path):
    """The module is built on the meta device: a buffer the release may lack (the Performer's
    redraw counter) must still become a real tensor, at its initial zero."""
    key = "model.decoder.performer.calls_since_last_redraw"
    folder = _copy_release(fx, tmp_path, lambda ckpt: ckpt["gene"]["state_dict"].pop(key))
    adata = _adata(fx)
    model = ScFoundation.from_pretrained(folder, adata, weights="gene")
    counter = model.module.decoder.performer.calls_since_last_redraw
    assert not counter.is_meta and int(counter) == 0
    assert not any(t.is_meta for t in model.module.state_dict().values())
    r = model.get_normalized_expression(
        indices=range(5), gene_list=list(expected["vocab_genes"]), progress_bar=False
    )
    np.testing.assert_allclose(
        r.to_numpy(), expected["reconstructed_expression"], atol=ATOL, rtol=0
    )


def test_missing_buffers_start_at_zero_and_missing_weights_are_refused():
    """After loading onto a module built on the meta device, a buffer the release lacks
    gets its initial zeros; a weight it lacks (an untrained head) is refused."""
    config = ScFoundationConfig(seq_len=12, encoder_hidden_dim=8, encoder_depth=1,
                                encoder_heads=2, decoder_hidden_dim=8, decoder_depth=1,
                                decoder_heads=2, decoder_dim_head=4, bin_num=4)  # fmt: skip
    state = sf_module.ScFoundationModule(config).state_dict()
    counter = "decoder.performer.calls_since_last_redraw"
    without = {k: v for k, v in state.items() if k != counter}
    with torch.device("meta"):
        module = sf_module.ScFoundationModule(config)
    module.load_state_dict(without, strict=False, assign=True)
    module.materialize_missing_buffers()
    assert not any(t.is_meta for t in module.state_dict().values())
    assert int(module.get_buffer(counter)) == 0
    with torch.device("meta"):
        module = sf_module.ScFoundationModule(config, n_labels=3)
    module.load_state_dict(without, strict=False, assign=True)
    with pytest.raises(CheckpointFormatError, match=r"did not provide 'classifier\.0\.weight'"):
        module.materialize_missing_buffers()


def test_legacy_format_release_is_read_whole(fx, expected, tmp_path):
    """A models.ckpt in torch's legacy (non-zip) format cannot be memory-mapped: it is read."""
    ckpt = torch.load(fx / "checkpoint/models/models.ckpt", weights_only=True)
    folder = tmp_path / "legacy"
    (folder / "models").mkdir(parents=True)
    torch.save(ckpt, folder / "models" / "models.ckpt", _use_new_zipfile_serialization=False)
    shutil.copy(fx / "checkpoint" / "OS_scRNA_gene_index.19264.tsv", folder)
    model = ScFoundation.from_pretrained(folder, _adata(fx))
    z = model.get_latent_representation(progress_bar=False)
    np.testing.assert_allclose(z, expected["cell_embeddings"], atol=ATOL, rtol=0)
    # read whole, it is checked whole: a NaN in the decoder is still refused
    ckpt["cell"]["state_dict"]["model.decoder.norm.weight"][0] = float("nan")
    torch.save(ckpt, folder / "models" / "models.ckpt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointFormatError, match=r"NaN or infinite values in decoder\.norm"):
        ScFoundation.from_pretrained(folder, _adata(fx))


def test_loading_one_weight_set_holds_it_once(fx, tmp_path):
    """models.ckpt holds three models: loading one must neither read the other two nor hold
    a second copy of it (a module initialised at random, then overwritten). The rise of the
    peak RSS of a fresh process over loading stays well below two weight sets."""
    folder = tmp_path / "release"
    (folder / "models").mkdir(parents=True)
    shutil.copy(fx / "checkpoint" / "OS_scRNA_gene_index.19264.tsv", folder)
    tiny = torch.load(fx / "checkpoint/models/models.ckpt", weights_only=True)
    config = copy.deepcopy(tiny["cell"]["config"])
    arch = config["model_config"]["mae_autobin"]
    arch["encoder"].update(hidden_dim=512, depth=8, heads=8, dim_head=64)
    flat = scfm.io._scfoundation.flatten_scfoundation_config(config)
    release, set_bytes = {}, 0
    for i, name in enumerate(("cell", "rde", "gene")):
        torch.manual_seed(i)
        module = sf_module.ScFoundationModule(ScFoundationConfig.from_reference(flat))
        state = {"model." + k: v for k, v in module.state_dict().items()}
        set_bytes = sum(v.numel() * v.element_size() for v in state.values())
        release[name] = {"config": copy.deepcopy(config), "state_dict": state}
    torch.save(release, folder / "models" / "models.ckpt")
    del release, module, state
    assert set_bytes > 80e6  # large against the noise of the measurement
    script = textwrap.dedent(
        f"""
        import anndata as ad, torch
        from scfm.model import ScFoundation

        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024

        torch.set_num_threads(1)
        adata = ad.read_h5ad({str(fx / "input.h5ad")!r})
        ScFoundation.setup_anndata(adata)
        before = status("VmRSS:")
        model = ScFoundation.from_pretrained({str(folder)!r}, adata, weights="rde")
        print(status("VmHWM:") - before)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    rise = int(proc.stdout.strip().splitlines()[-1])
    # reading the whole file would add 3 sets, a random module then a copy of it 2 sets
    assert rise < 1.5 * set_bytes, (rise, set_bytes)


def _holds_tensors(value) -> bool:
    if torch.is_tensor(value):
        return True
    return isinstance(value, dict) and any(torch.is_tensor(v) for v in value.values())


def _x_only_outside_vocabulary(fx, rows) -> ad.AnnData:
    adata = ad.read_h5ad(fx / "input.h5ad")
    x = adata.X.toarray()
    vocab = set(np.load(fx / "expected.npz")["vocab_genes"])
    in_vocab = np.array([g in vocab for g in adata.var_names])
    for row in rows:
        x[row, in_vocab] = 0
        x[row, np.flatnonzero(~in_vocab)[0]] += 1  # counts only outside the gene list
    adata.X = sp.csr_matrix(x)
    return adata


def test_cell_without_counts_in_the_gene_list_names_the_cause(fx):
    adata = _x_only_outside_vocabulary(fx, [0])
    ScFoundation.setup_anndata(adata)
    model = ScFoundation.from_pretrained(fx / "checkpoint", adata)
    with pytest.raises(InvalidInputError, match=r"1 of \d+ cells .*total count <= 1"):
        model.get_latent_representation(batch_size=16, progress_bar=False)
    z = model.get_latent_representation(indices=range(1, 60), progress_bar=False)
    assert np.isfinite(z).all()
    # every cell of a minibatch without matched counts: the genes did not match
    with pytest.raises(InvalidInputError, match=r"did not match.*HGNC gene symbols"):
        model.get_latent_representation(indices=[0], progress_bar=False)


def test_pre_normalized_a_equals_counts_and_t_sums_values(fx, expected):
    counts = ad.read_h5ad(fx / "input.h5ad")
    x = counts.X.toarray().astype(np.float64)
    vocab = set(expected["vocab_genes"])
    in_vocab = np.array([g in vocab for g in counts.var_names])
    total = x[:, in_vocab].sum(1)
    norm = ad.AnnData(
        np.log1p(x / total[:, None] * 1e4).astype(np.float32), obs=counts.obs.copy(),
        var=counts.var.copy(),
    )  # fmt: skip
    norm.obs["n_counts"] = total
    ScFoundation.setup_anndata(norm, pre_normalized="A", total_counts_key="n_counts")
    model = ScFoundation.from_pretrained(fx / "checkpoint", norm)
    z = model.get_latent_representation(progress_bar=False)
    np.testing.assert_allclose(z, expected["cell_embeddings"], atol=ATOL, rtol=0)
    # "T": the sum of the given values is used as total count (reference behaviour)
    norm_t = norm.copy()
    ScFoundation.setup_anndata(norm_t, pre_normalized="T")
    z_t = model.get_latent_representation(norm_t, indices=[0, 1], progress_bar=False)
    values = torch.as_tensor(expected["model_input"][:2, :220])
    t_input = scfm.data.scfoundation_preprocess(values, "T", "t4")
    s_t = np.log10(values.sum(1).numpy())
    np.testing.assert_allclose(t_input[:, -1].numpy(), s_t, rtol=1e-6)
    with torch.inference_mode():
        ref = model.module.inference(values.float(), input_kind=torch.tensor([1, 1]))
    np.testing.assert_allclose(z_t, ref.cell_embedding.numpy(), atol=1e-5, rtol=0)
    assert np.abs(z_t - z[:2]).max() > 1e-3
    with pytest.raises(InvalidInputError, match="total_counts_key"):
        ScFoundation.setup_anndata(norm, pre_normalized="A")
    with pytest.raises(InvalidInputError, match="pre_normalized"):
        ScFoundation.setup_anndata(norm, pre_normalized="X")


# ---------------------------------------------------------------- loader variants
def test_checkpoint_file_and_flat_layouts(fx, expected, tmp_path):
    adata = _adata(fx)
    # the checkpoint file itself (gene list found in the parent folder)
    model = ScFoundation.from_pretrained(fx / "checkpoint" / "models" / "models.ckpt", adata)
    z = model.get_latent_representation(progress_bar=False)
    np.testing.assert_allclose(z, expected["cell_embeddings"], atol=ATOL, rtol=0)
    # folder holding models.ckpt directly, config already flattened, weights="rde"
    ckpt = torch.load(fx / "checkpoint/models/models.ckpt", weights_only=True)
    for entry in ckpt.values():
        entry["config"] = scfm.io._scfoundation.flatten_scfoundation_config(entry["config"])
    flat = tmp_path / "flat"
    flat.mkdir()
    torch.save(ckpt, flat / "models.ckpt")
    shutil.copy(fx / "checkpoint" / "OS_scRNA_gene_index.19264.tsv", flat)
    model = ScFoundation.from_pretrained(flat, adata, weights="rde")
    z = model.get_latent_representation(tgthighres="a5", progress_bar=False)
    np.testing.assert_allclose(z, expected["cell_embeddings_rde_a5"], atol=ATOL, rtol=0)


def test_loader_errors(fx, tmp_path):
    adata = _adata(fx)
    ckpt = torch.load(fx / "checkpoint/models/models.ckpt", weights_only=True)

    def swap(c):
        sd = c["cell"]["state_dict"]
        sd["model.extra.weight"] = sd.pop("model.to_final.bias")

    with pytest.raises(CheckpointNotFoundError, match=r"models\.ckpt"):
        ScFoundation.from_pretrained(tmp_path, adata)
    # a missing and an unexpected key are both reported
    with pytest.raises(CheckpointKeyError, match=r"to_final\.bias[\s\S]*extra\.weight"):
        ScFoundation.from_pretrained(_copy_release(fx, tmp_path, swap, "keys"), adata)
    with pytest.raises(CheckpointFormatError, match="'cell', 'rde', 'gene'"):
        ScFoundation.from_pretrained(
            _copy_release(fx, tmp_path, lambda c: c.clear() or c.update(state_dict={}), "other"),
            adata,
        )
    cell_only = _copy_release(fx, tmp_path, lambda c: (c.pop("rde"), c.pop("gene")), "cell")
    with pytest.raises(CheckpointFormatError, match="no 'gene' model"):
        ScFoundation.from_pretrained(cell_only, adata, weights="gene")
    ScFoundation.from_pretrained(cell_only, adata)  # the other two are not needed
    # without the tiny gene list the shipped 19,264-gene list does not fit the tiny model
    nolist = tmp_path / "nolist"
    nolist.mkdir()
    shutil.copy(fx / "checkpoint/models/models.ckpt", nolist)
    with pytest.raises(CheckpointFormatError, match="19264"):
        ScFoundation.from_pretrained(nolist, adata)
    del ckpt


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda e: e["config"]["model_config"]["mae_autobin"]["encoder"].update(depth="12"),
         "'encoder.depth' must be an integer"),
        (lambda e: e["config"]["model_config"]["mae_autobin"]["encoder"].update(depth=10**6),
         "'encoder.depth' = 1000000 is outside"),
        (lambda e: e["config"]["model_config"]["mae_autobin"]["decoder"].update(depth=1e9),
         "'decoder.depth' = 1000000000 is outside"),
        (lambda e: e["config"]["model_config"]["mae_autobin"]["encoder"].update(heads=5),
         "encoder.heads = 5 does not divide"),
        (lambda e: e["config"]["model_config"]["mae_autobin"]["encoder"].pop("hidden_dim"),
         "lacks the key 'encoder.hidden_dim'"),
        (lambda e: e["config"]["model_config"]["mae_autobin"].update(seq_len=-5),
         "'seq_len' = -5 is outside"),
        (lambda e: e["config"]["dataset_config"]["rnaseq"].update(bin_num=12),
         r"token_emb\.emb\.weight has shape \(16, 32\) but the config implies \(12, 32\)"),
        (lambda e: e["config"]["model_config"]["mae_autobin"]["encoder"].update(depth=3),
         "encoder.depth = 3 but the weights hold 2 layers"),
        (lambda e: e["config"]["dataset_config"].update(rnaseq=[1]), "'rnaseq'.* not a dict"),
        (lambda e: e["config"]["dataset_config"]["rnaseq"].update(value_mask_prob="x"),
         "'value_mask_prob' must be a finite number"),
        (lambda e: e["state_dict"]["model.pos_emb.weight"].__setitem__((0, 0), float("nan")),
         r"NaN or infinite values in pos_emb\.weight"),
    ],
)  # fmt: skip
def test_malformed_configs_fail_fast_with_the_key(fx, tmp_path, mutate, match):
    adata = _adata(fx)

    def apply(c):
        c["cell"]["state_dict"] = {k: v.clone() for k, v in c["cell"]["state_dict"].items()}
        mutate(c["cell"])

    folder = _copy_release(fx, tmp_path, apply)
    start = time.perf_counter()
    with pytest.raises(CheckpointFormatError, match=match):
        ScFoundation.from_pretrained(folder, adata)
    assert time.perf_counter() - start < 1.0
    assert "scfm" not in adata.uns or "gene_alignment" not in adata.uns["scfm"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("gene_name\tindex\nTP53\t0\nTP53\t1\n", "repeated genes"),
        ("gene_name\tindex\nTP53\t0\nCD3E\t0\n", "not a permutation"),
        ("gene_name\tindex\nTP53\t0\nCD3E\tx\n", "not a permutation"),
        ("gene\tid\nTP53\t0\n", "'gene_name' and 'index' are expected"),
        ("gene_name\tindex\n\t0\nCD3E\t1\n", "empty gene names"),
    ],
)
def test_corrupt_gene_lists_are_refused(tmp_path, text, match):
    path = tmp_path / "OS_scRNA_gene_index.19264.tsv"
    path.write_text(text)
    with pytest.raises(CheckpointFormatError, match=match):
        scfm.io.read_scfoundation_gene_list(path)


def test_pickled_objects_need_consent(fx, expected, tmp_path):
    import argparse

    adata = _adata(fx)

    def add_object(c):
        c["cell"]["hyper_parameters"] = argparse.Namespace(lr=1e-4)  # a non-tensor object

    folder = _copy_release(fx, tmp_path, add_object)
    with pytest.raises(UnsafeCheckpointError, match="trust_checkpoint=True"):
        ScFoundation.from_pretrained(folder, adata)
    model = ScFoundation.from_pretrained(folder, adata, trust_checkpoint=True)
    z = model.get_latent_representation(progress_bar=False)
    np.testing.assert_allclose(z, expected["cell_embeddings"], atol=ATOL, rtol=0)


def test_projection_matrices_come_from_the_file(loaded, fx):
    model, _ = loaded
    module = copy.deepcopy(model.module)
    ckpt = torch.load(fx / "checkpoint/models/models.ckpt", weights_only=True)
    key = "decoder.performer.net.layers.1.0.fn.fast_attention.projection_matrix"
    torch.testing.assert_close(module.state_dict()[key], ckpt["cell"]["state_dict"]["model." + key])
    module.train()
    module.inference(torch.rand(2, 220) * 5)  # a training-mode forward never redraws
    torch.testing.assert_close(module.state_dict()[key], ckpt["cell"]["state_dict"]["model." + key])


def test_save_load_round_trip(loaded, expected, tmp_path):
    model, adata = loaded
    model.save(tmp_path / "m", overwrite=True)
    again = ScFoundation.load(tmp_path / "m", adata=adata)
    z = again.get_latent_representation(progress_bar=False)
    np.testing.assert_array_equal(z, model.get_latent_representation(progress_bar=False))
    np.testing.assert_allclose(z, expected["cell_embeddings"], atol=ATOL, rtol=0)
    assert list(again.vocabulary) == list(model.vocabulary) and again.weights == "cell"
    assert again.config == model.config


def test_random_init_uses_shipped_gene_list():
    rng = np.random.default_rng(0)
    adata = ad.AnnData(
        rng.poisson(1.0, (6, 60)).astype(np.float32) + 1,
        var=pd.DataFrame(index=[f"g{i}" for i in range(60)]),
    )
    shipped = scfm.io.read_scfoundation_gene_list()
    adata.var["sym"] = [*shipped[:59], "NOT_A_GENE"]
    ScFoundation.setup_anndata(adata, gene_id_key="sym")
    config = {"encoder_hidden_dim": 16, "encoder_depth": 1, "encoder_heads": 2,
              "decoder_hidden_dim": 8, "decoder_depth": 1, "decoder_heads": 2,
              "decoder_dim_head": 4, "bin_num": 4}  # fmt: skip
    model = ScFoundation(adata, config=config)
    assert len(model.vocabulary) == 19264 and model.gene_alignment.n_matched == 59
    assert model.weights is None
    z = model.get_latent_representation(progress_bar=False)
    assert z.shape == (6, 64) and np.isfinite(z).all()
    with pytest.raises(InvalidInputError, match="Unknown scFoundation config fields"):
        ScFoundation(adata, config={"pool_type": "all"})


def test_symbols_are_read_from_var_gene_name_like_the_reference(fx, expected):
    adata = ad.read_h5ad(fx / "input.h5ad")
    adata.var["gene_name"] = adata.var_names
    adata.var_names = [f"id{i}" for i in range(adata.n_vars)]
    ScFoundation.setup_anndata(adata)
    model = ScFoundation.from_pretrained(fx / "checkpoint", adata)
    assert model.gene_alignment.n_matched == 180
    z = model.get_latent_representation(progress_bar=False)
    np.testing.assert_allclose(z, expected["cell_embeddings"], atol=ATOL, rtol=0)


def test_config_round_trips_and_validates():
    config = ScFoundationConfig(seq_len=30, encoder_hidden_dim=8, encoder_heads=2)
    assert ScFoundationConfig(**config.to_dict()) == config
    with pytest.raises(CheckpointFormatError, match=r"'encoder\.heads'"):
        ScFoundationConfig(encoder_heads=0).validate()
    with pytest.raises(CheckpointFormatError, match=r"'replace_prob' = 2\.0 is not a probability"):
        ScFoundationConfig(replace_prob=2.0).validate()


@needs_smaps
def test_cell_embeddings_leave_the_decoder_out_of_memory(fx, tmp_path):
    """The chosen weight set is checked a window at a time and stays mapped: embedding cells
    never reads the decoder, so its pages are not resident; it is read when asked for."""
    folder = tmp_path / "release"
    (folder / "models").mkdir(parents=True)
    shutil.copy(fx / "checkpoint" / "OS_scRNA_gene_index.19264.tsv", folder)
    config = copy.deepcopy(
        torch.load(fx / "checkpoint/models/models.ckpt", weights_only=True)["cell"]["config"]
    )
    decoder = config["model_config"]["mae_autobin"]["decoder"]
    decoder.update(hidden_dim=256, depth=2, heads=4, dim_head=64)
    flat = scfm.io._scfoundation.flatten_scfoundation_config(config)
    module = sf_module.ScFoundationModule(ScFoundationConfig.from_reference(flat))
    state = {"model." + k: v for k, v in module.state_dict().items()}
    decoder_bytes = sum(v.nbytes for k, v in state.items() if k.startswith("model.decoder."))
    assert decoder_bytes > 4e6  # far above page granularity
    ckpt = folder / "models" / "models.ckpt"
    torch.save({"cell": {"config": config, "state_dict": state}}, ckpt)
    model = ScFoundation.from_pretrained(folder, _adata(fx))
    assert np.isfinite(model.get_latent_representation(progress_bar=False)).all()
    assert resident_bytes(ckpt) < ckpt.stat().st_size - decoder_bytes / 2
    expression = model.get_normalized_expression(indices=range(3), progress_bar=False)
    assert np.isfinite(expression.to_numpy()).all()  # the decoder is read when needed
