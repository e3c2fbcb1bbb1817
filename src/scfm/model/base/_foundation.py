"""The user API every scfm model shares, as a mixin for scvi-tools' ``BaseModelClass``.

A model class is assembled like scvi-tools' own models::

    class Geneformer(FoundationModelMixin, UnsupervisedTrainingMixin, BaseModelClass):
        _model_name = "geneformer"

and implements a few hooks; everything public is written here, once:

* ``_from_pretrained(path, adata, **options)`` (classmethod): read the original release
  (``scfm.io`` returns a :class:`~scfm.io._common.Release`), validate its config against the
  weight shapes, build the model and load the weights strictly.
* ``vocabulary`` (property): the model's gene ids, in the order of the module's gene space.
* ``_align_genes(adata) -> GeneAlignment``: which AnnData column feeds which model gene.
* ``_inference_kwargs(task, **options) -> dict``: check the call's options and turn them
  into ``module.inference`` arguments (``task`` is ``"latent"``, ``"genes"``, ``"predict"``,
  ``"expression"`` or ``"train"``).
* optionally ``_cell_plan(adata, cells, task, **options)``: per-cell arrays of the call,
  ``_minibatch_groups(...)``: how cells form minibatches, ``_static_gene_embeddings()``.

Every path reads its minibatches through one loader per call (:mod:`scfm.data._loader`),
maps the AnnData's genes into the model's gene space, checks the values it reads, and calls
``module.inference(**module._get_inference_input(tensors), **kwargs)``, which returns a
:class:`~scfm.module._outputs.ModuleOutput`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
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
from scfm.data._loader import CELL_INDEX_KEY, CellDataset, GeneSpace, make_loader
from scfm.data._matrix import count_expressed
from scfm.data._validation import (
    check_anndata,
    check_count_values,
    check_counts,
    check_key_added,
    check_obs_keys,
    get_matrix,
)
from scfm.errors import (
    AnnDataKeyError,
    GeneVocabularyError,
    InvalidInputError,
    NonFiniteOutputError,
    NotSetupError,
)
from scfm.model.base._classifier import ClassifierMixin
from scfm.model.base._docs import scfm_dsp
from scfm.model.base._save import SafeSaveMixin
from scfm.model.base._training import CellDataSplitter, PretrainingPlan, ScfmTrainRunner
from scfm.module._checks import is_int
from scfm.module._outputs import ModuleOutput

logger = logging.getLogger(__name__)

__all__ = ["FoundationModelMixin", "record_in_uns"]

#: Top-level ``adata.uns`` key under which scfm records what it wrote.
UNS_KEY = "scfm"
#: A meaningful overlap: at least this share of the AnnData's counts on matched genes ...
_MIN_COUNT_SHARE = 0.2
#: ... and at least this many matched genes (or a quarter of a small vocabulary).
_MIN_MATCHED_GENES = 50
#: Cells read to measure the count share of matched genes.
_OVERLAP_SAMPLE_CELLS = 2_000
#: AnnData gene maps a model keeps (one per gene set it was called on).
_GENE_SPACE_CACHE = 8


def record_in_uns(adata: ad.AnnData, section: str, key: str, info: dict[str, Any]) -> None:
    """Store ``info`` as ``adata.uns["scfm"][section][key]`` (h5ad-writable values only)."""
    root = adata.uns.setdefault(UNS_KEY, {})
    if not isinstance(root, dict):
        raise InvalidInputError(
            f"adata.uns[{UNS_KEY!r}] is a {type(root).__name__}, not a dict; scfm records its "
            f"outputs there. Rename or delete adata.uns[{UNS_KEY!r}] first."
        )
    root.setdefault(section, {})[key] = {
        k: (v if isinstance(v, str | int | float | bool) else str(v))
        for k, v in info.items()
        if v is not None
    }


@contextlib.contextmanager
def unchanged_on_failure(adata: ad.AnnData) -> Iterator[None]:
    """Undo what a failed call added to ``adata`` (uns keys, scvi-tools obs columns)."""
    uns_keys = set(adata.uns.keys())
    obs_columns = set(adata.obs.columns)
    saved = copy.deepcopy(adata.uns.get(UNS_KEY)) if UNS_KEY in adata.uns else None
    try:
        yield
    except BaseException:
        for key in set(adata.uns.keys()) - uns_keys:
            del adata.uns[key]
        if saved is not None:
            adata.uns[UNS_KEY] = saved
        extra = [c for c in adata.obs.columns if c not in obs_columns]
        if extra:
            adata.obs.drop(columns=extra, inplace=True)
        raise


@dataclass
class _Call:
    """Everything one call over cells needs, resolved before any forward pass."""

    adata: ad.AnnData
    manager: AnnDataManager
    cells: np.ndarray  # sorted unique rows of adata
    inverse: np.ndarray  # maps results (per cell in `cells`) back to the caller's order
    alignment: GeneAlignment
    space: GeneSpace
    kwargs: dict[str, Any]
    plan: dict[str, np.ndarray] = field(default_factory=dict)
    groups: list[np.ndarray] = field(default_factory=list)


class FoundationModelMixin(ClassifierMixin, SafeSaveMixin):
    """Shared user API of scfm models: loading, embeddings, decoding, training, writers.

    Subclasses set :attr:`_model_name` and implement the hooks listed in the module
    docstring. The class must also derive from :class:`scvi.model.base.BaseModelClass` (and
    :class:`scvi.model.base.UnsupervisedTrainingMixin` for :meth:`train`).
    """

    #: Lower-case model name: CLI name and default key suffix (``X_<name>``).
    _model_name: ClassVar[str] = ""
    #: Minibatch size used when the caller passes none.
    _default_batch_size: ClassVar[int] = 32
    #: Whether the model reads raw integer counts.
    _requires_counts: ClassVar[bool] = True
    #: Whether minibatches group cells of similar length (token models: less padding).
    _sort_by_length: ClassVar[bool] = False
    #: Cells per length-sorting window: cells are sorted by length within windows of this
    #: many minibatches, which trims padding while keeping disk reads local.
    _length_window_batches: ClassVar[int] = 64
    #: Whether the module decodes expression (``ModuleOutput.expression``).
    _has_decoder: ClassVar[bool] = False
    #: Whether inference minibatches carry only the genes expressed in them
    #: (``CellDataset(compact=True)``), for modules whose input reads only those genes.
    _compact_minibatches: ClassVar[bool] = False
    #: setup_anndata arguments naming columns a query AnnData may lack (inference does not
    #: read them).
    _query_optional_args: ClassVar[tuple[str, ...]] = ("batch_key", "labels_key")
    _data_splitter_cls = CellDataSplitter
    _training_plan_cls = PretrainingPlan
    _train_runner_cls = ScfmTrainRunner

    _checkpoint_path: str | None = None

    # ------------------------------------------------------------------ hooks
    @classmethod
    def _from_pretrained(cls, path, adata: ad.AnnData, **options: Any):  # pragma: no cover
        raise NotImplementedError(f"{cls.__name__} does not define _from_pretrained")

    @property
    def vocabulary(self) -> pd.Index:
        """The model's gene ids, in the order of its gene space (module input columns)."""
        raise NotImplementedError  # pragma: no cover

    def _align_genes(self, adata: ad.AnnData) -> GeneAlignment:
        raise NotImplementedError  # pragma: no cover

    def _inference_kwargs(self, task: str, **options: Any) -> dict[str, Any]:
        if options:
            raise InvalidInputError(
                f"{type(self).__name__} has no option {', '.join(map(repr, sorted(options)))}."
            )
        return {}

    def _cell_plan(
        self, adata: ad.AnnData, cells: np.ndarray, task: str, **options: Any
    ) -> dict[str, np.ndarray]:
        """Per-cell arrays of a call (row ``i`` belongs to ``cells[i]``); none by default."""
        return {}

    def _minibatch_groups(
        self,
        adata: ad.AnnData,
        cells: np.ndarray,
        batch_size: int,
        plan: dict[str, np.ndarray],
        space: GeneSpace,
    ) -> list[np.ndarray]:
        """Positions into ``cells`` of each minibatch; by length when :attr:`_sort_by_length`."""
        positions = np.arange(len(cells))
        if self._sort_by_length and len(cells) > batch_size:
            matrix = get_matrix(adata, self._setup_args_of(adata).get("layer"))
            lengths = count_expressed(matrix, cells, space.var_columns)
            window = batch_size * self._length_window_batches
            positions = np.concatenate(
                [
                    positions[i : i + window][np.argsort(-lengths[i : i + window], kind="stable")]
                    for i in range(0, len(cells), window)
                ]
            )
        return [positions[i : i + batch_size] for i in range(0, len(positions), batch_size)]

    def _streamed_plan(self, obs: pd.DataFrame, task: str) -> dict[str, np.ndarray]:
        """Per-cell plan of a streamed minibatch (no AnnData), from its ``obs`` rows.

        Used by :class:`~scfm.data.SomaDataModule`; plans that need a whole AnnData are not
        available there. None by default.
        """
        return {}

    def _requires_integer(self, setup_args: dict[str, Any]) -> bool:
        """Whether an AnnData set up with ``setup_args`` must hold integer counts."""
        return self._requires_counts and not setup_args.get("allow_non_integer", False)

    def _static_gene_embeddings(self) -> pd.DataFrame | None:
        """Gene embeddings that are rows of the weights (no pass over cells); none by default."""
        return None

    # ------------------------------------------------------------------ setup
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
        allow_non_integer: bool = False,
        check_gene_overlap: bool = True,
        counts: bool = True,
        extra_fields: Sequence[Any] = (),
        **kwargs: Any,
    ) -> None:
        """Check ``adata`` and register the standard fields plus model-specific ones.

        Models with extra inputs (coordinates, total counts) validate those first, then call
        this with their scvi-tools fields in ``extra_fields``. ``counts=False`` says the
        values are not counts by design (e.g. scFoundation's pre-normalised input): they must
        be finite and non-negative, nothing more, and no warning is given. Nothing is written
        to ``adata`` unless every check passes.
        """
        check_anndata(adata)
        if adata.is_view:
            raise InvalidInputError(
                "adata is a view (a subset of another AnnData); setup_anndata registers fields "
                "in it. Pass a copy: adata = adata[cells].copy()."
            )
        non_integer = check_counts(adata, layer, integer=counts and not allow_non_integer)
        if non_integer and counts:
            warnings.warn(
                "The expression matrix holds non-integer values; they are used as counts "
                "(allow_non_integer=True). The models were trained on raw integer counts.",
                UserWarning,
                stacklevel=3,
            )
        check_obs_keys(adata, [("batch_key", batch_key), ("labels_key", labels_key)])
        if gene_id_key is not None and gene_id_key not in adata.var.columns:
            raise AnnDataKeyError(
                f"gene_id_key={gene_id_key!r} is not a column of adata.var (columns: "
                f"{', '.join(map(str, adata.var.columns)) or 'none'}). Pass the column with "
                "the model's gene ids, or gene_id_key=None to use adata.var_names."
            )
        fields = [
            # scfm checks the values itself (above, and every minibatch it reads); scvi-tools'
            # own count check does not understand scipy's sparse arrays (csr_array).
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
            CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key),
            *extra_fields,
        ]
        # scvi-tools has no public way to re-register an AnnData that carries another
        # AnnData's id: a copy of a registered AnnData (adata[:n].copy()) inherits its id,
        # and registering the copy would unregister the original. Give the copy its own.
        uuid = adata.uns.get(_SCVI_UUID_KEY)
        registered = cls._setup_adata_manager_store.get(uuid) if uuid is not None else None
        with unchanged_on_failure(adata):
            if registered is not None and registered.adata is not adata:
                del adata.uns[_SCVI_UUID_KEY]
            manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
            manager.register_fields(adata, **kwargs)
            cls.register_manager(manager)

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
        **kwargs: Any,
    ) -> None:
        """Register an AnnData of raw counts with the model.

        Parameters
        ----------
        adata
            AnnData of raw counts (cells x genes).
        %(param_layer)s
        %(param_batch_key)s
        %(param_labels_key)s
        %(param_gene_id_key)s
        %(param_allow_non_integer)s
        %(param_check_gene_overlap)s
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
            allow_non_integer=allow_non_integer,
            check_gene_overlap=check_gene_overlap,
            **kwargs,
        )

    @classmethod
    def setup_mudata(cls, mdata: MuData, rna_modality: str = "rna", **kwargs: Any) -> None:
        """Register the RNA modality of a :class:`~mudata.MuData` object.

        The model then reads counts from ``mdata.mod[rna_modality]``, and every method that
        takes ``adata`` also accepts ``mdata``; results are written into the RNA modality
        (e.g. ``mdata.mod["rna"].obsm["X_<model>"]``).

        Parameters
        ----------
        mdata
            The MuData object.
        rna_modality
            Name of the RNA modality in ``mdata.mod``.
        **kwargs
            Passed to :meth:`setup_anndata` (obs keys refer to the RNA modality's ``obs``).
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
        registered = [name for name, mod in data.mod.items() if cls._own_manager(mod) is not None]
        if not registered:
            raise NotSetupError(
                f"No modality of the MuData is set up for {cls.__name__}. Call "
                f"scfm.model.{cls.__name__}.setup_mudata(mdata, rna_modality=...) first."
            )
        return data.mod["rna" if "rna" in registered else registered[0]]

    @classmethod
    def _own_manager(cls, adata: ad.AnnData) -> AnnDataManager | None:
        """The class's manager registered for this very AnnData (not for one it was copied from)."""
        try:
            manager = cls._get_most_recent_anndata_manager(adata)
        except ValueError:  # scvi-tools: a copy carrying another AnnData's registration
            return None
        return manager if manager is not None and manager.adata is adata else None

    @classmethod
    def _require_setup(cls, adata: ad.AnnData) -> AnnDataManager:
        if not isinstance(adata, ad.AnnData):
            raise InvalidInputError(
                f"Expected an AnnData (or MuData) object, got {type(adata).__name__}."
            )
        manager = cls._own_manager(adata)
        if manager is None:
            raise NotSetupError(
                f"The AnnData is not set up for {cls.__name__}. Call "
                f"scfm.model.{cls.__name__}.setup_anndata(adata, ...) first."
            )
        return manager

    def _validate_anndata(
        self, adata: ad.AnnData | MuData | None = None, copy_if_view: bool = True
    ) -> ad.AnnData:
        """The AnnData to read, registered with this model instance.

        Any AnnData set up for the class works, whatever its genes (they are aligned per
        AnnData). One that was not set up is registered with the model's own setup, leaving
        out batch / label columns it lacks (inference does not read them).
        """
        if adata is None:
            adata = self.adata
        adata = self._registered_modality(adata)
        if not isinstance(adata, ad.AnnData):
            raise InvalidInputError(
                f"Expected an AnnData (or MuData) object, got {type(adata).__name__}."
            )
        if adata.is_view:
            raise InvalidInputError(
                "adata is a view (a subset of another AnnData). Pass the full AnnData with "
                "indices=..., or a copy: adata[cells].copy()."
            )
        own = self._own_manager(adata)
        if own is None:
            # Not set up, or a copy carrying another AnnData's registration (scvi-tools would
            # try to transfer the model's categories onto it and fail on new ones).
            self._register_manager_for_instance(self._setup_query(adata))
            return adata
        if self.get_anndata_manager(adata) is own:
            own.validate()
        else:  # first use by this model, or set up again since (new setup arguments)
            self._register_manager_for_instance(own)
        return adata

    def _setup_query(self, adata: ad.AnnData) -> AnnDataManager:
        """Register a query AnnData that was not set up with the model's own setup."""
        return self._setup_like(adata, self.setup_args)

    @classmethod
    def _setup_like(cls, adata: ad.AnnData, setup_args: dict[str, Any]) -> AnnDataManager:
        """Set ``adata`` up with ``setup_args``, leaving out optional columns it lacks."""
        args = {k: v for k, v in setup_args.items() if k in cls._setup_arg_names()}
        absent = []
        for a in cls._query_optional_args:
            if args.get(a) is not None and args[a] not in adata.obs.columns:
                absent.append(f"adata.obs[{args[a]!r}]")
                args[a] = None
        if absent:
            logger.info("The AnnData has no %s; inference does not need it.", ", ".join(absent))
        cls.setup_anndata(adata, **args)
        return cls._get_most_recent_anndata_manager(adata, required=True)

    @classmethod
    def _setup_arg_names(cls) -> set[str]:
        import inspect

        return set(inspect.signature(cls.setup_anndata).parameters) - {"adata", "kwargs"}

    @property
    def setup_args(self) -> dict[str, Any]:
        """The arguments ``setup_anndata`` was called with for the model's AnnData."""
        return dict(self.adata_manager.registry.get("setup_args", {}))

    def _setup_args_of(self, adata: ad.AnnData) -> dict[str, Any]:
        manager = self.get_anndata_manager(adata, required=True)
        return dict(manager.registry.get("setup_args", {}))

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        adata: ad.AnnData | MuData,
        *,
        download: bool | None = None,
        **options: Any,
    ) -> FoundationModelMixin:
        """Build the model from the ORIGINAL release files of a checkpoint.

        Parameters
        ----------
        path
            Local folder (or file) of the released checkpoint, or the name of a release in
            the catalogue (:func:`scfm.hub.releases`), read from the cache.
        adata
            AnnData registered with ``setup_anndata`` (or a MuData registered with
            ``setup_mudata``); the gene match is recorded in
            ``adata.uns["scfm"]["gene_alignment"]``.
        download
            For a release name: download it when it is not cached. ``None`` follows the
            environment (see :func:`scfm.hub.resolve`).
        **options
            Options of the release (see the model class), e.g. CellFM ``n_heads``, CellPLM
            ``prefix``, scFoundation ``weights``, ``trust_checkpoint``.

        Returns
        -------
        The model in eval mode with the checkpoint's weights.

        Raises
        ------
        CheckpointNotFoundError
            If ``path`` is neither a local path nor a cached (or downloadable) release.
        NotSetupError
            If ``adata`` was not registered with ``setup_anndata``.
        """
        adata = cls._registered_modality(adata)
        cls._require_setup(adata)
        local, release_options = _resolve_release(path, cls.__name__, download)
        options = {**release_options, **options}
        with unchanged_on_failure(adata):
            model = cls._from_pretrained(local, adata, **options)
            # a reader may name the exact release file (e.g. CellPLM's prefix) itself
            model._checkpoint_path = model._checkpoint_path or str(local)
            model.module.eval()
            model._record_alignment(adata)
            model._refresh_summary()
        return model

    def _refresh_summary(self) -> None:
        parts = [f"{type(self).__name__} ({self._model_name})"]
        if self._checkpoint_path is not None:
            parts.append(f"weights: {self._checkpoint_path}")
        elif self.is_trained_:
            parts.append("trained")
        else:
            parts.append("randomly initialised")
        if self.classifier_labels:
            parts.append(f"classifier over {len(self.classifier_labels)} labels")
        n_params = sum(p.numel() for p in self.module.parameters())
        parts.append(f"{n_params:,} parameters")
        self._model_summary_string = "; ".join(parts)

    # ------------------------------------------------------------------ genes
    def _gene_space(self, adata: ad.AnnData) -> tuple[GeneAlignment, GeneSpace]:
        """The alignment of ``adata``'s genes to the vocabulary (cached per gene set)."""
        args = self._setup_args_of(adata)
        key_col = args.get("gene_id_key")
        ids = adata.var[key_col].astype(str) if key_col else adata.var_names.astype(str)
        digest = hashlib.sha1(
            "\x1f".join([str(key_col), *ids]).encode(), usedforsecurity=False
        ).hexdigest()
        cache = self.__dict__.setdefault("_gene_spaces", OrderedDict())
        if digest not in cache:
            alignment = self._align_genes(adata)
            if args.get("check_gene_overlap", True):
                self._check_overlap(adata, alignment, args.get("layer"))
            space = GeneSpace.from_pairs(
                alignment.var_index, alignment.vocab_index, adata.n_vars, len(self.vocabulary)
            )
            cache[digest] = (alignment, space)
            while len(cache) > _GENE_SPACE_CACHE:
                cache.popitem(last=False)
        return cache[digest]

    def _check_overlap(
        self, adata: ad.AnnData, alignment: GeneAlignment, layer: str | None
    ) -> None:
        """Refuse an overlap too small to be meaningful (wrong species, id type or case)."""
        n_vocab = len(self.vocabulary)
        needed = min(_MIN_MATCHED_GENES, max(1, n_vocab // 4))
        matrix = get_matrix(adata, layer)
        block = matrix[: min(adata.n_obs, _OVERLAP_SAMPLE_CELLS)]
        totals = np.asarray(block.sum(axis=0)).ravel()
        total = float(totals.sum())
        unique_var = np.unique(alignment.var_index)
        share = float(totals[unique_var].sum()) / total if total > 0 else 1.0
        if alignment.n_matched >= needed and share >= _MIN_COUNT_SHARE:
            return
        var = adata.var_names[:3].tolist()
        raise GeneVocabularyError(
            f"Only {len(unique_var)} of {adata.n_vars} genes of the AnnData "
            f"({share:.0%} of its counts) match the {type(self).__name__} vocabulary "
            f"({n_vocab} genes, e.g. {', '.join(map(str, self._example_genes()))}); the AnnData's "
            f"ids look like {', '.join(map(str, var))}. Likely causes: another species, another "
            "id type (symbols vs Ensembl ids: pass gene_id_key='<adata.var column>'), or "
            "another case. For a targeted panel that really is this small, pass "
            "setup_anndata(..., check_gene_overlap=False)."
        )

    def _example_genes(self) -> list[str]:
        vocab = self.vocabulary
        genes = [g for g in vocab if not str(g).startswith(("<", "["))]
        return genes[:2]

    def _record_alignment(self, adata: ad.AnnData) -> GeneAlignment:
        alignment, _ = self._gene_space(adata)
        record_in_uns(adata, "gene_alignment", self._model_name, alignment.to_dict())
        return alignment

    @property
    def gene_alignment(self) -> GeneAlignment:
        """How the genes of the model's own AnnData line up with its vocabulary."""
        return self._gene_space(self.adata)[0]

    # ------------------------------------------------------------------ calls over cells
    def _resolve_indices(
        self, adata: ad.AnnData, indices: Sequence[int] | np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Validate ``indices``; return the sorted unique cells and the map back to ``indices``."""
        if indices is None:
            unique = np.arange(adata.n_obs)
            return unique, unique
        arr = np.asarray(indices)
        if arr.dtype == bool:
            if arr.shape != (adata.n_obs,):
                raise InvalidInputError(
                    f"A boolean indices mask must have one entry per cell ({adata.n_obs})."
                )
            arr = np.flatnonzero(arr)
        if (
            arr.ndim != 1
            or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0)
            or (len(arr) and (arr.min() < 0 or arr.max() >= adata.n_obs))
        ):
            raise InvalidInputError(
                f"indices must be a 1-d array of cell positions in [0, {adata.n_obs})."
            )
        if arr.size == 0:
            raise InvalidInputError("No cells selected: pass at least one index.")
        unique, inverse = np.unique(arr.astype(np.int64), return_inverse=True)
        return unique, inverse

    def _prepare(
        self,
        adata: ad.AnnData | MuData | None,
        indices: Sequence[int] | np.ndarray | None,
        batch_size: int | None,
        task: str,
        options: dict[str, Any],
    ) -> _Call:
        """Resolve and check everything of a call before any forward pass."""
        adata = self._validate_anndata(adata)
        kwargs = self._inference_kwargs(task, **options)
        batch_size = self._default_batch_size if batch_size is None else batch_size
        if not is_int(batch_size):
            raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}.")
        cells, inverse = self._resolve_indices(adata, indices)
        alignment, space = self._gene_space(adata)
        call = _Call(
            adata=adata,
            manager=self.get_anndata_manager(adata, required=True),
            cells=cells,
            inverse=inverse,
            alignment=alignment,
            space=space,
            kwargs=kwargs,
        )
        call.plan = dict(self._cell_plan(adata, cells, task, **options) or {})
        call.groups = self._minibatch_groups(adata, cells, int(batch_size), call.plan, space)
        return call

    def _value_check(self, adata: ad.AnnData):
        """The check every minibatch's raw values pass before the model sees them."""
        args = self._setup_args_of(adata)
        layer = args.get("layer")
        name = f"adata.layers[{layer!r}]" if layer is not None else "adata.X"
        integer = self._requires_integer(args)
        obs_names = adata.obs_names

        def check(values, rows: np.ndarray) -> None:
            where = f" (cells {', '.join(map(str, obs_names[rows[:3]]))}...)"
            check_count_values(values, name=name, integer=integer, where=where)

        return check

    def _loader(self, call: _Call):
        """The call's one data loader: checked minibatches in the model's gene space."""
        dataset = CellDataset(
            call.manager,
            call.cells,
            call.space,
            call.plan,
            check=self._value_check(call.adata),
            compact=self._compact_minibatches,
        )
        return make_loader(dataset, call.groups)

    def _run(
        self, call: _Call, desc: str, progress_bar: bool = True, module_kwargs: dict | None = None
    ) -> Iterator[tuple[np.ndarray, ModuleOutput, dict[str, torch.Tensor]]]:
        """Yield ``(positions into call.cells, ModuleOutput, tensors)`` per minibatch."""
        loader = self._loader(call)
        device = self.module.device
        kwargs = {**call.kwargs, **(module_kwargs or {})}
        self.module.eval()
        for tensors in tqdm(loader, desc=desc, unit="batch", disable=not progress_bar):
            tensors = {k: v.to(device) for k, v in tensors.items()}
            with self._autocast():
                out = self.module.inference(**self.module._get_inference_input(tensors), **kwargs)
            yield tensors[CELL_INDEX_KEY].cpu().numpy(), out, tensors

    def _gather(self, call: _Call, field_name: str, desc: str, progress_bar: bool) -> np.ndarray:
        """One ``ModuleOutput`` field for every cell of the call, in the caller's order."""
        out: np.ndarray | None = None
        for positions, result, _ in self._run(call, desc, progress_bar):
            value = getattr(result, field_name)
            if value is None:
                raise InvalidInputError(
                    f"{type(self).__name__}'s module computed no {field_name} for this call."
                )
            value = value.detach().float().cpu().numpy()
            if out is None:
                out = np.zeros((len(call.cells), *value.shape[1:]), dtype=np.float32)
            out[positions] = value
        assert out is not None  # _resolve_indices refuses an empty selection
        _check_finite(out, field_name, call.adata.obs_names[call.cells])
        return out[call.inverse]

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
        elif isinstance(precision, str | None) and precision in names:
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
    @scfm_dsp.dedent
    def get_latent_representation(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        *,
        progress_bar: bool = True,
        **options: Any,
    ) -> np.ndarray:
        """Cell embeddings, exactly as the reference model defines them.

        Parameters
        ----------
        %(param_adata)s
        %(param_indices)s
        %(param_batch_size)s
        %(param_progress_bar)s
        %(param_options)s

        Returns
        -------
        float32 array ``(len(indices), n_latent)``, rows in the order of ``indices``.
        """
        call = self._prepare(adata, indices, batch_size, "latent", options)
        return self._gather(call, "cell_embedding", f"{self._model_name} embeddings", progress_bar)

    @torch.inference_mode()
    @scfm_dsp.dedent
    def get_gene_embeddings(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        *,
        progress_bar: bool = True,
        **options: Any,
    ) -> pd.DataFrame:
        """Gene embeddings: each gene's contextual state averaged over the cells expressing it.

        Models whose gene embeddings are rows of the weights return them without a pass over
        the cells. Averages are accumulated per gene as running sums (never as a list of
        (cell, gene) pairs), so memory is flat in the number of cells.

        Parameters
        ----------
        %(param_adata)s
        %(param_indices)s
        %(param_batch_size)s
        %(param_progress_bar)s
        %(param_options)s

        Returns
        -------
        DataFrame indexed by gene id (the model vocabulary's ids), one row per gene seen in at
        least one cell (or every vocabulary gene for static embeddings), sorted by id.
        """
        static = self._static_gene_embeddings()
        if static is not None:
            if adata is not None or indices is not None or options:
                self._prepare(adata, indices, batch_size, "genes", options)
            return static
        call = self._prepare(adata, indices, batch_size, "genes", options)
        sums: torch.Tensor | None = None
        counts = torch.zeros(len(self.vocabulary), dtype=torch.float64)
        for _, out, _ in self._run(call, f"{self._model_name} gene embeddings", progress_bar):
            if out.token_states is None or out.token_genes is None:
                raise InvalidInputError(f"{type(self).__name__} computes no token states.")
            genes = out.token_genes.reshape(-1)
            keep = genes >= 0
            genes = genes[keep]
            states = out.token_states.reshape(len(keep), -1)[keep].float()
            # Sum within the minibatch per gene first (float32, small), then add to float64
            # running sums: no (cell, gene) pairs are ever materialised in float64.
            unique, inverse = torch.unique(genes, return_inverse=True)
            local = torch.zeros(len(unique), states.shape[1], device=states.device)
            local.index_add_(0, inverse, states)
            if sums is None:
                sums = torch.zeros(len(self.vocabulary), states.shape[1], dtype=torch.float64)
            unique = unique.cpu()
            sums.index_add_(0, unique, local.cpu().double())
            counts.index_add_(0, unique, torch.bincount(inverse).cpu().double())
        assert sums is not None
        seen = torch.nonzero(counts > 0).squeeze(1)
        means = (sums[seen] / counts[seen, None]).float().numpy()
        names = np.asarray(self.vocabulary, dtype=object)[seen.numpy()]
        _check_finite(means, "gene embedding", names)
        frame = pd.DataFrame(means, index=pd.Index(names, name="gene_id"))
        return frame.sort_index()

    @torch.inference_mode()
    @scfm_dsp.dedent
    def get_normalized_expression(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        gene_list: Sequence[str] | None = None,
        batch_size: int | None = None,
        *,
        progress_bar: bool = True,
        **options: Any,
    ) -> pd.DataFrame:
        """Expression decoded by the model (scvi-tools' name), for models with a decoder.

        Parameters
        ----------
        %(param_adata)s
        %(param_indices)s
        gene_list
            Genes to return: ``adata.var_names`` entries or model vocabulary ids (the model
            decodes its whole vocabulary, so genes the AnnData lacks can be asked for);
            ``None`` returns every AnnData gene the model knows.
        %(param_batch_size)s
        %(param_progress_bar)s
        %(param_options)s

        Returns
        -------
        DataFrame cells x genes (index ``adata.obs_names`` in ``indices`` order).
        """
        if not self._has_decoder:
            raise InvalidInputError(
                f"{type(self).__name__} has no expression decoder; get_normalized_expression is "
                "available for ScFoundation, CellFM and CellPLM."
            )
        call = self._prepare(adata, indices, batch_size, "expression", options)
        columns, labels = self._decoded_columns(call, gene_list)
        out = np.zeros((len(call.cells), len(columns)), dtype=np.float32)
        index = torch.as_tensor(columns)
        for positions, result, _ in self._run(call, f"{self._model_name} decoding", progress_bar):
            if result.expression is None:
                raise InvalidInputError(f"{type(self).__name__}'s module decoded nothing.")
            out[positions] = result.expression[:, index.to(result.expression.device)].float().cpu()
        _check_finite(out, "decoded expression", call.adata.obs_names[call.cells])
        obs = call.adata.obs_names[call.cells][call.inverse]
        return pd.DataFrame(out[call.inverse], index=obs, columns=pd.Index(labels))

    def _decoded_columns(
        self, call: _Call, gene_list: Sequence[str] | None
    ) -> tuple[np.ndarray, list[str]]:
        """Model gene positions (and column labels) for ``gene_list``."""
        var_names = call.adata.var_names
        first = pd.Series(call.alignment.vocab_index, index=call.alignment.var_index)
        first = first[~first.index.duplicated()]
        if gene_list is None:
            return first.to_numpy(), [str(var_names[i]) for i in first.index]
        if isinstance(gene_list, str):
            gene_list = [gene_list]
        vocab = pd.Index(self.vocabulary.astype(str))
        positions, unknown = [], []
        for gene in gene_list:
            loc = var_names.get_indexer([gene])[0]
            if loc >= 0 and loc in first.index:
                positions.append(int(first[loc]))
            elif (j := vocab.get_indexer([str(gene)])[0]) >= 0:
                positions.append(int(j))
            else:
                unknown.append(gene)
        if unknown:
            raise GeneVocabularyError(
                f"{len(unknown)} genes of gene_list are not decoded by {type(self).__name__} "
                f"(e.g. {', '.join(map(str, unknown[:3]))}): pass adata.var_names entries that "
                "match the model's vocabulary, or vocabulary ids (model.vocabulary)."
            )
        return np.asarray(positions, dtype=np.int64), [str(g) for g in gene_list]

    # ------------------------------------------------------------------ key_added writers
    @property
    def default_key(self) -> str:
        """Default ``key_added``: ``"X_<model name>"``."""
        return f"X_{self._model_name}"

    @scfm_dsp.dedent
    def embed(
        self, adata: ad.AnnData | None = None, key_added: str | None = None, **options: Any
    ) -> None:
        """Write cell embeddings to ``adata.obsm[key_added]`` (scanpy style).

        Parameters
        ----------
        %(param_adata)s
        %(param_key_added_obsm)s
        **options
            Passed to :meth:`get_latent_representation` (``batch_size``, ``hidden_layer``,
            ``pooling``, ...). ``indices`` is not accepted: ``.obsm`` needs every cell.
        """
        key = check_key_added(
            self.default_key if key_added is None else key_added, where="adata.obsm"
        )
        if "indices" in options:
            raise InvalidInputError(
                "embed writes every cell's embedding; use get_latent_representation(indices=...) "
                "for a subset."
            )
        target = self._validate_anndata(adata)
        with unchanged_on_failure(target):
            z = self.get_latent_representation(target, **options)
            self._record_alignment(target)
            record_in_uns(target, "obsm", key, self._provenance(options))
            target.obsm[key] = z

    def embed_genes(
        self, adata: ad.AnnData | None = None, key_added: str | None = None, **options: Any
    ) -> pd.DataFrame:
        """Write gene embeddings to ``adata.varm[key_added]``, aligned to ``adata.var_names``.

        Genes the model does not know (or that no selected cell expresses) get ``NaN`` rows,
        which mark "no embedding", not a failed computation.

        Parameters
        ----------
        adata
            AnnData set up like the model's; ``None`` uses the model's AnnData.
        key_added
            ``.varm`` key; default ``"X_<model name>"``.
        **options
            Passed to :meth:`get_gene_embeddings`.

        Returns
        -------
        The gene embedding DataFrame (indexed by vocabulary gene id).
        """
        key = check_key_added(
            self.default_key if key_added is None else key_added, where="adata.varm"
        )
        target = self._validate_anndata(adata)
        with unchanged_on_failure(target):
            genes = self.get_gene_embeddings(target, **options)
            values = self._align_gene_frame(target, genes)
            self._record_alignment(target)
            record_in_uns(target, "varm", key, self._provenance(options))
            target.varm[key] = values
        return genes

    def _align_gene_frame(self, adata: ad.AnnData, genes: pd.DataFrame) -> np.ndarray:
        """Rows of ``genes`` (indexed by vocabulary id) in ``adata.var`` order, NaN if absent."""
        alignment, _ = self._gene_space(adata)
        out = np.full((adata.n_vars, genes.shape[1]), np.nan, dtype=np.float32)
        vocab = np.asarray(self.vocabulary, dtype=object)
        rows = genes.index.get_indexer(vocab[alignment.vocab_index])
        found = rows >= 0
        out[alignment.var_index[found]] = genes.to_numpy(dtype=np.float32)[rows[found]]
        return out

    def _provenance(self, options: dict[str, Any]) -> dict[str, Any]:
        info: dict[str, Any] = {"model": type(self).__name__}
        if self._checkpoint_path is not None:
            info["checkpoint"] = self._checkpoint_path
        info.update(
            {
                k: v
                for k, v in options.items()
                if isinstance(v, str | int | float | bool) and k != "progress_bar"
            }
        )
        return info

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        *,
        batch_size: int | None = None,
        datasplitter_kwargs: dict | None = None,
        **kwargs: Any,
    ) -> None:
        """Train with the model's own pretraining objective (scvi-tools TrainRunner, Lightning).

        Minibatches come from the same loader as inference (genes in the model's space, the
        model's length grouping); the module corrupts its input (masking, noise) because the
        training plan asks for it (``mask=True``), not through a mode flag.

        Parameters
        ----------
        max_epochs
            Passes through the training cells; default scvi-tools' heuristic.
        batch_size
            Cells per minibatch; default the model's inference default.
        datasplitter_kwargs
            Passed to :class:`~scfm.model.base.CellDataSplitter`.
        **kwargs
            Passed to :meth:`scvi.model.base.UnsupervisedTrainingMixin.train`
            (``train_size``, ``validation_size``, ``early_stopping``, ``accelerator``,
            ``devices``, ``strategy``, ``precision``, ``plan_kwargs``, ``datamodule`` for
            streaming from TileDB-SOMA, ...).
        """
        if kwargs.get("datamodule") is None:
            datasplitter_kwargs = {"model": self, **(datasplitter_kwargs or {})}
        plan_kwargs = dict(kwargs.pop("plan_kwargs", None) or {})
        plan_kwargs.setdefault("inference_kwargs", self._inference_kwargs("train"))
        with self._training_mode():
            super().train(
                max_epochs=max_epochs,
                batch_size=batch_size or self._default_batch_size,
                datasplitter_kwargs=datasplitter_kwargs,
                plan_kwargs=plan_kwargs,
                **kwargs,
            )
        self._refresh_summary()

    @contextlib.contextmanager
    def _training_mode(self) -> Iterator[None]:
        """Dropout on during training; eval mode afterwards, whatever happens."""
        self.module.train()
        try:
            yield
        finally:
            self.module.eval()


def _resolve_release(
    path: str | os.PathLike, class_name: str, download: bool | None
) -> tuple[Any, dict[str, Any]]:
    """A local release folder (and the catalogue's options for it) from a path or a name."""
    from scfm.hub import resolve

    release = resolve(path, class_name, download=download)
    return release.path, dict(release.options)


def _check_finite(values: np.ndarray, what: str, names: Sequence[Any]) -> None:
    """Raise :class:`NonFiniteOutputError` rather than hand NaN / inf to the user."""
    finite = np.isfinite(values)
    if finite.all():
        return
    bad = ~finite.reshape(len(values), -1).all(axis=1)
    examples = ", ".join(map(str, np.asarray(names)[bad][:3]))
    raise NonFiniteOutputError(
        f"The model produced NaN or infinite {what} values for {int(bad.sum())} of "
        f"{len(values)} rows (e.g. {examples}); nothing was written. Check those cells' input "
        "values and the weights (a damaged checkpoint); under mixed precision try "
        "inference_precision('bf16') or full float32."
    )
