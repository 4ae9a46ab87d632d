"""Peak training memory per GPU, planned before the first step, and the answer to running out of it.

:func:`estimate` adds up what a training step of ``model`` keeps on one GPU at a per-GPU batch: the
parameters, their gradients and AdamW's two moments (float32), autocast's bfloat16 copies of the weights, the
input batch, the activations saved for the backward pass, and the largest transient of the backward pass (a
checkpointed segment recomputed, plus the gradient flowing through it). Activations are counted tensor by
tensor from the architecture (torchvision's ResNet-18 per slice; the CTViT encoder's PEG, pre-norms, cosine
attention and GEGLU per block, :func:`vit_block_bytes`) and checked against the exact bytes autograd saves
(``torch.autograd.graph.saved_tensors_hooks``, see :func:`saved_bytes`; ``tests/test_memory.py``, on the
CPU). Under bf16 autocast every saved activation is bfloat16, the ViT's residual stream included, except
maxpool's int64 indices, the per-row statistics of the norms and of attention, and the RMSNorms' float32
copies of their inputs (an RMSNorm of a bfloat16 input with a float32 weight computes in float32). The CPU runs the spatial attention (whose bias takes a gradient)
by SDPA's math path, CUDA by a fused kernel: ``estimate(..., device=)`` says which; the CUDA side is
modelled from the kernels' saved tensors, not measured here.
Not counted: cuDNN/cuBLAS workspaces and the caching allocator's fragmentation (``overhead_gib``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ctlib.models import build_model
from ctlib.vit import ConvStem

__all__ = ["MemoryEstimate", "OutOfMemory", "estimate", "largest_fitting_batch", "oom_message", "saved_bytes"]

GIB = 2**30


class OutOfMemory(RuntimeError):
    """A training step ran out of GPU memory; the message names the per-GPU batch to use instead."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one GPU's peak during a training step, by part; ``total`` adds them up."""

    model: str
    per_gpu_batch: int
    input_shape: tuple[int, int, int]  # (S, H, W)
    bf16: bool
    checkpointing: bool
    parts: dict[str, int] = field(default_factory=dict)
    overhead: int = 0  # workspaces, CUDA context and allocator slack

    @property
    def total(self) -> int:
        return sum(self.parts.values()) + self.overhead

    def line(self, device_bytes: int | None = None, device_name: str = "") -> str:
        """One line for the log: total, against the device's memory when given, and the main parts."""
        s, h, w = self.input_shape
        parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in self.parts.items() if v >= 0.05 * GIB)
        head = (f"estimated peak memory per GPU: {self.total / GIB:.1f} GiB for {self.model} at {self.per_gpu_batch} "
                f"volume(s) of {s}x{h}x{w} per GPU ({'bf16' if self.bf16 else 'fp32'}"
                f"{', gradient checkpointing' if self.checkpointing else ''})")
        if device_bytes:
            share = self.total / device_bytes
            head += (f" of {device_bytes / GIB:.1f} GiB on {device_name or 'the GPU'} ({share:.0%}"
                     f"{': WILL NOT FIT' if share > 1 else ': tight' if share > 0.9 else ''})")
        return f"{head}; GiB: {parts}, workspace and slack {self.overhead / GIB:.1f}"


# ---------------------------------------------------------------------------------------------------------
# activations of each model, per sample, in elements (and int64 elements separately)
# ---------------------------------------------------------------------------------------------------------
def _conv_out(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def resnet_slice_activations(h: int, w: int) -> dict[str, int]:
    """Elements ResNet-18 (one input channel) saves for backward per slice of ``h x w``, by segment.

    Returns ``{"stem": ..., "layer1.0": ..., ..., "stem_int64": ...}``: the stem (conv1's input, conv1's output
    that batch norm keeps, the ReLU's output that max-pool keeps, max-pool's output) and each residual block
    (conv1 out, ReLU out, conv2 out, block out; a downsampling block also its shortcut's conv out), plus the
    pooled 512 features. ``*_int64`` counts max-pool's indices.
    """
    h1, w1 = _conv_out(h, 7, 2, 3), _conv_out(w, 7, 2, 3)
    h2, w2 = _conv_out(h1, 3, 2, 1), _conv_out(w1, 3, 2, 1)
    out = {"stem": h * w + 2 * 64 * h1 * w1 + 64 * h2 * w2, "stem_int64": 64 * h2 * w2}
    c, hh, ww = 64, h2, w2
    for layer, (width, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
        for block in range(2):
            s = stride if block == 0 else 1
            hh, ww = _conv_out(hh, 3, s, 1), _conv_out(ww, 3, s, 1)
            down = block == 0 and (s != 1 or c != width)
            out[f"layer{layer}.{block}"] = (4 + down) * width * hh * ww
            c = width
    out["pool"] = 512
    return out


@dataclass(frozen=True)
class _Arch:
    """The sizes that set a model's memory (read from a profile)."""

    model: str
    slices: int
    hw2d: tuple[int, int]
    hw3d: tuple[int, int]
    patch: int
    dim: int
    inner: int
    mlp_dim: int
    heads: int
    spatial_depth: int
    slice_depth: int
    pool: str
    checkpointing: bool
    stem: str = "patch"

    @property
    def grid(self) -> int:
        """Patches per side of a (square) slice."""
        return self.hw3d[0] // self.patch

    @property
    def mlp_padded(self) -> int:
        """The GEGLU width its matrix products run at (zero-padded to a multiple of 8)."""
        return self.mlp_dim + -self.mlp_dim % 8

    @classmethod
    def from_profile(cls, profile, model: str) -> _Arch:
        x2, y2, _ = profile.image_size("resnet2d" if model == "resnet2d" else model)
        return cls(model=model, slices=profile.num_slices, hw2d=(y2, x2), hw3d=(y2, x2), patch=profile.vit_patch_size,
                   dim=profile.vit_dim, inner=profile.vit_heads * profile.vit_dim_head, mlp_dim=profile.vit_mlp_dim,
                   heads=profile.vit_heads, spatial_depth=profile.vit_spatial_depth,
                   slice_depth=profile.vit_slice_depth, pool=profile.vit_pool,
                   checkpointing=bool(profile.gradient_checkpointing), stem=profile.vit_stem)


F32 = 4  # bytes of a float32: norm statistics and float32 copies of their inputs, the log-sum-exp


def vit_block_bytes(a: _Arch, batch: int, act: int, *, spatial: bool, device: str = "cuda") -> int:
    """Bytes one CTViT block (``ctlib.vit.ViTBlock``: PEG, cosine attention, GEGLU) saves for backward.

    ``act``: bytes of an activation (2: bfloat16 autocast, 4: float32), the residual stream's included
    (``ctlib.vit`` keeps the stream in autocast's dtype). ``spatial``: a block of the spatial transformer,
    whose attention takes the position bias; ``device``: where SDPA runs (see :func:`estimate`). Dropout 0,
    as in every profile.
    """
    b, s, n = batch, a.slices, a.grid**2
    t = b * s * n  # tokens, in either layout ((B S), N or (B N), S)
    d, inner, heads, mlp = a.dim, a.inner, a.heads, a.mlp_padded
    # PEG: each of its three depthwise conv2d (one per kernel slice) keeps its input, a window of S slices of
    # the zero-padded grid: a copy (flattening B and S of the window); at one volume, three views of the grid
    padded = (a.grid + 2) ** 2 * d
    peg = 3 * b * s * padded * act if b > 1 else (s + 2) * padded * act
    # a pre-norm (RMSNorm, unfused as autograd runs it) and its projection: its input in float32 (the stream
    # itself, or its float32 copy under autocast), the normalised product x / rms (float32, for the weight's
    # gradient), 1 / rms per token, and the projection's input x / rms * weight (float32, or autocast's copy)
    prenorm = 2 * t * d * F32 + t * F32 + t * d * act
    # attention: the q|k|v projection (one tensor: q and k are views of it, and so is v)
    qkv = t * 3 * inner * act
    # q and k L2-normalised: each keeps its normalised product (for its learned scale's gradient), its norm
    # and the norm clamped away from 0 (one value per head and token)
    qk_norm = 2 * (t * inner * act + 2 * t * heads * act)
    if spatial and device == "cpu":
        # SDPA's math path (torch's fused CPU kernel takes no gradient for a bias): float32 q and k (scaled by
        # sqrt(8)) and v, the probabilities (float32, S N^2 per head and volume), and the head merge's copy of
        # the output (to_out's input)
        core = 3 * t * inner * F32 + b * s * heads * n * n * F32 + t * inner * act
    else:
        # a fused kernel (flash or memory-efficient on CUDA, flash on the CPU): the scaled q and k, the output
        # (laid out (n, l, h, d): the head merge is a view, which to_out keeps) and the float32 log-sum-exp per
        # head; on CUDA the spatial blocks' memory-efficient kernel also keeps the bias, one (heads, N, N) for
        # all slices, its last dimension padded to a multiple of 16
        core = 3 * t * inner * act + t * heads * F32
        if spatial:
            core += heads * n * (n + -n % 16) * act
    # GEGLU: proj_in's output (value | gate: GELU keeps the gate, the product the value), GELU's output and the
    # product (proj_out's input); with a padded width also the zero-padded weights (a new tensor, or autocast's
    # bfloat16 copy of it: 2 mlp x dim in, dim x mlp out)
    ff = t * 2 * mlp * act + 2 * t * mlp * act
    if mlp != a.mlp_dim:
        ff += 3 * mlp * d * act
    return peg + 2 * prenorm + qkv + qk_norm + core + ff


def vit_activations(a: _Arch, batch: int, act: int, device: str = "cuda") -> tuple[int, int]:
    """(bytes ``ViT3D`` saves for backward, its largest backward transient) for ``batch`` volumes."""
    b, s, n = batch, a.slices, a.grid**2
    t = b * s * n
    d, p2 = a.dim, a.patch**2
    # patch embedding LayerNorm(p^2) -> Linear -> LayerNorm(dim): the first norm's float32 input (the volume's
    # patches), mean and 1 / std per token; the Linear's input (float32 or cast); the second norm's input (the
    # Linear's output), mean and 1 / std
    embed = t * p2 * F32 + 2 * t * F32 + t * p2 * act + t * d * act + 2 * t * F32
    if a.stem == "conv":
        # ConvStem: the first convolution's input (the slices, or autocast's copy), then per stride-2 layer its
        # output (BatchNorm's input) and the ReLU's output (the next convolution's input)
        embed = b * s * a.hw3d[0] * a.hw3d[1] * act
        for i, width in enumerate(ConvStem.widths(a.patch, d)):
            side = a.hw3d[0] // 2 ** (i + 1)
            embed += 2 * b * s * width * side * side * act
    # the position bias MLP runs on the (2h-1)(2w-1) distinct offsets (per step, not per volume): its input,
    # each LeakyReLU's input and output (the next Linear's input); the gather of the (N, N) table keeps its
    # row and column indices (int64)
    offsets = (2 * a.grid - 1) ** 2
    bias = offsets * (2 + 4 * d) * act + 2 * n * n * 8
    # the spatial transformer's output norm and the final norm (RMSNorm, computed in float32): input,
    # normalised product, 1 / rms
    norms = 2 * (2 * t * d * F32 + t * F32)
    # attention pooling: the score layer's input and, under autocast, einsum's bfloat16 copy of the final
    # tokens; the softmax weights and their copy in einsum's layout (float32, one per token each). The
    # classification head sees (B, dim): negligible
    pool = 0 if a.pool == "mean" else t * d * act * (1 + (act == 2)) + 2 * b * s * n * F32
    spatial = vit_block_bytes(a, batch, act, spatial=True, device=device)
    across = vit_block_bytes(a, batch, act, spatial=False, device=device)
    stream = t * d * act  # one block's input or output on the residual stream
    if a.checkpointing:
        # each block keeps only its input, the stream (the slice-wise transformer's first: the spatial norm's
        # output cast back to the stream's dtype); the backward pass recomputes one block at a time and holds
        # the stream's gradient in and out
        blocks = (a.spatial_depth + a.slice_depth) * stream
        transient = max(spatial, across) + 2 * stream
    else:
        blocks = a.spatial_depth * spatial + a.slice_depth * across
        # the largest gradient at once: GEGLU's (value | gate) or q|k|v, with the next; or the attention scores'
        # (on CUDA the bias's over every slice before it is summed; on the CPU the probabilities' and scores')
        scores = b * s * a.heads * n * n * (2 * F32 if device == "cpu" else act)
        transient = max(2 * t * max(2 * a.mlp_padded, 3 * a.inner) * act, scores)
    return embed + bias + norms + pool + blocks, transient


def _activation_parts(a: _Arch, batch: int, act_bytes: int, device: str) -> tuple[dict[str, int], int]:
    """(saved bytes by branch, largest backward transient in bytes) for ``batch`` volumes."""
    saved: dict[str, int] = {}
    transients: list[int] = []
    if a.model in ("resnet2d", "fusion"):
        seg = resnet_slice_activations(*a.hw2d)
        n = batch * a.slices
        int64 = seg.pop("stem_int64") * 8
        pool = seg.pop("pool") * 4
        segments = {k: v * act_bytes for k, v in seg.items()}
        segments["stem"] += int64
        if a.checkpointing:
            # each segment keeps its input only (the previous segment's output); one is recomputed at a time
            inputs = _resnet_segment_inputs(*a.hw2d)
            # the stem's input is the float32 slice itself (autocast casts inside the segment)
            saved["resnet"] = n * (sum(inputs) * act_bytes + (4 - act_bytes) * inputs[0] + pool)
            transients.append(n * (max(segments.values()) + 2 * max(inputs) * act_bytes))
        else:
            saved["resnet"] = n * (sum(segments.values()) + pool)
            transients.append(n * 2 * max(_resnet_largest(*a.hw2d)) * act_bytes)
    if a.model in ("vit3d", "fusion"):
        saved["vit"], transient = vit_activations(a, batch, act_bytes, device)
        transients.append(transient)
    return saved, max(transients)


def _resnet_segment_inputs(h: int, w: int) -> list[int]:
    """Elements of each checkpointed segment's input per slice: the slice, the stem's output, each block's."""
    h1, w1 = _conv_out(h, 7, 2, 3), _conv_out(w, 7, 2, 3)
    hh, ww = _conv_out(h1, 3, 2, 1), _conv_out(w1, 3, 2, 1)
    sizes = [h * w, 64 * hh * ww]
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            s = stride if block == 0 else 1
            hh, ww = _conv_out(hh, 3, s, 1), _conv_out(ww, 3, s, 1)
            sizes.append(width * hh * ww)
    return sizes[:-1]  # the last block's output goes to the pooling, which keeps nothing of it


def _resnet_largest(h: int, w: int) -> list[int]:
    h1, w1 = _conv_out(h, 7, 2, 3), _conv_out(w, 7, 2, 3)
    return [64 * h1 * w1]


def _param_counts(profile, model: str) -> tuple[int, int]:
    """(all parameters, trainable parameters) of the model, counted on the meta device (no memory, no weights)."""
    quiet = {**profile.__dict__}
    quiet.update(weights=None, allow_random_init=True)
    prof = type(profile)(**quiet)
    with torch.device("meta"):
        net = build_model(prof, model, pretrained=False)
    params = list(net.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def estimate(profile, model: str, per_gpu_batch: int, *, bf16: bool | None = None,
             checkpointing: bool | None = None, overhead_gib: float = 1.5,
             device: str = "cuda") -> MemoryEstimate:
    """The peak memory of one GPU training ``model`` of ``profile`` at ``per_gpu_batch`` volumes a micro-step.

    Args:
        bf16: autocast to bfloat16 (default: the profile's ``bf16``).
        checkpointing: activation checkpointing (default: the profile's ``gradient_checkpointing``).
        overhead_gib: CUDA context, cuDNN/cuBLAS workspaces and allocator slack, added as they are.
        device: ``"cuda"`` (what a run prints) or ``"cpu"``: where the ViT's spatial attention, which takes
            the gradient of its position bias, runs a fused kernel (CUDA's memory-efficient one) or SDPA's math
            path, which keeps the attention probabilities (torch's fused CPU kernel has no bias gradient).
    """
    if per_gpu_batch < 1:
        raise ValueError(f"per_gpu_batch must be >= 1, got {per_gpu_batch}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    bf16 = profile.bf16 if bf16 is None else bf16
    arch = _Arch.from_profile(profile, model)
    if checkpointing is not None:
        arch = _Arch(**{**arch.__dict__, "checkpointing": checkpointing})
    act = 2 if bf16 else 4
    n_all, n_train = _param_counts(profile, model)
    saved, transient = _activation_parts(arch, per_gpu_batch, act, device)
    s = arch.slices
    h, w = arch.hw2d if model == "resnet2d" else arch.hw3d
    parts = {
        "weights": 4 * n_all,
        "gradients": 4 * n_train,
        "AdamW moments": 8 * n_train,
        "bf16 weight copies": 2 * n_all if bf16 else 0,
        "input batch": per_gpu_batch * s * h * w * (2 + 4),  # float16 as loaded, float32 on the device
        **{f"activations ({k})": v for k, v in saved.items()},
        "backward transient": transient,
    }
    return MemoryEstimate(model=model, per_gpu_batch=per_gpu_batch, input_shape=(s, h, w), bf16=bf16,
                          checkpointing=arch.checkpointing, parts=parts, overhead=int(overhead_gib * GIB))


def largest_fitting_batch(profile, model: str, device_bytes: int, *, upto: int, share: float = 0.92) -> int:
    """The largest per-GPU batch <= ``upto`` whose estimate stays within ``share`` of ``device_bytes`` (0: none)."""
    best = 0
    for m in range(1, upto + 1):
        if estimate(profile, model, m).total <= share * device_bytes:
            best = m
    return best


def oom_message(profile, model: str, per_gpu_batch: int, *, device_bytes: int, device_name: str = "",
                world: int = 1) -> str:
    """What to do after ``torch.OutOfMemoryError`` at ``per_gpu_batch``: the per-GPU batch that fits, by the
    estimate, with the gradient accumulation that keeps the global batch; or checkpointing."""
    est = estimate(profile, model, per_gpu_batch)
    fit = largest_fitting_batch(profile, model, device_bytes, upto=max(1, per_gpu_batch - 1))
    head = (f"CUDA out of memory training {model} at {per_gpu_batch} volume(s) per GPU on {device_name or 'the GPU'} "
            f"({device_bytes / GIB:.1f} GiB): {est.line()}.\n  Fix: ")
    if fit >= 1:
        # the even split that takes at most `fit` volumes a micro-step (8 on one GPU at most 7: 2 x 4)
        steps = math.ceil(profile.batch_size / (world * fit))
        fit = math.ceil(profile.batch_size / (world * steps))
        return head + (f"--set per_gpu_batch={fit} (gradient accumulation over {steps} micro-step(s) keeps the "
                       f"global batch of {profile.batch_size})"
                       + ("" if profile.gradient_checkpointing else ", or --set gradient_checkpointing=true") + ".")
    if not profile.gradient_checkpointing:
        return head + "--set gradient_checkpointing=true --set per_gpu_batch=1, or a GPU with more memory."
    return head + ("--set per_gpu_batch=1; even one volume per GPU is estimated not to fit: use a GPU with more "
                   "memory, or fewer slices / a smaller field of view.")


# ---------------------------------------------------------------------------------------------------------
# measuring what autograd keeps (the check of the estimate)
# ---------------------------------------------------------------------------------------------------------
def saved_bytes(model: nn.Module, x: torch.Tensor, *, autocast_dtype: torch.dtype | None = None
                ) -> dict[str, int]:
    """Bytes autograd saves for backward in one training forward of ``model`` on ``x``, each storage once.

    Returns ``{"activations": ..., "weight_copies": ...}``: saved tensors other than the parameters and
    buffers, split into autocast's casts of parameters (not float32, of a parameter's shape or its transpose:
    choose sizes where no activation has such a shape) and everything else.
    Tensors saved inside a checkpointed segment are dropped by the checkpoint itself and so not counted.
    """
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape)[::-1] for p in model.parameters()}
    seen: dict[int, tuple[int, bool]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in own and key not in seen:
            seen[key] = (st.nbytes(), tuple(t.shape) in shapes and t.dtype != torch.float32)
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            model(x)
    return {"activations": sum(b for b, copy in seen.values() if not copy),
            "weight_copies": sum(b for b, copy in seen.values() if copy)}
