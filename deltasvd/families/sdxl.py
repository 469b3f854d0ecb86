"""Stable Diffusion XL: CLIP-L + OpenCLIP ViT-bigG (2048-wide cross-attention, label_emb)."""

from .sd import StableDiffusion


class SDXL(StableDiffusion):
    name = "sdxl"
    title = "Stable Diffusion XL"
    architecture = "stable-diffusion-xl-v1-base"
    base_model_version = "sdxl_base_v1-0"
    civitai = "SDXL 1.0"
    context_dim = 2048
    label_emb = True
    clip_l = ("conditioner.embedders.0.transformer.text_model.encoder.layers.", "lora_te1_")
    open_clip = ("conditioner.embedders.1.model.transformer.resblocks.", "lora_te2_")
    text_marker = "conditioner.embedders.1.model."
