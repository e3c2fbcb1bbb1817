"""scFoundation (xTrimoGene ``MaeAutobin``): network, read-depth-aware masked regression loss.

An asymmetric encoder-decoder :cite:p:`Hao2024`: a full-attention transformer encoder over
the non-zero genes (plus the depth tokens ``T`` and ``S``) and a Performer decoder over all
genes. Attribute names mirror the released checkpoint keys (after the ``model.`` prefix).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from scfm.data._scfoundation_tokenizer import (
    INPUT_KINDS,
    parse_tgthighres,
    scfoundation_gather,
    scfoundation_preprocess,
)
from scfm.errors import CheckpointFormatError, InvalidInputError
from scfm.module._outputs import ModuleOutput
from scfm.nn._autobin import AutoDiscretizationEmbedding
from scfm.nn._performer import KeyMax, PerformerModule

logger = logging.getLogger(__name__)

__all__ = [
    "INPUT_KIND_KEY",
    "TOTAL_COUNTS_KEY",
    "ScFoundationConfig",
    "ScFoundationModule",
]

Pooling = Literal["all", "max"]
Decode = Literal["states", "expression"]

#: Registry key of the raw total count per cell (``pre_normalized="A"``).
TOTAL_COUNTS_KEY = "total_counts"
#: Minibatch key of the per-cell input kind (index into ``INPUT_KINDS``: F, T, A).
INPUT_KIND_KEY = "scfoundation_input_kind"
#: Number of cell-level depth tokens appended after the genes (T, S).
N_DEPTH_TOKENS = 2
#: Hidden width of the annotation head (reference ``finetune_model.py``).
CLASSIFIER_HIDDEN = 256
#: Tokens per group of cells in packed inference. On CPU the activations of a group stay
#: below glibc's 32 MB mmap threshold, so buffers are reused instead of page-faulted afresh
#: every layer (measured: 2,048 is ~10% faster than the whole minibatch); on GPU bigger
#: groups feed bigger GEMMs. A cell longer than the budget is its own group.
MAX_GROUP_TOKENS = {"cpu": 2048, "default": 65536}
#: Decoder positions (cells x seq_len) per chunk in inference: one release-size cell on
#: CPU (~0.5 GB of activations), a few dozen on GPU.
MAX_DECODER_TOKENS = {"cpu": 32_768, "default": 524_288}

#: Upper bounds of a sane config (a few times the release's sizes): anything larger is a
#: corrupted or mistyped config and must fail before memory is allocated.
_MAX_SIZE = {
    "seq_len": 1_000_000,
    "encoder_hidden_dim": 65_536,
    "encoder_depth": 1_024,
    "encoder_heads": 1_024,
    "decoder_hidden_dim": 65_536,
    "decoder_depth": 1_024,
    "decoder_heads": 1_024,
    "decoder_dim_head": 8_192,
    "bin_num": 100_000,
}
_PROBABILITIES = ("value_mask_prob", "zero_mask_prob", "replace_prob", "random_token_prob")
#: Release config key of each nested field (messages name the key the user can find).
_RELEASE_KEYS = {
    "encoder_hidden_dim": "encoder.hidden_dim",
    "encoder_depth": "encoder.depth",
    "encoder_heads": "encoder.heads",
    "decoder_hidden_dim": "decoder.hidden_dim",
    "decoder_depth": "decoder.depth",
    "decoder_heads": "decoder.heads",
    "decoder_dim_head": "decoder.dim_head",
}


def _config_int(value: Any, key: str) -> int:
    """An integer config entry (integral floats accepted, as JSON may store them)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CheckpointFormatError(
            f"The scFoundation config key {key!r} must be an integer, got "
            f"{type(value).__name__} {value!r}."
        )
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise CheckpointFormatError(
            f"The scFoundation config key {key!r} must be an integer, got {value!r}."
        )
    return int(value)


def _config_float(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CheckpointFormatError(
            f"The scFoundation config key {key!r} must be a finite number, got {value!r}."
        )
    return float(value)


@dataclass(frozen=True)
class ScFoundationConfig:
    """Architecture and pretraining hyper-parameters, named as in the released config.

    Build it from the checkpoint with :meth:`from_reference`; :meth:`validate` and
    :meth:`check_state_dict` run before any module is built.

    Attributes
    ----------
    seq_len
        Genes + the two depth tokens (19,266 for the release; ``gene_num`` is equal).
    encoder_hidden_dim, encoder_depth, encoder_heads
        ``encoder.hidden_dim`` / ``depth`` / ``heads`` (768 / 12 / 12). The feed-forward width
        is ``4 x hidden_dim``; ``encoder.dim_head`` is ignored by the reference.
    encoder_dropout
        Dropout of the encoder layers (torch default 0.1; training only).
    decoder_hidden_dim, decoder_depth, decoder_heads, decoder_dim_head
        ``decoder.*`` of the Performer decoder (512 / 6 / 8 / 64).
    bin_num, bin_alpha
        Auto-bin value embedding: number of soft bins and residual weight.
    pad_token_id, mask_token_id
        Sentinel *values* (103 / 102) marking padding and masked positions.
    value_mask_prob, zero_mask_prob
        Fraction of non-zero / zero values masked in pretraining (0.3 / 0.03).
    replace_prob, random_token_prob
        Of the masked values, the share replaced by the mask value / a random value (0.8 /
        0.1); the rest keep their value (BERT-style).
    """

    seq_len: int = 19266
    encoder_hidden_dim: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    encoder_dropout: float = 0.1
    decoder_hidden_dim: int = 512
    decoder_depth: int = 6
    decoder_heads: int = 8
    decoder_dim_head: int = 64
    bin_num: int = 100
    bin_alpha: float = 1.0
    pad_token_id: int = 103
    mask_token_id: int = 102
    value_mask_prob: float = 0.3
    zero_mask_prob: float = 0.03
    replace_prob: float = 0.8
    random_token_prob: float = 0.1

    @property
    def n_genes(self) -> int:
        """Number of genes (positions before the ``T`` and ``S`` tokens)."""
        return self.seq_len - N_DEPTH_TOKENS

    @classmethod
    def from_reference(cls, flat: Mapping[str, Any]) -> ScFoundationConfig:
        """Parse the flattened reference config (``model_config`` + ``dataset_config.rnaseq``).

        Raises
        ------
        CheckpointFormatError
            Naming the key that is missing or of the wrong type.
        """
        if not isinstance(flat, Mapping):
            raise CheckpointFormatError(
                f"The scFoundation config must be a dict, got {type(flat).__name__}."
            )
        parts = {}
        for part in ("encoder", "decoder"):
            if not isinstance(flat.get(part), Mapping):
                raise CheckpointFormatError(
                    f"The scFoundation config lacks the {part!r} dict (hidden_dim, depth, "
                    "heads, ...); the file is not a scFoundation release checkpoint."
                )
            parts[part] = flat[part]
        required = {
            "seq_len": ("seq_len", flat),
            "encoder_hidden_dim": ("encoder.hidden_dim", parts["encoder"]),
            "encoder_depth": ("encoder.depth", parts["encoder"]),
            "encoder_heads": ("encoder.heads", parts["encoder"]),
            "decoder_hidden_dim": ("decoder.hidden_dim", parts["decoder"]),
            "decoder_depth": ("decoder.depth", parts["decoder"]),
            "decoder_heads": ("decoder.heads", parts["decoder"]),
            "decoder_dim_head": ("decoder.dim_head", parts["decoder"]),
        }
        values: dict[str, Any] = {}
        for field, (key, source) in required.items():
            if key.rsplit(".", 1)[-1] not in source:
                raise CheckpointFormatError(f"The scFoundation config lacks the key {key!r}.")
            values[field] = _config_int(source[key.rsplit(".", 1)[-1]], key)
        for name in ("bin_num", "pad_token_id", "mask_token_id"):
            if name in flat:
                values[name] = _config_int(flat[name], name)
        for name in ("bin_alpha", *_PROBABILITIES):
            if name in flat:
                values[name] = _config_float(flat[name], name)
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Check types and sizes (positive, not absurd, heads dividing the width).

        Raises
        ------
        CheckpointFormatError
            Naming the offending key.
        """
        for name, limit in _MAX_SIZE.items():
            key = _RELEASE_KEYS.get(name, name)
            value = _config_int(getattr(self, name), key)
            low = N_DEPTH_TOKENS + 1 if name == "seq_len" else 1
            if not low <= value <= limit:
                raise CheckpointFormatError(
                    f"The scFoundation config key {key!r} = {value} is outside [{low}, {limit}]; "
                    "the config is damaged or belongs to another model."
                )
        if self.encoder_hidden_dim % self.encoder_heads:
            raise CheckpointFormatError(
                f"encoder.heads = {self.encoder_heads} does not divide encoder.hidden_dim = "
                f"{self.encoder_hidden_dim}."
            )
        for name in ("bin_alpha", "pad_token_id", "mask_token_id"):
            _config_float(getattr(self, name), name)
        for name in (*_PROBABILITIES, "encoder_dropout"):
            value = _config_float(getattr(self, name), name)
            if not 0.0 <= value <= 1.0:
                raise CheckpointFormatError(
                    f"The scFoundation config key {name!r} = {value} is not a probability."
                )

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the released tensors that the config determines."""
        enc, dec, dh = self.encoder_hidden_dim, self.decoder_hidden_dim, self.decoder_dim_head
        inner = self.decoder_heads * dh
        return {
            "token_emb.emb.weight": (self.bin_num, enc),
            "token_emb.mlp.weight": (self.bin_num, 1),
            "pos_emb.weight": (self.seq_len + 1, enc),
            "encoder.transformer_encoder.0.self_attn.in_proj_weight": (3 * enc, enc),
            "encoder.transformer_encoder.0.linear1.weight": (4 * enc, enc),
            "decoder_embed.weight": (dec, enc),
            "decoder.performer.net.layers.0.0.fn.to_q.weight": (inner, dec),
            "decoder.performer.net.layers.0.0.fn.fast_attention.projection_matrix": (
                int(dh * math.log(dh)),
                dh,
            ),
            "to_final.weight": (1, dec),
        }

    def check_state_dict(self, state_dict: Mapping[str, torch.Tensor], *, what: str) -> None:
        """Compare the config with the weight shapes before the module is built.

        Raises
        ------
        CheckpointFormatError
            Naming the config key that disagrees with the weights.
        """
        for key, shape in self.expected_shapes().items():
            tensor = state_dict.get(key)
            if tensor is not None and tuple(tensor.shape) != shape:
                raise CheckpointFormatError(
                    f"{what}: {key} has shape {tuple(tensor.shape)} but the config implies "
                    f"{shape} (seq_len / hidden_dim / bin_num / dim_head). The config does not "
                    "belong to these weights."
                )
        for name, pattern in (
            ("encoder.depth", r"^encoder\.transformer_encoder\.(\d+)\."),
            ("decoder.depth", r"^decoder\.performer\.net\.layers\.(\d+)\."),
        ):
            found = {int(m.group(1)) for k in state_dict if (m := re.match(pattern, k))}
            depth = self.encoder_depth if name == "encoder.depth" else self.decoder_depth
            if found and len(found) != depth:
                raise CheckpointFormatError(
                    f"{what}: the config says {name} = {depth} but the weights hold "
                    f"{len(found)} layers."
                )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ScFoundationConfig:
        """Build from scfm field names (a saved or hand-written config), validated.

        Raises
        ------
        InvalidInputError
            For a field the config does not have.
        """
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise InvalidInputError(
                f"Unknown scFoundation config fields: {', '.join(sorted(unknown))} (fields: "
                f"{', '.join(cls.__dataclass_fields__)})."
            )
        config = cls(**values)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for ``init_params`` and saving)."""
        return dataclasses.asdict(self)


class _SelfAttention(nn.Module):
    """Multi-head attention with packed ``in_proj`` weights (torch ``MultiheadAttention`` keys)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Padded minibatch ``(b, n, d)``; ``attn_mask`` ``(b, 1, 1, n)`` is ``True`` at keys."""
        b, n, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))

    def forward_packed(self, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Packed cells ``(sum(lengths), d)``: projections over all tokens, attention per cell.

        Each cell attends to its own tokens without a mask, so SDPA uses its fused (flash)
        kernel and no FLOPs are spent on padding.
        """
        n, d = x.shape
        # One copy into head-major (3 * heads, n, head_dim): the CPU flash kernel is ~20%
        # faster on contiguous head rows than on the strided views of the packed projection.
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(n, 3 * self.heads, -1).transpose(0, 1).contiguous()
        # merging the heads of each cell back to (m, d) copies its output once
        outs, start = [], 0
        for m in lengths:
            q, k, v = qkv[:, start : start + m].view(3, 1, self.heads, m, -1)
            outs.append(F.scaled_dot_product_attention(q, k, v)[0].transpose(0, 1).reshape(m, d))
            start += m
        return self.out_proj(outs[0] if len(outs) == 1 else torch.cat(outs))


class _EncoderLayer(nn.Module):
    """Post-LayerNorm transformer layer (``nn.TransformerEncoderLayer``, ReLU, eps 1e-5)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = _SelfAttention(dim, heads, dropout)
        self.linear1 = nn.Linear(dim, 4 * dim)
        self.linear2 = nn.Linear(4 * dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.self_attn(x, attn_mask)))
        ff = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self.norm2(x + self.dropout(ff))

    def forward_packed(self, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Inference over packed cells ``(sum(lengths), d)`` (no dropout)."""
        x = self.norm1(x + self.self_attn.forward_packed(x, lengths))
        ff = self.linear2(F.relu_(self.linear1(x)))
        return self.norm2(ff.add_(x))


def _token_groups(lengths: list[int], max_tokens: int) -> Iterator[tuple[list[int], slice]]:
    """Consecutive cells grouped up to ``max_tokens`` tokens (a longer cell is its own group)."""
    start, group, n = 0, [], 0
    for m in lengths:
        if group and n + m > max_tokens:
            yield group, slice(start, start + n)
            start, group, n = start + n, [], 0
        group.append(m)
        n += m
    if group:
        yield group, slice(start, start + n)


class ScFoundationEncoder(nn.Module):
    """Stack of post-LN transformer layers plus a final LayerNorm (``pytorchTransformerModule``)."""

    def __init__(self, dim: int, depth: int, heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.transformer_encoder = nn.ModuleList(
            _EncoderLayer(dim, heads, dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward_packed(self, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Inference over packed cells: ``x`` ``(sum(lengths), dim)``, one cell after another.

        Each cell attends to its own tokens only, so any grouping of the cells gives the same
        numbers (:meth:`ScFoundationModule.encode_packed` runs groups of
        :data:`MAX_GROUP_TOKENS`).
        """
        for layer in self.transformer_encoder:
            x = layer.forward_packed(x, lengths)
        return self.norm(x)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """Padded minibatch ``x`` ``(b, n, dim)``; ``padding`` ``(b, n)`` is ``True`` at pads.

        Padded keys are masked in attention (the path with gradients and dropout).
        """
        attn_mask = None if not bool(padding.any()) else ~padding[:, None, None, :]
        for layer in self.transformer_encoder:
            x = layer(x, attn_mask)
        return self.norm(x)


class ScFoundationModule(BaseModuleClass):
    """The scFoundation ``MaeAutobin`` network with scvi-tools' module interface.

    Its input is a minibatch in the model's gene space: ``x`` ``(b, n_genes)``, column ``j``
    = gene ``j`` of the 19,264-gene list, raw counts or log-normalised values (per cell
    :data:`INPUT_KIND_KEY`). Nothing in the module depends on an AnnData.

    Parameters
    ----------
    config
        Architecture (:class:`ScFoundationConfig`).
    n_labels
        Number of cell labels of a classification head (0: none; see :meth:`add_classifier`).
    """

    #: The release may lack the Performer's redraw counter (meaningless at inference; see
    #: :meth:`materialize_missing_buffers`) and never holds a classification head.
    _keys_to_ignore_on_load_missing: ClassVar[list[str]] = [
        r"^decoder\.performer\.calls_since_last_redraw$",
        r"^classifier(_norm)?\.",
    ]
    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = []
    #: Linear layers LoRA adapts when fine-tuning (fnmatch patterns): the encoder's output
    #: projection and feed-forward; its q/k/v are one bare ``in_proj_weight`` parameter (the
    #: release's torch ``MultiheadAttention`` keys), which peft cannot wrap.
    _lora_target_modules: ClassVar[list[str]] = [
        "encoder.transformer_encoder.*.self_attn.out_proj",
        "encoder.transformer_encoder.*.linear1",
        "encoder.transformer_encoder.*.linear2",
    ]

    def __init__(self, config: ScFoundationConfig, n_labels: int = 0) -> None:
        super().__init__()
        config.validate()
        self.config = config
        c = config
        self.token_emb = AutoDiscretizationEmbedding(
            c.encoder_hidden_dim, c.bin_num, c.bin_alpha, c.mask_token_id, c.pad_token_id
        )
        # one extra row: the id of padding positions (seq_len)
        self.pos_emb = nn.Embedding(c.seq_len + 1, c.encoder_hidden_dim)
        self.encoder = ScFoundationEncoder(
            c.encoder_hidden_dim, c.encoder_depth, c.encoder_heads, c.encoder_dropout
        )
        self.decoder_embed = nn.Linear(c.encoder_hidden_dim, c.decoder_hidden_dim)
        self.decoder = PerformerModule(
            c.decoder_hidden_dim, c.decoder_depth, c.decoder_heads, c.decoder_dim_head
        )
        self.norm = nn.LayerNorm(c.decoder_hidden_dim)
        self.to_final = nn.Linear(c.decoder_hidden_dim, 1)
        self.classifier: nn.Module | None = None
        self.classifier_norm: nn.BatchNorm1d | None = None
        if n_labels:
            self.add_classifier(n_labels)
        # pretraining: downsampling of the input counts (read-depth-aware objective)
        self.downsample_prob = 0.5
        self.min_downsample_fraction = 0.1

    # ------------------------------------------------------------------ loading
    def materialize_missing_buffers(self) -> None:
        """Give the buffers a release may lack (left on the meta device) their initial zeros.

        Only the Performer's redraw counter may be absent (``_keys_to_ignore_on_load_missing``);
        it counts calls and starts at zero. ``load_state_dict_strict(assign=True)`` has already
        refused every required tensor left without a value; an optional weight (a classifier
        head) left so is refused here.

        Raises
        ------
        CheckpointFormatError
            If a parameter is still on the meta device.
        """
        for name, tensor in [*self.named_parameters(), *self.named_buffers()]:
            if not tensor.is_meta:
                continue
            if isinstance(tensor, nn.Parameter):
                raise CheckpointFormatError(f"The release did not provide {name!r}.")
            owner, _, leaf = name.rpartition(".")
            zeros = torch.zeros(tensor.shape, dtype=tensor.dtype)
            self.get_submodule(owner).register_buffer(leaf, zeros)

    # ------------------------------------------------------------------ head
    def add_classifier(self, n_labels: int) -> None:
        """Attach the cell classification head of the reference ``finetune_model.py``.

        Max pooling over the encoder tokens (padding excluded; the depth tokens included),
        ``BatchNorm1d`` (no affine, eps 1e-6), then ``Linear(d, 256) -> ReLU ->
        Linear(256, n_labels)``. The reference trains the head and ``transformer_encoder[-2]``
        with everything else frozen.
        """
        d = self.config.encoder_hidden_dim
        device = self.pos_emb.weight.device
        self.classifier_norm = nn.BatchNorm1d(d, affine=False, eps=1e-6).to(device)
        self.classifier = nn.Sequential(
            nn.Linear(d, CLASSIFIER_HIDDEN), nn.ReLU(), nn.Linear(CLASSIFIER_HIDDEN, n_labels)
        ).to(device)

    def _classify(self, hidden: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        assert self.classifier is not None and self.classifier_norm is not None
        pooled = self.pool(hidden, padding, "max")
        norm = self.classifier_norm
        if norm.training and pooled.shape[0] == 1:
            # BatchNorm has no batch statistics for one cell (a last minibatch of one):
            # normalise it with the running statistics instead of failing.
            pooled = F.batch_norm(pooled, norm.running_mean, norm.running_var, eps=norm.eps)
        else:
            pooled = norm(pooled)
        return self.classifier(pooled)

    # ------------------------------------------------------------------ network pieces
    def encode(
        self, values: torch.Tensor, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the encoder over the kept positions (default ``values > 0``).

        In training mode the minibatch is padded and padded keys are masked; otherwise the
        real tokens are packed one cell after another (no padding FLOPs) and each cell
        attends to its own tokens. Both give the same states at real tokens.

        Returns the encoder output ``(b, L, d)`` (after its final LayerNorm; zero at padding
        when packed), the position ids and the padding mask ``(b, L)`` of the gathered tokens.
        """
        if not self.training:
            packed, ids, padding = self.encode_packed(values, keep)
            return _unpack(packed, padding), ids, padding
        gathered, ids, padding = scfoundation_gather(
            values, keep, pad_value=float(self.config.pad_token_id), pad_id=self.config.seq_len
        )
        h = self.token_emb(gathered) + self.pos_emb(ids)
        return self.encoder(h, padding), ids, padding

    def encode_packed(
        self, values: torch.Tensor, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inference encoder output packed one cell after another: ``(sum(lengths), d)``.

        Also returns the position ids and the padding mask ``(b, L)`` of the gathered tokens
        (cell ``i`` has ``(~padding[i]).sum()`` rows, in gathered order).
        """
        gathered, ids, padding = scfoundation_gather(
            values, keep, pad_value=float(self.config.pad_token_id), pad_id=self.config.seq_len
        )
        valid = ~padding
        tokens, positions = gathered[valid], ids[valid]
        # Groups of cells go through embedding and all layers one after another: only the
        # output rows and one group's activations are held at a time (on CPU a group stays
        # below glibc's mmap threshold, so its buffers are reused), whatever the minibatch.
        max_tokens = MAX_GROUP_TOKENS.get(values.device.type, MAX_GROUP_TOKENS["default"])
        out: torch.Tensor | None = None
        for group, rows in _token_groups(valid.sum(dim=1).tolist(), max_tokens):
            h = self.token_emb(tokens[rows]) + self.pos_emb(positions[rows])
            h = self.encoder.forward_packed(h, group)
            if out is None:
                out = h.new_empty((len(tokens), h.shape[-1]))
            out[rows] = h
        if out is None:  # no cells
            out = self.pos_emb.weight.new_empty((0, self.config.encoder_hidden_dim))
        return out, ids, padding

    @staticmethod
    def pool(hidden: torch.Tensor, padding: torch.Tensor, pooling: Pooling) -> torch.Tensor:
        """Cell embedding from encoder outputs, per cell ignoring padding.

        ``"all"``: ``[S token, T token, max over genes, mean over genes]`` where the last two
        tokens of each cell are taken as S and T (as the reference does); ``"max"``: max over
        all tokens.
        """
        valid = ~padding
        if pooling == "max":
            return hidden.masked_fill(~valid[..., None], float("-inf")).amax(dim=1)
        lengths = valid.sum(dim=1)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, lengths - 1]
        second = hidden[rows, lengths - 2]
        genes = (
            torch.arange(hidden.shape[1], device=hidden.device)[None, :] < (lengths - 2)[:, None]
        )
        gmax = hidden.masked_fill(~genes[..., None], float("-inf")).amax(dim=1)
        gmean = (hidden * genes[..., None]).sum(dim=1) / (lengths - 2)[:, None]
        return torch.cat([last, second, gmax, gmean], dim=1)

    @staticmethod
    def pool_packed(hidden: torch.Tensor, lengths: list[int], pooling: Pooling) -> torch.Tensor:
        """:meth:`pool` of packed encoder outputs ``(sum(lengths), d)``, cell by cell.

        No padded ``(b, L, d)`` copy is made (it would be the largest buffer of an embedding
        minibatch), and each cell is reduced over its own rows as the reference does.
        """
        out, start = [], 0
        for m in lengths:
            cell = hidden[start : start + m]
            start += m
            if pooling == "max":
                out.append(cell.amax(dim=0))
                continue
            genes = cell[:-2]
            if len(genes):
                gmax, gmean = genes.amax(dim=0), genes.mean(dim=0)
            else:  # no expressed gene: what the padded pooling gives (-inf, 0 / 0)
                gmax = cell.new_full((cell.shape[1],), float("-inf"))
                gmean = cell.new_full((cell.shape[1],), float("nan"))
            out.append(torch.cat([cell[-1], cell[-2], gmax, gmean]))
        return torch.stack(out)

    def decode(
        self,
        encoded: torch.Tensor,
        ids: torch.Tensor,
        padding: torch.Tensor,
        decoder_values: torch.Tensor,
        key_max: KeyMax = "sample",
    ) -> torch.Tensor:
        """Decoder over all positions up to the final LayerNorm: ``(b, seq_len, d_dec)``.

        ``decoder_values`` are embedded at every position; the encoder outputs replace them
        at their own positions, then the positional embedding is added everywhere (so the
        encoder positions receive it a second time, as in the reference). ``key_max``: the
        Performer key stabiliser per cell (``"sample"``) or over the minibatch (``"batch"``,
        the reference ``gene_batch`` mode).
        """
        if self.training or key_max == "batch" or decoder_values.shape[0] <= 1:
            return self._decode(encoded, ids, padding, decoder_values, key_max)
        # Inference decodes a few cells at a time: the Performer's activations grow with
        # cells x 19,266 positions (a 2048-wide feed-forward per position), and with a
        # per-cell key maximum the result does not depend on the grouping.
        budget = MAX_DECODER_TOKENS.get(encoded.device.type, MAX_DECODER_TOKENS["default"])
        step = max(1, budget // decoder_values.shape[1])
        parts = [
            self._decode(encoded[i : i + step], ids[i : i + step], padding[i : i + step],
                         decoder_values[i : i + step], key_max)
            for i in range(0, decoder_values.shape[0], step)
        ]  # fmt: skip
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _decode(
        self,
        encoded: torch.Tensor,
        ids: torch.Tensor,
        padding: torch.Tensor,
        decoder_values: torch.Tensor,
        key_max: KeyMax,
    ) -> torch.Tensor:
        dec = self.token_emb(decoder_values)
        valid = ~padding
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
        dec = dec.index_put((rows[valid], ids[valid]), encoded[valid].to(dec.dtype))
        dec = dec + self.pos_emb.weight[: decoder_values.shape[1]]
        return self.norm(self.decoder(self.decoder_embed(dec), key_max=key_max))

    # ------------------------------------------------------------------ pretraining input
    def _downsample(self, counts: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Binomially thin a random subset of cells to a random fraction of their reads."""
        b, device = counts.shape[0], counts.device
        frac = torch.rand(b, 1, generator=generator, device=device)
        frac = self.min_downsample_fraction + (1.0 - self.min_downsample_fraction) * frac
        chosen = torch.rand(b, 1, generator=generator, device=device) < self.downsample_prob
        frac = torch.where(chosen, frac, torch.ones_like(frac))
        thinned = torch.binomial(
            counts.float(), frac.expand_as(counts).float(), generator=generator
        )
        # a cell thinned to nothing has no defined depth: keep it whole
        empty = thinned.sum(dim=1, keepdim=True) == 0
        return torch.where(empty, counts.float(), thinned)

    def _masked_example(
        self,
        x: torch.Tensor,
        kind: torch.Tensor,
        total_counts: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One masked, depth-aware pretraining example per cell (see :meth:`inference`)."""
        c, g = self.config, self.config.n_genes
        target_values = scfoundation_preprocess(x, kind, "f1", total_counts)
        # raw counts: a random share of the cells is thinned; S = thinned depth, T = original
        counts = kind == INPUT_KINDS.index("F")
        source = torch.where(counts[:, None], self._downsample(x, generator), x.float())
        values = scfoundation_preprocess(source, kind, "f1", total_counts)
        values[:, g] = target_values[:, g]
        genes = values[:, :g]
        nonzero = genes > 0

        def draw() -> torch.Tensor:
            return torch.rand(genes.shape, generator=generator, device=genes.device)

        masked = torch.where(nonzero, draw() < c.value_mask_prob, draw() < c.zero_mask_prob)
        # BERT-style replacement of the masked values seen by the decoder
        choice = draw()
        random_values = draw() * genes.amax(dim=1, keepdim=True)
        dec_genes = torch.where(
            masked & (choice < c.replace_prob), torch.full_like(genes, c.mask_token_id), genes
        )
        random_pick = (choice >= c.replace_prob) & (choice < c.replace_prob + c.random_token_prob)
        dec_genes = torch.where(masked & random_pick, random_values, dec_genes)
        keep = values > 0
        keep[:, :g] &= ~masked
        decoder_values = torch.cat([dec_genes, values[:, g:]], dim=1)
        return values, keep, decoder_values, masked, target_values[:, :g]

    # ------------------------------------------------------------------ scvi-tools interface
    def check_options(self, task: str, **options: Any) -> dict[str, Any]:
        """The :meth:`inference` arguments of a model task, its options' values checked.

        ``task`` is the model's: ``"latent"`` reads ``tgthighres`` and ``pooling``,
        ``"genes"`` ``tgthighres`` and ``key_max``, ``"expression"`` and ``"predict"``
        ``tgthighres``; ``"train"`` takes none. Which options a task accepts is the model's
        check; any other key is ignored here.

        Raises
        ------
        InvalidInputError
            For a ``tgthighres``, ``pooling`` or ``key_max`` value that is not supported.
        """
        if task == "train":
            return {"pooling": None}  # the loss reads the decoded expression only
        kwargs: dict[str, Any] = {"tgthighres": options.get("tgthighres", "t4")}
        parse_tgthighres(kwargs["tgthighres"])
        pooling = options.get("pooling", "all") if task == "latent" else None
        if pooling not in ("all", "max", None):
            raise InvalidInputError(f"pooling={pooling!r} is not supported; use 'all' or 'max'.")
        kwargs["pooling"] = pooling
        if task == "genes":
            key_max = options.get("key_max", "sample")
            if key_max not in ("sample", "batch"):
                raise InvalidInputError(
                    f"key_max={key_max!r} is not supported; use 'sample' or 'batch'."
                )
            kwargs.update(decode="states", key_max=key_max)
        elif task == "expression":
            kwargs["decode"] = "expression"
        return kwargs

    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {
            "x": tensors[REGISTRY_KEYS.X_KEY],
            "total_counts": tensors.get(TOTAL_COUNTS_KEY),
            "input_kind": tensors.get(INPUT_KIND_KEY),
        }

    @auto_move_data
    def inference(
        self,
        x: torch.Tensor,
        total_counts: torch.Tensor | None = None,
        input_kind: torch.Tensor | None = None,
        *,
        tgthighres: str = "t4",
        pooling: Pooling | None = "all",
        decode: Decode | None = None,
        key_max: KeyMax = "sample",
        mask: bool = False,
        generator: torch.Generator | None = None,
    ) -> ModuleOutput:
        """The one forward pass: embedding, gene states, expression, logits, pretraining.

        Parameters
        ----------
        x
            ``(b, n_genes)`` values in the model's gene space.
        total_counts
            ``(b,)`` or ``(b, 1)`` raw total counts (input kind ``"A"`` only).
        input_kind
            ``(b,)`` index into ``("F", "T", "A")`` per cell: raw counts, log-normalised
            values (total = their sum, as the reference), log-normalised values with
            ``total_counts``. ``None``: raw counts.
        tgthighres
            Target depth token ``T`` (``"t4"``, ``"fN"``, ``"aN"``; see
            :func:`~scfm.data.scfoundation_preprocess`). Ignored when masking (T = original
            depth).
        pooling
            Cell embedding from the encoder: ``"all"`` / ``"max"``; ``None``: none.
        decode
            Run the decoder: ``"states"`` fills ``token_states`` (decoder output after both
            final LayerNorms, ``(b, n_genes, d_dec)``) and ``token_genes``; ``"expression"``
            fills ``expression`` (``to_final`` output, log1p-normalised at depth ``T``).
        key_max
            Performer key stabiliser: ``"sample"`` (per cell, default) or ``"batch"``.
        mask
            Build the read-depth-aware masked pretraining example (raw-count cells are
            thinned; 30% of non-zero and 3% of zero genes masked) and decode it; ``extra``
            holds ``"masked"`` and ``"target"``. The pretraining plan asks for it; fine-tuning
            trains without it.
        generator
            Random source of the masking; ``None`` uses torch's global generator (seeded by
            Lightning in training).

        Returns
        -------
        :class:`~scfm.module.ModuleOutput`; ``logits`` whenever a head is attached.
        """
        b, g = x.shape[0], self.config.n_genes
        if x.shape[1] != g:
            raise InvalidInputError(
                f"scFoundation expects {g} genes in model order, got {x.shape[1]} columns."
            )
        kind = torch.zeros(b, dtype=torch.long, device=x.device) if input_kind is None else (
            input_kind.reshape(-1).long()
        )  # fmt: skip
        out = ModuleOutput()
        if mask:
            values, keep, decoder_values, masked, target = self._masked_example(
                x, kind, total_counts, generator
            )
            out.extra = {"masked": masked, "target": target}
        else:
            values = scfoundation_preprocess(x, kind, tgthighres, total_counts)
            keep, decoder_values = values > 0, values
        _check_depth(values, g)
        if self.training:
            encoded, ids, padding = self.encode(values, keep)
            if pooling is not None:
                out.cell_embedding = self.pool(encoded, padding, pooling)
        else:
            packed, ids, padding = self.encode_packed(values, keep)
            if pooling is not None:
                lengths = (~padding).sum(dim=1).tolist()
                out.cell_embedding = self.pool_packed(packed, lengths, pooling)
            if self.classifier is not None or decode is not None or mask:
                encoded = _unpack(packed, padding)  # only the head and the decoder read it
        if self.classifier is not None and not mask:
            out.logits = self._classify(encoded, padding)
        if decode is not None or mask:
            states = self.decode(encoded, ids, padding, decoder_values, key_max)[:, :g]
            if decode == "states":
                out.token_states = states
                out.token_genes = torch.arange(g, device=x.device).expand(b, g)
            if decode == "expression" or mask:
                out.expression = self.to_final(states).squeeze(-1)
        return out

    def _get_generative_input(
        self, tensors: dict[str, torch.Tensor], inference_outputs: ModuleOutput
    ) -> dict[str, Any]:
        return {}

    def generative(self) -> dict[str, torch.Tensor]:
        """Nothing left to do: :meth:`inference` already decoded the masked example."""
        return {}

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: ModuleOutput,
        generative_outputs: dict[str, torch.Tensor],
    ) -> LossOutput:
        """Mean squared error of the decoded expression on the masked gene positions."""
        if inference_outputs.expression is None or "masked" not in inference_outputs.extra:
            raise InvalidInputError(
                "The scFoundation loss needs the masked example: call inference(mask=True)."
            )
        masked = inference_outputs.extra["masked"]
        err = (inference_outputs.expression - inference_outputs.extra["target"]) ** 2 * masked
        per_cell = err.sum(dim=1) / masked.sum(dim=1).clamp(min=1)
        loss = err.sum() / masked.sum().clamp(min=1)
        return LossOutput(loss=loss, reconstruction_loss=per_cell, n_obs_minibatch=masked.shape[0])


def _unpack(packed: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """Packed rows ``(sum(lengths), d)`` into a zero-padded ``(b, L, d)`` minibatch."""
    out = packed.new_zeros((*padding.shape, packed.shape[-1]))
    return out.index_put_((~padding,), packed)


def _check_depth(values: torch.Tensor, n_genes: int) -> None:
    """Refuse cells whose depth tokens are undefined or dropped, naming the real cause.

    A total of exactly 1 gives S = log10(1) = 0, and the reference keeps only positive
    values as tokens: the S token would vanish and the pooled embedding be NaN (the reference
    fails on such cells too), so they are refused with the others.
    """
    depth = values[:, n_genes:]
    bad = ~torch.isfinite(depth).all(dim=1) | (depth <= 0).any(dim=1)
    if bool(bad.any()):
        n_bad, n = int(bad.sum()), values.shape[0]
        hint = (
            "All cells of the minibatch are affected: the genes most likely did not match. "
            "scFoundation expects HGNC gene symbols (e.g. TP53) in adata.var_names or in the "
            "adata.var column passed as gene_id_key; check model.gene_alignment."
            if n_bad == n
            else "Remove those cells (e.g. keep cells with counts > 0 in the matched genes)."
        )
        raise InvalidInputError(
            f"{n_bad} of {n} cells have a total count <= 1 (or a non-finite total) over the "
            "genes of the scFoundation gene list that the AnnData provides, so the depth token "
            f"S = log10(total count) is undefined or zero. {hint}"
        )
