"""Write the demo's Table 2 into README.md and its metrics into MODEL_CARD.md, from results/demo.

After a demo run (``bash run_all.sh``, and ``bash run_all.sh --seed 1 --only 01,02,03,04`` for the
second-seed row), run ``python scripts/refresh_docs.py``: the README's Table 2 (between the
``<!-- BEGIN table2 -->`` markers) and the model card's metrics block (between ``<!-- BEGIN demo
metrics`` and ``<!-- END demo metrics -->``) are rewritten from the CSV files, so the numbers in the
documents are those of the committed results (``tests/test_repository.py`` checks it).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
MODELS = {"ResNet": "resnet2d", "ViT": "vit3d", "ResNet+ViT": "fusion"}
CARD_NAMES = {"ResNet": "ResNet2D", "ViT": "ViT3D", "ResNet+ViT": "Fusion (alpha = 1)"}


def _f(x: float) -> str:
    return f"{x:.3f}"


def table2_markdown(results: Path) -> str:
    """The README's Table 2: one row per model and threshold rule, the AUROC interval as columns."""
    t2 = pd.read_csv(results / "table2.csv", keep_default_na=False)
    lines = ["| model | threshold | 2D | 3D | AUROC | AUROC 95% CI low | AUROC 95% CI high | accuracy | precision "
             "| recall | F1 |",
             "|:---|:---|:---|:---|---:|---:|---:|---:|---:|---:|---:|"]
    for _, r in t2.iterrows():
        ci = pd.read_csv(results / f"metrics_{MODELS[r['model']]}.csv").iloc[0]
        tick = {True: "✓", False: "", "True": "✓", "False": ""}
        lines.append(f"| {r['model']} | {r['threshold']} | {tick[r['2D']]} | {tick[r['3D']]} | {_f(r['auroc'])} | "
                     f"{_f(ci['auroc_low'])} | {_f(ci['auroc_high'])} | {_f(r['accuracy'])} | "
                     f"{_f(r['precision'])} | {_f(r['recall'])} | {_f(r['f1'])} |")
    return "\n".join(lines)


def card_rows(results: Path, seed1: Path | None) -> str:
    """The model card's metrics rows (seed 0 per model, the learned alpha, seed 1 when present)."""
    rows = ["| model | data | macro AUROC | 95% CI (bootstrap over test patients) | accuracy @0.5 | precision @0.5 "
            "| recall @0.5 | F1 @0.5 | F1, thresholds tuned on val |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for model, file in MODELS.items():
        m = pd.read_csv(results / f"metrics_{file}.csv").set_index("rule")
        h, tuned = m.loc["threshold 0.5"], m.loc["thresholds tuned on validation"]
        rows.append(f"| {CARD_NAMES[model]} | synthetic, demo, seed 0 | {_f(h['auroc'])} | "
                    f"[{_f(h['auroc_low'])}, {_f(h['auroc_high'])}] | {_f(h['accuracy'])} | {_f(h['precision'])} | "
                    f"{_f(h['recall'])} | {_f(h['f1'])} | {_f(tuned['f1'])} |")
    t3 = pd.read_csv(results / "table3.csv", keep_default_na=False).set_index("alpha")
    for key, name in (("learned", "Fusion (learned alpha)"), ("learned-2d", "Fusion (learned alpha and 2D weight)")):
        if key in t3.index:
            r = t3.loc[key]
            ci = (f"[{_f(r['auroc_low'])}, {_f(r['auroc_high'])}]" if "auroc_low" in t3.columns
                  else "in results/demo/table3_paired.md")
            rows.append(f"| {name} | synthetic, demo, seed 0 | {_f(r['auroc'])} | {ci} | {_f(r['accuracy'])} | "
                        f"{_f(r['precision'])} | {_f(r['recall'])} | {_f(r['f1'])} | |")
    if seed1 is not None and all((seed1 / f"metrics_{f}.csv").exists() for f in MODELS.values()):
        ms = [pd.read_csv(seed1 / f"metrics_{f}.csv").iloc[0] for f in MODELS.values()]
        rows.append("| ResNet2D / ViT3D / Fusion | synthetic, demo, seed 1 | "
                    + " / ".join(_f(m["auroc"]) for m in ms) + " | "
                    + " / ".join(f"[{_f(m['auroc_low'])}, {_f(m['auroc_high'])}]" for m in ms) + " | | | | | |")
    rows.append("| all | CT-RATE | not run here | | | | | | |")
    return "\n".join(rows)


def _replace_block(text: str, begin: str, end: str, body: str, path: Path) -> str:
    pattern = re.compile(rf"({re.escape(begin)}[^\n]*\n(?:[^\n]*-->\n)?)(.*?)({re.escape(end)})", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path}: no block between {begin!r} and {end!r}")
    return pattern.sub(lambda m: m.group(1) + "\n" + body + "\n\n" + m.group(3), text, count=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(REPO / "results/demo"), help="the seed-0 demo tables")
    p.add_argument("--seed1", default=str(REPO / "results/demo-seed1"), help="the seed-1 tables, if run")
    args = p.parse_args(argv)
    results, seed1 = Path(args.results), Path(args.seed1)
    readme, card = REPO / "README.md", REPO / "MODEL_CARD.md"
    readme.write_text(_replace_block(readme.read_text(), "<!-- BEGIN table2", "<!-- END table2 -->",
                                     table2_markdown(results), readme))
    card.write_text(_replace_block(card.read_text(), "<!-- BEGIN demo metrics", "<!-- END demo metrics -->",
                                   card_rows(results, seed1 if seed1.exists() else None), card))
    print(f"updated {readme.name} (Table 2) and {card.name} (metrics) from {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
