"""The 3D-context experiment is honest: for every ``needs_3d`` class, what one axial slice shows has the same
distribution in positive and negative volumes, while a 3D property (continuity along z) tells them apart.

Volumes are rendered at the demo's model-input resolution (5.5 x 5.5 mm pixels, 10 mm slices); the
summaries are plain scipy.ndimage measurements, computed without the lesion truth."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
from scipy import ndimage, stats

from ctlib import synthetic
from ctlib.data import CLASSES
from ctlib.synthetic.scanner import _phantom

SHAPE, SPACING = (64, 64, 24), (5.5, 5.5, 10.0)  # the demo's resolution (its 56x56 crop lies inside)
CENTRE = slice(4, 20)  # the demo's centre 16 slices
N = 24  # volumes per arm


@cache
def _volume(cls: str, positive: bool, seed: int):
    return _phantom({cls: int(positive)}, seed=seed, shape=SHAPE, spacing=SPACING)


def _slice_blobs(hu2: np.ndarray, region: np.ndarray, lo: float, surround: float) -> list[tuple[float, float]]:
    """(area px, mean HU) of the connected densities (HU > ``lo``) of one slice that lie in ``region`` and are
    surrounded by tissue below ``surround`` HU (round densities in lung or fat, not touching an organ)."""
    lab, n = ndimage.label((hu2 > lo) & region)
    out = []
    for i in range(1, n + 1):
        comp = lab == i
        ring = ndimage.binary_dilation(comp) & ~comp
        if ring.any() and (hu2[ring] < surround).mean() > 0.75 and comp.sum() <= 40:
            out.append((float(comp.sum()), float(hu2[comp].mean())))
    return out


def _per_slice(ph, lo: float, surround: float, region3: np.ndarray) -> np.ndarray:
    """Rows (count, mean area, mean HU) of every centre slice of one volume."""
    hu = ph.hu.astype(float)
    rows = []
    for z in range(hu.shape[2])[CENTRE]:
        blobs = _slice_blobs(hu[:, :, z], region3[:, :, z], lo, surround)
        area = np.mean([b[0] for b in blobs]) if blobs else 0.0
        mean_hu = np.mean([b[1] for b in blobs]) if blobs else 0.0
        rows.append((len(blobs), area, mean_hu))
    return np.array(rows)


def _axis_runs(ph, posts, lo: float) -> int:
    """Runs of dense voxels (HU > ``lo``) along z at the centre of every post: 1 per post where the vessel is
    continuous, 2 where a separate body lies below it (a 3D property: continuity along z)."""
    g, hu = ph.grid, ph.hu.astype(float)
    runs = 0
    for x, y, z0, z1, _ in posts:
        i, j = int(np.argmin(np.abs(g.x - x))), int(np.argmin(np.abs(g.y - y)))
        along = (g.z >= z0 - 2.0) & (g.z <= z1 + 2.0)  # the post's (and its lesion's) extent
        runs += int(ndimage.label(hu[i, j, along] > lo)[1])
    return runs


_SETUP = {
    # class: (density threshold, surround threshold, region, posts of the anatomy)
    "Lung nodule": (-300.0, -500.0, lambda ph: ph.hu > -3000, lambda a: a.lung_posts),
    "Lymphadenopathy": (-20.0, -40.0, lambda ph: ph.hu > -3000, lambda a: list(a.station_posts.values())),
}


def test_the_3d_classes_are_the_constructed_ones():
    groups = synthetic.class_groups()
    assert groups["3D"] == ["Lymphadenopathy", "Lung nodule"]
    assert groups["2D"] + groups["3D"] != list(CLASSES)  # CLASSES order inside each group, not concatenated
    assert sorted(groups["2D"] + groups["3D"]) == sorted(CLASSES)
    assert [c for c in CLASSES if c in groups["2D"]] == groups["2D"]
    assert set(_SETUP) == set(groups["3D"])
    for c in CLASSES:
        assert synthetic.SIGNATURES[c].reason and synthetic.SIGNATURES[c].description


@pytest.mark.parametrize("cls", sorted(_SETUP))
def test_one_slice_cannot_tell_but_3d_continuity_can(cls):
    lo, surround, region, posts = _SETUP[cls]
    slices = {True: [], False: []}
    runs = {True: [], False: []}
    for positive in (True, False):
        for seed in range(N):
            ph = _volume(cls, positive, seed)
            slices[positive].append(_per_slice(ph, lo, surround, region(ph)))
            runs[positive].append(_axis_runs(ph, posts(ph.anatomy), lo))
    pos, neg = np.concatenate(slices[True]), np.concatenate(slices[False])
    for k, what in enumerate(("count", "mean area", "mean HU")):
        p = stats.ks_2samp(pos[:, k], neg[:, k]).pvalue
        d = (pos[:, k].mean() - neg[:, k].mean()) / np.sqrt(0.5 * (pos[:, k].var() + neg[:, k].var()))
        print(f"{cls} per-slice {what}: pos {pos[:, k].mean():.2f} neg {neg[:, k].mean():.2f} KS p={p:.3f} d={d:.2f}")
        assert p > 0.01 and abs(d) < 0.2, (what, p, d)
    r_pos, r_neg = np.array(runs[True], float), np.array(runs[False], float)
    auc = stats.mannwhitneyu(r_pos, r_neg).statistic / (len(r_pos) * len(r_neg))
    print(f"{cls} runs along the post axes: pos {r_pos.mean():.2f} neg {r_neg.mean():.2f} AUROC {auc:.2f}")
    assert auc > 0.9


def test_card_measures_the_3d_lesions_as_dense_but_no_denser_than_their_negatives():
    """The data card's table (smoke resolution, one patient per class): a 3D lesion is dense against its
    surroundings yet has the HU a negative volume has at the same voxels (the vessel it replaces)."""
    from ctlib.profiles import SMOKE
    from ctlib.synthetic.card import measure

    table = measure(SMOKE, seeds=(0,))
    assert list(table.index) == list(CLASSES)
    assert list(table.index[table["group"] == "3D"]) == synthetic.class_groups()["3D"]
    for cls in synthetic.class_groups()["3D"]:
        row = table.loc[cls]
        assert row["lesions"] >= 1
        assert float(row["vs shell HU"]) > 100 and abs(float(row["vs negative HU"])) < 100, row.to_dict()
    assert float(table.loc["Pleural effusion", "vs negative HU"]) > 300  # a 2D lesion: visible as a change
