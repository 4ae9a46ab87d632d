"""Toy chest volumes at the demo's model input, and the learning check that trains a model on them.

Used by ``tests/test_models.py`` (a test-sized learning check) and ``benchmarks/bench_vit_toy.py`` (the
demo-sized ViT3D against a small 3D CNN). Not the phantom of :mod:`ctlib.synthetic`: one clean binary
cue in otherwise random anatomy, to ask whether a model can learn at all.

A volume is (S, H, W) float32 in [-1, 1] (HU / 1000, clipped), by default the demo's 16 slices of 56x56
at 5.5 mm pixels and 10 mm slices: air, an elliptic body with a ~4-pixel soft-tissue rim (40 HU), lung at
-850 HU, noise of 20 HU in the body, and 4-7 thin vertical vessels (radius 0.8-1.4 px, i.e. narrower than
16 mm) through every slice, drifting up to 0.3 px per slice. One label per volume:

- ``"ball"``: a 30 mm ball (3 slices) in the lung, the only body wider than 16 mm: any one slice shows it.
- ``"order"``: a vertical column of 7 slices in the lung, each holding one round 40 HU disc, 3 of radius
  15 mm and 4 of 5 mm in both classes. Negative: R R R r r r r or its reverse (a vessel that tapers);
  positive: r r R R R r r (a nodule threaded on a thin vessel). Positives and negatives hold the same
  multiset of slices, so a model that ignores the order of the slices cannot tell them apart.
- ``"beads"``: a coarser slice order, 4 slices: negative R R r r, positive R r R r (two large discs
  apart, a thin vessel between), each or its reverse. The two classes differ in where the large discs sit
  relative to each other, which a model sees without telling a thin disc from lung; same multiset again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctlib.metrics import auroc_rank
from ctlib.train import warmup_factor

KINDS = ("ball", "order", "beads")
COLUMN_SLICES = {"order": 7, "beads": 4}  # slices of the column of discs
SOFT_TISSUE, LUNG, AIR = 0.04, -0.85, -1.0  # HU / 1000


def _disc(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, radius: float) -> np.ndarray:
    """Coverage in [0, 1] of a disc, with a one-pixel ramp at its edge (partial volume)."""
    return np.clip(radius - np.hypot(yy - cy, xx - cx) + 0.5, 0.0, 1.0)


def _paint(vol: np.ndarray, z: int, cover: np.ndarray) -> None:
    vol[z] = vol[z] * (1 - cover) + SOFT_TISSUE * cover


def toy_volume(rng: np.random.Generator, kind: str, positive: bool, *, slices: int = 16, size: int = 56,
               pixel_mm: float = 5.5, slice_mm: float = 10.0) -> np.ndarray:
    """One toy volume (S, H, W) float32 in [-1, 1] of ``kind`` (one of ``KINDS``)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    need = COLUMN_SLICES.get(kind, 3)
    if slices < need:
        raise ValueError(f"a toy volume of kind {kind!r} needs at least {need} slices, got {slices}")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2
    ay, ax = size * rng.uniform(0.40, 0.46), size * rng.uniform(0.44, 0.49)  # body semi-axes
    rim = size * 0.07

    def inside(margin: float) -> np.ndarray:
        return ((yy - c) / (ay - margin)) ** 2 + ((xx - c) / (ax - margin)) ** 2 <= 1

    vol = np.full((slices, size, size), AIR, np.float32)
    body = inside(0.0)
    vol[:, body] = SOFT_TISSUE
    vol[:, inside(rim)] = LUNG
    vol += rng.normal(0.0, 0.02, vol.shape).astype(np.float32) * body
    lung = np.argwhere(inside(rim + 3))
    for _ in range(rng.integers(4, 8)):
        vy, vx = lung[rng.integers(len(lung))]
        radius, (dy, dx) = rng.uniform(0.8, 1.4), rng.uniform(-0.3, 0.3, 2)
        for z in range(slices):
            _paint(vol, z, _disc(yy, xx, vy + dy * (z - slices / 2), vx + dx * (z - slices / 2), radius))
    deep = np.argwhere(inside(rim + 5))
    cy, cx = deep[rng.integers(len(deep))] + rng.uniform(-0.5, 0.5, 2)
    if kind == "ball" and positive:
        r_mm, zc = 15.0, rng.integers(1, slices - 1)
        for z in range(slices):
            dz = (z - zc) * slice_mm
            if abs(dz) < r_mm:
                _paint(vol, z, _disc(yy, xx, cy, cx, np.sqrt(r_mm**2 - dz**2) / pixel_mm))
    elif kind in COLUMN_SLICES:
        big, small = 15.0 / pixel_mm, 5.0 / pixel_mm
        n = COLUMN_SLICES[kind]  # drawn alike below: twins differ in order only
        flip, z0 = rng.random() < 0.5, rng.integers(0, slices - n + 1)
        if kind == "order":
            radii = [small, small, big, big, big, small, small] if positive else [big] * 3 + [small] * 4
        else:
            radii = [big, small, big, small] if positive else [big, big, small, small]
        if flip:  # the order positive is its own reverse
            radii = radii[::-1]
        for i, radius in enumerate(radii):
            _paint(vol, z0 + i, _disc(yy, xx, cy, cx, radius))
    return np.clip(vol, -1.0, 1.0)


def toy_dataset(kind: str, n: int, seed: int, **kwargs) -> tuple[Tensor, Tensor]:
    """``n`` toy volumes (n, S, H, W) float32 and their labels (n,) float32, half positive, shuffled."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 2).astype(np.float32)
    vols = np.stack([toy_volume(rng, kind, bool(y), **kwargs) for y in labels])
    return torch.from_numpy(vols), torch.from_numpy(labels)


def augment(x: Tensor, gen: torch.Generator, *, shift: int = 4) -> Tensor:
    """Each volume of ``x`` (B, S, H, W) under its own random flips (rows, columns, slices), transpose of rows
    and columns, and circular in-plane shift of up to ``shift`` pixels: its voxels rearranged, none changed
    (the shift wraps the outermost pixels around: air, and a pixel or two of the body's edge). H must equal W."""
    out = []
    for v in x:
        flip_h, flip_w, transpose, flip_s = torch.randint(0, 2, (4,), generator=gen).tolist()
        v = v.flip(-2) if flip_h else v
        v = v.flip(-1) if flip_w else v
        v = v.transpose(-2, -1) if transpose else v
        v = v.flip(0) if flip_s else v
        dy, dx = torch.randint(-shift, shift + 1, (2,), generator=gen).tolist()
        out.append(torch.roll(v, (dy, dx), (-2, -1)))
    return torch.stack(out)


@dataclass(frozen=True)
class ToyResult:
    auroc: float  # on the test volumes, logit 0
    logit_std: float  # spread of the test logits (a collapsed model gives ~0)
    final_loss: float  # mean training loss over the last 10% of steps
    steps: int
    curve: dict[int, float]  # test AUROC after so many steps (every ``curve_every``), the last included


def learning_check(make_model: Callable[[], nn.Module], kind: str, *, steps: int = 400, lr: float = 5e-4,
                   weight_decay: float = 0.01, batch_size: int = 8, warmup_steps: int = 0, n_train: int = 342,
                   n_test: int = 300, seed: int = 0, data_seed: int = 1, curve_every: int = 0,
                   augmentation: bool = False, **volume_kwargs) -> ToyResult:
    """Train ``make_model()`` (built after seeding torch with ``seed``) on ``n_train`` toy volumes of
    ``kind`` with AdamW, BCE on logit 0, linear warm-up over ``warmup_steps`` (as training does), shuffled
    epochs (each batch through :func:`augment` if ``augmentation``), then score ``n_test`` fresh volumes (also
    every ``curve_every`` steps if > 0). Data seeds:
    ``data_seed`` (train), ``data_seed + 1`` (test).
    """
    x_train, y_train = toy_dataset(kind, n_train, data_seed, **volume_kwargs)
    x_test, y_test = toy_dataset(kind, n_test, data_seed + 1, **volume_kwargs)
    torch.manual_seed(seed)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    losses: list[float] = []
    curve: dict[int, float] = {}

    def score() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            logits = torch.cat([model(x_test[i:i + 50])[:, 0] for i in range(0, n_test, 50)])
        model.train()
        return float(auroc_rank(y_test.numpy(), logits.numpy())[0]), float(logits.std())

    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * warmup_factor(step, warmup_steps)
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n_train, generator=gen)])
        idx, order = order[:batch_size], order[batch_size:]
        x = augment(x_train[idx], gen) if augmentation else x_train[idx]
        loss = F.binary_cross_entropy_with_logits(model(x)[:, 0], y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if curve_every and (step + 1) % curve_every == 0 and step + 1 < steps:
            curve[step + 1] = score()[0]
    auroc, spread = score()
    curve[steps] = auroc
    model.eval()
    return ToyResult(auroc=auroc, logit_std=spread, final_loss=float(np.mean(losses[-max(1, steps // 10):])),
                     steps=steps, curve=curve)
