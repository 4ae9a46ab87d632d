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
# # 02 · The 2D baseline: ResNet-18 slice by slice
#
# Reproduces **Section 4.1** and the **"ResNet" row of Table 2**. An ImageNet-pretrained ResNet-18 with
# a one-channel input layer and an 18-way output reads every slice as a separate grayscale image; the
# slice predictions are averaged into one multi-label prediction per volume. Trained as in section 4.5:
# BCEWithLogitsLoss, AdamW at 5e-4, batch 8, ReduceLROnPlateau (factor 0.5, patience 2), 10 epochs,
# distributed data parallel over the visible GPUs (the `paper` profile; `demo` and `smoke` shorten it).
# The synthetic profiles start from random weights on every machine, so that their numbers do not
# depend on network access (`--set weights=IMAGENET1K_V1` tries ImageNet's); the metrics below say which.
#
# The paper found AUROC 0.83, accuracy 0.83, precision 0.66 and a low recall of 0.34: good at ranking,
# conservative at the 0.5 threshold.

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
from ctlib.launch import train_run
from ctlib.prepare import prepare_data
from ctlib.runs import paper_outputs

MODEL, ALPHA, LABEL = "resnet2d", None, "ResNet"
out = paper_outputs(profile, data_root=data_root, work_dir=work_dir, runs_dir=runs_dir,
                    figures_dir=figures_dir, results_dir=results_dir, seed=seed)
prof, fig_dir, res_dir = out.profile, out.figures, out.results
run_dir = out.run_dir(MODEL, ALPHA)
print(f"profile {prof.name}: {LABEL} -> {run_dir}")

# %% [markdown]
# ## Data
#
# Generate (synthetic) and preprocess the volumes here, in this process, so that the training workers
# find a ready cache: HU clipped to [-1000, 1000], centre crop/pad, the centre slices, scaled to [-1, 1] (214x214 slices for the ResNet in the paper).

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

# %%
# the tables need the validation and test scores only (notebook 07 reads the learned-alpha run's
# features of every volume)
train_run(out, MODEL, ALPHA, processes=gpus, launcher=launcher, redo=redo, every_volume=False)

# %% [markdown]
# ## Learning curves
#
# Training (dashed) and validation (solid) loss per epoch, and the validation AUROC. The best checkpoint by validation loss is the one evaluated.

# %%
history = pd.read_csv(run_dir / "history.csv")
display(history.round(4))
figures.plot_learning_curves({LABEL: history}, path=fig_dir / f"learning_curves_{MODEL}.png")

# %% [markdown]
# ## Test metrics
#
# Paper (Table 2, ResNet): AUROC 0.83, accuracy 0.83, precision 0.66, recall 0.34.
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
# Per class, with 95% bootstrap intervals over test patients: classes with few test positives have wide intervals.

# %%
per_class = pd.read_csv(run_dir / "per_class_auroc.csv", index_col="class")
figures.plot_per_class_auroc({LABEL: per_class}, title=f"{LABEL}: per-class test AUROC (95% bootstrap CI)",
                             path=fig_dir / f"per_class_auroc_{MODEL}.png")
