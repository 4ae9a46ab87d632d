"""Tables: Markdown and CSV writing, one run's summary, per-group AUROC and paired comparisons.

Tables are written as CSV (full precision) and Markdown by :func:`save_table` (:func:`to_markdown`
needs no ``tabulate``). Every interval is a pair of columns beside its value (``auroc_low``,
``auroc_high``; ``diff_low``, ``diff_high``), never prose; the CT-CLIP protocol's support-weighted F1
has a column of its own (``f1_weighted (CT-CLIP)``), apart from the macro F1 of the other rows.

- :func:`run_summary`: one run's ``metrics.json`` by threshold rule (notebooks 02-04).
- :func:`group_table`: macro AUROC with bootstrap intervals per run and class group (``"all"``, and
  e.g. ``"2D"``/``"3D"``), from the runs' ``predictions.csv``.
- :func:`paired_table`: paired bootstrap differences (fusion - ResNet; alpha - alpha 0) per comparison
  and class group, the same test patients resampled for both runs.
- :func:`context_rows`, :func:`context_differences`, :func:`context_slope`: notebook 09's sweep over the
  lung-nodule cue's strength (``results/<tag>/context_sweep.csv`` and its endpoints).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctlib.comparison import (
    check_paired,
    compare_predictions,
    group_auroc,
    paired_bootstrap_auroc,
    patients_of,
    seed_mean_paired_auroc,
    slope,
)
from ctlib.runs import read_predictions


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


#: The column of the CT-CLIP protocol's support-weighted F1 (not a macro F1: it must not share a column).
F1_WEIGHTED_CTCLIP = "f1_weighted (CT-CLIP)"


def run_summary(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """One run's test metrics (``metrics.json``) as a table: one row per threshold rule.

    Rows: ``threshold 0.5``, ``thresholds tuned on validation``, ``CT-CLIP protocol (fitted on test)``
    (optimistic, for comparison with published CT-RATE numbers only; it reports no recall).
    Columns: auroc, auroc_low, auroc_high (95% bootstrap interval over test patients), accuracy,
    precision, recall, f1 (macro), and ``f1_weighted (CT-CLIP)`` (the protocol's support-weighted F1,
    only in its row; its ``f1`` is NaN). Missing entries are NaN.
    """
    keys = ("auroc", "accuracy", "precision", "recall", "f1", F1_WEIGHTED_CTCLIP)
    ci = metrics.get("auroc_ci") or [np.nan, np.nan]

    def row(d: Mapping[str, Any] | None) -> list[float]:
        d = d or {}
        return [float(np.nan if d.get(k) is None else d[k]) for k in keys]

    ctclip = dict(metrics.get("ctclip") or {})
    ctclip.pop("f1", None)
    ctclip[F1_WEIGHTED_CTCLIP] = ctclip.get("f1_weighted")
    rows = {
        "threshold 0.5": row(metrics),
        "thresholds tuned on validation": row(metrics.get("val_tuned")),
        "CT-CLIP protocol (fitted on test)": row(ctclip),
    }
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=list(keys))
    frame.insert(1, "auroc_low", float(ci[0]) if ci[0] is not None else np.nan)
    frame.insert(2, "auroc_high", float(ci[1]) if ci[1] is not None else np.nan)
    frame.index.name = "rule"
    return frame


RunSource = str | os.PathLike[str] | pd.DataFrame


def _predictions(run: RunSource) -> RunSource:
    """A run folder -> its ``predictions.csv``; a CSV path or a frame as it is."""
    if isinstance(run, pd.DataFrame):
        return run
    path = Path(run)
    return path / "predictions.csv" if path.is_dir() else path


def group_table(
    runs: Mapping[str, RunSource],
    groups: Mapping[str, Sequence[str]] | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Macro AUROC with 95% bootstrap intervals (test patients resampled) per run and class group.

    Args:
        runs: row label -> run folder, ``predictions.csv`` path or its frame.
        groups: class group name -> class names (e.g. ``ctlib.synthetic.class_groups()``); None: only
            the ``"all"`` rows.
        n_boot: resamples; seed: their seed (the same resamples for every run of one test set).

    Returns:
        DataFrame indexed by (``run``, ``group``) with columns auroc, auroc_low, auroc_high, n_classes,
        n_pos, n_resamples (see :func:`ctlib.comparison.group_auroc`).
    """
    frames = {}
    for label, run in runs.items():
        names, y, p = read_predictions(_predictions(run))
        frames[label] = group_auroc(y, p, groups, patients_of(names), n_boot=n_boot, seed=seed)
    return pd.concat(frames, names=["run"])


def paired_table(
    pairs: Mapping[str, tuple[RunSource, RunSource]],
    groups: Mapping[str, Sequence[str]] | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Paired bootstrap differences of macro AUROC, one block of rows per comparison.

    Args:
        pairs: comparison label (e.g. ``"ResNet+ViT - ResNet"``) -> (run A, run B), each a run folder,
            ``predictions.csv`` path or frame; both must hold the same test volumes in the same order
            with the same labels (ValueError naming both otherwise).
        groups: class group name -> class names; None: only the ``"all"`` rows.
        n_boot: resamples of test patients, the same for A and B; seed: their seed.

    Returns:
        DataFrame indexed by (``comparison``, ``group``) with columns auroc_a, auroc_b, diff (A - B),
        diff_low, diff_high (95% percentile interval), p_boot (fraction of resamples with diff <= 0),
        n_classes, n_resamples (see :func:`ctlib.comparison.paired_bootstrap_auroc`).
    """
    frames = {}
    for label, (run_a, run_b) in pairs.items():
        what = tuple(s.strip() for s in label.split(" - ", 1)) if " - " in label else ("A", "B")
        frames[label] = compare_predictions(_predictions(run_a), _predictions(run_b), groups, n_boot=n_boot,
                                            seed=seed, what=what)
    return pd.concat(frames, names=["comparison"])


#: Columns of ``context_sweep.csv``: one row per (lambda, seed, model, class group); the last three (the paired
#: difference to the ResNet of the same lambda and seed, on the same test volumes) are empty for the ResNet.
CONTEXT_COLUMNS = ("lambda", "seed", "model", "group", "auroc", "auroc_low", "auroc_high", "delta_vs_resnet",
                   "delta_low", "delta_high")


def context_rows(
    lam: float,
    seed: int,
    runs: Mapping[str, RunSource],
    groups: Mapping[str, Sequence[str]],
    *,
    reference: str = "ResNet",
    n_boot: int = 1000,
    boot_seed: int = 0,
) -> pd.DataFrame:
    """The sweep's rows of one (lambda, seed): per model and class group, macro AUROC with its 95% bootstrap
    interval and the paired difference to ``reference`` (test patients resampled, the same resamples for both).

    Args:
        lam: the cue's strength the runs were trained and tested at; seed: their training seed.
        runs: model label (``"ResNet"``, ``"ViT"``, ``"fusion"``, ...) -> run folder, ``predictions.csv`` or
            frame; every run must hold the same test volumes as ``reference`` (ValueError otherwise).
        groups: class groups (``ctlib.synthetic.class_groups()``); a row per group, no ``"all"`` row.

    Returns:
        DataFrame with :data:`CONTEXT_COLUMNS`.
    """
    if reference not in runs:
        raise ValueError(f"the reference run {reference!r} is not among {sorted(runs)}")
    preds = {label: read_predictions(_predictions(run)) for label, run in runs.items()}
    names_r, y, p_ref = preds[reference]
    patients = patients_of(names_r)
    rows = []
    for label, (names, y_m, p) in preds.items():
        check_paired(names, y_m, names_r, y, what=(label, reference))
        g = group_auroc(y, p, groups, patients, n_boot=n_boot, seed=boot_seed)
        d = None if label == reference else paired_bootstrap_auroc(y, p, p_ref, patients, groups, n_boot=n_boot,
                                                                   seed=boot_seed)
        for group in groups:
            rows.append({"lambda": float(lam), "seed": int(seed), "model": label, "group": group,
                         "auroc": g.at[group, "auroc"], "auroc_low": g.at[group, "auroc_low"],
                         "auroc_high": g.at[group, "auroc_high"],
                         "delta_vs_resnet": math.nan if d is None else d.at[group, "diff"],
                         "delta_low": math.nan if d is None else d.at[group, "diff_low"],
                         "delta_high": math.nan if d is None else d.at[group, "diff_high"]})
    return pd.DataFrame(rows, columns=list(CONTEXT_COLUMNS))


def context_differences(
    runs: Mapping[float, Mapping[int, Mapping[str, RunSource]]],
    groups: Mapping[str, Sequence[str]],
    *,
    model: str = "fusion",
    reference: str = "ResNet",
    n_boot: int = 1000,
    boot_seed: int = 0,
) -> pd.DataFrame:
    """Per lambda and class group, the seed-mean paired difference ``model`` - ``reference`` with its 95%
    interval over test patients (:func:`ctlib.comparison.seed_mean_paired_auroc`): the primary endpoint is
    its row at lambda = 1, group ``"3D"``.

    Args:
        runs: lambda -> seed -> model label -> run folder (or ``predictions.csv``, or frame).

    Returns:
        DataFrame indexed by (``lambda``, ``group``) with columns diff, diff_low, diff_high, p_boot, n_seeds.
    """
    frames = {}
    for lam, by_seed in runs.items():
        pairs, first = [], None
        for seed_runs in by_seed.values():
            names, y, p_m = read_predictions(_predictions(seed_runs[model]))
            names_r, y_r, p_r = read_predictions(_predictions(seed_runs[reference]))
            check_paired(names, y, names_r, y_r, what=(model, reference))
            if first is None:
                first = (names_r, y_r)
            else:
                check_paired(names_r, y_r, *first, what=("one seed", "another"))
            pairs.append((p_m, p_r))
        frames[float(lam)] = seed_mean_paired_auroc(first[1], pairs, patients_of(first[0]), groups, n_boot=n_boot,
                                                    seed=boot_seed).drop(index="all")
    return pd.concat(frames, names=["lambda"])


def context_slope(sweep: pd.DataFrame, *, model: str = "fusion", group: str = "3D") -> dict[str, float]:
    """Slope over lambda of ``model``'s paired difference to the ResNet in ``group`` (one point per lambda and
    seed of :func:`context_rows`'s table), with its 95% t interval (:func:`ctlib.comparison.slope`)."""
    rows = sweep[(sweep["model"] == model) & (sweep["group"] == group)]
    return slope(rows["lambda"].to_numpy(), rows["delta_vs_resnet"].to_numpy())


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


def metrics_table(
    runs: Mapping[str, Mapping[str, Any]],
    keys: Sequence[str] = ("auroc", "accuracy", "precision", "recall"),
) -> pd.DataFrame:
    """One row per run from :func:`score` dicts (Tables 2 and 3); full precision, round when shown.

    Args:
        runs: run name -> score dict, in the row order wanted.
        keys: the metrics to tabulate, in column order.

    Returns:
        DataFrame indexed by run name (index name ``"run"``) with one float column per key.
    """
    rows = {}
    for run, scores in runs.items():
        missing = [k for k in keys if k not in scores]
        if missing:
            raise ValueError(f"run {run!r} lacks metrics {missing}")
        rows[run] = [float(scores[k]) for k in keys]
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=list(keys), dtype=np.float64)
    frame.index.name = "run"
    return frame
