"""CellFM :cite:p:`Zeng2025` as an scvi-tools model."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin

from scfm.data._cellfm_tokenize import cell_depths
from scfm.data._genes import GeneAlignment, align_genes
from scfm.data._validation import get_matrix
from scfm.errors import CheckpointFormatError, InvalidInputError
from scfm.io._cellfm import GENE_ROW_MULTIPLE, read_cellfm_release
from scfm.io._common import load_state_dict_strict
from scfm.model.base import FoundationModelMixin, scfm_dsp
from scfm.module._cellfm import PLAN_DEPTH, PLAN_SEED, CellFMConfig, CellFMModule
from scfm.module._checks import is_int

logger = logging.getLogger(__name__)

__all__ = ["CellFM"]

#: Options each task accepts (checked before any forward pass).
_TASK_OPTIONS = {
    "latent": {"use_st", "hidden_layer", "pooling", "seed"},
    "genes": {"use_st", "hidden_layer", "seed"},
    "expression": {"use_st", "decoder", "mask_ratio", "seed"},
    "predict": set(),
    "train": set(),
}
#: ``from_pretrained`` options that override the release's config (objective / tokens).
_CONFIG_OPTIONS = {"mask_ratio", "max_tokens", "read_depth_augment", "enc_dropout"}
#: Architecture of a new model (the released 80M model's) unless a config says otherwise.
_DEFAULT_ARCHITECTURE = {"enc_dims": 1536, "enc_nlayers": 2, "enc_num_heads": 48}


class CellFM(FoundationModelMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """CellFM: a linear-retention foundation model of single-cell expression.

    Tokens are the non-zero genes of a cell (gene embedding + soft-binned log1p value),
    preceded by a CLS token; the encoder is a stack of gated linear retention layers, so the
    cost grows linearly with the genes per cell. The cell embedding is the last layer's CLS
    output. Released checkpoints are read with :meth:`from_pretrained` (no MindSpore needed).

    Options of the embedding and decoding methods:

    * ``use_st`` (default ``False``; decoding: ``True`` when the model has them): run the
      fine-tuning model's path ``[CLS, S, T, genes]`` with the two read-depth tokens
      (``S = T`` = the cell's total counts over the vocabulary) instead of the zero-shot
      ``Backbone`` path ``[CLS, genes]`` of the reference tutorials;
    * ``hidden_layer`` (default -1): states read, indexing (embedding output, layer 1, ...,
      layer N);
    * ``pooling`` (cell embeddings; ``"cls"`` default as the reference, or ``"mean"`` over
      the gene tokens);
    * ``seed`` (default 0): cells with more than ``max_tokens`` expressed genes keep a
      random sample of them, weighted by ``log1p(value)`` as the reference; cell ``i`` of the
      AnnData draws from its own generator seeded ``seed + i``, so its result never depends
      on the other cells of the call or the batch size (``None``: a fresh seed per call);
    * decoding only: ``decoder`` (``"cellwise"`` default: ``sigmoid(map(gene_emb)) · CLS``,
      every vocabulary gene; ``"genewise"``: ``value_dec`` on the expressed genes' tokens,
      0 elsewhere) and ``mask_ratio`` (default 0: mask that fraction of each cell's genes as
      the pretraining task does, the reference's ``np.random.seed(seed + i)`` mask). Decoded
      values are on the model's log1p(CP10k) scale.

    :meth:`get_gene_embeddings` also takes ``contextual=False`` for the static gene table
    (the reference's gene-function input). :meth:`train` runs masked value recovery
    (gene-wise + cell-wise masked MSE, ``config.mask_ratio`` of each cell's genes, 80 % of
    them replaced by the mask embedding, read-depth thinning when
    ``config.read_depth_augment``); :meth:`finetune` adds the reference's annotation head.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata` (raw counts, gene symbols).
    config
        :class:`~scfm.module._cellfm.CellFMConfig`, or a dict of its fields (missing
        architecture fields: the released 80M model's; ``n_genes`` / ``gene_rows`` from
        ``genes``); ``None``: the 80M architecture sized to ``genes``.
    genes
        The gene vocabulary (HGNC symbols; token id = 1 + position). ``None`` uses the
        AnnData's genes, sorted (a new model trained from scratch).

    Examples
    --------
    >>> CellFM.setup_anndata(adata)  # doctest: +SKIP
    >>> model = CellFM.from_pretrained("CellFM/", adata)  # doctest: +SKIP
    >>> model.embed(adata)  # adata.obsm["X_cellfm"]  # doctest: +SKIP
    """

    _model_name = "cellfm"
    _default_batch_size = 16
    _sort_by_length = True
    _has_decoder = True

    def __init__(
        self,
        adata: ad.AnnData,
        config: CellFMConfig | dict[str, Any] | None = None,
        genes: Sequence[str] | None = None,
    ) -> None:
        super().__init__(adata)
        if genes is None:
            key = self.setup_args.get("gene_id_key")
            source = adata.var_names if key is None else adata.var[key]
            genes = sorted(set(map(str, source)))
        genes = [str(g) for g in genes]
        if not isinstance(config, CellFMConfig):
            n = len(genes)
            sized = {"n_genes": n, "gene_rows": n + 1 + (-n - 1) % GENE_ROW_MULTIPLE}
            config = CellFMConfig.from_dict({**_DEFAULT_ARCHITECTURE, **sized, **(config or {})})
        if config.n_genes != len(genes):
            raise InvalidInputError(
                f"config.n_genes={config.n_genes} but {len(genes)} genes were given."
            )
        self._genes = pd.Index(genes, name="gene_id")
        # The reference orders a cell's tokens alphabetically (np.intersect1d).
        order = np.argsort(np.asarray(genes, dtype=str), kind="stable")
        self.module = CellFMModule(config, token_order=order)
        self.init_params_ = self._get_init_params(locals())

    @property
    def config(self) -> CellFMConfig:
        """The model's :class:`~scfm.module._cellfm.CellFMConfig`."""
        return self.module.config

    @property
    def vocabulary(self) -> pd.Index:
        """Gene symbols of the model; position ``j`` has token id ``j + 1``."""
        return self._genes

    # ------------------------------------------------------------------ loading
    @classmethod
    def _from_pretrained(
        cls,
        path: os.PathLike,
        adata: ad.AnnData,
        n_heads: int | None = None,
        gene_file: str | os.PathLike | None = None,
        **options: Any,
    ) -> CellFM:
        """Read a CellFM release (MindSpore ``.ckpt`` + gene list), without MindSpore.

        Options: ``n_heads`` (retention heads, not stored in checkpoints; default 48 for the
        released width 1536, required for any other width), ``gene_file`` (a gene list other
        than the one beside the checkpoint: ``expand_gene_info.csv`` for the 80M model,
        ``gene_info.csv`` for the 800M ``base_weight.ckpt``), and the config fields
        ``mask_ratio``, ``max_tokens``, ``read_depth_augment``, ``enc_dropout``.
        """
        unknown = set(options) - _CONFIG_OPTIONS
        if unknown:
            raise InvalidInputError(
                f"Unknown arguments {sorted(unknown)} for CellFM.from_pretrained; allowed: "
                f"n_heads, gene_file, {', '.join(sorted(_CONFIG_OPTIONS))}."
            )
        release = read_cellfm_release(path, n_heads=n_heads, gene_file=gene_file)
        config = CellFMConfig.from_dict(release.config)
        try:
            config = dataclasses.replace(config, **options)
            config.validate()
        except CheckpointFormatError as err:
            raise InvalidInputError(str(err).replace("config ", "option ", 1)) from None
        state = release.state_dict
        config.check_shapes({k: tuple(v.shape) for k, v in state.items()})
        model = cls(adata, config=config, genes=list(release.vocabulary))
        optional = [
            k
            for k in model.module.state_dict()
            if k not in state
            and any(re.search(p, k) for p in CellFMModule._keys_to_ignore_on_load_missing)
        ]
        if optional:
            logger.warning(
                "%s has no %s; they keep their random initialisation (needed only for "
                "training / decoding).",
                release.files["weights"].name,
                ", ".join(optional),
            )
        load_state_dict_strict(model.module, state, what=str(release.files["weights"]))
        return model

    # ------------------------------------------------------------------ hooks
    def _align_genes(self, adata: ad.AnnData) -> GeneAlignment:
        """Exact symbol match, as the reference's ``np.intersect1d`` (Ensembl ids converted)."""
        return align_genes(
            adata.var,
            list(self._genes),
            id_type="symbol",
            gene_id_key=self._setup_args_of(adata).get("gene_id_key"),
            model_name="CellFM",
        )

    def _inference_kwargs(self, task: str, **options: Any) -> dict[str, Any]:
        unknown = set(options) - _TASK_OPTIONS[task]
        if unknown:
            raise InvalidInputError(
                f"CellFM has no option {', '.join(map(repr, sorted(unknown)))} here; allowed: "
                f"{', '.join(sorted(_TASK_OPTIONS[task])) or 'none'}."
            )
        seed = options.get("seed", 0)
        if seed is not None and (not is_int(seed) or seed < 0):
            raise InvalidInputError(f"seed must be a non-negative integer or None, got {seed!r}.")
        if task == "train":
            return {"thin": self.config.read_depth_augment}
        if task == "predict":
            return {"use_st": False}
        default_st = task == "expression" and self.config.st_tokens
        use_st = options.get("use_st", default_st)
        if not isinstance(use_st, bool | np.bool_):
            raise InvalidInputError(f"use_st must be True or False, got {use_st!r}.")
        if use_st and not self.config.st_tokens:
            raise InvalidInputError(
                "This CellFM checkpoint has no read-depth (ST) tokens; use use_st=False."
            )
        kwargs: dict[str, Any] = {"use_st": bool(use_st)}
        if task == "expression":
            decoder = options.get("decoder", "cellwise")
            if decoder not in ("cellwise", "genewise"):
                raise InvalidInputError(f"decoder={decoder!r}: use 'cellwise' or 'genewise'.")
            ratio = options.get("mask_ratio", 0.0)
            if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio < 1:
                raise InvalidInputError(f"mask_ratio must be in [0, 1), got {ratio!r}.")
            return {**kwargs, "decoder": decoder, "mask": ratio > 0, "mask_ratio": float(ratio)}
        n_states = self.config.enc_nlayers + 1
        layer = options.get("hidden_layer", -1)
        if not is_int(layer):
            raise InvalidInputError(f"hidden_layer must be an integer, got {layer!r}.")
        if not -n_states <= layer < n_states:
            raise InvalidInputError(
                f"hidden_layer={layer} is out of range: CellFM has {n_states} states (embedding "
                f"output and {n_states - 1} layers), index -{n_states} .. {n_states - 1}."
            )
        kwargs["hidden_layer"] = int(layer)
        if task == "latent":
            pooling = options.get("pooling", "cls")
            if pooling not in ("cls", "mean"):
                raise InvalidInputError(f"pooling={pooling!r}: use 'cls' or 'mean'.")
            kwargs["pooling"] = pooling
            # cell embeddings only: a CLS read skips the gene tokens of the layer read
            kwargs["token_states"] = False
        return kwargs

    def _cell_plan(
        self, adata: ad.AnnData, cells: np.ndarray, task: str, **options: Any
    ) -> dict[str, np.ndarray]:
        """Each cell's total counts over ALL its genes and, outside training, its own seed.

        The reference scales cells deeper than 1e5 counts by their total over every gene of
        the AnnData, which the model's gene space does not hold. Seeds are ``seed`` + the
        cell's row in the AnnData: subsampling and masking depend on the cell alone.
        Pretraining draws anew at every step instead (the reference's augmentation).
        """
        matrix = get_matrix(adata, self._setup_args_of(adata).get("layer"))
        plan = {PLAN_DEPTH: cell_depths(matrix, cells)}
        if task != "train":
            seed = options.get("seed", 0)
            if seed is None:
                seed = int(np.random.default_rng().integers(2**31))
            plan[PLAN_SEED] = np.asarray(cells, dtype=np.int64) + int(seed)
        return plan

    # ------------------------------------------------------------------ gene embeddings
    @torch.inference_mode()
    @scfm_dsp.dedent
    def get_gene_embeddings(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        *,
        contextual: bool = True,
        progress_bar: bool = True,
        **options: Any,
    ) -> pd.DataFrame:
        """Gene embeddings, indexed by gene symbol.

        Parameters
        ----------
        %(param_adata)s
        %(param_indices)s
        %(param_batch_size)s
        contextual
            ``True``: last-layer outputs at each expressed gene's token, averaged over the
            cells expressing it. ``False``: the static ``gene_emb`` rows of every vocabulary
            gene (the input of the reference's gene-function recipe), no pass over cells.
        %(param_progress_bar)s
        %(param_options)s

        Returns
        -------
        DataFrame ``genes x enc_dims`` sorted by gene.
        """
        if contextual:
            return super().get_gene_embeddings(
                adata, indices, batch_size, progress_bar=progress_bar, **options
            )
        if adata is not None or indices is not None or options:
            self._prepare(adata, indices, batch_size, "genes", options)  # checks the arguments
        table = self.module.gene_emb.detach().float().cpu().numpy()
        return pd.DataFrame(table[1 : len(self._genes) + 1], index=self._genes).sort_index()
