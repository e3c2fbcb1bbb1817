"""In-silico perturbation with Geneformer (scfm.tl.in_silico_perturbation, scfm.pl)."""

from __future__ import annotations

import anndata as ad
import matplotlib
import numpy as np
import pytest
import torch

import scfm
from conftest import fixture_dir
from scfm.errors import GeneVocabularyError, InvalidInputError
from scfm.model import Geneformer
from scfm.tl import perturb_tokens

matplotlib.use("Agg")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def loaded():
    path = fixture_dir("geneformer")
    adata = ad.read_h5ad(path / "input.h5ad")
    Geneformer.setup_anndata(adata)
    return Geneformer.from_pretrained(path / "checkpoint", adata), adata


def test_perturb_tokens_rules():
    genes = [10, 11, 12, 13, 14, 15, 16, 17]
    assert perturb_tokens(genes, {12, 15}, "delete", max_genes=8) == [10, 11, 13, 14, 16, 17]
    assert perturb_tokens(genes, {99}, "delete", max_genes=8) is None
    # overexpress: to the front; absent genes are inserted and the encoding truncated
    assert perturb_tokens(genes, {15}, "overexpress", max_genes=8) == [
        15,
        10,
        11,
        12,
        13,
        14,
        16,
        17,
    ]
    assert perturb_tokens(genes, {99}, "overexpress", max_genes=8) == [99, *genes[:7]]
    # inhibit / activate: one quartile (2 of 8 positions) down / up
    assert perturb_tokens(genes, {11}, "inhibit", max_genes=8) == [10, 12, 13, 11, 14, 15, 16, 17]
    assert perturb_tokens(genes, {16}, "activate", max_genes=8) == [10, 11, 12, 13, 16, 14, 15, 17]
    assert perturb_tokens(genes, {16}, "inhibit", max_genes=8, rank_shift=3)[-1] == 16


def _manual_delete(model, cell, token):
    """Embeddings of one cell with and without ``token``, straight through the module."""
    m = model.module
    ids, lengths = model.get_tokens(indices=[cell])
    row = ids[0, : lengths[0]]
    new = row[row != token]
    o = torch.tensor(row)[None]
    p = torch.tensor(new)[None]
    with torch.inference_mode():
        ho, _ = m.encode(o, torch.tensor([len(row)]), -2)
        hp, _ = m.encode(p, torch.tensor([len(new)]), -2)
    return row, new, ho[0], hp[0]


def test_delete_matches_manual_computation(loaded):
    model, adata = loaded
    ids, lengths = model.get_tokens()
    token = int(ids[0, 3])  # a gene ranked 3rd in cell 0
    gene = model._vocab_names()[token]
    expressed = np.array([token in ids[i, : lengths[i]] for i in range(adata.n_obs)])
    assert 0 < expressed.sum() < adata.n_obs
    table = scfm.tl.in_silico_perturbation(
        model, adata, gene, "delete", key_added="isp", progress_bar=False
    )
    cos = adata.obs["isp"].to_numpy()
    assert np.isnan(cos[~expressed]).all() and np.isfinite(cos[expressed]).all()
    row, new, ho, hp = _manual_delete(model, 0, token)
    expected = torch.nn.functional.cosine_similarity(hp[0], ho[0], dim=0).item()  # V2: <cls>
    np.testing.assert_allclose(cos[0], expected, atol=1e-5)
    assert gene not in table.index and "<cls>" not in table.index
    # gene shift of one cell: the top gene of cell 0 compared across contexts
    single = scfm.tl.in_silico_perturbation(
        model, adata, gene, "delete", indices=[0], key_added="isp0", progress_bar=False
    )
    other = int(row[1])
    j_new = int(np.flatnonzero(new == other)[0])
    ref = torch.nn.functional.cosine_similarity(hp[j_new], ho[1], dim=0).item()
    name = model._vocab_names()[other]
    np.testing.assert_allclose(single.loc[name, "mean_cosine"], ref, atol=1e-5)
    assert single.loc[name, "n_cells"] == 1
    assert (np.diff(single["shift"].to_numpy()) <= 0).all()
    assert adata.uns["scfm"]["obs"]["isp0"]["perturb_type"] == "delete"


def test_overexpress_all_cells_and_plot(loaded):
    model, adata = loaded
    gene = "ENSG00000026103"  # FAS, in the fixture vocabulary
    table = scfm.tl.in_silico_perturbation(
        model, adata, [gene], "overexpress", key_added="ox", progress_bar=False
    )
    cos = adata.obs["ox"].to_numpy()
    assert np.isfinite(cos).all() and (cos < 1.0 + 1e-6).all() and (cos.min() < 0.9999)
    assert len(table) > 100 and (table["n_cells"] > 0).all()
    ax = scfm.pl.perturbation_shifts(adata, "ox", n_top=5, gene_symbols="gene_symbols")
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(labels) == 5 and all(not s.startswith("ENSG") for s in labels)
    ax = scfm.pl.perturbation_shifts(adata, "ox", n_top=5, gene_symbols="gencode")
    top = adata.uns["ox"].sort_values("shift", ascending=False).index[:5]
    symbols = scfm.data.map_gene_ids(top, to="symbol")
    expected = {s if isinstance(s, str) else g for g, s in symbols.items()}
    assert {t.get_text() for t in ax.get_yticklabels()} == expected


def test_symbols_and_errors(loaded):
    model, adata = loaded
    scfm.tl.in_silico_perturbation(
        model, adata, "FAS", "inhibit", indices=[0, 1, 2], key_added="fas", progress_bar=False
    )
    assert adata.obs["fas"].notna().sum() <= 3
    with pytest.raises(GeneVocabularyError, match="NOTAGENE"):
        scfm.tl.in_silico_perturbation(model, adata, "NOTAGENE", progress_bar=False)
    with pytest.raises(InvalidInputError, match="perturb_type"):
        scfm.tl.in_silico_perturbation(model, adata, "FAS", "knockout", progress_bar=False)


def test_goal_state_shift_matches_manual_computation(loaded):
    model, adata = loaded
    states = {
        "state_key": "cell_type",
        "start_state": "B cell",
        "goal_state": "T cell",
        "alt_states": ["monocyte"],
    }
    ids, _ = model.get_tokens()
    token = int(ids[0, 3])  # cell 0 is a B cell
    assert adata.obs["cell_type"].iloc[0] == "B cell"
    before = adata.obs.copy()
    scfm.tl.in_silico_perturbation(
        model,
        adata,
        model._vocab_names()[token],
        "delete",
        cell_states_to_model=states,
        key_added="treat",
        progress_bar=False,
    )
    shift = adata.obs["treat_goal_shift"].to_numpy()
    is_b = (adata.obs["cell_type"] == "B cell").to_numpy()
    assert np.isnan(shift[~is_b]).all() and np.isfinite(shift[0])
    # independent: goal embedding = mean <cls> state of the T cells, cell 0 with / without gene
    t_cells = np.flatnonzero((adata.obs["cell_type"] == "T cell").to_numpy())
    goal = torch.as_tensor(model.get_latent_representation(indices=t_cells, progress_bar=False))
    goal = goal.mean(0)
    _, _, ho, hp = _manual_delete(model, 0, token)
    cos = torch.nn.functional.cosine_similarity
    expected = (cos(hp[0], goal, dim=0) - cos(ho[0], goal, dim=0)).item()
    assert abs(expected) > 1e-4  # large enough that a sign or state mix-up would show
    np.testing.assert_allclose(shift[0], expected, atol=1e-5)
    summary = adata.uns["treat_state_shifts"]
    assert list(summary.index) == ["T cell", "monocyte"]
    assert list(summary["role"]) == ["goal", "alt"]
    np.testing.assert_allclose(summary.loc["T cell", "mean_shift"], np.nanmean(shift), atol=1e-6)
    assert summary.loc["T cell", "n_cells"] == np.isfinite(shift).sum()
    new = {"treat", "treat_goal_shift"}
    assert set(adata.obs.columns) == set(before.columns) | new
    # bad specifications fail before any forward pass, naming the problem
    with pytest.raises(scfm.errors.AnnDataKeyError, match="disease"):
        scfm.tl.in_silico_perturbation(
            model, adata, "FAS", cell_states_to_model={**states, "state_key": "disease"}
        )
    with pytest.raises(InvalidInputError, match="no cells"):
        scfm.tl.in_silico_perturbation(
            model, adata, "FAS", cell_states_to_model={**states, "goal_state": "neuron"}
        )
    with pytest.raises(InvalidInputError, match="goal_state"):
        scfm.tl.in_silico_perturbation(model, adata, "FAS", cell_states_to_model={"state_key": "x"})
