"""Rendering: the HU volume (X, Y, Z) of a chest (with its lesions), an abdomen or a head phantom, before
the scanner's kernel and noise."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ctlib.synthetic.anatomy import Anatomy, cavity_depth, uniform
from ctlib.synthetic.geometry import (
    F32,
    Grid,
    cover,
    ell_geom,
    lerp,
    polyline,
    seg_geom,
)


# ---------------------------------------------------------------------------------------------
# rendering: HU volumes (X, Y, Z) before noise
# ---------------------------------------------------------------------------------------------
def paint_tubes(
    g: Grid,
    hu: np.ndarray,
    env: np.ndarray | None,
    segs,
    value: float,
    margin: float,
    *,
    lumen: float | None = None,
    lumen_value: float = -1000.0,
    wall: Callable | None = None,
) -> None:
    """Paint tapered segments ``(p0, p1, r0, r1)`` with ``value`` into ``hu`` (an air lumen of radius
    ``lumen`` mm, or ``wall(r)`` as outer radius around a lumen r) and mark ``env`` (the mediastinal
    envelope that the lungs cannot enter) within ``margin`` mm."""
    for p0, p1, r0, r1 in segs:
        o0, o1 = (wall(r0), wall(r1)) if wall is not None else (r0, r1)
        geo = seg_geom(g, p0, p1, max(o0, o1) + margin + g.h)
        if geo is None:
            continue
        sl, dist, t = geo
        ro = o0 + t * (o1 - o0)
        lerp(hu, sl, cover(dist, ro, g.h), value)
        if wall is not None:
            lerp(hu, sl, cover(dist, r0 + t * (r1 - r0), g.h), lumen_value)
        elif lumen is not None:
            lerp(hu, sl, cover(dist, lumen, g.h), lumen_value)
        if env is not None:
            env[sl] |= (dist < ro + margin).mean(axis=-1) > 0.5


def paint_ellipsoid(
    g: Grid,
    hu: np.ndarray,
    env: np.ndarray | None,
    c,
    radii,
    value: float,
    angle: float = 0.0,
    margin: float = 0.0,
    grow: float = 0.0,
) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """Paint an ellipsoid grown by ``grow`` mm (approximately) and mark ``env`` within ``margin``; returns
    its slices and coverage ``(bx, by, bz)`` (None when it misses the grid)."""
    rm = min(radii)
    geo = ell_geom(g, c, radii, angle, pad=grow + margin + g.h)
    if geo is None:
        return None
    sl, q = geo
    d = q * rm
    cov = cover(d, rm + grow, g.h)
    lerp(hu, sl, cov, value)
    if env is not None:
        env[sl] |= (d < rm + grow + margin).mean(axis=-1) > 0.5
    return sl, cov


def ell_cover(g: Grid, c, radii, angle: float = 0.0):
    geo = ell_geom(g, c, radii, angle, pad=g.h)
    if geo is None:
        return None
    sl, q = geo
    rm = min(radii)
    return sl, cover(q * rm, rm, g.h)


def airway_wall(extra: float) -> Callable[[float], float]:
    """Outer radius of a bronchus of lumen radius r (normal wall ~20% of the lumen + 0.6 mm)."""
    return lambda r: 1.25 * r + 0.6 + extra


def paint_bones(a: Anatomy, g: Grid, hu: np.ndarray) -> None:
    """Spine (body, discs, canal, posterior elements), ribs (oblique, with cartilage) and sternum."""
    X2, Y2 = g.x[:, None], g.y[None, :]  # noqa: N806
    # vertebral body: cortex and trabecular bone, intervertebral discs every disc_p mm
    d = np.hypot(X2 - a.bx, Y2 - a.vb_y)
    inb = d < a.vb_r
    disc = ((g.z - a.disc_phase) % a.disc_p) < a.disc_w
    vb = np.where(d < a.vb_r - 2.2, a.trab_hu, a.vb_cortex).astype(F32)
    idx = np.nonzero(inb)
    col = np.repeat(vb[idx][:, None], len(g.z), axis=1)
    col[:, disc] = 90.0
    hu[idx[0], idx[1], :] = col
    # canal, lamina, spinous and transverse processes
    dc = np.hypot(X2 - a.bx, Y2 - a.canal_y)
    post = np.zeros(d.shape, F32)
    post[(dc > a.canal_r + 0.5) & (dc < a.canal_r + 5.0) & (Y2 > a.canal_y - 3.0)] = 650.0
    sp_c = a.canal_y + a.canal_r + 3.0 + 0.5 * a.spin_len
    post[((X2 - a.bx) / 4.5) ** 2 + ((Y2 - sp_c) / (0.5 * a.spin_len)) ** 2 < 1] = 600.0
    for sgn in (-1.0, 1.0):
        post[
            ((X2 - a.bx - sgn * (a.canal_r + 13.0)) / 11.0) ** 2 + ((Y2 - a.canal_y + 2.0) / 4.5) ** 2 < 1
        ] = 600.0
    post[dc < a.canal_r] = 15.0
    idx = np.nonzero(post != 0)
    hu[idx[0], idx[1], :] = post[idx][:, None]
    # ribs: a ring just outside the cavity, present where the oblique rib bands cross the slice
    rho = np.sqrt(((X2 - a.bx) / a.ca) ** 2 + ((Y2 - a.cyc) / a.cb) ** 2)
    dout = np.hypot(X2 - a.bx, Y2 - a.cyc) * (1.0 - 1.0 / np.maximum(rho, 1e-3))
    u = (Y2 - a.cyc) / a.cb
    ring = (dout > 1.5) & (dout < 1.5 + a.rib_t)
    ring &= ~((np.abs(X2 - a.bx) < a.vb_r + 10.0) & (u > 0.4)) & ~(
        (np.abs(X2 - a.bx) < a.st_a + 3.0) & (u < -0.4)
    )
    idx = np.nonzero(ring)
    if idx[0].size:
        uu = np.broadcast_to(u, dout.shape)[idx]
        dd = dout[idx]
        zeff = g.z[None, :] + a.rib_drop * 0.5 * (1.0 - uu[:, None])
        band = (zeff - a.rib_phase) % a.rib_p
        rib = band < a.rib_h
        inner = (dd[:, None] > 3.5) & (dd[:, None] < a.rib_t - 0.5) & (band > 1.8) & (band < a.rib_h - 1.8)
        val = np.where(inner, 260.0, a.rib_hu)
        val = np.where((uu < -0.6)[:, None], 140.0, val)  # costal cartilage anteriorly
        col = hu[idx[0], idx[1], :]
        hu[idx[0], idx[1], :] = np.where(rib, val, col)
    # sternum: cortex and marrow, wider manubrium at the top
    sb = g.box(
        (a.bx - 2 * a.st_a - 2, a.st_y - a.st_b - 2, a.st_bot),
        (a.bx + 2 * a.st_a + 2, a.st_y + a.st_b + 2, 1e9),
    )
    if sb is not None:
        xs, ys, zs = (
            g.x[sb[0]][:, None, None] - a.bx,
            g.y[sb[1]][None, :, None] - a.st_y,
            g.z[sb[2]][None, None, :],
        )
        wide = np.where(zs > a.arch_z - 10.0, 1.5, 1.0) * a.st_a
        outer = (xs / wide) ** 2 + (ys / a.st_b) ** 2 < 1
        inner = (xs / (wide - 2.0)) ** 2 + (ys / (a.st_b - 2.0)) ** 2 < 1
        view = hu[sb]
        view[...] = np.where(outer, np.where(inner, 230.0, 650.0), view)


def render_abdomen(a: Anatomy, r: np.random.Generator, g: Grid) -> np.ndarray:
    """HU of an abdomen phantom (not a chest CT): liver, spleen, stomach, kidneys, bowel gas, spine."""
    nz = len(g.z)
    X2, Y2 = g.x[:, None], g.y[None, :]  # noqa: N806
    eb = ((X2 - a.bx) / a.ba) ** 2 + ((Y2 - a.by) / a.bb) ** 2
    em = ((X2 - a.bx) / (a.ba - a.fat)) ** 2 + ((Y2 - a.by) / (a.bb - a.fat)) ** 2
    body2 = np.where(em < 1, a.muscle_hu, np.where(eb < 1, a.fat_hu, -1000.0)).astype(F32)
    inner = cavity_depth(a, X2, Y2) > 0
    body2 = np.where(inner, -40.0, body2).astype(F32)  # mesenteric fat
    hu = np.repeat(body2[:, :, None], nz, axis=2)
    k = a.k
    organs = [
        ((a.bx - 0.45 * a.ca, a.cyc - 0.05 * a.cb, 40.0), (0.6 * a.ca, 0.85 * a.cb, 80.0), a.liver_hu),
        ((a.bx + 0.7 * a.ca, a.cyc + 0.45 * a.cb, 50.0), (22.0 * k, 36.0 * k, 45.0), 48.0),
        ((a.bx + 0.4 * a.ca, a.cyc - 0.35 * a.cb, 30.0), (35.0 * k, 28.0 * k, 40.0), 22.0),
    ]
    for sgn in (-1.0, 1.0):
        organs.append(((a.bx + sgn * (a.vb_r + 38.0), a.vb_y - 5.0, -30.0), (24.0 * k, 30.0 * k, 55.0), 32.0))
    for c, radii, v in organs:
        paint_ellipsoid(g, hu, None, c, radii, v)
    for _ in range(int(r.integers(8, 14))):  # bowel loops, some with gas
        c = (a.bx + uniform(r, -0.7, 0.7) * a.ca, a.cyc + uniform(r, -0.8, 0.2) * a.cb, uniform(r, -110, 20))
        rad = uniform(r, 10, 18)
        paint_ellipsoid(g, hu, None, c, (rad, rad, rad * 1.5), 30.0, grow=2.0)
        paint_ellipsoid(g, hu, None, c, (rad, rad, rad * 1.5), -1000.0 if r.random() < 0.5 else 15.0)
    dao = polyline(
        [(a.dao[0] - 8.0, a.dao[1], 130.0), (a.dao[0] - 12.0, a.dao[1] + 2.0, -130.0)], [11.0, 10.0]
    )
    paint_tubes(g, hu, None, dao, 40.0, 0.0)
    ivc = polyline(
        [(a.bx - 25.0, a.vb_y - a.vb_r - 10.0, 130.0), (a.bx - 25.0, a.vb_y - a.vb_r - 10.0, -130.0)],
        [11.0, 11.0],
    )
    paint_tubes(g, hu, None, ivc, 38.0, 0.0)
    paint_bones(a, g, hu)
    return hu


def render_head(r: np.random.Generator, g: Grid) -> np.ndarray:
    """HU of a head phantom (not a chest CT): scalp, skull with diploe, brain, ventricles, falx."""
    hu = np.full(g.shape, -1000.0, F32)
    cx, cy, cz = uniform(r, -5, 5), uniform(r, -15, 5), uniform(r, -10, 10)
    ra, rb, rc = uniform(r, 66, 74), uniform(r, 84, 94), uniform(r, 100, 115)
    neck = (np.hypot((g.x[:, None] - cx) / 55.0, (g.y[None, :] - cy - 20.0) / 50.0) < 1)[:, :, None] & (
        g.Z < cz - 40.0
    )
    hu[neck] = 40.0
    paint_ellipsoid(g, hu, None, (cx, cy, cz), (ra, rb, rc), 30.0, grow=5.0)
    paint_ellipsoid(g, hu, None, (cx, cy, cz), (ra, rb, rc), uniform(r, 1000, 1300))
    paint_ellipsoid(g, hu, None, (cx, cy, cz), (ra - 2.5, rb - 2.5, rc - 2.5), uniform(r, 500, 700))
    paint_ellipsoid(g, hu, None, (cx, cy, cz), (ra - 5.0, rb - 5.0, rc - 5.0), uniform(r, 36, 42))
    paint_ellipsoid(g, hu, None, (cx, cy, cz), (ra - 14.0, rb - 14.0, rc - 16.0), uniform(r, 26, 31))
    for sgn in (-1.0, 1.0):
        paint_ellipsoid(g, hu, None, (cx + sgn * 8.0, cy - 5.0, cz + 12.0), (5.0, 18.0, 14.0), 6.0)
    falx = polyline([(cx, cy - rb + 8.0, cz + 20.0), (cx, cy + rb - 8.0, cz + 20.0)], [1.0, 1.0])
    for dz in np.arange(-30.0, 70.0, 8.0):
        paint_tubes(
            g,
            hu,
            None,
            [(np.add(s[0], (0, 0, dz)), np.add(s[1], (0, 0, dz)), 1.0, 1.0) for s in falx],
            60.0,
            0.0,
        )
    return hu
