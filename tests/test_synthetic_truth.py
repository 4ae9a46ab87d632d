"""The lesion truth sidecar of the synthetic snapshot: format, agreement with the drawing, model frame."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from ctlib import synthetic
from ctlib.data import CLASSES, LABELS_CSV, load_cohort, read_hu, volume_relpath
from ctlib.preprocess import Preprocessing
from ctlib.synthetic.scanner import phantom
from ctlib.synthetic.truth import LESION_COLUMNS, save_mask

SHAPE = (64, 64, 24)
SPACING = (5.5, 5.5, 10.0)


@pytest.fixture(scope="module")
def snap(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("truth")
    synthetic.generate(out, n_patients=10, shape=SHAPE, spacing=SPACING, seed=4, progress=False)
    return out


def test_sidecar_layout_and_header(snap):
    assert (snap / "truth" / "lesions.csv").read_text().splitlines()[0] == ",".join(LESION_COLUMNS)
    table = synthetic.lesion_table(snap)
    assert list(table.columns) == list(LESION_COLUMNS)
    assert set(table["class"]) <= set(CLASSES)
    assert synthetic.lesion_table(snap / "dataset").equals(table)  # dataset/ itself is accepted
    written = [p.name for s in ("train", "valid") for p in (snap / "dataset" / s).glob("*/*/*.nii.gz")]
    masks = sorted(p.name for p in (snap / "truth" / "masks").glob("*.npz"))
    assert masks == sorted(f"{n}.npz" for n in written)  # one per written volume, non-chest ones too


def test_masks_agree_with_labels_and_rows(snap):
    labels = pd.concat([pd.read_csv(snap / "dataset" / LABELS_CSV[s]) for s in ("train", "valid")])
    labels = labels.set_index("VolumeName")
    table = synthetic.lesion_table(snap)
    cohort = load_cohort(snap / "dataset")
    checked = 0
    for _, row in cohort.iterrows():
        name = row["VolumeName"]
        with np.load(snap / "truth" / "masks" / f"{name}.npz") as z:
            packed = z["mask"]
        assert packed.dtype == np.uint32 and packed.shape == SHAPE
        m = synthetic.lesion_masks(snap, name)
        assert m.shape == (18, *SHAPE) and m.dtype == bool
        drawn = m.reshape(18, -1).any(axis=1)
        lab = labels.loc[name, list(CLASSES)].to_numpy().astype(bool)
        assert not (drawn & ~lab).any(), name  # nothing is drawn that is not labelled
        # every labelled class is drawn (the whole phantom fits this field of view)
        assert (drawn == lab).all(), (name, [c for c, d, x in zip(CLASSES, drawn, lab, strict=True) if d != x])
        rows = table[table["VolumeName"] == name]
        assert set(rows["class"]) == {c for c, d in zip(CLASSES, drawn, strict=True) if d}
        for cls, grp in rows.groupby("class"):
            k = CLASSES.index(cls)
            cover = np.zeros(SHAPE, bool)
            for r in grp.itertuples():
                assert r.x0 <= r.x < r.x1 and r.y0 <= r.y < r.y1 and r.z0 <= r.z < r.z1
                cover[r.x0:r.x1, r.y0:r.y1, r.z0:r.z1] = True
            assert not (m[k] & ~cover).any()  # the boxes hold every mask voxel of the class
            assert list(grp["lesion"]) == list(range(len(grp)))
        checked += int(lab.any())
    assert checked >= 5


def test_fixed_reupload_has_the_original_geometry(snap):
    cohort = load_cohort(snap / "dataset")
    fixed = cohort[cohort["hu_ready"]]
    assert len(fixed)
    for _, row in fixed.iterrows():
        # one mask per VolumeName: the fixed re-upload holds the same voxels as its original
        original = snap / "dataset" / volume_relpath(row["VolumeName"])
        stored = np.asarray(nib.load(original).dataobj).astype(np.float32) + float(row["RescaleIntercept"])
        np.testing.assert_array_equal(read_hu(row), stored)
        assert synthetic.lesion_masks(snap, row["VolumeName"]).shape == (18, *SHAPE)


@pytest.mark.parametrize(
    "cls", ["Consolidation", "Pleural effusion", "Coronary artery wall calcification", "Atelectasis",
            "Hiatal hernia", "Emphysema"]
)
def test_mask_lies_where_the_signature_changed_the_volume(cls):
    """(2D classes; a 3D class's lesion sits where a negative has a vessel of the same HU: see
    test_synthetic.py, test_lung_nodule_is_a_sphere_below_a_cut_vessel.)"""
    kw = dict(seed=2, shape=(128, 128, 48), spacing=(2.75, 2.75, 5.0))
    off = phantom({}, **kw)
    on = phantom({cls: 1}, **kw)
    k = CLASSES.index(cls)
    m = (on.truth.mask() >> k) & 1 == 1
    assert m.any() and not (off.truth.mask() != 0).any()
    changed = np.abs(on.hu.astype(float) - off.hu) > 60
    # most mask voxels changed, and the changed voxels lie in the mask or one voxel from it (partial
    # volume at the edges, the kernel's blur)
    assert changed[m].mean() > 0.6
    near = ndimage.binary_dilation(m, np.ones((3, 3, 3), bool))
    assert (changed & near).sum() > 0.9 * changed.sum()


@pytest.mark.parametrize(
    "prep, spacing, shape",
    [
        (Preprocessing(size=(40, 40, 20), num_slices=12, target_spacing=(5.5, 5.5, 10.0)), (2.75, 2.75, 5.0),
         (96, 72, 44)),  # resampling 48x36x22, then crop x and z, pad y to 40x40x20
        (Preprocessing(size=(30, 50, 16), num_slices=10), (1.0, 1.0, 1.0), (41, 37, 23)),  # crop x/z, pad y
    ],
)
def test_model_frame_masks_land_where_preprocess_puts_the_lesion(tmp_path, prep, spacing, shape):
    """A mask drawn around a bright cube lands exactly where preprocessing puts the cube."""
    hu = np.full(shape, -1000.0, np.float32)
    mask = np.zeros(shape, np.uint32)
    lo = (shape[0] // 2 - 7, shape[1] // 3, shape[2] // 2 - 3)
    box = tuple(slice(a, a + 9) for a in lo)
    hu[box] = 1000.0
    k = CLASSES.index("Lung nodule")
    mask[box] = 1 << k
    name = "train_1_a_1.nii.gz"
    save_mask(tmp_path, name, mask)
    framed = synthetic.lesion_masks_for_model(tmp_path, name, prep, spacing)
    assert framed.shape == (18, *prep.shape) and framed.dtype == bool
    cube = prep.apply(hu, spacing) >= 0.0  # at least half covered: the mask's rule too
    assert cube.sum() > 8
    np.testing.assert_array_equal(framed[k], cube)
    assert not framed[np.arange(18) != k].any()


def test_lesion_masks_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="lesions.csv"):
        synthetic.lesion_table(tmp_path)
    with pytest.raises(FileNotFoundError, match="train_9_a_1"):
        synthetic.lesion_masks(tmp_path, "train_9_a_1")


def test_stored_volume_and_mask_share_a_frame(snap):
    """The mask indexes the stored NIfTI array: a nodule's mask voxels are denser than lung around them."""
    table = synthetic.lesion_table(snap)
    rows = table[table["class"].isin(["Lung nodule", "Consolidation", "Atelectasis"])]
    cohort = load_cohort(snap / "dataset").set_index("VolumeName")
    assert len(rows)
    for r in rows.itertuples():
        hu = read_hu(cohort.loc[r.VolumeName])
        assert hu[r.x, r.y, r.z] > -500, r
    assert nib.load(next((snap / "dataset" / "train").glob("*/*/*.nii.gz"))).shape == SHAPE
