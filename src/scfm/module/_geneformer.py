"""Geneformer network: rank-value tokenisation on the fly + BERT encoder + MLM / cell heads.

The module works in the model's token space: its input ``x`` is a count matrix whose column
``j`` is token ``j`` of the Geneformer token dictionary (special-token columns are always 0),
and the gene medians are a buffer indexed by token id. Nothing in it depends on an AnnData.

Attribute names mirror HF ``BertForMaskedLM`` / ``BertForSequenceClassification``
(``bert.*``, ``cls.predictions.*``, ``classifier.*``), so a released state dict loads as is;
what a release may carry or lack is declared in the load rules of :class:`GeneformerModule`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from scfm.data._geneformer_tokenizer import V1_INPUT_SIZE, V2_INPUT_SIZE, rank_value_encode
from scfm.errors import CheckpointFormatError, InvalidInputError
from scfm.module._checks import is_int, is_real
from scfm.module._outputs import ModuleOutput
from scfm.nn._bert import (
    _ACTIVATIONS,
    BertConfigBase,
    BertLMHead,
    BertModel,
    BertPooler,
    make_key_padding_mask,
)

logger = logging.getLogger(__name__)

__all__ = ["GeneformerConfig", "GeneformerModule"]

Variant = Literal["V1", "V2", "bionemo"]
Pooling = Literal["cls", "mean", "mean_drop_last"]
POOLINGS = ("cls", "mean", "mean_drop_last")

#: Label value ignored by the MLM cross-entropy (HF convention).
IGNORE_INDEX = -100
#: Model input size (special tokens included) of each variant's releases.
DEFAULT_INPUT_SIZE = {"V1": V1_INPUT_SIZE, "V2": V2_INPUT_SIZE, "bionemo": 2048}
#: Upper bounds far above any release (V2-316M: 18 layers, 1152 hidden, 4608 FFN, 20275
#: tokens, 4096 positions): a config beyond them is damaged, and building it would allocate
#: gigabytes before failing.
_MAX_SIZES = {
    "vocab_size": 1_000_000,
    "hidden_size": 16_384,
    "num_hidden_layers": 256,
    "num_attention_heads": 1_024,
    "intermediate_size": 65_536,
    "max_position_embeddings": 131_072,
    "input_size": 131_072,
}


@dataclass
class GeneformerConfig(BertConfigBase):
    """Architecture and tokens of a Geneformer release; field names follow HF ``config.json``.

    The encoder fields are those of :class:`~scfm.nn._bert.BertConfigBase`, with the
    defaults of V1-10M.

    Attributes
    ----------
    variant
        ``"V1"`` (2048 input, no special tokens in the cell), ``"V2"`` (4096 input, ``<cls>``
        + genes + ``<eos>``) or ``"bionemo"`` (NVIDIA BioNeMo: pre-LayerNorm, GELU,
        ``[CLS]`` + genes, no token types, no embedding LayerNorm).
    vocab_size
        Rows of the word embedding (BioNeMo pads its 25,429 tokens to 25,472 rows).
    hidden_size, num_hidden_layers, num_attention_heads, intermediate_size
        Encoder shape (V1-10M: 256 / 6 / 4 / 512).
    hidden_act
        MLP and MLM head activation (``"relu"`` Theodoris, ``"gelu"`` BioNeMo).
    hidden_dropout_prob, attention_probs_dropout_prob
        Dropout rates, used in training only (V1 0.02, V2 0.1).
    layer_norm_eps
        LayerNorm epsilon (1e-12 in every release).
    max_position_embeddings
        Rows of the position embedding.
    input_size
        Model input size, special tokens included (V1 2048, V2 4096, BioNeMo 2048).
    type_vocab_size
        Token-type embedding rows (HF 2, BioNeMo 0).
    initializer_range
        Standard deviation of the random initialisation.
    pad_token_id, mask_token_id
        Ids of the padding and mask tokens.
    cls_token_id, eos_token_id
        Ids of the tokens put in front of / after the genes (V2: both; BioNeMo: ``[CLS]``).
    mlm_probability
        Fraction of gene tokens selected by the masked-language-model objective.
    """

    variant: Variant = "V1"
    input_size: int = 2048
    type_vocab_size: int = 2
    mask_token_id: int = 1
    cls_token_id: int | None = None
    eos_token_id: int | None = None
    mlm_probability: float = 0.15

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], **overrides: Any) -> GeneformerConfig:
        """Build from a release's config dict (HF ``config.json``); unknown keys are ignored.

        Raises
        ------
        CheckpointFormatError
            If the config is not a dict or lacks a shape key, or any value is malformed
            (see :meth:`validate`).
        """
        if not isinstance(config, Mapping):
            raise CheckpointFormatError(
                f"A Geneformer config must be a JSON object, got {type(config).__name__}."
            )
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in names}
        values.update(overrides)
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if key not in values:
                raise CheckpointFormatError(
                    f"The Geneformer config has no {key!r}: it is not a BERT config.json. Pass "
                    "the config.json of the release."
                )
        values.setdefault("intermediate_size", 4 * _int_or_zero(values["hidden_size"]))
        variant = values.setdefault("variant", "V1")
        default = DEFAULT_INPUT_SIZE.get(variant, V1_INPUT_SIZE)
        positions = values.setdefault("max_position_embeddings", default)
        # A small model (test checkpoints) takes at most as many tokens as it has positions.
        values.setdefault("input_size", min(default, positions) if is_int(positions) else default)
        return cls(**values).validate()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-writable dict of every field."""
        return asdict(self)

    def validate(self) -> GeneformerConfig:
        """Check types and sizes; return ``self``.

        Raises
        ------
        CheckpointFormatError
            Naming the key, for a value of the wrong type, a non-positive or absurd size,
            a dropout outside [0, 1), an unknown activation or variant, or token ids
            outside the vocabulary.
        """
        if self.variant not in DEFAULT_INPUT_SIZE:
            raise CheckpointFormatError(
                f"Geneformer config variant={self.variant!r} is not supported; use 'V1', "
                "'V2' or 'bionemo'."
            )
        for key, limit in _MAX_SIZES.items():
            value = getattr(self, key)
            if not is_int(value):
                raise CheckpointFormatError(
                    f"Geneformer config {key}={value!r} must be an integer, got "
                    f"{type(value).__name__}."
                )
            if not 0 < value <= limit:
                raise CheckpointFormatError(
                    f"Geneformer config {key}={value} is out of range (1 .. {limit:,}); the "
                    "config file is damaged or belongs to another model."
                )
        if not is_int(self.type_vocab_size) or not 0 <= self.type_vocab_size <= 16:
            raise CheckpointFormatError(
                f"Geneformer config type_vocab_size={self.type_vocab_size!r} must be an "
                "integer in 0 .. 16."
            )
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointFormatError(
                f"Geneformer config hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}."
            )
        if self.input_size > self.max_position_embeddings:
            raise CheckpointFormatError(
                f"Geneformer config input_size={self.input_size} exceeds "
                f"max_position_embeddings={self.max_position_embeddings}."
            )
        if not isinstance(self.hidden_act, str) or self.hidden_act not in _ACTIVATIONS:
            raise CheckpointFormatError(
                f"Geneformer config hidden_act={self.hidden_act!r} is not supported; use one "
                f"of {sorted(_ACTIVATIONS)}."
            )
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "mlm_probability"):
            value = getattr(self, key)
            if not is_real(value) or not 0 <= value < 1:
                raise CheckpointFormatError(
                    f"Geneformer config {key}={value!r} must be a number in [0, 1)."
                )
        for key in ("layer_norm_eps", "initializer_range"):
            value = getattr(self, key)
            if not is_real(value) or not 0 < value < 1:
                raise CheckpointFormatError(
                    f"Geneformer config {key}={value!r} must be a number in (0, 1)."
                )
        for key in ("pad_token_id", "mask_token_id", "cls_token_id", "eos_token_id"):
            value = getattr(self, key)
            optional = key in ("cls_token_id", "eos_token_id")
            if (value is None and optional) or (is_int(value) and 0 <= value < self.vocab_size):
                continue
            raise CheckpointFormatError(
                f"Geneformer config {key}={value!r} must be a token id in 0 .. "
                f"{self.vocab_size - 1}."
            )
        n_special = (self.cls_token_id is not None) + (self.eos_token_id is not None)
        if self.input_size <= n_special:
            raise CheckpointFormatError(
                f"Geneformer config input_size={self.input_size} leaves no room for genes."
            )
        return self

    def check_shapes(self, state_dict: Mapping[str, torch.Tensor], *, what: str) -> None:
        """Compare the config with the shapes of the weights it will load (before building).

        Raises
        ------
        CheckpointFormatError
            Naming the config key that disagrees with the weights.
        """
        shape = {k: tuple(v.shape) for k, v in state_dict.items() if torch.is_tensor(v)}
        word = shape.get("bert.embeddings.word_embeddings.weight")
        checks = [
            ("vocab_size", word[0] if word else None, "rows of the word embedding"),
            ("hidden_size", word[1] if word else None, "columns of the word embedding"),
            (
                "max_position_embeddings",
                shape.get("bert.embeddings.position_embeddings.weight", (None,))[0],
                "rows of the position embedding",
            ),
            (
                "intermediate_size",
                shape.get("bert.encoder.layer.0.intermediate.dense.weight", (None,))[0],
                "rows of the first MLP projection",
            ),
            (
                "num_hidden_layers",
                sum(
                    f"bert.encoder.layer.{i}.attention.self.query.weight" in shape
                    for i in range(len(shape))
                )
                or None,
                "encoder layers",
            ),
        ]
        if "bert.embeddings.token_type_embeddings.weight" in shape:
            rows = shape["bert.embeddings.token_type_embeddings.weight"][0]
            checks.append(("type_vocab_size", rows, "rows of the token-type embedding"))
        for key, found, meaning in checks:
            if found is not None and found != getattr(self, key):
                raise CheckpointFormatError(
                    f"Geneformer config {key}={getattr(self, key)} does not match the weights "
                    f"in {what} ({found} {meaning}). The config and the weights belong to "
                    "different releases, or the config is damaged."
                )

    def bert_options(self) -> dict[str, Any]:
        """Token types and the variant's LayerNorm layout (BioNeMo: pre-LN, no embedding LN)."""
        pre_ln = self.variant == "bionemo"
        return {
            "type_vocab_size": self.type_vocab_size,
            "pre_layer_norm": pre_ln,
            "embedding_layer_norm": not pre_ln,
        }


def _int_or_zero(value: Any) -> int:
    return int(value) if is_int(value) else 0


class GeneformerModule(BaseModuleClass):
    """Geneformer as an scvi-tools module.

    Parameters
    ----------
    config
        The architecture and token ids (:class:`GeneformerConfig`, validated).
    token_medians
        ``[n_tokens]`` non-zero corpus median of each token id (position = id); ``0`` for
        tokens that are no gene (special tokens). ``n_tokens`` is the size of the token
        dictionary, the width of the module's input ``x``.
    """

    #: Buffers HF ignores (``position_ids``) and the decoder tied to the word embeddings /
    #: ``cls.predictions.bias``: present in older ``pytorch_model.bin`` files, never used.
    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [
        r"^bert\.embeddings\.position_ids$",
        r"^cls\.predictions\.decoder\.(weight|bias)$",
    ]
    #: The token medians come from the release's dictionaries, not from its weights.
    _keys_to_ignore_on_load_missing: ClassVar[list[str]] = [r"^token_medians$"]
    #: Parameters of the cell classification head (HF ``BertForSequenceClassification``:
    #: pooler + classifier, both new at fine-tuning); they train with a frozen encoder.
    _head_prefixes: ClassVar[tuple[str, ...]] = ("classifier.", "bert.pooler.")
    #: Linear layers LoRA adapts in fine-tuning (attention projections, as peft's BERT).
    _lora_target_modules: ClassVar[list[str]] = [
        f"bert.encoder.layer.*.attention.self.{name}" for name in ("query", "key", "value")
    ]

    def __init__(self, config: GeneformerConfig, token_medians: np.ndarray) -> None:
        super().__init__()
        self.config = config.validate()
        medians = np.asarray(token_medians, dtype=np.float64)
        if medians.ndim != 1 or not 0 < len(medians) <= config.vocab_size:
            raise InvalidInputError(
                f"token_medians needs one entry per token (at most vocab_size="
                f"{config.vocab_size}), got shape {medians.shape}."
            )
        self.bert_config = config.bert_config()
        self.bert = BertModel(self.bert_config)
        self.cls = BertLMHead(self.bert_config)
        self.classifier: nn.Linear | None = None
        # Persistent: a saved model carries the medians it tokenises with.
        self.register_buffer("token_medians", torch.as_tensor(medians))
        is_gene = torch.zeros(config.vocab_size, dtype=torch.bool)
        is_gene[: len(medians)] = torch.as_tensor(medians > 0)
        # Everything that is not a gene (special tokens, BioNeMo's padding rows) is never
        # masked and never enters mean pooling.
        self.register_buffer("special_tokens", ~is_gene, persistent=False)
        self.register_buffer("gene_tokens", torch.nonzero(is_gene)[:, 0], persistent=False)

    @property
    def n_tokens(self) -> int:
        """Width of the input ``x``: the size of the token dictionary."""
        return len(self.token_medians)

    @property
    def n_layers(self) -> int:
        """Number of encoder layers."""
        return self.bert.num_layers

    @property
    def input_size(self) -> int:
        """Model input size, special tokens included (the longest encoding)."""
        return self.config.input_size

    @property
    def pad_token_id(self) -> int:
        """Id filling positions beyond a cell's length."""
        return self.config.pad_token_id

    @property
    def cls_token_id(self) -> int | None:
        """Id put in front of a cell's genes (V2, BioNeMo), else ``None``."""
        return self.config.cls_token_id

    @property
    def eos_token_id(self) -> int | None:
        """Id put after a cell's genes (V2), else ``None``."""
        return self.config.eos_token_id

    # ------------------------------------------------------------------ heads
    def add_classifier(self, n_labels: int) -> None:
        """Add (or replace) the cell classification head of ``BertForSequenceClassification``.

        ``logits = classifier(tanh(pooler.dense(h_last[:, 0])))``: the pooler reads the first
        token of the last layer (``<cls>`` for V2, the top-ranked gene for V1).
        """
        if int(n_labels) < 1:
            raise InvalidInputError(f"n_labels must be >= 1, got {n_labels}.")
        device = self.token_medians.device
        self.bert.pooler = BertPooler(self.bert_config).to(device)
        self.classifier = nn.Linear(self.config.hidden_size, int(n_labels)).to(device)
        for m in (self.bert.pooler.dense, self.classifier):
            nn.init.normal_(m.weight, std=self.config.initializer_range)
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ tokens
    def tokenize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank-value tokens of counts in token space.

        Parameters
        ----------
        x
            ``[B, n_tokens]`` counts, column ``j`` = token ``j``.

        Returns
        -------
        ``(input_ids [B, L], lengths [B])``: per cell, ``<cls>`` (V2 / BioNeMo), its expressed
        genes by decreasing ``count / total * 10,000 / median`` truncated to the input size,
        ``<eos>`` (V2); padded with ``pad_token_id``. Each cell is encoded on its own.
        """
        c = self.config
        return rank_value_encode(
            x,
            None,
            self.token_medians,
            max_length=c.input_size,
            cls_token_id=c.cls_token_id,
            eos_token_id=c.eos_token_id,
            pad_token_id=c.pad_token_id,
        )

    def mask_tokens(
        self,
        input_ids: torch.Tensor,
        lengths: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT masking of gene tokens (HF ``DataCollatorForLanguageModeling``).

        ``mlm_probability`` of the gene tokens are selected; of those 80% become ``<mask>``,
        10% a random gene, 10% stay unchanged. Returns the masked ids and the labels
        (original id at selected positions, ``-100`` elsewhere). Special tokens and padding
        are never selected.
        """
        real = make_key_padding_mask(lengths, input_ids.shape[1])
        candidates = real & ~self.special_tokens[input_ids]
        shape, device = input_ids.shape, input_ids.device
        draw = torch.rand(shape, generator=generator, device=device)
        selected = candidates & (draw < self.config.mlm_probability)
        labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        action = torch.rand(shape, generator=generator, device=device)
        to_mask = selected & (action < 0.8)
        to_random = selected & (action >= 0.8) & (action < 0.9)
        pool = self.gene_tokens
        pick = torch.randint(len(pool), shape, generator=generator, device=device)
        mask_id = torch.full_like(input_ids, self.config.mask_token_id)
        masked = torch.where(to_mask, mask_id, input_ids)
        masked = torch.where(to_random, pool[pick], masked)
        return masked, labels

    # ------------------------------------------------------------------ encoder
    def resolve_layer(self, hidden_layer: int) -> int:
        """Index into ``(embedding output, layer 1, ..., layer N)``, Python style."""
        n = self.n_layers + 1
        if not is_int(hidden_layer):
            raise InvalidInputError(f"hidden_layer must be an integer, got {hidden_layer!r}.")
        if not -n <= hidden_layer < n:
            raise InvalidInputError(
                f"hidden_layer={hidden_layer} is out of range for a {self.n_layers}-layer model; "
                f"use -1 (last layer), -2 (second to last, the Theodoris default), ... or "
                f"0..{n - 1}."
            )
        return int(hidden_layer) % n

    @staticmethod
    def pool(
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        lengths: torch.Tensor,
        pooling: Pooling,
        special_tokens: torch.Tensor,
    ) -> torch.Tensor:
        """Cell embedding from token states.

        ``"cls"``: the first position (``<cls>``; for V1 the top-ranked gene);
        ``"mean"``: mean over real gene tokens (EmbExtractor ``emb_mode="cell"``);
        ``"mean_drop_last"``: as ``"mean"`` but also without the last real token (BioNeMo's
        ``include_embeddings`` drops it, assuming a trailing ``[SEP]``).
        """
        if pooling == "cls":
            return hidden[:, 0]
        if pooling not in POOLINGS:
            raise InvalidInputError(
                f"pooling={pooling!r} is not supported; use 'cls', 'mean' or 'mean_drop_last'."
            )
        keep = make_key_padding_mask(lengths, input_ids.shape[1]) & ~special_tokens[input_ids]
        if pooling == "mean_drop_last":
            last = (lengths - 1).clamp(min=0)
            keep = keep.clone()
            keep[torch.arange(len(lengths), device=keep.device), last] = False
        w = keep.to(hidden.dtype)
        return (hidden * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """MLM logits ``[..., vocab_size]`` of last-layer states (tied decoder)."""
        return self.cls(hidden, self.bert.embeddings.word_embeddings.weight)

    # ------------------------------------------------------------------ scvi-tools API
    def _get_inference_input(self, tensors: dict[str, torch.Tensor], **kwargs: Any) -> dict:
        return {"x": tensors[REGISTRY_KEYS.X_KEY]}

    @auto_move_data
    def inference(
        self,
        x: torch.Tensor | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        hidden_layer: int = -1,
        pooling: Pooling | None = None,
        mask: bool = False,
        generator: torch.Generator | None = None,
        token_states: bool = True,
    ) -> ModuleOutput:
        """The one forward pass: tokenise, optionally mask, encode, pool, classify.

        Parameters
        ----------
        x
            ``[B, n_tokens]`` counts in token space (column ``j`` = token ``j``).
        input_ids, lengths
            Token ids ``[B, L]`` (padded with ``pad_token_id``) and lengths ``[B]`` to encode
            instead of ``x`` (e.g. perturbed rank encodings, or :meth:`tokenize`'s output).
        hidden_layer
            Layer whose states give ``token_states`` and ``cell_embedding``: index into
            (embedding output, layer 1, ..., layer N), ``-1`` = last.
        pooling
            ``"cls"``, ``"mean"`` or ``"mean_drop_last"`` (see :meth:`pool`); ``None``
            computes no ``cell_embedding``.
        mask
            Apply the pretraining corruption (MLM masking); the pretraining plan asks for it.
            Never tied to ``self.training``: fine-tuning trains unmasked.
        generator
            Random generator of the masking draw.
        token_states
            ``False`` when only ``cell_embedding`` and ``logits`` are read: unless ``pooling``
            averages tokens, the layer read then runs for the ``<cls>`` query alone and
            ``token_states`` / ``token_genes`` are ``None``.

        Returns
        -------
        :class:`~scfm.module._outputs.ModuleOutput` with ``token_states`` ``[B, L, H]`` of
        ``hidden_layer``, ``token_genes`` (the token id = vocabulary position of each token,
        ``-1`` at padding; ``<cls>`` / ``<eos>`` rows included, as the reference's gene
        embeddings include them), ``cell_embedding`` if ``pooling``, ``logits`` if the module
        has a classifier, and in ``extra``: ``input_ids`` (as encoded, masked if masking),
        ``lengths``, ``last_hidden_state`` (when the last layer was computed) and, when
        masked, ``mlm_labels``.
        """
        if input_ids is None:
            if x is None:
                raise InvalidInputError("inference needs x (counts) or input_ids and lengths.")
            input_ids, lengths = self.tokenize(x)
        elif lengths is None:
            raise InvalidInputError("inference with input_ids needs their lengths.")
        input_ids, lengths = input_ids.long(), lengths.long()
        if input_ids.shape[1] > self.config.input_size:
            raise InvalidInputError(
                f"input_ids hold {input_ids.shape[1]} positions; the model input size is "
                f"{self.config.input_size}: truncate the encodings."
            )
        layer = self.resolve_layer(hidden_layer)
        extra: dict[str, torch.Tensor] = {}
        if mask:
            input_ids, extra["mlm_labels"] = self.mask_tokens(input_ids, lengths, generator)
        # The MLM objective and the classifier read the last layer: compute it only then.
        needs_last = "mlm_labels" in extra or self.classifier is not None
        n_run = self.n_layers if needs_last else layer
        # A cell without any expressed vocabulary gene (V1) still needs one key to attend to.
        attention = make_key_padding_mask(lengths.clamp(min=1), input_ids.shape[1])
        # A <cls> read of the last computed layer needs that layer at <cls> only (the pooler
        # and classifier read <cls> too); a mean and the MLM objective need every token.
        cls_read = pooling in ("cls", None)
        first_only = not token_states and cls_read and n_run == layer and not mask
        if n_run == 0:
            states = last = self.bert.embeddings(input_ids)
            if first_only:
                states = last = states[:, :1]
        else:
            # All layer outputs are kept only when two different layers are read.
            both = n_run != layer
            out = self.bert(
                input_ids,
                attention,
                output_hidden_states=both,
                num_layers=n_run,
                first_token_only=first_only,
            )
            last = out.last_hidden_state
            states = out.hidden_states[layer] if both else last
        if n_run == self.n_layers:
            extra["last_hidden_state"] = last
        real = make_key_padding_mask(lengths, input_ids.shape[1])
        output = ModuleOutput(
            token_states=None if first_only else states,
            token_genes=None
            if first_only
            else torch.where(real, input_ids, torch.full_like(input_ids, -1)),
            extra=extra,
        )
        if "mlm_labels" in extra and output.token_genes is not None:
            output.token_genes = torch.where(
                extra["mlm_labels"] != IGNORE_INDEX, extra["mlm_labels"], output.token_genes
            )
        if pooling is not None:
            output.cell_embedding = self.pool(
                states, input_ids, lengths, pooling, self.special_tokens
            )
        if self.classifier is not None and self.bert.pooler is not None:
            output.logits = self.classifier(self.bert.pooler(last))
        extra.update(input_ids=input_ids, lengths=lengths)
        return output

    def _get_generative_input(
        self, tensors: dict, inference_outputs: ModuleOutput, **kwargs: Any
    ) -> dict:
        return {
            "hidden": inference_outputs.extra["last_hidden_state"],
            "mlm_labels": inference_outputs.extra.get("mlm_labels"),
        }

    @auto_move_data
    def generative(
        self, hidden: torch.Tensor, mlm_labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """MLM logits: at the selected positions only when ``mlm_labels`` are given."""
        if mlm_labels is not None:
            # Only the selected positions enter the loss: skip the [B, L, V] logits.
            return {"mlm_logits": self.mlm_logits(hidden[mlm_labels != IGNORE_INDEX])}
        return {"mlm_logits": self.mlm_logits(hidden)}

    def loss(
        self,
        tensors: dict,
        inference_outputs: ModuleOutput,
        generative_outputs: dict[str, torch.Tensor],
        **kwargs: Any,
    ) -> LossOutput:
        """Masked-language-model cross-entropy over the selected tokens.

        The optimised loss is the mean over selected tokens (HF); the per-cell mean is
        reported as ``reconstruction_loss`` for scvi-tools' epoch metrics.

        Raises
        ------
        InvalidInputError
            If the inference was not masked (``mask=False``).
        """
        labels = inference_outputs.extra.get("mlm_labels")
        if labels is None:
            raise InvalidInputError(
                "The Geneformer MLM loss needs masked inputs: call inference(mask=True)."
            )
        n_cells = labels.shape[0]
        selected = labels != IGNORE_INDEX
        targets = labels[selected]
        logits = generative_outputs["mlm_logits"]
        if logits.ndim == 3:
            logits = logits[selected]
        if len(targets) == 0:
            # Nothing selected in this minibatch (tiny cells): a zero loss that keeps the graph.
            return LossOutput(loss=logits.sum() * 0.0, n_obs_minibatch=n_cells)
        per_token = F.cross_entropy(logits, targets, reduction="none")
        rows = torch.nonzero(selected)[:, 0]
        per_cell = torch.zeros(n_cells, device=logits.device).index_add_(0, rows, per_token)
        counts = torch.zeros(n_cells, device=logits.device).index_add_(
            0, rows, torch.ones_like(per_token)
        )
        return LossOutput(loss=per_token.mean(), reconstruction_loss=per_cell / counts.clamp(min=1))
