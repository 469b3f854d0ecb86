"""Access to the real ComfyUI that `.ci/setup_comfyui.sh` installs outside the repo.

ComfyUI is not a package: it expects its folder on sys.path, parses sys.argv at import time
(only when args parsing is enabled) and imports torchvision, for which the setup script leaves
a stand-in under `_stubs/`.
"""

import os
import sys
from pathlib import Path

SETUP_HINT = "run `bash .ci/setup_comfyui.sh` (it installs ComfyUI 0.3.75 outside the repo)"


def comfy_dir():
    """The ComfyUI install dir; raises RuntimeError with a setup hint if it is not there."""
    default = Path.home() / ".cache" / "deltasvd" / "comfyui"
    path = Path(os.environ.get("DELTASVD_COMFYUI_DIR") or default)
    if not (path / ".deltasvd_setup_done").is_file() or not (path / "main.py").is_file():
        raise RuntimeError(f"ComfyUI not found at {path}: {SETUP_HINT}")
    return path


def _paths():
    path = comfy_dir()
    return [str(path / "_stubs"), str(path)]


def import_comfy():
    """Import ComfyUI as a library (CPU only) and return the `comfy` package.

    Afterwards `comfy.sd`, `comfy.utils`, `comfy.supported_models`, `comfy.model_base`,
    `comfy.model_management` and `folder_paths` are importable."""
    for p in reversed(_paths()):
        if p not in sys.path:
            sys.path.insert(0, p)
    if "comfy.options" not in sys.modules:
        # comfy.cli_args runs parser.parse_args() on sys.argv when first imported; '--cpu'
        # keeps model_management off any GPU. It would reject the caller's own arguments
        # (pytest's), so argv holds only '--cpu' while it parses.
        saved = sys.argv
        sys.argv = [saved[0], "--cpu"]
        try:
            import comfy.options
            comfy.options.enable_args_parsing()
            import comfy.cli_args  # noqa: F401  (parses argv now, while it holds only --cpu)
        finally:
            sys.argv = saved
    import comfy
    import comfy.model_base  # noqa: F401
    import comfy.model_management  # noqa: F401
    import comfy.sd  # noqa: F401
    import comfy.supported_models  # noqa: F401
    import comfy.utils  # noqa: F401
    import folder_paths  # noqa: F401
    return comfy


def load_pack(repo):
    """This repository loaded as a custom node pack by ComfyUI's own loader, once per process
    (a second load would make a new package module without its submodule attributes); returns
    the package module, whose `deltasvd` is the pack's own copy of the core."""
    import asyncio

    import nodes as comfy_nodes
    name = str(repo).replace(".", "_x_")
    if name not in sys.modules:
        assert asyncio.run(comfy_nodes.load_custom_node(str(repo)))
    return sys.modules[name]


def server_env(base=None):
    """Environment for `python main.py --cpu --port N` run as a subprocess in comfy_dir()."""
    env = dict(os.environ if base is None else base)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join(_paths() + ([old] if old else []))
    return env


def require_comfy():
    """In a test: ComfyUI's dir; skips when it is missing, but fails on CI (CI installs it)."""
    import pytest
    try:
        return comfy_dir()
    except RuntimeError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))


def gen_arch_spec_module():
    """tools/gen_arch_spec.py as a module; skips (or fails on CI) when ComfyUI is missing."""
    import importlib.util

    require_comfy()
    path = Path(__file__).resolve().parent.parent / "tools" / "gen_arch_spec.py"
    spec = importlib.util.spec_from_file_location("gen_arch_spec", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
