"""One data loader per call: cells grouped by a sampler, genes mapped into the model's space.

Every path that runs a model over cells (embedding, gene embeddings, prediction, decoding,
training) reads its minibatches through :func:`make_loader`:

* a :class:`GroupSampler` yields the minibatches a model asks for (length buckets, CellPLM
  sentences) as positions into the call's cells;
* :class:`CellDataset` reads those rows once (in memory, sparse or backed), checks their
  values, maps the AnnData's columns into the model's gene space (:class:`GeneSpace`) and adds
  the call's per-cell plan arrays (``tensors[key] = plan[key][positions]``) and
  ``tensors["cell_index"]``, the positions themselves.

Per-cell side information therefore rides in the minibatch (as in scvi-tools' DestVI), never
in instance state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["CELL_INDEX_KEY", "CellDataset", "GeneSpace", "GroupSampler", "make_loader"]

#: Minibatch key of each cell's position in the call's cells.
CELL_INDEX_KEY = "cell_index"


@dataclass(frozen=True)
class GeneSpace:
    """How the columns of one AnnData feed a model's gene space.

    Attributes
    ----------
    selection
        ``(n_vars, n_genes)`` sparse 0/1 matrix: ``x @ selection`` puts each AnnData gene in its
        model column; several AnnData genes on one model gene are summed (the references
        collapse duplicated ids that way).
    """

    selection: sp.csr_matrix

    @classmethod
    def from_pairs(
        cls, var_index: np.ndarray, vocab_index: np.ndarray, n_vars: int, n_genes: int
    ) -> GeneSpace:
        """The map in which AnnData column ``var_index[k]`` feeds gene ``vocab_index[k]``."""
        var_index = np.asarray(var_index, dtype=np.int64)
        vocab_index = np.asarray(vocab_index, dtype=np.int64)
        ones = np.ones(len(var_index), dtype=np.float32)
        selection = sp.csr_matrix((ones, (var_index, vocab_index)), shape=(n_vars, n_genes))
        selection.sum_duplicates()
        return cls(selection)

    @property
    def n_genes(self) -> int:
        """Width of the model's gene space."""
        return int(self.selection.shape[1])

    @property
    def var_columns(self) -> np.ndarray:
        """AnnData columns that feed at least one model gene."""
        return np.unique(self.selection.nonzero()[0])

    def map(self, rows: np.ndarray | sp.spmatrix) -> np.ndarray:
        """``(n_cells, n_genes)`` float32 counts in the model's gene space."""
        if sp.issparse(rows):
            return np.asarray((sp.csr_matrix(rows, dtype=np.float32) @ self.selection).todense())
        return np.asarray(np.asarray(rows, dtype=np.float32) @ self.selection, dtype=np.float32)


class GroupSampler(Sampler[np.ndarray]):
    """Yield minibatches (positions into the call's cells), optionally regrouped per epoch.

    Parameters
    ----------
    groups
        One array of positions per minibatch.
    shuffle
        Visit the minibatches in a new random order each epoch (training), drawn from torch's
        default generator, which Lightning's seeding controls.
    regroup
        Called at the start of each epoch after the first to form new minibatches (training:
        new batch-mates every epoch, as HF's ``group_by_length`` does).
    """

    def __init__(
        self,
        groups: Sequence[np.ndarray],
        shuffle: bool = False,
        regroup: Callable[[], Sequence[np.ndarray]] | None = None,
    ) -> None:
        self.groups = [np.asarray(g, dtype=np.int64) for g in groups]
        self.shuffle = shuffle
        self.regroup = regroup
        self._epochs = 0

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[np.ndarray]:
        if self.regroup is not None and self._epochs > 0:
            self.groups = [np.asarray(g, dtype=np.int64) for g in self.regroup()]
        self._epochs += 1
        order = torch.randperm(len(self.groups)).tolist() if self.shuffle else range(len(self))
        for i in order:
            yield self.groups[i]


class CellDataset(Dataset):
    """Minibatches of one call: registered fields, model-space counts and per-cell plans.

    Parameters
    ----------
    adata_manager
        The AnnData's scvi-tools manager (fields registered by ``setup_anndata``).
    cells
        Row positions in the AnnData of the call's cells; minibatches index into this.
    gene_space
        Map of the AnnData's genes into the model's gene space.
    plan
        Per-cell arrays of the call (row ``i`` belongs to ``cells[i]``).
    check
        Called with ``(raw rows, row positions in the AnnData)`` before the rows are used;
        raises on values the model cannot take (NaN, negative, non-integer counts).
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        cells: np.ndarray,
        gene_space: GeneSpace,
        plan: Mapping[str, np.ndarray] | None = None,
        check: Callable[[np.ndarray | sp.spmatrix, np.ndarray], None] | None = None,
    ) -> None:
        self.cells = np.asarray(cells, dtype=np.int64)
        self.gene_space = gene_space
        self.plan = dict(plan or {})
        self.check = check
        self.x = adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        others = [k for k in adata_manager.data_registry if k != REGISTRY_KEYS.X_KEY]
        self.fields = (
            adata_manager.create_torch_dataset(data_and_attributes=others) if others else None
        )
        for key, values in self.plan.items():
            if len(values) != len(self.cells):
                raise ValueError(f"plan[{key!r}] has {len(values)} rows for {len(cells)} cells")

    def __len__(self) -> int:
        return len(self.cells)

    def __getitem__(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        positions = np.asarray(positions, dtype=np.int64)
        rows = self.cells[positions]
        # Sorted reads are required by backed (h5py) matrices; put rows back afterwards.
        order = np.argsort(rows, kind="stable")
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        raw = self.x[rows[order]]
        if self.check is not None:
            self.check(raw, rows[order])
        x = self.gene_space.map(raw)[inverse]
        out: dict[str, torch.Tensor] = {REGISTRY_KEYS.X_KEY: torch.from_numpy(x)}
        if self.fields is not None:
            for key, value in self.fields[rows[order].tolist()].items():
                out[key] = torch.as_tensor(np.asarray(value)[inverse])
        for key, values in self.plan.items():
            rows = values[positions]  # index first: a plan may be large (cells x genes)
            out[key] = torch.as_tensor(rows.toarray() if sp.issparse(rows) else np.asarray(rows))
        out[CELL_INDEX_KEY] = torch.from_numpy(positions)
        return out


def make_loader(
    dataset: CellDataset,
    groups: Sequence[np.ndarray],
    *,
    shuffle: bool = False,
    regroup: Callable[[], Sequence[np.ndarray]] | None = None,
) -> DataLoader:
    """The one :class:`~torch.utils.data.DataLoader` of a call (its sampler yields minibatches)."""
    return DataLoader(
        dataset,
        sampler=GroupSampler(groups, shuffle=shuffle, regroup=regroup),
        batch_size=None,
        collate_fn=_as_is,
    )


def _as_is(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The dataset already returns a whole minibatch."""
    return batch
