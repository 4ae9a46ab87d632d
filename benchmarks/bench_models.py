"""Training-step time and peak memory of ResNet2D, ViT3D and Fusion at the paper's sizes.

For each device, model and setting one fresh subprocess builds the model, runs ``--warmup`` untimed
and ``--steps`` timed training steps (forward, BCE-with-logits loss, backward, AdamW step) on random
volumes, and reports the median seconds per step (and the fastest step, a steadier figure on a
shared machine), per volume, and its peak memory, so that peaks never mix:
``torch.cuda.max_memory_allocated`` on a GPU, the process's ``ru_maxrss`` on the CPU (the whole
process's high-water mark; the table also gives it minus the mark before the model was built).

Sizes are the paper's (sections 3.1, 4.1, 4.2): ResNet2D on 100 slices of 214x214, ViT3D and Fusion on
100 slices of 224x224, batch 2 per device. Settings: ``fp32`` (eager fp32, the baseline), ``bf16``
(bf16 autocast, what the paper profile uses on CUDA), ``+cl`` (channels_last, for the convolutional
models), ``+compile`` (``torch.compile``, inductor; the first step, which compiles, is excluded and its
time printed as ``first s``) and ``+ckpt`` (gradient checkpointing of the ViT blocks). Ratios are against
``fp32``; the settings of one model run alternately ``--rounds`` times, so a shared machine's load hits all.

On a CPU shared with other busy processes, torch's OpenMP threads wait for each other at every
barrier and steps become many times slower: run the CPU rows on an idle machine (or with ``--threads``
below the free cores) and compare the ``min`` column.

    python benchmarks/bench_models.py                      # CPU, and CUDA when available
    python benchmarks/bench_models.py --device cuda        # the paper's sizes on a GPU
    python benchmarks/bench_models.py --device cpu --slices 20 --steps 3
    python benchmarks/bench_models.py --quick              # small sizes, a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

MODELS = ("resnet2d", "vit3d", "fusion")
SETTINGS = ("fp32", "fp32+cl", "fp32+compile", "bf16", "bf16+cl", "bf16+compile", "bf16+ckpt")
APPLIES = {  # channels_last only concerns convolutions, checkpointing only the ViT blocks
    "resnet2d": ("fp32", "fp32+cl", "fp32+compile", "bf16", "bf16+cl", "bf16+compile"),
    "vit3d": ("fp32", "fp32+compile", "bf16", "bf16+compile", "bf16+ckpt"),
    "fusion": ("fp32", "fp32+cl", "fp32+compile", "bf16", "bf16+cl", "bf16+compile", "bf16+ckpt"),
}
QUICK_VIT = dict(dim=128, spatial_depth=2, slice_depth=2, heads=4, dim_head=32, mlp_dim=256)


@dataclass(frozen=True)
class Config:
    device: str
    model: str
    setting: str
    batch: int
    slices: int
    size: int  # slice height = width
    steps: int
    warmup: int
    quick: bool
    threads: int | None = None  # torch intra-op threads on the CPU; None: torch's default


def build(cfg: Config):
    """The model of ``cfg`` with the paper's sizes (tiny ViT blocks in quick mode)."""
    from ctlib.models import Fusion, ResNet2D, ViT3D

    ckpt = "ckpt" in cfg.setting
    vit_kwargs = dict(image_size=cfg.size, max_slices=max(cfg.slices, 100), gradient_checkpointing=ckpt)
    if cfg.quick:
        vit_kwargs.update(QUICK_VIT)
    if cfg.model == "resnet2d":
        return ResNet2D()
    if cfg.model == "vit3d":
        return ViT3D(**vit_kwargs)
    return Fusion(alpha="learned", vit_kwargs=vit_kwargs)


def measure(cfg: Config) -> dict:
    """Run one configuration in this process: seconds per step and peak memory in MiB."""
    import torch
    import torch.nn.functional as F

    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    device = torch.device(cfg.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model = build(cfg).to(device).train()
    if "cl" in cfg.setting.split("+"):
        model = model.to(memory_format=torch.channels_last)
    if "compile" in cfg.setting.split("+"):  # torch.compile (inductor): the first step compiles
        model = torch.compile(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4, fused=True)
    x = torch.rand(cfg.batch, cfg.slices, cfg.size, cfg.size, device=device) * 2 - 1
    y = (torch.rand(cfg.batch, 18, device=device) < 0.3).float()
    bf16 = cfg.setting.startswith("bf16")

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.binary_cross_entropy_with_logits(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()  # synchronises with the device

    first_s = None
    for i in range(cfg.warmup):
        start = time.perf_counter()
        step()
        if i == 0:
            first_s = time.perf_counter() - start  # includes compilation under +compile
    times = []
    for _ in range(cfg.steps):  # each step ends in loss.item(), a device synchronisation
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    out = {"step_s": seconds, "step_min_s": min(times), "volume_s": seconds / cfg.batch, "first_step_s": first_s}
    if cuda:
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
        out["device_name"] = torch.cuda.get_device_name(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["peak_mib"] = peak
        out["model_peak_mib"] = peak - baseline_rss
        out["device_name"] = f"CPU, {torch.get_num_threads()} threads"
    return out


def run_isolated(cfg: Config, timeout: float) -> dict:
    """``measure(cfg)`` in a fresh Python process; failures (out of memory, timeout) become an error."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(asdict(cfg))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    return {"error": tail[0][:120]}


def _merge(results: list[dict]) -> dict:
    """One row from several rounds: the median of the rounds' medians, the fastest step, the largest peak."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    out = dict(ok[0])
    out["step_s"] = statistics.median(r["step_s"] for r in ok)
    out["volume_s"] = statistics.median(r["volume_s"] for r in ok)
    out["step_min_s"] = min(r["step_min_s"] for r in ok)
    out["peak_mib"] = max(r["peak_mib"] for r in ok)
    return out


def table(rows: list[tuple[Config, dict]]) -> str:
    """One line per configuration with time and memory ratios against fp32 of the same device and model."""
    base = {(c.device, c.model): r for c, r in rows if c.setting == "fp32" and "error" not in r}
    head = (
        f"{'device':<6} {'model':<9} {'setting':<10} {'input BxSxHxW':<16} {'s/step':>8} {'min':>7} {'s/volume':>9} "
        f"{'time x':>7} {'peak MiB':>9} {'mem x':>6} {'+model MiB':>10}"
    )
    lines = [head, "-" * len(head)]
    for c, r in rows:
        shape = f"{c.batch}x{c.slices}x{c.size}x{c.size}"
        if "error" in r:
            lines.append(f"{c.device:<6} {c.model:<9} {c.setting:<10} {shape:<16} failed: {r['error']}")
            continue
        b = base.get((c.device, c.model))
        t_ratio = f"{r['step_s'] / b['step_s']:.2f}" if b else "-"
        m_ratio = f"{r['peak_mib'] / b['peak_mib']:.2f}" if b else "-"
        extra = f"{r['model_peak_mib']:.0f}" if "model_peak_mib" in r else "-"
        lines.append(
            f"{c.device:<6} {c.model:<9} {c.setting:<10} {shape:<16} {r['step_s']:>8.3f} {r['step_min_s']:>7.3f} "
            f"{r['volume_s']:>9.3f} "
            f"{t_ratio:>7} {r['peak_mib']:>9.0f} {m_ratio:>6} {extra:>10}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CPU and CUDA if present"
    )
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--batch", type=int, default=2, help="volumes per step (the paper: 8 over 4 GPUs)")
    parser.add_argument("--slices", type=int, default=None, help="slices per volume (paper: 100)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5, quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2, quick 1)")
    parser.add_argument(
        "--quick", action="store_true", help="64x64 slices, 8 slices, a small ViT: a smoke run"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: torch's)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds over the settings")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per configuration")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        result = measure(Config(**json.loads(args.worker)))
        print("RESULT " + json.dumps(result), flush=True)
        return

    import torch

    if args.device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    else:
        devices = [args.device]
    for name in ("batch", "slices", "steps", "warmup", "threads"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            parser.error(f"--{name} must be positive, got {value}")
    slices = args.slices or (8 if args.quick else 100)
    steps = args.steps or (2 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)

    print(f"torch {torch.__version__}, python {sys.version.split()[0]}, batch {args.batch}, {slices} slices")
    if args.quick:
        print(f"quick mode: 64x64 slices, ViT {QUICK_VIT}")
    rows = []
    for device in devices:
        for model in args.models:
            size = 64 if args.quick else (214 if model == "resnet2d" else 224)
            settings = [s for s in args.settings if s in APPLIES[model]]
            results: dict[str, list[dict]] = {s: [] for s in settings}
            for _ in range(args.rounds):  # alternating: every setting once per round
                for setting in settings:
                    cfg = Config(
                        device, model, setting, args.batch, slices, size, steps, warmup, args.quick, args.threads
                    )
                    result = run_isolated(cfg, args.timeout)
                    results[setting].append(result)
                    name = result.get("device_name", "")
                    print(
                        f"  {device} {model} {setting}: {result.get('step_s', result.get('error'))} {name}",
                        flush=True,
                    )
            for setting in settings:
                cfg = Config(device, model, setting, args.batch, slices, size, steps, warmup, args.quick, args.threads)
                rows.append((cfg, _merge(results[setting])))
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
