"""Distributed helpers: single-process identities and a real 2-process gloo run."""

from __future__ import annotations

import datetime
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
