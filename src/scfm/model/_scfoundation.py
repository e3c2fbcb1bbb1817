"""scFoundation (xTrimoGene) as an scvi-tools model."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scvi.data.fields import NumericalObsField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin

from scfm.data._genes import GeneAlignment, align_genes
from scfm.data._scfoundation_tokenizer import INPUT_KINDS, PreNormalized
from scfm.errors import AnnDataKeyError, CheckpointFormatError, InvalidInputError
from scfm.io._common import load_state_dict_strict
from scfm.io._scfoundation import (
    SCFOUNDATION_WEIGHTS,
    read_scfoundation_checkpoint,
    read_scfoundation_gene_list,
)
from scfm.model.base import FoundationModelMixin, scfm_dsp
from scfm.module._scfoundation import (
    INPUT_KIND_KEY,
    TOTAL_COUNTS_KEY,
    ScFoundationConfig,
    ScFoundationModule,
)

logger = logging.getLogger(__name__)

__all__ = ["ScFoundation"]

Weights = Literal["cell", "rde", "gene"]
#: Options each task accepts (checked before any forward pass; their values by
#: :meth:`~scfm.module.ScFoundationModule.check_options`).
_TASK_OPTIONS = {
    "latent": {"tgthighres", "pooling", "weights"},
    "genes": {"tgthighres", "key_max", "weights"},
    "expression": {"tgthighres", "weights"},
    "predict": {"tgthighres", "weights"},
    "train": set(),
}
#: Per-cell gene embeddings larger than this (float32 values) need an explicit gene subset.
_MAX_CELL_GENE_FLOATS = 2**28


class ScFoundation(FoundationModelMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """scFoundation :cite:p:`Hao2024`: an asymmetric transformer over 19,264 human genes.

    Genes are matched by symbol to the model's gene list; each cell is normalised
    (``log1p(c / sum(c) * 1e4)`` over the matched genes) and two depth tokens are appended,
    ``T`` (target read depth) and ``S = log10(total count)``. The encoder sees the non-zero
    genes, the Performer decoder all genes.

    Options of the embedding and decoding methods: ``tgthighres`` (target depth ``T``:
    ``"t4"`` default = 10,000 reads, ``"tN"``, ``"fN"`` = log10(N x total), ``"f1"`` keeps
    the observed depth, ``"aN"`` = S + N), ``pooling`` (``"all"`` default:
    ``[S token, T token, max over genes, mean over genes]``, 4 x 768 wide; ``"max"``: max over
    all tokens) and, for gene states, ``key_max`` (``"sample"``: each cell decoded as on its
    own, the reference ``gene`` mode; ``"batch"``: the reference ``gene_batch`` mode, which
    depends on the minibatch). Gene embeddings cover all 19,264 genes (the decoder states of
    every gene, averaged over the cells); decoded expression is on the log1p-normalised
    scale at depth ``T``.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    config
        Architecture (:class:`~scfm.module.ScFoundationConfig` or a dict of its fields,
        missing fields from the release); ``None``: the released architecture sized to
        ``gene_list``.
    gene_list
        Gene symbols in model order (the 19,264-gene ``OS_scRNA_gene_index``); ``None`` uses
        the list shipped with scfm.
    weights
        Which released model the weights are (``"cell"``, ``"rde"``, ``"gene"``); set by
        :meth:`from_pretrained`, ``None`` for a new model.

    Examples
    --------
    >>> ScFoundation.setup_anndata(adata)
    >>> ScFoundation.from_pretrained("release/", adata).embed(adata)  # obsm["X_scfoundation"]
    >>> genes = ScFoundation.from_pretrained("release/", adata, weights="gene")
    """

    _model_name = "scfoundation"
    _default_batch_size = 16
    _sort_by_length = True
    _has_decoder = True

    def __init__(
        self,
        adata: ad.AnnData,
        config: ScFoundationConfig | dict[str, Any] | None = None,
        gene_list: Sequence[str] | None = None,
        weights: Weights | None = None,
    ) -> None:
        super().__init__(adata)
        genes = list(gene_list) if gene_list is not None else read_scfoundation_gene_list()
        if not isinstance(config, ScFoundationConfig):
            config = ScFoundationConfig.from_dict({"seq_len": len(genes) + 2, **(config or {})})
        if config.n_genes != len(genes):
            raise InvalidInputError(
                f"The gene list has {len(genes)} genes but the architecture expects "
                f"{config.n_genes} (seq_len - 2). Pass the gene list that belongs to the weights."
            )
        if weights is not None and weights not in SCFOUNDATION_WEIGHTS:
            raise InvalidInputError(
                f"weights={weights!r} is not one of {', '.join(map(repr, SCFOUNDATION_WEIGHTS))}."
            )
        self.config = config
        self.gene_list = genes
        self.weights = weights
        self.module = ScFoundationModule(config)
        config, gene_list = config.to_dict(), genes  # plain values: save() writes JSON
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ setup
    @classmethod
    @scfm_dsp.dedent
    def setup_anndata(
        cls,
        adata: ad.AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        gene_id_key: str | None = None,
        allow_non_integer: bool = False,
        check_gene_overlap: bool = True,
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
        %(param_batch_key)s
        %(param_labels_key)s
        gene_id_key
            ``adata.var`` column with HGNC gene symbols; ``None`` uses ``var['gene_name']``
            if it exists (as the reference does), else ``var_names``.
        %(param_allow_non_integer)s
        %(param_check_gene_overlap)s
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
        if pre_normalized not in INPUT_KINDS or (pre_normalized == "A") != (
            total_counts_key is not None
        ):
            raise InvalidInputError(
                f"pre_normalized={pre_normalized!r} with total_counts_key={total_counts_key!r} "
                "is not supported; use 'F' (raw counts), 'T' (normalised + log1p) or 'A' "
                "(normalised + log1p) with total_counts_key='<adata.obs column of raw totals>'."
            )
        if total_counts_key is not None and total_counts_key not in adata.obs.columns:
            raise AnnDataKeyError(
                f"total_counts_key={total_counts_key!r} is not a column of adata.obs. Store the "
                "raw total count per cell there, e.g. adata.obs['total_counts'] = counts.sum(1)."
            )
        if pre_normalized != "F":
            allow_non_integer = True  # log-normalised values are not counts
        setup_method_args = cls._get_setup_method_args(**locals())
        extra = [NumericalObsField(TOTAL_COUNTS_KEY, total_counts_key)] if total_counts_key else []
        with warnings.catch_warnings():
            if pre_normalized != "F":
                # the base warns about non-integer "counts"; these values are meant to be so
                warnings.filterwarnings("ignore", message="The expression matrix holds non-integer")
            cls._register_anndata(
                adata,
                setup_method_args,
                layer=layer,
                batch_key=batch_key,
                labels_key=labels_key,
                gene_id_key=gene_id_key,
                allow_non_integer=allow_non_integer,
                check_gene_overlap=check_gene_overlap,
                extra_fields=extra,
                **kwargs,
            )

    # ------------------------------------------------------------------ loading
    @classmethod
    def _from_pretrained(
        cls,
        path,
        adata: ad.AnnData,
        weights: Weights = "cell",
        trust_checkpoint: bool = False,
    ) -> ScFoundation:
        """Read one model of the released ``models.ckpt`` (see :meth:`from_pretrained`).

        Parameters
        ----------
        weights
            Released model to load: ``"cell"`` (default, cell embeddings), ``"rde"``
            (read-depth enhancement) or ``"gene"`` (gene embeddings, decoded expression, GEARS
            inputs: the reference's choice for those outputs). Only this one is kept in memory.
        trust_checkpoint
            Allow full unpickling if the file cannot be read with ``weights_only=True``.
        """
        release = read_scfoundation_checkpoint(path, weights, trust_checkpoint=trust_checkpoint)
        what = f"{release.files['weights']} [{weights!r}]"
        config = ScFoundationConfig.from_reference(release.config)
        genes = release.vocabulary
        if config.n_genes != len(genes):
            raise CheckpointFormatError(
                f"{what} expects {config.n_genes} genes (seq_len {config.seq_len}) but the gene "
                f"list {release.files.get('genes', '(shipped)')} has {len(genes)}. Put the "
                "OS_scRNA_gene_index.19264.tsv that belongs to the checkpoint next to it."
            )
        config.check_state_dict(release.state_dict, what=what)
        # The module is built without memory (meta device) and takes the release's tensors
        # as they are (``assign``): the weights are held once, as views of the mapped file,
        # and no random initialisation is computed only to be overwritten.
        with torch.device("meta"):
            model = cls(adata, config=config, gene_list=genes, weights=weights)
        # read_scfoundation_checkpoint checked the weights, not holding them all (mapped)
        load_state_dict_strict(
            model.module, release.state_dict, what=what, assign=True, check_finite=False
        )
        model.module.materialize_missing_buffers()
        return model

    # ------------------------------------------------------------------ hooks
    @property
    def vocabulary(self) -> pd.Index:
        """The 19,264 gene symbols of the model, in the order of the module's input."""
        return pd.Index(self.gene_list, name="gene_symbol")

    def _align_genes(self, adata: ad.AnnData) -> GeneAlignment:
        gene_id_key = self._setup_args_of(adata).get("gene_id_key")
        if gene_id_key is None and "gene_name" in adata.var.columns:
            gene_id_key = "gene_name"  # the reference reads symbols from var['gene_name']
        if adata.n_vars >= len(self.gene_list):  # the reference would not align these
            logger.info("%d genes aligned by symbol (the reference takes >= %d columns as "
                        "they are).", adata.n_vars, len(self.gene_list))  # fmt: skip
        return align_genes(
            adata.var,
            self.gene_list,
            id_type="symbol",
            gene_id_key=gene_id_key,
            model_name="scFoundation",
        )

    def _inference_kwargs(self, task: str, **options: Any) -> dict[str, Any]:
        allowed = _TASK_OPTIONS.get(task, set())
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise InvalidInputError(
                f"ScFoundation has no option {', '.join(map(repr, unknown))} here (options: "
                f"{', '.join(sorted(allowed)) or 'none'})."
            )
        weights = options.get("weights")
        if weights is not None and weights != self.weights:
            raise InvalidInputError(
                f"weights={weights!r}: this model holds the {self.weights!r} weights. The "
                "released models are chosen when loading: ScFoundation.from_pretrained(path, "
                f"adata, weights={weights!r})."
            )
        usual = ("gene",) if task in ("genes", "expression") else ("cell", "rde")
        if task != "train" and self.weights not in (None, *usual):
            logger.warning("scFoundation %s with the %r weights; the reference uses %s.",
                           task, self.weights, " / ".join(map(repr, usual)))  # fmt: skip
        return self.module.check_options(task, **options)

    def _cell_plan(
        self, adata: ad.AnnData, cells: np.ndarray, task: str, **options: Any
    ) -> dict[str, np.ndarray]:
        # what the AnnData holds (counts or log-normalised values) is a property of the
        # AnnData, so it travels with its cells rather than living on the module
        kind = INPUT_KINDS.index(self._setup_args_of(adata).get("pre_normalized", "F"))
        return {INPUT_KIND_KEY: np.full(len(cells), kind, dtype=np.int64)}

    # ------------------------------------------------------------------ model-specific
    @torch.inference_mode()
    def get_cell_gene_embeddings(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        genes: Sequence[str] | None = None,
        batch_size: int | None = None,
        *,
        progress_bar: bool = True,
        **options: Any,
    ) -> np.ndarray:
        """Per-cell gene context embeddings (reference ``--output_type gene`` / ``gene_batch``).

        The decoder output after both final LayerNorms, ``T`` / ``S`` dropped: for each cell,
        ``n_genes x 512`` values (39 MB per cell for all 19,264 genes). Select ``genes`` and /
        or cells, or use :meth:`get_gene_embeddings` for the mean over cells.

        Parameters
        ----------
        adata, indices, batch_size, progress_bar
            As in :meth:`get_latent_representation`.
        genes
            Gene symbols of :attr:`vocabulary` to return (expressed or not); ``None``: all,
            in vocabulary order.
        **options
            ``tgthighres`` (default ``"t4"``) and ``key_max`` (``"sample"``, the reference's
            one-cell-at-a-time ``gene`` mode; ``"batch"`` with ``batch_size >= n_cells``
            reproduces ``gene_batch``).

        Returns
        -------
        ``(n_cells, n_genes, d)`` float32 array, cells in ``indices`` order.

        Raises
        ------
        InvalidInputError
            For a gene not in the vocabulary, or a result above 1 GiB without a gene subset.
        """
        positions = np.arange(len(self.gene_list))
        if genes is not None:
            positions = self.vocabulary.get_indexer(pd.Index([str(g) for g in genes]))
            if (positions < 0).any():
                missing = [g for g, p in zip(genes, positions, strict=True) if p < 0]
                raise InvalidInputError(
                    f"{len(missing)} genes are not in the scFoundation gene list (e.g. "
                    f"{', '.join(map(str, missing[:5]))}). Pass symbols from model.vocabulary."
                )
        call = self._prepare(adata, indices, batch_size, "genes", options)
        size = len(call.inverse) * len(positions) * self.config.decoder_hidden_dim
        if genes is None and size > _MAX_CELL_GENE_FLOATS:
            raise InvalidInputError(
                f"Per-cell gene embeddings of {len(call.inverse)} cells x {len(positions)} genes "
                f"would take {size * 4 / 2**30:.1f} GiB. Pass genes=[...] or fewer indices, or "
                "use get_gene_embeddings() / embed_genes() for the mean over cells."
            )
        index = torch.as_tensor(positions)
        out = np.zeros(
            (len(call.cells), len(positions), self.config.decoder_hidden_dim), dtype=np.float32
        )
        for rows, result, _ in self._run(call, "scfoundation gene embeddings", progress_bar):
            states = result.token_states
            out[rows] = states[:, index.to(states.device)].float().cpu().numpy()
        return out[call.inverse]

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        *,
        batch_size: int | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        plan_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Pretrain with the read-depth-aware masked regression (Lightning, scvi-tools).

        Half of the raw-count cells are thinned to 10-100% of their reads (``S`` = thinned,
        ``T`` = original depth), 30% of the non-zero and 3% of the zero values are masked, and
        the MSE of the decoded original values at masked positions is minimised, with the
        reference's optimiser (AdamW, lr 1e-4, no weight decay, gradient clipping at 1).

        Parameters
        ----------
        max_epochs, batch_size
            Passes over the data (``None``: scvi-tools' default) and cells per minibatch.
        lr, weight_decay
            AdamW settings.
        plan_kwargs
            Further ``TrainingPlan`` options (override ``lr`` / ``weight_decay``).
        **kwargs
            Passed to :meth:`~scfm.model.base.FoundationModelMixin.train` (``train_size``,
            ``accelerator``, ``precision``, ...).
        """
        plan = {"lr": lr, "weight_decay": weight_decay, "optimizer": "AdamW", "eps": 1e-8}
        plan.update(plan_kwargs or {})
        kwargs.setdefault("gradient_clip_val", 1.0)
        super().train(max_epochs, batch_size=batch_size, plan_kwargs=plan, **kwargs)
