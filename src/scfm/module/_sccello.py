"""scCello network: Geneformer-style BERT + gene / cell heads + cell-type prototypes + losses.

scCello :cite:p:`Yuan2024` (reference ``sccello/src/model_prototype_contrastive.py``,
``PrototypeContrastiveForMaskedLM``) pretrains a post-LN BERT over rank-value gene tokens with
four losses: contrastive masked gene prediction, cell-type coherence against learned
prototypes, a coherence regulariser, and ontology relational alignment guided by the Cell
Ontology. Attribute names mirror the checkpoint keys (``bert.*``, ``cls.predictions.*``,
``cell_cls.predictions.*``, ``learned_centroid``, ``affine_projection``, and the buffers
``ctgraph_sim`` / ``cell_type_ancestor_mask``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from scfm.data._geneformer_tokenizer import rank_value_encode
from scfm.errors import InvalidInputError
from scfm.nn._bert import (
    BertConfig,
    BertEmbeddings,
    BertModel,
    get_activation,
    make_key_padding_mask,
)

logger = logging.getLogger(__name__)

__all__ = ["ScCelloConfig", "ScCelloModule"]

#: Label value ignored by the masked-gene cross-entropy (HF convention).
IGNORE_INDEX = -100
#: Rows of ``learned_centroid`` in the release ("all cell types smaller than 600").
N_PROTOTYPES = 600


@dataclass
class ScCelloConfig:
    """scCello architecture, parsed from the release's ``config.json`` (HF ``BertConfig`` names).

    Attributes
    ----------
    vocab_size
        Token vocabulary incl. ``<pad>``, ``<mask>`` and ``<cls>`` (release: 25,427).
    hidden_size, num_hidden_layers, num_attention_heads, intermediate_size
        Encoder shape (release: 256, 6, 4, 512).
    hidden_act
        Activation of the MLP and of both prediction heads (release: ``"relu"``).
    hidden_dropout_prob, attention_probs_dropout_prob
        Dropout (release: 0.02); it also makes the two passes of relational alignment differ.
    max_position_embeddings
        Model input size incl. ``<cls>`` (release: 2048); cells are truncated to it.
    layer_norm_eps
        LayerNorm epsilon.
    pad_token_id
        Padding token id (0).
    initializer_range
        Std of the normal initialisation.
    tau
        Temperature of every contrastive score (cosine / tau; release 0.01).
    data_branch
        Pretraining label set of the release (``"frac100"``: 398 CL types); informational.
    position_embedding_type
        Only ``"absolute"`` exists in scCello.
    """

    vocab_size: int = 25427
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
    tau: float = 0.01
    data_branch: str = "frac100"
    position_embedding_type: str = "absolute"

    def __post_init__(self) -> None:
        if self.position_embedding_type != "absolute":
            raise InvalidInputError(
                f"position_embedding_type={self.position_embedding_type!r}: scCello uses "
                "'absolute' position embeddings only."
            )
        if self.tau <= 0:
            raise InvalidInputError(f"tau must be positive, got {self.tau}.")

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ScCelloConfig:
        """Build from a ``config.json`` dict; other keys (HF bookkeeping) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field."""
        return asdict(self)

    def bert_config(self) -> BertConfig:
        """The encoder's :class:`~scfm.nn.BertConfig` (post-LN, no token types)."""
        return BertConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            hidden_dropout_prob=self.hidden_dropout_prob,
            attention_probs_dropout_prob=self.attention_probs_dropout_prob,
            max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=0,
            layer_norm_eps=self.layer_norm_eps,
            pad_token_id=self.pad_token_id,
            initializer_range=self.initializer_range,
        )


class ScCelloEmbeddings(BertEmbeddings):
    """BERT embeddings plus scCello's three single-row "legacy" tables added to every token.

    ``tf_class_embeddings``, ``tf_superclass_embeddings`` and ``expbin_embeddings`` are
    ``[1, H]`` tables whose row 0 is summed into each token embedding (``expbin`` has
    ``padding_idx=0``, so it stays zero unless a checkpoint says otherwise).
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.tf_class_embeddings = nn.Embedding(1, config.hidden_size)
        self.tf_superclass_embeddings = nn.Embedding(1, config.hidden_size)
        self.expbin_embeddings = nn.Embedding(1, config.hidden_size, padding_idx=0)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        if seq_len > self.position_embeddings.num_embeddings:
            raise InvalidInputError(
                f"Sequence length {seq_len} exceeds max_position_embeddings="
                f"{self.position_embeddings.num_embeddings}; truncate the input."
            )
        # Same summation order as the reference: word + legacy rows, then positions.
        x = (
            self.word_embeddings(input_ids)
            + self.tf_class_embeddings.weight[0]
            + self.tf_superclass_embeddings.weight[0]
            + self.expbin_embeddings.weight[0]
        )
        x = x + self.position_embeddings.weight[:seq_len]
        return self.dropout(self.LayerNorm(x))


class ScCelloPredictionHead(nn.Module):
    """``dense_2(act(layer_norm(dense_1(h)))) + bias``: an H -> H projection head.

    In the reference ``dense_2.bias`` IS ``bias`` (one shared Parameter); here the bias lives
    once, as ``bias``, and the checkpoint reader maps both alias names onto it.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense_1 = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.transform_act_fn = get_activation(config.hidden_act)
        self.dense_2 = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.hidden_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.transform_act_fn(self.layer_norm(self.dense_1(h)))
        return F.linear(h, self.dense_2.weight, self.bias)


class ScCelloHead(nn.Module):
    """Container giving the checkpoint layout ``<head>.predictions.*``."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.predictions = ScCelloPredictionHead(config)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.predictions(h)


def relational_alignment_loss(
    scores: torch.Tensor, levels: torch.Tensor, ancestor: torch.Tensor
) -> torch.Tensor:
    """Ontology relational alignment (scCello's ranking contrastive loss), vectorised.

    For each cell ``i`` and each ontology level ``l`` of the batch above the lowest one, the
    positives are the cells ``j`` with ``levels[i, j] >= l`` and the negatives the cells with
    ``levels[i, j] < l`` whose type is not ``i``'s type or an ancestor of it. Every positive
    contributes ``-log softmax([s_ip, s_i,negatives])[0]``; all terms are averaged.

    Parameters
    ----------
    scores
        ``[B, B]`` cell-cell scores (diagonal: score against the cell's second pass).
    levels
        ``[B, B]`` ``ctgraph_sim[type_i, type_j]``.
    ancestor
        ``[B, B]`` ``cell_type_ancestor_mask[type_i, type_j]``.
    """
    b = scores.shape[0]
    # Candidate thresholds: each distinct level of row i except its minimum.
    thr = levels  # [B, K]
    same = thr[:, :, None] == thr[:, None, :]  # [B, K, K']
    earlier = torch.ones(b, b, dtype=torch.bool, device=scores.device).tril(-1)
    first = ~(same & earlier[None]).any(-1)
    valid = first & (thr > thr.min(dim=1, keepdim=True).values)  # [B, K]
    lev = levels[:, None, :]  # [B, 1, J]
    pos = (lev >= thr[:, :, None]) & valid[:, :, None]  # [B, K, J]
    neg = (lev < thr[:, :, None]) & (ancestor[:, None, :] == 0)
    s = scores[:, None, :].expand(b, b, b)
    neg_lse = torch.logsumexp(s.masked_fill(~neg, float("-inf")), dim=-1, keepdim=True)
    terms = torch.logaddexp(s, neg_lse) - s  # cross-entropy with the positive at index 0
    if not bool(pos.any()):
        return scores.sum() * 0.0
    return terms[pos].mean()


class ScCelloModule(BaseModuleClass):
    """scCello as an scvi-tools module.

    Parameters
    ----------
    config
        Architecture as a dict of :class:`ScCelloConfig` fields.
    gene_token_ids
        Token id of each ``adata.var`` gene (``-1`` = not in the vocabulary).
    gene_medians
        Non-zero median of each gene (ignored where the token id is -1).
    n_labels
        Number of pretraining cell types (rows of ``ctgraph_sim``; release: 398).
    cls_token_id, mask_token_id
        Ids of ``<cls>`` and ``<mask>``.
    label_of_code
        For each category code of the registered labels column, its pretraining cell-type
        index (``-1`` = not a pretraining type); ``None`` when no labels are registered.
    n_prototypes
        Rows of ``learned_centroid`` (the release hard-codes 600; at least ``n_labels``).
    mlm_probability
        Fraction of gene tokens selected for masked gene prediction (reference: 0.15).
    """

    def __init__(
        self,
        config: dict[str, Any],
        gene_token_ids: np.ndarray,
        gene_medians: np.ndarray,
        *,
        n_labels: int,
        cls_token_id: int,
        mask_token_id: int = 1,
        label_of_code: np.ndarray | None = None,
        n_prototypes: int = N_PROTOTYPES,
        mlm_probability: float = 0.15,
    ) -> None:
        super().__init__()
        self.config = ScCelloConfig.from_dict(config)
        bert_config = self.config.bert_config()
        self.cls_token_id = int(cls_token_id)
        self.mask_token_id = int(mask_token_id)
        self.pad_token_id = int(self.config.pad_token_id)
        self.mlm_probability = float(mlm_probability)
        self.bert = BertModel(bert_config)
        self.bert.embeddings = ScCelloEmbeddings(bert_config)
        self.bert.embeddings.apply(self.bert._init_weights)
        self.cls = ScCelloHead(bert_config)
        self.cell_cls = ScCelloHead(bert_config)
        self.learned_centroid = nn.Embedding(
            max(int(n_prototypes), int(n_labels)), bert_config.hidden_size
        )
        self.affine_projection = nn.Linear(bert_config.hidden_size, bert_config.hidden_size)
        for m in (self.cls, self.cell_cls, self.learned_centroid, self.affine_projection):
            m.apply(self.bert._init_weights)
        self.n_labels = int(n_labels)
        # Ontology buffers: part of the checkpoint (int32 as in the release).
        self.register_buffer("ctgraph_sim", torch.ones(n_labels, n_labels, dtype=torch.int32))
        self.register_buffer(
            "cell_type_ancestor_mask", torch.zeros(n_labels, n_labels, dtype=torch.int32)
        )
        # Per-AnnData tokenizer tables: rebuilt from the AnnData on load, never saved.
        token_ids = torch.as_tensor(np.asarray(gene_token_ids), dtype=torch.long)
        medians = torch.as_tensor(np.nan_to_num(np.asarray(gene_medians, dtype=np.float64)))
        self.register_buffer("gene_token_ids", token_ids, persistent=False)
        self.register_buffer("gene_medians", medians, persistent=False)
        codes = np.full(0, -1) if label_of_code is None else np.asarray(label_of_code)
        self.register_buffer(
            "label_of_code", torch.as_tensor(codes, dtype=torch.long), persistent=False
        )
        special = torch.zeros(self.config.vocab_size, dtype=torch.bool)
        special[[self.pad_token_id, self.mask_token_id, self.cls_token_id]] = True
        self.register_buffer("special_tokens", special, persistent=False)

    # ------------------------------------------------------------------ tokens
    @property
    def n_layers(self) -> int:
        """Number of encoder layers."""
        return self.bert.num_layers

    @property
    def _sqrt_tau(self) -> torch.Tensor:
        # The reference divides unit vectors by sqrt(tau) computed as a float32 tensor.
        return torch.sqrt(torch.tensor(self.config.tau, device=self.ctgraph_sim.device))

    def tokenize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``(input_ids [B, L], lengths [B])``: ``<cls>`` + genes by normalised rank.

        Counts are scaled by the total of the in-vocabulary genes (as the reference) and
        divided by the gene medians; at most ``max_position_embeddings`` tokens are kept.
        """
        known = (self.gene_token_ids >= 0).to(x.dtype)
        n_counts = (x.to(torch.float64) * known.to(torch.float64)).sum(1)
        return rank_value_encode(
            x,
            self.gene_token_ids,
            self.gene_medians,
            max_length=self.config.max_position_embeddings,
            cls_token_id=self.cls_token_id,
            pad_token_id=self.pad_token_id,
            n_counts=n_counts,
        )

    def mask_tokens(
        self, input_ids: torch.Tensor, lengths: torch.Tensor, selected: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masking of gene tokens for masked gene prediction.

        Parameters
        ----------
        input_ids, lengths
            Tokens of the minibatch.
        selected
            ``[B, L]`` boolean positions to replace by ``<mask>`` (a fixed mask, e.g. for
            parity tests). ``None`` draws the HF ``DataCollatorForLanguageModeling`` rule:
            15% of the gene tokens, of which 80% become ``<mask>``, 10% a random token and
            10% stay unchanged.

        Returns
        -------
        The masked ids and the labels (original id where selected, ``-100`` elsewhere).
        """
        real = make_key_padding_mask(lengths, input_ids.shape[1])
        candidates = real & ~self.special_tokens[input_ids]
        if selected is not None:
            selected = selected.to(input_ids.device).bool() & candidates
            labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
            masked = torch.where(
                selected, torch.full_like(input_ids, self.mask_token_id), input_ids
            )
            return masked, labels
        draw_select = torch.rand(input_ids.shape, device=input_ids.device)
        selected = candidates & (draw_select < self.mlm_probability)
        labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        draw = torch.rand(input_ids.shape, device=input_ids.device)
        to_mask = selected & (draw < 0.8)
        to_random = selected & (draw >= 0.8) & (draw < 0.9)
        random_ids = torch.randint(self.config.vocab_size, input_ids.shape, device=input_ids.device)
        masked = torch.where(to_mask, torch.full_like(input_ids, self.mask_token_id), input_ids)
        masked = torch.where(to_random, random_ids, masked)
        return masked, labels

    # ------------------------------------------------------------------ encoder + heads
    def encode(
        self, input_ids: torch.Tensor, lengths: torch.Tensor, output_hidden_states: bool = False
    ):
        """Run the encoder; returns :class:`~scfm.nn._bert.BertOutputs`."""
        mask = make_key_padding_mask(lengths.clamp(min=1), input_ids.shape[1])
        return self.bert(input_ids, mask, output_hidden_states=output_hidden_states)

    def cls_states(self, x: torch.Tensor) -> torch.Tensor:
        """``<cls>`` of every hidden state ``[B, n_layers + 1, H]`` (embedding output first)."""
        ids, lengths = self.tokenize(x)
        out = self.encode(ids, lengths, output_hidden_states=True)
        return torch.stack([h[:, 0] for h in out.hidden_states], dim=1)

    def cell_representation(self, h_cls: torch.Tensor) -> torch.Tensor:
        """``z = normalize(cell_cls(h_cls)) / sqrt(tau)``."""
        return F.normalize(self.cell_cls(h_cls), p=2, dim=-1) / self._sqrt_tau

    def prototype_representation(self, cell_type: torch.Tensor) -> torch.Tensor:
        """``p_c = normalize(learned_centroid[c]) / sqrt(tau)``."""
        return F.normalize(self.learned_centroid(cell_type), p=2, dim=-1) / self._sqrt_tau

    def prototype_scores(self, z: torch.Tensor) -> torch.Tensor:
        """Cell-type coherence logits ``z . p_c`` for every pretraining type ``c``."""
        all_types = torch.arange(self.n_labels, device=z.device)
        return z @ self.prototype_representation(all_types).t()

    def gene_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Masked-gene scores ``cos(cls(h), cls(E_w)) / tau`` against every vocabulary token."""
        scale = self._sqrt_tau
        truth = self.cls(self.bert.embeddings.word_embeddings.weight)
        h = F.normalize(self.cls(hidden), p=2, dim=-1) / scale
        return h @ (F.normalize(truth, p=2, dim=-1) / scale).t()

    # ------------------------------------------------------------------ losses
    def pretraining_losses(
        self,
        input_ids: torch.Tensor,
        lengths: torch.Tensor,
        cell_type: torch.Tensor,
        mlm_labels: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The four scCello losses for one minibatch of (masked) tokens.

        Parameters
        ----------
        input_ids, lengths
            Masked tokens of the minibatch.
        cell_type
            ``[B]`` pretraining cell-type index of each cell.
        mlm_labels
            ``[B, L]`` original ids at masked positions, ``-100`` elsewhere.

        Returns
        -------
        Dict with ``mlm_loss``, ``relational_alignment_loss``, ``cell_type_coherence_loss``,
        ``cell_type_coherence_reg_loss``, ``total_loss`` (their unweighted sum, as the
        reference), ``mlm_scores`` (rows of the masked positions, row-major) and
        ``prototype_scores``.
        """
        if bool((cell_type < 0).any()) or bool((cell_type >= self.n_labels).any()):
            raise InvalidInputError(
                "Some cells have no pretraining cell type; every cell needs one of the "
                f"model's {self.n_labels} types for the scCello losses."
            )
        hidden = self.encode(input_ids, lengths).last_hidden_state
        # masked gene prediction: contrastive against every token embedding
        is_masked = mlm_labels != IGNORE_INDEX
        mlm_scores = self.gene_scores(hidden[is_masked])
        if len(mlm_scores):
            mlm_loss = F.cross_entropy(mlm_scores, mlm_labels[is_masked])
        else:
            mlm_loss = hidden.sum() * 0.0
        # cell representations: this pass and a second (dropout-noised) pass
        z = self.cell_representation(hidden[:, 0])
        z_second = self.cell_representation(self.encode(input_ids, lengths).last_hidden_state[:, 0])
        scores = z @ z.t()
        diag = torch.arange(len(z), device=z.device)
        scores = scores.index_put((diag, diag), (z * z_second).sum(-1))
        levels = self.ctgraph_sim[cell_type][:, cell_type].long()
        ancestor = self.cell_type_ancestor_mask[cell_type][:, cell_type]
        relational = relational_alignment_loss(scores, levels, ancestor)
        # cell-type coherence against all prototypes, and its regulariser
        proto_scores = self.prototype_scores(z)
        coherence = F.cross_entropy(proto_scores, cell_type)
        reg = F.mse_loss(self.affine_projection(self.prototype_representation(cell_type)), z)
        total = mlm_loss + relational + coherence + reg
        return {
            "mlm_loss": mlm_loss,
            "relational_alignment_loss": relational,
            "cell_type_coherence_loss": coherence,
            "cell_type_coherence_reg_loss": reg,
            "total_loss": total,
            "mlm_scores": mlm_scores,
            "prototype_scores": proto_scores,
        }

    # ------------------------------------------------------------------ scvi-tools API
    def _get_inference_input(self, tensors: dict[str, torch.Tensor], **kwargs) -> dict:
        labels = tensors.get(REGISTRY_KEYS.LABELS_KEY)
        return {"x": tensors[REGISTRY_KEYS.X_KEY], "labels": labels}

    @auto_move_data
    def inference(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        """Tokenise and mask a minibatch of counts for pretraining.

        Parameters
        ----------
        x
            Raw counts ``[B, n_vars]``.
        labels
            ``[B, 1]`` category codes of the registered cell-type column.
        """
        ids, lengths = self.tokenize(x)
        masked, mlm_labels = self.mask_tokens(ids, lengths)
        if labels is None or len(self.label_of_code) == 0:
            raise InvalidInputError(
                "scCello pretraining needs cell types: call setup_anndata with "
                "labels_key='cell_type_ontology_term_id' (CL ids)."
            )
        cell_type = self.label_of_code[labels.reshape(-1).long()]
        return {
            "input_ids": masked,
            "lengths": lengths,
            "mlm_labels": mlm_labels,
            "cell_type": cell_type,
        }

    def _get_generative_input(self, tensors: dict, inference_outputs: dict, **kwargs) -> dict:
        return {}

    def generative(self) -> dict:
        """Nothing to generate: the losses need the encoder passes (see :meth:`loss`)."""
        return {}

    def loss(
        self, tensors: dict, inference_outputs: dict, generative_outputs: dict, **kwargs
    ) -> LossOutput:
        """Sum of the four scCello losses (all weights 1, as in the reference)."""
        out = self.pretraining_losses(
            inference_outputs["input_ids"],
            inference_outputs["lengths"],
            inference_outputs["cell_type"],
            inference_outputs["mlm_labels"],
        )
        n = len(inference_outputs["lengths"])
        return LossOutput(
            loss=out["total_loss"],
            # per-cell view of the batch loss, so scvi's epoch metrics report the total
            reconstruction_loss=out["total_loss"].detach().expand(n),
            n_obs_minibatch=n,
            extra_metrics={
                k: out[k].detach()
                for k in (
                    "mlm_loss",
                    "relational_alignment_loss",
                    "cell_type_coherence_loss",
                    "cell_type_coherence_reg_loss",
                )
            },
        )

    def sample(self, *args, **kwargs):  # pragma: no cover - not a generative count model
        """Not defined for scCello (it models gene ranks, not counts)."""
        raise NotImplementedError("scCello does not sample counts.")
