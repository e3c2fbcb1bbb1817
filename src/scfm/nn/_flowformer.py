"""Flow-Attention (Flowformer) encoder, as used by CellPLM to let cells attend to each other.

Flow-Attention :cite:p:`Wu2022Flowformer` is a linear-cost attention that replaces the
softmax by a flow-network view of attention: queries are sinks, keys are sources, and the
incoming / outgoing flows are normalised ("conserved") so that sinks compete for the flow of
the sources and sources are allocated to sinks. Cost is linear in the sequence length, which
is what lets CellPLM put thousands of cells into one "sentence".

Attribute names mirror the CellPLM checkpoint keys
(``encoder.layers.N.self_attn.query_projection``, ``_ff_block.0``, ``norm1``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from scfm.nn._packing import equal_runs

__all__ = ["FlowAttention", "FlowformerEncoder", "FlowformerLayer"]

#: Numerical floor of Flow-Attention (``eps`` of the reference implementation).
FLOW_EPS = 1e-6
#: Dropout on the attention output inside the attention block (fixed in the reference).
ATTENTION_DROPOUT = 0.01


class FlowAttention(nn.Module):
    """Non-causal multi-head Flow-Attention with an optional padding mask.

    Parameters
    ----------
    d_model
        Width of the input and output.
    n_heads
        Number of heads; ``d_model`` must be divisible by it.
    dropout
        Dropout applied to the attention output (after ``out_projection``).
    eps
        Floor added inside the flow normalisers.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int = 8,
        dropout: float = ATTENTION_DROPOUT,
        eps: float = FLOW_EPS,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}.")
        self.n_heads = n_heads
        self.eps = eps
        self.query_projection = nn.Linear(d_model, d_model)
        self.key_projection = nn.Linear(d_model, d_model)
        self.value_projection = nn.Linear(d_model, d_model)
        self.out_projection = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.n_heads, d // self.n_heads).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        lengths: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Attend within each sequence.

        Parameters
        ----------
        x
            ``[B, L, d_model]`` (B sentences of at most L cells), or with ``lengths`` the
            cells of several sentences one after another ``[N, d_model]``.
        mask
            ``[B, L]`` bool, ``True`` for real positions; ``None`` when nothing is padded.
        lengths
            Lengths of the packed sentences of ``x`` (they sum to ``N``). The projections run
            on the ``N`` real cells only and the flow on each run of equally long sentences
            at once, so no padded cell is computed.

        Returns
        -------
        ``[B, L, d_model]`` (padded positions hold arbitrary finite values), or ``[N, d_model]``
        with ``lengths``.
        """
        if lengths is not None and mask is not None:
            raise ValueError("packed sentences (lengths) have no padding to mask")
        # in place: the projections' outputs are not needed otherwise (nor by autograd)
        q = self.query_projection(x).sigmoid_()
        k = self.key_projection(x).sigmoid_()
        v = self.value_projection(x)
        if lengths is None:
            b, n, d = x.shape
            out = self._flow(self._heads(q), self._heads(k), self._heads(v), mask)
            out = out.transpose(1, 2).reshape(b, n, d)
        else:
            parts, start = [], 0
            for n, count in equal_runs(lengths):
                stop = start + n * count
                q_, k_, v_ = (self._heads(t[start:stop].view(count, n, -1)) for t in (q, k, v))
                flow = self._flow(q_, k_, v_, None)  # [count, H, n, Dh]
                parts.append(flow.transpose(1, 2).reshape(stop - start, -1))
                start = stop
            out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self.dropout(self.out_projection(out))

    def _flow(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Flow-Attention of heads ``[B, H, L, Dh]`` (q, k after the sigmoid): ``[B, H, L, Dh]``."""
        b, _, n, _ = q.shape
        if mask is not None:
            # Zeroed queries / keys drop out of every sum over positions below, so a padded
            # sentence gives the same numbers as the same sentence alone.
            keep = mask[:, None, :, None].to(q.dtype)
            q = q * keep
            k = k * keep
            n_valid = mask.sum(dim=1).to(q.dtype)[:, None, None]  # [B, 1, 1]
        else:
            n_valid = torch.full((b, 1, 1), float(n), dtype=q.dtype, device=q.device)
        eps = self.eps
        q_eps, k_eps = q + eps, k + eps  # each used twice below
        # incoming / outgoing flow of each sink (query) and source (key)
        incoming = 1.0 / torch.einsum("bhld,bhd->bhl", q_eps, k.sum(dim=2) + eps)
        outgoing = 1.0 / torch.einsum("bhsd,bhd->bhs", k_eps, q.sum(dim=2) + eps)
        # conserved flows
        sink = torch.einsum("bhld,bhd->bhl", q_eps, (k * outgoing[..., None]).sum(dim=2) + eps)
        source = torch.einsum("bhsd,bhd->bhs", k_eps, (q * incoming[..., None]).sum(dim=2) + eps)
        del q_eps, k_eps
        source = source.clamp(min=-1.0, max=1.0)
        # allocation (sinks) and competition (sources); non-causal, so L / S = 1
        allocation = torch.sigmoid(sink)
        if mask is not None:
            source = source.masked_fill(~mask[:, None, :], float("-inf"))
        competition = torch.softmax(source, dim=-1) * n_valid
        kv = k.transpose(-2, -1) @ (v * competition[..., None])  # [B, H, Dh, Dh]
        # in place, in the same order as (q @ kv) * incoming * allocation: same numbers,
        # no extra [B, H, L, Dh] buffers
        return (q @ kv).mul_(incoming[..., None]).mul_(allocation[..., None])


class FlowformerLayer(nn.Module):
    """Pre-norm Flowformer block: ``h + Attn(LN1(h))`` then ``h + FFN(LN2(h))``.

    Parameters
    ----------
    d_model
        Width.
    n_heads
        Attention heads.
    dropout
        Dropout inside the feed-forward block and on the attention branch.
    """

    def __init__(self, d_model: int, n_heads: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = FlowAttention(d_model, n_heads)
        # Indices 0 and 3 carry weights, as in the checkpoint (``_ff_block.0``, ``_ff_block.3``).
        self._ff_block = nn.Sequential(
            nn.Linear(d_model, 2 * d_model),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(2 * d_model, d_model),
            nn.Dropout(dropout),
        )
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        lengths: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """``[B, L, d]`` padded sentences, or packed ``[N, d]`` ones with ``lengths``.

        See :meth:`FlowAttention.forward` for ``mask`` and ``lengths``.
        """
        x = x + self.dropout1(self.self_attn(self.norm1(x), mask, lengths=lengths))
        return x + self._ff_block(self.norm2(x))


class FlowformerEncoder(nn.Module):
    """A stack of :class:`FlowformerLayer` (no final norm, as in CellPLM).

    Parameters
    ----------
    d_model
        Width.
    n_layers
        Number of layers.
    n_heads
        Attention heads per layer.
    dropout
        Dropout of each layer.
    """

    def __init__(self, d_model: int, n_layers: int, n_heads: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [FlowformerLayer(d_model, n_heads, dropout) for _ in range(n_layers)]
        )

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        n_layers: int | None = None,
        *,
        lengths: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Run the stack (or its first ``n_layers`` layers).

        Parameters
        ----------
        x
            ``[B, L, d_model]``, or with ``lengths`` the cells of several sentences one after
            another ``[N, d_model]``.
        mask
            ``[B, L]`` bool, ``True`` = real cell; ``None`` when nothing is padded.
        n_layers
            Stop after this many layers (``0`` returns ``x``); ``None``: all.
        lengths
            Lengths of the packed sentences (they sum to ``N``): every per-cell step runs on
            the real cells only, the attention within each sentence (sentences of one length
            at once). Order the sentences by length to make those runs long.
        """
        for layer in self.layers[:n_layers]:
            x = layer(x, mask, lengths=lengths)
        return x
