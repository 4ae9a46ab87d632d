"""Download a patient subset of CT-RATE from the Hugging Face Hub (the paper used about 3,000 patients).

CT-RATE is gated: accept its terms on https://huggingface.co/datasets/ibrahimhamamci/CT-RATE, then log in
(``huggingface-cli login``) or pass a token. ``download`` fetches the CSVs, picks N patients (seeded) and
fetches all their volumes (every scan and reconstruction), skipping files already present, into the
snapshot layout ``ctlib.data.load_cohort`` reads.

Command line: ``python -m ctlib.download --out DIR --patients N`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalTokenNotFoundError,
    RepositoryNotFoundError,
)

from ctlib.data import (
    LABELS_CSV,
    METADATA_CSV,
    NO_CHEST_TXT,
    REPORTS_CSV,
    SOURCE_SPLITS,
    StrPath,
    parse_volume_name,
    read_no_chest,
    volume_relpath,
)

logger = logging.getLogger(__name__)

REPO_ID = "ibrahimhamamci/CT-RATE"
REPO_TYPE = "dataset"
DATASET_URL = f"https://huggingface.co/datasets/{REPO_ID}"


class DownloadError(RuntimeError):
    """The Hub refused or failed a download; the message says what to do."""


def csv_paths(splits: Sequence[str] = SOURCE_SPLITS) -> list[str]:
    """Repo paths of the CSVs and lists the loader reads, for ``splits``: labels, metadata, no_chest,
    reports."""
    _check_splits(splits)
    tables = (LABELS_CSV, METADATA_CSV, NO_CHEST_TXT, REPORTS_CSV)
    return [f"dataset/{table[s]}" for s in splits for table in tables]


def remote_paths(names: Iterable[str], fixed: bool = True) -> list[str]:
    """Repo paths to fetch for ``names``: the CSVs of their splits, then each volume.

    ``fixed=True`` (default) takes the v2 volumes already in HU,
    ``dataset/train_fixed/train_1/train_1_a/train_1_a_1.nii.gz``; ``fixed=False`` the originals.
    """
    names = list(names)
    splits = [s for s in SOURCE_SPLITS if any(parse_volume_name(n)["source_split"] == s for n in names)]
    return [*csv_paths(splits), *(f"dataset/{volume_relpath(n, fixed=fixed)}" for n in names)]


def _check_splits(splits: Sequence[str]) -> None:
    bad = [s for s in splits if s not in SOURCE_SPLITS]
    if bad or not splits:
        raise ValueError(f"splits must be a non-empty subset of {SOURCE_SPLITS}, got {list(splits)!r}")


def choose_volumes(
    labels: pd.DataFrame,
    n_patients: int,
    seed: int = 0,
    splits: Sequence[str] = SOURCE_SPLITS,
    *,
    exclude: Iterable[str] = (),
) -> list[str]:
    """Pick ``n_patients`` patients at random (seeded) and return all their VolumeNames, sorted.

    Args:
        labels: the labels CSV(s) (a ``VolumeName`` column), e.g. train and valid concatenated.
        n_patients: how many patients; at most the number available.
        seed: same labels + seed -> same choice.
        splits: source splits to draw patients from.
        exclude: VolumeNames never to fetch (e.g. the no_chest lists); a patient left with none is not drawn.

    Returns:
        VolumeNames (``train_1_a_1.nii.gz``) of every scan and reconstruction of the chosen patients.
    """
    _check_splits(splits)
    if isinstance(n_patients, bool) or not isinstance(n_patients, int | np.integer) or n_patients < 1:
        raise ValueError(f"n_patients must be a positive integer, got {n_patients!r}")
    if "VolumeName" not in labels.columns:
        raise ValueError("labels lacks a VolumeName column")
    skip = {parse_volume_name(n)["stem"] for n in exclude}
    by_patient: dict[str, list[str]] = {}
    for name in labels["VolumeName"].tolist():
        info = parse_volume_name(str(name))
        if info["source_split"] in splits and info["stem"] not in skip:
            by_patient.setdefault(info["patient"], []).append(info["stem"] + ".nii.gz")
    patients = sorted(by_patient)
    if n_patients > len(patients):
        raise ValueError(f"asked for {n_patients} patients, only {len(patients)} available in {list(splits)}")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(patients), size=int(n_patients), replace=False)
    return sorted({n for i in chosen for n in by_patient[patients[i]]})


@dataclass
class DownloadReport:
    """What ``download`` did: chosen volumes, repo paths fetched now and paths already present."""

    out: Path
    chosen: list[str] = field(default_factory=list)
    fetched: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    planned: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.out}: {len(self.chosen)} volumes chosen; {len(self.fetched)} files fetched, "
                f"{len(self.present)} already present")


def _is_auth_error(err: BaseException) -> bool:
    if isinstance(err, GatedRepoError | RepositoryNotFoundError | LocalTokenNotFoundError):
        return True
    status = getattr(getattr(err, "response", None), "status_code", None)
    return isinstance(err, HfHubHTTPError) and status in (401, 403)


def _auth_message(err: BaseException) -> str:
    return (f"the Hugging Face Hub refused access to {REPO_ID} ({type(err).__name__}: {err}). CT-RATE is a "
            f"gated dataset: accept its terms at {DATASET_URL} with your account, then run "
            "`huggingface-cli login` (or `hf auth login`), or pass --token / token=... (a read token).")


def _fetch(path: str, out: Path, token: str | None) -> str:
    try:
        hf_hub_download(repo_id=REPO_ID, repo_type=REPO_TYPE, filename=path, local_dir=out, token=token)
    except Exception as err:
        if _is_auth_error(err):
            raise DownloadError(_auth_message(err)) from err
        raise
    return path


def _fetch_all(paths: Sequence[str], out: Path, token: str | None, workers: int, report: DownloadReport,
               *, progress: bool = True) -> None:
    """Fetch missing ``paths``; auth errors stop at once, other failures are collected and raised last."""
    todo = []
    for p in paths:
        (report.present if (out / p).is_file() else todo).append(p)
    failed: dict[str, str] = {}
    if not todo:
        return
    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
        futures = {pool.submit(_fetch, p, out, token): p for p in todo}
        with tqdm(total=len(todo), desc="download", unit="file", disable=not progress) as bar:
            try:
                for fut in as_completed(futures):
                    try:
                        report.fetched.append(fut.result())
                    except DownloadError:
                        raise
                    except Exception as err:
                        failed[futures[fut]] = f"{type(err).__name__}: {err}"
                        logger.warning("%s: %s", futures[fut], failed[futures[fut]])
                    bar.update()
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    if failed:
        listing = "".join(f"\n  {p}: {m}" for p, m in sorted(failed.items()))
        raise DownloadError(f"{len(failed)} file(s) could not be downloaded (rerun to retry):{listing}")


def download(
    out: StrPath,
    n_patients: int,
    seed: int = 0,
    token: str | None = None,
    fixed: bool = True,
    workers: int = 4,
    *,
    splits: Sequence[str] = SOURCE_SPLITS,
    dry_run: bool = False,
    progress: bool = True,
) -> DownloadReport:
    """Download the CSVs and all volumes of ``n_patients`` seeded-random patients into ``out``.

    ``out`` becomes a snapshot folder (``out/dataset/...``) for ``ctlib.data.load_cohort``. Files present
    are not fetched again. With ``dry_run`` only the (small) CSVs are fetched, to choose the patients, and
    ``report.planned`` lists the volume paths that would be fetched.

    Raises:
        DownloadError: the Hub refused access (gated dataset, no or bad token: the message says how to
            fix it), or some files failed (listed).
    """
    _check_splits(splits)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    report = DownloadReport(out=out)
    _fetch_all(csv_paths(splits), out, token, workers, report, progress=progress)

    labels = pd.concat([pd.read_csv(out / "dataset" / LABELS_CSV[s], usecols=["VolumeName"], dtype="str")
                        for s in splits], ignore_index=True)
    no_chest = set().union(*(read_no_chest(out / "dataset" / NO_CHEST_TXT[s]) for s in splits))
    report.chosen = choose_volumes(labels, n_patients, seed, splits, exclude=no_chest)
    volumes = [p for p in remote_paths(report.chosen, fixed=fixed) if p.endswith(".nii.gz")]
    report.planned = [p for p in volumes if not (out / p).is_file()]
    if dry_run:
        return report
    _fetch_all(volumes, out, token, workers, report, progress=progress)
    logger.info("%s", report.summary())
    return report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ctlib.download",
        description=(
            f"Download a seeded random subset of CT-RATE patients ({DATASET_URL}, gated: accept the terms "
            "and `huggingface-cli login`, or pass --token) with all their scans and reconstructions, plus "
            "the labels, metadata, no_chest and report CSVs, into OUT/dataset/."
        ),
    )
    p.add_argument("--out", required=True, type=Path, help="snapshot folder to fill (OUT/dataset/...)")
    p.add_argument("--patients", required=True, type=int, help="number of patients to draw")
    p.add_argument("--seed", type=int, default=0, help="random seed of the patient choice (default: 0)")
    p.add_argument("--token", default=None, help="Hugging Face token (default: the logged-in one / HF_TOKEN)")
    p.add_argument("--originals", action="store_true",
                   help="fetch the original volumes (train/, valid/) instead of the v2 *_fixed ones in HU")
    p.add_argument("--splits", nargs="+", default=list(SOURCE_SPLITS), choices=SOURCE_SPLITS,
                   help="source splits to draw from (default: train valid)")
    p.add_argument("--workers", type=int, default=4, help="parallel downloads (default: 4)")
    p.add_argument("--dry-run", action="store_true",
                   help="fetch only the CSVs (to choose) and print the volume files that would be fetched")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.patients < 1:
        parser.error(f"--patients must be at least 1, got {args.patients}")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = download(args.out, args.patients, seed=args.seed, token=args.token, fixed=not args.originals,
                          workers=args.workers, splits=args.splits, dry_run=args.dry_run)
    except (DownloadError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(f"would fetch {len(report.planned)} volume file(s) of {len(report.chosen)} volumes "
              f"({len(report.chosen) - len(report.planned)} already present):")
        print("\n".join(report.planned))
    else:
        print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
