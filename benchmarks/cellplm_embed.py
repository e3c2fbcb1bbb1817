"""Throughput and peak memory of CellPLM embeddings: scfm vs a reference-style forward.

The reference ``CellEmbeddingPipeline`` feeds every ``obs["batch"]`` group as ONE sequence
(a 20,000-cell sample is one forward pass over a dense 20,000-cell sentence). scfm packs whole
sentences into minibatches of at most ``batch_size`` cells, and ``chunk_size`` bounds a
sentence, so memory stays bounded however many cells a sample holds.

Each mode runs in its own process (peak RSS is per process)::

    python benchmarks/cellplm_embed.py                # all modes, real-sized random model
    python benchmarks/cellplm_embed.py --n-cells 2000 --width 256   # quick run

Modes: ``reference`` (one 20,000-cell sentence, one forward), ``scfm-batches`` (20 samples of
1,000 cells, minibatches of 4,096 cells), ``scfm-chunked`` (one 20,000-cell sample,
``chunk_size=1000``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

MODES = ("reference", "scfm-batches", "scfm-chunked")


def _data(n_cells: int, n_genes: int, n_samples: int, seed: int = 0) -> ad.AnnData:
    from scfm.data import gene_table

    rng = np.random.default_rng(seed)
    genes = gene_table()["ensembl_id"].drop_duplicates().iloc[:n_genes].tolist()
    x = sp.random(n_cells, n_genes, density=0.1, format="csr", random_state=seed, dtype=np.float32)
    x.data = rng.poisson(3.0, size=x.nnz).astype(np.float32) + 1
    adata = ad.AnnData(x, var={"gene": genes})
    adata.var_names = genes
    adata.obs["batch"] = [f"s{i % n_samples:03d}" for i in range(n_cells)]
    return adata


def _config(width: int) -> dict:
    # the released 85M architecture (19,374-gene vocabulary), optionally narrower
    return {
        "enc_hid": width,
        "enc_layers": 4,
        "post_latent_dim": width // 2,
        "dec_hid": width,
        "latent_mod": "vae",
        "batch_num": 0,
        "dataset_num": 0,
    }


def run_mode(mode: str, n_cells: int, n_genes: int, width: int) -> dict:
    import scfm

    torch.manual_seed(0)
    n_samples = 1 if mode in ("reference", "scfm-chunked") else max(1, n_cells // 1000)
    adata = _data(n_cells, n_genes, n_samples)
    scfm.model.CellPLM.setup_anndata(adata)
    vocab = scfm.data.gene_table()["ensembl_id"].drop_duplicates().iloc[:19374].tolist()
    model = scfm.model.CellPLM(adata, config=_config(width), gene_list=vocab)
    model.module.eval()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if mode == "reference":
        with torch.inference_mode():
            x = torch.as_tensor(adata.X.toarray())
            z = model.module.inference(x, torch.zeros(n_cells, dtype=torch.long))["z"]
    elif mode == "scfm-batches":
        z = model.get_latent_representation(progress_bar=False)
    else:
        z = model.get_latent_representation(chunk_size=1000, progress_bar=False)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "mode": mode,
        "cells_per_s": n_cells / elapsed,
        "peak_rss_mb": peak / 1024,
        "rss_growth_mb": (peak - rss0) / 1024,
        "shape": list(np.asarray(z).shape),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=20_000)
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", choices=MODES)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.n_cells, args.n_genes, args.width)))
        return
    results = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--mode", mode, "--n-cells", str(args.n_cells)]
        cmd += ["--n-genes", str(args.n_genes), "--width", str(args.width)]
        cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    print(f"{args.n_cells} cells, {args.n_genes} genes, width {args.width}, {args.threads} threads")
    print(f"{'mode':<14}{'cells/s':>10}{'peak RSS MB':>14}{'RSS growth MB':>16}")
    for r in results.values():
        print(
            f"{r['mode']:<14}{r['cells_per_s']:>10.0f}{r['peak_rss_mb']:>14.0f}"
            f"{r['rss_growth_mb']:>16.0f}"
        )
    ref = results["reference"]
    for mode in MODES[1:]:
        r = results[mode]
        print(
            f"{mode} / reference: speed x{r['cells_per_s'] / ref['cells_per_s']:.2f}, "
            f"memory growth x{r['rss_growth_mb'] / max(ref['rss_growth_mb'], 1e-9):.2f}"
        )


if __name__ == "__main__":
    main()
