"""What the UI tests need beyond the core: gradio, and for the browser test Chromium with its
driver and selenium. Missing locally: the test skips; on CI (CI set) it fails, as CI installs
them (.ci/run)."""

import importlib.util
import os
import shutil
import tempfile
from contextlib import contextmanager

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def _missing(what):
    message = f"{what} is not installed (.ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_gradio():
    if importlib.util.find_spec("gradio") is None:
        _missing("gradio")


def require_browser():
    require_gradio()
    if importlib.util.find_spec("selenium") is None:
        _missing("selenium")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.exists(path) or shutil.which(os.path.basename(path))):
            _missing(path)


@contextmanager
def chromium(flags, prefix="dsvd-chromium-"):
    """A headless Chromium under selenium with `flags` and a fresh profile folder, quit and
    the folder removed afterwards (left behind, each run's 20 MB piled up in /tmp); the
    driver is the system's (an explicit path: Selenium Manager never runs, it would download
    one)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    profile = tempfile.mkdtemp(prefix=prefix)
    driver = None
    try:
        opts = webdriver.ChromeOptions()
        for flag in list(flags) + [f"--user-data-dir={profile}"]:
            opts.add_argument(flag)
        opts.binary_location = CHROMIUM
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        yield driver
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
