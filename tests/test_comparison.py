"""Paired comparisons and per-group AUROC: the difference equals the full-data difference, identical
models tie exactly, a real difference is detected, patients are resampled as clusters, seeds repeat,
and mismatched test sets are refused."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import ctlib.comparison as K
import ctlib.metrics as M
import ctlib.runs as R
from ctlib.data import CLASSES

C = len(CLASSES)
GROUPS = {"2D": list(CLASSES[:9]), "3D": list(CLASSES[9:])}


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """120 volumes of 60 patients (2 each); model A informative, B its probabilities shuffled over volumes."""
    rng = np.random.default_rng(3)
    n = 120
    y = (rng.random((n, C)) < 0.3).astype(int)
    y[0, :], y[1, :] = 1, 0  # every class has both labels
    pa = np.clip(0.4 * y + 0.6 * rng.random((n, C)), 0, 1)
    pb = pa[rng.permutation(n)]
    patients = np.repeat(np.arange(n // 2), 2)
    return y, pa, pb, patients


def test_difference_equals_full_set_scores(data):
    y, pa, pb, patients = data
    out = K.paired_bootstrap_auroc(y, pa, pb, patients, GROUPS, n_boot=50)
    assert out.loc["all", "diff"] == pytest.approx(M.score(y, pa)["auroc"] - M.score(y, pb)["auroc"], abs=1e-12)
    assert out.loc["all", "auroc_a"] == pytest.approx(M.score(y, pa)["auroc"], abs=1e-12)
    for name, members in GROUPS.items():
        idx = [CLASSES.index(c) for c in members]
        a = M.score(y[:, idx], pa[:, idx], classes=members)["auroc"]
        b = M.score(y[:, idx], pb[:, idx], classes=members)["auroc"]
        assert out.loc[name, "diff"] == pytest.approx(a - b, abs=1e-12)
    assert list(out.index) == ["all", "2D", "3D"]


def test_identical_models_give_zero_interval(data):
    y, pa, _, patients = data
    out = K.paired_bootstrap_auroc(y, pa, pa.copy(), patients, GROUPS, n_boot=200)
    assert (out[["diff", "diff_low", "diff_high"]].to_numpy() == 0.0).all()
    assert (out["p_boot"] == 1.0).all()  # every difference is <= 0


def test_shuffled_copy_is_detected(data):
    y, pa, pb, patients = data
    out = K.paired_bootstrap_auroc(y, pa, pb, patients, GROUPS, n_boot=500)
    for name in ("all", "2D", "3D"):
        assert out.loc[name, "diff_low"] > 0.0, out
        assert out.loc[name, "p_boot"] < 0.025
    reverse = K.paired_bootstrap_auroc(y, pb, pa, patients, n_boot=500)
    assert reverse.loc["all", "diff_high"] < 0.0
    assert reverse.loc["all", "p_boot"] == 1.0


def test_same_seed_same_numbers_other_seed_other_numbers(data):
    y, pa, pb, patients = data
    one = K.paired_bootstrap_auroc(y, pa, pb, patients, GROUPS, n_boot=100, seed=7)
    two = K.paired_bootstrap_auroc(y, pa, pb, patients, GROUPS, n_boot=100, seed=7)
    pd.testing.assert_frame_equal(one, two)
    other = K.paired_bootstrap_auroc(y, pa, pb, patients, GROUPS, n_boot=100, seed=8)
    assert other.loc["all", "diff_low"] != one.loc["all", "diff_low"]


def test_patients_are_resampled_as_clusters():
    """20 patients of 10 identical volumes each: resampling volumes pretends 200 independent cases and
    gives a much narrower interval than resampling patients (the honest 20)."""
    rng = np.random.default_rng(0)
    n_pat, per = 20, 10
    y1 = (rng.random((n_pat, C)) < 0.5).astype(int)
    y1[0], y1[1] = 1, 0
    pa1 = np.clip(0.3 * y1 + 0.7 * rng.random((n_pat, C)), 0, 1)
    pb1 = rng.random((n_pat, C))
    y, pa, pb = (np.repeat(v, per, axis=0) for v in (y1, pa1, pb1))
    patients = np.repeat(np.arange(n_pat), per)
    by_patient = K.paired_bootstrap_auroc(y, pa, pb, patients, n_boot=400).loc["all"]
    by_volume = K.paired_bootstrap_auroc(y, pa, pb, None, n_boot=400).loc["all"]
    assert by_patient["diff"] == by_volume["diff"]
    w_pat = by_patient["diff_high"] - by_patient["diff_low"]
    w_vol = by_volume["diff_high"] - by_volume["diff_low"]
    assert w_pat > 2.0 * w_vol, (w_pat, w_vol)
    # one patient-level resample equals a resample of the 20 distinct patients, each once per draw
    g = K.group_auroc(y, pa, None, patients, n_boot=400)
    g1 = K.group_auroc(y1, pa1, None, None, n_boot=400)
    assert g.loc["all", "auroc_low"] == pytest.approx(g1.loc["all", "auroc_low"], abs=1e-12)


def test_group_auroc_matches_metrics_bootstrap(data):
    y, pa, _, patients = data
    g = K.group_auroc(y, pa, GROUPS, patients, n_boot=300, seed=5)
    ref = M.bootstrap_auroc(y, pa, patients, n_boot=300, seed=5)
    assert g.loc["all", "auroc"] == pytest.approx(ref.loc["macro", "auroc"], abs=1e-12)
    assert g.loc["all", "auroc_low"] == pytest.approx(ref.loc["macro", "low"], abs=1e-12)
    assert g.loc["all", "auroc_high"] == pytest.approx(ref.loc["macro", "high"], abs=1e-12)
    idx = [CLASSES.index(c) for c in GROUPS["3D"]]
    assert g.loc["3D", "auroc"] == pytest.approx(ref["auroc"].iloc[idx].mean(), abs=1e-12)
    assert g.loc["3D", "auroc_low"] < g.loc["3D", "auroc"] < g.loc["3D", "auroc_high"]
    assert g.loc["2D", "n_classes"] == 9 and g.loc["3D", "n_pos"] == int(y[:, idx].sum())


def test_bad_groups_are_named(data):
    y, pa, pb, _ = data
    with pytest.raises(ValueError, match="'3D' names unknown classes \\['Nodule'\\]"):
        K.paired_bootstrap_auroc(y, pa, pb, groups={"3D": ["Nodule"]}, n_boot=5)
    with pytest.raises(ValueError, match="reserved"):
        K.group_auroc(y, pa, {"all": list(CLASSES)}, n_boot=5)


def _frame(names, y, p):
    return R.predictions_frame(names, y, p)


def test_compare_predictions_checks_the_volumes(data):
    y, pa, pb, _ = data
    names = [f"valid_{i // 2}_a_{i % 2 + 1}.nii.gz" for i in range(len(y))]
    out = K.compare_predictions(_frame(names, y, pa), _frame(names, y, pb), GROUPS, n_boot=100,
                                what=("fusion", "ResNet"))
    patients = np.array([f"valid_{i // 2}" for i in range(len(y))])
    assert (K.patients_of(names) == patients).all()
    direct = K.paired_bootstrap_auroc(y, pa, pb, patients, GROUPS, n_boot=100)
    pd.testing.assert_frame_equal(out, direct)
    swapped = names[:]
    swapped[3], swapped[4] = swapped[4], swapped[3]
    with pytest.raises(ValueError, match="fusion .*ResNet .*row 3: 'valid_1_a_2.nii.gz' vs 'valid_2_a_1.nii.gz'"):
        K.compare_predictions(_frame(names, y, pa), _frame(swapped, y, pb), what=("fusion", "ResNet"))
    y2 = y.copy()
    y2[7, 2] = 1 - y2[7, 2]
    with pytest.raises(ValueError, match=f"label of 'valid_3_a_2.nii.gz' \\(row 7\\), class '{CLASSES[2]}'"):
        K.compare_predictions(_frame(names, y, pa), _frame(names, y2, pb))
    with pytest.raises(ValueError, match="has 120 volumes and B .* 119"):
        K.compare_predictions(_frame(names, y, pa), _frame(names[:-1], y[:-1], pb[:-1]))


def test_group_and_paired_tables_from_run_folders(data, tmp_path):
    from ctlib.tables import group_table, paired_table

    y, pa, pb, _ = data
    names = [f"valid_{i // 2}_a_{i % 2 + 1}.nii.gz" for i in range(len(y))]
    for run, p in (("fusion", pa), ("resnet", pb)):
        (tmp_path / run).mkdir()
        _frame(names, y, p).to_csv(tmp_path / run / "predictions.csv", index=False)
    g = group_table({"ResNet+ViT": tmp_path / "fusion", "ResNet": tmp_path / "resnet"}, GROUPS, n_boot=50)
    assert g.index.tolist() == [(r, k) for r in ("ResNet+ViT", "ResNet") for k in ("all", "2D", "3D")]
    assert list(g.columns[:3]) == ["auroc", "auroc_low", "auroc_high"]
    assert g.loc[("ResNet", "all"), "auroc"] == pytest.approx(M.score(y, pb)["auroc"], abs=1e-12)
    t = paired_table({"ResNet+ViT - ResNet": (tmp_path / "fusion", tmp_path / "resnet")}, None, n_boot=50)
    assert t.index.tolist() == [("ResNet+ViT - ResNet", "all")]
    assert list(t.columns) == ["auroc_a", "auroc_b", "diff", "diff_low", "diff_high", "p_boot", "n_classes",
                               "n_resamples"]
    assert t["diff"].iloc[0] == pytest.approx(g.loc[("ResNet+ViT", "all"), "auroc"] - g.loc[("ResNet", "all"), "auroc"])
    _frame(names[::-1], y[::-1], pb[::-1]).to_csv(tmp_path / "resnet" / "predictions.csv", index=False)
    with pytest.raises(ValueError, match="ResNet\\+ViT .*fusion.* and ResNet .*resnet.* differ in VolumeName at row 0"):
        paired_table({"ResNet+ViT - ResNet": (tmp_path / "fusion", tmp_path / "resnet")}, n_boot=5)


def test_class_groups_for(monkeypatch, capsys):
    assert K.class_groups_for("/some/ct-rate") is None
    assert "CT-RATE" in capsys.readouterr().out
    monkeypatch.setattr(K, "class_groups", lambda: {"2D": CLASSES[:3], "3D": CLASSES[3:]})
    assert K.class_groups_for(None) == {"2D": list(CLASSES[:3]), "3D": list(CLASSES[3:])}
