"""Scoring saliency maps against known lesions: the pointing game and the mass inside the lesion.

The paper reads Figure 5 as "localised vs diffuse" attention. On the synthetic data the generator knows
where each lesion is, so that reading becomes numbers. Every function takes a map and a mask on the
same grid: ``saliency`` (S, H, W) (any non-negative scale; it is normalised with
:func:`ctlib.attention.as_distribution`, the one normalisation for every model) and ``mask`` bool
(S, H, W), the lesion in the model-input frame.

- :func:`pointing_game`: is the map's maximum inside the lesion (or within ``tolerance`` voxels of it)?
- :func:`mass_fraction`: the share of the map's mass inside the lesion.
- :func:`random_baseline`: what a uniformly random map scores in expectation: the pointing game hits
  with probability (voxels within tolerance of the lesion) / (all voxels), and its expected mass
  fraction is the lesion's share of the volume.
- :func:`shifted_baseline`: an empirical baseline that keeps the map's own shape (smoothness, blob
  size): the mean scores of the same map circularly shifted to random places in the volume.
- :func:`localisation_scores`: all of the above for one (map, mask) pair.
- :func:`score_maps` / :func:`localisation_table`: every positive class of every volume, for any map
  methods (e.g. ``attention.vit_relevance``, ``attention.gradcam_resnet``), then one table per class:
  model, method, pointing-game hit rate, its random baseline, mass fraction, its random baseline, n.

A score above its baseline means the map points at the lesion more than chance; a diffuse map scores
near the baseline, a map on the lesion near 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.ndimage import binary_dilation
from tqdm.auto import tqdm

from ctlib.attention import as_distribution
from ctlib.data import CLASSES

__all__ = ["localisation_scores", "localisation_table", "mass_fraction", "pointing_game", "random_baseline",
           "score_maps", "shifted_baseline"]

#: A map method: (volume (S, H, W), class index) -> saliency (S, H, W) on the same grid.
MapMethod = Callable[[np.ndarray, int], np.ndarray]


def _check(saliency: Any, mask: Any) -> tuple[np.ndarray, np.ndarray]:
    sal = as_distribution(saliency)
    m = np.asarray(mask)
    if m.dtype != bool:
        raise ValueError(f"mask must be bool (S, H, W), got dtype {m.dtype}")
    if m.shape != sal.shape:
        raise ValueError(f"mask {m.shape} and saliency {sal.shape} must be on the same (S, H, W) grid")
    if not m.any():
        raise ValueError("mask is empty: no lesion to point at")
    return sal, m


def _within(mask: np.ndarray, tolerance: int) -> np.ndarray:
    """Voxels within ``tolerance`` voxels of the mask (Chebyshev distance: a (2k+1)^3 cube)."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 voxels, got {tolerance}")
    if tolerance == 0:
        return mask
    return binary_dilation(mask, structure=np.ones((3, 3, 3), dtype=bool), iterations=int(tolerance))


def _pointing(sal: np.ndarray, target: np.ndarray) -> float:
    top = sal == sal.max()
    return float(target[top].mean())  # ties: the chance that a random pick among the maxima hits


def pointing_game(saliency: Any, mask: Any, *, tolerance: int = 0) -> float:
    """1.0 if the map's maximum lies in the lesion (or within ``tolerance`` voxels of it), else 0.0.

    Tied maxima count by the fraction of them that hit (the expected score of breaking the tie at
    random), so a constant map scores exactly the lesion's share of the volume.

    Args:
        saliency: (S, H, W) map, >= 0.
        mask: bool (S, H, W) lesion.
        tolerance: voxels of slack around the lesion (Chebyshev distance over slices, rows, columns).
    """
    sal, m = _check(saliency, mask)
    return _pointing(sal, _within(m, tolerance))


def mass_fraction(saliency: Any, mask: Any) -> float:
    """Share of the map's mass inside the lesion: (S, H, W) map and bool mask -> float in [0, 1]."""
    sal, m = _check(saliency, mask)
    return float(sal[m].sum())


def random_baseline(mask: Any, *, tolerance: int = 0) -> dict[str, float]:
    """Expected scores of a uniformly random map (i.i.d. voxel values) for this lesion.

    Returns:
        ``{"pointing": share of voxels within tolerance of the lesion, "mass": the lesion's share of
        the volume}``.
    """
    m = np.asarray(mask)
    if m.dtype != bool or m.ndim != 3 or not m.any():
        raise ValueError(f"mask must be a non-empty bool (S, H, W) array, got {m.dtype} {m.shape}")
    return {"pointing": float(_within(m, tolerance).mean()), "mass": float(m.mean())}


def shifted_baseline(saliency: Any, mask: Any, *, tolerance: int = 0, n_shifts: int = 100,
                     seed: int = 0) -> dict[str, float]:
    """Mean scores of the same map circularly shifted by random offsets along (S, H, W).

    Keeps the map's shape (a smooth blob stays a blob of the same size) and moves it at random, so it
    answers "would this map score as well anywhere?" where :func:`random_baseline` assumes no shape.

    Returns:
        ``{"pointing": mean hit rate, "mass": mean mass fraction}`` over ``n_shifts`` shifts.
    """
    sal, m = _check(saliency, mask)
    if n_shifts < 1:
        raise ValueError(f"n_shifts must be >= 1, got {n_shifts}")
    target = _within(m, tolerance)
    rng = np.random.default_rng(seed)
    hits, mass = [], []
    for _ in range(n_shifts):
        shift = tuple(int(rng.integers(0, n)) for n in sal.shape)
        moved = np.roll(sal, shift, axis=(0, 1, 2))
        hits.append(_pointing(moved, target))
        mass.append(float(moved[m].sum()))
    return {"pointing": float(np.mean(hits)), "mass": float(np.mean(mass))}


def localisation_scores(saliency: Any, mask: Any, *, tolerance: int = 0, n_shifts: int = 0,
                        seed: int = 0) -> dict[str, float]:
    """Pointing game and mass fraction of one map for one lesion, each beside its random baseline.

    Returns:
        ``pointing``, ``pointing_random``, ``mass``, ``mass_random`` (see :func:`random_baseline`);
        with ``n_shifts > 0`` also ``pointing_shifted`` and ``mass_shifted`` (:func:`shifted_baseline`).
    """
    base = random_baseline(mask, tolerance=tolerance)
    out = {
        "pointing": pointing_game(saliency, mask, tolerance=tolerance),
        "pointing_random": base["pointing"],
        "mass": mass_fraction(saliency, mask),
        "mass_random": base["mass"],
    }
    if n_shifts > 0:
        shifted = shifted_baseline(saliency, mask, tolerance=tolerance, n_shifts=n_shifts, seed=seed)
        out["pointing_shifted"], out["mass_shifted"] = shifted["pointing"], shifted["mass"]
    return out


def score_maps(
    cases: Iterable[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
    methods: Mapping[str, MapMethod],
    *,
    model: str,
    classes: Sequence[str] = CLASSES,
    tolerance: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Scores every method's map for every class a volume is positive for and has a lesion mask of.

    Args:
        cases: (volume name, volume (S, H, W) as the model sees it, labels (C,) 0/1, lesion masks bool
            (C, S, H, W) in the same frame) per volume.
        methods: method name -> map function (volume, class index) -> (S, H, W).
        model: the model's name, a column of the result.
        classes: class names (label and mask order).
        tolerance: pointing-game slack in voxels.
        progress: a progress bar over the volumes.

    Returns:
        One row per (volume, class, method): ``volume``, ``class``, ``model``, ``method``, ``pointing``,
        ``pointing_random``, ``mass``, ``mass_random``.
    """
    rows = []
    for name, volume, labels, masks in tqdm(cases, desc=f"scoring {model}", disable=not progress, leave=False):
        masks = np.asarray(masks, dtype=bool)
        if masks.shape[0] != len(classes) or masks.shape[1:] != np.shape(volume):
            raise ValueError(f"{name}: masks must be ({len(classes)}, *{np.shape(volume)}), got {masks.shape}")
        for k in np.flatnonzero(np.asarray(labels).reshape(-1) > 0):
            if not masks[k].any():
                continue  # positive, but no lesion in the model's field of view
            for method, fn in methods.items():
                scores = localisation_scores(fn(volume, int(k)), masks[k], tolerance=tolerance)
                rows.append({"volume": name, "class": classes[k], "model": model, "method": method, **scores})
    columns = ["volume", "class", "model", "method", "pointing", "pointing_random", "mass", "mass_random"]
    return pd.DataFrame(rows, columns=columns)


def localisation_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Means per (class, model, method) of :func:`score_maps` rows.

    Returns:
        DataFrame indexed by (``class``, ``model``, ``method``) with columns ``pointing`` (hit rate),
        ``pointing_random``, ``mass`` (mean mass fraction), ``mass_random`` (means of the per-volume
        random baselines) and ``n`` (volumes scored).
    """
    keys = ["class", "model", "method"]
    grouped = scores.groupby(keys, sort=False)
    table = grouped[["pointing", "pointing_random", "mass", "mass_random"]].mean()
    table["n"] = grouped.size()
    return table
