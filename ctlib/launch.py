"""Launching training runs from notebooks: ``torchrun`` as a subprocess, its log streamed.

The notebooks never spawn workers themselves (STYLE.md): a cell builds the command with
:func:`torchrun_command` and runs it with :func:`run_streaming`, which raises
``subprocess.CalledProcessError`` when the run fails, so papermill stops on the failing cell.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctlib.profiles import Profile, get_profile

#: The paper's future-work variant as a Table 3 row: alpha learned, and the 2D weight beta learned too
#: (``fused = beta * x_2d + alpha * residual_3d``, profile field ``learn_2d_weight``).
LEARNED_2D = "learned-2d"

# The runs of the paper: Table 2 (ResNet, ViT, ResNet+ViT with equal weights) and Table 3 (alpha),
# plus the future-work variant.
ALPHAS: tuple[float | str, ...] = (0.0, 0.1, 0.3, 0.5, 1.0, "learned", LEARNED_2D)


def run_name(model: str, alpha: float | str | None = None) -> str:
    """Folder name of a run: ``resnet2d``, ``vit3d``, ``fusion-alpha0.5``, ``fusion-learned``,
    ``fusion-learned-2d``."""
    if model != "fusion":
        return model
    if alpha in ("learned", LEARNED_2D):
        return f"fusion-{alpha}"
    return f"fusion-alpha{float(1.0 if alpha is None else alpha):g}"


def fusion_settings(alpha: float | str | None) -> tuple[float | str, dict[str, Any]]:
    """A Table 3 row -> (the model's ``alpha``, profile overrides): :data:`LEARNED_2D` is alpha
    ``"learned"`` with ``learn_2d_weight=true``; every other row is itself with no override."""
    if alpha == LEARNED_2D:
        return "learned", {"learn_2d_weight": True}
    return (1.0 if alpha is None else alpha), {}


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
) -> list[str]:
    """The ``torchrun`` command line for one run of :mod:`ctlib.train`.

    ``launcher``: None or "" runs today's one-node ``torchrun --standalone --nproc_per_node=<processes>``;
    otherwise a command prefix for clusters, split with ``shlex`` and followed by ``-m ctlib.train ...``, e.g.
    ``"srun torchrun --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint node01:29500"``
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
    if not progress:
        cmd.append("--no-progress")
    return cmd


def run_streaming(cmd: Sequence[str], *, cwd: str | Path | None = None) -> None:
    """Runs ``cmd``, printing its output line by line as it comes; raises on a non-zero exit."""
    print("$", " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "")}
    if not env["OMP_NUM_THREADS"]:
        env.pop("OMP_NUM_THREADS")
    with subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
        code = proc.wait()
    if code != 0:
        raise subprocess.CalledProcessError(code, list(cmd))


def run_tag(profile: str, seed: int = 0) -> str:
    """Folder tag of a profile's outputs: ``demo`` for seed 0, ``demo-seed1`` otherwise.

    Runs go to ``runs/<tag>/<run_name>``, figures to ``figures/<tag>/``, tables to ``results/<tag>/``.
    """
    return profile if int(seed) == 0 else f"{profile}-seed{int(seed)}"


@dataclass(frozen=True)
class PaperOutputs:
    """Where one profile's outputs go, as every notebook's parameters cell describes them."""

    profile: Profile
    seed: int
    tag: str
    runs: Path  # runs_dir/<tag>: one folder per training run
    figures: Path  # figures_dir/<tag>
    results: Path  # results_dir/<tag>: tables as CSV and Markdown

    def run_dir(self, model: str, alpha: float | str | None = None) -> Path:
        return self.runs / run_name(model, alpha)


def paper_outputs(profile: str, *, data_root: str | Path | None = None, work_dir: str | Path = "../data",
                  runs_dir: str | Path = "../runs", figures_dir: str | Path = "../figures",
                  results_dir: str | Path = "../results", seed: int = 0) -> PaperOutputs:
    """The resolved profile and output folders of a notebook run (folders are created)."""
    prof = get_profile(profile, work_dir=str(Path(work_dir).resolve()),
                       data_root=None if data_root is None else str(Path(data_root).resolve()), seed=int(seed))
    tag = run_tag(profile, seed)
    out = PaperOutputs(prof, int(seed), tag, Path(runs_dir).resolve() / tag, Path(figures_dir) / tag,
                       Path(results_dir) / tag)
    for folder in (out.figures, out.results):
        folder.mkdir(parents=True, exist_ok=True)
    return out


def train_run(outputs: PaperOutputs, model: str, alpha: float | str | None = None, *,
              processes: int | None = None, redo: bool = False, launcher: str | None = None) -> Path:
    """Prepares the data in this process, then trains one run with ``torchrun`` unless it is complete.

    Preparation is ``ctlib.cohort.prepare_profile``, the function behind ``python -m ctlib.cache``: it runs
    here, before any process group exists, and the ranks then only read. Returns the run folder. A finished
    run with the same settings and split is reused unless ``redo``. ``launcher``: see :func:`torchrun_command`
    (a cluster prefix such as ``srun torchrun --nnodes 4 ...``; "" or None for one node).
    """
    from ctlib.cohort import prepare_profile
    from ctlib.train import RunSpec, run_is_complete

    prof = outputs.profile
    run_dir = outputs.run_dir(model, alpha)
    # The workers then find a ready cache (generation and preparation happen once, here).
    prepared = prepare_profile(prof)
    print(prepared.summary())
    model_alpha, extra = fusion_settings(alpha) if model == "fusion" else (1.0, {})
    # the profile the torchrun workers build from the same overrides
    spec = RunSpec(dataclasses.replace(prof, **extra), model, model_alpha)
    if run_is_complete(run_dir, spec, prepared.key) and not redo:
        print(f"{run_dir} is complete: reused (redo=True trains again)")
        return run_dir
    run_streaming(torchrun_command(profile=prof.name, model=model, alpha=alpha, out=run_dir,
                                   processes=processes, data_root=prof.data_root, work_dir=prof.work_dir,
                                   seed=outputs.seed, redo=redo, launcher=launcher))
    return run_dir
