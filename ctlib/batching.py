"""The paper's global batch of 8 on any number of processes: micro-batches and gradient accumulation.

An optimisation step takes ``batch_size`` volumes (the paper's 8) whatever the number of processes ``W``.
Each process runs ``accumulation`` micro-steps of at most ``per_rank`` volumes; the step's volumes are dealt
out as evenly as possible over the ``W x accumulation`` slots (3 GPUs: 3, 3 and 2 volumes; 5 GPUs: 2, 2, 2,
1, 1), so every process runs the same number of micro-steps and the same number of optimisation steps per
epoch (``ceil(N / batch_size)``, as on one process). Each volume carries a loss weight, ``1 / n`` for the
``n`` volumes of its step: a process's loss is ``W * sum(weight * per-volume loss)``, so that after DDP's
mean over processes the gradient is exactly the mean over the step's volumes. A slot left empty (the last,
short step of an epoch on many processes) holds one volume of that step with weight 0: every process then
takes part in every micro-step (DDP needs it) and the gradient is unchanged.

On one process with ``per_rank >= batch_size`` the order and the batches are those of
``DistributedSampler(shuffle=True, seed)`` with ``batch_size`` volumes a batch, as before.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["BatchPlan", "GlobalBatchSampler", "Weighted", "plan_batches"]


@dataclass(frozen=True)
class BatchPlan:
    """How one optimisation step of ``global_batch`` volumes is spread over ``world`` processes."""

    global_batch: int
    world: int
    per_rank: int  # most volumes a process takes in one micro-step
    accumulation: int  # micro-steps per optimisation step

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = {self.world} process(es) x {self.accumulation} micro-step(s) "
                f"x up to {self.per_rank} volume(s)")

    def to_dict(self) -> dict[str, int]:
        return {"effective_batch": self.global_batch, "world_size": self.world, "per_rank_batch": self.per_rank,
                "accumulation_steps": self.accumulation}


def plan_batches(global_batch: int, world: int, per_gpu_batch: int | None = None) -> BatchPlan:
    """The micro-batch and accumulation for ``global_batch`` on ``world`` processes.

    ``per_gpu_batch``: the most volumes one process may take at once (memory); None: ``ceil(global / world)``,
    one micro-step per optimisation step.

    Raises:
        ValueError: fewer volumes than processes (a process would have nothing to train on), or bad sizes.
    """
    if global_batch < 1 or world < 1:
        raise ValueError(f"batch_size and the number of processes must be >= 1, got {global_batch}, {world}")
    if per_gpu_batch is not None and per_gpu_batch < 1:
        raise ValueError(f"per_gpu_batch must be None or >= 1, got {per_gpu_batch}")
    if world > global_batch:
        raise ValueError(
            f"batch_size {global_batch} is smaller than the {world} processes: each process needs at least one "
            f"volume a step. Use at most {global_batch} processes, or --set batch_size={world} (and scale lr)")
    per_rank = math.ceil(global_batch / world)
    if per_gpu_batch is not None:
        per_rank = min(per_rank, per_gpu_batch)
    accumulation = math.ceil(global_batch / (world * per_rank))
    # the smallest micro-batch that still fills the slots: 8 on 3 GPUs at most 2 each -> 2 micro-steps of <= 2
    per_rank = math.ceil(global_batch / (world * accumulation))
    return BatchPlan(global_batch, world, per_rank, accumulation)


def deal(step: list[int], plan: BatchPlan, *, fixed_size: bool = False) -> list[list[list[tuple[int, float]]]]:
    """One step's dataset indices dealt into ``[rank][micro-step]`` lists of ``(index, weight)``.

    Slots are filled in rank-major order of near-equal sizes (``np.array_split``); an empty slot gets the
    step's first volume with weight 0. ``fixed_size``: every slot is filled up to ``plan.per_rank`` with
    weight-0 repeats, so that every micro-batch has one shape (``torch.compile`` then compiles once; the
    repeats change the batch-norm statistics of their micro-batch, not the gradient's weighting).
    """
    slots = plan.world * plan.accumulation
    w = 1.0 / len(step)
    parts = np.array_split(np.asarray(step, dtype=np.int64), slots)
    dealt = [[(int(i), w) for i in part] or [(int(step[0]), 0.0)] for part in parts]
    if fixed_size:
        dealt = [d + [(d[0][0], 0.0)] * (plan.per_rank - len(d)) for d in dealt]
    # slot s -> (rank s % world, micro-step s // world): every rank's micro-steps are as full as can be
    return [[dealt[j * plan.world + r] for j in range(plan.accumulation)] for r in range(plan.world)]


class GlobalBatchSampler(Sampler[list[tuple[int, float]]]):
    """This rank's micro-batches of ``(index, weight)``: ``steps x accumulation`` lists per epoch.

    The epoch's order is ``torch.randperm(n)`` seeded by ``seed + epoch`` (:meth:`set_epoch`), the same on every
    rank, cut into steps of ``plan.global_batch`` (the last may be shorter), each dealt by :func:`deal`
    (``fixed_size``: every micro-batch ``plan.per_rank`` long).
    """

    def __init__(self, n: int, plan: BatchPlan, rank: int, *, shuffle: bool = True, seed: int = 0,
                 max_steps: int | None = None, fixed_size: bool = False) -> None:
        if n < 1:
            raise ValueError("the dataset is empty")
        if not 0 <= rank < plan.world:
            raise ValueError(f"rank {rank} outside [0, {plan.world})")
        self.n, self.plan, self.rank, self.shuffle, self.seed = n, plan, rank, shuffle, seed
        self.max_steps, self.fixed_size = max_steps, fixed_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def steps(self) -> int:
        """Optimisation steps per epoch: ``ceil(n / global_batch)`` (capped by ``max_steps``)."""
        full = math.ceil(self.n / self.plan.global_batch)
        return full if self.max_steps is None else min(full, self.max_steps)

    def __len__(self) -> int:
        return self.steps * self.plan.accumulation

    def __iter__(self) -> Iterator[list[tuple[int, float]]]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)  # DistributedSampler's permutation
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        b = self.plan.global_batch
        for s in range(self.steps):
            yield from deal(order[s * b:(s + 1) * b], self.plan, fixed_size=self.fixed_size)[self.rank]


class Weighted(Dataset):
    """``dataset`` read by ``(index, weight)`` keys: item ``(i, w)`` -> ``(*dataset[i], w)``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, float]) -> tuple[Any, ...]:
        i, w = key
        return (*self.dataset[i], torch.tensor(w, dtype=torch.float32))
