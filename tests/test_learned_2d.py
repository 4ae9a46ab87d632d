"""The paper's future-work variant (``fused = beta * x_2d + alpha * residual_3d``, both learned) is
reachable: a profile field, a run name, a torchrun command, and a run that traces both weights."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from ctlib.launch import fusion_settings, torchrun_command
from ctlib.models import Fusion, build_model
from ctlib.profiles import get_profile
from ctlib.runs import ALPHAS, LEARNED_2D, RunSpec, load_run, run_name
from ctlib.train import build_parser, train


def test_launch_reaches_the_variant():
    assert ALPHAS[-1] == LEARNED_2D and "learned" in ALPHAS
    assert run_name("fusion", LEARNED_2D) == "fusion-learned-2d"
    assert fusion_settings(LEARNED_2D) == ("learned", {"learn_2d_weight": True})
    assert fusion_settings(0.3) == (0.3, {}) and fusion_settings("learned") == ("learned", {})
    cmd = torchrun_command(profile="smoke", model="fusion", alpha=LEARNED_2D, out="o", processes=1,
                           overrides=["epochs=2"])
    assert cmd[cmd.index("--alpha") + 1] == "learned"
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    assert sets == ["learn_2d_weight=true", "epochs=2"]
    # what the worker parses from that command is the profile train_run hashes
    args = build_parser().parse_args(cmd[cmd.index("ctlib.train") + 1:])
    prof = get_profile(args.profile, **dict(s.split("=", 1) for s in args.overrides))
    assert prof.learn_2d_weight is True and prof.epochs == 2
    assert "learn_2d_weight" not in " ".join(torchrun_command(profile="smoke", model="fusion", alpha="learned",
                                                              out="o", processes=1))


def test_build_model_learns_beta_only_when_asked():
    prof = get_profile("smoke")
    plain = build_model(prof, "fusion", "learned", pretrained=False)
    both = build_model(dataclasses.replace(prof, learn_2d_weight=True), "fusion", "learned", pretrained=False)
    assert isinstance(both, Fusion)
    assert "beta" not in dict(plain.named_parameters()) and "beta" in dict(both.named_parameters())


def test_smoke_run_traces_both_weights(smoke_profile, tmp_path):
    prof = dataclasses.replace(smoke_profile, learn_2d_weight=True, epochs=2)
    out = tmp_path / run_name("fusion", LEARNED_2D)
    metrics = train(RunSpec(prof, "fusion", "learned"), out, progress=False)
    hist = pd.read_csv(out / "history.csv")
    assert len(hist) == 2 and np.isfinite(hist[["alpha", "beta"]].to_numpy()).all()
    # both weights move away from their initial values (alpha_init, beta = 1)
    assert (np.abs(hist["alpha"] - prof.alpha_init) > 1e-5).all()
    assert (np.abs(hist["beta"] - 1.0) > 1e-5).all()
    assert metrics["beta_final"] == pytest.approx(hist["beta"].iloc[metrics["best_epoch"] - 1])
    net, loaded, _ = load_run(out)
    assert loaded.learn_2d_weight is True and net.beta_value == pytest.approx(metrics["beta_final"])
