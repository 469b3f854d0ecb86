"""The delta file: a .safetensors of tensors plus deltasvd's own metadata; one container,
several codecs (`deltasvd.codec`; a reader refuses a codec it does not know).

codec "svd" (the default): a LoRA-format file stock loaders apply. Tensors (kohya names, see
families/):
  {m}.lora_up.weight (d x t [x1x1]), {m}.lora_down.weight (t x in [x kh x kw]), {m}.alpha = t
  {m}.diff   a dense delta, where factors would be no smaller
  {m}.diff_b a bias delta;  {m}.w_norm + {m}.b_norm  a norm layer's delta (always both)
codec "qsvd" (quantized factors, quant.py) and "dct" (Delta-DCT, dct_codec.py): the matrix
records are coded (record kind "qsvd" / "dct") as integers packed into uint8 tensors with float16
scales, stored under the same module names:
  qsvd: {m}.q_bits (uint8, per component), {m}.up_codes, {m}.down_codes (uint8 bit streams),
        {m}.up_scales, {m}.down_scales (float16, per component)
  dct:  {m}.dct_codes (uint8 bit stream), {m}.dct_scales (float16 per patch),
        {m}.dct_bits (uint8, 4-bit field per patch); the record's `patch` is the patch size
The other records (1-D exact deltas, dense fallbacks, zero fills) are stored as for "svd". In a
file of any codec but "svd", every tensor name carries the prefix CODED_PREFIX ("deltasvd:"), so
a stock LoRA loader matches nothing at all (rather than applying the biases alone), and the
extras are tensors too ("deltasvd:extra:<key>.<part>", not the base64 blob, which would cost a
third more).
Header metadata (strings; stock loaders ignore it):
  deltasvd.format / .version / .codec / .family / .mode / .value / .dtype / fingerprints
  deltasvd.bits (dct: the budget in bits per parameter), deltasvd.factor_bits (qsvd)
  deltasvd.ranks    JSON {module: rank}
  deltasvd.layers   base64(zlib(JSON)) one record per stored piece (see LayerRecord)
  deltasvd.spectra  base64(zlib(float16 full spectra, then float64 heads s[:rank])); a record
                    of precision "rand" (compress --rank's randomized SVD) keeps s[:rank]
                    alone in both, and the file is then version 2
  deltasvd.extras   base64(zlib(safetensors bytes)) deltas of tensors no stock loader maps
  ss_* / modelspec.* / sshs_model_hash  what A1111 and Civitai read
"""

import base64
import binascii
import json
import os
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace

import numpy as np
import safetensors.torch
import torch

from . import dct_codec, quant
from .delta_checks import check_finite, check_parts, check_records, check_spectra
from .errors import DeltaError
from .safetensors_io import HEADER_LIMIT, SafeTensorsFile, data_sha256, write_tensors

FORMAT = "deltasvd"
VERSION = "1"
# Version 2: records may keep only the head of their spectrum (precision RANDOMIZED). Written
# only by files that have such records, so that a release which reads version 1 alone says
# "update" instead of calling the file corrupt; every other file stays version 1.
HEAD_ONLY_VERSION = "2"
READ_VERSIONS = (VERSION, HEAD_ONLY_VERSION)
KNOWN_CODECS = ("svd", "qsvd", "dct")
FACTORED_KINDS = ("svd", "qsvd")   # records stored as factors of a rank
CODED_PREFIX = "deltasvd:"   # tensor names in files of a codec other than "svd"
EXTRAS_PREFIX = CODED_PREFIX + "extra:"   # ... and their extras (a tensor, not the blob)
INFLATE_MIN, INFLATE_RATIO = 64 << 20, 64   # bound on an inflated metadata blob (_unpack)
RANDOMIZED = "rand"   # a record's precision when only the head of its spectrum is known
STORAGE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class LayerRecord:
    """One stored piece: a checkpoint tensor (or rows of it) and how it is coded."""
    name: str                 # LoRA module name, or the checkpoint key for extras
    key: str                  # checkpoint key it patches
    shape: list               # shape of the patched tensor (or its rows)
    kind: str                 # "svd" | "dense" | "exact" | "qsvd" | "dct"
    param: str = "weight"     # "weight" or "bias"
    rows: list = None         # [start, stop] within the checkpoint tensor (split q/k/v)
    norm: bool = False        # a norm layer (stored as w_norm / b_norm)
    extra: bool = False       # stored in the extras blob, not as a LoRA tensor
    rank: int = 0
    n: int = 0                # length of the full spectrum (min(d, k)); 0 for exact
    sum_s: float = 0.0        # float64 totals of the full spectrum, for exact resizing (sum_s
                              # is unknown, 0, for a "rand" record: spectrum_len)
    sum_s2: float = 0.0
    err2: float = 0.0         # squared residual after storage rounding
    norm2: float = 0.0        # squared Frobenius norm of the delta
    precision: str = ""       # what gave the values: gram32, gram64, svd64, or rand (a
                              # randomized SVD at a fixed rank: spectrum.sketched_factors)
    patch: int = 0            # dct: patch size
    base2: float = None       # squared Frobenius norm of the base weight it patches (measures.py);
                              # None in files written before it was recorded

    @property
    def spectrum_len(self):
        """Singular values the file keeps: the whole spectrum (n), or for a "rand" record only
        the first `rank`, all the randomized SVD measured."""
        return self.rank if self.precision == RANDOMIZED else self.n

    @property
    def matrix_shape(self):
        return self.shape[0], int(np.prod(self.shape[1:])) if len(self.shape) > 1 else 1


@dataclass
class Delta:
    """A whole delta in memory: records, their tensors and spectra, and the file metadata."""
    family: str
    records: list
    tensors: dict             # stored LoRA tensors by file name
    extras: dict              # extras tensors by "<key>.<part>"
    spectra: dict             # record index -> (float16 full spectrum, float64 head)
    info: dict = field(default_factory=dict)   # deltasvd.* scalars (mode, value, hashes...)

    def stored(self, rec):
        """The stored tensors of a record, by part name ("up", "down", "diff", "value")."""
        src = self.extras if rec.extra else self.tensors
        return {part: src[name] for part, name in tensor_names(rec).items() if name in src}


def head_only_layers(delta):
    """Records that keep only the head of their spectrum (`compress --rank`'s randomized SVD)."""
    return sum(r.precision == RANDOMIZED for r in delta.records)


_RECORD_FIELDS = [f.name for f in fields(LayerRecord)]


CODED_PARTS = {"qsvd": ("q_bits", "up_codes", "up_scales", "down_codes", "down_scales"),
               "dct": ("dct_codes", "dct_scales", "dct_bits")}


def _extra_base(rec):
    """An extra's name: its checkpoint key, with the rows it covers."""
    return rec.key if rec.rows is None else f"{rec.key}[{rec.rows[0]}:{rec.rows[1]}]"


def tensor_names(rec):
    """File tensor names of a record's parts."""
    if rec.kind in CODED_PARTS:
        base = _extra_base(rec) if rec.extra else rec.name
        return {part: f"{base}.{part}" for part in CODED_PARTS[rec.kind]}
    if rec.extra:
        base = _extra_base(rec)
        if rec.kind == "svd":
            return {"up": base + ".lora_up", "down": base + ".lora_down"}
        return {"diff": base + ".diff"}
    m = rec.name
    if rec.kind == "svd":
        return {"up": m + ".lora_up.weight", "down": m + ".lora_down.weight", "alpha": m + ".alpha"}
    if rec.kind == "dense":
        return {"diff": m + ".diff"}
    if rec.norm:
        return {"diff": m + (".w_norm" if rec.param == "weight" else ".b_norm")}
    return {"diff": m + (".diff" if rec.param == "weight" else ".diff_b")}


LORA_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".alpha", ".diff", ".diff_b",
                 ".w_norm", ".b_norm")   # what tensor_names appends to a LoRA module's name


def module_of(tensor_name):
    """The LoRA module a file tensor belongs to: its name less the part (generic module names,
    `diffusion_model.<key>` / `text_encoders.<key>`, hold dots themselves)."""
    for suffix in LORA_SUFFIXES:
        if tensor_name.endswith(suffix):
            return tensor_name[: -len(suffix)]
    return tensor_name.split(".", 1)[0]


def store_parts(rec, parts, tensors, extras):
    """Put a record's parts under their file names, in `extras` for an extra."""
    names = tensor_names(rec)
    dst = extras if rec.extra else tensors
    for part, tensor in parts.items():
        if part in names:
            dst[names[part]] = tensor


def lora_parts(rec, a, b):
    """Shape factors the way both hosts expect: conv down t x in x kh x kw, up out x t x 1 x 1."""
    t = a.shape[1]
    if len(rec.shape) == 4:
        a = a.reshape(a.shape[0], t, 1, 1)
        b = b.reshape(t, *rec.shape[1:])
    return {"up": a.contiguous(), "down": b.contiguous(),
            "alpha": torch.tensor(float(t), dtype=torch.float32)}


def decode_parts(rec, parts):
    """The one decoder: a record's stored parts as float32 LoRA parts, (kind, parts) with kind
    "svd" ({"up", "down"}: factors as the file's lora_parts shape them) or "diff" ({"diff"})."""
    if rec.kind == "qsvd":
        d, k = rec.matrix_shape
        a, b = quant.decode_factors(parts, d, k)
        return "svd", lora_parts(rec, a, b)
    if rec.kind == "dct":
        d, k = rec.matrix_shape
        mat = dct_codec.decode({"codes": parts["dct_codes"], "scales": parts["dct_scales"],
                      "bits": parts["dct_bits"]}, d, k, rec.patch)
        return "diff", {"diff": mat.reshape(rec.shape)}
    if rec.kind == "svd":
        return "svd", {"up": parts["up"].float(), "down": parts["down"].float()}
    return "diff", {"diff": parts["diff"].float()}


def reconstruct(rec, parts):
    """The float32 delta of one record, in the shape of what it patches."""
    kind, parts = decode_parts(rec, parts)
    if kind == "svd":
        up, down = parts["up"].float(), parts["down"].float()
        return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(rec.shape)
    return parts["diff"].float().reshape(rec.shape)


def is_coded(delta):
    """A file of a codec stock loaders cannot read (anything but "svd")."""
    return delta.info.get("codec", "svd") != "svd"


def file_tensors(delta):
    """The tensors as named in the file (prefixed, extras included, for codecs but "svd")."""
    if not is_coded(delta):
        return delta.tensors
    out = {CODED_PREFIX + k: t for k, t in delta.tensors.items()}
    out.update({EXTRAS_PREFIX + k: t for k, t in delta.extras.items()})
    return out


def decoded_delta(delta):
    """A Delta whose coded records (qsvd, dct) are float LoRA parts (svd factors / dense diff),
    as hosts patch them; other records and the spectra are shared, not copied."""
    if not any(r.kind in CODED_PARTS for r in delta.records):
        return delta
    records, tensors, extras = [], {}, {}
    for rec in delta.records:
        parts = delta.stored(rec)
        if rec.kind in CODED_PARTS:
            kind, parts = decode_parts(rec, parts)
            rec = replace(rec, kind="svd" if kind == "svd" else "dense", patch=0)
        store_parts(rec, parts, tensors, extras)
        records.append(rec)
    info = dict(delta.info, codec="svd", decoded_from=delta.info.get("codec"))
    return Delta(family=delta.family, records=records, tensors=tensors, extras=extras,
                 spectra=delta.spectra, info=info)


def _pack(array_bytes):
    return base64.b64encode(zlib.compress(array_bytes, 9)).decode("ascii")


def _unpack(text, what):
    """Inflate a metadata blob, refusing a zip bomb: legitimate blobs (JSON records, float
    spectra, float extras) inflate at most a few times; a crafted one, a thousandfold."""
    packed = base64.b64decode(text, validate=True)
    limit = max(INFLATE_MIN, INFLATE_RATIO * len(packed))
    inflater = zlib.decompressobj()
    out = inflater.decompress(packed, limit)
    if inflater.unconsumed_tail or not inflater.eof:
        raise ValueError(f"{what} inflates beyond {limit >> 20} MiB (or is cut short)")
    return out


def _record_dict(rec):
    """The record's fields in order; shallow, unlike dataclasses.asdict, whose deep copy took
    most of the time of sizing a file (the explorer sizes one per slider move)."""
    return {name: getattr(rec, name) for name in _RECORD_FIELDS}


def encode_metadata(delta):
    """The deltasvd.* metadata of a Delta (without the host-facing ss_/modelspec keys)."""
    full, head = [], []
    for i, rec in enumerate(delta.records):
        if i in delta.spectra:
            full.append(np.asarray(delta.spectra[i][0][: rec.spectrum_len], dtype=np.float16))
            head.append(np.asarray(delta.spectra[i][1][: rec.rank], dtype=np.float64))
    full_b = np.concatenate(full).tobytes() if full else b""
    head_b = np.concatenate(head).tobytes() if head else b""
    meta = {f"deltasvd.{k}": str(v) for k, v in delta.info.items()}
    meta.update({
        "deltasvd.format": FORMAT,
        "deltasvd.version": HEAD_ONLY_VERSION if head_only_layers(delta) else VERSION,
        "deltasvd.family": delta.family,
        "deltasvd.ranks": json.dumps({r.name: r.rank for r in delta.records
                                      if r.kind == "svd" and not r.extra}, separators=(",", ":")),
        "deltasvd.layers": _pack(json.dumps([_record_dict(r) for r in delta.records],
                                            separators=(",", ":")).encode()),
        "deltasvd.spectra": _pack(len(full_b).to_bytes(8, "little") + full_b + head_b),
    })
    if delta.extras and not is_coded(delta):
        meta["deltasvd.extras"] = _pack(safetensors.torch.save(delta.extras))
    return meta


def write_delta(path, delta, host_metadata_fn, overwrite=False, inputs=()):
    """Write atomically. `host_metadata_fn(data_sha256)` adds ss_*/modelspec.* keys."""
    meta = encode_metadata(delta)
    header = sum(len(k) + len(v) for k, v in meta.items())
    if header > HEADER_LIMIT - (1 << 20):
        raise DeltaError(f"the metadata would take {header / 2**20:.0f} MiB of the header, over "
                         f"safetensors' {HEADER_LIMIT / 2**20:.0f} MiB limit (the extras blob: "
                         f"{len(meta.get('deltasvd.extras', '')) / 2**20:.0f} MiB); use a smaller "
                         "threshold (or a coded file, whose extras are tensors)", path)

    def metadata(data_hash):
        m = dict(meta)
        m.update(host_metadata_fn(data_hash))
        return m

    write_tensors(path, file_tensors(delta), metadata_fn=metadata, overwrite=overwrite,
                  inputs=inputs)


def read_delta(path, verify=True):
    """Read a deltasvd file; a LoRA file of another tool or an unknown codec is refused, and so
    is a file whose bytes, records, spectra or tensors do not hold together (delta_checks.py),
    each check before anything is computed from what it checks. `verify`: check the tensor
    data against the sha256 the file records (False skips the one hash of the data it costs)."""
    meta, codec, tensors, data_order = _read_file(path)
    if verify:   # hashed from the bytes just read (the tensors tile the data section exactly)
        _verify_hash(path, meta, lambda: data_sha256({k: tensors[k] for k in data_order}))
    check_finite(tensors, path)
    coded_extras = {}
    if codec != "svd":
        coded_extras = {k[len(EXTRAS_PREFIX):]: t for k, t in tensors.items()
                        if k.startswith(EXTRAS_PREFIX)}
        tensors = {k[len(CODED_PREFIX):]: t for k, t in tensors.items()
                   if not k.startswith(EXTRAS_PREFIX)}
    with _corrupt_metadata(path):
        records = [LayerRecord(**r) for r in json.loads(_unpack(meta["deltasvd.layers"],
                                                                "deltasvd.layers"))]
    check_records(records, path)
    with _corrupt_metadata(path):
        extras = (_load_extras(_unpack(meta["deltasvd.extras"], "deltasvd.extras"))
                  if "deltasvd.extras" in meta else {})
    check_finite(extras, path, lambda name: "deltasvd.extras:" + name)
    extras.update(coded_extras)
    info = {k[len("deltasvd."):]: v for k, v in meta.items() if k.startswith("deltasvd.")
            and k not in ("deltasvd.layers", "deltasvd.spectra", "deltasvd.extras",
                          "deltasvd.ranks")}
    delta = Delta(family=meta.get("deltasvd.family"), records=records, tensors=tensors,
                  extras=extras, spectra={}, info=info)
    delta.info["file"] = os.path.basename(os.fspath(path))
    check_parts(delta, path, tensor_names, CODED_PARTS)
    with _corrupt_metadata(path):
        delta.spectra = _decode_spectra(records, _unpack(meta["deltasvd.spectra"],
                                                         "deltasvd.spectra"))
    check_spectra(delta, path)
    return delta


def _read_file(path):
    """(metadata, codec, {file tensor name: tensor}, the names in the order of their bytes)
    of a deltasvd file."""
    with SafeTensorsFile(path) as f:
        meta = f.metadata
        if meta.get("deltasvd.format") != FORMAT:
            raise DeltaError("not a deltasvd delta file (no deltasvd.format in its metadata; a "
                             "plain LoRA is applied with the host's LoRA loader)", path)
        if meta.get("deltasvd.version") not in READ_VERSIONS:
            raise DeltaError(f"delta format version {meta.get('deltasvd.version')} is not "
                             f"supported by this deltasvd (reads versions "
                             f"{', '.join(READ_VERSIONS)}); update deltasvd", path)
        codec = meta.get("deltasvd.codec", "svd")
        if codec not in KNOWN_CODECS:
            raise DeltaError(f"unknown codec {codec!r}: this deltasvd reads "
                             f"{', '.join(KNOWN_CODECS)}; update deltasvd", path)
        tensors = {k: f.get(k) for k in f.keys()}
        data_order = sorted(tensors, key=lambda k: f.header[k]["data_offsets"])
    if codec != "svd":
        plain = [k for k in tensors if not k.startswith(CODED_PREFIX)]
        if plain:
            raise DeltaError(f"corrupt {codec} delta: tensor name without the "
                             f"{CODED_PREFIX!r} prefix", path, plain[0])
    return meta, codec, tensors, data_order


@contextmanager
def _corrupt_metadata(path):
    """Whatever a malformed metadata blob raises while decoded, as one DeltaError."""
    try:
        yield
    except (KeyError, ValueError, TypeError, AttributeError, RecursionError, zlib.error,
            binascii.Error) as e:
        raise DeltaError(f"corrupt deltasvd metadata ({str(e)[:200]})", path) from None


def _load_extras(raw):
    """The extras blob: a safetensors image, parsed by our own strict reader's rules."""
    try:
        return safetensors.torch.load(raw)
    except Exception as e:   # the library raises its own SafetensorError (not an OSError)
        raise ValueError(f"deltasvd.extras is not a safetensors image ({str(e)[:120]})") \
            from None


def _verify_hash(path, meta, data_hash):
    """The tensor-data sha256 the file records (sshs_model_hash, what A1111 shows as its
    hash) against `data_hash()`, that of its bytes: a flipped bit or an edited tensor is
    caught here."""
    want = meta.get("sshs_model_hash")
    if not want:
        return
    got = data_hash()
    if got != want:
        raise DeltaError(f"its tensor data does not match the sha256 it records "
                         f"(sshs_model_hash {want[:12]}…, the bytes give {got[:12]}…): the "
                         "file is damaged or was altered; download it again", path)


def _decode_spectra(records, raw):
    n_full = int.from_bytes(raw[:8], "little")
    full = np.frombuffer(raw[8: 8 + n_full], dtype=np.float16)
    head = np.frombuffer(raw[8 + n_full:], dtype=np.float64)
    spectra, fi, hi = {}, 0, 0
    for i, rec in enumerate(records):
        if rec.n:
            spectra[i] = (full[fi: fi + rec.spectrum_len], head[hi: hi + rec.rank])
            fi += rec.spectrum_len
            hi += rec.rank
    if fi != full.size or hi != head.size:
        raise ValueError("spectra do not match the layer records")
    return spectra


def file_size(delta, host_meta):
    """Exact size in bytes the file of `delta` will have (header included)."""
    from .safetensors_io import layout_header
    meta = encode_metadata(delta)
    meta.update(host_meta("0" * 64))
    tensors = file_tensors(delta)
    layout = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    return 8 + len(layout_header(layout, meta)) + data
