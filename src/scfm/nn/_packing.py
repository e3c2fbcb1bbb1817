"""Helpers of the packed inference paths: cells' tokens one after another in a ``[T, d]`` matrix.

Encoders that drop padding at inference (BERT, CellFM's retention) pack the real tokens of a
minibatch row after row; a cell of ``n`` tokens owns ``n`` consecutive rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["first_rows"]


def first_rows(lengths: Sequence[int], device: torch.device) -> torch.Tensor:
    """Row of each cell's first token in packed cells of ``lengths`` tokens (int64 ``[cells]``)."""
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + int(n))
    return torch.tensor(starts[: len(lengths)], dtype=torch.long, device=device)
