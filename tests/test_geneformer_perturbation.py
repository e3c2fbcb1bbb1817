"""In silico perturbation API: streaming / resuming, options, statistics helpers, plots."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
from scipy import stats

import scfm
import scfm.tl._perturbation as isp
from conftest import fixture_dir
from scfm.errors import AnnDataKeyError, InvalidInputError
from scfm.model import Geneformer
from scfm.tl import perturb_tokens
from scfm.tl._perturbation_backends import CellResult, RankEncoder
from scfm.tl._perturbation_stats import benjamini_hochberg, ranksums_in_pool

matplotlib.use("Agg")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DATA = Path(__file__).parent / "data"
STATES = {"state_key": "disease", "start_state": "dcm", "goal_state": "nf", "alt_states": ["hcm"]}


@pytest.fixture(scope="module")
def loaded():
    path = fixture_dir("geneformer_isp")
    adata = ad.read_h5ad(path / "input.h5ad")
    Geneformer.setup_anndata(adata)
    return Geneformer.from_pretrained(path / "checkpoint", adata), adata


def test_perturb_tokens_rules():
    genes = [10, 11, 12, 13, 14, 15, 16, 17]
    assert perturb_tokens(genes, {12, 15}, "delete", max_genes=8) == [10, 11, 13, 14, 16, 17]
    assert perturb_tokens(genes, {99}, "delete", max_genes=8) is None
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
    assert perturb_tokens(genes, {11}, "inhibit", max_genes=8) == [10, 12, 13, 11, 14, 15, 16, 17]
    assert perturb_tokens(genes, {16}, "activate", max_genes=8) == [10, 11, 12, 13, 16, 14, 15, 17]


def test_store_streams_and_resumes(loaded, tmp_path, monkeypatch):
    model, adata = loaded
    kw = dict(indices=np.arange(12), gene_shifts=True, progress_bar=False)
    memory = scfm.tl.in_silico_perturbation(model, adata, key_added="mem", **kw)
    monkeypatch.setattr(isp, "CELLS_PER_PART", 5)
    store = tmp_path / "screen"
    first = scfm.tl.in_silico_perturbation(model, adata, store=store, key_added="disk", **kw)
    parts = sorted(store.glob("part-*.npz"))
    assert len(parts) == 3 and "genes" not in adata.uns["disk"]  # gene values stay on disk
    pd.testing.assert_frame_equal(first, memory)
    # an interrupted screen: the last part never got written
    parts[-1].unlink()
    calls = []
    run = RankEncoder.run
    monkeypatch.setattr(
        RankEncoder, "run", lambda self, *a, **k: calls.append(1) or run(self, *a, **k)
    )
    again = scfm.tl.in_silico_perturbation(model, adata, store=store, key_added="disk", **kw)
    assert len(calls) == 2  # only the two cells of the lost part
    pd.testing.assert_frame_equal(again, memory)
    ours = scfm.tl.perturbation_statistics(adata, "aggregate_gene_shifts", "disk")
    ref = scfm.tl.perturbation_statistics(adata, "aggregate_gene_shifts", "mem")
    pd.testing.assert_frame_equal(ours, ref, atol=1e-9)
    adata.copy().write_h5ad(tmp_path / "stats.h5ad")  # screens and tables are h5ad-writable
    with pytest.raises(InvalidInputError, match="other arguments"):
        scfm.tl.in_silico_perturbation(model, adata, "all", "overexpress", store=store, **kw)


def test_batch_size_and_pooling(loaded):
    model, adata = loaded
    kw = dict(indices=np.arange(5), gene_shifts=True, progress_bar=False)
    a = scfm.tl.in_silico_perturbation(model, adata, batch_size=1, key_added="b1", **kw)
    b = scfm.tl.in_silico_perturbation(model, adata, batch_size=64, key_added="b64", **kw)
    np.testing.assert_allclose(a["cos_sim"], b["cos_sim"], atol=1e-6)
    # dropout is off during a screen, and the module's training flag comes back
    model.module.train()
    try:
        c = scfm.tl.in_silico_perturbation(model, adata, key_added="train", **kw)
        assert model.module.training
    finally:
        model.module.eval()
    np.testing.assert_allclose(c["cos_sim"], b["cos_sim"], atol=1e-6)
    # mean pooling: the cell value is the mean of the per-gene cosines (reference emb_mode "cell")
    scfm.tl.in_silico_perturbation(model, adata, pooling="mean", key_added="mean", **kw)
    cells, genes = adata.uns["mean"]["cells"], adata.uns["mean"]["genes"]
    per = genes.groupby(["obs_index", "perturbed"], observed=True)["cos_sim"].mean()
    got = cells.set_index(["obs_index", "perturbed"])["cos_sim"]
    np.testing.assert_allclose(got.loc[per.index].to_numpy(), per.to_numpy(), atol=1e-6)


def test_symbols_selection_and_obs(loaded, tmp_path):
    model, adata = loaded
    by_id = scfm.tl.in_silico_perturbation(
        model, adata, ["ENSG00000174500"], "overexpress", progress_bar=False, key_added="id"
    )
    by_symbol = scfm.tl.in_silico_perturbation(
        model, adata, ["GCSAM"], "overexpress", progress_bar=False, key_added="sym"
    )
    pd.testing.assert_frame_equal(by_id, by_symbol)
    # an AnnData named by symbols: the symbol is a var name there, and still the model's gene
    named = adata.copy()
    named.var_names = named.var["gene_symbols"].astype(str).where(lambda s: s != "", "x")
    named.var_names_make_unique()
    Geneformer.setup_anndata(named)
    other = scfm.tl.in_silico_perturbation(
        model, named, ["GCSAM"], "overexpress", progress_bar=False, key_added="named"
    )
    np.testing.assert_allclose(other["cos_sim"], by_id["cos_sim"], atol=1e-6)
    assert list(other["perturbed"].astype(str)) == list(by_id["perturbed"].astype(str))
    adata.copy().write_h5ad(tmp_path / "screen.h5ad")  # results are h5ad-writable
    obs = adata.obs["sym"].to_numpy()
    np.testing.assert_allclose(obs[by_id["obs_index"]], by_id["cos_sim"])
    sub = scfm.tl.in_silico_perturbation(
        model,
        adata,
        "all",
        max_cells=4,
        seed=1,
        filter_data={"disease": "hcm"},
        progress_bar=False,
        key_added="sub",
    )
    picked = adata.uns["sub"]["cells_processed"]
    assert len(picked) == 4 and (adata.obs["disease"].iloc[picked] == "hcm").all()
    assert set(sub["obs_index"]) == set(picked)
    # another seed: the first 4 of default_rng(1).permutation, then longest first (stable)
    hcm = np.flatnonzero(adata.obs["disease"] == "hcm")
    lengths = model.get_tokens(adata, indices=hcm)[1]
    pick = np.random.default_rng(1).permutation(len(hcm))[:4]
    np.testing.assert_array_equal(picked, hcm[pick][np.argsort(-lengths[pick], kind="stable")])


def test_errors(loaded):
    model, adata = loaded
    run = scfm.tl.in_silico_perturbation
    with pytest.raises(InvalidInputError, match="perturb_type"):
        run(model, adata, ["GCSAM"], "inhibit")
    with pytest.raises(InvalidInputError, match="anchor_gene"):
        run(model, adata, ["GCSAM"], anchor_gene="CADM4")
    with pytest.raises(AnnDataKeyError, match="tissue"):
        run(model, adata, filter_data={"tissue": ["heart"]})
    with pytest.raises(InvalidInputError, match="No cells remain"):
        run(model, adata, filter_data={"disease": ["none"]})
    with pytest.raises(AnnDataKeyError, match="cell_type"):
        run(model, adata, cell_states_to_model={**STATES, "state_key": "cell_type"})
    with pytest.raises(InvalidInputError, match="no cells"):
        run(model, adata, cell_states_to_model={**STATES, "goal_state": "healthy"})
    with pytest.raises(InvalidInputError, match="hidden_layer"):
        run(model, adata, hidden_layer=7)
    with pytest.raises(AnnDataKeyError, match="in_silico_perturbation"):
        scfm.tl.perturbation_statistics(adata, "goal_state_shift", "never_ran")
    for bad in ({"start": 3}, {"start": 5, "end": 5}, "some"):
        with pytest.raises(InvalidInputError, match="cell_inds_to_perturb"):
            run(model, adata, cell_inds_to_perturb=bad)
    with pytest.raises(InvalidInputError, match="beyond"):
        run(
            model,
            adata,
            filter_data={"disease": "hcm"},
            cell_inds_to_perturb={"start": 14, "end": 20},
        )


SELECTION = json.loads(
    (DATA / "geneformer_isp_selection" / "reference_selection.json").read_text()
)["selections"]


@pytest.mark.parametrize(
    "case",
    [c for c in SELECTION if c["max_ncells"] is not None or c["cell_inds_to_perturb"] != "all"],
    ids=lambda c: f"{c['run']}-{c['max_ncells']}-{c['cell_inds_to_perturb']}",
)
def test_cell_selection_is_the_reference_selection(loaded, monkeypatch, case):
    """max_cells / cell_inds_to_perturb pick the cells the reference picks, in its order.

    Expected: the cells the ORIGINAL reference's ``apply_additional_filters`` selected on the
    fixture (``datasets`` ``Dataset.shuffle(seed=42)`` = the first ``max_ncells`` of
    ``np.random.default_rng(42).permutation``, a stable sort by length, then the slice; ties
    keep the shuffled order). Only the selection is under test, so the forwards are skipped.
    """
    model, adata = loaded

    def no_forward(self, original, unit, batch_size, states, gene_shifts):
        n = len(unit.label)
        shifts = {s: np.zeros(n, np.float32) for s in states}
        return CellResult(label=unit.label, cos_sim=np.ones(n, np.float32), shifts=shifts)

    monkeypatch.setattr(RankEncoder, "run", no_forward)
    path = fixture_dir("geneformer_isp")
    calls = json.loads((path / "reference_calls.json").read_text())
    args = calls["isp_runs"][case["run"]]["args"]
    kwargs = {}
    if args.get("cell_states_to_model"):
        embs = np.load(path / "state_embs.npz")
        kwargs["cell_states_to_model"] = args["cell_states_to_model"]
        kwargs["state_embeddings"] = {k: embs[k] for k in embs.files}
    if args.get("anchor_gene"):
        kwargs["anchor_gene"] = args["anchor_gene"]
    scfm.tl.in_silico_perturbation(
        model,
        adata,
        args["genes_to_perturb"],
        args["perturb_type"],
        filter_data=args.get("filter_data"),
        max_cells=case["max_ncells"],
        cell_inds_to_perturb=case["cell_inds_to_perturb"],
        progress_bar=False,
        key_added="sel",
        **kwargs,
    )
    np.testing.assert_array_equal(adata.uns["sel"]["cells_processed"], case["cells"])


def test_statistics_helpers():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=200) ** 3
    from statsmodels.stats.multitest import multipletests

    np.testing.assert_allclose(benjamini_hochberg(p), multipletests(p, method="fdr_bh")[1])
    pool = np.round(rng.normal(size=500), 2)  # ties
    y = pool[rng.choice(500, 30, replace=False)]
    np.testing.assert_allclose(
        ranksums_in_pool(np.sort(pool), y), stats.ranksums(pool, y).pvalue, rtol=1e-12
    )


def test_goal_state_statistics_and_plots(loaded):
    model, adata = loaded
    table = scfm.tl.in_silico_perturbation(
        model,
        adata,
        "all",
        cell_states_to_model=STATES,
        indices=np.arange(30),
        progress_bar=False,
        key_added="treat",
    )
    assert {"shift_to_dcm", "shift_to_nf", "shift_to_hcm"} <= set(table.columns)
    result = scfm.tl.perturbation_statistics(adata, "goal_state_shift", "treat")
    assert adata.uns["treat_goal_state_shift"] is result
    assert result["significant"].dtype == bool
    assert (np.diff(result["shift_to_goal"][~result["significant"]]) <= 0).all()
    per_gene = table.groupby("perturbed", observed=True)["shift_to_nf"].mean()
    np.testing.assert_allclose(
        result.set_index("gene")["shift_to_goal"].loc[per_gene.index], per_gene, atol=1e-6
    )
    ax = scfm.pl.perturbation_shifts(adata, "treat", genes=["UROS"])
    assert ax.get_xlabel() == "shift_to_nf"
    ax = scfm.pl.perturbation_top_genes(adata, "treat_goal_state_shift", n_top=3)
    labels = [t.get_text().rstrip("*") for t in ax.get_yticklabels()]
    top = result.sort_values("shift_to_goal", ascending=False)
    assert labels[0] == (top["symbol"].iloc[0] or top["gene"].iloc[0])
    assert len(labels) <= 6
