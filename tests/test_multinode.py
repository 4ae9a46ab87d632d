"""Beyond one machine: the launcher prefix, the multi-node checks, two torchrun "nodes" on localhost, and
sharded preparation."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

from ctlib import distributed as D
from ctlib.distributed import NotShared, check_same_start, check_shared_folders
from ctlib.launch import torchrun_command
from ctlib.prepare import cache_root_for, parse_shard, preprocessings, shard_of, shard_rows
from ctlib.prepare import main as prepare_main
from ctlib.profiles import get_profile

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# launcher
# ------------------------------------------------------------------------------------------------
def test_launcher_prefix_replaces_torchrun_standalone_and_keeps_the_train_arguments():
    plain = torchrun_command(profile="paper", model="fusion", alpha=0.5, out="runs/x", processes=8)
    assert plain[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8"]
    prefix = ('srun torchrun --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d '
              '--rdzv-endpoint "$HEAD:29500" --rdzv-id job1')
    cmd = torchrun_command(profile="paper", model="fusion", alpha=0.5, out="runs/x", processes=8, launcher=prefix)
    assert cmd[:11] == ["srun", "torchrun", "--nnodes", "4", "--nproc_per_node", "8", "--rdzv-backend", "c10d",
                        "--rdzv-endpoint", "$HEAD:29500", "--rdzv-id"]
    assert cmd[12:] == plain[5:]  # `-m ctlib.train ...` unchanged
    assert torchrun_command(profile="paper", model="vit3d", out="o", processes=2, launcher="  ") == \
        torchrun_command(profile="paper", model="vit3d", out="o", processes=2)


# ------------------------------------------------------------------------------------------------
# the checks, in two real gloo processes
# ------------------------------------------------------------------------------------------------
def _check_worker(rank: int, port: int, folders: list[list[str]], epochs: list[int], out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    D.setup(backend="gloo", timeout=datetime.timedelta(seconds=60))
    result: dict[str, str | None] = {}
    try:
        for name, call in (("folders", lambda: check_shared_folders(folders[rank])),
                           ("epoch", lambda: check_same_start(epochs[rank], "run/checkpoints/last.pt"))):
            try:
                call()
                result[name] = None
            except NotShared as err:
                result[name] = str(err)
    finally:
        D.teardown()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def _run_checks(tmp_path: Path, folders: list[list[str]], epochs: list[int]) -> list[dict]:
    mp.spawn(_check_worker, args=(_free_port(), folders, epochs, str(tmp_path)), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_checks_pass_on_a_shared_folder_and_leave_nothing(tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    res = _run_checks(tmp_path, [[str(run), str(cache)]] * 2, [3, 3])
    assert res == [{"folders": None, "epoch": None}] * 2
    assert list(run.iterdir()) == [] and list(cache.iterdir()) == []  # the token files are removed


@pytest.mark.slow
def test_a_rank_that_does_not_see_the_run_folder_or_its_checkpoint_stops_every_rank(tmp_path):
    """Rank 1 is given another run folder (what a node-local disk looks like) and another last.pt epoch."""
    shared, local = tmp_path / "shared", tmp_path / "node1-local"
    cache = tmp_path / "cache"
    res = _run_checks(tmp_path, [[str(shared), str(cache)], [str(local), str(cache)]], [2, 0])
    host = socket.gethostname()
    for r in res:  # every rank stops, with the same message
        assert "filesystem that every node sees" in r["folders"]
        assert f"rank 1 on host {host} cannot see {local}" in r["folders"]
        assert str(cache) not in r["folders"] and "rank 0" not in r["folders"].split(":", 1)[1]
        assert "different epochs" in r["epoch"] and "rank 0 on" in r["epoch"] and "epoch 2" in r["epoch"]
        assert "epoch 0" in r["epoch"]


# ------------------------------------------------------------------------------------------------
# two torchrun "nodes" on localhost == one node with two processes
# ------------------------------------------------------------------------------------------------
TRAIN_ARGS = ["-m", "ctlib.train", "--profile", "smoke", "--model", "fusion", "--no-progress",
              "--set", "epochs=2", "--set", "max_steps_per_epoch=2", "--set", "batch_size=4"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.mark.slow
def test_two_nodes_train_the_same_run_as_one_node(smoke_work_dir, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    common = [*TRAIN_ARGS, "--work-dir", str(smoke_work_dir)]
    one = tmp_path / "one-node"
    res = subprocess.run([*torchrun, "--standalone", "--nproc_per_node=2", *common, "--out", str(one)],
                         capture_output=True, text=True, env=_env(), timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    two = tmp_path / "two-nodes"
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [subprocess.Popen([*torchrun, "--nnodes=2", f"--node-rank={k}", "--nproc_per_node=1",
                               "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=test",
                               *common, "--out", str(two)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
             for k in (0, 1)]
    logs = [p.communicate(timeout=400)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "on 2 process(es)" in logs[0] + logs[1]

    for name in ("last.pt", "best.pt"):
        a, b = _state(one / "checkpoints" / name), _state(two / "checkpoints" / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert ma.keys() == mb.keys()
    for key in ma:
        if "second" in key:
            continue
        if isinstance(ma[key], float):
            assert ma[key] == pytest.approx(mb[key], rel=1e-5, abs=1e-6), key
        else:
            assert ma[key] == mb[key], key
    pa, pb = (pd.read_csv(d / "predictions.csv") for d in (one, two))
    assert list(pa["VolumeName"]) == list(pb["VolumeName"]) and len(pa) > 0
    np.testing.assert_allclose(pa.filter(like="prob:").to_numpy(), pb.filter(like="prob:").to_numpy(),
                               rtol=1e-5, atol=1e-6)
    ha, hb = (pd.read_csv(d / "history.csv").drop(columns="seconds") for d in (one, two))
    pd.testing.assert_frame_equal(ha, hb, rtol=1e-5, atol=1e-6)
    # the run really trained (not two untouched models compared): two epochs of 2 AdamW steps
    steps = torch.load(two / "checkpoints/last.pt", weights_only=True)["optimizer"]["state"][0]["step"]
    assert int(steps) == 4


# ------------------------------------------------------------------------------------------------
# sharded preparation
# ------------------------------------------------------------------------------------------------
def test_shard_assignment_is_disjoint_covering_and_parsed_strictly():
    names = [f"train_{p}_{s}_{r}.nii.gz" for p in range(200) for s in "ab" for r in (1, 2)]
    cohort = pd.DataFrame({"VolumeName": names})
    for n in (1, 3, 7):
        parts = [set(shard_rows(cohort, k, n)["VolumeName"]) for k in range(n)]
        assert sum(len(p) for p in parts) == len(names) and set().union(*parts) == set(names)
        if n > 1:
            assert min(len(p) for p in parts) > len(names) / n / 2  # roughly balanced
    # a volume's shard depends on its name only (not on the rest of the cohort or its order)
    assert shard_of(names[5], 7) == shard_of(names[5], 7)
    assert set(shard_rows(cohort.iloc[::-1], 2, 7)["VolumeName"]) == set(shard_rows(cohort, 2, 7)["VolumeName"])
    assert parse_shard("0/4") == (0, 4) and parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "-1/4", "1", "a/b", "1/0"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_union_of_shards_equals_an_unsharded_preparation_byte_for_byte(smoke_work_dir, tmp_path, capsys):
    data_root = next((smoke_work_dir / "synthetic").iterdir())
    args = ["--profile", "smoke", "--data-root", str(data_root), "--workers", "1", "--no-progress"]
    plain_work, shard_work = tmp_path / "plain", tmp_path / "sharded"
    assert prepare_main([*args, "--work-dir", str(plain_work)]) == 0
    capsys.readouterr()
    n = 3
    for k in range(n):
        assert prepare_main([*args, "--work-dir", str(shard_work), "--shard", f"{k}/{n}"]) == 0
    out = capsys.readouterr().out
    prof = get_profile("smoke", data_root=str(data_root), work_dir=str(shard_work))
    croot = cache_root_for(prof)
    # the shards wrote no ready marker and no shared failures.csv: training would not start yet
    assert not list(croot.rglob("ready-*.json")) and not list(croot.rglob("failures.csv"))
    assert len(list(croot.rglob("failures-shard-*-of-3.csv"))) == 3 * len(preprocessings(prof))  # per shard
    shard_lines = [line.split() for line in out.splitlines() if line.startswith("shard ")]
    n_cohort = int(shard_lines[0][4])
    assert len(shard_lines) == n and sum(int(w[2]) for w in shard_lines) == n_cohort > 0  # disjoint, covering

    assert prepare_main([*args, "--work-dir", str(shard_work)]) == 0  # the plain run after all shards...
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("total: 0 prepared,") and " 0 failed" in last  # ...finds nothing to do
    for p in croot.rglob("failures-shard-*"):
        p.unlink()
    a, b = _files(cache_root_for(prof, data_root).parent), _files(plain_work / "cache")
    assert a.keys() == b.keys() and len([k for k in a if k.endswith(".npy")]) > 0
    for key in a:
        assert a[key] == b[key], key
    shutil.rmtree(plain_work)
