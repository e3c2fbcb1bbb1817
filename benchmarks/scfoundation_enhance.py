"""Read-depth enhancement on PBMCs: do enhanced embeddings cluster thinned cells better?

The paper's experiment: thin real counts (binomial downsampling), then embed the shallow
cells with the 'rde' model telling it the original depth (T > S), and compare how well
clusters recover the cell types (ARI of k-means with k = number of labels) against the
thinned data itself. With ``--checkpoint`` the released ``models.ckpt`` is used; without it
a tiny scFoundation is pretrained here on the same PBMCs with the read-depth-aware
objective (a smoke-scale stand-in: it shows the pipeline, not the released model's quality).

Usage::

    python benchmarks/scfoundation_enhance.py [--checkpoint DIR] [--fraction 0.1]
        [--epochs 5] [--data tests/data/data/pbmc68k_reduced_counts.h5ad]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc
import scvi
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score

import scfm
from scfm.model import ScFoundation

DATA = (
    Path(__file__).resolve().parents[1] / "tests" / "data" / "data" / "pbmc68k_reduced_counts.h5ad"
)
TINY = {
    "encoder_hidden_dim": 64,
    "encoder_depth": 2,
    "encoder_heads": 4,
    "encoder_dropout": 0.0,
    "decoder_hidden_dim": 32,
    "decoder_depth": 1,
    "decoder_heads": 4,
    "decoder_dim_head": 8,
    "bin_num": 16,
}


def ari(z: np.ndarray, labels: np.ndarray, n_pcs: int = 30) -> float:
    """Mean ARI over 3 k-means seeds on the first ``n_pcs`` principal components."""
    if z.shape[1] > n_pcs:
        z = PCA(n_pcs, random_state=0).fit_transform(z)
    k = len(np.unique(labels))
    scores = [
        adjusted_rand_score(labels, KMeans(k, n_init=10, random_state=s).fit_predict(z))
        for s in range(3)
    ]
    return float(np.mean(scores))


def log_normalised(adata: ad.AnnData) -> np.ndarray:
    b = adata.copy()
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    return np.asarray(b.X.toarray() if hasattr(b.X, "toarray") else b.X)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="released scFoundation folder")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--fraction", type=float, default=0.1, help="binomial thinning p")
    parser.add_argument("--epochs", type=int, default=5, help="tiny-model pretraining epochs")
    parser.add_argument("--label-key", default="bulk_labels")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    scvi.settings.seed = 0  # Lightning's seeding: the tiny model's initialisation and training

    full = ad.read_h5ad(args.data)
    x = np.asarray(full.X.toarray() if hasattr(full.X, "toarray") else full.X)
    rng = np.random.default_rng(0)
    thin = ad.AnnData(
        rng.binomial(x.astype(np.int64), args.fraction).astype(np.float32),
        obs=full.obs.copy(),
        var=full.var.copy(),
    )
    keep = np.asarray(thin.X.sum(1)).ravel() > 0
    full, thin = full[keep].copy(), thin[keep].copy()
    labels = full.obs[args.label_key].astype(str).to_numpy()
    print(f"{full.n_obs} cells; median depth {np.median(x[keep].sum(1)):.0f} -> "
          f"{np.median(thin.X.sum(1)):.0f} after thinning (p = {args.fraction})")  # fmt: skip

    ScFoundation.setup_anndata(full)
    if args.checkpoint:
        model = ScFoundation.from_pretrained(args.checkpoint, full, weights="rde")
    else:
        genes = list(full.var_names)
        model = ScFoundation(full, config={**TINY, "seq_len": len(genes) + 2}, gene_list=genes)
        t = time.perf_counter()
        model.train(max_epochs=args.epochs, lr=2e-3, batch_size=32, enable_progress_bar=False)
        loss = np.asarray(model.history["train_loss"], dtype=float).ravel()
        elapsed = time.perf_counter() - t
        print(f"pretrained a tiny model for {args.epochs} epochs in {elapsed:.0f}s: "
              f"train loss {loss[0]:.3f} -> {loss[-1]:.3f}")  # fmt: skip
    ScFoundation.setup_anndata(thin)

    fold = np.log10(1 / args.fraction)
    rows = [
        ("full counts, log-normalised", ari(log_normalised(full), labels)),
        ("thinned counts, log-normalised", ari(log_normalised(thin), labels)),
        (
            "scFoundation thinned, T = S",
            ari(
                model.get_latent_representation(thin, tgthighres="f1", progress_bar=False),
                labels,
            ),
        ),
    ]
    z = scfm.tl.enhance_depth(model, thin, tgthighres=f"a{fold:.3f}", progress_bar=False)
    rows.append((f"scFoundation thinned, enhanced T = S + {fold:.2f}", ari(z, labels)))
    for name, score in rows:
        print(f"ARI {score:.3f}  {name}")


if __name__ == "__main__":
    main()
