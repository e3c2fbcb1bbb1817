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
``TestSCrna`` (normalisation) is reported as ``baseline_prepare_seconds``.

Mirror (default, ``baseline="mirror"``): the same path rewritten in torch here, operation by
operation as the reference's ``Backbone`` does it (``tutorials/BatchIntegration/
finetune_intergration_model.py``, ``retention.py``, ``model.py``): ``read_h5ad``'s depth
rounding, ``TestSCrna``'s gene intersection and ``normalize_total``/``log1p`` to a dense matrix,
``Prepare``'s padding of every cell to 2,048 genes (+ CLS), batches of 16, the value encoder on
every padded position, and per layer the separate q/k/v/u projections, head transposes made
contiguous (as MindSpore's ``Transpose``), ``relu``/``silu``, the key mask, ``V * 1/sqrt(n)``,
``Q / sqrt(h)``, ``K / sqrt(h)``, the two batched matmuls, ``SRMSNorm`` (scale, norm, clamp,
divide), the gate, ``x * alpha + out`` and the post-LayerNorms (eps 1e-7); the whole
checkpoint (optimizer moments included) is read into memory, as ``ms.load_checkpoint`` does.

``pct_peak`` counts the FLOPs of the unpadded tokens (CLS + expressed genes): value encoder,
5 retention projections, the gated FFN and the linear-attention products.

    python benchmarks/cellfm_embed.py [--cells 16] [--quick] [--reference-dir CHECKOUT]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

D, LAYERS, HEADS, N_GENES_80M, GENE_ROWS_80M, BINS = 1536, 2, 48, 27_855, 27_856, 256
CELLS = (16, 8)  # cells embedded: default, --quick
#: 1,665-2,035 expressed genes per cell: below the 2,047-gene cap, beyond which both sides
#: subsample a cell's genes at random (the reference unseeded), so embeddings would differ
N_INPUT_GENES, N_EXPRESSED = 4000, 1850
REFERENCE = "checkout of biomed-AI/CellFM (run with a MindSpore interpreter)"
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


def write_data(path: Path, _release: Path, n_cells: int, seed: int = 4) -> Path:
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


def cellfm_flops(tokens: float, cells: int = 0) -> float:
    """Matmul FLOPs over ``tokens`` unpadded tokens (CLS included) of ``cells`` cells.

    With ``cells``, the last layer is read at CLS only (the default cell embedding): it
    projects keys and values of every token (and forms their ``h x h`` states) but runs the
    query, gate, output and GLU projections for one token per cell.
    """
    h = D // HEADS
    layer = 2 * (5 * D * D + 3 * D * D) + 2 * 2 * D * h
    per_token = 2 * (BINS * BINS + BINS * D) + LAYERS * layer  # value encoder (w3, table)
    if not cells:
        return tokens * per_token
    last_all = 2 * 2 * D * D + 2 * D * h  # k, v projections and the K^T V states
    last_cls = 2 * 6 * D * D + 2 * D * h  # q, u, o, GLU u, v, o and Q (K^T V)
    return tokens * (per_token - layer + last_all) + cells * last_cls


def workload(data: Path, _release: Path, n_cells: int) -> tuple[float, dict[str, float]]:
    """FLOPs of the scfm embedding and the mean tokens (CLS + expressed genes) per cell."""
    import anndata as ad

    x = ad.read_h5ad(data).X
    tokens = float((x > 0).sum()) + n_cells  # + CLS; no cell exceeds the 2,047-gene cap
    # the default embedding reads the last layer at CLS: only that work is counted
    return cellfm_flops(tokens, n_cells), {"mean_tokens": tokens / n_cells}


# data_tag: inputs of other per-cell gene counts were cached under other names
BENCHMARK = C.EmbeddingBenchmark(
    "cellfm", "CellFM", CELLS, write_release, write_data, workload, data_tag=f"-g{N_EXPRESSED}"
)


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
    z = np.concatenate(z)
    C.report_embedding(
        args.out, z, t.seconds, peak, prepare=t_prep.seconds, total=t.seconds + t_prep.seconds
    )


#: ``Config.nonz_len`` of the reference: every cell is padded to this many genes
PAD_LEN = 2048
#: ``get_embed``'s batch size
REF_BATCH = 16
LN_EPS, LEAKY_SLOPE, SRMS_MIN = 1e-7, 0.2, 1e-12


def _mirror_prepare(adata, genes: list[str]):
    """``read_h5ad``'s depth rounding + ``TestSCrna``: dense log1p matrix and gene ids."""
    import numpy as np
    import scipy.sparse as sp

    x = adata.X.astype(np.float32)
    depth = np.asarray(x.sum(1)).reshape(-1, 1)
    x = sp.csr_matrix(np.round(x.multiply(1 / np.maximum(1, depth / 1e5)).toarray()))
    ids = {g: i + 1 for i, g in enumerate(genes)}
    kept = np.intersect1d(adata.var_names, genes)  # sorted, as the reference
    col = {g: j for j, g in enumerate(adata.var_names)}
    x = x[:, [col[g] for g in kept]].toarray()
    total = x.sum(1, keepdims=True)
    data = np.log1p(x / np.where(total > 0, total, 1) * 1e4).astype(np.float32)
    return data, np.array([ids[g] for g in kept], dtype=np.int64)


def _mirror_pad(rows, gene):
    """``Prepare`` + ``build_testdata``: every cell's non-zero genes padded to 2,048 (+ CLS)."""
    import numpy as np

    n = len(rows)
    values = np.zeros((n, PAD_LEN), np.float32)
    gene_ids = np.zeros((n, PAD_LEN), np.int64)
    zero_idx = np.zeros((n, PAD_LEN + 1), np.float32)
    for i, row in enumerate(rows):
        nonz = row.nonzero()[0]
        if len(nonz) > PAD_LEN:
            raise SystemExit("the mirror covers cells below the 2,048-gene cap only")
        values[i, : len(nonz)] = row[nonz]
        gene_ids[i, : len(nonz)] = gene[nonz]
        zero_idx[i, : len(nonz) + 1] = 1
    return values, gene_ids, zero_idx


def _mirror_backbone(w: dict, expr, gene, zero_idx):
    """The reference ``Backbone.construct`` in torch, one operation per MindSpore op."""
    import torch
    import torch.nn.functional as F

    b, length = gene.shape
    gene_emb = w["gene_emb"][gene]
    # ValueEncoder / FFN on every (padded) position
    v = F.leaky_relu(expr.reshape(-1, 1) @ w["value_enc.value_enc.w1.weight"].T, LEAKY_SLOPE)
    v = v @ w["value_enc.value_enc.w3.weight"].T + v * w["value_enc.value_enc.a"]
    v = torch.softmax(v, -1) @ w["value_enc.value_enc.table.weight"].T
    expr_emb = v.reshape(b, length, -1)
    len_scale = torch.rsqrt(zero_idx.sum(-1, keepdim=True) - 1).reshape(b, 1, 1, 1)
    x = gene_emb + expr_emb
    x = torch.cat([w["cls_token"].expand(b, 1, -1), x], 1)
    x = x * zero_idx.reshape(b, -1, 1)
    mask = zero_idx.reshape(b, 1, -1, 1)
    alpha = (2 * LAYERS) ** 0.25
    h = D // HEADS
    scale = torch.tensor([h**0.5])
    for i in range(LAYERS):
        p = f"encoder.{i}."

        def dense(t, name, p=p):
            return t @ w[p + name + ".weight"].T

        def heads(t):
            return t.reshape(b, -1, HEADS, h).permute(0, 2, 1, 3).contiguous()

        q, k, vv, u = (heads(dense(x, f"attn.{n}_proj")) for n in "qkvu")
        q, k, u = torch.relu(q), torch.relu(k), F.silu(u)
        k = k * mask
        vv = vv * len_scale
        q, k = q / scale, k / scale
        o = q @ (k.transpose(-1, -2) @ vv)
        o32 = o.float()  # SRMSNorm
        norm = torch.linalg.vector_norm(o32 * (1 / h**0.5), dim=-1, keepdim=True)
        o = (o32 / torch.clamp(norm, min=SRMS_MIN)).to(o.dtype)
        o = o * u
        o = o.permute(0, 2, 1, 3).contiguous().reshape(b, -1, D)
        out = dense(o, "attn.o_proj")
        x = F.layer_norm(
            x * alpha + out, (D,), w[p + "post_norm1.gamma"], w[p + "post_norm1.beta"], LN_EPS
        )
        flat = x.reshape(-1, D)
        out = dense(dense(flat, "ffn.u_proj") * dense(flat, "ffn.v_proj"), "ffn.o_proj")
        out = out.reshape(b, -1, D)
        x = F.layer_norm(
            x * alpha + out, (D,), w[p + "post_norm2.gamma"], w[p + "post_norm2.beta"], LN_EPS
        )
    return x


def worker_mirror(args) -> None:
    """The reference embedding path (``get_embed`` with ``Backbone``), mirrored in torch."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import torch

    from scfm.io import read_mindspore_checkpoint

    C.set_threads(args.threads)
    release = Path(args.release)
    adata = ad.read_h5ad(args.data)
    genes = pd.read_csv(release / "expand_gene_info.csv", index_col=0).index.tolist()
    # load_checkpoint reads the whole file (optimizer moments included) into memory
    w = read_mindspore_checkpoint(release / "CellFM_80M_weight.ckpt", copy=True)
    peak = C.matmul_peak_gflops()
    with C.Timer() as t_prep:
        data, gene = _mirror_prepare(adata, genes)
    z = []
    # timed like the reference: from Prepare (padding) to the last batch
    with torch.inference_mode(), C.Timer() as t:
        for start in range(0, len(data), REF_BATCH):
            batch = _mirror_pad(data[start : start + REF_BATCH], gene)
            emb = _mirror_backbone(w, *(torch.from_numpy(a) for a in batch))
            z.append(emb[:, 0].numpy())
    peak = max(peak, C.matmul_peak_gflops())
    z = np.concatenate(z)
    C.report_embedding(
        args.out, z, t.seconds, peak, prepare=t_prep.seconds, total=t.seconds + t_prep.seconds
    )


def main(argv: list[str] | None = None) -> dict:
    return C.embedding_main(argv, sys.modules[__name__], BENCHMARK)


if __name__ == "__main__":
    main()
