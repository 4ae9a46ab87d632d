"""Figures and tables: every plotting function draws a real picture; tables are exact; notebooks are
paired, parameterised and stripped of outputs."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from ctlib import figures as F
from ctlib import tables as T
from ctlib.data import CLASSES
from ctlib.paper_numbers import (
    PUBLISHED_CTRATE_AUROC,
    compare_metrics,
    compare_table1,
    paper_table1,
    paper_table2,
    paper_table3,
    published_comparison,
    results_table2,
)
from ctlib.preprocess import Preprocessing

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
PARAMETERS = {
    "profile": "demo",
    "data_root": None,
    "work_dir": "../data",
    "runs_dir": "../runs",
    "figures_dir": "../figures",
    "results_dir": "../results",
    "gpus": None,
    "launcher": "",
    "seed": 0,
    "redo": False,
    "runs_at_once": None,
}


def phantom(rng: np.random.Generator, lesion_slice: int | None = None, s: int = 6, n: int = 32) -> np.ndarray:
    """(S, H, W) model input in [-1, 1]: a body ellipse with two lungs, optionally a nodule."""
    yy, xx = np.mgrid[:n, :n]
    vol = np.full((s, n, n), -1.0)
    vol[:, ((yy - n / 2) / (0.4 * n)) ** 2 + ((xx - n / 2) / (0.45 * n)) ** 2 < 1] = 0.04
    for cx in (0.32 * n, 0.68 * n):
        vol[:, ((yy - n / 2) / (0.28 * n)) ** 2 + ((xx - cx) / (0.13 * n)) ** 2 < 1] = -0.85
    vol = vol + rng.normal(0, 0.01, vol.shape)
    if lesion_slice is not None:
        vol[lesion_slice, (yy - 12) ** 2 + (xx - 10) ** 2 < 6] = 0.02
    return vol.astype(np.float32)


def _is_png(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 5_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# windowing
# ---------------------------------------------------------------------------------------------
def test_window_on_hu_and_on_model_input_agree():
    hu = np.array([-2000.0, -1350.0, -600.0, 150.0, 3000.0])
    np.testing.assert_allclose(F.window(hu), [0.0, 0.0, 0.5, 1.0, 1.0])
    # model input: HU / 1000 for hu_range (-1000, 1000); within the clip range both agree
    hu_in = np.array([-1000.0, -600.0, 0.0, 150.0])
    np.testing.assert_allclose(F.window(hu_in / 1000.0, normalized_range=(-1000, 1000)), F.window(hu_in),
                               atol=1e-6)
    np.testing.assert_allclose(F.window(np.array([40.0]), *F.MEDIASTINAL_WINDOW), [0.5])
    with pytest.raises(ValueError, match="width"):
        F.window(hu, width=0)


# ---------------------------------------------------------------------------------------------
# Figure 1
# ---------------------------------------------------------------------------------------------
def test_pick_examples_finds_the_lesion_slice_and_the_cleanest_positive():
    rng = np.random.default_rng(0)
    n = 12
    labels = np.zeros((n, len(CLASSES)), dtype=int)
    k = CLASSES.index("Lung nodule")
    labels[[3, 7], k] = 1
    labels[7, 0] = labels[7, 1] = 1  # volume 7 has other abnormalities too
    lesion = {3: 4, 7: 2}
    vols = {i: phantom(rng, lesion.get(i)) for i in range(n)}
    loads: list[int] = []

    def load(i: int) -> np.ndarray:
        loads.append(i)
        return vols[i]

    ex = F.pick_examples(labels, load, ["Lung nodule", "Emphysema"], candidates=1,
                         names=[f"train_{i}_a_1" for i in range(n)])
    assert [e.cls for e in ex] == ["Lung nodule"]  # no Emphysema positive: left out
    assert ex[0].index == 3 and ex[0].slice == 4 and ex[0].name == "train_3_a_1"
    assert ex[0].image.shape == (32, 32) and ex[0].difference.shape == (32, 32)
    assert len(loads) == len(set(loads))  # every volume loaded once
    # the difference peaks at the nodule
    r, c = np.unravel_index(np.argmax(ex[0].difference), ex[0].difference.shape)
    assert (r - 12) ** 2 + (c - 10) ** 2 < 6
    with pytest.raises(ValueError, match="unknown classes"):
        F.pick_examples(labels, load, ["Not a class"])


def test_pick_examples_with_known_lesions_shows_the_slice_through_the_lesion(tmp_path):
    rng = np.random.default_rng(1)
    n = 10
    labels = np.zeros((n, len(CLASSES)), dtype=int)
    k = CLASSES.index("Lung nodule")
    labels[[2, 5, 8], k] = 1
    vols = {i: phantom(rng, None, s=8) for i in range(n)}  # no visible cue: only the truth can tell
    masks = {i: np.zeros((8, 32, 32), bool) for i in (2, 5, 8)}
    masks[2][3, 10:12, 10:12] = True  # 4 voxels on slice 3
    masks[5][6, 14:18, 20:23] = True  # 12 voxels on slice 6, 2 on slice 5
    masks[5][5, 14, 20:22] = True
    # volume 8: its lesion lies outside the kept slices

    ex = F.pick_examples(labels, vols.__getitem__, ["Lung nodule"], candidates=3,
                         lesion=lambda i, cls: masks.get(i) if cls == "Lung nodule" else None)
    assert ex[0].index == 5 and ex[0].slice == 6  # the largest visible cross-section, on its slice
    np.testing.assert_array_equal(ex[0].lesion, masks[5][6])
    # re-rendered at twice the resolution, the outline follows (nearest neighbour)
    fine = F.refine_examples(ex, lambda i: np.repeat(np.repeat(vols[i], 2, axis=1), 2, axis=2))
    assert fine[0].lesion.shape == (64, 64) and fine[0].lesion.sum() == 4 * masks[5][6].sum()
    assert fine[0].lesion[28:36, 40:46].all()
    F.plot_representative_slices(fine, show_difference=False, path=tmp_path / "f1.png")
    assert _is_png(tmp_path / "f1.png")
    # without truth the same call falls back to the search for the least normal slice
    fallback = F.pick_examples(labels, vols.__getitem__, ["Lung nodule"], candidates=3)
    assert fallback[0].lesion is None
    with pytest.raises(ValueError, match="lesion mask"):
        F.pick_examples(labels, vols.__getitem__, ["Lung nodule"],
                        lesion=lambda i, cls: np.ones((2, 2, 2), bool))


def test_pick_examples_discounts_normal_anatomical_variation():
    """The top slice's body size varies between patients (like the lung bases): the plain difference
    from the closest normal scan is largest there, but the slice with the nodule is the unusual one."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:32, :32]

    def volume(top_radius: int, nodule: bool = False) -> np.ndarray:
        v = np.full((6, 32, 32), -1.0, np.float32)
        for z in range(6):
            v[z, (yy - 16) ** 2 + (xx - 16) ** 2 < (top_radius if z == 0 else 12) ** 2] = 0.04
            v[z, (yy - 16) ** 2 + (xx - 10) ** 2 < 16] = -0.85
        if nodule:
            v[4, 14:17, 9:12] = 0.03
        return v + rng.normal(0, 0.005, v.shape).astype(np.float32)

    vols = [volume(r) for r in (8, 9, 10, 12, 13, 14, 15, 16)] + [volume(11, nodule=True)]
    labels = np.zeros((9, len(CLASSES)), dtype=int)
    labels[8, CLASSES.index("Lung nodule")] = 1
    (ex,) = F.pick_examples(labels, vols.__getitem__, ["Lung nodule"])
    assert ex.index == 8 and ex.slice == 4
    assert np.abs(ex.difference[14:17, 9:12]).mean() > 10 * np.abs(ex.difference[:5, :5]).mean()


def test_figure1_and_montage_are_drawn(tmp_path):
    rng = np.random.default_rng(1)
    labels = np.zeros((6, len(CLASSES)), dtype=int)
    labels[1, CLASSES.index("Lung nodule")] = 1
    labels[2, CLASSES.index("Atelectasis")] = 1
    vols = {i: phantom(rng, 3 if i == 1 else None) for i in range(6)}
    ex = F.pick_examples(labels, vols.__getitem__, ["Lung nodule", "Atelectasis"])
    fig = F.plot_representative_slices(ex, normalized_range=(-1000, 1000), path=tmp_path / "fig1.png")
    assert isinstance(fig, Figure) and len([a for a in fig.axes if a.images]) == 4
    assert _is_png(tmp_path / "fig1.png")
    fig = F.plot_slice_montage(vols[1], n=4, normalized_range=(-1000, 1000), path=tmp_path / "m.png")
    assert len([a for a in fig.axes if a.images]) == 4 and _is_png(tmp_path / "m.png")
    with pytest.raises(ValueError):
        F.plot_representative_slices([])


def test_display_preprocessing_keeps_the_slices_and_refines_the_pixels():
    prep = Preprocessing(size=(32, 32, 12), num_slices=8, hu_range=(-1000.0, 1000.0),
                         target_spacing=(11.0, 11.0, 20.0))
    fine = F.display_preprocessing(prep, 2.75)
    assert fine.size == (128, 128, 12) and fine.num_slices == 8 and fine.target_spacing == (2.75, 2.75, 20.0)
    assert F.display_preprocessing(prep, 0.5).size == (128, 128, 12)  # at most 4x
    assert F.display_preprocessing(prep, 11.0) == prep
    native = Preprocessing(size=(214, 214, 240), num_slices=100)
    assert F.display_preprocessing(native, 0.7) is native
    # the same HU volume through both: slice s of one is slice s of the other at 4x the pixels
    hu = np.zeros((64, 64, 24), np.float32) - 800.0
    hu[:, :, 12] = 40.0  # one bright native slice (10 mm) -> one bright 20 mm slice, the same in both
    coarse = prep.apply(hu, spacing=(5.5, 5.5, 10.0))
    detailed = fine.apply(hu, spacing=(5.5, 5.5, 10.0))
    assert detailed.shape == (8, 128, 128)
    assert np.argmax(coarse.mean(axis=(1, 2))) == np.argmax(detailed.mean(axis=(1, 2)))
    ex = F.SliceExample("Lung nodule", 0, 3, 0.1, coarse[3], np.ones((32, 32), np.float32))
    (refined,) = F.refine_examples([ex], lambda i: detailed)
    assert refined.image.shape == (128, 128) and refined.difference.shape == (128, 128)
    np.testing.assert_allclose(refined.image, detailed[3])
    np.testing.assert_allclose(refined.difference, 1.0)


def test_label_caption():
    y = np.zeros(len(CLASSES), int)
    assert F.label_caption(y) == "no abnormality"
    y[[CLASSES.index("Lung nodule"), CLASSES.index("Emphysema"), CLASSES.index("Consolidation")]] = 1
    assert F.label_caption(y) == "Emphysema, Lung nodule +1"
    assert F.label_caption(y, max_items=3) == "Emphysema, Lung nodule, Consolidation"
    with pytest.raises(ValueError):
        F.label_caption([1, 0])


def test_slice_viewer_builds_a_widget():
    rng = np.random.default_rng(2)
    w = F.slice_viewer({"a": phantom(rng), "b": phantom(rng, s=4)}, normalized_range=(-1000, 1000))
    pytest.importorskip("ipywidgets")
    assert w is not None and len(w.children) >= 2


# ---------------------------------------------------------------------------------------------
# Figures 2-5
# ---------------------------------------------------------------------------------------------
def test_pipeline_figure(tmp_path):
    fig = F.plot_pipeline(num_slices=16, image_size=64, patch_size=8, path=tmp_path / "fig2.png")
    texts = " ".join(t.get_text() for t in fig.axes[0].texts)
    assert "centre 16 slices" in texts and "→ 16×64×64" in texts and "8×8 patches: 8×8/slice" in texts
    assert "ResNet-18" in texts
    assert _is_png(tmp_path / "fig2.png")


def _auroc_frame(rng: np.random.Generator, nan_class: str | None = None) -> pd.DataFrame:
    a = rng.uniform(0.55, 0.95, len(CLASSES) + 1)
    frame = pd.DataFrame({"auroc": a, "low": a - 0.1, "high": np.minimum(a + 0.05, 1.0),
                          "n_pos": rng.integers(1, 20, len(CLASSES) + 1)}, index=[*CLASSES, "macro"])
    if nan_class:
        frame.loc[nan_class, ["auroc", "low", "high"]] = np.nan
    return frame


def test_per_class_auroc_figure(tmp_path):
    rng = np.random.default_rng(3)
    results = {"ResNet": _auroc_frame(rng), "ViT": _auroc_frame(rng, "Hiatal hernia"),
               "ResNet+ViT": _auroc_frame(rng)}
    fig = F.plot_per_class_auroc(results, path=tmp_path / "fig3.png")
    ax = fig.axes[0]
    assert len(ax.get_yticklabels()) == len(CLASSES) + 1
    ticks = sorted(zip(ax.get_yticks(), (t.get_text() for t in ax.get_yticklabels()), strict=True))
    assert ticks[-1][1].startswith("Medical material (n=") and ticks[0][1] == "Macro mean"  # top, bottom
    assert [t.get_text().split(" (")[0] for t in ax.get_legend().get_texts()] == list(results)
    assert _is_png(tmp_path / "fig3.png")
    with pytest.raises(ValueError, match="lacks columns"):
        F.plot_per_class_auroc({"x": pd.DataFrame({"auroc": [0.5]}, index=["macro"])})


def test_tsne_figure_has_a_discrete_colour_bar(tmp_path):
    rng = np.random.default_rng(4)
    counts = rng.integers(0, 6, 50)
    counts[0] = 5
    fig = F.plot_tsne(rng.normal(size=(50, 2)), counts, path=tmp_path / "fig4.png")
    cbar_ax = fig.axes[1]
    assert [round(t) for t in cbar_ax.get_yticks() if -0.5 <= t <= 5.5] == [0, 1, 2, 3, 4, 5]
    assert _is_png(tmp_path / "fig4.png")
    with pytest.raises(ValueError):
        F.plot_tsne(rng.normal(size=(5, 3)), np.zeros(5))


def test_attention_overlay_figure(tmp_path):
    rng = np.random.default_rng(5)
    ct = phantom(rng)
    m = rng.random(ct.shape).astype(np.float32)
    cases = [F.AttentionCase("Lung nodule", ct, {"ViT attention": m, "ResNet Grad-CAM": m}, [1, 3]),
             F.AttentionCase("Mosaic attenuation pattern", ct, {"ViT attention": m, "ResNet Grad-CAM": m},
                             [0, 2, 4])]
    fig = F.plot_attention_overlays(cases, normalized_range=(-1000, 1000), path=tmp_path / "fig5.png")
    # 2 cases x (CT + 2 maps) rows x 3 columns, and the two-slice case leaves one panel empty
    assert sum(1 for a in fig.axes if a.images) == 3 * 2 + 3 * 3
    assert _is_png(tmp_path / "fig5.png")
    with pytest.raises(ValueError, match="shape"):
        F.plot_attention_overlays([F.AttentionCase("x", ct, {"bad": m[:2]}, [0])])


# ---------------------------------------------------------------------------------------------
# supporting figures
# ---------------------------------------------------------------------------------------------
def _history(n: int = 4, alpha: bool = True) -> pd.DataFrame:
    ep = np.arange(1, n + 1)
    h = pd.DataFrame({"epoch": ep, "train_loss": 0.7 / ep, "val_loss": 0.75 / ep ** 0.5,
                      "val_auroc": 0.5 + 0.05 * ep})
    if alpha:
        h["alpha"] = 0.5 + 0.1 * ep
    return h


def test_learning_curves_and_alpha(tmp_path):
    fig = F.plot_learning_curves({"resnet2d": _history(), "vit3d": _history(3)}, path=tmp_path / "lc.png")
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 4 and _is_png(tmp_path / "lc.png")
    fig = F.plot_alpha_trajectory(_history(), initial=0.5, fixed=[0.0, 1.0], path=tmp_path / "a.png")
    line = fig.axes[0].lines[-1]
    np.testing.assert_allclose(line.get_xdata(), [0, 1, 2, 3, 4])
    np.testing.assert_allclose(line.get_ydata(), [0.5, 0.6, 0.7, 0.8, 0.9])
    assert _is_png(tmp_path / "a.png")
    with pytest.raises(ValueError, match="alpha"):
        F.plot_alpha_trajectory(_history(alpha=False))
    h = _history().assign(beta=[1.1, 1.2, 1.3, 1.4])
    fig = F.plot_alpha_trajectory({"learned-2d": h}, initial=1.0, weight="beta")
    np.testing.assert_allclose(fig.axes[0].lines[-1].get_ydata(), [1.0, 1.1, 1.2, 1.3, 1.4])
    assert "β" in fig.axes[0].get_ylabel()
    with pytest.raises(ValueError, match="beta"):
        F.plot_alpha_trajectory(_history(), weight="beta")


def test_cooccurrence_counts(tmp_path):
    labels = np.zeros((5, len(CLASSES)), dtype=int)
    labels[:3, 0] = 1
    labels[:2, 1] = 1
    fig = F.plot_cooccurrence(pd.DataFrame(labels, columns=CLASSES), path=tmp_path / "c.png")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts[:2] == ["3", "2"] and texts[len(CLASSES)] == "2"  # row 0: [3, 2, ...]; row 1 starts 2
    assert _is_png(tmp_path / "c.png")


def test_hu_histograms_and_sample(tmp_path):
    rng = np.random.default_rng(6)
    vols = [rng.normal(-800, 50, (4, 16, 16)), rng.normal(40, 30, (4, 16, 16))]
    sample = F.hu_sample(vols, max_voxels=500, seed=0)
    assert sample.size == 500 and (sample < -500).sum() == 250
    fig = F.plot_hu_histograms({"lung": vols[0], "body": vols[1]}, path=tmp_path / "hu.png")
    assert len(fig.axes[0].lines) >= 2 and _is_png(tmp_path / "hu.png")


def test_prevalence_alpha_comparison_and_retrieval_figures(tmp_path):
    ours = paper_table1() * 2
    ours.loc["Volumes"] = [100, 70, 20, 10]
    fig = F.plot_class_prevalence(ours, paper_table1(), path=tmp_path / "p.png")
    widths = [p.get_width() for p in fig.axes[0].patches]
    np.testing.assert_allclose(widths[: len(CLASSES)], widths[len(CLASSES):])  # same shares
    assert _is_png(tmp_path / "p.png")
    t3 = paper_table3()
    assert _is_png(F.save_figure(F.plot_metrics_vs_alpha(t3, t3), tmp_path / "m"))
    t2 = paper_table2()
    assert _is_png(F.save_figure(F.plot_metric_comparison(t2, t2), tmp_path / "cmp.png"))
    rng = np.random.default_rng(7)
    imgs = [[phantom(rng)[2] for _ in range(4)]] * 2
    caps = [["query", "1", "2", "3"]] * 2
    fig = F.plot_retrieval(imgs, caps, normalized_range=(-1000, 1000), path=tmp_path / "r.png")
    assert sum(1 for a in fig.axes if a.images) == 8 and _is_png(tmp_path / "r.png")


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------
def test_to_markdown_is_exact(tmp_path):
    df = pd.DataFrame({"Model": ["ResNet", "a|b"], "2D": [True, False], "AUC": [0.8312, np.nan],
                       "n": [3, 12]}).set_index("Model")
    expected = (
        "| Model | 2D | AUC | n |\n"
        "|:---|:---|---:|---:|\n"
        "| ResNet | ✓ | 0.831 | 3 |\n"
        "| a\\|b |  | n/a | 12 |\n"
    )
    assert T.to_markdown(df) == expected
    assert T.to_markdown(df, tmp_path / "t.md", floatfmt=".2f").splitlines()[2] == "| ResNet | ✓ | 0.83 | 3 |"
    assert (tmp_path / "t.md").read_text().endswith("| a\\|b |  | n/a | 12 |\n")
    assert T.to_markdown(pd.DataFrame({"x": [1.5]}), index=False) == "| x |\n|---:|\n| 1.500 |\n"
    csv, md = T.save_table(df, tmp_path / "sub" / "table2")
    assert csv.name == "table2.csv" and md.name == "table2.md"
    back = pd.read_csv(csv, index_col=0)
    assert back.loc["ResNet", "AUC"] == pytest.approx(0.8312)  # CSV keeps full precision


_METRICS_JSON = {
    "auroc": 0.71, "accuracy": 0.8, "precision": 0.5, "recall": 0.3, "f1": 0.375, "auroc_ci": [0.6, 0.8],
    "val_tuned": {"auroc": 0.71, "accuracy": 0.7, "precision": 0.4, "recall": 0.6, "f1": 0.48},
    "ctclip": {"auroc": 0.71, "accuracy": 0.75, "precision": 0.45, "f1_weighted": 0.77, "protocol": "x"},
}


def test_run_summary_rows():
    t = T.run_summary(_METRICS_JSON)
    assert list(t.index) == ["threshold 0.5", "thresholds tuned on validation", "CT-CLIP protocol (fitted on test)"]
    assert list(t.columns) == ["auroc", "auroc_low", "auroc_high", "accuracy", "precision", "recall", "f1",
                               "f1_weighted (CT-CLIP)"]
    assert t.loc["threshold 0.5", "recall"] == 0.3 and t.loc["thresholds tuned on validation", "recall"] == 0.6
    # the protocol's support-weighted F1 has its own column; the macro-F1 column stays empty in its row
    assert t.loc["CT-CLIP protocol (fitted on test)", "f1_weighted (CT-CLIP)"] == 0.77
    assert np.isnan(t.loc["CT-CLIP protocol (fitted on test)", "f1"])
    assert t.loc["threshold 0.5", "f1"] == 0.375 and np.isnan(t.loc["threshold 0.5", "f1_weighted (CT-CLIP)"])
    assert np.isnan(t.loc["CT-CLIP protocol (fitted on test)", "recall"])
    assert (t["auroc_low"] == 0.6).all() and (t["auroc_high"] == 0.8).all()


def test_tables_beside_the_paper():
    ours = paper_table1()
    ours.loc["Volumes"] = [3000, 2100, 600, 300]
    t1 = compare_table1(ours)
    assert list(t1.index) == list(CLASSES)
    np.testing.assert_allclose(t1["ours %"], t1["paper %"])
    assert t1["ours %"].sum() == pytest.approx(100.0)
    assert t1.loc["Medical material", "paper train:val:test"] == "67:23:10"
    t2 = results_table2({"ResNet": _METRICS_JSON, "ResNet+ViT": _METRICS_JSON})
    assert t2.index.tolist() == [("ResNet", "0.5"), ("ResNet", "tuned on val"), ("ResNet+ViT", "0.5"),
                                 ("ResNet+ViT", "tuned on val")]
    assert t2.loc[("ResNet", "0.5"), "2D"] and not t2.loc[("ResNet", "0.5"), "3D"]
    assert t2.loc[("ResNet+ViT", "tuned on val"), "recall"] == 0.6
    assert list(t2.columns) == ["2D", "3D", "auroc", "auroc_low", "auroc_high", "accuracy", "precision", "recall",
                                "f1"]
    assert (t2["auroc_low"] == 0.6).all() and (t2["auroc_high"] == 0.8).all()
    assert np.isnan(results_table2({"ResNet": {**_METRICS_JSON, "auroc_ci": None}})["auroc_low"]).all()
    with pytest.raises(ValueError, match="unknown model"):
        results_table2({"CNN": _METRICS_JSON})
    cmp = compare_metrics(t2.xs("0.5", level="threshold"), paper_table2())
    assert cmp.loc["ResNet", "auroc ours"] == 0.71 and cmp.loc["ResNet", "auroc paper"] == 0.83
    pub = published_comparison({"ours: ResNet": (0.71, "synthetic phantoms")})
    assert pub.loc["ours: ResNet", "data"] == "synthetic phantoms"
    assert pub.loc["T3D fine-tuned", "auroc"] == 0.802 and pub.loc["paper: ResNet+ViT", "auroc"] == 0.87
    assert set(pub["source"]) == {"this run", "paper Table 2", "paper Table 3", "published"}


def test_paper_numbers_are_consistent():
    t1 = paper_table1()
    assert list(t1.index) == list(CLASSES)
    assert (t1["Train"] + t1["Val"] + t1["Test"] == t1["Total"]).all()
    assert t1.loc["Lung nodule", "Total"] == 1393 and t1.loc["Interlobular septal thickening", "Test"] == 31
    t2 = paper_table2()
    assert t2.loc["ResNet+ViT", "auroc"] == 0.87 and t2.loc["ViT", "recall"] == 0.25
    assert t2["2D"].tolist() == [True, False, True]
    t3 = paper_table3()
    assert list(t3.index) == ["0.0", "0.1", "0.3", "0.5", "1.0", "learned"]
    assert t3.loc["0.5", "auroc"] == 0.88 and t3.loc["learned", "recall"] == 0.55
    # Table 3's alpha = 0 is the ResNet of Table 2 and alpha = 1 its ResNet+ViT
    assert t3.loc["0.0"].tolist() == t2.loc["ResNet", ["auroc", "accuracy", "precision", "recall"]].tolist()
    assert t3.loc["1.0"].tolist() == t2.loc["ResNet+ViT", ["auroc", "accuracy", "precision", "recall"]].tolist()
    assert PUBLISHED_CTRATE_AUROC["CT-CLIP zero-shot"] == 0.731 and len(PUBLISHED_CTRATE_AUROC) == 6
    copy = paper_table1()
    copy.loc["Lung nodule", "Total"] = 0  # a copy: the numbers are untouched
    assert paper_table1().loc["Lung nodule", "Total"] == 1393


# ---------------------------------------------------------------------------------------------
# notebooks: parameters, pairing, no outputs
# ---------------------------------------------------------------------------------------------
NOTEBOOK_SOURCES = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))


def _cells(nb: Any) -> list[tuple[str, str, list[str]]]:
    """(type, source without surrounding blank lines, tags) of each cell of a notebook node."""
    return [(c["cell_type"], c["source"].strip("\n") if isinstance(c["source"], str)
             else "".join(c["source"]).strip("\n"), list(c.get("metadata", {}).get("tags", [])))
            for c in nb["cells"]]


def test_the_nine_notebooks_exist():
    names = [p.stem for p in NOTEBOOK_SOURCES]
    assert [n[:2] for n in names] == [f"{i:02d}" for i in range(1, 10)], names
    assert "py:percent" in (NOTEBOOK_DIR / "jupytext.toml").read_text()


@pytest.mark.parametrize("path", NOTEBOOK_SOURCES, ids=lambda p: p.stem)
def test_notebook_parameters_cell(path):
    jupytext = pytest.importorskip("jupytext")
    cells = _cells(jupytext.read(path))
    assert cells[0][0] == "markdown", "a notebook opens with a markdown cell naming the paper's part"
    tagged = [c for c in cells if "parameters" in c[2]]
    assert len(tagged) == 1, "exactly one cell tagged parameters"
    assert cells.index(tagged[0]) == next(i for i, c in enumerate(cells) if c[0] == "code"), \
        "the parameters cell is the first code cell"
    values = {}
    for node in ast.parse(tagged[0][1]).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, ast.dump(node)
        values[node.targets[0].id] = ast.literal_eval(node.value)  # flat scalars only
    # papermill passes the same set to every notebook; the opt-in sweep (09) adds its own after them, and 08
    # how many test volumes its localisation scores
    assert {k: values[k] for k in PARAMETERS if k in values} == PARAMETERS
    extra = {"08": {"localisation_volumes"}}.get(path.stem[:2], set())
    if path.stem[:2] != "09":
        assert set(values) == set(PARAMETERS) | extra
    assert all(isinstance(v, (str, int, float, bool, type(None))) for v in values.values())


@pytest.mark.parametrize("path", NOTEBOOK_SOURCES, ids=lambda p: p.stem)
def test_notebook_pair_in_sync_and_without_outputs(path):
    jupytext = pytest.importorskip("jupytext")
    ipynb = path.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} missing: run jupytext --sync {path.name}"
    nb = json.loads(ipynb.read_text())
    assert _cells(jupytext.read(path)) == _cells(nb), f"{ipynb.name} is out of sync with {path.name}"
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, "outputs committed"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
