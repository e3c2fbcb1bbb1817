"""CellPLM cell embeddings at release size: scfm vs the reference pipeline (or a mirror).

Writes a randomly initialised ``20231027_85M`` release in the released layout
(``<prefix>.config.json`` with the released keys + ``<prefix>.best.ckpt`` =
``{"model_state_dict": ...}``: 1,024 wide, 4 Flowformer layers, VAE latent 512, NB decoder,
19,374 genes, 12,596 batch / 484 dataset covariates) and an ``.h5ad`` of raw counts over
5,000 vocabulary genes (~1,500 expressed per cell) whose cells all share one ``batch`` value,
so the reference reads them as ONE sentence; then runs each side in its own process:

* ``scfm``: ``CellPLM.from_pretrained(dir, adata, prefix=...).get_latent_representation()``.
* ``reference`` (``--reference-dir`` = a checkout of OmicsML/CellPLM or an unpacked
  ``cellplm`` wheel; its ``.venv`` or ``--reference-python`` needs einops / hdf5plugin /
  mygene / pydance importable): ``CellEmbeddingPipeline(pretrain_prefix,
  pretrain_directory).predict(adata, device="cpu", ensembl_auto_conversion=False)``, timed
  whole (preprocessing + forward), model loading excluded.
* ``mirror`` (no checkout): the reference forward written here in torch: sparse
  ``log1p(X) @ E``, Linear-ReLU-GroupNorm, 4 pre-LN Flowformer layers over the whole
  sentence, LayerNorm, VAE ``mu`` (and the unused ``sigma``, which the reference computes),
  one forward pass per sentence as the reference.

``--sentences K`` spreads the cells over ``K`` random ``batch`` values: ``K`` sentences of
unequal length, which the reference runs one forward pass each (the runner's
``cellplm-sentences`` line, ``K = 200``).

    python benchmarks/cellplm_embed.py [--cells 2000] [--quick] [--reference-dir PATH]
        [--sentences K]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

PREFIX = "20231027_85M"
ENC, LAYERS, HEADS, POST, DEC, N_VOCAB = 1024, 4, 8, 512, 1024, 19374
BATCH_NUM, DATASET_NUM = 12596, 484
CELLS = (2000, 1000)  # cells embedded: default, --quick
N_GENES, N_EXPRESSED = 5000, 1500
REFERENCE = "checkout of OmicsML/CellPLM (or the unpacked cellplm wheel)"
FIXTURE = C.BENCH_DIR.parent / "tests" / "data" / "fixtures" / "cellplm" / "checkpoint"


def _gene_list() -> list[str]:
    from scfm.data import gene_table

    return sorted(gene_table()["ensembl_id"].drop_duplicates().iloc[:N_VOCAB].tolist())


def write_release(directory: Path, seed: int = 0) -> Path:
    """Random release files of the 85M size, keys and layout of the fixture (= the release)."""
    import torch

    cfg_file = directory / f"{PREFIX}.config.json"
    if cfg_file.exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    tiny_cfg = json.loads((FIXTURE / f"{PREFIX}.config.json").read_text())
    tiny = torch.load(FIXTURE / f"{PREFIX}.best.ckpt", weights_only=True)["model_state_dict"]
    te, tp, td = tiny_cfg["enc_hid"], tiny_cfg["post_latent_dim"], tiny_cfg["dec_hid"]
    assert te == tp, "the mapping below assumes the fixture's enc_hid == post_latent_dim"
    fixed = {
        td: DEC,
        2 * te: 2 * ENC,
        tiny_cfg["out_dim"]: N_VOCAB,
        tiny_cfg["batch_num"]: BATCH_NUM,
        tiny_cfg["dataset_num"]: DATASET_NUM,
    }

    def draw(key: str, tiny_key: str, value: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        shape = []
        for j, s in enumerate(value.shape):
            if s == te:
                post = (tiny_key.startswith("latent.") and j == 0) or (
                    tiny_key == "decoder.layers.0.0.weight" and j == 1
                )
                shape.append(POST if post else ENC)
            else:
                shape.append(fixed.get(s, s))
        return C.random_tensor(shape, key, gen)

    state = C.release_state(tiny, "encoder.layers.{}.", LAYERS, draw, seed)
    torch.save({"model_state_dict": state}, directory / f"{PREFIX}.best.ckpt")
    cfg = dict(
        tiny_cfg,
        name=PREFIX,
        enc_hid=ENC,
        enc_layers=LAYERS,
        post_latent_dim=POST,
        dec_hid=DEC,
        out_dim=N_VOCAB,
        batch_num=BATCH_NUM,
        dataset_num=DATASET_NUM,
    )
    cfg["gene_list"] = _gene_list()  # last key, as released
    cfg_file.write_text(json.dumps(cfg))
    return directory


def write_data(path: Path, _release: Path, n_cells: int, seed: int = 3, sentences: int = 1) -> Path:
    import anndata as ad
    import numpy as np
    import pandas as pd

    if path.exists():
        return path
    genes = _gene_list()
    rng = np.random.default_rng(seed)
    genes = sorted(rng.choice(genes, N_GENES, replace=False).tolist())
    x = C.synthetic_counts(n_cells, N_GENES, N_EXPRESSED, seed=seed)
    batch = ["sample0"] * n_cells
    if sentences > 1:  # cells of all sentences interleaved, sentences of unequal length
        batch = [f"sample{i}" for i in np.random.default_rng(seed).integers(0, sentences, n_cells)]
    obs = pd.DataFrame({"batch": batch}, index=[f"cell{i}" for i in range(n_cells)])
    ad.AnnData(x, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
    return path


def cellplm_flops(nnz: float, n_cells: int) -> float:
    """Matmul FLOPs of the embedding path: sparse embedding, extra linear, encoder, mu."""
    hd = ENC // HEADS
    per_cell = 2 * ENC * ENC  # extra_linear
    per_cell += LAYERS * (2 * (4 * ENC * ENC + 2 * ENC * 2 * ENC) + 2 * 2 * ENC * hd)
    per_cell += 2 * ENC * POST  # mu
    return 2 * nnz * ENC + n_cells * per_cell


def workload(data: Path, _release: Path, n_cells: int) -> tuple[float, dict[str, float]]:
    """FLOPs of the scfm embedding and the expressed genes per cell."""
    import anndata as ad

    nnz = ad.read_h5ad(data).X.nnz
    return cellplm_flops(nnz, n_cells), {"nnz_per_cell": nnz / n_cells}


BENCHMARK = C.EmbeddingBenchmark(
    name="cellplm",
    model_class="CellPLM",
    cells=CELLS,
    write_release=write_release,
    write_data=write_data,
    workload=workload,
    setup={"batch_key": "batch"},  # the reference's sentences: its "batch" column
    load={"prefix": PREFIX},
)


# --------------------------------------------------------------------------- workers
def worker_reference(args) -> None:
    import anndata as ad

    C.set_threads(args.threads)
    ref = Path(args.reference_dir).resolve()
    sys.path.insert(0, str(ref))
    from CellPLM.pipeline.cell_embedding import CellEmbeddingPipeline

    adata = ad.read_h5ad(args.data)
    pipeline = CellEmbeddingPipeline(pretrain_prefix=PREFIX, pretrain_directory=args.release)
    peak = C.matmul_peak_gflops()
    with C.Timer() as t:
        z = pipeline.predict(adata, device="cpu", ensembl_auto_conversion=False)
    C.report_embedding(args.out, z.detach().cpu().numpy(), t.seconds, peak)


def _flow_attention(x, p, pre: str, heads: int, eps: float = 1e-6):
    """Flow_Attention of the reference (non-causal) over one sentence ``x`` (L, d)."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]

    def proj(name):
        y = F.linear(x, p[f"{pre}.{name}_projection.weight"], p[f"{pre}.{name}_projection.bias"])
        return y.view(n, heads, -1).transpose(0, 1)  # h, L, dh

    q, k, v = torch.sigmoid(proj("query")), torch.sigmoid(proj("key")), proj("value")
    sink_in = 1.0 / torch.einsum("hld,hd->hl", q + eps, k.sum(1) + eps)
    source_out = 1.0 / torch.einsum("hld,hd->hl", k + eps, q.sum(1) + eps)
    cons_sink = torch.einsum("hld,hd->hl", q + eps, (k * source_out[..., None]).sum(1) + eps)
    cons_source = torch.einsum("hld,hd->hl", k + eps, (q * sink_in[..., None]).sum(1) + eps)
    cons_source = cons_source.clamp(-1.0, 1.0)
    alloc = torch.sigmoid(cons_sink)
    comp = torch.softmax(cons_source, dim=-1) * float(n)
    kv = torch.einsum("hld,hlm->hdm", k, v * comp[..., None])
    out = torch.einsum("hld,hdm->hlm", q * sink_in[..., None], kv) * alloc[..., None]
    out = out.transpose(0, 1).reshape(n, -1)
    return F.linear(out, p[f"{pre}.out_projection.weight"], p[f"{pre}.out_projection.bias"])


def _mirror_sentence(x, table, p: dict, layers: int):
    """The reference forward over one sentence: counts ``x`` (scipy, cells x genes) -> ``mu``."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    x = x.tocoo()
    xs = torch.sparse_coo_tensor(
        np.vstack([x.row, x.col]), np.log1p(x.data), x.shape, dtype=torch.float32
    )
    h = torch.sparse.mm(xs, table)
    h = F.relu(F.linear(h, p["embedder.extra_linear.0.weight"], p["embedder.extra_linear.0.bias"]))
    h = F.group_norm(h, 4, p["embedder.extra_linear.3.weight"], p["embedder.extra_linear.3.bias"])
    for i in range(layers):
        pre = f"encoder.layers.{i}"
        y = F.layer_norm(h, (ENC,), p[f"{pre}.norm1.weight"], p[f"{pre}.norm1.bias"])
        h = h + _flow_attention(y, p, f"{pre}.self_attn", HEADS)
        y = F.layer_norm(h, (ENC,), p[f"{pre}.norm2.weight"], p[f"{pre}.norm2.bias"])
        y = F.gelu(F.linear(y, p[f"{pre}._ff_block.0.weight"], p[f"{pre}._ff_block.0.bias"]))
        h = h + F.linear(y, p[f"{pre}._ff_block.3.weight"], p[f"{pre}._ff_block.3.bias"])
    h = F.layer_norm(h, (ENC,), p["pre_latent_norm.norm.weight"], p["pre_latent_norm.norm.bias"])
    z = F.linear(h, p["latent.layers.1.hid_2mu.weight"], p["latent.layers.1.hid_2mu.bias"])
    F.linear(h, p["latent.layers.1.hid_2sigma.weight"], p["latent.layers.1.hid_2sigma.bias"])
    return z


def worker_mirror(args) -> None:
    import anndata as ad
    import numpy as np
    import pandas as pd
    import torch

    C.set_threads(args.threads)
    rel = Path(args.release)
    cfg = json.loads((rel / f"{PREFIX}.config.json").read_text())
    p = torch.load(rel / f"{PREFIX}.best.ckpt", weights_only=True)["model_state_dict"]
    adata = ad.read_h5ad(args.data)
    index = {g: i for i, g in enumerate(cfg["gene_list"])}
    peak = C.matmul_peak_gflops()
    with C.Timer() as t, torch.no_grad():
        keep = [j for j, g in enumerate(adata.var_names) if g in index]
        rows = torch.as_tensor([index[adata.var_names[j]] for j in keep])
        table = p["embedder.feat_enc.emb"][rows]
        x = adata.X[:, keep].tocsr()
        batch = adata.obs["batch"].to_numpy()
        z = torch.empty(adata.n_obs, POST)
        for label in pd.unique(batch):  # one forward pass per sentence, as the reference
            cells = np.flatnonzero(batch == label)
            z[torch.as_tensor(cells)] = _mirror_sentence(x[cells], table, p, cfg["enc_layers"])
    C.report_embedding(args.out, z.numpy(), t.seconds, peak)


def add_sentences(parser: argparse.ArgumentParser) -> None:
    """This script's own option: how many sentences (``batch`` values) the cells form."""
    parser.add_argument(
        "--sentences", type=int, default=1, help="batch values the cells are spread over"
    )


def benchmark(args: argparse.Namespace) -> C.EmbeddingBenchmark:
    """:data:`BENCHMARK`, on an input of ``--sentences`` sentences (same release)."""
    k = args.sentences
    if k <= 1:
        return BENCHMARK
    return dataclasses.replace(
        BENCHMARK,
        write_data=lambda path, release, n: write_data(path, release, n, sentences=k),
        data_tag=f"-s{k}",
    )


def main(argv: list[str] | None = None) -> dict:
    return C.embedding_main(argv, sys.modules[__name__], benchmark, add_options=add_sentences)


if __name__ == "__main__":
    main()
