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
    "check_count_values",
    "check_counts",
    "check_key_added",
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


def check_count_values(
    values: np.ndarray | sp.spmatrix | sp.sparray,
    *,
    name: str,
    integer: bool = True,
    where: str = "",
) -> bool:
    """Check the values of an expression block: finite, non-negative, and integer if asked.

    Cheap enough to run on every minibatch (only stored values of a sparse block are read).

    Parameters
    ----------
    values
        A block of the expression matrix (dense or sparse).
    name
        How the matrix is named in messages (``"adata.X"``, ``"adata.layers['counts']"``).
    integer
        Require integer values (raw counts).
    where
        Appended to messages (e.g. ``" in cells 10-20"``).

    Returns
    -------
    Whether the block holds non-integer values (only possible with ``integer=False``).

    Raises
    ------
    CountDataError
        On NaN / inf, negative values, or non-integer values when ``integer``.
    """
    if sp.issparse(values):
        data = np.asarray(values.tocsr().data if values.format == "coo" else values.data)
    else:
        data = np.asarray(values).ravel()
    if data.size == 0:
        return False
    if not np.issubdtype(data.dtype, np.number):
        raise CountDataError(f"{name} has dtype {data.dtype}; raw counts must be numeric.")
    finite = np.isfinite(data)
    if not finite.all():
        raise CountDataError(
            f"{name} contains {int((~finite).sum())} NaN or infinite values{where}. The model "
            "needs finite raw counts: fix or drop the affected cells / genes."
        )
    low = data.min()
    if low < 0:
        raise CountDataError(
            f"{name} contains negative values (min {low:.3g}){where}: it looks scaled or "
            "batch-corrected. Use the raw counts (setup_anndata(adata, layer='counts'), or "
            "adata.raw.to_adata() if raw holds counts)."
        )
    if not np.issubdtype(data.dtype, np.floating):
        return False
    fractional = data != np.round(data)
    if not fractional.any():
        return False
    if integer:
        example = data[fractional][0]
        raise CountDataError(
            f"{name} contains non-integer values (e.g. {example:.4g}){where}: it looks "
            "normalised or log-transformed, but raw counts are required (the models were "
            "trained on them). Use the raw counts (setup_anndata(adata, layer='counts'); keep "
            "a copy before sc.pp.normalize_total / sc.pp.log1p). Non-integer count estimates "
            "(alevin-fry, SoupX, TPM) are accepted with setup_anndata(..., "
            "allow_non_integer=True)."
        )
    return True


def check_key_added(key_added: str, *, where: str) -> str:
    """Check a user-chosen output key before any work: a non-empty string without ``/``.

    h5ad stores each key as an HDF5 name, so ``/`` would write a file anndata cannot read.

    Raises
    ------
    InvalidInputError
        For anything else.
    """
    if not isinstance(key_added, str) or not key_added or "/" in key_added:
        raise InvalidInputError(
            f"key_added={key_added!r} cannot be used as an {where} key: pass a non-empty "
            "string without '/' (h5ad files cannot store '/' in key names)."
        )
    return key_added


def check_counts(
    adata: ad.AnnData, layer: str | None = None, *, where: str = "", integer: bool = True
) -> bool:
    """Check that the expression matrix holds raw counts (see :func:`check_count_values`).

    For a backed AnnData only the first 10,000 cells are inspected here; every inference
    path checks each minibatch it reads as well.

    Returns
    -------
    Whether non-integer values were seen (only possible with ``integer=False``).

    Raises
    ------
    CountDataError
        On NaN / inf, negative or (with ``integer``) non-integer values, naming the fix.
    """
    matrix = get_matrix(adata, layer)
    name = f"adata.layers[{layer!r}]" if layer is not None else "adata.X"
    return check_count_values(_values_to_check(matrix), name=name, integer=integer, where=where)


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
