"""The lesion truth sidecar: where every drawn signature lies, written beside ``dataset/`` (outside
CT-RATE's format) and read back in the stored array's frame or in the model-input frame.

On disk, under the folder that holds ``dataset/``::

    truth/lesions.csv              VolumeName,class,lesion,x,y,z,x0,x1,y0,y1,z0,z1
    truth/masks/<VolumeName>.npz   mask: uint32 (X, Y, Z), bit k set where CLASSES[k] is drawn

Coordinates are voxel indices of the stored NIfTI array, in its (X, Y, Z) order: ``x, y, z`` the
centre (centroid, rounded), ``[x0, x1) x [y0, y1) x [z0, z1)`` the half-open box. One row per lesion
(a nodule, a lymph node, a plaque, one side of an effusion, a device body or lead); a diffuse finding
(emphysema, mosaic attenuation, septal or peribronchial thickening) is one row with its extent.
A ``*_fixed`` re-upload has the same geometry as its original (same VolumeName, same mask).
See DATA.md, "Lesion truth".
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ctlib.data import CLASSES
from ctlib.preprocess import Preprocessing, to_model_frame

TRUTH_DIR = "truth"
LESIONS_CSV = "truth/lesions.csv"
MASKS_DIR = "truth/masks"
LESION_COLUMNS = ("VolumeName", "class", "lesion", "x", "y", "z", "x0", "x1", "y0", "y1", "z0", "z1")
CLS = {c: i for i, c in enumerate(CLASSES)}


class Truth:
    """Recorder of the drawn lesions of one volume: parts ``(class, slices, region)`` in the indices of
    the full (X, Y, Z) grid. ``view(sl)`` gives a recorder whose slices are relative to ``sl``."""

    def __init__(self, shape: Sequence[int], offset: Sequence[int] = (0, 0, 0), parts: list | None = None):
        self.shape = tuple(int(s) for s in shape)
        self.offset = tuple(int(o) for o in offset)
        self.parts: list[tuple[str, tuple[slice, slice, slice], np.ndarray]] = [] if parts is None else parts

    def view(self, sl: tuple[slice, slice, slice]) -> Truth:
        off = tuple(o + (s.start or 0) for o, s in zip(self.offset, sl, strict=True))
        return Truth(self.shape, off, self.parts)

    def add(self, cls: str, sl, cov: np.ndarray, within: np.ndarray | None = None) -> None:
        """Record one lesion part: the voxels of ``sl`` (this view's frame) whose coverage ``cov`` is at
        least 0.5 (at least the most covered voxel, so that a sub-voxel plaque keeps one voxel), and
        inside ``within`` (a bool array over ``sl``, e.g. the lung) when given."""
        if cov.dtype == bool:
            region = cov.copy()
        else:
            region = cov >= 0.5
            if not region.any() and cov.size and float(cov.max()) > 0.0:
                region = cov >= float(cov.max())
        if within is not None:
            region = region & within
        absolute = tuple(
            slice(o + (s.start or 0), o + (s.start or 0) + n) for o, s, n in zip(self.offset, sl, region.shape,
                                                                                  strict=True)
        )
        self.parts.append((cls, absolute, np.ascontiguousarray(region, dtype=bool)))

    def expand_z(self, zmap: np.ndarray) -> Truth:
        """The recorder of a volume whose slice ``j`` is this volume's slice ``zmap[j]`` (slices repeated)."""
        zmap = np.asarray(zmap)
        parts = []
        for cls, (sx, sy, sz), region in self.parts:
            inside = (zmap >= sz.start) & (zmap < sz.stop)
            js = np.nonzero(inside)[0]
            if js.size:
                j0, j1 = int(js[0]), int(js[-1]) + 1
                src = np.clip(zmap[j0:j1] - sz.start, 0, region.shape[2] - 1)
                parts.append((cls, (sx, sy, slice(j0, j1)), region[:, :, src] & inside[j0:j1]))
        return Truth((*self.shape[:2], len(zmap)), (0, 0, 0), parts)

    def mask(self) -> np.ndarray:
        """uint32 ``(X, Y, Z)``: bit k set where ``CLASSES[k]`` is drawn."""
        out = np.zeros(self.shape, np.uint32)
        for cls, sl, region in self.parts:
            view = out[sl]
            view[region] |= np.uint32(1 << CLS[cls])
        return out

    def rows(self, name: str) -> list[list]:
        """Rows of ``lesions.csv`` for volume ``name``: one per non-empty part, numbered per class."""
        out, count = [], dict.fromkeys(CLASSES, 0)
        for cls, sl, region in self.parts:
            idx = np.nonzero(region)
            if not idx[0].size:
                continue
            centre = [int(round(float(i.mean()))) + s.start for i, s in zip(idx, sl, strict=True)]
            box = [v for i, s in zip(idx, sl, strict=True)
                   for v in (int(i.min()) + s.start, int(i.max()) + 1 + s.start)]
            out.append([name, cls, count[cls], *centre, *box])
            count[cls] += 1
        return out


# ---------------------------------------------------------------------------------------------
# writing (by the snapshot writer) and reading
# ---------------------------------------------------------------------------------------------
def _truth_root(root: str | Path) -> Path:
    """The folder that holds ``truth/``: ``root`` itself, or its parent when ``root`` is ``dataset/``."""
    root = Path(root)
    if not (root / TRUTH_DIR).is_dir() and root.name == "dataset" and (root.parent / TRUTH_DIR).is_dir():
        return root.parent
    return root


def _mask_path(root: str | Path, volume_name: str) -> Path:
    name = Path(str(volume_name)).name
    if not name.endswith(".nii.gz"):
        name += ".nii.gz"
    return _truth_root(root) / MASKS_DIR / f"{name}.npz"


def save_mask(root: str | Path, volume_name: str, mask: np.ndarray) -> None:
    """Atomically write ``truth/masks/<VolumeName>.npz`` (compressed, key ``mask``)."""
    path = _mask_path(root, volume_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part.npz")
    np.savez_compressed(tmp, mask=mask.astype(np.uint32, copy=False))
    os.replace(tmp, path)


def write_lesions_csv(root: str | Path, rows: Sequence[Sequence]) -> Path:
    """Atomically write ``truth/lesions.csv`` from rows in :data:`LESION_COLUMNS` order."""
    path = Path(root) / LESIONS_CSV
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    pd.DataFrame(list(rows), columns=list(LESION_COLUMNS)).to_csv(tmp, index=False, lineterminator="\n")
    os.replace(tmp, path)
    return path


def lesion_table(root: str | Path) -> pd.DataFrame:
    """The lesion table of a synthetic snapshot: one row per lesion, columns :data:`LESION_COLUMNS`.

    Args:
        root: the folder that holds ``dataset/`` and ``truth/`` (``dataset/`` itself is accepted).

    Raises:
        FileNotFoundError: no ``truth/lesions.csv`` (not a synthetic snapshot, or written before it had one).
    """
    path = _truth_root(root) / LESIONS_CSV
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: lesion truth exists only for snapshots written by "
                                "ctlib.synthetic.generate")
    df = pd.read_csv(path)
    if tuple(df.columns) != LESION_COLUMNS:
        raise ValueError(f"{path}: header {list(df.columns)} is not {list(LESION_COLUMNS)}")
    return df


def lesion_masks(root: str | Path, volume_name: str) -> np.ndarray:
    """Bool ``(18, X, Y, Z)`` masks of volume ``volume_name`` (with or without ``.nii.gz``), in the stored
    NIfTI array's frame; ``[k]`` is where ``CLASSES[k]``'s signature is drawn.

    Raises:
        FileNotFoundError: the volume has no mask file (not written, or not a synthetic snapshot).
    """
    path = _mask_path(root, volume_name)
    if not path.is_file():
        raise FileNotFoundError(f"no lesion mask {path} for volume {volume_name!r}")
    with np.load(path) as z:
        packed = z["mask"]
    if packed.dtype != np.uint32 or packed.ndim != 3:
        raise ValueError(f"{path}: mask must be uint32 (X, Y, Z), got {packed.dtype} {packed.shape}")
    bits = np.uint32(1) << np.arange(len(CLASSES), dtype=np.uint32)
    return (packed[None] & bits[:, None, None, None]) != 0


def lesion_masks_for_model(
    root: str | Path, volume_name: str, prep: Preprocessing, spacing: Sequence[float] | None = None
) -> np.ndarray:
    """Bool ``(18, S, H, W)`` masks in the model-input frame of ``prep`` (a :class:`ctlib.preprocess.Preprocessing`).

    Each class mask goes through the same spatial code as the volume (:func:`ctlib.preprocess.to_model_frame`:
    trilinear resampling from ``spacing`` to ``prep.target_spacing``, centre crop/pad, centre slices,
    (X, Y, Z) -> (Z, Y, X)) as a 0/1 float volume, and is kept where it is at least 0.5.

    Args:
        spacing: (sx, sy, sz) mm of the stored volume; required when ``prep.target_spacing`` is set.
    """
    masks = lesion_masks(root, volume_name)
    out = np.zeros((len(CLASSES), *prep.shape), bool)
    for k in range(len(CLASSES)):
        if masks[k].any():
            framed = to_model_frame(masks[k].astype(np.float32), spacing=spacing,
                                    target_spacing=prep.target_spacing, size=prep.size,
                                    num_slices=prep.num_slices, fill=0.0)
            out[k] = framed >= 0.5
    return out
