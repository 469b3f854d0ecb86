"""A file of a codec stock loaders cannot read (qsvd, dct) -> a LoRA-format ("svd") delta:
decode each coded record (delta_file.decode_parts, the one decoder), then factor it again under
a rank rule exactly as `compress` factors a checkpoint delta (compress.code_matrix). Records that
are already LoRA parts (1-D deltas, dense fallbacks, zero fills) are kept as they are."""

from dataclasses import replace

import torch

from .blas_threads import blas_threads
from .compress import Piece, _fmt, code_matrix, storage_dtype
from .delta_file import CODED_PARTS, Delta, reconstruct, store_parts
from .errors import DeltaError
from .lapack import LapackError


def to_lora(delta, rule, dtype="fp16", device="cpu", progress=None, where=None):
    """A new "svd" Delta from `delta`. Each re-factored record's err2 is the coded file's error
    plus the re-factoring's (exact when the two residuals are orthogonal, else an estimate); its
    norm2 stays the original delta's. `where` names the file in errors."""
    where = where or delta.info.get("file")
    if not rule.per_layer:
        raise DeltaError("convert takes a per-layer rule (--energy, --fro, --rank); for a file "
                         "size, convert, then `deltasvd resize --size-mb`", where)
    if not any(r.kind in CODED_PARTS for r in delta.records):
        raise DeltaError(f"this is already a LoRA-format delta (codec "
                         f"{delta.info.get('codec')!r}); use resize to make it smaller",
                         where)
    # One BLAS thread, as compress gives each worker: OpenBLAS's threads spin-waiting on a
    # shared 2-core machine made convert take 6x the CPU time of compressing the same layers.
    with blas_threads(1):
        return _refactored(delta, rule, storage_dtype(dtype), dtype, device, progress, where)


def _refactored(delta, rule, dt, dtype, device, progress, where):
    records, tensors, extras, spectra = [], {}, {}, {}
    for i, rec in enumerate(delta.records):
        parts = delta.stored(rec)
        if rec.kind in CODED_PARTS:
            data = reconstruct(rec, parts)
            if not bool(torch.isfinite(data).all()):
                raise DeltaError("decodes to NaN or Inf (a damaged file?)", where, rec.name)
            new = replace(rec, kind="svd", patch=0, rank=0)
            try:
                parts, s = code_matrix(Piece(new, data), rule, dt, device)
            except LapackError as e:
                raise DeltaError(f"cannot be factored ({e})", where, rec.name) from None
            except DeltaError as e:        # code_matrix's refusals name the key, not the file
                if e.path is not None:
                    raise
                raise DeltaError(e.message, where, rec.name) from None
            new.err2 += rec.err2
            new.norm2 = rec.norm2
            if s is not None:
                spectra[len(records)] = (s, s)
        else:
            new = replace(rec)
            if i in delta.spectra:
                spectra[len(records)] = delta.spectra[i]
        records.append(new)
        store_parts(new, parts, tensors, extras)
        if progress:
            progress("convert", i + 1, len(delta.records), rec.key)
    info = dict(delta.info)
    for key in ("bits", "patch", "factor_bits", "file"):
        info.pop(key, None)
    info.update({"codec": "svd", "mode": rule.mode, "value": _fmt(rule.value),
                 "min_rank": rule.min_rank, "max_rank": rule.max_rank or "", "dtype": dtype,
                 "converted_from": f"{delta.info.get('codec')} {delta.info.get('mode')}="
                                   f"{delta.info.get('value')}"})
    return Delta(family=delta.family, records=records, tensors=tensors, extras=extras,
                 spectra=spectra, info=info)
