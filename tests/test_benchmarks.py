"""Smoke tests of the benchmark runner (benchmarks/run.py): protocol, options, output lines.

Cheap: the per-model scripts are replaced by a tiny fake that prints a RESULT line, so no
model is built here (the real runs take minutes; see benchmarks/README.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def runner(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import _common
    import run

    return run, _common


def _fake_script(tmp_path: Path, result: dict | None, exit_code: int = 0) -> Path:
    script = tmp_path / "fake_embed.py"
    lines = [
        "import sys",
        "print('args', sys.argv[1:])",
        "print('some other output')",
    ]
    if result is not None:
        lines.append(f"print('RESULT ' + {json.dumps(json.dumps(result))})")
    lines.append(f"sys.exit({exit_code})")
    # declares the shared options the runner passes on
    lines.append("# C.add_cli(parser)")
    script.write_text("\n".join(lines) + "\n")
    return script


def test_parse_result_takes_the_last_line(runner):
    _, C = runner
    out = 'x\nRESULT {"model": "a", "scfm_cells_per_s": 1}\nRESULT {"model": "b"}\n'
    assert C.parse_result(out) == {"model": "b"}
    assert C.parse_result("no result here") is None


def test_line_has_ratio_mem_ratio_pct_peak_and_baseline(runner):
    run, _ = runner
    res = {
        "model": "m",
        "scfm_cells_per_s": 4.0,
        "baseline_cells_per_s": 2.0,
        "scfm_peak_rss": 2**30,
        "baseline_peak_rss": 2 * 2**30,
        "gflop_per_s": 75.0,
        "matmul_peak_gflop_per_s": 150.0,
        "baseline": "reference",
        "max_abs_diff": 1e-6,
        "min_cosine": 1.0,
    }
    line = run.line_for("m", res)
    assert line.startswith("m ratio=2.00 mem_ratio=0.50 pct_peak=50% baseline=reference")
    assert "max_abs_diff=1.0e-06" in line
    missing = run.line_for("x", None, "(no benchmarks/x.py)")
    assert missing.startswith("x ratio=n/a mem_ratio=n/a pct_peak=n/a baseline=missing")


def test_runner_runs_scripts_and_reports_missing(runner, tmp_path, monkeypatch, capsys):
    run, _ = runner
    good = _fake_script(
        tmp_path,
        {
            "model": "fake",
            "scfm_cells_per_s": 3.0,
            "baseline_cells_per_s": 1.5,
            "scfm_peak_rss": 100,
            "baseline_peak_rss": 200,
            "gflop_per_s": 10.0,
            "matmul_peak_gflop_per_s": 100.0,
            "baseline": "mirror",
        },
    )
    bad = tmp_path / "broken_embed.py"
    bad.write_text("import sys\nprint('boom', file=sys.stderr)\nsys.exit(3)\n")
    monkeypatch.setattr(run, "HERE", tmp_path)
    monkeypatch.setattr(
        run,
        "MODELS",
        {
            "fake": (good.name, ["--variant", "V9"], "fakemodel"),
            "broken": (bad.name, [], "broken"),
            "absent": ("absent_embed.py", [], "absent"),
        },
    )
    results = run.main(
        [
            "--quick",
            "--reference-dir",
            f"fakemodel={tmp_path}",
            "--json",
            str(tmp_path / "all.json"),
        ]
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("fake ratio=2.00 mem_ratio=0.50 pct_peak=10% baseline=mirror")
    assert out[1].startswith("broken ratio=n/a") and "exit 3: boom" in out[1]
    assert out[2].startswith("absent ratio=n/a") and "baseline=missing" in out[2]
    assert [r["name"] for r in results] == ["fake"]
    assert json.loads((tmp_path / "all.json").read_text())[0]["model"] == "fake"
    cmd = run.build_command(
        "fake",
        run.main.__globals__["argparse"].Namespace(quick=True, work_dir=None, threads=2),
        {"fakemodel": str(tmp_path)},
        {},
    )
    assert cmd[:2] == [sys.executable, str(tmp_path / good.name)]
    assert cmd[2:] == [
        "--variant",
        "V9",
        "--quick",
        "--reference-dir",
        str(tmp_path),
        "--threads",
        "2",
    ]


def test_shared_helpers(runner):
    _, C = runner
    import numpy as np

    x = C.synthetic_counts(5, 50, 20, seed=0)
    assert x.shape == (5, 50) and np.all(np.diff(x.indptr) >= 18)
    assert np.all(x.data >= 1) and np.all(x.data == np.round(x.data))
    a = np.random.default_rng(0).normal(size=(4, 3))
    same = C.compare_embeddings(a, a.copy())
    assert same["max_abs_diff"] == 0 and same["min_cosine"] == pytest.approx(1)
    # one layer, one token of width 1 with FFN 1: 2*(4+2) + 4 = 16 FLOPs
    assert C.bert_flops([1], 1, 1, 1) == 16
    # 10 tokens, width 4, FFN 8: a layer is 2*10*(64+64) + 4*100*4 = 4160; a last layer read
    # at <cls> projects 10 keys and values (2*10*32) and runs one query: 2*(32+64) + 4*10*4
    assert C.bert_flops([10], 4, 8, 2) == 2 * 4160
    assert C.bert_flops([10], 4, 8, 2, cls_only_last=True) == 4160 + 640 + 352
    assert C.peak_rss_bytes() > 0


def test_bert_ceiling_weighs_each_shape_by_its_flops(monkeypatch):
    """bert_ceiling: shares and ceilings from per-shape (FLOPs, rate) pairs."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bert_ceiling

    rates = {
        "qkv": (30.0, 100.0),
        "attention output": (10.0, 100.0),
        "ffn in": (20.0, 100.0),
        "ffn out": (20.0, 100.0),
        "attention q.k": (60.0, 50.0),
        "attention p.v": (60.0, 100.0),
        "sdpa": (120.0, 80.0),
    }
    c = bert_ceiling.ceilings(rates, peak=100.0)
    assert c["attention_share"] == pytest.approx(60.0)
    # 200 FLOPs: linear 80 / 100 + 60 / 50 + 60 / 100 = 2.6 time units; with SDPA 0.8 + 1.5
    assert c["ceiling_gemm"] == pytest.approx(100 * 200 / 2.6 / 100)
    assert c["ceiling_sdpa"] == pytest.approx(100 * 200 / 2.3 / 100)
    small = bert_ceiling.layer_rates(tokens=16, hidden=8, heads=2, ffn=16)
    assert set(small) == set(rates) and all(f > 0 and r > 0 for f, r in small.values())
    assert small["sdpa"][0] == small["attention q.k"][0] + small["attention p.v"][0]


def test_cellfm_flops_count_the_cls_only_last_layer(monkeypatch):
    """cellfm_flops: with the cells given, the last layer counts k/v (and their states) for
    every token but the six other projections for one token per cell."""
    monkeypatch.syspath_prepend(str(BENCH))
    import cellfm_embed as F

    d, h = F.D, F.D // F.HEADS
    layer = 2 * 8 * d * d + 4 * d * h
    full = F.cellfm_flops(1000.0)
    cls = F.cellfm_flops(1000.0, cells=2)
    skipped = 1000 * (layer - 4 * d * d - 2 * d * h)  # all but k, v and the states
    assert full - cls == pytest.approx(skipped - 2 * (12 * d * d + 2 * d * h))
