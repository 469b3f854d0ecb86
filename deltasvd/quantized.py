"""Quantized (fp8) checkpoints: which tensors are scales, the real weights, and rounding a base
to the format a fine-tune is stored in (host-free: torch and the standard library only).

A fine-tune shared as fp8 must be compared with its base *in that format*: subtracting the
full-precision base would add the fp8 rounding error of every weight to the delta. So the base is
first rounded the way the fine-tune's file was (`quantize_like`) and the tuned weights are read
as the numbers ComfyUI computes with (`dequantize`).

The formats, as ComfyUI reads them:

* plain: any float dtype, fp8 included (`F8_E4M3`, `F8_E5M2`); the real weight is the value.
* "scaled_fp8_legacy" (comfy/model_detection.py, comfy/ops.py `scaled_fp8_ops`): a marker tensor
  `<prefix>scaled_fp8` (`model.diffusion_model.scaled_fp8` in a checkpoint, bare `scaled_fp8` in a
  diffusion-model file, `text_encoders.t5xxl.transformer.scaled_fp8` for a text encoder), empty
  (shape [0]) or of 2 elements (2: "full precision matrix mult"); its dtype names the fp8 format
  (float32 means e4m3fn). Each scaled Linear under the prefix has `<module>.scale_weight` (float32
  scalar, shape [] or [1]) and maybe `<module>.scale_input` (activation scale); the real weight
  is weight.float() * scale_weight. Biases are not scaled.
* "comfy_quant" (newer ComfyUI, comfy/ops.py `_load_quantized_module`): per layer a
  `<module>.comfy_quant` uint8 tensor holding the UTF-8 bytes of json.dumps(config), e.g.
  {"format": "float8_e4m3fn"} with an optional "full_precision_matrix_mult": true, next to
  `<module>.weight_scale` (float32 scalar) and maybe `<module>.input_scale`. ComfyUI 0.3.75 keeps
  the same per-layer configs in the header instead, `__metadata__["_quantization_metadata"]` =
  json {"format_version": "1.0", "layers": {"<module>": {"format": ...}}} (module names relative to
  the diffusion model); `scale_keys(..., metadata=)` reads both as "comfy_quant".
"""

import json
import math
from dataclasses import dataclass, field

import torch

from .errors import DeltaError

PLAIN = "plain"
LEGACY = "scaled_fp8_legacy"
COMFY_QUANT = "comfy_quant"

MARKER = "scaled_fp8"
METADATA_KEY = "_quantization_metadata"
# Per-layer tensors that are never weights: scales of weights and of activations, and configs.
LEGACY_SUFFIXES = ("scale_weight", "scale_input")
COMFY_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale", "comfy_quant")
WEIGHT_SCALE_SUFFIXES = ("scale_weight", "weight_scale", "weight_scale_2")
# Activation scales: hidden only in a file that is quantized at all (a plain model could, in
# principle, name a parameter so); never reported as orphans (weights do not need them).
ACTIVATION_SUFFIXES = ("scale_input", "input_scale", "pre_quant_scale")

FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
# Layouts newer ComfyUI knows but this module cannot decode (block scales, packed integers).
UNSUPPORTED_FORMATS = ("nvfp4", "mxfp8", "int8_tensorwise", "convrot_w4a4", "svdquant_w4a4",
                       "awq_w4a16")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

@dataclass(frozen=True)
class QuantConfig:
    """One layer's parsed quantization config: its layout name, fp8 storage dtype and flags."""
    format: str
    dtype: torch.dtype
    full_precision_matrix_mult: bool = False


@dataclass
class QuantLayout:
    """What a file's keys say about quantization.

    hidden: keys that are not model weights (markers, scales, configs): never compress them.
    weight_scale: {weight key: its scale key}, for scaled weights only.
    scheme: {weight key: LEGACY or COMFY_QUANT}; a weight not in it is PLAIN.
    config_key: {weight key: its `<module>.comfy_quant` key}, a tensor to `parse_comfy_quant`.
    config: {weight key: QuantConfig}: from a legacy marker's dtype (when given), from header
        metadata, and (file_layout only) from each parsed comfy_quant tensor.
    orphans: hidden scale/config keys no weight uses the way ComfyUI loads them (a scale without
        its marker or config is ignored by ComfyUI, so its weight stays plain): worth a warning.
    """
    hidden: frozenset = frozenset()
    weight_scale: dict = field(default_factory=dict)
    scheme: dict = field(default_factory=dict)
    config_key: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    orphans: tuple = ()

    def scheme_of(self, key):
        """The scheme of a weight key (PLAIN when it is not scaled)."""
        return self.scheme.get(key, PLAIN)

    def scale_of(self, key):
        """The scale key of a weight key, or None."""
        return self.weight_scale.get(key)


def mantissa_bits(dtype):
    """Explicit mantissa bits of a float dtype (52, 23, 10, bf16 7, e4m3 3, e5m2 2): how finely
    it stores a value near 1, read from torch.finfo's eps = 2^-bits."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise DeltaError(f"{dtype} is not a floating-point weight dtype")
    return round(-math.log2(torch.finfo(dtype).eps))


def coarser(a, b):
    """True when dtype a stores fewer mantissa bits than b (rounding to a loses more)."""
    return mantissa_bits(a) < mantissa_bits(b)


def marker_format(dtype):
    """The fp8 dtype a legacy `scaled_fp8` marker of this dtype names (ComfyUI: float32 means
    e4m3fn, the marker of a file written before the dtype carried the format)."""
    if dtype == torch.float32:
        return torch.float8_e4m3fn
    if dtype in FP8_DTYPES:
        return dtype
    raise DeltaError(f"scaled_fp8 marker of dtype {dtype} names no fp8 format")


def _module(key, suffix):
    """`a.b` for `a.b.<suffix>`, None for other keys."""
    tail = "." + suffix
    return key[:-len(tail)] if key.endswith(tail) else None


def _markers(keys):
    """{marker key: prefix it covers}: `scaled_fp8` alone or as the last name of a key."""
    return {k: k[:-len(MARKER)] for k in keys
            if k == MARKER or k.endswith("." + MARKER)}


def _per_layer_keys(keys, suffixes):
    """{key: (module, suffix)} for keys `<module>.<suffix>` with suffix in suffixes."""
    out = {}
    for k in keys:
        for s in suffixes:
            m = _module(k, s)
            if m is not None:
                out[k] = (m, s)
                break
    return out


def _legacy(keys, markers, marker_info, layout):
    """Fill layout with the legacy weights: `scale_weight` under a marker's prefix (ComfyUI
    only swaps in its scaled ops where the marker is; elsewhere the scale is ignored)."""
    for k, (m, s) in _per_layer_keys(keys, ("scale_weight",)).items():
        weight = m + ".weight"
        covering = [mk for mk, p in markers.items() if k.startswith(p)]
        marker = max(covering, key=lambda mk: len(markers[mk]), default=None)
        if weight not in keys or marker is None:
            continue
        layout.weight_scale[weight] = k
        layout.scheme[weight] = LEGACY
        if marker in marker_info:
            layout.config[weight] = marker_info[marker]


def _marker_info(markers, dtypes, shapes):
    """{marker key: QuantConfig} for the markers whose dtype is known; a 2-element marker means
    "full precision matrix mult" (comfy/model_detection.py)."""
    out = {}
    for mk in markers:
        if dtypes is not None and mk in dtypes:
            fmt = marker_format(dtypes[mk])
            name = next(n for n, d in FP8_FORMATS.items() if d == fmt)
            numel = None
            if shapes is not None and mk in shapes:
                numel = 1
                for d in shapes[mk]:
                    numel *= int(d)
            out[mk] = QuantConfig(name, fmt, numel == 2)
    return out


def _comfy(keys, metadata_layers, layout, path):
    """Fill layout with the comfy_quant weights: a `comfy_quant` tensor or a header entry."""
    for k, (m, s) in _per_layer_keys(keys, COMFY_SUFFIXES).items():
        weight = m + ".weight"
        if s == "comfy_quant" and weight in keys:
            layout.config_key[weight] = k
            layout.scheme[weight] = COMFY_QUANT
    by_name = _weights_by_name(keys) if metadata_layers else {}
    for name, conf in metadata_layers.items():
        weight = _metadata_weight(keys, by_name, name, path)
        if weight is not None and weight not in layout.config_key:
            layout.scheme[weight] = COMFY_QUANT
            layout.config[weight] = _config(conf, path, METADATA_KEY, name)
    for weight in list(layout.scheme):
        if layout.scheme[weight] == COMFY_QUANT:
            scale = weight[:-len("weight")] + "weight_scale"
            if scale in keys:
                layout.weight_scale[weight] = scale


def _weights_by_name(keys):
    """{module name: [weight keys]} under every dotted suffix of each `<module>.weight` key, so
    a layer name relative to any prefix finds its weight in one look-up."""
    out = {}
    for k in keys:
        if k.endswith(".weight"):
            parts = k[:-len(".weight")].split(".")
            for i in range(len(parts)):
                out.setdefault(".".join(parts[i:]), []).append(k)
    return out


def _metadata_weight(keys, by_name, name, path):
    """The weight key of a header layer name: `<name>.weight`, or the one key ending
    `.<name>.weight` (0.3.75 names layers relative to the diffusion model's prefix)."""
    if name + ".weight" in keys:
        return name + ".weight"
    found = by_name.get(name, [])
    if len(found) > 1:
        raise DeltaError(f"quantization metadata layer '{name}' matches {len(found)} weights "
                         f"({', '.join(sorted(found)[:2])}, ...)", path, METADATA_KEY)
    return found[0] if found else None


def metadata_layers(metadata, path=None):
    """{layer name: config} from a header's `_quantization_metadata` (ComfyUI 0.3.75), {} when
    there is none; DeltaError when it is not the JSON ComfyUI reads."""
    raw = (metadata or {}).get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        data = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DeltaError(f"quantization metadata is not JSON ({e})", path, METADATA_KEY) from None
    if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
        raise DeltaError("quantization metadata has no 'layers' object", path, METADATA_KEY)
    return data["layers"]


def scale_keys(keys, dtypes=None, metadata=None, path=None, shapes=None):
    """Sort a file's raw keys into weights, their scales and non-weight tensors.

    keys: every key of the file. dtypes / shapes: {key: torch dtype} / {key: shape}, optional;
    for a legacy marker they give its weights' QuantConfig. metadata: the header's
    `__metadata__` dict, for ComfyUI 0.3.75's `_quantization_metadata`. Returns a QuantLayout;
    a file with none of these gives an empty one (everything plain, nothing hidden)."""
    keys = set(keys)
    markers = _markers(keys)
    layout = QuantLayout()
    _legacy(keys, markers, _marker_info(markers, dtypes, shapes), layout)
    layers = metadata_layers(metadata, path)
    _comfy(keys, layers, layout, path)
    per_layer = _per_layer_keys(keys, LEGACY_SUFFIXES + COMFY_SUFFIXES)
    quantized = bool(markers or layers or any(s in WEIGHT_SCALE_SUFFIXES or s == "comfy_quant"
                                              for _, s in per_layer.values()))
    hidden = {k for k, (_, s) in per_layer.items()
              if quantized or s in WEIGHT_SCALE_SUFFIXES or s == "comfy_quant"}
    hidden |= set(markers)
    used = set(layout.weight_scale.values()) | set(layout.config_key.values()) | set(markers)
    layout.hidden = frozenset(hidden)
    layout.orphans = tuple(sorted(k for k in hidden - used
                                  if per_layer[k][1] not in ACTIVATION_SUFFIXES))
    return layout


def file_layout(f):
    """QuantLayout of an open file (`keys()`, `dtype(k)`, `shape(k)`, `get(k)`, `metadata`,
    `path`, as safetensors_io.SafeTensorsFile has), every comfy_quant config read and parsed."""
    keys = f.keys()
    markers = _markers(keys)
    path = getattr(f, "path", None)
    layout = scale_keys(keys, {k: f.dtype(k) for k in markers}, getattr(f, "metadata", None),
                        path, {k: f.shape(k) for k in markers})
    for weight, key in layout.config_key.items():
        layout.config[weight] = parse_comfy_quant(f.get(key), path, key)
    return layout


def parse_comfy_quant(raw, path=None, key=None):
    """The QuantConfig in a `<module>.comfy_quant` tensor: uint8 bytes of a JSON object, as
    ComfyUI writes it (torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)).
    Also takes the bytes or str themselves. DeltaError names the key on anything else."""
    if isinstance(raw, torch.Tensor):
        if raw.dtype != torch.uint8:
            raise DeltaError(f"comfy_quant config must be uint8 bytes, not {raw.dtype}", path, key)
        raw = raw.contiguous().numpy().tobytes()
    try:
        conf = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise DeltaError(f"comfy_quant config is not JSON ({e})", path, key) from None
    return _config(conf, path, key)


def _config(conf, path, key, layer=None):
    """A QuantConfig from a parsed config object (a dict with "format"; a bare format string is
    accepted too, as in ComfyUI's QUANTIZATION.md example)."""
    where = f"layer '{layer}': " if layer else ""
    if isinstance(conf, str):
        conf = {"format": conf}
    if not isinstance(conf, dict):
        raise DeltaError(f"{where}quantization config is not a JSON object", path, key)
    fmt = conf.get("format")
    if not isinstance(fmt, str):
        raise DeltaError(f"{where}quantization config has no 'format' string", path, key)
    if fmt in UNSUPPORTED_FORMATS:
        raise DeltaError(f"{where}quantization layout '{fmt}' is not supported (only "
                         f"{', '.join(FP8_FORMATS)})", path, key)
    if fmt not in FP8_FORMATS:
        raise DeltaError(f"{where}unknown quantization layout '{fmt}'", path, key)
    fpmm = conf.get("full_precision_matrix_mult", False)
    if not isinstance(fpmm, bool):
        raise DeltaError(f"{where}'full_precision_matrix_mult' must be true or false", path, key)
    return QuantConfig(fmt, FP8_FORMATS[fmt], fpmm)


def broadcast_scale(scale, shape, path=None, key=None):
    """The scale as float32, shaped to multiply a weight of `shape`: a scalar (shape [] or [1],
    what ComfyUI writes) or one value per output row ([rows] or [rows, 1, ...]). ComfyUI's fp8
    layouts only use scalars; per-row is read as rows, the convention of row-wise fp8 tools."""
    s = scale.to(torch.float32)
    if s.numel() == 1:
        return s.reshape(())
    rows = shape[0] if len(shape) else None
    if s.numel() == rows and (s.ndim == 1 or s.shape[0] == rows):
        return s.reshape((rows,) + (1,) * (len(shape) - 1))
    raise DeltaError(f"scale of shape {list(scale.shape)} is neither a scalar nor one per row "
                     f"of the weight's {list(shape)}", path, key)


def dequantize(weight, scale=None, path=None, key=None):
    """The real float32 weight ComfyUI computes with: weight.float() * scale (float32 product,
    as comfy/ops.py's scaled_fp8 convert_weight); weight.float() when there is no scale."""
    w = weight.to(torch.float32)
    if scale is None:
        return w
    return w * broadcast_scale(scale, tuple(weight.shape), path, key)


def store_like(real, dtype, scale=None, path=None, key=None):
    """`real` (any float tensor) as a tensor of `dtype` stored with `scale`: what a file of that
    format holds for it (apply writes this into an fp8 or scaled-fp8 base).

    fp8: as ComfyUI quantizes (quant_ops / comfy_kitchen): x = real * (1 / scale) in float32,
    clamped to +-finfo(dtype).max (fp8 casts overflow to NaN/inf otherwise), cast to fp8 with
    round-to-nearest-even. A zero scale can only hold 0. Other dtypes: real.to(dtype), divided
    by the scale when there is one."""
    w = real.to(torch.float32)
    s = None if scale is None else broadcast_scale(scale, tuple(w.shape), path, key)
    if s is not None:
        inv = torch.where(s == 0, torch.zeros_like(s), 1.0 / s)
        w = w * inv
    if dtype in FP8_DTYPES:
        top = torch.finfo(dtype).max
        w = w.clamp(-top, top)
    elif not dtype.is_floating_point:
        raise DeltaError(f"cannot round to {dtype}: not a floating-point weight dtype", path, key)
    return w.to(dtype)


def quantize_like(real, dtype, scale=None, path=None, key=None):
    """`real` rounded to what a tensor of `dtype` (with `scale`) can hold, as float32: a base
    compared with an fp8 fine-tune in the fine-tune's own format (see store_like)."""
    return dequantize(store_like(real, dtype, scale, path, key), scale, path, key)


def real_weight(weight, scale=None, config=None, path=None, key=None):
    """The real float32 weight of a stored tensor as ComfyUI loads it: cast to the config's
    storage dtype first when there is a config (ComfyUI value-casts into its fp8 parameter, so a
    bf16 tensor under an fp8 config is rounded to fp8), then dequantized."""
    if config is not None and weight.dtype != config.dtype:
        weight = weight.to(torch.float32).to(config.dtype)
    return dequantize(weight, scale, path, key)
