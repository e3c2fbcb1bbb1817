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

Attention never materialises the ``n x n`` probabilities. In training, padded keys are excluded
with a boolean mask passed to SDPA. At inference (no gradient recorded) the padding is dropped
instead: the real tokens of the minibatch are packed into one ``[tokens, H]`` matrix, every
per-token step (projections, MLP, LayerNorm) runs on it, attention runs per cell on strided
views of one fused Q/K/V product, and groups of whole cells go through all layers at a time
(cells are independent), so no FLOP is spent on padding and no chunk result is copied back.
A read of the first token alone (``first_token_only``: cell embeddings at ``<cls>``) runs the
last computed layer's query, output and MLP for that token only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scfm.errors import InvalidInputError
from scfm.nn._packing import equal_runs, first_rows

__all__ = [
    "BertConfig",
    "BertConfigBase",
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

#: Bytes of the largest per-group buffer at inference (the ``[tokens, max(3H, intermediate)]``
#: Q/K/V or MLP activation): how many tokens of whole cells go through the encoder at once
#: (at least one cell). 32 MiB: ~2,700 tokens (one ~2,000-gene cell) at V2 width, ~10,900
#: (five cells) at width 256. On a quiet 2-core machine (2 threads, 3 alternating runs),
#: 32 MiB against 128 MiB: V1-10M 16 cells 3.70 vs 4.07 s and peak RSS 1.06 vs 1.12 GB;
#: V2-104M 4 cells 11.54 vs 11.56 s, same peak. (Under heavy load 2-thread runs of small
#: groups were slower, 1-thread runs faster.)
GROUP_BYTES = 32 * 2**20

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
class BertConfigBase:
    """The architecture fields every BERT config shares; field names follow HF ``BertConfig``.

    The release configs (Geneformer, scCello) and :class:`BertConfig` extend it; each release
    keeps its own validation and loading, and builds its encoder's :class:`BertConfig` with
    :meth:`bert_config`.

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
    layer_norm_eps
        LayerNorm epsilon.
    pad_token_id
        Id of the padding token (its word embedding row is zero-initialised).
    initializer_range
        Standard deviation of the normal initialisation of weights.
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
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    def bert_options(self) -> dict[str, Any]:
        """:class:`BertConfig` fields beyond the shared ones (token types, LayerNorm layout).

        A release config overrides this; the default is HF's post-LN BERT.
        """
        return {}

    def bert_config(self) -> BertConfig:
        """The encoder's :class:`BertConfig`: the shared fields plus :meth:`bert_options`."""
        shared = {f.name: getattr(self, f.name) for f in fields(BertConfigBase)}
        return BertConfig(**shared, **self.bert_options())


@dataclass
class BertConfig(BertConfigBase):
    """Shapes and options of a BERT encoder; field names follow HF ``BertConfig``.

    The shared architecture fields are those of :class:`BertConfigBase`.

    Attributes
    ----------
    type_vocab_size
        Rows of the token-type embedding; ``0`` means no token-type embedding.
    pre_layer_norm
        ``False``: post-LN (HF BERT). ``True``: pre-LN (Megatron / BioNeMo) with a final LN.
    embedding_layer_norm
        Whether the embedding output is layer-normalised (HF: yes; Megatron: no).
    extra
        Keys of an HF ``config.json`` that are no field (kept by :meth:`from_dict`).
    """

    type_vocab_size: int = 2
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

    def bert_options(self) -> dict[str, Any]:
        """The fields beyond :class:`BertConfigBase` (so that :meth:`bert_config` copies)."""
        return {
            "type_vocab_size": self.type_vocab_size,
            "pre_layer_norm": self.pre_layer_norm,
            "embedding_layer_norm": self.embedding_layer_norm,
            "extra": dict(self.extra),
        }


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
        # HF's order: (word + token type) + position. float32 addition is not associative,
        # and the last bit matters where rank statistics of the outputs are compared
        # (perturbation p-values); in this order the states equal HF's bit for bit.
        x = self.word_embeddings(input_ids)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                # HF uses token type 0 everywhere when none are given.
                x = _add_residual(x, self.token_type_embeddings.weight[0])
            else:
                x = _add_residual(x, self.token_type_embeddings(token_type_ids))
        x = _add_residual(x, self.position_embeddings.weight[:seq_len])
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

    def _sdpa(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> torch.Tensor:
        if self.training and self.dropout_p > 0:
            return _attention_with_dropout(q, k, v, attn_mask, self.dropout_p)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention over a padded batch ``[B, L, H]`` (``attn_mask``: ``[B, 1, 1, L]``)."""
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        out = self._sdpa(q, k, v, attn_mask)
        b, _, n, _ = out.shape
        return out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)

    def forward_packed(
        self, x: torch.Tensor, lengths: Sequence[int], firsts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention over packed cells: ``x`` ``[T, H]`` holds the cells' tokens one after another.

        Each run of equally long cells is one SDPA call on strided views of the Q/K/V product
        (no mask, no padding); SDPA's CPU output is laid out ``[B, L, heads, d]``, so merging
        the heads is a view and the only copy is the write into the packed output.
        ``firsts``: the row of each cell's first token (:func:`~scfm.nn._packing.first_rows`);
        given, only those tokens query (keys and values still come from every token) and the
        result is ``[cells, H]``.
        """
        t, heads, d = x.shape[0], self.num_heads, self.head_dim
        first_token_only = firsts is not None
        if first_token_only:
            q = _fused(x[firsts], self.query).view(-1, heads, 1, d)
            kv = _fused(x, self.key, self.value).view(t, 2, heads, d)
            out = x.new_empty(len(lengths), heads * d)
        else:
            qkv = _fused(x, self.query, self.key, self.value).view(t, 3, heads, d)
            out = x.new_empty(t, heads * d)
        start = cell = 0
        for n, cells in equal_runs(lengths):
            stop = start + n * cells
            if n and first_token_only:
                k, v = kv[start:stop].view(cells, n, 2, heads, d).permute(2, 0, 3, 1, 4)
                att = self._sdpa(q[cell : cell + cells], k, v, None)
                out[cell : cell + cells] = att.reshape(cells, -1)
            elif n:
                q_, k, v = qkv[start:stop].view(cells, n, 3, heads, d).permute(2, 0, 3, 1, 4)
                att = self._sdpa(q_, k, v, None)
                out[start:stop] = att.transpose(1, 2).reshape(stop - start, -1)
            start, cell = stop, cell + cells
        return out


def _fused(x: torch.Tensor, *parts: nn.Module) -> torch.Tensor:
    """``[T, sum of outputs]`` of several projections of ``x``: one GEMM of their weights.

    A wider GEMM runs closer to the matmul peak than several ``H x H`` ones, most at width
    256. Adapted projections (LoRA wraps them in other modules) are called one by one.
    """
    if len(parts) == 1:
        return parts[0](x)
    if all(type(m) is nn.Linear and m.bias is not None for m in parts):
        weight = torch.cat([m.weight for m in parts])
        bias = torch.cat([m.bias for m in parts])
        return F.linear(x, weight, bias)
    return torch.cat([m(x) for m in parts], dim=-1)


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

    def forward_packed(
        self, x: torch.Tensor, lengths: Sequence[int], first_token_only: bool = False
    ) -> torch.Tensor:
        """As :meth:`forward`, on packed cells ``[T, H]`` (see :meth:`BertLayer.forward_packed`)."""
        firsts = first_rows(lengths, x.device) if first_token_only else None
        h = x if self.LayerNorm is None else self.LayerNorm(x)
        residual = x if firsts is None else x[firsts]
        return self.output(self.self.forward_packed(h, lengths, firsts), residual)


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
            return torch.relu_(h)  # inference: no autograd record, save one [tokens, F] buffer
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
        """One layer over a padded batch ``[B, L, H]`` (``attn_mask``: ``[B, 1, 1, L]``)."""
        a = self.attention(x, attn_mask)
        return self.output(self.intermediate(a), a)

    def forward_packed(
        self, x: torch.Tensor, lengths: Sequence[int], first_token_only: bool = False
    ) -> torch.Tensor:
        """One layer over packed cells: ``x`` ``[T, H]`` holds cells of ``lengths`` in a row.

        Every per-token step runs on the ``T`` real tokens only; attention stays per cell.
        ``first_token_only``: the layer's output at each cell's first token only, ``[cells, H]``
        (what a ``<cls>`` read of the layer needs: every token is still a key and value).
        """
        a = self.attention.forward_packed(x, lengths, first_token_only)
        return self.output(self.intermediate(a), a)


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
        """Run the first ``num_layers`` layers (all by default) over a padded batch.

        Returns the last computed hidden state and, if requested, the tuple of the input
        followed by every computed layer output (HF ``hidden_states`` convention). In the
        pre-LN variant the output of the LAST layer of the stack is passed through
        ``final_layernorm`` (as Megatron's encoder output); intermediate ones are not.
        """
        return self._run(x, (attn_mask,), BertLayer.forward, output_hidden_states, num_layers)

    def forward_packed(
        self,
        x: torch.Tensor,
        lengths: Sequence[int],
        output_hidden_states: bool = False,
        num_layers: int | None = None,
        first_token_only: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """As :meth:`forward`, over packed cells ``[T, H]`` of the given ``lengths``.

        ``first_token_only``: the last computed layer runs for each cell's first token only and
        returns ``[cells, H]`` (see :meth:`BertLayer.forward_packed`).
        """
        if first_token_only and output_hidden_states:
            raise InvalidInputError("first_token_only computes no complete hidden states.")
        step = BertLayer.forward_packed
        last = functools.partial(step, first_token_only=True) if first_token_only else step
        return self._run(x, (lengths,), step, output_hidden_states, num_layers, last_step=last)

    def _run(
        self,
        x: torch.Tensor,
        args: tuple[Any, ...],
        step: Callable[..., torch.Tensor],
        output_hidden_states: bool,
        num_layers: int | None,
        last_step: Callable[..., torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        n = len(self.layer) if num_layers is None else num_layers
        states = [x] if output_hidden_states else None
        for i, layer in enumerate(self.layer[:n]):
            x = (step if i < n - 1 or last_step is None else last_step)(layer, x, *args)
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
        first_token_only: bool = False,
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
        first_token_only
            Return the last computed layer at the first token only (``last_hidden_state``
            ``[B, 1, H]``; no ``hidden_states``): all that a ``<cls>`` read needs. At inference
            that layer then runs its query, output and MLP steps for that token alone.
        """
        if first_token_only and output_hidden_states:
            raise InvalidInputError("first_token_only computes no complete hidden states.")
        x = self.embeddings(input_ids, token_type_ids) if inputs_embeds is None else inputs_embeds
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
        padded = attention_mask is not None and not bool(attention_mask.all())
        if not torch.is_grad_enabled():
            real = attention_mask if padded else None
            last, states = self._encode_packed(
                x, real, output_hidden_states, num_layers, first_token_only
            )
            return BertOutputs(last, states, attention_mask)
        # [B, 1, 1, L]: every query attends to the real keys of its own sequence.
        sdpa_mask = attention_mask[:, None, None, :] if padded else None
        last, states = self.encoder(x, sdpa_mask, output_hidden_states, num_layers)
        return BertOutputs(last[:, :1] if first_token_only else last, states, attention_mask)

    def _encode_packed(
        self,
        x: torch.Tensor,
        real: torch.Tensor | None,
        output_hidden_states: bool,
        num_layers: int | None,
        first_token_only: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Inference: the encoder over the real tokens only, in groups of whole cells.

        Cells are independent, so each group goes through every layer before the next one
        starts: its buffers stay within :data:`GROUP_BYTES` and layer outputs are written once,
        into the returned ``[B, L, H]`` tensors (``[B, 1, H]`` if ``first_token_only``). Padded
        positions (``real`` false) of those hold zeros; ``hidden_states[0]`` is ``x`` itself.
        """
        b, n, h = x.shape
        n_run = len(self.encoder.layer) if num_layers is None else num_layers
        if n_run == 0:
            return (x[:, :1] if first_token_only else x), ((x,) if output_hidden_states else None)
        lengths = [n] * b if real is None else real.sum(1).tolist()
        if first_token_only and 0 in lengths:
            raise InvalidInputError("first_token_only needs a real first token in every sequence.")
        # allocated from the first group's states: under autocast they are not x's dtype
        outs: list[torch.Tensor] = []
        cfg = self.config
        token_bytes = x.element_size() * max(3 * cfg.hidden_size, cfg.intermediate_size)
        start = 0
        while start < b:
            stop, tokens = start + 1, lengths[start]
            while stop < b and (tokens + lengths[stop]) * token_bytes <= GROUP_BYTES:
                tokens += lengths[stop]
                stop += 1
            group = x[start:stop]
            keep = None if real is None else real[start:stop]
            # passed without a name here, so the packed input is freed after the first layer
            last, states = self.encoder.forward_packed(
                group.reshape(-1, h) if keep is None else group[keep],
                lengths[start:stop],
                output_hidden_states,
                num_layers,
                first_token_only,
            )
            computed = states[1:] if states is not None else (last,)
            if not outs:
                outs = [state.new_zeros(b, 1 if first_token_only else n, h) for state in computed]
            for out, state in zip(outs, computed):
                if first_token_only:
                    out[start:stop, 0] = state
                elif keep is None:
                    out[start:stop] = state.view(stop - start, n, h)
                else:
                    out[start:stop][keep] = state
            start = stop
        if not outs:  # an empty batch
            width = 1 if first_token_only else n
            outs = [x.new_zeros(b, width, h) for _ in range(n_run if output_hidden_states else 1)]
        return outs[-1], ((x, *outs) if output_hidden_states else None)


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
