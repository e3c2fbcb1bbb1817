"""Train a small Geneformer on a local SOMA experiment with 2 CPU processes (DDP, gloo).

Run as a script (Lightning's DDP launcher re-executes it once per rank):

    python ddp_train.py SOMA_URI OUT_DIR

Every rank records a fingerprint of each cell it trained on (``OUT_DIR/rank<r>.npy``); rank 0
saves the trained model to ``OUT_DIR/model``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import tiledbsoma
from lightning.pytorch.callbacks import Callback
from scvi import REGISTRY_KEYS

import scfm
from scfm.datasets._demo import DEMO_ARCHITECTURE


class RecordCells(Callback):
    """Remember a fingerprint (hash of the count vector) of every cell seen in epoch 0."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.seen: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 0:
            x = batch[REGISTRY_KEYS.X_KEY].cpu().numpy()
            self.seen.extend(hash(row.tobytes()) for row in x)

    def on_train_end(self, trainer, pl_module) -> None:
        np.save(self.out / f"rank{trainer.global_rank}.npy", np.array(self.seen, dtype=np.int64))


def main(uri: str, out: str) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tiledbsoma.Experiment.open(uri) as exp:
        query = exp.axis_query("RNA")
        template = scfm.data.soma_template(query, n_cells=64)
        scfm.model.Geneformer.setup_anndata(template)
        model = scfm.model.Geneformer(template, **DEMO_ARCHITECTURE)
        datamodule = scfm.data.SomaDataModule(query, model, batch_size=16, seed=0)
        model.train(
            datamodule=datamodule,
            max_epochs=1,
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            enable_progress_bar=False,
            callbacks=[RecordCells(out_dir)],
        )
        if model.trainer.global_rank == 0:
            model.save(out_dir / "model", overwrite=True, save_anndata=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
