"""ctlib.memory: the estimate of a step's peak memory, checked against the bytes autograd actually saves."""

from __future__ import annotations

import warnings

import pytest
import torch

from ctlib.memory import GIB, estimate, largest_fitting_batch, oom_message, saved_bytes
from ctlib.models import build_model
from ctlib.profiles import get_profile

# Sizes where no activation has a parameter's shape (saved_bytes tells weight copies by shape).
SIZES = dict(size_2d=(48, 40, 12), size_3d=(48, 48, 12), vit_patch_size=8, vit_mlp_dim=96, vit_heads=3)


def _activations(est) -> int:
    return sum(v for k, v in est.parts.items() if k.startswith("activations"))


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize(("model", "batch", "stem"), [("resnet2d", 2, "patch"), ("vit3d", 2, "patch"), ("vit3d", 2, "conv"),
                                                     ("fusion", 2, "conv"), ("vit3d", 1, "patch"), ("vit3d", 1, "conv")])
def test_estimated_activations_match_what_autograd_saves(model, batch, stem, bf16, checkpointing):
    torch.set_num_threads(1)
    prof = get_profile("smoke", gradient_checkpointing=checkpointing, vit_stem=stem, **SIZES)
    torch.manual_seed(0)
    net = build_model(prof, model, pretrained=False)
    x2, y2, _ = prof.image_size(model)
    x = torch.rand(batch, prof.num_slices, y2, x2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rms_norm: bfloat16 input, float32 weight (the estimate counts it)
        measured = saved_bytes(net, x, autocast_dtype=torch.bfloat16 if bf16 else None)["activations"]
    est = _activations(estimate(prof, model, batch, bf16=bf16, device="cpu"))  # measured on the CPU
    assert abs(est - measured) / measured < 0.05, (est, measured)


def test_checkpointing_and_bf16_shrink_the_estimate_and_batch_scales_it():
    prof = get_profile("paper480")
    full = estimate(prof, "fusion", 8, checkpointing=False)
    ckpt = estimate(prof, "fusion", 8)
    assert ckpt.checkpointing and ckpt.total < full.total / 3
    assert estimate(prof, "fusion", 8, bf16=False, checkpointing=False).total > full.total
    # checkpointed activations grow linearly with the batch (the position bias MLP's are per step, not per volume)
    one, two = (_activations(estimate(prof, "fusion", m)) for m in (1, 2))
    assert _activations(ckpt) - one == 7 * (two - one)


def test_paper_profiles_fit_an_h100_at_eight_volumes():
    h100 = int(79.1 * GIB)
    for name in ("paper", "paper480"):
        e = estimate(get_profile(name), "fusion", 8)
        assert e.total < 0.9 * h100, e.line(h100)
        assert f"of {h100 / GIB:.1f} GiB on H100" in e.line(h100, "H100")
    assert estimate(get_profile("paper480"), "fusion", 8, checkpointing=False).total > h100


def test_oom_message_names_the_per_gpu_batch_that_fits():
    prof = get_profile("paper480", gradient_checkpointing=False)
    dev = int(79.1 * GIB)
    fit = largest_fitting_batch(prof, "fusion", dev, upto=8)
    assert 1 <= fit < 8
    msg = oom_message(prof, "fusion", 8, device_bytes=dev, device_name="NVIDIA H100 80GB HBM3")
    assert f"--set per_gpu_batch={fit}" in msg and "global batch of 8" in msg and "gradient_checkpointing=true" in msg
    a100 = oom_message(get_profile("paper"), "fusion", 8, device_bytes=int(39.4 * GIB))
    assert "--set per_gpu_batch=4 (gradient accumulation over 2 micro-step(s)" in a100  # fits 7: 2 x 4 is even
    tiny = oom_message(prof, "fusion", 1, device_bytes=GIB)
    assert "--set gradient_checkpointing=true --set per_gpu_batch=1" in tiny
