"""What the explorer page's buttons do, without gradio (ui.py wires these to the page).

Every action returns plain values (text, rows, paths) and raises DeltaError with a message
naming the file (and tensor) on bad input; the page shows that message."""

import os
import shutil
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from .api import compress_files, resize_file
from .delta_file import read_delta
from .errors import DeltaError
from .explorer import Explorer
from .safetensors_io import OVERWRITE_HINT as CLI_OVERWRITE_HINT
from .safetensors_io import check_output_path
from .summary import inspect_text

@dataclass
class Host:
    """What the page needs from where it runs (A1111 / Forge: scripts/; alone: `standalone`)."""
    checkpoints: Callable[[], dict]     # label -> checkpoint path
    lora_dir: Callable[[], str]         # where Save writes and Inspect lists
    default_threshold: float = 0.5


def standalone(models, loras, threshold=0.5):
    """`deltasvd ui`: checkpoints from a models folder, deltas into a LoRA folder."""
    return Host(lambda: list_files(models), lambda: loras, threshold)


MODEL_EXTS = (".safetensors", ".ckpt", ".pt")
_CACHE = OrderedDict()   # (files' identity, dtype) -> Explorer; the last few analyses
CACHE_SIZE = 2


def list_files(folder, exts=MODEL_EXTS):
    """{label (path relative to the folder): absolute path} of model files, sorted."""
    out = {}
    if not folder or not os.path.isdir(folder):
        return out
    for root, _, files in os.walk(folder):
        for f in files:
            if f.lower().endswith(exts) and not f.startswith("."):
                path = os.path.join(root, f)
                out[os.path.relpath(path, folder)] = path
    return dict(sorted(out.items()))


def resolve(choice, choices, empty, missing):
    """A dropdown choice (a label of `choices`, or a typed path) -> an existing file; the
    errors say `empty` (nothing chosen) or `missing` (no such file)."""
    if not choice:
        raise DeltaError(empty)
    path = choices.get(choice, choice)
    if not os.path.isfile(path):
        raise DeltaError(missing, path)
    return path


def _identity(path):
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


def analyse(base, tuned, dtype, progress=None):
    """The Explorer of a pair: computed once, then served from the cache (same files, same
    dtype); a changed file (size or mtime) is analysed again."""
    key = (_identity(base), _identity(tuned), dtype)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    explorer = Explorer.from_files(base, tuned, dtype, progress=progress)
    _CACHE[key] = explorer
    while len(_CACHE) > CACHE_SIZE:  # an analysis holds every spectrum: keep only a few
        _CACHE.popitem(last=False)
    return explorer


def numbers(explorer, preview):
    """The headline numbers of a preview, one per line, each saying what it is (the page shows
    them as is, under NUMBERS_LABEL). Two kept energies: the energy rule's (sum of s) and the
    Frobenius one (sum of s^2, what the plot's green curve shows)."""
    ratio = (f"{explorer.tuned_bytes / preview.file_bytes:.1f}x  against the tuned file"
             if explorer.tuned_bytes else "-")
    werr = ("-  (a file from before base norms were kept)" if preview.weight_error is None
            else f"{preview.weight_error:.4f}  what tracked the pictures; --max-error's measure")
    return (f"size                  {preview.file_bytes / 2**20:.2f} MiB\n"
            f"weight-rel. error     {werr}\n"
            f"compression           {ratio}\n"
            f"stored values         {preview.params:,}\n"
            f"est. rel. error       {preview.rel_error:.4f}  truncation only\n"
            f"kept energy, sum s    {preview.kept:.4f}  the energy rule's\n"
            f"kept Frobenius, s^2   {preview.kept_fro:.4f}  the plot's green curve\n"
            f"answered in           {preview.seconds * 1000:.0f} ms")


NUMBERS_LABEL = ("this setting (kept energy, sum s: sum(s[:t]) / sum(s), the paper's rule; "
                 "kept Frobenius, s^2: sum(s[:t]^2) / sum(s^2) = 1 - rel. error^2)")


OVERWRITE_HINT = "tick \"overwrite\" to replace it, or give another name"


def output_path(folder, name, overwrite=False, inputs=()):
    """`<folder>/<name>.safetensors`; refuses names that leave the folder, an input, and an
    existing file unless `overwrite` (the page's checkbox, not the CLI's --overwrite)."""
    name = (name or "").strip()
    if not name:
        raise DeltaError("give the delta a name")
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        raise DeltaError("the name must stay inside the LoRA folder", name)
    if not folder or not os.path.isdir(folder):
        raise DeltaError("LoRA folder does not exist", folder)
    path = os.path.join(folder, name + ".safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    check_output_path(path, True, inputs)   # an input, a folder, a device: refused anyway
    if os.path.exists(path) and not overwrite:
        raise DeltaError(f"a file of this name exists already: {OVERWRITE_HINT}", path)
    return path


@contextmanager
def page_words():
    """The core's refusals say what the CLI offers (`--overwrite`); on the page it is the
    checkbox (a file that appeared while the job ran is refused with that hint)."""
    try:
        yield
    except DeltaError as e:
        if CLI_OVERWRITE_HINT not in e.message:
            raise
        raise DeltaError(e.message.replace(CLI_OVERWRITE_HINT, OVERWRITE_HINT),
                         e.path, e.tensor) from None


def check_space(path, need_bytes):
    """Refuse before writing when the folder cannot hold the file (a full disk would fail
    halfway; the atomic write leaves nothing, but minutes are lost)."""
    free = shutil.disk_usage(os.path.dirname(path)).free
    if free < need_bytes * 1.1 + (1 << 20):
        raise DeltaError(f"not enough space: {free / 2**20:.1f} MiB free, the delta needs about "
                         f"{need_bytes / 2**20:.1f} MiB", os.path.dirname(path))


def save(base, tuned, preview, folder, name, dtype, progress=None, overwrite=False):
    """Compress the pair at the preview's setting into the LoRA folder (what `deltasvd
    compress` writes). Returns (path, summary text)."""
    out = output_path(folder, name, overwrite, (base, tuned))
    check_space(out, preview.file_bytes)
    try:
        with page_words():
            delta, summary = compress_files(base, tuned, out, preview.rule, dtype,
                                            overwrite=overwrite, progress=progress)
    except OSError as e:  # e.g. the disk filled up meanwhile: the partial file is gone
        raise DeltaError(f"could not write the delta ({e.strerror or e})", out) from None
    return out, summary


def inspect(path):
    """(metadata and group table text, per-layer rows) of an existing delta file."""
    delta = read_delta(path)
    return (inspect_text(delta, os.path.getsize(path)),
            Explorer(delta).layer_rows(delta))


def resize(src, folder, name, mode, value, overwrite=False):
    """Cut an existing delta to a smaller setting, beside it. Returns (path, text)."""
    from .ranks import RankRule
    out = output_path(folder, name, overwrite, (src,))
    with page_words():
        delta, size = resize_file(src, out, RankRule(mode, float(value)), overwrite)
    return out, inspect_text(delta, size)
