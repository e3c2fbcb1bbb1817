"""scCello (cell-ontology guided transcriptome foundation model) as an scvi-tools model."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scvi import REGISTRY_KEYS
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin

from scfm.data._genes import GeneAlignment, align_genes
from scfm.data._loader import CELL_INDEX_KEY
from scfm.data._ontology import (
    CellOntology,
    label_indices,
    load_cell_ontology,
    lookup_cell_type_ids,
)
from scfm.errors import AnnDataKeyError, InvalidInputError
from scfm.io._common import load_state_dict_strict
from scfm.io._sccello import read_sccello_release, sccello_vocabulary
from scfm.model.base import FoundationModelMixin, scfm_dsp
from scfm.module._sccello import N_PROTOTYPES, ScCelloConfig, ScCelloModule

__all__ = ["ScCello"]

#: CELLxGENE column holding Cell Ontology ids, scCello's pretraining labels.
CELL_TYPE_KEY = "cell_type_ontology_term_id"
#: ``adata.var`` column the reference reads Ensembl ids from when present.
ENSEMBL_IDS_KEY = "ensembl_ids"


class ScCello(FoundationModelMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """scCello: a Geneformer-style BERT pretrained with Cell Ontology guidance :cite:p:`Yuan2024`.

    Cells are tokenised on the fly from raw counts: ``<cls>`` and the expressed vocabulary
    genes by decreasing (count / vocabulary total x 10,000) / gene median, truncated to
    ``max_position_embeddings`` tokens. The zero-shot embedding is the last layer's ``<cls>``
    state. :meth:`train` optimises masked gene prediction, cell-type coherence (+ regulariser)
    against learned prototypes and ontology relational alignment, with cell types from
    ``adata.obs["cell_type_ontology_term_id"]``; :meth:`finetune` trains the reference's
    linear probe (dropout + linear) on the last ``<cls>`` state.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    config
        :class:`~scfm.module._sccello.ScCelloConfig` fields (HF ``config.json`` names);
        ``None`` uses the release's (6 layers, 4 heads, 256 hidden, 512 intermediate, relu,
        2048 input, tau 0.01). ``vocab_size`` follows the vocabulary.
    token_dictionary, gene_medians
        Token name -> id (``<pad>`` = 0, ``<mask>`` = 1, ``<cls>`` appended if absent) and
        Ensembl id -> non-zero median; ``None`` uses the Geneformer V1 files shipped with
        scfm (scCello's vocabulary).
    label_clids
        CL id of each pretraining cell type (position = prototype index); ``None``: the sorted
        CL ids of the registered labels column (pretraining from scratch).
    n_labels
        Number of pretraining cell types when ``label_clids`` is unknown.
    cell_type_names, taxonomy_names
        CL id -> name of the pretraining types; lower-cased name -> CL id (the release's Cell
        Taxonomy lookup).
    ontology
        Cell Ontology file (``cl.owl`` or cellxgene-ontology-guide JSON); ``None`` uses the CL
        release bundled with scfm.
    compute_ontology_buffers
        Build ``ctgraph_sim`` / ``cell_type_ancestor_mask`` from ``ontology`` (``False`` when
        a checkpoint holds them).
    n_prototypes, mlm_probability
        Rows of ``learned_centroid`` (600) and share of gene tokens masked in pretraining.

    Notes
    -----
    Options of :meth:`get_latent_representation` / :meth:`embed`: ``hidden_layer`` (``-1``
    last layer, ``0`` embedding output) and ``representation``: ``"cls"`` (default: zero-shot
    embedding for clustering and integration), ``"cell_cls"`` (the ``cell_cls`` head on it:
    novel cell types), ``"cell_cls_normalized"`` (L2-normalised: drug response) or
    ``"prototype_scores"`` (cosine / tau to each pretraining prototype). Gene embeddings
    average each gene's ``hidden_layer`` token states.

    Examples
    --------
    >>> scfm.model.ScCello.setup_anndata(adata)
    >>> model = scfm.model.ScCello.from_pretrained("scCello-zeroshot", adata)
    >>> adata.obsm["X_sccello"] = model.get_latent_representation()
    """

    _model_name = "sccello"
    _default_batch_size = 16  # the reference's evaluation batch
    _requires_counts = True
    _sort_by_length = True

    def __init__(
        self,
        adata: ad.AnnData,
        config: dict[str, Any] | None = None,
        token_dictionary: dict[str, int] | None = None,
        gene_medians: dict[str, float] | None = None,
        label_clids: list[str] | None = None,
        n_labels: int | None = None,
        cell_type_names: dict[str, str] | None = None,
        taxonomy_names: dict[str, str] | None = None,
        ontology: str | None = None,
        compute_ontology_buffers: bool = True,
        n_prototypes: int = N_PROTOTYPES,
        mlm_probability: float = 0.15,
    ) -> None:
        super().__init__(adata)
        self._vocab = sccello_vocabulary(token_dictionary, gene_medians)
        self.ontology_path = ontology
        self.cell_type_names = dict(cell_type_names or {})
        self.taxonomy_names = {str(k).lower(): str(v) for k, v in (taxonomy_names or {}).items()}
        cfg = ScCelloConfig.from_dict({**(config or {}), "vocab_size": len(self.vocabulary)})
        if label_clids is None and n_labels is None:
            key = self.setup_args.get("labels_key")
            if key is None:
                raise InvalidInputError(
                    "A new scCello model needs cell types: register them with "
                    f"setup_anndata(adata, labels_key={CELL_TYPE_KEY!r}) or pass label_clids."
                )
            label_clids = sorted({str(c) for c in adata.obs[key].astype(str)})
        self.label_clids = None if label_clids is None else [str(c) for c in label_clids]
        tokens = self._vocab.token_dictionary
        self.module = ScCelloModule(
            cfg,
            self._vocab.medians_by_token(),
            n_labels=len(self.label_clids) if self.label_clids is not None else int(n_labels),
            cls_token_id=tokens["<cls>"],
            mask_token_id=tokens["<mask>"],
            n_prototypes=n_prototypes,
            mlm_probability=mlm_probability,
        )
        if compute_ontology_buffers and self.label_clids is not None:
            levels, mask = self.ontology.sccello_buffers(self.label_clids)
            self.module.ctgraph_sim.copy_(torch.as_tensor(levels))
            self.module.cell_type_ancestor_mask.copy_(torch.as_tensor(mask))
        self.init_params_ = self._get_init_params(locals())

    @classmethod
    @scfm_dsp.dedent
    def setup_anndata(
        cls,
        adata: ad.AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = CELL_TYPE_KEY,
        gene_id_key: str | None = None,
        allow_non_integer: bool = False,
        check_gene_overlap: bool = True,
        **kwargs: Any,
    ) -> None:
        """Register an AnnData of raw counts with scCello.

        Parameters
        ----------
        adata
            AnnData of raw counts (cells x genes).
        %(param_layer)s
        %(param_batch_key)s
        labels_key
            ``adata.obs`` column of Cell Ontology ids (pretraining labels); the default
            (CELLxGENE's) is skipped when absent (embeddings need no labels).
        gene_id_key
            ``adata.var`` column with gene ids; ``None`` uses ``"ensembl_ids"`` when present
            (as the reference), else ``adata.var_names``. Symbols are converted with GENCODE.
        %(param_allow_non_integer)s
        %(param_check_gene_overlap)s
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.
        """
        if labels_key == CELL_TYPE_KEY and labels_key not in adata.obs.columns:
            labels_key = None
        if gene_id_key is None and ENSEMBL_IDS_KEY in adata.var.columns:
            gene_id_key = ENSEMBL_IDS_KEY
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

    # ------------------------------------------------------------------ genes and cell types
    @property
    def vocabulary(self) -> pd.Index:
        """Token names in token-id order (the module's input columns), specials included."""
        return pd.Index(self._vocab.names, name="gene_id")

    def _align_genes(self, adata: ad.AnnData) -> GeneAlignment:
        # Ensembl ids match whatever their case or version suffix (a mostly-Ensembl
        # var_names keeps all of them); symbol var_names are converted with GENCODE. Genes
        # without a median are dropped, as in the reference.
        medians = self._vocab.gene_medians
        genes = {g: t for g, t in self._vocab.token_dictionary.items() if g in medians}
        return align_genes(
            adata.var,
            genes,
            id_type="ensembl",
            gene_id_key=self._setup_args_of(adata).get("gene_id_key"),
            model_name="scCello",
        )

    @cached_property
    def ontology(self) -> CellOntology:
        """The Cell Ontology graph (the release's ``cl.owl`` or the bundled CL release)."""
        return load_cell_ontology(self.ontology_path)

    def lookup_cell_types(self, names: Sequence[str]) -> list[str]:
        """CL ids of cell-type ids or names (Cell Taxonomy, pretraining, then ontology names).

        Raises :class:`~scfm.errors.OntologyError` naming every entry that matches nothing.
        """
        return lookup_cell_type_ids(
            names,
            self.ontology,
            taxonomy_names=self.taxonomy_names,
            label_names=self.cell_type_names,
        )

    def _cell_types(self, obs: pd.DataFrame, key: str | None) -> np.ndarray:
        # Read from obs (not scvi's category codes): any AnnData or streamed minibatch whose
        # cells carry the model's CL ids works, and unknown ids raise before heavy work.
        if key is None or key not in obs.columns or self.label_clids is None:
            raise AnnDataKeyError(
                "The scCello losses need cell types: call setup_anndata with "
                f"labels_key={CELL_TYPE_KEY!r} (a column of Cell Ontology ids)."
            )
        values = obs[key].astype(str).to_numpy()
        return label_indices(values, self.label_clids, self.ontology, column=key)

    def _streamed_plan(self, obs: pd.DataFrame, task: str) -> dict[str, np.ndarray]:
        key = self.setup_args.get("labels_key")
        return {"cell_type": self._cell_types(obs, key)} if task == "train" else {}

    # ------------------------------------------------------------------ hooks
    @classmethod
    def _from_pretrained(
        cls,
        path: Path,
        adata: ad.AnnData,
        *,
        data_dir: str | None = None,
        ontology: str | None = None,
        trust_checkpoint: bool = False,
    ) -> ScCello:
        """Read an HF release directory and load its weights strictly.

        The directory holds ``config.json`` + ``pytorch_model.bin`` or ``model.safetensors``.
        Options: ``data_dir``, the reference repository's ``data/`` folder (vocabulary,
        medians, label maps, ``cl.owl``; default ``<path>/data``); ``ontology``, a Cell
        Ontology file overriding the release's ``cl.owl``; ``trust_checkpoint``.
        """
        release = read_sccello_release(path, data_dir=data_dir, trust_checkpoint=trust_checkpoint)
        state = release.state_dict
        # the config is checked against the weight shapes before anything is allocated
        n_tokens = len(release.vocabulary.token_dictionary)
        config = ScCelloConfig.from_dict(
            {"vocab_size": n_tokens, **release.config}, what=str(release.files["config"])
        )
        config.check_weights(state, what=str(release.files["config"]))
        model = cls(
            adata,
            config=config.to_dict(),
            token_dictionary=release.vocabulary.token_dictionary,
            gene_medians=release.vocabulary.gene_medians,
            label_clids=release.label_clids,
            n_labels=int(state["ctgraph_sim"].shape[0]) if "ctgraph_sim" in state else 0,
            cell_type_names=release.cell_type_names,
            taxonomy_names=release.taxonomy_names,
            ontology=ontology or release.ontology_path,
            compute_ontology_buffers=False,
            n_prototypes=len(state.get("learned_centroid.weight", [0] * N_PROTOTYPES)),
        )
        load_state_dict_strict(model.module, state, what=str(path))
        return model

    def _inference_kwargs(self, task: str, **options: Any) -> dict[str, Any]:
        return self.module.check_options(task, **options)

    def _cell_plan(
        self, adata: ad.AnnData, cells: np.ndarray, task: str, **options: Any
    ) -> dict[str, np.ndarray]:
        # Pretraining needs each cell's pretraining type (rides in the minibatch).
        if task != "train":
            return {}
        key = self._setup_args_of(adata).get("labels_key")
        return {"cell_type": self._cell_types(adata.obs.iloc[cells], key)}

    # ------------------------------------------------------------------ extras
    @torch.inference_mode()
    @scfm_dsp.dedent
    def get_tokens(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The model's input tokens: ``<cls>`` + genes ranked by median-normalised expression.

        Parameters
        ----------
        %(param_adata)s
        %(param_indices)s
        %(param_batch_size)s

        Returns
        -------
        ``input_ids`` ``(n_cells, L)`` int64 right-padded with ``<pad>`` (0) to the longest
        cell, and ``lengths`` ``(n_cells,)``, the tokens per cell with ``<cls>``.
        """
        call = self._prepare(adata, indices, batch_size, "tokens", {})
        ids = np.zeros((len(call.cells), 1), dtype=np.int64)
        lengths = np.zeros(len(call.cells), dtype=np.int64)
        for tensors in self._loader(call):
            batch_ids, batch_lengths = self.module.tokenize(
                tensors[REGISTRY_KEYS.X_KEY].to(self.device)
            )
            positions = tensors[CELL_INDEX_KEY].numpy()
            ids = np.pad(ids, ((0, 0), (0, max(0, batch_ids.shape[1] - ids.shape[1]))))
            ids[positions, : batch_ids.shape[1]] = batch_ids.cpu().numpy()
            lengths[positions] = batch_lengths.cpu().numpy()
        return ids[call.inverse], lengths[call.inverse]

    def train(self, max_epochs: int | None = None, batch_size: int = 12, **kwargs: Any) -> None:
        """Pretrain with scCello's four losses (the base :meth:`train`, reference defaults).

        ``batch_size`` 12 (relational alignment contrasts the cells of a minibatch, so it
        needs several cell types per batch); ``plan_kwargs`` AdamW, lr 1e-3, weight decay 1e-3.
        """
        self._cell_types(self.adata.obs, self.setup_args.get("labels_key"))
        plan_kwargs = {"optimizer": "AdamW", "lr": 1e-3, "weight_decay": 1e-3}
        plan_kwargs.update(kwargs.pop("plan_kwargs", None) or {})
        super().train(
            max_epochs=max_epochs, batch_size=batch_size, plan_kwargs=plan_kwargs, **kwargs
        )

    @torch.inference_mode()
    def get_pretraining_losses(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        mlm_mask: np.ndarray | None = None,
        seed: int | None = None,
    ) -> dict[str, Any]:
        """The four pretraining losses of the cells as ONE minibatch, in eval mode (no dropout).

        Parameters
        ----------
        adata
            AnnData set up like the model's, with cell types registered.
        indices
            Cells of the minibatch, without repeats (the relational loss depends on the
            batch composition); ``None`` uses all.
        mlm_mask
            ``(n_cells, L)`` boolean positions (rows in ``indices`` order, columns as
            :meth:`get_tokens`) to replace by ``<mask>``; special tokens and padding are
            never masked. ``None`` draws the reference's random masking (15%; 80/10/10).
        seed
            Seed of the random masking.

        Returns
        -------
        Dict of float losses (``mlm_loss``, ``relational_alignment_loss``,
        ``cell_type_coherence_loss``, ``cell_type_coherence_reg_loss``, ``total_loss``) and
        arrays ``mlm_scores`` (masked positions, row-major) and ``prototype_scores``.
        """
        call = self._prepare(adata, indices, None, "train", {})
        if len(np.unique(call.inverse)) != len(call.inverse) or (
            mlm_mask is not None and np.shape(mlm_mask)[0] != len(call.cells)
        ):
            raise InvalidInputError("indices must not repeat cells; mlm_mask needs a row each.")
        call.groups = [np.arange(len(call.cells))]
        tensors = next(iter(self._loader(call)))
        order = torch.as_tensor(call.inverse)  # the caller's order, in which mlm_mask is given
        generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        self.module.eval()
        out = self.module.inference(
            tensors[REGISTRY_KEYS.X_KEY][order].to(self.device),
            tensors["cell_type"][order].to(self.device),
            mask=True,
            mlm_mask=None if mlm_mask is None else torch.as_tensor(np.asarray(mlm_mask, bool)),
            generator=generator,
        )
        losses = self.module.pretraining_losses(out)
        return {k: (float(v) if v.ndim == 0 else v.cpu().numpy()) for k, v in losses.items()}
