"""scripts/deltasvd_tab.py and install.py against A1111's documented interface.

A1111 cannot be installed here, so tests/fake_a1111 stands in for it with only the calls the
extension makes (script_callbacks.on_ui_tabs / on_ui_settings, shared.opts / OptionInfo /
cmd_opts.lora_dir, sd_models.checkpoints_list, launch.is_installed / run_pip), with A1111
1.10's names and signatures."""

import os
import subprocess
import sys

from ui_env import require_gradio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE = os.path.join(ROOT, "tests", "fake_a1111")


def _run(code):
    """Run `code` in a fresh interpreter with the fake A1111 first on sys.path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([FAKE, ROOT]))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


SCRIPT = os.path.join(ROOT, "scripts", "deltasvd_tab.py")
LOAD = ("import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('tab', {SCRIPT!r})\n"
        "tab = importlib.util.module_from_spec(spec); spec.loader.exec_module(tab)\n")


def test_importing_the_script_is_light():
    """A1111 imports every script at start: this one must not pull gradio, torch or deltasvd."""
    r = _run(LOAD + "print(sorted(m for m in ('gradio', 'torch', 'deltasvd') "
                    "if m in sys.modules))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_tab_settings_checkpoints_and_lora_folder(tmp_path):
    require_gradio()
    code = LOAD + f"""
from modules import script_callbacks, shared, sd_models
info = sd_models.CheckpointInfo('/m/base.safetensors', 'base')
sd_models.checkpoints_list['base.safetensors [abc]'] = info
shared.cmd_opts.lora_dir = {str(tmp_path)!r}
script_callbacks.ui_settings_callback()
print(shared.opts.deltasvd_default_threshold, repr(shared.opts.deltasvd_folder))
print(shared.opts.data_labels['deltasvd_folder'].section)
print(tab.checkpoints())
print(tab.lora_dir())
shared.opts.data['deltasvd_folder'] = '/elsewhere'
print(tab.lora_dir())
shared.opts.data['deltasvd_default_threshold'] = 0.25
tabs = script_callbacks.ui_tabs_callback()
import gradio
blocks, title, elem_id = tabs[0]
print(type(blocks).__name__, title, elem_id, len(tabs))
values = [b.value for b in blocks.blocks.values() if getattr(b, 'elem_id', None) == 'dsvd-value']
print(values)
print([b.value for b in blocks.blocks.values()
       if getattr(b, 'elem_id', None) in ('dsvd-base', 'dsvd-tuned')])
"""
    r = _run(code)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "0.5 ''"
    assert lines[1] == "('deltasvd', 'Delta-SVD')"
    assert lines[2] == "{'base.safetensors [abc]': '/m/base.safetensors'}"
    assert lines[3] == str(tmp_path)
    assert lines[4] == "/elsewhere"
    assert lines[5] == "Blocks Delta-SVD deltasvd 1"
    assert lines[6] == "[0.25]"   # the setting seeds the slider
    assert lines[7] == "[None, None]"   # both pickers start empty, not on the same file


def test_install_only_what_is_missing():
    code = """
import sys, types, importlib.util
import launch
launch.installed.update({'numpy'})
real = importlib.util.find_spec
importlib.util.find_spec = lambda m: None if m in ('tqdm', 'numpy') else real(m)
exec(open('install.py').read())
print(launch.pip_calls)
"""
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['install tqdm']"
