"""Geneformer cell-embedding throughput and memory: scfm vs a plain eager HF-style forward.

Both sides use the same randomly initialised V1-10M-sized weights (6 layers, hidden 256,
4 heads, FFN 512, vocab 25,426, 2,048 positions) on synthetic cells with ~1,900 expressed
vocabulary genes, batch 25.

* scfm: ``Geneformer.get_latent_representation`` (tokenises raw counts on the fly, groups
  cells by length, trims padding to the longest cell, SDPA attention, stops after the layer
  it needs: the reference default second-to-last layer).
* baseline: the reference EmbExtractor's forward as HF BERT "eager" runs it: pre-tokenised
  ids (tokenisation not timed), minibatches padded to their longest cell, attention scores
  and probabilities materialised (``softmax(QK^T / sqrt(d) + mask) V``), all hidden states
  kept (``output_hidden_states=True``), then the same pooling.

Each side runs in its own subprocess so that peak RSS (``ru_maxrss``) is its own; each
subprocess also times a float32 matmul to report achieved GFLOP/s as a fraction of the
machine's matmul peak. The baseline embeds fewer cells by default (``--baseline-cells``) to
keep the run short; throughput is a rate, so the ratio is unaffected.

Run: ``python benchmarks/geneformer_embed.py`` (about 2 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HIDDEN, LAYERS, HEADS, FFN, VOCAB, MAX_POS = 256, 6, 4, 512, 25426, 2048
N_GENES = 3000


def make_counts(n_cells: int, seed: int = 0) -> np.ndarray:
    """Counts with ~1,900 expressed genes per cell (lengths 1,700-2,048 after truncation)."""
    rng = np.random.default_rng(seed)
    n_expr = rng.integers(1700, 2100, size=n_cells)
    x = np.zeros((n_cells, N_GENES), dtype=np.float32)
    for i, k in enumerate(n_expr):
        cols = rng.choice(N_GENES, size=k, replace=False)
        x[i, cols] = rng.integers(1, 50, size=k)
    return x


def make_adata(n_cells: int):
    import anndata as ad
    import pandas as pd

    from scfm.data import load_geneformer_dictionaries

    dicts = load_geneformer_dictionaries(version="V1")
    genes = [g for g in dicts.token_dictionary if not g.startswith("<")][:N_GENES]
    return ad.AnnData(make_counts(n_cells), var=pd.DataFrame(index=genes))


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def forward_flops(lengths: np.ndarray, n_layers: int, padded_to: np.ndarray | None = None) -> float:
    """Matmul FLOPs of the encoder on the given sequence lengths (padding counted if given)."""
    n = lengths if padded_to is None else padded_to
    per_token = 2 * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * FFN)
    return float(np.sum(n * per_token + 2 * 2 * n.astype(np.float64) ** 2 * HIDDEN) * n_layers)


def run_scfm(weights: str, n_cells: int, batch_size: int) -> dict:
    from scfm.io import load_state_dict_strict
    from scfm.model import Geneformer

    adata = make_adata(n_cells)
    Geneformer.setup_anndata(adata)
    model = Geneformer(adata)  # V1-10M architecture and shipped V1 dictionaries
    load_state_dict_strict(model.module, torch.load(weights, weights_only=True))
    peak = matmul_gflops()
    t = time.perf_counter()
    z = model.get_latent_representation(batch_size=batch_size, progress_bar=False)
    dt = time.perf_counter() - t
    lengths = model.get_tokens()[1]
    flops = forward_flops(lengths, LAYERS - 1)  # layer -2: the last layer is never computed
    return {
        "cells_per_s": n_cells / dt,
        "seconds": dt,
        "gflops": flops / dt / 1e9,
        "matmul_gflops": peak,
        "maxrss_mb": _maxrss_mb(),
        "mean_length": float(lengths.mean()),
        "checksum": float(np.abs(z).sum()),
    }


def _eager_attention(x, mask_add, p, i):
    b, n, _ = x.shape
    hd = HIDDEN // HEADS

    def lin(h, name):
        return torch.nn.functional.linear(
            h, p[f"bert.encoder.layer.{i}.{name}.weight"], p[f"bert.encoder.layer.{i}.{name}.bias"]
        )

    q, k, v = (
        lin(x, f"attention.self.{m}").view(b, n, HEADS, hd).transpose(1, 2)
        for m in ("query", "key", "value")
    )
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd) + mask_add
    probs = torch.softmax(scores, dim=-1)
    return (probs @ v).transpose(1, 2).reshape(b, n, HIDDEN)


def _ln(x, p, name):
    return torch.nn.functional.layer_norm(
        x, (HIDDEN,), p[f"{name}.weight"], p[f"{name}.bias"], 1e-12
    )


def run_baseline(weights: str, n_cells: int, batch_size: int) -> dict:
    from scfm.model import Geneformer

    adata = make_adata(n_cells)
    Geneformer.setup_anndata(adata)
    tok = Geneformer(adata, num_hidden_layers=1)  # tokenizer only: ids computed up front
    ids, lengths = tok.get_tokens()
    del tok
    p = torch.load(weights, weights_only=True)
    order = np.argsort(-lengths, kind="stable")  # the reference sorts by length, descending
    peak = matmul_gflops()
    padded = np.zeros(n_cells, dtype=np.int64)
    t = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, n_cells, batch_size):
            idx = order[s : s + batch_size]
            n = int(lengths[idx].max())
            padded[idx] = n
            x_ids = torch.as_tensor(np.where(ids[idx, :n] < 0, 0, ids[idx, :n]))
            mask = torch.as_tensor(ids[idx, :n] >= 0)
            mask_add = (~mask)[:, None, None, :].float() * torch.finfo(torch.float32).min
            x = p["bert.embeddings.word_embeddings.weight"][x_ids]
            x = x + p["bert.embeddings.position_embeddings.weight"][:n]
            x = x + p["bert.embeddings.token_type_embeddings.weight"][0]
            x = _ln(x, p, "bert.embeddings.LayerNorm")
            states = [x]
            for i in range(LAYERS):
                pre = f"bert.encoder.layer.{i}."
                a = _eager_attention(x, mask_add, p, i)
                a = torch.nn.functional.linear(
                    a,
                    p[pre + "attention.output.dense.weight"],
                    p[pre + "attention.output.dense.bias"],
                )
                a = _ln(a + x, p, pre + "attention.output.LayerNorm")
                h = torch.relu(
                    torch.nn.functional.linear(
                        a, p[pre + "intermediate.dense.weight"], p[pre + "intermediate.dense.bias"]
                    )
                )
                h = torch.nn.functional.linear(
                    h, p[pre + "output.dense.weight"], p[pre + "output.dense.bias"]
                )
                x = _ln(h + a, p, pre + "output.LayerNorm")
                states.append(x)
            emb = states[LAYERS - 1]
            w = mask.float()[..., None]
            _ = ((emb * w).sum(1) / w.sum(1)).numpy()
    dt = time.perf_counter() - t
    flops = forward_flops(lengths, LAYERS, padded_to=padded)
    return {
        "cells_per_s": n_cells / dt,
        "seconds": dt,
        "gflops": flops / dt / 1e9,
        "matmul_gflops": peak,
        "maxrss_mb": _maxrss_mb(),
        "mean_length": float(lengths.mean()),
    }


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=200)
    parser.add_argument("--baseline-cells", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--worker", choices=["scfm", "baseline"])
    parser.add_argument("--weights")
    args = parser.parse_args()
    if args.worker:
        fn = run_scfm if args.worker == "scfm" else run_baseline
        print(json.dumps(fn(args.weights, args.cells, args.batch_size)))
        return

    from scfm.nn import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=MAX_POS,
    )
    bert = BertModel(config)
    from scfm.nn import BertLMHead

    state = {f"bert.{k}": v for k, v in bert.state_dict().items()}
    state.update({f"cls.{k}": v for k, v in BertLMHead(config).state_dict().items()})
    with tempfile.TemporaryDirectory() as tmp:
        weights = str(Path(tmp) / "weights.pt")
        torch.save(state, weights)
        results = {}
        for worker, n in (("scfm", args.cells), ("baseline", args.baseline_cells)):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    worker,
                    "--weights",
                    weights,
                    "--cells",
                    str(n),
                    "--batch-size",
                    str(args.batch_size),
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            results[worker] = json.loads(out.strip().splitlines()[-1])
    s, b = results["scfm"], results["baseline"]
    print(
        f"threads: {torch.get_num_threads()}, batch {args.batch_size}, "
        f"mean tokens/cell {s['mean_length']:.0f}"
    )
    for name, r, n in (
        ("scfm", s, args.cells),
        ("baseline (eager, padded)", b, args.baseline_cells),
    ):
        print(
            f"{name:26s} {n:4d} cells  {r['cells_per_s']:6.2f} cells/s  peak RSS "
            f"{r['maxrss_mb']:7.0f} MB  {r['gflops']:6.1f} GFLOP/s = "
            f"{100 * r['gflops'] / r['matmul_gflops']:4.1f}% of matmul peak "
            f"({r['matmul_gflops']:.1f} GFLOP/s)"
        )
    print(f"ratio cells/s scfm / baseline: {s['cells_per_s'] / b['cells_per_s']:.2f}x")
    print(f"ratio peak RSS scfm / baseline: {s['maxrss_mb'] / b['maxrss_mb']:.3f}")


if __name__ == "__main__":
    main()
