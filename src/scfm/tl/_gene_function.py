"""Gene function prediction from foundation-model gene embeddings (CellFM's recipe).

CellFM :cite:p:`Zeng2025` predicts gene properties (e.g. dosage sensitivity, bivalent
chromatin, GO terms) with a small MLP trained on the frozen static gene embeddings
(``gene_emb`` rows) of the 800M model: a SiLU MLP with a softmax / NLL loss for single-label
tasks, and a LayerNorm MLP with a sigmoid / BCE loss for multi-label ones.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from scfm.errors import InvalidInputError
from scfm.model.base import record_in_uns

logger = logging.getLogger(__name__)

__all__ = ["GeneFunctionResult", "gene_function"]


@dataclass
class GeneFunctionResult:
    """Outcome of :func:`gene_function`.

    Attributes
    ----------
    metrics
        Held-out metrics: ``accuracy``, ``balanced_accuracy``, ``macro_f1`` and, for binary
        tasks, ``auroc`` (multi-label: ``micro_f1``, ``macro_auroc``); plus ``chance``
        (accuracy of always predicting the most frequent training class).
    predictions
        Predicted label (or label set) of every gene with an embedding, and whether the
        gene was in the training split.
    probabilities
        ``genes x classes`` predicted probabilities.
    classifier
        The trained MLP.
    """

    metrics: dict[str, float]
    predictions: pd.DataFrame
    probabilities: pd.DataFrame
    classifier: nn.Module = field(repr=False)


class _SeededDropout(nn.Module):
    """Dropout drawing its masks from an explicit generator (no global RNG involved)."""

    def __init__(self, p: float, generator: torch.Generator) -> None:
        super().__init__()
        self.p = p
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape, generator=self.generator, device=x.device) >= self.p
        return x * keep / (1 - self.p)


def _mlp(
    d_in: int,
    hidden: int,
    n_out: int,
    dropout: float,
    multilabel: bool,
    generator: torch.Generator,
) -> nn.Module:
    drop = _SeededDropout(dropout, generator)
    if multilabel:  # the reference's GO-term head
        net = nn.Sequential(
            nn.Linear(d_in, hidden), nn.LayerNorm(hidden), nn.SiLU(), drop, nn.Linear(hidden, n_out)
        )
    else:
        net = nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), drop, nn.Linear(hidden, n_out))
    for layer in net:
        if isinstance(layer, nn.Linear):  # torch's default Linear init, drawn from `generator`
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
            bound = 1 / math.sqrt(layer.in_features)
            nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return net


class _GeneClassifier(LightningModule):
    """Full-batch AdamW training of the gene MLP (one step per epoch), run by Lightning."""

    def __init__(self, net: nn.Module, loss_fn: nn.Module, lr: float, weight_decay: float):
        super().__init__()
        self.net, self.loss_fn = net, loss_fn
        self.lr, self.weight_decay = lr, weight_decay

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss_fn(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def _fit(module: _GeneClassifier, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x), shuffle=False)
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)


def _split(labels: np.ndarray, test_size: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean test mask, stratified by label (single-label) so each class is in both parts."""
    test = np.zeros(len(labels), dtype=bool)
    for value in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == value))
        n_test = round(test_size * len(idx))
        if len(idx) > 1:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test[idx[:n_test]] = True
    return test


def gene_function(
    model,
    labels: pd.Series | pd.DataFrame,
    adata: ad.AnnData | None = None,
    *,
    embeddings: pd.DataFrame | None = None,
    test_size: float = 0.2,
    hidden: int = 256,
    dropout: float = 0.1,
    epochs: int = 300,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    key_added: str | None = "gene_function",
) -> GeneFunctionResult:
    """Train a classifier of gene labels on the model's gene embeddings.

    Parameters
    ----------
    model
        A model with ``get_gene_embeddings`` (for CellFM the static ``gene_emb`` rows are
        used, as in the reference: ``get_gene_embeddings(contextual=False)``).
    labels
        Single-label task: a Series indexed by gene id (binary or multiclass values; NaN =
        unlabelled). Multi-label task: a DataFrame ``genes x terms`` of 0/1.
    adata
        If given with ``key_added``, predictions are written to
        ``adata.var[key_added]`` (single-label) for the genes it shares with the embeddings,
        and metrics to ``adata.uns["scfm"]["gene_function"][key_added]``.
    embeddings
        ``genes x dims`` embeddings to use instead of the model's.
    test_size
        Held-out fraction (stratified by class for single-label tasks).
    hidden, dropout
        MLP width and dropout.
    epochs, lr, weight_decay
        Full-batch AdamW training (one step per epoch, run by a Lightning ``Trainer``).
    seed
        Seed of the split, the initialisation and the dropout masks (explicit generators;
        torch's global RNG is neither used nor reseeded).
    key_added
        Key for the outputs in ``adata`` (``None``: write nothing).

    Returns
    -------
    A :class:`GeneFunctionResult` with held-out metrics.

    Raises
    ------
    InvalidInputError
        If fewer than two classes or too few labelled genes have embeddings.
    """
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    if embeddings is None:
        try:  # CellFM: the static gene table, as the reference recipe
            embeddings = model.get_gene_embeddings(contextual=False)
        except InvalidInputError:  # models without that option: their gene embeddings
            embeddings = model.get_gene_embeddings()
    multilabel = isinstance(labels, pd.DataFrame)
    labelled = labels.dropna() if not multilabel else labels.dropna(how="any")
    genes = embeddings.index.intersection(labelled.index.astype(str))
    if len(genes) < 4:
        raise InvalidInputError(
            f"Only {len(genes)} labelled genes have embeddings (labels are matched on the "
            f"embedding index, e.g. {', '.join(map(str, embeddings.index[:3]))}). Index the "
            "labels by the model's gene ids."
        )
    x = torch.as_tensor(embeddings.loc[genes].to_numpy(np.float32))
    rng = np.random.default_rng(seed)
    if multilabel:
        y_np = labelled.loc[genes].to_numpy(np.float32)
        classes = list(map(str, labelled.columns))
        test = rng.random(len(genes)) < test_size
    else:
        values = labelled.loc[genes].astype(str).to_numpy()
        classes = sorted(set(values))
        if len(classes) < 2:
            raise InvalidInputError("gene_function needs at least two label values.")
        y_np = np.searchsorted(classes, values)
        test = _split(y_np, test_size, rng)
    if test.all() or not test.any():
        raise InvalidInputError("test_size leaves no genes for training or testing.")
    # Standardise with training statistics: embedding tables differ in scale.
    mean, std = x[~test].mean(0), x[~test].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    generator = torch.Generator().manual_seed(seed)
    net = _mlp(x.shape[1], hidden, len(classes), dropout, multilabel, generator)
    y = torch.as_tensor(y_np)
    train_idx = torch.as_tensor(np.flatnonzero(~test))
    if multilabel:
        loss_fn = nn.BCEWithLogitsLoss()
    else:
        counts = np.bincount(y_np[~test], minlength=len(classes)).astype(np.float32)
        weight = torch.as_tensor(counts.sum() / np.maximum(counts, 1) / len(classes))
        loss_fn = nn.CrossEntropyLoss(weight=weight)  # classes are often imbalanced
    _fit(_GeneClassifier(net, loss_fn, lr, weight_decay), x[train_idx], y[train_idx], epochs)
    net.eval()
    with torch.no_grad():
        logits = net(x)
        probs = torch.sigmoid(logits) if multilabel else torch.softmax(logits, -1)
    probs_np = probs.numpy()
    metrics: dict[str, float] = {"n_train": float((~test).sum()), "n_test": float(test.sum())}
    if multilabel:
        pred = (probs_np > 0.5).astype(np.float32)
        metrics["micro_f1"] = float(f1_score(y_np[test], pred[test], average="micro"))
        has_both = [j for j in range(len(classes)) if 0 < y_np[test, j].sum() < test.sum()]
        if has_both:
            metrics["macro_auroc"] = float(
                np.mean([roc_auc_score(y_np[test, j], probs_np[test, j]) for j in has_both])
            )
        predicted = pd.Series([";".join(np.asarray(classes)[p > 0]) for p in pred], index=genes)
    else:
        pred = probs_np.argmax(1)
        metrics["accuracy"] = float((pred[test] == y_np[test]).mean())
        metrics["balanced_accuracy"] = float(balanced_accuracy_score(y_np[test], pred[test]))
        metrics["macro_f1"] = float(f1_score(y_np[test], pred[test], average="macro"))
        majority = np.bincount(y_np[~test]).argmax()
        metrics["chance"] = float((y_np[test] == majority).mean())
        if len(classes) == 2 and len(np.unique(y_np[test])) == 2:
            metrics["auroc"] = float(roc_auc_score(y_np[test], probs_np[test, 1]))
        predicted = pd.Series(np.asarray(classes, dtype=object)[pred], index=genes)
    predictions = pd.DataFrame({"prediction": predicted, "train": ~test}, index=genes)
    probabilities = pd.DataFrame(probs_np, index=genes, columns=classes)
    logger.info("gene_function held-out metrics: %s", metrics)
    if adata is not None and key_added is not None:
        shared = adata.var_names.intersection(genes)
        column = pd.Series("" if multilabel else np.nan, index=adata.var_names, dtype=object)
        column.loc[shared] = predicted.loc[shared].to_numpy()
        # categorical (NaN for genes without embedding) so that the AnnData stays writable
        adata.var[key_added] = (
            column.to_numpy() if multilabel else pd.Categorical(column, categories=classes)
        )
        record_in_uns(adata, "gene_function", key_added, metrics)
    return GeneFunctionResult(metrics, predictions, probabilities, net)
