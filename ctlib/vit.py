"""Section 4.2: the CTViT encoder and its classification head (``ViT3D``), with its blocks.

CTViT [13] (CT2Rep's ``ctvit``, CT-CLIP's ``transformer_maskgit/ctvit.py``): patches embedded by
LayerNorm -> Linear -> LayerNorm, a spatial transformer among the patches of each slice, then a slice-wise one
across the slices at each patch position. Each :class:`ViTBlock` adds a :class:`PEG` (position-generating
depthwise convolution), then :class:`CosineAttention` (with the spatial blocks' :class:`ContinuousPositionBias`)
and a :class:`GEGLUFeedForward`. ``ViT3D`` takes ``x: (B, S, H, W)`` and returns logits ``(B, 18)``, like the
other models of :mod:`ctlib.models` (which builds it from a profile and fuses it with the ResNet); the input
checks shared by all the models live here, at the bottom of that stack.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from einops.layers.torch import Rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ctlib.data import CLASSES
from ctlib.profiles import VIT_FEATURE_NORMS, VIT_POOLS, VIT_STEMS

__all__ = ["NUM_CLASSES", "PEG", "ContinuousPositionBias", "ConvStem", "CosineAttention", "GEGLUFeedForward",
           "ViT3D", "ViTBlock", "VolumeBatchNorm", "check_positive", "check_volume"]

NUM_CLASSES = len(CLASSES)


def check_volume(x: Tensor, model: str) -> None:
    """Raise a ValueError naming ``model`` unless ``x`` is a non-empty float (B, S, H, W) batch."""
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        dtype = f" {x.dtype}" if isinstance(x, Tensor) else ""
        raise ValueError(f"{model} expects a float tensor (B, S, H, W), got {got}{dtype}")
    if 0 in x.shape:
        raise ValueError(f"{model} got an empty batch of shape {tuple(x.shape)}")


def check_positive(**values: Any) -> None:
    """Raise a ValueError naming the first of ``values`` that is not a positive integer."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _stream(t: Tensor) -> Tensor:
    """The residual stream follows autocast: in its dtype when autocast is on (a norm run in float32, as
    CUDA's LayerNorm and the RMSNorm of a bfloat16 input with a float32 weight are, would otherwise carry
    float32 through every block and double the activations), unchanged otherwise."""
    device = t.device.type
    if not torch.amp.is_autocast_available(device):  # e.g. the meta device of the FLOP counter
        return t
    return t.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else t


class ConvStem(nn.Module):
    """Ours, not CTViT's: a convolutional patch embedding (Xiao et al. 2021, "Early convolutions help
    transformers see better"). Each slice (B, S, H, W) goes through log2(p) 3x3 convolutions of stride 2, each
    with BatchNorm and ReLU, channels doubling up to ``dim`` (dim/4, dim/2, dim at p = 8), then a 1x1
    convolution to ``dim``: tokens (B, S, (H/p)(W/p), dim) on the same grid as the patches, row-major.
    Unlike CTViT's LayerNorm over a patch's pixels, it keeps a patch's density, and its small kernels see
    structures smaller than a patch wherever they sit in it.
    """

    @staticmethod
    def widths(patch_size: int, dim: int) -> list[int]:
        """Output channels of the stride-2 convolutions, one per halving of the slice (dim/4, dim/2, dim at p 8)."""
        n = patch_size.bit_length() - 1
        if patch_size < 2 or 2**n != patch_size:
            raise ValueError(f"the convolutional stem needs a power-of-two patch_size, got {patch_size}")
        if dim % 2 ** (n - 1):
            raise ValueError(f"the convolutional stem needs dim divisible by {2 ** (n - 1)}, got {dim}")
        return [dim // 2 ** (n - 1 - i) for i in range(n)]

    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        widths = [1, *self.widths(patch_size, dim)]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths, widths[1:], strict=False):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Conv2d(dim, dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        return rearrange(self.net(rearrange(x, "b s h w -> (b s) 1 h w")), "(b s) d h w -> b s (h w) d", b=b)


class VolumeBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the volumes of a batch, (B, D). A training batch of one volume (a micro-batch of one,
    or an epoch's last volume) has no spread to standardise by: it is normalised with the running
    statistics, as in evaluation, instead of raising."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class PEG(nn.Module):
    """CTViT's position-generating module: a depthwise 3x3x3 convolution (with bias) over the token grid
    (slice, row, column), zero-padded, whose output each block adds to its tokens before attention.

    ``causal`` (CTViT's ``peg_causal=True``): two zero slices before and none after, so a token draws on
    its own slice and the two before it; otherwise one slice each side.
    """

    def __init__(self, dim: int, *, causal: bool = True) -> None:
        super().__init__()
        self.causal = causal
        self.conv = nn.Conv3d(dim, dim, 3, groups=dim)  # the parameters; applied as three 2D convolutions

    def forward(self, grid: Tensor) -> Tensor:
        """(B, S, h, w, D) -> (B, S, h, w, D)."""
        b, s, _, _, d = grid.shape
        x = rearrange(F.pad(grid, (0, 0, 1, 1, 1, 1, *((2, 0) if self.causal else (1, 1)))), "b s h w d -> b s d h w")
        # conv3d as the sum over the kernel's 3 slices of depthwise conv2d: the same sums, and on the CPU
        # the depthwise conv3d backward is slow (paper size: 0.02 s instead of 0.09 s per PEG, measured)
        out = sum(
            F.conv2d(x[:, k:k + s].flatten(0, 1), self.conv.weight[:, :, k], groups=d) for k in range(3)
        )
        # the bias in the convolution's dtype: a float32 bias would promote the bfloat16 stream under autocast
        return rearrange(out, "(b s) d h w -> b s h w d", b=b) + self.conv.bias.to(out.dtype)


class ContinuousPositionBias(nn.Module):
    """CTViT's spatial attention bias (Swin v2's continuous position bias): per head, a small MLP of the
    (row, column) offset d of query minus key, ``sign(d) log(1 + |d|)`` -> Linear(2, dim) ->
    LeakyReLU(0.1) -> Linear(dim, dim) -> LeakyReLU(0.1) -> Linear(dim, heads). One for all spatial blocks.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2, dim), nn.LeakyReLU(0.1), nn.Linear(dim, dim), nn.LeakyReLU(0.1), nn.Linear(dim, heads)
        )

    def forward(self, h: int, w: int) -> Tensor:
        """-> (heads, h*w, h*w): the bias of query patch i and key patch j (row-major patch order)."""
        dev = self.net[0].weight.device
        # the MLP runs once per distinct offset ((2h-1)(2w-1) of them, not (hw)^2), then is gathered
        dy, dx = torch.arange(1 - h, h, device=dev), torch.arange(1 - w, w, device=dev)
        offsets = torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1).float()  # (2h-1, 2w-1, 2)
        table = self.net(torch.sign(offsets) * torch.log1p(offsets.abs()))  # (2h-1, 2w-1, heads)
        row = torch.arange(h, device=dev).repeat_interleave(w)
        col = torch.arange(w, device=dev).repeat(h)
        bias = table[row[:, None] - row[None] + h - 1, col[:, None] - col[None] + w - 1]  # (N, N, heads)
        return rearrange(bias, "i j h -> h i j")


class CosineAttention(nn.Module):
    """CTViT's cosine-similarity attention, pre-norm: (N, L, D) -> (N, L, D), and the probabilities if
    asked. q and k are L2-normalised per head and multiplied by learned per-channel scales, the logits by
    a fixed 8 (so they lie in [-8, 8] while the scales are 1, as at the start); projections have no bias."""

    scale = 8.0

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm = nn.RMSNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)  # CTViT's to_q and to_kv in one
        self.q_scale = nn.Parameter(torch.ones(dim_head))
        self.k_scale = nn.Parameter(torch.ones(dim_head))
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x: Tensor, bias: Tensor | None = None,
                return_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        q, k, v = rearrange(self.to_qkv(self.norm(x)), "n l (t h d) -> t n h l d", t=3, h=self.heads)
        q = F.normalize(q, dim=-1) * self.q_scale
        k = F.normalize(k, dim=-1) * self.k_scale
        p = self.dropout if self.training else 0.0
        if return_attention:  # the same computation as SDPA, spelled out to keep the weights
            sim = (q @ k.transpose(-2, -1)) * self.scale
            probs = torch.softmax(sim if bias is None else sim + bias, dim=-1)
            out = F.dropout(probs, p, self.training) @ v
        else:
            probs = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p, scale=self.scale)
        return self.to_out(rearrange(out, "n h l d -> n l (h d)")), probs


class GEGLUFeedForward(nn.Module):
    """CTViT's feed-forward, pre-norm: Linear(dim, 2 inner) -> x * GELU(gate) -> Linear(inner, dim), no
    biases. (N, L, D) -> (N, L, D).

    CTViT's inner width int(4 * 2/3 * dim) is odd at the paper's size (1365); the matrix products run on
    weights padded with zero rows and columns to a multiple of 8 (the same function and parameters; on the
    CPU, at the paper's size, 1.5x faster for this layer, measured).
    """

    def __init__(self, dim: int, inner: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.proj_in = nn.Linear(dim, 2 * inner, bias=False)  # rows: inner for x, then inner for the gate
        self.proj_out = nn.Linear(inner, dim, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.pad = -inner % 8

    def forward(self, x: Tensor) -> Tensor:
        w_in, w_out = self.proj_in.weight, self.proj_out.weight
        if self.pad:
            w_in = F.pad(w_in.unflatten(0, (2, -1)), (0, 0, 0, self.pad)).flatten(0, 1)
            w_out = F.pad(w_out, (0, self.pad))
        x, gate = F.linear(self.norm(x), w_in).chunk(2, dim=-1)
        return F.linear(self.dropout(F.gelu(gate) * x), w_out)


class ViTBlock(nn.Module):
    """One CTViT layer on the token grid (B, S, h, w): ``t + PEG(t)``, then ``+ attn(t)``, then
    ``+ feed-forward(t)`` (both pre-norm)."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, dropout: float, peg_causal: bool) -> None:
        super().__init__()
        self.peg = PEG(dim, causal=peg_causal)
        self.attn = CosineAttention(dim, heads, dim_head, dropout)
        self.ff = GEGLUFeedForward(dim, mlp_dim, dropout)

    def forward(self, t: Tensor, grid: tuple[int, int, int, int], spatial: bool, bias: Tensor | None = None,
                return_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        """``t``: (B*S, N, D) in a spatial block, (B*N, S, D) in a slice-wise one; ``grid`` = (B, S, h, w)."""
        b, _, h, _ = grid
        layout = "(b s) (h w) d" if spatial else "(b h w) s d"
        t = t + rearrange(self.peg(rearrange(t, f"{layout} -> b s h w d", b=b, h=h)), f"b s h w d -> {layout}")
        a, probs = self.attn(t, bias, return_attention)
        t = t + a
        return t + self.ff(t), probs


class ViT3D(nn.Module):
    """Section 4.2: the CTViT encoder [13] (CT2Rep's ``ctvit``, CT-CLIP's ``transformer_maskgit/ctvit.py``)
    with a classification head; trained from scratch.

    CTViT's, as its encoder has them: each slice cut into ``patch_size``^2 patches embedded by
    LayerNorm(p*p) -> Linear(p*p, dim) -> LayerNorm(dim) (a patch's mean and scale are normalised away);
    a spatial transformer among the patches of each slice (tokens (B*S, h*w, dim)), then a slice-wise
    transformer across the slices at each patch position ((B*h*w, S, dim)), neither causal, no null
    key/values. Every block adds a PEG (depthwise 3x3x3 convolution over the (slice, row, column) token
    grid, causally padded along the slices unless ``peg_causal=False``) before cosine-similarity attention
    (q, k L2-normalised, learned per-channel scales, fixed scale 8, bias-free projections) and a GEGLU
    feed-forward; the spatial attention adds a continuous relative position bias (an MLP of the (row,
    column) offset, shared by the spatial blocks). There are no absolute position embeddings: the PEG and
    the bias carry position. ``heads * dim_head`` attention channels are projected back to ``dim``.

    Ours: RMSNorm before attention and feed-forward and at the end of each transformer, as the paper
    writes (CTViT: LayerNorm, bias-less except the feed-forward's); CTViT's temporal patching
    (``temporal_patch_size``) is left out (the paper patches in-plane only: B x T x H/p x W/p x D); the
    PEG of the slice-wise transformer sees the token grid in its true (slice, row, column) order (CTViT's
    reshapes ``(b h w) t d`` as ``b t h w d``, a scrambled grid); the features: the final tokens pooled
    (``pool``) and normalised (``feature_norm``); the head (the paper's MLP "decoder"): Linear/GELU/Linear.
    Two options of ours, for small training sets (the demo profile uses both, the paper's profiles neither):
    ``stem="conv"`` embeds the patches by a :class:`ConvStem` instead of CTViT's LayerNorm -> Linear ->
    LayerNorm, and ``feature_norm="batch"`` standardises the pooled features over the batch
    (:class:`VolumeBatchNorm`) instead of per volume (RMSNorm).

    From scratch, as CTViT has it, it needs data: on the toy volumes of :mod:`ctlib.toys` a small one learns a
    30 mm ball from 3000 volumes at batch 32 in 300 steps, but memorises 342 volumes and stays at chance; the
    demo-sized one stays at chance within 400 steps whatever the data, batch or learning rate tried. With both
    options above it learns the ball from 342 volumes at batch 8 (``tests/test_models.py``,
    ``benchmarks/bench_vit_toy.py``, docs/results.md).

    Args:
        image_size: slice height and width (H = W).
        patch_size: patch side; must divide ``image_size``.
        max_slices: most slices a volume may have (S <= max_slices; fewer are fine; a check only, no
            parameter depends on it).
        dim: token width D, also the feature size.
        spatial_depth: spatial transformer blocks.
        slice_depth: slice-wise transformer blocks.
        heads: attention heads.
        dim_head: channels per head.
        mlp_dim: inner width of the GEGLU feed-forward (CTViT: ``int(4 * 2/3 * dim)``, 1365 at 512).
        num_classes: logits.
        dropout: dropout of attention and feed-forward (0 in the paper and in CTViT).
        gradient_checkpointing: recompute each block in the backward pass when training (less memory).
        peg_causal: pad the PEG causally along the slices (CTViT's choice) or one slice each side.
        pool: ``"mean"`` of the final tokens or ``"attention"`` (a softmax over all tokens of a learned
            score, attention-based MIL pooling); see the profiles for which the demo uses and why.
        stem: ``"patch"`` (CTViT's patch embedding) or ``"conv"`` (:class:`ConvStem`, ours; power-of-two
            ``patch_size``).
        feature_norm: the pooled features' norm, ``"rms"`` (per volume) or ``"batch"`` (over the batch's
            volumes, :class:`VolumeBatchNorm`; ours). The fusion reads the features after it.
    """

    def __init__(
        self,
        *,
        image_size: int = 224,
        patch_size: int = 16,
        max_slices: int = 100,
        dim: int = 512,
        spatial_depth: int = 4,
        slice_depth: int = 4,
        heads: int = 8,
        dim_head: int = 64,
        mlp_dim: int = 1365,
        num_classes: int = NUM_CLASSES,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
        peg_causal: bool = True,
        pool: str = "mean",
        stem: str = "patch",
        feature_norm: str = "rms",
    ) -> None:
        super().__init__()
        check_positive(
            image_size=image_size, patch_size=patch_size, max_slices=max_slices, dim=dim,
            spatial_depth=spatial_depth, slice_depth=slice_depth, heads=heads, dim_head=dim_head,
            mlp_dim=mlp_dim, num_classes=num_classes,
        )  # fmt: skip
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if pool not in VIT_POOLS:
            raise ValueError(f"pool must be one of {VIT_POOLS}, got {pool!r}")
        if stem not in VIT_STEMS:
            raise ValueError(f"stem must be one of {VIT_STEMS}, got {stem!r}")
        if feature_norm not in VIT_FEATURE_NORMS:
            raise ValueError(f"feature_norm must be one of {VIT_FEATURE_NORMS}, got {feature_norm!r}")
        self.image_size, self.patch_size, self.max_slices = image_size, patch_size, max_slices
        self.dim, self.heads, self.pool, self.stem = dim, heads, pool, stem
        self.grid = image_size // patch_size  # patches per side: h = w
        self.num_patches = self.grid**2
        self.gradient_checkpointing = gradient_checkpointing

        p = patch_size
        if stem == "patch":
            self.to_patches = Rearrange("b s (h p1) (w p2) -> b s (h w) (p1 p2)", p1=p, p2=p)
            self.patch_embed = nn.Sequential(nn.LayerNorm(p * p), nn.Linear(p * p, dim), nn.LayerNorm(dim))
        else:
            self.to_patches = nn.Identity()
            self.patch_embed = ConvStem(p, dim)
        self.spatial_bias = ContinuousPositionBias(dim, heads)
        block = dict(dim=dim, heads=heads, dim_head=dim_head, mlp_dim=mlp_dim, dropout=dropout, peg_causal=peg_causal)
        self.spatial = nn.ModuleList(ViTBlock(**block) for _ in range(spatial_depth))
        self.spatial_norm = nn.RMSNorm(dim)
        self.across = nn.ModuleList(ViTBlock(**block) for _ in range(slice_depth))
        self.norm = nn.RMSNorm(dim)  # the final tokens: the slice-wise transformer's output norm
        self.pool_score = nn.Linear(dim, 1) if pool == "attention" else None
        self.feature_norm = nn.RMSNorm(dim) if feature_norm == "rms" else VolumeBatchNorm(dim)
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, num_classes))

    @property
    def feature_dim(self) -> int:
        return self.dim

    def _check_input(self, x: Tensor) -> None:
        check_volume(x, "ViT3D")
        _, s, h, w = x.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(
                f"ViT3D(image_size={self.image_size}, patch_size={self.patch_size}) needs slices of "
                f"{self.image_size}x{self.image_size}, got input of shape {tuple(x.shape)}"
            )
        if s > self.max_slices:
            raise ValueError(f"ViT3D(max_slices={self.max_slices}) got {s} slices (input {tuple(x.shape)})")

    def _run(self, block: ViTBlock, t: Tensor, grid: tuple[int, int, int, int], spatial: bool,
             bias: Tensor | None, return_attention: bool) -> tuple[Tensor, Tensor | None]:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and not return_attention:
            return checkpoint(lambda u: block(u, grid, spatial, bias)[0], t, use_reentrant=False), None
        return block(t, grid, spatial, bias, return_attention)

    def pool_weights(self, final: Tensor, b: int) -> Tensor:
        """The weight of each final token in the feature vector: ((B N), S, D) -> (B, S, N), summing to 1."""
        n = final.shape[0] // b
        if self.pool_score is None:
            return final.new_full((b, final.shape[1], n), 1.0 / (final.shape[1] * n))
        score = rearrange(self.pool_score(final), "(b n) s 1 -> b (s n)", b=b)
        return rearrange(score.softmax(dim=-1), "b (s n) -> b s n", n=n)

    def _encode(self, x: Tensor, return_attention: bool = False) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """(B, S, H, W) -> pooled features (B, D) and the per-layer attention probabilities if asked."""
        self._check_input(x)
        b, s = x.shape[:2]
        grid = (b, s, self.grid, self.grid)
        t = _stream(rearrange(self.patch_embed(self.to_patches(x)), "b s n d -> (b s) n d"))
        bias = self.spatial_bias(self.grid, self.grid).to(t.dtype)  # (heads, N, N), one for all blocks
        spatial, across = [], []
        for block in self.spatial:
            t, probs = self._run(block, t, grid, True, bias, return_attention)
            spatial.append(probs)
        t = _stream(rearrange(self.spatial_norm(t), "(b s) n d -> (b n) s d", b=b))
        for block in self.across:
            t, probs = self._run(block, t, grid, False, None, return_attention)
            across.append(probs)
        final = self.norm(t)  # ((B N), S, D)
        if self.pool_score is None:
            feats = reduce(final, "(b n) s d -> b d", "mean", b=b)
        else:
            w = self.pool_weights(final, b)  # (B, S, N)
            feats = torch.einsum("bsn,bnsd->bd", w, rearrange(final, "(b n) s d -> b n s d", b=b))
        return self.feature_norm(feats), spatial, across

    def features(self, x: Tensor) -> Tensor:
        """The pooled final tokens, normalised: (B, S, H, W) -> (B, dim)."""
        return self._encode(x)[0]

    def forward(self, x: Tensor, *, return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """(B, S, H, W) -> logits (B, 18) (and features (B, dim))."""
        feats = self.features(x)
        logits = self.head(feats)
        return (logits, feats) if return_features else logits

    def attention_maps(self, x: Tensor) -> dict[str, Tensor]:
        """The forward pass with its attention probabilities (softmax of 8 * cosine + bias), for the figures.

        Memory grows as S * N^2 and N * S^2 per layer and head (at the paper's size about 0.5 GB and
        0.25 GB per volume in fp32): call it under ``torch.no_grad()`` on a few volumes.

        Returns:
            ``"spatial"``: (B, S, spatial_depth, heads, N, N) with N = h*w patches per slice;
            ``"slice"``: (B, N, slice_depth, heads, S, S); ``"pool"``: (B, S, N), each final token's weight
            in the features (uniform for mean pooling); ``"logits"``: (B, 18); ``"features"``: (B, dim).
        """
        b = x.shape[0]
        final: list[Tensor] = []
        handle = self.norm.register_forward_hook(lambda _m, _i, out: final.append(out))
        try:
            feats, spatial, across = self._encode(x, return_attention=True)
        finally:
            handle.remove()
        return {
            "spatial": rearrange(torch.stack(spatial, dim=1), "(b s) l h i j -> b s l h i j", b=b),
            "slice": rearrange(torch.stack(across, dim=1), "(b n) l h i j -> b n l h i j", b=b),
            "pool": self.pool_weights(final[-1], b),
            "logits": self.head(feats),
            "features": feats,
        }
