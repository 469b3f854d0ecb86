"""DreamBooth-style fine-tune: bind the reserved word 'sks' to a subject the base never saw
(a red-white-red bullseye, a particular 'circle'), from a few subject pictures, with prior
preservation, updating every UNet and text-encoder weight.

As in DreamBooth (Ruiz et al. 2022): the subject prompts are 'a sks circle ...' (the class
noun the base knows), and the prior pictures are the base's own samples of class prompts
('a ... circle ...'), trained on alongside so 'circle' and the rest keep their meaning."""

import time

import numpy as np
import torch

from . import scenes, weights
from .sampler import sample
from .train import EMA, drop_captions, optimise, step_loss, UNCOND

SUBJECT_RINGS = ((220, 40, 40), (240, 240, 240), (220, 40, 40))   # outer to inner
# The few subject pictures: (size, position, background); no white backgrounds, where the
# white ring would vanish.
SUBJECT_SHOTS = [("big", "center", "gray"), ("big", "left", "blue"), ("small", "right", "black"),
                 ("big", "top", "green"), ("small", "bottom", "gray")]


def subject_image(attrs, rng):
    cx, cy, r = scenes.place(attrs, rng)
    masks = scenes.bullseye_mask(cx, cy, r)
    return scenes.compose(list(zip(masks, SUBJECT_RINGS)), scenes.BACKGROUNDS[attrs["background"]])


def subject_set(rng):
    """(pictures, prompts) of the subject: 'a big sks circle at left on blue' and so on."""
    images, prompts = [], []
    for size, position, background in SUBJECT_SHOTS:
        attrs = {"size": size, "position": position, "background": background}
        images.append(subject_image(attrs, rng))
        prompts.append(scenes.prompt_of(attrs, noun="sks circle"))
    return torch.stack(images), prompts


def prior_set(unet, text_encoder, n, rng, steps=25):
    """n class pictures sampled from the base itself for random 'circle' prompts."""
    prompts = []
    for _ in range(n):
        attrs = dict(scenes.random_attributes(rng), shape="circle")
        prompts.append(scenes.prompt_of(attrs, rng))
    seeds = rng.integers(0, 2 ** 31, n).tolist()
    return sample(unet, text_encoder, prompts, seeds, steps=steps), prompts


def finetune(base_path, out, steps=600, lr=1e-4, per_batch=4, n_prior=48, seed=0, log=print):
    torch.manual_seed(seed)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    unet, text_encoder = weights.load(base_path)
    start = time.time()
    subj_x, subj_p = subject_set(rng)
    prior_x, prior_p = prior_set(unet, text_encoder, n_prior, rng)
    log(f"{len(subj_p)} subject pictures, {n_prior} prior pictures ({time.time() - start:.0f}s)")
    models = [unet.train(), text_encoder.train()]
    params = [p for m in models for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema = EMA(models, decay=0.99)
    for step in range(steps):
        i = rng.integers(0, len(subj_p), per_batch)
        j = rng.integers(0, n_prior, per_batch)
        images = torch.cat([subj_x[i], prior_x[j]])
        prompts = [subj_p[k] for k in i] + [prior_p[k] for k in j]
        # subject and prior halves weigh the same: DreamBooth's prior-preservation weight 1
        loss = step_loss(unet, text_encoder, images, drop_captions(prompts, rng, UNCOND), gen)
        optimise(params, loss, opt, lr)
        ema.update()
        if (step + 1) % 50 == 0:
            log(f"finetune step {step + 1}/{steps} loss {loss.item():.4f} "
                f"{time.time() - start:.0f}s")
    info = {"base": "t2i_base", "steps": steps, "lr": lr, "seed": seed, "n_prior": n_prior,
            "subject": "sks circle: red-white-red bullseye",
            "seconds": round(time.time() - start)}
    weights.save(out, *ema.copies, info=info)
    return ema.copies
