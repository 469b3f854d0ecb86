"""The explorer's plot as an SVG string: file size (log scale) and kept Frobenius energy against
the threshold, with the current setting marked, and the caption that says how to read it. Plain
SVG, so it shows in every gradio version's HTML component without a plotting library."""

import math
from html import escape

W, H, PAD_L, PAD_R, PAD_T, PAD_B = 600, 300, 58, 58, 48, 40
SIZE_COLOUR, KEPT_COLOUR, MARK_COLOUR, GRID_COLOUR = "#2563eb", "#16a34a", "#dc2626", "#e5e7eb"
X_TICKS = [i / 10 for i in range(11)]
KEPT_TICKS = [i / 5 for i in range(6)]


def log_ticks(lo, hi):
    """Round values inside lo..hi (0 < lo < hi) for a log axis: 1, 2, 5 x 10^k, or denser
    mantissas when the range is short; the ends themselves when nothing round falls inside."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks = []
    for mantissas in ((1, 2, 5), (1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [float(f"{m * 10.0 ** k:.6g}") for k in decades for m in mantissas
                 if lo <= m * 10.0 ** k <= hi]
        if len(ticks) >= 3:
            return ticks
    return ticks if len(ticks) >= 2 else [lo, hi]


def _label(v):
    return f"{v:.3g}"


def _scale(v, lo, hi, a, b):
    return a + (b - a) * ((v - lo) / (hi - lo) if hi > lo else 0.0)


class _Axes:
    """Data -> pixel: x linear 0..1, size on a log scale, kept energy linear 0..1."""

    def __init__(self, sizes):
        lo, hi = min(sizes), max(sizes)
        if hi <= lo * 1.05:         # a flat curve (one layer, one rank): a short range
            lo, hi = lo / 1.5, hi * 1.5
        self.size_lo, self.size_hi = lo / 1.15, hi * 1.15

    def x(self, v):
        return _scale(v, 0.0, 1.0, PAD_L, W - PAD_R)

    def size(self, mb):
        mb = min(max(mb, self.size_lo), self.size_hi)
        return _scale(math.log(mb), math.log(self.size_lo), math.log(self.size_hi),
                      H - PAD_B, PAD_T)

    def kept(self, v):
        return _scale(v, 0.0, 1.0, H - PAD_B, PAD_T)


def _polyline(points, colour):
    pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    return f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{pts}"/>'


def _text(x, y, s, colour="#444", anchor="middle", cls="tick"):
    return (f'<text class="{cls}" x="{x:.1f}" y="{y:.1f}" fill="{colour}" font-size="11" '
            f'text-anchor="{anchor}">{escape(s)}</text>')


def _grid(axes, size_ticks):
    """Grid lines and tick labels: threshold below, MiB left, kept energy right."""
    out = []
    for f in X_TICKS:
        x = axes.x(f)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{PAD_T}" y2="{H - PAD_B}" '
                   f'stroke="{GRID_COLOUR}"/>')
        out.append(_text(x, H - PAD_B + 14, f"{f:.1f}"))
    for v in size_ticks:
        y = axes.size(v)
        out.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{y:.1f}" y2="{y:.1f}" '
                   f'stroke="{GRID_COLOUR}"/>')
        out.append(_text(PAD_L - 4, y + 4, _label(v), SIZE_COLOUR, "end", "size-tick"))
    for v in KEPT_TICKS:
        out.append(_text(W - PAD_R + 4, axes.kept(v) + 4, f"{v:.1f}", KEPT_COLOUR, "start",
                         "kept-tick"))
    return out


def _legend():
    """One line above the plot: what each colour is."""
    out, x, y = [], PAD_L, 14
    for colour, what, dot in ((SIZE_COLOUR, "file size, MiB (log scale, left)", False),
                              (KEPT_COLOUR, "kept Frobenius energy (right)", False),
                              (MARK_COLOUR, "this setting", True)):
        if dot:
            out.append(f'<circle cx="{x + 9}" cy="{y - 4}" r="4" fill="{colour}"/>')
        else:
            out.append(f'<line x1="{x}" x2="{x + 18}" y1="{y - 4}" y2="{y - 4}" '
                       f'stroke="{colour}" stroke-width="2"/>')
        out.append(_text(x + 22, y, what, "#333", "start", "legend"))
        x += 30 + 6 * len(what)
    return out


def threshold_plot(thresholds, mb, kept, now_x, now_mb, now_kept, xlabel):
    """SVG of size (MiB, left axis, log scale) and kept Frobenius energy (right axis, 0..1)
    against the threshold; the current point (now_x, now_mb / now_kept) is marked."""
    axes = _Axes(list(mb) + [now_mb])
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             f'viewBox="0 0 {W} {H}" id="dsvd-svg" style="background:#fff;max-width:100%;'
             f'height:auto">',
             *_legend(),
             *_grid(axes, log_ticks(axes.size_lo, axes.size_hi)),
             f'<rect x="{PAD_L}" y="{PAD_T}" width="{W - PAD_L - PAD_R}" '
             f'height="{H - PAD_T - PAD_B}" fill="none" stroke="#999"/>',
             # axis titles above their axes, clear of the top tick labels
             _text(PAD_L - 4, PAD_T - 12, "MiB", SIZE_COLOUR, "end", "axis"),
             _text(W - PAD_R + 4, PAD_T - 12, "kept", KEPT_COLOUR, "start", "axis"),
             _text((PAD_L + W - PAD_R) / 2, H - 6, xlabel, "#444", "middle", "axis"),
             _polyline([(axes.x(t), axes.size(m)) for t, m in zip(thresholds, mb)],
                       SIZE_COLOUR),
             _polyline([(axes.x(t), axes.kept(k)) for t, k in zip(thresholds, kept)],
                       KEPT_COLOUR)]
    x = axes.x(now_x)
    parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{PAD_T}" y2="{H - PAD_B}" '
                 f'stroke="{MARK_COLOUR}" stroke-dasharray="4 3"/>')
    for y, r in ((axes.size(now_mb), 5), (axes.kept(now_kept), 4)):
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{MARK_COLOUR}"/>')
    parts.append("</svg>")
    return "".join(parts)


_READ = ("Blue: the file size each {rule} threshold gives, on a log scale, so that the small "
         "thresholds (where a file is a few hundred KiB and changes by a few per cent) stay "
         "readable. Green: the kept Frobenius energy, sum of s^2 = 1 - rel. error^2 (the "
         "numbers' \"kept Frobenius\"). Red: this setting.")
_OFF_CURVE = {
    "size_mb": "In size mode the curves are still the energy rule's (one threshold for every "
               "layer), and the marker stands at the energy this setting keeps (sum of s, the "
               "numbers' \"kept energy\"). Its dots sit off the curves, and that is the point: "
               "the size budget gives each rank to the layer where it removes the most squared "
               "error per byte, so at that energy its file is smaller than the energy rule's "
               "(the blue dot below the blue curve) and its error lower (the green dot above "
               "the green curve).",
    "rank": "In rank mode the curves are the energy rule's and the marker stands at the energy "
            "this setting keeps (sum of s, the numbers' \"kept energy\"). With one rank for "
            "every layer its dots sit off the curves: a blue dot below the blue curve means it "
            "keeps that energy in a smaller file than the energy rule would, above it in a "
            "larger one.",
}


def caption(mode):
    """How to read the plot for a mode (energy, fro, rank, size_mb), as plain text."""
    text = _READ.format(rule="Frobenius" if mode == "fro" else "energy")
    return text + (" " + _OFF_CURVE[mode] if mode in _OFF_CURVE else "")
