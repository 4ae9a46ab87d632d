"""Reference-millimetre grids, partial-volume primitives (tubes, ellipsoids) and smooth random fields.

Everything is computed in millimetres of a reference frame (352 mm in-plane field of view, 240 mm z
coverage) mapped onto the requested shape and spacing, so that a seed gives the same patient at any
resolution (see DATA.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

F32 = np.float32
_REF_FOV_XY = 352.0  # mm, in-plane field of view of the reference frame
_REF_FOV_Z = 240.0  # mm, z coverage of the reference frame
ZC = 72.0  # lesions lie within |z| <= ZC (reference mm): the central two thirds, with a margin
HU_OUTSIDE_FOV = -3024

# ---------------------------------------------------------------------------------------------
# geometry: a grid in reference millimetres and partial-volume primitives
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """Voxel centres in reference mm: ``x`` (patient right->left), ``y`` (anterior->posterior), ``z``
    (caudal->cranial); ``h`` in-plane pixel size, ``hz`` slice spacing, ``zsub`` offsets that sample
    each slab in z for small objects."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    h: float
    hz: float
    zsub: np.ndarray

    @classmethod
    def make(
        cls, shape: Sequence[int], spacing: Sequence[float], shift: Sequence[float] = (0.0, 0.0, 0.0)
    ) -> Grid:
        nx, ny, nz = (int(v) for v in shape)
        sx, sy, sz = (float(v) for v in spacing)
        sxy = min(nx * sx, ny * sy) / _REF_FOV_XY
        szz = nz * sz / _REF_FOV_Z
        x = ((np.arange(nx) - (nx - 1) / 2) * sx / sxy - shift[0]).astype(F32)
        y = ((np.arange(ny) - (ny - 1) / 2) * sy / sxy - shift[1]).astype(F32)
        z = ((np.arange(nz) - (nz - 1) / 2) * sz / szz - shift[2]).astype(F32)
        h = 0.5 * (sx + sy) / sxy
        hz = sz / szz
        nsub = int(np.clip(round(hz / h), 1, 4))
        zsub = (((np.arange(nsub) + 0.5) / nsub - 0.5) * hz).astype(F32)
        return cls(x, y, z, h, hz, zsub)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.x), len(self.y), len(self.z))

    @property
    def X(self) -> np.ndarray:  # noqa: N802 - a coordinate grid, named like one
        return self.x[:, None, None]

    @property
    def Y(self) -> np.ndarray:  # noqa: N802
        return self.y[None, :, None]

    @property
    def Z(self) -> np.ndarray:  # noqa: N802
        return self.z[None, None, :]

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice] | None:
        """Index slices of the voxels whose centres lie in the box ``[lo, hi]`` (None if empty)."""
        out = []
        for ax, a, b in zip((self.x, self.y, self.z), lo, hi, strict=True):
            n = len(ax)
            if n == 0:
                return None
            o = float(ax[0])
            d = float(ax[1]) - o if n > 1 else 1.0
            i0 = max(0, math.ceil((a - o) / d - 1e-6))
            i1 = min(n, math.floor((b - o) / d + 1e-6) + 1)
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return out[0], out[1], out[2]

    def sub(self, sl: tuple[slice, slice, slice]) -> Grid:
        return Grid(self.x[sl[0]], self.y[sl[1]], self.z[sl[2]], self.h, self.hz, self.zsub)


def cover(dist: np.ndarray, r: float | np.ndarray, h: float) -> np.ndarray:
    """Partial-volume coverage ``(bx, by, bz)`` of a pixel of width ``h`` whose centre lies at
    ``dist`` ``(bx, by, bz, nsub)`` from the axis of an object of half-width ``r`` (1D box model),
    averaged over the z sub-samples."""
    c = (np.minimum(dist + 0.5 * h, r) - np.maximum(dist - 0.5 * h, -r)) * (1.0 / h)
    np.clip(c, 0.0, 1.0, out=c)
    if c.shape[-1] == 1:
        return c[..., 0]
    if c.shape[-1] == 2:
        return (c[..., 0] + c[..., 1]) * 0.5
    return c.mean(axis=-1)


def _local(g: Grid, sl: tuple[slice, slice, slice], c: Sequence[float]):
    """Coordinates relative to ``c`` inside ``sl``, shaped ``(bx,1,1,1)``, ``(1,by,1,1)``, ``(1,1,bz,ns)``."""
    X = g.x[sl[0]][:, None, None, None] - float(c[0])  # noqa: N806
    Y = g.y[sl[1]][None, :, None, None] - float(c[1])  # noqa: N806
    Z = (g.z[sl[2]][:, None] + g.zsub[None, :])[None, None] - float(c[2])  # noqa: N806
    return X, Y, Z


def seg_geom(g: Grid, p0: Sequence[float], p1: Sequence[float], pad: float):
    """Distance ``(bx, by, bz, nsub)`` of the voxels near segment ``p0``-``p1`` to it, and the segment
    parameter ``t`` in [0, 1] of the nearest point; None when the box misses the grid."""
    a = [float(v) for v in p0]
    d = [float(q) - v for q, v in zip(p1, a, strict=True)]
    lo = [min(a[i], a[i] + d[i]) - pad for i in range(3)]
    hi = [max(a[i], a[i] + d[i]) + pad for i in range(3)]
    lo[2] -= 0.5 * g.hz
    hi[2] += 0.5 * g.hz
    sl = g.box(lo, hi)
    if sl is None:
        return None
    X, Y, Z = _local(g, sl, a)  # noqa: N806
    l2 = max(d[0] * d[0] + d[1] * d[1] + d[2] * d[2], 1e-9)
    t = np.clip((X * (d[0] / l2) + Y * (d[1] / l2) + Z * (d[2] / l2)), 0.0, 1.0)
    ex, ey, ez = X - t * d[0], Y - t * d[1], Z - t * d[2]
    return sl, np.sqrt(ex * ex + ey * ey + ez * ez), t


def ell_geom(g: Grid, c: Sequence[float], radii: Sequence[float], angle: float = 0.0, pad: float = 0.0):
    """Normalised radius ``q`` ``(bx, by, bz, nsub)`` of an ellipsoid (semi-axes ``radii``, rotated by
    ``angle`` about z) around ``c``; ``q < 1`` inside. None when the box misses the grid."""
    a, b, cz = (float(v) for v in radii)
    r = max(a, b) + pad
    rz = cz + pad + 0.5 * g.hz
    sl = g.box((c[0] - r, c[1] - r, c[2] - rz), (c[0] + r, c[1] + r, c[2] + rz))
    if sl is None:
        return None
    X, Y, Z = _local(g, sl, c)  # noqa: N806
    ca, sa = math.cos(angle), math.sin(angle)
    u = X * ca + Y * sa
    v = Y * ca - X * sa
    return sl, np.sqrt((u / a) ** 2 + (v / b) ** 2 + (Z / cz) ** 2)


def lerp(arr: np.ndarray, sl, cov: np.ndarray, value: float) -> None:
    """``arr[sl]`` moves towards ``value`` by the coverage ``cov``."""
    view = arr[sl]
    view += cov * (value - view)


def maxin(acc: np.ndarray, sl, cov: np.ndarray) -> None:
    view = acc[sl]
    np.maximum(view, cov, out=view)


def draw_tubes(g: Grid, acc: np.ndarray, segs: Sequence[tuple]) -> None:
    """Max-accumulate into ``acc`` the coverage of tapered segments ``(p0, p1, r0, r1)``."""
    for p0, p1, r0, r1 in segs:
        geo = seg_geom(g, p0, p1, max(r0, r1) + g.h)
        if geo is None:
            continue
        sl, dist, t = geo
        maxin(acc, sl, cover(dist, r0 + t * (r1 - r0), g.h))


def draw_airways(
    g: Grid,
    wall_acc: np.ndarray,
    lumen_acc: np.ndarray,
    segs: Sequence[tuple],
    wall: Callable[[float], float],
) -> None:
    """Max-accumulate bronchial wall (outer radius ``wall(r)``) and lumen coverage of segments."""
    for p0, p1, r0, r1 in segs:
        o0, o1 = wall(r0), wall(r1)
        geo = seg_geom(g, p0, p1, max(o0, o1) + g.h)
        if geo is None:
            continue
        sl, dist, t = geo
        maxin(wall_acc, sl, cover(dist, o0 + t * (o1 - o0), g.h))
        maxin(lumen_acc, sl, cover(dist, r0 + t * (r1 - r0), g.h))


def polyline(points: Sequence[Sequence[float]], radii: Sequence[float]) -> list[tuple]:
    """Segments ``(p0, p1, r0, r1)`` along a polyline with one radius per point."""
    return [
        (tuple(points[i]), tuple(points[i + 1]), float(radii[i]), float(radii[i + 1]))
        for i in range(len(points) - 1)
    ]


# ---------------------------------------------------------------------------------------------
# smooth random fields and Voronoi cells on a coarse grid (resolution independent)
# ---------------------------------------------------------------------------------------------
def _lerp_axis(vals: np.ndarray, axis: int, coarse: np.ndarray, fine: np.ndarray) -> np.ndarray:
    pos = np.interp(fine, coarse, np.arange(len(coarse), dtype=np.float64))
    i0 = np.clip(np.floor(pos).astype(np.intp), 0, max(len(coarse) - 2, 0))
    w = (pos - i0).astype(F32)
    i1 = np.minimum(i0 + 1, len(coarse) - 1)
    shape = [1, 1, 1]
    shape[axis] = -1
    a = np.take(vals, i0, axis=axis)
    b = np.take(vals, i1, axis=axis)
    return a + (b - a) * w.reshape(shape)


@dataclass
class Coarse:
    """Values on a coarse regular grid, sampled onto any grid by trilinear interpolation."""

    axes: tuple[np.ndarray, np.ndarray, np.ndarray]
    vals: np.ndarray

    def sample(self, g: Grid) -> np.ndarray:
        out = _lerp_axis(self.vals, 0, self.axes[0], g.x)
        out = _lerp_axis(out, 1, self.axes[1], g.y)
        return _lerp_axis(out, 2, self.axes[2], g.z)


def coarse_axes(lo: Sequence[float], hi: Sequence[float], step: Sequence[float]):
    return tuple(np.arange(lo[i] - step[i], hi[i] + 2 * step[i], step[i], dtype=np.float64) for i in range(3))


def smooth_field(rng: np.random.Generator, lo, hi, corr: float) -> Coarse:
    """A unit-variance Gaussian random field with correlation length ~``corr`` mm over ``[lo, hi]``."""
    step = corr / 2.0
    axes = coarse_axes(lo, hi, (step, step, step))
    noise = rng.standard_normal(tuple(len(a) for a in axes)).astype(F32)
    f = ndimage.gaussian_filter(noise, 1.0, mode="reflect")
    f /= max(float(f.std()), 1e-6)
    return Coarse(axes, f)
