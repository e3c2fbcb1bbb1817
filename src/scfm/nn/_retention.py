"""Multi-scale-retention style linear attention blocks, as used by CellFM.

CellFM :cite:p:`Zeng2025` replaces softmax attention by a gated linear "retention" without
decay or positional terms: with ``Q = relu(x Wq)``, ``K = relu(x Wk)`` the per-head output is
``Q (Kᵀ V)``, computed right to left so that the cost is linear in the number of tokens
(``h x h`` state per head instead of an ``L x L`` score matrix). Softmax attention kernels
(``scaled_dot_product_attention``) do not apply to this kernel; padding is handled by zeroing
the keys of padded tokens, or avoided by passing the sequences packed (``lengths``).

Numerics follow the original MindSpore code: LayerNorm ``eps = 1e-7`` and the per-head
scale-free RMS normalisation computed in float32. The reference's ``1/sqrt(h)`` on Q and K and
its ``1/sqrt(n)`` on V are left out: the per-head normalisation divides every such factor out
again (up to float rounding, and unless a head's output norm is below 1e-12, where both give
about zero), so they would only cost passes over the activations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from scfm.nn._packing import first_rows

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
    # the 1/sqrt(n) on the [..., 1] norms and one reciprocal per row: the same operations
    # as the in-place version in ``_retain`` (identical numbers for training and inference)
    norm = torch.linalg.vector_norm(x32, dim=-1, keepdim=True) * (1.0 / math.sqrt(x.shape[-1]))
    return (x32 * norm.clamp_min(SRMS_NORM_MIN).reciprocal()).to(dtype)


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

    def forward(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        lengths: Sequence[int] | None = None,
        firsts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Retention of queries ``x`` onto keys / values ``y`` (default ``x``).

        Parameters
        ----------
        x
            Query tokens ``[B, L1, d]``, or with ``lengths`` the tokens of several sequences
            one after the other ``[T, d]`` (self-retention only).
        key_mask
            ``[B, L2]`` (``[T]`` with ``lengths``) with 1 for tokens that act as keys, 0 for
            padded / masked ones; ``None``: every token is a key.
        y
            Key / value tokens ``[B, L2, d]``; ``None`` for self-retention.
        lengths
            Lengths of the packed sequences of ``x`` (they sum to ``T``); each sequence
            retains only onto itself, and no padded token is computed.
        firsts
            With ``lengths``: the row of each sequence's first token
            (:func:`~scfm.nn._packing.first_rows`); given, only those tokens query (every
            token is still a key and value) and the result is ``[sequences, d]``.
        """
        if lengths is not None and y is not None:
            raise ValueError("packed sequences (lengths) support self-retention only")
        if firsts is not None and lengths is None:
            raise ValueError("firsts needs packed sequences (lengths)")
        y = x if y is None else y
        rows = None if lengths is None else [int(n) for n in lengths]
        queries = x if firsts is None else x[firsts]
        # Without autograd the element-wise steps run in place on the projections: fewer
        # passes over the activations and no fresh [tokens x d] buffers.
        inplace = not torch.is_grad_enabled()
        q = _relu(self._proj("q", queries), inplace)
        k = _relu(self._proj("k", y), inplace)
        v = self._proj("v", y)
        u = self._proj("u", queries)
        u = nn.functional.silu(u, inplace=inplace)
        if key_mask is not None:
            mask = key_mask[..., None].to(k.dtype)
            k = k.mul_(mask) if inplace else k * mask
        if rows is None:
            pairs = [(q[i], k[i], v[i], u[i]) for i in range(x.shape[0])]
        else:
            one = [1] * len(rows)
            q_rows = rows if firsts is None else one
            pairs = zip(q.split(q_rows), k.split(rows), v.split(rows), u.split(q_rows), strict=True)
        out = [_retain(*pair, self.num_heads, inplace) for pair in pairs]
        if inplace:
            out = u  # _retain wrote each sequence's gated output into its rows of u
        elif rows is None:
            out = torch.stack(out)
        else:
            out = torch.cat(out)
        return self._proj("o", out)


def _relu(x: torch.Tensor, inplace: bool) -> torch.Tensor:
    return x.relu_() if inplace else torch.relu(x)


def _retain(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    num_heads: int,
    inplace: bool,
) -> torch.Tensor:
    """Gated, normalised retention of one sequence: ``srms_norm(Q (Kᵀ V)) * U`` per head.

    ``q``, ``u``: ``[n1, d]``; ``k``, ``v``: ``[n2, d]`` (views into the projections; the
    per-head views are strided, so no head transpose is copied). With ``inplace`` the result
    is written into ``u`` (laid out ``[n1, d]`` as the output projection reads it).
    """
    n1, d = q.shape
    h = d // num_heads
    # [H, h, n2] @ [H, n2, h]: the h x h state of each head
    state = torch.bmm(
        k.view(-1, num_heads, h).permute(1, 2, 0), v.view(-1, num_heads, h).transpose(0, 1)
    )
    out = torch.bmm(q.view(n1, num_heads, h).transpose(0, 1), state)  # [H, n1, h]
    if out.dtype == torch.float32 and inplace:
        # srms_norm(out) with one pass over out: the 1/sqrt(h) goes onto the [H, n1, 1] norms
        norm = torch.linalg.vector_norm(out, dim=-1, keepdim=True).mul_(1.0 / math.sqrt(h))
        out = out.mul_(norm.clamp_min_(SRMS_NORM_MIN).reciprocal_())
    else:
        out = srms_norm(out)
    heads = out.transpose(0, 1)  # [n1, H, h] view
    if not inplace:
        return (heads * u.view(n1, num_heads, h)).reshape(n1, d)
    u.view(n1, num_heads, h).mul_(heads)
    return u


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
        u, v = self._proj("u", x), self._proj("v", x)
        return self._proj("o", u.mul_(v) if not torch.is_grad_enabled() else u * v)


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
        lengths: Sequence[int] | None = None,
        first_token_only: bool = False,
    ) -> torch.Tensor:
        """Tokens ``x`` ``[B, L, d]``, or packed ``[T, d]`` with ``lengths``.

        See :meth:`MultiHeadRetention.forward` for ``key_mask`` and ``lengths``.
        ``first_token_only`` (with ``lengths``): the layer's output at each sequence's first
        token only, ``[sequences, d]`` (what a ``<cls>`` read needs); only those tokens query,
        every token is still a key and value.
        """
        if first_token_only and lengths is None:
            raise ValueError("first_token_only needs packed sequences (lengths)")
        firsts = first_rows(lengths, x.device) if first_token_only else None
        out = self.attn(x, key_mask=key_mask, lengths=lengths, firsts=firsts)
        if firsts is not None:
            x = x[firsts]
        x = self.post_norm1(_residual(self.dropout(out), x, self.alpha))
        out = self.dropout(self.ffn(x))
        return self.post_norm2(_residual(out, x, self.alpha))


def _residual(out: torch.Tensor, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha x + out`` in one pass (into ``out`` when no gradient is recorded)."""
    if torch.is_grad_enabled() or out.dtype != torch.result_type(out, x):
        # (under autocast ``out`` may be bf16 while ``x`` is float32: the sum is float32)
        return torch.add(out, x, alpha=alpha)
    return out.add_(x, alpha=alpha)


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
