"""Small DistributedDataParallel helpers for the torchrun training entry point (paper section 4.6).

``setup`` reads the variables ``torchrun`` sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and initialises the process group only when WORLD_SIZE > 1; without them every helper
is the single-process identity, so the same training code runs under ``python -m`` and ``torchrun``.

AUROC cannot be averaged over ranks, so predictions are gathered instead: ``all_gather_variable``
pads each rank's rows to the longest, gathers, and strips the padding; ``gather_predictions`` then
keeps each dataset index once (``DistributedSampler`` pads the last round by repeating samples) so
that every test volume is scored exactly once.
"""

from __future__ import annotations

import datetime
import inspect
import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_variable",
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "env_rank",
    "env_world_size",
    "gather_predictions",
    "is_distributed",
    "is_main",
    "rank",
    "setup",
    "teardown",
    "world_size",
]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as err:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from err


def setup(
    backend: str | None = None, *, timeout: datetime.timedelta | None = None
) -> tuple[int, int, torch.device]:
    """Join the torchrun process group if there is one; pick this process's device.

    Args:
        backend: process-group backend; default NCCL when CUDA is available, else gloo.
        timeout: process-group timeout (torch's default when None).

    Returns:
        (rank, world_size, device). Without torchrun variables: (0, 1, cuda:0 or cpu). The device is
        ``cuda:LOCAL_RANK`` (and made current) when CUDA is available and the backend is not gloo,
        else cpu.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    if local_rank < 0:
        raise ValueError(f"LOCAL_RANK must be >= 0, got {local_rank}")

    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if cuda and backend != "gloo":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    if world_size > 1 and not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://"}
        if timeout is not None:
            kwargs["timeout"] = timeout
        if device.type == "cuda" and "device_id" in inspect.signature(dist.init_process_group).parameters:
            kwargs["device_id"] = device  # binds NCCL to this GPU up front (torch >= 2.3)
        dist.init_process_group(rank=rank, world_size=world_size, **kwargs)
    return rank, world_size, device


def teardown() -> None:
    """Leave the process group (no-op when not distributed)."""
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the process group (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes in the process group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def env_rank() -> int:
    """The rank torchrun assigned (RANK), readable before :func:`setup`; 0 without torchrun."""
    return _env_int("RANK", 0)


def env_world_size() -> int:
    """The number of processes torchrun started (WORLD_SIZE), readable before :func:`setup`; 1 without."""
    return _env_int("WORLD_SIZE", 1)


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that prints and saves checkpoints."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def _comm_device() -> torch.device:
    """Device that collectives of the current backend accept (NCCL: this rank's GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(value: float) -> float:
    """Mean of a Python number over ranks (the value itself when not distributed)."""
    if not is_distributed():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / dist.get_world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` itself when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def all_gather_variable(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows, in rank order, when ranks hold different numbers of rows.

    Lengths are gathered first, each rank pads to the longest along dim 0, ``all_gather`` runs on
    the padded tensors, and the padding is stripped.

    Args:
        tensor: (n_i, ...) on this rank; trailing shape and dtype equal on all ranks.

    Returns:
        (sum of n_i, ...) on the input's device; the input itself when not distributed.
    """
    if not is_distributed():
        return tensor
    if tensor.ndim == 0:
        raise ValueError("all_gather_variable needs a tensor with a leading row dimension, got a scalar")
    world = dist.get_world_size()
    comm = _comm_device()
    local = tensor.to(comm).contiguous()
    n = torch.tensor([local.shape[0]], dtype=torch.int64, device=comm)
    lengths = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(lengths, n)
    sizes = [int(x.item()) for x in lengths]
    longest = max(sizes)
    if longest == 0:
        return tensor.new_empty((0, *tensor.shape[1:]))
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]).to(tensor.device)


def gather_predictions(
    indices: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's predictions on every rank, each dataset index once, sorted by index.

    ``DistributedSampler`` pads the last round by repeating samples, so some volumes are predicted
    twice; the first copy in rank order is kept (the model is the same on all ranks).

    Args:
        indices: (n,) int64 dataset indices of this rank's predictions.
        probs: (n, C) probabilities.
        labels: (n, C) labels.

    Returns:
        (indices (M,), probs (M, C), labels (M, C)) with M distinct indices in increasing order.
    """
    if indices.ndim != 1:
        raise ValueError(f"indices must be 1-D (n,), got shape {tuple(indices.shape)}")
    n = indices.shape[0]
    if probs.shape[0] != n or labels.shape[0] != n:
        raise ValueError(
            f"indices, probs and labels must have the same rows, got {n}, {probs.shape[0]}, {labels.shape[0]}"
        )
    all_idx = all_gather_variable(indices.long())
    all_probs = all_gather_variable(probs)
    all_labels = all_gather_variable(labels)
    sorted_idx, order = torch.sort(all_idx, stable=True)
    keep = torch.ones_like(sorted_idx, dtype=torch.bool)
    keep[1:] = sorted_idx[1:] != sorted_idx[:-1]  # first of each run of equal indices
    rows = order[keep]
    return sorted_idx[keep], all_probs[rows], all_labels[rows]
