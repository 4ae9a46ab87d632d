"""The paper's three models (sections 4.1-4.3): ``ResNet2D``, ``ViT3D`` and their residual ``Fusion``.

Every model takes a batch of preprocessed volumes ``x: (B, S, H, W)`` float in [-1, 1] (``S`` slices,
HU / 1000 as made by the data layer) and returns logits ``(B, 18)``. Each has ``features(x) -> (B, D)``,
its volume-level feature vector (the fusion head, t-SNE and retrieval use it), and
``forward(x, *, return_features=False)`` returning the logits or ``(logits, features)``.

:func:`build_model` builds one of them from a profile (what training and ``load_run`` use). ``ViT3D`` and
its blocks (section 4.2) are in :mod:`ctlib.vit`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.models import ResNet18_Weights, resnet18

from ctlib.data import CLASSES
from ctlib.profiles import CONTROL_MODELS, MODELS, Profile
from ctlib.vit import NUM_CLASSES, ViT3D, check_positive, check_volume

logger = logging.getLogger(__name__)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights that cannot be had: no network, a missing file or a file that is not ResNet-18's."""


# --------------------------------------------------------------------------------------------------
# 4.1 2D model: ResNet-18 per slice, mean over slices
# --------------------------------------------------------------------------------------------------

_HUB_FILE = ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]  # resnet18-f37072fd.pth


def _resolve_weights(weights: ResNet18_Weights | str | os.PathLike | None) -> ResNet18_Weights | Path | None:
    """A torchvision weights enum, a local file, or None (random init)."""
    if weights is None or isinstance(weights, ResNet18_Weights):
        return weights
    if isinstance(weights, os.PathLike):
        return Path(weights).expanduser()
    if not isinstance(weights, str):
        raise ValueError(
            f"weights must be None, a ResNet18_Weights name or member, or a path, got {type(weights).__name__}"
        )
    name = weights.removeprefix("ResNet18_Weights.")
    if name in ResNet18_Weights.__members__:
        return ResNet18_Weights[name]
    path = Path(weights).expanduser()
    if path.exists() or path.suffix or "/" in weights or os.sep in weights or weights.startswith("~"):
        return path
    raise ValueError(
        f"unknown ResNet-18 weights {weights!r}: use None, one of {sorted(ResNet18_Weights.__members__)} "
        "or a path to a .pth state dict of torchvision's resnet18"
    )


def _load_state_dict(source: ResNet18_Weights | Path) -> Mapping[str, Tensor]:
    """Read torchvision resnet18 weights; any failure becomes a WeightsUnavailableError."""
    if isinstance(source, ResNet18_Weights):
        cached = Path(torch.hub.get_dir()) / "checkpoints" / _HUB_FILE
        try:
            return source.get_state_dict(
                progress=False, check_hash=True, map_location="cpu", weights_only=True
            )
        except Exception as err:  # no network, a proxy error, a truncated download: all mean "not here"
            raise WeightsUnavailableError(
                f"ResNet-18 weights {source} could not be loaded ({type(err).__name__}: {err}). Without "
                f"network access, copy torchvision's file {source.url} to {cached} or pass "
                "weights='/path/to/resnet18.pth' (a state dict of torchvision's resnet18)"
            ) from err
    if not source.is_file():
        raise WeightsUnavailableError(
            f"ResNet-18 weights file {source} does not exist; give the path of a state dict of torchvision's "
            f"resnet18 (e.g. {ResNet18_Weights.IMAGENET1K_V1.url} saved as "
            f"{Path(torch.hub.get_dir()) / 'checkpoints' / _HUB_FILE})"
        )
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsUnavailableError(
            f"ResNet-18 weights file {source} cannot be read as a PyTorch state dict ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(state, Mapping):
        raise WeightsUnavailableError(
            f"ResNet-18 weights file {source} holds a {type(state).__name__}, not a state dict"
        )
    return state


def slice_mean(t: Tensor) -> Tensor:
    """The mean over slices (dim 1) of ``t`` (B, S, ...), the same bits whatever the order of the slices.

    A float sum depends on the order of its terms (a permutation of 16 slice logits moves the plain mean by
    ~1e-7), so the values are sorted along the slices first and summed in that order: a volume and any
    permutation of its slices get identical outputs when the per-slice values are identical, which
    ``tests/test_synthetic_3d.py`` checks (the backbone computes each slice of a batch the same way wherever it
    sits: measured on CPU, not promised by PyTorch for every backend). Mathematically the mean; the gradient
    is the mean's (1/S to every slice)."""
    return t.sort(dim=1).values.mean(dim=1)


class ResNet2D(nn.Module):
    """Section 4.1: torchvision's ResNet-18 on every slice, slice logits averaged over the volume.

    The average is :func:`slice_mean`: exactly invariant to the order of the slices, so a volume and any
    permutation of its slices give the same logits and features to the last bit.

    The first convolution takes one channel and the last layer gives 18 logits per slice. Slices run as
    one batch ``(B*S, 1, H, W)`` of any H, W (the paper: 100 slices of 214x214).

    Args:
        num_classes: outputs per slice (the 18 CT-RATE abnormalities).
        weights: ``None`` (random init), a torchvision name or member (``"IMAGENET1K_V1"``,
            ``ResNet18_Weights.IMAGENET1K_V1``, ``"DEFAULT"``) or a path to a local ``.pth`` state dict of
            torchvision's (3-channel) resnet18. The one-channel kernel is the sum of the three RGB kernels, so
            a grey slice gets the response the RGB network gives to that slice repeated as R, G and B. The
            slices are fed as they are (HU / 1000 in [-1, 1]), not ImageNet-normalised: fine-tuning adapts
            the batch-norm statistics, and it keeps one preprocessing for all three models.
        slice_chunk: run at most this many slices through the backbone at once to bound inference memory
            (same result in eval mode; in training the stored activations dominate anyway, and batch norm
            would see per-chunk statistics). ``None``: all ``B*S`` slices at once.
        gradient_checkpointing: in training, keep only the input of the stem and of each residual block and
            recompute the rest in the backward pass (several times less activation memory, ~1/3 more
            compute; the same gradients and batch-norm running statistics).

    Raises:
        WeightsUnavailableError: the weights cannot be downloaded or read (see :func:`resnet2d_with_fallback`).

    Attributes:
        weights_used: ``"random"``, the torchvision name (``"IMAGENET1K_V1"``) or ``"file:<path>"``.
    """

    feature_dim = 512

    def __init__(
        self,
        *,
        num_classes: int = NUM_CLASSES,
        weights: ResNet18_Weights | str | os.PathLike | None = None,
        slice_chunk: int | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_positive(num_classes=num_classes)
        if slice_chunk is not None:
            check_positive(slice_chunk=slice_chunk)
        source = _resolve_weights(weights)
        state = None if source is None else _load_state_dict(source)

        self.backbone = resnet18(weights=None)
        self.backbone.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.backbone.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.backbone.fc = nn.Identity()  # the backbone gives the 512-d pooled slice features
        self.fc = nn.Linear(self.feature_dim, num_classes)
        self.slice_chunk = slice_chunk
        self.gradient_checkpointing = gradient_checkpointing
        self.weights_used = "random"
        if state is not None:
            self._load_backbone(state, source)
            self.weights_used = source.name if isinstance(source, ResNet18_Weights) else f"file:{source}"

    def _load_backbone(self, state: Mapping[str, Tensor], source: ResNet18_Weights | Path) -> None:
        # The 1000-class layer is replaced by ours.
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        conv = state.get("conv1.weight")
        if isinstance(conv, Tensor) and conv.ndim == 4 and conv.shape[1] == 3:
            state["conv1.weight"] = conv.sum(dim=1, keepdim=True)
        try:
            self.backbone.load_state_dict(state)
        except RuntimeError as err:
            raise WeightsUnavailableError(
                f"ResNet-18 weights {source} do not fit torchvision's resnet18: {str(err)[:500]}"
            ) from err

    def _slice_features(self, x: Tensor) -> Tensor:
        """(B, S, H, W) -> (B, S, 512) pooled features of every slice."""
        check_volume(x, "ResNet2D")
        b, s = x.shape[:2]
        slices = rearrange(x, "b s h w -> (b s) 1 h w")
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            feats = self._checkpointed_backbone(slices)
        elif self.slice_chunk is None or self.slice_chunk >= slices.shape[0]:
            feats = self.backbone(slices)
        else:
            feats = torch.cat([self.backbone(c) for c in slices.split(self.slice_chunk)])
        return feats.view(b, s, self.feature_dim)

    def _checkpointed_backbone(self, slices: Tensor) -> Tensor:
        """The backbone with the stem and each residual block checkpointed: (N, 1, H, W) -> (N, 512)."""
        bb = self.backbone
        stem = nn.Sequential(bb.conv1, bb.bn1, bb.relu, bb.maxpool)
        t = slices
        for segment in (stem, *bb.layer1, *bb.layer2, *bb.layer3, *bb.layer4):
            t = checkpoint(segment, t, use_reentrant=False, context_fn=partial(_recompute_context, segment))
        return torch.flatten(bb.avgpool(t), 1)

    def features(self, x: Tensor) -> Tensor:
        """Mean over slices of the pooled slice features: (B, S, H, W) -> (B, 512)."""
        return slice_mean(self._slice_features(x))

    def forward(self, x: Tensor, *, return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """(B, S, H, W) -> logits (B, 18), the mean of the slice logits (and features (B, 512))."""
        feats = self._slice_features(x)
        logits = slice_mean(self.fc(feats))
        return (logits, slice_mean(feats)) if return_features else logits


@contextmanager
def _frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """Batch norm layers of ``module`` normalise with batch statistics but leave their running statistics and
    counters as they are: a checkpointed segment's recomputation must not count its batch a second time.
    (Momentum 0 keeps the running averages exactly; the same tensors are saved as in the first forward,
    which the checkpoint checks.)"""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    kept = [(bn.momentum, bn.num_batches_tracked.clone()) for bn in bns]
    for bn in bns:
        bn.momentum = 0.0
    try:
        yield
    finally:
        for bn, (momentum, count) in zip(bns, kept, strict=True):
            bn.momentum = momentum
            bn.num_batches_tracked.copy_(count)


def _recompute_context(module: nn.Module) -> tuple[AbstractContextManager, AbstractContextManager]:
    """``torch.utils.checkpoint``'s ``context_fn``: the forward as it is, the recomputation without
    updating batch-norm running statistics."""
    return nullcontext(), _frozen_batchnorm_stats(module)


def resnet2d_with_fallback(
    weights: ResNet18_Weights | str | os.PathLike | None, allow_random: bool, **kwargs: Any
) -> ResNet2D:
    """``ResNet2D(weights=weights, **kwargs)``, or random init with a WARNING if that fails and is allowed.

    Raises:
        WeightsUnavailableError: the weights cannot be had and ``allow_random`` is False.
    """
    try:
        return ResNet2D(weights=weights, **kwargs)
    except WeightsUnavailableError as err:
        if not allow_random:
            raise
        logger.warning("%s -- falling back to a randomly initialised ResNet-18", err)
        return ResNet2D(weights=None, **kwargs)


# --------------------------------------------------------------------------------------------------
# 4.3 Residual fusion: x_2d + alpha * residual_3d
# --------------------------------------------------------------------------------------------------


class Fusion(nn.Module):
    """Section 4.3, Algorithm 1 with alpha: ``fused = beta * x_2d + alpha * proj(vit_features)``.

    ``x_2d`` is the ResNet's slice features mean-pooled (512), ``residual_3d`` the ViT's pooled features
    projected to 512 (the projection layer); the fused vector goes through ``Linear(512, 18)``. The same
    ``x: (B, S, H, W)`` feeds both branches, so H = W = the ViT's ``image_size``.

    Only the branches' features are used: their own classification heads are frozen
    (``requires_grad=False``) so that every trainable parameter takes part in each step (DDP needs this).
    A fixed ``alpha == 0`` skips the 3D branch altogether (and freezes it and the projection): the output
    then depends on the 2D branch only, whatever the ViT holds.

    Args:
        resnet: the 2D branch; built from ``resnet_kwargs`` when None.
        vit: the 3D branch; built from ``vit_kwargs`` when None.
        alpha: a fixed weight of the 3D residual (a buffer, not trained) or ``"learned"`` (a parameter).
        alpha_init: start value of a learned alpha.
        learn_2d_weight: learn beta (initialised at 1), the paper's future-work variant; else beta = 1.
        num_classes: logits.
        resnet_kwargs: keyword arguments of :class:`ResNet2D` when ``resnet`` is None.
        vit_kwargs: keyword arguments of :class:`ViT3D` when ``vit`` is None.
    """

    def __init__(
        self,
        *,
        resnet: ResNet2D | None = None,
        vit: ViT3D | None = None,
        alpha: float | str = 1.0,
        alpha_init: float = 0.5,
        learn_2d_weight: bool = False,
        num_classes: int = NUM_CLASSES,
        resnet_kwargs: dict[str, Any] | None = None,
        vit_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_positive(num_classes=num_classes)
        for name, branch, kwargs, cls in (
            ("resnet", resnet, resnet_kwargs, ResNet2D),
            ("vit", vit, vit_kwargs, ViT3D),
        ):
            if branch is not None and kwargs is not None:
                raise ValueError(f"give either {name} or {name}_kwargs, not both")
            if branch is not None and not isinstance(branch, cls):
                raise ValueError(f"{name} must be a {cls.__name__}, got {type(branch).__name__}")
        if isinstance(alpha, str):
            if alpha != "learned":
                raise ValueError(f"alpha must be a number or 'learned', got {alpha!r}")
        elif isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number or 'learned', got {alpha!r}")
        if (
            isinstance(alpha_init, bool)
            or not isinstance(alpha_init, (int, float))
            or not math.isfinite(alpha_init)
        ):
            raise ValueError(f"alpha_init must be a finite number, got {alpha_init!r}")

        self.resnet = resnet if resnet is not None else ResNet2D(**(resnet_kwargs or {}))
        self.vit = vit if vit is not None else ViT3D(**(vit_kwargs or {}))
        self.project = nn.Linear(self.vit.feature_dim, self.resnet.feature_dim)
        self.head = nn.Linear(self.resnet.feature_dim, num_classes)
        self.learned_alpha = alpha == "learned"
        if self.learned_alpha:
            self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        else:
            self.register_buffer("alpha", torch.tensor(float(alpha)))
        if learn_2d_weight:
            self.beta = nn.Parameter(torch.tensor(1.0))
        else:
            self.register_buffer("beta", torch.tensor(1.0))
        self.uses_3d = self.learned_alpha or float(alpha) != 0.0
        frozen = [self.resnet.fc, self.vit.head] + ([] if self.uses_3d else [self.vit, self.project])
        for module in frozen:
            module.requires_grad_(False)

    @property
    def alpha_value(self) -> float:
        return float(self.alpha.detach())

    @property
    def beta_value(self) -> float:
        return float(self.beta.detach())

    def features(self, x: Tensor) -> Tensor:
        """The fused vector ``beta * x_2d + alpha * residual_3d``: (B, S, H, W) -> (B, 512)."""
        check_volume(x, "Fusion")
        fused = self.beta * self.resnet.features(x)
        if self.uses_3d:
            fused = fused + self.alpha * self.project(self.vit.features(x))
        return fused

    def forward(self, x: Tensor, *, return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """(B, S, H, W) -> logits (B, 18) (and the fused features (B, 512))."""
        feats = self.features(x)
        logits = self.head(feats)
        return (logits, feats) if return_features else logits


# --------------------------------------------------------------------------------------------------
# The factory: a model from a profile
# --------------------------------------------------------------------------------------------------


def vit_kwargs(profile: Profile, model: str) -> dict[str, Any]:
    """``ViT3D`` arguments of ``model``'s input under ``profile`` (square slices)."""
    x, y, _ = profile.image_size(model)
    if x != y:
        raise ValueError(f"the ViT needs square slices, the profile gives {x}x{y}")
    return dict(
        image_size=x,
        patch_size=profile.vit_patch_size,
        max_slices=profile.num_slices,
        dim=profile.vit_dim,
        spatial_depth=profile.vit_spatial_depth,
        slice_depth=profile.vit_slice_depth,
        heads=profile.vit_heads,
        dim_head=profile.vit_dim_head,
        mlp_dim=profile.vit_mlp_dim,
        dropout=profile.vit_dropout,
        peg_causal=profile.vit_peg_causal,
        pool=profile.vit_pool,
        stem=profile.vit_stem,
        feature_norm=profile.vit_feature_norm,
        num_classes=len(CLASSES),
        gradient_checkpointing=profile.gradient_checkpointing,
    )


# --------------------------------------------------------------------------------------------------
# A control, not the paper's: a small 3D CNN
# --------------------------------------------------------------------------------------------------


class CNN3D(nn.Module):
    """A small 3D CNN: the control that shows a 3D cue is learnable by *some* 3D model at a budget (notebook 09).

    Three blocks of Conv3d(3x3x3)/BatchNorm/ReLU (``width``, 2x, 4x channels), the first two followed by
    in-plane max pooling (slices are kept: the cue of the synthetic lung nodule is one slice's shift), then a
    global max over the volume (a small finding anywhere) -> Linear. Measured on the demo's input (16x56x56,
    AdamW lr 1e-3, batch 8; DATA.md, "The 3D class"): lung-nodule AUROC 0.999 after 300 steps trained on that
    label alone, 0.83 after 400 and 0.92 after 500 trained on all 18 labels; the same network on volumes whose
    slices are shuffled stays at chance (0.55).

    Args:
        width: channels of the first block.
        num_classes: logits.
    """

    def __init__(self, *, width: int = 16, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        check_positive(width=width, num_classes=num_classes)

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(*block(1, width), nn.MaxPool3d((1, 2, 2)), *block(width, 2 * width),
                                  nn.MaxPool3d((1, 2, 2)), *block(2 * width, 4 * width), nn.AdaptiveMaxPool3d(1),
                                  nn.Flatten())
        self.head = nn.Linear(4 * width, num_classes)
        self.feature_dim = 4 * width

    def features(self, x: Tensor) -> Tensor:
        """(B, S, H, W) -> (B, 4 * width): the global max of the last block."""
        check_volume(x, "CNN3D")
        return self.body(x[:, None])

    def forward(self, x: Tensor, *, return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """(B, S, H, W) -> logits (B, 18) (and features)."""
        feats = self.features(x)
        logits = self.head(feats)
        return (logits, feats) if return_features else logits


def build_model(profile: Profile, model: str, alpha: float | str = 1.0, *, pretrained: bool = True) -> nn.Module:
    """The paper's ``model`` for ``profile`` (or the ``cnn3d`` control). ``pretrained=False`` skips loading
    ResNet weights (used when a checkpoint will overwrite them anyway)."""
    if model not in MODELS + CONTROL_MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {MODELS + CONTROL_MODELS}")
    if model == "cnn3d":
        return CNN3D()
    weights = profile.weights if pretrained else None
    if model == "vit3d":
        return ViT3D(**vit_kwargs(profile, model))
    resnet = resnet2d_with_fallback(weights, allow_random=profile.allow_random_init,
                                    gradient_checkpointing=profile.gradient_checkpointing)
    if model == "resnet2d":
        return resnet
    return Fusion(resnet=resnet, vit=ViT3D(**vit_kwargs(profile, model)), alpha=alpha,
                  alpha_init=profile.alpha_init, learn_2d_weight=profile.learn_2d_weight)


def weights_used(model: nn.Module) -> str:
    """Where the model's ResNet weights came from (a run's config and metrics say it)."""
    if isinstance(model, ResNet2D):
        return model.weights_used
    if isinstance(model, Fusion):
        return model.resnet.weights_used
    return f"random ({type(model).__name__} is trained from scratch)"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside ``torch.compile`` and DistributedDataParallel wrappers (for state dicts)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def alpha_beta(model: nn.Module) -> tuple[float, float]:
    """The fusion's current alpha and beta (NaN, NaN for the other models); ``model`` may be wrapped."""
    m = unwrap(model)
    if isinstance(m, Fusion):
        return m.alpha_value, m.beta_value
    return float("nan"), float("nan")
