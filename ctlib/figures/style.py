"""One look for every figure: the style, colours, CT windows, captions and saving."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.figure import Figure

from ctlib.data import CLASSES

#: (center, width) in HU. The lung window shows parenchyma, vessels and nodules.
LUNG_WINDOW: tuple[float, float] = (-600.0, 1500.0)
#: (center, width) in HU for soft tissue (effusions, lymph nodes, heart).
MEDIASTINAL_WINDOW: tuple[float, float] = (40.0, 400.0)

#: Compact class names for crowded axes; the full names stay in tables.
SHORT_NAMES: dict[str, str] = {
    "Medical material": "Medical material",
    "Arterial wall calcification": "Arterial calc.",
    "Cardiomegaly": "Cardiomegaly",
    "Pericardial effusion": "Pericardial eff.",
    "Coronary artery wall calcification": "Coronary calc.",
    "Hiatal hernia": "Hiatal hernia",
    "Lymphadenopathy": "Lymphadenopathy",
    "Emphysema": "Emphysema",
    "Atelectasis": "Atelectasis",
    "Lung nodule": "Lung nodule",
    "Lung opacity": "Lung opacity",
    "Pulmonary fibrotic sequela": "Fibrotic sequela",
    "Pleural effusion": "Pleural effusion",
    "Mosaic attenuation pattern": "Mosaic attenuation",
    "Peribronchial thickening": "Peribronchial thick.",
    "Consolidation": "Consolidation",
    "Bronchiectasis": "Bronchiectasis",
    "Interlobular septal thickening": "Septal thickening",
}

# One look for every figure: applied while a figure is built and saved.
STYLE: dict[str, Any] = {
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "figure.titlesize": 11,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "image.interpolation": "nearest",
    "savefig.facecolor": "white",
    "figure.facecolor": "white",
}
DPI = 150
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
           "#7f7f7f", "#bcbd22")


def short_name(cls: str) -> str:
    """A compact label for class ``cls`` (the name itself when it has none)."""
    return SHORT_NAMES.get(cls, cls)


def class_color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def new_figure(width: float, height: float, *, layout: str | None = "constrained") -> Figure:
    with mpl.rc_context(STYLE):
        return Figure(figsize=(width, height), layout=layout, dpi=100)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Writes ``fig`` to ``path`` (format from the suffix, PNG by default), creating folders."""
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    with mpl.rc_context(STYLE):
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def finish(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        save_figure(fig, path)
    return fig


# ---------------------------------------------------------------------------------------------
# windowing
# ---------------------------------------------------------------------------------------------
def window(
    image: np.ndarray | Any,
    center: float = LUNG_WINDOW[0],
    width: float = LUNG_WINDOW[1],
    *,
    normalized_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """Display grey levels in [0, 1] of a CT window (default: the lung window, -600/1500 HU).

    Args:
        image: any shape; Hounsfield units, or model input in [-1, 1] when ``normalized_range`` is given.
        center: window centre in HU.
        width: window width in HU (> 0).
        normalized_range: the ``hu_range`` of :func:`ctlib.preprocess.preprocess` (e.g. ``(-1000, 1000)``),
            which divided HU by ``max(|low|, |high|)``: the input is multiplied back to HU first.
            None: the input is in HU.

    Returns:
        float32 array of the input's shape: 0 at ``center - width/2`` and below, 1 at ``center + width/2``
        and above. Torch tensors are accepted (detached, moved to CPU).
    """
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    hu = np.asarray(image, dtype=np.float32)
    if normalized_range is not None:
        lo, hi = (float(v) for v in normalized_range)
        if not hi > lo:
            raise ValueError(f"normalized_range must be (low, high) with high > low, got {normalized_range}")
        hu = hu * max(abs(lo), abs(hi))
    low = center - width / 2.0
    return np.clip((hu - low) / width, 0.0, 1.0).astype(np.float32)


def imshow_ct(ax: Any, image: np.ndarray, normalized_range: tuple[float, float] | None,
               center: float = LUNG_WINDOW[0], width: float = LUNG_WINDOW[1]) -> None:
    ax.imshow(window(image, center, width, normalized_range=normalized_range), cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def label_caption(labels: np.ndarray | Sequence[int], classes: Sequence[str] = CLASSES, *, max_items: int = 2) -> str:
    """A short caption of a volume's labels (C,): ``"Lung nodule, Emphysema +1"`` or ``"no abnormality"``."""
    y = np.asarray(labels).reshape(-1)
    if y.shape[0] != len(classes):
        raise ValueError(f"labels must have {len(classes)} entries, got {y.shape[0]}")
    present = [short_name(c) for c, v in zip(classes, y, strict=True) if v > 0]
    if not present:
        return "no abnormality"
    extra = len(present) - max_items
    return ", ".join(present[:max_items]) + (f" +{extra}" if extra > 0 else "")


def wrap(text: str, width: int = 18) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text
