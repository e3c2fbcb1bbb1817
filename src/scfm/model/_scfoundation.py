"""scFoundation (xTrimoGene) as an scvi-tools model."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, Literal

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scvi import REGISTRY_KEYS
from scvi.data.fields import NumericalObsField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin

from scfm.data._genes import align_genes
from scfm.data._scfoundation_tokenizer import PreNormalized, parse_tgthighres
from scfm.errors import AnnDataKeyError, CheckpointFormatError, InvalidInputError
from scfm.io._common import load_state_dict_strict
from scfm.io._scfoundation import (
    SCFOUNDATION_WEIGHTS,
    read_scfoundation_checkpoint,
    read_scfoundation_gene_list,
    resolve_scfoundation_files,
)
from scfm.model.base import FoundationModelMixin, record_in_uns
from scfm.module._scfoundation import (
    TOTAL_COUNTS_KEY,
    PoolType,
    ScFoundationConfig,
    ScFoundationModule,
)
from scfm.nn._performer import KeyMax

logger = logging.getLogger(__name__)

__all__ = ["ScFoundation"]

#: Estimated size above which per-cell gene embeddings must be restricted (1 GiB float32).
_MAX_CELL_GENE_FLOATS = 2**28


class ScFoundation(FoundationModelMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """scFoundation :cite:p:`Hao2024`: an asymmetric transformer over 19,264 human genes.

    Genes are matched by symbol to the model's gene list; each cell is normalised
    (``log1p(c / sum(c) * 1e4)`` over the matched genes) and two depth tokens are appended,
    ``T`` (target read depth) and ``S = log10(total count)``. The encoder sees the non-zero
    genes, the Performer decoder all genes.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    config
        Architecture as a plain dict of :class:`~scfm.module.ScFoundationConfig` fields;
        ``None`` uses the released architecture (or one sized to ``gene_list``).
    gene_list
        Gene symbols in model order (the 19,264-gene ``OS_scRNA_gene_index``); ``None``
        uses the list shipped with scfm.
    weights
        Which released model the module holds: ``"cell"`` (cell embeddings), ``"rde"``
        (read-depth enhancement) or ``"gene"`` (gene embeddings, reconstruction).
        Informational for a randomly initialised model.
    classifier_labels
        Label names of an annotation head (set by :meth:`finetune`); ``None``: no head.

    Examples
    --------
    >>> ScFoundation.setup_anndata(adata)
    >>> model = ScFoundation.from_pretrained("scfoundation_release/", adata)
    >>> adata.obsm["X_scfoundation"] = model.get_latent_representation()
    """

    _model_name = "scfoundation"
    _default_batch_size = 16
    _has_gene_embeddings: ClassVar[bool] = True
    _module_cls = ScFoundationModule

    def __init__(
        self,
        adata: ad.AnnData,
        config: dict[str, Any] | None = None,
        gene_list: list[str] | None = None,
        weights: Literal["cell", "rde", "gene"] = "cell",
        classifier_labels: list[str] | None = None,
    ) -> None:
        super().__init__(adata)
        genes = list(gene_list) if gene_list is not None else read_scfoundation_gene_list()
        cfg = ScFoundationConfig(**config) if config else ScFoundationConfig()
        if config is None and cfg.n_genes != len(genes):
            cfg = ScFoundationConfig(seq_len=len(genes) + 2)
        if cfg.n_genes != len(genes):
            raise InvalidInputError(
                f"The gene list has {len(genes)} genes but the architecture expects "
                f"{cfg.n_genes} (seq_len - 2). Pass the gene list that belongs to the checkpoint."
            )
        if weights not in SCFOUNDATION_WEIGHTS:
            raise InvalidInputError(
                f"weights={weights!r} is not one of {', '.join(map(repr, SCFOUNDATION_WEIGHTS))}."
            )
        setup = self.adata_manager.registry.get("setup_args", {})
        pre_normalized = setup.get("pre_normalized", "F")
        if adata.n_vars >= len(genes) and list(adata.var_names) != genes:
            # the reference skips alignment for such inputs; scfm always aligns by symbol
            logger.warning(
                "adata has %d genes (>= the %d-gene list). The reference get_embedding.py would "
                "use the columns as they are; scfm aligns them by symbol instead.",
                adata.n_vars,
                len(genes),
            )
        gene_id_key = setup.get("gene_id_key")
        if gene_id_key is None and "gene_name" in adata.var.columns:
            gene_id_key = "gene_name"  # the reference reads symbols from var['gene_name']
        alignment = align_genes(
            adata.var,
            genes,
            id_type="symbol",
            gene_id_key=gene_id_key,
            model_name="scFoundation",
        )
        n_dropped = alignment.n_vars - alignment.n_matched
        logger.info(
            "scFoundation: %d of %d genes matched; %d vocabulary genes zero-filled, %d genes "
            "not in the gene list dropped.",
            alignment.n_matched,
            alignment.n_vars,
            len(genes) - alignment.n_matched,
            n_dropped,
        )
        self.module = ScFoundationModule(cfg, n_labels=len(classifier_labels or []))
        self.module.set_input_layout(alignment.var_index, alignment.vocab_index, pre_normalized)
        self.gene_list = genes
        self.weights = weights
        self.classifier_labels = list(classifier_labels) if classifier_labels else None
        # the other released models, kept on CPU after from_pretrained (not saved by save())
        self._release_states: dict[str, dict[str, torch.Tensor]] = {}
        self._set_gene_alignment(adata, alignment)
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(
        cls,
        adata: ad.AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        gene_id_key: str | None = None,
        pre_normalized: PreNormalized = "F",
        total_counts_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Register an AnnData with scFoundation.

        Parameters
        ----------
        adata
            AnnData, cells x genes, gene symbols in ``var_names`` (or ``gene_id_key``).
        layer
            Layer with the expression values; ``None`` uses ``adata.X``.
        batch_key
            Categorical ``adata.obs`` column with the batch of each cell (not used by the
            model; kept for downstream integration metrics).
        labels_key
            Categorical ``adata.obs`` column with cell labels, for :meth:`finetune`.
        gene_id_key
            ``adata.var`` column with HGNC gene symbols; ``None`` uses ``var['gene_name']``
            if it exists (as the reference does), else ``var_names``.
        pre_normalized
            ``"F"`` (default): raw counts (checked). ``"T"``: values already normalised and
            log1p-transformed; the reference then sums those values as "total count".
            ``"A"``: normalised + log1p values, with the raw total count per cell in
            ``adata.obs[total_counts_key]`` (the GEARS layout).
        total_counts_key
            ``adata.obs`` column with raw total counts; required for ``pre_normalized="A"``.
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if pre_normalized not in ("F", "T", "A"):
            raise InvalidInputError(
                f"pre_normalized={pre_normalized!r} is not supported; use 'F' (raw counts), "
                "'T' (normalised + log1p) or 'A' (normalised + log1p with total_counts_key)."
            )
        if pre_normalized == "A" and total_counts_key is None:
            raise InvalidInputError(
                "pre_normalized='A' needs total_counts_key='<adata.obs column with the raw "
                "total count of each cell>'."
            )
        if total_counts_key is not None and total_counts_key not in adata.obs.columns:
            raise AnnDataKeyError(
                f"total_counts_key={total_counts_key!r} is not a column of adata.obs. Store the "
                "raw total count per cell there, e.g. adata.obs['total_counts'] = counts.sum(1)."
            )
        extra = [NumericalObsField(TOTAL_COUNTS_KEY, total_counts_key)] if total_counts_key else []
        cls._register_anndata(
            adata,
            setup_method_args,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            gene_id_key=gene_id_key,
            extra_fields=extra,
            counts=pre_normalized == "F",
            **kwargs,
        )

    # ------------------------------------------------------------------ loading
    @classmethod
    def _from_pretrained(
        cls,
        path,
        adata: ad.AnnData,
        weights: Literal["cell", "rde", "gene"] = "cell",
        trust_checkpoint: bool = False,
        keep_other_weights: bool = True,
    ) -> ScFoundation:
        """Read the released ``models.ckpt`` (see :meth:`from_pretrained`).

        Parameters
        ----------
        weights
            Released model to load: ``"cell"`` (default, cell embeddings), ``"rde"``
            (read-depth enhancement) or ``"gene"`` (gene embeddings, reconstruction).
            The other models of the file stay available through the ``weights=`` argument
            of the embedding methods (kept in CPU memory, ~0.5 GB each for the release).
        trust_checkpoint
            Allow full unpickling if the file cannot be read with ``weights_only=True``.
        keep_other_weights
            Keep the other released models for ``weights=`` switching; ``False`` keeps only
            ``weights`` (saves memory; the others are still checked strictly).
        """
        ckpt, gene_file = resolve_scfoundation_files(path)
        models = read_scfoundation_checkpoint(ckpt, weights, trust_checkpoint=trust_checkpoint)
        genes = read_scfoundation_gene_list(gene_file)
        flat, state = models[weights]
        config = ScFoundationConfig.from_reference(flat)
        if config.n_genes != len(genes):
            raise CheckpointFormatError(
                f"The checkpoint expects {config.n_genes} genes (seq_len {config.seq_len}) but "
                f"the gene list {gene_file or '(shipped)'} has {len(genes)}. Put the "
                "OS_scRNA_gene_index.19264.tsv that belongs to the checkpoint next to it."
            )
        model = cls(adata, config=config.to_dict(), gene_list=genes, weights=weights)
        for name, (other_flat, other_state) in models.items():
            if ScFoundationConfig.from_reference(other_flat) != config:
                logger.warning("scFoundation %r model has another architecture; skipped.", name)
                continue
            load_state_dict_strict(model.module, other_state, what=f"{ckpt} [{name!r}]")
            if keep_other_weights or name == weights:
                model._release_states[name] = dict(other_state)
        load_state_dict_strict(model.module, state, what=f"{ckpt} [{weights!r}]")
        return model

    @contextlib.contextmanager
    def _using_weights(self, weights: str | None) -> Iterator[None]:
        """Temporarily swap in another released model (``None``: keep the current one)."""
        if weights is None or weights == self.weights:
            yield
            return
        if weights not in SCFOUNDATION_WEIGHTS:
            raise InvalidInputError(
                f"weights={weights!r} is not one of {', '.join(map(repr, SCFOUNDATION_WEIGHTS))}."
            )
        if weights not in self._release_states:
            raise InvalidInputError(
                f"The {weights!r} weights are not loaded (the model holds {self.weights!r}). "
                f"Load them with ScFoundation.from_pretrained(path, adata, weights={weights!r})."
            )
        current = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        self.module.load_state_dict(self._release_states[weights], strict=False)
        try:
            yield
        finally:
            self.module.load_state_dict(current)

    # ------------------------------------------------------------------ minibatches
    def _model_input(self, tensors: dict[str, torch.Tensor], tgthighres: str) -> torch.Tensor:
        device = self.module.pos_emb.weight.device
        x = tensors[REGISTRY_KEYS.X_KEY].to(device)
        total = tensors.get(TOTAL_COUNTS_KEY)
        return self.module.model_input(x, tgthighres, None if total is None else total.to(device))

    def _length_columns(self) -> np.ndarray:
        # The encoder sees the non-zero genes only: group cells of similar counts of them.
        return self.gene_alignment.var_index

    def _latent_minibatch(
        self, tensors: dict[str, torch.Tensor], pool_type: PoolType = "all", tgthighres: str = "t4"
    ) -> torch.Tensor:
        values = self._model_input(tensors, tgthighres)
        hidden, _, padding = self.module.encode(values)
        return self.module.pool(hidden, padding, pool_type)

    def _gene_embedding_minibatch(
        self, tensors: dict[str, torch.Tensor], tgthighres: str = "t4", key_max: KeyMax = "sample"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        values = self._model_input(tensors, tgthighres)
        hidden = self.module.decode(values, key_max=key_max)
        vocab = self.module.vocab_index
        emb = hidden[:, vocab]  # only the genes of adata.var: (b, n_matched, d)
        return vocab.repeat(hidden.shape[0]), emb.reshape(-1, emb.shape[-1])

    def _vocab_names(self) -> Sequence[str]:
        return self.gene_list

    @staticmethod
    def _check_options(
        tgthighres: str | None = None, pool_type: str | None = None, key_max: str | None = None
    ) -> None:
        if tgthighres is not None:
            parse_tgthighres(tgthighres)
        if pool_type is not None and pool_type not in ("all", "max"):
            raise InvalidInputError(
                f"pool_type={pool_type!r} is not supported; use 'all' or 'max'."
            )
        if key_max is not None and key_max not in ("sample", "batch"):
            raise InvalidInputError(
                f"key_max={key_max!r} is not supported; use 'sample' or 'batch'."
            )

    def _gene_positions(self, genes: Sequence[str] | None) -> np.ndarray:
        if genes is None:
            return np.arange(len(self.gene_list))
        lookup = {g: i for i, g in enumerate(self.gene_list)}
        missing = [g for g in genes if g not in lookup]
        if missing:
            raise InvalidInputError(
                f"{len(missing)} genes are not in the scFoundation gene list (e.g. "
                f"{', '.join(map(str, missing[:5]))}). Pass symbols from model.gene_list."
            )
        return np.array([lookup[g] for g in genes], dtype=np.int64)

    @torch.inference_mode()
    def _map_cells(
        self,
        adata: ad.AnnData,
        cells: np.ndarray,
        batch_size: int | None,
        fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        desc: str,
        progress_bar: bool,
    ) -> np.ndarray:
        """Apply ``fn`` to every minibatch of ``cells`` (sorted unique); rows in ``cells`` order."""
        self.module.eval()
        out: np.ndarray | None = None
        for positions, tensors in self._iterate(adata, cells, batch_size, desc, progress_bar):
            part = fn(tensors).float().cpu().numpy()
            if out is None:
                out = np.zeros((len(cells), *part.shape[1:]), dtype=np.float32)
            out[positions] = part
        assert out is not None  # _resolve_indices never returns an empty selection
        return out

    # ------------------------------------------------------------------ public API
    def get_latent_representation(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        *,
        pool_type: PoolType = "all",
        tgthighres: str = "t4",
        weights: Literal["cell", "rde", "gene"] | None = None,
        progress_bar: bool = True,
    ) -> np.ndarray:
        """Cell embeddings from the encoder, as the reference ``get_embedding.py`` computes them.

        Parameters
        ----------
        adata
            AnnData set up like the model's; ``None`` uses the model's AnnData.
        indices
            Cells to embed; ``None`` embeds all.
        batch_size
            Cells per minibatch (cells of similar length are batched together).
        pool_type
            ``"all"`` (default): ``[S token, T token, max over genes, mean over genes]``,
            ``4 x 768`` wide; ``"max"``: max over all tokens, ``768`` wide.
        tgthighres
            Target depth token: ``"t4"`` (default, T = 4, i.e. 10,000 reads), ``"tN"``,
            ``"fN"`` (T = log10(N x total); ``"f1"``: T = S) or ``"aN"`` (T = S + N).
        weights
            Released model to use: ``"cell"``, ``"rde"`` (read-depth enhancement) or
            ``"gene"``; ``None`` uses the loaded one.
        progress_bar
            Show a progress bar.

        Returns
        -------
        ``(n_cells, d)`` float32 array, rows in the order of ``indices``.

        Notes
        -----
        The reference embeds one cell at a time. Here the non-zero genes of a minibatch are
        packed without padding: the projections run over all tokens at once and each cell
        attends to its own tokens with PyTorch's fused attention, so the result equals the
        per-cell one (to float32 rounding) whatever ``batch_size``.
        ``benchmarks/scfoundation_embed.py`` measures the speed against the reference loop;
        :meth:`~scfm.model.base.FoundationModelMixin.inference_precision` runs it in bfloat16.
        """
        self._check_options(tgthighres=tgthighres, pool_type=pool_type)
        with self._using_weights(weights):
            return super().get_latent_representation(
                adata,
                indices,
                batch_size,
                progress_bar=progress_bar,
                pool_type=pool_type,
                tgthighres=tgthighres,
            )

    def get_gene_embeddings(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        *,
        tgthighres: str = "t4",
        weights: Literal["cell", "rde", "gene"] | None = "gene",
        key_max: KeyMax = "sample",
        progress_bar: bool = True,
    ) -> pd.DataFrame:
        """Gene context embeddings (decoder output) averaged over cells, one row per gene.

        Only the genes of ``adata.var`` that are in the gene list are returned.

        Parameters
        ----------
        adata, indices, batch_size, progress_bar
            As in :meth:`get_latent_representation`.
        tgthighres
            Target depth token (default ``"t4"``, the reference's).
        weights
            Released model; default ``"gene"`` (the reference's choice for gene embeddings).
        key_max
            ``"sample"`` (default): each cell is decoded exactly as on its own;
            ``"batch"``: the reference ``gene_batch`` mode (results depend on the batch).

        Returns
        -------
        DataFrame indexed by gene symbol, ``decoder.hidden_dim`` columns.
        """
        self._check_options(tgthighres=tgthighres, key_max=key_max)
        with self._using_weights(weights):
            return super().get_gene_embeddings(
                adata,
                indices,
                batch_size,
                progress_bar=progress_bar,
                tgthighres=tgthighres,
                key_max=key_max,
            )

    def get_cell_gene_embeddings(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        genes: Sequence[str] | None = None,
        batch_size: int | None = None,
        *,
        tgthighres: str = "t4",
        weights: Literal["cell", "rde", "gene"] | None = "gene",
        key_max: KeyMax = "sample",
        progress_bar: bool = True,
    ) -> np.ndarray:
        """Per-cell gene context embeddings (reference ``--output_type gene`` / ``gene_batch``).

        The decoder output after both final LayerNorms, ``T`` / ``S`` dropped. These are
        ``n_genes x 512`` per cell (39 MB per cell for all 19,264 genes): select ``genes``
        and/or cells, or use :meth:`get_gene_embeddings` for the mean over cells.

        Parameters
        ----------
        adata, indices, batch_size, progress_bar
            As in :meth:`get_latent_representation`.
        genes
            Gene symbols of the gene list to return (any, expressed or not); ``None``: all,
            in gene-list order.
        tgthighres
            Target depth token (default ``"t4"``).
        weights
            Released model; default ``"gene"``.
        key_max
            ``"sample"`` (default, equals the reference's one-cell-at-a-time ``gene`` mode)
            or ``"batch"`` (the reference ``gene_batch`` mode with all selected cells in one
            batch: pass ``batch_size >= n_cells`` to reproduce it).

        Returns
        -------
        ``(n_cells, n_genes, d)`` float32 array.

        Raises
        ------
        InvalidInputError
            If the result would exceed 1 GiB and no gene subset was given.
        """
        self._check_options(tgthighres=tgthighres, key_max=key_max)
        positions = torch.as_tensor(self._gene_positions(genes))
        target = self._validate_anndata(adata)
        cells, inverse = self._resolve_indices(target, indices)
        size = len(inverse) * len(positions) * self.module.config.decoder_hidden_dim
        if genes is None and size > _MAX_CELL_GENE_FLOATS:
            raise InvalidInputError(
                f"Per-cell gene embeddings of {len(inverse)} cells x {len(positions)} genes would "
                f"take {size * 4 / 2**30:.1f} GiB. Pass genes=[...] or fewer indices, or use "
                "get_gene_embeddings() / embed_genes() for the mean over cells."
            )

        def fn(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
            values = self._model_input(tensors, tgthighres)
            hidden = self.module.decode(values, key_max=key_max)
            return hidden[:, positions.to(hidden.device)]

        with self._using_weights(weights):
            out = self._map_cells(
                target, cells, batch_size, fn, "scfoundation gene embeddings", progress_bar
            )
        return out[inverse]

    def get_reconstructed_expression(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        genes: Sequence[str] | None = None,
        batch_size: int | None = None,
        *,
        tgthighres: str = "t4",
        weights: Literal["cell", "rde", "gene"] | None = "gene",
        progress_bar: bool = True,
    ) -> pd.DataFrame:
        """Expression predicted by the decoder (reference ``--output_type gene_expression``).

        Values are on the ``log1p(normalised)`` scale at the depth given by ``T``; with
        ``T > S`` this is the read-depth enhanced profile.

        Parameters
        ----------
        adata, indices, batch_size, progress_bar
            As in :meth:`get_latent_representation`.
        genes
            Gene symbols to return; ``None``: the whole gene list.
        tgthighres
            Target depth token (default ``"t4"``).
        weights
            Released model; default ``"gene"`` (the reference's).

        Returns
        -------
        DataFrame cells (``obs_names``) x genes (symbols).
        """
        self._check_options(tgthighres=tgthighres)
        positions = self._gene_positions(genes)
        pos_t = torch.as_tensor(positions)

        def fn(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
            values = self._model_input(tensors, tgthighres)
            return self.module.reconstruct(values)[:, pos_t.to(values.device)]

        target = self._validate_anndata(adata)
        cells, inverse = self._resolve_indices(target, indices)
        with self._using_weights(weights):
            out = self._map_cells(
                target, cells, batch_size, fn, "scfoundation reconstruction", progress_bar
            )
        return pd.DataFrame(
            out[inverse],
            index=target.obs_names[cells][inverse],
            columns=[self.gene_list[i] for i in positions],
        )

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        batch_size: int = 16,
        plan_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Pretrain (or continue pretraining) with the read-depth-aware masked regression.

        Each minibatch is downsampled (half of the cells thinned to 10-100% of their reads;
        ``S`` = thinned depth, ``T`` = original depth), 30% of the non-zero and 3% of the zero
        values are masked, and the MSE of the decoder's prediction of the original
        normalised values at the masked positions is minimised (see
        :meth:`~scfm.module.ScFoundationModule.inference`). Runs through scvi-tools'
        ``TrainRunner`` / Lightning.

        Parameters
        ----------
        max_epochs
            Passes over the data; ``None`` uses scvi-tools' default.
        lr, weight_decay
            AdamW settings (reference: lr 1e-4, no weight decay, gradient clipping at 1).
        batch_size
            Cells per minibatch.
        plan_kwargs
            Further ``TrainingPlan`` options (override ``lr`` / ``weight_decay``).
        **kwargs
            Passed to :meth:`scvi.model.base.UnsupervisedTrainingMixin.train`
            (``accelerator``, ``devices``, ``train_size``, ``precision``, ...).
        """
        plan = {"lr": lr, "weight_decay": weight_decay, "optimizer": "AdamW", "eps": 1e-8}
        plan.update(plan_kwargs or {})
        kwargs.setdefault("gradient_clip_val", 1.0)  # the reference clips at 1
        # The base runs this in training mode and records the history after from_pretrained.
        super().train(max_epochs=max_epochs, batch_size=batch_size, plan_kwargs=plan, **kwargs)

    # ------------------------------------------------------------------ annotation
    def finetune(
        self,
        max_epochs: int = 5,
        lr: float = 1e-4,
        batch_size: int = 32,
        *,
        trainable_layers: Sequence[int] = (-2,),
        tgthighres: str = "t4",
        indices: Sequence[int] | None = None,
        seed: int = 0,
    ) -> list[float]:
        """Fine-tune for cell-type annotation as the reference ``finetune_model.py``.

        Token and gene embeddings and the encoder are frozen except the layers in
        ``trainable_layers`` (the reference trains ``transformer_encoder[-2]``); a head
        (max pooling over encoder tokens, ``BatchNorm1d``, ``Linear-ReLU-Linear``) is
        trained with cross-entropy on the labels registered with ``labels_key``.

        Parameters
        ----------
        max_epochs
            Passes over the training cells.
        lr
            AdamW learning rate.
        batch_size
            Cells per step.
        trainable_layers
            Encoder layer indices left trainable.
        tgthighres
            Target depth token of the input.
        indices
            Training cells; ``None``: all.
        seed
            Seed of the head initialisation and the shuffling.

        Returns
        -------
        Mean training loss per epoch.
        """
        self._check_options(tgthighres=tgthighres)
        labels_state = self.adata_manager.get_state_registry(REGISTRY_KEYS.LABELS_KEY)
        if self.adata_manager.registry["setup_args"].get("labels_key") is None:
            raise InvalidInputError(
                "finetune() needs cell labels: call ScFoundation.setup_anndata(adata, "
                "labels_key='<obs column>') before building the model."
            )
        names = [str(c) for c in labels_state.categorical_mapping]
        torch.manual_seed(seed)
        self.module.add_classifier(len(names))
        self.classifier_labels = names
        self.init_params_["non_kwargs"]["classifier_labels"] = names
        for p in self.module.parameters():
            p.requires_grad_(False)
        train = [self.module.classifier, self.module.classifier_norm]
        train += [self.module.encoder.transformer_encoder[i] for i in trainable_layers]
        params = [p for m in train for p in m.parameters()]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=lr)
        loader = self._make_data_loader(
            adata=self.adata, indices=indices, batch_size=batch_size, shuffle=True
        )
        device = self.module.pos_emb.weight.device
        history = []
        self.module.train()
        for epoch in range(max_epochs):
            losses = []
            for tensors in loader:
                if tensors[REGISTRY_KEYS.X_KEY].shape[0] < 2:
                    continue  # BatchNorm needs two cells
                values = self._model_input(tensors, tgthighres)
                target = tensors[REGISTRY_KEYS.LABELS_KEY].reshape(-1).long().to(device)
                loss = torch.nn.functional.cross_entropy(self.module.classify(values), target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            history.append(float(np.mean(losses)) if losses else float("nan"))
            logger.info("scFoundation finetune epoch %d: loss %.4f", epoch + 1, history[-1])
        for p in self.module.parameters():
            p.requires_grad_(True)
        self.module.eval()
        return history

    def predict(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        *,
        key_added: str = "scfoundation_prediction",
        tgthighres: str = "t4",
        progress_bar: bool = True,
    ) -> pd.DataFrame:
        """Predict cell labels with the head trained by :meth:`finetune`.

        Writes ``adata.obs[key_added]`` (predicted label, categorical) and
        ``adata.obs[f"{key_added}_probability"]`` (its probability) when all cells are
        predicted (``indices=None``).

        Returns
        -------
        DataFrame of label probabilities, cells x labels.
        """
        if self.module.classifier is None or not self.classifier_labels:
            raise InvalidInputError("The model has no annotation head: call finetune() first.")
        self._check_options(tgthighres=tgthighres)

        def fn(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.softmax(self.module.classify(self._model_input(tensors, tgthighres)), -1)

        target = self._validate_anndata(adata)
        cells, inverse = self._resolve_indices(target, indices)
        probs = self._map_cells(
            target, cells, batch_size, fn, "scfoundation predict", progress_bar
        )[inverse]
        frame = pd.DataFrame(
            probs, index=target.obs_names[cells][inverse], columns=self.classifier_labels
        )
        if indices is None:
            labels = np.asarray(self.classifier_labels, dtype=object)[probs.argmax(1)]
            target.obs[key_added] = pd.Categorical(labels, categories=self.classifier_labels)
            target.obs[f"{key_added}_probability"] = probs.max(1)
            record_in_uns(target, "obs", key_added, self._provenance({"tgthighres": tgthighres}))
        return frame
