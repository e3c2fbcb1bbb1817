"""Networks and losses: one ``BaseModuleClass`` per foundation model."""

__all__: list[str] = []
