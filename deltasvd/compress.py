"""Two checkpoints -> one Delta (in memory). Streaming: one key pair in memory per worker.

Flow: open_pair -> plan the keys -> each worker reads a pair (one worker: the next pair is
read in a thread meanwhile) -> dtype-aware delta -> split into LoRA targets or extras -> code
each piece (SVD factors, dense or exact) -> complete the modules hosts need whole -> Delta.
A size budget needs every spectrum before any rank is known: pass 1 collects spectra, pass 2
codes with the allocation.
"""

import heapq
import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from . import dct_codec, families, quant, quantized, spectrum, workspace
from .blas_threads import blas_threads
from .checkpoint import is_ignored, open_pair
from .delta_file import STORAGE_DTYPES, Delta, LayerRecord, lora_parts, store_parts, tensor_names
from .errors import DeltaError
from .limits import STORAGE_ROUNDING
from .measures import layer_weight, weighted_error
from .ranks import RankRule, allocate_budget, allocate_error
from .safetensors_io import file_sha256, tensor_data_sha256
from .spill import SpillFile

OVERSHOOT = 1.05  # size mode: code 5% over the estimated budget, then trim exactly
RECORD_BYTES = 250  # size mode: header bytes per record (JSON record, rank, tensor headers)
MAX_WORKERS = 4   # layers coded at once on the CPU (memory: one delta each)
QUEUED_PER_WORKER = 4   # keys handed out ahead per worker (a queued key holds no memory)


@dataclass
class Piece:
    """A delta (or rows of one) bound for one record."""
    rec: LayerRecord
    data: torch.Tensor            # float32, shape rec.shape


@dataclass
class Counts:
    read: int = 0
    changed: int = 0
    identical: int = 0
    rounded: int = 0              # base rounded to the tuned dtype before subtracting
    ignored_ema: int = 0
    ignored_nonfloat: int = 0
    only_in_base: list = field(default_factory=list)
    only_in_tuned: list = field(default_factory=list)
    svd64: int = 0                # layers whose rank a float64 SVD had to settle
    rounding_raw2: float = 0.0    # squared |tuned - base| of the rounded tensors, before ...
    rounding_kept2: float = 0.0   # ... and after rounding the base
    base_coarser: int = 0         # tensors the base stores in less precision than the tuned
    scale_orphans: list = field(default_factory=list)   # (file, key): scales ComfyUI ignores


# Spectra are stored as float16 (delta_file.py): a change whose singular values pass its
# largest value is no fine-tune (real deltas have singular values of order 1 to 100).
SPECTRUM_MAX = float(np.finfo(np.float16).max)


def storage_dtype(name):
    if name not in STORAGE_DTYPES:
        raise DeltaError(f"unknown --dtype {name!r}; use fp16, bf16 or fp32")
    return STORAGE_DTYPES[name]


def plan_keys(base, tuned, counts):
    """Keys whose pair must be read; everything else is counted and reported. A part of the
    model only one file holds (an all-in-one checkpoint's text encoders or VAE beside a
    diffusion-model-only file) is unchanged; a tensor only the tuned file holds within a part
    both have is refused (a delta cannot add weights)."""
    keys, only_in_tuned = [], []
    base_parts = {model_part(k) for k in base.keys()}
    for key in tuned.keys():
        if is_ignored(key):
            counts.ignored_ema += 1
        elif not tuned.dtype(key).is_floating_point:
            counts.ignored_nonfloat += 1
        elif key in base.key_map:
            keys.append(key)
        elif model_part(key) in base_parts:
            only_in_tuned.append(key)
        else:
            counts.only_in_tuned.append(key)
    counts.only_in_base = [k for k in base.keys() if k not in tuned.key_map and not is_ignored(k)]
    counts.scale_orphans = [(os.path.basename(c.path), k) for c in (base, tuned)
                            for k in getattr(getattr(c, "quant", None), "orphans", ())]
    if only_in_tuned:
        raise DeltaError(f"{len(only_in_tuned)} tensor(s) exist only in the tuned model "
                         "(a delta cannot add weights); is the base the model it was tuned from?",
                         tuned.path, only_in_tuned[0])
    return keys


def _available_bytes():
    """Memory (RAM + swap) free for this job now, or None where /proc/meminfo is missing."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"] + info.get("SwapFree", 0)
    except (OSError, KeyError, ValueError, IndexError):
        return None


def _check_memory(tuned, keys):
    """Refuse, before any reading or hashing, a tensor whose float32 pair and delta alone
    cannot fit in this machine's memory (it would end in an allocator traceback)."""
    free = _available_bytes()
    if free is None or not keys:
        return
    key = max(keys, key=lambda k: math.prod(tuned.shape(k)))
    need = 3 * 4 * math.prod(tuned.shape(key))
    if need > free:
        raise DeltaError(f"compressing this tensor needs about {need / 2**30:.1f} GiB of memory "
                         f"and {free / 2**30:.1f} GiB is available", tuned.path, key)


def model_part(key):
    """The part of a model a canonical key belongs to: the diffusion model, one text encoder,
    the VAE (`text_encoders.<name>.`, `conditioner.embedders.<N>.`, else the first name)."""
    parts = key.split(".")
    depth = {"model": 2, "text_encoders": 2, "conditioner": 3}.get(parts[0], 1)
    return ".".join(parts[:depth])


def _check_finite(delta, b, t, base, tuned, key):
    """NaN or Inf on either side makes the delta non-finite: one cheap reduction on the
    delta, and only on failure a look at which file holds it."""
    if bool(torch.isfinite(delta.sum())):
        return
    if torch.isfinite(delta).all():
        return  # finite values whose sum overflowed
    bad = tuned if not bool(torch.isfinite(t).all()) else base
    raise DeltaError("contains NaN or Inf values", bad.path, key)


def read_pairs(base, tuned, keys, progress=None):
    """Yield (key, base tensor, tuned tensor); the next pair is read in a thread."""
    def load(key):
        return base.get(key), tuned.get(key)

    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(load, keys[0]) if keys else None
        for i, key in enumerate(keys):
            b, t = nxt.result()
            nxt = pool.submit(load, keys[i + 1]) if i + 1 < len(keys) else None
            yield key, b, t
            del b, t
            if progress:
                progress(i + 1, len(keys), key)


@dataclass
class PairDelta:
    """What one key's pair of tensors came to: its float32 delta (None if identical)."""
    key: str
    delta: torch.Tensor
    rounded: bool             # the base was rounded to the tuned file's format first
    raw_norm: float = 0.0     # rounded: |tuned - base| before rounding the base ...
    kept_norm: float = 0.0    # ... and after (what storage rounding does not explain)
    base_coarser: bool = False  # the base is stored in less precision than the fine-tune
    base_rows2: torch.Tensor = None  # squared norm of each base row (float64): measures.py

    def __post_init__(self):
        self.changed = self.delta is not None


def pair_delta(key, b, t, base, tuned):
    """The delta of one key's pair, dtype-aware: where the tuned file is stored coarser than the
    base (fp32 -> fp16, bf16 -> fp8, scaled fp8 with the tuned file's scales), the base is
    rounded to the tuned file's format first: an fp16 or fp8 copy of a base is not a
    fine-tune. A float32 CPU delta is formed in the thread's kept buffer where it keeps one
    (workspace.py): valid until its next call then."""
    b_dtype, t_dtype = base.dtype(key), tuned.dtype(key)
    floats = b_dtype.is_floating_point and t_dtype.is_floating_point
    coarser = floats and quantized.coarser(b_dtype, t_dtype)
    b, t, rounded, raw_norm = _like_with_like(key, b, t, base, tuned, b_dtype, t_dtype)
    if torch.equal(b, t):
        return PairDelta(key, None, rounded, raw_norm, 0.0, coarser)
    work = torch.float64 if torch.float64 in (b.dtype, t.dtype) else torch.float32
    # Widened into one tensor (a kept buffer, or one new one) and the base subtracted from it,
    # widened inside the subtraction: the same values as widening both first, without two more
    # new tensors (new memory costs page faults: workspace.py).
    if work == torch.float32 and t.device.type == "cpu":
        delta = _subtract(workspace.tensor("delta", t.shape).copy_(t), b)
    else:
        delta = _subtract(t.to(work, copy=True), b).float()
    _check_finite(delta, b, t, base, tuned, key)
    kept = float(torch.linalg.vector_norm(delta)) if rounded else 0.0
    return PairDelta(key, delta, rounded, raw_norm, kept, coarser, _row_norms2(b))


WIDEN_BLOCK = 1 << 21   # base values widened at a time (_row_norms2, _subtract)


def _subtract(delta, b):
    """delta -= b in place, a block at a time: torch widens a narrower `b` into a whole new
    temporary first, and new memory costs page faults (workspace.py)."""
    if b.dtype == delta.dtype or not delta.is_contiguous() or not b.is_contiguous():
        return delta.sub_(b)
    dv, bv = delta.view(-1), b.reshape(-1)
    for r in range(0, dv.numel(), WIDEN_BLOCK):
        dv[r: r + WIDEN_BLOCK].sub_(bv[r: r + WIDEN_BLOCK])
    return delta


def _row_norms2(b):
    """Squared norm of each row (each element of a 1-D tensor), as float64: split pieces take
    their rows' share. The norms are taken in float32 (~1e-6 relative, plenty for a layer's
    weight in a measure): a float64 copy of every base weight cost 10% of a run."""
    rows = b.reshape(b.shape[0], -1) if b.ndim else b.reshape(1, 1)
    rows = rows if rows.is_floating_point() else rows.double()
    # a block of rows at a time: a half-precision base is widened to float32 inside the norm,
    # and a whole widened copy was new memory (page faults) on every layer
    step = max(1, WIDEN_BLOCK // max(1, rows.shape[1]))
    norms = torch.cat([torch.linalg.vector_norm(rows[r: r + step], dim=1, dtype=torch.float32)
                       for r in range(0, rows.shape[0], step)])
    return norms.double() ** 2


def _like_with_like(key, b, t, base, tuned, b_dtype, t_dtype):
    """(base, tuned, rounded, |tuned - base| before rounding) with the base rounded to the
    tuned file's format where that is the coarser one. fp8 on either side: float32 real weights
    (a scaled weight is read as weight * scale), the base rounded with the tuned file's scale."""
    if b_dtype in quantized.FP8_DTYPES or t_dtype in quantized.FP8_DTYPES:
        b, t = b.float(), t.float()
        rounded = quantized.coarser(t_dtype, b_dtype) or _requantized(key, base, tuned, t_dtype,
                                                                      b_dtype)
        if not rounded:
            return b, t, False, 0.0
        raw_norm = float(torch.linalg.vector_norm(t - b))
        b = quantized.quantize_like(b, t_dtype, tuned.scale(key), tuned.path, key)
        return b, t, True, raw_norm
    if not (b.is_floating_point() and t.is_floating_point() and
            quantized.coarser(t.dtype, b.dtype)):
        return b, t, False, 0.0
    raw_norm = float(torch.linalg.vector_norm(t.float() - b.float()))
    return b.to(t.dtype), t, True, raw_norm


def _requantized(key, base, tuned, t_dtype, b_dtype):
    """Both sides in one fp8 format, with other scales: the tuned grid is no finer, and
    putting the base on it is what re-quantizing alone would do."""
    if t_dtype != b_dtype:
        return False
    b_scale, t_scale = base.scale(key), tuned.scale(key)
    if b_scale is None and t_scale is None:
        return False
    return b_scale is None or t_scale is None or not torch.equal(b_scale.float(),
                                                                 t_scale.float())


def count_pair(counts, pd):
    counts.read += 1
    counts.rounded += pd.rounded
    counts.changed += pd.changed
    counts.identical += not pd.changed
    counts.rounding_raw2 += pd.raw_norm ** 2
    counts.rounding_kept2 += pd.kept_norm ** 2
    counts.base_coarser += pd.base_coarser


def read_deltas(base, tuned, keys, counts, progress=None):
    """Yield (key, float32 delta, base row norms) for changed keys, counting every pair."""
    for key, b, t in read_pairs(base, tuned, keys, progress):
        pd = pair_delta(key, b, t, base, tuned)
        count_pair(counts, pd)
        if pd.changed:
            yield key, pd.delta, pd.base_rows2


def _is_norm(base, key, param):
    weight_key = key if param == "weight" else key[: -len("bias")] + "weight"
    return weight_key in base.key_map and len(base.shape(weight_key)) == 1


def split_pieces(key, delta, base, family, base_rows2=None):
    """The records one changed checkpoint tensor becomes. Norm layers are stored as w_norm /
    b_norm pairs only where A1111's rules apply; elsewhere a 1-D delta is a `.diff`.
    `base_rows2` (pair_delta's) gives each record its base weight's squared norm."""
    fam = families.family(family)
    tgts = fam.targets(key, tuple(delta.shape), base.key_map)
    base2 = (lambda rows: None) if base_rows2 is None else (
        lambda rows: float(base_rows2[slice(*rows) if rows else slice(None)].sum()))
    if tgts is None:
        kind = "exact" if delta.ndim <= 1 else "svd"
        rec = LayerRecord(name=key, key=key, shape=list(delta.shape), kind=kind, extra=True,
                          base2=base2(None))
        return [Piece(rec, delta)]
    pieces = []
    for tg in tgts:
        data = delta if tg.rows is None else delta[tg.rows[0]: tg.rows[1]]
        kind = "exact" if data.ndim <= 1 else "svd"
        rec = LayerRecord(name=tg.module, key=key, shape=list(data.shape), kind=kind,
                          param=tg.param, rows=list(tg.rows) if tg.rows else None,
                          norm=fam.a1111 and _is_norm(base, key, tg.param),
                          base2=base2(tg.rows))
        pieces.append(Piece(rec, data))
    return pieces


def code_exact(piece):
    """1-D tensors (biases, norms) and scalars: stored exactly, in float32."""
    rec = piece.rec
    rec.norm2 = float(piece.data.double().pow(2).sum())
    return {"diff": piece.data.float().clone()}, None


def code_matrix(piece, rule, dtype, device, factor_bits=None):
    """SVD-code one matrix piece under `rule` (a RankRule). Returns (tensors, spectrum).
    With `factor_bits`, the factors are quantized (quant.py; record kind "qsvd")."""
    rec = piece.rec
    m = spectrum.as_matrix(piece.data)
    d, k = m.shape
    md = m.to(device)
    if rule.sketch and rule.mode == "rank":
        coded = _code_sketched(piece, md, rule.clamp(int(rule.value), min(d, k)), dtype,
                               factor_bits)
        if coded is not None:
            return coded
    dec, t, dense = spectrum.decide_rank(md, rule)
    _check_scale(dec.s, rec)
    rec.n, rec.precision = min(d, k), dec.precision
    rec.sum_s, rec.sum_s2 = float(np.sum(dec.s)), float(np.sum(dec.s * dec.s))
    rec.norm2 = dec.fro2
    if dense:
        rec.kind, rec.rank = "dense", t
        stored = _stored(piece.data, dtype, rec)
        rec.err2 = float((piece.data - stored.float()).double().pow(2).sum())
        return {"diff": stored}, dec.s
    rec.kind, rec.rank = "svd", t
    if factor_bits:
        a, b = spectrum.factors(dec, md, t)
        parts, a, b = quant.encode_factors(a.cpu(), b.cpu(), dec.s[:t], factor_bits)
        rec.kind = "qsvd"
        rec.err2 = spectrum.residual_norm(md, a.to(md.device), b.to(md.device)) ** 2
        return parts, dec.s
    a, b, rec.err2 = spectrum.stored_factors(dec, md, t, lambda x: _stored(x, dtype, rec))
    return lora_parts(rec, a.cpu(), b.cpu()), dec.s


def _check_scale(s, rec):
    if len(s) and s[0] > SPECTRUM_MAX:
        raise DeltaError(f"the fine-tune changed this tensor far more than fine-tuning does "
                         f"(largest singular value of the change {s[0]:.3g}): is the file "
                         "damaged, or not a fine-tune of this base?", None, rec.key)


def _code_sketched(piece, md, t, dtype, factor_bits):
    """--rank t without the whole spectrum (spectrum.sketched_factors), where that is the
    cheaper route; None elsewhere (the caller takes the Gram route). The record keeps only the
    head of its spectrum: precision "rand", sum_s unknown (0), so it resizes by rank, --fro or
    size but not by energy (resize.py)."""
    d, k = md.shape
    rec = piece.rec
    if t < 1 or not spectrum.sketch_fits(d, k, t):
        return None
    # a copy either way: the product may sit in a worker's kept buffer (spectrum._times)
    keep = (lambda x: x.clone()) if factor_bits else (lambda x: _stored(x, dtype, rec))
    got = spectrum.sketched_factors(md, t, keep)
    if got is None:
        return None
    s, a, b, rec.err2, fro2 = got
    _check_scale(s, rec)
    rec.n, rec.precision, rec.kind, rec.rank = min(d, k), "rand", "svd", t
    rec.sum_s, rec.sum_s2, rec.norm2 = 0.0, fro2, fro2
    if factor_bits:
        parts, a, b = quant.encode_factors(a.cpu(), b.cpu(), s, factor_bits)
        rec.kind = "qsvd"
        rec.err2 = spectrum.residual_norm(md, a.to(md.device), b.to(md.device)) ** 2
        return parts, s
    return lora_parts(rec, a.cpu(), b.cpu()), s


def _stored(t, dtype, rec):
    """`t` in the storage dtype, refused if that overflows it (fp16 ends at 65504). Always a
    new tensor: `t` may be a view of a worker's reused delta (workspace.py)."""
    out = t.to(dtype, copy=True)
    # NaN and Inf show in the extremes, found in one pass without a widened copy (isfinite on
    # a half tensor is a slow scalar loop, and a float32 sum widened the whole tensor first)
    if out.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(out))).all()):
        raise DeltaError(f"the delta's values overflow {dtype} (largest "
                         f"{float(t.abs().max()):.3g}); use --dtype bf16 or fp32", None, rec.key)
    return out


def code_dct(piece, bits):
    """Delta-DCT one matrix piece at about `bits` bits per parameter (dct_codec.py)."""
    rec = piece.rec
    m = spectrum.as_matrix(piece.data).float().cpu()
    parts, rec.err2, rec.norm2 = dct_codec.encode(m, bits, dct_codec.PATCH)
    rec.kind, rec.patch = "dct", dct_codec.PATCH
    return {"dct_" + name: t for name, t in parts.items()}, None


def _pass1_spectra(base, tuned, keys, counts, device, progress, exact):
    """Whole-file modes, pass 1: every matrix piece's spectrum (values only), shape, base norm
    and delta norm; exact: float64 values (--exact-ranks), else float32."""
    spectra = {}
    for key, delta, rows2 in read_deltas(base, tuned, keys, counts, progress):
        for j, piece in enumerate(split_pieces(key, delta, base, base.family, rows2)):
            rec = piece.rec
            if rec.kind == "svd":
                dec = spectrum.values_only(spectrum.as_matrix(piece.data).to(device), exact)
                spectra[(key, j)] = (dec.s, rec.shape, rec.base2, dec.fro2)
    return spectra


def _layers(spectra, rule, esize):
    """allocate_budget's / allocate_error's (s, cost, weight) per piece, and the weighted error
    past a --max-rank cap, which no allocation removes."""
    layers, capped = [], 0.0
    for s, shape, base2, fro2 in spectra.values():
        d, k = shape[0], int(np.prod(shape[1:]))
        w = layer_weight(base2, fro2) if rule.objective == "weight" else 1.0
        if rule.max_rank:
            capped += w * float(np.sum(s[rule.max_rank:] ** 2))
            s = s[: rule.max_rank]
        layers.append((s, (d + k) * esize + 11, w))  # + the float64 spectrum head, base64'd
    return layers, capped


def _budget_ranks(spectra, rule, dtype, budget_bytes):
    """Allocate ranks for size mode. Header and 1-D tensors are reserved before the call."""
    layers, _ = _layers(spectra, rule, torch.empty((), dtype=dtype).element_size())
    return dict(zip(spectra, allocate_budget(layers, budget_bytes)))


def _error_ranks(spectra, rule, dtype_name):
    """Allocate ranks for max-error mode: the cheapest whose estimated weight-relative error
    is within the target, less room for the storage rounding the estimate leaves out."""
    layers, capped = _layers(spectra, rule, STORAGE_DTYPES[dtype_name].itemsize)
    whole = sum(w * float(np.sum(s * s)) for s, _, w in layers) + capped
    target = rule.value ** 2 - STORAGE_ROUNDING[dtype_name] ** 2
    if target <= 0:
        raise DeltaError(f"--max-error {_fmt(rule.value)} is below what {dtype_name} "
                         f"factors can hold (their rounding alone is about "
                         f"{STORAGE_ROUNDING[dtype_name]:g}); use --dtype fp32 or a larger "
                         "target")
    ranks = allocate_error(layers, target * whole, capped)
    if ranks is None:
        least = math.sqrt(capped / whole) if whole > 0 else 0.0
        raise DeltaError(f"--max-error {_fmt(rule.value)} cannot be met with --max-rank "
                         f"{rule.max_rank}: its least weight-relative error is {least:.4f}")
    if not any(ranks):
        raise DeltaError(f"--max-error {_fmt(rule.value)} keeps nothing: the whole change is "
                         "within it; ask for a smaller error")
    return dict(zip(spectra, ranks))


class Codec:
    """Which codec codes the matrices: "svd" (factors; quantized with `factor_bits`) or "dct"
    (at `bits` bits per parameter)."""

    def __init__(self, name="svd", bits=None, factor_bits=None):
        if name not in ("svd", "dct"):
            raise DeltaError(f"unknown codec {name!r}; use svd or dct")
        if name == "dct" and not (bits and 0 < bits <= dct_codec.MAX_BITS):
            raise DeltaError(f"the dct codec needs a budget 0 < bits <= {dct_codec.MAX_BITS}")
        if factor_bits is not None and not 1 <= factor_bits <= quant.MAX_BITS:
            raise DeltaError(f"factor bits must lie in 1..{quant.MAX_BITS}")
        self.name, self.bits, self.factor_bits = name, bits, factor_bits

    def info(self):
        """The file's deltasvd.codec ("svd", "qsvd" with factor bits, "dct") and its setting."""
        if self.name == "dct":
            return {"codec": "dct", "bits": _fmt(self.bits), "patch": dct_codec.PATCH}
        if self.factor_bits:
            return {"codec": "qsvd", "factor_bits": self.factor_bits}
        return {"codec": "svd"}


class Compressor:
    """Runs the whole job; holds the options so the steps stay short."""

    def __init__(self, rule, dtype="fp16", device="cpu", progress=None, codec=None,
                 spill_dir=None):
        self.spill_dir = spill_dir     # where factors wait for the file (spill.py); None: temp
        self.codec = codec or Codec()
        if self.codec.name == "dct":
            rule = RankRule("energy", 1.0)     # unused: the bits budget decides
        elif rule is None:
            raise DeltaError("the svd codec needs a rank rule")
        elif not rule.per_layer and self.codec.factor_bits:
            raise DeltaError(f"--{rule.mode.replace('_', '-')} works with plain factors only "
                             "(not --factor-bits)")
        self.rule = rule
        self.dtype = storage_dtype(dtype)
        self.dtype_name = dtype
        self.device = torch.device(device)
        self.progress = progress

    def run(self, base_path, tuned_path, allow_pickle=False):
        """Two checkpoint files -> (delta, counts, tuned file bytes), with fingerprints."""
        if os.path.exists(base_path) and os.path.exists(tuned_path) \
                and os.path.samefile(base_path, tuned_path):
            raise DeltaError("the base and the fine-tune are the same file: there is no delta "
                             "to store", tuned_path)
        base, tuned = open_pair(base_path, tuned_path, allow_pickle)
        try:    # before hashing gigabytes, not after
            _check_memory(tuned, [k for k in tuned.keys() if k in base.key_map])
        except DeltaError:
            base.close()
            tuned.close()
            raise
        with ThreadPoolExecutor(max_workers=2) as hashers:
            hashes = [hashers.submit(_fingerprint, p) for p in (base.path, tuned.path)]
            delta, counts = self.run_readers(base, tuned, os.path.basename(base.path),
                                             os.path.basename(tuned.path))
            delta.info["base_sha256"], delta.info["tuned_sha256"] = (h.result() for h in hashes)
        return delta, counts, os.path.getsize(tuned.path)

    def run_readers(self, base, tuned, base_name="", tuned_name=""):
        """The job on two open readers (checkpoint files or a host's models, already checked
        as a pair); closes both. Returns (delta, counts); fingerprints are left empty."""
        try:
            with _exact_cuda_math(self.device):
                counts = Counts()
                keys = plan_keys(base, tuned, counts)
                fixed_ranks = None
                if not self.rule.per_layer:
                    fixed_ranks = self._allocate(base, tuned, keys)
                    counts = Counts()  # pass 2 counts again
                records, tensors, extras, spectra = self._code_all(base, tuned, keys, counts,
                                                                   fixed_ranks)
                if not counts.changed:
                    raise DeltaError(_nothing_changed(counts), getattr(tuned, "path", None))
                if families.family(base.family).a1111:
                    _complete_modules(records, tensors, _module_index(base), self.dtype)
        finally:
            base.close()
            tuned.close()
        delta = Delta(family=base.family, records=records, tensors=tensors, extras=extras,
                      spectra=spectra)
        delta.info.update({
            "mode": self.rule.mode, "value": _fmt(self.rule.value),
            "min_rank": self.rule.min_rank, "max_rank": self.rule.max_rank or "",
            "dtype": self.dtype_name, "base_sha256": "", "tuned_sha256": "",
            "base_name": base_name, "tuned_name": tuned_name,
        })
        if self.codec.name == "dct":
            delta.info.update({"mode": "bits", "value": _fmt(self.codec.bits),
                               "min_rank": "", "max_rank": ""})
        delta.info.update(self.codec.info())
        return delta, counts

    def _allocate(self, base, tuned, keys):
        counts = Counts()
        spectra = _pass1_spectra(base, tuned, keys, counts, self.device, self._progress("scan"),
                                 self.rule.exact)
        if self.rule.mode == "max_error":
            return _error_ranks(spectra, self.rule, self.dtype_name)
        budget = self.rule.value * 2**20 - _reserved_bytes(spectra, base, tuned, keys)
        if budget <= 0:
            raise DeltaError(f"--size-mb {self.rule.value} is smaller than the fixed part of "
                             "the file (header, spectra, 1-D tensors)")
        # Code a little more than the estimate allows; trim_to_size then cuts the least
        # valuable components until the real file fits, so no budget is left unused. The
        # layers' own share of the header (record, spectrum) is the least sure part of the
        # estimate, as a layer the budget leaves out has none: that much is coded over too.
        slack = sum(RECORD_BYTES + min(shape[0], int(np.prod(shape[1:]))) * 8 / 3
                    for _, shape, *_ in spectra.values())
        return _budget_ranks(spectra, self.rule, self.dtype, budget * OVERSHOOT + slack)

    def _progress(self, stage):
        if not self.progress:
            return None
        return lambda done, total, key: self.progress(stage, done, total, key)

    def _code_all(self, base, tuned, keys, counts, fixed_ranks):
        """Code every key; results are taken in key order so the file does not depend on
        which worker finished first."""
        records, tensors, extras, spectra = [], {}, {}, {}
        spill = SpillFile(self.spill_dir)
        progress = self._progress("compress")
        workers, threads = self._parallelism()
        with blas_threads(threads):
            jobs = (self._coded_in_pool(keys, base, tuned, fixed_ranks, workers) if workers > 1
                    else self._coded_inline(keys, base, tuned, fixed_ranks))
            with closing(jobs):
                for pd, coded in jobs:
                    count_pair(counts, pd)
                    if progress:
                        progress(counts.read, len(keys), pd.key)
                    for piece, (parts, s) in coded:
                        if parts is None:
                            continue
                        idx = len(records)
                        records.append(piece.rec)
                        if not piece.rec.extra:   # extras go into the header, in memory
                            parts = {k: spill.keep(v) for k, v in parts.items()}
                        store_parts(piece.rec, parts, tensors, extras)
                        if s is not None:
                            spectra[idx] = (s, s)
                        counts.svd64 += piece.rec.precision == "svd64"
        return records, tensors, extras, spectra

    def _coded_in_pool(self, keys, base, tuned, fixed_ranks, workers):
        """`workers` keys at a time. Each worker reads its own pair and forms its delta: the
        calling thread only hands out keys and collects, so it never holds the workers up,
        and a queued key holds no memory."""
        with ThreadPoolExecutor(max_workers=workers,
                                initializer=workspace.keep_buffers) as pool:
            pending = deque()
            try:
                for key in keys:
                    pending.append(pool.submit(self._code_pair, key, base, tuned, fixed_ranks))
                    # Keep the queue short so that progress and cancelling follow the work.
                    while len(pending) > QUEUED_PER_WORKER * workers:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            except BaseException:          # a cancel or an error: start nothing more
                for job in pending:
                    job.cancel()
                raise

    def _coded_inline(self, keys, base, tuned, fixed_ranks):
        """One worker (an accelerator, or one core) codes in the calling thread, the next pair
        read in a thread meanwhile: the host's per-thread settings (TF32 off, see
        _exact_cuda_math) then hold for every product."""
        with workspace.kept_buffers():
            for key, b, t in read_pairs(base, tuned, keys):
                yield self._code_read(key, b, t, base, tuned, fixed_ranks)

    def _parallelism(self):
        """(workers, BLAS threads each). On the CPU: layers side by side, single-threaded,
        at most MAX_WORKERS of them (each holds one layer's delta); an accelerator: one."""
        if self.device.type != "cpu":
            return 1, torch.get_num_threads()
        cores = os.cpu_count() or 1
        workers = max(1, min(cores, MAX_WORKERS))
        return workers, max(1, cores // workers)

    def _code_pair(self, key, base, tuned, fixed_ranks):
        return self._code_read(key, base.get(key), tuned.get(key), base, tuned, fixed_ranks)

    def _code_read(self, key, b, t, base, tuned, fixed_ranks):
        where = getattr(tuned, "path", None)     # a host's loaded model has no file
        try:
            return self._coded(key, b, t, base, tuned, fixed_ranks)
        except DeltaError as e:
            if e.path is not None:
                raise
            raise DeltaError(e.message, where, e.tensor or key) from None
        except MemoryError:
            raise DeltaError("out of memory while compressing this tensor", where, key) from None
        except RuntimeError as e:   # torch's allocator says so in a RuntimeError
            if "alloc" not in str(e):
                raise
            raise DeltaError("out of memory while compressing this tensor", where, key) from None

    def _coded(self, key, b, t, base, tuned, fixed_ranks):
        pd = pair_delta(key, b, t, base, tuned)
        del b, t
        if not pd.changed:
            return pd, []
        pieces = split_pieces(key, pd.delta, base, base.family, pd.base_rows2)
        pd.delta = None        # the pieces hold what is needed of it
        return pd, self._code_key(key, pieces, fixed_ranks)

    def _code_key(self, key, pieces, fixed_ranks):
        out = []
        for j, piece in enumerate(pieces):
            rule = self.rule
            if fixed_ranks is not None and (key, j) in fixed_ranks:
                rule = RankRule("rank", max(fixed_ranks[(key, j)], 1), min_rank=0,
                                exact=self.rule.exact)
            out.append((piece, self._code_piece(piece, rule, fixed_ranks, key, j)))
            # A coded piece waits for the keys before it to be collected; only its record and
            # parts are needed then, not its float32 delta (up to 8 waiting pieces of a Flux
            # model held 1-2 GB of deltas).
            piece.data = None
        return out

    def _code_piece(self, piece, rule, fixed_ranks, key, j):
        if piece.rec.kind == "exact":
            return code_exact(piece)
        if self.codec.name == "dct":
            return code_dct(piece, self.codec.bits)
        if fixed_ranks is not None and fixed_ranks.get((key, j), 0) == 0:
            return None, None   # the budget gave this layer nothing
        return code_matrix(piece, rule, self.dtype, self.device, self.codec.factor_bits)


def _nothing_changed(counts):
    why = ("every tensor equals the base's" if not counts.rounded else
           "every tensor equals the base's once the base is rounded to the tuned file's "
           "precision (the tuned file is a cast copy of the base)")
    return (f"nothing changed: {why}, so there is no delta to store. Were the same model "
            "given twice?")


@contextmanager
def _exact_cuda_math(device):
    """TF32 would round the Gram products to 10 mantissa bits: off while we compute (so CUDA
    numbers match the CPU's), then back to what the host had."""
    if device.type != "cuda":
        yield
        return
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _fmt(v):
    return str(int(v)) if float(v).is_integer() and v >= 1 else repr(float(v))


def _fingerprint(path):
    if path.lower().endswith(".safetensors"):
        return tensor_data_sha256(path)
    return file_sha256(path)


def _reserved_bytes(spectra, base, tuned, keys):
    """Bytes of the file that do not depend on ranks: header, spectra, 1-D deltas. An estimate
    on the lean side: OVERSHOOT and trim_to_size make the fit exact."""
    n_values = sum(min(shape[0], int(np.prod(shape[1:]))) for _, shape, *_ in spectra.values())
    one_d = sum(4 * int(np.prod(tuned.shape(k))) for k in keys if len(tuned.shape(k)) <= 1)
    per_record = RECORD_BYTES * (len(spectra) + len(keys))   # JSON records, tensor headers
    return 2048 + n_values * 2 * 4 / 3 + one_d + per_record


def _complete_modules(records, tensors, modules, dtype):
    """Add what A1111 needs to accept every module (zero-valued, so nothing changes):
    a weight part beside a lone bias (a lone `.diff_b` makes A1111 reject the whole file), the
    missing half of a w_norm / b_norm pair, and all four projections of a MultiheadAttention
    (A1111 patches one only when q, k, v and out are all present)."""
    have = {}
    for rec in records:
        if not rec.extra:
            have.setdefault(rec.name, set()).add(rec.param)
    groups = {modules[name]["mha"] for name in have if name in modules and modules[name]["mha"]}
    for name, info in modules.items():
        params = have.get(name, set())
        needs_weight = ("bias" in params and "weight" not in params) or (
            info["mha"] in groups and "weight" not in params)
        if needs_weight:
            _add_fill(records, tensors, name, info, "weight", dtype)
        if info["norm"] and "weight" in params and "bias" not in params and info["has_bias"]:
            _add_fill(records, tensors, name, info, "bias", dtype)


def _module_index(base):
    """LoRA module name -> where its weight lives, from the base's keys (no data read)."""
    index = {}
    for key in base.keys():
        if not key.endswith(("weight", "in_proj_weight")) or is_ignored(key):
            continue
        tgts = families.family(base.family).targets(key, base.shape(key), base.key_map)
        for tg in tgts or ():
            if tg.param != "weight":
                continue
            shape = list(base.shape(key))
            if tg.rows:
                shape[0] = tg.rows[1] - tg.rows[0]
            bias_key = key[: -len("weight")] + "bias"
            index[tg.module] = {"key": key, "rows": list(tg.rows) if tg.rows else None,
                                "shape": shape, "mha": tg.mha, "norm": len(shape) == 1,
                                "has_bias": bias_key in base.key_map, "bias_key": bias_key}
    return index


def _add_fill(records, tensors, name, info, param, dtype):
    if info["norm"]:
        key = info["key"] if param == "weight" else info["bias_key"]
        rec = LayerRecord(name=name, key=key, shape=[info["shape"][0]], kind="exact",
                          param=param, norm=True)
        tensors[tensor_names(rec)["diff"]] = torch.zeros(info["shape"][0])
    else:
        shape = info["shape"]
        rec = LayerRecord(name=name, key=info["key"], shape=shape, kind="svd", rows=info["rows"],
                          rank=1)
        up = torch.zeros(shape[0], 1, dtype=dtype)
        down = torch.zeros(1, int(np.prod(shape[1:])), dtype=dtype)
        for part, t in lora_parts(rec, up, down).items():
            tensors[tensor_names(rec)[part]] = t
    records.append(rec)


def trim_to_size(delta, limit_bytes, file_size_fn, objective="weight"):
    """Size mode: drop the least valuable trailing components until the file fits. Exact:
    factors are ordered by singular value, so a prefix of them is the smaller truncation.
    Layers keep rank >= 1 (a rank-0 LoRA module makes hosts divide alpha by zero).
    Value: weighted squared error per byte, as the allocation (`objective`, ranks.py)."""
    from .resize import truncate_record
    esize = STORAGE_DTYPES[delta.info["dtype"]].itemsize

    def gain(i):
        rec = delta.records[i]
        w = layer_weight(rec.base2, rec.norm2) if objective == "weight" else 1.0
        return w * float(delta.spectra[i][1][rec.rank - 1]) ** 2 / sum(rec.matrix_shape)

    for _ in range(16):
        size = file_size_fn(delta)
        if size <= limit_bytes:
            return size
        heap = [(gain(i), i) for i, rec in enumerate(delta.records)
                if rec.kind == "svd" and rec.n and rec.rank > 1 and i in delta.spectra]
        heapq.heapify(heap)
        freed, over = 0, size - limit_bytes
        while heap and freed < over:
            _, i = heapq.heappop(heap)
            rec = delta.records[i]
            truncate_record(delta, i, rec.rank - 1)
            freed += sum(rec.matrix_shape) * esize
            if rec.rank > 1:
                heapq.heappush(heap, (gain(i), i))
        if not heap and freed < over:
            break
    size = file_size_fn(delta)
    if size > limit_bytes:
        raise DeltaError(f"cannot fit the delta into {limit_bytes / 2**20:.3f} MiB (its smallest "
                         f"form is {size / 2**20:.3f} MiB)")
    return size


def check_max_error(delta, rule):
    """Max-error mode: the written factors (storage rounding included) meet the target; the
    allocation leaves room for the rounding, so a miss is a bug, not a user's error."""
    if rule is not None and rule.mode == "max_error":
        got = weighted_error(delta.records)
        if got > rule.value:
            raise DeltaError(f"internal: --max-error {_fmt(rule.value)} missed (the file's "
                             f"weight-relative error is {got:.5f}); please report it")
