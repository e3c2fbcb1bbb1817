"""Statistics of in silico perturbation screens (the reference ``InSilicoPerturberStats``).

Every statistic starts from the values that :func:`scfm.tl.in_silico_perturbation` wrote to
``adata.uns[key]``: one cosine similarity (and, with cell states, one shift per state) per
(cell, perturbed gene), and with ``gene_shifts`` one cosine similarity per (cell, perturbed
gene, affected gene). Values of a gene are pooled over cells before anything is averaged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
from scipy import stats

from scfm.errors import AnnDataKeyError, InvalidInputError
from scfm.model.base import record_in_uns
from scfm.tl._perturbation import iter_gene_values

logger = logging.getLogger(__name__)

__all__ = ["benjamini_hochberg", "perturbation_statistics", "reference_columns"]

Mode = Literal[
    "aggregate_data", "aggregate_gene_shifts", "goal_state_shift", "vs_null", "mixture_model"
]
_MODES = ("aggregate_data", "aggregate_gene_shifts", "goal_state_shift", "vs_null", "mixture_model")
#: False discovery rate below which a row is flagged ``significant`` (the reference's ``Sig``).
FDR_THRESHOLD = 0.05
#: Name of the cell row of ``aggregate_gene_shifts`` (the reference's ``"cell_emb"``).
CELL_ROW = "cell"


def reference_columns(mode: str, alt_states: Sequence[str] = ()) -> dict[str, str]:
    """Reference ``InSilicoPerturberStats`` column name -> column of our table, per mode.

    Token columns of the reference (``Perturbed``, ``Affected``, ``Gene``) hold token ids of
    the genes whose ids are in our ``perturbed`` / ``affected`` / ``gene`` columns; their rows
    are matched through the Ensembl id columns.
    """
    if mode == "aggregate_data":
        return {"Cosine_sim": "cos_sim", "Gene": "symbol"}
    if mode == "aggregate_gene_shifts":
        return {
            "Gene_name": "perturbed_symbol",
            "Ensembl_ID": "perturbed",
            "Affected_gene_name": "affected_symbol",
            "Affected_Ensembl_ID": "affected",
            "Cosine_sim_mean": "cos_sim_mean",
            "Cosine_sim_stdev": "cos_sim_std",
            "N_Detections": "n_detections",
        }
    head = {"Gene_name": "symbol", "Ensembl_ID": "gene"}
    if mode == "goal_state_shift":
        out = {
            **head,
            "Shift_to_goal_end": "shift_to_goal",
            "Goal_end_vs_random_pval": "pval_goal",
            "Goal_end_FDR": "fdr_goal",
            "N_Detections": "n_detections",
            "Sig": "significant",
        }
        for alt in alt_states:
            out[f"Shift_to_alt_end_{alt}"] = f"shift_to_alt_{alt}"
            out[f"Alt_end_vs_random_pval_{alt}"] = f"pval_alt_{alt}"
            out[f"Alt_end_FDR_{alt}"] = f"fdr_alt_{alt}"
        return out
    if mode == "vs_null":
        return {
            **head,
            "Test_avg_shift": "test_mean",
            "Null_avg_shift": "null_mean",
            "Test_vs_null_avg_shift": "mean_diff",
            "Test_vs_null_pval": "pval",
            "Test_vs_null_FDR": "fdr",
            "N_Detections_test": "n_test",
            "N_Detections_null": "n_null",
            "Sig": "significant",
        }
    if mode == "mixture_model":
        return {
            **head,
            "Test_avg_shift": "mean_cos_sim",
            "Impact_component": "impact_component",
            "Impact_component_percent": "impact_component_percent",
            "N_Detections": "n_detections",
        }
    raise InvalidInputError(f"mode={mode!r} is not one of {_MODES}.")


def benjamini_hochberg(pvalues: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (statsmodels ``fdr_bh``), NaN-free input.

    Parameters
    ----------
    pvalues
        Raw p-values of all tests of one family.

    Returns
    -------
    The adjusted p-values, in input order.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    n = len(p)
    if n == 0:
        return p
    order = np.argsort(p, kind="mergesort")
    scaled = p[order] * n / np.arange(1, n + 1)
    adjusted = np.minimum.accumulate(scaled[::-1])[::-1]
    out = np.empty(n)
    out[order] = np.minimum(adjusted, 1.0)
    return out


def ranksums_in_pool(pool_sorted: np.ndarray, values: np.ndarray) -> float:
    """Two-sided p-value of ``scipy.stats.ranksums(pool, values)``, in O(n log N).

    Ranks of ties are averaged and the variance has no tie correction, as in scipy.

    Parameters
    ----------
    pool_sorted
        The first sample, sorted (here: every value of every gene of the screen, the gene's
        own included, as the reference pools them).
    values
        The second sample (one gene's values).

    Returns
    -------
    The two-sided p-value (normal approximation); NaN if a sample is empty.
    """
    y = np.sort(np.asarray(values, dtype=np.float64))
    n1, n2 = len(pool_sorted), len(y)
    if n1 == 0 or n2 == 0:
        return float("nan")
    less = np.searchsorted(pool_sorted, y, "left") + np.searchsorted(y, y, "left")
    equal = (
        np.searchsorted(pool_sorted, y, "right")
        - np.searchsorted(pool_sorted, y, "left")
        + np.searchsorted(y, y, "right")
        - np.searchsorted(y, y, "left")
    )
    ranks_y = (less + (equal + 1) / 2.0).sum()
    total = n1 + n2
    ranks_x = total * (total + 1) / 2.0 - ranks_y
    z = (ranks_x - n1 * (total + 1) / 2.0) / np.sqrt(n1 * n2 * (total + 1) / 12.0)
    return float(2.0 * stats.norm.sf(abs(z)))


def _entry(adata: ad.AnnData, key: str) -> Mapping[str, Any]:
    entry = adata.uns.get(key)
    if not isinstance(entry, Mapping) or "cells" not in entry:
        raise AnnDataKeyError(
            f"adata.uns[{key!r}] holds no perturbation screen; run "
            f"scfm.tl.in_silico_perturbation(model, adata, ..., key_added={key!r}) first."
        )
    return entry


def _gene_frame(entry: Mapping[str, Any]) -> pd.DataFrame:
    """Gene id -> (order = vocabulary position, symbol); the set label comes last."""
    names = entry["gene_names"]
    frame = pd.DataFrame(
        {"order": np.arange(len(names)), "symbol": names["symbol"].to_numpy()},
        index=pd.Index(names["gene_id"].astype(str)),
    )
    set_label = entry["params"].get("set_label") or ""
    if set_label and set_label not in frame.index:
        parts = [frame["symbol"].get(g, np.nan) for g in set_label.split("+")]
        symbol = "+".join("" if pd.isna(p) else str(p) for p in parts)
        frame.loc[set_label] = [len(frame), symbol]
    return frame[~frame.index.duplicated(keep="first")]


def _per_gene(
    labels: pd.Series, values: np.ndarray, genes: pd.DataFrame
) -> Iterator[tuple[str, np.ndarray]]:
    """(gene, its pooled values) in vocabulary order; values in processing order."""
    labels = labels.astype(str).to_numpy()
    order_of = genes["order"].reindex(pd.unique(labels)).to_dict()
    keys = np.array([order_of[g] for g in labels], dtype=np.int64)
    idx = np.argsort(keys, kind="stable")
    bounds = np.flatnonzero(np.diff(keys[idx])) + 1
    for chunk in np.split(idx, bounds):
        if len(chunk):
            yield labels[chunk[0]], np.asarray(values[chunk], dtype=np.float64)


def _goal_state(entry: Mapping[str, Any], genes: pd.DataFrame) -> pd.DataFrame:
    states = entry["params"].get("cell_states_to_model")
    if not states:
        raise InvalidInputError(
            "mode='goal_state_shift' needs a screen run with cell_states_to_model."
        )
    cells = entry["cells"]
    goal, alts = states["goal_state"], list(states["alt_states"])
    columns = {"goal": f"shift_to_{goal}", **{f"alt_{a}": f"shift_to_{a}" for a in alts}}
    rows: dict[str, list] = {"gene": [], "symbol": []}
    single = entry["params"]["genes"] != "all"
    pools = {name: np.sort(cells[col].to_numpy(np.float64)) for name, col in columns.items()}
    for name in columns:
        rows[f"shift_to_{name}"] = []
        if not single:
            rows[f"pval_{name}"] = []
    rows["n_detections"] = []
    groups = {
        name: dict(_per_gene(cells["perturbed"], cells[col].to_numpy(), genes))
        for name, col in columns.items()
    }
    for gene in groups["goal"]:
        rows["gene"].append(gene)
        rows["symbol"].append(genes["symbol"].get(gene, ""))
        rows["n_detections"].append(len(groups["goal"][gene]))
        for name in columns:
            v = groups[name][gene]
            rows[f"shift_to_{name}"].append(v.mean())
            if not single:
                rows[f"pval_{name}"].append(ranksums_in_pool(pools[name], v))
    out = pd.DataFrame(rows)
    if single:
        # The reference has no random perturbations to compare one gene set with: means only.
        return out
    for name in columns:
        out[f"fdr_{name}"] = benjamini_hochberg(out[f"pval_{name}"].to_numpy())
    out["significant"] = out["fdr_goal"] < FDR_THRESHOLD
    order = ["gene", "symbol", *[f"shift_to_{n}" for n in columns]]
    order += [f"pval_{n}" for n in columns] + [f"fdr_{n}" for n in columns]
    out = out[[*order, "n_detections", "significant"]]
    return out.sort_values(
        ["significant", "shift_to_goal", "fdr_goal"],
        ascending=[False, False, True],
        kind="mergesort",
    ).reset_index(drop=True)


def _vs_null(
    entry: Mapping[str, Any], null: Mapping[str, Any], genes: pd.DataFrame
) -> pd.DataFrame:
    test = dict(_per_gene(entry["cells"]["perturbed"], entry["cells"]["cos_sim"].to_numpy(), genes))
    null_genes = _gene_frame(null)
    nulls = dict(
        _per_gene(null["cells"]["perturbed"], null["cells"]["cos_sim"].to_numpy(), null_genes)
    )
    rows = []
    for gene, t in test.items():
        n = nulls.get(gene, np.zeros(0))
        null_mean = n.mean() if len(n) else np.nan
        with np.errstate(all="ignore"):
            p = stats.ranksums(t, n).pvalue if len(n) else np.nan
        rows.append(
            {
                "gene": gene,
                "symbol": genes["symbol"].get(gene, ""),
                "test_mean": t.mean(),
                "null_mean": null_mean,
                "mean_diff": t.mean() - null_mean,
                "pval": 1.0 if np.isnan(p) else float(p),
                "n_test": len(t),
                "n_null": len(n),
            }
        )
    out = pd.DataFrame(rows)
    out.insert(6, "fdr", benjamini_hochberg(out["pval"].to_numpy()))
    out["significant"] = out["fdr"] < FDR_THRESHOLD
    return out.sort_values(
        ["significant", "mean_diff", "fdr"],
        ascending=[False, False, True],
        na_position="last",
        kind="mergesort",
    ).reset_index(drop=True)


def _impact(values: np.ndarray, gm: Any) -> np.ndarray:
    """The reference's component rule: 1 = impact, 0 = no impact.

    Above ``means_[1]`` -> 0, below ``means_[0]`` -> 1, in between ``1 - predict``; the
    reference reads component 0 as the impact one whichever mean is lower.
    """
    values = np.asarray(values, dtype=np.float64)
    impact_border, nonimpact_border = gm.means_[0][0], gm.means_[1][0]
    out = 1 - gm.predict(values.reshape(-1, 1)).astype(np.int64)
    out[values > nonimpact_border] = 0
    out[(values < impact_border) & ~(values > nonimpact_border)] = 1
    return out


def _mixture(entry: Mapping[str, Any], genes: pd.DataFrame) -> pd.DataFrame:
    from sklearn.mixture import GaussianMixture

    groups = dict(
        _per_gene(entry["cells"]["perturbed"], entry["cells"]["cos_sim"].to_numpy(), genes)
    )
    if len(groups) < 2:
        raise InvalidInputError("mode='mixture_model' needs a screen of several genes.")
    means = np.array([v.mean() for v in groups.values()])
    gm = GaussianMixture(n_components=2, random_state=0).fit(means.reshape(-1, 1))
    out = pd.DataFrame(
        {
            "gene": list(groups),
            "symbol": [genes["symbol"].get(g, "") for g in groups],
            "mean_cos_sim": means,
            "impact_component": _impact(means, gm),
            "impact_component_percent": [_impact(v, gm).mean() * 100 for v in groups.values()],
            "n_detections": [len(v) for v in groups.values()],
        }
    )
    return out.sort_values(
        ["impact_component", "mean_cos_sim"], ascending=[False, True], kind="mergesort"
    ).reset_index(drop=True)


def _gene_shift_sums(entry: Mapping[str, Any], genes: pd.DataFrame) -> pd.DataFrame:
    """Pooled mean / std / count per (perturbed, affected) gene, streamed chunk by chunk."""
    acc: list[pd.DataFrame] = []
    for chunk in iter_gene_values(entry):
        # Sums of (value - 1): cosines are near 1, so the std keeps its digits.
        d = chunk["cos_sim"].to_numpy(np.float64) - 1.0
        frame = pd.DataFrame(
            {
                "perturbed": chunk["perturbed"].astype(str).to_numpy(),
                "affected": chunk["affected"].astype(str).to_numpy(),
                "s": d,
                "ss": d * d,
                "n": 1,
            }
        )
        acc.append(frame.groupby(["perturbed", "affected"], sort=False).sum())
        if len(acc) > 8:
            acc = [pd.concat(acc).groupby(level=[0, 1], sort=False).sum()]
    if not acc:
        return pd.DataFrame(
            columns=["perturbed", "affected", "cos_sim_mean", "cos_sim_std", "n_detections"]
        )
    tot = pd.concat(acc).groupby(level=[0, 1], sort=False).sum().reset_index()
    mean_d = tot["s"] / tot["n"]
    var = np.maximum(tot["ss"] / tot["n"] - mean_d**2, 0.0)
    return pd.DataFrame(
        {
            "perturbed": tot["perturbed"],
            "affected": tot["affected"],
            "cos_sim_mean": 1.0 + mean_d,
            "cos_sim_std": np.sqrt(var),
            "n_detections": tot["n"].astype(np.int64),
        }
    )


def _aggregate_gene_shifts(entry: Mapping[str, Any], genes: pd.DataFrame) -> pd.DataFrame:
    cells = entry["cells"]
    rows = []
    for gene, v in _per_gene(cells["perturbed"], cells["cos_sim"].to_numpy(), genes):
        rows.append(
            {
                "perturbed": gene,
                "affected": CELL_ROW,
                "cos_sim_mean": v.mean(),
                "cos_sim_std": v.std(),
                "n_detections": len(v),
            }
        )
    parts = [pd.DataFrame(rows), _gene_shift_sums(entry, genes)]
    # An empty part (a screen without per-gene values) would only blur the dtypes.
    out = pd.concat([p for p in parts if len(p)] or parts, ignore_index=True)
    # "" where a gene has no symbol (and for the cell rows): the tables stay h5ad-writable.
    out.insert(1, "perturbed_symbol", out["perturbed"].map(genes["symbol"]).fillna(""))
    out.insert(3, "affected_symbol", out["affected"].map(genes["symbol"]).fillna(""))
    # Deterministic order: cell rows first, then by mean; ties by gene (vocabulary order).
    out["_cell"] = out["affected"] == CELL_ROW
    out["_p"] = out["perturbed"].map(genes["order"])
    out["_a"] = out["affected"].map(genes["order"]).fillna(-1)
    out = out.sort_values(["_p", "_a"], kind="mergesort").sort_values(
        ["_cell", "cos_sim_mean"], ascending=[False, True], kind="mergesort"
    )
    return out.drop(columns=["_cell", "_p", "_a"]).reset_index(drop=True)


def _aggregate_data(entry: Mapping[str, Any], genes: pd.DataFrame) -> pd.DataFrame:
    cells = entry["cells"].copy()
    cells.insert(3, "symbol", cells["perturbed"].astype(str).map(genes["symbol"]).fillna(""))
    return cells.reset_index(drop=True)


def perturbation_statistics(
    adata: ad.AnnData,
    mode: Mode = "goal_state_shift",
    key: str = "perturbation",
    *,
    null_key: str | None = None,
    key_added: str | None = None,
) -> pd.DataFrame:
    """Statistics of an in silico perturbation screen (the reference ``InSilicoPerturberStats``).

    Every value of a perturbed gene is pooled over the cells it was perturbed in; means and
    standard deviations (``ddof=0``) are over those pooled values. p-values are two-sided
    Wilcoxon rank-sum tests (``scipy.stats.ranksums``, normal approximation); the false
    discovery rate is Benjamini-Hochberg over all rows of the table, and ``significant`` means
    FDR < 0.05.

    Parameters
    ----------
    adata
        AnnData holding a screen of :func:`scfm.tl.in_silico_perturbation` in ``adata.uns[key]``.
    mode
        - ``"aggregate_data"``: the values of every (cell, perturbation) with the gene symbol
          (the reference only allows one gene, and raises for a gene set; here any screen).
        - ``"aggregate_gene_shifts"``: per (perturbed gene, affected gene) the mean, std and
          number of cosine similarities; ``affected == "cell"`` rows are the cell embedding.
          Rows: cell rows first, then by increasing mean (most affected first).
        - ``"goal_state_shift"``: per perturbed gene the mean shift towards the goal and each
          alternative state, and whether it is larger than for the perturbed genes in general:
          rank-sum test of the gene's shifts against the pool of ALL shifts of the screen (the
          gene's own included, as the reference does; it subsamples that pool to 100,000 values
          in an order that depends on the file system, here the whole pool is used). A screen of
          one gene set has nothing to compare with: only the means are returned.
        - ``"vs_null"``: per gene, its cell cosine similarities against those of the same gene
          in a null screen (``null_key``, e.g. the same screen in control cells);
          ``mean_diff = test_mean - null_mean`` (NaN if the gene was never perturbed there; its
          p-value is then 1, as in the reference).
        - ``"mixture_model"``: a two-component Gaussian mixture (scikit-learn,
          ``random_state=0``) over the per-gene mean cosine similarities; ``impact_component``
          1 marks genes in the impact component (the reference takes component 0 as "impact"
          and ``means_[0]`` / ``means_[1]`` as borders: values above ``means_[1]`` are 0, below
          ``means_[0]`` are 1, in between the predicted component flipped), and
          ``impact_component_percent`` is the share of the gene's cells classified as impact.
          For a combination screen the reference raises; here the partner genes' values are used.
    key
        The screen's ``key_added``.
    null_key
        ``vs_null``: the null screen's ``key_added``.
    key_added
        Also store the table in ``adata.uns[key_added]`` (default ``f"{key}_{mode}"``).

    Returns
    -------
    Tidy table; :func:`reference_columns` maps the reference's column names to ours.
    """
    if mode not in _MODES:
        raise InvalidInputError(f"mode={mode!r} is not one of {_MODES}.")
    entry = _entry(adata, key)
    genes = _gene_frame(entry)
    if mode == "aggregate_data":
        out = _aggregate_data(entry, genes)
    elif mode == "aggregate_gene_shifts":
        out = _aggregate_gene_shifts(entry, genes)
    elif mode == "goal_state_shift":
        out = _goal_state(entry, genes)
    elif mode == "mixture_model":
        out = _mixture(entry, genes)
    else:
        if null_key is None:
            raise InvalidInputError("mode='vs_null' needs null_key (the null screen's key).")
        out = _vs_null(entry, _entry(adata, null_key), genes)
    key_added = key_added or f"{key}_{mode}"
    adata.uns[key_added] = out
    record_in_uns(
        adata,
        "uns",
        key_added,
        {
            "function": "perturbation_statistics",
            "mode": mode,
            "key": key,
            **({"null_key": null_key} if null_key else {}),
        },
    )
    return out
