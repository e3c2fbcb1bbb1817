"""In-silico perturbation with Geneformer (the reference ``InSilicoPerturber``).

A perturbation edits a cell's rank-value encoding (delete a gene, move it to the front, or
shift it by quartiles of the ranking) and measures how far that moves the cell embedding and
the contextual embedding of every other gene: cosine similarity between perturbed and original
embeddings :cite:p:`Theodoris2023`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scvi import REGISTRY_KEYS

from scfm.errors import AnnDataKeyError, GeneVocabularyError, InvalidInputError
from scfm.model.base import record_in_uns

if TYPE_CHECKING:
    from scfm.model import Geneformer

logger = logging.getLogger(__name__)

__all__ = ["in_silico_perturbation", "perturb_tokens"]

PerturbType = Literal["delete", "overexpress", "inhibit", "activate"]
_TYPES = ("delete", "overexpress", "inhibit", "activate")
#: Fraction of a cell's ranking that one ``rank_shift`` step moves a gene (a quartile).
QUARTILE = 0.25


def perturb_tokens(
    genes: list[int],
    targets: set[int],
    perturb_type: PerturbType,
    *,
    max_genes: int,
    rank_shift: int = 1,
) -> list[int] | None:
    """Perturb one cell's gene tokens (special tokens removed); ``None`` if nothing changes.

    Parameters
    ----------
    genes
        The cell's gene token ids in rank order.
    targets
        Token ids to perturb (one gene or a gene set).
    perturb_type
        ``"delete"``: remove the targets. ``"overexpress"``: move them to the front (in the
        given set order, inserting absent ones) and truncate to ``max_genes``.
        ``"inhibit"`` / ``"activate"``: move each expressed target ``rank_shift`` quartiles of
        the cell's ranking down / up. The reference declares inhibit / activate as quartile
        shifts but leaves them "under development"; this follows that description
        (UNVERIFIED against a reference implementation).
    max_genes
        Model input size minus the special tokens.
    rank_shift
        Quartiles to move for inhibit / activate (1-3).

    Returns
    -------
    The perturbed gene tokens, or ``None`` when the cell expresses none of the targets and
    the perturbation would not change it (delete / inhibit / activate).
    """
    present = [g for g in genes if g in targets]
    if perturb_type == "overexpress":
        front = [g for g in targets if g in present] + [g for g in targets if g not in present]
        rest = [g for g in genes if g not in targets]
        return (front + rest)[:max_genes]
    if not present:
        return None
    if perturb_type == "delete":
        return [g for g in genes if g not in targets]
    step = max(1, round(QUARTILE * rank_shift * len(genes)))
    out = list(genes)
    for g in present:
        pos = out.index(g)
        out.pop(pos)
        new = pos + step if perturb_type == "inhibit" else pos - step
        out.insert(min(max(new, 0), len(out)), g)
    return out


def _target_tokens(model: Geneformer, genes: str | Sequence[str]) -> list[int]:
    dicts = model.dictionaries
    names = [genes] if isinstance(genes, str) else list(genes)
    mapping = dicts.ensembl_mapping_dictionary or {}
    tokens: list[int] = []
    missing = []
    for name in names:
        gene = dicts.gene_name_id_dictionary.get(name, name)
        gene = mapping.get(gene.upper(), gene)
        tok = dicts.token_dictionary.get(gene)
        if tok is None or gene.startswith(("<", "[")):
            missing.append(name)
        elif tok not in tokens:
            tokens.append(int(tok))
    if missing:
        raise GeneVocabularyError(
            f"{len(missing)} genes to perturb are not in the Geneformer vocabulary: "
            f"{', '.join(missing[:10])}. Pass Ensembl ids (e.g. ENSG00000141510) or symbols "
            "listed in the model's gene name dictionary."
        )
    if not tokens:
        raise InvalidInputError("genes is empty: pass at least one gene to perturb.")
    return tokens


def _pad(
    rows: list[list[int]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long, device=device)
    ids = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long, device=device)
    return ids, lengths


def _parse_states(adata: ad.AnnData, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``cell_states_to_model`` against ``adata`` (before any forward pass)."""
    unknown = set(spec) - {"state_key", "start_state", "goal_state", "alt_states"}
    missing = {"state_key", "start_state", "goal_state"} - set(spec)
    if unknown or missing:
        raise InvalidInputError(
            "cell_states_to_model needs 'state_key', 'start_state', 'goal_state' and optionally "
            f"'alt_states'; missing {sorted(missing)}, unknown {sorted(unknown)}."
        )
    key = spec["state_key"]
    if key not in adata.obs.columns:
        raise AnnDataKeyError(
            f"state_key={key!r} is not a column of adata.obs; pass the column holding the "
            "cell states."
        )
    alt = spec.get("alt_states") or []
    alt = [alt] if isinstance(alt, str) else list(alt)
    states = [spec["start_state"], spec["goal_state"], *alt]
    if len({str(x) for x in states}) != len(states):
        raise InvalidInputError(
            f"start, goal and alternative states must differ, got {[str(x) for x in states]}."
        )
    present = set(adata.obs[key].astype(str))
    absent = [str(x) for x in states if str(x) not in present]
    if absent:
        raise InvalidInputError(
            f"States {absent} have no cells in adata.obs[{key!r}] (present: "
            f"{', '.join(sorted(present)[:10])})."
        )
    return {
        "state_key": key,
        "start_state": str(spec["start_state"]),
        "goal_state": str(spec["goal_state"]),
        "alt_states": [str(x) for x in alt],
    }


def _start_state_cells(
    adata: ad.AnnData, states: dict[str, Any], indices: Sequence[int] | None
) -> np.ndarray:
    """The start-state cells among ``indices`` (all start-state cells when ``None``)."""
    start = adata.obs[states["state_key"]].astype(str).to_numpy() == states["start_state"]
    cells = np.flatnonzero(start)
    if indices is not None:
        arr = np.asarray(indices)
        cells = np.intersect1d(np.flatnonzero(arr) if arr.dtype == bool else arr, cells)
    if not len(cells):
        raise InvalidInputError(
            f"None of the selected cells is in the start state {states['start_state']!r}."
        )
    return cells


def _state_embeddings(
    model: Geneformer,
    adata: ad.AnnData,
    states: dict[str, Any],
    pooling: str,
    layer: int,
    batch_size: int | None,
) -> dict[str, torch.Tensor]:
    """Exact mean original embedding of the goal and alternative states (goal first)."""
    labels = adata.obs[states["state_key"]].astype(str).to_numpy()
    out = {}
    for name in (states["goal_state"], *states["alt_states"]):
        z = model.get_latent_representation(
            adata,
            indices=np.flatnonzero(labels == name),
            batch_size=batch_size,
            pooling=pooling,
            layer=layer,
            progress_bar=False,
        )
        out[name] = torch.as_tensor(z.astype(np.float64).mean(axis=0))
    return out


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")


@torch.inference_mode()
def in_silico_perturbation(
    model: Geneformer,
    adata: ad.AnnData | None = None,
    genes: str | Sequence[str] = (),
    perturb_type: PerturbType = "delete",
    *,
    indices: Sequence[int] | None = None,
    rank_shift: int = 1,
    pooling: str | None = None,
    layer: int | None = None,
    batch_size: int | None = None,
    cell_states_to_model: Mapping[str, Any] | None = None,
    key_added: str = "geneformer_isp",
    progress_bar: bool = True,
) -> pd.DataFrame:
    """Perturb genes in silico and measure the shift of cell and gene embeddings.

    For every selected cell the gene (or gene set) is perturbed in the rank-value encoding
    (see :func:`perturb_tokens`), the perturbed and original encodings go through the model,
    and the cosine similarity of the cell embeddings (pooling / layer defaults of the model,
    as the reference's ``emb_mode`` "cls" for V2 and "cell" for V1) and of the contextual
    embedding of every other gene present in both (the reference's ``"*_and_gene"`` mode)
    is computed.

    Parameters
    ----------
    model
        A :class:`~scfm.model.Geneformer`.
    adata
        AnnData set up like the model's; ``None`` uses the model's AnnData.
    genes
        Ensembl id(s) or symbol(s) to perturb together.
    perturb_type
        ``"delete"``, ``"overexpress"``, ``"inhibit"`` or ``"activate"``.
    indices
        Cells to perturb; ``None`` = all.
    rank_shift
        Quartiles moved by inhibit / activate (1-3).
    pooling, layer
        Cell embedding options (see :meth:`~scfm.model.Geneformer.get_latent_representation`).
    batch_size
        Cells per minibatch.
    cell_states_to_model
        In silico treatment, as the reference's argument of that name:
        ``{"state_key": obs column, "start_state": ..., "goal_state": ..., "alt_states":
        [...]}`` (``alt_states`` optional). Only start-state cells (of ``indices``) are
        perturbed. Each state's embedding is the exact mean of the original cell embeddings
        of its cells in ``adata``, and each perturbed cell's shift towards a state is
        ``cos(perturbed, state) - cos(original, state)``.
    key_added
        Writes ``adata.obs[key_added]`` (cosine similarity of perturbed vs original cell
        embedding; NaN for cells the perturbation does not change) and
        ``adata.uns[key_added]`` (the returned gene table). With ``cell_states_to_model``
        also ``adata.obs[f"{key_added}_goal_shift"]`` (each cell's shift towards the goal
        state) and ``adata.uns[f"{key_added}_state_shifts"]`` (per goal / alternative state:
        ``role``, ``mean_shift``, ``n_cells``).
    progress_bar
        Show a progress bar.

    Returns
    -------
    DataFrame indexed by gene id: ``mean_cosine`` (mean over cells of the cosine similarity
    between a gene's perturbed- and original-context embeddings), ``shift``
    (``1 - mean_cosine``) and ``n_cells``, sorted by decreasing shift.
    """
    from scfm.model import Geneformer

    if not isinstance(model, Geneformer):
        raise InvalidInputError("in_silico_perturbation needs a scfm.model.Geneformer model.")
    if perturb_type not in _TYPES:
        raise InvalidInputError(f"perturb_type={perturb_type!r} is not one of {_TYPES}.")
    if not 1 <= rank_shift <= 3:
        raise InvalidInputError(f"rank_shift must be 1, 2 or 3 (quartiles), got {rank_shift}.")
    targets = _target_tokens(model, genes)
    target_set = set(targets)
    adata = model._validate_anndata(adata)
    states = None if cell_states_to_model is None else _parse_states(adata, cell_states_to_model)
    if states is not None:
        indices = _start_state_cells(adata, states, indices)
    cells, inverse = model._resolve_indices(adata, indices)
    pooling, layer = model._defaults(pooling, layer)
    state_embs = (
        None
        if states is None
        else _state_embeddings(model, adata, states, pooling, layer, batch_size)
    )
    state_shift = (
        None
        if state_embs is None
        else {name: np.full(len(cells), np.nan, dtype=np.float32) for name in state_embs}
    )
    module = model.module
    module.eval()
    special = module.special_tokens
    cls_id, eos_id = module.cls_token_id, module.eos_token_id
    max_genes = module.input_size - (cls_id is not None) - (eos_id is not None)
    vocab = module.config.vocab_size
    cos_cell = np.full(len(cells), np.nan, dtype=np.float32)
    sums = torch.zeros(vocab, dtype=torch.float64)
    counts = torch.zeros(vocab, dtype=torch.float64)
    for positions, tensors in model._iterate(
        adata, cells, batch_size, f"in silico {perturb_type}", progress_bar
    ):
        x = tensors[REGISTRY_KEYS.X_KEY].to(model.device)
        ids, lengths = module.tokenize(x)
        rows, keep = [], []
        for i, (row, n) in enumerate(zip(ids.tolist(), lengths.tolist())):
            gene_part = [t for t in row[:n] if not bool(special[t])]
            new = perturb_tokens(
                gene_part, target_set, perturb_type, max_genes=max_genes, rank_shift=rank_shift
            )
            if new is None:
                continue
            full = ([cls_id] if cls_id is not None else []) + new
            rows.append(full + ([eos_id] if eos_id is not None else []))
            keep.append(i)
        if not keep:
            continue
        sel = torch.tensor(keep, device=ids.device)
        o_ids, o_len = ids[sel], lengths[sel]
        p_ids, p_len = _pad(rows, module.pad_token_id, ids.device)
        o_hidden, o_real = module.encode(o_ids, o_len, layer)
        p_hidden, p_real = module.encode(p_ids, p_len, layer)
        o_cell = module.pool(o_hidden, o_ids, o_len, pooling, special)
        p_cell = module.pool(p_hidden, p_ids, p_len, pooling, special)
        cos_cell[positions[keep]] = F.cosine_similarity(p_cell, o_cell, dim=-1).cpu().numpy()
        for name, emb in (state_embs or {}).items():
            target = emb.to(device=p_cell.device, dtype=p_cell.dtype)[None]
            shift = F.cosine_similarity(p_cell, target, dim=-1) - F.cosine_similarity(
                o_cell, target, dim=-1
            )
            state_shift[name][positions[keep]] = shift.cpu().numpy()
        # Gene shifts: match each gene of the perturbed cell to its original position.
        where = torch.full((len(keep), vocab), -1, dtype=torch.long, device=ids.device)
        b_o, t_o = torch.nonzero(o_real, as_tuple=True)
        where[b_o, o_ids[b_o, t_o]] = t_o
        b_p, t_p = torch.nonzero(p_real, as_tuple=True)
        tok = p_ids[b_p, t_p]
        orig_pos = where[b_p, tok]
        ok = (orig_pos >= 0) & ~special[tok]
        ok &= ~torch.isin(tok, torch.tensor(targets, device=tok.device))
        b_p, t_p, tok, orig_pos = b_p[ok], t_p[ok], tok[ok], orig_pos[ok]
        cos = F.cosine_similarity(p_hidden[b_p, t_p], o_hidden[b_p, orig_pos], dim=-1)
        sums.index_add_(0, tok.cpu(), cos.double().cpu())
        counts.index_add_(0, tok.cpu(), torch.ones(len(tok), dtype=torch.float64))
    n_changed = int(np.isfinite(cos_cell).sum())
    if n_changed == 0:
        logger.warning("None of the selected cells is changed by the perturbation.")
    seen = torch.nonzero(counts > 0).squeeze(1)
    names = np.asarray(model._vocab_names(), dtype=object)[seen.numpy()]
    mean = (sums[seen] / counts[seen]).numpy()
    table = pd.DataFrame(
        {"mean_cosine": mean, "shift": 1.0 - mean, "n_cells": counts[seen].numpy().astype(int)},
        index=pd.Index(names, name="gene_id"),
    ).sort_values("shift", ascending=False)
    obs = np.full(adata.n_obs, np.nan, dtype=np.float32)
    obs[cells[inverse]] = cos_cell[inverse]
    adata.obs[key_added] = obs
    adata.uns[key_added] = table
    if states is not None:
        goal = np.full(adata.n_obs, np.nan, dtype=np.float32)
        goal[cells] = state_shift[states["goal_state"]]
        adata.obs[f"{key_added}_goal_shift"] = goal
        adata.uns[f"{key_added}_state_shifts"] = pd.DataFrame(
            {
                "role": ["goal"] + ["alt"] * (len(state_shift) - 1),
                "mean_shift": [_nanmean(v) for v in state_shift.values()],
                "n_cells": [int(np.isfinite(v).sum()) for v in state_shift.values()],
            },
            index=pd.Index(list(state_shift), name="state"),
        )
    record_in_uns(
        adata,
        "obs",
        key_added,
        {
            "function": "in_silico_perturbation",
            "genes": ",".join([genes] if isinstance(genes, str) else list(genes)),
            "perturb_type": perturb_type,
            "pooling": pooling,
            "layer": layer,
            "n_cells_perturbed": n_changed,
            **({} if states is None else {"cell_states_to_model": states}),
        },
    )
    return table
