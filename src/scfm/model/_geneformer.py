"""Geneformer (Theodoris V1 / V2) and NVIDIA BioNeMo Geneformer as an scvi-tools model."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scvi import REGISTRY_KEYS
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin

from scfm.data._geneformer_tokenizer import (
    CLS_TOKEN,
    EOS_TOKEN,
    MASK_TOKEN,
    PAD_TOKEN,
    V1_INPUT_SIZE,
    V2_INPUT_SIZE,
    GeneformerDictionaries,
    geneformer_gene_tokens,
    load_geneformer_dictionaries,
)
from scfm.data._genes import align_genes, detect_id_type, map_gene_ids, strip_version
from scfm.errors import InvalidInputError
from scfm.model.base import FoundationModelMixin, record_in_uns
from scfm.module._geneformer import GeneformerModule

logger = logging.getLogger(__name__)

__all__ = ["Geneformer"]

Variant = Literal["V1", "V2", "bionemo"]

#: BioNeMo ``GeneTokenizer`` special tokens (ids 0..4); genes follow at V1 id + 3.
BIONEMO_SPECIAL_TOKENS = ("[CLS]", "[MASK]", "[PAD]", "[SEP]", "[UKW]")
#: Reference defaults per variant: (pooling, layer) of EmbExtractor / BioNeMo inference.
_DEFAULT_POOLING = {"V1": ("mean", -2), "V2": ("cls", -2), "bionemo": ("mean_drop_last", -1)}
#: Default model input sizes (special tokens included).
_INPUT_SIZE = {"V1": V1_INPUT_SIZE, "V2": V2_INPUT_SIZE, "bionemo": 2048}


class Geneformer(FoundationModelMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """Geneformer: a BERT over rank-value encoded transcriptomes :cite:p:`Theodoris2023`.

    Cells are tokenised on the fly from raw counts: each expressed gene's count is scaled to
    10,000 counts per cell, divided by the gene's corpus median, and the genes are ordered
    by that value (:func:`scfm.data.rank_value_encode`). ``Geneformer(adata, ...)`` builds a
    randomly initialised model (pretrain with :meth:`train`); released checkpoints are read
    with :meth:`from_pretrained`.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`; ``adata.var_names`` (or the
        ``gene_id_key`` column) must be Ensembl ids (symbols are converted with GENCODE v48).
    variant
        ``"V1"``: 2048 input, no special tokens (Geneformer-V1-10M, gf-12L-30M).
        ``"V2"``: 4096 input, ``<cls>`` and ``<eos>`` (gf-*-95M, Geneformer-V2-104M/316M).
        ``"bionemo"``: NVIDIA BioNeMo geneformer-*-240530 (pre-LayerNorm, GELU, ``[CLS]``
        prepended, ids = V1 id + 3).
    hidden_size, num_hidden_layers, num_attention_heads, intermediate_size
        Architecture (defaults: Geneformer-V1-10M, 256 / 6 / 4 / 512).
    hidden_act
        MLP activation: ``"relu"`` (Theodoris releases) or ``"gelu"`` (BioNeMo).
    hidden_dropout_prob, attention_probs_dropout_prob
        Dropout rates used in training (V1 0.02, V2 0.1).
    layer_norm_eps
        LayerNorm epsilon (1e-12 in every release).
    input_size
        Model input size incl. special tokens; default V1 2048, V2 4096, BioNeMo 2048.
    max_position_embeddings
        Rows of the position embedding; default ``input_size``.
    vocab_size
        Rows of the word embedding; default the token dictionary size (BioNeMo pads to 25472).
    token_dictionary, gene_median_dictionary, gene_name_id_dictionary, gene_mapping_dictionary
        The Geneformer dictionaries as plain dicts; ``None`` uses the V1 (gc30M) dictionaries
        shipped with scfm (for ``"bionemo"`` they are shifted by 3 behind its special tokens).
    collapse_gene_ids
        Sum the counts of genes that the mapping dictionary sends onto the same token (the
        reference default).
    classifier_labels
        Class names of a cell classification head (added by :meth:`finetune` or read from a
        fine-tuned ``BertForSequenceClassification`` release); ``None`` = no head.

    Examples
    --------
    >>> scfm.model.Geneformer.setup_anndata(adata)
    >>> model = scfm.model.Geneformer.from_pretrained("Geneformer-V2-104M", adata)
    >>> adata.obsm["X_geneformer"] = model.get_latent_representation()
    """

    _model_name = "geneformer"
    _default_batch_size = 16
    _has_gene_embeddings = True

    def __init__(
        self,
        adata: ad.AnnData,
        variant: Variant = "V1",
        hidden_size: int = 256,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 4,
        intermediate_size: int = 512,
        hidden_act: str = "relu",
        hidden_dropout_prob: float = 0.02,
        attention_probs_dropout_prob: float = 0.02,
        layer_norm_eps: float = 1e-12,
        input_size: int | None = None,
        max_position_embeddings: int | None = None,
        vocab_size: int | None = None,
        token_dictionary: dict[str, int] | None = None,
        gene_median_dictionary: dict[str, float] | None = None,
        gene_name_id_dictionary: dict[str, str] | None = None,
        gene_mapping_dictionary: dict[str, str] | None = None,
        collapse_gene_ids: bool = True,
        classifier_labels: list[str] | None = None,
    ) -> None:
        super().__init__(adata)
        if variant not in _INPUT_SIZE:
            raise InvalidInputError(
                f"variant={variant!r} is not supported; use 'V1', 'V2' or 'bionemo'."
            )
        self.variant = variant
        self.dictionaries = self._resolve_dictionaries(
            variant,
            token_dictionary,
            gene_median_dictionary,
            gene_name_id_dictionary,
            gene_mapping_dictionary,
        )
        tokens = self.dictionaries.token_dictionary
        input_size = int(input_size or _INPUT_SIZE[variant])
        if variant == "bionemo":
            pad, mask, cls_id, eos_id = (tokens[n] for n in ("[PAD]", "[MASK]", "[CLS]", "[SEP]"))
            eos_id = None  # BioNeMo adds no trailing [SEP] at inference
            special = [tokens[n] for n in BIONEMO_SPECIAL_TOKENS]
        else:
            pad, mask = tokens[PAD_TOKEN], tokens[MASK_TOKEN]
            cls_id = tokens.get(CLS_TOKEN) if variant == "V2" else None
            eos_id = tokens.get(EOS_TOKEN) if variant == "V2" else None
            if variant == "V2" and (cls_id is None or eos_id is None):
                raise InvalidInputError(
                    "variant='V2' needs <cls> and <eos> in the token dictionary; pass the V2 "
                    "(gc104M) dictionaries or use variant='V1'."
                )
            special = [v for k, v in tokens.items() if k.startswith("<")]
        bionemo = variant == "bionemo"
        bert_config = {
            "vocab_size": int(vocab_size or max(tokens.values()) + 1),
            "hidden_size": hidden_size,
            "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": num_attention_heads,
            "intermediate_size": intermediate_size,
            "hidden_act": hidden_act,
            "hidden_dropout_prob": hidden_dropout_prob,
            "attention_probs_dropout_prob": attention_probs_dropout_prob,
            "max_position_embeddings": int(max_position_embeddings or input_size),
            "type_vocab_size": 0 if bionemo else 2,
            "layer_norm_eps": layer_norm_eps,
            "pad_token_id": pad,
            "pre_layer_norm": bionemo,
            "embedding_layer_norm": not bionemo,
        }
        gene_ids = self._gene_ids(adata)
        token_ids, medians = geneformer_gene_tokens(
            gene_ids, self.dictionaries, collapse_gene_ids=collapse_gene_ids
        )
        alignment = align_genes(
            pd.Index(gene_ids),
            {g: i for g, i in tokens.items() if g in self.dictionaries.gene_median_dictionary},
            id_type="ensembl",
            model_name="Geneformer",
            convert=False,
        )
        self.module = GeneformerModule(
            bert_config,
            token_ids,
            medians,
            input_size=input_size,
            pad_token_id=pad,
            mask_token_id=mask,
            cls_token_id=cls_id,
            eos_token_id=eos_id,
            special_token_ids=special,
            n_labels=len(classifier_labels or []),
        )
        self.classifier_labels = list(classifier_labels) if classifier_labels else None
        self._set_gene_alignment(adata, alignment)
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _resolve_dictionaries(
        variant: str,
        token_dictionary: dict | None,
        gene_median_dictionary: dict | None,
        gene_name_id_dictionary: dict | None,
        gene_mapping_dictionary: dict | None,
    ) -> GeneformerDictionaries:
        if token_dictionary is None or gene_median_dictionary is None:
            shipped = load_geneformer_dictionaries(version="V1")
            if token_dictionary is None and variant == "V2":
                raise InvalidInputError(
                    "variant='V2' needs the V2 dictionaries (scfm ships only the V2 token "
                    "dictionary, not its medians): pass token_dictionary and "
                    "gene_median_dictionary, or use Geneformer.from_pretrained(<V2 dir>)."
                )
            if token_dictionary is None:
                token_dictionary = shipped.token_dictionary
                if variant == "bionemo":
                    token_dictionary = bionemo_token_dictionary(token_dictionary)
            gene_median_dictionary = gene_median_dictionary or shipped.gene_median_dictionary
            gene_name_id_dictionary = gene_name_id_dictionary or shipped.gene_name_id_dictionary
        return GeneformerDictionaries(
            token_dictionary={str(k): int(v) for k, v in token_dictionary.items()},
            gene_median_dictionary={str(k): float(v) for k, v in gene_median_dictionary.items()},
            gene_name_id_dictionary=dict(gene_name_id_dictionary or {}),
            ensembl_mapping_dictionary=gene_mapping_dictionary,
        )

    def _gene_ids(self, adata: ad.AnnData) -> pd.Index:
        """Ensembl ids of ``adata.var`` (symbols mapped with Geneformer's name dictionary)."""
        key = self.adata_manager.registry["setup_args"].get("gene_id_key")
        ids = pd.Index(adata.var[key].astype(str) if key else adata.var_names.astype(str))
        if detect_id_type(ids) == "ensembl":
            return pd.Index(strip_version(ids))
        names = self.dictionaries.gene_name_id_dictionary
        mapped = ids.map(lambda s: names.get(s, np.nan))
        fallback = map_gene_ids(ids, to="ensembl").to_numpy()
        out = np.where(pd.isna(mapped), fallback, mapped)
        logger.warning(
            "Gene ids look like symbols: mapped %d of %d to Ensembl ids with Geneformer's name "
            "dictionary and GENCODE v48. Pass gene_id_key=<column of Ensembl ids> to avoid this.",
            int(pd.notna(out).sum()),
            len(ids),
        )
        return pd.Index(["" if pd.isna(x) else str(x) for x in out])

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
        **kwargs: Any,
    ) -> Geneformer:
        """Read a released HF directory (or a BioNeMo checkpoint) and load its weights.

        Parameters
        ----------
        path
            Geneformer HF model directory (``config.json`` + ``model.safetensors`` /
            ``pytorch_model.bin``), or a BioNeMo geneformer-240530 checkpoint (see
            :func:`scfm.io.read_bionemo_geneformer`).
        adata
            Registered AnnData.
        token_dictionary_file, gene_median_file, gene_name_id_file, gene_mapping_file
            Dictionary pickles; default: ``*.pkl`` files found in ``path``, else the V1
            dictionaries shipped with scfm (a V2 model needs its median dictionary).
        collapse_gene_ids
            Sum counts of genes mapped onto the same token (reference default).
        trust_checkpoint
            Allow full unpickling of ``pytorch_model.bin`` files that need it.
        **kwargs
            BioNeMo only: ``num_attention_heads``, ``hidden_act``.
        """
        from scfm.io._common import load_state_dict_strict
        from scfm.io._geneformer import read_geneformer_checkpoint

        if not (path / "config.json").is_file():
            from scfm.io._bionemo import read_bionemo_geneformer

            ckpt = read_bionemo_geneformer(path, trust_checkpoint=trust_checkpoint, **kwargs)
            model = cls(
                adata, variant="bionemo", collapse_gene_ids=collapse_gene_ids, **ckpt.init_kwargs
            )
            load_state_dict_strict(model.module, ckpt.state_dict, what=str(path))
            return model
        if kwargs:
            raise InvalidInputError(
                f"Unknown options for a Geneformer HF directory: {sorted(kwargs)}."
            )
        ckpt = read_geneformer_checkpoint(path, trust_checkpoint=trust_checkpoint)
        config = ckpt.config
        guess = "V1" if int(config["vocab_size"]) == 25426 else "V2"
        dicts = load_geneformer_dictionaries(
            path,
            version=guess,
            token_dictionary_file=token_dictionary_file,
            gene_median_file=gene_median_file,
            gene_name_id_file=gene_name_id_file,
            gene_mapping_file=gene_mapping_file,
            vocab_size=int(config["vocab_size"]),
        )
        variant = "V2" if dicts.has_special_tokens else "V1"
        model = cls(
            adata,
            variant=variant,
            hidden_size=config["hidden_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=config["num_attention_heads"],
            intermediate_size=config["intermediate_size"],
            hidden_act=config.get("hidden_act", "relu"),
            hidden_dropout_prob=config.get("hidden_dropout_prob", 0.1),
            attention_probs_dropout_prob=config.get("attention_probs_dropout_prob", 0.1),
            layer_norm_eps=config.get("layer_norm_eps", 1e-12),
            max_position_embeddings=config["max_position_embeddings"],
            vocab_size=config["vocab_size"],
            token_dictionary=dicts.token_dictionary,
            gene_median_dictionary=dicts.gene_median_dictionary,
            gene_name_id_dictionary=dicts.gene_name_id_dictionary,
            gene_mapping_dictionary=dicts.ensembl_mapping_dictionary,
            collapse_gene_ids=collapse_gene_ids,
            classifier_labels=ckpt.labels,
        )
        allow_missing: list[str] = []
        if ckpt.architecture == "BertForSequenceClassification":
            # Fine-tuned classifiers ship no MLM head; it stays randomly initialised.
            allow_missing = [k for k in model.module.state_dict() if k.startswith("cls.")]
            logger.info("Cell classifier checkpoint: the MLM head is not part of it.")
        load_state_dict_strict(
            model.module, ckpt.state_dict, what=str(ckpt.weights_file), allow_missing=allow_missing
        )
        return model

    # ------------------------------------------------------------------ minibatching
    def _length_columns(self) -> np.ndarray:
        # Cells of similar length share a minibatch so that padding to the longest stays small.
        return np.flatnonzero(self.module.gene_token_ids.cpu().numpy() >= 0)

    # ------------------------------------------------------------------ embeddings
    def _defaults(self, pooling: str | None, layer: int | None) -> tuple[str, int]:
        default_pooling, default_layer = _DEFAULT_POOLING[self.variant]
        return pooling or default_pooling, default_layer if layer is None else layer

    def get_latent_representation(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        *,
        pooling: Literal["cls", "mean", "mean_drop_last"] | None = None,
        layer: int | None = None,
        progress_bar: bool = True,
    ) -> np.ndarray:
        """Cell embeddings as the reference extracts them.

        Parameters
        ----------
        adata
            AnnData set up like the model's; ``None`` uses the model's AnnData.
        indices
            Cells to embed; ``None`` embeds all. Rows come back in this order.
        batch_size
            Cells per minibatch (cells are grouped by length internally).
        pooling
            ``"cls"``: the ``<cls>`` token (V2 default, EmbExtractor ``emb_mode="cls"``);
            ``"mean"``: mean over gene tokens (V1 default, ``emb_mode="cell"``);
            ``"mean_drop_last"``: BioNeMo's mean, which also drops the last real token
            (BioNeMo default). ``"cls"`` on a V1 model returns the top-ranked gene's state.
        layer
            Index into (embedding output, layer 1, ..., layer N): ``-1`` = last layer,
            ``-2`` = second to last (EmbExtractor's ``emb_layer=-1``, the Theodoris
            default); BioNeMo default ``-1``.
        progress_bar
            Show a progress bar.

        Returns
        -------
        ``(n_cells, hidden_size)`` float32 array.
        """
        pooling, layer = self._defaults(pooling, layer)
        self.module.resolve_layer(layer)
        return super().get_latent_representation(
            adata, indices, batch_size, progress_bar=progress_bar, pooling=pooling, layer=layer
        )

    def _latent_minibatch(
        self, tensors: dict[str, torch.Tensor], pooling: str = "cls", layer: int = -2
    ) -> torch.Tensor:
        x = tensors[REGISTRY_KEYS.X_KEY].to(self.device)
        return self.module.embed_cells(x, pooling, layer)

    def get_gene_embeddings(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        *,
        layer: int | None = None,
        progress_bar: bool = True,
    ) -> pd.DataFrame:
        """Contextual gene embeddings averaged over cells (EmbExtractor ``emb_mode="gene"``).

        Every occurrence of a token in the selected cells contributes, including the
        ``<cls>`` / ``<eos>`` rows (as the reference does). ``layer`` as in
        :meth:`get_latent_representation`.
        """
        _, layer = self._defaults(None, layer)
        self.module.resolve_layer(layer)
        return super().get_gene_embeddings(
            adata, indices, batch_size, progress_bar=progress_bar, layer=layer
        )

    def _gene_embedding_minibatch(
        self, tensors: dict[str, torch.Tensor], layer: int = -2
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = tensors[REGISTRY_KEYS.X_KEY].to(self.device)
        ids, lengths = self.module.tokenize(x)
        hidden, real = self.module.encode(ids, lengths, layer)
        return ids[real], hidden[real]

    def _vocab_names(self) -> list[str]:
        names = self.dictionaries.vocab_names()
        n = self.module.config.vocab_size
        # BioNeMo pads the embedding to a multiple of 128 rows: name the padding rows.
        return names + [f"<unused{i}>" for i in range(len(names), n)]

    # ------------------------------------------------------------------ tokens / logits
    def get_tokens(
        self, adata: ad.AnnData | None = None, indices: Sequence[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Token ids the model sees, as the reference tokenizer writes them.

        Returns
        -------
        input_ids
            ``(n_cells, max_length)`` int64, padded with ``-1``; rows in ``indices`` order.
        lengths
            ``(n_cells,)`` int64.
        """
        adata = self._validate_anndata(adata)
        cells, inverse = self._resolve_indices(adata, indices)
        rows: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(cells)
        for positions, tensors in self._iterate(adata, cells, None, "tokens", False):
            ids, lengths = self.module.tokenize(tensors[REGISTRY_KEYS.X_KEY].to(self.device))
            for p, row, n in zip(positions, ids.cpu().numpy(), lengths.cpu().numpy()):
                rows[p] = row[:n]
        width = max((len(r) for r in rows), default=0)
        out = np.full((len(cells), width), -1, dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        return out[inverse], lengths[inverse]

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
        lengths = (ids >= 0).sum(1)
        clean = torch.where(ids >= 0, ids, torch.full_like(ids, self.module.pad_token_id))
        self.module.eval()
        logits = self.module.mlm_logits(clean, lengths)
        logits = logits * (ids >= 0)[..., None]
        return logits.float().cpu().numpy()

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int = 12,
        plan_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        """Pretrain with the masked-language-model objective (or fine-tune, see :meth:`finetune`).

        Each minibatch is tokenised on the fly; 15% of the gene tokens are selected (80%
        ``<mask>``, 10% a random gene, 10% unchanged; special tokens never) and the
        cross-entropy of the selected tokens is minimised through scvi-tools' ``TrainRunner``
        and Lightning.

        Parameters
        ----------
        max_epochs
            Passes over the data (scvi-tools' default when ``None``).
        batch_size
            Cells per minibatch (reference: 12 per GPU).
        plan_kwargs
            Training plan options; defaults follow the reference pretrainer: AdamW with
            ``eps=1e-8``, ``weight_decay=0.001``, ``lr=1e-3`` (scvi's Adam ``eps=0.01``
            stalls transformer training).
        **kwargs
            Passed to :meth:`scvi.model.base.UnsupervisedTrainingMixin.train`
            (``accelerator``, ``devices``, ``train_size``, ``datamodule``, ...).
        """
        plan = {"optimizer": "AdamW", "eps": 1e-8, "weight_decay": 0.001, "lr": 1e-3}
        plan.update(plan_kwargs or {})
        # The base runs this in training mode (dropout on) and records the history.
        return super().train(
            max_epochs=max_epochs, batch_size=batch_size, plan_kwargs=plan, **kwargs
        )

    # ------------------------------------------------------------------ fine-tuning
    def finetune(
        self,
        labels_key: str | None = None,
        freeze_layers: int = 0,
        max_epochs: int = 10,
        lr: float = 5e-5,
        weight_decay: float = 0.001,
        batch_size: int = 12,
        **train_kwargs: Any,
    ) -> None:
        """Fine-tune a cell classifier (the reference ``Classifier(classifier="cell")`` recipe).

        A pooler + linear head on the first token (``tanh(dense(h[:, 0]))``, HF
        ``BertForSequenceClassification``) is trained with cross-entropy on the labels that
        :meth:`setup_anndata` registered (``labels_key``), through scvi-tools' training loop.

        Parameters
        ----------
        labels_key
            Must equal the ``labels_key`` given to :meth:`setup_anndata` (checked).
        freeze_layers
            Freeze the first ``freeze_layers`` encoder layers (reference ``freeze_layers``).
        max_epochs, lr, weight_decay, batch_size
            Training settings (reference: 10 epochs, batch 12, weight decay 0.001).
        **train_kwargs
            Passed to :meth:`train` (e.g. ``train_size``, ``accelerator``).
        """
        state = self.adata_manager.get_state_registry(REGISTRY_KEYS.LABELS_KEY)
        registered = state.original_key
        if labels_key is not None and labels_key != registered:
            raise InvalidInputError(
                f"labels_key={labels_key!r} differs from the one registered with setup_anndata "
                f"({registered!r}); call setup_anndata(adata, labels_key={labels_key!r}) first."
            )
        labels = [str(c) for c in state.categorical_mapping]
        if len(labels) < 2:
            raise InvalidInputError(
                "Fine-tuning needs at least two classes: call setup_anndata(adata, "
                "labels_key='<obs column of cell labels>')."
            )
        if not 0 <= freeze_layers <= self.module.n_layers:
            raise InvalidInputError(
                f"freeze_layers must be in [0, {self.module.n_layers}], got {freeze_layers}."
            )
        if self.classifier_labels != labels:
            self.module.add_classifier(len(labels))
            self.classifier_labels = labels
            self.init_params_["non_kwargs"]["classifier_labels"] = labels
        for i, layer in enumerate(self.module.bert.encoder.layer):
            for p in layer.parameters():
                p.requires_grad_(i >= freeze_layers)
        self.module.objective = "classification"
        try:
            plan = {"lr": lr, "weight_decay": weight_decay, **train_kwargs.pop("plan_kwargs", {})}
            self.train(
                max_epochs=max_epochs, batch_size=batch_size, plan_kwargs=plan, **train_kwargs
            )
        finally:
            self.module.objective = "mlm"
            for p in self.module.parameters():
                p.requires_grad_(True)
        self.module.eval()

    @torch.inference_mode()
    def predict(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        key_added: str = "geneformer_prediction",
        progress_bar: bool = True,
    ) -> pd.DataFrame:
        """Predict cell labels with the fine-tuned classification head.

        Writes ``adata.obs[key_added]`` (label, categorical) and
        ``adata.obs[f"{key_added}_probability"]`` (its probability) for the selected cells
        (other cells get NaN) and records the call in ``adata.uns["scfm"]["obs"]``.

        Returns
        -------
        DataFrame of class probabilities (cells x classes), indexed by ``obs_names``.
        """
        if self.module.classifier is None or not self.classifier_labels:
            raise InvalidInputError(
                "The model has no classification head: call model.finetune(...) first or "
                "load a fine-tuned Geneformer cell classifier."
            )
        adata = self._validate_anndata(adata)
        cells, inverse = self._resolve_indices(adata, indices)
        self.module.eval()
        probs = np.zeros((len(cells), len(self.classifier_labels)), dtype=np.float32)
        for positions, tensors in self._iterate(
            adata, cells, batch_size, "geneformer predict", progress_bar
        ):
            x = tensors[REGISTRY_KEYS.X_KEY].to(self.device)
            ids, lengths = self.module.tokenize(x)
            hidden, _ = self.module.encode(ids, lengths, -1)
            logits = self.module.classifier(self.module.bert.pooler(hidden))
            probs[positions] = torch.softmax(logits, -1).float().cpu().numpy()
        probs = probs[inverse]
        sel = cells[inverse]
        frame = pd.DataFrame(probs, index=adata.obs_names[sel], columns=self.classifier_labels)
        labels = pd.Series(pd.NA, index=adata.obs_names, dtype=object)
        labels.iloc[sel] = np.asarray(self.classifier_labels, dtype=object)[probs.argmax(1)]
        best = np.full(adata.n_obs, np.nan, dtype=np.float32)
        best[sel] = probs.max(1)
        adata.obs[key_added] = pd.Categorical(labels, categories=self.classifier_labels)
        adata.obs[f"{key_added}_probability"] = best
        record_in_uns(adata, "obs", key_added, self._provenance({}))
        return frame


def bionemo_token_dictionary(v1_token_dictionary: dict[str, int]) -> dict[str, int]:
    """BioNeMo ``GeneTokenizer`` vocabulary: 5 special tokens, then the V1 genes at V1 id + 3.

    The V1 gene ids start at 2 (after ``<pad>``, ``<mask>``); BioNeMo lists the same genes in
    the same order after its 5 special tokens, so ``bionemo_id = v1_id + 3``. UNVERIFIED
    against the vocabulary file inside the 240530 checkpoints (constructed as the spec says).
    """
    out = {name: i for i, name in enumerate(BIONEMO_SPECIAL_TOKENS)}
    offset = len(BIONEMO_SPECIAL_TOKENS) - 2
    for gene, idx in v1_token_dictionary.items():
        if not gene.startswith("<"):
            out[gene] = int(idx) + offset
    return out
