"""Checks that make a run on several nodes safe: one shared filesystem, one resume epoch.

Rank 0 writes every checkpoint and every rank reads the run folder and the cache, so a multi-node run needs
both on a filesystem that every node sees. ``check_shared_folders`` proves it at start: rank 0 writes a
random token into each folder, and after a barrier every rank must read the same token back; otherwise every
rank stops with a message naming the folder and the hosts that could not see it.

``check_same_start`` compares the epoch each rank resumes from (after each read ``last.pt`` itself): a node
that saw another checkpoint (a stale copy, a node-local folder) stops every rank instead of training on.
Both are no-ops in a single process.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist

from ctlib import distributed as dist_utils

__all__ = ["NotShared", "check_same_start", "check_shared_folders"]

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
    if not dist_utils.is_distributed():
        return
    rank, host = dist.get_rank(), socket.gethostname()
    token = secrets.token_hex(16) if rank == 0 else None
    token = dist_utils.broadcast_object(token)
    name = TOKEN_PREFIX + token
    read_only = []
    if rank == 0:
        for folder in folders:
            try:
                Path(folder).mkdir(parents=True, exist_ok=True)
                tmp = Path(folder) / f"{name}.tmp"
                tmp.write_text(token)
                os.replace(tmp, Path(folder) / name)
            except OSError:
                read_only.append(str(folder))
    read_only = dist_utils.broadcast_object(read_only)
    listings = dist_utils.broadcast_object({f: _listing(Path(f)) for f in read_only} if rank == 0 else None)
    missing = [str(folder) for folder in folders if str(folder) not in read_only
               and _read(Path(folder) / name) != token]
    missing += [f for f in read_only if _listing(Path(f)) != listings[f]]
    views = _all_gather((rank, host, missing))
    dist_utils.barrier()
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
    if not dist_utils.is_distributed():
        return
    views = _all_gather((dist.get_rank(), socket.gethostname(), int(epoch)))
    if len({e for _, _, e in views}) > 1:
        seen = "; ".join(f"rank {r} on {h}: epoch {e}" for r, h, e in views)
        raise NotShared(
            f"the ranks would resume from different epochs of {source} ({seen}): the nodes do not see the same "
            "checkpoint. Put the run folder on a filesystem that every node sees, and restart.")
