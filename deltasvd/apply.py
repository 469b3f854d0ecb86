"""Base checkpoint + delta file -> a full checkpoint of the base's layout and dtype (streamed)."""

import math
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import torch

from . import families, quantized
from .checkpoint import Checkpoint
from .compress import _fingerprint
from .delta_file import read_delta, reconstruct
from .errors import DeltaError, UsageError
from .safetensors_io import write_streaming


def records_by_key(delta):
    by_key = defaultdict(list)
    for rec in delta.records:
        by_key[rec.key].append(rec)
    return by_key


def delta_for(delta, recs, shape):
    """The float32 delta of one checkpoint tensor from all records that patch it."""
    out = torch.zeros(shape, dtype=torch.float32)
    for rec in recs:
        piece = reconstruct(rec, delta.stored(rec))
        if rec.rows:
            out[rec.rows[0]: rec.rows[1]] += piece
        else:
            out += piece.reshape(shape)
    return out


def check_family(delta, family, where):
    if delta.family != family:
        raise DeltaError(f"this delta is for {families.title(delta.family)}, the "
                         f"model is {families.title(family)}", where)


def apply_file(base_path, delta_path, out_path, strength=1.0, force=False, overwrite=False,
               allow_pickle=False, progress=None, warn=None, verify=True):
    """Write base + strength * delta. Refuses a base other than the one the delta was made
    against (by tensor-data sha256) unless `force`, and any patched value that is not finite.
    `warn(text)` hears what deserves a word but no refusal; `verify`: read_delta's. Returns
    the number of patched tensors."""
    if not math.isfinite(strength):
        raise UsageError(f"strength must be a finite number, not {strength}")
    delta = read_delta(delta_path, verify)
    if warn and not delta.info.get("base_sha256"):
        warn(f"{delta_path}: the delta records no fingerprint of its base (it was made from "
             "loaded models), so nothing checks that this is the base it was made against")
    base = Checkpoint(base_path, allow_pickle)
    try:
        check_family(delta, base.family, base.path)
        if base.fused:
            raise DeltaError("apply writes the base's own layout, and this base is in the "
                             "diffusers layout; apply to the single-file (ComfyUI) release of "
                             "the base, or load the delta as a LoRA", base.path)
        by_key = records_by_key(delta)
        missing = [k for k in by_key if k not in base.key_map]
        if missing:
            raise DeltaError("the base has no tensor this delta patches", base.path, missing[0])
        raw_keys = base.raw.keys()
        canonical = {raw: key for key, raw in base.key_map.items()}
        layout = [(k, base.raw.dtype(k), base.raw.shape(k)) for k in raw_keys]

        def produce(writer):
            for i, raw in enumerate(raw_keys):
                key = canonical.get(raw)
                recs = by_key.get(key)
                if recs:
                    t = patched(base, key, raw, delta, recs, strength)
                else:
                    t = base.raw.get(raw)
                writer.write(raw, t)
                if progress:
                    progress("apply", i + 1, len(raw_keys), raw)
            _check_fingerprint(delta, base, hashing, force)

        with ThreadPoolExecutor(max_workers=1) as pool:
            hashing = pool.submit(_fingerprint, base.path)
            write_streaming(out_path, layout, produce, metadata=base.raw.metadata or None,
                            overwrite=overwrite, inputs=(base_path, delta_path))
    finally:
        base.close()
    return len(by_key)


def patched(base, key, raw, delta, recs, strength):
    """base + strength * delta of one tensor, stored as the base stores it (fp8 and scaled
    fp8 included: the scale stays, the weight is quantized again with it)."""
    real = base.get(key).float()
    new = real + strength * delta_for(delta, recs, real.shape)
    out = quantized.store_like(new, base.raw.dtype(raw), base.scale(key), base.path, key)
    if not bool(torch.isfinite(out.float()).all()):
        if not bool(torch.isfinite(real).all()):
            raise DeltaError("the base itself holds NaN or Inf here", base.path, key)
        raise DeltaError(f"patching at strength {strength} gives values outside the range of "
                         f"{base.raw.dtype(raw)} (NaN or Inf); nothing was written",
                         delta.info.get("file"), key)
    return out


def _check_fingerprint(delta, base, hashing, force):
    """Checked before the output is renamed into place, so a refusal leaves no file."""
    want = delta.info.get("base_sha256")
    got = hashing.result()
    if want and got != want and not force:
        raise DeltaError(f"this is not the base the delta was made against (tensor sha256 "
                         f"{got[:12]}…, delta expects {want[:12]}… from "
                         f"'{delta.info.get('base_name', '?')}'); pass --force to apply anyway",
                         base.path)
