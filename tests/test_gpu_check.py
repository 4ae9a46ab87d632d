"""benchmarks/gpu_check.sh end to end on the CPU at quick sizes (eager only, to stay short)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_writes_one_report_with_every_section(tmp_path):
    out = tmp_path / "report"
    env = {**os.environ, "CTLIB_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["bash", str(REPO / "benchmarks/gpu_check.sh"), "--device", "cpu", "--quick",
                          "--no-compile", "--workers", "2", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    env_info = report["environment"]
    assert env_info["device"] == "cpu" and env_info["torch"] and env_info["gpu"] is None
    assert [(r["model"], r["mode"]) for r in report["models"]] == [
        ("resnet2d", "eager"), ("vit3d", "eager"), ("fusion", "eager")]
    assert all(r["volumes_per_s"] > 0 and r["peak_mib"] > 0 and r["input"] == [8, 32, 32]
               for r in report["models"])
    run = report["fusion_run"]
    assert "error" not in run, run
    assert run["volumes"] > 0 and run["generate_s"] > 0 and run["prepare_s"] > 0 and run["epoch_s"] > 0
    assert run["total_s"] >= run["train_and_evaluate_s"] > run["epoch_s"]
    assert (out / "fusion-run/run/metrics.json").is_file()  # the real ctlib.train wrote its outputs
    assert report["nccl"].startswith("skipped: 0 GPU")
    assert report["verdict"].startswith("not comparable: cpu")
    md = (out / "report.md").read_text()
    for heading in ("# ctlib GPU check", "## Training step per model", "## Fusion run", "## Two-process NCCL"):
        assert heading in md
    assert "random init" in md and "| fusion | eager |" in md
