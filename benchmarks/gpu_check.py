"""The GPU check behind ``benchmarks/gpu_check.sh``: does the training loop reach the speed target here?

It measures the loop training runs, at the ``paper`` profile, on the GPUs of this machine:

1. environment: torch, CUDA, cuDNN, the driver and every visible GPU (``nvidia-smi``); without a GPU that
   torch can use it stops at once with the cause and the fix (``ctlib.gpu``), never falling back to the CPU;
2. model FLOPs: forward and backward per volume of each model at the profile's sizes, counted by
   ``torch.utils.flop_counter`` on the meta device (no GPU time), and the memory each should peak at
   (``ctlib.memory.estimate``);
3. data: a small synthetic snapshot (``ctlib.synthetic``) prepared into the profile's cache
   (``ctlib.prepare.prepare_profile``, the function behind ``python -m ctlib.prepare``: the cache the
   training reads);
4. the loop, one section per model: ``torchrun`` with one process per visible GPU (DDP when more than one),
   volumes from the cache through the DataLoader (worker processes, pinned memory), the paper's global batch
   of 8 (``ctlib.batching``), fused AdamW, bf16 autocast, eager as training runs it, ``ctlib.train.train_epoch``
   itself: 5 warm-up steps, then at least 50 timed steps. Reported: steady-state training volumes/s,
   peak memory per GPU (allocated and reserved, against the estimate), the share of the timed time spent
   waiting for the DataLoader, GPU utilisation (``nvidia-smi`` sampled every 250 ms) and model FLOP
   utilisation (MFU: model FLOPs per second over the GPU's dense bf16 peak);
5. ``torch.compile`` of the fusion, only with ``--compile``;
6. a two-process NCCL all-reduce when more than one GPU is visible.

The verdict names the GPU and compares the fusion's volumes/s with the target at the paper profile: >= 40 on
one H100, >= 45 on one H200 (about 4.2 TFLOP per volume forward and backward, so 40 volumes/s is ~17% of an
H100's dense bf16 peak). Each section has a time budget and the whole check stays within 8 minutes; a section
that would overrun is cut and reported so. ResNet weights are random (an offline machine cannot download
ImageNet's; the speed is the same).

    python benchmarks/gpu_check.py --out gpu_check/               # the GPUs of this machine, paper profile
    python benchmarks/gpu_check.py --device cpu --quick           # CPU, smoke sizes: proves it end to end
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("resnet2d", "vit3d", "fusion")
TOTAL_BUDGET_S = 480.0  # the whole check
BUDGET_S = {"environment": 20, "flops": 25, "data": 100, "resnet2d": 85, "vit3d": 85, "fusion": 110, "nccl": 40,
            "compile": 240}
TARGETS = {"H200": 45.0, "H100": 40.0}  # fusion training volumes/s on one GPU at the paper profile
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), by a part of the GPU's name (first match wins).
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("GH200", 989.0),
               ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0))
SETTINGS = {  # profile, synthetic snapshot, timed steps
    False: dict(profile="paper", patients=16, shape=(160, 160, 110), spacing=(1.5, 1.5, 2.0), warmup=5, steps=50),
    True: dict(profile="smoke", patients=12, shape=(64, 64, 24), spacing=(5.5, 5.5, 10.0), warmup=1, steps=3),
}


def check_profile(quick: bool, work: Path, device: str, workers: int):
    """The profile every section uses: paper (or smoke), random ResNet weights, the check's own snapshot."""
    from ctlib.profiles import get_profile

    s = SETTINGS[quick]
    return get_profile(s["profile"], work_dir=str(work), weights=None, allow_random_init=True, device=device,
                       synthetic_patients=s["patients"], synthetic_shape=s["shape"], synthetic_spacing=s["spacing"],
                       num_workers=workers, prepare_workers=max(1, os.cpu_count() or 1))


# ---------------------------------------------------------------------------------------------------------
# sections run in this process
# ---------------------------------------------------------------------------------------------------------
def environment(device: str) -> dict:
    import torch

    from ctlib import gpu

    smi = gpu.query_nvidia_smi()
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "python": platform.python_version(), "host": platform.node(), "device": device,
           "driver": smi.driver if smi else None, "nvidia_smi_gpus": [list(g) for g in smi.gpus] if smi else [],
           "gpus_visible": torch.cuda.device_count() if device == "cuda" else 0,
           "cpu_cores": os.cpu_count(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}")
    else:
        env.update(gpu=None)
    return env


def model_flops(profile, model: str) -> float:
    """FLOPs of one training volume (forward + backward) at the profile's sizes, on the meta device.

    Convolutions' backward is counted as twice their forward (the input's and the weight's gradients):
    ``torch.utils.flop_counter`` counts a grouped convolution's weight gradient over every input channel,
    which makes the ViT's depthwise PEG (groups = dim) look like 2.2 TFLOP a volume instead of ~0.01. The
    ResNet's first convolution needs no input gradient, so this over-counts it by ~0.007 TFLOP.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ctlib.models import build_model

    with torch.device("meta"):
        net = build_model(profile, model, pretrained=False).train()
        x2, y2, _ = profile.image_size(model)
        x = torch.zeros(1, profile.num_slices, y2, x2)
    with FlopCounterMode(display=False) as counter:
        net(x).float().sum().backward()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    backward = by_op.pop("aten.convolution_backward", 0)
    return float(sum(by_op.values()) + (2 * by_op.get("aten.convolution", 0) if backward else 0))


def peak_tflops(gpu_name: str | None) -> float | None:
    for part, peak in PEAK_TFLOPS:
        if gpu_name and part in gpu_name:
            return peak
    return None


def target_for(gpu_name: str | None) -> tuple[str, float] | None:
    for part, target in TARGETS.items():
        if gpu_name and part in gpu_name:
            return part, target
    return None


def _run(cmd: list[str], log: Path, timeout: float) -> tuple[int | None, float]:
    """Run ``cmd`` with its output in ``log``; (exit status or None when cut at ``timeout``, seconds)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
        try:
            code = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the whole torchrun group, workers included
            proc.wait()
            code = None
    return code, time.perf_counter() - t0


def _tail(log: Path, n: int = 15) -> str:
    try:
        return "".join(log.read_text().splitlines(True)[-n:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------------------
# the loop, inside torchrun (one process per GPU)
# ---------------------------------------------------------------------------------------------------------
class TimedLoader:
    """A DataLoader whose iteration counts the seconds spent waiting for the next batch."""

    def __init__(self, loader) -> None:
        self.loader, self.wait = loader, 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        it = iter(self.loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t0
            yield batch


class UtilisationSampler:
    """GPU utilisation of this node, sampled by ``nvidia-smi -lms 250`` between :meth:`start` and :meth:`stop`."""

    def __init__(self) -> None:
        self.proc, self.lines, self.thread = None, [], None

    def start(self) -> None:
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return
        self.proc = subprocess.Popen([exe, "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits",
                                      "-lms", "250"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.thread = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.thread.start()

    def stop(self) -> dict[str, float] | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        self.proc.wait()
        self.thread.join(timeout=2)
        per_gpu: dict[str, list[float]] = {}
        for line in self.lines:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2 and parts[1].replace(".", "").isdigit():
                per_gpu.setdefault(parts[0], []).append(float(parts[1]))
        return {k: sum(v) / len(v) for k, v in per_gpu.items() if v} or None


def loop_worker(args: argparse.Namespace) -> None:
    """One rank of a loop section: ``train_epoch`` over the cache; rank 0 writes the result JSON."""
    import torch
    from torch.utils.data import Subset

    from ctlib import distributed as dist_utils
    from ctlib.batching import GlobalBatchSampler, Weighted, plan_batches
    from ctlib.cache import PreparedVolumes
    from ctlib.models import build_model
    from ctlib.predict import make_loader
    from ctlib.prepare import load_run_data
    from ctlib.runs import RunSpec
    from ctlib.train import Training, channels_last, compile_model, make_optimizer, train_epoch

    s = SETTINGS[args.quick]
    profile = check_profile(args.quick, Path(args.work), args.device, args.workers)
    if args.compile:
        profile = profile.__class__(**{**profile.__dict__, "compile": True})
    data = load_run_data(profile, args.model)
    dataset = PreparedVolumes(data.cache_dir, data.cohort, data.shape, float16=True)
    rank, world, device = dist_utils.setup(device=args.device)
    plan = plan_batches(profile.batch_size, world, profile.per_gpu_batch)
    steps = s["warmup"] + s["steps"]
    needed = steps * plan.global_batch
    repeated = Subset(dataset, [i % len(dataset) for i in range(needed)])  # the cache, read over and over
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    net = channels_last(build_model(profile, args.model, RunSpec(profile, args.model).alpha).to(device), device)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    net = compile_model(net, profile, world)
    opt = make_optimizer(net, profile, device)
    t = Training(net, opt, None, [], device=device)
    sampler = GlobalBatchSampler(len(repeated), plan, rank, seed=0, max_steps=steps, fixed_size=profile.compile)
    loader = TimedLoader(make_loader(Weighted(repeated), batch_sampler=sampler, device=device,
                                 num_workers=profile.num_workers))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    util = UtilisationSampler() if rank == 0 and device.type == "cuda" else None
    marks: dict[str, float] = {}

    def on_step(step: int) -> None:
        if step == s["warmup"] - 1:  # warm-up done: cuDNN's choices made, workers running, allocator warm
            sync()
            marks.update(t0=time.perf_counter(), wait0=loader.wait, warm=time.perf_counter() - start)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            if util:
                util.start()
        elif step == steps - 1:
            sync()
            marks.update(t1=time.perf_counter(), wait1=loader.wait)

    start = time.perf_counter()
    train_epoch(t, loader, 0, profile=profile, device=device, progress=False, plan=plan, on_step=on_step)
    seconds = marks["t1"] - marks["t0"]
    wait = (marks["wait1"] - marks["wait0"]) / seconds
    if device.type == "cuda":
        peak = [torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30]
    else:
        peak = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, float("nan")]
    views = [(peak, wait)]
    if world > 1:
        views = [None] * world
        torch.distributed.all_gather_object(views, (peak, wait))
    utilisation = util.stop() if util else None
    if rank == 0:
        result = {"model": args.model, "mode": "compiled" if profile.compile else "eager", "world": world,
                  "plan": plan.to_dict(), "input": [profile.num_slices, *profile.image_size(args.model)[:2][::-1]],
                  "bf16": profile.bf16 and device.type == "cuda", "timed_steps": s["steps"],
                  "warmup_s": marks["warm"], "timed_s": seconds,
                  "volumes_per_s": s["steps"] * plan.global_batch / seconds,
                  "peak_allocated_gib": max(v[0][0] for v in views), "peak_reserved_gib": max(v[0][1] for v in views),
                  "loader_wait_fraction": max(v[1] for v in views), "gpu_utilisation_pct": utilisation,
                  "loader_workers": profile.num_workers}
        Path(args.result).write_text(json.dumps(result) + "\n")
    dist_utils.teardown()


def loop_section(model: str, args: argparse.Namespace, out: Path, nproc: int, timeout: float,
                 compiled: bool = False) -> dict:
    result = out / f"loop-{model}{'-compiled' if compiled else ''}.json"
    log = result.with_suffix(".log")
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(Path(__file__).resolve()), "--loop-worker", "--model", model, "--work", str(out / "work"),
           "--result", str(result), "--device", args.device, "--workers", str(args.loader_workers)]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--compile"] if compiled else []
    code, seconds = _run(cmd, log, timeout)
    if code is None:
        return {"model": model, "mode": "compiled" if compiled else "eager",
                "error": f"cut at its time budget of {timeout:.0f} s; log {log}:\n{_tail(log)}"}
    if code != 0 or not result.is_file():
        return {"model": model, "mode": "compiled" if compiled else "eager",
                "error": f"exit status {code}; log {log}:\n{_tail(log)}"}
    return {**json.loads(result.read_text()), "section_s": seconds}


def data_section(args: argparse.Namespace, out: Path, timeout: float) -> dict:
    """Generate the synthetic snapshot and prepare the profile's caches, in a subprocess with a deadline."""
    log = out / "data.log"
    code, seconds = _run([sys.executable, str(Path(__file__).resolve()), "--data-worker", "--work", str(out / "work"),
                          "--device", args.device] + (["--quick"] if args.quick else []), log, timeout)
    if code != 0:
        return {"error": ("cut at its time budget" if code is None else f"exit status {code}") + f"; {_tail(log)}"}
    return {**json.loads((out / "work" / "data.json").read_text()), "section_s": seconds}


def data_worker(args: argparse.Namespace) -> None:
    from ctlib.prepare import prepare_profile

    profile = check_profile(args.quick, Path(args.work), args.device, 0)
    t0 = time.perf_counter()
    prepared = prepare_profile(profile, progress=False)
    s = SETTINGS[args.quick]
    info = {"profile": profile.name, "patients": s["patients"], "volumes": len(prepared.split.cohort),
            "written_xyz": list(s["shape"]), "seconds": time.perf_counter() - t0}
    (Path(args.work) / "data.json").write_text(json.dumps(info) + "\n")


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


def nccl_section(out: Path, timeout: float) -> dict:
    log = out / "nccl.log"
    code, _ = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(Path(__file__).resolve()), "--nccl-worker"], log, timeout)
    for line in log.read_text().splitlines():
        if line.startswith("NCCL "):
            return json.loads(line[5:])
    return {"ok": False, "error": f"exit status {code}: {_tail(log)}"}


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------
def verdict(report: dict) -> str:
    env = report["environment"]
    fusion = next((r for r in report["loops"] if r["model"] == "fusion" and r.get("mode") == "eager"
                   and "volumes_per_s" in r), None)
    if fusion is None:
        return "NO RESULT: the fusion's loop did not finish (see its section)"
    vps, world = fusion["volumes_per_s"], fusion["world"]
    flops = report["flops_per_volume"].get("fusion")
    where = f"{world} x {env['gpu']}" if env.get("gpu") else f"{env['device']}"
    mfu = ""
    peak = peak_tflops(env.get("gpu"))
    if flops and peak:
        mfu = (f"; MFU {vps * flops / world / (peak * 1e12):.1%} of {peak:g} TFLOP/s dense bf16 per GPU "
               f"({flops / 1e12:.2f} TFLOP per volume forward and backward)")
    elif flops:
        mfu = f"; {flops / 1e12:.2f} TFLOP per volume forward and backward (no known peak for this GPU: no MFU)"
    line = (f"fusion {vps:.1f} volumes/s training on {where} (eager, "
            f"{'bf16' if fusion['bf16'] else 'fp32'}, global batch {fusion['plan']['effective_batch']}){mfu}")
    if env["device"] != "cuda" or report["quick"]:
        return f"NOT COMPARABLE ({env['device']}{', quick sizes' if report['quick'] else ''}): {line}"
    target = target_for(env.get("gpu"))
    if target is None:
        return f"NO TARGET for {env['gpu']} (targets: >= 40 on one H100, >= 45 on one H200): {line}"
    per_gpu = vps / world
    ok = "MEETS" if per_gpu >= target[1] else "BELOW"
    return f"{ok} the target of >= {target[1]:g} volumes/s per {target[0]} ({per_gpu:.1f} per GPU): {line}"


def markdown(report: dict) -> str:
    env = report["environment"]
    gpus = "; ".join(f"{n} ({m})" for n, m in env["nvidia_smi_gpus"]) or "none"
    lines = ["# ctlib GPU check", "", f"- date: {env['date']}, host {env['host']}, Python {env['python']}, "
             f"{env['cpu_cores']} CPU cores",
             f"- torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, driver {env['driver']}; "
             f"nvidia-smi: {gpus}",
             f"- device: {env['device']}" + (f", {env['gpu']} ({env['gpu_memory_gib']} GiB, capability "
                                             f"{env['capability']}), {env['gpus_visible']} visible"
                                             if env.get("gpu") else ""),
             f"- profile {report['profile']}{' (quick: smoke sizes)' if report['quick'] else ''}; ResNet weights: "
             "random (ImageNet's cannot be downloaded offline; the same speed)",
             f"- **{report['verdict']}**", "",
             "## Training loop per model (train_epoch over the prepared cache, DataLoader workers, pinned memory)", "",
             "| model | mode | GPUs | per-GPU batch x steps | input (S, H, W) | bf16 | volumes/s | TFLOP/vol | MFU "
             "| peak GiB (alloc / reserved / estimated) | loader wait | GPU util % | warm-up s |",
             "|---|---|---:|---|---|---|---:|---:|---:|---|---:|---|---:|"]
    peak = peak_tflops(env.get("gpu"))
    for r in report["loops"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | error: {r['error'].splitlines()[0][:150]} "
                         "| | | | | | | | | | |")
            continue
        flops = report["flops_per_volume"].get(r["model"])
        mfu = f"{r['volumes_per_s'] * flops / r['world'] / (peak * 1e12):.1%}" if flops and peak else "-"
        est = report["memory_estimate_gib"].get(r["model"])
        util = ", ".join(f"{v:.0f}" for v in r["gpu_utilisation_pct"].values()) if r["gpu_utilisation_pct"] else "-"
        lines.append(f"| {r['model']} | {r['mode']} | {r['world']} | {r['plan']['per_rank_batch']} x "
                     f"{r['plan']['accumulation_steps']} | {tuple(r['input'])} | {r['bf16']} | {r['volumes_per_s']:.2f} "
                     f"| {flops / 1e12 if flops else float('nan'):.2f} | {mfu} | {r['peak_allocated_gib']:.1f} / "
                     f"{r['peak_reserved_gib']:.1f} / {est:.1f} | {r['loader_wait_fraction']:.1%} | {util} "
                     f"| {r['warmup_s']:.1f} |")
    if env["device"] != "cuda":
        lines.append("\nOn the CPU the peak is the process's RSS high-water mark (GiB), not comparable with the "
                     "estimate for a GPU.")
    data = report.get("data", {})
    lines += ["", "## Data", "", (f"{data['volumes']} volumes of {data['patients']} synthetic patients written at "
                                  f"{tuple(data['written_xyz'])} voxels and prepared in {data['seconds']:.1f} s; the "
                                  "loop reads them over and over (from the page cache after the first pass)"
                                  if "volumes" in data else f"{data}")]
    lines += ["", "## Two-process NCCL", "", f"{report['nccl']}", "", "## Time per section (s, budget)", ""]
    lines += [f"- {k}: {v:.0f} of {BUDGET_S.get(k, 0)}" for k, v in report["section_s"].items()]
    lines += ["", f"Total time of the check: {report['seconds']:.0f} s (budget {TOTAL_BUDGET_S:.0f} s)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (default; stops at once without a usable GPU) or cpu (with --quick: tests)")
    p.add_argument("--quick", action="store_true", help="smoke sizes, 3 timed steps: proves the check works")
    p.add_argument("--out", default="gpu_check", help="report folder (report.json, report.md, logs)")
    p.add_argument("--compile", action="store_true", help="also time the fusion under torch.compile (~4 min)")
    p.add_argument("--models", default=",".join(MODELS), help="models to time, comma-separated")
    p.add_argument("--loader-workers", type=int, default=None,
                   help="DataLoader workers per process (default: the profile's)")
    for hidden in ("--loop-worker", "--data-worker", "--nccl-worker"):
        p.add_argument(hidden, action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.nccl_worker:
        nccl_worker()
        return 0
    if args.data_worker:
        data_worker(args)
        return 0
    if args.loop_worker:
        loop_worker(args)
        return 0

    from ctlib import gpu

    if args.device == "cuda":
        try:
            gpu.resolve_device("cuda", profile="paper")
        except gpu.DeviceUnusable as err:
            raise SystemExit(f"gpu_check: {err}") from None
    import torch

    from ctlib.memory import estimate

    t_start = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    profile = check_profile(args.quick, out / "work", args.device, 0)
    if args.loader_workers is None:
        args.loader_workers = profile.__class__().num_workers if not args.quick else 2
    nproc = torch.cuda.device_count() if args.device == "cuda" else 1
    report: dict = {"profile": profile.name, "quick": args.quick, "section_s": {}}

    def left() -> float:
        return TOTAL_BUDGET_S - (time.perf_counter() - t_start)

    def timed(name: str, fn):
        t0 = time.perf_counter()
        value = fn(min(BUDGET_S[name], left()))
        report["section_s"][name] = time.perf_counter() - t0
        return value

    report["environment"] = timed("environment", lambda _t: environment(args.device))
    print(json.dumps(report["environment"]), flush=True)
    models = [m for m in args.models.split(",") if m]
    report["flops_per_volume"] = timed("flops", lambda _t: {m: model_flops(profile, m) for m in models})
    per_gpu = max(1, -(-profile.batch_size // nproc))
    report["memory_estimate_gib"] = {m: estimate(profile, m, per_gpu).total / 2**30 for m in models}
    report["data"] = timed("data", lambda t: data_section(args, out, t))
    print(json.dumps(report["data"]), flush=True)
    report["loops"] = []
    for model in models:
        if "error" in report["data"]:
            report["loops"].append({"model": model, "mode": "eager", "error": "no data (see the data section)"})
            continue
        if left() < 20:
            report["loops"].append({"model": model, "mode": "eager", "error": "skipped: the check's 8 minutes are spent"})
            continue
        report["loops"].append(timed(model, lambda t, m=model: loop_section(m, args, out, nproc, t)))
        print(json.dumps(report["loops"][-1]), flush=True)
    if args.compile and "fusion" in models and left() > 60:
        report["loops"].append(timed("compile", lambda t: loop_section("fusion", args, out, nproc, t, compiled=True)))
    report["nccl"] = (timed("nccl", lambda t: nccl_section(out, t)) if args.device == "cuda" and nproc > 1
                      else f"skipped: {nproc if args.device == 'cuda' else 0} GPU(s) visible")
    report["seconds"] = time.perf_counter() - t_start
    report["verdict"] = verdict(report)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "report.md").write_text(markdown(report))
    print(markdown(report))
    print(f"report: {out / 'report.md'} and {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
