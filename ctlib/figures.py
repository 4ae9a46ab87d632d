"""The paper's figures and tables, drawn from arrays and frames the notebooks hand over.

Every plotting function builds a stand-alone :class:`matplotlib.figure.Figure` (no pyplot state, so it
is safe headless and in loops), returns it, and saves it when given ``path`` (PNG, 150 dpi, tight
bounding box; parent folders are created). Notebooks display the returned figure.

Images follow the data layer's convention: a volume is ``(S, H, W)`` (slices, rows = Y with anterior at
the top, columns = X), either in Hounsfield units or as model input in [-1, 1]; :func:`window` maps both
to display grey levels (pass ``normalized_range`` for model input).

Figures of the paper: :func:`plot_representative_slices` (Figure 1, with :func:`pick_examples`),
:func:`plot_pipeline` (Figure 2), :func:`plot_per_class_auroc` (Figure 3), :func:`plot_tsne` (Figure 4),
:func:`plot_attention_overlays` (Figure 5). Supporting plots: learning curves, the learned alpha,
label co-occurrence, HU histograms, class prevalence against the paper's Table 1, metrics against
alpha, a slice montage, an interactive slice viewer, and retrieval results. Tables are written as CSV
and Markdown by :func:`save_table` (:func:`to_markdown` needs no ``tabulate``).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch

from ctlib.cache import Preprocessing
from ctlib.data import CLASSES

__all__ = [
    "LUNG_WINDOW",
    "MEDIASTINAL_WINDOW",
    "SHORT_NAMES",
    "AttentionCase",
    "SliceExample",
    "display_preprocessing",
    "hu_sample",
    "label_caption",
    "lung_mask",
    "pick_examples",
    "plot_alpha_trajectory",
    "plot_attention_overlays",
    "plot_class_prevalence",
    "plot_cooccurrence",
    "plot_hu_histograms",
    "plot_learning_curves",
    "plot_metric_comparison",
    "plot_metrics_vs_alpha",
    "plot_per_class_auroc",
    "plot_pipeline",
    "plot_representative_slices",
    "plot_retrieval",
    "plot_slice_montage",
    "plot_tsne",
    "refine_examples",
    "run_summary",
    "save_figure",
    "save_table",
    "short_name",
    "slice_viewer",
    "to_markdown",
    "window",
]

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


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _new_figure(width: float, height: float, *, layout: str | None = "constrained") -> Figure:
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


def _finish(fig: Figure, path: str | Path | None) -> Figure:
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
        normalized_range: the ``hu_range`` of :func:`ctlib.data.preprocess` (e.g. ``(-1000, 1000)``),
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


def _imshow_ct(ax: Any, image: np.ndarray, normalized_range: tuple[float, float] | None,
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


def _wrap(text: str, width: int = 18) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


# ---------------------------------------------------------------------------------------------
# Figure 1: representative slices
# ---------------------------------------------------------------------------------------------
@dataclass
class SliceExample:
    """One panel of Figure 1: a volume positive for ``cls`` and the slice that shows it best.

    ``image`` is that slice (H, W); ``difference`` (H, W) its absolute difference from the normal
    reference at the same slice; ``score`` the mean of ``difference`` (how far the slice departs from
    normal); ``index`` the volume's row in the labels given to :func:`pick_examples`.
    """

    cls: str
    index: int
    slice: int
    score: float
    image: np.ndarray = field(repr=False)
    difference: np.ndarray = field(repr=False)
    name: str = ""
    n_labels: int = 0


def _nearest_slices(vol: np.ndarray, refs: np.ndarray, mask: np.ndarray | None = None,
                    ref_masks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each slice of ``vol`` (S, H, W), the same slice of the closest of ``refs`` (K, S, H, W):
    returns the absolute difference (S, H, W) and its per-slice mean (S,). With masks (bool, same
    shapes), only pixels inside either volume's mask count (the mean is still over all pixels)."""
    diffs = np.abs(vol[None] - refs)  # (K, S, H, W)
    if mask is not None and ref_masks is not None:
        diffs = diffs * (mask[None] | ref_masks)
    dist = diffs.mean(axis=(2, 3))  # (K, S)
    nearest = np.argmin(dist, axis=0)
    idx = np.arange(vol.shape[0])
    return diffs[nearest, idx], dist[nearest, idx]


def lung_mask(volume: np.ndarray, threshold: float) -> np.ndarray:
    """Air enclosed by the body, per slice: (S, H, W) -> bool (S, H, W).

    The body is everything above ``threshold`` (e.g. -500 HU, in the volume's units); holes in it
    are filled slice by slice, and the filled body minus the body is the lungs (and airways), while
    the air around the patient stays outside.
    """
    from scipy.ndimage import binary_fill_holes

    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ValueError(f"volume must be (S, H, W), got {vol.shape}")
    body = vol > threshold
    return np.stack([binary_fill_holes(b) & ~b for b in body])


def pick_examples(
    labels: np.ndarray | pd.DataFrame,
    load: Callable[[int], np.ndarray],
    classes: Sequence[str],
    *,
    all_classes: Sequence[str] = CLASSES,
    names: Sequence[str] | None = None,
    groups: Sequence[Any] | None = None,
    candidates: int = 4,
    n_reference: int = 12,
    margin: float = 0.2,
    lung_threshold: float | None = None,
) -> list[SliceExample]:
    """For each class, a positive volume and the slice where it is least like normal scans.

    Anatomy varies between patients, so a plain difference from one normal scan shows body size and
    shape as much as disease. Each slice of a candidate is compared with the same slice of the closest
    reference volume (slice by slice), and that distance is divided by how far reference slices at
    that level lie from each other (the median over references of the distance to their closest other
    reference): a slice scores high when it is unusual *for its level*, not where anatomy varies
    anyway (the diaphragm, the apices). References are up to ``n_reference`` volumes negative for the
    class with the fewest abnormalities (normal scans first); candidates the up to ``candidates``
    positives with the fewest other abnormalities (so that what differs is most likely this class),
    volumes (or, given ``groups``, patients) already chosen for an earlier class last. The best-scoring candidate and slice win, among
    the slices not within ``margin`` of either end of the volume (partial lung apices and bases look
    unusual in every scan). With ``lung_threshold``, only differences inside the lungs of either
    volume count (:func:`lung_mask`): the findings of Figure 1 lie in the lungs or take their place
    (effusion, an enlarged heart), while body size and shape differ between any two patients. All
    volumes must have the same shape (e.g. preprocessed ones).

    Args:
        labels: (N, C) 0/1, columns ``all_classes`` (a DataFrame may hold more columns).
        load: ``load(i) -> (S, H, W)`` volume of row ``i``; each row is loaded at most once.
        classes: the classes to show, one example each.
        all_classes: the class order of ``labels``' columns.
        names: (N,) volume names, copied into the examples.
        groups: (N,) patient of each volume, so that each figure column shows another patient where
            possible; None: volumes count as their own patients.
        candidates: positive volumes tried per class.
        n_reference: volumes in the reference pool.
        margin: fraction of the slices at each end that is never chosen (0 allows all).
        lung_threshold: the body/air threshold in the volumes' units (-500 HU; -0.5 for model input
            scaled by 1000), or None to compare whole slices.

    Returns:
        One :class:`SliceExample` per class with a positive volume, in ``classes`` order (classes
        without any positive volume are left out). ``score`` is the ratio above; ``difference`` the
        absolute difference of the slice from the closest reference slice.
    """
    if isinstance(labels, pd.DataFrame):
        y = labels[list(all_classes)].to_numpy()
    else:
        y = np.asarray(labels)
    if y.ndim != 2 or y.shape[1] != len(all_classes):
        raise ValueError(f"labels must be (N, {len(all_classes)}), got {y.shape}")
    if candidates < 1 or n_reference < 1:
        raise ValueError(f"candidates and n_reference must be >= 1, got {candidates}, {n_reference}")
    if not 0.0 <= margin < 0.5:
        raise ValueError(f"margin must lie in [0, 0.5), got {margin}")
    unknown = [c for c in classes if c not in all_classes]
    if unknown:
        raise ValueError(f"unknown classes {unknown}; known: {list(all_classes)}")
    y = (y > 0).astype(np.int64)
    count = y.sum(axis=1)
    order = np.lexsort((np.arange(len(y)), count))  # fewest abnormalities first, then row order
    group = list(range(len(y))) if groups is None else list(groups)
    if len(group) != len(y):
        raise ValueError(f"groups must have one entry per volume ({len(y)}), got {len(group)}")
    cache: dict[int, np.ndarray] = {}
    masks: dict[int, np.ndarray] = {}
    shape: tuple[int, ...] | None = None

    def get(i: int) -> np.ndarray:
        nonlocal shape
        if i not in cache:
            vol = np.asarray(load(int(i)), dtype=np.float32)
            if vol.ndim != 3:
                raise ValueError(f"load({i}) must return an (S, H, W) volume, got shape {vol.shape}")
            if shape is not None and vol.shape != shape:
                raise ValueError(f"volume {i} has shape {vol.shape}, others {shape}: preprocess them alike")
            shape = vol.shape
            cache[i] = vol
            if lung_threshold is not None:
                masks[i] = lung_mask(vol, lung_threshold)
        return cache[i]

    out: list[SliceExample] = []
    used: set[Any] = set()
    for cls in classes:
        k = list(all_classes).index(cls)
        positives = [int(i) for i in order if y[i, k] == 1]
        if not positives:
            continue
        pos = sorted(positives, key=lambda i: group[i] in used)[:candidates]  # stable: fewest labels first
        pool = [int(i) for i in order if y[i, k] == 0][:n_reference]
        refs = np.stack([get(i) for i in pool]) if pool else None
        ref_masks = np.stack([masks[i] for i in pool]) if pool and lung_threshold is not None else None
        spread = None
        if refs is not None and len(pool) >= 2:
            spread = np.median(np.stack([
                _nearest_slices(refs[j], np.delete(refs, j, axis=0),
                                None if ref_masks is None else ref_masks[j],
                                None if ref_masks is None else np.delete(ref_masks, j, axis=0))[1]
                for j in range(len(pool))]), axis=0)  # (S,)
        best: SliceExample | None = None
        for i in pos:
            vol = get(i)
            if refs is None:
                diff, per_slice = np.zeros_like(vol), np.zeros(vol.shape[0])
            else:
                diff, per_slice = _nearest_slices(vol, refs, masks.get(i), ref_masks)
            if spread is not None:
                per_slice = per_slice / np.maximum(spread, 1e-6 + 1e-3 * float(spread.max()))
            n_s = vol.shape[0]
            cut = min(int(margin * n_s), (n_s - 1) // 2)
            inner = np.full(n_s, -np.inf)
            inner[cut:n_s - cut] = per_slice[cut:n_s - cut]
            s = int(np.argmax(inner)) if refs is not None else n_s // 2
            cand = SliceExample(cls=cls, index=i, slice=s, score=float(per_slice[s]), image=vol[s],
                                difference=diff[s], name="" if names is None else str(names[i]),
                                n_labels=int(count[i]))
            if best is None or cand.score > best.score:
                best = cand
        assert best is not None
        used.add(group[best.index])
        out.append(best)
    return out


def display_preprocessing(prep: Preprocessing, native_spacing: float, *, max_factor: int = 4) -> Preprocessing:
    """The model's preprocessing at up to ``max_factor`` times its in-plane resolution, for figures.

    Same slices (z spacing, size and ``num_slices`` unchanged) and the same field of view, with in-plane
    pixels as fine as the scans' ``native_spacing`` (mm) allows. Without resampling (``target_spacing``
    None) the model already sees native pixels and ``prep`` is returned.
    """
    if prep.target_spacing is None:
        return prep
    tx, ty, tz = prep.target_spacing
    if not native_spacing > 0:
        raise ValueError(f"native_spacing must be positive, got {native_spacing}")
    f = int(min(max_factor, max(1, round(min(tx, ty) / native_spacing))))
    if f == 1:
        return prep
    x, y, z = prep.size
    return Preprocessing(size=(x * f, y * f, z), num_slices=prep.num_slices, hu_range=prep.hu_range,
                         target_spacing=(tx / f, ty / f, tz))


def refine_examples(examples: Sequence[SliceExample], load: Callable[[int], np.ndarray]) -> list[SliceExample]:
    """The examples re-rendered from finer volumes (``load(i) -> (S, H', W')``, same slices, e.g. from
    :func:`display_preprocessing`); the difference maps are upscaled bilinearly to match."""
    from scipy.ndimage import zoom

    out = []
    for ex in examples:
        vol = np.asarray(load(ex.index), dtype=np.float32)
        if vol.ndim != 3 or not 0 <= ex.slice < vol.shape[0]:
            raise ValueError(f"load({ex.index}) gave shape {vol.shape}, which lacks slice {ex.slice}")
        img = vol[ex.slice]
        scale = (img.shape[0] / ex.difference.shape[0], img.shape[1] / ex.difference.shape[1])
        diff = zoom(ex.difference, scale, order=1)[: img.shape[0], : img.shape[1]]
        out.append(SliceExample(cls=ex.cls, index=ex.index, slice=ex.slice, score=ex.score, image=img,
                                difference=diff, name=ex.name, n_labels=ex.n_labels))
    return out


def plot_representative_slices(
    examples: Sequence[SliceExample],
    *,
    normalized_range: tuple[float, float] | None = None,
    show_difference: bool = True,
    difference_hu: float = 300.0,
    columns: int = 6,
    path: str | Path | None = None,
) -> Figure:
    """Figure 1: one panel per class, the chosen slice in the lung window.

    With ``show_difference`` a second row under each image overlays where the slice departs from the
    normal reference (the cue the slice was chosen by).

    Args:
        examples: from :func:`pick_examples`.
        normalized_range: the preprocessing ``hu_range`` if the images are model input in [-1, 1].
        show_difference: add the difference-overlay row.
        difference_hu: the absolute HU difference shown at full colour (same scale in every panel).
        columns: panels per row before wrapping.
        path: where to save the PNG.
    """
    if not examples:
        raise ValueError("no examples to plot")
    n = len(examples)
    ncols = min(columns, n)
    blocks = math.ceil(n / ncols)
    rows_per = 2 if show_difference else 1
    fig = _new_figure(2.1 * ncols, 2.35 * blocks * rows_per + 0.4)
    axes = fig.subplots(blocks * rows_per, ncols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for j, ex in enumerate(examples):
        b, c = divmod(j, ncols)
        ax = axes[b * rows_per, c]
        ax.set_axis_on()
        _imshow_ct(ax, ex.image, normalized_range)
        label = f"{ex.name or f'volume {ex.index}'}, slice {ex.slice}, {ex.n_labels} label{'s' * (ex.n_labels != 1)}"
        ax.set_title(f"{_wrap(ex.cls, 22)}\n", fontsize=9, fontweight="bold")
        ax.text(0.5, 1.01, label, transform=ax.transAxes, ha="center", va="bottom", fontsize=6.5,
                color="0.3")
        if show_difference:
            ax2 = axes[b * rows_per + 1, c]
            ax2.set_axis_on()
            _imshow_ct(ax2, ex.image, normalized_range)
            # One scale for every panel: fully opaque from `difference_hu` HU on, so noise stays faint.
            scale = 1.0 if normalized_range is None else max(abs(float(v)) for v in normalized_range)
            d = np.clip(ex.difference * scale / difference_hu, 0.0, 1.0)
            ax2.imshow(d, cmap="inferno", vmin=0, vmax=1, alpha=0.75 * d)
            ax2.set_title("differs from the closest normal slice", fontsize=6.5, color="0.3")
    fig.suptitle("Representative slices (lung window)")
    return _finish(fig, path)


def plot_slice_montage(
    volume: np.ndarray | Any,
    *,
    n: int = 16,
    normalized_range: tuple[float, float] | None = None,
    title: str | None = None,
    columns: int = 8,
    path: str | Path | None = None,
) -> Figure:
    """Up to ``n`` evenly spaced slices of a volume (S, H, W) in the lung window: the static viewer."""
    vol = np.asarray(volume.detach().cpu() if hasattr(volume, "detach") else volume, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"volume must be (S, H, W), got {vol.shape}")
    picks = np.unique(np.linspace(0, vol.shape[0] - 1, min(n, vol.shape[0])).round().astype(int))
    ncols = min(columns, len(picks))
    nrows = math.ceil(len(picks) / ncols)
    fig = _new_figure(1.5 * ncols, 1.6 * nrows + (0.4 if title else 0))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, s in zip(axes.ravel(), picks, strict=False):
        ax.set_axis_on()
        _imshow_ct(ax, vol[s], normalized_range)
        ax.set_title(f"slice {s}", fontsize=7)
    if title:
        fig.suptitle(title)
    return _finish(fig, path)


def slice_viewer(
    volumes: Mapping[str, np.ndarray],
    *,
    normalized_range: tuple[float, float] | None = None,
) -> Any:
    """An interactive viewer (ipywidgets): a dropdown over ``volumes`` (label -> (S, H, W)) and a slice
    slider. Returns the widget, or None when ipywidgets is not available (use the montage instead)."""
    if not volumes:
        raise ValueError("no volumes to view")
    try:
        import ipywidgets as widgets
        from IPython.display import display
    except ImportError:
        return None
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in volumes.items()}
    first = next(iter(arrays.values()))
    slider = widgets.IntSlider(value=first.shape[0] // 2, min=0, max=first.shape[0] - 1, description="slice")
    choice = widgets.Dropdown(options=list(arrays), description="volume")

    def show(volume: str, slice: int) -> None:  # noqa: A002 - the widget's label
        vol = arrays[volume]
        s = min(slice, vol.shape[0] - 1)
        fig = _new_figure(4, 4.2)
        ax = fig.subplots()
        _imshow_ct(ax, vol[s], normalized_range)
        ax.set_title(f"{volume}\nslice {s}/{vol.shape[0] - 1}", fontsize=8)
        display(fig)

    def on_volume(change: dict) -> None:
        slider.max = arrays[change["new"]].shape[0] - 1

    choice.observe(on_volume, names="value")
    return widgets.interactive(show, volume=choice, slice=slider)


# ---------------------------------------------------------------------------------------------
# Figure 2: the pipeline
# ---------------------------------------------------------------------------------------------
def plot_pipeline(
    *,
    num_slices: int = 100,
    image_size: int = 224,
    patch_size: int = 16,
    vit_dim: int = 512,
    hu_range: tuple[float, float] = (-1000.0, 1000.0),
    alpha: str = "α",
    path: str | Path | None = None,
) -> Figure:
    """Figure 2: the pipeline, drawn with patches and arrows.

    CT volume -> preprocessing -> 2D ResNet-18 per slice -> mean over slices -> x_2d; 3D ViT (spatial,
    then slice-wise transformer) -> projection -> residual_3d; x_2d + alpha * residual_3d -> head ->
    18 labels. The sizes printed in the boxes are the arguments (the paper's by default).
    """
    fig = _new_figure(12.5, 4.6, layout=None)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 40)
    ax.set_axis_off()

    colors = {"data": "#e8eef7", "2d": "#dbeedd", "3d": "#f7e3d4", "fuse": "#ece1f3", "out": "#f3f3f3"}

    def box(x: float, y: float, w: float, h: float, text: str, kind: str, bold: bool = False) -> None:
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.4,rounding_size=1.2",
                                    facecolor=colors[kind], edgecolor="0.35", linewidth=1.0))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=8.3,
                fontweight="bold" if bold else "normal", linespacing=1.35)

    def arrow(x0: float, y0: float, x1: float, y1: float, text: str = "", style: str = "-|>",
              rad: float = 0.0) -> None:
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle=style, mutation_scale=12,
                                     color="0.25", linewidth=1.1, connectionstyle=f"arc3,rad={rad}"))
        if text:
            ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 1.1, text, ha="center", va="bottom", fontsize=7.5,
                    color="0.25", style="italic")

    s, n = num_slices, image_size
    grid = image_size // patch_size
    lo, hi = (int(v) for v in hu_range)
    box(1, 14, 10, 12, "CT volume\n(NIfTI)\n\nvoxels → HU", "data")
    box(15, 12, 14, 16, f"Preprocessing\n\nHU clip [{lo}, {hi}]\ncentre crop / pad\ncentre {s} slices\n"
        f"scale to [-1, 1]\n→ {s}×{n}×{n}", "data")
    arrow(11.8, 20, 14.2, 20)

    # 2D branch (top)
    box(34, 28, 15, 9, f"2D ResNet-18\nper slice ({n}×{n}, 1 channel)\nImageNet init (paper)", "2d", bold=False)
    box(53, 29.5, 9, 6, "mean over\nslices", "2d")
    box(66, 29.5, 7, 6, r"$x_{2d}$" + "\n512", "2d")
    arrow(29.8, 22, 33.6, 31, rad=-0.15)
    arrow(49.4, 32.5, 52.6, 32.5, f"{s}×512")
    arrow(62.4, 32.5, 65.6, 32.5)

    # 3D branch (bottom)
    box(34, 2, 15, 11, f"3D ViT (from scratch)\n{patch_size}×{patch_size} patches: {grid}×{grid}/slice\n"
        "spatial transformer\n→ slice-wise transformer", "3d")
    box(53, 4.5, 9, 6, "mean of\ntokens →\nprojection", "3d")
    box(66, 4.5, 7, 6, r"$residual_{3d}$" + "\n512", "3d")
    arrow(29.8, 18, 33.6, 9, rad=0.15)
    arrow(49.4, 7.5, 52.6, 7.5, f"{vit_dim}")
    arrow(62.4, 7.5, 65.6, 7.5)

    # fusion
    ax.add_patch(Circle((79, 20), 2.6, facecolor=colors["fuse"], edgecolor="0.35", linewidth=1.0))
    ax.text(79, 20, "+", ha="center", va="center", fontsize=16)
    arrow(73.4, 32.5, 77.6, 22.2, rad=-0.2)
    arrow(73.4, 7.5, 77.6, 17.8, f"× {alpha}", rad=0.2)
    ax.text(86.5, 11.5, r"$x_{2d} + $" + alpha + r"$\cdot residual_{3d}$", ha="center", va="top",
            fontsize=9)
    box(84, 16.5, 5.5, 7, "head\nLinear", "fuse")
    arrow(81.7, 20, 83.6, 20)
    box(93, 13.5, 5.5, 13, "18\nlabels\n(sigmoid,\nBCE)", "out")
    arrow(89.9, 20, 92.6, 20)

    ax.text(50, 39.3, "Residual 2D + 3D fusion: the 3D ViT refines a strong 2D baseline", ha="center",
            va="top", fontsize=11, fontweight="bold")
    ax.text(86.5, 7.5, f"{alpha} = 0: ResNet only\n{alpha} = 1: equal weights\nlearned {alpha}: a parameter",
            ha="center", va="top", fontsize=7.5, color="0.3", linespacing=1.4)
    return _finish(fig, path)


# ---------------------------------------------------------------------------------------------
# Figure 3: per-class AUROC with bootstrap intervals
# ---------------------------------------------------------------------------------------------
def plot_per_class_auroc(
    results: Mapping[str, pd.DataFrame],
    *,
    classes: Sequence[str] = CLASSES,
    include_macro: bool = True,
    title: str = "Per-class AUROC on the test set (95% bootstrap CI)",
    path: str | Path | None = None,
) -> Figure:
    """Figure 3: per-class AUROC of each model with confidence-interval error bars.

    Args:
        results: model name -> frame indexed by class (and ``"macro"``) with columns ``auroc``, ``low``,
            ``high`` and optionally ``n_pos`` (as ``per_class_auroc.csv`` / ``bootstrap_auroc``).
            NaN values (a class without positives in the test set) are left out.
        classes: the rows, top to bottom.
        include_macro: add the macro mean as the last row.
        title: figure title.
        path: where to save.
    """
    if not results:
        raise ValueError("results is empty: give model name -> per-class AUROC frame")
    for name, frame in results.items():
        missing = {"auroc", "low", "high"} - set(frame.columns)
        if missing:
            raise ValueError(f"results[{name!r}] lacks columns {sorted(missing)}")
    rows = list(classes) + (["macro"] if include_macro else [])
    first = next(iter(results.values()))
    labels = []
    for r in rows:
        lab = "Macro mean" if r == "macro" else r
        if "n_pos" in first.columns and r in first.index and r != "macro" and pd.notna(first.loc[r, "n_pos"]):
            lab = f"{lab} (n={int(first.loc[r, 'n_pos'])})"
        labels.append(lab)
    m = len(results)
    fig = _new_figure(8.0, 0.32 * len(rows) + 1.8)
    ax = fig.subplots()
    y = np.arange(len(rows))[::-1].astype(float)
    offsets = ((m - 1) / 2 - np.arange(m)) * (0.72 / max(m, 1))  # first model on top
    lowest = 1.0
    for j, (name, frame) in enumerate(results.items()):
        f = frame.reindex(rows)
        auc = f["auroc"].to_numpy(dtype=float)
        lo = f["low"].to_numpy(dtype=float)
        hi = f["high"].to_numpy(dtype=float)
        ok = np.isfinite(auc)
        if ok.any():
            lowest = min(lowest, float(np.nanmin(np.where(np.isfinite(lo), lo, auc)[ok])))
        err = np.vstack([np.where(np.isfinite(lo), auc - lo, 0.0), np.where(np.isfinite(hi), hi - auc, 0.0)])
        err = np.clip(err, 0.0, None)
        macro = f"{auc[-1]:.3f}" if include_macro and np.isfinite(auc[-1]) else "n/a"
        ax.errorbar(auc[ok], (y + offsets[j])[ok], xerr=err[:, ok], fmt="o", ms=4, capsize=2, lw=1,
                    color=_color(j), label=f"{name} (macro {macro})")
    ax.axvline(0.5, color="0.6", ls="--", lw=0.8)
    if include_macro:
        ax.axhline(0.5, color="0.8", lw=0.8)
    missing = np.all([~np.isfinite(f.reindex(rows)["auroc"].to_numpy(dtype=float)) for f in results.values()],
                     axis=0)
    for yi in y[missing]:
        ax.text(0.52, yi, "no AUROC (no test positives or no negatives)", va="center", ha="left",
                fontsize=7, color="0.55", style="italic")
    ax.set_yticks(y, labels)
    ax.set_xlim(max(-0.02, min(0.4, lowest - 0.05)), 1.02)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel("AUROC (dashed: chance)")
    ax.grid(axis="x", color="0.92")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.07), ncols=1 if m > 3 else m, frameon=False)
    ax.set_title(title)
    return _finish(fig, path)


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
    fig = _new_figure(6.4, 5.2)
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
    return _finish(fig, path)


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
    fig = _new_figure(1.9 * ncols + 1.4, 1.85 * nrows + 0.35 * len(cases))
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
                _imshow_ct(ax, ct[s], normalized_range)
                if m is not None:
                    mm = np.clip(np.asarray(m, dtype=np.float32)[s], 0.0, 1.0)
                    ax.imshow(mm, cmap=cmap, vmin=0, vmax=1, alpha=max_alpha * mm)
                if r == 0:
                    ax.set_title(f"{case.title}\nslice {s}" if c == 0 else f"\nslice {s}", fontsize=8,
                                 loc="left" if c == 0 else "center")
                if c == 0:
                    ax.set_ylabel(_wrap(name, 14), fontsize=8)
        row += len(block)
    sm = mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(0, 1), cmap=cmap)
    cb = fig.colorbar(sm, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01, shrink=0.5)
    cb.set_label("saliency (0 to 1 per volume)")
    return _finish(fig, path)


# ---------------------------------------------------------------------------------------------
# training curves and alpha
# ---------------------------------------------------------------------------------------------
def plot_learning_curves(
    histories: Mapping[str, pd.DataFrame],
    *,
    path: str | Path | None = None,
) -> Figure:
    """Train (dashed) and validation (solid) loss per epoch, and validation AUROC, one colour per run.

    Args:
        histories: run name -> ``history.csv`` frame (columns epoch, train_loss, val_loss, optional
            val_auroc).
    """
    if not histories:
        raise ValueError("no histories to plot")
    has_auc = any("val_auroc" in h.columns for h in histories.values())
    fig = _new_figure(10 if has_auc else 5.5, 3.6)
    axes = fig.subplots(1, 2 if has_auc else 1, squeeze=False)[0]
    for j, (name, h) in enumerate(histories.items()):
        missing = {"epoch", "train_loss", "val_loss"} - set(h.columns)
        if missing:
            raise ValueError(f"history of {name!r} lacks columns {sorted(missing)}")
        marker = "o" if len(h) <= 30 else None
        axes[0].plot(h["epoch"], h["train_loss"], ls="--", color=_color(j), marker=marker, ms=3)
        axes[0].plot(h["epoch"], h["val_loss"], ls="-", color=_color(j), marker=marker, ms=3, label=name)
        if has_auc and "val_auroc" in h.columns:
            axes[1].plot(h["epoch"], h["val_auroc"], color=_color(j), marker=marker, ms=3, label=name)
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("BCE loss")
    axes[0].set_title("Loss (dashed: train, solid: validation)")
    axes[0].legend(frameon=False)
    for ax in axes:
        ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
        ax.grid(color="0.93")
    if has_auc:
        axes[1].axhline(0.5, color="0.6", ls="--", lw=0.8)
        axes[1].set_xlabel("epoch")
        axes[1].set_ylabel("macro AUROC")
        axes[1].set_title("Validation AUROC")
    return _finish(fig, path)


def plot_alpha_trajectory(
    history: pd.DataFrame | Mapping[str, pd.DataFrame],
    *,
    initial: float | None = None,
    fixed: Sequence[float] = (),
    path: str | Path | None = None,
) -> Figure:
    """The learned alpha after each epoch (``history.csv``'s ``alpha``), with the fixed alphas for scale.

    Args:
        history: a history frame, or run name -> frame.
        initial: alpha before training (the profile's ``alpha_init``), drawn at epoch 0.
        fixed: alpha values of the fixed-alpha runs, drawn as faint horizontal lines.
    """
    runs = {"learned alpha": history} if isinstance(history, pd.DataFrame) else dict(history)
    fig = _new_figure(5.5, 3.4)
    ax = fig.subplots()
    for a in fixed:
        ax.axhline(float(a), color="0.85", lw=0.8, zorder=0)
        ax.text(1.0, float(a), f" α={float(a):g}", transform=ax.get_yaxis_transform(), va="center",
                fontsize=7, color="0.5")
    for j, (name, h) in enumerate(runs.items()):
        if "alpha" not in h.columns or "epoch" not in h.columns:
            raise ValueError(f"history of {name!r} needs columns epoch and alpha")
        ep = h["epoch"].to_numpy(dtype=float)
        al = h["alpha"].to_numpy(dtype=float)
        if initial is not None:
            ep, al = np.r_[0.0, ep], np.r_[float(initial), al]
        ax.plot(ep, al, marker="o", ms=4, color=_color(j), label=name)
    ax.set_xlabel("epoch (0 = initial value)" if initial is not None else "epoch")
    ax.set_ylabel("α (weight of the 3D residual)")
    ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
    ax.set_title("Learned α during training")
    ax.grid(color="0.93")
    if len(runs) > 1:
        ax.legend(frameon=False)
    return _finish(fig, path)


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
    fig = _new_figure(9.5, 8.2)
    ax = fig.subplots()
    with mpl.rc_context(STYLE):
        sns.heatmap(pd.DataFrame(cond, index=names, columns=names), ax=ax, cmap="mako_r", vmin=0, vmax=1,
                    annot=both, fmt="d", annot_kws={"fontsize": 6}, square=True, linewidths=0.3,
                    linecolor="white", cbar_kws={"label": "P(column class | row class)", "shrink": 0.7})
    ax.set_xticklabels(names, rotation=60, ha="right")
    ax.set_title(f"Label co-occurrence (N = {len(y)} volumes; numbers: volumes with both)")
    return _finish(fig, path)


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
    fig = _new_figure(7.0, 3.8)
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
        ax.step(centers, np.maximum(dens, 1e-9), where="mid", color=_color(j), lw=1.2,
                label=f"{name} ({v.size:,} voxels)")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(bottom=1e-7)
    ax.set_xlabel("HU")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=7, loc="upper right")
    return _finish(fig, path)


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
    fig = _new_figure(7.5, 0.3 * len(classes) + 1.3)
    ax = fig.subplots()
    y = np.arange(len(classes))[::-1].astype(float)
    h = 0.38 if paper is not None else 0.7
    ax.barh(y + (h / 2 if paper is not None else 0), share_ours.to_numpy(), height=h, color=_color(0),
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
    return _finish(fig, path)


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
def plot_metrics_vs_alpha(
    ours: pd.DataFrame,
    paper: pd.DataFrame | None = None,
    *,
    metrics: Sequence[str] = ("auroc", "accuracy", "precision", "recall"),
    path: str | Path | None = None,
) -> Figure:
    """Table 3 as lines: each metric against alpha, ours (solid) and the paper's (dashed).

    Args:
        ours: index alpha labels (``"0.0"`` ... ``"1.0"``, ``"learned"``), one column per metric.
        paper: the paper's Table 3 in the same form, or None.
    """
    labels = [str(a) for a in ours.index]
    x = np.arange(len(labels))
    numeric = np.array([_is_number(a) for a in labels])
    fig = _new_figure(2.6 * len(metrics), 3.2)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, m in zip(axes, metrics, strict=True):
        if m not in ours.columns:
            raise ValueError(f"ours lacks metric column {m!r}")
        # Fixed alphas are joined by lines; "learned" stands apart (it is not a point on the alpha axis).
        series = [("ours", ours[m].to_numpy(dtype=float), "o", "-", _color(0))]
        if paper is not None and m in paper.columns:
            series.append(("paper", paper.reindex(labels)[m].to_numpy(dtype=float), "s", "--", "0.5"))
        for name, vals, marker, ls, color in series:
            ax.plot(x[numeric], vals[numeric], marker=marker, ls=ls, color=color, label=name)
            ax.plot(x[~numeric], vals[~numeric], marker=marker, ls="none", color=color)
        ax.set_xticks(x, labels, rotation=30)
        ax.set_xlabel("α")
        ax.set_title(m)
        ax.set_ylim(0, 1.02)
        ax.grid(color="0.93")
    axes[0].legend(frameon=False)
    return _finish(fig, path)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def plot_metric_comparison(
    ours: pd.DataFrame,
    paper: pd.DataFrame | None = None,
    *,
    metrics: Sequence[str] = ("auroc", "accuracy", "precision", "recall"),
    title: str = "Test metrics (threshold 0.5)",
    path: str | Path | None = None,
) -> Figure:
    """Table 2 as grouped bars: one group per metric, one bar per model, the paper's values as ticks.

    Args:
        ours: index model names, columns metrics.
        paper: same layout (rows matched by name), or None.
    """
    models = list(ours.index)
    fig = _new_figure(7.0, 3.4)
    ax = fig.subplots()
    x = np.arange(len(metrics))
    w = 0.8 / max(len(models), 1)
    for j, name in enumerate(models):
        vals = [float(ours.loc[name, m]) for m in metrics]
        pos = x - 0.4 + w * (j + 0.5)
        bars = ax.bar(pos, vals, width=w * 0.95, color=_color(j), label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1, color="0.3")
        if paper is not None and name in paper.index:
            pv = [float(paper.loc[name, m]) if m in paper.columns else np.nan for m in metrics]
            ax.scatter(pos, pv, marker="_", s=250, color="black", zorder=3,
                       label="paper" if j == 0 else None)
    ax.set_axisbelow(True)
    ax.set_xticks(x, metrics)
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", color="0.93")
    ax.legend(frameon=False, ncols=min(len(models) + 1, 4), loc="lower left", bbox_to_anchor=(0, 1.0))
    ax.set_title(title, loc="left", pad=22)
    return _finish(fig, path)


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
    fig = _new_figure(1.9 * ncols, 2.25 * len(images))
    axes = fig.subplots(len(images), ncols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for i, (row, caps) in enumerate(zip(images, titles, strict=True)):
        for j, (img, cap) in enumerate(zip(row, caps, strict=True)):
            ax = axes[i, j]
            ax.set_axis_on()
            _imshow_ct(ax, img, normalized_range)
            ax.set_title(cap, fontsize=6.5)
            if j == 0:
                for spine in ax.spines.values():
                    spine.set_visible(True)
                    spine.set_color(_color(1))
                    spine.set_linewidth(2.5)
    return _finish(fig, path)


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------
def _md_cell(value: Any, floatfmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "✓" if value else ""
    if isinstance(value, (float, np.floating)):
        if math.isnan(float(value)):
            return "n/a"
        return format(float(value), floatfmt)
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(
    df: pd.DataFrame,
    path: str | Path | None = None,
    *,
    floatfmt: str = ".3f",
    index: bool = True,
) -> str:
    """A GitHub Markdown table of ``df`` (no ``tabulate`` needed); written to ``path`` when given.

    Numeric columns are right-aligned, others left-aligned; floats use ``floatfmt``, NaN shows as
    ``n/a``, booleans as ``✓`` or blank (the paper's 2D/3D columns), ``|`` is escaped.
    """
    frame = df.reset_index() if index else df
    if index and frame.columns[0] == "index" and df.index.name is None:
        frame = frame.rename(columns={"index": ""})
    header = [str(c) for c in frame.columns]
    aligns = []
    for col in frame.columns:
        kind = frame[col].dtype.kind
        aligns.append("---:" if kind in "iuf" else ":---")
    lines = [
        "| " + " | ".join(h.replace("|", "\\|") for h in header) + " |",
        "|" + "|".join(aligns) + "|",
    ]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(_md_cell(v, floatfmt) for v in row) + " |")
    text = "\n".join(lines) + "\n"
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return text


def run_summary(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """One run's test metrics (``metrics.json``) as a table: one row per threshold rule.

    Rows: ``threshold 0.5``, ``thresholds tuned on validation``, ``CT-CLIP protocol (fitted on test)``
    (optimistic, for comparison with published CT-RATE numbers only; its F1 is support-weighted and
    it reports no recall). Columns: auroc, auroc_low, auroc_high (95% bootstrap interval), accuracy,
    precision, recall, f1. Missing entries are NaN.
    """
    keys = ("auroc", "accuracy", "precision", "recall", "f1")
    ci = metrics.get("auroc_ci") or [np.nan, np.nan]

    def row(d: Mapping[str, Any] | None, f1_key: str = "f1") -> list[float]:
        d = d or {}
        vals = {k: d.get(k, np.nan) for k in keys}
        vals["f1"] = d.get(f1_key, np.nan)
        return [float(np.nan if vals[k] is None else vals[k]) for k in keys]

    rows = {
        "threshold 0.5": row(metrics),
        "thresholds tuned on validation": row(metrics.get("val_tuned")),
        "CT-CLIP protocol (fitted on test)": row(metrics.get("ctclip"), "f1_weighted"),
    }
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=list(keys))
    frame.insert(1, "auroc_low", float(ci[0]) if ci[0] is not None else np.nan)
    frame.insert(2, "auroc_high", float(ci[1]) if ci[1] is not None else np.nan)
    frame.index.name = "rule"
    return frame


def save_table(df: pd.DataFrame, stem: str | Path, *, floatfmt: str = ".3f", index: bool = True) -> tuple[Path, Path]:
    """Writes ``df`` as ``<stem>.csv`` (full precision) and ``<stem>.md``; returns both paths."""
    stem = Path(stem)
    if stem.suffix in (".csv", ".md"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    df.to_csv(csv_path, index=index)
    to_markdown(df, md_path, floatfmt=floatfmt, index=index)
    return csv_path, md_path
