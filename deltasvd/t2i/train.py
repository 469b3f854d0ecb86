"""Base training: the model learns the procedural scenes from scratch.

Seeded end to end (numpy for the scenes, torch for init, timesteps and noise), so a rerun
with the same arguments and thread count gives the same weights. The shipped weights are the
exponential moving average, which samples cleaner than the last step of a short run."""

import copy
import math
import time

import numpy as np
import torch

from . import diffusion, scenes, weights
from .tokenizer import encode_batch

UNCOND = 0.1          # chance a caption is dropped, for classifier-free guidance


class EMA:
    def __init__(self, models, decay):
        self.decay = decay
        self.copies = [copy.deepcopy(m).eval().requires_grad_(False) for m in models]
        self.models = models

    @torch.no_grad()
    def update(self):
        for shadow, model in zip(self.copies, self.models):
            for s, p in zip(shadow.parameters(), model.parameters()):
                s.lerp_(p, 1 - self.decay)


def lr_at(step, steps, peak, warmup):
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def drop_captions(prompts, rng, chance):
    return ["" if rng.random() < chance else p for p in prompts]


def step_loss(unet, text_encoder, images, prompts, gen):
    """One diffusion loss on a batch: random timesteps and noise from torch generator gen."""
    t = torch.randint(0, diffusion.T, (images.shape[0],), generator=gen)
    noise = torch.randn(images.shape, generator=gen)
    return diffusion.v_loss(unet, images, t, text_encoder(encode_batch(prompts)), noise)


def optimise(params, loss, opt, lr):
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def train_base(out, steps=3000, batch=32, lr=1e-3, seed=0, log=print, save_every=500):
    torch.manual_seed(seed)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    unet, text_encoder = weights.build()
    models = [unet, text_encoder]
    params = [p for m in models for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema = EMA(models, decay=0.998)
    start, running = time.time(), None
    for step in range(steps):
        images, prompts = scenes.batch(batch, rng)
        loss = step_loss(unet, text_encoder, images, drop_captions(prompts, rng, UNCOND), gen)
        optimise(params, loss, opt, lr_at(step, steps, lr, warmup=200))
        ema.update()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % 50 == 0:
            log(f"step {step + 1}/{steps} loss {running:.4f} {time.time() - start:.0f}s")
        if (step + 1) % save_every == 0 or step + 1 == steps:
            info = {"steps": step + 1, "of": steps, "batch": batch, "lr": lr, "seed": seed,
                    "seconds": round(time.time() - start)}
            weights.save(out, *ema.copies, info=info)
    return ema.copies
