"""Worker functions for the crashed-pool test; importable by spawned processes (tests/ is on sys.path)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any


def die_on_second(task: dict[str, Any], out_dir: str, prep: Any) -> tuple[str, str | None]:
    """Stands in for ``ctlib.cache._prepare_one``; the process handling the 2nd volume is SIGKILLed, as
    the out-of-memory killer would."""
    if task["VolumeName"].endswith("_2_a_1.nii.gz"):
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.5)
    return task["VolumeName"], None
