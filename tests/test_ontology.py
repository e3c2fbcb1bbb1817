"""Cell Ontology graph: readers, personalized PageRank, scCello's levels and ancestor mask."""

from __future__ import annotations

import gzip
import json
import pickle

import networkx as nx
import numpy as np
import pytest

from conftest import fixture_dir
from scfm.data import (
    CellOntology,
    load_cell_ontology,
    personalized_pagerank,
    ppr_to_levels,
    read_cl_json,
    read_cl_owl,
)
from scfm.errors import OntologyError


@pytest.fixture(scope="module")
def fixture_files():
    root = fixture_dir("sccello")
    expected = np.load(root / "expected.npz")
    data = root / "checkpoint" / "data"
    with open(data / "new_pretrain" / "pretrain_frac100_clid2name.pkl", "rb") as fh:
        clid2label = pickle.load(fh)
    labels = [c for c, _ in sorted(clid2label.items(), key=lambda kv: kv[1])]
    return expected, read_cl_owl(data / "cell_taxonomy" / "cl.owl"), labels


def test_owl_nodes_and_ppr_match_reference(fixture_files):
    expected, onto, _ = fixture_files
    assert onto.ids == list(expected["ppr_node_clids"])
    ppr = onto.ppr_similarity()
    np.testing.assert_allclose(ppr.astype(np.float32), expected["ppr_raw"], atol=1e-4, rtol=0)
    # the float64 power iteration is the reference's, not an exact solve
    np.testing.assert_allclose(ppr, expected["ppr_raw"], atol=1e-7, rtol=0)


def test_ctgraph_sim_and_ancestor_mask_match_reference(fixture_files):
    expected, onto, labels = fixture_files
    np.testing.assert_array_equal(onto.similarity_levels(labels), expected["ctgraph_sim"])
    np.testing.assert_array_equal(onto.ancestor_mask(labels), expected["cell_type_ancestor_mask"])
    assert onto.similarity_levels(labels).dtype == np.int32


def test_owl_reader_keeps_the_reference_edges(fixture_files):
    _, onto, _ = fixture_files
    edges = set(onto.edges)
    # "term replaced by" on an obsolete class is an IRI-valued CL -> CL triple: kept
    assert ("CL:0000003", "CL:0000000") in edges
    # BFO parent, blank-node restriction and the oboInOwl:id literal (a self-loop) are not
    assert all(p.startswith("CL:") and c != p for c, p in edges)
    assert not any(p.startswith(("BFO", "GO")) for _, p in edges)
    # every class's rdfs:subClassOf parents are edges, and labels are read
    for child, parent in edges:
        assert parent in onto.ancestors(child)
    assert all(isinstance(onto.names[c], str) for c, _ in edges if c != "CL:0000003")


def test_personalized_pagerank_equals_networkx():
    rng = np.random.default_rng(0)
    g = nx.gnm_random_graph(40, 90, seed=1)
    g.add_edge(40, 41)  # a separate component
    adj = nx.to_scipy_sparse_array(g, nodelist=range(42))
    ours = personalized_pagerank(adj, alpha=0.9)
    for src in rng.choice(42, 6, replace=False):
        ref = nx.pagerank(g, alpha=0.9, personalization={i: i == src for i in range(42)})
        np.testing.assert_allclose(ours[src], [ref[i] for i in range(42)], atol=1e-12, rtol=0)


def test_personalized_pagerank_dangling_nodes_like_networkx():
    g = nx.DiGraph([(0, 1), (1, 2), (2, 0), (2, 3), (4, 3)])  # node 3 has no out-edge
    adj = nx.to_scipy_sparse_array(g, nodelist=range(5))
    ours = personalized_pagerank(adj, alpha=0.9, sources=[4, 0])
    for row, src in enumerate([4, 0]):
        ref = nx.pagerank(g, alpha=0.9, personalization={i: i == src for i in range(5)})
        np.testing.assert_allclose(ours[row], [ref[i] for i in range(5)], atol=1e-12, rtol=0)


def test_personalized_pagerank_reports_non_convergence():
    adj = nx.to_scipy_sparse_array(nx.path_graph(30))
    with pytest.raises(OntologyError, match="did not converge"):
        personalized_pagerank(adj, max_iter=2)


def test_ppr_to_levels_thresholds_and_truncates():
    ppr = np.array([0.0, 9.9e-5, 1e-4, 3.5e-4, 0.2, 1.0])
    levels = ppr_to_levels(ppr)
    assert levels.dtype == np.int32
    # below 1e-4 -> 1; else int(log2(ppr * 1e4 + 1))
    np.testing.assert_array_equal(levels, [1, 1, 1, 2, 10, 13])


def test_bundled_cl_release():
    onto = load_cell_ontology()
    assert onto is load_cell_ontology()  # cached
    assert onto.n_nodes > 3000
    edges = set(onto.edges)
    assert ("CL:0000236", "CL:0000945") in edges  # B cell is_a lymphocyte of B lineage
    assert ("CL:0000003", "CL:0000000") in edges  # deprecated term -> replaced_by
    assert onto.lookup(["B cell", "b CELL", "CL:0000623", "no such cell"]) == [
        "CL:0000236",
        "CL:0000236",
        "CL:0000623",
        None,
    ]
    types = ["CL:0000236", "CL:0000787", "CL:0000084"]  # B cell, memory B cell, T cell
    mask = onto.ancestor_mask(types)
    assert mask[1, 0] == 1 and mask[0, 1] == 0 and mask[2, 0] == 0
    np.testing.assert_array_equal(np.diag(mask), 1)
    levels = onto.similarity_levels(types)
    assert levels[1, 0] > levels[1, 2]  # memory B is closer to B cells than to T cells


def test_unknown_ids_and_bad_files(tmp_path):
    onto = load_cell_ontology()
    with pytest.raises(OntologyError, match="not in the cell ontology"):
        onto.node_ids(["CL:9999999"])
    np.testing.assert_array_equal(onto.similarity_levels(["CL:9999999", "CL:0000236"])[0], 1)
    assert onto.ancestor_mask(["CL:9999999"])[0, 0] == 0
    bad = tmp_path / "cl.owl"
    bad.write_text("<rdf:RDF")
    with pytest.raises(OntologyError, match="RDF/XML"):
        read_cl_owl(bad)
    with pytest.raises(OntologyError, match="does not exist"):
        load_cell_ontology(tmp_path / "missing.owl")
    with pytest.raises(OntologyError, match="no CL -> CL edge"):
        CellOntology(edges=[("CL:1", "CL:1")])


def test_json_reader_on_a_file(tmp_path):
    terms = {
        "CL:0000000": {"ancestors": {}, "label": "cell", "deprecated": False},
        "CL:0000001": {"ancestors": {"CL:0000000": 1}, "label": "a", "deprecated": False},
        "CL:0000002": {
            "ancestors": {"CL:0000001": 1, "CL:0000000": 2, "UBERON:1": 1},
            "label": "b",
            "deprecated": False,
        },
        "CL:0000003": {
            "ancestors": {},
            "label": "old",
            "deprecated": True,
            "replaced_by": "CL:0000002",
        },
    }
    path = tmp_path / "cl.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump(terms, fh)
    onto = read_cl_json(path)
    assert sorted(onto.edges) == [
        ("CL:0000001", "CL:0000000"),
        ("CL:0000002", "CL:0000001"),
        ("CL:0000003", "CL:0000002"),
    ]
    assert onto.ancestors("CL:0000003") == {"CL:0000002", "CL:0000001", "CL:0000000"}
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(OntologyError, match="JSON"):
        read_cl_json(tmp_path / "bad.json")
