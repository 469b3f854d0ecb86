"""Prompts in, pictures out: the one call the tests, the grid and the demo use."""

import torch

from . import diffusion, scenes
from .tokenizer import encode_batch


@torch.no_grad()
def sample(unet, text_encoder, prompts, seeds, steps=25, guidance=4.0):
    """Pictures (N, 3, 32, 32) in [-1, 1], one per (prompt, seed) pair. float32 on CPU."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    context = text_encoder(encode_batch(prompts))
    uncond = text_encoder(encode_batch([""] * len(prompts)))
    x = diffusion.initial_noise(seeds, scenes.SIZE)
    return diffusion.ddim(unet, context, uncond, x, steps, guidance)
