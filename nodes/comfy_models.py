"""ComfyUI's loaded MODEL / CLIP seen as checkpoints, and deltas turned into ComfyUI patches.

* `model_source(model, clip)`: a `deltasvd.sources.TensorSource` over the weights ComfyUI holds,
  under the single-file checkpoint keys the core works with. The key layout comes from the
  model config's own `process_unet_state_dict_for_saving` / `process_clip_state_dict_for_saving`
  (what `comfy.sd.save_checkpoint` writes), run once on meta tensors to learn the mapping; no
  weight is read until the compressor asks for it. A weight with patches on this MODEL/CLIP
  (a LoRA applied upstream, say) is read as ComfyUI would compute it, in float32.
* `release(patchers)`: unload, with ComfyUI's own calls, whatever shares weights with them, so
  the weights read are the unpatched originals and memory is free for the math.
* `delta_patches(...)`: the delta's LoRA tensors through `comfy.lora.load_lora` with the key map
  `comfy.sd.load_lora_for_models` builds (so the host rebuilds each weight itself when it loads
  the model), plus "diff" patches for the extras that map onto the model.
"""

import gc

import torch

import comfy.lora
import comfy.lora_convert
import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils

from ..deltasvd import families
from ..deltasvd.apply import delta_for, records_by_key
from ..deltasvd.delta_file import decoded_delta, module_of
from ..deltasvd.errors import DeltaError
from ..deltasvd.sources import TensorSource

UNET = "diffusion_model."


# ---------------------------------------------------------------------------------------------
# Memory


def release(patchers):
    """Unload loaded models that share weights with `patchers` (restoring any weights patched
    in place), then let the allocator give memory back."""
    patchers = [p for p in patchers if p is not None]
    mm.cleanup_models_gc()
    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        loaded = mm.current_loaded_models[i]
        m = loaded.model
        if m is not None and any(m.is_clone(p) for p in patchers):
            if loaded.model_unload():
                mm.current_loaded_models.pop(i)
    mm.soft_empty_cache()


def free_for_math(device, bytes_needed):
    """Make room on the compute device for the working set of one layer's math."""
    if device.type != "cpu":
        mm.free_memory(bytes_needed, device)


def cleanup():
    gc.collect()
    mm.soft_empty_cache()


# ---------------------------------------------------------------------------------------------
# Key layouts


def _meta(sd):
    return {k: torch.empty(tuple(v.shape), dtype=v.dtype, device="meta") for k, v in sd.items()}


def _layout(process, sd):
    """Run a `process_*_state_dict_for_saving` on meta copies of `sd`. Returns
    (identity {checkpoint key: host key}, derived {checkpoint key: (shape, dtype)}): identity
    keys are plain renames; derived ones are computed (OpenCLIP's fused in_proj, a transposed
    text_projection, added position ids)."""
    meta = _meta(sd)
    owner = {id(t): k for k, t in meta.items()}
    out = process(dict(meta))
    identity, derived = {}, {}
    for key, t in out.items():
        if id(t) in owner:
            identity[key] = owner[id(t)]
        elif isinstance(t, torch.Tensor):
            derived[key] = (tuple(t.shape), t.dtype)
    return identity, derived


def _single_sources(process, sd, identity, derived):
    """For derived checkpoint keys that come from one host tensor: {ckpt key: (host key,
    transposed)}. Found by running the layout on each unmapped host tensor alone."""
    used = set(identity.values())
    found = {}
    for key, t in _meta(sd).items():
        if key in used or t.ndim > 2:
            continue
        try:
            out = process({key: t})
        except Exception:  # noqa: BLE001  (q/k/v alone: ComfyUI refuses half a fused tensor)
            continue
        for ck, v in out.items():
            if ck in derived and isinstance(v, torch.Tensor) and v is not t:
                if tuple(v.shape) == tuple(t.shape):
                    found[ck] = (key, False)
                elif v.ndim == 2 and tuple(v.shape) == tuple(t.shape)[::-1]:
                    found[ck] = (key, True)
    return found


class Part:
    """One ComfyUI module (the UNet's BaseModel or the CLIP's text encoders) and its layout."""

    def __init__(self, patcher, state, process, prefix=""):
        self.patcher = patcher
        self.state = state              # host key (without prefix) -> tensor (for shapes)
        self.process = process
        self.prefix = prefix            # what the patcher's keys add in front of `state`'s
        self.identity, self.derived = _layout(process, state)

    def host_key(self, ckpt_key):
        return self.prefix + self.identity[ckpt_key]

    def single_sources(self):
        found = _single_sources(self.process, self.state, self.identity, self.derived)
        return {ck: (self.prefix + hk, tr) for ck, (hk, tr) in found.items()}


def unet_part(model):
    base = model.model
    state = base.diffusion_model.state_dict()
    return Part(model, state, base.model_config.process_unet_state_dict_for_saving, UNET)


def clip_part(clip, model_config):
    state = clip.cond_stage_model.state_dict()
    return Part(clip.patcher, state, model_config.process_clip_state_dict_for_saving)


def model_config_of(model):
    return model.model.model_config


# ---------------------------------------------------------------------------------------------
# Reading weights


def read_weight(patcher, key, device):
    """The weight ComfyUI computes for `key` when it loads this patcher (float32 if patched or
    converted), never modifying the model. Returns a CPU tensor."""
    weight, _, convert = comfy.model_patcher.get_key_weight(patcher.model, key)
    backup = patcher.backup.get(key)
    if backup is not None:      # patched in place by a loaded clone: the original is here
        weight = backup.weight
    patches = patcher.patches.get(key)
    if not patches and convert is None:
        return weight.detach().to("cpu")
    w = weight.detach().to(device=device, dtype=torch.float32, copy=True)
    if convert is not None:
        w = convert(w, inplace=True)
    if patches:
        w = comfy.lora.calculate_weight(patches, w, key)
    return w.to("cpu")


def _weight_dtype(patcher, key, tensor):
    if patcher.patches.get(key):
        return torch.float32
    _, _, convert = comfy.model_patcher.get_key_weight(patcher.model, key)
    return torch.float32 if convert is not None else tensor.dtype


def model_source(model, clip=None, label="model", device=None):
    """A TensorSource over a MODEL (and its CLIP): checkpoint keys, lazily read weights."""
    device = device or torch.device("cpu")
    config = model_config_of(model)
    parts = [unet_part(model)]
    if clip is not None:
        parts.append(clip_part(clip, config))
    entries = {}
    derived_cache = {}
    for part in parts:
        used = set(part.identity.values())
        unmapped_patched = any(part.patcher.patches.get(part.prefix + hk)
                               for hk in part.state if hk not in used)
        for ck, hk in part.identity.items():
            key = part.prefix + hk
            t = part.state[hk]
            entries[ck] = (tuple(t.shape), _weight_dtype(part.patcher, key, t),
                           (lambda p=part.patcher, k=key: read_weight(p, k, device)))
        for ck, (shape, dtype) in part.derived.items():
            def get(part=part, ck=ck, used=used, unmapped_patched=unmapped_patched):
                if part not in derived_cache:  # computed once, from the real weights
                    real = {hk: read_weight(part.patcher, part.prefix + hk, device)
                            for hk in part.state if hk not in used}
                    if unmapped_patched:  # one dtype for what gets fused together
                        real = {k: v.float() if v.is_floating_point() else v
                                for k, v in real.items()}
                    derived_cache[part] = part.process(real)
                return derived_cache[part][ck]
            if unmapped_patched and dtype.is_floating_point:
                dtype = torch.float32
            entries[ck] = (shape, dtype, get)
    return TensorSource(entries, f"<{label}>", on_close=[derived_cache.clear])


def model_family(model):
    """sd1 / sd2 / sdxl of a MODEL, from its UNet's keys and shapes (nothing read)."""
    part = unet_part(model)
    shapes = {ck: (tuple(part.state[hk].shape), part.state[hk].dtype, None)
              for ck, hk in part.identity.items()}
    return TensorSource(shapes, "<model>").family


def loaded_dtype(source, prefix="model.diffusion_model."):
    """The dtype most UNet weights are held in (like comfy.utils.weight_dtype)."""
    count = {}
    for key in source.keys():
        if key.startswith(prefix) and source.dtype(key).is_floating_point:
            count[source.dtype(key)] = count.get(source.dtype(key), 0) + source.nbytes(key)
    return max(count, key=count.get) if count else None


# ---------------------------------------------------------------------------------------------
# Deltas as patches


class PatchPlan:
    """What applying a Delta to a MODEL (and CLIP) does: the patches and what matched nothing."""

    def __init__(self):
        self.model_patches = {}
        self.clip_patches = {}
        self.modules = 0            # LoRA modules in the delta
        self.applied = []           # LoRA module names that map onto the model / clip
        self.unmatched = []         # LoRA module names that matched no weight
        self.no_clip = []           # text-encoder modules skipped because no CLIP is connected
        self.extras_applied = []    # checkpoint keys of extras patched
        self.extras_unmatched = []  # (checkpoint key, why)


def _lora_key_map(model, clip):
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    return key_map


def delta_patches(delta, model, clip=None):
    """Build the patches of `delta` for `model` (and `clip`), as LoraLoader would for the file,
    plus the extras. Nothing is modified. A coded delta (qsvd, dct) is decoded first
    (delta_file.decoded_delta): its factors become LoRA patches, its DCT layers "diff" patches."""
    delta = decoded_delta(delta)
    plan = PatchPlan()
    lora = dict(delta.tensors)
    lora = comfy.lora_convert.convert_lora(lora)
    modules = sorted({module_of(name) for name in lora})
    plan.modules = len(modules)
    key_map = _lora_key_map(model, clip)
    for name in modules:
        if name in key_map:
            plan.applied.append(name)
        elif clip is None and name.startswith(("lora_te", "text_encoders.")):
            plan.no_clip.append(name)
        else:
            plan.unmatched.append(name)
    loaded = comfy.lora.load_lora(lora, key_map, log_missing=False)
    unet_keys = set(model.model.state_dict())
    clip_keys = set(clip.cond_stage_model.state_dict()) if clip is not None else set()
    for key, patch in loaded.items():
        k = key if isinstance(key, str) else key[0]
        if k in unet_keys:
            plan.model_patches[key] = patch
        elif k in clip_keys:
            plan.clip_patches[key] = patch
    _extras_patches(delta, model, clip, plan)
    return plan


def _extras_patches(delta, model, clip, plan):
    by_key = {k: recs for k, recs in records_by_key(delta).items() if recs[0].extra}
    if not by_key:
        return
    config = model_config_of(model)
    targets = {}    # checkpoint key -> (patch dict, host key, transposed)
    unet = unet_part(model)
    for ck, hk in unet.identity.items():
        targets[ck] = (plan.model_patches, unet.prefix + hk, False)
    if clip is not None:
        part = clip_part(clip, config)
        for ck, hk in part.identity.items():
            targets[ck] = (plan.clip_patches, hk, False)
        if any(k in part.derived for k in by_key):
            for ck, (hk, tr) in part.single_sources().items():
                targets[ck] = (plan.clip_patches, hk, tr)
    for ck, recs in sorted(by_key.items()):
        if ck not in targets:
            why = ("the VAE is not an input of this node"
                   if ck.startswith(("first_stage_model.", "vae."))
                   else "no CLIP connected" if clip is None and not ck.startswith("model.")
                   else "the model has no such weight")
            plan.extras_unmatched.append((ck, why))
            continue
        patches, hk, transposed = targets[ck]
        shape = recs[0].shape if not recs[0].rows else None
        if shape is None:
            plan.extras_unmatched.append((ck, "row-split extras are not supported"))
            continue
        d = delta_for(delta, recs, shape)
        patches[hk] = ("diff", (d.t().contiguous() if transposed else d,))
        plan.extras_applied.append(ck)


def check_family(delta, model):
    family = model_family(model)
    if delta.family != family:
        raise DeltaError(f"this delta is for {families.title(delta.family)}, the "
                         f"model is {families.title(family)}")
    return family
