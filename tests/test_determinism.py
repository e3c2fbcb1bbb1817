"""A cell's embedding does not depend on its batch-mates or the batch size (CellPLM aside).

CellPLM's cells attend to each other within a sentence (one batch label, AnnData order), so
there the embedding depends on the sentence's composition exactly as in the reference: the
same sentence gives the same numbers whatever the minibatch size, and a different sentence
changes them.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

import scfm
from conftest import fixture_dir

MODELS = {
    "geneformer": ("Geneformer", {}),
    "scfoundation": ("ScFoundation", {}),
    "cellfm": ("CellFM", {"n_heads": 4}),
    "sccello": ("ScCello", {}),
}


def _model(name, cls_name, kwargs):
    cls = getattr(scfm.model, cls_name)
    adata = ad.read_h5ad(fixture_dir(name) / "input.h5ad")
    cls.setup_anndata(adata)
    return cls.from_pretrained(fixture_dir(name) / "checkpoint", adata, **kwargs), adata


@pytest.mark.parametrize("name", list(MODELS))
def test_embedding_independent_of_batch_mates(name):
    model, adata = _model(name, *MODELS[name])
    z = model.get_latent_representation(progress_bar=False)
    perm = np.random.default_rng(0).permutation(adata.n_obs)
    for batch_size in (1, 7, adata.n_obs):
        shuffled = model.get_latent_representation(
            indices=perm, batch_size=batch_size, progress_bar=False
        )
        assert np.abs(shuffled - z[perm]).max() < 1e-5, batch_size


def test_cellplm_depends_on_its_sentence_only():
    adata = ad.read_h5ad(fixture_dir("cellplm") / "input.h5ad")
    scfm.model.CellPLM.setup_anndata(adata, batch_key="batch")  # sentences = batch labels
    model = scfm.model.CellPLM.from_pretrained(fixture_dir("cellplm") / "checkpoint", adata)
    z = model.get_latent_representation(progress_bar=False)
    for batch_size in (1, 7, adata.n_obs):
        again = model.get_latent_representation(batch_size=batch_size, progress_bar=False)
        assert np.abs(again - z).max() < 1e-5, batch_size
    # sentences are batch labels: embedding one batch alone changes nothing ...
    first = adata.obs["batch"].astype(str).to_numpy() == adata.obs["batch"].astype(str).iloc[0]
    alone = model.get_latent_representation(indices=np.flatnonzero(first), progress_bar=False)
    assert np.abs(alone - z[first]).max() < 1e-5
    # ... while putting all cells into one sentence (no batch labels) changes the numbers
    whole = adata.copy()
    del whole.obs["batch"]
    scfm.model.CellPLM.setup_anndata(whole)
    one_sentence = scfm.model.CellPLM.from_pretrained(
        fixture_dir("cellplm") / "checkpoint", whole
    ).get_latent_representation(progress_bar=False)
    assert np.abs(one_sentence - z).max() > 1e-4
