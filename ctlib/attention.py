"""Where the models look (Figure 5): ViT attention rollout, gradient-weighted ViT relevance and ResNet
Grad-CAM, per slice.

The ViT factorises attention (``ctlib.models.ViT3D``): a spatial stage mixes the N patches of each slice
(``R_spatial[s]``, (N, N), query rows), then a slice-wise stage mixes the S slices at each patch position
(``R_slice[n]``, (S, S)), and the feature vector is a weighted sum of all S*N final tokens (no class
token): the mean, ``w = 1/(S*N)``, or the ViT's attention pooling, ``w`` = its ``attention_maps(x)["pool"]``.
The attention that flows from input token (slice s, patch n) to the pooled output is therefore

    A[s, n] = sum_{q, n'} w[q, n'] * R_slice[n'][q, s] * R_spatial[s][n', n]

The rollout follows attention and the skip connections only: the PEG of each block (a depthwise 3x3x3
convolution added to the tokens) and the feed-forward also move information, and no rollout shows them.

(:func:`compose_rollout`; it sums to 1 for row-stochastic rollouts; the class-specific relevance
replaces the uniform 1/(S*N) by a weight per output token (q, n')). The product of the two marginals,
``mean_q R_slice[n][q, s] * mean_n' R_spatial[s][n', n]``, would take the slice attention at the *input*
patch's position instead of at the position the spatial stage routed that patch to, and differs where
attention is sharp.

- :func:`vit_attention`: class-agnostic attention rollout (heads averaged, the skip connection as
  ``0.5 * A + 0.5 * I``, rows renormalised, layers multiplied), composed exactly over both stages.
- :func:`vit_relevance`: class-specific gradient-weighted attention (Chefer et al., CVPR 2021 /
  ICCV 2021: per layer ``A_bar = mean_heads((dA ⊙ A)^+)`` with ``dA`` the gradient of the class logit,
  ``R <- R + A_bar R`` from ``R = I``; then ``R - I`` row-normalised, their eqs. 8-9, so that a small
  gradient does not leave ``R`` at ``I``), composed over both stages the same way but with each pooled
  output token weighted by its class relevance, ``(d logit / d t ⋅ t)^+`` at the final tokens ``t``
  (the ViT has no class token whose row to read; with equal weights a rollout near I gives a uniform
  map, which is what the demo's maps were before this weighting).
- :func:`gradcam_resnet`: Grad-CAM on ResNet-18's last convolutional block (``layer4``, or ``layer3``
  for finer maps on small slices) for the volume-level logit of one class. For a
  :class:`ctlib.models.Fusion` the hook sits in its ResNet branch and the gradient is that of the
  *fusion* logit, so the map shows what the 2D branch contributes to the fused decision.
- :func:`as_distribution`: the one normalisation for comparing or scoring maps of both models:
  non-negative, summing to 1 over the volume's (S, H, W) voxels (after upsampling to the input grid).

All maps are ``(S, H, W)`` numpy arrays on the model-input grid. ``normalize="minmax"`` / ``"max"``
give [0, 1] for display, ``"sum"`` gives :func:`as_distribution`. The functions leave the model as they
found it (training mode, parameter gradients).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["as_distribution", "compose_rollout", "concentration", "find_block", "gradcam_resnet",
           "gradient_rollout", "normalise_residual", "rollout", "salient_slices", "vit_attention", "vit_relevance", "vit_relevance_tokens"]


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


def compose_rollout(spatial: Tensor, across: Tensor, weights: Tensor | None = None) -> Tensor:
    """The exact two-stage rollout received by each input token: (S, N, N), (N, S, S)[, (S, N)] -> (S, N).

    ``A[s, n] = sum_{q, p} w[q, p] * across[p][q, s] * spatial[s][p, n]``: the weighted sum over all pooled
    output tokens (slice q, position p) of the flow slice s -> q at position p times the flow patch
    n -> p within slice s. ``spatial[s]`` and ``across[p]`` have query rows and key columns.

    Args:
        spatial: (S, N, N) rollout of the spatial stage, one per slice.
        across: (N, S, S) rollout of the slice-wise stage, one per patch position.
        weights: (S, N) non-negative weight of each output token (slice q, position p), normalised here
            to sum 1. None, or all zero (no token raises the explained logit), gives the uniform
            ``1/(S*N)``: the mean over the pooled tokens, what a class-agnostic rollout uses.
    """
    if spatial.ndim != 3 or across.ndim != 3:
        raise ValueError(f"spatial must be (S, N, N) and across (N, S, S), got {tuple(spatial.shape)} and "
                         f"{tuple(across.shape)}")
    s, n = spatial.shape[0], spatial.shape[-1]
    if spatial.shape != (s, n, n) or across.shape != (n, s, s):
        raise ValueError(f"spatial (S, N, N) and across (N, S, S) disagree: {tuple(spatial.shape)} and "
                         f"{tuple(across.shape)}")
    w = torch.full((s, n), 1.0 / (s * n), dtype=torch.float32, device=spatial.device)
    if weights is not None:
        if tuple(weights.shape) != (s, n):
            raise ValueError(f"weights must be (S, N) = {(s, n)}, got {tuple(weights.shape)}")
        weights = weights.detach().float().to(spatial.device)
        if not torch.isfinite(weights).all() or (weights < 0).any():
            raise ValueError("weights must be finite and non-negative")
        if weights.sum() > 0:
            w = weights / weights.sum()
    return torch.einsum("qp,pqs,spn->sn", w, across.float(), spatial.float())


def gradient_rollout(attention: Tensor, grads: Tensor) -> Tensor:
    """Gradient-weighted rollout (Chefer et al. 2021): (..., L, heads, N, N) twice -> (..., N, N).

    Per layer ``A_bar = mean over heads of (grads * attention) clamped at 0``; then ``R = I`` and
    ``R <- R + A_bar @ R`` layer by layer, first layer first. ``grads`` is the gradient of the explained
    logit with respect to ``attention``. Computed and returned in float64.
    """
    if attention.shape != grads.shape or attention.ndim < 4 or attention.shape[-1] != attention.shape[-2]:
        raise ValueError(f"attention and grads must both be (..., L, heads, N, N), got {tuple(attention.shape)} "
                         f"and {tuple(grads.shape)}")
    # float64: the part R - I that flowed through attention is small next to I when gradients are small,
    # and :func:`normalise_residual` rescales it
    a = (grads.double() * attention.double()).clamp_min(0).mean(dim=-3)  # (..., L, N, N)
    n = a.shape[-1]
    r = torch.eye(n, dtype=a.dtype, device=a.device).expand(*a.shape[:-3], n, n)
    for layer in range(a.shape[-3]):
        r = r + a[..., layer, :, :] @ r
    return r


def normalise_residual(relevance: Tensor) -> Tensor:
    """Chefer et al. (ICCV 2021) eqs. 8-9 on a gradient rollout ``R = I + ...``: (..., N, N) -> (..., N, N).

    ``R_bar = R - I`` (the relevance that flowed through attention) has its rows normalised to sum 1, then
    the identity is added back. The scale of ``R - I`` is that of the logit's gradients while ``I`` has
    unit scale, so without this a small gradient makes ``R`` close to ``I`` whatever the attention did;
    after it the attention paths and the token's own path weigh the same in every row. A row with no
    attention relevance (``R - I`` zero) stays the identity row.
    """
    n = relevance.shape[-1]
    if relevance.ndim < 2 or relevance.shape[-2] != n:
        raise ValueError(f"relevance must be (..., N, N), got {tuple(relevance.shape)}")
    eye = torch.eye(n, dtype=relevance.dtype, device=relevance.device)
    bar = relevance - eye
    if (bar < -1e-6).any():
        raise ValueError("relevance - I has negative entries: not a gradient rollout (R = I + A_bar R, A_bar >= 0)")
    bar = bar.clamp_min(0)
    rows = bar.sum(dim=-1, keepdim=True)
    return torch.where(rows > 0, bar / rows.clamp_min(1e-30), bar) + eye


def as_distribution(saliency: Tensor | np.ndarray) -> np.ndarray:
    """The one normalisation for scoring maps of any model: (S, H, W) -> float64 (S, H, W), >= 0, sum 1.

    Negative values are clipped to 0. A map with no positive value (no evidence anywhere) becomes the
    uniform map, which localises nothing: it scores the random baseline.
    """
    if isinstance(saliency, Tensor):
        saliency = saliency.detach().cpu().numpy()
    sal = np.clip(np.asarray(saliency, dtype=np.float64), 0.0, None)
    if sal.ndim != 3:
        raise ValueError(f"saliency must be (S, H, W), got {sal.shape}")
    if not np.isfinite(sal).all():
        raise ValueError("saliency has non-finite values")
    total = sal.sum()
    return sal / total if total > 0 else np.full(sal.shape, 1.0 / sal.size)


def _normalise(x: Tensor, mode: str) -> Tensor:
    if mode == "minmax":
        lo, hi = x.min(), x.max()
        return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
    if mode == "max":
        hi = x.max()
        return x / hi if hi > 0 else torch.zeros_like(x)
    if mode == "sum":
        return torch.from_numpy(as_distribution(x))
    raise ValueError(f"normalize must be 'minmax', 'max' or 'sum', got {mode!r}")


def _to_voxels(tokens: Tensor, h: int, w: int) -> Tensor:
    """(S, N) patch values -> (S, H, W), bilinear from the square-ish patch grid to the slice grid."""
    s, n = tokens.shape
    patch = (h * w / n) ** 0.5
    gh, gw = round(h / patch), round(w / patch)
    if gh * gw != n:
        raise ValueError(f"cannot lay {n} patches on a {h}x{w} slice")
    grid = tokens.float().reshape(s, 1, gh, gw)
    return F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)[:, 0]


def _as_volume(volume: Tensor | np.ndarray, device: torch.device) -> Tensor:
    x = torch.as_tensor(np.asarray(volume) if not isinstance(volume, Tensor) else volume)
    if x.ndim != 3:
        raise ValueError(f"volume must be (S, H, W), got shape {tuple(x.shape)}")
    return x.detach().float().to(device)[None]  # (1, S, H, W)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _vit_of(model: nn.Module) -> nn.Module:
    vit = getattr(model, "vit", model)
    if not hasattr(vit, "attention_maps"):
        raise ValueError(f"{type(model).__name__} has no attention_maps (nor a .vit branch with one)")
    return vit


def vit_attention(
    model: nn.Module,
    volume: Tensor | np.ndarray,
    *,
    slice_weighting: bool = True,
    residual: bool = True,
    normalize: str = "minmax",
) -> np.ndarray:
    """Attention rollout of the 3D ViT, class-agnostic: (S, H, W) -> (S, H, W) float32.

    Args:
        model: a :class:`ctlib.models.ViT3D`, or a model with a ``.vit`` branch (``Fusion``); it must
            have ``attention_maps(x) -> {"spatial": (B, S, L, heads, N, N), "slice": (B, N, L', heads,
            S, S)}`` and, if its features are not the mean of the final tokens, ``"pool": (B, S, N)``.
        volume: one preprocessed volume (S, H, W).
        slice_weighting: compose the spatial rollout with the slice-wise one exactly, each output token
            weighted by its share of the pooled features (:func:`compose_rollout`); False: the spatial
            stage only (every slice weighs the same).
        residual: add the identity for the skip connections in the rollout.
        normalize: ``"minmax"`` or ``"max"`` (over the volume, [0, 1]) or ``"sum"`` (:func:`as_distribution`).
    """
    vit = _vit_of(model)
    x = _as_volume(volume, _device_of(vit))
    _, s, h, w = x.shape
    was_training = vit.training
    vit.eval()
    try:
        with torch.no_grad():
            maps = vit.attention_maps(x)
    finally:
        vit.train(was_training)
    spatial = rollout(maps["spatial"][0], residual=residual)  # (S, N, N)
    if slice_weighting and "slice" in maps:
        # each pooled output token weighs what the head's pooling gives it (uniform for mean pooling)
        pool = maps["pool"][0] if "pool" in maps else None
        tokens = compose_rollout(spatial, rollout(maps["slice"][0], residual=residual), pool)
    else:
        tokens = spatial.mean(dim=-2) / s
    return _normalise(_to_voxels(tokens, h, w), normalize).cpu().numpy().astype(np.float32)


def attention_with_grads(model: nn.Module, vit: nn.Module, x: Tensor,
                          class_index: int) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
    """Runs ``model(x)`` with the ViT keeping its attention probabilities and its final tokens (the output
    of ``vit.norm``, ((B N), S, D)); returns the attention maps, the gradients of logit ``class_index``
    with respect to them (spatial layers then slice-wise layers), the final tokens and their gradient,
    all from one backward pass."""
    captured: list[Tensor] = []
    final: list[Tensor] = []
    original = vit._encode

    def encode(t: Tensor, return_attention: bool = False) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        final.clear()
        feats, spatial, across = original(t, return_attention=True)
        if len(final) != 1:
            raise RuntimeError(f"{type(vit).__name__}.norm ran {len(final)} times in one pass, expected once")
        captured[:] = [*spatial, *across, final[0]]
        return feats, spatial, across

    def keep(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
        final.append(output)

    was_training = model.training
    model.eval()
    vit._encode = encode  # instance attribute: ViT3D.features and Fusion reach it through self._encode
    handle = vit.norm.register_forward_hook(keep)
    try:
        grads = _logit_gradients(model, x, class_index, captured,
                                 f"{type(model).__name__} did not run its ViT (a fusion with alpha = 0?)")
    finally:
        handle.remove()
        del vit._encode
        model.train(was_training)
    grads = [torch.zeros_like(a) if g is None else g.detach() for a, g in zip(captured, grads, strict=True)]
    return [a.detach() for a in captured[:-1]], grads[:-1], captured[-1].detach(), grads[-1]


def _logit_gradients(model: nn.Module, x: Tensor, class_index: int, captured: list[Tensor],
                     missing: str) -> tuple[Tensor | None, ...]:
    """Gradients of logit ``class_index`` of volume 0 with respect to the tensors that the forward pass
    of ``model(x)`` appends to ``captured`` (hooks set by the caller); ``missing`` is the error when none."""
    with torch.enable_grad():
        x.requires_grad_(True)  # a graph to the captured tensors even if every weight is frozen
        logits = model(x)
        if isinstance(logits, tuple):
            logits = logits[0]
        if not 0 <= class_index < logits.shape[-1]:
            raise ValueError(f"class_index must lie in [0, {logits.shape[-1]}), got {class_index}")
        if not captured:
            raise ValueError(missing)
        return torch.autograd.grad(logits[0, class_index], captured, allow_unused=True)


def vit_relevance_tokens(model: nn.Module, volume: Tensor | np.ndarray, class_index: int) -> Tensor:
    """Class-specific relevance of each (slice, patch) token of the ViT: (S, H, W) -> (S, N), summing to 1.

    Gradient-weighted rollout (:func:`gradient_rollout`) of the spatial and the slice-wise stages, each
    with its attention part normalised against the skip connection (:func:`normalise_residual`, Chefer
    et al.'s eqs. 8-9), composed exactly (:func:`compose_rollout`) with each pooled output token
    (slice q, position p) weighted by its own relevance for the class, gradient times activation at the
    final tokens ``t`` (the output of ``vit.norm``): ``w[q, p] = max(0, (d logit / d t[q, p]) . t[q, p])``.
    The ViT has no class token whose row to read (the feature is the mean of the final tokens); with
    ``d logit / d t[q, p] = g / (S*N)`` for the feature gradient ``g``, ``w`` is each token's share of
    the logit's linearisation. Both steps matter: with equal weights and an unnormalised rollout close
    to I (small gradients) the map is uniform whatever the class. If no token raises the logit (all
    ``w`` zero) the weights fall back to uniform. The gradient is that of ``model``'s logit
    ``class_index`` (the fusion logit for a ``Fusion``); one backward pass gives those of the attention
    and of the final tokens.
    """
    vit = _vit_of(model)
    x = _as_volume(volume, _device_of(model))
    s = x.shape[1]
    attn, grads, final, final_grad = attention_with_grads(model, vit, x, class_index)
    depth = len(vit.spatial)
    # b = 1: the spatial layers' batch is the S slices, the slice-wise layers' the N positions
    spatial = gradient_rollout(torch.stack(attn[:depth], dim=1), torch.stack(grads[:depth], dim=1))
    across = gradient_rollout(torch.stack(attn[depth:], dim=1), torch.stack(grads[depth:], dim=1))
    if spatial.shape[0] != s:
        raise ValueError(f"the spatial layers saw {spatial.shape[0]} slices for a volume of {s}")
    weights = (final_grad.float() * final.float()).sum(dim=-1).clamp_min(0).T  # (N, S) -> (S, N)
    relevance = compose_rollout(normalise_residual(spatial), normalise_residual(across), weights)
    return relevance / relevance.sum().clamp_min(1e-30)  # rows of a normalised rollout sum to 1 or 2


def vit_relevance(
    model: nn.Module, volume: Tensor | np.ndarray, class_index: int, *, normalize: str = "sum"
) -> np.ndarray:
    """Class-specific gradient-weighted attention of the ViT on the input grid: (S, H, W) -> (S, H, W).

    :func:`vit_relevance_tokens` upsampled bilinearly from the patch grid; ``normalize="sum"`` (the
    default, :func:`as_distribution`) makes it comparable with :func:`gradcam_resnet`'s ``"sum"``.
    """
    x = _as_volume(volume, torch.device("cpu"))
    _, _, h, w = x.shape
    tokens = vit_relevance_tokens(model, volume, class_index)
    return _normalise(_to_voxels(tokens, h, w).clamp_min(0), normalize).cpu().numpy().astype(np.float32)


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
        normalize: ``"max"`` (default: 0 stays "no evidence") or ``"minmax"``, over the volume, or
            ``"sum"`` (:func:`as_distribution`, the normalisation shared with :func:`vit_relevance`).

    Returns:
        (S, H, W) float32 in [0, 1] (all zeros if no location raises the logit), or summing to 1.
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
        grads = _logit_gradients(model, x, class_index, acts,
                                 f"the ResNet's {layer} did not run in the forward pass")
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
