"""Results plots: Figure 3 (per-class AUROC), learning curves, the learned alpha, metrics against alpha
and against the paper's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ctlib.data import CLASSES
from ctlib.figures.style import (
    class_color,
    finish,
    new_figure,
)


# ---------------------------------------------------------------------------------------------
# Figure 3: per-class AUROC with bootstrap intervals
# ---------------------------------------------------------------------------------------------
def plot_per_class_auroc(
    results: Mapping[str, pd.DataFrame],
    *,
    classes: Sequence[str] = CLASSES,
    include_macro: bool = True,
    title: str = "Per-class AUROC on the test set (95% bootstrap CI)",
    path: str | Path | None = None,
) -> Figure:
    """Figure 3: per-class AUROC of each model with confidence-interval error bars.

    Args:
        results: model name -> frame indexed by class (and ``"macro"``) with columns ``auroc``, ``low``,
            ``high`` and optionally ``n_pos`` (as ``per_class_auroc.csv`` / ``bootstrap_auroc``).
            NaN values (a class without positives in the test set) are left out.
        classes: the rows, top to bottom.
        include_macro: add the macro mean as the last row.
        title: figure title.
        path: where to save.
    """
    if not results:
        raise ValueError("results is empty: give model name -> per-class AUROC frame")
    for name, frame in results.items():
        missing = {"auroc", "low", "high"} - set(frame.columns)
        if missing:
            raise ValueError(f"results[{name!r}] lacks columns {sorted(missing)}")
    rows = list(classes) + (["macro"] if include_macro else [])
    first = next(iter(results.values()))
    labels = []
    for r in rows:
        lab = "Macro mean" if r == "macro" else r
        if "n_pos" in first.columns and r in first.index and r != "macro" and pd.notna(first.loc[r, "n_pos"]):
            lab = f"{lab} (n={int(first.loc[r, 'n_pos'])})"
        labels.append(lab)
    m = len(results)
    fig = new_figure(8.0, 0.32 * len(rows) + 1.8)
    ax = fig.subplots()
    y = np.arange(len(rows))[::-1].astype(float)
    offsets = ((m - 1) / 2 - np.arange(m)) * (0.72 / max(m, 1))  # first model on top
    lowest = 1.0
    for j, (name, frame) in enumerate(results.items()):
        f = frame.reindex(rows)
        auc = f["auroc"].to_numpy(dtype=float)
        lo = f["low"].to_numpy(dtype=float)
        hi = f["high"].to_numpy(dtype=float)
        ok = np.isfinite(auc)
        if ok.any():
            lowest = min(lowest, float(np.nanmin(np.where(np.isfinite(lo), lo, auc)[ok])))
        err = np.vstack([np.where(np.isfinite(lo), auc - lo, 0.0), np.where(np.isfinite(hi), hi - auc, 0.0)])
        err = np.clip(err, 0.0, None)
        macro = f"{auc[-1]:.3f}" if include_macro and np.isfinite(auc[-1]) else "n/a"
        ax.errorbar(auc[ok], (y + offsets[j])[ok], xerr=err[:, ok], fmt="o", ms=4, capsize=2, lw=1,
                    color=class_color(j), label=f"{name} (macro {macro})")
    ax.axvline(0.5, color="0.6", ls="--", lw=0.8)
    if include_macro:
        ax.axhline(0.5, color="0.8", lw=0.8)
    missing = np.all([~np.isfinite(f.reindex(rows)["auroc"].to_numpy(dtype=float)) for f in results.values()],
                     axis=0)
    for yi in y[missing]:
        ax.text(0.52, yi, "no AUROC (no test positives or no negatives)", va="center", ha="left",
                fontsize=7, color="0.55", style="italic")
    ax.set_yticks(y, labels)
    ax.set_xlim(max(-0.02, min(0.4, lowest - 0.05)), 1.02)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel("AUROC (dashed: chance)")
    ax.grid(axis="x", color="0.92")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.07), ncols=1 if m > 3 else m, frameon=False)
    ax.set_title(title)
    return finish(fig, path)



# ---------------------------------------------------------------------------------------------
# training curves and alpha
# ---------------------------------------------------------------------------------------------
def plot_learning_curves(
    histories: Mapping[str, pd.DataFrame],
    *,
    path: str | Path | None = None,
) -> Figure:
    """Train (dashed) and validation (solid) loss per epoch, and validation AUROC, one colour per run.

    Args:
        histories: run name -> ``history.csv`` frame (columns epoch, train_loss, val_loss, optional
            val_auroc).
    """
    if not histories:
        raise ValueError("no histories to plot")
    has_auc = any("val_auroc" in h.columns for h in histories.values())
    fig = new_figure(10 if has_auc else 5.5, 3.6)
    axes = fig.subplots(1, 2 if has_auc else 1, squeeze=False)[0]
    for j, (name, h) in enumerate(histories.items()):
        missing = {"epoch", "train_loss", "val_loss"} - set(h.columns)
        if missing:
            raise ValueError(f"history of {name!r} lacks columns {sorted(missing)}")
        marker = "o" if len(h) <= 30 else None
        axes[0].plot(h["epoch"], h["train_loss"], ls="--", color=class_color(j), marker=marker, ms=3)
        axes[0].plot(h["epoch"], h["val_loss"], ls="-", color=class_color(j), marker=marker, ms=3, label=name)
        if has_auc and "val_auroc" in h.columns:
            axes[1].plot(h["epoch"], h["val_auroc"], color=class_color(j), marker=marker, ms=3, label=name)
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("BCE loss")
    axes[0].set_title("Loss (dashed: train, solid: validation)")
    axes[0].legend(frameon=False)
    for ax in axes:
        ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
        ax.grid(color="0.93")
    if has_auc:
        axes[1].axhline(0.5, color="0.6", ls="--", lw=0.8)
        axes[1].set_xlabel("epoch")
        axes[1].set_ylabel("macro AUROC")
        axes[1].set_title("Validation AUROC")
    return finish(fig, path)


_WEIGHT_LABELS = {"alpha": ("α", "weight of the 3D residual"), "beta": ("β", "weight of the 2D features")}


def plot_alpha_trajectory(
    history: pd.DataFrame | Mapping[str, pd.DataFrame],
    *,
    initial: float | None = None,
    fixed: Sequence[float] = (),
    weight: str = "alpha",
    path: str | Path | None = None,
) -> Figure:
    """A learned weight after each epoch (``history.csv``'s ``alpha``, or ``beta`` of the learned-2D
    variant), with the fixed alphas for scale.

    Args:
        history: a history frame, or run name -> frame.
        initial: the weight before training (``alpha_init``; 1 for beta), drawn at epoch 0.
        fixed: alpha values of the fixed-alpha runs, drawn as faint horizontal lines.
        weight: ``"alpha"`` (of the 3D residual) or ``"beta"`` (of the 2D features).
    """
    if weight not in _WEIGHT_LABELS:
        raise ValueError(f"weight must be one of {sorted(_WEIGHT_LABELS)}, got {weight!r}")
    symbol, meaning = _WEIGHT_LABELS[weight]
    runs = {f"learned {weight}": history} if isinstance(history, pd.DataFrame) else dict(history)
    fig = new_figure(5.5, 3.4)
    ax = fig.subplots()
    for a in fixed:
        ax.axhline(float(a), color="0.85", lw=0.8, zorder=0)
        ax.text(1.0, float(a), f" α={float(a):g}", transform=ax.get_yaxis_transform(), va="center",
                fontsize=7, color="0.5")
    for j, (name, h) in enumerate(runs.items()):
        if weight not in h.columns or "epoch" not in h.columns:
            raise ValueError(f"history of {name!r} needs columns epoch and {weight}")
        ep = h["epoch"].to_numpy(dtype=float)
        al = h[weight].to_numpy(dtype=float)
        if initial is not None:
            ep, al = np.r_[0.0, ep], np.r_[float(initial), al]
        ax.plot(ep, al, marker="o", ms=4, color=class_color(j), label=name)
    ax.set_xlabel("epoch (0 = initial value)" if initial is not None else "epoch")
    ax.set_ylabel(f"{symbol} ({meaning})")
    ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
    ax.set_title(f"Learned {symbol} during training")
    ax.grid(color="0.93")
    if len(runs) > 1:
        ax.legend(frameon=False)
    return finish(fig, path)



# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
def plot_metrics_vs_alpha(
    ours: pd.DataFrame,
    paper: pd.DataFrame | None = None,
    *,
    metrics: Sequence[str] = ("auroc", "accuracy", "precision", "recall"),
    path: str | Path | None = None,
) -> Figure:
    """Table 3 as lines: each metric against alpha, ours (solid) and the paper's (dashed).

    Args:
        ours: index alpha labels (``"0.0"`` ... ``"1.0"``, ``"learned"``), one column per metric.
        paper: the paper's Table 3 in the same form, or None.
    """
    labels = [str(a) for a in ours.index]
    x = np.arange(len(labels))
    numeric = np.array([_is_number(a) for a in labels])
    fig = new_figure(2.6 * len(metrics), 3.2)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, m in zip(axes, metrics, strict=True):
        if m not in ours.columns:
            raise ValueError(f"ours lacks metric column {m!r}")
        # Fixed alphas are joined by lines; "learned" stands apart (it is not a point on the alpha axis).
        series = [("ours", ours[m].to_numpy(dtype=float), "o", "-", class_color(0))]
        if paper is not None and m in paper.columns:
            series.append(("paper", paper.reindex(labels)[m].to_numpy(dtype=float), "s", "--", "0.5"))
        for name, vals, marker, ls, color in series:
            ax.plot(x[numeric], vals[numeric], marker=marker, ls=ls, color=color, label=name)
            ax.plot(x[~numeric], vals[~numeric], marker=marker, ls="none", color=color)
        ax.set_xticks(x, labels, rotation=30)
        ax.set_xlabel("α")
        ax.set_title(m)
        ax.set_ylim(0, 1.02)
        ax.grid(color="0.93")
    axes[0].legend(frameon=False)
    return finish(fig, path)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def plot_metric_comparison(
    ours: pd.DataFrame,
    paper: pd.DataFrame | None = None,
    *,
    metrics: Sequence[str] = ("auroc", "accuracy", "precision", "recall"),
    title: str = "Test metrics (threshold 0.5)",
    path: str | Path | None = None,
) -> Figure:
    """Table 2 as grouped bars: one group per metric, one bar per model, the paper's values as ticks.

    Args:
        ours: index model names, columns metrics.
        paper: same layout (rows matched by name), or None.
    """
    models = list(ours.index)
    fig = new_figure(7.0, 3.4)
    ax = fig.subplots()
    x = np.arange(len(metrics))
    w = 0.8 / max(len(models), 1)
    for j, name in enumerate(models):
        vals = [float(ours.loc[name, m]) for m in metrics]
        pos = x - 0.4 + w * (j + 0.5)
        bars = ax.bar(pos, vals, width=w * 0.95, color=class_color(j), label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1, color="0.3")
        if paper is not None and name in paper.index:
            pv = [float(paper.loc[name, m]) if m in paper.columns else np.nan for m in metrics]
            ax.scatter(pos, pv, marker="_", s=250, color="black", zorder=3,
                       label="paper" if j == 0 else None)
    ax.set_axisbelow(True)
    ax.set_xticks(x, metrics)
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", color="0.93")
    ax.legend(frameon=False, ncols=min(len(models) + 1, 4), loc="lower left", bbox_to_anchor=(0, 1.0))
    ax.set_title(title, loc="left", pad=22)
    return finish(fig, path)


# ---------------------------------------------------------------------------------------------
# Notebook 09: the 3D-context sweep over the lung-nodule cue's strength
# ---------------------------------------------------------------------------------------------
def plot_context_sweep(
    sweep: pd.DataFrame,
    differences: pd.DataFrame | None = None,
    *,
    model: str = "fusion",
    reference: str = "ResNet",
    alone: Sequence[str] = ("ViT",),
    margin: float = 0.05,
    path: str | Path | None = None,
) -> Figure:
    """Left: the paired difference ``model`` - ``reference`` on the 3D class against the cue's strength lambda
    (each seed's point with its 95% interval, their mean joined by a line; the seed-mean interval over test
    patients as a band when ``differences`` is given), and the same difference on the 2D classes (a dashed
    line: the 3D branch must not cost the slice classes more than ``margin``). Right: the 3D class's AUROC of
    the models ``alone`` (the ViT: the positive control) and of ``reference`` and ``model``, per seed and mean.

    Args:
        sweep: rows of :func:`ctlib.tables.context_rows` (:data:`ctlib.tables.CONTEXT_COLUMNS`).
        differences: :func:`ctlib.tables.context_differences` (index lambda, group), or None.
    """
    fig = new_figure(10.5, 3.8)
    left, right = fig.subplots(1, 2)
    lams = np.array(sorted(sweep["lambda"].unique()), dtype=float)
    width = float(np.ptp(lams)) or 1.0
    seeds = sorted(sweep["seed"].unique())
    for group, color, ls in (("3D", class_color(0), "-"), ("2D", "0.45", "--")):
        rows = sweep[(sweep["model"] == model) & (sweep["group"] == group)]
        if rows.empty:
            continue
        mean = rows.groupby("lambda")["delta_vs_resnet"].mean().reindex(lams)
        if group == "3D":
            for k, s in enumerate(seeds):
                r = rows[rows["seed"] == s].set_index("lambda").reindex(lams)
                dx = (k - (len(seeds) - 1) / 2) * 0.012 * width
                left.errorbar(lams + dx, r["delta_vs_resnet"], yerr=[r["delta_vs_resnet"] - r["delta_low"],
                              r["delta_high"] - r["delta_vs_resnet"]], fmt="o", ms=3.5, color=color, alpha=0.45,
                              lw=1, capsize=2, label="per seed (95% interval)" if k == 0 else None)
        if differences is not None and group in differences.index.get_level_values("group"):
            d = differences.xs(group, level="group").reindex(lams)
            left.fill_between(lams, d["diff_low"], d["diff_high"], color=color, alpha=0.12 if group == "3D" else 0.08,
                              lw=0)
        left.plot(lams, mean, ls=ls, marker="s" if group == "3D" else None, color=color,
                  label=f"{group} class{'es' if group == '2D' else ''}: mean over {len(seeds)} "
                        f"seed{'s' if len(seeds) > 1 else ''}")
    left.axhline(0.0, color="0.3", lw=0.8)
    left.axhline(-margin, color="0.6", lw=0.8, ls=":", label=f"non-inferiority margin (-{margin:g})")
    left.set_xlabel("cue strength λ")
    left.set_ylabel(f"AUROC, {model} − {reference} (paired)")
    left.set_title(f"{model} − {reference}")
    left.grid(color="0.93")
    left.legend(frameon=False, fontsize=7.5)
    models = [*alone, reference, model]
    for k, m in enumerate(dict.fromkeys(models)):
        rows = sweep[(sweep["model"] == m) & (sweep["group"] == "3D")]
        if rows.empty:
            continue
        color = class_color(k + 1)
        right.scatter(rows["lambda"], rows["auroc"], s=10, color=color, alpha=0.45)
        mean = rows.groupby("lambda")["auroc"].mean().reindex(lams)
        right.plot(lams, mean, marker="o", color=color, lw=2 if m in alone else 1.2, label=f"{m} (mean; dots: seeds)")
    right.axhline(0.5, color="0.6", ls="--", lw=0.8)
    shown = sweep[(sweep["group"] == "3D") & sweep["model"].isin(models)]["auroc"]
    right.set_ylim(min(0.3, float(shown.min()) - 0.05) if len(shown) else 0.3, 1.02)
    right.set_xlabel("cue strength λ")
    right.set_ylabel("AUROC, 3D class")
    right.set_title("3D class: the positive control and the others")
    right.grid(color="0.93")
    right.legend(frameon=False, fontsize=7.5)
    return finish(fig, path)
