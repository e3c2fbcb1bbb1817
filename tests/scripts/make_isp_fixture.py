"""Build a Geneformer in silico perturbation parity fixture by running the ORIGINAL reference.

This script is ours; it only *calls* the reference package (``ctheodoris/Geneformer``):
``TranscriptomeTokenizer``, ``EmbExtractor.get_state_embs``, ``InSilicoPerturber`` and
``InSilicoPerturberStats``. It writes the layout of ``tests/data/fixtures/geneformer_isp``
(``checkpoint/``, ``input.h5ad``, ``tokens.npz``, ``state_embs.npz``, ``raw/*.npz``,
``stats/*.csv``, ``reference_calls.json``, ``tolerances.json``, ``README.md``). It is not run by
the test suite. Run it with the reference's interpreter::

    /path/to/Geneformer/.venv/bin/python tests/scripts/make_isp_fixture.py \\
        --reference /path/to/Geneformer --out /tmp/isp_v1 --variant v1 --seed 7

``--variant public`` builds the V2 layout (``<cls>``/``<eos>``, 4096 inputs, ``cls`` modes),
``--variant v1`` the V1 layout (no special tokens, 2048 inputs, ``cell`` modes,
``pytorch_model.bin``, gc30M dictionaries). ``--inputs-from DIR`` reuses the checkpoint and
``input.h5ad`` of an existing fixture (to check that the reference runs reproduce its arrays).

Reference-side settings (why each one matters is said where it is set): a scratch copy of the
package with ``"cuda"`` literals mapped to ``"cpu"`` and the package dictionary paths pointing
at the fixture's dictionaries, ``torch.set_num_threads(1)``, ``nproc=1``, ``PYTHONHASHSEED=0``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import traceback
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: The real dictionaries the package ships (``src/scfm/data/resources/geneformer``).
DEFAULT_VOCAB = (
    Path(__file__).resolve().parents[2] / "src" / "scfm" / "data" / "resources" / "geneformer"
)
#: Files whose hard-coded ``"cuda"`` device the scratch copy maps to the CPU.
CUDA_FILES = ("emb_extractor.py", "perturber_utils.py", "in_silico_perturber.py")
RUN_METHODS = (
    "isp_perturb_set",
    "isp_perturb_set_special",
    "isp_perturb_all",
    "isp_perturb_all_special",
)


@dataclass
class Variant:
    """What differs between the V1 and V2 release layouts."""

    name: str
    model_version: str
    suffix: str  # dictionary file suffix
    special: bool  # <cls>/<eos>
    input_size: int
    cell_mode: str  # the reference's cell-only emb_mode
    weights_file: str
    dropout: float

    @property
    def gene_mode(self) -> str:
        return f"{self.cell_mode}_and_gene"


VARIANTS = {
    "public": Variant("public", "V2", "gc104M", True, 4096, "cls", "model.safetensors", 0.1),
    "v1": Variant("v1", "V1", "gc30M", False, 2048, "cell", "pytorch_model.bin", 0.02),
}
STATES = {"state_key": "disease", "start_state": "dcm", "goal_state": "nf", "alt_states": ["hcm"]}


# ----------------------------------------------------------------------------- inputs
def _load_pickle(path: Path) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f)


def build_inputs(out: Path, var: Variant, args: argparse.Namespace) -> dict[str, Any]:
    """Tiny dictionaries, a random ``BertForMaskedLM`` and an AnnData of raw counts."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp
    import torch
    from transformers import BertConfig, BertForMaskedLM

    rng = np.random.default_rng(args.seed)
    vocab = Path(args.vocab)
    real_tokens = _load_pickle(vocab / f"token_dictionary_{var.suffix}.pkl")
    real_medians = _load_pickle(vocab / "gene_median_dictionary_gc30M.pkl")
    real_names = _load_pickle(vocab / "gene_name_id_dict_gc30M.pkl")
    candidates = [g for g in real_tokens if g.startswith("ENSG")]
    if var.model_version == "V1":  # V1 medians are real for every V1 gene
        candidates = [g for g in candidates if g in real_medians]
    picked = rng.choice(len(candidates), size=args.n_vocab + args.n_unknown, replace=False)
    vocab_genes = sorted((candidates[i] for i in picked[: args.n_vocab]), key=real_tokens.get)
    unknown = [candidates[i] for i in picked[args.n_vocab :]]
    specials = ["<pad>", "<mask>"] + (["<cls>", "<eos>"] if var.special else [])
    token_dict = {s: i for i, s in enumerate(specials)}
    token_dict.update({g: len(specials) + i for i, g in enumerate(vocab_genes)})
    medians = {}
    for g in vocab_genes:  # real V1 medians where they exist, else a lognormal draw
        medians[g] = float(real_medians[g]) if g in real_medians else float(rng.lognormal(0.5, 1.0))
    names = {s: e for s, e in real_names.items() if e in token_dict}

    # genes of the AnnData: most of the vocabulary, a few unknown ids, one alias id
    n_in = round(args.vocab_in_adata * args.n_vocab)
    in_adata = [vocab_genes[i] for i in sorted(rng.choice(args.n_vocab, n_in, replace=False))]
    alias_target = in_adata[int(rng.integers(len(in_adata)))]
    alias = "ENSG90000000000"
    mapping = {g: g for g in vocab_genes}
    mapping[alias] = alias_target
    var_names = np.array(in_adata + unknown + [alias], dtype=object)
    var_names = var_names[rng.permutation(len(var_names))]
    symbol_of = {e: s for s, e in real_names.items()}

    states = [STATES["start_state"], STATES["goal_state"], *STATES["alt_states"]]
    probs = np.array([0.42, 0.34, 0.24])
    state = rng.choice(states, size=args.n_cells, p=probs)
    n_genes = len(var_names)
    base = rng.lognormal(0.0, 1.5, n_genes)
    base /= base.sum()
    log_fc = np.zeros((len(states), n_genes))
    varying = rng.random(n_genes) < 0.25
    log_fc[:, varying] = rng.normal(0.0, 2.5, (len(states), int(varying.sum())))
    lib = rng.lognormal(np.log(args.library_size), 0.5, args.n_cells)
    rows = np.array([states.index(s) for s in state])
    p = base[None, :] * np.exp(log_fc[rows])
    p /= p.sum(axis=1, keepdims=True)
    mu = lib[:, None] * p
    r = 1.5
    counts = rng.negative_binomial(r, r / (r + mu)).astype(np.float32)

    # detection of in-vocabulary genes after the alias is folded into its target
    col = {g: i for i, g in enumerate(var_names)}
    detected = {g: counts[:, col[g]] > 0 for g in in_adata}
    detected[alias_target] = detected[alias_target] | (counts[:, col[alias]] > 0)
    rate = {g: float(d.mean()) for g, d in detected.items()}
    start = state == STATES["start_state"]
    goal = state == STATES["goal_state"]
    planted = max(
        in_adata,
        key=lambda g: (detected[g][start].mean() - detected[g][goal].mean(), g),
    )
    by_rate = sorted(in_adata, key=lambda g: (-rate[g], g))

    def near(target: float, avoid: set[str]) -> str:
        return min((g for g in by_rate if g not in avoid), key=lambda g: (abs(rate[g] - target), g))

    anchor = near(0.6, {planted})
    single = near(0.5, {planted, anchor})
    frequent = near(0.7, {planted, anchor, single})
    rare = near(0.15, {planted, anchor, single, frequent})
    picks = {
        "overexpress_genes": [frequent, rare],
        "single_gene": single,
        "anchor_gene": anchor,
        "delete_genes": [anchor, single],
        "planted_gene": planted,
    }

    obs = pd.DataFrame(
        {
            "disease": pd.Categorical(state, categories=states),
            "batch": np.where(np.arange(args.n_cells) % 2 == 0, "batch1", "batch2"),
        },
        index=[f"cell{i}" for i in range(args.n_cells)],
    )
    var_df = pd.DataFrame(
        {
            "ensembl_id": var_names.astype(str),
            "gene_symbols": [symbol_of.get(g, "") for g in var_names],
        },
        index=var_names.astype(str),
    )
    adata = ad.AnnData(sp.csr_matrix(counts), obs=obs, var=var_df)
    adata.write_h5ad(out / "input.h5ad")

    ckpt = out / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    config = BertConfig(
        vocab_size=len(token_dict),
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=2 * args.hidden,
        hidden_act="relu",
        layer_norm_eps=1e-12,
        max_position_embeddings=var.input_size,
        type_vocab_size=2,
        pad_token_id=0,
        hidden_dropout_prob=var.dropout,
        attention_probs_dropout_prob=var.dropout,
    )
    model = BertForMaskedLM(config)
    with torch.no_grad():
        # HF init leaves a near-degenerate net at this size: spread every parameter out
        for pname, param in model.named_parameters():
            if "LayerNorm.weight" in pname:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif pname.endswith("bias"):
                param.copy_(0.05 * torch.randn_like(param))
            else:
                param.copy_(0.15 * torch.randn_like(param))
        # a state marker with a large embedding gives the goal-state screen a real effect
        model.bert.embeddings.word_embeddings.weight[token_dict[planted]] *= 10.0
    model.save_pretrained(ckpt, safe_serialization=var.weights_file == "model.safetensors")
    for stem, obj in (
        ("token_dictionary", token_dict),
        ("gene_median_dictionary", medians),
        ("gene_name_id_dict", names),
        ("ensembl_mapping_dict", mapping),
    ):
        with open(ckpt / f"{stem}_{var.suffix}.pkl", "wb") as f:
            pickle.dump(obj, f)
    return {
        **picks,
        "alias": {alias: alias_target},
        "n_unknown": len(unknown),
        "n_in_vocab": len(in_adata),
        "config": config.to_dict(),
    }


def picks_from_fixture(src: Path) -> dict[str, Any]:
    calls = json.loads((src / "reference_calls.json").read_text())
    keys = ("overexpress_genes", "single_gene", "anchor_gene", "delete_genes", "planted_gene")
    return {k: calls[k] for k in keys}


# ----------------------------------------------------------------------------- reference
def scratch_package(reference: Path, work: Path, dict_dir: Path) -> dict[str, int]:
    """Copy the package; map ``"cuda"`` to ``"cpu"``; point its dictionaries at ``dict_dir``."""
    dest = work / "pkg" / "geneformer"
    shutil.rmtree(dest.parent, ignore_errors=True)
    shutil.copytree(reference / "geneformer", dest)
    replaced = {}
    for name in CUDA_FILES:
        path = dest / name
        text = path.read_text()
        replaced[name] = text.count('"cuda"')
        path.write_text(text.replace('"cuda"', '"cpu"'))
    init = dest / "__init__.py"
    text = init.read_text()
    text = text.replace(
        'Path(__file__).parent / "gene_dictionaries_30m/', 'Path(__file__).parent / "'
    )
    text = text.replace("Path(__file__).parent /", f"Path({str(dict_dir)!r}) /")
    init.write_text(text)
    return replaced


def _tokens(dataset) -> tuple[list[list[int]], list[int], list[str]]:
    ids = [list(map(int, x)) for x in dataset["input_ids"]]
    return ids, [int(i) for i in dataset["orig_index"]], [str(s) for s in dataset["disease"]]


def _values(v: Any) -> list[float]:
    if not isinstance(v, list):
        v = [v]
    return [float(x) for x in v]


def raw_arrays(
    run_dir: Path,
    cells: list[int],
    cell_tokens: dict[int, list[int]],
    id_of: dict[int, str],
    perturbed_tokens: list[int],
    has_states: bool,
    skip_tokens: set[int],
) -> dict[str, np.ndarray]:
    """The reference's pickles as flat arrays keyed by (cell, perturbed[, affected])."""

    def name(key: Any) -> str:
        return "+".join(id_of[t] for t in key) if isinstance(key, tuple) else id_of[key]

    per_cell, per_set = [], {}
    for path in run_dir.glob("*_raw.pickle"):
        kind = "gene" if "gene_embs" in path.name else "cell"
        m = re.search(r"_(\d+)batch(-?\d+)_raw\.pickle$", path.name)
        if m:  # genes="all": one cell (h) per file, split into pickle batches
            per_cell.append((int(m.group(1)), int(m.group(2)), kind, _load_pickle(path)))
        else:
            per_set[kind] = _load_pickle(path)
    co, cp, cv = [], [], []
    shifts: dict[str, list[float]] = defaultdict(list)
    go, gp, ga, gv = [], [], [], []
    for h, _, kind, data in sorted(per_cell, key=lambda x: (x[0], x[1], x[2])):
        cell = cells[h]
        if kind == "gene":
            for (pert, aff), v in data.items():
                vals = _values(v)
                go += [cell] * len(vals)
                gp += [name(pert)] * len(vals)
                ga += [id_of[aff]] * len(vals)
                gv += vals
        elif has_states:
            first = True
            for state, d in data.items():
                for (pert, _), v in d.items():
                    vals = _values(v)
                    if first:
                        co += [cell] * len(vals)
                        cp += [name(pert)] * len(vals)
                    shifts[state] += vals
                first = False
        else:
            for (pert, _), v in data.items():
                vals = _values(v)
                co += [cell] * len(vals)
                cp += [name(pert)] * len(vals)
                cv += vals
    if "cell" in per_set:
        data = per_set["cell"]
        items = data.items() if not has_states else next(iter(data.values())).items()
        for (pert, _), v in items:
            vals = _values(v)
            assert len(vals) == len(cells), (run_dir, len(vals), len(cells))
            co += cells
            cp += [name(pert)] * len(vals)
            cv += vals
        if has_states:
            for state, d in data.items():
                for _, v in d.items():
                    shifts[state] += _values(v)
    if "gene" in per_set:
        # each key's values follow the cells holding the affected gene, in processing order
        pert_set = set(perturbed_tokens)
        by_cell: dict[int, dict[int, float]] = defaultdict(dict)
        pert_name = None
        for (pert, aff), v in per_set["gene"].items():
            pert_name = name(pert)
            vals = _values(v)
            holders = [c for c in cells if aff in cell_tokens[c]]
            assert len(holders) == len(vals), (run_dir, aff, len(holders), len(vals))
            for c, x in zip(holders, vals):
                by_cell[c][aff] = x
        for c in cells:  # reference order: cells in processing order, genes in rank order
            for t in cell_tokens[c]:
                if t in pert_set or t in skip_tokens:
                    continue
                go.append(c)
                gp.append(pert_name)
                ga.append(id_of[t])
                gv.append(by_cell[c].pop(t))
        assert not any(by_cell.values())
    out = {
        "cells": np.asarray(cells, dtype=np.int64),
        "cell_obs_index": np.asarray(co, dtype=np.int64),
        "cell_perturbed": np.asarray(cp, dtype=str),
    }
    if has_states:
        for state, vals in shifts.items():
            assert len(vals) == len(co)
            out[f"cell_shift_to_{state}"] = np.asarray(vals, dtype=np.float32)
    else:
        out["cell_cos_sim"] = np.asarray(cv, dtype=np.float32)
    if go:
        out["gene_obs_index"] = np.asarray(go, dtype=np.int64)
        out["gene_perturbed"] = np.asarray(gp, dtype=str)
        out["gene_affected"] = np.asarray(ga, dtype=str)
        out["gene_cos_sim"] = np.asarray(gv, dtype=np.float32)
    return out


def run_reference(out: Path, var: Variant, args: argparse.Namespace, picks: dict) -> dict:
    import torch

    # the reference's CPU results depend on the thread count through reduction order
    torch.set_num_threads(1)
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ckpt = out / "checkpoint"
    cuda = scratch_package(Path(args.reference), work, ckpt.resolve())
    sys.path.insert(0, str(work / "pkg"))
    import anndata as ad
    import datasets
    import geneformer
    from geneformer import (
        EmbExtractor,
        InSilicoPerturber,
        InSilicoPerturberStats,
        TranscriptomeTokenizer,
    )

    assert Path(geneformer.__file__).is_relative_to(work), geneformer.__file__

    # 0. tokenise (the reference needs n_counts; orig_index carries the row identity)
    adata = ad.read_h5ad(out / "input.h5ad")
    adata.obs["n_counts"] = np.asarray(adata.X.sum(axis=1)).ravel()
    adata.obs["orig_index"] = np.arange(adata.n_obs)
    (work / "h5ad").mkdir()
    adata.write_h5ad(work / "h5ad" / "input.h5ad")
    tk = TranscriptomeTokenizer(
        {"orig_index": "orig_index", "disease": "disease"},
        nproc=1,
        model_version=var.model_version,
    )
    tk.tokenize_data(str(work / "h5ad"), str(work), "tok", file_format="h5ad")
    data_file = str(work / "tok.dataset")
    dataset = datasets.load_from_disk(data_file)
    ids, rows, disease = _tokens(dataset)
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    padded = np.full((len(ids), lengths.max()), -1, dtype=np.int64)
    for i, x in enumerate(ids):
        padded[i, : len(x)] = x
    np.savez_compressed(
        out / "tokens.npz",
        input_ids=padded,
        lengths=lengths,
        cell_index=np.asarray(rows, dtype=np.int64),
        state=np.asarray(disease, dtype=str),
    )
    tokens_of = dict(zip(rows, ids))
    token_dict = _load_pickle(ckpt / f"token_dictionary_{var.suffix}.pkl")
    id_of = {int(v): k for k, v in token_dict.items()}
    specials = {int(token_dict[s]) for s in ("<cls>", "<eos>") if s in token_dict}

    # 1. state embeddings
    embex = EmbExtractor(
        model_type="Pretrained",
        num_classes=0,
        emb_mode=var.cell_mode,
        max_ncells=None,
        emb_layer=args.emb_layer,
        summary_stat="exact_mean",
        forward_batch_size=16,
        nproc=1,
        model_version=var.model_version,
    )
    state_embs = embex.get_state_embs(STATES, str(ckpt), data_file, str(work), "state_embs")
    np.savez_compressed(
        out / "state_embs.npz", **{k: v.cpu().numpy() for k, v in state_embs.items()}
    )

    # 2. perturbation runs; the reference's own filtered, sorted cells are recorded
    seen: dict[str, Any] = {}
    for meth in RUN_METHODS:
        original = getattr(InSilicoPerturber, meth)

        def wrapped(self, model, filtered, layer, prefix, _original=original, _meth=meth):
            seen.update(cells=[int(i) for i in filtered["orig_index"]], layer=layer, method=_meth)
            return _original(self, model, filtered, layer, prefix)

        setattr(InSilicoPerturber, meth, wrapped)
    # V1 overexpress of a list with padded batches raises (quirk 4): one cell per batch
    oe_fbs = 16 if var.special else 1
    runs = {
        "delete_all": dict(perturb_type="delete", genes_to_perturb="all", emb_mode=var.gene_mode),
        "overexpress_set": dict(
            perturb_type="overexpress",
            genes_to_perturb=picks["overexpress_genes"],
            emb_mode=var.gene_mode,
            forward_batch_size=oe_fbs,
        ),
        "overexpress_one": dict(
            perturb_type="overexpress",
            genes_to_perturb=[picks["single_gene"]],
            emb_mode=var.gene_mode,
            forward_batch_size=oe_fbs,
        ),
        "delete_set": dict(
            perturb_type="delete", genes_to_perturb=picks["delete_genes"], emb_mode=var.gene_mode
        ),
        "goal_state": dict(
            perturb_type="delete",
            genes_to_perturb="all",
            emb_mode=var.cell_mode,
            cell_states_to_model=STATES,
            state_embs_dict=state_embs,
        ),
        "null_test": dict(
            perturb_type="delete",
            genes_to_perturb="all",
            emb_mode=var.cell_mode,
            filter_data={"disease": [STATES["start_state"]]},
        ),
        "null_null": dict(
            perturb_type="delete",
            genes_to_perturb="all",
            emb_mode=var.cell_mode,
            filter_data={"disease": [STATES["goal_state"], *STATES["alt_states"]]},
        ),
        "combo_anchor": dict(
            perturb_type="delete",
            genes_to_perturb="all",
            emb_mode=var.cell_mode,
            combos=1,
            anchor_gene=picks["anchor_gene"],
        ),
    }
    for run in args.last_layer_runs:  # emb_layer=0: the last encoder layer
        runs[run]["emb_layer"] = 0
    calls: dict[str, Any] = {
        "variant": var.name,
        "model_version": var.model_version,
        "seed": args.seed,
        "cell_states_to_model": STATES,
        **picks,
        "isp_runs": {},
        "stats_runs": {},
    }
    raw_dir, stats_dir = out / "raw", out / "stats"
    raw_dir.mkdir(exist_ok=True)
    stats_dir.mkdir(exist_ok=True)

    def perturb(name: str, kw: dict[str, Any], run_dir: Path) -> tuple[Any, dict]:
        full = dict(
            model_type="Pretrained",
            num_classes=0,
            emb_layer=args.emb_layer,
            max_ncells=None,
            forward_batch_size=16,
            nproc=1,
            model_version=var.model_version,
        )
        full.update(kw)
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        seen.clear()
        isp = InSilicoPerturber(**full)
        isp.perturb_data(str(ckpt), data_file, str(run_dir), name)
        return isp, full

    def perturb_raw(name: str, kw: dict, run_dir: Path) -> tuple[Any, dict, dict]:
        """One reference run and its raw arrays."""
        isp, full = perturb(name, kw, run_dir)
        genes = kw["genes_to_perturb"]
        pert_tokens = [] if genes == "all" else [int(token_dict[g]) for g in genes]
        arrays = raw_arrays(
            run_dir,
            seen["cells"],
            tokens_of,
            id_of,
            pert_tokens,
            "cell_states_to_model" in kw,
            specials,
        )
        return isp, full, arrays

    for name, kw in runs.items():
        isp, full, arrays = perturb_raw(name, kw, work / "runs" / name)
        recorded = {
            k: ("<state_embs_dict>" if k == "state_embs_dict" else v) for k, v in full.items()
        }
        calls["isp_runs"][name] = {
            "args": recorded,
            "emb_mode_effective": isp.emb_mode,
            "n_cells_processed": len(seen["cells"]),
        }
        if kw.get("anchor_gene"):
            arrays["anchor_gene"] = np.asarray(kw["anchor_gene"])
        np.savez_compressed(raw_dir / f"{name}.npz", **arrays)
        print(f"ran {name}: {len(seen['cells'])} cells, {seen['method']}, layer {seen['layer']}")

    # 3. statistics
    oe, one, dset = picks["overexpress_genes"], [picks["single_gene"]], picks["delete_genes"]
    anchor = picks["anchor_gene"]
    agg, every = "aggregate_gene_shifts", "all"
    combo = dict(genes_perturbed=every, combos=1, anchor_gene=anchor)
    stats = {
        "delete_all_aggregate_gene_shifts": (
            "delete_all",
            None,
            dict(mode=agg, genes_perturbed=every),
        ),
        "delete_all_mixture_model": (
            "delete_all",
            None,
            dict(mode="mixture_model", genes_perturbed=every),
        ),
        "overexpress_set_aggregate_data": (
            "overexpress_set",
            None,
            dict(mode="aggregate_data", genes_perturbed=oe),
        ),
        "overexpress_set_aggregate_gene_shifts": (
            "overexpress_set",
            None,
            dict(mode=agg, genes_perturbed=oe),
        ),
        "overexpress_one_aggregate_data": (
            "overexpress_one",
            None,
            dict(mode="aggregate_data", genes_perturbed=one),
        ),
        "delete_set_aggregate_gene_shifts": (
            "delete_set",
            None,
            dict(mode=agg, genes_perturbed=dset),
        ),
        "goal_state_shift": (
            "goal_state",
            None,
            dict(mode="goal_state_shift", genes_perturbed=every, cell_states_to_model=STATES),
        ),
        "vs_null": ("null_test", "null_null", dict(mode="vs_null", genes_perturbed=every)),
        "combo_anchor_aggregate_gene_shifts": ("combo_anchor", None, dict(mode=agg, **combo)),
        "combo_anchor_mixture_model": ("combo_anchor", None, dict(mode="mixture_model", **combo)),
    }
    for sname, (run, null, kw) in stats.items():
        entry: dict[str, Any] = {"ok": True, "args": kw}
        try:
            st = InSilicoPerturberStats(model_version=var.model_version, **kw)
            null_dir = str(work / "runs" / null) if null else None
            st.get_stats(str(work / "runs" / run), null_dir, str(stats_dir), sname)
        except Exception as err:  # the reference raises for some modes: record it
            entry = {"ok": False, "args": kw, "error": f"{type(err).__name__}: {err}"}
            (stats_dir / f"{sname}.csv").unlink(missing_ok=True)
            traceback.print_exc()
        calls["stats_runs"][sname] = entry
        print(f"stats {sname}: {'ok' if entry['ok'] else entry['error']}")

    # 4. forward_batch_size sensitivity (not saved): the same run with one cell per batch
    tolerances = {}
    for name in args.sensitivity_runs:
        kw = dict(runs[name], forward_batch_size=1)
        _, _, again = perturb_raw(name, kw, work / "fbs1" / name)
        saved = np.load(raw_dir / f"{name}.npz")
        for key in saved.files:
            if saved[key].dtype == np.float32:
                diff = float(np.abs(saved[key] - again[key]).max())
                label = key.replace("cell_shift_to_", "shift_to_")
                tolerances[f"{name} {label}: fbs 16 vs 1, max abs diff"] = diff
    (out / "tolerances.json").write_text(json.dumps(tolerances, indent=2) + "\n")
    calls["_meta"] = {
        "cuda_replaced": cuda,
        "stats_inputs": {k: (v[0], v[1]) for k, v in stats.items()},
    }
    return calls


def write_calls(out: Path, work: Path, calls: dict) -> dict:
    meta = calls.pop("_meta")
    (work / "meta.json").write_text(json.dumps(meta))
    (out / "reference_calls.json").write_text(json.dumps(calls, indent=1) + "\n")
    return meta


HEADER = """# Geneformer in silico perturbation parity fixture: {variant} ({style})

Reference: HF repo `ctheodoris/Geneformer`, package `geneformer/` at upstream commit
`05fcbeb8a27d49e0a7a4349152202ee2c1cbfd28`: `TranscriptomeTokenizer`, `InSilicoPerturber`,
`InSilicoPerturberStats`, `EmbExtractor.get_state_embs`.
Generated by `python tests/scripts/make_isp_fixture.py {argv}` run with the reference's
interpreter (the script only calls the reference package).
Only change to the scratch copy of the package: every `"cuda"` string literal replaced by `"cpu"`
in {cuda} (the reference hard-codes the device); the package default dictionary paths (V1 and V2)
point at this fixture's `checkpoint/` dictionaries.
Environment: Python {python}, {versions}.
CPU, float32, `model.eval()` (dropout off), `torch.set_num_threads(1)`, `nproc=1`,
`PYTHONHASHSEED=0`, all reference calls in one Python process.

## Files

| file | bytes |
|---|---|
{files}

## checkpoint/ and input.h5ad

- `checkpoint/`: tiny random `BertForMaskedLM` in the {version} release layout: vocab {vocab_size},
  hidden {hidden}, {n_layers} layers, {heads} heads, FFN {ffn}, {act}, eps {eps},
  max_position_embeddings {max_pos}, dropouts {dropout}. Files: {ckpt_files}.
{weights}
- Dictionaries with the package names/formats: {dicts} (python int token values; real Ensembl ids
  drawn from the real {version} token dictionary, kept in its order and renumbered after {specials};
  medians: real V1 values, synthetic lognormal where a gene has none; name dict restricted from
  the real V1 name dict; mapping dict synthetic: identity plus one alias).
- `input.h5ad`: {n_obs} cells × {n_vars} genes of raw integer counts (float32 CSR; negative
  binomial r=1.5 with state-specific fold changes for ~25% of genes, sd 2.5 on the log scale;
  lognormal library sizes). obs `disease` (categorical: {state_counts} cells), `batch`; no
  `filter_pass` column: all cells are tokenised. Tokenised cells per state: {tok_states}.
  var_names = Ensembl ids, var columns `ensembl_id`, `gene_symbols`. Genes: {n_vocab} in the
  vocabulary, {n_unknown} real Ensembl ids not in the vocabulary (ignored), {n_alias} synthetic
  alias id(s) mapped by the mapping dictionary onto in-vocabulary genes that are also present
  ({aliases}; the tokenizer sums their counts into the target).
  Tokenised lengths: {len_min}–{len_max} (mean {len_mean:.1f}){len_note}.

## Reference calls (in this order)

0. `obs["n_counts"] = X.sum(axis=1)` (all genes), `obs["orig_index"] = arange(n)`;
   `TranscriptomeTokenizer({{"orig_index": "orig_index", "disease": "disease"}}, nproc=1,
   model_version="{version}").tokenize_data(dir, out, "tok", file_format="h5ad")` (defaults
   otherwise) → `tok.dataset`, saved as `tokens.npz`.
1. Every `InSilicoPerturber(...)` below also gets `model_type="Pretrained", num_classes=0,
   emb_layer={emb_layer}, max_ncells=None, nproc=1, model_version="{version}"` (unless the table
   says otherwise) and the defaults `perturb_rank_shift=None, cell_emb_style="mean_pool",
   cell_inds_to_perturb="all", clear_mem_ncells=1000`; it is run as
   `.perturb_data(checkpoint, tok.dataset, <own dir>, <run name>)`. `forward_batch_size` = 16
   unless stated.

| run (raw file) | perturb_type | genes_to_perturb | emb_mode | other arguments | cells |
|---|---|---|---|---|---|
{run_rows}

   Genes: overexpress set {oe}; single {single}; anchor {anchor}; deleted together {dset}.
{v1_note}
2. State embeddings (before `goal_state`): `EmbExtractor(model_type="Pretrained", num_classes=0,
   emb_mode="{cell_mode}", max_ncells=None, emb_layer={emb_layer}, summary_stat="exact_mean",
   forward_batch_size=16, nproc=1, model_version="{version}").get_state_embs(cell_states_to_model,
   checkpoint, tok.dataset, dir, "state_embs")`.
3. `InSilicoPerturberStats(mode, genes_perturbed, [combos, anchor_gene, cell_states_to_model],
   model_version="{version}").get_stats(<run dir>, <null run dir or None>, stats/, <name>)`,
   package-default dictionaries:

| stats file | input run | arguments | rows |
|---|---|---|---|
{stats_rows}

`reference_calls.json` lists every call's arguments, the emb_mode the reference actually used, and
the stats calls that raised (with the error).

## What the reference computes (L = {n_layers} layers)

- **Cells and their order.** After `filter_data`, the start-state filter (goal_state run), the
  "contains all genes_to_perturb" filter (delete with a gene list) and the "has the anchor" filter,
  cells are sorted by token length, longest first (pyarrow stable sort: equal lengths keep
  tokenised order). `max_ncells=None`: no subsampling. Raw arrays list cells in this processing
  order (`cells`, recorded from the dataset the reference hands to its `isp_perturb_*` method).
- **Layer.** `emb_layer=-1` → `hidden_states[L-1]` (output of the second-to-last encoder layer;
  `hidden_states[0]` is the embedding output); `emb_layer=0` → `hidden_states[L]` (last layer).
  Layers used here: {layers_used}.
"""

SEMANTICS_V2 = """\
- **genes_to_perturb="all", delete.** Each cell is run alone (no padding); for every gene
  position 1 … length-2 (never `<cls>`/`<eos>`) one perturbed copy without that gene; the copies go
  through the model in batches of forward_batch_size (attention mask all ones), genes in rank order.
  - gene value (`cls_and_gene`): cosine similarity of each other gene's vector in the perturbed copy
    vs in the original cell (positions re-aligned after the deletion); `<cls>`/`<eos>` are not
    genes.
  - cell value (runs without cell states): cosine similarity of the `<cls>` vector (position 0) of
    the perturbed vs the original cell.
- **Goal state.** Cell vector = the `<cls>` vector. For each state s in [start, goal, *alt]
  (`state_embs.npz`): shift_s = cos(perturbed vector, S_s) − cos(original vector, S_s) (positive =
  towards s). S_s = exact mean, over ALL tokenised cells of state s, of the EmbExtractor `cls`
  embedding (padded, attention-masked batches of 16).
- **Overexpress (gene list, `perturb_group`).** All cells. Perturbed cell = remove the listed genes
  where present, then insert all of them, in the given order, after `<cls>`. Original embeddings are
  compared with the listed genes' positions removed, perturbed embeddings without the inserted
  block. Gene value as above; cell value: `<cls>` cosine. Padded, attention-masked batches.
- **Delete (gene list).** Only cells containing ALL listed genes; perturbed cell = the cell without
  them. Gene value as above; cell value: `<cls>` cosine. Padded, attention-masked batches of 16.
- **combos=1 + anchor_gene.** Cells containing the anchor; for every other gene g (rank order) a
  copy without both the anchor and g; cell value: `<cls>` cosine; keyed by g.
- **null_test / null_null.** Like `delete_all` (cell values only) on the start-state cells and on
  the other cells.
"""

SEMANTICS_V1 = """\
- **No special tokens (V1).** Every position is a gene; there is no `<cls>`, so every cell
  value is built from gene vectors.
- **genes_to_perturb="all", delete.** Each cell is run alone (no padding); for every gene position
  0 … length-1 one perturbed copy without that gene; the copies all have `length − 1` tokens and go
  through the model in batches of forward_batch_size (attention mask all ones), genes in rank order.
  - gene value (`cell_and_gene`): cosine similarity of each other gene's vector in the perturbed
    copy vs in the original cell (positions re-aligned after the deletion).
  - cell value (runs without cell states): the MEAN over the other genes of those per-gene cosine
    similarities (`torch.mean(gene_cos_sims, dim=1)`), not the cosine of mean-pooled embeddings;
    the same in `cell` mode.
- **Goal state.** Cell vector = mean of the cell's gene vectors (`mean_pool`). For each state s in
  [start, goal, *alt] (`state_embs.npz`): shift_s = cos(perturbed vector, S_s) − cos(original
  vector, S_s). S_s = exact mean, over ALL tokenised cells of state s, of the EmbExtractor `cell`
  embedding (mean of the cell's non-padding gene vectors; padded, attention-masked batches of 16).
- **Overexpress (gene list, `perturb_group`).** All cells, one per forward batch (quirk 4).
  Perturbed cell = remove the listed genes where present, then insert all of them, in the given
  order, at position 0 (no truncation needed: max input 2048). Original embeddings are compared
  with the listed genes' positions removed, perturbed embeddings without the inserted block. Gene
  value: per remaining gene as above. Cell value: mean of the remaining genes' cosines.
- **Delete (gene list).** Only cells containing ALL listed genes; perturbed cell = the cell without
  them; original embeddings compared with those positions removed. Gene value as above; cell value:
  mean of the remaining genes' cosines (non-padding positions). Padded, attention-masked batches of
  16 cells.
- **combos=1 + anchor_gene.** Cells containing the anchor; for every other gene g (rank order) a
  copy without both the anchor and g; cell value: mean of the remaining genes' cosines; keyed by g.
- **null_test / null_null.** Like `delete_all` (cell values only) on the start-state cells and on
  the other cells.
"""

TAIL = """
## raw/*.npz (float32 values are exact: the reference's lists hold float32 values as python floats)

- `cells` int64: input.h5ad row (= `orig_index`) of each processed cell, in processing order.
- `cell_obs_index` int64 [N], `cell_perturbed` str [N]: for each cell-level value, the cell
  (input.h5ad row) and the perturbed gene's Ensembl id (gene sets: ids joined by `+` in the given
  order; combo: the partner gene, the anchor is in `anchor_gene`). Order = reference order (cells in
  processing order, genes in rank order).
- `cell_cos_sim` float32 [N]: the cell value defined above (a cosine SIMILARITY, 1 = no change).
- `cell_shift_to_<state>` float32 [N] (goal_state only, one per state incl. the start state).
- `gene_obs_index`, `gene_perturbed`, `gene_affected` str, `gene_cos_sim` float32 [M] (`*_and_gene`
  runs): per (cell, perturbed gene, other gene) the gene value, in reference order (for gene-list
  runs the cell of each value is reconstructed from the reference's append order and checked
  against the list sizes).
- `tokens.npz`: `input_ids` int64 [{n}, {width}] (-1 padded), `lengths`, `cell_index` (input.h5ad
  row), `state`. `state_embs.npz`: one float32 [{hidden}] vector per state name.

## stats/*.csv (verbatim `DataFrame.to_csv` of the reference)

First, unnamed column: the reference's internal row label, not meaningful. Token columns hold
token ids; names come from the gene-name dictionary (empty if the gene has no symbol). Means/stds
are over the pooled per-cell values (numpy float64, std with ddof=0). p-values:
`scipy.stats.ranksums` (two-sided, normal approximation); FDR: Benjamini–Hochberg (`statsmodels
multipletests(method="fdr_bh")`) over all rows of the file; `Sig` = FDR < 0.05. Columns and row
orders are those described in `tests/data/fixtures/geneformer_isp/README.md` (same reference code).

Stats calls that ran: {ran}; raised: {raised}.

## Random elements and how they are fixed

- Fixture construction: `numpy.random.default_rng({seed})` (vocabulary and gene picks, var order,
  state assignment, fold changes, counts, synthetic medians), `torch.manual_seed({seed})`
  (weights). Genes to perturb / anchor / planted gene are chosen deterministically from detection
  rates.
- Reference: nothing random is exercised. Dropout is off (eval). `max_ncells=None` everywhere; the
  goal-state `random.sample(seed 42)` only happens above 100,000 pooled values; the mixture model
  uses `random_state=0` (results depend on the scikit-learn version).
- Stats read the raw pickles in `os.listdir` order: this only changes float summation order.

## Determinism and tolerances

forward_batch_size sensitivity (reference re-run with forward_batch_size=1, not saved):
{tolerances}

p-values are rank based: float32 noise can swap near-equal pooled values, and for a gene with few
detections one swap moves its p-value by up to ~1% relative. Recompute them from the fixture's raw
values for an exact check. Compare rows by key (Ensembl ids), not by position.

## Reference quirks met (upstream file:line in the 05fcbeb package)

1. Device hard-coded: `"cuda"` → `"cpu"` in the scratch copy only.
2. `aggregate_data` with more than one gene raises `ValueError: Length of values (k) does not match
   length of index` (`in_silico_perturber_stats.py:230`).
3. `mixture_model` with `combos=1` raises `TypeError: 'float' object is not subscriptable`
   (`in_silico_perturber_stats.py:567`).
4. V1 overexpress of a gene list with padded batches (forward_batch_size > 1) raises a size
   mismatch in `quant_cos_sims` (`in_silico_perturber.py:676`;
   `perturber_utils.remove_perturbed_indices_set` removes positions from the PADDED original
   embeddings): hence `forward_batch_size=1` for the V1 overexpress runs.
5. `emb_mode="cell_and_gene"` is refused for `<cls>` data (`cls_and_gene` is its V2 name); with
   `anchor_gene` the reference silently changes `cell_and_gene` → `cell`.
6. A goal-state run in a `*_and_gene` mode breaks `goal_state_shift` (`read_dictionaries`); hence a
   cell-only mode for `goal_state`.
"""


def _fmt_genes(genes: list[str]) -> str:
    return "[" + ", ".join(f"'{g}'" for g in genes) + "]"


def _versions() -> str:
    from importlib.metadata import version

    pkgs = ("torch", "transformers", "datasets", "numpy", "pandas", "scipy", "statsmodels")
    pkgs += ("scikit-learn", "anndata", "pyarrow")
    return ", ".join(f"{p} {version(p)}" for p in pkgs)


def _run_row(name: str, run: dict, emb_layer: int) -> str:
    shown = ("model_type", "num_classes", "max_ncells", "nproc", "model_version", "perturb_type")
    shown += ("genes_to_perturb", "emb_mode")
    a = run["args"]
    other = []
    for k, v in a.items():
        default = (k == "forward_batch_size" and v == 16) or (k == "emb_layer" and v == emb_layer)
        if k in shown or default:
            continue
        if k == "state_embs_dict":
            other.append("state_embs_dict=(state_embs.npz as torch tensors)")
        else:
            other.append(f"{k}={json.dumps(v)}")
    mode = a["emb_mode"]
    if run["emb_mode_effective"] != mode:
        mode += f" (used: {run['emb_mode_effective']})"
    genes = a["genes_to_perturb"]
    genes = '"all"' if genes == "all" else _fmt_genes(genes)
    other_text = ", ".join(other) or "–"
    return (
        f'| `{name}` | {a["perturb_type"]} | {genes} | "{mode}" | {other_text} '
        f"| {run['n_cells_processed']} |"
    )


def _stats_row(out: Path, name: str, entry: dict, inputs: tuple[str, str | None]) -> str:
    run, null = inputs
    parts = []
    for k, v in entry["args"].items():
        if k == "cell_states_to_model":
            parts.append("cell_states_to_model as above")
        elif k == "genes_perturbed" and v != "all":
            parts.append(f"{k}={_fmt_genes(v)}")
        else:
            parts.append(f"{k}={json.dumps(v)}")
    src = run + (f", null: {null}" if null else "")
    if entry["ok"]:
        with open(out / "stats" / f"{name}.csv") as f:
            rows = sum(1 for _ in f) - 1
        return f"| `{name}.csv` | {src} | {', '.join(parts)} | {rows} |"
    return f"| (none: reference raises) | {src} | {', '.join(parts)} | {entry['error']} |"


def write_readme(
    out: Path, var: Variant, args: argparse.Namespace, calls: dict, meta: dict, built: bool
) -> None:
    """A README in the style of the vendored fixture's, with this fixture's numbers."""
    import anndata as ad
    import pandas as pd

    ckpt = out / "checkpoint"
    config = json.loads((ckpt / "config.json").read_text())
    token_dict = _load_pickle(ckpt / f"token_dictionary_{var.suffix}.pkl")
    mapping = _load_pickle(ckpt / f"ensembl_mapping_dict_{var.suffix}.pkl")
    symbol = {e: s for s, e in _load_pickle(ckpt / f"gene_name_id_dict_{var.suffix}.pkl").items()}
    tok = np.load(out / "tokens.npz")
    adata = ad.read_h5ad(out / "input.h5ad")
    present = [set(row[:n].tolist()) for row, n in zip(tok["input_ids"], tok["lengths"])]
    n_layers = int(config["num_hidden_layers"])
    runs, stats = calls["isp_runs"], calls["stats_runs"]

    def gene(g: str) -> str:
        t = int(token_dict[g])
        n = sum(t in x for x in present)
        return f"`{g}` ({symbol.get(g, 'no symbol')}, token {t}, in {n}/{len(present)} cells)"

    planted = gene(calls["planted_gene"])
    if built:
        weights = (
            f"  Weights: `torch.manual_seed({args.seed})`, HF init, then LayerNorm weights "
            "1+0.1·N(0,1),\n  biases 0.05·N(0,1), all other matrices 0.15·N(0,1); finally the "
            f'word-embedding row of the "planted"\n  gene {planted} is multiplied by 10.0 (the '
            "largest start-minus-goal detection rate: a\n  genuine state-specific effect)."
        )
    else:
        weights = (
            f"  Checkpoint and `input.h5ad` copied from `{args.inputs_from}`; planted {planted}."
        )
    sig = []
    for name in ("goal_state_shift", "vs_null"):
        if (out / "stats" / f"{name}.csv").exists():
            sig.append(f"{name} {int(pd.read_csv(out / 'stats' / f'{name}.csv')['Sig'].sum())}")
    weights += " Rows with Sig = 1: " + ", ".join(sig) + "."
    aliases = {g: mapping[g] for g in adata.var_names if mapping.get(g, g) != g}
    lengths = tok["lengths"]
    counts = adata.obs["disease"].value_counts()
    tok_counts = pd.Series(tok["state"]).value_counts()
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "README.md")
    argv = " ".join(sys.argv[1:]).replace(str(out), "OUT")
    layers_used = sorted({n_layers + r["args"]["emb_layer"] for r in runs.values()})
    v1_note = (
        "   V1 data have no `<cls>`: the modes are `cell` / `cell_and_gene`. The overexpress runs\n"
        "   use forward_batch_size=1 (quirk 4).\n"
        if not var.special
        else ""
    )
    tolerances = json.loads((out / "tolerances.json").read_text())
    text = HEADER.format(
        variant=var.name,
        style=(
            "V2-style: `<cls>`/`<eos>`, 4096 input"
            if var.special
            else "V1-style: no `<cls>`/`<eos>`, 2048 input"
        ),
        argv=argv,
        cuda=", ".join(f"`{k}` ({v}×)" for k, v in meta["cuda_replaced"].items()),
        python=sys.version.split()[0],
        versions=_versions(),
        files="\n".join(f"| `{p.relative_to(out)}` | {p.stat().st_size:,} |" for p in files),
        version=var.model_version,
        vocab_size=config["vocab_size"],
        hidden=config["hidden_size"],
        n_layers=n_layers,
        heads=config["num_attention_heads"],
        ffn=config["intermediate_size"],
        act=config["hidden_act"],
        eps=config["layer_norm_eps"],
        max_pos=config["max_position_embeddings"],
        dropout=config["hidden_dropout_prob"],
        ckpt_files=", ".join(f"`{p.name}`" for p in sorted(ckpt.iterdir()) if p.suffix != ".pkl"),
        weights=weights,
        dicts=", ".join(f"`{p.name}`" for p in sorted(ckpt.glob("*.pkl"))),
        specials=", ".join(f"`{t}` {token_dict[t]}" for t in token_dict if t.startswith("<")),
        n_obs=adata.n_obs,
        n_vars=adata.n_vars,
        state_counts=", ".join(f"{s} {int(counts[s])}" for s in counts.index),
        tok_states=", ".join(f"{s} {int(tok_counts.get(s, 0))}" for s in counts.index),
        n_vocab=sum(g in token_dict for g in adata.var_names),
        n_unknown=sum(g not in token_dict and g not in aliases for g in adata.var_names),
        n_alias=len(aliases),
        aliases=", ".join(f"`{a}`→`{b}`" for a, b in aliases.items()),
        len_min=lengths.min(),
        len_max=lengths.max(),
        len_mean=lengths.mean(),
        len_note=" incl. `<cls>`/`<eos>`" if var.special else " (no special tokens)",
        emb_layer=args.emb_layer,
        run_rows="\n".join(_run_row(n, r, args.emb_layer) for n, r in runs.items()),
        oe=", ".join(gene(g) for g in calls["overexpress_genes"]),
        single=gene(calls["single_gene"]),
        anchor=gene(calls["anchor_gene"]),
        dset=", ".join(f"`{g}`" for g in calls["delete_genes"]),
        v1_note=v1_note,
        cell_mode=var.cell_mode,
        stats_rows="\n".join(
            _stats_row(out, n, e, meta["stats_inputs"][n]) for n, e in stats.items()
        ),
        layers_used=", ".join(f"`hidden_states[{i}]`" for i in layers_used),
    )
    text += SEMANTICS_V2 if var.special else SEMANTICS_V1
    text += TAIL.format(
        n=len(lengths),
        width=tok["input_ids"].shape[1],
        hidden=config["hidden_size"],
        ran=", ".join(k for k, v in stats.items() if v["ok"]),
        raised=", ".join(k for k, v in stats.items() if not v["ok"]),
        seed=args.seed,
        tolerances="\n".join(f"- {k}: {v:.3g}" for k, v in tolerances.items()),
    )
    (out / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", required=True, help="checkout of ctheodoris/Geneformer")
    parser.add_argument("--out", required=True)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="v1")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--vocab", default=str(DEFAULT_VOCAB), help="real dictionaries")
    parser.add_argument("--inputs-from", help="reuse checkpoint/ and input.h5ad of a fixture")
    parser.add_argument("--work", default=None, help="scratch folder (default: OUT.work)")
    parser.add_argument("--n-cells", type=int, default=52)
    parser.add_argument("--n-vocab", type=int, default=130)
    parser.add_argument("--n-unknown", type=int, default=6)
    parser.add_argument("--vocab-in-adata", type=float, default=0.9)
    parser.add_argument("--library-size", type=float, default=120.0)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--emb-layer", type=int, choices=(-1, 0), default=-1, help="all runs")
    parser.add_argument("--last-layer-runs", nargs="*", default=["delete_set"])
    parser.add_argument("--sensitivity-runs", nargs="*", default=["goal_state", "delete_set"])
    args = parser.parse_args(argv)
    if os.environ.get("PYTHONHASHSEED") != "0":
        # set iteration order (reference filters and dictionaries) must be reproducible
        env = dict(os.environ, PYTHONHASHSEED="0")
        argv = sys.argv[1:] if argv is None else argv
        sys.exit(subprocess.call([sys.executable, __file__, *argv], env=env))
    var = VARIANTS[args.variant]
    out = Path(args.out)
    args.work = args.work or str(out) + ".work"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if args.inputs_from:
        src = Path(args.inputs_from)
        shutil.copytree(src / "checkpoint", out / "checkpoint")
        shutil.copy(src / "input.h5ad", out / "input.h5ad")
        picks = picks_from_fixture(src)
        args.seed = json.loads((src / "reference_calls.json").read_text())["seed"]
        built: dict[str, Any] = {}
    else:
        built = build_inputs(out, var, args)
        picks = {
            k: built[k]
            for k in (
                "overexpress_genes",
                "single_gene",
                "anchor_gene",
                "delete_genes",
                "planted_gene",
            )
        }
    calls = run_reference(out, var, args, picks)
    meta = write_calls(out, Path(args.work), calls)
    write_readme(out, var, args, calls, meta, bool(built))
    print("wrote", out)


if __name__ == "__main__":
    main()
