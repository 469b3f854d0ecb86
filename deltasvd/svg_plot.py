"""The explorer's plot as an SVG string: size and retained energy against the threshold, with
the current setting marked. Plain SVG, so it shows in every gradio version's HTML component
without a plotting library."""

from html import escape

W, H, PAD_L, PAD_R, PAD_T, PAD_B = 560, 260, 56, 56, 16, 40
SIZE_COLOUR, KEPT_COLOUR, MARK_COLOUR = "#2563eb", "#16a34a", "#dc2626"


def _scale(v, lo, hi, a, b):
    return a + (b - a) * ((v - lo) / (hi - lo) if hi > lo else 0.0)


def _polyline(xs, ys, x_range, y_range, colour):
    pts = " ".join(f"{_scale(x, *x_range, PAD_L, W - PAD_R):.1f},"
                   f"{_scale(y, *y_range, H - PAD_B, PAD_T):.1f}" for x, y in zip(xs, ys))
    return f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{pts}"/>'


def _text(x, y, s, colour="#444", anchor="middle"):
    return (f'<text x="{x:.1f}" y="{y:.1f}" fill="{colour}" font-size="11" '
            f'text-anchor="{anchor}">{escape(s)}</text>')


def threshold_plot(thresholds, mb, kept, now_x, now_mb, now_kept, xlabel):
    """SVG of size (MB, left axis) and kept Frobenius energy (right axis, 0..1) against the
    threshold; the current point (now_x, now_mb / now_kept) is marked."""
    xr = (0.0, 1.0)
    yr = (0.0, max(max(mb), now_mb) * 1.05 or 1.0)
    kr = (0.0, 1.0)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             f'viewBox="0 0 {W} {H}" id="dsvd-svg" style="background:#fff">',
             f'<rect x="{PAD_L}" y="{PAD_T}" width="{W - PAD_L - PAD_R}" '
             f'height="{H - PAD_T - PAD_B}" fill="none" stroke="#999"/>']
    for f in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = _scale(f, *xr, PAD_L, W - PAD_R)
        parts.append(_text(x, H - PAD_B + 14, f"{f:.2f}"))
        parts.append(_text(PAD_L - 4, _scale(f * yr[1], *yr, H - PAD_B, PAD_T) + 4,
                           f"{f * yr[1]:.1f}", SIZE_COLOUR, "end"))
        parts.append(_text(W - PAD_R + 4, _scale(f, *kr, H - PAD_B, PAD_T) + 4, f"{f:.2f}",
                           KEPT_COLOUR, "start"))
    parts.append(_text((PAD_L + W - PAD_R) / 2, H - 6, xlabel))
    parts.append(_text(PAD_L, PAD_T - 4, "MB", SIZE_COLOUR, "end"))
    parts.append(_text(W - PAD_R, PAD_T - 4, "kept Frobenius energy", KEPT_COLOUR, "end"))
    parts.append(_polyline(thresholds, mb, xr, yr, SIZE_COLOUR))
    parts.append(_polyline(thresholds, kept, xr, kr, KEPT_COLOUR))
    x = _scale(now_x, *xr, PAD_L, W - PAD_R)
    parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{PAD_T}" y2="{H - PAD_B}" '
                 f'stroke="{MARK_COLOUR}" stroke-dasharray="4 3"/>')
    for y, r in ((_scale(now_mb, *yr, H - PAD_B, PAD_T), 5),
                 (_scale(now_kept, *kr, H - PAD_B, PAD_T), 4)):
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{MARK_COLOUR}"/>')
    parts.append("</svg>")
    return "".join(parts)
