"""The GPU check behind ``benchmarks/gpu_check.sh``: one report (JSON and Markdown) on a machine with a GPU.

Sections:

1. environment: torch, CUDA and cuDNN versions, the GPU's name and memory;
2. models: each of ResNet2D, ViT3D and Fusion built by ``ctlib.models.build_model`` at the profile's sizes
   (``paper``: ResNet 100 x 214 x 214, ViT and fusion 100 x 224 x 224, batch 8 on one device, bf16
   autocast on CUDA), eager and ``torch.compile``-d: training volumes per second (forward, BCE, backward,
   AdamW step; median of the timed steps, each ending in a device synchronisation) and peak memory;
3. a fusion run through the real commands, each timed: a synthetic snapshot written at CT-RATE's resolution
   (512 x 512 x 240 int16 ``.nii.gz``; ``ctlib.synthetic.generate``), ``python -m ctlib.prepare``, and one
   short epoch of ``torchrun ... -m ctlib.train --profile paper`` with its evaluation;
4. a two-process NCCL all-reduce when more than one GPU is visible.

The target it reports against: fusion training at >= 30 volumes/s on one H200 at the paper's sizes. ImageNet
weights cannot be downloaded on an offline machine, so the ResNet starts from random weights (``--set
weights=null --set allow_random_init=true``); the speed is the same.

    python benchmarks/gpu_check.py --out gpu_check/                 # one GPU: the paper's sizes
    python benchmarks/gpu_check.py --device cpu --quick             # CPU, small sizes: proves it end to end
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_VOL_S = 30.0  # fusion training volumes/s on one H200 at the paper's sizes
RUN_SETTINGS = {  # the fusion run: snapshot, profile, bounded epoch
    False: dict(profile="paper", patients=12, shape=(512, 512, 240), spacing=(0.7, 0.7, 1.5), steps=10),
    True: dict(profile="smoke", patients=12, shape=(64, 64, 24), spacing=(5.5, 5.5, 10.0), steps=2),
}


def environment(device: str) -> dict:
    import torch

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "python": platform.python_version(), "host": platform.node(), "device": device,
           "gpus_visible": torch.cuda.device_count() if torch.cuda.is_available() else 0,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    else:
        env.update(gpu=None, cpu_threads=torch.get_num_threads())
    return env


def time_model(profile, model: str, device: str, compiled: bool, steps: int, warmup: int) -> dict:
    """Training volumes/s and peak memory of one model, eager or compiled. Input (B, S, H, W) random."""
    import torch
    import torch.nn.functional as F

    from ctlib.models import build_model

    torch.manual_seed(0)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    net = build_model(profile, model, pretrained=False).to(dev).train()
    opt = torch.optim.AdamW(net.parameters(), lr=profile.lr, weight_decay=profile.weight_decay)
    fwd = torch.compile(net) if compiled else net
    h, w = profile.image_size(model)[:2]  # (X, Y, Z) crop target; num_slices centre slices are kept
    x = torch.rand(profile.batch_size, profile.num_slices, h, w, device=dev) * 2 - 1
    y = (torch.rand(profile.batch_size, 18, device=dev) < 0.3).float()
    bf16 = profile.bf16 and dev.type == "cuda"

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.binary_cross_entropy_with_logits(fwd(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()  # device synchronisation

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    out = {"model": model, "mode": "compiled" if compiled else "eager", "batch": profile.batch_size,
           "input": [profile.num_slices, h, w], "bf16": bf16, "step_s": step_s, "warmup_s": warm_s,
           "volumes_per_s": profile.batch_size / step_s}
    if dev.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process high-water mark
    torch._dynamo.reset()  # the models' memory is freed when this returns
    return out


def models_section(profile, device: str, quick: bool, compile_too: bool) -> list[dict]:
    rows = []
    for model in ("resnet2d", "vit3d", "fusion"):
        for compiled in ((False, True) if compile_too else (False,)):
            try:
                rows.append(time_model(profile, model, device, compiled, steps=2 if quick else 10,
                                       warmup=1 if quick else 3))
            except Exception as err:  # e.g. out of memory, or no compiler: reported, the check goes on
                rows.append({"model": model, "mode": "compiled" if compiled else "eager",
                             "error": f"{type(err).__name__}: {str(err)[:300]}"})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _timed(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` (its output to ``log``); seconds. Raises with the log's tail on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {res.returncode}); {log}:\n"
                           + "".join(log.read_text().splitlines(True)[-20:]))
    return time.perf_counter() - t0


def fusion_run(work: Path, device: str, quick: bool, workers: int) -> dict:
    """Generation, preparation, one short epoch and evaluation of a fusion run, through the real commands."""
    from ctlib import synthetic

    s = RUN_SETTINGS[quick]
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data, out = work / "snapshot", work / "run"
    t0 = time.perf_counter()
    synthetic.generate(data, n_patients=s["patients"], shape=s["shape"], spacing=s["spacing"], seed=0,
                       workers=workers, progress=False)
    gen_s = time.perf_counter() - t0
    common = ["--profile", s["profile"], "--data-root", str(data), "--work-dir", str(work / "work")]
    prep_s = _timed([sys.executable, "-m", "ctlib.prepare", *common, "--workers", str(workers), "--no-progress"],
                    work / "prepare.log")
    sets = ["weights=null", "allow_random_init=true", "epochs=1", f"max_steps_per_epoch={s['steps']}",
            f"num_workers={min(4, workers)}", "bootstrap=100"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
           "ctlib.train", *common, "--model", "fusion", "--out", str(out), "--no-progress"]
    for item in sets:
        cmd += ["--set", item]
    train_s = _timed(cmd, work / "train.log")
    hist = (out / "history.csv").read_text().splitlines()
    epoch_s = float(dict(zip(hist[0].split(","), hist[1].split(","), strict=True))["seconds"])
    metrics = json.loads((out / "metrics.json").read_text())
    volumes = len(list((data / "dataset").rglob("*.nii.gz")))
    return {"profile": s["profile"], "patients": s["patients"], "volumes": volumes, "shape_xyz": list(s["shape"]),
            "spacing_mm": list(s["spacing"]), "max_steps_per_epoch": s["steps"], "overrides": sets,
            "generate_s": gen_s, "prepare_s": prep_s, "prepare_s_per_volume": prep_s / max(volumes, 1),
            "train_and_evaluate_s": train_s, "epoch_s": epoch_s,
            "test_auroc": metrics.get("auroc"),
            "total_s": gen_s + prep_s + train_s, "logs": [str(work / "prepare.log"), str(work / "train.log")]}


def nccl_worker() -> None:
    """One rank of the NCCL check (under torchrun): all-reduce 256 MiB, check the sum, time it."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    x = torch.full((64 * 2**20,), float(rank + 1), device="cuda")
    dist.all_reduce(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / 5
    want = float(sum(range(1, world + 1))) * world**5
    ok = bool(torch.allclose(x[:16], torch.full_like(x[:16], want), rtol=1e-3))
    if rank == 0:
        print("NCCL " + json.dumps({"world": world, "ok": ok, "allreduce_256mib_s": seconds,
                                    "bus_gb_s": 2 * (world - 1) / world * x.numel() * 4 / seconds / 1e9}))
    dist.destroy_process_group()


def nccl_section() -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).resolve()), "--nccl-worker"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    for line in res.stdout.splitlines():
        if line.startswith("NCCL "):
            return json.loads(line[5:])
    return {"ok": False, "error": (res.stdout + res.stderr)[-1500:]}


def verdict(report: dict) -> str:
    fusion = [r for r in report["models"] if r["model"] == "fusion" and "volumes_per_s" in r]
    best = max((r["volumes_per_s"] for r in fusion), default=0.0)
    if report["environment"]["device"] != "cuda" or report["quick"]:
        return (f"not comparable: {report['environment']['device']}"
                f"{' at quick sizes' if report['quick'] else ''} (fusion {best:.2f} volumes/s); the target, "
                f">= {TARGET_VOL_S:g} volumes/s, concerns one H200 at the paper's sizes")
    ok = "MEETS" if best >= TARGET_VOL_S else "BELOW"
    return f"{ok} the target: fusion training {best:.1f} volumes/s (best of eager/compiled) vs >= {TARGET_VOL_S:g}"


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = ["# ctlib GPU check", "", f"- date: {env['date']}, host {env['host']}, Python {env['python']}",
             f"- torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}",
             f"- device: {env['device']}" + (f", {env['gpu']} ({env['gpu_memory_gib']} GiB), "
                                             f"{env['gpus_visible']} visible" if env.get("gpu") else
                                             f" ({env.get('cpu_threads')} threads)"),
             f"- profile {report['profile']}{' (quick: small sizes)' if report['quick'] else ''}; ResNet "
             "weights: random init (ImageNet weights cannot be downloaded offline; same speed)",
             f"- **{report['verdict']}**", "", "## Training step per model (batch of the profile, one device)", "",
             "| model | mode | input (S, H, W) | bf16 | volumes/s | step s | warm-up s | peak MiB |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in report["models"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | error: {r['error'][:120]} | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['mode']} | {tuple(r['input'])} | {r['bf16']} | {r['volumes_per_s']:.2f} "
                     f"| {r['step_s']:.3f} | {r['warmup_s']:.1f} | {r['peak_mib']:.0f} |")
    if report["environment"]["device"] != "cuda":
        lines.append("\nPeak memory on the CPU is the process's RSS high-water mark (cumulative).")
    run = report.get("fusion_run")
    lines += ["", "## Fusion run through the real commands", ""]
    if run and "error" not in run:
        lines += [f"{run['volumes']} volumes of {run['patients']} patients written at {tuple(run['shape_xyz'])} "
                  f"voxels ({tuple(run['spacing_mm'])} mm), profile `{run['profile']}`, one epoch of at most "
                  f"{run['max_steps_per_epoch']} steps (`--set {' --set '.join(run['overrides'])}`).", "",
                  "| phase | seconds |", "|---|---:|",
                  f"| generation (ctlib.synthetic.generate) | {run['generate_s']:.1f} |",
                  f"| preparation (python -m ctlib.prepare) | {run['prepare_s']:.1f} "
                  f"({run['prepare_s_per_volume']:.2f} per volume) |",
                  f"| training + evaluation (torchrun -m ctlib.train) | {run['train_and_evaluate_s']:.1f} |",
                  f"| of which the epoch (train + validation) | {run['epoch_s']:.1f} |",
                  f"| total | {run['total_s']:.1f} |", "",
                  f"Test AUROC of this tiny run (meaningless, proves the pipeline): {run['test_auroc']}"]
    else:
        lines.append(f"skipped or failed: {run}")
    lines += ["", "## Two-process NCCL", "", f"{report['nccl']}", "",
              f"Total time of the check: {report['seconds']:.0f} s"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--quick", action="store_true", help="small sizes (smoke profile): proves the check works")
    p.add_argument("--out", default="gpu_check", help="report folder (report.json, report.md, logs)")
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument("--no-run", action="store_true", help="skip the fusion run")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="generation/preparation")
    p.add_argument("--nccl-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.nccl_worker:
        nccl_worker()
        return 0
    import torch

    from ctlib.profiles import get_profile

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU (torch.cuda.is_available() is False)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    name = RUN_SETTINGS[args.quick]["profile"]
    profile = get_profile(name, weights=None, allow_random_init=True)
    report = {"environment": environment(device), "profile": name, "quick": args.quick}
    print(json.dumps(report["environment"]), flush=True)
    report["models"] = models_section(profile, device, args.quick, not args.no_compile)
    try:
        report["fusion_run"] = None if args.no_run else fusion_run(out / "fusion-run", device, args.quick,
                                                                    args.workers)
    except Exception as err:
        report["fusion_run"] = {"error": str(err)[-2000:]}
    print(json.dumps(report["fusion_run"]), flush=True)
    gpus = report["environment"]["gpus_visible"]
    report["nccl"] = nccl_section() if device == "cuda" and gpus > 1 else f"skipped: {gpus} GPU(s) visible"
    report["seconds"] = time.perf_counter() - t0
    report["verdict"] = verdict(report)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "report.md").write_text(markdown(report))
    print(markdown(report))
    print(f"report: {out / 'report.md'} and {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
