"""Noise schedule, training loss and the sampler.

v-prediction on a cosine schedule: with few sampling steps and a tiny model it is steadier
than epsilon-prediction at the noisy end. The sampler is DDIM with eta = 0 (deterministic)
and classifier-free guidance; each picture's starting noise comes from its own seed, so a
picture depends only on (weights, prompt, seed, steps, guidance), not on its batch (up to
float rounding, which a batch size can change)."""

import math

import torch

T = 1000


def alpha_bar(t):
    """Signal fraction at integer timesteps t in [0, T): cosine schedule (Nichol & Dhariwal)."""
    s = 0.008
    f = torch.cos((t.float() / T + s) / (1 + s) * math.pi / 2) ** 2
    return f.clamp(1e-5, 1.0)


def scales(t):
    ab = alpha_bar(t)[:, None, None, None]
    return ab.sqrt(), (1 - ab).sqrt()


def v_loss(unet, x0, t, context, noise):
    """Mean squared error of the predicted velocity v = a * noise - s * x0."""
    a, s = scales(t)
    pred = unet(a * x0 + s * noise, t, context)
    return torch.nn.functional.mse_loss(pred, a * noise - s * x0)


def initial_noise(seeds, size):
    return torch.stack([torch.randn(3, size, size, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds])


@torch.no_grad()
def ddim(unet, context, uncond, x, steps, guidance):
    """Deterministic DDIM from pure noise x to an image; context / uncond: text features."""
    times = torch.linspace(T - 1, 0, steps).round().long()
    both = torch.cat([uncond, context])
    for i, t in enumerate(times):
        tb = t.repeat(x.shape[0])
        v_u, v_c = unet(torch.cat([x, x]), torch.cat([tb, tb]), both).chunk(2)
        v = v_u + guidance * (v_c - v_u)
        a, s = scales(tb)
        x0 = (a * x - s * v).clamp(-1, 1)          # pictures live in [-1, 1]
        eps = (x - a * x0) / s
        if i + 1 == len(times):
            return x0
        a2, s2 = scales(times[i + 1].repeat(x.shape[0]))
        x = a2 * x0 + s2 * eps
    return x
