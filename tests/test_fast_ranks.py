"""The default float32 route against the certified float64 one (--exact-ranks), on the
fixture pairs of three layouts and on the real small fine-tune (deltasvd/t2i/).

The promise (README: Performance): each layer's rank within one component of the float64
rule's on at least 99% of the layers; where the ranks agree, each layer's stored error within
1e-3 relative of the float64 file's (where they differ, by the one component: 1.3e-3 on one
SDXL layer at rank 155); the whole file's relative error within 1e-3 relative. The errors
compared are those the files record, measured on the stored factors, not estimates."""

import math

import pytest

from deltasvd.api import compress_to_delta
from deltasvd.fixtures import make_pair
from deltasvd.ranks import RankRule
from deltasvd.t2i import weights


def records(base, tuned, rule):
    delta, _, _ = compress_to_delta(base, tuned, rule, "fp16", "cpu", None, False, "d")
    return {(r.key, str(r.rows)): r for r in delta.records if r.kind in ("svd", "dense")}


def compare(base, tuned, mode, value):
    fast = records(base, tuned, RankRule(mode, value))
    exact = records(base, tuned, RankRule(mode, value, exact=True))
    assert fast.keys() == exact.keys() and fast
    assert {r.precision for r in fast.values()} == {"gram32"}
    assert {r.precision for r in exact.values()} <= {"gram64", "svd64"}
    off = [k for k in fast if abs(fast[k].rank - exact[k].rank) > 1]
    assert len(off) <= 0.01 * len(fast), off[:5]
    for k in fast:
        if fast[k].rank != exact[k].rank:
            continue
        e_fast, e_exact = math.sqrt(fast[k].err2), math.sqrt(exact[k].err2)
        norm = math.sqrt(exact[k].norm2)
        # relative to the layer's error, or to its change where the error is ~0 (dense)
        assert abs(e_fast - e_exact) <= 1e-3 * max(e_exact, 1e-3 * norm), k
    whole = [math.sqrt(sum(r.err2 for r in recs.values()) / sum(r.norm2 for r in recs.values()))
             for recs in (fast, exact)]
    assert abs(whole[0] - whole[1]) <= 1e-3 * whole[1]
    return sum(fast[k].rank != exact[k].rank for k in fast), len(fast)


@pytest.fixture(scope="module", params=["sd15", "sdxl", "flux_dev"])
def small_pair(request, tmp_path_factory):
    """Each family's small pair (up to 335 MB), made once for the four settings."""
    return make_pair(tmp_path_factory.mktemp(f"fast_ranks_{request.param}"), request.param,
                     "small", seed=1)


@pytest.mark.parametrize("mode,value", [("energy", 0.06), ("energy", 0.5), ("energy", 0.9),
                                        ("fro", 0.8)])
def test_float32_ranks_within_one_of_float64(small_pair, mode, value):
    compare(*small_pair, mode, value)


@pytest.mark.parametrize("value", [0.06, 0.2, 0.5, 0.8])
def test_float32_ranks_on_the_real_fine_tune(value):
    differ, layers = compare(weights.BASE, weights.FINETUNE, "energy", value)
    assert layers > 100


def test_values_past_float32_fall_back_to_float64():
    """A change float32 cannot square (a damaged file, say): the float64 route measures it, so
    the caller's checks see the real values instead of inf or a LAPACK failure."""
    import torch
    from deltasvd import spectrum
    g = torch.Generator().manual_seed(7)
    m = torch.randn(96, 64, generator=g) * 1e22
    dec, t, _ = spectrum.decide_rank(m, RankRule("energy", 0.5))
    ref, t_ref, _ = spectrum.decide_rank(m, RankRule("energy", 0.5, exact=True))
    assert dec.precision == "gram64" and t == t_ref and dec.s[0] == ref.s[0] > 1e22
    assert spectrum.values_only(m, exact=False).precision == "gram64"
