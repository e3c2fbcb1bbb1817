"""The CellFM network :cite:p:`Zeng2025` as an scvi-tools module.

Attribute names mirror the MindSpore parameter names of the released checkpoints
(``gene_emb``, ``value_enc.value_enc.w1``, ``encoder.0.attn.q_proj``, ``ST_enc.table``, ...),
so loading needs no rename table beyond MindSpore's LayerNorm ``gamma``/``beta``.

The input is a count matrix in the model's gene space (column ``j`` = vocabulary gene ``j``,
token id ``j + 1``). Two encoder paths exist in the reference and both are exposed by
:meth:`CellFMModule.inference`:

* the zero-shot ``Backbone`` (tutorial default): ``[CLS, genes]``;
* the pretraining / fine-tuning ``FinetuneModel`` with two read-depth tokens:
  ``[CLS, S, T, genes]``; in its first ``N // 2`` layers masked genes are not keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from scfm.data._cellfm_tokenize import (
    MAX_TOKENS,
    CellFMTokens,
    cellfm_mask_tokens,
    cellfm_reference_mask,
    cellfm_tokenize,
)
from scfm.errors import CheckpointFormatError
from scfm.module._checks import is_int, is_real
from scfm.module._outputs import ModuleOutput
from scfm.nn._retention import CrossRetentionLayer, RetentionLayer

__all__ = ["CellFMConfig", "CellFMModule"]

#: MindSpore ``nn.LeakyReLU`` default slope (PyTorch's default is 0.01).
MINDSPORE_LEAKY_SLOPE = 0.2
#: Read-depth features are ``log1p(total / 1000)``.
ST_SCALE = 1000.0
#: Bins of the soft-binning value encoder (``FFN(b=256)``).
VALUE_BINS = 256
#: Query layers of the reference's annotation head (``Net.query_layer``).
ANNOTATION_QUERY_LAYERS = 2
#: Names of the per-cell plan arrays the model passes in each minibatch.
PLAN_DEPTH = "cellfm_depth"
PLAN_SEED = "cellfm_cell_seed"
#: Sizes beyond these are not a CellFM (released: d=1536, 40 layers, 27,856 rows, 256 bins);
#: they fail fast instead of allocating for minutes.
_LIMITS = {
    "enc_dims": 1 << 15,
    "enc_nlayers": 1024,
    "enc_num_heads": 1 << 12,
    "gene_rows": 1 << 22,
    "n_genes": 1 << 22,
    "value_bins": 1 << 14,
    "lora": 1 << 12,
    "max_tokens": 1 << 20,
}
#: At most this many parameters (fp32: 80 GB); the 800M release has about 0.8e9.
_MAX_PARAMETERS = 2e10


@dataclass
class CellFMConfig:
    """Architecture and objective of a CellFM model (the reference's ``Config`` fields).

    CellFM releases store no configuration: :func:`scfm.io._cellfm.read_cellfm_release`
    derives it from the tensor names and shapes, plus the head count given by the caller.

    Attributes
    ----------
    enc_dims
        Model width ``d`` (1536 in the releases).
    enc_nlayers
        Number of retention layers ``N`` (80M: 2; 800M: 40).
    enc_num_heads
        Retention heads ``H`` (48 in the releases; not stored in checkpoints).
    gene_rows
        Rows of the gene embedding table: ``n_genes + 1`` rounded up to a multiple of 8.
    n_genes
        Genes of the vocabulary (token ids ``1 .. n_genes``).
    value_bins
        Bins of the soft-binning value encoder (256).
    st_tokens
        Whether the model has the two read-depth tokens ``ST_emb`` / ``ST_enc`` (80M: yes).
    add_zero
        Whether the value and cell-wise decoders have zero-probability heads.
    lora
        Rank of the reference's own LoRA adapters on the retention / GLU projections
        (``lora_q`` ...; 0: none). scfm's fine-tuning uses peft instead.
    enc_dropout
        Dropout on the residual branches during training (layer ``i``: ``enc_dropout i / N``).
    mask_ratio
        Fraction of each cell's genes scored by the masked value recovery objective in
        training (pretraining ``train.py``: 0.2; the 80M fine-tuning examples: 0.5).
    max_tokens
        At most this many expressed genes per cell (reference: 2048); deeper cells keep a
        random sample weighted by ``log1p(value)``. ``None``: no limit.
    read_depth_augment
        In training with read-depth tokens, thin half of the cells binomially
        (``q ~ Beta(2, 2)``) and recover the original values (the reference's "bayes").
    """

    enc_dims: int
    enc_nlayers: int
    enc_num_heads: int
    gene_rows: int
    n_genes: int
    value_bins: int = VALUE_BINS
    st_tokens: bool = True
    add_zero: bool = False
    lora: int = 0
    enc_dropout: float = 0.0
    mask_ratio: float = 0.5
    max_tokens: int | None = MAX_TOKENS
    read_depth_augment: bool = False

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CellFMConfig:
        """Build and :meth:`validate` a config; unknown keys raise ``CheckpointFormatError``."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise CheckpointFormatError(
                f"Unknown CellFM config keys {unknown}; known: {', '.join(sorted(names))}."
            )
        missing = sorted(f.name for f in fields(cls) if f.name not in values and _required(f))
        if missing:
            raise CheckpointFormatError(f"The CellFM config lacks {', '.join(missing)}.")
        config = cls(**values)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-serialisable)."""
        return asdict(self)

    def validate(self) -> None:
        """Check types and sizes before anything is allocated.

        Raises
        ------
        CheckpointFormatError
            Naming the first offending key: wrong type, non-positive or absurd size,
            heads not dividing the width, a gene table too small for the vocabulary.
        """
        for name, limit in _LIMITS.items():
            value = getattr(self, name)
            if name == "max_tokens" and value is None:
                continue
            if not is_int(value):
                raise CheckpointFormatError(
                    f"CellFM config {name}={value!r} must be an integer, not "
                    f"{type(value).__name__}."
                )
            low = 0 if name == "lora" else 1
            if not low <= value <= limit:
                raise CheckpointFormatError(
                    f"CellFM config {name}={value} is outside [{low}, {limit}]."
                )
        for name in ("st_tokens", "add_zero", "read_depth_augment"):
            if not isinstance(getattr(self, name), bool | np.bool_):
                raise CheckpointFormatError(
                    f"CellFM config {name}={getattr(self, name)!r} must be True or False."
                )
        for name in ("enc_dropout", "mask_ratio"):
            value = getattr(self, name)
            if not is_real(value) or not 0.0 <= float(value) < 1.0:
                raise CheckpointFormatError(f"CellFM config {name}={value!r} must be in [0, 1).")
        if self.enc_dims % self.enc_num_heads:
            raise CheckpointFormatError(
                f"CellFM config enc_num_heads={self.enc_num_heads} does not divide "
                f"enc_dims={self.enc_dims}."
            )
        if self.gene_rows < self.n_genes + 1:
            raise CheckpointFormatError(
                f"CellFM config gene_rows={self.gene_rows} cannot hold n_genes={self.n_genes} "
                "genes plus the padding row: the gene list belongs to another release (the "
                "80M model needs expand_gene_info.csv, the 800M model gene_info.csv)."
            )
        if self.n_parameters() > _MAX_PARAMETERS:
            raise CheckpointFormatError(
                f"CellFM config enc_nlayers={self.enc_nlayers}, enc_dims={self.enc_dims} "
                f"describe {self.n_parameters():.2g} parameters, far beyond any CellFM."
            )

    def n_parameters(self) -> int:
        """Approximate parameter count (gene table + encoder), for the size check."""
        d = self.enc_dims
        return self.gene_rows * d + self.enc_nlayers * (8 * d * d + 4 * d) + 2 * d * d

    def check_shapes(self, shapes: Mapping[str, Sequence[int]]) -> None:
        """Compare the config with the weight shapes it will load (before building).

        Raises
        ------
        CheckpointFormatError
            Naming the tensor and the config key that disagree.
        """
        d = self.enc_dims
        # The tensors each size is read from; the strict load reports every other mismatch.
        expected = {
            "gene_emb": (self.gene_rows, d),
            "value_enc.value_enc.w1.weight": (self.value_bins, 1),
        }
        for i in range(self.enc_nlayers):
            expected[f"encoder.{i}.attn.q_proj.weight"] = (d, d)
        for key, shape in expected.items():
            got = shapes.get(key)
            if got is not None and tuple(got) != shape:
                raise CheckpointFormatError(
                    f"The weight {key} has shape {tuple(got)} but the CellFM config "
                    f"(enc_dims={d}, gene_rows={self.gene_rows}, value_bins={self.value_bins}) "
                    f"needs {shape}."
                )
        layers = {k.split(".")[1] for k in shapes if k.startswith("encoder.")}
        if len(layers) != self.enc_nlayers:
            raise CheckpointFormatError(
                f"The checkpoint has {len(layers)} encoder layers but the CellFM config "
                f"enc_nlayers={self.enc_nlayers}."
            )
        if ("ST_emb" in shapes) != self.st_tokens:
            raise CheckpointFormatError(
                f"The CellFM config st_tokens={self.st_tokens} disagrees with the checkpoint "
                f"({'has' if 'ST_emb' in shapes else 'has no'} ST_emb)."
            )


def _required(f) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


class ValueProjection(nn.Module):
    """Soft-binning scalar encoder (the reference's ``FFN``): scalar -> ``d`` vector.

    ``z = LeakyReLU_0.2(w1 v)``; ``z = w3 z + a z``; ``out = table(softmax(z))``.
    """

    def __init__(self, emb_dims: int, bins: int = VALUE_BINS) -> None:
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

    def __init__(self, emb_dims: int, bins: int = VALUE_BINS) -> None:
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
        """``gene_emb`` is ``[B, L, d]`` (per-token rows) or ``[V, d]`` (every gene)."""
        query = torch.sigmoid(self.map(gene_emb))
        if query.dim() == 2:
            return cls @ query.T
        return (query @ cls[:, :, None]).squeeze(-1)


class AnnotationHead(nn.Module):
    """The reference's cell-type head (``tutorials/CellAnnotation`` ``Net``).

    One learned query per class (``cluster_emb``) joins the CLS state; two
    :class:`~scfm.nn._retention.CrossRetentionLayer` let them read the gene tokens. The class
    scores are ``classifier(query_c)`` (the reference's prediction, ``labelpred1``); the
    auxiliary ``CLS · cluster_embᵀ`` (``labelpred2``, its second loss term) is returned too.
    Attribute names are the reference's.
    """

    def __init__(self, emb_dims: int, num_heads: int, n_labels: int, dropout: float) -> None:
        super().__init__()
        self.cluster_emb = nn.Parameter(torch.empty(n_labels, emb_dims))
        nn.init.xavier_normal_(self.cluster_emb, gain=0.5)
        self.query_layer = nn.ModuleList(
            [
                CrossRetentionLayer(emb_dims, num_heads, dropout)
                for _ in range(ANNOTATION_QUERY_LAYERS)
            ]
        )
        self.classifier = nn.Linear(emb_dims, 1, bias=False)

    def forward(
        self, cls: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        queries = self.cluster_emb.to(cls.dtype).expand(cls.shape[0], -1, -1)
        x = torch.cat([cls[:, None], queries], dim=1)
        for layer in self.query_layer:
            x = layer(x, tokens, key_mask=token_mask)
        logits = self.classifier(x[:, 1:]).squeeze(-1)
        return logits, x[:, 0] @ self.cluster_emb.to(x.dtype).T


class CellFMModule(BaseModuleClass):
    """CellFM: gene + value tokens, a linear-retention encoder and value-recovery heads.

    Parameters
    ----------
    config
        The validated :class:`CellFMConfig`.
    token_order
        Vocabulary positions in token order (the reference orders a cell's genes
        alphabetically); ``None``: vocabulary order.
    """

    #: Parts a release may lack (loaders of the 800M model use only the encoder): the heads
    #: of the pretraining objective keep their initialisation.
    _keys_to_ignore_on_load_missing: ClassVar[list[str]] = [
        r"^zero_emb$",
        r"^value_dec\.",
        r"^cellwise_dec\.",
    ]
    #: Training state MindSpore writes beside the parameters (Adam moments, counters).
    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [
        r"^(moment1|moment2|adam_m|adam_v|accum)\.",
        r"^(global_step|learning_rate|beta1_power|beta2_power|current_iterator_step"
        r"|last_overflow_iterator_step|loss_scale|scale_sense)$",
    ]
    #: Linear layers peft's LoRA adapts (fnmatch patterns): the reference's LoRA targets,
    #: every retention and GLU projection of the encoder (not the annotation head's).
    _lora_target_modules: ClassVar[list[str]] = [
        "encoder.*.attn.[qkvuo]_proj",
        "encoder.*.ffn.[uvo]_proj",
    ]

    def __init__(self, config: CellFMConfig, token_order: Sequence[int] | None = None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        d, n_layers = config.enc_dims, config.enc_nlayers
        order = np.arange(config.n_genes) if token_order is None else np.asarray(token_order)
        if sorted(order.tolist()) != list(range(config.n_genes)):
            raise ValueError("token_order must be a permutation of the vocabulary positions")
        # Built from the release's gene list at construction, so not in the state dict.
        self.register_buffer("token_order", torch.as_tensor(order, dtype=torch.long), False)
        self.gene_emb = nn.Parameter(torch.empty(config.gene_rows, d))
        self.cls_token = nn.Parameter(torch.empty(1, 1, d))
        self.zero_emb = nn.Parameter(torch.zeros(1, 1, d))
        if config.st_tokens:
            self.ST_emb = nn.Parameter(torch.empty(1, 2, d))
            self.ST_enc = ValueProjection(d, config.value_bins)
        self.value_enc = ValueEncoder(d, config.value_bins)
        self.encoder = nn.ModuleList(
            [
                RetentionLayer(
                    d,
                    config.enc_num_heads,
                    n_layers,
                    dropout=config.enc_dropout * i / n_layers,
                    lora=config.lora,
                )
                for i in range(n_layers)
            ]
        )
        self.value_dec = ValueDecoder(d, zero=config.add_zero)
        self.cellwise_dec = CellwiseDecoder(d, zero=config.add_zero)
        self.classifier: AnnotationHead | None = None
        self._init_weights()

    def _init_weights(self) -> None:
        """Reference initialisation (XavierNormal gains; DeepNorm beta on v/u/o)."""
        nn.init.xavier_normal_(self.gene_emb, gain=0.5)
        with torch.no_grad():
            self.gene_emb[0].zero_()  # padding row
        nn.init.xavier_normal_(self.cls_token, gain=0.5)
        if self.config.st_tokens:
            nn.init.xavier_normal_(self.ST_emb, gain=0.5)
        beta = (8 * self.config.enc_nlayers) ** -0.25
        for layer in self.encoder:
            for name in ("q", "k"):
                nn.init.xavier_normal_(getattr(layer.attn, f"{name}_proj").weight)
            for name in ("v", "u", "o"):
                nn.init.xavier_normal_(getattr(layer.attn, f"{name}_proj").weight, gain=beta)
            for name in ("u", "v", "o"):
                nn.init.xavier_normal_(getattr(layer.ffn, f"{name}_proj").weight, gain=beta)

    # ------------------------------------------------------------------ heads
    def add_classifier(self, n_labels: int) -> None:
        """Add the reference's annotation head for ``n_labels`` classes.

        See :class:`AnnotationHead`; :meth:`inference` then fills ``logits``.
        """
        c = self.config
        head = AnnotationHead(c.enc_dims, c.enc_num_heads, n_labels, c.enc_dropout)
        self.classifier = head.to(self.gene_emb.device)

    def classification_loss(self, output: ModuleOutput, labels: torch.Tensor) -> torch.Tensor:
        """The reference's annotation loss: NLL of both class scores of :class:`AnnotationHead`.

        ``labelpred1`` (``output.logits``, the prediction) and the auxiliary ``labelpred2``
        (``output.extra["cluster_logits"]``) are scored; their sum is the reference's loss.
        """
        loss = F.cross_entropy(output.logits.float(), labels)
        return loss + F.cross_entropy(output.extra["cluster_logits"].float(), labels)

    # ------------------------------------------------------------------ tokens
    def tokenize(
        self,
        x: torch.Tensor,
        depth: torch.Tensor | None = None,
        cell_seed: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> CellFMTokens:
        """Tokens of a minibatch of counts ``[B, n_genes]`` in the model's gene space."""
        return cellfm_tokenize(
            x,
            self.token_order,
            depth=depth,
            max_tokens=self.config.max_tokens,
            cell_seed=cell_seed,
            generator=generator,
        )

    @staticmethod
    def st_features(source_totals: torch.Tensor, target_totals: torch.Tensor) -> torch.Tensor:
        """Read-depth features ``[log1p(S / 1000), log1p(T / 1000)]`` ``[B, 2]``."""
        return torch.stack(
            [torch.log1p(source_totals / ST_SCALE), torch.log1p(target_totals / ST_SCALE)], -1
        )

    # ------------------------------------------------------------------ forward
    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {
            "x": tensors[REGISTRY_KEYS.X_KEY],
            "depth": tensors.get(PLAN_DEPTH),
            "cell_seed": tensors.get(PLAN_SEED),
        }

    @auto_move_data
    def inference(
        self,
        x: torch.Tensor,
        depth: torch.Tensor | None = None,
        cell_seed: torch.Tensor | None = None,
        *,
        use_st: bool | None = None,
        hidden_layer: int = -1,
        pooling: str = "cls",
        mask: bool = False,
        mask_ratio: float | None = None,
        thin: bool = False,
        decoder: str | None = None,
        generator: torch.Generator | None = None,
        token_states: bool = True,
    ) -> ModuleOutput:
        """Tokenise, optionally mask, encode and decode a minibatch.

        Parameters
        ----------
        x
            ``[B, n_genes]`` raw counts in the model's gene space.
        depth
            ``[B]`` total counts of each cell over all genes of its AnnData (the
            reference's rounding of cells deeper than 1e5 uses them); ``None``: ``x.sum(1)``.
        cell_seed
            ``[B]`` per-cell seeds of the subsampling of cells with more than
            ``max_tokens`` expressed genes and of the value-recovery mask (the reference's
            ``np.random.seed(seed)`` before ``Prepare.mask``). ``None``: both are drawn
            from ``generator`` (torch's RNG by default), anew at every call (pretraining).
        use_st
            Run the ``[CLS, S, T, genes]`` path (``S = T`` unless thinned).
            ``None``: when the model has read-depth tokens and values are masked or decoded
            (the reference's fine-tuning model), else the zero-shot ``[CLS, genes]`` path.
        hidden_layer
            States read for ``cell_embedding`` / ``token_states``: index into (embedding
            output, layer 1, ..., layer N); -1 = last.
        pooling
            ``"cls"`` (the reference's cell embedding) or ``"mean"`` over gene tokens.
        mask
            Apply the pretraining corruption: mask and score ``mask_ratio`` of each cell's
            genes (80 % of them get the mask embedding).
        mask_ratio
            Fraction masked when ``mask``; ``None``: the config's ``mask_ratio``.
        thin
            With ``mask`` and read-depth tokens, binomially thin half of the cells and
            recover the original values (the reference's read-depth augmentation).
        decoder
            Fill ``expression`` ``[B, n_genes]`` (log1p-normalised scale): ``"cellwise"``
            scores every gene (``sigmoid(map(gene_emb)) · CLS``), ``"genewise"`` the
            expressed genes (``value_dec`` on their tokens; other genes 0). ``None``: none.
        generator
            Random generator for subsampling and masking without ``cell_seed``.
        token_states
            ``False`` when only ``cell_embedding`` is read: with ``pooling="cls"`` (and no
            masking, decoder or classifier) the layer read then runs for the CLS query alone
            and ``token_states`` / ``token_genes`` are ``None``.

        Returns
        -------
        :class:`~scfm.module._outputs.ModuleOutput` with ``cell_embedding``,
        ``token_states``, ``token_genes`` (-1 on padding), ``logits`` (with a classifier)
        and ``expression``; ``extra`` holds ``gene_ids``, ``token_mask``, ``target`` (log1p
        values), ``unmask``, ``scored``, ``gw_pred``, ``cw_pred``, ``st_feat``, ``cls``,
        ``gene_emb`` (the tokens' gene rows, when masking or decoding) and
        ``cluster_logits`` (the annotation head's auxiliary scores).
        """
        target = self.tokenize(x, depth, cell_seed, generator)
        tokens, source_totals = target, target.totals
        if mask and thin and self.config.st_tokens:
            tokens, source_totals = self._thin(x, depth, target, generator)
        ratio = 0.0 if not mask else self.config.mask_ratio if mask_ratio is None else mask_ratio
        length = tokens.gene_ids.shape[1]
        unmask = None
        scored = torch.zeros_like(tokens.token_mask)
        if ratio > 0:
            if cell_seed is not None:
                um, sc = cellfm_reference_mask(
                    tokens.n_tokens.cpu().numpy(), length, ratio, cell_seed.cpu().numpy()
                )
                unmask, scored = torch.from_numpy(um), torch.from_numpy(sc)
            else:
                unmask, scored = cellfm_mask_tokens(
                    tokens.n_tokens, length, ratio, generator=generator
                )
            unmask, scored = unmask.to(x.device), scored.to(x.device)
        if use_st is None:
            use_st = self.config.st_tokens and (ratio > 0 or decoder is not None)
        st_feat = self.st_features(source_totals, target.totals) if use_st else None
        # a CLS read needs the layer read at CLS only (the decoders, the classifier and a
        # mean read the gene tokens too)
        cls_only = (
            not token_states
            and pooling == "cls"
            and unmask is None
            and decoder is None
            and self.classifier is None
        )
        states = self._encode(tokens, unmask, st_feat, hidden_layer, first_token_only=cls_only)
        n_prefix = 1 if cls_only else states.shape[1] - length
        token_mask = tokens.token_mask
        genes = states[:, n_prefix:]
        if pooling == "cls":
            cell = states[:, 0]
        elif pooling == "mean":
            weights = token_mask[..., None].to(genes.dtype)
            cell = (genes * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        else:
            raise ValueError(f"pooling={pooling!r}: use 'cls' or 'mean'")
        out = ModuleOutput(
            cell_embedding=cell,
            token_states=None if cls_only else genes,
            token_genes=None
            if cls_only
            else torch.where(token_mask.bool(), tokens.gene_ids - 1, -1),
            extra={
                "gene_ids": tokens.gene_ids,
                "token_mask": token_mask,
                "target": target.values,
                "unmask": token_mask if unmask is None else unmask,
                "scored": scored,
                "cls": states[:, 0],
            },
        )
        if mask or decoder is not None:
            # the gene rows of the tokens feed the cell-wise decoder (not the embeddings)
            out.extra["gene_emb"] = self.gene_emb[tokens.gene_ids]
        if st_feat is not None:
            out.extra["st_feat"] = st_feat
        if self.classifier is not None:
            out.logits, out.extra["cluster_logits"] = self.classifier(
                states[:, 0], genes, token_mask
            )
        if decoder is not None:
            out.extra.update(self.generative(states[:, 0], genes, out.extra["gene_emb"]))
            out.expression = self._expression(out, decoder)
        return out

    def _encode(
        self,
        tokens: CellFMTokens,
        unmask: torch.Tensor | None,
        st_feat: torch.Tensor | None,
        hidden_layer: int = -1,
        first_token_only: bool = False,
    ) -> torch.Tensor:
        """States ``[B, P + L, d]`` after layer ``hidden_layer``.

        ``P`` prefix tokens: 1 (CLS) or 3 (CLS, S, T) when ``st_feat`` is given.
        ``first_token_only``: the CLS states ``[B, 1, d]`` only; the layer read runs its
        queries, output and feed-forward for CLS alone (inference, no masking).
        """
        gene_ids, token_mask = tokens.gene_ids, tokens.token_mask
        b, length = gene_ids.shape
        real = token_mask.bool()
        prefix = [self.cls_token.expand(b, -1, -1)]
        if st_feat is not None:
            if not self.config.st_tokens:
                raise ValueError("this CellFM checkpoint has no read-depth (ST) tokens")
            prefix.append(self.ST_emb + self.ST_enc(st_feat.to(self.cls_token.dtype)))
        prefix = torch.cat(prefix, dim=1)
        n_prefix = prefix.shape[1]
        # The encoder runs on the cells' tokens packed one after the other ([prefix, genes]
        # per cell): no FLOPs on padding, and padded tokens never need masking out as keys.
        keep = torch.cat([real.new_ones(b, n_prefix), real], dim=1)
        lengths = keep.sum(dim=1).tolist()
        row = keep.flatten().cumsum(0).view(b, -1) - 1  # packed row of each kept token
        unmask_p = None if unmask is None else unmask[real][None]
        genes = self.value_enc(tokens.values[real][None], unmask_p)[0]
        rows = self.gene_emb[gene_ids[real]]
        in_place = not torch.is_grad_enabled() and genes.dtype == rows.dtype
        genes = genes.add_(rows) if in_place else genes + rows
        x = genes.new_empty(sum(lengths), genes.shape[1])
        x[row[:, n_prefix:][real]] = genes
        x[row[:, :n_prefix].flatten()] = prefix.reshape(-1, x.shape[1]).to(x.dtype)
        keys_first = None
        if unmask is not None:
            # Masked genes are not keys in the first half of the layers (the reference).
            keys_first = torch.cat([torch.ones_like(prefix[:, :, 0]), unmask * token_mask], 1)
            keys_first = keys_first[keep].to(x.dtype)
        n_layers = len(self.encoder)
        stop = hidden_layer % (n_layers + 1)
        first = False
        for i, layer in enumerate(self.encoder[:stop]):
            mask = keys_first if i < n_layers // 2 else None
            first = first_token_only and i == stop - 1 and not torch.is_grad_enabled()
            x = layer(x, key_mask=mask, lengths=lengths, first_token_only=first)
        if first_token_only:  # x holds the CLS rows alone if the last layer ran for CLS alone
            return (x if first else x[row[:, 0]])[:, None]
        # Back to [B, P + L, d]; padded rows are zero.
        states = x.new_zeros(b, n_prefix + length, x.shape[1])
        states[keep] = x
        return states

    def _expression(self, out: ModuleOutput, decoder: str) -> torch.Tensor:
        """Decoded log1p expression of every vocabulary gene ``[B, n_genes]``."""
        if decoder == "cellwise":
            rows = self.gene_emb[1 : self.config.n_genes + 1]
            return self.cellwise_dec(out.extra["cls"], rows)
        if decoder != "genewise":
            raise ValueError(f"decoder={decoder!r}: use 'cellwise' or 'genewise'")
        n = self.config.n_genes
        # Padding goes to a spare last column, so that it never overwrites a gene.
        columns = torch.where(out.token_genes >= 0, out.token_genes, n)
        expression = out.extra["gw_pred"].new_zeros(columns.shape[0], n + 1)
        return expression.scatter_(1, columns, out.extra["gw_pred"])[:, :n]

    def _thin(
        self,
        x: torch.Tensor,
        depth: torch.Tensor | None,
        tokens: CellFMTokens,
        generator: torch.Generator | None,
    ) -> tuple[CellFMTokens, torch.Tensor]:
        """Binomially thin half of the cells (``q ~ Beta(2, 2)``, expressed genes keep >= 1).

        The thinned cell keeps the gene set of the original tokens, so that the recovery
        target stays aligned; its values are normalised by the thinned total ``S``.
        """
        from scfm.data._cellfm_tokenize import cellfm_normalize

        _, kept, _ = cellfm_normalize(x, depth)
        b = kept.shape[0]
        # Beta(2, 2) as the ratio of two Gamma(2) draws, so that `generator` drives it too.
        g1, g2 = (_gamma2((b, 1), generator, kept.device) for _ in range(2))
        q = g1 / (g1 + g2)
        apply = torch.rand(b, 1, device=kept.device, generator=generator) < 0.5
        thinned = torch.binomial(kept, q.expand_as(kept).contiguous(), generator=generator)
        thinned = torch.where(kept > 0, thinned.clamp_min(1), thinned)
        thinned = torch.where(apply, thinned, kept)
        source_totals = thinned.sum(dim=1)
        token_counts = torch.gather(thinned, 1, (tokens.gene_ids - 1).clamp_min(0))
        token_counts = token_counts * tokens.token_mask
        size = torch.where(source_totals > 0, source_totals / 1e4, torch.ones_like(source_totals))
        values = torch.log1p(token_counts / size[:, None])
        return CellFMTokens(tokens.gene_ids, values, tokens.n_tokens, source_totals), source_totals

    # ------------------------------------------------------------------ objective
    def _get_generative_input(
        self, tensors: dict[str, torch.Tensor], inference_outputs: ModuleOutput
    ) -> dict[str, torch.Tensor]:
        extra = inference_outputs.extra
        gene_emb = extra.get("gene_emb")
        if gene_emb is None:  # inference leaves it out when nothing is decoded
            gene_emb = self.gene_emb[extra["gene_ids"]]
        return {"cls": extra["cls"], "hidden": inference_outputs.token_states, "gene_emb": gene_emb}

    def generative(
        self, cls: torch.Tensor, hidden: torch.Tensor, gene_emb: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Value predictions per token: gene-wise from its state, cell-wise from the CLS."""
        return {"gw_pred": self.value_dec(hidden), "cw_pred": self.cellwise_dec(cls, gene_emb)}

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: ModuleOutput,
        generative_outputs: dict[str, torch.Tensor],
    ) -> LossOutput:
        """Masked value recovery: gene-wise + cell-wise MSE over the scored genes."""
        extra = inference_outputs.extra
        scored, target = extra["scored"], extra["target"]
        n_scored = scored.sum().clamp_min(1.0)
        err_gw = (generative_outputs["gw_pred"] - target) ** 2 * scored
        err_cw = (generative_outputs["cw_pred"] - target) ** 2 * scored
        loss_gw, loss_cw = err_gw.sum() / n_scored, err_cw.sum() / n_scored
        return LossOutput(
            loss=loss_gw + loss_cw,
            reconstruction_loss=err_gw.sum(1) + err_cw.sum(1),
            extra_metrics={"loss_gw": loss_gw.detach(), "loss_cw": loss_cw.detach()},
        )


def _gamma2(shape: tuple[int, ...], generator: torch.Generator | None, device) -> torch.Tensor:
    """Gamma(2, 1) draws: the sum of two exponentials, from ``generator``."""
    u = torch.rand((2, *shape), generator=generator, device=device).clamp_min(1e-12)
    return -torch.log(u).sum(0)
