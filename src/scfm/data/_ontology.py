"""The Cell Ontology (CL) as a graph: readers, personalized PageRank similarity, ancestor masks.

scCello :cite:p:`Yuan2024` guides its pretraining with the CL graph. Two sources are read:

* the OWL (RDF/XML) file the reference ships (``data/cell_taxonomy/cl.owl``), parsed with the
  reference's rule: every triple whose subject and object both end in a ``CL_xxxxxxx`` /
  ``CL:xxxxxxx`` identifier becomes a child -> parent edge (self-loops dropped), which keeps
  ``rdfs:subClassOf`` and IRI-valued annotations such as "term replaced by";
* the CL release bundled with scfm (``resources/CL-ontology-v2026-03-26.json.gz``, from
  ``cellxgene-ontology-guide``, MIT; CL is CC BY 4.0), whose distance-1 ancestors give the
  parent edges and whose ``replaced_by`` links deprecated terms to their replacement (the
  JSON twin of the OWL "term replaced by" edge).

Node ids are the positions of the CL ids in sorted order (only ids that appear in an edge), as
in the reference.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from importlib import resources

import numpy as np
import scipy.sparse as sp

from scfm.errors import OntologyError

logger = logging.getLogger(__name__)

__all__ = [
    "CellOntology",
    "label_indices",
    "load_cell_ontology",
    "lookup_cell_type_ids",
    "personalized_pagerank",
    "ppr_to_levels",
    "read_cl_json",
    "read_cl_owl",
]

#: Restart probability complement of scCello's personalized PageRank (``networkx`` alpha).
PPR_ALPHA = 0.9
#: PPR values below this count as unrelated (level 1) in scCello's ``ctgraph_sim``.
PPR_THRESHOLD = 1e-4
#: ``networkx.pagerank`` defaults, kept because the thresholded levels depend on them.
PPR_MAX_ITER = 100
PPR_TOL = 1e-6

#: The CL release bundled with scfm.
BUNDLED_CL = "CL-ontology-v2026-03-26.json.gz"

_RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
_XML = "http://www.w3.org/XML/1998/namespace"
_RDFS_LABEL_TAG = "{http://www.w3.org/2000/01/rdf-schema#}label"


def _to_clid(term: str) -> str | None:
    """The reference's rule: last path segment, ``_`` -> ``:``, must start with ``CL:``."""
    if "CL" not in term:
        return None
    tail = term.split("/")[-1].replace("_", ":")
    return tail if tail.startswith("CL:") else None


@dataclass
class CellOntology:
    """A cell ontology graph with child -> parent edges between CL ids.

    Parameters
    ----------
    edges
        ``(child, parent)`` CL id pairs (duplicates allowed, self-loops are dropped).
    names
        CL id -> label (``rdfs:label`` / JSON ``label``), used to look up cell-type names.
    source
        Where the graph came from (for messages).
    """

    edges: list[tuple[str, str]]
    names: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        self.edges = [(c, p) for c, p in self.edges if c != p]
        if not self.edges:
            raise OntologyError(
                f"The cell ontology from {self.source or 'the given edges'} has no CL -> CL "
                "edge. Pass a Cell Ontology OWL (RDF/XML) or cellxgene-ontology-guide JSON file."
            )

    # ------------------------------------------------------------------ nodes
    @cached_property
    def ids(self) -> list[str]:
        """CL ids of the graph nodes, sorted; the position is the node id."""
        return sorted({x for edge in self.edges for x in edge})

    @cached_property
    def index(self) -> dict[str, int]:
        """CL id -> node id."""
        return {clid: i for i, clid in enumerate(self.ids)}

    @property
    def n_nodes(self) -> int:
        """Number of nodes."""
        return len(self.ids)

    def __contains__(self, clid: object) -> bool:
        return clid in self.index

    def __repr__(self) -> str:
        return (
            f"CellOntology({self.n_nodes} terms, {len(self.edges)} edges, source={self.source!r})"
        )

    def node_ids(self, clids: Iterable[str], *, missing: int | None = None) -> np.ndarray:
        """Node ids of ``clids``.

        Parameters
        ----------
        clids
            CL ids (``CL:0000236``; ``CL_0000236`` is accepted too).
        missing
            Value for ids not in the graph; ``None`` raises :class:`~scfm.errors.OntologyError`.
        """
        clids = [str(c).replace("_", ":") for c in clids]
        unknown = [c for c in clids if c not in self.index]
        if unknown and missing is None:
            raise OntologyError(
                f"{len(unknown)} cell-type ids are not in the cell ontology ({self.source}): "
                f"{', '.join(sorted(set(unknown))[:5])}. Use Cell Ontology ids as in CELLxGENE's "
                "obs['cell_type_ontology_term_id'] (e.g. CL:0000236), or drop those cells."
            )
        return np.array([self.index.get(c, missing) for c in clids], dtype=np.int64)

    def lookup(self, names: Iterable[str]) -> list[str | None]:
        """CL id of each name or id (labels matched case-insensitively); ``None`` if unknown."""
        by_name: dict[str, str] = {}
        for clid, name in self.names.items():
            by_name.setdefault(name.lower(), clid)
        out: list[str | None] = []
        for name in names:
            key = str(name).replace("_", ":")
            out.append(key if key in self.index else by_name.get(str(name).lower()))
        return out

    # ------------------------------------------------------------------ matrices
    def adjacency(self) -> sp.csr_matrix:
        """Symmetric 0/1 adjacency of the undirected graph (``networkx.Graph`` of the edges)."""
        idx = self.index
        rows = np.array([idx[c] for c, _ in self.edges] + [idx[p] for _, p in self.edges])
        cols = np.array([idx[p] for _, p in self.edges] + [idx[c] for c, _ in self.edges])
        n = self.n_nodes
        adj = sp.coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n)).tocsr()
        adj.data[:] = 1.0  # duplicated / reciprocal edges are one undirected edge
        return adj

    def ancestors(self, clid: str) -> set[str]:
        """All ancestors of ``clid`` (parents, their parents, ...), excluding itself."""
        return {self.ids[j] for j in self._ancestor_sets()[self.node_ids([clid])[0]]}

    def _ancestor_sets(self) -> list[set[int]]:
        parents: list[set[int]] = [set() for _ in range(self.n_nodes)]
        for c, p in self.edges:
            parents[self.index[c]].add(self.index[p])
        memo: list[set[int] | None] = [None] * self.n_nodes

        def visit(node: int) -> set[int]:
            # iterative DFS: the CL graph is deep enough to make recursion fragile
            stack, seen = [node], set()
            while stack:
                cur = stack.pop()
                for parent in parents[cur]:
                    if parent not in seen:
                        seen.add(parent)
                        stack.append(parent)
            return seen

        for i in range(self.n_nodes):
            memo[i] = visit(i)
        return memo  # type: ignore[return-value]

    def ancestor_mask(self, clids: Sequence[str]) -> np.ndarray:
        """The scCello ``cell_type_ancestor_mask`` for the cell types ``clids``.

        ``mask[i, j] = 1`` where type ``j`` is type ``i`` itself or one of its ancestors; rows
        and columns of ids that are not in the graph are 0.

        Returns
        -------
        int32 array ``[len(clids), len(clids)]``.
        """
        nodes = self.node_ids(clids, missing=-1)
        anc = self._ancestor_sets()
        n = len(nodes)
        mask = np.zeros((n, n), dtype=np.int32)
        for i, ni in enumerate(nodes):
            if ni < 0:
                continue
            for j, nj in enumerate(nodes):
                if nj >= 0 and (nj == ni or nj in anc[ni]):
                    mask[i, j] = 1
        return mask

    def sccello_buffers(self, clids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The scCello buffers ``(ctgraph_sim, cell_type_ancestor_mask)`` for ``clids``.

        Raises
        ------
        OntologyError
            If some id is not a node of the graph (pretraining labels must all be).
        """
        unknown = [c for c in clids if c not in self]
        if unknown:
            raise OntologyError(
                f"{len(unknown)} cell-type ids are not in the cell ontology ({self.source}): "
                f"{', '.join(unknown[:5])}. Labels must be Cell Ontology ids as in CELLxGENE's "
                "obs['cell_type_ontology_term_id'] (e.g. CL:0000236): fix or drop those "
                "cells, or pass ontology=<cl.owl or CL json>."
            )
        return self.similarity_levels(clids), self.ancestor_mask(clids)

    def ppr_similarity(
        self, clids: Sequence[str] | None = None, *, alpha: float = PPR_ALPHA
    ) -> np.ndarray:
        """Raw personalized-PageRank similarity (float64).

        Parameters
        ----------
        clids
            Restrict rows and columns to these cell types (in this order); ids not in the
            graph get 0. ``None`` returns the full ``[n_nodes, n_nodes]`` matrix (node order
            :attr:`ids`).
        alpha
            Damping factor (scCello: 0.9).

        Returns
        -------
        ``sim[i, j]``: score of ``j`` for a walk restarting at ``i`` (not symmetric).
        """
        if clids is None:
            return personalized_pagerank(self.adjacency(), alpha=alpha)
        nodes = self.node_ids(clids, missing=-1)
        known = np.flatnonzero(nodes >= 0)
        out = np.zeros((len(nodes), len(nodes)), dtype=np.float64)
        if len(known):
            ppr = personalized_pagerank(self.adjacency(), alpha=alpha, sources=nodes[known])
            out[np.ix_(known, known)] = ppr[:, nodes[known]]
        return out

    def similarity_levels(self, clids: Sequence[str], *, alpha: float = PPR_ALPHA) -> np.ndarray:
        """The scCello ``ctgraph_sim`` for the cell types ``clids``: thresholded log2 PPR levels.

        Ids that are not in the graph get level 1 (the reference's default).

        Returns
        -------
        int32 array ``[len(clids), len(clids)]``.
        """
        nodes = self.node_ids(clids, missing=-1)
        known = np.flatnonzero(nodes >= 0)
        out = np.ones((len(nodes), len(nodes)), dtype=np.int32)
        if len(known):
            ppr = personalized_pagerank(self.adjacency(), alpha=alpha, sources=nodes[known])
            out[np.ix_(known, known)] = ppr_to_levels(ppr[:, nodes[known]])
        return out


def personalized_pagerank(
    adjacency: sp.spmatrix | np.ndarray,
    *,
    alpha: float = PPR_ALPHA,
    sources: Sequence[int] | np.ndarray | None = None,
    max_iter: int = PPR_MAX_ITER,
    tol: float = PPR_TOL,
) -> np.ndarray:
    """Personalized PageRank restarting at each source node, all sources at once.

    Reproduces ``networkx.pagerank(G, alpha, personalization=one-hot(source))`` exactly,
    including its stopping rule (power iteration from the uniform vector until the L1 change
    is below ``n_nodes * tol``), because scCello thresholds the result and an exact solve can
    move values across the threshold.

    Parameters
    ----------
    adjacency
        ``[n, n]`` weighted adjacency (symmetric for an undirected graph).
    alpha
        Damping factor.
    sources
        Restart nodes; ``None`` uses every node.
    max_iter, tol
        Power-iteration limits (``networkx`` defaults).

    Returns
    -------
    float64 array ``[len(sources), n]``.

    Raises
    ------
    OntologyError
        If some source does not converge within ``max_iter`` iterations.
    """
    adj = sp.csr_matrix(adjacency, dtype=np.float64)
    n = adj.shape[0]
    src = np.arange(n) if sources is None else np.asarray(sources, dtype=np.int64)
    out_degree = np.asarray(adj.sum(axis=1)).ravel()
    inv = np.divide(1.0, out_degree, out=np.zeros(n), where=out_degree != 0)
    # x_new = x @ (D^-1 A) for row vectors x; one column per source keeps the sparse product fast
    transition_t = (sp.diags(inv) @ adj).T.tocsr()
    dangling = np.flatnonzero(out_degree == 0)
    x = np.full((n, len(src)), 1.0 / n)
    result = np.empty((len(src), n))
    active = np.arange(len(src))
    for _ in range(max_iter):
        x_last = x
        walk = transition_t @ x_last
        x = alpha * walk
        # restart (and, as in networkx, dangling mass) goes back to the source node
        cols = np.arange(len(active))
        mass = x_last[dangling].sum(axis=0) if len(dangling) else 0.0
        x[src[active], cols] = alpha * (walk[src[active], cols] + mass) + (1 - alpha)
        done = np.abs(x - x_last).sum(axis=0) < n * tol
        if done.any():
            result[active[done]] = x[:, done].T
            active, x = active[~done], np.ascontiguousarray(x[:, ~done])
            if len(active) == 0:
                return result
    raise OntologyError(
        f"Personalized PageRank did not converge within {max_iter} iterations for "
        f"{len(active)} source nodes; check the ontology graph."
    )


def ppr_to_levels(ppr: np.ndarray, threshold: float = PPR_THRESHOLD) -> np.ndarray:
    """The scCello PPR levels: 1 below ``threshold``, else ``int(log2(ppr / threshold + 1))``."""
    ppr = np.asarray(ppr, dtype=np.float64)
    levels = np.log2(ppr * (1 / threshold) + 1)
    # int32 assignment in the reference truncates toward zero
    return np.where(ppr < threshold, 1, np.trunc(levels)).astype(np.int32)


# ---------------------------------------------------------------------- readers
def _iter_rdf_triples(root: ET.Element) -> Iterator[tuple[str | None, str, str, bool]]:
    """Yield ``(subject, predicate, object, object_is_literal)`` of an RDF/XML document.

    Blank-node subjects are ``None``. Only the parts of RDF/XML that CL uses are handled:
    node elements with ``rdf:about``, property elements with ``rdf:resource``, nested node
    elements and literal text.
    """
    base = root.get(f"{{{_XML}}}base", "")

    def resolve(ref: str) -> str:
        return ref if "://" in ref or not base else base.rstrip("#/") + "/" + ref.lstrip("#/")

    def node(elem: ET.Element) -> Iterator[tuple[str | None, str, str, bool]]:
        about = elem.get(f"{{{_RDF}}}about")
        subject = resolve(about) if about is not None else None
        for name, value in elem.attrib.items():
            if not name.startswith((f"{{{_RDF}}}", f"{{{_XML}}}")):
                yield subject, name, value, True
        for prop in elem:
            predicate = prop.tag
            resource = prop.get(f"{{{_RDF}}}resource")
            if resource is not None:
                yield subject, predicate, resolve(resource), False
                continue
            children = list(prop)
            if children and prop.get(f"{{{_RDF}}}parseType") is None:
                for child in children:
                    obj = child.get(f"{{{_RDF}}}about")
                    if obj is not None:
                        yield subject, predicate, resolve(obj), False
                    yield from node(child)
            elif not children and prop.text is not None:
                yield subject, predicate, prop.text, True

    for elem in root:
        yield from node(elem)


def read_cl_owl(path: str | os.PathLike) -> CellOntology:
    """Read a Cell Ontology OWL file (RDF/XML, e.g. ``cl.owl``) the way scCello does.

    Every triple whose subject and object reduce to ``CL:`` ids (last path segment, ``_``
    replaced by ``:``) is an edge child -> parent; self-loops are dropped. Restrictions
    (blank nodes) do not count.

    Parameters
    ----------
    path
        The ``.owl`` file (optionally gzip-compressed).

    Raises
    ------
    OntologyError
        If the file cannot be parsed or holds no CL -> CL edge.
    """
    path = os.fspath(path)
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as fh:
            root = ET.parse(fh).getroot()
    except (OSError, ET.ParseError) as err:
        raise OntologyError(
            f"Cannot read the cell ontology {path!r} as RDF/XML ({err}). Pass the Cell Ontology "
            "OWL file (cl.owl) or a cellxgene-ontology-guide JSON file."
        ) from None
    edges: list[tuple[str, str]] = []
    names: dict[str, str] = {}
    for subject, predicate, obj, is_literal in _iter_rdf_triples(root):
        if subject is None:
            continue
        child = _to_clid(subject)
        if child is None:
            continue
        if predicate == _RDFS_LABEL_TAG and is_literal:
            names.setdefault(child, obj)
        parent = _to_clid(obj)
        if parent is not None and parent != child:
            edges.append((child, parent))
    return CellOntology(edges=edges, names=names, source=path)


def read_cl_json(path: str | os.PathLike | None = None) -> CellOntology:
    """Read a cellxgene-ontology-guide CL JSON (``{CL id: {"ancestors": {id: distance}, ...}}``).

    Parameters
    ----------
    path
        ``.json`` or ``.json.gz`` file; ``None`` reads the CL release bundled with scfm.

    Notes
    -----
    Edges are the distance-1 ancestors (``is_a`` and ``part_of`` parents) plus deprecated
    term -> ``replaced_by`` links, so that old ids stay connected to their replacement.
    """
    if path is None:
        ref = resources.files("scfm.data") / "resources" / BUNDLED_CL
        with ref.open("rb") as raw, gzip.open(raw, "rt") as fh:
            terms = json.load(fh)
        source = f"scfm bundled {BUNDLED_CL}"
    else:
        source = os.fspath(path)
        try:
            opener = gzip.open if source.endswith(".gz") else open
            with opener(source, "rt") as fh:
                terms = json.load(fh)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise OntologyError(
                f"Cannot read the cell ontology {source!r} as JSON ({err}). Pass a "
                "cellxgene-ontology-guide CL JSON file or a cl.owl file."
            ) from None
    if not isinstance(terms, dict):
        raise OntologyError(f"{source!r} is not a cellxgene-ontology-guide CL JSON (a dict).")
    edges: list[tuple[str, str]] = []
    names: dict[str, str] = {}
    for clid, term in terms.items():
        if not str(clid).startswith("CL:") or not isinstance(term, dict):
            continue
        if "label" in term:
            names[clid] = str(term["label"])
        for parent, distance in (term.get("ancestors") or {}).items():
            if distance == 1 and str(parent).startswith("CL:"):
                edges.append((clid, parent))
        replacement = term.get("replaced_by")
        if (
            term.get("deprecated")
            and isinstance(replacement, str)
            and replacement.startswith("CL:")
        ):
            edges.append((clid, replacement))
    return CellOntology(edges=edges, names=names, source=source)


@lru_cache(maxsize=4)
def _cached(path: str | None) -> CellOntology:
    if path is not None and path.endswith((".owl", ".owl.gz", ".xml", ".rdf")):
        return read_cl_owl(path)
    return read_cl_json(path)


def load_cell_ontology(path: str | os.PathLike | None = None) -> CellOntology:
    """Load the Cell Ontology graph: an OWL / JSON file, or the CL release bundled with scfm.

    Parameters
    ----------
    path
        ``cl.owl`` (RDF/XML), a cellxgene-ontology-guide ``.json`` / ``.json.gz``, or ``None``
        for the bundled CL release (v2026-03-26; CC BY 4.0).

    Returns
    -------
    The :class:`CellOntology` (cached per path).
    """
    if path is not None and not os.path.exists(path):
        raise OntologyError(f"The cell ontology file {os.fspath(path)!r} does not exist.")
    return _cached(None if path is None else os.fspath(path))


# ---------------------------------------------------------------------- cell-type lookups
def _as_clid(value: str) -> str | None:
    """``value`` as a CL id if it is one (``CL_0000236`` accepted), else ``None``."""
    key = str(value).strip().replace("_", ":")
    return key if key.startswith("CL:") else None


def lookup_cell_type_ids(
    names: Iterable[str],
    ontology: CellOntology,
    *,
    taxonomy_names: Mapping[str, str] | None = None,
    label_names: Mapping[str, str] | None = None,
) -> list[str]:
    """CL ids of cell-type names or ids.

    CL ids pass through; names are matched case-insensitively against ``taxonomy_names``
    (lower-cased name -> CL id, scCello's Cell Taxonomy lookup), then ``label_names``
    (CL id -> name of the pretraining types), then the ontology's labels.

    Raises
    ------
    OntologyError
        Naming every entry that matches nothing.
    """
    taxonomy = {str(k).lower(): str(v) for k, v in (taxonomy_names or {}).items()}
    by_label = {str(v).lower(): str(k) for k, v in (label_names or {}).items()}
    out: list[str] = []
    unknown: list[str] = []
    for name in names:
        key = str(name).strip()
        clid = _as_clid(key) or taxonomy.get(key.lower()) or by_label.get(key.lower())
        if clid is None:
            clid = ontology.lookup([key])[0]
        if clid is None:
            unknown.append(key)
        else:
            out.append(clid)
    if unknown:
        raise OntologyError(
            f"No Cell Ontology id found for {unknown}. Pass CL ids (e.g. 'CL:0000236') or "
            "names as spelled in the Cell Ontology."
        )
    return out


def label_indices(
    values: Sequence[str] | np.ndarray,
    label_clids: Sequence[str],
    ontology: CellOntology,
    *,
    column: str,
) -> np.ndarray:
    """Index of each cell's CL id among ``label_clids`` (a model's pretraining cell types).

    Raises
    ------
    OntologyError
        Naming the unknown ids, and whether they are Cell Ontology ids at all.
    """
    clids = np.array([str(v).replace("_", ":") for v in values], dtype=object)
    index = {c: i for i, c in enumerate(label_clids)}
    out = np.array([index.get(v, -1) for v in clids], dtype=np.int64)
    bad = sorted(set(clids[out < 0]))
    if bad:
        in_ontology = [c for c in bad if c in ontology]
        hint = (
            "None of them is a Cell Ontology id"
            if not in_ontology
            else f"{len(in_ontology)} are Cell Ontology ids but not among the model's "
            f"{len(label_clids)} pretraining cell types"
        )
        raise OntologyError(
            f"{len(bad)} cell types in obs[{column!r}] are unknown to the model: "
            f"{', '.join(bad[:5])}. {hint}. Use CL ids of the model's cell types "
            "(model.label_clids) or drop those cells."
        )
    return out
