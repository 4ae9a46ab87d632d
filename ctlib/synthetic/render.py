"""Rendering: the HU volume (X, Y, Z) of a chest (with its lesions), an abdomen or a head phantom, before
the scanner's kernel and noise."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from scipy import special

from ctlib.synthetic.anatomy import _Anatomy, _cavity_depth, _dome, _heart, _lung_shape, _u
from ctlib.synthetic.geometry import (
    _F32,
    _cover,
    _draw_airways,
    _draw_tubes,
    _ell_geom,
    _Grid,
    _lerp,
    _maxin,
    _polyline,
    _seg_geom,
)
from ctlib.synthetic.signatures import _dependency, _effusion_thickness


# ---------------------------------------------------------------------------------------------
# rendering: HU volumes (X, Y, Z) before noise
# ---------------------------------------------------------------------------------------------
def _paint_tubes(
    g: _Grid,
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
        geo = _seg_geom(g, p0, p1, max(o0, o1) + margin + g.h)
        if geo is None:
            continue
        sl, dist, t = geo
        ro = o0 + t * (o1 - o0)
        _lerp(hu, sl, _cover(dist, ro, g.h), value)
        if wall is not None:
            _lerp(hu, sl, _cover(dist, r0 + t * (r1 - r0), g.h), lumen_value)
        elif lumen is not None:
            _lerp(hu, sl, _cover(dist, lumen, g.h), lumen_value)
        if env is not None:
            env[sl] |= (dist < ro + margin).mean(axis=-1) > 0.5


def _paint_ellipsoid(
    g: _Grid,
    hu: np.ndarray,
    env: np.ndarray | None,
    c,
    radii,
    value: float,
    angle: float = 0.0,
    margin: float = 0.0,
    grow: float = 0.0,
) -> None:
    """Paint an ellipsoid grown by ``grow`` mm (approximately) and mark ``env`` within ``margin``."""
    rm = min(radii)
    geo = _ell_geom(g, c, radii, angle, pad=grow + margin + g.h)
    if geo is None:
        return
    sl, q = geo
    d = q * rm
    _lerp(hu, sl, _cover(d, rm + grow, g.h), value)
    if env is not None:
        env[sl] |= (d < rm + grow + margin).mean(axis=-1) > 0.5


def _ell_cover(g: _Grid, c, radii, angle: float = 0.0):
    geo = _ell_geom(g, c, radii, angle, pad=g.h)
    if geo is None:
        return None
    sl, q = geo
    rm = min(radii)
    return sl, _cover(q * rm, rm, g.h)


def _airway_wall(extra: float) -> Callable[[float], float]:
    """Outer radius of a bronchus of lumen radius r (normal wall ~20% of the lumen + 0.6 mm)."""
    return lambda r: 1.25 * r + 0.6 + extra


def _render_chest(a: _Anatomy, les: Mapping[str, dict[str, Any]], g: _Grid) -> np.ndarray:
    """HU ``(X, Y, Z)`` float32 of a chest phantom with the lesions ``les`` (no noise, no blur)."""
    nz = len(g.z)
    X2, Y2 = g.x[:, None], g.y[None, :]  # noqa: N806
    # body: fat under the skin, muscle inside
    eb = ((X2 - a.bx) / a.ba) ** 2 + ((Y2 - a.by) / a.bb) ** 2
    em = ((X2 - a.bx) / (a.ba - a.fat)) ** 2 + ((Y2 - a.by) / (a.bb - a.fat)) ** 2
    body2 = np.where(em < 1, a.muscle_hu, np.where(eb < 1, a.fat_hu, -1000.0)).astype(_F32)
    hu = np.repeat(body2[:, :, None], nz, axis=2)

    # the thoracic cavity and everything inside it, on the cavity's bounding box
    slc = g.box((a.bx - a.ca - 2, a.cyc - a.cb - 2, -1e9), (a.bx + a.ca + 2, a.cyc + a.cb + 2, 1e9))
    gc = g.sub(slc)
    H = hu[slc]  # noqa: N806 - a view: painting H paints hu
    Xc, Yc, Zc = gc.X, gc.Y, gc.Z  # noqa: N806
    Xc2, Yc2 = gc.x[:, None], gc.y[None, :]  # noqa: N806
    depth2 = _cavity_depth(a, Xc2, Yc2)
    cav2 = depth2 > 0
    zd2 = _dome(a, Xc2, Yc2)
    H[...] = np.where(cav2[:, :, None], a.med_hu, H)
    # thoracic inlet: muscle lateral to the mediastinum above the lung apices
    inlet = cav2[:, :, None] & (Zc > a.taper_z0) & (np.abs(Xc - a.bx) > a.w_med + 22.0)
    H[inlet] = a.muscle_hu

    # abdomen below the diaphragm: liver (right, crossing anteriorly), stomach with gas, spleen
    kab = int(np.searchsorted(gc.z, float(zd2[cav2].max()) + 1.0, side="right")) if cav2.any() else 0
    if kab > 0:
        gab = _Grid(gc.x, gc.y, gc.z[:kab], gc.h, gc.hz, gc.zsub)
        liver2 = (Xc2 - a.bx) < 25.0 - 0.6 * (Yc2 - a.cyc)
        A = np.repeat(np.where(liver2, a.liver_hu, 28.0).astype(_F32)[:, :, None], kab, axis=2)  # noqa: N806
        sc, sr = a.stomach_c, a.stomach_r
        _paint_ellipsoid(gab, A, None, sc, sr, 40.0, grow=3.0)
        _paint_ellipsoid(gab, A, None, sc, sr, 20.0)
        gas = _ell_cover(
            gab, (sc[0], sc[1] - 0.55 * sr[1], sc[2] + 0.3 * sr[2]), (0.8 * sr[0], 0.45 * sr[1], 0.6 * sr[2])
        )
        if gas is not None:
            _lerp(A, gas[0], gas[1], -1000.0)
        _paint_ellipsoid(gab, A, None, a.spleen_c, a.spleen_r, 48.0)
        below = cav2[:, :, None] & (gab.Z < zd2[:, :, None])
        H[:, :, :kab] = np.where(below, A, H[:, :, :kab])

    # mediastinum: everything painted here also marks the envelope that the lungs cannot enter
    env = np.zeros(gc.shape, bool)
    env |= (np.hypot(Xc2 - a.bx, Yc2 - a.vb_y) < a.vb_r + 4.0)[:, :, None]
    hc, hr, hang = _heart(a, les)
    pe = les.get("Pericardial effusion")
    if pe is not None:
        _paint_ellipsoid(gc, H, env, hc, hr, pe["hu"], hang, margin=2.0, grow=3.5 + pe["t"])
    _paint_ellipsoid(gc, H, env, hc, hr, -95.0, hang, margin=2.0, grow=3.5)  # epicardial fat
    _paint_ellipsoid(gc, H, None, hc, hr, 40.0, hang)
    # anterior mediastinal (thymic) fat in front of the great vessels
    zlo = a.heart_top - 25.0
    _paint_ellipsoid(
        gc,
        H,
        env,
        (a.bx - 3.0, a.cyc - 0.68 * a.cb, 0.5 * (zlo + 140.0)),
        (17.0 * a.k, 0.3 * a.cb, 0.5 * (140.0 - zlo)),
        a.med_hu,
    )
    _paint_tubes(gc, H, env, a.aorta, 42.0, 5.0)
    _paint_tubes(gc, H, env, a.pulmonary, 38.0, 4.0)
    _paint_tubes(gc, H, env, a.veins, 36.0, 4.0)
    _paint_tubes(gc, H, env, a.arch_branches, 40.0, 4.0)
    if "Lymphadenopathy" in les:
        for _, c, radii, v in les["Lymphadenopathy"]["nodes"]:
            _paint_ellipsoid(gc, H, env, c, radii, v, margin=2.0)
    _paint_tubes(gc, H, env, a.oesophagus, 35.0, 4.0, lumen=2.5 if a.oe_air else None)
    if "Hiatal hernia" in les:
        p = les["Hiatal hernia"]
        c, radii = p["c"], p["radii"]
        _paint_ellipsoid(gc, H, env, c, radii, 40.0, margin=2.0, grow=4.0)
        _paint_ellipsoid(gc, H, None, c, radii, p["hu"])
        lvl = c[1] + p["level"] * radii[1]
        gas = _ell_cover(gc, c, radii)
        if gas is not None:
            sl, cov = gas
            _lerp(H, sl, cov * (gc.y[sl[1]][None, :, None] < lvl), -1000.0)
    pbt = les.get("Peribronchial thickening", {}).get("extra", 0.0)
    _paint_tubes(gc, H, env, a.central_airways[:1], 40.0, 5.0, wall=_airway_wall(0.0))
    _paint_tubes(gc, H, env, a.central_airways[1:], 40.0, 2.0, wall=_airway_wall(pbt))

    # lungs
    L = _lung_shape(a, Xc, Yc, Zc) & ~env  # noqa: N806
    P = np.empty(gc.shape, _F32)  # noqa: N806 - lung parenchyma, denser posteriorly (dependent)
    P[...] = a.lung_hu + a.lung_grad * (Yc - a.cyc) / a.cb
    prune = np.ones(gc.shape, _F32)
    if "Emphysema" in les:
        p = les["Emphysema"]
        fe = p["field"].sample(gc) + 0.8 * np.clip(Zc / 70.0, -1.0, 1.0)
        E = np.clip((fe - float(special.ndtri(1.0 - p["frac"]))) * 2.5, 0.0, 1.0)  # noqa: N806
        for c, rad in p["bullae"]:
            b = _ell_cover(gc, c, (rad, rad, rad))
            if b is not None:
                _maxin(E, b[0], b[1])
        P += E * (-985.0 - P)
        prune *= 1.0 - 0.65 * E
    if "Mosaic attenuation pattern" in les:
        p = les["Mosaic attenuation pattern"]
        lucent = p["cells"].sample(gc) < 0.0
        P += np.where(lucent, -p["low"], p["high"]).astype(_F32)
        prune *= np.where(lucent, 0.7, 1.0).astype(_F32)
    if "Lung opacity" in les:
        for c, radii, fld, target in les["Lung opacity"]["patches"]:
            geo = _ell_geom(gc, c, radii, pad=gc.h)
            if geo is None:
                continue
            sl, q = geo
            cov = np.clip((1.0 - q.mean(axis=-1)) * 3.0 + 0.6 * fld.sample(gc.sub(sl)), 0.0, 1.0)
            _lerp(P, sl, cov, target)
    V = np.zeros(gc.shape, _F32)  # noqa: N806 - vessel coverage
    _draw_tubes(gc, V, a.vessels)
    W = np.zeros(gc.shape, _F32)  # noqa: N806 - bronchial wall coverage
    Aw = np.zeros(gc.shape, _F32)  # noqa: N806 - bronchial lumen coverage
    _draw_airways(gc, W, Aw, a.airways, _airway_wall(pbt))
    if "Bronchiectasis" in les:
        p = les["Bronchiectasis"]
        for segs, w in p["tubes"]:
            _draw_airways(gc, W, Aw, segs, lambda r, w=w: r + w + pbt)
        _draw_tubes(gc, V, p["vessels"])
    T = np.maximum(V * prune, W)  # noqa: N806
    LH = P + T * (40.0 - P)  # noqa: N806
    LH += Aw * (-1000.0 - LH)
    if "Interlobular septal thickening" in les:
        p = les["Interlobular septal thickening"]
        S = _cover(p["edges"].sample(gc)[..., None], p["w"], gc.h)  # noqa: N806
        S *= (depth2 < p["shell"])[:, :, None] | (Zc - zd2[:, :, None] < 15.0)
        S *= Zc < p["z_top"]
        LH += S * (p["hu"] - LH)
    if "Pulmonary fibrotic sequela" in les:
        p = les["Pulmonary fibrotic sequela"]
        F = np.zeros(gc.shape, _F32)  # noqa: N806
        _draw_tubes(gc, F, p["strands"])
        c, radii, ang = p["cap"]
        cap = _ell_cover(gc, c, radii, ang)
        if cap is not None:
            _maxin(F, cap[0], cap[1])
        LH += F * (p["hu"] - LH)
    if "Lung nodule" in les:
        for c, radii, v in les["Lung nodule"]["nodules"]:
            n = _ell_cover(gc, c, radii)
            if n is not None:
                _lerp(LH, n[0], n[1], v)
    if "Consolidation" in les:
        p = les["Consolidation"]
        geo = _ell_geom(gc, p["c"], p["radii"], p["angle"], pad=gc.h)
        if geo is not None:
            sl, q = geo
            cov = np.clip((1.0 - q.mean(axis=-1)) * 4.0 + 0.6 * p["field"].sample(gc.sub(sl)), 0.0, 1.0)
            _lerp(LH, sl, cov, p["hu"])
            B = np.zeros(gc.shape, _F32)  # noqa: N806 - air bronchograms
            _draw_tubes(gc, B, p["bron"])
            B[sl] = np.maximum(B[sl], Aw[sl]) * (cov > 0.5)
            LH += B * (-950.0 - LH)
    if "Atelectasis" in les:
        p = les["Atelectasis"]
        for c, radii, ang in p["parts"]:
            at = _ell_cover(gc, c, radii, ang)
            if at is not None:
                _lerp(LH, at[0], at[1], p["hu"])
    if "Pleural effusion" in les:
        p = les["Pleural effusion"]
        side2 = np.zeros(depth2.shape, bool)
        for s in p["sides"]:
            side2 |= (Xc2 < a.bx) if s == "R" else (Xc2 > a.bx)
        t = _effusion_thickness(p, Zc)
        ef = L & side2[:, :, None] & (depth2[:, :, None] < t * _dependency(a, Yc2)[:, :, None])
        LH[ef] = p["hu"]
    H[...] = np.where(L, LH, H)

    _paint_bones(a, g, hu)
    # calcifications and metal, over everything
    for key, item in (
        ("Arterial wall calcification", "plaques"),
        ("Coronary artery wall calcification", "spots"),
    ):
        if key in les:
            for c, radii, v in les[key][item]:
                _paint_ellipsoid(g, hu, None, c, radii, v)
    if "Medical material" in les:
        p = les["Medical material"]
        for segs, v in p["wires"]:
            _paint_tubes(g, hu, None, segs, v, 0.0)
        for c, radii, ang, v in p["bodies"]:
            _paint_ellipsoid(g, hu, None, c, radii, v, ang)
    # the patient table: a curved tray under the back
    ty = a.table_y - 0.0008 * (X2 - a.bx) ** 2
    tray = (np.abs(Y2 - ty) < 2.5) & (np.abs(X2 - a.bx) < 165.0) & (eb >= 1)
    hu[tray] = 220.0
    return hu


def _paint_bones(a: _Anatomy, g: _Grid, hu: np.ndarray) -> None:
    """Spine (body, discs, canal, posterior elements), ribs (oblique, with cartilage) and sternum."""
    X2, Y2 = g.x[:, None], g.y[None, :]  # noqa: N806
    # vertebral body: cortex and trabecular bone, intervertebral discs every disc_p mm
    d = np.hypot(X2 - a.bx, Y2 - a.vb_y)
    inb = d < a.vb_r
    disc = ((g.z - a.disc_phase) % a.disc_p) < a.disc_w
    vb = np.where(d < a.vb_r - 2.2, a.trab_hu, a.vb_cortex).astype(_F32)
    idx = np.nonzero(inb)
    col = np.repeat(vb[idx][:, None], len(g.z), axis=1)
    col[:, disc] = 90.0
    hu[idx[0], idx[1], :] = col
    # canal, lamina, spinous and transverse processes
    dc = np.hypot(X2 - a.bx, Y2 - a.canal_y)
    post = np.zeros(d.shape, _F32)
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


def _render_abdomen(a: _Anatomy, r: np.random.Generator, g: _Grid) -> np.ndarray:
    """HU of an abdomen phantom (not a chest CT): liver, spleen, stomach, kidneys, bowel gas, spine."""
    nz = len(g.z)
    X2, Y2 = g.x[:, None], g.y[None, :]  # noqa: N806
    eb = ((X2 - a.bx) / a.ba) ** 2 + ((Y2 - a.by) / a.bb) ** 2
    em = ((X2 - a.bx) / (a.ba - a.fat)) ** 2 + ((Y2 - a.by) / (a.bb - a.fat)) ** 2
    body2 = np.where(em < 1, a.muscle_hu, np.where(eb < 1, a.fat_hu, -1000.0)).astype(_F32)
    inner = _cavity_depth(a, X2, Y2) > 0
    body2 = np.where(inner, -40.0, body2).astype(_F32)  # mesenteric fat
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
        _paint_ellipsoid(g, hu, None, c, radii, v)
    for _ in range(int(r.integers(8, 14))):  # bowel loops, some with gas
        c = (a.bx + _u(r, -0.7, 0.7) * a.ca, a.cyc + _u(r, -0.8, 0.2) * a.cb, _u(r, -110, 20))
        rad = _u(r, 10, 18)
        _paint_ellipsoid(g, hu, None, c, (rad, rad, rad * 1.5), 30.0, grow=2.0)
        _paint_ellipsoid(g, hu, None, c, (rad, rad, rad * 1.5), -1000.0 if r.random() < 0.5 else 15.0)
    dao = _polyline(
        [(a.dao[0] - 8.0, a.dao[1], 130.0), (a.dao[0] - 12.0, a.dao[1] + 2.0, -130.0)], [11.0, 10.0]
    )
    _paint_tubes(g, hu, None, dao, 40.0, 0.0)
    ivc = _polyline(
        [(a.bx - 25.0, a.vb_y - a.vb_r - 10.0, 130.0), (a.bx - 25.0, a.vb_y - a.vb_r - 10.0, -130.0)],
        [11.0, 11.0],
    )
    _paint_tubes(g, hu, None, ivc, 38.0, 0.0)
    _paint_bones(a, g, hu)
    return hu


def _render_head(r: np.random.Generator, g: _Grid) -> np.ndarray:
    """HU of a head phantom (not a chest CT): scalp, skull with diploe, brain, ventricles, falx."""
    hu = np.full(g.shape, -1000.0, _F32)
    cx, cy, cz = _u(r, -5, 5), _u(r, -15, 5), _u(r, -10, 10)
    ra, rb, rc = _u(r, 66, 74), _u(r, 84, 94), _u(r, 100, 115)
    neck = (np.hypot((g.x[:, None] - cx) / 55.0, (g.y[None, :] - cy - 20.0) / 50.0) < 1)[:, :, None] & (
        g.Z < cz - 40.0
    )
    hu[neck] = 40.0
    _paint_ellipsoid(g, hu, None, (cx, cy, cz), (ra, rb, rc), 30.0, grow=5.0)
    _paint_ellipsoid(g, hu, None, (cx, cy, cz), (ra, rb, rc), _u(r, 1000, 1300))
    _paint_ellipsoid(g, hu, None, (cx, cy, cz), (ra - 2.5, rb - 2.5, rc - 2.5), _u(r, 500, 700))
    _paint_ellipsoid(g, hu, None, (cx, cy, cz), (ra - 5.0, rb - 5.0, rc - 5.0), _u(r, 36, 42))
    _paint_ellipsoid(g, hu, None, (cx, cy, cz), (ra - 14.0, rb - 14.0, rc - 16.0), _u(r, 26, 31))
    for sgn in (-1.0, 1.0):
        _paint_ellipsoid(g, hu, None, (cx + sgn * 8.0, cy - 5.0, cz + 12.0), (5.0, 18.0, 14.0), 6.0)
    falx = _polyline([(cx, cy - rb + 8.0, cz + 20.0), (cx, cy + rb - 8.0, cz + 20.0)], [1.0, 1.0])
    for dz in np.arange(-30.0, 70.0, 8.0):
        _paint_tubes(
            g,
            hu,
            None,
            [(np.add(s[0], (0, 0, dz)), np.add(s[1], (0, 0, dz)), 1.0, 1.0) for s in falx],
            60.0,
            0.0,
        )
    return hu
