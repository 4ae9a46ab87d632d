"""Benchmark: reading a prepared volume from the cache vs decoding and preprocessing the ``.nii.gz``.

Writes a few CT-RATE-size volumes (512x512x~240 int16, gzip-compressed, blank headers, raw scanner values)
into a temporary snapshot, prepares the cache with the paper's preprocessing (214x214x240, centre 100
slices) and prints volumes per second for

  (a) cache:  ``PreparedVolumes[i]`` (np.load memory map -> float32 torch tensor), touching all data;
  (b) source: ``read_hu`` (gunzip + NIfTI decode + HU conversion) + ``preprocess`` + torch tensor;

and their ratio (target: cache >= 20x faster). Both read from the OS page cache (files just written),
so (a) is the best case of a warm cache and (b) is pure decode + compute.

Usage: ``python benchmarks/bench_cache.py [--volumes N] [--source auto|own|synthetic]``.
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ctlib.cache import PreparedVolumes, cache_dir, prepare
from ctlib.data import CLASSES, load_cohort, read_hu
from ctlib.preprocess import Preprocessing, preprocess

SHAPE = (512, 512, 240)
SPACING = (0.7, 0.7, 1.25)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], coarse: tuple[int, int, int]) -> np.ndarray:
    """Smooth random field in about [-1, 1]: coarse noise, trilinearly upsampled (float32)."""
    field = torch.from_numpy(rng.standard_normal(coarse, dtype=np.float32))[None, None]
    out = torch.nn.functional.interpolate(field, size=shape, mode="trilinear", align_corners=False)
    return out[0, 0].numpy()


def body_phantom(seed: int, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """A chest-like HU volume (X, Y, Z): body, fat, tapering lungs with texture, spine, heart, table, noise.

    Not anatomy, but structured and noisy like a scan, so that gzip has real work to do.
    """
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x = np.linspace(-1, 1, nx, dtype=np.float32)[:, None]
    y = np.linspace(-1, 1, ny, dtype=np.float32)[None, :]
    r2 = x**2 + y**2
    texture = _smooth_noise(rng, shape, (nx // 16, ny // 16, max(2, nz // 16)))
    ax, ay = 0.8 + 0.05 * rng.standard_normal(), 0.6 + 0.05 * rng.standard_normal()
    static = np.full((nx, ny), -1000.0, dtype=np.float32)
    body = (x / ax) ** 2 + (y / ay) ** 2
    static[body <= 1.0] = -100.0  # fat
    static[body <= 0.85] = 45.0  # muscle / mediastinum
    hu = np.repeat(static[:, :, None], nz, axis=2)
    for z in range(nz):
        lung_r = 0.25 + 0.12 * math.sin(math.pi * min(1.0, 0.2 + z / max(1, nz - 1)))  # tapers to the apex
        for cx in (-0.33, 0.33):
            hu[((x - cx) / lung_r) ** 2 + ((y + 0.02) / (lung_r * 1.5)) ** 2 <= 1, z] = -860.0
    overlay = np.zeros((nx, ny), dtype=np.float32)
    overlay[(x / 0.1) ** 2 + ((y - 0.42) / 0.1) ** 2 <= 1] = 700.0  # vertebral body
    overlay[((x - 0.08) / 0.2) ** 2 + ((y + 0.2) / 0.16) ** 2 <= 1] = 40.0  # heart
    overlay[(np.abs(y - 0.72) < 0.02) & (np.abs(x) < 0.7)] = 200.0  # table
    np.copyto(hu, overlay[:, :, None], where=(overlay != 0)[:, :, None])
    lungs = hu < -500
    texture *= np.where(lungs, np.float32(60.0), np.float32(25.0))
    hu += texture
    hu += rng.standard_normal(shape, dtype=np.float32) * np.float32(12.0)
    hu[r2 > 1, :] = -3024.0  # outside the circular reconstruction field of view
    return hu


def _own_snapshot(root: Path, n: int) -> pd.DataFrame:
    """Write n original volumes (raw = HU + 1024, blank header) and the cohort rows to read them."""
    import nibabel as nib

    rows = []
    for i in range(n):
        name = f"train_{i + 1}_a_1.nii.gz"
        path = root / "dataset" / "train" / f"train_{i + 1}" / f"train_{i + 1}_a" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = np.round(body_phantom(i) + 1024).astype(np.int16)
        nib.save(nib.Nifti1Image(raw, None), path)
        rows.append({"VolumeName": name, "path": str(path), "hu_ready": False, "RescaleSlope": 1.0,
                     "RescaleIntercept": -1024.0, "XYSpacing": SPACING[0], "ZSpacing": SPACING[2],
                     **dict.fromkeys(CLASSES, 0)})
    return pd.DataFrame(rows)


def _synthetic_snapshot(root: Path, n: int) -> pd.DataFrame:
    """Use ``ctlib.synthetic.generate`` at CT-RATE size when it exists; raises if it cannot be used."""
    from ctlib import synthetic

    generate: Callable = synthetic.generate
    params = inspect.signature(generate).parameters
    count = next((p for p in ("n_patients", "patients", "n_volumes", "n") if p in params), None)
    kwargs = {"shape": SHAPE, "spacing": SPACING}
    if count is not None:
        kwargs[count] = n
    generate(root, **kwargs)
    cohort = load_cohort(root)
    if len(cohort) < n:
        raise RuntimeError(f"ctlib.synthetic.generate wrote {len(cohort)} volumes, need {n}")
    return cohort.iloc[:n].reset_index(drop=True)


def _timed(fn: Callable[[int], object], n: int, rounds: int) -> float:
    """Best-of-rounds volumes per second of fn(0..n-1)."""
    best = math.inf
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, time.perf_counter() - t0)
    return n / best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--volumes", type=int, default=4, help="number of 512x512x240 volumes (default: 4)")
    parser.add_argument("--source", choices=("auto", "own", "synthetic"), default="auto",
                        help="volumes from ctlib.synthetic.generate (auto: if usable) or this script's phantom")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds, best kept (default: 3)")
    args = parser.parse_args(argv)
    if args.volumes < 1 or args.rounds < 1:
        parser.error("--volumes and --rounds must be at least 1")
    torch.set_num_threads(1)  # one volume per core, as prepare/DataLoader workers run

    prep = Preprocessing()  # the paper's: 214x214x240, centre 100 slices, [-1000, 1000] HU
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        root = Path(tmp) / "snap"
        t0 = time.perf_counter()
        cohort, source = None, "own phantom"
        if args.source in ("auto", "synthetic"):
            try:
                cohort, source = _synthetic_snapshot(root, args.volumes), "ctlib.synthetic.generate"
            except Exception as err:  # module absent or different API: fall back
                if args.source == "synthetic":
                    raise
                print(f"(ctlib.synthetic not usable here: {type(err).__name__}: {err}; using own phantom)")
                root = Path(tmp) / "own"
        if cohort is None:
            cohort = _own_snapshot(root, args.volumes)
        print(f"wrote {len(cohort)} volumes from {source} in {time.perf_counter() - t0:.1f} s")

        gz_mb = np.mean([Path(p).stat().st_size for p in cohort["path"]]) / 2**20
        shapes = {tuple(read_hu(cohort.iloc[0]).shape)}

        t0 = time.perf_counter()
        report = prepare(cohort, Path(tmp) / "cache", prep, workers=1, progress=False)
        if report.failed:
            print(report.summary())
            return 1
        prepare_s = time.perf_counter() - t0
        dataset = PreparedVolumes(cache_dir(Path(tmp) / "cache", prep), cohort)
        npy_mb = np.mean([p.stat().st_size for p in dataset.cache_dir.glob("*.npy")]) / 2**20

        def from_cache(i: int) -> None:
            volume, _, _ = dataset[i]
            volume.sum()  # touch every value

        def from_source(i: int) -> None:
            x = torch.from_numpy(preprocess(read_hu(cohort.iloc[i]), size=prep.size, num_slices=prep.num_slices,
                                            hu_range=prep.hu_range))
            x.sum()

        n = len(cohort)
        cache_rate = _timed(from_cache, n, args.rounds * 5)
        source_rate = _timed(from_source, n, args.rounds)

    print(f"source volume: {shapes.pop()} int16, {gz_mb:.0f} MB .nii.gz; cached: {prep.shape} float16, "
          f"{npy_mb:.1f} MB; preprocessing {prep.key}")
    print(f"prepare (1 worker): {n / prepare_s:.2f} volumes/s")
    print(f"(a) cache  (np.load mmap -> float32 tensor):        {cache_rate:9.1f} volumes/s")
    print(f"(b) source (.nii.gz -> read_hu -> preprocess):     {source_rate:9.2f} volumes/s")
    ratio = cache_rate / source_rate
    print(f"ratio (a)/(b): {ratio:.0f}x  (target >= 20x: {'met' if ratio >= 20 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
