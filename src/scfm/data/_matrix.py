"""Chunked reads of an expression matrix (in memory or backed on disk)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["count_expressed"]

#: Rows read at once; bounds memory for backed matrices.
_CHUNK_ROWS = 10_000


def count_expressed(
    matrix, cells: np.ndarray, columns: np.ndarray, chunk_size: int = _CHUNK_ROWS
) -> np.ndarray:
    """Number of positive entries of each row ``cells`` within ``columns``.

    The matrix is read ``chunk_size`` rows at a time, so a backed matrix is never loaded
    whole.

    Parameters
    ----------
    matrix
        ``adata.X`` or a layer: dense, sparse, or backed.
    cells
        Row positions (any order).
    columns
        Column positions to count in.
    chunk_size
        Rows per read.

    Returns
    -------
    Counts, one per entry of ``cells``.
    """
    cells = np.asarray(cells, dtype=np.int64)
    keep = np.zeros(matrix.shape[1], dtype=bool)
    keep[np.asarray(columns, dtype=np.int64)] = True
    out = np.empty(len(cells), dtype=np.int64)
    order = np.argsort(cells, kind="stable")  # sorted reads for backed (h5py) matrices
    for start in range(0, len(cells), chunk_size):
        rows = order[start : start + chunk_size]
        block = matrix[cells[rows]]
        if sp.issparse(block):
            block = block.tocsr()
            hit = (block.data > 0) & keep[block.indices]
            row_of = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
            out[rows] = np.bincount(row_of[hit], minlength=block.shape[0])
        else:
            out[rows] = (np.asarray(block)[:, keep] > 0).sum(axis=1)
    return out
