"""Shared helpers of the benchmark scripts: timing, peak memory, matmul peak, result protocol.

Every per-model benchmark (``benchmarks/<model>_embed.py``) runs each side (scfm, the
reference code from a checkout, or a mirror of the reference path written here) in its own
process and ends with ONE line ``RESULT {json}`` (see ``benchmarks/README.md``), which
``benchmarks/run.py`` parses. The embedding scripts hand their model's own pieces (release and
input writers, FLOP count, workers) to :func:`embedding_main`, which does the rest. This
module imports only the standard library at import time, so reference adapters running in
another virtual environment can use it too.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
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
#: The sides a per-model script runs in worker processes (``--worker SIDE``).
SIDES = ("scfm", "reference", "mirror")


def _proc_status_bytes(field: str) -> int | None:
    """A memory field (``VmHWM``, ``VmRSS``, ...) of ``/proc/self/status`` in bytes, or None."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process image (``VmHWM``), in bytes.

    ``VmHWM`` is reset by ``exec``, unlike ``ru_maxrss``, which a child started by
    ``subprocess`` inherits from its parent's high-water mark on Linux.
    """
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    """Current resident set size of this process (``VmRSS``), in bytes (0 where unknown)."""
    return _proc_status_bytes("VmRSS") or 0


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
    """Print the worker's JSON line (its own peak RSS is added)."""
    fields.setdefault("peak_rss", peak_rss_bytes())
    print(RESULT_PREFIX + json.dumps(fields), flush=True)


def report_embedding(
    out: str | os.PathLike,
    z: Any,
    seconds: float,
    matmul_gflops: float,
    *,
    prepare: float | None = None,
    total: float | None = None,
) -> None:
    """End an embedding worker: save ``z`` (float32) to ``out`` and :func:`worker_report` it.

    Parameters
    ----------
    out
        The ``.npy`` file the driver compares (``--out``).
    z
        The embedding, one row per cell.
    seconds
        Time of the timed part (the embedding call or forward loop).
    matmul_gflops
        The float32 matmul rate measured in this process.
    prepare
        Time of a separate preparation step (the reference's tokenising), reported as
        ``prepare_seconds``.
    total
        Time of the whole path, reported as ``total_seconds``.
    """
    import numpy as np

    z = np.asarray(z, dtype=np.float32)
    np.save(out, z)
    timings = {"prepare_seconds": prepare, "total_seconds": total}
    worker_report(
        cells=len(z),
        seconds=seconds,
        **{k: v for k, v in timings.items() if v is not None},
        matmul_gflops=matmul_gflops,
    )


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

    import scfm

    set_threads(args.threads)
    adata = ad.read_h5ad(args.data)
    cls = getattr(scfm.model, model_class)
    cls.setup_anndata(adata, **(setup or {}))
    model = cls.from_pretrained(args.release, adata, **(load or {}))
    peak = matmul_peak_gflops()
    with Timer() as t:
        z = model.get_latent_representation(batch_size=args.batch_size, progress_bar=False)
    # the machine may be shared: the higher of the rates before and after the timed call
    peak = max(peak, matmul_peak_gflops())
    report_embedding(args.out, z, t.seconds, peak)


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


def read_pickle(path: str | os.PathLike) -> Any:
    """The object pickled in ``path`` (the release dictionaries of Geneformer and scCello)."""
    with open(path, "rb") as fh:
        return pickle.load(fh)


def pad_sequences(seqs: Sequence[Sequence[int]]) -> tuple[Any, Any]:
    """Token ids of ``seqs`` right-padded with 0 to the longest, and the attention mask.

    The minibatch an HF collator builds for the reference BERT models (``<pad>`` is token 0
    in Geneformer and scCello); returns two ``(len(seqs), longest)`` int64 tensors.
    """
    import torch

    n = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for r, seq in enumerate(seqs):
        ids[r, : len(seq)] = torch.as_tensor(seq)
        mask[r, : len(seq)] = 1
    return ids, mask


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


def release_state(
    tiny: Mapping[str, Any],
    layer: str,
    layers: int,
    value: Callable[[str, str, Any, Any], Any],
    seed: int = 0,
) -> dict[str, Any]:
    """A release's weights keyed as a tiny test fixture's, with ``layers`` encoder layers.

    The fixture's layer-0 entries stand for every layer of the release and its other layers'
    entries are dropped (the fixtures have fewer layers than the releases).

    Parameters
    ----------
    tiny
        The fixture's state dict (its keys are the released ones).
    layer
        The part of a key that names an encoder layer, ``{}`` for its index (e.g.
        ``".layer.{}."``).
    layers
        Encoder layers of the release.
    value
        ``value(key, tiny_key, tiny_value, generator)``: the release's entry ``key``, which
        ``tiny_key`` stands for.
    seed
        Seed of the one generator every entry is drawn from, in the fixture's key order, so
        that a release is the same on every run.
    """
    import torch

    first = layer.format(0)
    any_layer = re.compile(re.escape(layer).replace(r"\{\}", r"\d+"))
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for tiny_key, tiny_value in tiny.items():
        if first in tiny_key:
            keys = [tiny_key.replace(first, layer.format(i)) for i in range(layers)]
        elif any_layer.search(tiny_key):
            continue
        else:
            keys = [tiny_key]
        for key in keys:
            state[key] = value(key, tiny_key, tiny_value, gen)
    return state


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


#: A worker of a per-model script: runs one side in this process, given the parsed options.
Worker = Callable[[argparse.Namespace], None]


def add_cli(parser: argparse.ArgumentParser, reference_help: str) -> None:
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
    parser.add_argument("--worker", choices=SIDES, help="(internal)")
    for a in ("--release", "--data", "--out"):
        parser.add_argument(a, help="(internal)")


def run_worker_if_asked(args: argparse.Namespace, **workers: Worker) -> bool:
    """In a worker process (``--worker SIDE``), run ``workers[SIDE](args)`` and return True."""
    if not args.worker:
        return False
    workers[args.worker](args)
    return True


def chosen_baseline(args: argparse.Namespace) -> str:
    """``"reference"`` when a checkout is given (``--reference-dir``), else ``"mirror"``."""
    return "reference" if args.reference_dir else "mirror"


def worker_commands(
    script: str,
    args: argparse.Namespace,
    common: Sequence[str],
    out_scfm: str | os.PathLike,
    out_baseline: str | os.PathLike,
) -> tuple[list[str], list[str]]:
    """Command lines of the scfm worker and the baseline worker of ``script``.

    Both get ``common`` (and ``--threads``); the scfm side gets ``--batch-size``; the
    baseline (:func:`chosen_baseline`) runs with the reference's interpreter where a checkout
    is given, since the reference code needs its own environment.
    """
    common = list(common)
    if args.threads:
        common += ["--threads", str(args.threads)]
    scfm = [sys.executable, script, "--worker", "scfm", *common, "--out", str(out_scfm)]
    if args.batch_size:
        scfm += ["--batch-size", str(args.batch_size)]
    python = sys.executable
    if args.reference_dir:
        python = reference_python(args.reference_dir, args.reference_python)
    baseline = [python, script, "--worker", chosen_baseline(args), *common]
    baseline += ["--out", str(out_baseline)]
    if args.reference_dir:
        baseline += ["--reference-dir", args.reference_dir]
    return scfm, baseline


def run_sides(
    script: str, name: str, args: argparse.Namespace, common: list[str]
) -> tuple[dict, dict, str, dict]:
    """Run the scfm worker then the baseline worker (reference or mirror) of ``script``.

    Returns both reports, the baseline kind and the embedding comparison (both sides save
    their embeddings; the files are removed afterwards).
    """
    import numpy as np

    work = work_dir(args.work_dir)
    kind = chosen_baseline(args)
    out_s = out_file(work, f"z-{name}-scfm")
    out_b = out_file(work, f"z-{name}-{kind}")
    scfm_cmd, base_cmd = worker_commands(script, args, common, out_s, out_b)
    scfm = run_worker(scfm_cmd, timeout=args.timeout)
    if args.skip_baseline:
        base: dict = {"error": "skipped"}
    else:
        base = run_worker(base_cmd, timeout=args.timeout)
    cmp: dict = {}
    if "error" not in scfm and "error" not in base:
        cmp = compare_embeddings(np.load(out_s), np.load(out_b))
    for f in (out_s, out_b):
        f.unlink(missing_ok=True)
    return scfm, base, kind, cmp


@dataclass(frozen=True)
class EmbeddingBenchmark:
    """What an embedding benchmark measures, the model's own pieces (:func:`embedding_main`).

    Attributes
    ----------
    name
        The ``model`` of the RESULT line; also names the cached release (``<name>``), the
        input (``<name>-cells<n><data_tag>.h5ad``) and the embeddings the workers save.
    model_class
        The ``scfm.model`` class the scfm side embeds with (:func:`scfm_embedding_worker`).
    cells
        Cells embedded by default (the release-size run) and with ``--quick``.
    write_release
        ``write_release(directory)``: write a random release of the released size there.
    write_data
        ``write_data(path, release, n_cells)``: write the ``.h5ad`` of raw counts.
    workload
        ``workload(data, release, n_cells)``: the FLOPs the scfm side must do (for
        ``gflop_per_s``) and the input statistics reported next to them, such as
        ``{"mean_tokens": ...}``.
    setup
        Extra ``setup_anndata`` arguments of the scfm side.
    load
        Extra ``from_pretrained`` arguments of the scfm side.
    data_tag
        Appended to the input's file name, so that inputs drawn differently by another
        version of the script are not taken from the cache.
    worker_options
        The script's own options that both workers need, put before ``--release``.
    """

    name: str
    model_class: str
    cells: tuple[int, int]
    write_release: Callable[[Path], object]
    write_data: Callable[[Path, Path, int], object]
    workload: Callable[[Path, Path, int], tuple[float, dict[str, float]]]
    setup: dict[str, Any] | None = None
    load: dict[str, Any] | None = None
    data_tag: str = ""
    worker_options: tuple[str, ...] = ()


def embedding_main(
    argv: Sequence[str] | None,
    script: ModuleType,
    benchmark: EmbeddingBenchmark | Callable[[argparse.Namespace], EmbeddingBenchmark],
    *,
    add_options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> dict:
    """The ``main`` of a per-model embedding script: options, workers, release, run, RESULT.

    Parses the shared options (:func:`add_cli`); in a worker process runs that worker and
    returns ``{}``. Otherwise writes the release and the input once (cached in the work dir),
    runs both sides (:func:`run_sides`), prints the summary and, last, the ``RESULT`` line.

    Parameters
    ----------
    argv
        Command line (default: ``sys.argv[1:]``).
    script
        The script's module (``sys.modules[__name__]``), which provides the command line
        and the processes: the first line of its docstring describes it in ``--help``, its
        file runs again for each worker, ``REFERENCE`` is the help of ``--reference-dir``
        (which checkout it takes), and ``worker_reference`` and ``worker_mirror`` run the
        baseline sides (``--worker reference|mirror``; the scfm side is the same for every
        model: :func:`scfm_embedding_worker`).
    benchmark
        The model's pieces, or a function of the parsed options that returns them (where
        they depend on the script's own options, such as Geneformer's ``--variant``).
    add_options
        Adds the script's own options, before the shared ones.

    Returns
    -------
    dict
        The RESULT fields (``{}`` in a worker process).
    """
    parser = argparse.ArgumentParser(description=(script.__doc__ or "").partition("\n")[0])
    if add_options is not None:
        add_options(parser)
    add_cli(parser, script.REFERENCE)
    args = parser.parse_args(argv)
    spec = benchmark(args) if callable(benchmark) else benchmark

    def worker_scfm(worker_args: argparse.Namespace) -> None:
        scfm_embedding_worker(worker_args, spec.model_class, setup=spec.setup, load=spec.load)

    baselines = {side: getattr(script, f"worker_{side}") for side in ("reference", "mirror")}
    if run_worker_if_asked(args, scfm=worker_scfm, **baselines):
        return {}
    n = args.cells or spec.cells[1 if args.quick else 0]
    work = work_dir(args.work_dir)
    release = build_once(work / spec.name, spec.write_release)
    data = build_once(
        work / f"{spec.name}-cells{n}{spec.data_tag}.h5ad",
        lambda path: spec.write_data(path, release, n),
    )
    common = [*spec.worker_options, "--release", str(release), "--data", str(data)]
    scfm, base, kind, cmp = run_sides(script.__file__, spec.name, args, common)
    flops, stats = spec.workload(data, release, n)
    res = summarise(spec.name, scfm, base, kind, flops, {"cells": n, **stats, **cmp})
    print_summary(res)
    emit_result(**res)
    return res


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
