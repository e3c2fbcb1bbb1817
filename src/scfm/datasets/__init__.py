"""Small real datasets shipped with scfm, for demos and tests without downloads."""

from ._pbmc import pbmc68k_reduced_counts

__all__ = ["pbmc68k_reduced_counts"]
