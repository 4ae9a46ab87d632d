"""The CT-RATE snapshot writer: layout, NIfTI volumes, labels/metadata/reports CSVs, and the command line."""

from __future__ import annotations

import argparse
import csv
import gzip
import math
import multiprocessing
import os
import shutil
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ctlib.data import (
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
from ctlib.split import TEST_PATIENTS_TXT
from ctlib.synthetic.column import ContextGrid
from ctlib.synthetic.plan import Volume, plan
from ctlib.synthetic.reports import report
from ctlib.synthetic.scanner import Context, render_volume
from ctlib.synthetic.truth import TRUTH_DIR, save_mask, write_lesions_csv


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def _save_nifti(path: Path, arr: np.ndarray, spacing: Sequence[float], *, fixed: bool) -> None:
    """int16 ``.nii.gz``: a blank header (identity affine, no scaling) for originals; zooms and
    slope 1 / intercept 0 filled in for the fixed re-uploads. Bytes depend only on ``arr``."""
    affine = np.diag([*(float(s) for s in spacing), 1.0]) if fixed else np.eye(4)
    img = nib.Nifti1Image(np.asarray(arr, dtype=np.int16), affine)
    img.header.set_data_dtype(np.int16)
    if fixed:
        img.header.set_slope_inter(1.0, 0.0)
    else:
        img.header.set_slope_inter(None, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))
    os.replace(tmp, path)


def _write_volume(task: tuple[Volume, tuple[int, int, int], tuple[float, float, float], str, Context]) -> list[list]:
    """Render one volume and write it (and its fixed re-upload) under ``root`` (the ``dataset/`` folder),
    and its lesion mask under ``root/../truth/``; returns its ``lesions.csv`` rows. Runs in a worker."""
    v, shape, spacing, root, context = task
    hu, *_, truth = render_volume(
        v.kind, v.labels, v.base, v.scan, v.recon, v.age, v.sex, shape, spacing, v.sharp, context
    )
    stored = np.clip(hu.astype(np.int32) - v.intercept, -32768, 32767).astype(np.int16)
    _save_nifti(Path(root) / volume_relpath(v.name), stored, spacing, fixed=False)
    if v.fixed:
        _save_nifti(Path(root) / volume_relpath(v.name, fixed=True), hu, spacing, fixed=True)
    save_mask(Path(root).parent, v.name, truth.mask())
    return truth.rows(v.name)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _metadata_row(v: Volume, shape: Sequence[int], spacing: Sequence[float]) -> list[Any]:
    nx, ny, nz = shape
    sx, sy, sz = (float(s) for s in spacing)
    values = {
        "VolumeName": v.name,
        "Manufacturer": v.manufacturer,
        "SeriesDescription": f"{'THORAX' if v.kind == 'chest' else v.kind.upper()} {sz:g} {v.kernel}",
        "ManufacturerModelName": v.model,
        "PatientSex": v.sex,
        "PatientAge": f"{v.age:03d}Y",
        "ReconstructionDiameter": f"{min(nx * sx, ny * sy):.1f}",
        "XRayTubeCurrent": v.tube_current,
        "ConvolutionKernel": v.kernel,
        "PatientPosition": "HFS",
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "Rows": ny,
        "Columns": nx,
        "XYSpacing": f"[{sx!r}, {sy!r}]",
        "RescaleIntercept": v.intercept,
        "RescaleSlope": 1,
        "RescaleType": "HU",
        "NumberofSlices": nz,
        "ZSpacing": repr(sz),
        "StudyDate": v.study_date,
    }
    return [values.get(c, "") for c in METADATA_COLUMNS]


def _check_args(n_patients: int, shape: Sequence[int], spacing: Sequence[float], seed: int, workers: int):
    if isinstance(n_patients, bool) or not isinstance(n_patients, (int, np.integer)) or n_patients < 2:
        raise ValueError(
            f"n_patients must be an integer >= 2 (one train and one valid patient), got {n_patients!r}"
        )
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 integers >= 8 (X, Y, Z voxels), got {shape!r}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be 3 positive millimetre values, got {spacing!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    return shape, spacing


def generate(
    out: str | Path,
    *,
    n_patients: int = 300,
    shape: tuple[int, int, int] = (128, 128, 48),
    spacing: tuple[float, float, float] = (2.75, 2.75, 5.0),
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
    test_patients: int = 0,
    context_strength: float = 1.0,
    context_grid: ContextGrid | Sequence[int | None] | None = None,
) -> Path:
    """Write a synthetic CT-RATE snapshot under ``out/dataset/`` and return that ``dataset`` path.

    Beside it, outside CT-RATE's format, ``out/truth/`` holds the lesion truth (``lesions.csv`` and one
    ``masks/<VolumeName>.npz`` per written volume; see :mod:`ctlib.synthetic.truth` and DATA.md).

    Args:
        out: folder that receives ``dataset/`` (created if needed).
        n_patients: patients over both splits (~85% ``train_*``, ~15% ``valid_*``), >= 2.
        shape: voxels ``(X, Y, Z)`` of every volume.
        spacing: voxel size ``(SX, SY, SZ)`` in mm (metadata ``XYSpacing`` and ``ZSpacing``).
        seed: the same seed gives the same CSV bytes and voxel arrays, whatever ``workers``.
        workers: processes that render volumes (a multiprocessing pool when > 1).
        progress: show a tqdm bar while writing volumes.
        overwrite: replace an existing non-empty ``dataset/`` (refused otherwise).
        test_patients: held-out test patients added after the ``n_patients`` (one chest volume each, named
            as CT-RATE ``valid_*`` patients), listed in ``out/test_patients.txt`` (outside CT-RATE's
            format), which :func:`ctlib.split.fixed_split` puts in the test split.
        context_strength: the lung-nodule cue's strength lambda in [0, 1] (:mod:`ctlib.synthetic.column`).
        context_grid: the model's slice grid the nodule columns align to: a
            :class:`~ctlib.synthetic.column.ContextGrid` or ``(group, first, stop)``; None: 2 generated slices
            per model slice, the central two thirds kept (the demo's and smoke's preprocessing).

    Returns:
        The ``out/dataset`` path.

    Raises:
        ValueError: a bad argument (named in the message).
        FileExistsError: ``out/dataset`` exists, is not empty and ``overwrite`` is False.
    """
    shape, spacing = _check_args(n_patients, shape, spacing, seed, workers)
    if isinstance(test_patients, bool) or not isinstance(test_patients, (int, np.integer)) or test_patients < 0:
        raise ValueError(f"test_patients must be a non-negative integer, got {test_patients!r}")
    if context_grid is not None and not isinstance(context_grid, ContextGrid):
        context_grid = ContextGrid(*context_grid)
    context = Context(float(context_strength), context_grid or ContextGrid())
    root = Path(out) / "dataset"
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{root} exists and is not empty; pass overwrite=True (--overwrite) to replace it"
            )
        shutil.rmtree(root)
    if (root.parent / TRUTH_DIR).exists():  # the lesion truth of an earlier snapshot here
        shutil.rmtree(root.parent / TRUTH_DIR)
    (root.parent / TEST_PATIENTS_TXT).unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    vols = plan(int(n_patients), int(seed), int(test_patients))
    if test_patients:
        held = sorted({parse_volume_name(v.name)["patient"] for v in vols if v.held_out},
                      key=lambda p: int(p.rsplit("_", 1)[1]))
        (root.parent / TEST_PATIENTS_TXT).write_text("".join(f"{p}\n" for p in held), encoding="utf-8")

    for split in ("train", "valid"):
        sv = [v for v in vols if v.split == split]
        _write_csv(root / LABELS_CSV[split], LABEL_COLUMNS, [[v.name, *v.labels] for v in sv])
        _write_csv(
            root / METADATA_CSV[split], METADATA_COLUMNS, [_metadata_row(v, shape, spacing) for v in sv]
        )
        _write_csv(root / REPORTS_CSV[split], REPORT_COLUMNS, [[v.name, v.clinical, *report(v)] for v in sv])
        nc = root / NO_CHEST_TXT[split]
        nc.parent.mkdir(parents=True, exist_ok=True)
        nc.write_text("".join(f"{v.name}\n" for v in sv if v.kind != "chest"), encoding="utf-8")

    # ``_write_volume`` lives in an importable module (not ``__main__``), so pool workers can unpickle it
    # even when the generator runs as ``python -m ctlib.synthetic``.
    fn = _write_volume
    tasks = [(v, shape, spacing, str(root), context) for v in vols if v.written]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(tasks), desc="synthetic CT volumes", unit="vol", disable=not progress)
    rows: dict[str, list[list]] = {}
    try:
        if workers == 1 or len(tasks) <= 1:
            for t in tasks:
                rows[t[0].name] = fn(t)
                bar.update()
        else:
            # A worker that dies raises BrokenProcessPool here (a multiprocessing.Pool would respawn it
            # forever); results do not depend on which worker renders which volume.
            with ProcessPoolExecutor(min(int(workers), len(tasks)), mp_context=_mp_context()) as pool:
                futures = {pool.submit(fn, t): t[0].name for t in tasks}
                for fut in as_completed(futures):
                    rows[futures[fut]] = fut.result()
                    bar.update()
    finally:
        bar.close()
    write_lesions_csv(root.parent, [r for t in tasks for r in rows[t[0].name]])
    return root


def _mp_context() -> multiprocessing.context.BaseContext:
    """forkserver (safe when the parent holds threads, e.g. torch) when the parent's ``__main__`` can
    be re-imported by the workers; otherwise (a script read from stdin) fork; spawn elsewhere."""
    methods = multiprocessing.get_all_start_methods()
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    importable = getattr(main, "__spec__", None) is not None or path is None or os.path.exists(path)
    if "forkserver" in methods and importable:
        return multiprocessing.get_context("forkserver")
    if "fork" in methods:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m ctlib.synthetic --out DIR [--patients N] ...``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m ctlib.synthetic",
        description=(
            "Write a synthetic CT-RATE snapshot (DIR/dataset/) of chest CT phantoms: train/ and valid/ "
            "trees of int16 .nii.gz volumes with blank headers and raw scanner values (HU = stored + "
            "RescaleIntercept from the metadata CSV; -1024 mostly, a few -8192), a few train_fixed/ "
            "re-uploads already in HU, repeat scans and second reconstructions, the multi-abnormality "
            "labels CSVs of the 18 CT-RATE classes (prevalence as in the paper's Table 1, realistic "
            "co-occurrence, some rows without a downloaded file), metadata and radiology report CSVs, and "
            "no_chest_*.txt lists naming a head/abdomen phantom per split. Every labelled abnormality is "
            "drawn with its own signature (see DATA.md and ctlib.synthetic.SIGNATURES); lung nodules and lymph "
            "nodes need neighbouring slices to be told from vessels. Lesion truth goes to DIR/truth/."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", required=True, type=Path, help="folder that receives dataset/")
    parser.add_argument("--patients", type=int, default=300, help="number of patients (train + valid)")
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=(128, 128, 48),
        metavar=("X", "Y", "Z"),
        help="voxels per volume",
    )
    parser.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=(2.75, 2.75, 5.0),
        metavar=("SX", "SY", "SZ"),
        help="voxel size in mm",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same snapshot)")
    parser.add_argument("--test-patients", type=int, default=0,
                        help="held-out test patients added (one volume each; listed in DIR/test_patients.txt)")
    parser.add_argument("--context-strength", type=float, default=1.0,
                        help="strength lambda in [0, 1] of the lung-nodule cue (0: positives = negatives)")
    parser.add_argument("--context-grid", type=int, nargs=3, default=None, metavar=("GROUP", "FIRST", "STOP"),
                        help="generated slices per model slice and the model slices kept [FIRST, STOP) "
                             "(default: 2 and the central two thirds)")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering volumes")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty DIR/dataset")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        root = generate(
            args.out,
            n_patients=args.patients,
            shape=tuple(args.shape),
            spacing=tuple(args.spacing),
            seed=args.seed,
            workers=args.workers,
            progress=not args.quiet,
            overwrite=args.overwrite,
            test_patients=args.test_patients,
            context_strength=args.context_strength,
            context_grid=args.context_grid,
        )
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(root)
    return 0

