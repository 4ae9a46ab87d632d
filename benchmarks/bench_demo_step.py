"""Demo training step, two checkouts side by side: seconds per step of each model, alternating base/new.

Each measurement is a fresh subprocess with ``PYTHONPATH`` set to one checkout (say a worktree of
``main`` and this one). It builds the demo profile's model from that checkout's ``ctlib.models`` (random
init, as the demo), its optimiser (``make_optimizer`` where the checkout has it, e.g. fused AdamW; else
plain AdamW with the profile's lr and weight decay) and, where the checkout has them, its
``accelerate`` (layout, compile) and ``to_device`` (float16 batches cast on the device);
then it runs ``--warmup`` untimed and ``--steps`` timed steps on a random batch of the demo's size
(8 volumes of 16x56x56). Runs alternate base, new, base, new, ... so that a shared CPU's load hits both
alike; the table gives the fastest step (``min``, the steadiest figure on a shared machine) and the
median of each side, and new/base ratios of both.

    git worktree add /tmp/base c58afff
    python benchmarks/bench_demo_step.py --base /tmp/base --new . --rounds 3
    python benchmarks/bench_demo_step.py --base /tmp/base --new . --set compile=true --models resnet2d
    python benchmarks/bench_demo_step.py --base . --new . --new-channels-last   # one change alone
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODELS = ("resnet2d", "vit3d", "fusion")


def measure(cfg: dict) -> dict:
    """One checkout's step time (runs in the worker process; ``ctlib`` comes from its PYTHONPATH)."""
    import torch
    import torch.nn.functional as F

    from ctlib import train as T
    from ctlib.models import build_model
    from ctlib.profiles import get_profile

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    profile = get_profile("demo", **cfg["overrides"])
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = build_model(profile, cfg["model"], 1.0, pretrained=False).to(device).train()
    start = time.perf_counter()
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if hasattr(T, "accelerate"):
        model = T.accelerate(model, profile, device)
    if hasattr(T, "make_optimizer"):  # the checkout's own optimiser (fused AdamW where it has it)
        opt = T.make_optimizer(model, profile, device)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=profile.lr, weight_decay=profile.weight_decay)
    s, h, w = profile.num_slices, *profile.image_size(cfg["model"])[1::-1]
    batch = (torch.rand(profile.batch_size, s, h, w) * 2 - 1).half()  # the cache's dtype
    y = (torch.rand(profile.batch_size, 18) < 0.3).float()

    def step() -> None:
        x = T.to_device(batch, device) if hasattr(T, "to_device") else batch.float()
        loss = F.binary_cross_entropy_with_logits(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    first = time.perf_counter() - start
    for _ in range(cfg["warmup"]):
        step()
    times = []
    for _ in range(cfg["steps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"times": times, "first_s": first, "threads": torch.get_num_threads()}


def run(root: str, cfg: dict, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(root)}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=os.path.abspath(root))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": ((proc.stderr or proc.stdout).strip().splitlines() or ["no output"])[-1][:160]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="checkout measured as the baseline (e.g. a worktree of main)")
    p.add_argument("--new", help="checkout measured against it")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--rounds", type=int, default=2, help="base/new pairs per model")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="profile override for the new side only, e.g. compile=true")
    p.add_argument("--new-channels-last", action="store_true", help="channels-last model on the new side")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(measure(json.loads(args.worker))), flush=True)
        return
    if not (args.base and args.new):
        p.error("--base and --new are required")
    overrides = dict(item.split("=", 1) for item in args.overrides)
    lines = [f"{'model':<9} {'base min':>9} {'new min':>8} {'min x':>6} {'base med':>9} {'new med':>8} "
             f"{'med x':>6} {'new 1st':>8}"]
    for model in args.models:
        times: dict[str, list[float]] = {"base": [], "new": []}
        first = []
        for r in range(args.rounds):
            for side in ("base", "new"):
                cfg = {"model": model, "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
                       "overrides": overrides if side == "new" else {},
                       "channels_last": side == "new" and args.new_channels_last}
                res = run(getattr(args, side), cfg, args.timeout)
                if "error" in res:
                    raise SystemExit(f"{model} {side}: {res['error']}")
                times[side] += res["times"]
                if side == "new":
                    first.append(res["first_s"])
                print(f"  round {r + 1} {model} {side}: min {min(res['times']):.3f} s "
                      f"({res['threads']} threads, first step {res['first_s']:.1f} s)", flush=True)
        b, n = times["base"], times["new"]
        lines.append(f"{model:<9} {min(b):>9.3f} {min(n):>8.3f} {min(b) / min(n):>6.2f} "
                     f"{statistics.median(b):>9.3f} {statistics.median(n):>8.3f} "
                     f"{statistics.median(b) / statistics.median(n):>6.2f} {min(first):>8.1f}")
    print("\nseconds per demo training step (x: base/new, > 1 is faster)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
