"""Where the models look (Figure 5): ViT attention rollout and ResNet Grad-CAM, per slice.

- :func:`vit_attention`: the 3D ViT's spatial attention, rolled out over the spatial layers (heads
  averaged, the residual connection as an identity term: ``0.5 * A + 0.5 * I``, rows renormalised, then
  multiplied through the layers). The ViT pools all tokens (no class token), so a patch's saliency is
  the attention it *receives*: the mean over query patches of its rollout column. Optionally weighted by
  the slice-wise attention each slice receives at that patch position (rolled out the same way over
  the slice-wise layers). Upsampled bilinearly from the patch grid to pixels.
- :func:`gradcam_resnet`: Grad-CAM on ResNet-18's last convolutional block (``layer4``, or ``layer3``
  for finer maps on small slices) for the
  volume-level logit of one class. For a :class:`ctlib.models.Fusion` the hook sits in its ResNet
  branch and the gradient is that of the *fusion* logit, so the map shows what the 2D branch
  contributes to the fused decision.

Both return ``(S, H, W)`` numpy arrays in [0, 1] (normalised over the whole volume, so slices are
comparable), leave the model as they found it (training mode, parameter gradients) and run under
no_grad / autograd.grad respectively.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["concentration", "find_block", "gradcam_resnet", "received_attention", "rollout", "salient_slices",
           "vit_attention"]


def rollout(attention: Tensor, *, residual: bool = True) -> Tensor:
    """Attention rollout over layers: (..., L, heads, N, N) -> (..., N, N).

    Heads are averaged; with ``residual`` each layer becomes ``0.5 * A + 0.5 * I`` (rows renormalised)
    to account for the skip connection; the layers are then composed, first layer applied first:
    ``R = A_L @ ... @ A_1``. Row i of R says how much output token i draws on each input token.
    """
    if attention.ndim < 4 or attention.shape[-1] != attention.shape[-2]:
        raise ValueError(f"attention must be (..., L, heads, N, N), got {tuple(attention.shape)}")
    a = attention.float().mean(dim=-3)  # (..., L, N, N)
    n = a.shape[-1]
    if residual:
        a = 0.5 * a + 0.5 * torch.eye(n, dtype=a.dtype, device=a.device)
        a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    result = a[..., 0, :, :]
    for layer in range(1, a.shape[-3]):
        result = a[..., layer, :, :] @ result
    return result


def received_attention(attention: Tensor, *, residual: bool = True) -> Tensor:
    """The attention each token receives after rollout, averaged over queries: (..., L, h, N, N) -> (..., N).

    For row-stochastic attention the values of each ``(..., :)`` sum to 1.
    """
    return rollout(attention, residual=residual).mean(dim=-2)


def _normalise(x: Tensor, mode: str) -> Tensor:
    if mode == "minmax":
        lo, hi = x.min(), x.max()
        return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
    if mode == "max":
        hi = x.max()
        return x / hi if hi > 0 else torch.zeros_like(x)
    raise ValueError(f"normalize must be 'minmax' or 'max', got {mode!r}")


def _as_volume(volume: Tensor | np.ndarray, device: torch.device) -> Tensor:
    x = torch.as_tensor(np.asarray(volume) if not isinstance(volume, Tensor) else volume)
    if x.ndim != 3:
        raise ValueError(f"volume must be (S, H, W), got shape {tuple(x.shape)}")
    return x.detach().float().to(device)[None]  # (1, S, H, W)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def vit_attention(
    model: nn.Module,
    volume: Tensor | np.ndarray,
    *,
    slice_weighting: bool = True,
    residual: bool = True,
    normalize: str = "minmax",
) -> np.ndarray:
    """Per-slice spatial saliency of the 3D ViT: (S, H, W) -> (S, H, W) float32 in [0, 1].

    Args:
        model: a :class:`ctlib.models.ViT3D`, or a model with a ``.vit`` branch (``Fusion``); it must
            have ``attention_maps(x) -> {"spatial": (B, S, L, heads, N, N), "slice": (B, N, L', heads,
            S, S)}``.
        volume: one preprocessed volume (S, H, W).
        slice_weighting: multiply each patch's spatial saliency by the slice-wise attention its slice
            receives at that position (times S, so uniform slice attention changes nothing).
        residual: add the identity for the skip connections in the rollout.
        normalize: ``"minmax"`` (over the volume) or ``"max"`` (divide by the maximum).
    """
    vit = getattr(model, "vit", model)
    if not hasattr(vit, "attention_maps"):
        raise ValueError(f"{type(model).__name__} has no attention_maps (nor a .vit branch with one)")
    x = _as_volume(volume, _device_of(vit))
    _, s, h, w = x.shape
    was_training = vit.training
    vit.eval()
    try:
        with torch.no_grad():
            maps = vit.attention_maps(x)
    finally:
        vit.train(was_training)
    spatial = maps["spatial"][0]  # (S, L, heads, N, N)
    n = spatial.shape[-1]
    sal = received_attention(spatial, residual=residual)  # (S, N)
    if slice_weighting and "slice" in maps:
        across = maps["slice"][0]  # (N, L', heads, S, S)
        per_slice = received_attention(across, residual=residual)  # (N, S), sums to 1 over S
        sal = sal * per_slice.T * s
    patch = (h * w / n) ** 0.5
    gh, gw = round(h / patch), round(w / patch)
    if gh * gw != n:
        raise ValueError(f"cannot lay {n} patches on a {h}x{w} slice")
    grid = sal.reshape(s, 1, gh, gw)
    up = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    return _normalise(up, normalize).cpu().numpy().astype(np.float32)


def find_block(resnet: nn.Module, name: str = "layer4") -> nn.Module:
    """A block of a ResNet-18 wrapper by its torchvision name (``layer4``: the last convolutional block),
    the shallowest module so named."""
    found = [(path, m) for path, m in resnet.named_modules() if path.split(".")[-1] == name]
    if not found:
        raise ValueError(f"{type(resnet).__name__} has no module named {name} (not a torchvision ResNet?)")
    return min(found, key=lambda item: item[0].count("."))[1]


def gradcam_resnet(
    model: nn.Module,
    volume: Tensor | np.ndarray,
    class_index: int,
    *,
    layer: str = "layer4",
    normalize: str = "max",
) -> np.ndarray:
    """Grad-CAM of the volume-level logit ``class_index`` on ResNet-18's ``layer4``, per slice.

    Each slice is an image of the ResNet batch: its channel weights are the spatial means of the
    gradient of the volume logit with respect to that slice's ``layer4`` activations; the map is
    ``ReLU(sum_c w_c A_c)``, upsampled bilinearly to the slice size.

    Args:
        model: a :class:`ctlib.models.ResNet2D`, or a ``Fusion`` (hooked in ``.resnet``, gradient of the
            fusion logit). ``model(x)`` must return logits (B, C).
        volume: one preprocessed volume (S, H, W).
        class_index: the logit to explain.
        layer: the hooked block; ``layer4`` (stride 32: 7x7 maps on 224-pixel slices) is Grad-CAM's
            choice, ``layer3`` (stride 16) gives twice the resolution on small slices.
        normalize: ``"max"`` (default: 0 stays "no evidence") or ``"minmax"``, over the volume.

    Returns:
        (S, H, W) float32 in [0, 1]; all zeros if no location raises the logit.
    """
    branch = getattr(model, "resnet", model)
    block = find_block(branch, layer)
    x = _as_volume(volume, _device_of(model))
    _, s, h, w = x.shape
    acts: list[Tensor] = []

    def keep(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
        acts.append(output)

    was_training = model.training
    model.eval()
    handle = block.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            x.requires_grad_(True)  # a graph to the activations even if the weights are frozen
            logits = model(x)
            if isinstance(logits, tuple):
                logits = logits[0]
            if not 0 <= class_index < logits.shape[-1]:
                raise ValueError(f"class_index must lie in [0, {logits.shape[-1]}), got {class_index}")
            if not acts:
                raise ValueError(f"the ResNet's {layer} did not run in the forward pass")
            grads = torch.autograd.grad(logits[0, class_index], acts, allow_unused=True)
    finally:
        handle.remove()
        model.train(was_training)
    a = torch.cat([t.detach() for t in acts])  # (S, C, h, w): chunks in slice order
    g = torch.cat([torch.zeros_like(t) if gr is None else gr.detach() for t, gr in zip(acts, grads, strict=True)])
    if a.shape[0] != s:
        raise ValueError(f"{layer} saw {a.shape[0]} images for a volume of {s} slices")
    weights = g.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * a).sum(dim=1, keepdim=True))  # (S, 1, h, w)
    up = F.interpolate(cam.float(), size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    return _normalise(up.clamp_min(0), normalize).cpu().numpy().astype(np.float32)


def salient_slices(saliency: np.ndarray, n: int = 3, *, min_gap: int = 1) -> list[int]:
    """The ``n`` slices with the most total saliency, at least ``min_gap`` apart, in slice order.

    Args:
        saliency: (S, H, W) map.
        n: slices wanted (fewer if the volume is short).
        min_gap: smallest index distance between picked slices.
    """
    sal = np.asarray(saliency, dtype=np.float64)
    if sal.ndim != 3:
        raise ValueError(f"saliency must be (S, H, W), got {sal.shape}")
    totals = sal.reshape(sal.shape[0], -1).sum(axis=1)
    picked: list[int] = []
    for s in np.argsort(-totals, kind="stable"):
        if all(abs(int(s) - p) >= min_gap for p in picked):
            picked.append(int(s))
        if len(picked) == n:
            break
    return sorted(picked)


def concentration(saliency: np.ndarray, top: float = 0.05) -> float:
    """Share of the total saliency held by the ``top`` fraction of voxels with the highest values.

    About ``top`` for a uniform (diffuse) map, near 1 for a map focused on a small region: the number
    behind the paper's reading of Figure 5 (focal attention on nodules, diffuse on mosaic attenuation).
    """
    sal = np.clip(np.asarray(saliency, dtype=np.float64).ravel(), 0.0, None)
    if not 0.0 < top <= 1.0:
        raise ValueError(f"top must lie in (0, 1], got {top}")
    total = sal.sum()
    if sal.size == 0 or total <= 0:
        return float("nan")
    k = max(1, int(round(top * sal.size)))
    return float(np.partition(sal, sal.size - k)[sal.size - k:].sum() / total)
