"""Rank rules and the spectrum ladder against float64 references on known spectra."""

import numpy as np
import pytest
import torch

from deltasvd import spectrum
from deltasvd.ranks import RankRule, allocate_budget, is_dense


def ref_rank(s, mode, value):
    """Straight from the definitions, in float64, one component at a time."""
    s = np.asarray(s, dtype=np.float64)
    vals = s if mode == "energy" else s * s
    total = vals.sum()
    if mode == "rank":
        return min(int(value), s.size)
    acc = 0.0
    for t, v in enumerate(vals, start=1):
        acc += v
        if acc / total >= value:
            return t
    return s.size


def known_matrix(d, k, s, seed):
    """U diag(s) V^T with random orthonormal U, V, in float64 and its float32 copy."""
    g = torch.Generator().manual_seed(seed)
    r = len(s)
    u, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(k, r, generator=g, dtype=torch.float64))
    m64 = (u * torch.tensor(s, dtype=torch.float64)) @ v.T
    return m64.float()


SPECTRA = {
    "geometric": lambda n: 0.05 * 0.97 ** np.arange(n),
    "power": lambda n: 0.05 / (1.0 + np.arange(n)) ** 0.7,
    "flat_tail": lambda n: np.concatenate([0.05 * 0.8 ** np.arange(8), np.full(n - 8, 1e-3)]),
    "low_rank": lambda n: np.concatenate([0.05 * 0.7 ** np.arange(6), np.zeros(n - 6)]),
}
SHAPES = [(320, 320), (640, 1280), (1280, 640), (320, 2880)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", list(SPECTRA))
@pytest.mark.parametrize("mode,value", [("energy", 0.06), ("energy", 0.5), ("energy", 0.9),
                                        ("fro", 0.5), ("fro", 0.99), ("rank", 16)])
def test_rank_equals_float64_reference(shape, kind, mode, value):
    d, k = shape
    m = known_matrix(d, k, SPECTRA[kind](min(d, k)), seed=d + k)
    ref_s = torch.linalg.svdvals(m.double()).numpy()
    rule = RankRule(mode, value)
    _, t, _ = spectrum.decide_rank(m, rule)
    assert t == rule.clamp(ref_rank(ref_s, mode, value), min(d, k))


def test_gram_error_model_holds_on_random_layers():
    """The per-value bound the ladder relies on, against float64 SVD, with headroom."""
    worst = 0.0
    for i, (d, k) in enumerate([(320, 320), (640, 1280), (1280, 640), (768, 3072),
                                (320, 5760)]):
        g = torch.Generator().manual_seed(100 + i)
        n = min(d, k)
        s = 0.05 * np.exp(-np.arange(n) / (n / 8.0)) + 1e-4
        m = known_matrix(d, k, s, seed=i) + 1e-5 * torch.randn(d, k, generator=g)
        dec = spectrum.gram_spectrum(m)
        ref = torch.linalg.svdvals(m.double()).numpy()
        worst = max(worst, float(np.max(np.abs(dec.s - ref) / dec.err)))
    assert worst < 0.7, f"error model too tight: {worst:.2f} of the bound used"


@pytest.mark.parametrize("exact_ranks", [True, False], ids=["float64", "float32"])
def test_factors_reach_exact_truncation_error(exact_ranks):
    m = known_matrix(640, 1280, SPECTRA["power"](640), seed=3)
    ref = torch.linalg.svdvals(m.double()).numpy()
    for tall_m in (m, m.T.contiguous()):
        dec, t, dense = spectrum.decide_rank(tall_m, RankRule("energy", 0.5, exact=exact_ranks))
        assert dec.precision == ("gram64" if exact_ranks else "gram32")
        assert t == ref_rank(ref, "energy", 0.5)
        assert not dense
        a, b = spectrum.factors(dec, tall_m, t)
        assert a.shape == (tall_m.shape[0], t) and b.shape == (t, tall_m.shape[1])
        exact = float(np.sqrt(np.sum(ref[t:] ** 2)))
        got = spectrum.residual_norm(tall_m, a, b)
        assert abs(got - exact) <= 1e-3 * exact
        # B holds V^T: orthonormal rows; A = U S: orthogonal columns whose norms are the
        # singular values (Ritz values of the subspace iteration: the leading ones converge
        # first, those at the cut to within the energy tolerance).
        # (float32 vectors: orthonormal to float32's few ulps times sqrt(n), far below fp16)
        assert torch.allclose(b @ b.T, torch.eye(t), atol=1e-5 if exact_ranks else 1e-4)
        ata = (a.T.double() @ a.double()).numpy()
        assert np.abs(ata - np.diag(np.diag(ata))).max() <= 1e-5 * ref[0] ** 2
        assert np.allclose(a.norm(dim=0).numpy()[: t // 2], ref[: t // 2], rtol=1e-5)
        assert np.allclose(a.norm(dim=0).numpy(), ref[:t], rtol=1e-3)


def test_merged_lora_rank_is_decided_by_the_float64_gram():
    """A merged LoRA: exact zeros after rank 6 (up to float32 rounding of the matrix)."""
    m = known_matrix(640, 640, SPECTRA["low_rank"](640), seed=5)
    ref_s = torch.linalg.svdvals(m.double()).numpy()
    dec, t, _ = spectrum.decide_rank(m, RankRule("energy", 0.9, exact=True))
    assert dec.precision == "gram64" and t == ref_rank(ref_s, "energy", 0.9) <= 6
    # float32 values: the noise of the zeros (about sqrt(eps32) of the largest value each) must
    # not move a merged LoRA's rank
    dec, t, _ = spectrum.decide_rank(m, RankRule("energy", 0.9))
    assert dec.precision == "gram32" and t == ref_rank(ref_s, "energy", 0.9)


def test_exact_tie_climbs_to_svd64():
    """Four equal values and exact zeros, the threshold exactly on a cumulative sum: the Gram's
    error band straddles it, so the float64 SVD decides."""
    m = torch.zeros(64, 96)
    m[[3, 17, 40, 41], [90, 2, 50, 7]] = 1.0
    dec, t, _ = spectrum.decide_rank(m, RankRule("energy", 0.5, exact=True))
    assert dec.precision == "svd64" and t == 2
    dec, t, _ = spectrum.decide_rank(m, RankRule("energy", 0.6, exact=True))   # no tie
    assert dec.precision == "gram64" and t == 3
    dec, t, _ = spectrum.decide_rank(m, RankRule("energy", 0.5))   # float32: within one
    assert dec.precision == "gram32" and t in (2, 3)


def test_energy_one_is_full_rank_and_dense():
    m = known_matrix(64, 96, SPECTRA["geometric"](64), seed=1)
    _, t, dense = spectrum.decide_rank(m, RankRule("energy", 1.0))
    assert t == 64 and dense


def test_dense_threshold():
    assert not is_dense(10, 100, 100)
    assert is_dense(50, 100, 100)       # 50 * 200 = 100 * 100
    assert is_dense(1, 1, 5)            # 1 * 6 >= 5


def test_clamps():
    rule = RankRule("energy", 0.5, min_rank=4, max_rank=8)
    assert rule.clamp(1, 100) == 4 and rule.clamp(20, 100) == 8 and rule.clamp(20, 6) == 6


@pytest.mark.parametrize("mode,value", [("energy", 0.0), ("energy", 1.5), ("fro", -1),
                                        ("rank", 0), ("rank", 2.5), ("size_mb", 0),
                                        ("bogus", 1)])
def test_bad_rule_values_are_usage_errors(mode, value):
    from deltasvd.errors import UsageError
    with pytest.raises(UsageError):
        RankRule(mode, value)


def test_budget_allocation_is_greedy_optimal():
    """Against brute force on a small problem: no other split of the budget does better."""
    rng = np.random.default_rng(0)
    # each layer's squared error weighs differently (measures.layer_weight)
    layers = [(np.sort(rng.random(6))[::-1], c, w) for c, w in ((3, 1.0), (5, 2.5), (4, 0.3))]
    budget = 30
    ranks = allocate_budget(layers, budget)
    assert sum(r * c for r, (_, c, _) in zip(ranks, layers)) <= budget

    def kept(rs):
        return sum(w * float(np.sum(s[:r] ** 2)) for r, (s, _, w) in zip(rs, layers))

    best = max((kept((a, b, c)), (a, b, c)) for a in range(7) for b in range(7) for c in range(7)
               if 3 * a + 5 * b + 4 * c <= budget)
    # Greedy is optimal up to the last partial step: within one component of the best.
    assert kept(ranks) >= best[0] - max(w * float(s[0] ** 2) for s, _, w in layers)


def test_cuda_math_turns_tf32_off_and_restores_the_hosts_flags():
    from deltasvd.compress import _exact_cuda_math
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with _exact_cuda_math(torch.device("cuda")):
            assert not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def test_residual_norm_is_float64_accurate_on_a_large_layer():
    """A 1280 x 23040 residual (SD1.5's largest conv): torch's float32 norm is ~1e-3 off."""
    g = torch.Generator().manual_seed(7)
    m = torch.randn(1280, 23040, generator=g) * 1e-3
    a = torch.randn(1280, 64, generator=g) * 1e-3
    b = torch.randn(64, 23040, generator=g) * 1e-2
    ref = float((m.double() - a.double() @ b.double()).norm())
    assert abs(spectrum.residual_norm(m, a, b) / ref - 1) < 1e-7
    assert abs(spectrum.residual_norm(m, a[:, :0], b[:0]) / float(m.double().norm()) - 1) < 1e-7


@pytest.mark.parametrize("shape", [(1536, 320), (320, 1536)])
@pytest.mark.parametrize("decay", [0.3, 1.0, 2.0])
def test_stored_factors_error_is_the_stored_pairs(shape, decay):
    """The error stored_factors reports (the identity where the error is large, the formed
    residual where it is small) is that of the fp16 pair it returns, against a float64
    residual: both branches are taken over these spectra."""
    d, k = shape
    n = min(d, k)
    g = torch.Generator().manual_seed(int(decay * 10) + d)
    u, _ = torch.linalg.qr(torch.randn(d, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(k, n, generator=g, dtype=torch.float64))
    s = torch.arange(1, n + 1, dtype=torch.float64) ** -decay
    m = ((u * s) @ v.T).float()
    dec = spectrum.gram_spectrum(m, exact=False)
    branches = set()
    for t in (1, 8, 48, n // 2):
        a, b, err2 = spectrum.stored_factors(dec, m, t, lambda x: x.half())
        assert a.dtype == b.dtype == torch.float16 and a.shape == (d, t) and b.shape == (t, k)
        ref = float((m.double() - a.double() @ b.double()).norm())
        assert abs(err2 ** 0.5 / ref - 1) < 1e-4, (t, err2 ** 0.5, ref)
        branches.add(err2 >= spectrum.IDENTITY_MIN * dec.fro2)
        # the factor on the short side holds the Gram's vectors (B = V_t^T for a tall M,
        # A = U_t for a wide one: unit, orthogonal) and A B the best rank-t fit, to fp16
        # (a float32 Gram resolves directions down to ~1e-3 of s_max only)
        eye = torch.eye(t, dtype=torch.float64)
        q = b.double() @ b.double().T if d >= k else a.double().T @ a.double()
        assert float(s[t - 1]) < 1e-3 or torch.allclose(q, eye, atol=3e-3)
        best = float(s[t:].pow(2).sum().sqrt())
        assert ref <= best * 1.01 + 1e-3 * float(m.double().norm())
    if decay == 2.0:
        assert branches == {True, False}
