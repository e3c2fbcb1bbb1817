"""Plot of :func:`scfm.tl.benchmark_embeddings` results."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from scfm.errors import InvalidInputError

__all__ = ["benchmark"]


def benchmark(
    results: pd.DataFrame,
    metrics: Sequence[str] = ("AvgBIO", "AvgBATCH", "Total"),
    *,
    ax: Axes | None = None,
    show: bool | None = None,
) -> Axes | None:
    """Grouped bar chart of benchmark scores per embedding.

    Parameters
    ----------
    results
        Tidy output of :func:`scfm.tl.benchmark_embeddings` (or ``adata.uns[key_added]``).
    metrics
        Which metrics to draw (aggregates by default; any metric name of ``results``).
    ax
        Axes to draw into; a new figure otherwise.
    show
        Show the figure (default: when no ``ax`` is given and matplotlib is interactive).

    Returns
    -------
    The axes if ``show`` is false, else ``None``.
    """
    import matplotlib.pyplot as plt

    missing = [m for m in metrics if m not in set(results["metric"])]
    if missing:
        raise InvalidInputError(
            f"metrics {missing} are not in the results (available: "
            f"{', '.join(dict.fromkeys(results['metric']))})."
        )
    table = results[results["metric"].isin(metrics)].pivot_table(
        index="embedding", columns="metric", values="value", sort=False
    )[list(metrics)]
    table = table.sort_values(metrics[-1], ascending=False)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.2 + 1.1 * len(table), 3.6))
    width = 0.8 / len(metrics)
    x = np.arange(len(table))
    for i, metric in enumerate(metrics):
        bars = ax.bar(x + (i - (len(metrics) - 1) / 2) * width, table[metric], width, label=metric)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(x, table.index, rotation=30, ha="right")
    ax.set_ylabel("score")
    ax.set_ylim(0, 1.05)
    ax.legend(
        frameon=False,
        fontsize=8,
        ncols=len(metrics),
        loc="upper center",
        bbox_to_anchor=(0.5, 1.15),
    )
    ax.spines[["top", "right"]].set_visible(False)
    if show is None:
        show = plt.isinteractive()
    if show:
        plt.show()
        return None
    return ax
