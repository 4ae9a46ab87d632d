"""ctlib.gpu: the device check (no silent CPU fallback), /dev/shm, and run_all.sh's torch from another index."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctlib import gpu

REPO = Path(__file__).resolve().parents[1]


def _fake_nvidia_smi(folder: Path, output: str, code: int = 0) -> None:
    exe = folder / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\nexit {code}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)


@pytest.fixture()
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_old_driver_names_both_versions_and_the_install_fix(no_cuda, tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, "535.104.05, NVIDIA A100-SXM4-80GB, 81920 MiB\n535.104.05, NVIDIA A100-SXM4-80GB, 81920 MiB")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(gpu.DeviceUnusable) as err:
        gpu.resolve_device("cuda", profile="paper")
    msg = str(err.value)
    assert "profile 'paper' trains on CUDA GPUs" in msg
    assert "NVIDIA A100-SXM4-80GB (81920 MiB)" in msg and "driver 535.104.05" in msg
    assert "built for CUDA 13.0, which needs driver >= 580.65.06" in msg
    assert "bash run_all.sh --setup-only --torch-cuda 12.6" in msg and "whl/cu126" in msg
    assert "--device cpu" in msg


def test_no_driver_and_hidden_gpus_and_cpu_build_say_so(no_cuda, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    assert "no NVIDIA driver" in gpu.cuda_problem(proc_version=tmp_path / "none")[0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "CUDA_VISIBLE_DEVICES='' hides every GPU" in gpu.cuda_problem(proc_version=tmp_path / "none")[0]
    monkeypatch.setattr(torch.version, "cuda", None)
    cause, fix = gpu.cuda_problem(proc_version=tmp_path / "none")
    assert "CPU-only build" in cause and "--torch-cuda" in fix


def test_failing_nvidia_smi_is_reported(no_cuda, tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, "Failed to initialize NVML: Driver/library version mismatch", code=18)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    cause, fix = gpu.cuda_problem()
    assert cause == "nvidia-smi fails: Failed to initialize NVML: Driver/library version mismatch"
    assert "reboot" in fix


def test_auto_and_cpu_never_stop(no_cuda, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu.resolve_device("auto") == "cpu"
    assert gpu.resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="device must be one of"):
        gpu.resolve_device("gpu")


def test_driver_to_torch_build():
    assert gpu.suggested_torch_cuda("580.65.06") == "13.0"
    assert gpu.suggested_torch_cuda("570.86.10") == "12.6"
    assert gpu.suggested_torch_cuda("525.60.13") == "12.6"
    assert gpu.suggested_torch_cuda("470.82.01") == "11.8"
    assert gpu.min_driver_for("12.8") == "525.60.13"


def test_shm_check_stops_with_the_docker_fix(tmp_path):
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    assert gpu.check_shm(1024, path=tmp_path) == free
    need = gpu.shm_needed(free, num_workers=4, local_processes=2)
    assert need == free * 16
    with pytest.raises(gpu.ShmTooSmall, match=r"--shm-size=\d+g .*--ipc=host.*num_workers=0"):
        gpu.check_shm(need, path=tmp_path)
    assert gpu.shm_needed(10**9, num_workers=0) == 0 and gpu.check_shm(0, path=tmp_path) is None


def _print_install(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "CTLIB_PYTHON")}
    return subprocess.run(["bash", str(REPO / "run_all.sh"), "--print-install", *args], capture_output=True,
                          text=True, env=env, timeout=60)


def test_run_all_installs_torch_for_another_cuda_then_the_lock():
    res = _print_install("--torch-cuda", "12.6")
    assert res.returncode == 0, res.stderr
    cmds = [ln for ln in res.stdout.splitlines() if not ln.startswith("[run_all")]
    lock = (REPO / "requirements-lock.txt").read_text()
    torch_v = next(ln.split("==")[1] for ln in lock.splitlines() if ln.startswith("torch=="))
    vision_v = next(ln.split("==")[1] for ln in lock.splitlines() if ln.startswith("torchvision=="))
    install = next(c for c in cmds if "--index-url" in c)
    assert install.endswith(f"pip install torch=={torch_v} torchvision=={vision_v} "
                            "--index-url https://download.pytorch.org/whl/cu126")
    if any("--no-deps -r" in c for c in cmds):  # the lock's platform: the lock without torch's family, first
        rest = next(i for i, c in enumerate(cmds) if "--no-deps -r" in c)
        assert rest < cmds.index(install) and "grep -vE" in cmds[rest - 1]
    assert cmds[-1].endswith("-e .") or cmds[-1].endswith("-e .[dev,lab]")
    plain = _print_install()
    assert "--index-url" not in plain.stdout


def test_run_all_torch_options_are_checked():
    assert "https://example.org/simple" in _print_install("--torch-index", "https://example.org/simple").stdout
    assert "whl/cpu" in _print_install("--torch-cuda", "cpu").stdout
    bad = _print_install("--torch-cuda", "12")
    assert bad.returncode == 2 and "takes a CUDA version like 12.6" in bad.stderr
    help_text = subprocess.run(["bash", str(REPO / "run_all.sh"), "--help"], capture_output=True, text=True).stdout
    assert "--torch-cuda X.Y" in help_text and "--torch-index URL" in help_text and "--print-install" in help_text


def test_lock_without_torch_family_keeps_everything_else():
    """The filter run_all.sh applies: only torch, torchvision, triton and the CUDA wheels go."""
    import re

    family = re.compile(r"^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+)==")
    lines = [ln for ln in (REPO / "requirements-lock.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    gone = {ln.split("==")[0] for ln in lines if family.match(ln)}
    assert {"torch", "torchvision"} <= gone
    assert all(n in ("torch", "torchvision", "triton") or n.startswith(("nvidia-", "cuda-")) for n in gone)
    if sys.platform == "linux":
        assert any(n.startswith("nvidia-") for n in gone)


def test_train_cli_stops_before_any_data_without_a_gpu(no_cuda, tmp_path, monkeypatch):
    from ctlib.train import main

    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    work = tmp_path / "work"
    with pytest.raises(SystemExit) as err:
        main(["--profile", "paper", "--model", "fusion", "--work-dir", str(work), "--out", str(tmp_path / "run")])
    assert str(err.value).startswith("error: profile 'paper' trains on CUDA GPUs, but torch cannot use one here")
    assert "--device cpu" in str(err.value)
    assert not work.exists() and not (tmp_path / "run").exists()


def test_notebook_launch_path_stops_before_preparing(no_cuda, tmp_path, monkeypatch):
    from ctlib import launch
    from ctlib.runs import paper_outputs

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CTLIB_DEVICE", raising=False)
    monkeypatch.setattr(launch, "prepare_profile", lambda *a, **k: pytest.fail("prepared data without a GPU"))
    out = paper_outputs("paper", work_dir=tmp_path / "w", runs_dir=tmp_path / "r", figures_dir=tmp_path / "f",
                        results_dir=tmp_path / "t")
    with pytest.raises(gpu.DeviceUnusable, match="profile 'paper' trains on CUDA GPUs"):
        launch.train_runs(out, [("resnet2d", None)])
    # a cluster launcher: the training processes check where they run, not this head node
    monkeypatch.setattr(launch, "prepare_profile", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("prepared")))
    with pytest.raises(RuntimeError, match="prepared"):
        launch.train_runs(out, [("resnet2d", None)], launcher="srun torchrun --nnodes 2")


def test_small_shm_stops_the_run_before_any_data(tmp_path, monkeypatch):
    from ctlib.profiles import get_profile
    from ctlib.runs import RunSpec
    from ctlib.train import train

    class Tiny:
        f_bavail, f_frsize = 16, 4096  # 64 KiB free, like Docker's default of 64 MB at the paper's sizes

    monkeypatch.setattr(gpu.os, "statvfs", lambda path: Tiny)
    prof = get_profile("smoke", work_dir=str(tmp_path / "w"), num_workers=2)
    with pytest.raises(gpu.ShmTooSmall, match=r"/dev/shm has 0 MiB free.*2 workers x 2 batches of 4 volume"):
        train(RunSpec(prof, "vit3d"), tmp_path / "run", progress=False)
    assert not (tmp_path / "w").exists()
    train_free = get_profile("smoke", work_dir=str(tmp_path / "w"), num_workers=0)  # no workers, no shm
    from ctlib.batching import plan_batches
    from ctlib.train import check_loader_shm

    check_loader_shm(train_free, "vit3d", plan_batches(4, 1))


def test_sync_bn_is_refused_on_the_cpu_and_converts_on_request(tmp_path, monkeypatch):
    from ctlib.profiles import get_profile
    from ctlib.runs import RunSpec
    from ctlib.train import train

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    prof = get_profile("smoke", work_dir=str(tmp_path / "w"), sync_bn=True, device="cpu")
    with pytest.raises(ValueError, match="sync_bn needs CUDA"):
        train(RunSpec(prof, "resnet2d"), tmp_path / "run", progress=False)
    assert not (tmp_path / "w").exists()
