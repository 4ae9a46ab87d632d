"""What the GPU side needs before a run starts: a CUDA device this torch can use, room in /dev/shm for the
loader workers, and a plain answer when a step runs out of memory.

``paper`` and ``paper480`` train on CUDA GPUs (profile field ``device = "cuda"``). Where torch cannot use one,
:func:`resolve_device` stops at once, before any data is read or any process started, with the cause and
the fix instead of training on the CPU for days: no GPU visible (``CUDA_VISIBLE_DEVICES``, no driver), a
CPU-only torch, or a GPU and driver this torch build cannot use (torch's CUDA version and the driver's, read
from ``nvidia-smi``). ``--device cpu`` (``--set device=cpu``) trains on the CPU on purpose; ``demo`` and
``smoke`` use ``device = "auto"`` (CUDA when usable, else the CPU).

The checks take their facts from arguments with defaults read from this machine (``nvidia-smi`` on PATH,
``torch.cuda``), so tests give a fake ``nvidia-smi`` or patch ``torch.cuda.is_available``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "DEVICES",
    "DeviceUnusable",
    "NvidiaSmi",
    "ShmTooSmall",
    "check_shm",
    "cuda_problem",
    "min_driver_for",
    "query_nvidia_smi",
    "resolve_device",
    "shm_needed",
    "suggested_torch_cuda",
]

DEVICES = ("cuda", "cpu", "auto")
TORCH_INDEX = "https://download.pytorch.org/whl/"

# The oldest Linux driver that runs a CUDA major version's applications (NVIDIA's "minor version
# compatibility": a torch wheel bundles its CUDA runtime, so any driver of the major's family works).
_MIN_DRIVER = {13: (580, 65, 6), 12: (525, 60, 13), 11: (450, 80, 2)}


class DeviceUnusable(RuntimeError):
    """The profile needs a CUDA GPU and torch cannot use one here; the message says why and what to do."""


class ShmTooSmall(RuntimeError):
    """/dev/shm cannot hold the batches the DataLoader workers hand over; the message says what to do."""


@dataclass(frozen=True)
class NvidiaSmi:
    """What ``nvidia-smi`` says: the driver version and each GPU's name and memory, or why it failed."""

    driver: str | None
    gpus: tuple[tuple[str, str], ...] = ()  # (name, memory.total)
    error: str | None = None


def query_nvidia_smi(timeout: float = 15.0) -> NvidiaSmi | None:
    """``nvidia-smi --query-gpu=driver_version,name,memory.total --format=csv,noheader``; None without it."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        res = subprocess.run([exe, "--query-gpu=driver_version,name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        return NvidiaSmi(driver=None, error=f"{type(err).__name__}: {err}")
    lines = [ln.strip() for ln in res.stdout.splitlines() if ln.strip()]
    if res.returncode != 0 or not lines:
        said = (res.stdout + res.stderr).strip().splitlines()
        return NvidiaSmi(driver=None, error=said[0] if said else f"exit status {res.returncode}")
    rows = [[part.strip() for part in ln.split(",")] for ln in lines]
    return NvidiaSmi(driver=rows[0][0], gpus=tuple((r[1], r[2]) for r in rows if len(r) >= 3))


def _driver_from_proc(path: str | Path = "/proc/driver/nvidia/version") -> str | None:
    """The kernel module's version (containers often have the driver but no ``nvidia-smi``)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    for word in text.split():
        parts = word.split(".")
        if len(parts) >= 2 and all(p.isdigit() for p in parts):
            return word
    return None


def _version(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def min_driver_for(cuda: str) -> str | None:
    """The oldest driver that runs torch built for CUDA ``cuda`` ("13.0" -> "580.65.06")."""
    need = _MIN_DRIVER.get(_version(cuda)[0])
    return None if need is None else f"{need[0]}.{need[1]:02d}.{need[2]:02d}"


def suggested_torch_cuda(driver: str | None) -> str:
    """The CUDA version of a torch build that ``driver`` runs: 13.0 from 580, 12.6 from 525.60.13, else 11.8."""
    if driver is None:
        return "12.6"
    have = _version(driver)
    if have >= _MIN_DRIVER[13]:
        return "13.0"
    if have >= _MIN_DRIVER[12]:
        return "12.6"
    return "11.8"


def _install_fix(driver: str | None) -> str:
    want = suggested_torch_cuda(driver)
    tag = "cu" + want.replace(".", "")
    fix = (f"install torch built for CUDA {want}: `bash run_all.sh --setup-only --torch-cuda {want}` (torch and "
           f"torchvision from {TORCH_INDEX}{tag}, the rest from requirements-lock.txt; or in your own environment "
           f"`pip install torch=={torch.__version__.split('+')[0]} torchvision --index-url {TORCH_INDEX}{tag}`)")
    if want == "11.8":
        fix += (f"; recent torch releases may publish no CUDA 11 build, then update the NVIDIA driver to >= "
                f"{min_driver_for('12.0')}")
    return fix


def cuda_problem(*, smi: NvidiaSmi | None | bool = True, proc_version: str | Path = "/proc/driver/nvidia/version"
                 ) -> tuple[str, str] | None:
    """Why torch cannot use a CUDA GPU here, as (cause, fix); None when it can.

    Args:
        smi: what ``nvidia-smi`` said (:func:`query_nvidia_smi`); True: ask it now.
        proc_version: where the kernel module states its version (read when ``nvidia-smi`` is missing).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available() and torch.cuda.device_count() > 0
    torch_said = next((str(w.message).strip() for w in caught if "CUDA" in str(w.message)), "")
    built = torch.version.cuda
    if available:
        return _arch_problem()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if smi is True:
        smi = query_nvidia_smi()
    driver = smi.driver if isinstance(smi, NvidiaSmi) else _driver_from_proc(proc_version)
    gpus = ", ".join(f"{name} ({mem})" for name, mem in smi.gpus) if isinstance(smi, NvidiaSmi) else ""
    if built is None:
        return (f"this torch ({torch.__version__}) is a CPU-only build"
                + (f"; nvidia-smi shows {gpus}, driver {driver}" if gpus else ""), _install_fix(driver))
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return (f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU",
                "unset CUDA_VISIBLE_DEVICES or give the GPUs' indices (a scheduler sets it: ask it for GPUs, "
                "e.g. `srun --gpus-per-node=4` or `#SBATCH --gpus-per-node=4`)")
    if smi is None and driver is None:
        return ("no NVIDIA driver on this machine (no nvidia-smi on PATH, no /proc/driver/nvidia)",
                "run on a GPU node: on a cluster inside a job that asked for GPUs (`srun --gpus-per-node=4 ...`), "
                "in a container with the GPUs passed in (`docker run --gpus all ...`, or `--nv` for Apptainer)")
    if isinstance(smi, NvidiaSmi) and smi.error:
        return (f"nvidia-smi fails: {smi.error}",
                "the NVIDIA driver is not working on this node (not loaded, or a driver/library version mismatch "
                "after an update): reboot the node or ask its administrators")
    need = min_driver_for(built)
    where = f"{gpus or 'a GPU'} with driver {driver or 'of unknown version'}"
    if driver is not None and need is not None and _version(driver) < _version(need):
        return (f"{where} is visible, but this torch ({torch.__version__}) is built for CUDA {built}, which needs "
                f"driver >= {need}" + (f" (torch said: {torch_said[:300]})" if torch_said else ""),
                _install_fix(driver) + f"; or update the NVIDIA driver to >= {need}")
    return (f"{where} is visible, but torch ({torch.__version__}, CUDA {built}) cannot initialise CUDA"
            + (f": {torch_said[:300]}" if torch_said else ""),
            "check that the GPU is not held in exclusive mode by another process and that the device files "
            "(/dev/nvidia*) are visible in this container; else " + _install_fix(driver))


def _arch_problem() -> tuple[str, str] | None:
    """A GPU that this torch build has no kernels for (an old GPU on a new CUDA build), as (cause, fix)."""
    archs = [a for a in torch.cuda.get_arch_list() if a.startswith(("sm_", "compute_"))]
    if not archs:
        return None
    major, minor = torch.cuda.get_device_capability(0)
    cap = major * 10 + minor
    sm = [int(a.split("_")[1].rstrip("a")) for a in archs if a.startswith("sm_") and a.split("_")[1].rstrip("af").isdigit()]
    ptx = [int(a.split("_")[1]) for a in archs if a.startswith("compute_") and a.split("_")[1].isdigit()]
    if cap in sm or any(p <= cap for p in ptx) or any(s // 10 == major and s <= cap for s in sm):
        return None
    name = torch.cuda.get_device_name(0)
    return (f"{name} (compute capability {major}.{minor}) is not supported by this torch build (CUDA "
            f"{torch.version.cuda}, kernels for {', '.join(archs)})",
            "install a torch build for an older CUDA that still supports this GPU: "
            "`bash run_all.sh --setup-only --torch-cuda 12.6`")


def resolve_device(setting: str, *, profile: str = "", smi: NvidiaSmi | None | bool = True) -> str:
    """The device type a run trains on: ``"cuda"`` or ``"cpu"``.

    ``setting`` is the profile's ``device``: ``"cpu"`` (asked for), ``"auto"`` (CUDA when usable, else the CPU)
    or ``"cuda"`` (required: stops when torch cannot use a GPU).

    Raises:
        DeviceUnusable: ``setting == "cuda"`` and torch cannot use a GPU, naming the cause and the fix.
        ValueError: an unknown setting.
    """
    if setting not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {setting!r}")
    if setting == "cpu":
        return "cpu"
    problem = cuda_problem(smi=smi)
    if problem is None:
        return "cuda"
    if setting == "auto":
        return "cpu"
    cause, fix = problem
    who = f"profile {profile!r}" if profile else "this run"
    raise DeviceUnusable(
        f"{who} trains on CUDA GPUs, but torch cannot use one here: {cause}.\n  Fix: {fix}.\n  To train on the "
        "CPU on purpose (days at the paper's sizes), pass --device cpu (or --set device=cpu).")


# ---------------------------------------------------------------------------------------------------------
# /dev/shm: where DataLoader workers put the batches they hand to the training process
# ---------------------------------------------------------------------------------------------------------
def shm_needed(batch_bytes: int, *, num_workers: int, prefetch_factor: int = 2, local_processes: int = 1) -> int:
    """Bytes of /dev/shm the loaders of one node hold at most: every worker of every process keeps up to
    ``prefetch_factor`` batches in shared memory until the training process takes them."""
    if num_workers <= 0:
        return 0
    return int(batch_bytes) * num_workers * prefetch_factor * max(1, local_processes)


def check_shm(needed: int, *, path: str | Path = "/dev/shm", what: str = "") -> int | None:
    """Stops when ``path`` has less room than ``needed`` bytes; returns the free bytes (None without ``path``).

    Both of torch's sharing strategies ('file_descriptor', the default, and 'file_system') keep their segments
    in /dev/shm, so changing the strategy does not help: the room must be there, or no worker processes.

    Raises:
        ShmTooSmall: naming the free and needed sizes and the fixes (Docker's ``--shm-size`` / ``--ipc=host``,
            Kubernetes' memory-backed ``emptyDir``, or ``--set num_workers=0``).
    """
    if needed <= 0:
        return None
    try:
        st = os.statvfs(path)
    except OSError:
        return None  # not Linux, or no /dev/shm: nothing to check
    free = st.f_bavail * st.f_frsize
    if free >= needed:
        return free
    gib = 2**30
    want = max(1, -(-int(needed * 1.5) // gib))
    raise ShmTooSmall(
        f"{path} has {free / 2**20:.0f} MiB free, but the DataLoader workers need ~{needed / gib:.1f} GiB there"
        f"{f' ({what})' if what else ''}: workers would die with a bus error or 'No space left on device'.\n"
        f"  Fix: start the container with more shared memory, `docker run --shm-size={want}g ...` or "
        "`docker run --ipc=host ...` (Kubernetes: an emptyDir with medium: Memory mounted at /dev/shm; "
        "Apptainer shares the host's); or load without worker processes, --set num_workers=0 (slower).")


def main(argv: list[str] | None = None) -> int:
    """``python -m ctlib.gpu --profile paper``: the device a run of the profile trains on, or why it cannot
    start (exit status 1). ``run_all.sh`` asks it before the first notebook."""
    import argparse  # noqa: PLC0415

    from ctlib.profiles import get_profile  # noqa: PLC0415

    p = argparse.ArgumentParser(prog="python -m ctlib.gpu", description=main.__doc__.split("\n")[0])
    p.add_argument("--profile", default="demo")
    p.add_argument("--device", choices=DEVICES, default=os.environ.get("CTLIB_DEVICE") or None,
                   help="default: $CTLIB_DEVICE, else the profile's")
    args = p.parse_args(argv)
    profile = get_profile(args.profile)
    try:
        device = resolve_device(args.device or profile.device, profile=profile.name)
    except DeviceUnusable as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if device == "cuda":
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"profile {profile.name!r}: CUDA, {torch.cuda.device_count()} GPU(s): {names}")
    else:
        print(f"profile {profile.name!r}: CPU (device {args.device or profile.device!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
