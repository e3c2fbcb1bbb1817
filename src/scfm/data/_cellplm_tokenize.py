"""CellPLM's input transform: the "tokenizer" is gene selection plus ``log1p``.

CellPLM turns a cell into one token by embedding its expression vector, so tokenisation is
only: keep the input genes that are in the vocabulary (input order), and take ``log1p`` of
their raw counts (no library-size normalisation, upstream issue #22).
"""

from __future__ import annotations

import torch

__all__ = ["cellplm_expression_input"]


def cellplm_expression_input(counts: torch.Tensor, var_index: torch.Tensor) -> torch.Tensor:
    """``log1p`` of the raw counts of the vocabulary genes.

    Parameters
    ----------
    counts
        ``[N, n_vars]`` raw counts in ``adata.var`` order.
    var_index
        Positions (in ``adata.var``) of the genes found in the vocabulary, in ``adata.var``
        order (:attr:`scfm.data.GeneAlignment.var_index`).

    Returns
    -------
    ``[N, len(var_index)]`` float32, the embedder input; row ``i`` times the vocabulary rows
    of these genes' embeddings gives cell ``i``'s token.
    """
    return torch.log1p(counts[:, var_index].float())
