"""User-facing models: one scvi-tools ``BaseModelClass`` per foundation model."""

__all__: list[str] = []
