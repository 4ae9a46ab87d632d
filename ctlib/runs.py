"""A run on disk: what it is (``RunSpec`` and its fingerprint), where it goes, what it holds.

- Identity: :class:`RunSpec` (profile, model, alpha) and its fingerprint, which guards resumption;
  :func:`run_is_complete`, :func:`scored_every_volume`.
- Folders: :func:`run_tag`, :func:`run_name`, :func:`paper_outputs` (``runs/<tag>/<run>``, ``figures/<tag>``,
  ``results/<tag>``, as every notebook's parameters cell describes them); :func:`table_run` (Table 3's
  alpha = 0 row is Table 2's ResNet run).
- Files: :func:`write_config`, :func:`write_history`, :func:`write_results` (what ``ctlib.train`` writes);
  the ``predictions.csv`` format (:func:`predictions_frame`, :func:`read_predictions`,
  :func:`same_test_volumes`); :func:`load_run` (the best model of a finished run).

A run folder holds ``config.json``, ``profile.json``, ``history.csv``, ``splits.csv``, ``predictions.csv``
(test), ``val_predictions.csv``, ``features.npz``, ``metrics.json``, ``per_class_auroc.csv`` and
``checkpoints/{last,best}.pt``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ctlib import atomic
from ctlib.data import CLASSES, DataError
from ctlib.metrics import bootstrap_auroc, check_arrays, evaluate
from ctlib.models import alpha_beta, build_model, unwrap, weights_used
from ctlib.prepare import RunData, synthetic_root
from ctlib.profiles import Profile, get_profile, load_profile, save_profile

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# folders
# ---------------------------------------------------------------------------------------------
#: The paper's future-work variant as a Table 3 row: alpha learned, and the 2D weight beta learned too
#: (``fused = beta * x_2d + alpha * residual_3d``, profile field ``learn_2d_weight``).
LEARNED_2D = "learned-2d"

# The runs of the paper: Table 2 (ResNet, ViT, ResNet+ViT with equal weights) and Table 3 (alpha),
# plus the future-work variant.
ALPHAS: tuple[float | str, ...] = (0.0, 0.1, 0.3, 0.5, 1.0, "learned", LEARNED_2D)


def run_name(model: str, alpha: float | str | None = None) -> str:
    """Folder name of a run: ``resnet2d``, ``vit3d``, ``fusion-alpha0.5``, ``fusion-learned``,
    ``fusion-learned-2d``."""
    if model != "fusion":
        return model
    if alpha in ("learned", LEARNED_2D):
        return f"fusion-{alpha}"
    return f"fusion-alpha{float(1.0 if alpha is None else alpha):g}"


def table_run(model: str, alpha: float | str | None = None) -> tuple[str, float | str | None]:
    """The run behind a table row: Table 3's fixed ``alpha = 0`` row is Table 2's ResNet run.

    At a fixed alpha of 0 the fusion skips its 3D branch and is the ResNet: its head on the mean slice
    feature equals the mean of the ResNet's slice logits (one linear layer), so it is the same network,
    trained from the same start, and the paper reports it so (its Table 3 alpha = 0 row repeats Table 2's
    ResNet row exactly: AUC 0.83, accuracy 0.83, precision 0.66, recall 0.34). Under the ``paper`` profile
    the ResNet's slices are 214x214 where the fusion's are 224x224, as in the paper. Every other row is
    itself.
    """
    if model == "fusion" and alpha is not None and not isinstance(alpha, str) and float(alpha) == 0.0:
        return "resnet2d", None
    return model, alpha


def run_tag(profile: str, seed: int = 0) -> str:
    """Folder tag of a profile's outputs: ``demo`` for seed 0, ``demo-seed1`` otherwise.

    Runs go to ``runs/<tag>/<run_name>``, figures to ``figures/<tag>/``, tables to ``results/<tag>/``.
    """
    return profile if int(seed) == 0 else f"{profile}-seed{int(seed)}"


@dataclass(frozen=True)
class PaperOutputs:
    """Where one profile's outputs go, as every notebook's parameters cell describes them."""

    profile: Profile
    seed: int
    tag: str
    runs: Path  # runs_dir/<tag>: one folder per training run
    figures: Path  # figures_dir/<tag>
    results: Path  # results_dir/<tag>: tables as CSV and Markdown

    def run_dir(self, model: str, alpha: float | str | None = None) -> Path:
        """The run folder of a table row (:func:`table_run`: alpha = 0 is the ResNet's)."""
        return self.runs / run_name(*table_run(model, alpha))


def paper_outputs(profile: str, *, data_root: str | Path | None = None, work_dir: str | Path = "../data",
                  runs_dir: str | Path = "../runs", figures_dir: str | Path = "../figures",
                  results_dir: str | Path = "../results", seed: int = 0) -> PaperOutputs:
    """The resolved profile and output folders of a notebook run (folders are created)."""
    prof = get_profile(profile, work_dir=str(Path(work_dir).resolve()),
                       data_root=None if data_root is None else str(Path(data_root).resolve()), seed=int(seed))
    tag = run_tag(profile, seed)
    out = PaperOutputs(prof, int(seed), tag, Path(runs_dir).resolve() / tag, Path(figures_dir) / tag,
                       Path(results_dir) / tag)
    for folder in (out.figures, out.results):
        folder.mkdir(parents=True, exist_ok=True)
    return out


# ---------------------------------------------------------------------------------------------
# identity
# ---------------------------------------------------------------------------------------------
LATER_FIELDS: dict[str, Any] = {"warmup_steps": 0, "compile": False, "sync_bn": False}


@dataclass
class RunSpec:
    """What a run is: the profile, the model and alpha. Its hash guards resumption."""

    profile: Profile
    model: str
    alpha: float | str = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile.to_dict(), "model": self.model, "alpha": self.alpha}

    def fingerprint(self, data_key: str = "") -> str:
        """Hash of the settings and of the data (``ctlib.prepare.RunData.key``: split file and excluded
        volumes): a run resumes only with both equal."""
        d = self.to_dict()
        # Where data and work files live, and how they are read, does not change the result; the rest does.
        d["profile"] = {k: v for k, v in d["profile"].items() if k not in (
            "work_dir", "num_workers", "prepare_workers", "extra", "dist_timeout_minutes", "max_failed_fraction",
            "device", "per_gpu_batch")}
        # Fields added later are left out at their defaults, so runs made before them keep their fingerprint.
        for name, default in LATER_FIELDS.items():
            if d["profile"].get(name, default) == default:
                d["profile"].pop(name, None)
        d["data_key"] = data_key
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_is_complete(run_dir: str | Path, spec: RunSpec, data_key: str | None = None) -> bool:
    """True when ``run_dir`` holds a finished run of exactly ``spec`` (its metrics are written) on the data
    ``data_key`` (``RunData.key``; default: the one in the run's config)."""
    run_dir = Path(run_dir)
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    data_key = config.get("data_key", "") if data_key is None else data_key
    return (run_dir / "metrics.json").exists() and config.get("fingerprint") == spec.fingerprint(data_key)


def scored_every_volume(run_dir: str | Path) -> bool:
    """True when the run's ``features.npz`` holds every volume of its ``splits.csv`` (a run finished with
    ``--score eval`` holds the validation and test volumes only)."""
    run_dir = Path(run_dir)
    try:
        with np.load(run_dir / "features.npz") as f:
            scored = len(f["names"])
        return scored == len(pd.read_csv(run_dir / "splits.csv"))
    except (FileNotFoundError, KeyError, ValueError, OSError):
        return False


# ---------------------------------------------------------------------------------------------
# files a run writes
# ---------------------------------------------------------------------------------------------
def data_description(profile: Profile) -> str:
    """What a run was trained on, in words (its config and metrics say it)."""
    if profile.data_root is None:
        # The snapshot's name says how it was generated; where it lies is machine-specific.
        return f"synthetic CT-RATE-format phantoms ({synthetic_root(profile).name})"
    return f"CT-RATE snapshot at {profile.data_root}"


def write_config(spec: RunSpec, data: RunData, out: Path, parts: dict[str, Sized], world: int,
                 device: torch.device, model: nn.Module, batching: Mapping[str, int] | None = None) -> None:
    """A run's ``config.json``, ``profile.json`` and ``splits.csv`` (rank 0, at its start). ``batching``: the
    batch plan (``ctlib.batching.BatchPlan.to_dict``: effective batch, per-rank batch, accumulation steps)."""
    config = {**spec.to_dict(), "fingerprint": spec.fingerprint(data.key), "data_key": data.key, "world_size": world,
              **(batching or {}),
              "device": str(device), "weights_used": weights_used(unwrap(model)),
              "data": data_description(spec.profile), "cache_dir": str(data.cache_dir.resolve()),
              "split_file": str(data.split_path.resolve()), "split_sha256": data.split_sha,
              "excluded_volumes": data.excluded, "n_volumes": {s: len(p) for s, p in parts.items()}}
    atomic.write_text(out / "config.json", json.dumps(config, indent=2, default=str) + "\n")
    save_profile(spec.profile, out / "profile.json")
    pd.DataFrame({"VolumeName": data.cohort["VolumeName"], "patient": data.cohort["patient"],
                  "split": data.splits.to_numpy()}).to_csv(out / "splits.csv", index=False)
    log.info("%s: %s on %d process(es) [%s], weights: %s, volumes train/val/test = %s (split %s)", out,
             spec.model, world, device, config["weights_used"],
             "/".join(str(len(parts[s])) for s in ("train", "val", "test")), data.split_path.name)


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    """``history.csv``: one row per epoch, atomically."""
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=list(history[0]))
    w.writeheader()
    w.writerows(history)
    atomic.write_text(path, text.getvalue())


def write_results(out: Path, spec: RunSpec, cohort: pd.DataFrame, splits: pd.Series,
                  preds: dict[str, np.ndarray], *, best_epoch: int, history: list[dict[str, float]],
                  model: nn.Module) -> dict[str, Any]:
    """A finished run's scores of its best checkpoint: ``predictions.csv`` (test), ``val_predictions.csv``,
    ``features.npz``, ``per_class_auroc.csv`` and ``metrics.json``; returns the metrics."""
    names = cohort["VolumeName"].to_numpy()[preds["index"]]
    split_of = splits.to_numpy()[preds["index"]]
    patients = cohort["patient"].to_numpy()[preds["index"]]
    sel = {s: split_of == s for s in ("val", "test")}
    predictions_frame(names[sel["test"]], preds["labels"][sel["test"]], preds["probs"][sel["test"]]).to_csv(
        out / "predictions.csv", index=False)
    predictions_frame(names[sel["val"]], preds["labels"][sel["val"]], preds["probs"][sel["val"]]).to_csv(
        out / "val_predictions.csv", index=False)
    np.savez_compressed(out / "features.npz", names=names.astype(str), split=split_of.astype(str),
                        patient=patients.astype(str), labels=preds["labels"], probs=preds["probs"],
                        features=preds["features"])
    t, v = sel["test"], sel["val"]
    result = evaluate(preds["labels"][t], preds["probs"][t], preds["labels"][v], preds["probs"][v])
    ci = bootstrap_auroc(preds["labels"][t], preds["probs"][t], groups=patients[t],
                         n_boot=spec.profile.bootstrap, seed=spec.profile.seed)
    ci.to_csv(out / "per_class_auroc.csv", index_label="class")
    alpha, beta = alpha_beta(model)
    default = result["default"]
    metrics = {
        "model": spec.model,
        "alpha": spec.alpha,
        "alpha_final": None if math.isnan(alpha) else alpha,
        "beta_final": None if math.isnan(beta) else beta,
        "auroc": default["auroc"],
        "accuracy": default["accuracy"],
        "precision": default["precision"],
        "recall": default["recall"],
        "f1": default["f1"],
        "per_class_auroc": default["per_class_auroc"],
        "skipped_classes": default["skipped_classes"],
        "auroc_ci": [float(ci.loc["macro", "low"]), float(ci.loc["macro", "high"])] if "macro" in ci.index
        else None,
        "val_tuned": {k: result["val_tuned"][k] for k in ("auroc", "accuracy", "precision", "recall", "f1")},
        "ctclip": {k: v for k, v in result["ctclip"].items() if not isinstance(v, dict)},
        "best_epoch": best_epoch,
        "epochs": len(history),
        "train_seconds": float(sum(h["seconds"] for h in history)),
        "weights": weights_used(unwrap(model)),
        "data": data_description(spec.profile),
        "profile": spec.profile.name,
        "n_test": int(t.sum()),
        "n_val": int(v.sum()),
    }
    atomic.write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=float) + "\n")
    log.info("%s test: AUROC %.3f  accuracy %.3f  precision %.3f  recall %.3f (best epoch %d)", out,
             metrics["auroc"], metrics["accuracy"], metrics["precision"], metrics["recall"], best_epoch)
    return metrics


# ---------------------------------------------------------------------------------------------
# predictions.csv
# ---------------------------------------------------------------------------------------------
def predictions_frame(
    names: Sequence[str], labels: Any, probs: Any, classes: Sequence[str] = CLASSES
) -> pd.DataFrame:
    """The ``predictions.csv`` table: ``VolumeName``, every ``label:<class>``, every ``prob:<class>``.

    Args:
        names: (N,) volume names.
        labels: (N, C) 0/1.
        probs: (N, C) probabilities.
        classes: class names (column order).

    Returns:
        DataFrame of N rows and 1 + 2C columns in that order.
    """
    classes = tuple(classes)
    y, p = check_arrays(labels, probs, classes)
    names = [str(v) for v in names]
    if len(names) != y.shape[0]:
        raise ValueError(f"{len(names)} names for {y.shape[0]} rows of labels/probs")
    data: dict[str, Any] = {"VolumeName": names}
    data.update({f"label:{c}": y[:, k] for k, c in enumerate(classes)})
    data.update({f"prob:{c}": p[:, k] for k, c in enumerate(classes)})
    return pd.DataFrame(data)


def read_predictions(
    path_or_frame: str | os.PathLike[str] | pd.DataFrame, classes: Sequence[str] = CLASSES
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Read a ``predictions.csv`` (or its DataFrame) back into names, labels and probs.

    Args:
        path_or_frame: CSV path or a DataFrame as made by :func:`predictions_frame`.
        classes: class names (column order of the returned arrays).

    Returns:
        (names: list of N str, labels: (N, C) int64, probs: (N, C) float64).

    Raises:
        DataError: naming the file and the missing column or the bad value.
    """
    classes = tuple(classes)
    if isinstance(path_or_frame, pd.DataFrame):
        frame, source = path_or_frame, "<predictions DataFrame>"
    else:
        source = os.fspath(path_or_frame)
        try:
            frame = pd.read_csv(source, dtype={"VolumeName": str})
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise DataError(f"{source}: cannot read predictions CSV ({err})") from err
    wanted = ["VolumeName", *(f"label:{c}" for c in classes), *(f"prob:{c}" for c in classes)]
    missing = [col for col in wanted if col not in frame.columns]
    if missing:
        raise DataError(f"{source}: missing column {missing[0]!r} ({len(missing)} missing in all)")
    names = frame["VolumeName"].astype(str).tolist()
    try:
        labels = frame[[f"label:{c}" for c in classes]].to_numpy(dtype=np.float64)
        probs = frame[[f"prob:{c}" for c in classes]].to_numpy(dtype=np.float64)
        labels, probs = check_arrays(labels, probs, classes)
    except ValueError as err:
        raise DataError(f"{source}: {err}") from err
    return names, labels, probs


def same_test_volumes(run_dirs: Mapping[str, Any]) -> list[str]:
    """Check that runs were scored on identical test volumes (Table 2's models, Table 3's alphas).

    Args:
        run_dirs: label -> run folder holding ``predictions.csv`` (one row per test volume).

    Returns:
        The common test VolumeNames, sorted.

    Raises:
        ValueError: a run's test volumes differ from the first run's, naming the runs and up to 5 volumes each
            way (a different cohort or split, e.g. runs made before the split file was fixed).
    """
    if not run_dirs:
        raise ValueError("no runs to compare")
    names = {}
    for label, folder in run_dirs.items():
        path = os.path.join(os.fspath(folder), "predictions.csv")
        names[label] = set(pd.read_csv(path, usecols=["VolumeName"])["VolumeName"].astype(str))
    first, ref = next(iter(names.items()))
    problems = []
    for label, got in names.items():
        if got != ref:
            problems.append(f"{label} ({len(got)} test volumes) vs {first} ({len(ref)}): only in {label}: "
                            f"{sorted(got - ref)[:5]}, only in {first}: {sorted(ref - got)[:5]}")
    if problems:
        raise ValueError("runs were scored on different test volumes: " + "; ".join(problems))
    return sorted(ref)


# ---------------------------------------------------------------------------------------------
# reading runs back
# ---------------------------------------------------------------------------------------------
def load_run(run_dir: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, Profile, dict]:
    """The best model of a finished run, its profile and its config (for figures and retrieval)."""
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    profile = load_profile(run_dir / "profile.json")
    model = build_model(profile, config["model"], config["alpha"], pretrained=False)
    state = torch.load(run_dir / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), profile, config
