"""Atomic file writes: a reader sees the old file or the complete new one, never a half-written one.

Every writer goes through :func:`write_atomic`: the bytes go to a temp file in the same folder (so that
``os.replace`` is atomic: same file system), which is flushed and fsynced, then renamed over the target;
the folder is fsynced too, so the rename survives a crash. The temp file is ``.<name>.<host>.<pid>.tmp``
(:func:`temp_path`): a folder may be shared by writers on several hosts (a cluster's network file system),
where a pid means nothing outside its host, so :func:`temp_owner` tells a stale temp file (this host, a dead
pid) from a live writer's.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = ["HOST", "fsync_dir", "save_torch", "temp_owner", "temp_path", "write_atomic", "write_bytes",
           "write_text"]

#: This host's name as it appears in temp file names.
HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
_TEMP = re.compile(r"^\..+\.([A-Za-z0-9-]+)\.(\d+)\.tmp$")


def temp_path(path: Path) -> Path:
    """The temp file :func:`write_atomic` writes ``path`` through: ``.<name>.<host>.<pid>.tmp`` beside it."""
    return path.with_name(f".{path.name}.{HOST}.{os.getpid()}.tmp")


def temp_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of a temp file name made by :func:`temp_path`, or None for any other name."""
    m = _TEMP.match(name)
    return None if m is None else (m.group(1), int(m.group(2)))


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op on Windows, where folders cannot be fsynced)."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write ``path`` with ``write(f)`` (``f`` a binary file) via its temp file: write, fsync,
    ``os.replace``, fsync of the folder. On any error the temp file is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes(path: Path, data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""
    write_atomic(path, lambda f: f.write(data))


def write_text(path: Path, text: str) -> None:
    """Atomically write ``text`` to ``path``, UTF-8 encoded, newlines as given."""
    write_bytes(path, text.encode("utf-8"))


def save_torch(obj: Any, path: Path) -> None:
    """Atomically ``torch.save`` ``obj`` to ``path`` (a checkpoint)."""
    write_atomic(path, lambda f: torch.save(obj, f))
