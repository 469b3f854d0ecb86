"""Lumina Image 2.0 and Z-Image: one NextDiT class, told apart by width (2304 / 3840), as
ComfyUI does."""

from .base import UNET, Family


class NextDiT(Family):
    dim = None
    signature = ("cap_embedder.1.weight",)
    blocks = {"layers.": "layers", "noise_refiner.": "refiners", "context_refiner.": "refiners"}
    embedders = ("x_embedder.", "t_embedder.", "cap_embedder.", "cap_pad_token", "x_pad_token")
    finals = ("final_layer.", "norm_final.")

    def shapes_match(self, view):
        return view.shape(UNET + "cap_embedder.1.weight")[0] == self.dim


class Lumina2(NextDiT):
    name = "lumina2"
    title = "Lumina Image 2.0"
    architecture = "lumina-2"
    base_model_version = "lumina2"
    civitai = "Lumina"
    dim = 2304


class ZImage(NextDiT):
    name = "zimage"
    title = "Z-Image"
    architecture = "z-image-turbo"
    base_model_version = "zimage"
    civitai = "ZImageTurbo"
    dim = 3840
