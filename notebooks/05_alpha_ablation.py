# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     notebook_metadata_filter: kernelspec,jupytext
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · How much 3D? The alpha ablation (Table 3)
#
# Reproduces **Table 3** of section 5. The fusion becomes `x_2d + alpha * residual_3d`: `alpha = 0` is
# the ResNet alone (notebook 02's run, reused here: at a fixed alpha of 0 the fusion is that network, and
# the paper's alpha = 0 row repeats its ResNet row), `alpha = 1` the equal weights of Table 2 (notebook
# 04's run, reused here), and a
# **learned** alpha lets training decide how much the 3D branch contributes (it starts at the profile's
# `alpha_init`). One more row is the paper's future-work variant, `learned-2d`: alpha learned and the
# weight of the 2D features learned too (`beta * x_2d + alpha * residual_3d`, beta starting at 1).
#
# The paper found every metric rising with alpha (AUROC 0.83 -> 0.88 at alpha 0.5, recall 0.34 -> 0.54)
# and the learned alpha matching alpha = 0.5 and 1 (AUROC 0.87, recall 0.55).

# %% tags=["parameters"]
profile = "demo"
data_root = None
work_dir = "../data"
runs_dir = "../runs"
figures_dir = "../figures"
results_dir = "../results"
gpus = None
launcher = ""  # "": torchrun --standalone here; or a cluster prefix, e.g. "srun torchrun --nnodes 4 ..."
seed = 0
redo = False
runs_at_once = None  # runs trained side by side on a CPU-only machine (None: from the cores; 1: one by one)

# %%
# %matplotlib inline
import json

import pandas as pd
from IPython.display import display

from ctlib import figures, tables
from ctlib.comparison import class_groups_for
from ctlib.launch import train_runs
from ctlib.paper_numbers import compare_metrics, paper_table3
from ctlib.runs import ALPHAS, LEARNED_2D, paper_outputs, run_name
from ctlib.tables import metrics_table

out = paper_outputs(profile, data_root=data_root, work_dir=work_dir, runs_dir=runs_dir,
                    figures_dir=figures_dir, results_dir=results_dir, seed=seed)
prof, fig_dir, res_dir = out.profile, out.figures, out.results

alpha_label = {a: a if isinstance(a, str) else f"{float(a):.1f}" for a in ALPHAS}
print(f"profile {prof.name}: alphas {list(alpha_label.values())} -> {out.runs}")

# %% [markdown]
# ## Training the fusion at every alpha
#
# One run per alpha, launched with `torchrun` as in notebooks 02-04. The alpha = 0 run is notebook 02's,
# alpha = 1 and the learned alpha are notebook 04's: they are not retrained here, even with `redo`. On GPUs the runs go one after another, each on every GPU;
# on a CPU-only machine several train side by side, each on its share of the cores (`runs_at_once`:
# None decides from the machine, 1 forces one at a time; see `ctlib.launch.concurrent_runs`).

# %%
# the tables need the validation and test scores only
owned_elsewhere = (0.0, 1.0, "learned")
train_runs(out, [("fusion", alpha) for alpha in ALPHAS if alpha not in owned_elsewhere], processes=gpus,
           launcher=launcher, redo=redo, at_once=runs_at_once, every_volume=False)
# notebook 02's and 04's runs, trained here only if missing (the learned-alpha one on every volume: notebooks
# 07 and 08 read its features)
train_runs(out, [("fusion", alpha) for alpha in owned_elsewhere], processes=gpus, launcher=launcher,
           at_once=runs_at_once, every_volume=[run_name("fusion", "learned")])

# %% [markdown]
# ## Table 3
#
# Test metrics at the 0.5 threshold (the paper's), then with per-class thresholds tuned on validation.
# Look for whether AUROC and recall rise with alpha, as in the paper, or stay flat (the 3D residual
# adding nothing the slices did not already give).

# %%
metrics = {alpha_label[a]: json.loads((out.run_dir("fusion", a) / "metrics.json").read_text())
           for a in ALPHAS}
table3 = metrics_table(metrics, keys=("auroc", "accuracy", "precision", "recall", "f1"))
table3.index.name = "alpha"
tables.save_table(table3, res_dir / "table3")
print(f"data: {metrics['1.0']['data']}; test volumes: {metrics['1.0']['n_test']}")
table3.round(3)

# %%
table3_tuned = metrics_table({a: m["val_tuned"] for a, m in metrics.items()},
                             keys=("auroc", "accuracy", "precision", "recall", "f1"))
table3_tuned.index.name = "alpha"
tables.save_table(table3_tuned, res_dir / "table3_val_tuned")
table3_tuned.round(3)

# %% [markdown]
# Beside the paper's Table 3 (measured on the paper's ~3,000-patient CT-RATE subset):

# %%
table3_vs_paper = compare_metrics(table3, paper_table3())
tables.save_table(table3_vs_paper, res_dir / "table3_vs_paper")
display(table3_vs_paper.round(3))
figures.plot_metrics_vs_alpha(table3, paper_table3(), path=fig_dir / "table3_metrics_vs_alpha.png")

# %% [markdown]
# ## The learned alpha
#
# The paper argues that a learnable alpha "could effectively learn to set the alpha close to 0 ... if the
# 3D features don't contribute", and higher if they carry complementary information. Where does ours
# go? (The projection of the ViT features is learned too, so alpha's scale trades off against the
# projection's; its trajectory and sign say more than its final value.)

# %%
learned_dir = out.run_dir("fusion", "learned")
history = pd.read_csv(learned_dir / "history.csv")
best = metrics["learned"]["best_epoch"]
print(f"alpha: {prof.alpha_init:g} at the start -> {history['alpha'].iloc[-1]:.3f} after {len(history)} "
      f"epochs; the evaluated model (best epoch {best}) has alpha {metrics['learned']['alpha_final']:.3f}")
figures.plot_alpha_trajectory(history, initial=prof.alpha_init,
                              fixed=[float(a) for a in ALPHAS if not isinstance(a, str)],
                              path=fig_dir / "learned_alpha.png")

# %% [markdown]
# ## The future-work variant: both weights learned
#
# With beta learned too, the fusion can also shrink or grow the 2D features. Both weights after each
# epoch (epoch 0: their start values):

# %%
history_2d = pd.read_csv(out.run_dir("fusion", LEARNED_2D) / "history.csv")
m2d = metrics[LEARNED_2D]
print(f"{LEARNED_2D}: alpha {prof.alpha_init:g} -> {history_2d['alpha'].iloc[-1]:.3f}, beta 1 -> "
      f"{history_2d['beta'].iloc[-1]:.3f} after {len(history_2d)} epochs; the evaluated model (best epoch "
      f"{m2d['best_epoch']}) has alpha {m2d['alpha_final']:.3f}, beta {m2d['beta_final']:.3f}")
display(history_2d[["epoch", "alpha", "beta", "val_loss", "val_auroc"]].round(4))
figures.plot_alpha_trajectory({"learned": history, LEARNED_2D: history_2d}, initial=prof.alpha_init,
                              fixed=[float(a) for a in ALPHAS if not isinstance(a, str)],
                              path=fig_dir / "learned_alpha_2d.png")
figures.plot_alpha_trajectory({LEARNED_2D: history_2d}, initial=1.0, weight="beta",
                              path=fig_dir / "learned_beta_2d.png")

# %% [markdown]
# ## Does any alpha beat alpha 0? Paired differences
#
# Each run against alpha = 0 (the ResNet of notebook 02) on the same test volumes: macro AUROC
# of the run minus that of alpha 0, with a 95% interval from resampling test patients (the same
# resamples for both runs), and `p_boot`, the fraction of resamples in which the difference is <= 0.
# An interval that excludes 0 is a difference this test set can see; overlapping separate intervals are
# not a test. On the synthetic data the rows are also split by class group: the classes a single slice
# shows (2D) and those that need 3D context (3D), where the 3D residual should help if it helps at all.

# %%
groups = class_groups_for(prof.data_root)
base = out.run_dir("fusion", 0.0)
table3_paired = tables.paired_table(
    {f"alpha {alpha_label[a]} - alpha 0.0": (out.run_dir("fusion", a), base) for a in ALPHAS if a != 0.0},
    groups, n_boot=prof.bootstrap, seed=prof.seed)
tables.save_table(table3_paired, res_dir / "table3_paired")
table3_paired.round(3)

# %% [markdown]
# Table 3's macro AUROC per class group, with 95% bootstrap intervals:

# %%
table3_groups = tables.group_table({alpha_label[a]: out.run_dir("fusion", a) for a in ALPHAS}, groups,
                                   n_boot=prof.bootstrap, seed=prof.seed)
tables.save_table(table3_groups, res_dir / "table3_groups")
table3_groups.round(3)

# %% [markdown]
# ## Learning curves of all alpha runs

# %%
histories = {f"alpha {alpha_label[a]}": pd.read_csv(out.run_dir("fusion", a) / "history.csv")
             for a in ALPHAS}
figures.plot_learning_curves(histories, path=fig_dir / "learning_curves_alpha.png")
