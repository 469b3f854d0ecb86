"""The page module without a browser: it builds, answers a setting (numbers, table, plot,
layers) in under 0.2 s, and `deltasvd ui` refuses a missing folder."""

import statistics
import time

import pytest

from deltasvd.cli import main
from deltasvd.explorer import Explorer
from deltasvd.svg_plot import threshold_plot
from ui_env import require_gradio


def test_plot_marks_the_current_point():
    svg = threshold_plot([0.1, 0.5, 1.0], [1.0, 2.0, 4.0], [0.5, 0.8, 1.0], 0.5, 2.0, 0.8,
                         "energy threshold")
    assert svg.startswith("<svg") and svg.count("<circle") == 2 and svg.count("<polyline") == 2
    assert 'x1="280.0"' in svg   # half way across the plot area (56 .. 504)


def test_page_builds_and_answers_fast(tiny_pair, tmp_path):
    require_gradio()
    from deltasvd import ui
    from deltasvd.ui_actions import standalone
    blocks = ui.build(standalone(str(tmp_path), str(tmp_path)))
    ids = {getattr(b, "elem_id", None) for b in blocks.blocks.values()}
    assert {"dsvd-analyze", "dsvd-value", "dsvd-groups", "dsvd-layers", "dsvd-save",
            "dsvd-inspect", "dsvd-resize"} <= ids
    explorer = Explorer.from_files(*tiny_pair)
    ui._render(explorer, "energy", 0.5, "size")  # the curve is computed once, then cached
    times = []
    for mode, value in [("energy", v / 20) for v in range(1, 21)] + [("rank", 4),
                                                                     ("Frobenius", 0.9)]:
        start = time.perf_counter()
        numbers, table, plot, layers = ui._render(explorer, mode, value, "rank")
        times.append(time.perf_counter() - start)
        assert "MB" in numbers and "total" in table and "<svg" in plot and len(layers)
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
