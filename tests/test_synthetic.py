"""The synthetic CT-RATE snapshot: layout, CSVs, intensities, determinism, labels and signatures."""

from __future__ import annotations

import csv
import subprocess
import sys
from functools import cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from ctlib import synthetic
from ctlib.data import (
    CLASSES,
    LABEL_COLUMNS,
    LABELS_CSV,
    METADATA_COLUMNS,
    METADATA_CSV,
    NO_CHEST_TXT,
    REPORT_COLUMNS,
    REPORTS_CSV,
    parse_volume_name,
    volume_relpath,
)
from ctlib.synthetic.anatomy import cavity_depth, heart_shape
from ctlib.synthetic.plan import draw_labels, plan
from ctlib.synthetic.scanner import phantom

SHAPE = (64, 64, 24)
SPACING = (5.5, 5.5, 10.0)  # the demo profile's resampled resolution: signatures must survive it
SPLITS = ("train", "valid")


@pytest.fixture(scope="module")
def snap(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    return synthetic.generate(out, n_patients=12, shape=SHAPE, spacing=SPACING, seed=3, progress=False)


def _labels(root: Path, split: str) -> pd.DataFrame:
    return pd.read_csv(root / LABELS_CSV[split])


def _meta(root: Path, split: str) -> pd.DataFrame:
    return pd.read_csv(root / METADATA_CSV[split])


def _written(root: Path, split: str) -> dict[str, Path]:
    return {p.name: p for p in (root / split).glob("*/*/*.nii.gz")}


def _hu(path: Path, intercept: float) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj).astype(np.float64) + intercept


# --------------------------------------------------------------------------------------------
# layout and CSVs
# --------------------------------------------------------------------------------------------
def test_returns_dataset_dir_and_csv_headers_are_exact(snap):
    assert snap.name == "dataset"
    for split in SPLITS:
        for rel, header in (
            (LABELS_CSV, LABEL_COLUMNS),
            (METADATA_CSV, METADATA_COLUMNS),
            (REPORTS_CSV, REPORT_COLUMNS),
        ):
            with open(snap / rel[split], newline="") as fh:
                assert tuple(next(csv.reader(fh))) == header
    assert len(METADATA_COLUMNS) == 44


def test_rows_files_and_tree(snap):
    missing_total = 0
    for split in SPLITS:
        labels = _labels(snap, split)
        names = list(labels.VolumeName)
        assert all(n.endswith(".nii.gz") for n in names)
        parsed = [parse_volume_name(n) for n in names]
        assert {p["source_split"] for p in parsed} == {split}
        assert min(int(p["patient"].split("_")[1]) for p in parsed) == 1  # ids start at 1 per split
        assert labels[list(CLASSES)].isin([0, 1]).all().all()
        assert labels[list(CLASSES)].dtypes.map(lambda d: d.kind == "i").all()
        # metadata and reports list the same volumes in the same order
        assert list(_meta(snap, split).VolumeName) == names
        assert list(pd.read_csv(snap / REPORTS_CSV[split]).VolumeName) == names
        written = _written(snap, split)
        assert set(written) <= set(names)
        for name, path in written.items():
            assert path == snap / volume_relpath(name)
        missing_total += len(set(names) - set(written))
    assert 1 <= missing_total <= 3  # a downloaded subset lacks some files


def test_no_chest_lists_name_written_non_chest_volumes(snap):
    for split in SPLITS:
        listed = (snap / NO_CHEST_TXT[split]).read_text().split()
        assert 1 <= len(listed) <= 2
        written = _written(snap, split)
        labels = _labels(snap, split).set_index("VolumeName")
        meta = _meta(snap, split).set_index("VolumeName")
        for name in listed:
            assert name in written
            assert labels.loc[name].sum() == 0
            hu = _hu(written[name], meta.loc[name, "RescaleIntercept"])
            # no lungs: hardly any lung-density voxels inside the field of view
            assert np.mean((hu > -950) & (hu < -700)) < 0.01


def test_multi_scan_and_multi_reconstruction_patients(snap):
    labels = _labels(snap, "train").set_index("VolumeName")
    parsed = [parse_volume_name(n) for n in labels.index]
    scans_per_patient: dict[str, set[str]] = {}
    recons_per_scan: dict[str, list[str]] = {}
    for p in parsed:
        scans_per_patient.setdefault(p["patient"], set()).add(p["scan"])
        recons_per_scan.setdefault(p["scan"], []).append(p["stem"] + ".nii.gz")
    assert any(len(s) >= 2 for s in scans_per_patient.values())
    pairs = [v for v in recons_per_scan.values() if len(v) == 2]
    assert pairs
    meta = _meta(snap, "train").set_index("VolumeName")
    written = _written(snap, "train")
    for a, b in pairs:
        assert (labels.loc[a] == labels.loc[b]).all()  # one acquisition, one set of labels
        assert meta.loc[a, "ConvolutionKernel"] != meta.loc[b, "ConvolutionKernel"]
        if a in written and b in written:
            ha = np.clip(_hu(written[a], meta.loc[a, "RescaleIntercept"]), -1000, 1000)
            hb = np.clip(_hu(written[b], meta.loc[b, "RescaleIntercept"]), -1000, 1000)
            assert not np.array_equal(ha, hb)  # different noise and kernel
            assert np.corrcoef(ha.ravel(), hb.ravel())[0, 1] > 0.97  # same anatomy and lesions


def test_metadata_values(snap):
    for split in SPLITS:
        meta = _meta(snap, split)
        assert (meta.XYSpacing == "[5.5, 5.5]").all()
        assert (meta.ZSpacing == 10.0).all()
        assert meta.PatientAge.str.fullmatch(r"\d{3}Y").all()
        assert meta.PatientSex.isin(["M", "F"]).all()
        assert meta.StudyDate.astype(str).str.fullmatch(r"20\d{6}").all()
        assert (meta.RescaleSlope == 1).all() and (meta.RescaleType == "HU").all()
        assert meta.RescaleIntercept.isin([-1024, -8192]).all()
        assert (meta.Rows == SHAPE[1]).all() and (meta.Columns == SHAPE[0]).all()
        assert (meta.NumberofSlices == SHAPE[2]).all()
        assert meta.Manufacturer.notna().all() and meta.ConvolutionKernel.notna().all()
        assert meta.CTDIvol.isna().all() and meta.GantryDetectorTilt.isna().all()  # blank like real data
    assert (_meta(snap, "train").RescaleIntercept == -8192).any()
    text = (snap / METADATA_CSV["train"]).read_text()
    assert ',"[5.5, 5.5]",' in text  # a list in a quoted string, like CT-RATE


_KEYWORDS = {
    "Medical material": ("pacemaker", "defibrillator", "port catheter", "coils"),
    "Arterial wall calcification": ("thoracic aorta",),
    "Cardiomegaly": ("heart is enlarged",),
    "Pericardial effusion": ("pericardial effusion",),
    "Coronary artery wall calcification": ("coronary",),
    "Hiatal hernia": ("hiatal hernia",),
    "Lymphadenopathy": ("lymph nodes",),
    "Emphysema": ("emphysema",),
    "Atelectasis": ("atelectasis",),
    "Lung nodule": ("nodule",),
    "Lung opacity": ("ground-glass",),
    "Pulmonary fibrotic sequela": ("fibrotic",),
    "Pleural effusion": ("pleural effusion",),
    "Mosaic attenuation pattern": ("mosaic",),
    "Peribronchial thickening": ("peribronchial",),
    "Consolidation": ("consolidation",),
    "Bronchiectasis": ("bronchiectasis",),
    "Interlobular septal thickening": ("septal",),
}


def test_reports_state_exactly_the_labels(snap):
    for split in SPLITS:
        labels = _labels(snap, split).set_index("VolumeName")
        reports = pd.read_csv(snap / REPORTS_CSV[split]).set_index("VolumeName")
        nochest = set((snap / NO_CHEST_TXT[split]).read_text().split())
        for name, row in labels.iterrows():
            findings = reports.loc[name, "Findings_EN"].lower()
            assert isinstance(reports.loc[name, "Impressions_EN"], str)
            if name in nochest:
                assert "does not include the thorax" in findings
                continue
            if row.sum() == 0:
                assert "no pleural or pericardial effusion" in findings
                continue
            for cls in CLASSES:
                mentioned = any(k in findings for k in _KEYWORDS[cls])
                assert mentioned == bool(row[cls]), (name, cls)


# --------------------------------------------------------------------------------------------
# intensities
# --------------------------------------------------------------------------------------------
def test_volumes_are_int16_raw_values_with_blank_scaling(snap):
    n_lung = n_normal = 0
    for split in SPLITS:
        meta = _meta(snap, split).set_index("VolumeName")
        labels = _labels(snap, split).set_index("VolumeName")
        nochest = set((snap / NO_CHEST_TXT[split]).read_text().split())
        for name, path in _written(snap, split).items():
            img = nib.load(path)
            assert img.shape == SHAPE
            assert img.get_data_dtype() == np.int16
            assert img.dataobj.slope == 1.0 and img.dataobj.inter == 0.0
            assert np.isnan(img.header["scl_slope"])  # blank header: not set
            assert np.allclose(img.affine, np.eye(4))
            stored = np.asarray(img.dataobj)
            assert stored.dtype == np.int16
            assert np.array_equal(img.get_fdata(), stored)  # get_fdata returns stored values
            hu = stored.astype(np.float64) + meta.loc[name, "RescaleIntercept"]
            assert (hu[0, 0, :] == -3024).all() and (hu[-1, -1, :] == -3024).all()  # outside the FOV
            inside = hu > -3024
            assert np.mean((hu[inside] >= -1100) & (hu[inside] <= 3000)) > 0.99
            assert np.mean((hu >= -1100) & (hu <= 3000)) > 0.6
            if name not in nochest:
                lung = hu[(hu > -950) & (hu < -700)]
                assert lung.size > 0.03 * hu.size
                assert -910 < np.median(lung) < -760
                n_lung += 1
                if labels.loc[name].sum() == 0:  # normal lung parenchyma near -850 HU
                    assert -890 < np.median(lung) < -820
                    n_normal += 1
            # the wrong conversion (ignoring the intercept) is implausible, as a loader must notice
            assert (
                np.mean((stored >= -1100) & (stored <= 3000)) < 0.6
                or meta.loc[name, "RescaleIntercept"] == -1024
            )
    assert n_lung >= 8 and n_normal >= 1


def test_fixed_copies_are_in_hu(snap):
    fixed = list((snap / "train_fixed").glob("*/*/*.nii.gz"))
    assert fixed
    meta = _meta(snap, "train").set_index("VolumeName")
    written = _written(snap, "train")
    for path in fixed:
        assert path == snap / volume_relpath(path.name, fixed=True)
        assert path.name in written  # also present in train/
        img = nib.load(path)
        assert img.get_data_dtype() == np.int16
        assert img.dataobj.slope == 1.0 and img.dataobj.inter == 0.0
        assert np.allclose(img.header.get_zooms(), SPACING)
        original = _hu(written[path.name], meta.loc[path.name, "RescaleIntercept"])
        assert np.array_equal(np.asarray(img.dataobj), original)
        # applying the metadata intercept again (the double rescale) is implausible
        shifted = np.asarray(img.dataobj).astype(float) + meta.loc[path.name, "RescaleIntercept"]
        assert np.mean((shifted >= -1100) & (shifted <= 3000)) < 0.5


# --------------------------------------------------------------------------------------------
# determinism, arguments, CLI
# --------------------------------------------------------------------------------------------
def test_deterministic_for_a_seed_whatever_the_workers(snap, tmp_path):
    again = synthetic.generate(
        tmp_path / "b", n_patients=12, shape=SHAPE, spacing=SPACING, seed=3, workers=2, progress=False
    )
    for split in SPLITS:
        for rel in (LABELS_CSV, METADATA_CSV, REPORTS_CSV, NO_CHEST_TXT):
            assert (again / rel[split]).read_bytes() == (snap / rel[split]).read_bytes()
    files = sorted(p.relative_to(snap) for p in snap.rglob("*.nii.gz"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.nii.gz"))
    for rel in files:
        assert np.array_equal(
            np.asarray(nib.load(snap / rel).dataobj), np.asarray(nib.load(again / rel).dataobj)
        )
        assert (snap / rel).read_bytes() == (again / rel).read_bytes()
    other = synthetic.generate(
        tmp_path / "c", n_patients=12, shape=SHAPE, spacing=SPACING, seed=4, progress=False
    )
    assert (other / LABELS_CSV["train"]).read_bytes() != (snap / LABELS_CSV["train"]).read_bytes()
    a = np.asarray(nib.load(snap / volume_relpath("train_2_a_1.nii.gz")).dataobj)
    b = np.asarray(nib.load(other / volume_relpath("train_2_a_1.nii.gz")).dataobj)
    assert not np.array_equal(a, b)


def test_refuses_to_overwrite_unless_asked(tmp_path):
    kw = dict(n_patients=2, shape=(24, 24, 12), spacing=(14.0, 14.0, 20.0), progress=False)
    root = synthetic.generate(tmp_path, **kw)
    marker = root / "stale.txt"
    marker.write_text("old")
    with pytest.raises(FileExistsError, match="overwrite"):
        synthetic.generate(tmp_path, **kw)
    assert marker.exists()
    synthetic.generate(tmp_path, overwrite=True, **kw)
    assert not marker.exists() and (root / LABELS_CSV["valid"]).exists()


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"n_patients": 1}, "n_patients"),
        ({"shape": (64, 64)}, "shape"),
        ({"spacing": (1.0, -1.0, 1.0)}, "spacing"),
        ({"workers": 0}, "workers"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        synthetic.generate(tmp_path, **kwargs)
    assert not (tmp_path / "dataset").exists()


def test_cli_help_and_snapshot(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        synthetic.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "CT-RATE" in text and "--overwrite" in text and "--workers" in text
    argv = [
        "--out",
        str(tmp_path),
        "--patients",
        "3",
        "--shape",
        "24",
        "24",
        "12",
        "--spacing",
        "14",
        "14",
        "20",
        "--seed",
        "1",
        "--quiet",
    ]
    assert synthetic.main(argv) == 0
    root = tmp_path / "dataset"
    assert len(_labels(root, "train")) + len(_labels(root, "valid")) >= 3
    assert any(root.glob("train/*/*/*.nii.gz"))
    assert synthetic.main(argv) == 2  # refuses a non-empty dataset/
    assert "overwrite" in capsys.readouterr().err
    res = subprocess.run(
        [sys.executable, "-m", "ctlib.synthetic", "--help"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0 and "usage" in res.stdout


# --------------------------------------------------------------------------------------------
# labels: Table 1 prevalence and co-occurrence
# --------------------------------------------------------------------------------------------
TABLE1_TOTAL = {
    "Lung nodule": 1393,
    "Mosaic attenuation pattern": 268,
    "Medical material": 425,
    "Coronary artery wall calcification": 793,
    "Lung opacity": 1141,
}


def test_prevalence_follows_table1():
    for cls, total in TABLE1_TOTAL.items():
        assert synthetic.PREVALENCE[cls] == pytest.approx(total / 3000)
    assert set(synthetic.PREVALENCE) == set(CLASSES) == set(synthetic.SIGNATURES)
    labels = draw_labels(np.random.default_rng(0), 20000)
    p = np.array([synthetic.PREVALENCE[c] for c in CLASSES])
    se = np.sqrt(p * (1 - p) / len(labels))
    assert np.all(np.abs(labels.mean(axis=0) - p) < 4 * se + 1e-3)
    # the labels of a planned snapshot (scans, repeat scans) keep the marginals
    vols = plan(3000, seed=5)
    scans = {(v.base, v.scan): v.labels for v in vols if v.kind == "chest"}
    lab = np.array(list(scans.values()))
    se = np.sqrt(p * (1 - p) / len(lab))
    assert np.all(np.abs(lab.mean(axis=0) - p) < 4.5 * se)


def test_realistic_cooccurrence():
    lab = draw_labels(np.random.default_rng(1), 20000).astype(bool)
    col = {c: lab[:, i] for i, c in enumerate(CLASSES)}

    def lift(a: str, b: str) -> float:
        return col[b][col[a]].mean() / col[b].mean()

    assert lift("Arterial wall calcification", "Coronary artery wall calcification") > 1.8
    assert lift("Pleural effusion", "Atelectasis") > 1.5
    assert lift("Pleural effusion", "Cardiomegaly") > 1.5
    assert lift("Pleural effusion", "Pericardial effusion") > 1.5
    assert lift("Consolidation", "Lung opacity") > 1.5
    assert lift("Pulmonary fibrotic sequela", "Bronchiectasis") > 1.5
    # the 3D classes are independent of every other class: no co-occurrence shortcut to them
    for c3 in synthetic.class_groups()["3D"]:
        others = np.delete(lab, CLASSES.index(c3), axis=1)
        y = col[c3]
        for k in range(others.shape[1]):
            assert abs(y[others[:, k]].mean() - y[~others[:, k]].mean()) < 0.03
    vols = plan(400, seed=2)
    age = np.array([v.age for v in vols if v.kind == "chest"])
    calc = np.array(
        [v.labels[CLASSES.index("Coronary artery wall calcification")] for v in vols if v.kind == "chest"]
    )
    assert age[calc == 1].mean() > age[calc == 0].mean() + 5  # calcification comes with age


def test_snapshot_split_proportions():
    vols = plan(300, seed=0)
    patients = {(v.split, v.base[2]) for v in vols}
    n_valid = sum(s == "valid" for s, _ in patients)
    assert len(patients) == 300 and n_valid == 45
    scans = {(v.split, v.base[2], v.scan) for v in vols}
    assert 0.10 < (len(scans) - 300) / 300 < 0.2  # ~15% repeat scans
    assert 0.06 < (len(vols) - len(scans)) / len(scans) < 0.14  # ~10% second reconstructions
    assert 0.01 < np.mean([not v.written for v in vols]) < 0.04
    assert 0.02 < np.mean([v.fixed for v in vols]) < 0.05
    assert 0.02 < np.mean([v.intercept == -8192 for v in vols]) < 0.05
    assert sum(v.kind != "chest" for v in vols) == 3  # 2 in train (>= 150 scans), 1 in valid


# --------------------------------------------------------------------------------------------
# every labelled class is drawn with its signature (forced labels, same anatomy and noise)
# --------------------------------------------------------------------------------------------
@cache
def _ph(labels: tuple[str, ...], seed: int, shape=SHAPE, spacing=SPACING):
    return phantom({c: 1 for c in labels}, seed=seed, shape=shape, spacing=spacing)


def _pair(cls: str, seed: int):
    off, on = _ph((), seed), _ph((cls,), seed)
    return off.hu.astype(float), on.hu.astype(float), on


def _coords(ph):
    g = ph.grid
    return np.meshgrid(g.x, g.y, g.z, indexing="ij")


def _count(region: np.ndarray, v: np.ndarray, lo: float, hi: float) -> int:
    """Voxels of ``region`` with HU in ``(lo, hi)``."""
    return int((region & (v > lo) & (v < hi)).sum())


def _in_lung_off(off: np.ndarray) -> np.ndarray:
    return (off > -950) & (off < -700)


@pytest.mark.parametrize("cls", CLASSES)
def test_signature_is_drawn_in_the_centre_slices(cls):
    """Every class changes the volume, and the change survives the demo's centre 16 of 24 slices."""
    for seed in (0, 1):
        off, on, _ = _pair(cls, seed)
        diff = np.abs(on - off)
        assert diff.max() > 40
        centre = diff[:, :, 4:20]
        assert centre.max() > 40
        assert (centre > 40).sum() >= 3


def test_no_label_no_lesion():
    """The unlabelled volume equals the labelled one outside the drawn lesion."""
    off = _ph((), 0).hu
    again = phantom({}, seed=0, shape=SHAPE, spacing=SPACING).hu
    assert np.array_equal(off, again)
    assert off.max() < 2000


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_medical_material_is_metal_only_when_labelled(seed):
    off, on, _ = _pair("Medical material", seed)
    assert on.max() > 2000 and off.max() < 2000
    others = tuple(c for c in CLASSES if c != "Medical material")
    assert _ph(others, seed).hu.max() < 2000


def test_arterial_wall_calcification_on_the_aorta():
    for seed in (0, 1):
        off, on, ph = _pair("Arterial wall calcification", seed)
        up = (on - off) > 150
        assert up.sum() > 0 and on[up].max() > 300
        X, Y, Z = _coords(ph)
        pts = np.stack([X[up], Y[up], Z[up]], axis=1)
        a = ph.anatomy
        dmin = np.full(len(pts), np.inf)
        for p0, p1, r0, _ in a.aorta:
            p0, d = np.asarray(p0), np.subtract(p1, p0)
            t = np.clip(((pts - p0) @ d) / (d @ d), 0, 1)
            dmin = np.minimum(dmin, np.linalg.norm(pts - p0 - t[:, None] * d, axis=1) - r0)
        assert np.all(dmin < 12.0)  # at the aortic wall, not elsewhere


def test_cardiomegaly_enlarges_the_heart():
    for seed in (0, 1):
        off, on, ph = _pair("Cardiomegaly", seed)
        X, Y, _ = _coords(ph)
        cavity = cavity_depth(ph.anatomy, X, Y) > 5
        assert _count(cavity, on, 0, 100) > 1.12 * _count(cavity, off, 0, 100)
        assert _in_lung_off(on).sum() < 0.93 * _in_lung_off(off).sum()


def test_pericardial_effusion_is_a_fluid_rim():
    for seed in (0, 1):
        off, on, ph = _pair("Pericardial effusion", seed)
        X, Y, Z = _coords(ph)
        (hx, hy, hz), (ra, rb, rc), _ = heart_shape(ph.anatomy, ph.lesions)
        near = np.sqrt((X - hx) ** 2 + (Y - hy) ** 2) < max(ra, rb) + 35
        assert _count(near, on, -10, 30) > _count(near, off, -10, 30) + 20


def test_coronary_calcification_on_the_heart():
    for seed in (0, 1, 2):
        off, on, ph = _pair("Coronary artery wall calcification", seed)
        X, Y, Z = _coords(ph)
        (hx, hy, hz), (ra, rb, rc), _ = heart_shape(ph.anatomy, ph.lesions)
        # + half a slice: the chest's z is sampled at 12 mm here (the nodule column's still slots shorten it)
        near = np.sqrt((X - hx) ** 2 + (Y - hy) ** 2 + (Z - hz) ** 2) < max(ra, rb, rc) + 10 + 0.5 * ph.grid.hz
        assert _count(near, on, 250, np.inf) > _count(near, off, 250, np.inf)
        assert ((on - off) > 150)[~near].sum() == 0


def test_hiatal_hernia_has_gas_behind_the_heart():
    for seed in (0, 1):
        off, on, ph = _pair("Hiatal hernia", seed)
        X, Y, Z = _coords(ph)
        new_gas = (on < -700) & (off > -300)
        assert new_gas.sum() > 3
        (hx, hy, hz), _, _ = heart_shape(ph.anatomy, ph.lesions)
        assert Y[new_gas].mean() > hy  # posterior to the heart centre
        assert Z[new_gas].mean() < hz + 10


def _class_mask(ph, cls: str) -> np.ndarray:
    return (ph.truth.mask() >> CLASSES.index(cls)) & 1 == 1


def test_lymphadenopathy_is_an_enlarged_node():
    """An enlarged node (short axis 16-24 mm) replaces the small normal node (6-8 mm) every chest has at the
    station: one axial slice shows a node larger than any normal one (a 2D finding)."""
    for seed in (0, 1):
        off, on, ph = _pair("Lymphadenopathy", seed)
        X, _, _ = _coords(ph)
        node = _class_mask(ph, "Lymphadenopathy")
        assert node.sum() > 10
        assert 10 < np.median(on[node]) < 80  # (an airway drawn later may cross a node's edge)
        assert np.abs(X[node] - ph.anatomy.bx).max() < 90  # mediastinum and hila
        assert np.mean(on[node] - off[node] > 40) > 0.3  # mostly mediastinal fat in the negative
        lab, n = ndimage.label(node)
        assert n >= 1
        widest = max(min(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) for sl in ndimage.find_objects(lab))
        assert widest * SPACING[0] >= 11.0  # >= 2 px of 5.5 mm across: larger than a normal node
    assert all(3.0 <= r <= 4.0 for r in _ph((), 0).anatomy.normal_nodes.values())


def test_emphysema_has_lung_below_minus_950():
    for seed in (0, 1):
        off, on, _ = _pair("Emphysema", seed)
        lung = _in_lung_off(off)
        assert np.mean(off[lung] < -950) < 0.01
        assert np.mean(on[lung] < -950) > 0.08


def test_atelectasis_is_dense_lower_lung():
    for seed in (0, 1):
        off, on, ph = _pair("Atelectasis", seed)
        _, _, Z = _coords(ph)
        dense = _in_lung_off(off) & (on > -300)
        assert dense.sum() > 5
        assert Z[dense].mean() < 0


def test_lung_nodule_is_the_order_of_a_columns_discs():
    """A positive is its negative twin with the first slots of every column rotated: the same slices (as bytes)
    in another order; the nodule's mask is the large discs, dense in the positive."""
    from ctlib.synthetic import column

    for seed in (0, 1, 2):
        off, on, ph = _pair("Lung nodule", seed)
        assert sorted(on[:, :, k].tobytes() for k in range(on.shape[2])) == sorted(
            off[:, :, k].tobytes() for k in range(off.shape[2]))
        assert not np.array_equal(on, off)
        lay = ph.anatomy.columns
        assert len(lay.columns) == column.N_COLUMNS
        np.testing.assert_array_equal(on, off[:, :, lay.twin_permutation()])
        nod = _class_mask(ph, "Lung nodule")
        lab, n = ndimage.label(nod)
        assert n == column.N_COLUMNS
        for sl in ndimage.find_objects(lab):
            assert sl[2].stop - sl[2].start == column.A * lay.group  # the large discs' slots
        assert on[nod].mean() > -250 and off[nod].mean() < on[nod].mean() - 200  # a thin disc below in the twin


def test_lung_opacity_is_ground_glass():
    for seed in (0, 1):
        off, on, _ = _pair("Lung opacity", seed)
        ggo = _in_lung_off(off) & (on > -720) & (on < -350)
        assert ggo.sum() > 15


def test_fibrotic_sequela_is_denser_lung_only():
    for seed in (0, 1):
        off, on, _ = _pair("Pulmonary fibrotic sequela", seed)
        diff = on - off
        assert (diff > 200).sum() > 3
        assert (diff < -100).sum() == 0


def test_pleural_effusion_is_fluid_at_the_dependent_base():
    for seed in (0, 1):
        off, on, ph = _pair("Pleural effusion", seed)
        X, Y, Z = _coords(ph)
        a = ph.anatomy
        base = (Y > a.cyc) & (Z < 10) & (cavity_depth(a, X, Y) > 0)
        assert _count(base, on, -20, 45) > _count(base, off, -20, 45) + 30


def test_mosaic_attenuation_is_a_patchwork_both_ways():
    for seed in (0, 1):
        off, on, _ = _pair("Mosaic attenuation pattern", seed)
        lung = _in_lung_off(off)
        d = (on - off)[lung]
        assert np.mean(d < -30) > 0.2 and np.mean(d > 30) > 0.2


def test_peribronchial_thickening_thickens_airway_walls():
    for seed in (0, 1):
        off, on, _ = _pair("Peribronchial thickening", seed)
        diff = on - off
        assert (diff > 100).sum() > 5
        # thicker walls add soft tissue; only a few hilar vessel voxels become mediastinal fat
        assert (diff < -100).sum() < 0.1 * (diff > 100).sum()


def test_consolidation_is_dense_with_air_bronchograms():
    for seed in (0, 1):
        off, on, ph = _pair("Consolidation", seed)
        dense = _in_lung_off(off) & (on > -200)
        assert dense.sum() > 30
        # air bronchograms: air-like voxels inside the consolidation, flanked by dense lung in-plane
        area = ndimage.binary_closing(np.abs(on - off) > 300, structure=np.ones((3, 3, 1)), iterations=2)
        flank = ndimage.convolve((on > -200).astype(int), np.ones((3, 3, 1), int), mode="constant")
        assert (area & (on < -450) & (flank >= 4)).sum() >= 1


def test_bronchiectasis_is_a_tube_through_many_slices():
    for seed in (0, 1):
        off, on, _ = _pair("Bronchiectasis", seed)
        assert ((on - off) < -80).sum() > 5  # the dilated lumina replace lung
        lab, n = ndimage.label(np.abs(on - off) > 100)
        assert n >= 1
        extents = [s[2].stop - s[2].start for s in ndimage.find_objects(lab)]
        assert max(extents) >= 6  # >= 60 mm at 10 mm slices: a tube, not a sphere


def test_septal_thickening_lies_in_the_periphery():
    for seed in (0, 1):
        off, on, ph = _pair("Interlobular septal thickening", seed)
        X, Y, _ = _coords(ph)
        up = (on - off) > 80
        assert up.sum() > 20
        depth = cavity_depth(ph.anatomy, X[up], Y[up])
        assert np.mean(depth < 35) > 0.9


def test_resolution_independent_placement():
    """The same seed puts an enlarged node at the same place of the chest (reference mm: the grid's
    coordinates; where the chest lies along the volume's slices depends on the lung-nodule column's still
    slots) at 2.75 and at 5.5 mm pixels."""
    centres = []
    for shape, spacing in ((SHAPE, SPACING), ((128, 128, 48), (2.75, 2.75, 5.0))):
        on = phantom({"Lymphadenopathy": 1}, seed=7, shape=shape, spacing=spacing)
        up = (on.truth.mask() >> CLASSES.index("Lymphadenopathy")) & 1 == 1
        X, Y, Z = np.meshgrid(on.grid.x, on.grid.y, on.grid.z, indexing="ij")
        centres.append(np.array([X[up].mean(), Y[up].mean(), Z[up].mean()]))
    assert np.linalg.norm(centres[0] - centres[1]) < 10.0
