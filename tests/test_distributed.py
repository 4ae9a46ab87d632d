"""Distributed helpers: single-process identities and a real 2-process gloo run."""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data.distributed import DistributedSampler

from ctlib import distributed as D

N_ITEMS = 7  # odd: DistributedSampler over 2 ranks repeats one item
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _fake_probs(index: torch.Tensor) -> torch.Tensor:
    """(n,) -> (n, 3) values that identify the index, to check rows travel with their index."""
    return torch.stack([index.double() / 10, index.double() / 100, -index.double()], dim=1)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One torchrun-like process: env vars, setup, collectives, results saved for the parent."""
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    r, w, device = D.setup(backend="gloo", timeout=datetime.timedelta(seconds=60))
    try:
        sampler = DistributedSampler(list(range(N_ITEMS)), num_replicas=w, rank=r, shuffle=True, seed=0)
        local = torch.tensor(list(sampler), dtype=torch.long)
        labels = (local % 2).unsqueeze(1).repeat(1, 3)
        gathered = D.gather_predictions(local, _fake_probs(local), labels)

        # uneven lengths: rank 0 holds 2 rows, rank 1 holds 5
        n = 2 if r == 0 else 5
        uneven = torch.arange(100 * r, 100 * r + n, dtype=torch.float32).unsqueeze(1).repeat(1, 4)
        # a rank with no rows at all, and gather_predictions with uneven lengths (rank 1 drops its pad)
        empty_or_not = torch.ones((0 if r == 0 else 3, 2))
        trimmed = local if r == 0 else local[:-1]
        gathered_trimmed = D.gather_predictions(trimmed, _fake_probs(trimmed), (trimmed % 2).unsqueeze(1))

        D.barrier()
        result = {
            "rank": r,
            "world": w,
            "device": str(device),
            "is_main": D.is_main(),
            "rank_fn": D.rank(),
            "world_fn": D.world_size(),
            "local": local,
            "gathered": gathered,
            "gathered_trimmed": gathered_trimmed,
            "uneven": D.all_gather_variable(uneven),
            "empty_or_not": D.all_gather_variable(empty_or_not),
            "mean": D.all_reduce_mean(float(r + 1) * 3.0),
            "obj": D.broadcast_object({"from": r, "list": [1, 2]} if r == 0 else None),
        }
        torch.save(result, Path(out_dir) / f"rank{r}.pt")
    finally:
        D.teardown()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_gathers_every_item_once(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    assert [x["rank"] for x in res] == [0, 1] and all(x["world"] == 2 for x in res)
    assert [x["rank_fn"] for x in res] == [0, 1] and all(x["world_fn"] == 2 for x in res)
    assert [x["is_main"] for x in res] == [True, False]
    assert all(x["device"] == "cpu" for x in res)  # gloo keeps tensors on the CPU

    # the sampler really padded: 8 predictions for 7 items, one index twice
    both = torch.cat([x["local"] for x in res])
    assert len(both) == 8 and len(set(both.tolist())) == N_ITEMS

    expected = torch.arange(N_ITEMS)
    for x in res:  # identical on every rank, every item exactly once, sorted, rows with their index
        for idx, probs, labels in (x["gathered"], x["gathered_trimmed"]):
            assert torch.equal(idx, expected)
            assert torch.equal(probs, _fake_probs(expected))
            assert torch.equal(labels, (expected % 2).unsqueeze(1).expand(-1, labels.shape[1]))

        # uneven per-rank lengths: rank 0's 2 rows, then rank 1's 5, padding stripped
        assert x["uneven"].shape == (7, 4)
        assert x["uneven"][:, 0].tolist() == [0, 1, 100, 101, 102, 103, 104]
        assert x["empty_or_not"].shape == (3, 2)

        assert x["mean"] == pytest.approx(4.5)  # mean of 3 and 6
        assert x["obj"] == {"from": 0, "list": [1, 2]}


@pytest.fixture
def no_torchrun(monkeypatch):
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)


def test_single_process_paths_are_identities(no_torchrun):
    rank, world, device = D.setup()
    assert (rank, world) == (0, 1)
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert not D.is_distributed() and D.is_main()
    assert D.rank() == 0 and D.world_size() == 1 and D.env_rank() == 0
    D.barrier()  # no-op, no process group needed
    assert D.all_reduce_mean(2.5) == 2.5
    obj = {"a": [1, 2]}
    assert D.broadcast_object(obj) is obj
    t = torch.randn(5, 3)
    assert D.all_gather_variable(t) is t

    # a single process still de-duplicates and sorts by index
    idx = torch.tensor([4, 1, 3, 1])
    probs = _fake_probs(idx)
    labels = torch.tensor([[1], [0], [1], [0]])
    gi, gp, gl = D.gather_predictions(idx, probs, labels)
    assert gi.tolist() == [1, 3, 4]
    assert torch.equal(gp, _fake_probs(torch.tensor([1, 3, 4])))
    assert gl.squeeze(1).tolist() == [0, 1, 1]
    D.teardown()  # no-op


def test_setup_rejects_bad_environment(no_torchrun, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        D.setup()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2"):
        D.setup()
    monkeypatch.setenv("RANK", "3")
    assert D.env_rank() == 3


def test_gather_predictions_checks_shapes():
    with pytest.raises(ValueError, match="1-D"):
        D.gather_predictions(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="same rows"):
        D.gather_predictions(torch.arange(3), torch.zeros(2, 3), torch.zeros(3, 3))


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _rank_pid(torchrun_pid: int, rank: int) -> int | None:
    for pid in _children(torchrun_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"LOCAL_RANK=" + str(rank).encode() in environ:
            return pid
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find a rank's process")
def test_torchrun_rank_sigkilled_mid_epoch_then_restarted(smoke_work_dir, tmp_path):
    """Two gloo processes; rank 1 is SIGKILLed during epoch 2; the same command restarted ends with the
    metrics, history and parameters of an undisturbed run."""
    import signal
    import subprocess
    import sys
    import time

    import pandas as pd

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                f"--master_port={_free_port()}", "-m", "ctlib.train", "--profile", "smoke", "--model", "fusion",
                "--alpha", "learned", "--work-dir", str(smoke_work_dir), "--out", str(out), "--no-progress",
                "--set", "epochs=3"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run(command(tmp_path / "ref"), env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "history.csv").exists():
        time.sleep(0.05)
    time.sleep(1.0)  # into epoch 2
    victim = _rank_pid(proc.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    assert proc.wait(timeout=300) != 0
    assert not (out / "metrics.json").exists()
    epochs_done = len(pd.read_csv(out / "history.csv"))
    assert 1 <= epochs_done < 3

    again = subprocess.run(command(out), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resuming {out} from epoch {epochs_done + 1}" in again.stdout
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "ref", out))
    for key in ("auroc", "accuracy", "precision", "recall", "alpha_final", "best_epoch", "n_test"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    pa, pb = (torch.load(d / "checkpoints/last.pt", map_location="cpu", weights_only=True)["model"]
              for d in (tmp_path / "ref", out))
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-5, atol=1e-6, msg=k)
    ha, hb = (pd.read_csv(d / "history.csv").drop(columns="seconds") for d in (tmp_path / "ref", out))
    pd.testing.assert_frame_equal(ha, hb, rtol=1e-5)
