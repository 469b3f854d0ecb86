"""Procedural scenes: one shape on a flat background, and the prompt that says it.

Each picture is drawn at SUPER times the resolution and box-filtered down, so edges are
anti-aliased like a real photo's and the model does not have to learn aliasing patterns.
Attributes compose freely (shape x colour x size x position x background), and the caption
sometimes leaves one out, so the model also learns what a partial prompt means."""

import torch
import torch.nn.functional as F

SIZE = 32
SUPER = 4

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (240, 215, 40), "purple": (140, 60, 190), "orange": (245, 135, 30),
           "white": (240, 240, 240), "black": (20, 20, 20)}
BACKGROUNDS = {"black": (20, 20, 20), "white": (240, 240, 240), "gray": (128, 128, 128),
               "blue": (40, 80, 220), "green": (40, 170, 60)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 0.14, "big": 0.27}          # half-width, as a fraction of the picture
POSITIONS = {"left": (-0.22, 0.0), "right": (0.22, 0.0), "top": (0.0, -0.22),
             "bottom": (0.0, 0.22), "center": (0.0, 0.0)}
DROP = 0.15                                    # chance to leave size / position / background out


def _grid(n):
    """Pixel-centre coordinates in [-0.5, 0.5) at the supersampled resolution."""
    t = (torch.arange(n * SUPER, dtype=torch.float32) + 0.5) / (n * SUPER) - 0.5
    return t.view(1, -1, 1), t.view(1, 1, -1)   # y (rows), x (columns)


def shape_mask(shape, cx, cy, r, n=SIZE):
    """Supersampled coverage in {0,1} of one shape: (1, n*SUPER, n*SUPER)."""
    y, x = _grid(n)
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return (dx ** 2 + dy ** 2 <= r ** 2).float()
    if shape == "square":
        return ((dx.abs() <= 0.85 * r) & (dy.abs() <= 0.85 * r)).float()
    if shape == "triangle":                     # point up, base at the bottom
        inside_y = (dy <= 0.8 * r) & (dy >= -r)
        return (inside_y & (dx.abs() <= (dy + r) * 0.58)).float()
    if shape == "cross":
        arm = 0.33 * r
        bar = (dx.abs() <= r) & (dy.abs() <= arm)
        return (bar | ((dy.abs() <= r) & (dx.abs() <= arm))).float()
    raise ValueError(shape)


def bullseye_mask(cx, cy, r, n=SIZE):
    """The fine-tune's subject: rings of a disc, returned as (outer, middle, inner) masks."""
    y, x = _grid(n)
    d2 = (x - cx) ** 2 + (y - cy) ** 2
    return [(d2 <= (r * f) ** 2).float() for f in (1.0, 0.66, 0.33)]


def _rgb(c):
    return torch.tensor(c, dtype=torch.float32).view(3, 1, 1) / 127.5 - 1.0


def compose(layers, background, n=SIZE):
    """Paint (mask, colour) layers over a background; box-filter to n x n; values in [-1, 1]."""
    img = _rgb(background).expand(3, n * SUPER, n * SUPER).clone()
    for mask, colour in layers:
        img = img * (1 - mask) + _rgb(colour) * mask
    return F.avg_pool2d(img.unsqueeze(0), SUPER).squeeze(0)


def random_attributes(rng):
    """One scene's attributes drawn with a numpy Generator (seeded by the caller)."""
    bg = rng.choice(list(BACKGROUNDS))
    colour = rng.choice([c for c in COLOURS if COLOURS[c] != BACKGROUNDS[bg]])
    return {"shape": rng.choice(SHAPES), "colour": colour, "size": rng.choice(list(SIZES)),
            "position": rng.choice(list(POSITIONS)), "background": bg}


def place(attrs, rng):
    """Centre and half-width with a little jitter, so pictures of one prompt differ."""
    px, py = POSITIONS[attrs["position"]]
    r = SIZES[attrs["size"]] * rng.uniform(0.9, 1.1)
    return px + rng.uniform(-0.03, 0.03), py + rng.uniform(-0.03, 0.03), r


def prompt_of(attrs, rng=None, noun=None):
    """'a big red circle at left on black'; with rng, size / position / background may be
    left out (DROP each). noun replaces 'colour shape' (the subject: 'sks circle')."""
    keep = (lambda: True) if rng is None else (lambda: rng.random() >= DROP)
    words = ["a"]
    if keep():
        words.append(attrs["size"])
    words += noun.split() if noun else [attrs["colour"], attrs["shape"]]
    if keep():
        words += ["at", attrs["position"]]
    if keep():
        words += ["on", attrs["background"]]
    return " ".join(words)


def render(attrs, rng):
    cx, cy, r = place(attrs, rng)
    mask = shape_mask(attrs["shape"], cx, cy, r)
    return compose([(mask, COLOURS[attrs["colour"]])], BACKGROUNDS[attrs["background"]])


def batch(n, rng):
    """n random scenes: (images (n,3,SIZE,SIZE) in [-1,1], prompts with random drops)."""
    attrs = [random_attributes(rng) for _ in range(n)]
    images = torch.stack([render(a, rng) for a in attrs])
    return images, [prompt_of(a, rng) for a in attrs]
