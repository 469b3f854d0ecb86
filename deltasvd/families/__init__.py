"""The model families deltasvd knows, one module each; adding a family is adding a class here.

Each family (families/base.py) says how it is recognised, how its tensors are named in a LoRA
file, its summary groups and the names hosts and sites use for it. `detect` asks them in
REGISTRY order: most specific first, the generic family last (it takes any file)."""

from .base import TEXT, UNET, Family, Target
from .chroma import Chroma
from .flux import FluxDev, FluxSchnell
from .generic import Generic
from .hidream import HiDream
from .lumina2 import Lumina2, ZImage
from .qwen_image import QwenImage
from .sd1 import SD1
from .sd2 import SD2
from .sd3 import SD3Medium, SD35Large, SD35Medium
from .sdxl import SDXL
from .wan import Wan1B, Wan5B, Wan14B

REGISTRY = tuple(cls() for cls in (
    SDXL, SD2, SD1, Chroma, FluxDev, FluxSchnell, QwenImage, Wan14B, Wan5B, Wan1B, HiDream,
    ZImage, Lumina2, SD35Large, SD35Medium, SD3Medium, Generic))
BY_NAME = {f.name: f for f in REGISTRY}
GENERIC = BY_NAME["generic"]

__all__ = ["REGISTRY", "BY_NAME", "GENERIC", "Family", "Target", "UNET", "TEXT", "detect",
           "family", "title"]


def detect(view):
    """The first family that recognises `view` (anything with key_map and shape())."""
    for fam in REGISTRY:
        if fam.recognise(view):
            return fam
    return GENERIC


def family(name):
    """The family named `name` in a delta file; an unknown name (a newer deltasvd's family)
    is treated as generic for names and groups."""
    return BY_NAME.get(name, GENERIC)


def title(name):
    fam = BY_NAME.get(name)
    return fam.title if fam else str(name)
