"""scFoundation cell embeddings at release size: scfm vs the reference get_embedding.py (or mirror).

Writes a randomly initialised release in the released layout (``models/models.ckpt``: one
``torch.save`` dict holding three different full ``MaeAutobin`` models under ``'cell'``,
``'rde'`` and ``'gene'``, each ``{'config': nested dict, 'state_dict': 'model.'-prefixed
keys}``, 768 x 12 encoder, 512 x 6 Performer decoder, 19,266 positions, 100 bins, as in the
layout of ``tests/data/fixtures/scfoundation/checkpoint``; plus the 19,264-gene list) and an
``.h5ad`` of raw counts over 10,000 of the list's genes in shuffled order (~1,900 expressed
genes per cell), then runs each side in its own process:

* ``scfm``: ``ScFoundation.from_pretrained(release, adata).get_latent_representation()``
  (only the ``'cell'`` weights are read).
* ``reference`` (``--reference-dir`` = a checkout of biomap-research/scFoundation, or its
  ``model/`` folder; the interpreter (``--reference-python`` or ``<checkout>/.venv``) needs
  torch, scanpy, einops and local-attention): ``model/get_embedding.py`` run unchanged as a
  script (``--input_type singlecell --output_type cell --pool_type all --tgthighres t4
  --pre_normalized F --version ce``) in a scratch folder laid out as it expects
  (``./models/models.ckpt``, ``./OS_scRNA_gene_index.19264.tsv``). Run-time shims only:
  ``Tensor.cuda`` / ``Module.cuda`` are no-ops (CPU machine), and the ``tqdm`` it wraps its
  one-cell-at-a-time loop in is timed (that loop is the timed part; reading the data and
  the model is not).
* ``mirror`` (no checkout): the reference path re-written here: the whole ``models.ckpt``
  read, one dense float64 cell at a time, its non-zero values gathered, torch
  ``nn.TransformerEncoderLayer`` layers called with the all-``False`` key-padding mask the
  reference passes, pooling ``all``.

    python benchmarks/scfoundation_embed.py [--cells 6] [--quick] [--reference-dir PATH]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

CELLS = (6, 3)  # cells embedded: default, --quick
N_GENES, N_EXPRESSED = 10_000, 1900
#: Architecture of the released models (spec section 1).
HIDDEN, DEPTH, HEADS, DEC_HIDDEN, DEC_DEPTH, DEC_HEADS, DIM_HEAD, BINS = (
    768, 12, 12, 512, 6, 8, 64, 100
)  # fmt: skip
SEQ_LEN = 19_266
GENE_LIST = "OS_scRNA_gene_index.19264.tsv"
REFERENCE = "checkout of biomap-research/scFoundation (or its model/ folder)"
FIXTURE = C.BENCH_DIR.parent / "tests" / "data" / "fixtures" / "scfoundation"


def write_release(directory: Path, seed: int = 0) -> Path:
    """A random release of the released size: three different models in one ``models.ckpt``."""
    import copy
    from importlib.resources import files

    import torch

    from scfm.module import ScFoundationConfig, ScFoundationModule

    tiny = torch.load(FIXTURE / "checkpoint" / "models" / "models.ckpt", weights_only=True)
    config = copy.deepcopy(tiny["cell"]["config"])
    arch = config["model_config"]["mae_autobin"]
    arch.update(seq_len=SEQ_LEN, gene_num=SEQ_LEN, bin_num=BINS)
    arch["encoder"].update(hidden_dim=HIDDEN, depth=DEPTH, heads=HEADS, dim_head=DIM_HEAD,
                           seq_len=SEQ_LEN)  # fmt: skip
    arch["decoder"].update(hidden_dim=DEC_HIDDEN, depth=DEC_DEPTH, heads=DEC_HEADS,
                           dim_head=DIM_HEAD, seq_len=SEQ_LEN)  # fmt: skip
    config["dataset_config"]["rnaseq"]["bin_num"] = BINS
    with torch.device("meta"):  # only the key set and shapes are needed
        shapes = {
            k: tuple(v.shape)
            for k, v in ScFoundationModule(
                ScFoundationConfig.from_reference(
                    {**arch, **config["dataset_config"]["rnaseq"], "model_type": "mae_autobin"}
                )
            )
            .state_dict()
            .items()
        }
    gen = torch.Generator().manual_seed(seed)
    release = {}
    for name in ("cell", "rde", "gene"):
        state = {}
        for key, shape in shapes.items():
            if key.endswith("calls_since_last_redraw"):
                state["model." + key] = torch.tensor(0)
            else:
                state["model." + key] = C.random_tensor(shape, key, gen)
        release[name] = {"config": copy.deepcopy(config), "state_dict": state}
    (directory / "models").mkdir(parents=True)
    torch.save(release, directory / "models" / "models.ckpt")
    shipped = files("scfm.data") / "resources" / "scfoundation" / GENE_LIST
    (directory / GENE_LIST).write_bytes(shipped.read_bytes())
    return directory


def write_data(path: Path, release: Path, n_cells: int, seed: int = 3) -> Path:
    """Raw counts over ``N_GENES`` genes of the list, in shuffled order (the reference aligns)."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    genes = pd.read_csv(release / GENE_LIST, sep="\t")["gene_name"].to_numpy()
    genes = np.random.default_rng(seed).permutation(genes)[:N_GENES]
    x = C.synthetic_counts(n_cells, len(genes), N_EXPRESSED, seed=seed)
    adata = ad.AnnData(x, var=pd.DataFrame(index=genes.astype(str)))
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    adata.write_h5ad(path)
    return path


def token_lengths(data: Path) -> list[int]:
    """Encoder tokens per cell: the expressed genes plus the T and S tokens."""
    import anndata as ad
    import numpy as np

    x = ad.read_h5ad(data).X
    return (np.diff(x.indptr) + 2).tolist()


def encoder_flops(lengths: list[int]) -> float:
    """Encoder FLOPs (2 per multiply-add, attention included) over unpadded cells."""
    import numpy as np

    n = np.asarray(lengths, dtype=np.float64)
    return float(((24 * HIDDEN * HIDDEN * n + 4 * n**2 * HIDDEN) * DEPTH).sum())


def workload(data: Path, _release: Path, _n_cells: int) -> tuple[float, dict[str, float]]:
    """FLOPs of the scfm embedding's encoder and the mean tokens per cell."""
    lengths = token_lengths(data)
    return encoder_flops(lengths), {"mean_tokens": sum(lengths) / len(lengths)}


BENCHMARK = C.EmbeddingBenchmark(
    "scfoundation", "ScFoundation", CELLS, write_release, write_data, workload
)


# --------------------------------------------------------------------------- workers
def worker_reference(args) -> None:
    import runpy
    import tempfile

    import numpy as np
    import scanpy  # noqa: F401  (imported by the reference; before tqdm is wrapped below)
    import torch
    import tqdm

    C.set_threads(args.threads)
    root = Path(args.reference_dir).resolve()
    model_dir = root / "model" if (root / "model" / "get_embedding.py").exists() else root
    # CPU machine: the reference moves the model and every input with .cuda()
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    times: dict[str, float] = {}
    plain_tqdm = tqdm.tqdm

    def timed_loop(iterable, *a, **k):
        # get_embedding.py runs its inference loop as `for i in tqdm(range(n))`
        start = time.perf_counter()
        yield from iterable
        times["loop"] = time.perf_counter() - start

    peak = C.matmul_peak_gflops()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        os.symlink(Path(args.release).resolve() / "models", scratch / "models")
        os.symlink(Path(args.release).resolve() / GENE_LIST, scratch / GENE_LIST)
        argv, cwd = sys.argv, os.getcwd()
        sys.argv = ["get_embedding.py", "--task_name", "bench", "--input_type", "singlecell",
                    "--output_type", "cell", "--pool_type", "all", "--tgthighres", "t4",
                    "--pre_normalized", "F", "--version", "ce",
                    "--data_path", str(Path(args.data).resolve()), "--save_path", tmp]  # fmt: skip
        sys.path.insert(0, str(model_dir))
        tqdm.tqdm = timed_loop
        os.chdir(scratch)
        try:
            with C.Timer() as total:
                runpy.run_path(str(model_dir / "get_embedding.py"), run_name="__main__")
        finally:
            os.chdir(cwd)
            sys.argv, tqdm.tqdm = argv, plain_tqdm
        (out,) = scratch.glob("*.npy")
        z = np.load(out).reshape(-1, 4 * HIDDEN)
    C.report_embedding(args.out, z, times["loop"], peak, total=total.seconds)


def worker_mirror(args) -> None:
    import anndata as ad
    import numpy as np
    import torch
    from torch import nn

    from scfm.data import scfoundation_gather, scfoundation_preprocess
    from scfm.io._scfoundation import flatten_scfoundation_config
    from scfm.module import ScFoundationConfig, ScFoundationModule

    C.set_threads(args.threads)
    rel = Path(args.release)
    # the reference reads the whole file, keeps one model and copies it into a fresh one
    entry = torch.load(rel / "models" / "models.ckpt", map_location="cpu", weights_only=True)
    entry = entry["cell"]
    config = ScFoundationConfig.from_reference(flatten_scfoundation_config(entry["config"]))
    module = ScFoundationModule(config).eval()
    state = {k.split("model.", 1)[1]: v for k, v in entry.pop("state_dict").items()}
    module.load_state_dict(state)
    del state, entry
    encoder = nn.ModuleDict(
        {
            "transformer_encoder": nn.ModuleList(
                nn.TransformerEncoderLayer(HIDDEN, HEADS, 4 * HIDDEN, batch_first=True)
                for _ in range(DEPTH)
            ),
            "norm": nn.LayerNorm(HIDDEN),
        }
    ).eval()
    encoder.load_state_dict(module.encoder.state_dict(), assign=True)  # shares the weights
    genes = (rel / GENE_LIST).read_text().splitlines()[1:]
    position = {g.split("\t")[0]: i for i, g in enumerate(genes)}
    adata = ad.read_h5ad(args.data)
    cols = np.array([position.get(g, -1) for g in adata.var_names])
    x = np.zeros((adata.n_obs, len(genes)))  # dense, vocabulary order, as the reference
    x[:, cols[cols >= 0]] = adata.X.toarray()[:, cols >= 0]
    peak = C.matmul_peak_gflops()
    out = []
    with C.Timer() as t, torch.no_grad():
        for i in range(adata.n_obs):
            values = scfoundation_preprocess(torch.as_tensor(x[i : i + 1]), "F", "t4")
            gathered, ids, padding = scfoundation_gather(values)
            h = module.token_emb(gathered.float()) + module.pos_emb(ids)
            for layer in encoder["transformer_encoder"]:
                h = layer(h, src_key_padding_mask=padding)
            h = encoder["norm"](h)
            out.append(torch.cat([h[:, -1], h[:, -2], h[:, :-2].amax(1), h[:, :-2].mean(1)], dim=1))
    C.report_embedding(args.out, torch.cat(out).numpy(), t.seconds, peak)


def main(argv: list[str] | None = None) -> dict:
    return C.embedding_main(argv, sys.modules[__name__], BENCHMARK)


if __name__ == "__main__":
    main()
