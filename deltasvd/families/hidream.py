"""HiDream-I1 (17 B sparse DiT with mixture-of-experts feed-forwards)."""

from .base import Family


class HiDream(Family):
    name = "hidream"
    title = "HiDream-I1"
    architecture = "hidream-i1"
    base_model_version = "hidream"
    civitai = "HiDream"
    signature = ("caption_projection.0.linear.weight",)
    blocks = {"double_stream_blocks.": "double_stream_blocks",
              "single_stream_blocks.": "single_stream_blocks"}
    embedders = ("t_embedder.", "p_embedder.", "x_embedder.", "caption_projection.")
    finals = ("final_layer.",)
