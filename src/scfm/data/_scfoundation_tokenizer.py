"""scFoundation input preparation as vectorised torch functions (counts in, tokens out).

Mirrors the reference ``get_embedding.py`` / ``load.py`` of biomap-research/scFoundation:
gene alignment to the 19,264-gene list, per-cell normalisation, the two depth tokens
``T`` (target) and ``S`` (source) appended after the genes, and the selection of the
non-zero positions that enter the encoder.
"""

from __future__ import annotations

import re
from typing import Literal

import torch

from scfm.errors import InvalidInputError

__all__ = [
    "INPUT_KINDS",
    "parse_tgthighres",
    "scfoundation_align_counts",
    "scfoundation_gather",
    "scfoundation_preprocess",
]

PreNormalized = Literal["F", "T", "A"]
#: The input kinds of ``pre_normalized``, in the order of their per-cell index.
INPUT_KINDS: tuple[str, ...] = ("F", "T", "A")

#: Target library size of the per-cell normalisation (reference: ``/ sum * 1e4``).
NORMALIZE_TARGET = 1e4
#: Value that marks a padding position (``pad_token_id`` of the released config).
PAD_VALUE = 103.0

_TGT_RE = re.compile(r"^([tfa])(\d+(?:\.\d*)?|\.\d+)$")


def parse_tgthighres(tgthighres: str) -> tuple[str, float]:
    """Split a ``tgthighres`` spec (``"t4"``, ``"f1"``, ``"a5"``, ``"t4.5"``) into kind and number.

    Raises
    ------
    InvalidInputError
        If the spec is not ``t``, ``f`` or ``a`` followed by a non-negative number.
    """
    match = _TGT_RE.match(str(tgthighres))
    if match is None:
        raise InvalidInputError(
            f"tgthighres={tgthighres!r} is not understood. Use 'tN' (target depth T = N on the "
            "log10 scale, e.g. 't4' = 10,000 reads), 'fN' (T = log10(N x total count), 'f1' "
            "keeps the observed depth) or 'aN' (T = S + N)."
        )
    return match.group(1), float(match.group(2))


def scfoundation_align_counts(
    counts: torch.Tensor,
    var_index: torch.Tensor,
    vocab_index: torch.Tensor,
    n_vocab: int,
) -> torch.Tensor:
    """Reorder counts into the vocabulary's gene order, zero-filling missing genes.

    What the model's data loader does for every minibatch (``main_gene_selection`` of the
    reference); columns mapped to one vocabulary gene are summed.

    Parameters
    ----------
    counts
        ``(n_cells, n_vars)`` expression in ``adata.var`` order.
    var_index, vocab_index
        Matched ``adata.var`` positions and their vocabulary indices
        (:class:`scfm.data.GeneAlignment`). Unmatched genes are dropped.
    n_vocab
        Number of vocabulary genes.

    Returns
    -------
    ``(n_cells, n_vocab)`` tensor of the same dtype as ``counts``.
    """
    out = counts.new_zeros(counts.shape[0], n_vocab)
    return out.index_add_(1, vocab_index.to(counts.device), counts[:, var_index.to(counts.device)])


def _input_kinds(
    spec: PreNormalized | torch.Tensor, n_cells: int, device: torch.device
) -> torch.Tensor:
    """Per-cell index into :data:`INPUT_KINDS` from one kind or a ``(n_cells,)`` tensor."""
    if isinstance(spec, torch.Tensor):
        kind = spec.reshape(-1).to(device=device, dtype=torch.long)
        if kind.numel() != n_cells or bool(((kind < 0) | (kind >= len(INPUT_KINDS))).any()):
            raise InvalidInputError(
                f"The input kind of every cell must be one of 0..{len(INPUT_KINDS) - 1} "
                f"({', '.join(INPUT_KINDS)}), one per cell."
            )
        return kind
    if spec not in INPUT_KINDS:
        raise InvalidInputError(
            f"pre_normalized={spec!r} is not supported; use 'F' (raw counts), "
            "'T' (log-normalised values) or 'A' (log-normalised values + total count column)."
        )
    return torch.full((n_cells,), INPUT_KINDS.index(spec), dtype=torch.long, device=device)


def scfoundation_preprocess(
    aligned: torch.Tensor,
    pre_normalized: PreNormalized | torch.Tensor = "F",
    tgthighres: str = "t4",
    total_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Model input ``[x, T, S]`` per cell, as the reference builds it for single cells.

    Computed in float64 like the reference (pandas) and returned as float32.

    Parameters
    ----------
    aligned
        ``(n_cells, n_genes)`` values in vocabulary order.
    pre_normalized
        ``"F"``: raw counts; ``x = log1p(c / sum(c) * 1e4)`` and the total count is
        ``sum(c)`` over vocabulary genes. ``"T"``: values already normalised + log1p, used as
        given, and the "total count" is their sum (the reference's behaviour).
        ``"A"``: values already normalised + log1p and the raw total count is given in
        ``total_counts`` (the GEARS layout). A ``(n_cells,)`` tensor of indices into
        :data:`INPUT_KINDS` gives the kind per cell.
    tgthighres
        Target depth token ``T``: ``"tN"`` (T = N), ``"fN"`` (T = log10(N x total)),
        ``"aN"`` (T = S + N). The source token is always ``S = log10(total)``.
    total_counts
        ``(n_cells,)`` raw total counts, required for ``pre_normalized="A"``.

    Returns
    -------
    ``(n_cells, n_genes + 2)`` float32 tensor; the last two columns are ``T`` and ``S``.
    """
    kind_name, number = parse_tgthighres(tgthighres)
    x = aligned.to(torch.float64)
    kind = _input_kinds(pre_normalized, x.shape[0], x.device)
    total = x.sum(dim=1)
    given = kind == INPUT_KINDS.index("A")
    if bool(given.any()):
        if total_counts is None:
            raise InvalidInputError(
                "pre_normalized='A' needs the raw total count of every cell: pass "
                "total_counts_key='<adata.obs column>' to setup_anndata."
            )
        total = torch.where(
            given, total_counts.reshape(-1).to(device=x.device, dtype=torch.float64), total
        )
    counts = kind == INPUT_KINDS.index("F")
    if bool(counts.any()):
        normalised = torch.log1p(x / total[:, None] * NORMALIZE_TARGET)
        x = normalised if bool(counts.all()) else torch.where(counts[:, None], normalised, x)
    source = torch.log10(total)
    if kind_name == "t":
        target = torch.full_like(source, number)
    elif kind_name == "f":
        target = torch.log10(total * number)
    else:
        target = source + number
    return torch.cat([x, target[:, None], source[:, None]], dim=1).to(torch.float32)


def scfoundation_gather(
    values: torch.Tensor,
    keep: torch.Tensor | None = None,
    *,
    pad_value: float = PAD_VALUE,
    pad_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather the encoder tokens of each cell: the kept positions in ascending order.

    Rows are right-padded to the longest cell of the batch (not to a fixed length).

    Parameters
    ----------
    values
        ``(n_cells, n_positions)`` model input (:func:`scfoundation_preprocess`).
    keep
        Boolean mask of the positions entering the encoder; default ``values > 0`` (the
        reference's rule, which includes the ``T`` and ``S`` tokens when positive).
    pad_value
        Value written at padding positions (the ``pad_token_id`` value, 103).
    pad_id
        Position id written at padding positions; default ``n_positions`` (the extra row of
        the positional embedding).

    Returns
    -------
    values
        ``(n_cells, L)`` gathered values.
    position_ids
        ``(n_cells, L)`` int64 position (gene) ids.
    padding
        ``(n_cells, L)`` bool, ``True`` at padding.
    """
    if keep is None:
        keep = values > 0
    n, width = values.shape
    lengths = keep.sum(dim=1)
    max_len = int(lengths.max()) if n else 0
    positions = torch.arange(width, device=values.device)
    # kept positions sort first, each group in ascending position order
    sort_key = torch.where(keep, positions, positions + width)
    order = torch.argsort(sort_key, dim=1)[:, :max_len]
    padding = torch.arange(max_len, device=values.device)[None, :] >= lengths[:, None]
    gathered = torch.gather(values, 1, order).masked_fill(padding, pad_value)
    ids = order.masked_fill(padding, width if pad_id is None else pad_id)
    return gathered, ids, padding
