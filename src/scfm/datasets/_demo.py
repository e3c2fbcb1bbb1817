"""The offline first experience behind ``scfm demo``."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from ._pbmc import pbmc68k_reduced_counts

logger = logging.getLogger(__name__)

__all__ = ["DEMO_ARCHITECTURE", "run_demo"]

#: A small Geneformer-V1-style network that learns something within a minute on 2 CPU cores.
DEMO_ARCHITECTURE: dict[str, Any] = {
    "variant": "V1",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "hidden_dropout_prob": 0.02,
    "attention_probs_dropout_prob": 0.02,
    "input_size": 512,
}


class _EpochTimeBudget(Callback):
    """Stop training at the end of the first epoch that ends after ``seconds``.

    Unlike ``Trainer(max_time=...)`` it never stops inside an epoch, so every epoch's loss
    is logged.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self.start = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if time.perf_counter() - self.start >= self.seconds:
            trainer.should_stop = True


def run_demo(
    output_dir: str | Path = "scfm_demo",
    seconds: float = 60.0,
    seed: int = 0,
    *,
    labels_key: str = "bulk_labels",
    progress_bar: bool = True,
) -> dict[str, Any]:
    """Pretrain, embed, cluster and score a small model on PBMC counts shipped with scfm.

    1. Loads :func:`pbmc68k_reduced_counts` (700 PBMCs, gene symbols; Geneformer's Ensembl
       vocabulary is matched through the bundled GENCODE table).
    2. Builds a randomly initialised Geneformer-V1-style model (:data:`DEMO_ARCHITECTURE`)
       and pretrains it with its masked-gene objective for about ``seconds``.
    3. Embeds the cells, runs ``sc.pp.neighbors``, ``sc.tl.leiden`` and ``sc.tl.umap`` on
       the embedding, and compares the Leiden clusters with ``obs[labels_key]``.

    Parameters
    ----------
    output_dir
        Folder for ``umap.png`` (created if needed).
    seconds
        Pretraining time budget in seconds.
    seed
        Random seed (scvi-tools ``settings.seed``).
    labels_key
        Known cell types to compare the clusters with.
    progress_bar
        Show training and embedding progress bars.

    Returns
    -------
    dict with ``ari``, ``nmi`` (clusters vs labels), ``first_loss`` / ``final_loss`` (MLM
    training loss of the first and last epoch), ``epochs``, ``seconds`` (wall time),
    ``umap_png`` (path) and ``adata`` (the AnnData with ``obsm["X_geneformer"]``,
    ``obs["leiden"]`` and ``obsm["X_umap"]``).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import scanpy as sc
    import scvi
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from scfm.model import Geneformer

    start = time.perf_counter()
    scvi.settings.seed = seed
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    adata = pbmc68k_reduced_counts()
    Geneformer.setup_anndata(adata)
    model = Geneformer(adata, **DEMO_ARCHITECTURE)
    logger.info("demo model: %s", model._model_summary_string)
    model.train(
        max_epochs=10_000,
        callbacks=[_EpochTimeBudget(seconds)],
        batch_size=32,
        train_size=1.0,
        check_val_every_n_epoch=None,
        enable_progress_bar=progress_bar,
        plan_kwargs={"lr": 1e-3},
    )
    losses = model.history["train_loss"].iloc[:, 0].to_numpy()

    model.embed(adata, progress_bar=progress_bar)
    sc.pp.neighbors(adata, use_rep=model.default_key, random_state=seed)
    sc.tl.leiden(adata, key_added="leiden", flavor="igraph", n_iterations=2, random_state=seed)
    sc.tl.umap(adata, random_state=seed)
    ari = adjusted_rand_score(adata.obs[labels_key], adata.obs["leiden"])
    nmi = normalized_mutual_info_score(adata.obs[labels_key], adata.obs["leiden"])

    fig = sc.pl.umap(
        adata,
        color=[labels_key, "leiden"],
        title=[f"{labels_key} (known)", f"Leiden on scfm embedding (ARI {ari:.2f})"],
        wspace=0.6,
        show=False,
        return_fig=True,
    )
    png = out / "umap.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return {
        "ari": float(ari),
        "nmi": float(nmi),
        "first_loss": float(losses[0]),
        "final_loss": float(losses[-1]),
        "epochs": len(losses),
        "seconds": time.perf_counter() - start,
        "umap_png": str(png),
        "adata": adata,
    }
