"""What a research repository carries: licence, citation, model card, and a README whose opening
shows what the project is, how to run it, one figure and Table 2 with intervals, equal to the results."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
MODEL_FILES = {"ResNet": "resnet2d", "ViT": "vit3d", "ResNet+ViT": "fusion"}


def _markdown_table(text: str, header_start: str) -> pd.DataFrame:
    lines = text[text.index(header_start):].splitlines()
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return pd.DataFrame(rows[2:], columns=rows[0])


def test_licence_is_the_mit_licence_pyproject_declares():
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "the ctlib authors" in text
    assert re.search(r'^license = "MIT"$', (REPO / "pyproject.toml").read_text(), flags=re.M)


def test_citation_cff_parses_with_the_required_keys():
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0"
    for key in ("message", "title", "authors", "type", "license", "references"):
        assert cff.get(key), key
    assert cff["license"] == "MIT"
    assert all(isinstance(a, dict) and (a.get("name") or a.get("family-names")) for a in cff["authors"])
    refs = {r["title"]: r for r in cff["references"]}
    paper = refs["Evaluating a residual learning framework for 3D computed tomography data"]
    assert paper["authors"][0]["family-names"] == "Maestri"
    ctrate = [r for r in cff["references"] if "ibrahimhamamci/CT-RATE" in r.get("url", "")]
    assert ctrate and ctrate[0]["license"] == "CC-BY-NC-SA-4.0"
    article = refs["Developing Generalist Foundation Models from a Multimodal Dataset for 3D Computed Tomography"]
    assert article["year"] == 2024 and article["authors"][0]["family-names"] == "Hamamci"
    for ref in cff["references"]:
        assert ref["type"] in {"report", "data", "article"} and ref["authors"], ref["title"]


def test_readme_opens_with_what_commands_figure_table2_in_that_order():
    opening = README[:README.index("\n## ")]
    what = opening.index("ctlib reproduces")
    commands = opening.index("bash run_all.sh            #")
    tests = opening.index("bash run_all.sh --tests")
    figure = opening.index("](figures/demo/fig3_per_class_auroc.png)")
    table = opening.index("| model | threshold |")
    assert what < commands < tests < figure < table
    assert (REPO / "figures/demo/fig3_per_class_auroc.png").stat().st_size > 10_000
    for link in ("(MODEL_CARD.md)", "(DATA.md)", "(notebooks/)", "(LICENSE)", "(#cite)", "(#jupyterlab)"):
        assert link in opening, link


def test_readme_table2_equals_the_demo_results_with_their_intervals():
    table = _markdown_table(README, "| model | threshold |")
    results = pd.read_csv(REPO / "results/demo/table2.csv", keep_default_na=False)
    assert len(table) == len(results) == 6
    for (_, row), (_, res) in zip(table.iterrows(), results.iterrows(), strict=True):
        assert (row["model"], row["threshold"]) == (res["model"], str(res["threshold"]))
        for col in ("auroc", "accuracy", "precision", "recall", "f1"):
            assert row[{"auroc": "AUROC", "f1": "F1"}.get(col, col)] == f"{res[col]:.3f}", (row["model"], col)
        ci = pd.read_csv(REPO / f"results/demo/metrics_{MODEL_FILES[res['model']]}.csv").iloc[0]
        assert row["AUROC 95% CI low"] == f"{ci['auroc_low']:.3f}"
        assert row["AUROC 95% CI high"] == f"{ci['auroc_high']:.3f}"
        assert float(row["AUROC 95% CI low"]) <= float(row["AUROC"]) <= float(row["AUROC 95% CI high"])


def test_readme_states_the_ctrate_licence_and_cites_all_three():
    assert "CT-RATE is distributed under CC BY-NC-SA" in README
    assert re.search(r"(?i)models\s+trained on CT-RATE[^.]*carry (its|those) terms", README)
    cite = README[README.index("## Cite"):]
    for key in ("@software{ctlib", "@misc{maestri_residual_ct", "@misc{hamamci2024ctrate", "2403.17834"):
        assert key in cite, key


def test_readme_documents_lab():
    lab = README[README.index("## JupyterLab"):]
    assert "bash run_all.sh --lab" in lab


@pytest.mark.parametrize("model,file", sorted(MODEL_FILES.items()))
def test_model_card_metrics_equal_the_demo_results(model, file):
    card = (REPO / "MODEL_CARD.md").read_text()
    assert "Not for diagnosis" in card or "**Not for diagnosis**" in card
    block = card[card.index("<!-- BEGIN demo metrics"):card.index("<!-- END demo metrics -->")]
    name = {"ResNet": "ResNet2D", "ViT": "ViT3D", "ResNet+ViT": "Fusion (alpha = 1)"}[model]
    row = next(line for line in block.splitlines() if line.startswith(f"| {name} | synthetic, demo, seed 0"))
    m = pd.read_csv(REPO / f"results/demo/metrics_{file}.csv").set_index("rule")
    at_half, tuned = m.loc["threshold 0.5"], m.loc["thresholds tuned on validation"]
    expected = [f"{at_half['auroc']:.3f}", f"[{at_half['auroc_low']:.3f}, {at_half['auroc_high']:.3f}]",
                f"{at_half['accuracy']:.3f}", f"{at_half['precision']:.3f}", f"{at_half['recall']:.3f}",
                f"{at_half['f1']:.3f}", f"{tuned['f1']:.3f}"]
    assert [c.strip() for c in row.strip("|").split("|")][2:] == expected
