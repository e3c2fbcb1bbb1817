"""Geneformer rank-value encoding as vectorised torch functions, plus its dictionaries.

The reference ``TranscriptomeTokenizer`` (ctheodoris/Geneformer @ 05fcbeb) turns a cell of raw
counts into the list of its expressed genes ordered by normalised expression:

1. genes whose (upper-cased) id the Ensembl mapping dictionary sends onto the same token are
   collapsed (their counts summed); genes outside the token dictionary are dropped;
2. ``x = counts / n_counts * 10_000 / gene_median`` (``n_counts`` = total counts of the cell);
3. the non-zero genes are sorted by decreasing ``x``;
4. truncated to the model input size; V2 adds ``<cls>`` in front and ``<eos>`` at the end
   (truncating to ``input_size - 2`` genes first).

:func:`rank_value_encode` does this for a whole minibatch at once on tensors; the
dictionaries are read by :func:`load_geneformer_dictionaries` and mapped onto an AnnData's
genes by :func:`geneformer_gene_tokens`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from scfm.errors import CheckpointNotFoundError, InvalidInputError

logger = logging.getLogger(__name__)

__all__ = [
    "GeneformerDictionaries",
    "geneformer_gene_tokens",
    "load_geneformer_dictionaries",
    "rank_value_encode",
]

#: Library size every cell is scaled to before dividing by the gene medians.
TARGET_SUM = 10_000.0
#: Special token names of the Geneformer dictionaries.
PAD_TOKEN, MASK_TOKEN, CLS_TOKEN, EOS_TOKEN = "<pad>", "<mask>", "<cls>", "<eos>"
#: Model input sizes of the releases.
V1_INPUT_SIZE, V2_INPUT_SIZE = 2048, 4096


def rank_value_encode(
    counts: torch.Tensor,
    gene_token_ids: torch.Tensor,
    gene_medians: torch.Tensor,
    *,
    max_length: int,
    cls_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    n_counts: torch.Tensor | None = None,
    target_sum: float = TARGET_SUM,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-value encode a minibatch of raw counts (Geneformer's tokenizer).

    Parameters
    ----------
    counts
        Raw counts ``[B, G]`` (any float or int dtype), genes in the order of
        ``gene_token_ids``.
    gene_token_ids
        ``[G]`` token id of each gene; ``-1`` for genes outside the vocabulary (dropped).
        Several genes may share a token id: their counts are summed first (the reference's
        ``collapse_gene_ids``).
    gene_medians
        ``[G]`` non-zero median of each gene's token (ignored where the token id is -1).
    max_length
        Model input size, special tokens included (V1: 2048, V2: 4096).
    cls_token_id, eos_token_id
        If given, ``<cls>`` is prepended / ``<eos>`` appended and the genes are truncated to
        ``max_length`` minus the number of special tokens (V2).
    pad_token_id
        Fills positions beyond each cell's length.
    n_counts
        ``[B]`` total counts per cell; default ``counts.sum(1)`` over all ``G`` genes. It only
        rescales a cell, so it never changes the ranking (kept for exactness of the values).
    target_sum
        Library size the cells are normalised to (10,000 in the reference).

    Returns
    -------
    input_ids
        ``[B, L]`` int64 token ids, ``L`` = the longest cell, padded with ``pad_token_id``.
    lengths
        ``[B]`` int64 number of tokens per cell (special tokens included). A cell without
        any expressed vocabulary gene has length 0 (or only its special tokens).

    Notes
    -----
    Genes are ordered by a stable descending sort; the reference uses numpy's unstable
    quicksort, so cells with exactly tied normalised values may order ties differently.
    """
    if counts.ndim != 2:
        raise InvalidInputError(f"counts must be 2-d [cells, genes], got shape {counts.shape}.")
    if gene_token_ids.shape != (counts.shape[1],) or gene_medians.shape != (counts.shape[1],):
        raise InvalidInputError(
            "gene_token_ids and gene_medians need one entry per column of counts "
            f"({counts.shape[1]}), got {tuple(gene_token_ids.shape)} and "
            f"{tuple(gene_medians.shape)}."
        )
    n_special = int(cls_token_id is not None) + int(eos_token_id is not None)
    n_genes_max = max_length - n_special
    if n_genes_max < 1:
        raise InvalidInputError(f"max_length={max_length} leaves no room for genes.")
    device = counts.device
    x = counts.to(torch.float64)
    if n_counts is None:
        n_counts = x.sum(1)
    known = gene_token_ids >= 0
    tokens, inverse = torch.unique(gene_token_ids[known], return_inverse=True)
    # Collapse genes that share a token (alias ids): sum their counts.
    summed = torch.zeros(x.shape[0], len(tokens), dtype=torch.float64, device=device)
    summed.index_add_(1, inverse, x[:, known])
    medians = torch.zeros(len(tokens), dtype=torch.float64, device=device)
    medians.scatter_(0, inverse, gene_medians[known].to(device=device, dtype=torch.float64))
    # Same operation order as the reference: X / n_counts * target_sum / median.
    n_counts = n_counts.to(device=device, dtype=torch.float64)
    scale = torch.where(n_counts > 0, n_counts, torch.ones_like(n_counts))
    norm = summed / scale[:, None] * target_sum / medians[None, :]
    expressed = summed > 0
    norm = torch.where(expressed, norm, torch.full_like(norm, -torch.inf))
    n_genes = expressed.sum(1).clamp(max=n_genes_max)
    width = int(n_genes.max()) if len(n_genes) else 0
    if width > 0:
        order = torch.sort(norm, dim=1, descending=True, stable=True).indices[:, :width]
        genes = tokens.to(device)[order]
    else:
        genes = torch.zeros(x.shape[0], 0, dtype=torch.long, device=device)
    real = torch.arange(width, device=device)[None, :] < n_genes[:, None]
    genes = torch.where(real, genes, torch.full_like(genes, pad_token_id))

    parts = []
    if cls_token_id is not None:
        parts.append(torch.full((x.shape[0], 1), cls_token_id, dtype=torch.long, device=device))
    parts.append(genes)
    if eos_token_id is not None:
        parts.append(torch.full((x.shape[0], 1), pad_token_id, dtype=torch.long, device=device))
    ids = torch.cat(parts, dim=1)
    lengths = n_genes + n_special
    if eos_token_id is not None:
        # <eos> goes right after the last gene of each cell, not at the end of the padding.
        ids.scatter_(1, (lengths - 1)[:, None], eos_token_id)
    return ids, lengths.to(torch.long)


@dataclass(frozen=True)
class GeneformerDictionaries:
    """The four Geneformer dictionaries.

    Attributes
    ----------
    token_dictionary
        Gene id (and special token name) -> token id.
    gene_median_dictionary
        Gene id -> non-zero median expression in the pretraining corpus.
    gene_name_id_dictionary
        Gene symbol -> Ensembl id (may be empty).
    ensembl_mapping_dictionary
        Upper-case Ensembl id (or alias) -> Ensembl id of the token dictionary; ``None`` when
        the release ships none (then ids map onto themselves).
    """

    token_dictionary: dict[str, int]
    gene_median_dictionary: dict[str, float]
    gene_name_id_dictionary: dict[str, str]
    ensembl_mapping_dictionary: dict[str, str] | None

    @property
    def has_special_tokens(self) -> bool:
        """Whether the vocabulary has ``<cls>`` and ``<eos>`` (V2 style)."""
        return CLS_TOKEN in self.token_dictionary and EOS_TOKEN in self.token_dictionary

    def token_id(self, name: str) -> int | None:
        """Id of a special token, ``None`` if absent."""
        value = self.token_dictionary.get(name)
        return None if value is None else int(value)

    def vocab_names(self) -> list[str]:
        """Token names ordered by token id (position = id)."""
        n = max(self.token_dictionary.values()) + 1
        names = [""] * n
        for k, v in self.token_dictionary.items():
            names[int(v)] = str(k)
        return names


_RESOURCE_FILES = {
    "V1": {
        "token_dictionary": "token_dictionary_gc30M.pkl",
        "gene_median_dictionary": "gene_median_dictionary_gc30M.pkl",
        "gene_name_id_dictionary": "gene_name_id_dict_gc30M.pkl",
    },
    "V2": {"token_dictionary": "token_dictionary_gc104M.pkl"},
}
# Globs for finding each dictionary inside a release directory (first match wins).
_DIR_PATTERNS = {
    "token_dictionary": ("token_dictionary*.pkl",),
    "gene_median_dictionary": ("gene_median_dictionary*.pkl",),
    "gene_name_id_dictionary": ("gene_name_id_dict*.pkl",),
    "ensembl_mapping_dictionary": ("ensembl_mapping_dict*.pkl",),
}


def _find_in_dir(directory: Path, key: str, release: str | None = None) -> Path | None:
    """First dictionary file for ``key``; files of the same ``release`` (e.g. gc104M) first."""
    for pattern in _DIR_PATTERNS[key]:
        hits = sorted(directory.glob(pattern)) + sorted(directory.glob(f"*/{pattern}"))
        if release is not None:
            hits.sort(key=lambda p: not p.stem.endswith(release))
        if hits:
            return hits[0]
    return None


def _load_resource(name: str) -> dict:
    from scfm.io._common import _RestrictedUnpickler

    ref = resources.files("scfm.data") / "resources" / "geneformer" / name
    with ref.open("rb") as fh:
        return _RestrictedUnpickler(fh).load()


def load_geneformer_dictionaries(
    directory: str | os.PathLike | None = None,
    *,
    version: str | None = None,
    token_dictionary_file: str | os.PathLike | None = None,
    gene_median_file: str | os.PathLike | None = None,
    gene_name_id_file: str | os.PathLike | None = None,
    gene_mapping_file: str | os.PathLike | None = None,
    vocab_size: int | None = None,
) -> GeneformerDictionaries:
    """Read Geneformer's dictionaries from files, a release directory or the shipped defaults.

    Precedence per dictionary: the explicit ``*_file`` argument, then a matching ``*.pkl`` in
    ``directory`` (e.g. ``token_dictionary_gc104M.pkl``), then the copy shipped with scfm for
    ``version``. scfm ships the real V1 (gc30M) token, median and name dictionaries and the V2
    (gc104M) token dictionary; the V2 median dictionary must come from the release.

    Parameters
    ----------
    directory
        A Geneformer release / package directory to search.
    version
        ``"V1"`` or ``"V2"``: which shipped dictionaries fill the gaps; ``None`` uses none.
    token_dictionary_file, gene_median_file, gene_name_id_file, gene_mapping_file
        Explicit paths of the pickled dictionaries.
    vocab_size
        If ``directory`` holds several token dictionaries (e.g. gc30M and gc104M), take the
        one with this many entries, and the other dictionaries of the same release.

    Raises
    ------
    CheckpointNotFoundError
        If the token or median dictionary cannot be found.
    """
    from scfm.io._common import load_pickle_dict

    explicit = {
        "token_dictionary": token_dictionary_file,
        "gene_median_dictionary": gene_median_file,
        "gene_name_id_dictionary": gene_name_id_file,
        "ensembl_mapping_dictionary": gene_mapping_file,
    }
    if version is not None and version not in _RESOURCE_FILES:
        raise InvalidInputError(f"version={version!r} is not supported; use 'V1' or 'V2'.")
    loaded: dict[str, dict | None] = {}
    release = None
    if directory is not None and token_dictionary_file is None and vocab_size is not None:
        for pattern in _DIR_PATTERNS["token_dictionary"]:
            for candidate in sorted(Path(directory).glob(pattern)):
                if len(load_pickle_dict(candidate)) == vocab_size:
                    explicit["token_dictionary"] = candidate
                    release = candidate.stem.rsplit("_", 1)[-1]
                    break
    for key, path in explicit.items():
        if path is None and directory is not None:
            path = _find_in_dir(Path(directory), key, release)
        if path is not None:
            loaded[key] = load_pickle_dict(path, what=f"Geneformer {key.replace('_', ' ')}")
        elif version is not None and key in _RESOURCE_FILES[version]:
            loaded[key] = _load_resource(_RESOURCE_FILES[version][key])
        else:
            loaded[key] = None
    for key, arg in (
        ("token_dictionary", "token_dictionary_file"),
        ("gene_median_dictionary", "gene_median_file"),
    ):
        if loaded[key] is None:
            raise CheckpointNotFoundError(
                f"No Geneformer {key.replace('_', ' ')} found"
                + (f" in {str(directory)!r}" if directory is not None else "")
                + f". Pass {arg}='<path to the release's .pkl>'"
                + (" (scfm ships only the V1 medians)." if version == "V2" else ".")
            )
    return GeneformerDictionaries(
        token_dictionary={str(k): int(v) for k, v in loaded["token_dictionary"].items()},
        gene_median_dictionary={
            str(k): float(v) for k, v in loaded["gene_median_dictionary"].items()
        },
        gene_name_id_dictionary={
            str(k): str(v) for k, v in (loaded["gene_name_id_dictionary"] or {}).items()
        },
        ensembl_mapping_dictionary=(
            None
            if loaded["ensembl_mapping_dictionary"] is None
            else {str(k): str(v) for k, v in loaded["ensembl_mapping_dictionary"].items()}
        ),
    )


def geneformer_gene_tokens(
    gene_ids: Sequence[str] | pd.Index,
    dictionaries: GeneformerDictionaries,
    *,
    collapse_gene_ids: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Token id and median of each gene of an AnnData, as the reference tokenizer maps them.

    Parameters
    ----------
    gene_ids
        Ensembl ids of the AnnData's genes (``adata.var`` order); version suffixes are removed.
    dictionaries
        The Geneformer dictionaries.
    collapse_gene_ids
        Map each upper-cased id through the Ensembl mapping dictionary (ids it does not list
        are dropped, as in the reference); several genes may then share a token, and
        :func:`rank_value_encode` sums their counts. ``False`` matches ids directly.

    Returns
    -------
    token_ids
        int64 ``[G]``, ``-1`` where the gene is not in the vocabulary.
    medians
        float64 ``[G]``, ``nan`` where the gene is not in the vocabulary.
    """
    from scfm.data._genes import strip_version

    ids = pd.Index(strip_version(gene_ids))
    mapping: Mapping[str, str] | None = dictionaries.ensembl_mapping_dictionary
    if collapse_gene_ids and mapping is not None:
        mapped = pd.Index(ids.str.upper()).map(lambda g: mapping.get(g, ""))
    else:
        mapped = ids
    token = dictionaries.token_dictionary
    median = dictionaries.gene_median_dictionary
    token_ids = np.array([token.get(g, -1) if g in median else -1 for g in mapped], dtype=np.int64)
    medians = np.array([median.get(g, np.nan) for g in mapped], dtype=np.float64)
    medians[token_ids < 0] = np.nan
    if not collapse_gene_ids:
        valid = token_ids[token_ids >= 0]
        if len(np.unique(valid)) < len(valid):
            raise InvalidInputError(
                "Several genes map to the same Geneformer token; pass collapse_gene_ids=True "
                "to sum their counts, or remove the duplicated ids from adata.var."
            )
    return token_ids, medians
