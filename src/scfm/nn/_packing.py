"""Helpers of the packed inference paths: cells' tokens one after another in a ``[T, d]`` matrix.

Encoders that drop padding (BERT and CellFM's retention at inference, CellPLM's Flowformer)
pack the real tokens of a minibatch row after row: a sequence of ``n`` tokens (a cell's genes,
or a CellPLM sentence's cells) owns ``n`` consecutive rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["equal_runs", "first_rows"]


def first_rows(lengths: Sequence[int], device: torch.device) -> torch.Tensor:
    """Row of each cell's first token in packed cells of ``lengths`` tokens (int64 ``[cells]``)."""
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + int(n))
    return torch.tensor(starts[: len(lengths)], dtype=torch.long, device=device)


def equal_runs(lengths: Sequence[int]) -> list[tuple[int, int]]:
    """``(length, count)`` of each run of consecutive equal ``lengths``.

    A run of ``count`` sequences of one ``length`` is a ``[count, length, ...]`` view of the
    packed rows: one batched call without padding.
    """
    runs: list[tuple[int, int]] = []
    for n in lengths:
        n = int(n)
        if runs and runs[-1][0] == n:
            runs[-1] = (n, runs[-1][1] + 1)
        else:
            runs.append((n, 1))
    return runs
