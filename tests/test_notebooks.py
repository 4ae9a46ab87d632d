"""Every notebook, executed by papermill through run_all.sh on the smoke profile, and the notebook pairs
as JupyterLab opens them (through jupytext's contents manager)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
OPT_IN = ("09",)  # run_all.sh runs these only when --only names them
DEFAULT = [p for p in NOTEBOOKS if p.name[:2] not in OPT_IN]
# A Python warning as printed (RuntimeWarning, FutureWarning, UserWarning...); our logging's "WARNING"
# level (e.g. the demo's documented fallback to random weights offline) is not one.
PY_WARNING = re.compile(r"\b\w*Warning\b")
ZMQ_NOTICE = "running over TCP without encryption"


def _output_text(output: dict) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    if output.get("output_type") == "error":
        return "\n".join(output.get("traceback", []))
    return str(output.get("data", {}).get("text/plain", ""))


def _run_all(*args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    env = {**os.environ, "CTLIB_PYTHON": sys.executable, "OMP_NUM_THREADS": "2"}
    return subprocess.run(["bash", str(REPO / "run_all.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_paper(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper-smoke")
    res = _run_all("--profile", "smoke", "--out", str(out))
    return out, res


def test_every_notebook_runs_on_smoke(smoke_paper):
    out, res = smoke_paper
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert "all notebooks ran" in res.stdout
    executed = sorted((out / "runs/smoke/notebooks").glob("*.ipynb"))
    assert [p.name for p in executed] == [p.name for p in DEFAULT]  # not the opt-in 09
    for path in executed:
        nb = nbformat.read(path, as_version=4)
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
        assert not [o for o in outputs if o.get("output_type") == "error"], path.name
        warned = [line for o in outputs for line in _output_text(o).splitlines() if PY_WARNING.search(line)]
        assert not warned, f"{path.name} printed warnings:\n" + "\n".join(warned[:10])


def test_smoke_run_prints_no_warnings(smoke_paper):
    """Nor does run_all.sh's own output: kernels (the ZeroMQ notice), papermill, training subprocesses."""
    _, res = smoke_paper
    log = res.stdout + res.stderr
    assert ZMQ_NOTICE not in log, "kernels started without transport encryption (scripts/run_notebook.py)"
    warned = [line for line in log.splitlines() if PY_WARNING.search(line)]
    assert not warned, "\n".join(warned[:10])


@pytest.mark.parametrize("name", [
    "fig1_representative_slices.png", "fig2_pipeline.png", "fig3_per_class_auroc.png",
    "fig4_tsne.png", "fig5_attention_maps.png"])
def test_paper_figures_are_produced(smoke_paper, name):
    out, _ = smoke_paper
    path = out / "figures/smoke" / name
    assert path.exists(), sorted(p.name for p in (out / "figures/smoke").glob("*"))
    assert path.stat().st_size > 10_000  # a real picture, not an empty canvas


@pytest.mark.parametrize("name", ["table1.csv", "table1.md", "table2.csv", "table2.md", "table3.csv",
                                  "table3.md"])
def test_tables_are_produced(smoke_paper, name):
    import pandas as pd

    out, _ = smoke_paper
    path = out / "results/smoke" / name
    assert path.exists(), sorted(p.name for p in (out / "results/smoke").glob("*"))
    if name.endswith(".csv"):
        assert len(pd.read_csv(path)) > 0


def test_tables_that_cannot_mislead(smoke_paper):
    """Intervals as columns, the CT-CLIP weighted F1 apart, paired differences, the learned-2D row."""
    import pandas as pd

    out, _ = smoke_paper
    res = out / "results/smoke"
    t2 = pd.read_csv(res / "table2.csv")
    assert {"auroc_low", "auroc_high"} <= set(t2.columns)
    summary = pd.read_csv(res / "metrics_fusion.csv", index_col="rule")
    assert "f1_weighted (CT-CLIP)" in summary.columns
    assert summary["f1"].isna().loc["CT-CLIP protocol (fitted on test)"]
    paired2 = pd.read_csv(res / "table2_paired.csv")
    assert "ResNet+ViT - ResNet" in set(paired2["comparison"])
    assert {"diff", "diff_low", "diff_high", "p_boot"} <= set(paired2.columns)
    t3 = pd.read_csv(res / "table3.csv", index_col="alpha")
    assert "learned-2d" in t3.index and "learned" in t3.index
    paired3 = pd.read_csv(res / "table3_paired.csv")
    assert {"alpha learned - alpha 0.0", "alpha learned-2d - alpha 0.0"} <= set(paired3["comparison"])
    hist = pd.read_csv(out / "runs/smoke/fusion-learned-2d/history.csv")
    assert hist[["alpha", "beta"]].notna().all().all()


@pytest.fixture(scope="module")
def smoke_context(smoke_paper):
    """``run_all.sh --only 09`` on smoke, in the same output folder (the smoke snapshot at lambda = 1 is
    reused; lambda = 0 is generated)."""
    out, _ = smoke_paper
    return out, _run_all("--profile", "smoke", "--out", str(out), "--only", "09", timeout=900)


def test_context_sweep_runs_on_smoke_when_asked(smoke_context):
    import pandas as pd

    out, res = smoke_context
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    nb = nbformat.read(out / "runs/smoke/notebooks/09_3d_context.ipynb", as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    warned = [line for o in outputs for line in _output_text(o).splitlines() if PY_WARNING.search(line)]
    assert not warned, "\n".join(warned[:10])
    sweep = pd.read_csv(out / "results/smoke/context_sweep.csv")
    assert tuple(sweep.columns) == ("lambda", "seed", "model", "group", "auroc", "auroc_low", "auroc_high",
                                    "delta_vs_resnet", "delta_low", "delta_high")
    assert set(sweep["lambda"]) == {0.0, 1.0} and set(sweep["group"]) == {"2D", "3D"}
    assert {"ResNet", "ViT", "fusion", "3D CNN"} <= set(sweep["model"])
    resnet = sweep[sweep["model"] == "ResNet"]
    assert resnet[["delta_vs_resnet", "delta_low", "delta_high"]].isna().all().all()  # empty for the ResNet
    assert sweep[sweep["model"] == "fusion"]["delta_vs_resnet"].notna().all()
    assert (out / "figures/smoke/fig_3d_context.png").stat().st_size > 10_000
    assert (out / "results/smoke/context_endpoints.csv").exists()


_KERNEL = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
           "language_info": {"name": "python"}}


def test_run_all_fails_loudly_when_a_notebook_fails(tmp_path):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    good = nbformat.v4.new_notebook(metadata=_KERNEL, cells=[
        nbformat.v4.new_code_cell('profile = "smoke"', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("print('fine')")])
    bad = nbformat.v4.new_notebook(metadata=_KERNEL, cells=[
        nbformat.v4.new_code_cell('profile = "smoke"', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("raise RuntimeError('boom')")])
    nbformat.write(good, nbdir / "01_good.ipynb")
    nbformat.write(bad, nbdir / "02_bad.ipynb")
    res = _run_all("--profile", "smoke", "--out", str(tmp_path / "out"), "--notebooks", str(nbdir),
                   timeout=300)
    assert res.returncode != 0
    assert "FAILED notebooks: 02_bad (" in res.stderr  # only the failing one is named
    assert re.search(r"01_good\s+ok", res.stdout) and re.search(r"02_bad\s+FAILED", res.stdout)


# ---------------------------------------------------------------------------------------------
# The pairs, as JupyterLab serves them (jupytext's contents manager; tests/test_lab_browser.py
# drives the same in a browser)
# ---------------------------------------------------------------------------------------------
def test_every_ipynb_has_its_py():
    """An .ipynb without its percent-format source would be edited nowhere (the reverse, and that
    every pair is in sync and committed without outputs: tests/test_figures.py)."""
    orphans = [p.name for p in (REPO / "notebooks").glob("*.ipynb") if not p.with_suffix(".py").exists()]
    assert not orphans


@pytest.fixture()
def lab_contents(tmp_path):
    """Lab's contents manager (jupytext's, as its server extension installs it) on a copy of notebooks/."""
    pytest.importorskip("jupyter_server")
    import shutil

    from jupyter_server.services.contents.largefilemanager import LargeFileManager
    from jupytext import build_sync_jupytext_contents_manager_class

    root = tmp_path / "notebooks"
    shutil.copytree(REPO / "notebooks", root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    return root, build_sync_jupytext_contents_manager_class(LargeFileManager)(root_dir=str(root))


def _cells(model: dict) -> list[tuple[str, str]]:
    return [(c["cell_type"], c["source"]) for c in model["content"]["cells"]]


@pytest.mark.parametrize("name", [p.stem for p in NOTEBOOKS])
def test_lab_opens_py_and_ipynb_as_one_notebook(lab_contents, name):
    _, cm = lab_contents
    from_py = cm.get(f"{name}.py", type="notebook")
    from_ipynb = cm.get(f"{name}.ipynb")
    assert from_py["type"] == from_ipynb["type"] == "notebook"
    assert _cells(from_py) == _cells(from_ipynb)
    assert from_py["content"]["metadata"]["jupytext"]["formats"] == "ipynb,py:percent"


def test_saving_in_lab_writes_both_files_of_the_pair(lab_contents):
    import jupytext

    root, cm = lab_contents
    name = NOTEBOOKS[0].stem
    model = cm.get(f"{name}.py", type="notebook")
    cell = nbformat.v4.new_code_cell("print('saved from Lab')")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="saved from Lab\n")]
    model["content"]["cells"].append(cell)
    cm.save(model, f"{name}.py")
    assert jupytext.read(root / f"{name}.py").cells[-1].source == "print('saved from Lab')"
    saved = nbformat.read(root / f"{name}.ipynb", as_version=4)  # the outputs live in the .ipynb
    assert saved.cells[-1].source == "print('saved from Lab')"
    assert saved.cells[-1].outputs[0]["text"] == "saved from Lab\n"
