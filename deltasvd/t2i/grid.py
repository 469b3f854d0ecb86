"""Picture grids: one row per prompt, a reference drawing of the prompt first, then the base's
samples and the fine-tune's samples for the same seeds, side by side."""

import numpy as np
import torch

from . import png, scenes, weights
from .dreambooth import subject_image
from .sampler import sample

PROMPTS = ["a big red circle at left on black", "a small blue square at right on white",
           "a big yellow triangle at center on blue", "a big green cross at top on gray",
           "a small purple circle at bottom on green", "a big orange square at center on black",
           "a big sks circle at center on gray", "a sks circle at left on blue",
           "a small sks circle at right on black"]
SEEDS = (0, 1, 2, 3)
SCALE, GAP = 3, 4


def to_unit(images):
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) in [0, 1] (what SSIM / PSNR compare)."""
    return ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)


def to_uint8(images):
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def reference(prompt):
    """The procedural drawing a prompt describes (the subject's for 'sks'); what the prompt
    leaves out is big, at center, on gray."""
    words = prompt.split()
    after = lambda word, default: words[words.index(word) + 1] if word in words else default
    attrs = {"size": "small" if "small" in words else "big", "position": after("at", "center"),
             "background": after("on", "gray")}
    rng = np.random.default_rng(0)
    if "sks" in words:
        return subject_image(attrs, rng)
    shape = next(w for w in words if w in scenes.SHAPES)
    attrs.update(shape=shape, colour=words[words.index(shape) - 1])
    return scenes.render(attrs, rng)


def row(pictures):
    """Pictures (list of (H, W, 3) uint8, None for a gap) -> one upscaled strip."""
    size = scenes.SIZE * SCALE
    tiles = []
    for p in pictures:
        tiles.append(np.full((size, GAP * 3, 3), 255, np.uint8) if p is None
                     else p.repeat(SCALE, 0).repeat(SCALE, 1))
        tiles.append(np.full((size, GAP, 3), 255, np.uint8))
    return np.concatenate(tiles[:-1], axis=1)


def stack(strips):
    """Strips (rows of pictures, equal width) one above the other, a white gap between."""
    gap = np.full((GAP, strips[0].shape[1], 3), 255, np.uint8)
    return np.concatenate([part for s in strips for part in (s, gap)][:-1], axis=0)


def prompt_row(prompt, sample_sets):
    """[reference drawing | gap | each (N, 3, H, W) set of samples, a gap between]."""
    pictures = list(to_uint8(reference(prompt).unsqueeze(0)))
    for samples in sample_sets:
        pictures.append(None)
        pictures += list(to_uint8(samples))
    return row(pictures)


def comparison(models, prompts=PROMPTS, seeds=SEEDS, steps=25):
    """Grid array: per prompt, [reference | gap | samples of each model (gap between)]."""
    return stack([prompt_row(prompt, [sample(unet, text_encoder, [prompt] * len(seeds),
                                             list(seeds), steps=steps)
                                      for unet, text_encoder in models])
                  for prompt in prompts])


def save_comparison(base_path, tuned_path, out, prompts=PROMPTS):
    models = [weights.load(base_path), weights.load(tuned_path)]
    text = {"Description": "rows: " + " | ".join(prompts) + ". Columns: reference drawing; "
            f"base, seeds {list(SEEDS)}; fine-tune, same seeds"}
    png.write(out, comparison(models, prompts), text)
