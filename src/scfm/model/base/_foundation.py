"""The behaviour every scfm model shares, as a mixin for scvi-tools' ``BaseModelClass``.

A model class is assembled like scvi-tools' own models::

    class Geneformer(FoundationModelMixin, UnsupervisedTrainingMixin, BaseModelClass):
        _model_name = "geneformer"
        ...

and implements a few small hooks:

* ``_from_pretrained(path, adata, **kwargs)`` (classmethod): read the original release files,
  build the model with ``cls(adata, ...)`` and load the weights strictly.
* ``_latent_minibatch(tensors, **kwargs) -> Tensor`` : one minibatch of cell embeddings.
* ``_gene_embedding_minibatch(tensors, **kwargs) -> (vocab_ids, embeddings)`` : flattened
  (vocabulary index, contextual embedding) pairs of one minibatch; the mixin averages them
  per gene over all cells. ``_vocab_names()`` gives the gene id of each vocabulary index.
* optionally ``_minibatch_indices(adata, indices, batch_size)`` : how cells are grouped into
  minibatches (e.g. by length to trim padding, or by sentence for CellPLM). Whatever the
  grouping, rows come back in the order of ``indices``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import anndata as ad
import numpy as np
import pandas as pd
import torch
from mudata import MuData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data._constants import _SCVI_UUID_KEY
from scvi.data.fields import CategoricalObsField, LayerField
from tqdm.auto import tqdm

from scfm.data._genes import GeneAlignment
from scfm.data._matrix import count_expressed
from scfm.data._validation import check_anndata, check_counts, check_obs_keys, get_matrix
from scfm.errors import AnnDataKeyError, InvalidInputError, NotSetupError
from scfm.io._common import resolve_local_path

logger = logging.getLogger(__name__)

__all__ = ["FoundationModelMixin", "record_in_uns"]

#: Top-level ``adata.uns`` key under which scfm records what it wrote.
UNS_KEY = "scfm"


def record_in_uns(adata: ad.AnnData, section: str, key: str, info: dict[str, Any]) -> None:
    """Store ``info`` as ``adata.uns["scfm"][section][key]`` (h5ad-writable values only)."""
    root = adata.uns.setdefault(UNS_KEY, {})
    root.setdefault(section, {})[key] = {
        k: (v if isinstance(v, str | int | float | bool) else str(v))
        for k, v in info.items()
        if v is not None
    }


class FoundationModelMixin:
    """Shared user API of scfm models: loading, embeddings, ``key_added`` writers.

    Subclasses set :attr:`_model_name` and implement the hooks listed in the module
    docstring. The class must also derive from :class:`scvi.model.base.BaseModelClass`.
    """

    #: Lower-case model name: CLI name and default key suffix (``X_<name>``).
    _model_name: ClassVar[str] = ""
    #: Minibatch size used when the caller passes none.
    _default_batch_size: ClassVar[int] = 32
    #: Whether ``setup_anndata`` requires raw integer counts.
    _requires_counts: ClassVar[bool] = True
    #: Registry keys a query AnnData may lack (inference does not need them), each with the
    #: ``setup_anndata`` argument naming its column.
    _query_optional_fields: ClassVar[dict[str, str]] = {
        REGISTRY_KEYS.BATCH_KEY: "batch_key",
        REGISTRY_KEYS.LABELS_KEY: "labels_key",
    }

    # Instance attributes filled by ``from_pretrained`` / ``__init__``.
    _checkpoint_path: str | None = None
    gene_alignment: GeneAlignment | None = None

    # ------------------------------------------------------------------ setup
    @classmethod
    def _validate_adata_for_setup(
        cls,
        adata: ad.AnnData,
        layer: str | None,
        obs_keys: Sequence[tuple[str, str | None]] = (),
        *,
        counts: bool | None = None,
    ) -> None:
        """Run every input check ``setup_anndata`` needs, before anything is registered."""
        check_anndata(adata)
        if cls._requires_counts if counts is None else counts:
            check_counts(adata, layer)  # also checks that the layer exists
        else:
            get_matrix(adata, layer)
        check_obs_keys(adata, obs_keys)

    @classmethod
    def _register_anndata(
        cls,
        adata: ad.AnnData,
        setup_method_args: dict,
        *,
        layer: str | None,
        batch_key: str | None,
        labels_key: str | None,
        gene_id_key: str | None,
        extra_fields: Sequence[Any] = (),
        counts: bool | None = None,
        **kwargs: Any,
    ) -> None:
        """Check ``adata`` and register the standard fields plus model-specific ones.

        Models with extra inputs (coordinates, total counts) validate those first, then call
        this with their scvi-tools fields in ``extra_fields``.
        """
        counts = cls._requires_counts if counts is None else counts
        cls._validate_adata_for_setup(
            adata, layer, [("batch_key", batch_key), ("labels_key", labels_key)], counts=counts
        )
        if gene_id_key is not None and gene_id_key not in adata.var.columns:
            raise AnnDataKeyError(
                f"gene_id_key={gene_id_key!r} is not a column of adata.var (columns: "
                f"{', '.join(map(str, adata.var.columns)) or 'none'}). Pass the column with "
                "the model's gene ids, or gene_id_key=None to use adata.var_names."
            )
        fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=counts),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
            CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key),
            *extra_fields,
        ]
        # A copy of a registered AnnData (adata[:n].copy()) inherits its scvi-tools id; with
        # a shared id, registering the copy would unregister the original. Give it its own.
        uuid = adata.uns.get(_SCVI_UUID_KEY)
        registered = cls._setup_adata_manager_store.get(uuid) if uuid is not None else None
        if registered is not None and registered.adata is not adata:
            del adata.uns[_SCVI_UUID_KEY]
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        manager.register_fields(adata, **kwargs)
        cls.register_manager(manager)

    @classmethod
    def setup_anndata(
        cls,
        adata: ad.AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        gene_id_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Register an AnnData of raw counts with the model.

        Parameters
        ----------
        adata
            AnnData of raw counts (cells x genes).
        layer
            Layer holding the raw counts; ``None`` uses ``adata.X``.
        batch_key
            Categorical ``adata.obs`` column with the batch / sample of each cell.
        labels_key
            Categorical ``adata.obs`` column with cell labels (for fine-tuning).
        gene_id_key
            Column of ``adata.var`` with the gene ids the model's vocabulary uses; ``None``
            uses ``adata.var_names``.
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.

        Notes
        -----
        Writes the scvi-tools registration keys ``adata.uns["_scvi_uuid"]``,
        ``adata.uns["_scvi_manager_uuid"]``, ``adata.obs["_scvi_batch"]`` and
        ``adata.obs["_scvi_labels"]``; nothing else of ``adata`` is changed.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        cls._register_anndata(
            adata,
            setup_method_args,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            gene_id_key=gene_id_key,
            **kwargs,
        )

    @classmethod
    def setup_mudata(cls, mdata: MuData, rna_modality: str = "rna", **kwargs: Any) -> None:
        """Register the RNA modality of a :class:`~mudata.MuData` object.

        The model then reads counts from ``mdata.mod[rna_modality]``, and every method that
        takes ``adata`` also accepts ``mdata``; results (``embed``, ``embed_genes``) are written
        into the RNA modality (e.g. ``mdata.mod["rna"].obsm["X_<model>"]``).

        Parameters
        ----------
        mdata
            The MuData object.
        rna_modality
            Name of the RNA modality in ``mdata.mod``.
        **kwargs
            Passed to :meth:`setup_anndata` (``layer``, ``batch_key``, ...; obs keys refer to
            the RNA modality's ``obs``).
        """
        if not isinstance(mdata, MuData):
            raise InvalidInputError(
                f"setup_mudata expects a MuData object, got {type(mdata).__name__}; use "
                "setup_anndata for an AnnData."
            )
        if rna_modality not in mdata.mod:
            raise AnnDataKeyError(
                f"rna_modality={rna_modality!r} is not a modality of the MuData (modalities: "
                f"{', '.join(mdata.mod)}). Pass the name of the RNA modality."
            )
        cls.setup_anndata(mdata.mod[rna_modality], **kwargs)

    @classmethod
    def _registered_modality(cls, data: ad.AnnData | MuData) -> ad.AnnData:
        """The AnnData to work on: ``data`` itself, or the registered modality of a MuData."""
        if not isinstance(data, MuData):
            return data
        registered = [
            name
            for name, mod in data.mod.items()
            if cls._get_most_recent_anndata_manager(mod) is not None
        ]
        if not registered:
            raise NotSetupError(
                f"No modality of the MuData is set up for {cls.__name__}. Call "
                f"scfm.model.{cls.__name__}.setup_mudata(mdata, rna_modality=...) first."
            )
        return data.mod["rna" if "rna" in registered else registered[0]]

    def _validate_anndata(
        self, adata: ad.AnnData | MuData | None = None, copy_if_view: bool = True
    ) -> ad.AnnData:
        if adata is not None:
            adata = self._registered_modality(adata)
            # Every model maps genes by column position (aligned once to its vocabulary), so
            # another AnnData must have exactly the model's genes in the model's order.
            # Checked first: scvi-tools' setup transfer would fail on it less clearly.
            own = getattr(self, "_adata", None)  # unset while BaseModelClass initialises
            if own is not None and adata is not own and not adata.var_names.equals(own.var_names):
                raise InvalidInputError(
                    "adata.var_names differ from those of the AnnData the model was built on "
                    f"({adata.n_vars} vs {own.n_vars} genes, or another order). Subset / "
                    "reorder the genes with adata[:, model.adata.var_names], or build the model "
                    "on this AnnData."
                )
            if getattr(self, "_adata_manager", None) is not None and not adata.is_view:
                try:
                    manager = self.get_anndata_manager(adata)
                except (KeyError, ValueError):
                    # a copy of a registered AnnData: scvi-tools has given it its own id,
                    # then failed to transfer the setup without new categories
                    manager = None
                if manager is None:
                    self._register_manager_for_instance(self._transfer_setup(adata))
        return super()._validate_anndata(adata, copy_if_view=copy_if_view)

    def _transfer_setup(self, adata: ad.AnnData) -> AnnDataManager:
        """Register a query AnnData with the model's setup, as inference needs it.

        scvi-tools refuses a query whose batch or label column holds categories the model's
        AnnData lacked, or that has no such column. Inference never reads those codes as
        model inputs (labels only enter training losses; CellPLM batches only group cells),
        so unseen categories are appended and absent :attr:`_query_optional_fields` are left
        out.
        """
        source = self.adata_manager
        absent = {}
        for field in source.fields:
            key = self.setup_args.get(self._query_optional_fields.get(field.registry_key, ""))
            if key is not None and key not in getattr(adata, field.attr_name):
                absent[field.registry_key] = f"adata.{field.attr_name}[{key!r}]"
        if absent:
            logger.info(
                "The AnnData has no %s of the model's setup; continuing without.",
                ", ".join(absent.values()),
            )
        manager = AnnDataManager(
            fields=[f for f in source.fields if f.registry_key not in absent],
            setup_method_args=source._get_setup_method_args(),
            validation_checks=source.validation_checks,
        )
        manager.register_fields(adata, source.registry, extend_categories=True)
        return manager

    @property
    def setup_args(self) -> dict[str, Any]:
        """The arguments ``setup_anndata`` was called with."""
        return dict(self.adata_manager.registry.get("setup_args", {}))

    @classmethod
    def _require_setup(cls, adata: ad.AnnData) -> None:
        try:
            cls._get_most_recent_anndata_manager(adata, required=True)
        except ValueError:
            raise NotSetupError(
                f"The AnnData is not set up for {cls.__name__}. Call "
                f"scfm.model.{cls.__name__}.setup_anndata(adata, ...) first."
            ) from None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, adata: ad.AnnData, **kwargs: Any
    ) -> FoundationModelMixin:
        """Build the model from the ORIGINAL release files of a checkpoint.

        Parameters
        ----------
        path
            Local directory or file of the released checkpoint. Nothing is downloaded.
        adata
            AnnData registered with ``setup_anndata`` (or a MuData registered with
            ``setup_mudata``); its genes are aligned to the model's
            vocabulary and the match is reported in ``adata.uns["scfm"]``.
        **kwargs
            Model-specific options (see the model class).

        Returns
        -------
        The model in eval mode with the checkpoint's weights.

        Raises
        ------
        CheckpointNotFoundError
            If ``path`` does not exist.
        NotSetupError
            If ``adata`` was not registered with ``setup_anndata``.
        """
        local = resolve_local_path(path)
        adata = cls._registered_modality(adata)
        cls._require_setup(adata)
        model = cls._from_pretrained(local, adata, **kwargs)
        model._checkpoint_path = str(local)
        model.is_trained_ = True
        model.module.eval()
        model._refresh_summary()
        return model

    @classmethod
    def _from_pretrained(cls, path, adata: ad.AnnData, **kwargs: Any):  # pragma: no cover
        raise NotImplementedError(f"{cls.__name__} does not define _from_pretrained")

    def _set_gene_alignment(self, adata: ad.AnnData, alignment: GeneAlignment) -> None:
        """Remember the gene alignment and report it in ``adata.uns["scfm"]``."""
        self.gene_alignment = alignment
        record_in_uns(adata, "gene_alignment", self._model_name, alignment.to_dict())
        self._refresh_summary()

    def _refresh_summary(self) -> None:
        parts = [f"{type(self).__name__} ({self._model_name})"]
        if self._checkpoint_path is not None:
            parts.append(f"checkpoint: {self._checkpoint_path}")
        else:
            parts.append("randomly initialised")
        if self.gene_alignment is not None:
            parts.append(str(self.gene_alignment))
        n_params = sum(p.numel() for p in self.module.parameters())
        parts.append(f"{n_params:,} parameters")
        self._model_summary_string = "; ".join(parts)

    # ------------------------------------------------------------------ iteration
    #: Cells per length-sorting window: cells are sorted by token length within windows of
    #: this many minibatches, which trims padding while keeping disk reads local.
    _length_window_batches: ClassVar[int] = 64

    def _length_columns(self) -> np.ndarray | None:
        """``adata.var`` positions whose expressed count is a cell's sequence length.

        Token models return the genes in their vocabulary so that minibatches group cells of
        similar length; ``None`` (default) keeps cells in order.
        """
        return None

    def _minibatch_indices(
        self, adata: ad.AnnData, cells: np.ndarray, batch_size: int
    ) -> list[np.ndarray]:
        """Group ``cells`` into minibatches, by length where :meth:`_length_columns` says so."""
        columns = self._length_columns()
        if columns is not None and len(cells) > batch_size:
            layer = self.adata_manager.registry["setup_args"].get("layer")
            lengths = count_expressed(get_matrix(adata, layer), cells, columns)
            window = batch_size * self._length_window_batches
            ordered = np.concatenate(
                [
                    cells[i : i + window][np.argsort(-lengths[i : i + window], kind="stable")]
                    for i in range(0, len(cells), window)
                ]
            )
        else:
            ordered = cells
        return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]

    def _resolve_indices(
        self, adata: ad.AnnData, indices: Sequence[int] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Validate ``indices``; return the sorted unique cells and the map back to ``indices``."""
        if indices is None:
            unique = np.arange(adata.n_obs)
            return unique, unique
        arr = np.asarray(indices)
        if arr.dtype == bool:
            arr = np.flatnonzero(arr)
        if (
            arr.ndim != 1
            or not np.issubdtype(arr.dtype, np.integer)
            or (len(arr) and (arr.min() < 0 or arr.max() >= adata.n_obs))
        ):
            raise InvalidInputError(
                f"indices must be a 1-d array of cell positions in [0, {adata.n_obs})."
            )
        unique, inverse = np.unique(arr.astype(np.int64), return_inverse=True)
        return unique, inverse

    def _iterate(
        self,
        adata: ad.AnnData,
        cells: np.ndarray,
        batch_size: int | None,
        desc: str,
        progress_bar: bool = True,
    ) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
        """Yield ``(positions, tensors)`` per minibatch; positions index into ``cells``.

        ``cells`` are sorted unique cell positions in ``adata``.
        """
        batch_size = self._default_batch_size if batch_size is None else int(batch_size)
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}.")
        groups = self._minibatch_indices(adata, cells, batch_size)
        for group in tqdm(groups, desc=desc, unit="batch", disable=not progress_bar):
            # Sorted reads are required for backed AnnData and make the row order explicit.
            group = np.sort(np.asarray(group, dtype=np.int64))
            loader = self._make_data_loader(
                adata=adata, indices=group, batch_size=len(group), shuffle=False
            )
            tensors = next(iter(loader))
            yield np.searchsorted(cells, group), tensors

    # ------------------------------------------------------------------ training
    def train(self, *args: Any, **kwargs: Any) -> Any:
        """Train with the model's objective through scvi-tools' TrainRunner and Lightning.

        Arguments are those of :meth:`scvi.model.base.UnsupervisedTrainingMixin.train`
        (``max_epochs``, ``accelerator``, ``devices``, ``strategy``, ``precision``,
        ``datamodule``, ``plan_kwargs``, ...). The module is put in training mode (dropout
        on) for the run and back in eval mode afterwards, and the history of the first run
        after :meth:`from_pretrained` is recorded in :attr:`history`.
        """
        was_trained = bool(self.is_trained_)
        if was_trained and not self.history_:
            # scvi-tools only appends to an existing history once a model counts as trained;
            # a freshly loaded checkpoint has none, so let the runner start one.
            self.is_trained_ = False
        self.module.train()
        try:
            return super().train(*args, **kwargs)
        finally:
            self.module.eval()
            self.is_trained_ = self.is_trained_ or was_trained

    # ------------------------------------------------------------------ precision
    _autocast_dtype: torch.dtype | None = None

    @contextlib.contextmanager
    def inference_precision(self, precision: str | torch.dtype | None) -> Iterator[None]:
        """Run inference inside the block under :func:`torch.autocast` (mixed precision).

        Parameters
        ----------
        precision
            ``"bf16"`` / ``torch.bfloat16``, ``"16"`` / ``torch.float16`` (CUDA), or
            ``None`` / ``"32"`` for full float32 (the parity setting).

        Examples
        --------
        >>> with model.inference_precision("bf16"):
        ...     z = model.get_latent_representation()
        """
        names = {"bf16": torch.bfloat16, "16": torch.float16, "32": None, None: None}
        if isinstance(precision, torch.dtype):
            dtype = None if precision == torch.float32 else precision
        elif precision in names:
            dtype = names[precision]
        else:
            raise InvalidInputError(
                f"precision={precision!r} is not supported; use 'bf16', '16' or '32'."
            )
        previous, self._autocast_dtype = self._autocast_dtype, dtype
        try:
            yield
        finally:
            self._autocast_dtype = previous

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.module.device.type, dtype=self._autocast_dtype)

    # ------------------------------------------------------------------ embeddings
    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        *,
        progress_bar: bool = True,
        **kwargs: Any,
    ) -> np.ndarray:
        """Cell embeddings, exactly as the reference model defines them.

        Parameters
        ----------
        adata
            AnnData set up like the model's; ``None`` uses the model's AnnData.
        indices
            Cells to embed (positions); ``None`` embeds all.
        batch_size
            Cells per minibatch.
        progress_bar
            Show a progress bar.
        **kwargs
            Model-specific options (pooling, layer, ...).

        Returns
        -------
        Array of shape ``(len(indices), n_latent)``, rows in the order of ``indices``.
        """
        adata = self._validate_anndata(adata)
        cells, inverse = self._resolve_indices(adata, indices)
        self.module.eval()
        out: np.ndarray | None = None
        for positions, tensors in self._iterate(
            adata, cells, batch_size, f"{self._model_name} embeddings", progress_bar
        ):
            with self._autocast():
                z = self._latent_minibatch(tensors, **kwargs)
            z = z.detach().float().cpu().numpy()
            if out is None:
                out = np.zeros((len(cells), z.shape[1]), dtype=np.float32)
            out[positions] = z
        if out is None:
            raise InvalidInputError("No cells selected: pass at least one index.")
        return out[inverse]

    def _latent_minibatch(self, tensors: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    @torch.inference_mode()
    def get_gene_embeddings(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        *,
        progress_bar: bool = True,
        **kwargs: Any,
    ) -> pd.DataFrame:
        """Gene embeddings: each gene's contextual embedding averaged over the cells.

        Parameters
        ----------
        adata
            AnnData set up like the model's; ``None`` uses the model's AnnData.
        indices
            Cells to average over; ``None`` uses all.
        batch_size
            Cells per minibatch.
        progress_bar
            Show a progress bar.
        **kwargs
            Model-specific options.

        Returns
        -------
        DataFrame indexed by gene id (the model vocabulary's ids), one row per gene seen in
        at least one cell, sorted by id.
        """
        adata = self._validate_anndata(adata)
        cells, _ = self._resolve_indices(adata, indices)
        self.module.eval()
        sums: torch.Tensor | None = None
        counts: torch.Tensor | None = None
        for _, tensors in self._iterate(
            adata, cells, batch_size, f"{self._model_name} gene embeddings", progress_bar
        ):
            with self._autocast():
                ids, emb = self._gene_embedding_minibatch(tensors, **kwargs)
            ids = ids.reshape(-1).cpu()
            emb = emb.reshape(len(ids), -1).double().cpu()
            if sums is None:
                n_vocab = len(self._vocab_names())
                sums = torch.zeros(n_vocab, emb.shape[1], dtype=torch.float64)
                counts = torch.zeros(n_vocab, dtype=torch.float64)
            sums.index_add_(0, ids, emb)
            counts.index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
        if sums is None or counts is None:
            raise InvalidInputError("No cells selected: pass at least one index.")
        seen = torch.nonzero(counts > 0).squeeze(1)
        means = (sums[seen] / counts[seen, None]).float().numpy()
        names = np.asarray(self._vocab_names(), dtype=object)[seen.numpy()]
        frame = pd.DataFrame(means, index=pd.Index(names, name="gene_id"))
        return frame.sort_index()

    def _gene_embedding_minibatch(
        self, tensors: dict[str, torch.Tensor], **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover

    def _vocab_names(self) -> Sequence[str]:
        raise NotImplementedError  # pragma: no cover

    # ------------------------------------------------------------------ key_added writers
    @property
    def default_key(self) -> str:
        """Default ``key_added``: ``"X_<model name>"``."""
        return f"X_{self._model_name}"

    def embed(
        self,
        adata: ad.AnnData | None = None,
        key_added: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Write cell embeddings to ``adata.obsm[key_added]`` (scanpy style).

        Parameters
        ----------
        adata
            AnnData set up like the model's; ``None`` uses the model's AnnData.
        key_added
            ``.obsm`` key; default ``"X_<model name>"``. The call's parameters are recorded
            in ``adata.uns["scfm"]["obsm"][key_added]``.
        **kwargs
            Passed to :meth:`get_latent_representation`.
        """
        target = self._validate_anndata(adata)
        key = key_added or self.default_key
        z = self.get_latent_representation(target, **kwargs)
        target.obsm[key] = z
        record_in_uns(target, "obsm", key, self._provenance(kwargs))

    def embed_genes(
        self,
        adata: ad.AnnData | None = None,
        key_added: str | None = None,
        **kwargs: Any,
    ) -> pd.DataFrame:
        """Write gene embeddings to ``adata.varm[key_added]``, aligned to ``adata.var_names``.

        Genes the model does not know (or that are never expressed) get ``NaN`` rows.

        Parameters
        ----------
        adata
            AnnData set up like the model's; ``None`` uses the model's AnnData.
        key_added
            ``.varm`` key; default ``"X_<model name>"``.
        **kwargs
            Passed to :meth:`get_gene_embeddings`.

        Returns
        -------
        The gene embedding DataFrame (indexed by vocabulary gene id).
        """
        target = self._validate_anndata(adata)
        key = key_added or self.default_key
        genes = self.get_gene_embeddings(target, **kwargs)
        target.varm[key] = self._align_gene_frame(target, genes)
        record_in_uns(target, "varm", key, self._provenance(kwargs))
        return genes

    def _align_gene_frame(self, adata: ad.AnnData, genes: pd.DataFrame) -> np.ndarray:
        """Rows of ``genes`` (indexed by vocabulary id) in ``adata.var`` order, NaN if absent."""
        out = np.full((adata.n_vars, genes.shape[1]), np.nan, dtype=np.float32)
        alignment = self.gene_alignment
        if alignment is None:
            raise InvalidInputError("The model has no gene alignment; load it first.")
        vocab = np.asarray(self._vocab_names(), dtype=object)
        row_of = {g: i for i, g in enumerate(genes.index)}
        values = genes.to_numpy(dtype=np.float32)
        for var_pos, vocab_pos in zip(alignment.var_index, alignment.vocab_index):
            row = row_of.get(vocab[vocab_pos])
            if row is not None:
                out[var_pos] = values[row]
        return out

    def _provenance(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        info: dict[str, Any] = {"model": type(self).__name__}
        if self._checkpoint_path is not None:
            info["checkpoint"] = self._checkpoint_path
        info.update({k: v for k, v in kwargs.items() if isinstance(v, str | int | float | bool)})
        return info
