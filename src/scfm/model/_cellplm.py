"""CellPLM :cite:p:`Wen2024CellPLM` as an scvi-tools model."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin

from scfm.data._cellplm_sentences import (
    batch_labels,
    cellplm_coordinates,
    cellplm_gene_rank,
    cellplm_gumbel_noise,
    cellplm_pack_sentences,
    cellplm_sentence_ids,
    label_codes,
    spatial_tiles,
)
from scfm.data._genes import GeneAlignment, align_genes, strip_version
from scfm.data._loader import GeneSpace
from scfm.data._validation import check_spatial
from scfm.errors import InvalidInputError
from scfm.io._common import load_state_dict_strict
from scfm.model.base import FoundationModelMixin, scfm_dsp
from scfm.module._cellplm import PLAN_KEYS, CellPLMConfig, CellPLMModule
from scfm.nn._spatial_encoding import Sinusoidal2dPE, normalize_coordinates

if TYPE_CHECKING:
    from scvi.data import AnnDataManager


logger = logging.getLogger(__name__)

__all__ = ["CellPLM"]

#: Gradient-norm clip of the reference training pipelines.
GRAD_CLIP = 2.0


class CellPLM(FoundationModelMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """CellPLM: a cell language model whose tokens are cells :cite:p:`Wen2024CellPLM`.

    Every cell becomes one token (the log1p-weighted sum of its genes' embeddings); the cells
    of a *sentence* attend to each other through a Flowformer encoder, so a cell's embedding
    depends on the other cells of its sentence (not on ``batch_size``: minibatches hold whole
    sentences). As in the reference, a sentence is all selected cells of one ``batch_key``
    label, in AnnData order (the reference reads ``obs["batch"]``: pass ``batch_key="batch"``
    for its sentences).

    Options of the calls over cells (``get_latent_representation``, ``embed``,
    ``get_normalized_expression``, ``train``):

    * ``sentence``: ``"batch"`` (reference) or ``"spatial"`` (each label is cut into square
      tiles of ``tile_size`` coordinate units, default ~1000 cells per tile);
    * ``chunk_size``: split each sentence into consecutive chunks of this many cells, like
      the reference's ``inference_config={"batch_size": k}``;
    * ``hidden_layer`` (embeddings): ``None`` = the latent mean; an int reads the Flowformer
      states, Python indexing over (embedder output, layer 1, ..., layer N);
    * ``output`` (embeddings): ``"embedding"``, ``"pre_latent"`` (the LayerNorm'd encoder
      output), and for a GMVAE latent ``"cluster_logits"`` / ``"cluster"`` (one-hot);
    * ``seed`` (GMVAE release 20230926_85M): ``None`` takes each cell's most probable cluster
      (deterministic); an int samples it with Gumbel noise exactly as the reference does after
      ``torch.manual_seed(seed)``;
    * ``rescale`` (decoding): scale the NB mean so the measured genes sum to the cell's total
      (the reference ``ImputationPipeline``); ``False``: the raw NB mean;
    * ``measured_genes`` (decoding, training): ``{batch_key label: genes measured there}``
      (the reference's ``batch_gene_list``) for AnnData objects that concatenate panels;
    * ``mask_node_rate`` (training): share of cells masked (reference imputation: 0.95).

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    config
        :class:`~scfm.module.CellPLMConfig` or a dict with the keys of the original
        ``<prefix>.config.json``; missing keys take the released defaults (1024 wide, 4
        Flowformer layers, GMVAE latent of 512). ``out_dim`` is always ``len(gene_list)``.
    gene_list
        Gene vocabulary (Ensembl ids): column ``j`` of the module's input and output is
        ``gene_list[j]``. ``None`` uses the ids of ``adata`` (pretraining from scratch).
    spatial_encoding
        Add the paper's 2-D sinusoidal encoding of ``obsm[spatial_key]`` (min-max scaled to
        ``[0, 1]`` per ``batch_key`` label, in training and inference alike) to each cell
        token. The released models ran WITHOUT it (their code adds 0, upstream issue #19).

    Examples
    --------
    >>> scfm.model.CellPLM.setup_anndata(adata, batch_key="batch")  # one sentence per sample
    >>> model = scfm.model.CellPLM.from_pretrained("ckpt", adata, prefix="20231027_85M")
    >>> model.embed(adata)  # -> adata.obsm["X_cellplm"]
    """

    _model_name: ClassVar[str] = "cellplm"
    #: Most cells per forward pass; whole sentences are packed up to this size.
    _default_batch_size: ClassVar[int] = 4096
    _has_decoder: ClassVar[bool] = True
    #: the embedder reads only the genes expressed in a minibatch: no (cells, n_vocab) matrix
    _compact_minibatches: ClassVar[bool] = True
    #: Columns the reference reads without being told (``obs["batch"]`` for sentences,
    #: ``obsm["spatial"]``); scfm reads only what ``setup_anndata`` names, and the CLI notes
    #: these when an input has them but they were not named.
    _reference_keys: ClassVar[dict[str, str]] = {"batch_key": "batch", "spatial_key": "spatial"}

    def __init__(
        self,
        adata: ad.AnnData,
        config: CellPLMConfig | Mapping[str, Any] | None = None,
        gene_list: Sequence[str] | None = None,
        spatial_encoding: bool = False,
    ) -> None:
        super().__init__(adata)
        if gene_list is None:
            key = self.setup_args.get("gene_id_key")
            ids = adata.var_names if key is None else adata.var[key].astype(str)
            gene_list = list(dict.fromkeys(strip_version(ids)))
        self._vocabulary = pd.Index([str(g) for g in gene_list], name="gene_id")
        raw = config.to_dict() if isinstance(config, CellPLMConfig) else dict(config or {})
        self.config = CellPLMConfig.from_dict({**raw, "out_dim": len(self._vocabulary)})
        if spatial_encoding and self.setup_args.get("spatial_key") is None:
            raise InvalidInputError("spatial_encoding=True needs setup_anndata(spatial_key=...).")
        self.module = CellPLMModule(self.config, spatial_encoding=spatial_encoding)
        self.init_params_ = self._get_init_params(locals())

    @classmethod
    @scfm_dsp.dedent
    def setup_anndata(
        cls,
        adata: ad.AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        gene_id_key: str | None = None,
        spatial_key: str | None = None,
        allow_non_integer: bool = False,
        check_gene_overlap: bool = True,
        **kwargs: Any,
    ) -> None:
        """Register an AnnData of RAW counts (CellPLM applies only ``log1p``).

        Parameters
        ----------
        adata
            AnnData of raw counts (cells x genes).
        %(param_layer)s
        batch_key
            ``adata.obs`` column whose labels define the sentences (sample, or field of view
            for spatial data); the reference reads ``"batch"``. ``None``: all cells form one
            sentence (no column is read unless named).
        %(param_labels_key)s
        %(param_gene_id_key)s
        spatial_key
            ``adata.obsm`` key of ``(n_cells, 2)`` coordinates, read for
            ``sentence="spatial"`` and ``spatial_encoding`` (e.g. ``"spatial"``); it must
            exist. ``None``: no coordinates.
        %(param_allow_non_integer)s
        %(param_check_gene_overlap)s
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.
        """
        if spatial_key is not None:
            check_spatial(adata, spatial_key, required=True)
        setup_method_args = cls._get_setup_method_args(**locals())
        cls._register_anndata(
            adata,
            setup_method_args,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            gene_id_key=gene_id_key,
            allow_non_integer=allow_non_integer,
            check_gene_overlap=check_gene_overlap,
            **kwargs,
        )

    @classmethod
    def _setup_like(cls, adata: ad.AnnData, setup_args: dict[str, Any]) -> AnnDataManager:
        """Set up a query like the model's AnnData; coordinates it lacks are left out.

        Only ``sentence="spatial"`` and ``spatial_encoding`` read them, and those then ask for
        a ``spatial_key``.
        """
        key = setup_args.get("spatial_key")
        if key is not None and key not in adata.obsm:
            logger.info("The AnnData has no adata.obsm[%r]; inference does not need it.", key)
            setup_args = {**setup_args, "spatial_key": None}
        return super()._setup_like(adata, setup_args)

    @classmethod
    def _from_pretrained(
        cls,
        path: Path,
        adata: ad.AnnData,
        prefix: str | None = None,
        spatial_encoding: bool = False,
        trust_checkpoint: bool = False,
    ) -> CellPLM:
        """Read ``<prefix>.config.json`` + ``<prefix>.best.ckpt``.

        Options: ``prefix`` (e.g. ``"20231027_85M"``, VAE latent, or ``"20230926_85M"``,
        GMVAE latent; a folder with several releases gives the newest), ``spatial_encoding``
        (see the class) and ``trust_checkpoint`` (allow full unpickling of a trusted file).
        """
        from scfm.io._cellplm import read_cellplm_release

        release = read_cellplm_release(path, prefix, trust_checkpoint=trust_checkpoint)
        genes = release.vocabulary
        config = CellPLMConfig.from_dict({"out_dim": len(genes), **release.config})
        config.check_weights(release.state_dict)
        # The module is built without memory (meta device) and takes the release's tensors
        # as they are (assign): the weights are held once (not a random initialisation plus
        # the file's copy), so loading peaks at one copy of the weights.
        with torch.device("meta"):
            model = cls(
                adata,
                config=config.to_dict(),
                gene_list=list(genes),
                spatial_encoding=spatial_encoding,
            )
        # computed (frequencies) or optional (missing_pe) tensors start as in a new module
        model.module.embedder.pe_enc = Sinusoidal2dPE(config.enc_hid)
        what = str(release.files["weights"])
        # tensors the module never uses (the release's 10,000 x 1,024 positional table) are
        # freed before loading, not held alongside the weights
        unused = [re.compile(p) for p in CellPLMModule._keys_to_ignore_on_load_unexpected]
        weights = release.state_dict
        for key in [k for k in weights if any(p.search(k) for p in unused)]:
            del weights[key]
        # read_cellplm_state_dict checked the weights, not holding them all (mapped file)
        load_state_dict_strict(model.module, weights, what=what, assign=True, check_finite=False)
        logger.info("Loaded CellPLM %s (latent %s).", release.files["weights"], config.latent_mod)
        return model

    # ------------------------------------------------------------------ genes
    @property
    def vocabulary(self) -> pd.Index:
        """The config's ``gene_list``: column ``j`` of the module's input is gene ``j``."""
        return self._vocabulary

    def _align_genes(self, adata: ad.AnnData) -> GeneAlignment:
        key = self._setup_args_of(adata).get("gene_id_key")
        return align_genes(
            adata.var, self._vocabulary, id_type="ensembl", gene_id_key=key, model_name="CellPLM"
        )

    def _static_gene_embeddings(self) -> pd.DataFrame:
        """Rows of ``embedder.feat_enc.emb``: cells, not genes, are CellPLM's tokens."""
        emb = self.module.embedder.feat_enc.emb.detach().float().cpu().numpy()
        return pd.DataFrame(emb, index=self._vocabulary).sort_index()

    # ------------------------------------------------------------------ per-call plans
    def _inference_kwargs(self, task: str, **options: Any) -> dict[str, Any]:
        o = self.module.check_options(task, **options)
        if task == "latent":
            return {"hidden_layer": o["hidden_layer"], "output": o["output"]}
        if task == "expression":
            return {"decode": True, "rescale": o["rescale"]}
        return {}

    def _cell_plan(
        self, adata: ad.AnnData, cells: np.ndarray, task: str, **options: Any
    ) -> dict[str, Any]:
        """Sentence ids, gene ranks, and (when used) coordinates, noise and mask rates."""
        o = self.module.check_options(task, **options)
        alignment, _ = self._gene_space(adata)
        args = self._setup_args_of(adata)
        labels = batch_labels(adata, args.get("batch_key"))
        groups = label_codes(labels[cells])
        tiles = None
        if o["sentence"] == "spatial":
            xy = cellplm_coordinates(adata, args.get("spatial_key"))
            tiles = spatial_tiles(xy[cells], groups, o["tile_size"])
        # training keeps at most max_batch_size cells of a sentence together (reference cap)
        chunk = o["chunk_size"] or (self.config.max_batch_size if task == "train" else None)
        sentence = cellplm_sentence_ids(groups, tiles, chunk)
        plan: dict[str, Any] = {
            PLAN_KEYS["sentence"]: sentence,
            PLAN_KEYS["gene_rank"]: cellplm_gene_rank(
                alignment, adata.var_names, self._vocabulary, labels, cells, o.get("measured_genes")
            ),
        }
        if self.module.spatial_encoding:
            xy = normalize_coordinates(cellplm_coordinates(adata, args.get("spatial_key")), labels)
            plan[PLAN_KEYS["coords"]] = xy[cells]
        if o.get("seed") is not None and self.config.latent_mod == "gmvae":
            gen = torch.Generator().manual_seed(int(o["seed"]))
            k, z = self.config.num_clusters, self.config.post_latent_dim
            plan[PLAN_KEYS["noise"]] = cellplm_gumbel_noise(sentence, k, z, gen).numpy()
        if o.get("mask_node_rate") is not None:
            plan[PLAN_KEYS["mask_rate"]] = np.full(len(cells), o["mask_node_rate"], np.float32)
        return plan

    def _minibatch_groups(
        self,
        adata: ad.AnnData,
        cells: np.ndarray,
        batch_size: int,
        plan: dict[str, Any],
        space: GeneSpace,
    ) -> list[np.ndarray]:
        """Whole sentences (feeding order) packed into minibatches of at most ``batch_size``."""
        sentence = plan[PLAN_KEYS["sentence"]]
        largest = int(np.bincount(sentence).max())
        if largest > batch_size:
            logger.warning(
                "A CellPLM sentence holds %d cells (> batch_size=%d) and is processed in one "
                "pass, as in the reference. To bound memory pass chunk_size=... or "
                "sentence='spatial' (this changes the embeddings).",
                largest,
                batch_size,
            )
        return cellplm_pack_sentences(sentence, batch_size)

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        *,
        measured_genes: Mapping[str, Sequence[str]] | None = None,
        mask_node_rate: float | None = None,
        chunk_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        """Pretrain (or fine-tune for imputation) with CellPLM's masked-expression objective.

        Per sentence a random ``drop_node_rate`` share of cells is dropped, a
        ``mask_node_rate`` share of the rest is masked (a Beta-distributed share of their
        expressed genes set to 0), and the loss is the NB reconstruction of the masked cells
        (plus the masked-entry term) plus the latent loss. Sentences hold at most
        ``config.max_batch_size`` cells (or ``chunk_size``). Reference imputation
        fine-tuning (``ImputationPipeline.fit``): ``measured_genes=...``,
        ``mask_node_rate=0.95``, ``plan_kwargs={"lr": 5e-4, "weight_decay": 1e-6}``.

        Parameters
        ----------
        max_epochs
            Passes over the training cells.
        measured_genes
            ``{batch_key label: measured genes}``: unmeasured (zero-filled) genes are left
            out of the loss; ``None``: every AnnData gene everywhere.
        mask_node_rate
            Share of cells masked per sentence; ``None``: the config's (0.75).
        chunk_size
            Cells per training sentence; ``None``: ``config.max_batch_size``.
        **kwargs
            Passed to :meth:`~scfm.model.base.FoundationModelMixin.train` (``batch_size``,
            ``plan_kwargs``, ``train_size``, ``accelerator``, ...); the gradient norm is
            clipped at 2.0 as in the reference unless ``gradient_clip_val`` is given.
        """
        options = {"measured_genes": measured_genes, "mask_node_rate": mask_node_rate}
        options = {k: v for k, v in {**options, "chunk_size": chunk_size}.items() if v is not None}
        plan = self._cell_plan(self.adata, np.arange(self.adata.n_obs), "train", **options)
        # The splitter plans the training / validation cells without options; the arrays
        # these options change ride along as per-cell arrays over the whole AnnData instead.
        changed = {
            "chunk_size": "sentence",
            "measured_genes": "gene_rank",
            "mask_node_rate": "mask_rate",
        }
        arrays = {PLAN_KEYS[changed[k]]: plan[PLAN_KEYS[changed[k]]] for k in options}
        splitter = {**(kwargs.pop("datasplitter_kwargs", None) or {}), "cell_arrays": arrays}
        kwargs.setdefault("gradient_clip_val", GRAD_CLIP)
        super().train(max_epochs, datasplitter_kwargs=splitter, **kwargs)
