"""The shipped weights, in ComfyUI's all-in-one key layout: the UNet under
`model.diffusion_model.`, the text encoder under `text_encoders.t2i.`. deltasvd reads that
layout as the generic family, so `deltasvd compress base tuned` works on the pair as it is."""

import json
import os

import torch

from .text_encoder import TextEncoder
from .unet import UNet

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
BASE = os.path.join(HERE, "t2i_base.safetensors")
FINETUNE = os.path.join(HERE, "t2i_sks.safetensors")
UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "text_encoders.t2i."


def build():
    """A fresh (untrained) model pair; the architecture is fixed so files need no config."""
    return UNet(), TextEncoder()


def to_state(unet, text_encoder, dtype=torch.float16):
    state = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    state.update({TEXT_PREFIX + k: v for k, v in text_encoder.state_dict().items()})
    return {k: v.detach().to(dtype).contiguous() for k, v in state.items()}


def save(path, unet, text_encoder, info=None):
    from safetensors.torch import save_file
    tmp = path + ".tmp"
    save_file(to_state(unet, text_encoder), tmp, metadata={"t2i.info": json.dumps(info or {})})
    os.replace(tmp, path)      # a half-written file never takes the real name


def from_state(state):
    """(unet, text_encoder) in float32, eval mode, from a state dict of either layout part."""
    unet, text_encoder = build()
    for model, prefix in ((unet, UNET_PREFIX), (text_encoder, TEXT_PREFIX)):
        part = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
        model.load_state_dict(part, strict=True)
        model.eval()
    return unet, text_encoder


def load(path=BASE):
    from safetensors.torch import load_file
    return from_state(load_file(path))
