"""Geneformer cell embeddings at release size: scfm vs the reference EmbExtractor (or a mirror).

Writes a randomly initialised release in the released layout (HF ``BertForMaskedLM``
directory: ``config.json``, ``model.safetensors`` without the tied decoder, the four
dictionary pickles) for V1-10M (6 layers, 256 wide, 2,048 inputs, 25,426 tokens) or V2-104M
(12 layers, 768 wide, 4,096 inputs, 20,275 tokens) and an ``.h5ad`` of raw counts with
~1,900 expressed genes per cell, then runs each side in its own process:

* ``scfm``: ``Geneformer.from_pretrained(release, adata).get_latent_representation()``
  (tokenises on the fly; timed end to end, model loading excluded).
* ``reference`` (``--reference-dir`` = a checkout of ctheodoris/Geneformer, run with the
  checkout's ``.venv`` interpreter or ``--reference-python``): ``TranscriptomeTokenizer``
  (its time is reported separately as ``baseline_prepare_seconds``) then
  ``EmbExtractor(model_type="Pretrained", emb_mode="cell"|"cls", emb_layer=-1,
  forward_batch_size=100).extract_embs``; the time of the reference ``get_embs`` (the forward
  passes) is the baseline time. The reference hard-codes ``"cuda"``; the adapter maps it to the
  CPU at run time (no file of the checkout is changed).
* ``mirror`` (no checkout): the same path written here: the reference tokenisation in numpy,
  then HF ``BertForMaskedLM(output_hidden_states=True)`` over length-sorted minibatches of
  100 padded cells, pooled as EmbExtractor pools.

Prints a summary and, last, ``RESULT {json}`` (protocol in benchmarks/README.md).

    python benchmarks/geneformer_embed.py --variant V1 [--cells 40] [--quick]
    python benchmarks/geneformer_embed.py --variant V2 --reference-dir /path/to/Geneformer
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

VARIANTS = {
    # layers, hidden, heads, ffn, max positions, dictionary suffix
    "V1": {
        "layers": 6,
        "hidden": 256,
        "heads": 4,
        "ffn": 512,
        "positions": 2048,
        "suffix": "gc30M",
    },
    "V2": {
        "layers": 12,
        "hidden": 768,
        "heads": 12,
        "ffn": 3072,
        "positions": 4096,
        "suffix": "gc104M",
    },
}
CELLS = {"V1": (40, 16), "V2": (8, 4)}  # cells embedded: default, --quick
N_GENES, N_EXPRESSED = 3000, 1900
REF_BATCH = 100  # EmbExtractor's default forward_batch_size
REFERENCE = "checkout of ctheodoris/Geneformer"


# --------------------------------------------------------------------------- release files
def _resource(name: str) -> Path:
    from importlib.resources import files

    return Path(str(files("scfm.data") / "resources" / "geneformer" / name))


def _dictionaries(variant: str) -> dict[str, dict]:
    """Token, median, name and mapping dictionaries of the release (real where scfm ships them)."""
    tokens_v1 = C.read_pickle(_resource("token_dictionary_gc30M.pkl"))
    medians_v1 = C.read_pickle(_resource("gene_median_dictionary_gc30M.pkl"))
    names = C.read_pickle(_resource("gene_name_id_dict_gc30M.pkl"))
    if variant == "V1":
        tokens = tokens_v1
        medians = medians_v1
    else:
        tokens = C.read_pickle(_resource("token_dictionary_gc104M.pkl"))
        # the V2 median dictionary is not available offline: V1 medians where known, else
        # distinct values near 1.5 (no ties in the ranking, so both sides' sorts agree)
        genes_v2 = [g for g in tokens if not g.startswith("<")]
        medians = {
            g: float(medians_v1[g]) if g in medians_v1 else 1.5 + 1e-4 * i
            for i, g in enumerate(genes_v2)
        }
    genes = {g for g in tokens if not g.startswith("<")}
    names = {k: v for k, v in names.items() if v in genes}
    mapping = {g: g for g in genes}
    return {
        "token_dictionary": tokens,
        "gene_median_dictionary": medians,
        "gene_name_id_dict": names,
        "ensembl_mapping_dict": mapping,
    }


def _weight_and_bias(name: str, *shape: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the ``weight`` and ``bias`` of a dense layer or LayerNorm, in that order."""
    return {f"{name}.weight": shape, f"{name}.bias": shape[:1]}


def write_release(directory: Path, variant: str, seed: int = 0) -> Path:
    """A random Geneformer release (HF BertForMaskedLM layout) of the released size."""
    import torch
    from safetensors.torch import save_file

    spec = VARIANTS[variant]
    marker = directory / "config.json"
    if marker.exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    dicts = _dictionaries(variant)
    for stem, d in dicts.items():
        with open(directory / f"{stem}_{spec['suffix']}.pkl", "wb") as fh:
            pickle.dump(d, fh)
    vocab = len(dicts["token_dictionary"])
    h, f, p = spec["hidden"], spec["ffn"], spec["positions"]
    # the random weights are drawn in this key order: keep it, or the release changes
    shapes: dict[str, tuple[int, ...]] = {
        "bert.embeddings.word_embeddings.weight": (vocab, h),
        "bert.embeddings.position_embeddings.weight": (p, h),
        "bert.embeddings.token_type_embeddings.weight": (2, h),
        **_weight_and_bias("bert.embeddings.LayerNorm", h),
    }
    for i in range(spec["layers"]):
        pre = f"bert.encoder.layer.{i}."
        for m in ("query", "key", "value"):
            shapes.update(_weight_and_bias(f"{pre}attention.self.{m}", h, h))
        shapes.update(_weight_and_bias(f"{pre}attention.output.dense", h, h))
        shapes.update(_weight_and_bias(f"{pre}attention.output.LayerNorm", h))
        shapes.update(_weight_and_bias(f"{pre}intermediate.dense", f, h))
        shapes.update(_weight_and_bias(f"{pre}output.dense", h, f))
        shapes.update(_weight_and_bias(f"{pre}output.LayerNorm", h))
    shapes["cls.predictions.bias"] = (vocab,)
    shapes.update(_weight_and_bias("cls.predictions.transform.dense", h, h))
    shapes.update(_weight_and_bias("cls.predictions.transform.LayerNorm", h))
    gen = torch.Generator().manual_seed(seed)
    state = {k: C.random_tensor(s, k, gen).contiguous() for k, s in shapes.items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["BertForMaskedLM"],
        "attention_probs_dropout_prob": 0.02,
        "classifier_dropout": None,
        "hidden_act": "relu",
        "hidden_dropout_prob": 0.02,
        "hidden_size": h,
        "initializer_range": 0.02,
        "intermediate_size": f,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": p,
        "model_type": "bert",
        "num_attention_heads": spec["heads"],
        "num_hidden_layers": spec["layers"],
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
        "transformers_version": "4.46.3",
        "type_vocab_size": 2,
        "use_cache": True,
        "vocab_size": vocab,
    }
    marker.write_text(json.dumps(config, indent=2))
    return directory


def write_data(
    path: Path,
    variant: str,
    n_cells: int,
    n_expressed: int = N_EXPRESSED,
    seed: int = 1,
    spread: float = 0.1,
) -> Path:
    """Raw counts over 3,000 vocabulary genes; obs n_counts, orig_index; var ensembl_id.

    Each cell expresses ``n_expressed * (1 +- spread)`` genes (:func:`_common.synthetic_counts`).
    """
    import anndata as ad
    import numpy as np
    import pandas as pd

    if path.exists():
        return path
    tokens = _dictionaries(variant)["token_dictionary"]
    genes = [g for g in tokens if not g.startswith("<")][:N_GENES]
    x = C.synthetic_counts(n_cells, len(genes), n_expressed, seed=seed, spread=spread)
    obs = pd.DataFrame(
        {"n_counts": np.asarray(x.sum(1)).ravel(), "orig_index": np.arange(n_cells)},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    adata = ad.AnnData(x, obs=obs, var=pd.DataFrame({"ensembl_id": genes}, index=genes))
    path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)
    return path


def token_lengths(data: Path, release: Path, variant: str) -> list[int]:
    """Tokens per cell (specials included) the model must encode."""
    import anndata as ad
    import numpy as np

    spec = VARIANTS[variant]
    adata = ad.read_h5ad(data)
    tokens = C.read_pickle(release / f"token_dictionary_{spec['suffix']}.pkl")
    keep = np.array([g in tokens for g in adata.var_names])
    nnz = np.asarray((adata.X[:, keep] > 0).sum(1)).ravel()
    specials = 2 if variant == "V2" else 0
    return [int(min(n, spec["positions"] - specials) + specials) for n in nnz]


def workload(data: Path, release: Path, variant: str) -> tuple[float, dict[str, float]]:
    """FLOPs of the scfm embedding and the mean tokens per cell."""
    spec = VARIANTS[variant]
    lengths = token_lengths(data, release, variant)
    # the default embedding reads layer n-1: the last layer is work the model need not do;
    # V2 reads it at <cls> (V1 averages its genes), so layer n-1 runs one query per cell
    cls = variant == "V2"
    flops = C.bert_flops(lengths, spec["hidden"], spec["ffn"], spec["layers"] - 1, cls)
    return flops, {"mean_tokens": sum(lengths) / len(lengths)}


def add_variant(parser: argparse.ArgumentParser) -> None:
    """This script's own option: which release (``--variant V1|V2``)."""
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="V1")


def benchmark(args: argparse.Namespace) -> C.EmbeddingBenchmark:
    """The pieces of the ``--variant`` run."""
    variant = args.variant
    return C.EmbeddingBenchmark(
        name=f"geneformer-{variant}",
        model_class="Geneformer",
        cells=CELLS[variant],
        write_release=lambda directory: write_release(directory, variant),
        write_data=lambda path, _release, n: write_data(path, variant, n),
        workload=lambda data, release, _n: workload(data, release, variant),
        worker_options=("--variant", variant),
    )


# --------------------------------------------------------------------------- workers
def _cpu_only_cuda() -> None:
    """Map the reference's hard-coded ``"cuda"`` device strings to the CPU (no file changed)."""
    import torch

    if torch.cuda.is_available():
        return

    def fix(device):
        return "cpu" if isinstance(device, str) and device.startswith("cuda") else device

    tensor, to_t, to_m = torch.tensor, torch.Tensor.to, torch.nn.Module.to

    def _tensor(*a, device=None, **k):
        return tensor(*a, device=fix(device), **k)

    def _to_t(self, *a, **k):
        return to_t(self, *(fix(x) for x in a), **{n: fix(v) for n, v in k.items()})

    def _to_m(self, *a, **k):
        return to_m(self, *(fix(x) for x in a), **{n: fix(v) for n, v in k.items()})

    torch.tensor = _tensor
    torch.Tensor.to = _to_t
    torch.nn.Module.to = _to_m
    torch.cuda.empty_cache = lambda: None


def worker_reference(args) -> None:
    import tempfile

    import numpy as np

    C.set_threads(args.threads)
    sys.path.insert(0, str(Path(args.reference_dir).resolve()))
    _cpu_only_cuda()
    import geneformer
    from geneformer import EmbExtractor, TranscriptomeTokenizer, emb_extractor

    spec = VARIANTS[args.variant]
    rel = Path(args.release)
    files = {
        k: str(rel / f"{k}_{spec['suffix']}.pkl")
        for k in ("token_dictionary", "gene_median_dictionary", "ensembl_mapping_dict")
    }
    # V1 makes the reference read the package's gc30M files (Git LFS pointers in a plain
    # checkout): point those package attributes at the release's dictionaries.
    suffix = "_30M" if args.variant == "V1" else ""
    geneformer.TOKEN_DICTIONARY_FILE_30M = geneformer.TOKEN_DICTIONARY_FILE = files[
        "token_dictionary"
    ]
    setattr(geneformer, f"GENE_MEDIAN_FILE{suffix}", files["gene_median_dictionary"])
    setattr(geneformer, f"ENSEMBL_MAPPING_FILE{suffix}", files["ensembl_mapping_dict"])
    peak = C.matmul_peak_gflops()
    timings = {}
    get_embs = emb_extractor.get_embs

    def timed_get_embs(*a, **k):
        with C.Timer() as t:
            out = get_embs(*a, **k)
        timings["forward"] = t.seconds
        return out

    emb_extractor.get_embs = timed_get_embs
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "in"
        data_dir.mkdir()
        (data_dir / "cells.h5ad").symlink_to(Path(args.data).resolve())
        with C.Timer() as t_tok:
            tk = TranscriptomeTokenizer(
                {"orig_index": "orig_index"},
                nproc=1,
                model_input_size=spec["positions"],
                special_token=args.variant == "V2",
                model_version=args.variant,
                gene_median_file=files["gene_median_dictionary"],
                token_dictionary_file=files["token_dictionary"],
                gene_mapping_file=files["ensembl_mapping_dict"],
            )
            tk.tokenize_data(str(data_dir), tmp, "tok", file_format="h5ad")
        with C.Timer() as t_all:
            embex = EmbExtractor(
                model_type="Pretrained",
                num_classes=0,
                emb_mode="cell" if args.variant == "V1" else "cls",
                emb_layer=-1,
                forward_batch_size=REF_BATCH,
                max_ncells=None,
                nproc=1,
                emb_label=["orig_index"],
                model_version=args.variant,
                token_dictionary_file=files["token_dictionary"],
            )
            df = embex.extract_embs(args.release, f"{tmp}/tok.dataset", tmp, "embs")
    z = df.sort_values("orig_index").drop(columns=["orig_index"]).to_numpy(np.float32)
    C.report_embedding(
        args.out,
        z,
        timings["forward"],
        peak,
        prepare=t_tok.seconds,
        total=t_all.seconds + t_tok.seconds,
    )


def _reference_tokens(adata, release: Path, variant: str) -> list[list[int]]:
    """The reference tokenisation in numpy: counts / n_counts * 1e4 / median, ranked."""
    import numpy as np

    spec = VARIANTS[variant]
    tokens = C.read_pickle(release / f"token_dictionary_{spec['suffix']}.pkl")
    medians = C.read_pickle(release / f"gene_median_dictionary_{spec['suffix']}.pkl")
    keep = np.array([g in tokens and g in medians for g in adata.var_names])
    genes = adata.var_names[keep]
    ids = np.array([tokens[g] for g in genes])
    norm = np.array([medians[g] for g in genes])
    x = adata.X[:, keep].tocsr()
    total = np.asarray(adata.obs["n_counts"], dtype=np.float64)
    room = spec["positions"] - (2 if variant == "V2" else 0)
    out = []
    for i in range(adata.n_obs):
        row = x[i]
        vals = row.data / total[i] * 10_000 / norm[row.indices]
        order = np.argsort(-vals, kind="stable")[:room]
        seq = ids[row.indices[order]].tolist()
        if variant == "V2":
            seq = [tokens["<cls>"], *seq, tokens["<eos>"]]
        out.append(seq)
    return out


def worker_mirror(args) -> None:
    import anndata as ad
    import numpy as np
    import torch
    from transformers import BertForMaskedLM

    C.set_threads(args.threads)
    adata = ad.read_h5ad(args.data)
    with C.Timer() as t_tok:
        seqs = _reference_tokens(adata, Path(args.release), args.variant)
    model = BertForMaskedLM.from_pretrained(args.release, output_hidden_states=True).eval()
    layer = model.config.num_hidden_layers - 1  # EmbExtractor emb_layer=-1
    peak = C.matmul_peak_gflops()
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    z = np.zeros((len(seqs), model.config.hidden_size), dtype=np.float32)
    with C.Timer() as t, torch.no_grad():
        for s in range(0, len(order), REF_BATCH):
            idx = order[s : s + REF_BATCH]
            ids, mask = C.pad_sequences([seqs[i] for i in idx])
            h = model(input_ids=ids, attention_mask=mask).hidden_states[layer]
            if args.variant == "V2":
                emb = h[:, 0]
            else:
                w = mask[..., None].float()
                emb = (h * w).sum(1) / w.sum(1)
            z[idx] = emb.numpy()
    C.report_embedding(args.out, z, t.seconds, peak, prepare=t_tok.seconds)


# --------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> dict:
    return C.embedding_main(argv, sys.modules[__name__], benchmark, add_options=add_variant)


if __name__ == "__main__":
    main()
