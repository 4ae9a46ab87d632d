"""Comparing models on the same test volumes: paired bootstrap differences and per-group AUROC.

Two models' separate 95% intervals that overlap are not a test of whether one is better: their errors
are correlated (same volumes, same hard cases). Here both models are scored on the *same* resamples
of test patients, and the interval is that of the difference (paper section 5's comparisons: fusion -
ResNet in Table 2; each alpha - alpha 0 and learned - alpha 0 in Table 3).

- :func:`group_auroc`: macro AUROC over all classes and over each class group (e.g. ``{"2D": [...],
  "3D": [...]}``, the shape of ``ctlib.synthetic.class_groups()``), with percentile bootstrap intervals.
- :func:`paired_bootstrap_auroc`: the difference in macro AUROC (all classes and per group) between
  two models' probabilities for the same labels, its interval and a one-sided bootstrap p.
- :func:`check_paired` / :func:`compare_predictions`: the same, read from two ``predictions.csv``
  files after checking that they hold the same volumes in the same order with the same labels.

Resampling draws test *patients* with replacement (a drawn patient brings all of their volumes), with
the same random numbers as :func:`ctlib.metrics.bootstrap_auroc` for the same seed. A resample's macro
AUROC is the mean over the classes it can score (both labels present); within a resample both models
are scored over the same classes, since that depends on the labels only.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ctlib.data import CLASSES, parse_volume_name
from ctlib.metrics import auroc_rank, auroc_weighted, bootstrap_counts, check_arrays, has_both_labels
from ctlib.runs import read_predictions
from ctlib.synthetic.signatures import class_groups

__all__ = [
    "check_paired",
    "seed_mean_paired_auroc",
    "slope",
    "class_groups_for",
    "compare_predictions",
    "group_auroc",
    "paired_bootstrap_auroc",
    "patients_of",
]

#: Row of the result tables holding the macro over every class.
ALL = "all"

PredictionSource = str | os.PathLike[str] | pd.DataFrame


def class_groups_for(data_root: str | os.PathLike[str] | None) -> dict[str, list[str]] | None:
    """The 2D/3D class groups when the data are the synthetic snapshot, else None (with a printed note).

    On CT-RATE (``data_root`` given) nothing says which class needs 3D context, so there are no groups.
    On the synthetic snapshot the groups come from ``ctlib.synthetic.class_groups()`` (each class's
    ``needs_3d`` flag).
    """
    if data_root is not None:
        print("CT-RATE data: no 2D/3D class groups (they exist for the synthetic data only); overall rows only")
        return None
    return {str(k): list(v) for k, v in class_groups().items()}


def patients_of(names: Sequence[str]) -> np.ndarray:
    """(N,) CT-RATE volume names (``train_1_a_2.nii.gz``) -> (N,) patient ids (``train_1``)."""
    return np.array([parse_volume_name(str(n))["patient"] for n in names])


def _resample_weights(n: int, patients: Sequence[Any] | np.ndarray | None, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) float weights: how often each volume is in each resample (patients as clusters).

    Draws the same random numbers as :func:`ctlib.metrics.bootstrap_auroc` for the same seed.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    if patients is None:
        return bootstrap_counts(rng, n, n_boot).astype(np.float64)
    g = np.asarray(patients)
    if g.shape != (n,):
        raise ValueError(f"patients must have shape ({n},), one patient per volume, got {g.shape}")
    _, unit_of = np.unique(g, return_inverse=True)
    unit_counts = bootstrap_counts(rng, int(unit_of.max()) + 1, n_boot)
    return unit_counts[:, unit_of].astype(np.float64)  # every volume of a patient, as often


def _class_sets(groups: Mapping[str, Sequence[str]] | None, classes: Sequence[str]) -> dict[str, np.ndarray]:
    """``{"all": every column, <group>: its columns}``; raises ValueError on unknown or no classes."""
    sets = {ALL: np.arange(len(classes))}
    for name, members in (groups or {}).items():
        if name == ALL:
            raise ValueError(f"class group name {ALL!r} is reserved for the macro over every class")
        unknown = [c for c in members if c not in classes]
        if unknown:
            raise ValueError(f"class group {name!r} names unknown classes {unknown}")
        if not members:
            raise ValueError(f"class group {name!r} is empty")
        sets[str(name)] = np.array([classes.index(c) for c in members])
    return sets


def _boot_per_class(y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(N, C) labels and probs, (B, N) weights -> (B, C) AUROC per resample, NaN where unscorable."""
    boot = np.full((weights.shape[0], y.shape[1]), np.nan)
    for k in np.flatnonzero(has_both_labels(y)):
        boot[:, k] = auroc_weighted(y[:, k], p[:, k], weights)
    return boot


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():  # an all-NaN slice (nothing scorable) is NaN, silently
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def _percentiles(values: np.ndarray, ci: float) -> tuple[float, float, int]:
    v = values[~np.isnan(values)]
    if v.size == 0:
        return math.nan, math.nan, 0
    lo_q, hi_q = 50.0 * (1.0 - ci), 50.0 * (1.0 + ci)
    return float(np.percentile(v, lo_q)), float(np.percentile(v, hi_q)), int(v.size)


def _check_ci(ci: float) -> None:
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")


def group_auroc(
    labels: Any,
    probs: Any,
    groups: Mapping[str, Sequence[str]] | None = None,
    patients: Sequence[Any] | np.ndarray | None = None,
    *,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    classes: Sequence[str] = CLASSES,
) -> pd.DataFrame:
    """Macro AUROC over every class and over each class group, with percentile bootstrap intervals.

    Args:
        labels: (N, C) 0/1.
        probs: (N, C) probabilities.
        groups: group name -> its class names (e.g. ``{"2D": [...], "3D": [...]}``), or None.
        patients: (N,) patient of each volume, the resampling unit; None resamples volumes.
        n_boot: resamples.
        ci: coverage of the interval.
        seed: seed of ``numpy.random.default_rng``.
        classes: class names (column order).

    Returns:
        DataFrame indexed by ``group`` (``"all"``, then each group in order) with columns ``auroc``
        (macro on all data over the classes it can score), ``auroc_low``, ``auroc_high``,
        ``n_classes`` (classes scored on all data), ``n_pos`` (positive labels of the group) and
        ``n_resamples`` (resamples with a value).
    """
    classes = tuple(classes)
    _check_ci(ci)
    y, p = check_arrays(labels, probs, classes)
    sets = _class_sets(groups, classes)
    boot = _boot_per_class(y, p, _resample_weights(y.shape[0], patients, n_boot, seed))
    point = auroc_rank(y, p)
    rows = []
    for name, idx in sets.items():
        low, high, used = _percentiles(_nanmean(boot[:, idx], axis=1), ci)
        scored = int(np.isfinite(point[idx]).sum())
        value = float(np.nanmean(point[idx])) if scored else math.nan
        rows.append((name, value, low, high, scored, int(y[:, idx].sum()), used))
    frame = pd.DataFrame(rows, columns=["group", "auroc", "auroc_low", "auroc_high", "n_classes", "n_pos",
                                        "n_resamples"])
    return frame.set_index("group")


def paired_bootstrap_auroc(
    labels: Any,
    probs_a: Any,
    probs_b: Any,
    patients: Sequence[Any] | np.ndarray | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
    *,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    classes: Sequence[str] = CLASSES,
) -> pd.DataFrame:
    """Paired bootstrap of macro AUROC(A) - AUROC(B) on the same volumes, over the same resamples.

    Args:
        labels: (N, C) 0/1, the labels both models were scored against.
        probs_a: (N, C) model A's probabilities, rows the same volumes as ``labels``.
        probs_b: (N, C) model B's probabilities, same rows.
        patients: (N,) patient of each volume (clusters resampled whole); None resamples volumes.
        groups: group name -> class names, for per-group rows; None: only ``"all"``.
        n_boot: resamples.
        ci: coverage of the interval.
        seed: seed of ``numpy.random.default_rng``.
        classes: class names (column order).

    Returns:
        DataFrame indexed by ``group`` (``"all"``, then each group) with columns ``auroc_a``,
        ``auroc_b`` (macro on all data), ``diff`` (= auroc_a - auroc_b), ``diff_low``, ``diff_high``
        (percentile interval of the resampled differences), ``p_boot`` (fraction of resamples with
        difference <= 0: a one-sided bootstrap p for "A is better than B"), ``n_classes`` and
        ``n_resamples``.
    """
    classes = tuple(classes)
    _check_ci(ci)
    y, pa = check_arrays(labels, probs_a, classes, what="model A")
    _, pb = check_arrays(labels, probs_b, classes, what="model B")
    sets = _class_sets(groups, classes)
    weights = _resample_weights(y.shape[0], patients, n_boot, seed)
    boot_a, boot_b = _boot_per_class(y, pa, weights), _boot_per_class(y, pb, weights)
    point_a, point_b = auroc_rank(y, pa), auroc_rank(y, pb)
    rows = []
    for name, idx in sets.items():
        diffs = _nanmean(boot_a[:, idx], axis=1) - _nanmean(boot_b[:, idx], axis=1)
        low, high, used = _percentiles(diffs, ci)
        valid = diffs[~np.isnan(diffs)]
        p_boot = float(np.mean(valid <= 0.0)) if valid.size else math.nan
        scored = int(np.isfinite(point_a[idx]).sum())
        a = float(np.nanmean(point_a[idx])) if scored else math.nan
        b = float(np.nanmean(point_b[idx])) if scored else math.nan
        rows.append((name, a, b, a - b, low, high, p_boot, scored, used))
    frame = pd.DataFrame(rows, columns=["group", "auroc_a", "auroc_b", "diff", "diff_low", "diff_high", "p_boot",
                                        "n_classes", "n_resamples"])
    return frame.set_index("group")


def seed_mean_paired_auroc(
    labels: Any,
    pairs: Sequence[tuple[Any, Any]],
    patients: Sequence[Any] | np.ndarray | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
    *,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    classes: Sequence[str] = CLASSES,
) -> pd.DataFrame:
    """The mean over training seeds of a paired difference, macro AUROC(A_s) - AUROC(B_s), on one test set.

    Every seed's pair of models scored the same volumes; each resample of test patients is applied to every
    pair at once, so the interval is that of the seed-mean difference over test sampling (the spread between
    seeds is each pair's own business: report the per-seed differences beside it).

    Args:
        labels: (N, C) 0/1.
        pairs: per seed, (probs of A, probs of B), each (N, C), rows the same volumes as ``labels``.
        patients, groups, n_boot, ci, seed, classes: as :func:`paired_bootstrap_auroc`.

    Returns:
        DataFrame indexed by ``group`` with columns ``diff`` (mean over seeds on all data), ``diff_low``,
        ``diff_high``, ``p_boot`` (fraction of resamples with a mean difference <= 0), ``n_seeds``.
    """
    classes = tuple(classes)
    _check_ci(ci)
    if not pairs:
        raise ValueError("no (A, B) pairs to compare")
    sets = _class_sets(groups, classes)
    weights = None
    diffs: dict[str, list[np.ndarray]] = {name: [] for name in sets}
    points: dict[str, list[float]] = {name: [] for name in sets}
    for k, (pa, pb) in enumerate(pairs):
        y, pa = check_arrays(labels, pa, classes, what=f"model A of pair {k}")
        _, pb = check_arrays(labels, pb, classes, what=f"model B of pair {k}")
        if weights is None:
            weights = _resample_weights(y.shape[0], patients, n_boot, seed)
        boot_a, boot_b = _boot_per_class(y, pa, weights), _boot_per_class(y, pb, weights)
        point = auroc_rank(y, pa) - auroc_rank(y, pb)
        for name, idx in sets.items():
            diffs[name].append(_nanmean(boot_a[:, idx], axis=1) - _nanmean(boot_b[:, idx], axis=1))
            points[name].append(float(np.nanmean(point[idx])))
    rows = []
    for name in sets:
        mean_boot = np.mean(np.stack(diffs[name]), axis=0)
        low, high, _ = _percentiles(mean_boot, ci)
        valid = mean_boot[~np.isnan(mean_boot)]
        rows.append((name, float(np.mean(points[name])), low, high,
                     float(np.mean(valid <= 0.0)) if valid.size else math.nan, len(pairs)))
    return pd.DataFrame(rows, columns=["group", "diff", "diff_low", "diff_high", "p_boot", "n_seeds"]).set_index("group")


def slope(x: Sequence[float], y: Sequence[float], *, ci: float = 0.95) -> dict[str, float]:
    """Least-squares slope of ``y`` on ``x`` with its t interval (n - 2 degrees of freedom).

    For the sweep's slope of a paired difference over lambda, one point per (lambda, seed): the interval
    then holds the seed-to-seed and test-sampling scatter of the points around the line.

    Returns:
        ``{"slope", "slope_low", "slope_high", "intercept", "n"}`` (NaN interval with fewer than 3 points).
    """
    from scipy import stats

    xv, yv = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(xv) & np.isfinite(yv)
    xv, yv = xv[keep], yv[keep]
    n = int(xv.size)
    if n < 2 or np.ptp(xv) == 0:
        return {"slope": math.nan, "slope_low": math.nan, "slope_high": math.nan, "intercept": math.nan, "n": n}
    fit = stats.linregress(xv, yv)
    if n < 3:
        return {"slope": float(fit.slope), "slope_low": math.nan, "slope_high": math.nan,
                "intercept": float(fit.intercept), "n": n}
    t = float(stats.t.ppf(0.5 + ci / 2.0, n - 2))
    return {"slope": float(fit.slope), "slope_low": float(fit.slope - t * fit.stderr),
            "slope_high": float(fit.slope + t * fit.stderr), "intercept": float(fit.intercept), "n": n}


def check_paired(
    names_a: Sequence[str],
    labels_a: Any,
    names_b: Sequence[str],
    labels_b: Any,
    *,
    what: tuple[str, str] = ("A", "B"),
    classes: Sequence[str] = CLASSES,
) -> None:
    """Raise ValueError unless A and B hold the same volumes in the same order with the same labels.

    The message names the two sources, the first differing position and volume, or the first volume
    and class whose labels differ.
    """
    a, b = what
    names_a, names_b = [str(n) for n in names_a], [str(n) for n in names_b]
    if len(names_a) != len(names_b):
        only_a = sorted(set(names_a) - set(names_b))[:3]
        only_b = sorted(set(names_b) - set(names_a))[:3]
        raise ValueError(f"{a} has {len(names_a)} volumes and {b} {len(names_b)}: not the same test set "
                         f"(only in {a}: {only_a}, only in {b}: {only_b})")
    for i, (na, nb) in enumerate(zip(names_a, names_b, strict=True)):
        if na != nb:
            raise ValueError(f"{a} and {b} differ in VolumeName at row {i}: {na!r} vs {nb!r} "
                             "(same volumes in the same order are needed for a paired comparison)")
    ya, yb = np.asarray(labels_a), np.asarray(labels_b)
    if ya.shape != yb.shape:
        raise ValueError(f"{a} labels have shape {ya.shape}, {b} labels {yb.shape}")
    bad = np.argwhere(ya != yb)
    if bad.size:
        r, k = bad[0]
        raise ValueError(f"{a} and {b} differ in the label of {names_a[r]!r} (row {r}), class {classes[k]!r}: "
                         f"{ya[r, k]} vs {yb[r, k]} ({len(bad)} labels differ in all)")


def compare_predictions(
    pred_a: PredictionSource,
    pred_b: PredictionSource,
    groups: Mapping[str, Sequence[str]] | None = None,
    *,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    what: tuple[str, str] = ("A", "B"),
    classes: Sequence[str] = CLASSES,
) -> pd.DataFrame:
    """:func:`paired_bootstrap_auroc` of two ``predictions.csv`` (paths or frames), patients as clusters.

    Checks with :func:`check_paired` that both hold the same volumes in the same order with the same
    labels (raising ValueError naming ``what`` otherwise); patients come from the volume names.
    """
    names_a, y_a, p_a = read_predictions(pred_a, classes)
    names_b, y_b, p_b = read_predictions(pred_b, classes)
    what = (f"{what[0]} ({_source(pred_a)})", f"{what[1]} ({_source(pred_b)})")
    check_paired(names_a, y_a, names_b, y_b, what=what, classes=classes)
    return paired_bootstrap_auroc(y_a, p_a, p_b, patients_of(names_a), groups, n_boot=n_boot, ci=ci, seed=seed,
                                  classes=classes)


def _source(pred: PredictionSource) -> str:
    return "DataFrame" if isinstance(pred, pd.DataFrame) else os.fspath(pred)
