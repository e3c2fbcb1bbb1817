"""Building blocks shared by the modules (attention, encoders, embeddings, latents)."""

__all__: list[str] = []
