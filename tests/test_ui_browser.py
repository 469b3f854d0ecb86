"""The standalone page (`deltasvd ui`) in headless Chromium: Analyze, move the slider, read the
numbers and the table and check them against `deltasvd compress`, Save, and check the saved
file. A screenshot is left in tests/out/ui_explorer.png.

DELTASVD_UI_PYTHON=<python> serves the page from another interpreter (a venv with another
gradio; see README, Tests)."""

import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
import torch

from deltasvd.delta_file import read_delta, reconstruct
from deltasvd.fixtures import make_pair
from ui_env import CHROMEDRIVER, CHROMIUM, require_browser
from ui_pair import assert_same_table, cli_compress, small_pair, total_mb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOTS = os.path.join(ROOT, "tests", "out")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,2600"]
WAIT = 240   # seconds; the analysis runs on a shared 2-core machine in CI


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui_browser")
    models, loras = root / "models", root / "loras"
    models.mkdir()
    loras.mkdir()
    base, tuned = small_pair(models)
    # A Flux.1 pair (real names and widths, block 0 of each kind), bf16 as Flux ships.
    flux = make_pair(models, "flux_dev", "small", seed=3, base_dtype=torch.bfloat16,
                     tuned_dtype=torch.bfloat16)
    junk = models / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    return {"root": root, "models": models, "loras": loras, "base": base, "tuned": tuned,
            "junk": str(junk), "flux": flux}


@pytest.fixture(scope="module")
def server(folders):
    require_browser()
    port = _free_port()
    python = os.environ.get("DELTASVD_UI_PYTHON") or sys.executable
    env = dict(os.environ, PYTHONPATH=ROOT)
    log = open(folders["root"] / "server.log", "w+")
    proc = subprocess.Popen([python, "-m", "deltasvd", "ui", "--port", str(port), "--models",
                             str(folders["models"]), "--loras", str(folders["loras"])],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        end = time.time() + WAIT
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.time() > end:
                    log.seek(0)
                    pytest.fail(f"deltasvd ui did not start:\n{log.read()}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def browser(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    for flag in FLAGS + [f"--user-data-dir={tempfile.mkdtemp(prefix='dsvd-chromium-')}"]:
        opts.add_argument(flag)
    opts.binary_location = CHROMIUM
    # An explicit driver path: Selenium Manager never runs (it would download one).
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.get(server)
    yield driver
    driver.quit()


class Page:
    """The page's components by elem_id; the selectors hold on gradio 3.41, 4.x and 5/6."""

    def __init__(self, driver):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
        self.d, self.By, self.Keys = driver, By, Keys

    def field(self, eid):
        return self.d.find_element(self.By.CSS_SELECTOR, f"#{eid} textarea, #{eid} input")

    def text(self, eid):
        return self.field(eid).get_attribute("value") or ""

    def type(self, eid, value, selector=None):
        el = (self.d.find_element(self.By.CSS_SELECTOR, f"#{eid} {selector}") if selector
              else self.field(eid))
        el.click()
        el.send_keys(self.Keys.CONTROL, "a")
        el.send_keys(value)
        el.send_keys(self.Keys.ENTER)

    def click(self, eid):
        self.d.find_element(self.By.CSS_SELECTOR, f"#{eid}").click()

    def wait(self, cond, timeout=WAIT):
        end = time.time() + timeout
        while time.time() < end:
            value = cond()
            if value:
                return value
            time.sleep(0.05)
        os.makedirs(SHOTS, exist_ok=True)
        self.d.save_screenshot(os.path.join(SHOTS, "ui_timeout.png"))
        raise AssertionError(f"timed out; status: {self.text('dsvd-status')!r}, numbers: "
                             f"{self.text('dsvd-numbers')!r} (tests/out/ui_timeout.png)")

    def set_value(self, value):
        """Put a value into the slider's number box in one edit (as a paste would: typed key by
        key, gradio 3 answers the first keystroke and drops the rest while it is busy);
        returns the seconds until the numbers change."""
        before = self.text("dsvd-numbers")
        el = self.d.find_element(self.By.CSS_SELECTOR, "#dsvd-value input[type=number]")
        start = time.perf_counter()
        self.d.execute_script(
            "const el = arguments[0];"
            "Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value')"
            ".set.call(el, arguments[1]);"
            "el.dispatchEvent(new Event('input', {bubbles: true}));"
            "el.dispatchEvent(new Event('change', {bubbles: true}));", el, str(value))
        el.send_keys(self.Keys.ENTER)
        self.wait(lambda: self.text("dsvd-numbers") != before, 60)
        return time.perf_counter() - start


def test_explore_and_save(browser, folders, tmp_path):
    page = Page(browser)
    page.wait(lambda: page.d.find_elements(page.By.ID, "dsvd-analyze"), 60)

    # An unreadable file: the error, naming it, is shown in the page.
    page.type("dsvd-base", os.path.basename(folders["base"]))
    page.type("dsvd-tuned", folders["junk"])
    page.click("dsvd-analyze")
    status = page.wait(lambda: page.text("dsvd-status").startswith("Error") and
                       page.text("dsvd-status"))
    assert "junk.safetensors" in status

    page.type("dsvd-tuned", os.path.basename(folders["tuned"]))
    page.click("dsvd-analyze")
    page.wait(lambda: page.text("dsvd-status").startswith("analysed"))
    page.wait(lambda: "MB" in page.text("dsvd-numbers"))

    # Move the slider: the numbers and the table are what `deltasvd compress` reports.
    times = [page.set_value(v) for v in (0.45, 0.35, 0.3)]
    printed = cli_compress(folders["base"], folders["tuned"], tmp_path / "cli.safetensors",
                           "--energy", "0.3")
    groups = page.text("dsvd-groups")
    assert_same_table(groups, printed)
    numbers = page.text("dsvd-numbers")
    size = float(re.search(r"size\s+([\d.]+) MB", numbers).group(1))
    assert size == pytest.approx(total_mb(printed), abs=0.011)
    server_ms = [float(x) for x in re.findall(r"answered in\s+(\d+) ms", numbers)]
    assert server_ms and server_ms[0] <= 200
    print(f"\nslider round trip in the browser: median {statistics.median(times):.3f} s; "
          f"server answered in {server_ms[0]:.0f} ms")
    layers = page.d.find_element(page.By.ID, "dsvd-layers").text
    assert "lora_unet_" in layers and "lora_te_" in layers
    assert page.d.find_elements(page.By.CSS_SELECTOR, "#dsvd-plot svg circle")

    os.makedirs(SHOTS, exist_ok=True)
    page.d.save_screenshot(os.path.join(SHOTS, "ui_explorer.png"))

    # Save: the file is the one `deltasvd compress` writes for this setting.
    page.type("dsvd-name", "deltas/from_ui")
    page.click("dsvd-save")
    status = page.wait(lambda: page.text("dsvd-status").startswith(("saved", "Error")) and
                       page.text("dsvd-status"))
    path = os.path.join(folders["loras"], "deltas", "from_ui.safetensors")
    assert status == f"saved {path}"
    assert path in page.text("dsvd-saved")
    saved, cli = read_delta(path), read_delta(tmp_path / "cli.safetensors")
    assert [r.rank for r in saved.records] == [r.rank for r in cli.records]
    assert saved.tensors.keys() == cli.tensors.keys()
    if os.environ.get("DELTASVD_UI_PYTHON"):
        # another interpreter (its own numpy) rounds the factors differently: compare what
        # they rebuild, to storage precision
        for rec in cli.records:
            a = reconstruct(rec, saved.stored(rec))
            b = reconstruct(rec, cli.stored(rec))
            assert (a - b).norm() <= 1e-2 * b.norm() + 1e-6, rec.name
    else:
        assert all(torch.equal(saved.tensors[k], cli.tensors[k]) for k in cli.tensors)
    page.d.save_screenshot(os.path.join(SHOTS, "ui_saved.png"))


def test_inspect_and_resize(browser, folders):
    """After the Save above: the file is listed, its metadata shown, and it can be cut."""
    page = Page(browser)
    tabs = page.d.find_elements(page.By.XPATH, "//button[contains(., 'Inspect / resize')]")
    next(t for t in tabs if t.is_displayed()).click()   # gradio 6 keeps a hidden copy too
    page.click("dsvd-file-refresh")
    page.type("dsvd-file", os.path.join("deltas", "from_ui.safetensors"))
    page.click("dsvd-inspect")
    info = page.wait(lambda: "energy = 0.3" in page.text("dsvd-info") and page.text("dsvd-info"))
    assert "from_ui.safetensors" in info and "total" in info
    page.type("dsvd-resize-value", "0.2")
    page.type("dsvd-resize-name", "deltas/cut")
    page.click("dsvd-resize")
    text = page.wait(lambda: page.text("dsvd-resized"))
    path = os.path.join(folders["loras"], "deltas", "cut.safetensors")
    assert text.startswith(path), text
    assert read_delta(path).info["resized_from"] == "energy=0.3"
    page.d.save_screenshot(os.path.join(SHOTS, "ui_inspect.png"))


def test_a_dit_family(browser, folders, tmp_path):
    """A Flux.1 pair in the page: Flux's groups and LoRA names, the table and the saved file
    as `deltasvd compress` gives them."""
    page = Page(browser)
    tabs = page.d.find_elements(page.By.XPATH, "//button[@role='tab'][contains(., 'Explore')]")
    next(t for t in tabs if t.is_displayed()).click()
    base, tuned = folders["flux"]
    page.type("dsvd-base", os.path.basename(base))
    page.type("dsvd-tuned", os.path.basename(tuned))
    before = page.text("dsvd-status")
    page.click("dsvd-analyze")
    page.wait(lambda: page.text("dsvd-status") != before and
              page.text("dsvd-status").startswith("analysed"))
    assert "Flux" in page.text("dsvd-status") + page.text("dsvd-numbers")
    page.set_value(0.25)
    printed = cli_compress(base, tuned, tmp_path / "flux.safetensors", "--energy", "0.25")
    groups = page.wait(lambda: "double_blocks" in page.text("dsvd-groups") and
                       page.text("dsvd-groups"))
    assert_same_table(groups, printed)
    layers = page.d.find_element(page.By.ID, "dsvd-layers").text
    assert "lora_unet_double_blocks_0_" in layers and "lora_unet_final_layer_linear" in layers
    page.d.save_screenshot(os.path.join(SHOTS, "ui_flux.png"))
    page.type("dsvd-name", "flux_from_ui")
    page.click("dsvd-save")
    path = os.path.join(folders["loras"], "flux_from_ui.safetensors")
    page.wait(lambda: page.text("dsvd-status") == f"saved {path}")
    saved, cli = read_delta(path), read_delta(tmp_path / "flux.safetensors")
    assert saved.family == "flux"
    assert [r.rank for r in saved.records] == [r.rank for r in cli.records]
    assert saved.tensors.keys() == cli.tensors.keys()
