"""CT-RATE as it lies on disk: labels, metadata, HU conversion, preprocessing, splits.

See ``../shared/ctrate-format.md`` for the layout this module honours.
"""

from __future__ import annotations

import re

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
