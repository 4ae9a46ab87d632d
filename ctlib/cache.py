"""The prepared cache, both directions: ``prepare`` writes it, ``PreparedVolumes`` reads it.

Decoding a CT-RATE ``.nii.gz`` takes seconds; training reads every volume every epoch. ``prepare`` runs
``read_hu`` -> ``Preprocessing.apply`` once per volume, in parallel, and writes
``<cache_root>/<prep.key>/<VolumeName without .nii.gz>.npy`` (S, H, W) float16 atomically, so an interrupted
run leaves no half-written entry and a rerun does only what is missing.

An entry cannot lie: it is a plain ``.npy`` (memory-mappable) followed by a 24-byte trailer (``CTLIBSUM`` and
a 16-byte BLAKE2b digest of the payload). Its header (shape, dtype) and file size are checked by ``prepare``
when it finds it and by ``PreparedVolumes`` when it opens it, the digest by both, so a truncated, zeroed or
foreign file is named and re-made by ``prepare`` from its source. Non-finite values are never written.
The key starts with ``PREPROCESSING_VERSION``: changed preprocessing code never reuses old files.

The command that prepares everything a profile's training reads is ``python -m ctlib.prepare``
(:mod:`ctlib.prepare`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import multiprocessing as mp
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ctlib import atomic
from ctlib.data import CLASSES, DataError, StrPath, read_hu
from ctlib.preprocess import Preprocessing

__all__ = [
    "CacheError",
    "PreparationError",
    "PreparedVolumes",
    "PrepareReport",
    "cache_dir",
    "check_entry",
    "load_prepared",
    "load_settings",
    "prepare",
    "prepared_path",
]

logger = logging.getLogger(__name__)

SETTINGS_JSON = "preprocessing.json"
FAILURES_CSV = "failures.csv"
CACHE_DTYPE = np.float16
_SUM_MAGIC = b"CTLIBSUM"
_SUM_BYTES = 16
TRAILER_BYTES = len(_SUM_MAGIC) + _SUM_BYTES
# Entries are written through ctlib.atomic's temp files (".<entry>.<host>.<pid>.tmp"). A cache folder may be
# shared by preparers on several hosts, where a pid means nothing outside its host: a temp file is removed as
# stale only when it carries this host's name and its pid is dead here, or, from another host, when it is
# older than _FOREIGN_TEMP_AGE_S (no single volume takes a day to write). So a live preparer's file on any host
# is never deleted.
_FOREIGN_TEMP_AGE_S = 24 * 3600


class CacheError(RuntimeError):
    """A cache entry that is missing, truncated, corrupt or not what the settings promise."""


class PreparationError(RuntimeError):
    """Preparation cannot go on: a worker process died, or too many volumes failed."""
_ROW_FIELDS = ("VolumeName", "path", "hu_ready", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing")


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
    remade: dict[str, str] = field(default_factory=dict)  # bad entries found (name -> problem), re-made
    seconds: float = 0.0

    def disk_bytes(self) -> int:
        """Bytes of the folder's cache entries."""
        return sum(p.stat().st_size for p in self.cache_dir.glob("*.npy"))

    def summary(self) -> str:
        text = (f"{self.cache_dir}: {len(self.done)} prepared, {len(self.skipped)} reused, "
                f"{len(self.failed)} failed, {len(self.remade)} bad entries re-made, "
                f"{self.disk_bytes() / 2**20:.1f} MiB on disk, {self.seconds:.1f} s")
        text += "".join(f"\n  re-made {name}: {msg}" for name, msg in self.remade.items())
        if self.failed:
            text += f" (listed in {self.cache_dir / FAILURES_CSV}):"
            text += "".join(f"\n  {name}: {msg}" for name, msg in self.failed.items())
        return text


# ---------------------------------------------------------------------------------------------------------
# Writing entries
# ---------------------------------------------------------------------------------------------------------


def _write_npy(f: Any, arr: np.ndarray) -> None:
    np.save(f, arr, allow_pickle=False)


def _digest(payload: bytes | memoryview | np.ndarray) -> bytes:
    return hashlib.blake2b(memoryview(payload).cast("B"), digest_size=_SUM_BYTES).digest()


def _write_entry(f: Any, arr: np.ndarray) -> None:
    """``.npy`` of ``arr`` then the trailer: magic + digest of the payload."""
    arr = np.ascontiguousarray(arr)
    _write_npy(f, arr)
    f.write(_SUM_MAGIC + _digest(arr))


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
    """Remove temp files left by a killed prepare; returns how many. See ``_FOREIGN_TEMP_AGE_S``: this host's
    files whose pid is dead, other hosts' files only when older than a day."""
    removed = 0
    now = time.time()
    for p in folder.iterdir():
        owner = atomic.temp_owner(p.name)
        if owner is None:
            continue
        if owner[0] == atomic.HOST:
            stale = not _pid_alive(owner[1])
        else:
            try:
                stale = now - p.stat().st_mtime > _FOREIGN_TEMP_AGE_S
            except FileNotFoundError:
                continue
        if stale:
            p.unlink(missing_ok=True)
            removed += 1
    return removed


# ---------------------------------------------------------------------------------------------------------
# Reading and checking entries
# ---------------------------------------------------------------------------------------------------------


def prepared_path(cache_dir: StrPath, name: str) -> Path:
    """Cache file of a volume: ``<cache_dir>/<VolumeName without .nii.gz>.npy``."""
    stem = name.removesuffix(".nii.gz").removesuffix(".nii")
    if not stem or "/" in stem or "\\" in stem or stem.startswith("."):
        raise ValueError(f"{name!r} is not a volume name usable as a cache file name")
    return Path(cache_dir) / f"{stem}.npy"


def _read_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, payload offset) of an entry; raises CacheError naming the file."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
    except FileNotFoundError:
        raise
    except Exception as err:  # zeroed or foreign bytes: numpy says what is wrong with the header
        raise CacheError(f"{path}: not a cache entry (unreadable .npy header: {err})") from None
    if fortran:
        raise CacheError(f"{path}: Fortran-ordered array, not a cache entry")
    return tuple(shape), np.dtype(dtype), offset


def check_entry(path: StrPath, shape: Sequence[int] | None = None, *, content: bool = False) -> str | None:
    """What is wrong with a cache entry, or None when it is sound.

    Checks the header (float16, 3-D, ``shape`` (S, H, W) when given) and the file size (header + payload +
    trailer); with ``content`` also the trailer and the payload's digest (reads the whole file).
    """
    path = Path(path)
    if not path.is_file():
        return "missing"
    try:
        got, dtype, offset = _read_header(path)
    except CacheError as err:
        return str(err).removeprefix(f"{path}: ")
    if dtype != np.dtype(CACHE_DTYPE) or len(got) != 3:
        return f"holds {dtype} {got}, expected float16 (S, H, W)"
    if shape is not None and got != tuple(shape):
        return f"holds shape {got}, expected {tuple(shape)}"
    expected = offset + int(np.prod(got)) * dtype.itemsize + TRAILER_BYTES
    size = path.stat().st_size
    if size != expected:
        return f"{size} bytes, expected {expected} (truncated or overwritten)"
    if content:
        with open(path, "rb") as f:
            f.seek(offset)
            payload = f.read(expected - offset - TRAILER_BYTES)
            trailer = f.read()
        if trailer[: len(_SUM_MAGIC)] != _SUM_MAGIC or trailer[len(_SUM_MAGIC):] != _digest(payload):
            return "content does not match its checksum (zeroed or corrupted)"
    return None


def load_prepared(cache_dir: StrPath, name: str, shape: Sequence[int] | None = None) -> np.ndarray:
    """A prepared volume, memory-mapped read-only: float16 (S, H, W), after checking header and size.

    Raises FileNotFoundError (not prepared) or CacheError naming the file.
    """
    path = prepared_path(cache_dir, name)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: volume {name} is not in the cache; run `python -m ctlib.prepare` "
                                "(see the README) to prepare it")
    problem = check_entry(path, shape)
    if problem:
        raise CacheError(f"{path}: {problem}; rerun `python -m ctlib.prepare` to re-make it")
    return np.load(path, mmap_mode="r")


class PreparedVolumes(Dataset):
    """The cohort's prepared volumes with their labels, read from the memory-mapped cache.

    Item i -> ``(volume, labels, name)``: float32 tensor (S, H, W), float32 tensor (18,), VolumeName. Each
    read checks the entry's header, size and checksum; any error names the file (also in a DataLoader worker).
    With ``float16=True`` the volume is the stored float16 tensor (S, H, W) itself: half the bytes to pin and
    copy to a GPU, cast there (``.float()`` gives exactly the float32 values of the default).

    Args:
        cache_dir: the folder holding the ``.npy`` files (``cache_dir(root, prep)``).
        cohort: DataFrame with ``VolumeName`` and the ``CLASSES`` columns; every volume must be cached.
        shape: expected (S, H, W) of every entry (default: from the folder's ``preprocessing.json``).
        float16: give volumes as the cache's float16 instead of float32.
    """

    def __init__(self, cache_dir: StrPath, cohort: pd.DataFrame, shape: Sequence[int] | None = None, *,
                 float16: bool = False) -> None:
        missing_cols = [c for c in ("VolumeName", *CLASSES) if c not in cohort.columns]
        if missing_cols:
            raise ValueError(f"cohort lacks column(s) {missing_cols}")
        self.cache_dir = Path(cache_dir)
        if shape is None and (self.cache_dir / SETTINGS_JSON).is_file():
            shape = load_settings(self.cache_dir).shape
        self.shape = None if shape is None else tuple(int(s) for s in shape)
        self.float16 = bool(float16)
        self._names = [str(n) for n in cohort["VolumeName"].tolist()]
        self._labels = cohort[list(CLASSES)].to_numpy(dtype=np.float32)
        missing = [n for n in self._names if not prepared_path(self.cache_dir, n).is_file()]
        if missing:
            msg = (f"{len(missing)} volume(s) not in the cache {self.cache_dir}, e.g. {missing[:3]}: run "
                   "`python -m ctlib.prepare` first (see the README)")
            if (self.cache_dir / FAILURES_CSV).is_file():
                msg += f"; volumes that failed to prepare are listed in {self.cache_dir / FAILURES_CSV}"
            raise FileNotFoundError(msg)

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        name = self._names[i]
        path = prepared_path(self.cache_dir, name)
        try:
            stored = load_prepared(self.cache_dir, name, self.shape)
            data = np.array(stored, dtype=CACHE_DTYPE)
            with open(path, "rb") as f:
                f.seek(-TRAILER_BYTES, os.SEEK_END)
                trailer = f.read()
            if trailer != _SUM_MAGIC + _digest(data):
                raise CacheError(f"{path}: content does not match its checksum (zeroed or corrupted); rerun "
                                 "`python -m ctlib.prepare` to re-make it")
        except (CacheError, FileNotFoundError):
            raise
        except Exception as err:  # anything else: say which volume
            raise CacheError(f"{path} (volume {name}): {type(err).__name__}: {err}") from err
        volume = torch.from_numpy(data if self.float16 else data.astype(np.float32))
        return volume, torch.from_numpy(self._labels[i].copy()), name

    @property
    def labels(self) -> np.ndarray:
        """float32 (N, 18) label matrix, in item order."""
        return self._labels.copy()

    @property
    def names(self) -> list[str]:
        """VolumeNames in item order."""
        return list(self._names)


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
        arr = prep.apply(hu, spacing).astype(CACHE_DTYPE)
        del hu
        if not np.isfinite(arr).all():  # never cache NaN/inf (read_hu rejects them; this guards the rest)
            raise DataError(f"{task['path']}: preprocessing produced non-finite values; not cached")
        atomic.write_atomic(prepared_path(out_dir, name), lambda f: _write_entry(f, arr))
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
    text = json.dumps(doc, indent=2) + "\n"
    if path.is_file() and path.read_text() == text:
        return  # unchanged: concurrent shards never rewrite it
    atomic.write_text(path, text)


def _write_failures(folder: Path, failed: dict[str, str], name: str = FAILURES_CSV) -> None:
    def write(f: Any) -> None:
        text = io.StringIO()
        w = csv.writer(text)
        w.writerow(["VolumeName", "error"])
        w.writerows(failed.items())
        f.write(text.getvalue().encode("utf-8"))

    atomic.write_atomic(folder / name, write)


def _verify_existing(tasks: list[dict[str, Any]], out: Path, prep: Preprocessing, report: PrepareReport,
                     progress: bool) -> list[dict[str, Any]]:
    """Split ``tasks`` into sound entries (``report.skipped``) and those to (re-)make (returned); a bad entry
    is logged by file name and put in ``report.remade``."""
    todo = []
    existing = [t for t in tasks if prepared_path(out, t["VolumeName"]).is_file()]
    todo = [t for t in tasks if not prepared_path(out, t["VolumeName"]).is_file()]
    for task in tqdm(existing, desc=f"verify {prep.key}", unit="vol", disable=not progress or not existing):
        path = prepared_path(out, task["VolumeName"])
        problem = check_entry(path, prep.shape, content=True)
        if problem is None:
            report.skipped.append(task["VolumeName"])
        else:
            logger.warning("%s: bad cache entry (%s): re-making it from its source", path, problem)
            report.remade[task["VolumeName"]] = problem
            todo.append(task)
    return todo


def _run_pool(tasks: list[dict[str, Any]], out: Path, prep: Preprocessing, workers: int, record: Any,
              bar: Any, work: Any = None) -> None:
    """Run ``work`` (default ``_prepare_one``) over ``tasks`` in spawned processes; ``record(name, error)``."""
    work = _prepare_one if work is None else work
    n = min(workers, len(tasks))
    # spawn: no fork of a parent whose torch/OpenMP threads are already running.
    with ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(max(1, (os.cpu_count() or 1) // n),)) as pool:
        futures = {pool.submit(work, t, str(out), prep): t["VolumeName"] for t in tasks}
        try:
            for fut in as_completed(futures):
                try:
                    record(*fut.result())
                except BrokenProcessPool as err:
                    # One worker died (SIGKILL, the OOM killer): every pending future fails with it. Marking
                    # them all failed would hide the cause, so stop here; what is written is kept.
                    raise PreparationError(
                        f"a preparation worker process died abruptly (killed, e.g. by the out-of-memory killer) "
                        f"while {out} was being prepared ({futures[fut]} among the volumes in flight). The "
                        f"volumes finished so far are kept; rerun the same command with fewer --workers.") from err
                except Exception as err:  # e.g. a result that could not be sent back
                    record(futures[fut], f"{type(err).__name__}: {err}")
                bar.update()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def prepare(
    cohort: pd.DataFrame,
    cache_root: StrPath,
    prep: Preprocessing | None = None,
    *,
    workers: int = 2,
    progress: bool = True,
    failures_name: str = FAILURES_CSV,
) -> PrepareReport:
    """Preprocess every cohort volume not yet (soundly) cached into ``cache_dir(cache_root, prep)``.

    Each volume: ``read_hu`` -> ``prep.apply`` -> float16 (S, H, W) entry, written atomically. Entries already
    there are checked (header, size, checksum) and reused; a bad one is named and re-made. Temp files of a
    killed run are removed (never those of a live preparer, on any host). A volume that fails (DataError or
    any exception) is recorded and the run goes on; failures are logged and written to ``failures.csv``, the
    settings to ``preprocessing.json``. A worker process that dies stops the run (``PreparationError``).

    Args:
        cohort: ``load_cohort`` rows (VolumeName, path, hu_ready, RescaleSlope, RescaleIntercept,
            XYSpacing, ZSpacing).
        cache_root: parent folder of the per-settings cache folders.
        prep: the preprocessing (default: the paper's).
        workers: processes (spawned); 1 runs in this process.
        progress: show tqdm progress bars (with an ETA).
        failures_name: the failures file (a shard writes its own: ``ctlib.prepare``).

    Returns:
        PrepareReport with ``done``, ``skipped`` (reused), ``failed`` and ``remade``.
    """
    t0 = time.time()
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
    tasks = _verify_existing(cohort[list(_ROW_FIELDS)].to_dict("records"), out, prep, report, progress)

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
            _run_pool(tasks, out, prep, workers, record, bar)
    finally:
        bar.close()

    report.done.sort()
    report.skipped.sort()
    report.failed = dict(sorted(report.failed.items()))
    _write_failures(out, report.failed, failures_name)
    report.seconds = time.time() - t0
    logger.info("%s", report.summary())
    return report
