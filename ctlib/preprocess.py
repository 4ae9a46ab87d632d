"""The paper's preprocessing (section 3.1): an HU volume -> the network's input, and its settings.

:func:`preprocess` (resample, clip, centre crop or pad, scale, centre slices) is the one function used by
the cache, the notebooks and the tests; :func:`to_model_frame` is its spatial part, for any volume on the
same grid (a lesion mask). :class:`Preprocessing` holds one setting of it; its ``key`` names the cache folder.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["PREPROCESSING_VERSION", "Preprocessing", "check_preprocess_args", "preprocess", "resample",
           "to_model_frame"]

# Bump whenever ctlib.data.read_hu, preprocess (here) or the cache entry format change: it is part of every cache
# key, so files written by older code are never reused.
PREPROCESSING_VERSION = 2



def _as_triple(name: str, value: Any, *, integer: bool) -> tuple:
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must hold 3 values (X, Y, Z), got {value!r}") from None
    if len(items) != 3:
        raise ValueError(f"{name} must hold 3 values (X, Y, Z), got {value!r}")
    if integer:
        if not all(isinstance(v, int | np.integer) and not isinstance(v, bool) and v > 0 for v in items):
            raise ValueError(f"{name} must be 3 positive integers, got {value!r}")
        return tuple(int(v) for v in items)
    try:
        out = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be 3 positive numbers in mm, got {value!r}") from None
    if not all(math.isfinite(v) and v > 0 for v in out):
        raise ValueError(f"{name} must be 3 positive finite numbers in mm, got {value!r}")
    return out


def check_preprocess_args(
    size: Sequence[int],
    num_slices: int,
    hu_range: Sequence[float],
    target_spacing: Sequence[float] | None,
) -> tuple[tuple[int, int, int], int, tuple[float, float], tuple[float, float, float] | None]:
    """Validate and normalise ``preprocess`` settings; returns them as tuples.

    Raises:
        ValueError: naming the bad value.
    """
    size = _as_triple("size", size, integer=True)
    if isinstance(num_slices, bool) or not isinstance(num_slices, int | np.integer) or num_slices < 1:
        raise ValueError(f"num_slices must be a positive integer, got {num_slices!r}")
    if num_slices > size[2]:
        raise ValueError(f"num_slices={num_slices} exceeds the {size[2]} slices of size={size}")
    try:
        lo, hi = (float(v) for v in hu_range)
    except (TypeError, ValueError):
        raise ValueError(f"hu_range must be two numbers (low, high), got {hu_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"hu_range must be finite with low < high, got {hu_range!r}")
    if target_spacing is not None:
        target_spacing = _as_triple("target_spacing", target_spacing, integer=False)
    return size, int(num_slices), (lo, hi), target_spacing


def crop_pad_window(n: int, target: int) -> tuple[int, int, int]:
    """Centre crop or pad of an axis of length n to target, upstream convention.

    Returns ``(offset, start, stop)``: ``out[j] = src[j + offset]`` for ``start <= j < stop``, pad elsewhere.
    Crop start ``(n - target) // 2``; pad ``(target - n) // 2`` before, the rest after.
    """
    if n >= target:
        return (n - target) // 2, 0, target
    before = (target - n) // 2
    return -before, before, before + n


def resample(hu: np.ndarray, spacing: Sequence[float], target_spacing: Sequence[float]) -> np.ndarray:
    """Trilinear resampling (X, Y, Z) from ``spacing`` to ``target_spacing`` mm.

    The new shape is ``round(n * s / t)`` per axis (half up, at least 1); returns float32.
    """
    spacing = _as_triple("spacing", spacing, integer=False)
    target_spacing = _as_triple("target_spacing", target_spacing, integer=False)
    shape = tuple(
        max(1, math.floor(n * s / t + 0.5)) for n, s, t in zip(hu.shape, spacing, target_spacing, strict=True)
    )
    if shape == hu.shape:
        return np.asarray(hu, dtype=np.float32)
    volume = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[None, None]
    with torch.no_grad():
        out = F.interpolate(volume, size=shape, mode="trilinear", align_corners=False)
    return out[0, 0].numpy()


def preprocess(
    hu: np.ndarray,
    *,
    spacing: Sequence[float] | None = None,
    target_spacing: Sequence[float] | None = None,
    size: Sequence[int] = (214, 214, 240),
    num_slices: int = 100,
    hu_range: Sequence[float] = (-1000.0, 1000.0),
) -> np.ndarray:
    """The paper's preprocessing (section 3.1): HU volume (X, Y, Z) -> network input (Z, Y, X) in [-1, 1].

    Steps: optional trilinear resampling from ``spacing`` to ``target_spacing`` (mm) -> clip to ``hu_range``
    -> centre crop or pad (X, Y, Z) to ``size`` (crop start ``(n - t) // 2``; pad ``(t - n) // 2`` before,
    the rest after, with air ``hu_range[0]``) -> divide by ``max(|hu_range|)`` -> centre ``num_slices``
    slices (start ``(size[2] - num_slices) // 2``) -> transpose to (Z, Y, X). The defaults are the paper's
    text; the ViT profile uses ``size=(224, 224, 240)``, the CT-CLIP-style variant
    ``target_spacing=(0.75, 0.75, 1.5), size=(480, 480, 240)``.

    Args:
        hu: (X, Y, Z) array in HU.
        spacing: (sx, sy, sz) mm of ``hu``; required when ``target_spacing`` is given.
        target_spacing: (tx, ty, tz) mm to resample to, or None for no resampling.
        size: (X, Y, Z) after crop/pad.
        num_slices: centre slices kept, at most ``size[2]``.
        hu_range: (low, high) clipping window in HU.

    Returns:
        float32 array (num_slices, size[1], size[0]).
    """
    size, num_slices, (lo, hi), target_spacing = check_preprocess_args(size, num_slices, hu_range,
                                                                        target_spacing)
    scale = np.float32(max(abs(lo), abs(hi)))

    def clip_and_scale(block: np.ndarray) -> np.ndarray:
        np.clip(block, lo, hi, out=block)
        block /= scale
        return block

    return to_model_frame(hu, spacing=spacing, target_spacing=target_spacing, size=size, num_slices=num_slices,
                          fill=np.float32(lo) / scale, transform=clip_and_scale)


def to_model_frame(
    volume: np.ndarray,
    *,
    spacing: Sequence[float] | None,
    target_spacing: Sequence[float] | None,
    size: Sequence[int],
    num_slices: int,
    fill: float,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """The spatial part of :func:`preprocess`, for any (X, Y, Z) volume (an image, a 0/1 lesion mask).

    Optional trilinear resampling from ``spacing`` to ``target_spacing`` -> centre crop or pad to ``size``
    (pad value ``fill``) -> centre ``num_slices`` slices -> transpose to (Z, Y, X). ``transform`` is applied
    in place to the float32 block of surviving voxels (``preprocess`` clips and scales there, which
    commutes with the windows because ``fill`` is inside the clip range).

    Returns:
        float32 array (num_slices, size[1], size[0]).
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"hu must be a 3D (X, Y, Z) array, got shape {volume.shape}")
    if target_spacing is not None:
        if spacing is None:
            raise ValueError("spacing (sx, sy, sz) of the volume is required when target_spacing is given")
        volume = resample(volume, spacing, target_spacing)

    # Crop/pad and the centre-slice selection are both windows, so compose them and touch only the voxels
    # that survive.
    wx, wy = crop_pad_window(volume.shape[0], size[0]), crop_pad_window(volume.shape[1], size[1])
    z_off, z_start, z_stop = crop_pad_window(volume.shape[2], size[2])
    first = (size[2] - num_slices) // 2
    wz = (z_off + first, max(0, z_start - first), min(num_slices, z_stop - first))

    out = np.full((num_slices, size[1], size[0]), fill, dtype=np.float32)
    if wz[1] < wz[2]:
        src = tuple(slice(s + off, e + off) for off, s, e in (wx, wy, wz))
        block = np.array(volume[src], dtype=np.float32)
        if transform is not None:
            block = transform(block)
        out[wz[1]:wz[2], wy[1]:wy[2], wx[1]:wx[2]] = block.transpose(2, 1, 0)
    return out


def _number(x: float) -> str:
    """Shortest exact decimal, filesystem-safe: -1000.0 -> '-1000', 0.75 -> '0.75'."""
    return np.format_float_positional(float(x), trim="-")


@dataclass(frozen=True)
class Preprocessing:
    """Settings of :func:`preprocess`; one cache folder per distinct settings (``key``).

    Defaults are the paper's (section 3.1): 214x214x240 crop/pad, centre 100 slices, [-1000, 1000] HU,
    no resampling. Output of ``apply``: float32 (num_slices, size[1], size[0]).
    """

    size: tuple[int, int, int] = (214, 214, 240)
    num_slices: int = 100
    hu_range: tuple[float, float] = (-1000.0, 1000.0)
    target_spacing: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        size, num_slices, hu_range, target_spacing = check_preprocess_args(
            self.size, self.num_slices, self.hu_range, self.target_spacing
        )
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "num_slices", num_slices)
        object.__setattr__(self, "hu_range", hu_range)
        object.__setattr__(self, "target_spacing", target_spacing)

    @property
    def key(self) -> str:
        """Readable, filesystem-safe, unique per settings and code version, e.g.
        ``v2-214x214x240-n100-hu-1000_1000-native``."""
        size = "x".join(str(s) for s in self.size)
        hu = "_".join(_number(v) for v in self.hu_range)
        spacing = "native" if self.target_spacing is None else "sp" + "x".join(map(_number, self.target_spacing))
        return f"v{PREPROCESSING_VERSION}-{size}-n{self.num_slices}-hu{hu}-{spacing}"

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of a prepared volume: (S, H, W) = (num_slices, size[1], size[0])."""
        return (self.num_slices, self.size[1], self.size[0])

    def apply(self, hu: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
        """HU volume (X, Y, Z) -> float32 (S, H, W) in [-1, 1]; ``spacing`` (mm) needed to resample."""
        return preprocess(hu, spacing=spacing, target_spacing=self.target_spacing, size=self.size,
                          num_slices=self.num_slices, hu_range=self.hu_range)

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "num_slices": self.num_slices,
            "hu_range": list(self.hu_range),
            "target_spacing": None if self.target_spacing is None else list(self.target_spacing),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        ts = d.get("target_spacing")
        return cls(size=tuple(d["size"]), num_slices=int(d["num_slices"]), hu_range=tuple(d["hu_range"]),
                   target_spacing=None if ts is None else tuple(ts))
