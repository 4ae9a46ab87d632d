"""Data exploration plots: label co-occurrence, HU histograms, class prevalence against Table 1."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ctlib.data import CLASSES
from ctlib.figures.style import (
    LUNG_WINDOW,
    STYLE,
    class_color,
    finish,
    new_figure,
    short_name,
)


# ---------------------------------------------------------------------------------------------
# data exploration
# ---------------------------------------------------------------------------------------------
def _label_matrix(labels: np.ndarray | pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    if isinstance(labels, pd.DataFrame):
        missing = [c for c in classes if c not in labels.columns]
        if missing:
            raise ValueError(f"labels lack class columns {missing}")
        y = labels[list(classes)].to_numpy()
    else:
        y = np.asarray(labels)
    if y.ndim != 2 or y.shape[1] != len(classes):
        raise ValueError(f"labels must be (N, {len(classes)}), got {y.shape}")
    return (y > 0).astype(np.int64)


def plot_cooccurrence(
    labels: np.ndarray | pd.DataFrame,
    *,
    classes: Sequence[str] = CLASSES,
    path: str | Path | None = None,
) -> Figure:
    """Label co-occurrence: colour P(column | row) = volumes with both / volumes with the row class;
    cells print the counts of volumes with both (the diagonal: volumes with the class)."""
    import seaborn as sns

    y = _label_matrix(labels, classes)
    both = y.T @ y  # (C, C) counts
    diag = np.diag(both).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        cond = np.where(diag[:, None] > 0, both / diag[:, None], np.nan)
    names = [short_name(c) for c in classes]
    fig = new_figure(9.5, 8.2)
    ax = fig.subplots()
    with mpl.rc_context(STYLE):
        sns.heatmap(pd.DataFrame(cond, index=names, columns=names), ax=ax, cmap="mako_r", vmin=0, vmax=1,
                    annot=both, fmt="d", annot_kws={"fontsize": 6}, square=True, linewidths=0.3,
                    linecolor="white", cbar_kws={"label": "P(column class | row class)", "shrink": 0.7})
    ax.set_xticklabels(names, rotation=60, ha="right")
    ax.set_title(f"Label co-occurrence (N = {len(y)} volumes; numbers: volumes with both)")
    return finish(fig, path)


def hu_sample(volumes: Sequence[np.ndarray], *, max_voxels: int = 200_000, seed: int = 0) -> np.ndarray:
    """A random sample of at most ``max_voxels`` voxel values pooled from ``volumes`` (any shapes),
    drawn evenly from each: the input of :func:`plot_hu_histograms`."""
    if not volumes:
        raise ValueError("no volumes to sample")
    rng = np.random.default_rng(seed)
    per = max(1, max_voxels // len(volumes))
    parts = []
    for v in volumes:
        flat = np.asarray(v, dtype=np.float32).ravel()
        parts.append(flat if flat.size <= per else flat[rng.choice(flat.size, per, replace=False)])
    return np.concatenate(parts)


def plot_hu_histograms(
    groups: Mapping[str, np.ndarray],
    *,
    hu_range: tuple[float, float] = (-1100.0, 1100.0),
    bins: int = 110,
    show_windows: bool = True,
    title: str = "Voxel intensities (HU)",
    path: str | Path | None = None,
) -> Figure:
    """Densities of voxel HU values per group (log scale), with the lung window and the clip range
    of preprocessing marked.

    Args:
        groups: label -> HU values (any shape), e.g. from :func:`hu_sample`.
        hu_range: the plotted HU range; values outside are counted in the end bins.
        bins: histogram bins.
        show_windows: shade the lung window and mark [-1000, 1000] (the paper's clip).
    """
    if not groups:
        raise ValueError("no HU groups to plot")
    lo, hi = hu_range
    edges = np.linspace(lo, hi, bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    fig = new_figure(7.0, 3.8)
    ax = fig.subplots()
    if show_windows:
        c, w = LUNG_WINDOW
        ax.axvspan(c - w / 2, c + w / 2, color="#e8eef7", zorder=0, label="lung window")
        for x in (-1000, 1000):
            ax.axvline(x, color="0.5", ls=":", lw=0.9)
        ax.text(-1000, 1.0, " clip", transform=ax.get_xaxis_transform(), fontsize=7, color="0.4", va="top")
    for j, (name, values) in enumerate(groups.items()):
        v = np.clip(np.asarray(values, dtype=np.float64).ravel(), lo, hi)
        if v.size == 0:
            continue
        dens, _ = np.histogram(v, bins=edges, density=True)
        ax.step(centers, np.maximum(dens, 1e-9), where="mid", color=class_color(j), lw=1.2,
                label=f"{name} ({v.size:,} voxels)")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(bottom=1e-7)
    ax.set_xlabel("HU")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=7, loc="upper right")
    return finish(fig, path)


def plot_class_prevalence(
    ours: pd.DataFrame,
    paper: pd.DataFrame | None = None,
    *,
    column: str = "Total",
    ours_label: str = "ours",
    path: str | Path | None = None,
) -> Figure:
    """Table 1 as bars: each class's share of all positive labels, ours beside the paper's.

    Shares (class count / sum over classes) make cohorts of different sizes comparable: the paper's
    Table 1 gives counts per class but not the number of volumes.

    Args:
        ours: Table 1 frame (index classes, possibly a final ``"Volumes"`` row; column ``column``).
        paper: the paper's Table 1 (:func:`ctlib.paper_numbers.paper_table1`) or None.
    """
    classes = [c for c in ours.index if c in CLASSES]
    if not classes:
        raise ValueError("ours has no class rows")
    share_ours = ours.loc[classes, column].astype(float)
    share_ours = share_ours / max(share_ours.sum(), 1e-12)
    fig = new_figure(7.5, 0.3 * len(classes) + 1.3)
    ax = fig.subplots()
    y = np.arange(len(classes))[::-1].astype(float)
    h = 0.38 if paper is not None else 0.7
    ax.barh(y + (h / 2 if paper is not None else 0), share_ours.to_numpy(), height=h, color=class_color(0),
            label=ours_label)
    if paper is not None:
        share_paper = paper.reindex(classes)[column].astype(float)
        share_paper = share_paper / max(share_paper.sum(), 1e-12)
        ax.barh(y - h / 2, share_paper.to_numpy(), height=h, color="0.65", label="paper (Table 1)")
    ax.set_axisbelow(True)
    ax.set_yticks(y, classes)
    ax.set_xlabel("share of all positive labels")
    ax.xaxis.set_major_formatter(mpl.ticker.PercentFormatter(1.0, decimals=0))
    ax.grid(axis="x", color="0.93")
    ax.legend(frameon=False, loc="lower right")
    ax.set_title("Class distribution (Table 1)")
    return finish(fig, path)
