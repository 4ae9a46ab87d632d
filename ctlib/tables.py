"""Tables: Markdown and CSV writing, one run's summary, and (below) the paired-comparison tables.

Tables are written as CSV (full precision) and Markdown by :func:`save_table` (:func:`to_markdown`
needs no ``tabulate``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _md_cell(value: Any, floatfmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "✓" if value else ""
    if isinstance(value, (float, np.floating)):
        if math.isnan(float(value)):
            return "n/a"
        return format(float(value), floatfmt)
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(
    df: pd.DataFrame,
    path: str | Path | None = None,
    *,
    floatfmt: str = ".3f",
    index: bool = True,
) -> str:
    """A GitHub Markdown table of ``df`` (no ``tabulate`` needed); written to ``path`` when given.

    Numeric columns are right-aligned, others left-aligned; floats use ``floatfmt``, NaN shows as
    ``n/a``, booleans as ``✓`` or blank (the paper's 2D/3D columns), ``|`` is escaped.
    """
    frame = df.reset_index() if index else df
    if index and frame.columns[0] == "index" and df.index.name is None:
        frame = frame.rename(columns={"index": ""})
    header = [str(c) for c in frame.columns]
    aligns = []
    for col in frame.columns:
        kind = frame[col].dtype.kind
        aligns.append("---:" if kind in "iuf" else ":---")
    lines = [
        "| " + " | ".join(h.replace("|", "\\|") for h in header) + " |",
        "|" + "|".join(aligns) + "|",
    ]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(_md_cell(v, floatfmt) for v in row) + " |")
    text = "\n".join(lines) + "\n"
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return text


def run_summary(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """One run's test metrics (``metrics.json``) as a table: one row per threshold rule.

    Rows: ``threshold 0.5``, ``thresholds tuned on validation``, ``CT-CLIP protocol (fitted on test)``
    (optimistic, for comparison with published CT-RATE numbers only; its F1 is support-weighted and
    it reports no recall). Columns: auroc, auroc_low, auroc_high (95% bootstrap interval), accuracy,
    precision, recall, f1. Missing entries are NaN.
    """
    keys = ("auroc", "accuracy", "precision", "recall", "f1")
    ci = metrics.get("auroc_ci") or [np.nan, np.nan]

    def row(d: Mapping[str, Any] | None, f1_key: str = "f1") -> list[float]:
        d = d or {}
        vals = {k: d.get(k, np.nan) for k in keys}
        vals["f1"] = d.get(f1_key, np.nan)
        return [float(np.nan if vals[k] is None else vals[k]) for k in keys]

    rows = {
        "threshold 0.5": row(metrics),
        "thresholds tuned on validation": row(metrics.get("val_tuned")),
        "CT-CLIP protocol (fitted on test)": row(metrics.get("ctclip"), "f1_weighted"),
    }
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=list(keys))
    frame.insert(1, "auroc_low", float(ci[0]) if ci[0] is not None else np.nan)
    frame.insert(2, "auroc_high", float(ci[1]) if ci[1] is not None else np.nan)
    frame.index.name = "rule"
    return frame


def save_table(df: pd.DataFrame, stem: str | Path, *, floatfmt: str = ".3f", index: bool = True) -> tuple[Path, Path]:
    """Writes ``df`` as ``<stem>.csv`` (full precision) and ``<stem>.md``; returns both paths."""
    stem = Path(stem)
    if stem.suffix in (".csv", ".md"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    df.to_csv(csv_path, index=index)
    to_markdown(df, md_path, floatfmt=floatfmt, index=index)
    return csv_path, md_path
