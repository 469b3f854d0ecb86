"""deltasvd.plot: the numbers behind the spectrum plot."""

import numpy as np

from deltasvd.api import compress_to_delta, host_meta_fn
from deltasvd.delta_file import file_size
from deltasvd.plot import current_threshold, energy_curves, measure_of, size_curve
from deltasvd.ranks import RankRule
from deltasvd.resize import resize


def test_curves_and_sizes(tiny_pair):
    base, tuned = tiny_pair
    delta, _, _ = compress_to_delta(base, tuned, RankRule("energy", 0.5))
    assert measure_of(delta) == "energy" and current_threshold(delta) == 0.5
    curves = energy_curves(delta)
    assert {c.group for c in curves} >= {"down_blocks.0", "text_encoder"}
    for c in curves:
        assert np.all(np.diff(c.kept) >= -1e-12) and 0 < c.kept[0] <= c.kept[-1] <= 1.0
        assert abs(c.kept[-1] - 1.0) < 1e-3           # all of the energy at full rank
        assert c.ranks[0] == 1 and len(c.ranks) == len(c.kept) and c.layers >= 1
    size = file_size(delta, host_meta_fn(delta, "delta"))
    ts, sizes = size_curve(delta, size)
    assert np.all(np.diff(sizes) >= 0) and len(ts) == len(sizes)
    # the curve passes through the delta itself and through what resize gives
    here = sizes[np.argmin(np.abs(ts - 0.5))], size
    assert abs(here[0] - here[1]) <= 0.01 * size, here
    small = resize(delta, RankRule("energy", 0.3))
    s_small = file_size(small, host_meta_fn(small, "delta"))
    predicted = np.interp(0.3, ts, sizes)
    assert abs(predicted - s_small) <= 0.05 * size, (predicted, s_small)
    fro = compress_to_delta(base, tuned, RankRule("fro", 0.9))[0]
    assert measure_of(fro) == "fro" and energy_curves(fro)[0].kept[-1] <= 1.0
    ranked = compress_to_delta(base, tuned, RankRule("rank", 2))[0]
    assert current_threshold(ranked) is None
