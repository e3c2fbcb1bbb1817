"""The ``scfm`` command line: fast help, shell-style errors, files that are never lost."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from conftest import fixture_dir
from scfm.cli import build_parser, check_key_added, get_model_class, main, shell_message
from scfm.errors import InvalidInputError

HEAVY = ("torch", "scvi", "scanpy", "lightning", "anndata", "sklearn")


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scfm.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# --------------------------------------------------------------------------- parsing
def test_help_is_fast_and_imports_nothing_heavy():
    """`scfm --help` and every subcommand's --help: < 2 s, no torch / scvi / scanpy."""
    code = f"""
import sys, time, io, contextlib
t = time.perf_counter()
from scfm.cli import build_parser
parser = build_parser()
names = parser._subparsers._group_actions[0].choices
for argv in (["--help"], *[[name, "--help"] for name in names]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(argv)
        except SystemExit:
            pass
print(time.perf_counter() - t)
print(",".join(m for m in {HEAVY!r} if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    seconds, heavy = result.stdout.splitlines()
    assert heavy == "", f"imported at parse time: {heavy}"
    assert float(seconds) < 2.0
    # the real console entry point, interpreter start-up included (generous on a busy machine)
    for args in (["--help"], ["embed", "--help"], ["demo", "--help"]):
        done = _run(*args)
        assert done.returncode == 0 and "usage: scfm" in done.stdout, done.stderr


def test_import_scfm_is_lazy_but_complete():
    code = (
        "import sys, scfm; before = 'torch' in sys.modules; cls = scfm.model.Geneformer; "
        "print(before, cls.__name__, 'torch' in sys.modules, scfm.datasets.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["False", "Geneformer", "True", "scfm.datasets"], out.stderr
    import scfm

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        scfm.nope  # noqa: B018
    assert {"model", "tl", "pl", "datasets"} <= set(dir(scfm))


def test_version_defaults_and_model_names():
    from importlib.metadata import version

    done = _run("--version")
    assert done.stdout.strip() == f"scfm {version('scfm')}"
    parser = build_parser()
    args = parser.parse_args(
        ["embed", "x.h5ad", "--model", "GeneFormer", "--checkpoint", "c", "--output", "o.h5ad"]
    )
    assert args.model == "geneformer"
    assert get_model_class("CellPLM").__name__ == "CellPLM"
    with pytest.raises(InvalidInputError, match="Choose one of"):
        get_model_class("gpt")
    demo_help = parser._subparsers._group_actions[0].choices["demo"].format_help()
    assert "(default: 60.0)" in demo_help and "(default: scfm_demo)" in demo_help


@pytest.mark.parametrize(
    "argv",
    [
        ["-v", "demo", "--seconds", "5"],
        ["demo", "-v", "--seconds", "5"],
        ["demo", "--seconds", "5", "-v"],
    ],
)
def test_global_flags_before_or_after_the_command(argv):
    args = build_parser().parse_args(argv)
    assert args.verbose == 1 and args.seconds == 5.0 and args.quiet is False


def test_unknown_model_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(
            ["embed", "x", "--model", "gpt", "--checkpoint", "c", "--output", "o"]
        )
    assert exit_info.value.code == 2
    assert "invalid choice: 'gpt'" in capsys.readouterr().err


def test_library_errors_are_rephrased_for_the_shell():
    cases = {
        "layer='counts' is not in adata.layers (layers: none). Pass the name of the layer "
        "that holds raw counts, or layer=None for adata.X.": (
            ["--layer counts", "no --layer", "for X"],
            ["layer=", "adata."],
        ),
        "adata.X contains non-integer values (e.g. 0.75): it looks normalised. Use the raw "
        "counts (setup_anndata(adata, layer='counts'); keep a copy before "
        "sc.pp.normalize_total / sc.pp.log1p). Non-integer count estimates are accepted with "
        "setup_anndata(..., allow_non_integer=True).": (
            ["(--layer counts)", "accepted with --allow-non-integer"],
            ["setup_anndata", "sc.pp", "layer="],
        ),
        "adata.X contains negative values: it looks scaled. Use the raw counts "
        "(setup_anndata(adata, layer='counts'), or adata.raw.to_adata() if raw holds "
        "counts).": (["--layer counts", "file's .raw holds"], ["to_adata", "setup_anndata"]),
        "The head count is not stored in CellFM checkpoints. Pass n_heads=<number of heads>.": (
            ["--option n_heads=<number of heads>"],
            ["Pass n_heads"],
        ),
        "0 of 300 genes in adata.var_names match. Pass gene_id_key='<column of adata.var with "
        "gene symbol ids>' to setup_anndata, or map Ensembl ids with "
        "scfm.data.map_gene_ids(adata.var_names, to='symbol').": (
            ["the var names", "--gene-id-key <column of var with gene symbol ids>,"],
            ["setup_anndata", "--option to="],
        ),
        "For a targeted panel that really is this small, pass "
        "setup_anndata(..., check_gene_overlap=False).": (["--allow-small-gene-overlap"], ["("]),
        "2 cells have no expression in genes of the scFoundation gene list. Remove them "
        "(e.g. keep cells with counts > 0 in the matched genes: "
        "adata[adata[:, matched_genes].X.sum(1) > 0]).": ([], ["matched_genes", "adata["]),
        "pooling='nope': use 'cls' or 'mean'.": (["--embed-option pooling=nope"], []),
        "batch_key='donor' is not a column of adata.obs.": (["--batch-key donor"], []),
    }
    for message, (present, absent) in cases.items():
        text = shell_message(message)
        for part in present:
            assert part in text, (part, text)
        for part in absent:
            assert part not in text, (part, text)


# --------------------------------------------------------------------------- file safety
@pytest.fixture
def gf():
    fx = fixture_dir("geneformer")
    return {"input": str(fx / "input.h5ad"), "checkpoint": str(fx / "checkpoint")}


def _embed_args(gf, output, *extra):
    return [
        "embed",
        gf["input"],
        "--model",
        "geneformer",
        "--checkpoint",
        gf["checkpoint"],
        "--output",
        str(output),
        *extra,
    ]


def test_output_problems_exit_2_before_any_work(tmp_path, gf, capsys, monkeypatch):
    import scfm.cli

    def no_work(*args, **kwargs):  # the model must never be looked up
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr(scfm.cli, "get_model_class", no_work)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    existing = tmp_path / "existing.h5ad"
    existing.write_bytes(b"keep me")
    text = tmp_path / "counts.csv"
    text.write_text("gene,cell\n1,2\n")
    zarr = tmp_path / "counts.zarr"
    zarr.mkdir()
    embedded = tmp_path / "embedded.h5ad"
    with_key = ad.read_h5ad(gf["input"])
    with_key.obsm["X_geneformer"] = np.zeros((with_key.n_obs, 2), dtype=np.float32)
    with_key.write_h5ad(embedded)
    cases = [
        (_embed_args(gf, tmp_path / "missing" / "o.h5ad"), "does not exist; create it"),
        (_embed_args(gf, tmp_path / "a_file" / "o.h5ad"), "is a file, not a directory"),
        (_embed_args(gf, tmp_path / "a_dir"), "is a directory"),
        (_embed_args(gf, existing), "already exists. Pass --overwrite"),
        (_embed_args(gf, gf["input"], "--overwrite"), "must differ from INPUT"),
        (_embed_args(gf, tmp_path / "o.h5ad", "--key-added", "X/geneformer"), "without '/'"),
        (_embed_args(gf, tmp_path / "o.h5ad", "--key-added", ""), "not a valid key"),
        (
            _embed_args(gf, tmp_path / "o.h5ad", "--layer", "counts"),
            "--layer counts: INPUT has no layer 'counts'",
        ),
        (
            _embed_args(gf, tmp_path / "o.h5ad", "--batch-key", "donor"),
            "--batch-key donor: INPUT has no obs column 'donor' (available: batch, cell_type)",
        ),
        (_embed_args(gf, tmp_path / "o.h5ad", "--option", "n_heads"), "NAME=VALUE"),
        (_embed_args(gf, tmp_path / "o.h5ad", "--batch-size", "0"), "--batch-size must be"),
        (
            _embed_args({"input": str(embedded), "checkpoint": "c"}, tmp_path / "o.h5ad"),
            "INPUT already has .obsm['X_geneformer']. Choose another name with --key-added",
        ),
        (
            _embed_args({"input": str(text), "checkpoint": "c"}, tmp_path / "o.h5ad"),
            "is not an .h5ad (HDF5) file",
        ),
        (
            _embed_args({"input": str(zarr), "checkpoint": "c"}, tmp_path / "o.h5ad"),
            "is a directory, not an .h5ad file (a .zarr store?",
        ),
        (
            _embed_args(
                {"input": str(tmp_path / "nope.h5ad"), "checkpoint": "c"}, tmp_path / "o.h5ad"
            ),
            "does not exist",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
        assert err.startswith("scfm embed: error: "), err
    assert existing.read_bytes() == b"keep me"
    assert (
        _leftovers(
            tmp_path,
            {"a_file", "a_dir", "existing.h5ad", "counts.csv", "counts.zarr", "embedded.h5ad"},
        )
        == []
    )


def test_hdf5_that_is_not_anndata_is_refused(tmp_path, capsys):
    import h5py

    path = tmp_path / "weights.h5"
    with h5py.File(path, "w") as f:
        f["w"] = np.zeros(3)
    code = main(_embed_args({"input": str(path), "checkpoint": "c"}, tmp_path / "o.h5ad"))
    assert code == 2
    assert "not an AnnData .h5ad" in capsys.readouterr().err


def test_failures_after_the_work_leave_no_file(tmp_path, gf, capsys, monkeypatch):
    import scfm.cli

    out = tmp_path / "o.h5ad"
    # the checkpoint does not exist: a typed error, exit 2, nothing written
    argv = [
        *_embed_args(gf, out)[:-4],
        "--checkpoint",
        str(tmp_path / "nope"),
        "--output",
        str(out),
    ]
    assert main(argv) == 2
    assert "does not exist" in capsys.readouterr().err

    # a crash while writing: the temporary file is removed and OUTPUT never appears
    def broken(path, *args):
        assert Path(path).parent == tmp_path and Path(path).name.startswith(".o.h5ad.")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(scfm.cli, "_write_results", broken)
    with pytest.raises(OSError, match="No space left"):
        main(_embed_args(gf, out))
    assert _leftovers(tmp_path, set()) == []


def test_atomic_output_never_clobbers_a_file_that_appeared(tmp_path):
    from scfm.cli import CommandLineError, atomic_output

    out = tmp_path / "o.h5ad"
    with pytest.raises(CommandLineError, match="appeared while scfm was running"):
        with atomic_output(out, overwrite=False) as tmp:
            tmp.write_text("new")
            out.write_text("someone else's")
    assert out.read_text() == "someone else's"
    with atomic_output(out, overwrite=True) as tmp:
        tmp.write_text("new")
    assert out.read_text() == "new"
    assert oct(out.stat().st_mode & 0o777) != oct(0o600)  # usual permissions, not mkstemp's
    assert _leftovers(tmp_path, {"o.h5ad"}) == []


def test_key_added_validation():
    assert check_key_added("X_geneformer_v2") == "X_geneformer_v2"
    for bad in ("a/b", "", " X", "..", "X "):
        with pytest.raises(InvalidInputError):
            check_key_added(bad)


# --------------------------------------------------------------------------- real runs
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
def test_embed_writes_only_the_embedding_and_the_gene_match(tmp_path, gf, backed, capsys):
    fx = fixture_dir("geneformer")
    expected = np.load(fx / "expected.npz")
    out = tmp_path / "out.h5ad"
    extra = ["--backed"] if backed else ["--gene-embeddings", "-q"]
    assert main([*_embed_args(gf, out), *extra]) == 0
    assert "wrote .obsm['X_geneformer'] (64 x" in capsys.readouterr().out
    before, after = _h5_items(gf["input"]), _h5_items(out)
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
    order = np.argsort(expected["cell_index"])
    np.testing.assert_allclose(
        result.obsm["X_geneformer"], expected["cell_embeddings"][order], atol=1e-4, rtol=0
    )
    assert ("X_geneformer" in result.varm) is not backed
    record = result.uns["scfm"]
    assert record["obsm"]["X_geneformer"]["model"] == "Geneformer"
    match = record["gene_alignment"]["geneformer"]
    assert 0 < match["n_matched"] <= result.n_vars
    assert _leftovers(tmp_path, {"out.h5ad"}) == []
    # a second run refuses to overwrite; --overwrite replaces atomically
    assert main(_embed_args(gf, out)) == 2
    assert main([*_embed_args(gf, out), "--overwrite", "--key-added", "X_again", "-q"]) == 0
    assert set(ad.read_h5ad(out).obsm) == {"X_again"}


def test_cellplm_never_uses_a_batch_column_it_was_not_given(tmp_path, capsys):
    fx = fixture_dir("cellplm")
    src = tmp_path / "in.h5ad"
    adata = ad.read_h5ad(fx / "input.h5ad")
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) % 2 == 0, "s1", "s2")
    adata.write_h5ad(src)
    base = [
        "embed",
        str(src),
        "--model",
        "CellPLM",
        "--checkpoint",
        str(fx / "checkpoint"),
        "--option",
        "prefix=20231027_85M",
        "-q",
    ]
    assert main([*base, "--output", str(tmp_path / "one.h5ad")]) == 0
    err = capsys.readouterr().err
    assert "INPUT has .obs['batch'] but --batch-key was not given" in err
    assert main([*base, "--output", str(tmp_path / "two.h5ad"), "--batch-key", "batch"]) == 0
    one = ad.read_h5ad(tmp_path / "one.h5ad").obsm["X_cellplm"]
    two = ad.read_h5ad(tmp_path / "two.h5ad").obsm["X_cellplm"]
    assert not np.allclose(one, two)  # the sentences differ, so do the embeddings


@pytest.mark.parametrize(
    ("model", "options"),
    [
        ("ScFoundation", []),
        ("CELLFM", ["--option", "n_heads=4"]),
        ("sccello", []),
        # the reference embeds each obs["batch"] group as one sentence
        ("cellplm", ["--option", "prefix=20231027_85M", "--batch-key", "batch"]),
    ],
)
def test_embed_every_model_matches_its_fixture(tmp_path, model, options):
    fx = fixture_dir(model.lower())
    expected = np.load(fx / "expected.npz")
    out = tmp_path / f"{model}.h5ad"
    args = ["embed", str(fx / "input.h5ad"), "--model", model, "--checkpoint"]
    assert main([*args, str(fx / "checkpoint"), "--output", str(out), "-q", *options]) == 0
    result = ad.read_h5ad(out)
    z = result.obsm[f"X_{model.lower()}"]
    ref = expected["cell_embeddings"]
    if "cell_index" in expected.files:
        ref = ref[np.argsort(expected["cell_index"])]
    np.testing.assert_allclose(z, ref, atol=1e-4, rtol=0)
    assert model.lower() in result.uns["scfm"]["gene_alignment"]


def test_option_parsing():
    from scfm.cli import _parse_options

    assert _parse_options(
        ["n_heads=48", "prefix=20231027_85M", "flag=True", "hidden-layer=-1"]
    ) == {
        "n_heads": 48,
        "prefix": "20231027_85M",
        "flag": True,
        "hidden_layer": -1,
    }
    with pytest.raises(InvalidInputError, match="NAME=VALUE"):
        _parse_options(["n_heads"])


def test_demo_reports_the_pca_baseline_and_saves_both_umaps(tmp_path, monkeypatch, capsys):
    """A short run (the default budget is 60 s): every number is there, nothing stray."""
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--seconds", "3", "--output-dir", "out", "-q"]) == 0
    report = capsys.readouterr().out
    for part in (
        "PCA of log-normalised counts",
        "scfm demo model",
        "ARI",
        "NMI",
        "held-out",
        "masked-gene loss",
        "out/umap.png",
    ):
        assert part in report, (part, report)
    assert (tmp_path / "out" / "umap.png").stat().st_size > 20_000
    assert _leftovers(tmp_path, {"out"}) == []  # no lightning_logs or checkpoints
    assert _leftovers(tmp_path / "out", set()) == ["umap.png"]


def test_demo_verdict_is_plain_about_the_baseline():
    from scfm.datasets._demo import format_report

    def result(own_ari, own_transfer):
        return {
            "scores": {
                "pca": {"ari": 0.51, "nmi": 0.65, "n_clusters": 10, "transfer_accuracy": 0.81},
                "scfm": {
                    "ari": own_ari,
                    "nmi": 0.6,
                    "n_clusters": 9,
                    "transfer_accuracy": own_transfer,
                },
            },
            "steps": 900,
            "max_steps": 1000,
            "train_seconds": 60.2,
            "first_loss": 6.5,
            "final_loss": 5.1,
            "n_held_out": 175,
            "umap_png": "scfm_demo/umap.png",
        }

    from scfm.datasets._demo import _verdict

    for own_ari, own_transfer, words in [
        (0.55, 0.80, "match PCA's"),
        (0.40, 0.85, "stay below PCA's (ARI 0.40 vs 0.51)"),
    ]:
        r = result(own_ari, own_transfer)
        r["verdict"] = _verdict(r)
        assert words in r["verdict"]
        text = format_report(r)
        assert "900 steps in 60 s" in text and "0.51" in text and words in text
    assert "label transfer works as well as with PCA (85% vs 81%" in _verdict(result(0.4, 0.85))
    assert "label transfer is less accurate than with PCA (50% vs 81%" in _verdict(result(0.4, 0.5))
    assert "ended after 900 of 1000 steps" in _verdict(result(0.4, 0.5))  # time ran out
