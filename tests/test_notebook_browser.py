"""Notebook 02's widgets used the way a person uses them: JupyterLab in headless Chromium, Run All, move the sigma
slider, and the figure is redrawn for the new sigma.

Needs Chromium and its driver from the OS packages (``apt-get install chromium chromium-driver``; ``.ci/run``
installs them) and selenium; skipped with a message otherwise. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.browser

# Every wait measures readiness (it polls for the state it needs); this is only the most it may take. A busy
# machine (load 4-5 on 2 cores: kernel start, the sweep cell, figure redraws) takes minutes where an idle one
# takes seconds, so the budget is generous: a hang still fails, a slow machine does not.
WAIT_S = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"JupyterLab did not answer at {url}: {log.read_text()[-2000:]}")


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on a free localhost port with a token, serving a temporary copy of notebook 02."""
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip("Chromium / chromedriver not installed (apt-get install chromium chromium-driver): browser test skipped")
    pytest.importorskip("selenium", reason="selenium not installed: browser test skipped")
    work = tmp_path / "lab"
    work.mkdir()
    shutil.copy(REPO / "notebooks" / "02_tune_sigma.ipynb", work / "02_tune_sigma.ipynb")
    port, token = _free_port(), os.urandom(12).hex()
    env = {**os.environ, "LDLIB_PRESET": "tiny", "LDLIB_N_PAIRS": "2", "LDLIB_SIGMA": "0.08", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "jcfg"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "jrun"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "jws"), "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    log = tmp_path / "lab.log"
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}", "--ServerApp.terminals_enabled=False",
           # nothing from outside: no news feed, no update check, no extension catalogue
           "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--LabApp.extension_manager=readonly"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # CI containers run as root
        cmd.append("--allow-root")
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        _wait_http(f"http://127.0.0.1:{port}/api/status?token={token}", proc, log, timeout=WAIT_S)
        yield {"url": f"http://127.0.0.1:{port}/lab/tree/02_tune_sigma.ipynb?token={token}", "log": log, "tmp": tmp_path,
               "api": f"http://127.0.0.1:{port}/api", "token": token}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def browser(lab):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1800", f"--user-data-dir={lab['tmp'] / 'chromium-profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _images(driver, css: str) -> list[str]:
    """The src (data: URLs of the figures) of every image under elements matching css."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).flatMap("
        "e => Array.from(e.querySelectorAll('img'))).map(i => i.src)", css)


def notebook_kernel_state(api: str, token: str, name: str) -> str | None:
    """The execution state ("starting", "idle", "busy", ...) of the kernel of notebook name, from the server's
    REST API (/api/sessions), or None while it has no session: what the server knows, whatever the page shows."""
    import json
    import urllib.request

    try:
        with urllib.request.urlopen(f"{api}/sessions?token={token}", timeout=10) as r:
            sessions = json.loads(r.read())
    except OSError:
        return None
    for s in sessions:
        if s.get("path", "").endswith(name) and s.get("kernel"):
            return s["kernel"].get("execution_state")
    return None


def _all_cells_ran(driver) -> bool:
    """Every code cell has an execution count and none is queued or running ([*])."""
    prompts = driver.execute_script(
        "return Array.from(document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')).map(p => p.textContent)")
    return bool(prompts) and all(p.strip() not in ("[ ]:", "[*]:", "") for p in prompts)


def test_sigma_slider_redraws_the_figure(lab, browser):
    from selenium.common.exceptions import TimeoutException

    step = ["start"]
    try:
        _use_the_notebook(browser, lab, step)
    except TimeoutException as e:
        shot = lab["tmp"] / "failure.png"
        browser.save_screenshot(str(shot))
        raise AssertionError(f"timed out at step {step[0]!r} (screenshot {shot}; server log {lab['log']})") from e


def _use_the_notebook(driver, lab: dict, step: list) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    step[0] = "open the notebook"
    driver.set_page_load_timeout(WAIT_S)
    driver.get(lab["url"])
    wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.5)
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")))
    step[0] = "the kernel is ready"

    def kernel_idle(d) -> bool:
        for button in d.find_elements(By.CSS_SELECTOR, ".jp-Dialog button.jp-mod-accept"):
            button.click()  # "Select Kernel": Python 3 (ipykernel) is preselected, as a person would accept it
        # The server's word on the kernel, not a status-bar text: JupyterLab 4 may show the kernel's state only as
        # the toolbar's circle (no "Idle" text item), depending on version and settings.
        return notebook_kernel_state(lab["api"], lab["token"], "02_tune_sigma.ipynb") == "idle"

    wait.until(kernel_idle)
    step[0] = "Run > Run All Cells"
    run_menu = wait.until(EC.element_to_be_clickable(
        (By.XPATH, "//div[contains(@class,'lm-MenuBar-itemLabel') and normalize-space()='Run']")))
    run_menu.click()
    wait.until(EC.element_to_be_clickable(
        (By.XPATH, "//li[contains(@class,'lm-Menu-item')][.//div[normalize-space()='Run All Cells']]"))).click()
    step[0] = "the sigma slider appears"
    handle = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".widget-slider .noUi-handle")))
    readouts = lambda: driver.execute_script(  # noqa: E731
        "return Array.from(document.querySelectorAll('.widget-readout')).map(r => r.textContent.trim())")
    sigma = lambda: next((r for r in readouts() if "." in r), None)  # noqa: E731  (the only float slider)
    wait.until(lambda d: sigma() == "0.080")
    step[0] = "every cell has run"
    wait.until(lambda d: _all_cells_ran(d) and kernel_idle(d))
    static = _images(driver, ".jp-OutputArea-output:not(.widget-output *)")
    assert static, "the notebook showed no figure"
    assert _images(driver, ".widget-output") == []  # the live area is empty until a control moves
    step[0] = "drag the sigma handle"
    slider = handle.find_element(By.XPATH, "./ancestor::div[contains(@class,'widget-slider')]")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", slider)
    ActionChains(driver).click_and_hold(handle).move_by_offset(60, 0).release().perform()
    wait.until(lambda d: sigma() not in (None, "0.080"))
    moved = sigma()
    step[0] = f"the figure is drawn for sigma {moved}"
    wait.until(lambda d: len(_images(d, ".widget-output")) == 1)
    first = _images(driver, ".widget-output")[0]
    assert float(moved) > 0.08 and first not in static  # not the sigma-0.08 figure
    step[0] = "nudge the handle with the arrow key"
    handle.send_keys("\ue014")  # ArrowRight: one step of 0.005
    wait.until(lambda d: sigma() != moved)
    step[0] = f"the figure is redrawn for sigma {sigma()}"
    wait.until(lambda d: _images(d, ".widget-output") not in ([], [first]))
    assert len(_images(driver, ".widget-output")) == 1  # redrawn in place, not appended
