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
# # 04 · The residual 2D + 3D fusion (alpha = 1)
#
# Reproduces **Section 4.3 (Algorithm 1)** and the **"ResNet+ViT" row of Table 2**. Both branches read
# the same volume: the ResNet's slice features are mean-pooled into `x_2d` (512), the ViT's pooled
# tokens are projected to 512 (`residual_3d`), and `x_2d + alpha * residual_3d` goes through one linear
# head to the 18 labels. Here `alpha = 1`: the paper's "equal weights" (notebook 05 varies it).
#
# The paper's headline: the fusion beats both branches, AUROC 0.87, accuracy 0.87, precision 0.72 and
# recall 0.54, the recall gain (0.34 -> 0.54) being the 3D context catching what slices alone miss.

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
from ctlib.launch import train_runs
from ctlib.prepare import prepare_data
from ctlib.runs import paper_outputs, run_name

MODEL, ALPHA, LABEL = "fusion", 1.0, "ResNet+ViT"
out = paper_outputs(profile, data_root=data_root, work_dir=work_dir, runs_dir=runs_dir,
                    figures_dir=figures_dir, results_dir=results_dir, seed=seed)
prof, fig_dir, res_dir = out.profile, out.figures, out.results
run_dir = out.run_dir(MODEL, ALPHA)
print(f"profile {prof.name}: {LABEL} -> {run_dir}")

# %% [markdown]
# ## Data
#
# Generate (synthetic) and preprocess the volumes here, in this process, so that the training workers
# find a ready cache: the fusion reads the ViT's input (224x224 slices in the paper) in both branches.

# %%
cohort, cache = prepare_data(prof, MODEL)
print(f"{len(cohort)} volumes of {cohort['patient'].nunique()} patients, prepared in {cache}")

# %% [markdown]
# ## Training
#
# `torchrun` launches `python -m ctlib.train` with one process per GPU (or `gpus` processes; one on
# CPU), or the cluster command prefix `launcher` does (multi-node: see the README). Its log streams
# below and a failure stops the notebook. A finished run with the same settings
# is reused unless `redo`.
#
# The fusion with a **learned** alpha (notebook 05's row, and the model of notebooks 07 and 08) trains
# here too. On GPUs the two runs go one after another; on a CPU-only machine they train side by side,
# each on its share of the cores (on the demo's 2 cores, 8.5 min for the pair against 4.7 min for one
# run alone; `runs_at_once`, see `ctlib.launch.concurrent_runs`). Notebook 05 then reuses it.

# %%
# alpha = 1 is scored on validation and test (all the tables need); the learned-alpha run on every
# volume, whose features notebooks 07 and 08 read
train_runs(out, [(MODEL, ALPHA), (MODEL, "learned")], processes=gpus, launcher=launcher, redo=redo,
           at_once=runs_at_once, every_volume=[run_name(MODEL, "learned")])

# %% [markdown]
# ## Learning curves
#
# The ResNet branch starts from ImageNet weights (`paper`; random ones in `demo` and `smoke`) and the ViT
# from scratch; the residual form lets the ViT only add to a working 2D model.

# %%
history = pd.read_csv(run_dir / "history.csv")
display(history.round(4))
figures.plot_learning_curves({LABEL: history}, path=fig_dir / f"learning_curves_{MODEL}.png")

# %% [markdown]
# ## Test metrics
#
# Paper (Table 2, ResNet+ViT): AUROC 0.87, accuracy 0.87, precision 0.72, recall 0.54.
# Three threshold rules: 0.5 (as the paper), per-class thresholds tuned on the validation set, and the
# CT-CLIP protocol (thresholds fitted on the test set itself: optimistic, only for comparison with
# published CT-RATE numbers). AUROC does not depend on the threshold.

# %%
metrics = json.loads((run_dir / "metrics.json").read_text())
summary = tables.run_summary(metrics)
tables.save_table(summary, res_dir / f"metrics_{MODEL}")
print(f"data: {metrics['data']}\ntest volumes: {metrics['n_test']}, best epoch {metrics['best_epoch']} "
      f"of {metrics['epochs']}, weights: {metrics['weights']}, training time {metrics['train_seconds']:.0f} s")
summary.round(3)

# %% [markdown]
# Per class, with 95% bootstrap intervals over test patients: Figure 3 (notebook 06) puts the three models side by side.

# %%
per_class = pd.read_csv(run_dir / "per_class_auroc.csv", index_col="class")
figures.plot_per_class_auroc({LABEL: per_class}, title=f"{LABEL}: per-class test AUROC (95% bootstrap CI)",
                             path=fig_dir / f"per_class_auroc_{MODEL}.png")
