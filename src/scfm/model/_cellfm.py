"""CellFM :cite:p:`Zeng2025` as an scvi-tools model."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import fields
from typing import Any, ClassVar

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scvi import REGISTRY_KEYS
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin

from scfm.data._cellfm_tokenize import MAX_TOKENS, cellfm_reference_mask
from scfm.data._genes import align_genes
from scfm.errors import CheckpointFormatError, InvalidInputError, NotSetupError
from scfm.io._cellfm import (
    CellFMConfig,
    find_cellfm_files,
    read_cellfm_checkpoint,
    read_cellfm_genes,
)
from scfm.io._common import load_state_dict_strict
from scfm.model.base import FoundationModelMixin, record_in_uns
from scfm.module._cellfm import CellFMModule

logger = logging.getLogger(__name__)

__all__ = ["CellFM"]

#: Checkpoint entries a released file may lack (loaders of the 800M model use only the
#: encoder); the module keeps its fresh initialisation for them.
_OPTIONAL_PARAMETERS = ("zero_emb", "value_dec.", "cellwise_dec.")
#: Gene embedding rows are padded to a multiple of this (``n_genes + 1 + (-n_genes - 1) % 8``).
_ROW_MULTIPLE = 8


def _gene_rows(n_genes: int) -> int:
    return n_genes + 1 + (-n_genes - 1) % _ROW_MULTIPLE


class CellFM(FoundationModelMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """CellFM: a linear-retention foundation model of single-cell expression.

    Tokens are the non-zero genes of a cell (gene embedding + soft-binned log1p value),
    preceded by a CLS token; the encoder is a stack of gated linear retention layers, so the
    cost grows linearly with the genes per cell. The cell embedding is the last layer's CLS
    output. Released checkpoints are read with :meth:`from_pretrained` (no MindSpore needed).

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata` (raw counts, gene symbols).
    genes
        The gene vocabulary (HGNC symbols; token id = 1 + position). ``None`` uses the
        AnnData's genes (a new model trained from scratch).
    enc_dims
        Model width ``d`` (released: 1536).
    enc_nlayers
        Retention layers (80M: 2; 800M: 40).
    enc_num_heads
        Retention heads (released: 48).
    gene_rows
        Rows of the gene embedding table; ``None``: ``len(genes) + 1`` rounded up to a
        multiple of 8, as the reference.
    value_bins
        Bins of the soft-binning value encoder (256).
    st_tokens
        Include the two read-depth tokens (``ST_emb``; the 80M release has them).
    add_zero
        Include the zero-probability heads of the decoders.
    lora
        LoRA rank on every retention / GLU projection; 0 for none (set by
        :meth:`finetune_annotation`).
    enc_dropout
        Dropout of the residual branches in training (layer ``i`` uses ``enc_dropout * i / N``).
    mask_ratio
        Fraction of each cell's genes scored by the masked value recovery objective in
        :meth:`train` (pretraining ``train.py``: 0.2; the 80M fine-tuning examples: 0.5).
    max_tokens
        At most this many non-zero genes per cell (2048 as the reference; deeper cells keep
        a random sample weighted by ``log1p(value)``).
    read_depth_augment
        In training with read-depth tokens, thin half of the cells binomially and recover the
        original values (the reference's augmentation).
    n_labels
        Classes of the cell-type annotation head; 0 for none (set by
        :meth:`finetune_annotation`).
    labels
        Names of those classes, in head order.

    Examples
    --------
    >>> CellFM.setup_anndata(adata)  # doctest: +SKIP
    >>> model = CellFM.from_pretrained("CellFM/", adata)  # doctest: +SKIP
    >>> adata.obsm["X_cellfm"] = model.get_latent_representation()  # doctest: +SKIP
    """

    _model_name = "cellfm"
    _default_batch_size = 16
    _has_gene_embeddings: ClassVar[bool] = True

    def __init__(
        self,
        adata: ad.AnnData,
        genes: Sequence[str] | None = None,
        enc_dims: int = 1536,
        enc_nlayers: int = 2,
        enc_num_heads: int = 48,
        gene_rows: int | None = None,
        value_bins: int = 256,
        st_tokens: bool = True,
        add_zero: bool = False,
        lora: int = 0,
        enc_dropout: float = 0.0,
        mask_ratio: float = 0.5,
        max_tokens: int | None = MAX_TOKENS,
        read_depth_augment: bool = False,
        n_labels: int = 0,
        labels: Sequence[str] | None = None,
    ) -> None:
        super().__init__(adata)
        if genes is None:
            gene_id_key = self.setup_args.get("gene_id_key")
            source = adata.var_names if gene_id_key is None else adata.var[gene_id_key]
            genes = sorted(set(map(str, source)))
        genes = [str(g) for g in genes]
        if enc_num_heads < 1 or enc_dims % enc_num_heads:
            raise InvalidInputError(
                f"enc_num_heads={enc_num_heads} must divide enc_dims={enc_dims}."
            )
        if not 0.0 <= mask_ratio < 1.0:
            raise InvalidInputError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
        gene_rows = gene_rows or _gene_rows(len(genes))
        if gene_rows < len(genes) + 1:
            raise InvalidInputError(
                f"gene_rows={gene_rows} cannot hold {len(genes)} genes plus padding."
            )
        alignment = align_genes(
            adata.var,
            genes,
            id_type="symbol",
            gene_id_key=self.setup_args.get("gene_id_key"),
            model_name="CellFM",
        )
        # The reference aligns with np.intersect1d, i.e. in alphabetical gene order.
        vocab = np.asarray(genes, dtype=object)
        order = np.argsort(vocab[alignment.vocab_index].astype(str), kind="stable")
        self._genes = genes
        self.labels = list(labels) if labels is not None else None
        self.module = CellFMModule(
            kept_var_index=alignment.var_index[order].tolist(),
            kept_token_ids=(alignment.vocab_index[order] + 1).tolist(),
            enc_dims=enc_dims,
            enc_nlayers=enc_nlayers,
            enc_num_heads=enc_num_heads,
            gene_rows=gene_rows,
            value_bins=value_bins,
            st_tokens=st_tokens,
            add_zero=add_zero,
            lora=lora,
            enc_dropout=enc_dropout,
            mask_ratio=mask_ratio,
            max_tokens=max_tokens,
            read_depth_augment=read_depth_augment,
            n_labels=n_labels,
        )
        self._set_gene_alignment(adata, alignment)
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        adata: ad.AnnData,
        n_heads: int | None = None,
        gene_file: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> CellFM:
        """Load a released CellFM checkpoint (MindSpore ``.ckpt``), without MindSpore.

        Parameters
        ----------
        path
            ``CellFM_80M_weight.ckpt`` (80M) or ``base_weight.ckpt`` (800M), or the folder
            holding one. Its gene list (``expand_gene_info.csv`` / ``gene_info.csv``; not
            shipped with scfm for licence reasons) must lie beside it or in ``csv/``.
        adata
            AnnData registered with :meth:`setup_anndata`.
        n_heads
            Retention heads (not stored in checkpoints). ``None``: 48, the released value,
            for the released width 1536; required for any other width.
        gene_file
            Gene list to use instead of the one found beside the checkpoint.
        **kwargs
            ``mask_ratio``, ``max_tokens``, ``read_depth_augment``, ``enc_dropout`` (see
            the class).

        Returns
        -------
        The model, in eval mode.
        """
        return super().from_pretrained(path, adata, n_heads=n_heads, gene_file=gene_file, **kwargs)

    @classmethod
    def _from_pretrained(
        cls,
        path,
        adata: ad.AnnData,
        n_heads: int | None = None,
        gene_file: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> CellFM:
        allowed = {"mask_ratio", "max_tokens", "read_depth_augment", "enc_dropout"}
        unknown = set(kwargs) - allowed
        if unknown:
            raise InvalidInputError(
                f"Unknown arguments {sorted(unknown)} for CellFM.from_pretrained; allowed: "
                f"n_heads, gene_file, {', '.join(sorted(allowed))}."
            )
        ckpt_file, genes_file = find_cellfm_files(path, gene_file)
        genes = read_cellfm_genes(genes_file)
        config, state = read_cellfm_checkpoint(ckpt_file, num_heads=n_heads)
        if config.gene_rows < len(genes) + 1:
            raise CheckpointFormatError(
                f"{genes_file.name} lists {len(genes)} genes but the gene table of "
                f"{ckpt_file.name} has only {config.gene_rows} rows: the gene list belongs to "
                "another release. The 80M model needs expand_gene_info.csv, the 800M model "
                "gene_info.csv."
            )
        if config.gene_rows != _gene_rows(len(genes)):
            logger.warning(
                "%s has %d gene rows; %s with %d genes implies %d. Check that the gene list "
                "belongs to this checkpoint.",
                ckpt_file.name,
                config.gene_rows,
                genes_file.name,
                len(genes),
                _gene_rows(len(genes)),
            )
        arch = {f.name: getattr(config, f.name) for f in fields(CellFMConfig)}
        arch.update({k: v for k, v in kwargs.items() if k == "enc_dropout"})
        options = {k: v for k, v in kwargs.items() if k != "enc_dropout"}
        model = cls(adata, genes=genes, **arch, **options)
        target = model.module.state_dict()
        optional = [k for k in target if k.startswith(_OPTIONAL_PARAMETERS) and k not in state]
        if optional:
            logger.warning(
                "%s has no %s; they keep their random initialisation (needed only for "
                "training / value recovery).",
                ckpt_file.name,
                ", ".join(optional),
            )
        load_state_dict_strict(model.module, state, what=str(ckpt_file), allow_missing=optional)
        return model

    # ------------------------------------------------------------------ hooks
    def _vocab_names(self) -> Sequence[str]:
        return self._genes

    def _length_columns(self) -> np.ndarray:
        # Cells with similar numbers of expressed kept genes share a minibatch (less padding).
        return self.module.kept_var_index.cpu().numpy()

    def _encode_minibatch(
        self, tensors: dict[str, torch.Tensor], use_st: bool, seed: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        module = self.module
        counts = tensors[REGISTRY_KEYS.X_KEY].to(module.device)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=counts.device).manual_seed(int(seed))
        tokens = module.tokenize(counts, generator)
        st_feat = None
        if use_st:
            if not module.st_tokens:
                raise InvalidInputError(
                    "This CellFM checkpoint has no read-depth (ST) tokens; use use_st=False."
                )
            st_feat = module.st_features(tokens.totals, tokens.totals)
        hidden, _ = module.encode(tokens.gene_ids, tokens.values, tokens.token_mask, None, st_feat)
        return hidden, hidden.shape[1] - tokens.gene_ids.shape[1], tokens

    def _latent_minibatch(
        self, tensors: dict[str, torch.Tensor], use_st: bool = False, seed: int | None = None
    ) -> torch.Tensor:
        hidden, _, _ = self._encode_minibatch(tensors, use_st, seed)
        return hidden[:, 0]

    def _gene_embedding_minibatch(
        self, tensors: dict[str, torch.Tensor], use_st: bool = False, seed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, n_prefix, tokens = self._encode_minibatch(tensors, use_st, seed)
        real = tokens.token_mask.bool()
        return tokens.gene_ids[real] - 1, hidden[:, n_prefix:][real]

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        *,
        use_st: bool = False,
        seed: int | None = 0,
        progress_bar: bool = True,
    ) -> np.ndarray:
        """Cell embeddings: the last layer's CLS output.

        Parameters
        ----------
        adata
            AnnData set up like the model's; ``None`` uses the model's AnnData.
        indices
            Cells to embed; ``None`` embeds all.
        batch_size
            Cells per minibatch (default 16).
        use_st
            ``False`` (default): the reference's zero-shot ``Backbone`` path ``[CLS, genes]``
            used by its tutorials. ``True``: the fine-tuning model's path with the two
            read-depth tokens ``[CLS, S, T, genes]``, ``S = T`` = the cell's total counts
            over the vocabulary genes.
        seed
            Seed of the random gene subsampling of cells with more than ``max_tokens``
            expressed genes (``None``: not seeded). Cells below the limit are unaffected.
        progress_bar
            Show a progress bar.

        Returns
        -------
        ``(n_cells, enc_dims)`` float32 array, rows in the order of ``indices``.
        """
        return super().get_latent_representation(
            adata, indices, batch_size, progress_bar=progress_bar, use_st=use_st, seed=seed
        )

    @torch.inference_mode()
    def get_gene_embeddings(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        *,
        contextual: bool = True,
        use_st: bool = False,
        seed: int | None = 0,
        progress_bar: bool = True,
    ) -> pd.DataFrame:
        """Gene embeddings, indexed by gene symbol.

        Parameters
        ----------
        adata, indices, batch_size, use_st, seed, progress_bar
            As in :meth:`get_latent_representation`.
        contextual
            ``True``: last-layer outputs at each expressed gene's token, averaged over the
            cells where it is expressed. ``False``: the static ``gene_emb`` rows of the
            genes of the vocabulary (the input of the reference's gene-function recipe);
            ``adata`` and the cell arguments are then ignored.

        Returns
        -------
        DataFrame ``genes x enc_dims`` sorted by gene.
        """
        if not contextual:
            table = self.module.gene_emb.detach().float().cpu().numpy()
            frame = pd.DataFrame(
                table[1 : len(self._genes) + 1], index=pd.Index(self._genes, name="gene_id")
            )
            return frame.sort_index()
        return super().get_gene_embeddings(
            adata, indices, batch_size, progress_bar=progress_bar, use_st=use_st, seed=seed
        )

    @torch.inference_mode()
    def reconstruct(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        mask_ratio: float = 0.5,
        mask_seed: int | None = None,
        batch_size: int | None = None,
        *,
        use_st: bool | None = None,
    ) -> dict[str, np.ndarray]:
        """Masked value recovery: mask a fraction of each cell's genes and predict them.

        This is the pretraining task (the reference ``FinetuneModel``); use it to check a
        checkpoint or a trained model. ``int(mask_ratio * n)`` genes per cell are scored;
        the first 80 % of them get the mask embedding, the others keep their value.

        Parameters
        ----------
        adata
            AnnData set up like the model's; ``None`` uses the model's AnnData.
        indices
            Cells; ``None``: all.
        mask_ratio
            Fraction of genes scored.
        mask_seed
            ``None``: a random mask. An integer ``s``: cell ``i`` (its position in
            ``adata``) draws ``numpy.random.RandomState(s + i).permutation(n)``, the
            reference's own masking, so its outputs can be reproduced exactly.
        batch_size
            Cells per minibatch.
        use_st
            Use the read-depth tokens (``S = T``, no thinning); ``None``: when the
            checkpoint has them.

        Returns
        -------
        Dict of arrays, rows in the order of ``indices``, token axis padded with zeros to
        the longest cell: ``gene_ids``, ``n_tokens``, ``input_unmask``, ``mask_gene``
        (1 = scored), ``target`` (log1p values), ``st_feat``, ``gw_pred`` (gene-wise
        prediction), ``cw_pred`` (cell-wise prediction), ``cls`` and the scalar masked-MSE
        losses ``loss_gw`` and ``loss_cw``.
        """
        if not 0.0 <= mask_ratio < 1.0:
            raise InvalidInputError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
        adata = self._validate_anndata(adata)
        cells, inverse = self._resolve_indices(adata, indices)
        module = self.module
        module.eval()
        use_st = module.st_tokens if use_st is None else use_st
        parts: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
        for positions, tensors in self._iterate(
            adata, cells, batch_size, "cellfm reconstruction", progress_bar=False
        ):
            counts = tensors[REGISTRY_KEYS.X_KEY].to(module.device)
            tokens = module.tokenize(counts)
            length = tokens.gene_ids.shape[1]
            if mask_seed is None:
                from scfm.data._cellfm_tokenize import cellfm_mask_tokens

                unmask, scored = cellfm_mask_tokens(tokens.n_tokens, length, mask_ratio)
            else:
                seeds = int(mask_seed) + cells[positions]
                um, sc = cellfm_reference_mask(
                    tokens.n_tokens.cpu().numpy(), length, mask_ratio, seeds
                )
                unmask, scored = torch.from_numpy(um), torch.from_numpy(sc)
            unmask, scored = unmask.to(counts.device), scored.to(counts.device)
            st_feat = module.st_features(tokens.totals, tokens.totals) if use_st else None
            token_mask = tokens.token_mask
            hidden, gene_emb = module.encode(
                tokens.gene_ids, tokens.values, token_mask, unmask, st_feat
            )
            n_prefix = hidden.shape[1] - length
            out = module.generative(hidden[:, 0], hidden[:, n_prefix:], gene_emb)
            batch = {
                "gene_ids": tokens.gene_ids,
                "input_unmask": unmask,
                "input_value": tokens.values * unmask,
                "mask_gene": scored,
                "target": tokens.values,
                "gw_pred": out["gw_pred"] * token_mask,
                "cw_pred": out["cw_pred"] * token_mask,
            }
            arrays = {k: v.detach().float().cpu().numpy() for k, v in batch.items()}
            arrays["gene_ids"] = tokens.gene_ids.cpu().numpy().astype(np.int32)
            arrays["n_tokens"] = tokens.n_tokens.cpu().numpy().astype(np.int32)
            arrays["cls"] = hidden[:, 0].float().cpu().numpy()
            if st_feat is not None:
                arrays["st_feat"] = st_feat.float().cpu().numpy()
            parts.append((positions, arrays))
        width = max(p[1]["gene_ids"].shape[1] for p in parts)
        result: dict[str, np.ndarray] = {}
        for key in parts[0][1]:
            sample = parts[0][1][key]
            shape = (len(cells), width) if key in _TOKEN_KEYS else (len(cells), *sample.shape[1:])
            full = np.zeros(shape, dtype=sample.dtype)
            for positions, arrays in parts:
                value = arrays[key]
                if key in _TOKEN_KEYS:
                    full[positions, : value.shape[1]] = value
                else:
                    full[positions] = value
            result[key] = full[inverse]
        scored_total = max(float(result["mask_gene"].sum()), 1.0)
        for name, pred in (("loss_gw", "gw_pred"), ("loss_cw", "cw_pred")):
            err = (result[pred] - result["target"]) ** 2 * result["mask_gene"]
            result[name] = np.float32(err.sum() / scored_total)
        return result

    # ------------------------------------------------------------------ training
    def train(self, max_epochs: int | None = None, batch_size: int = 32, **kwargs: Any):
        """Pretrain / continue training with masked value recovery (the reference objective).

        Per cell, ``int(mask_ratio * n)`` expressed genes are scored; 80 % of them are
        replaced by the mask embedding. The loss is the masked MSE of the gene-wise
        (``value_dec``) plus the cell-wise (``cellwise_dec``) predictions of the log1p values.
        With read-depth tokens the ``[CLS, S, T, genes]`` path is trained.

        Parameters
        ----------
        max_epochs
            Epochs (scvi-tools' default heuristic when ``None``).
        batch_size
            Cells per minibatch.
        **kwargs
            Passed to :meth:`scvi.model.base.UnsupervisedTrainingMixin.train`
            (``accelerator``, ``devices``, ``precision="bf16-mixed"``, ``plan_kwargs``,
            ``datamodule``, ...).
        """
        # The base runs this in training mode and records the history.
        return super().train(max_epochs=max_epochs, batch_size=batch_size, **kwargs)

    # ------------------------------------------------------------------ fine-tuning
    def finetune_annotation(
        self,
        lora_rank: int = 8,
        max_epochs: int = 10,
        lr: float = 1e-3,
        batch_size: int = 32,
        mask_ratio: float = 0.0,
        **train_kwargs: Any,
    ) -> int:
        """Fine-tune for cell-type annotation: LoRA adapters + a classification head.

        The labels are the ``labels_key`` given to :meth:`setup_anndata`. An MLP head on the
        CLS embedding (``d -> 128 -> n_labels``) and rank-``lora_rank`` adapters on every
        retention and GLU projection are added; only they are trained (the reference trains
        only ``lora`` parameters and its head).

        Parameters
        ----------
        lora_rank
            Rank of the adapters (``0``: train the head only).
        max_epochs
            Training epochs.
        lr
            Adam learning rate.
        batch_size
            Cells per minibatch.
        mask_ratio
            If > 0, the masked value recovery loss is added to the cross-entropy (as
            CellFM-torch does with 0.5); 0 trains on unmasked cells.
        **train_kwargs
            Passed to :meth:`train` (e.g. ``accelerator``, ``precision="bf16-mixed"``).

        Returns
        -------
        The number of trainable parameters.
        """
        registry = self.adata_manager.get_state_registry(REGISTRY_KEYS.LABELS_KEY)
        if self.setup_args.get("labels_key") is None:
            raise NotSetupError(
                "finetune_annotation needs cell labels: call "
                "CellFM.setup_anndata(adata, labels_key='<obs column>') and build the model "
                "again (or from_pretrained) on that AnnData."
            )
        labels = [str(c) for c in registry.categorical_mapping]
        module = self.module
        if module.n_labels == 0:
            module.add_annotation_head(len(labels))
        if lora_rank > 0 and not module.encoder[0].attn.lora:
            module.add_lora(lora_rank)
        module.mask_ratio = mask_ratio
        n_trainable = module.freeze_for_finetuning()
        params = self.init_params_["non_kwargs"]
        params.update(
            n_labels=len(labels),
            labels=labels,
            mask_ratio=mask_ratio,
            lora=module.encoder[0].attn.lora,
        )
        self.labels = labels
        logger.info("CellFM annotation fine-tuning: %s trainable parameters.", f"{n_trainable:,}")
        plan_kwargs = dict(train_kwargs.pop("plan_kwargs", None) or {})
        plan_kwargs.setdefault("lr", lr)
        self.train(
            max_epochs=max_epochs, batch_size=batch_size, plan_kwargs=plan_kwargs, **train_kwargs
        )
        module.eval()
        self._refresh_summary()
        return n_trainable

    def merge_lora(self) -> None:
        """Fold the LoRA adapters into the base weights (same outputs, plain architecture)."""
        self.module.merge_lora()
        self.init_params_["non_kwargs"]["lora"] = 0
        self._refresh_summary()

    @torch.inference_mode()
    def predict(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        key_added: str = "cellfm_prediction",
    ) -> pd.DataFrame:
        """Predict cell types with the fine-tuned head and write them to ``adata.obs``.

        Parameters
        ----------
        adata
            AnnData set up like the model's; ``None`` uses the model's AnnData.
        indices
            Cells to predict; ``None``: all (only then are ``.obs`` columns written).
        batch_size
            Cells per minibatch.
        key_added
            Writes ``adata.obs[key_added]`` (predicted label) and
            ``adata.obs[key_added + "_probability"]`` (its softmax probability).

        Returns
        -------
        DataFrame ``cells x labels`` of class probabilities.
        """
        if self.module.n_labels == 0 or not self.labels:
            raise NotSetupError("No annotation head: call finetune_annotation(...) first.")
        adata = self._validate_anndata(adata)
        cells, inverse = self._resolve_indices(adata, indices)
        self.module.eval()
        probs = np.zeros((len(cells), self.module.n_labels), dtype=np.float32)
        for positions, tensors in self._iterate(
            adata, cells, batch_size, "cellfm prediction", progress_bar=False
        ):
            cls = self._latent_minibatch(tensors)
            probs[positions] = torch.softmax(self.module.classifier(cls), -1).float().cpu().numpy()
        probs = probs[inverse]
        names = cells[inverse]
        frame = pd.DataFrame(probs, index=adata.obs_names[names], columns=self.labels)
        if indices is None:
            best = probs.argmax(1)
            adata.obs[key_added] = pd.Categorical(
                np.asarray(self.labels, dtype=object)[best], categories=self.labels
            )
            adata.obs[f"{key_added}_probability"] = probs.max(1)
            record_in_uns(adata, "obs", key_added, self._provenance({}))
        return frame


#: Keys of :meth:`CellFM.reconstruct` with a token axis.
_TOKEN_KEYS = {
    "gene_ids",
    "input_unmask",
    "input_value",
    "mask_gene",
    "target",
    "gw_pred",
    "cw_pred",
}
