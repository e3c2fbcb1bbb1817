"""CellFM input preparation as vectorised torch functions (counts in, tokens out).

Reproduces the reference preprocessing (biomed-AI/CellFM tutorials: ``read_h5ad`` ->
``TestSCrna`` -> ``Prepare`` -> ``build_testdata``) on counts in the MODEL's gene space
(column ``j`` = vocabulary gene ``j``, token id ``j + 1``):

1. cells deeper than 100,000 counts (over ALL genes of the AnnData, which the caller passes as
   ``depth``) are scaled down and rounded: ``X <- round(X / max(1, depth / 1e5))``;
2. ``normalize_total(target_sum=1e4)`` over the vocabulary genes, then ``log1p``;
3. the tokens of a cell are its NON-ZERO genes in alphabetical gene order (the reference
   aligns genes with ``np.intersect1d``, which sorts them), value = the log1p value;
4. cells with more than ``max_tokens`` of them keep a weighted random sample (weights
   ``log1p(value)``, without replacement), in the same order.

Randomness is per cell: a cell's sample (and its value-recovery mask) is drawn from a
generator seeded with that cell's own seed, so it never depends on the other cells of the
minibatch or on the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

__all__ = [
    "CellFMTokens",
    "cell_depths",
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
#: Rows read at once by :func:`cell_depths` (bounds memory on backed matrices).
_CHUNK_ROWS = 10_000


@dataclass
class CellFMTokens:
    """A minibatch of CellFM tokens, padded to the longest cell.

    Attributes
    ----------
    gene_ids
        ``[B, L]`` vocabulary ids (1 + position in the vocabulary; 0 = padding).
    values
        ``[B, L]`` log1p-normalised expression (0 on padding).
    n_tokens
        ``[B]`` number of real tokens per cell.
    totals
        ``[B]`` total counts over the vocabulary genes after the depth rounding (``T``).
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


def cell_depths(matrix, cells: np.ndarray, chunk_size: int = _CHUNK_ROWS) -> np.ndarray:
    """Total counts of the rows ``cells`` of ``matrix`` over all its columns (float64).

    Read ``chunk_size`` sorted rows at a time, so a backed matrix is never loaded whole.
    """
    cells = np.asarray(cells, dtype=np.int64)
    out = np.empty(len(cells), dtype=np.float64)
    order = np.argsort(cells, kind="stable")  # backed (h5py) reads need sorted rows
    for start in range(0, len(cells), chunk_size):
        rows = order[start : start + chunk_size]
        block = matrix[cells[rows]]
        sums = block.sum(axis=1) if sp.issparse(block) else np.asarray(block).sum(axis=1)
        out[rows] = np.asarray(sums, dtype=np.float64).reshape(-1)
    return out


def cellfm_normalize(
    counts: torch.Tensor,
    depth: torch.Tensor | None = None,
    *,
    max_depth: float = MAX_CELL_DEPTH,
    target_sum: float = TARGET_SUM,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Depth-round, normalise and log-transform counts in the model's gene space.

    Parameters
    ----------
    counts
        ``[B, V]`` raw counts of the vocabulary genes.
    depth
        ``[B]`` total counts of each cell over ALL genes of its AnnData (the reference's
        rounding uses them); ``None``: the total over ``counts``.
    max_depth
        Cells with more total counts are scaled to about this depth and rounded.
    target_sum
        Normalisation target.

    Returns
    -------
    ``(log1p values [B, V], rounded counts [B, V], totals T [B])``.
    """
    x = counts.float()
    depth = x.sum(dim=1) if depth is None else depth.to(x.device, x.dtype)
    x = torch.round(x / torch.clamp(depth[:, None] / max_depth, min=1.0))
    totals = x.sum(dim=1)
    # scanpy's normalize_total divides by (total / target); empty cells stay zero.
    size = torch.where(totals > 0, totals / target_sum, torch.ones_like(totals))
    values = torch.log1p(x / size[:, None])
    return values, x, totals


def _compact(selected: torch.Tensor, *arrays: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Move the selected columns of each row to the front (stable), trim to the longest row."""
    n = selected.sum(dim=1)
    order = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)
    length = max(int(n.max()) if n.numel() else 0, 1)
    order = order[:, :length]
    keep = torch.gather(selected, 1, order)
    out = [torch.gather(a, 1, order) * keep.to(a.dtype) for a in arrays]
    return (n, *out)


def _per_cell_uniform(
    cell_seed: torch.Tensor, n: int, rows: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """``[len(rows), n]`` uniforms, row ``i`` from a CPU generator seeded with its cell's seed.

    A CPU generator gives the same numbers on every device, and a cell's numbers do not
    depend on which other cells are drawn.
    """
    seeds = cell_seed.detach().cpu().tolist()
    draws = [
        torch.rand(n, generator=torch.Generator().manual_seed(int(seeds[r]))) for r in rows.tolist()
    ]
    return torch.stack(draws).to(device)


def cellfm_tokenize(
    counts: torch.Tensor,
    token_order: torch.Tensor,
    *,
    depth: torch.Tensor | None = None,
    max_tokens: int | None = MAX_TOKENS,
    cell_seed: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> CellFMTokens:
    """Turn raw counts into CellFM tokens (non-zero genes with their log1p values).

    Parameters
    ----------
    counts
        ``[B, V]`` raw counts in the model's gene space.
    token_order
        ``[V]`` vocabulary positions in token order (alphabetical by gene symbol, as the
        reference).
    depth
        ``[B]`` total counts over all genes of the AnnData (see :func:`cellfm_normalize`).
    max_tokens
        At most this many genes per cell (the reference's 2048); a cell with more non-zero
        genes keeps a random sample weighted by ``log1p(value)``. ``None``: keep all.
    cell_seed
        ``[B]`` integer seed per cell. Given, each deeper cell is sampled with its own
        generator (the result depends on the cell alone); otherwise ``generator`` is used.
    generator
        Random generator of the sampling when ``cell_seed`` is ``None``.

    Returns
    -------
    The :class:`CellFMTokens`, padded to the longest cell of the minibatch.
    """
    values, _, totals = cellfm_normalize(counts, depth)
    order = token_order.to(values.device)
    values = values[:, order]
    nonzero = values > 0
    if max_tokens is not None:
        too_long = torch.nonzero(nonzero.sum(dim=1) > max_tokens).squeeze(1)
        if len(too_long):
            if cell_seed is not None:
                # Uniforms indexed by vocabulary position, so that a gene draws the same
                # number whatever the column order.
                u = _per_cell_uniform(cell_seed, len(order), too_long, values.device)[:, order]
            else:
                shape = (len(too_long), values.shape[1])
                u = torch.rand(shape, generator=generator, device=values.device)
            nonzero = nonzero.clone()
            nonzero[too_long] = _weighted_subsample(
                values[too_long], nonzero[too_long], max_tokens, u
            )
    ids = (order + 1)[None, :].expand_as(values)
    n, gene_ids, token_values = _compact(nonzero, ids, values)
    return CellFMTokens(gene_ids=gene_ids.long(), values=token_values, n_tokens=n, totals=totals)


def _weighted_subsample(
    values: torch.Tensor, nonzero: torch.Tensor, k: int, u: torch.Tensor
) -> torch.Tensor:
    """Keep ``k`` non-zero genes per row, sampled ∝ ``log1p(value)`` without replacement.

    Gumbel top-k on the uniforms ``u`` (equivalent to sequential weighted draws without
    replacement, which is what the reference's ``np.random.choice(..., replace=False, p=w)``
    does).
    """
    gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1 - 1e-7)))
    weights = torch.log1p(values)
    scores = torch.where(nonzero, torch.log(weights.clamp_min(1e-30)) + gumbel, -torch.inf)
    top = torch.topk(scores, k, dim=1).indices
    return torch.zeros_like(nonzero).scatter_(1, top, True)


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
    ``Prepare.mask`` does after ``np.random.seed(seeds[i])``.

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
            chosen = np.random.RandomState(int(seed) % 2**32).permutation(n)[:n_sel]
            unmask[i, chosen[: int(MASK_REPLACE_FRACTION * n_sel)]] = 0
            scored[i, chosen] = 1
    return unmask, scored
