"""CT-RATE as it lies on disk: the 18 classes, volume names and layout, the labels and metadata CSVs, the
cohort of usable volumes (:func:`load_cohort`) and one volume in Hounsfield units (:func:`read_hu`).

See ``../shared/ctrate-format.md`` for the layout this module honours. What happens to a volume next is
:mod:`ctlib.preprocess`; how the cohort is split by patient is :mod:`ctlib.split`.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

# The 18 abnormality classes: CT-RATE's spelling and order (labels CSV header).
CLASSES: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)

LABEL_COLUMNS: tuple[str, ...] = ("VolumeName", *CLASSES)

METADATA_COLUMNS: tuple[str, ...] = tuple(
    "VolumeName,Manufacturer,SeriesDescription,ManufacturerModelName,PatientSex,PatientAge,"
    "ReconstructionDiameter,DistanceSourceToDetector,DistanceSourceToPatient,GantryDetectorTilt,"
    "TableHeight,RotationDirection,ExposureTime,XRayTubeCurrent,Exposure,FilterType,GeneratorPower,"
    "FocalSpots,ConvolutionKernel,PatientPosition,RevolutionTime,SingleCollimationWidth,"
    "TotalCollimationWidth,TableSpeed,TableFeedPerRotation,SpiralPitchFactor,"
    "DataCollectionCenterPatient,ReconstructionTargetCenterPatient,ExposureModulationType,CTDIvol,"
    "ImagePositionPatient,ImageOrientationPatient,SliceLocation,SamplesPerPixel,"
    "PhotometricInterpretation,Rows,Columns,XYSpacing,RescaleIntercept,RescaleSlope,RescaleType,"
    "NumberofSlices,ZSpacing,StudyDate".split(",")
)

REPORT_COLUMNS: tuple[str, ...] = (
    "VolumeName",
    "ClinicalInformation_EN",
    "Technique_EN",
    "Findings_EN",
    "Impressions_EN",
)

# Paths relative to the ``dataset/`` folder of a snapshot, per source split.
LABELS_CSV = {
    "train": "multi_abnormality_labels/train_predicted_labels.csv",
    "valid": "multi_abnormality_labels/valid_predicted_labels.csv",
}
METADATA_CSV = {"train": "metadata/train_metadata.csv", "valid": "metadata/validation_metadata.csv"}
NO_CHEST_TXT = {"train": "metadata/no_chest_train.txt", "valid": "metadata/no_chest_valid.txt"}
REPORTS_CSV = {
    "train": "radiology_text_reports/train_reports.csv",
    "valid": "radiology_text_reports/validation_reports.csv",
}

_NAME = re.compile(r"^(train|valid)_(\d+)_([A-Za-z]+)_(\d+)(?:\.nii\.gz|\.nii)?$")


class DataError(ValueError):
    """A CT-RATE file or value that cannot be used; the message names the file."""


def parse_volume_name(name: str) -> dict[str, str]:
    """Split ``train_1_a_2.nii.gz`` into split, patient, scan and reconstruction.

    >>> parse_volume_name("train_1_a_2.nii.gz")
    {'source_split': 'train', 'patient': 'train_1', 'scan': 'train_1_a', 'reconstruction': '2', 'stem': 'train_1_a_2'}
    """
    m = _NAME.match(name)
    if m is None:
        raise DataError(f"{name!r} is not a CT-RATE volume name (split_patient_scan_reconstruction.nii.gz)")
    split, pid, scan, recon = m.groups()
    return {
        "source_split": split,
        "patient": f"{split}_{pid}",
        "scan": f"{split}_{pid}_{scan}",
        "reconstruction": recon,
        "stem": f"{split}_{pid}_{scan}_{recon}",
    }


def volume_relpath(name: str, *, fixed: bool = False) -> str:
    """Path of a volume inside ``dataset/``: ``train/train_1/train_1_a/train_1_a_2.nii.gz``."""
    p = parse_volume_name(name)
    top = p["source_split"] + ("_fixed" if fixed else "")
    return f"{top}/{p['patient']}/{p['scan']}/{p['stem']}.nii.gz"


# ---------------------------------------------------------------------------------------------------------
# The cohort: which volumes are on disk, labelled, and convertible to HU.
# ---------------------------------------------------------------------------------------------------------

logger = logging.getLogger(__name__)

SOURCE_SPLITS: tuple[str, ...] = ("train", "valid")

# Metadata columns the loader needs (the rest of METADATA_COLUMNS is carried by the CSV but unused here).
_METADATA_NEEDED: tuple[str, ...] = ("VolumeName", "XYSpacing", "RescaleIntercept", "RescaleSlope", "ZSpacing")
_SNAPSHOT_MARKERS: tuple[str, ...] = (
    "multi_abnormality_labels",
    "metadata",
    "train",
    "valid",
    "train_fixed",
    "valid_fixed",
)

# Plausible HU for a chest CT after conversion (see read_hu).
HU_PLAUSIBLE: tuple[float, float] = (-1100.0, 3000.0)

StrPath = str | PathLike[str]


def dataset_root(root: StrPath) -> Path:
    """The ``dataset/`` folder of a snapshot, given the snapshot folder or ``dataset/`` itself.

    Raises:
        DataError: neither ``root/dataset`` nor ``root`` looks like CT-RATE's ``dataset/`` folder.
    """
    root = Path(root).expanduser()
    for candidate in (root / "dataset", root):
        if candidate.is_dir() and any((candidate / m).is_dir() for m in _SNAPSHOT_MARKERS):
            return candidate.resolve()
    raise DataError(
        f"{root}: not a CT-RATE snapshot: expected {root / 'dataset'} (or {root} itself) to hold "
        "multi_abnormality_labels/, metadata/ and train[_fixed]/ or valid[_fixed]/"
    )


def _read_header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), None)
    if header is None:
        raise DataError(f"{path}: empty file, expected a CSV header")
    return header


def _header_difference(got: Sequence[str], expected: Sequence[str]) -> str:
    missing = [c for c in expected if c not in got]
    unexpected = [c for c in got if c not in expected]
    parts = []
    if missing:
        parts.append(f"missing {missing}")
    if unexpected:
        parts.append(f"unexpected {unexpected}")
    duplicated = sorted({c for c in got if list(got).count(c) > 1})
    if duplicated:
        parts.append(f"duplicated {duplicated}")
    if not parts:
        i = next(i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e)
        parts.append(f"same columns in another order: column {i} is {got[i]!r}, expected {expected[i]!r}")
    return "; ".join(parts)


def _canonical_names(names: pd.Series, path: Path, split: str) -> list[str]:
    """``VolumeName`` values as ``<stem>.nii.gz``, checked against the name rule and the file's split."""
    out = []
    for name in names.tolist():
        if not isinstance(name, str):
            raise DataError(f"{path}: empty VolumeName in a row")
        try:
            info = parse_volume_name(name.strip())
        except DataError as err:
            raise DataError(f"{path}: {err}") from None
        if info["source_split"] != split:
            raise DataError(f"{path}: {name!r} is a {info['source_split']} volume in the {split} file")
        out.append(info["stem"] + ".nii.gz")
    duplicated = sorted({n for n, k in Counter(out).items() if k > 1})
    if duplicated:
        raise DataError(f"{path}: {len(duplicated)} VolumeName(s) listed more than once, e.g. {duplicated[:3]}")
    return out


def _read_labels(path: Path, split: str) -> pd.DataFrame:
    """Labels CSV -> DataFrame with VolumeName (canonical) and the 18 classes as int64 0/1."""
    if not path.is_file():
        raise DataError(f"missing labels CSV for the {split} split: expected {path}")
    header = _read_header(path)
    if tuple(header) != LABEL_COLUMNS:
        raise DataError(
            f"{path}: header is not CT-RATE's labels header: {_header_difference(header, LABEL_COLUMNS)}"
        )
    df = pd.read_csv(path, dtype={"VolumeName": "str"}, encoding="utf-8-sig")
    out = {"VolumeName": _canonical_names(df["VolumeName"], path, split)}
    for c in CLASSES:
        values = pd.to_numeric(df[c], errors="coerce")
        bad = ~values.isin([0, 1])
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(
                f"{path}: column {c!r} must hold 0 or 1; {int(bad.sum())} value(s) do not, "
                f"e.g. {df[c].iloc[i]!r} for {df['VolumeName'].iloc[i]}"
            )
        out[c] = values.to_numpy(dtype=np.int64)
    return pd.DataFrame(out)


def _parse_xy_spacing(value: Any, path: Path, name: str) -> float:
    """``"[0.341796875, 0.341796875]"`` -> 0.341796875; empty -> NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.nan
    text = str(value).strip().strip("[]()").strip()
    if not text:
        return math.nan
    try:
        return float(re.split(r"[,\s]+", text)[0])
    except ValueError:
        raise DataError(f"{path}: XYSpacing {value!r} of {name} is not a list of numbers") from None


def _read_metadata(path: Path, split: str) -> pd.DataFrame:
    """Metadata CSV -> DataFrame indexed by VolumeName with float RescaleSlope, RescaleIntercept,
    XYSpacing, ZSpacing (NaN where empty)."""
    if not path.is_file():
        raise DataError(f"missing metadata CSV for the {split} split: expected {path}")
    header = _read_header(path)
    missing = [c for c in _METADATA_NEEDED if c not in header]
    if missing:
        raise DataError(f"{path}: metadata header lacks column(s) {missing}")
    if tuple(header) != METADATA_COLUMNS:
        logger.warning("%s: header differs from CT-RATE's metadata header (%s); using the columns needed",
                       path, _header_difference(header, METADATA_COLUMNS))
    df = pd.read_csv(path, usecols=list(_METADATA_NEEDED), dtype="str", keep_default_na=False,
                     encoding="utf-8-sig").drop_duplicates()
    names = _canonical_names(df["VolumeName"], path, split)
    out: dict[str, Any] = {}
    for c in ("RescaleSlope", "RescaleIntercept", "ZSpacing"):
        raw = df[c].str.strip()
        values = pd.to_numeric(raw.replace("", None), errors="coerce")
        bad = values.isna() & raw.ne("")
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"{path}: column {c!r} holds {raw.iloc[i]!r} for {names[i]}, expected a number")
        out[c] = values.to_numpy(dtype=np.float64)
    out["XYSpacing"] = np.array(
        [_parse_xy_spacing(v, path, n) for v, n in zip(df["XYSpacing"].tolist(), names, strict=True)],
        dtype=np.float64,
    )
    return pd.DataFrame(out, index=pd.Index(names, name="VolumeName"))


def read_no_chest(path: StrPath) -> set[str]:
    """VolumeNames (``<stem>.nii.gz``) listed in a ``no_chest_*.txt``; empty when the file is absent."""
    path = Path(path)
    if not path.is_file():
        logger.debug("%s: absent, no volume excluded as non-chest", path)
        return set()
    names, unreadable = set(), 0
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        token = line.strip().strip("\"'")
        if not token or token.startswith("#"):
            continue
        try:
            names.add(parse_volume_name(token.replace("\\", "/").rsplit("/", 1)[-1])["stem"] + ".nii.gz")
        except DataError:
            unreadable += 1
    if unreadable:
        logger.warning("%s: %d line(s) are not CT-RATE volume names and were ignored", path, unreadable)
    return names


def _scan_volumes(ds: Path, split: str, counts: Counter) -> dict[str, tuple[Path, bool]]:
    """Volumes on disk for a split: name -> (path, hu_ready); ``*_fixed`` wins over the original."""
    found: dict[str, tuple[Path, bool]] = {}
    for fixed in (False, True):
        top = ds / (split + ("_fixed" if fixed else ""))
        if not top.is_dir():
            continue
        for path in sorted(top.rglob("*.nii.gz")):
            try:
                info = parse_volume_name(path.name)
            except DataError:
                counts["badly named files"] += 1
                continue
            if info["source_split"] != split:
                counts["files in another split's folder"] += 1
                continue
            found[info["stem"] + ".nii.gz"] = (path, fixed)
    return found


def _split_present(ds: Path, split: str) -> bool:
    return any(
        [
            (ds / split).is_dir(),
            (ds / f"{split}_fixed").is_dir(),
            (ds / LABELS_CSV[split]).is_file(),
            (ds / METADATA_CSV[split]).is_file(),
        ]
    )


_COHORT_STR = ("VolumeName", "path", "patient", "scan", "source_split")


def _load_split(ds: Path, split: str, counts: Counter) -> pd.DataFrame:
    labels = _read_labels(ds / LABELS_CSV[split], split)
    meta = _read_metadata(ds / METADATA_CSV[split], split)
    no_chest = read_no_chest(ds / NO_CHEST_TXT[split])
    on_disk = _scan_volumes(ds, split, counts)

    labelled = set(labels["VolumeName"])
    counts["labelled but not on disk"] += len(labelled - on_disk.keys())
    counts["on disk without a label row"] += len(on_disk.keys() - labelled)
    counts["not chest CT (no_chest list)"] += len(on_disk.keys() & labelled & no_chest)
    keep = sorted((on_disk.keys() & labelled) - no_chest)

    meta = meta.reindex(keep)
    hu_ready = np.array([on_disk[n][1] for n in keep], dtype=bool)
    no_meta = meta["RescaleSlope"].isna().to_numpy() | meta["RescaleIntercept"].isna().to_numpy()
    # An original without slope/intercept cannot be converted to HU: skip it. A fixed volume is already
    # in HU and only loses its CSV spacing (its NIfTI header carries one).
    counts["originals without RescaleSlope/RescaleIntercept (skipped)"] += int((no_meta & ~hu_ready).sum())
    counts["fixed volumes without metadata row (kept)"] += int((no_meta & hu_ready).sum())
    use = ~(no_meta & ~hu_ready)
    keep = [n for n, u in zip(keep, use, strict=True) if u]
    meta, hu_ready = meta.loc[keep], hu_ready[use]

    parsed = [parse_volume_name(n) for n in keep]
    cols: dict[str, Any] = {
        "VolumeName": keep,
        "path": [str(on_disk[n][0]) for n in keep],
        "patient": [p["patient"] for p in parsed],
        "scan": [p["scan"] for p in parsed],
        "reconstruction": np.array([int(p["reconstruction"]) for p in parsed], dtype=np.int64),
        "source_split": [split] * len(keep),
        "hu_ready": hu_ready,
    }
    for c in ("RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing"):
        cols[c] = meta[c].to_numpy(dtype=np.float64)
    lab = labels.set_index("VolumeName").loc[keep]
    for c in CLASSES:
        cols[c] = lab[c].to_numpy(dtype=np.int64)
    return pd.DataFrame(cols).astype({c: "str" for c in _COHORT_STR})


def load_cohort(root: StrPath) -> pd.DataFrame:
    """The labelled chest-CT volumes of a CT-RATE snapshot that are on disk, one row per volume.

    Args:
        root: the snapshot folder holding ``dataset/``, or the ``dataset/`` folder itself. Both source
            splits (train, valid) are read when present.

    Returns:
        DataFrame sorted by VolumeName, index 0..n-1, columns ``VolumeName`` (``train_1_a_1.nii.gz``),
        ``path`` (absolute), ``patient``, ``scan``, ``reconstruction`` (int), ``source_split``,
        ``hu_ready`` (True for ``*_fixed`` volumes, preferred over the original), ``RescaleSlope``,
        ``RescaleIntercept``, ``XYSpacing``, ``ZSpacing`` (float, NaN where unknown) and the 18
        ``CLASSES`` (int 0/1). Labelled volumes absent from disk (a downloaded subset), files without a
        label row, non-chest volumes and originals without slope/intercept are left out and counted in one
        INFO log line.

    Raises:
        DataError: not a snapshot, a labels/metadata CSV missing (names the expected path), a labels header
            not exactly ``LABEL_COLUMNS``, a label other than 0/1, or a malformed metadata value.
    """
    ds = dataset_root(root)
    present = [s for s in SOURCE_SPLITS if _split_present(ds, s)]
    if not present:
        raise DataError(f"{ds}: no CT-RATE split found: expected {ds / LABELS_CSV['train']} "
                        f"and/or {ds / LABELS_CSV['valid']}")
    counts: Counter = Counter()
    frames = [_load_split(ds, s, counts) for s in present]
    cohort = pd.concat(frames, ignore_index=True).sort_values("VolumeName", ignore_index=True)
    left_out = ", ".join(f"{n} {what}" for what, n in counts.items() if n) or "none left out"
    logger.info("%s: %d volumes of %d patients (%s); %s", ds, len(cohort), cohort["patient"].nunique(),
                "+".join(present), left_out)
    return cohort


# ---------------------------------------------------------------------------------------------------------
# HU conversion
# ---------------------------------------------------------------------------------------------------------


def _check_plausible(hu: np.ndarray, path: Path) -> None:
    """Reject non-finite values and intensities no chest CT has (a wrong or double rescale)."""
    n = hu.size
    if n == 0:
        raise DataError(f"{path}: empty volume (shape {hu.shape})")
    # One float64 sum is NaN/inf iff any voxel is; counting only on failure keeps the fast path fast.
    if not np.isfinite(hu.sum(dtype=np.float64)):
        bad = int(n - np.count_nonzero(np.isfinite(hu)))
        raise DataError(f"{path}: {bad} non-finite voxel(s) (NaN or inf); the file is corrupt")
    lo, hi = HU_PLAUSIBLE
    below = np.count_nonzero(hu < lo) / n
    above = np.count_nonzero(hu > hi) / n
    # Exact median for small volumes; a regular 1/16 in-plane subsample for full-size ones (it is a
    # cross-check of the exact fractions above, not a statistic we report).
    sample = hu if n <= 1 << 22 else hu[::4, ::4]
    median = float(np.median(sample))
    if below > 0.5 or median < lo:
        raise DataError(
            f"{path}: implausible for a chest CT after HU conversion: {below:.0%} of voxels below {lo:g} HU "
            f"(median {median:.0f} HU). This is the double-rescale symptom: a volume already in HU (a "
            "'*_fixed' file) had RescaleSlope/RescaleIntercept applied again, shifting it about -1024 HU. "
            "Check that hu_ready matches the folder (train_fixed/ vs train/) and that the file was not "
            "rewritten with the intercept already applied."
        )
    if above > 0.5 or median > hi:
        raise DataError(
            f"{path}: implausible for a chest CT after HU conversion: {above:.0%} of voxels above {hi:g} HU "
            f"(median {median:.0f} HU). The stored values were probably not rescaled (missing or wrong "
            "RescaleSlope/RescaleIntercept)."
        )


def read_hu(row: Mapping[str, Any]) -> np.ndarray:
    """Read one volume in Hounsfield units.

    Originals hold raw scanner values behind a blank header: HU = RescaleSlope * stored + RescaleIntercept
    (from the metadata CSV), applied once to the raw stored array. ``*_fixed`` volumes (``hu_ready``) are
    already in HU: only their NIfTI header scaling (if any) is applied, never the CSV's.

    Args:
        row: a cohort row (or mapping) with ``path``, ``hu_ready``, ``RescaleSlope``, ``RescaleIntercept``.

    Returns:
        float32 array (X, Y, Z) in HU.

    Raises:
        DataError (message names the file): missing file, truncated or corrupt gzip/NIfTI, not 3D,
            non-finite values, or intensities implausible for a chest CT (more than half the voxels below
            -1100 HU or above 3000 HU, or the median outside that range: the double-rescale symptom).
            Air at -3024/-2048 HU outside the field of view and metal above 3000 HU are accepted.
    """
    path = Path(str(row["path"]))
    hu_ready = bool(row["hu_ready"])
    if not path.is_file():
        raise DataError(f"{path}: volume file not found")
    if not hu_ready:
        slope, intercept = float(row["RescaleSlope"]), float(row["RescaleIntercept"])
        if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0:
            raise DataError(f"{path}: original volume needs RescaleSlope/RescaleIntercept from the metadata "
                            f"CSV, got slope={slope} intercept={intercept}")
    try:
        img = nib.load(path)
        shape = tuple(int(s) for s in img.shape)
    except Exception as err:
        raise DataError(f"{path}: not a readable NIfTI file ({type(err).__name__}: {err})") from err
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    elif len(shape) != 3:
        raise DataError(f"{path}: array of shape {shape}, expected a 3D volume (X, Y, Z)")
    try:
        if hu_ready:
            # Header scaling (scl_slope/scl_inter) applied by nibabel when present; the CSV's never.
            hu = np.asarray(img.dataobj, dtype=np.float32)
        else:
            # Raw stored values: original headers are blank, so never trust (or apply) them.
            proxy = img.dataobj
            raw = proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else np.asarray(proxy)
            hu = raw.astype(np.float32)
            del raw
            hu *= np.float32(slope)
            hu += np.float32(intercept)
    except Exception as err:
        raise DataError(f"{path}: cannot decode the volume data; the file is truncated or corrupt "
                        f"({type(err).__name__}: {err})") from err
    hu = hu.reshape(shape)
    _check_plausible(hu, path)
    return hu
