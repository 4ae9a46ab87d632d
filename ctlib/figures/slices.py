"""Figure 1 (representative slices), a slice montage and an interactive slice viewer."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ctlib.data import CLASSES
from ctlib.figures.style import (
    finish,
    imshow_ct,
    new_figure,
    wrap,
)
from ctlib.preprocess import Preprocessing


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
    lesion: np.ndarray | None = field(default=None, repr=False)  # (H, W) bool: the drawn lesion, if known


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
    lesion: Callable[[int, str], np.ndarray | None] | None = None,
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
        lesion: where the truth is known (the synthetic data's sidecar), ``lesion(i, cls) -> (S, H, W)``
            bool mask of that class's signature in volume ``i`` (or None). Then the slice is the one
            through the lesion (largest cross-section), the candidate with the largest visible
            cross-section wins, and the mask's slice is kept in ``SliceExample.lesion``; candidates
            whose lesion lies outside the kept slices fall back to the search above.

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
        if lesion is not None:
            best = _on_lesion(cls, pos, get, lesion, names, count)
        for i in ([] if best is not None else pos):
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


def _on_lesion(cls: str, candidates: Sequence[int], get: Callable[[int], np.ndarray],
               lesion: Callable[[int, str], np.ndarray | None], names: Sequence[str] | None,
               count: np.ndarray) -> SliceExample | None:
    """The candidate whose known lesion shows the largest cross-section in one slice, on that slice."""
    best: SliceExample | None = None
    for i in candidates:
        mask = lesion(i, cls)
        if mask is None or not mask.any():
            continue
        vol = get(i)
        if mask.shape != vol.shape:
            raise ValueError(f"lesion mask of volume {i} has shape {mask.shape}, the volume {vol.shape}")
        area = mask.sum(axis=(1, 2))
        s = int(np.argmax(area))
        if best is None or area[s] > best.score:
            best = SliceExample(cls=cls, index=int(i), slice=s, score=float(area[s]), image=vol[s],
                                difference=np.zeros_like(vol[s]), name="" if names is None else str(names[i]),
                                n_labels=int(count[i]), lesion=mask[s].copy())
    return best


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
        mask = None
        if ex.lesion is not None:  # nearest neighbour, so that the outline stays the drawn lesion's
            rows = np.minimum((np.arange(img.shape[0]) / scale[0]).astype(int), ex.lesion.shape[0] - 1)
            cols = np.minimum((np.arange(img.shape[1]) / scale[1]).astype(int), ex.lesion.shape[1] - 1)
            mask = ex.lesion[np.ix_(rows, cols)]
        out.append(SliceExample(cls=ex.cls, index=ex.index, slice=ex.slice, score=ex.score, image=img,
                                difference=diff, name=ex.name, n_labels=ex.n_labels, lesion=mask))
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
    fig = new_figure(2.1 * ncols, 2.35 * blocks * rows_per + 0.4)
    axes = fig.subplots(blocks * rows_per, ncols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for j, ex in enumerate(examples):
        b, c = divmod(j, ncols)
        ax = axes[b * rows_per, c]
        ax.set_axis_on()
        imshow_ct(ax, ex.image, normalized_range)
        if ex.lesion is not None and ex.lesion.any():
            ax.contour(ex.lesion.astype(float), levels=[0.5], colors="#ffd400", linewidths=0.7)
        label = f"{ex.name or f'volume {ex.index}'}, slice {ex.slice}, {ex.n_labels} label{'s' * (ex.n_labels != 1)}"
        ax.set_title(f"{wrap(ex.cls, 22)}\n", fontsize=9, fontweight="bold")
        ax.text(0.5, 1.01, label, transform=ax.transAxes, ha="center", va="bottom", fontsize=6.5,
                color="0.3")
        if show_difference:
            ax2 = axes[b * rows_per + 1, c]
            ax2.set_axis_on()
            imshow_ct(ax2, ex.image, normalized_range)
            # One scale for every panel: fully opaque from `difference_hu` HU on, so noise stays faint.
            scale = 1.0 if normalized_range is None else max(abs(float(v)) for v in normalized_range)
            d = np.clip(ex.difference * scale / difference_hu, 0.0, 1.0)
            ax2.imshow(d, cmap="inferno", vmin=0, vmax=1, alpha=0.75 * d)
            ax2.set_title("differs from the closest normal slice", fontsize=6.5, color="0.3")
    fig.suptitle("Representative slices (lung window)")
    return finish(fig, path)


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
    fig = new_figure(1.5 * ncols, 1.6 * nrows + (0.4 if title else 0))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, s in zip(axes.ravel(), picks, strict=False):
        ax.set_axis_on()
        imshow_ct(ax, vol[s], normalized_range)
        ax.set_title(f"slice {s}", fontsize=7)
    if title:
        fig.suptitle(title)
    return finish(fig, path)


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
        fig = new_figure(4, 4.2)
        ax = fig.subplots()
        imshow_ct(ax, vol[s], normalized_range)
        ax.set_title(f"{volume}\nslice {s}/{vol.shape[0] - 1}", fontsize=8)
        display(fig)

    def on_volume(change: dict) -> None:
        slider.max = arrays[change["new"]].shape[0] - 1

    choice.observe(on_volume, names="value")
    return widgets.interactive(show, volume=choice, slice=slider)
