"""The snapshot plan: labels from a multivariate probit model calibrated to the paper's Table 1, patients,
scans, reconstructions and their metadata (cheap, sequential; see DATA.md, "Prevalence")."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import special

from ctlib.data import CLASSES
from ctlib.synthetic.anatomy import child_rng
from ctlib.synthetic.scanner import KERNELS

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
    # The 3D classes share no factor with the others: their labels are independent of every 2D finding,
    # so that a model cannot score them through co-occurrence (the 3D-context experiment stays clean).
    "Lymphadenopathy": {},
    "Emphysema": {"copd": 0.7, "age": 0.3},
    "Atelectasis": {"cardiac": 0.45, "infection": 0.35, "age": 0.2},
    "Lung nodule": {},  # independent, as Lymphadenopathy
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


def draw_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    """``(n, 18)`` labels of ``n`` independent patients (no volumes): for calibration checks."""
    return _labels_from_latent(_draw_latent(rng, n)[0])

# ---------------------------------------------------------------------------------------------
# the snapshot plan: patients, scans, reconstructions, labels, metadata (cheap, sequential)
# ---------------------------------------------------------------------------------------------
@dataclass
class Volume:
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
    held_out: bool = False  # a held-out test patient (``_test_volumes``)


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


def plan(n_patients: int, seed: int, n_test: int = 0) -> list[Volume]:
    """All volumes of a snapshot in CSV order: ~85% train / 15% valid patients, ~15% with a repeat
    scan, ~10% of scans with a second reconstruction, 1-2 non-chest scans per split, ~2% label rows
    without a file, ~3% fixed re-uploads, ~3% with RescaleIntercept -8192; then ``n_test`` held-out test
    patients (:func:`_test_volumes`), drawn last so that they change nothing before them."""
    rng = child_rng(seed, 0)
    n_valid = max(1, int(round(0.15 * n_patients)))
    n_train = n_patients - n_valid
    out: list[Volume] = []
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
        vols: list[Volume] = []
        dates: dict[int, int] = {}
        for j, (i, si, lat) in enumerate(scans):
            pid = i + 1
            kind = kinds.get(j, "chest")
            labels = (
                tuple(int(v) for v in _labels_from_latent(lat)) if kind == "chest" else (0,) * len(CLASSES)
            )
            manu = str(rng.choice(list(KERNELS)))
            soft, sharp, models = KERNELS[manu]
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
                    Volume(
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
    out.extend(_test_volumes(rng, seed, n_test, first_id=n_valid + 1))
    return out


def _test_volumes(rng: np.random.Generator, seed: int, n: int, first_id: int) -> list[Volume]:
    """``n`` held-out test patients, one chest volume each (one scan, one reconstruction, written, HU
    intercept -1024), named as CT-RATE's ``valid_*`` patients from ``first_id`` on; their patients'
    random streams are keyed apart from the cohort's (split code 2). :func:`test_patients` lists them."""
    latent, ages = _draw_latent(rng, n)
    sexes = rng.choice(["M", "F"], size=n)
    vols = []
    for i in range(n):
        pid = first_id + i
        manu = str(rng.choice(list(KERNELS)))
        soft, sharp, models = KERNELS[manu]
        model = str(rng.choice(models))
        sh = bool(rng.random() < 0.3)
        date = np.datetime64("2018-01-01") + np.timedelta64(int(rng.integers(0, 1300)), "D")
        vols.append(Volume(
            name=f"valid_{pid}_a_1.nii.gz", split="valid", base=(seed, 2, pid), scan=0, recon=1,
            labels=tuple(int(v) for v in _labels_from_latent(latent[i])), age=int(ages[i]), sex=str(sexes[i]),
            sharp=sh, kernel=str(rng.choice(sharp if sh else soft)), manufacturer=manu, model=model,
            study_date=str(date).replace("-", ""), clinical=str(rng.choice(_CLINICAL)),
            tube_current=int(rng.integers(80, 320)), held_out=True))
    return vols
