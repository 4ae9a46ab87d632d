"""The geometry of every lesion of a scan in reference millimetres: one function per class, in the
order in which focal lung lesions avoid the regional ones (see DATA.md, "Signatures")."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from ctlib.data import CLASSES
from ctlib.synthetic.anatomy import (
    NODE_HU,
    Anatomy,
    cavity_depth,
    child_rng,
    heart_shape,
    in_lung,
    lung_point,
    perp,
    uniform,
    wiggle,
)
from ctlib.synthetic.geometry import F32, ZC, Coarse, coarse_axes, polyline, smooth_field
from ctlib.synthetic.signatures import CLS, patient_variants

_Var = Mapping[str, Any]  # the per-class variants of a patient (signatures.patient_variants)


def _voronoi(
    a: Anatomy, rng: np.random.Generator, lo, hi, cell: float, zstretch: float, shell: float
) -> Coarse:
    """Distance (mm) to the nearest wall of random Voronoi cells of mean size ``cell`` (elongated in z
    by ``zstretch``, so the walls are near-vertical sheets) over ``[lo, hi]``, on a 4 mm grid;
    only points within ``shell`` mm of the thoracic cavity wall are evaluated (others: 99)."""
    span = np.array(hi, float) - np.array(lo, float) + 2 * cell
    n = int(np.prod(span / np.array([cell, cell, cell * zstretch])))
    seeds = np.array(lo, float) - cell + rng.random((max(n, 4), 3)) * span
    scale = np.array([1.0, 1.0, 1.0 / zstretch])
    axes = coarse_axes(lo, hi, (4.0, 4.0, 5.0))
    shape = tuple(len(ax) for ax in axes)
    keep2 = cavity_depth(a, axes[0][:, None], axes[1][None, :]) < shell
    vals = np.full(shape, 99.0, F32)
    ix, iy = np.nonzero(keep2)
    if ix.size:
        pts = np.empty((ix.size, shape[2], 3))
        pts[..., 0] = axes[0][ix][:, None]
        pts[..., 1] = axes[1][iy][:, None]
        pts[..., 2] = axes[2][None, :]
        d, _ = cKDTree(seeds * scale).query(pts.reshape(-1, 3) * scale, k=2)
        vals[ix, iy, :] = (0.5 * (d[:, 1] - d[:, 0])).reshape(ix.size, shape[2])
    return Coarse(axes, vals)


def _sides(side: str) -> list[str]:
    return {"both": ["R", "L"], "right": ["R"], "left": ["L"], "R": ["R"], "L": ["L"]}[side]


def _sphere_avoid(c: Sequence[float], r: float) -> Callable[[np.ndarray], np.ndarray]:
    c = np.asarray(c, float)
    return lambda p: np.linalg.norm(p - c, axis=1) < r


def _wall_point(a: Anatomy, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cavity wall point on the ray from the cavity axis through ``p`` (same z), and the unit
    in-plane inward normal there."""
    rho = max(math.sqrt(((p[0] - a.bx) / a.ca) ** 2 + ((p[1] - a.cyc) / a.cb) ** 2), 1e-6)
    wall = np.array([a.bx + (p[0] - a.bx) / rho, a.cyc + (p[1] - a.cyc) / rho, p[2]])
    inward = np.array([a.bx - wall[0], a.cyc - wall[1], 0.0])
    return wall, inward / max(float(np.linalg.norm(inward)), 1e-6)


def effusion_thickness(p: Mapping[str, Any], z):
    return p["t0"] * np.clip((p["z_top"] - z) / (p["z_top"] + 100.0), 0.0, 1.0) ** 0.6


def dependency(a: Anatomy, y):
    """1 at the posterior (dependent) wall, 0 anteriorly."""
    return np.clip((y - a.cyc) / a.cb + 0.35, 0.0, 1.0) ** 0.8


def _lesion_cardiomegaly(a: Anatomy, base: Sequence[int], var: _Var, avoid: list, les: dict) -> None:
    """Cardiomegaly: its geometry into ``les``."""
    les["Cardiomegaly"] = {"scale": uniform(_stream(base, "Cardiomegaly"), 1.28, 1.45)}


def _lesion_pericardial_effusion(a: Anatomy, base: Sequence[int], var: _Var, avoid: list, les: dict) -> None:
    """Pericardial effusion: its geometry into ``les``."""
    r = _stream(base, "Pericardial effusion")
    les["Pericardial effusion"] = {"t": uniform(r, 8, 22), "hu": uniform(r, 5, 18)}


def _lesion_pleural_effusion(a: Anatomy, base: Sequence[int], var: _Var, avoid: list, les: dict) -> None:
    """Pleural effusion: its geometry into ``les``."""
    r = _stream(base, "Pleural effusion")
    p = {
        "sides": _sides(var["Pleural effusion"]["side"]),
        "t0": uniform(r, 20, 45),
        "z_top": uniform(r, -10, 25),
        "hu": uniform(r, 5, 20),
    }
    les["Pleural effusion"] = p
    sides = p["sides"]

    def eff_avoid(q, p=p, sides=sides):
        on_side = np.zeros(len(q), bool)
        for s in sides:
            on_side |= (q[:, 0] < a.bx) if s == "R" else (q[:, 0] > a.bx)
        t = effusion_thickness(p, q[:, 2]) * dependency(a, q[:, 1]) + 12.0
        return on_side & (cavity_depth(a, q[:, 0], q[:, 1]) < t)

    avoid.append(eff_avoid)


def _lesion_consolidation(a: Anatomy, base: Sequence[int], var: _Var, avoid: list, les: dict) -> None:
    """Consolidation: its geometry into ``les``."""
    r = _stream(base, "Consolidation")
    v = var["Consolidation"]
    side = _sides(v["side"])[0]
    zr = (-70.0, -15.0) if v["zone"] == "lower" else (10.0, 65.0)
    ypred = (lambda y: y > a.cyc) if v["zone"] == "lower" else (lambda y: y < a.cyc + 0.3 * a.cb)
    p = lung_point(r, a, side, margin=12.0, zr=zr, avoid=avoid, ypred=ypred)
    wall, inward = _wall_point(a, p)
    radii = (uniform(r, 24, 34), uniform(r, 32, 45), uniform(r, 28, 40))  # (along the wall, radial, z)
    c = wall + inward * 0.55 * radii[1]
    ang = math.atan2(inward[1], inward[0]) + math.pi / 2
    R = max(radii)
    field_ = smooth_field(r, c - R - 10.0, c + R + 10.0, 14.0)
    hil = np.asarray(a.hilum[side])
    bron = []
    s0 = c + 0.45 * (hil - c) / max(np.linalg.norm(hil - c), 1e-6) * R
    for _ in range(int(r.integers(3, 6))):
        s1 = (
            wall
            + inward * uniform(r, 6, 14)
            + r.normal(0, 1, 3) * np.array([radii[0], radii[0], radii[2]]) * 0.5
        )
        bron += polyline([s0, 0.5 * (s0 + s1) + r.normal(0, 3, 3), s1], [uniform(r, 2.4, 3.2), 2.0, 1.5])
    les["Consolidation"] = {
        "c": c,
        "radii": radii,
        "angle": ang,
        "field": field_,
        "hu": uniform(r, 25, 45),
        "bron": bron,
    }
    avoid.append(_sphere_avoid(c, R + 6.0))


def _lesion_atelectasis(a: Anatomy, base: Sequence[int], var: _Var, avoid: list, les: dict) -> None:
    """Atelectasis: its geometry into ``les``."""
    r = _stream(base, "Atelectasis")
    v = var["Atelectasis"]
    parts = []
    for s in _sides(v["side"]):
        if v["form"] == "plate-like":  # bands from the pleura towards the hilum
            for _ in range(int(r.integers(1, 3))):
                p = lung_point(r, a, s, margin=8.0, zr=(-60.0, -8.0), avoid=avoid)
                wall, inward = _wall_point(a, p)
                radii = (uniform(r, 28, 40), uniform(r, 6.0, 9.0), uniform(r, 18, 26))
                ang = math.atan2(inward[1], inward[0]) + uniform(r, -0.35, 0.35)
                c = wall + radii[0] * 0.85 * np.array([math.cos(ang), math.sin(ang), 0.0])
                parts.append((c, radii, ang))
        else:
            c = lung_point(
                r,
                a,
                s,
                margin=4.0,
                zr=(-60.0, -15.0),
                avoid=avoid,
                ypred=lambda y: y > a.cyc + 0.25 * a.cb,
            )
            wall, inward = _wall_point(a, c)  # a wedge: half an ellipsoid standing on the pleura
            radii = (uniform(r, 30, 42), uniform(r, 18, 26), uniform(r, 22, 30))
            ang = math.atan2(inward[1], inward[0])
            parts.append((wall + inward * 4.0, radii, ang))
    les["Atelectasis"] = {"parts": parts, "hu": uniform(r, 20, 45)}
    for c, radii, _ in parts:
        avoid.append(_sphere_avoid(c, max(radii) + 5.0))


def _lesion_lung_opacity(a: Anatomy, base: Sequence[int], var: _Var, avoid: list, les: dict) -> None:
    """Lung opacity: its geometry into ``les``."""
    r = _stream(base, "Lung opacity")
    v = var["Lung opacity"]
    patches = []
    sides = _sides(v["side"])
    for i in range(v["count"]):
        c = lung_point(r, a, sides[i % len(sides)], margin=6.0, zr=(-ZC + 10, ZC - 10))
        radii = (uniform(r, 22, 36), uniform(r, 22, 34), uniform(r, 22, 36))
        R = max(radii)
        patches.append((c, radii, smooth_field(r, c - R - 8.0, c + R + 8.0, 10.0), uniform(r, -550, -400)))
    les["Lung opacity"] = {"patches": patches}


def _lesion_pulmonary_fibrotic_sequela(a: Anatomy, base: Sequence[int], var: _Var, avoid: list, les: dict) -> None:
    """Pulmonary fibrotic sequela: its geometry into ``les``."""
    r = _stream(base, "Pulmonary fibrotic sequela")
    v = var["Pulmonary fibrotic sequela"]
    side = _sides(v["side"])[0]
    zr = (25.0, 68.0) if v["zone"] == "upper" else (-60.0, -20.0)
    p = lung_point(r, a, side, margin=10.0, zr=zr, avoid=avoid)
    wall, inward = _wall_point(a, p)
    normal = math.atan2(inward[1], inward[0])
    cap = (wall, (uniform(r, 26, 38), uniform(r, 12, 18), uniform(r, 18, 28)), normal + math.pi / 2)
    hil = np.asarray(a.hilum[side])
    strands = []
    for _ in range(int(r.integers(3, 7))):
        s0 = wall + r.normal(0, 9, 3) * np.array([1, 1, 0.8])
        s1 = s0 + (hil - s0) * uniform(r, 0.35, 0.6) + r.normal(0, 8, 3)
        strands += polyline([s0, 0.5 * (s0 + s1) + r.normal(0, 3, 3), s1], [uniform(r, 2.8, 3.6), 2.8, 2.5])
    for _ in range(int(r.integers(3, 6))):
        s0 = wall + (p - wall) * uniform(r, 0.2, 0.8) + r.normal(0, 8, 3)
        s1 = s0 + r.normal(0, 9, 3)
        strands.append((tuple(s0), tuple(s1), 2.6, 2.4))
    les["Pulmonary fibrotic sequela"] = {"cap": cap, "strands": strands, "hu": uniform(r, 20, 40)}
    avoid.append(_sphere_avoid(wall, 40.0))


def _lesion_bronchiectasis(a: Anatomy, base: Sequence[int], var: _Var, avoid: list, les: dict) -> None:
    """Bronchiectasis: its geometry into ``les``."""
    r = _stream(base, "Bronchiectasis")
    sides = _sides(var["Bronchiectasis"]["side"])
    tubes, comp = [], []
    for i in range(int(r.integers(3, 6))):
        s = sides[i % len(sides)]
        start = lung_point(r, a, s, margin=14.0, zr=(0.0, 45.0), avoid=avoid)
        for _ in range(12):
            length = uniform(r, 60, 100)
            end = start + np.array([uniform(r, -20, 20), uniform(r, -10, 25), -length])
            end[2] = max(end[2], -ZC + 4.0)
            pts = wiggle(r, start, end, 6, 0.03)
            if in_lung(a, np.array(pts), 9.0).all():
                break
        else:
            end = lung_point(r, a, s, margin=9.0, near=start + np.array([0, 0, -55.0]), spread=8.0)
            pts = wiggle(r, start, end, 6, 0.02)
        rb, wall = uniform(r, 8.0, 11.0), uniform(r, 3.0, 4.0)
        phase = uniform(r, 0, 2 * math.pi)
        radii = [rb * (1.0 + 0.15 * math.sin(phase + 1.7 * j)) for j in range(len(pts))]
        tubes.append((polyline(pts, radii), wall))
        rv = uniform(r, 2.2, 3.2)
        off = perp(r, np.asarray(pts[-1]) - np.asarray(pts[0]))
        off[2] = 0.0
        off /= max(float(np.linalg.norm(off)), 1e-6)
        comp += polyline(
            [np.asarray(q) + off * (max(radii) + wall + rv + 0.8) for q in pts], [rv] * len(pts)
        )
        for q in pts:
            avoid.append(_sphere_avoid(q, rb + 10.0))
    les["Bronchiectasis"] = {"tubes": tubes, "vessels": comp}


def _lesion_lung_nodule(a: Anatomy, base: Sequence[int], var: _Var, avoid: list, les: dict) -> None:
    """Lung nodule: drawn by the columns every chest has (:mod:`ctlib.synthetic.column`), as the order of
    their discs; nothing to place here."""
    les["Lung nodule"] = {}


def _lesion_emphysema(a: Anatomy, base: Sequence[int], var: _Var, avoid: list, les: dict) -> None:
    """Emphysema: its geometry into ``les``."""
    r = _stream(base, "Emphysema")
    lo = (a.bx - a.ca, a.cyc - a.cb, -125.0)
    hi = (a.bx + a.ca, a.cyc + a.cb, 125.0)
    bullae = []
    for _ in range(var["Emphysema"]["bullae"]):
        s = "R" if r.random() < 0.5 else "L"
        p = lung_point(r, a, s, margin=2.0, zr=(15.0, ZC - 10))
        rad = uniform(r, 10, 18)
        wall, inward = _wall_point(a, p)
        c = wall + inward * (0.8 * rad)
        bullae.append((c, rad))
    les["Emphysema"] = {
        "field": smooth_field(r, lo, hi, uniform(r, 12, 18)),
        "frac": uniform(r, 0.3, 0.5),
        "bullae": bullae,
    }


def _lesion_mosaic_attenuation_pattern(a: Anatomy, base: Sequence[int], var: _Var, avoid: list, les: dict) -> None:
    """Mosaic attenuation pattern: its geometry into ``les``."""
    r = _stream(base, "Mosaic attenuation pattern")
    lo = (a.bx - a.ca, a.cyc - a.cb, -125.0)
    hi = (a.bx + a.ca, a.cyc + a.cb, 125.0)
    les["Mosaic attenuation pattern"] = {
        "cells": smooth_field(r, lo, hi, uniform(r, 24, 34)),
        "low": uniform(r, 70, 90),
        "high": uniform(r, 90, 130),
    }


def _lesion_interlobular_septal_thickening(a: Anatomy, base: Sequence[int], var: _Var, avoid: list, les: dict) -> None:
    """Interlobular septal thickening: its geometry into ``les``."""
    r = _stream(base, "Interlobular septal thickening")
    z_top = uniform(r, 25, 50)
    lo = (a.bx - a.ca, a.cyc - a.cb, -125.0)
    hi = (a.bx + a.ca, a.cyc + a.cb, z_top + 5.0)
    les["Interlobular septal thickening"] = {
        "edges": _voronoi(a, r, lo, hi, uniform(r, 15, 22), 2.5, 33.0),
        "w": uniform(r, 2.0, 2.5),
        "shell": uniform(r, 18, 28),
        "z_top": z_top,
        "hu": uniform(r, 10, 30),
    }


def _lesion_peribronchial_thickening(a: Anatomy, base: Sequence[int], var: _Var, avoid: list, les: dict) -> None:
    """Peribronchial thickening: its geometry into ``les``."""
    les["Peribronchial thickening"] = {"extra": uniform(_stream(base, "Peribronchial thickening"), 4.5, 6.0)}


def _lesion_lymphadenopathy(a: Anatomy, base: Sequence[int], var: _Var, avoid: list, les: dict) -> None:
    """Lymphadenopathy: enlarged ovoid nodes (short axis 16-24 mm) in place of the normal nodes of some stations."""
    r = _stream(base, "Lymphadenopathy")
    names = list(a.stations)
    pick = r.choice(len(names), size=min(var["Lymphadenopathy"]["count"], len(names)), replace=False)
    nodes = []
    for i in sorted(int(j) for j in pick):
        rad = uniform(r, 8.0, 12.0)
        nodes.append((names[i], np.array(a.stations[names[i]]), (rad, rad, 1.15 * rad), NODE_HU))
    les["Lymphadenopathy"] = {"nodes": nodes}


def _lesion_hiatal_hernia(a: Anatomy, base: Sequence[int], var: _Var, avoid: list, les: dict) -> None:
    """Hiatal hernia: its geometry into ``les``."""
    r = _stream(base, "Hiatal hernia")
    radii = (uniform(r, 25, 35), uniform(r, 18, 23), uniform(r, 25, 35))
    c = (a.bx + uniform(r, 5, 18), a.vb_y - a.vb_r - radii[1] + 2.0, a.dome_l + uniform(r, 12, 24))
    les["Hiatal hernia"] = {"c": c, "radii": radii, "level": uniform(r, -0.6, -0.2), "hu": uniform(r, 10, 25)}


def _lesion_coronary_artery_wall_calcification(a: Anatomy, base: Sequence[int], var: _Var, avoid: list, les: dict) -> None:
    """Coronary artery wall calcification: its geometry into ``les``."""
    r = _stream(base, "Coronary artery wall calcification")
    (hx, hy, hz), (ra, rb, rc), ang = heart_shape(a, les)
    spots = []
    courses = {
        "LAD": ((0.15, 0.5), (-1.0, -1.0), (-0.4, 0.6)),
        "LCx": ((0.9, 0.9), (-0.1, 0.5), (0.2, 0.6)),
        "RCA": ((-0.9, -0.9), (-0.6, -0.2), (-0.2, 0.5)),
        "LM": ((0.2, 0.2), (-0.6, -0.6), (0.8, 0.8)),
    }
    for _ in range(int(r.integers(3, 9))):
        cu, cv, cw = courses[str(r.choice(list(courses), p=[0.45, 0.2, 0.25, 0.1]))]
        uvw = np.array([uniform(r, *cu), uniform(r, *cv), uniform(r, *cw)])
        uvw /= np.linalg.norm(uvw)
        u, v, w = uvw[0] * (ra + 4.0), uvw[1] * (rb + 4.0), uvw[2] * (rc + 4.0)
        p = (
            hx + u * math.cos(ang) - v * math.sin(ang),
            hy + u * math.sin(ang) + v * math.cos(ang),
            hz + w,
        )
        spots.append((p, (uniform(r, 4.5, 6.0), uniform(r, 4.5, 6.0), uniform(r, 4.5, 6.0)), uniform(r, 900, 1500)))
    les["Coronary artery wall calcification"] = {"spots": spots}


def _lesion_arterial_wall_calcification(a: Anatomy, base: Sequence[int], var: _Var, avoid: list, les: dict) -> None:
    """Arterial wall calcification: its geometry into ``les``."""
    r = _stream(base, "Arterial wall calcification")
    segs = [s for s in a.aorta if abs(0.5 * (s[0][2] + s[1][2])) < ZC]
    lengths = np.array([np.linalg.norm(np.subtract(s[1], s[0])) for s in segs])
    plaques = []
    for _ in range(int(r.integers(4, 11))):
        p0, p1, r0, r1 = segs[int(r.choice(len(segs), p=lengths / lengths.sum()))]
        for _ in range(20):
            t = uniform(r, 0, 1)
            q = np.add(p0, t * np.subtract(p1, p0))
            if abs(q[2]) < ZC:
                break
        n = perp(r, np.subtract(p1, p0))
        pos = q + n * (r0 + t * (r1 - r0) + 1.0)
        plaques.append((pos, (uniform(r, 5.0, 7.0), uniform(r, 5.0, 7.0), uniform(r, 6.0, 8.0)), uniform(r, 700, 1200)))
    les["Arterial wall calcification"] = {"plaques": plaques}


def _lesion_medical_material(a: Anatomy, base: Sequence[int], var: _Var, avoid: list, les: dict) -> None:
    """Medical material: its geometry into ``les``."""
    les["Medical material"] = _prepare_device(a, les, var["Medical material"], _stream(base, "Medical material"))


_PREPARE: tuple[tuple[str, Callable], ...] = (
    ("Cardiomegaly", _lesion_cardiomegaly),
    ("Pericardial effusion", _lesion_pericardial_effusion),
    ("Pleural effusion", _lesion_pleural_effusion),
    ("Consolidation", _lesion_consolidation),
    ("Atelectasis", _lesion_atelectasis),
    ("Lung opacity", _lesion_lung_opacity),
    ("Pulmonary fibrotic sequela", _lesion_pulmonary_fibrotic_sequela),
    ("Bronchiectasis", _lesion_bronchiectasis),
    ("Lung nodule", _lesion_lung_nodule),
    ("Emphysema", _lesion_emphysema),
    ("Mosaic attenuation pattern", _lesion_mosaic_attenuation_pattern),
    ("Interlobular septal thickening", _lesion_interlobular_septal_thickening),
    ("Peribronchial thickening", _lesion_peribronchial_thickening),
    ("Lymphadenopathy", _lesion_lymphadenopathy),
    ("Hiatal hernia", _lesion_hiatal_hernia),
    ("Coronary artery wall calcification", _lesion_coronary_artery_wall_calcification),
    ("Arterial wall calcification", _lesion_arterial_wall_calcification),
    ("Medical material", _lesion_medical_material),
)


def _stream(base: Sequence[int], c: str) -> np.random.Generator:
    """The random stream of class ``c`` for the patient ``base``."""
    return child_rng(*base, 100 + CLS[c])


def prepare_lesions(a: Anatomy, labels: Sequence[int], base: Sequence[int],
                     keep_clear: Sequence[Callable[[np.ndarray], np.ndarray]] = ()) -> dict[str, dict[str, Any]]:
    """Geometry of every labelled abnormality of one scan (reference mm), keyed by class.

    Each class has its own random stream (keyed by the patient), so a lesion keeps its place in a
    repeat scan and toggling one class leaves the others unchanged. Focal lung lesions avoid the
    regions of the regional ones (drawn first) so that every drawn lesion stays visible."""
    present = {c for c, v in zip(CLASSES, labels, strict=True) if v}
    var = patient_variants(base)
    les: dict[str, dict[str, Any]] = {}
    avoid: list[Callable[[np.ndarray], np.ndarray]] = list(keep_clear)
    for c, prepare in _PREPARE:
        if c in present:
            prepare(a, base, var, avoid, les)
    return les


def _prepare_device(a: Anatomy, les, v: Mapping[str, Any], r: np.random.Generator) -> dict[str, Any]:
    """Metal: generator/port/coil bodies (ellipsoids) and leads/catheters (tubes), HU > 2000."""
    (hx, hy, hz), (ra, rb, rc), _ = heart_shape(a, les)
    bodies, wires = [], []
    dev = v["device"]
    top_svc = (a.svc[0] + 1.0, a.svc[1] + 1.0, uniform(r, 85, 95))
    low_svc = (a.svc[0] + 2.0, a.svc[1] + 2.0, a.heart_top - 2.0)
    if dev in ("pacemaker", "icd", "port"):
        left = dev != "port"
        phi = math.radians(uniform(r, 50, 65) if left else uniform(r, 115, 130))
        depth = a.fat * 0.6 + (4.0 if dev != "icd" else 6.0)
        gx = a.bx + (a.ba - depth) * math.cos(phi)
        gy = a.by - (a.bb - depth) * math.sin(phi)
        gz = uniform(r, 45, 62)
        ang = math.atan2(-a.bb * math.cos(phi), -a.ba * math.sin(phi))
        size = {"pacemaker": (22.0, 5.0, 24.0), "icd": (30.0, 7.0, 33.0), "port": (13.0, 7.0, 13.0)}[dev]
        bodies.append(((gx, gy, gz), size, ang, uniform(r, 2950, 3400)))
        sub = (a.bx + (0.3 if left else -0.3) * a.ba, a.cyc - 0.8 * a.cb, gz + 14.0)
        if dev == "port":
            wires.append((polyline([(gx, gy, gz), sub, top_svc, low_svc], [1.4] * 4), uniform(r, 2300, 2700)))
        else:
            ra_pt = (hx - 0.55 * ra, hy - 0.1 * rb, hz + 0.1 * rc)
            rv_pt = (hx + 0.25 * ra, hy - 0.55 * rb, hz - 0.45 * rc)
            rad = 1.7 if dev == "pacemaker" else 2.6
            wires.append(
                (polyline([(gx, gy, gz), sub, top_svc, low_svc, ra_pt, rv_pt], [rad] * 6), uniform(r, 2900, 3300))
            )
            if r.random() < 0.5:
                raa = (hx - 0.3 * ra, hy - 0.65 * rb, hz + 0.55 * rc)
                wires.append(
                    (polyline([(gx, gy, gz), sub, top_svc, low_svc, raa], [1.6] * 5), uniform(r, 2900, 3300))
                )
    else:  # embolisation coil pack at a hilum
        side = v["side"]
        c = lung_point(r, a, side, margin=9.0, near=a.hilum[side], spread=25.0)
        bodies.append((tuple(c), (uniform(r, 6, 8), uniform(r, 6, 8), uniform(r, 7, 10)), uniform(r, 0, 3), uniform(r, 3200, 3500)))
        tail = c + r.normal(0, 10, 3)
        wires.append((polyline([c, tail], [1.3, 1.3]), 3000.0))
    return {"device": dev, "bodies": bodies, "wires": wires}
