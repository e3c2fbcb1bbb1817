"""The typed output of every scfm module's ``inference``: one structure, fixed field names."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["ModuleOutput"]


@dataclass
class ModuleOutput:
    """What one forward pass of a module computed for a minibatch of cells.

    Fields a module does not compute stay ``None``. Every path (embedding, gene embeddings,
    prediction, decoding, training) reads the same fields, so a capability shared by several
    models is written once in the base.

    Attributes
    ----------
    cell_embedding
        ``(n_cells, d)`` cell vectors, pooled as the call asked (``pooling``, ``hidden_layer``).
    token_states
        ``(n_cells, n_tokens, d)`` per-token states whose per-gene average is the gene embedding.
    token_genes
        ``(n_cells, n_tokens)`` position in ``model.vocabulary`` of each token; ``-1`` marks a
        token that belongs to no gene row (padding, or a special token the reference skips).
    logits
        ``(n_cells, n_classes)`` scores of the cell classification head.
    expression
        ``(n_cells, n_genes)`` decoded expression in the model's gene space.
    extra
        Model-specific tensors (masks, MLM logits, latent parts), documented by the module.
    """

    cell_embedding: torch.Tensor | None = None
    token_states: torch.Tensor | None = None
    token_genes: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    expression: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
