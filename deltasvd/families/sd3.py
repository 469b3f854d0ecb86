"""Stable Diffusion 3 / 3.5 (MMDiT): Large has 38 joint blocks; Medium 24, and 3.5 Medium's
MMDiT-X blocks add a second image self-attention (`x_block.attn2`). ComfyUI reads the depth
from `x_embedder.proj.weight` (64 channels per block)."""

from .base import UNET, Family


class SD3(Family):
    depth = None
    mmdit_x = False
    base_model_version = "sd3"
    signature = ("joint_blocks.0.context_block.attn.qkv.weight", "x_embedder.proj.weight")
    detection_keys = ("joint_blocks.0.x_block.attn2.qkv.weight",)
    blocks = {"joint_blocks.": "joint_blocks"}
    embedders = ("x_embedder.", "t_embedder.", "y_embedder.", "context_embedder.", "pos_embed")
    finals = ("final_layer.",)

    def shapes_match(self, view):
        keys = view.key_map
        depth = view.shape(UNET + "x_embedder.proj.weight")[0] // 64
        has_x = UNET + "joint_blocks.0.x_block.attn2.qkv.weight" in keys
        return depth == self.depth and has_x == self.mmdit_x


class SD35Large(SD3):
    name = "sd35_large"
    title = "Stable Diffusion 3.5 Large"
    architecture = "stable-diffusion-3-5-large"
    civitai = "SD 3.5 Large"
    depth = 38


class SD35Medium(SD3):
    name = "sd35_medium"
    title = "Stable Diffusion 3.5 Medium"
    architecture = "stable-diffusion-3-5-medium"
    civitai = "SD 3.5 Medium"
    depth = 24
    mmdit_x = True


class SD3Medium(SD3):
    name = "sd3_medium"
    title = "Stable Diffusion 3 Medium"
    architecture = "stable-diffusion-3-medium"
    civitai = "SD 3"
    depth = 24
