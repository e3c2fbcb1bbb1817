"""The CellFM network :cite:p:`Zeng2025` as an scvi-tools module.

Attribute names mirror the MindSpore parameter names of the released checkpoints
(``gene_emb``, ``value_enc.value_enc.w1``, ``encoder.0.attn.q_proj``, ``ST_enc.table``, ...),
so loading needs no rename table beyond MindSpore's LayerNorm ``gamma``/``beta``.

Two encoder paths exist in the reference and both are exposed:

* the zero-shot ``Backbone`` (tutorial default): ``[CLS, genes]``;
* the pretraining / fine-tuning ``FinetuneModel`` with two read-depth tokens:
  ``[CLS, S, T, genes]``; in its first ``N // 2`` layers masked genes are not keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from scfm.data._cellfm_tokenize import (
    MAX_TOKENS,
    CellFMTokens,
    cellfm_mask_tokens,
    cellfm_normalize,
    cellfm_tokenize,
)
from scfm.nn._retention import RetentionLayer

__all__ = ["CellFMModule"]

#: MindSpore ``nn.LeakyReLU`` default slope (PyTorch's default is 0.01).
MINDSPORE_LEAKY_SLOPE = 0.2
#: Read-depth features are ``log1p(total / 1000)``.
ST_SCALE = 1000.0
#: Hidden width of the annotation head (as CellFM-torch's classifier).
ANNOTATION_HIDDEN = 128


class ValueProjection(nn.Module):
    """Soft-binning scalar encoder (the reference's ``FFN``): scalar -> ``d`` vector.

    ``z = LeakyReLU_0.2(w1 v)``; ``z = w3 z + a z``; ``out = table(softmax(z))``.
    """

    def __init__(self, emb_dims: int, bins: int = 256) -> None:
        super().__init__()
        self.w1 = nn.Linear(1, bins, bias=False)
        self.w3 = nn.Linear(bins, bins, bias=False)
        self.table = nn.Linear(bins, emb_dims, bias=False)
        self.a = nn.Parameter(torch.zeros(1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = F.leaky_relu(self.w1(x[..., None]), MINDSPORE_LEAKY_SLOPE)
        v = self.w3(v) + v * self.a
        return self.table(torch.softmax(v, dim=-1))


class ValueEncoder(nn.Module):
    """Expression-value embedding; masked values get the learned ``mask_emb``."""

    def __init__(self, emb_dims: int, bins: int = 256) -> None:
        super().__init__()
        self.value_enc = ValueProjection(emb_dims, bins)
        self.mask_emb = nn.Parameter(torch.zeros(1, 1, emb_dims))

    def forward(self, values: torch.Tensor, unmask: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.value_enc(values)
        if unmask is None:
            return emb
        unmask = unmask[..., None].to(emb.dtype)
        return emb * unmask + self.mask_emb * (1 - unmask)


class ValueDecoder(nn.Module):
    """Gene-wise value head ``w2 LeakyReLU_0.2(w1 h)`` (+ optional zero-probability head)."""

    def __init__(self, emb_dims: int, zero: bool = False) -> None:
        super().__init__()
        self.w1 = nn.Linear(emb_dims, emb_dims, bias=False)
        self.w2 = nn.Linear(emb_dims, 1, bias=False)
        if zero:
            self.zero_logit = nn.Sequential(
                nn.Linear(emb_dims, emb_dims),
                nn.LeakyReLU(MINDSPORE_LEAKY_SLOPE),
                nn.Linear(emb_dims, emb_dims),
                nn.LeakyReLU(MINDSPORE_LEAKY_SLOPE),
                nn.Linear(emb_dims, 1),
                nn.Sigmoid(),
            )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w2(F.leaky_relu(self.w1(h), MINDSPORE_LEAKY_SLOPE)).squeeze(-1)


class CellwiseDecoder(nn.Module):
    """Cell-wise value head: ``sigmoid(map(gene_emb_j)) · CLS`` (+ optional zero head)."""

    def __init__(self, emb_dims: int, zero: bool = False) -> None:
        super().__init__()
        self.map = nn.Linear(emb_dims, emb_dims, bias=False)
        if zero:
            self.zero_logit = nn.Linear(emb_dims, emb_dims)

    def forward(self, cls: torch.Tensor, gene_emb: torch.Tensor) -> torch.Tensor:
        query = torch.sigmoid(self.map(gene_emb))
        return (query @ cls[:, :, None]).squeeze(-1)


class CellFMModule(BaseModuleClass):
    """CellFM: gene + value tokens, a linear-retention encoder and value-recovery heads.

    Parameters
    ----------
    kept_var_index
        Positions in ``adata.var`` of the vocabulary genes, in token order.
    kept_token_ids
        Their vocabulary ids (1 + row in the gene list).
    enc_dims, enc_nlayers, enc_num_heads, gene_rows, value_bins, st_tokens, add_zero, lora,
    enc_dropout
        Architecture, see :class:`scfm.io.CellFMConfig`.
    mask_ratio
        Fraction of each cell's genes scored by the masked value recovery objective (the
        80M fine-tuning examples use 0.5; pretraining ``train.py`` 0.2).
    max_tokens
        At most this many genes per cell (reference: 2048).
    read_depth_augment
        During training with ST tokens, thin the counts of half of the cells binomially
        (``q ~ Beta(2, 2)``) and ask the model to recover the original values (the
        reference's "bayes" augmentation).
    n_labels
        Cell-type classes of the annotation head; 0 for none.
    """

    def __init__(
        self,
        kept_var_index: Sequence[int],
        kept_token_ids: Sequence[int],
        enc_dims: int,
        enc_nlayers: int,
        enc_num_heads: int,
        gene_rows: int,
        value_bins: int = 256,
        st_tokens: bool = True,
        add_zero: bool = False,
        lora: int = 0,
        enc_dropout: float = 0.0,
        mask_ratio: float = 0.5,
        max_tokens: int | None = MAX_TOKENS,
        read_depth_augment: bool = False,
        n_labels: int = 0,
    ) -> None:
        super().__init__()
        self.depth = enc_nlayers
        self.mask_ratio = mask_ratio
        self.max_tokens = max_tokens
        self.read_depth_augment = read_depth_augment
        self.st_tokens = st_tokens
        # Which adata.var columns are tokens; rebuilt from init args, so not in the state dict.
        self.register_buffer(
            "kept_var_index", torch.as_tensor(kept_var_index, dtype=torch.long), persistent=False
        )
        self.register_buffer(
            "kept_token_ids", torch.as_tensor(kept_token_ids, dtype=torch.long), persistent=False
        )

        self.gene_emb = nn.Parameter(torch.empty(gene_rows, enc_dims))
        self.cls_token = nn.Parameter(torch.empty(1, 1, enc_dims))
        self.zero_emb = nn.Parameter(torch.zeros(1, 1, enc_dims))
        if st_tokens:
            self.ST_emb = nn.Parameter(torch.empty(1, 2, enc_dims))
            self.ST_enc = ValueProjection(enc_dims, value_bins)
        self.value_enc = ValueEncoder(enc_dims, value_bins)
        self.encoder = nn.ModuleList(
            [
                RetentionLayer(
                    enc_dims,
                    enc_num_heads,
                    enc_nlayers,
                    dropout=enc_dropout * i / enc_nlayers,
                    lora=lora,
                )
                for i in range(enc_nlayers)
            ]
        )
        self.value_dec = ValueDecoder(enc_dims, zero=add_zero)
        self.cellwise_dec = CellwiseDecoder(enc_dims, zero=add_zero)
        self.n_labels = 0
        self._init_weights(enc_nlayers)
        if n_labels > 0:
            self.add_annotation_head(n_labels)

    def _init_weights(self, n_layers: int) -> None:
        """Reference initialisation (XavierNormal gains; DeepNorm beta on v/u/o)."""
        nn.init.xavier_normal_(self.gene_emb, gain=0.5)
        with torch.no_grad():
            self.gene_emb[0].zero_()  # padding row
        nn.init.xavier_normal_(self.cls_token, gain=0.5)
        if self.st_tokens:
            nn.init.xavier_normal_(self.ST_emb, gain=0.5)
        beta = (8 * n_layers) ** -0.25
        for layer in self.encoder:
            for name in ("q", "k"):
                nn.init.xavier_normal_(getattr(layer.attn, f"{name}_proj").weight)
            for name in ("v", "u", "o"):
                nn.init.xavier_normal_(getattr(layer.attn, f"{name}_proj").weight, gain=beta)
            for name in ("u", "v", "o"):
                nn.init.xavier_normal_(getattr(layer.ffn, f"{name}_proj").weight, gain=beta)

    # ------------------------------------------------------------------ tokens
    def tokenize(
        self, counts: torch.Tensor, generator: torch.Generator | None = None
    ) -> CellFMTokens:
        """Tokens of a minibatch of raw counts (``[B, n_vars]`` in ``adata.var`` order)."""
        return cellfm_tokenize(
            counts,
            self.kept_var_index,
            self.kept_token_ids,
            max_tokens=self.max_tokens,
            generator=generator,
        )

    @staticmethod
    def st_features(source_totals: torch.Tensor, target_totals: torch.Tensor) -> torch.Tensor:
        """Read-depth features ``[log1p(S / 1000), log1p(T / 1000)]`` ``[B, 2]``."""
        return torch.stack(
            [torch.log1p(source_totals / ST_SCALE), torch.log1p(target_totals / ST_SCALE)], -1
        )

    # ------------------------------------------------------------------ encoder
    def encode(
        self,
        gene_ids: torch.Tensor,
        values: torch.Tensor,
        token_mask: torch.Tensor,
        unmask: torch.Tensor | None = None,
        st_feat: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the encoder.

        Parameters
        ----------
        gene_ids
            ``[B, L]`` vocabulary ids (0 on padding).
        values
            ``[B, L]`` log1p values (ignored where ``unmask`` is 0).
        token_mask
            ``[B, L]`` 1 on real tokens.
        unmask
            ``[B, L]`` 0 where the value is masked (``mask_emb``); ``None``: nothing masked.
        st_feat
            ``[B, 2]`` read-depth features; given, the ``[CLS, S, T, genes]`` path of the
            fine-tuning model runs, otherwise the zero-shot ``Backbone`` path.

        Returns
        -------
        ``(hidden [B, P + L, d], gene embedding rows [B, L, d])`` with ``P`` prefix tokens
        (1 or 3).
        """
        b = gene_ids.shape[0]
        gene_emb = self.gene_emb[gene_ids]
        x = gene_emb + self.value_enc(values, unmask)
        prefix = [self.cls_token.expand(b, -1, -1)]
        if st_feat is not None:
            if not self.st_tokens:
                raise ValueError("this CellFM checkpoint has no read-depth (ST) tokens")
            prefix.append(self.ST_emb + self.ST_enc(st_feat.to(x.dtype)))
        x = torch.cat([*prefix, x], dim=1)
        n_prefix = x.shape[1] - gene_ids.shape[1]
        ones = token_mask.new_ones(b, n_prefix)
        pad_mask = torch.cat([ones, token_mask], dim=1)
        # Padded rows start at zero (the reference multiplies them out) and are never keys.
        x = x * pad_mask[..., None].to(x.dtype)
        keys_first = pad_mask if unmask is None else torch.cat([ones, unmask * token_mask], 1)
        n_tokens = token_mask.sum(dim=1)
        # The reference's len_scale 1/sqrt(n) on V; cancelled by the per-head normalisation.
        value_scale = torch.rsqrt(n_tokens.clamp_min(1).float())
        for i, layer in enumerate(self.encoder):
            mask = keys_first if i < self.depth // 2 else pad_mask
            x = layer(x, key_mask=mask, value_scale=value_scale)
        return x, gene_emb

    # ------------------------------------------------------------------ scvi-tools API
    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"counts": tensors[REGISTRY_KEYS.X_KEY]}

    def _get_generative_input(self, tensors, inference_outputs) -> dict[str, torch.Tensor]:
        return {
            "cls": inference_outputs["cls"],
            "hidden": inference_outputs["hidden"],
            "gene_emb": inference_outputs["gene_emb"],
        }

    @auto_move_data
    def inference(
        self,
        counts: torch.Tensor,
        mask_ratio: float | None = None,
        use_st: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Tokenise, mask (when ``mask_ratio > 0``) and encode a minibatch of counts.

        Parameters
        ----------
        counts
            ``[B, n_vars]`` raw counts.
        mask_ratio
            Fraction of genes to score; ``None``: the module's ``mask_ratio`` (so that
            validation scores the same objective as training).
        use_st
            Use the read-depth token path; ``None``: whenever the model has ST tokens and
            a value is masked (the reference's fine-tuning model).
        generator
            Random generator for subsampling and masking.
        """
        if mask_ratio is None:
            mask_ratio = self.mask_ratio
        target_tokens = self.tokenize(counts, generator)
        tokens = target_tokens
        source_totals = target_tokens.totals
        if self.training and self.read_depth_augment and self.st_tokens:
            tokens, source_totals = self._thin(counts, target_tokens, generator)
        token_mask = tokens.token_mask
        unmask, scored = None, None
        if mask_ratio > 0:
            unmask, scored = cellfm_mask_tokens(
                tokens.n_tokens, tokens.gene_ids.shape[1], mask_ratio, generator=generator
            )
        if use_st is None:
            use_st = self.st_tokens and mask_ratio > 0
        st_feat = self.st_features(source_totals, target_tokens.totals) if use_st else None
        hidden, gene_emb = self.encode(tokens.gene_ids, tokens.values, token_mask, unmask, st_feat)
        n_prefix = hidden.shape[1] - tokens.gene_ids.shape[1]
        return {
            "cls": hidden[:, 0],
            "hidden": hidden[:, n_prefix:],
            "gene_emb": gene_emb,
            "gene_ids": tokens.gene_ids,
            "token_mask": token_mask,
            "target": target_tokens.values,
            "scored": scored if scored is not None else torch.zeros_like(token_mask),
        }

    def _thin(
        self, counts: torch.Tensor, tokens: CellFMTokens, generator: torch.Generator | None
    ) -> tuple[CellFMTokens, torch.Tensor]:
        """Binomially thin half of the cells (``q ~ Beta(2, 2)``, expressed genes keep >= 1).

        The thinned cell keeps the gene set of the original tokens, so that the recovery
        target stays aligned; its values are normalised by the thinned total ``S``.
        """
        _, kept, _ = cellfm_normalize(counts, self.kept_var_index)
        b = kept.shape[0]
        q = torch.distributions.Beta(2.0, 2.0).sample((b, 1)).to(kept.device)
        apply = torch.rand(b, 1, device=kept.device, generator=generator) < 0.5
        thinned = torch.binomial(kept, q.expand_as(kept).contiguous(), generator=generator)
        thinned = torch.where(kept > 0, thinned.clamp_min(1), thinned)
        thinned = torch.where(apply, thinned, kept)
        source_totals = thinned.sum(dim=1)
        # Token positions of the original cell -> their thinned counts.
        sorted_ids, order = self.kept_token_ids.sort()
        pos = torch.searchsorted(sorted_ids, tokens.gene_ids).clamp_max(len(order) - 1)
        columns = order[pos]
        token_counts = torch.gather(thinned, 1, columns) * tokens.token_mask
        size = torch.where(source_totals > 0, source_totals / 1e4, torch.ones_like(source_totals))
        values = torch.log1p(token_counts / size[:, None])
        thinned_tokens = CellFMTokens(tokens.gene_ids, values, tokens.n_tokens, source_totals)
        return thinned_tokens, source_totals

    @auto_move_data
    def generative(
        self, cls: torch.Tensor, hidden: torch.Tensor, gene_emb: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Value predictions: gene-wise from each token, cell-wise from the CLS embedding."""
        out = {"gw_pred": self.value_dec(hidden), "cw_pred": self.cellwise_dec(cls, gene_emb)}
        if self.n_labels > 0:
            out["logits"] = self.classifier(cls)
        return out

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict[str, torch.Tensor],
        generative_outputs: dict[str, torch.Tensor],
    ) -> LossOutput:
        """Masked value recovery (gene-wise + cell-wise MSE), or annotation cross-entropy.

        With an annotation head the loss is the cross-entropy of the cell-type logits
        (the masked recovery terms are added when ``mask_ratio > 0`` in training).
        """
        scored = inference_outputs["scored"]
        target = inference_outputs["target"]
        n_scored = scored.sum().clamp_min(1.0)
        loss_gw = ((generative_outputs["gw_pred"] - target) ** 2 * scored).sum() / n_scored
        loss_cw = ((generative_outputs["cw_pred"] - target) ** 2 * scored).sum() / n_scored
        per_cell = ((generative_outputs["gw_pred"] - target) ** 2 * scored).sum(1)
        extra = {"loss_gw": loss_gw.detach(), "loss_cw": loss_cw.detach()}
        if self.n_labels > 0:
            labels = tensors[REGISTRY_KEYS.LABELS_KEY].long().view(-1)
            logits = generative_outputs["logits"]
            ce = F.cross_entropy(logits, labels)
            total = ce + (loss_gw + loss_cw if bool(scored.any()) else 0.0)
            return LossOutput(
                loss=total,
                reconstruction_loss=per_cell,
                classification_loss=ce,
                logits=logits,
                true_labels=labels,
                extra_metrics=extra,
            )
        return LossOutput(loss=loss_gw + loss_cw, reconstruction_loss=per_cell, extra_metrics=extra)

    def sample(self, *args, **kwargs):  # pragma: no cover - not a generative count model
        raise NotImplementedError("CellFM does not define a count likelihood to sample from.")

    # ------------------------------------------------------------------ fine-tuning
    def add_annotation_head(self, n_labels: int) -> None:
        """Add the cell-type head ``classifier`` (MLP ``d -> 128 -> n_labels`` on the CLS)."""
        d = self.gene_emb.shape[1]
        self.classifier = nn.Sequential(
            nn.Linear(d, ANNOTATION_HIDDEN),
            nn.LeakyReLU(MINDSPORE_LEAKY_SLOPE),
            nn.Linear(ANNOTATION_HIDDEN, n_labels),
        ).to(self.gene_emb.device)
        self.n_labels = n_labels

    def add_lora(self, rank: int) -> None:
        """Add rank-``rank`` LoRA adapters to every retention and GLU projection."""
        for layer in self.encoder:
            layer.attn.add_lora(rank)
            layer.ffn.add_lora(rank)
        self.to(self.gene_emb.device)

    def merge_lora(self) -> None:
        """Fold every LoRA adapter into its projection (the reference's ``combine_weight``)."""
        for layer in self.encoder:
            layer.attn.merge_lora()
            layer.ffn.merge_lora()

    def freeze_for_finetuning(self) -> int:
        """Train only LoRA adapters and the annotation head; return the trainable count."""
        for name, p in self.named_parameters():
            p.requires_grad = ".lora_" in name or name.startswith("classifier.")
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
