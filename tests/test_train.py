"""The training entry point: outputs, resumption, DDP equivalence, skipping finished runs."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from ctlib.data import CLASSES
from ctlib.launch import torchrun_command
from ctlib.profiles import get_profile, load_profile, parse_overrides
from ctlib.runs import RunSpec, load_run, run_name, run_tag, scored_every_volume
from ctlib.train import main, parse_alpha, train


def _params(path):
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state["model"]


@pytest.mark.parametrize("model,alpha", [("resnet2d", 1.0), ("vit3d", 1.0), ("fusion", "learned")])
def test_run_writes_every_output(smoke_profile, tmp_path, model, alpha):
    out = tmp_path / run_name(model, alpha)
    metrics = train(RunSpec(smoke_profile, model, alpha), out, progress=False)
    for name in ("config.json", "profile.json", "history.csv", "splits.csv", "predictions.csv",
                 "val_predictions.csv", "features.npz", "metrics.json", "per_class_auroc.csv",
                 "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (out / name).exists(), name
    hist = pd.read_csv(out / "history.csv")
    assert list(hist["epoch"]) == list(range(1, smoke_profile.epochs + 1))
    assert {"train_loss", "val_loss", "val_auroc", "lr", "alpha", "seconds"} <= set(hist.columns)
    preds = pd.read_csv(out / "predictions.csv")
    assert list(preds.columns) == ["VolumeName", *[f"label:{c}" for c in CLASSES],
                                   *[f"prob:{c}" for c in CLASSES]]
    splits = pd.read_csv(out / "splits.csv")
    test_names = set(splits.loc[splits["split"] == "test", "VolumeName"])
    assert set(preds["VolumeName"]) == test_names and len(preds) == len(test_names)
    # Every test volume scored exactly once, labels equal the cohort's.
    assert preds["VolumeName"].is_unique
    for key in ("auroc", "accuracy", "precision", "recall", "per_class_auroc", "weights", "data"):
        assert key in metrics
    assert set(metrics["per_class_auroc"]) == set(CLASSES)
    assert json.loads((out / "metrics.json").read_text())["auroc"] == pytest.approx(metrics["auroc"])
    feats = np.load(out / "features.npz")
    assert feats["features"].shape[0] == len(splits)
    if alpha == "learned":
        assert np.isfinite(hist["alpha"]).all()
        # alpha of the evaluated model: the best epoch's (by validation loss), not necessarily the last
        assert metrics["alpha_final"] == pytest.approx(hist["alpha"].iloc[metrics["best_epoch"] - 1])
    # The checkpoint loads back into the same model and reproduces the stored test probabilities.
    net, prof, config = load_run(out)
    assert prof == smoke_profile and config["model"] == model


def test_kill_and_resume_equals_uninterrupted(smoke_profile, tmp_path):
    profile = dataclasses.replace(smoke_profile, epochs=3)
    spec = RunSpec(profile, "fusion", "learned")
    ref = train(spec, tmp_path / "ref", progress=False)

    class Killed(Exception):
        pass

    def kill_after_first(epoch):
        if epoch == 0:
            raise Killed

    with pytest.raises(Killed):
        train(spec, tmp_path / "resumed", after_epoch=kill_after_first, progress=False)
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    assert len(pd.read_csv(tmp_path / "resumed" / "history.csv")) == 1
    resumed = train(spec, tmp_path / "resumed", progress=False)

    for key in ("auroc", "accuracy", "precision", "recall", "alpha_final", "best_epoch"):
        assert resumed[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
    a, b = _params(tmp_path / "ref/checkpoints/last.pt"), _params(tmp_path / "resumed/checkpoints/last.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    h_ref = pd.read_csv(tmp_path / "ref/history.csv").drop(columns="seconds")
    h_res = pd.read_csv(tmp_path / "resumed/history.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(h_ref, h_res, rtol=1e-5)


def test_finished_run_is_skipped_and_other_settings_refused(smoke_profile, tmp_path):
    profile = dataclasses.replace(smoke_profile, epochs=1)
    out = tmp_path / "run"
    first = train(RunSpec(profile, "vit3d"), out, progress=False)
    mtime = (out / "metrics.json").stat().st_mtime_ns
    again = train(RunSpec(profile, "vit3d"), out, progress=False)
    assert again == first and (out / "metrics.json").stat().st_mtime_ns == mtime
    # Same folder, other settings, a partial run: refused rather than silently mixed.
    (out / "metrics.json").unlink()
    with pytest.raises(RuntimeError, match="other settings"):
        train(RunSpec(dataclasses.replace(profile, lr=1e-3), "vit3d"), out, progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# CTViT's encoder as it is: no BatchNorm. The smoke profile's ViT (a convolutional stem, batch-standardised
# features) takes BatchNorm statistics per process, as the ResNet does, so its step on 2 processes is not the
# step on 1 (SyncBatchNorm, --set sync_bn=true, makes them one on CUDA).
NO_BATCHNORM = ["--set", "vit_stem=patch", "--set", "vit_feature_norm=rms"]


def test_two_process_gloo_step_equals_one_process(smoke_work_dir, tmp_path):
    """One optimisation step on the same global batch: 2 gloo processes == 1 process."""
    outs = {}
    for nproc in (1, 2):
        out = tmp_path / f"np{nproc}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
               f"--master_port={_free_port()}", "-m", "ctlib.train", "--profile", "smoke",
               "--model", "vit3d", "--work-dir", str(smoke_work_dir), "--out", str(out), "--no-progress",
               "--set", "epochs=1", "--set", "max_steps_per_epoch=1", "--set", "batch_size=4", *NO_BATCHNORM]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        outs[nproc] = out
    one, two = _params(outs[1] / "checkpoints/last.pt"), _params(outs[2] / "checkpoints/last.pt")
    init = None
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-5, msg=k)
    # ...and the step really changed the weights (the comparison is not of two untouched models).
    torch.manual_seed(0)
    from ctlib.models import build_model

    init = build_model(get_profile("smoke", vit_stem="patch", vit_feature_norm="rms"), "vit3d").state_dict()
    assert any(not torch.equal(init[k], one[k]) for k in one)
    # Both runs scored the whole test split once.
    p1, p2 = pd.read_csv(outs[1] / "predictions.csv"), pd.read_csv(outs[2] / "predictions.csv")
    assert list(p1["VolumeName"]) == list(p2["VolumeName"])
    np.testing.assert_allclose(p1.filter(like="prob:").to_numpy(), p2.filter(like="prob:").to_numpy(),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_one_two_three_processes_take_the_same_steps_to_the_same_weights(smoke_work_dir, tmp_path):
    """The global batch on 1, 2 (micro-batches of 1, accumulated) and 3 processes (2, 1, 1 volumes): every run
    takes ceil(N / 4) optimisation steps in the epoch, writes its batch plan, and ends at the same weights."""
    runs = {"np1": (1, []), "np2-accumulated": (2, ["per_gpu_batch=1"]), "np3": (3, [])}
    procs = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, (nproc, sets) in runs.items():  # side by side: the start-up (imports) dominates
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
               f"--master_port={_free_port()}", "-m", "ctlib.train", "--profile", "smoke", "--model", "vit3d",
               "--work-dir", str(smoke_work_dir), "--out", str(tmp_path / name), "--no-progress", "--score", "eval",
               "--set", "epochs=1", *NO_BATCHNORM]
        for item in sets:
            cmd += ["--set", item]
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    logs = {name: p.communicate(timeout=240)[0] for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, f"{name}:\n{logs[name][-3000:]}"
    n_train = int((pd.read_csv(tmp_path / "np1" / "splits.csv")["split"] == "train").sum())
    plans = {"np1": (1, 4, 1), "np2-accumulated": (2, 1, 2), "np3": (3, 2, 1)}
    weights = {}
    for name in runs:
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert (config["world_size"], config["per_rank_batch"], config["accumulation_steps"]) == plans[name]
        assert config["effective_batch"] == 4
        assert f"global batch 4 = {plans[name][0]} process(es) x {plans[name][2]} micro-step(s)" in logs[name]
        last = torch.load(tmp_path / name / "checkpoints/last.pt", map_location="cpu", weights_only=True)
        assert {float(s["step"]) for s in last["optimizer"]["state"].values()} == {float(-(-n_train // 4))}, name
        weights[name] = last["model"]
    for name in ("np2-accumulated", "np3"):  # the gradient of each step is the mean over its volumes on every run
        for k, v in weights["np1"].items():
            torch.testing.assert_close(weights[name][k], v, rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")


def test_cli_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "torchrun" in capsys.readouterr().out
    with pytest.raises(ValueError, match="learned"):
        parse_alpha("sometimes")
    assert parse_alpha("0.3") == 0.3 and parse_alpha("learned") == "learned"
    with pytest.raises(SystemExit):
        main(["--model", "resnet2d", "--alpha", "0.5", "--out", "x"])


def test_profiles_and_overrides(tmp_path):
    paper = get_profile("paper")
    # The paper's settings (section 4.5) are the paper profile's defaults.
    assert (paper.lr, paper.epochs, paper.batch_size, paper.plateau_factor, paper.plateau_patience) == (
        5e-4, 10, 8, 0.5, 2)
    assert paper.size_2d == (214, 214, 240) and paper.size_3d[:2] == (224, 224) and paper.num_slices == 100
    assert (paper.vit_dim, paper.vit_heads, paper.vit_dim_head, paper.vit_spatial_depth,
            paper.vit_slice_depth, paper.vit_patch_size) == (512, 8, 64, 4, 4, 16)
    assert get_profile("paper480").size_3d[:2] == (480, 480)
    p = get_profile("demo", **parse_overrides(["epochs=3", "lr=1e-3", "target_spacing=null",
                                               "size_2d=[32,32,8]"]))
    assert (p.epochs, p.lr, p.target_spacing, p.size_2d) == (3, 1e-3, None, (32, 32, 8))
    with pytest.raises(ValueError, match="unknown profile field"):
        get_profile("demo", nonsense="1")
    with pytest.raises(ValueError, match="integer"):
        get_profile("demo", epochs="three")
    with pytest.raises(ValueError, match="unknown profile"):
        get_profile("huge")
    from ctlib.profiles import save_profile

    save_profile(p, tmp_path / "p.json")
    assert load_profile(tmp_path / "p.json") == p


def test_torchrun_command_and_names():
    cmd = torchrun_command(profile="demo", model="fusion", alpha="learned", out="runs/x", processes=4,
                           data_root="/d", seed=1, overrides=["epochs=2"])
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc_per_node=4" in cmd and cmd[cmd.index("--alpha") + 1] == "learned"
    assert cmd[cmd.index("--data-root") + 1] == "/d" and cmd[cmd.index("--set") + 1] == "epochs=2"
    assert "--alpha" not in torchrun_command(profile="demo", model="vit3d", out="o", processes=1)
    assert [run_name("fusion", a) for a in (0.0, 0.5, 1.0, "learned")] == [
        "fusion-alpha0", "fusion-alpha0.5", "fusion-alpha1", "fusion-learned"]
    assert run_tag("demo", 0) == "demo" and run_tag("demo", 1) == "demo-seed1"
    with pytest.raises(ValueError):
        torchrun_command(profile="demo", model="vit3d", out="o", processes=0)


def test_recalibrate_batchnorm_uses_exact_training_statistics():
    """Running statistics become the exact mean/variance over the chosen volumes, nothing else moves."""
    from torch.utils.data import TensorDataset

    from ctlib.models import ResNet2D, ViT3D
    from ctlib.predict import recalibrate_batchnorm

    torch.manual_seed(0)
    vols = torch.randn(12, 3, 32, 32) * 0.3 - 0.5
    data = TensorDataset(vols, torch.zeros(12, len(CLASSES)))
    model = ResNet2D(weights=None)
    bn1 = model.backbone.bn1
    bn1.running_mean.fill_(5.0)  # stale statistics, as after fast-moving early training
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k
               and "num_batches" not in k}
    rng_before = torch.get_rng_state()
    model.train()

    used = recalibrate_batchnorm(model, data, 8, batch_size=4, device=torch.device("cpu"), seed=3)

    assert used == 8
    chosen = np.random.default_rng(3).permutation(12)[:8]
    with torch.no_grad():  # the first BN sees conv1 of every slice; two batches of 4 volumes
        acts = [model.backbone.conv1(vols[chosen[i:i + 4]].reshape(-1, 1, 32, 32)) for i in (0, 4)]
    mean = torch.stack([a.mean(dim=(0, 2, 3)) for a in acts]).mean(0)
    var = torch.stack([a.var(dim=(0, 2, 3)) for a in acts]).mean(0)  # cumulative average of batches
    torch.testing.assert_close(bn1.running_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn1.running_var, var, rtol=1e-4, atol=1e-5)
    assert bn1.momentum == 0.1 and model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng_before)
    for k, v in model.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k
    # A model without BatchNorm (the ViT) is left alone.
    vit = ViT3D(image_size=32, patch_size=8, max_slices=3, dim=16, spatial_depth=1, slice_depth=1,
                heads=2, dim_head=8, mlp_dim=32)
    assert recalibrate_batchnorm(vit, data, 8, batch_size=4, device=torch.device("cpu"), seed=0) == 0


def test_nan_loss_stops_naming_epoch_and_step_and_keeps_checkpoints(smoke_profile, tmp_path, monkeypatch):
    profile = dataclasses.replace(smoke_profile, epochs=3)
    spec = RunSpec(profile, "vit3d")
    out = tmp_path / "run"
    real = torch.nn.functional.binary_cross_entropy_with_logits
    calls = {"n": 0}
    steps_per_epoch = None

    def nan_in_epoch_two(logits, labels, *args, **kwargs):
        loss = real(logits, labels, *args, **kwargs)
        if kwargs.get("reduction") != "none" or not torch.is_grad_enabled():
            return loss  # validation's and the tests' own calls
        calls["n"] += 1  # one micro-step per optimisation step on one process
        return loss * float("nan") if calls["n"] == steps_per_epoch + 2 else loss

    # steps per epoch on this cohort: training volumes / batch size, rounded up
    from ctlib.prepare import load_run_data

    n_train = int((load_run_data(profile, "vit3d").splits == "train").sum())
    steps_per_epoch = -(-n_train // profile.batch_size)
    monkeypatch.setattr(torch.nn.functional, "binary_cross_entropy_with_logits", nan_in_epoch_two)
    with pytest.raises(FloatingPointError, match="at epoch 2, step 2"):
        train(spec, out, progress=False)
    assert (out / "checkpoints/best.pt").exists() and not (out / "metrics.json").exists()
    last = torch.load(out / "checkpoints/last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 0 and len(pd.read_csv(out / "history.csv")) == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_settings_that_cannot_work_are_rejected_before_any_work(tmp_path, monkeypatch, capsys):
    from ctlib.profiles import validate

    fresh = get_profile("smoke", work_dir=str(tmp_path / "w"))
    with pytest.raises(ValueError, match="bootstrap must be a positive integer, got 0"):
        train(RunSpec(dataclasses.replace(fresh, bootstrap=0), "vit3d"), tmp_path / "a", progress=False)
    # under torchrun with 2 processes: rejected before the process group or any data work
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="batch_size 1 is smaller than the 2 processes"):
        train(RunSpec(dataclasses.replace(fresh, batch_size=1), "vit3d"), tmp_path / "b", progress=False)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    with pytest.raises(SystemExit, match="unknown profile field 'batchsize'"):
        main(["--profile", "smoke", "--model", "vit3d", "--out", str(tmp_path / "c"), "--set", "batchsize=4"])
    with pytest.raises(SystemExit, match="bootstrap must be"):
        main(["--profile", "smoke", "--model", "vit3d", "--out", str(tmp_path / "c"), "--set", "bootstrap=0"])
    assert not (tmp_path / "w").exists() and not any((tmp_path / d).exists() for d in "abc")
    validate(fresh, 4)  # smoke's batch of 4 over 4 processes is fine, and over 3 (2, 1, 1 volumes)
    validate(fresh, 3)
    (tmp_path / "p.json").write_text(json.dumps({**fresh.to_dict(), "nonsense": 1}))
    with pytest.raises(ValueError, match="unknown profile field"):
        load_profile(tmp_path / "p.json")


def test_resume_on_another_split_is_refused(smoke_profile, tmp_path):
    from ctlib.prepare import profile_split_file

    profile = dataclasses.replace(smoke_profile, epochs=2, work_dir=str(tmp_path / "w"))
    shutil.copytree(smoke_profile.work_dir, profile.work_dir)
    spec = RunSpec(profile, "vit3d")

    class Killed(Exception):
        pass

    def kill(epoch):
        raise Killed

    with pytest.raises(Killed):
        train(spec, tmp_path / "run", after_epoch=kill, progress=False)
    # the split file changes under the run (one patient moved from train to test)
    path = profile_split_file(profile)
    table = pd.read_csv(path)
    moved = table.index[table["split"] == "train"][0]
    table.loc[table["patient"] == table.loc[moved, "patient"], "split"] = "test"
    path.write_text(table.to_csv(index=False))
    with pytest.raises(RuntimeError, match="another cohort or split"):
        train(spec, tmp_path / "run", progress=False)


def test_score_eval_scores_validation_and_test_only_with_the_same_results(smoke_profile, tmp_path):
    """``--score eval``: features.npz holds exactly the validation and test volumes (their own names, splits,
    labels), and every table number equals that of the run scoring every volume."""
    profile = dataclasses.replace(smoke_profile, epochs=1)
    full_dir, eval_dir = tmp_path / "all", tmp_path / "eval"
    full = train(RunSpec(profile, "resnet2d"), full_dir, progress=False)
    # The same training finished with --score eval: a copy of the run without its results resumes after its
    # last epoch (nothing left to train) and only evaluates its best checkpoint.
    shutil.copytree(full_dir, eval_dir)
    for name in ("metrics.json", "predictions.csv", "val_predictions.csv", "features.npz", "per_class_auroc.csv"):
        (eval_dir / name).unlink()
    assert main(["--profile", "smoke", "--model", "resnet2d", "--work-dir", profile.work_dir, "--out",
                 str(eval_dir), "--set", "epochs=1", "--no-progress", "--score", "eval"]) == 0

    splits = pd.read_csv(full_dir / "splits.csv").set_index("VolumeName")["split"]
    assert (splits == "train").sum() > 0
    with np.load(full_dir / "features.npz") as f:
        every = {k: f[k] for k in f.files}
    with np.load(eval_dir / "features.npz") as f:
        scored = {k: f[k] for k in f.files}
    assert set(scored) == set(every)
    assert len(every["names"]) == len(splits)  # the reference run scored every volume
    # exactly the validation and test volumes, once each, with their own split
    names = list(scored["names"])
    assert len(names) == len(set(names)) == int(splits.isin(["val", "test"]).sum())
    assert set(scored["split"]) == {"val", "test"}
    assert list(scored["split"]) == list(splits.loc[names])
    val, test = pd.read_csv(eval_dir / "val_predictions.csv"), pd.read_csv(eval_dir / "predictions.csv")
    assert set(names) == set(val["VolumeName"]) | set(test["VolumeName"])
    assert set(names[i] for i in np.flatnonzero(scored["split"] == "test")) == set(test["VolumeName"])
    # each row is that volume's: its patient, labels, probabilities and features as the full run scored them
    row = {n: i for i, n in enumerate(every["names"])}
    rows = [row[n] for n in names]
    for key in ("patient", "split", "labels"):
        assert np.array_equal(scored[key], every[key][rows]), key
    for key in ("probs", "features"):
        np.testing.assert_allclose(scored[key], every[key][rows], rtol=1e-5, atol=1e-6, err_msg=key)
    # the tables' inputs and numbers are unchanged by scoring fewer volumes
    for name in ("predictions.csv", "val_predictions.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(eval_dir / name), pd.read_csv(full_dir / name), rtol=1e-5)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["auroc"] == full["auroc"]
    assert metrics == json.loads((full_dir / "metrics.json").read_text())

    # Asked for every volume later, the eval-only run is not trained again: its best checkpoint scores every
    # volume, with the same numbers; a run that scored every volume asked for eval only is simply complete.
    assert not scored_every_volume(eval_dir) and scored_every_volume(full_dir)
    history, last = (eval_dir / "history.csv").read_bytes(), (eval_dir / "checkpoints/last.pt").read_bytes()
    train(RunSpec(profile, "resnet2d"), eval_dir, progress=False)
    assert scored_every_volume(eval_dir)
    assert (eval_dir / "history.csv").read_bytes() == history
    assert (eval_dir / "checkpoints/last.pt").read_bytes() == last
    with np.load(eval_dir / "features.npz") as f:
        assert list(f["names"]) == list(every["names"]) and list(f["split"]) == list(every["split"])
        np.testing.assert_allclose(f["features"], every["features"], rtol=1e-5, atol=1e-6)
    assert json.loads((eval_dir / "metrics.json").read_text()) == metrics
    mtime = (full_dir / "metrics.json").stat().st_mtime_ns
    assert train(RunSpec(profile, "resnet2d"), full_dir, progress=False, every_volume=False)["auroc"] == metrics["auroc"]
    assert (full_dir / "metrics.json").stat().st_mtime_ns == mtime and scored_every_volume(full_dir)
