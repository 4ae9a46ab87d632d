"""The chest phantom's HU volume (X, Y, Z) with its lesions, before the scanner's kernel and noise; every
drawn lesion is also recorded in a :class:`~ctlib.synthetic.truth.Truth` (the lesion sidecar)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import special

from ctlib.synthetic.anatomy import NODE_HU, Anatomy, cavity_depth, dome, heart_shape, lung_shape
from ctlib.synthetic.geometry import F32, Grid, cover, draw_airways, draw_tubes, ell_geom, lerp, maxin
from ctlib.synthetic.lesions import dependency, effusion_thickness
from ctlib.synthetic.render import airway_wall, ell_cover, paint_bones, paint_ellipsoid, paint_tubes
from ctlib.synthetic.truth import Truth


def render_chest(
    a: Anatomy, les: Mapping[str, dict[str, Any]], g: Grid, truth: Truth | None = None
) -> np.ndarray:
    """HU ``(X, Y, Z)`` float32 of a chest phantom with the lesions ``les`` (no noise, no blur); the
    lesions are recorded in ``truth`` (a fresh recorder when None)."""
    truth = Truth(g.shape) if truth is None else truth
    nz = len(g.z)
    X2, Y2 = g.x[:, None], g.y[None, :]  # noqa: N806
    # body: fat under the skin, muscle inside
    eb = ((X2 - a.bx) / a.ba) ** 2 + ((Y2 - a.by) / a.bb) ** 2
    em = ((X2 - a.bx) / (a.ba - a.fat)) ** 2 + ((Y2 - a.by) / (a.bb - a.fat)) ** 2
    body2 = np.where(em < 1, a.muscle_hu, np.where(eb < 1, a.fat_hu, -1000.0)).astype(F32)
    hu = np.repeat(body2[:, :, None], nz, axis=2)

    # the thoracic cavity and everything inside it, on the cavity's bounding box
    slc = g.box((a.bx - a.ca - 2, a.cyc - a.cb - 2, -1e9), (a.bx + a.ca + 2, a.cyc + a.cb + 2, 1e9))
    gc = g.sub(slc)
    H = hu[slc]  # noqa: N806 - a view: painting H paints hu
    depth2 = cavity_depth(a, gc.x[:, None], gc.y[None, :])
    zd2 = dome(a, gc.x[:, None], gc.y[None, :])
    H[...] = np.where((depth2 > 0)[:, :, None], a.med_hu, H)
    # thoracic inlet: muscle lateral to the mediastinum above the lung apices
    inlet = (depth2 > 0)[:, :, None] & (gc.Z > a.taper_z0) & (np.abs(gc.X - a.bx) > a.w_med + 22.0)
    H[inlet] = a.muscle_hu
    _paint_upper_abdomen(a, gc, H, depth2 > 0, zd2)
    tc = truth.view(slc)
    env = _paint_mediastinum(a, les, gc, H, tc)
    L = lung_shape(a, gc.X, gc.Y, gc.Z) & ~env  # noqa: N806
    LH, Aw = _lung_hu(a, les, gc, L, tc)  # noqa: N806
    _paint_lung_lesions(a, les, gc, LH, L, Aw, depth2, zd2, tc)
    H[...] = np.where(L, LH, H)

    paint_bones(a, g, hu)
    _paint_overlays(les, g, hu, truth)
    # the patient table: a curved tray under the back
    ty = a.table_y - 0.0008 * (X2 - a.bx) ** 2
    tray = (np.abs(Y2 - ty) < 2.5) & (np.abs(X2 - a.bx) < 165.0) & (eb >= 1)
    hu[tray] = 220.0
    return hu


def _paint_upper_abdomen(a: Anatomy, gc: Grid, H: np.ndarray, cav2: np.ndarray, zd2: np.ndarray) -> None:  # noqa: N803
    """Below the diaphragm: liver (right, crossing anteriorly), stomach with gas, spleen."""
    kab = int(np.searchsorted(gc.z, float(zd2[cav2].max()) + 1.0, side="right")) if cav2.any() else 0
    if kab <= 0:
        return
    Xc2, Yc2 = gc.x[:, None], gc.y[None, :]  # noqa: N806
    gab = Grid(gc.x, gc.y, gc.z[:kab], gc.h, gc.hz, gc.zsub)
    liver2 = (Xc2 - a.bx) < 25.0 - 0.6 * (Yc2 - a.cyc)
    A = np.repeat(np.where(liver2, a.liver_hu, 28.0).astype(F32)[:, :, None], kab, axis=2)  # noqa: N806
    sc, sr = a.stomach_c, a.stomach_r
    paint_ellipsoid(gab, A, None, sc, sr, 40.0, grow=3.0)
    paint_ellipsoid(gab, A, None, sc, sr, 20.0)
    gas = ell_cover(
        gab, (sc[0], sc[1] - 0.55 * sr[1], sc[2] + 0.3 * sr[2]), (0.8 * sr[0], 0.45 * sr[1], 0.6 * sr[2])
    )
    if gas is not None:
        lerp(A, gas[0], gas[1], -1000.0)
    paint_ellipsoid(gab, A, None, a.spleen_c, a.spleen_r, 48.0)
    below = cav2[:, :, None] & (gab.Z < zd2[:, :, None])
    H[:, :, :kab] = np.where(below, A, H[:, :, :kab])


def _paint_mediastinum(
    a: Anatomy, les: Mapping[str, dict[str, Any]], gc: Grid, H: np.ndarray, tc: Truth  # noqa: N803
) -> np.ndarray:
    """Heart, great vessels, nodes, oesophagus, hernia, central airways; returns the envelope ``env``
    (bool ``gc.shape``) that the lungs cannot enter."""
    env = np.zeros(gc.shape, bool)
    env |= (np.hypot(gc.x[:, None] - a.bx, gc.y[None, :] - a.vb_y) < a.vb_r + 4.0)[:, :, None]
    hc, hr, hang = heart_shape(a, les)
    pe = les.get("Pericardial effusion")
    fluid = None
    if pe is not None:
        fluid = paint_ellipsoid(gc, H, env, hc, hr, pe["hu"], hang, margin=2.0, grow=3.5 + pe["t"])
    fat = paint_ellipsoid(gc, H, env, hc, hr, -95.0, hang, margin=2.0, grow=3.5)  # epicardial fat
    heart = paint_ellipsoid(gc, H, None, hc, hr, 40.0, hang)
    if fluid is not None:
        rim = fluid[1] >= 0.5
        if fat is not None:
            inner = np.zeros(gc.shape, bool)
            inner[fat[0]] = fat[1] >= 0.5
            rim &= ~inner[fluid[0]]
        tc.add("Pericardial effusion", fluid[0], rim)
    if "Cardiomegaly" in les and heart is not None:
        tc.add("Cardiomegaly", *heart)
    # anterior mediastinal (thymic) fat in front of the great vessels
    zlo = a.heart_top - 25.0
    paint_ellipsoid(
        gc,
        H,
        env,
        (a.bx - 3.0, a.cyc - 0.68 * a.cb, 0.5 * (zlo + 140.0)),
        (17.0 * a.k, 0.3 * a.cb, 0.5 * (140.0 - zlo)),
        a.med_hu,
    )
    paint_tubes(gc, H, env, a.aorta, 42.0, 5.0)
    paint_tubes(gc, H, env, a.pulmonary, 38.0, 4.0)
    paint_tubes(gc, H, env, a.veins, 36.0, 4.0)
    paint_tubes(gc, H, env, a.arch_branches, 40.0, 4.0)
    enlarged = les.get("Lymphadenopathy", {}).get("nodes", [])
    big = {name for name, *_ in enlarged}
    for name, c in a.stations.items():  # the normal nodes
        if name not in big:
            rad = a.normal_nodes[name]
            paint_ellipsoid(gc, H, env, c, (rad, rad, 1.15 * rad), NODE_HU, margin=2.0)
    if enlarged:
        for _, c, radii, v in enlarged:
            node = paint_ellipsoid(gc, H, env, c, radii, v, margin=2.0)
            if node is not None:
                tc.add("Lymphadenopathy", *node)
    paint_tubes(gc, H, env, a.oesophagus, 35.0, 4.0, lumen=2.5 if a.oe_air else None)
    if "Hiatal hernia" in les:
        p = les["Hiatal hernia"]
        c, radii = p["c"], p["radii"]
        sac = paint_ellipsoid(gc, H, env, c, radii, 40.0, margin=2.0, grow=4.0)
        if sac is not None:
            tc.add("Hiatal hernia", *sac)
        paint_ellipsoid(gc, H, None, c, radii, p["hu"])
        lvl = c[1] + p["level"] * radii[1]
        gas = ell_cover(gc, c, radii)
        if gas is not None:
            sl, cov = gas
            lerp(H, sl, cov * (gc.y[sl[1]][None, :, None] < lvl), -1000.0)
    pbt = les.get("Peribronchial thickening", {}).get("extra", 0.0)
    paint_tubes(gc, H, env, a.central_airways[:1], 40.0, 5.0, wall=airway_wall(0.0))
    paint_tubes(gc, H, env, a.central_airways[1:], 40.0, 2.0, wall=airway_wall(pbt))
    if pbt:
        tc.add("Peribronchial thickening", (slice(None),) * 3,
               _wall_gain(gc, a.central_airways[1:], pbt), within=~_lumen(gc, a.central_airways[1:]))
    return env


def _wall_gain(gc: Grid, segs, extra: float) -> np.ndarray:
    """Coverage ``gc.shape`` of the bronchial wall added by a thickening of ``extra`` mm."""
    thick, normal, lumen = (np.zeros(gc.shape, F32) for _ in range(3))
    draw_airways(gc, thick, lumen, segs, airway_wall(extra))
    draw_airways(gc, normal, lumen, segs, airway_wall(0.0))
    return thick - normal


def _lumen(gc: Grid, segs) -> np.ndarray:
    lumen = np.zeros(gc.shape, F32)
    draw_tubes(gc, lumen, segs)
    return lumen >= 0.5


def _lung_hu(
    a: Anatomy, les: Mapping[str, dict[str, Any]], gc: Grid, L: np.ndarray, tc: Truth  # noqa: N803
) -> tuple[np.ndarray, np.ndarray]:
    """HU ``gc.shape`` of the lungs (before the focal lung lesions): parenchyma with emphysema, mosaic attenuation
    and ground glass, vessels (pruned where lucent), bronchi (thickened, dilated)."""
    Zc = gc.Z  # noqa: N806
    P = np.empty(gc.shape, F32)  # noqa: N806 - lung parenchyma, denser posteriorly (dependent)
    P[...] = a.lung_hu + a.lung_grad * (gc.Y - a.cyc) / a.cb
    prune = np.ones(gc.shape, F32)
    whole = (slice(None),) * 3
    if "Emphysema" in les:
        p = les["Emphysema"]
        fe = p["field"].sample(gc) + 0.8 * np.clip(Zc / 70.0, -1.0, 1.0)
        E = np.clip((fe - float(special.ndtri(1.0 - p["frac"]))) * 2.5, 0.0, 1.0)  # noqa: N806
        for c, rad in p["bullae"]:
            b = ell_cover(gc, c, (rad, rad, rad))
            if b is not None:
                maxin(E, b[0], b[1])
        P += E * (-990.0 - P)
        prune *= 1.0 - 0.65 * E
        tc.add("Emphysema", whole, E >= 0.5, within=L)
    if "Mosaic attenuation pattern" in les:
        p = les["Mosaic attenuation pattern"]
        lucent = p["cells"].sample(gc) < 0.0
        P += np.where(lucent, -p["low"], p["high"]).astype(F32)
        prune *= np.where(lucent, 0.7, 1.0).astype(F32)
        tc.add("Mosaic attenuation pattern", whole, L)
    if "Lung opacity" in les:
        for c, radii, fld, target in les["Lung opacity"]["patches"]:
            geo = ell_geom(gc, c, radii, pad=gc.h)
            if geo is None:
                continue
            sl, q = geo
            cov = np.clip((1.0 - q.mean(axis=-1)) * 3.0 + 0.6 * fld.sample(gc.sub(sl)), 0.0, 1.0)
            lerp(P, sl, cov, target)
            tc.add("Lung opacity", sl, cov, within=L[sl])
    pbt = les.get("Peribronchial thickening", {}).get("extra", 0.0)
    V = np.zeros(gc.shape, F32)  # noqa: N806 - vessel coverage
    draw_tubes(gc, V, a.vessels)
    W = np.zeros(gc.shape, F32)  # noqa: N806 - bronchial wall coverage
    Aw = np.zeros(gc.shape, F32)  # noqa: N806 - bronchial lumen coverage
    draw_airways(gc, W, Aw, a.airways, airway_wall(pbt))
    if pbt:
        tc.add("Peribronchial thickening", whole, _wall_gain(gc, a.airways, pbt), within=L & (Aw < 0.5))
    if "Bronchiectasis" in les:
        p = les["Bronchiectasis"]
        for segs, w in p["tubes"]:
            draw_airways(gc, W, Aw, segs, lambda r, w=w: r + w + pbt)
            outer = np.zeros(gc.shape, F32)
            draw_tubes(gc, outer, [(p0, p1, r0 + w + pbt, r1 + w + pbt) for p0, p1, r0, r1 in segs])
            tc.add("Bronchiectasis", whole, outer, within=L)
        draw_tubes(gc, V, p["vessels"])
    T = np.maximum(V * prune, W)  # noqa: N806
    LH = P + T * (40.0 - P)  # noqa: N806
    LH += Aw * (-1000.0 - LH)
    return LH, Aw


def _paint_lung_lesions(
    a: Anatomy,
    les: Mapping[str, dict[str, Any]],
    gc: Grid,
    LH: np.ndarray,  # noqa: N803
    L: np.ndarray,  # noqa: N803
    Aw: np.ndarray,  # noqa: N803
    depth2: np.ndarray,
    zd2: np.ndarray,
    tc: Truth,
) -> None:
    """Septal lines, fibrotic bands, nodules, consolidation, atelectasis and effusion into ``LH``."""
    whole = (slice(None),) * 3
    if "Interlobular septal thickening" in les:
        p = les["Interlobular septal thickening"]
        S = cover(p["edges"].sample(gc)[..., None], p["w"], gc.h)  # noqa: N806
        S *= (depth2 < p["shell"])[:, :, None] | (gc.Z - zd2[:, :, None] < 15.0)
        S *= gc.Z < p["z_top"]
        LH += S * (p["hu"] - LH)
        tc.add("Interlobular septal thickening", whole, S * L)
    if "Pulmonary fibrotic sequela" in les:
        p = les["Pulmonary fibrotic sequela"]
        F = np.zeros(gc.shape, F32)  # noqa: N806
        draw_tubes(gc, F, p["strands"])
        c, radii, ang = p["cap"]
        cap = ell_cover(gc, c, radii, ang)
        if cap is not None:
            maxin(F, cap[0], cap[1])
        LH += F * (p["hu"] - LH)
        tc.add("Pulmonary fibrotic sequela", whole, F, within=L)
    if "Consolidation" in les:
        p = les["Consolidation"]
        geo = ell_geom(gc, p["c"], p["radii"], p["angle"], pad=gc.h)
        if geo is not None:
            sl, q = geo
            cov = np.clip((1.0 - q.mean(axis=-1)) * 4.0 + 0.6 * p["field"].sample(gc.sub(sl)), 0.0, 1.0)
            lerp(LH, sl, cov, p["hu"])
            B = np.zeros(gc.shape, F32)  # noqa: N806 - air bronchograms
            draw_tubes(gc, B, p["bron"])
            B[sl] = np.maximum(B[sl], Aw[sl]) * (cov > 0.5)
            LH += B * (-950.0 - LH)
            tc.add("Consolidation", sl, cov, within=L[sl])
    if "Atelectasis" in les:
        p = les["Atelectasis"]
        for c, radii, ang in p["parts"]:
            at = ell_cover(gc, c, radii, ang)
            if at is not None:
                lerp(LH, at[0], at[1], p["hu"])
                tc.add("Atelectasis", at[0], at[1], within=L[at[0]])
    if "Pleural effusion" in les:
        p = les["Pleural effusion"]
        for s in p["sides"]:
            side2 = (gc.x[:, None] < a.bx) if s == "R" else (gc.x[:, None] > a.bx)
            t = effusion_thickness(p, gc.Z)
            ef = L & side2[:, :, None] & (depth2[:, :, None] < t * dependency(a, gc.y[None, :])[:, :, None])
            LH[ef] = p["hu"]
            tc.add("Pleural effusion", whole, ef)


def _paint_overlays(les: Mapping[str, dict[str, Any]], g: Grid, hu: np.ndarray, truth: Truth) -> None:
    """Calcifications and metal, over everything."""
    for key, item in (
        ("Arterial wall calcification", "plaques"),
        ("Coronary artery wall calcification", "spots"),
    ):
        if key in les:
            for c, radii, v in les[key][item]:
                drawn = paint_ellipsoid(g, hu, None, c, radii, v)
                if drawn is not None:
                    truth.add(key, *drawn)
    if "Medical material" in les:
        p = les["Medical material"]
        for segs, v in p["wires"]:
            paint_tubes(g, hu, None, segs, v, 0.0)
            wire = np.zeros(g.shape, F32)
            draw_tubes(g, wire, segs)
            truth.add("Medical material", (slice(None),) * 3, wire)
        for c, radii, ang, v in p["bodies"]:
            drawn = paint_ellipsoid(g, hu, None, c, radii, v, ang)
            if drawn is not None:
                truth.add("Medical material", *drawn)
