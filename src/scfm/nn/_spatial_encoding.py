"""2-D sinusoidal positional encoding of cell coordinates (CellPLM paper, Sec. 3).

The released CellPLM code builds this encoding but adds the constant 0 instead (upstream
issue #19), so it only matters for models trained with it switched on; scfm offers it as an
option (``spatial_encoding=True``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

__all__ = ["Sinusoidal2dPE", "normalize_coordinates"]

#: Grid resolution per axis of the reference encoding (a 100 x 100 table).
GRID_SIZE = 100
#: Coordinates in [0, 1] are stretched by this factor and shifted by ``-GRID_MARGIN`` before
#: binning, so that 0 and 1 land strictly inside the grid (reference constants).
GRID_STRETCH = 1.02
GRID_MARGIN = 0.01


def normalize_coordinates(coords: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Min-max scale the first two coordinate columns to ``[0, 1]`` within each group.

    Parameters
    ----------
    coords
        ``(n_cells, >=2)`` coordinates (pixels, array positions, microns ...).
    groups
        ``(n_cells,)`` group label of each cell (sample / field of view).

    Returns
    -------
    ``(n_cells, 2)`` float32 array; a group with a constant axis maps it to 0.5.
    """
    xy = np.asarray(coords, dtype=np.float64)[:, :2]
    out = np.empty_like(xy)
    for g in np.unique(groups):
        sel = groups == g
        lo, hi = xy[sel].min(axis=0), xy[sel].max(axis=0)
        span = np.where(hi > lo, hi - lo, 1.0)
        out[sel] = np.where(hi > lo, (xy[sel] - lo) / span, 0.5)
    return out.astype(np.float32)


class Sinusoidal2dPE(nn.Module):
    """Sinusoidal encoding of binned 2-D coordinates, with a learned vector for "no position".

    The first half of the channels encodes the x bin, the second half the y bin, each with the
    standard transformer frequencies ``10000^(-2i / (d/2))``.

    Parameters
    ----------
    d_model
        Width; must be divisible by 4.
    grid_size
        Bins per axis.
    """

    def __init__(self, d_model: int, grid_size: int = GRID_SIZE) -> None:
        super().__init__()
        if d_model % 4:
            raise ValueError(f"d_model={d_model} must be divisible by 4 for a 2-D encoding.")
        self.d_model = d_model
        self.grid_size = grid_size
        self.missing_pe = nn.Parameter(torch.zeros(d_model))
        half = d_model // 2
        freq = torch.exp(
            torch.arange(0, half, 2, dtype=torch.float32) * (-math.log(10000.0) / half)
        )
        self.register_buffer("freq", freq, persistent=False)

    def _axis(self, pos: torch.Tensor) -> torch.Tensor:
        angle = pos[:, None].to(self.freq.dtype) * self.freq[None, :]
        out = torch.empty(len(pos), self.d_model // 2, dtype=angle.dtype, device=pos.device)
        out[:, 0::2] = torch.sin(angle)
        out[:, 1::2] = torch.cos(angle)
        return out

    def forward(self, coords: torch.Tensor | None, n_cells: int) -> torch.Tensor:
        """Encoding of each cell.

        Parameters
        ----------
        coords
            ``[N, 2]`` coordinates scaled to ``[0, 1]`` (see :func:`normalize_coordinates`),
            or ``None`` for non-spatial data (every cell gets ``missing_pe``).
        n_cells
            ``N`` (used when ``coords`` is ``None``).
        """
        if coords is None:
            return self.missing_pe.expand(n_cells, -1)
        bins = torch.floor((coords[:, :2] * GRID_STRETCH - GRID_MARGIN) * self.grid_size)
        bins = bins.clamp(0, self.grid_size - 1)
        pe = torch.cat([self._axis(bins[:, 0]), self._axis(bins[:, 1])], dim=-1)
        return pe.to(self.missing_pe.dtype)
