"""Novel cell type classification with scCello: ontology-guided Spearman voting.

scCello's zero-shot classification of cell types never seen in pretraining
(``run_novel_cell_type_classification.py`` of the reference) compares two profiles over the
known (pretraining) cell types:

* per cell, ``sim_x[k] = cos(cell_cls(h), rep_k) * 100`` where ``rep_k`` is the mean
  ``cell_cls`` embedding of reference cells of known type ``k`` (zero for types without
  cells, so their similarity is 0);
* per candidate novel type ``t``, ``voting_sim[t, k]`` = raw personalized-PageRank similarity
  on the Cell Ontology between ``t`` (restart node) and ``k``.

The logit of ``t`` is the Spearman correlation of the two profiles; the prediction is the
argmax and the probabilities its softmax.

One deliberate difference from the reference script: a candidate without a Cell Ontology id
raises :class:`~scfm.errors.OntologyError` (the reference gives it an all-zero row, whose NaN
correlation then wins every argmax).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import anndata as ad
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

from scfm.errors import AnnDataKeyError, InvalidInputError, OntologyError

if TYPE_CHECKING:
    from scfm.model import ScCello

logger = logging.getLogger(__name__)

__all__ = ["classify_novel_cell_types", "spearman_rows"]

#: The reference divides both unit vectors by 0.1 (so cosines are scaled by 100).
_SIM_SCALE = 0.1


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation of every row of ``x`` with every row of ``y``.

    Ties get average ranks (as :func:`scipy.stats.spearmanr`); a constant row gives ``NaN``.

    Parameters
    ----------
    x
        ``[n, k]`` profiles.
    y
        ``[t, k]`` profiles.

    Returns
    -------
    ``[n, t]`` float64 correlations.
    """
    rx = rankdata(np.asarray(x, dtype=np.float64), axis=1)
    ry = rankdata(np.asarray(y, dtype=np.float64), axis=1)
    rx = rx - rx.mean(1, keepdims=True)
    ry = ry - ry.mean(1, keepdims=True)
    denom = np.sqrt((rx**2).sum(1))[:, None] * np.sqrt((ry**2).sum(1))[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx @ ry.T) / denom


def _known_type_index(model: ScCello, values: pd.Series) -> np.ndarray:
    """Pretraining label index of each reference cell (``-1`` if not a pretraining type)."""
    clids = model.label_clids or []
    index = {c: i for i, c in enumerate(clids)}
    by_name = {v.lower(): k for k, v in model.cell_type_names.items()}
    out = np.full(len(values), -1, dtype=np.int64)
    for i, value in enumerate(values.astype(str)):
        key = value.strip()
        clid = (
            key.replace("_", ":")
            if key.startswith(("CL:", "CL_"))
            else (by_name.get(key.lower()) or model.taxonomy_names.get(key.lower()))
        )
        out[i] = index.get(clid, -1) if clid is not None else -1
    return out


def classify_novel_cell_types(
    model: ScCello,
    adata: ad.AnnData,
    candidates: Sequence[str],
    *,
    reference: ad.AnnData | None = None,
    reference_key: str = "cell_type_ontology_term_id",
    key_added: str = "sccello_novel_cell_type",
    label_mapping: Literal["names", "ids"] = "names",
    batch_size: int | None = None,
) -> pd.DataFrame:
    """Assign each cell to one of several candidate cell types unseen in pretraining.

    Parameters
    ----------
    model
        A pretrained :class:`~scfm.model.ScCello` (with its pretraining label map).
    adata
        Query cells, set up with :meth:`~scfm.model.ScCello.setup_anndata`.
    candidates
        Candidate novel cell types: Cell Ontology ids (``"CL:0000786"``) or names
        (``"plasma cell"``), looked up with :meth:`~scfm.model.ScCello.lookup_cell_types`.
    reference
        Cells of known (pretraining) types whose mean ``cell_cls`` embedding per type
        represents that type (the reference uses a 10% sample of the pretraining data);
        ``None`` uses ``adata`` itself. It must be set up with ``setup_anndata``.
    reference_key
        ``reference.obs`` column with each cell's type (CL ids, or pretraining type names).
        Cells of types outside the pretraining set are ignored.
    key_added
        Output prefix (see Notes).
    label_mapping
        How the pretraining cell types are placed on the ontology graph. ``"names"`` (the
        reference): CL id -> pretraining name -> Cell Taxonomy name (the release's
        ``celltype_relationship.json``) -> CL id; types whose name is not found get an
        all-zero ``voting_sim`` column. ``"ids"``: their CL ids directly. Without the Cell
        Taxonomy names both are the same.
    batch_size
        Cells per minibatch for the embeddings.

    Returns
    -------
    DataFrame (cells x candidates) of the probabilities.

    Notes
    -----
    Writes ``adata.obs[key_added]`` (predicted candidate as given, categorical),
    ``adata.obs[key_added + "_id"]`` (its CL id), ``adata.obsm[key_added + "_probs"]`` and
    ``adata.obsm[key_added + "_logits"]`` (DataFrames over the candidates),
    ``adata.obsm[key_added + "_sim"]`` (``sim_x`` over the pretraining types) and
    ``adata.uns[key_added]`` (candidates, their CL ids, ``voting_sim``, ``celltype_repr``).

    Raises
    ------
    OntologyError
        If a candidate has no Cell Ontology id or the model has no pretraining label map.
    """
    if model.label_clids is None:
        raise OntologyError(
            "The model has no pretraining label map (new_pretrain/pretrain_frac100_clid2name.pkl); "
            "load it with ScCello.from_pretrained(path, adata, data_dir=<scCello data/ folder>)."
        )
    if label_mapping not in ("names", "ids"):
        raise InvalidInputError(f"label_mapping={label_mapping!r}: use 'names' or 'ids'.")
    names = list(dict.fromkeys(str(c) for c in candidates))
    if not names:
        raise InvalidInputError("Pass at least one candidate cell type.")
    reference = adata if reference is None else reference
    if reference_key not in reference.obs.columns:
        raise AnnDataKeyError(
            f"reference_key={reference_key!r} is not a column of the reference's obs. Pass the "
            "column holding the known cell types (CL ids or names)."
        )
    known = _known_type_index(model, reference.obs[reference_key])
    if not (known >= 0).any():
        raise InvalidInputError(
            f"No reference cell has one of the model's {len(model.label_clids)} pretraining "
            f"cell types in obs[{reference_key!r}]; pass reference= cells of known types."
        )
    candidate_ids = model.lookup_cell_types(names)
    missing = [c for c in candidate_ids if c not in model.ontology]
    if missing:
        raise OntologyError(
            f"Candidate ids {missing} are not nodes of the cell ontology "
            f"({model.ontology.source}); pass a fuller ontology to the model."
        )

    h_query = model.get_latent_representation(
        adata, batch_size=batch_size, representation="cell_cls", progress_bar=False
    )
    if reference is adata:
        h_ref = h_query
    else:
        h_ref = model.get_latent_representation(
            reference, batch_size=batch_size, representation="cell_cls", progress_bar=False
        )
    n_labels, dim = len(model.label_clids), h_ref.shape[1]
    labels = torch.as_tensor(known[known >= 0])
    celltype_repr = torch.zeros(n_labels, dim)
    celltype_repr.scatter_reduce_(
        0,
        labels[:, None].expand(-1, dim),
        torch.as_tensor(h_ref[known >= 0]),
        reduce="mean",
        include_self=False,
    )
    h_x = F.normalize(torch.as_tensor(h_query), p=2, dim=-1) / _SIM_SCALE
    h_y = F.normalize(celltype_repr, p=2, dim=-1) / _SIM_SCALE
    sim_x = (h_x @ h_y.t()).numpy()

    # raw PPR from each candidate (restart node) to each pretraining type; float32 as stored
    # by the reference; types that are not graph nodes get 0
    ontology = model.ontology
    cand_nodes = ontology.node_ids(candidate_ids)
    label_clids = list(model.label_clids)
    if label_mapping == "names" and model.taxonomy_names:
        label_clids = [
            model.taxonomy_names.get(model.cell_type_names.get(c, c).lower(), "")
            for c in label_clids
        ]
    label_nodes = ontology.node_ids(label_clids, missing=-1)
    from scfm.data._ontology import personalized_pagerank

    ppr = personalized_pagerank(ontology.adjacency(), sources=cand_nodes).astype(np.float32)
    voting_sim = np.where(label_nodes[None, :] >= 0, ppr[:, np.maximum(label_nodes, 0)], 0.0)
    voting_sim = voting_sim.astype(np.float64)

    logits = spearman_rows(sim_x, voting_sim)
    probs = torch.softmax(torch.as_tensor(logits), dim=-1).numpy()
    pred = torch.argmax(torch.as_tensor(logits), dim=-1).numpy()
    columns = pd.Index(names, name="candidate")
    probs_df = pd.DataFrame(probs, index=adata.obs_names, columns=columns)
    adata.obs[key_added] = pd.Categorical([names[i] for i in pred], categories=names)
    adata.obs[f"{key_added}_id"] = pd.Categorical(
        [candidate_ids[i] for i in pred], categories=list(dict.fromkeys(candidate_ids))
    )
    adata.obsm[f"{key_added}_probs"] = probs_df
    adata.obsm[f"{key_added}_logits"] = pd.DataFrame(logits, index=adata.obs_names, columns=columns)
    adata.obsm[f"{key_added}_sim"] = pd.DataFrame(
        sim_x, index=adata.obs_names, columns=pd.Index(model.label_clids, name="cell_type")
    )
    adata.uns[key_added] = {
        "candidates": np.asarray(names, dtype=object),
        "candidate_ids": np.asarray(candidate_ids, dtype=object),
        "label_clids": np.asarray(model.label_clids, dtype=object),
        "voting_sim": voting_sim,
        "celltype_repr": celltype_repr.numpy(),
    }
    logger.info("Classified %d cells into %d candidate novel types.", adata.n_obs, len(names))
    return probs_df
