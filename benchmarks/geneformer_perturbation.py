"""Genome-wide in silico deletion screen: scfm vs the reference ``InSilicoPerturber``.

A random Geneformer release of the released size (V1-10M: 6 layers, 256 wide, 2,048 inputs,
written by ``geneformer_embed.write_release``) and cells of ~``--genes`` expressed genes; each
side deletes every expressed gene of every cell, one forward pass per (cell, gene), and scores
the cell embedding shift (V1 ``emb_mode="cell"``: the mean of the per-gene cosines;
``--gene-shifts``: ``"cell_and_gene"``, every other gene's cosine too). Each side runs in its
own process:

* ``scfm``: ``scfm.tl.in_silico_perturbation(model, adata, "all", "delete", store=...)`` (the
  copies of a cell stacked without padding, results streamed to part files).
* ``reference`` (``--reference-dir`` = a checkout of ctheodoris/Geneformer, its interpreter via
  ``--reference-python`` or ``<checkout>/.venv``): ``InSilicoPerturber(perturb_type="delete",
  genes_to_perturb="all", emb_layer=-1, forward_batch_size=100).perturb_data`` on the same
  tokens (the reference tokenisation, written in numpy by ``geneformer_embed``); its hard-coded
  ``"cuda"`` is mapped to the CPU at run time and its V1 dictionary paths to the release's.
* ``mirror`` (no checkout): the reference's path written here (HF ``BertForMaskedLM`` with
  ``output_hidden_states``, one cell at a time, batches of 100 copies), labelled as such.

Throughput is (cell, gene) perturbations per second, model loading and tokenisation excluded.
Memory: ``mem_ratio`` is the ratio of the peak resident sets (``VmHWM``, imports included, as
``benchmarks/run.py`` computes it); ``working_mem_ratio`` that of the peaks above each
process's resident set once model and data are loaded (the screen's own memory; for the
reference, model loading happens inside ``perturb_data`` and is counted). The cell values of
both sides are compared. Prints a summary, the line ``geneformer_isp ratio=<scfm/baseline
throughput> mem_ratio=<scfm/baseline peak RSS> working_mem_ratio=<...> baseline=...`` and,
last, ``RESULT {json}`` (protocol in benchmarks/README.md).

    python benchmarks/geneformer_perturbation.py [--cells 1] [--genes 600] [--quick]
    python benchmarks/geneformer_perturbation.py --reference-dir /path/to/Geneformer \\
        --reference-python /path/to/venv/bin/python
"""

from __future__ import annotations

import argparse
import glob
import pickle
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C
import geneformer_embed as GE

VARIANT = "V1"
REF_BATCH = 100  # InSilicoPerturber's default forward_batch_size


def _save(out: str, obs: list[int], genes: list[str], cos: list[float]) -> None:
    import numpy as np

    np.savez(
        out,
        obs=np.asarray(obs, dtype=np.int64),
        gene=np.asarray(genes, dtype=str),
        cos=np.asarray(cos, dtype=np.float32),
    )


# --------------------------------------------------------------------------- workers
def worker_scfm(args) -> None:
    import anndata as ad

    import scfm

    C.set_threads(args.threads)
    adata = ad.read_h5ad(args.data)
    scfm.model.Geneformer.setup_anndata(adata)
    model = scfm.model.Geneformer.from_pretrained(args.release, adata)
    base = C.rss_bytes()
    with tempfile.TemporaryDirectory() as store, C.Timer() as t:
        table = scfm.tl.in_silico_perturbation(
            model,
            adata,
            "all",
            "delete",
            hidden_layer=-2,
            gene_shifts=args.gene_shifts,
            batch_size=args.batch_size,
            store=store,
            progress_bar=False,
        )
    _save(
        args.out,
        table["obs_index"].tolist(),
        table["perturbed"].astype(str).tolist(),
        table["cos_sim"].tolist(),
    )
    C.worker_report(perturbations=len(table), seconds=t.seconds, setup_rss=base)


def _tokens_dataset(args, tmp: str) -> tuple[str, list[list[int]]]:
    import anndata as ad
    from datasets import Dataset

    adata = ad.read_h5ad(args.data)
    seqs = GE._reference_tokens(adata, Path(args.release), VARIANT)
    ds = Dataset.from_dict(
        {"input_ids": seqs, "length": [len(s) for s in seqs], "orig_index": list(range(len(seqs)))}
    )
    ds.save_to_disk(f"{tmp}/tok.dataset")
    return f"{tmp}/tok.dataset", seqs


def _processing_order(seqs: list[list[int]]) -> list[int]:
    """The reference's cell order: longest first (stable)."""
    return sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))


def worker_reference(args) -> None:
    C.set_threads(args.threads)
    sys.path.insert(0, str(Path(args.reference_dir).resolve()))
    GE._cpu_only_cuda()
    import geneformer
    from geneformer import InSilicoPerturber

    rel = Path(args.release)
    suffix = GE.VARIANTS[VARIANT]["suffix"]
    token_file = str(rel / f"token_dictionary_{suffix}.pkl")
    # model_version="V1" reads the package's own gc30M dictionary paths: point them here.
    geneformer.TOKEN_DICTIONARY_FILE_30M = token_file
    with tempfile.TemporaryDirectory() as tmp:
        data, seqs = _tokens_dataset(args, tmp)
        isp = InSilicoPerturber(
            perturb_type="delete",
            genes_to_perturb="all",
            model_type="Pretrained",
            num_classes=0,
            emb_mode="cell_and_gene" if args.gene_shifts else "cell",
            emb_layer=-1,
            max_ncells=None,
            forward_batch_size=REF_BATCH,
            nproc=1,
            model_version=VARIANT,
            token_dictionary_file=token_file,
        )
        base = C.rss_bytes()
        with C.Timer() as t:
            isp.perturb_data(str(rel), data, tmp, "bench")
        order = _processing_order(seqs)
        names = {v: k for k, v in C.read_pickle(token_file).items()}
        obs, genes, cos = [], [], []
        for path in glob.glob(f"{tmp}/*_dict_cell_embs_*_raw.pickle"):
            h = int(re.search(r"_(\d+)batch", path).group(1))
            with open(path, "rb") as fh:
                for (token, _), values in pickle.load(fh).items():
                    obs += [order[h]] * len(values)
                    genes += [names[token]] * len(values)
                    cos += list(values)
    _save(args.out, obs, genes, cos)
    C.worker_report(perturbations=len(cos), seconds=t.seconds, setup_rss=base)


def worker_mirror(args) -> None:
    """The reference's path for V1 ``emb_mode="cell"``, written here (labelled ``mirror``)."""
    import anndata as ad
    import torch
    from transformers import BertForMaskedLM

    C.set_threads(args.threads)
    seqs = GE._reference_tokens(ad.read_h5ad(args.data), Path(args.release), VARIANT)
    model = BertForMaskedLM.from_pretrained(args.release, output_hidden_states=True).eval()
    layer = model.config.num_hidden_layers - 1  # emb_layer=-1
    tokens = C.read_pickle(Path(args.release) / "token_dictionary_gc30M.pkl")
    names = {v: k for k, v in tokens.items()}
    cos_fn = torch.nn.CosineSimilarity(dim=2)
    base = C.rss_bytes()
    obs, genes, cos = [], [], []
    with C.Timer() as t, torch.no_grad():
        for cell in _processing_order(seqs):
            seq = seqs[cell]
            orig = model(input_ids=torch.tensor([seq])).hidden_states[layer][0]
            batch = [seq[:i] + seq[i + 1 :] for i in range(len(seq))]
            for s in range(0, len(batch), REF_BATCH):
                ids = torch.tensor(batch[s : s + REF_BATCH])
                h = model(input_ids=ids).hidden_states[layer]
                comp = torch.stack(
                    [torch.cat([orig[:i], orig[i + 1 :]]) for i in range(s, s + len(ids))]
                )
                values = cos_fn(h, comp).mean(1)  # V1 cell value: mean of the gene cosines
                obs += [cell] * len(ids)
                genes += [names[seq[i]] for i in range(s, s + len(ids))]
                cos += values.tolist()
    _save(args.out, obs, genes, cos)
    C.worker_report(perturbations=len(cos), seconds=t.seconds, setup_rss=base)


# --------------------------------------------------------------------------- driver
def _compare(a: str, b: str) -> dict:
    import numpy as np

    za, zb = np.load(a), np.load(b)
    ka = {(int(o), str(g)): float(c) for o, g, c in zip(za["obs"], za["gene"], za["cos"])}
    kb = {(int(o), str(g)): float(c) for o, g, c in zip(zb["obs"], zb["gene"], zb["cos"])}
    same = set(ka) == set(kb)
    diff = max((abs(ka[k] - kb[k]) for k in ka if k in kb), default=float("nan"))
    return {"same_perturbations": same, "max_abs_diff": diff, "n_perturbations": len(kb)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1)
    parser.add_argument("--genes", type=int, default=600, help="expressed genes per cell")
    parser.add_argument("--quick", action="store_true", help="1 cell of ~300 genes")
    parser.add_argument("--gene-shifts", action="store_true", help='"cell_and_gene" mode')
    parser.add_argument("--batch-size", type=int, default=None, help="scfm copies per forward")
    parser.add_argument("--reference-dir", help="checkout of ctheodoris/Geneformer")
    parser.add_argument("--reference-python", help="interpreter for the reference")
    parser.add_argument("--work-dir", help="where the release and cells are written")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--worker", choices=["scfm", "reference", "mirror"], help=argparse.SUPPRESS)
    for a in ("--release", "--data", "--out"):
        parser.add_argument(a, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if C.run_worker_if_asked(
        args, scfm=worker_scfm, reference=worker_reference, mirror=worker_mirror
    ):
        return {}
    # Released cells hold ~2,000 genes; the reference needs ~1 s per perturbation at that
    # length, so one cell of 600 (quick: 300) genes keeps a run within minutes while the
    # copies are long enough for the screen's memory, not the import footprints, to count.
    n_cells, n_genes = (1, 300) if args.quick else (args.cells, args.genes)
    work = C.work_dir(args.work_dir)
    release = GE.write_release(work / f"geneformer-{VARIANT}", VARIANT)
    # n_genes (+-5%) expressed genes per cell, drawn as for the screens measured so far
    data = GE.write_data(
        work / f"isp-{VARIANT}-cells{n_cells}-genes{n_genes}.h5ad",
        VARIANT,
        n_cells,
        n_genes,
        seed=3,
        spread=0.05,
    )
    common = ["--release", str(release), "--data", str(data)]
    if args.gene_shifts:
        common += ["--gene-shifts"]
    kind = C.chosen_baseline(args)
    out_s, out_b = work / "isp-scfm.npz", work / f"isp-{kind}.npz"
    s_argv, b_argv = C.worker_commands(__file__, args, common, out_s, out_b)
    scfm = C.run_worker(s_argv, timeout=args.timeout)
    base = C.run_worker(b_argv, timeout=args.timeout)
    res: dict = {
        "model": f"geneformer-isp-{VARIANT}",
        "baseline": kind,
        "cells": n_cells,
        "genes_per_cell": n_genes,
        "gene_shifts": args.gene_shifts,
    }
    for side, rep in (("scfm", scfm), ("baseline", base)):
        if "error" in rep:
            res[f"{side}_error"] = rep["error"]
            continue
        res[f"{side}_perturbations_per_s"] = rep["perturbations"] / rep["seconds"]
        res[f"{side}_peak_rss"] = rep["peak_rss"]
        res[f"{side}_working_memory"] = max(rep["peak_rss"] - rep["setup_rss"], 1)
    if "scfm_error" not in res and "baseline_error" not in res:
        res.update(_compare(str(out_s), str(out_b)))
        res["ratio"] = res["scfm_perturbations_per_s"] / res["baseline_perturbations_per_s"]
        res["mem_ratio"] = res["scfm_peak_rss"] / res["baseline_peak_rss"]  # as run.py
        res["working_mem_ratio"] = res["scfm_working_memory"] / res["baseline_working_memory"]
    for k, v in res.items():
        print(f"   {k}: {v}")
    print(
        f"geneformer_isp ratio={res.get('ratio', float('nan')):.3f} "
        f"mem_ratio={res.get('mem_ratio', float('nan')):.3f} "
        f"working_mem_ratio={res.get('working_mem_ratio', float('nan')):.3f} baseline={kind}"
    )
    C.emit_result(
        **res,
        scfm_cells_per_s=(res.get("scfm_perturbations_per_s") or 0) / n_genes or None,
        baseline_cells_per_s=(res.get("baseline_perturbations_per_s") or 0) / n_genes or None,
    )
    return res


if __name__ == "__main__":
    main()
