"""Auto-discretisation ("auto-bin") embedding of continuous expression values.

scFoundation (xTrimoGene) embeds every scalar expression value as a soft mixture of learned
bin vectors instead of hard value bins :cite:p:`Hao2024`.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AutoDiscretizationEmbedding"]

#: Negative slope of the LeakyReLU applied after the first projection (reference value).
_LEAKY_SLOPE = 0.1


class AutoDiscretizationEmbedding(nn.Module):
    """Soft-binned embedding of scalar values.

    For a value ``v``: ``h = LeakyReLU(mlp(v))``, ``z = bin_alpha * h + mlp2(h)``,
    ``p = softmax(z)`` over the bins and ``e(v) = p @ emb.weight``. Values equal to
    ``mask_token_id`` get the learned ``emb_mask`` vector, values equal to ``pad_token_id``
    the ``emb_pad`` vector (the sentinels are *values*, not gene ids).

    Parameters
    ----------
    dim
        Embedding size.
    bin_num
        Number of soft bins.
    bin_alpha
        Weight of the residual term ``h`` in ``z``.
    mask_token_id
        Value that marks a masked position.
    pad_token_id
        Value that marks a padding position.
    """

    def __init__(
        self,
        dim: int,
        bin_num: int,
        bin_alpha: float = 1.0,
        mask_token_id: float = 102,
        pad_token_id: float = 103,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.bin_num = bin_num
        self.bin_alpha = bin_alpha
        self.mask_token_id = mask_token_id
        self.pad_token_id = pad_token_id
        # attribute names mirror the checkpoint keys (token_emb.mlp, .mlp2, .emb, ...)
        self.mlp = nn.Linear(1, bin_num)
        self.mlp2 = nn.Linear(bin_num, bin_num)
        self.leaky_relu = nn.LeakyReLU(_LEAKY_SLOPE)
        self.emb = nn.Embedding(bin_num, dim)
        self.emb_mask = nn.Embedding(1, dim)
        self.emb_pad = nn.Embedding(1, dim)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """Embed ``values`` of shape ``(...,)`` into ``(..., dim)``."""
        v = values.to(self.mlp.weight.dtype).unsqueeze(-1)
        h = self.leaky_relu(self.mlp(v))
        z = self.bin_alpha * h + self.mlp2(h)
        out = torch.softmax(z, dim=-1) @ self.emb.weight
        # sentinel values replace the soft-bin embedding entirely
        is_mask = (values == self.mask_token_id).unsqueeze(-1)
        is_pad = (values == self.pad_token_id).unsqueeze(-1)
        out = torch.where(is_mask, self.emb_mask.weight[0].to(out.dtype), out)
        out = torch.where(is_pad, self.emb_pad.weight[0].to(out.dtype), out)
        return out
