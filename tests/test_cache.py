"""ctlib.cache and ctlib.preprocess.Preprocessing: settings key, prepare (atomic, resumable, failure-tolerant), CLI."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ctrate_fixtures import Vol, label_vector, phantom_hu, write_snapshot

import ctlib.cache as cache_mod
import ctlib.preprocess as preprocess_mod
from ctlib import atomic
from ctlib.cache import PreparedVolumes, cache_dir, load_prepared, load_settings, prepare, prepared_path
from ctlib.data import CLASSES, DataError, load_cohort, read_hu, volume_relpath
from ctlib.prepare import main
from ctlib.preprocess import PREPROCESSING_VERSION, Preprocessing, preprocess

PREP = Preprocessing(size=(16, 18, 12), num_slices=6)


@pytest.fixture
def snapshot(tmp_path: Path) -> Path:
    vols = [Vol(f"train_{p}_a_{r}", label_vector("Emphysema") if p % 2 else label_vector(), seed=p * 10 + r)
            for p in range(1, 4) for r in (1, 2)]
    vols += [Vol("valid_1_a_1", label_vector("Cardiomegaly"), fixed=True, original=False, seed=5)]
    return write_snapshot(tmp_path / "snap", vols)


def _entries(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.load(p) for p in sorted(folder.glob("*.npy"))}


def test_preprocessing_key_and_validation() -> None:
    assert PREPROCESSING_VERSION == 2
    assert Preprocessing().key == "v2-214x214x240-n100-hu-1000_1000-native"
    ctclip = Preprocessing(size=(480, 480, 240), target_spacing=(0.75, 0.75, 1.5))
    assert ctclip.key == "v2-480x480x240-n100-hu-1000_1000-sp0.75x0.75x1.5"
    variants = [Preprocessing(), Preprocessing(size=(224, 224, 240)), Preprocessing(num_slices=99),
                Preprocessing(hu_range=(-1000.0, 400.0)), Preprocessing(hu_range=(-1000.5, 1000.0)), ctclip,
                Preprocessing(target_spacing=(0.75, 0.75, 1.25))]
    keys = [v.key for v in variants]
    assert len(set(keys)) == len(keys)
    assert all(re.fullmatch(r"[0-9a-z._-]+", k) for k in keys)
    assert Preprocessing(size=[214, 214, 240], hu_range=[-1000, 1000]) == Preprocessing()  # normalised
    assert Preprocessing().shape == (100, 214, 214)
    with pytest.raises(ValueError, match="num_slices"):
        Preprocessing(num_slices=300)
    with pytest.raises(ValueError, match="hu_range"):
        Preprocessing(hu_range=(1.0, 0.0))
    assert Preprocessing.from_dict(ctclip.to_dict()) == ctclip
    assert cache_dir("/c", ctclip) == Path("/c") / ctclip.key


def test_apply_is_preprocess() -> None:
    hu = phantom_hu((30, 26, 20))
    np.testing.assert_array_equal(PREP.apply(hu), preprocess(hu, size=(16, 18, 12), num_slices=6))
    p = Preprocessing(size=(16, 16, 12), num_slices=4, target_spacing=(1.0, 1.0, 2.0))
    np.testing.assert_array_equal(
        p.apply(hu, (0.7, 0.7, 1.5)),
        preprocess(hu, spacing=(0.7, 0.7, 1.5), target_spacing=(1.0, 1.0, 2.0), size=(16, 16, 12), num_slices=4))


def test_prepare_writes_entries_and_skips_on_rerun(snapshot: Path, tmp_path: Path) -> None:
    cohort = load_cohort(snapshot)
    report = prepare(cohort, tmp_path / "cache", PREP, workers=1, progress=False)
    out = cache_dir(tmp_path / "cache", PREP)
    assert report.cache_dir == out
    assert report.done == sorted(cohort["VolumeName"]) and report.skipped == [] and report.failed == {}
    for _, row in cohort.iterrows():
        path = prepared_path(out, row["VolumeName"])
        assert path.name == row["VolumeName"].removesuffix(".nii.gz") + ".npy"
        mm = load_prepared(out, row["VolumeName"])
        assert isinstance(mm, np.memmap) and mm.dtype == np.float16 and mm.shape == (6, 18, 16)
        np.testing.assert_array_equal(mm, PREP.apply(read_hu(row)).astype(np.float16))
    settings = json.loads((out / "preprocessing.json").read_text())
    assert settings["size"] == [16, 18, 12] and settings["num_slices"] == 6 and settings["key"] == PREP.key
    assert load_settings(out) == PREP
    assert (out / "failures.csv").read_text().strip() == "VolumeName,error"

    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*.npy")}
    again = prepare(cohort, tmp_path / "cache", PREP, workers=1, progress=False)
    assert again.done == [] and again.skipped == sorted(cohort["VolumeName"])
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.npy")} == mtimes
    assert "0 prepared, 7 reused, 0 failed" in again.summary()


def test_key_carries_the_preprocessing_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """Changed preprocessing code (a bumped version) never finds the old files."""
    old = PREP.key
    monkeypatch.setattr(preprocess_mod, "PREPROCESSING_VERSION", 3)
    assert PREP.key != old and PREP.key.startswith("v3-") and old.startswith("v2-")


def test_prepare_resumes_after_kill(snapshot: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cohort = load_cohort(snapshot)
    clean = prepare(cohort, tmp_path / "clean", PREP, workers=1, progress=False)
    reference = _entries(clean.cache_dir)

    calls = {"n": 0}
    real_write = cache_mod._write_npy

    def dying_write(f, arr):  # the 3rd save is killed halfway through writing
        calls["n"] += 1
        if calls["n"] == 3:
            f.write(b"\x93NUMPY partial")
            raise KeyboardInterrupt
        real_write(f, arr)

    monkeypatch.setattr(cache_mod, "_write_npy", dying_write)
    with pytest.raises(KeyboardInterrupt):
        prepare(cohort, tmp_path / "cache", PREP, workers=1, progress=False)
    out = cache_dir(tmp_path / "cache", PREP)
    partial = _entries(out)  # every entry present loads completely
    assert len(partial) == 2 and not list(out.glob(".*.tmp"))
    # a SIGKILLed worker leaves its temp file behind: simulate one (its pid is gone)
    stale = out / f".{cohort['VolumeName'][4].removesuffix('.nii.gz')}.npy.{atomic.HOST}.{2**22 + 12345}.tmp"
    stale.write_bytes(b"half a volume")
    monkeypatch.setattr(cache_mod, "_write_npy", real_write)

    report = prepare(cohort, tmp_path / "cache", PREP, workers=1, progress=False)
    assert report.skipped == sorted(n.removesuffix(".npy") + ".nii.gz" for n in partial)
    assert len(report.done) == len(cohort) - 2 and not set(report.done) & set(report.skipped)
    assert not stale.exists() and not list(out.glob(".*"))
    resumed = _entries(out)
    assert resumed.keys() == reference.keys()
    for name in reference:
        np.testing.assert_array_equal(resumed[name], reference[name])


def test_prepare_keeps_live_temp_files(tmp_path: Path) -> None:
    """Only this host's temps of dead pids, and other hosts' day-old temps, are stale."""
    out = tmp_path / "c"
    out.mkdir()
    host = atomic.HOST
    live = out / f".x.npy.{host}.{os.getppid()}.tmp"  # a process that is alive (our parent)
    dead = out / f".y.npy.{host}.{2**22 + 7}.tmp"
    other = "another-node-7" if host != "another-node-7" else "another-node-8"
    # another host's preparer: its pid means nothing here (it may be dead here and alive there)
    foreign = out / f".z.npy.{other}.{2**22 + 7}.tmp"
    old_foreign = out / f".w.npy.{other}.{2**22 + 8}.tmp"
    for p in (live, dead, foreign, old_foreign):
        p.write_bytes(b"")
    day_ago = os.path.getmtime(old_foreign) - cache_mod._FOREIGN_TEMP_AGE_S - 60
    os.utime(old_foreign, (day_ago, day_ago))
    assert cache_mod._clean_stale_temps(out) == 2
    assert live.exists() and foreign.exists() and not dead.exists() and not old_foreign.exists()


def test_prepare_reports_failures_without_stopping(snapshot: Path, tmp_path: Path) -> None:
    ds = snapshot / "dataset"
    broken = ds / volume_relpath("train_2_a_1.nii.gz")
    broken.write_bytes(broken.read_bytes()[:200])  # truncated gzip
    # an HU-ready volume put among the originals: the CSV intercept would rescale it twice
    twice = ds / volume_relpath("train_3_a_2.nii.gz")
    img = nib.Nifti1Image(phantom_hu().astype(np.int16), np.eye(4))
    nib.save(img, twice)
    cohort = load_cohort(snapshot)

    report = prepare(cohort, tmp_path / "cache", PREP, workers=1, progress=False)
    assert sorted(report.failed) == ["train_2_a_1.nii.gz", "train_3_a_2.nii.gz"]
    assert str(broken) in report.failed["train_2_a_1.nii.gz"]
    assert "double-rescale" in report.failed["train_3_a_2.nii.gz"]
    assert len(report.done) == len(cohort) - 2
    with open(report.cache_dir / "failures.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["VolumeName"] for r in rows] == sorted(report.failed)
    assert rows[0]["error"] == report.failed["train_2_a_1.nii.gz"]
    assert "failed" in report.summary() and "train_3_a_2.nii.gz" in report.summary()
    # a rerun retries only the failures
    again = prepare(cohort, tmp_path / "cache", PREP, workers=1, progress=False)
    assert again.done == [] and sorted(again.failed) == sorted(report.failed)


def test_prepare_any_exception_is_recorded(snapshot: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cohort = load_cohort(snapshot)

    def boom(row):
        if row["VolumeName"] == "train_1_a_1.nii.gz":
            raise MemoryError("no room")
        return read_hu(row)

    monkeypatch.setattr(cache_mod, "read_hu", boom)
    report = prepare(cohort, tmp_path / "cache", PREP, workers=1, progress=False)
    assert list(report.failed) == ["train_1_a_1.nii.gz"] and "MemoryError: no room" in report.failed[
        "train_1_a_1.nii.gz"]
    assert len(report.done) == len(cohort) - 1


def test_prepare_resampling_uses_csv_or_header_spacing(snapshot: Path, tmp_path: Path) -> None:
    cohort = load_cohort(snapshot)
    prep = Preprocessing(size=(16, 16, 12), num_slices=4, target_spacing=(1.4, 1.4, 1.5))
    # the fixed volume loses its metadata row: its NIfTI header spacing (0.7, 0.7, 1.5) is used
    i = cohort.index[cohort["hu_ready"]][0]
    cohort.loc[i, ["XYSpacing", "ZSpacing"]] = np.nan
    report = prepare(cohort, tmp_path / "cache", prep, workers=1, progress=False)
    assert report.failed == {}
    for _, row in cohort.iterrows():
        expected = prep.apply(read_hu(row), (0.7, 0.7, 1.5)).astype(np.float16)
        np.testing.assert_array_equal(load_prepared(report.cache_dir, row["VolumeName"]), expected)
    # an original without spacing cannot be resampled: recorded, not raised
    j = cohort.index[~cohort["hu_ready"]][0]
    cohort.loc[j, "XYSpacing"] = np.nan
    prepared_path(report.cache_dir, cohort.loc[j, "VolumeName"]).unlink()
    again = prepare(cohort, tmp_path / "cache", prep, workers=1, progress=False)
    assert "no voxel spacing" in again.failed[cohort.loc[j, "VolumeName"]]


def test_prepare_argument_errors(snapshot: Path, tmp_path: Path) -> None:
    cohort = load_cohort(snapshot)
    with pytest.raises(ValueError, match="workers"):
        prepare(cohort, tmp_path, PREP, workers=0)
    with pytest.raises(ValueError, match="lacks column"):
        prepare(cohort.drop(columns="hu_ready"), tmp_path, PREP)
    import pandas as pd

    with pytest.raises(ValueError, match="more than once"):
        prepare(pd.concat([cohort, cohort.iloc[:1]]), tmp_path, PREP)
    out = cache_dir(tmp_path / "c", PREP)
    out.mkdir(parents=True)
    (out / "preprocessing.json").write_text(json.dumps({**PREP.to_dict(), "num_slices": 5}))
    with pytest.raises(ValueError, match="other settings"):
        prepare(cohort, tmp_path / "c", PREP)


@pytest.mark.slow
def test_prepare_parallel_equals_serial(snapshot: Path, tmp_path: Path) -> None:
    cohort = load_cohort(snapshot)
    serial = prepare(cohort, tmp_path / "serial", PREP, workers=1, progress=False)
    parallel = prepare(cohort, tmp_path / "parallel", PREP, workers=2, progress=False)
    assert parallel.done == serial.done and parallel.failed == {}
    a, b = _entries(serial.cache_dir), _entries(parallel.cache_dir)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_cli(snapshot: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--profile/--data-root/--set: the split and one cache per distinct model input of the profile."""
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "--profile" in capsys.readouterr().out

    sets = ["--set", "size_2d=[16,18,12]", "--set", "size_3d=[16,16,12]", "--set", "num_slices=6",
            "--set", "target_spacing=null"]
    args = ["--profile", "smoke", "--data-root", str(snapshot), "--work-dir", str(tmp_path / "w"),
            "--workers", "1", "--no-progress", *sets]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "total: 14 prepared, 0 reused, 0 failed" in out  # 7 volumes x 2 input sizes
    caches = sorted((tmp_path / "w" / "cache").glob("*/v2-*"))
    assert [c.name.split("-")[1] for c in caches] == ["16x16x12", "16x18x12"]
    assert all(len(list(c.glob("*.npy"))) == 7 for c in caches)
    assert len(list((tmp_path / "w" / "cache").glob("*/split-seed0-*.csv"))) == 1
    assert main(args) == 0
    assert "total: 0 prepared, 14 reused" in capsys.readouterr().out

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--profile", "smoke", "--data-root", str(empty), "--work-dir", str(tmp_path / "w2")]) == 1
    assert "not a CT-RATE snapshot" in capsys.readouterr().err

    for bad in (["--set", "num_slices=500"], ["--set", "nonsense=1"], ["--workers", "0"]):
        with pytest.raises(SystemExit) as info:
            main(["--profile", "smoke", "--data-root", str(snapshot), *bad])
        assert info.value.code == 2


def test_cli_module_help() -> None:
    done = subprocess.run([sys.executable, "-m", "ctlib.prepare", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--data-root" in done.stdout


def test_data_error_is_value_error() -> None:
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------------------------------------------------
# PreparedVolumes
# ---------------------------------------------------------------------------------------------------------


def test_prepared_volumes(snapshot: Path, tmp_path: Path) -> None:
    cohort = load_cohort(snapshot)
    prep = Preprocessing(size=(16, 18, 12), num_slices=6)
    prepare(cohort, tmp_path / "cache", prep, workers=1, progress=False)
    ds = PreparedVolumes(cache_dir(tmp_path / "cache", prep), cohort)
    assert len(ds) == len(cohort) and ds.names == cohort["VolumeName"].tolist()
    assert ds.labels.shape == (len(cohort), 18) and ds.labels.dtype == np.float32
    np.testing.assert_array_equal(ds.labels, cohort[list(CLASSES)].to_numpy())
    for i in range(len(ds)):
        volume, labels, name = ds[i]
        assert volume.dtype == torch.float32 and volume.shape == (6, 18, 16)
        assert labels.dtype == torch.float32 and labels.shape == (18,)
        assert name == cohort["VolumeName"][i]
        expected = prep.apply(read_hu(cohort.iloc[i])).astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(volume.numpy(), expected)
        np.testing.assert_array_equal(labels.numpy(), cohort.loc[i, list(CLASSES)].to_numpy(np.float32))
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    batch, labels, names = next(iter(loader))
    assert batch.shape == (4, 6, 18, 16) and labels.shape == (4, 18) and len(names) == 4

    missing = cohort.copy()
    missing.loc[0, "VolumeName"] = "train_77_a_1.nii.gz"
    with pytest.raises(FileNotFoundError, match="train_77_a_1.nii.gz.*python -m ctlib.prepare"):
        PreparedVolumes(cache_dir(tmp_path / "cache", prep), missing)
