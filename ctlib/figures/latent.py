"""Figure 4 (t-SNE of the latent space) and retrieval results."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib as mpl
import numpy as np
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure

from ctlib.figures.style import (
    class_color,
    finish,
    imshow_ct,
    new_figure,
)


# ---------------------------------------------------------------------------------------------
# Figure 4: t-SNE
# ---------------------------------------------------------------------------------------------
def plot_tsne(
    embedding: np.ndarray,
    n_abnormalities: np.ndarray | Sequence[int],
    *,
    title: str = "Latent space (t-SNE), coloured by the number of abnormalities",
    marker_size: float = 18.0,
    path: str | Path | None = None,
) -> Figure:
    """Figure 4: a 2D embedding (N, 2) coloured by the number of abnormalities (N,), discrete colour bar."""
    emb = np.asarray(embedding, dtype=float)
    counts = np.asarray(n_abnormalities).astype(int)
    if emb.ndim != 2 or emb.shape[1] != 2:
        raise ValueError(f"embedding must be (N, 2), got {emb.shape}")
    if counts.shape != (emb.shape[0],):
        raise ValueError(f"n_abnormalities must be ({emb.shape[0]},), got {counts.shape}")
    top = max(int(counts.max()) if counts.size else 0, 1)
    levels = top + 1
    base = mpl.colormaps["viridis"].resampled(levels)
    cmap = ListedColormap(base(np.arange(levels)))
    norm = BoundaryNorm(np.arange(-0.5, levels + 0.5), cmap.N)
    fig = new_figure(6.4, 5.2)
    ax = fig.subplots()
    order = np.argsort(counts, kind="stable")  # the many-abnormality cases on top
    sc = ax.scatter(emb[order, 0], emb[order, 1], c=counts[order], cmap=cmap, norm=norm, s=marker_size,
                    edgecolors="white", linewidths=0.3)
    step = max(1, math.ceil(levels / 12))
    cb = fig.colorbar(sc, ax=ax, ticks=np.arange(0, levels, step), fraction=0.05, pad=0.02)
    cb.set_label("number of abnormalities")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_title(f"{title}\n(N = {len(counts)} volumes)")
    return finish(fig, path)




def plot_retrieval(
    images: Sequence[Sequence[np.ndarray]],
    titles: Sequence[Sequence[str]],
    *,
    normalized_range: tuple[float, float] | None = None,
    path: str | Path | None = None,
) -> Figure:
    """Retrieval examples: one row per query, the query slice first (framed), then its nearest cases.

    Args:
        images: per row, the (H, W) slices: query, then neighbours.
        titles: the panel captions, same layout.
    """
    if not images:
        raise ValueError("no retrieval rows to plot")
    ncols = max(len(r) for r in images)
    fig = new_figure(1.9 * ncols, 2.25 * len(images))
    axes = fig.subplots(len(images), ncols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for i, (row, caps) in enumerate(zip(images, titles, strict=True)):
        for j, (img, cap) in enumerate(zip(row, caps, strict=True)):
            ax = axes[i, j]
            ax.set_axis_on()
            imshow_ct(ax, img, normalized_range)
            ax.set_title(cap, fontsize=6.5)
            if j == 0:
                for spine in ax.spines.values():
                    spine.set_visible(True)
                    spine.set_color(class_color(1))
                    spine.set_linewidth(2.5)
    return finish(fig, path)
