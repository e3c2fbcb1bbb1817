"""Reader of NVIDIA BioNeMo Geneformer checkpoints (geneformer-10M/106M-240530).

BioNeMo trains Geneformer with Megatron-core: pre-LayerNorm layers, GELU, fused QKV, no
embedding LayerNorm, no token types, a word embedding padded to a multiple of 128 rows and an
output layer tied to it. The weights come as

* a NeMo2 checkpoint directory (``weights/`` in torch distributed-checkpoint format, read with
  :mod:`torch.distributed.checkpoint`; keys under ``module.``),
* a NeMo1 ``.nemo`` tarball (``model_weights.ckpt`` inside, keys under
  ``model.language_model.``), or
* a plain torch / safetensors file holding either key layout.

Keys are first normalised to NeMo2 names (the NeMo1 -> NeMo2 renames of BioNeMo's converter),
then mapped onto :class:`~scfm.nn.BertModel` in its pre-LN form by :data:`_RENAMES`; the fused
``linear_qkv`` is split per head (Megatron layout ``[heads, 3, head_dim, H]``). The exact key
list of the released files is UNVERIFIED (built from BioNeMo's code, see the spec).
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
import tempfile
import warnings
from pathlib import Path

import torch

from scfm.data._geneformer_tokenizer import GeneformerDictionaries, load_geneformer_dictionaries
from scfm.errors import CheckpointFormatError, CheckpointKeyError
from scfm.io._common import Release, load_safetensors_file, load_torch_file
from scfm.module._geneformer import GeneformerConfig

logger = logging.getLogger(__name__)

__all__ = ["bionemo_to_module_state_dict", "read_bionemo_geneformer"]

#: Attention heads of the released models by hidden size (not stored in the weights).
RELEASED_HEADS = {256: 4, 768: 12}
#: NeMo1 -> NeMo2 key renames, applied in order (BioNeMo's ``nemo1_to_nemo2`` mapping).
_NEMO1_RENAMES = (
    ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
    ("input_layernorm.bias", "self_attention.linear_qkv.layer_norm_bias"),
    ("post_attention_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"),
    ("post_attention_layernorm.bias", "mlp.linear_fc1.layer_norm_bias"),
    ("self_attention.query_key_value.", "self_attention.linear_qkv."),
    ("self_attention.dense.", "self_attention.linear_proj."),
    ("mlp.dense_h_to_4h.", "mlp.linear_fc1."),
    ("mlp.dense_4h_to_h.", "mlp.linear_fc2."),
    ("lm_head.layernorm.", "lm_head.layer_norm."),
)
#: NeMo2 (Megatron-core) name -> scfm module name.
_RENAMES = (
    (r"^embedding\.word_embeddings\.", "bert.embeddings.word_embeddings."),
    (r"^embedding\.position_embeddings\.", "bert.embeddings.position_embeddings."),
    (
        r"^encoder\.layers\.(\d+)\.self_attention\.linear_qkv\.layer_norm_(weight|bias)$",
        r"bert.encoder.layer.\1.attention.LayerNorm.\2",
    ),
    (
        r"^encoder\.layers\.(\d+)\.self_attention\.linear_proj\.",
        r"bert.encoder.layer.\1.attention.output.dense.",
    ),
    (
        r"^encoder\.layers\.(\d+)\.mlp\.linear_fc1\.layer_norm_(weight|bias)$",
        r"bert.encoder.layer.\1.intermediate.LayerNorm.\2",
    ),
    (r"^encoder\.layers\.(\d+)\.mlp\.linear_fc1\.", r"bert.encoder.layer.\1.intermediate.dense."),
    (r"^encoder\.layers\.(\d+)\.mlp\.linear_fc2\.", r"bert.encoder.layer.\1.output.dense."),
    (r"^encoder\.final_layernorm\.", "bert.encoder.final_layernorm."),
    (r"^lm_head\.dense\.", "cls.predictions.transform.dense."),
    (r"^lm_head\.layer_norm\.", "cls.predictions.transform.LayerNorm."),
    (r"^output_layer\.bias$", "cls.predictions.bias"),
)
_QKV = re.compile(r"^encoder\.layers\.(\d+)\.self_attention\.linear_qkv\.(weight|bias)$")


def _strip_prefix(key: str) -> str:
    for prefix in ("module.", "model.language_model.", "model.", "language_model."):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _to_nemo2(key: str) -> str:
    key = _strip_prefix(key)
    for old, new in _NEMO1_RENAMES:
        key = key.replace(old, new)
    if key in ("lm_head.weight", "lm_head.bias"):  # NeMo1 output layer
        key = "output_layer." + key.split(".")[-1]
    return key


def bionemo_to_module_state_dict(
    state: dict[str, torch.Tensor], num_attention_heads: int
) -> dict[str, torch.Tensor]:
    """Rename BioNeMo (NeMo1 or NeMo2) keys onto the scfm pre-LN Geneformer module.

    ``_extra_state`` entries (Transformer Engine metadata) are dropped, the tied
    ``output_layer.weight`` is dropped, and every fused ``linear_qkv`` is split into
    ``query`` / ``key`` / ``value``.

    Raises
    ------
    CheckpointKeyError
        Listing every key that has no counterpart in the module.
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for raw, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or raw.endswith("_extra_state"):
            continue
        key = _to_nemo2(raw)
        if key == "output_layer.weight":
            continue  # tied to the word embeddings
        qkv = _QKV.match(key)
        if qkv:
            layer, kind = qkv.groups()
            hidden = tensor.shape[-1] if kind == "weight" else tensor.shape[0] // 3
            head_dim = hidden // num_attention_heads
            shaped = tensor.reshape(num_attention_heads, 3, head_dim, *tensor.shape[1:])
            for j, name in enumerate(("query", "key", "value")):
                part = shaped[:, j].reshape(hidden, *tensor.shape[1:])
                out[f"bert.encoder.layer.{layer}.attention.self.{name}.{kind}"] = part.clone()
            continue
        for pattern, repl in _RENAMES:
            if re.match(pattern, key):
                out[re.sub(pattern, repl, key)] = tensor
                break
        else:
            unknown.append(raw)
    if unknown:
        raise CheckpointKeyError(
            "BioNeMo checkpoint keys without a Geneformer counterpart.", unexpected=sorted(unknown)
        )
    return out


def _read_distcp(directory: Path) -> dict[str, torch.Tensor]:
    """Read the tensors of a torch distributed checkpoint directory on one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(directory))
    try:
        meta = reader.read_metadata()
    except Exception as err:
        raise CheckpointFormatError(
            f"{str(directory)!r} is not a readable torch distributed checkpoint ({err})."
        ) from None
    state = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in meta.state_dict_metadata.items()
        if isinstance(m, TensorStorageMetadata) and not k.endswith("_extra_state")
    }
    with warnings.catch_warnings():
        # "torch.distributed is unavailable, assuming a single process": exactly our case.
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def _read_weights(path: Path, trust_checkpoint: bool) -> dict[str, torch.Tensor]:
    if path.is_dir():
        weights = path / "weights" if (path / "weights").is_dir() else path
        if (weights / ".metadata").is_file():
            return _read_distcp(weights)
        for name in ("model_weights.ckpt", "model.safetensors", "model.pt"):
            if (weights / name).is_file():
                return _read_weights(weights / name, trust_checkpoint)
        raise CheckpointFormatError(
            f"{str(path)!r} holds no BioNeMo weights (weights/.metadata, model_weights.ckpt). "
            "Pass the extracted NeMo2 checkpoint directory or the .nemo file."
        )
    if path.suffix == ".nemo" or tarfile.is_tarfile(path):
        with tarfile.open(path) as tar, tempfile.TemporaryDirectory() as tmp:
            member = next(
                (m for m in tar.getmembers() if m.name.endswith("model_weights.ckpt")), None
            )
            if member is None:
                raise CheckpointFormatError(f"{str(path)!r} has no model_weights.ckpt inside.")
            tar.extract(member, tmp, filter="data")
            return _read_weights(Path(tmp) / member.name, trust_checkpoint)
    if path.suffix == ".safetensors":
        return load_safetensors_file(path)
    state = load_torch_file(path, trust_checkpoint=trust_checkpoint)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{str(path)!r} does not hold a state dict.")
    return state


def read_bionemo_geneformer(
    path: str | Path,
    *,
    num_attention_heads: int | None = None,
    hidden_act: str = "gelu",
    trust_checkpoint: bool = False,
) -> Release:
    """Read a BioNeMo Geneformer checkpoint and infer its architecture from the shapes.

    Parameters
    ----------
    path
        NeMo2 checkpoint directory, ``.nemo`` file, or a torch / safetensors state-dict file.
    num_attention_heads
        Heads (not stored in the weights); default: 4 for hidden 256 (10M), 12 for 768
        (106M), else ``hidden // 64``.
    hidden_act
        ``"gelu"`` (the code's setting for the 240530 checkpoints; the model card's "ReLU" is
        wrong, BioNeMo's own negative control shows it).
    trust_checkpoint
        Allow full unpickling of torch files that need it.

    Returns
    -------
    :class:`~scfm.io._common.Release`: ``config`` (the :class:`GeneformerConfig` fields,
    ``variant="bionemo"``), ``state_dict`` renamed onto
    :class:`~scfm.module.GeneformerModule`, ``vocabulary`` (BioNeMo's token layout of the
    V1 genes) and ``files``.

    Notes
    -----
    The vocabulary is the V1 (gc30M) gene list behind 5 special tokens (ids = V1 id + 3) and
    the V1 medians; a ``medians.json`` found under ``path`` replaces the medians.
    """
    p = Path(path)
    raw = _read_weights(p, trust_checkpoint)
    word = next(
        (v for k, v in raw.items() if _to_nemo2(k) == "embedding.word_embeddings.weight"), None
    )
    pos = next(
        (v for k, v in raw.items() if _to_nemo2(k) == "embedding.position_embeddings.weight"), None
    )
    fc1 = next((v for k, v in raw.items() if _to_nemo2(k).endswith("mlp.linear_fc1.weight")), None)
    if word is None or pos is None or fc1 is None:
        raise CheckpointKeyError(
            f"{str(p)!r} does not look like a BioNeMo Geneformer checkpoint.",
            missing=[
                n
                for n, t in (
                    ("embedding.word_embeddings.weight", word),
                    ("embedding.position_embeddings.weight", pos),
                    ("encoder.layers.0.mlp.linear_fc1.weight", fc1),
                )
                if t is None
            ],
        )
    dictionaries = _bionemo_dictionaries(p)
    tokens = dictionaries.token_dictionary
    hidden = int(word.shape[1])
    heads = num_attention_heads or RELEASED_HEADS.get(hidden, max(hidden // 64, 1))
    layers = {int(m.group(1)) for k in raw if (m := re.search(r"layers\.(\d+)\.", k))}
    config = GeneformerConfig(
        variant="bionemo",
        vocab_size=int(word.shape[0]),
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=heads,
        intermediate_size=int(fc1.shape[0]),
        hidden_act=hidden_act,
        hidden_dropout_prob=0.02,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=int(pos.shape[0]),
        input_size=int(pos.shape[0]),
        type_vocab_size=0,
        pad_token_id=tokens["[PAD]"],
        mask_token_id=tokens["[MASK]"],
        cls_token_id=tokens["[CLS]"],
        eos_token_id=None,  # BioNeMo adds no trailing [SEP] at inference
    ).validate()
    if len(tokens) > config.vocab_size:
        raise CheckpointFormatError(
            f"The BioNeMo word embedding of {str(p)!r} has {config.vocab_size} rows, fewer than "
            f"the {len(tokens)} tokens of its vocabulary: not a geneformer-240530 checkpoint."
        )
    return Release(
        config=config.to_dict(),
        state_dict=bionemo_to_module_state_dict(raw, heads),
        vocabulary=dictionaries,
        files={"weights": p},
    )


def _bionemo_dictionaries(path: Path) -> GeneformerDictionaries:
    """V1 genes in BioNeMo's token layout; medians from a ``medians.json`` under ``path``."""
    v1 = load_geneformer_dictionaries(version="V1")
    found = sorted(path.rglob("medians.json")) if path.is_dir() else []
    if not found:
        return v1.bionemo()
    try:
        medians = {str(k): float(v) for k, v in json.loads(found[0].read_text()).items()}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError) as err:
        raise CheckpointFormatError(
            f"{str(found[0])!r} is not a JSON object of gene -> median ({err})."
        ) from None
    logger.info("Using gene medians from %s.", found[0])
    return GeneformerDictionaries(
        token_dictionary=v1.bionemo().token_dictionary,
        gene_median_dictionary=medians,
        gene_name_id_dictionary=v1.gene_name_id_dictionary,
        ensembl_mapping_dictionary=None,
    ).validate(f"BioNeMo medians {str(found[0])!r}")
