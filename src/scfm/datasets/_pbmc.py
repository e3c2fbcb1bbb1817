"""Offline demo data shipped inside the package."""

from __future__ import annotations

from importlib import resources

import anndata as ad

__all__ = ["pbmc68k_reduced_counts"]


def pbmc68k_reduced_counts() -> ad.AnnData:
    """700 PBMCs x 765 genes of raw UMI counts (10x Genomics, via scanpy's pbmc68k_reduced).

    The counts were recovered exactly from scanpy's ``pbmc68k_reduced`` dataset as
    ``round(expm1(raw.X) * n_counts / 1e4)``. ``obs["bulk_labels"]`` holds 10 cell types;
    ``var_names`` are gene symbols. scanpy BSD-3 licence; data by 10x Genomics.

    Returns
    -------
    A new AnnData (a fresh copy on every call).

    Examples
    --------
    >>> import scfm
    >>> adata = scfm.datasets.pbmc68k_reduced_counts()
    >>> adata.shape
    (700, 765)
    """
    ref = resources.files("scfm.datasets") / "_data" / "pbmc68k_reduced_counts.h5ad"
    with resources.as_file(ref) as path:
        return ad.read_h5ad(path)
