"""What the UI tests need beyond the core: gradio, and for the browser test Chromium with its
driver and selenium. Missing locally: the test skips; on CI (CI set) it fails, as CI installs
them (.ci/run)."""

import importlib.util
import os
import shutil

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
