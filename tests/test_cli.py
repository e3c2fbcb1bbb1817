"""The ``scfm`` command line: ``embed`` leaves the file untouched except its result keys."""

from __future__ import annotations

import subprocess
import sys

import anndata as ad
import numpy as np
import pytest

from conftest import fixture_dir
from scfm.cli import build_parser, get_model_class, main
from scfm.errors import InvalidInputError


def _assert_same_except(result, original, key):
    assert result.obs.equals(original.obs)
    assert result.var.equals(original.var)
    assert (result.X != original.X).nnz == 0
    assert set(result.obsm) == set(original.obsm) | {key}
    assert set(result.uns) == set(original.uns) | {"scfm"}
    assert set(result.layers) == set(original.layers)


def _h5_items(path):
    import h5py

    items = {}
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                items[name] = (obj[()], dict(obj.attrs))
            else:
                items[name] = dict(obj.attrs)

        f.visititems(visit)
    return items


@pytest.mark.parametrize("backed", [False, True])
def test_embed_writes_only_the_embedding(tmp_path, backed):
    fx = fixture_dir("geneformer")
    expected = np.load(fx / "expected.npz")
    out = tmp_path / "out.h5ad"
    code = main(
        [
            "embed",
            str(fx / "input.h5ad"),
            "--model",
            "geneformer",
            "--checkpoint",
            str(fx / "checkpoint"),
            "--output",
            str(out),
            *(["--backed"] if backed else []),
        ]
    )
    assert code == 0
    # every element of the input file is in the output, byte for byte
    before, after = _h5_items(fx / "input.h5ad"), _h5_items(out)
    for name, value in before.items():
        if name in ("obsm", "varm", "uns"):
            continue  # groups gain the result members
        if isinstance(value, tuple):
            np.testing.assert_array_equal(after[name][0], value[0], err_msg=name)
            assert str(after[name][1]) == str(value[1]), name
        else:
            assert str(after[name]) == str(value), name
    added = set(after) - set(before)
    assert all(n.startswith(("obsm/X_geneformer", "varm/X_geneformer", "uns/scfm")) for n in added)
    result = ad.read_h5ad(out)
    original = ad.read_h5ad(fx / "input.h5ad")
    _assert_same_except(result, original, "X_geneformer")
    z = result.obsm["X_geneformer"]
    order = np.argsort(expected["cell_index"])
    np.testing.assert_allclose(z, expected["cell_embeddings"][order], atol=1e-4, rtol=0)
    assert result.varm["X_geneformer"].shape[0] == result.n_vars
    assert result.uns["scfm"]["obsm"]["X_geneformer"]["model"] == "Geneformer"


def test_embed_errors_are_reported_without_traceback(tmp_path, capsys):
    fx = fixture_dir("geneformer")
    args = [
        "embed",
        str(fx / "input.h5ad"),
        "--model",
        "geneformer",
        "--output",
        str(tmp_path / "o.h5ad"),
    ]
    assert main([*args, "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*args, "--checkpoint", str(fx / "checkpoint"), "--spatial-key", "spatial"]) == 2
    assert "--spatial-key is not supported by Geneformer" in capsys.readouterr().err
    assert not (tmp_path / "o.h5ad").exists()
    with pytest.raises(SystemExit):
        build_parser().parse_args(
            ["embed", "x.h5ad", "--model", "gpt", "--checkpoint", "c", "--output", "o"]
        )
    with pytest.raises(InvalidInputError, match="Choose one of"):
        get_model_class("gpt")


def test_console_script_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "scfm.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "embed" in result.stdout and "demo" in result.stdout


def test_demo_runs_offline(tmp_path):
    from scfm.datasets import run_demo

    result = run_demo(output_dir=tmp_path, seconds=1, progress_bar=False)
    assert (tmp_path / "umap.png").stat().st_size > 10_000
    adata = result["adata"]
    assert adata.obsm["X_geneformer"].shape == (700, 64)
    assert adata.obs["leiden"].nunique() > 1
    assert -1 <= result["ari"] <= 1 and 0 <= result["nmi"] <= 1
    assert result["epochs"] >= 1 and np.isfinite(result["final_loss"])


@pytest.mark.parametrize(
    ("model", "options"),
    [
        ("scfoundation", []),
        ("cellfm", ["--option", "n_heads=4"]),
        ("sccello", []),
        ("cellplm", ["--option", "prefix=20231027_85M"]),
    ],
)
def test_embed_every_model_matches_its_fixture(tmp_path, model, options):
    fx = fixture_dir(model)
    expected = np.load(fx / "expected.npz")
    out = tmp_path / f"{model}.h5ad"
    args = ["embed", str(fx / "input.h5ad"), "--model", model, "--checkpoint"]
    assert main([*args, str(fx / "checkpoint"), "--output", str(out), *options]) == 0
    z = ad.read_h5ad(out).obsm[f"X_{model}"]
    ref = expected["cell_embeddings"]
    if "cell_index" in expected.files:
        ref = ref[np.argsort(expected["cell_index"])]
    np.testing.assert_allclose(z, ref, atol=1e-4, rtol=0)


def test_option_parsing():
    from scfm.cli import _parse_options

    assert _parse_options(["n_heads=48", "prefix=20231027_85M", "flag=True"]) == {
        "n_heads": 48,
        "prefix": "20231027_85M",
        "flag": True,
    }
    with pytest.raises(InvalidInputError, match="NAME=VALUE"):
        _parse_options(["n_heads"])


def test_cli_bad_inputs_exit_with_a_message(tmp_path, capsys):
    fx = fixture_dir("geneformer")
    ckpt = str(fx / "checkpoint")
    src = str(fx / "input.h5ad")
    cases = [
        (["embed", str(tmp_path / "missing.h5ad"), "--model", "geneformer"], "does not exist"),
        (["embed", src, "--model", "geneformer", "--output", src], "must differ"),
        (["embed", src, "--model", "cellfm", "--option", "n_heads"], "NAME=VALUE"),
        (["embed", src, "--model", "geneformer", "--layer", "counts"], "layers"),
        (["embed", src, "--model", "geneformer", "--batch-key", "donor"], "batch_key='donor'"),
    ]
    for args, message in cases:
        if "--output" not in args:
            args = [*args, "--output", str(tmp_path / "out.h5ad")]
        code = main([*args, "--checkpoint", ckpt])
        err = capsys.readouterr().err
        assert code == 2, args
        assert message in err and "Traceback" not in err, (args, err)
    assert not (tmp_path / "out.h5ad").exists()
