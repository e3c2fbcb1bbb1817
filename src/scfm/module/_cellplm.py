"""CellPLM network :cite:p:`Wen2024CellPLM`: cells are the tokens of a "sentence".

Each cell is embedded as the log1p-weighted sum of its genes' embeddings, the cells of one
sentence (a sample, a field of view, a spatial tile) attend to each other through a
Flowformer encoder, a (Gaussian-mixture) VAE latent gives the cell embedding, and a
negative-binomial decoder reconstructs the expression of every vocabulary gene.

The input is a count matrix in the MODEL's gene space (column ``j`` = ``gene_list[j]`` of the
release config); attribute names mirror the keys of the released ``<prefix>.best.ckpt`` files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.distributions import NegativeBinomial
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from scfm.data._loader import GENE_COLUMNS_KEY, TABLE_ROW_SUFFIX
from scfm.errors import CheckpointFormatError, InvalidInputError
from scfm.module._checks import is_int, is_real
from scfm.module._outputs import ModuleOutput
from scfm.nn._flowformer import FlowformerEncoder
from scfm.nn._gmvae import GMVAELatent, VAELatent
from scfm.nn._spatial_encoding import Sinusoidal2dPE

__all__ = ["PLAN_KEYS", "CellPLMConfig", "CellPLMModule"]

#: Per-cell plan arrays the model puts into each minibatch (``tensors[key]``).
PLAN_KEYS = {
    "sentence": "cellplm_sentence",  # int: cells with one id attend to each other
    "coords": "cellplm_coords",  # (2,) coordinates min-max scaled to [0, 1] per sample
    "noise": "cellplm_noise",  # (num_clusters,) Gumbel noise of the GMVAE cluster choice
    # (n_vocab,) int: 1 + the gene's AnnData column, negated if the cell's dataset did not
    # measure it, 0 if the AnnData lacks it; the reference sums gene embeddings in AnnData
    # column order (visible at 1e-4 after the GroupNorm). A TableRows plan: a minibatch
    # carries one row per dataset plus each cell's row number ("cellplm_gene_rank_row").
    "gene_rank": "cellplm_gene_rank",
    "mask_rate": "cellplm_mask_rate",  # float: probability that training masks the cell
}
#: Cells per block of the embedder's product (bounds its log1p copy of the counts).
EMBED_BLOCK_CELLS = 512
#: Groups of every GroupNorm in the embedder and decoder (reference value).
GROUPNORM_GROUPS = 4
#: Width of the hidden layer of the NB output head (hard-coded in the reference).
NB_HEAD_HIDDEN = 128
#: Clamps of the NB mean and dispersion (reference values).
NB_MEAN_RANGE = (1e-5, 1e6)
NB_DISP_RANGE = (1e-4, 1e4)
#: Parameters of the per-cell masking ratio ``r ~ Beta(alpha, 4 / mask_feature_rate + 2 - alpha)``.
MASK_BETA_ALPHA = 5.0
MASK_RATIO_CAP = 0.9

#: Upper bounds of the size keys: far above any release (enc_hid 1024, 19,374 genes, 12,596
#: batches), low enough that a corrupted config fails at once instead of allocating for minutes.
_MAX_SIZE = {
    "enc_hid": 16384,
    "enc_layers": 128,
    "enc_head": 1024,
    "post_latent_dim": 16384,
    "dec_hid": 16384,
    "dec_layers": 128,
    "num_clusters": 4096,
    "out_dim": 1_000_000,
    "max_batch_size": 100_000_000,
    "batch_num": 1_000_000,
    "dataset_num": 1_000_000,
}
_RATES = ("model_dropout", "mask_node_rate", "mask_feature_rate", "drop_node_rate")
_CHOICES = {
    "enc_mod": ("flowformer",),
    "latent_mod": ("vae", "gmvae"),
    "dec_mod": ("nbmlp",),
    "norm": ("groupnorm",),
    "pe_type": ("sin",),
}


@dataclass
class CellPLMConfig:
    """Hyper-parameters of a CellPLM model, named as in the original ``<prefix>.config.json``.

    Keys of the original file that the model does not use (``dataset``, ``epochs``, ``lr``,
    ...) are kept in :attr:`extra`; keys the released files lack take the reference class
    defaults (``enc_head=8``, ``pe_type='sin'``).

    Attributes
    ----------
    enc_mod
        Cell encoder; only ``"flowformer"`` (the released models).
    enc_hid
        Width of embedder and encoder.
    enc_layers
        Flowformer layers.
    enc_head
        Attention heads.
    latent_mod
        ``"vae"`` (release 20231027_85M, deterministic) or ``"gmvae"`` (release 20230926_85M).
    lamda
        Free-bits floor of the GMVAE loss terms.
    post_latent_dim
        Latent (cell embedding) width.
    dec_mod
        Decoder; ``"nbmlp"`` (negative-binomial MLP).
    dec_hid
        Decoder width.
    dec_layers
        Decoder depth; there are ``dec_layers - 1`` hidden blocks.
    model_dropout
        Dropout (training only).
    mask_node_rate
        Share of cells masked per sentence in pretraining.
    mask_feature_rate
        Mean masking ratio of a masked cell's genes.
    drop_node_rate
        Share of cells dropped from a sentence in pretraining.
    norm
        Norm of embedder / decoder; only ``"groupnorm"``.
    w_li, w_en
        GMVAE loss weights.
    num_clusters
        GMVAE mixture components.
    out_dim
        Decoder output size = vocabulary size (``len(gene_list)``).
    cat_pe
        Concatenate the positional encoding (``False`` in the releases; not implemented).
    max_batch_size
        Most cells kept per sentence after node dropping in pretraining.
    input_covariate
        Batch embedding in the embedder (``False`` in the releases; not implemented).
    dae
        Add the masked-entry NB term to the pretraining loss.
    mask_beta
        Per-cell masking ratio drawn from a Beta distribution.
    batch_num, dataset_num
        Sizes of the decoder's batch / dataset covariate embeddings.
    pe_type
        Positional-encoding type (``"sin"``).
    extra
        Keys of the file that the model does not use.
    """

    enc_mod: str = "flowformer"
    enc_hid: int = 1024
    enc_layers: int = 4
    enc_head: int = 8
    latent_mod: str = "gmvae"
    lamda: float = 5.0
    post_latent_dim: int = 512
    dec_mod: str = "nbmlp"
    dec_hid: int = 1024
    dec_layers: int = 2
    model_dropout: float = 0.2
    mask_node_rate: float = 0.75
    mask_feature_rate: float = 0.25
    drop_node_rate: float = 0.3
    norm: str = "groupnorm"
    w_li: float = 5.0
    w_en: float = 5.0
    num_clusters: int = 16
    out_dim: int = 19374
    cat_pe: bool = False
    max_batch_size: int = 4000
    input_covariate: bool = False
    dae: bool = True
    mask_beta: bool = True
    batch_num: int = 0
    dataset_num: int = 0
    pe_type: str = "sin"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> CellPLMConfig:
        """Parse and :meth:`validate` an original config (``gene_list`` is not kept)."""
        if not isinstance(config, dict):
            raise CheckpointFormatError(
                f"A CellPLM config must be a dict (JSON object), got {type(config).__name__}."
            )
        known = {f.name for f in fields(cls)} - {"extra"}
        out = cls(**{k: v for k, v in config.items() if k in known})
        out.extra = {k: v for k, v in config.items() if k not in known and k != "gene_list"}
        out.validate()
        return out

    def to_dict(self) -> dict[str, Any]:
        """The used keys as a plain dict (what ``CellPLM(adata, config=...)`` takes)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}

    def validate(self) -> None:
        """Check types, sizes and the implemented variants.

        Raises
        ------
        CheckpointFormatError
            Naming the first offending key.
        """
        for f in fields(self):
            value, name = getattr(self, f.name), f.name
            if name == "extra":
                continue
            if f.type == "int":
                if isinstance(value, bool) or not isinstance(value, int):
                    _bad(name, value, "an integer")
                low = 0 if name in ("batch_num", "dataset_num") else 1
                if not low <= value <= _MAX_SIZE[name]:
                    _bad(name, value, f"an integer in [{low}, {_MAX_SIZE[name]}]")
            elif f.type == "float":
                if isinstance(value, bool) or not isinstance(value, int | float):
                    _bad(name, value, "a number")
                if not math.isfinite(value) or (name in _RATES and not 0 <= value <= 1):
                    _bad(name, value, "in [0, 1]" if name in _RATES else "a finite number")
            elif f.type == "bool" and not isinstance(value, bool):
                _bad(name, value, "true or false")
            elif f.type == "str" and value not in _CHOICES[name]:
                _bad(name, value, f"one of {_CHOICES[name]} (what scfm implements)")
        if self.enc_hid % self.enc_head:
            _bad("enc_head", self.enc_head, f"a divisor of enc_hid={self.enc_hid}")
        if self.enc_hid % GROUPNORM_GROUPS or self.dec_hid % GROUPNORM_GROUPS:
            _bad("enc_hid", (self.enc_hid, self.dec_hid), "enc_hid, dec_hid divisible by 4")
        if self.mask_feature_rate == 0:
            _bad("mask_feature_rate", 0, "> 0")
        for name in ("cat_pe", "input_covariate"):
            if getattr(self, name):
                _bad(name, True, "false (the released architecture; True is not implemented)")

    def check_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Compare the shapes this config implies with the weights, before any module exists.

        Raises
        ------
        CheckpointFormatError
            Naming the config key that disagrees with the weights.
        """
        d, z, k = self.enc_hid, self.post_latent_dim, self.num_clusters
        vae, gm = "latent.layers.1.hid_2mu.weight", "latent.layers.1.inference.y_mu.weight"
        if self.latent_mod == "vae" and gm in state_dict:
            _bad("latent_mod", "vae", "'gmvae': the weights hold a Gaussian-mixture latent")
        if self.latent_mod == "gmvae" and vae in state_dict:
            _bad("latent_mod", "gmvae", "'vae': the weights hold a plain VAE latent")
        layers, blocks = (
            _indices(state_dict, "encoder.layers."),
            _indices(state_dict, "decoder.layers."),
        )
        if layers != self.enc_layers:
            _bad("enc_layers", self.enc_layers, f"{layers}, the Flowformer layers of the weights")
        if blocks != self.dec_layers - 1:
            _bad("dec_layers", self.dec_layers, f"{blocks + 1}, as the weights' decoder blocks")
        expected = {
            "embedder.feat_enc.emb": ((self.out_dim, d), "out_dim / gene_list, enc_hid"),
            "encoder.layers.0._ff_block.0.weight": ((2 * d, d), "enc_hid"),
            "pre_latent_norm.norm.weight": ((d,), "enc_hid"),
            vae: ((z, d), "post_latent_dim, enc_hid"),
            "latent.layers.1.inference.inference_qyx.0.logits.weight": ((k, d), "num_clusters"),
            gm: ((z, k), "post_latent_dim, num_clusters"),
            "decoder.layers.0.0.weight": ((self.dec_hid, z), "dec_hid, post_latent_dim"),
            "decoder.covariate_layers.0.batch.0.weight": (
                (self.batch_num, self.dec_hid),
                "batch_num",
            ),
            "decoder.covariate_layers.0.dataset.0.weight": (
                (self.dataset_num, self.dec_hid),
                "dataset_num",
            ),
            "decoder.out_layer.dec_disp": ((self.out_dim,), "out_dim / gene_list"),
        }
        for key, (shape, names) in expected.items():
            if key in state_dict and tuple(state_dict[key].shape) != shape:
                raise CheckpointFormatError(
                    f"The CellPLM config ({names}) implies {key} of shape {shape}, but the "
                    f"weights hold {tuple(state_dict[key].shape)}: config and weights belong to "
                    "different releases. Use the config.json shipped with this .best.ckpt."
                )


def _indices(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    """Number of distinct ``<prefix><i>.`` blocks among the keys."""
    return len({k[len(prefix) :].split(".")[0] for k in state_dict if k.startswith(prefix)})


def _bad(key: str, value: Any, want: str) -> None:
    raise CheckpointFormatError(
        f"CellPLM config key {key!r} = {value!r} is invalid: expected {want}. Use the "
        "<prefix>.config.json shipped with the release."
    )


class _FeatureEncoder(nn.Module):
    """Gene embedding matrix (``embedder.feat_enc.emb``)."""

    def __init__(self, n_genes: int, d_model: int) -> None:
        super().__init__()
        self.emb = nn.Parameter(torch.randn(n_genes, d_model) * 0.005)


class CellPLMEmbedder(nn.Module):
    """Cell tokens: ``GroupNorm(Dropout(ReLU(Linear(log1p(x) @ E (+ PE)))))``.

    Parameters
    ----------
    n_genes
        Vocabulary size.
    d_model
        Width.
    dropout
        Dropout (training only).
    spatial_encoding
        Add the 2-D sinusoidal encoding of the coordinates (off in the released models).
    """

    def __init__(
        self, n_genes: int, d_model: int, dropout: float = 0.0, spatial_encoding: bool = False
    ) -> None:
        super().__init__()
        self.feat_enc = _FeatureEncoder(n_genes, d_model)
        self.extra_linear = nn.Sequential(
            nn.Linear(d_model, d_model),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.GroupNorm(GROUPNORM_GROUPS, d_model),
        )
        # Every release carries pe_enc.missing_pe, so the module always has it (loaded, and
        # trained with spatial_encoding); the released forward adds 0 instead (issue #19).
        self.pe_enc = Sinusoidal2dPE(d_model)
        self.spatial_encoding = spatial_encoding

    def forward(
        self,
        x: torch.Tensor,
        coords: torch.Tensor | None = None,
        gene_rank: torch.Tensor | None = None,
        gene_columns: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cell tokens.

        Parameters
        ----------
        x
            ``[N, n_vocab]`` counts, or ``[N, k]`` counts of the genes ``gene_columns``.
        coords
            ``[N, 2]`` coordinates in ``[0, 1]``, or ``None``.
        gene_rank
            ``[R, n_vocab]`` rows of AnnData column (+1) of each gene (negated if unmeasured,
            0 if absent; one row per dataset or per cell): genes are summed in that order, as
            the reference does (``None``: vocabulary order).
        gene_columns
            ``[k]`` model gene of each column of ``x`` (any order); ``None``: ``x`` spans
            the vocabulary.
        """
        # Only genes expressed in the minibatch contribute (zeros add 0), as in the
        # reference's sparse product; skipping the rest saves most of the work.
        local = torch.nonzero(x.any(dim=0)).squeeze(1)  # expressed columns of x
        genes = local if gene_columns is None else gene_columns[local]
        if gene_columns is not None:  # compact columns may come in any order: vocabulary's
            order = torch.argsort(genes)
            local, genes = local[order], genes[order]
        if gene_rank is not None:
            # |rank| is the same in every row (unmeasured genes are negated), so the order
            # comes from the small table, never from a row per cell
            rank = gene_rank.abs().amax(dim=0)[genes].long()
            ranked = torch.nonzero(rank > 0).squeeze(1)
            rest = torch.nonzero(rank == 0).squeeze(1)
            pick = torch.cat([ranked[torch.argsort(rank[ranked])], rest])
            local, genes = local[pick], genes[pick]
        emb = self.feat_enc.emb[genes]
        # a compact minibatch in the AnnData's column order needs no column gather
        gather = len(local) != x.shape[1] or not bool(
            (local == torch.arange(len(local), device=local.device)).all()
        )
        parts = []
        # blocks of cells bound the log1p copy; each row's product is the same computation
        for s in range(0, len(x), EMBED_BLOCK_CELLS):
            block = x[s : s + EMBED_BLOCK_CELLS]
            block = block[:, local].to(emb.dtype) if gather else block.to(emb.dtype, copy=True)
            parts.append(block.log1p_() @ emb)
        h = parts[0] if len(parts) == 1 else torch.cat(parts)
        if self.spatial_encoding:
            h = h + self.pe_enc(coords, len(h))
        return self.extra_linear(h)


class _PreLatentNorm(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h)


class _LatentStack(nn.Module):
    """``latent.layers``: index 0 is the reference's parameter-free placeholder."""

    def __init__(self, latent: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Identity(), latent])

    @property
    def head(self) -> nn.Module:
        return self.layers[1]


class _NBOutput(nn.Module):
    def __init__(self, d_in: int, n_genes: int) -> None:
        super().__init__()
        self.dec_1 = nn.Linear(d_in, NB_HEAD_HIDDEN)
        self.dec_mean = nn.Sequential(nn.Linear(NB_HEAD_HIDDEN, n_genes))
        self.dec_disp = nn.Parameter(torch.randn(n_genes))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.dec_mean(F.relu(self.dec_1(h))).exp().clamp(*NB_MEAN_RANGE)
        return mean, self.dec_disp.exp().clamp(*NB_DISP_RANGE)


class CellPLMDecoder(nn.Module):
    """Negative-binomial MLP decoder (``dec_mod='nbmlp'``).

    After each hidden block a covariate term is added per covariate type (batch, dataset):
    the SUM of all rows of its embedding table through PReLU + GroupNorm, which is what the
    reference pipelines use (they never pass the pretraining corpus's batch labels).
    """

    def __init__(self, config: CellPLMConfig) -> None:
        super().__init__()
        c = config
        n_hidden = c.dec_layers - 1
        dims = [c.post_latent_dim] + [c.dec_hid] * n_hidden
        self.layers = nn.ModuleList(
            nn.Sequential(
                nn.Linear(dims[i], dims[i + 1]),
                nn.PReLU(),
                nn.Dropout(c.model_dropout),
                nn.GroupNorm(GROUPNORM_GROUPS, dims[i + 1]),
            )
            for i in range(n_hidden)
        )
        sizes = {"batch": c.batch_num, "dataset": c.dataset_num}

        def covariate(n: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Embedding(n, c.dec_hid), nn.PReLU(), nn.GroupNorm(GROUPNORM_GROUPS, c.dec_hid)
            )

        self.covariate_layers = nn.ModuleList(
            nn.ModuleDict({k: covariate(n) for k, n in sizes.items() if n > 0})
            for _ in range(n_hidden)
        )
        self.out_layer = _NBOutput(dims[-1], c.out_dim)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """NB mean ``[N, out_dim]`` and dispersion ``[out_dim]``."""
        h = z
        for block, covariates in zip(self.layers, self.covariate_layers, strict=True):
            h = block(h)
            for emb in covariates.values():
                h = h + emb[2](emb[1](emb[0].weight.sum(dim=0, keepdim=True)))
        return self.out_layer(h)


def sentence_runs(sentence: torch.Tensor) -> tuple[torch.Tensor | None, list[int]]:
    """The cells packed sentence by sentence, sentences ordered by length.

    Returns
    -------
    The order of the cells (``None`` when they already come in it, e.g. one sentence; cells
    keep their relative order within a sentence) and the length of each sentence in that
    order. Equally long sentences are adjacent, so the encoder takes each run of them in one
    call and computes no padding (:func:`~scfm.nn._packing.equal_runs`).
    """
    _, inverse, counts = torch.unique(sentence, return_inverse=True, return_counts=True)
    by_length = torch.argsort(counts, stable=True)
    rank = torch.empty_like(by_length)
    rank[by_length] = torch.arange(len(counts), device=sentence.device)
    order = torch.argsort(rank[inverse], stable=True)
    lengths = counts[by_length].tolist()
    if bool((order == torch.arange(len(order), device=order.device)).all()):
        return None, lengths
    return order, lengths


#: Options of each task of the model's calls over cells, with their defaults (see
#: :meth:`CellPLMModule.check_options`); every task takes the sentence options.
_SENTENCE = {"sentence": "batch", "chunk_size": None, "tile_size": None}
_TASK_OPTIONS: dict[str, dict[str, Any]] = {
    "latent": {"hidden_layer": None, "output": "embedding", "seed": None},
    "genes": {},
    "predict": {},
    "expression": {"rescale": True, "seed": None, "measured_genes": None},
    "train": {"measured_genes": None, "mask_node_rate": None},
}
_OUTPUTS = ("embedding", "pre_latent", "cluster_logits", "cluster")


#: Checks of the call options: (accepts the value, what to pass instead).
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "sentence": (lambda v: v in ("batch", "spatial"), "'batch' or 'spatial'"),
    "chunk_size": (lambda v: v is None or (is_int(v) and v >= 1), "None or an int >= 1"),
    "tile_size": (lambda v: v is None or (is_real(v) and v > 0), "None or a positive number"),
    "seed": (lambda v: v is None or (is_int(v) and v >= 0), "None or an int >= 0"),
    "output": (lambda v: v in _OUTPUTS, f"one of {_OUTPUTS}"),
    "rescale": (lambda v: isinstance(v, bool), "True or False"),
    "mask_node_rate": (lambda v: v is None or (is_real(v) and 0 <= v <= 1), "None or in [0, 1]"),
    "measured_genes": (lambda v: v is None or isinstance(v, Mapping), "a dict {label: genes}"),
}


class CellPLMModule(BaseModuleClass):
    """CellPLM network with scvi-tools' ``inference`` / ``generative`` / ``loss`` split.

    Parameters
    ----------
    config
        The architecture.
    spatial_encoding
        Add the 2-D sinusoidal positional encoding (off in the released models).
    """

    #: Built in the reference but never used by its forward (``norm0``; the frozen PE table,
    #: which :class:`~scfm.nn.Sinusoidal2dPE` computes on the fly).
    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [
        r"^embedder\.norm0\.",
        r"^embedder\.pe_enc\.pe_enc\.weight$",
    ]
    #: Releases trimmed of the unused positional-encoding tensors still load.
    _keys_to_ignore_on_load_missing: ClassVar[list[str]] = [r"^embedder\.pe_enc\.missing_pe$"]
    #: Linear layers LoRA adapts in fine-tuning (fnmatch over module names): the Flowformer
    #: query and value projections, as LoRA is usually applied to attention.
    _lora_target_modules: ClassVar[list[str]] = [
        "encoder.layers.*.self_attn.query_projection",
        "encoder.layers.*.self_attn.value_projection",
    ]

    def __init__(self, config: CellPLMConfig, spatial_encoding: bool = False) -> None:
        super().__init__()
        c = config
        self.config = c
        self.embedder = CellPLMEmbedder(c.out_dim, c.enc_hid, c.model_dropout, spatial_encoding)
        self.encoder = FlowformerEncoder(c.enc_hid, c.enc_layers, c.enc_head, c.model_dropout)
        self.pre_latent_norm = _PreLatentNorm(c.enc_hid)
        if c.latent_mod == "vae":
            latent: nn.Module = VAELatent(c.enc_hid, c.post_latent_dim)
        else:
            latent = GMVAELatent(
                c.enc_hid, c.post_latent_dim, c.num_clusters, c.lamda, c.w_li, c.w_en
            )
        self.latent = _LatentStack(latent)
        self.decoder = CellPLMDecoder(c)
        #: Cell-type head added by :meth:`add_classifier` (fine-tuning).
        self.classifier: nn.Module | None = None

    @property
    def spatial_encoding(self) -> bool:
        """Whether the coordinates' positional encoding is added to the cell tokens."""
        return self.embedder.spatial_encoding

    def add_classifier(self, n_labels: int) -> None:
        """Add the reference annotation head for ``n_labels`` cell types.

        ``Linear(enc_hid, post_latent_dim)`` (the ``'ae'`` latent of the reference
        ``CellTypeAnnotationPipeline``) -> Dropout -> ``Linear(post_latent_dim, n_labels)``,
        on the pre-latent encoder output of each cell.
        """
        c = self.config
        self.classifier = nn.Sequential(
            nn.Linear(c.enc_hid, c.post_latent_dim),
            nn.Dropout(c.model_dropout),
            nn.Linear(c.post_latent_dim, n_labels),
        ).to(self.embedder.feat_enc.emb.device)

    def check_options(self, task: str, **options: Any) -> dict[str, Any]:
        """Validate the options of a model call before any forward pass; return them.

        ``task`` is the model's (``"latent"``, ``"genes"``, ``"predict"``, ``"expression"``,
        ``"train"``); each takes the sentence options (``sentence``, ``chunk_size``,
        ``tile_size``) and its own (see :class:`~scfm.model.CellPLM`). ``hidden_layer`` and
        the cluster outputs are checked against this architecture.

        Returns
        -------
        Every option of the task, the defaults filled in.

        Raises
        ------
        InvalidInputError
            For an option the task does not take, or a value it does not accept.
        """
        allowed = {**_SENTENCE, **_TASK_OPTIONS.get(task, {})}
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise InvalidInputError(
                f"CellPLM has no option {', '.join(map(repr, unknown))} here; the options are "
                f"{', '.join(sorted(allowed))}."
            )
        o = {**allowed, **options}
        n = self.config.enc_layers
        rules = {
            **_RULES,
            "hidden_layer": (
                lambda v: v is None or (is_int(v) and -n - 1 <= v <= n),
                f"an int <= {n}",
            ),
        }
        for name, value in o.items():
            if name in rules and not rules[name][0](value):
                raise InvalidInputError(f"CellPLM option {name}={value!r}: use {rules[name][1]}.")
        if o.get("output", "").startswith("cluster") and self.config.latent_mod != "gmvae":
            raise InvalidInputError(f"output={o['output']!r} needs a GMVAE latent (20230926_85M).")
        if o.get("hidden_layer") is not None and o["output"] != "embedding":
            raise InvalidInputError("Pass either hidden_layer or output, not both.")
        return o

    # ------------------------------------------------------------------ scvi-tools API
    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        def plan(name: str) -> torch.Tensor | None:
            return tensors.get(PLAN_KEYS[name])

        sentence = plan("sentence")
        return {
            "x": tensors[REGISTRY_KEYS.X_KEY],
            "gene_columns": tensors.get(GENE_COLUMNS_KEY),
            "sentence": None if sentence is None else sentence.reshape(-1).long(),
            "coords": plan("coords"),
            "noise": plan("noise"),
            "gene_rank": plan("gene_rank"),
            "gene_rank_row": tensors.get(PLAN_KEYS["gene_rank"] + TABLE_ROW_SUFFIX),
            "mask_rate": plan("mask_rate"),
        }

    @auto_move_data
    def inference(
        self,
        x: torch.Tensor,
        sentence: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        gene_rank: torch.Tensor | None = None,
        mask_rate: torch.Tensor | None = None,
        gene_columns: torch.Tensor | None = None,
        gene_rank_row: torch.Tensor | None = None,
        hidden_layer: int | None = None,
        output: str = "embedding",
        decode: bool = False,
        rescale: bool = True,
        mask: bool = False,
    ) -> ModuleOutput:
        """Embed (and optionally decode) a minibatch of whole sentences.

        Parameters
        ----------
        x
            ``[N, n_vocab]`` raw counts in the model's gene space, or ``[N, k]`` counts of
            the genes ``gene_columns`` (a compact minibatch).
        sentence
            ``[N]`` sentence id of each cell (cells with one id attend to each other);
            ``None``: all cells form one sentence.
        coords
            ``[N, 2]`` coordinates already scaled to ``[0, 1]`` (the model scales them per
            sample, in training and inference alike); used only with ``spatial_encoding``.
        noise
            ``[N, num_clusters]`` Gumbel noise of the GMVAE cluster choice in eval
            (``None``: the most probable cluster).
        gene_rank
            ``[R, n_vocab]`` int rows, 1 + the AnnData column of each gene a dataset
            measured, negative for genes it did not measure, 0 for genes the AnnData lacks
            (:func:`scfm.data._cellplm_sentences.cellplm_gene_rank`); cell ``i`` reads row
            ``gene_rank_row[i]`` (without ``gene_rank_row``: the one row, or row ``i`` of
            ``N`` rows). The decoded expression is rescaled so that measured genes sum to the
            cell's observed total, the training loss counts only them, and the embedder sums
            genes in this order. ``None``: every gene measured, vocabulary order.
        mask_rate
            ``[N]`` probability that ``mask`` masks each cell (``None``:
            ``config.mask_node_rate``).
        gene_columns
            ``[k]`` model gene of each column of a compact ``x`` (any order); ``None``:
            ``x`` spans the vocabulary.
        gene_rank_row
            ``[N]`` row of ``gene_rank`` of each cell.
        hidden_layer
            ``None``: ``cell_embedding`` is given by ``output``. An int reads the Flowformer
            states instead, Python indexing over (embedder output, layer 1, ..., layer N).
        output
            ``cell_embedding`` without ``hidden_layer``: ``"embedding"`` (latent mean),
            ``"pre_latent"`` (LayerNorm'd encoder output), GMVAE ``"cluster_logits"`` or
            ``"cluster"`` (the chosen cluster, one-hot).
        decode
            Fill ``expression`` with the NB mean of every vocabulary gene.
        rescale
            Rescale the decoded mean to each cell's observed total over ``measured`` genes
            (the reference ``ImputationPipeline``); ``False``: the raw NB mean.
        mask
            Corrupt the input as the reference pretraining does (the training plan asks for
            it): node dropping (a cell's row is kept, see :meth:`_drop_cells`) and masking of
            expressed genes.

        Returns
        -------
        :class:`~scfm.module.ModuleOutput`: ``cell_embedding``, ``logits`` (with a classifier),
        ``expression`` (with ``decode``); ``extra`` holds ``h_prelatent`` and the latent's
        outputs (``qz_mean``, ``qz_var``, ``z``; GMVAE also ``cluster_logits``, ``cluster``,
        ``prior_mean``, ``prior_var``) and, with ``mask``, ``kept`` (cells the reconstruction
        loss counts) and ``masked_entries``.
        """
        extra: dict[str, torch.Tensor] = {}
        if sentence is None:
            sentence = torch.zeros(len(x), dtype=torch.long, device=x.device)
        x_in = x
        if mask:
            sentence, extra["kept"] = self._drop_cells(sentence)
            x_in, extra["masked_entries"] = self._mask_counts(x, mask_rate)
        h = self.embedder(x_in, coords, gene_rank, gene_columns)
        if hidden_layer is not None:
            n_layers = range(self.config.enc_layers + 1)[hidden_layer]
            h = self.encode(h, sentence, n_layers)
            return ModuleOutput(cell_embedding=h, extra=extra)
        h_pre = self.pre_latent_norm(self.encode(h, sentence))
        latent = self.latent.head(h_pre, noise=noise)
        extra.update(h_prelatent=h_pre, **latent)
        cell = {"embedding": latent["qz_mean"], "pre_latent": h_pre}.get(output)
        out = ModuleOutput(cell_embedding=cell if cell is not None else latent[output], extra=extra)
        if self.classifier is not None:
            out.logits = self.classifier(h_pre)
        if decode:
            mean, extra["dispersion"] = self.decoder(latent["z"])
            measured = None if gene_rank is None else _rank_rows(gene_rank, gene_rank_row) > 0
            out.expression = _rescale(mean, x, measured, gene_columns) if rescale else mean
        return out

    def encode(
        self, h: torch.Tensor, sentence: torch.Tensor, n_layers: int | None = None
    ) -> torch.Tensor:
        """Flowformer over the cells of each sentence; cells of different sentences never mix.

        The cells run packed (:func:`sentence_runs`): projections, feed-forward blocks and
        norms see the real cells only, however unequal the sentences (padding them to the
        longest multiplied the work with many short sentences).
        """
        order, lengths = sentence_runs(sentence)
        if order is None:  # cells already in place (e.g. one sentence): no copies
            return self.encoder(h, n_layers=n_layers, lengths=lengths)
        out = self.encoder(h[order], n_layers=n_layers, lengths=lengths)
        return out[torch.argsort(order)]

    def _drop_cells(self, sentence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's node dropping, keeping one output row per cell.

        Per sentence a random ``drop_node_rate`` share of cells (and any beyond
        ``max_batch_size``) leaves the sentence: the kept cells attend only to each other,
        as in the reference. The dropped cells form a sentence of their own, so that every
        row still has an output (a classification loss needs one per label); only kept
        cells count in the reconstruction loss.

        Returns
        -------
        The new sentence ids and the ``[N]`` bool mask of kept cells.
        """
        c = self.config
        kept = torch.rand(len(sentence), device=sentence.device) >= c.drop_node_rate
        # at most max_batch_size kept cells per sentence (in minibatch order)
        order = torch.argsort(sentence, stable=True)
        counts = torch.bincount(sentence[order][kept[order]], minlength=int(sentence.max()) + 1)
        rank = torch.cumsum(kept[order].long(), 0) - 1
        starts = torch.cumsum(counts, 0) - counts
        rank = rank - starts[sentence[order]]
        kept[order] &= rank < c.max_batch_size
        if not kept.any():
            kept[0] = True
        return sentence * 2 + (~kept).long(), kept

    def _mask_counts(
        self, x: torch.Tensor, mask_rate: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference "input" masking: masked counts and the masked-entry indicator.

        A cell is masked with probability ``mask_rate`` (per cell) or ``mask_node_rate``; each
        of its NON-ZERO entries is then set to 0 with a per-cell ratio ``r ~ Beta`` (or
        ``mask_feature_rate``).
        """
        c = self.config
        n = len(x)
        rate = c.mask_node_rate if mask_rate is None else mask_rate.reshape(-1).to(x.dtype)
        cells = torch.rand(n, device=x.device) < rate
        if c.mask_beta:
            beta = 4.0 / c.mask_feature_rate + 2.0 - MASK_BETA_ALPHA
            ratio = torch.distributions.Beta(MASK_BETA_ALPHA, beta).sample((n,)).to(x.device)
            ratio = ratio.clamp(max=MASK_RATIO_CAP)
        else:
            ratio = torch.full((n,), c.mask_feature_rate, device=x.device)
        # draw only for non-zero entries (zeros stay zeros), not for the whole vocabulary
        row, col = torch.nonzero(x > 0, as_tuple=True)
        hit = (torch.rand(len(row), device=x.device) < ratio[row]) & cells[row]
        entries = torch.zeros_like(x, dtype=torch.bool)
        entries[row[hit], col[hit]] = True
        return x.masked_fill(entries, 0.0), entries

    def _get_generative_input(
        self, tensors: dict[str, torch.Tensor], inference_outputs: ModuleOutput
    ) -> dict[str, Any]:
        return {"z": inference_outputs.extra["z"]}

    @auto_move_data
    def generative(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """NB mean over the whole vocabulary (``[N, out_dim]``) and dispersion (``[out_dim]``)."""
        mean, disp = self.decoder(z)
        return {"mean": mean, "disp": disp}

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: ModuleOutput,
        generative_outputs: dict[str, torch.Tensor],
    ) -> LossOutput:
        """Masked NB reconstruction (+ masked-entry term when ``dae``) + latent loss.

        Only the measured genes (``gene_rank > 0`` of the plan, the reference's
        ``batch_gene_list``) count in the loss and in the per-cell rescaling; kept cells
        with masked entries (all kept cells outside training) are scored.
        """
        extra = inference_outputs.extra
        mean = generative_outputs["mean"]
        columns = tensors.get(GENE_COLUMNS_KEY)
        x = _gene_space(tensors[REGISTRY_KEYS.X_KEY].float(), columns, mean.shape[1])
        masked = extra.get("masked_entries")
        if masked is not None:
            masked = _gene_space(masked, columns, mean.shape[1])
        rank = tensors.get(PLAN_KEYS["gene_rank"])
        if rank is None:
            measured = torch.ones_like(x)
        else:
            row = tensors.get(PLAN_KEYS["gene_rank"] + TABLE_ROW_SUFFIX)
            measured = (_rank_rows(rank, row) > 0).to(x).expand_as(x)
        x = x * measured  # unmeasured entries count neither in the loss nor in the totals
        mean = mean * measured
        theta = generative_outputs["disp"].expand_as(mean)
        cells = extra.get("kept", torch.ones(len(x), dtype=torch.bool, device=x.device))
        if masked is not None and bool((cells & masked.any(dim=1)).any()):
            cells = cells & masked.any(dim=1)
        x, mean, theta, measured = x[cells], mean[cells], theta[cells], measured[cells]
        mu = _scale_to(mean, x.sum(1)).clamp(min=NB_MEAN_RANGE[0])
        nll = -(NegativeBinomial(mu=mu, theta=theta).log_prob(x) * measured).sum(1)
        recon = nll.mean()
        if self.config.dae and masked is not None:
            m = masked[cells].to(x.dtype) * measured
            target = x * m
            mu_m = _scale_to(mean * m, target.sum(1)).clamp(min=NB_MEAN_RANGE[0])
            dae = -(NegativeBinomial(mu=mu_m, theta=theta).log_prob(target) * m).sum(1)
            recon = recon + dae.mean()
        latent_loss = self.latent.head.loss(extra)
        return LossOutput(
            loss=recon + latent_loss,
            reconstruction_loss=nll,
            extra_metrics={"latent_loss": latent_loss.detach()},
        )


def _scale_to(mean: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Scale each row of ``mean`` to sum to ``total`` (the cell's observed count)."""
    return mean / mean.sum(dim=1, keepdim=True).clamp(min=1e-8) * total[:, None]


def _rank_rows(gene_rank: torch.Tensor, row: torch.Tensor | None) -> torch.Tensor:
    """Each cell's gene-rank row (``[N, n_vocab]``), or the one shared row (``[1, n_vocab]``)."""
    if row is None or len(gene_rank) == 1:
        return gene_rank
    return gene_rank[row]


def _gene_space(x: torch.Tensor, columns: torch.Tensor | None, n_genes: int) -> torch.Tensor:
    """A compact minibatch's ``[N, k]`` values spread into ``[N, n_genes]`` (zeros elsewhere)."""
    if columns is None:
        return x
    out = x.new_zeros(len(x), n_genes)
    out[:, columns] = x
    return out


def _rescale(
    mean: torch.Tensor,
    x: torch.Tensor,
    measured: torch.Tensor | None,
    columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference imputation output: ``mean`` times observed / predicted measured total.

    ``x`` holds the genes ``columns`` (``None``: all); ``measured`` is ``[N or 1, n_genes]``.
    """
    if measured is None:
        observed, predicted = x.sum(1), mean.sum(1)
    else:
        m = measured.to(mean.dtype)
        observed = (x * (m if columns is None else m[:, columns])).sum(1)
        predicted = (mean * m).sum(1)
    return mean * (observed / predicted.clamp(min=1e-12))[:, None]
