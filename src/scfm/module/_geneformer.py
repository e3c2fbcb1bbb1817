"""Geneformer network: rank-value tokenisation on the fly + BERT encoder + MLM / cell heads.

Attribute names mirror HF ``BertForMaskedLM`` / ``BertForSequenceClassification``
(``bert.*``, ``cls.predictions.*``, ``classifier.*``), so a released state dict loads after
dropping only the ``position_ids`` buffer and the tied decoder weight.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from scfm.data._geneformer_tokenizer import rank_value_encode
from scfm.errors import InvalidInputError
from scfm.nn._bert import BertConfig, BertLMHead, BertModel, make_key_padding_mask

logger = logging.getLogger(__name__)

__all__ = ["GeneformerModule"]

Pooling = Literal["cls", "mean", "mean_drop_last"]
Objective = Literal["mlm", "classification"]

#: Label value ignored by the MLM cross-entropy (HF convention).
IGNORE_INDEX = -100


class GeneformerModule(BaseModuleClass):
    """Geneformer as an scvi-tools module.

    Parameters
    ----------
    bert_config
        Architecture as a dict of :class:`~scfm.nn.BertConfig` fields.
    gene_token_ids
        Token id of each ``adata.var`` gene (``-1`` = not in the vocabulary); genes sharing a
        token are summed by the tokenizer.
    gene_medians
        Median of each gene's token (any value where the token id is -1).
    input_size
        Model input size incl. special tokens (V1 2048, V2 4096, BioNeMo 2048).
    pad_token_id, mask_token_id
        Ids of the padding and mask tokens.
    cls_token_id, eos_token_id
        Ids of ``<cls>`` / ``<eos>`` if the tokenizer adds them (V2: both; BioNeMo: cls).
    special_token_ids
        Every special token id (never masked, excluded from mean pooling).
    n_labels
        Size of the cell classification head (``0`` = none).
    mlm_probability
        Fraction of gene tokens selected for the MLM objective.
    """

    def __init__(
        self,
        bert_config: dict[str, Any],
        gene_token_ids: np.ndarray,
        gene_medians: np.ndarray,
        *,
        input_size: int,
        pad_token_id: int,
        mask_token_id: int,
        cls_token_id: int | None = None,
        eos_token_id: int | None = None,
        special_token_ids: Sequence[int] = (),
        n_labels: int = 0,
        mlm_probability: float = 0.15,
    ) -> None:
        super().__init__()
        self.config = BertConfig.from_dict(bert_config)
        self.input_size = int(input_size)
        self.pad_token_id = int(pad_token_id)
        self.mask_token_id = int(mask_token_id)
        self.cls_token_id = cls_token_id
        self.eos_token_id = eos_token_id
        self.mlm_probability = float(mlm_probability)
        self.objective: Objective = "mlm"
        self.bert = BertModel(self.config, add_pooling_layer=n_labels > 0)
        self.cls = BertLMHead(self.config)
        self.classifier = nn.Linear(self.config.hidden_size, n_labels) if n_labels > 0 else None
        # Per-AnnData tokenizer tables: rebuilt from the AnnData on load, never saved.
        token_ids = torch.as_tensor(np.asarray(gene_token_ids), dtype=torch.long)
        medians = torch.as_tensor(np.nan_to_num(np.asarray(gene_medians, dtype=np.float64)))
        self.register_buffer("gene_token_ids", token_ids, persistent=False)
        self.register_buffer("gene_medians", medians, persistent=False)
        special = torch.zeros(self.config.vocab_size, dtype=torch.bool)
        special[list(special_token_ids)] = True
        self.register_buffer("special_tokens", special, persistent=False)
        # Tokens the "random replacement" branch of MLM draws from: genes that an input can hold.
        genes = torch.unique(token_ids[token_ids >= 0])
        self.register_buffer("replacement_tokens", genes, persistent=False)

    # ------------------------------------------------------------------ heads
    def add_classifier(self, n_labels: int) -> None:
        """Add (or replace) the pooler + linear cell classification head."""
        from scfm.nn._bert import BertPooler

        self.bert.pooler = BertPooler(self.config)
        self.classifier = nn.Linear(self.config.hidden_size, n_labels)
        for m in (self.bert.pooler.dense, self.classifier):
            nn.init.normal_(m.weight, std=self.config.initializer_range)
            nn.init.zeros_(m.bias)
        self.to(self.gene_token_ids.device)

    @property
    def n_layers(self) -> int:
        """Number of encoder layers."""
        return self.bert.num_layers

    # ------------------------------------------------------------------ tokens
    def tokenize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank-value tokens ``(input_ids [B, L], lengths [B])`` of a minibatch of counts."""
        return rank_value_encode(
            x,
            self.gene_token_ids,
            self.gene_medians,
            max_length=self.input_size,
            cls_token_id=self.cls_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )

    def mask_tokens(
        self, input_ids: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT masking of gene tokens: 80% ``<mask>``, 10% random gene, 10% unchanged.

        Returns the masked ids and the labels (original id at selected positions,
        ``-100`` elsewhere). Special tokens and padding are never selected.
        """
        real = make_key_padding_mask(lengths, input_ids.shape[1])
        candidates = real & ~self.special_tokens[input_ids]
        selected = candidates & (
            torch.rand_like(input_ids, dtype=torch.float) < self.mlm_probability
        )
        labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        draw = torch.rand_like(input_ids, dtype=torch.float)
        to_mask = selected & (draw < 0.8)
        to_random = selected & (draw >= 0.8) & (draw < 0.9)
        pool = self.replacement_tokens
        random_ids = pool[torch.randint(len(pool), input_ids.shape, device=input_ids.device)]
        masked = torch.where(to_mask, torch.full_like(input_ids, self.mask_token_id), input_ids)
        masked = torch.where(to_random, random_ids, masked)
        return masked, labels

    # ------------------------------------------------------------------ encoder
    def resolve_layer(self, layer: int) -> int:
        """Index into ``(embedding output, layer 1, ..., layer N)``, python style."""
        n = self.n_layers + 1
        if not -n <= layer < n:
            raise InvalidInputError(
                f"layer={layer} is out of range for a {self.n_layers}-layer model; use "
                f"-1 (last layer), -2 (second to last, the reference default), ... or 0..{n - 1}."
            )
        return layer % n

    def encode(
        self, input_ids: torch.Tensor, lengths: torch.Tensor, layer: int = -1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states ``[B, L, H]`` of ``layer`` and the padding mask ``[B, L]``.

        Layers after ``layer`` are not computed.
        """
        idx = self.resolve_layer(layer)
        # A cell without any expressed vocabulary gene (V1) still needs one key to attend to.
        mask = make_key_padding_mask(lengths.clamp(min=1), input_ids.shape[1])
        if idx == 0:
            out = self.bert.embeddings(input_ids)
        else:
            out = self.bert(input_ids, mask, num_layers=idx).last_hidden_state
        return out, make_key_padding_mask(lengths, input_ids.shape[1])

    @staticmethod
    def pool(
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        lengths: torch.Tensor,
        pooling: Pooling,
        special_tokens: torch.Tensor,
    ) -> torch.Tensor:
        """Cell embedding from token states.

        ``"cls"``: the first position; ``"mean"``: mean over real non-special tokens;
        ``"mean_drop_last"``: as ``"mean"`` but also without the last real token
        (BioNeMo's ``include_embeddings`` drops it, assuming a trailing ``[SEP]``).
        """
        if pooling == "cls":
            return hidden[:, 0]
        keep = make_key_padding_mask(lengths, input_ids.shape[1]) & ~special_tokens[input_ids]
        if pooling == "mean_drop_last":
            last = (lengths - 1).clamp(min=0)
            keep = keep.clone()
            keep[torch.arange(len(lengths), device=keep.device), last] = False
        elif pooling != "mean":
            raise InvalidInputError(
                f"pooling={pooling!r} is not supported; use 'cls', 'mean' or 'mean_drop_last'."
            )
        w = keep.to(hidden.dtype)
        return (hidden * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)

    def embed_cells(self, x: torch.Tensor, pooling: Pooling, layer: int) -> torch.Tensor:
        """Cell embeddings ``[B, H]`` of a minibatch of counts."""
        ids, lengths = self.tokenize(x)
        hidden, _ = self.encode(ids, lengths, layer)
        return self.pool(hidden, ids, lengths, pooling, self.special_tokens)

    def mlm_logits(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """MLM logits ``[B, L, V]`` of the final layer for given (possibly masked) tokens."""
        mask = make_key_padding_mask(lengths.clamp(min=1), input_ids.shape[1])
        hidden = self.bert(input_ids, mask).last_hidden_state
        return self.cls(hidden, self.bert.embeddings.word_embeddings.weight)

    # ------------------------------------------------------------------ scvi-tools API
    def _get_inference_input(self, tensors: dict[str, torch.Tensor], **kwargs) -> dict:
        return {"x": tensors[REGISTRY_KEYS.X_KEY]}

    @auto_move_data
    def inference(self, x: torch.Tensor, mask_inputs: bool | None = None) -> dict:
        """Tokenise, optionally mask (MLM training), and encode.

        Parameters
        ----------
        x
            Raw counts ``[B, n_vars]``.
        mask_inputs
            Apply MLM masking; default: whenever the objective is MLM (training and
            validation alike, as HF's collator masks evaluation batches too). Embedding
            paths do not use this method (see :meth:`embed_cells`).
        """
        ids, lengths = self.tokenize(x)
        labels = None
        if mask_inputs is None:
            mask_inputs = self.objective == "mlm"
        if mask_inputs:
            ids, labels = self.mask_tokens(ids, lengths)
        mask = make_key_padding_mask(lengths.clamp(min=1), ids.shape[1])
        hidden = self.bert(ids, mask).last_hidden_state
        return {"input_ids": ids, "lengths": lengths, "hidden": hidden, "mlm_labels": labels}

    def _get_generative_input(self, tensors: dict, inference_outputs: dict, **kwargs) -> dict:
        return {
            "hidden": inference_outputs["hidden"],
            "mlm_labels": inference_outputs["mlm_labels"],
        }

    @auto_move_data
    def generative(self, hidden: torch.Tensor, mlm_labels: torch.Tensor | None = None) -> dict:
        """MLM logits (only at labelled positions when labels are given) or class logits."""
        if self.objective == "classification":
            if self.classifier is None or self.bert.pooler is None:
                raise InvalidInputError("The module has no classification head; add one first.")
            return {"class_logits": self.classifier(self.bert.pooler(hidden))}
        word = self.bert.embeddings.word_embeddings.weight
        if mlm_labels is not None:
            # Only the selected positions enter the loss: skip the [B, L, V] logits.
            return {"mlm_logits": self.cls(hidden[mlm_labels != IGNORE_INDEX], word)}
        return {"mlm_logits": self.cls(hidden, word)}

    def loss(
        self, tensors: dict, inference_outputs: dict, generative_outputs: dict, **kwargs
    ) -> LossOutput:
        """MLM cross-entropy over masked tokens, or cell-label cross-entropy."""
        n_cells = inference_outputs["hidden"].shape[0]
        if self.objective == "classification":
            logits = generative_outputs["class_logits"]
            y = tensors[REGISTRY_KEYS.LABELS_KEY].reshape(-1).long()
            per_cell = F.cross_entropy(logits, y, reduction="none")
            return LossOutput(
                loss=per_cell.mean(),
                reconstruction_loss=per_cell,
                extra_metrics={"accuracy": (logits.argmax(1) == y).float().mean()},
            )
        labels = inference_outputs["mlm_labels"]
        if labels is None:
            raise InvalidInputError("MLM loss needs masked inputs (inference(mask_inputs=True)).")
        targets = labels[labels != IGNORE_INDEX]
        logits = generative_outputs["mlm_logits"]
        if logits.ndim == 3:
            logits = logits[labels != IGNORE_INDEX]
        if len(targets) == 0:
            # Nothing selected in this minibatch (tiny cells): a zero loss that keeps the graph.
            loss = logits.sum() * 0.0
            return LossOutput(loss=loss, n_obs_minibatch=n_cells)
        per_token = F.cross_entropy(logits, targets, reduction="none")
        # Per-cell mean loss for scvi's epoch metrics; the optimised loss is the token mean.
        rows = torch.nonzero(labels != IGNORE_INDEX)[:, 0]
        per_cell = torch.zeros(n_cells, device=logits.device).index_add_(0, rows, per_token)
        counts = torch.zeros(n_cells, device=logits.device).index_add_(
            0, rows, torch.ones_like(per_token)
        )
        return LossOutput(loss=per_token.mean(), reconstruction_loss=per_cell / counts.clamp(min=1))

    def sample(self, *args, **kwargs):  # pragma: no cover - not a generative count model
        """Not defined for Geneformer (it models gene ranks, not counts)."""
        raise NotImplementedError("Geneformer does not sample counts.")
