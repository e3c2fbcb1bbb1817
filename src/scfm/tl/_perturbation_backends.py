"""How :func:`scfm.tl.in_silico_perturbation` reaches each model.

Two ways, one per kind of input encoding:

- :class:`RankEncoder` (Geneformer, scCello): the cell is a rank-value token sequence and a
  perturbation edits that sequence (delete a token, move it to the front), exactly as the
  reference ``InSilicoPerturber`` does :cite:p:`Theodoris2023`. The perturbed copies of one cell
  all have the same length, so they are stacked without padding.
- :class:`CountEncoder` (scFoundation, CellFM, CellPLM, or any model): the cell is a count vector;
  deleting a gene sets its count to zero and overexpressing sets it to a high value, then the
  model's own tokenisation runs through the public
  :meth:`~scfm.model.base.FoundationModelMixin.get_latent_representation` on an AnnData of
  edited copies.

Everything model specific is read by the small ``_*_adapter`` functions at the bottom of this
file, so a change of a model's internals is a change in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from scfm.errors import InvalidInputError

__all__ = ["CountEncoder", "RankEncoder", "Unit", "make_encoder"]


@dataclass
class Unit:
    """The perturbed copies of one cell that go through the model together.

    Attributes
    ----------
    label
        ``(U,)`` code of the perturbed gene of each copy (index into the run's gene names).
    perturbed
        ``(U, m)`` token ids of the copies (rank encoders) or a ``(U, n_vars)`` CSR matrix of
        their counts (count encoders).
    orig_pos
        ``(U, m)`` position in the original sequence of each token of a copy, ``-1`` for an
        inserted (overexpressed) token. Rank encoders only.
    edited
        ``adata.var`` positions edited in each copy. Count encoders only.
    """

    label: np.ndarray
    perturbed: np.ndarray
    orig_pos: np.ndarray | None = None
    edited: list[list[int]] | None = None


@dataclass
class CellResult:
    """Values of the copies of one cell (arrays aligned with :attr:`Unit.label`)."""

    label: np.ndarray
    cos_sim: np.ndarray
    shifts: dict[str, np.ndarray] = field(default_factory=dict)
    gene_label: np.ndarray | None = None
    gene_affected: np.ndarray | None = None
    gene_cos_sim: np.ndarray | None = None


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a, b, dim=-1)


# ---------------------------------------------------------------------------------- rank models
@dataclass
class RankEncoder:
    """Token-level access to a rank-value model (see the module docstring).

    Attributes
    ----------
    model
        The scfm model.
    hidden
        ``ids [B, L] -> states [B, L, d]`` of the chosen layer, for unpadded sequences.
    cls_id, eos_id
        Ids of the leading / trailing special tokens the tokenizer adds (``None`` if not).
    special
        ``(vocab_size,)`` boolean: tokens that are no gene.
    max_len
        Model input size (special tokens included).
    pooling
        ``"cls"`` (cell vector = first token; cell value = its cosine) or ``"mean"`` (cell
        vector = mean over all tokens of the sequence; cell value = mean of the per-gene
        cosines, the reference's ``emb_mode="cell"``).
    names
        Gene id of every token id.
    tokens
        ``(adata, cells) -> list of token arrays`` (one per cell, specials included).
    device
        Device of the model.
    hidden_padded
        ``(ids [B, L], real [B, L]) -> states [B, L, d]`` of the chosen layer for a padded,
        attention-masked batch (state embeddings, as the reference's ``EmbExtractor``).
    pad_id
        Token id written at padded positions.
    """

    model: Any
    hidden: Callable[[torch.Tensor], torch.Tensor]
    cls_id: int | None
    eos_id: int | None
    special: np.ndarray
    max_len: int
    pooling: str
    names: np.ndarray
    tokens: Callable[[ad.AnnData, np.ndarray], list[np.ndarray]]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    hidden_padded: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    pad_id: int = 0

    # -- genes
    def gene_codes(self, genes: Sequence[str]) -> list[int | None]:
        """Token id of each gene id (``None`` where the model has no token for it)."""
        lookup = {str(g): i for i, g in enumerate(self.names) if not self.special[i]}
        return [lookup.get(str(g)) for g in genes]

    def label_names(self) -> np.ndarray:
        """Names of the label codes (gene id of each token id)."""
        return np.asarray(self.names, dtype=object)

    # -- units
    def _gene_positions(self, t: np.ndarray) -> np.ndarray:
        return np.flatnonzero(~self.special[t])

    def units_all(
        self, t: np.ndarray, perturb_type: str, anchor: int | None
    ) -> tuple[np.ndarray, Unit | None]:
        """Copies of a cell for ``genes="all"`` (optionally with an anchor gene).

        Every gene position is perturbed once (overexpress: every gene but the first, which
        already leads the ranking), together with the anchor where given; returns the
        original sequence and the unit (``None`` if nothing is left to perturb).
        """
        n = len(t)
        gp = self._gene_positions(t)
        a_pos = None
        if anchor is not None:
            a_pos = int(np.flatnonzero(t == anchor)[0])
            gp = gp[gp != a_pos]
        if perturb_type == "overexpress":
            # The reference starts after the first gene position (it already leads the ranking).
            first = self._gene_positions(t)[:1]
            gp = gp[~np.isin(gp, first)]
        if not len(gp):
            return t, None
        removed = (
            gp[:, None]
            if a_pos is None
            else np.sort(np.stack([gp, np.full_like(gp, a_pos)], 1), axis=1)
        )
        k = removed.shape[1]
        base = np.broadcast_to(np.arange(n - k), (len(gp), n - k)).copy()
        for j in range(k):  # removed is sorted per row: shift the kept positions past each
            base += base >= removed[:, j : j + 1]
        if perturb_type == "delete":
            perturbed, orig = t[base], base
        else:
            c = int(self.cls_id is not None)
            perturbed = np.concatenate([t[base[:, :c]], t[removed], t[base[:, c:]]], axis=1)
            orig = np.concatenate([base[:, :c], np.full_like(removed, -1), base[:, c:]], axis=1)
        if perturbed.shape[1] == 0:
            return t, None
        return t, Unit(label=t[gp].astype(np.int64), perturbed=perturbed, orig_pos=orig)

    def unit_set(
        self, t: np.ndarray, perturb_type: str, codes: Sequence[int], label: int
    ) -> tuple[np.ndarray, Unit | None]:
        """One copy of a cell with a gene set deleted or overexpressed together.

        Overexpress: the set is removed where present and inserted, in the given order,
        after ``<cls>``; if that exceeds the input size the tail is truncated and the original
        is truncated alike (keeping ``<eos>``), as in the reference.
        """
        codes = list(codes)
        if perturb_type == "overexpress":
            present = int(np.isin(t, codes).sum())
            overflow = len(t) + len(codes) - present - self.max_len
            if overflow > 0:
                keep = len(t) - overflow
                t = np.concatenate([t[: keep - 1], t[-1:]]) if self.eos_id is not None else t[:keep]
        kept = np.flatnonzero(~np.isin(t, codes))
        if perturb_type == "delete":
            perturbed, orig = t[kept], kept
        else:
            c = int(self.cls_id is not None)
            front = np.asarray(codes, dtype=t.dtype)
            perturbed = np.concatenate([t[kept[:c]], front, t[kept[c:]]])
            orig = np.concatenate([kept[:c], np.full(len(front), -1), kept[c:]])
        if len(perturbed) == 0:
            return t, None
        return t, Unit(
            label=np.array([label], dtype=np.int64), perturbed=perturbed[None], orig_pos=orig[None]
        )

    # -- forward
    def _vectors(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return h[:, 0]
        # Mean over the gene tokens (inserted ones included).
        w = ~torch.as_tensor(self.special, device=ids.device)[ids]
        if bool(w.all()):  # V1: only genes; torch.mean as the reference, for equal float32 bits
            return h.mean(1)
        w = w.to(h.dtype)
        return (h * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)

    @torch.inference_mode()
    def embed_padded(self, seqs: list[np.ndarray]) -> torch.Tensor:
        """Cell vectors ``[n, d]`` of unperturbed cells, as one padded, masked batch.

        The reference's ``EmbExtractor`` arithmetic (its state embeddings): ``<cls>`` vector,
        or the mean over the non-padded positions after ``<cls>`` and before ``<eos>``
        (masked sum divided by the count, its ``mean_nonpadding_embs``).
        """
        lens = torch.as_tensor([len(t) for t in seqs], device=self.device)
        ids = torch.full((len(seqs), int(lens.max())), self.pad_id, dtype=torch.long)
        for i, t in enumerate(seqs):
            ids[i, : len(t)] = torch.as_tensor(t)
        ids = ids.to(self.device)
        real = torch.arange(ids.shape[1], device=self.device)[None] < lens[:, None]
        if self.hidden_padded is None:  # no padded path: each cell alone
            return torch.stack([self.embed(t)[1] for t in seqs])
        h = self.hidden_padded(ids, real)
        if self.pooling == "cls":
            return h[:, 0]
        c, e = int(self.cls_id is not None), int(self.eos_id is not None)
        h, n = h[:, c:], lens - c - e
        keep = torch.arange(h.shape[1], device=self.device)[None] < n[:, None]
        return h.masked_fill(~keep[..., None], 0.0).sum(1) / n[:, None].float()

    @torch.inference_mode()
    def embed(self, t: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """States ``[n, d]`` and cell vector ``[d]`` of one unperturbed sequence."""
        ids = torch.as_tensor(t, dtype=torch.long, device=self.device)[None]
        h = self.hidden(ids)
        return h[0], self._vectors(h, ids)[0]

    @torch.inference_mode()
    def run(
        self,
        original: np.ndarray,
        unit: Unit,
        batch_size: int,
        states: dict[str, torch.Tensor],
        gene_shifts: bool,
    ) -> CellResult:
        """Cosine similarities (and state shifts) of every copy of one cell."""
        special = torch.as_tensor(self.special, device=self.device)
        h_o, v_o = self.embed(original)
        h_on = F.normalize(h_o, dim=-1)
        base_shift = {s: _cos(v_o, e) for s, e in states.items()}
        cos_cell, shifts = [], {s: [] for s in states}
        g_lab, g_aff, g_cos = [], [], []
        for start in range(0, len(unit.label), batch_size):
            sl = slice(start, start + batch_size)
            ids = torch.as_tensor(unit.perturbed[sl], dtype=torch.long, device=self.device)
            orig = torch.as_tensor(unit.orig_pos[sl], dtype=torch.long, device=self.device)
            h = self.hidden(ids)
            gene = (orig >= 0) & ~special[ids]
            gcos = (F.normalize(h, dim=-1) * h_on[orig.clamp(min=0)]).sum(-1)
            if self.pooling == "cls":
                cos_cell.append(_cos(h[:, 0], h_o[0][None]))
            elif bool(gene.all()):  # V1 deletion: every position is a gene (torch.mean as ref.)
                cos_cell.append(gcos.mean(1))
            else:
                w = gene.to(gcos.dtype)
                cos_cell.append((gcos * w).sum(1) / w.sum(1))
            if states:
                v = self._vectors(h, ids)
                for s, e in states.items():
                    shifts[s].append(_cos(v, e[None]) - base_shift[s])
            if gene_shifts:
                b, j = torch.nonzero(gene, as_tuple=True)
                g_lab.append(torch.as_tensor(unit.label[sl], device=self.device)[b])
                g_aff.append(ids[b, j])
                g_cos.append(gcos[b, j])
        out = CellResult(
            label=unit.label,
            cos_sim=torch.cat(cos_cell).float().cpu().numpy(),
            shifts={s: torch.cat(v).float().cpu().numpy() for s, v in shifts.items()},
        )
        if gene_shifts:
            out.gene_label = torch.cat(g_lab).cpu().numpy()
            out.gene_affected = torch.cat(g_aff).cpu().numpy()
            out.gene_cos_sim = torch.cat(g_cos).float().cpu().numpy()
        return out


# --------------------------------------------------------------------------------- count models
@dataclass
class CountEncoder:
    """Count-level access: edited AnnData copies through ``get_latent_representation``.

    Attributes
    ----------
    model
        The scfm model.
    adata
        The AnnData being screened (set up for the model).
    visible
        ``(n_vars,)`` boolean: genes of ``adata`` the model reads.
    options
        Keyword arguments for ``get_latent_representation`` (``hidden_layer``, ``pooling`` ...).
    overexpress_value
        ``"max"``: an overexpressed gene gets the cell's highest count among the genes the model
        reads; a number ``q`` in (0, 1]: the ``q``-quantile of that gene's nonzero counts in
        ``adata``; a number > 1: that count.
    layer
        The AnnData layer the model reads (``None`` = ``X``).
    """

    model: Any
    adata: ad.AnnData
    visible: np.ndarray
    options: dict[str, Any]
    overexpress_value: str | float = "max"
    layer: str | None = None
    _quantiles: dict[int, float] = field(default_factory=dict)

    def gene_codes(self, genes: Sequence[str]) -> list[int | None]:
        """Position in ``adata.var`` of each gene id (``None`` if absent)."""
        lookup = {str(g): i for i, g in enumerate(self.adata.var_names)}
        return [lookup.get(str(g)) for g in genes]

    def label_names(self) -> np.ndarray:
        """Names of the label codes (``adata.var_names``)."""
        return np.asarray(self.adata.var_names, dtype=object)

    def _matrix(self) -> Any:
        return self.adata.layers[self.layer] if self.layer else self.adata.X

    def counts(self, cell: int) -> np.ndarray:
        """The counts of one cell in ``adata.var`` order (dense float64)."""
        row = self._matrix()[cell]
        row = row.toarray() if sp.issparse(row) else np.asarray(row)
        return np.asarray(row, dtype=np.float64).reshape(-1)

    def _high(self, x: np.ndarray, gene: int) -> float:
        value = self.overexpress_value
        if value == "max":
            return float(x[self.visible].max(initial=0.0))
        value = float(value)
        if value > 1:
            return value
        if gene not in self._quantiles:
            col = self._matrix()[:, gene]
            col = col.toarray() if sp.issparse(col) else np.asarray(col)
            nz = np.asarray(col, dtype=np.float64).reshape(-1)
            nz = nz[nz > 0]
            self._quantiles[gene] = float(np.quantile(nz, value)) if len(nz) else 0.0
        return self._quantiles[gene]

    def _copies(self, x: np.ndarray, edits: list[list[int]], perturb_type: str) -> sp.csr_matrix:
        """Sparse copies of ``x``, copy ``u`` with the genes ``edits[u]`` perturbed."""
        n_vars, n = len(x), len(edits)
        nz = np.flatnonzero(x)
        rows = np.repeat(np.arange(n), len(nz))
        cols = np.tile(nz, n)
        data = np.tile(x[nz], n)
        e_rows = np.repeat(np.arange(n), [len(e) for e in edits])
        e_cols = np.asarray([g for e in edits for g in e], dtype=np.int64)
        e_vals = np.zeros(len(e_cols))
        if perturb_type == "overexpress":
            e_vals = np.array([self._high(x, g) for g in e_cols], dtype=np.float64)
        drop = np.isin(rows * n_vars + cols, e_rows * n_vars + e_cols)
        rows = np.concatenate([rows[~drop], e_rows[e_vals > 0]])
        cols = np.concatenate([cols[~drop], e_cols[e_vals > 0]])
        data = np.concatenate([data[~drop], e_vals[e_vals > 0]])
        return sp.csr_matrix((data.astype(np.float32), (rows, cols)), shape=(n, n_vars))

    def units_all(
        self, x: np.ndarray, perturb_type: str, anchor: int | None
    ) -> tuple[np.ndarray, Unit | None]:
        """One copy per expressed gene the model reads (with the anchor where given)."""
        expressed = np.flatnonzero((x > 0) & self.visible)
        genes = expressed if anchor is None else expressed[expressed != anchor]
        if perturb_type == "overexpress" and len(expressed):
            # As the rank models: the gene leading the cell is already "overexpressed".
            genes = genes[genes != expressed[np.argmax(x[expressed])]]
        if not len(genes):
            return x, None
        edits = [[int(g)] if anchor is None else [int(g), int(anchor)] for g in genes]
        copies = self._copies(x, edits, perturb_type)
        return x, Unit(label=genes.astype(np.int64), perturbed=copies, edited=edits)

    def unit_set(
        self, x: np.ndarray, perturb_type: str, codes: Sequence[int], label: int
    ) -> tuple[np.ndarray, Unit | None]:
        """One copy with the gene set deleted (count 0) or overexpressed."""
        edits = [[int(c) for c in codes]]
        copies = self._copies(x, edits, perturb_type)
        return x, Unit(label=np.array([label], dtype=np.int64), perturbed=copies, edited=edits)

    def embed_cells(self, cells: np.ndarray, batch_size: int) -> np.ndarray:
        """Embeddings of unperturbed cells of ``adata``."""
        return _latent(self.model, self.adata, batch_size, self.options, indices=cells)

    def gene_states(
        self, adata: ad.AnnData, cells: np.ndarray | None, batch_size: int
    ) -> list[tuple[np.ndarray, torch.Tensor]]:
        """Per cell: ``adata.var`` positions of its tokens' genes and their unit states."""
        return _token_states(self.model, adata, cells, batch_size)

    @torch.inference_mode()
    def run_many(
        self,
        cells: np.ndarray,
        units: list[Unit | None],
        batch_size: int,
        states: dict[str, torch.Tensor],
        originals: np.ndarray,
        gene_shifts: bool = False,
    ) -> list[CellResult | None]:
        """Cosine similarities (and state shifts) of the copies of several cells.

        The copies of all ``cells`` go through one ``get_latent_representation`` call on an
        AnnData whose rows repeat each cell's ``obs`` / ``obsm`` with the edited counts. With
        ``gene_shifts``, the token states of the model's gene path (``module.inference`` of the
        ``"genes"`` task) of each copy are compared, gene by gene, with the original cell's.
        """
        have = [i for i, u in enumerate(units) if u is not None]
        if not have:
            return [None] * len(units)
        sizes = [units[i].perturbed.shape[0] for i in have]
        sub = self.adata[np.repeat(cells[have], sizes)].copy()
        sub.obs_names = [f"perturbed-{i}" for i in range(sub.n_obs)]
        x = sp.vstack([units[i].perturbed for i in have]).tocsr()
        if self.layer:
            sub.layers[self.layer] = x
        else:
            sub.X = x
        z = torch.as_tensor(_latent(self.model, sub, batch_size, self.options))
        out: list[CellResult | None] = [None] * len(units)
        if gene_shifts:
            before = self.gene_states(self.adata, cells[have], batch_size)
            after = self.gene_states(sub, None, batch_size)
            offsets = np.cumsum([0, *sizes])
        for k, (i, zi) in enumerate(zip(have, torch.split(z, sizes))):
            z0 = torch.as_tensor(originals[i])[None].to(zi.dtype)
            shifts = {}
            for s, e in states.items():
                e = e.to(zi.dtype)[None]
                shifts[s] = (_cos(zi, e) - _cos(z0, e)).float().numpy()
            out[i] = CellResult(
                label=units[i].label, cos_sim=_cos(zi, z0).float().numpy(), shifts=shifts
            )
            if gene_shifts:
                copies = after[offsets[k] : offsets[k + 1]]
                _gene_cosines(out[i], before[k], copies, units[i].edited)
        return out


def _gene_cosines(
    result: CellResult,
    before: tuple[np.ndarray, torch.Tensor],
    copies: list[tuple[np.ndarray, torch.Tensor]],
    edited: list[list[int]],
) -> None:
    """Fill ``result``'s per-gene values: each gene present before and after, not edited."""
    g0, h0 = before
    labels, affected, cos = [], [], []
    for label, (g1, h1), genes in zip(result.label, copies, edited):
        common, i0, i1 = np.intersect1d(g0, g1, assume_unique=False, return_indices=True)
        keep = ~np.isin(common, genes)
        value = (h0[i0[keep]] * h1[i1[keep]]).sum(-1).numpy()
        labels.append(np.full(len(value), label, dtype=np.int64))
        affected.append(common[keep].astype(np.int64))
        cos.append(value.astype(np.float32))
    result.gene_label = np.concatenate(labels)
    result.gene_affected = np.concatenate(affected)
    result.gene_cos_sim = np.concatenate(cos)


# ------------------------------------------------------------------------------------ adapters
def _token_states(
    model: Any, adata: ad.AnnData, cells: np.ndarray | None, batch_size: int
) -> list[tuple[np.ndarray, torch.Tensor]]:
    """Unit-norm token states of the model's gene path, per cell, keyed by ``adata.var`` row.

    Uses the contract's one forward (``module.inference`` with the ``"genes"`` task's
    defaults, through the base's call preparation), as ``get_gene_embeddings`` does, but keeps
    each cell's own states. A gene the model reads from several columns is keyed by the first.
    """
    call = model._prepare(adata, cells, batch_size, "genes", {})
    vocab_to_var = np.full(int(call.alignment.n_vocab), -1, dtype=np.int64)
    for var, vocab in zip(call.alignment.var_index[::-1], call.alignment.vocab_index[::-1]):
        vocab_to_var[vocab] = var
    out: list[Any] = [None] * len(call.cells)
    for positions, res, _ in model._run(call, "gene states", progress_bar=False):
        if res.token_states is None or res.token_genes is None:
            raise InvalidInputError(f"{type(model).__name__} computes no per-gene token states.")
        for p, genes, states in zip(positions, res.token_genes.cpu(), res.token_states.cpu()):
            keep = genes >= 0
            var = vocab_to_var[genes[keep].numpy()]
            ok = var >= 0
            var, first = np.unique(var[ok], return_index=True)
            h = F.normalize(states[keep][torch.as_tensor(np.flatnonzero(ok))].float(), dim=-1)
            out[p] = (var, h[torch.as_tensor(first)])
    return [out[i] for i in call.inverse]


def _latent(
    model: Any,
    adata: ad.AnnData,
    batch_size: int,
    options: dict[str, Any],
    indices: np.ndarray | None = None,
) -> np.ndarray:
    """The public embedding call every count-level screen goes through."""
    return np.asarray(
        model.get_latent_representation(
            adata, indices=indices, batch_size=batch_size, progress_bar=False, **options
        )
    )


def _model_name(model: Any) -> str:
    return str(getattr(model, "_model_name", type(model).__name__)).lower()


def _vocabulary_names(model: Any) -> np.ndarray:
    """Gene id of every token id: ``model.vocabulary`` is in token-id order for rank models."""
    return np.asarray(pd.Index(model.vocabulary).astype(str), dtype=object)


def _token_lists(model: Any, adata: ad.AnnData, cells: np.ndarray) -> list[np.ndarray]:
    """Each cell's token ids as the model's tokenizer writes them (specials included)."""
    ids, lengths = model.get_tokens(adata, indices=cells)
    return [np.asarray(r[:n], dtype=np.int64) for r, n in zip(ids, lengths)]


def _bert_hidden(module: Any, layer_index: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``ids -> states`` of ``(embedding output, layer 1, ...)[layer_index]`` of ``module.bert``."""

    def hidden(ids: torch.Tensor) -> torch.Tensor:
        x = module.bert.embeddings(ids)
        if layer_index == 0:
            return x
        return module.bert(ids, inputs_embeds=x, num_layers=layer_index).last_hidden_state

    return hidden


def _bert_hidden_padded(
    module: Any, layer_index: int
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(ids, real) -> states`` of that layer for a padded batch, through the masked encoder.

    The padded encoder (not the packed inference path) so that each cell's float32 arithmetic
    is the reference's padded, attention-masked batch.
    """

    def hidden(ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        x = module.bert.embeddings(ids)
        if layer_index == 0:
            return x
        return module.bert.encoder(x, real[:, None, None, :], num_layers=layer_index)[0]

    return hidden


def _resolve_layer(n_layers: int, hidden_layer: int) -> int:
    n = n_layers + 1
    if not -n <= int(hidden_layer) < n:
        raise InvalidInputError(
            f"hidden_layer={hidden_layer} is out of range for a {n_layers}-layer model; use -1 "
            f"(last layer), -2 (second to last), ... or 0..{n - 1} (0 = embedding output)."
        )
    return int(hidden_layer) % n


def _geneformer_defaults(model: Any) -> tuple[str, int]:
    """The model's default (pooling, hidden_layer), as its embedding path resolves them."""
    kw = model._inference_kwargs("latent")
    return str(kw["pooling"]), int(kw["hidden_layer"])


def _geneformer_adapter(model: Any, hidden_layer: int | None, pooling: str | None) -> RankEncoder:
    module = model.module
    default_pooling, default_layer = _geneformer_defaults(model)
    pooling = pooling or default_pooling
    if pooling == "mean_drop_last":  # BioNeMo: no trailing token to drop once specials are out
        pooling = "mean"
    if pooling not in ("cls", "mean"):
        raise InvalidInputError(f"pooling={pooling!r} is not supported; use 'cls' or 'mean'.")
    cls_id = getattr(module, "cls_token_id", None)
    if pooling == "cls" and cls_id is None:
        raise InvalidInputError("pooling='cls' needs a model whose tokens start with <cls>.")
    layer = default_layer if hidden_layer is None else hidden_layer
    idx = _resolve_layer(module.bert.num_layers, layer)
    device = next(module.parameters()).device
    return RankEncoder(
        model=model,
        hidden=_bert_hidden(module, idx),
        hidden_padded=_bert_hidden_padded(module, idx),
        pad_id=int(getattr(module.config, "pad_token_id", 0) or 0),
        cls_id=cls_id,
        eos_id=getattr(module, "eos_token_id", None),
        special=module.special_tokens.cpu().numpy().astype(bool),
        max_len=int(getattr(module, "input_size", module.config.max_position_embeddings)),
        pooling=pooling,
        names=_vocabulary_names(model),
        tokens=lambda adata, cells: _token_lists(model, adata, cells),
        device=device,
    )


def _sccello_adapter(model: Any, hidden_layer: int | None, pooling: str | None) -> RankEncoder:
    module = model.module
    pooling = pooling or "cls"
    if pooling not in ("cls", "mean"):
        raise InvalidInputError(f"pooling={pooling!r} is not supported; use 'cls' or 'mean'.")
    layer = -1 if hidden_layer is None else hidden_layer
    idx = _resolve_layer(module.bert.num_layers, layer)
    device = next(module.parameters()).device
    return RankEncoder(
        model=model,
        hidden=_bert_hidden(module, idx),
        hidden_padded=_bert_hidden_padded(module, idx),
        pad_id=int(getattr(module.config, "pad_token_id", 0) or 0),
        cls_id=int(module.cls_token_id),
        eos_id=None,
        special=module.special_tokens.cpu().numpy().astype(bool),
        max_len=int(module.config.max_position_embeddings),
        pooling=pooling,
        names=_vocabulary_names(model),
        tokens=lambda adata, cells: _token_lists(model, adata, cells),
        device=device,
    )


def _visible_genes(model: Any, adata: ad.AnnData) -> np.ndarray:
    """Which genes of ``adata`` the model reads (the contract's ``model._align_genes``)."""
    mask = np.zeros(adata.n_vars, dtype=bool)
    mask[np.asarray(model._align_genes(adata).var_index, dtype=np.int64)] = True
    return mask


def _registered_layer(model: Any, adata: ad.AnnData) -> str | None:
    """The AnnData layer ``adata`` was set up with (``None`` = ``X``)."""
    manager = model.get_anndata_manager(adata, required=True)
    return manager.registry.get("setup_args", {}).get("layer")


_RANK_ADAPTERS = {"geneformer": _geneformer_adapter, "sccello": _sccello_adapter}
#: Embedding options a count-level screen needs per model. CellPLM cells attend to the other
#: cells of their sentence: each cell and each perturbed copy is its own sentence, so a copy
#: never sees its siblings and the original is embedded the same way.
_COUNT_DEFAULTS: dict[str, dict[str, Any]] = {"cellplm": {"chunk_size": 1}}
#: Count-level models whose gene path cannot embed one copy at a time, and why.
_NO_GENE_SHIFTS = {
    "cellplm": "its gene path embeds the cells of a sentence together, so perturbed copies "
    "would see each other",
}


def make_encoder(
    model: Any,
    adata: ad.AnnData,
    *,
    hidden_layer: int | None,
    pooling: str | None,
    overexpress_value: str | float,
    gene_shifts: bool,
    options: dict[str, Any],
) -> RankEncoder | CountEncoder:
    """The encoder for ``model``: rank-level for Geneformer / scCello, count-level otherwise."""
    name = _model_name(model)
    if gene_shifts and name in _NO_GENE_SHIFTS:
        raise InvalidInputError(
            f"gene_shifts=True is not available for {type(model).__name__}: "
            f"{_NO_GENE_SHIFTS[name]}."
        )
    if name in _RANK_ADAPTERS:
        if options:
            raise InvalidInputError(
                f"Unknown options for a {type(model).__name__} screen: {sorted(options)}."
            )
        return _RANK_ADAPTERS[name](model, hidden_layer, pooling)
    opts = {**_COUNT_DEFAULTS.get(name, {}), **options}
    if hidden_layer is not None:
        opts["hidden_layer"] = hidden_layer
    if pooling is not None:
        opts["pooling"] = pooling
    if not (overexpress_value == "max" or float(overexpress_value) > 0):
        raise InvalidInputError(
            f"overexpress_value={overexpress_value!r}: use 'max', a quantile in (0, 1] or a "
            "count > 1."
        )
    return CountEncoder(
        model=model,
        adata=adata,
        visible=_visible_genes(model, adata),
        options=opts,
        overexpress_value=overexpress_value,
        layer=_registered_layer(model, adata),
    )
