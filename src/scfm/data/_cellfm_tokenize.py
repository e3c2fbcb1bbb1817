"""CellFM input preparation as vectorised torch functions (counts in, tokens out).

Reproduces the reference preprocessing (biomed-AI/CellFM tutorials: ``read_h5ad`` ->
``TestSCrna`` -> ``Prepare`` -> ``build_testdata``):

1. cells deeper than 100,000 counts (over all genes) are scaled down and rounded:
   ``X <- round(X / max(1, total / 1e5))``;
2. only vocabulary genes are kept, in the reference's order (alphabetical: the reference
   aligns with ``np.intersect1d``);
3. ``normalize_total(target_sum=1e4)`` over the kept genes, then ``log1p``;
4. the tokens of a cell are its NON-ZERO kept genes (value = the log1p value, id = vocabulary
   id); cells with more than ``max_tokens`` of them keep a weighted random sample
   (weights ``log1p(value)``, without replacement), in gene order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "CellFMTokens",
    "cellfm_mask_tokens",
    "cellfm_normalize",
    "cellfm_reference_mask",
    "cellfm_tokenize",
]

#: Cells with more total counts than this are scaled down (``Prepare`` / ``read_h5ad``).
MAX_CELL_DEPTH = 1e5
#: ``normalize_total`` target.
TARGET_SUM = 1e4
#: Longest gene sequence of the reference (``Prepare(pad_len=2048)``).
MAX_TOKENS = 2048
#: Fraction of the selected positions replaced by the mask embedding (the rest keep values).
MASK_REPLACE_FRACTION = 0.8


@dataclass
class CellFMTokens:
    """A minibatch of CellFM tokens, padded to the longest cell.

    Attributes
    ----------
    gene_ids
        ``[B, L]`` vocabulary ids (1 + row of the gene list; 0 = padding).
    values
        ``[B, L]`` log1p-normalised expression (0 on padding).
    n_tokens
        ``[B]`` number of real tokens per cell.
    totals
        ``[B]`` total counts over the kept genes after the depth rounding (``T``).
    """

    gene_ids: torch.Tensor
    values: torch.Tensor
    n_tokens: torch.Tensor
    totals: torch.Tensor

    @property
    def token_mask(self) -> torch.Tensor:
        """``[B, L]`` float mask, 1 on real tokens."""
        positions = torch.arange(self.gene_ids.shape[1], device=self.gene_ids.device)
        return (positions[None, :] < self.n_tokens[:, None]).to(self.values.dtype)


def cellfm_normalize(
    counts: torch.Tensor,
    kept_var_index: torch.Tensor,
    *,
    max_depth: float = MAX_CELL_DEPTH,
    target_sum: float = TARGET_SUM,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Depth-round, restrict to the kept genes, normalise and log-transform.

    Parameters
    ----------
    counts
        ``[B, n_vars]`` raw counts in ``adata.var`` order.
    kept_var_index
        ``[K]`` positions of the vocabulary genes in ``adata.var``, in token order.
    max_depth
        Cells with more total counts are scaled to about this depth and rounded.
    target_sum
        Normalisation target.

    Returns
    -------
    ``(log1p values [B, K], rounded kept counts [B, K], totals T [B])``.
    """
    x = counts.float()
    depth = x.sum(dim=1, keepdim=True)
    x = torch.round(x / torch.clamp(depth / max_depth, min=1.0))
    kept = x[:, kept_var_index]
    totals = kept.sum(dim=1)
    # scanpy's normalize_total divides by (total / target); empty cells stay zero.
    size = torch.where(totals > 0, totals / target_sum, torch.ones_like(totals))
    values = torch.log1p(kept / size[:, None])
    return values, kept, totals


def _compact(selected: torch.Tensor, *arrays: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Move the selected columns of each row to the front (stable), trim to the longest row."""
    n = selected.sum(dim=1)
    order = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)
    length = max(int(n.max()) if n.numel() else 0, 1)
    order = order[:, :length]
    keep = torch.gather(selected, 1, order)
    out = [torch.gather(a, 1, order) * keep.to(a.dtype) for a in arrays]
    return (n, *out)


def cellfm_tokenize(
    counts: torch.Tensor,
    kept_var_index: torch.Tensor,
    kept_token_ids: torch.Tensor,
    *,
    max_tokens: int | None = MAX_TOKENS,
    generator: torch.Generator | None = None,
) -> CellFMTokens:
    """Turn raw counts into CellFM tokens (non-zero kept genes with their log1p values).

    Parameters
    ----------
    counts
        ``[B, n_vars]`` raw counts in ``adata.var`` order.
    kept_var_index
        ``[K]`` positions in ``adata.var`` of the vocabulary genes, in token order.
    kept_token_ids
        ``[K]`` their vocabulary ids (1 + row in the gene list).
    max_tokens
        At most this many genes per cell (the reference's 2048); a cell with more non-zero
        genes keeps a random sample weighted by ``log1p(value)``. ``None``: keep all.
    generator
        Random generator for that sampling (pass a seeded one for reproducibility).

    Returns
    -------
    The :class:`CellFMTokens`, padded to the longest cell of the minibatch.
    """
    values, _, totals = cellfm_normalize(counts, kept_var_index)
    nonzero = values > 0
    if max_tokens is not None and bool((nonzero.sum(dim=1) > max_tokens).any()):
        nonzero = _weighted_subsample(values, nonzero, max_tokens, generator)
    ids = kept_token_ids.to(values.device)[None, :].expand_as(values)
    n, gene_ids, token_values = _compact(nonzero, ids, values)
    return CellFMTokens(gene_ids=gene_ids.long(), values=token_values, n_tokens=n, totals=totals)


def _weighted_subsample(
    values: torch.Tensor, nonzero: torch.Tensor, k: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Keep ``k`` non-zero genes per over-long cell, sampled ∝ ``log1p(value)`` without replacement.

    Uses Gumbel top-k (equivalent to sequential weighted draws without replacement, which is
    what the reference's ``np.random.choice(..., replace=False, p=w)`` does).
    """
    u = torch.rand(values.shape, generator=generator, device=values.device).clamp_min(1e-20)
    gumbel = -torch.log(-torch.log(u))
    weights = torch.log1p(values)
    scores = torch.where(nonzero, torch.log(weights.clamp_min(1e-30)) + gumbel, -torch.inf)
    kth = torch.topk(scores, k, dim=1).values[:, -1:]
    too_long = nonzero.sum(dim=1, keepdim=True) > k
    return torch.where(too_long, scores >= kth, nonzero)


def cellfm_mask_tokens(
    n_tokens: torch.Tensor,
    length: int,
    mask_ratio: float,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random masked-value-recovery mask (the reference's ``Prepare.mask``), vectorised.

    Per cell, ``int(mask_ratio * n)`` token positions are selected uniformly; the first
    ``int(0.8 * l)`` of them get the mask embedding, the others keep their value; all
    selected positions are scored.

    Parameters
    ----------
    n_tokens
        ``[B]`` real tokens per cell.
    length
        Padded length ``L``.
    mask_ratio
        Fraction of each cell's tokens to score.
    generator
        Random generator.

    Returns
    -------
    ``(unmask [B, L], scored [B, L])`` float masks: ``unmask`` is 1 where the value is
    visible (0 on masked positions and padding), ``scored`` 1 on selected positions.
    """
    device = n_tokens.device
    positions = torch.arange(length, device=device)[None, :]
    real = positions < n_tokens[:, None]
    keys = torch.rand((len(n_tokens), length), generator=generator, device=device)
    keys = torch.where(real, keys, torch.inf)
    rank = torch.argsort(torch.argsort(keys, dim=1), dim=1)
    n_sel = (mask_ratio * n_tokens.double()).floor().long()
    n_masked = (MASK_REPLACE_FRACTION * n_sel.double()).floor().long()
    scored = rank < n_sel[:, None]
    masked = rank < n_masked[:, None]
    unmask = (real & ~masked).float()
    return unmask, scored.float()


def cellfm_reference_mask(
    n_tokens: np.ndarray, length: int, mask_ratio: float, seeds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The reference's exact mask for given per-cell numpy seeds.

    Cell ``i`` draws ``np.random.RandomState(seeds[i]).permutation(n_i)`` and selects its
    first ``int(mask_ratio * n_i)`` positions (the first 80 % of them masked), exactly as
    ``Prepare.mask`` does after ``np.random.seed(seeds[i])``. Used to reproduce reference
    runs; training uses :func:`cellfm_mask_tokens`.

    Returns
    -------
    ``(unmask [B, L], scored [B, L])`` as float32 arrays.
    """
    unmask = np.zeros((len(n_tokens), length), dtype=np.float32)
    scored = np.zeros_like(unmask)
    for i, (n, seed) in enumerate(zip(np.asarray(n_tokens), np.asarray(seeds))):
        n = int(n)
        unmask[i, :n] = 1
        n_sel = int(mask_ratio * n)
        if n_sel > 0:
            chosen = np.random.RandomState(int(seed)).permutation(n)[:n_sel]
            unmask[i, chosen[: int(MASK_REPLACE_FRACTION * n_sel)]] = 0
            scored[i, chosen] = 1
    return unmask, scored
