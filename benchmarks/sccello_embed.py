"""scCello cell embeddings at release size: scfm vs the reference Trainer.predict (or a mirror).

Writes a randomly initialised release in the released layout (HF directory ``config.json`` +
``pytorch_model.bin`` with the ``PrototypeContrastiveForMaskedLM`` keys: 6 layers, 256 wide,
4 heads, FFN 512, 2,048 positions, 25,427 tokens; ``data/`` with the full-size token and
median dictionaries and the small ontology/label files of the test fixture) and an ``.h5ad``
of raw counts (~1,900 expressed genes per cell, CELLxGENE obs columns), then runs each side
in its own process:

* ``scfm``: ``ScCello.from_pretrained(release, adata).get_latent_representation()``.
* ``reference`` (``--reference-dir`` = a checkout of DeepGraphLearning/scCello; its
  ``.venv`` or ``--reference-python`` needs transformers 4.4x, datasets, networkx, rdflib):
  ``ProcessSingleCellData.from_h5ad_adata`` + ``TranscriptomeTokenizer`` (reported as
  ``baseline_prepare_seconds``), ``PrototypeContrastiveForMaskedLM.from_pretrained(...,
  output_hidden_states=True)`` and ``Trainer.predict`` with ``DataCollatorForCellClassification``
  (eval batch 24 as in ``cell_type_classification_bert_clustering.json``, no dataloader
  workers), embedding = ``predictions[1][:, -1]``. The adapter points the reference's data
  folder at the release's ``data/`` and maps its hard-coded ``"cuda"`` to the CPU.
* ``mirror`` (no checkout): the reference tokenisation in numpy and an HF ``BertModel`` with
  eager attention (the reference's attention classes subclass the eager ``BertSelfAttention``)
  and the release weights (the three legacy embedding rows summed into the token-type row), 24
  padded cells per minibatch, all hidden states kept, last-layer ``<cls>``.

    python benchmarks/sccello_embed.py [--cells 24] [--quick] [--reference-dir PATH]
"""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C
import geneformer_embed as GE

LAYERS, HIDDEN, HEADS, FFN, POSITIONS = 6, 256, 4, 512, 2048
CELLS = (24, 12)  # cells embedded: default, --quick
N_GENES, N_EXPRESSED = 3000, 1900
REF_BATCH = 24
REFERENCE = "checkout of DeepGraphLearning/scCello"
FIXTURE = C.BENCH_DIR.parent / "tests" / "data" / "fixtures" / "sccello"
#: where a release keeps its token and median dictionaries
VOCAB = Path("data") / "token_vocabulary"


def write_release(directory: Path, seed: int = 0) -> Path:
    """A random scCello release of the released size (fixture layout, full vocabulary)."""
    import numpy as np
    import torch

    if (directory / "config.json").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copytree(FIXTURE / "checkpoint" / "data", directory / "data", dirs_exist_ok=True)
    # scCello's vocabulary: Geneformer V1's genes (whose name table holds only those genes)
    v1 = GE._dictionaries("V1")
    medians, names = v1["gene_median_dictionary"], v1["gene_name_id_dict"]
    genes = sorted(g for g in v1["token_dictionary"] if not g.startswith("<"))
    tokens = {"<pad>": np.int16(0), "<mask>": np.int16(1)}
    tokens.update({g: np.int16(2 + i) for i, g in enumerate(genes)})
    with open(directory / VOCAB / "token_dictionary.pkl", "wb") as fh:
        pickle.dump(tokens, fh)
    with open(directory / VOCAB / "gene_median_dictionary.pkl", "wb") as fh:
        pickle.dump({g: float(medians[g]) for g in genes}, fh)
    id2name = {v: k for k, v in names.items()}
    with open(directory / VOCAB / "vocab_id2name.csv", "w") as fh:
        fh.write("ensembl_id,gene_name\n")
        for g in genes:
            if g in id2name:
                fh.write(f"{g},{id2name[g]}\n")
    vocab = len(tokens) + 1  # + <cls>, appended by the reference
    tiny = torch.load(FIXTURE / "checkpoint" / "pytorch_model.bin", weights_only=True)
    tiny_cfg = json.loads((FIXTURE / "checkpoint" / "config.json").read_text())
    dims = {
        tiny_cfg["hidden_size"]: HIDDEN,
        tiny_cfg["intermediate_size"]: FFN,
        tiny_cfg["vocab_size"]: vocab,
        tiny_cfg["max_position_embeddings"]: POSITIONS,
    }

    def draw(key: str, tiny_key: str, value: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if not value.is_floating_point() or tiny_key in ("ctgraph_sim", "cell_type_ancestor_mask"):
            if tiny_key.endswith("position_ids"):
                return torch.arange(POSITIONS)[None]
            return value.clone()
        shape = [
            dims.get(s, s) if tiny_key != "learned_centroid.weight" or j else s
            for j, s in enumerate(value.shape)
        ]
        return C.random_tensor(shape, key, gen)

    state = C.release_state(tiny, ".layer.{}.", LAYERS, draw, seed)
    for head in ("cls", "cell_cls"):  # one bias shared by dense_2 and the predictions
        state[f"{head}.predictions.dense_2.bias"] = state[f"{head}.predictions.bias"].clone()
    torch.save(state, directory / "pytorch_model.bin")
    cfg = dict(
        tiny_cfg,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        vocab_size=vocab,
        max_position_embeddings=POSITIONS,
        num_attention_heads=HEADS,
        num_hidden_layers=LAYERS,
        initializer_range=0.02,
    )
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    return directory


def write_data(path: Path, release: Path, n_cells: int, seed: int = 2) -> Path:
    import anndata as ad
    import pandas as pd

    if path.exists():
        return path
    tokens = C.read_pickle(release / VOCAB / "token_dictionary.pkl")
    genes = [g for g in tokens if not g.startswith("<")][:N_GENES]
    x = C.synthetic_counts(n_cells, len(genes), N_EXPRESSED, seed=seed)
    row = ad.read_h5ad(FIXTURE / "input.h5ad").obs.iloc[0]
    obs = pd.DataFrame(
        {c: [row[c]] * n_cells for c in row.index}, index=[f"cell{i}" for i in range(n_cells)]
    )
    adata = ad.AnnData(x, obs=obs, var=pd.DataFrame({"ensembl_ids": genes}, index=genes))
    adata.write_h5ad(path)
    return path


def token_lengths(data: Path, release: Path) -> list[int]:
    import anndata as ad
    import numpy as np

    adata = ad.read_h5ad(data)
    medians = C.read_pickle(release / VOCAB / "gene_median_dictionary.pkl")
    keep = np.array([g in medians for g in adata.var_names])
    nnz = np.asarray((adata.X[:, keep] > 0).sum(1)).ravel()
    return [int(min(n + 1, POSITIONS)) for n in nnz]


def workload(data: Path, release: Path, n_cells: int) -> tuple[float, dict[str, float]]:
    """FLOPs of the scfm embedding and the mean tokens per cell."""
    lengths = token_lengths(data, release)
    # the embedding reads the last layer at <cls>: its other tokens are work not needed
    flops = C.bert_flops(lengths, HIDDEN, FFN, LAYERS, cls_only_last=True)
    return flops, {"mean_tokens": sum(lengths) / len(lengths)}


BENCHMARK = C.EmbeddingBenchmark("sccello", "ScCello", CELLS, write_release, write_data, workload)


# --------------------------------------------------------------------------- workers
def worker_reference(args) -> None:
    import tempfile
    import types

    import anndata as ad
    import numpy as np

    C.set_threads(args.threads)
    import importlib.machinery
    import importlib.util

    for stub in ("wandb", "ipdb"):  # imported at module level by the reference, never used here
        if importlib.util.find_spec(stub) is None:
            module = types.ModuleType(stub)
            module.__spec__ = importlib.machinery.ModuleSpec(stub, None)
            sys.modules[stub] = module
    sys.path.insert(0, str(Path(args.reference_dir).resolve()))
    GE._cpu_only_cuda()
    from sccello.src.utils import data_loading

    data_loading.EXC_DIR = str(Path(args.release).resolve())  # the release's data/ folder
    from sccello.src.collator.collator_for_classification import DataCollatorForCellClassification
    from sccello.src.data.data_proc import ProcessSingleCellData
    from sccello.src.data.tokenizer import TranscriptomeTokenizer
    from sccello.src.model_prototype_contrastive import PrototypeContrastiveForMaskedLM
    from transformers import Trainer, TrainingArguments

    adata = ad.read_h5ad(args.data)
    peak = C.matmul_peak_gflops()
    with C.Timer() as t_tok:
        ds = ProcessSingleCellData.from_h5ad_adata(
            adata, "cells", is_cellxgene=True, require_raw=True
        )
        ds = TranscriptomeTokenizer(num_proc=1, truncate_length=POSITIONS).tokenize(ds)
    model = PrototypeContrastiveForMaskedLM.from_pretrained(args.release, output_hidden_states=True)
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp,
            per_device_eval_batch_size=REF_BATCH,
            report_to="none",
            dataloader_num_workers=0,
            disable_tqdm=True,
            use_cpu=True,
        )
        trainer = Trainer(
            model=model,
            args=targs,
            data_collator=DataCollatorForCellClassification(
                model_input_name=["input_ids"], pad_to_multiple_of=None
            ),
        )
        with C.Timer() as t:
            pred = trainer.predict(ds)
    p = pred.predictions
    z = np.asarray(p[1] if isinstance(p, tuple) else p)[:, -1, :]
    C.report_embedding(
        args.out, z, t.seconds, peak, prepare=t_tok.seconds, total=t.seconds + t_tok.seconds
    )


def worker_mirror(args) -> None:
    import anndata as ad
    import numpy as np
    import torch
    from transformers import BertConfig, BertModel

    C.set_threads(args.threads)
    rel = Path(args.release)
    adata = ad.read_h5ad(args.data)
    tokens = {k: int(v) for k, v in C.read_pickle(rel / VOCAB / "token_dictionary.pkl").items()}
    medians = C.read_pickle(rel / VOCAB / "gene_median_dictionary.pkl")
    cls_id = len(tokens)
    with C.Timer() as t_tok:
        keep = np.array([g in medians for g in adata.var_names])
        genes = adata.var_names[keep]
        ids = np.array([tokens[g] for g in genes])
        norm = np.array([medians[g] for g in genes])
        x = adata.X[:, keep].tocsr()
        seqs = []
        for i in range(adata.n_obs):
            row = x[i]
            vals = row.data * (10_000 / max(row.data.sum(), 1)) / norm[row.indices]
            order = np.argsort(-vals, kind="stable")
            seqs.append([cls_id, *ids[row.indices[order]].tolist()][:POSITIONS])
    cfg = json.loads((rel / "config.json").read_text())
    bert_config = BertConfig(
        **{
            k: cfg[k]
            for k in (
                "vocab_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "max_position_embeddings",
                "hidden_act",
                "layer_norm_eps",
            )
        },
        type_vocab_size=1,
    )
    # the reference's attention subclasses BertSelfAttention: eager, scores materialised
    bert_config._attn_implementation = "eager"
    bert = BertModel(bert_config, add_pooling_layer=False).eval()
    raw = torch.load(rel / "pytorch_model.bin", weights_only=True)
    sd = {k[5:]: v for k, v in raw.items() if k.startswith("bert.") and "position_ids" not in k}
    emb = "embeddings."
    sd[emb + "token_type_embeddings.weight"] = sum(
        sd.pop(emb + f"{n}_embeddings.weight") for n in ("tf_class", "tf_superclass", "expbin")
    )
    bert.load_state_dict(sd, strict=False)
    peak = C.matmul_peak_gflops()
    z = np.zeros((len(seqs), HIDDEN), dtype=np.float32)
    with C.Timer() as t, torch.no_grad():
        for s in range(0, len(seqs), REF_BATCH):
            idx = list(range(s, min(s + REF_BATCH, len(seqs))))
            ids_t, mask = C.pad_sequences([seqs[i] for i in idx])
            out = bert(input_ids=ids_t, attention_mask=mask, output_hidden_states=True)
            z[idx] = out.hidden_states[-1][:, 0].numpy()
    C.report_embedding(args.out, z, t.seconds, peak, prepare=t_tok.seconds)


def main(argv: list[str] | None = None) -> dict:
    return C.embedding_main(argv, sys.modules[__name__], BENCHMARK)


if __name__ == "__main__":
    main()
