"""Opening a checkpoint: key normalisation, family detection, pair validation.

Every key is brought to the single-file LDM/SGM layout (`model.diffusion_model.*`,
`cond_stage_model.*`, `conditioner.embedders.N.*`, `first_stage_model.*`), so a UNet-only file
(bare `input_blocks.*` or `diffusion_model.*` keys) pairs with a full checkpoint.
"""

import os
import pickle

import torch

from .errors import DeltaError
from .safetensors_io import SafeTensorsFile

UNET = "model.diffusion_model."
FAMILIES = {
    "sd1": "Stable Diffusion 1.x",
    "sd2": "Stable Diffusion 2.x",
    "sdxl": "Stable Diffusion XL",
}
# ComfyUI / A1111 / kohya words for each family.
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
ARCHITECTURE = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512",
                "sdxl": "stable-diffusion-xl-v1-base"}
_UNET_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out.",
               "label_emb.")
_DIFFUSERS_HINTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.")


def is_ignored(key):
    """EMA copies are never part of the delta (the live weights are what gets sampled)."""
    return key.startswith("model_ema.") or key.endswith("num_updates") or \
        key.endswith("num_batches_tracked")


def canonical_key(key):
    """Map a key of any supported layout to the single-file checkpoint layout."""
    if key.startswith(UNET) or key.startswith(("cond_stage_model.", "conditioner.",
                                               "first_stage_model.", "model_ema.")):
        return key
    if key.startswith("diffusion_model."):
        return "model." + key
    if key.startswith(_UNET_ROOTS):
        return UNET + key
    return key


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


class Checkpoint:
    """A model file with canonical keys. `raw` is the underlying reader."""

    def __init__(self, path, allow_pickle=False):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise DeltaError("file not found", self.path)
        if self.path.lower().endswith((".ckpt", ".pt", ".pth", ".bin")):
            if not allow_pickle:
                raise DeltaError("legacy pickle checkpoint: pass --allow-pickle to read it "
                                 "(only tensors are loaded, weights_only=True)", self.path)
            self.raw = LegacyCheckpoint(self.path)
        else:
            self.raw = SafeTensorsFile(self.path)
        self.key_map = {}  # canonical -> raw
        for raw_key in self.raw.keys():
            self.key_map.setdefault(canonical_key(raw_key), raw_key)
        self._reject_diffusers_layout()
        self.family = detect_family(self)

    def _reject_diffusers_layout(self):
        keys = self.key_map
        if not any(k.startswith(UNET) for k in keys) and any(
                k.startswith(_DIFFUSERS_HINTS) for k in keys):
            raise DeltaError("looks like a diffusers-layout UNet; convert it to the single-file "
                             "(LDM) layout first", self.path)

    def keys(self):
        return list(self.key_map)

    def shape(self, key):
        return self.raw.shape(self.key_map[key])

    def dtype(self, key):
        return self.raw.dtype(self.key_map[key])

    def get(self, key):
        return self.raw.get(self.key_map[key])

    def close(self):
        self.raw.close()


def _context_dim(ckpt):
    for key in ckpt.keys():
        if key.startswith(UNET) and key.endswith("attn2.to_k.weight"):
            return ckpt.shape(key)[1]
    return None


def detect_family(ckpt):
    """Family from keys and shapes: cross-attention width first, text encoder layout second."""
    keys = ckpt.keys()
    ctx = _context_dim(ckpt)
    has_label = any(k.startswith(UNET + "label_emb.") for k in keys)
    if ctx == 768 and not has_label:
        return "sd1"
    if ctx == 1024 and not has_label:
        return "sd2"
    if ctx == 2048 and has_label:
        return "sdxl"
    if ctx is not None:
        raise DeltaError(f"unsupported model: cross-attention width {ctx}"
                         f"{' with a class embedding' if has_label else ''} is none of "
                         "SD1.x (768), SD2.x (1024), SDXL (2048)", ckpt.path)
    # No UNet: a text-encoder-only or VAE-only file still has a recognisable layout.
    if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    raise DeltaError("not a Stable Diffusion checkpoint: no UNet or text-encoder keys found",
                     ckpt.path)


def open_pair(base_path, tuned_path, allow_pickle=False):
    """Open base and tuned, check they are one family with matching shapes."""
    base = Checkpoint(base_path, allow_pickle)
    tuned = Checkpoint(tuned_path, allow_pickle)
    check_pair(base, tuned)
    return base, tuned


def check_pair(base, tuned):
    """One family, and the same shape for every key both hold (EMA copies aside)."""
    if base.family != tuned.family:
        raise DeltaError(f"family mismatch: base is {FAMILIES[base.family]}, tuned is "
                         f"{FAMILIES[tuned.family]}", tuned.path)
    for key in tuned.keys():
        if key in base.key_map and not is_ignored(key) and base.shape(key) != tuned.shape(key):
            raise DeltaError(f"shape mismatch: base {list(base.shape(key))}, tuned "
                             f"{list(tuned.shape(key))}", tuned.path, key)
