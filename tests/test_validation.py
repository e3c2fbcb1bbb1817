"""setup_anndata input checks: typed errors before anything is registered or written."""

from __future__ import annotations

import copy
import math

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from conftest import data_file
from scfm.data import check_spatial
from scfm.errors import (
    AnnDataKeyError,
    CountDataError,
    DuplicateNamesError,
    EmptyDataError,
    InvalidInputError,
    ScfmError,
    SpatialCoordinateError,
)
from test_base import ToyModel


@pytest.fixture
def pbmc():
    return ad.read_h5ad(data_file("pbmc68k_reduced_counts.h5ad"))[:40].copy()


def _snapshot(adata):
    return (
        adata.obs.copy(),
        adata.var.copy(),
        copy.deepcopy(dict(adata.uns)),
        adata.X.copy(),
        {k: v.copy() for k, v in adata.layers.items()},
        set(adata.obsm.keys()),
    )


def _assert_unchanged(adata, snap):
    obs, var, uns, x, layers, obsm = snap
    assert adata.obs.equals(obs)
    assert adata.var.equals(var)
    assert set(adata.uns.keys()) == set(uns.keys())
    if sp.issparse(x):
        assert np.array_equal(adata.X.data, x.data, equal_nan=True)
        assert np.array_equal(adata.X.indices, x.indices)
    else:
        np.testing.assert_array_equal(adata.X, x)
    assert set(adata.layers.keys()) == set(layers.keys())
    assert set(adata.obsm.keys()) == obsm


def _normalised(a):
    a.X = sp.csr_matrix(np.log1p(a.X.toarray() / a.X.toarray().sum(1, keepdims=True) * 1e4))


def _negative(a):
    a.X = a.X.astype(np.float32)
    a.X.data[0] = -1.0


def _nan(a):
    a.X = a.X.astype(np.float32)
    a.X.data[3] = np.nan


def _inf(a):
    a.X = a.X.astype(np.float32)
    a.X.data[3] = np.inf


def _dup_var(a):
    a.var_names = ["G"] * 2 + list(a.var_names[2:])


def _dup_obs(a):
    a.obs_names = ["c"] * 2 + list(a.obs_names[2:])


BAD = [
    (_normalised, {}, CountDataError, "non-integer"),
    (_negative, {}, CountDataError, "negative"),
    (_nan, {}, CountDataError, "NaN"),
    (_inf, {}, CountDataError, "NaN or infinite"),
    (_dup_var, {}, DuplicateNamesError, "var_names_make_unique"),
    (_dup_obs, {}, DuplicateNamesError, "obs_names_make_unique"),
    (None, {"batch_key": "sample"}, AnnDataKeyError, "not a column of adata.obs"),
    (None, {"labels_key": "nope"}, AnnDataKeyError, "labels_key='nope'"),
    (None, {"layer": "counts"}, AnnDataKeyError, "not in adata.layers"),
]


@pytest.mark.parametrize(("mutate", "kwargs", "error", "match"), BAD)
def test_bad_input_raises_typed_error_and_leaves_adata_unchanged(
    pbmc, mutate, kwargs, error, match
):
    if mutate is not None:
        mutate(pbmc)
    snap = _snapshot(pbmc)
    with pytest.raises(error, match=match) as info:
        ToyModel.setup_anndata(pbmc, **kwargs)
    assert isinstance(info.value, ScfmError)
    _assert_unchanged(pbmc, snap)


def test_nan_in_categorical_key(pbmc):
    pbmc.obs["batch"] = ["a", None] * (pbmc.n_obs // 2)
    with pytest.raises(InvalidInputError, match="missing values"):
        ToyModel.setup_anndata(pbmc, batch_key="batch")


def test_empty_anndata(pbmc):
    with pytest.raises(EmptyDataError, match="0 cells"):
        ToyModel.setup_anndata(pbmc[:0].copy())
    with pytest.raises(InvalidInputError, match="AnnData"):
        ToyModel.setup_anndata(pbmc.X)


def test_errors_are_also_builtin_exceptions(pbmc):
    _negative(pbmc)
    with pytest.raises(ValueError):
        ToyModel.setup_anndata(pbmc)
    with pytest.raises(KeyError):
        ToyModel.setup_anndata(
            ad.read_h5ad(data_file("pbmc68k_reduced_counts.h5ad")), batch_key="x"
        )


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
def test_count_formats_accepted(pbmc, fmt):
    x = pbmc.X.toarray()
    pbmc.X = x if fmt == "dense" else getattr(sp, f"{fmt}_matrix")(x)
    ToyModel.setup_anndata(pbmc)
    assert "_scvi_uuid" in pbmc.uns


def test_backed_anndata_is_checked(pbmc, tmp_path):
    _normalised(pbmc)
    pbmc.write_h5ad(tmp_path / "norm.h5ad")
    backed = ad.read_h5ad(tmp_path / "norm.h5ad", backed="r")
    with pytest.raises(CountDataError, match="non-integer"):
        ToyModel.setup_anndata(backed)


def test_layer_with_counts_is_used(pbmc):
    pbmc.layers["counts"] = pbmc.X.copy()
    _normalised(pbmc)
    ToyModel.setup_anndata(pbmc, layer="counts")


def test_spatial_checks(pbmc):
    assert check_spatial(pbmc, "spatial", required=False) is False
    with pytest.raises(AnnDataKeyError, match="obsm"):
        check_spatial(pbmc, "spatial")
    pbmc.obsm["spatial"] = np.zeros((pbmc.n_obs, 2))
    assert check_spatial(pbmc, "spatial")
    pbmc.obsm["spatial"][0, 0] = np.nan
    with pytest.raises(SpatialCoordinateError, match="NaN"):
        check_spatial(pbmc, "spatial")
    pbmc.obsm["spatial"] = np.array([["a", "b"]] * pbmc.n_obs)
    with pytest.raises(SpatialCoordinateError, match="numeric"):
        check_spatial(pbmc, "spatial")
    pbmc.obsm["spatial"] = np.zeros((pbmc.n_obs, 1))
    with pytest.raises(SpatialCoordinateError, match="shape"):
        check_spatial(pbmc, "spatial")


def test_shared_number_predicates_refuse_bools_and_non_finite_values():
    """One definition of an integer / a real option value for every module's checks."""
    from scfm.module._checks import is_int, is_real

    assert is_int(3) and is_int(np.int64(3)) and not is_int(True) and not is_int(3.0)
    assert is_real(0.5) and is_real(np.float32(0.5)) and is_real(np.int8(2)) and is_real(1)
    for value in (True, np.bool_(True), math.inf, -math.inf, math.nan, np.float32("nan"), "1"):
        assert not is_real(value), value
    assert not is_real(1 + 0j)
