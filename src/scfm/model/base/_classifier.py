"""Cell classification for every model: ``finetune`` (Lightning) and ``predict``.

Each module builds its own head (``module.add_classifier(n_labels)``, pooled as the
reference's fine-tuning does) and fills ``ModuleOutput.logits``; everything else is here.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scvi import settings

from scfm.data._validation import check_key_added
from scfm.errors import AnnDataKeyError, InvalidInputError

logger = logging.getLogger(__name__)

__all__ = ["ClassifierMixin"]

#: Minibatch key of the label codes during fine-tuning.
_LABEL_KEY = "finetune_label"


class ClassifierMixin:
    """``finetune`` / ``predict`` on top of a module's classification head."""

    #: Class names of the classification head (``None``: no head).
    classifier_labels: list[str] | None = None
    #: LoRA adapters injected by :meth:`finetune` (rank, alpha, target names), if any.
    lora_config: dict[str, Any] | None = None

    def finetune(
        self,
        labels_key: str,
        *,
        max_epochs: int = 10,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        batch_size: int | None = None,
        freeze_encoder: bool = False,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        train_size: float = 0.9,
        validation_size: float | None = None,
        early_stopping: bool = True,
        early_stopping_patience: int = 3,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        plan_kwargs: dict | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        """Fine-tune a cell classification head (and the encoder) on labelled cells.

        A new head is built by the module as the reference's fine-tuning builds it; training
        runs through scvi-tools' ``TrainRunner`` (Lightning), with a validation split, early
        stopping on ``validation_loss`` and the metrics in :attr:`history`. Cells whose label
        is missing are left out. Afterwards :meth:`predict` gives labels for any AnnData.

        Parameters
        ----------
        labels_key
            ``adata.obs`` column of the model's AnnData with the cell labels.
        max_epochs
            Passes over the training cells.
        lr
            Learning rate (Adam).
        weight_decay
            Weight decay.
        batch_size
            Cells per minibatch; default the model's inference default.
        freeze_encoder
            Train only the head (and LoRA adapters if any); the encoder keeps its weights.
        lora_rank
            Train low-rank adapters (peft LoRA) on the module's attention projections instead
            of the encoder weights; implies a frozen encoder.
        lora_alpha
            LoRA scaling; default ``lora_rank``.
        train_size, validation_size
            Split of the labelled cells (scvi-tools' meaning).
        early_stopping
            Stop when ``validation_loss`` stops improving.
        early_stopping_patience
            Epochs without improvement before stopping.
        accelerator, devices
            Lightning device arguments.
        plan_kwargs
            Passed to :class:`~scfm.model.base.ClassifierTrainingPlan`.
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (``strategy``, ``precision``, ...).
        """
        from scfm.model.base._training import CellDataSplitter, ClassifierTrainingPlan

        adata = self.adata
        if labels_key not in adata.obs.columns:
            raise AnnDataKeyError(
                f"labels_key={labels_key!r} is not a column of the model's adata.obs (columns: "
                f"{', '.join(map(str, adata.obs.columns[:20]))}). Pass the column with labels."
            )
        labels = adata.obs[labels_key]
        known = labels.notna().to_numpy()
        categories = (
            list(labels.cat.categories)
            if isinstance(labels.dtype, pd.CategoricalDtype)
            else sorted(labels[known].astype(str).unique())
        )
        categories = [str(c) for c in categories if (labels[known].astype(str) == str(c)).any()]
        if len(categories) < 2:
            raise InvalidInputError(
                f"adata.obs[{labels_key!r}] has {len(categories)} distinct labels; a classifier "
                "needs at least two."
            )
        if lora_rank is not None and (not isinstance(lora_rank, int) or lora_rank < 1):
            raise InvalidInputError(f"lora_rank must be a positive integer, got {lora_rank!r}.")
        codes = pd.Categorical(labels.astype(str).where(known), categories=categories).codes

        labelled = np.flatnonzero(known)
        rng = np.random.default_rng(settings.seed)
        labelled = rng.permutation(labelled)
        n_train = max(1, round(train_size * len(labelled)))
        n_val = (
            len(labelled) - n_train
            if validation_size is None
            else round(validation_size * len(labelled))
        )
        split = [
            labelled[:n_train],
            labelled[n_train : n_train + n_val],
            labelled[n_train + n_val :],
        ]

        self.module.add_classifier(len(categories))
        self.classifier_labels = categories
        if lora_rank is not None:
            self._add_lora(lora_rank, lora_alpha or float(lora_rank))
        if freeze_encoder or lora_rank is not None:
            self._freeze_encoder()

        splitter = CellDataSplitter(
            self.adata_manager,
            model=self,
            task="predict",
            cell_arrays={_LABEL_KEY: codes.astype(np.int64)},
            external_indexing=split,
            batch_size=batch_size or self._default_batch_size,
        )
        plan = ClassifierTrainingPlan(
            self.module,
            inference_kwargs=self._inference_kwargs("predict"),
            label_key=_LABEL_KEY,
            lr=lr,
            weight_decay=weight_decay,
            **(plan_kwargs or {}),
        )
        early_stopping = early_stopping and len(split[1]) > 0
        runner = self._train_runner_cls(
            self,
            training_plan=plan,
            data_splitter=splitter,
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            early_stopping=early_stopping,
            early_stopping_monitor="validation_loss",
            early_stopping_mode="min",
            early_stopping_patience=early_stopping_patience,
            check_val_every_n_epoch=1 if len(split[1]) else None,
            **trainer_kwargs,
        )
        with self._training_mode():
            runner()
        for p in self.module.parameters():
            p.requires_grad_(True)
        self._refresh_summary()

    def _freeze_encoder(self) -> None:
        """Only the head (and LoRA adapters) train.

        The head is ``module.classifier``, plus any parameters under the module class's
        ``_head_prefixes`` (e.g. Geneformer's ``bert.pooler``, named by its release format).
        """
        prefixes = tuple(getattr(type(self.module), "_head_prefixes", ("classifier",)))
        for name, p in self.module.named_parameters():
            p.requires_grad_(name.startswith(prefixes) or "lora_" in name)

    def _add_lora(self, rank: int, alpha: float) -> None:
        """Inject peft LoRA adapters into the module's declared attention projections."""
        from peft import LoraConfig, inject_adapter_in_model

        patterns: Sequence[str] = getattr(type(self.module), "_lora_target_modules", ())
        names = [
            name
            for name, m in self.module.named_modules()
            if isinstance(m, torch.nn.Linear) and any(fnmatch.fnmatch(name, p) for p in patterns)
        ]
        if not names:
            raise InvalidInputError(
                f"{type(self).__name__} declares no LoRA target modules; fine-tune without "
                "lora_rank (optionally with freeze_encoder=True)."
            )
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, lora_dropout=0.0)
        inject_adapter_in_model(config, self.module)
        self.module.to(self.module.device)
        self.lora_config = {"rank": rank, "alpha": alpha, "targets": names}

    @torch.inference_mode()
    def predict(
        self,
        adata: ad.AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        soft: bool = False,
        key_added: str | None = None,
        *,
        progress_bar: bool = True,
    ) -> np.ndarray | pd.DataFrame:
        """Cell labels (or class probabilities) from the classification head.

        Parameters
        ----------
        adata
            AnnData registered with ``setup_anndata`` (any gene set); ``None`` uses the
            model's own.
        indices
            Cells to predict; ``None`` predicts all. Results come back in this order.
        batch_size
            Cells per minibatch.
        soft
            Return class probabilities (DataFrame cells x classes) instead of labels.
        key_added
            If given, also write the predicted labels to ``adata.obs[key_added]``
            (categorical; cells outside ``indices`` get NaN). Nothing is written otherwise.
        progress_bar
            Show a progress bar.

        Returns
        -------
        Array of labels, or a DataFrame of probabilities indexed by ``obs_names``.

        Raises
        ------
        InvalidInputError
            If the model has no classification head (call :meth:`finetune` first, or load a
            fine-tuned release).
        """
        if not self.classifier_labels or getattr(self.module, "classifier", None) is None:
            raise InvalidInputError(
                f"The {type(self).__name__} model has no cell classification head: call "
                "model.finetune(labels_key=...) first, or load a fine-tuned release."
            )
        if key_added is not None:
            check_key_added(key_added, where="adata.obs")
        call = self._prepare(adata, indices, batch_size, "predict", {})
        logits = self._gather(call, "logits", f"{self._model_name} predict", progress_bar)
        probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
        classes = np.asarray(self.classifier_labels, dtype=object)
        labels = classes[probs.argmax(axis=1)]
        target = call.adata
        if key_added is not None:
            rows = call.cells[call.inverse]
            column = pd.Series(pd.NA, index=target.obs_names, dtype=object)
            column.iloc[rows] = labels
            target.obs[key_added] = pd.Categorical(column, categories=list(classes))
        if soft:
            obs = target.obs_names[call.cells][call.inverse]
            return pd.DataFrame(probs, index=obs, columns=pd.Index(classes, name="label"))
        return labels
