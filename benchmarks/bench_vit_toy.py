"""Can the demo's ViT3D learn? Test AUROC on the toy volumes of :mod:`ctlib.toys`, beside a 3D CNN.

Trains the ViT3D exactly as the demo profile builds it (one logit instead of 18) and the small 3D CNN
control (:class:`ctlib.models.CNN3D`, one logit) on 342 toy volumes for ``--steps`` AdamW steps of batch 8, then
scores 300 fresh ones, for two cues: ``ball`` (a 30 mm ball, visible on any one slice) and ``order``
(the same multiset of slices in both classes, only their order along z differs: a model that ignores
slice order scores 0.5). Learning rate, warm-up and batch: the profile's for the ViT unless given,
``--cnn-lr`` for the CNN. One thread per run; a demo-sized ViT run of 400 steps takes ~10 minutes on an
idle core (more on a shared machine), the CNN ~3.

    python benchmarks/bench_vit_toy.py                          # both cues, ViT and CNN, the demo's budget
    python benchmarks/bench_vit_toy.py --kinds ball --models vit3d --steps 200
    python benchmarks/bench_vit_toy.py --set vit_pool=attention # another ViT setting of the profile
    python benchmarks/bench_vit_toy.py --n-train 3000 --batch 32 --lr 3e-3 --warmup 50   # more data
    python benchmarks/bench_vit_toy.py --set vit_stem=patch vit_feature_norm=rms   # CTViT's own, at demo size
    python benchmarks/bench_vit_toy.py --set vit_stem=patch --variant no-patch-layernorm --augment   # diagnostics
    python benchmarks/bench_vit_toy.py --kinds order beads --variant stem-3-slices

``--variant no-patch-layernorm`` (a diagnostic, not an option of ``ViT3D``; with ``vit_stem=patch``) drops
CTViT's LayerNorm over each patch's pixels, which normalises away a patch's mean, i.e. its density in HU.
``--variant stem-3-slices`` (with the demo's convolutional stem) makes the stem's first convolution span 3
slices, so that every token sees its neighbours along z before any attention: does a ViT that sees slice
order in its tokens learn the ``order`` and ``beads`` cues? (Measured: no; docs/results.md.)
``--augment``: random flips, transposes and in-plane shifts of each training volume.
"""

from __future__ import annotations

import argparse
import time

import torch
from einops import rearrange
from torch import Tensor, nn

from ctlib.models import CNN3D, ViT3D, vit_kwargs
from ctlib.profiles import get_profile, parse_overrides
from ctlib.toys import KINDS, learning_check
from ctlib.vit import ConvStem

VARIANTS = ("none", "no-patch-layernorm", "stem-3-slices")


class ThreeSliceStem(nn.Module):
    """The diagnostic ``stem-3-slices``: a :class:`ctlib.vit.ConvStem` whose first convolution spans 3 slices
    (3x3x3, stride 1 along the slices, zero-padded; then its BatchNorm and ReLU over the volume), so that each
    token sees its slice and the ones above and below before any attention; the rest of the stem as it is."""

    def __init__(self, stem: ConvStem) -> None:
        super().__init__()
        first = stem.net[0]
        self.first = nn.Sequential(
            nn.Conv3d(1, first.out_channels, 3, stride=(1, 2, 2), padding=1, bias=False),
            nn.BatchNorm3d(first.out_channels), nn.ReLU())
        self.rest = stem.net[3:]

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        y = rearrange(self.first(x[:, None]), "b c s h w -> (b s) c h w")
        return rearrange(self.rest(y), "(b s) d h w -> b s (h w) d", b=b)


def vit_variant(model: ViT3D, variant: str) -> ViT3D:
    """``model`` with the diagnostic change ``variant`` (see the module's doc)."""
    if variant == "no-patch-layernorm":
        if model.stem != "patch":
            raise SystemExit("--variant no-patch-layernorm needs CTViT's patch embedding: --set vit_stem=patch")
        model.patch_embed[0] = torch.nn.Identity()
    elif variant == "stem-3-slices":
        if model.stem != "conv":
            raise SystemExit("--variant stem-3-slices needs the convolutional stem: --set vit_stem=conv")
        model.patch_embed = ThreeSliceStem(model.patch_embed)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="profile overrides")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--models", nargs="+", choices=("vit3d", "cnn3d"), default=["vit3d", "cnn3d"])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--n-train", type=int, default=342, help="distinct training volumes")
    parser.add_argument("--batch", type=int, default=None, help="default: the profile's batch_size")
    parser.add_argument("--lr", type=float, default=None, help="ViT learning rate; default: the profile's")
    parser.add_argument("--warmup", type=int, default=None, help="ViT warm-up steps; default: the profile's")
    parser.add_argument("--every", type=int, default=100, help="test AUROC every so many steps (0: at the end)")
    parser.add_argument("--variant", choices=VARIANTS, default="none", help="a diagnostic change to the ViT")
    parser.add_argument("--augment", action="store_true", help="flip, transpose and shift each training volume")
    parser.add_argument("--cnn-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    profile = get_profile(args.profile, **parse_overrides(args.set))
    kwargs = {**vit_kwargs(profile, "vit3d"), "num_classes": 1, "image_size": 56, "max_slices": 16}
    batch = args.batch or profile.batch_size
    vit_lr = args.lr if args.lr is not None else profile.lr
    vit_warmup = args.warmup if args.warmup is not None else profile.warmup_steps
    print(f"toy volumes 16 x 56 x 56, {args.n_train} for training, 300 for testing; batch {batch}")
    print(f"ViT3D {kwargs}; lr {vit_lr}, warm-up {vit_warmup}, variant {args.variant}. CNN3D: lr {args.cnn_lr}. "
          f"Augmentation: {'on' if args.augment else 'off'}")
    print(f"{'model':<7} {'cue':<6} {'steps':>5} {'AUROC':>6} {'logit sd':>9} {'loss':>6} {'seconds':>8}  AUROC by step")
    for kind in args.kinds:
        for model in args.models:
            if model == "vit3d":
                make, lr, warmup = (lambda: vit_variant(ViT3D(**kwargs), args.variant)), vit_lr, vit_warmup
            else:
                make, lr, warmup = (lambda: CNN3D(num_classes=1)), args.cnn_lr, 0
            start = time.perf_counter()
            r = learning_check(make, kind, steps=args.steps, lr=lr, warmup_steps=warmup, n_train=args.n_train,
                               weight_decay=profile.weight_decay, batch_size=batch, seed=args.seed,
                               curve_every=args.every, augmentation=args.augment)
            curve = " ".join(f"{k}:{v:.2f}" for k, v in r.curve.items())
            print(f"{model:<7} {kind:<6} {r.steps:>5} {r.auroc:>6.3f} {r.logit_std:>9.3g} {r.final_loss:>6.3f} "
                  f"{time.perf_counter() - start:>8.0f}  {curve}", flush=True)


if __name__ == "__main__":
    main()
