"""One benchmark runner: every model's embedding at release size, scfm vs the reference.

Runs each per-model script of this folder (each in its own processes; protocol in
``benchmarks/README.md``), reads its final ``RESULT {json}`` line and prints one line per
model::

    MODEL ratio=<scfm cells/s / baseline cells/s> mem_ratio=<scfm peak RSS / baseline>
          pct_peak=<scfm GFLOP/s / float32 matmul peak> baseline=reference|mirror|none

The baseline is the reference code run from a checkout given with
``--reference-dir MODEL=PATH`` (its interpreter: ``PATH/.venv/bin/python`` or
``--reference-python MODEL=PYTHON``), else a mirror of the reference path written here
(``baseline=mirror``). ``pct_peak`` counts the FLOPs of the work the model must do (no padding).

    python benchmarks/run.py --quick
    python benchmarks/run.py --reference-dir geneformer=~/src/Geneformer \\
        --reference-dir cellplm=~/src/CellPLM --models geneformer-V1 cellplm
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

HERE = C.BENCH_DIR

#: Options passed in --quick mode to scripts that have them but no ``--quick``.
QUICK_FALLBACK = {"--n-cells": "3", "--no-bf16": True}
#: name -> (script, extra arguments, reference key for --reference-dir)
MODELS: dict[str, tuple[str, list[str], str]] = {
    "geneformer-V1": ("geneformer_embed.py", ["--variant", "V1"], "geneformer"),
    "geneformer-V2": ("geneformer_embed.py", ["--variant", "V2"], "geneformer"),
    "scfoundation": ("scfoundation_embed.py", [], "scfoundation"),
    "cellfm": ("cellfm_embed.py", [], "cellfm"),
    "sccello": ("sccello_embed.py", [], "sccello"),
    "cellplm": ("cellplm_embed.py", [], "cellplm"),
    "cellplm-sentences": ("cellplm_embed.py", ["--sentences", "200"], "cellplm"),
    "geneformer-perturb": ("geneformer_perturbation.py", [], "geneformer"),
}


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        key, sep, path = v.partition("=")
        if not sep or not path:
            raise SystemExit(f"{what} takes MODEL=PATH, got {v!r}")
        out[key.strip().lower()] = str(Path(path).expanduser())
    return out


#: Calls that give a script all the shared options of ``_common.add_cli``.
SHARED_CLI = ("C.add_cli(", "C.embedding_main(")


def _supports(script: Path, option: str) -> bool:
    """Whether ``script`` declares ``option`` (read from its source: no import needed)."""
    text = script.read_text()
    return f'"{option}"' in text or any(call in text for call in SHARED_CLI)


def build_command(name: str, args, refs: dict[str, str], pythons: dict[str, str]) -> list[str]:
    script, extra, key = MODELS[name]
    path = HERE / script
    cmd = [sys.executable, str(path), *extra]
    wanted = {
        "--quick": args.quick,
        "--reference-dir": refs.get(key) or refs.get(name.lower()),
        "--reference-python": pythons.get(key) or pythons.get(name.lower()),
        "--work-dir": args.work_dir,
        "--threads": args.threads,
    }
    for option, value in wanted.items():
        if value and _supports(path, option):
            cmd += [option] if value is True else [option, str(value)]
    if args.quick and "--quick" not in cmd:
        for option, value in QUICK_FALLBACK.items():
            if f'"{option}"' in path.read_text():
                cmd += [option] if value is True else [option, str(value)]
    return cmd


def _fmt(x: float | None, pattern: str) -> str:
    return "n/a" if x is None or not math.isfinite(x) else pattern.format(x)


def line_for(name: str, res: dict | None, note: str = "") -> str:
    """The one output line of a model."""
    if res is None:
        return f"{name} ratio=n/a mem_ratio=n/a pct_peak=n/a baseline=missing {note}".rstrip()
    s, b = res.get("scfm_cells_per_s"), res.get("baseline_cells_per_s")
    sm, bm = res.get("scfm_peak_rss"), res.get("baseline_peak_rss")
    g, p = res.get("gflop_per_s"), res.get("matmul_peak_gflop_per_s")
    ratio = s / b if s and b else res.get("parsed_ratio")
    pct = 100 * g / p if g and p else res.get("parsed_pct_peak")
    parts = [
        name,
        "ratio=" + _fmt(ratio, "{:.2f}"),
        "mem_ratio=" + _fmt(sm / bm if sm and bm else None, "{:.2f}"),
        "pct_peak=" + _fmt(pct, "{:.0f}%"),
        f"baseline={res.get('baseline') or 'none'}",
    ]
    if s:
        parts.append(f"scfm_cells_per_s={s:.3g}")
    if sm:
        parts.append(f"scfm_peak_rss={sm / 2**30:.2f}GiB")
    if isinstance(res.get("max_abs_diff"), (int, float)):
        parts.append(f"max_abs_diff={res['max_abs_diff']:.1e}")
    if isinstance(res.get("min_cosine"), (int, float)):
        parts.append(f"min_cosine={res['min_cosine']:.10f}")
    for k in ("scfm_error", "baseline_error"):
        if res.get(k):
            parts.append(f"{k}={json.dumps(str(res[k]).splitlines()[-1][:160])}")
    if note:
        parts.append(note)
    return " ".join(parts)


def parse_text(stdout: str) -> dict | None:
    """Fallback for scripts without a RESULT line: ``ratio ...: 2.1x`` and ``scfm ... (N% of
    peak)`` lines (the first of each), labelled as a mirror baseline."""
    ratio = re.search(r"^ratio[^:\n]*:\s*([0-9.]+)x", stdout, re.M)
    pct = re.search(
        r"^scfm[^\n]*?\(([0-9.]+)% of (?:the )?(?:float32 )?(?:matmul )?peak", stdout, re.M
    )
    if ratio is None and pct is None:
        return None
    return {
        "baseline": "mirror",
        "parsed_ratio": float(ratio.group(1)) if ratio else None,
        "parsed_pct_peak": float(pct.group(1)) if pct else None,
    }


def run_model(
    name: str, cmd: list[str], timeout: float, log: Path | None
) -> tuple[dict | None, str]:
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None, f"(timed out after {timeout:.0f} s)"
    if log is not None:
        with open(log, "a") as fh:
            fh.write(f"### {name}: {' '.join(cmd)} ({time.perf_counter() - start:.0f} s)\n")
            fh.write(proc.stdout + proc.stderr + "\n")
    res = C.parse_result(proc.stdout)
    if res is not None:
        return res, ""
    parsed = parse_text(proc.stdout) if proc.returncode == 0 else None
    if parsed is not None:
        return parsed, "(no RESULT line: ratio/pct_peak parsed from the text output)"
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
    return None, f"(no RESULT line; exit {proc.returncode}: {tail[0][:160]})"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small cell counts (< 10 min)")
    parser.add_argument(
        "--reference-dir",
        action="append",
        default=[],
        metavar="MODEL=PATH",
        help="reference checkout per model (geneformer, sccello, cellplm, ...)",
    )
    parser.add_argument(
        "--reference-python",
        action="append",
        default=[],
        metavar="MODEL=PY",
        help="interpreter for a reference (default PATH/.venv/bin/python)",
    )
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None)
    parser.add_argument("--work-dir", help="where release files and inputs are written")
    parser.add_argument("--threads", type=int, help="torch threads per worker")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per model")
    parser.add_argument("--json", help="also write all RESULT dicts to this file")
    parser.add_argument("--log", help="append every script's full output to this file")
    args = parser.parse_args(argv)
    refs = _pairs(args.reference_dir, "--reference-dir")
    pythons = _pairs(args.reference_python, "--reference-python")
    timeout = args.timeout or (300 if args.quick else 3600)
    names = args.models or list(MODELS)
    results = []
    for name in names:
        script = HERE / MODELS[name][0]
        if not script.exists():
            print(line_for(name, None, f"(no benchmarks/{script.name})"), flush=True)
            continue
        cmd = build_command(name, args, refs, pythons)
        res, note = run_model(name, cmd, timeout, Path(args.log) if args.log else None)
        if res is not None:
            res = {**res, "name": name}
            results.append(res)
        try:
            line = line_for(name, res, note)
        except (TypeError, ValueError, ZeroDivisionError) as err:  # a malformed RESULT
            line = line_for(name, None, f"(unreadable RESULT: {err})")
        print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
