"""Throughput of scFoundation cell embeddings: scfm's batched path vs one cell at a time.

Both paths use the same real-sized random weights (768 x 12 encoder over the 19,264-gene
list) and the same synthetic cells (~1,900 non-zero genes each, like real data). The
one-cell-at-a-time baseline follows the reference ``get_embedding.py``: a dense 19,266-value
vector per cell, gathering of the non-zero values, the reference ``pytorchTransformerModule``
(``torch.nn.TransformerEncoderLayer`` called with the all-``False`` key-padding mask the
reference passes) and pooling. The same loop without the mask, which lets torch take its
unmasked fused path, is timed as a second, stronger baseline. Prints cells/s of each, the
ratios, the achieved GFLOP/s against a float32 matmul measured in the same run, and the
bf16-autocast figure of the batched path separately.

Usage::

    python benchmarks/scfoundation_embed.py [--n-cells 32] [--n-genes 1900] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from scfm.data import scfoundation_gather, scfoundation_preprocess
from scfm.io import read_scfoundation_gene_list
from scfm.model import ScFoundation


def synthetic_cells(n_cells: int, n_genes: int, genes: list[str], seed: int = 0) -> ad.AnnData:
    """Raw counts with ``n_genes +- 10%`` non-zero genes per cell over the full gene list."""
    rng = np.random.default_rng(seed)
    rows, cols, vals = [], [], []
    for i in range(n_cells):
        k = int(n_genes * rng.uniform(0.9, 1.1))
        idx = rng.choice(len(genes), size=k, replace=False)
        rows.append(np.full(k, i))
        cols.append(idx)
        vals.append(rng.geometric(0.4, size=k))
    x = sp.csr_matrix(
        (np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n_cells, len(genes)),
    )
    adata = ad.AnnData(x)
    adata.var_names = genes
    return adata


class ReferenceEncoder(nn.Module):
    """The reference ``pytorchTransformerModule`` with the model's weights.

    A ``ModuleList`` of ``torch.nn.TransformerEncoderLayer`` (post-LN, ReLU), each called with
    ``src_key_padding_mask`` as the reference does (all ``False`` for one cell), then a final
    LayerNorm. ``key_padding_mask=False`` drops the mask: a stronger baseline than the
    reference, reported separately.
    """

    def __init__(self, model: ScFoundation) -> None:
        super().__init__()
        cfg = model.module.config
        d = cfg.encoder_hidden_dim
        self.transformer_encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(d, cfg.encoder_heads, 4 * d, batch_first=True)
            for _ in range(cfg.encoder_depth)
        )
        self.norm = nn.LayerNorm(d)
        self.load_state_dict(model.module.encoder.state_dict())
        self.eval()

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        for layer in self.transformer_encoder:
            x = layer(x, src_key_padding_mask=padding)
        return self.norm(x)


@torch.inference_mode()
def one_cell_at_a_time(
    model: ScFoundation, adata: ad.AnnData, key_padding_mask: bool = True
) -> np.ndarray:
    """The reference's loop: one dense cell, gather non-zeros, encode, pool 'all'."""
    module = model.module
    enc = ReferenceEncoder(model)
    x = adata.X.toarray()
    out = []
    for i in range(adata.n_obs):
        aligned = torch.zeros(1, module.config.n_genes, dtype=torch.float64)
        aligned[0, torch.as_tensor(model.gene_alignment.vocab_index)] = torch.as_tensor(
            x[i, model.gene_alignment.var_index], dtype=torch.float64
        )
        values = scfoundation_preprocess(aligned, "F", "t4")
        gathered, ids, padding = scfoundation_gather(values)
        h = module.token_emb(gathered) + module.pos_emb(ids)
        h = enc(h, padding if key_padding_mask else None)
        out.append(torch.cat([h[:, -1], h[:, -2], h[:, :-2].amax(1), h[:, :-2].mean(1)], dim=1))
    return torch.cat(out).numpy()


def encoder_gflop(lengths: np.ndarray, d: int, depth: int) -> float:
    """FLOPs (2 per multiply-add) of the encoder over the given (unpadded) token counts."""
    per_layer = 24 * d * d * lengths + 4 * lengths.astype(np.float64) ** 2 * d
    return float(per_layer.sum() * depth / 1e9)


def matmul_gflops(d: int, seconds: float = 3.0) -> float:
    """float32 GEMM throughput of a (2048 x d) @ (d x 4d) product, best of a few runs."""
    a, b = torch.randn(2048, d), torch.randn(d, 4 * d)
    flop = 2 * 2048 * d * 4 * d
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        for _ in range(5):
            torch.mm(a, b)
        best = max(best, 5 * flop / (time.perf_counter() - t) / 1e9)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=32)
    parser.add_argument("--n-genes", type=int, default=1900, help="non-zero genes per cell")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--depth", type=int, default=12, help="encoder layers (12 = release)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16-autocast run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    genes = read_scfoundation_gene_list()
    adata = synthetic_cells(args.n_cells, args.n_genes, genes)
    ScFoundation.setup_anndata(adata)
    model = ScFoundation(adata, config={"encoder_depth": args.depth})
    model.module.eval()
    d = model.module.config.encoder_hidden_dim
    lengths = np.asarray((adata.X > 0).sum(1)).ravel() + 2  # + T and S tokens
    gflop = encoder_gflop(lengths, d, args.depth)

    peak = matmul_gflops(d)
    # warm-up of every path on two cells
    model.get_latent_representation(indices=[0, 1], progress_bar=False)
    one_cell_at_a_time(model, adata[:2])
    one_cell_at_a_time(model, adata[:2], key_padding_mask=False)

    def timed(fn: Callable[..., np.ndarray], *fn_args, **fn_kwargs) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        result = fn(*fn_args, **fn_kwargs)
        return result, time.perf_counter() - start

    base, t_base = timed(one_cell_at_a_time, model, adata)
    z, t_batch = timed(
        model.get_latent_representation, batch_size=args.batch_size, progress_bar=False
    )
    nomask, t_nomask = timed(one_cell_at_a_time, model, adata, key_padding_mask=False)

    def line(name: str, seconds: float) -> str:
        rate = gflop / seconds
        return f"{name:<42}{args.n_cells / seconds:8.3f} cells/s {rate:7.1f} GFLOP/s " + (
            f"({rate / peak:.0%} of peak)"
        )

    print(f"cells: {args.n_cells}, non-zero genes per cell: {lengths.mean() - 2:.0f}, "
          f"encoder depth {args.depth}, threads {torch.get_num_threads()}")  # fmt: skip
    print(f"float32 matmul peak (same run): {peak:.1f} GFLOP/s")
    print(line("one cell at a time (reference)", t_base))
    print(line("one cell at a time, no key-padding mask", t_nomask))
    print(line(f"scfm batched (bs={args.batch_size})", t_batch))
    print(f"ratio batched / one-at-a-time (float32): {t_base / t_batch:.2f}x   "
          f"(max |difference| of embeddings {float(np.abs(z - base).max()):.1e})")  # fmt: skip
    print(f"ratio batched / one-at-a-time without the mask (float32): {t_nomask / t_batch:.2f}x "
          f"(max |difference| {float(np.abs(z - nomask).max()):.1e})")  # fmt: skip
    if not args.no_bf16:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            t = time.perf_counter()
            zb = model.get_latent_representation(batch_size=args.batch_size, progress_bar=False)
            t_bf16 = time.perf_counter() - t
        print(f"scfm batched bf16 autocast: {args.n_cells / t_bf16:8.3f} cells/s  "
              f"ratio vs one-at-a-time float32 {t_base / t_bf16:.2f}x  "
              f"(max |difference| vs float32 {float(np.abs(zb - z).max()):.1e})")  # fmt: skip


if __name__ == "__main__":
    main()
