"""Scoring of 18-class multi-abnormality predictions (paper sections 4.4 and 5).

One scoring path for training, notebooks and tests. Inputs are ``labels`` (N, 18) with values 0/1
and ``probs`` (N, 18) in [0, 1], columns in ``ctlib.data.CLASSES`` order.

- :func:`score`: AUROC, accuracy, precision, recall, F1 at given thresholds, computed with
  ``sklearn.metrics`` as the paper states (section 4.4), so the values equal sklearn's by construction.
- :func:`choose_thresholds`: per-class thresholds picked on the *validation* set only.
- :func:`evaluate`: the rows a results table needs: threshold 0.5, thresholds tuned on validation,
  and the (clearly labelled) CT-CLIP protocol; optionally bootstrap AUROC intervals.
- :func:`bootstrap_auroc`: percentile intervals that really resample (patients when given).
- :func:`ctclip_protocol`: the upstream CT-CLIP scoring, for side-by-side comparison only.
- :func:`check_arrays`, :func:`has_both_labels`, :func:`bootstrap_counts`: the checks and the resampling
  that :mod:`ctlib.comparison` shares with this module.

Comparing two models on the same test patients (paired bootstrap differences) and macro AUROC per
class group live in :mod:`ctlib.comparison`; the ``predictions.csv`` format in :mod:`ctlib.runs`; tables in
:mod:`ctlib.tables`.

Accuracy is *label-wise* (the mean over classes of per-class accuracy, i.e. element-wise accuracy
over the N x 18 matrix), never subset accuracy (all 18 labels of a volume right). The paper's
accuracy of 0.83 at a recall of 0.34 is only plausible label-wise: most labels are negative, so
predicting few positives already gets most labels right, while exact 18-label matches would be rare.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from ctlib.data import CLASSES

__all__ = [
    "CTCLIP_GRID",
    "CTCLIP_NOTE",
    "auroc_rank",
    "auroc_weighted",
    "bootstrap_auroc",
    "bootstrap_counts",
    "check_arrays",
    "choose_thresholds",
    "ctclip_protocol",
    "evaluate",
    "has_both_labels",
    "score",
]

#: The 100-point threshold grid of the upstream CT-CLIP protocol.
CTCLIP_GRID: np.ndarray = np.linspace(0.0, 1.0, 100)

CTCLIP_NOTE = (
    "CT-CLIP protocol: per-class thresholds were fitted ON THE EVALUATED SET ITSELF (ROC point nearest "
    "(0, 1) over np.linspace(0, 1, 100)); F1 is support-weighted. Optimistic by construction: for "
    "comparison with published CT-RATE tables only, not an estimate of performance on unseen data."
)


# --------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------


def check_arrays(
    labels: Any, probs: Any, classes: Sequence[str], *, what: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """``labels`` as int64 (N, C) 0/1 and ``probs`` as float64 (N, C) in [0, 1], checked.

    Raises:
        ValueError: a wrong shape, no rows, a label not 0/1 or a probability outside [0, 1] (naming the row
            and class; ``what`` says which arrays).
    """
    where = f" ({what})" if what else ""
    y = np.asarray(labels)
    p = np.asarray(probs, dtype=np.float64)
    c = len(classes)
    if y.ndim != 2 or y.shape[1] != c:
        raise ValueError(f"labels{where} must have shape (N, {c}), got {y.shape}")
    if p.shape != y.shape:
        raise ValueError(f"probs{where} must have the shape of labels {y.shape}, got {p.shape}")
    if y.shape[0] == 0:
        raise ValueError(f"labels{where} hold no volumes (N = 0)")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        r, k = np.argwhere(bad)[0]
        raise ValueError(f"labels{where} must be 0/1, got {y[r, k]!r} at row {r}, class {classes[k]!r}")
    bad = ~np.isfinite(p) | (p < 0.0) | (p > 1.0)
    if bad.any():
        r, k = np.argwhere(bad)[0]
        raise ValueError(f"probs{where} must lie in [0, 1], got {p[r, k]!r} at row {r}, class {classes[k]!r}")
    return y.astype(np.int64), p


def _thresholds_array(thresholds: Any, classes: Sequence[str]) -> np.ndarray:
    """Scalar, (C,) array or class -> value mapping -> float64 (C,)."""
    c = len(classes)
    if isinstance(thresholds, Mapping):
        missing = [k for k in classes if k not in thresholds]
        if missing:
            raise ValueError(f"thresholds mapping lacks classes {missing}")
        extra = [k for k in thresholds if k not in classes]
        if extra:
            raise ValueError(f"thresholds mapping has unknown classes {extra}")
        t = np.array([float(thresholds[k]) for k in classes], dtype=np.float64)
    else:
        t = np.asarray(thresholds, dtype=np.float64)
        if t.ndim == 0:
            t = np.full(c, float(t))
        elif t.shape != (c,):
            raise ValueError(f"thresholds must be a scalar or have shape ({c},), got {t.shape}")
    if not np.isfinite(t).all():
        raise ValueError(f"thresholds must be finite, got {t.tolist()}")
    return t


def has_both_labels(y: np.ndarray) -> np.ndarray:
    """(N, C) 0/1 -> (C,) bool: the class has at least one positive and one negative."""
    return (y.max(axis=0) == 1) & (y.min(axis=0) == 0)


# --------------------------------------------------------------------------------------------------
# score at thresholds
# --------------------------------------------------------------------------------------------------


def score(
    labels: Any,
    probs: Any,
    thresholds: float | Sequence[float] | np.ndarray | Mapping[str, float] = 0.5,
    *,
    classes: Sequence[str] = CLASSES,
) -> dict[str, Any]:
    """Score (N, C) predictions with sklearn.metrics; a class is positive where ``prob >= threshold``.

    Args:
        labels: (N, C) 0/1 ground truth.
        probs: (N, C) probabilities in [0, 1].
        thresholds: one value for all classes, a (C,) array, or a class -> value mapping.
        classes: class names, column order of ``labels`` and ``probs``.

    Returns:
        dict with ``auroc`` (macro mean over classes that have both labels; NaN if none has),
        ``skipped_classes`` (classes left out of the AUROC mean, never silently), ``accuracy``
        (label-wise: mean of per-class accuracy, not subset accuracy), ``precision``, ``recall``,
        ``f1`` (macro over all classes, sklearn, zero_division=0), ``per_class_auroc``
        (class -> float or None), ``per_class`` (class -> auroc/precision/recall/f1/accuracy/support/
        threshold), ``thresholds`` (class -> float) and ``n`` (volumes).
    """
    classes = tuple(classes)
    y, p = check_arrays(labels, probs, classes)
    t = _thresholds_array(thresholds, classes)
    pred = (p >= t[None, :]).astype(np.int64)
    both = has_both_labels(y)

    # average=None: sklearn's per-class values of the multilabel matrix, one call per metric
    prec = precision_score(y, pred, average=None, zero_division=0)
    rec = recall_score(y, pred, average=None, zero_division=0)
    f1 = f1_score(y, pred, average=None, zero_division=0)
    per_class: dict[str, dict[str, Any]] = {}
    per_class_auroc: dict[str, float | None] = {}
    for k, name in enumerate(classes):
        yk, pk = y[:, k], pred[:, k]
        auc = float(roc_auc_score(yk, p[:, k])) if both[k] else None
        per_class_auroc[name] = auc
        per_class[name] = {
            "auroc": auc,
            "precision": float(prec[k]),
            "recall": float(rec[k]),
            "f1": float(f1[k]),
            "accuracy": float(accuracy_score(yk, pk)),
            "support": int(yk.sum()),
            "threshold": float(t[k]),
        }
    aucs = [a for a in per_class_auroc.values() if a is not None]
    return {
        "auroc": float(np.mean(aucs)) if aucs else math.nan,
        "accuracy": float(np.mean([per_class[c]["accuracy"] for c in classes])),
        "precision": float(precision_score(y, pred, average="macro", zero_division=0)),
        "recall": float(recall_score(y, pred, average="macro", zero_division=0)),
        "f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        "skipped_classes": [c for c, ok in zip(classes, both, strict=True) if not ok],
        "per_class_auroc": per_class_auroc,
        "per_class": per_class,
        "thresholds": {c: float(v) for c, v in zip(classes, t, strict=True)},
        "n": int(y.shape[0]),
    }


def choose_thresholds(
    val_labels: Any,
    val_probs: Any,
    method: str = "youden",
    *,
    classes: Sequence[str] = CLASSES,
) -> np.ndarray:
    """Per-class thresholds picked on the VALIDATION set, for use on test with :func:`score`.

    ``"youden"``: the ROC point maximising Youden's J = TPR - FPR (first, i.e. highest, threshold on
    ties). ``"f1"``: the point of the precision-recall curve maximising F1. Thresholds are observed
    scores, used as ``prob >= threshold``. A class lacking positives or negatives gets 0.5.

    Args:
        val_labels: (N, C) 0/1 validation labels.
        val_probs: (N, C) validation probabilities.
        method: ``"youden"`` or ``"f1"``.
        classes: class names (column order).

    Returns:
        (C,) float64 thresholds.
    """
    if method not in ("youden", "f1"):
        raise ValueError(f"method must be 'youden' or 'f1', got {method!r}")
    classes = tuple(classes)
    y, p = check_arrays(val_labels, val_probs, classes, what="validation")
    both = has_both_labels(y)
    out = np.full(len(classes), 0.5)
    for k in np.flatnonzero(both):
        if method == "youden":
            fpr, tpr, thr = roc_curve(y[:, k], p[:, k], drop_intermediate=False)
            finite = np.isfinite(thr)  # sklearn prepends +inf (no positive predicted)
            j = (tpr - fpr)[finite]
            out[k] = thr[finite][int(np.argmax(j))]
        else:
            prec, rec, thr = precision_recall_curve(y[:, k], p[:, k])
            prec, rec = prec[:-1], rec[:-1]  # the last point (recall 0) has no threshold
            denom = prec + rec
            f1 = np.divide(2 * prec * rec, denom, out=np.zeros_like(denom), where=denom > 0)
            out[k] = thr[int(np.argmax(f1))]
    return out


# --------------------------------------------------------------------------------------------------
# rank-based AUROC and the bootstrap
# --------------------------------------------------------------------------------------------------


def auroc_rank(labels: Any, probs: Any) -> np.ndarray:
    """Per-class AUROC by the Mann-Whitney formula on mid-ranks: (N, C) -> (C,), NaN where skipped.

    Equals ``sklearn.metrics.roc_auc_score`` per class (ties count one half).
    """
    y = np.asarray(labels)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim == 1:
        y, p = y[:, None], p[:, None]
    if y.shape != p.shape or y.ndim != 2:
        raise ValueError(f"labels and probs must both be (N, C), got {y.shape} and {p.shape}")
    pos = y == 1
    n_pos = pos.sum(axis=0).astype(np.float64)
    n_neg = y.shape[0] - n_pos
    ranks = rankdata(p, axis=0)  # average ranks for ties
    u = (ranks * pos).sum(axis=0) - n_pos * (n_pos + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = u / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def auroc_weighted(labels: Any, scores: Any, weights: Any) -> np.ndarray:
    """AUROC of one class under many integer weightings (bootstrap counts) at once.

    A resample that draws volume i ``w_i`` times has the AUROC of the data weighted by ``w``: the
    fraction of (positive, negative) pairs, weighted by ``w_pos * w_neg``, in which the positive
    scores higher (ties count one half). Scores are sorted once, then every weighting costs O(N).

    Args:
        labels: (N,) 0/1.
        scores: (N,) scores.
        weights: (B, N) non-negative weights, one row per resample.

    Returns:
        (B,) AUROC per row; NaN where a row weights no positive or no negative.
    """
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if y.shape != s.shape or w.shape[1] != y.shape[0]:
        raise ValueError(
            f"labels (N,), scores (N,), weights (B, N) expected, got {y.shape}, {s.shape}, {w.shape}"
        )
    n = y.shape[0]
    order = np.argsort(s, kind="stable")
    s, y, w = s[order], y[order], w[:, order]
    new_bin = np.r_[True, s[1:] != s[:-1]]  # first element of each run of tied scores
    bin_of = np.cumsum(new_bin) - 1  # (N,) tie-bin of each sorted element
    starts = np.flatnonzero(new_bin)
    ends = np.r_[starts[1:], n]
    neg_w = w * (y == 0)
    cum = np.concatenate([np.zeros((w.shape[0], 1)), np.cumsum(neg_w, axis=1)], axis=1)  # (B, N+1)
    below = cum[:, starts]  # negative weight strictly below each bin
    within = cum[:, ends] - below  # negative weight tied inside each bin
    pos = y == 1
    b = bin_of[pos]
    num = (w[:, pos] * (below[:, b] + 0.5 * within[:, b])).sum(axis=1)
    w_pos = w[:, pos].sum(axis=1)
    w_neg = neg_w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = num / (w_pos * w_neg)
    auc[(w_pos == 0) | (w_neg == 0)] = np.nan
    return auc


def bootstrap_counts(rng: np.random.Generator, n_units: int, n_boot: int) -> np.ndarray:
    """(n_boot, n_units) counts of how often each unit is drawn, n_units draws with replacement."""
    draws = rng.integers(0, n_units, size=(n_boot, n_units))
    flat = draws + (np.arange(n_boot) * n_units)[:, None]
    return np.bincount(flat.ravel(), minlength=n_boot * n_units).reshape(n_boot, n_units)


def bootstrap_auroc(
    labels: Any,
    probs: Any,
    groups: Sequence[Any] | np.ndarray | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    *,
    classes: Sequence[str] = CLASSES,
) -> pd.DataFrame:
    """Percentile bootstrap confidence intervals of per-class and macro AUROC.

    Each resample draws units with replacement, as many as there are: patients when ``groups`` is
    given (a drawn patient brings all of their volumes, so volumes of one patient are never split),
    else volumes. A resample lacking positives or negatives of a class is skipped for that class; the
    macro value of a resample is the mean of its per-class AUROCs over the classes it did not skip.

    Args:
        labels: (N, C) 0/1.
        probs: (N, C) probabilities.
        groups: (N,) unit of each volume (e.g. patient id), or None to resample volumes.
        n_boot: number of resamples.
        ci: coverage of the interval, e.g. 0.95 for the 2.5 and 97.5 percentiles.
        seed: seed of ``numpy.random.default_rng``.
        classes: class names (column order).

    Returns:
        DataFrame indexed by class, then ``"macro"``, with columns ``auroc`` (point estimate on all
        data), ``low``, ``high``, ``n_pos`` (positives; for the macro row, all positive labels) and
        ``n_resamples`` (resamples that were not skipped). NaN where no AUROC exists.
    """
    classes = tuple(classes)
    y, p = check_arrays(labels, probs, classes)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    n = y.shape[0]
    rng = np.random.default_rng(seed)
    if groups is None:
        weights = bootstrap_counts(rng, n, n_boot).astype(np.float64)
    else:
        g = np.asarray(groups)
        if g.shape != (n,):
            raise ValueError(f"groups must have shape ({n},), one unit per volume, got {g.shape}")
        _, unit_of = np.unique(g, return_inverse=True)
        unit_counts = bootstrap_counts(rng, int(unit_of.max()) + 1, n_boot)
        weights = unit_counts[:, unit_of].astype(np.float64)  # every volume of a unit, as often

    both = has_both_labels(y)
    boot = np.full((n_boot, len(classes)), np.nan)
    for k in np.flatnonzero(both):
        boot[:, k] = auroc_weighted(y[:, k], p[:, k], weights)
    point = auroc_rank(y, p)
    macro_boot = None
    if both.any():
        with warnings.catch_warnings():  # a resample may skip every class: its macro is NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            macro_boot = np.nanmean(boot, axis=1)

    lo_q, hi_q = 50.0 * (1.0 - ci), 50.0 * (1.0 + ci)

    def interval(values: np.ndarray) -> tuple[float, float, int]:
        v = values[~np.isnan(values)]
        if v.size == 0:
            return math.nan, math.nan, 0
        return float(np.percentile(v, lo_q)), float(np.percentile(v, hi_q)), int(v.size)

    rows = []
    for k, name in enumerate(classes):
        low, high, used = interval(boot[:, k])
        rows.append((name, float(point[k]), low, high, int(y[:, k].sum()), used))
    if macro_boot is not None:
        low, high, used = interval(macro_boot)
        rows.append(("macro", float(np.nanmean(point)), low, high, int(y.sum()), used))
    else:
        rows.append(("macro", math.nan, math.nan, math.nan, int(y.sum()), 0))
    frame = pd.DataFrame(rows, columns=["class", "auroc", "low", "high", "n_pos", "n_resamples"])
    return frame.set_index("class")


# --------------------------------------------------------------------------------------------------
# the upstream CT-CLIP protocol (for comparison with published tables only)
# --------------------------------------------------------------------------------------------------


def _ctclip_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """Grid threshold whose ROC point (``prob > t``) is nearest (0, 1); the last of ties, as upstream."""
    pred = p[:, None] > CTCLIP_GRID[None, :]  # (N, 100)
    pos = y == 1
    tpr = pred[pos].sum(axis=0) / pos.sum()
    fpr = pred[~pos].sum(axis=0) / (~pos).sum()
    dist = np.sqrt((1.0 - tpr) ** 2 + fpr**2)
    last_min = len(dist) - 1 - int(np.argmin(dist[::-1]))
    return float(CTCLIP_GRID[last_min])


def ctclip_protocol(labels: Any, probs: Any, *, classes: Sequence[str] = CLASSES) -> dict[str, Any]:
    """Score as the upstream CT-CLIP code does; thresholds are fitted ON THE EVALUATED SET ITSELF.

    For each class the threshold is the point of ``np.linspace(0, 1, 100)`` whose ROC point, with
    ``prob > threshold`` as upstream, is nearest (0, 1) in Euclidean distance. Then, per class as
    upstream: F1 with ``average="weighted"`` (weighted by the support of label values 0 and 1 within
    the class), binary precision, accuracy; each averaged over classes. AUROC is the macro mean.
    Upstream reports this without a held-out threshold: it is optimistic, for comparison with
    published tables only. A class lacking positives or negatives gets threshold 0.5 and no AUROC.

    Args:
        labels: (N, C) 0/1.
        probs: (N, C) probabilities.
        classes: class names (column order).

    Returns:
        dict with ``protocol``, ``note``, ``auroc``, ``f1_weighted``, ``precision`` (mean binary
        precision, as upstream), ``precision_weighted`` (mean per-class support-weighted precision),
        ``accuracy`` (label-wise), ``per_class_auroc``, ``per_class``, ``skipped_classes``,
        ``thresholds`` (class -> float) and ``n``.
    """
    classes = tuple(classes)
    y, p = check_arrays(labels, probs, classes)
    both = has_both_labels(y)
    per_class: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(classes):
        yk = y[:, k]
        t = _ctclip_threshold(yk, p[:, k]) if both[k] else 0.5
        pk = (p[:, k] > t).astype(np.int64)
        per_class[name] = {
            "auroc": float(roc_auc_score(yk, p[:, k])) if both[k] else None,
            "f1_weighted": float(f1_score(yk, pk, average="weighted", zero_division=0)),
            "precision": float(precision_score(yk, pk, zero_division=0)),
            "precision_weighted": float(precision_score(yk, pk, average="weighted", zero_division=0)),
            "accuracy": float(accuracy_score(yk, pk)),
            "support": int(yk.sum()),
            "threshold": t,
        }
    aucs = [d["auroc"] for d in per_class.values() if d["auroc"] is not None]

    def mean_of(key: str) -> float:
        return float(np.mean([per_class[c][key] for c in classes]))

    return {
        "protocol": "CT-CLIP (thresholds fitted on the evaluated set)",
        "note": CTCLIP_NOTE,
        "auroc": float(np.mean(aucs)) if aucs else math.nan,
        "f1_weighted": mean_of("f1_weighted"),
        "precision": mean_of("precision"),
        "precision_weighted": mean_of("precision_weighted"),
        "accuracy": mean_of("accuracy"),
        "per_class_auroc": {c: per_class[c]["auroc"] for c in classes},
        "per_class": per_class,
        "skipped_classes": [c for c, ok in zip(classes, both, strict=True) if not ok],
        "thresholds": {c: per_class[c]["threshold"] for c in classes},
        "n": int(y.shape[0]),
    }


# --------------------------------------------------------------------------------------------------
# the evaluation a results table needs
# --------------------------------------------------------------------------------------------------


def evaluate(
    test_labels: Any,
    test_probs: Any,
    val_labels: Any = None,
    val_probs: Any = None,
    groups: Sequence[Any] | np.ndarray | None = None,
    *,
    method: str = "youden",
    n_boot: int = 0,
    seed: int = 0,
    classes: Sequence[str] = CLASSES,
) -> dict[str, Any]:
    """All scores of one model on test; nothing is fitted on test except the labelled CT-CLIP row.

    Args:
        test_labels: (N, C) 0/1 test labels.
        test_probs: (N, C) test probabilities.
        val_labels: (M, C) validation labels, or None (then no ``"val_tuned"`` entry).
        val_probs: (M, C) validation probabilities, or None.
        groups: (N,) patient of each test volume, the bootstrap's resampling unit; None: volumes.
        method: threshold rule on validation, see :func:`choose_thresholds`.
        n_boot: bootstrap resamples for a ``"bootstrap"`` entry (:func:`bootstrap_auroc`); 0, the
            default, leaves it out.
        seed: bootstrap seed.
        classes: class names (column order).

    Returns:
        ``{"default": score at 0.5, "val_tuned": score at thresholds chosen on validation,
        "ctclip": ctclip_protocol(test)}``, plus ``"bootstrap": bootstrap_auroc(test, groups)`` when
        ``n_boot > 0``. ``"val_tuned"`` only when validation arrays are given.
    """
    if (val_labels is None) != (val_probs is None):
        raise ValueError("val_labels and val_probs must be given together")
    if groups is not None and n_boot <= 0:
        raise ValueError("groups are the bootstrap's resampling units: pass n_boot > 0 to use them")
    out: dict[str, Any] = {"default": score(test_labels, test_probs, 0.5, classes=classes)}
    if val_labels is not None:
        thresholds = choose_thresholds(val_labels, val_probs, method, classes=classes)
        out["val_tuned"] = score(test_labels, test_probs, thresholds, classes=classes)
    out["ctclip"] = ctclip_protocol(test_labels, test_probs, classes=classes)
    if n_boot > 0:
        out["bootstrap"] = bootstrap_auroc(
            test_labels, test_probs, groups, n_boot, seed=seed, classes=classes
        )
    return out
