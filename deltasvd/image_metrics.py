"""Image fidelity scores: SSIM and PSNR of one batch of pictures against another.

What users judge is the pictures, so these compare base + delta's images with the full
fine-tune's (same prompts, same seeds). Both take channel-last float batches (N, H, W, C) with
values in [0, data_range], ComfyUI's IMAGE layout, and return one score per picture.

SSIM is Wang et al. (2004) as most tools compute it (scikit-image with gaussian_weights=True,
use_sample_covariance=False): an 11 x 11 Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03,
the map averaged over the window positions that lie inside the picture, and over channels.
The arithmetic is float64, so a score does not depend on the input's dtype."""

import math

import torch
import torch.nn.functional as F

WINDOW, SIGMA, K1, K2 = 11, 1.5, 0.01, 0.03


def _check(a, b):
    if a.shape != b.shape:
        raise ValueError(f"the two image batches differ in shape: {tuple(a.shape)} and "
                         f"{tuple(b.shape)}; compare pictures of the same size and count")
    if a.dim() != 4:
        raise ValueError(f"expected image batches (N, H, W, C), got shape {tuple(a.shape)}")
    if min(a.shape[1], a.shape[2]) < WINDOW:
        raise ValueError(f"SSIM needs pictures of at least {WINDOW} x {WINDOW} pixels, "
                         f"got {a.shape[1]} x {a.shape[2]}")


def _gaussian():
    x = torch.arange(WINDOW, dtype=torch.float64) - (WINDOW - 1) / 2
    g = torch.exp(-x * x / (2 * SIGMA * SIGMA))
    return g / g.sum()


def _blur(x, g):
    """Valid-region Gaussian mean of (M, 1, H, W), separably: rows then columns."""
    x = F.conv2d(x, g.view(1, 1, 1, -1))
    return F.conv2d(x, g.view(1, 1, -1, 1))


def ssim(a, b, data_range=1.0):
    """(N,) SSIM of each picture of `a` against the same picture of `b`."""
    _check(a, b)
    n, h, w, c = a.shape
    # one single-channel picture per (image, channel), so every channel is scored alike
    x = a.detach().to("cpu", torch.float64).permute(0, 3, 1, 2).reshape(n * c, 1, h, w)
    y = b.detach().to("cpu", torch.float64).permute(0, 3, 1, 2).reshape(n * c, 1, h, w)
    g = _gaussian()
    mx, my = _blur(x, g), _blur(y, g)
    vx = _blur(x * x, g) - mx * mx
    vy = _blur(y * y, g) - my * my
    cov = _blur(x * y, g) - mx * my
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return smap.mean(dim=(1, 2, 3)).view(n, c).mean(dim=1)


def psnr(a, b, data_range=1.0):
    """(N,) PSNR in dB of each picture; inf where the two are identical."""
    if a.shape != b.shape:
        _check(a, b)
    diff = a.detach().to("cpu", torch.float64) - b.detach().to("cpu", torch.float64)
    mse = diff.pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range ** 2 / mse)   # mse 0 -> inf, as it should


def mean_psnr(values):
    """The average of per-picture PSNRs, inf only when every picture is identical: an identical
    picture among others would otherwise hide the rest in the mean."""
    finite = [float(v) for v in values if math.isfinite(float(v))]
    return sum(finite) / len(finite) if finite else math.inf
