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
# # 08 · Where the fusion model looks (Figure 5)
#
# Reproduces **Figure 5**: attention maps of the fusion model (learned alpha) over a CT in the lung
# window, for a **localised** pathology (lung nodule) and a **diffuse** one (mosaic attenuation pattern).
# The paper found the attention "picking up the underlying lung morphology", with two focal regions for
# the nodule but a diffuse spread for mosaic attenuation, and read it as the attention being better at
# localised abnormalities with distinct boundaries.
#
# Three maps per volume, all over slices: the **3D ViT's attention** (rollout through the spatial and
# the slice-wise layers, composed exactly: the attention reaching slice s, patch n is the mean over the
# pooled tokens of the slice-wise flow into slice s at every position n' times the spatial flow from n
# to n'), the **ViT's class-specific relevance** (the same rollout with each layer's attention weighted
# by the gradient of the class logit, Chefer et al. 2021, each stage's attention part row-normalised
# against the skip connection, their eqs. 8-9, and each pooled token weighted by its gradient x
# activation instead of the plain mean), and the **ResNet branch's Grad-CAM** for the
# fusion model's logit of the class (the 2D branch's evidence for the fused decision). The last two are
# class-specific; for scoring, every map gets one normalisation (non-negative, summing to 1 over the
# volume's voxels).

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
localisation_volumes = 60  # test volumes whose maps are scored, the first in split order (None: all)

# %%
# %matplotlib inline
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from IPython.display import Markdown, display

from ctlib import attention, figures, localisation, tables
from ctlib.cache import load_prepared
from ctlib.data import CLASSES, load_cohort
from ctlib.prepare import preprocessing_for, synthetic_root
from ctlib.runs import load_run, paper_outputs
from ctlib.synthetic import lesion_masks_for_model

out = paper_outputs(profile, data_root=data_root, work_dir=work_dir, runs_dir=runs_dir,
                    figures_dir=figures_dir, results_dir=results_dir, seed=seed)
prof, fig_dir, res_dir = out.profile, out.figures, out.results
run_dir = out.run_dir("fusion", "learned")
if not (run_dir / "checkpoints" / "best.pt").exists():
    raise FileNotFoundError(f"{run_dir} has no finished run: run notebook 05 first (profile {profile})")
torch.manual_seed(seed)
model, run_profile, config = load_run(run_dir)
cache = Path(config["cache_dir"])
print(f"{run_dir.name}: alpha = {model.alpha_value:.3f}; data: {config['data']}")

# %% [markdown]
# Grad-CAM's usual block is `layer4`, 32 times coarser than the slice (7x7 on the paper's 224-pixel
# slices); on the small slices of the synthetic profiles that is 1 or 2 cells, so `layer3` (16 times
# coarser) is hooked there instead.

# %%
image_size = run_profile.size_3d[0]
gradcam_layer, stride = ("layer4", 32) if image_size // 32 >= 7 else ("layer3", 16)
print(f"{image_size}x{image_size} slices: Grad-CAM on {gradcam_layer} "
      f"({image_size // stride}x{image_size // stride} cells per slice)")

# %% [markdown]
# ## The two cases
#
# For each class, the test volume positive for it that the model scores highest (the clearest case of
# what the model learned). If the test set has no positive (tiny cohorts), a validation or training
# volume is used and the title says so.

# %%
with np.load(run_dir / "features.npz") as f:
    names, split, labels, probs = f["names"], f["split"], f["labels"], f["probs"]


def pick_case(cls: str, taken: set[int]) -> tuple[int, str]:
    """The highest-scored positive volume for ``cls``, test split first, another volume than ``taken``
    when there is one."""
    k = CLASSES.index(cls)
    for avoid in (taken, set()):
        for part in ("test", "val", "train"):
            rows = [i for i in np.flatnonzero((split == part) & (labels[:, k] == 1)) if i not in avoid]
            if rows:
                return int(max(rows, key=lambda i: probs[i, k])), part
    raise ValueError(f"no volume is positive for {cls!r} in this cohort")


cases, stats, taken = [], [], set()
for cls in ("Lung nodule", "Mosaic attenuation pattern"):
    i, part = pick_case(cls, taken)
    taken.add(i)
    k = CLASSES.index(cls)
    volume = torch.from_numpy(np.array(load_prepared(cache, str(names[i])), dtype=np.float32))
    vit_map = attention.vit_attention(model, volume)
    relevance = attention.vit_relevance(model, volume, k, normalize="max")
    cam = attention.gradcam_resnet(model, volume, k, layer=gradcam_layer)
    slices = attention.salient_slices(vit_map + relevance + cam, n=4, min_gap=max(1, volume.shape[0] // 8))
    name = str(names[i]).removesuffix(".nii.gz")
    title = f"{cls}: {name} ({part}, p = {probs[i, k]:.2f})"
    maps = {"ViT attention": vit_map, "ViT relevance (class)": relevance,
            f"ResNet Grad-CAM ({gradcam_layer})": cam}
    cases.append(figures.AttentionCase(title, volume.numpy(), maps, slices))
    stats.append((cls, name, part, float(probs[i, k]), attention.concentration(vit_map),
                  attention.concentration(cam)))
    print(f"{title}: slices {slices}")

# %% [markdown]
# ## Figure 5
#
# Rows: the CT in the lung window, the ViT attention, the ViT's class relevance, the ResNet Grad-CAM;
# columns: the four slices with the most saliency. Colours are normalised per volume (0 to 1), and low values are transparent.

# %%
figures.plot_attention_overlays(cases, normalized_range=tuple(run_profile.hu_range),
                                path=fig_dir / "fig5_attention_maps.png")

# %% [markdown]
# ## Focal or diffuse?
#
# The paper's reading in one number per map: the share of the total saliency held by the 5% most
# salient voxels (0.05 for a uniform map, near 1 for a map focused on a small region). If the paper's
# reading holds, the nodule's maps are more concentrated than the mosaic attenuation's.

# %%
focus = pd.DataFrame(stats, columns=["class", "volume", "split", "probability", "ViT attention top-5% share",
                                     "Grad-CAM top-5% share"]).set_index("class")
tables.save_table(focus, res_dir / "attention_concentration")
focus.round(3)

# %% [markdown]
# ## Do the maps point at the lesion?
#
# The synthetic generator knows where every lesion is (its lesion sidecar), so Figure 5's "localised vs
# diffuse" reading becomes numbers. For each class, over the test volumes that contain its lesion, and
# for each model and class-specific map (the ViT's gradient-weighted attention, the ResNet's Grad-CAM;
# the fusion has both): the **pointing game** (is the map's maximum inside the lesion?) and the **mass
# fraction** (the share of the map inside the lesion), each beside what a random map scores (the
# lesion's share of the volume). Maps are scored on the model-input grid, each normalised to sum 1, on the
# first `localisation_volumes` test volumes (each map costs a backward pass: all 300 of the demo's test
# volumes would add ~8 minutes on 2 cores). CT-RATE has no lesion truth: there the table is skipped.

# %%
if run_profile.data_root is not None:
    print("CT-RATE data: no lesion truth, so the maps are not scored")
else:
    snapshot = synthetic_root(run_profile)
    cohort = load_cohort(snapshot).set_index("VolumeName")
    test_rows = np.flatnonzero(split == "test")[:localisation_volumes]
    print(f"scoring the maps of {len(test_rows)} test volumes")

    def cases_for(model_name: str, run_cache: Path):
        prep = preprocessing_for(run_profile, model_name)
        for i in test_rows:
            name = str(names[i])
            row = cohort.loc[name]
            spacing = (float(row["XYSpacing"]), float(row["XYSpacing"]), float(row["ZSpacing"]))
            masks = lesion_masks_for_model(snapshot, name, prep, spacing)
            yield name, np.array(load_prepared(run_cache, name), dtype=np.float32), labels[i], masks

    def relevance_of(net):
        return lambda volume, k: attention.vit_relevance(net, volume, k)

    def gradcam_of(net):
        return lambda volume, k: attention.gradcam_resnet(net, volume, k, layer=gradcam_layer, normalize="sum")

    fusion_methods = {"ViT relevance": relevance_of(model), "Grad-CAM": gradcam_of(model)}
    scorers = {"ResNet+ViT (learned alpha)": ("fusion", model, cache, fusion_methods)}
    for label, model_name in (("ResNet", "resnet2d"), ("ViT", "vit3d")):
        other_dir = out.run_dir(model_name)
        if (other_dir / "checkpoints" / "best.pt").exists():
            net, _, other_config = load_run(other_dir)
            methods = ({"Grad-CAM": gradcam_of(net)} if model_name == "resnet2d"
                       else {"ViT relevance": relevance_of(net)})
            scorers[label] = (model_name, net, Path(other_config["cache_dir"]), methods)
        else:
            print(f"{other_dir} has no finished run (notebook {'02' if model_name == 'resnet2d' else '03'}): "
                  f"{label} is not scored")
    scores = pd.concat([localisation.score_maps(cases_for(model_name, run_cache), methods, model=label)
                        for label, (model_name, _net, run_cache, methods) in scorers.items()], ignore_index=True)
    tables.save_table(scores.set_index(["volume", "class", "model", "method"]), res_dir / "localisation_scores")
    localisation_by_class = localisation.localisation_table(scores)
    tables.save_table(localisation_by_class, res_dir / "localisation")
    for cls, table in localisation_by_class.groupby(level="class", sort=False):
        display(Markdown(f"**{cls}**"))
        display(table.droplevel("class").round(3))
