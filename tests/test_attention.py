"""Attention rollout of the ViT and Grad-CAM of the ResNet (Figure 5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ctlib.attention import (
    concentration,
    find_block,
    gradcam_resnet,
    received_attention,
    rollout,
    salient_slices,
    vit_attention,
)
from ctlib.models import Fusion, ResNet2D, ViT3D


def _row_stochastic(rng: np.random.Generator, *shape: int) -> np.ndarray:
    a = rng.random(shape)
    return a / a.sum(axis=-1, keepdims=True)


def test_rollout_equals_a_hand_computation():
    rng = np.random.default_rng(0)
    att = _row_stochastic(rng, 2, 2, 3, 3)  # (L=2, heads=2, N=3, N=3)
    eye = np.eye(3)
    layers = []
    for layer in att:
        m = 0.5 * layer.mean(axis=0) + 0.5 * eye
        layers.append(m / m.sum(axis=1, keepdims=True))
    expected = layers[1] @ layers[0]
    got = rollout(torch.tensor(att))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    # without the residual term: the plain product of head means
    plain = att[1].mean(axis=0) @ att[0].mean(axis=0)
    np.testing.assert_allclose(rollout(torch.tensor(att), residual=False).numpy(), plain, rtol=1e-6)
    # batched leading dims, and received attention sums to 1
    batched = torch.tensor(np.stack([att, att]))
    assert rollout(batched).shape == (2, 3, 3)
    rec = received_attention(batched)
    np.testing.assert_allclose(rec.sum(dim=-1).numpy(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(rec[0].numpy(), expected.mean(axis=0), rtol=1e-6)
    with pytest.raises(ValueError):
        rollout(torch.ones(3, 3))


class _FakeViT(nn.Module):
    """attention_maps returns fixed probabilities: every query looks at ``hot`` patch, slice ``hot_slice``."""

    def __init__(self, s: int, n: int, hot: int, hot_slice: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        spatial = torch.full((1, s, 2, 2, n, n), 0.1 / (n - 1))
        spatial[..., hot] = 0.9
        across = torch.full((1, n, 1, 2, s, s), 0.1 / (s - 1))
        across[..., hot_slice] = 0.9
        self.maps = {"spatial": spatial, "slice": across}

    def attention_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.maps


def test_vit_attention_points_at_the_attended_patch_and_slice():
    s, h, w, p = 4, 16, 16, 4
    n = (h // p) * (w // p)
    hot = 5  # row 1, column 1 of the 4x4 patch grid: pixels 4..7 x 4..7
    fake = _FakeViT(s, n, hot, hot_slice=2)
    fake.train()
    sal = vit_attention(fake, torch.zeros(s, h, w))
    assert sal.shape == (s, h, w) and sal.dtype == np.float32
    assert sal.min() == 0.0 and sal.max() == pytest.approx(1.0)
    assert fake.training  # mode restored
    r, c = np.unravel_index(np.argmax(sal[2]), (h, w))
    assert 4 <= r <= 7 and 4 <= c <= 7
    per_slice = sal.reshape(s, -1).sum(axis=1)
    assert int(np.argmax(per_slice)) == 2
    flat = vit_attention(fake, np.zeros((s, h, w), np.float32), slice_weighting=False)
    np.testing.assert_allclose(flat[0], flat[3], atol=1e-6)  # no slice weighting: all slices alike
    with pytest.raises(ValueError, match="attention_maps"):
        vit_attention(nn.Linear(2, 2), torch.zeros(s, h, w))


def _tiny_models(seed: int = 0) -> tuple[ResNet2D, ViT3D, Fusion]:
    torch.manual_seed(seed)
    vit = ViT3D(image_size=32, patch_size=8, max_slices=6, dim=16, spatial_depth=2, slice_depth=1, heads=2,
                dim_head=8, mlp_dim=32)
    resnet = ResNet2D(weights=None)
    return resnet, vit, Fusion(resnet=resnet, vit=vit, alpha="learned")


def test_vit_attention_on_the_real_models():
    _, vit, fusion = _tiny_models()
    x = torch.randn(6, 32, 32)
    a = vit_attention(vit, x)
    b = vit_attention(fusion, x)  # through the .vit branch
    assert a.shape == (6, 32, 32) and 0.0 <= a.min() and a.max() <= 1.0 and a.max() == pytest.approx(1.0)
    np.testing.assert_allclose(a, b, atol=1e-6)


class _ToyResNet(nn.Module):
    """layer4 = identity-like 1x1 conv; logit 0 rises with the mean activation, logit 1 falls."""

    def __init__(self) -> None:
        super().__init__()
        self.layer4 = nn.Conv2d(1, 1, 1, bias=False)
        self.fc = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.layer4.weight.fill_(1.0)
            self.fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h, w = x.shape
        a = self.layer4(x.reshape(b * s, 1, h, w))
        slice_logits = self.fc(a.mean(dim=(2, 3)))
        return slice_logits.reshape(b, s, 2).mean(dim=1)


def test_gradcam_highlights_the_only_region_that_differs():
    toy = _ToyResNet()
    x = torch.zeros(4, 8, 8)
    x[2, 2:5, 3:6] = 1.0
    cam = gradcam_resnet(toy, x, 0)
    expected = np.zeros((4, 8, 8), np.float32)
    expected[2, 2:5, 3:6] = 1.0
    np.testing.assert_allclose(cam, expected, atol=1e-6)
    # the other class is lowered by that region: no positive evidence anywhere
    np.testing.assert_allclose(gradcam_resnet(toy, x, 1), 0.0)
    with pytest.raises(ValueError, match="class_index"):
        gradcam_resnet(toy, x, 2)
    with pytest.raises(ValueError, match="layer4"):
        find_block(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="layer3"):
        gradcam_resnet(toy, x, 0, layer="layer3")


def test_gradcam_on_the_real_models_restores_their_state():
    resnet, _, fusion = _tiny_models(1)
    x = torch.randn(3, 32, 32)
    fusion.train()
    before = {k: v.clone() for k, v in fusion.state_dict().items()}
    cam_f = gradcam_resnet(fusion, x, 3)
    assert fusion.training and all(p.grad is None for p in fusion.parameters())
    for k, v in fusion.state_dict().items():  # batch-norm statistics untouched (eval during the pass)
        torch.testing.assert_close(v, before[k])
    assert cam_f.shape == (3, 32, 32) and cam_f.min() >= 0.0 and cam_f.max() <= 1.0
    cam_r = gradcam_resnet(resnet, x, 3)
    other = gradcam_resnet(resnet, x, 7)
    assert cam_r.shape == (3, 32, 32) and cam_r.min() >= 0.0 and cam_r.max() == pytest.approx(1.0)
    assert not np.allclose(cam_r, other)  # the map depends on the class explained
    assert find_block(fusion.resnet) is resnet.backbone.layer4
    assert find_block(fusion, "layer3") is resnet.backbone.layer3
    fine = gradcam_resnet(resnet, x, 3, layer="layer3")
    assert fine.shape == (3, 32, 32) and fine.min() >= 0.0


def test_salient_slices():
    sal = np.zeros((8, 2, 2))
    sal[[1, 2, 6], ...] = [[[3.0]], [[2.9]], [[2.0]]]
    assert salient_slices(sal, 2) == [1, 2]
    assert salient_slices(sal, 2, min_gap=2) == [1, 6]
    assert salient_slices(sal, 20) == list(range(8))


def test_concentration_tells_focal_from_diffuse():
    diffuse = np.ones((4, 10, 10))
    focal = np.zeros((4, 10, 10))
    focal[1, 2:4, 2:4] = 1.0  # 4 of 400 voxels
    assert concentration(diffuse, 0.05) == pytest.approx(0.05)
    assert concentration(focal, 0.05) == pytest.approx(1.0)
    assert np.isnan(concentration(np.zeros((2, 2, 2))))
    with pytest.raises(ValueError):
        concentration(diffuse, 0.0)
