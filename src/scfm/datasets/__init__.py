"""Small real datasets shipped with scfm, for demos, tutorials and tests without downloads.

=====================================  ======================================================
:func:`pbmc68k_reduced_counts`         700 PBMCs x 765 genes, raw counts, 10 cell types
:func:`wu2020_tcells`                  200 T cells x 2,000 genes, raw counts, 14 patients
:func:`cscc_spatial`                   621 Spatial Transcriptomics spots x 2,000 genes
:func:`run_demo`                       the offline demo behind ``scfm demo``
=====================================  ======================================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._pbmc import cscc_spatial, pbmc68k_reduced_counts, wu2020_tcells

if TYPE_CHECKING:  # pragma: no cover
    from ._demo import run_demo

__all__ = ["cscc_spatial", "pbmc68k_reduced_counts", "run_demo", "wu2020_tcells"]


def __getattr__(name: str) -> Any:
    # The demo imports torch and Lightning: only when it is asked for.
    if name == "run_demo":
        from . import _demo

        return getattr(_demo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
