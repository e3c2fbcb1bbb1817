"""CellPLM :cite:p:`Wen2024CellPLM` as an scvi-tools model."""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scvi import REGISTRY_KEYS
from scvi.data.fields import ObsmField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin

from scfm.data._cellplm_sentences import (
    cellplm_gumbel_noise,
    cellplm_pack_sentences,
    cellplm_sentence_ids,
    label_codes,
    spatial_tiles,
)
from scfm.data._genes import align_genes, strip_version
from scfm.data._validation import check_spatial
from scfm.errors import InvalidInputError, SpatialCoordinateError
from scfm.model.base import FoundationModelMixin
from scfm.module._cellplm import SPATIAL_KEY, CellPLMConfig, CellPLMModule
from scfm.nn._spatial_encoding import normalize_coordinates

logger = logging.getLogger(__name__)

#: Gradient-norm clip of the reference fine-tuning pipelines.
GRAD_CLIP = 2.0

__all__ = ["CellPLM"]

Sentence = Literal["batch", "spatial"]
Layer = Literal["latent", "embedder", "encoder", "pre_latent", "cluster_logits", "cluster"]

#: Default ``batch_key`` / ``spatial_key``: the reference reads ``obs["batch"]`` for sentences.
DEFAULT_BATCH_KEY = "batch"
DEFAULT_SPATIAL_KEY = "spatial"


class CellPLM(FoundationModelMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """CellPLM: a cell language model whose tokens are cells :cite:p:`Wen2024CellPLM`.

    Every cell becomes one token (the log1p-weighted sum of its genes' embeddings). The
    cells of a *sentence* attend to each other through a Flowformer encoder, so a cell's
    embedding depends on the other cells of its sentence. As in the reference, a sentence is
    all cells of one ``batch_key`` label (in AnnData order); use the ``chunk_size`` /
    ``sentence`` options of :meth:`get_latent_representation` to bound sentence size.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    config
        Architecture, with the keys of the original ``<prefix>.config.json`` (see
        :class:`~scfm.module.CellPLMConfig`); missing keys take the released defaults
        (1024 wide, 4 Flowformer layers, GMVAE latent of 512). ``out_dim`` is always
        ``len(gene_list)``.
    gene_list
        Gene vocabulary (Ensembl ids); position = row of the gene embedding and column of the
        decoder. ``None`` uses the ids of ``adata`` (pretraining from scratch).
    spatial_encoding
        Add the paper's 2-D sinusoidal positional encoding of ``obsm[spatial_key]`` to each
        cell token. The released models were used WITHOUT it (upstream code adds 0), so keep
        ``False`` for them; ``True`` is for models trained with it. Coordinates are min-max
        scaled to ``[0, 1]`` per ``batch_key`` label.
    annotation_classes
        Cell-type names of a fine-tuned annotation head (set by :meth:`train_annotation`;
        needed so that ``save`` / ``load`` rebuild the head).

    Examples
    --------
    >>> scfm.model.CellPLM.setup_anndata(adata)  # raw counts, obs["batch"] = sample / FOV
    >>> model = scfm.model.CellPLM.from_pretrained("ckpt", adata, prefix="20231027_85M")
    >>> adata.obsm["X_cellplm"] = model.get_latent_representation()
    """

    _model_name: ClassVar[str] = "cellplm"
    #: Cells per forward pass; whole sentences are packed up to this size.
    _default_batch_size: ClassVar[int] = 4096
    _has_gene_embeddings: ClassVar[bool] = True
    #: Coordinates are only read for spatial_encoding / sentence="spatial" (checked there).
    _query_optional_fields: ClassVar[dict[str, str]] = {
        **FoundationModelMixin._query_optional_fields,
        SPATIAL_KEY: "spatial_key",
    }

    def __init__(
        self,
        adata: ad.AnnData,
        config: dict[str, Any] | None = None,
        gene_list: Sequence[str] | None = None,
        spatial_encoding: bool = False,
        annotation_classes: Sequence[str] | None = None,
    ) -> None:
        super().__init__(adata)
        gene_id_key = self.setup_args.get("gene_id_key")
        if gene_list is None:
            ids = adata.var_names if gene_id_key is None else adata.var[gene_id_key].astype(str)
            gene_list = list(dict.fromkeys(strip_version(ids)))
        gene_list = [str(g) for g in gene_list]
        parsed = CellPLMConfig.from_dict({**(config or {}), "out_dim": len(gene_list)})
        if spatial_encoding and self.setup_args.get("spatial_key") is None:
            raise InvalidInputError(
                "spatial_encoding=True needs coordinates: call CellPLM.setup_anndata(adata, "
                "spatial_key='<obsm key>') first."
            )
        self.gene_list = gene_list
        self.config = parsed
        self.module = CellPLMModule(parsed, spatial_encoding=spatial_encoding)
        if annotation_classes is not None:
            annotation_classes = [str(c) for c in annotation_classes]
            self.module.add_annotation_head(len(annotation_classes))
        self.annotation_classes = annotation_classes
        alignment = align_genes(
            adata.var, gene_list, id_type="ensembl", gene_id_key=gene_id_key, model_name="CellPLM"
        )
        self.module.set_gene_index(alignment.var_index, alignment.vocab_index)
        self._set_gene_alignment(adata, alignment)
        self._sentence_request: dict[str, Any] = {}
        self._pending: deque[dict[str, Any]] = deque()
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(
        cls,
        adata: ad.AnnData,
        layer: str | None = None,
        batch_key: str | None = DEFAULT_BATCH_KEY,
        labels_key: str | None = None,
        gene_id_key: str | None = None,
        spatial_key: str | None = DEFAULT_SPATIAL_KEY,
        **kwargs: Any,
    ) -> None:
        """Register an AnnData of raw counts with CellPLM.

        Parameters
        ----------
        adata
            AnnData of RAW counts (CellPLM applies only ``log1p``; normalised input is refused).
        layer
            Layer with the raw counts; ``None`` uses ``adata.X``.
        batch_key
            ``adata.obs`` column whose labels define the sentences (sample, or field of view for
            spatial data). The default ``"batch"`` is the column the reference reads; if it does
            not exist all cells form one sentence. ``None``: one sentence.
        labels_key
            ``adata.obs`` column of cell-type labels (for :meth:`train_annotation`).
        gene_id_key
            ``adata.var`` column of Ensembl ids; ``None`` uses ``var_names`` (symbols are
            converted with the bundled GENCODE table).
        spatial_key
            ``adata.obsm`` key of ``(n_cells, 2)`` coordinates. The default ``"spatial"`` is
            registered when present and skipped otherwise; an explicit other key must exist.
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.

        Notes
        -----
        Writes only scvi-tools' registration keys (``adata.uns["_scvi_uuid"]``,
        ``adata.uns["_scvi_manager_uuid"]``, ``adata.obs["_scvi_batch"]``,
        ``adata.obs["_scvi_labels"]``).
        """
        if batch_key == DEFAULT_BATCH_KEY and batch_key not in adata.obs.columns:
            logger.info("adata.obs has no 'batch' column: all cells form one CellPLM sentence.")
            batch_key = None
        if spatial_key is not None and not check_spatial(
            adata, spatial_key, required=spatial_key != DEFAULT_SPATIAL_KEY
        ):
            spatial_key = None
        setup_method_args = cls._get_setup_method_args(**locals())
        cls._register_anndata(
            adata,
            setup_method_args,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            gene_id_key=gene_id_key,
            extra_fields=[ObsmField(SPATIAL_KEY, spatial_key)] if spatial_key else [],
            **kwargs,
        )

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        adata: ad.AnnData,
        prefix: str | None = None,
        *,
        spatial_encoding: bool = False,
        trust_checkpoint: bool = False,
    ) -> CellPLM:
        """Load a released CellPLM checkpoint (``<prefix>.config.json`` + ``<prefix>.best.ckpt``).

        Parameters
        ----------
        path
            Directory of the checkpoint files, or ``<directory>/<prefix>``, or one of the files.
        adata
            AnnData registered with :meth:`setup_anndata`.
        prefix
            Release prefix, e.g. ``"20231027_85M"`` (VAE latent) or ``"20230926_85M"``
            (GMVAE latent); may be omitted when the directory holds one model.
        spatial_encoding
            Switch on the 2-D positional encoding (see the class docstring); the released
            models were run without it.
        trust_checkpoint
            Allow full unpickling if the ``.best.ckpt`` holds Python objects (only for
            files from a trusted source).

        Returns
        -------
        The model in eval mode.
        """
        from scfm.io._cellplm import find_cellplm_checkpoint

        config_path, _ = find_cellplm_checkpoint(path, prefix)
        prefix = config_path.name[: -len(".config.json")]
        model = super().from_pretrained(
            config_path.parent,
            adata,
            prefix=prefix,
            spatial_encoding=spatial_encoding,
            trust_checkpoint=trust_checkpoint,
        )
        # name the release, not just its folder, in the summary and provenance records
        model._checkpoint_path = str(config_path.parent / prefix)
        model._refresh_summary()
        return model

    @classmethod
    def _from_pretrained(
        cls,
        path,
        adata: ad.AnnData,
        prefix: str | None = None,
        spatial_encoding: bool = False,
        trust_checkpoint: bool = False,
    ) -> CellPLM:
        from scfm.io._cellplm import (
            find_cellplm_checkpoint,
            load_cellplm_weights,
            read_cellplm_config,
            read_cellplm_state_dict,
        )

        config_path, ckpt_path = find_cellplm_checkpoint(path, prefix)
        raw, genes = read_cellplm_config(config_path)
        config = CellPLMConfig.from_dict(raw).to_dict()
        state = read_cellplm_state_dict(ckpt_path, trust_checkpoint=trust_checkpoint)
        model = cls(adata, config=config, gene_list=genes, spatial_encoding=spatial_encoding)
        load_cellplm_weights(model.module, state, what=str(ckpt_path))
        logger.info("Loaded CellPLM %s (latent %s).", ckpt_path.name, model.config.latent_mod)
        return model

    # ------------------------------------------------------------------ sentences
    def _batch_column(self, adata: ad.AnnData) -> str | None:
        """The setup's ``batch_key`` if ``adata`` has it; a query without it is one group."""
        batch_key = self.setup_args.get("batch_key")
        return batch_key if batch_key in adata.obs.columns else None

    def _sentence_ids(self, adata: ad.AnnData, cells: np.ndarray) -> np.ndarray:
        """Sentence of each cell of ``cells``, numbered in the reference's feeding order."""
        req = self._sentence_request
        mode = req.get("sentence", "batch")
        if mode not in ("batch", "spatial"):
            raise InvalidInputError(
                f"sentence={mode!r} is not supported; use 'batch' or 'spatial'."
            )
        batch_key = self._batch_column(adata)
        groups = (
            np.zeros(len(cells), dtype=np.int64)
            if batch_key is None
            else label_codes(adata.obs[batch_key].iloc[cells])
        )
        tiles = None
        if mode == "spatial":
            coords = self._coordinates(adata, cells, normalize=False)
            tiles = spatial_tiles(coords, groups, req.get("tile_size"))
        return cellplm_sentence_ids(groups, tiles, req.get("chunk_size"))

    def _coordinates(self, adata: ad.AnnData, cells: np.ndarray, normalize: bool) -> np.ndarray:
        key = self.setup_args.get("spatial_key")
        if key is None:
            raise InvalidInputError(
                "This needs coordinates: call CellPLM.setup_anndata(adata, spatial_key=...)."
            )
        if key not in adata.obsm:
            raise SpatialCoordinateError(
                f"This needs the cells' coordinates, and adata.obsm has no {key!r} (the model's "
                f"spatial_key). Add them as adata.obsm[{key!r}] (n_cells x 2)."
            )
        coords = np.asarray(adata.obsm[key], dtype=np.float64)[cells, :2]
        if not normalize:
            return coords
        batch_key = self._batch_column(adata)
        groups = (
            np.asarray(adata.obs[batch_key].astype(str))[cells]
            if batch_key is not None
            else np.zeros(len(cells))
        )
        return normalize_coordinates(coords, groups)

    def _minibatch_indices(
        self, adata: ad.AnnData, indices: np.ndarray, batch_size: int
    ) -> list[np.ndarray]:
        """Pack whole sentences (feeding order) into minibatches of at most ``batch_size`` cells.

        A sentence larger than ``batch_size`` forms its own minibatch (splitting it would
        change the embeddings; use ``chunk_size`` for that). Per-minibatch sentence ids,
        Gumbel noise and coordinates are queued for :meth:`_latent_minibatch`.
        """
        req = self._sentence_request
        sentence = self._sentence_ids(adata, indices)
        noise = None
        if req.get("sample"):
            seed = req.get("seed")
            gen = None if seed is None else torch.Generator().manual_seed(seed)
            c = self.config
            noise = cellplm_gumbel_noise(sentence, c.num_clusters, c.post_latent_dim, gen)
        coords = None
        if self.module.spatial_encoding:
            coords = self._coordinates(adata, indices, normalize=True)
        measured = req.get("measured_genes")
        if measured is not None:
            measured = self._measured_mask(adata, indices, measured)
        groups = cellplm_pack_sentences(sentence, batch_size)
        largest = int(np.bincount(sentence).max()) if len(sentence) else 0
        if largest > batch_size:
            logger.warning(
                "A CellPLM sentence holds %d cells (> batch_size=%d) and is processed in one "
                "pass, as in the reference. To bound memory pass chunk_size=... or "
                "sentence='spatial' (this changes the embeddings).",
                largest,
                batch_size,
            )
        self._pending.clear()
        out = []
        for pos in groups:  # positions in ``indices``, AnnData order
            self._pending.append(
                {
                    "n": len(pos),
                    "sentence": torch.as_tensor(sentence[pos]),
                    "noise": None if noise is None else noise[torch.as_tensor(pos)],
                    "coords": None if coords is None else torch.as_tensor(coords[pos]),
                    "measured": None if measured is None else torch.as_tensor(measured[pos]),
                }
            )
            out.append(indices[pos])
        return out

    def _measured_mask(
        self, adata: ad.AnnData, cells: np.ndarray, measured_genes: Mapping[str, Sequence[str]]
    ) -> np.ndarray:
        """``[cells, kept genes]`` bool: genes measured in each cell's ``batch_key`` group."""
        batch_key = self._batch_column(adata)
        if batch_key is None:
            raise InvalidInputError(
                "measured_genes is keyed by batch_key labels, and this AnnData has no batch_key "
                "column: call CellPLM.setup_anndata(adata, batch_key=...) so that each dataset / "
                "sample has its own label."
            )
        labels = np.asarray(adata.obs[batch_key].astype(str))[cells]
        unknown = set(map(str, measured_genes)) - set(labels)
        if unknown:
            raise InvalidInputError(
                f"measured_genes has labels not in adata.obs[{batch_key!r}] among these cells: "
                f"{', '.join(sorted(unknown)[:5])}."
            )
        kept = np.asarray(adata.var_names[self.gene_alignment.var_index])
        mask = np.ones((len(cells), len(kept)), dtype=bool)
        for label, genes in measured_genes.items():
            rows = labels == str(label)
            mask[rows] = np.isin(kept, np.asarray(list(genes), dtype=str))[None, :]
        return mask

    def _next_pending(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        x = tensors[REGISTRY_KEYS.X_KEY]
        if not self._pending or self._pending[0]["n"] != len(x):
            raise RuntimeError("CellPLM minibatches must come from _minibatch_indices.")
        return self._pending.popleft()

    def _forward(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        plan = self._next_pending(tensors)
        device = self.module.device
        return self.module.inference(
            tensors[REGISTRY_KEYS.X_KEY].to(device),
            plan["sentence"].to(device),
            coords=None if plan["coords"] is None else plan["coords"].to(device),
            noise=None if plan["noise"] is None else plan["noise"].to(device),
            coords_normalized=True,
        )

    def _run_with_sentences(
        self, fn, sentence, chunk_size, tile_size, sample, seed, measured_genes=None, **kw
    ):
        if sample and self.config.latent_mod != "gmvae":
            logger.info(
                "sample=True has no effect: the %s latent is deterministic.", self.config.latent_mod
            )
        self._sentence_request = {
            "sentence": sentence,
            "chunk_size": chunk_size,
            "tile_size": tile_size,
            "sample": sample and self.config.latent_mod == "gmvae",
            "seed": seed,
            "measured_genes": measured_genes,
        }
        try:
            return fn(**kw)
        finally:
            self._sentence_request = {}
            self._pending.clear()

    # ------------------------------------------------------------------ embeddings
    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        *,
        sentence: Sentence = "batch",
        chunk_size: int | None = None,
        tile_size: float | None = None,
        sample: bool = False,
        seed: int | None = None,
        layer: Layer = "latent",
        progress_bar: bool = True,
    ) -> np.ndarray:
        """Cell embeddings (the latent mean), rows in the order of ``indices``.

        Parameters
        ----------
        adata
            AnnData set up like the model's; ``None`` uses the model's AnnData.
        indices
            Cells to embed; sentences are formed among these cells only.
        batch_size
            Most cells per forward pass; whole sentences are packed together (default 4096).
        sentence
            ``"batch"`` (reference): one sentence per ``batch_key`` label. ``"spatial"``:
            within each label, cells are grouped into square tiles of ``tile_size``
            coordinate units, so a large tissue section is not one giant sentence.
        chunk_size
            Split each sentence into consecutive chunks of this many cells (AnnData order),
            like the reference's ``inference_config={"batch_size": k}``. ``None``: no split.
        tile_size
            Side of a spatial tile; ``None`` picks it so a tile holds ~1000 cells on average.
        sample
            GMVAE only: choose each cell's cluster by Gumbel sampling like the reference
            (stochastic) instead of the most probable cluster (default, deterministic).
        seed
            With ``sample=True``: seed of the noise; ``seed=s`` reproduces the reference run
            after ``torch.manual_seed(s)``. ``None`` draws from torch's global RNG.
        layer
            ``"latent"`` (embedding), or the intermediates ``"embedder"``, ``"encoder"``,
            ``"pre_latent"``; GMVAE also ``"cluster_logits"`` and ``"cluster"`` (one-hot).
        progress_bar
            Show a progress bar.

        Returns
        -------
        ``(n_cells, post_latent_dim)`` array (or the width of the chosen ``layer``).
        """
        return self._run_with_sentences(
            super().get_latent_representation,
            sentence,
            chunk_size,
            tile_size,
            sample,
            seed,
            adata=adata,
            indices=indices,
            batch_size=batch_size,
            progress_bar=progress_bar,
            layer=layer,
        )

    _LAYER_KEYS: ClassVar[dict[str, str]] = {
        "latent": "z",
        "embedder": "h_embed",
        "encoder": "h_encoder",
        "pre_latent": "h_prelatent",
        "cluster_logits": "logits",
        "cluster": "y",
    }

    def _latent_minibatch(
        self, tensors: dict[str, torch.Tensor], layer: Layer = "latent", **_: Any
    ) -> torch.Tensor:
        if layer not in self._LAYER_KEYS:
            raise InvalidInputError(f"layer={layer!r}; use one of {', '.join(self._LAYER_KEYS)}.")
        out = self._forward(tensors)
        key = self._LAYER_KEYS[layer]
        if key not in out:
            raise InvalidInputError(f"layer={layer!r} needs a GMVAE latent (latent_mod='gmvae').")
        return out[key]

    def _gene_embedding_minibatch(
        self, tensors: dict[str, torch.Tensor], **_: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the gene-embedding matrix of the genes expressed in each cell.

        CellPLM's gene embeddings are context-free (cells, not genes, are the tokens), so the
        per-gene average is the gene's row of ``embedder.feat_enc.emb``.
        """
        self._next_pending(tensors)
        x = self.module.kept_counts(tensors[REGISTRY_KEYS.X_KEY].to(self.module.device))
        _, gene = torch.nonzero(x > 0, as_tuple=True)
        ids = self.module.vocab_index[gene]
        return ids, self.module.embedder.feat_enc.emb[ids]

    def get_gene_embeddings(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        *,
        progress_bar: bool = True,
    ) -> pd.DataFrame:
        """Learned gene embeddings of the genes expressed in the selected cells.

        CellPLM's gene embeddings are context-free (cells are the tokens), so each row is the
        gene's row of the gene-embedding matrix. Parameters as in
        :meth:`~scfm.model.base.FoundationModelMixin.get_gene_embeddings`.
        """
        return self._run_with_sentences(
            super().get_gene_embeddings,
            "batch",
            None,
            None,
            False,
            None,
            adata=adata,
            indices=indices,
            batch_size=batch_size,
            progress_bar=progress_bar,
        )

    def _vocab_names(self) -> Sequence[str]:
        return self.gene_list

    # ------------------------------------------------------------------ expression
    @torch.inference_mode()
    def get_imputed_expression(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        genes: Sequence[str] | Literal["input", "vocabulary"] = "input",
        batch_size: int | None = None,
        *,
        rescale: bool = True,
        sentence: Sentence = "batch",
        chunk_size: int | None = None,
        tile_size: float | None = None,
        sample: bool = False,
        seed: int | None = None,
        measured_genes: Mapping[str, Sequence[str]] | None = None,
        progress_bar: bool = True,
    ) -> pd.DataFrame:
        """Denoised / imputed expression from the negative-binomial decoder.

        The decoder predicts the NB mean of every vocabulary gene; as in the reference
        ``ImputationPipeline``, it is rescaled per cell so that the input's vocabulary genes sum
        to the cell's observed total (count scale).

        Parameters
        ----------
        adata
            AnnData set up like the model's; ``None`` uses the model's AnnData.
        indices
            Cells; ``None`` uses all.
        genes
            ``"input"``: the input genes found in the vocabulary (``adata.var`` order);
            ``"vocabulary"``: every vocabulary gene (including genes the input lacks, e.g. for
            spatial imputation); or a list of gene ids (input names or vocabulary ids).
        batch_size, sentence, chunk_size, tile_size, sample, seed, progress_bar
            As in :meth:`get_latent_representation`.
        rescale
            Rescale to the observed totals (``False``: the raw NB mean).
        measured_genes
            ``{batch_key label: genes measured there}`` (the reference's ``batch_gene_list``),
            for AnnData objects that concatenate panels: each cell is rescaled over the genes
            its dataset measured only (zero-filled unmeasured genes do not count).
            ``None``: every input gene counts as measured.

        Returns
        -------
        DataFrame of cells (``obs_names``) x genes.
        """
        adata = self._validate_anndata(adata)
        columns, names = self._gene_columns(adata, genes)
        cells, inverse = self._resolve_indices(adata, indices)
        self.module.eval()

        def run(**_: Any) -> np.ndarray:
            out = np.zeros((len(cells), len(columns)), dtype=np.float32)
            for positions, tensors in self._iterate(
                adata, cells, batch_size, "cellplm imputation", progress_bar
            ):
                measured = self._pending[0]["measured"] if self._pending else None
                inf = self._forward(tensors)
                mean = self.module.generative(inf["z"])["mean"]
                if rescale:
                    x = self.module.kept_counts(tensors[REGISTRY_KEYS.X_KEY].to(mean.device))
                    pred = mean[:, self.module.vocab_index]
                    if measured is not None:
                        measured = measured.to(pred.device, pred.dtype)
                        pred, x = pred * measured, x * measured
                    mean = mean * (x.sum(1) / pred.sum(1).clamp(min=1e-12))[:, None]
                out[positions] = mean[:, torch.as_tensor(columns)].cpu().numpy()
            return out

        values = self._run_with_sentences(
            run, sentence, chunk_size, tile_size, sample, seed, measured_genes
        )
        return pd.DataFrame(
            values[inverse], index=adata.obs_names[cells][inverse], columns=pd.Index(names)
        )

    def _gene_columns(
        self, adata: ad.AnnData, genes: Sequence[str] | str
    ) -> tuple[np.ndarray, list[str]]:
        """Decoder columns and output names for ``genes``."""
        alignment = self.gene_alignment
        if isinstance(genes, str) and genes == "input":
            return alignment.vocab_index, list(adata.var_names[alignment.var_index])
        if isinstance(genes, str) and genes == "vocabulary":
            return np.arange(len(self.gene_list)), list(self.gene_list)
        if isinstance(genes, str):
            raise InvalidInputError(
                f"genes={genes!r}; pass 'input', 'vocabulary' or a list of gene ids."
            )
        var_pos = {
            g: alignment.vocab_index[i] for i, g in enumerate(adata.var_names[alignment.var_index])
        }
        vocab_pos = {g: i for i, g in enumerate(self.gene_list)}
        cols, missing = [], []
        for g in genes:
            col = var_pos.get(g, vocab_pos.get(str(strip_version([g])[0])))
            (missing.append(g) if col is None else cols.append(col))
        if missing:
            raise InvalidInputError(
                f"{len(missing)} genes are neither input genes in the CellPLM vocabulary nor "
                f"vocabulary ids (e.g. {', '.join(map(str, missing[:3]))}). Use Ensembl ids of "
                "the model's gene_list."
            )
        return np.asarray(cols, dtype=np.int64), [str(g) for g in genes]

    # ------------------------------------------------------------------ training
    def train(self, *args: Any, **kwargs: Any) -> Any:
        """Pretrain with CellPLM's masked-expression objective (scvi-tools ``train``).

        Cells of each minibatch are grouped into sentences by ``batch_key``; per sentence a
        random 30% of cells is dropped, 75% of the rest are masked (a Beta-distributed share
        of their expressed genes set to 0), and the loss is the NB reconstruction of the masked
        cells (plus the masked-entry term) plus the latent loss. Arguments are those of
        :meth:`scvi.model.base.UnsupervisedTrainingMixin.train` (``max_epochs``,
        ``batch_size``, ``plan_kwargs``, ``accelerator``, ``datamodule``, ...).
        """
        # The base switches the module to training mode (masking and dropout on) for the run.
        return super().train(*args, **kwargs)

    def train_imputation(
        self,
        measured_genes: Mapping[str, Sequence[str]] | None = None,
        max_epochs: int = 20,
        lr: float = 5e-4,
        weight_decay: float = 1e-6,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        *,
        mask_node_rate: float = 0.95,
        sentence: Sentence = "batch",
        chunk_size: int | None = None,
        progress_bar: bool = True,
    ) -> list[float]:
        """Fine-tune for (spatial) imputation, as the reference ``ImputationPipeline.fit``.

        Typical use: concatenate a spatial query (target genes zero-filled) with an scRNA-seq
        reference that measured them, give each its own ``batch_key`` label, and pass which
        genes each label measured; the masked-expression loss then only counts measured genes,
        so the reference teaches the decoder the genes the query panel lacks. Predict them
        afterwards with :func:`scfm.tl.impute_spatial` (same ``measured_genes``).

        Parameters
        ----------
        measured_genes
            ``{batch_key label: measured genes}``; ``None``: all input genes everywhere.
        max_epochs
            Passes over the cells.
        lr, weight_decay
            AdamW settings (reference defaults).
        indices
            Training cells; ``None``: all.
        batch_size, sentence, chunk_size
            As in :meth:`get_latent_representation`.
        mask_node_rate
            Share of cells masked per sentence (reference imputation default 0.95).
        progress_bar
            Show a progress bar.

        Returns
        -------
        Mean training loss per epoch.
        """
        module = self.module

        def step_loss(tensors: dict[str, torch.Tensor], plan: dict[str, Any]) -> torch.Tensor:
            inf = module.inference(
                tensors[REGISTRY_KEYS.X_KEY],
                plan["sentence"],
                coords=plan["coords"],
                coords_normalized=True,
            )
            gen = module.generative(inf["z"])
            return module.loss(tensors, inf, gen, gene_mask=plan["measured"]).loss

        optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
        rate = module.config.mask_node_rate
        module.config.mask_node_rate = mask_node_rate
        try:
            return self._fit_sentences(
                step_loss,
                optimizer,
                indices,
                batch_size,
                max_epochs,
                "cellplm imputation",
                progress_bar,
                sentence=sentence,
                chunk_size=chunk_size,
                measured_genes=measured_genes,
            )
        finally:
            module.config.mask_node_rate = rate

    def _fit_sentences(
        self,
        step_loss,
        optimizer: torch.optim.Optimizer,
        indices: Sequence[int] | None,
        batch_size: int | None,
        max_epochs: int,
        desc: str,
        progress_bar: bool,
        **sentences: Any,
    ) -> list[float]:
        """Shared fine-tuning loop over sentence minibatches; returns the mean loss per epoch."""
        from tqdm.auto import trange

        module, adata = self.module, self.adata
        cells, _ = self._resolve_indices(adata, indices)

        def epoch(**_: Any) -> float:
            total, n = 0.0, 0
            for _, tensors in self._iterate(adata, cells, batch_size, desc, False):
                dev = module.device
                plan = {
                    k: v.to(dev) if isinstance(v, torch.Tensor) else v
                    for k, v in self._next_pending(tensors).items()
                }
                loss = step_loss({k: v.to(dev) for k, v in tensors.items()}, plan)
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(module.parameters(), GRAD_CLIP)
                optimizer.step()
                total, n = total + loss.item() * plan["n"], n + plan["n"]
            return total / max(n, 1)

        request = {"tile_size": None, "sample": False, "seed": None, **sentences}
        history: list[float] = []
        module.train()
        try:
            for _ in trange(max_epochs, desc=desc, disable=not progress_bar):
                history.append(self._run_with_sentences(epoch, **request))
        finally:
            module.eval()
        self.is_trained_ = True
        return history

    # ------------------------------------------------------------------ annotation
    def train_annotation(
        self,
        max_epochs: int = 50,
        lr: float = 5e-3,
        weight_decay: float = 1e-7,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        *,
        sentence: Sentence = "batch",
        chunk_size: int | None = None,
        augment: bool = True,
        progress_bar: bool = True,
    ) -> list[float]:
        """Fine-tune for cell-type annotation (reference ``CellTypeAnnotationPipeline``).

        A fresh head (``Linear(enc_hid, post_latent_dim)`` -> Dropout -> ``Linear(.., n)``)
        is put on the pre-latent encoder output and the whole network is trained with
        cross-entropy on the ``labels_key`` of :meth:`setup_anndata`, with AdamW (embedder at
        ``lr / 10``, as in the reference) and the pretraining input masking as augmentation.

        Parameters
        ----------
        max_epochs
            Passes over the training cells.
        lr, weight_decay
            AdamW settings.
        indices
            Training cells (sentences are formed among them); ``None`` uses all.
        batch_size, sentence, chunk_size
            As in :meth:`get_latent_representation`.
        augment
            Mask input genes of random cells while training (reference behaviour).
        progress_bar
            Show a progress bar.

        Returns
        -------
        Mean training loss per epoch.
        """
        labels_key = self.setup_args.get("labels_key")
        if labels_key is None:
            raise InvalidInputError(
                "train_annotation needs cell labels: call CellPLM.setup_anndata(adata, "
                "labels_key='<obs column with cell types>') and rebuild the model."
            )
        mapping = self.adata_manager.get_state_registry(REGISTRY_KEYS.LABELS_KEY)
        classes = [str(c) for c in mapping.categorical_mapping]
        if self.annotation_classes != classes:
            self.module.add_annotation_head(len(classes))
            self.annotation_classes = classes
            self.init_params_["non_kwargs"]["annotation_classes"] = classes
        module = self.module
        embedder = set(map(id, module.embedder.parameters()))
        params = [
            {"params": [p for p in module.parameters() if id(p) in embedder], "lr": lr / 10},
            {"params": [p for p in module.parameters() if id(p) not in embedder]},
        ]

        def step_loss(tensors: dict[str, torch.Tensor], plan: dict[str, Any]) -> torch.Tensor:
            logits = module.annotation_logits(
                tensors[REGISTRY_KEYS.X_KEY], plan["sentence"], plan["coords"], augment=augment
            )
            target = tensors[REGISTRY_KEYS.LABELS_KEY].reshape(-1).long()
            return torch.nn.functional.cross_entropy(logits, target)

        return self._fit_sentences(
            step_loss,
            torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay),
            indices,
            batch_size,
            max_epochs,
            "cellplm annotation",
            progress_bar,
            sentence=sentence,
            chunk_size=chunk_size,
        )

    @torch.inference_mode()
    def predict(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        *,
        key_added: str = "cellplm_prediction",
        sentence: Sentence = "batch",
        chunk_size: int | None = None,
        progress_bar: bool = True,
    ) -> pd.DataFrame:
        """Predict cell types with the head trained by :meth:`train_annotation`.

        Writes ``adata.obs[key_added]`` (categorical label) and
        ``adata.obs[key_added + "_probability"]`` (probability of that label); cells not in
        ``indices`` get missing values.

        Parameters
        ----------
        adata
            AnnData set up like the model's; ``None`` uses the model's AnnData.
        indices
            Cells to predict; ``None``: all.
        batch_size, sentence, chunk_size, progress_bar
            As in :meth:`get_latent_representation`.
        key_added
            ``.obs`` column of the labels.

        Returns
        -------
        Class probabilities, cells x classes.
        """
        if self.annotation_classes is None:
            raise InvalidInputError("No annotation head: call model.train_annotation(...) first.")
        adata = self._validate_anndata(adata)
        cells, inverse = self._resolve_indices(adata, indices)
        self.module.eval()

        def run(**_: Any) -> np.ndarray:
            out = np.zeros((len(cells), len(self.annotation_classes)), dtype=np.float32)
            for positions, tensors in self._iterate(
                adata, cells, batch_size, "cellplm annotation", progress_bar
            ):
                plan = self._next_pending(tensors)
                dev = self.module.device
                logits = self.module.annotation_logits(
                    tensors[REGISTRY_KEYS.X_KEY].to(dev),
                    plan["sentence"].to(dev),
                    None if plan["coords"] is None else plan["coords"].to(dev),
                )
                out[positions] = torch.softmax(logits, -1).cpu().numpy()
            return out

        prob = self._run_with_sentences(run, sentence, chunk_size, None, False, None)
        classes = pd.Index(self.annotation_classes)
        best = prob.argmax(1)
        labels = pd.Series(pd.NA, index=adata.obs_names, dtype=object)
        labels.iloc[cells] = classes[best].to_numpy()
        adata.obs[key_added] = pd.Categorical(labels, categories=classes)
        confidence = np.full(adata.n_obs, np.nan, dtype=np.float32)
        confidence[cells] = prob[np.arange(len(cells)), best]
        adata.obs[f"{key_added}_probability"] = confidence
        return pd.DataFrame(prob[inverse], index=adata.obs_names[cells][inverse], columns=classes)
