"""JupyterLab as a user opens it, in a real browser (headless Chromium driven by Selenium).

`bash run_all.sh --lab` serves a temporary copy of notebook 01 whose parameters cell says ``smoke`` and
points every output folder into a temporary directory (nothing is written into the repository but the
screenshot under test-artifacts/). The test opens the paired ``.py`` (as a notebook, which is what
Lab's default viewer is set to do), runs all cells from the Run menu, waits for them, saves (Ctrl+S), checks the saved ``.ipynb`` (outputs, no error, no warning) and ``.py`` (still the same
source), moves the slice viewer's slider and checks that the rendered image changed.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and the ``selenium`` and
``jupyterlab`` packages (requirements-lock.txt); skipped, saying which is missing, where they are not.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = "01_data_exploration"
ARTIFACTS = Path(os.environ.get("CTLIB_TEST_ARTIFACTS", REPO / "test-artifacts"))
RUN_TIMEOUT = 300  # s for the whole notebook on the smoke profile (about a minute on 2 cores)
WARNING = re.compile(r"\b\w*Warning\b")

pytestmark = pytest.mark.slow


def _browser() -> tuple[str, str]:
    """Paths of a Chromium binary and its chromedriver, or skip saying what is missing."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -r requirements-lock.txt)")
    pytest.importorskip("jupyterlab", reason="jupyterlab is not installed (pip install -e '.[lab]')")
    chrome = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if not chrome or not driver:
        pytest.skip("no Chromium/chromedriver on PATH: apt-get install chromium chromium-driver (.ci/run does)")
    return chrome, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _smoke_copy(dest: Path, outputs: Path) -> Path:
    """Copies the notebook pair into ``dest`` with its parameters set to smoke and ``outputs``/*."""
    import jupytext

    dest.mkdir(parents=True)
    shutil.copy(REPO / "notebooks" / "jupytext.toml", dest)
    nb = jupytext.read(REPO / "notebooks" / f"{NOTEBOOK}.py")
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params = {n.targets[0].id: ast.literal_eval(n.value) for n in ast.parse(cell.source).body}
    params.update(profile="smoke", work_dir=str(outputs / "data"), runs_dir=str(outputs / "runs"),
                  figures_dir=str(outputs / "figures"), results_dir=str(outputs / "results"))
    cell.source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    jupytext.write(nb, dest / f"{NOTEBOOK}.ipynb")
    time.sleep(0.05)  # the text file is the newer of the pair, as after `jupytext --sync`
    jupytext.write(nb, dest / f"{NOTEBOOK}.py", fmt="py:percent")
    return dest


def _lab_settings(settings_dir: Path) -> None:
    """User settings of the throw-away Lab: every cell attached to the DOM, no news or update popups."""
    for plugin, values in {
        "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
        "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    }.items():
        path = settings_dir / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


@pytest.fixture()
def lab(tmp_path):
    """``bash run_all.sh --lab`` on a smoke copy of notebook 01; yields (url, notebook dir, outputs dir)."""
    _browser()
    nb_dir = _smoke_copy(tmp_path / "notebooks", tmp_path / "outputs")
    home = tmp_path / "jupyter"
    _lab_settings(home / "lab-settings")
    env = {**os.environ, "CTLIB_PYTHON": sys.executable, "OMP_NUM_THREADS": "2",
           "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "JUPYTERLAB_SETTINGS_DIR": str(home / "lab-settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces")}
    log = tmp_path / "lab.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", str(REPO / "run_all.sh"), "--lab", "--notebooks", str(nb_dir),
                                 "--port", str(_free_port())], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        url = _wait_for_lab(proc, log)
        yield url, nb_dir, tmp_path / "outputs"
    finally:
        _stop_lab(proc, log)


def _wait_for_lab(proc: subprocess.Popen, log: Path, timeout: float = 120) -> str:
    """The URL run_all.sh prints, once the server answers on it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"run_all.sh --lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        found = re.search(r"open (http://127\.0\.0\.1:\d+/lab\?token=\w+)", log.read_text())
        if found:
            api = found.group(1).replace("/lab?", "/api/status?")
            try:
                with urllib.request.urlopen(api, timeout=5) as resp:
                    if resp.status == 200:
                        return found.group(1)
            except OSError:
                pass
        time.sleep(0.5)
    raise AssertionError(f"JupyterLab did not answer in {timeout} s:\n{log.read_text()[-3000:]}")


def _stop_lab(proc: subprocess.Popen, log: Path) -> None:
    """Shuts the server down through its API (which also stops the kernel); kills it if it hangs."""
    found = re.search(r"open (http://127\.0\.0\.1:\d+)/lab\?token=(\w+)", log.read_text())
    if found and proc.poll() is None:
        req = urllib.request.Request(f"{found.group(1)}/api/shutdown", method="POST",
                                     headers={"Authorization": f"token {found.group(2)}"})
        try:
            urllib.request.urlopen(req, timeout=10).close()
        except OSError:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _chrome(chrome: str, driver: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1100"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def _menu(browser, top: str, item: str) -> None:
    """Clicks menu ``top`` of Lab's menu bar, then its item labelled ``item``."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 20)
    wait.until(ec.element_to_be_clickable(
        (By.XPATH, f"//li[contains(@class, 'lm-MenuBar-item')][.//div[text()='{top}']]"))).click()
    wait.until(ec.element_to_be_clickable(
        (By.XPATH, f"//li[contains(@class, 'lm-Menu-item')][.//div[text()='{item}']]"))).click()


def _prompts(browser) -> list[str]:
    return browser.execute_script(
        "return Array.from(document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt'),"
        " e => e.textContent.trim())")


def _wait_run_all(browser, n_code: int, timeout: float) -> list[str]:
    """Waits until every code cell shows an execution count ``[n]:``; returns the prompts."""
    deadline = time.monotonic() + timeout
    prompts: list[str] = []
    while time.monotonic() < deadline:
        prompts = _prompts(browser)
        if len(prompts) == n_code and all(re.fullmatch(r"\[\d+\]:", p) for p in prompts):
            return prompts
        time.sleep(1)
    raise AssertionError(f"the notebook did not finish in {timeout} s; prompts {prompts}")


def _kernel_states(url: str) -> list[str]:
    """Execution states of the server's kernels, from its REST API."""
    with urllib.request.urlopen(url.replace("/lab?", "/api/kernels?"), timeout=5) as resp:
        return [k["execution_state"] for k in json.load(resp)]


def _viewer_image(browser) -> str:
    """The ``src`` of the image the slice viewer shows (a data: URL of the PNG)."""
    return browser.execute_script(
        "const w = document.querySelector('.widget-interact');"
        "const img = w && w.querySelector('.widget-output img');"
        "return img ? img.getAttribute('src') : null")


def _saved_outputs(path: Path) -> list[dict]:
    nb = nbformat.read(path, as_version=4)
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def test_notebook_01_runs_in_lab_and_its_slice_viewer_responds(lab):
    import jupytext
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, nb_dir, outputs = lab
    source = jupytext.read(nb_dir / f"{NOTEBOOK}.py")
    n_code = sum(c.cell_type == "code" for c in source.cells)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "lab_browser_01_slice_viewer.png"
    browser = _chrome(*_browser())
    t0 = time.monotonic()
    try:
        # the .py opens as the paired notebook (Lab's default viewer for Python files, jupyter-config/)
        browser.get(url.replace("/lab?", f"/lab/tree/{NOTEBOOK}.py?"))
        wait = WebDriverWait(browser, 90)
        wait.until(lambda b: len(_prompts(b)) == n_code)
        wait.until(lambda b: _kernel_states(url) == ["idle"])  # the notebook's kernel has started
        _menu(browser, "Run", "Run All Cells")
        prompts = _wait_run_all(browser, n_code, RUN_TIMEOUT)
        assert [int(p[1:-2]) for p in prompts] == list(range(1, n_code + 1)), prompts  # in order, once each

        viewer = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".widget-interact")))
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", viewer)
        readout = viewer.find_element(By.CSS_SELECTOR, ".widget-slider .widget-readout")
        before, value_before = _viewer_image(browser), readout.text
        assert before and before.startswith("data:image/png;base64,"), "the viewer shows no image"
        handle = viewer.find_element(By.CSS_SELECTOR, ".widget-slider .noUi-handle")
        ActionChains(browser).click_and_hold(handle).move_by_offset(-120, 0).release().perform()
        WebDriverWait(browser, 60).until(lambda b: _viewer_image(b) not in (None, before))
        after, value_after = _viewer_image(browser), readout.text
        assert int(value_after) < int(value_before), (value_before, value_after)
        browser.save_screenshot(str(shot))

        ActionChains(browser).key_down(Keys.CONTROL).send_keys("s").key_up(Keys.CONTROL).perform()
        WebDriverWait(browser, 30).until(
            lambda b: not b.find_elements(By.CSS_SELECTOR, ".jp-mod-current.jp-mod-dirty"))
    except BaseException:
        browser.save_screenshot(str(ARTIFACTS / "lab_browser_failure.png"))
        raise
    finally:
        browser.quit()
    print(f"\nscreenshot: {shot} ({time.monotonic() - t0:.0f} s in the browser)")

    # saving in Lab wrote both files of the pair: the .ipynb with the outputs, the .py with the same cells
    outs = _saved_outputs(nb_dir / f"{NOTEBOOK}.ipynb")
    assert outs, "the saved .ipynb has no outputs"
    assert not [o for o in outs if o["output_type"] == "error"], [o.get("ename") for o in outs]
    stderr = "".join(o.get("text", "") for o in outs if o.get("name") == "stderr")
    assert not WARNING.search(stderr), stderr[-2000:]
    saved = jupytext.read(nb_dir / f"{NOTEBOOK}.py")
    assert [(c.cell_type, c.source) for c in saved.cells] == [(c.cell_type, c.source) for c in source.cells]
    assert any(b"image/png" in json.dumps(o.get("data", {})).encode() for o in outs)
    assert (outputs / "figures/smoke/fig1_representative_slices.png").stat().st_size > 10_000
    assert before != after
