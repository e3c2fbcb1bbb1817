"""Peak memory of out-of-core embedding stays flat when the number of cells grows 10x.

For each size the script writes a real-shaped sparse ``.h5ad`` (cells resampled from the
700 PBMCs shipped with scfm, raw UMI counts, 765 genes), opens it ``backed="r"`` in a fresh
process, embeds every cell with a small randomly initialised Geneformer and reports the
process's peak RSS. It also checks that output rows follow input order: every resampled cell
must get exactly the embedding of its source PBMC.

    python benchmarks/embed_memory.py                  # 20,000 and 200,000 cells
    python benchmarks/embed_memory.py --sizes 2000 20000

Prints one line per size and the ratio of peak RSS (largest / smallest); the goal is a
ratio <= 1.2.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

#: A Geneformer small enough that 200k cells embed in minutes on 2 CPU cores.
ARCH = {
    "variant": "V1",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "input_size": 64,
}


def write_dataset(path: Path, n_cells: int, seed: int = 0) -> np.ndarray:
    """Write ``n_cells`` PBMCs drawn with replacement; return each row's source cell."""
    import anndata as ad
    import scipy.sparse as sp

    import scfm

    pbmc = scfm.datasets.pbmc68k_reduced_counts()
    x = sp.csr_matrix(pbmc.X, dtype=np.float32)
    source = np.random.default_rng(seed).integers(0, pbmc.n_obs, n_cells)
    adata = ad.AnnData(X=x[source], var=pbmc.var[[]].copy())
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    adata.write_h5ad(path)
    return source


def child(path: str, out: str, batch_size: int) -> None:
    """Embed a backed file in this (fresh) process; save embeddings and peak RSS."""
    import anndata as ad
    import torch

    import scfm

    torch.manual_seed(0)
    torch.set_num_threads(2)
    adata = ad.read_h5ad(path, backed="r")
    scfm.model.Geneformer.setup_anndata(adata)
    model = scfm.model.Geneformer(adata, **ARCH)
    start = time.perf_counter()
    z = model.get_latent_representation(batch_size=batch_size, progress_bar=False)
    seconds = time.perf_counter() - start
    np.save(out, z)
    # VmHWM, not ru_maxrss: a child started by subprocess inherits the parent's high-water
    # mark at fork, which here would be the memory used to write the data set
    peak_mb = C.peak_rss_bytes() / 2**20
    print(json.dumps({"peak_rss_mb": peak_mb, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.batch_size)
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        reference = None
        for n in sorted(args.sizes):
            path = Path(tmp) / f"cells_{n}.h5ad"
            source = write_dataset(path, n)
            out = Path(tmp) / f"z_{n}.npy"
            result = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--batch-size",
                    str(args.batch_size),
                    "--child",
                    str(path),
                    str(out),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            stats = json.loads(result.stdout.strip().splitlines()[-1])
            z = np.load(out)
            # Each PBMC's embedding, taken from its first copy, must equal every copy's row.
            if reference is None:
                reference = {}
            for cell in np.unique(source):
                rows_of = np.flatnonzero(source == cell)
                first = reference.setdefault(int(cell), z[rows_of[0]])
                assert np.allclose(z[rows_of], first, atol=1e-5), "row order broken"
            rows.append((n, stats["peak_rss_mb"], stats["seconds"], path.stat().st_size / 2**20))
            path.unlink()

    print(f"{'cells':>9} {'file MB':>9} {'peak RSS MB':>12} {'cells/s':>9}")
    for n, rss, sec, size in rows:
        print(f"{n:>9} {size:>9.0f} {rss:>12.0f} {n / sec:>9.0f}")
    ratio = rows[-1][1] / rows[0][1]
    print(
        f"peak RSS ratio {rows[-1][0]:,} / {rows[0][0]:,} cells: {ratio:.2f} "
        f"(goal <= 1.20: {'met' if ratio <= 1.2 else 'NOT met'}); output order == input order: ok"
    )


if __name__ == "__main__":
    main()
