"""What SD1.x, SD2.x and SDXL share: the LDM UNet, CLIP text encoders, A1111's LoRA rules.

Names both ComfyUI AND A1111 resolve:
- UNet: `lora_unet_` + the LDM module path with '.' -> '_'. ComfyUI maps every UNet `.weight`
  this way; A1111 1.10 finds it through its `lora_unet` -> `diffusion_model` fallback.
- CLIP-L (SD1 `cond_stage_model.transformer`, SDXL `conditioner.embedders.0.transformer`):
  kohya's `lora_te_` / `lora_te1_` + `text_model_encoder_layers_N_{self_attn_q_proj,...,mlp_fc2}`.
- OpenCLIP (SD2 `cond_stage_model.model`, SDXL `conditioner.embedders.1.model`): the fused
  `attn.in_proj_weight` is split into q, k, v rows and named like CLIP-L (`lora_te_` on SD2,
  `lora_te2_` on SDXL); `mlp.c_fc` -> `mlp_fc1`, `mlp.c_proj` -> `mlp_fc2`. ComfyUI keeps these
  encoders in the HF layout, A1111 maps the names back to its MultiheadAttention.
Anything else (text-encoder norms and embeddings, `text_projection`, the VAE) has no name both
hosts load; such tensors go to the file's extras (applied by deltasvd itself).
"""

import re

from .base import UNET, Family, Target

_CLIP_L_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                 "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
_OPEN_CLIP_PARTS = {"attn.out_proj": "self_attn_out_proj", "mlp.c_fc": "mlp_fc1",
                    "mlp.c_proj": "mlp_fc2"}
_LAYER = re.compile(r"(\d+)\.(.+)\.(weight|bias)$")
_IN_PROJ = re.compile(r"(\d+)\.attn\.in_proj_(weight|bias)$")
MHA_PARTS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj")
# The paper's Table 2 groups, in diffusers block names.
GROUP_ORDER = ["conv_in", "time_embedding", "down_blocks.0", "down_blocks.1", "down_blocks.2",
               "down_blocks.3", "mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2",
               "up_blocks.3", "conv_out", "text_encoder", "text_encoder_1", "text_encoder_2",
               "vae", "other"]


class StableDiffusion(Family):
    """An LDM UNet family, recognised by its cross-attention width (and SDXL's label_emb)."""
    a1111 = True
    context_dim = None
    label_emb = False
    clip_l = None           # (checkpoint prefix of CLIP-L's layers, LoRA prefix)
    open_clip = None        # (checkpoint prefix of OpenCLIP's resblocks, LoRA prefix)
    text_marker = None      # a key prefix only this family's text encoder has
    group_order = GROUP_ORDER
    implementation = "https://github.com/Stability-AI/generative-models"

    def recognise(self, view):
        ctx = context_dim(view)
        if ctx is None:
            return any(k.startswith(self.text_marker) for k in view.key_map)
        has_label = any(k.startswith(UNET + "label_emb.") for k in view.key_map)
        return ctx == self.context_dim and has_label == self.label_emb

    def targets(self, key, shape, keys):
        if key.startswith(UNET):
            path, _, param = key[len(UNET):].rpartition(".")
            if param not in ("weight", "bias") or not path:
                return None
            return [Target("lora_unet_" + path.replace(".", "_"), param)]
        if self.clip_l and key.startswith(self.clip_l[0]):
            return _clip_l_targets(key[len(self.clip_l[0]):], self.clip_l[1])
        if self.open_clip and key.startswith(self.open_clip[0]):
            return _open_clip_targets(key[len(self.open_clip[0]):], self.open_clip[1], shape)
        return None

    def group_of(self, key):
        if key.startswith(UNET):
            return _unet_group(key[len(UNET):])
        if key.startswith("cond_stage_model."):
            return "text_encoder"
        if key.startswith("conditioner.embedders.0."):
            return "text_encoder_1"
        if key.startswith("conditioner.embedders.1."):
            return "text_encoder_2"
        if key.startswith("first_stage_model."):
            return "vae"
        return "other"


def context_dim(view):
    """The UNet's cross-attention width, or None for a file without a UNet."""
    for key in view.key_map:
        if key.startswith(UNET) and key.endswith("attn2.to_k.weight"):
            return view.shape(key)[1]
    return None


def _unet_group(rest):
    m = re.match(r"input_blocks\.(\d+)\.", rest)
    if m:
        n = int(m.group(1))
        return "conv_in" if n == 0 else f"down_blocks.{(n - 1) // 3}"
    m = re.match(r"output_blocks\.(\d+)\.", rest)
    if m:
        return f"up_blocks.{int(m.group(1)) // 3}"
    if rest.startswith("middle_block."):
        return "mid_block"
    if rest.startswith("out."):
        return "conv_out"
    if rest.startswith(("time_embed.", "label_emb.")):
        return "time_embedding"
    return "other"


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
