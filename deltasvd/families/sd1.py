"""Stable Diffusion 1.x: CLIP-L (768-wide cross-attention)."""

from .sd import StableDiffusion


class SD1(StableDiffusion):
    name = "sd1"
    title = "Stable Diffusion 1.x"
    architecture = "stable-diffusion-v1"
    base_model_version = "sd_v1"
    civitai = "SD 1.5"
    context_dim = 768
    clip_l = ("cond_stage_model.transformer.text_model.encoder.layers.", "lora_te_")
    text_marker = "cond_stage_model.transformer."
