"""Every model refuses every other model's release files with a typed checkpoint error."""

from __future__ import annotations

import itertools

import anndata as ad
import pytest

import scfm
from conftest import FIXTURES, fixture_dir
from scfm.errors import CheckpointError

MODELS = {
    "geneformer": "Geneformer",
    "scfoundation": "ScFoundation",
    "cellfm": "CellFM",
    "sccello": "ScCello",
    "cellplm": "CellPLM",
}


@pytest.mark.parametrize(("model", "other"), [p for p in itertools.permutations(MODELS, 2)])
def test_checkpoint_of_another_model_is_refused(model, other):
    fixture_dir(model)
    cls = getattr(scfm.model, MODELS[model])
    adata = ad.read_h5ad(FIXTURES / model / "input.h5ad")
    cls.setup_anndata(adata)
    with pytest.raises(CheckpointError) as info:
        cls.from_pretrained(fixture_dir(other) / "checkpoint", adata)
    assert str(info.value)  # a message that says what to pass instead
