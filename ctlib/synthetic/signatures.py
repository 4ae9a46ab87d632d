"""The 18 abnormality signatures: what each class looks like in the phantom (:data:`SIGNATURES`), which
classes need 3D context by construction (:func:`class_groups`), and per-patient descriptive variants
shared by the drawing and the report. The geometry is in :mod:`ctlib.synthetic.lesions`; sizes and
contrasts at each profile's resolution are in DATA.md."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ctlib.data import CLASSES
from ctlib.synthetic.anatomy import child_rng

CLS = {c: i for i, c in enumerate(CLASSES)}


@dataclass(frozen=True)
class Signature:
    """How one class is drawn: ``description`` (size, HU, place), ``needs_3d`` (True when no single axial
    slice can tell a positive volume from a negative one, by construction) and the ``reason``."""

    description: str
    needs_3d: bool
    reason: str


_ONE_SLICE = "one axial slice through it shows a finding that no negative volume has"

SIGNATURES: dict[str, Signature] = {
    "Medical material": Signature(
        "metal (2300-3500 HU): a pacemaker/ICD generator (44-60 mm) in the anterior chest wall with leads "
        "through the SVC into the right heart, a port with a catheter, or a 12-16 mm coil pack at a hilum",
        False, _ONE_SLICE + " (nothing else exceeds 2000 HU)"),
    "Arterial wall calcification": Signature(
        "4-10 bright plaques (700-1200 HU, 10-14 mm in-plane, 12-16 mm long) on the wall of the ascending "
        "aorta, arch or descending aorta", False, _ONE_SLICE + " (a bright spot on the aortic wall)"),
    "Cardiomegaly": Signature(
        "the heart scaled 1.28-1.45x (cardiothoracic ratio ~0.6 instead of ~0.45), displacing the left lung",
        False, "the heart's cross-section in a mid slice is larger than any normal heart's"),
    "Pericardial effusion": Signature(
        "an 8-22 mm rim of fluid (5-18 HU) around the heart, outside the epicardial fat line", False,
        _ONE_SLICE + " (a fluid band around the heart)"),
    "Coronary artery wall calcification": Signature(
        "3-8 very bright spots (900-1500 HU, 9-12 mm) on the heart surface along the LAD, circumflex and "
        "right coronary grooves", False, _ONE_SLICE + " (a bright spot on the heart's surface)"),
    "Hiatal hernia": Signature(
        "a 50-70 mm soft-tissue-walled mass behind the heart just above the diaphragm, with gas anteriorly "
        "and fluid posteriorly", False, _ONE_SLICE + " (a gas-containing mass behind the heart)"),
    "Lymphadenopathy": Signature(
        "2-5 enlarged nodes (short axis 16-24 mm, 40 HU) at paratracheal, aortopulmonary, subcarinal, "
        "prevascular or hilar stations, in place of the normal node (short axis 6-8 mm) every chest has there",
        False, _ONE_SLICE + " (a node whose short axis is at least twice any normal node's, the "
        "radiological definition: short axis on one axial slice)"),
    "Emphysema": Signature(
        "confluent low-attenuation areas (-990 HU) over 30-50% of the lung, 12-18 mm blobs, upper-zone "
        "predominant, pruned vessels, 1-3 subpleural bullae (20-36 mm)", False,
        _ONE_SLICE + " (lung below -950 HU in multi-voxel patches)"),
    "Atelectasis": Signature(
        "dense (20-45 HU) plate-like bands 12-18 mm thick or a 36-52 mm pleura-based wedge in the lower lung",
        False, _ONE_SLICE + " (a dense band or wedge in the lung)"),
    "Lung nodule": Signature(
        "every chest has four vertical lung columns of five slices, each slice a round 40 HU disc: two large "
        "(radius 12-15 mm at full strength) and three thin (5-6 mm); negative: the large discs at the "
        "column's lower end (a vessel tapering into a branch); positive: one thin disc below them (a "
        "nodule threaded on a thin vessel)", True,
        "a positive volume is its negative twin with three slices reordered (the chest is held still over "
        "them, the noise moves with its slice): the same set of slices, so no model that treats a volume "
        "as a set of slices can tell them apart; only the order along z differs"),
    "Lung opacity": Signature(
        "2-4 ground-glass patches (-550 to -400 HU, 44-72 mm) with irregular margins, vessels visible "
        "through them", False, _ONE_SLICE + " (a hazy patch denser than lung)"),
    "Pulmonary fibrotic sequela": Signature(
        "pleuroparenchymal thickening (24-36 mm thick cap at the pleura) with 3-6 dense linear strands "
        "(5-7 mm) towards the hilum and short reticular lines, usually in an upper zone", False,
        _ONE_SLICE + " (a pleural cap with strands)"),
    "Pleural effusion": Signature(
        "a crescent of fluid (5-20 HU) layering along the dependent posterior chest wall, thickest (20-45 mm) "
        "at the base, uni- or bilateral", False, _ONE_SLICE + " (a dependent fluid crescent)"),
    "Mosaic attenuation pattern": Signature(
        "both lungs divided into 24-34 mm lobular regions alternately lucent (~-940 HU, thinner vessels) and "
        "denser (~-750 HU)", False, _ONE_SLICE + " (patchy lucent and dense lung)"),
    "Peribronchial thickening": Signature(
        "every bronchial wall 4.5-6 mm thicker than normal (soft-tissue cuffs around the airways, most "
        "visible near the hila)", False, _ONE_SLICE + " (thick cuffs around the bronchi)"),
    "Consolidation": Signature(
        "a dense (25-45 HU) pleura-based lobar/segmental region (50-90 mm) with irregular margins that "
        "obscures the vessels and shows air bronchograms", False, _ONE_SLICE + " (dense lung with air bronchograms)"),
    "Bronchiectasis": Signature(
        "3-5 dilated airways (lumen radius 8-11 mm, wall 3-4 mm, wider than the accompanying vessel: "
        "signet ring) running 60-100 mm cranio-caudally", False,
        "one slice shows a thick-walled air ring wider than any normal intrapulmonary airway"),
    "Interlobular septal thickening": Signature(
        "a polygonal network of septal lines (4-5 mm, ~20 HU) in the peripheral 18-28 mm of the lower and "
        "middle lung", False, _ONE_SLICE + " (a peripheral polygonal line network)"),
}


def class_groups() -> dict[str, list[str]]:
    """``{"2D": [...], "3D": [...]}``: the classes that one slice suffices for, and those that need 3D
    context (``SIGNATURES[c].needs_3d``), each in ``ctlib.data.CLASSES`` order."""
    return {
        "2D": [c for c in CLASSES if not SIGNATURES[c].needs_3d],
        "3D": [c for c in CLASSES if SIGNATURES[c].needs_3d],
    }


def signature_table() -> pd.DataFrame:
    """One row per class (CLASSES order, index ``class``): ``group`` ("2D"/"3D"), ``signature``, ``reason``."""
    return pd.DataFrame(
        {
            "group": ["3D" if SIGNATURES[c].needs_3d else "2D" for c in CLASSES],
            "signature": [SIGNATURES[c].description for c in CLASSES],
            "reason": [SIGNATURES[c].reason for c in CLASSES],
        },
        index=pd.Index(list(CLASSES), name="class"),
    )


# ---------------------------------------------------------------------------------------------
# per-patient variants (shared by the drawing and the report)
# ---------------------------------------------------------------------------------------------
_SIDE3 = ("both", "right", "left")


def patient_variants(base: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Descriptive choices per class for one patient (device, side, count...): one stream per class,
    so that a repeat scan and the report agree with the drawing."""
    out: dict[str, dict[str, Any]] = {}
    for c in CLASSES:
        r = child_rng(*base, 200 + CLS[c])
        v: dict[str, Any] = {}
        if c == "Medical material":
            v["device"] = str(r.choice(["pacemaker", "icd", "port", "coil"], p=[0.4, 0.15, 0.3, 0.15]))
            v["side"] = str(r.choice(["R", "L"]))
        elif c in ("Pleural effusion", "Atelectasis", "Lung opacity", "Bronchiectasis"):
            v["side"] = str(r.choice(_SIDE3, p=[0.5, 0.3, 0.2]))
        elif c in ("Consolidation", "Pulmonary fibrotic sequela"):
            v["side"] = str(r.choice(["right", "left"]))
        if c == "Consolidation":
            v["zone"] = "lower" if r.random() < 0.65 else "upper"
        elif c == "Pulmonary fibrotic sequela":
            v["zone"] = "upper" if r.random() < 0.7 else "lower"
        elif c == "Atelectasis":
            v["form"] = "plate-like" if r.random() < 0.55 else "wedge-shaped"
        elif c == "Lung nodule":  # drawn on all four columns (ctlib.synthetic.column); kept for the streams
            v["count"] = int(r.choice([1, 2, 3], p=[0.55, 0.3, 0.15]))
        elif c == "Lung opacity":
            v["count"] = int(r.integers(2, 5))
        elif c == "Emphysema":
            v["bullae"] = int(r.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
        elif c == "Lymphadenopathy":
            v["count"] = int(r.integers(2, 6))
        out[c] = v
    return out

