"""DeltaSVDSpectrum: the rank / size trade-off of a delta as an IMAGE.

Left: per layer group, the fraction of the group's energy kept against rank (log axis), with
the delta's threshold and each group's median chosen rank. Right: file size against threshold,
with the delta's own point; thresholds below it are reachable with Delta-SVD Resize, above it
only by compressing again. The numbers come from deltasvd.plot; this file only draws (Pillow,
which ComfyUI ships)."""

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..deltasvd import families
from ..deltasvd import plot
from ..deltasvd.delta_file import is_coded
from ..deltasvd.errors import DeltaError
from .common import CATEGORY, DELTA, delta_bytes

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39",
           "#7b4173", "#3182bd", "#e6550d"]
BG, FG, GRID, SHADE = "#ffffff", "#222222", "#dddddd", "#e8f3e8"


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


class Axes:
    """A rectangle with data -> pixel mapping (x optionally log)."""

    def __init__(self, draw, box, xlim, ylim, xlog=False):
        self.d, self.box, self.xlim, self.ylim, self.xlog = draw, box, xlim, ylim, xlog

    def _fx(self, x):
        lo, hi = self.xlim
        if self.xlog:
            x, lo, hi = math.log10(max(x, 1e-12)), math.log10(lo), math.log10(hi)
        return (x - lo) / ((hi - lo) or 1.0)

    def px(self, x, y):
        x0, y0, x1, y1 = self.box
        fy = (y - self.ylim[0]) / ((self.ylim[1] - self.ylim[0]) or 1.0)
        return x0 + self._fx(x) * (x1 - x0), y1 - fy * (y1 - y0)

    def frame(self, font, xticks, yticks, xlabel, ylabel, fmt_x=str, fmt_y=str):
        x0, y0, x1, y1 = self.box
        for v in xticks:
            x, _ = self.px(v, self.ylim[0])
            self.d.line([(x, y0), (x, y1)], fill=GRID)
            self.d.text((x, y1 + 4), fmt_x(v), fill=FG, font=font, anchor="ma")
        for v in yticks:
            _, y = self.px(self.xlim[0], v)
            self.d.line([(x0, y), (x1, y)], fill=GRID)
            self.d.text((x0 - 6, y), fmt_y(v), fill=FG, font=font, anchor="rm")
        self.d.rectangle(self.box, outline=FG)
        self.d.text(((x0 + x1) / 2, y1 + 22), xlabel, fill=FG, font=font, anchor="ma")
        self.d.text((x0, y0 - 6), ylabel, fill=FG, font=font, anchor="ld")

    def line(self, xs, ys, color, width=2):
        pts = [self.px(x, y) for x, y in zip(xs, ys)]
        if len(pts) > 1:
            self.d.line(pts, fill=color, width=width)

    def dashed(self, p0, p1, color, dash=8):
        (xa, ya), (xb, yb) = p0, p1
        n = max(int(math.hypot(xb - xa, yb - ya) / dash), 1)
        for i in range(0, n, 2):
            t0, t1 = i / n, min((i + 1) / n, 1.0)
            self.d.line([(xa + (xb - xa) * t0, ya + (yb - ya) * t0),
                         (xa + (xb - xa) * t1, ya + (yb - ya) * t1)], fill=color, width=2)

    def dot(self, x, y, color, r=4):
        cx, cy = self.px(x, y)
        self.d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color, outline=FG)


def _log_ticks(hi):
    return [v for v in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if v <= hi]


def render(delta, width=1024, height=560):
    """The plot as a PIL image."""
    width, height = max(int(width), 480), max(int(height), 320)
    img = Image.new("RGB", (width, height), BG)
    d = ImageDraw.Draw(img)
    small, normal = _font(max(10, height // 48)), _font(max(12, height // 36))
    measure = plot.measure_of(delta)
    word = "energy (sum of s)" if measure == "energy" else "Frobenius energy (sum of s^2)"
    threshold = plot.current_threshold(delta)
    size = delta_bytes(delta)
    info = delta.info
    title = (f"{families.title(delta.family)} delta: {info.get('mode')} = "
             f"{info.get('value')}, {size / 2**20:.2f} MiB, factors {info.get('dtype')}")
    d.text((width / 2, 8), title, fill=FG, font=normal, anchor="ma")
    top, bottom = 48, height - 56
    split = int(width * 0.56)
    curves = plot.energy_curves(delta, measure)
    if not curves:
        d.text((width / 2, height / 2), "this delta holds no factored layer (nothing to plot)",
               fill=FG, font=normal, anchor="mm")
        return img

    # left: kept fraction against rank, per group
    rmax = max(int(c.ranks[-1]) for c in curves)
    left = Axes(d, (64, top, split - 150, bottom), (1, max(rmax, 2)), (0.0, 1.0), xlog=True)
    left.frame(small, _log_ticks(rmax), [0, 0.25, 0.5, 0.75, 1.0], "rank (log)",
               f"fraction of {word} kept", fmt_y=lambda v: f"{v:g}")
    if threshold is not None:
        left.dashed(left.px(1, threshold), left.px(max(rmax, 2), threshold), "#000000")
        x, y = left.px(max(rmax, 2), threshold)
        d.text((x - 4, y - 4), f"threshold {threshold:g}", fill=FG, font=small, anchor="rb")
    lx, ly = split - 140, top
    d.text((lx, ly), "group (matrix pieces, rank ~)", fill=FG, font=small)   # the legend's key
    ly += small.size + 5 if hasattr(small, "size") else 16
    for i, c in enumerate(curves):
        color = PALETTE[i % len(PALETTE)]
        left.line(c.ranks, c.kept, color)
        r = max(min(c.chosen, len(c.kept)), 1)
        left.dot(r, float(c.kept[r - 1]), color)
        d.rectangle([lx, ly + 3, lx + 12, ly + 13], fill=color)
        d.text((lx + 16, ly), f"{c.group} ({c.layers}, ~{c.chosen})", fill=FG, font=small)
        ly += small.size + 5 if hasattr(small, "size") else 16

    # right: file size against threshold
    ts, sizes = plot.size_curve(delta, size, measure)
    mb = sizes / 2**20
    ymax = float(max(mb.max(), size / 2**20)) * 1.08 or 1.0
    right = Axes(d, (split + 70, top, width - 24, bottom), (0.0, 1.0), (0.0, ymax))
    yt = _nice_ticks(ymax)
    right.frame(small, [0, 0.2, 0.4, 0.6, 0.8, 1.0], yt, f"{measure} threshold",
                "file size (MiB)", fmt_x=lambda v: f"{v:g}", fmt_y=lambda v: f"{v:g}")
    if threshold is not None:
        x0, y0 = right.px(0.0, ymax)
        x1, y1 = right.px(threshold, 0.0)
        d.rectangle([x0 + 1, y0 + 1, x1, y1 - 1], fill=SHADE)
        d.text((x0 + 6, y0 + 6), "reachable with Resize", fill="#2f6f2f", font=small)
        right.frame(small, [0, 0.2, 0.4, 0.6, 0.8, 1.0], yt, f"{measure} threshold",
                    "file size (MiB)", fmt_x=lambda v: f"{v:g}", fmt_y=lambda v: f"{v:g}")
    right.line(ts, mb, "#1f77b4")
    if threshold is not None:
        right.dot(threshold, size / 2**20, "#d62728", r=5)
        cx, cy = right.px(threshold, size / 2**20)
        d.text((cx + 8, cy - 8), f"{size / 2**20:.2f} MiB", fill=FG, font=small, anchor="lb")
    else:
        right.dashed(right.px(0, size / 2**20), right.px(1, size / 2**20), "#d62728")
        d.text(right.px(0, size / 2**20), f"  this delta: {size / 2**20:.2f} MiB", fill=FG,
               font=small, anchor="lb")
    return img


def _nice_ticks(hi, n=5):
    step = 10 ** math.floor(math.log10(hi / n)) if hi > 0 else 1
    for m in (1, 2, 2.5, 5, 10):
        if hi / (step * m) <= n:
            step *= m
            break
    return [round(i * step, 6) for i in range(int(hi / step) + 1)]


def to_image_tensor(img):
    """PIL image -> ComfyUI IMAGE (1 x H x W x 3, float32 in 0..1)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]


class DeltaSVDSpectrum:
    DESCRIPTION = (
        "Plot a delta's trade-off: per layer group, the energy kept against rank with the "
        "chosen threshold, and the file size each threshold would give. Thresholds below the "
        "delta's own can be reached with Delta-SVD Resize.")
    CATEGORY = CATEGORY
    FUNCTION = "plot"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The plot; connect Preview Image or Save Image.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"delta": (DELTA, {"tooltip": "The delta to plot."})},
            "optional": {
                "width": ("INT", {"default": 1024, "min": 480, "max": 4096, "step": 8,
                                  "tooltip": "Image width in pixels."}),
                "height": ("INT", {"default": 560, "min": 320, "max": 4096, "step": 8,
                                   "tooltip": "Image height in pixels."}),
            },
        }

    def plot(self, delta, width=1024, height=560):
        if is_coded(delta):
            raise DeltaError(f"the spectrum plot is for LoRA-format (svd) deltas; this one is "
                             f"coded ({delta.info.get('codec')}): convert it first")
        return (to_image_tensor(render(delta, width, height)),)
