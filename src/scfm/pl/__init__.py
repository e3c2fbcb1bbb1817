"""Plots of scfm results (matplotlib / scanpy style)."""

__all__: list[str] = []
