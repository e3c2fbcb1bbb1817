"""scCello network: Geneformer-style BERT + gene / cell heads + cell-type prototypes + losses.

scCello :cite:p:`Yuan2024` (reference ``sccello/src/model_prototype_contrastive.py``,
``PrototypeContrastiveForMaskedLM``) pretrains a post-LN BERT over rank-value gene tokens with
four losses: contrastive masked gene prediction, cell-type coherence against learned
prototypes, a coherence regulariser, and ontology relational alignment guided by the Cell
Ontology. Attribute names mirror the checkpoint keys (``bert.*``, ``cls.predictions.*``,
``cell_cls.predictions.*``, ``learned_centroid``, ``affine_projection``, and the buffers
``ctgraph_sim`` / ``cell_type_ancestor_mask``).

The module works in the token-vocabulary space: its input is a count matrix whose column
``j`` is the gene of token id ``j`` (special-token columns are never read), and it tokenises
each cell on the fly (``<cls>`` + genes by decreasing median-normalised expression).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from scfm.errors import CheckpointFormatError, InvalidInputError
from scfm.module._checks import is_int, is_real
from scfm.module._outputs import ModuleOutput
from scfm.nn._bert import (
    BertConfig,
    BertConfigBase,
    BertEmbeddings,
    BertModel,
    get_activation,
    make_key_padding_mask,
)

logger = logging.getLogger(__name__)

__all__ = ["ScCelloConfig", "ScCelloModule", "rank_value_tokens", "relational_alignment_loss"]

#: Label value ignored by the masked-gene cross-entropy (HF convention).
IGNORE_INDEX = -100
#: Rows of ``learned_centroid`` in the release ("all cell types smaller than 600").
N_PROTOTYPES = 600
#: Library size every cell is scaled to before dividing by the gene medians.
TARGET_SUM = 10_000.0
#: HF ``DataCollatorForLanguageModeling``: of the selected tokens, 80% become ``<mask>``,
#: 10% a random token and 10% stay unchanged.
MASK_FRACTION, RANDOM_FRACTION = 0.8, 0.1
#: Cell representations the module returns as ``cell_embedding`` (see :meth:`inference`).
Representation = Literal["cls", "cell_cls", "cell_cls_normalized", "prototype_scores"]
REPRESENTATIONS: tuple[str, ...] = ("cls", "cell_cls", "cell_cls_normalized", "prototype_scores")
#: Options each model task accepts (see :meth:`ScCelloModule.check_options`).
_TASK_OPTIONS = {"latent": {"hidden_layer", "representation"}, "genes": {"hidden_layer"}}

#: Largest sizes a config may ask for; anything above is a corrupt or hostile file (the
#: release: 25,427 tokens, 256 hidden, 6 layers, 2,048 positions).
_SIZE_LIMITS = {
    "vocab_size": 10_000_000,
    "hidden_size": 65_536,
    "num_hidden_layers": 1_024,
    "num_attention_heads": 1_024,
    "intermediate_size": 262_144,
    "max_position_embeddings": 1_048_576,
}
#: More parameters than this cannot be an scCello release (the real one has ~10M).
_MAX_PARAMETERS = 20_000_000_000


@dataclass
class ScCelloConfig(BertConfigBase):
    """scCello architecture, parsed from the release's ``config.json`` (HF ``BertConfig`` names).

    The encoder fields are those of :class:`~scfm.nn._bert.BertConfigBase` (with the
    release's vocabulary size as the default).

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
        Pretraining label set of the release (``"frac100"``: 398 CL types); names the label
        map file of the release's ``data/`` folder.
    position_embedding_type
        Only ``"absolute"`` exists in scCello.
    """

    vocab_size: int = 25427
    tau: float = 0.01
    data_branch: str = "frac100"
    position_embedding_type: str = "absolute"

    @classmethod
    def from_dict(cls, config: dict[str, Any], *, what: str = "config") -> ScCelloConfig:
        """Build and :meth:`validate` from a ``config.json`` dict; HF bookkeeping keys are ignored.

        Raises
        ------
        CheckpointFormatError
            If ``config`` is not a dict or a value has the wrong type or size.
        """
        if not isinstance(config, dict):
            raise CheckpointFormatError(
                f"The scCello {what} must be a JSON object, got {type(config).__name__}."
            )
        names = {f.name for f in fields(cls)}
        out = cls(**{k: v for k, v in config.items() if k in names})
        out.validate(what=what)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field."""
        return asdict(self)

    def validate(self, *, what: str = "config") -> None:
        """Check types and sizes, so that a bad file fails before anything is allocated.

        Raises
        ------
        CheckpointFormatError
            Naming the offending key.
        """

        def bad(key: str, why: str) -> CheckpointFormatError:
            return CheckpointFormatError(
                f"scCello {what}: {key}={getattr(self, key)!r} {why}. Use the release's "
                "config.json unchanged."
            )

        for key, limit in _SIZE_LIMITS.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(key, "is not an integer")
            if value < 1:
                raise bad(key, "is not positive")
            if value > limit:
                raise bad(key, f"is absurdly large (limit {limit:,})")
        if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int):
            raise bad("pad_token_id", "is not an integer")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise bad("pad_token_id", f"is outside the vocabulary [0, {self.vocab_size})")
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, key)
            if not is_real(value) or not 0 <= value < 1:
                raise bad(key, "is not a probability in [0, 1)")
        for key in ("layer_norm_eps", "tau"):
            value = getattr(self, key)
            if not is_real(value) or not 0 < value < math.inf:
                raise bad(key, "is not a positive number")
        if not is_real(self.initializer_range) or not 0 <= self.initializer_range < math.inf:
            raise bad("initializer_range", "is not a non-negative number")
        if not isinstance(self.hidden_act, str):
            raise bad("hidden_act", "is not a string")
        try:
            get_activation(self.hidden_act)
        except InvalidInputError:
            raise bad("hidden_act", "is not a supported activation") from None
        if self.position_embedding_type != "absolute":
            raise bad("position_embedding_type", "is not 'absolute' (the only scCello kind)")
        if not isinstance(self.data_branch, str):
            raise bad("data_branch", "is not a string")
        if self.hidden_size % self.num_attention_heads:
            raise bad(
                "hidden_size", f"is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        h, n_layers = self.hidden_size, self.num_hidden_layers
        n_params = (self.vocab_size + self.max_position_embeddings) * h + n_layers * (
            4 * h * h + 2 * h * self.intermediate_size
        )
        if n_params > _MAX_PARAMETERS:
            raise CheckpointFormatError(
                f"scCello {what} describes a model of ~{n_params:.2e} parameters (hidden_size="
                f"{h}, num_hidden_layers={n_layers}, vocab_size={self.vocab_size}); that is not "
                "an scCello release. Use the release's config.json unchanged."
            )

    def check_weights(self, state_dict: dict[str, torch.Tensor], *, what: str = "config") -> None:
        """Compare the config with the shapes of a (renamed) state dict, before building.

        Raises
        ------
        CheckpointFormatError
            Naming the config key that disagrees with the weights.
        """
        h = self.hidden_size

        def expect(key: str, shape: tuple[int, ...], config_keys: str) -> None:
            tensor = state_dict.get(key)
            if tensor is not None and tuple(tensor.shape) != shape:
                raise CheckpointFormatError(
                    f"scCello {what}: {config_keys} give {key} the shape {shape}, but the "
                    f"weights hold {tuple(tensor.shape)}. The config does not belong to these "
                    "weights."
                )

        expect(
            "bert.embeddings.word_embeddings.weight",
            (self.vocab_size, h),
            "vocab_size, hidden_size",
        )
        expect(
            "bert.embeddings.position_embeddings.weight",
            (self.max_position_embeddings, h),
            "max_position_embeddings, hidden_size",
        )
        prefix = "bert.encoder.layer."
        layers = {int(k[len(prefix) :].split(".")[0]) for k in state_dict if k.startswith(prefix)}
        if layers and layers != set(range(self.num_hidden_layers)):
            raise CheckpointFormatError(
                f"scCello {what}: num_hidden_layers={self.num_hidden_layers}, but the weights "
                f"hold {len(layers)} encoder layers. The config does not belong to these weights."
            )
        expect(
            f"{prefix}0.intermediate.dense.weight",
            (self.intermediate_size, h),
            "intermediate_size, hidden_size",
        )

    def bert_options(self) -> dict[str, Any]:
        """Post-LN BERT without token types (scCello feeds no segment ids)."""
        return {"type_vocab_size": 0}


def rank_value_tokens(
    counts: torch.Tensor,
    gene_medians: torch.Tensor,
    *,
    max_genes: int,
    cls_token_id: int,
    pad_token_id: int = 0,
    target_sum: float = TARGET_SUM,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise a minibatch of counts in token space as scCello does (vectorised).

    Each cell becomes ``<cls>`` followed by its expressed genes ordered by decreasing
    ``count / total * 10,000 / median`` (``total`` = the cell's counts over the vocabulary
    genes, as the reference), truncated to ``max_genes`` genes. Every step is per cell, so a
    cell's tokens never depend on its batch-mates.

    Parameters
    ----------
    counts
        ``[B, V]`` counts; column ``j`` is the gene of token id ``j``.
    gene_medians
        ``[V]`` non-zero median of each token's gene; ``NaN`` (or any non-positive value)
        marks tokens that are not genes (special tokens), whose columns are ignored.
    max_genes
        Genes kept per cell (``max_position_embeddings - 1``).
    cls_token_id, pad_token_id
        Special token ids.
    target_sum
        Library size of the normalisation (10,000).

    Returns
    -------
    input_ids
        ``[B, L]`` int64, ``L`` = the longest cell, right-padded with ``pad_token_id``.
    lengths
        ``[B]`` int64 tokens per cell, ``<cls>`` included.

    Notes
    -----
    Ties are broken by token id (stable sort); the reference's numpy quicksort may order
    exactly tied genes differently.
    """
    is_gene = torch.isfinite(gene_medians) & (gene_medians > 0)
    # the total over the whole row (a per-cell quantity, whatever the batch)
    total = torch.where(is_gene[None, :], counts.to(torch.float64), 0.0).sum(1)
    total = torch.where(total > 0, total, torch.ones_like(total))
    # only genes expressed in some cell of the minibatch can become tokens; their ascending
    # order keeps ties ordered by token id, so a cell's tokens do not depend on its batch-mates
    cols = torch.nonzero(is_gene & (counts > 0).any(0)).squeeze(1)
    x = counts[:, cols].to(torch.float64)
    # same operation order as the reference: X / n_counts * target_sum / median
    norm = x / total[:, None] * target_sum / gene_medians[cols].to(torch.float64)[None, :]
    expressed = x > 0
    norm = torch.where(expressed, norm, -torch.inf)
    n_genes = expressed.sum(1).clamp(max=max_genes)
    width = int(n_genes.max()) if len(n_genes) else 0
    genes = cols[torch.sort(norm, dim=1, descending=True, stable=True).indices[:, :width]]
    real = torch.arange(width, device=counts.device)[None, :] < n_genes[:, None]
    genes = torch.where(real, genes, pad_token_id)
    cls = torch.full((len(x), 1), cls_token_id, dtype=torch.long, device=counts.device)
    return torch.cat([cls, genes], dim=1), (n_genes + 1).to(torch.long)


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


class ScCelloClassificationHead(nn.Module):
    """Linear probe of the reference (``...ForSequenceClassification``): dropout + linear.

    Applied to the raw last-layer ``<cls>`` state (the reference's pooler is ignored).
    """

    def __init__(self, hidden_size: int, n_labels: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden_size, n_labels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.dense(self.dropout(h))


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
    """scCello as an scvi-tools module, in token-vocabulary space.

    Parameters
    ----------
    config
        The architecture.
    gene_medians
        ``[vocab_size]`` non-zero median of the gene of each token id; ``NaN`` for tokens
        that are not genes (``<pad>``, ``<mask>``, ``<cls>``).
    n_labels
        Number of pretraining cell types (rows of ``ctgraph_sim``; release: 398).
    cls_token_id, mask_token_id
        Ids of ``<cls>`` and ``<mask>``.
    n_prototypes
        Rows of ``learned_centroid`` (the release hard-codes 600; at least ``n_labels``).
    mlm_probability
        Fraction of gene tokens selected for masked gene prediction (reference: 0.15).
    """

    #: Checkpoint entries that hold nothing the model uses: the position-id buffer (an
    #: arange), the never-called ``binary_ce_loss_transform_*`` layers and the sequence
    #: classification class's pooler (its forward ignores it).
    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [
        r"^bert\.embeddings\.position_ids$",
        r"^binary_ce_loss_transform_(cell|prototype|cellprot)\.",
        r"^bert\.pooler\.",
    ]
    _keys_to_ignore_on_load_missing: ClassVar[list[str]] = []
    #: Linear layers LoRA adapts when fine-tuning (the attention projections).
    _lora_target_modules: ClassVar[list[str]] = [
        "*.attention.self.query",
        "*.attention.self.key",
        "*.attention.self.value",
    ]

    def __init__(
        self,
        config: ScCelloConfig,
        gene_medians: np.ndarray,
        *,
        n_labels: int,
        cls_token_id: int,
        mask_token_id: int = 1,
        n_prototypes: int = N_PROTOTYPES,
        mlm_probability: float = 0.15,
    ) -> None:
        super().__init__()
        config.validate()
        self.config = config
        bert_config = config.bert_config()
        medians = torch.as_tensor(np.asarray(gene_medians, dtype=np.float64))
        if medians.shape != (config.vocab_size,):
            raise InvalidInputError(
                f"gene_medians has shape {tuple(medians.shape)}; one entry per token "
                f"({config.vocab_size}) is needed."
            )
        self.cls_token_id = int(cls_token_id)
        self.mask_token_id = int(mask_token_id)
        self.pad_token_id = int(config.pad_token_id)
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
        self.classifier: ScCelloClassificationHead | None = None
        self.n_labels = int(n_labels)
        # Ontology buffers: part of the checkpoint (int32 as in the release).
        self.register_buffer("ctgraph_sim", torch.ones(n_labels, n_labels, dtype=torch.int32))
        self.register_buffer(
            "cell_type_ancestor_mask", torch.zeros(n_labels, n_labels, dtype=torch.int32)
        )
        # The vocabulary's medians come from the release (model init arguments), not saved.
        self.register_buffer("gene_medians", medians, persistent=False)
        is_gene = torch.isfinite(medians) & (medians > 0)
        self.register_buffer("special_tokens", ~is_gene, persistent=False)

    # ------------------------------------------------------------------ tokens
    @property
    def n_layers(self) -> int:
        """Number of encoder layers."""
        return self.bert.num_layers

    @property
    def _sqrt_tau(self) -> torch.Tensor:
        # The reference divides unit vectors by sqrt(tau) computed as a float32 tensor.
        return torch.sqrt(torch.tensor(self.config.tau, device=self.ctgraph_sim.device))

    def check_options(self, task: str, **options: Any) -> dict[str, Any]:
        """Validate a call's :meth:`inference` options before any forward; return them.

        ``task`` is the model's (``"latent"`` takes ``hidden_layer`` and ``representation``,
        ``"genes"`` takes ``hidden_layer``, the others nothing).

        Raises
        ------
        InvalidInputError
            For an option the task does not take, a non-integer or out-of-range
            ``hidden_layer`` or an unknown ``representation``.
        """
        allowed = _TASK_OPTIONS.get(task, set())
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise InvalidInputError(
                f"scCello has no option {unknown} for this call; allowed: "
                f"{sorted(allowed) or 'none'}."
            )
        hidden_layer = options.get("hidden_layer")
        representation = options.get("representation")
        # cell embeddings or the probe only: the <cls> read skips the other tokens' last layer
        out: dict[str, Any] = {"token_states": False} if task in ("latent", "predict") else {}
        if hidden_layer is not None:
            n = self.n_layers + 1
            if not is_int(hidden_layer):
                raise InvalidInputError(f"hidden_layer must be an integer, got {hidden_layer!r}.")
            if not -n <= hidden_layer < n:
                raise InvalidInputError(
                    f"hidden_layer={hidden_layer} is out of range: scCello has {n - 1} layers "
                    f"(0 = embedding output, {n - 1} or -1 = last layer)."
                )
            out["hidden_layer"] = int(hidden_layer)
        if representation is not None:
            if representation not in REPRESENTATIONS:
                raise InvalidInputError(
                    f"representation={representation!r} is not supported; use one of "
                    f"{', '.join(map(repr, REPRESENTATIONS))}."
                )
            out["representation"] = representation
        return out

    def tokenize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``(input_ids [B, L], lengths [B])`` of counts ``x [B, vocab_size]``."""
        if x.ndim != 2 or x.shape[1] != self.config.vocab_size:
            raise InvalidInputError(
                f"scCello expects counts in token space [cells, {self.config.vocab_size}], "
                f"got {tuple(x.shape)}."
            )
        return rank_value_tokens(
            x,
            self.gene_medians,
            max_genes=self.config.max_position_embeddings - 1,
            cls_token_id=self.cls_token_id,
            pad_token_id=self.pad_token_id,
        )

    def mask_tokens(
        self,
        input_ids: torch.Tensor,
        lengths: torch.Tensor,
        selected: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
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
        generator
            Source of the random draws (default: torch's global generator, which Lightning
            seeds in training).

        Returns
        -------
        The masked ids and the labels (original id where selected, ``-100`` elsewhere).
        """
        real = make_key_padding_mask(lengths, input_ids.shape[1])
        candidates = real & ~self.special_tokens[input_ids]
        mask_ids = torch.full_like(input_ids, self.mask_token_id)
        if selected is not None:
            width = min(selected.shape[1], input_ids.shape[1])
            chosen = torch.zeros_like(candidates)
            chosen[:, :width] = selected[:, :width].to(input_ids.device).bool()
            selected = chosen & candidates
            labels = torch.where(selected, input_ids, IGNORE_INDEX)
            return torch.where(selected, mask_ids, input_ids), labels
        device = input_ids.device

        def uniform() -> torch.Tensor:
            return torch.rand(input_ids.shape, generator=generator, device=device)

        selected = candidates & (uniform() < self.mlm_probability)
        labels = torch.where(selected, input_ids, IGNORE_INDEX)
        draw = uniform()
        to_mask = selected & (draw < MASK_FRACTION)
        to_random = selected & (draw >= MASK_FRACTION) & (draw < MASK_FRACTION + RANDOM_FRACTION)
        random_ids = torch.randint(
            self.config.vocab_size, input_ids.shape, generator=generator, device=device
        )
        masked = torch.where(to_mask, mask_ids, input_ids)
        return torch.where(to_random, random_ids, masked), labels

    # ------------------------------------------------------------------ encoder + heads
    def encode(
        self,
        input_ids: torch.Tensor,
        lengths: torch.Tensor,
        output_hidden_states: bool = False,
        num_layers: int | None = None,
        first_token_only: bool = False,
    ):
        """Run the encoder; returns :class:`~scfm.nn._bert.BertOutputs`.

        ``num_layers`` and ``first_token_only`` as in :class:`~scfm.nn._bert.BertModel`.
        """
        mask = make_key_padding_mask(lengths.clamp(min=1), input_ids.shape[1])
        return self.bert(
            input_ids,
            mask,
            output_hidden_states=output_hidden_states,
            num_layers=num_layers,
            first_token_only=first_token_only,
        )

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

    def add_classifier(self, n_labels: int) -> None:
        """Attach the reference's linear probe (dropout + linear on the last ``<cls>``)."""
        if n_labels < 1:
            raise InvalidInputError(f"n_labels must be >= 1, got {n_labels}.")
        bert_config = self.config.bert_config()
        head = ScCelloClassificationHead(
            bert_config.hidden_size, int(n_labels), bert_config.hidden_dropout_prob
        )
        head.apply(self.bert._init_weights)
        self.classifier = head.to(self.ctgraph_sim.device)

    # ------------------------------------------------------------------ losses
    def pretraining_losses(self, out: ModuleOutput) -> dict[str, torch.Tensor]:
        """The four scCello losses of one minibatch, from its (masked) :meth:`inference`.

        Parameters
        ----------
        out
            Output of ``inference(x, cell_type, mask=True)``: ``extra`` holds the masked
            ``input_ids``, ``lengths``, ``mlm_labels`` (original ids at masked positions,
            ``-100`` elsewhere), ``last_hidden_state`` and ``cell_type`` (``[B]``
            pretraining cell-type index of each cell).

        Returns
        -------
        Dict with ``mlm_loss``, ``relational_alignment_loss``, ``cell_type_coherence_loss``,
        ``cell_type_coherence_reg_loss``, ``total_loss`` (their unweighted sum, as the
        reference), ``mlm_scores`` (rows of the masked positions, row-major) and
        ``prototype_scores``.
        """
        extra = out.extra
        cell_type = extra.get("cell_type")
        if cell_type is None:
            raise InvalidInputError(
                "scCello pretraining needs cell types: call setup_anndata with "
                "labels_key='cell_type_ontology_term_id' (CL ids)."
            )
        if bool((cell_type < 0).any()) or bool((cell_type >= self.n_labels).any()):
            raise InvalidInputError(
                "Some cells have no pretraining cell type; every cell needs one of the "
                f"model's {self.n_labels} types for the scCello losses."
            )
        input_ids, lengths = extra["input_ids"], extra["lengths"]
        mlm_labels, hidden = extra["mlm_labels"], extra["last_hidden_state"]
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
    def _get_inference_input(self, tensors: dict[str, torch.Tensor], **kwargs: Any) -> dict:
        # "cell_type" is the per-cell plan of pretraining labels (the model's _cell_plan)
        return {"x": tensors[REGISTRY_KEYS.X_KEY], "cell_type": tensors.get("cell_type")}

    @auto_move_data
    def inference(
        self,
        x: torch.Tensor,
        cell_type: torch.Tensor | None = None,
        *,
        hidden_layer: int = -1,
        representation: Representation = "cls",
        mask: bool = False,
        mlm_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        token_states: bool = True,
    ) -> ModuleOutput:
        """The one forward pass: tokenise, (mask), encode, read the cell and token states.

        Parameters
        ----------
        x
            Counts ``[B, vocab_size]`` in token space.
        cell_type
            ``[B]`` pretraining cell-type index (training only; passed through in ``extra``).
        hidden_layer
            Hidden state read for ``cell_embedding`` and ``token_states``: ``0`` the embedding
            output, ``i`` the output of layer ``i``, ``-1`` the last layer (reference).
        representation
            ``cell_embedding``: ``"cls"`` the ``<cls>`` state (zero-shot embedding),
            ``"cell_cls"`` the ``cell_cls`` head on it (novel cell types),
            ``"cell_cls_normalized"`` that L2-normalised (drug response),
            ``"prototype_scores"`` cosine / tau against every pretraining prototype.
        mask
            Mask gene tokens for masked gene prediction (pretraining; the training plan
            passes ``True``).
        mlm_mask
            ``[B, L]`` fixed positions to mask (implies ``mask``) instead of random ones.
        generator
            Random source of the masking.
        token_states
            ``False`` when only ``cell_embedding`` (and ``logits``) are read: the layer read
            then runs for the ``<cls>`` query alone and ``token_states`` / ``token_genes``
            are ``None``.

        Returns
        -------
        :class:`~scfm.module._outputs.ModuleOutput` with ``cell_embedding``, ``token_states``
        and ``token_genes`` (token id = position in the vocabulary; ``-1`` for ``<cls>``,
        ``<mask>`` and padding), ``logits`` when a classifier is attached, and in ``extra``
        the (masked) ``input_ids``, ``lengths``, ``mlm_labels``, ``last_hidden_state`` (when
        the last layer was computed: masking, a classifier or ``hidden_layer=-1``) and
        ``cell_type``.
        """
        ids, lengths = self.tokenize(x)
        if mask or mlm_mask is not None:
            ids, mlm_labels = self.mask_tokens(ids, lengths, mlm_mask, generator)
        else:
            mlm_labels = torch.full_like(ids, IGNORE_INDEX)
        wanted = hidden_layer % (self.n_layers + 1)
        masked = mask or mlm_mask is not None
        # the losses of masked genes read every last-layer token, the classifier its <cls>
        n_run = self.n_layers if masked or self.classifier is not None else wanted
        first_only = not token_states and not masked and n_run == wanted
        out = self.encode(
            ids,
            lengths,
            output_hidden_states=wanted != n_run,
            num_layers=n_run,
            first_token_only=first_only,
        )
        states = out.last_hidden_state if out.hidden_states is None else out.hidden_states[wanted]
        h_cls = states[:, 0]
        if representation == "cls":
            cell = h_cls
        elif representation == "prototype_scores":
            cell = self.prototype_scores(self.cell_representation(h_cls))
        elif representation in ("cell_cls", "cell_cls_normalized"):
            cell = self.cell_cls(h_cls)
            if representation == "cell_cls_normalized":
                cell = F.normalize(cell, p=2, dim=-1)
        else:
            raise InvalidInputError(
                f"representation={representation!r} is not supported; use one of "
                f"{', '.join(map(repr, REPRESENTATIONS))}."
            )
        real = make_key_padding_mask(lengths, ids.shape[1])
        token_genes = torch.where(real & ~self.special_tokens[ids], ids, -1)
        logits = None
        if self.classifier is not None:
            logits = self.classifier(out.last_hidden_state[:, 0])
        extra = {"input_ids": ids, "lengths": lengths, "mlm_labels": mlm_labels}
        if n_run == self.n_layers:
            extra["last_hidden_state"] = out.last_hidden_state
        if cell_type is not None:
            extra["cell_type"] = cell_type.reshape(-1).long()
        return ModuleOutput(
            cell_embedding=cell,
            token_states=None if first_only else states,
            token_genes=None if first_only else token_genes,
            logits=logits,
            extra=extra,
        )

    def _get_generative_input(
        self, tensors: dict, inference_outputs: ModuleOutput, **kwargs: Any
    ) -> dict:
        return {}

    def generative(self) -> dict:
        """Nothing to generate: the losses need the encoder passes (see :meth:`loss`)."""
        return {}

    def loss(
        self,
        tensors: dict,
        inference_outputs: ModuleOutput,
        generative_outputs: dict,
        **kwargs: Any,
    ) -> LossOutput:
        """Sum of the four scCello losses (all weights 1, as in the reference)."""
        out = self.pretraining_losses(inference_outputs)
        n = len(inference_outputs.extra["lengths"])
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
