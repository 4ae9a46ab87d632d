"""Preparing once, training only reads: the README's CT-RATE steps, the fixed split, and the faults of issue 8.

Each fault test ends with nothing lost and the same numbers (cache bytes, split) as an undisturbed run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from ctrate_fixtures import Vol, write_snapshot

import ctlib.cache as cache_mod
import ctlib.preprocess as preprocess_mod
from ctlib.cache import CacheError, PreparationError, PreparedVolumes, check_entry, prepare, prepared_path
from ctlib.data import CLASSES, load_cohort, volume_relpath
from ctlib.prepare import (
    CacheNotReady,
    data_key,
    load_run_data,
    prepare_command,
    prepare_profile,
    profile_split,
)
from ctlib.prepare import main as prepare_main
from ctlib.preprocess import Preprocessing
from ctlib.profiles import get_profile
from ctlib.runs import same_test_volumes
from ctlib.split import SplitMismatch

REPO = Path(__file__).resolve().parents[1]
# Reduced sizes for CPU: the fixture's 24x20x12 volumes, a tiny ViT, one short epoch.
PREP_SETS = ["size_2d=[16,18,12]", "size_3d=[16,16,12]", "num_slices=6", "target_spacing=null"]
TRAIN_SETS = ["weights=null", "vit_patch_size=8", "vit_dim=32", "vit_spatial_depth=1", "vit_slice_depth=1",
              "vit_heads=2", "vit_dim_head=16", "vit_mlp_dim=64", "epochs=2", "batch_size=4", "eval_batch_size=8",
              "bootstrap=10", "num_workers=0", "max_failed_fraction=0.1",
              "device=cpu"]  # the paper profile needs CUDA; on purpose on the CPU here (ctlib.gpu)


def _snapshot(root: Path, n_patients: int = 16) -> Path:
    rng = np.random.default_rng(0)
    vols = []
    for p in range(1, n_patients + 1):
        labels = (rng.random(len(CLASSES)) < 0.3).astype(int).tolist()
        vols.append(Vol(f"train_{p}_a_1", labels, seed=p))
        if p % 4 == 0:
            vols.append(Vol(f"train_{p}_a_2", labels, seed=100 + p))
    return write_snapshot(root, vols)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    return _snapshot(tmp_path_factory.mktemp("snap") / "CT-RATE")


def _profile(snapshot: Path, work: Path, **extra):
    sets = dict(s.split("=", 1) for s in PREP_SETS + TRAIN_SETS)
    return get_profile("smoke", data_root=str(snapshot), work_dir=str(work), prepare_workers=1, **{**sets, **extra})


def _entries(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.npy"))}


# ---------------------------------------------------------------------------------------------------------
# The README's CT-RATE steps, as written
# ---------------------------------------------------------------------------------------------------------


def _readme_commands() -> list[str]:
    text = (REPO / "docs/ctrate.md").read_text()
    section = text[text.index("## Run the paper on CT-RATE"):]
    section = section[:section.index("\n## ", 5)]
    lines = re.sub(r"\\\n\s*", " ", section).splitlines()
    return [ln.strip() for ln in lines if ln.strip().startswith(("python -m ctlib.prepare", "torchrun"))]


@pytest.mark.slow
def test_readme_ctrate_steps_then_training_decodes_nothing(tmp_path: Path) -> None:
    """The README's cache command, then its torchrun command, at reduced sizes on a CT-RATE-format snapshot:
    after preparation every source volume is overwritten with garbage, so a single decode would fail."""
    snap = _snapshot(tmp_path / "CT-RATE")
    commands = _readme_commands()
    assert [c.split()[0] for c in commands] == ["python", "torchrun"], commands
    sets = [a for s in PREP_SETS + TRAIN_SETS for a in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "work"
    run_dir.mkdir()

    def run(cmd: str) -> subprocess.CompletedProcess:
        args = cmd.replace("/data/CT-RATE", str(snap)).split()
        if args[0] == "torchrun":  # 2 CPU processes (gloo) instead of 4 GPUs
            args = [sys.executable, "-m", "torch.distributed.run", *args[1:]]
            args[args.index("--nproc_per_node") + 1] = "2"
        else:
            args = [sys.executable, *args[1:]]
            args[args.index("--workers") + 1] = "2"
        done = subprocess.run([*args, *sets], cwd=run_dir, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    prep = run(commands[0])
    assert "total: 40 prepared, 0 reused, 0 failed" in prep.stdout  # 20 volumes x (16x18 and 16x16)
    sources = sorted((snap / "dataset").rglob("*.nii.gz"))
    assert len(sources) == 20
    for path in sources:
        path.write_bytes(b"not a volume any more")
    run(commands[1])
    out = run_dir / "runs/paper/fusion-learned"
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    split = pd.read_csv(config["split_file"])
    assert Path(config["split_file"]).parent.parent == (run_dir / "data" / "cache").resolve()
    assert metrics["n_test"] == (split["split"] == "test").sum() > 0
    assert set(pd.read_csv(out / "predictions.csv")["VolumeName"]) == set(split.loc[split["split"] == "test",
                                                                                      "VolumeName"])


def test_training_reads_the_cache_without_decoding(snapshot: Path, tmp_path: Path, monkeypatch) -> None:
    """In process: after prepare_profile, a whole training run calls ctlib.data.read_hu zero times."""
    from ctlib import data
    from ctlib.runs import RunSpec
    from ctlib.train import train

    profile = _profile(snapshot, tmp_path / "w", epochs=1)
    prepare_profile(profile, progress=False)
    calls = []
    monkeypatch.setattr(data, "read_hu", lambda row: calls.append(row) or 1 / 0)
    monkeypatch.setattr(cache_mod, "read_hu", lambda row: calls.append(row) or 1 / 0)
    metrics = train(RunSpec(profile, "resnet2d"), tmp_path / "run", progress=False)
    assert calls == [] and metrics["n_test"] > 0


# ---------------------------------------------------------------------------------------------------------
# A cache that cannot lie
# ---------------------------------------------------------------------------------------------------------


def test_truncated_and_zeroed_entries_are_named_and_remade(snapshot: Path, tmp_path: Path) -> None:
    profile = _profile(snapshot, tmp_path / "w")
    first = prepare_profile(profile, progress=False)
    folder = first.reports[0].cache_dir
    reference = _entries(folder)
    cohort = first.split.cohort
    names = cohort["VolumeName"].tolist()
    truncated, zeroed, blank = (prepared_path(folder, n) for n in names[:3])
    truncated.write_bytes(truncated.read_bytes()[:-500])
    raw = bytearray(zeroed.read_bytes())
    raw[128:] = bytes(len(raw) - 128)  # header kept, payload and checksum zeroed
    zeroed.write_bytes(bytes(raw))
    blank.write_bytes(bytes(len(reference[blank.name])))

    shape = (6, 18, 16)
    assert "truncated" in check_entry(truncated, shape)
    assert check_entry(zeroed, shape) is None and "checksum" in check_entry(zeroed, shape, content=True)
    assert "not a cache entry" in check_entry(blank, shape)
    with pytest.raises(CacheNotReady, match=re.escape(str(truncated))):
        load_run_data(profile, "resnet2d")

    dataset = PreparedVolumes(folder, cohort)
    for i, path in enumerate((truncated, zeroed, blank)):
        with pytest.raises(CacheError, match=re.escape(str(path))):
            dataset[i]
    # in a DataLoader worker process, the error still names the file
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, [1]), num_workers=1)
    with pytest.raises(Exception, match=re.escape(zeroed.name)):
        next(iter(loader))

    again = prepare_profile(profile, progress=False)
    report = again.reports[0]
    assert sorted(report.remade) == sorted(names[:3]) and sorted(report.done) == sorted(names[:3])
    assert "re-made " + names[0] in again.summary()
    assert _entries(folder) == reference  # byte-identical to the undisturbed preparation
    assert len(load_run_data(profile, "resnet2d").cohort) == len(cohort)


def test_non_finite_values_are_never_written(snapshot: Path, tmp_path: Path, monkeypatch) -> None:
    cohort = load_cohort(snapshot)
    real = preprocess_mod.preprocess

    calls: list[int] = []

    def nan_for_one(hu, **kw):  # the 2nd volume's preprocessing yields a NaN
        out = real(hu, **kw)
        calls.append(1)
        if len(calls) == 2:
            out[0, 0, 0] = np.nan
        return out

    monkeypatch.setattr(preprocess_mod, "preprocess", nan_for_one)
    prep = Preprocessing(size=(16, 18, 12), num_slices=6)
    report = prepare(cohort, tmp_path / "c", prep, workers=1, progress=False)
    (bad,) = report.failed
    assert "non-finite" in report.failed[bad] and not prepared_path(report.cache_dir, bad).exists()


# ---------------------------------------------------------------------------------------------------------
# Faults during preparation
# ---------------------------------------------------------------------------------------------------------


def test_crashed_worker_pool_stops_at_once_with_the_cause(snapshot: Path, tmp_path: Path) -> None:
    from prep_workers import die_on_second
    from tqdm import tqdm

    tasks = load_cohort(snapshot).to_dict("records")
    recorded: list[tuple[str, str | None]] = []
    with pytest.raises(PreparationError, match="died abruptly.*fewer --workers"):
        cache_mod._run_pool(tasks, tmp_path, Preprocessing(), 2, lambda *r: recorded.append(r),
                            tqdm(disable=True), work=die_on_second)
    # pending volumes are not marked failed: nothing was recorded as an error
    assert all(err is None for _, err in recorded) and len(recorded) < len(tasks)


@pytest.mark.slow
def test_prepare_killed_midway_then_rerun(snapshot: Path, tmp_path: Path) -> None:
    """SIGKILL of `python -m ctlib.prepare` once a few entries exist; the rerun ends byte-identical."""
    reference = prepare_profile(_profile(snapshot, tmp_path / "ref"), progress=False)
    ref_entries = _entries(reference.reports[0].cache_dir)
    work = tmp_path / "w"
    cmd = [sys.executable, "-m", "ctlib.prepare", "--profile", "smoke", "--data-root", str(snapshot), "--work-dir",
           str(work), "--workers", "1", "--no-progress", *[a for s in PREP_SETS for a in ("--set", s)]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(work.glob("cache/*/v2-*/*.npy"))) < 3:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    folders = list(work.glob("cache/*/v2-16x18x12*"))
    n_before = len(list(folders[0].glob("*.npy")))
    assert 3 <= n_before < len(ref_entries)

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{len(ref_entries) - n_before} prepared, {n_before} reused, 0 failed" in done.stdout
    assert _entries(folders[0]) == ref_entries
    assert not list(folders[0].glob(".*.tmp"))
    split = next(work.glob("cache/*/split-*.csv")).read_bytes()
    assert split == reference.split.path.read_bytes()


def test_unreadable_source_is_excluded_and_moves_no_other_patient(snapshot: Path, tmp_path: Path,
                                                                   capsys) -> None:
    clean = prepare_profile(_profile(snapshot, tmp_path / "clean"), progress=False)
    broken_snap = tmp_path / "broken" / "CT-RATE"
    shutil.copytree(snapshot, broken_snap)
    name = "train_6_a_1.nii.gz"
    bad = broken_snap / "dataset" / volume_relpath(name)
    bad.write_bytes(bad.read_bytes()[:300])  # a truncated download

    # above the failure fraction (1 of 20 = 5% > 1%): non-zero exit, the file and reason named
    sets = [a for s in PREP_SETS for a in ("--set", s)]
    argv = ["--profile", "smoke", "--data-root", str(broken_snap), "--work-dir", str(tmp_path / "b"),
            "--workers", "1", "--no-progress", *sets]
    assert prepare_main(argv) == 1
    err = capsys.readouterr().err
    assert "max_failed_fraction=0.01" in err and name in err and str(bad) in err

    profile = _profile(broken_snap, tmp_path / "b")  # max_failed_fraction=0.1
    broken = prepare_profile(profile, progress=False)
    assert list(broken.excluded) == [name] and str(bad) in broken.excluded[name]
    assert broken.split.path.read_bytes() == clean.split.path.read_bytes()  # nobody moved
    data = load_run_data(profile, "vit3d")
    assert name not in set(data.cohort["VolumeName"]) and len(data.cohort) == len(clean.split.cohort) - 1
    full = dict(zip(clean.split.cohort["VolumeName"], clean.split.splits, strict=True))
    assert all(full[n] == s for n, s in zip(data.cohort["VolumeName"], data.splits, strict=True))


def test_changed_cohort_is_refused(tmp_path: Path) -> None:
    snap = _snapshot(tmp_path / "CT-RATE", n_patients=8)
    profile = _profile(snap, tmp_path / "w")
    first = profile_split(profile)
    assert profile_split(profile).sha == first.sha  # read back, not remade
    # a run's data key changes with the split file and with the excluded volumes
    assert len({data_key(first.sha, []), data_key(first.sha, ["train_1_a_1.nii.gz"]), data_key("0" * 64, [])}) == 3
    (snap / "dataset" / volume_relpath("train_3_a_1.nii.gz")).unlink()  # a volume gone from disk
    with pytest.raises(SplitMismatch, match="not the one .* was made from"):
        profile_split(profile)


def test_prepare_command_reproduces_the_profile(snapshot: Path, tmp_path: Path) -> None:
    profile = _profile(snapshot, tmp_path / "w")
    cmd = prepare_command(profile)
    assert cmd.startswith(f"python -m ctlib.prepare --profile smoke --data-root {snapshot} --work-dir ")
    assert "'size_2d=[16, 18, 12]'" in cmd and "epochs" not in cmd


def test_same_test_volumes(tmp_path: Path) -> None:
    def run(name: str, vols: list[str]) -> Path:
        (tmp_path / name).mkdir()
        pd.DataFrame({"VolumeName": vols}).to_csv(tmp_path / name / "predictions.csv", index=False)
        return tmp_path / name

    a, b = run("a", ["x", "y"]), run("b", ["y", "x"])
    assert same_test_volumes({"A": a, "B": b}) == ["x", "y"]
    c = run("c", ["x", "z"])
    with pytest.raises(ValueError, match="only in C: \\['z'\\], only in A: \\['y'\\]"):
        same_test_volumes({"A": a, "B": b, "C": c})
