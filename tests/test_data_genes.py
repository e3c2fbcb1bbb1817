"""Gene identifiers: symbol <-> Ensembl mapping and alignment to model vocabularies."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import scfm
from conftest import data_file
from scfm.data import align_genes, detect_id_type, map_gene_ids, strip_version
from scfm.errors import AnnDataKeyError, GeneVocabularyError, InvalidInputError
from scfm.io import load_pickle_dict


def test_gene_table_is_gencode48():
    table = scfm.data.gene_table()
    assert len(table) == 78_894
    assert list(table.columns) == ["ensembl_id", "symbol", "version", "length", "biotype"]
    assert not table["ensembl_id"].str.contains(r"\.").any()


def test_map_symbols_to_ensembl_and_back():
    mapped = map_gene_ids(["TP53", "CD3E", "cd3e", "NOT_A_GENE"])
    assert mapped.iloc[:3].tolist() == ["ENSG00000141510", "ENSG00000198851", "ENSG00000198851"]
    assert pd.isna(mapped.iloc[3])
    back = map_gene_ids(["ENSG00000141510.17", "ENSG00000198851"], to="symbol")
    assert back.tolist() == ["TP53", "CD3E"]


def test_ambiguous_symbols_are_handled_explicitly():
    table = scfm.data.gene_table()
    counts = table["symbol"].value_counts()
    dup = counts.index[counts > 1][0]
    candidates = table.loc[table["symbol"] == dup, "ensembl_id"].tolist()
    assert map_gene_ids([dup], ambiguous="first").iloc[0] == candidates[0]
    assert pd.isna(map_gene_ids([dup], ambiguous="drop").iloc[0])
    with pytest.raises(InvalidInputError, match="several Ensembl ids"):
        map_gene_ids([dup], ambiguous="raise")
    with pytest.raises(InvalidInputError, match="to="):
        map_gene_ids(["TP53"], to="entrez")


def test_strip_version_and_detect_id_type():
    assert list(strip_version(["ENSG00000141510.17", "TP53", "ENSG00000002586.20_PAR_Y"])) == [
        "ENSG00000141510",
        "TP53",
        "ENSG00000002586_PAR_Y",
    ]
    assert detect_id_type(["ENSG00000141510", "ENSMUSG00000059552.3"]) == "ensembl"
    assert detect_id_type(["TP53", "CD3E"]) == "symbol"
    assert detect_id_type(["TP53", "ENSG00000141510"]) == "mixed"


def test_real_pbmc_symbols_align_to_geneformer_vocabulary(caplog):
    adata = ad.read_h5ad(data_file("pbmc68k_reduced_counts.h5ad"))
    vocab = load_pickle_dict(
        scfm.data._genes.resources.files("scfm.data")
        / "resources/geneformer/token_dictionary_gc30M.pkl"
    )
    with caplog.at_level(logging.WARNING):
        alignment = align_genes(adata.var, vocab, id_type="ensembl", model_name="Geneformer")
    assert "after conversion with the bundled GENCODE v48 table" in caplog.text
    # most PBMC symbols have an Ensembl id in the V1 vocabulary
    assert alignment.n_matched > 0.8 * adata.n_vars
    assert "GENCODE" in alignment.source
    # a matched gene really is that gene
    pos = list(adata.var_names).index("CD3E")
    i = list(alignment.var_index).index(pos)
    assert alignment.vocab_index[i] == vocab["ENSG00000198851"]
    assert alignment.var_to_vocab()[pos] == vocab["ENSG00000198851"]
    summary = alignment.to_dict()
    assert summary["n_matched"] == alignment.n_matched and "var_index" not in summary


def test_align_genes_with_gene_id_key_and_duplicates():
    var = pd.DataFrame(
        {"ids": ["ENSG00000141510.3", "ENSG00000141510.4", "ENSG00000198851"]},
        index=["a", "b", "c"],
    )
    alignment = align_genes(var, ["<pad>", "ENSG00000198851", "ENSG00000141510"], gene_id_key="ids")
    # the duplicated id keeps its first occurrence only
    np.testing.assert_array_equal(alignment.var_index, [0, 2])
    np.testing.assert_array_equal(alignment.vocab_index, [2, 1])
    with pytest.raises(AnnDataKeyError, match="not a column"):
        align_genes(var, ["x"], gene_id_key="nope")


def test_too_few_genes_message_names_the_fix():
    var = pd.DataFrame(index=["FOO1", "FOO2", "FOO3"])
    with pytest.raises(GeneVocabularyError) as info:
        align_genes(var, ["ENSG00000141510"], model_name="Geneformer", min_genes=2)
    message = str(info.value)
    assert "0 of 3 genes" in message
    assert "Ensembl ids expected" in message
    assert "gene_id_key=" in message and "map_gene_ids" in message


def test_mixed_symbol_and_ensembl_ids_are_all_matched(caplog):
    vocab = ["<pad>", "ENSG00000141510", "ENSG00000198851", "ENSG00000010610"]
    var = pd.DataFrame(index=["ENSG00000141510.4", "CD3E", "CD4", "UNKNOWN1"])
    with caplog.at_level(logging.WARNING):
        alignment = align_genes(var, vocab, model_name="Geneformer")
    np.testing.assert_array_equal(alignment.var_index, [0, 1, 2])
    np.testing.assert_array_equal(alignment.vocab_index, [1, 2, 3])
    assert "2 more genes matched" in caplog.text
