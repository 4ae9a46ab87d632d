"""The toy volumes of the learning checks (ctlib.toys): the cue is there, and only where it should be."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import minimum_filter

from ctlib.metrics import auroc_rank
from ctlib.models import CNN3D
from ctlib.toys import augment, toy_dataset, toy_volume
from ctlib.vit import ViT3D


def test_volumes_are_balanced_and_in_range() -> None:
    x, y = toy_dataset("ball", 20, seed=0)
    assert x.shape == (20, 16, 56, 56) and x.dtype == torch.float32 and y.sum() == 10
    assert x.min() >= -1.0 and x.max() <= 1.0
    torch.testing.assert_close(toy_dataset("ball", 20, seed=0)[0], x)  # seeded


def test_the_ball_is_the_wide_body() -> None:
    """A 3x3 in-plane minimum above -300 HU, away from structures that run through every slice (the rim),
    ranks the volumes with the ball first (vessels are at most 2.8 px wide; two that touch can pass)."""
    x, y = toy_dataset("ball", 60, seed=3)
    wide = minimum_filter(x.numpy(), size=(1, 1, 3, 3)) > -0.3
    through = wide.sum(axis=1, keepdims=True) >= x.shape[1] - 1
    score = (wide & ~through).sum(axis=(1, 2, 3))
    assert auroc_rank(y.numpy(), score)[0] > 0.95


@pytest.mark.parametrize(("kind", "n"), [("order", 7), ("beads", 4)])
def test_order_twins_hold_the_same_discs_in_another_order(kind, n) -> None:
    """The same anatomy with and without the cue (one seed): the column's discs, what the volume adds to
    the anatomy alone (the ball toy's negative of that seed), cover the same areas slice by slice up to a
    reordering of the slices, and in another order."""
    for seed in range(5):
        anatomy = toy_volume(np.random.default_rng(seed), "ball", False)
        areas = [(toy_volume(np.random.default_rng(seed), kind, positive) != anatomy).sum(axis=(1, 2))
                 for positive in (True, False)]
        assert sorted(areas[0]) == sorted(areas[1]) and not np.array_equal(areas[0], areas[1])
        assert (areas[0] > 0).sum() == n


def test_beads_put_the_large_discs_apart_in_a_positive() -> None:
    """In a positive the two slices with the largest added area are two apart, in a negative adjacent."""
    for seed in range(6):
        anatomy = toy_volume(np.random.default_rng(seed), "ball", False)
        for positive, gap in ((True, 2), (False, 1)):
            area = (toy_volume(np.random.default_rng(seed), "beads", positive) != anatomy).sum(axis=(1, 2))
            top = np.sort(np.argsort(area)[-2:])
            assert top[1] - top[0] == gap, (seed, positive, area)


def test_toy_arguments() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="kind"):
        toy_volume(rng, "cube", True)
    with pytest.raises(ValueError, match="at least 7"):
        toy_volume(rng, "order", True, slices=6)
    with pytest.raises(ValueError, match="at least 4"):
        toy_volume(rng, "beads", True, slices=3)
    assert toy_volume(rng, "beads", False, slices=4, size=32).shape == (4, 32, 32)
    assert toy_volume(rng, "ball", True, slices=3, size=32).shape == (3, 32, 32)


def test_cnn_control_shapes() -> None:
    assert CNN3D(num_classes=1)(torch.zeros(2, 16, 56, 56)).shape == (2, 1)
    assert CNN3D(num_classes=3)(torch.zeros(1, 7, 30, 30)).shape == (1, 3)


def test_augment_rearranges_the_voxels_of_each_volume() -> None:
    x, _ = toy_dataset("ball", 12, seed=4)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for a, b in zip(x, out, strict=True):  # every volume keeps its voxels, only their places change
        torch.testing.assert_close(a.flatten().sort().values, b.flatten().sort().values, rtol=0, atol=0)
    assert sum(not torch.equal(a, b) for a, b in zip(x, out, strict=True)) >= 10
    torch.testing.assert_close(augment(x, torch.Generator().manual_seed(0)), out, rtol=0, atol=0)


def test_bench_variant_no_patch_layernorm_lets_density_through() -> None:
    """The benchmark's diagnostic: without CTViT's patch LayerNorm a patch's density reaches the tokens (a
    constant added to every pixel changes them); CTViT's embedding is blind to it."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_vit_toy", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vit_toy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    kw = dict(image_size=16, patch_size=8, max_slices=2, dim=16, spatial_depth=1, slice_depth=1, heads=2,
              dim_head=8, mlp_dim=21, num_classes=1)
    x = torch.rand(3, 2, 16, 16) * 0.1
    for variant, blind in (("none", True), ("no-patch-layernorm", False)):
        torch.manual_seed(0)
        net = bench.vit_variant(ViT3D(**kw), variant).eval()
        embed = lambda v, net=net: net.patch_embed(net.to_patches(v))  # noqa: E731
        assert torch.allclose(embed(x), embed(x + 0.5), atol=1e-4) == blind, variant
    with pytest.raises(SystemExit, match="vit_stem=patch"):
        bench.vit_variant(ViT3D(**kw, stem="conv"), "no-patch-layernorm")
    with pytest.raises(SystemExit, match="vit_stem=conv"):
        bench.vit_variant(ViT3D(**kw), "stem-3-slices")
    # stem-3-slices: a token sees the slices next to its own, and nothing further along z
    kw3 = {**kw, "max_slices": 5, "stem": "conv"}
    torch.manual_seed(0)
    net = bench.vit_variant(ViT3D(**kw3), "stem-3-slices").eval()
    x = torch.rand(1, 5, 16, 16)
    y = x.clone()
    y[0, 2] += 0.5
    moved = (net.patch_embed(y) - net.patch_embed(x)).abs().amax(dim=(0, 2, 3))
    assert (moved[1:4] > 1e-4).all() and (moved[[0, 4]] == 0).all(), moved
    assert net.patch_embed(x).shape == ViT3D(**kw3).patch_embed(x).shape == (1, 5, 4, 16)
