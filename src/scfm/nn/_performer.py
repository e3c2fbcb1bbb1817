"""Performer (FAVOR+ linear attention) stack, as used by scBERT and the scFoundation decoder.

Attention is approximated with positive random features :cite:p:`Choromanski2021`:
``softmax(q k^T) v ~ phi(q) (phi(k)^T v) / (phi(q) . sum_n phi(k))``, linear in the sequence
length. Submodule names mirror the keys of the reference implementation
(``performer.net.layers.{i}.0.fn.to_q``, ``...fast_attention.projection_matrix``,
``...1.fn.fn.w1``) so that released weights load without renaming.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

__all__ = [
    "FastAttention",
    "Performer",
    "PerformerModule",
    "PerformerSelfAttention",
    "gaussian_orthogonal_random_matrix",
    "softmax_kernel",
]

#: How the stabilising maximum of the key features is taken: per sample (each cell on its
#: own, what a batch of one computes) or over the whole batch (the reference batched path).
KeyMax = Literal["sample", "batch"]

#: Constant added to the exponentiated features (reference value).
_KERNEL_EPS = 1e-4


def gaussian_orthogonal_random_matrix(nb_rows: int, nb_columns: int) -> torch.Tensor:
    """Random projection of blocks of orthogonal rows scaled by Gaussian norms.

    Used only to initialise fresh models; released weights carry their own matrix.
    """
    blocks = []
    for start in range(0, nb_rows, nb_columns):
        q, _ = torch.linalg.qr(torch.randn(nb_columns, nb_columns), mode="reduced")
        blocks.append(q.T[: min(nb_columns, nb_rows - start)])
    multiplier = torch.randn(nb_rows, nb_columns).norm(dim=1)
    return multiplier[:, None] * torch.cat(blocks)


def softmax_kernel(
    data: torch.Tensor,
    projection_matrix: torch.Tensor,
    *,
    is_query: bool,
    key_max: KeyMax = "sample",
) -> torch.Tensor:
    """Positive random features ``phi(x)`` of queries or keys of shape ``(b, h, n, d)``.

    Queries are stabilised with their own per-row maximum; keys with one maximum per sample
    (``key_max="sample"``) or over the whole batch (``"batch"``). The maximum cancels in the
    attention ratio except for the ``1e-4`` added to the features, so the two modes differ
    slightly.
    """
    normalizer = data.shape[-1] ** -0.25
    ratio = projection_matrix.shape[0] ** -0.5
    proj = torch.matmul(normalizer * data, projection_matrix.T.to(data.dtype))
    diag = (data * data).sum(dim=-1, keepdim=True) * (normalizer**2 / 2.0)
    if is_query:
        stab = proj.amax(dim=-1, keepdim=True)
    elif key_max == "sample":
        stab = proj.amax(dim=(1, 2, 3), keepdim=True)
    else:
        stab = proj.amax()
    return ratio * (torch.exp(proj - diag - stab) + _KERNEL_EPS)


class FastAttention(nn.Module):
    """Non-causal FAVOR+ attention with a fixed (stored) random projection.

    Parameters
    ----------
    dim_heads
        Size of one attention head.
    nb_features
        Number of random features; default ``int(dim_heads * ln(dim_heads))``.
    """

    def __init__(self, dim_heads: int, nb_features: int | None = None) -> None:
        super().__init__()
        nb_features = nb_features or int(dim_heads * math.log(dim_heads))
        self.register_buffer(
            "projection_matrix", gaussian_orthogonal_random_matrix(nb_features, dim_heads)
        )

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_max: KeyMax = "sample"
    ) -> torch.Tensor:
        """Attend ``q, k, v`` of shape ``(b, h, n, d)``."""
        q = softmax_kernel(q, self.projection_matrix, is_query=True)
        k = softmax_kernel(k, self.projection_matrix, is_query=False, key_max=key_max)
        context = torch.matmul(k.transpose(-1, -2), v)  # (b, h, m, d)
        denom = torch.matmul(q, k.sum(dim=-2).unsqueeze(-1))  # (b, h, n, 1)
        return torch.matmul(q, context) / denom


class PerformerSelfAttention(nn.Module):
    """Multi-head self-attention with FAVOR+ kernels (``SelfAttention`` in the reference)."""

    def __init__(self, dim: int, heads: int, dim_head: int, qkv_bias: bool = True) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.fast_attention = FastAttention(dim_head)
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, key_max: KeyMax = "sample") -> torch.Tensor:
        b, n, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, -1).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        out = self.fast_attention(q, k, v, key_max=key_max)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    """``w2(GELU(w1(x)))`` with a ``mult``-times wider hidden layer."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, dim * mult)
        self.act = nn.GELU()
        self.w2 = nn.Linear(dim * mult, dim)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)))


class Chunk(nn.Module):
    """Holder of the feed-forward block.

    The reference wraps the feed-forward in a sequence-chunking helper (one chunk, i.e. a
    no-op); the wrapper is kept only so that the ``fn.fn.w1`` key names match.
    """

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.fn(x)


class PreLayerNorm(nn.Module):
    """``fn(LayerNorm(x))``; the residual is added by :class:`Performer`."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.fn(self.norm(x), **kwargs)


class _SequentialSequence(nn.Module):
    """``layers[i] = [attention, feed-forward]`` applied as pre-norm residual blocks."""

    def __init__(self, layers: nn.ModuleList) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor, key_max: KeyMax = "sample") -> torch.Tensor:
        for attn, ff in self.layers:
            x = x + attn(x, key_max=key_max)
            x = x + ff(x)
        return x


class Performer(nn.Module):
    """A stack of ``depth`` Performer layers (non-causal, no local heads, no rotary terms).

    The random projections are never redrawn: pretrained weights are only meaningful with
    the projection they were trained with, so the reference's training-time feature
    redrawing is not reproduced. ``calls_since_last_redraw`` is kept as a buffer only for
    checkpoint compatibility.
    """

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, ff_mult: int = 4) -> None:
        super().__init__()
        layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PreLayerNorm(dim, PerformerSelfAttention(dim, heads, dim_head)),
                    PreLayerNorm(dim, Chunk(FeedForward(dim, ff_mult))),
                ]
            )
            for _ in range(depth)
        )
        self.net = _SequentialSequence(layers)
        self.register_buffer("calls_since_last_redraw", torch.tensor(0))

    def forward(self, x: torch.Tensor, key_max: KeyMax = "sample") -> torch.Tensor:
        return self.net(x, key_max=key_max)


class PerformerModule(nn.Module):
    """:class:`Performer` followed by a final LayerNorm (``PerformerModule`` in scFoundation).

    Parameters
    ----------
    dim
        Model width.
    depth
        Number of layers.
    heads
        Attention heads.
    dim_head
        Size of one head.
    """

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.performer = Performer(dim, depth, heads, dim_head)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, key_max: KeyMax = "sample") -> torch.Tensor:
        """Transform ``x`` of shape ``(b, n, dim)``; there is no padding mask (none is needed)."""
        return self.norm(self.performer(x, key_max=key_max))
