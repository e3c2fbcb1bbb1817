"""Bad input across every model: a typed scfm error naming the fix, the AnnData untouched.

Each model is checked through the fixture contract (setup_anndata defaults, from_pretrained on
the fixture checkpoint), with the input or the release files broken in one way at a time.
"""

from __future__ import annotations

import copy
import os
import pickle
import shutil

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import scfm
from conftest import fixture_dir
from scfm.errors import (
    AnnDataKeyError,
    CheckpointError,
    CountDataError,
    DuplicateNamesError,
    EmptyDataError,
    GeneVocabularyError,
    InvalidInputError,
    ScfmError,
    UnsafeCheckpointError,
)

#: class name, from_pretrained kwargs, the weights file, a dictionary / gene list file
MODELS = {
    "geneformer": ("Geneformer", {}, "model.safetensors", "token_dictionary_gc104M.pkl"),
    "scfoundation": ("ScFoundation", {}, "models/models.ckpt", "OS_scRNA_gene_index.19264.tsv"),
    "cellfm": ("CellFM", {"n_heads": 4}, "CellFM_80M_weight.ckpt", "expand_gene_info.csv"),
    "sccello": (
        "ScCello",
        {},
        "pytorch_model.bin",
        "data/token_vocabulary/token_dictionary.pkl",
    ),
    "cellplm": ("CellPLM", {}, "20231027_85M.best.ckpt", "20231027_85M.config.json"),
}


def _input(name):
    return ad.read_h5ad(fixture_dir(name) / "input.h5ad")


def _snapshot(adata):
    return (
        adata.obs.copy(),
        adata.var.copy(),
        copy.deepcopy(dict(adata.uns)),
        adata.X.copy(),
        {k: np.asarray(v).copy() for k, v in adata.obsm.items()},
        dict(adata.layers),
    )


def _unchanged(adata, snap):
    obs, var, uns, x, obsm, layers = snap
    assert adata.obs.equals(obs) and adata.var.equals(var)
    assert adata.uns.keys() == uns.keys()
    a, b = (m.toarray() if sp.issparse(m) else np.asarray(m) for m in (adata.X, x))
    np.testing.assert_array_equal(a, b)
    assert adata.obsm.keys() == obsm.keys() and adata.layers.keys() == layers.keys()


def _float32(adata):
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    return adata


def _normalised(adata):
    x = _float32(adata).X.toarray()
    adata.X = sp.csr_matrix(np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4))


def _set_value(value):
    def mutate(adata):
        _float32(adata).X.data[0] = value

    return mutate


def _dup_var(adata):
    adata.var_names = [adata.var_names[1], *adata.var_names[1:]]


def _dup_obs(adata):
    adata.obs_names = [adata.obs_names[1], *adata.obs_names[1:]]


def _nan_batch(adata):
    values = adata.obs["batch"].astype(object).to_numpy()
    values[0] = np.nan
    adata.obs["batch"] = values


SETUP_CASES = {
    "normalised values": (_normalised, {}, CountDataError, "raw counts"),
    "negative value": (_set_value(-3.0), {}, CountDataError, "negative"),
    "NaN value": (_set_value(np.nan), {}, CountDataError, "NaN"),
    "inf value": (_set_value(np.inf), {}, CountDataError, "infinite"),
    "duplicated var_names": (_dup_var, {}, DuplicateNamesError, "var_names_make_unique"),
    "duplicated obs_names": (_dup_obs, {}, DuplicateNamesError, "obs_names_make_unique"),
    "missing batch key": (None, {"batch_key": "donor"}, AnnDataKeyError, "batch_key='donor'"),
    "missing labels key": (None, {"labels_key": "ct"}, AnnDataKeyError, "labels_key='ct'"),
    "missing layer": (None, {"layer": "counts"}, AnnDataKeyError, "layers"),
    "NaN in batch key": (_nan_batch, {"batch_key": "batch"}, InvalidInputError, "missing"),
    "missing gene id column": (None, {"gene_id_key": "ids"}, AnnDataKeyError, "gene_id_key"),
}


@pytest.mark.parametrize("case", list(SETUP_CASES))
@pytest.mark.parametrize("name", list(MODELS))
def test_bad_anndata_is_refused_before_anything_is_written(name, case):
    mutate, kwargs, error, match = SETUP_CASES[case]
    cls = getattr(scfm.model, MODELS[name][0])
    adata = _input(name)
    if mutate is not None:
        mutate(adata)
    snap = _snapshot(adata)
    with pytest.raises(error, match=match) as info:
        cls.setup_anndata(adata, **kwargs)
    assert isinstance(info.value, ScfmError)
    _unchanged(adata, snap)


@pytest.mark.parametrize("name", list(MODELS))
def test_zero_cells_and_unmatched_genes(name):
    cls_name, kwargs, *_ = MODELS[name]
    cls = getattr(scfm.model, cls_name)
    with pytest.raises(EmptyDataError, match="0 cells"):
        cls.setup_anndata(_input(name)[:0].copy())
    adata = _input(name)
    adata.var_names = [f"NOTAGENE{i}" for i in range(adata.n_vars)]
    adata.var = adata.var[[]]
    cls.setup_anndata(adata)
    with pytest.raises(GeneVocabularyError, match="gene_id_key"):
        cls.from_pretrained(fixture_dir(name) / "checkpoint", adata, **kwargs)


@pytest.mark.parametrize("name", list(MODELS))
def test_one_cell_all_zero_cells_and_matrix_formats(name, tmp_path):
    cls_name, kwargs, *_ = MODELS[name]
    cls = getattr(scfm.model, cls_name)
    ckpt = fixture_dir(name) / "checkpoint"
    reference = _input(name)
    cls.setup_anndata(reference)
    expected = cls.from_pretrained(ckpt, reference, **kwargs).get_latent_representation(
        progress_bar=False
    )
    for fmt in ("csc", "dense", "backed", "one cell"):
        adata = _input(name)
        if fmt == "csc":
            adata.X = sp.csc_matrix(adata.X)
        elif fmt == "dense":
            adata.X = adata.X.toarray()
        elif fmt == "backed":
            adata.write_h5ad(tmp_path / f"{name}.h5ad")
            adata = ad.read_h5ad(tmp_path / f"{name}.h5ad", backed="r")
        else:
            adata = adata[:1].copy()
        cls.setup_anndata(adata)
        z = cls.from_pretrained(ckpt, adata, **kwargs).get_latent_representation(progress_bar=False)
        if name != "cellplm" or fmt != "one cell":  # CellPLM: a cell's sentence matters
            np.testing.assert_allclose(z, expected[: len(z)], atol=1e-5, rtol=0, err_msg=fmt)
        if adata.isbacked:
            adata.file.close()
    # a cell without any count: a finite embedding, or a typed error naming the cells
    adata = _input(name)
    x = adata.X.tolil()
    x[0, :] = 0
    adata.X = x.tocsr()
    cls.setup_anndata(adata)
    try:
        z = cls.from_pretrained(ckpt, adata, **kwargs).get_latent_representation(progress_bar=False)
    except ScfmError as err:
        assert "cell" in str(err)
    else:
        assert np.isfinite(z).all()


def _broken_release(name, tmp_path, how):
    src = fixture_dir(name) / "checkpoint"
    dst = tmp_path / "release"
    shutil.copytree(src, dst)
    weights = dst / MODELS[name][2]
    if how == "empty":
        weights.write_bytes(b"")
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "corrupted":
        data = bytearray(weights.read_bytes())
        data[:64] = np.random.default_rng(0).bytes(64)
        weights.write_bytes(bytes(data))
    elif how == "other vocabulary":
        other = "scfoundation" if name != "scfoundation" else "cellfm"
        other_file = fixture_dir(other) / "checkpoint" / MODELS[other][3]
        shutil.copy(other_file, dst / MODELS[name][3])
    return dst


@pytest.mark.parametrize("how", ["empty", "truncated", "corrupted", "other vocabulary"])
@pytest.mark.parametrize("name", list(MODELS))
def test_broken_release_files(name, how, tmp_path):
    cls_name, kwargs, *_ = MODELS[name]
    cls = getattr(scfm.model, cls_name)
    adata = _input(name)
    cls.setup_anndata(adata)
    release = _broken_release(name, tmp_path, how)
    with pytest.raises(CheckpointError) as info:
        cls.from_pretrained(release, adata, **kwargs)
    assert str(info.value)


class _Payload:
    """Unpickling this creates a directory: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.mark.parametrize("name", ["scfoundation", "sccello", "cellplm"])
def test_code_executing_pickle_is_refused(name, tmp_path):
    cls_name, kwargs, weights, _ = MODELS[name]
    cls = getattr(scfm.model, cls_name)
    release = _broken_release(name, tmp_path, "none")
    marker = tmp_path / "pwned"
    with open(release / weights, "wb") as fh:
        pickle.dump({"model_state_dict": _Payload(str(marker))}, fh)
    adata = _input(name)
    cls.setup_anndata(adata)
    with pytest.raises(UnsafeCheckpointError, match="trust_checkpoint=True"):
        cls.from_pretrained(release, adata, **kwargs)
    assert not marker.exists()
