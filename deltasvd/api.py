"""The jobs, as one call each: what the CLI, the ComfyUI nodes and the UI all use."""

import os

from .compress import Codec, Compressor, check_max_error, trim_to_size
from .convert import to_lora
from .delta_file import file_size, is_coded, read_delta, write_delta
from .errors import DeltaError
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
                      allow_pickle=False, name="delta", codec=None, spill_dir=None):
    """Compress. Returns (delta, counts, tuned_bytes); size mode is fitted exactly.
    `codec`: a compress.Codec (default: plain SVD factors); `spill_dir`: where the factors wait
    on disk for the file (default: the temp folder)."""
    delta, counts, tuned_bytes = Compressor(rule, dtype, device, progress, codec,
                                            spill_dir).run(base, tuned, allow_pickle)
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
    """Size mode: trim the coded delta until its file, named `name`, fits the budget exactly.
    Max-error mode: check the written factors meet the target."""
    if rule is not None and rule.mode == "size_mb":
        trim_to_size(delta, rule.value * 2**20, lambda d: file_size(d, host_meta_fn(d, name)),
                     rule.objective)
    check_max_error(delta, rule)


def save_delta(delta, path, overwrite=False, inputs=()):
    """Write atomically; returns the file size in bytes."""
    write_delta(path, delta, host_meta_fn(delta, output_name(path)), overwrite=overwrite,
                inputs=inputs)
    return os.path.getsize(path)


def compress_files(base, tuned, out, rule, dtype="fp16", device="cpu", overwrite=False,
                   allow_pickle=False, progress=None, codec=None):
    """base + tuned checkpoints -> delta file. Returns (delta, summary text)."""
    out = check_output_path(out, overwrite, (base, tuned))  # fail before the work, not after
    # The factors wait beside the output: where the file will need the room anyway.
    delta, counts, tuned_bytes = compress_to_delta(base, tuned, rule, dtype, device, progress,
                                                   allow_pickle, output_name(out), codec,
                                                   spill_dir=os.path.dirname(out))
    size = save_delta(delta, out, overwrite=overwrite, inputs=(base, tuned))
    return delta, compress_summary(delta, counts, size, tuned_bytes)


def resize_delta(delta, rule, name="delta", where=None):
    if is_coded(delta):
        raise DeltaError(f"resize cuts LoRA-format (svd) deltas; this one is coded "
                         f"({delta.info.get('codec')}): compress again, or `deltasvd convert` "
                         "it to a LoRA-format file first", where or delta.info.get("file"))
    if rule.mode == "size_mb":
        return resize_to_size(delta, rule, lambda d: file_size(d, host_meta_fn(d, name)))
    return resize(delta, rule)


def resize_file(src, out, rule, overwrite=False, verify=True):
    delta = resize_delta(read_delta(src, verify), rule, output_name(out), where=src)
    return delta, _saved_as(delta, out, src, overwrite)


def convert_file(src, out, rule, dtype="fp16", device="cpu", overwrite=False, progress=None,
                 verify=True):
    """A qsvd / dct delta file -> a LoRA-format delta file (decode, then factor again)."""
    check_output_path(out, overwrite, (src,))
    delta = to_lora(read_delta(src, verify), rule, dtype, device, progress, where=src)
    return delta, _saved_as(delta, out, src, overwrite)


def _saved_as(delta, out, src, overwrite):
    """Write a delta made from the file `src`; afterwards (the metadata is written without
    it) it is named as its new file, for reports. Returns the size."""
    size = save_delta(delta, out, overwrite=overwrite, inputs=(src,))
    delta.info["file"] = os.path.basename(out)
    return size


def make_codec(name="svd", bits=None, factor_bits=None):
    return Codec(name, bits, factor_bits)


def make_rule(mode, value, min_rank=1, max_rank=None):
    return RankRule(mode, value, min_rank, max_rank)
