"""Multi-scale-retention style linear attention blocks, as used by CellFM.

CellFM :cite:p:`Zeng2025` replaces softmax attention by a gated linear "retention" without
decay or positional terms: with ``Q = relu(x Wq)``, ``K = relu(x Wk)`` the per-head output is
``Q (Kᵀ V)``, computed right to left so that the cost is linear in the number of tokens
(``h x h`` state per head instead of an ``L x L`` score matrix). Softmax attention kernels
(``scaled_dot_product_attention``) do not apply to this kernel; padding is handled by zeroing
the keys of padded tokens.

Numerics follow the original MindSpore code: LayerNorm ``eps = 1e-7`` and the per-head
scale-free RMS normalisation computed in float32.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "CrossRetentionLayer",
    "GatedLinearUnit",
    "LowRankAdapter",
    "MultiHeadRetention",
    "RetentionLayer",
    "srms_norm",
]

#: MindSpore's ``nn.LayerNorm`` default epsilon (PyTorch's default is 1e-5).
MINDSPORE_LAYER_NORM_EPS = 1e-7
#: Lower bound of the norm in the per-head normalisation (as in the reference).
SRMS_NORM_MIN = 1e-12


def srms_norm(x: torch.Tensor) -> torch.Tensor:
    """Scale-free RMS normalisation over the last axis: ``x / max(||x / sqrt(n)||, 1e-12)``.

    Computed in float32 whatever the input dtype (as the reference does), and returned in
    the input dtype.
    """
    dtype = x.dtype
    x32 = x.float()
    norm = torch.linalg.vector_norm(x32 * (1.0 / math.sqrt(x.shape[-1])), dim=-1, keepdim=True)
    return (x32 / norm.clamp_min(SRMS_NORM_MIN)).to(dtype)


class LowRankAdapter(nn.Module):
    """LoRA update ``B(A x)`` of a bias-free linear map (scale 1, as in CellFM's ``lora_block``).

    ``A`` starts normal and ``B`` at zero, so a fresh adapter leaves the layer unchanged.

    Parameters
    ----------
    in_features, out_features
        Shape of the adapted linear map.
    rank
        Rank ``r`` of the update.
    """

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.A = nn.Linear(in_features, rank, bias=False)
        self.B = nn.Linear(rank, out_features, bias=False)
        # MindSpore initializer("normal") default: sigma 0.01
        nn.init.normal_(self.A.weight, std=0.01)
        nn.init.zeros_(self.B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))


def _adapted(linear: nn.Linear, adapter: LowRankAdapter | None, x: torch.Tensor) -> torch.Tensor:
    out = linear(x)
    return out if adapter is None else out + adapter(x)


class MultiHeadRetention(nn.Module):
    """Gated linear multi-head retention (CellFM's ``MHRetention``).

    Parameters
    ----------
    emb_dims
        Model width ``d``.
    num_heads
        Number of heads ``H`` (``d`` must be divisible by it).
    lora
        LoRA rank on the q/k/v/u/o projections; 0 for none.
    """

    _projections = ("q", "k", "v", "u", "o")

    def __init__(self, emb_dims: int, num_heads: int, lora: int = 0) -> None:
        super().__init__()
        if emb_dims % num_heads:
            raise ValueError(f"emb_dims={emb_dims} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dims = emb_dims // num_heads
        for name in self._projections:
            setattr(self, f"{name}_proj", nn.Linear(emb_dims, emb_dims, bias=False))
        self.lora = 0
        if lora > 0:
            self.add_lora(lora)

    def add_lora(self, rank: int) -> None:
        """Add rank-``rank`` adapters ``lora_{q,k,v,u,o}`` (names as in the reference)."""
        d = self.o_proj.in_features
        for name in self._projections:
            setattr(self, f"lora_{name}", LowRankAdapter(d, d, rank))
        self.lora = rank

    def _proj(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return _adapted(
            getattr(self, f"{name}_proj"),
            getattr(self, f"lora_{name}", None) if self.lora else None,
            x,
        )

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dims).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        value_scale: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Retention of queries ``x`` [B, L, d] onto keys/values ``y`` (default ``x``).

        Parameters
        ----------
        x
            Query tokens ``[B, L1, d]``.
        key_mask
            ``[B, L2]`` with 1 for tokens that act as keys, 0 for padded / masked ones.
        value_scale
            ``[B]`` factor on the values (the reference's ``1/sqrt(n)``; it only keeps
            magnitudes bounded, the per-head normalisation cancels it).
        y
            Key / value tokens ``[B, L2, d]``; ``None`` for self-retention.
        """
        y = x if y is None else y
        scale = 1.0 / math.sqrt(self.head_dims)
        q = self._heads(torch.relu(self._proj("q", x))) * scale
        k = self._heads(torch.relu(self._proj("k", y))) * scale
        v = self._heads(self._proj("v", y))
        u = self._heads(nn.functional.silu(self._proj("u", x)))
        if key_mask is not None:
            k = k * key_mask[:, None, :, None].to(k.dtype)
        if value_scale is not None:
            v = v * value_scale[:, None, None, None].to(v.dtype)
        # Linear attention: the [h x h] state K^T V first, so the cost is O(L h^2) per head.
        out = q @ (k.transpose(-1, -2) @ v)
        out = srms_norm(out) * u
        b, _, n, _ = out.shape
        out = out.transpose(1, 2).reshape(b, n, -1)
        return self._proj("o", out)


class GatedLinearUnit(nn.Module):
    """Bilinear feed-forward block ``o((x u) * (x v))`` without activation or bias.

    Parameters
    ----------
    emb_dims
        Model width (also the hidden width).
    lora
        LoRA rank on the u/v/o projections; 0 for none.
    """

    _projections = ("u", "v", "o")

    def __init__(self, emb_dims: int, lora: int = 0) -> None:
        super().__init__()
        for name in self._projections:
            setattr(self, f"{name}_proj", nn.Linear(emb_dims, emb_dims, bias=False))
        self.lora = 0
        if lora > 0:
            self.add_lora(lora)

    add_lora = MultiHeadRetention.add_lora
    _proj = MultiHeadRetention._proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._proj("o", self._proj("u", x) * self._proj("v", x))


class RetentionLayer(nn.Module):
    """Post-norm retention block with DeepNorm residual scaling (CellFM's ``RetentionLayer``).

    ``x = LN1(alpha x + Retention(x)); x = LN2(alpha x + GLU(x))`` with
    ``alpha = (2 N)^(1/4)`` for an ``N``-layer encoder.

    Parameters
    ----------
    emb_dims
        Model width.
    num_heads
        Retention heads.
    n_layers
        Depth ``N`` of the encoder the layer belongs to (sets ``alpha``).
    dropout
        Dropout on the two residual branches (training only).
    lora
        LoRA rank on every projection; 0 for none.
    eps
        LayerNorm epsilon (MindSpore's default 1e-7).
    """

    def __init__(
        self,
        emb_dims: int,
        num_heads: int,
        n_layers: int,
        dropout: float = 0.0,
        lora: int = 0,
        eps: float = MINDSPORE_LAYER_NORM_EPS,
    ) -> None:
        super().__init__()
        self.attn = MultiHeadRetention(emb_dims, num_heads, lora)
        self.ffn = GatedLinearUnit(emb_dims, lora)
        self.dropout = nn.Dropout(dropout)
        self.post_norm1 = nn.LayerNorm(emb_dims, eps=eps)
        self.post_norm2 = nn.LayerNorm(emb_dims, eps=eps)
        self.alpha = (2 * n_layers) ** 0.25

    def forward(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        value_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = self.dropout(self.attn(x, key_mask=key_mask, value_scale=value_scale))
        x = self.post_norm1(x * self.alpha + out)
        out = self.dropout(self.ffn(x))
        return self.post_norm2(x * self.alpha + out)


class CrossRetentionLayer(nn.Module):
    """Query block of CellFM's annotation head (the reference's ``CrossRetentionLayer``).

    Self-retention over the query tokens, retention of the queries onto the key / value tokens
    ``y``, then the GLU, each followed by a post-LayerNorm of the plain residual sum (no
    DeepNorm scaling, no LoRA, weights initialised XavierNormal with gain 1).

    Parameters
    ----------
    emb_dims
        Model width.
    num_heads
        Retention heads.
    dropout
        Dropout on the three residual branches (training only).
    eps
        LayerNorm epsilon (MindSpore's default 1e-7).
    """

    def __init__(
        self,
        emb_dims: int,
        num_heads: int,
        dropout: float = 0.0,
        eps: float = MINDSPORE_LAYER_NORM_EPS,
    ) -> None:
        super().__init__()
        self.attn1 = MultiHeadRetention(emb_dims, num_heads)
        self.attn2 = MultiHeadRetention(emb_dims, num_heads)
        self.ffn = GatedLinearUnit(emb_dims)
        self.dropout = nn.Dropout(dropout)
        self.post_norm1 = nn.LayerNorm(emb_dims, eps=eps)
        self.post_norm2 = nn.LayerNorm(emb_dims, eps=eps)
        self.post_norm3 = nn.LayerNorm(emb_dims, eps=eps)
        for block in (self.attn1, self.attn2, self.ffn):
            for name in block._projections:
                nn.init.xavier_normal_(getattr(block, f"{name}_proj").weight)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Queries ``x`` ``[B, L1, d]`` attend to ``y`` ``[B, L2, d]`` (keys where ``key_mask``)."""
        x = self.post_norm1(x + self.dropout(self.attn1(x)))
        x = self.post_norm2(x + self.dropout(self.attn2(x, key_mask=key_mask, y=y)))
        return self.post_norm3(x + self.dropout(self.ffn(x)))
