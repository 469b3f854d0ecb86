"""Stable Diffusion 2.x: OpenCLIP ViT-H (1024-wide cross-attention)."""

from .sd import StableDiffusion


class SD2(StableDiffusion):
    name = "sd2"
    title = "Stable Diffusion 2.x"
    architecture = "stable-diffusion-v2-512"
    base_model_version = "sd_v2"
    civitai = "SD 2.1"
    context_dim = 1024
    open_clip = ("cond_stage_model.model.transformer.resblocks.", "lora_te_")
    text_marker = "cond_stage_model.model."
