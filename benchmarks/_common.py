"""Shared helpers of the benchmark scripts: timing, peak memory, matmul peak, result protocol.

Every per-model benchmark (``benchmarks/<model>_embed.py``) runs each side (scfm, the
reference code from a checkout, or a mirror of the reference path written here) in its own
process and ends with ONE line ``RESULT {json}`` (see ``benchmarks/README.md``), which
``benchmarks/run.py`` parses. This module imports only the standard library at import time,
so reference adapters running in another virtual environment can use it too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Prefix of the one machine-readable line each per-model script prints last.
RESULT_PREFIX = "RESULT "
#: Keys every RESULT line carries (values may be None where a side could not run).
RESULT_KEYS = (
    "model",
    "scfm_cells_per_s",
    "baseline_cells_per_s",
    "scfm_peak_rss",
    "baseline_peak_rss",
    "gflop_per_s",
    "matmul_peak_gflop_per_s",
    "baseline",
)
BENCH_DIR = Path(__file__).resolve().parent


def peak_rss_bytes() -> int:
    """Peak resident set size of this process image (``VmHWM``), in bytes.

    ``VmHWM`` is reset by ``exec``, unlike ``ru_maxrss``, which a child started by
    ``subprocess`` inherits from its parent's high-water mark on Linux.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def matmul_peak_gflops(n: int = 1536, repeats: int = 4, trials: int = 3) -> float:
    """Best float32 ``n x n`` matmul rate of this process (threads as configured), GFLOP/s."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9)
    return best


class Timer:
    """``with Timer() as t: ...``; ``t.seconds`` afterwards."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = float("nan")
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def set_threads(n: int | None) -> int:
    """Use ``n`` torch threads (default: ``SCFM_BENCH_THREADS`` or all cores); return it."""
    import torch

    n = n or int(os.environ.get("SCFM_BENCH_THREADS", "0")) or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def worker_report(**fields: Any) -> None:
    """Print the worker's JSON line (its own peak RSS and matmul peak are added)."""
    fields.setdefault("peak_rss", peak_rss_bytes())
    print(RESULT_PREFIX + json.dumps(fields), flush=True)


def scfm_embedding_worker(
    args: Any,
    model_class: str,
    *,
    setup: dict[str, Any] | None = None,
    load: dict[str, Any] | None = None,
) -> None:
    """The scfm side of an embedding benchmark, the same for every model.

    Reads ``args.data``, registers it with ``scfm.model.<model_class>`` (``setup``: extra
    ``setup_anndata`` arguments), loads the release ``args.release`` (``load``: extra
    ``from_pretrained`` arguments; loading is not timed), times ``get_latent_representation``
    (``args.batch_size``), saves the embedding to ``args.out`` and reports.
    """
    import anndata as ad
    import numpy as np

    import scfm

    set_threads(args.threads)
    adata = ad.read_h5ad(args.data)
    cls = getattr(scfm.model, model_class)
    cls.setup_anndata(adata, **(setup or {}))
    model = cls.from_pretrained(args.release, adata, **(load or {}))
    peak = matmul_peak_gflops()
    with Timer() as t:
        z = model.get_latent_representation(batch_size=args.batch_size, progress_bar=False)
    np.save(args.out, np.asarray(z, dtype=np.float32))
    # the machine may be shared: the higher of the rates before and after the timed call
    peak = max(peak, matmul_peak_gflops())
    worker_report(cells=adata.n_obs, seconds=t.seconds, matmul_gflops=peak)


def emit_result(**fields: Any) -> None:
    """Print a per-model script's final ``RESULT {json}`` line (all RESULT_KEYS present)."""
    out = {k: fields.pop(k, None) for k in RESULT_KEYS}
    out.update(fields)
    print(RESULT_PREFIX + json.dumps(out), flush=True)


def parse_result(stdout: str) -> dict | None:
    """The last ``RESULT {json}`` line of ``stdout`` as a dict, or None."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            try:
                return json.loads(line[len(RESULT_PREFIX) :])
            except json.JSONDecodeError:
                return None
    return None


def run_worker(
    argv: Sequence[str],
    *,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    nice: int = 10,
) -> dict:
    """Run a worker process (lowered priority) and return its RESULT dict.

    On failure the dict is ``{"error": <last stderr lines>}``.
    """
    cmd = ["nice", "-n", str(nice), *argv] if nice else list(argv)
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("TOKENIZERS_PARALLELISM", "false")
    full_env.setdefault("TQDM_DISABLE", "1")
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=full_env, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    result = parse_result(proc.stdout)
    if proc.returncode != 0 or result is None:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        return {"error": f"exit {proc.returncode}: {tail}"}
    return result


def reference_python(reference_dir: str | os.PathLike | None, explicit: str | None = None) -> str:
    """Interpreter for reference code: ``explicit``, else ``<checkout>/.venv/bin/python``."""
    if explicit:
        return explicit
    if reference_dir is not None:
        cand = Path(reference_dir) / ".venv" / "bin" / "python"
        if cand.exists():
            return str(cand)
    return sys.executable


def work_dir(path: str | os.PathLike | None = None) -> Path:
    """Directory of the generated release checkpoints and inputs (kept between runs)."""
    root = Path(path or os.environ.get("SCFM_BENCH_DIR") or "/tmp/scfm-bench")
    root.mkdir(parents=True, exist_ok=True)
    return root


def build_once(target: Path, build) -> Path:
    """Create ``target`` (file or directory) with ``build(tmp_path)`` unless it exists.

    Built under a temporary name and renamed, so concurrent runs never see half a file.
    """
    import shutil

    target = Path(target)
    if target.exists():
        return target
    tmp = target.with_name(f".{target.stem}.tmp{os.getpid()}{target.suffix}")
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another run finished first
            pass
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return target


def out_file(work: Path, name: str) -> Path:
    """A per-run output path (the pid keeps concurrent runs apart)."""
    return work / f"{name}.{os.getpid()}.npy"


def synthetic_counts(
    n_cells: int, n_genes: int, n_expressed: int, seed: int = 0, spread: float = 0.1
):
    """CSR float32 raw counts with ``n_expressed * (1 +- spread)`` non-zero genes per cell."""
    import numpy as np
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    indptr, indices, data = [0], [], []
    for _ in range(n_cells):
        k = int(min(n_genes, max(1, round(n_expressed * rng.uniform(1 - spread, 1 + spread)))))
        cols = np.sort(rng.choice(n_genes, size=k, replace=False))
        indices.append(cols)
        # heavy-tailed integer counts with few ties after normalisation
        data.append(np.floor(rng.lognormal(0.6, 1.0, size=k)) + 1)
        indptr.append(indptr[-1] + k)
    return sp.csr_matrix(
        (np.concatenate(data).astype(np.float32), np.concatenate(indices), np.array(indptr)),
        shape=(n_cells, n_genes),
    )


def random_tensor(shape: Sequence[int], name: str, generator, fan_in: int | None = None):
    """A random float32 weight for a release file: LayerNorm-like vectors near 1, biases small."""
    import torch

    shape = tuple(int(s) for s in shape)
    lowered = name.lower()
    if len(shape) == 1 and any(
        t in lowered for t in ("layernorm.weight", "norm.weight", "gamma", "norm1.weight")
    ):
        return 1 + 0.05 * torch.randn(shape, generator=generator)
    if len(shape) == 1 or "bias" in lowered or "beta" in lowered:
        return 0.02 * torch.randn(shape, generator=generator)
    std = 1.0 / max(1, fan_in or shape[-1]) ** 0.5
    return std * torch.randn(shape, generator=generator)


def bert_flops(lengths, hidden: int, ffn: int, layers: int, cls_only_last: bool = False) -> float:
    """Matmul FLOPs of a BERT encoder over unpadded sequences of the given lengths.

    ``cls_only_last``: the last layer is read at ``<cls>`` only, so it projects keys and
    values of every token but runs the query, attention, output and MLP for one token.
    """
    import numpy as np

    n = np.asarray(lengths, dtype=np.float64)
    per_layer = 2 * n * (4 * hidden * hidden + 2 * hidden * ffn) + 2 * 2 * n**2 * hidden
    total = per_layer.sum() * layers
    if cls_only_last and layers:
        one_token = 2 * (2 * hidden * hidden + 2 * hidden * ffn) + 2 * 2 * n * hidden
        total += (2 * n * 2 * hidden * hidden + one_token - per_layer).sum()
    return float(total)


def add_cli(parser, reference_help: str) -> None:
    """The options every per-model script shares (driver and hidden worker options)."""
    parser.add_argument("--cells", type=int, help="cells to embed (default: release-size run)")
    parser.add_argument("--quick", action="store_true", help="fewer cells")
    parser.add_argument("--batch-size", type=int, default=None, help="scfm batch size")
    parser.add_argument("--reference-dir", help=reference_help)
    parser.add_argument("--reference-python", help="interpreter for the reference code")
    parser.add_argument("--work-dir", help="where release files and inputs are written")
    parser.add_argument("--threads", type=int, help="torch threads per worker")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--worker", choices=["scfm", "reference", "mirror"], help="(internal)")
    for a in ("--release", "--data", "--out"):
        parser.add_argument(a, help="(internal)")


def run_worker_if_asked(args, **workers) -> bool:
    """In a worker process (``--worker SIDE``), run ``workers[SIDE](args)`` and return True."""
    if not args.worker:
        return False
    workers[args.worker](args)
    return True


def run_sides(script: str, name: str, args, common: list[str]) -> tuple[dict, dict, str, dict]:
    """Run the scfm worker then the baseline worker (reference or mirror) of ``script``.

    Returns both reports, the baseline kind and the embedding comparison (both sides save
    their embeddings; the files are removed afterwards).
    """
    import numpy as np

    work = work_dir(args.work_dir)
    if args.threads:
        common = [*common, "--threads", str(args.threads)]
    out_s = out_file(work, f"z-{name}-scfm")
    s_argv = [sys.executable, script, "--worker", "scfm", *common, "--out", str(out_s)]
    if args.batch_size:
        s_argv += ["--batch-size", str(args.batch_size)]
    scfm = run_worker(s_argv, timeout=args.timeout)
    kind = "reference" if args.reference_dir else "mirror"
    out_b = out_file(work, f"z-{name}-{kind}")
    if args.skip_baseline:
        base: dict = {"error": "skipped"}
    else:
        py = sys.executable
        if args.reference_dir:
            py = reference_python(args.reference_dir, args.reference_python)
        b_argv = [py, script, "--worker", kind, *common, "--out", str(out_b)]
        if args.reference_dir:
            b_argv += ["--reference-dir", args.reference_dir]
        base = run_worker(b_argv, timeout=args.timeout)
    cmp: dict = {}
    if "error" not in scfm and "error" not in base:
        cmp = compare_embeddings(np.load(out_s), np.load(out_b))
    for f in (out_s, out_b):
        f.unlink(missing_ok=True)
    return scfm, base, kind, cmp


def compare_embeddings(a, b) -> dict:
    """Max abs difference and smallest per-row cosine of two embedding matrices."""
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return {"shape_scfm": list(a.shape), "shape_baseline": list(b.shape)}
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-300)
    return {"max_abs_diff": float(np.abs(a - b).max()), "min_cosine": float(cos.min())}


def summarise(
    model: str,
    scfm: dict,
    baseline: dict,
    baseline_kind: str,
    flops: float | None,
    extra: dict | None = None,
) -> dict:
    """Combine the two workers' reports into the RESULT fields (FLOPs: the scfm side's work)."""
    out: dict[str, Any] = {"model": model, "baseline": baseline_kind}
    if "error" in scfm:
        out["scfm_error"] = scfm["error"]
    else:
        out["scfm_cells_per_s"] = scfm["cells"] / scfm["seconds"]
        out["scfm_peak_rss"] = scfm["peak_rss"]
        out["matmul_peak_gflop_per_s"] = scfm.get("matmul_gflops")
        if flops is not None:
            out["gflop_per_s"] = flops / scfm["seconds"] / 1e9
    if not baseline:
        pass
    elif "error" in baseline:
        out["baseline_error"] = baseline["error"]
    else:
        out["baseline_cells_per_s"] = baseline["cells"] / baseline["seconds"]
        out["baseline_peak_rss"] = baseline["peak_rss"]
        for k in ("prepare_seconds", "total_seconds"):
            if k in baseline:
                out[f"baseline_{k}"] = baseline[k]
    out.update(extra or {})
    return out


def report(
    model: str,
    scfm: dict,
    baseline: dict,
    baseline_kind: str,
    flops: float | None,
    extra: dict | None = None,
) -> dict:
    """:func:`summarise` the two sides, print the summary and the ``RESULT`` line; return it."""
    res = summarise(model, scfm, baseline, baseline_kind, flops, extra)
    print_summary(res)
    emit_result(**res)
    return res


def print_summary(res: dict) -> None:
    """Human-readable lines for one model's RESULT fields."""

    def gib(x):
        return f"{x / 2**30:.2f} GiB" if x else "n/a"

    def rate(x):
        return f"{x:.3g} cells/s" if x else "n/a"

    print(f"== {res['model']} (baseline: {res['baseline']})")
    print(
        f"   scfm     {rate(res.get('scfm_cells_per_s'))}  peak RSS {gib(res.get('scfm_peak_rss'))}"
    )
    print(
        f"   baseline {rate(res.get('baseline_cells_per_s'))}  "
        f"peak RSS {gib(res.get('baseline_peak_rss'))}"
    )
    if res.get("gflop_per_s") and res.get("matmul_peak_gflop_per_s"):
        print(
            f"   scfm {res['gflop_per_s']:.1f} GFLOP/s = "
            f"{100 * res['gflop_per_s'] / res['matmul_peak_gflop_per_s']:.0f}% of the float32 "
            f"matmul peak ({res['matmul_peak_gflop_per_s']:.0f} GFLOP/s)"
        )
    if "max_abs_diff" in res:
        print(
            f"   embeddings: max |diff| {res['max_abs_diff']:.2e}, "
            f"min cosine {res['min_cosine']:.12f}"
        )
    for k in ("scfm_error", "baseline_error"):
        if k in res:
            print(f"   {k}: {res[k]}")
