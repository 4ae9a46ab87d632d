"""Training entry point (section 4.5): ``python -m ctlib.train`` or ``torchrun ... -m ctlib.train``.

One process per GPU under ``torchrun`` (DistributedDataParallel, NCCL) or one or more CPU processes
(gloo). BCEWithLogitsLoss, AdamW, ReduceLROnPlateau on the validation loss, best checkpoint by
validation loss, bf16 autocast on GPU. With ``bn_recalibration > 0`` the BatchNorm statistics of the
ResNet are recomputed on that many training volumes before each validation (see
:func:`ctlib.predict.recalibrate_batchnorm`). Rank 0 alone logs, draws progress bars and writes files.

The run folder (:mod:`ctlib.runs`) holds ``config.json``, ``history.csv``, ``splits.csv``, ``predictions.csv``
(test), ``val_predictions.csv``, ``features.npz`` (volume-level features of every volume, for the
latent-space figure; of the validation and test volumes only with ``--score eval``), ``metrics.json``,
``per_class_auroc.csv`` and ``checkpoints/{last,best}.pt``. A killed run restarted with the same command
resumes from its last completed epoch and ends as an uninterrupted run would; a finished run is not trained
again unless ``--redo`` (one finished with ``--score eval`` and asked for every volume only has its best
checkpoint score every volume, with the same metrics).

Example::

    python -m ctlib.train --profile smoke --model fusion --alpha learned --out runs/smoke/fusion
    python -m ctlib.prepare --profile paper --data-root /data/CT-RATE --workers 16   # once, before torchrun
    torchrun --nproc_per_node 4 -m ctlib.train --profile paper --model resnet2d \\
        --data-root /data/CT-RATE --out runs/paper/resnet2d

A single process prepares what is missing on first use; under torchrun with more than one process a
missing cache stops the run at once with the ``python -m ctlib.prepare`` command that prepares it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ctlib import atomic, gpu
from ctlib import distributed as dist_utils
from ctlib.batching import BatchPlan, GlobalBatchSampler, Weighted, plan_batches
from ctlib.cache import PreparedVolumes
from ctlib.distributed import NotShared, check_same_start, check_shared_folders
from ctlib.memory import OutOfMemory, estimate, oom_message
from ctlib.metrics import score
from ctlib.models import alpha_beta, build_model, unwrap
from ctlib.predict import bce, make_loader, predict, recalibrate_batchnorm, to_device
from ctlib.prepare import CacheNotReady, RunData, load_run_data, prepare_profile
from ctlib.profiles import CONTROL_MODELS, MODELS, Profile, get_profile, parse_overrides, validate
from ctlib.runs import (
    RunSpec,
    run_is_complete,
    scored_every_volume,
    write_config,
    write_history,
    write_results,
)
from ctlib.split import SplitMismatch

log = logging.getLogger("ctlib.train")


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
def run_data(profile: Profile, model: str, *, world: int, progress: bool = True) -> RunData:
    """Step 1, data, before any process group exists: the split and cache the run reads.

    A single process prepares what is missing (``prepare_profile``; notebooks and ``python -m ctlib.train``).
    Under torchrun with more than one process nothing long runs here: a missing or incomplete cache raises
    ``CacheNotReady`` at once with the command that prepares it.
    """
    if world == 1:
        try:
            return load_run_data(profile, model)
        except CacheNotReady as err:
            log.info("preparing the data first (%s)", str(err).splitlines()[0])
        prepare_profile(profile, progress=progress)
    return load_run_data(profile, model)


@dataclasses.dataclass
class Training:
    """The model, optimiser, scheduler and history of a run (step 2), resumed from ``last.pt`` if there."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    history: list[dict[str, float]]
    best_val: float = math.inf
    start_epoch: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The random state a resumed run needs: the CPU generator's and, on CUDA, this device's generator's."""
    state = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(saved: dict[str, Any], device: torch.device) -> None:
    """Undo :func:`rng_state` from a checkpoint; a CUDA state is restored only on a CUDA device."""
    torch.set_rng_state(saved["rng"])
    if device.type == "cuda" and "cuda_rng" in saved:
        torch.cuda.set_rng_state(saved["cuda_rng"], device)


def channels_last(model: nn.Module, device: torch.device) -> nn.Module:
    """Channels-last for the ResNet's convolutions on CUDA (cuDNN's fast NHWC kernels). Before the DDP wrap:
    DDP lays out its gradient buckets from the parameters as they are at wrap time."""
    if device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model = model.to(memory_format=torch.channels_last)
    return model


def _ddp_optimizer_refuses_checkpoints() -> bool:
    """True where torch's DDP graph splitting stops at activation checkpoints ("Found a higher order op",
    older torch); torch 2.14 splits around them."""
    from torch._dynamo.backends import distributed as ddp_optimizer  # noqa: PLC0415  (only with compile)

    return "Found a higher order op" in inspect.getsource(ddp_optimizer)


def compile_model(model: nn.Module, profile: Profile, world: int) -> nn.Module:
    """``torch.compile`` when ``profile.compile`` (after the DDP wrap); else ``model`` itself.

    Under DDP, compile splits the graph at DDP's gradient buckets so that the all-reduce overlaps the backward
    pass (``torch._dynamo.config.optimize_ddp``). A torch whose splitting refuses activation checkpoints
    ("Found a higher order op") gets the splitting turned off with ``gradient_checkpointing``: DDP then
    all-reduces after the compiled backward (less overlap, the same gradients).
    """
    if not profile.compile:
        return model
    if world > 1 and profile.gradient_checkpointing and _ddp_optimizer_refuses_checkpoints():
        torch._dynamo.config.optimize_ddp = False
        if dist_utils.is_main():
            log.info("compile + DDP + gradient checkpointing on torch %s: DDP graph splitting off "
                     "(optimize_ddp=False)", torch.__version__)
    return torch.compile(model)


def accelerate(model: nn.Module, profile: Profile, device: torch.device, world: int = 1) -> nn.Module:
    """Layout and compilation that change speed, not the model, for a model not wrapped in DDP:
    :func:`channels_last`, then :func:`compile_model`. Returns the model to train (the compiled wrapper
    shares its parameters with ``model``)."""
    return compile_model(channels_last(model, device), profile, world)


def make_optimizer(model: nn.Module, profile: Profile, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with the profile's rate and weight decay. One fused kernel per step instead of a handful of
    ops per parameter tensor (the same update up to float rounding), on CUDA and on CPU. On the demo's
    ResNet step on 2 CPU cores it made no measurable difference (benchmarks/bench_demo_step.py, fastest
    step 1.12-1.29 s before, 1.23-1.26 s after: the convolutions dominate)."""
    return torch.optim.AdamW(model.parameters(), lr=profile.lr, weight_decay=profile.weight_decay,
                             fused=device.type in ("cuda", "cpu"))


def build_training(spec: RunSpec, data: RunData, out: Path, device: torch.device, world: int) -> Training:
    """Step 2, model: build (seeded), wrap in DDP, and resume from ``out/checkpoints/last.pt`` when present."""
    profile = spec.profile
    torch.manual_seed(profile.seed)
    model = build_model(profile, spec.model, spec.alpha).to(device)
    if profile.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the same state dict keys and values
    model = channels_last(model, device)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    model = compile_model(model, profile, world)
    opt = make_optimizer(model, profile, device)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=profile.plateau_factor, patience=profile.plateau_patience)
    state = Training(model, opt, sched, [], device=device)
    last = out / "checkpoints" / "last.pt"
    if not last.exists():
        return state
    saved = torch.load(last, map_location="cpu", weights_only=True)
    fp = spec.fingerprint(data.key)
    if saved["fingerprint"] != fp:
        if saved.get("data_key", data.key) != data.key:
            raise RuntimeError(
                f"{out} was trained on another cohort or split (split file {data.split_path} and its "
                f"{len(data.excluded)} excluded volumes now give data key {data.key[:12]}, the run's is "
                f"{saved['data_key'][:12]}): resuming would mix test and training patients; use another --out, "
                "or --redo to discard it")
        raise RuntimeError(f"{out} holds a run with other settings (fingerprint {saved['fingerprint']} != {fp}); "
                           "use another --out, or --redo to discard it")
    unwrap(model).load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    state.history = list(saved["history"])
    state.best_val = float(saved["best_val_loss"])
    state.start_epoch = int(saved["epoch"]) + 1
    restore_rng_state(saved, device)
    if dist_utils.is_main():
        log.info("resuming %s from epoch %d", out, state.start_epoch + 1)
    return state


LOG_EVERY = 25  # training steps between reads of the loss on the host (progress bar, non-finite check)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The learning-rate multiplier of global optimisation step ``step`` (0-based): linear from
    1/warmup_steps to 1 over the first ``warmup_steps`` steps, then 1."""
    return 1.0 if step >= warmup_steps else (step + 1) / warmup_steps


def _check_finite(bad_step: torch.Tensor, epoch: int) -> None:
    """Raise, on every rank alike, when any rank saw a non-finite loss; ``bad_step`` is that rank's first bad
    0-based step, or -1 (a device tensor: reading it is the one host synchronisation)."""
    step = int(bad_step)
    if dist_utils.all_reduce_mean(0.0 if step < 0 else 1.0) > 0:
        where = f"step {step + 1} on rank {dist_utils.rank()}" if step >= 0 else "another rank"
        raise FloatingPointError(
            f"non-finite training loss at epoch {epoch + 1}, {where}: stopping; the checkpoints of the last good "
            f"epoch ({epoch}) are kept. Lower lr, or check the data")


def _no_sync(model: nn.Module, sync: bool) -> AbstractContextManager:
    """DDP's ``no_sync()`` (gradients accumulate locally) unless ``sync`` or not under DDP."""
    m = model
    while not isinstance(m, nn.parallel.DistributedDataParallel):
        if not hasattr(m, "_orig_mod"):
            return nullcontext()
        m = m._orig_mod
    return nullcontext() if sync else m.no_sync()


def train_epoch(t: Training, loader: DataLoader, epoch: int, *, profile: Profile, device: torch.device,
                progress: bool, plan: BatchPlan | None = None,
                on_step: Callable[[int], None] | None = None) -> float:
    """Step 3, one epoch of the loop; returns the mean training loss per volume over all ranks.

    ``loader`` yields this rank's micro-batches ``(volumes, labels, names, weights)``
    (:class:`ctlib.batching.GlobalBatchSampler` over :class:`ctlib.batching.Weighted`), ``plan.accumulation``
    per optimisation step. Each micro-batch's loss is ``world * sum(weight * per-volume BCE)``, so that after
    DDP's mean over ranks the gradient is the mean over the step's volumes; the gradients of all but the last
    micro-step stay local (``no_sync``).

    No host synchronisation per step: the loss sum (float64) and the first step with a non-finite loss stay on
    the device and are read every ``LOG_EVERY`` steps and at the end. With ``profile.warmup_steps`` the learning
    rate of global step g is scaled by :func:`warmup_factor`; the unscaled rate is restored at the end of the
    epoch, so ReduceLROnPlateau and checkpoints see it. ``on_step(step)`` is called after each optimisation
    step (the GPU check times the loop with it).

    Raises:
        FloatingPointError: a non-finite loss on any rank (every rank stops at the same check), naming the
            epoch and the first bad step; the checkpoints of the last good epoch stay as they are.
    """
    plan = plan or plan_batches(profile.batch_size, 1)
    world = dist_utils.world_size()
    use_bf16 = profile.bf16 and device.type == "cuda"
    t.model.train()
    total = torch.zeros((), dtype=torch.float64, device=device)
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    count = 0
    steps = len(loader) // plan.accumulation
    lrs = [g["lr"] for g in t.opt.param_groups]
    bar = tqdm(desc=f"epoch {epoch + 1}/{profile.epochs} train", leave=False, total=steps,
               disable=not (progress and dist_utils.is_main()))
    batches: Iterator = iter(loader)
    try:
        for step in range(steps):
            factor = warmup_factor(epoch * steps + step, profile.warmup_steps)
            for g, lr in zip(t.opt.param_groups, lrs, strict=True):
                g["lr"] = lr * factor
            t.opt.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), dtype=torch.float32, device=device)
            for micro in range(plan.accumulation):
                volumes, labels, _names, weights = next(batches)
                real = weights > 0
                count += int(real.sum())
                volumes, labels = to_device(volumes, device), labels.to(device, non_blocking=True)
                weights, real = weights.to(device, non_blocking=True), real.to(device, non_blocking=True)
                with _no_sync(t.model, sync=micro == plan.accumulation - 1):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                        logits = t.model(volumes)
                    per_volume = nn.functional.binary_cross_entropy_with_logits(
                        logits.float(), labels, reduction="none").mean(dim=1)
                    weighted = (per_volume * weights).sum()
                    (weighted * world).backward()
                step_loss += weighted.detach()
                total += (per_volume.detach().double() * real).sum()
            t.opt.step()
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(step_loss), step, bad_step)
            bar.update(1)
            if on_step is not None:
                on_step(step)
            if (step + 1) % LOG_EVERY == 0:
                _check_finite(bad_step, epoch)
                bar.set_postfix(loss=f"{float(total) / max(count, 1):.4f}")
        _check_finite(bad_step, epoch)
    finally:
        bar.close()
        for g, lr in zip(t.opt.param_groups, lrs, strict=True):
            g["lr"] = lr
    return dist_utils.all_reduce_mean(float(total)) / max(dist_utils.all_reduce_mean(float(count)), 1e-12)


def validate_epoch(t: Training, parts: dict[str, Subset], epoch: int, *, profile: Profile, device: torch.device,
                   progress: bool, per_rank: int) -> dict[str, float]:
    """Step 3, end of an epoch: BatchNorm recalibration, validation, scheduler; returns the history row."""
    recalibrate_batchnorm(t.model, parts["train"], profile.bn_recalibration, batch_size=per_rank, device=device,
                          seed=profile.seed * 1000 + epoch, num_workers=profile.num_workers)
    val = predict(t.model, parts["val"], batch_size=profile.eval_batch_size, device=device,
                  bf16=profile.bf16 and device.type == "cuda", progress=progress, desc=f"epoch {epoch + 1} val",
                  num_workers=profile.num_workers)
    val_loss = bce(val["logits"], val["labels"])
    t.sched.step(val_loss)
    alpha, beta = alpha_beta(t.model)
    return {"epoch": epoch + 1, "train_loss": math.nan, "val_loss": val_loss,
            "val_auroc": float(score(val["labels"], val["probs"])["auroc"]),
            "lr": t.opt.param_groups[0]["lr"], "alpha": alpha, "beta": beta, "seconds": 0.0}


def save_epoch(t: Training, row: dict[str, float], out: Path, fp: str, data_key: str, epochs: int) -> None:
    """Step 3, rank 0: checkpoints (best by validation loss, and last) and history, atomically."""
    epoch = row["epoch"] - 1
    t.history.append(row)
    improved = row["val_loss"] < t.best_val
    t.best_val = min(t.best_val, row["val_loss"])
    if not dist_utils.is_main():
        return
    ckpt_dir = out / "checkpoints"
    state = unwrap(t.model).state_dict()
    if improved:
        atomic.save_torch({"model": state, "epoch": epoch, "fingerprint": fp}, ckpt_dir / "best.pt")
    atomic.save_torch({"model": state, "optimizer": t.opt.state_dict(), "scheduler": t.sched.state_dict(),
                        "epoch": epoch, "history": t.history, "best_val_loss": t.best_val,
                        **rng_state(t.device), "fingerprint": fp, "data_key": data_key},
                       ckpt_dir / "last.pt")
    write_history(out / "history.csv", t.history)
    log.info("epoch %d/%d  train %.4f  val %.4f  val AUROC %.3f  lr %.2g%s  %.0fs", row["epoch"],
             epochs, row["train_loss"], row["val_loss"],
             row["val_auroc"], row["lr"], "" if math.isnan(row["alpha"]) else f"  alpha {row['alpha']:.3f}",
             row["seconds"])


def check_loader_shm(profile: Profile, model: str, plan: BatchPlan) -> None:
    """Stops (``ctlib.gpu.ShmTooSmall``) when /dev/shm cannot hold the batches this node's loader workers
    hand over: ``num_workers`` x 2 prefetched micro-batches of float16 volumes per process."""
    x, y, _ = profile.image_size(model)
    batch = plan.per_rank * profile.num_slices * x * y * 2
    local = dist_utils.env_local_world_size()
    gpu.check_shm(gpu.shm_needed(batch, num_workers=profile.num_workers, local_processes=local),
                  what=f"{profile.num_workers} workers x 2 batches of {plan.per_rank} volume(s) of "
                  f"{profile.num_slices}x{y}x{x} float16 x {local} process(es) on this node")


def train(spec: RunSpec, out: str | Path, *, redo: bool = False, progress: bool = True,
          after_epoch: Callable[[int], None] | None = None, every_volume: bool = True) -> dict[str, Any] | None:
    """Trains and evaluates one run into ``out``; returns the metrics (on rank 0, else None).

    ``every_volume``: the best checkpoint scores every volume at the end (``features.npz`` then holds
    the training volumes too, for the latent space and retrieval); False scores the validation and test
    volumes only, which is all the tables need (it spares a forward pass over the training set). A complete
    run that scored the validation and test volumes only, asked again with ``every_volume``, is not trained
    again: its best checkpoint scores every volume (:func:`scored_every_volume`).

    Steps: validate the settings; data (before the process group: ``run_data``, rank 0 decides); model
    (``build_training``); the loop (``train_epoch``, ``validate_epoch``, ``save_epoch``); evaluation of the
    best checkpoint (``_write_results``). ``after_epoch(epoch)`` is called after each epoch's checkpoint is
    on disk (tests use it to simulate a kill).
    """
    profile, out = spec.profile, Path(out)
    world_env = dist_utils.env_world_size()
    validate(profile, world_env)
    # before any data is read or any process group joined: the device, the batch plan, /dev/shm
    device_type = gpu.resolve_device(profile.device, profile=profile.name)
    if profile.sync_bn and device_type != "cuda" and world_env > 1:
        raise ValueError("sync_bn needs CUDA (torch's SyncBatchNorm runs on GPUs only); drop --set sync_bn=true "
                         "on the CPU")
    plan = plan_batches(profile.batch_size, world_env, profile.per_gpu_batch)
    check_loader_shm(profile, spec.model, plan)
    data = run_data(profile, spec.model, world=world_env, progress=progress) if dist_utils.env_rank() == 0 else None
    rank, world, device = dist_utils.setup(timeout=datetime.timedelta(minutes=profile.dist_timeout_minutes),
                                           device=device_type)
    main = dist_utils.is_main()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every volume has the profile's shape: the fastest kernels, once
    try:
        data = dist_utils.broadcast_object(data)  # every rank uses rank 0's cohort and split
        fp = spec.fingerprint(data.key)
        if main:
            (out / "checkpoints").mkdir(parents=True, exist_ok=True)
            if redo:
                for name in ("metrics.json", "history.csv", "checkpoints/last.pt", "checkpoints/best.pt"):
                    (out / name).unlink(missing_ok=True)
        # several nodes: the run folder and the cache must be one shared filesystem (NotShared otherwise)
        check_shared_folders([out, data.cache_dir])
        complete = main and not redo and run_is_complete(out, spec, data.key)
        if complete and every_volume and not scored_every_volume(out):
            # finished with --score eval: resumed after its last epoch, the best checkpoint scores every volume
            log.info("%s is complete but scored the validation and test volumes only: scoring every volume", out)
            complete = False
        if dist_utils.broadcast_object(complete):
            if main:
                log.info("%s is complete (metrics.json present); use --redo to train again", out)
                return json.loads((out / "metrics.json").read_text())
            return None

        # float16 as stored: half the bytes to read, pin and copy; cast on the device (to_device)
        dataset = PreparedVolumes(data.cache_dir, data.cohort, data.shape, float16=True)
        parts = {s: Subset(dataset, np.flatnonzero((data.splits == s).to_numpy()).tolist())
                 for s in ("train", "val", "test")}
        for s, sub in parts.items():
            if len(sub) == 0:
                raise ValueError(f"the {s} split is empty: the cohort has {len(data.cohort)} volumes")
        t = build_training(spec, data, out, device, world)
        check_same_start(t.start_epoch, out / "checkpoints" / "last.pt")  # every rank read the same last.pt
        if main:
            write_config(spec, data, out, parts, world, device, t.model, batching=plan.to_dict())
            log.info("%s; %d optimisation steps per epoch", plan.describe(),
                     math.ceil(len(parts["train"]) / plan.global_batch))
            if device.type == "cuda" and spec.model in MODELS:  # the paper's models; the CNN3D control is not modelled
                props = torch.cuda.get_device_properties(device)
                log.info(estimate(profile, spec.model, plan.per_rank).line(props.total_memory, props.name))

        sampler = GlobalBatchSampler(len(parts["train"]), plan, rank, seed=profile.seed,
                                     max_steps=profile.max_steps_per_epoch, fixed_size=profile.compile)
        loader = make_loader(Weighted(parts["train"]), batch_sampler=sampler, device=device,
                             num_workers=profile.num_workers, persistent=True)
        try:
            for epoch in range(t.start_epoch, profile.epochs):
                t0 = time.time()
                sampler.set_epoch(epoch)
                train_loss = train_epoch(t, loader, epoch, profile=profile, device=device, progress=progress,
                                         plan=plan)
                row = validate_epoch(t, parts, epoch, profile=profile, device=device, progress=progress,
                                     per_rank=plan.per_rank)
                row.update(train_loss=train_loss, seconds=time.time() - t0)
                save_epoch(t, row, out, fp, data.key, profile.epochs)
                dist_utils.barrier()
                if after_epoch is not None:
                    after_epoch(epoch)
        except torch.OutOfMemoryError as err:  # answered once, with the batch that fits; not retried
            if spec.model not in MODELS:
                raise
            props = torch.cuda.get_device_properties(device)
            raise OutOfMemory(oom_message(profile, spec.model, plan.per_rank, device_bytes=props.total_memory,
                                          device_name=props.name, world=world)) from err
        scored = dataset if every_volume else Subset(
            dataset, np.flatnonzero(data.splits.isin(["val", "test"]).to_numpy()).tolist())
        return evaluate_best(spec, data, scored, t, out, device=device, progress=progress)
    finally:
        dist_utils.teardown()


def evaluate_best(spec: RunSpec, data: RunData, dataset: PreparedVolumes | Subset, t: Training, out: Path, *,
                  device: torch.device, progress: bool) -> dict[str, Any] | None:
    """Step 4, evaluation: the best checkpoint (by validation loss) scores every volume of ``dataset`` (the
    cohort's volumes or a ``Subset`` of them) once; rank 0 writes predictions, features and metrics and
    returns the metrics."""
    best = torch.load(out / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    unwrap(t.model).load_state_dict(best["model"])
    preds = predict(t.model, dataset, batch_size=spec.profile.eval_batch_size, device=device,
                    bf16=spec.profile.bf16 and device.type == "cuda", progress=progress, desc="final predictions",
                    num_workers=spec.profile.num_workers)
    if isinstance(dataset, Subset):  # positions in the subset -> cohort rows
        preds["index"] = np.asarray(dataset.indices)[preds["index"]]
    if not dist_utils.is_main():
        return None
    return write_results(out, spec, data.cohort, data.splits, preds, best_epoch=int(best["epoch"]) + 1,
                          history=t.history, model=t.model)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ctlib.train",
        description="Train and evaluate one model of the paper (ResNet2D, ViT3D or their residual fusion). "
        "Launch with torchrun for several processes (one per GPU). Without --data-root the profile's "
        "synthetic CT-RATE-format dataset is generated and prepared on first use.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--profile", default="demo", help="smoke, demo, paper or paper480")
    p.add_argument("--model", required=True, choices=MODELS + CONTROL_MODELS)
    p.add_argument("--alpha", default="1.0",
                   help="fusion only: weight of the 3D residual, a number or 'learned'")
    p.add_argument("--data-root", default=None, help="a CT-RATE snapshot (folder holding dataset/)")
    p.add_argument("--work-dir", default=None, help="where synthetic data and caches go (default: profile)")
    p.add_argument("--out", required=True, help="run folder (created; a run there is resumed)")
    p.add_argument("--seed", type=int, default=None, help="shorthand for --set seed=N")
    p.add_argument("--device", choices=gpu.DEVICES, default=os.environ.get("CTLIB_DEVICE") or None,
                   help="shorthand for --set device=...: cuda (stop when torch cannot use a GPU), cpu, auto; "
                   "default: $CTLIB_DEVICE, else the profile's (cuda for paper and paper480, auto for demo and smoke)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a profile field, e.g. --set epochs=3 --set lr=1e-3")
    p.add_argument("--redo", action="store_true", help="discard a finished or partial run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--score", choices=("all", "eval"), default="all",
                   help="volumes the best checkpoint scores at the end: all (features.npz of every volume, "
                   "for the latent space and retrieval) or eval (validation and test only: what the tables need)")
    return p


def parse_alpha(text: str | float) -> float | str:
    if isinstance(text, float):
        return text
    if text == "learned":
        return "learned"
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--alpha must be a number or 'learned', got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if dist_utils.env_rank() == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    overrides = parse_overrides(args.overrides)
    if args.data_root is not None:
        overrides["data_root"] = args.data_root
    if args.work_dir is not None:
        overrides["work_dir"] = args.work_dir
    if args.seed is not None:
        overrides["seed"] = str(args.seed)
    if args.device is not None:
        overrides["device"] = args.device
    try:
        profile = get_profile(args.profile, **overrides)
        validate(profile, dist_utils.env_world_size())
        gpu.resolve_device(profile.device, profile=profile.name)  # at once, before anything else
    except (ValueError, gpu.DeviceUnusable) as err:
        raise SystemExit(f"error: {err}") from None
    alpha = parse_alpha(args.alpha)
    if args.model != "fusion" and args.alpha != "1.0":
        raise SystemExit("--alpha applies to --model fusion only")
    try:
        train(RunSpec(profile, args.model, alpha), args.out, redo=args.redo, progress=not args.no_progress,
              every_volume=args.score == "all")
    except (CacheNotReady, SplitMismatch, NotShared, ValueError, gpu.DeviceUnusable, gpu.ShmTooSmall,
            OutOfMemory) as err:  # said plainly, without a traceback
        raise SystemExit(f"error: {err}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
