"""Figure 5: attention and Grad-CAM overlays on CT slices."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib as mpl
import numpy as np
from matplotlib.figure import Figure

from ctlib.figures.style import (
    finish,
    imshow_ct,
    new_figure,
    wrap,
)


# ---------------------------------------------------------------------------------------------
# Figure 5: attention overlays
# ---------------------------------------------------------------------------------------------
@dataclass
class AttentionCase:
    """One volume of Figure 5: the CT (S, H, W), saliency maps (S, H, W) in [0, 1], the slices to show."""

    title: str
    ct: np.ndarray = field(repr=False)
    maps: dict[str, np.ndarray] = field(repr=False)
    slices: Sequence[int] = ()


def plot_attention_overlays(
    cases: Sequence[AttentionCase],
    *,
    normalized_range: tuple[float, float] | None = None,
    cmap: str = "jet",
    max_alpha: float = 0.6,
    path: str | Path | None = None,
) -> Figure:
    """Figure 5: for each case a block of rows (CT, then each map overlaid), one column per slice.

    Overlays use the map as opacity too, so low saliency leaves the CT visible. Each map is shown on
    the colour scale [0, 1] shared by all its slices.
    """
    if not cases:
        raise ValueError("no cases to plot")
    ncols = max(len(c.slices) or 1 for c in cases)
    nrows = sum(1 + len(c.maps) for c in cases)
    fig = new_figure(1.9 * ncols + 1.4, 1.85 * nrows + 0.35 * len(cases))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    row = 0
    for case in cases:
        ct = np.asarray(case.ct, dtype=np.float32)
        slices = list(case.slices) or [ct.shape[0] // 2]
        for name, m in case.maps.items():
            if np.asarray(m).shape != ct.shape:
                raise ValueError(f"{case.title}: map {name!r} has shape {np.asarray(m).shape}, CT {ct.shape}")
        block = [("CT (lung window)", None), *case.maps.items()]
        for r, (name, m) in enumerate(block):
            if m is not None and not np.asarray(m).max() > 0:
                axes[row + r, 0].text(0.03, 0.04, "all zero: no positive evidence", transform=axes[row + r, 0].transAxes,
                                      fontsize=6.5, color="white", va="bottom", zorder=5)
            for c, s in enumerate(slices):
                ax = axes[row + r, c]
                ax.set_axis_on()
                imshow_ct(ax, ct[s], normalized_range)
                if m is not None:
                    mm = np.clip(np.asarray(m, dtype=np.float32)[s], 0.0, 1.0)
                    ax.imshow(mm, cmap=cmap, vmin=0, vmax=1, alpha=max_alpha * mm)
                if r == 0:
                    ax.set_title(f"{case.title}\nslice {s}" if c == 0 else f"\nslice {s}", fontsize=8,
                                 loc="left" if c == 0 else "center")
                if c == 0:
                    ax.set_ylabel(wrap(name, 14), fontsize=8)
        row += len(block)
    sm = mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(0, 1), cmap=cmap)
    cb = fig.colorbar(sm, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01, shrink=0.5)
    cb.set_label("saliency (0 to 1 per volume)")
    return finish(fig, path)
