"""Launching runs: table rows -> run folders, how many runs train side by side, running named commands
concurrently, and which commands ``train_runs`` issues."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import ctlib.launch as launch
from ctlib.launch import concurrent_runs, run_concurrently, run_streaming, train_run, train_runs
from ctlib.runs import LEARNED_2D, paper_outputs, run_name, table_run

# ---------------------------------------------------------------------------------------------
# table rows -> runs
# ---------------------------------------------------------------------------------------------


def test_table_run_maps_fixed_alpha_zero_to_the_resnet(tmp_path):
    assert table_run("fusion", 0.0) == ("resnet2d", None)
    assert table_run("fusion", 0) == ("resnet2d", None)
    assert table_run("fusion", -0.0) == ("resnet2d", None)
    # every other row is itself
    for alpha in (0.1, 0.5, 1.0, None, "learned", LEARNED_2D):
        assert table_run("fusion", alpha) == ("fusion", alpha)
    assert table_run("resnet2d", None) == ("resnet2d", None)
    assert table_run("vit3d", 0.0) == ("vit3d", 0.0)  # alpha means nothing to the ViT
    out = paper_outputs("smoke", work_dir=tmp_path / "w", runs_dir=tmp_path / "runs",
                        figures_dir=tmp_path / "f", results_dir=tmp_path / "r")
    assert out.run_dir("fusion", 0.0) == out.run_dir("resnet2d") == (tmp_path / "runs" / "smoke" / "resnet2d")
    assert out.run_dir("fusion", 0.5).name == "fusion-alpha0.5"
    assert out.run_dir("fusion", "learned").name == "fusion-learned"
    assert out.run_dir("fusion", LEARNED_2D).name == "fusion-learned-2d"
    assert out.run_dir("fusion", None).name == out.run_dir("fusion", 1.0).name == "fusion-alpha1"
    # run_name itself still names the fusion's own folder (the table mapping lives in table_run/run_dir)
    assert run_name("fusion", 0.0) == "fusion-alpha0"


# ---------------------------------------------------------------------------------------------
# how many runs at once
# ---------------------------------------------------------------------------------------------


def test_concurrent_runs_decisions(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # CPU only: min(pending, cpus, 4) runs, cpus // at_once threads each
    assert concurrent_runs(3, cpus=2) == (2, 1)
    assert concurrent_runs(2, cpus=16) == (2, 8)
    assert concurrent_runs(6, cpus=16) == (4, 4)
    assert concurrent_runs(3, cpus=3) == (3, 1)
    assert concurrent_runs(5, cpus=10) == (4, 2)
    assert concurrent_runs(5, cpus=2, processes=1, launcher="  ") == (2, 1)  # blank launcher = none
    # one at a time, with the default threads
    assert concurrent_runs(1, cpus=16) == (1, None)
    assert concurrent_runs(0, cpus=16) == (1, None)
    assert concurrent_runs(4, cpus=1) == (1, None)
    assert concurrent_runs(4, cpus=16, processes=2) == (1, None)
    assert concurrent_runs(4, cpus=16, launcher="srun torchrun --nnodes 2") == (1, None)
    # cpus from the process's affinity by default
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    assert concurrent_runs(2) == (2, 3)
    assert concurrent_runs(9) == (4, 1)
    # GPUs: every run takes the whole node
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert concurrent_runs(3, cpus=16) == (1, None)
    assert concurrent_runs(3, cpus=16, processes=1) == (1, None)


# ---------------------------------------------------------------------------------------------
# running named commands side by side
# ---------------------------------------------------------------------------------------------

_CHILD = """
import os, sys, time
marks = sys.argv[1]
start = time.time()
print("threads", os.environ.get("OMP_NUM_THREADS"), os.environ.get("MKL_NUM_THREADS"), flush=True)
time.sleep(float(sys.argv[2]))
code = int(sys.argv[3])
if code == 0:
    open(marks, "w").write(f"{start} {time.time()}")
print("done", flush=True)
sys.exit(code)
"""


def _child(tmp_path, name: str, sleep: float = 1.0, code: int = 0) -> list[str]:
    """A command that prints its thread settings, sleeps ``sleep`` s, and on success writes its start and end
    times to ``<name>.mark``; exits with ``code``."""
    script = tmp_path / "child.py"
    if not script.exists():
        script.write_text(_CHILD)
    return [sys.executable, str(script), str(tmp_path / f"{name}.mark"), str(sleep), str(code)]


def _spans(tmp_path, names) -> dict[str, tuple[float, float]]:
    spans = {}
    for name in names:
        start, end = map(float, (tmp_path / f"{name}.mark").read_text().split())
        spans[name] = (start, end)
    return spans


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_run_concurrently_two_at_a_time_overlap_with_prefixes_and_threads(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # replaced by the runs' share
    names = ["a", "b", "c"]
    run_concurrently({n: _child(tmp_path, n) for n in names}, at_once=2, threads=1)
    spans = _spans(tmp_path, names)
    pairs = [(x, y) for i, x in enumerate(names) for y in names[i + 1:]]
    overlapping = [p for p in pairs if _overlap(spans[p[0]], spans[p[1]])]
    assert ("a", "b") in overlapping  # the first two start together
    # never three at once: c starts only after a or b has ended
    assert spans["c"][0] >= min(spans["a"][1], spans["b"][1])
    lines = capsys.readouterr().out.splitlines()
    for n in names:
        assert f"[{n}] threads 1 1" in lines
        assert f"[{n}] done" in lines
        assert any(line.startswith(f"[{n}] $ ") for line in lines)
    assert all(line.startswith(("[a] ", "[b] ", "[c] ")) for line in lines)


def test_run_concurrently_one_at_a_time_never_overlaps(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    names = ["x", "y", "z"]
    run_concurrently({n: _child(tmp_path, n, sleep=0.4) for n in names}, at_once=1)
    spans = _spans(tmp_path, names)
    assert spans["x"][1] <= spans["y"][0] and spans["y"][1] <= spans["z"][0]
    out = capsys.readouterr().out
    # threads=None: the environment's OMP_NUM_THREADS reaches the child unchanged, MKL is not set
    assert "[x] threads 5 None" in out.splitlines()


def test_run_concurrently_a_failure_lets_the_others_finish_then_raises(tmp_path, capsys):
    commands = {"ok1": _child(tmp_path, "ok1", sleep=0.5), "bad": _child(tmp_path, "bad", sleep=0.1, code=3),
                "ok2": _child(tmp_path, "ok2", sleep=0.5), "bad2": _child(tmp_path, "bad2", sleep=0.8, code=4)}
    with pytest.raises(subprocess.CalledProcessError) as err:
        run_concurrently(commands, at_once=2, threads=1)
    assert err.value.returncode == 3 and err.value.cmd == commands["bad"]
    assert (tmp_path / "ok1.mark").exists() and (tmp_path / "ok2.mark").exists()
    out = capsys.readouterr().out
    assert "[bad] FAILED with exit code 3" in out and "[bad2] FAILED with exit code 4" in out
    assert "[ok2] done" in out


def test_run_concurrently_a_command_that_cannot_start_is_an_error(tmp_path):
    commands = {"ok": _child(tmp_path, "ok", sleep=0.1), "missing": [str(tmp_path / "no-such-program")]}
    with pytest.raises(FileNotFoundError):
        run_concurrently(commands, at_once=2, threads=1)
    assert (tmp_path / "ok.mark").exists()


def test_run_streaming_sets_threads_and_raises(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    run_streaming(_child(tmp_path, "s", sleep=0), threads=3, prefix="<p> ")
    assert "<p> threads 3 3" in capsys.readouterr().out.splitlines()
    run_streaming(_child(tmp_path, "s", sleep=0))
    assert "threads None None" in capsys.readouterr().out.splitlines()
    with pytest.raises(subprocess.CalledProcessError) as err:
        run_streaming(_child(tmp_path, "f", sleep=0, code=3))
    assert err.value.returncode == 3


# ---------------------------------------------------------------------------------------------
# train_runs: which commands, how they are run
# ---------------------------------------------------------------------------------------------


class _Fake:
    """Stands in for data preparation, completeness checks and the subprocesses."""

    def __init__(self, monkeypatch, complete=(), eval_only=()):
        self.complete = set(complete)
        self.eval_only = set(eval_only)  # complete runs finished with --score eval
        self.specs: dict[str, object] = {}
        self.streamed: list[tuple[list[str], dict]] = []
        self.concurrent: list[tuple[dict[str, list[str]], dict]] = []
        monkeypatch.setattr(launch, "prepare_profile",
                            lambda prof: SimpleNamespace(key="KEY", summary=lambda: "prepared"))

        def run_is_complete(run_dir, spec, key):
            assert key == "KEY"
            self.specs[run_dir.name] = spec
            return run_dir.name in self.complete

        monkeypatch.setattr(launch, "run_is_complete", run_is_complete)
        monkeypatch.setattr(launch, "scored_every_volume", lambda run_dir: run_dir.name not in self.eval_only)
        monkeypatch.setattr(launch, "run_streaming", lambda cmd, **kw: self.streamed.append((list(cmd), kw)))
        monkeypatch.setattr(launch, "run_concurrently",
                            lambda cmds, **kw: self.concurrent.append(({k: list(v) for k, v in cmds.items()}, kw)))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _outputs(tmp_path):
    return paper_outputs("smoke", work_dir=tmp_path / "w", runs_dir=tmp_path / "runs",
                         figures_dir=tmp_path / "f", results_dir=tmp_path / "r")


def _arg(cmd: list[str], flag: str) -> str | None:
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


def test_train_runs_maps_dedups_skips_and_scores_eval(tmp_path, monkeypatch):
    fake = _Fake(monkeypatch, complete={"vit3d"})
    out = _outputs(tmp_path)
    runs = [("fusion", 0.0), ("resnet2d", None), ("fusion", 0.5), ("fusion", "learned"), ("fusion", 0.5),
            ("fusion", LEARNED_2D), ("vit3d", None)]
    dirs = train_runs(out, runs, at_once=2, every_volume=["fusion-learned"])
    assert [d.name for d in dirs] == ["resnet2d", "resnet2d", "fusion-alpha0.5", "fusion-learned",
                                      "fusion-alpha0.5", "fusion-learned-2d", "vit3d"]
    assert all(d.parent == out.runs for d in dirs)
    assert fake.streamed == [] and len(fake.concurrent) == 1
    commands, kw = fake.concurrent[0]
    # the alpha = 0 row is the ResNet run, trained once; the complete ViT run is not trained again
    assert list(commands) == ["resnet2d", "fusion-alpha0.5", "fusion-learned", "fusion-learned-2d"]
    assert kw["at_once"] == 2 and kw["threads"] == max(1, launch._usable_cpus() // 2)
    res = commands["resnet2d"]
    assert _arg(res, "--model") == "resnet2d" and "--alpha" not in res
    assert _arg(res, "--out") == str(out.runs / "resnet2d")
    assert _arg(commands["fusion-alpha0.5"], "--alpha") == "0.5"
    assert _arg(commands["fusion-learned-2d"], "--alpha") == "learned"
    assert _arg(commands["fusion-learned-2d"], "--set") == "learn_2d_weight=true"
    for name, cmd in commands.items():
        assert (_arg(cmd, "--score") == "eval") == (name != "fusion-learned"), name
        assert cmd.count("--score") == (name != "fusion-learned")
        assert _arg(cmd, "--profile") == "smoke" and _arg(cmd, "--seed") == "0" and "--redo" not in cmd
    # completeness is judged on the settings the workers build (learned-2d: the learned 2D weight)
    assert fake.specs["resnet2d"].model == "resnet2d"
    assert fake.specs["fusion-learned-2d"].alpha == "learned"
    assert fake.specs["fusion-learned-2d"].profile.learn_2d_weight
    assert not fake.specs["fusion-learned"].profile.learn_2d_weight
    assert fake.specs["fusion-alpha0.5"].alpha == 0.5


def test_train_runs_one_at_a_time_and_every_volume_flags(tmp_path, monkeypatch):
    fake = _Fake(monkeypatch, complete={"resnet2d"})
    out = _outputs(tmp_path)
    # at_once=1: one after another, torch's default threads
    train_runs(out, [("fusion", 0.3), ("fusion", 0.0), ("vit3d", None)], at_once=1, every_volume=False)
    assert fake.concurrent == []
    assert [_arg(c, "--out") for c, _ in fake.streamed] == [str(out.runs / "fusion-alpha0.3"),
                                                           str(out.runs / "vit3d")]
    assert all(_arg(c, "--score") == "eval" and kw.get("threads") is None for c, kw in fake.streamed)
    # GPUs (at_once None): one after another too
    fake.streamed.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    train_runs(out, [("fusion", 0.3), ("vit3d", None)], processes=1)
    assert fake.concurrent == [] and len(fake.streamed) == 2
    assert all("--score" not in c for c, _ in fake.streamed)  # every_volume=True by default
    # a single run, every volume or not; redo trains a complete run again
    fake.streamed.clear()
    assert train_run(out, "fusion", 0.0, every_volume=False, redo=True) == out.runs / "resnet2d"
    (cmd, _), = fake.streamed
    assert _arg(cmd, "--model") == "resnet2d" and _arg(cmd, "--score") == "eval" and "--redo" in cmd
    fake.streamed.clear()
    assert train_run(out, "fusion", 0.0) == out.runs / "resnet2d"  # complete: reused
    assert fake.streamed == []
    train_run(out, "fusion", "learned")
    (cmd, _), = fake.streamed
    assert "--score" not in cmd
    # a run name given as a plain string is one name, not a set of characters to match
    fake.streamed.clear()
    train_runs(out, [("fusion", "learned"), ("fusion", LEARNED_2D)], at_once=1, every_volume="fusion-learned-2d")
    flags = {_arg(c, "--out"): _arg(c, "--score") for c, _ in fake.streamed}
    assert flags == {str(out.runs / "fusion-learned"): "eval", str(out.runs / "fusion-learned-2d"): None}


def test_train_runs_cpu_default_runs_side_by_side(tmp_path, monkeypatch):
    fake = _Fake(monkeypatch)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    train_runs(_outputs(tmp_path), [("fusion", 0.1), ("fusion", 0.3), ("fusion", 0.5)], every_volume=False)
    (commands, kw), = fake.concurrent
    assert list(commands) == ["fusion-alpha0.1", "fusion-alpha0.3", "fusion-alpha0.5"]
    assert kw == {"at_once": 2, "threads": 1}



def test_train_runs_rescores_an_eval_only_run_where_every_volume_is_wanted(tmp_path, monkeypatch):
    fake = _Fake(monkeypatch, complete={"fusion-learned", "fusion-alpha0.5"},
                 eval_only={"fusion-learned", "fusion-alpha0.5"})
    out = _outputs(tmp_path)
    train_runs(out, [("fusion", "learned"), ("fusion", 0.5)], at_once=1, every_volume=["fusion-learned"])
    # the learned run's command scores every volume (train() then only evaluates its best checkpoint, see
    # tests/test_train.py); the alpha = 0.5 run, which needs validation and test only, is reused
    (cmd, _), = fake.streamed
    assert _arg(cmd, "--out") == str(out.runs / "fusion-learned")
    assert "--score" not in cmd and "--redo" not in cmd
