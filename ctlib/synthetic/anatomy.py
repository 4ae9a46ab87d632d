"""One patient's chest in reference millimetres: body, cavity, lungs, diaphragm, mediastinum, vessel and
airway trees, bones (see DATA.md, "Anatomy")."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

from ctlib.synthetic.geometry import polyline


# ---------------------------------------------------------------------------------------------
# anatomy: one patient's chest in reference millimetres
# ---------------------------------------------------------------------------------------------
class Anatomy(SimpleNamespace):
    """One patient's chest (reference mm, see the module docstring); built by :func:`sample_anatomy`."""


def uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def child_rng(*key: int) -> np.random.Generator:
    """A generator for one purpose of one patient/scan/reconstruction (independent streams)."""
    return np.random.default_rng([int(k) for k in key])


def _taper(a: Anatomy, z):
    """Apex taper of the lungs: 1 below ``taper_z0``, falling to 0 at the apex (a dome)."""
    s = np.clip((z - a.taper_z0) / (a.apex_z - a.taper_z0), 0.0, 1.0)
    return np.sqrt(1.0 - s * s)


def dome(a: Anatomy, x, y):
    """Height of the diaphragm under ``(x, y)``: two domes (the right higher), deep posterior recesses."""
    ry = ((y - a.dome_y) / a.dome_ay) ** 2
    zr = a.dome_r - a.dome_depth * np.minimum(((x - a.dome_xr) / a.dome_ax) ** 2 + ry, 1.0)
    zl = a.dome_l - a.dome_depth * np.minimum(((x - a.dome_xl) / a.dome_ax) ** 2 + ry, 1.0)
    w = 0.5 * (1.0 + np.tanh((x - a.bx) / 12.0))
    return zr + (zl - zr) * w - a.recess * np.clip((y - a.cyc) / a.cb, 0.0, 1.0) ** 2


def cavity_depth(a: Anatomy, x, y):
    """Approximate distance (mm) of ``(x, y)`` inside the thoracic cavity wall (negative outside)."""
    dx, dy = x - a.bx, y - a.cyc
    rho = np.sqrt((dx / a.ca) ** 2 + (dy / a.cb) ** 2)
    return np.sqrt(dx * dx + dy * dy) * (1.0 / np.maximum(rho, 1e-3) - 1.0)


def lung_shape(a: Anatomy, x, y, z, margin: float = 0.0):
    """Where the (normal) lungs are, before the mediastinal structures carve them; broadcasts."""
    rho2 = ((x - a.bx) / (a.ca - margin)) ** 2 + ((y - a.cyc) / (a.cb - margin)) ** 2
    f = _taper(a, z)
    xs = np.where(x > a.bx, a.bx + 0.5 * a.ca, a.bx - 0.5 * a.ca)
    ax = np.maximum((0.5 * a.ca + 14.0) * f - margin, 1e-3)
    ay = np.maximum(1.25 * a.cb * f - margin, 1e-3)
    apex = ((x - xs) / ax) ** 2 + ((y - (a.cyc + 0.2 * a.cb)) / ay) ** 2 < 1.0
    med = np.abs(x - a.bx) > a.w_med + margin
    return (rho2 < 1.0) & apex & med & (z > dome(a, x, y) + margin)


def heart_shape(
    a: Anatomy, les: Mapping[str, Any]
) -> tuple[tuple[float, float, float], tuple[float, float, float], float]:
    """Heart centre, semi-axes and in-plane angle, enlarged when Cardiomegaly is drawn."""
    (cx, cy, cz), (ra, rb, rc) = a.h_c, a.h_r
    s = les["Cardiomegaly"]["scale"] if "Cardiomegaly" in les else 1.0
    bottom = cz - rc
    return (cx + (s - 1.0) * 0.45 * ra, cy, bottom + s * rc), (s * ra, s * rb, s * rc), a.h_ang


def in_lung(a: Anatomy, pts: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """Whether points ``(N, 3)`` lie at least ``margin`` mm inside the normal lung."""
    x, y, z = pts[:, 0], pts[:, 1], pts[:, 2]
    ok = lung_shape(a, x, y, z, margin)
    (hx, hy, hz), (ra, rb, rc), ang = a.h_c, a.h_r, a.h_ang
    u = (x - hx) * math.cos(ang) + (y - hy) * math.sin(ang)
    v = (y - hy) * math.cos(ang) - (x - hx) * math.sin(ang)
    m = margin + 4.0
    ok &= (u / (ra + m)) ** 2 + (v / (rb + m)) ** 2 + ((z - hz) / (rc + m)) ** 2 > 1.0
    ok &= np.hypot(x - a.bx, y - a.vb_y) > a.vb_r + 6.0 + margin
    ok &= (np.hypot(x - a.dao[0], y - a.dao[1]) > a.ao_r + 5.0 + margin) | (z > a.arch_z)
    return ok


def lung_point(
    rng: np.random.Generator,
    a: Anatomy,
    side: str,
    *,
    margin: float = 6.0,
    zr: tuple[float, float] = (-115.0, 115.0),
    near: Sequence[float] | None = None,
    spread: float = 30.0,
    avoid: Sequence[Callable[[np.ndarray], np.ndarray]] = (),
    ypred: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """A random point of the ``side`` ('R' or 'L') lung, ``margin`` inside it, with z in ``zr``,
    optionally near a point, away from ``avoid`` regions and satisfying ``ypred`` on y."""
    sgn = -1.0 if side == "R" else 1.0
    lo = np.array([a.bx + sgn * a.w_med if sgn > 0 else a.bx - a.ca, a.cyc - a.cb, zr[0]])
    hi = np.array([a.bx + a.ca if sgn > 0 else a.bx - a.w_med, a.cyc + a.cb, zr[1]])
    for attempt in range(60):
        if near is None:
            cand = lo + rng.random((64, 3)) * (hi - lo)
        else:
            cand = np.asarray(near, float) + rng.normal(0.0, spread, (64, 3)) * np.array([1.0, 1.0, 1.4])
        ok = in_lung(a, cand, margin) & (sgn * (cand[:, 0] - a.bx) > 0)
        ok &= (cand[:, 2] >= zr[0]) & (cand[:, 2] <= zr[1])
        if ypred is not None:
            ok &= ypred(cand[:, 1])
        for f in avoid:
            ok &= ~f(cand)
        if ok.any():
            return cand[int(np.argmax(ok))]
        if attempt > 30:  # relax: a point of the lung at all
            margin = max(margin * 0.7, 0.0)
            avoid = ()
    zmid = float(np.clip(0.5 * (zr[0] + zr[1]), -40.0, 40.0))
    return np.array([a.bx + sgn * 0.6 * a.ca, a.cyc, zmid])


def wiggle(rng: np.random.Generator, p0, p1, n: int, amp: float) -> list[np.ndarray]:
    """``n`` points from ``p0`` to ``p1`` with a smooth random lateral wander of ``amp`` x length."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    length = float(np.linalg.norm(p1 - p0))
    pts = []
    for i in range(n):
        t = i / (n - 1)
        off = rng.normal(0.0, amp * length, 3) * math.sin(math.pi * t)
        pts.append(p0 + t * (p1 - p0) + off)
    return pts


def perp(rng: np.random.Generator, d: np.ndarray) -> np.ndarray:
    """A random unit vector perpendicular to ``d``."""
    d = d / max(float(np.linalg.norm(d)), 1e-9)
    v = rng.normal(size=3)
    v -= (v @ d) * d
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _trees(rng: np.random.Generator, a: Anatomy) -> tuple[list[tuple], list[tuple]]:
    """The pulmonary vessel tree and the accompanying intrapulmonary airways, as tapered segments
    ``(p0, p1, r0, r1)`` (airways: lumen radii)."""
    vessels: list[tuple] = []
    airways: list[tuple] = []

    def add(points, radii, depth, side, airway_from=None):
        vessels.extend(polyline(points, radii))
        if airway_from is not None:
            d = np.asarray(points[-1]) - np.asarray(points[0])
            o = perp(rng, d)
            ra = [max(0.62 * r, 0.5) for r in radii]
            off = o * (radii[0] + ra[0] + 1.0)
            apts = [np.asarray(airway_from, float)] + [np.asarray(p) + off for p in points[1:]]
            airways.extend(polyline(apts, ra))
        if depth >= 2:
            return
        n_child = int(rng.integers(2, 4)) if depth == 0 else 1 + int(rng.random() < 0.4)
        for _ in range(n_child):
            i = int(rng.integers(1, len(points) - 1))
            start = np.asarray(points[i])
            r_start = 0.7 * radii[i]
            if r_start < 1.0:
                continue
            tgt = lung_point(rng, a, side, margin=3.0, near=start, spread=28.0)
            pts = wiggle(rng, start, tgt, 3, 0.05)
            rad = list(np.linspace(r_start, 0.7, 3))
            add(pts, rad, depth + 1, side, airway_from=start if (depth == 0 and rng.random() < 0.5) else None)

    for side in ("R", "L"):
        hil = np.asarray(a.hilum[side], float)
        origin = hil + np.array([0.0, -9.0, 6.0])
        n_main = int(rng.integers(6, 9))
        for i in range(n_main):
            if i < 3:
                # Lobar arteries: out to a mid-lung point, then vertically for many slices. Their
                # cross-sections have the calibre of a nodule (the benign distractors).
                mid = lung_point(
                    rng,
                    a,
                    side,
                    margin=14.0,
                    zr=(origin[2] - 30.0, origin[2] + 5.0),
                    near=origin + np.array([(-1 if side == "R" else 1) * 35.0, 0.0, -10.0]),
                    spread=15.0,
                )
                dz = -uniform(rng, 65, 95) if i != 1 else uniform(rng, 45, 70)
                end = lung_point(rng, a, side, margin=8.0, near=mid + np.array([0.0, 0.0, dz]), spread=10.0)
                pts = [origin, mid, 0.5 * (mid + end) + rng.normal(0, 3.0, 3), end]
                rad = [7.5 * a.k, uniform(rng, 6.0, 7.5), uniform(rng, 5.0, 6.5), 3.0]
            else:
                tgt = lung_point(rng, a, side, margin=4.0)
                pts = wiggle(rng, origin, tgt, 5, 0.06)
                rad = list(np.linspace(uniform(rng, 4.5, 6.5), 1.0, 5))
            add(pts, rad, 0, side, airway_from=hil if rng.random() < 0.85 else None)
    return vessels, airways


def sample_anatomy(rng: np.random.Generator, age: float, sex: str) -> Anatomy:
    """A random adult chest (reference mm): body, cavity, lungs, diaphragm, mediastinum, bones."""
    a = Anatomy()
    male = sex == "M"
    k = uniform(rng, 0.93, 1.05) * (1.02 if male else 0.97)
    a.k, a.age = k, float(age)
    a.bx, a.by = uniform(rng, -6, 6), uniform(rng, -2, 8)
    a.ba = min(151.0 * k * uniform(rng, 0.96, 1.04), 164.0)
    a.bb = min(116.0 * k * uniform(rng, 0.95, 1.05), 126.0)
    a.fat = uniform(rng, 5, 20) * (1.0 if male else 1.15)
    t_a, t_p, t_l = a.fat + uniform(rng, 12, 18), a.fat + uniform(rng, 32, 42), a.fat + uniform(rng, 12, 18)
    a.ca, a.cb, a.cyc = a.ba - t_l, a.bb - 0.5 * (t_a + t_p), a.by + 0.5 * (t_a - t_p)
    a.fat_hu, a.muscle_hu, a.med_hu = uniform(rng, -110, -90), uniform(rng, 38, 50), uniform(rng, -90, -70)
    a.w_med = uniform(rng, 5, 8)
    # lungs and diaphragm
    a.lung_hu, a.lung_grad = uniform(rng, -875, -845), uniform(rng, 20, 40)
    a.apex_z = uniform(rng, 98, 110)
    a.taper_z0 = a.apex_z - uniform(rng, 55, 70)
    a.dome_r = uniform(rng, -48, -36)
    a.dome_l = a.dome_r - uniform(rng, 8, 16)
    a.dome_depth, a.recess = uniform(rng, 45, 56), uniform(rng, 10, 18)
    a.dome_xr, a.dome_xl = a.bx - 0.45 * a.ca, a.bx + 0.45 * a.ca
    a.dome_ax, a.dome_y, a.dome_ay = 0.62 * a.ca, a.cyc - 0.1 * a.cb, 0.95 * a.cb
    # spine
    a.vb_r = uniform(rng, 14, 18) * k
    a.vb_y = a.cyc + a.cb - 0.3 * a.vb_r
    a.vb_cortex = uniform(rng, 800, 950)
    a.trab_hu = float(np.clip(300.0 - 2.2 * (age - 30.0), 110.0, 300.0) + rng.normal(0, 15))
    a.disc_p, a.disc_w = uniform(rng, 24, 28), uniform(rng, 4.5, 6.5)
    a.disc_phase = uniform(rng, 0, a.disc_p)
    a.canal_r = uniform(rng, 6.5, 8.0)
    a.canal_y = a.vb_y + a.vb_r + a.canal_r + 1.5
    a.spin_len = float(np.clip(a.by + a.bb - a.fat - 6.0 - (a.canal_y + a.canal_r + 3.0), 8.0, 32.0))
    # ribs and sternum
    a.rib_p, a.rib_drop = uniform(rng, 25, 29), uniform(rng, 35, 55)
    a.rib_phase = uniform(rng, 0, a.rib_p)
    a.rib_h, a.rib_t, a.rib_hu = uniform(rng, 8.5, 11), uniform(rng, 8, 10.5), uniform(rng, 550, 750)
    a.st_y, a.st_a, a.st_b = a.cyc - a.cb - 7.0, uniform(rng, 11, 15), uniform(rng, 5, 7)
    a.st_bot = a.dome_r - uniform(rng, 15, 25)
    _sample_heart_and_airways(a, rng)
    _sample_great_vessels(a, rng)
    # pulmonary vessels and airways
    a.vessels, a.airways = _trees(rng, a)
    # lymph-node stations with a normal node each (Lymphadenopathy enlarges some)
    a.stations, a.normal_nodes = _stations(rng, a)
    return a


def _sample_heart_and_airways(a: Anatomy, rng: np.random.Generator) -> None:
    """Heart (long axis towards anterior-left), carina, arch level, oesophagus, trachea, hila, main bronchi."""
    k = a.k
    # heart (long axis towards anterior-left)
    hk = uniform(rng, 0.92, 1.08) * k
    a.h_r = (60.0 * hk, 41.0 * hk, 48.0 * hk)
    bottom = a.dome_l + uniform(rng, -6, 2)
    a.h_c = (a.bx + uniform(rng, 24, 34), a.cyc - 0.14 * a.cb + uniform(rng, -5, 5), bottom + a.h_r[2])
    a.h_ang = -math.radians(uniform(rng, 28, 42))
    heart_top = a.h_c[2] + a.h_r[2]
    a.heart_top = heart_top
    # airways
    a.carina_z = heart_top + uniform(rng, 3, 12)
    a.arch_z = a.carina_z + uniform(rng, 22, 30)
    a.oe_r, a.oe_air = uniform(rng, 7, 9), bool(rng.random() < 0.5)
    a.oe_x, a.oe_y = a.bx - 5.0, a.vb_y - a.vb_r - a.oe_r - 3.0
    a.tr_r = uniform(rng, 8, 10) * k
    a.tr_x, a.tr_y = a.bx - 1.0, a.oe_y - a.oe_r - a.tr_r - 5.0
    carina = (a.tr_x, a.tr_y + 2.0, a.carina_z)
    hil_r = (a.bx - uniform(rng, 48, 56) * k, a.tr_y + uniform(rng, 4, 10), a.carina_z - uniform(rng, 18, 26))
    hil_l = (a.bx + uniform(rng, 50, 58) * k, a.tr_y + uniform(rng, 6, 12), a.carina_z - uniform(rng, 26, 34))
    a.hilum = {"R": hil_r, "L": hil_l}
    mid_r = (0.5 * (carina[0] + hil_r[0]), 0.5 * (carina[1] + hil_r[1]) + 2.0, 0.5 * (carina[2] + hil_r[2]))
    mid_l = (
        0.5 * (carina[0] + hil_l[0]),
        0.5 * (carina[1] + hil_l[1]) + 3.0,
        0.5 * (carina[2] + hil_l[2]) + 4.0,
    )
    a.central_airways = (
        polyline([(a.tr_x + uniform(rng, -3, 3), a.tr_y - 3.0, 130.0), carina], [a.tr_r, a.tr_r * 0.95])
        + polyline([carina, mid_r, hil_r], [6.5 * k, 6.2 * k, 5.2 * k])
        + polyline([carina, mid_l, hil_l], [6.0 * k, 5.8 * k, 5.0 * k])
    )


def _sample_great_vessels(a: Anatomy, rng: np.random.Generator) -> None:
    """Aorta, pulmonary arteries, SVC, arch branches, oesophagus; liver, stomach, spleen; the table."""
    k, age, heart_top = a.k, a.age, a.heart_top
    hil_r, hil_l = a.hilum["R"], a.hilum["L"]
    # aorta, pulmonary arteries, veins, oesophagus
    a.ao_r = float(np.clip(uniform(rng, 11, 13.5) + 0.06 * (age - 55.0), 10.0, 17.0))
    ang = math.radians(uniform(rng, 35, 50))
    dd = a.vb_r + 0.85 * a.ao_r + 2.0
    a.dao = (a.bx + math.sin(ang) * dd, a.vb_y - math.cos(ang) * dd)
    ax_, ay_ = a.bx - uniform(rng, 4, 10), a.cyc - 0.36 * a.cb
    r = a.ao_r
    a.aorta = polyline(
        [
            (ax_ + 2.0, ay_ + 8.0, heart_top - 22.0),
            (ax_, ay_, heart_top),
            (ax_ - 1.0, ay_ - 2.0, a.arch_z - 14.0),
            (a.bx + 2.0, a.cyc - 0.3 * a.cb, a.arch_z - 1.0),
            (a.bx + 12.0, a.cyc - 0.05 * a.cb, a.arch_z),
            (a.dao[0] + 2.0, a.dao[1] - 12.0, a.arch_z - 10.0),
            (a.dao[0], a.dao[1], a.arch_z - 28.0),
            (a.dao[0] + 1.0, a.dao[1], 0.0),
            (a.dao[0] - 3.0, a.dao[1] - 3.0, -130.0),
        ],
        [r, r, r, 0.95 * r, 0.92 * r, 0.9 * r, 0.88 * r, 0.86 * r, 0.85 * r],
    )
    pt0 = (a.bx + uniform(rng, 14, 22), a.cyc - 0.38 * a.cb, heart_top - 14.0)
    pt1 = (a.bx + 12.0, a.cyc - 0.18 * a.cb, a.carina_z - 8.0)
    a.pulmonary = (
        polyline([pt0, pt1], [13.0 * k, 12.0 * k])
        + polyline(
            [pt1, (a.bx + 30.0, a.cyc + 0.05 * a.cb, a.carina_z - 10.0), np.add(hil_l, (0.0, -9.0, 6.0))],
            [11.0 * k, 10.0 * k, 8.0 * k],
        )
        + polyline(
            [pt1, (a.bx - 10.0, a.cyc - 0.02 * a.cb, a.carina_z - 12.0), np.add(hil_r, (0.0, -9.0, 6.0))],
            [10.5 * k, 10.0 * k, 8.0 * k],
        )
    )
    a.svc = (a.bx - 30.0 * k, a.cyc - 0.25 * a.cb)
    a.veins = polyline(
        [(a.svc[0], a.svc[1], 130.0), (a.svc[0] + 2.0, a.svc[1] + 2.0, heart_top - 6.0)], [9.0, 9.5]
    )
    a.arch_branches = (
        polyline(
            [(a.bx - 4.0, a.cyc - 0.3 * a.cb, a.arch_z), (a.bx - 14.0, a.cyc - 0.22 * a.cb, 130.0)],
            [6.5, 6.0],
        )
        + polyline(
            [(a.bx + 5.0, a.cyc - 0.18 * a.cb, a.arch_z), (a.bx + 8.0, a.cyc - 0.1 * a.cb, 130.0)], [4.5, 4.5]
        )
        + polyline(
            [(a.bx + 14.0, a.cyc - 0.02 * a.cb, a.arch_z), (a.bx + 26.0, a.cyc + 0.05 * a.cb, 130.0)],
            [5.5, 5.5],
        )
    )
    a.oesophagus = polyline(
        [
            (a.oe_x, a.oe_y, 130.0),
            (a.oe_x + 2.0, a.oe_y, a.dome_l + 10.0),
            (a.bx + 30.0, a.cyc + 0.1 * a.cb, a.dome_l - 25.0),
        ],
        [a.oe_r, a.oe_r, a.oe_r],
    )
    # abdomen below the diaphragm
    a.liver_hu = uniform(rng, 50, 62)
    a.stomach_c = (a.bx + 0.45 * a.ca, a.cyc - 0.15 * a.cb, a.dome_l - uniform(rng, 28, 36))
    a.stomach_r = (34.0 * k, 30.0 * k, 34.0 * k)
    a.spleen_c = (a.bx + 0.72 * a.ca, a.cyc + 0.5 * a.cb, a.dome_l - 42.0)
    a.spleen_r = (20.0 * k, 34.0 * k, 40.0 * k)
    a.table_y = a.by + a.bb + uniform(rng, 4, 10)


NODE_HU = 40.0  # lymph nodes, normal and enlarged


def _stations(rng: np.random.Generator, a: Anatomy):
    """The six mediastinal/hilar lymph-node stations ``{name: (x, y, z)}`` and the short-axis radius (3-4 mm)
    of the normal node every chest has at each."""
    hr, hl = np.asarray(a.hilum["R"]), np.asarray(a.hilum["L"])
    stations = {
        "right paratracheal": (a.tr_x - a.tr_r - 16.0, a.tr_y - 4.0, a.carina_z + uniform(rng, 12, 30)),
        "aortopulmonary window": (a.bx + 22.0, a.cyc + 0.02 * a.cb, a.carina_z + uniform(rng, 0, 8)),
        "subcarinal": (a.tr_x + 3.0, a.tr_y + 16.0, a.carina_z - uniform(rng, 16, 24)),
        "prevascular": (a.bx - 2.0, a.cyc - 0.36 * a.cb - a.ao_r - 12.0, a.arch_z - uniform(rng, 10, 20)),
        "right hilar": tuple(hr + (-4.0, -14.0, -8.0)),
        "left hilar": tuple(hl + (4.0, -14.0, -6.0)),
    }
    normal = {}
    for name, (x, y, z) in stations.items():
        stations[name] = (float(x), float(y), min(float(z), 64.0))
        normal[name] = uniform(rng, 3.0, 4.0)
    return stations, normal
