"""The jobs, as one call each: what the CLI, the ComfyUI nodes and the UI all use."""

import os

from .compress import Compressor, trim_to_size
from .delta_file import file_size, read_delta, write_delta
from .host_metadata import host_metadata
from .ranks import RankRule
from .resize import resize, resize_to_size
from .safetensors_io import check_output_path
from .summary import compress_summary


def output_name(path):
    return os.path.splitext(os.path.basename(os.fspath(path)))[0]


def host_meta_fn(delta, name):
    return lambda data_hash: host_metadata(delta.family, name, data_hash,
                                           f"deltasvd {delta.info.get('mode')}="
                                           f"{delta.info.get('value')}")


def compress_to_delta(base, tuned, rule, dtype="fp16", device="cpu", progress=None,
                      allow_pickle=False, name="delta"):
    """Compress in memory. Returns (delta, counts, tuned_bytes); size mode is fitted exactly."""
    delta, counts, tuned_bytes = Compressor(rule, dtype, device, progress).run(
        base, tuned, allow_pickle)
    delta.info["tuned_bytes"] = tuned_bytes
    fit_size(delta, rule, name)
    return delta, counts, tuned_bytes


def analyse_pair(base, tuned, dtype="fp16", device="cpu", progress=None, allow_pickle=False):
    """Every layer's float64 spectrum, factors kept at rank 1 only (little memory): what the
    threshold explorer re-targets to any setting. Returns (delta, counts, tuned_bytes)."""
    rule = RankRule("rank", 1)
    delta, counts, tuned_bytes = Compressor(rule, dtype, device, progress).run(
        base, tuned, allow_pickle)
    delta.info["tuned_bytes"] = tuned_bytes
    return delta, counts, tuned_bytes


def fit_size(delta, rule, name):
    """Size mode: trim the coded delta until its file, named `name`, fits the budget exactly."""
    if rule.mode == "size_mb":
        trim_to_size(delta, rule.value * 2**20, lambda d: file_size(d, host_meta_fn(d, name)))


def save_delta(delta, path, overwrite=False, inputs=()):
    """Write atomically; returns the file size in bytes."""
    write_delta(path, delta, host_meta_fn(delta, output_name(path)), overwrite=overwrite,
                inputs=inputs)
    return os.path.getsize(path)


def compress_files(base, tuned, out, rule, dtype="fp16", device="cpu", overwrite=False,
                   allow_pickle=False, progress=None):
    """base + tuned checkpoints -> delta file. Returns (delta, summary text)."""
    check_output_path(out, overwrite, (base, tuned))  # fail before minutes of work, not after
    delta, counts, tuned_bytes = compress_to_delta(base, tuned, rule, dtype, device, progress,
                                                   allow_pickle, output_name(out))
    size = save_delta(delta, out, overwrite=overwrite, inputs=(base, tuned))
    return delta, compress_summary(delta, counts, size, tuned_bytes)


def resize_delta(delta, rule, name="delta"):
    if rule.mode == "size_mb":
        return resize_to_size(delta, rule, lambda d: file_size(d, host_meta_fn(d, name)))
    return resize(delta, rule)


def resize_file(src, out, rule, overwrite=False):
    delta = resize_delta(read_delta(src), rule, output_name(out))
    size = save_delta(delta, out, overwrite=overwrite, inputs=(src,))
    return delta, size


def make_rule(mode, value, min_rank=1, max_rank=None):
    return RankRule(mode, value, min_rank, max_rank)
