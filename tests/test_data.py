"""ctlib.data: cohort loading, HU conversion, preprocessing, splits, Table 1."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from ctrate_fixtures import (
    SMALL,
    Vol,
    cohort_frame,
    label_vector,
    phantom_hu,
    write_csv,
    write_fixed,
    write_original,
    write_snapshot,
)

from ctlib.data import (
    CLASSES,
    LABEL_COLUMNS,
    LABELS_CSV,
    METADATA_CSV,
    DataError,
    load_cohort,
    parse_volume_name,
    read_hu,
)
from ctlib.preprocess import preprocess
from ctlib.split import class_table, split_patients

COHORT_COLUMNS = ["VolumeName", "path", "patient", "scan", "reconstruction", "source_split", "hu_ready",
                  "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing", *CLASSES]


# ---------------------------------------------------------------------------------------------------------
# load_cohort
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def snapshot(tmp_path: Path) -> Path:
    vols = [
        Vol("train_1_a_1", label_vector("Emphysema", "Lung nodule")),
        Vol("train_1_a_2", label_vector("Emphysema"), fixed=True),  # both on disk: fixed wins
        Vol("train_1_b_1", label_vector(), original=False, fixed=True, spacing=(0.5, 0.5, 2.0)),
        Vol("train_2_a_1", label_vector("Cardiomegaly"), original=False),  # labelled, not downloaded
        Vol("train_3_a_1", None),  # on disk, no label row
        Vol("train_4_a_1", label_vector(), no_chest=True),  # not a chest CT
        Vol("train_5_a_1", label_vector(), metadata=False),  # original without slope/intercept
        Vol("train_5_a_2", label_vector(), original=False, fixed=True, metadata=False),  # fixed, kept
        Vol("train_10_a_1", label_vector("Pleural effusion"), intercept=-8192.0),
        Vol("valid_1_a_1", label_vector("Cardiomegaly", "Bronchiectasis"), slope=0.5),
        Vol("valid_2_a_1", label_vector(), original=False),
    ]
    return write_snapshot(tmp_path / "snap", vols)


KEPT = ["train_10_a_1.nii.gz", "train_1_a_1.nii.gz", "train_1_a_2.nii.gz", "train_1_b_1.nii.gz",
        "train_5_a_2.nii.gz", "valid_1_a_1.nii.gz"]


def test_parse_volume_name() -> None:
    assert parse_volume_name("valid_123_b_3.nii.gz") == {
        "source_split": "valid", "patient": "valid_123", "scan": "valid_123_b", "reconstruction": "3",
        "stem": "valid_123_b_3"}
    for bad in ("test_1_a_1.nii.gz", "train_1_1.nii.gz", "train_x_a_1.nii.gz", "train_1_a_1.nii.gz.tmp"):
        with pytest.raises(DataError, match="not a CT-RATE volume name"):
            parse_volume_name(bad)


def test_cohort_rows_columns_dtypes(snapshot: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="ctlib.data"):
        cohort = load_cohort(snapshot)
    assert cohort["VolumeName"].tolist() == KEPT  # sorted by VolumeName
    assert list(cohort.columns) == COHORT_COLUMNS
    assert isinstance(cohort.index, pd.RangeIndex) and cohort.index.tolist() == list(range(len(KEPT)))
    for c in ("VolumeName", "path", "patient", "scan", "source_split"):
        assert pd.api.types.is_string_dtype(cohort[c]), c
    assert cohort["reconstruction"].dtype == np.int64
    assert cohort["hu_ready"].dtype == bool
    for c in ("RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing"):
        assert cohort[c].dtype == np.float64, c
    for c in CLASSES:
        assert cohort[c].dtype == np.int64, c
    assert set(np.unique(cohort[list(CLASSES)].to_numpy())) <= {0, 1}

    row = cohort.set_index("VolumeName").loc["train_1_b_1.nii.gz"]
    assert (row["patient"], row["scan"], row["reconstruction"], row["source_split"]) == (
        "train_1", "train_1_b", 1, "train")
    assert row["XYSpacing"] == 0.5 and row["ZSpacing"] == 2.0
    v = cohort.set_index("VolumeName").loc["valid_1_a_1.nii.gz"]
    assert (v["RescaleSlope"], v["RescaleIntercept"]) == (0.5, -1024.0)
    assert v["Cardiomegaly"] == 1 and v["Bronchiectasis"] == 1 and v[list(CLASSES)].sum() == 2
    assert cohort.set_index("VolumeName").loc["train_10_a_1.nii.gz", "RescaleIntercept"] == -8192.0
    for p in cohort["path"]:
        assert Path(p).is_absolute() and Path(p).is_file()

    # One INFO line counts what was left out; none of it is an error.
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(lines) == 1
    line = lines[0]
    assert "6 volumes of 4 patients" in line
    assert "2 labelled but not on disk" in line
    assert "1 on disk without a label row" in line
    assert "1 not chest CT" in line
    assert "1 originals without RescaleSlope/RescaleIntercept (skipped)" in line
    assert "1 fixed volumes without metadata row (kept)" in line


def test_fixed_preferred_and_flags(snapshot: Path) -> None:
    cohort = load_cohort(snapshot).set_index("VolumeName")
    assert cohort.loc["train_1_a_2.nii.gz", "hu_ready"]
    assert "/dataset/train_fixed/train_1/train_1_a/" in cohort.loc["train_1_a_2.nii.gz", "path"]
    assert not cohort.loc["train_1_a_1.nii.gz", "hu_ready"]
    assert "/dataset/train/train_1/train_1_a/" in cohort.loc["train_1_a_1.nii.gz", "path"]
    # the fixed volume without a metadata row is kept (already HU), with unknown slope and spacing
    kept = cohort.loc["train_5_a_2.nii.gz"]
    assert kept["hu_ready"] and np.isnan(kept["RescaleIntercept"]) and np.isnan(kept["XYSpacing"])


def test_dataset_folder_itself_and_single_split(snapshot: Path, tmp_path: Path) -> None:
    assert load_cohort(snapshot / "dataset")["VolumeName"].tolist() == KEPT
    only_valid = write_snapshot(tmp_path / "v", [Vol("valid_7_a_1", label_vector("Atelectasis"))])
    cohort = load_cohort(only_valid)
    assert cohort["VolumeName"].tolist() == ["valid_7_a_1.nii.gz"]
    assert cohort["source_split"].tolist() == ["valid"]


def test_not_a_snapshot(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a CT-RATE snapshot"):
        load_cohort(tmp_path)


@pytest.mark.parametrize("which", [LABELS_CSV, METADATA_CSV])
def test_missing_csv_names_expected_path(snapshot: Path, which: dict[str, str]) -> None:
    path = snapshot / "dataset" / which["valid"]
    path.unlink()
    with pytest.raises(DataError, match="expected") as info:
        load_cohort(snapshot)
    assert str(path) in str(info.value)


def _rewrite_labels(snapshot: Path, header: list[str], rows: list[dict]) -> Path:
    path = snapshot / "dataset" / LABELS_CSV["train"]
    write_csv(path, header, rows)
    return path


def test_labels_header_must_be_exact(snapshot: Path) -> None:
    good = dict.fromkeys(LABEL_COLUMNS, 0) | {"VolumeName": "train_1_a_1.nii.gz"}
    misspelt = [c.replace("Coronary artery wall calcification", "Coronary arterial calcification")
                for c in LABEL_COLUMNS]
    path = _rewrite_labels(snapshot, misspelt, [])
    with pytest.raises(DataError) as info:
        load_cohort(snapshot)
    msg = str(info.value)
    assert str(path) in msg and "missing ['Coronary artery wall calcification']" in msg
    assert "unexpected ['Coronary arterial calcification']" in msg

    swapped = list(LABEL_COLUMNS)
    swapped[1], swapped[2] = swapped[2], swapped[1]
    _rewrite_labels(snapshot, swapped, [good])
    with pytest.raises(DataError, match="another order: column 1 is 'Arterial wall calcification'"):
        load_cohort(snapshot)

    _rewrite_labels(snapshot, [*LABEL_COLUMNS, "Extra"], [good | {"Extra": 1}])
    with pytest.raises(DataError, match=r"unexpected \['Extra'\]"):
        load_cohort(snapshot)


@pytest.mark.parametrize("bad", [2, "", "yes", -1])
def test_label_values_must_be_binary(snapshot: Path, bad: object) -> None:
    row = dict.fromkeys(LABEL_COLUMNS, 0) | {"VolumeName": "train_1_a_1.nii.gz", "Hiatal hernia": bad}
    path = _rewrite_labels(snapshot, list(LABEL_COLUMNS), [row])
    with pytest.raises(DataError) as info:
        load_cohort(snapshot)
    assert str(path) in str(info.value) and "'Hiatal hernia'" in str(info.value)


def _edit_metadata(snapshot: Path, name: str, **values: str) -> Path:
    path = snapshot / "dataset" / METADATA_CSV["train"]
    meta = pd.read_csv(path, dtype="str", keep_default_na=False)
    for column, value in values.items():
        meta.loc[meta["VolumeName"] == name, column] = value
    meta.to_csv(path, index=False)
    return path


def test_metadata_blank_values_skip_original(snapshot: Path, caplog: pytest.LogCaptureFixture) -> None:
    _edit_metadata(snapshot, "train_10_a_1.nii.gz", RescaleIntercept="", XYSpacing="")
    _edit_metadata(snapshot, "train_1_a_1.nii.gz", XYSpacing="", ZSpacing="")
    with caplog.at_level(logging.INFO, logger="ctlib.data"):
        cohort = load_cohort(snapshot).set_index("VolumeName")
    assert "train_10_a_1.nii.gz" not in cohort.index  # cannot be converted to HU
    assert "2 originals without RescaleSlope/RescaleIntercept (skipped)" in caplog.text
    assert np.isnan(cohort.loc["train_1_a_1.nii.gz", "XYSpacing"])  # spacing unknown is not an error
    assert np.isnan(cohort.loc["train_1_a_1.nii.gz", "ZSpacing"])


@pytest.mark.parametrize(("column", "value"), [("RescaleSlope", "one"), ("ZSpacing", "1.5mm"),
                                               ("XYSpacing", "[a, b]")])
def test_metadata_malformed_values(snapshot: Path, column: str, value: str) -> None:
    path = _edit_metadata(snapshot, "train_1_a_1.nii.gz", **{column: value})
    with pytest.raises(DataError) as info:
        load_cohort(snapshot)
    msg = str(info.value)
    assert str(path) in msg and column in msg and "train_1_a_1.nii.gz" in msg


# ---------------------------------------------------------------------------------------------------------
# read_hu
# ---------------------------------------------------------------------------------------------------------


def _row(path: Path, *, hu_ready: bool, slope: float = 1.0, intercept: float = -1024.0) -> dict:
    return {"path": str(path), "hu_ready": hu_ready, "RescaleSlope": slope, "RescaleIntercept": intercept}


def test_read_hu_originals_rescaled_once(snapshot: Path) -> None:
    cohort = load_cohort(snapshot).set_index("VolumeName")
    expected = phantom_hu()
    for name in ("train_1_a_1.nii.gz", "train_10_a_1.nii.gz", "valid_1_a_1.nii.gz"):  # -1024, -8192, slope 0.5
        hu = read_hu(cohort.loc[name])
        assert hu.dtype == np.float32 and hu.shape == SMALL
        np.testing.assert_array_equal(hu, expected)
    # stored 0 with intercept -1024 is -1024 HU; with -8192, -8192 is far below anything stored
    stored = np.asanyarray(nib.load(cohort.loc["train_1_a_1.nii.gz", "path"]).dataobj)
    assert stored.dtype == np.int16 and stored[0, 0, 0] == -3024 + 1024


def test_read_hu_stored_zero(tmp_path: Path) -> None:
    hu = phantom_hu()
    hu[3, 10, :] = -1024.0  # stored 0 with intercept -1024
    write_original(tmp_path / "o.nii.gz", hu, intercept=-1024.0)
    assert np.asanyarray(nib.load(tmp_path / "o.nii.gz").dataobj)[3, 10, 0] == 0
    assert read_hu(_row(tmp_path / "o.nii.gz", hu_ready=False))[3, 10, 0] == -1024.0


def test_read_hu_original_ignores_header_scaling(tmp_path: Path) -> None:
    """Originals: the CSV's slope/intercept on the raw stored values, never header scaling on top."""
    hu = phantom_hu()
    img = nib.Nifti1Image((hu + 1024).astype(np.int16), None)
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, tmp_path / "o.nii.gz")
    np.testing.assert_array_equal(read_hu(_row(tmp_path / "o.nii.gz", hu_ready=False)), hu)


@pytest.mark.parametrize("header_scaling", [False, True])
def test_read_hu_fixed_never_uses_csv(tmp_path: Path, header_scaling: bool) -> None:
    hu = phantom_hu(seed=3)
    write_fixed(tmp_path / "f.nii.gz", hu, header_scaling=header_scaling)
    # the CSV still carries the scanner's slope/intercept: they must not be applied
    out = read_hu(_row(tmp_path / "f.nii.gz", hu_ready=True, slope=1.0, intercept=-1024.0))
    np.testing.assert_array_equal(out, hu)
    assert out.dtype == np.float32


def test_read_hu_fixed_from_cohort(snapshot: Path) -> None:
    cohort = load_cohort(snapshot).set_index("VolumeName")
    np.testing.assert_array_equal(read_hu(cohort.loc["train_1_a_2.nii.gz"]), phantom_hu())
    np.testing.assert_array_equal(read_hu(cohort.loc["train_5_a_2.nii.gz"]), phantom_hu())


@pytest.mark.parametrize("corners", [-3024.0, -2048.0])
def test_read_hu_accepts_fov_corners_and_metal(tmp_path: Path, corners: float) -> None:
    hu = phantom_hu(corners=corners, metal=3500.0)
    hu[:, :, 0] = 3500.0  # a whole slice of metal streak: still far from "most voxels"
    write_original(tmp_path / "o.nii.gz", hu)
    out = read_hu(_row(tmp_path / "o.nii.gz", hu_ready=False))
    assert out.min() == corners and out.max() == 3500.0
    assert np.mean(out < -1100) > 0.15  # the corners really are there


def test_read_hu_squeezes_singleton_4d(tmp_path: Path) -> None:
    hu = phantom_hu()
    nib.save(nib.Nifti1Image((hu + 1024).astype(np.int16)[..., None], None), tmp_path / "o.nii.gz")
    out = read_hu(_row(tmp_path / "o.nii.gz", hu_ready=False))
    assert out.shape == SMALL
    np.testing.assert_array_equal(out, hu)


def _expect_data_error(row: dict, *fragments: str) -> str:
    with pytest.raises(DataError) as info:
        read_hu(row)
    msg = str(info.value)
    assert row["path"] in msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


def test_read_hu_errors_name_the_file(tmp_path: Path) -> None:
    hu = phantom_hu()
    _expect_data_error(_row(tmp_path / "absent.nii.gz", hu_ready=False), "not found")

    write_original(tmp_path / "t.nii.gz", hu)
    data = (tmp_path / "t.nii.gz").read_bytes()
    (tmp_path / "t.nii.gz").write_bytes(data[: len(data) // 2])
    _expect_data_error(_row(tmp_path / "t.nii.gz", hu_ready=False), "truncated or corrupt")

    (tmp_path / "g.nii.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"garbage" * 50)
    _expect_data_error(_row(tmp_path / "g.nii.gz", hu_ready=False))

    (tmp_path / "h.nii.gz").write_bytes(gzip.compress(b"\x00" * 100))
    _expect_data_error(_row(tmp_path / "h.nii.gz", hu_ready=False), "not a readable NIfTI")

    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), None), tmp_path / "2d.nii.gz")
    _expect_data_error(_row(tmp_path / "2d.nii.gz", hu_ready=False), "expected a 3D volume")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 2), np.int16), None), tmp_path / "4d.nii.gz")
    _expect_data_error(_row(tmp_path / "4d.nii.gz", hu_ready=False), "expected a 3D volume")

    bad = hu.copy()
    bad[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(bad, np.eye(4)), tmp_path / "nan.nii.gz")
    _expect_data_error(_row(tmp_path / "nan.nii.gz", hu_ready=True), "1 non-finite")

    _expect_data_error(_row(tmp_path / "t2.nii.gz", hu_ready=False, intercept=float("nan")), "not found")
    write_original(tmp_path / "o.nii.gz", hu)
    _expect_data_error(_row(tmp_path / "o.nii.gz", hu_ready=False, intercept=float("nan")),
                       "RescaleSlope/RescaleIntercept")


def test_read_hu_rejects_double_rescale(tmp_path: Path) -> None:
    """A fixed volume (already HU) given the CSV's intercept again sits ~1024 HU low: refused, explained."""
    write_fixed(tmp_path / "train_1_a_1.nii.gz", phantom_hu())
    msg = _expect_data_error(_row(tmp_path / "train_1_a_1.nii.gz", hu_ready=False, intercept=-1024.0),
                             "double-rescale", "below -1100 HU")
    assert "_fixed" in msg
    # a file written with the intercept already applied and a header applying it again: same symptom
    double = phantom_hu() - 1024
    img = nib.Nifti1Image((double + 1024).astype(np.int16), np.eye(4))
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, tmp_path / "d.nii.gz")
    _expect_data_error(_row(tmp_path / "d.nii.gz", hu_ready=True), "double-rescale")


def test_read_hu_rejects_unrescaled(tmp_path: Path) -> None:
    write_original(tmp_path / "o.nii.gz", phantom_hu(), intercept=-8192.0)
    _expect_data_error(_row(tmp_path / "o.nii.gz", hu_ready=False, intercept=0.0), "above 3000 HU",
                       "not rescaled")


# ---------------------------------------------------------------------------------------------------------
# preprocess
# ---------------------------------------------------------------------------------------------------------


def _reference(hu: np.ndarray, size: tuple, num_slices: int, hu_range=(-1000.0, 1000.0)) -> np.ndarray:
    """The steps literally as specified: clip -> crop/pad each axis -> scale -> centre slices -> (Z, Y, X)."""
    lo, hi = hu_range
    v = np.clip(hu.astype(np.float32), lo, hi)
    for axis, target in enumerate(size):
        n = v.shape[axis]
        if n > target:
            start = (n - target) // 2
            v = np.take(v, np.arange(start, start + target), axis=axis)
        elif n < target:
            before = (target - n) // 2
            pad = [(0, 0)] * 3
            pad[axis] = (before, target - n - before)
            v = np.pad(v, pad, constant_values=lo)
    v = v / np.float32(max(abs(lo), abs(hi)))
    z0 = (size[2] - num_slices) // 2
    return v[:, :, z0 : z0 + num_slices].transpose(2, 1, 0)


def test_preprocess_crop_pad_offsets_odd_sizes() -> None:
    # X: 7 -> 4 (crop start 1); Y: 3 -> 6 (pad 1 before, 2 after); Z: 5 -> 5
    x, y, z = np.meshgrid(np.arange(7), np.arange(3), np.arange(5), indexing="ij")
    hu = (100 * x + 10 * y + z).astype(np.float32)
    out = preprocess(hu, size=(4, 6, 5), num_slices=5)
    assert out.shape == (5, 6, 4) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 0, :], -1.0)  # pad before, air after scaling
    np.testing.assert_array_equal(out[:, 4:, :], -1.0)  # 2 after
    for zi in range(5):
        for yi in range(3):
            for xi in range(4):
                assert out[zi, 1 + yi, xi] == np.float32(100 * (xi + 1) + 10 * yi + zi) / np.float32(1000)
    np.testing.assert_allclose(out, _reference(hu, (4, 6, 5), 5), rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    ("shape", "size", "num_slices"),
    [((9, 4, 11), (5, 7, 8), 3), ((6, 13, 3), (6, 10, 9), 4), ((10, 10, 30), (7, 7, 13), 13),
     ((5, 5, 2), (5, 5, 20), 6)],
)
def test_preprocess_matches_literal_reference(shape: tuple, size: tuple, num_slices: int) -> None:
    hu = np.random.default_rng(0).uniform(-3024, 3500, shape).astype(np.float32)
    out = preprocess(hu, size=size, num_slices=num_slices)
    assert out.shape == (num_slices, size[1], size[0])
    np.testing.assert_allclose(out, _reference(hu, size, num_slices), rtol=0, atol=1e-7)


def test_preprocess_paper_defaults_range_and_centre_slices() -> None:
    # values encode the slice index so the kept slices can be identified: Z 300 -> 240 (crop 30) -> 100 (start 70)
    hu = np.broadcast_to(np.arange(300, dtype=np.float32) - 150, (230, 200, 300)).copy()
    hu[:5, :5, :] = -3024.0
    hu[100, 100, :] = 3500.0
    out = preprocess(hu)
    assert out.shape == (100, 214, 214) and out.dtype == np.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    np.testing.assert_allclose(out[:, 107, 0], (np.arange(100, 200) - 150) / 1000, atol=1e-7)
    np.testing.assert_array_equal(out[:, :7, :], -1.0)  # Y: 200 -> 214 pads 7 before
    np.testing.assert_array_equal(out[:, 207:, :], -1.0)  # and 7 after
    assert out[0, 100 + 7, 100 - 8] == 1.0  # metal clipped to 1000 HU; X: 230 -> 214 crops 8
    np.testing.assert_allclose(out, _reference(hu, (214, 214, 240), 100), rtol=0, atol=1e-7)


def test_preprocess_hu_range_sets_scale_and_pad() -> None:
    hu = np.full((4, 4, 4), 2500.0, np.float32)
    out = preprocess(hu, size=(6, 4, 4), num_slices=4, hu_range=(-500.0, 2000.0))
    np.testing.assert_array_equal(out[:, :, 0], -0.25)  # pad = -500 / 2000
    np.testing.assert_array_equal(out[:, :, 1:5], 1.0)


def test_preprocess_resampling_shape_and_values() -> None:
    hu = np.full((20, 30, 10), 40.0, np.float32)
    out = preprocess(hu, spacing=(0.5, 0.7, 2.0), target_spacing=(1.0, 1.4, 1.0), size=(10, 15, 20),
                     num_slices=20)
    assert out.shape == (20, 15, 10)
    np.testing.assert_allclose(out, 0.04, atol=1e-6)  # no padding: the resampled shape is (10, 15, 20)
    # round half up: 7 * 1 / 2 = 3.5 -> 4 slices, padded to 6 with 1 before and 1 after
    out = preprocess(np.zeros((4, 4, 7), np.float32), spacing=(1, 1, 1), target_spacing=(1, 1, 2),
                     size=(4, 4, 6), num_slices=6)
    np.testing.assert_array_equal(out[[0, 5]], -1.0)
    np.testing.assert_array_equal(out[1:5], 0.0)
    # a linear ramp stays linear inside the volume under trilinear interpolation
    ramp = np.broadcast_to(np.arange(40, dtype=np.float32)[:, None, None] * 10, (40, 4, 4)).copy()
    out = preprocess(ramp, spacing=(1, 1, 1), target_spacing=(2, 1, 1), size=(20, 4, 4), num_slices=4)
    np.testing.assert_allclose(np.diff(out[0, 0, 1:-1]), 0.02, atol=1e-6)


def test_preprocess_argument_errors() -> None:
    hu = np.zeros((4, 4, 4), np.float32)
    with pytest.raises(ValueError, match="num_slices=5 exceeds"):
        preprocess(hu, size=(4, 4, 4), num_slices=5)
    with pytest.raises(ValueError, match="hu_range"):
        preprocess(hu, hu_range=(1000.0, -1000.0))
    with pytest.raises(ValueError, match="hu_range"):
        preprocess(hu, hu_range=(-1000.0, float("inf")))
    with pytest.raises(ValueError, match="spacing .* is required"):
        preprocess(hu, target_spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="size must hold 3 values"):
        preprocess(hu, size=(4, 4))
    with pytest.raises(ValueError, match="positive integers"):
        preprocess(hu, size=(4, 0, 4))
    with pytest.raises(ValueError, match="target_spacing"):
        preprocess(hu, spacing=(1, 1, 1), target_spacing=(1, -1, 1))
    with pytest.raises(ValueError, match="3D"):
        preprocess(np.zeros((4, 4), np.float32), size=(4, 4, 4), num_slices=4)


# ---------------------------------------------------------------------------------------------------------
# split_patients and class_table
# ---------------------------------------------------------------------------------------------------------


def _patient_splits(cohort: pd.DataFrame, splits: pd.Series) -> pd.Series:
    per_patient = splits.groupby(cohort["patient"]).nunique()
    assert (per_patient == 1).all(), "a patient straddles splits"
    return splits.groupby(cohort["patient"]).first()


def test_split_patients_patient_disjoint_and_sized() -> None:
    cohort = cohort_frame(60, seed=1)
    # a patient with 2 scans x 2 reconstructions
    extra = [{"VolumeName": f"train_99_{s}_{r}.nii.gz", "patient": "train_99",
              **dict(zip(CLASSES, label_vector("Emphysema"), strict=True))} for s in "ab" for r in (1, 2)]
    cohort = pd.concat([cohort, pd.DataFrame(extra)], ignore_index=True)
    splits = split_patients(cohort, seed=0)
    assert splits.index.equals(cohort.index) and splits.name == "split"
    assert set(splits) == {"train", "val", "test"}
    assert splits[cohort["patient"] == "train_99"].nunique() == 1
    by_patient = _patient_splits(cohort, splits)
    counts = by_patient.value_counts()
    n = len(by_patient)
    assert abs(counts["train"] - 0.7 * n) <= 3 and abs(counts["val"] - 0.2 * n) <= 3
    assert abs(counts["test"] - 0.1 * n) <= 3


def test_split_patients_stratified() -> None:
    cohort = cohort_frame(60, seed=2)
    splits = split_patients(cohort, seed=0)
    per_patient = cohort.groupby("patient")[list(CLASSES)].max()
    psplit = _patient_splits(cohort, splits).reindex(per_patient.index).to_numpy()
    total = per_patient.sum().to_numpy()
    target = {"train": 0.7, "val": 0.2, "test": 0.1}

    def deviation(assign: np.ndarray) -> np.ndarray:
        """|positive patients in split - fraction * total|, per split and class (3, 18)."""
        return np.array([np.abs(per_patient[assign == s].sum().to_numpy() - r * total) for s, r in target.items()])

    for s in target:
        assert (per_patient[psplit == s].sum() > 0).all(), f"a class is absent from {s}"
    ours = deviation(psplit)
    assert ours.max() <= 4.0
    # random patient splits of the same cohort are clearly less balanced
    rng = np.random.default_rng(0)
    random = [deviation(rng.choice(list(target), size=len(per_patient), p=list(target.values()))).mean()
              for _ in range(20)]
    assert ours.mean() < 0.75 * np.median(random)


def test_split_patients_deterministic_and_seeded() -> None:
    cohort = cohort_frame(60, seed=3)
    a, b = split_patients(cohort, seed=7), split_patients(cohort, seed=7)
    pd.testing.assert_series_equal(a, b)
    assert not a.equals(split_patients(cohort, seed=8))
    # same cohort in another row order: same assignment per volume
    shuffled = cohort.sample(frac=1.0, random_state=0)
    pd.testing.assert_series_equal(split_patients(shuffled, seed=7).sort_index(), a)


@pytest.mark.parametrize("n", [3, 4, 5, 8])
def test_split_patients_tiny_cohorts(n: int) -> None:
    cohort = cohort_frame(n, seed=n)
    splits = split_patients(cohort, seed=0)
    assert set(_patient_splits(cohort, splits)) == {"train", "val", "test"}


@pytest.mark.parametrize("fractions", [(0.7, 0.2), (0.7, 0.2, 0.2), (0.8, 0.3, -0.1), (1.0, 0.0, 0.0)])
def test_split_patients_validates_fractions(fractions: tuple) -> None:
    with pytest.raises(ValueError, match="fractions"):
        split_patients(cohort_frame(10), fractions=fractions)


def test_class_table() -> None:
    cohort = cohort_frame(40, seed=4)
    splits = split_patients(cohort, seed=0)
    table = class_table(cohort, splits)
    assert table.index.tolist() == [*CLASSES, "Volumes"]
    assert table.columns.tolist() == ["Total", "Train", "Val", "Test"]
    assert (table.dtypes == np.int64).all()
    np.testing.assert_array_equal(table.loc[list(CLASSES), "Total"], cohort[list(CLASSES)].sum())
    np.testing.assert_array_equal(table[["Train", "Val", "Test"]].sum(axis=1), table["Total"])
    assert table.loc["Volumes"].tolist() == [len(cohort), *(int((splits == s).sum()) for s in ("train", "val", "test"))]
    val = cohort[splits == "val"]
    assert table.loc["Lung nodule", "Val"] == val["Lung nodule"].sum()
    with pytest.raises(ValueError, match="indexed like the cohort"):
        class_table(cohort, splits.iloc[1:])
    with pytest.raises(ValueError, match="unknown split"):
        class_table(cohort, splits.replace("val", "validation"))
