"""The delta file: a LoRA-format .safetensors plus deltasvd's own metadata.

Tensors (kohya names, see lora_names.py):
  {m}.lora_up.weight (d x t [x1x1]), {m}.lora_down.weight (t x in [x kh x kw]), {m}.alpha = t
  {m}.diff   a dense delta, where factors would be no smaller
  {m}.diff_b a bias delta;  {m}.w_norm + {m}.b_norm  a norm layer's delta (always both)
Header metadata (strings; stock loaders ignore it):
  deltasvd.format / .version / .codec / .family / .mode / .value / .dtype / fingerprints
  deltasvd.ranks    JSON {module: rank}
  deltasvd.layers   base64(zlib(JSON)) one record per stored piece (see LayerRecord)
  deltasvd.spectra  base64(zlib(float16 full spectra, then float64 heads s[:rank]))
  deltasvd.extras   base64(zlib(safetensors bytes)) deltas of tensors no stock loader maps
  ss_* / modelspec.* / sshs_model_hash  what A1111 and Civitai read
"""

import base64
import json
import os
import zlib
from dataclasses import dataclass, field, fields

import numpy as np
import safetensors.torch
import torch

from .errors import DeltaError
from .safetensors_io import SafeTensorsFile, write_tensors

FORMAT = "deltasvd"
VERSION = "1"
KNOWN_CODECS = ("svd",)
STORAGE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class LayerRecord:
    """One stored piece: a checkpoint tensor (or rows of it) and how it is coded."""
    name: str                 # LoRA module name, or the checkpoint key for extras
    key: str                  # checkpoint key it patches
    shape: list               # shape of the patched tensor (or its rows)
    kind: str                 # "svd" | "dense" | "exact"
    param: str = "weight"     # "weight" or "bias"
    rows: list = None         # [start, stop] within the checkpoint tensor (split q/k/v)
    norm: bool = False        # a norm layer (stored as w_norm / b_norm)
    extra: bool = False       # stored in the extras blob, not as a LoRA tensor
    rank: int = 0
    n: int = 0                # length of the full spectrum (min(d, k)); 0 for exact
    sum_s: float = 0.0        # float64 totals of the full spectrum, for exact resizing
    sum_s2: float = 0.0
    err2: float = 0.0         # squared residual after storage rounding
    norm2: float = 0.0        # squared Frobenius norm of the delta
    precision: str = ""       # what decided the rank: gram64 or svd64 (spectrum.py)

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


_RECORD_FIELDS = [f.name for f in fields(LayerRecord)]


def tensor_names(rec):
    """File tensor names of a record's parts."""
    if rec.extra:
        base = rec.key if rec.rows is None else f"{rec.key}[{rec.rows[0]}:{rec.rows[1]}]"
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


def lora_parts(rec, a, b):
    """Shape factors the way both hosts expect: conv down t x in x kh x kw, up out x t x 1 x 1."""
    t = a.shape[1]
    if len(rec.shape) == 4:
        a = a.reshape(a.shape[0], t, 1, 1)
        b = b.reshape(t, *rec.shape[1:])
    return {"up": a.contiguous(), "down": b.contiguous(),
            "alpha": torch.tensor(float(t), dtype=torch.float32)}


def reconstruct(rec, parts):
    """The float32 delta of one record, in the shape of what it patches."""
    if rec.kind == "svd":
        up, down = parts["up"].float(), parts["down"].float()
        return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(rec.shape)
    return parts["diff"].float().reshape(rec.shape)


def _pack(array_bytes):
    return base64.b64encode(zlib.compress(array_bytes, 9)).decode("ascii")


def _unpack(text):
    return zlib.decompress(base64.b64decode(text))


def _record_dict(rec):
    """The record's fields in order; shallow, unlike dataclasses.asdict, whose deep copy took
    most of the time of sizing a file (the explorer sizes one per slider move)."""
    return {name: getattr(rec, name) for name in _RECORD_FIELDS}


def encode_metadata(delta):
    """The deltasvd.* metadata of a Delta (without the host-facing ss_/modelspec keys)."""
    full, head = [], []
    for i, rec in enumerate(delta.records):
        if i in delta.spectra:
            full.append(np.asarray(delta.spectra[i][0], dtype=np.float16))
            head.append(np.asarray(delta.spectra[i][1][: rec.rank], dtype=np.float64))
    full_b = np.concatenate(full).tobytes() if full else b""
    head_b = np.concatenate(head).tobytes() if head else b""
    meta = {f"deltasvd.{k}": str(v) for k, v in delta.info.items()}
    meta.update({
        "deltasvd.format": FORMAT,
        "deltasvd.version": VERSION,
        "deltasvd.family": delta.family,
        "deltasvd.ranks": json.dumps({r.name: r.rank for r in delta.records
                                      if r.kind == "svd" and not r.extra}, separators=(",", ":")),
        "deltasvd.layers": _pack(json.dumps([_record_dict(r) for r in delta.records],
                                            separators=(",", ":")).encode()),
        "deltasvd.spectra": _pack(len(full_b).to_bytes(8, "little") + full_b + head_b),
    })
    if delta.extras:
        meta["deltasvd.extras"] = _pack(safetensors.torch.save(delta.extras))
    return meta


def write_delta(path, delta, host_metadata_fn, overwrite=False, inputs=()):
    """Write atomically. `host_metadata_fn(data_sha256)` adds ss_*/modelspec.* keys."""
    meta = encode_metadata(delta)

    def metadata(data_hash):
        m = dict(meta)
        m.update(host_metadata_fn(data_hash))
        return m

    write_tensors(path, delta.tensors, metadata_fn=metadata, overwrite=overwrite, inputs=inputs)


def read_delta(path):
    """Read a deltasvd file; a LoRA file of another tool or an unknown codec is refused."""
    with SafeTensorsFile(path) as f:
        meta = f.metadata
        if meta.get("deltasvd.format") != FORMAT:
            raise DeltaError("not a deltasvd delta file (no deltasvd.format in its metadata; a "
                             "plain LoRA is applied with the host's LoRA loader)", path)
        if meta.get("deltasvd.version") != VERSION:
            raise DeltaError(f"delta format version {meta.get('deltasvd.version')} is not "
                             f"supported by this deltasvd (reads version {VERSION})", path)
        codec = meta.get("deltasvd.codec", "svd")
        if codec not in KNOWN_CODECS:
            raise DeltaError(f"unknown codec {codec!r}: this deltasvd reads "
                             f"{', '.join(KNOWN_CODECS)}; update deltasvd", path)
        tensors = {k: f.get(k) for k in f.keys()}
    try:
        records = [LayerRecord(**r) for r in json.loads(_unpack(meta["deltasvd.layers"]))]
        spectra = _decode_spectra(records, _unpack(meta["deltasvd.spectra"]))
        extras = (safetensors.torch.load(_unpack(meta["deltasvd.extras"]))
                  if "deltasvd.extras" in meta else {})
    except (KeyError, ValueError, TypeError, zlib.error) as e:
        raise DeltaError(f"corrupt deltasvd metadata ({e})", path) from None
    info = {k[len("deltasvd."):]: v for k, v in meta.items() if k.startswith("deltasvd.")
            and k not in ("deltasvd.layers", "deltasvd.spectra", "deltasvd.extras",
                          "deltasvd.ranks")}
    delta = Delta(family=meta.get("deltasvd.family"), records=records, tensors=tensors,
                  extras=extras, spectra=spectra, info=info)
    delta.info["file"] = os.path.basename(os.fspath(path))
    _check_complete(delta, path)
    return delta


def _decode_spectra(records, raw):
    n_full = int.from_bytes(raw[:8], "little")
    full = np.frombuffer(raw[8: 8 + n_full], dtype=np.float16)
    head = np.frombuffer(raw[8 + n_full:], dtype=np.float64)
    spectra, fi, hi = {}, 0, 0
    for i, rec in enumerate(records):
        if rec.n:
            spectra[i] = (full[fi: fi + rec.n], head[hi: hi + rec.rank])
            fi += rec.n
            hi += rec.rank
    if fi != full.size or hi != head.size:
        raise ValueError("spectra do not match the layer records")
    return spectra


def _check_complete(delta, path):
    for rec in delta.records:
        names = tensor_names(rec)
        src = delta.extras if rec.extra else delta.tensors
        for name in names.values():
            if name not in src:
                raise DeltaError("corrupt delta: a recorded tensor is missing", path, name)


def file_size(delta, host_meta):
    """Exact size in bytes the file of `delta` will have (header included)."""
    from .safetensors_io import layout_header
    meta = encode_metadata(delta)
    meta.update(host_meta("0" * 64))
    layout = [(k, t.dtype, tuple(t.shape)) for k, t in delta.tensors.items()]
    data = sum(t.numel() * t.element_size() for t in delta.tensors.values())
    return 8 + len(layout_header(layout, meta)) + data
