"""Training glue: the data splitter, training plans and runner every scfm model trains through.

Training reads minibatches from the same loader as inference (:mod:`scfm.data._loader`):
genes mapped into the model's space, per-cell plans, the model's own grouping of cells (length
buckets, CellPLM sentences). Lightning runs the loop (scvi-tools' ``TrainRunner``); nothing
here re-implements an optimiser loop or seeds a global RNG.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scvi.dataloaders import DataSplitter
from scvi.train import TrainingPlan, TrainRunner

from scfm.data._loader import CellDataset, make_loader

if TYPE_CHECKING:
    from scfm.model.base._foundation import FoundationModelMixin

__all__ = ["CellDataSplitter", "ClassifierTrainingPlan", "PretrainingPlan", "ScfmTrainRunner"]


class CellDataSplitter(DataSplitter):
    """scvi-tools' train / validation split, with scfm's loader for each part.

    Parameters
    ----------
    adata_manager
        The model's AnnData manager.
    model
        The scfm model: it maps genes, plans cells and groups them into minibatches.
    task
        The model's task for :meth:`_inference_kwargs` / :meth:`_cell_plan` (``"train"``
        for pretraining, ``"predict"`` for fine-tuning).
    cell_arrays
        Extra per-cell arrays over the whole AnnData (e.g. fine-tuning label codes); each
        minibatch carries its cells' rows under the same key.
    plan_options
        Options of the model's ``_cell_plan`` for the training cells (e.g. CellPLM
        ``measured_genes``).
    **kwargs
        Passed to :class:`scvi.dataloaders.DataSplitter` (``train_size``, ``batch_size``, ...).
    """

    def __init__(
        self,
        adata_manager,
        *,
        model: FoundationModelMixin,
        task: str = "train",
        cell_arrays: Mapping[str, np.ndarray] | None = None,
        plan_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # scvi-tools' distributed sampler does not fit fixed minibatch groups; Lightning's
        # strategies shard our loader instead (use_distributed_sampler).
        kwargs.pop("distributed_sampler", None)
        kwargs.pop("load_sparse_tensor", None)
        super().__init__(adata_manager, **kwargs)
        self.model = model
        self.task = task
        self.cell_arrays = dict(cell_arrays or {})
        self.plan_options = dict(plan_options or {})
        self.batch_size = int(self.data_loader_kwargs.get("batch_size") or 128)

    def _loader(self, idx: np.ndarray, shuffle: bool):
        if len(idx) == 0:
            return None
        model = self.model
        adata = self.adata_manager.adata
        cells = np.sort(np.asarray(idx, dtype=np.int64))
        _, space = model._gene_space(adata)
        plan = dict(model._cell_plan(adata, cells, self.task, **self.plan_options) or {})
        plan.update({k: v[cells] for k, v in self.cell_arrays.items()})
        groups = model._minibatch_groups(adata, cells, self.batch_size, plan, space)
        dataset = CellDataset(
            self.adata_manager, cells, space, plan, check=model._value_check(adata)
        )

        def regroup() -> list[np.ndarray]:
            # The model's grouping (length buckets, sentences) over the cells in a new random
            # order: new batch-mates every epoch, still grouped the model's way.
            perm = torch.randperm(len(cells)).numpy()
            shuffled = {k: v[perm] for k, v in plan.items()}
            new = model._minibatch_groups(adata, cells[perm], self.batch_size, shuffled, space)
            return [perm[g] for g in new]

        return make_loader(dataset, groups, shuffle=shuffle, regroup=regroup if shuffle else None)

    def train_dataloader(self):
        """Shuffled minibatches of the training cells."""
        return self._loader(self.train_idx, shuffle=True)

    def val_dataloader(self):
        """Minibatches of the validation cells (none when there are none)."""
        return self._loader(self.val_idx, shuffle=False)

    def test_dataloader(self):
        """Minibatches of the held-out test cells (none when there are none)."""
        return self._loader(self.test_idx, shuffle=False)


class PretrainingPlan(TrainingPlan):
    """scvi-tools' training plan, asking the module to corrupt its input (``mask=True``).

    Parameters
    ----------
    module
        The scfm module.
    inference_kwargs
        Extra ``module.inference`` arguments (from the model's ``_inference_kwargs("train")``).
    **kwargs
        Passed to :class:`scvi.train.TrainingPlan` (``lr``, ``weight_decay``, ...).
    """

    def __init__(self, module, *, inference_kwargs: dict | None = None, **kwargs: Any) -> None:
        super().__init__(module, **kwargs)
        self.inference_kwargs = {**(inference_kwargs or {}), "mask": True}

    def forward(self, *args: Any, **kwargs: Any):
        """Module forward with the plan's inference arguments."""
        kwargs.setdefault("inference_kwargs", self.inference_kwargs)
        return super().forward(*args, **kwargs)


class ClassifierTrainingPlan(TrainingPlan):
    """Cross-entropy on the cell classification head (``ModuleOutput.logits``).

    A module may define ``classification_loss(output, labels)`` when its reference trains the
    head with another loss; it is used instead.

    Logs ``train_loss``, ``validation_loss`` and ``validation_accuracy`` per epoch (history
    and early stopping read them).

    Parameters
    ----------
    module
        The scfm module with a classification head.
    inference_kwargs
        ``module.inference`` arguments (from the model's ``_inference_kwargs("predict")``).
    label_key
        Minibatch key of the label codes.
    **kwargs
        Passed to :class:`scvi.train.TrainingPlan` (``lr``, ``weight_decay``, ``optimizer``).
    """

    def __init__(
        self,
        module,
        *,
        inference_kwargs: dict | None = None,
        label_key: str = "finetune_label",
        **kwargs: Any,
    ) -> None:
        # The references fine-tune with HF Trainer's AdamW (eps 1e-8); scvi-tools' default
        # eps of 0.01 trains a classification head far more slowly.
        kwargs.setdefault("optimizer", "AdamW")
        kwargs.setdefault("eps", 1e-8)
        super().__init__(module, **kwargs)
        self.inference_kwargs = dict(inference_kwargs or {})
        self.label_key = label_key

    def _step(self, batch: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
        inputs = self.module._get_inference_input(batch)
        out = self.module.inference(**inputs, **self.inference_kwargs)
        logits = out.logits
        labels = batch[self.label_key].long().reshape(-1)
        # A module whose reference trains its head with another loss (CellFM) says so.
        loss_fn = getattr(self.module, "classification_loss", None)
        loss = (
            loss_fn(out, labels) if loss_fn is not None else F.cross_entropy(logits.float(), labels)
        )
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        n = len(labels)
        self.log(f"{prefix}_loss", loss, on_step=False, on_epoch=True, batch_size=n, prog_bar=True)
        self.log(f"{prefix}_accuracy", accuracy, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Cross-entropy of one training minibatch."""
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Loss and accuracy of one validation minibatch."""
        self._step(batch, "validation")

    def on_train_epoch_end(self) -> None:
        """Nothing to aggregate: metrics are logged per step with ``on_epoch=True``."""

    def on_validation_epoch_end(self) -> None:
        """Nothing to aggregate: metrics are logged per step with ``on_epoch=True``."""


class ScfmTrainRunner(TrainRunner):
    """scvi-tools' runner, keeping every run's metrics in ``model.history``.

    scvi-tools extends the history of a trained model only with the metrics its first run
    logged, so fine-tuning after pretraining would lose its accuracy; it has no public hook
    for this, hence the override of ``_update_history``.
    """

    def _update_history(self) -> None:
        if not self.trainer.is_global_zero:
            super()._update_history()
            return
        previous = self.model.history_ if isinstance(self.model.history_, dict) else {}
        new = getattr(self.trainer.logger, "history", None) or {}
        merged = dict(previous)
        for key, frame in new.items():
            if key in merged and len(merged[key]):
                frame = frame.copy()
                frame.index = np.arange(len(merged[key]), len(merged[key]) + len(frame))
                frame.index.name = merged[key].index.name
                merged[key] = pd.concat([merged[key], frame])
            else:
                merged[key] = frame
        self.model.history_ = merged
