"""Small real datasets shipped with scfm, for demos and tests without downloads."""

from ._demo import DEMO_ARCHITECTURE, run_demo
from ._pbmc import pbmc68k_reduced_counts

__all__ = ["DEMO_ARCHITECTURE", "pbmc68k_reduced_counts", "run_demo"]
