"""Running a model over prepared volumes: the DataLoader, prediction and BatchNorm recalibration.

Training (:mod:`ctlib.train`), the notebooks and the benchmarks read batches and score volumes through
these functions alone, so that a volume is read and scored the same way everywhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from ctlib import distributed as dist_utils
from ctlib.cache import PreparedVolumes
from ctlib.data import CLASSES
from ctlib.models import unwrap


def make_loader(dataset: Any, *, batch_size: int | None = 1, sampler: Any = None, device: torch.device,
                num_workers: int, persistent: bool = False, generator: torch.Generator | None = None,
                batch_sampler: Any = None) -> DataLoader:
    """The DataLoader of training, prediction and recalibration alike: ``num_workers`` reading processes and
    pinned memory on CUDA (so that the float16 batch crosses to the device asynchronously). Each iterator
    draws its workers' base seed from ``generator`` (default: the global RNG). Training gives a
    ``batch_sampler`` (:class:`ctlib.batching.GlobalBatchSampler`) instead of ``batch_size`` and ``sampler``."""
    batching = ({"batch_sampler": batch_sampler} if batch_sampler is not None
                else {"batch_size": batch_size, "sampler": sampler})
    return DataLoader(dataset, **batching, num_workers=num_workers, pin_memory=device.type == "cuda",
                      persistent_workers=persistent and num_workers > 0, generator=generator)


def to_device(volumes: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A (B, S, H, W) batch, float16 as the cache stores it, to ``device`` and float32 there.

    Half the bytes cross the bus; the cast float16 -> float32 is exact, so the values equal those of a
    float32 batch made on the host.
    """
    return volumes.to(device, non_blocking=True).float()


@torch.no_grad()
def predict(model: nn.Module, dataset: PreparedVolumes | Subset, *, batch_size: int, device: torch.device,
            bf16: bool = False, progress: bool = False, desc: str = "predict",
            num_workers: int = 0) -> dict[str, np.ndarray]:
    """Scores every volume of ``dataset`` exactly once, across all ranks (``num_workers`` loader processes).

    Returns ``index`` (N,), ``logits`` (N, 18), ``probs`` (N, 18), ``labels`` (N, 18) and
    ``features`` (N, D), sorted by dataset index, identical on every rank.
    """
    model.eval()
    world = dist_utils.world_size()
    sampler = DistributedSampler(dataset, num_replicas=world, rank=dist_utils.rank(), shuffle=False)
    loader = make_loader(dataset, batch_size=batch_size, sampler=sampler, device=device, num_workers=num_workers)
    positions = list(iter(sampler))
    idx_all, out_all, lab_all = [], [], []
    seen = 0
    it = tqdm(loader, desc=desc, leave=False, disable=not (progress and dist_utils.is_main()))
    for volumes, labels, _names in it:
        n = volumes.shape[0]
        volumes = to_device(volumes, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
            logits, feats = unwrap(model)(volumes, return_features=True)
        out_all.append(torch.cat([logits.float(), feats.float()], dim=1).cpu())
        lab_all.append(labels.float())
        idx_all.append(torch.as_tensor(positions[seen:seen + n], dtype=torch.long))
        seen += n
    idx, out, lab = dist_utils.gather_predictions(torch.cat(idx_all), torch.cat(out_all), torch.cat(lab_all))
    c = len(CLASSES)
    logits = out[:, :c].numpy()
    return {"index": idx.numpy(), "logits": logits, "probs": torch.sigmoid(out[:, :c]).numpy(),
            "labels": lab.numpy(), "features": out[:, c:].numpy()}


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, dataset: PreparedVolumes | Subset, n_volumes: int, *,
                          batch_size: int, device: torch.device, seed: int, num_workers: int = 0) -> int:
    """Recomputes the running statistics of every BatchNorm layer of ``model`` on training data.

    The running mean and variance that ``eval()`` uses are an exponential average (momentum 0.1) of
    batch statistics taken while the weights moved. Early in training from scratch the weights move
    fast and that average lags far behind them: the ResNet's validation loss in eval mode then grows
    epoch by epoch (0.5 -> 1.0 on the demo) while with batch statistics it keeps falling, and "best
    checkpoint by validation loss" picks undertrained weights. This replaces the running statistics by
    the exact average over ``n_volumes`` training volumes (a seeded choice, the same on every rank, so
    every rank ends with the same statistics without communication) under the current weights. Only
    the BatchNorm layers run in train mode, so dropout and the global RNG are untouched and a resumed
    run stays identical to an uninterrupted one.

    Returns:
        The number of volumes used (0 when the model has no BatchNorm layer or ``n_volumes`` is 0).
    """
    bns = [m for m in unwrap(model).modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or n_volumes <= 0:
        return 0
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    chosen = np.random.default_rng(seed).permutation(len(dataset))[:n_volumes]
    unwrap(model).eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all the batches below
        bn.train()
    # Its own generator: the global RNG stays untouched (a resumed run stays identical).
    loader = make_loader(Subset(dataset, chosen.tolist()), batch_size=batch_size, sampler=None, device=device,
                         num_workers=num_workers, generator=torch.Generator().manual_seed(seed))
    try:
        for batch in loader:  # in the chosen order, batch_size at a time; batch[0]: (B, S, H, W)
            unwrap(model)(to_device(batch[0], device))
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
        model.train(was_training)
    return len(chosen)


def bce(logits: np.ndarray, labels: np.ndarray) -> float:
    t = torch.nn.functional.binary_cross_entropy_with_logits(torch.from_numpy(logits),
                                                             torch.from_numpy(labels))
    return float(t)
