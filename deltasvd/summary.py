"""Human-readable reports: the compress summary and `inspect`."""

import numpy as np

from . import families
from .delta_file import FACTORED_KINDS, head_only_layers, is_coded, tensor_names
from .groups import format_table, group_rows
from .measures import has_base_norms, weighted_error


def record_bytes(delta, rec):
    src = delta.extras if rec.extra else delta.tensors
    return sum(src[n].numel() * src[n].element_size() for n in tensor_names(rec).values()
               if n in src)


def delta_params(delta):
    """Parameters the delta describes: the values of every changed tensor (zero-valued fills
    added for hosts do not count)."""
    return sum(int(np.prod(r.shape)) for r in delta.records if r.norm2 > 0)


def bits_per_param(delta, file_bytes):
    """Every stored bit (header, scales, side data included) over the changed parameters."""
    n = delta_params(delta)
    return 8.0 * file_bytes / n if n else 0.0


def _bits_line(delta, file_bytes):
    return (f"{bits_per_param(delta, file_bytes):.3f} bits per parameter (the whole file over "
            f"{delta_params(delta):,} changed values)")


def ratio_reference(delta):
    """What the delta's `tuned_bytes` measured: the tuned checkpoint file when the delta was
    made from files (only then is it fingerprinted), else the weights as a host held them in
    memory (ComfyUI's Compress (models)), which can be larger than the file (an fp32 text
    encoder) or smaller (no VAE)."""
    return "the tuned file" if delta.info.get("tuned_sha256") else "the weights in memory"


def group_table(delta, file_bytes=None, reference_bytes=None):
    rows = group_rows(delta.records, lambda rec: record_bytes(delta, rec), delta.family)
    return format_table(rows, file_bytes, reference_bytes, ratio_reference(delta))


def error_line(delta):
    """The weight-relative error (measures.py), the measure that tracked the pictures; None for
    files that do not record their base norms."""
    if not has_base_norms(delta.records):
        return None
    return (f"weight-relative error {weighted_error(delta.records):.4f} (each layer's lost change "
            "against its own weights; what --max-error targets)")


def compress_summary(delta, counts, file_bytes, tuned_bytes):
    lines = [group_table(delta, file_bytes, tuned_bytes), _bits_line(delta, file_bytes)]
    lines += [line for line in (error_line(delta), "") if line is not None]
    lines.append(f"tensors: {counts.changed} changed, {counts.identical} identical (skipped), "
                 f"{counts.ignored_ema} EMA and {counts.ignored_nonfloat} non-float ignored")
    lines.append(f"pieces:  {pieces_line(delta.records)}")
    if is_coded(delta):
        lines.append(NOT_A_LORA)
    if counts.rounded:
        lines.append(f"dtype-aware delta: the base was rounded to the tuned file's precision "
                     f"for {counts.rounded} tensors before subtracting (storage rounding is "
                     "not fine-tuning)" + _rounding_share(counts))
    if counts.base_coarser:
        lines.append(f"warning: the base stores {counts.base_coarser} tensors in less precision "
                     "than the fine-tune, so the base's own rounding error is inside the delta "
                     "(were base and tuned given the other way round?)")
    if counts.scale_orphans:
        where, key = counts.scale_orphans[0]
        lines.append(f"warning: {len(counts.scale_orphans)} scale tensors that no scaled-fp8 "
                     f"marker or comfy_quant config names (e.g. {key} in {where}): ComfyUI "
                     "ignores them, so their weights were read as stored, unscaled, as ComfyUI "
                     "loads them")
    if counts.only_in_base:
        lines.append(f"{len(counts.only_in_base)} tensors only in the base (e.g. "
                     f"{counts.only_in_base[0]}): treated as unchanged")
    if counts.only_in_tuned:
        lines.append(f"{len(counts.only_in_tuned)} tensors of model parts only the tuned file "
                     f"has (e.g. {counts.only_in_tuned[0]}): treated as unchanged")
    if counts.svd64:
        lines.append(f"precision: {counts.svd64} layers needed a float64 SVD to decide their "
                     "rank exactly (the float64 Gram left it open)")
    extras = [r for r in delta.records if r.extra]
    if extras:
        lines.append(f"{len(extras)} changed tensors have no LoRA name both hosts load (e.g. "
                     f"{extras[0].key}): kept in the file's extras, applied by deltasvd only")
    return "\n".join(lines)


def _family_line(name):
    fam = families.BY_NAME.get(name)
    if fam is None:
        return f"{name} (unknown to this deltasvd: update it)"
    return f"{fam.title}  (Civitai base model: {fam.civitai})"


def _rounding_share(counts):
    """What rounding the base did to the difference of the rounded tensors (-100%: all of it
    was storage rounding; about 0%: the fine-tune's own changes dominate)."""
    if counts.rounding_raw2 <= 0:
        return ""
    raw, kept = counts.rounding_raw2 ** 0.5, counts.rounding_kept2 ** 0.5
    return (f"; their difference's Frobenius norm went from {raw:.4g} to {kept:.4g} "
            f"({100 * (kept / raw - 1):+.1f}%)")


def _codec_line(info):
    codec = info.get("codec")
    if codec == "dct":
        return (f"dct  {info.get('bits')} bits per parameter (budget), {info.get('patch')}x"
                f"{info.get('patch')} patches  (not LoRA-loadable: deltasvd apply / convert)")
    line = f"{codec}  mode {info.get('mode')} = {info.get('value')}  factors "
    if codec == "qsvd":
        return line + (f"int{info.get('factor_bits')} (fewer bits for the tail; not "
                       "LoRA-loadable: deltasvd apply / convert)")
    return line + str(info.get("dtype"))


NOT_A_LORA = ("note: this file is not a LoRA; LoRA loaders ignore it. Use it with `deltasvd "
              "apply`, the Delta-SVD Apply node, or make a LoRA-format copy with `deltasvd "
              "convert`")


def pieces_line(records):
    """The stored pieces (records; PIECES in the README), by kind, adding up to their total."""
    kinds = [("factored", lambda r: r.kind in FACTORED_KINDS and r.n),
             ("zero fills", lambda r: r.kind == "svd" and not r.n),
             ("DCT-coded", lambda r: r.kind == "dct"),
             ("dense", lambda r: r.kind == "dense"),
             ("exact 1-D", lambda r: r.kind == "exact")]
    parts = [f"{sum(bool(test(r)) for r in records)} {name}" for name, test in kinds
             if name in ("factored", "dense", "exact 1-D") or any(map(test, records))]
    extras = sum(r.extra for r in records)
    return (f"{len(records)} stored: " + ", ".join(parts)
            + (f" ({extras} of them in the extras)" if extras else ""))


def inspect_text(delta, file_bytes):
    info = delta.info
    params = sum(t.numel() for t in delta.tensors.values())
    lines = [
        f"file      {info.get('file')}  ({file_bytes / 2**20:.2f} MiB, {params:,} stored values)",
        f"family    {_family_line(delta.family)}",
        f"codec     {_codec_line(info)}",
        f"base      {info.get('base_name')}  sha256 {info.get('base_sha256', '')[:16]}…",
        f"tuned     {info.get('tuned_name')}  sha256 {info.get('tuned_sha256', '')[:16]}…",
        f"pieces    {pieces_line(delta.records)}",
    ]
    lines.append(f"size      {_bits_line(delta, file_bytes)}")
    if error_line(delta):
        lines.append(f"error     {error_line(delta)}")
    if "resized_from" in info:
        lines.append(f"resized   from {info['resized_from']}")
    head_only = head_only_layers(delta)
    if head_only:
        lines.append(f"spectra   {head_only} layers keep only their first singular "
                     "values (compress --rank's randomized SVD): they resize by rank, --fro or "
                     "size, not by energy")
    tuned_bytes = int(info.get("tuned_bytes") or 0) or None
    return "\n".join(lines) + "\n\n" + group_table(delta, file_bytes, tuned_bytes)
