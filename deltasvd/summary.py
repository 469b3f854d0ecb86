"""Human-readable reports: the compress summary and `inspect`."""

from .checkpoint import FAMILIES
from .delta_file import tensor_names
from .groups import format_table, group_rows


def record_bytes(delta, rec):
    src = delta.extras if rec.extra else delta.tensors
    return sum(src[n].numel() * src[n].element_size() for n in tensor_names(rec).values()
               if n in src)


def group_table(delta, file_bytes=None, reference_bytes=None):
    rows = group_rows(delta.records, lambda rec: record_bytes(delta, rec))
    return format_table(rows, file_bytes, reference_bytes)


def compress_summary(delta, counts, file_bytes, tuned_bytes):
    lines = [group_table(delta, file_bytes, tuned_bytes), ""]
    lines.append(f"tensors: {counts.changed} changed, {counts.identical} identical (skipped), "
                 f"{counts.ignored_ema} EMA and {counts.ignored_nonfloat} non-float ignored")
    if counts.rounded:
        lines.append(f"dtype-aware delta: the base was rounded to the tuned file's precision "
                     f"for {counts.rounded} tensors before subtracting (storage rounding is "
                     "not fine-tuning)")
    if counts.only_in_base:
        lines.append(f"{len(counts.only_in_base)} tensors only in the base (e.g. "
                     f"{counts.only_in_base[0]}): treated as unchanged")
    p = counts.precision
    if p["gram64"] or p["svd64"]:
        lines.append(f"precision: {p['gram64']} layers needed a float64 Gram and {p['svd64']} a "
                     "float64 SVD to decide their rank exactly (float32 left it undecided)")
    extras = [r for r in delta.records if r.extra]
    if extras:
        lines.append(f"{len(extras)} changed tensors have no LoRA name both hosts load (e.g. "
                     f"{extras[0].key}): kept in the file's extras, applied by deltasvd only")
    return "\n".join(lines)


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


def inspect_text(delta, file_bytes):
    info = delta.info
    svd = [r for r in delta.records if r.kind == "svd" and r.n]
    params = sum(t.numel() for t in delta.tensors.values())
    lines = [
        f"file      {info.get('file')}  ({file_bytes / 2**20:.2f} MB, {params:,} stored values)",
        f"family    {FAMILIES.get(delta.family, delta.family)}",
        f"codec     {_codec_line(info)}",
        f"base      {info.get('base_name')}  sha256 {info.get('base_sha256', '')[:16]}…",
        f"tuned     {info.get('tuned_name')}  sha256 {info.get('tuned_sha256', '')[:16]}…",
        f"layers    {len(svd)} factored, {sum(r.kind == 'dense' for r in delta.records)} dense, "
        f"{sum(r.kind == 'exact' for r in delta.records)} exact 1-D, "
        f"{sum(r.extra for r in delta.records)} in extras",
    ]
    if "resized_from" in info:
        lines.append(f"resized   from {info['resized_from']}")
    tuned_bytes = int(info.get("tuned_bytes") or 0) or None
    return "\n".join(lines) + "\n\n" + group_table(delta, file_bytes, tuned_bytes)
