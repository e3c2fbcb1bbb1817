"""Trust at every entry point, for all five models (issue: trust at every entry point).

Every case runs against each model through the fixture contract: saved models never run code
when loaded, every inference path checks the data it reads, weights and configs are checked
before anything is built, gene matching cannot silently go wrong, and a failure leaves the
AnnData as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import scfm
from conftest import fixture_dir
from scfm.errors import (
    CheckpointError,
    CheckpointFormatError,
    CountDataError,
    GeneVocabularyError,
    InvalidInputError,
    NonFiniteOutputError,
    ScfmError,
    UnsafeCheckpointError,
)
from test_bad_input import MODELS, _snapshot, _unchanged

NAMES = list(MODELS)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _cls(name):
    return getattr(scfm.model, MODELS[name][0])


def _input(name) -> ad.AnnData:
    adata = ad.read_h5ad(fixture_dir(name) / "input.h5ad")
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    return adata


_LOADED: dict[str, tuple] = {}


def _loaded(name):
    """(model, its AnnData, reference embedding), built once per model for read-only cases."""
    if name not in _LOADED:
        adata = _input(name)
        _cls(name).setup_anndata(adata)
        model = _cls(name).from_pretrained(
            fixture_dir(name) / "checkpoint", adata, **MODELS[name][1]
        )
        _LOADED[name] = (model, adata, model.get_latent_representation(progress_bar=False))
    return _LOADED[name]


def _fresh(name):
    adata = _input(name)
    _cls(name).setup_anndata(adata)
    model = _cls(name).from_pretrained(fixture_dir(name) / "checkpoint", adata, **MODELS[name][1])
    return model, adata


# ---------------------------------------------------------------------- 1. saved models
@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip_is_exact_and_pickle_free(name, tmp_path):
    model, adata, z = _loaded(name)
    model.save(tmp_path / "m")
    assert not list((tmp_path / "m").glob("*.pt"))
    with pytest.raises(InvalidInputError, match="overwrite"):
        model.save(tmp_path / "m")
    loaded = _cls(name).load(tmp_path / "m", adata)
    np.testing.assert_array_equal(loaded.get_latent_representation(progress_bar=False), z)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.mark.parametrize("name", NAMES)
def test_saved_model_with_a_pickle_payload_never_runs(name, tmp_path):
    """An scvi-tools-format folder (model.pt) whose pickle would run code is refused."""
    _, adata, _ = _loaded(name)
    folder = tmp_path / "shared_by_a_colleague"
    folder.mkdir()
    marker = tmp_path / "pwned"
    torch.save(
        {"attr_dict": {"init_params_": _Payload(str(marker))}, "model_state_dict": {}},
        folder / "model.pt",
    )
    with pytest.raises(UnsafeCheckpointError, match="trust_checkpoint"):
        _cls(name).load(folder, adata)
    assert not marker.exists()


@pytest.mark.parametrize("name", NAMES)
def test_saved_model_loads_with_another_gene_set(name, tmp_path):
    model, adata, z = _loaded(name)
    model.save(tmp_path / "m")
    query = adata[:, adata.var_names[::-1]].copy()  # same genes, another order
    loaded = _cls(name).load(tmp_path / "m", query)
    z_query = loaded.get_latent_representation(query, progress_bar=False)
    if name != "cellplm":  # CellPLM cells attend within their sentence; same cells here
        np.testing.assert_allclose(z_query, z, atol=1e-5, rtol=0)
    else:
        np.testing.assert_allclose(z_query, z, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------- 2. every path checks
def _lognorm(adata):
    x = adata.X.toarray()
    adata.X = sp.csr_matrix(
        np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4), dtype=np.float32
    )


def _late_value(value):
    def mutate(adata):
        x = adata.X.tolil()
        x[adata.n_obs - 1, int(np.flatnonzero(adata.X[adata.n_obs - 1].toarray())[0])] = value
        adata.X = x.tocsr()

    return mutate


QUERY_CASES = {
    "log-normalised": (_lognorm, "non-integer"),
    "negative": (_late_value(-2.0), "negative"),
    "NaN": (_late_value(np.nan), "NaN"),
    "inf": (_late_value(np.inf), "infinite"),
}

PATHS = {
    "latent": lambda m, a: m.get_latent_representation(a, progress_bar=False),
    "embed": lambda m, a: m.embed(a, progress_bar=False),
    "genes": lambda m, a: m.embed_genes(a, progress_bar=False),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", list(QUERY_CASES))
@pytest.mark.parametrize("name", NAMES)
def test_own_anndata_changed_after_loading_is_checked_on_every_path(name, case, path):
    """The most common notebook order: from_pretrained, then normalise adata in place."""
    mutate, match = QUERY_CASES[case]
    model, adata = _fresh(name)
    if path == "genes" and model._static_gene_embeddings() is not None:
        pytest.skip("this model's gene embeddings are weight rows: the path reads no cells")
    mutate(adata)
    snap = _snapshot(adata)
    with pytest.raises(CountDataError, match=match):
        PATHS[path](model, adata)
    _unchanged(adata, snap)


@pytest.mark.parametrize("name", NAMES)
def test_backed_query_is_checked_beyond_its_first_rows(name, tmp_path):
    model, adata, _ = _loaded(name)
    query = adata.copy()
    _late_value(np.nan)(query)
    query.write_h5ad(tmp_path / "q.h5ad")
    backed = ad.read_h5ad(tmp_path / "q.h5ad", backed="r")
    with pytest.raises(CountDataError, match="NaN"):
        model.get_latent_representation(backed, batch_size=4, progress_bar=False)
    backed.file.close()


@pytest.mark.parametrize("name", NAMES)
def test_nan_weights_in_memory_give_an_error_not_nan_embeddings(name):
    model, adata = _fresh(name)
    with torch.no_grad():
        for param in model.module.parameters():
            param.fill_(float("nan"))
    snap = _snapshot(adata)
    with pytest.raises(NonFiniteOutputError, match="nothing was written"):
        model.embed(progress_bar=False)
    _unchanged(adata, snap)


# ---------------------------------------------------------------------- 3. configs, vocabularies
def _copy_release(name, tmp_path):
    dst = tmp_path / "release"
    shutil.copytree(fixture_dir(name) / "checkpoint", dst)
    return dst


def _absurd(name, release):
    """Set the depth of the release's encoder to a million layers, in its own format."""
    if name in ("geneformer", "sccello"):
        cfg = json.loads((release / "config.json").read_text())
        cfg["num_hidden_layers"] = 1_000_000
        (release / "config.json").write_text(json.dumps(cfg))
        return {}
    if name == "cellplm":
        for f in release.glob("*.config.json"):
            cfg = json.loads(f.read_text())
            cfg["enc_layers"] = 1_000_000
            f.write_text(json.dumps(cfg))
        return {}
    if name == "scfoundation":
        path = release / "models" / "models.ckpt"
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
        for part in ckpt.values():
            part["config"]["model_config"]["mae_autobin"]["encoder"]["depth"] = 1_000_000
        torch.save(ckpt, path)
        return {}
    return {"n_heads": 1_000_000}  # CellFM: the head count is an option


@pytest.mark.parametrize("name", NAMES)
def test_absurd_config_fails_fast_naming_the_key(name, tmp_path):
    release = _copy_release(name, tmp_path)
    options = {**MODELS[name][1], **_absurd(name, release)}
    adata = _input(name)
    _cls(name).setup_anndata(adata)
    snap = _snapshot(adata)
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        _cls(name).from_pretrained(release, adata, **options)
    assert time.perf_counter() - start < 1.0
    assert any(k in str(info.value) for k in ("layers", "depth", "n_heads", "heads"))
    _unchanged(adata, snap)


def _malformed(name, release):
    if name in ("geneformer", "sccello"):
        (release / "config.json").write_text('{"hidden_size": 64,')
    elif name == "cellplm":
        for f in release.glob("*.config.json"):
            f.write_text("[1, 2")
    elif name == "scfoundation":
        (release / "OS_scRNA_gene_index.19264.tsv").write_text("not\ta\tgene\tindex\n\x00")
    else:
        (release / "expand_gene_info.csv").write_text("\x00\x01garbage")


@pytest.mark.parametrize("name", NAMES)
def test_malformed_release_files_are_typed_errors(name, tmp_path):
    release = _copy_release(name, tmp_path)
    _malformed(name, release)
    adata = _input(name)
    _cls(name).setup_anndata(adata)
    with pytest.raises(CheckpointError):
        _cls(name).from_pretrained(release, adata, **MODELS[name][1])
    assert "scfm" not in adata.uns


def _nan_weights(name, release):
    """Write NaN into the first float tensor of the release's weights, in its own format."""
    if name == "geneformer":
        from safetensors.torch import load_file, save_file

        tensors = load_file(release / "model.safetensors")
        key = next(k for k, v in tensors.items() if v.is_floating_point())
        tensors[key][..., 0] = float("nan")
        save_file(tensors, release / "model.safetensors", metadata={"format": "pt"})
        return True
    if name == "sccello":
        path = release / "pytorch_model.bin"
        state = torch.load(path, weights_only=True, map_location="cpu")
        key = next(k for k, v in state.items() if v.is_floating_point())
        state[key].view(-1)[0] = float("nan")
        torch.save(state, path)
        return True
    if name == "scfoundation":
        path = release / "models" / "models.ckpt"
        ckpt = torch.load(path, weights_only=True, map_location="cpu")
        for part in ckpt.values():
            key = next(k for k, v in part["state_dict"].items() if v.is_floating_point())
            part["state_dict"][key].view(-1)[0] = float("nan")
        torch.save(ckpt, path)
        return True
    if name == "cellplm":
        for path in release.glob("*.best.ckpt"):
            ckpt = torch.load(path, weights_only=True, map_location="cpu")
            state = ckpt.get("model_state_dict", ckpt)
            key = next(k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point())
            state[key].view(-1)[0] = float("nan")
            torch.save(ckpt, path)
        return True
    return False  # MindSpore protobuf: covered by the reader's own tests


@pytest.mark.parametrize("name", NAMES)
def test_nan_in_released_weights_is_refused(name, tmp_path):
    release = _copy_release(name, tmp_path)
    if not _nan_weights(name, release):
        pytest.skip("no writer for this format in the test suite")
    adata = _input(name)
    _cls(name).setup_anndata(adata)
    with pytest.raises(CheckpointFormatError, match="NaN"):
        _cls(name).from_pretrained(release, adata, **MODELS[name][1])
    assert "scfm" not in adata.uns


# ---------------------------------------------------------------------- 4. gene matching
def _ids_look(name):
    adata = _input(name)
    return "ensembl" if str(adata.var_names[0]).startswith("ENS") else "symbol"


@pytest.mark.parametrize("name", NAMES)
def test_mouse_style_or_wrong_case_ids_are_refused(name):
    adata = _input(name)
    if _ids_look(name) == "symbol":
        adata.var_names = [g.capitalize() for g in adata.var_names]  # mouse-style symbols
    else:
        adata.var_names = [g.replace("ENSG", "ENSMUSG") for g in adata.var_names]
    _cls(name).setup_anndata(adata)
    snap = _snapshot(adata)
    with pytest.raises(GeneVocabularyError, match="species"):
        _cls(name).from_pretrained(fixture_dir(name) / "checkpoint", adata, **MODELS[name][1])
    _unchanged(adata, snap)


@pytest.mark.parametrize("name", NAMES)
def test_three_real_genes_are_refused_unless_opted_out(name):
    model, adata, _ = _loaded(name)
    tiny = _input(name)
    matched = model._gene_space(adata)[0].var_index
    tiny = tiny[:, np.sort(matched[:3])].copy()
    # cells with counts in those genes (scFoundation's depth token needs a total above 1)
    tiny = tiny[np.asarray(tiny.X.sum(axis=1)).ravel() > 1].copy()
    _cls(name).setup_anndata(tiny)
    with pytest.raises(GeneVocabularyError, match="check_gene_overlap=False"):
        model.get_latent_representation(tiny, progress_bar=False)
    _cls(name).setup_anndata(tiny, check_gene_overlap=False)
    assert np.isfinite(model.get_latent_representation(tiny, progress_bar=False)).all()


@pytest.mark.parametrize("name", NAMES)
def test_lower_case_and_versioned_ensembl_ids_match(name):
    model, adata, z = _loaded(name)
    if _ids_look(name) != "ensembl":
        pytest.skip("the fixture uses symbols")
    query = adata.copy()
    query.var_names = [f"{g.lower()}.{i % 7 + 1}" for i, g in enumerate(adata.var_names)]
    np.testing.assert_allclose(
        model.get_latent_representation(query, progress_bar=False), z, atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("name", NAMES)
def test_mostly_ensembl_with_some_symbols_keeps_the_ensembl_ids(name):
    model, adata, _ = _loaded(name)
    if _ids_look(name) != "ensembl":
        pytest.skip("the fixture uses symbols")
    table = scfm.data.gene_table().drop_duplicates("ensembl_id").set_index("ensembl_id")
    query = adata.copy()
    names = list(query.var_names)
    swapped = 0
    for i, g in enumerate(names):
        if swapped < len(names) // 6 and g in table.index:
            names[i] = table.loc[g, "symbol"]
            swapped += 1
    query.var_names = pd.Index(names).astype(str)
    query.var_names_make_unique()
    n_own = model._gene_space(adata)[0].n_matched
    n_query = model._gene_space(query)[0].n_matched
    assert n_query >= n_own - swapped // 4  # the Ensembl ids are all kept


# ---------------------------------------------------------------------- 5. outputs and uns
@pytest.mark.parametrize("name", NAMES)
def test_key_added_with_a_slash_is_refused_before_work(name):
    model, adata, _ = _loaded(name)
    for call in (
        lambda: model.embed(adata, key_added="a/b"),
        lambda: model.embed_genes(adata, key_added="x/y"),
        lambda: model.predict(adata, key_added="p/q"),
    ):
        snap = _snapshot(adata)
        with pytest.raises(InvalidInputError, match=r"'/'|finetune"):
            call()
        _unchanged(adata, snap)


@pytest.mark.parametrize("name", NAMES)
def test_non_dict_uns_scfm_is_a_typed_error(name):
    model, _, _ = _loaded(name)
    adata = _input(name)
    _cls(name).setup_anndata(adata)
    adata.uns["scfm"] = ["a user's list"]
    with pytest.raises(InvalidInputError, match="not a dict"):
        model.embed(adata, progress_bar=False)
    assert adata.uns["scfm"] == ["a user's list"]
    assert "X_" + model._model_name not in adata.obsm


@pytest.mark.parametrize("name", NAMES)
def test_failed_from_pretrained_leaves_no_uns(name, tmp_path):
    adata = _input(name)
    _cls(name).setup_anndata(adata)
    snap = _snapshot(adata)
    release = _copy_release(name, tmp_path)
    weights = release / MODELS[name][2]
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError):
        _cls(name).from_pretrained(release, adata, **MODELS[name][1])
    _unchanged(adata, snap)


@pytest.mark.parametrize("name", NAMES)
def test_setup_on_a_view_is_a_typed_error(name):
    adata = _input(name)
    view = adata[:10]
    with pytest.raises(InvalidInputError, match="copy"):
        _cls(name).setup_anndata(view)


@pytest.mark.parametrize("name", NAMES)
def test_csr_array_input_embeds_like_csr_matrix(name):
    model, adata, z = _loaded(name)
    query = adata.copy()
    query.X = sp.csr_array(query.X)
    _cls(name).setup_anndata(query)
    atol = 1e-4 if name == "cellplm" else 1e-5
    np.testing.assert_allclose(
        model.get_latent_representation(query, progress_bar=False), z, atol=atol, rtol=0
    )


@pytest.mark.parametrize("name", NAMES)
def test_non_integer_counts_are_accepted_only_when_asked(name):
    model, adata, _ = _loaded(name)
    query = adata.copy()
    query.X = query.X * np.float32(1.5)
    with pytest.raises(CountDataError, match="allow_non_integer"):
        _cls(name).setup_anndata(query)
    with pytest.warns(UserWarning, match="non-integer"):
        _cls(name).setup_anndata(query, allow_non_integer=True)
    z = model.get_latent_representation(query, progress_bar=False)
    assert np.isfinite(z).all()


@pytest.mark.parametrize("name", NAMES)
def test_every_failure_is_an_scfm_error(name, tmp_path):
    model, adata, _ = _loaded(name)
    with pytest.raises(ScfmError):
        model.get_latent_representation(adata, indices=[adata.n_obs + 5], progress_bar=False)
    with pytest.raises(ScfmError):
        model.get_latent_representation(adata, batch_size=0, progress_bar=False)
    with pytest.raises(ScfmError):
        model.get_latent_representation(adata, not_an_option=1, progress_bar=False)
    with pytest.raises(ScfmError):
        model.predict(adata, progress_bar=False)  # no head yet
    with pytest.raises(ScfmError):
        _cls(name).load(tmp_path / "nothing_here", adata)
