"""The GPU-efficient loop, checked on the CPU: float16 transfer, loss on the device, compile, warm-up, RNG."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from ctlib.cache import PreparedVolumes
from ctlib.models import ViT3D
from ctlib.prepare import load_run_data
from ctlib.profiles import SMOKE
from ctlib.runs import RunSpec
from ctlib.predict import to_device
from ctlib.train import accelerate, restore_rng_state, rng_state, train, warmup_factor


def test_float16_batches_cast_on_the_device_equal_float32(smoke_profile):
    data = load_run_data(smoke_profile, "vit3d")
    f32 = PreparedVolumes(data.cache_dir, data.cohort, data.shape)
    f16 = PreparedVolumes(data.cache_dir, data.cohort, data.shape, float16=True)
    for i in (0, len(f32) - 1):
        a, la, na = f32[i]
        b, lb, nb = f16[i]
        assert a.dtype == torch.float32 and b.dtype == torch.float16 and a.shape == b.shape
        moved = to_device(b[None], torch.device("cpu"))
        assert moved.dtype == torch.float32 and torch.equal(moved[0], a)
        assert torch.equal(la, lb) and na == nb


def test_loss_read_once_per_interval_equals_per_step_mean(smoke_profile, tmp_path, monkeypatch):
    """The history's training loss is the mean per-volume loss of the epoch, as read per micro-step."""
    seen = []
    real = torch.nn.functional.binary_cross_entropy_with_logits

    def record(logits, labels, *args, **kwargs):
        loss = real(logits, labels, *args, **kwargs)
        if kwargs.get("reduction") == "none" and torch.is_grad_enabled():
            seen.extend(loss.detach().mean(dim=1).double().tolist())
        return loss

    monkeypatch.setattr(torch.nn.functional, "binary_cross_entropy_with_logits", record)
    profile = dataclasses.replace(smoke_profile, epochs=2)
    train(RunSpec(profile, "vit3d"), tmp_path / "run", progress=False)
    hist = pd.read_csv(tmp_path / "run" / "history.csv")
    per_epoch = len(seen) // 2
    assert per_epoch == int((pd.read_csv(tmp_path / "run" / "splits.csv")["split"] == "train").sum())
    for epoch in range(2):
        expected = math.fsum(seen[epoch * per_epoch:(epoch + 1) * per_epoch]) / per_epoch
        assert hist["train_loss"][epoch] == pytest.approx(expected, rel=1e-9, abs=0)


def test_compiled_model_matches_eager_on_cpu():
    """``compile=True``: the same logits and, after one AdamW step, the same parameters within tolerance."""
    kwargs = dict(image_size=16, patch_size=8, max_slices=3, dim=16, spatial_depth=1, slice_depth=1, heads=2,
                  dim_head=8, mlp_dim=32)
    torch.manual_seed(0)
    eager = ViT3D(**kwargs)
    twin = ViT3D(**kwargs)
    twin.load_state_dict(eager.state_dict())
    profile = dataclasses.replace(SMOKE, compile=True)
    compiled = accelerate(twin, profile, torch.device("cpu"))
    assert compiled is not twin and compiled._orig_mod is twin
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    y = (torch.rand(2, 18) < 0.3).float()
    for model in (eager, compiled):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        opt.step()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)
    for (k, a), b in zip(eager.state_dict().items(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=k)


def test_warmup_factor_values():
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0 and warmup_factor(10, 0) == 1.0


def test_warmup_spans_epochs_and_resumes_like_an_uninterrupted_run(smoke_profile, tmp_path, monkeypatch):
    steps_per_epoch = math.ceil(int((load_run_data(smoke_profile, "vit3d").splits == "train").sum())
                                / smoke_profile.batch_size)
    warm = steps_per_epoch + 2  # the warm-up crosses the first epoch's end
    profile = dataclasses.replace(smoke_profile, epochs=2, warmup_steps=warm, lr=1e-3)
    lrs: list[float] = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    spec = RunSpec(profile, "vit3d")
    train(spec, tmp_path / "ref", progress=False)
    expected = [1e-3 * warmup_factor(s, warm) for s in range(2 * steps_per_epoch)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)
    hist = pd.read_csv(tmp_path / "ref" / "history.csv")
    assert hist["lr"][0] == pytest.approx(1e-3)  # the scheduler and the history see the unscaled rate

    class Killed(Exception):
        pass

    def kill(epoch):
        raise Killed

    lrs.clear()
    with pytest.raises(Killed):
        train(spec, tmp_path / "resumed", after_epoch=kill, progress=False)
    train(spec, tmp_path / "resumed", progress=False)
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)
    a = torch.load(tmp_path / "ref/checkpoints/last.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed/checkpoints/last.pt", map_location="cpu", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    # warm-up changes the result, so it is part of the run's fingerprint; the default leaves old ones as they were
    assert spec.fingerprint() != RunSpec(dataclasses.replace(profile, warmup_steps=0), "vit3d").fingerprint()


def test_checkpoint_rng_state_includes_cuda_on_a_cuda_device(smoke_profile, tmp_path, monkeypatch):
    # CPU run: the CPU state only, restored as before
    train(RunSpec(dataclasses.replace(smoke_profile, epochs=1), "vit3d"), tmp_path / "run", progress=False)
    last = torch.load(tmp_path / "run/checkpoints/last.pt", map_location="cpu", weights_only=True)
    assert "rng" in last and "cuda_rng" not in last
    # the CUDA code path, with the device's generator faked where there is no GPU
    cuda = torch.device("cuda", 0)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(7)
        state = rng_state(cuda)
        first = torch.rand(4, device=cuda)
        restore_rng_state(state, cuda)
        assert torch.equal(torch.rand(4, device=cuda), first)
    calls = []
    fake = torch.arange(16, dtype=torch.uint8)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or fake)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: calls.append(("set", device, s)))
    state = rng_state(cuda)
    assert torch.equal(state["cuda_rng"], fake) and torch.equal(state["rng"], torch.get_rng_state())
    restore_rng_state(state, cuda)
    assert calls[0] == ("get", cuda) and calls[1][:2] == ("set", cuda) and torch.equal(calls[1][2], fake)
    calls.clear()
    restore_rng_state(state, torch.device("cpu"))  # a GPU checkpoint resumed on the CPU: CPU state only
    assert calls == []


@pytest.mark.slow
def test_compile_with_ddp_and_gradient_checkpointing_trains(tmp_path):
    """compile + DDP (2 gloo processes, several buckets) + activation checkpointing: one step, equal gradients."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("ddp_compile_worker.py")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(worker)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(worker.parents[1])})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count(" ok optimize_ddp=") == 2
