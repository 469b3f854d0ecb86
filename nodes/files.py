"""DeltaSVDSave and DeltaSVDLoad: delta files in the `loras` folder, where LoraLoader finds them."""

import os

import folder_paths

from ..deltasvd import families
from ..deltasvd.api import save_delta
from ..deltasvd.delta_file import read_delta
from ..deltasvd.errors import DeltaError
from ..deltasvd.summary import inspect_text
from .common import CATEGORY, DELTA, stats, ui

EXT = ".safetensors"


def loras_root():
    return os.path.abspath(folder_paths.get_folder_paths("loras")[0])


def filename_problem(filename):
    """None if `filename` is a safe relative name inside the loras folder, else why not."""
    name = (filename or "").strip()
    if not name:
        return "filename is empty"
    if "\0" in name:
        return "filename contains a NUL character"
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or os.path.isabs(name) or (len(name) > 1 and name[1] == ":"):
        return f"filename {filename!r} is absolute; give a name relative to the loras folder"
    if ".." in parts:
        return f"filename {filename!r} contains '..'; it must stay inside the loras folder"
    if any(p == "" for p in parts[:-1]) or parts[-1] in ("", "."):
        return f"filename {filename!r} is not a file name"
    return None


def resolve(filename):
    """Absolute path of `filename` (+ .safetensors) in the first loras folder; refuses escapes."""
    problem = filename_problem(filename)
    if problem:
        raise DeltaError(problem)
    name = filename.strip().replace("\\", "/")
    if not name.lower().endswith(EXT):
        name += EXT
    root = loras_root()
    path = os.path.abspath(os.path.join(root, *name.split("/")))
    if os.path.commonpath([root, path]) != root or path == root:
        raise DeltaError(f"filename {filename!r} leaves the loras folder")
    return root, path, name


def exists_problem(filename):
    """Why `filename` cannot be saved without overwrite (it exists), or None."""
    try:
        _, path, name = resolve(filename)
    except DeltaError as e:
        return str(e)
    if os.path.lexists(path):
        return f"loras/{name} exists; choose another filename or enable overwrite"
    return None


def _forget_lora_list():
    """Make the next get_filename_list('loras') (LoraLoader's list) rescan the folder."""
    cache = getattr(folder_paths, "filename_list_cache", None)
    if isinstance(cache, dict):
        cache.pop("loras", None)


class DeltaSVDSave:
    DESCRIPTION = (
        "Save a delta as a LoRA-format .safetensors into the first `loras` folder (default "
        "under loras/deltas/), so the stock LoraLoader lists it at once. The file is written "
        "to a temporary name and renamed: a failure or Cancel leaves no file.")
    CATEGORY = CATEGORY
    FUNCTION = "save"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "delta": (DELTA, {"tooltip": "The delta to save."}),
                "filename": ("STRING", {"default": "deltas/delta", "tooltip":
                                        "Name relative to the loras folder ('.safetensors' is "
                                        "added). Folders are created; names that leave the "
                                        "loras folder ('..', absolute paths) are refused."}),
            },
            "optional": {
                "overwrite": ("BOOLEAN", {"default": False, "tooltip":
                                          "Replace an existing file of that name. Off, an "
                                          "existing file is refused when the graph is queued, "
                                          "before anything runs."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, filename=None, overwrite=None):
        """ComfyUI calls this before the graph runs, so a bad name or an existing file is
        refused before a compress of minutes, not after it. None: the input is linked (or
        left out of an API prompt); the node checks it when it runs."""
        if filename is None:
            return True
        problem = filename_problem(filename)
        if problem is None and overwrite is False:
            problem = exists_problem(filename)
        return problem or True

    def save(self, delta, filename, overwrite=False):
        _, path, name = resolve(filename)
        if not overwrite:
            problem = exists_problem(filename)
            if problem:   # created since the graph was queued, or an API prompt without overwrite
                raise DeltaError(problem)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        size = save_delta(delta, path, overwrite=overwrite)
        _forget_lora_list()
        text = f"saved loras/{name} ({size / 2**20:.2f} MiB)"
        # the frontend extension refreshes the nodes' file lists when it sees `file`
        return {"ui": ui(text, {"file": name})}


class DeltaSVDLoad:
    DESCRIPTION = (
        "Load a delta file from the `loras` folder. Only files made by deltasvd load (their "
        "metadata holds what Apply, Resize and Spectrum need); a plain LoRA is applied with "
        "LoraLoader.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (DELTA, "STRING")
    RETURN_NAMES = ("delta", "info")
    OUTPUT_TOOLTIPS = ("The delta, in memory.",
                       "What the file holds: family, rule, fingerprints and per-group ranks.")

    @classmethod
    def INPUT_TYPES(cls):
        names = [n for n in folder_paths.get_filename_list("loras")
                 if n.lower().endswith(EXT)]
        return {"required": {"delta_name": (names, {"tooltip": "A delta file in the loras "
                                                   "folder (made by Delta-SVD Save or the "
                                                   "deltasvd command line)."})}}

    @classmethod
    def IS_CHANGED(cls, delta_name):
        path = folder_paths.get_full_path("loras", delta_name)
        if not path or not os.path.exists(path):
            return delta_name
        st = os.stat(path)
        return f"{delta_name}:{st.st_mtime_ns}:{st.st_size}"

    def load(self, delta_name):
        path = folder_paths.get_full_path_or_raise("loras", delta_name)
        delta = read_delta(path)
        if delta.family not in families.BY_NAME:
            raise DeltaError(f"unknown model family {delta.family!r} (this deltasvd knows "
                             f"{', '.join(families.BY_NAME)}; update deltasvd)", path)
        size = os.path.getsize(path)
        text = inspect_text(delta, size)
        return {"ui": ui(text, stats(delta, size)), "result": (delta, text)}
