"""What a delta file read from disk must satisfy before anything uses it.

A delta is a file from the internet: its records (the JSON in its header) and its tensors can
say anything. Each record is checked against its own tensors (shapes, rank, alpha), its
spectrum against what singular values are (finite, non-negative, non-increasing), and every
float tensor for NaN / Inf, so that `apply`, `resize` and the hosts never meet a lie. Every
failure is a DeltaError naming the file and the tensor (or module).
"""

import math

import numpy as np
import torch

from . import dct_codec, quant
from .errors import DeltaError

KINDS = ("svd", "dense", "exact", "qsvd", "dct")
_FIELD_TYPES = {"name": str, "key": str, "kind": str, "param": str, "norm": bool, "extra": bool,
                "rank": int, "n": int, "patch": int, "precision": str}
_FLOAT_FIELDS = ("sum_s", "sum_s2", "err2", "norm2")


def check_records(records, path):
    """The records' own fields (types, ranges), before anything is computed from them."""
    for rec in records:
        _check_fields(rec, path)


def check_finite(tensors, path, label=lambda name: name):
    """Every float tensor free of NaN and Inf; `label(name)` is its name as the file has it."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t.float()).all()):
            raise DeltaError("corrupt delta: the tensor holds NaN or Inf", path, label(name))


def check_parts(delta, path, tensor_names, coded_parts):
    """Every record's tensors present and of the shapes (rank, alpha) it records.
    `tensor_names(rec)` and `coded_parts` are delta_file's."""
    for rec in delta.records:
        names = tensor_names(rec)
        src = delta.extras if rec.extra else delta.tensors
        for name in names.values():
            if name not in src:
                raise DeltaError("corrupt delta: a recorded tensor is missing", path, name)
        parts = {part: src[name] for part, name in names.items()}
        if rec.kind in coded_parts:
            _check_coded(rec, parts, path)
        else:
            _check_parts(rec, parts, names, path)


def check_spectra(delta, path):
    for i, rec in enumerate(delta.records):
        _check_spectrum(rec, delta.spectra.get(i), path)


def _check_fields(rec, path):
    for name, kind in _FIELD_TYPES.items():
        value = getattr(rec, name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DeltaError(f"corrupt delta record: {name} is {value!r}", path, _label(rec))
    for name in _FLOAT_FIELDS + ("base2",) * (rec.base2 is not None):  # base2: None in old files
        value = getattr(rec, name)
        if (not isinstance(value, (int, float)) or isinstance(value, bool)
                or not math.isfinite(value) or value < 0):
            raise DeltaError(f"corrupt delta record: {name} is {value!r}", path, _label(rec))
    if rec.kind not in KINDS:
        raise DeltaError(f"corrupt delta record: unknown kind {rec.kind!r}", path, _label(rec))
    if (not isinstance(rec.shape, list) or (not rec.shape and rec.kind != "exact")
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                       for d in rec.shape)):
        raise DeltaError(f"corrupt delta record: shape {rec.shape!r}", path, _label(rec))
    if rec.rows is not None:
        ok = (isinstance(rec.rows, list) and len(rec.rows) == 2
              and all(isinstance(r, int) and not isinstance(r, bool) for r in rec.rows)
              and 0 <= rec.rows[0] < rec.rows[1] and rec.rows[1] - rec.rows[0] == rec.shape[0])
        if not ok:
            raise DeltaError(f"corrupt delta record: rows {rec.rows!r} for shape {rec.shape}",
                             path, _label(rec))
    if rec.rank < 0 or rec.n < 0 or rec.patch < 0:
        raise DeltaError("corrupt delta record: a negative count", path, _label(rec))
    if rec.n and (not rec.shape or rec.n != min(rec.matrix_shape)):
        raise DeltaError(f"corrupt delta record: spectrum length {rec.n} for a "
                         f"{rec.matrix_shape[0]}x{rec.matrix_shape[1]} layer", path, _label(rec))


def _label(rec):
    return rec.name if isinstance(rec.name, str) else repr(rec.name)[:80]


def _check_parts(rec, parts, names, path):
    """svd: factors of the recorded rank and shape, alpha = rank; else a diff of the shape."""
    if rec.kind == "svd":
        d, k = rec.matrix_shape
        up, down = parts["up"], parts["down"]
        if rec.rank < 1:
            raise DeltaError("corrupt delta record: an svd layer of rank 0", path, names["up"])
        conv = len(rec.shape) == 4       # factors shaped as hosts load a conv's (lora_parts)
        want_up = (d, rec.rank, 1, 1) if conv else (d, rec.rank)
        want_down = (rec.rank, *rec.shape[1:]) if conv else (rec.rank, k)
        for t, want, name in ((up, want_up, names["up"]), (down, want_down, names["down"])):
            if tuple(t.shape) != want:
                raise DeltaError(f"corrupt delta: shape {tuple(t.shape)}, the record says "
                                 f"{want}", path, name)
        if "alpha" in parts:
            alpha = parts["alpha"]
            if alpha.numel() != 1 or float(alpha.float().reshape(())) != rec.rank:
                raise DeltaError(f"corrupt delta: alpha is not the rank {rec.rank}", path,
                                 names["alpha"])
        return
    diff, numel = parts["diff"], math.prod(rec.shape)
    if diff.numel() != numel:
        raise DeltaError(f"corrupt delta: {diff.numel()} values, the record's shape "
                         f"{rec.shape} needs {numel}", path, names["diff"])


def _check_coded(rec, parts, path):
    if not rec.shape:
        raise DeltaError("corrupt delta record: a coded scalar", path, rec.name)
    d, k = rec.matrix_shape
    try:
        if rec.kind == "dct":
            if rec.patch < 1:
                raise ValueError(f"patch size {rec.patch}")
            dct_codec.check({"codes": parts["dct_codes"], "scales": parts["dct_scales"],
                             "bits": parts["dct_bits"]}, d, k, rec.patch)
        else:
            quant.check(parts, d, k)
            if parts["q_bits"].numel() != rec.rank:
                raise ValueError(f"{parts['q_bits'].numel()} components, the record says "
                                 f"rank {rec.rank}")
    except (ValueError, KeyError) as e:
        raise DeltaError(f"corrupt {rec.kind} data ({e})", path, rec.name) from None


def _check_spectrum(rec, spectrum, path):
    """Singular values: finite, >= 0, non-increasing; the head as long as the rank."""
    if spectrum is None:
        return
    full, head = spectrum
    if len(head) != rec.rank and rec.kind in ("svd", "qsvd"):
        raise DeltaError(f"corrupt delta: {len(head)} stored singular values for rank "
                         f"{rec.rank}", path, rec.name)
    for values in (np.asarray(full, dtype=np.float64), np.asarray(head, dtype=np.float64)):
        if values.size and (not np.isfinite(values).all() or values.min() < 0
                            or (np.diff(values) > 0).any()):
            raise DeltaError("corrupt delta: its spectrum is not a list of singular values "
                             "(finite, non-negative, non-increasing)", path, rec.name)
