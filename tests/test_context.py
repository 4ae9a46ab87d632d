"""Notebook 09's pieces and the power set-up: held-out test patients, step budgets, profile overrides for runs,
the seed-mean paired difference and slope, the sweep's rows, the 3D CNN control and the linear probe."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from ctlib.comparison import seed_mean_paired_auroc, slope
from ctlib.data import CLASSES
from ctlib.launch import profile_overrides, step_budget, torchrun_command
from ctlib.models import CNN3D, build_model
from ctlib.prepare import context_grid, synthetic_root
from ctlib.probe import adequacy, slice_features
from ctlib.profiles import DEMO, SMOKE, get_profile, validate
from ctlib.runs import predictions_frame
from ctlib.split import split_patients
from ctlib.tables import CONTEXT_COLUMNS, context_differences, context_rows, context_slope

GROUPS = {"2D": [c for c in CLASSES if c != "Lung nodule"], "3D": ["Lung nodule"]}


def _cohort(n_patients: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        for scan in range(1 + (i % 4 == 0)):
            rows.append({"VolumeName": f"train_{i + 1}_{'ab'[scan]}_1.nii.gz", "patient": f"train_{i + 1}",
                         **{c: int(rng.random() < 0.3) for c in CLASSES}})
    return pd.DataFrame(rows)


def test_held_out_test_patients_are_the_test_split():
    cohort = _cohort(60)
    held = [f"train_{i}" for i in range(41, 61)]
    splits = split_patients(cohort, seed=0, test_patients=held)
    patients = cohort["patient"]
    assert set(patients[splits == "test"]) == set(held)
    rest = splits[~patients.isin(held)]
    assert set(rest) == {"train", "val"}
    n_train, n_val = (patients[splits == s].nunique() for s in ("train", "val"))
    assert abs(n_train / (n_train + n_val) - 0.7 / 0.9) < 0.08
    for p in patients.unique():  # patient-disjoint
        assert splits[patients == p].nunique() == 1
    pd.testing.assert_series_equal(split_patients(cohort, seed=0), split_patients(cohort, seed=0, test_patients=[]))


def test_demo_has_300_single_volume_test_patients_and_lambda_names_the_snapshot():
    assert DEMO.synthetic_test_patients >= 300 and SMOKE.synthetic_test_patients > 0
    assert context_grid(DEMO) == (2, 4, 20) and context_grid(SMOKE) == (2, 2, 10)
    a, b = synthetic_root(DEMO), synthetic_root(dataclasses.replace(DEMO, context_strength=0.5))
    assert a != b and "ctx0.5" in b.name and "test300" in a.name
    with pytest.raises(ValueError, match="context_strength"):
        validate(dataclasses.replace(DEMO, context_strength=1.5))


def test_step_budget():
    prof = step_budget(DEMO, 400, n_train=342)  # 43 batches of 8 per pass
    assert prof.epochs == 10 and prof.max_steps_per_epoch == 40
    prof = step_budget(DEMO, 30, n_train=342)
    assert prof.epochs == 1 and prof.max_steps_per_epoch == 30
    prof = step_budget(SMOKE, 8, n_train=6)  # 2 batches of 4
    assert prof.epochs * min(2, prof.max_steps_per_epoch) >= 8
    with pytest.raises(ValueError):
        step_budget(DEMO, 0, n_train=10)


def test_runs_get_the_profile_they_were_given():
    assert profile_overrides(get_profile("demo")) == []
    prof = dataclasses.replace(step_budget(DEMO, 400, 342), context_strength=0.5, seed=2)
    sets = profile_overrides(prof)
    assert sorted(sets) == ["context_strength=0.5", "epochs=10", "max_steps_per_epoch=40"]
    cmd = torchrun_command(profile="demo", model="cnn3d", out="x", overrides=sets, seed=2)
    assert cmd.count("--set") == 3 and "cnn3d" in cmd
    assert get_profile("demo", **dict(s.split("=") for s in sets)) == dataclasses.replace(prof, seed=0)


def test_cnn3d_control():
    model = build_model(SMOKE, "cnn3d")
    assert isinstance(model, CNN3D)
    x = torch.randn(2, 8, 32, 32)
    logits, feats = model(x, return_features=True)
    assert logits.shape == (2, len(CLASSES)) and feats.shape == (2, model.feature_dim)
    with pytest.raises(ValueError):
        model(torch.randn(8, 32, 32))


def _frame(names, y, p):
    return predictions_frame(names, y, p)


def _preds(n=120, seed=0, strength=0.0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(CLASSES))) < 0.4).astype(int)
    p = np.clip(rng.random((n, len(CLASSES))) + strength * y, 0, None)
    return y, p / p.max()


def test_seed_mean_paired_difference_and_slope():
    y, good = _preds(strength=1.0)
    _, noise = _preds(seed=1)
    names = [f"valid_{i}_a_1.nii.gz" for i in range(len(y))]
    same = seed_mean_paired_auroc(y, [(noise, noise)] * 3, [n[:-12] for n in names], GROUPS, n_boot=200)
    assert (same["diff"] == 0).all() and (same["diff_low"] == 0).all()
    better = seed_mean_paired_auroc(y, [(good, noise), (good, noise)], None, GROUPS, n_boot=200)
    assert (better["diff_low"] > 0).all() and better["n_seeds"].eq(2).all()
    fit = slope([0, 0.5, 1, 0, 0.5, 1], [0.0, 0.05, 0.1, 0.01, 0.06, 0.09])
    assert math.isclose(fit["slope"], 0.09, abs_tol=1e-9) and fit["slope_low"] < 0.09 < fit["slope_high"]
    assert math.isnan(slope([1, 1], [0, 1])["slope"])


def test_context_rows_and_differences():
    y, good = _preds(strength=1.0)
    _, noise = _preds(seed=1)
    names = [f"valid_{i}_a_1.nii.gz" for i in range(len(y))]
    runs = {"ResNet": _frame(names, y, noise), "fusion": _frame(names, y, good), "ViT": _frame(names, y, good)}
    rows = context_rows(1.0, 0, runs, GROUPS, n_boot=100)
    assert tuple(rows.columns) == CONTEXT_COLUMNS and len(rows) == 6
    res = rows[rows["model"] == "ResNet"]
    assert res[["delta_vs_resnet", "delta_low", "delta_high"]].isna().all().all()
    assert (rows[rows["model"] == "fusion"]["delta_low"] > 0).all()
    sweep = pd.concat([context_rows(lam, s, runs, GROUPS, n_boot=50) for lam in (0.0, 1.0) for s in (0, 1)])
    assert context_slope(sweep)["n"] == 4
    diffs = context_differences({lam: {s: runs for s in (0, 1)} for lam in (0.0, 1.0)}, GROUPS, n_boot=50)
    assert list(diffs.index.get_level_values("group").unique()) == ["2D", "3D"]
    assert (diffs["diff"] > 0).all()
    bad = dict(runs, fusion=_frame(names[::-1], y[::-1], good[::-1]))
    with pytest.raises(ValueError, match="differ"):
        context_rows(1.0, 0, bad, GROUPS, n_boot=10)


def test_probe_features_and_adequacy():
    x = np.random.default_rng(0).uniform(-1, 1, (8, 32, 32)).astype(np.float32)
    f = slice_features(x)
    assert f.shape == (2 * 8 * 8 + 40,)
    np.testing.assert_allclose(slice_features(x[::-1]), f, rtol=1e-5, atol=1e-6)  # a set of slices
    y, good = _preds(strength=1.0)
    _, noise = _preds(seed=1)
    names = [f"valid_{i}_a_1.nii.gz" for i in range(len(y))]
    table = adequacy(_frame(names, y, good), _frame(names[::-1], y[::-1], noise[::-1]), GROUPS, n_boot=100)
    assert table.loc["2D", "adequate"] and table.loc["2D", "gap_low"] > 0
    table = adequacy(_frame(names, y, noise), _frame(names, y, good), GROUPS, n_boot=100)
    assert not table.loc["2D", "adequate"] and table.loc["2D", "gap"] < 0
