"""Checks of user AnnData objects, run by ``setup_anndata`` before anything is registered.

Each check raises a typed :mod:`scfm.errors` exception whose message names the fix. None of
them modifies the AnnData.
"""

from __future__ import annotations

from collections.abc import Iterable

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scfm.errors import (
    AnnDataKeyError,
    CountDataError,
    DuplicateNamesError,
    EmptyDataError,
    InvalidInputError,
    SpatialCoordinateError,
)

__all__ = [
    "check_anndata",
    "check_counts",
    "check_obs_keys",
    "check_spatial",
    "get_matrix",
]

#: Rows inspected when the matrix is backed on disk (reading all of it would defeat backing).
_BACKED_CHECK_ROWS = 10_000


def get_matrix(adata: ad.AnnData, layer: str | None = None):
    """Return ``adata.X`` or ``adata.layers[layer]``, with a clear error for a missing layer."""
    if layer is None:
        if adata.X is None:
            raise CountDataError(
                "adata.X is empty (None). Pass layer='<name of the raw-count layer>'."
            )
        return adata.X
    if layer not in adata.layers:
        raise AnnDataKeyError(
            f"layer={layer!r} is not in adata.layers (layers: "
            f"{', '.join(adata.layers.keys()) or 'none'}). Pass the name of the layer that "
            "holds raw counts, or layer=None for adata.X."
        )
    return adata.layers[layer]


def _values_to_check(matrix) -> np.ndarray:
    """The stored values of a matrix (or of its first rows when backed) as a 1-d array."""
    if isinstance(matrix, ad.abc.CSRDataset | ad.abc.CSCDataset) or hasattr(matrix, "to_memory"):
        n = matrix.shape[0]
        matrix = matrix[: min(n, _BACKED_CHECK_ROWS)]
    elif not isinstance(matrix, np.ndarray | sp.spmatrix | sp.sparray) and hasattr(matrix, "shape"):
        # h5py datasets (dense backed X)
        matrix = np.asarray(matrix[: min(matrix.shape[0], _BACKED_CHECK_ROWS)])
    if sp.issparse(matrix):
        return np.asarray(matrix.tocsr().data if matrix.format == "coo" else matrix.data)
    return np.asarray(matrix).ravel()


def check_counts(adata: ad.AnnData, layer: str | None = None, *, where: str = "") -> None:
    """Check that the expression matrix holds raw counts.

    Raw counts are finite, non-negative and integer valued (stored as any dtype). For a
    backed AnnData only the first 10,000 cells are inspected.

    Raises
    ------
    CountDataError
        On NaN / inf, negative or non-integer values, naming the fix.
    """
    matrix = get_matrix(adata, layer)
    name = f"adata.layers[{layer!r}]" if layer is not None else "adata.X"
    values = _values_to_check(matrix)
    if values.size == 0:
        return
    if not np.issubdtype(values.dtype, np.number):
        raise CountDataError(f"{name} has dtype {values.dtype}; raw counts must be numeric.")
    if not np.all(np.isfinite(values)):
        n_bad = int((~np.isfinite(values)).sum())
        raise CountDataError(
            f"{name} contains {n_bad} NaN or infinite values{where}. Raw counts must be "
            "finite: fix or drop the affected cells/genes before setup_anndata."
        )
    if values.min() < 0:
        raise CountDataError(
            f"{name} contains negative values (min {values.min():.3g}){where}: it looks "
            "scaled or batch-corrected. Pass the layer with raw counts, e.g. "
            "layer='counts', or adata.raw.to_adata()."
        )
    if np.issubdtype(values.dtype, np.floating) and np.any(values != np.round(values)):
        example = values[values != np.round(values)][0]
        raise CountDataError(
            f"{name} contains non-integer values (e.g. {example:.4g}){where}: it looks "
            "normalised or log-transformed, but raw counts are required. Pass the raw-count "
            "layer, e.g. layer='counts' (keep a copy before sc.pp.normalize_total / "
            "sc.pp.log1p), or adata.raw.to_adata() if raw holds counts."
        )


def check_anndata(adata: ad.AnnData) -> None:
    """Check that an AnnData is usable at all (type, non-empty, unique names).

    Raises
    ------
    InvalidInputError
        If ``adata`` is not an :class:`~anndata.AnnData`.
    EmptyDataError
        If it has no cells or no genes.
    DuplicateNamesError
        If ``var_names`` or ``obs_names`` are not unique.
    """
    if not isinstance(adata, ad.AnnData):
        raise InvalidInputError(
            f"Expected an AnnData object, got {type(adata).__name__}. Read your data with "
            "anndata.read_h5ad(...) or scanpy.read_10x_h5(...)."
        )
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise EmptyDataError(
            f"The AnnData has {adata.n_obs} cells and {adata.n_vars} genes; at least one of "
            "each is needed. Check the subsetting that produced it."
        )
    for axis, names in (("var_names", adata.var_names), ("obs_names", adata.obs_names)):
        if not names.is_unique:
            dup = names[names.duplicated()].unique()
            fix = (
                "adata.var_names_make_unique()"
                if axis == "var_names"
                else ("adata.obs_names_make_unique()")
            )
            raise DuplicateNamesError(
                f"adata.{axis} has {len(dup)} duplicated names (e.g. "
                f"{', '.join(map(str, dup[:3]))}). Make them unique with {fix}, or aggregate "
                "duplicated genes first."
            )


def check_obs_keys(adata: ad.AnnData, keys: Iterable[tuple[str, str | None]]) -> None:
    """Check that categorical obs columns exist and have no missing values.

    Parameters
    ----------
    adata
        The AnnData.
    keys
        ``(argument name, column)`` pairs; ``None`` columns are skipped.

    Raises
    ------
    AnnDataKeyError
        If a column does not exist.
    InvalidInputError
        If a column has missing values.
    """
    for arg, key in keys:
        if key is None:
            continue
        if key not in adata.obs.columns:
            raise AnnDataKeyError(
                f"{arg}={key!r} is not a column of adata.obs (columns: "
                f"{', '.join(map(str, adata.obs.columns[:20])) or 'none'}). Pass an existing "
                f"column or {arg}=None."
            )
        n_na = int(pd.isna(adata.obs[key]).sum())
        if n_na:
            raise InvalidInputError(
                f"adata.obs[{key!r}] ({arg}) has {n_na} missing values. Fill them, e.g. "
                f"adata.obs[{key!r}] = adata.obs[{key!r}].astype(str).fillna('unknown'), "
                "or drop those cells."
            )


def check_spatial(adata: ad.AnnData, spatial_key: str, *, required: bool = True) -> bool:
    """Check that ``adata.obsm[spatial_key]`` holds finite numeric (n_obs, 2+) coordinates.

    Returns
    -------
    ``True`` if the coordinates exist and are valid; ``False`` if absent and not required.

    Raises
    ------
    AnnDataKeyError
        If the key is missing and ``required``.
    SpatialCoordinateError
        If the coordinates are non-numeric, non-finite or of the wrong shape.
    """
    if spatial_key not in adata.obsm:
        if not required:
            return False
        raise AnnDataKeyError(
            f"spatial_key={spatial_key!r} is not in adata.obsm (keys: "
            f"{', '.join(adata.obsm.keys()) or 'none'}). Store coordinates as "
            f"adata.obsm[{spatial_key!r}] = array of shape (n_cells, 2), or pass spatial_key=None."
        )
    coords = adata.obsm[spatial_key]
    if isinstance(coords, pd.DataFrame):
        coords = coords.to_numpy()
    coords = np.asarray(coords)
    if not np.issubdtype(coords.dtype, np.number):
        raise SpatialCoordinateError(
            f"adata.obsm[{spatial_key!r}] has dtype {coords.dtype}; coordinates must be numeric. "
            f"Convert them, e.g. adata.obsm[{spatial_key!r}] = coords.astype(float)."
        )
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise SpatialCoordinateError(
            f"adata.obsm[{spatial_key!r}] has shape {coords.shape}; (n_cells, 2) is expected."
        )
    if not np.all(np.isfinite(coords)):
        n_bad = int((~np.isfinite(coords)).any(axis=1).sum())
        raise SpatialCoordinateError(
            f"adata.obsm[{spatial_key!r}] has NaN or infinite coordinates in {n_bad} cells. "
            "Drop or fix those cells before setup_anndata."
        )
    return True
