"""Qwen-Image (20 B MMDiT; Qwen-Image-Edit shares the layout)."""

from .base import Family


class QwenImage(Family):
    name = "qwen_image"
    title = "Qwen-Image"
    architecture = "qwen-image"
    base_model_version = "qwen_image"
    civitai = "Qwen"
    signature = ("txt_norm.weight", "img_in.weight")
    blocks = {"transformer_blocks.": "transformer_blocks"}
    embedders = ("img_in.", "txt_in.", "txt_norm.", "time_text_embed.")
    finals = ("norm_out.", "proj_out.")
