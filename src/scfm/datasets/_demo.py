"""The offline first experience behind ``scfm demo``.

A small Geneformer-architecture model is pretrained from scratch on 700 PBMCs shipped with
scfm within a time budget, its embedding is clustered and scored against the known cell
types, and the same is done with scanpy's PCA on the same cells, so that the number the demo
prints has a baseline next to it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._pbmc import pbmc68k_reduced_counts

logger = logging.getLogger(__name__)

__all__ = ["DEMO_ARCHITECTURE", "DEMO_HIDDEN_LAYER", "format_report", "run_demo"]

#: A small Geneformer-V1-style network: 2 layers, 64 wide, each cell read as its 64
#: top-ranked genes. Dropout is off: it would only slow down a model this small.
DEMO_ARCHITECTURE: dict[str, Any] = {
    "variant": "V1",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "input_size": 64,
}
#: Encoder layer the demo reads its cell embedding from (0 = the gene-embedding layer, mean
#: over the cell's genes). After a minute of training, the gene embeddings have learnt which
#: genes occur together; the attention layers need far more training than that.
DEMO_HIDDEN_LAYER = 0
#: Learning rate and minibatch size of the demo's pretraining.
DEMO_LEARNING_RATE = 3e-3
DEMO_BATCH_SIZE = 32
#: Pretraining steps (minibatches) at most; on 2 idle CPU cores they take about 40 s.
DEMO_MAX_STEPS = 1000
#: Share of the cells whose labels are hidden and predicted by label transfer.
HELD_OUT_FRACTION = 0.25


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Use ``n`` torch threads inside the block (tiny models run fastest on one)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _budget(max_steps: int, seconds: float, progress_bar: bool) -> Any:
    """A Lightning callback: stop after ``max_steps`` or ``seconds``; show steps, time, loss."""
    from lightning.pytorch.callbacks import Callback
    from tqdm.auto import tqdm

    class Budget(Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.start = 0.0
            self.elapsed = 0.0
            self.bar = None

        def on_train_start(self, trainer, pl_module) -> None:
            self.start = time.perf_counter()
            self.bar = tqdm(
                total=max_steps, desc="pretraining", unit="step", disable=not progress_bar
            )

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss))
            self.elapsed = time.perf_counter() - self.start
            if self.bar is not None:
                self.bar.set_postfix_str(
                    f"loss {self.losses[-1]:.2f}, {self.elapsed:.0f} of {seconds:.0f} s",
                    refresh=False,
                )
                self.bar.update(1)
            if self.elapsed >= seconds or len(self.losses) >= max_steps:
                trainer.should_stop = True

        def on_train_end(self, trainer, pl_module) -> None:
            if self.bar is not None:
                self.bar.close()

    return Budget()


def demo_dictionaries(adata: Any) -> Any:
    """Geneformer-V1 dictionaries restricted to the genes of ``adata``.

    A vocabulary of the data's own genes (about 700 here instead of 25,424) makes the
    masked-gene objective learnable within a minute.
    """
    from scfm.data import GeneformerDictionaries
    from scfm.data._geneformer_tokenizer import geneformer_ensembl_ids

    full = GeneformerDictionaries.shipped("V1")
    ensembl, _, _ = geneformer_ensembl_ids(adata.var_names, full.gene_name_id_dictionary)
    genes = [g for g in dict.fromkeys(ensembl) if g in full.gene_median_dictionary]
    return GeneformerDictionaries(
        token_dictionary={"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(genes)}},
        gene_median_dictionary={g: full.gene_median_dictionary[g] for g in genes},
        gene_name_id_dictionary=full.gene_name_id_dictionary,
        ensembl_mapping_dictionary=None,
    )


def _cluster(adata: Any, rep: str, name: str, seed: int) -> None:
    """Neighbours, Leiden and UMAP on ``obsm[rep]``, stored under ``name``."""
    import scanpy as sc

    sc.pp.neighbors(adata, use_rep=rep, key_added=name, random_state=seed)
    sc.tl.leiden(
        adata,
        neighbors_key=name,
        key_added=f"leiden_{name}",
        flavor="igraph",
        n_iterations=2,
        random_state=seed,
    )
    sc.tl.umap(adata, neighbors_key=name, random_state=seed)
    adata.obsm[f"X_umap_{name}"] = adata.obsm.pop("X_umap")


def _scores(adata: Any, name: str, rep: str, labels_key: str, held_out: Any) -> dict:
    """ARI / NMI of the Leiden clusters and label-transfer accuracy on held-out cells."""
    import numpy as np
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from scfm.tl import transfer_labels

    truth = adata.obs[labels_key].astype(str)
    clusters = adata.obs[f"leiden_{name}"]
    reference, query = adata[~held_out].copy(), adata[held_out].copy()
    transfer_labels(reference, query, labels_key, use_rep=rep, key_added="predicted")
    accuracy = float(np.mean(query.obs["predicted"].astype(str) == truth[held_out]))
    return {
        "ari": float(adjusted_rand_score(truth, clusters)),
        "nmi": float(normalized_mutual_info_score(truth, clusters)),
        "n_clusters": int(clusters.nunique()),
        "transfer_accuracy": accuracy,
    }


def _figure(adata: Any, labels_key: str, scores: dict, path: Path) -> None:
    """Both UMAPs side by side, coloured by the known cell types."""
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "cairo"):
        with contextlib.suppress(Exception):
            matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), layout="constrained")
    titles = {
        "pca": "PCA (scanpy baseline)",
        "scfm": "scfm demo model (Geneformer architecture)",
    }
    for ax, name in zip(axes, ("pca", "scfm")):
        s = scores[name]
        sc.pl.embedding(
            adata,
            basis=f"X_umap_{name}",
            color=labels_key,
            ax=ax,
            show=False,
            legend_loc="right margin" if name == "scfm" else None,
            title=f"{titles[name]}\nLeiden vs {labels_key}: ARI {s['ari']:.2f}, NMI {s['nmi']:.2f}",
            frameon=False,
        )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(
    output_dir: str | Path = "scfm_demo",
    seconds: float = 60.0,
    seed: int = 0,
    *,
    max_steps: int = DEMO_MAX_STEPS,
    labels_key: str = "bulk_labels",
    progress_bar: bool = True,
) -> dict[str, Any]:
    """Pretrain a small model on PBMCs shipped with scfm and compare it with PCA.

    1. Loads :func:`pbmc68k_reduced_counts` (700 PBMCs, 10 cell types, gene symbols; they
       are matched to Geneformer's Ensembl vocabulary through the bundled GENCODE table).
    2. Baseline: scanpy's ``normalize_total`` + ``log1p`` + PCA (50 components).
    3. Builds a randomly initialised Geneformer-V1-style model (:data:`DEMO_ARCHITECTURE`,
       a vocabulary of the data's genes) and pretrains it with its masked-gene objective for
       ``max_steps`` minibatches of 32 cells or ``seconds``, whichever ends first (one torch
       thread: faster for a model this small).
    4. Embeds the cells (``hidden_layer=0``, :data:`DEMO_HIDDEN_LAYER`), and on both embeddings
       runs neighbours, Leiden and UMAP, scores the clusters against ``obs[labels_key]``
       (ARI, NMI) and transfers the labels of 75% of the cells to the other 25%
       (:func:`scfm.tl.transfer_labels`).
    5. Saves both UMAPs side by side to ``output_dir/umap.png``.

    Parameters
    ----------
    output_dir
        Folder for ``umap.png`` (created if needed).
    seconds
        Pretraining time budget in seconds.
    max_steps
        Pretraining steps at most (the default takes about 40 s on 2 idle CPU cores).
    seed
        Random seed (model initialisation, masking, held-out cells, neighbours, Leiden, UMAP).
    labels_key
        Known cell types to compare the clusters with.
    progress_bar
        Show the pretraining progress bar (time and loss).

    Returns
    -------
    dict with ``scores`` (``{"pca": ..., "scfm": ...}``, each with ``ari``, ``nmi``,
    ``n_clusters``, ``transfer_accuracy``), ``losses`` (masked-gene loss of every step),
    ``first_loss`` / ``final_loss`` (means of the first and last 10 steps), ``steps``,
    ``max_steps``,
    ``train_seconds``, ``seconds`` (wall time of the whole demo), ``n_held_out``,
    ``umap_png`` (path), ``verdict`` (one sentence) and ``adata`` (the AnnData with
    ``obsm["X_pca"]``, ``obsm["X_geneformer"]``, both UMAPs and Leiden columns).

    Examples
    --------
    >>> from scfm.datasets import run_demo
    >>> result = run_demo(seconds=20, progress_bar=False)  # doctest: +SKIP
    >>> result["scores"]["scfm"]["ari"], result["scores"]["pca"]["ari"]  # doctest: +SKIP
    """
    import numpy as np
    import scanpy as sc
    import torch

    from scfm.model import Geneformer

    start = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    adata = pbmc68k_reduced_counts()
    rng = np.random.default_rng(seed)
    held_out = np.zeros(adata.n_obs, dtype=bool)
    held_out[rng.choice(adata.n_obs, round(HELD_OUT_FRACTION * adata.n_obs), replace=False)] = True

    # ---- the baseline: scanpy's standard PCA on log-normalised counts of the same cells
    logged = sc.pp.log1p(sc.pp.normalize_total(adata, target_sum=1e4, copy=True), copy=True)
    adata.obsm["X_pca"] = sc.pp.pca(logged.X, n_comps=50, random_state=seed)

    # ---- the demo model, pretrained from scratch within the budget. Its initialisation,
    # masking and shuffling draw from torch's global generator: seeded here and restored
    # afterwards, so the caller's random state is left as it was.
    Geneformer.setup_anndata(adata)
    budget = _budget(max_steps, seconds, progress_bar)
    with _torch_threads(1), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Geneformer(adata, dictionaries=demo_dictionaries(adata), **DEMO_ARCHITECTURE)
        model.train(
            max_epochs=100_000,
            batch_size=DEMO_BATCH_SIZE,
            train_size=1.0,
            check_val_every_n_epoch=None,
            enable_progress_bar=False,
            callbacks=[budget],
            plan_kwargs={"lr": DEMO_LEARNING_RATE},
        )
        model.embed(adata, key_added="X_geneformer", hidden_layer=DEMO_HIDDEN_LAYER)

    # ---- the same analysis on both embeddings
    scores = {}
    for name, rep in (("pca", "X_pca"), ("scfm", "X_geneformer")):
        _cluster(adata, rep, name, seed)
        scores[name] = _scores(adata, name, rep, labels_key, held_out)
    png = out / "umap.png"
    _figure(adata, labels_key, scores, png)

    losses = np.asarray(budget.losses, dtype=float)
    k = max(1, min(10, len(losses) // 4))
    result = {
        "scores": scores,
        "losses": losses,
        "first_loss": float(losses[:k].mean()),
        "final_loss": float(losses[-k:].mean()),
        "steps": len(losses),
        "max_steps": int(max_steps),
        "train_seconds": budget.elapsed,
        "seconds": time.perf_counter() - start,
        "n_held_out": int(held_out.sum()),
        "umap_png": str(png),
        "adata": adata,
    }
    result["verdict"] = _verdict(result)
    return result


def _verdict(result: dict) -> str:
    """Plain sentences on how the demo model compares with PCA."""
    pca, own = result["scores"]["pca"], result["scores"]["scfm"]
    spent = f"{result['train_seconds']:.0f} s"
    transfer = f"{own['transfer_accuracy']:.0%} vs {pca['transfer_accuracy']:.0%} of held-out cells"
    if own["ari"] >= pca["ari"]:
        text = (
            f"After {spent} of pretraining from scratch, the demo model's clusters match "
            f"PCA's on these cells (ARI {own['ari']:.2f} vs {pca['ari']:.2f})"
        )
    else:
        text = (
            f"After {spent} of pretraining from scratch, the demo model's clusters stay below "
            f"PCA's (ARI {own['ari']:.2f} vs {pca['ari']:.2f}): so little training on 700 "
            "cells does not make a foundation model"
        )
    if own["transfer_accuracy"] >= pca["transfer_accuracy"]:
        text += f"; label transfer works as well as with PCA ({transfer})."
    else:
        text += f"; label transfer is less accurate than with PCA ({transfer})."
    if own["ari"] < pca["ari"] and result["steps"] < result.get("max_steps", result["steps"]):
        text += (
            f" The time budget ended after {result['steps']} of {result['max_steps']} steps: "
            "on a busy or slow machine give it more time (--seconds 300)."
        )
    return text


def format_report(result: dict) -> str:
    """The demo's result as the table ``scfm demo`` prints."""
    pca, own = result["scores"]["pca"], result["scores"]["scfm"]
    n = result["n_held_out"]
    lines = [
        "",
        "700 PBMCs shipped with scfm, 10 known cell types (obs['bulk_labels']).",
        f"Pretraining from scratch: {result['steps']} steps in {result['train_seconds']:.0f} s, "
        f"masked-gene loss {result['first_loss']:.2f} -> {result['final_loss']:.2f}.",
        "",
        f"{'embedding':<34}{'ARI':>6}{'NMI':>7}{'clusters':>10}   label transfer ({n} held-out)",
        f"{'PCA of log-normalised counts':<34}{pca['ari']:>6.2f}{pca['nmi']:>7.2f}"
        f"{pca['n_clusters']:>10}   {pca['transfer_accuracy']:.0%} correct",
        f"{'scfm demo model (Geneformer arch.)':<34}{own['ari']:>6.2f}{own['nmi']:>7.2f}"
        f"{own['n_clusters']:>10}   {own['transfer_accuracy']:.0%} correct",
        "",
        result["verdict"],
        "Released foundation models are pretrained on millions of cells; with one on disk: "
        "scfm embed counts.h5ad --model geneformer --checkpoint Geneformer-V2-104M/ "
        "--output embedded.h5ad",
        f"UMAPs side by side: {result['umap_png']}",
    ]
    return "\n".join(lines)
