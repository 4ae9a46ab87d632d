"""What a research repository carries: licence, citation, model card, and a README whose opening
shows what the project is, how to run it, one figure and Table 2 with intervals, equal to the results;
and documents that stay true: every relative link resolves, every command in a ```bash block is run by a
test or marked as needing CT-RATE or a GPU, and every option a command uses is one its program offers."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINKED = [*DOCS, REPO / "MODEL_CARD.md", REPO / "DATA.md"]
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


def test_readme_is_a_front_page():
    assert len(README.splitlines()) <= 150, "README.md is the front page: move details into docs/"
    for page in ("results", "ctrate", "cluster", "developing"):
        assert f"(docs/{page}.md)" in README, page


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


# ---------------------------------------------------------------------------------------------------------
# Links: every relative link and image in README.md, docs/*.md and the cards points at a file (and heading)
# ---------------------------------------------------------------------------------------------------------


def _prose_and_code(text: str) -> tuple[str, list[tuple[str, str]]]:
    """The text with fenced code blocks removed, and the blocks as (language, body)."""
    prose, blocks, fence, lang, body = [], [], None, "", []
    for line in text.splitlines():
        m = re.match(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)", line)
        if fence is None and m:
            fence, lang, body = m.group(1), m.group(2), []
        elif fence is not None and line.strip().startswith(fence) and not line.strip().strip(fence[0]):
            blocks.append((lang, "\n".join(body)))
            fence = None
        elif fence is not None:
            body.append(line)
        else:
            prose.append(line)
    assert fence is None, "an unclosed code block"
    return "\n".join(prose), blocks


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.cache
def _anchors(path: Path) -> frozenset[str]:
    prose, _ = _prose_and_code(path.read_text())
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose, flags=re.M):
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        out.add(slug if n == 0 else f"{slug}-{n}")
        seen[slug] = n + 1
    return frozenset(out)


def _links(path: Path) -> list[str]:
    prose, _ = _prose_and_code(path.read_text())
    prose = re.sub(r"(`+).*?\1", "", prose, flags=re.S)  # inline code is not a link
    return re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose)


def test_slug_follows_github():
    assert _slug("The paper's question, measured") == "the-papers-question-measured"
    assert _slug("Preprocessing, and where the paper is ambiguous") == "preprocessing-and-where-the-paper-is-ambiguous"
    assert _slug("`ctlib.train` and 3D") == "ctlibtrain-and-3d"


@pytest.mark.parametrize("doc", LINKED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc: Path):
    broken = []
    for link in _links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        if not path.exists():
            broken.append(f"{link}: no such file")
        elif anchor and (path.suffix != ".md" or anchor not in _anchors(path)):
            broken.append(f"{link}: no heading #{anchor} in {path.relative_to(REPO)}")
    assert not broken, f"{doc.relative_to(REPO)}: " + "; ".join(broken)


# ---------------------------------------------------------------------------------------------------------
# Commands: each line of a ```bash block is run by a test, or marked as needing CT-RATE or a GPU
# (docs/developing.md, "Commands in these pages", states the convention)
# ---------------------------------------------------------------------------------------------------------

NEEDS = re.compile(r"^#\s*needs (CT-RATE|a GPU)\b")
BENCHMARK = re.compile(r"^#\s*benchmark, by hand\b")
# command pattern (a full match) -> (file, text it must hold): the test, or CI script, that runs that command
TESTED = {
    r"bash run_all\.sh --tests": (".ci/run", "exec bash run_all.sh --tests"),
    r"bash run_all\.sh --print-install --torch-cuda \d+\.\d+": (
        "tests/test_gpu.py", "def test_run_all_installs_torch_for_another_cuda_then_the_lock"),
    r"bash run_all\.sh --lab( --port \d+)?": ("tests/test_lab_browser.py",
                                              "def test_notebook_01_runs_in_lab_and_its_slice_viewer_responds"),
    r"bash run_all\.sh": ("tests/test_notebooks.py", "def test_every_notebook_runs_on_smoke"),  # smoke profile
    r"python -m pytest( tests/\S+)*": ("run_all.sh", "pytest"),
    r"python -m ctlib\.synthetic --out \S+ --patients \d+": ("tests/test_synthetic.py",
                                                             "def test_cli_help_and_snapshot"),
    r"python -m ctlib\.prepare --profile paper --data-root /data/CT-RATE --workers \d+": (
        "tests/test_preparation.py", "def test_readme_ctrate_steps_then_training_decodes_nothing"),
    r"torchrun --standalone --nproc_per_node 4 -m ctlib\.train .*": (
        "tests/test_preparation.py", "def test_readme_ctrate_steps_then_training_decodes_nothing"),
    r"\.venv/bin/python scripts/lock\.py( --check)?": ("tests/test_repository.py",
                                                       "def test_lock_commands_write_and_check"),
    r"python scripts/refresh_docs\.py": ("tests/test_repository.py",
                                         "def test_refresh_docs_leaves_the_committed_documents_unchanged"),
    r"python benchmarks/bench_models\.py": ("tests/test_models.py",
                                            "def test_benchmark_measures_a_tiny_configuration"),
    r"bash benchmarks/gpu_check\.sh --device cpu --quick": (
        "tests/test_gpu_check.py", "def test_gpu_check_cpu_mode_writes_one_report_with_every_section"),
}


def _split_comment(line: str) -> tuple[str, str]:
    """(command, trailing comment) of one shell line; a '#' inside quotes or a word is not a comment."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip(), line[i:].strip()
    return line.strip(), ""


def _documented_commands() -> list[tuple[str, str, str | None]]:
    """(document, command, mark) for every command line of a ```bash block; mark: 'needs', 'benchmark', None."""
    out = []
    for doc in DOCS:
        _, blocks = _prose_and_code(doc.read_text())
        for lang, body in blocks:
            if lang != "bash":
                continue
            block_mark = None
            for raw in re.sub(r"\\\n\s*", " ", body).splitlines():
                command, comment = _split_comment(raw.strip())
                if not command:  # a comment line: a mark applies to the rest of the block
                    if NEEDS.match(comment):
                        block_mark = "needs"
                    elif BENCHMARK.match(comment):
                        block_mark = "benchmark"
                    continue
                mark = block_mark or ("needs" if NEEDS.match(comment) else
                                      "benchmark" if BENCHMARK.match(comment) else None)
                out.append((str(doc.relative_to(REPO)), command, mark))
    return out


def _tested_by(command: str) -> str | None:
    return next((pattern for pattern in TESTED if re.fullmatch(pattern, command)), None)


def test_every_documented_command_is_tested_or_marked():
    commands = _documented_commands()
    assert any(c == "bash run_all.sh --tests" for _, c, _ in commands)
    loose = [f"{doc}: {cmd}" for doc, cmd, mark in commands if mark is None and _tested_by(cmd) is None]
    assert not loose, ("commands neither run by a test (TESTED in tests/test_repository.py) nor marked "
                       "'# needs CT-RATE' / '# needs a GPU':\n" + "\n".join(loose))
    benchmarks = [f"{doc}: {cmd}" for doc, cmd, mark in commands
                  if mark == "benchmark" and not re.match(r"^(python|bash) benchmarks/", cmd)]
    assert not benchmarks, "'# benchmark, by hand' is for benchmarks/ scripts only:\n" + "\n".join(benchmarks)


def test_every_tested_command_names_a_test_that_exists_and_is_documented():
    used = {_tested_by(cmd) for _, cmd, _ in _documented_commands()}
    for pattern, (file, needle) in TESTED.items():
        assert needle in (REPO / file).read_text(), f"{pattern!r}: {file} has no {needle!r}"
        assert pattern in used, f"{pattern!r} is in TESTED but no document runs it any more"


def _programs(command: str) -> list[tuple[tuple[str, ...], list[str]]]:
    """[(how to ask the program for --help, the options the command gives it)]."""
    words = shlex.split(command)
    while words and re.match(r"^\w+=", words[0]):  # VAR=value prefixes
        words = words[1:]
    if words[:1] == ["srun"]:
        words = words[1:]
    if words[:2] == ["bash", "-c"]:
        return _programs(words[2])
    if not words:
        return []

    def options(args: list[str]) -> list[str]:
        return [a.split("=", 1)[0] for a in args if a.startswith("--") and a != "--"]

    head = words[0]
    if head == "torchrun":
        cut = words.index("-m") if "-m" in words else len(words)
        out = [(("-m", "torch.distributed.run"), options(words[1:cut]))]
        if cut < len(words):
            out.append((("-m", words[cut + 1]), options(words[cut + 2:])))
        return out
    if head == "python" or head.endswith("/python"):
        if words[1] == "-m":
            return [(("-m", words[2]), options(words[3:]))]
        return [((words[1],), options(words[2:]))]
    if head == "bash" and words[1].endswith(".sh"):
        return [(("bash", words[1]), options(words[2:]))]
    return []  # cd, source, export, set, ...: the shell's own


def _option_uses() -> dict[tuple[str, ...], dict[str, str]]:
    uses: dict[tuple[str, ...], dict[str, str]] = {}
    for doc, command, _ in _documented_commands():
        for program, opts in _programs(command):
            for opt in opts:
                uses.setdefault(program, {}).setdefault(opt, f"{doc}: {command}")
    return uses


@functools.cache
def _help(program: tuple[str, ...]) -> str:
    cmd = list(program) if program[0] == "bash" else [sys.executable, *program]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CTLIB_PYTHON": sys.executable}
    done = subprocess.run([*cmd, "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(program)} --help failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done.stdout + done.stderr


@pytest.mark.parametrize("program", sorted(_option_uses()), ids=" ".join)
def test_every_documented_option_is_offered_by_its_program(program: tuple[str, ...]):
    text = _help(program)
    missing = [f"{opt} ({where})" for opt, where in _option_uses()[program].items()
               if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text)]
    assert not missing, f"{' '.join(program)} --help does not offer: " + "; ".join(missing)


def test_python_examples_import_names_that_exist():
    for doc in DOCS:
        for lang, body in _prose_and_code(doc.read_text())[1]:
            if lang != "python":
                continue
            for module, names in re.findall(r"^from (ctlib[\w.]*) import ([^\n#]+)", body, flags=re.M):
                mod = importlib.import_module(module)
                for name in (n.strip() for n in names.split(",")):
                    assert hasattr(mod, name), f"{doc.relative_to(REPO)}: {module} has no {name}"


# ---------------------------------------------------------------------------------------------------------
# The maintenance commands of docs/developing.md, run
# ---------------------------------------------------------------------------------------------------------


def test_refresh_docs_leaves_the_committed_documents_unchanged(tmp_path: Path, monkeypatch):
    """`python scripts/refresh_docs.py` on a copy of the repository: the committed README and model card
    are what it writes from the committed results."""
    for name in ("README.md", "MODEL_CARD.md"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "results", tmp_path / "results")
    spec = importlib.util.spec_from_file_location("refresh_docs", REPO / "scripts/refresh_docs.py")
    refresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(refresh)
    monkeypatch.setattr(refresh, "REPO", tmp_path)
    assert refresh.main([]) == 0
    for name in ("README.md", "MODEL_CARD.md"):
        assert (tmp_path / name).read_text() == (REPO / name).read_text(), f"{name}: run scripts/refresh_docs.py"


def test_lock_commands_write_and_check(tmp_path: Path):
    """`scripts/lock.py` writes a lock of this environment and `--check` then finds it equal."""
    lock = tmp_path / "requirements-lock.txt"
    for args in ([], ["--check"]):
        done = subprocess.run([sys.executable, str(REPO / "scripts/lock.py"), *args, "--out", str(lock)],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
    assert "torch==" in lock.read_text()
