"""Attention rollout of the ViT and Grad-CAM of the ResNet (Figure 5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ctlib.attention import (
    as_distribution,
    attention_with_grads,
    compose_rollout,
    concentration,
    find_block,
    gradcam_resnet,
    gradient_rollout,
    normalise_residual,
    rollout,
    salient_slices,
    vit_attention,
    vit_relevance,
    vit_relevance_tokens,
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
    rec = rollout(batched).mean(dim=-2)  # the attention each token receives, averaged over queries
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


# ---------------------------------------------------------------------------------------------
# the exact two-stage composition, against a brute-force rollout over all S*N tokens
# ---------------------------------------------------------------------------------------------
def _full_layers(spatial_layers: list[np.ndarray], slice_layers: list[np.ndarray]) -> list[np.ndarray]:
    """Per-layer (S*N, S*N) token-mixing matrices, token (s, n) at row s*N + n: spatial layers (S, N, N)
    are block-diagonal over slices, slice-wise layers (N, S, S) connect the same position across slices."""
    s, n = spatial_layers[0].shape[0], spatial_layers[0].shape[-1]
    full = []
    for a in spatial_layers:
        m = np.zeros((s * n, s * n))
        for k in range(s):
            m[k * n:(k + 1) * n, k * n:(k + 1) * n] = a[k]
        full.append(m)
    for b in slice_layers:
        m = np.zeros((s * n, s * n))
        for pos in range(n):
            for q in range(s):
                for k in range(s):
                    m[q * n + pos, k * n + pos] = b[pos][q, k]
        full.append(m)
    return full


def _brute_received(full: list[np.ndarray], s: int, n: int) -> np.ndarray:
    r = np.eye(s * n)
    for m in full:  # first layer first: R = M_last @ ... @ M_first
        r = m @ r
    return r.mean(axis=0).reshape(s, n)  # pooled output = mean over every token


def _residual(a: np.ndarray) -> np.ndarray:
    m = 0.5 * a.mean(axis=-3) + 0.5 * np.eye(a.shape[-1])
    return m / m.sum(axis=-1, keepdims=True)


def _tiny_vit(seed: int = 0, **options) -> ViT3D:
    torch.manual_seed(seed)
    return ViT3D(image_size=16, patch_size=4, max_slices=5, dim=16, spatial_depth=2, slice_depth=2, heads=2,
                 dim_head=8, mlp_dim=32, **options).eval()


def test_exact_rollout_equals_brute_force_on_a_tiny_vit():
    vit = _tiny_vit()
    x = torch.randn(5, 16, 16)
    with torch.no_grad():
        maps = vit.attention_maps(x[None])
    sp, sl = maps["spatial"][0].numpy(), maps["slice"][0].numpy()  # (S, L, h, N, N), (N, L', h, S, S)
    s, n = sp.shape[0], sp.shape[-1]
    full = _full_layers([_residual(sp[:, layer]) for layer in range(sp.shape[1])],
                        [_residual(sl[:, layer]) for layer in range(sl.shape[1])])
    brute = _brute_received(full, s, n)
    assert brute.sum() == pytest.approx(1.0)
    exact = compose_rollout(rollout(maps["spatial"][0]), rollout(maps["slice"][0]))
    np.testing.assert_allclose(exact.numpy(), brute, rtol=1e-5, atol=1e-9)
    # vit_attention is that, upsampled to the input grid and normalised to sum 1
    up = F.interpolate(torch.tensor(brute, dtype=torch.float32).reshape(s, 1, 4, 4), size=(16, 16),
                       mode="bilinear", align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(vit_attention(vit, x, normalize="sum"), up / up.sum(), rtol=1e-4, atol=1e-8)


def marginal_rollout(spatial: torch.Tensor, across: torch.Tensor) -> torch.Tensor:
    """The product of the two marginals, ``mean_n' spatial[s][n', n] * mean_q across[n][q, s]`` normalised:
    the approximation compose_rollout must not be (it takes the slice attention at the wrong position)."""
    out = spatial.float().mean(dim=-2) * across.float().mean(dim=-2).T
    return out / out.sum().clamp_min(1e-30)


def test_marginal_product_differs_on_sharp_attention():
    """2 slices x 2 patches. Slice 0 sends every patch to patch 0, slice 1 to patch 1 (sharp, 0.95); the
    slice stage at position 0 attends to slice 1 and at position 1 to slice 0. All attention then flows
    through (slice 0, patch 0) and (slice 1, patch 1); the marginal product looks up the slice attention
    at the wrong position and puts almost all of it on the other two tokens."""
    hi, lo = 0.95, 0.05
    spatial = torch.tensor([[[hi, lo], [hi, lo]], [[lo, hi], [lo, hi]]])  # (S, N, N), rows = queries
    across = torch.tensor([[[lo, hi], [lo, hi]], [[hi, lo], [hi, lo]]])  # (N, S, S)
    full = _full_layers([spatial.numpy()], [across.numpy()])
    brute = _brute_received(full, 2, 2)
    exact = compose_rollout(spatial, across).numpy()
    np.testing.assert_allclose(exact, brute, rtol=1e-6)
    np.testing.assert_allclose(exact, [[0.475, 0.025], [0.025, 0.475]], rtol=1e-6)
    old = marginal_rollout(spatial, across).numpy()
    np.testing.assert_allclose(old, [[0.0475 / 0.19, 0.0475 / 0.19], [0.0475 / 0.19, 0.0475 / 0.19]], rtol=1e-5)
    assert np.abs(old - exact).max() > 0.2  # 0.475 vs 0.25 at the tokens that matter
    # uniform slice attention: the two agree
    flat = torch.full((2, 2, 2), 0.5)
    np.testing.assert_allclose(compose_rollout(spatial, flat).numpy(), marginal_rollout(spatial, flat).numpy(),
                               rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# class-specific maps and the one normalisation
# ---------------------------------------------------------------------------------------------
def test_gradient_rollout_equals_a_hand_computation():
    rng = np.random.default_rng(1)
    att = _row_stochastic(rng, 2, 3, 4, 4)  # (L, heads, N, N)
    grads = rng.normal(size=att.shape)
    r = np.eye(4)
    for layer in range(2):
        a_bar = np.clip(grads[layer] * att[layer], 0, None).mean(axis=0)
        r = r + a_bar @ r
    got = gradient_rollout(torch.tensor(att), torch.tensor(grads))
    np.testing.assert_allclose(got.numpy(), r, rtol=1e-5)
    with pytest.raises(ValueError):
        gradient_rollout(torch.tensor(att), torch.tensor(grads[:1]))


def _forward_keeping(vit: ViT3D, x: torch.Tensor) -> tuple[torch.Tensor, list, list, torch.Tensor]:
    """The ViT's forward pass written out here (not through the library's hooks): logits (1, C), the
    attention of each spatial and slice-wise layer, and the final tokens after ``vit.norm``, (N, S, D)."""
    s, g = x.shape[1], vit.grid
    t = vit.patch_embed(vit.to_patches(x))[0]  # b = 1: (S, N, D)
    bias = vit.spatial_bias(g, g)
    sp, sl = [], []
    for block in vit.spatial:
        t, probs = block(t, (1, s, g, g), True, bias, True)
        sp.append(probs)
    t = vit.spatial_norm(t).transpose(0, 1)  # (N, S, D)
    for block in vit.across:
        t, probs = block(t, (1, s, g, g), False, None, True)
        sl.append(probs)
    final = vit.norm(t)
    w = vit.pool_weights(final, 1)[0].T[..., None]  # (N, S, 1)
    return vit.head(vit.feature_norm((w * final).sum(dim=(0, 1))[None])), sp, sl, final


def _residual_normalised(r: np.ndarray) -> np.ndarray:
    bar = r - np.eye(r.shape[-1])
    rows = bar.sum(axis=-1, keepdims=True)
    return np.where(rows > 0, bar / np.where(rows > 0, rows, 1.0), bar) + np.eye(r.shape[-1])


def _brute_relevance(vit: ViT3D, x: torch.Tensor, k: int) -> np.ndarray:
    """Relevance over all S*N tokens with (S*N, S*N) matrices: per stage R = prod (I + A_bar), eqs. 8-9,
    the two stages multiplied, and the row vector of output-token weights (grad x activation)."""
    logits, sp, sl, final = _forward_keeping(vit, x[None].clone().requires_grad_(True))
    grads = torch.autograd.grad(logits[0, k], [*sp, *sl, final])
    s, n = x.shape[0], sp[0].shape[-1]

    def a_bar(a: torch.Tensor, g: torch.Tensor) -> np.ndarray:
        return (g * a).clamp_min(0).mean(dim=1).detach().double().numpy()  # (batch, N, N) over heads

    stages = []
    for layers in (_full_layers([a_bar(a, g) for a, g in zip(sp, grads[:len(sp)], strict=True)], []),
                   _full_layers([np.zeros((s, n, n))], [a_bar(a, g) for a, g in
                                                        zip(sl, grads[len(sp):-1], strict=True)])[1:]):
        r = np.eye(s * n)
        for m in layers:
            r = r + m @ r
        stages.append(_residual_normalised(r))
    w = (grads[-1] * final).sum(dim=-1).clamp_min(0).T.detach().double().numpy().reshape(-1)  # (S*N,), s*N+n
    w = w / w.sum() if w.sum() > 0 else np.full(s * n, 1.0 / (s * n))
    rel = w @ stages[1] @ stages[0]
    return (rel / rel.sum()).reshape(s, n)


@pytest.mark.parametrize("options", [{}, {"stem": "conv", "feature_norm": "batch"}])  # CTViT's, the demo's
def test_vit_relevance_equals_brute_force_and_is_class_specific(options):
    vit = _tiny_vit(2, **options)
    x = torch.randn(5, 16, 16)
    k = 4
    brute = _brute_relevance(vit, x, k)
    vit.train()
    got = vit_relevance_tokens(vit, x, k)
    assert vit.training and all(p.grad is None for p in vit.parameters()) and "_encode" not in vars(vit)
    assert not vit.norm._forward_hooks  # the hook on the final norm is gone
    np.testing.assert_allclose(got.numpy(), brute, rtol=1e-4, atol=1e-9)
    assert float(got.sum()) == pytest.approx(1.0, abs=1e-5)
    other = vit_relevance_tokens(vit, x, 9)
    assert not np.allclose(got.numpy(), other.numpy(), rtol=1e-3)  # another class, another map
    vol = vit_relevance(vit, x, k)
    assert vol.shape == (5, 16, 16) and vol.min() >= 0 and vol.sum() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="class_index"):
        vit_relevance(vit, x, 18)


def test_weighted_composition_of_identity_rollouts_is_the_weights():
    """No attention relevance (R = I): each input token gets its own output token's weight, not 1/(S*N)."""
    s, n = 3, 4
    w = torch.arange(1.0, s * n + 1).reshape(s, n)
    spatial, across = torch.eye(n).expand(s, n, n), torch.eye(s).expand(n, s, s)
    np.testing.assert_allclose(compose_rollout(spatial, across, w).numpy(), (w / w.sum()).numpy(), rtol=1e-6)
    np.testing.assert_allclose(compose_rollout(spatial, across).numpy(), 1 / (s * n), rtol=1e-6)
    np.testing.assert_allclose(compose_rollout(spatial, across, torch.zeros(s, n)).numpy(), 1 / (s * n))
    for bad in (torch.ones(n, s), -w):
        with pytest.raises(ValueError, match="weights"):
            compose_rollout(spatial, across, bad)
    # eqs. 8-9: the attention part of each row sums to 1, an identity row stays one
    r = torch.tensor([[1.0, 0.0], [0.02, 1.06]])
    np.testing.assert_allclose(normalise_residual(r).numpy(), [[1.0, 0.0], [0.25, 1.75]], rtol=1e-6)
    with pytest.raises(ValueError, match="negative"):
        normalise_residual(torch.zeros(2, 2))


def test_vit_relevance_without_attention_relevance_is_the_output_token_weights():
    """With every attention output projection zeroed, no logit depends on the attention (R = I): the map is
    the grad x activation weight of each final token, which the former equal weighting made uniform."""
    vit = _tiny_vit(4)
    for block in [*vit.spatial, *vit.across]:
        nn.init.zeros_(block.attn.to_out.weight)
    x = torch.randn(5, 16, 16)
    logits, _, _, final = _forward_keeping(vit, x[None])
    g = torch.autograd.grad(logits[0, 1], final)[0]
    w = (g * final).sum(dim=-1).clamp_min(0).T.detach()
    assert (w == 0).any() and w.max() > 3 * w[w > 0].min()  # far from uniform
    got = vit_relevance_tokens(vit, x, 1)
    np.testing.assert_allclose(got.numpy(), (w / w.sum()).numpy(), rtol=1e-5, atol=1e-9)


def test_one_normalisation_for_both_models():
    resnet, vit, fusion = _tiny_models(3)
    x = torch.randn(6, 32, 32)
    rel = vit_relevance(fusion, x, 2)  # fusion logit, through the .vit branch
    cam = gradcam_resnet(fusion, x, 2, normalize="sum")
    for m in (rel, cam):
        assert m.shape == (6, 32, 32) and m.min() >= 0.0 and m.sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(as_distribution(gradcam_resnet(fusion, x, 2)), cam, rtol=1e-4, atol=1e-9)
    assert "_encode" not in vars(fusion.vit)
    np.testing.assert_allclose(as_distribution(np.zeros((2, 2, 2))), 1 / 8)  # no evidence: uniform
    np.testing.assert_allclose(as_distribution(np.array([[[-1.0, 3.0]]])), [[[0.0, 1.0]]])
    with pytest.raises(ValueError, match="did not run its ViT"):
        vit_relevance(Fusion(resnet=resnet, vit=vit, alpha=0.0), x, 2)


# ---------------------------------------------------------------------------------------------
# localisation on a phantom with a known lesion
# ---------------------------------------------------------------------------------------------
_PH_S, _PH_SIDE, _PH_PATCH = 4, 16, 4  # 4 slices of 16x16, a 4x4 patch grid: 64 tokens


def _add_cube(x: torch.Tensor, s0: int, r: int, c: int) -> None:
    """A bright block in the centre 2x2 pixels of patch (r, c) on slices s0 and s0 + 1 of x (..., S, H, W),
    in place. (A block filling the whole patch would be invisible: the ViT's patch embedding starts with a
    LayerNorm over the patch's pixels, which removes a constant added to all of them.)"""
    p, q = _PH_PATCH, _PH_PATCH // 4
    x[..., s0:s0 + 2, r * p + q:(r + 1) * p - q, c * p + q:(c + 1) * p - q] += 3.0


def _phantom_detector() -> ViT3D:
    """A tiny ViT trained (200 Adam steps, seconds on a CPU) to tell noise with the cube somewhere from
    noise alone, as logit 0. Held-out accuracy is about 1."""
    torch.manual_seed(0)
    vit = ViT3D(image_size=_PH_SIDE, patch_size=_PH_PATCH, max_slices=_PH_S, dim=16, spatial_depth=1,
                slice_depth=1, heads=2, dim_head=8, mlp_dim=32, num_classes=2)
    opt = torch.optim.Adam(vit.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    grid = _PH_SIDE // _PH_PATCH
    for _ in range(200):
        x = torch.randn(32, _PH_S, _PH_SIDE, _PH_SIDE, generator=gen)
        y = (torch.rand(32, generator=gen) < 0.5).float()
        for i in torch.nonzero(y).ravel().tolist():
            s0 = int(torch.randint(0, _PH_S - 1, (1,), generator=gen))
            r, c = torch.randint(0, grid, (2,), generator=gen).tolist()
            _add_cube(x[i], s0, r, c)
        loss = F.binary_cross_entropy_with_logits(vit(x)[:, 0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return vit.eval()


def test_vit_relevance_finds_the_lesion_of_a_phantom():
    vit = _phantom_detector()
    gen = torch.Generator().manual_seed(5)
    grid, p = _PH_SIDE // _PH_PATCH, _PH_PATCH
    fraction = 2 * p * p / (_PH_S * _PH_SIDE**2)  # share of the volume the cube's 2 patches fill: 1/32
    hits, masses, old_masses = 0, [], []
    for s0, r, c in [(1, 1, 2), (0, 3, 0), (2, 0, 3), (1, 2, 1)]:
        x = torch.randn(_PH_S, _PH_SIDE, _PH_SIDE, generator=gen)
        _add_cube(x, s0, r, c)
        with torch.no_grad():
            assert vit(x[None])[0, 0] > 0  # detected
        tokens = vit_relevance_tokens(vit, x, 0)
        best_slice, best_patch = np.unravel_index(int(tokens.argmax()), tokens.shape)
        hits += int(best_patch == r * grid + c and s0 <= best_slice <= s0 + 1)  # pointing game
        vol = vit_relevance(vit, x, 0)  # on the voxel grid, summing to 1
        masses.append((float(tokens[s0:s0 + 2, r * grid + c].sum()),
                       float(vol[s0:s0 + 2, r * p:(r + 1) * p, c * p:(c + 1) * p].sum())))
        # the former map: equal output-token weights, rollouts not normalised
        attn, grads, _, _ = attention_with_grads(vit, vit, x[None], 0)
        old = compose_rollout(gradient_rollout(torch.stack(attn[:1], 1), torch.stack(grads[:1], 1)),
                              gradient_rollout(torch.stack(attn[1:], 1), torch.stack(grads[1:], 1)))
        old_masses.append(float(old[s0:s0 + 2, r * grid + c].sum() / old.sum()))
    assert hits >= 3  # 4 of 4 here
    token_mass, voxel_mass = np.array(masses).T  # here 5.9-9.3x and 3.6-7.3x the cube's share
    assert token_mass.min() > 3 * fraction and voxel_mass.min() > 2.5 * fraction  # (bilinear upsampling blurs)
    assert max(old_masses) < 1.5 * fraction  # the former map: 1.04-1.12x, close to uniform
