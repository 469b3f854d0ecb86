"""Chroma: Flux schnell's blocks, modulation from a distilled guidance layer (no vector_in)."""

from .base import Family
from .flux import EMBEDDERS


class Chroma(Family):
    name = "chroma"
    title = "Chroma"
    architecture = "chroma"
    base_model_version = "chroma"
    civitai = "Chroma"
    implementation = "https://github.com/black-forest-labs/flux"
    signature = ("double_blocks.0.img_attn.norm.key_norm.scale",
                 "distilled_guidance_layer.norms.0.scale")
    blocks = {"double_blocks.": "double_blocks", "single_blocks.": "single_blocks",
              "distilled_guidance_layer.": "guidance_layer"}
    embedders = EMBEDDERS
    finals = ("final_layer.",)

    def shapes_match(self, view):
        # Chroma Radiance (pixel space) has NeRF blocks and no img_in: another model.
        return not any(".nerf_blocks." in k or k.endswith("nerf_blocks") for k in view.key_map)
