"""A1111 / Forge: the Delta-SVD threshold explorer as a tab, and its two settings.

Thin glue: the host's checkpoint list and LoRA folder -> deltasvd.ui. Importing this file does
nothing heavy (A1111 imports every extension script at start): the page is built, and
deltasvd / gradio imported, only when A1111 asks for its tabs."""

import os
import sys

from modules import script_callbacks, shared

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = ("deltasvd", "Delta-SVD")
DEFAULT_THRESHOLD = 0.5


def _opt(key, default):
    return getattr(shared.opts, key, default)


def checkpoints():
    """A1111's checkpoint list: title -> file."""
    from modules import sd_models
    return {title: info.filename for title, info in sd_models.checkpoints_list.items()}


def lora_dir():
    """The settings' folder if set, else A1111's LoRA folder (--lora-dir)."""
    folder = _opt("deltasvd_folder", "") or getattr(shared.cmd_opts, "lora_dir", None)
    if not folder:
        from modules import paths
        folder = os.path.join(paths.models_path, "Lora")
    return folder


def on_ui_tabs():
    if ROOT not in sys.path:   # the extension folder holds the deltasvd package
        sys.path.insert(0, ROOT)
    from deltasvd import ui
    from deltasvd.ui_actions import Host
    host = Host(checkpoints, lora_dir,
                float(_opt("deltasvd_default_threshold", DEFAULT_THRESHOLD)))
    return [(ui.build(host), "Delta-SVD", "deltasvd")]


def on_ui_settings():
    shared.opts.add_option("deltasvd_default_threshold", shared.OptionInfo(
        DEFAULT_THRESHOLD, "Delta-SVD: first energy threshold of the explorer's slider",
        section=SECTION))
    shared.opts.add_option("deltasvd_folder", shared.OptionInfo(
        "", "Delta-SVD: folder Save writes into and Inspect lists (empty: the LoRA folder)",
        section=SECTION))


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(on_ui_settings)
