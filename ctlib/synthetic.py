"""Synthetic CT-RATE: a CT-RATE-format snapshot of chest CT phantoms with 18 drawn abnormalities.

The project's embedded default dataset. :func:`generate` writes ``<out>/dataset/`` exactly as a
downloaded CT-RATE subset lies on disk (``../shared/ctrate-format.md``): the ``train/`` and ``valid/``
trees of int16 ``.nii.gz`` volumes with blank headers and raw scanner values (HU - RescaleIntercept),
a few ``train_fixed/`` / ``valid_fixed/`` re-uploads already in HU, the two labels CSVs, the metadata
CSVs (RescaleIntercept -1024, a few -8192), the reports CSVs, the ``no_chest_*.txt`` lists (a head and
an abdomen phantom per split) and some label rows whose volume was "not downloaded".

Geometry and orientation
    Array axes are (X, Y, Z) as nibabel returns them. X runs from the patient's right (low x) to the
    patient's left (high x); Y from anterior (low y, sternum) to posterior (high y, spine, table);
    Z from caudal (low z, diaphragm and liver) to cranial (high z, lung apices). Transposed to
    (Z, Y, X), ``imshow(volume[z])`` shows an axial slice in radiological convention: anterior at
    the top, the patient's left on the image right. Everything is computed in millimetres in a
    reference frame (352 mm in-plane field of view, 240 mm z coverage) that is mapped onto the
    requested ``shape`` and ``spacing`` (as a scanner fits its field of view to the body), so the
    same seed gives the same patient at 128x128x48 (2.75x2.75x5 mm) or 512x512x200 (0.7x0.7x1.5 mm).
    Small objects are drawn with partial-volume coverage (in-plane box filter, slab sampling in z).

Anatomy (HU, non-contrast)
    Air -1000 outside the body and -3024 outside the circular reconstruction field of view (the
    image corners); the patient table below the back; body ellipse with subcutaneous fat (~-100)
    and chest-wall muscle (~45); thoracic cavity with mediastinal fat (~-80); two lungs (~-860, a
    dependent gradient towards the back) that taper to the apices and end on the
    dome-shaped hemidiaphragms (right higher) with deep posterior recesses; below them the liver,
    stomach (with a gas bubble) and spleen; a pulmonary vessel tree (~+40, branching from the hila,
    running mostly cranio-caudally, tapering) with accompanying air-filled bronchi with thin walls;
    trachea, carina and main bronchi; heart (~40, anterior-left, with an epicardial fat rim);
    ascending aorta, arch, descending aorta, pulmonary trunk and arteries, superior vena cava, arch
    branches, oesophagus; vertebral bodies (cortex ~850, trabecular ~250 falling with age, discs),
    spinal canal and posterior elements; oblique ribs (bright arcs, cartilage anteriorly); sternum.
    Size, position, heart, vessels, airways and ribs vary per patient. Reconstructions differ by
    kernel: a soft one (PSF ~1 mm, noise sd ~10-14 HU) or a sharp one (PSF ~0.5 mm, edge
    enhancement, noise sd ~15-20 HU); noise is in-plane-correlated Gaussian.

Abnormality signatures (keys of :data:`SIGNATURES`; all lesions lie in the central two thirds of
the z range so that a centre crop of the slices keeps them; sizes hold at 5.5 mm pixels and 10 mm
slices). "2D" = recognisable in a single axial slice; "3D" = a single slice is ambiguous and only
the neighbouring slices tell it apart.

- Medical material (2D): metal (2300-3500 HU, bodies above 2900): a pacemaker or ICD generator in
  the left anterior chest wall with leads through the subclavian vein and the superior vena cava
  into the right heart, a port with a catheter into the SVC, or an embolisation coil pack at a hilum.
  Nothing else in any volume reaches 2000 HU.
- Arterial wall calcification (2D): 3-10 bright plaques (450-900 HU, 5-8 mm) on the wall of the
  ascending, arch or descending aorta.
- Cardiomegaly (2D): the heart scaled 1.28-1.45x (cardiothoracic ratio ~0.6 instead of ~0.45),
  pushing the left lung laterally.
- Pericardial effusion (2D): an 8-22 mm rim of fluid (5-18 HU) around the heart, outside the
  epicardial fat line.
- Coronary artery wall calcification (2D): 2-8 very bright spots (600-1200 HU, 5-8 mm) on the heart
  surface along the LAD, circumflex and right coronary grooves.
- Hiatal hernia (2D): a 45-65 mm soft-tissue-walled mass behind the heart just above the
  diaphragm, left of the midline, with gas anteriorly and fluid posteriorly (supine level).
- Lymphadenopathy (3D-leaning): 2-5 enlarged nodes (short axis 16-26 mm, ~40 HU) at paratracheal,
  subcarinal, aortopulmonary, prevascular or hilar stations. In one slice a node is a round
  soft-tissue density in fat like a vessel cross-section; only across slices is it an ovoid rather
  than a tube.
- Emphysema (2D): low-attenuation areas (-970 to -1000 HU, below -950) with upper-zone predominance,
  pruned vessels, sometimes subpleural bullae.
- Atelectasis (2D): dense (15-40 HU) plate-like bands or a pleura-based wedge in the lower lung.
- Lung nodule (3D): 1-3 solid spheres (radius 5.5-9.5 mm, ~40 HU) surrounded by lung, spanning a
  few slices. In any single slice a nodule is a round density identical to the cross-section of a
  vessel of the same calibre; every volume has such vessels (lobar arteries of radius 5-7 mm running
  vertically through many slices) as benign distractors. Only 3D context (sphere vs tube) separates
  them.
- Lung opacity (2D): 1-4 ground-glass patches (-600 to -450 HU) with irregular margins through which
  the vessels remain visible.
- Pulmonary fibrotic sequela (2D): pleuroparenchymal thickening at the pleura (volume loss) with
  3-6 dense linear strands radiating towards the hilum and short reticular lines, usually in an
  upper zone.
- Pleural effusion (2D): a crescent of fluid (5-20 HU) layering along the dependent (posterior)
  chest wall, thickest at the base, uni- or bilateral.
- Mosaic attenuation pattern (2D, diffuse): both lungs divided into lobular regions of ~20 mm that
  are alternately lucent (~-910 HU, thinner vessels) and denser (~-780 HU).
- Peribronchial thickening (2D, subtle): every bronchus has a wall 2.2-3.2 mm thicker than normal
  (thick rings around the airway lumina, most visible near the hila).
- Consolidation (2D): a dense (25-45 HU) pleura-based lobar/segmental region with irregular margins
  that obscures the vessels and shows air bronchograms.
- Bronchiectasis (3D-leaning): 2-4 dilated airways (lumen radius 4.5-7 mm, wall 1.5-2.5 mm, larger
  than the accompanying vessel: signet ring) running 60-100 mm cranio-caudally. The single-slice
  ring is visible in 2D; that it is a tube (not a cyst) is a 3D property.
- Interlobular septal thickening (2D): a polygonal network of thin (2-2.5 mm, ~20 HU) septal lines
  in the peripheral 18-28 mm of the lower and middle lung.

Labels
    Per-class prevalence follows the paper's Table 1 (Total / 3000 patients) exactly in
    expectation: a latent-Gaussian (multivariate probit) model with six shared factors (age,
    vascular, cardiac/fluid, infection, fibrosis/airways, smoking/COPD) whose thresholds are the
    Table 1 quantiles, so that co-occurrences are realistic (arterial with coronary calcification
    and age; pleural effusion with atelectasis, cardiomegaly and pericardial effusion; consolidation
    with opacity; fibrosis with bronchiectasis, septal and peribronchial thickening; emphysema with
    nodules). Labels are per scan: reconstructions share them and the drawn lesions; a repeat scan
    of a patient shares most (latent correlation 0.85) and lesions that persist keep their place.
    The labels CSV states exactly what is drawn; non-chest volumes are all-zero.

Run ``python -m ctlib.synthetic --help`` for the command line.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import importlib
import math
import multiprocessing
import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage, special
from scipy.spatial import cKDTree

from ctlib.data import (
    CLASSES,
    LABEL_COLUMNS,
    LABELS_CSV,
    METADATA_COLUMNS,
    METADATA_CSV,
    NO_CHEST_TXT,
    REPORT_COLUMNS,
    REPORTS_CSV,
    volume_relpath,
)

__all__ = ["SIGNATURES", "PREVALENCE", "generate", "main"]

SIGNATURES: dict[str, str] = {
    "Medical material": "2D: metal (2300-3500 HU) pacemaker/ICD generator with leads via the SVC into the right heart, a port with catheter, or a coil pack",
    "Arterial wall calcification": "2D: 3-10 bright plaques (450-900 HU, 5-8 mm) on the wall of the ascending, arch or descending aorta",
    "Cardiomegaly": "2D: heart scaled 1.28-1.45x (cardiothoracic ratio ~0.6 vs ~0.45) displacing the left lung",
    "Pericardial effusion": "2D: 8-22 mm rim of fluid (5-18 HU) around the heart outside the epicardial fat line",
    "Coronary artery wall calcification": "2D: 2-8 very bright spots (600-1200 HU, 5-8 mm) on the heart surface along the coronary grooves",
    "Hiatal hernia": "2D: 45-65 mm walled mass behind the heart above the diaphragm with anterior gas and posterior fluid",
    "Lymphadenopathy": "3D-leaning: 2-5 ovoid mediastinal/hilar nodes (short axis 16-26 mm, ~40 HU); one slice looks like a vessel cross-section",
    "Emphysema": "2D: low-attenuation areas below -950 HU (-970 to -1000), upper-zone predominant, pruned vessels, some bullae",
    "Atelectasis": "2D: dense (15-40 HU) plate-like bands or a pleura-based wedge in the lower lung",
    "Lung nodule": "3D: 1-3 solid spheres (r 5.5-9.5 mm, ~40 HU) over a few slices; one slice equals a vessel cross-section (distractors in all volumes)",
    "Lung opacity": "2D: 1-4 ground-glass patches (-600 to -450 HU) with irregular margins, vessels visible through them",
    "Pulmonary fibrotic sequela": "2D: pleuroparenchymal thickening (volume loss) with dense linear strands towards the hilum, mostly upper zone",
    "Pleural effusion": "2D: crescent of fluid (5-20 HU) layering on the dependent posterior chest wall, thickest at the base",
    "Mosaic attenuation pattern": "2D diffuse: ~20 mm lobular regions alternately lucent (~-910 HU, thin vessels) and dense (~-780 HU)",
    "Peribronchial thickening": "2D subtle: every bronchial wall 2.2-3.2 mm thicker (thick rings around airway lumina near the hila)",
    "Consolidation": "2D: dense (25-45 HU) pleura-based lobar/segmental region obscuring vessels, with air bronchograms",
    "Bronchiectasis": "3D-leaning: 2-4 dilated airways (lumen r 4.5-7 mm > companion vessel) running 60-100 mm cranio-caudally",
    "Interlobular septal thickening": "2D: polygonal network of thin (~2 mm, ~20 HU) septal lines in the peripheral lower/middle lung",
}

# The paper's Table 1, "Total" column, over its ~3000 patients.
_TABLE1_TOTAL: dict[str, int] = {
    "Medical material": 425,
    "Arterial wall calcification": 909,
    "Cardiomegaly": 358,
    "Pericardial effusion": 269,
    "Coronary artery wall calcification": 793,
    "Hiatal hernia": 425,
    "Lymphadenopathy": 831,
    "Emphysema": 586,
    "Atelectasis": 842,
    "Lung nodule": 1393,
    "Lung opacity": 1141,
    "Pulmonary fibrotic sequela": 783,
    "Pleural effusion": 481,
    "Mosaic attenuation pattern": 268,
    "Peribronchial thickening": 324,
    "Consolidation": 569,
    "Bronchiectasis": 307,
    "Interlobular septal thickening": 273,
}
_TABLE1_PATIENTS = 3000
PREVALENCE: dict[str, float] = {c: _TABLE1_TOTAL[c] / _TABLE1_PATIENTS for c in CLASSES}

_F32 = np.float32
_REF_FOV_XY = 352.0  # mm, in-plane field of view of the reference frame
_REF_FOV_Z = 240.0  # mm, z coverage of the reference frame
_ZC = 72.0  # lesions lie within |z| <= _ZC (reference mm): the central two thirds, with a margin
_HU_OUTSIDE_FOV = -3024
_CLS = {c: i for i, c in enumerate(CLASSES)}

# ---------------------------------------------------------------------------------------------
# labels: a multivariate probit model calibrated to Table 1
# ---------------------------------------------------------------------------------------------
_FACTORS = ("age", "vascular", "cardiac", "infection", "fibrotic", "copd")
_LOADINGS: dict[str, dict[str, float]] = {
    "Medical material": {"age": 0.35, "cardiac": 0.35},
    "Arterial wall calcification": {"age": 0.6, "vascular": 0.55},
    "Cardiomegaly": {"age": 0.35, "cardiac": 0.6},
    "Pericardial effusion": {"cardiac": 0.55, "infection": 0.2},
    "Coronary artery wall calcification": {"age": 0.55, "vascular": 0.6},
    "Hiatal hernia": {"age": 0.45},
    "Lymphadenopathy": {"infection": 0.4, "fibrotic": 0.25, "age": 0.15},
    "Emphysema": {"copd": 0.7, "age": 0.3},
    "Atelectasis": {"cardiac": 0.45, "infection": 0.35, "age": 0.2},
    "Lung nodule": {"copd": 0.35, "age": 0.25, "fibrotic": 0.15},
    "Lung opacity": {"infection": 0.6, "fibrotic": 0.25},
    "Pulmonary fibrotic sequela": {"fibrotic": 0.55, "age": 0.3, "infection": 0.15},
    "Pleural effusion": {"cardiac": 0.6, "infection": 0.25, "age": 0.15},
    "Mosaic attenuation pattern": {"fibrotic": 0.35, "copd": 0.3},
    "Peribronchial thickening": {"fibrotic": 0.45, "copd": 0.35, "infection": 0.2},
    "Consolidation": {"infection": 0.7},
    "Bronchiectasis": {"fibrotic": 0.6, "infection": 0.15},
    "Interlobular septal thickening": {"fibrotic": 0.5, "cardiac": 0.3},
}
_LOAD = np.array([[_LOADINGS[c].get(f, 0.0) for f in _FACTORS] for c in CLASSES])  # (18, 6)
_RESID = np.sqrt(1.0 - (_LOAD**2).sum(axis=1))  # unit marginal variance of every latent
_THRESH = special.ndtri(1.0 - np.array([PREVALENCE[c] for c in CLASSES]))
_REPEAT_RHO = 0.85  # latent correlation between two scans of a patient


def _draw_latent(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Latent liabilities ``(n, 18)`` (unit-variance Gaussians) and ages ``(n,)`` of ``n`` patients."""
    f = rng.standard_normal((n, len(_FACTORS)))
    e = rng.standard_normal((n, len(CLASSES)))
    latent = f @ _LOAD.T + e * _RESID
    age = np.clip(np.rint(58.0 + 14.0 * (0.8 * f[:, 0] + 0.6 * rng.standard_normal(n))), 18, 92)
    return latent, age


def _repeat_latent(rng: np.random.Generator, latent: np.ndarray) -> np.ndarray:
    """The latent of a repeat scan: correlated with ``latent`` and with the same marginals."""
    return _REPEAT_RHO * latent + math.sqrt(1 - _REPEAT_RHO**2) * rng.standard_normal(latent.shape)


def _labels_from_latent(latent: np.ndarray) -> np.ndarray:
    """0/1 labels ``(..., 18)``: a class is present when its liability exceeds its Table 1 quantile."""
    return (latent > _THRESH).astype(np.int8)


def _draw_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    """``(n, 18)`` labels of ``n`` independent patients (no volumes): for calibration checks."""
    return _labels_from_latent(_draw_latent(rng, n)[0])


# ---------------------------------------------------------------------------------------------
# geometry: a grid in reference millimetres and partial-volume primitives
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Grid:
    """Voxel centres in reference mm: ``x`` (patient right->left), ``y`` (anterior->posterior), ``z``
    (caudal->cranial); ``h`` in-plane pixel size, ``hz`` slice spacing, ``zsub`` offsets that sample
    each slab in z for small objects."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    h: float
    hz: float
    zsub: np.ndarray

    @classmethod
    def make(
        cls, shape: Sequence[int], spacing: Sequence[float], shift: Sequence[float] = (0.0, 0.0, 0.0)
    ) -> _Grid:
        nx, ny, nz = (int(v) for v in shape)
        sx, sy, sz = (float(v) for v in spacing)
        sxy = min(nx * sx, ny * sy) / _REF_FOV_XY
        szz = nz * sz / _REF_FOV_Z
        x = ((np.arange(nx) - (nx - 1) / 2) * sx / sxy - shift[0]).astype(_F32)
        y = ((np.arange(ny) - (ny - 1) / 2) * sy / sxy - shift[1]).astype(_F32)
        z = ((np.arange(nz) - (nz - 1) / 2) * sz / szz - shift[2]).astype(_F32)
        h = 0.5 * (sx + sy) / sxy
        hz = sz / szz
        nsub = int(np.clip(round(hz / h), 1, 4))
        zsub = (((np.arange(nsub) + 0.5) / nsub - 0.5) * hz).astype(_F32)
        return cls(x, y, z, h, hz, zsub)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.x), len(self.y), len(self.z))

    @property
    def X(self) -> np.ndarray:  # noqa: N802 - a coordinate grid, named like one
        return self.x[:, None, None]

    @property
    def Y(self) -> np.ndarray:  # noqa: N802
        return self.y[None, :, None]

    @property
    def Z(self) -> np.ndarray:  # noqa: N802
        return self.z[None, None, :]

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice] | None:
        """Index slices of the voxels whose centres lie in the box ``[lo, hi]`` (None if empty)."""
        out = []
        for ax, a, b in zip((self.x, self.y, self.z), lo, hi, strict=True):
            n = len(ax)
            if n == 0:
                return None
            o = float(ax[0])
            d = float(ax[1]) - o if n > 1 else 1.0
            i0 = max(0, math.ceil((a - o) / d - 1e-6))
            i1 = min(n, math.floor((b - o) / d + 1e-6) + 1)
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return out[0], out[1], out[2]

    def sub(self, sl: tuple[slice, slice, slice]) -> _Grid:
        return _Grid(self.x[sl[0]], self.y[sl[1]], self.z[sl[2]], self.h, self.hz, self.zsub)


def _cover(dist: np.ndarray, r: float | np.ndarray, h: float) -> np.ndarray:
    """Partial-volume coverage ``(bx, by, bz)`` of a pixel of width ``h`` whose centre lies at
    ``dist`` ``(bx, by, bz, nsub)`` from the axis of an object of half-width ``r`` (1D box model),
    averaged over the z sub-samples."""
    c = (np.minimum(dist + 0.5 * h, r) - np.maximum(dist - 0.5 * h, -r)) * (1.0 / h)
    np.clip(c, 0.0, 1.0, out=c)
    if c.shape[-1] == 1:
        return c[..., 0]
    if c.shape[-1] == 2:
        return (c[..., 0] + c[..., 1]) * 0.5
    return c.mean(axis=-1)


def _local(g: _Grid, sl: tuple[slice, slice, slice], c: Sequence[float]):
    """Coordinates relative to ``c`` inside ``sl``, shaped ``(bx,1,1,1)``, ``(1,by,1,1)``, ``(1,1,bz,ns)``."""
    X = g.x[sl[0]][:, None, None, None] - float(c[0])  # noqa: N806
    Y = g.y[sl[1]][None, :, None, None] - float(c[1])  # noqa: N806
    Z = (g.z[sl[2]][:, None] + g.zsub[None, :])[None, None] - float(c[2])  # noqa: N806
    return X, Y, Z


def _seg_geom(g: _Grid, p0: Sequence[float], p1: Sequence[float], pad: float):
    """Distance ``(bx, by, bz, nsub)`` of the voxels near segment ``p0``-``p1`` to it, and the segment
    parameter ``t`` in [0, 1] of the nearest point; None when the box misses the grid."""
    a = [float(v) for v in p0]
    d = [float(q) - v for q, v in zip(p1, a, strict=True)]
    lo = [min(a[i], a[i] + d[i]) - pad for i in range(3)]
    hi = [max(a[i], a[i] + d[i]) + pad for i in range(3)]
    lo[2] -= 0.5 * g.hz
    hi[2] += 0.5 * g.hz
    sl = g.box(lo, hi)
    if sl is None:
        return None
    X, Y, Z = _local(g, sl, a)  # noqa: N806
    l2 = max(d[0] * d[0] + d[1] * d[1] + d[2] * d[2], 1e-9)
    t = np.clip((X * (d[0] / l2) + Y * (d[1] / l2) + Z * (d[2] / l2)), 0.0, 1.0)
    ex, ey, ez = X - t * d[0], Y - t * d[1], Z - t * d[2]
    return sl, np.sqrt(ex * ex + ey * ey + ez * ez), t


def _ell_geom(g: _Grid, c: Sequence[float], radii: Sequence[float], angle: float = 0.0, pad: float = 0.0):
    """Normalised radius ``q`` ``(bx, by, bz, nsub)`` of an ellipsoid (semi-axes ``radii``, rotated by
    ``angle`` about z) around ``c``; ``q < 1`` inside. None when the box misses the grid."""
    a, b, cz = (float(v) for v in radii)
    r = max(a, b) + pad
    rz = cz + pad + 0.5 * g.hz
    sl = g.box((c[0] - r, c[1] - r, c[2] - rz), (c[0] + r, c[1] + r, c[2] + rz))
    if sl is None:
        return None
    X, Y, Z = _local(g, sl, c)  # noqa: N806
    ca, sa = math.cos(angle), math.sin(angle)
    u = X * ca + Y * sa
    v = Y * ca - X * sa
    return sl, np.sqrt((u / a) ** 2 + (v / b) ** 2 + (Z / cz) ** 2)


def _lerp(arr: np.ndarray, sl, cov: np.ndarray, value: float) -> None:
    """``arr[sl]`` moves towards ``value`` by the coverage ``cov``."""
    view = arr[sl]
    view += cov * (value - view)


def _maxin(acc: np.ndarray, sl, cov: np.ndarray) -> None:
    view = acc[sl]
    np.maximum(view, cov, out=view)


def _draw_tubes(g: _Grid, acc: np.ndarray, segs: Sequence[tuple]) -> None:
    """Max-accumulate into ``acc`` the coverage of tapered segments ``(p0, p1, r0, r1)``."""
    for p0, p1, r0, r1 in segs:
        geo = _seg_geom(g, p0, p1, max(r0, r1) + g.h)
        if geo is None:
            continue
        sl, dist, t = geo
        _maxin(acc, sl, _cover(dist, r0 + t * (r1 - r0), g.h))


def _draw_airways(
    g: _Grid,
    wall_acc: np.ndarray,
    lumen_acc: np.ndarray,
    segs: Sequence[tuple],
    wall: Callable[[float], float],
) -> None:
    """Max-accumulate bronchial wall (outer radius ``wall(r)``) and lumen coverage of segments."""
    for p0, p1, r0, r1 in segs:
        o0, o1 = wall(r0), wall(r1)
        geo = _seg_geom(g, p0, p1, max(o0, o1) + g.h)
        if geo is None:
            continue
        sl, dist, t = geo
        _maxin(wall_acc, sl, _cover(dist, o0 + t * (o1 - o0), g.h))
        _maxin(lumen_acc, sl, _cover(dist, r0 + t * (r1 - r0), g.h))


def _polyline(points: Sequence[Sequence[float]], radii: Sequence[float]) -> list[tuple]:
    """Segments ``(p0, p1, r0, r1)`` along a polyline with one radius per point."""
    return [
        (tuple(points[i]), tuple(points[i + 1]), float(radii[i]), float(radii[i + 1]))
        for i in range(len(points) - 1)
    ]


# ---------------------------------------------------------------------------------------------
# smooth random fields and Voronoi cells on a coarse grid (resolution independent)
# ---------------------------------------------------------------------------------------------
def _lerp_axis(vals: np.ndarray, axis: int, coarse: np.ndarray, fine: np.ndarray) -> np.ndarray:
    pos = np.interp(fine, coarse, np.arange(len(coarse), dtype=np.float64))
    i0 = np.clip(np.floor(pos).astype(np.intp), 0, max(len(coarse) - 2, 0))
    w = (pos - i0).astype(_F32)
    i1 = np.minimum(i0 + 1, len(coarse) - 1)
    shape = [1, 1, 1]
    shape[axis] = -1
    a = np.take(vals, i0, axis=axis)
    b = np.take(vals, i1, axis=axis)
    return a + (b - a) * w.reshape(shape)


@dataclass
class _Coarse:
    """Values on a coarse regular grid, sampled onto any grid by trilinear interpolation."""

    axes: tuple[np.ndarray, np.ndarray, np.ndarray]
    vals: np.ndarray

    def sample(self, g: _Grid) -> np.ndarray:
        out = _lerp_axis(self.vals, 0, self.axes[0], g.x)
        out = _lerp_axis(out, 1, self.axes[1], g.y)
        return _lerp_axis(out, 2, self.axes[2], g.z)


def _coarse_axes(lo: Sequence[float], hi: Sequence[float], step: Sequence[float]):
    return tuple(np.arange(lo[i] - step[i], hi[i] + 2 * step[i], step[i], dtype=np.float64) for i in range(3))


def _smooth_field(rng: np.random.Generator, lo, hi, corr: float) -> _Coarse:
    """A unit-variance Gaussian random field with correlation length ~``corr`` mm over ``[lo, hi]``."""
    step = corr / 2.0
    axes = _coarse_axes(lo, hi, (step, step, step))
    noise = rng.standard_normal(tuple(len(a) for a in axes)).astype(_F32)
    f = ndimage.gaussian_filter(noise, 1.0, mode="reflect")
    f /= max(float(f.std()), 1e-6)
    return _Coarse(axes, f)


def _voronoi(
    a: _Anatomy, rng: np.random.Generator, lo, hi, cell: float, zstretch: float, shell: float
) -> _Coarse:
    """Distance (mm) to the nearest wall of random Voronoi cells of mean size ``cell`` (elongated in z
    by ``zstretch``, so the walls are near-vertical sheets) over ``[lo, hi]``, on a 4 mm grid;
    only points within ``shell`` mm of the thoracic cavity wall are evaluated (others: 99)."""
    span = np.array(hi, float) - np.array(lo, float) + 2 * cell
    n = int(np.prod(span / np.array([cell, cell, cell * zstretch])))
    seeds = np.array(lo, float) - cell + rng.random((max(n, 4), 3)) * span
    scale = np.array([1.0, 1.0, 1.0 / zstretch])
    axes = _coarse_axes(lo, hi, (4.0, 4.0, 5.0))
    shape = tuple(len(ax) for ax in axes)
    keep2 = _cavity_depth(a, axes[0][:, None], axes[1][None, :]) < shell
    vals = np.full(shape, 99.0, _F32)
    ix, iy = np.nonzero(keep2)
    if ix.size:
        pts = np.empty((ix.size, shape[2], 3))
        pts[..., 0] = axes[0][ix][:, None]
        pts[..., 1] = axes[1][iy][:, None]
        pts[..., 2] = axes[2][None, :]
        d, _ = cKDTree(seeds * scale).query(pts.reshape(-1, 3) * scale, k=2)
        vals[ix, iy, :] = (0.5 * (d[:, 1] - d[:, 0])).reshape(ix.size, shape[2])
    return _Coarse(axes, vals)


# ---------------------------------------------------------------------------------------------
# anatomy: one patient's chest in reference millimetres
# ---------------------------------------------------------------------------------------------
class _Anatomy(SimpleNamespace):
    """One patient's chest (reference mm, see the module docstring); built by :func:`_sample_anatomy`."""


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _rng(*key: int) -> np.random.Generator:
    """A generator for one purpose of one patient/scan/reconstruction (independent streams)."""
    return np.random.default_rng([int(k) for k in key])


def _taper(a: _Anatomy, z):
    """Apex taper of the lungs: 1 below ``taper_z0``, falling to 0 at the apex (a dome)."""
    s = np.clip((z - a.taper_z0) / (a.apex_z - a.taper_z0), 0.0, 1.0)
    return np.sqrt(1.0 - s * s)


def _dome(a: _Anatomy, x, y):
    """Height of the diaphragm under ``(x, y)``: two domes (the right higher), deep posterior recesses."""
    ry = ((y - a.dome_y) / a.dome_ay) ** 2
    zr = a.dome_r - a.dome_depth * np.minimum(((x - a.dome_xr) / a.dome_ax) ** 2 + ry, 1.0)
    zl = a.dome_l - a.dome_depth * np.minimum(((x - a.dome_xl) / a.dome_ax) ** 2 + ry, 1.0)
    w = 0.5 * (1.0 + np.tanh((x - a.bx) / 12.0))
    return zr + (zl - zr) * w - a.recess * np.clip((y - a.cyc) / a.cb, 0.0, 1.0) ** 2


def _cavity_depth(a: _Anatomy, x, y):
    """Approximate distance (mm) of ``(x, y)`` inside the thoracic cavity wall (negative outside)."""
    dx, dy = x - a.bx, y - a.cyc
    rho = np.sqrt((dx / a.ca) ** 2 + (dy / a.cb) ** 2)
    return np.sqrt(dx * dx + dy * dy) * (1.0 / np.maximum(rho, 1e-3) - 1.0)


def _lung_shape(a: _Anatomy, x, y, z, margin: float = 0.0):
    """Where the (normal) lungs are, before the mediastinal structures carve them; broadcasts."""
    rho2 = ((x - a.bx) / (a.ca - margin)) ** 2 + ((y - a.cyc) / (a.cb - margin)) ** 2
    f = _taper(a, z)
    xs = np.where(x > a.bx, a.bx + 0.5 * a.ca, a.bx - 0.5 * a.ca)
    ax = np.maximum((0.5 * a.ca + 14.0) * f - margin, 1e-3)
    ay = np.maximum(1.25 * a.cb * f - margin, 1e-3)
    apex = ((x - xs) / ax) ** 2 + ((y - (a.cyc + 0.2 * a.cb)) / ay) ** 2 < 1.0
    med = np.abs(x - a.bx) > a.w_med + margin
    return (rho2 < 1.0) & apex & med & (z > _dome(a, x, y) + margin)


def _heart(
    a: _Anatomy, les: Mapping[str, Any]
) -> tuple[tuple[float, float, float], tuple[float, float, float], float]:
    """Heart centre, semi-axes and in-plane angle, enlarged when Cardiomegaly is drawn."""
    (cx, cy, cz), (ra, rb, rc) = a.h_c, a.h_r
    s = les["Cardiomegaly"]["scale"] if "Cardiomegaly" in les else 1.0
    bottom = cz - rc
    return (cx + (s - 1.0) * 0.45 * ra, cy, bottom + s * rc), (s * ra, s * rb, s * rc), a.h_ang


def _in_lung(a: _Anatomy, pts: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """Whether points ``(N, 3)`` lie at least ``margin`` mm inside the normal lung."""
    x, y, z = pts[:, 0], pts[:, 1], pts[:, 2]
    ok = _lung_shape(a, x, y, z, margin)
    (hx, hy, hz), (ra, rb, rc), ang = a.h_c, a.h_r, a.h_ang
    u = (x - hx) * math.cos(ang) + (y - hy) * math.sin(ang)
    v = (y - hy) * math.cos(ang) - (x - hx) * math.sin(ang)
    m = margin + 4.0
    ok &= (u / (ra + m)) ** 2 + (v / (rb + m)) ** 2 + ((z - hz) / (rc + m)) ** 2 > 1.0
    ok &= np.hypot(x - a.bx, y - a.vb_y) > a.vb_r + 6.0 + margin
    ok &= (np.hypot(x - a.dao[0], y - a.dao[1]) > a.ao_r + 5.0 + margin) | (z > a.arch_z)
    return ok


def _lung_point(
    rng: np.random.Generator,
    a: _Anatomy,
    side: str,
    *,
    margin: float = 6.0,
    zr: tuple[float, float] = (-115.0, 115.0),
    near: Sequence[float] | None = None,
    spread: float = 30.0,
    avoid: Sequence[Callable[[np.ndarray], np.ndarray]] = (),
    ypred: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """A random point of the ``side`` ('R' or 'L') lung, ``margin`` inside it, with z in ``zr``,
    optionally near a point, away from ``avoid`` regions and satisfying ``ypred`` on y."""
    sgn = -1.0 if side == "R" else 1.0
    lo = np.array([a.bx + sgn * a.w_med if sgn > 0 else a.bx - a.ca, a.cyc - a.cb, zr[0]])
    hi = np.array([a.bx + a.ca if sgn > 0 else a.bx - a.w_med, a.cyc + a.cb, zr[1]])
    for attempt in range(60):
        if near is None:
            cand = lo + rng.random((64, 3)) * (hi - lo)
        else:
            cand = np.asarray(near, float) + rng.normal(0.0, spread, (64, 3)) * np.array([1.0, 1.0, 1.4])
        ok = _in_lung(a, cand, margin) & (sgn * (cand[:, 0] - a.bx) > 0)
        ok &= (cand[:, 2] >= zr[0]) & (cand[:, 2] <= zr[1])
        if ypred is not None:
            ok &= ypred(cand[:, 1])
        for f in avoid:
            ok &= ~f(cand)
        if ok.any():
            return cand[int(np.argmax(ok))]
        if attempt > 30:  # relax: a point of the lung at all
            margin = max(margin * 0.7, 0.0)
            avoid = ()
    zmid = float(np.clip(0.5 * (zr[0] + zr[1]), -40.0, 40.0))
    return np.array([a.bx + sgn * 0.6 * a.ca, a.cyc, zmid])


def _wiggle(rng: np.random.Generator, p0, p1, n: int, amp: float) -> list[np.ndarray]:
    """``n`` points from ``p0`` to ``p1`` with a smooth random lateral wander of ``amp`` x length."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    length = float(np.linalg.norm(p1 - p0))
    pts = []
    for i in range(n):
        t = i / (n - 1)
        off = rng.normal(0.0, amp * length, 3) * math.sin(math.pi * t)
        pts.append(p0 + t * (p1 - p0) + off)
    return pts


def _perp(rng: np.random.Generator, d: np.ndarray) -> np.ndarray:
    """A random unit vector perpendicular to ``d``."""
    d = d / max(float(np.linalg.norm(d)), 1e-9)
    v = rng.normal(size=3)
    v -= (v @ d) * d
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _trees(rng: np.random.Generator, a: _Anatomy) -> tuple[list[tuple], list[tuple]]:
    """The pulmonary vessel tree and the accompanying intrapulmonary airways, as tapered segments
    ``(p0, p1, r0, r1)`` (airways: lumen radii)."""
    vessels: list[tuple] = []
    airways: list[tuple] = []

    def add(points, radii, depth, side, airway_from=None):
        vessels.extend(_polyline(points, radii))
        if airway_from is not None:
            d = np.asarray(points[-1]) - np.asarray(points[0])
            o = _perp(rng, d)
            ra = [max(0.62 * r, 0.5) for r in radii]
            off = o * (radii[0] + ra[0] + 1.0)
            apts = [np.asarray(airway_from, float)] + [np.asarray(p) + off for p in points[1:]]
            airways.extend(_polyline(apts, ra))
        if depth >= 2:
            return
        n_child = int(rng.integers(2, 4)) if depth == 0 else 1 + int(rng.random() < 0.4)
        for _ in range(n_child):
            i = int(rng.integers(1, len(points) - 1))
            start = np.asarray(points[i])
            r_start = 0.7 * radii[i]
            if r_start < 1.0:
                continue
            tgt = _lung_point(rng, a, side, margin=3.0, near=start, spread=28.0)
            pts = _wiggle(rng, start, tgt, 3, 0.05)
            rad = list(np.linspace(r_start, 0.7, 3))
            add(pts, rad, depth + 1, side, airway_from=start if (depth == 0 and rng.random() < 0.5) else None)

    for side in ("R", "L"):
        hil = np.asarray(a.hilum[side], float)
        origin = hil + np.array([0.0, -9.0, 6.0])
        n_main = int(rng.integers(6, 9))
        for i in range(n_main):
            if i < 3:
                # Lobar arteries: out to a mid-lung point, then vertically for many slices. Their
                # cross-sections have the calibre of a nodule (the benign distractors).
                mid = _lung_point(
                    rng,
                    a,
                    side,
                    margin=14.0,
                    zr=(origin[2] - 30.0, origin[2] + 5.0),
                    near=origin + np.array([(-1 if side == "R" else 1) * 35.0, 0.0, -10.0]),
                    spread=15.0,
                )
                dz = -_u(rng, 65, 95) if i != 1 else _u(rng, 45, 70)
                end = _lung_point(rng, a, side, margin=8.0, near=mid + np.array([0.0, 0.0, dz]), spread=10.0)
                pts = [origin, mid, 0.5 * (mid + end) + rng.normal(0, 3.0, 3), end]
                rad = [7.5 * a.k, _u(rng, 6.0, 7.5), _u(rng, 5.0, 6.5), 3.0]
            else:
                tgt = _lung_point(rng, a, side, margin=4.0)
                pts = _wiggle(rng, origin, tgt, 5, 0.06)
                rad = list(np.linspace(_u(rng, 4.5, 6.5), 1.0, 5))
            add(pts, rad, 0, side, airway_from=hil if rng.random() < 0.85 else None)
    return vessels, airways


def _sample_anatomy(rng: np.random.Generator, age: float, sex: str) -> _Anatomy:
    """A random adult chest (reference mm): body, cavity, lungs, diaphragm, mediastinum, bones."""
    a = _Anatomy()
    male = sex == "M"
    k = _u(rng, 0.93, 1.05) * (1.02 if male else 0.97)
    a.k, a.age = k, float(age)
    a.bx, a.by = _u(rng, -6, 6), _u(rng, -2, 8)
    a.ba = min(151.0 * k * _u(rng, 0.96, 1.04), 164.0)
    a.bb = min(116.0 * k * _u(rng, 0.95, 1.05), 126.0)
    a.fat = _u(rng, 5, 20) * (1.0 if male else 1.15)
    t_a, t_p, t_l = a.fat + _u(rng, 12, 18), a.fat + _u(rng, 32, 42), a.fat + _u(rng, 12, 18)
    a.ca, a.cb, a.cyc = a.ba - t_l, a.bb - 0.5 * (t_a + t_p), a.by + 0.5 * (t_a - t_p)
    a.fat_hu, a.muscle_hu, a.med_hu = _u(rng, -110, -90), _u(rng, 38, 50), _u(rng, -90, -70)
    a.w_med = _u(rng, 5, 8)
    # lungs and diaphragm
    a.lung_hu, a.lung_grad = _u(rng, -875, -845), _u(rng, 20, 40)
    a.apex_z = _u(rng, 98, 110)
    a.taper_z0 = a.apex_z - _u(rng, 55, 70)
    a.dome_r = _u(rng, -48, -36)
    a.dome_l = a.dome_r - _u(rng, 8, 16)
    a.dome_depth, a.recess = _u(rng, 45, 56), _u(rng, 10, 18)
    a.dome_xr, a.dome_xl = a.bx - 0.45 * a.ca, a.bx + 0.45 * a.ca
    a.dome_ax, a.dome_y, a.dome_ay = 0.62 * a.ca, a.cyc - 0.1 * a.cb, 0.95 * a.cb
    # spine
    a.vb_r = _u(rng, 14, 18) * k
    a.vb_y = a.cyc + a.cb - 0.3 * a.vb_r
    a.vb_cortex = _u(rng, 800, 950)
    a.trab_hu = float(np.clip(300.0 - 2.2 * (age - 30.0), 110.0, 300.0) + rng.normal(0, 15))
    a.disc_p, a.disc_w = _u(rng, 24, 28), _u(rng, 4.5, 6.5)
    a.disc_phase = _u(rng, 0, a.disc_p)
    a.canal_r = _u(rng, 6.5, 8.0)
    a.canal_y = a.vb_y + a.vb_r + a.canal_r + 1.5
    a.spin_len = float(np.clip(a.by + a.bb - a.fat - 6.0 - (a.canal_y + a.canal_r + 3.0), 8.0, 32.0))
    # ribs and sternum
    a.rib_p, a.rib_drop = _u(rng, 25, 29), _u(rng, 35, 55)
    a.rib_phase = _u(rng, 0, a.rib_p)
    a.rib_h, a.rib_t, a.rib_hu = _u(rng, 8.5, 11), _u(rng, 8, 10.5), _u(rng, 550, 750)
    a.st_y, a.st_a, a.st_b = a.cyc - a.cb - 7.0, _u(rng, 11, 15), _u(rng, 5, 7)
    a.st_bot = a.dome_r - _u(rng, 15, 25)
    # heart (long axis towards anterior-left)
    hk = _u(rng, 0.92, 1.08) * k
    a.h_r = (60.0 * hk, 41.0 * hk, 48.0 * hk)
    bottom = a.dome_l + _u(rng, -6, 2)
    a.h_c = (a.bx + _u(rng, 24, 34), a.cyc - 0.14 * a.cb + _u(rng, -5, 5), bottom + a.h_r[2])
    a.h_ang = -math.radians(_u(rng, 28, 42))
    heart_top = a.h_c[2] + a.h_r[2]
    a.heart_top = heart_top
    # airways
    a.carina_z = heart_top + _u(rng, 3, 12)
    a.arch_z = a.carina_z + _u(rng, 22, 30)
    a.oe_r, a.oe_air = _u(rng, 7, 9), bool(rng.random() < 0.5)
    a.oe_x, a.oe_y = a.bx - 5.0, a.vb_y - a.vb_r - a.oe_r - 3.0
    a.tr_r = _u(rng, 8, 10) * k
    a.tr_x, a.tr_y = a.bx - 1.0, a.oe_y - a.oe_r - a.tr_r - 5.0
    carina = (a.tr_x, a.tr_y + 2.0, a.carina_z)
    hil_r = (a.bx - _u(rng, 48, 56) * k, a.tr_y + _u(rng, 4, 10), a.carina_z - _u(rng, 18, 26))
    hil_l = (a.bx + _u(rng, 50, 58) * k, a.tr_y + _u(rng, 6, 12), a.carina_z - _u(rng, 26, 34))
    a.hilum = {"R": hil_r, "L": hil_l}
    mid_r = (0.5 * (carina[0] + hil_r[0]), 0.5 * (carina[1] + hil_r[1]) + 2.0, 0.5 * (carina[2] + hil_r[2]))
    mid_l = (
        0.5 * (carina[0] + hil_l[0]),
        0.5 * (carina[1] + hil_l[1]) + 3.0,
        0.5 * (carina[2] + hil_l[2]) + 4.0,
    )
    a.central_airways = (
        _polyline([(a.tr_x + _u(rng, -3, 3), a.tr_y - 3.0, 130.0), carina], [a.tr_r, a.tr_r * 0.95])
        + _polyline([carina, mid_r, hil_r], [6.5 * k, 6.2 * k, 5.2 * k])
        + _polyline([carina, mid_l, hil_l], [6.0 * k, 5.8 * k, 5.0 * k])
    )
    # aorta, pulmonary arteries, veins, oesophagus
    a.ao_r = float(np.clip(_u(rng, 11, 13.5) + 0.06 * (age - 55.0), 10.0, 17.0))
    ang = math.radians(_u(rng, 35, 50))
    dd = a.vb_r + 0.85 * a.ao_r + 2.0
    a.dao = (a.bx + math.sin(ang) * dd, a.vb_y - math.cos(ang) * dd)
    ax_, ay_ = a.bx - _u(rng, 4, 10), a.cyc - 0.36 * a.cb
    r = a.ao_r
    a.aorta = _polyline(
        [
            (ax_ + 2.0, ay_ + 8.0, heart_top - 22.0),
            (ax_, ay_, heart_top),
            (ax_ - 1.0, ay_ - 2.0, a.arch_z - 14.0),
            (a.bx + 2.0, a.cyc - 0.3 * a.cb, a.arch_z - 1.0),
            (a.bx + 12.0, a.cyc - 0.05 * a.cb, a.arch_z),
            (a.dao[0] + 2.0, a.dao[1] - 12.0, a.arch_z - 10.0),
            (a.dao[0], a.dao[1], a.arch_z - 28.0),
            (a.dao[0] + 1.0, a.dao[1], 0.0),
            (a.dao[0] - 3.0, a.dao[1] - 3.0, -130.0),
        ],
        [r, r, r, 0.95 * r, 0.92 * r, 0.9 * r, 0.88 * r, 0.86 * r, 0.85 * r],
    )
    pt0 = (a.bx + _u(rng, 14, 22), a.cyc - 0.38 * a.cb, heart_top - 14.0)
    pt1 = (a.bx + 12.0, a.cyc - 0.18 * a.cb, a.carina_z - 8.0)
    a.pulmonary = (
        _polyline([pt0, pt1], [13.0 * k, 12.0 * k])
        + _polyline(
            [pt1, (a.bx + 30.0, a.cyc + 0.05 * a.cb, a.carina_z - 10.0), np.add(hil_l, (0.0, -9.0, 6.0))],
            [11.0 * k, 10.0 * k, 8.0 * k],
        )
        + _polyline(
            [pt1, (a.bx - 10.0, a.cyc - 0.02 * a.cb, a.carina_z - 12.0), np.add(hil_r, (0.0, -9.0, 6.0))],
            [10.5 * k, 10.0 * k, 8.0 * k],
        )
    )
    a.svc = (a.bx - 30.0 * k, a.cyc - 0.25 * a.cb)
    a.veins = _polyline(
        [(a.svc[0], a.svc[1], 130.0), (a.svc[0] + 2.0, a.svc[1] + 2.0, heart_top - 6.0)], [9.0, 9.5]
    )
    a.arch_branches = (
        _polyline(
            [(a.bx - 4.0, a.cyc - 0.3 * a.cb, a.arch_z), (a.bx - 14.0, a.cyc - 0.22 * a.cb, 130.0)],
            [6.5, 6.0],
        )
        + _polyline(
            [(a.bx + 5.0, a.cyc - 0.18 * a.cb, a.arch_z), (a.bx + 8.0, a.cyc - 0.1 * a.cb, 130.0)], [4.5, 4.5]
        )
        + _polyline(
            [(a.bx + 14.0, a.cyc - 0.02 * a.cb, a.arch_z), (a.bx + 26.0, a.cyc + 0.05 * a.cb, 130.0)],
            [5.5, 5.5],
        )
    )
    a.oesophagus = _polyline(
        [
            (a.oe_x, a.oe_y, 130.0),
            (a.oe_x + 2.0, a.oe_y, a.dome_l + 10.0),
            (a.bx + 30.0, a.cyc + 0.1 * a.cb, a.dome_l - 25.0),
        ],
        [a.oe_r, a.oe_r, a.oe_r],
    )
    # abdomen below the diaphragm
    a.liver_hu = _u(rng, 50, 62)
    a.stomach_c = (a.bx + 0.45 * a.ca, a.cyc - 0.15 * a.cb, a.dome_l - _u(rng, 28, 36))
    a.stomach_r = (34.0 * k, 30.0 * k, 34.0 * k)
    a.spleen_c = (a.bx + 0.72 * a.ca, a.cyc + 0.5 * a.cb, a.dome_l - 42.0)
    a.spleen_r = (20.0 * k, 34.0 * k, 40.0 * k)
    a.table_y = a.by + a.bb + _u(rng, 4, 10)
    # pulmonary vessels and airways
    a.vessels, a.airways = _trees(rng, a)
    return a


# ---------------------------------------------------------------------------------------------
# lesions: per-patient variants (shared by the report) and geometry (drawn by the renderer)
# ---------------------------------------------------------------------------------------------
_SIDE3 = ("both", "right", "left")


def _variants(base: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Descriptive choices per class for one patient (device, side, count...): one stream per class,
    so that a repeat scan and the report agree with the drawing."""
    out: dict[str, dict[str, Any]] = {}
    for c in CLASSES:
        r = _rng(*base, 200 + _CLS[c])
        v: dict[str, Any] = {}
        if c == "Medical material":
            v["device"] = str(r.choice(["pacemaker", "icd", "port", "coil"], p=[0.4, 0.15, 0.3, 0.15]))
            v["side"] = str(r.choice(["R", "L"]))
        elif c in ("Pleural effusion", "Atelectasis", "Lung opacity", "Bronchiectasis"):
            v["side"] = str(r.choice(_SIDE3, p=[0.5, 0.3, 0.2]))
        elif c in ("Consolidation", "Pulmonary fibrotic sequela"):
            v["side"] = str(r.choice(["right", "left"]))
        if c == "Consolidation":
            v["zone"] = "lower" if r.random() < 0.65 else "upper"
        elif c == "Pulmonary fibrotic sequela":
            v["zone"] = "upper" if r.random() < 0.7 else "lower"
        elif c == "Atelectasis":
            v["form"] = "plate-like" if r.random() < 0.55 else "wedge-shaped"
        elif c == "Lung nodule":
            v["count"] = int(r.choice([1, 2, 3], p=[0.55, 0.3, 0.15]))
        elif c == "Lung opacity":
            v["count"] = int(r.integers(1, 5))
        elif c == "Emphysema":
            v["bullae"] = int(r.choice([0, 1, 2], p=[0.5, 0.3, 0.2]))
        elif c == "Lymphadenopathy":
            v["count"] = int(r.integers(2, 6))
        out[c] = v
    return out


def _sides(side: str) -> list[str]:
    return {"both": ["R", "L"], "right": ["R"], "left": ["L"], "R": ["R"], "L": ["L"]}[side]


def _sphere_avoid(c: Sequence[float], r: float) -> Callable[[np.ndarray], np.ndarray]:
    c = np.asarray(c, float)
    return lambda p: np.linalg.norm(p - c, axis=1) < r


def _wall_point(a: _Anatomy, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cavity wall point on the ray from the cavity axis through ``p`` (same z), and the unit
    in-plane inward normal there."""
    rho = max(math.sqrt(((p[0] - a.bx) / a.ca) ** 2 + ((p[1] - a.cyc) / a.cb) ** 2), 1e-6)
    wall = np.array([a.bx + (p[0] - a.bx) / rho, a.cyc + (p[1] - a.cyc) / rho, p[2]])
    inward = np.array([a.bx - wall[0], a.cyc - wall[1], 0.0])
    return wall, inward / max(float(np.linalg.norm(inward)), 1e-6)


def _effusion_thickness(p: Mapping[str, Any], z):
    return p["t0"] * np.clip((p["z_top"] - z) / (p["z_top"] + 100.0), 0.0, 1.0) ** 0.6


def _dependency(a: _Anatomy, y):
    """1 at the posterior (dependent) wall, 0 anteriorly."""
    return np.clip((y - a.cyc) / a.cb + 0.35, 0.0, 1.0) ** 0.8


def _prepare_lesions(a: _Anatomy, labels: Sequence[int], base: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Geometry of every labelled abnormality of one scan (reference mm), keyed by class.

    Each class has its own random stream (keyed by the patient), so a lesion keeps its place in a
    repeat scan and toggling one class leaves the others unchanged. Focal lung lesions avoid the
    regions of the regional ones so that every drawn lesion stays visible."""
    present = [c for c, v in zip(CLASSES, labels, strict=True) if v]
    var = _variants(base)
    les: dict[str, dict[str, Any]] = {}
    avoid: list[Callable[[np.ndarray], np.ndarray]] = []

    def rng(c: str) -> np.random.Generator:
        return _rng(*base, 100 + _CLS[c])

    if "Cardiomegaly" in present:
        les["Cardiomegaly"] = {"scale": _u(rng("Cardiomegaly"), 1.28, 1.45)}
    if "Pericardial effusion" in present:
        r = rng("Pericardial effusion")
        les["Pericardial effusion"] = {"t": _u(r, 8, 22), "hu": _u(r, 5, 18)}
    if "Pleural effusion" in present:
        r = rng("Pleural effusion")
        p = {
            "sides": _sides(var["Pleural effusion"]["side"]),
            "t0": _u(r, 20, 45),
            "z_top": _u(r, -10, 25),
            "hu": _u(r, 5, 20),
        }
        les["Pleural effusion"] = p
        sides = p["sides"]

        def eff_avoid(q, p=p, sides=sides):
            on_side = np.zeros(len(q), bool)
            for s in sides:
                on_side |= (q[:, 0] < a.bx) if s == "R" else (q[:, 0] > a.bx)
            t = _effusion_thickness(p, q[:, 2]) * _dependency(a, q[:, 1]) + 12.0
            return on_side & (_cavity_depth(a, q[:, 0], q[:, 1]) < t)

        avoid.append(eff_avoid)
    if "Consolidation" in present:
        r = rng("Consolidation")
        v = var["Consolidation"]
        side = _sides(v["side"])[0]
        zr = (-70.0, -15.0) if v["zone"] == "lower" else (10.0, 65.0)
        ypred = (lambda y: y > a.cyc) if v["zone"] == "lower" else (lambda y: y < a.cyc + 0.3 * a.cb)
        p = _lung_point(r, a, side, margin=12.0, zr=zr, avoid=avoid, ypred=ypred)
        wall, inward = _wall_point(a, p)
        radii = (_u(r, 24, 34), _u(r, 32, 45), _u(r, 28, 40))  # (along the wall, radial, z)
        c = wall + inward * 0.55 * radii[1]
        ang = math.atan2(inward[1], inward[0]) + math.pi / 2
        R = max(radii)
        field_ = _smooth_field(r, c - R - 10.0, c + R + 10.0, 14.0)
        hil = np.asarray(a.hilum[side])
        bron = []
        s0 = c + 0.45 * (hil - c) / max(np.linalg.norm(hil - c), 1e-6) * R
        for _ in range(int(r.integers(3, 6))):
            s1 = (
                wall
                + inward * _u(r, 6, 14)
                + r.normal(0, 1, 3) * np.array([radii[0], radii[0], radii[2]]) * 0.5
            )
            bron += _polyline([s0, 0.5 * (s0 + s1) + r.normal(0, 3, 3), s1], [_u(r, 2.4, 3.2), 2.0, 1.5])
        les["Consolidation"] = {
            "c": c,
            "radii": radii,
            "angle": ang,
            "field": field_,
            "hu": _u(r, 25, 45),
            "bron": bron,
        }
        avoid.append(_sphere_avoid(c, R + 6.0))
    if "Atelectasis" in present:
        r = rng("Atelectasis")
        v = var["Atelectasis"]
        parts = []
        for s in _sides(v["side"]):
            if v["form"] == "plate-like":  # bands from the pleura towards the hilum
                for _ in range(int(r.integers(1, 3))):
                    p = _lung_point(r, a, s, margin=8.0, zr=(-60.0, -8.0), avoid=avoid)
                    wall, inward = _wall_point(a, p)
                    radii = (_u(r, 22, 34), _u(r, 3.5, 5.0), _u(r, 14, 22))
                    ang = math.atan2(inward[1], inward[0]) + _u(r, -0.35, 0.35)
                    c = wall + radii[0] * 0.85 * np.array([math.cos(ang), math.sin(ang), 0.0])
                    parts.append((c, radii, ang))
            else:
                c = _lung_point(
                    r,
                    a,
                    s,
                    margin=4.0,
                    zr=(-60.0, -15.0),
                    avoid=avoid,
                    ypred=lambda y: y > a.cyc + 0.25 * a.cb,
                )
                wall, inward = _wall_point(a, c)  # a wedge: half an ellipsoid standing on the pleura
                radii = (_u(r, 24, 34), _u(r, 14, 20), _u(r, 18, 26))
                ang = math.atan2(inward[1], inward[0])
                parts.append((wall + inward * 4.0, radii, ang))
        les["Atelectasis"] = {"parts": parts, "hu": _u(r, 15, 40)}
        for c, radii, _ in parts:
            avoid.append(_sphere_avoid(c, max(radii) + 5.0))
    if "Lung opacity" in present:
        r = rng("Lung opacity")
        v = var["Lung opacity"]
        patches = []
        sides = _sides(v["side"])
        for i in range(v["count"]):
            c = _lung_point(r, a, sides[i % len(sides)], margin=6.0, zr=(-_ZC + 10, _ZC - 10))
            radii = (_u(r, 16, 32), _u(r, 16, 30), _u(r, 16, 32))
            R = max(radii)
            patches.append((c, radii, _smooth_field(r, c - R - 8.0, c + R + 8.0, 10.0), _u(r, -600, -450)))
        les["Lung opacity"] = {"patches": patches}
    if "Pulmonary fibrotic sequela" in present:
        r = rng("Pulmonary fibrotic sequela")
        v = var["Pulmonary fibrotic sequela"]
        side = _sides(v["side"])[0]
        zr = (25.0, 68.0) if v["zone"] == "upper" else (-60.0, -20.0)
        p = _lung_point(r, a, side, margin=10.0, zr=zr, avoid=avoid)
        wall, inward = _wall_point(a, p)
        normal = math.atan2(inward[1], inward[0])
        cap = (wall, (_u(r, 20, 32), _u(r, 9, 13), _u(r, 14, 24)), normal + math.pi / 2)
        hil = np.asarray(a.hilum[side])
        strands = []
        for _ in range(int(r.integers(3, 7))):
            s0 = wall + r.normal(0, 9, 3) * np.array([1, 1, 0.8])
            s1 = s0 + (hil - s0) * _u(r, 0.35, 0.6) + r.normal(0, 8, 3)
            strands += _polyline([s0, 0.5 * (s0 + s1) + r.normal(0, 3, 3), s1], [_u(r, 1.5, 2.2), 1.6, 1.2])
        for _ in range(int(r.integers(3, 6))):
            s0 = wall + (p - wall) * _u(r, 0.2, 0.8) + r.normal(0, 8, 3)
            s1 = s0 + r.normal(0, 9, 3)
            strands.append((tuple(s0), tuple(s1), 1.4, 1.2))
        les["Pulmonary fibrotic sequela"] = {"cap": cap, "strands": strands, "hu": _u(r, 15, 35)}
        avoid.append(_sphere_avoid(wall, 40.0))
    if "Bronchiectasis" in present:
        r = rng("Bronchiectasis")
        sides = _sides(var["Bronchiectasis"]["side"])
        tubes, comp = [], []
        for i in range(int(r.integers(2, 5))):
            s = sides[i % len(sides)]
            start = _lung_point(r, a, s, margin=14.0, zr=(0.0, 45.0), avoid=avoid)
            for _ in range(12):
                length = _u(r, 60, 100)
                end = start + np.array([_u(r, -20, 20), _u(r, -10, 25), -length])
                end[2] = max(end[2], -_ZC + 4.0)
                pts = _wiggle(r, start, end, 6, 0.03)
                if _in_lung(a, np.array(pts), 9.0).all():
                    break
            else:
                end = _lung_point(r, a, s, margin=9.0, near=start + np.array([0, 0, -55.0]), spread=8.0)
                pts = _wiggle(r, start, end, 6, 0.02)
            rb, wall = _u(r, 4.5, 7.0), _u(r, 1.5, 2.5)
            phase = _u(r, 0, 2 * math.pi)
            radii = [rb * (1.0 + 0.15 * math.sin(phase + 1.7 * j)) for j in range(len(pts))]
            tubes.append((_polyline(pts, radii), wall))
            rv = _u(r, 2.2, 3.2)
            off = _perp(r, np.asarray(pts[-1]) - np.asarray(pts[0]))
            off[2] = 0.0
            off /= max(float(np.linalg.norm(off)), 1e-6)
            comp += _polyline(
                [np.asarray(q) + off * (max(radii) + wall + rv + 0.8) for q in pts], [rv] * len(pts)
            )
            for q in pts:
                avoid.append(_sphere_avoid(q, rb + 10.0))
        les["Bronchiectasis"] = {"tubes": tubes, "vessels": comp}
    if "Lung nodule" in present:
        r = rng("Lung nodule")
        nods = []
        for _ in range(var["Lung nodule"]["count"]):
            rad = _u(r, 5.5, 9.5)
            s = "R" if r.random() < 0.55 else "L"
            c = _lung_point(r, a, s, margin=rad + 4.0, zr=(-_ZC + rad, _ZC - rad), avoid=avoid)
            nods.append((c, (rad, rad * _u(r, 0.9, 1.1), rad * _u(r, 0.9, 1.1)), _u(r, 25, 55)))
            avoid.append(_sphere_avoid(c, 2 * rad + 6.0))
        les["Lung nodule"] = {"nodules": nods}
    if "Emphysema" in present:
        r = rng("Emphysema")
        lo = (a.bx - a.ca, a.cyc - a.cb, -125.0)
        hi = (a.bx + a.ca, a.cyc + a.cb, 125.0)
        bullae = []
        for _ in range(var["Emphysema"]["bullae"]):
            s = "R" if r.random() < 0.5 else "L"
            p = _lung_point(r, a, s, margin=2.0, zr=(15.0, _ZC - 10))
            rad = _u(r, 9, 16)
            wall, inward = _wall_point(a, p)
            c = wall + inward * (0.8 * rad)
            bullae.append((c, rad))
        les["Emphysema"] = {
            "field": _smooth_field(r, lo, hi, _u(r, 6, 9)),
            "frac": _u(r, 0.12, 0.3),
            "bullae": bullae,
        }
    if "Mosaic attenuation pattern" in present:
        r = rng("Mosaic attenuation pattern")
        lo = (a.bx - a.ca, a.cyc - a.cb, -125.0)
        hi = (a.bx + a.ca, a.cyc + a.cb, 125.0)
        les["Mosaic attenuation pattern"] = {
            "cells": _smooth_field(r, lo, hi, _u(r, 18, 26)),
            "low": _u(r, 45, 60),
            "high": _u(r, 60, 90),
        }
    if "Interlobular septal thickening" in present:
        r = rng("Interlobular septal thickening")
        z_top = _u(r, 25, 50)
        lo = (a.bx - a.ca, a.cyc - a.cb, -125.0)
        hi = (a.bx + a.ca, a.cyc + a.cb, z_top + 5.0)
        les["Interlobular septal thickening"] = {
            "edges": _voronoi(a, r, lo, hi, _u(r, 15, 22), 2.5, 33.0),
            "w": _u(r, 1.0, 1.25),
            "shell": _u(r, 18, 28),
            "z_top": z_top,
            "hu": _u(r, 10, 30),
        }
    if "Peribronchial thickening" in present:
        les["Peribronchial thickening"] = {"extra": _u(rng("Peribronchial thickening"), 2.2, 3.2)}
    if "Lymphadenopathy" in present:
        r = rng("Lymphadenopathy")
        hr, hl = np.asarray(a.hilum["R"]), np.asarray(a.hilum["L"])
        stations = {
            "right paratracheal": (a.tr_x - a.tr_r - 16.0, a.tr_y - 4.0, a.carina_z + _u(r, 12, 30)),
            "aortopulmonary window": (a.bx + 22.0, a.cyc + 0.02 * a.cb, a.carina_z + _u(r, 0, 8)),
            "subcarinal": (a.tr_x + 3.0, a.tr_y + 16.0, a.carina_z - _u(r, 16, 24)),
            "prevascular": (a.bx - 2.0, a.cyc - 0.36 * a.cb - a.ao_r - 12.0, a.arch_z - _u(r, 10, 20)),
            "right hilar": tuple(hr + (-4.0, -14.0, -8.0)),
            "left hilar": tuple(hl + (4.0, -14.0, -6.0)),
        }
        names = list(stations)
        pick = r.choice(len(names), size=min(var["Lymphadenopathy"]["count"], len(names)), replace=False)
        nodes = []
        for i in sorted(int(j) for j in pick):
            c = np.asarray(stations[names[i]], float)
            c[2] = min(c[2], _ZC - 8.0)
            nodes.append((names[i], c, (_u(r, 8, 13), _u(r, 8, 13), _u(r, 9, 15)), _u(r, 35, 50)))
        les["Lymphadenopathy"] = {"nodes": nodes}
    if "Hiatal hernia" in present:
        r = rng("Hiatal hernia")
        radii = (_u(r, 22, 32), _u(r, 17, 22), _u(r, 22, 32))
        c = (a.bx + _u(r, 5, 18), a.vb_y - a.vb_r - radii[1] + 2.0, a.dome_l + _u(r, 12, 24))
        les["Hiatal hernia"] = {"c": c, "radii": radii, "level": _u(r, -0.6, -0.2), "hu": _u(r, 10, 25)}
    if "Coronary artery wall calcification" in present:
        r = rng("Coronary artery wall calcification")
        (hx, hy, hz), (ra, rb, rc), ang = _heart(a, les)
        spots = []
        courses = {
            "LAD": ((0.15, 0.5), (-1.0, -1.0), (-0.4, 0.6)),
            "LCx": ((0.9, 0.9), (-0.1, 0.5), (0.2, 0.6)),
            "RCA": ((-0.9, -0.9), (-0.6, -0.2), (-0.2, 0.5)),
            "LM": ((0.2, 0.2), (-0.6, -0.6), (0.8, 0.8)),
        }
        for _ in range(int(r.integers(2, 9))):
            cu, cv, cw = courses[str(r.choice(list(courses), p=[0.45, 0.2, 0.25, 0.1]))]
            uvw = np.array([_u(r, *cu), _u(r, *cv), _u(r, *cw)])
            uvw /= np.linalg.norm(uvw)
            u, v, w = uvw[0] * (ra + 3.0), uvw[1] * (rb + 3.0), uvw[2] * (rc + 3.0)
            p = (
                hx + u * math.cos(ang) - v * math.sin(ang),
                hy + u * math.sin(ang) + v * math.cos(ang),
                hz + w,
            )
            spots.append((p, (_u(r, 2.5, 4.0), _u(r, 2.5, 4.0), _u(r, 2.5, 4.0)), _u(r, 600, 1200)))
        les["Coronary artery wall calcification"] = {"spots": spots}
    if "Arterial wall calcification" in present:
        r = rng("Arterial wall calcification")
        segs = [s for s in a.aorta if abs(0.5 * (s[0][2] + s[1][2])) < _ZC]
        lengths = np.array([np.linalg.norm(np.subtract(s[1], s[0])) for s in segs])
        plaques = []
        for _ in range(int(r.integers(3, 11))):
            p0, p1, r0, r1 = segs[int(r.choice(len(segs), p=lengths / lengths.sum()))]
            for _ in range(20):
                t = _u(r, 0, 1)
                q = np.add(p0, t * np.subtract(p1, p0))
                if abs(q[2]) < _ZC:
                    break
            n = _perp(r, np.subtract(p1, p0))
            pos = q + n * (r0 + t * (r1 - r0) - 1.0)
            plaques.append((pos, (_u(r, 2.5, 4.0), _u(r, 2.5, 4.0), _u(r, 3.0, 5.0)), _u(r, 450, 900)))
        les["Arterial wall calcification"] = {"plaques": plaques}
    if "Medical material" in present:
        les["Medical material"] = _prepare_device(a, les, var["Medical material"], rng("Medical material"))
    return les


def _prepare_device(a: _Anatomy, les, v: Mapping[str, Any], r: np.random.Generator) -> dict[str, Any]:
    """Metal: generator/port/coil bodies (ellipsoids) and leads/catheters (tubes), HU > 2000."""
    (hx, hy, hz), (ra, rb, rc), _ = _heart(a, les)
    bodies, wires = [], []
    dev = v["device"]
    top_svc = (a.svc[0] + 1.0, a.svc[1] + 1.0, _u(r, 85, 95))
    low_svc = (a.svc[0] + 2.0, a.svc[1] + 2.0, a.heart_top - 2.0)
    if dev in ("pacemaker", "icd", "port"):
        left = dev != "port"
        phi = math.radians(_u(r, 50, 65) if left else _u(r, 115, 130))
        depth = a.fat * 0.6 + (4.0 if dev != "icd" else 6.0)
        gx = a.bx + (a.ba - depth) * math.cos(phi)
        gy = a.by - (a.bb - depth) * math.sin(phi)
        gz = _u(r, 45, 62)
        ang = math.atan2(-a.bb * math.cos(phi), -a.ba * math.sin(phi))
        size = {"pacemaker": (22.0, 5.0, 24.0), "icd": (30.0, 7.0, 33.0), "port": (13.0, 7.0, 13.0)}[dev]
        bodies.append(((gx, gy, gz), size, ang, _u(r, 2950, 3400)))
        sub = (a.bx + (0.3 if left else -0.3) * a.ba, a.cyc - 0.8 * a.cb, gz + 14.0)
        if dev == "port":
            wires.append((_polyline([(gx, gy, gz), sub, top_svc, low_svc], [1.4] * 4), _u(r, 2300, 2700)))
        else:
            ra_pt = (hx - 0.55 * ra, hy - 0.1 * rb, hz + 0.1 * rc)
            rv_pt = (hx + 0.25 * ra, hy - 0.55 * rb, hz - 0.45 * rc)
            rad = 1.7 if dev == "pacemaker" else 2.6
            wires.append(
                (_polyline([(gx, gy, gz), sub, top_svc, low_svc, ra_pt, rv_pt], [rad] * 6), _u(r, 2900, 3300))
            )
            if r.random() < 0.5:
                raa = (hx - 0.3 * ra, hy - 0.65 * rb, hz + 0.55 * rc)
                wires.append(
                    (_polyline([(gx, gy, gz), sub, top_svc, low_svc, raa], [1.6] * 5), _u(r, 2900, 3300))
                )
    else:  # embolisation coil pack at a hilum
        side = v["side"]
        c = _lung_point(r, a, side, margin=9.0, near=a.hilum[side], spread=25.0)
        bodies.append((tuple(c), (_u(r, 6, 8), _u(r, 6, 8), _u(r, 7, 10)), _u(r, 0, 3), _u(r, 3200, 3500)))
        tail = c + r.normal(0, 10, 3)
        wires.append((_polyline([c, tail], [1.3, 1.3]), 3000.0))
    return {"device": dev, "bodies": bodies, "wires": wires}


# ---------------------------------------------------------------------------------------------
# rendering: HU volumes (X, Y, Z) before noise
# ---------------------------------------------------------------------------------------------
def _paint_tubes(
    g: _Grid,
    hu: np.ndarray,
    env: np.ndarray | None,
    segs,
    value: float,
    margin: float,
    *,
    lumen: float | None = None,
    lumen_value: float = -1000.0,
    wall: Callable | None = None,
) -> None:
    """Paint tapered segments ``(p0, p1, r0, r1)`` with ``value`` into ``hu`` (an air lumen of radius
    ``lumen`` mm, or ``wall(r)`` as outer radius around a lumen r) and mark ``env`` (the mediastinal
    envelope that the lungs cannot enter) within ``margin`` mm."""
    for p0, p1, r0, r1 in segs:
        o0, o1 = (wall(r0), wall(r1)) if wall is not None else (r0, r1)
        geo = _seg_geom(g, p0, p1, max(o0, o1) + margin + g.h)
        if geo is None:
            continue
        sl, dist, t = geo
        ro = o0 + t * (o1 - o0)
        _lerp(hu, sl, _cover(dist, ro, g.h), value)
        if wall is not None:
            _lerp(hu, sl, _cover(dist, r0 + t * (r1 - r0), g.h), lumen_value)
        elif lumen is not None:
            _lerp(hu, sl, _cover(dist, lumen, g.h), lumen_value)
        if env is not None:
            env[sl] |= (dist < ro + margin).mean(axis=-1) > 0.5


def _paint_ellipsoid(
    g: _Grid,
    hu: np.ndarray,
    env: np.ndarray | None,
    c,
    radii,
    value: float,
    angle: float = 0.0,
    margin: float = 0.0,
    grow: float = 0.0,
) -> None:
    """Paint an ellipsoid grown by ``grow`` mm (approximately) and mark ``env`` within ``margin``."""
    rm = min(radii)
    geo = _ell_geom(g, c, radii, angle, pad=grow + margin + g.h)
    if geo is None:
        return
    sl, q = geo
    d = q * rm
    _lerp(hu, sl, _cover(d, rm + grow, g.h), value)
    if env is not None:
        env[sl] |= (d < rm + grow + margin).mean(axis=-1) > 0.5


def _ell_cover(g: _Grid, c, radii, angle: float = 0.0):
    geo = _ell_geom(g, c, radii, angle, pad=g.h)
    if geo is None:
        return None
    sl, q = geo
    rm = min(radii)
    return sl, _cover(q * rm, rm, g.h)


def _airway_wall(extra: float) -> Callable[[float], float]:
    """Outer radius of a bronchus of lumen radius r (normal wall ~20% of the lumen + 0.6 mm)."""
    return lambda r: 1.25 * r + 0.6 + extra


def _render_chest(a: _Anatomy, les: Mapping[str, dict[str, Any]], g: _Grid) -> np.ndarray:
    """HU ``(X, Y, Z)`` float32 of a chest phantom with the lesions ``les`` (no noise, no blur)."""
    nz = len(g.z)
    X2, Y2 = g.x[:, None], g.y[None, :]  # noqa: N806
    # body: fat under the skin, muscle inside
    eb = ((X2 - a.bx) / a.ba) ** 2 + ((Y2 - a.by) / a.bb) ** 2
    em = ((X2 - a.bx) / (a.ba - a.fat)) ** 2 + ((Y2 - a.by) / (a.bb - a.fat)) ** 2
    body2 = np.where(em < 1, a.muscle_hu, np.where(eb < 1, a.fat_hu, -1000.0)).astype(_F32)
    hu = np.repeat(body2[:, :, None], nz, axis=2)

    # the thoracic cavity and everything inside it, on the cavity's bounding box
    slc = g.box((a.bx - a.ca - 2, a.cyc - a.cb - 2, -1e9), (a.bx + a.ca + 2, a.cyc + a.cb + 2, 1e9))
    gc = g.sub(slc)
    H = hu[slc]  # noqa: N806 - a view: painting H paints hu
    Xc, Yc, Zc = gc.X, gc.Y, gc.Z  # noqa: N806
    Xc2, Yc2 = gc.x[:, None], gc.y[None, :]  # noqa: N806
    depth2 = _cavity_depth(a, Xc2, Yc2)
    cav2 = depth2 > 0
    zd2 = _dome(a, Xc2, Yc2)
    H[...] = np.where(cav2[:, :, None], a.med_hu, H)
    # thoracic inlet: muscle lateral to the mediastinum above the lung apices
    inlet = cav2[:, :, None] & (Zc > a.taper_z0) & (np.abs(Xc - a.bx) > a.w_med + 22.0)
    H[inlet] = a.muscle_hu

    # abdomen below the diaphragm: liver (right, crossing anteriorly), stomach with gas, spleen
    kab = int(np.searchsorted(gc.z, float(zd2[cav2].max()) + 1.0, side="right")) if cav2.any() else 0
    if kab > 0:
        gab = _Grid(gc.x, gc.y, gc.z[:kab], gc.h, gc.hz, gc.zsub)
        liver2 = (Xc2 - a.bx) < 25.0 - 0.6 * (Yc2 - a.cyc)
        A = np.repeat(np.where(liver2, a.liver_hu, 28.0).astype(_F32)[:, :, None], kab, axis=2)  # noqa: N806
        sc, sr = a.stomach_c, a.stomach_r
        _paint_ellipsoid(gab, A, None, sc, sr, 40.0, grow=3.0)
        _paint_ellipsoid(gab, A, None, sc, sr, 20.0)
        gas = _ell_cover(
            gab, (sc[0], sc[1] - 0.55 * sr[1], sc[2] + 0.3 * sr[2]), (0.8 * sr[0], 0.45 * sr[1], 0.6 * sr[2])
        )
        if gas is not None:
            _lerp(A, gas[0], gas[1], -1000.0)
        _paint_ellipsoid(gab, A, None, a.spleen_c, a.spleen_r, 48.0)
        below = cav2[:, :, None] & (gab.Z < zd2[:, :, None])
        H[:, :, :kab] = np.where(below, A, H[:, :, :kab])

    # mediastinum: everything painted here also marks the envelope that the lungs cannot enter
    env = np.zeros(gc.shape, bool)
    env |= (np.hypot(Xc2 - a.bx, Yc2 - a.vb_y) < a.vb_r + 4.0)[:, :, None]
    hc, hr, hang = _heart(a, les)
    pe = les.get("Pericardial effusion")
    if pe is not None:
        _paint_ellipsoid(gc, H, env, hc, hr, pe["hu"], hang, margin=2.0, grow=3.5 + pe["t"])
    _paint_ellipsoid(gc, H, env, hc, hr, -95.0, hang, margin=2.0, grow=3.5)  # epicardial fat
    _paint_ellipsoid(gc, H, None, hc, hr, 40.0, hang)
    # anterior mediastinal (thymic) fat in front of the great vessels
    zlo = a.heart_top - 25.0
    _paint_ellipsoid(
        gc,
        H,
        env,
        (a.bx - 3.0, a.cyc - 0.68 * a.cb, 0.5 * (zlo + 140.0)),
        (17.0 * a.k, 0.3 * a.cb, 0.5 * (140.0 - zlo)),
        a.med_hu,
    )
    _paint_tubes(gc, H, env, a.aorta, 42.0, 5.0)
    _paint_tubes(gc, H, env, a.pulmonary, 38.0, 4.0)
    _paint_tubes(gc, H, env, a.veins, 36.0, 4.0)
    _paint_tubes(gc, H, env, a.arch_branches, 40.0, 4.0)
    if "Lymphadenopathy" in les:
        for _, c, radii, v in les["Lymphadenopathy"]["nodes"]:
            _paint_ellipsoid(gc, H, env, c, radii, v, margin=2.0)
    _paint_tubes(gc, H, env, a.oesophagus, 35.0, 4.0, lumen=2.5 if a.oe_air else None)
    if "Hiatal hernia" in les:
        p = les["Hiatal hernia"]
        c, radii = p["c"], p["radii"]
        _paint_ellipsoid(gc, H, env, c, radii, 40.0, margin=2.0, grow=4.0)
        _paint_ellipsoid(gc, H, None, c, radii, p["hu"])
        lvl = c[1] + p["level"] * radii[1]
        gas = _ell_cover(gc, c, radii)
        if gas is not None:
            sl, cov = gas
            _lerp(H, sl, cov * (gc.y[sl[1]][None, :, None] < lvl), -1000.0)
    pbt = les.get("Peribronchial thickening", {}).get("extra", 0.0)
    _paint_tubes(gc, H, env, a.central_airways[:1], 40.0, 5.0, wall=_airway_wall(0.0))
    _paint_tubes(gc, H, env, a.central_airways[1:], 40.0, 2.0, wall=_airway_wall(pbt))

    # lungs
    L = _lung_shape(a, Xc, Yc, Zc) & ~env  # noqa: N806
    P = np.empty(gc.shape, _F32)  # noqa: N806 - lung parenchyma, denser posteriorly (dependent)
    P[...] = a.lung_hu + a.lung_grad * (Yc - a.cyc) / a.cb
    prune = np.ones(gc.shape, _F32)
    if "Emphysema" in les:
        p = les["Emphysema"]
        fe = p["field"].sample(gc) + 0.8 * np.clip(Zc / 70.0, -1.0, 1.0)
        E = np.clip((fe - float(special.ndtri(1.0 - p["frac"]))) * 2.5, 0.0, 1.0)  # noqa: N806
        for c, rad in p["bullae"]:
            b = _ell_cover(gc, c, (rad, rad, rad))
            if b is not None:
                _maxin(E, b[0], b[1])
        P += E * (-985.0 - P)
        prune *= 1.0 - 0.65 * E
    if "Mosaic attenuation pattern" in les:
        p = les["Mosaic attenuation pattern"]
        lucent = p["cells"].sample(gc) < 0.0
        P += np.where(lucent, -p["low"], p["high"]).astype(_F32)
        prune *= np.where(lucent, 0.7, 1.0).astype(_F32)
    if "Lung opacity" in les:
        for c, radii, fld, target in les["Lung opacity"]["patches"]:
            geo = _ell_geom(gc, c, radii, pad=gc.h)
            if geo is None:
                continue
            sl, q = geo
            cov = np.clip((1.0 - q.mean(axis=-1)) * 3.0 + 0.6 * fld.sample(gc.sub(sl)), 0.0, 1.0)
            _lerp(P, sl, cov, target)
    V = np.zeros(gc.shape, _F32)  # noqa: N806 - vessel coverage
    _draw_tubes(gc, V, a.vessels)
    W = np.zeros(gc.shape, _F32)  # noqa: N806 - bronchial wall coverage
    Aw = np.zeros(gc.shape, _F32)  # noqa: N806 - bronchial lumen coverage
    _draw_airways(gc, W, Aw, a.airways, _airway_wall(pbt))
    if "Bronchiectasis" in les:
        p = les["Bronchiectasis"]
        for segs, w in p["tubes"]:
            _draw_airways(gc, W, Aw, segs, lambda r, w=w: r + w + pbt)
        _draw_tubes(gc, V, p["vessels"])
    T = np.maximum(V * prune, W)  # noqa: N806
    LH = P + T * (40.0 - P)  # noqa: N806
    LH += Aw * (-1000.0 - LH)
    if "Interlobular septal thickening" in les:
        p = les["Interlobular septal thickening"]
        S = _cover(p["edges"].sample(gc)[..., None], p["w"], gc.h)  # noqa: N806
        S *= (depth2 < p["shell"])[:, :, None] | (Zc - zd2[:, :, None] < 15.0)
        S *= Zc < p["z_top"]
        LH += S * (p["hu"] - LH)
    if "Pulmonary fibrotic sequela" in les:
        p = les["Pulmonary fibrotic sequela"]
        F = np.zeros(gc.shape, _F32)  # noqa: N806
        _draw_tubes(gc, F, p["strands"])
        c, radii, ang = p["cap"]
        cap = _ell_cover(gc, c, radii, ang)
        if cap is not None:
            _maxin(F, cap[0], cap[1])
        LH += F * (p["hu"] - LH)
    if "Lung nodule" in les:
        for c, radii, v in les["Lung nodule"]["nodules"]:
            n = _ell_cover(gc, c, radii)
            if n is not None:
                _lerp(LH, n[0], n[1], v)
    if "Consolidation" in les:
        p = les["Consolidation"]
        geo = _ell_geom(gc, p["c"], p["radii"], p["angle"], pad=gc.h)
        if geo is not None:
            sl, q = geo
            cov = np.clip((1.0 - q.mean(axis=-1)) * 4.0 + 0.6 * p["field"].sample(gc.sub(sl)), 0.0, 1.0)
            _lerp(LH, sl, cov, p["hu"])
            B = np.zeros(gc.shape, _F32)  # noqa: N806 - air bronchograms
            _draw_tubes(gc, B, p["bron"])
            B[sl] = np.maximum(B[sl], Aw[sl]) * (cov > 0.5)
            LH += B * (-950.0 - LH)
    if "Atelectasis" in les:
        p = les["Atelectasis"]
        for c, radii, ang in p["parts"]:
            at = _ell_cover(gc, c, radii, ang)
            if at is not None:
                _lerp(LH, at[0], at[1], p["hu"])
    if "Pleural effusion" in les:
        p = les["Pleural effusion"]
        side2 = np.zeros(depth2.shape, bool)
        for s in p["sides"]:
            side2 |= (Xc2 < a.bx) if s == "R" else (Xc2 > a.bx)
        t = _effusion_thickness(p, Zc)
        ef = L & side2[:, :, None] & (depth2[:, :, None] < t * _dependency(a, Yc2)[:, :, None])
        LH[ef] = p["hu"]
    H[...] = np.where(L, LH, H)

    _paint_bones(a, g, hu)
    # calcifications and metal, over everything
    for key, item in (
        ("Arterial wall calcification", "plaques"),
        ("Coronary artery wall calcification", "spots"),
    ):
        if key in les:
            for c, radii, v in les[key][item]:
                _paint_ellipsoid(g, hu, None, c, radii, v)
    if "Medical material" in les:
        p = les["Medical material"]
        for segs, v in p["wires"]:
            _paint_tubes(g, hu, None, segs, v, 0.0)
        for c, radii, ang, v in p["bodies"]:
            _paint_ellipsoid(g, hu, None, c, radii, v, ang)
    # the patient table: a curved tray under the back
    ty = a.table_y - 0.0008 * (X2 - a.bx) ** 2
    tray = (np.abs(Y2 - ty) < 2.5) & (np.abs(X2 - a.bx) < 165.0) & (eb >= 1)
    hu[tray] = 220.0
    return hu


def _paint_bones(a: _Anatomy, g: _Grid, hu: np.ndarray) -> None:
    """Spine (body, discs, canal, posterior elements), ribs (oblique, with cartilage) and sternum."""
    X2, Y2 = g.x[:, None], g.y[None, :]  # noqa: N806
    # vertebral body: cortex and trabecular bone, intervertebral discs every disc_p mm
    d = np.hypot(X2 - a.bx, Y2 - a.vb_y)
    inb = d < a.vb_r
    disc = ((g.z - a.disc_phase) % a.disc_p) < a.disc_w
    vb = np.where(d < a.vb_r - 2.2, a.trab_hu, a.vb_cortex).astype(_F32)
    idx = np.nonzero(inb)
    col = np.repeat(vb[idx][:, None], len(g.z), axis=1)
    col[:, disc] = 90.0
    hu[idx[0], idx[1], :] = col
    # canal, lamina, spinous and transverse processes
    dc = np.hypot(X2 - a.bx, Y2 - a.canal_y)
    post = np.zeros(d.shape, _F32)
    post[(dc > a.canal_r + 0.5) & (dc < a.canal_r + 5.0) & (Y2 > a.canal_y - 3.0)] = 650.0
    sp_c = a.canal_y + a.canal_r + 3.0 + 0.5 * a.spin_len
    post[((X2 - a.bx) / 4.5) ** 2 + ((Y2 - sp_c) / (0.5 * a.spin_len)) ** 2 < 1] = 600.0
    for sgn in (-1.0, 1.0):
        post[
            ((X2 - a.bx - sgn * (a.canal_r + 13.0)) / 11.0) ** 2 + ((Y2 - a.canal_y + 2.0) / 4.5) ** 2 < 1
        ] = 600.0
    post[dc < a.canal_r] = 15.0
    idx = np.nonzero(post != 0)
    hu[idx[0], idx[1], :] = post[idx][:, None]
    # ribs: a ring just outside the cavity, present where the oblique rib bands cross the slice
    rho = np.sqrt(((X2 - a.bx) / a.ca) ** 2 + ((Y2 - a.cyc) / a.cb) ** 2)
    dout = np.hypot(X2 - a.bx, Y2 - a.cyc) * (1.0 - 1.0 / np.maximum(rho, 1e-3))
    u = (Y2 - a.cyc) / a.cb
    ring = (dout > 1.5) & (dout < 1.5 + a.rib_t)
    ring &= ~((np.abs(X2 - a.bx) < a.vb_r + 10.0) & (u > 0.4)) & ~(
        (np.abs(X2 - a.bx) < a.st_a + 3.0) & (u < -0.4)
    )
    idx = np.nonzero(ring)
    if idx[0].size:
        uu = np.broadcast_to(u, dout.shape)[idx]
        dd = dout[idx]
        zeff = g.z[None, :] + a.rib_drop * 0.5 * (1.0 - uu[:, None])
        band = (zeff - a.rib_phase) % a.rib_p
        rib = band < a.rib_h
        inner = (dd[:, None] > 3.5) & (dd[:, None] < a.rib_t - 0.5) & (band > 1.8) & (band < a.rib_h - 1.8)
        val = np.where(inner, 260.0, a.rib_hu)
        val = np.where((uu < -0.6)[:, None], 140.0, val)  # costal cartilage anteriorly
        col = hu[idx[0], idx[1], :]
        hu[idx[0], idx[1], :] = np.where(rib, val, col)
    # sternum: cortex and marrow, wider manubrium at the top
    sb = g.box(
        (a.bx - 2 * a.st_a - 2, a.st_y - a.st_b - 2, a.st_bot),
        (a.bx + 2 * a.st_a + 2, a.st_y + a.st_b + 2, 1e9),
    )
    if sb is not None:
        xs, ys, zs = (
            g.x[sb[0]][:, None, None] - a.bx,
            g.y[sb[1]][None, :, None] - a.st_y,
            g.z[sb[2]][None, None, :],
        )
        wide = np.where(zs > a.arch_z - 10.0, 1.5, 1.0) * a.st_a
        outer = (xs / wide) ** 2 + (ys / a.st_b) ** 2 < 1
        inner = (xs / (wide - 2.0)) ** 2 + (ys / (a.st_b - 2.0)) ** 2 < 1
        view = hu[sb]
        view[...] = np.where(outer, np.where(inner, 230.0, 650.0), view)


def _render_abdomen(a: _Anatomy, r: np.random.Generator, g: _Grid) -> np.ndarray:
    """HU of an abdomen phantom (not a chest CT): liver, spleen, stomach, kidneys, bowel gas, spine."""
    nz = len(g.z)
    X2, Y2 = g.x[:, None], g.y[None, :]  # noqa: N806
    eb = ((X2 - a.bx) / a.ba) ** 2 + ((Y2 - a.by) / a.bb) ** 2
    em = ((X2 - a.bx) / (a.ba - a.fat)) ** 2 + ((Y2 - a.by) / (a.bb - a.fat)) ** 2
    body2 = np.where(em < 1, a.muscle_hu, np.where(eb < 1, a.fat_hu, -1000.0)).astype(_F32)
    inner = _cavity_depth(a, X2, Y2) > 0
    body2 = np.where(inner, -40.0, body2).astype(_F32)  # mesenteric fat
    hu = np.repeat(body2[:, :, None], nz, axis=2)
    k = a.k
    organs = [
        ((a.bx - 0.45 * a.ca, a.cyc - 0.05 * a.cb, 40.0), (0.6 * a.ca, 0.85 * a.cb, 80.0), a.liver_hu),
        ((a.bx + 0.7 * a.ca, a.cyc + 0.45 * a.cb, 50.0), (22.0 * k, 36.0 * k, 45.0), 48.0),
        ((a.bx + 0.4 * a.ca, a.cyc - 0.35 * a.cb, 30.0), (35.0 * k, 28.0 * k, 40.0), 22.0),
    ]
    for sgn in (-1.0, 1.0):
        organs.append(((a.bx + sgn * (a.vb_r + 38.0), a.vb_y - 5.0, -30.0), (24.0 * k, 30.0 * k, 55.0), 32.0))
    for c, radii, v in organs:
        _paint_ellipsoid(g, hu, None, c, radii, v)
    for _ in range(int(r.integers(8, 14))):  # bowel loops, some with gas
        c = (a.bx + _u(r, -0.7, 0.7) * a.ca, a.cyc + _u(r, -0.8, 0.2) * a.cb, _u(r, -110, 20))
        rad = _u(r, 10, 18)
        _paint_ellipsoid(g, hu, None, c, (rad, rad, rad * 1.5), 30.0, grow=2.0)
        _paint_ellipsoid(g, hu, None, c, (rad, rad, rad * 1.5), -1000.0 if r.random() < 0.5 else 15.0)
    dao = _polyline(
        [(a.dao[0] - 8.0, a.dao[1], 130.0), (a.dao[0] - 12.0, a.dao[1] + 2.0, -130.0)], [11.0, 10.0]
    )
    _paint_tubes(g, hu, None, dao, 40.0, 0.0)
    ivc = _polyline(
        [(a.bx - 25.0, a.vb_y - a.vb_r - 10.0, 130.0), (a.bx - 25.0, a.vb_y - a.vb_r - 10.0, -130.0)],
        [11.0, 11.0],
    )
    _paint_tubes(g, hu, None, ivc, 38.0, 0.0)
    _paint_bones(a, g, hu)
    return hu


def _render_head(r: np.random.Generator, g: _Grid) -> np.ndarray:
    """HU of a head phantom (not a chest CT): scalp, skull with diploe, brain, ventricles, falx."""
    hu = np.full(g.shape, -1000.0, _F32)
    cx, cy, cz = _u(r, -5, 5), _u(r, -15, 5), _u(r, -10, 10)
    ra, rb, rc = _u(r, 66, 74), _u(r, 84, 94), _u(r, 100, 115)
    neck = (np.hypot((g.x[:, None] - cx) / 55.0, (g.y[None, :] - cy - 20.0) / 50.0) < 1)[:, :, None] & (
        g.Z < cz - 40.0
    )
    hu[neck] = 40.0
    _paint_ellipsoid(g, hu, None, (cx, cy, cz), (ra, rb, rc), 30.0, grow=5.0)
    _paint_ellipsoid(g, hu, None, (cx, cy, cz), (ra, rb, rc), _u(r, 1000, 1300))
    _paint_ellipsoid(g, hu, None, (cx, cy, cz), (ra - 2.5, rb - 2.5, rc - 2.5), _u(r, 500, 700))
    _paint_ellipsoid(g, hu, None, (cx, cy, cz), (ra - 5.0, rb - 5.0, rc - 5.0), _u(r, 36, 42))
    _paint_ellipsoid(g, hu, None, (cx, cy, cz), (ra - 14.0, rb - 14.0, rc - 16.0), _u(r, 26, 31))
    for sgn in (-1.0, 1.0):
        _paint_ellipsoid(g, hu, None, (cx + sgn * 8.0, cy - 5.0, cz + 12.0), (5.0, 18.0, 14.0), 6.0)
    falx = _polyline([(cx, cy - rb + 8.0, cz + 20.0), (cx, cy + rb - 8.0, cz + 20.0)], [1.0, 1.0])
    for dz in np.arange(-30.0, 70.0, 8.0):
        _paint_tubes(
            g,
            hu,
            None,
            [(np.add(s[0], (0, 0, dz)), np.add(s[1], (0, 0, dz)), 1.0, 1.0) for s in falx],
            60.0,
            0.0,
        )
    return hu


_KERNELS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    # manufacturer: (soft kernels, sharp kernels, models)
    "SIEMENS": (
        ("B30f", "Br40d", "I30f"),
        ("B70f", "Bl57d", "Br64d"),
        ("SOMATOM Definition Edge", "SOMATOM go.Up", "SOMATOM Force"),
    ),
    "Philips": (("B", "C"), ("YB", "L", "D"), ("Ingenuity CT", "Brilliance 64", "IQon - Spectral CT")),
    "GE MEDICAL SYSTEMS": (
        ("STANDARD", "SOFT"),
        ("LUNG", "BONE"),
        ("Revolution EVO", "Optima CT660", "LightSpeed VCT"),
    ),
    "TOSHIBA": (("FC07", "FC18"), ("FC51", "FC86"), ("Aquilion Prime", "Aquilion ONE")),
}


def _finish(hu: np.ndarray, spacing: Sequence[float], sharp: bool, r: np.random.Generator) -> np.ndarray:
    """Apply the reconstruction kernel (PSF, edge enhancement), correlated noise and the circular
    field of view (-3024 HU outside); returns int16 HU ``(X, Y, Z)``."""
    sx, sy = float(spacing[0]), float(spacing[1])
    psf = _u(r, 0.45, 0.6) if sharp else _u(r, 0.9, 1.2)
    sd = _u(r, 15, 20) if sharp else _u(r, 10, 14)
    # The noise goes through the same kernel as the image (in-plane correlated): scale it so that
    # its final sd is ``sd``, measured once on a small white-noise patch through the same filters.
    sig = (psf / sx, psf / sy, 0.0)
    sig_e = (1.6 / sx, 1.6 / sy, 0.0)

    def kernel(v: np.ndarray) -> np.ndarray:
        v = ndimage.gaussian_filter(v, sig, truncate=3.0, mode="nearest")
        if sharp:  # edge enhancement of a sharp (lung/bone) kernel
            v += 0.35 * (v - ndimage.gaussian_filter(v, sig_e, truncate=3.0, mode="nearest"))
        return v

    probe = kernel(np.random.default_rng(0).standard_normal((48, 48, 1)).astype(_F32))[8:-8, 8:-8]
    noise = r.standard_normal(hu.shape, dtype=_F32)
    hu += noise * (sd / max(float(probe.std()), 1e-6))
    hu = kernel(hu)
    nx, ny = hu.shape[:2]
    xr = (np.arange(nx) - (nx - 1) / 2) * sx
    yr = (np.arange(ny) - (ny - 1) / 2) * sy
    radius = 0.5 * min(nx * sx, ny * sy)
    outside = (xr[:, None] ** 2 + yr[None, :] ** 2) > radius**2
    hu[outside] = _HU_OUTSIDE_FOV
    return np.rint(np.clip(hu, _HU_OUTSIDE_FOV, 20000.0)).astype(np.int16)


def _render_volume(
    kind: str,
    labels: Sequence[int],
    base: Sequence[int],
    scan: int,
    recon: int,
    age: float,
    sex: str,
    shape: Sequence[int],
    spacing: Sequence[float],
    sharp: bool,
) -> tuple[np.ndarray, _Anatomy, dict[str, dict[str, Any]], _Grid]:
    """One volume: int16 HU ``(X, Y, Z)``, its anatomy, lesions and grid. Anatomy and lesions depend
    on the patient (``base``), the position jitter on the scan, noise and kernel on the reconstruction."""
    a = _sample_anatomy(_rng(*base, 1), age, sex)
    shift = _rng(*base, scan, 2).normal(0.0, 1.0, 3) * np.array([3.0, 3.0, 5.0])
    g = _Grid.make(shape, spacing, shift)
    les: dict[str, dict[str, Any]] = {}
    if kind == "chest":
        les = _prepare_lesions(a, labels, base)
        hu = _render_chest(a, les, g)
    elif kind == "abdomen":
        hu = _render_abdomen(a, _rng(*base, scan, 4), g)
    elif kind == "head":
        hu = _render_head(_rng(*base, scan, 4), g)
    else:
        raise ValueError(f"unknown phantom kind {kind!r}; expected 'chest', 'abdomen' or 'head'")
    return _finish(hu, spacing, sharp, _rng(*base, scan, recon, 3)), a, les, g


def _phantom(
    labels: Mapping[str, int] | Sequence[int] = (),
    *,
    shape: Sequence[int] = (128, 128, 48),
    spacing: Sequence[float] = (2.75, 2.75, 5.0),
    seed: int = 0,
    kind: str = "chest",
    sharp: bool = False,
    age: float = 60.0,
    sex: str = "M",
) -> SimpleNamespace:
    """One volume with forced labels (a mapping class -> 0/1, or 18 values): for tests and looks.
    Returns ``hu`` (int16 ``(X, Y, Z)``), ``anatomy``, ``lesions`` and ``grid``; the anatomy and noise
    depend only on ``seed``, so two calls differing in labels differ exactly by the lesions."""
    if isinstance(labels, Mapping):
        unknown = set(labels) - set(CLASSES)
        if unknown:
            raise ValueError(f"unknown classes {sorted(unknown)}")
        vec = [int(labels.get(c, 0)) for c in CLASSES]
    else:
        vec = [int(v) for v in labels] or [0] * len(CLASSES)
        if len(vec) != len(CLASSES):
            raise ValueError(f"expected {len(CLASSES)} labels, got {len(vec)}")
    hu, a, les, g = _render_volume(kind, vec, (seed, 9, 1), 0, 1, age, sex, shape, spacing, sharp)
    return SimpleNamespace(hu=hu, anatomy=a, lesions=les, grid=g)


# ---------------------------------------------------------------------------------------------
# the snapshot plan: patients, scans, reconstructions, labels, metadata (cheap, sequential)
# ---------------------------------------------------------------------------------------------
@dataclass
class _Volume:
    """One row of the labels/metadata/reports CSVs (and, when ``written``, one file)."""

    name: str  # VolumeName with the .nii.gz suffix
    split: str  # "train" | "valid"
    base: tuple[int, int, int]  # (seed, split code, patient id): keys the patient's random streams
    scan: int  # 0 for scan "a", 1 for "b"
    recon: int  # 1, 2
    labels: tuple[int, ...]
    kind: str = "chest"  # "chest" | "head" | "abdomen"
    age: int = 60
    sex: str = "M"
    sharp: bool = False
    kernel: str = ""
    manufacturer: str = ""
    model: str = ""
    intercept: int = -1024
    written: bool = True
    fixed: bool = False
    study_date: str = ""
    clinical: str = ""
    tube_current: int = 200


_CLINICAL = (
    "Cough.",
    "Dyspnea.",
    "Fever and cough.",
    "Chest pain.",
    "Follow-up of a known malignancy.",
    "Preoperative evaluation.",
    "Shortness of breath and fatigue.",
    "Not given.",
)


def _quota(frac: float, n: int, at_least_one: bool) -> int:
    k = int(round(frac * n))
    return min(n, max(k, 1 if (at_least_one and n > 0) else 0))


def _plan(n_patients: int, seed: int) -> list[_Volume]:
    """All volumes of a snapshot in CSV order: ~85% train / 15% valid patients, ~15% with a repeat
    scan, ~10% of scans with a second reconstruction, 1-2 non-chest scans per split, ~2% label rows
    without a file, ~3% fixed re-uploads, ~3% with RescaleIntercept -8192."""
    rng = _rng(seed, 0)
    n_valid = max(1, int(round(0.15 * n_patients)))
    n_train = n_patients - n_valid
    out: list[_Volume] = []
    for split, code, n_split in (("train", 0, n_train), ("valid", 1, n_valid)):
        first = split == "train"
        latent, ages = _draw_latent(rng, n_split)
        sexes = rng.choice(["M", "F"], size=n_split)
        multi = set(rng.choice(n_split, size=_quota(0.15, n_split, first), replace=False).tolist())
        scans = []
        for i in range(n_split):
            scans.append((i, 0, latent[i]))
            if i in multi:
                scans.append((i, 1, _repeat_latent(rng, latent[i])))
        two = set(rng.choice(len(scans), size=_quota(0.10, len(scans), first), replace=False).tolist())
        single = [j for j in range(len(scans)) if j not in two]
        n_nc = 0 if len(scans) < 2 else (2 if len(scans) >= 150 else 1)
        nonchest = rng.choice(single, size=min(n_nc, len(single)), replace=False).tolist() if single else []
        kinds = {j: ("head", "abdomen")[(k + code) % 2] for k, j in enumerate(sorted(nonchest))}
        vols: list[_Volume] = []
        dates: dict[int, int] = {}
        for j, (i, si, lat) in enumerate(scans):
            pid = i + 1
            kind = kinds.get(j, "chest")
            labels = (
                tuple(int(v) for v in _labels_from_latent(lat)) if kind == "chest" else (0,) * len(CLASSES)
            )
            manu = str(rng.choice(list(_KERNELS)))
            soft, sharp, models = _KERNELS[manu]
            model = str(rng.choice(models))
            sharp_first = bool(rng.random() < 0.3)
            day0 = dates.setdefault(i, int(rng.integers(0, 1300)))
            day = day0 + (int(rng.integers(30, 400)) if si else 0)
            date = np.datetime64("2018-01-01") + np.timedelta64(day, "D")
            clinical = str(rng.choice(_CLINICAL))
            current = int(rng.integers(80, 320))
            for recon in (1, 2) if j in two else (1,):
                sh = sharp_first if recon == 1 else not sharp_first
                vols.append(
                    _Volume(
                        name=f"{split}_{pid}_{'ab'[si]}_{recon}.nii.gz",
                        split=split,
                        base=(seed, code, pid),
                        scan=si,
                        recon=recon,
                        labels=labels,
                        kind=kind,
                        age=int(ages[i]) + (1 if si and day - day0 > 365 else 0),
                        sex=str(sexes[i]),
                        sharp=sh,
                        kernel=str(rng.choice(sharp if sh else soft)),
                        manufacturer=manu,
                        model=model,
                        study_date=str(date).replace("-", ""),
                        clinical=clinical,
                        tube_current=current,
                    )
                )
        chest = [v for v in vols if v.kind == "chest"]
        k_miss = _quota(0.02, len(chest), first and len(chest) >= 3)
        for j in rng.choice(len(chest), size=k_miss, replace=False).tolist():
            chest[j].written = False
        avail = [v for v in chest if v.written]
        for j in rng.choice(len(avail), size=_quota(0.03, len(avail), first), replace=False).tolist():
            avail[j].fixed = True
        for j in rng.choice(len(vols), size=_quota(0.03, len(vols), first), replace=False).tolist():
            vols[j].intercept = -8192
        vols.sort(key=lambda v: (v.base[2], v.scan, v.recon))
        out.extend(vols)
    return out


# ---------------------------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------------------------
def _side_text(side: str, what: str = "lung") -> str:
    return {
        "both": f"both {what}s",
        "right": f"the right {what}",
        "left": f"the left {what}",
        "R": f"the right {what}",
        "L": f"the left {what}",
    }[side]


def _report(v: _Volume) -> tuple[str, str, str]:
    """Technique, findings and impression texts that state exactly the drawn abnormalities."""
    if v.kind != "chest":
        region = "head" if v.kind == "head" else "upper abdomen"
        return (
            f"Non-contrast CT of the {region}; axial sections reconstructed with the {v.kernel} kernel.",
            f"The examination does not include the thorax; the images show the {region}.",
            "Not a chest CT examination.",
        )
    var = _variants(v.base)
    present = [c for c, x in zip(CLASSES, v.labels, strict=True) if x]
    findings, impressions = [], []
    for c in present:
        d = var[c]
        if c == "Medical material":
            f, i = {
                "pacemaker": (
                    "A pacemaker generator is seen in the left anterior chest wall with its lead(s) "
                    "extending through the superior vena cava into the right heart chambers.",
                    "Pacemaker.",
                ),
                "icd": (
                    "An implantable cardioverter-defibrillator is seen in the left anterior chest wall with "
                    "a shock lead in the right ventricle.",
                    "Implantable defibrillator.",
                ),
                "port": (
                    "A port catheter is seen in the right anterior chest wall with its tip in the superior "
                    "vena cava.",
                    "Port catheter.",
                ),
                "coil": (
                    f"Metallic embolisation coils are seen near the {'right' if d['side'] == 'R' else 'left'} "
                    "hilum.",
                    "Embolisation coils.",
                ),
            }[d["device"]]
        elif c == "Arterial wall calcification":
            f, i = (
                "Atherosclerotic calcified plaques are observed in the wall of the thoracic aorta.",
                "Aortic atherosclerosis.",
            )
        elif c == "Cardiomegaly":
            f, i = "The heart is enlarged; the cardiothoracic ratio is increased.", "Cardiomegaly."
        elif c == "Pericardial effusion":
            f, i = "Pericardial effusion is observed surrounding the heart.", "Pericardial effusion."
        elif c == "Coronary artery wall calcification":
            f, i = (
                "Calcified atherosclerotic plaques are present in the coronary arteries.",
                "Coronary artery calcification.",
            )
        elif c == "Hiatal hernia":
            f, i = (
                "A hiatal hernia containing gas and fluid is seen posterior to the heart above the diaphragm.",
                "Hiatal hernia.",
            )
        elif c == "Lymphadenopathy":
            f = (
                "Enlarged lymph nodes with a short axis over 15 mm are observed in the mediastinum "
                "and/or hilar regions."
            )
            i = "Mediastinal and hilar lymphadenopathy."
        elif c == "Emphysema":
            f = "Centrilobular emphysematous changes are seen in both lungs, more prominent in the upper zones"
            f += ", with subpleural bullae." if d["bullae"] else "."
            i = "Emphysema."
        elif c == "Atelectasis":
            f = f"{d['form'].capitalize()} atelectasis is observed in the lower zone of {_side_text(d['side'])}."
            i = "Atelectasis."
        elif c == "Lung nodule":
            n = d["count"]
            f = (
                f"{'A solid nodule' if n == 1 else f'{n} solid nodules'} up to 19 mm in diameter "
                f"{'is' if n == 1 else 'are'} observed in the lung parenchyma."
            )
            i = "Pulmonary nodule." if n == 1 else "Pulmonary nodules."
        elif c == "Lung opacity":
            f, i = (
                f"Patchy ground-glass opacities are observed in {_side_text(d['side'])}.",
                "Ground-glass opacities.",
            )
        elif c == "Pulmonary fibrotic sequela":
            f = (
                f"Fibrotic sequelae with parenchymal bands and pleuroparenchymal thickening are seen in the "
                f"{d['zone']} zone of {_side_text(d['side'])}."
            )
            i = "Fibrotic sequelae."
        elif c == "Pleural effusion":
            f = {"both": "Bilateral", "right": "Right-sided", "left": "Left-sided"}[d["side"]]
            f += " pleural effusion is observed, layering posteriorly."
            i = "Pleural effusion."
        elif c == "Mosaic attenuation pattern":
            f, i = "A mosaic attenuation pattern is observed in both lungs.", "Mosaic attenuation."
        elif c == "Peribronchial thickening":
            f, i = "Peribronchial thickening is observed.", "Peribronchial thickening."
        elif c == "Consolidation":
            f = f"A consolidation with air bronchograms is seen in the {d['zone']} zone of {_side_text(d['side'])}."
            i = "Consolidation, likely pneumonia."
        elif c == "Bronchiectasis":
            f, i = f"Cylindrical bronchiectasis is observed in {_side_text(d['side'])}.", "Bronchiectasis."
        else:  # Interlobular septal thickening
            f, i = (
                "Interlobular septal thickening is observed in the peripheral parts of the lungs.",
                "Septal thickening.",
            )
        findings.append(f)
        impressions.append(i)
    technique = (
        f"Non-contrast CT of the thorax in the supine position; axial sections reconstructed with the "
        f"{v.kernel} kernel."
    )
    if not findings:
        text = (
            "Trachea and both main bronchi are patent. Mediastinal structures are within normal limits. "
            "Heart contour and size are normal. No pleural or pericardial effusion. No mass or "
            "infiltrative lesion was detected in either lung."
        )
        return technique, text, "No significant pathology in the thorax."
    return technique, "Trachea and both main bronchi are patent. " + " ".join(findings), " ".join(impressions)


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def _save_nifti(path: Path, arr: np.ndarray, spacing: Sequence[float], *, fixed: bool) -> None:
    """int16 ``.nii.gz``: a blank header (identity affine, no scaling) for originals; zooms and
    slope 1 / intercept 0 filled in for the fixed re-uploads. Bytes depend only on ``arr``."""
    affine = np.diag([*(float(s) for s in spacing), 1.0]) if fixed else np.eye(4)
    img = nib.Nifti1Image(np.asarray(arr, dtype=np.int16), affine)
    img.header.set_data_dtype(np.int16)
    if fixed:
        img.header.set_slope_inter(1.0, 0.0)
    else:
        img.header.set_slope_inter(None, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))
    os.replace(tmp, path)


def _write_volume(task: tuple[_Volume, tuple[int, int, int], tuple[float, float, float], str]) -> str:
    """Render one volume and write it (and its fixed re-upload); runs in a worker process."""
    v, shape, spacing, root = task
    hu = _render_volume(v.kind, v.labels, v.base, v.scan, v.recon, v.age, v.sex, shape, spacing, v.sharp)[0]
    stored = np.clip(hu.astype(np.int32) - v.intercept, -32768, 32767).astype(np.int16)
    _save_nifti(Path(root) / volume_relpath(v.name), stored, spacing, fixed=False)
    if v.fixed:
        _save_nifti(Path(root) / volume_relpath(v.name, fixed=True), hu, spacing, fixed=True)
    return v.name


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _metadata_row(v: _Volume, shape: Sequence[int], spacing: Sequence[float]) -> list[Any]:
    nx, ny, nz = shape
    sx, sy, sz = (float(s) for s in spacing)
    values = {
        "VolumeName": v.name,
        "Manufacturer": v.manufacturer,
        "SeriesDescription": f"{'THORAX' if v.kind == 'chest' else v.kind.upper()} {sz:g} {v.kernel}",
        "ManufacturerModelName": v.model,
        "PatientSex": v.sex,
        "PatientAge": f"{v.age:03d}Y",
        "ReconstructionDiameter": f"{min(nx * sx, ny * sy):.1f}",
        "XRayTubeCurrent": v.tube_current,
        "ConvolutionKernel": v.kernel,
        "PatientPosition": "HFS",
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "Rows": ny,
        "Columns": nx,
        "XYSpacing": f"[{sx!r}, {sy!r}]",
        "RescaleIntercept": v.intercept,
        "RescaleSlope": 1,
        "RescaleType": "HU",
        "NumberofSlices": nz,
        "ZSpacing": repr(sz),
        "StudyDate": v.study_date,
    }
    return [values.get(c, "") for c in METADATA_COLUMNS]


def _check_args(n_patients: int, shape: Sequence[int], spacing: Sequence[float], seed: int, workers: int):
    if isinstance(n_patients, bool) or not isinstance(n_patients, (int, np.integer)) or n_patients < 2:
        raise ValueError(
            f"n_patients must be an integer >= 2 (one train and one valid patient), got {n_patients!r}"
        )
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 integers >= 8 (X, Y, Z voxels), got {shape!r}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be 3 positive millimetre values, got {spacing!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    return shape, spacing


def generate(
    out: str | Path,
    *,
    n_patients: int = 300,
    shape: tuple[int, int, int] = (128, 128, 48),
    spacing: tuple[float, float, float] = (2.75, 2.75, 5.0),
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic CT-RATE snapshot under ``out/dataset/`` and return that ``dataset`` path.

    Args:
        out: folder that receives ``dataset/`` (created if needed).
        n_patients: patients over both splits (~85% ``train_*``, ~15% ``valid_*``), >= 2.
        shape: voxels ``(X, Y, Z)`` of every volume.
        spacing: voxel size ``(SX, SY, SZ)`` in mm (metadata ``XYSpacing`` and ``ZSpacing``).
        seed: the same seed gives the same CSV bytes and voxel arrays, whatever ``workers``.
        workers: processes that render volumes (a multiprocessing pool when > 1).
        progress: show a tqdm bar while writing volumes.
        overwrite: replace an existing non-empty ``dataset/`` (refused otherwise).

    Returns:
        The ``out/dataset`` path.

    Raises:
        ValueError: a bad argument (named in the message).
        FileExistsError: ``out/dataset`` exists, is not empty and ``overwrite`` is False.
    """
    shape, spacing = _check_args(n_patients, shape, spacing, seed, workers)
    root = Path(out) / "dataset"
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{root} exists and is not empty; pass overwrite=True (--overwrite) to replace it"
            )
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    vols = _plan(int(n_patients), int(seed))

    for split in ("train", "valid"):
        sv = [v for v in vols if v.split == split]
        _write_csv(root / LABELS_CSV[split], LABEL_COLUMNS, [[v.name, *v.labels] for v in sv])
        _write_csv(
            root / METADATA_CSV[split], METADATA_COLUMNS, [_metadata_row(v, shape, spacing) for v in sv]
        )
        _write_csv(root / REPORTS_CSV[split], REPORT_COLUMNS, [[v.name, v.clinical, *_report(v)] for v in sv])
        nc = root / NO_CHEST_TXT[split]
        nc.parent.mkdir(parents=True, exist_ok=True)
        nc.write_text("".join(f"{v.name}\n" for v in sv if v.kind != "chest"), encoding="utf-8")

    # Render by reference to this module's importable name, so that pool workers can unpickle it
    # even when the generator runs as ``python -m ctlib.synthetic``.
    fn = importlib.import_module("ctlib.synthetic")._write_volume
    tasks = [(v, shape, spacing, str(root)) for v in vols if v.written]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(tasks), desc="synthetic CT volumes", unit="vol", disable=not progress)
    try:
        if workers == 1 or len(tasks) <= 1:
            for t in tasks:
                fn(t)
                bar.update()
        else:
            # A worker that dies raises BrokenProcessPool here (a multiprocessing.Pool would respawn it
            # forever); results do not depend on which worker renders which volume.
            with ProcessPoolExecutor(min(int(workers), len(tasks)), mp_context=_mp_context()) as pool:
                for fut in as_completed([pool.submit(fn, t) for t in tasks]):
                    fut.result()
                    bar.update()
    finally:
        bar.close()
    return root


def _mp_context() -> multiprocessing.context.BaseContext:
    """forkserver (safe when the parent holds threads, e.g. torch) when the parent's ``__main__`` can
    be re-imported by the workers; otherwise (a script read from stdin) fork; spawn elsewhere."""
    methods = multiprocessing.get_all_start_methods()
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    importable = getattr(main, "__spec__", None) is not None or path is None or os.path.exists(path)
    if "forkserver" in methods and importable:
        return multiprocessing.get_context("forkserver")
    if "fork" in methods:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m ctlib.synthetic --out DIR [--patients N] ...``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m ctlib.synthetic",
        description=(
            "Write a synthetic CT-RATE snapshot (DIR/dataset/) of chest CT phantoms: train/ and valid/ "
            "trees of int16 .nii.gz volumes with blank headers and raw scanner values (HU = stored + "
            "RescaleIntercept from the metadata CSV; -1024 mostly, a few -8192), a few train_fixed/ "
            "re-uploads already in HU, repeat scans and second reconstructions, the multi-abnormality "
            "labels CSVs of the 18 CT-RATE classes (prevalence as in the paper's Table 1, realistic "
            "co-occurrence, some rows without a downloaded file), metadata and radiology report CSVs, and "
            "no_chest_*.txt lists naming a head/abdomen phantom per split. Every labelled abnormality is "
            "drawn with its own signature (see ctlib.synthetic.SIGNATURES); lung nodules, lymph nodes and "
            "bronchiectasis need neighbouring slices to be told from vessels."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", required=True, type=Path, help="folder that receives dataset/")
    parser.add_argument("--patients", type=int, default=300, help="number of patients (train + valid)")
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=(128, 128, 48),
        metavar=("X", "Y", "Z"),
        help="voxels per volume",
    )
    parser.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=(2.75, 2.75, 5.0),
        metavar=("SX", "SY", "SZ"),
        help="voxel size in mm",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same snapshot)")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering volumes")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty DIR/dataset")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        root = generate(
            args.out,
            n_patients=args.patients,
            shape=tuple(args.shape),
            spacing=tuple(args.spacing),
            seed=args.seed,
            workers=args.workers,
            progress=not args.quiet,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
