"""Wan 2.1 / 2.2 video DiTs. One layout per width: 14 B (2.1 T2V/I2V, and each expert of
2.2 A14B, a file of its own), 1.3 B, and 2.2 TI2V 5 B. `head.modulation`'s last axis is the
width, as ComfyUI reads it."""

from .base import UNET, Family


class Wan(Family):
    dim = None
    signature = ("head.modulation", "head.head.weight")
    blocks = {"blocks.": "blocks"}
    embedders = ("patch_embedding.", "text_embedding.", "time_embedding.", "time_projection.",
                 "img_emb.")
    finals = ("head.",)
    base_model_version = "wan"

    def shapes_match(self, view):
        return view.shape(UNET + "head.modulation")[-1] == self.dim


class Wan14B(Wan):
    name = "wan_14b"
    title = "Wan 2.x 14B (2.1 T2V / I2V, 2.2 A14B expert)"
    architecture = "wan-2.1-14b"
    civitai = "Wan Video 14B"
    dim = 5120


class Wan1B(Wan):
    name = "wan_1.3b"
    title = "Wan 2.1 1.3B"
    architecture = "wan-2.1-1.3b"
    civitai = "Wan Video 1.3B t2v"
    dim = 1536


class Wan5B(Wan):
    name = "wan_5b"
    title = "Wan 2.2 TI2V 5B"
    architecture = "wan-2.2-ti2v-5b"
    civitai = "Wan Video 2.2 TI2V-5B"
    dim = 3072
