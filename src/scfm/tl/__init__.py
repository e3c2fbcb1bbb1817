"""Downstream tasks working on ``(model, adata)``; results are written with ``key_added``."""

__all__: list[str] = []
