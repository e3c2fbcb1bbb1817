"""Geneformer (Theodoris V1 / V2) and NVIDIA BioNeMo Geneformer as an scvi-tools model."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scvi import REGISTRY_KEYS
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin

from scfm.data._geneformer_tokenizer import (
    GeneformerDictionaries,
    geneformer_ensembl_ids,
    geneformer_gene_tokens,
)
from scfm.data._genes import GeneAlignment
from scfm.errors import CheckpointNotFoundError, GeneVocabularyError, InvalidInputError
from scfm.model.base import FoundationModelMixin
from scfm.module._geneformer import POOLINGS, GeneformerConfig, GeneformerModule

logger = logging.getLogger(__name__)

__all__ = ["Geneformer"]

#: Reference defaults per variant: (pooling, hidden_layer) of EmbExtractor (``emb_layer=-1``
#: = second to last layer; V1 mean pooling, V2 ``<cls>``) and of BioNeMo inference.
DEFAULTS = {"V1": ("mean", -2), "V2": ("cls", -2), "bionemo": ("mean_drop_last", -1)}
#: Task options accepted by :meth:`Geneformer._inference_kwargs`.
_TASK_OPTIONS = {"latent": {"pooling", "hidden_layer"}, "genes": {"hidden_layer"}}


class Geneformer(FoundationModelMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """Geneformer: a BERT over rank-value encoded transcriptomes :cite:p:`Theodoris2023`.

    Cells are tokenised on the fly from raw counts: each expressed gene's count is scaled to
    10,000 counts per cell, divided by the gene's corpus median, and the genes are ordered
    by that value (:func:`scfm.data.rank_value_encode`). ``Geneformer(adata, config)``
    builds a randomly initialised model (pretrain with :meth:`train`); released checkpoints
    are read with :meth:`from_pretrained`.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`; genes as Ensembl ids (any case,
        with or without version); symbols are mapped with Geneformer's name dictionary, then
        GENCODE v48, id by id.
    config
        :class:`~scfm.module._geneformer.GeneformerConfig` or a dict of its fields (HF
        ``config.json`` names; ``variant`` ``"V1"`` / ``"V2"`` / ``"bionemo"``, default V2
        for dictionaries with ``<cls>`` / ``<eos>``, else V1); ``None`` uses
        Geneformer-V1-10M (6 layers, 256 hidden, 4 heads, 512 FFN, relu, 2048 input).
        Special token ids always come from the dictionaries; a dict without ``vocab_size``
        gets the token dictionary's size.
    dictionaries
        The token / median / name / mapping dictionaries; ``None`` uses the V1 (gc30M)
        dictionaries shipped with scfm (BioNeMo: the same genes at id + 3). scfm does not
        ship V2 medians: a V2 model needs the release's dictionaries.
    collapse_gene_ids
        Sum the counts of genes that the mapping dictionary sends onto one token (the
        reference default).
    **config_fields
        :class:`~scfm.module._geneformer.GeneformerConfig` fields overriding ``config``
        (e.g. ``hidden_size=64``).

    Examples
    --------
    >>> scfm.model.Geneformer.setup_anndata(adata)
    >>> model = scfm.model.Geneformer.from_pretrained("Geneformer-V2-104M", adata)
    >>> adata.obsm["X_geneformer"] = model.get_latent_representation()
    """

    _model_name = "geneformer"
    _default_batch_size = 16
    _requires_counts = True
    _sort_by_length = True  # minibatches of similar length: little padding

    def __init__(
        self,
        adata: ad.AnnData,
        config: GeneformerConfig | Mapping[str, Any] | None = None,
        dictionaries: GeneformerDictionaries | None = None,
        *,
        collapse_gene_ids: bool = True,
        **config_fields: Any,
    ) -> None:
        super().__init__(adata)
        unknown = sorted(set(config_fields) - set(GeneformerConfig.__dataclass_fields__))
        if unknown:
            raise InvalidInputError(f"Unknown Geneformer config fields: {', '.join(unknown)}.")
        fields = dict(config.to_dict() if isinstance(config, GeneformerConfig) else config or {})
        fields.update(config_fields)
        v2 = dictionaries is not None and dictionaries.has_special_tokens
        variant = fields.setdefault("variant", "V2" if v2 else "V1")
        if dictionaries is None:
            dictionaries = GeneformerDictionaries.shipped(variant)
        dictionaries.validate()
        fields.update(dictionaries.special_token_ids(variant))
        fields.setdefault("vocab_size", max(dictionaries.token_dictionary.values()) + 1)
        self.config = GeneformerConfig.from_dict(fields)
        self.dictionaries = dictionaries
        self._vocabulary = pd.Index(dictionaries.vocab_names(), name="gene_id")
        self.collapse_gene_ids = bool(collapse_gene_ids)
        self.module = GeneformerModule(self.config, dictionaries.token_medians())
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ loading
    @classmethod
    def _from_pretrained(
        cls,
        path: Path,
        adata: ad.AnnData,
        *,
        token_dictionary_file: str | None = None,
        gene_median_file: str | None = None,
        gene_name_id_file: str | None = None,
        gene_mapping_file: str | None = None,
        collapse_gene_ids: bool = True,
        trust_checkpoint: bool = False,
        num_attention_heads: int | None = None,
        hidden_act: str = "gelu",
    ) -> Geneformer:
        """Read a released HF directory (or a BioNeMo checkpoint) and load its weights.

        Parameters
        ----------
        path
            Geneformer HF model directory (``config.json`` + ``model.safetensors`` /
            ``pytorch_model.bin``; a ``BertForSequenceClassification`` directory brings its
            cell classifier), or a BioNeMo geneformer-240530 checkpoint (NeMo2 directory,
            ``.nemo`` file or state-dict file, see :func:`scfm.io.read_bionemo_geneformer`).
        adata
            Registered AnnData.
        token_dictionary_file, gene_median_file, gene_name_id_file, gene_mapping_file
            HF releases: dictionary pickles; default: the ``*.pkl`` files in ``path``, else
            the V1 dictionaries shipped with scfm (a V2 model needs its medians).
        collapse_gene_ids
            See :class:`Geneformer`.
        trust_checkpoint
            Allow full unpickling of torch files that need it.
        num_attention_heads, hidden_act
            BioNeMo only (heads are not stored in its weights; GELU is its activation).
        """
        from scfm.io._common import load_state_dict_strict

        if path.is_file() and (path.parent / "config.json").is_file():
            raise CheckpointNotFoundError(
                f"{path} is one file of a Geneformer release: pass the release folder "
                f"({path.parent}), which holds config.json, the weights and the dictionaries."
            )
        if (path / "config.json").is_file():
            from scfm.io._geneformer import classifier_labels, read_geneformer_checkpoint

            if num_attention_heads is not None:
                raise InvalidInputError(
                    "num_attention_heads is read from config.json for a Geneformer HF "
                    "directory; pass it only for BioNeMo checkpoints."
                )
            release = read_geneformer_checkpoint(
                path,
                token_dictionary_file=token_dictionary_file,
                gene_median_file=gene_median_file,
                gene_name_id_file=gene_name_id_file,
                gene_mapping_file=gene_mapping_file,
                trust_checkpoint=trust_checkpoint,
            )
            labels = classifier_labels(release.config)
        else:
            from scfm.io._bionemo import read_bionemo_geneformer

            release = read_bionemo_geneformer(
                path,
                num_attention_heads=num_attention_heads,
                hidden_act=hidden_act,
                trust_checkpoint=trust_checkpoint,
            )
            labels = None
        config = GeneformerConfig.from_dict(release.config)
        what = str(release.files.get("weights", path))
        config.check_shapes(release.state_dict, what=what)  # before anything is allocated
        model = cls(adata, config, release.vocabulary, collapse_gene_ids=collapse_gene_ids)
        allow_missing: list[str] = []
        if labels is not None:
            model.module.add_classifier(len(labels))
            model.classifier_labels = labels
            # A fine-tuned classifier ships no MLM head; it stays randomly initialised.
            allow_missing = [k for k in model.module.state_dict() if k.startswith("cls.")]
            logger.info("Cell classifier checkpoint (%s): no MLM head in it.", ", ".join(labels))
        load_state_dict_strict(
            model.module, release.state_dict, what=what, allow_missing=allow_missing
        )
        return model

    def train(
        self,
        max_epochs: int | None = None,
        *,
        batch_size: int = 12,
        plan_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Pretrain with the masked-language-model objective (the reference pretrainer).

        15% of each cell's gene tokens are selected (80% ``<mask>``, 10% a random gene, 10%
        unchanged) and their cross-entropy minimised (scvi-tools ``TrainRunner``, Lightning).

        Parameters
        ----------
        max_epochs
            Passes over the data (scvi-tools' default when ``None``).
        batch_size
            Cells per minibatch (reference: 12 per GPU).
        plan_kwargs
            Training plan options; defaults follow the reference pretrainer: AdamW with
            ``eps=1e-8``, ``weight_decay=0.001``, ``lr=1e-3`` (scvi-tools' Adam ``eps=0.01``
            stalls transformer training).
        **kwargs
            Passed to the base ``train`` (``train_size``, ``accelerator``, ``devices``, ...).
        """
        plan = {"optimizer": "AdamW", "eps": 1e-8, "weight_decay": 0.001, "lr": 1e-3}
        super().train(
            max_epochs, batch_size=batch_size, plan_kwargs={**plan, **(plan_kwargs or {})}, **kwargs
        )

    # ------------------------------------------------------------------ genes
    @property
    def vocabulary(self) -> pd.Index:
        """Token names in token-id order: column ``j`` of the module's input is token ``j``."""
        return self._vocabulary

    def _align_genes(self, adata: ad.AnnData) -> GeneAlignment:
        """Match ``adata``'s genes onto token ids, as the reference tokenizer maps them.

        Ensembl ids are matched whatever their case and version suffix, id by id; other ids
        (symbols) are mapped with Geneformer's name dictionary, then GENCODE v48. Ids the
        mapping dictionary sends onto one token are summed (``collapse_gene_ids``).
        """
        # The AnnData's own setup (also when a caller has not validated it for this model).
        manager = self.get_anndata_manager(adata) or self._get_most_recent_anndata_manager(adata)
        args = manager.registry["setup_args"] if manager is not None else self.setup_args
        key = args.get("gene_id_key")
        raw = pd.Index(adata.var[key].astype(str) if key else adata.var_names.astype(str))
        source = f"var[{key!r}]" if key else "var_names"
        names = self.dictionaries.gene_name_id_dictionary
        ids, n_symbols, n_mapped = geneformer_ensembl_ids(raw, names)
        if n_symbols:
            logger.info(
                "%d of %d gene ids in adata.%s are no Ensembl ids: %d mapped with Geneformer's "
                "name dictionary and GENCODE v48.",
                n_symbols,
                len(raw),
                source,
                n_mapped,
            )
            source += f" ({n_mapped} symbols mapped to Ensembl ids)"
        tokens, _ = geneformer_gene_tokens(
            ids, self.dictionaries, collapse_gene_ids=self.collapse_gene_ids
        )
        var_index = np.flatnonzero(tokens >= 0)
        vocab_index = tokens[var_index]
        if len(var_index) == 0:
            shown = ", ".join(repr(s) for s in raw[raw.str.strip() != ""][:3]) or "none"
            raise GeneVocabularyError(
                f"None of the {len(raw)} genes in adata.{source} is in the Geneformer "
                f"vocabulary (human Ensembl ids, e.g. ENSG00000141510); the AnnData's ids look "
                f"like {shown}. Likely causes: another species, or another id type (pass "
                "gene_id_key='<adata.var column of Ensembl ids>' to setup_anndata, or map "
                "symbols with scfm.data.map_gene_ids(adata.var_names))."
            )
        shared, counts = np.unique(vocab_index, return_counts=True)
        if (counts > 1).any():
            token = shared[counts > 1][0]
            shared_ids = raw[var_index[vocab_index == token]]
            logger.warning(
                "%d genes of adata.%s share a Geneformer token with another gene (e.g. %s -> "
                "%s); their counts are summed, as the reference tokenizer collapses them.",
                int(counts[counts > 1].sum()),
                source,
                ", ".join(shared_ids[:3]),
                self.vocabulary[token],
            )
        return GeneAlignment(
            var_index=var_index,
            vocab_index=vocab_index,
            n_vars=len(raw),
            n_vocab=len(self.vocabulary),
            id_type="ensembl",
            source=source,
        )

    # ------------------------------------------------------------------ options
    def _inference_kwargs(self, task: str, **options: Any) -> dict[str, Any]:
        """Resolve ``pooling`` / ``hidden_layer`` (release defaults) into inference kwargs.

        ``"latent"``: ``pooling`` (``"cls"``, ``"mean"``, ``"mean_drop_last"``) and
        ``hidden_layer``; ``"genes"``: ``hidden_layer``; ``"predict"``: the classifier reads
        the last layer; ``"train"``: the masked-language-model objective (masking on).
        """
        allowed = _TASK_OPTIONS.get(task, set())
        unknown = sorted(set(options) - allowed)
        if task == "expression":
            raise InvalidInputError("Geneformer has no expression decoder (it models ranks).")
        if unknown:
            raise InvalidInputError(
                f"Unknown Geneformer option(s) for this call: {', '.join(unknown)}; allowed: "
                f"{', '.join(sorted(allowed)) or 'none'}."
            )
        pooling, hidden_layer = DEFAULTS[self.config.variant]
        pooling = options.get("pooling", pooling)
        hidden_layer = options.get("hidden_layer", hidden_layer)
        if pooling not in POOLINGS:
            raise InvalidInputError(
                f"pooling={pooling!r} is not supported; use 'cls', 'mean' or 'mean_drop_last'."
            )
        self.module.resolve_layer(hidden_layer)
        kwargs = {
            # cell embeddings only: a <cls> read then skips the other tokens' last layer
            "latent": {"pooling": pooling, "hidden_layer": hidden_layer, "token_states": False},
            "genes": {"hidden_layer": hidden_layer},
            # the classifier reads the last layer at <cls> (the pooler's first token)
            "predict": {"hidden_layer": -1, "token_states": False},
            "train": {"hidden_layer": -1},
        }
        if task not in kwargs:
            raise InvalidInputError(f"Unknown task {task!r}.")
        return {**kwargs[task], "mask": task == "train"}

    # ------------------------------------------------------------------ model-specific extras
    @torch.inference_mode()
    def get_tokens(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Token ids the model reads, as the reference tokenizer writes them.

        Parameters
        ----------
        adata
            AnnData registered with :meth:`setup_anndata` (any gene set); ``None`` uses the
            model's own.
        indices
            Cells to tokenise; ``None``: all. Rows come back in this order.
        batch_size
            Cells per minibatch (the encoding of a cell does not depend on it).

        Returns
        -------
        input_ids
            ``(n_cells, max_length)`` int64, padded with ``-1``.
        lengths
            ``(n_cells,)`` int64, special tokens included.
        """
        call = self._prepare(adata, indices, batch_size, "latent", {})
        rows: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(call.cells)
        for tensors in self._loader(call):
            ids, lengths = self.module.tokenize(tensors[REGISTRY_KEYS.X_KEY].to(self.device))
            for p, row, n in zip(tensors["cell_index"].tolist(), ids.cpu().numpy(), lengths):
                rows[p] = row[:n]
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        out = np.full((len(rows), lengths.max()), -1, dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out[call.inverse], lengths[call.inverse]

    @torch.inference_mode()
    def get_mlm_logits(self, input_ids: np.ndarray | torch.Tensor) -> np.ndarray:
        """MLM logits of the final layer for token ids (``-1`` = padding).

        Parameters
        ----------
        input_ids
            ``(n_cells, L)`` token ids, e.g. from :meth:`get_tokens`, possibly with
            ``<mask>`` tokens.

        Returns
        -------
        ``(n_cells, L, vocab_size)`` float32; rows of padding positions are 0.
        """
        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long, device=self.device)
        if ids.ndim != 2 or (ids >= self.config.vocab_size).any():
            raise InvalidInputError(
                f"input_ids must be a 2-d array of token ids below {self.config.vocab_size}."
            )
        real = ids >= 0
        clean = torch.where(real, ids, torch.full_like(ids, self.config.pad_token_id))
        self.module.eval()
        out = self.module.inference(input_ids=clean, lengths=real.sum(1), mask=False)
        logits = self.module.mlm_logits(out.extra["last_hidden_state"]) * real[..., None]
        return logits.float().cpu().numpy()
