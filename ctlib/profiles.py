"""Experiment profiles: one frozen dataclass per experiment, selectable by name.

``paper`` holds the paper's sizes and settings (sections 3.1, 4 and 4.5) for CT-RATE on GPUs;
``paper480`` its last experiment at the full 480x480 field of view; ``demo`` the whole paper on the
embedded synthetic dataset on a 2-core laptop; ``smoke`` a seconds-long CI run of the same code.

Every field can be overridden from the command line (``--set epochs=3``) or in Python with
``dataclasses.replace``. Sizes follow ctlib's conventions: ``size_*`` are the (X, Y, Z) crop/pad target
of :func:`ctlib.preprocess.preprocess` and the models see ``(num_slices, Y, X)`` volumes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODELS = ("resnet2d", "vit3d", "fusion")
VIT_POOLS = ("mean", "attention")  # how ViT3D pools its final tokens into the feature vector
VIT_STEMS = ("patch", "conv")  # how ViT3D embeds a slice's patches: CTViT's, or a convolutional stem (ours)
VIT_FEATURE_NORMS = ("rms", "batch")  # the norm of ViT3D's pooled features: per volume, or over the batch
# Not the paper's: a small 3D CNN, the control that shows a 3D cue is learnable at a profile's budget
# (ctlib.models.CNN3D; notebook 09). It reads the ViT's input.
CONTROL_MODELS = ("cnn3d",)


@dataclass(frozen=True)
class Profile:
    """All settings of one experiment. Defaults are the paper's values."""

    name: str = "paper"
    # --- data -------------------------------------------------------------------------------
    data_root: str | None = None  # a CT-RATE snapshot; None -> the embedded synthetic dataset
    work_dir: str = "data"  # synthetic snapshot and prepared caches live under it
    synthetic_patients: int = 300
    synthetic_shape: tuple[int, int, int] = (128, 128, 48)  # (X, Y, Z) voxels written
    synthetic_spacing: tuple[float, float, float] = (2.75, 2.75, 5.0)  # mm
    synthetic_seed: int = 0
    # Held-out synthetic test patients added beyond synthetic_patients (one chest volume each): the test split is
    # then exactly them, and the synthetic_patients are split train:val in the ratio fractions[0]:fractions[1].
    synthetic_test_patients: int = 0
    # Strength lambda in [0, 1] of the synthetic lung-nodule cue (DATA.md, "The 3D class"): 0 makes a positive
    # volume and its negative twin the same set of slices in the same order up to identical slices, 1 the
    # full-size nodule. Part of the snapshot's identity (its folder name).
    context_strength: float = 1.0
    prepare_workers: int = 2
    # Preparation exits non-zero when more than this fraction of the cohort's volumes fail to read.
    max_failed_fraction: float = 0.01
    # --- preprocessing (section 3.1) --------------------------------------------------------
    size_2d: tuple[int, int, int] = (214, 214, 240)  # ResNet2D input: 214x214 slices
    size_3d: tuple[int, int, int] = (224, 224, 240)  # ViT3D and fusion input: 224x224 slices
    num_slices: int = 100  # centre slices kept
    hu_range: tuple[float, float] = (-1000.0, 1000.0)
    target_spacing: tuple[float, float, float] | None = None  # None: the paper's text, no resampling
    # --- split (section 3.1) ----------------------------------------------------------------
    fractions: tuple[float, float, float] = (0.7, 0.2, 0.1)
    split_seed: int = 0
    # --- models (sections 4.1-4.3) ----------------------------------------------------------
    weights: str | None = "IMAGENET1K_V1"  # ResNet2D initialisation (torchvision name or a file)
    allow_random_init: bool = False  # fall back to random init when the weights cannot be had
    vit_patch_size: int = 16
    vit_dim: int = 512
    vit_spatial_depth: int = 4
    vit_slice_depth: int = 4
    vit_heads: int = 8
    vit_dim_head: int = 64
    vit_mlp_dim: int = 1365  # GEGLU inner width; CTViT's int(4 * 2/3 * dim)
    vit_dropout: float = 0.0
    vit_peg_causal: bool = True  # CTViT pads its PEG causally along the slices (peg_causal=True)
    vit_pool: str = "mean"  # the final tokens -> features; the paper leaves the head open
    vit_stem: str = "patch"  # CTViT's patch embedding; "conv": strided 3x3 convolutions (ctlib.vit.ConvStem)
    vit_feature_norm: str = "rms"  # the pooled features' norm; "batch": standardised over the batch
    alpha_init: float = 0.5  # start value of a learned alpha
    learn_2d_weight: bool = False  # fusion: learn beta, the 2D weight, too (the paper's future work)
    # Recompute activations in the backward pass (the ViT's blocks, the ResNet's stem and residual blocks):
    # ~1/3 more compute for several times less activation memory (ctlib.memory.estimate).
    gradient_checkpointing: bool = False
    # --- training (section 4.5) -------------------------------------------------------------
    # Where to train: "cuda" (required: the run stops at once with the cause when torch cannot use a GPU,
    # ctlib.gpu.resolve_device), "cpu" (on purpose), or "auto" (CUDA when usable, else the CPU).
    device: str = "cuda"
    epochs: int = 10
    # Volumes per optimisation step over all processes, whatever their number (ctlib.batching): 3 GPUs take
    # 3, 3 and 2; with per_gpu_batch below ceil(batch_size / processes), gradients accumulate over micro-steps.
    batch_size: int = 8
    per_gpu_batch: int | None = None  # most volumes per process and micro-step (memory); None: no limit
    sync_bn: bool = False  # BatchNorm statistics over all processes' volumes (SyncBatchNorm; CUDA only)
    lr: float = 5e-4
    weight_decay: float = 0.01  # AdamW's default
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    seed: int = 0
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    # Linear learning-rate warm-up over the first warmup_steps optimisation steps (ctlib.train.warmup_factor);
    # 0: none, the paper's loop. ReduceLROnPlateau acts on the unscaled rate.
    warmup_steps: int = 0
    compile: bool = False  # torch.compile the training model (opt-in; same outputs within float tolerance)
    num_workers: int = 4  # DataLoader workers per process
    eval_batch_size: int = 8
    bootstrap: int = 1000  # resamples for per-class AUROC confidence intervals
    # Training volumes on which the ResNet's BatchNorm statistics are recomputed before each validation
    # (ctlib.predict.recalibrate_batchnorm); 0 keeps PyTorch's running averages, the paper's plain loop.
    bn_recalibration: int = 0
    max_steps_per_epoch: int | None = None  # cap optimisation steps per epoch (quick checks only)
    # Process-group timeout (torch.distributed.init_process_group): how long a rank waits for the others at
    # a collective. No long work runs inside the group (the cache is prepared before), so minutes suffice.
    dist_timeout_minutes: float = 30.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def image_size(self, model: str) -> tuple[int, int, int]:
        """The (X, Y, Z) crop/pad target for ``model``: 214 for the ResNet, 224 for ViT and fusion (and the
        3D CNN control)."""
        if model not in MODELS + CONTROL_MODELS:
            raise ValueError(f"unknown model {model!r}; choose from {MODELS + CONTROL_MODELS}")
        return self.size_2d if model == "resnet2d" else self.size_3d


PAPER = Profile()

PAPER480 = dataclasses.replace(
    PAPER,
    name="paper480",
    # The CT-CLIP loader's resampling and field of view ("full CT image height/width size of 480x480").
    target_spacing=(0.75, 0.75, 1.5),
    size_2d=(480, 480, 240),
    size_3d=(480, 480, 240),
    gradient_checkpointing=True,
)

DEMO = dataclasses.replace(
    PAPER,
    name="demo",
    # Synthetic phantoms at 2.75 mm resampled to 5.5 x 5.5 x 10 mm, centre-cropped to 56x56 (a 308 mm
    # field of view: the lungs and mediastinum, less the lateral body wall), centre 16 of 24 slices.
    # 360 patients split train:val 7:2 (~280 / 80, as the 400 split 7:2:1 did) for 3 epochs: within 30 minutes
    # on 2 cores the models learn more from more distinct volumes than from a fourth pass over fewer (the ViT,
    # trained from scratch, is data-bound: 8 epochs over 300 patients left its validation AUROC at 0.64).
    # The test split is 300 held-out patients of one volume each (it was ~40 patients, 54 volumes): enough to
    # detect +0.10 AUROC on the 3D class at 80% power; they cost generation and inference, not training.
    synthetic_patients=360,
    synthetic_test_patients=300,
    target_spacing=(5.5, 5.5, 10.0),
    size_2d=(56, 56, 24),
    size_3d=(56, 56, 24),
    num_slices=16,
    # Random initialisation on every machine: the demo's numbers must not depend on whether ImageNet
    # weights can be downloaded (--set weights=IMAGENET1K_V1 tries them, falling back when offline).
    weights=None,
    allow_random_init=True,
    # The ViT: CTViT's encoder at a quarter of the paper's width and half its depth. Its GEGLU is half
    # CTViT's ratio (int(2 * 2/3 * 128) = 170, the parameters of the former 256-wide GELU MLP) to keep the
    # demo's time; mean pooling and the causal PEG are CTViT's / the paper's defaults. CTViT's own patch
    # embedding and per-volume feature norm did not learn at this budget on the toy volumes of ctlib.toys
    # (a 30 mm ball: AUROC 0.46-0.56 after 400 steps, whatever the data, batch, learning rate, pooling or
    # patch size tried; benchmarks/bench_vit_toy.py, docs/results.md). With a convolutional stem and the
    # pooled features standardised over the batch it learns the ball from 342 volumes at this batch and
    # learning rate (0.95 after 200 steps, 0.999 after 400); neither alone did. So the demo uses both (ours, not CTViT's).
    vit_stem="conv",
    vit_feature_norm="batch",
    vit_patch_size=8,
    vit_dim=128,
    vit_spatial_depth=2,
    vit_slice_depth=2,
    vit_heads=4,
    vit_dim_head=32,
    vit_mlp_dim=170,
    device="auto",  # a GPU when torch can use one, else the CPU (the demo is made for a laptop)
    epochs=3,
    # Trained from scratch for a few hundred steps, the running BatchNorm averages lag the weights and
    # the validation loss that picks the checkpoint and steers the scheduler is then meaningless.
    bn_recalibration=32,
    num_workers=0,
    eval_batch_size=16,
)

SMOKE = dataclasses.replace(
    DEMO,
    name="smoke",
    work_dir="data/smoke",
    synthetic_patients=24,
    synthetic_test_patients=8,
    synthetic_shape=(64, 64, 24),
    synthetic_spacing=(5.5, 5.5, 10.0),
    target_spacing=(11.0, 11.0, 20.0),  # 32x32x12
    size_2d=(32, 32, 12),
    size_3d=(32, 32, 12),
    num_slices=8,
    vit_dim=32,
    vit_spatial_depth=1,
    vit_slice_depth=1,
    vit_heads=2,
    vit_dim_head=16,
    vit_mlp_dim=42,  # int(2 * 2/3 * 32), the demo's ratio
    epochs=2,
    batch_size=4,
    eval_batch_size=8,
    bn_recalibration=8,
    bootstrap=50,
)

PROFILES: dict[str, Profile] = {p.name: p for p in (PAPER, PAPER480, DEMO, SMOKE)}


def get_profile(name: str, **overrides: Any) -> Profile:
    """The profile called ``name`` with fields replaced by ``overrides`` (strings are parsed)."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose from {sorted(PROFILES)}")
    prof = PROFILES[name]
    if not overrides:
        return prof
    fields = {f.name: f for f in dataclasses.fields(Profile)}
    parsed = {}
    for key, value in overrides.items():
        if key not in fields or key == "name":
            raise ValueError(f"unknown profile field {key!r}; fields are {sorted(fields)}")
        parsed[key] = _coerce(key, value, getattr(prof, key)) if isinstance(value, str) else value
    return dataclasses.replace(prof, **parsed)


def validate(profile: Profile, world_size: int = 1) -> None:
    """Reject settings that cannot work, before any data or training work starts.

    Raises:
        ValueError naming the field and the value.
    """
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(f"profile {profile.name!r}: {msg}")

    for name in ("epochs", "batch_size", "eval_batch_size", "bootstrap", "prepare_workers", "num_slices",
                 "vit_patch_size"):
        value = getattr(profile, name)
        need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
             f"{name} must be a positive integer, got {value!r}")
    need(profile.vit_pool in VIT_POOLS, f"vit_pool must be one of {VIT_POOLS}, got {profile.vit_pool!r}")
    need(profile.vit_stem in VIT_STEMS, f"vit_stem must be one of {VIT_STEMS}, got {profile.vit_stem!r}")
    need(profile.vit_feature_norm in VIT_FEATURE_NORMS,
         f"vit_feature_norm must be one of {VIT_FEATURE_NORMS}, got {profile.vit_feature_norm!r}")
    need(0.0 <= profile.context_strength <= 1.0,
         f"context_strength must be in [0, 1], got {profile.context_strength!r}")
    for name in ("num_workers", "bn_recalibration", "seed", "split_seed", "warmup_steps", "synthetic_test_patients"):
        value = getattr(profile, name)
        need(isinstance(value, int) and value >= 0, f"{name} must be a non-negative integer, got {value!r}")
    need(world_size >= 1, f"world size must be >= 1, got {world_size}")
    need(profile.device in ("cuda", "cpu", "auto"), f"device must be cuda, cpu or auto, got {profile.device!r}")
    need(profile.per_gpu_batch is None or (isinstance(profile.per_gpu_batch, int) and profile.per_gpu_batch >= 1),
         f"per_gpu_batch must be None or a positive integer, got {profile.per_gpu_batch!r}")
    need(world_size <= profile.batch_size,
         f"batch_size {profile.batch_size} is smaller than the {world_size} processes: each process needs at least "
         f"one volume a step; use at most {profile.batch_size} processes, or --set batch_size={world_size} "
         "(and scale lr)")
    need(profile.max_steps_per_epoch is None or profile.max_steps_per_epoch >= 1,
         f"max_steps_per_epoch must be None or >= 1, got {profile.max_steps_per_epoch!r}")
    need(0.0 <= profile.max_failed_fraction < 1.0,
         f"max_failed_fraction must be in [0, 1), got {profile.max_failed_fraction!r}")
    need(profile.dist_timeout_minutes > 0, f"dist_timeout_minutes must be > 0, got {profile.dist_timeout_minutes!r}")
    need(profile.lr > 0, f"lr must be > 0, got {profile.lr!r}")
    fr = profile.fractions
    need(len(fr) == 3 and all(f > 0 for f in fr) and abs(sum(fr) - 1) < 1e-6,
         f"fractions must be 3 positive numbers summing to 1, got {fr!r}")
    for name in ("size_2d", "size_3d"):
        size = getattr(profile, name)
        need(len(size) == 3 and all(int(v) >= 1 for v in size), f"{name} must be 3 positive sizes, got {size!r}")
        need(profile.num_slices <= size[2], f"num_slices {profile.num_slices} exceeds {name}[2] = {size[2]}")
    need(profile.size_3d[0] == profile.size_3d[1], f"the ViT needs square slices, size_3d is {profile.size_3d}")
    need(profile.size_3d[0] % profile.vit_patch_size == 0,
         f"size_3d {profile.size_3d[0]} is not a multiple of vit_patch_size {profile.vit_patch_size}")


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["epochs=3", "lr=1e-3"]`` -> ``{"epochs": "3", "lr": "1e-3"}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form field=value")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def _coerce(key: str, text: str, current: Any) -> Any:
    """Parse ``text`` for field ``key``: JSON first (numbers, lists, null, true), else the raw string."""
    if text.lower() in ("none", "null"):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    if isinstance(value, list):
        value = tuple(value)
    if isinstance(current, bool) and not isinstance(value, bool):
        raise ValueError(f"{key} expects true/false, got {text!r}")
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, int) and not isinstance(current, bool) and not isinstance(value, int):
        raise ValueError(f"{key} expects an integer, got {text!r}")
    return value


def save_profile(profile: Profile, path: str | Path) -> None:
    Path(path).write_text(json.dumps(profile.to_dict(), indent=2) + "\n")


def load_profile(path: str | Path) -> Profile:
    """Read a profile saved by :func:`save_profile` (lists become tuples again)."""
    raw = json.loads(Path(path).read_text())
    names = {f.name for f in dataclasses.fields(Profile)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"{path}: unknown profile field(s) {unknown}; fields are {sorted(names)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    return Profile(**kwargs)
