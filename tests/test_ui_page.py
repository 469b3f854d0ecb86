"""The page module without a browser: it builds, answers a setting (numbers, table, plot,
layers) in under 0.2 s, the plot's axes and caption, style.css holds the page's rules, and
`deltasvd ui` refuses a missing folder."""

import math
import os
import re
import statistics
import time

import pytest

from deltasvd.cli import main
from deltasvd.explorer import Explorer
from deltasvd.svg_plot import caption, log_ticks, threshold_plot
from ui_env import require_gradio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plot_marks_the_current_point():
    svg = threshold_plot([0.1, 0.5, 1.0], [1.0, 2.0, 4.0], [0.5, 0.8, 1.0], 0.5, 2.0, 0.8,
                         "energy threshold")
    # two marker dots, and the legend's
    assert svg.startswith("<svg") and svg.count("<circle") == 3 and svg.count("<polyline") == 2
    assert 'x1="300.0" x2="300.0"' in svg   # half way across the plot area (58 .. 542)
    assert "log scale" in svg and "MiB" in svg and "MB" not in svg.replace("MiB", "")


def test_size_axis_is_logarithmic_with_round_ticks():
    svg = threshold_plot([0.02, 0.3, 1.0], [0.2, 1.0, 30.0], [0.6, 0.9, 1.0], 0.3, 1.0, 0.9,
                         "energy threshold")
    ys = {float(v): float(y) for y, v in
          re.findall(r'class="size-tick" x="[\d.]+" y="([\d.]+)"[^>]*>([\d.]+)<', svg)}
    assert sorted(ys) == [0.2, 0.5, 1, 2, 5, 10, 20]
    # equal ratios, equal distances: 1 -> 10 as far as 2 -> 20
    assert ys[1] - ys[10] == pytest.approx(ys[2] - ys[20], abs=0.2)


@pytest.mark.parametrize("lo,hi", [(0.18, 37.0), (20.0, 5000.0), (0.9, 1.3), (3.1, 3.2),
                                   (1e-3, 2e-3)])
def test_log_ticks_are_round_and_inside(lo, hi):
    ticks = log_ticks(lo, hi)
    assert len(ticks) >= 2 and all(lo <= t <= hi for t in ticks) or ticks == [lo, hi]
    if ticks != [lo, hi]:
        for t in ticks:
            m = t / 10 ** math.floor(math.log10(t))
            assert round(m, 6) in (1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9), t


def test_caption_explains_each_mode():
    assert "log scale" in caption("energy") and "energy threshold" in caption("energy")
    assert "Frobenius threshold" in caption("fro")
    assert "off the curves" in caption("size_mb") and "size budget" in caption("size_mb")
    assert "off the curves" in caption("rank")
    assert "off the curves" not in caption("energy")


def test_style_css_holds_the_page_rules():
    """A1111 / Forge load style.css, a standalone page gets ui.CSS: the same rules."""
    require_gradio()
    from deltasvd import ui
    with open(os.path.join(ROOT, "style.css")) as f:
        assert ui.CSS in f.read()
    assert ".dsvd-error" in ui.CSS


def test_page_builds_and_answers_fast(tiny_pair, tmp_path):
    require_gradio()
    from deltasvd import ui
    from deltasvd.ui_actions import standalone
    blocks = ui.build(standalone(str(tmp_path), str(tmp_path)))
    ids = {getattr(b, "elem_id", None) for b in blocks.blocks.values()}
    assert {"dsvd-analyze", "dsvd-value", "dsvd-groups", "dsvd-layers", "dsvd-save",
            "dsvd-inspect", "dsvd-resize", "dsvd-overwrite", "dsvd-resize-overwrite",
            "dsvd-status", "dsvd-file-status", "dsvd-title"} <= ids
    pickers = [b for b in blocks.blocks.values()
               if getattr(b, "elem_id", None) in ("dsvd-base", "dsvd-tuned")]
    assert len(pickers) == 2 and all(not p.value for p in pickers)   # nothing chosen yet
    explorer = Explorer.from_files(*tiny_pair)
    ui._render(explorer, "energy", 0.5, "size")  # the curve is computed once, then cached
    times = []
    for mode, value in [("energy", v / 20) for v in range(1, 21)] + [("rank", 4),
                                                                     ("Frobenius", 0.9)]:
        start = time.perf_counter()
        numbers, table, plot, layers = ui._render(explorer, mode, value, "rank")
        times.append(time.perf_counter() - start)
        assert "MiB" in numbers and "total" in table and "<svg" in plot and len(layers)
        assert "kept energy, sum s" in numbers and "kept Frobenius, s^2" in numbers
    assert statistics.median(times) <= 0.2, times


def test_unknown_options_are_dropped():
    require_gradio()
    from deltasvd import ui

    def fn(a, b=1):
        return a, b
    assert ui._accepted(fn, {"b": 2, "newer_option": 3}) == {"b": 2}


def test_ui_refuses_a_missing_models_folder(tmp_path, capsys):
    require_gradio()
    assert main(["ui", "--models", str(tmp_path / "missing")]) == 1
    assert "models folder does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["x"])
def test_ui_usage_error(port):
    with pytest.raises(SystemExit) as e:
        main(["ui", "--port", port])
    assert e.value.code == 2
