"""How close to the matmul peak a BERT embedding can get on this machine: the attainable ceiling.

``pct_peak`` divides the FLOPs a model must do by this machine's float32 matmul peak, which
is measured on large square GEMMs. Attention does half of its FLOPs in ``Q K^T`` products
whose inner dimension is the head width (64), and GEMMs that thin run well below the square
rate on CPUs. This script times, in this process, each GEMM shape of one encoder layer at
release size (one cell of ``--tokens`` tokens, one head at a time for attention, as every
attention kernel does) and SDPA itself, then prints per model:

* the FLOP share of attention;
* the rate of every shape as % of the peak;
* ``ceiling_gemm``: % of the peak if every FLOP ran at the rate of its own GEMM shape and
  softmax cost nothing;
* ``ceiling_sdpa``: the same with attention at the rate of torch's SDPA kernel.

Measured in one process, the peak and every shape in interleaved rounds (best of each), so a
clock change on a shared machine does not land on one side of a ratio.

    python benchmarks/bert_ceiling.py [--tokens 1900] [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

#: width, heads, FFN width of the released encoders (V1 and scCello share one shape)
MODELS = {
    "geneformer-V1": (256, 4, 512),
    "sccello": (256, 4, 512),
    "geneformer-V2": (768, 12, 3072),
}


def _rate(fn, flops: float, repeats: int = 3, trials: int = 3) -> float:
    """Best GFLOP/s of ``fn`` (one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats)
    return flops / best / 1e9


def layer_rates(tokens: int, hidden: int, heads: int, ffn: int) -> dict[str, tuple[float, float]]:
    """``{shape: (FLOPs of one layer, GFLOP/s)}`` of one cell of ``tokens`` tokens."""
    import torch
    import torch.nn.functional as F

    n, d = tokens, hidden // heads
    x, h = torch.randn(n, hidden), torch.randn(n, ffn)
    out: dict[str, tuple[float, float]] = {}
    for name, a, b in (
        ("qkv", x, torch.randn(hidden, 3 * hidden)),
        ("attention output", x, torch.randn(hidden, hidden)),
        ("ffn in", x, torch.randn(hidden, ffn)),
        ("ffn out", h, torch.randn(ffn, hidden)),
    ):
        flops = 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
        out[name] = (flops, _rate(lambda a=a, b=b: a @ b, flops))
    q, k, v = (torch.randn(1, heads, n, d) for _ in range(3))
    scores = torch.randn(n, n)
    per_head = 2.0 * n * n * d
    qk = _rate(lambda: q[0, 0] @ k[0, 0].t(), per_head)
    pv = _rate(lambda: scores @ v[0, 0], per_head)
    out["attention q.k"] = (heads * per_head, qk)
    out["attention p.v"] = (heads * per_head, pv)
    sdpa = _rate(lambda: F.scaled_dot_product_attention(q, k, v), 2 * heads * per_head)
    out["sdpa"] = (2 * heads * per_head, sdpa)
    return out


def ceilings(rates: dict[str, tuple[float, float]], peak: float) -> dict[str, float]:
    """Attention FLOP share and the two ceilings (% of ``peak``) from :func:`layer_rates`."""
    linear = [rates[k] for k in ("qkv", "attention output", "ffn in", "ffn out")]
    attention = [rates["attention q.k"], rates["attention p.v"]]
    total = sum(f for f, _ in linear + attention)
    t_linear = sum(f / r for f, r in linear)
    t_gemm = t_linear + sum(f / r for f, r in attention)
    t_sdpa = t_linear + rates["sdpa"][0] / rates["sdpa"][1]
    return {
        "attention_share": 100 * sum(f for f, _ in attention) / total,
        "ceiling_gemm": 100 * total / t_gemm / peak,
        "ceiling_sdpa": 100 * total / t_sdpa / peak,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1900, help="tokens of the cell")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best of)")
    args = parser.parse_args(argv)
    C.set_threads(args.threads)
    for model in args.models:
        # best of interleaved rounds for the peak and every shape: clock changes on a shared
        # machine then cancel instead of landing on one side of the ratio
        peak, rates = 0.0, {}
        for _ in range(args.rounds):
            peak = max(peak, C.matmul_peak_gflops())
            for k, (f, r) in layer_rates(args.tokens, *MODELS[model]).items():
                rates[k] = (f, max(r, rates.get(k, (f, 0.0))[1]))
        peak = max(peak, C.matmul_peak_gflops())
        shapes = "  ".join(f"{k} {100 * r / peak:.0f}%" for k, (_, r) in rates.items())
        c = ceilings(rates, peak)
        print(
            f"{model} tokens={args.tokens} attention_share={c['attention_share']:.0f}% "
            f"ceiling_gemm={c['ceiling_gemm']:.0f}% ceiling_sdpa={c['ceiling_sdpa']:.0f}% "
            f"peak={peak:.0f} GFLOP/s\n   {shapes}"
        )


if __name__ == "__main__":
    main()
