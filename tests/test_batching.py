"""ctlib.batching: the global batch of 8 over any number of processes, with exact gradients."""

from __future__ import annotations

import pytest
import torch

from ctlib.batching import GlobalBatchSampler, deal, plan_batches


@pytest.mark.parametrize("world", range(1, 9))
def test_every_rank_runs_the_same_micro_steps_and_each_volume_once(world):
    n = 23
    plan = plan_batches(8, world)
    samplers = [GlobalBatchSampler(n, plan, r, seed=3) for r in range(world)]
    for s in samplers:
        s.set_epoch(2)
    per_rank = [list(s) for s in samplers]
    assert {len(p) for p in per_rank} == {3 * plan.accumulation}  # ceil(23 / 8) steps on every rank
    assert all(1 <= len(mb) <= plan.per_rank for p in per_rank for mb in p)
    for step in range(3):
        slots = [mb for p in per_rank for mb in p[step * plan.accumulation:(step + 1) * plan.accumulation]]
        real = [i for mb in slots for i, w in mb if w > 0]
        assert len(real) == (8 if step < 2 else 7) and len(set(real)) == len(real)
        assert sum(w for mb in slots for _, w in mb) == pytest.approx(1.0)
    seen = sorted(i for p in per_rank for mb in p for i, w in mb if w > 0)
    assert seen == list(range(n))


def test_one_process_reproduces_distributed_samplers_batches():
    from torch.utils.data import DistributedSampler

    n = 21
    ds = DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=5)
    ds.set_epoch(1)
    order = list(ds)
    ours = GlobalBatchSampler(n, plan_batches(8, 1), 0, seed=5)
    ours.set_epoch(1)
    assert [[i for i, _ in mb] for mb in ours] == [order[0:8], order[8:16], order[16:21]]


def test_plans():
    assert plan_batches(8, 3).per_rank == 3 and plan_batches(8, 3).accumulation == 1
    p = plan_batches(8, 1, per_gpu_batch=3)
    assert (p.per_rank, p.accumulation) == (3, 3)
    p = plan_batches(8, 3, per_gpu_batch=2)
    assert (p.per_rank, p.accumulation) == (2, 2)
    assert plan_batches(8, 8).per_rank == 1
    with pytest.raises(ValueError, match="smaller than the 16 processes"):
        plan_batches(8, 16)
    assert [[len(m) for m in r] for r in deal([7], plan_batches(8, 2))] == [[1], [1]]
    assert [[w for _, w in m] for r in deal([7], plan_batches(8, 2)) for m in r] == [[1.0], [0.0]]


def test_weighted_losses_over_ranks_give_the_mean_gradient_over_the_step():
    """W x sum(weight * loss) per rank, averaged over ranks (DDP), equals the mean loss over the step's volumes."""
    torch.manual_seed(0)
    losses = torch.rand(8)
    for world, per_gpu in ((1, None), (3, None), (3, 2), (5, None), (1, 3)):
        plan = plan_batches(8, world, per_gpu)
        ranks = deal(list(range(8)), plan)
        per_rank = [world * sum(w * losses[i] for mb in r for i, w in mb) for r in ranks]
        assert float(sum(per_rank) / world) == pytest.approx(float(losses.mean()))
    short = deal([0, 1, 2], plan_batches(8, 5))  # the last short step: padding slots with weight 0
    assert float(sum(5 * sum(w * losses[i] for mb in r for i, w in mb) for r in short) / 5) == pytest.approx(
        float(losses[:3].mean()))


def test_fixed_size_pads_every_micro_batch_with_weight_zero_repeats():
    plan = plan_batches(8, 3)
    for r in range(3):
        batches = list(GlobalBatchSampler(21, plan, r, seed=1, fixed_size=True))
        assert {len(mb) for mb in batches} == {3}
    step = deal([4, 5], plan, fixed_size=True)
    assert step == [[[(4, 0.5), (4, 0.0), (4, 0.0)]], [[(5, 0.5), (5, 0.0), (5, 0.0)]], [[(4, 0.0)] * 3]]
