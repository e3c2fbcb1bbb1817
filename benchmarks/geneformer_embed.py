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
CELLS = {"V1": 40, "V2": 8}
QUICK_CELLS = {"V1": 16, "V2": 4}
N_GENES, N_EXPRESSED = 3000, 1900
REF_BATCH = 100  # EmbExtractor's default forward_batch_size


# --------------------------------------------------------------------------- release files
def _resource(name: str) -> Path:
    from importlib.resources import files

    return Path(str(files("scfm.data") / "resources" / "geneformer" / name))


def _dictionaries(variant: str) -> dict[str, dict]:
    """Token, median, name and mapping dictionaries of the release (real where scfm ships them)."""
    with open(_resource("token_dictionary_gc30M.pkl"), "rb") as fh:
        tokens_v1 = pickle.load(fh)
    with open(_resource("gene_median_dictionary_gc30M.pkl"), "rb") as fh:
        medians_v1 = pickle.load(fh)
    with open(_resource("gene_name_id_dict_gc30M.pkl"), "rb") as fh:
        names = pickle.load(fh)
    if variant == "V1":
        tokens = tokens_v1
        medians = medians_v1
    else:
        with open(_resource("token_dictionary_gc104M.pkl"), "rb") as fh:
            tokens = pickle.load(fh)
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
    shapes: dict[str, tuple[int, ...]] = {
        "bert.embeddings.word_embeddings.weight": (vocab, h),
        "bert.embeddings.position_embeddings.weight": (p, h),
        "bert.embeddings.token_type_embeddings.weight": (2, h),
        "bert.embeddings.LayerNorm.weight": (h,),
        "bert.embeddings.LayerNorm.bias": (h,),
    }
    for i in range(spec["layers"]):
        pre = f"bert.encoder.layer.{i}."
        for m in ("query", "key", "value"):
            shapes[f"{pre}attention.self.{m}.weight"] = (h, h)
            shapes[f"{pre}attention.self.{m}.bias"] = (h,)
        shapes[f"{pre}attention.output.dense.weight"] = (h, h)
        shapes[f"{pre}attention.output.dense.bias"] = (h,)
        shapes[f"{pre}attention.output.LayerNorm.weight"] = (h,)
        shapes[f"{pre}attention.output.LayerNorm.bias"] = (h,)
        shapes[f"{pre}intermediate.dense.weight"] = (f, h)
        shapes[f"{pre}intermediate.dense.bias"] = (f,)
        shapes[f"{pre}output.dense.weight"] = (h, f)
        shapes[f"{pre}output.dense.bias"] = (h,)
        shapes[f"{pre}output.LayerNorm.weight"] = (h,)
        shapes[f"{pre}output.LayerNorm.bias"] = (h,)
    shapes.update(
        {
            "cls.predictions.bias": (vocab,),
            "cls.predictions.transform.dense.weight": (h, h),
            "cls.predictions.transform.dense.bias": (h,),
            "cls.predictions.transform.LayerNorm.weight": (h,),
            "cls.predictions.transform.LayerNorm.bias": (h,),
        }
    )
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


def write_data(path: Path, variant: str, n_cells: int, seed: int = 1) -> Path:
    """Raw counts over 3,000 vocabulary genes; obs n_counts, orig_index; var ensembl_id."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    if path.exists():
        return path
    tokens = _dictionaries(variant)["token_dictionary"]
    genes = [g for g in tokens if not g.startswith("<")][:N_GENES]
    x = C.synthetic_counts(n_cells, len(genes), N_EXPRESSED, seed=seed)
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
    with open(release / f"token_dictionary_{spec['suffix']}.pkl", "rb") as fh:
        tokens = pickle.load(fh)
    keep = np.array([g in tokens for g in adata.var_names])
    nnz = np.asarray((adata.X[:, keep] > 0).sum(1)).ravel()
    specials = 2 if variant == "V2" else 0
    return [int(min(n, spec["positions"] - specials) + specials) for n in nnz]


# --------------------------------------------------------------------------- workers
def worker_scfm(args) -> None:
    C.scfm_embedding_worker(args, "Geneformer")


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
    np.save(args.out, z)
    C.worker_report(
        cells=len(z),
        seconds=timings["forward"],
        prepare_seconds=t_tok.seconds,
        total_seconds=t_all.seconds + t_tok.seconds,
        matmul_gflops=peak,
    )


def _reference_tokens(adata, release: Path, variant: str) -> list[list[int]]:
    """The reference tokenisation in numpy: counts / n_counts * 1e4 / median, ranked."""
    import numpy as np

    spec = VARIANTS[variant]
    with open(release / f"token_dictionary_{spec['suffix']}.pkl", "rb") as fh:
        tokens = pickle.load(fh)
    with open(release / f"gene_median_dictionary_{spec['suffix']}.pkl", "rb") as fh:
        medians = pickle.load(fh)
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
            n = max(len(seqs[i]) for i in idx)
            ids = torch.zeros(len(idx), n, dtype=torch.long)
            mask = torch.zeros(len(idx), n, dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, : len(seqs[i])] = torch.as_tensor(seqs[i])
                mask[r, : len(seqs[i])] = 1
            h = model(input_ids=ids, attention_mask=mask).hidden_states[layer]
            if args.variant == "V2":
                emb = h[:, 0]
            else:
                w = mask[..., None].float()
                emb = (h * w).sum(1) / w.sum(1)
            z[idx] = emb.numpy()
    np.save(args.out, z)
    C.worker_report(
        cells=len(seqs), seconds=t.seconds, prepare_seconds=t_tok.seconds, matmul_gflops=peak
    )


# --------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="V1")
    C.add_cli(parser, "checkout of ctheodoris/Geneformer")
    args = parser.parse_args(argv)
    if C.run_worker_if_asked(
        args, scfm=worker_scfm, reference=worker_reference, mirror=worker_mirror
    ):
        return {}
    n = args.cells or (QUICK_CELLS if args.quick else CELLS)[args.variant]
    work = C.work_dir(args.work_dir)
    release = C.build_once(
        work / f"geneformer-{args.variant}", lambda d: write_release(d, args.variant)
    )
    data = C.build_once(
        work / f"geneformer-{args.variant}-cells{n}.h5ad", lambda p: write_data(p, args.variant, n)
    )
    common = ["--variant", args.variant, "--release", str(release), "--data", str(data)]
    scfm, base, kind, cmp = C.run_sides(__file__, f"geneformer-{args.variant}", args, common)
    spec = VARIANTS[args.variant]
    # the default embedding reads layer n-1: the last layer is work the model need not do;
    # V2 reads it at <cls> (V1 averages its genes), so layer n-1 runs one query per cell
    lengths = token_lengths(data, release, args.variant)
    cls = args.variant == "V2"
    flops = C.bert_flops(lengths, spec["hidden"], spec["ffn"], spec["layers"] - 1, cls)
    extra = {"cells": n, "mean_tokens": sum(lengths) / len(lengths), **cmp}
    return C.report(f"geneformer-{args.variant}", scfm, base, kind, flops, extra)


if __name__ == "__main__":
    main()
