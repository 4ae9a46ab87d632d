"""The lung nodule as a 3D-only cue: vertical columns of round discs whose *order* along z is the finding.

Every chest has ``N_COLUMNS`` vertical columns in its lungs, each ``K`` model slices tall (a *slot* is one slice
of the model's input, ``group`` generated slices), each slot holding one round 40 HU disc. The radii of a
column are always the same multiset, ``A`` x R and ``K - A`` x r (R = r + lambda (R_max - r)):

    negative (a vessel tapering into a branch):   R R r r r    (slot 0 caudal)
    positive (a nodule threaded on a thin vessel): r R R r r

A positive volume *is* its negative twin with the first ``M = A + SHIFT`` slots of the column rotated by
``SHIFT``: the same slices in another order. So that nothing else moves with them, the chest is held still
over those ``M`` slots (rendered once on a grid ``M - 1`` slots shorter and repeated: a short cylindrical
stretch of chest, in every volume), and the noise moves with its slice. Any model that sees a volume as a set
of slices (the ResNet's mean of slice logits, the fusion's mean of slice features) therefore gets the same
input from both twins, exactly; only the order of slices along z, i.e. 3D context, tells them apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ctlib.synthetic.anatomy import Anatomy, in_lung, uniform
from ctlib.synthetic.geometry import F32, Grid

COLUMN_HU = 40.0
K = 5  # slots per column
A = 2  # slots with the large disc R
SHIFT = 1  # a positive's R run starts this many slots up the column
M = A + SHIFT  # slots over which the chest is held still (rotated in a positive)
N_COLUMNS = 4
R_THIN = (5.0, 6.0)  # mm, the thin vessel r
R_MAX = (12.0, 15.0)  # mm, the large disc at full strength
_LEVEL = (0.0, 35.0)  # reference mm: the centre of a chest's columns (mid lung)
_HALF = 20.0  # mm above and below that centre where the columns must lie in the lung (the demo's column spans
# 33 mm of chest, smoke's 72)


def radii_pattern(positive: bool) -> list[bool]:
    """Per slot (caudal first): True where the disc is the large one."""
    big = [True] * A + [False] * (K - A)
    return ([False] * SHIFT + big[: K - SHIFT]) if positive else big


def twin_order() -> list[int]:
    """Slot order of a positive within the column: its slot j is its negative twin's slot ``order[j]``."""
    return list(range(A, M)) + list(range(A)) + list(range(M, K))


@dataclass(frozen=True)
class ContextGrid:
    """Where the model's slices fall on the generated volume: ``group`` generated slices per model slice
    (target z spacing / generated z spacing; the resampling averages them) and the model slices that the
    preprocessing keeps, ``[first, stop)`` in model-slice (slot) units of the resampled volume. None: the
    central two thirds (the demo's and smoke's centre 16 of 24 and 8 of 12)."""

    group: int = 2
    first: int | None = None
    stop: int | None = None

    def resolve(self, nz: int) -> tuple[int, int, int]:
        """``(group, first, stop)`` for a volume of ``nz`` generated slices. A window narrower than the
        column falls back to every slice, a volume shorter than ``K`` model slices to ``group`` 1 (tiny test
        volumes: the column is drawn, but may then fall outside what a model keeps)."""
        g = max(1, int(self.group))
        n = nz // g
        lo = n // 6 if self.first is None else max(0, int(self.first))
        hi = n - n // 6 if self.stop is None else min(n, int(self.stop))
        if hi - lo < K:
            lo, hi = 0, n
        if n < K:
            g, lo, hi = 1, 0, nz
        return g, lo, hi


@dataclass
class Layout:
    """One chest's columns: ``k0`` first slot (model slice index in the full volume), ``zmap`` full generated
    slice -> slice of the shorter grid the chest is rendered on, columns ``(x, y, r, R)`` in reference mm."""

    group: int
    k0: int
    nz: int
    zmap: np.ndarray
    columns: list[tuple[float, float, float, float]]
    zrange: tuple[float, float] = (-1e9, 1e9)  # reference mm of the column (the shorter grid's frame)

    @property
    def nz_short(self) -> int:
        return self.nz - self.group * (M - 1)

    def slot_slices(self, j: int) -> slice:
        """Generated slices of column slot ``j`` in the full volume."""
        s = self.group * (self.k0 + j)
        return slice(s, s + self.group)

    def twin_permutation(self) -> np.ndarray:
        """Full-volume generated slice order of the positive twin: ``pos = neg[..., perm]``."""
        perm = np.arange(self.nz)
        for j, src in enumerate(twin_order()):
            perm[self.slot_slices(j)] = np.arange(self.nz)[self.slot_slices(src)]
        return perm


def _zmap(nz: int, g: int, k0: int) -> np.ndarray:
    j = np.arange(nz)
    lo, hi = g * k0, g * (k0 + M)
    return np.where(j < lo, j, np.where(j < hi, lo + (j - lo) % g, j - g * (M - 1)))


def layout(a: Anatomy, rng: np.random.Generator, shape, spacing, shift, ctx: ContextGrid,
           strength: float) -> tuple[Layout, Grid]:
    """The columns of one chest and the shorter grid to render it on."""
    nx, ny, nz = shape
    g, lo, hi = ctx.resolve(nz)
    short = Grid.make((nx, ny, nz - g * (M - 1)), spacing, shift)

    def slot_z(k0: int) -> np.ndarray:  # reference z of the generated slices of every column slot
        zm = _zmap(nz, g, k0)
        return np.concatenate([short.z[zm[g * (k0 + j): g * (k0 + j + 1)]] for j in range(K)])

    # The columns' level and places are the patient's (a repeat scan or another resolution keeps them); the
    # grid only decides which model slices come nearest that level.
    zc = uniform(rng, *_LEVEL)
    mids = {k: float(slot_z(k).mean()) for k in range(lo, hi - K + 1)}
    k0 = min(mids, key=lambda k: (abs(mids[k] - zc), k))
    zs = slot_z(k0)
    zlo, zhi = float(zs.min()) - 0.5 * short.hz, float(zs.max()) + 0.5 * short.hz
    cols: list[tuple[float, float, float, float, float]] = []
    first = int(rng.random() < 0.5)
    sides = [("R", "L")[(k + first) % 2] for k in range(N_COLUMNS)]  # alternating lungs, 2 + 2
    for side in sides:
        r = uniform(rng, *R_THIN)
        rmax = uniform(rng, *R_MAX)
        big = r + float(strength) * (rmax - r)
        p = _place(a, rng, side, zc, rmax, cols)
        cols.append((float(p[0]), float(p[1]), r, big, rmax))
    return Layout(g, k0, nz, _zmap(nz, g, k0), [c[:4] for c in cols], (zlo, zhi)), short


def _place(a: Anatomy, rng: np.random.Generator, side: str, zc: float, rmax: float, cols: list) -> np.ndarray:
    """A column's axis in the ``side`` lung: among 512 random points of the lung's box, those whose disc at full
    size (``rmax``) lies inside the lung (with 3 mm to spare, then less) at every level within ``_HALF`` of
    ``zc``; a random one with 4 mm of room to the other columns' discs (the lung margin given up before the
    room), else the one with the most room."""
    sgn = -1.0 if side == "R" else 1.0
    lo = np.array([a.bx + (a.w_med if sgn > 0 else -a.ca), a.cyc - a.cb])
    hi = np.array([a.bx + (a.ca if sgn > 0 else -a.w_med), a.cyc + a.cb])
    xy = lo + rng.random((512, 2)) * (hi - lo)
    levels = np.linspace(zc - _HALF, zc + _HALF, 9)
    pts = np.concatenate([np.repeat(xy, len(levels), axis=0), np.tile(levels, len(xy))[:, None]], axis=1)
    room = np.full(len(xy), np.inf)
    for q in cols:
        room = np.minimum(room, np.hypot(xy[:, 0] - q[0], xy[:, 1] - q[1]) - rmax - q[4])
    for spare in (1.0, -2.0, -6.0, -rmax):  # the disc inside the lung, then less and less so
        inside = in_lung(a, pts, rmax + spare).reshape(len(xy), len(levels)).all(axis=1)
        good = np.flatnonzero(inside & (room > 4.0))
        if good.size:
            k = int(good[0])
            break
    else:  # no room anywhere: the most room (columns may touch)
        k = int(np.argmax(np.where(inside, room, room - 1e3)))
    return np.array([xy[k, 0], xy[k, 1], zc])


def disc_cover(grid: Grid, x: float, y: float, rad: float) -> tuple[tuple[slice, slice], np.ndarray]:
    """In-plane partial-volume coverage of a disc (1D box model on the radial distance, as the tubes)."""
    pad = rad + grid.h
    i0 = max(0, int(np.searchsorted(grid.x, x - pad)))
    i1 = int(np.searchsorted(grid.x, x + pad, side="right"))
    j0 = max(0, int(np.searchsorted(grid.y, y - pad)))
    j1 = int(np.searchsorted(grid.y, y + pad, side="right"))
    d = np.hypot(grid.x[i0:i1, None] - x, grid.y[None, j0:j1] - y)
    h = grid.h
    cov = np.clip((np.minimum(d + 0.5 * h, rad) - np.maximum(d - 0.5 * h, -rad)) / h, 0.0, 1.0).astype(F32)
    return (slice(i0, i1), slice(j0, j1)), cov


def paint(hu: np.ndarray, grid: Grid, lay: Layout) -> None:
    """Paint the negative twin's discs into the full-z HU volume ``hu`` (X, Y, Z)."""
    pattern = radii_pattern(False)
    for x, y, r, big in lay.columns:
        for j in range(K):
            (sx, sy), cov = disc_cover(grid, x, y, big if pattern[j] else r)
            view = hu[sx, sy, lay.slot_slices(j)]
            view += cov[:, :, None] * (COLUMN_HU - view)


def nodule_parts(grid: Grid, lay: Layout) -> list[tuple[tuple[slice, slice, slice], np.ndarray]]:
    """Truth of a positive: per column, the large discs (voxels at least half covered) in the positive's order."""
    pattern = radii_pattern(True)
    slots = [j for j in range(K) if pattern[j]]
    z = slice(lay.slot_slices(slots[0]).start, lay.slot_slices(slots[-1]).stop)
    out = []
    for x, y, _, big in lay.columns:
        (sx, sy), cov = disc_cover(grid, x, y, big)
        region = cov >= 0.5
        if not region.any():
            region = cov >= cov.max()
        out.append(((sx, sy, z), np.repeat(region[:, :, None], z.stop - z.start, axis=2)))
    return out


def keep_clear(lay: Layout) -> Any:
    """An ``avoid`` predicate for focal lung lesions: points within R_max + 10 mm of a column (its z range
    widened by 20 mm), so that no lesion covers a disc."""
    zlo, zhi = lay.zrange[0] - 20.0, lay.zrange[1] + 20.0

    def near(p: np.ndarray) -> np.ndarray:
        out = np.zeros(len(p), bool)
        inz = (p[:, 2] > zlo) & (p[:, 2] < zhi)
        for x, y, _, _ in lay.columns:
            out |= inz & (np.hypot(p[:, 0] - x, p[:, 1] - y) < R_MAX[1] + 10.0)
        return out

    return near
