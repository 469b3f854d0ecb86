"""Checkpoint key -> LoRA module name, for names that ComfyUI AND A1111 both resolve.

Rules followed (see docs/ARCHITECTURE.md, "Names"):
- UNet: `lora_unet_` + the LDM module path with '.' -> '_'. ComfyUI maps every UNet `.weight`
  this way; A1111 1.10 finds it through its `lora_unet` -> `diffusion_model` fallback.
- CLIP-L (SD1 `cond_stage_model.transformer`, SDXL `conditioner.embedders.0.transformer`): kohya's
  `lora_te_` / `lora_te1_` + `text_model_encoder_layers_N_{self_attn_q_proj,...,mlp_fc2}`.
- OpenCLIP (SD2 `cond_stage_model.model`, SDXL `conditioner.embedders.1.model`): the fused
  `attn.in_proj_weight` is split into q, k, v rows and named like CLIP-L (`lora_te_` on SD2,
  `lora_te2_` on SDXL); `mlp.c_fc` -> `mlp_fc1`, `mlp.c_proj` -> `mlp_fc2`. ComfyUI keeps these
  encoders in the HF layout, A1111 maps the names back to its MultiheadAttention.
Anything else (text-encoder norms and embeddings, `text_projection`, the VAE) has no name both
hosts load; such tensors go to the file's extras (applied by deltasvd itself).
"""

import re
from dataclasses import dataclass

UNET = "model.diffusion_model."
_CLIP_L = {
    "sd1": ("cond_stage_model.transformer.text_model.encoder.layers.", "lora_te_"),
    "sdxl": ("conditioner.embedders.0.transformer.text_model.encoder.layers.", "lora_te1_"),
}
_OPEN_CLIP = {
    "sd2": ("cond_stage_model.model.transformer.resblocks.", "lora_te_"),
    "sdxl": ("conditioner.embedders.1.model.transformer.resblocks.", "lora_te2_"),
}
_CLIP_L_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                 "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
_OPEN_CLIP_PARTS = {"attn.out_proj": "self_attn_out_proj", "mlp.c_fc": "mlp_fc1",
                    "mlp.c_proj": "mlp_fc2"}
_LAYER = re.compile(r"(\d+)\.(.+)\.(weight|bias)$")
_IN_PROJ = re.compile(r"(\d+)\.attn\.in_proj_(weight|bias)$")
MHA_PARTS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj")


@dataclass(frozen=True)
class Target:
    """Where (part of) one checkpoint tensor goes in a LoRA file."""
    module: str             # LoRA module name, e.g. lora_unet_input_blocks_1_1_proj_in
    param: str              # "weight" or "bias"
    rows: tuple = None      # (start, stop) rows of the checkpoint tensor, for split q/k/v
    mha: str = None         # the A1111 MultiheadAttention group this module belongs to


def targets(key, shape, family):
    """The LoRA targets of checkpoint `key` (shape `shape`), or None if no shared name exists."""
    if key.startswith(UNET):
        path, _, param = key[len(UNET):].rpartition(".")
        if param not in ("weight", "bias") or not path:
            return None
        return [Target("lora_unet_" + path.replace(".", "_"), param)]
    if family in _CLIP_L and key.startswith(_CLIP_L[family][0]):
        return _clip_l_targets(key[len(_CLIP_L[family][0]):], _CLIP_L[family][1])
    if family in _OPEN_CLIP and key.startswith(_OPEN_CLIP[family][0]):
        return _open_clip_targets(key[len(_OPEN_CLIP[family][0]):], _OPEN_CLIP[family][1], shape)
    return None


def _clip_l_targets(rest, prefix):
    m = _LAYER.match(rest)
    if not m or m.group(2) not in _CLIP_L_PARTS:
        return None
    name = f"{prefix}text_model_encoder_layers_{m.group(1)}_{m.group(2).replace('.', '_')}"
    return [Target(name, m.group(3))]


def _open_clip_targets(rest, prefix, shape):
    head = f"{prefix}text_model_encoder_layers_"
    m = _IN_PROJ.match(rest)
    if m:
        layer, param = m.group(1), m.group(2)
        width = shape[0] // 3
        group = head + layer
        return [Target(f"{group}_{part}", param, (i * width, (i + 1) * width), group)
                for i, part in enumerate(MHA_PARTS[:3])]
    m = _LAYER.match(rest)
    if not m or m.group(2) not in _OPEN_CLIP_PARTS:
        return None
    group = head + m.group(1)
    part = _OPEN_CLIP_PARTS[m.group(2)]
    return [Target(f"{group}_{part}", m.group(3), None, group if part in MHA_PARTS else None)]


def text_encoder_of(module):
    """'unet', 'te', 'te1' or 'te2' from a LoRA module name (for strength and grouping)."""
    for tag in ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_"):
        if module.startswith(tag):
            return tag[5:-1]
    return None
