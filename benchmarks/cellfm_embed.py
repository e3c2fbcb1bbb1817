"""CellFM cell embeddings at release size: scfm throughput, memory and % of the matmul peak.

Writes a randomly initialised 80M release in the released layout (MindSpore protobuf
``CellFM_80M_weight.ckpt`` with the model parameters, the Adam ``moment1.*``/``moment2.*``
entries and the optimizer scalars, as the released file carries them: width 1,536, 2
retention layers, 48 heads, 27,856 gene rows; ``expand_gene_info.csv`` with 27,855 genes)
and an ``.h5ad`` of raw counts (1,665-2,035 expressed genes per cell), then embeds with
``CellFM.from_pretrained(dir, adata).get_latent_representation()`` in its own process.

Baseline (``--reference-dir`` = a checkout of biomed-AI/CellFM, run with an interpreter that
has MindSpore, e.g. ``<checkout>/.venv``): the embedding path of
``tutorials/BatchIntegration/BatchIntegration.ipynb`` — its code cells (``read_h5ad``,
``TestSCrna``, ``Prepare``, ``build_testdata``) are executed as they are, then the
``get_embed`` loop (``Backbone`` loaded with ``ms.load_checkpoint``/``load_param_into_net``,
batches of 16 padded to 2,048, CLS output), timed from ``Prepare`` to the last batch;
``TestSCrna`` (normalisation) is reported as ``baseline_prepare_seconds``. Without a checkout
there is no mirror: ``baseline="none"``.

``pct_peak`` counts the FLOPs of the unpadded tokens (CLS + expressed genes): value encoder,
5 retention projections, the gated FFN and the linear-attention products.

    python benchmarks/cellfm_embed.py [--cells 16] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

D, LAYERS, HEADS, N_GENES_80M, GENE_ROWS_80M, BINS = 1536, 2, 48, 27_855, 27_856, 256
CELLS, QUICK_CELLS = 16, 8
#: 1,665-2,035 expressed genes per cell: below the 2,047-gene cap, beyond which both sides
#: subsample a cell's genes at random (the reference unseeded), so embeddings would differ
N_INPUT_GENES, N_EXPRESSED = 4000, 1850
FIXTURE = C.BENCH_DIR.parent / "tests" / "data" / "fixtures" / "cellfm" / "checkpoint"


def _genes() -> list[str]:
    from scfm.data import gene_table

    symbols = gene_table()["symbol"].dropna().drop_duplicates()
    return symbols.iloc[:N_GENES_80M].tolist()


def write_release(directory: Path, seed: int = 0) -> Path:
    """The 80M release files with random values (fixture key set, released shapes)."""
    import torch

    from scfm.io import read_mindspore_checkpoint, write_mindspore_checkpoint

    directory.mkdir(parents=True, exist_ok=True)
    tiny = read_mindspore_checkpoint(FIXTURE / "CellFM_80M_weight.ckpt")
    tiny_d = tiny["gene_emb"].shape[1]
    dims = {tiny_d: D, tiny["gene_emb"].shape[0]: GENE_ROWS_80M}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in tiny:
        value = tiny[name]
        if (
            not value.is_floating_point()
            or value.dim() == 0
            or name in ("global_step", "learning_rate", "beta1_power", "beta2_power")
        ):
            out[name] = value.clone()
            continue
        shape = [dims.get(s, s) for s in value.shape]
        if name.startswith(("moment1.", "moment2.")):
            out[name] = 1e-3 * torch.rand(shape, generator=gen)
        else:
            out[name] = C.random_tensor(shape, name, gen)
    out["gene_emb"][0] = 0  # padding row
    write_mindspore_checkpoint(out, directory / "CellFM_80M_weight.ckpt")
    header = (FIXTURE / "expand_gene_info.csv").read_text().splitlines()[0]
    with open(directory / "expand_gene_info.csv", "w") as fh:
        fh.write(header + "\n")
        n_cols = header.count(",")
        for g in _genes():
            fh.write(g + ",1000" + ",0" * (n_cols - 1) + "\n")
    return directory


def write_data(path: Path, n_cells: int, seed: int = 4) -> Path:
    import anndata as ad
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    genes = rng.choice(_genes(), N_INPUT_GENES, replace=False).tolist()
    x = C.synthetic_counts(n_cells, N_INPUT_GENES, N_EXPRESSED, seed=seed)
    obs = pd.DataFrame(
        {"cell_type": ["T cell"] * n_cells, "batch": ["b0"] * n_cells},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    ad.AnnData(x, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
    return path


def cellfm_flops(tokens: float) -> float:
    """Matmul FLOPs over ``tokens`` unpadded tokens (CLS included)."""
    h = D // HEADS
    per_token = 2 * (BINS * BINS + BINS * D)  # value encoder (w3, table)
    per_token += LAYERS * (2 * (5 * D * D + 3 * D * D) + 2 * 2 * D * h)
    return tokens * per_token


def worker_scfm(args) -> None:
    import anndata as ad
    import numpy as np

    import scfm

    C.set_threads(args.threads)
    adata = ad.read_h5ad(args.data)
    scfm.model.CellFM.setup_anndata(adata)
    model = scfm.model.CellFM.from_pretrained(args.release, adata)
    peak = C.matmul_peak_gflops()
    with C.Timer() as t:
        z = model.get_latent_representation(batch_size=args.batch_size, progress_bar=False)
    np.save(args.out, np.asarray(z, dtype=np.float32))
    # the machine may be shared: the higher of the rates before and after the timed call
    peak = max(peak, C.matmul_peak_gflops())
    C.worker_report(cells=adata.n_obs, seconds=t.seconds, matmul_gflops=peak)


NOTEBOOK = "tutorials/BatchIntegration/BatchIntegration.ipynb"
#: code cells of the notebook that define the embedding path (imports, read_h5ad,
#: SCrna/TestSCrna, Prepare, build_dataset/build_testdata); run as they are
NOTEBOOK_CELLS = (
    "import mindspore as ms",
    "from config import Config",
    "def read_h5ad",
    "class SCrna",
    "class Prepare",
    "def build_dataset",
)


def worker_reference(args) -> None:
    """The reference BatchIntegration embedding (``get_embed``) with MindSpore on the CPU."""
    import json
    import os
    import tempfile

    import mindspore as ms
    import mindspore.common.api as ms_api
    import numpy as np

    ref = Path(args.reference_dir).resolve()
    if not hasattr(ms_api, "ms_function"):  # removed in MindSpore 2.x; imported, not used here
        ms_api.ms_function = ms.jit
    import scipy.sparse as sp

    for cls in (sp.csr_matrix, sp.csc_matrix, sp.coo_matrix):
        if not hasattr(cls, "A"):  # ``.A`` (used by TestSCrna) was removed in SciPy 1.14
            cls.A = property(lambda self: self.toarray())
    import mindspore.dataset as msds

    batch = msds.Dataset.batch

    def clamped_batch(self, *a, num_parallel_workers=None, **k):
        # the notebook asks for 4 workers; MindSpore refuses more than the machine's cores
        if num_parallel_workers:
            num_parallel_workers = min(num_parallel_workers, os.cpu_count() or 1)
        return batch(self, *a, num_parallel_workers=num_parallel_workers, **k)

    msds.Dataset.batch = clamped_batch
    ms.set_context(device_target="CPU")
    if args.threads:
        ms.set_context(runtime_num_threads=args.threads)
    nb = json.loads((ref / NOTEBOOK).read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    chosen = [c for c in cells if any(m in c for m in NOTEBOOK_CELLS)]
    sys.path[:0] = [str(ref), str(ref / Path(NOTEBOOK).parent)]
    data = Path(args.data).resolve()
    release = Path(args.release).resolve()
    peak = C.matmul_peak_gflops()
    with tempfile.TemporaryDirectory() as tmp:
        # the notebook reads ../../csv/expand_gene_info.csv: lay out the release's file so
        (Path(tmp) / "csv").mkdir()
        (Path(tmp) / "csv" / "expand_gene_info.csv").symlink_to(release / "expand_gene_info.csv")
        run_dir = Path(tmp) / "a" / "b"
        run_dir.mkdir(parents=True)
        cwd = os.getcwd()
        os.chdir(run_dir)
        try:
            ns: dict = {"__name__": "cellfm_notebook"}
            for code in chosen:
                exec(compile(code, NOTEBOOK, "exec"), ns)  # the reference's own cells
            adata = ns["read_h5ad"](str(data))
            with C.Timer() as t_prep:
                dataset = ns["TestSCrna"](adata)
            cfg = ns["Config"]()
            cfg.num_cls = dataset.cls
            cfg.enc_nlayers = LAYERS
            para = ms.load_checkpoint(str(release / "CellFM_80M_weight.ckpt"))
            backbone = ns["Backbone"](len(dataset.geneset), cfg)
            ms.load_param_into_net(backbone, para)
            del para
            with C.Timer() as t:
                prep = ns["Prepare"](cfg.nonz_len, pad=1, mask_ratio=0, random=False)
                loader = ns["build_testdata"](dataset, prep, 16, drop=False, shuffle=False)
                z = [
                    backbone(expr, gene, zero_idx).asnumpy()[:, 0, :]
                    for expr, gene, zero_idx, _label, _bi in loader
                ]
        finally:
            os.chdir(cwd)
    z = np.concatenate(z).astype(np.float32)
    np.save(args.out, z)
    C.worker_report(
        cells=len(z),
        seconds=t.seconds,
        prepare_seconds=t_prep.seconds,
        total_seconds=t.seconds + t_prep.seconds,
        matmul_gflops=peak,
    )


def _no_baseline(args) -> None:
    raise SystemExit("CellFM has no mirror here: pass --reference-dir (MindSpore reference).")


def main(argv: list[str] | None = None) -> dict:
    import anndata as ad

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_cli(parser, "checkout of biomed-AI/CellFM (run with a MindSpore interpreter)")
    args = parser.parse_args(argv)
    if args.worker:
        workers = {"scfm": worker_scfm, "reference": worker_reference}
        workers.get(args.worker, _no_baseline)(args)
        return {}
    n = args.cells or (QUICK_CELLS if args.quick else CELLS)
    work = C.work_dir(args.work_dir)
    release = C.build_once(work / "cellfm", write_release)
    data = C.build_once(work / f"cellfm-cells{n}-g{N_EXPRESSED}.h5ad", lambda p: write_data(p, n))
    args.skip_baseline = args.skip_baseline or not args.reference_dir
    common = ["--release", str(release), "--data", str(data)]
    scfm, base, kind, cmp = C.run_sides(__file__, "cellfm", args, common)
    if not args.reference_dir:
        base, kind = {}, "none"
    x = ad.read_h5ad(data).X
    tokens = float((x > 0).sum()) + n  # + CLS; no cell exceeds the 2,047-gene cap
    extra = {"cells": n, "mean_tokens": tokens / n, **cmp}
    res = C.summarise("cellfm", scfm, base, kind, cellfm_flops(tokens), extra)
    C.print_summary(res)
    C.emit_result(**res)
    return res


if __name__ == "__main__":
    main()
