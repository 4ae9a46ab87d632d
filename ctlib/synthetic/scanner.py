"""The scanner: reconstruction kernels (PSF, edge enhancement), correlated noise, the circular field of
view, and one volume end to end (:func:`render_volume`, :func:`phantom`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
from scipy import ndimage

import ctlib.synthetic.column as column
from ctlib.data import CLASSES
from ctlib.synthetic.anatomy import Anatomy, child_rng, sample_anatomy, uniform
from ctlib.synthetic.chest import render_chest
from ctlib.synthetic.geometry import F32, HU_OUTSIDE_FOV, Grid
from ctlib.synthetic.lesions import prepare_lesions
from ctlib.synthetic.render import render_abdomen, render_head
from ctlib.synthetic.truth import Truth

_NODULE = CLASSES.index("Lung nodule")


@dataclass(frozen=True)
class Context:
    """The lung-nodule cue's settings: ``strength`` lambda in [0, 1] (R = r + lambda (R_max - r); 0: a
    positive and its negative twin are the same volume up to the order of identical slices) and the model's
    slice ``grid`` (:class:`ctlib.synthetic.column.ContextGrid`)."""

    strength: float = 1.0
    grid: column.ContextGrid = column.ContextGrid()

    def __post_init__(self) -> None:
        if not (isinstance(self.strength, (int, float)) and 0.0 <= float(self.strength) <= 1.0):
            raise ValueError(f"context strength must be in [0, 1], got {self.strength!r}")


KERNELS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    # manufacturer: (soft kernels, sharp kernels, models)
    "SIEMENS": (
        ("B30f", "Br40d", "I30f"),
        ("B70f", "Bl57d", "Br64d"),
        ("SOMATOM Definition Edge", "SOMATOM go.Up", "SOMATOM Force"),
    ),
    "Philips": (("B", "C"), ("YB", "L", "D"), ("Ingenuity CT", "Brilliance 64", "IQon - Spectral CT")),
    "GE MEDICAL SYSTEMS": (
        ("STANDARD", "SOFT"),
        ("LUNG", "BONE"),
        ("Revolution EVO", "Optima CT660", "LightSpeed VCT"),
    ),
    "TOSHIBA": (("FC07", "FC18"), ("FC51", "FC86"), ("Aquilion Prime", "Aquilion ONE")),
}


def finish(hu: np.ndarray, spacing: Sequence[float], sharp: bool, r: np.random.Generator) -> np.ndarray:
    """Apply the reconstruction kernel (PSF, edge enhancement), correlated noise and the circular
    field of view (-3024 HU outside); returns int16 HU ``(X, Y, Z)``."""
    sx, sy = float(spacing[0]), float(spacing[1])
    psf = uniform(r, 0.45, 0.6) if sharp else uniform(r, 0.9, 1.2)
    sd = uniform(r, 15, 20) if sharp else uniform(r, 10, 14)
    # The noise goes through the same kernel as the image (in-plane correlated): scale it so that
    # its final sd is ``sd``, measured once on a small white-noise patch through the same filters.
    sig = (psf / sx, psf / sy, 0.0)
    sig_e = (1.6 / sx, 1.6 / sy, 0.0)

    def kernel(v: np.ndarray) -> np.ndarray:
        v = ndimage.gaussian_filter(v, sig, truncate=3.0, mode="nearest")
        if sharp:  # edge enhancement of a sharp (lung/bone) kernel
            v += 0.35 * (v - ndimage.gaussian_filter(v, sig_e, truncate=3.0, mode="nearest"))
        return v

    probe = kernel(np.random.default_rng(0).standard_normal((48, 48, 1)).astype(F32))[8:-8, 8:-8]
    noise = r.standard_normal(hu.shape, dtype=F32)
    hu += noise * (sd / max(float(probe.std()), 1e-6))
    hu = kernel(hu)
    nx, ny = hu.shape[:2]
    xr = (np.arange(nx) - (nx - 1) / 2) * sx
    yr = (np.arange(ny) - (ny - 1) / 2) * sy
    radius = 0.5 * min(nx * sx, ny * sy)
    outside = (xr[:, None] ** 2 + yr[None, :] ** 2) > radius**2
    hu[outside] = HU_OUTSIDE_FOV
    return np.rint(np.clip(hu, HU_OUTSIDE_FOV, 20000.0)).astype(np.int16)


def render_volume(
    kind: str,
    labels: Sequence[int],
    base: Sequence[int],
    scan: int,
    recon: int,
    age: float,
    sex: str,
    shape: Sequence[int],
    spacing: Sequence[float],
    sharp: bool,
    context: Context | None = None,
) -> tuple[np.ndarray, Anatomy, dict[str, dict[str, Any]], Grid, Truth]:
    """One volume: int16 HU ``(X, Y, Z)``, its anatomy, lesions, grid and lesion truth. Anatomy and lesions
    depend on the patient (``base``), the position jitter on the scan, noise and kernel on the reconstruction.

    A chest also gets its lung-nodule columns (:mod:`ctlib.synthetic.column`) on ``context``'s slice grid:
    it is rendered on a grid ``M - 1`` model slices shorter, the slices of the column's first ``M`` slots
    repeated, the negative twin's discs painted, the noise added; a positive is then its negative twin with
    those slots rotated. The returned grid's ``z`` is the reference level of every slice (the column's still
    slots repeat one level)."""
    context = Context() if context is None else context
    a = sample_anatomy(child_rng(*base, 1), age, sex)
    shift = child_rng(*base, scan, 2).normal(0.0, 1.0, 3) * np.array([3.0, 3.0, 5.0])
    g = Grid.make(shape, spacing, shift)
    les: dict[str, dict[str, Any]] = {}
    truth = Truth(g.shape)
    lay = None
    if kind == "chest":
        lay, short = column.layout(a, child_rng(*base, 7), tuple(shape), spacing, shift, context.grid,
                                   context.strength)
        les = prepare_lesions(a, labels, base, keep_clear=[column.keep_clear(lay)])
        hu_short = render_chest(a, les, short, truth := Truth(short.shape))
        hu = np.ascontiguousarray(hu_short[:, :, lay.zmap])
        truth = truth.expand_z(lay.zmap)
        column.paint(hu, g, lay)
        # the returned grid says where each slice lies in the chest: the still slots repeat one level (its z
        # is not uniform there, so not for Grid.box)
        g = Grid(g.x, g.y, short.z[lay.zmap], g.h, short.hz, short.zsub)
    elif kind == "abdomen":
        hu = render_abdomen(a, child_rng(*base, scan, 4), g)
    elif kind == "head":
        hu = render_head(child_rng(*base, scan, 4), g)
    else:
        raise ValueError(f"unknown phantom kind {kind!r}; expected 'chest', 'abdomen' or 'head'")
    out = finish(hu, spacing, sharp, child_rng(*base, scan, recon, 3))
    if lay is not None and labels[_NODULE]:
        out = np.ascontiguousarray(out[:, :, lay.twin_permutation()])
        for sl, region in column.nodule_parts(g, lay):
            truth.add("Lung nodule", sl, region)
    if lay is not None:
        a.columns = lay
    return out, a, les, g, truth


def phantom(
    labels: Mapping[str, int] | Sequence[int] = (),
    *,
    shape: Sequence[int] = (128, 128, 48),
    spacing: Sequence[float] = (2.75, 2.75, 5.0),
    seed: int = 0,
    kind: str = "chest",
    sharp: bool = False,
    age: float = 60.0,
    sex: str = "M",
    context: Context | None = None,
) -> SimpleNamespace:
    """One volume with forced labels (a mapping class -> 0/1, or 18 values): for tests and looks.
    Returns ``hu`` (int16 ``(X, Y, Z)``), ``anatomy``, ``lesions``, ``grid`` and ``truth`` (the lesion
    recorder: ``truth.mask()`` uint32 ``(X, Y, Z)``); the anatomy and noise depend only on ``seed``, so two
    calls differing in labels differ exactly by the lesions."""
    if isinstance(labels, Mapping):
        unknown = set(labels) - set(CLASSES)
        if unknown:
            raise ValueError(f"unknown classes {sorted(unknown)}")
        vec = [int(labels.get(c, 0)) for c in CLASSES]
    else:
        vec = [int(v) for v in labels] or [0] * len(CLASSES)
        if len(vec) != len(CLASSES):
            raise ValueError(f"expected {len(CLASSES)} labels, got {len(vec)}")
    hu, a, les, g, truth = render_volume(kind, vec, (seed, 9, 1), 0, 1, age, sex, shape, spacing, sharp, context)
    return SimpleNamespace(hu=hu, anatomy=a, lesions=les, grid=g, truth=truth)
