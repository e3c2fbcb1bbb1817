"""CellPLM network :cite:p:`Wen2024CellPLM`: cells are the tokens of a "sentence".

Each cell is embedded as the log1p-weighted sum of its genes' embeddings, the cells of one
sentence (a sample, a field of view, a spatial tile) attend to each other through a
Flowformer encoder, a (Gaussian-mixture) VAE latent gives the cell embedding, and a
batch-aware negative-binomial decoder reconstructs the expression of every vocabulary gene.

Attribute names mirror the keys of the released ``<prefix>.best.ckpt`` files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.distributions import NegativeBinomial
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from scfm.errors import InvalidInputError
from scfm.nn._flowformer import FlowformerEncoder
from scfm.nn._gmvae import GMVAELatent, VAELatent
from scfm.nn._spatial_encoding import Sinusoidal2dPE

logger = logging.getLogger(__name__)

__all__ = ["SPATIAL_KEY", "CellPLMConfig", "CellPLMModule"]

#: Registry key of the spatial coordinates (``ObsmField``).
SPATIAL_KEY = "spatial"
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


@dataclass
class CellPLMConfig:
    """Hyper-parameters of a CellPLM model, named as in the original ``<prefix>.config.json``.

    Keys of the original file that the model does not use (``dataset``, ``epochs``, ``lr``,
    ...) are dropped; keys the released files lack take the reference class defaults.

    Attributes
    ----------
    enc_mod
        Cell encoder; only ``"flowformer"`` (the released models) is implemented.
    enc_hid
        Width of embedder and encoder.
    enc_layers
        Flowformer layers.
    enc_head
        Attention heads (not in the released config; default 8).
    latent_mod
        ``"vae"`` (release 20231027_85M), ``"gmvae"`` (release 20230926_85M) or ``"ae"``
        (a plain linear map, used for annotation fine-tuning).
    lamda
        Free-bits floor of the GMVAE loss terms.
    post_latent_dim
        Latent (cell embedding) width.
    dec_mod
        Decoder; ``"nbmlp"`` (negative binomial MLP).
    dec_hid
        Decoder width.
    dec_layers
        Decoder depth; there are ``dec_layers - 1`` hidden blocks.
    model_dropout
        Dropout (training only).
    mask_node_rate
        Fraction of cells masked per sentence in pretraining.
    mask_feature_rate
        Mean masking ratio of a masked cell's genes.
    drop_node_rate
        Fraction of cells dropped from a sentence in pretraining.
    norm
        Norm of embedder / decoder; only ``"groupnorm"``.
    w_li, w_en
        GMVAE loss weights.
    num_clusters
        GMVAE mixture components.
    out_dim
        Decoder output size = vocabulary size.
    cat_pe
        Concatenate the positional encoding (``False`` in the releases; only adding is
        implemented).
    max_batch_size
        Most cells kept per sentence after node dropping in pretraining.
    input_covariate
        Batch embedding added in the embedder (``False`` in the releases; not implemented).
    dae
        Add the masked-entry NB term to the pretraining loss.
    mask_beta
        Per-cell masking ratio drawn from a Beta distribution.
    batch_num, dataset_num
        Sizes of the decoder's batch / dataset covariate embeddings.
    pe_type
        Positional-encoding type (``"sin"``; only used with ``spatial_encoding=True``).
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
        """Parse an original config (``gene_list`` and unused keys are ignored)."""
        known = {f.name for f in fields(cls)} - {"extra"}
        out = cls(**{k: v for k, v in config.items() if k in known})
        out.extra = {k: v for k, v in config.items() if k not in known and k != "gene_list"}
        out.validate()
        return out

    def to_dict(self) -> dict[str, Any]:
        """The used keys as a plain dict (what ``CellPLM(adata, config=...)`` takes)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}

    def validate(self) -> None:
        """Refuse variants of the reference code that scfm does not implement."""
        checks = [
            (self.enc_mod == "flowformer", f"enc_mod={self.enc_mod!r} (only 'flowformer')"),
            (self.latent_mod in ("vae", "gmvae", "ae"), f"latent_mod={self.latent_mod!r}"),
            (self.dec_mod == "nbmlp", f"dec_mod={self.dec_mod!r} (only 'nbmlp')"),
            (self.norm == "groupnorm", f"norm={self.norm!r} (only 'groupnorm')"),
            (not self.cat_pe, "cat_pe=True"),
            (not self.input_covariate, "input_covariate=True"),
            (self.dec_layers >= 1, f"dec_layers={self.dec_layers}"),
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise InvalidInputError(
                f"Unsupported CellPLM configuration: {'; '.join(bad)}. scfm implements the "
                "architecture of the released checkpoints (flowformer encoder, vae/gmvae "
                "latent, nbmlp decoder with groupnorm)."
            )


class _FeatureEncoder(nn.Module):
    """Gene embedding matrix (``embedder.feat_enc.emb``)."""

    def __init__(self, n_genes: int, d_model: int) -> None:
        super().__init__()
        self.emb = nn.Parameter(torch.randn(n_genes, d_model) * 0.005)


class CellPLMEmbedder(nn.Module):
    """Cell tokens: ``GroupNorm(Dropout(ReLU(Linear(log1p(x) @ E))))`` (+ optional 2-D PE).

    Parameters
    ----------
    n_genes
        Vocabulary size.
    d_model
        Width.
    dropout
        Dropout (training only).
    spatial_encoding
        Add the 2-D sinusoidal positional encoding of the coordinates after the gene sum.
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
        self.pe_enc = Sinusoidal2dPE(d_model) if spatial_encoding else None

    def forward(
        self, x_log: torch.Tensor, vocab_index: torch.Tensor, coords: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x_log``: ``[N, G]`` log1p counts of the kept genes; ``vocab_index``: ``[G]``."""
        h = x_log @ self.feat_enc.emb[vocab_index]
        if self.pe_enc is not None:
            h = h + self.pe_enc(coords, len(h))
        return self.extra_linear(h)


class _PreLatentNorm(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h)


class _AELatent(nn.Module):
    """Deterministic linear latent (``latent_mod='ae'``), used for annotation fine-tuning."""

    def __init__(self, d_in: int, d_latent: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_latent)

    def forward(self, h: torch.Tensor, **_: object) -> dict[str, torch.Tensor]:
        z = self.proj(h)
        return {"z": z, "qz_mean": z}

    def loss(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        return out["z"].new_zeros(())


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
        disp = self.dec_disp.exp().clamp(*NB_DISP_RANGE)
        return mean, disp


class CellPLMDecoder(nn.Module):
    """Batch-aware negative-binomial MLP decoder (``dec_mod='nbmlp'``).

    After each hidden block a covariate term is added per covariate type: the embedding of
    the cell's label when given, otherwise the SUM of all rows of the embedding table (what
    the reference pipelines use at inference, where no labels are passed).
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

    def forward(
        self, z: torch.Tensor, covariates: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """NB mean ``[N, out_dim]`` and dispersion ``[out_dim]``."""
        h = z
        for block, cov in zip(self.layers, self.covariate_layers):
            h = block(h)
            for name, emb in cov.items():
                label = None if covariates is None else covariates.get(name)
                if label is None:
                    h = h + emb[2](emb[1](emb[0].weight.sum(dim=0, keepdim=True)))
                else:
                    h = h + emb(label.long().reshape(-1))
        return self.out_layer(h)


def pack_sentences(
    h: torch.Tensor, sentence: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Pad the cells of each sentence into ``[S, L, d]`` (cells keep their relative order).

    Returns
    -------
    packed, mask (``None`` when no sentence needs padding), and the flat index of
    every cell in ``packed.view(S * L, d)``.
    """
    _, inverse, counts = torch.unique(sentence, return_inverse=True, return_counts=True)
    n_sent, longest = len(counts), int(counts.max())
    order = torch.argsort(inverse, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(inverse)
    pos[order] = torch.arange(len(inverse), device=h.device) - starts[inverse[order]]
    flat = inverse * longest + pos
    if bool((counts == longest).all()):
        # equal-length sentences need no padding: a plain reshape (and no mask) suffices
        return h[order].view(n_sent, longest, -1), None, flat
    packed = h.new_zeros(n_sent * longest, h.shape[1])
    packed[flat] = h
    mask = torch.zeros(n_sent * longest, dtype=torch.bool, device=h.device)
    mask[flat] = True
    return packed.view(n_sent, longest, -1), mask.view(n_sent, longest), flat


class CellPLMModule(BaseModuleClass):
    """CellPLM network with scvi-tools' ``inference`` / ``generative`` / ``loss`` split.

    Parameters
    ----------
    config
        The architecture.
    spatial_encoding
        Add the 2-D sinusoidal positional encoding (off in the released models).
    """

    def __init__(self, config: CellPLMConfig, spatial_encoding: bool = False) -> None:
        super().__init__()
        c = config
        self.config = c
        self.spatial_encoding = spatial_encoding
        self.embedder = CellPLMEmbedder(c.out_dim, c.enc_hid, c.model_dropout, spatial_encoding)
        self.encoder = FlowformerEncoder(c.enc_hid, c.enc_layers, c.enc_head, c.model_dropout)
        self.pre_latent_norm = _PreLatentNorm(c.enc_hid)
        if c.latent_mod == "vae":
            latent: nn.Module = VAELatent(c.enc_hid, c.post_latent_dim)
        elif c.latent_mod == "gmvae":
            latent = GMVAELatent(
                c.enc_hid, c.post_latent_dim, c.num_clusters, c.lamda, c.w_li, c.w_en
            )
        else:
            latent = _AELatent(c.enc_hid, c.post_latent_dim)
        self.latent = _LatentStack(latent)
        self.decoder = CellPLMDecoder(c)
        # adata.var positions of the genes in the vocabulary, and their vocabulary rows; set by
        # the model from its gene alignment (not part of the state dict: they describe the data).
        #: Cell-type classifier added by ``add_annotation_head`` (fine-tuning).
        self.annotation_head: nn.Module | None = None
        self.register_buffer("var_index", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("vocab_index", torch.zeros(0, dtype=torch.long), persistent=False)

    def set_gene_index(self, var_index: np.ndarray, vocab_index: np.ndarray) -> None:
        """Select the vocabulary genes of the input (``adata.var`` order) and their rows."""
        device = self.embedder.feat_enc.emb.device
        self.var_index = torch.as_tensor(np.asarray(var_index), dtype=torch.long, device=device)
        self.vocab_index = torch.as_tensor(np.asarray(vocab_index), dtype=torch.long, device=device)

    def add_annotation_head(self, n_classes: int) -> None:
        """Add the reference's annotation head for ``n_classes`` cell types.

        ``Linear(enc_hid, post_latent_dim)`` (the ``'ae'`` latent of the reference annotation
        pipeline) -> Dropout -> ``Linear(post_latent_dim, n_classes)``.
        """
        c = self.config
        self.annotation_head = nn.Sequential(
            nn.Linear(c.enc_hid, c.post_latent_dim),
            nn.Dropout(c.model_dropout),
            nn.Linear(c.post_latent_dim, n_classes),
        ).to(self.embedder.feat_enc.emb.device)

    def annotation_logits(
        self,
        x: torch.Tensor,
        sentence: torch.Tensor,
        coords: torch.Tensor | None = None,
        augment: bool = False,
    ) -> torch.Tensor:
        """Class logits of each cell; ``augment`` applies the pretraining input masking."""
        if self.annotation_head is None:
            raise InvalidInputError("No annotation head: call CellPLM.train_annotation first.")
        x_kept = self.kept_counts(x)
        if augment:
            x_kept, _ = self._mask_for_pretraining(x_kept)
        if not (self.spatial_encoding and coords is not None):
            coords = None
        h = self.pre_latent_norm(self.encode(self.embed_cells(x_kept, coords), sentence))
        return self.annotation_head(h)

    # ------------------------------------------------------------------ pieces
    def kept_counts(self, x: torch.Tensor) -> torch.Tensor:
        """Counts of the vocabulary genes, ``[N, n_kept]`` (input gene order).

        ``log1p`` of this is :func:`scfm.data.cellplm_expression_input`; masking for
        pretraining acts on the counts, hence the two steps.
        """
        return x[:, self.var_index].float()

    def embed_cells(self, x_kept: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        """Embedder output (one token per cell) from the counts of the kept genes."""
        return self.embedder(torch.log1p(x_kept), self.vocab_index, coords)

    def encode(self, h: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        """Flowformer over the cells of each sentence; cells of different sentences never mix."""
        packed, mask, flat = pack_sentences(h, sentence)
        out = self.encoder(packed, mask)
        return out.reshape(-1, out.shape[-1])[flat]

    # ------------------------------------------------------------------ scvi-tools API
    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        batch = tensors.get(REGISTRY_KEYS.BATCH_KEY)
        x = tensors[REGISTRY_KEYS.X_KEY]
        sentence = (
            batch.reshape(-1).long()
            if batch is not None
            else torch.zeros(len(x), dtype=torch.long, device=x.device)
        )
        return {"x": x, "sentence": sentence, "coords": tensors.get(SPATIAL_KEY)}

    def _mask_for_pretraining(self, x_kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference "input" masking: returns masked counts and the masked-entry indicator."""
        c = self.config
        n = len(x_kept)
        cells = torch.rand(n, device=x_kept.device) < c.mask_node_rate
        if c.mask_beta:
            beta = 4.0 / c.mask_feature_rate + 2.0 - MASK_BETA_ALPHA
            ratio = torch.distributions.Beta(MASK_BETA_ALPHA, beta).sample((n,)).to(x_kept.device)
            ratio = ratio.clamp(max=MASK_RATIO_CAP)
        else:
            ratio = torch.full((n,), c.mask_feature_rate, device=x_kept.device)
        entries = (torch.rand_like(x_kept) < ratio[:, None]) & cells[:, None] & (x_kept > 0)
        return x_kept.masked_fill(entries, 0.0), entries

    @auto_move_data
    def inference(
        self,
        x: torch.Tensor,
        sentence: torch.Tensor,
        coords: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        coords_normalized: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Cell embeddings of a minibatch of sentences.

        Parameters
        ----------
        x
            ``[N, n_vars]`` raw counts in ``adata.var`` order.
        sentence
            ``[N]`` sentence id of each cell (cells of one id attend to each other).
        coords
            ``[N, 2]`` coordinates; only used with ``spatial_encoding``. Min-max scaled to
            ``[0, 1]`` per sentence here unless ``coords_normalized``.
        noise
            ``[N, num_clusters]`` Gumbel noise for the GMVAE cluster choice (``None``:
            most probable cluster in eval).
        coords_normalized
            ``coords`` are already scaled to ``[0, 1]`` (the model scales them per sample).

        Returns
        -------
        ``z`` (the embedding), the intermediates ``h_embed``, ``h_encoder``, ``h_prelatent``,
        the latent's outputs, and in training ``kept_cells`` / ``masked_entries``.
        """
        out: dict[str, torch.Tensor] = {}
        x_kept = self.kept_counts(x)
        if self.training:
            keep = self._drop_cells(sentence)
            x_kept, sentence = x_kept[keep], sentence[keep]
            coords = None if coords is None else coords[keep]
            out["kept_cells"] = keep
            x_kept, out["masked_entries"] = self._mask_for_pretraining(x_kept)
        if not self.spatial_encoding or coords is None:
            coords = None
        elif not coords_normalized:
            coords = _minmax_per_group(coords.float(), sentence)
        h_embed = self.embed_cells(x_kept, coords)
        h_encoder = self.encode(h_embed, sentence)
        h_pre = self.pre_latent_norm(h_encoder)
        latent = self.latent.head(h_pre, noise=noise)
        out.update(h_embed=h_embed, h_encoder=h_encoder, h_prelatent=h_pre, **latent)
        return out

    def _drop_cells(self, sentence: torch.Tensor) -> torch.Tensor:
        """Indices of the cells kept after the reference's random node dropping."""
        c = self.config
        keep = torch.rand(len(sentence), device=sentence.device) >= c.drop_node_rate
        if not keep.any():
            keep[0] = True
        idx = torch.nonzero(keep).squeeze(1)
        return idx[: c.max_batch_size]

    def _get_generative_input(
        self, tensors: dict[str, torch.Tensor], inference_outputs: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        return {"z": inference_outputs["z"]}

    @auto_move_data
    def generative(
        self, z: torch.Tensor, covariates: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """NB mean over the whole vocabulary (``[N, out_dim]``) and dispersion (``[out_dim]``)."""
        mean, disp = self.decoder(z, covariates)
        return {"mean": mean, "disp": disp}

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict[str, torch.Tensor],
        generative_outputs: dict[str, torch.Tensor],
        gene_mask: torch.Tensor | None = None,
    ) -> LossOutput:
        """Masked NB reconstruction (+ masked-entry term when ``dae``) + latent loss.

        Parameters
        ----------
        tensors, inference_outputs, generative_outputs
            As in scvi-tools.
        gene_mask
            ``[N, n_kept]`` bool: which genes each cell's dataset measured (the reference's
            ``batch_gene_list``); unmeasured genes are left out of the loss and of the
            rescaling. ``None``: all genes count.
        """
        x = self.kept_counts(tensors[REGISTRY_KEYS.X_KEY])
        kept = inference_outputs.get("kept_cells")
        if kept is not None:
            x = x[kept]
            gene_mask = None if gene_mask is None else gene_mask[kept]
        measured = torch.ones_like(x) if gene_mask is None else gene_mask.to(x.dtype)
        x = x * measured  # unmeasured entries count neither in the loss nor in the totals
        masked = inference_outputs.get("masked_entries")
        mean = generative_outputs["mean"][:, self.vocab_index] * measured
        theta = generative_outputs["disp"][self.vocab_index].expand_as(mean)
        cells = masked.any(dim=1) if masked is not None else torch.ones(len(x), dtype=torch.bool)
        if not cells.any():
            cells = torch.ones_like(cells)
        x, mean, theta, measured = x[cells], mean[cells], theta[cells], measured[cells]
        mu = _rescale(mean, x.sum(1)).clamp(min=NB_MEAN_RANGE[0])
        nll = -(NegativeBinomial(mu=mu, theta=theta).log_prob(x) * measured).sum(1)
        recon = nll.mean()
        if self.config.dae and masked is not None:
            m = masked[cells].to(x.dtype) * measured
            target = x * m
            mu_m = _rescale(mean * m, target.sum(1)).clamp(min=NB_MEAN_RANGE[0])
            dae = -(NegativeBinomial(mu=mu_m, theta=theta).log_prob(target) * m).sum(1)
            recon = recon + dae.mean()
        latent_loss = self.latent.head.loss(inference_outputs)
        return LossOutput(
            loss=recon + latent_loss,
            reconstruction_loss=nll,
            extra_metrics={"latent_loss": latent_loss.detach()},
        )


def _rescale(mean: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Scale each row of ``mean`` to sum to ``total`` (the cell's observed count)."""
    return mean / mean.sum(dim=1, keepdim=True).clamp(min=1e-8) * total[:, None]


def _minmax_per_group(coords: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Min-max scale coordinates to [0, 1] within each group (training path)."""
    out = torch.empty_like(coords[:, :2])
    for g in torch.unique(group):
        sel = group == g
        xy = coords[sel, :2]
        lo, hi = xy.min(0).values, xy.max(0).values
        span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
        out[sel] = torch.where(hi > lo, (xy - lo) / span, torch.full_like(xy, 0.5))
    return out
