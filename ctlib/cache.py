"""The prepared cache: each cohort volume preprocessed once, stored as a memory-mapped float16 ``.npy``.

Decoding a CT-RATE ``.nii.gz`` takes seconds; training reads every volume every epoch. ``prepare`` runs
``read_hu`` -> ``Preprocessing.apply`` once per volume, in parallel, and writes
``<cache_root>/<prep.key>/<VolumeName without .nii.gz>.npy`` (S, H, W) atomically, so an interrupted run
leaves no half-written entry and a rerun does only what is missing. ``ctlib.data.PreparedVolumes`` reads it.

Command line: ``python -m ctlib.cache --data-root DIR --cache DIR`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import multiprocessing as mp
import os
import re
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ctlib.data import (
    DataError,
    StrPath,
    check_preprocess_args,
    dataset_root,
    load_cohort,
    load_prepared,
    prepared_path,
    preprocess,
    read_hu,
)

__all__ = [
    "Preprocessing",
    "PrepareReport",
    "cache_dir",
    "load_prepared",
    "load_settings",
    "main",
    "prepare",
    "prepared_path",
]

logger = logging.getLogger(__name__)

SETTINGS_JSON = "preprocessing.json"
FAILURES_CSV = "failures.csv"
CACHE_DTYPE = np.float16
# Temp files: ".<entry>.<pid>.tmp" next to the entry, so that os.replace is atomic (same file system) and a
# stale one can be told from one a live prepare is writing.
_TEMP = re.compile(r"^\..+\.(\d+)\.tmp$")
_ROW_FIELDS = ("VolumeName", "path", "hu_ready", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing")


def _number(x: float) -> str:
    """Shortest exact decimal, filesystem-safe: -1000.0 -> '-1000', 0.75 -> '0.75'."""
    return np.format_float_positional(float(x), trim="-")


@dataclass(frozen=True)
class Preprocessing:
    """Settings of ``ctlib.data.preprocess``; one cache folder per distinct settings (``key``).

    Defaults are the paper's (section 3.1): 214x214x240 crop/pad, centre 100 slices, [-1000, 1000] HU,
    no resampling. Output of ``apply``: float32 (num_slices, size[1], size[0]).
    """

    size: tuple[int, int, int] = (214, 214, 240)
    num_slices: int = 100
    hu_range: tuple[float, float] = (-1000.0, 1000.0)
    target_spacing: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        size, num_slices, hu_range, target_spacing = check_preprocess_args(
            self.size, self.num_slices, self.hu_range, self.target_spacing
        )
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "num_slices", num_slices)
        object.__setattr__(self, "hu_range", hu_range)
        object.__setattr__(self, "target_spacing", target_spacing)

    @property
    def key(self) -> str:
        """Readable, filesystem-safe and unique per settings, e.g. ``214x214x240-n100-hu-1000_1000-native``."""
        size = "x".join(str(s) for s in self.size)
        hu = "_".join(_number(v) for v in self.hu_range)
        spacing = "native" if self.target_spacing is None else "sp" + "x".join(map(_number, self.target_spacing))
        return f"{size}-n{self.num_slices}-hu{hu}-{spacing}"

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of a prepared volume: (S, H, W) = (num_slices, size[1], size[0])."""
        return (self.num_slices, self.size[1], self.size[0])

    def apply(self, hu: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
        """HU volume (X, Y, Z) -> float32 (S, H, W) in [-1, 1]; ``spacing`` (mm) needed to resample."""
        return preprocess(hu, spacing=spacing, target_spacing=self.target_spacing, size=self.size,
                          num_slices=self.num_slices, hu_range=self.hu_range)

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "num_slices": self.num_slices,
            "hu_range": list(self.hu_range),
            "target_spacing": None if self.target_spacing is None else list(self.target_spacing),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        ts = d.get("target_spacing")
        return cls(size=tuple(d["size"]), num_slices=int(d["num_slices"]), hu_range=tuple(d["hu_range"]),
                   target_spacing=None if ts is None else tuple(ts))


def cache_dir(cache_root: StrPath, prep: Preprocessing) -> Path:
    """``cache_root / prep.key``: the folder of one preprocessing's prepared volumes."""
    return Path(cache_root) / prep.key


def load_settings(cache_dir: StrPath) -> Preprocessing:
    """The ``Preprocessing`` a cache folder was prepared with (its ``preprocessing.json``)."""
    path = Path(cache_dir) / SETTINGS_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {cache_dir} is not a prepared cache folder")
    return Preprocessing.from_dict(json.loads(path.read_text()))


@dataclass
class PrepareReport:
    """What ``prepare`` did: volume names prepared now, already cached, and failed (name -> message)."""

    cache_dir: Path
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        text = (f"{self.cache_dir}: {len(self.done)} prepared, {len(self.skipped)} already cached, "
                f"{len(self.failed)} failed")
        if self.failed:
            text += f" (listed in {self.cache_dir / FAILURES_CSV}):"
            text += "".join(f"\n  {name}: {msg}" for name, msg in self.failed.items())
        return text


# ---------------------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_npy(f: Any, arr: np.ndarray) -> None:
    np.save(f, arr, allow_pickle=False)


def _atomic_write(path: Path, write: Any) -> None:
    """Write ``path`` via a temp file in the same folder: write, fsync, ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    _atomic_write(path, lambda f: _write_npy(f, arr))


def _atomic_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from an earlier interrupted call in this process
    if os.name == "nt":
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale_temps(folder: Path) -> int:
    """Remove temp files left by a killed prepare (their writer process is gone); returns how many."""
    removed = 0
    for p in folder.iterdir():
        m = _TEMP.match(p.name)
        if m and not _pid_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed += 1
    return removed


# ---------------------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------------------


def _spacing(task: dict[str, Any]) -> tuple[float, float, float] | None:
    """(sx, sy, sz) mm from the metadata CSV; for a fixed volume without it, its NIfTI header."""
    xy, z = float(task["XYSpacing"]), float(task["ZSpacing"])
    if math.isfinite(xy) and math.isfinite(z) and xy > 0 and z > 0:
        return (xy, xy, z)
    if task["hu_ready"]:
        zooms = tuple(float(v) for v in nib.load(task["path"]).header.get_zooms()[:3])
        if len(zooms) == 3 and all(v > 0 for v in zooms):
            return zooms
    raise DataError(f"{task['path']}: no voxel spacing (XYSpacing/ZSpacing empty), needed to resample")


def _prepare_one(task: dict[str, Any], out_dir: str, prep: Preprocessing) -> tuple[str, str | None]:
    """Worker: one volume -> cache entry. Returns (name, None) or (name, error message); never raises
    an Exception (so one bad volume cannot stop the run)."""
    name = task["VolumeName"]
    try:
        hu = read_hu(task)
        spacing = _spacing(task) if prep.target_spacing is not None else None
        arr = prep.apply(hu, spacing)
        del hu
        _atomic_save(prepared_path(out_dir, name), arr.astype(CACHE_DTYPE))
    except DataError as err:
        return name, str(err)
    except Exception as err:  # anything else while reading one volume: record it, keep going
        return name, f"{type(err).__name__}: {err} ({task['path']})"
    return name, None


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _write_settings(folder: Path, prep: Preprocessing) -> None:
    path = folder / SETTINGS_JSON
    settings = prep.to_dict()
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old is not None and {k: old.get(k) for k in settings} != settings:
            raise ValueError(f"{path} holds other settings ({old}) than {settings}: not mixing caches")
    doc = {**settings, "key": prep.key, "dtype": np.dtype(CACHE_DTYPE).name, "layout": "(S, H, W) = (Z, Y, X)"}
    _atomic_text(path, json.dumps(doc, indent=2) + "\n")


def _write_failures(folder: Path, failed: dict[str, str]) -> None:
    def write(f: Any) -> None:
        text = io.StringIO()
        w = csv.writer(text)
        w.writerow(["VolumeName", "error"])
        w.writerows(failed.items())
        f.write(text.getvalue().encode("utf-8"))

    _atomic_write(folder / FAILURES_CSV, write)


def prepare(
    cohort: pd.DataFrame,
    cache_root: StrPath,
    prep: Preprocessing | None = None,
    *,
    workers: int = 2,
    progress: bool = True,
) -> PrepareReport:
    """Preprocess every cohort volume not yet cached into ``cache_dir(cache_root, prep)``.

    Each volume: ``read_hu`` -> ``prep.apply`` -> float16 (S, H, W) ``.npy``, written atomically. Already
    cached volumes are skipped, temp files of a killed run removed. A volume that fails (DataError or any
    exception) is recorded and the run goes on; failures are logged and written to ``failures.csv``, the
    settings to ``preprocessing.json``.

    Args:
        cohort: ``load_cohort`` rows (VolumeName, path, hu_ready, RescaleSlope, RescaleIntercept,
            XYSpacing, ZSpacing).
        cache_root: parent folder of the per-settings cache folders.
        prep: the preprocessing (default: the paper's).
        workers: processes (spawned); 1 runs in this process.
        progress: show a tqdm progress bar.

    Returns:
        PrepareReport with ``done``, ``skipped`` and ``failed``.
    """
    prep = Preprocessing() if prep is None else prep
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    missing = [c for c in _ROW_FIELDS if c not in cohort.columns]
    if missing:
        raise ValueError(f"cohort lacks column(s) {missing} (use ctlib.data.load_cohort)")
    names = cohort["VolumeName"].tolist()
    if len(set(names)) != len(names):
        raise ValueError("cohort lists a VolumeName more than once")

    out = cache_dir(cache_root, prep)
    out.mkdir(parents=True, exist_ok=True)
    _write_settings(out, prep)
    stale = _clean_stale_temps(out)
    if stale:
        logger.info("%s: removed %d temp file(s) of an interrupted prepare", out, stale)

    report = PrepareReport(cache_dir=out)
    tasks = []
    for task in cohort[list(_ROW_FIELDS)].to_dict("records"):
        if prepared_path(out, task["VolumeName"]).is_file():
            report.skipped.append(task["VolumeName"])
        else:
            tasks.append(task)

    def record(name: str, error: str | None) -> None:
        if error is None:
            report.done.append(name)
        else:
            report.failed[name] = error
            logger.warning("%s: skipped: %s", name, error)

    bar = tqdm(total=len(tasks), desc=f"prepare {prep.key}", unit="vol", disable=not progress)
    try:
        if workers == 1 or len(tasks) <= 1:
            for task in tasks:
                record(*_prepare_one(task, str(out), prep))
                bar.update()
        else:
            n = min(workers, len(tasks))
            # spawn: no fork of a parent whose torch/OpenMP threads are already running.
            with ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn"),
                                     initializer=_init_worker,
                                     initargs=(max(1, (os.cpu_count() or 1) // n),)) as pool:
                futures = {pool.submit(_prepare_one, t, str(out), prep): t["VolumeName"] for t in tasks}
                try:
                    for fut in as_completed(futures):
                        try:
                            record(*fut.result())
                        except BrokenProcessPool:
                            record(futures[fut], "worker process died (killed, or out of memory?); rerun "
                                                 "prepare, or use fewer workers")
                        except Exception as err:  # e.g. a result that could not be sent back
                            record(futures[fut], f"{type(err).__name__}: {err}")
                        bar.update()
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
    finally:
        bar.close()

    report.done.sort()
    report.skipped.sort()
    report.failed = dict(sorted(report.failed.items()))
    _write_failures(out, report.failed)
    logger.info("%s", report.summary())
    return report


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ctlib.cache",
        description=(
            "Prepare the memory-mapped cache of a CT-RATE snapshot: every labelled chest-CT volume on disk "
            "is converted to HU, preprocessed (paper section 3.1: clip [-1000, 1000] HU, centre crop/pad, "
            "scale to [-1, 1], centre slices) and saved as float16 <cache>/<settings key>/<volume>.npy. "
            "Reruns only do what is missing; failed volumes are listed in failures.csv."
        ),
    )
    p.add_argument("--data-root", required=True, type=Path,
                   help="snapshot folder holding dataset/ (or the dataset/ folder itself)")
    p.add_argument("--cache", required=True, type=Path, help="cache root; one subfolder per settings")
    p.add_argument("--size", nargs=3, type=int, default=[214, 214, 240], metavar=("X", "Y", "Z"),
                   help="crop/pad size (default: 214 214 240, the paper; the ViT profile uses 224 224 240)")
    p.add_argument("--num-slices", type=int, default=100, help="centre slices kept (default: 100)")
    p.add_argument("--hu-range", nargs=2, type=float, default=[-1000.0, 1000.0], metavar=("LOW", "HIGH"),
                   help="HU clipping window (default: -1000 1000)")
    p.add_argument("--target-spacing", nargs=3, type=float, default=None, metavar=("SX", "SY", "SZ"),
                   help="resample to this spacing in mm first (CT-CLIP style: 0.75 0.75 1.5); "
                        "default: no resampling")
    p.add_argument("--workers", type=int, default=2, help="parallel processes (default: 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--strict", action="store_true", help="exit with status 1 if any volume failed")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    try:
        prep = Preprocessing(size=tuple(args.size), num_slices=args.num_slices, hu_range=tuple(args.hu_range),
                             target_spacing=None if args.target_spacing is None else tuple(args.target_spacing))
    except ValueError as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        dataset_root(args.data_root)
        cohort = load_cohort(args.data_root)
    except DataError as err:
        print(f"error: {args.data_root} is not a usable CT-RATE snapshot: {err}", file=sys.stderr)
        return 2
    if cohort.empty:
        print(f"error: {args.data_root} holds no labelled chest-CT volume on disk; nothing to prepare",
              file=sys.stderr)
        return 2
    report = prepare(cohort, args.cache, prep, workers=args.workers, progress=not args.no_progress)
    print(report.summary())
    return 1 if (args.strict and report.failed) else 0


if __name__ == "__main__":
    sys.exit(main())
