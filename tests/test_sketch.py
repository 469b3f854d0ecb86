"""`compress --rank R`'s randomized SVD (spectrum.sketched_factors) and the head-only files it
writes: the stored error is that of the stored pair (against float64 residuals), near the exact
truncation's; the file keeps each such layer's first R singular values, resizes by rank, --fro
and size, refuses the energy rule with a clear error, applies like any other."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from deltasvd import spectrum
from deltasvd.apply import delta_for, records_by_key
from deltasvd.delta_file import read_delta
from deltasvd.explorer import Explorer
from deltasvd.fixtures import make_pair
from deltasvd.plot import measure_of
from deltasvd.t2i import weights


def cli(*args):
    return subprocess.run([sys.executable, "-m", "deltasvd", *map(str, args)],
                          capture_output=True, text=True)


def fp16(x):
    return x.to(torch.float16)


def low_rank_plus_noise(d, k, seed, rank=40, noise=3e-3):
    """A fine-tune-like delta: a decaying low-rank update plus a dense noise floor."""
    g = np.random.default_rng(seed)
    u, v = g.standard_normal((d, rank)), g.standard_normal((rank, k))
    m = (u * np.arange(1, rank + 1) ** -0.8) @ v * 0.01 + noise * g.standard_normal((d, k))
    return torch.from_numpy(m.astype(np.float32))


@pytest.mark.parametrize("d,k,t", [(640, 640, 32), (320, 2880, 24), (1280, 320, 16)])
def test_sketch_error_is_the_stored_pairs_and_near_the_truncation(d, k, t):
    m = low_rank_plus_noise(d, k, seed=d + k + t)
    s, a, b, err2, fro2 = spectrum.sketched_factors(m, t, fp16)
    assert a.dtype == b.dtype == torch.float16 and a.shape == (d, t) and b.shape == (t, k)
    m64 = m.double()
    resid2 = float((m64 - a.double() @ b.double()).pow(2).sum())
    assert abs(err2 - resid2) <= 1e-4 * resid2
    assert abs(fro2 - float(m64.pow(2).sum())) <= 1e-6 * fro2
    exact = torch.linalg.svdvals(m64).numpy()
    best2 = float(np.sum(exact[t:] ** 2))
    # no rank-t pair beats the truncation (fp16 rounding adds a little); the sketch is close
    assert resid2 >= best2 * (1 - 1e-3)
    assert math.sqrt(resid2) <= 1.01 * math.sqrt(best2)
    # Ritz values: descending, never above the true ones, the leading ones converged
    assert np.all(np.diff(s) <= 0) and s.size == t
    assert np.all(s <= exact[:t] * (1 + 1e-5))
    assert abs(s[0] - exact[0]) <= 1e-4 * exact[0]
    bb = b.double() @ b.double().T           # B = V_t^T: orthonormal rows, up to fp16
    assert torch.allclose(bb, torch.eye(t, dtype=torch.float64), atol=2e-3)


def test_sketch_is_reproducible():
    m = low_rank_plus_noise(640, 1280, seed=7)
    one, two = spectrum.sketched_factors(m, 32, fp16), spectrum.sketched_factors(m, 32, fp16)
    assert torch.equal(one[1], two[1]) and torch.equal(one[2], two[2])


def test_sketch_fits_where_its_products_cost_less():
    assert spectrum.sketch_fits(1280, 1280, 64)           # SD's attention: ~3x fewer
    assert spectrum.sketch_fits(1280, 11520, 64)          # a 3x3 conv
    assert not spectrum.sketch_fits(320, 320, 200)        # most of the spectrum
    assert not spectrum.sketch_fits(64, 64, 32)
    # wider sketches cost more: past some rank the Gram route wins on every shape
    assert not spectrum.sketch_fits(1280, 1280, 600)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small SD1.5-layout pair, its --rank 12 file (randomized) and --exact-ranks twin."""
    folder = tmp_path_factory.mktemp("sketch")
    base, tuned = make_pair(folder, "sd15", "small", seed=3)
    out = {"base": base, "tuned": tuned}
    for name, extra in (("rand", []), ("exact", ["--exact-ranks"])):
        out[name] = folder / f"{name}.safetensors"
        r = cli("compress", base, tuned, "-o", out[name], "--rank", 12, *extra)
        assert r.returncode == 0, r.stderr
    return out


def coded(delta):
    return {(r.key, str(r.rows)): r for r in delta.records if r.kind == "svd" and r.n}


def test_the_file_keeps_the_head_and_the_exact_error(files):
    from safetensors import safe_open
    rand, exact = read_delta(str(files["rand"])), read_delta(str(files["exact"]))
    with safe_open(str(files["rand"]), "pt") as f:
        assert f.metadata()["deltasvd.version"] == "2"
    with safe_open(str(files["exact"]), "pt") as f:
        assert f.metadata()["deltasvd.version"] == "1"
    r, x = coded(rand), coded(exact)
    assert r.keys() == x.keys()
    sketched = [k for k in r if r[k].precision == "rand"]
    assert len(sketched) >= 0.8 * len(r)
    assert {x[k].precision for k in x} <= {"gram64", "svd64"}
    for k in sketched:
        i = rand.records.index(r[k])
        full, head = rand.spectra[i]
        assert len(full) == len(head) == r[k].rank == 12 and r[k].n == min(r[k].matrix_shape)
        assert r[k].sum_s == 0.0 and abs(r[k].sum_s2 - x[k].sum_s2) <= 1e-5 * x[k].sum_s2
        # the exact truncation is the best rank-12 pair; the sketch's within 1%
        assert x[k].err2 * (1 - 1e-3) <= r[k].err2 <= 1.0201 * x[k].err2, k
    # and those errors are the files' own: apply them and measure against the float64 delta
    base, tuned = load_file(str(files["base"])), load_file(str(files["tuned"]))
    by_key = records_by_key(rand)
    for key, rec in list(r.items())[:6]:
        # the delta compress codes: the base rounded to the tuned file's dtype first
        want = tuned[rec.key].double() - base[rec.key].to(tuned[rec.key].dtype).double()
        got = delta_for(rand, by_key[rec.key], tuple(want.shape)).double()
        if rec.rows is None:
            assert abs(float((got - want).pow(2).sum()) - rec.err2) <= 1e-3 * rec.err2


def test_resize_by_rank_fro_and_size_but_not_energy(files, tmp_path):
    src = files["rand"]
    for opts in (["--rank", 6], ["--fro", 0.3], ["--size-mb", 0.5]):
        out = tmp_path / f"{opts[0][2:]}.safetensors"
        r = cli("resize", src, "-o", out, *opts)
        assert r.returncode == 0, r.stderr
        cut = read_delta(str(out))
        assert max(rec.rank for rec in coded(cut).values()) <= 12
    out = tmp_path / "energy.safetensors"
    r = cli("resize", src, "-o", out, "--energy", 0.5)
    assert r.returncode == 1 and not out.exists()
    assert "randomized SVD" in r.stderr and "--exact-ranks" in r.stderr
    assert os.path.basename(src) in r.stderr
    grow = cli("resize", src, "-o", out, "--fro", 0.999)
    assert grow.returncode == 1 and "more than rank 12" in grow.stderr and not out.exists()
    # the whole-spectrum twin cuts by energy as before
    assert cli("resize", files["exact"], "-o", out, "--energy", 0.2).returncode == 0


def test_inspect_and_explorer_say_what_the_head_cannot_tell(files):
    r = cli("inspect", files["rand"])
    assert r.returncode == 0 and "keep only their first singular values" in r.stdout
    assert "keep only" not in cli("inspect", files["exact"]).stdout
    delta = read_delta(str(files["rand"]))
    assert measure_of(delta) == "fro"       # its plot: the Frobenius share, which it knows
    rows = Explorer(delta).layer_rows(delta)
    kept = {row[1]: row[6] for row in rows}
    rand_names = {rec.name for rec in delta.records if rec.precision == "rand"}
    assert rand_names and all(kept[n] == "" for n in rand_names if n in kept)


def test_the_real_fine_tune_at_a_fixed_rank(tmp_path):
    """The t2i fine-tune (narrow layers): whichever route each layer takes, the file's error
    is within 1% of the exact truncation's."""
    errs = {}
    for name, extra in (("rand", []), ("exact", ["--exact-ranks"])):
        out = tmp_path / f"{name}.safetensors"
        r = cli("compress", weights.BASE, weights.FINETUNE, "-o", out, "--rank", 4, *extra)
        assert r.returncode == 0, r.stderr
        recs = [rec for rec in read_delta(str(out)).records if rec.n]
        errs[name] = math.sqrt(sum(rec.err2 for rec in recs) / sum(rec.norm2 for rec in recs))
    assert errs["exact"] <= errs["rand"] * (1 + 1e-3) and errs["rand"] <= 1.01 * errs["exact"]


def test_quantized_factors_from_the_sketch(files, tmp_path):
    """--rank with --factor-bits: the sketch's factors quantized, the error that of the codes."""
    out = tmp_path / "q8.safetensors"
    r = cli("compress", files["base"], files["tuned"], "-o", out, "--rank", 12,
            "--factor-bits", 8)
    assert r.returncode == 0, r.stderr
    delta = read_delta(str(out))
    recs = [rec for rec in delta.records if rec.precision == "rand"]
    assert recs and {rec.kind for rec in recs} == {"qsvd"}
    base, tuned = load_file(str(files["base"])), load_file(str(files["tuned"]))
    by_key = records_by_key(delta)
    for rec in [rec for rec in recs if rec.rows is None][:4]:
        want = tuned[rec.key].double() - base[rec.key].to(tuned[rec.key].dtype).double()
        got = delta_for(delta, by_key[rec.key], tuple(want.shape)).double()
        assert abs(float((got - want).pow(2).sum()) - rec.err2) <= 1e-3 * rec.err2
