"""One data loader per call: cells grouped by a sampler, genes mapped into the model's space.

Every path that runs a model over cells (embedding, gene embeddings, prediction, decoding,
training) reads its minibatches through :func:`make_loader`:

* a :class:`GroupSampler` yields the minibatches a model asks for (length buckets, CellPLM
  sentences) as positions into the call's cells;
* :class:`CellDataset` reads those rows once (in memory, sparse or backed), checks their
  values, maps the AnnData's columns into the model's gene space (:class:`GeneSpace`) and adds
  the call's per-cell plan arrays (``tensors[key] = plan[key][positions]``; a
  :class:`TableRows` plan rides as its small table plus each cell's row number) and
  ``tensors["cell_index"]``, the positions themselves.

A model whose tokeniser reads only the expressed genes may ask for a *compact* minibatch
(``CellDataset(..., compact=True)``): ``tensors["X"]`` then holds only the genes with counts
in the minibatch, whose gene-space columns ``tensors["gene_columns"]`` lists, instead of all
``n_genes`` columns.

Per-cell side information therefore rides in the minibatch (as in scvi-tools' DestVI), never
in instance state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.sparse as sp
import torch
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "CELL_INDEX_KEY",
    "GENE_COLUMNS_KEY",
    "TABLE_ROW_SUFFIX",
    "CellDataset",
    "GeneSpace",
    "GroupSampler",
    "TableRows",
    "make_loader",
]

#: Minibatch key of each cell's position in the call's cells.
CELL_INDEX_KEY = "cell_index"
#: Minibatch key of a compact minibatch's gene-space columns (``X[:, j]`` is gene
#: ``gene_columns[j]``; see :meth:`GeneSpace.map_compact` for their order).
GENE_COLUMNS_KEY = "gene_columns"
#: Suffix of the minibatch key holding each cell's row of a :class:`TableRows` plan.
TABLE_ROW_SUFFIX = "_row"


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

    def map_compact(self, rows: np.ndarray | sp.spmatrix) -> tuple[np.ndarray, np.ndarray]:
        """The counts of :meth:`map`, restricted to the columns stored in ``rows``.

        Returns
        -------
        ``(n_cells, k)`` float32 counts and the ``(k,)`` int64 gene-space column of each:
        every gene with a stored entry (a column may hold only zeros when ``rows`` stores
        zeros), in the order of the AnnData columns that feed them (ascending gene order
        when several AnnData columns feed one gene). ``out[:, j]`` equals
        ``map(rows)[:, columns[j]]``; no ``(n_cells, n_genes)`` matrix is built.
        """
        x = sp.csr_matrix(rows)
        relabel = self._relabel
        if relabel is None:  # several AnnData genes on one model gene: sum them
            x = sp.csr_matrix(sp.csr_matrix(x, dtype=np.float32) @ self.selection)
            relabel = np.arange(self.n_genes)
        # one AnnData column per model gene: the product only renames columns; the renaming
        # is worked out per AnnData column, then applied to the entries in one gather
        stored = np.zeros(x.shape[1], dtype=bool)
        stored[x.indices] = True
        stored &= relabel >= 0
        position = np.full(x.shape[1], -1, dtype=x.indices.dtype)
        position[stored] = np.arange(int(stored.sum()))
        local, data, indptr = position[x.indices], x.data, x.indptr
        keep = local >= 0
        if not keep.all():  # drop the AnnData columns the model lacks
            indptr = np.concatenate([[0], np.cumsum(keep)])[indptr]
            local, data = local[keep], data[keep]
        data = data.astype(np.float32, copy=False)
        columns = relabel[stored].astype(np.int64)
        out = sp.csr_matrix((data, local, indptr), shape=(x.shape[0], len(columns))).toarray()
        return out, columns

    @cached_property
    def _relabel(self) -> np.ndarray | None:
        """Model gene of each AnnData column (-1: none) when the map is one-to-one, else None."""
        sel = self.selection.tocsr()
        if (np.diff(sel.indptr) > 1).any() or (
            np.bincount(sel.indices, minlength=sel.shape[1]) > 1
        ).any():
            return None
        relabel = np.full(sel.shape[0], -1, dtype=np.int64)
        relabel[np.flatnonzero(np.diff(sel.indptr))] = sel.indices
        return relabel


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


class TableRows:
    """A per-cell plan array whose row ``i`` is ``table[index[i]]`` (a small table).

    For per-cell arrays that repeat a few rows (CellPLM's gene ranks: one row of
    ``n_genes`` per dataset): indexing stays lazy (training reorders plans every epoch), and
    a minibatch carries the table once under the plan's key plus each cell's row number under
    ``key + TABLE_ROW_SUFFIX``, never a ``(cells, n_genes)`` array.

    Parameters
    ----------
    table
        ``(n_rows, ...)`` array.
    index
        ``(n_cells,)`` row of ``table`` of each cell.
    """

    def __init__(self, table: np.ndarray, index: np.ndarray) -> None:
        self.table = np.ascontiguousarray(table)
        self.index = np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the per-cell array this stands for."""
        return (len(self.index), *self.table.shape[1:])

    def __getitem__(self, positions: np.ndarray | slice) -> TableRows:
        return TableRows(self.table, self.index[positions])

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        out = self.table[self.index]
        return out if dtype is None else out.astype(dtype)


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
    compact
        Carry only the gene-space columns expressed in each minibatch
        (:meth:`GeneSpace.map_compact`, columns under :data:`GENE_COLUMNS_KEY`) instead of
        the dense ``(cells, n_genes)`` matrix; for modules that read only expressed genes.
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        cells: np.ndarray,
        gene_space: GeneSpace,
        plan: Mapping[str, np.ndarray] | None = None,
        check: Callable[[np.ndarray | sp.spmatrix, np.ndarray], None] | None = None,
        compact: bool = False,
    ) -> None:
        self.cells = np.asarray(cells, dtype=np.int64)
        self.compact = compact
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
        in_order = bool((order == np.arange(len(order))).all())  # usual: no reordering copy
        raw = self.x[rows[order]]
        if self.check is not None:
            self.check(raw, rows[order])
        out: dict[str, torch.Tensor] = {}
        if self.compact:
            x, columns = self.gene_space.map_compact(raw)
            out[GENE_COLUMNS_KEY] = torch.from_numpy(columns)
        else:
            x = self.gene_space.map(raw)
        out[REGISTRY_KEYS.X_KEY] = torch.from_numpy(x if in_order else x[inverse])
        if self.fields is not None:
            for key, value in self.fields[rows[order].tolist()].items():
                out[key] = torch.as_tensor(np.asarray(value)[inverse])
        for key, values in self.plan.items():
            if isinstance(values, TableRows):
                out[key] = torch.from_numpy(values.table)
                out[key + TABLE_ROW_SUFFIX] = torch.from_numpy(values.index[positions])
                continue
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
