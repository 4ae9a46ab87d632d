"""benchmarks/gpu_check.sh: stops at once without a usable GPU; end to end on the CPU at quick sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402


def _check(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "CTLIB_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(["bash", str(REPO / "benchmarks/gpu_check.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_without_a_usable_gpu_it_stops_at_once_with_the_cause(tmp_path):
    t0 = time.perf_counter()
    res = _check("--out", str(tmp_path / "r"), env={"CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert res.returncode != 0 and time.perf_counter() - t0 < 60
    assert "gpu_check: profile 'paper' trains on CUDA GPUs, but torch cannot use one here" in res.stderr
    assert "Fix:" in res.stderr and not (tmp_path / "r" / "report.json").exists()


def test_verdict_names_the_gpu_its_target_and_mfu():
    flops = 4.15e12
    loop = {"model": "fusion", "mode": "eager", "volumes_per_s": 43.0, "world": 1, "bf16": True,
            "plan": {"effective_batch": 8}}
    report = {"environment": {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3"}, "quick": False,
              "loops": [loop], "flops_per_volume": {"fusion": flops}}
    v = gpu_check.verdict(report)
    assert v.startswith("MEETS the target of >= 40 volumes/s per H100") and "NVIDIA H100 80GB HBM3" in v
    assert f"MFU {43 * flops / 989e12:.1%} of 989 TFLOP/s" in v
    report["environment"]["gpu"] = "NVIDIA H200"
    assert gpu_check.verdict(report).startswith("BELOW the target of >= 45 volumes/s per H200")
    report["environment"]["gpu"] = "NVIDIA A10G"
    assert gpu_check.verdict(report).startswith("NO TARGET for NVIDIA A10G")


def test_fusion_flops_per_volume_at_the_paper_profile():
    from ctlib.profiles import get_profile

    prof = get_profile("paper", weights=None, allow_random_init=True)
    assert 4.0e12 < gpu_check.model_flops(prof, "fusion") < 4.3e12  # the issue's ~4.2 TFLOP


@pytest.mark.slow
def test_gpu_check_cpu_mode_writes_one_report_with_every_section(tmp_path):
    out = tmp_path / "report"
    res = _check("--device", "cpu", "--quick", "--out", str(out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["environment"]["device"] == "cpu" and report["environment"]["gpu"] is None
    assert "volumes" in report["data"] and report["data"]["volumes"] > 0
    loops = report["loops"]
    assert [(r["model"], r["mode"]) for r in loops] == [("resnet2d", "eager"), ("vit3d", "eager"), ("fusion", "eager")]
    for r in loops:
        assert "error" not in r, r
        assert r["volumes_per_s"] > 0 and r["timed_steps"] == 3 and r["input"] == [8, 32, 32]
        assert 0 <= r["loader_wait_fraction"] < 1 and r["plan"]["effective_batch"] == 4
    assert report["nccl"].startswith("skipped: 0 GPU")
    assert report["verdict"].startswith("NOT COMPARABLE (cpu, quick sizes): fusion")
    assert all(report["section_s"][k] <= gpu_check.BUDGET_S[k] + 30 for k in report["section_s"])
    md = (out / "report.md").read_text()
    for heading in ("# ctlib GPU check", "## Training loop per model", "## Data", "## Two-process NCCL",
                    "## Time per section"):
        assert heading in md
