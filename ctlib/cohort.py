"""One cohort and one split per snapshot and split seed; everything a profile's training reads, prepared once.

``prepare_profile`` (the ``python -m ctlib.cache --profile`` command, and ``ctlib.launch.train_run``):

1. the snapshot: ``profile.data_root``, or the profile's synthetic one (generated when missing);
2. the full labelled cohort on disk, split by patient **once** (``split_patients``) and written as
   ``<cache root>/split-seed<S>-<fractions>.csv`` (VolumeName, patient, split) with a ``.json`` beside it holding
   the cohort's and the CSV's SHA-256. Every model and every resume reads that file; a cohort that changed
   on disk stops with a message instead of silently re-splitting;
3. the cache of every model input size of the profile (``ctlib.cache.prepare``). Volumes that fail to read
   are reported and excluded from training and evaluation; they never move another patient between splits
   (the split was made first, over the full cohort). Above ``max_failed_fraction`` it raises;
4. a ``ready-<split sha>.json`` marker per cache folder. Training (``load_run_data``) reads only: it checks
   the marker and every entry's header and size, and stops with the command that prepares what is missing.

``main`` is the command line ``python -m ctlib.cache --profile NAME [--data-root DIR] [--work-dir DIR]
[--workers N] [--set FIELD=VALUE] [--shard K/N]`` (``--shard``: ``ctlib.shards``, preparation on N machines).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ctlib.cache import (
    FAILURES_CSV,
    PREPROCESSING_VERSION,
    PreparationError,
    PrepareReport,
    Preprocessing,
    _atomic_text,
    cache_dir,
    check_entry,
    prepare,
    prepared_path,
)
from ctlib.data import CLASSES, DataError, load_cohort, split_patients
from ctlib.profiles import MODELS, PROFILES, Profile, get_profile, parse_overrides, validate

log = logging.getLogger(__name__)

# The profile fields that decide what is prepared (snapshot, split, caches); the rest concern training.
PREPARATION_FIELDS = ("synthetic_patients", "synthetic_shape", "synthetic_spacing", "synthetic_seed",
                      "max_failed_fraction", "size_2d", "size_3d", "num_slices", "hu_range", "target_spacing",
                      "fractions", "split_seed")


class CacheNotReady(RuntimeError):
    """The cache or split a run needs is missing or incomplete; the message gives the command to prepare it."""


def synthetic_root(profile: Profile) -> Path:
    """Where the profile's synthetic snapshot lives (one folder per generator setting)."""
    x, y, z = profile.synthetic_shape
    sx, sy, sz = profile.synthetic_spacing
    key = f"p{profile.synthetic_patients}-{x}x{y}x{z}-{sx:g}x{sy:g}x{sz:g}mm-seed{profile.synthetic_seed}"
    return Path(profile.work_dir) / "synthetic" / key


def snapshot_root(profile: Profile) -> Path:
    """The snapshot the profile reads (without generating anything)."""
    return Path(profile.data_root) if profile.data_root is not None else synthetic_root(profile)


def ensure_dataset(profile: Profile, *, progress: bool = True) -> Path:
    """The CT-RATE snapshot to use: ``profile.data_root``, or the synthetic one (generated on first use)."""
    if profile.data_root is not None:
        root = Path(profile.data_root)
        if not root.exists():
            raise FileNotFoundError(f"data root {root} does not exist (expected a CT-RATE snapshot)")
        return root
    from ctlib import synthetic

    root = synthetic_root(profile)
    if (root / "dataset").exists():
        return root
    # Generate beside the target and rename, so a killed generation never looks complete.
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("generating the synthetic CT-RATE snapshot in %s", root)
    synthetic.generate(tmp, n_patients=profile.synthetic_patients, shape=profile.synthetic_shape,
                       spacing=profile.synthetic_spacing, seed=profile.synthetic_seed,
                       workers=profile.prepare_workers, progress=progress)
    root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, root)
    return root


def preprocessing_for(profile: Profile, model: str) -> Preprocessing:
    """The preprocessing of ``model``'s input under ``profile``."""
    return Preprocessing(
        size=tuple(profile.image_size(model)),
        num_slices=profile.num_slices,
        hu_range=tuple(profile.hu_range),
        target_spacing=None if profile.target_spacing is None else tuple(profile.target_spacing),
    )


def preprocessings(profile: Profile) -> list[Preprocessing]:
    """Every distinct model input of the profile (214 and 224 for ``paper``; one when sizes are equal)."""
    out: list[Preprocessing] = []
    for model in MODELS:
        prep = preprocessing_for(profile, model)
        if prep not in out:
            out.append(prep)
    return out


def cache_root_for(profile: Profile, data_root: Path | None = None) -> Path:
    """Caches and the split are kept per snapshot: ``<work_dir>/cache/<snapshot name>-<hash of its path>``."""
    data_root = snapshot_root(profile) if data_root is None else Path(data_root)
    ident = hashlib.sha1(str(data_root.resolve()).encode()).hexdigest()[:10]
    return Path(profile.work_dir) / "cache" / f"{data_root.resolve().name}-{ident}"


def split_file(profile: Profile) -> Path:
    """The snapshot's fixed split for the profile's split seed and fractions (a CSV)."""
    fr = "_".join(f"{f:g}" for f in profile.fractions)
    return cache_root_for(profile) / f"split-seed{profile.split_seed}-{fr}.csv"


def prepare_command(profile: Profile) -> str:
    """The shell command that prepares what ``profile`` reads (fields set away from the named profile
    are passed with --set)."""
    base = PROFILES.get(profile.name, Profile())
    cmd = ["python", "-m", "ctlib.cache", "--profile", profile.name]
    if profile.data_root is not None:
        cmd += ["--data-root", str(profile.data_root)]
    if profile.work_dir != base.work_dir:
        cmd += ["--work-dir", str(profile.work_dir)]
    for name in PREPARATION_FIELDS:
        value = getattr(profile, name)
        if value == getattr(base, name):
            continue
        cmd += ["--set", f"{name}={json.dumps(list(value) if isinstance(value, tuple) else value)}"]
    return shlex.join(cmd)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cohort_sha(cohort: pd.DataFrame) -> str:
    """SHA-256 of the labelled cohort (VolumeName, patient and the 18 labels, sorted by VolumeName)."""
    cols = ["VolumeName", "patient", *CLASSES]
    text = cohort[cols].sort_values("VolumeName").to_csv(index=False)
    return _sha256(text.encode())


@dataclass
class FixedSplit:
    """The full labelled cohort, its one split (aligned Series) and the split file's identity."""

    cohort: pd.DataFrame
    splits: pd.Series
    path: Path
    sha: str  # SHA-256 of the split CSV: part of every run's fingerprint


def fixed_split(profile: Profile, cohort: pd.DataFrame | None = None) -> FixedSplit:
    """The snapshot's one split: read from the split file, or made over the full labelled cohort and written.

    Raises:
        CacheNotReady: the file exists but was made from another cohort (files added or removed on disk).
    """
    if cohort is None:
        cohort = load_cohort(ensure_dataset(profile, progress=False))
    path = split_file(profile)
    meta = path.with_suffix(".json")
    csha = cohort_sha(cohort)
    if not path.is_file():
        splits = split_patients(cohort, fractions=tuple(profile.fractions), seed=profile.split_seed)
        text = pd.DataFrame({"VolumeName": cohort["VolumeName"], "patient": cohort["patient"],
                             "split": splits.to_numpy()}).to_csv(index=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The .json first: killed before the CSV, the next call makes the same CSV again (deterministic).
        # Both are created only if absent, so concurrent preparers (shards) never write the same file.
        meta_text = json.dumps({"cohort_sha256": csha, "split_sha256": _sha256(text.encode()),
                                "n_volumes": len(cohort), "n_patients": int(cohort["patient"].nunique()),
                                "fractions": list(profile.fractions), "split_seed": profile.split_seed},
                               indent=2) + "\n"
        if not _create_once(meta, meta_text) and json.loads(meta.read_text()).get("cohort_sha256") != csha:
            _atomic_text(meta, meta_text)  # left by a killed call on another cohort, before its CSV existed
        if _create_once(path, text):
            log.info("wrote the split of %d volumes to %s", len(cohort), path)
    raw = path.read_bytes()
    info = json.loads(meta.read_text()) if meta.is_file() else {}
    if info.get("cohort_sha256") != csha:
        raise CacheNotReady(
            f"the labelled cohort on disk ({len(cohort)} volumes) is not the one {path} was made from (cohort "
            f"SHA-256 {csha[:12]} != {str(info.get('cohort_sha256'))[:12]}): volumes were added to or removed "
            "from the snapshot. Runs trained on the old split must not be mixed with a new one: restore the "
            f"snapshot, or start anew with another --work-dir or split_seed (or delete {path} and its runs).")
    table = pd.read_csv(io.BytesIO(raw), dtype=str)
    split_of = dict(zip(table["VolumeName"], table["split"], strict=True))
    splits = pd.Series([split_of[n] for n in cohort["VolumeName"]], index=cohort.index, name="split", dtype="str")
    return FixedSplit(cohort, splits, path, _sha256(raw))


def _create_once(path: Path, text: str) -> bool:
    """Atomically create ``path`` with ``text`` unless it exists (a complete temp file hard-linked into place);
    returns whether this call created it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    _atomic_text(tmp, text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _ready_path(folder: Path, split_sha: str) -> Path:
    return folder / f"ready-{split_sha[:16]}.json"


def read_failures(folder: Path) -> dict[str, str]:
    """VolumeName -> error of a cache folder's ``failures.csv`` (empty when none)."""
    path = folder / FAILURES_CSV
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {row["VolumeName"]: row["error"] for row in csv.DictReader(f)}


@dataclass
class PreparedProfile:
    """What ``prepare_profile`` did: the split and one report per cache folder."""

    split: FixedSplit
    reports: list[PrepareReport] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)  # failed in any folder -> left out everywhere

    @property
    def key(self) -> str:
        """``RunData.key`` of the runs that read this preparation."""
        return data_key(self.split.sha, self.excluded)

    def summary(self) -> str:
        n = len(self.split.cohort)
        lines = [f"cohort: {n} volumes of {self.split.cohort['patient'].nunique()} patients; split "
                 f"{self.split.path} (sha256 {self.split.sha[:12]})"]
        lines += [r.summary() for r in self.reports]
        disk = sum(r.disk_bytes() for r in self.reports)
        lines.append(f"total: {sum(len(r.done) for r in self.reports)} prepared, "
                     f"{sum(len(r.skipped) for r in self.reports)} reused, {len(self.excluded)} failed "
                     f"(excluded from training and evaluation), {disk / 2**20:.1f} MiB on disk")
        lines += [f"  failed {name}: {err}" for name, err in self.excluded.items()]
        return "\n".join(lines)


def prepare_profile(profile: Profile, *, progress: bool = True) -> PreparedProfile:
    """Snapshot, split and every cache of ``profile``, once (idempotent: a rerun checks and reuses).

    Raises:
        PreparationError: a worker died, or more than ``max_failed_fraction`` of the volumes failed.
        CacheNotReady: the cohort on disk is not the one the existing split file was made from.
    """
    root = ensure_dataset(profile, progress=progress)
    split = fixed_split(profile, load_cohort(root))
    croot = cache_root_for(profile, root)
    result = PreparedProfile(split)
    for prep in preprocessings(profile):
        report = prepare(split.cohort, croot, prep, workers=profile.prepare_workers, progress=progress)
        result.reports.append(report)
        result.excluded.update(report.failed)
    result.excluded = dict(sorted(result.excluded.items()))
    frac = len(result.excluded) / max(len(split.cohort), 1)
    if frac > profile.max_failed_fraction:
        print(result.summary())
        raise PreparationError(
            f"{len(result.excluded)} of {len(split.cohort)} volumes ({frac:.1%}) failed to prepare, more than "
            f"max_failed_fraction={profile.max_failed_fraction:g}; see failures.csv in "
            f"{', '.join(str(r.cache_dir) for r in result.reports)}. First: "
            + "; ".join(f"{k}: {v}" for k, v in list(result.excluded.items())[:3]))
    for report in result.reports:
        _atomic_text(_ready_path(report.cache_dir, split.sha), json.dumps(
            {"version": PREPROCESSING_VERSION, "split_sha256": split.sha, "excluded": result.excluded,
             "n_cached": len(report.done) + len(report.skipped)}, indent=2) + "\n")
    return result


@dataclass
class RunData:
    """What one run reads, decided by rank 0: the usable cohort (excluded volumes dropped), its split,
    the cache folder of the model's input and the split file's identity."""

    cohort: pd.DataFrame
    splits: pd.Series
    cache_dir: Path
    shape: tuple[int, int, int]
    split_path: Path
    split_sha: str
    excluded: dict[str, str]

    @property
    def key(self) -> str:
        """SHA-256 of the split file's hash and the excluded volumes: what a run was trained and scored on
        (part of its fingerprint, so a resume on another cohort, split or exclusion list stops)."""
        return data_key(self.split_sha, self.excluded)


def data_key(split_sha: str, excluded: Sequence[str]) -> str:
    """See ``RunData.key``."""
    return _sha256(json.dumps([split_sha, sorted(excluded)]).encode())


def load_run_data(profile: Profile, model: str) -> RunData:
    """Read (never prepare) the split and ``model``'s cache; check every entry's header and size.

    Raises:
        CacheNotReady: with the exact command (``prepare_command``) that prepares what is missing.
    """
    command = prepare_command(profile)
    root = snapshot_root(profile)
    if not (root / "dataset").exists() and not root.name == "dataset":
        raise CacheNotReady(f"no snapshot at {root}; prepare it first:\n    {command}")
    path = split_file(profile)
    if not path.is_file():
        raise CacheNotReady(f"no split file {path}: the data of profile {profile.name!r} is not prepared; "
                            f"run first:\n    {command}")
    split = fixed_split(profile)
    prep = preprocessing_for(profile, model)
    folder = cache_dir(cache_root_for(profile), prep)
    ready = _ready_path(folder, split.sha)
    if not ready.is_file():
        raise CacheNotReady(f"the cache {folder} is not complete for split {path} (no {ready.name}); run "
                            f"first:\n    {command}")
    excluded = json.loads(ready.read_text())["excluded"]
    keep = ~split.cohort["VolumeName"].isin(excluded).to_numpy()
    cohort = split.cohort[keep].reset_index(drop=True)
    bad = {}
    for name in cohort["VolumeName"]:
        problem = check_entry(prepared_path(folder, name), prep.shape)
        if problem:
            bad[name] = problem
    if bad:
        listed = "; ".join(f"{prepared_path(folder, n)}: {p}" for n, p in list(bad.items())[:5])
        raise CacheNotReady(f"{len(bad)} cache entr{'y is' if len(bad) == 1 else 'ies are'} missing or bad "
                            f"({listed}); re-make them with:\n    {command}")
    splits = pd.Series(split.splits.to_numpy()[keep], name="split", dtype="str")
    return RunData(cohort, splits, folder, prep.shape, path, split.sha, excluded)


def prepare_data(profile: Profile, model: str, *, progress: bool = True) -> tuple[pd.DataFrame, Path]:
    """Prepare the profile (``prepare_profile``) and return ``model``'s usable cohort and cache folder.

    For notebooks and single-process runs (preparation on first use, before any process group exists).
    """
    prepare_profile(profile, progress=progress)
    data = load_run_data(profile, model)
    return data.cohort, data.cache_dir


# ---------------------------------------------------------------------------------------------------------
# Command line: python -m ctlib.cache
# ---------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ctlib.cache",
        description=(
            "Prepare everything a profile's training reads, once: the snapshot's fixed cohort and split "
            "(split-*.csv beside the cache) and the memory-mapped cache of every model input size of the "
            "profile. Every labelled chest-CT volume on disk is converted to HU and preprocessed (paper "
            "section 3.1). `python -m ctlib.train` and `run_all.sh` with the same --profile, --data-root, "
            "--work-dir and --set then only read. Reruns check what is there and do only what is missing or "
            "bad; failed volumes are listed in failures.csv and left out of training and evaluation."
        ),
    )
    p.add_argument("--profile", required=True, help="smoke, demo, paper or paper480")
    p.add_argument("--data-root", default=None,
                   help="CT-RATE snapshot folder holding dataset/ (default: the profile's synthetic snapshot, "
                        "generated when missing)")
    p.add_argument("--work-dir", default=None, help="where synthetic data and caches go (default: the "
                                                    "profile's work_dir)")
    p.add_argument("--workers", type=int, default=None, help="parallel processes (default: profile's "
                                                             "prepare_workers)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a profile field, exactly as for python -m ctlib.train")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="prepare only shard K of N (0 <= K < N; a hash of each VolumeName decides) into the "
                        "shared cache, so N machines or a job array prepare in parallel; afterwards run once "
                        "without --shard (it checks everything and writes the ready markers)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1: preparation failed, 2: bad arguments)."""
    from ctlib.shards import parse_shard, prepare_shard  # ctlib.shards imports this module

    parser = _parser()
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    try:
        overrides: dict[str, Any] = parse_overrides(args.overrides)
        if args.data_root is not None:
            overrides["data_root"] = args.data_root
        if args.work_dir is not None:
            overrides["work_dir"] = args.work_dir
        if args.workers is not None:
            overrides["prepare_workers"] = args.workers
        profile = get_profile(args.profile, **overrides)
        validate(profile)
        shard = None if args.shard is None else parse_shard(args.shard)
    except ValueError as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if shard is not None:
            print(prepare_shard(profile, *shard, progress=not args.no_progress).summary())
            return 0
        prepared = prepare_profile(profile, progress=not args.no_progress)
    except (DataError, PreparationError, CacheNotReady, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(prepared.summary())
    return 0
