"""Scoring: equality with sklearn, label-wise accuracy, validation-only thresholds, a real bootstrap,
the CT-CLIP protocol and the predictions.csv format."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

import ctlib.metrics as M
import ctlib.runs as R
import ctlib.tables as T
from ctlib.data import CLASSES, DataError

C = len(CLASSES)
SKIPPED = 5  # "Hiatal hernia" has no positive in the fixture


@pytest.fixture(scope="module")
def preds() -> tuple[np.ndarray, np.ndarray]:
    """80 volumes: informative, tied (rounded) scores; one class without positives."""
    rng = np.random.default_rng(42)
    y = (rng.random((80, C)) < 0.3).astype(int)
    y[:, SKIPPED] = 0
    p = np.clip(0.35 * y + 0.65 * rng.random((80, C)), 0, 1).round(2)
    return y, p


def _youden_example() -> tuple[np.ndarray, np.ndarray]:
    # negatives 0.1 0.2 0.3 0.55 0.65, positives 0.45 0.6 0.7 0.8. J = TPR - FPR at t (score >= t):
    # t=0.8: .25-0   t=0.7: .5-0   t=0.65: .5-.2   t=0.6: .75-.2=.55   t=0.55: .75-.4
    # t=0.45: 1-.4=.6 (max)   t=0.3: 1-.6   -> Youden threshold 0.45.
    # F1: t=0.45: P 4/6, R 1 -> .8 (max); t=0.6: .75/.75 -> .75; t=0.3: 4/7, 1 -> .727.
    y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.55, 0.65, 0.45, 0.6, 0.7, 0.8])
    return y, s


# ------------------------------------------------------------------------------------------ score


def test_score_equals_sklearn_per_class_and_macro(preds):
    y, p = preds
    thr = np.linspace(0.3, 0.7, C)
    out = M.score(y, p, thr)
    pred = (p >= thr).astype(int)
    name = CLASSES[SKIPPED]

    assert out["skipped_classes"] == [name]
    assert out["per_class_auroc"][name] is None
    aucs = []
    for k, c in enumerate(CLASSES):
        pc = out["per_class"][c]
        if k != SKIPPED:
            ref = roc_auc_score(y[:, k], p[:, k])
            aucs.append(ref)
            assert out["per_class_auroc"][c] == pytest.approx(ref, abs=1e-12)
            assert pc["auroc"] == pytest.approx(ref, abs=1e-12)
        assert pc["precision"] == pytest.approx(precision_score(y[:, k], pred[:, k], zero_division=0))
        assert pc["recall"] == pytest.approx(recall_score(y[:, k], pred[:, k], zero_division=0))
        assert pc["accuracy"] == pytest.approx(accuracy_score(y[:, k], pred[:, k]))
        assert pc["support"] == int(y[:, k].sum())
        assert pc["threshold"] == pytest.approx(thr[k])
    assert len(aucs) == C - 1
    assert out["auroc"] == pytest.approx(np.mean(aucs), abs=1e-12)
    assert out["precision"] == pytest.approx(precision_score(y, pred, average="macro", zero_division=0))
    assert out["recall"] == pytest.approx(recall_score(y, pred, average="macro", zero_division=0))
    assert out["f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert out["n"] == 80
    # the skipped class still counts in precision/recall (as 0, zero_division=0), like sklearn
    assert out["per_class"][name]["precision"] == 0.0


def test_accuracy_is_label_wise_not_subset():
    y = np.zeros((4, C), dtype=int)
    y[:, 0] = [1, 0, 1, 0]
    p = np.zeros((4, C))
    p[:, 1] = 0.9  # one wrong label in every volume: no volume is entirely right
    out = M.score(y, p)
    pred = (p >= 0.5).astype(int)
    # row 0 and 2 also miss class 0: 4 + 2 wrong of 72
    assert out["accuracy"] == pytest.approx((pred == y).mean()) == pytest.approx(66 / 72)
    assert accuracy_score(y, pred) == 0.0  # sklearn's multilabel (subset) accuracy: not what we report


def test_thresholds_scalar_array_and_mapping_agree(preds):
    y, p = preds
    a = M.score(y, p, 0.4)
    b = M.score(y, p, np.full(C, 0.4))
    c = M.score(y, p, dict.fromkeys(CLASSES, 0.4))
    d = M.score(y, p, [0.4] * C)
    for other in (b, c, d):
        assert other["per_class"] == a["per_class"]
        assert other["precision"] == a["precision"]
    assert set(a["thresholds"].values()) == {0.4}
    # a per-class threshold really changes that class only
    t = np.full(C, 0.4)
    t[0] = 0.95
    e = M.score(y, p, t)
    assert e["per_class"][CLASSES[0]]["recall"] < a["per_class"][CLASSES[0]]["recall"]
    assert e["per_class"][CLASSES[1]] == a["per_class"][CLASSES[1]]


@pytest.mark.parametrize(
    "thresholds, match",
    [(np.full(C - 1, 0.5), "shape"), ({"Cardiomegaly": 0.5}, "lacks"), (np.nan, "finite")],
)
def test_bad_thresholds_raise(preds, thresholds, match):
    y, p = preds
    with pytest.raises(ValueError, match=match):
        M.score(y, p, thresholds)


def test_bad_inputs_raise(preds):
    y, p = preds
    with pytest.raises(ValueError, match="shape"):
        M.score(y[:, :17], p[:, :17])
    with pytest.raises(ValueError, match="shape of labels"):
        M.score(y, p[:10])
    bad = y.copy()
    bad[3, 2] = 2
    with pytest.raises(ValueError, match="0/1.*row 3.*Cardiomegaly"):
        M.score(bad, p)
    badp = p.copy()
    badp[1, 0] = 1.5
    with pytest.raises(ValueError, match=r"\[0, 1\].*1.5"):
        M.score(y, badp)


# ----------------------------------------------------------------------------- thresholds on val


def test_youden_and_f1_thresholds_hand_computed():
    y1, s1 = _youden_example()
    y = np.tile(y1[:, None], (1, C))
    p = np.tile(s1[:, None], (1, C))
    y[:, 3] = 1  # no negatives: 0.5
    t = M.choose_thresholds(y, p)
    assert t.shape == (C,)
    assert t[0] == pytest.approx(0.45)
    assert t[3] == 0.5
    assert M.choose_thresholds(y, p, "f1")[0] == pytest.approx(0.45)
    # at the Youden threshold the class is scored with prob >= t: TPR 1, FPR 0.4
    pc = M.score(y, p, t)["per_class"][CLASSES[0]]
    assert pc["recall"] == 1.0 and pc["precision"] == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="method"):
        M.choose_thresholds(y, p, "roc")


def test_val_tuned_uses_validation_only(preds):
    y, p = preds
    val_y, val_p = y[:40], p[:40]
    test_y, test_p = y[40:], p[40:]
    expected = M.choose_thresholds(val_y, val_p)
    assert not np.allclose(expected, 0.5)  # the tuning does something here

    out = M.evaluate(test_y, test_p, val_y, val_p)
    assert set(out) == {"default", "val_tuned", "ctclip"}
    assert list(out["val_tuned"]["thresholds"].values()) == pytest.approx(expected.tolist())
    assert out["val_tuned"] == M.score(test_y, test_p, expected)
    assert out["default"] == M.score(test_y, test_p, 0.5)
    assert out["ctclip"]["auroc"] == M.ctclip_protocol(test_y, test_p)["auroc"]

    # other test data (permuted rows, then entirely different scores): same thresholds
    rng = np.random.default_rng(1)
    perm = rng.permutation(len(test_y))
    for tp in (test_p[perm], rng.random(test_p.shape)):
        again = M.evaluate(test_y, tp, val_y, val_p)
        assert list(again["val_tuned"]["thresholds"].values()) == pytest.approx(expected.tolist())
    # without validation data there is no tuned row
    assert "val_tuned" not in M.evaluate(test_y, test_p)


def test_evaluate_bootstrap_entry(preds):
    y, p = preds
    groups = np.arange(len(y)) // 2
    out = M.evaluate(y, p, groups=groups, n_boot=50, seed=3)
    pd.testing.assert_frame_equal(out["bootstrap"], M.bootstrap_auroc(y, p, groups, n_boot=50, seed=3))
    with pytest.raises(ValueError, match="n_boot"):
        M.evaluate(y, p, groups=groups)


# ------------------------------------------------------------------------------------- bootstrap


def test_rank_auroc_equals_sklearn(preds):
    y, p = preds
    r = M.auroc_rank(y, p)
    ref = [roc_auc_score(y[:, k], p[:, k]) if k != SKIPPED else np.nan for k in range(C)]
    np.testing.assert_allclose(r, ref, rtol=0, atol=1e-12, equal_nan=True)


def test_weighted_auroc_equals_sklearn_on_the_resample(preds):
    y, p = preds
    rng = np.random.default_rng(7)
    w = rng.integers(0, 4, size=(6, len(y)))
    for k in (0, 7, 12):
        got = M.auroc_weighted(y[:, k], p[:, k], w)
        for b in range(len(w)):
            resampled = roc_auc_score(np.repeat(y[:, k], w[b]), np.repeat(p[:, k], w[b]))
            assert got[b] == pytest.approx(resampled, abs=1e-12)
            assert got[b] == pytest.approx(roc_auc_score(y[:, k], p[:, k], sample_weight=w[b]), abs=1e-12)
    # a weighting without positives has no AUROC
    only_neg = (y[:, 0] == 0).astype(float)[None, :]
    assert np.isnan(M.auroc_weighted(y[:, 0], p[:, 0], only_neg))[0]


def test_bootstrap_intervals(preds):
    y, p = preds
    a = M.bootstrap_auroc(y, p, n_boot=300, seed=0)
    assert list(a.columns) == ["auroc", "low", "high", "n_pos", "n_resamples"]
    assert list(a.index) == [*CLASSES, "macro"]
    ok = a.drop(index=CLASSES[SKIPPED])
    assert (ok["low"] <= ok["auroc"]).all() and (ok["auroc"] <= ok["high"]).all()
    assert (ok["high"] - ok["low"] > 0.01).all()
    assert ok["auroc"].drop(index="macro").tolist() == pytest.approx(
        [roc_auc_score(y[:, k], p[:, k]) for k in range(C) if k != SKIPPED]
    )
    assert a.loc["macro", "auroc"] == pytest.approx(M.score(y, p)["auroc"])
    # macro interval is narrower than a typical class's (averaging 17 classes)
    assert (a.loc["macro", "high"] - a.loc["macro", "low"]) < (ok["high"] - ok["low"]).median()
    skipped = a.loc[CLASSES[SKIPPED]]
    assert np.isnan(skipped["auroc"]) and np.isnan(skipped["low"]) and skipped["n_resamples"] == 0
    assert a.loc[CLASSES[0], "n_pos"] == y[:, 0].sum()

    b = M.bootstrap_auroc(y, p, n_boot=300, seed=1)
    assert not np.allclose(a["low"].dropna(), b["low"].dropna())
    pd.testing.assert_frame_equal(a, M.bootstrap_auroc(y, p, n_boot=300, seed=0))


def test_bootstrap_skips_resamples_lacking_a_label(preds):
    y, p = preds
    y = y.copy()
    y[:, 0] = 0
    y[0, 0] = 1  # a single positive: about a third of resamples miss it
    a = M.bootstrap_auroc(y, p, n_boot=200, seed=0)
    used = a.loc[CLASSES[0], "n_resamples"]
    assert 30 < used < 200
    assert a.loc[CLASSES[1], "n_resamples"] == 200
    assert np.isfinite(a.loc[CLASSES[0], ["low", "high"]].astype(float)).all()


def test_bootstrap_resamples_whole_patients(preds, monkeypatch):
    y, p = preds
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 5, size=40)
    groups = np.repeat([f"train_{i}" for i in range(40)], sizes)[: len(y)]
    n_patients = len(np.unique(groups))
    seen: list[np.ndarray] = []
    real = M.auroc_weighted

    def counting(labels, scores, weights):
        seen.append(np.asarray(weights).copy())
        return real(labels, scores, weights)

    monkeypatch.setattr(M, "auroc_weighted", counting)
    M.bootstrap_auroc(y, p, groups, n_boot=100, seed=0)
    assert len(seen) == C - 1  # once per class with both labels, all resamples at once
    w = seen[0]
    assert w.shape == (100, len(y))
    first = {g: np.flatnonzero(groups == g) for g in np.unique(groups)}
    per_patient = np.stack([w[:, idx[0]] for idx in first.values()], axis=1)  # (B, patients)
    for idx in first.values():  # every volume of a patient is drawn as often as the patient
        assert (w[:, idx] == w[:, idx[:1]]).all()
    assert (per_patient.sum(axis=1) == n_patients).all()  # as many patient draws as patients
    assert (per_patient == 0).any() and (per_patient >= 2).any()  # really with replacement
    assert all((s == w).all() for s in seen)  # the same resamples for every class

    seen.clear()
    M.bootstrap_auroc(y, p, None, n_boot=100, seed=0)
    assert (seen[0].sum(axis=1) == len(y)).all()  # volumes as units


def test_bootstrap_is_fast():
    rng = np.random.default_rng(0)
    y = (rng.random((400, C)) < 0.2).astype(int)
    p = rng.random((400, C))
    import time

    t0 = time.perf_counter()
    M.bootstrap_auroc(y, p, np.arange(400) // 2, n_boot=1000)
    assert time.perf_counter() - t0 < 5.0


# -------------------------------------------------------------------------------- CT-CLIP protocol


def test_ctclip_threshold_nearest_corner_on_hand_made_example():
    # negatives 0.1 0.2 0.3 0.6, positives 0.5 0.8 0.9; predictions are prob > t as upstream.
    # t in [0.3, 0.5): TPR 1, FPR 1/4 -> distance 0.25 (best); t in [0.6, 0.8): TPR 2/3, FPR 0 -> 1/3.
    # Grid points i/99 in [0.3, 0.5) are i = 30..49; upstream keeps the last of ties: 49/99.
    y1 = np.array([0, 0, 0, 0, 1, 1, 1])
    s1 = np.array([0.1, 0.2, 0.3, 0.6, 0.5, 0.8, 0.9])
    y = np.tile(y1[:, None], (1, C))
    p = np.tile(s1[:, None], (1, C))
    out = M.ctclip_protocol(y, p)
    assert out["thresholds"][CLASSES[0]] == pytest.approx(49 / 99)
    assert M.CTCLIP_GRID[49] == pytest.approx(49 / 99)
    pc = out["per_class"][CLASSES[0]]
    pred = (s1 > 49 / 99).astype(int)
    assert pc["f1_weighted"] == pytest.approx(f1_score(y1, pred, average="weighted"))
    assert pc["precision"] == pytest.approx(precision_score(y1, pred)) == pytest.approx(3 / 4)
    assert pc["accuracy"] == pytest.approx(6 / 7)
    assert "EVALUATED SET ITSELF" in out["note"]


def test_ctclip_protocol_matches_a_direct_grid_search(preds):
    y, p = preds
    out = M.ctclip_protocol(y, p)
    assert out["skipped_classes"] == [CLASSES[SKIPPED]]
    assert out["thresholds"][CLASSES[SKIPPED]] == 0.5
    f1s, precs, accs = [], [], []
    for k, c in enumerate(CLASSES):
        if k != SKIPPED:  # brute force, one threshold at a time
            best, best_t = np.inf, None
            for t in np.linspace(0, 1, 100):
                pr = p[:, k] > t
                tpr = (pr & (y[:, k] == 1)).sum() / (y[:, k] == 1).sum()
                fpr = (pr & (y[:, k] == 0)).sum() / (y[:, k] == 0).sum()
                d = np.hypot(1 - tpr, fpr)
                if d <= best:
                    best, best_t = d, t
            assert out["thresholds"][c] == pytest.approx(best_t)
        pred = (p[:, k] > out["thresholds"][c]).astype(int)
        f1s.append(f1_score(y[:, k], pred, average="weighted", zero_division=0))
        precs.append(precision_score(y[:, k], pred, zero_division=0))
        accs.append(accuracy_score(y[:, k], pred))
    assert out["f1_weighted"] == pytest.approx(np.mean(f1s))
    assert out["precision"] == pytest.approx(np.mean(precs))
    assert out["accuracy"] == pytest.approx(np.mean(accs))
    assert out["auroc"] == pytest.approx(M.score(y, p)["auroc"])


# ------------------------------------------------------------------------- predictions.csv, table


def test_predictions_round_trip_and_column_order(preds, tmp_path):
    y, p = preds
    names = [f"valid_{i}_a_1.nii.gz" for i in range(len(y))]
    frame = R.predictions_frame(names, y, p)
    expected_cols = ["VolumeName", *(f"label:{c}" for c in CLASSES), *(f"prob:{c}" for c in CLASSES)]
    assert list(frame.columns) == expected_cols
    path = tmp_path / "predictions.csv"
    frame.to_csv(path, index=False)
    n2, y2, p2 = R.read_predictions(path)
    assert n2 == names
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(p2, p)
    n3, y3, p3 = R.read_predictions(frame)
    assert n3 == names and (y3 == y).all() and (p3 == p).all()


def test_read_predictions_names_the_file_and_column(preds, tmp_path):
    y, p = preds
    frame = R.predictions_frame([f"v{i}" for i in range(len(y))], y, p)
    path = tmp_path / "broken.csv"
    frame.drop(columns=[f"prob:{CLASSES[4]}"]).to_csv(path, index=False)
    with pytest.raises(DataError, match=rf"broken.csv.*prob:{CLASSES[4]}"):
        R.read_predictions(path)
    bad = frame.copy()
    bad.loc[2, f"label:{CLASSES[0]}"] = 3
    bad.to_csv(path, index=False)
    with pytest.raises(DataError, match="broken.csv.*0/1"):
        R.read_predictions(path)
    with pytest.raises(DataError, match="missing.csv"):
        R.read_predictions(tmp_path / "missing.csv")


def test_metrics_table_keeps_full_precision(preds):
    y, p = preds
    runs = {"ResNet": M.score(y, p), "ViT": M.score(y, p, 0.3)}
    t = T.metrics_table(runs)
    assert list(t.index) == ["ResNet", "ViT"] and t.index.name == "run"
    assert list(t.columns) == ["auroc", "accuracy", "precision", "recall"]
    assert t.loc["ViT", "recall"] == runs["ViT"]["recall"]  # exactly, not rounded
    assert T.metrics_table(runs, keys=("f1",)).loc["ResNet", "f1"] == runs["ResNet"]["f1"]
    with pytest.raises(ValueError, match="ResNet.*nope"):
        T.metrics_table(runs, keys=("nope",))
