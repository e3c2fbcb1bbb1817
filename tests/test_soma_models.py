"""Every scfm model continues pretraining from a streamed TileDB-SOMA query."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

import scfm
from conftest import fixture_dir

tiledbsoma = pytest.importorskip("tiledbsoma")
tiledbsoma_io = pytest.importorskip("tiledbsoma.io")
pytest.importorskip("tiledbsoma_ml")

#: model class, from_pretrained kwargs, SomaDataModule kwargs
CASES = {
    "geneformer": ("Geneformer", {}, {}),
    "scfoundation": ("ScFoundation", {}, {}),
    "cellfm": ("CellFM", {"n_heads": 4}, {}),
    "sccello": ("ScCello", {}, {"labels_key": "cell_type_ontology_term_id"}),
    "cellplm": ("CellPLM", {}, {"batch_key": "batch"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_streaming_training_updates_every_model(name, tmp_path):
    root = fixture_dir(name)
    cls_name, load_kwargs, dm_kwargs = CASES[name]
    cls = getattr(scfm.model, cls_name)
    adata = ad.read_h5ad(root / "input.h5ad")
    uri = str(tmp_path / "soma")
    tiledbsoma_io.from_anndata(uri, adata, measurement_name="RNA", X_layer_name="raw")

    cls.setup_anndata(adata)
    model = cls.from_pretrained(root / "checkpoint", adata, **load_kwargs)
    before = {k: v.detach().clone() for k, v in model.module.named_parameters()}
    torch.manual_seed(0)
    with tiledbsoma.Experiment.open(uri) as exp:
        dm = scfm.data.SomaDataModule(
            exp.axis_query("RNA"), model, var_id_column="var_id", batch_size=16, **dm_kwargs
        )
        model.train(datamodule=dm, max_epochs=1, enable_progress_bar=False)
    loss = model.history["train_loss"].iloc[:, 0].to_numpy(dtype=float)
    assert len(loss) == 1 and np.isfinite(loss).all()
    changed = [k for k, v in model.module.named_parameters() if not torch.equal(v, before[k])]
    assert changed, "no parameter was updated by streaming training"
    assert not model.module.training  # back in eval mode for inference
