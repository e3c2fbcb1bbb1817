"""scFoundation (xTrimoGene ``MaeAutobin``): network, read-depth-aware masked regression loss.

An asymmetric encoder-decoder :cite:p:`Hao2024`: a full-attention transformer encoder over
the non-zero genes (plus the depth tokens ``T`` and ``S``) and a Performer decoder over all
genes. Attribute names mirror the released checkpoint keys (after the ``model.`` prefix).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from scfm.data._scfoundation_tokenizer import (
    PreNormalized,
    scfoundation_align_counts,
    scfoundation_gather,
    scfoundation_preprocess,
)
from scfm.errors import InvalidInputError
from scfm.nn._autobin import AutoDiscretizationEmbedding
from scfm.nn._performer import KeyMax, PerformerModule

logger = logging.getLogger(__name__)

__all__ = ["TOTAL_COUNTS_KEY", "ScFoundationConfig", "ScFoundationModule"]

PoolType = Literal["all", "max"]

#: Registry key of the raw total count per cell (``pre_normalized="A"``).
TOTAL_COUNTS_KEY = "total_counts"
#: Number of cell-level depth tokens appended after the genes (T, S).
N_DEPTH_TOKENS = 2
#: Hidden width of the annotation head (reference ``finetune_model.py``).
CLASSIFIER_HIDDEN = 256
#: Tokens per group of cells in packed inference. On CPU the activations of a group stay
#: below glibc's 32 MB mmap threshold, so buffers are reused instead of page-faulted afresh
#: every layer (measured: 2,048 is ~10% faster than the whole minibatch); on GPU bigger
#: groups feed bigger GEMMs.
MAX_GROUP_TOKENS = {"cpu": 2048, "default": 65536}


@dataclass(frozen=True)
class ScFoundationConfig:
    """Architecture and pretraining hyper-parameters, named as in the released config.

    Build it from the checkpoint with :meth:`from_reference`.

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
    def from_reference(cls, flat: dict[str, Any]) -> ScFoundationConfig:
        """Parse the flattened reference config (``model_config`` + ``dataset_config.rnaseq``)."""
        enc, dec = flat["encoder"], flat["decoder"]
        values = {
            "seq_len": int(flat["seq_len"]),
            "encoder_hidden_dim": int(enc["hidden_dim"]),
            "encoder_depth": int(enc["depth"]),
            "encoder_heads": int(enc["heads"]),
            "decoder_hidden_dim": int(dec["hidden_dim"]),
            "decoder_depth": int(dec["depth"]),
            "decoder_heads": int(dec["heads"]),
            "decoder_dim_head": int(dec["dim_head"]),
        }
        for name in (
            "bin_num",
            "bin_alpha",
            "pad_token_id",
            "mask_token_id",
            "value_mask_prob",
            "zero_mask_prob",
            "replace_prob",
            "random_token_prob",
        ):
            if name in flat:
                default = getattr(cls, name)
                values[name] = type(default)(flat[name])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for ``init_params`` and scvi-tools save / load)."""
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

        Cells run through all layers group by group (:data:`MAX_GROUP_TOKENS`), which keeps
        activations small without changing the numbers.
        """
        out = torch.empty_like(x)
        max_tokens = MAX_GROUP_TOKENS.get(x.device.type, MAX_GROUP_TOKENS["default"])
        for group, rows in _token_groups(lengths, max_tokens):
            h = x[rows]
            for layer in self.transformer_encoder:
                h = layer.forward_packed(h, group)
            out[rows] = self.norm(h)
        return out

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """Encode ``x`` ``(b, n, dim)``; ``padding`` ``(b, n)`` is ``True`` at padded keys.

        In evaluation mode the valid tokens are packed (padding dropped) and the output is
        zero at padded positions; in training mode padded keys are masked in attention.
        """
        if not self.training:
            valid = ~padding
            # row-major: each cell's tokens stay contiguous and in order
            out = self.forward_packed(x[valid], valid.sum(dim=1).tolist())
            return x.new_zeros(x.shape).index_put_((valid,), out)
        attn_mask = None if not bool(padding.any()) else ~padding[:, None, None, :]
        for layer in self.transformer_encoder:
            x = layer(x, attn_mask)
        return self.norm(x)


class ScFoundationModule(BaseModuleClass):
    """The scFoundation ``MaeAutobin`` network with scvi-tools' module interface.

    Parameters
    ----------
    config
        Architecture (:class:`ScFoundationConfig`).
    n_labels
        Number of cell labels of an annotation head (0: no head).
    """

    def __init__(self, config: ScFoundationConfig, n_labels: int = 0) -> None:
        super().__init__()
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
        self.classifier_norm: nn.Module | None = None
        if n_labels:
            self.add_classifier(n_labels)
        # how counts of a minibatch map to model input; set by the model class
        self.register_buffer("var_index", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("vocab_index", torch.zeros(0, dtype=torch.long), persistent=False)
        self.pre_normalized: PreNormalized = "F"
        # pretraining: downsampling of the input counts (read-depth-aware objective)
        self.downsample_prob = 0.5
        self.min_downsample_fraction = 0.1

    # ------------------------------------------------------------------ input
    def set_input_layout(
        self, var_index: torch.Tensor, vocab_index: torch.Tensor, pre_normalized: PreNormalized
    ) -> None:
        """Set the gene alignment of the registered AnnData and its value type."""
        device = self.pos_emb.weight.device
        self.var_index = torch.as_tensor(var_index, dtype=torch.long, device=device)
        self.vocab_index = torch.as_tensor(vocab_index, dtype=torch.long, device=device)
        self.pre_normalized = pre_normalized

    def align(self, x: torch.Tensor) -> torch.Tensor:
        """Counts ``(b, n_vars)`` in ``adata.var`` order -> ``(b, n_genes)`` vocabulary order."""
        return scfoundation_align_counts(x, self.var_index, self.vocab_index, self.config.n_genes)

    def model_input(
        self,
        x: torch.Tensor,
        tgthighres: str = "t4",
        total_counts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Model input ``[x, T, S]`` ``(b, seq_len)`` from a minibatch of the registered matrix."""
        aligned = self.align(x)
        values = scfoundation_preprocess(aligned, self.pre_normalized, tgthighres, total_counts)
        if not torch.isfinite(values).all():
            bad = int((~torch.isfinite(values).all(dim=1)).sum())
            raise InvalidInputError(
                f"{bad} cells have no (or negative) expression in genes of the scFoundation "
                "gene list, so their library size is 0 and the depth token S is undefined. "
                "Remove them before embedding (e.g. keep cells with counts > 0 in the "
                "matched genes: adata[adata[:, matched_genes].X.sum(1) > 0])."
            )
        return values

    # ------------------------------------------------------------------ network pieces
    def encode(
        self, values: torch.Tensor, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the encoder over the kept positions (default ``values > 0``).

        Returns the encoder output ``(b, L, d)`` (after its final LayerNorm; zero at padding
        in evaluation mode), the position ids and the padding mask ``(b, L)`` of the gathered
        tokens.
        """
        gathered, ids, padding = scfoundation_gather(
            values, keep, pad_value=float(self.config.pad_token_id), pad_id=self.config.seq_len
        )
        if self.encoder.training:
            h = self.token_emb(gathered) + self.pos_emb(ids)
            return self.encoder(h, padding), ids, padding
        # inference: embed and encode the real tokens only, packed one cell after another
        valid = ~padding
        h = self.token_emb(gathered[valid]) + self.pos_emb(ids[valid])
        h = self.encoder.forward_packed(h, valid.sum(dim=1).tolist())
        return h.new_zeros((*padding.shape, h.shape[-1])).index_put_((valid,), h), ids, padding

    @staticmethod
    def pool(hidden: torch.Tensor, padding: torch.Tensor, pool_type: PoolType) -> torch.Tensor:
        """Cell embedding from encoder outputs, per cell ignoring padding.

        ``"all"``: ``[S token, T token, max over genes, mean over genes]`` where the last two
        tokens of each cell are taken as S and T (as the reference does); ``"max"``: max over
        all tokens.
        """
        valid = ~padding
        if pool_type == "max":
            return hidden.masked_fill(~valid[..., None], float("-inf")).amax(dim=1)
        if pool_type != "all":
            raise InvalidInputError(
                f"pool_type={pool_type!r} is not supported; use 'all' or 'max'."
            )
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

    def decode(
        self,
        values: torch.Tensor,
        keep: torch.Tensor | None = None,
        decoder_values: torch.Tensor | None = None,
        key_max: KeyMax = "sample",
    ) -> torch.Tensor:
        """Full encoder-decoder forward up to the final LayerNorm: ``(b, seq_len, d_dec)``.

        Parameters
        ----------
        values
            Model input ``(b, seq_len)``.
        keep
            Positions entering the encoder (default ``values > 0``).
        decoder_values
            Values embedded at the positions outside the encoder (default ``values``; the
            pretraining objective puts the mask value there).
        key_max
            Stabiliser of the Performer key features: per cell (``"sample"``) or over the
            minibatch (``"batch"``, the reference ``gene_batch`` mode).
        """
        if keep is None:
            keep = values > 0
        enc, ids, padding = self.encode(values, keep)
        dec = self.token_emb(values if decoder_values is None else decoder_values)
        valid = ~padding
        rows = torch.arange(values.shape[0], device=values.device)[:, None].expand_as(ids)
        # encoder outputs replace the value embedding at their own positions
        dec = dec.index_put((rows[valid], ids[valid]), enc[valid].to(dec.dtype))
        dec = dec + self.pos_emb.weight[: values.shape[1]]
        dec = self.decoder(self.decoder_embed(dec), key_max=key_max)
        return self.norm(dec)

    def reconstruct(self, values: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Predicted expression ``(b, seq_len)`` (log1p-normalised scale at depth ``T``)."""
        return self.to_final(self.decode(values, **kwargs)).squeeze(-1)

    # ------------------------------------------------------------------ annotation head
    def add_classifier(self, n_labels: int) -> None:
        """Attach the annotation head of the reference ``finetune_model.py``.

        Max pooling over encoder tokens, ``BatchNorm1d`` (no affine, eps 1e-6), then
        ``Linear(d, 256) -> ReLU -> Linear(256, n_labels)``.
        """
        d = self.config.encoder_hidden_dim
        self.classifier_norm = nn.BatchNorm1d(d, affine=False, eps=1e-6)
        self.classifier = nn.Sequential(
            nn.Linear(d, CLASSIFIER_HIDDEN), nn.ReLU(), nn.Linear(CLASSIFIER_HIDDEN, n_labels)
        )
        self.classifier.to(self.pos_emb.weight.device)
        self.classifier_norm.to(self.pos_emb.weight.device)

    def classify(self, values: torch.Tensor) -> torch.Tensor:
        """Label logits ``(b, n_labels)`` from model input."""
        if self.classifier is None or self.classifier_norm is None:
            raise InvalidInputError("The model has no annotation head: call finetune() first.")
        hidden, _, padding = self.encode(values)
        return self.classifier(self.classifier_norm(self.pool(hidden, padding, "max")))

    # ------------------------------------------------------------------ scvi-tools interface
    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"x": tensors[REGISTRY_KEYS.X_KEY], "total_counts": tensors.get(TOTAL_COUNTS_KEY)}

    def _get_generative_input(
        self, tensors: dict[str, torch.Tensor], inference_outputs: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "values": inference_outputs["values"],
            "keep": inference_outputs["keep"],
            "decoder_values": inference_outputs["decoder_values"],
        }

    def _downsample(self, counts: torch.Tensor) -> torch.Tensor:
        """Binomially thin a random subset of cells to a random fraction of their reads."""
        b = counts.shape[0]
        frac = torch.empty(b, 1, device=counts.device).uniform_(self.min_downsample_fraction, 1.0)
        chosen = torch.rand(b, 1, device=counts.device) < self.downsample_prob
        frac = torch.where(chosen, frac, torch.ones_like(frac))
        thinned = torch.binomial(counts.float(), frac.expand_as(counts).float())
        # a cell thinned to nothing has no defined depth: keep it whole
        empty = thinned.sum(dim=1, keepdim=True) == 0
        return torch.where(empty, counts.float(), thinned)

    @auto_move_data
    def inference(
        self, x: torch.Tensor, total_counts: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Build one masked, depth-aware pretraining example per cell.

        With ``pre_normalized="F"`` a random half of the cells (``downsample_prob``) is
        thinned to a uniform fraction in [0.1, 1] of its reads; the input gets
        ``S = log10(thinned total)`` and ``T = log10(original total)`` and the target is the
        original normalised profile. Then ``value_mask_prob`` of the non-zero and
        ``zero_mask_prob`` of the zero gene values are masked: they leave the encoder and
        the decoder sees the mask value (or, BERT-style, a random or the original value).
        """
        c = self.config
        g = c.n_genes
        aligned = self.align(x)
        if self.pre_normalized == "F":
            source = self._downsample(aligned)
            target_values = self.model_input(x, "f1")
            values = scfoundation_preprocess(source, "F", "f1")
            values[:, g] = target_values[:, g]  # T = depth of the original profile
        else:
            # normalised input: depth cannot be resampled, T = S
            values = self.model_input(x, "f1", total_counts)
            target_values = values
        genes = values[:, :g]
        nonzero = genes > 0
        draw = torch.rand_like(genes)
        masked = torch.where(nonzero, draw < c.value_mask_prob, draw < c.zero_mask_prob)
        # BERT-style replacement of the masked values seen by the decoder
        choice = torch.rand_like(genes)
        random_values = torch.rand_like(genes) * genes.amax(dim=1, keepdim=True)
        dec_genes = torch.where(
            masked & (choice < c.replace_prob), torch.full_like(genes, c.mask_token_id), genes
        )
        dec_genes = torch.where(
            masked & (choice >= c.replace_prob) & (choice < c.replace_prob + c.random_token_prob),
            random_values,
            dec_genes,
        )
        decoder_values = torch.cat([dec_genes, values[:, g:]], dim=1)
        keep = values > 0
        keep[:, :g] &= ~masked
        return {
            "values": values,
            "keep": keep,
            "decoder_values": decoder_values,
            "masked": masked,
            "target": target_values[:, :g],
        }

    @auto_move_data
    def generative(
        self, values: torch.Tensor, keep: torch.Tensor, decoder_values: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Predicted expression of every position."""
        pred = self.to_final(self.decode(values, keep, decoder_values)).squeeze(-1)
        return {"prediction": pred[:, : self.config.n_genes]}

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict[str, torch.Tensor],
        generative_outputs: dict[str, torch.Tensor],
    ) -> LossOutput:
        """Mean squared error on the masked gene positions."""
        masked = inference_outputs["masked"]
        err = (generative_outputs["prediction"] - inference_outputs["target"]) ** 2 * masked
        n_masked = masked.sum(dim=1).clamp(min=1)
        per_cell = err.sum(dim=1) / n_masked
        loss = err.sum() / masked.sum().clamp(min=1)
        return LossOutput(loss=loss, reconstruction_loss=per_cell, n_obs_minibatch=masked.shape[0])
