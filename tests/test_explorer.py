"""The explorer's model against `deltasvd compress`: one analysis answers any setting with the
ranks, per-group bytes and (within the rounding) errors compress gives, in milliseconds."""

import os
import statistics

import numpy as np
import pytest

from deltasvd import api
from deltasvd.delta_file import read_delta
from deltasvd.explorer import Explorer
from ui_pair import assert_same_table, cli_compress, group_rows, small_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return small_pair(tmp_path_factory.mktemp("explorer_pair"))


@pytest.fixture(scope="module")
def explorer(pair):
    return Explorer.from_files(*pair, name="out")


@pytest.mark.parametrize("mode,value", [("energy", 0.5), ("energy", 0.06), ("fro", 0.9),
                                        ("rank", 8)])
def test_setting_equals_compress(explorer, pair, tmp_path, mode, value):
    flag = {"energy": "--energy", "fro": "--fro", "rank": "--rank"}[mode]
    out = tmp_path / "out.safetensors"
    # the page's Save keeps whole spectra; `compress --rank` alone takes the randomized SVD
    # (tests/test_sketch.py), --exact-ranks the truncation the page previews
    exact = ["--exact-ranks"] if mode == "rank" else []
    printed = cli_compress(*pair, out, flag, str(value), *exact)
    preview = explorer.preview(mode, value)
    assert_same_table(explorer.group_table(preview), printed)
    real = read_delta(out)
    assert [r.rank for r in preview.delta.records] == [r.rank for r in real.records]
    assert [r.kind for r in preview.delta.records] == [r.kind for r in real.records]
    # the file size is exact up to the zlib-compressed metadata
    assert abs(preview.file_bytes - os.path.getsize(out)) < 2048
    assert preview.params == sum(t.numel() for t in real.tensors.values())


def test_a_different_threshold_does_not_match(explorer, pair, tmp_path):
    """Negative check: the comparison above can fail."""
    printed = cli_compress(*pair, tmp_path / "o.safetensors", "--energy", "0.5")
    ours = explorer.group_table(explorer.preview("energy", 0.45))
    with pytest.raises(AssertionError):
        assert_same_table(ours, printed)
    assert group_rows(ours) != group_rows(printed)


def test_size_mode_fits_the_budget(explorer):
    for mb in (1.0, 3.0):
        p = explorer.preview("size_mb", mb)
        assert mb * 2**20 * 0.97 <= p.file_bytes <= mb * 2**20


def test_slider_is_fast(explorer):
    """<= 0.2 s per setting, with no recomputation (median over a sweep, curves cached)."""
    explorer.curve("energy")
    times = [explorer.preview("energy", t / 40).seconds for t in range(1, 41)]
    times += [explorer.preview("rank", r).seconds for r in (1, 4, 16, 64)]
    assert statistics.median(times) <= 0.2 and max(times) < 1.0, times


def test_curve_and_ranges(explorer):
    grid, mb, kept = explorer.curve("energy")
    assert (mb[1:] >= mb[:-1] - 1e-9).all()      # more energy kept costs more bytes
    assert kept[-1] == pytest.approx(1.0, abs=1e-3)
    assert (grid <= 0.3).sum() >= 8               # the small thresholds, where users look
    lo, hi, step = explorer.range_of("size_mb")
    assert 0 < lo < hi and step == 0.01
    assert explorer.range_of("rank")[1] == max(r.n for r in explorer.analysis.records)


@pytest.mark.parametrize("mode,value", [("energy", 0.3), ("fro", 0.9), ("rank", 4),
                                        ("size_mb", 2.0)])
def test_two_kept_energies(explorer, mode, value):
    """`kept` is the energy rule's sum(s[:t]) / sum(s) in every mode; `kept_fro` the
    Frobenius one, 1 - rel_error^2 (the plot's green curve)."""
    p = explorer.preview(mode, value)
    kept = total = 0.0
    for i in explorer.coded:
        rec, s = p.delta.records[i], explorer.values[i]
        kept += s[: rec.rank if rec.kind == "svd" else s.size].sum()
        total += s.sum()
    assert p.kept == pytest.approx(kept / total)
    assert p.kept_fro == pytest.approx(1 - p.rel_error ** 2)
    if mode == "energy":
        assert p.kept >= value - 1e-9
    if mode == "fro":
        assert p.kept_fro >= value - 1e-9 and not np.isclose(p.kept, p.kept_fro)


def test_layer_rows_sort(explorer):
    p = explorer.preview("energy", 0.5)
    by_size = explorer.layer_rows(p.delta, "size")
    assert len(by_size) == len(explorer.coded)
    assert [r[7] for r in by_size] == sorted((r[7] for r in by_size), reverse=True)
    by_name = explorer.layer_rows(p.delta, "name")
    assert [r[1] for r in by_name] == sorted(r[1] for r in by_name)


def test_analysis_is_float64(explorer):
    """Every layer's values come from the float64 rung, so ranks match compress anywhere."""
    assert all(r.precision in ("gram32", "gram64", "svd64") for r in explorer.analysis.records
               if r.n)


def test_inspecting_a_file(pair, tmp_path):
    out = tmp_path / "d.safetensors"
    api.compress_files(*pair, out, api.make_rule("energy", 0.5))
    delta = read_delta(out)
    rows = Explorer(delta).layer_rows(delta)
    assert {r[1] for r in rows} == {r.name for r in delta.records if r.n}


def test_explorer_handles_a_dit_family(tmp_path):
    """A Flux.1 pair (real names and widths, block 0 of each kind): the explorer's groups are
    Flux's, and a setting gives the table, ranks and size `deltasvd compress` gives."""
    from deltasvd.fixtures import make_pair
    import torch
    base, tuned = make_pair(tmp_path, "flux_dev", "small", seed=2, base_dtype=torch.bfloat16,
                            tuned_dtype=torch.bfloat16)
    ex = Explorer.from_files(base, tuned, name="out")
    out = tmp_path / "out.safetensors"
    printed = cli_compress(base, tuned, out, "--energy", "0.3")
    preview = ex.preview("energy", 0.3)
    table = ex.group_table(preview)
    assert_same_table(table, printed)
    assert {"double_blocks", "single_blocks", "embedders"} <= set(group_rows(table))
    real = read_delta(out)
    assert real.family == "flux"
    assert [r.rank for r in preview.delta.records] == [r.rank for r in real.records]
    assert abs(preview.file_bytes - os.path.getsize(out)) < 2048
