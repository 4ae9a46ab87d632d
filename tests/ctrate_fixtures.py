"""Tiny CT-RATE-format snapshots written into a test's tmp_path (no dependency on ctlib.synthetic).

The files honour ``shared/ctrate-format.md``: the folder tree, the exact CSV headers, blank NIfTI headers
with raw stored values for originals (HU = slope * stored + intercept from the metadata CSV) and HU with a
filled header for ``*_fixed`` volumes.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

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

SMALL = (24, 20, 12)


def phantom_hu(
    shape: Sequence[int] = SMALL,
    *,
    seed: int = 0,
    corners: float = -3024.0,
    metal: float | None = 3500.0,
) -> np.ndarray:
    """A chest-like HU volume (X, Y, Z) float32.

    Air (-1000) around an elliptic body (soft tissue ~40 HU with noise), two lungs (~-850 HU), a spine
    (~700 HU), ``corners`` outside the circular field of view (about 21 % of each slice) and, when
    ``metal`` is given, a small metal implant at that value.
    """
    rng = np.random.default_rng(seed)
    nx, ny, nz = (int(s) for s in shape)
    x = (np.arange(nx) + 0.5) / nx * 2 - 1
    y = (np.arange(ny) + 0.5) / ny * 2 - 1
    xx, yy = np.meshgrid(x, y, indexing="ij")
    hu = np.full((nx, ny), -1000.0)
    hu[(xx / 0.85) ** 2 + (yy / 0.65) ** 2 <= 1] = 40.0
    for cx in (-0.4, 0.4):
        hu[((xx - cx) / 0.3) ** 2 + (yy / 0.45) ** 2 <= 1] = -850.0
    hu[(xx / 0.12) ** 2 + ((yy - 0.45) / 0.12) ** 2 <= 1] = 700.0
    hu[xx**2 + yy**2 > 1] = corners
    vol = np.repeat(hu[:, :, None], nz, axis=2) + rng.normal(0, 15, (nx, ny, nz))
    vol[xx**2 + yy**2 > 1, :] = corners
    if metal is not None:
        cx, cy = nx // 2, int(ny * 0.3)
        vol[cx : cx + 2, cy : cy + 2, nz // 2 : nz // 2 + 2] = metal
    return np.round(vol).astype(np.float32)


def write_original(path: Path, hu: np.ndarray, *, slope: float = 1.0, intercept: float = -1024.0) -> np.ndarray:
    """Write an original volume: raw int16 ``(hu - intercept) / slope`` behind a blank header.

    Returns the stored array.
    """
    stored = np.round((np.asarray(hu, dtype=np.float64) - intercept) / slope)
    if stored.min() < -32768 or stored.max() > 32767:
        raise ValueError(f"HU do not fit int16 with slope={slope}, intercept={intercept}")
    stored = stored.astype(np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(stored, None), path)  # blank: unit pixdim, no scaling, no orientation
    return stored


def write_fixed(
    path: Path,
    hu: np.ndarray,
    *,
    spacing: Sequence[float] = (0.7, 0.7, 1.5),
    header_scaling: bool = False,
) -> None:
    """Write a ``*_fixed`` volume: HU as int16 with a filled header.

    ``header_scaling=True`` stores ``hu + 1024`` with ``scl_inter=-1024`` (the header, not the CSV, says how
    to get HU).
    """
    hu = np.round(np.asarray(hu, dtype=np.float64))
    affine = np.diag([*spacing, 1.0])
    if header_scaling:
        img = nib.Nifti1Image((hu + 1024).astype(np.int16), affine)
        img.header.set_slope_inter(1.0, -1024.0)
    else:
        img = nib.Nifti1Image(hu.astype(np.int16), affine)
    img.header.set_zooms(tuple(spacing))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


@dataclass
class Vol:
    """One volume of a fixture snapshot.

    ``labels=None``: no row in the labels CSV. ``original``/``fixed``: which files are on disk (neither:
    labelled but not downloaded). ``metadata=False``: no metadata row.
    """

    name: str
    labels: Sequence[int] | None = None
    original: bool = True
    fixed: bool = False
    slope: float = 1.0
    intercept: float = -1024.0
    metadata: bool = True
    no_chest: bool = False
    hu: np.ndarray | None = None
    spacing: tuple[float, float, float] = (0.7, 0.7, 1.5)
    header_scaling: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.name.endswith(".nii.gz"):
            self.name += ".nii.gz"
        if self.labels is not None and len(self.labels) != len(CLASSES):
            raise ValueError(f"{self.name}: {len(self.labels)} labels, expected {len(CLASSES)}")

    @property
    def split(self) -> str:
        return parse_volume_name(self.name)["source_split"]

    def volume_hu(self) -> np.ndarray:
        return phantom_hu(seed=self.seed) if self.hu is None else self.hu


def label_vector(*positive: str) -> list[int]:
    """18 ints, 1 for the named classes."""
    unknown = set(positive) - set(CLASSES)
    if unknown:
        raise ValueError(f"unknown classes {unknown}")
    return [int(c in positive) for c in CLASSES]


def metadata_row(v: Vol) -> dict[str, str]:
    """A metadata row in CT-RATE's shape (most fields filled, some empty as in the real CSV)."""
    row = dict.fromkeys(METADATA_COLUMNS, "")
    sx, _, sz = v.spacing
    row.update(
        VolumeName=v.name,
        Manufacturer="SIEMENS",
        SeriesDescription="AXIAL",
        PatientSex="M",
        PatientAge="057Y",
        ReconstructionDiameter="350",
        ConvolutionKernel="B30f",
        PhotometricInterpretation="MONOCHROME2",
        SamplesPerPixel="1",
        Rows="512",
        Columns="512",
        XYSpacing=f"[{sx}, {sx}]",
        RescaleIntercept=f"{v.intercept:g}",
        RescaleSlope=f"{v.slope:g}",
        RescaleType="",
        NumberofSlices="251",
        ZSpacing=f"{sz}",
        StudyDate="20210427",
    )
    return row


def write_csv(path: Path, header: Sequence[str], rows: Iterable[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(header))
        w.writeheader()
        w.writerows(rows)


def write_snapshot(root: Path, vols: Sequence[Vol], *, splits: Sequence[str] | None = None) -> Path:
    """Write ``root/dataset/...`` holding ``vols`` and the CSVs of ``splits`` (default: those of vols).

    Returns ``root``.
    """
    ds = root / "dataset"
    splits = sorted({v.split for v in vols}) if splits is None else list(splits)
    for split in splits:
        in_split = [v for v in vols if v.split == split]
        write_csv(
            ds / LABELS_CSV[split],
            LABEL_COLUMNS,
            [{"VolumeName": v.name, **dict(zip(CLASSES, v.labels, strict=True))} for v in in_split if v.labels],
        )
        write_csv(ds / METADATA_CSV[split], METADATA_COLUMNS, [metadata_row(v) for v in in_split if v.metadata])
        (ds / NO_CHEST_TXT[split]).write_text("".join(f"{v.name}\n" for v in in_split if v.no_chest))
        write_csv(
            ds / REPORTS_CSV[split],
            REPORT_COLUMNS,
            [
                {"VolumeName": v.name, "ClinicalInformation_EN": "Cough.", "Technique_EN": "Non-contrast.",
                 "Findings_EN": "Normal.", "Impressions_EN": "No acute finding."}
                for v in in_split
            ],
        )
    for v in vols:
        hu = v.volume_hu()
        if v.original:
            write_original(ds / volume_relpath(v.name), hu, slope=v.slope, intercept=v.intercept)
        if v.fixed:
            write_fixed(ds / volume_relpath(v.name, fixed=True), hu, spacing=v.spacing,
                        header_scaling=v.header_scaling)
    return root


def cohort_frame(n_patients: int, *, seed: int = 0, prevalence: float = 0.25) -> pd.DataFrame:
    """A cohort-like DataFrame without files (for split tests): 1 to 2 scans x 1 to 2 reconstructions per
    patient, labels per scan (shared by its reconstructions) drawn with the given prevalence."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(1, n_patients + 1):
        for scan in "ab"[: rng.integers(1, 3)]:
            labels = (rng.random(len(CLASSES)) < prevalence).astype(np.int64)
            for recon in range(1, int(rng.integers(1, 3)) + 1):
                rows.append({"VolumeName": f"train_{p}_{scan}_{recon}.nii.gz", "patient": f"train_{p}",
                             **dict(zip(CLASSES, labels.tolist(), strict=True))})
    return pd.DataFrame(rows)
