"""The ResNet's adequacy check: a linear probe on simple per-slice features, the floor on the 2D classes.

A trained ResNet should see at least what a linear model sees in pooled intensities. The probe reads the same
cached model inputs and, like the ResNet, treats a volume as a set of slices: per slice, the 4x4-pooled mean
and max of the image and a 40-bin histogram of its values (HU / 1000 in [-1, 1]), averaged over the slices;
then one L2 logistic regression per class (C = 0.01, standardised features), fitted on the training split and
scored on the test split (DATA.md, "A learnability check without training", measured a probe of this kind
with 3D pooling: macro 0.80 over the 2D classes' ~0.64-1.00).

- :func:`slice_features`: one volume's features.
- :func:`probe_predictions`: the probe's test predictions, in ``predictions.csv``'s layout.
- :func:`adequacy`: the ResNet against the probe on the test volumes, per class group, paired.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ctlib.cache import load_prepared
from ctlib.comparison import check_paired, paired_bootstrap_auroc, patients_of
from ctlib.data import CLASSES
from ctlib.runs import predictions_frame, read_predictions

POOL = 4  # in-plane pooling of the per-slice mean and max maps
BINS = 40  # histogram bins over [-1, 1]


def slice_features(x: np.ndarray, pool: int = POOL, bins: int = BINS) -> np.ndarray:
    """(S, H, W) model input in [-1, 1] -> (2 * (H // pool) * (W // pool) + bins,): per slice the pooled mean
    and max maps and the value histogram (fractions), averaged over the slices (any order of slices gives the
    same features, up to float rounding)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"expected one volume (S, H, W), got shape {x.shape}")
    s, h, w = x.shape
    hh, ww = (h // pool) * pool, (w // pool) * pool
    blocks = x[:, :hh, :ww].reshape(s, hh // pool, pool, ww // pool, pool)
    mean = blocks.mean(axis=(2, 4)).reshape(s, -1)
    peak = blocks.max(axis=(2, 4)).reshape(s, -1)
    edges = np.linspace(-1.0, 1.0, bins + 1, dtype=np.float32)
    hist = np.stack([np.histogram(np.clip(v, -1.0, 1.0), bins=edges)[0] for v in x]).astype(np.float32) / float(h * w)
    return np.concatenate([mean, peak, hist], axis=1).mean(axis=0)


def probe_predictions(
    cache_dir: str | os.PathLike[str],
    cohort: pd.DataFrame,
    splits: pd.Series,
    *,
    c: float = 0.01,
    classes: Sequence[str] = CLASSES,
) -> pd.DataFrame:
    """Fit the probe on the ``train`` volumes of ``cohort`` (read from ``cache_dir``) and predict the ``test``
    volumes, in :func:`ctlib.runs.predictions_frame`'s layout (test volumes in cohort order, as a run's
    ``predictions.csv``). A class with one label value in training predicts its training prevalence."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    split = np.asarray(splits, dtype=object)
    names = cohort["VolumeName"].astype(str).to_numpy()
    labels = cohort[list(classes)].to_numpy(dtype=np.int64)
    feats = np.stack([slice_features(load_prepared(cache_dir, n)) for n in names])
    train, test = split == "train", split == "test"
    scaler = StandardScaler().fit(feats[train])
    xtr, xte = scaler.transform(feats[train]), scaler.transform(feats[test])
    probs = np.zeros((int(test.sum()), len(classes)))
    for k in range(len(classes)):
        ytr = labels[train, k]
        if ytr.min() == ytr.max():
            probs[:, k] = float(ytr.mean())
            continue
        model = LogisticRegression(C=c, max_iter=2000).fit(xtr, ytr)
        probs[:, k] = model.predict_proba(xte)[:, 1]
    return predictions_frame(names[test], labels[test], probs, classes)


def adequacy(
    resnet: str | os.PathLike[str] | pd.DataFrame,
    probe: pd.DataFrame,
    groups: Mapping[str, Sequence[str]] | None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """The ResNet (its run folder, ``predictions.csv`` or frame) against the probe's predictions of the same
    test volumes: per class group, both macro AUROCs, the paired gap ResNet - probe with its 95% interval over
    test patients, and ``adequate`` (the ResNet at least at the probe's AUROC). The check is the ``"2D"`` row:
    the classes one slice shows, which a slice model must learn."""
    path = resnet
    if not isinstance(resnet, pd.DataFrame) and os.path.isdir(resnet):
        path = os.path.join(resnet, "predictions.csv")
    names_r, y_r, p_r = read_predictions(path)
    if set(probe["VolumeName"]) == set(names_r):  # the same volumes: in the run's order
        probe = probe.set_index("VolumeName").loc[names_r].reset_index()
    names_p, y_p, p_p = read_predictions(probe)
    check_paired(names_r, y_r, names_p, y_p, what=("ResNet", "linear probe"))
    table = paired_bootstrap_auroc(y_r, p_r, p_p, patients_of(names_r), groups, n_boot=n_boot, seed=seed)
    out = table.rename(columns={"auroc_a": "resnet_auroc", "auroc_b": "probe_auroc", "diff": "gap",
                                "diff_low": "gap_low", "diff_high": "gap_high"})
    out["adequate"] = out["gap"] >= 0.0
    return out[["resnet_auroc", "probe_auroc", "gap", "gap_low", "gap_high", "adequate", "n_classes"]]
