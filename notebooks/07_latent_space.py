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
# # 07 · The latent space: t-SNE (Figure 4) and case retrieval
#
# Reproduces **Figure 4**: the fusion model with a learned alpha (the paper's final model) maps every
# volume to a 512-d feature vector (the fused `x_2d + alpha * residual_3d` before the head); t-SNE lays
# them out in 2D, coloured by the number of abnormalities in the volume. The paper saw "a clustering of
# abnormalities" and proposed **retrieval**: project a new scan into the latent space and look up
# similar cases. We test that proposal: do a test volume's nearest training volumes share its
# abnormalities more than random training volumes do?

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
from pathlib import Path

import numpy as np
import pandas as pd
from IPython.display import display

from ctlib import figures, latent, tables
from ctlib.cache import load_prepared
from ctlib.data import CLASSES
from ctlib.runs import paper_outputs

out = paper_outputs(profile, data_root=data_root, work_dir=work_dir, runs_dir=runs_dir,
                    figures_dir=figures_dir, results_dir=results_dir, seed=seed)
prof, fig_dir, res_dir = out.profile, out.figures, out.results
run_dir = out.run_dir("fusion", "learned")
if not (run_dir / "features.npz").exists():
    raise FileNotFoundError(f"{run_dir / 'features.npz'} is missing: run notebook 05 first (profile {profile})")
config = json.loads((run_dir / "config.json").read_text())
with np.load(run_dir / "features.npz") as f:
    names, split, patient = f["names"], f["split"], f["patient"]
    labels, features = f["labels"].astype(int), f["features"]
n_abnormal = labels.sum(axis=1)
print(f"{run_dir.name}: {features.shape[0]} volumes x {features.shape[1]} features; data: {config['data']}")
pd.Series(split).value_counts().to_frame("volumes")

# %% [markdown]
# ## Figure 4: t-SNE coloured by the number of abnormalities
#
# Every volume (train, validation and test), features standardised, openTSNE with perplexity 30
# (smaller for small cohorts). Look for a gradient or clusters of colour: volumes with many
# abnormalities gathering apart from normal ones. t-SNE keeps neighbourhoods, not distances: the
# size of and gaps between clusters mean little.

# %%
embedding = latent.tsne(features, perplexity=30, seed=seed)
pd.DataFrame({"VolumeName": names, "split": split, "tsne_1": embedding[:, 0], "tsne_2": embedding[:, 1],
              "n_abnormalities": n_abnormal}).to_csv(res_dir / "tsne_embedding.csv", index=False)
figures.plot_tsne(embedding, n_abnormal,
                  title="Fusion (learned α) latent space, t-SNE, coloured by the number of abnormalities",
                  path=fig_dir / "fig4_tsne.png")

# %% [markdown]
# ## Retrieval: do nearest cases share the query's abnormalities?
#
# Queries: the test volumes; database: the training and validation volumes; cosine distance on
# standardised features; never a volume of the query's own patient. For the k = 5 nearest cases we
# measure the label-set overlap (Jaccard), the share of the query's abnormalities the case also has,
# and the gap in the number of abnormalities, against the expectation for cases drawn at random. The
# p-value is a permutation test (labels shuffled over volumes, neighbours kept): small values mean
# the neighbours share labels beyond chance. Ratio > 1 (Jaccard, recall) or < 1 (count gap) favours
# the latent space.

# %%
query = np.flatnonzero(split == "test")
database = np.flatnonzero(split != "test")
k = int(min(5, len(database) - 1))
report = latent.retrieval_report(features, labels, k=k, groups=patient, query=query, database=database,
                                 n_permutations=1000, seed=seed)
tables.save_table(report.drop(columns="description"), res_dir / "retrieval")
print(f"{report.attrs['n_queries']} test queries, {report.attrs['n_database']} database volumes, k = {k}")
display(report[["description"]])
report.drop(columns="description").round(3)

# %% [markdown]
# Three test volumes with at least one abnormality and their nearest cases (the centre slice of each,
# as the model sees it; J = Jaccard overlap of the label sets).

# %%
rng = np.random.default_rng(seed)
candidates = query[n_abnormal[query] > 0]
shown = np.sort(rng.choice(candidates, size=min(3, len(candidates)), replace=False)) if len(candidates) else query[:3]
neighbours = latent.nearest_cases(features, k=min(4, k), query=shown, groups=patient, database=database)
cache = Path(config["cache_dir"])


def centre_slice(i: int) -> np.ndarray:
    vol = load_prepared(cache, str(names[i]))
    return np.asarray(vol[vol.shape[0] // 2], dtype=np.float32)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


images, captions = [], []
for q, row in zip(shown, neighbours, strict=True):
    images.append([centre_slice(q)] + [centre_slice(j) for j in row])
    captions.append([f"query {names[q].removesuffix('.nii.gz')}\n{figures.label_caption(labels[q])}"]
                    + [f"{names[j].removesuffix('.nii.gz')}, J={jaccard(labels[q], labels[j]):.2f}\n"
                       f"{figures.label_caption(labels[j])}" for j in row])
figures.plot_retrieval(images, captions, normalized_range=tuple(config["profile"]["hu_range"]),
                       path=fig_dir / "retrieval_examples.png")

# %% [markdown]
# Which abnormalities are retrieved best? Per class, the share of neighbours of a positive query that
# are positive too (precision at k), against the class's prevalence in the database (the random
# expectation).

# %%
all_neighbours = latent.nearest_cases(features, k=k, query=query, groups=patient, database=database)
rows = []
for c, cls in enumerate(CLASSES):
    pos = labels[query, c] == 1
    if pos.any():
        rows.append((cls, int(pos.sum()), float(labels[all_neighbours[pos], c].mean()),
                     float(labels[database, c].mean())))
per_class_retrieval = pd.DataFrame(rows, columns=["class", "positive queries", "precision@k", "prevalence"])
per_class_retrieval = per_class_retrieval.set_index("class")
prevalence = per_class_retrieval["prevalence"]
per_class_retrieval["lift"] = (per_class_retrieval["precision@k"] / prevalence).where(prevalence > 0)
tables.save_table(per_class_retrieval, res_dir / "retrieval_per_class")
per_class_retrieval.round(3)
