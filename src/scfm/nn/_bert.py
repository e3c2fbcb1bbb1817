"""BERT encoder on :func:`torch.nn.functional.scaled_dot_product_attention`.

One implementation serves two families of single-cell BERTs:

* **post-LayerNorm** (HF ``BertModel``: Geneformer V1/V2, scCello): ``x = LN(x + f(x))`` after
  each sub-block, embedding LayerNorm, token-type embeddings.
* **pre-LayerNorm** (Megatron / NVIDIA BioNeMo Geneformer): ``x = x + f(LN(x))`` with a
  final LayerNorm after the last layer, no embedding LayerNorm, no token types.

Submodule attribute names mirror the HF checkpoint keys (``embeddings.word_embeddings``,
``encoder.layer.N.attention.self.query``, ...) so that an HF state dict loads without renaming.
In the pre-LN variant, the LayerNorm in front of the attention lives at
``attention.LayerNorm`` and the one in front of the MLP at ``intermediate.LayerNorm``
(the layout of Transformer Engine's fused ``LayerNormLinear``); the encoder owns
``final_layernorm``.

Attention never materialises the ``n x n`` probabilities: padded keys are excluded with a
boolean mask passed to SDPA, and callers trim the sequence to the longest cell of a minibatch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scfm.errors import InvalidInputError

__all__ = [
    "BertConfig",
    "BertEmbeddings",
    "BertEncoder",
    "BertLMHead",
    "BertLayer",
    "BertModel",
    "BertOutput",
    "BertOutputs",
    "BertPooler",
    "attention_flops",
    "get_activation",
    "make_key_padding_mask",
]

#: Tokens per chunk at inference: bounds the [tokens, intermediate_size] MLP buffer and the
#: Q/K/V buffers of attention (processed in groups of whole cells).
FFN_CHUNK_TOKENS = 8192

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,  # exact erf GELU (HF "gelu", Megatron gelu)
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "swish": nn.SiLU,
}


def get_activation(name: str) -> nn.Module:
    """The activation module for a config's ``hidden_act`` name (``"relu"``, ``"gelu"``, ...)."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise InvalidInputError(
            f"hidden_act={name!r} is not supported; use one of {sorted(_ACTIVATIONS)}."
        ) from None


@dataclass
class BertConfig:
    """Shapes and options of a BERT encoder; field names follow HF ``BertConfig``.

    Attributes
    ----------
    vocab_size
        Rows of the word embedding (tokens incl. special tokens and any padding rows).
    hidden_size
        Model width ``H``.
    num_hidden_layers
        Number of transformer layers.
    num_attention_heads
        Attention heads; ``hidden_size`` must be divisible by it.
    intermediate_size
        Width of the MLP.
    hidden_act
        MLP (and MLM head) activation: ``"relu"``, ``"gelu"`` (erf), ``"gelu_new"`` (tanh), ...
    hidden_dropout_prob
        Dropout on embeddings and sub-block outputs (training only).
    attention_probs_dropout_prob
        Dropout on attention probabilities (training only).
    max_position_embeddings
        Rows of the learned absolute position embedding (maximum sequence length).
    type_vocab_size
        Rows of the token-type embedding; ``0`` means no token-type embedding.
    layer_norm_eps
        LayerNorm epsilon.
    pad_token_id
        Id of the padding token (its word embedding row is zero-initialised).
    initializer_range
        Standard deviation of the normal initialisation of weights.
    pre_layer_norm
        ``False``: post-LN (HF BERT). ``True``: pre-LN (Megatron / BioNeMo) with a final LN.
    embedding_layer_norm
        Whether the embedding output is layer-normalised (HF: yes; Megatron: no).
    """

    vocab_size: int = 25426
    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    intermediate_size: int = 512
    hidden_act: str = "relu"
    hidden_dropout_prob: float = 0.02
    attention_probs_dropout_prob: float = 0.02
    max_position_embeddings: int = 2048
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02
    pre_layer_norm: bool = False
    embedding_layer_norm: bool = True
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise InvalidInputError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}."
            )
        get_activation(self.hidden_act)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> BertConfig:
        """Build from an HF ``config.json`` dict; unknown keys are kept in :attr:`extra`."""
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in config.items() if k in names}
        extra = {k: v for k, v in config.items() if k not in names}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the architecture fields (without :attr:`extra`)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads


def make_key_padding_mask(lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """Boolean ``[B, L]`` mask, ``True`` at real (non-padding) positions.

    Parameters
    ----------
    lengths
        Number of real tokens of each sequence (left-aligned).
    max_len
        Sequence length ``L``; defaults to ``lengths.max()``.
    """
    max_len = int(lengths.max()) if max_len is None else max_len
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def _layer_norm(config: BertConfig, present: bool) -> nn.LayerNorm | None:
    """A hidden-size LayerNorm where the variant has one (``None`` elsewhere)."""
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if present else None


class BertEmbeddings(nn.Module):
    """Word + absolute position (+ token type) embeddings, optionally layer-normalised."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, config.hidden_size)
            if config.type_vocab_size > 0
            else None
        )
        self.LayerNorm = _layer_norm(config, config.embedding_layer_norm)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        if seq_len > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"Sequence length {seq_len} exceeds max_position_embeddings="
                f"{self.position_embeddings.num_embeddings}; truncate the input."
            )
        x = _add_residual(
            self.word_embeddings(input_ids), self.position_embeddings.weight[:seq_len]
        )
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                # HF uses token type 0 everywhere when none are given.
                x = _add_residual(x, self.token_type_embeddings.weight[0])
            else:
                x = _add_residual(x, self.token_type_embeddings(token_type_ids))
        if self.LayerNorm is not None:
            x = self.LayerNorm(x)
        return self.dropout(x)


def _add_residual(out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``out + residual``; in place into the fresh ``out`` when no gradient is recorded."""
    return out + residual if torch.is_grad_enabled() else out.add_(residual)


def _attention_with_dropout(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, p: float
) -> torch.Tensor:
    """Attention with dropout on the probabilities (training only).

    Explicit on CPU because SDPA's dropout path there is ~10x slower than this; on GPU the
    fused kernels handle dropout efficiently.
    """
    if q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
    return F.dropout(torch.softmax(scores, dim=-1), p=p, training=True) @ v


class BertSelfAttention(nn.Module):
    """Multi-head self-attention with separate Q/K/V projections, computed by SDPA."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, _ = x.shape
        if torch.is_grad_enabled() or b * n <= FFN_CHUNK_TOKENS or b == 1:
            return self._attend(x, attn_mask)
        # Inference on a large batch: attention is per cell, so process groups of cells and
        # never hold Q/K/V of the whole batch at once.
        out = x.new_empty(b, n, self.num_heads * self.head_dim)
        step = max(1, FFN_CHUNK_TOKENS // n)
        for s in range(0, b, step):
            mask = None if attn_mask is None else attn_mask[s : s + step]
            out[s : s + step] = self._attend(x[s : s + step], mask)
        return out

    def _attend(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        if self.training and self.dropout_p > 0:
            out = _attention_with_dropout(q, k, v, attn_mask, self.dropout_p)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        del q, k, v  # free the projections before the output copy below (inference peak)
        b, _, n, _ = out.shape
        return out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)


class _ResidualProjection(nn.Module):
    """Projection to the hidden size, dropout, residual and (post-LN only) LayerNorm."""

    def __init__(self, in_features: int, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = _layer_norm(config, not config.pre_layer_norm)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out = _add_residual(self.dropout(self.dense(h)), residual)
        return out if self.LayerNorm is None else self.LayerNorm(out)


class BertSelfOutput(_ResidualProjection):
    """Attention output projection, dropout and (post-LN only) residual LayerNorm."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config.hidden_size, config)


class BertAttention(nn.Module):
    """Attention sub-block: (pre-LN) -> self-attention -> output projection + residual."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        # pre-LN: the LayerNorm in front of the attention (Megatron ``input_layernorm``).
        self.LayerNorm = _layer_norm(config, config.pre_layer_norm)
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        h = x if self.LayerNorm is None else self.LayerNorm(x)
        return self.output(self.self(h, attn_mask), x)


class BertIntermediate(nn.Module):
    """First MLP projection and activation (pre-LN: preceded by the MLP LayerNorm)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.LayerNorm = _layer_norm(config, config.pre_layer_norm)
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = get_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.LayerNorm is None else self.LayerNorm(x)
        h = self.dense(h)
        if isinstance(self.intermediate_act_fn, nn.ReLU) and not torch.is_grad_enabled():
            return torch.relu_(h)  # inference: no autograd record, save one [B, L, F] buffer
        return self.intermediate_act_fn(h)


class BertOutput(_ResidualProjection):
    """Second MLP projection, dropout, residual and (post-LN only) LayerNorm."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config.intermediate_size, config)


class BertLayer(nn.Module):
    """One transformer layer (attention sub-block then MLP sub-block)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        a = self.attention(x, attn_mask)
        if torch.is_grad_enabled() or a.shape[0] * a.shape[1] <= FFN_CHUNK_TOKENS:
            return self.output(self.intermediate(a), a)
        # Inference: the MLP acts per token, so run it over chunks of tokens and never hold
        # the whole [B, L, intermediate_size] activation (HF's feed-forward chunking).
        flat = a.reshape(-1, a.shape[-1])
        out = torch.empty_like(flat)
        for s in range(0, len(flat), FFN_CHUNK_TOKENS):
            chunk = flat[s : s + FFN_CHUNK_TOKENS]
            out[s : s + FFN_CHUNK_TOKENS] = self.output(self.intermediate(chunk), chunk)
        return out.view_as(a)


class BertEncoder(nn.Module):
    """Stack of :class:`BertLayer` (plus ``final_layernorm`` in the pre-LN variant)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.final_layernorm = _layer_norm(config, config.pre_layer_norm)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        output_hidden_states: bool = False,
        num_layers: int | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Run the first ``num_layers`` layers (all by default).

        Returns the last computed hidden state and, if requested, the tuple of the input
        followed by every computed layer output (HF ``hidden_states`` convention). In the
        pre-LN variant the output of the LAST layer of the stack is passed through
        ``final_layernorm`` (as Megatron's encoder output); intermediate ones are not.
        """
        n = len(self.layer) if num_layers is None else num_layers
        states = [x] if output_hidden_states else None
        for i, layer in enumerate(self.layer[:n]):
            x = layer(x, attn_mask)
            if self.final_layernorm is not None and i == len(self.layer) - 1:
                x = self.final_layernorm(x)
            if states is not None:
                states.append(x)
        return x, (tuple(states) if states is not None else None)


class BertPooler(nn.Module):
    """HF pooler: ``tanh(dense(h[:, 0]))`` (the first token)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden[:, 0]))


@dataclass
class BertOutputs:
    """Outputs of :class:`BertModel`.

    Attributes
    ----------
    last_hidden_state
        Output of the last computed layer ``[B, L, H]``.
    hidden_states
        Embedding output followed by each computed layer output (if requested).
    attention_mask
        The boolean key padding mask used ``[B, L]`` (``True`` = real token).
    """

    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None
    attention_mask: torch.Tensor | None


class BertModel(nn.Module):
    """BERT trunk: embeddings + encoder (+ optional pooler), HF key layout.

    Parameters
    ----------
    config
        The architecture.
    add_pooling_layer
        Whether to create ``pooler`` (HF ``BertForSequenceClassification`` has one,
        ``BertForMaskedLM`` does not).
    """

    def __init__(self, config: BertConfig, add_pooling_layer: bool = False) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def num_layers(self) -> int:
        """Number of encoder layers."""
        return len(self.encoder.layer)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        num_layers: int | None = None,
    ) -> BertOutputs:
        """Encode a padded batch.

        Parameters
        ----------
        input_ids
            ``[B, L]`` token ids.
        attention_mask
            ``[B, L]`` boolean (or 0/1) mask, true at real tokens; ``None`` = no padding.
        token_type_ids
            Optional ``[B, L]`` token types.
        inputs_embeds
            Precomputed embedding output ``[B, L, H]`` (bypasses :attr:`embeddings`).
        output_hidden_states
            Return the embedding output and every layer output.
        num_layers
            Stop after this many layers (saves compute when an inner layer is wanted).
        """
        x = self.embeddings(input_ids, token_type_ids) if inputs_embeds is None else inputs_embeds
        sdpa_mask = None
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
            if not bool(attention_mask.all()):
                # [B, 1, 1, L]: every query attends to the real keys of its own sequence.
                sdpa_mask = attention_mask[:, None, None, :]
        last, states = self.encoder(x, sdpa_mask, output_hidden_states, num_layers)
        return BertOutputs(last, states, attention_mask)


class BertLMHead(nn.Module):
    """MLM head in HF layout: ``predictions.transform.{dense,LayerNorm}``, tied decoder, bias.

    ``logits = LN(act(dense(h))) @ word_embeddings.T + bias``. The decoder weight is the word
    embedding matrix (tied), so it is not a parameter of this module.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.predictions = _BertLMPredictionHead(config)

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return self.predictions(hidden, word_embeddings)


class _BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = get_activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(h)))


class _BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.transform = _BertPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        nn.init.normal_(self.transform.dense.weight, std=config.initializer_range)
        nn.init.zeros_(self.transform.dense.bias)

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(hidden), word_embeddings, self.bias)


def attention_flops(config: BertConfig, n_tokens: int, seq_len: int) -> float:
    """Approximate forward FLOPs of the encoder for ``n_tokens`` tokens at length ``seq_len``.

    Counts the matmuls only (2 FLOPs per multiply-add): Q/K/V/output projections, the MLP,
    and the two attention products.
    """
    h, f = config.hidden_size, config.intermediate_size
    per_token = 2 * (4 * h * h + 2 * h * f) + 2 * 2 * seq_len * h
    return float(per_token * n_tokens * config.num_hidden_layers)
