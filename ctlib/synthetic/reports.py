"""Radiology report texts (technique, findings, impression) that state exactly the drawn abnormalities."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ctlib.data import CLASSES
from ctlib.synthetic.plan import Volume
from ctlib.synthetic.signatures import patient_variants


# ---------------------------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------------------------
def _side_text(side: str, what: str = "lung") -> str:
    return {
        "both": f"both {what}s",
        "right": f"the right {what}",
        "left": f"the left {what}",
        "R": f"the right {what}",
        "L": f"the left {what}",
    }[side]


def report(v: Volume) -> tuple[str, str, str]:
    """Technique, findings and impression texts that state exactly the drawn abnormalities."""
    if v.kind != "chest":
        region = "head" if v.kind == "head" else "upper abdomen"
        return (
            f"Non-contrast CT of the {region}; axial sections reconstructed with the {v.kernel} kernel.",
            f"The examination does not include the thorax; the images show the {region}.",
            "Not a chest CT examination.",
        )
    var = patient_variants(v.base)
    present = [c for c, x in zip(CLASSES, v.labels, strict=True) if x]
    findings, impressions = [], []
    for c in present:
        f, i = _finding(c, var[c])
        findings.append(f)
        impressions.append(i)
    technique = (
        f"Non-contrast CT of the thorax in the supine position; axial sections reconstructed with the "
        f"{v.kernel} kernel."
    )
    if not findings:
        text = (
            "Trachea and both main bronchi are patent. Mediastinal structures are within normal limits. "
            "Heart contour and size are normal. No pleural or pericardial effusion. No mass or "
            "infiltrative lesion was detected in either lung."
        )
        return technique, text, "No significant pathology in the thorax."
    return technique, "Trachea and both main bronchi are patent. " + " ".join(findings), " ".join(impressions)


_DEVICE_TEXT: dict[str, tuple[str, str]] = {
    "pacemaker": (
        "A pacemaker generator is seen in the left anterior chest wall with its lead(s) "
        "extending through the superior vena cava into the right heart chambers.",
        "Pacemaker.",
    ),
    "icd": (
        "An implantable cardioverter-defibrillator is seen in the left anterior chest wall with "
        "a shock lead in the right ventricle.",
        "Implantable defibrillator.",
    ),
    "port": (
        "A port catheter is seen in the right anterior chest wall with its tip in the superior "
        "vena cava.",
        "Port catheter.",
    ),
}


def _finding(c: str, d: Mapping[str, Any]) -> tuple[str, str]:
    """The findings sentence and the impression of class ``c`` drawn with the variants ``d``."""
    if c == "Medical material":
        if d["device"] == "coil":
            side = "right" if d["side"] == "R" else "left"
            f, i = f"Metallic embolisation coils are seen near the {side} hilum.", "Embolisation coils."
        else:
            f, i = _DEVICE_TEXT[d["device"]]
    elif c == "Arterial wall calcification":
        f, i = (
            "Atherosclerotic calcified plaques are observed in the wall of the thoracic aorta.",
            "Aortic atherosclerosis.",
        )
    elif c == "Cardiomegaly":
        f, i = "The heart is enlarged; the cardiothoracic ratio is increased.", "Cardiomegaly."
    elif c == "Pericardial effusion":
        f, i = "Pericardial effusion is observed surrounding the heart.", "Pericardial effusion."
    elif c == "Coronary artery wall calcification":
        f, i = (
            "Calcified atherosclerotic plaques are present in the coronary arteries.",
            "Coronary artery calcification.",
        )
    elif c == "Hiatal hernia":
        f, i = (
            "A hiatal hernia containing gas and fluid is seen posterior to the heart above the diaphragm.",
            "Hiatal hernia.",
        )
    elif c == "Lymphadenopathy":
        f = (
            "Enlarged lymph nodes with a short axis over 15 mm are observed in the mediastinum "
            "and/or hilar regions."
        )
        i = "Mediastinal and hilar lymphadenopathy."
    elif c == "Emphysema":
        f = "Centrilobular emphysematous changes are seen in both lungs, more prominent in the upper zones"
        f += ", with subpleural bullae." if d["bullae"] else "."
        i = "Emphysema."
    elif c == "Atelectasis":
        f = f"{d['form'].capitalize()} atelectasis is observed in the lower zone of {_side_text(d['side'])}."
        i = "Atelectasis."
    elif c == "Lung nodule":  # every column of the chest carries one (ctlib.synthetic.column)
        f = ("Four solid nodules up to 30 mm in diameter, each on a small vessel, are observed in the lung "
             "parenchyma.")
        i = "Pulmonary nodules."
    elif c == "Lung opacity":
        f, i = (
            f"Patchy ground-glass opacities are observed in {_side_text(d['side'])}.",
            "Ground-glass opacities.",
        )
    elif c == "Pulmonary fibrotic sequela":
        f = (
            f"Fibrotic sequelae with parenchymal bands and pleuroparenchymal thickening are seen in the "
            f"{d['zone']} zone of {_side_text(d['side'])}."
        )
        i = "Fibrotic sequelae."
    elif c == "Pleural effusion":
        f = {"both": "Bilateral", "right": "Right-sided", "left": "Left-sided"}[d["side"]]
        f += " pleural effusion is observed, layering posteriorly."
        i = "Pleural effusion."
    elif c == "Mosaic attenuation pattern":
        f, i = "A mosaic attenuation pattern is observed in both lungs.", "Mosaic attenuation."
    elif c == "Peribronchial thickening":
        f, i = "Peribronchial thickening is observed.", "Peribronchial thickening."
    elif c == "Consolidation":
        f = f"A consolidation with air bronchograms is seen in the {d['zone']} zone of {_side_text(d['side'])}."
        i = "Consolidation, likely pneumonia."
    elif c == "Bronchiectasis":
        f, i = f"Cylindrical bronchiectasis is observed in {_side_text(d['side'])}.", "Bronchiectasis."
    else:  # Interlobular septal thickening
        f, i = (
            "Interlobular septal thickening is observed in the peripheral parts of the lungs.",
            "Septal thickening.",
        )
    return f, i
