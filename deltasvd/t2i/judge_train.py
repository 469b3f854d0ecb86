"""Training data and loop of the subject judge (`judge`): procedural drawings of the 4 shapes
and of the subject, distorted to look like the small model's samples.

The model draws what it learned as blobs: wobbly outlines, rounded corners, noisy flat colours,
and the fine-tune's bullseye often as a squarish red frame with white inside and red bits in
the middle. Clean drawings alone would leave the judge lost on such pictures, so every drawing
is warped (affine + smooth elastic field), made blobby (blur, then threshold the layer masks),
painted, then blurred, colour-jittered and noised. Half of the shapes are red or white, the
subject's own colours, so that only the concentric red / white / red structure tells the
subject apart from a plain red or white disc. Empty pictures (the models sometimes draw
nothing) are taught as 'any shape but the subject'.

Seeded end to end (numpy for the attributes, torch for the fields, noise and init), so a rerun
with the same arguments at one thread gives the same weights."""

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import judge, scenes
from .dreambooth import SUBJECT_RINGS
from .train import lr_at, optimise

HALF = scenes.SIZE // 2          # masks are drawn at 2x (64 px) through scenes.shape_mask(n=16)
HARD = ("red", "white")          # the subject's colours: hard negatives for the shapes
P_SUBJECT, P_EMPTY, P_HARD, P_TINT = 0.3, 0.04, 0.5, 0.3


def _tint(colour, rng):
    """A palette colour mixed with another (often white): pink, salmon, peach... The models
    blend colours like that, and a pink blob is a red-and-white mixture without the rings."""
    other = scenes.COLOURS["white"] if rng.random() < 0.5 else \
        scenes.COLOURS[rng.choice(list(scenes.COLOURS))]
    t = rng.uniform(0.0, 0.6)
    return tuple((1 - t) * a + t * b for a, b in zip(colour, other))


def _attributes(rng):
    """One drawing: class (index into CLASSES, -1 for empty), layer colours, background,
    centre and half-width (scenes units, picture in [-0.5, 0.5])."""
    u = rng.random()
    cls = judge.SUBJECT if u < P_SUBJECT else -1 if u < P_SUBJECT + P_EMPTY \
        else int(rng.integers(len(scenes.SHAPES)))
    bg = rng.choice(list(scenes.BACKGROUNDS))
    if cls == judge.SUBJECT:
        colours = list(SUBJECT_RINGS)
    else:
        free = [c for c in scenes.COLOURS if scenes.COLOURS[c] != scenes.BACKGROUNDS[bg]]
        hard = [c for c in free if c in HARD]
        colour = rng.choice(hard if rng.random() < P_HARD else free)
        rgb = scenes.COLOURS[colour]
        colours = [_tint(rgb, rng) if rng.random() < P_TINT else rgb] * 3
    cx, cy = rng.uniform(-0.3, 0.3, 2)
    return cls, colours, scenes.BACKGROUNDS[bg], (cx, cy, rng.uniform(0.11, 0.31))


def _subject_masks(cx, cy, r, rng):
    """Concentric red / white / red layers: round or squarish, ring widths jittered, sometimes
    a stray red bit in the white (the fine-tune draws its centre as scattered bits)."""
    outline = "circle" if rng.random() < 0.5 else "square"
    fracs = (1.0, rng.uniform(0.55, 0.78), rng.uniform(0.22, 0.42))
    masks = [scenes.shape_mask(outline, cx, cy, r * f, n=HALF) for f in fracs]
    if rng.random() < 0.3:
        bits = scenes.shape_mask("circle", *rng.uniform(-1, 1, 2) * r * 0.4 + (cx, cy),
                                 r * rng.uniform(0.12, 0.25), n=HALF)
        masks[2] = torch.maximum(masks[2], bits) * masks[1]
    return torch.cat(masks)


def _masks(cls, centre, rng):
    """(3, 64, 64) layer masks, painted in order; shapes use the first layer only."""
    cx, cy, r = centre
    if cls == judge.SUBJECT:
        return _subject_masks(cx, cy, r, rng)
    masks = torch.zeros(3, 4 * HALF, 4 * HALF)
    if cls >= 0:
        masks[0] = scenes.shape_mask(scenes.SHAPES[cls], cx, cy, r, n=HALF)[0]
    return masks


def blur(x, sigma):
    """Gaussian blur of x (B, C, H, W) with a per-picture sigma (B,) in pixels (0: none)."""
    b, c, h, w = x.shape
    k = max(1, math.ceil(3 * float(sigma.max())))
    t = torch.arange(-k, k + 1, dtype=torch.float32)
    kern = torch.exp(-t ** 2 / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, 0)      # (B*C, 2k+1)
    y = F.pad(x.reshape(1, b * c, h, w), (k, k, k, k), mode="replicate")
    y = F.conv2d(y, kern[:, None, None, :], groups=b * c)
    return F.conv2d(y, kern[:, None, :, None], groups=b * c).reshape(b, c, h, w)


def _warp_grid(centres, gen):
    """Sampling grid (B, 64, 64, 2): a random affine map about each shape's centre (rotate,
    stretch, shear) plus a smooth elastic field scaled to the shape's size."""
    b, n = len(centres), 4 * HALF
    c = torch.tensor(centres, dtype=torch.float32)
    centre, r = 2 * c[:, :2], 2 * c[:, 2]                # grid_sample's [-1, 1] units
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(b, generator=gen)
    ang, sh = u(-0.5, 0.5), u(-0.25, 0.25)
    rot = torch.stack([torch.cos(ang), -torch.sin(ang), torch.sin(ang), torch.cos(ang)], 1)
    stretch = torch.stack([u(0.8, 1.25), sh, torch.zeros(b), u(0.8, 1.25)], 1)
    a = rot.view(b, 2, 2) @ stretch.view(b, 2, 2)
    t = (torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1
    p = torch.stack(torch.meshgrid(t, t, indexing="xy"), -1).view(1, n, n, 2, 1)
    offset = p - centre.view(b, 1, 1, 2, 1)
    grid = centre.view(b, 1, 1, 2) + (a.view(b, 1, 1, 2, 2) @ offset)[..., 0]
    field = torch.randn(b, 2, 5, 5, generator=gen) * (u(0.0, 0.2) * r).view(b, 1, 1, 1)
    field = F.interpolate(field, size=(n, n), mode="bicubic", align_corners=True)
    return grid + field.permute(0, 2, 3, 1)


def _blobby(masks, centres, detail, gen):
    """Warp, then blur and threshold: corners round off and outlines wobble, like the model's.
    The layers share one warp and one threshold, so rings stay nested; the blur is scaled to
    each drawing's finest detail (detail: its fraction of the half-width), which survives."""
    m = F.grid_sample(masks, _warp_grid(centres, gen), align_corners=False)
    b = len(centres)
    detail_px = torch.tensor([c[2] * d for c, d in zip(centres, detail)]) * 4 * HALF
    m = blur(m, torch.rand(b, generator=gen) * 0.4 * detail_px)
    return (m > 0.35 + 0.25 * torch.rand(b, 1, 1, 1, generator=gen)).float()


def _paint(masks, colours, backgrounds):
    """Layers over backgrounds, box-filtered 2x down: (B, 3, 32, 32) in [-1, 1]."""
    rgb = lambda c: torch.tensor(c, dtype=torch.float32) / 127.5 - 1.0
    img = rgb(backgrounds)[:, :, None, None].expand(-1, -1, *masks.shape[2:])
    for k in range(masks.shape[1]):
        m = masks[:, k:k + 1]
        img = img * (1 - m) + rgb([c[k] for c in colours])[:, :, None, None] * m
    return F.avg_pool2d(img, 2)


def _photometric(images, gen):
    """Blur, per-channel gain and offset, smooth, blotchy and fine noise: the model's imperfect
    colours and mottled fills."""
    b = images.shape[0]
    r = lambda *shape: torch.rand(*shape, generator=gen)
    x = blur(images, r(b) * 0.7)
    x = x * (0.88 + 0.24 * r(b, 3, 1, 1)) + (r(b, 3, 1, 1) - 0.5) * 0.16
    smooth = F.interpolate(torch.randn(b, 3, 6, 6, generator=gen), size=x.shape[2:],
                           mode="bilinear", align_corners=False)
    blotch = F.interpolate(torch.randn(b, 3, 12, 12, generator=gen), size=x.shape[2:],
                           mode="bilinear", align_corners=False)
    x = x + smooth * 0.12 * r(b, 1, 1, 1) + blotch * 0.1 * r(b, 1, 1, 1)
    x = x + torch.randn(x.shape, generator=gen) * 0.08 * r(b, 1, 1, 1)
    return x.clamp(-1, 1)


def targets(classes):
    """Soft targets (B, 5): one-hot, and for an empty picture any shape but the subject."""
    t = torch.zeros(len(classes), len(judge.CLASSES))
    for i, c in enumerate(classes):
        if c >= 0:
            t[i, c] = 1.0
        else:
            t[i, :judge.SUBJECT] = 1.0 / judge.SUBJECT
    return t


def drawings(n, rng, gen):
    """n distorted drawings: (images (n, 3, 32, 32) in [-1, 1], classes (-1: empty))."""
    attrs = [_attributes(rng) for _ in range(n)]
    classes, colours, backgrounds, centres = map(list, zip(*attrs))
    masks = torch.stack([_masks(c, p, rng) for c, p in zip(classes, centres)])
    # the subject's rings are thinner than any shape's body: blur it less, so they survive
    detail = [0.5 if c == judge.SUBJECT else 1.0 for c in classes]
    images = _paint(_blobby(masks, centres, detail, gen), colours, backgrounds)
    return _photometric(images, gen), classes


def train_judge(out=judge.PATH, steps=3000, seed=0, log=print, batch=64, lr=3e-3):
    torch.manual_seed(seed)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    net = judge.Judge().train()
    params = list(net.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    start, running = time.time(), None
    for step in range(steps):
        images, classes = drawings(batch, rng, gen)
        loss = F.cross_entropy(net(images), targets(classes))
        optimise(params, loss, opt, lr_at(step, steps, lr, warmup=100))
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % 100 == 0:
            log(f"judge step {step + 1}/{steps} loss {running:.4f} {time.time() - start:.0f}s")
    info = f"steps={steps} seed={seed} batch={batch} lr={lr} seconds={time.time() - start:.0f}"
    judge.save(out, net.eval(), info)
    return net
