"""kNN label transfer from a labelled reference to a query in any shared embedding."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.neighbors import NearestNeighbors

from scfm.data._validation import check_key_added, check_obs_keys
from scfm.errors import AnnDataKeyError, InvalidInputError

logger = logging.getLogger(__name__)

__all__ = ["transfer_labels"]


def _embedding(adata: ad.AnnData, use_rep: str, which: str) -> np.ndarray:
    if use_rep not in adata.obsm:
        raise AnnDataKeyError(
            f"use_rep={use_rep!r} is not in {which}.obsm (keys: "
            f"{', '.join(adata.obsm.keys()) or 'none'}). Embed both data sets with the same "
            "model first, e.g. model.embed(adata)."
        )
    x = np.asarray(adata.obsm[use_rep], dtype=np.float64)
    if x.ndim != 2 or not np.all(np.isfinite(x)):
        raise InvalidInputError(f"{which}.obsm[{use_rep!r}] must be a finite 2-d array.")
    return x


def transfer_labels(
    reference: ad.AnnData,
    query: ad.AnnData,
    labels_key: str,
    use_rep: str,
    *,
    n_neighbors: int = 15,
    metric: str = "euclidean",
    key_added: str | None = None,
) -> pd.DataFrame:
    """Transfer cell labels from ``reference`` to ``query`` by k-nearest-neighbour voting.

    Each query cell takes the label with the largest distance-weighted vote
    (weights ``1 / (distance + eps)``) among its ``n_neighbors`` nearest reference cells in
    ``obsm[use_rep]``. The confidence is that label's share of the votes (1 = unanimous).

    Parameters
    ----------
    reference
        Labelled AnnData with ``obs[labels_key]`` and ``obsm[use_rep]``.
    query
        AnnData with ``obsm[use_rep]`` from the same model (same dimension).
    labels_key
        Label column of ``reference.obs``.
    use_rep
        Embedding key present in both ``.obsm``.
    n_neighbors
        Neighbours per query cell (capped at the number of reference cells).
    metric
        Distance of :class:`sklearn.neighbors.NearestNeighbors` (``"euclidean"``,
        ``"cosine"``, ...).
    key_added
        ``query.obs`` column for the labels; default ``f"{labels_key}_transferred"``, so
        true labels the query may hold are never overwritten. The confidence goes to
        ``query.obs[f"{key_added}_confidence"]``.

    Returns
    -------
    DataFrame indexed by ``query.obs_names`` with columns ``label`` and ``confidence``.

    Examples
    --------
    >>> scfm.tl.transfer_labels(ref, query, "cell_type", use_rep="X_geneformer")
    >>> query.obs[["cell_type_transferred", "cell_type_transferred_confidence"]]
    """
    check_obs_keys(reference, [("labels_key", labels_key)])
    key = check_key_added(
        f"{labels_key}_transferred" if key_added is None else key_added, where="query.obs"
    )
    x_ref = _embedding(reference, use_rep, "reference")
    x_query = _embedding(query, use_rep, "query")
    if x_ref.shape[1] != x_query.shape[1]:
        raise InvalidInputError(
            f"reference.obsm[{use_rep!r}] has {x_ref.shape[1]} dimensions but the query's has "
            f"{x_query.shape[1]}: embed both with the same model."
        )
    if n_neighbors < 1:
        raise InvalidInputError(f"n_neighbors must be >= 1, got {n_neighbors}.")
    k = min(n_neighbors, reference.n_obs)
    labels = pd.Categorical(reference.obs[labels_key].astype(str))
    codes = np.asarray(labels.codes)
    n_classes = len(labels.categories)

    nn = NearestNeighbors(n_neighbors=k, metric=metric).fit(x_ref)
    dist, idx = nn.kneighbors(x_query)
    weights = 1.0 / (dist + 1e-12)
    votes = np.zeros((query.n_obs, n_classes))
    np.add.at(votes, (np.repeat(np.arange(query.n_obs), k), codes[idx].ravel()), weights.ravel())
    best = votes.argmax(axis=1)
    confidence = votes[np.arange(query.n_obs), best] / votes.sum(axis=1)

    result = pd.DataFrame(
        {
            "label": pd.Categorical.from_codes(best, categories=labels.categories),
            "confidence": confidence,
        },
        index=query.obs_names,
    )
    query.obs[key] = result["label"].to_numpy()
    query.obs[f"{key}_confidence"] = result["confidence"].to_numpy()
    logger.info(
        "transferred %s to %d cells (median confidence %.2f)",
        labels_key,
        query.n_obs,
        float(np.median(confidence)),
    )
    return result
