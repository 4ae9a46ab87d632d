"""The cohort's one patient split: made by :func:`split_patients`, kept in a file (:func:`fixed_split`),
counted per class for Table 1 (:func:`class_table`).

A snapshot is split **once** per split seed and fractions, over its full labelled cohort, and written as
``split-seed<S>-<fractions>.csv`` (VolumeName, patient, split; :func:`split_file`) with a ``.json`` beside it
holding the cohort's and the CSV's SHA-256. Every model and every resume reads that file; a cohort that
changed on disk stops with :class:`SplitMismatch` instead of silently re-splitting.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ctlib import atomic
from ctlib.data import CLASSES

__all__ = ["SPLITS", "FixedSplit", "SplitMismatch", "class_table", "cohort_sha", "fixed_split", "split_file",
           "split_patients"]

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Beside a snapshot's ``dataset/`` (outside CT-RATE's format): patients held out for the test split, one per
#: line (e.g. ``valid_41``); the synthetic generator writes it (``generate(..., test_patients=N)``).
TEST_PATIENTS_TXT = "test_patients.txt"


class SplitMismatch(RuntimeError):
    """The labelled cohort on disk is not the one the split file was made from (volumes added or removed)."""



def split_patients(
    cohort: pd.DataFrame, fractions: Sequence[float] = (0.7, 0.2, 0.1), seed: int = 0,
    test_patients: Collection[str] | None = None,
) -> pd.Series:
    """Train/val/test split by patient, stratified over the 18 labels (paper: 70:20:10).

    Every volume of a patient (scans and reconstructions) lands in one split. Patients are assigned with
    iterative multilabel stratification (Sechidis et al. 2011, ``iterstrat``) on their label vector, the OR
    over their volumes, after a seeded shuffle. With 3 or more patients every split is non-empty.

    With ``test_patients`` (a held-out test set, e.g. the synthetic snapshot's ``test_patients.txt``), those
    patients are the test split and the others are split into train and val in the ratio
    ``fractions[0] : fractions[1]`` (``fractions[2]`` is then unused).

    Args:
        cohort: DataFrame with ``patient`` and the ``CLASSES`` columns (n volumes).
        fractions: (train, val, test), positive, summing to 1.
        seed: the split is a deterministic function of cohort and seed.
        test_patients: patient ids (``valid_41``) held out for the test split; None or empty: none.

    Returns:
        Series of 'train'/'val'/'test' (n,), indexed like ``cohort``, named ``split``.
    """
    from iterstrat.ml_stratifiers import IterativeStratification

    try:
        r = np.array([float(f) for f in fractions], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"fractions must be 3 numbers (train, val, test), got {fractions!r}") from None
    if r.shape != (3,) or not np.all(np.isfinite(r)) or np.any(r <= 0) or abs(r.sum() - 1) > 1e-6:
        raise ValueError(f"fractions must be 3 positive numbers summing to 1, got {fractions!r}")
    missing = [c for c in ("patient", *CLASSES) if c not in cohort.columns]
    if missing:
        raise ValueError(f"cohort lacks column(s) {missing}")
    if len(cohort) == 0:
        raise ValueError("cannot split an empty cohort")

    held = set(test_patients or ())
    per_patient = cohort[~cohort["patient"].isin(held)].groupby("patient", sort=True)[list(CLASSES)].max()
    names = SPLITS if not held else SPLITS[:2]
    if held:
        r = r[:2] / r[:2].sum()
    patients = per_patient.index.to_numpy()
    split_of = {p: "test" for p in held}
    if len(patients):
        y = per_patient.to_numpy() > 0
        rng = np.random.RandomState(seed)
        order = rng.permutation(len(patients))
        folds = np.empty(len(patients), dtype=np.int64)
        folds[order] = IterativeStratification(labels=y[order], r=r, random_state=rng)

        if len(patients) >= len(names):
            # Tiny cohorts: the algorithm may leave a small split empty; move in the patient with the fewest
            # positives from the largest split (least harm to the stratification).
            for f in range(len(names)):
                if not np.any(folds == f):
                    donor = np.bincount(folds, minlength=len(names)).argmax()
                    candidates = order[folds[order] == donor]
                    folds[candidates[np.argmin(y[candidates].sum(axis=1))]] = f
        split_of.update(zip(patients.tolist(), (names[f] for f in folds), strict=True))
    return pd.Series([split_of[p] for p in cohort["patient"].tolist()], index=cohort.index, name="split",
                     dtype="str")


def class_table(cohort: pd.DataFrame, splits: pd.Series) -> pd.DataFrame:
    """Table 1 of the paper: positive volumes per class, in total and per split.

    Args:
        cohort: DataFrame with the ``CLASSES`` columns.
        splits: 'train'/'val'/'test' per volume, indexed like ``cohort`` (``split_patients``).

    Returns:
        int64 DataFrame, index ``CLASSES`` + ``Volumes`` (the split sizes), columns Total, Train, Val, Test.
    """
    if not splits.index.equals(cohort.index):
        raise ValueError("splits must be indexed like the cohort (use split_patients(cohort))")
    unknown = sorted(set(splits.tolist()) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown split name(s) {unknown}; expected {list(SPLITS)}")
    labels = cohort[list(CLASSES)].to_numpy(dtype=np.int64)
    s = splits.to_numpy(dtype=object)
    columns = {"Total": np.ones(len(cohort), dtype=bool)}
    columns.update({name.capitalize(): s == name for name in SPLITS})
    table = {col: [*labels[mask].sum(axis=0).tolist(), int(mask.sum())] for col, mask in columns.items()}
    return pd.DataFrame(table, index=pd.Index([*CLASSES, "Volumes"], name="Class"), dtype=np.int64)


# ---------------------------------------------------------------------------------------------------------
# The fixed split file of a snapshot
# ---------------------------------------------------------------------------------------------------------


def split_file(folder: str | os.PathLike[str], fractions: Sequence[float], seed: int) -> Path:
    """The split file of a split seed and fractions in ``folder`` (the snapshot's cache root):
    ``split-seed<seed>-<fractions>.csv``."""
    fr = "_".join(f"{f:g}" for f in fractions)
    return Path(folder) / f"split-seed{seed}-{fr}.csv"


def sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def cohort_sha(cohort: pd.DataFrame) -> str:
    """SHA-256 of the labelled cohort (VolumeName, patient and the 18 labels, sorted by VolumeName)."""
    cols = ["VolumeName", "patient", *CLASSES]
    text = cohort[cols].sort_values("VolumeName").to_csv(index=False)
    return sha256(text.encode())


@dataclass
class FixedSplit:
    """The full labelled cohort, its one split (aligned Series) and the split file's identity."""

    cohort: pd.DataFrame
    splits: pd.Series
    path: Path
    sha: str  # SHA-256 of the split CSV: part of every run's fingerprint


def read_test_patients(root: str | os.PathLike[str]) -> list[str]:
    """The held-out test patients listed in ``root/test_patients.txt`` (``root`` holds ``dataset/``; the
    ``dataset/`` folder itself is accepted); [] when there is no such file."""
    root = Path(root)
    if root.name == "dataset" and not (root / TEST_PATIENTS_TXT).is_file():
        root = root.parent
    path = root / TEST_PATIENTS_TXT
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def fixed_split(path: Path, cohort: pd.DataFrame, *, fractions: Sequence[float], seed: int,
                test_patients: Collection[str] | None = None) -> FixedSplit:
    """The snapshot's one split: read from ``path`` (:func:`split_file`), or made over the full labelled
    ``cohort`` (:func:`split_patients` with ``fractions``, ``seed`` and the held-out ``test_patients``) and
    written there.

    Raises:
        SplitMismatch: the file exists but was made from another cohort (files added or removed on disk) or
            another held-out test set.
    """
    meta = path.with_suffix(".json")
    csha = cohort_sha(cohort)
    held = sorted(set(test_patients or ()))
    hsha = sha256("\n".join(held).encode()) if held else None
    if not path.is_file():
        splits = split_patients(cohort, fractions=tuple(fractions), seed=seed, test_patients=held)
        text = pd.DataFrame({"VolumeName": cohort["VolumeName"], "patient": cohort["patient"],
                             "split": splits.to_numpy()}).to_csv(index=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The .json first: killed before the CSV, the next call makes the same CSV again (deterministic).
        # Both are created only if absent, so concurrent preparers (shards) never write the same file.
        meta_text = json.dumps({"cohort_sha256": csha, "split_sha256": sha256(text.encode()),
                                "n_volumes": len(cohort), "n_patients": int(cohort["patient"].nunique()),
                                "fractions": list(fractions), "split_seed": seed,
                                **({"test_patients": len(held), "test_patients_sha256": hsha} if held else {})},
                               indent=2) + "\n"
        if not _create_once(meta, meta_text) and json.loads(meta.read_text()).get("cohort_sha256") != csha:
            atomic.write_text(meta, meta_text)  # left by a killed call on another cohort, before its CSV existed
        if _create_once(path, text):
            log.info("wrote the split of %d volumes to %s", len(cohort), path)
    raw = path.read_bytes()
    info = json.loads(meta.read_text()) if meta.is_file() else {}
    if info.get("cohort_sha256") == csha and info.get("test_patients_sha256") != hsha:
        raise SplitMismatch(
            f"{path} was made with {info.get('test_patients', 0)} held-out test patients, the snapshot now lists "
            f"{len(held)} ({TEST_PATIENTS_TXT}): start anew with another --work-dir or split_seed (or delete "
            f"{path} and its runs).")
    if info.get("cohort_sha256") != csha:
        raise SplitMismatch(
            f"the labelled cohort on disk ({len(cohort)} volumes) is not the one {path} was made from (cohort "
            f"SHA-256 {csha[:12]} != {str(info.get('cohort_sha256'))[:12]}): volumes were added to or removed "
            "from the snapshot. Runs trained on the old split must not be mixed with a new one: restore the "
            f"snapshot, or start anew with another --work-dir or split_seed (or delete {path} and its runs).")
    table = pd.read_csv(io.BytesIO(raw), dtype=str)
    split_of = dict(zip(table["VolumeName"], table["split"], strict=True))
    splits = pd.Series([split_of[n] for n in cohort["VolumeName"]], index=cohort.index, name="split", dtype="str")
    return FixedSplit(cohort, splits, path, sha256(raw))


def _create_once(path: Path, text: str) -> bool:
    """Atomically create ``path`` with ``text`` unless it exists (a complete temp file hard-linked into place);
    returns whether this call created it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    atomic.write_text(tmp, text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
