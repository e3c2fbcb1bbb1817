"""scCello (cell-ontology guided transcriptome foundation model) as an scvi-tools model."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin

from scfm.data._genes import align_genes
from scfm.data._ontology import CellOntology, load_cell_ontology
from scfm.errors import AnnDataKeyError, InvalidInputError, OntologyError
from scfm.model.base import FoundationModelMixin
from scfm.module._sccello import N_PROTOTYPES, ScCelloConfig, ScCelloModule

logger = logging.getLogger(__name__)

__all__ = ["ScCello"]

Representation = Literal["cls", "cell_cls", "cell_cls_normalized", "prototype_scores"]

#: CELLxGENE column holding Cell Ontology ids, scCello's pretraining labels.
CELL_TYPE_KEY = "cell_type_ontology_term_id"
#: ``adata.var`` column the reference reads Ensembl ids from when present.
ENSEMBL_IDS_KEY = "ensembl_ids"
_TOKENS = ("<pad>", "<mask>", "<cls>")


class ScCello(FoundationModelMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """scCello: a Geneformer-style BERT pretrained with Cell Ontology guidance :cite:p:`Yuan2024`.

    Cells are tokenised on the fly from raw counts: ``<cls>`` followed by the expressed
    in-vocabulary genes ordered by (count / in-vocabulary total x 10,000) / gene median,
    truncated to ``max_position_embeddings`` tokens. The zero-shot cell embedding is the last
    layer's ``<cls>`` state. Pretraining (:meth:`train`) optimises masked gene prediction,
    cell-type coherence (+ regulariser) against learned prototypes and ontology relational
    alignment, with cell types read from ``adata.obs["cell_type_ontology_term_id"]``.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`; genes as Ensembl ids (symbols are
        converted with GENCODE v48).
    config
        Architecture: a dict of :class:`~scfm.module._sccello.ScCelloConfig` fields (HF
        ``config.json`` names); ``None`` uses the release's (6 layers, 4 heads, 256 hidden,
        512 intermediate, relu, 2048 input, tau 0.01). ``vocab_size`` follows the vocabulary.
    token_dictionary
        Token name -> id with ``<pad>`` = 0, ``<mask>`` = 1 and ``<cls>``; ``None`` uses the
        Geneformer V1 dictionary shipped with scfm (scCello's vocabulary) plus ``<cls>``.
    gene_medians
        Ensembl id -> non-zero median; ``None`` uses the shipped Geneformer V1 medians.
    label_clids
        CL id of each pretraining cell type (position = prototype index). ``None``: the CL ids
        of the registered labels column, sorted (for pretraining from scratch).
    n_labels
        Number of pretraining cell types when ``label_clids`` is unknown (release without label
        map); ignored otherwise.
    cell_type_names
        CL id -> name of the pretraining cell types (used in outputs).
    taxonomy_names
        Lower-cased cell-type name -> CL id (the reference's Cell Taxonomy lookup), consulted
        before the ontology labels when names are given.
    ontology
        Cell Ontology file (``cl.owl`` or cellxgene-ontology-guide JSON); ``None`` uses the CL
        release bundled with scfm.
    compute_ontology_buffers
        Build ``ctgraph_sim`` / ``cell_type_ancestor_mask`` from ``ontology`` (pretraining
        from scratch). ``False`` when they come from a checkpoint.
    n_prototypes
        Rows of ``learned_centroid`` (600 in the release).
    mlm_probability
        Fraction of gene tokens masked in pretraining (0.15).

    Examples
    --------
    >>> scfm.model.ScCello.setup_anndata(adata)
    >>> model = scfm.model.ScCello.from_pretrained("scCello-zeroshot", adata)
    >>> adata.obsm["X_sccello"] = model.get_latent_representation()
    """

    _model_name = "sccello"
    _default_batch_size = 16
    _has_gene_embeddings = True

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
        if token_dictionary is None or gene_medians is None:
            from scfm.data._geneformer_tokenizer import load_geneformer_dictionaries

            shipped = load_geneformer_dictionaries(version="V1")
            token_dictionary = token_dictionary or dict(shipped.token_dictionary)
            gene_medians = gene_medians or dict(shipped.gene_median_dictionary)
        tokens = {str(k): int(v) for k, v in token_dictionary.items()}
        if "<cls>" not in tokens:
            tokens["<cls>"] = len(tokens)
        missing = [t for t in _TOKENS if t not in tokens]
        if missing:
            raise InvalidInputError(f"The token dictionary lacks {missing}; scCello needs them.")
        self.token_dictionary = tokens
        self.ontology_path = ontology
        self.cell_type_names = dict(cell_type_names or {})
        self.taxonomy_names = {str(k).lower(): str(v) for k, v in (taxonomy_names or {}).items()}

        cfg = ScCelloConfig.from_dict(config or {})
        cfg.vocab_size = max(tokens.values()) + 1
        # genes: the vocabulary restricted to genes with a median (the reference drops others)
        vocab = {g: i for g, i in tokens.items() if g in gene_medians}
        alignment = align_genes(
            adata.var,
            vocab,
            id_type="ensembl",
            gene_id_key=self.setup_args.get("gene_id_key"),
            model_name="scCello",
        )
        token_ids = alignment.var_to_vocab()
        names = self._vocab_names()
        medians = np.array(
            [gene_medians[names[t]] if t >= 0 else np.nan for t in token_ids], dtype=np.float64
        )

        codes = self._label_categories()
        if label_clids is None and n_labels is None:
            if codes is None:
                raise InvalidInputError(
                    "A new scCello model needs cell types: register them with "
                    f"setup_anndata(adata, labels_key={CELL_TYPE_KEY!r}) or pass label_clids."
                )
            label_clids = sorted({str(c) for c in codes})
        self.label_clids = None if label_clids is None else [str(c) for c in label_clids]
        n = len(self.label_clids) if self.label_clids is not None else int(n_labels or 0)
        label_of_code = None
        if codes is not None and self.label_clids is not None:
            index = {c: i for i, c in enumerate(self.label_clids)}
            label_of_code = np.array([index.get(str(c), -1) for c in codes], dtype=np.int64)

        self.module = ScCelloModule(
            cfg.to_dict(),
            token_ids,
            medians,
            n_labels=n,
            cls_token_id=tokens["<cls>"],
            mask_token_id=tokens["<mask>"],
            label_of_code=label_of_code,
            n_prototypes=n_prototypes,
            mlm_probability=mlm_probability,
        )
        if compute_ontology_buffers and self.label_clids is not None:
            self._compute_ontology_buffers()
        self._set_gene_alignment(adata, alignment)
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(
        cls,
        adata: ad.AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = CELL_TYPE_KEY,
        gene_id_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Register an AnnData of raw counts with scCello.

        Parameters
        ----------
        adata
            AnnData of raw counts (cells x genes).
        layer
            Layer holding the raw counts; ``None`` uses ``adata.X``.
        batch_key
            Categorical ``adata.obs`` column with the batch of each cell.
        labels_key
            ``adata.obs`` column of Cell Ontology ids (pretraining labels). The default
            ``"cell_type_ontology_term_id"`` (CELLxGENE) is used when present and skipped
            otherwise (embeddings need no labels).
        gene_id_key
            ``adata.var`` column with Ensembl ids; ``None`` uses the column ``"ensembl_ids"``
            when present (as the reference does), else ``adata.var_names``.
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.
        """
        if labels_key == CELL_TYPE_KEY and labels_key not in adata.obs.columns:
            labels_key = None
        if gene_id_key is None and ENSEMBL_IDS_KEY in adata.var.columns:
            gene_id_key = ENSEMBL_IDS_KEY
        super().setup_anndata(
            adata,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            gene_id_key=gene_id_key,
            **kwargs,
        )

    def _label_categories(self) -> np.ndarray | None:
        if self.setup_args.get("labels_key") is None:
            return None
        state = self.adata_manager.get_state_registry(REGISTRY_KEYS.LABELS_KEY)
        return np.asarray(state.categorical_mapping).astype(str)

    # ------------------------------------------------------------------ ontology
    @cached_property
    def ontology(self) -> CellOntology:
        """The Cell Ontology graph (the release's ``cl.owl`` or the bundled CL release)."""
        return load_cell_ontology(self.ontology_path)

    def _compute_ontology_buffers(self) -> None:
        clids = self.label_clids or []
        unknown = [c for c in clids if c not in self.ontology]
        if unknown:
            raise OntologyError(
                f"{len(unknown)} cell-type ids are not in the cell ontology "
                f"({self.ontology.source}): {', '.join(unknown[:5])}. Labels must be Cell "
                f"Ontology ids as in CELLxGENE's obs[{CELL_TYPE_KEY!r}] (e.g. CL:0000236): "
                "fix or drop those cells, or pass ontology=<cl.owl or CL json>."
            )
        levels = self.ontology.similarity_levels(clids)
        mask = self.ontology.ancestor_mask(clids)
        self.module.ctgraph_sim.copy_(torch.as_tensor(levels))
        self.module.cell_type_ancestor_mask.copy_(torch.as_tensor(mask))

    def lookup_cell_types(self, names: Sequence[str]) -> list[str]:
        """CL ids of cell-type names or ids.

        CL ids pass through; names are matched case-insensitively against the release's Cell
        Taxonomy names (the reference's lookup), then the pretraining label names, then the
        ontology labels.

        Raises
        ------
        OntologyError
            Naming every entry that matches nothing.
        """
        by_label = {v.lower(): k for k, v in self.cell_type_names.items()}
        out, unknown = [], []
        for name in names:
            key = str(name).strip()
            if key.replace("_", ":").startswith("CL:"):
                clid = key.replace("_", ":")
            else:
                clid = self.taxonomy_names.get(key.lower()) or by_label.get(key.lower())
                if clid is None:
                    clid = self.ontology.lookup([key])[0]
            if clid is None:
                unknown.append(key)
            out.append(clid)
        if unknown:
            raise OntologyError(
                f"No Cell Ontology id found for {unknown}. Pass CL ids (e.g. 'CL:0000236') or "
                "names as spelled in the Cell Ontology."
            )
        return out

    # ------------------------------------------------------------------ loading
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
        """Read an scCello release directory and load its weights strictly.

        Parameters
        ----------
        path
            HF directory (``config.json`` + ``pytorch_model.bin`` or ``model.safetensors``).
        adata
            Registered AnnData.
        data_dir
            The reference repository's ``data/`` folder (vocabulary, medians, label maps,
            ``cl.owl``); default ``<path>/data``.
        ontology
            Cell Ontology file overriding the release's ``cl.owl`` (default: the release's,
            else the CL release bundled with scfm).
        trust_checkpoint
            Allow full unpickling of a ``.bin`` that safe loading refuses.
        """
        from scfm.io._common import load_state_dict_strict
        from scfm.io._sccello import read_sccello_release

        release = read_sccello_release(path, data_dir=data_dir, trust_checkpoint=trust_checkpoint)
        state = release.state_dict
        n_labels = int(state["ctgraph_sim"].shape[0]) if "ctgraph_sim" in state else None
        n_proto = state.get("learned_centroid.weight")
        model = cls(
            adata,
            config=ScCelloConfig.from_dict(release.config).to_dict(),
            token_dictionary=release.token_dictionary,
            gene_medians=release.gene_medians,
            label_clids=release.label_clids,
            n_labels=n_labels,
            cell_type_names=release.cell_type_names,
            taxonomy_names=release.taxonomy_names,
            ontology=ontology or release.ontology_path,
            compute_ontology_buffers=False,
            n_prototypes=N_PROTOTYPES if n_proto is None else int(n_proto.shape[0]),
        )
        load_state_dict_strict(model.module, state, what=str(path))
        return model

    # ------------------------------------------------------------------ minibatches
    def _length_columns(self) -> np.ndarray:
        # Cells of similar length share a minibatch so that little padding is computed.
        return np.flatnonzero(self.module.gene_token_ids.cpu().numpy() >= 0)

    # ------------------------------------------------------------------ embeddings
    def get_latent_representation(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        *,
        representation: Representation = "cls",
        layer: int = -1,
        progress_bar: bool = True,
    ) -> np.ndarray:
        """Cell embeddings as the reference defines them.

        Parameters
        ----------
        adata
            AnnData set up like the model's; ``None`` uses the model's AnnData.
        indices
            Cells to embed; ``None`` embeds all.
        batch_size
            Cells per minibatch (default 16, the reference's evaluation batch).
        representation
            ``"cls"`` (default): the ``<cls>`` hidden state, scCello's zero-shot embedding for
            clustering and batch integration. ``"cell_cls"``: the ``cell_cls`` head applied to
            it (novel cell types). ``"cell_cls_normalized"``: that, L2-normalised (cancer drug
            response). ``"prototype_scores"``: cosine / tau against every pretraining
            cell-type prototype (``[n, n_labels]``).
        layer
            Hidden state whose ``<cls>`` is used: ``-1`` the last layer (reference), ``0`` the
            embedding output, ``i`` the output of layer ``i``.
        progress_bar
            Show a progress bar.

        Returns
        -------
        Array ``(n_cells, hidden_size)`` (``(n_cells, n_labels)`` for prototype scores).
        """
        if representation not in ("cls", "cell_cls", "cell_cls_normalized", "prototype_scores"):
            raise InvalidInputError(
                f"representation={representation!r} is not supported; use 'cls', 'cell_cls', "
                "'cell_cls_normalized' or 'prototype_scores'."
            )
        n = self.module.n_layers + 1
        if not -n <= layer < n:
            raise InvalidInputError(f"layer={layer} is out of range for {n - 1} layers.")
        return super().get_latent_representation(
            adata,
            indices,
            batch_size,
            progress_bar=progress_bar,
            representation=representation,
            layer=layer,
        )

    def _latent_minibatch(
        self, tensors: dict[str, torch.Tensor], representation: str = "cls", layer: int = -1
    ) -> torch.Tensor:
        x = tensors[REGISTRY_KEYS.X_KEY].to(self.device)
        h = self.module.cls_states(x)[:, layer]
        if representation == "cls":
            return h
        if representation == "prototype_scores":
            return self.module.prototype_scores(self.module.cell_representation(h))
        h = self.module.cell_cls(h)
        return F.normalize(h, p=2, dim=-1) if representation == "cell_cls_normalized" else h

    def _gene_embedding_minibatch(
        self, tensors: dict[str, torch.Tensor], **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = tensors[REGISTRY_KEYS.X_KEY].to(self.device)
        ids, lengths = self.module.tokenize(x)
        hidden = self.module.encode(ids, lengths).last_hidden_state
        real = torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]
        keep = real & ~self.module.special_tokens[ids]
        return ids[keep], hidden[keep]

    def _vocab_names(self) -> list[str]:
        names = [""] * (max(self.token_dictionary.values()) + 1)
        for k, v in self.token_dictionary.items():
            names[v] = k
        return names

    # ------------------------------------------------------------------ tokens and losses
    @torch.inference_mode()
    def get_tokens(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The model's input tokens: ``<cls>`` + genes ranked by median-normalised expression.

        Returns
        -------
        input_ids
            ``(n_cells, L)`` int64, right-padded with ``<pad>`` (0) to the longest cell.
        lengths
            ``(n_cells,)`` tokens per cell, ``<cls>`` included.
        """
        adata = self._validate_anndata(adata)
        cells, inverse = self._resolve_indices(adata, indices)
        chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for positions, tensors in self._iterate(adata, cells, batch_size, "tokens", False):
            ids, lengths = self.module.tokenize(tensors[REGISTRY_KEYS.X_KEY].to(self.device))
            chunks.append((positions, ids.cpu().numpy(), lengths.cpu().numpy()))
        width = max(c[1].shape[1] for c in chunks)
        out = np.zeros((len(cells), width), dtype=np.int64)
        lens = np.zeros(len(cells), dtype=np.int64)
        for positions, ids, lengths in chunks:
            out[positions, : ids.shape[1]] = ids
            lens[positions] = lengths
        return out[inverse], lens[inverse]

    def _cell_types(self, adata: ad.AnnData) -> np.ndarray:
        """Pretraining cell-type index of every cell, from the registered labels column.

        Read from ``adata.obs`` directly (not scvi's category codes), so any AnnData whose
        cells carry the model's CL ids works; unknown ids raise before any heavy work.
        """
        key = self.setup_args.get("labels_key")
        if key is None or self.label_clids is None:
            raise InvalidInputError(
                "The scCello losses need cell types: call setup_anndata with "
                f"labels_key={CELL_TYPE_KEY!r} (Cell Ontology ids)."
            )
        if key not in adata.obs.columns:
            raise AnnDataKeyError(
                f"adata.obs has no column {key!r} with the cell types the model was set up with."
            )
        values = adata.obs[key].astype(str).str.replace("_", ":", regex=False).to_numpy()
        index = {c: i for i, c in enumerate(self.label_clids)}
        out = np.array([index.get(v, -1) for v in values], dtype=np.int64)
        bad = sorted(set(values[out < 0]))
        if bad:
            in_ontology = [c for c in bad if c in self.ontology]
            hint = (
                "None of them is a Cell Ontology id"
                if not in_ontology
                else f"{len(in_ontology)} are Cell Ontology ids but not among the model's "
                f"{len(self.label_clids)} pretraining cell types"
            )
            raise OntologyError(
                f"{len(bad)} cell types in obs[{key!r}] are unknown to the model: "
                f"{', '.join(bad[:5])}. {hint}. Use CL ids of the model's cell types "
                "(model.label_clids) or drop those cells."
            )
        return out

    def train(self, max_epochs: int | None = None, batch_size: int = 12, **kwargs: Any) -> None:
        """Pretrain with scCello's four losses through scvi-tools / Lightning.

        Parameters
        ----------
        max_epochs
            Passes over the data (default: scvi-tools' heuristic).
        batch_size
            Cells per minibatch (the reference: 12 per device). The relational alignment
            loss contrasts the cells of a minibatch, so it needs several cell types per batch.
        **kwargs
            Passed to :meth:`scvi.model.base.UnsupervisedTrainingMixin.train` (``plan_kwargs``
            defaults to AdamW, lr 1e-3, weight decay 1e-3 as the reference).
        """
        self._cell_types(self.adata)  # fail early on unknown labels
        plan_kwargs = {"optimizer": "AdamW", "lr": 1e-3, "weight_decay": 1e-3}
        plan_kwargs.update(kwargs.pop("plan_kwargs", None) or {})
        # The base runs this in training mode: dropout also makes the two passes of the
        # relational alignment differ, as in the reference.
        super().train(
            max_epochs=max_epochs, batch_size=batch_size, plan_kwargs=plan_kwargs, **kwargs
        )

    def get_pretraining_losses(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        mlm_mask: np.ndarray | None = None,
        seed: int | None = None,
    ) -> dict[str, Any]:
        """The four pretraining losses of the cells, computed as ONE minibatch in eval mode.

        Dropout is off, so the relational alignment's second pass equals the first (as the
        reference in eval mode).

        Parameters
        ----------
        adata
            AnnData set up like the model's, with cell types registered.
        indices
            Cells of the minibatch (the relational loss depends on the batch composition).
        mlm_mask
            ``(n_cells, L)`` boolean positions (in :meth:`get_tokens` layout) to replace by
            ``<mask>``; special tokens and padding are never masked. ``None`` draws the
            reference's random masking (15%; 80/10/10).
        seed
            Seed of the random masking.

        Returns
        -------
        Dict of float losses (``mlm_loss``, ``relational_alignment_loss``,
        ``cell_type_coherence_loss``, ``cell_type_coherence_reg_loss``, ``total_loss``) and
        arrays ``mlm_scores`` (masked positions, row-major) and ``prototype_scores``.
        """
        adata = self.adata if adata is None else adata
        all_types = self._cell_types(adata)  # before scvi's registry transfer, with a clear error
        adata = self._validate_anndata(adata)
        cells, inverse = self._resolve_indices(adata, indices)
        if len(np.unique(inverse)) != len(inverse):
            raise InvalidInputError("indices must not repeat cells.")
        order = cells[inverse]
        cell_type = torch.as_tensor(all_types[order], device=self.device)
        ids, lengths = self.get_tokens(adata, order)
        ids_t = torch.as_tensor(ids, device=self.device)
        lengths_t = torch.as_tensor(lengths, device=self.device)
        selected = None
        if mlm_mask is not None:
            mask = np.asarray(mlm_mask, dtype=bool)
            if mask.shape[0] != len(order):
                raise InvalidInputError(
                    f"mlm_mask has {mask.shape[0]} rows for {len(order)} cells."
                )
            selected = torch.zeros(ids.shape, dtype=torch.bool)
            w = min(mask.shape[1], ids.shape[1])
            selected[:, :w] = torch.as_tensor(mask[:, :w])
        self.module.eval()
        with torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            masked, labels = self.module.mask_tokens(ids_t, lengths_t, selected)
            out = self.module.pretraining_losses(masked, lengths_t, cell_type, labels)
        return {k: (float(v) if v.ndim == 0 else v.detach().cpu().numpy()) for k, v in out.items()}
