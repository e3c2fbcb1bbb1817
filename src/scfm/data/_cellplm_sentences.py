"""CellPLM per-call plans: which cells attend to each other, in which order, with which noise.

The reference (``CellPLM.pipeline``) label-encodes ``obs["batch"]`` (sorted labels), feeds one
sentence per label with its cells in AnnData order, and optionally splits a sentence into
consecutive chunks. scfm adds spatial tiles so that a large section is not one sentence.
These are pure numpy / torch functions; :meth:`scfm.model.CellPLM._cell_plan` builds the
per-cell arrays of a call with them and the data loader slices them into each minibatch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import torch

from scfm.data._genes import GeneAlignment
from scfm.data._loader import TableRows
from scfm.errors import InvalidInputError, SpatialCoordinateError

__all__ = [
    "batch_labels",
    "cellplm_coordinates",
    "cellplm_gene_rank",
    "cellplm_gumbel_noise",
    "cellplm_pack_sentences",
    "cellplm_sentence_ids",
    "label_codes",
    "spatial_tiles",
]

#: Target cells per spatial tile when no tile size is given.
DEFAULT_TILE_CELLS = 1000


def _dense_ids(*keys: np.ndarray) -> np.ndarray:
    """Number the distinct key tuples 0..k-1 in lexicographic order."""
    return np.unique(np.stack(keys, 1), axis=0, return_inverse=True)[1].reshape(-1)


def label_codes(labels: pd.Series | np.ndarray) -> np.ndarray:
    """Codes of the sorted labels, like sklearn's ``LabelEncoder`` (numbers sorted as numbers)."""
    column = pd.Series(np.asarray(labels)) if not isinstance(labels, pd.Series) else labels
    numeric = pd.api.types.is_numeric_dtype(column) and not isinstance(
        column.dtype, pd.CategoricalDtype
    )
    values = np.asarray(column if numeric else column.astype(str))
    return np.unique(values, return_inverse=True)[1].reshape(-1)


def batch_labels(adata: ad.AnnData, batch_key: str | None) -> np.ndarray:
    """Each cell's ``batch_key`` label (numbers stay numbers); no column: one group."""
    if batch_key is None or batch_key not in adata.obs.columns:
        return np.zeros(adata.n_obs, dtype=np.int64)
    column = adata.obs[batch_key]
    numeric = pd.api.types.is_numeric_dtype(column) and not isinstance(
        column.dtype, pd.CategoricalDtype
    )
    return column.to_numpy() if numeric else column.astype(str).to_numpy()


def cellplm_coordinates(adata: ad.AnnData, spatial_key: str | None) -> np.ndarray:
    """``(n_obs, 2)`` float64 coordinates of ``adata.obsm[spatial_key]``.

    Raises
    ------
    InvalidInputError
        If no ``spatial_key`` was set up.
    SpatialCoordinateError
        If ``adata`` lacks the coordinates.
    """
    if spatial_key is None:
        raise InvalidInputError(
            "This needs coordinates: call CellPLM.setup_anndata(adata, spatial_key=...)."
        )
    if spatial_key not in adata.obsm:
        raise SpatialCoordinateError(
            f"This needs the cells' coordinates, and adata.obsm has no {spatial_key!r} (the "
            f"spatial_key). Add them as adata.obsm[{spatial_key!r}] (n_cells x 2)."
        )
    return np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2]


def spatial_tiles(
    coords: np.ndarray, groups: np.ndarray, tile_size: float | None = None
) -> np.ndarray:
    """Square tile of each cell within its group (row-major tile number).

    Parameters
    ----------
    coords
        ``(n_cells, >=2)`` coordinates.
    groups
        ``(n_cells,)`` integer group of each cell (tiles never span groups).
    tile_size
        Tile side in coordinate units; ``None`` picks, per group, the side for which a tile
        holds ~1000 cells on average.

    Returns
    -------
    ``(n_cells,)`` int64 tile number (unique within a group).
    """
    xy_all = np.asarray(coords, dtype=np.float64)[:, :2]
    tiles = np.zeros(len(xy_all), dtype=np.int64)
    for g in np.unique(groups):
        sel = groups == g
        xy = xy_all[sel]
        lo, span = xy.min(0), np.ptp(xy, axis=0)
        side = tile_size
        if side is None:
            area = max(float(np.prod(np.maximum(span, 1e-12))), 1e-12)
            side = float(np.sqrt(area * DEFAULT_TILE_CELLS / sel.sum()))
        if side <= 0:
            raise InvalidInputError(f"tile_size must be > 0, got {side}.")
        ij = np.floor((xy - lo) / side).astype(np.int64)
        tiles[sel] = ij[:, 0] * (int(ij[:, 1].max()) + 1) + ij[:, 1]
    return tiles


def cellplm_sentence_ids(
    groups: np.ndarray, tiles: np.ndarray | None = None, chunk_size: int | None = None
) -> np.ndarray:
    """Sentence of each cell, numbered in the reference's feeding order.

    Parameters
    ----------
    groups
        ``(n_cells,)`` label code of each cell (:func:`label_codes` of ``obs["batch"]``); cells
        are given in AnnData order.
    tiles
        Optional spatial tile of each cell (:func:`spatial_tiles`): sentences are split by tile.
    chunk_size
        Split each sentence into consecutive chunks of this many cells (AnnData order), like
        the reference's ``inference_config={"batch_size": k}``.

    Returns
    -------
    ``(n_cells,)`` int64 sentence ids ``0..S-1``, sorted by (label, tile, chunk).
    """
    keys = [np.asarray(groups)]
    if tiles is not None:
        keys.append(np.asarray(tiles))
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise InvalidInputError(f"chunk_size must be >= 1, got {chunk_size}.")
        base = _dense_ids(*keys)
        order = np.argsort(base, kind="stable")
        counts = np.bincount(base)
        rank = np.empty(len(base), dtype=np.int64)
        rank[order] = np.arange(len(base)) - np.repeat(np.cumsum(counts) - counts, counts)
        keys.append(rank // int(chunk_size))
    return _dense_ids(*keys)


def cellplm_pack_sentences(sentence: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Group whole sentences (in id order) into minibatches of at most ``batch_size`` cells.

    A sentence larger than ``batch_size`` gets a minibatch of its own. Returns positions into
    ``sentence``, sorted within each minibatch.
    """
    n_sent = int(sentence.max()) + 1 if len(sentence) else 0
    sizes = np.bincount(sentence, minlength=n_sent)
    order = np.argsort(sentence, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    cuts, start = [], 0
    for s in range(n_sent):
        if bounds[s + 1] - bounds[start] > batch_size and s > start:
            cuts.append((start, s))
            start = s
    if n_sent:
        cuts.append((start, n_sent))
    return [np.sort(order[bounds[a] : bounds[b]]) for a, b in cuts]


def cellplm_gumbel_noise(
    sentence: np.ndarray,
    n_clusters: int,
    latent_dim: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Gumbel noise of each cell's GMVAE cluster choice, drawn exactly as the reference does.

    After ``torch.manual_seed(s)`` the reference's DataLoader draws one int64; then every
    forward (one per sentence, in feeding order) draws ``rand(n, n_clusters)`` for the Gumbel
    noise and ``randn(n, latent_dim)`` (unused).

    Parameters
    ----------
    sentence
        Sentence ids in feeding order (:func:`cellplm_sentence_ids`).
    n_clusters, latent_dim
        ``num_clusters`` and ``post_latent_dim`` of the model.
    generator
        Random generator; ``None`` uses torch's global RNG.

    Returns
    -------
    ``[n_cells, n_clusters]`` float32 noise.
    """
    from scfm.nn._gmvae import gumbel_noise

    gen = torch.default_generator if generator is None else generator
    torch.empty((), dtype=torch.int64).random_(generator=gen)
    noise = torch.zeros(len(sentence), n_clusters)
    n_sent = int(sentence.max()) + 1 if len(sentence) else 0
    for s in range(n_sent):
        idx = torch.as_tensor(np.flatnonzero(sentence == s))
        noise[idx] = gumbel_noise(torch.rand(len(idx), n_clusters, generator=gen))
        torch.randn(len(idx), latent_dim, generator=gen)
    return noise


def cellplm_gene_rank(
    alignment: GeneAlignment,
    var_names: Sequence[str],
    vocabulary: Sequence[str],
    labels: np.ndarray,
    cells: np.ndarray,
    measured_genes: Mapping[str, Sequence[str]] | None = None,
) -> TableRows:
    """Per cell and model gene: 1 + its AnnData column (negative: unmeasured; 0: absent).

    The model's gene space loses the AnnData's column order, yet the reference sums a cell's
    gene embeddings in that order (and GroupNorm makes the order visible at 1e-4); the rank
    also tells which genes were measured (positive: rescaling, loss).

    Parameters
    ----------
    alignment
        The gene alignment: AnnData column ``var_index[k]`` feeds model gene ``vocab_index[k]``.
    var_names, vocabulary
        The AnnData's gene names and the model's gene ids.
    labels
        ``batch_key`` label of every AnnData cell.
    cells
        AnnData rows of the call.
    measured_genes
        ``{label: genes measured there}`` (AnnData names or vocabulary ids); cells of other
        labels measured every AnnData gene. ``None``: every cell did.

    Returns
    -------
    ``(len(cells), len(vocabulary))`` int32 rows as a :class:`~scfm.data._loader.TableRows`:
    one row per label whose genes differ (one row in all when every cell measured every
    gene), so neither the plan nor a minibatch holds a row per cell.
    """
    var_index, vocab_index = alignment.var_index, alignment.vocab_index
    n_vars, n_vocab = len(var_names), len(vocabulary)
    rank = np.full(n_vocab, n_vars + 1, dtype=np.int32)
    np.minimum.at(rank, np.asarray(vocab_index), np.asarray(var_index, dtype=np.int32) + 1)
    rank[rank > n_vars] = 0
    if not measured_genes:
        return TableRows(rank[None], np.zeros(len(cells), dtype=np.int64))
    labels = np.asarray(labels).astype(str)
    unknown = sorted(set(map(str, measured_genes)) - set(labels))
    if unknown:
        raise InvalidInputError(
            f"measured_genes has keys that are no batch_key label: {', '.join(unknown[:5])}. "
            "Its keys are labels of the batch_key column of setup_anndata."
        )
    pair_var = np.asarray(var_names, dtype=str)[var_index]
    pair_vocab = np.asarray(vocabulary, dtype=str)[vocab_index]
    table, group = [rank], np.zeros(len(cells), dtype=np.int64)
    for i, (label, genes) in enumerate(measured_genes.items(), start=1):
        names = np.asarray(list(map(str, genes)))
        keep = np.zeros(n_vocab, dtype=bool)
        keep[np.asarray(vocab_index)[np.isin(pair_var, names) | np.isin(pair_vocab, names)]] = True
        table.append(np.where(keep, rank, -rank))  # unmeasured: negative, order kept
        group[labels[cells] == str(label)] = i
    return TableRows(np.stack(table), group)
