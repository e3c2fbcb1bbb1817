"""CellFM embedding throughput vs genes per cell (linear retention => linear cost).

Builds a randomly initialised CellFM of the released 80M size (d=1536, 2 layers, 48 heads,
27,855-gene vocabulary), embeds random cells with exactly G expressed genes for
G = 512 ... 4096, and prints cells/s and the time per gene token. With linear attention the
time per gene stays flat: the printed ratio (time per gene vs the smallest G) should stay near
1 (a quadratic model would double it at every doubling of G).

    python benchmarks/cellfm_embed.py               # CPU, ~1 minute on 2 cores
    python benchmarks/cellfm_embed.py --device cuda --cells 64 --repeats 5
"""

from __future__ import annotations

import argparse
import time

import anndata as ad
import numpy as np
import pandas as pd
import torch

from scfm.model import CellFM

N_GENES_80M = 27_855


def _adata(n_cells: int, n_genes: int, n_expressed: int, rng: np.random.Generator) -> ad.AnnData:
    counts = np.zeros((n_cells, n_genes), dtype=np.float32)
    for i in range(n_cells):
        cols = rng.choice(n_genes, n_expressed, replace=False)
        counts[i, cols] = rng.integers(1, 20, n_expressed)
    genes = [f"GENE{i:05d}" for i in range(n_genes)]
    return ad.AnnData(counts, var=pd.DataFrame(index=genes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cells", type=int, default=2, help="cells per size (one minibatch)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--sizes", default="512,1024,2048,4096")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = np.random.default_rng(0)
    template = _adata(args.cells, N_GENES_80M, max(sizes), rng)
    CellFM.setup_anndata(template)
    model = CellFM(template, enc_dims=1536, enc_nlayers=2, enc_num_heads=48, max_tokens=None)
    module = model.module.to(args.device).eval()
    dtype = getattr(torch, args.dtype)
    n_params = sum(p.numel() for p in module.parameters())
    print(f"CellFM 80M-sized random model: {n_params / 1e6:.1f} M parameters on {args.device}")
    print(f"{'genes/cell':>10} {'cells/s':>10} {'ms/cell':>10} {'us/gene':>10} {'ratio':>7}")
    base = None
    times = []
    for g in sizes:
        counts = torch.as_tensor(_adata(args.cells, N_GENES_80M, g, rng).X, device=args.device)
        with (
            torch.inference_mode(),
            torch.autocast(
                device_type=torch.device(args.device).type,
                dtype=dtype,
                enabled=dtype != torch.float32,
            ),
        ):
            tokens = module.tokenize(counts)
            assert int(tokens.n_tokens.min()) == g
            module.encode(tokens.gene_ids, tokens.values, tokens.token_mask)  # warm-up
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.repeats):
                tokens = module.tokenize(counts)
                module.encode(tokens.gene_ids, tokens.values, tokens.token_mask)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            elapsed = (time.perf_counter() - start) / args.repeats
        times.append(elapsed)
        per_cell = elapsed / args.cells
        per_gene = per_cell / g
        base = base or per_gene
        print(
            f"{g:>10d} {1 / per_cell:>10.2f} {per_cell * 1e3:>10.1f} "
            f"{per_gene * 1e6:>10.2f} {per_gene / base:>7.2f}"
        )
    print("ratio = time per gene / time per gene at the smallest size (linear scaling: ~1)")
    growth = ", ".join(
        f"{sizes[i]}->{sizes[i + 1]}: x{times[i + 1] / times[i]:.2f}" for i in range(len(sizes) - 1)
    )
    print(f"time growth per step of genes/cell (linear: x{sizes[1] / sizes[0]:.0f}): {growth}")


if __name__ == "__main__":
    main()
