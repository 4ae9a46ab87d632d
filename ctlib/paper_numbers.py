"""The published numbers our results are set beside: the paper's Tables 1-3 and CT-RATE baselines.

Copied from ``shared/paper.md`` (Tables 1, 2, 3) and ``shared/ctrate-format.md`` (published AUROC
on the CT-RATE internal validation set). The paper's Table 1 spells one class "Coronary arterial
calcification"; its rows follow CT-RATE's class order, so they are keyed here by
:data:`ctlib.data.CLASSES`. Where the paper's text writes a recall of "25" (section 5) Table 2 gives
0.25, which is used.

Every frame is built fresh by a function so that callers cannot modify the shared constants.
"""

from __future__ import annotations

import pandas as pd

from ctlib.data import CLASSES

# Table 1: volumes positive per class in each split (Total, Train, Val, Test), CT-RATE class order.
_TABLE1_COUNTS: tuple[tuple[int, int, int, int], ...] = (
    (425, 285, 97, 43),  # Medical material
    (909, 604, 198, 107),  # Arterial wall calcification
    (358, 240, 76, 42),  # Cardiomegaly
    (269, 174, 65, 30),  # Pericardial effusion
    (793, 541, 163, 89),  # Coronary artery wall calcification ("Coronary arterial calcification")
    (425, 287, 94, 44),  # Hiatal hernia
    (831, 540, 189, 102),  # Lymphadenopathy
    (586, 392, 127, 67),  # Emphysema
    (842, 561, 192, 89),  # Atelectasis
    (1393, 965, 282, 146),  # Lung nodule
    (1141, 782, 242, 117),  # Lung opacity
    (783, 531, 178, 74),  # Pulmonary fibrotic sequela
    (481, 316, 113, 52),  # Pleural effusion
    (268, 176, 62, 30),  # Mosaic attenuation pattern
    (324, 214, 77, 33),  # Peribronchial thickening
    (569, 374, 129, 66),  # Consolidation
    (307, 209, 68, 30),  # Bronchiectasis
    (273, 179, 63, 31),  # Interlobular septal thickening
)

# Table 2: model -> (2D, 3D, AUC, accuracy, precision, recall).
_TABLE2: tuple[tuple[str, bool, bool, float, float, float, float], ...] = (
    ("ResNet", True, False, 0.83, 0.83, 0.66, 0.34),
    ("ViT", False, True, 0.71, 0.75, 0.44, 0.25),
    ("ResNet+ViT", True, True, 0.87, 0.87, 0.72, 0.54),
)

# Table 3: alpha -> (AUC, accuracy, precision, recall); "learned" is the learnable alpha.
_TABLE3: tuple[tuple[float | str, float, float, float, float], ...] = (
    (0.0, 0.83, 0.83, 0.66, 0.34),
    (0.1, 0.85, 0.85, 0.70, 0.36),
    (0.3, 0.86, 0.86, 0.72, 0.46),
    (0.5, 0.88, 0.87, 0.75, 0.54),
    (1.0, 0.87, 0.87, 0.72, 0.54),
    ("learned", 0.87, 0.87, 0.75, 0.55),
)

#: Published macro AUROC on the CT-RATE internal validation set (1,564 scans), ctrate-format.md.
PUBLISHED_CTRATE_AUROC: dict[str, float] = {
    "CT-Net (supervised 3D CNN)": 0.629,
    "CT-CLIP zero-shot": 0.731,
    "CT-CLIP fine-tuned": 0.756,
    "fVLM": 0.778,
    "MedVista3D": 0.782,
    "T3D fine-tuned": 0.802,
}

#: What the published CT-RATE numbers were measured on, for table captions.
PUBLISHED_CTRATE_NOTE = (
    "CT-RATE internal validation set (1,564 scans); macro AUROC over the 18 classes as published, "
    "not re-computed here"
)

#: What the paper's own numbers were measured on.
PAPER_DATA_NOTE = "the paper's ~3,000-patient CT-RATE subset (70:20:10 split), as printed in the paper"


def paper_table1() -> pd.DataFrame:
    """The paper's Table 1: index ``CLASSES``, columns Total/Train/Val/Test (volumes positive)."""
    return pd.DataFrame(list(_TABLE1_COUNTS), index=pd.Index(CLASSES, name="class"),
                        columns=["Total", "Train", "Val", "Test"])


def paper_table2() -> pd.DataFrame:
    """The paper's Table 2: index model (ResNet, ViT, ResNet+ViT); columns 2D, 3D, auroc, accuracy,
    precision, recall."""
    frame = pd.DataFrame(list(_TABLE2), columns=["model", "2D", "3D", "auroc", "accuracy", "precision",
                                                 "recall"])
    return frame.set_index("model")


def paper_table3() -> pd.DataFrame:
    """The paper's Table 3: index alpha (``"0.0"`` ... ``"1.0"``, ``"learned"``, as strings); columns
    auroc, accuracy, precision, recall."""
    rows = [(a if isinstance(a, str) else f"{a:.1f}", *vals) for a, *vals in _TABLE3]
    frame = pd.DataFrame(rows, columns=["alpha", "auroc", "accuracy", "precision", "recall"])
    return frame.set_index("alpha")


# ---------------------------------------------------------------------------------------------
# our numbers beside the paper's
# ---------------------------------------------------------------------------------------------
_METRICS = ("auroc", "accuracy", "precision", "recall")


def _ratio_text(parts: pd.DataFrame) -> pd.Series:
    """Per row, the split shares as ``"67:23:10"`` (percent of the row's total)."""
    total = parts.sum(axis=1).replace(0, float("nan"))
    pct = parts.div(total, axis=0) * 100
    return pct.apply(lambda r: ":".join("n/a" if pd.isna(v) else f"{v:.0f}" for v in r), axis=1)


def compare_table1(ours: pd.DataFrame) -> pd.DataFrame:
    """Our Table 1 beside the paper's, as shares so that cohorts of different sizes compare.

    Args:
        ours: :func:`ctlib.split.class_table` output (index CLASSES + ``Volumes``; Total/Train/Val/Test).

    Returns:
        DataFrame indexed by class: ``ours`` (volumes positive), ``ours %`` (share of all positive
        labels), ``paper``, ``paper %``, and each one's split as ``train:val:test`` percentages. The
        paper does not give its number of volumes, so prevalence per volume cannot be compared.
    """
    missing = [c for c in CLASSES if c not in ours.index]
    if missing:
        raise ValueError(f"ours lacks class rows {missing}")
    paper = paper_table1()
    o = ours.loc[list(CLASSES)]
    out = pd.DataFrame(index=pd.Index(CLASSES, name="class"))
    out["ours"] = o["Total"].astype(int)
    out["ours %"] = 100.0 * o["Total"] / max(int(o["Total"].sum()), 1)
    out["paper"] = paper["Total"]
    out["paper %"] = 100.0 * paper["Total"] / int(paper["Total"].sum())
    out["ours train:val:test"] = _ratio_text(o[["Train", "Val", "Test"]])
    out["paper train:val:test"] = _ratio_text(paper[["Train", "Val", "Test"]])
    return out


def compare_metrics(ours: pd.DataFrame, paper: pd.DataFrame, *, metrics: tuple[str, ...] = _METRICS) -> pd.DataFrame:
    """Rows of ``ours`` and ``paper`` matched by index, each metric as ``<metric> ours`` and
    ``<metric> paper`` side by side (Tables 2 and 3); rows the paper lacks get NaN."""
    out = pd.DataFrame(index=ours.index)
    for m in metrics:
        out[f"{m} ours"] = ours[m].astype(float)
        out[f"{m} paper"] = paper.reindex(ours.index)[m].astype(float)
    return out


def published_comparison(ours: dict[str, tuple[float, str]]) -> pd.DataFrame:
    """Macro AUROC of our runs beside the paper's and the published CT-RATE results, with the data
    each number was measured on.

    Args:
        ours: row label -> (macro AUROC, description of the data, e.g. the run's config ``data`` and
            test-set size).

    Returns:
        DataFrame indexed by ``model`` with columns ``auroc``, ``source`` and ``data``.
    """
    rows = [(name, float(auc), "this run", data) for name, (auc, data) in ours.items()]
    t2 = paper_table2()
    rows += [(f"paper: {m}", float(t2.loc[m, "auroc"]), "paper Table 2", PAPER_DATA_NOTE) for m in t2.index]
    t3 = paper_table3()
    rows += [(f"paper: ResNet+ViT, alpha {a}", float(t3.loc[a, "auroc"]), "paper Table 3", PAPER_DATA_NOTE)
             for a in t3.index if a not in ("0.0", "1.0")]  # alpha 0 and 1 repeat Table 2
    rows += [(name, auc, "published", PUBLISHED_CTRATE_NOTE) for name, auc in PUBLISHED_CTRATE_AUROC.items()]
    return pd.DataFrame(rows, columns=["model", "auroc", "source", "data"]).set_index("model")


def results_table2(runs: dict[str, dict]) -> pd.DataFrame:
    """Our Table 2 in the paper's layout, one row per model and threshold rule.

    Args:
        runs: paper model name (``"ResNet"``, ``"ViT"``, ``"ResNet+ViT"``) -> that run's
            ``metrics.json`` dict (with ``val_tuned``).

    Returns:
        DataFrame indexed by (model, threshold) with columns 2D, 3D (the paper's ticks), auroc,
        auroc_low, auroc_high (the run's 95% bootstrap interval over test patients, ``auroc_ci``; AUROC
        does not depend on the threshold, so both rules of a model share it), accuracy, precision,
        recall, f1; threshold is ``0.5`` or ``tuned on val``.
    """
    flags = paper_table2()[["2D", "3D"]]
    rows = []
    for name, m in runs.items():
        if name not in flags.index:
            raise ValueError(f"unknown model {name!r}; Table 2 has {list(flags.index)}")
        ci = [float("nan") if v is None else float(v) for v in (m.get("auroc_ci") or [None, None])]
        for rule, d in (("0.5", m), ("tuned on val", m.get("val_tuned") or {})):
            auroc, *rest = (float(d.get(k, float("nan"))) for k in (*_METRICS, "f1"))
            rows.append((name, rule, bool(flags.loc[name, "2D"]), bool(flags.loc[name, "3D"]), auroc, *ci, *rest))
    frame = pd.DataFrame(rows, columns=["model", "threshold", "2D", "3D", "auroc", "auroc_low", "auroc_high",
                                        *_METRICS[1:], "f1"])
    return frame.set_index(["model", "threshold"])
