"""ctlib.download: patient choice, remote paths, download logic with a fake Hub (no network)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from ctrate_fixtures import Vol, label_vector, write_snapshot
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RemoteEntryNotFoundError

import ctlib.download as dl
from ctlib.data import load_cohort, parse_volume_name
from ctlib.download import DownloadError, choose_volumes, csv_paths, download, main, remote_paths

CSVS = [
    "dataset/multi_abnormality_labels/train_predicted_labels.csv",
    "dataset/metadata/train_metadata.csv",
    "dataset/metadata/no_chest_train.txt",
    "dataset/radiology_text_reports/train_reports.csv",
    "dataset/multi_abnormality_labels/valid_predicted_labels.csv",
    "dataset/metadata/validation_metadata.csv",
    "dataset/metadata/no_chest_valid.txt",
    "dataset/radiology_text_reports/validation_reports.csv",
]


def _labels(n_train: int = 30, n_valid: int = 10) -> pd.DataFrame:
    names = []
    for split, n in (("train", n_train), ("valid", n_valid)):
        for p in range(1, n + 1):
            scans = "ab" if p % 3 == 0 else "a"
            recons = (1, 2) if p % 2 == 0 else (1,)
            names += [f"{split}_{p}_{s}_{r}.nii.gz" for s in scans for r in recons]
    return pd.DataFrame({"VolumeName": names})


def test_choose_volumes_patient_complete_and_seeded() -> None:
    labels = _labels()
    chosen = choose_volumes(labels, 5, seed=0)
    patients = {parse_volume_name(n)["patient"] for n in chosen}
    assert len(patients) == 5
    all_of = {p: {n for n in labels["VolumeName"] if parse_volume_name(n)["patient"] == p} for p in patients}
    assert set(chosen) == set().union(*all_of.values())  # every scan and reconstruction of each patient
    assert chosen == sorted(chosen)
    assert choose_volumes(labels, 5, seed=0) == chosen
    assert choose_volumes(labels.sample(frac=1, random_state=1), 5, seed=0) == chosen  # row order irrelevant
    assert choose_volumes(labels, 5, seed=1) != chosen
    # the patient with 2 scans x 2 reconstructions comes whole
    whole = choose_volumes(labels[labels["VolumeName"].str.startswith("train_6_")], 1)
    assert whole == ["train_6_a_1.nii.gz", "train_6_a_2.nii.gz", "train_6_b_1.nii.gz", "train_6_b_2.nii.gz"]


def test_choose_volumes_splits_exclude_and_errors() -> None:
    labels = _labels()
    valid = choose_volumes(labels, 10, splits=("valid",))
    assert {parse_volume_name(n)["patient"] for n in valid} == {f"valid_{p}" for p in range(1, 11)}
    assert len(valid) == len(labels[labels["VolumeName"].str.startswith("valid_")])
    everyone = choose_volumes(labels, 40, exclude=["train_2_a_1"])
    assert "train_2_a_1.nii.gz" not in everyone and "train_2_a_2.nii.gz" in everyone
    assert len(everyone) == len(labels) - 1
    with pytest.raises(ValueError, match="only 39 available"):  # train_1 lost its only volume
        choose_volumes(labels, 40, exclude=["train_1_a_1.nii.gz"])
    with pytest.raises(ValueError, match="n_patients"):
        choose_volumes(labels, 0)
    with pytest.raises(ValueError, match="splits"):
        choose_volumes(labels, 1, splits=("test",))


def test_remote_paths_shape() -> None:
    assert csv_paths() == CSVS
    paths = remote_paths(["train_1_a_1.nii.gz", "train_12_b_2.nii.gz"])
    assert paths == [*CSVS[:4], "dataset/train_fixed/train_1/train_1_a/train_1_a_1.nii.gz",
                     "dataset/train_fixed/train_12/train_12_b/train_12_b_2.nii.gz"]
    originals = remote_paths(["valid_3_a_1.nii.gz", "train_1_a_1.nii.gz"], fixed=False)
    assert originals == [*CSVS, "dataset/valid/valid_3/valid_3_a/valid_3_a_1.nii.gz",
                         "dataset/train/train_1/train_1_a/train_1_a_1.nii.gz"]


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A fake Hub repo: a local snapshot served by a monkeypatched hf_hub_download that copies files."""
    vols = [Vol(f"train_{p}_{s}_{r}", label_vector("Emphysema"), original=True, fixed=True, seed=p)
            for p in range(1, 7) for s in ("a", "b")[: 1 + (p == 2)] for r in (1, 2)]
    vols += [Vol("valid_1_a_1", label_vector(), fixed=True), Vol("valid_2_a_1", label_vector(), fixed=True,
                                                                 no_chest=True)]
    remote = write_snapshot(tmp_path / "remote", vols)
    state = SimpleNamespace(remote=remote, calls=[], fail={})

    def fake_download(*, repo_id, repo_type, filename, local_dir, token=None):
        assert (repo_id, repo_type) == ("ibrahimhamamci/CT-RATE", "dataset")
        state.calls.append((filename, token))
        if filename in state.fail:
            raise state.fail[filename]
        src = remote / filename
        if not src.is_file():
            raise RemoteEntryNotFoundError(f"404 {filename}", response=_response(404))
        dst = Path(local_dir) / filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        return str(dst)

    monkeypatch.setattr(dl, "hf_hub_download", fake_download)
    return state


def _response(status: int) -> SimpleNamespace:
    return SimpleNamespace(status_code=status, headers={}, request=None)


def test_download_fetches_csvs_then_chosen_volumes(hub: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = download(out, 3, seed=0, token="hf_x", progress=False)
    fetched = [c[0] for c in hub.calls]
    assert sorted(fetched[:8]) == sorted(CSVS)  # the CSVs first
    assert all(t == "hf_x" for _, t in hub.calls)
    assert len({parse_volume_name(n)["patient"] for n in report.chosen}) == 3
    assert "valid_2_a_1.nii.gz" not in report.chosen  # no_chest volumes are never fetched
    volumes = fetched[8:]
    assert sorted(volumes) == sorted(p for p in remote_paths(report.chosen) if p.endswith(".nii.gz"))
    assert all(p.startswith(("dataset/train_fixed/train_", "dataset/valid_fixed/valid_")) for p in volumes)
    assert report.chosen == choose_volumes(pd.concat([
        pd.read_csv(out / c) for c in CSVS if "labels" in c]), 3, seed=0, exclude=["valid_2_a_1.nii.gz"])
    # the result is a snapshot load_cohort reads: exactly the chosen volumes, HU-ready
    cohort = load_cohort(out)
    assert cohort["VolumeName"].tolist() == report.chosen and cohort["hu_ready"].all()

    hub.calls.clear()
    again = download(out, 3, seed=0, progress=False)
    assert hub.calls == [] and again.fetched == [] and len(again.present) == 8 + len(report.chosen)


def test_download_originals_and_dry_run(hub: SimpleNamespace, tmp_path: Path) -> None:
    report = download(tmp_path / "o", 2, seed=3, fixed=False, dry_run=True, progress=False)
    assert len(hub.calls) == 8 and sorted(report.fetched) == sorted(CSVS)
    assert all("/train/" in p or "/valid/" in p for p in report.planned)
    assert len(report.planned) == len(report.chosen)
    assert not any(p.endswith(".nii.gz") for p, _ in hub.calls)
    download(tmp_path / "o", 2, seed=3, fixed=False, progress=False)
    cohort = load_cohort(tmp_path / "o")
    assert cohort["VolumeName"].tolist() == report.chosen and not cohort["hu_ready"].any()


@pytest.mark.parametrize(
    "error",
    [GatedRepoError("403 gated", response=_response(403)), HfHubHTTPError("401", response=_response(401))],
)
def test_download_auth_errors_explain(hub: SimpleNamespace, tmp_path: Path, error: Exception) -> None:
    hub.fail[CSVS[0]] = error
    with pytest.raises(DownloadError) as info:
        download(tmp_path / "o", 2, progress=False)
    msg = str(info.value)
    assert "huggingface-cli login" in msg and "--token" in msg
    assert "https://huggingface.co/datasets/ibrahimhamamci/CT-RATE" in msg and "terms" in msg
    assert info.value.__cause__ is error


def test_download_collects_other_failures(hub: SimpleNamespace, tmp_path: Path) -> None:
    chosen = download(tmp_path / "o", 6, dry_run=True, progress=False).planned
    hub.fail[chosen[0]] = RemoteEntryNotFoundError("404 gone", response=_response(404))
    with pytest.raises(DownloadError, match="1 file.*could not be downloaded") as info:
        download(tmp_path / "o", 6, progress=False)
    assert chosen[0] in str(info.value)
    assert all((tmp_path / "o" / p).is_file() for p in chosen[1:])  # the rest was fetched


def test_cli(hub: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and "--dry-run" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["--out", str(tmp_path), "--patients", "0"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        main(["--patients", "3"])  # --out is required

    assert main(["--out", str(tmp_path / "o"), "--patients", "2", "--seed", "4", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "would fetch" in printed and ("dataset/train_fixed/" in printed or "dataset/valid_fixed/" in printed)
    assert not list((tmp_path / "o").rglob("*.nii.gz"))

    assert main(["--out", str(tmp_path / "o"), "--patients", "2", "--seed", "4", "--originals"]) == 0
    assert len(list((tmp_path / "o" / "dataset").glob("*/*/*/*.nii.gz"))) > 0
    assert not list((tmp_path / "o" / "dataset").glob("*_fixed"))

    hub.fail[CSVS[0]] = GatedRepoError("gated", response=_response(401))
    assert main(["--out", str(tmp_path / "p"), "--patients", "2"]) == 1
    assert "huggingface-cli login" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "o"), "--patients", "500"]) == 1
    assert "only 7 available" in capsys.readouterr().err


def test_cli_module_help() -> None:
    done = subprocess.run([sys.executable, "-m", "ctlib.download", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--patients" in done.stdout
