"""bench/rate_distortion.py measures sizes without writing files (meta tensors + the library's
file_size) and errors from spectra: both must agree with what `deltasvd compress` really writes
and reports."""

import math
import os
import sys

import pytest

from deltasvd import cli
from deltasvd.delta_file import read_delta

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import rate_distortion  # noqa: E402


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    from conftest import fine_tune, save, tiny_state
    folder = tmp_path_factory.mktemp("rd")
    base = tiny_state(seed=3)
    b = save(folder / "base.safetensors", base)
    t = save(folder / "tuned.safetensors", fine_tune(base, seed=4, noise=3e-3))
    rows, meta = rate_distortion.run(b, t, samples=8, log=lambda s: None)
    return folder, b, t, {r["setting"]: r for r in rows}, meta


@pytest.mark.parametrize("setting,args", [
    ("dct 1 bits", ("--codec", "dct", "--bits", "1")),
    ("dct 3 bits", ("--codec", "dct", "--bits", "3")),
    ("svd int8 T=0.5", ("--energy", "0.5", "--factor-bits", "8")),
    ("svd int4 T=0.85", ("--energy", "0.85", "--factor-bits", "4")),
    ("svd energy T=0.5", ("--energy", "0.5")),
])
def test_bench_sizes_and_errors_are_those_of_real_files(measured, setting, args):
    folder, base, tuned, rows, meta = measured
    out = folder / (setting.replace(" ", "_") + ".safetensors")
    assert cli.main(["compress", base, tuned, "-o", str(out), "--overwrite", *args]) == 0
    real = os.path.getsize(out)
    row = rows[setting]
    # the same records and tensors; only header strings (file name, sizes) and the
    # zlib'd spectra may differ by a few bytes
    assert abs(row["bytes"] - real) <= max(64, 0.002 * real), (row["bytes"], real)
    delta = read_delta(out)
    norm2 = sum(r.norm2 for r in delta.records)
    rel = math.sqrt(sum(r.err2 for r in delta.records) / norm2)
    # svd rows leave out the fp16 rounding of the factors (~1e-3 relative)
    assert row["rel_fro"] == pytest.approx(rel, rel=1e-2 if "energy" in setting else 1e-4)
    assert row["bpp"] == pytest.approx(8 * row["bytes"] / meta["params"])


def test_bench_rows_are_ordered_sensibly(measured):
    _, _, _, rows, _ = measured
    dct = [rows[f"dct {b:g} bits"] for b in rate_distortion.DCT]
    assert [r["bytes"] for r in dct] == sorted(r["bytes"] for r in dct)
    assert [r["rel_fro"] for r in dct] == sorted((r["rel_fro"] for r in dct), reverse=True)
    for r in rows.values():
        assert 0 <= r["rel_fro"] <= 1.0 + 1e-9 and 0 <= r["out_mean"] <= r["out_max"] + 1e-12
    # one bit per value: sign times scale and DCT at 1 bit land near each other
    assert rows["bitdelta"]["bpp"] == pytest.approx(rows["dct 1 bits"]["bpp"], rel=0.1)
