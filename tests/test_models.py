"""ResNet2D, ViT3D and Fusion (paper sections 4.1-4.3): shapes, arguments, weights, fusion, attention."""

from __future__ import annotations

import importlib.util
import logging
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from einops import rearrange
from sklearn.metrics import roc_auc_score
from torch import nn

from ctlib.data import CLASSES
from ctlib.models import Fusion, ResNet2D, WeightsUnavailableError, resnet2d_with_fallback
from ctlib.toys import learning_check
from ctlib.vit import (
    PEG,
    ContinuousPositionBias,
    ConvStem,
    GEGLUFeedForward,
    ViT3D,
    ViTBlock,
    VolumeBatchNorm,
)

K = len(CLASSES)
# A tiny ViT: 32x32 slices in 8x8 patches (4x4 = 16 per slice), one spatial and one slice-wise block.
VIT = dict(
    image_size=32,
    patch_size=8,
    max_slices=8,
    dim=32,
    spatial_depth=1,
    slice_depth=1,
    heads=2,
    dim_head=16,
    mlp_dim=64,
)


def volumes(*shape: int, seed: int = 0) -> torch.Tensor:
    """Random volumes in [-1, 1] like the preprocessed cache."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from two threads, and OpenMP threads that share a busy core with another
    process wait for each other at every barrier (measured: 40x slower steps). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def resnet() -> ResNet2D:
    return ResNet2D().eval()


@pytest.fixture(scope="module")
def rgb_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, str]:
    """A torchvision RGB resnet18 with random weights and non-trivial BN statistics, saved as a .pth."""
    torch.manual_seed(1)
    net = torchvision.models.resnet18(weights=None)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    path = tmp_path_factory.mktemp("weights") / "rgb_resnet18.pth"
    torch.save(net.state_dict(), path)
    return net.eval(), str(path)


# --------------------------------------------------------------------------------------------------
# ResNet2D
# --------------------------------------------------------------------------------------------------


def slice_logits(resnet: ResNet2D, x: torch.Tensor) -> torch.Tensor:
    """Per-slice predictions (B, S, H, W) -> (B, S, 18): the classifier on each slice's pooled feature."""
    return resnet.fc(resnet._slice_features(x))


@pytest.mark.parametrize("b,s,size", [(1, 1, 32), (2, 4, 32), (3, 2, 48), (1, 3, 40)])
def test_resnet_shapes_and_mean_aggregation(resnet: ResNet2D, b: int, s: int, size: int) -> None:
    x = volumes(b, s, size, size)
    with torch.no_grad():
        logits = resnet(x)
        logits2, feats = resnet(x, return_features=True)
        per_slice = slice_logits(resnet, x)
    assert logits.shape == (b, K) and feats.shape == (b, 512) and per_slice.shape == (b, s, K)
    torch.testing.assert_close(logits2, logits)
    torch.testing.assert_close(feats, resnet.features(x))
    # The paper's mean of slice logits equals fc of the mean slice feature (fc is linear).
    torch.testing.assert_close(per_slice.mean(dim=1), logits)
    torch.testing.assert_close(resnet.fc(feats), logits, atol=1e-5, rtol=1e-5)


def test_resnet_slices_are_independent(resnet: ResNet2D) -> None:
    """In eval mode a slice's logits do not depend on its neighbours: the model is 2D."""
    x = volumes(1, 3, 32, 32)
    y = x.clone()
    y[0, 2] = volumes(32, 32, seed=5)
    with torch.no_grad():
        a, b = slice_logits(resnet, x), slice_logits(resnet, y)
    torch.testing.assert_close(a[0, :2], b[0, :2])
    assert not torch.allclose(a[0, 2], b[0, 2])


@pytest.mark.parametrize("chunk", [1, 3, 5, 100])
def test_resnet_slice_chunk_gives_the_same_result(resnet: ResNet2D, chunk: int) -> None:
    x = volumes(2, 5, 32, 32)
    chunked = ResNet2D(slice_chunk=chunk).eval()
    chunked.load_state_dict(resnet.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(chunked(x), resnet(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(chunked.features(x), resnet.features(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [{"num_classes": 0}, {"slice_chunk": 0}, {"slice_chunk": 2.5}, {"weights": "IMAGENET"}, {"weights": 3}],
)
def test_resnet_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ResNet2D(**kwargs)


@pytest.mark.parametrize(
    "bad",
    [torch.zeros(2, 32, 32), torch.zeros(2, 1, 3, 32, 32), torch.zeros(1, 2, 32, 32, dtype=torch.int64)],
)
def test_resnet_bad_input(resnet: ResNet2D, bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="ResNet2D expects"):
        resnet(bad)


def test_rgb_weights_become_a_grey_kernel_with_the_same_response(rgb_weights: tuple[nn.Module, str]) -> None:
    rgb, path = rgb_weights
    grey = ResNet2D(weights=path).eval()
    assert grey.weights_used == f"file:{path}"
    torch.testing.assert_close(grey.backbone.conv1.weight, rgb.conv1.weight.sum(dim=1, keepdim=True))
    x = volumes(2, 3, 48, 48)
    rgb_features = nn.Sequential(*list(rgb.children())[:-1])  # everything up to the pooled 512-d features
    with torch.no_grad():
        expected = rgb_features(x.reshape(6, 1, 48, 48).repeat(1, 3, 1, 1)).reshape(2, 3, 512).mean(dim=1)
        got = grey.features(x)
    assert expected.abs().max() > 0.1  # a meaningful comparison, not of zeros
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_torchvision_name_loads_the_hub_cache(monkeypatch, tmp_path, rgb_weights) -> None:
    """``"IMAGENET1K_V1"`` and ``"DEFAULT"`` read torchvision's cached file; no download is attempted."""
    rgb, path = rgb_weights
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth").write_bytes(open(path, "rb").read())

    def no_network(*args, **kwargs):
        raise AssertionError("download attempted although the file is cached")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    for name in ("IMAGENET1K_V1", "DEFAULT", torchvision.models.ResNet18_Weights.IMAGENET1K_V1):
        model = ResNet2D(weights=name)
        assert model.weights_used == "IMAGENET1K_V1"
        torch.testing.assert_close(model.backbone.layer4[1].conv2.weight, rgb.layer4[1].conv2.weight)


def test_failed_download_raises_weights_unavailable(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsUnavailableError, match="IMAGENET1K_V1") as info:
        ResNet2D(weights="IMAGENET1K_V1")
    message = str(info.value)
    assert (
        "no network" in message and str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    )


def test_missing_or_bad_weight_files_raise(tmp_path) -> None:
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        ResNet2D(weights=tmp_path / "nowhere.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="cannot be read"):
        ResNet2D(weights=str(garbage))
    other = tmp_path / "other.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, other)
    with pytest.raises(WeightsUnavailableError, match="do not fit"):
        ResNet2D(weights=str(other))
    torch.save([1, 2, 3], other)
    with pytest.raises(WeightsUnavailableError, match="not a state dict"):
        ResNet2D(weights=str(other))


def test_fallback_to_random_init(tmp_path, caplog) -> None:
    missing = tmp_path / "missing.pth"
    with pytest.raises(WeightsUnavailableError):
        resnet2d_with_fallback(missing, allow_random=False)
    with caplog.at_level(logging.WARNING, logger="ctlib.models"):
        model = resnet2d_with_fallback(missing, allow_random=True, num_classes=5)
    assert model.weights_used == "random" and model.fc.out_features == 5
    assert any(r.levelno == logging.WARNING and "missing.pth" in r.getMessage() for r in caplog.records)
    assert resnet2d_with_fallback(None, allow_random=False).weights_used == "random"


# --------------------------------------------------------------------------------------------------
# ViT3D
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b,s", [(1, 1), (2, 4), (3, 8)])
@pytest.mark.parametrize("size,patch", [(32, 8), (48, 16)])
def test_vit_shapes(b: int, s: int, size: int, patch: int) -> None:
    model = ViT3D(**{**VIT, "image_size": size, "patch_size": patch}).eval()
    x = volumes(b, s, size, size)
    with torch.no_grad():
        logits = model(x)
        logits2, feats = model(x, return_features=True)
    assert logits.shape == (b, K) and feats.shape == (b, 32) and model.feature_dim == 32
    torch.testing.assert_close(logits2, logits)
    torch.testing.assert_close(model.features(x), feats)
    torch.testing.assert_close(model.head(feats), logits)


def test_vit_paper_defaults() -> None:
    model = ViT3D()
    assert (model.image_size, model.patch_size, model.grid, model.dim, model.heads) == (224, 16, 14, 512, 8)
    assert len(model.spatial) == 4 and len(model.across) == 4
    assert model.spatial[0].ff.proj_in.out_features == 2 * 1365  # GEGLU, inner width int(4 * 2/3 * 512)
    assert model.spatial[0].peg.causal and model.pool == "mean"
    assert not any("pos" in name for name, _ in model.named_parameters())  # no absolute embeddings


def paper_vit_parameters(*, p: int = 16, dim: int = 512, depth: int = 8, heads: int = 8, dim_head: int = 64,
                         ff: int = 1365, classes: int = K) -> int:
    """CTViT's encoder at the paper's configuration, part by part (our RMSNorms have a gain only)."""
    inner = heads * dim_head
    patch_embed = 2 * p * p + (p * p * dim + dim) + 2 * dim  # LayerNorm(p^2), Linear(p^2, dim), LayerNorm(dim)
    spatial_bias = (2 * dim + dim) + (dim * dim + dim) + (dim * heads + heads)  # MLP 2 -> dim -> dim -> heads
    peg = 27 * dim + dim  # depthwise 3x3x3 convolution with bias
    attention = dim + dim * 3 * inner + 2 * dim_head + inner * dim  # norm, q k v, q/k scales, out (no biases)
    feed_forward = dim + dim * 2 * ff + ff * dim  # norm, GEGLU in (no bias), out (no bias)
    final_norms = 2 * dim  # one at the end of each transformer
    head = dim + (dim * dim + dim) + (dim * classes + classes)  # RMSNorm, Linear, GELU, Linear
    return patch_embed + spatial_bias + depth * (peg + attention + feed_forward) + final_norms + head


def test_vit_parameter_count_at_the_paper_configuration_is_ctvits() -> None:
    """224x224 slices, patch 16, dim 512, 4 + 4 blocks, 8 heads x 64, GEGLU 1365, 18 classes:
    133,120 (patch embedding) + 268,296 (spatial bias) + 8 x 3,160,704 (blocks: PEG 14,336, attention
    1,049,216, feed-forward 2,097,152) + 1,024 (final norms) + 272,402 (head) = 25,960,474.
    (CTViT's own code has 4,096 more: the bias of its feed-forward LayerNorm, and 4,096 more again in an
    unused ``context_norm`` per attention; the head is ours.)"""
    model = ViT3D()
    assert paper_vit_parameters() == 25_960_474
    assert sum(p.numel() for p in model.parameters()) == paper_vit_parameters()
    block = model.spatial[0]
    assert sum(p.numel() for p in block.peg.parameters()) == 14_336
    assert sum(p.numel() for p in block.attn.parameters()) == 1_049_216
    assert sum(p.numel() for p in block.ff.parameters()) == 2_097_152


@pytest.mark.parametrize("causal", [True, False])
def test_peg_sees_its_3x3x3_neighbourhood_and_nothing_else(causal: bool) -> None:
    """One PEG: the output at (slice 3, row 2, col 2) depends on slices 1-3 (causal) or 2-4, rows and
    columns 1-3, all 27 of them (the weights are random), and on no other token."""
    peg = PEG(4, causal=causal)
    grid = torch.randn(1, 7, 5, 5, 4, requires_grad=True)
    peg(grid)[0, 3, 2, 2].sum().backward()
    reached = grid.grad[0].abs().sum(-1) > 0  # (S, h, w)
    expected = torch.zeros(7, 5, 5, dtype=torch.bool)
    slices = slice(1, 4) if causal else slice(2, 5)
    expected[slices, 1:4, 1:4] = True
    assert torch.equal(reached, expected)


@pytest.mark.parametrize("causal", [True, False])
def test_peg_is_the_depthwise_3d_convolution_of_the_padded_grid(causal: bool) -> None:
    """Run as three 2D convolutions for speed; the same as its Conv3d on the zero-padded grid."""
    peg = PEG(6, causal=causal)
    grid = torch.randn(2, 5, 4, 3, 6)
    x = F.pad(rearrange(grid, "b s h w d -> b d s h w"), (1, 1, 1, 1, *((2, 0) if causal else (1, 1))))
    torch.testing.assert_close(peg(grid), rearrange(peg.conv(x), "b d s h w -> b s h w d"))


@pytest.mark.parametrize("spatial", [True, False], ids=["spatial", "slice-wise"])
def test_a_block_applies_its_peg_on_the_true_token_grid(spatial: bool) -> None:
    """With attention and feed-forward silenced, a block is t + PEG(t): in both token layouts the output
    of (slice 2, row 1, col 2) reads the input tokens of slices 0-2, rows 0-2, columns 1-3, exactly those
    (CTViT's slice-wise transformer reshapes its tokens into a scrambled grid; ours does not)."""
    torch.manual_seed(0)
    b, s, h, w, d = 2, 5, 4, 4, 8
    block = ViTBlock(dim=d, heads=2, dim_head=4, mlp_dim=6, dropout=0.0, peg_causal=True)
    with torch.no_grad():
        block.attn.to_out.weight.zero_()
        block.ff.proj_out.weight.zero_()
    grid = torch.randn(b, s, h, w, d, requires_grad=True)
    layout = "b s h w d -> (b s) (h w) d" if spatial else "b s h w d -> (b h w) s d"
    out, _ = block(rearrange(grid, layout), (b, s, h, w), spatial)
    back = "(b s) (h w) d -> b s h w d" if spatial else "(b h w) s d -> b s h w d"
    rearrange(out, back, b=b, h=h)[1, 2, 1, 2].sum().backward()
    reached = grid.grad.abs().sum(-1) > 0  # (B, S, h, w)
    expected = torch.zeros(b, s, h, w, dtype=torch.bool)
    expected[1, 0:3, 0:3, 1:4] = True
    assert torch.equal(reached, expected)


@pytest.mark.parametrize("inner", [13, 16])
def test_feed_forward_is_geglu_whatever_the_padding(inner: int) -> None:
    """x * GELU(gate) between two bias-free projections; an inner width off a multiple of 8 (padded inside
    for speed) gives the same output and gradients as the formula written out."""
    ff = GEGLUFeedForward(8, inner, 0.0)
    x = torch.randn(3, 5, 8, requires_grad=True)
    h = ff.norm(x) @ ff.proj_in.weight.T
    expected = (h[..., :inner] * F.gelu(h[..., inner:])) @ ff.proj_out.weight.T
    torch.testing.assert_close(ff(x), expected)
    g1 = torch.autograd.grad(ff(x).square().sum(), [x, ff.proj_in.weight, ff.proj_out.weight])
    g2 = torch.autograd.grad(expected.square().sum(), [x, ff.proj_in.weight, ff.proj_out.weight])
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)


def test_spatial_bias_depends_only_on_the_offset() -> None:
    """bias[head, i, j] is the MLP of the (row, column) offset of patch i minus patch j: equal for equal
    offsets anywhere in the slice, different for different offsets."""
    cpb = ContinuousPositionBias(16, 3)
    h, w = 4, 5
    bias = cpb(h, w)  # (heads, N, N)
    assert bias.shape == (3, h * w, h * w)
    pos = [(i // w, i % w) for i in range(h * w)]
    by_offset: dict[tuple[int, int], torch.Tensor] = {}
    for i, (ri, ci) in enumerate(pos):
        for j, (rj, cj) in enumerate(pos):
            off = (ri - rj, ci - cj)
            if off in by_offset:
                torch.testing.assert_close(bias[:, i, j], by_offset[off], rtol=0, atol=0)
            else:
                by_offset[off] = bias[:, i, j]
                d = torch.tensor(off, dtype=torch.float32)
                torch.testing.assert_close(bias[:, i, j], cpb.net(torch.sign(d) * torch.log1p(d.abs())))
    assert len(by_offset) == (2 * h - 1) * (2 * w - 1)
    values = torch.stack(list(by_offset.values()))
    assert torch.unique(values[:, 0]).numel() == len(by_offset)  # distinct offsets, distinct biases


def test_patch_embedding_ignores_a_constant_added_to_a_patch() -> None:
    """The embedding starts with a LayerNorm over each patch's pixels: adding a constant to one patch (a
    different one per patch) changes no token; changing the pattern inside a patch does."""
    model = ViT3D(**VIT).eval()
    x = volumes(2, 3, 32, 32)
    shift = torch.randn(2, 3, 4, 4).repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)  # per 8x8 patch
    with torch.no_grad():
        tokens = model.patch_embed(model.to_patches(x))
        torch.testing.assert_close(model.patch_embed(model.to_patches(x + shift)), tokens, atol=1e-5, rtol=1e-5)
        y = x.clone()
        y[0, 0, 0, 0] += 0.5
        assert not torch.allclose(model.patch_embed(model.to_patches(y))[0, 0, 0], tokens[0, 0, 0], atol=1e-3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_size": 30},  # not divisible by the patch size 8
        {"patch_size": 0},
        {"patch_size": 64},  # larger than the 32-pixel slices
        {"dim": 0},
        {"heads": 0},
        {"dim_head": -1},
        {"spatial_depth": 0},
        {"max_slices": 0},
        {"dropout": 1.0},
        {"num_classes": 0},
        {"mlp_dim": 0},
        {"pool": "max"},
    ],
)
def test_vit_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ViT3D(**{**VIT, **kwargs})


@pytest.mark.parametrize(
    "shape,match",
    [
        ((1, 2, 32, 40), "needs slices of 32x32"),
        ((1, 2, 24, 24), "needs slices"),
        ((1, 9, 32, 32), "max_slices=8"),
        ((2, 32, 32), "expects"),
    ],
)
def test_vit_bad_input(shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ViT3D(**VIT)(torch.zeros(shape))


def test_the_pegs_are_what_orders_the_slices() -> None:
    """Position comes from the PEGs (and, within a slice, the spatial bias): with every PEG silenced the
    slice-wise attention is permutation-equivariant and the mean-pooled ViT cannot tell a volume from its
    slices reversed; with them it can."""
    model = ViT3D(**VIT).eval()
    x = volumes(1, 4, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x.flip(1)), atol=1e-4)
        for block in [*model.spatial, *model.across]:
            block.peg.conv.weight.zero_()
            block.peg.conv.bias.zero_()
        torch.testing.assert_close(model(x), model(x.flip(1)), atol=1e-5, rtol=1e-5)


def test_attention_maps_are_the_weights_sdpa_used() -> None:
    model = ViT3D(**{**VIT, "spatial_depth": 2, "slice_depth": 3}).eval()
    x = volumes(2, 5, 32, 32)
    with torch.no_grad():
        maps = model.attention_maps(x)
        logits = model(x)
    assert maps["spatial"].shape == (2, 5, 2, 2, 16, 16)  # (B, S, L_spatial, heads, N, N)
    assert maps["slice"].shape == (2, 16, 3, 2, 5, 5)  # (B, N, L_slice, heads, S, S)
    for key in ("spatial", "slice"):
        assert (maps[key] >= 0).all()
        torch.testing.assert_close(maps[key].sum(-1), torch.ones(maps[key].shape[:-1]))
    torch.testing.assert_close(maps["logits"], logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps["features"], model.features(x), atol=1e-5, rtol=1e-5)
    # Volumes attend differently: the maps depend on the input.
    assert not torch.allclose(maps["spatial"][0], maps["spatial"][1])


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    plain = ViT3D(**VIT).train()
    ckpt = ViT3D(**VIT, gradient_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x, y = volumes(2, 3, 32, 32), torch.ones(2, K)
    for model in (plain, ckpt):
        F.binary_cross_entropy_with_logits(model(x), y).backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


# --------------------------------------------------------------------------------------------------
# Fusion
# --------------------------------------------------------------------------------------------------


def fusion(**kwargs) -> Fusion:
    return Fusion(vit_kwargs=VIT, **kwargs)


@pytest.mark.parametrize("b,s", [(1, 1), (2, 4)])
@pytest.mark.parametrize("alpha", [1.0, 0.3, "learned"])
def test_fusion_shapes_and_formula(b: int, s: int, alpha: float | str) -> None:
    model = fusion(alpha=alpha).eval()
    x = volumes(b, s, 32, 32)
    with torch.no_grad():
        logits, feats = model(x, return_features=True)
        expected = model.resnet.features(x) + model.alpha_value * model.project(model.vit.features(x))
    assert logits.shape == (b, K) and feats.shape == (b, 512)
    torch.testing.assert_close(feats, expected)
    torch.testing.assert_close(model.features(x), feats)
    torch.testing.assert_close(model(x), model.head(feats))


def test_fusion_alpha_is_a_buffer_or_a_parameter() -> None:
    fixed, learned = fusion(alpha=0.3), fusion(alpha="learned", alpha_init=0.25)
    assert fixed.alpha_value == pytest.approx(0.3) and learned.alpha_value == 0.25
    assert "alpha" in dict(fixed.named_buffers()) and "alpha" not in dict(fixed.named_parameters())
    assert "alpha" in dict(learned.named_parameters())
    assert fixed.beta_value == 1.0 and "beta" not in dict(fixed.named_parameters())
    assert "alpha" in fixed.state_dict()  # a reloaded checkpoint keeps its alpha


def test_fusion_alpha_zero_ignores_the_3d_branch() -> None:
    model = fusion(alpha=0.0).eval()
    x = volumes(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        torch.testing.assert_close(before, model.head(model.resnet.features(x)))
        for p in model.vit.parameters():
            p.fill_(float("nan"))  # whatever the ViT holds
        torch.testing.assert_close(model(x), before)
    model.train()
    F.binary_cross_entropy_with_logits(model(x), torch.ones(2, K)).backward()
    assert all(
        p.grad is None or not p.grad.any() for p in [*model.vit.parameters(), *model.project.parameters()]
    )
    assert model.resnet.backbone.conv1.weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in model.vit.parameters())


def test_fusion_learned_alpha_and_beta_receive_gradients() -> None:
    model = fusion(alpha="learned", learn_2d_weight=True).train()
    assert model.beta_value == 1.0 and model.alpha_value == 0.5
    F.binary_cross_entropy_with_logits(model(volumes(2, 3, 32, 32)), torch.ones(2, K)).backward()
    assert model.alpha.grad is not None and model.alpha.grad.abs() > 0
    assert model.beta.grad is not None and model.beta.grad.abs() > 0


def test_fusion_every_trainable_parameter_gets_a_gradient() -> None:
    """DDP without ``find_unused_parameters``: the branches' own heads are frozen, the rest is used."""
    model = fusion(alpha="learned").train()
    assert not any(p.requires_grad for p in [*model.resnet.fc.parameters(), *model.vit.head.parameters()])
    F.binary_cross_entropy_with_logits(model(volumes(2, 3, 32, 32)), torch.ones(2, K)).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


def test_fusion_uses_given_branches() -> None:
    resnet, vit = ResNet2D(), ViT3D(**{**VIT, "dim": 48})
    model = Fusion(resnet=resnet, vit=vit)
    assert model.resnet is resnet and model.vit is vit and model.project.in_features == 48


@pytest.mark.parametrize(
    "kwargs",
    [
        {"alpha": "learnt"},
        {"alpha": float("nan")},
        {"alpha": True},
        {"alpha_init": float("inf"), "alpha": "learned"},
        {"num_classes": 0},
        {"vit": ViT3D(**VIT), "vit_kwargs": VIT},
        {"resnet": nn.Linear(2, 2), "vit_kwargs": VIT},
    ],
)
def test_fusion_bad_arguments(kwargs: dict) -> None:
    kwargs = kwargs if "vit" in kwargs or "vit_kwargs" in kwargs else {**kwargs, "vit_kwargs": VIT}
    with pytest.raises(ValueError):
        Fusion(**kwargs)


def test_fusion_needs_the_vit_slice_size() -> None:
    with pytest.raises(ValueError, match="needs slices of 32x32"):
        fusion()(volumes(1, 2, 48, 48))


# --------------------------------------------------------------------------------------------------
# Each model can fit a handful of fixed volumes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,lr,steps",
    [
        (lambda: ResNet2D(), 1e-3, 30),
        (lambda: ViT3D(**VIT), 3e-3, 40),
        (lambda: fusion(alpha="learned"), 1e-3, 30),
    ],
    ids=["resnet2d", "vit3d", "fusion"],
)
def test_model_overfits_a_few_volumes(make, lr: float, steps: int) -> None:
    x = volumes(8, 2, 32, 32, seed=3)
    y = (torch.rand(8, K, generator=torch.Generator().manual_seed(4)) < 0.5).float()
    y[0] = 1 - y[1]  # both labels occur in every class, so each class has an AUROC
    model = make().train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, fused=True)
    losses = []
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        scores = torch.sigmoid(model(x))
    assert losses[-1] < losses[0] / 5, losses
    assert roc_auc_score(y.numpy(), scores.numpy(), average="macro") > 0.95


# --------------------------------------------------------------------------------------------------
# The ViT learns a cue that one slice shows (ctlib.toys), given enough distinct volumes
# --------------------------------------------------------------------------------------------------
TOY_VIT = dict(image_size=32, patch_size=8, max_slices=8, dim=32, spatial_depth=1, slice_depth=1, heads=2,
               dim_head=16, mlp_dim=42, num_classes=1)
TOY_CHECK = dict(steps=300, lr=3e-3, warmup_steps=50, batch_size=32, n_train=3000, n_test=200, slices=8, size=32)


@pytest.mark.slow
def test_a_small_vit_learns_the_toy_ball() -> None:
    """8 slices of 32x32 (5.5 mm pixels) with a 30 mm ball or none among thin vessels; a small ViT3D
    (patch 8, dim 32, 1 + 1 blocks) trained 300 steps of batch 32 on 3000 volumes scores >= 0.9 on 200
    others (measured 0.96; ~23 s of CPU, 5 of them making the volumes). It can fail: ViT3D as it was
    before CTViT's parts scored 0.69 here (its logits collapsed), and this one, given 342 volumes instead
    of 3000, memorises them (training loss 0) and scores 0.50 (at lr 2e-3)."""
    result = learning_check(lambda: ViT3D(**TOY_VIT), "ball", **TOY_CHECK)
    assert result.auroc >= 0.9, result


@pytest.mark.slow
def test_the_demo_options_learn_the_toy_ball_from_342_volumes_at_batch_8() -> None:
    """The demo profile's ViT options (a convolutional stem, features standardised over the batch) learn the
    ball at the demo's budget: 342 volumes, batch 8, lr 5e-4, 400 steps (measured 0.999, ~18 s). CTViT's
    own patch embedding scores 0.50 on the same budget (0.49 with the batch norm): it memorises."""
    result = learning_check(lambda: ViT3D(**TOY_VIT, stem="conv", feature_norm="batch"), "ball", steps=400,
                            lr=5e-4, batch_size=8, n_train=342, n_test=200, slices=8, size=32)
    assert result.auroc >= 0.9, result


def test_conv_stem_tokens_are_local_see_density_and_sit_on_the_patch_grid() -> None:
    torch.manual_seed(0)
    stem = ConvStem(8, 32).eval()  # three stride-2 convolutions: a receptive field of 15 pixels
    assert [m.out_channels for m in stem.modules() if isinstance(m, nn.Conv2d)] == [8, 16, 32, 32]
    x = torch.rand(2, 3, 32, 32)
    tokens = stem(x)
    assert tokens.shape == (2, 3, 16, 32)  # (B, S, 4 x 4 patches, dim)
    y = x.clone()
    y[1, 2, 24:, 24:] += 1.0  # the last patch of volume 1, slice 2 (row-major: token 15)
    changed = (stem(y) - tokens).abs().amax(dim=-1) > 1e-6
    assert changed[1, 2, 15] and changed.sum() < changed.numel() / 4
    assert not changed[0].any() and not changed[1, :2].any() and not changed[1, 2, 0]  # far patches, other slices
    with pytest.raises(ValueError, match="power-of-two"):
        ConvStem(6, 32)
    with pytest.raises(ValueError, match="divisible by 4"):
        ConvStem(8, 30)


def test_volume_batch_norm_standardises_over_the_batch_and_takes_a_batch_of_one() -> None:
    norm = VolumeBatchNorm(4)
    x = torch.randn(6, 4) * 3 + 5
    out = norm(x)
    torch.testing.assert_close(out.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(0, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)
    one = norm(x[:1])  # in training: normalised by the running statistics instead of raising
    torch.testing.assert_close(one, norm.eval()(x[:1]))
    net = ViT3D(image_size=16, patch_size=8, max_slices=2, dim=16, spatial_depth=1, slice_depth=1, heads=2,
                dim_head=8, mlp_dim=21, stem="conv", feature_norm="batch").train()
    net(torch.rand(1, 2, 16, 16)).sum().backward()  # a micro-batch of one volume trains
    with pytest.raises(ValueError, match="feature_norm must be one of"):
        ViT3D(feature_norm="layer")


# --------------------------------------------------------------------------------------------------
# The benchmark script still runs against this API
# --------------------------------------------------------------------------------------------------


def test_benchmark_measures_a_tiny_configuration(monkeypatch) -> None:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_models.py"
    spec = importlib.util.spec_from_file_location("bench_models", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_models", bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    rows = []
    for setting in ("fp32", "bf16+ckpt"):
        cfg = bench.Config(
            "cpu", "fusion", setting, batch=1, slices=2, size=32, steps=1, warmup=0, quick=True
        )
        result = bench.measure(cfg)
        assert result["step_s"] > 0 and result["peak_mib"] > 0
        rows.append((cfg, result))
    text = bench.table(rows)
    assert "fusion" in text and "bf16+ckpt" in text and "1.00" in text


def test_resnet_gradient_checkpointing_gives_the_same_gradients_and_batchnorm_statistics():
    import copy

    torch.manual_seed(0)
    plain = ResNet2D()
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing = True
    x = torch.rand(2, 3, 40, 40)
    for m in (plain, ckpt):
        m.train()
        m(x).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-6, msg=name)
    # recomputation in the backward pass does not count the batch twice in the running statistics
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    from ctlib.memory import saved_bytes

    assert saved_bytes(ckpt, x)["activations"] < saved_bytes(plain, x)["activations"] / 3


def test_vit_residual_stream_follows_autocast():
    """Under bf16 autocast every block takes and returns bfloat16 tokens: neither the PEG's float32 bias nor a
    norm computed in float32 (the spatial transformer's output norm) promotes the stream (ctlib.memory counts it
    so); without autocast it stays float32."""
    net = ViT3D(image_size=16, patch_size=8, max_slices=3, dim=16, spatial_depth=2, slice_depth=2, heads=2,
                dim_head=8, mlp_dim=32)
    seen: list[tuple[str, torch.dtype, torch.dtype]] = []
    for name, block in [*(("spatial", b) for b in net.spatial), *(("across", b) for b in net.across)]:
        block.register_forward_hook(lambda mod, args, out, n=name: seen.append((n, args[0].dtype, out[0].dtype)))
    x = torch.rand(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x)
    assert seen == [(n, torch.bfloat16, torch.bfloat16) for n in ("spatial",) * 2 + ("across",) * 2]
    seen.clear()
    net(x)
    assert {(i, o) for _, i, o in seen} == {(torch.float32, torch.float32)}
