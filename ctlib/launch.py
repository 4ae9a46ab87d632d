"""Launching training runs from notebooks: ``torchrun`` command lines, run as subprocesses, logs streamed.

The notebooks never spawn workers themselves (STYLE.md): a cell builds the command with
:func:`torchrun_command` and runs it with :func:`run_streaming`, which raises
``subprocess.CalledProcessError`` when the run fails, so papermill stops on the failing cell.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ctlib import gpu
from ctlib.prepare import prepare_profile
from ctlib.profiles import PROFILES, Profile
from ctlib.runs import LEARNED_2D, PaperOutputs, RunSpec, run_is_complete, scored_every_volume, table_run


def fusion_settings(alpha: float | str | None) -> tuple[float | str, dict[str, Any]]:
    """A Table 3 row -> (the model's ``alpha``, profile overrides): :data:`ctlib.runs.LEARNED_2D` is alpha
    ``"learned"`` with ``learn_2d_weight=true``; every other row is itself with no override."""
    if alpha == LEARNED_2D:
        return "learned", {"learn_2d_weight": True}
    return (1.0 if alpha is None else alpha), {}


def profile_overrides(profile: Profile) -> list[str]:
    """``FIELD=VALUE`` (JSON) for every field of ``profile`` that differs from the profile of its name, except
    those passed on their own (``data_root``, ``work_dir``, ``seed``): what ``--set`` needs to rebuild it."""
    base = PROFILES.get(profile.name, Profile())
    out = []
    for f in dataclasses.fields(Profile):
        if f.name in ("name", "extra", "data_root", "work_dir", "seed"):
            continue
        value = getattr(profile, f.name)
        if value != getattr(base, f.name):
            out.append(f"{f.name}={json.dumps(list(value) if isinstance(value, tuple) else value)}")
    return out


def step_budget(profile: Profile, steps: int, n_train: int) -> Profile:
    """``profile`` trained for about ``steps`` optimisation steps on ``n_train`` training volumes: the fewest
    epochs that hold them (one pass is ``ceil(n_train / batch_size)`` steps) and ``max_steps_per_epoch`` to
    match (at least ``steps`` in all, less than one epoch's worth more)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    per_pass = max(1, math.ceil(int(n_train) / profile.batch_size))
    epochs = math.ceil(steps / per_pass)
    return dataclasses.replace(profile, epochs=epochs, max_steps_per_epoch=math.ceil(steps / epochs))


def default_processes() -> int:
    """One process per visible GPU, or one on CPU."""
    return max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 1


def torchrun_command(
    *,
    profile: str,
    model: str,
    out: str | Path,
    alpha: float | str | None = None,
    processes: int | None = None,
    data_root: str | Path | None = None,
    work_dir: str | Path | None = None,
    seed: int | None = None,
    overrides: Sequence[str] = (),
    redo: bool = False,
    progress: bool = False,
    launcher: str | None = None,
    every_volume: bool = True,
) -> list[str]:
    """The ``torchrun`` command line for one run of :mod:`ctlib.train`.

    ``launcher``: None or "" runs today's one-node ``torchrun --standalone --nproc_per_node=<processes>``;
    otherwise a command prefix for clusters, split with ``shlex`` and followed by ``-m ctlib.train ...``, e.g.
    ``"srun torchrun --nnodes 2 --nproc_per_node 4 --rdzv-backend c10d --rdzv-endpoint node01:29500"``
    (``processes`` is then ignored: the prefix says how many).
    """
    nproc = default_processes() if processes is None else int(processes)
    if nproc < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    if launcher and launcher.strip():
        prefix = shlex.split(launcher)
    else:
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*prefix, "-m", "ctlib.train", "--profile", profile, "--model", model, "--out", str(out)]
    if model == "fusion":
        model_alpha, extra = fusion_settings(alpha)
        cmd += ["--alpha", str(model_alpha)]
        overrides = [*(f"{k}={json.dumps(v)}" for k, v in extra.items()), *overrides]
    if data_root is not None:
        cmd += ["--data-root", str(data_root)]
    if work_dir is not None:
        cmd += ["--work-dir", str(work_dir)]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    for item in overrides:
        cmd += ["--set", item]
    if redo:
        cmd.append("--redo")
    if not every_volume:
        cmd += ["--score", "eval"]
    if not progress:
        cmd.append("--no-progress")
    return cmd


def _run_env(threads: int | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(int(threads))
    elif not env.get("OMP_NUM_THREADS"):
        env.pop("OMP_NUM_THREADS", None)
    return env


def run_streaming(cmd: Sequence[str], *, cwd: str | Path | None = None, threads: int | None = None,
                  prefix: str = "") -> None:
    """Runs ``cmd``, printing its output line by line as it comes (each line after ``prefix``); raises
    ``subprocess.CalledProcessError`` on a non-zero exit. ``threads``: the run's OMP/MKL threads (None:
    the environment's, else torch's default of one per core)."""
    print(f"{prefix}$", " ".join(cmd), flush=True)
    with subprocess.Popen(list(cmd), cwd=cwd, env=_run_env(threads), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(prefix + line, end="", flush=True)
        code = proc.wait()
    if code != 0:
        raise subprocess.CalledProcessError(code, list(cmd))


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def concurrent_runs(pending: int, *, processes: int | None = None, launcher: str | None = None,
                    cpus: int | None = None) -> tuple[int, int | None]:
    """How to train ``pending`` independent runs here: (runs at once, threads per run; None = default).

    On GPUs, with a cluster ``launcher`` or with several processes per run, runs go one after another
    (each takes the whole node). On CPU, up to ``min(pending, cpus, 4)`` single-process runs share the
    cores, ``cpus // at_once`` threads each: a convolution on one thread is more efficient than on two
    (measured on the demo's ResNet step, 2 cores: one 2-thread step 1.1-1.26 s, one 1-thread step
    1.94 s, so two 1-thread runs side by side train up to ~1.3x as many steps per second; in the demo,
    two fusion runs side by side took 8.5 min against 4.7 min for one alone with both cores, 1.1x).
    A run's numbers depend on its thread count only through float rounding.
    """
    if pending <= 1 or torch.cuda.is_available() or (launcher and launcher.strip()) or (processes or 1) > 1:
        return 1, None
    cpus = _usable_cpus() if cpus is None else int(cpus)
    at_once = max(1, min(pending, cpus, 4))
    return (1, None) if at_once == 1 else (at_once, max(1, cpus // at_once))


def run_concurrently(commands: dict[str, Sequence[str]], *, at_once: int, threads: int | None = None,
                     cwd: str | Path | None = None) -> None:
    """Runs the named commands, ``at_once`` at a time, each line of output prefixed ``[name] ``.

    A failed command does not stop the others (their runs finish and keep their checkpoints); once all
    have ended, the first failure is raised (the others are printed): ``subprocess.CalledProcessError``
    for a non-zero exit, or the error of a command that could not start (e.g. ``FileNotFoundError``).
    """
    slots = threading.Semaphore(max(1, at_once))
    failures: list[tuple[str, Exception]] = []
    lock = threading.Lock()

    def one(name: str, cmd: Sequence[str]) -> None:
        try:
            run_streaming(cmd, cwd=cwd, threads=threads, prefix=f"[{name}] ")
        except Exception as err:  # noqa: BLE001 - kept and raised in the calling thread once all have ended
            with lock:
                failures.append((name, err))
        finally:
            slots.release()

    workers = []
    for name, cmd in commands.items():
        slots.acquire()
        worker = threading.Thread(target=one, args=(name, cmd), daemon=True)
        worker.start()
        workers.append(worker)
    for worker in workers:
        worker.join()
    if failures:
        for name, err in failures:
            why = (f"with exit code {err.returncode}" if isinstance(err, subprocess.CalledProcessError)
                   else f"to start: {err}")
            print(f"[{name}] FAILED {why}", flush=True)
        raise failures[0][1]


def train_run(outputs: PaperOutputs, model: str, alpha: float | str | None = None, *,
              processes: int | None = None, redo: bool = False, launcher: str | None = None,
              every_volume: bool = True) -> Path:
    """One run: :func:`train_runs` of a single ``(model, alpha)``. Returns the run folder."""
    return train_runs(outputs, [(model, alpha)], processes=processes, redo=redo, launcher=launcher,
                      every_volume=every_volume)[0]


def train_runs(outputs: PaperOutputs, runs: Sequence[tuple[str, float | str | None]], *,
               processes: int | None = None, redo: bool = False, launcher: str | None = None,
               at_once: int | None = None, every_volume: bool | Sequence[str] = True) -> list[Path]:
    """Prepares the data in this process, then trains each ``(model, alpha)`` run with ``torchrun`` unless
    it is complete; returns the run folders in the order given. A profile that needs CUDA stops first
    (``ctlib.gpu.DeviceUnusable``) when torch cannot use a GPU here and no cluster ``launcher`` is given.

    Preparation is ``ctlib.prepare.prepare_profile``, the function behind ``python -m ctlib.prepare``: it runs
    here, before any process group exists, and the ranks then only read. A finished run with the same
    settings and split is reused unless ``redo``. ``launcher``: see :func:`torchrun_command` (a cluster
    prefix such as ``srun torchrun --nnodes 4 ...``; "" or None for one node). ``at_once``: how many runs
    train side by side (None: :func:`concurrent_runs` decides; several only on a CPU-only machine, where
    each then gets its share of the cores; 1: one after another with torch's default threads).
    ``every_volume``: True, False or the run names (e.g. ``["fusion-learned"]``) whose best checkpoint scores
    every volume (``features.npz`` for the latent space); the others score validation and test only.
    """
    prof = outputs.profile
    if not (launcher and launcher.strip()):
        # the runs start on this machine: a profile that needs a GPU stops here when torch cannot use one,
        # before hours of preparation (with a cluster launcher each training process checks where it runs)
        gpu.resolve_device(os.environ.get("CTLIB_DEVICE") or prof.device, profile=prof.name)
    # The workers then find a ready cache (generation and preparation happen once, here).
    prepared = prepare_profile(prof)
    print(prepared.summary())
    if isinstance(every_volume, str):  # one run name, not its characters
        every_volume = [every_volume]
    dirs, commands = [], {}
    for model, alpha in runs:
        model, alpha = table_run(model, alpha)
        run_dir = outputs.run_dir(model, alpha)
        seen = run_dir in dirs
        dirs.append(run_dir)
        if seen:  # the same run twice (e.g. alpha 0 and the ResNet): trained once
            continue
        model_alpha, extra = fusion_settings(alpha) if model == "fusion" else (1.0, {})
        # the profile the torchrun workers build from the same overrides
        spec = RunSpec(dataclasses.replace(prof, **extra), model, model_alpha)
        every = every_volume if isinstance(every_volume, bool) else run_dir.name in every_volume
        # a run finished with --score eval where every volume is wanted: the command only scores them
        if run_is_complete(run_dir, spec, prepared.key) and not redo and (not every or scored_every_volume(run_dir)):
            print(f"{run_dir} is complete: reused (redo=True trains again)")
            continue
        commands[run_dir.name] = torchrun_command(
            profile=prof.name, model=model, alpha=alpha, out=run_dir, processes=processes,
            data_root=prof.data_root, work_dir=prof.work_dir, seed=outputs.seed, redo=redo, launcher=launcher,
            every_volume=every, overrides=profile_overrides(prof))
    if at_once is None:
        at_once, threads = concurrent_runs(len(commands), processes=processes, launcher=launcher)
    else:
        threads = None if at_once <= 1 else max(1, _usable_cpus() // at_once)
    if at_once <= 1 or len(commands) <= 1:
        for cmd in commands.values():
            run_streaming(cmd)
    else:
        print(f"training {len(commands)} runs, {at_once} at a time with {threads} thread(s) each", flush=True)
        run_concurrently(commands, at_once=at_once, threads=threads)
    return dirs
