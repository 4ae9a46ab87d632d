"""Small DistributedDataParallel helpers for the torchrun training entry point (paper section 4.6).

``setup`` reads the variables ``torchrun`` sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and initialises the process group only when WORLD_SIZE > 1; without them every helper
is the single-process identity, so the same training code runs under ``python -m`` and ``torchrun``.

AUROC cannot be averaged over ranks, so predictions are gathered instead: ``all_gather_variable``
pads each rank's rows to the longest, gathers, and strips the padding; ``gather_predictions`` then
keeps each dataset index once (``DistributedSampler`` pads the last round by repeating samples) so
that every test volume is scored exactly once.

Checks that make a run on several nodes safe: one shared filesystem, one resume epoch. Rank 0 writes every
checkpoint and every rank reads the run folder and the cache, so a multi-node run needs both on a filesystem
that every node sees. ``check_shared_folders`` proves it at start: rank 0 writes a random token into each
folder, and after a barrier every rank must read the same token back; otherwise every rank stops with a
message naming the folder and the hosts that could not see it. ``check_same_start`` compares the epoch each
rank resumes from (after each read ``last.pt`` itself): a node that saw another checkpoint (a stale copy, a
node-local folder) stops every rank instead of training on. Both are no-ops in a single process.
"""

from __future__ import annotations

import datetime
import hashlib
import inspect
import os
import secrets
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ctlib import atomic

__all__ = [
    "NotShared",
    "all_gather_variable",
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "check_same_start",
    "check_shared_folders",
    "env_rank",
    "env_local_world_size",
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
    backend: str | None = None, *, timeout: datetime.timedelta | None = None, device: str | None = None
) -> tuple[int, int, torch.device]:
    """Join the torchrun process group if there is one; pick this process's device.

    Args:
        backend: process-group backend; default NCCL on CUDA, else gloo.
        timeout: process-group timeout (torch's default when None).
        device: "cuda" or "cpu" as decided before (``ctlib.gpu.resolve_device``: a run that needs CUDA has
            stopped already when torch cannot use it); None: CUDA when available.

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

    cuda = torch.cuda.is_available() if device is None else device == "cuda"
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


def env_local_world_size() -> int:
    """The processes torchrun started on this node (LOCAL_WORLD_SIZE); 1 without torchrun."""
    return _env_int("LOCAL_WORLD_SIZE", 1)


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


# ---------------------------------------------------------------------------------------------------------
# Multi-node checks
# ---------------------------------------------------------------------------------------------------------

TOKEN_PREFIX = ".ctlib-shared-check-"


class NotShared(RuntimeError):
    """The ranks of a run do not see the same files (run folder or cache), or resume from different epochs."""


def _all_gather(obj: object) -> list:
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _listing(folder: Path) -> str | None:
    try:
        return hashlib.sha256("\n".join(sorted(os.listdir(folder))).encode()).hexdigest()
    except OSError:
        return None


def check_shared_folders(folders: Sequence[str | Path]) -> None:
    """Every rank must read back the random token rank 0 wrote into each of ``folders``.

    The token file is ``<folder>/.ctlib-shared-check-<token>``; rank 0 removes it after the check. A folder
    rank 0 cannot write into (a read-only cache mount) is checked by its listing instead: every rank must
    see the same file names as rank 0.

    Raises:
        NotShared: on every rank, naming each folder and the (rank, host) pairs that could not read it.
    """
    if not is_distributed():
        return
    rank, host = dist.get_rank(), socket.gethostname()
    token = secrets.token_hex(16) if rank == 0 else None
    token = broadcast_object(token)
    name = TOKEN_PREFIX + token
    read_only = []
    if rank == 0:
        for folder in folders:
            try:
                Path(folder).mkdir(parents=True, exist_ok=True)
                atomic.write_text(Path(folder) / name, token)
            except OSError:
                read_only.append(str(folder))
    read_only = broadcast_object(read_only)
    listings = broadcast_object({f: _listing(Path(f)) for f in read_only} if rank == 0 else None)
    missing = [str(folder) for folder in folders if str(folder) not in read_only
               and _read(Path(folder) / name) != token]
    missing += [f for f in read_only if _listing(Path(f)) != listings[f]]
    views = _all_gather((rank, host, missing))
    barrier()
    if rank == 0:
        for folder in folders:
            if str(folder) not in read_only:
                (Path(folder) / name).unlink(missing_ok=True)
    bad = [(r, h, m) for r, h, m in views if m]
    if bad:
        where = "; ".join(f"rank {r} on host {h} cannot see {', '.join(m)}" for r, h, m in bad)
        raise NotShared(
            f"the run folder and the cache must be on a filesystem that every node sees (rank 0 on host "
            f"{views[0][1]} wrote a check file that other ranks could not read): {where}. Put --out and "
            "--work-dir on a shared filesystem (NFS, Lustre, GPFS) mounted at the same path on every node.")


def check_same_start(epoch: int, source: str | Path) -> None:
    """Every rank must resume from the same epoch (0: a fresh run), read from ``source`` (``last.pt``).

    Raises:
        NotShared: on every rank, listing each rank's host and epoch.
    """
    if not is_distributed():
        return
    views = _all_gather((dist.get_rank(), socket.gethostname(), int(epoch)))
    if len({e for _, _, e in views}) > 1:
        seen = "; ".join(f"rank {r} on {h}: epoch {e}" for r, h, e in views)
        raise NotShared(
            f"the ranks would resume from different epochs of {source} ({seen}): the nodes do not see the same "
            "checkpoint. Put the run folder on a filesystem that every node sees, and restart.")
