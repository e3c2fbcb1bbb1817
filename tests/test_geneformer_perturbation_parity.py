"""In silico perturbation parity with the reference Geneformer ``InSilicoPerturber`` / ``Stats``.

Everything (runs, arguments, genes, statistics) is read from the fixture folder itself:
``SCFM_ISP_FIXTURE`` names one folder; by default every vendored one runs
(``tests/data/fixtures/geneformer_isp``, V2-style, and ``geneformer_isp_v1``, V1-style), so a
fixture of another seed, size or release variant is checked by running this same file.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import scfm
from conftest import fixture_dir
from scfm.model import Geneformer
from scfm.tl._perturbation_stats import ranksums_in_pool, reference_columns

FIXTURES = (
    [Path(os.environ["SCFM_ISP_FIXTURE"])]
    if os.environ.get("SCFM_ISP_FIXTURE")
    else [fixture_dir("geneformer_isp"), fixture_dir("geneformer_isp_v1")]
)
CALLS = {f: json.loads((f / "reference_calls.json").read_text()) for f in FIXTURES}


def _cases(select: Callable[[dict[str, Any]], list[str]]) -> list[Any]:
    """``(fixture, name)`` parameters, one per run / stats call that ``select`` picks."""
    return [
        pytest.param(f, name, id=f"{f.name}-{name}") for f in FIXTURES for name in select(CALLS[f])
    ]


#: float32 parity (README: the reference agrees with itself to ~3e-7).
ATOL_RAW = 1e-4
ATOL_STATS = 1e-5
#: p-values / FDR are rank statistics of float32 values (the issue's rtol 1e-3): one swap of
#: two near-equal pooled values moves a p-value by ~2e-3 relative, so the shifts must be the
#: reference's bit for bit. They are (embedding sum in HF order, state embeddings from
#: padded batches with a float32 mean, as the reference): measured worst 6e-14 relative, the
#: CSV's printed precision; the reference re-run on this CPU reproduces its CSVs exactly.
RTOL_PVALUE = 1e-3

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _isp_kwargs(run: dict[str, Any]) -> dict[str, Any]:
    """Our arguments for one reference ``InSilicoPerturber`` call."""
    args = run["args"]
    kwargs: dict[str, Any] = {
        "genes": args.get("genes_to_perturb", "all"),
        "perturb_type": args.get("perturb_type", "delete"),
        # The reference's emb_layer indexes hidden_states[n_layers + emb_layer]: -1 = second
        # to last layer = our hidden_layer -2; 0 = last = -1.
        "hidden_layer": int(args.get("emb_layer", -1)) - 1,
        "gene_shifts": run.get("emb_mode_effective", args.get("emb_mode", "")).endswith(
            "_and_gene"
        ),
        "progress_bar": False,
        # the state embeddings' padded batches are the reference's (EmbExtractor batches)
        "batch_size": args.get("forward_batch_size"),
        # the reference's Dataset.shuffle(seed=42) subset, then its slice of the sorted order
        "max_cells": args.get("max_ncells"),
        "cell_inds_to_perturb": args.get("cell_inds_to_perturb", "all"),
    }
    if args.get("combos", 0) and args.get("anchor_gene"):
        kwargs["anchor_gene"] = args["anchor_gene"]
    if args.get("filter_data"):
        kwargs["filter_data"] = args["filter_data"]
    if args.get("cell_states_to_model"):
        kwargs["cell_states_to_model"] = args["cell_states_to_model"]  # states embedded by scfm
    return kwargs


@pytest.fixture(scope="module")
def loaded() -> dict[Path, Any]:
    """Model, AnnData and finished screens per fixture, shared by the module's tests."""
    return {}


def _screens(loaded: dict[Path, Any], fixture: Path) -> tuple[Geneformer, ad.AnnData, dict]:
    if fixture not in loaded:
        adata = ad.read_h5ad(fixture / "input.h5ad")
        Geneformer.setup_anndata(adata)
        model = Geneformer.from_pretrained(fixture / "checkpoint", adata)
        loaded[fixture] = model, adata, {}
    return loaded[fixture]


def _screen(loaded: dict[Path, Any], fixture: Path, name: str) -> pd.DataFrame:
    model, adata, done = _screens(loaded, fixture)
    if name not in done:
        done[name] = scfm.tl.in_silico_perturbation(
            model, adata, key_added=name, **_isp_kwargs(CALLS[fixture]["isp_runs"][name])
        )
    return done[name]


def _token_names(fixture: Path) -> dict[int, str]:
    (path,) = sorted((fixture / "checkpoint").glob("token_dictionary*.pkl"))
    with open(path, "rb") as f:
        return {int(v): str(k) for k, v in pickle.load(f).items()}


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda f: f.name)
def test_tokens_match(loaded, fixture):
    model, adata, _ = _screens(loaded, fixture)
    tok = np.load(fixture / "tokens.npz")
    ids, lengths = model.get_tokens(adata, indices=tok["cell_index"])
    np.testing.assert_array_equal(lengths, tok["lengths"])
    for row, ref, n in zip(ids, tok["input_ids"], tok["lengths"]):
        np.testing.assert_array_equal(row[:n], ref[:n])


def _overexpress_all_labels(
    values: pd.DataFrame, model: Geneformer, adata: ad.AnnData
) -> pd.DataFrame:
    """Relabel our per-gene values as the reference does for overexpress with genes="all".

    Reference quirk: its label list of affected genes skips the cell's top gene, which its
    values keep, so each value carries the next gene's id and the last value is dropped.
    """
    rows = []
    names = np.asarray(model.vocabulary, dtype=object)  # token id -> gene id
    special = model.module.special_tokens.cpu().numpy()
    ids, lengths = model.get_tokens(adata)
    for (cell, pert), grp in values.groupby(["obs_index", "perturbed"], sort=False, observed=True):
        t = ids[cell, : lengths[cell]]
        genes = [names[x] for x in t if not special[x]]
        ours = [g for g in genes if g != pert]
        labels = [g for g in genes[1:] if g != pert]
        lookup = dict(zip(grp["affected"].astype(str), grp["cos_sim"]))
        for label, gene in zip(labels, ours):
            rows.append((cell, pert, label, lookup[gene]))
    return pd.DataFrame(rows, columns=["obs_index", "perturbed", "affected", "cos_sim"])


@pytest.mark.parametrize(("fixture", "name"), _cases(lambda calls: list(calls["isp_runs"])))
def test_raw_arrays(loaded, fixture, name):
    model, adata, _ = _screens(loaded, fixture)
    table = _screen(loaded, fixture, name)
    run = CALLS[fixture]["isp_runs"][name]
    ref = np.load(fixture / "raw" / f"{name}.npz")
    entry = adata.uns[name]
    # cells and their processing order (filters, then longest first)
    np.testing.assert_array_equal(entry["cells_processed"], ref["cells"])
    assert len(ref["cells"]) == run.get("n_cells_processed", len(ref["cells"]))
    key = pd.MultiIndex.from_arrays([ref["cell_obs_index"], ref["cell_perturbed"].astype(str)])
    ours = table.set_index(["obs_index", table["perturbed"].astype(str)])
    assert ours.index.is_unique and set(ours.index) == set(key)
    compared = 0
    for k in ref.files:
        if k == "cell_cos_sim":
            col = "cos_sim"
        elif k.startswith("cell_shift_to_"):
            col = "shift_to_" + k[len("cell_shift_to_") :]
        else:
            continue
        np.testing.assert_allclose(ours.loc[key, col].to_numpy(), ref[k], rtol=0, atol=ATOL_RAW)
        compared += 1
    assert compared >= 1
    if "gene_cos_sim" in ref.files:
        genes = entry["genes"]
        args = run["args"]
        if args.get("perturb_type") == "overexpress" and args.get("genes_to_perturb") == "all":
            genes = _overexpress_all_labels(genes, model, adata)
        gkey = pd.MultiIndex.from_arrays(
            [
                ref["gene_obs_index"],
                ref["gene_perturbed"].astype(str),
                ref["gene_affected"].astype(str),
            ]
        )
        g = genes.set_index(
            ["obs_index", genes["perturbed"].astype(str), genes["affected"].astype(str)]
        )
        assert g.index.is_unique and set(g.index) == set(gkey)
        np.testing.assert_allclose(
            g.loc[gkey, "cos_sim"].to_numpy(), ref["gene_cos_sim"], rtol=0, atol=ATOL_RAW
        )
    else:
        assert "genes" not in entry


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda f: f.name)
def test_state_embeddings(loaded, fixture):
    _, adata, _ = _screens(loaded, fixture)
    runs = [
        n for n, r in CALLS[fixture]["isp_runs"].items() if r["args"].get("cell_states_to_model")
    ]
    if not runs:
        pytest.skip("no goal-state run in this fixture")
    _screen(loaded, fixture, runs[0])
    ours = adata.uns[runs[0]]["state_embeddings"]
    ref = np.load(fixture / "state_embs.npz")
    for state in ref.files:
        np.testing.assert_allclose(ours.loc[state].to_numpy(), ref[state], atol=ATOL_STATS)


# ------------------------------------------------------------------------------ statistics
def _stats_inputs(fixture: Path, name: str, args: dict[str, Any]) -> tuple[str, str | None]:
    """The screen(s) a reference stats call read: by name prefix, states, or the null pair."""
    runs = CALLS[fixture]["isp_runs"]
    prefixed = [r for r in runs if name.startswith(r + "_")]
    if prefixed:
        return max(prefixed, key=len), None
    if args["mode"] == "goal_state_shift":
        (run,) = [
            r
            for r, spec in runs.items()
            if spec["args"].get("cell_states_to_model") == args.get("cell_states_to_model")
            and spec["args"].get("genes_to_perturb") == args.get("genes_perturbed", "all")
        ][:1]
        return run, None
    if args["mode"] == "vs_null":
        filtered = [r for r, spec in runs.items() if spec["args"].get("filter_data")]
        test = [r for r in filtered if "test" in r]
        null = [r for r in filtered if r not in test]
        return test[0], null[0]
    raise AssertionError(f"cannot tell which run {name} read")


def _norm_id(value: Any) -> str:
    """'ENSG1' / "('ENSG1', 'ENSG2')" / NaN -> 'ENSG1' / 'ENSG1+ENSG2' / ''."""
    if isinstance(value, float) and np.isnan(value):
        return ""
    text = str(value)
    if text.startswith("("):  # a gene set; a missing symbol is written nan
        parts = ast.literal_eval(text.replace("nan", "None"))
        return "+".join("" if x is None else str(x) for x in parts)
    return text


def _norm_token(value: Any, names: dict[int, str]) -> str:
    if isinstance(value, str) and value.startswith("("):
        return "+".join(names[int(x)] for x in ast.literal_eval(value))
    if isinstance(value, str) and not value.lstrip("-").isdigit():
        return value
    return names[int(value)]


def _row_keys(mode: str, frame: pd.DataFrame, ours: bool) -> pd.Index:
    if mode == "aggregate_gene_shifts":
        if ours:
            return pd.Index(frame["perturbed"].astype(str) + "|" + frame["affected"].astype(str))
        affected = frame["Affected_Ensembl_ID"].map(_norm_id).replace("", "cell")
        return pd.Index(frame["Ensembl_ID"].map(_norm_id) + "|" + affected)
    return pd.Index(frame["gene"].astype(str) if ours else frame["Ensembl_ID"].map(_norm_id))


def _compare_column(ref_col: str, ref: pd.Series, ours: pd.Series) -> None:
    if ref_col.endswith(("pval", "FDR")) or "_pval_" in ref_col or "_FDR_" in ref_col:
        np.testing.assert_allclose(
            ours.to_numpy(float), ref.to_numpy(float), rtol=RTOL_PVALUE, atol=0, err_msg=ref_col
        )
    elif ref_col == "Sig":
        np.testing.assert_array_equal(ours.astype(int).to_numpy(), ref.astype(int).to_numpy())
    elif ref.dtype.kind in "fiu" and ours.dtype.kind in "fiub":
        np.testing.assert_allclose(
            ours.to_numpy(float),
            ref.to_numpy(float),
            rtol=0,
            atol=ATOL_STATS,
            equal_nan=True,
            err_msg=ref_col,
        )
    else:
        np.testing.assert_array_equal(
            ours.map(lambda v: "" if pd.isna(v) else str(v)).to_numpy(),
            ref.map(_norm_id).to_numpy(),
            err_msg=ref_col,
        )


def _stats_calls(ok: bool, mode: str | None = None) -> Callable[[dict[str, Any]], list[str]]:
    def select(calls: dict[str, Any]) -> list[str]:
        return [
            n
            for n, s in calls["stats_runs"].items()
            if s["ok"] == ok and mode in (None, s["args"]["mode"])
        ]

    return select


@pytest.mark.parametrize(("fixture", "name"), _cases(_stats_calls(ok=True)))
def test_stats_columns(loaded, fixture, name):
    _, adata, _ = _screens(loaded, fixture)
    args = CALLS[fixture]["stats_runs"][name]["args"]
    mode = args["mode"]
    run, null = _stats_inputs(fixture, name, args)
    _screen(loaded, fixture, run)
    if null:
        _screen(loaded, fixture, null)
    ours = scfm.tl.perturbation_statistics(adata, mode, run, null_key=null)
    ref = pd.read_csv(fixture / "stats" / f"{name}.csv", index_col=0)
    alts = (args.get("cell_states_to_model") or {}).get("alt_states") or []
    columns = reference_columns(mode, alts)
    names = _token_names(fixture)
    token_cols = {"Perturbed": "perturbed", "Affected": "affected", "Gene": "gene"}
    assert len(ours) == len(ref)
    if mode == "aggregate_data":  # cell values in processing order
        for ref_col, col in columns.items():
            _compare_column(ref_col, ref[ref_col], ours[col])
        return
    for col in ref.columns:
        assert col in columns or col in token_cols, f"{name}: reference column {col} unmapped"
    ref_keys, our_keys = _row_keys(mode, ref, False), _row_keys(mode, ours, True)
    assert set(ref_keys) == set(our_keys) and our_keys.is_unique
    aligned = ours.set_axis(our_keys).loc[ref_keys]
    for ref_col in ref.columns:
        if ref_col in columns:
            values = ref[ref_col]
            if ref_col == "Affected_Ensembl_ID":  # the reference leaves the cell row's id empty
                values = values.fillna("cell")
            _compare_column(ref_col, values, aligned[columns[ref_col]].reset_index(drop=True))
        else:  # token ids of the genes named in our id columns
            tokens = ref[ref_col].map(lambda v: _norm_token(v, names)).replace({"cell_emb": "cell"})
            np.testing.assert_array_equal(
                tokens.to_numpy(), aligned[token_cols[ref_col]].astype(str).to_numpy()
            )
    # Same order under the reference's sort keys (rows with equal keys may swap).
    first = {
        "aggregate_gene_shifts": "Cosine_sim_mean",
        "goal_state_shift": "Shift_to_goal_end",
        "vs_null": "Test_vs_null_avg_shift",
        "mixture_model": "Test_avg_shift",
    }[mode]
    np.testing.assert_allclose(
        ours[columns[first]].to_numpy(float),
        ref[first].to_numpy(float),
        atol=ATOL_STATS,
        equal_nan=True,
    )


@pytest.mark.parametrize(
    ("fixture", "name"), _cases(_stats_calls(ok=True, mode="goal_state_shift"))
)
def test_goal_state_pvalues_exact_on_reference_values(fixture, name):
    """The p-values recomputed from the reference's own shifts are the reference's (1e-9)."""
    args = CALLS[fixture]["stats_runs"][name]["args"]
    run, _ = _stats_inputs(fixture, name, args)
    raw = np.load(fixture / "raw" / f"{run}.npz")
    ref = pd.read_csv(fixture / "stats" / f"{name}.csv", index_col=0)
    states = args["cell_states_to_model"]
    cols = {states["goal_state"]: "Goal_end_vs_random_pval"}
    cols.update({a: f"Alt_end_vs_random_pval_{a}" for a in states.get("alt_states") or []})
    for state, col in cols.items():
        values = raw[f"cell_shift_to_{state}"].astype(np.float64)
        pool = np.sort(values)
        for gene, p in zip(ref["Ensembl_ID"], ref[col]):
            mine = ranksums_in_pool(pool, values[raw["cell_perturbed"] == gene])
            np.testing.assert_allclose(mine, p, rtol=1e-9)


@pytest.mark.parametrize(("fixture", "name"), _cases(_stats_calls(ok=False)))
def test_stats_the_reference_refuses(loaded, fixture, name):
    """Where the reference raises, we return what the mode means for that screen."""
    _, adata, _ = _screens(loaded, fixture)
    args = CALLS[fixture]["stats_runs"][name]["args"]
    run, _ = _stats_inputs(fixture, name, args)
    table = _screen(loaded, fixture, run)
    out = scfm.tl.perturbation_statistics(adata, args["mode"], run)
    if args["mode"] == "aggregate_data":
        assert len(out) == len(table)
        np.testing.assert_array_equal(out["cos_sim"].to_numpy(), table["cos_sim"].to_numpy())
    else:
        assert set(out["gene"]) == set(table["perturbed"].astype(str))
        assert out["impact_component"].isin([0, 1]).all()
