"""Geneformer rank-value encoding as vectorised torch functions, plus its dictionaries.

The reference ``TranscriptomeTokenizer`` (ctheodoris/Geneformer @ 05fcbeb) turns a cell of raw
counts into the list of its expressed genes ordered by normalised expression:

1. genes whose (upper-cased) id the Ensembl mapping dictionary sends onto the same token are
   collapsed (their counts summed); genes outside the token dictionary are dropped;
2. ``x = counts / n_counts * 10_000 / gene_median`` (``n_counts`` = total counts of the cell);
3. the non-zero genes are sorted by decreasing ``x``;
4. truncated to the model input size; V2 adds ``<cls>`` in front and ``<eos>`` at the end
   (truncating to ``input_size - 2`` genes first).

:func:`rank_value_encode` does steps 2-4 for a whole minibatch at once on tensors, per cell
(a cell's encoding never depends on its batch-mates). scfm's model does step 1 once per
AnnData (:func:`geneformer_ensembl_ids`, :func:`geneformer_gene_tokens`): the data loader sums
the counts of the columns that feed one token and hands the module counts in token space
(column ``j`` = token ``j``). ``n_counts`` is then the total over vocabulary genes; it only
rescales a cell, so the ranking is the reference's. The dictionaries are read and validated by
:func:`load_geneformer_dictionaries`.
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

from scfm.errors import CheckpointFormatError, CheckpointNotFoundError, InvalidInputError

logger = logging.getLogger(__name__)

__all__ = [
    "BIONEMO_SPECIAL_TOKENS",
    "GeneformerDictionaries",
    "bionemo_tokens",
    "geneformer_ensembl_ids",
    "geneformer_gene_tokens",
    "load_geneformer_dictionaries",
    "normalize_ensembl_ids",
    "rank_value_encode",
]

#: Library size every cell is scaled to before dividing by the gene medians.
TARGET_SUM = 10_000.0
#: Special token names of the Geneformer dictionaries.
PAD_TOKEN, MASK_TOKEN, CLS_TOKEN, EOS_TOKEN = "<pad>", "<mask>", "<cls>", "<eos>"
#: Model input sizes of the releases.
V1_INPUT_SIZE, V2_INPUT_SIZE = 2048, 4096
#: Ensembl gene ids (any vertebrate; Geneformer V1 also has ``ENSGR`` PAR-Y ids), upper case.
_ENSEMBL_ID = r"^ENS[A-Z]*G[R]?\d{6,}(_PAR_Y)?$"
_ENSEMBL_ID_VERSION = r"^ENS[A-Z]*G[R]?\d{6,}(\.\d+)?(_PAR_Y)?$"


def rank_value_encode(
    counts: torch.Tensor,
    gene_token_ids: torch.Tensor | None,
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
        Raw counts ``[B, G]`` (any float or int dtype).
    gene_token_ids
        ``[G]`` token id of each column; ``-1`` for columns outside the vocabulary (dropped).
        Several columns may share a token id: their counts are summed first (the
        reference's ``collapse_gene_ids``). ``None``: the columns ARE the token ids
        (``counts`` in the model's token space, column ``j`` = token ``j``); then a column
        is a gene where its median is finite and positive (special tokens have none).
    gene_medians
        ``[G]`` non-zero median of each column's token (ignored where it is no gene).
    max_length
        Model input size, special tokens included (V1: 2048, V2: 4096).
    cls_token_id, eos_token_id
        If given, ``<cls>`` is prepended / ``<eos>`` appended and the genes are truncated to
        ``max_length`` minus the number of special tokens (V2).
    pad_token_id
        Fills positions beyond each cell's length.
    n_counts
        ``[B]`` total counts per cell; default ``counts.sum(1)`` over all ``G`` columns. It
        only rescales a cell, so it never changes the ranking (kept for exactness of the
        values).
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
    Each cell is encoded on its own: its genes, order and truncation never depend on the
    other cells of the minibatch. Genes are ordered by a stable descending sort (ties in
    column order); the reference uses numpy's unstable quicksort, so cells with exactly tied
    normalised values may order ties differently.
    """
    if counts.ndim != 2:
        raise InvalidInputError(f"counts must be 2-d [cells, genes], got shape {counts.shape}.")
    if gene_medians.shape != (counts.shape[1],) or (
        gene_token_ids is not None and gene_token_ids.shape != (counts.shape[1],)
    ):
        raise InvalidInputError(
            "gene_token_ids and gene_medians need one entry per column of counts "
            f"({counts.shape[1]}), got "
            f"{None if gene_token_ids is None else tuple(gene_token_ids.shape)} and "
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
    gene_medians = gene_medians.to(device=device, dtype=torch.float64)
    if gene_token_ids is None:
        # Token space: nothing to collapse; special-token columns have no median.
        known = torch.isfinite(gene_medians) & (gene_medians > 0)
        tokens = torch.arange(x.shape[1], device=device)
        summed = torch.where(known[None, :], x, torch.zeros_like(x))
        medians = torch.where(known, gene_medians, torch.ones_like(gene_medians))
    else:
        known = gene_token_ids >= 0
        tokens, inverse = torch.unique(gene_token_ids[known], return_inverse=True)
        tokens = tokens.to(device)
        # Collapse genes that share a token (alias ids): sum their counts.
        summed = torch.zeros(x.shape[0], len(tokens), dtype=torch.float64, device=device)
        summed.index_add_(1, inverse.to(device), x[:, known.to(device)])
        medians = torch.zeros(len(tokens), dtype=torch.float64, device=device)
        medians.scatter_(0, inverse.to(device), gene_medians[known.to(device)])
    # Same operation order as the reference: X / n_counts * target_sum / median.
    n_counts = n_counts.to(device=device, dtype=torch.float64)
    scale = torch.where(n_counts > 0, n_counts, torch.ones_like(n_counts))
    norm = summed / scale[:, None] * target_sum / medians[None, :]
    expressed = summed > 0
    norm = torch.where(expressed, norm, torch.full_like(norm, -torch.inf))
    # Per-cell truncation: each cell keeps its own top ``n_genes_max`` genes.
    n_genes = expressed.sum(1).clamp(max=n_genes_max)
    width = int(n_genes.max()) if len(n_genes) else 0
    if width > 0:
        order = torch.sort(norm, dim=1, descending=True, stable=True).indices[:, :width]
        genes = tokens[order]
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
        """Token names ordered by token id (position = id).

        Ids that no entry uses (none in the releases) are named ``<unused{id}>``.
        """
        n = max(self.token_dictionary.values()) + 1
        names = [f"<unused{i}>" for i in range(n)]
        for k, v in self.token_dictionary.items():
            names[int(v)] = str(k)
        return names

    def token_medians(self) -> np.ndarray:
        """float64 median of each token id (position = id); 0 for tokens that are no gene.

        A token counts as a gene only if it has a median (as the reference tokenizer, which
        keeps genes present in both the token and the median dictionary).
        """
        out = np.zeros(max(self.token_dictionary.values()) + 1, dtype=np.float64)
        for gene, idx in self.token_dictionary.items():
            median = self.gene_median_dictionary.get(gene)
            if median is not None and not gene.startswith(("<", "[")):
                out[int(idx)] = median
        return out

    def validate(self, what: str = "Geneformer dictionaries") -> GeneformerDictionaries:
        """Check the dictionaries; return ``self``.

        Raises
        ------
        CheckpointFormatError
            If token ids are negative or shared by two entries, if ``<pad>`` / ``<mask>``
            (or BioNeMo's ``[PAD]`` / ``[MASK]``) are missing, or if a median is not a
            finite positive number; the message names the offending entries.
        """
        tokens = self.token_dictionary
        if not tokens:
            raise CheckpointFormatError(f"The {what} token dictionary is empty.")
        if not any(s in tokens for s in (PAD_TOKEN, "[PAD]")) or not any(
            s in tokens for s in (MASK_TOKEN, "[MASK]")
        ):
            raise CheckpointFormatError(
                f"The {what} token dictionary has no <pad> / <mask> tokens: it is not a "
                "Geneformer token dictionary. Pass the token_dictionary*.pkl of the release."
            )
        negative = [k for k, v in tokens.items() if int(v) < 0]
        if negative:
            raise CheckpointFormatError(
                f"The {what} token dictionary has negative token ids "
                f"(e.g. {', '.join(negative[:3])})."
            )
        owners: dict[int, str] = {}
        for gene, idx in tokens.items():
            if int(idx) in owners:
                raise CheckpointFormatError(
                    f"The {what} token dictionary gives token id {int(idx)} to both "
                    f"{owners[int(idx)]!r} and {gene!r}; every token id must be unique. The "
                    "file is damaged or not a Geneformer token dictionary."
                )
            owners[int(idx)] = gene
        bad = [
            f"{gene}={value!r}"
            for gene, value in self.gene_median_dictionary.items()
            if not (np.isfinite(value) and value > 0)
        ]
        if bad:
            raise CheckpointFormatError(
                f"The {what} gene median dictionary has {len(bad)} medians that are not "
                f"finite positive numbers (e.g. {', '.join(bad[:3])}); Geneformer divides by "
                "them. Use the gene_median_dictionary*.pkl of the release."
            )
        if not (self.token_medians() > 0).any():
            raise CheckpointFormatError(
                f"No gene of the {what} token dictionary has a median: the token and median "
                "dictionaries belong to different releases."
            )
        return self

    def special_token_ids(self, variant: str) -> dict[str, int | None]:
        """``{pad,mask,cls,eos}_token_id`` of a variant's cell layout, from the token dictionary.

        V1: ``<pad>``, ``<mask>`` (no special token in a cell); V2: also ``<cls>`` / ``<eos>``;
        BioNeMo: ``[PAD]``, ``[MASK]``, ``[CLS]`` (no trailing ``[SEP]`` at inference).

        Raises
        ------
        InvalidInputError
            If the dictionary lacks a token the variant needs.
        """
        names = {
            "V1": (PAD_TOKEN, MASK_TOKEN, None, None),
            "V2": (PAD_TOKEN, MASK_TOKEN, CLS_TOKEN, EOS_TOKEN),
            "bionemo": ("[PAD]", "[MASK]", "[CLS]", None),
        }.get(variant)
        if names is None:
            raise InvalidInputError(
                f"variant={variant!r} is not supported; use 'V1', 'V2' or 'bionemo'."
            )
        missing = [n for n in names if n is not None and n not in self.token_dictionary]
        if missing:
            raise InvalidInputError(
                f"variant={variant!r} needs the tokens {', '.join(missing)} in the token "
                "dictionary; pass the dictionaries of that release (V2: gc104M) or another "
                "variant."
            )
        keys = ("pad_token_id", "mask_token_id", "cls_token_id", "eos_token_id")
        return {
            k: None if n is None else int(self.token_dictionary[n]) for k, n in zip(keys, names)
        }

    @classmethod
    def shipped(cls, variant: str = "V1") -> GeneformerDictionaries:
        """The dictionaries shipped with scfm for a variant (V1 gc30M; BioNeMo: V1 at id + 3).

        Raises
        ------
        InvalidInputError
            For V2: scfm ships its token dictionary but not its medians.
        """
        if variant == "V2":
            raise InvalidInputError(
                "A V2 Geneformer needs the V2 dictionaries (scfm ships only the V2 token "
                "dictionary, not its medians): pass dictionaries=scfm.data."
                "load_geneformer_dictionaries(<release dir>), or use Geneformer.from_pretrained."
            )
        v1 = load_geneformer_dictionaries(version="V1")
        return v1.bionemo() if variant == "bionemo" else v1

    def bionemo(self) -> GeneformerDictionaries:
        """The same genes in BioNeMo's ``GeneTokenizer`` layout (see :func:`bionemo_tokens`)."""
        return GeneformerDictionaries(
            token_dictionary=bionemo_tokens(self.token_dictionary),
            gene_median_dictionary=self.gene_median_dictionary,
            gene_name_id_dictionary=self.gene_name_id_dictionary,
            ensembl_mapping_dictionary=self.ensembl_mapping_dictionary,
        )


#: BioNeMo ``GeneTokenizer`` special tokens (ids 0..4); genes follow at V1 id + 3.
BIONEMO_SPECIAL_TOKENS = ("[CLS]", "[MASK]", "[PAD]", "[SEP]", "[UKW]")


def bionemo_tokens(v1_token_dictionary: Mapping[str, int]) -> dict[str, int]:
    """BioNeMo ``GeneTokenizer`` vocabulary: 5 special tokens, then the V1 genes at V1 id + 3.

    The V1 gene ids start at 2 (after ``<pad>``, ``<mask>``); BioNeMo lists the same genes in
    the same order after its 5 special tokens, so ``bionemo_id = v1_id + 3``. UNVERIFIED
    against the vocabulary file inside the 240530 checkpoints (constructed as the spec says).
    """
    out = {name: i for i, name in enumerate(BIONEMO_SPECIAL_TOKENS)}
    offset = len(BIONEMO_SPECIAL_TOKENS) - 2
    for gene, idx in v1_token_dictionary.items():
        if not gene.startswith(("<", "[")):
            out[gene] = int(idx) + offset
    return out


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
    try:
        dicts = GeneformerDictionaries(
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
    except (TypeError, ValueError, OverflowError) as err:
        raise CheckpointFormatError(
            f"A Geneformer dictionary holds values of the wrong type ({err}): token ids must "
            "be integers and medians numbers. Pass the .pkl files of the release."
        ) from None
    where = f" in {str(directory)!r}" if directory is not None else ""
    return dicts.validate(f"Geneformer dictionaries{where}")


def normalize_ensembl_ids(ids: Sequence[str] | pd.Index) -> pd.Index:
    """Upper-case and version-free Ensembl ids (``ensg00000141510.17`` -> ``ENSG00000141510``).

    The reference upper-cases every id before its mapping dictionary lookup; other ids
    (symbols) are returned unchanged.
    """
    from scfm.data._genes import strip_version

    idx = pd.Index([str(x) for x in ids], dtype=object)
    upper = idx.str.upper()
    looks = upper.str.match(_ENSEMBL_ID_VERSION)
    return pd.Index(np.where(looks, strip_version(upper), idx), dtype=object)


def geneformer_ensembl_ids(
    ids: Sequence[str] | pd.Index, name_dictionary: Mapping[str, str]
) -> tuple[pd.Index, int, int]:
    """Ensembl ids for Geneformer's dictionaries, decided id by id.

    Ensembl ids are kept whatever their case or version suffix (:func:`normalize_ensembl_ids`),
    so a mostly-Ensembl list with a few symbols keeps every Ensembl id; each other id is
    looked up in Geneformer's symbol -> Ensembl ``name_dictionary``, then in GENCODE v48.

    Returns
    -------
    ids
        One id per input (``""`` where a symbol maps to nothing).
    n_symbols
        Inputs that were no Ensembl id.
    n_mapped
        Of those, how many were mapped.
    """
    from scfm.data._genes import map_gene_ids

    out = np.asarray(normalize_ensembl_ids(ids), dtype=object)
    symbols = ~np.asarray(pd.Index(out).str.match(_ENSEMBL_ID), dtype=bool)
    if not symbols.any():
        return pd.Index(out, dtype=object), 0, 0
    asked = pd.Index(out[symbols])
    named = np.asarray(asked.map(lambda s: name_dictionary.get(s, np.nan)), dtype=object)
    fallback = map_gene_ids(asked, to="ensembl").to_numpy()
    converted = np.where(pd.isna(named), fallback, named)
    out[symbols] = ["" if pd.isna(v) else str(v) for v in converted]
    return pd.Index(out, dtype=object), int(symbols.sum()), int(pd.notna(converted).sum())


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
        Ensembl ids of the AnnData's genes (``adata.var`` order); case and version suffixes
        are ignored (:func:`normalize_ensembl_ids`).
    dictionaries
        The Geneformer dictionaries.
    collapse_gene_ids
        Map each id through the Ensembl mapping dictionary (ids it does not list are dropped,
        as in the reference); several genes may then share a token, and their counts are
        summed. ``False`` matches ids directly and refuses two genes on one token.

    Returns
    -------
    token_ids
        int64 ``[G]``, ``-1`` where the gene is not in the vocabulary.
    medians
        float64 ``[G]``, ``nan`` where the gene is not in the vocabulary.

    Raises
    ------
    InvalidInputError
        With ``collapse_gene_ids=False``, if two genes map onto the same token.
    """
    ids = normalize_ensembl_ids(gene_ids)
    mapping: Mapping[str, str] | None = dictionaries.ensembl_mapping_dictionary
    if collapse_gene_ids and mapping is not None:
        mapped = pd.Index([mapping.get(g, "") for g in ids], dtype=object)
    else:
        mapped = ids
    token = dictionaries.token_dictionary
    median = dictionaries.gene_median_dictionary
    token_ids = np.array(
        [token.get(g, -1) if g in median and not g.startswith(("<", "[")) else -1 for g in mapped],
        dtype=np.int64,
    )
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
