"""Streaming training from a REAL local TileDB-SOMA experiment, and DDP across 2 processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scvi import REGISTRY_KEYS

import scfm
from conftest import data_file
from scfm.datasets._demo import DEMO_ARCHITECTURE
from scfm.errors import InvalidInputError

tiledbsoma = pytest.importorskip("tiledbsoma")
tiledbsoma_io = pytest.importorskip("tiledbsoma.io")
pytest.importorskip("tiledbsoma_ml")


@pytest.fixture(scope="module")
def pbmc():
    adata = ad.read_h5ad(data_file("pbmc68k_reduced_counts.h5ad"))
    adata.X = adata.X.astype(np.float32)
    return adata


@pytest.fixture(scope="module")
def soma_uri(pbmc, tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("soma") / "pbmc")
    tiledbsoma_io.from_anndata(uri, pbmc, measurement_name="RNA", X_layer_name="raw")
    return uri


def test_streaming_pretraining_lowers_the_loss(soma_uri):
    with tiledbsoma.Experiment.open(soma_uri) as exp:
        query = exp.axis_query(
            "RNA", obs_query=tiledbsoma.AxisQuery(value_filter="bulk_labels != 'Dendritic'")
        )
        template = scfm.data.soma_template(query, n_cells=64)
        assert template.n_vars == 765 and template.n_obs == 64
        scfm.model.Geneformer.setup_anndata(template)
        model = scfm.model.Geneformer(template, **DEMO_ARCHITECTURE)
        dm = scfm.data.SomaDataModule(query, model, batch_key="phase", batch_size=32, seed=0)
        assert dm.n_obs == query.n_obs < 700
        model.train(datamodule=dm, max_epochs=2, enable_progress_bar=False)
    loss = model.history["train_loss"].iloc[:, 0].to_numpy(dtype=float)
    assert len(loss) == 2 and np.all(np.isfinite(loss))
    assert loss[-1] < loss[0]


def test_gene_axis_is_mapped_onto_the_model_genes(pbmc, soma_uri):
    # the model knows a reordered subset of the genes plus one the query lacks
    rng = np.random.default_rng(0)
    genes = [*rng.permutation(pbmc.var_names)[:300], "NOT_IN_QUERY"]
    small = ad.AnnData(X=np.ones((4, len(genes)), dtype=np.float32), var=pd.DataFrame(index=genes))
    scfm.model.Geneformer.setup_anndata(small)
    model = scfm.model.Geneformer(small, **DEMO_ARCHITECTURE)
    with tiledbsoma.Experiment.open(soma_uri) as exp:
        query = exp.axis_query("RNA")
        dm = scfm.data.SomaDataModule(query, model, batch_size=8, var_id_column="var_id")
        x_query = pbmc.X[:3].toarray()
        obs = pd.DataFrame({"soma_joinid": [0, 1, 2]})
        batch = dm.on_before_batch_transfer((x_query, obs), 0)
    x = batch[REGISTRY_KEYS.X_KEY]
    # minibatches arrive in the model's gene space, as from the in-memory loader
    assert x.shape == (3, len(model.vocabulary))
    alignment = model._gene_space(small)[0]
    expected = torch.zeros_like(x)
    for var_i, vocab_j in zip(alignment.var_index, alignment.vocab_index):
        if genes[var_i] != "NOT_IN_QUERY":
            col = list(pbmc.var_names).index(genes[var_i])
            expected[:, vocab_j] += torch.as_tensor(x_query[:, col])
    assert alignment.n_matched > 200
    torch.testing.assert_close(x, expected)
    assert batch[REGISTRY_KEYS.BATCH_KEY].shape == (3, 1)
    with tiledbsoma.Experiment.open(soma_uri) as exp:
        with pytest.raises(InvalidInputError, match="var_id_column"):
            scfm.data.SomaDataModule(exp.axis_query("RNA"), model, var_id_column="soma_joinid")


def test_each_rank_streams_a_disjoint_shard(soma_uri, pbmc, monkeypatch):
    seen = {}
    template = pbmc[:16].copy()
    scfm.model.Geneformer.setup_anndata(template)
    model = scfm.model.Geneformer(template, **DEMO_ARCHITECTURE)
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        with tiledbsoma.Experiment.open(soma_uri) as exp:
            dm = scfm.data.SomaDataModule(exp.axis_query("RNA"), model, batch_size=50)
            dm.setup()
            rows = [
                hash(row.tobytes())
                for x, _ in dm.train_dataloader()
                for row in np.atleast_2d(x.numpy() if hasattr(x, "numpy") else x)
            ]
        seen[rank] = set(rows)
    assert seen[0].isdisjoint(seen[1])
    assert len(seen[0] | seen[1]) == len({hash(r.tobytes()) for r in pbmc.X.toarray()})


def test_ddp_training_on_two_cpu_processes(soma_uri, tmp_path, pbmc):
    script = Path(__file__).parent / "scripts" / "ddp_train.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(script), soma_uri, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=tmp_path,  # Lightning writes lightning_logs/ into the working directory
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = set(np.load(tmp_path / "rank0.npy"))
    rank1 = set(np.load(tmp_path / "rank1.npy"))
    assert rank0 and rank1 and rank0.isdisjoint(rank1)
    assert len(rank0 | rank1) == len({hash(r.tobytes()) for r in pbmc.X.toarray()})
    # the DDP-trained model is saved and reloads with its weights
    loaded = scfm.model.Geneformer.load(tmp_path / "model")
    z = loaded.get_latent_representation(indices=np.arange(8), progress_bar=False)
    assert z.shape == (8, DEMO_ARCHITECTURE["hidden_size"]) and np.all(np.isfinite(z))


def test_embed_soma_reads_in_chunks_in_joinid_order(soma_uri, pbmc):
    adata = pbmc.copy()
    scfm.model.Geneformer.setup_anndata(adata, batch_key="phase")
    model = scfm.model.Geneformer(adata, **DEMO_ARCHITECTURE)
    expected = model.get_latent_representation(progress_bar=False)
    with tiledbsoma.Experiment.open(soma_uri) as exp:
        query = exp.axis_query(
            "RNA", obs_query=tiledbsoma.AxisQuery(value_filter="bulk_labels == 'CD19+ B'")
        )
        z = scfm.data.embed_soma(
            model, query, chunk_size=7, var_id_column="var_id", progress_bar=False
        )
        joinids = np.sort(query.obs_joinids().to_numpy())
    np.testing.assert_allclose(z, expected[joinids], atol=1e-5, rtol=0)
