"""Opening a checkpoint: key layouts, family detection, pair validation.

Every file's keys are brought to one canonical layout, so files of different layouts pair:
- SD: the single-file LDM/SGM layout (`model.diffusion_model.*`, `cond_stage_model.*`,
  `conditioner.embedders.N.*`, `first_stage_model.*`); a UNet-only file (bare `input_blocks.*`
  or `diffusion_model.*` keys) gains the prefix;
- every other family: ComfyUI's all-in-one layout (`model.diffusion_model.*`,
  `text_encoders.*`, `vae.*`); a diffusion-model-only file (bare keys, what ComfyUI's "Load
  Diffusion Model" reads) gains the `model.diffusion_model.` prefix.
The family then comes from the canonical keys (`families.detect`).
"""

import os
import pickle
from dataclasses import dataclass

import torch

from . import families, quantized
from .errors import DeltaError
from .safetensors_io import SafeTensorsFile, open_input

UNET = families.UNET
# A key under one of these names its part of the model; a file none of whose keys does is a
# bare diffusion model.
_TOP_LEVEL = ("model.", "diffusion_model.", "cond_stage_model.", "conditioner.",
              "first_stage_model.", "text_encoders.", "vae.", "model_ema.")
_UNET_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out.",
               "label_emb.")
_DIFFUSERS_HINTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.")
_DIFFUSERS_DIT_HINTS = ("single_transformer_blocks.", "unet.")
_PIPELINE = "transformer."   # a diffusers pipeline's prefix of its transformer's keys


def is_ignored(key):
    """EMA copies are never part of the delta (the live weights are what gets sampled)."""
    return key.startswith("model_ema.") or key.endswith("num_updates") or \
        key.endswith("num_batches_tracked")


def canonical_key(key, bare=False):
    """Map a key of any supported layout to the canonical one. `bare`: the file holds a
    diffusion model alone, under its own key names."""
    if bare:
        return UNET + key
    if key.startswith(UNET) or key.startswith(_TOP_LEVEL[2:]):
        return key
    if key.startswith("diffusion_model."):
        return "model." + key
    if key.startswith(_UNET_ROOTS):
        return UNET + key
    return key


def canonical_keys(raw_keys):
    """{canonical key: raw key} of a file's keys (the first raw key wins a clash). A diffusers
    pipeline's `transformer.` prefix is dropped (Qwen-Image's and HiDream's diffusers names are
    ComfyUI's own)."""
    strip = len(pipeline_prefix(raw_keys))
    bare = not any(k[strip:].startswith(_TOP_LEVEL) for k in raw_keys)
    key_map = {}
    for raw in raw_keys:
        key_map.setdefault(canonical_key(raw[strip:], bare), raw)
    return key_map


def pipeline_prefix(raw_keys):
    """`transformer.` when every key carries a diffusers pipeline's prefix, else ''."""
    return _PIPELINE if raw_keys and all(k.startswith(_PIPELINE) for k in raw_keys) else ""


class LegacyCheckpoint:
    """A .ckpt / .pt read only through torch.load(weights_only=True): no pickle code runs."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.metadata = {}
        try:
            obj = self._load()
        except pickle.UnpicklingError as e:
            raise DeltaError(
                "refused: this pickle needs code to run to load, which could do anything "
                f"({str(e).splitlines()[0][:160]}). Convert it to .safetensors with a tool "
                "you trust, or use the safetensors release of the model", self.path) from None
        except Exception as e:
            raise DeltaError(f"cannot be read as a torch checkpoint ({e})", self.path) from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise DeltaError("holds no state dict", self.path)
        self._sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}

    def _load(self):
        try:  # zip-format files map lazily; old plain pickles cannot be mapped
            return torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(self.path, map_location="cpu", weights_only=True)

    def keys(self):
        return list(self._sd)

    def shape(self, key):
        return tuple(self._sd[key].shape)

    def dtype(self, key):
        return self._sd[key].dtype

    def nbytes(self, key):
        t = self._sd[key]
        return t.numel() * t.element_size()

    def get(self, key):
        return self._sd[key].contiguous()

    def close(self):
        self._sd = {}


@dataclass(frozen=True)
class Fused:
    """A canonical tensor made of diffusers tensors: concatenated along the rows, then, for
    `swap`, its two halves exchanged (diffusers' scale, shift vs BFL's shift, scale)."""
    parts: tuple
    swap: bool = False

    def join(self, tensors):
        t = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
        if self.swap:
            half = t.shape[0] // 2
            t = torch.cat([t[half:], t[:half]])
        return t


class Checkpoint:
    """A model file with canonical keys. `raw` is the underlying reader."""

    def __init__(self, path, allow_pickle=False):
        self.path = os.fspath(path)
        open_input(self.path).close()   # exists, readable, a regular file (not a FIFO)
        if self.path.lower().endswith((".ckpt", ".pt", ".pth", ".bin")):
            if not allow_pickle:
                raise DeltaError("legacy pickle checkpoint: pass --allow-pickle to read it "
                                 "(only tensors are loaded, weights_only=True)", self.path)
            self.raw = LegacyCheckpoint(self.path)
        else:
            self.raw = SafeTensorsFile(self.path)
        # Scaled-fp8 scales, markers and configs describe weights; they are not weights.
        self.quant = quantized.file_layout(self.raw) if isinstance(self.raw, SafeTensorsFile) \
            else quantized.QuantLayout()
        visible = [k for k in self.raw.keys() if k not in self.quant.hidden]
        self.fused = self._diffusers_layout(visible)     # canonical -> Fused
        if self.fused:
            self.key_map = {k: self.fused[k].parts[0] for k in sorted(self.fused)}
        else:
            self.key_map = canonical_keys(visible)  # canonical -> raw
        self.family = detect_family(self)

    def _diffusers_layout(self, raw):
        """{canonical key: Fused} of a diffusers-layout diffusion model a family converts
        (Flux), {} for any other layout; other diffusers layouts are refused."""
        if any(k.startswith(UNET) or k.startswith(_UNET_ROOTS) for k in raw):
            return {}
        prefix = pipeline_prefix(raw)
        bare = [k[len(prefix):] for k in raw]
        for fam in families.REGISTRY:
            conversion = fam.from_diffusers(bare)
            if conversion:
                return self._fused(conversion, prefix, set(bare))
        if any(k.startswith(_DIFFUSERS_HINTS) or k.startswith(_DIFFUSERS_DIT_HINTS)
               for k in bare):
            raise DeltaError("looks like a diffusers-layout model of a family deltasvd cannot "
                             "convert yet; save it in the single-file layout ComfyUI saves "
                             "first", self.path)
        return {}

    def _fused(self, conversion, prefix, keys):
        unused = keys - {p for parts, _ in conversion.values() for p in parts}
        if unused:
            raise DeltaError("a diffusers-layout tensor that ComfyUI's conversion does not "
                             "map", self.path, prefix + sorted(unused)[0])
        out, present = {}, set(self.raw.keys())
        for key, (parts, swap) in conversion.items():
            raws = tuple(prefix + p for p in parts)
            missing = [r for r in raws if r not in present]
            if missing:
                raise DeltaError(f"{UNET + key} is fused from {len(raws)} diffusers tensors; "
                                 "this one is missing", self.path, missing[0])
            if any(r in self.quant.scheme for r in raws):
                raise DeltaError("scaled fp8 in the diffusers layout is not supported",
                                 self.path, raws[0])
            out[UNET + key] = Fused(raws, swap)
        return out

    def keys(self):
        return list(self.key_map)

    def shape(self, key):
        fused = self.fused.get(key)
        if fused is None:
            return self.raw.shape(self.key_map[key])
        shapes = [self.raw.shape(p) for p in fused.parts]
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def dtype(self, key):
        """The dtype the weight is stored in (a scaled fp8 weight's fp8 format)."""
        raw = self.key_map[key]
        config = self.quant.config.get(raw)
        return config.dtype if config is not None else self.raw.dtype(raw)

    def scale(self, key):
        """The scale a scaled-fp8 weight is stored with (None for any other tensor)."""
        scale_key = self.quant.scale_of(self.key_map[key])
        return None if scale_key is None else self.raw.get(scale_key)

    def get(self, key):
        """The tensor as stored; a scaled-fp8 weight as its real float32 values; a fused
        diffusers tensor put together as ComfyUI does."""
        if key in self.fused:
            return self.fused[key].join([self.raw.get(p) for p in self.fused[key].parts])
        raw = self.key_map[key]
        if raw not in self.quant.scheme:
            return self.raw.get(raw)
        return quantized.real_weight(self.raw.get(raw), self.scale(key),
                                     self.quant.config.get(raw), self.path, key)

    def close(self):
        self.raw.close()


def detect_family(ckpt):
    """The family's name, from canonical keys and shapes (families/: most specific first)."""
    return families.detect(ckpt).name


def open_pair(base_path, tuned_path, allow_pickle=False):
    """Open base and tuned, check they are one family with matching shapes."""
    base = Checkpoint(base_path, allow_pickle)
    tuned = Checkpoint(tuned_path, allow_pickle)
    check_pair(base, tuned)
    return base, tuned


def check_pair(base, tuned):
    """One family, and the same shape for every key both hold (EMA copies aside)."""
    if base.family != tuned.family:
        raise DeltaError(f"family mismatch: base is {families.title(base.family)}, tuned is "
                         f"{families.title(tuned.family)}", tuned.path)
    for key in tuned.keys():
        if key in base.key_map and not is_ignored(key) and base.shape(key) != tuned.shape(key):
            raise DeltaError(f"shape mismatch: base {list(base.shape(key))}, tuned "
                             f"{list(tuned.shape(key))}", tuned.path, key)
