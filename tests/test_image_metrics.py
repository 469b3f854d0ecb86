"""deltasvd.image_metrics (SSIM, PSNR) against two references of its own:

* a naive float64 SSIM written here, window by window: at each position where the whole
  11 x 11 window fits, the Gaussian-weighted means, variances (centred) and covariance as
  direct weighted sums, then Wang et al.'s formula; averaged over positions and channels. It
  shares nothing with the module's separable convolutions. Checked on random pairs of several
  shapes, channel counts, dtypes and kinds of difference;
* scikit-image 0.26's numbers on seeded pairs (tests/data/skimage_reference.json, written by
  tests/data/skimage_reference.py, whose docstring says how to rewrite it): the pairs are
  regenerated here and must be the same bits as those scored there.

Plus identical pictures (SSIM exactly 1, PSNR inf), the mean PSNR, and the refusals. No picture
is all zero: that case says nothing about the formula."""

import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch

from deltasvd.image_metrics import mean_psnr, psnr, ssim

DATA = os.path.join(os.path.dirname(__file__), "data")


def _reference_module():
    path = os.path.join(DATA, "skimage_reference.py")
    spec = importlib.util.spec_from_file_location("skimage_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REF = _reference_module()
with open(REF.JSON) as f:
    SKIMAGE = json.load(f)


def naive_ssim(a, b, data_range=1.0):
    """SSIM of one picture pair (H, W, C), float64 numpy, one window position at a time."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5 ** 2))
    weights = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    h, w, channels = a.shape
    values = []
    for ch in range(channels):
        for i in range(h - 10):
            for j in range(w - 10):
                x, y = a[i:i + 11, j:j + 11, ch], b[i:i + 11, j:j + 11, ch]
                mx, my = (weights * x).sum(), (weights * y).sum()
                vx = (weights * (x - mx) ** 2).sum()
                vy = (weights * (y - my) ** 2).sum()
                cov = (weights * (x - mx) * (y - my)).sum()
                values.append((2 * mx * my + c1) * (2 * cov + c2)
                              / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return sum(values) / len(values)


def naive_psnr(a, b, data_range=1.0):
    mse = float(((a - b) ** 2).mean())
    return 10 * math.log10(data_range ** 2 / mse)


def random_pair(shape, kind, seed, dtype=torch.float64):
    """(reference, candidate) in [0, 1]; `kind` says how the candidate differs."""
    g = torch.Generator().manual_seed(seed)
    ref = 0.05 + 0.9 * torch.rand(shape, generator=g, dtype=torch.float64)
    if kind == "noise":
        cand = (ref + 0.05 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    elif kind == "unrelated":
        cand = torch.rand(shape, generator=g, dtype=torch.float64)
    elif kind == "contrast":
        cand = 0.7 * ref + 0.2
    else:   # "dark": low values with little variation, where c1 and c2 weigh most
        ref = 0.01 + 0.03 * ref
        cand = ref + 0.005 * torch.rand(shape, generator=g, dtype=torch.float64)
    return ref.to(dtype), cand.to(dtype)


@pytest.mark.parametrize("shape, kind, seed", [
    ((1, 16, 16, 3), "noise", 1),
    ((2, 13, 21, 3), "unrelated", 2),
    ((3, 11, 11, 1), "noise", 3),          # the smallest picture: one window position
    ((1, 17, 12, 4), "contrast", 4),
    ((2, 14, 19, 3), "dark", 5),
])
def test_matches_naive_reference(shape, kind, seed):
    a, b = random_pair(shape, kind, seed)
    got_s, got_p = ssim(a, b), psnr(a, b)
    assert got_s.shape == got_p.shape == (shape[0],)
    assert got_s.dtype == got_p.dtype == torch.float64
    for i in range(shape[0]):
        x, y = a[i].numpy(), b[i].numpy()
        assert float(got_s[i]) == pytest.approx(naive_ssim(x, y), abs=1e-13, rel=0)
        assert float(got_p[i]) == pytest.approx(naive_psnr(x, y), abs=1e-12, rel=0)


def test_float32_and_data_range_match_naive_reference():
    """ComfyUI's IMAGE is float32: scored as its exact float64 values. data_range 255 on
    0..255 pictures uses the 255-scaled constants."""
    a, b = random_pair((2, 15, 18, 3), "noise", 6, dtype=torch.float32)
    for i in range(2):
        x, y = a[i].double().numpy(), b[i].double().numpy()
        assert float(ssim(a, b)[i]) == pytest.approx(naive_ssim(x, y), abs=1e-13, rel=0)
        assert float(psnr(a, b)[i]) == pytest.approx(naive_psnr(x, y), abs=1e-12, rel=0)
    a, b = random_pair((1, 12, 16, 3), "contrast", 7)
    a, b = a * 255, b * 255
    x, y = a[0].numpy(), b[0].numpy()
    assert float(ssim(a, b, data_range=255.0)[0]) == pytest.approx(
        naive_ssim(x, y, data_range=255.0), abs=1e-13, rel=0)
    assert float(psnr(a, b, data_range=255.0)[0]) == pytest.approx(
        naive_psnr(x, y, data_range=255.0), abs=1e-12, rel=0)


@pytest.mark.parametrize("name", sorted(SKIMAGE["pairs"]))
def test_matches_scikit_image(name):
    ref, cand = REF.pairs()[name]
    want = SKIMAGE["pairs"][name]
    assert REF.digest(ref, cand) == want["sha256"], (
        f"{name}: the regenerated pair is not the one scikit-image scored; rewrite "
        "tests/data/skimage_reference.json (see tests/data/skimage_reference.py)")
    a, b = torch.from_numpy(ref), torch.from_numpy(cand)
    got_s, got_p = ssim(a, b).tolist(), psnr(a, b).tolist()
    assert len(got_s) == len(want["ssim"]) == ref.shape[0]
    for g, w in zip(got_s, want["ssim"]):
        assert g == pytest.approx(w, abs=1e-13, rel=0), name
    for g, w in zip(got_p, want["psnr"]):
        assert g == pytest.approx(w, abs=1e-12, rel=0), name


def test_identical_pictures_score_one_and_inf():
    a, _ = random_pair((2, 20, 24, 3), "noise", 8)
    assert ssim(a, a.clone()).tolist() == [1.0, 1.0]
    assert psnr(a, a.clone()).tolist() == [math.inf, math.inf]
    # a constant picture (not zero) too: every window has zero variance
    flat = torch.full((1, 12, 12, 3), 0.4, dtype=torch.float64)
    assert ssim(flat, flat.clone()).tolist() == [1.0]


def test_mean_psnr_leaves_identical_pictures_out():
    assert mean_psnr([math.inf, 30.0, 40.0]) == 35.0
    assert mean_psnr(torch.tensor([20.0, 30.0])) == 25.0
    assert mean_psnr([math.inf, math.inf]) == math.inf


def test_refusals_name_the_problem():
    a, b = random_pair((2, 16, 16, 3), "noise", 9)
    for other in (b[:1], b[:, :15], b[..., :1]):
        for fn in (ssim, psnr):
            with pytest.raises(ValueError, match="differ in shape") as e:
                fn(a, other)
            assert str(tuple(a.shape)) in str(e.value) and str(tuple(other.shape)) in str(e.value)
    small = random_pair((1, 10, 30, 3), "noise", 10)
    with pytest.raises(ValueError, match=r"at least 11 x 11 pixels, got 10 x 30"):
        ssim(*small)
    assert math.isfinite(float(psnr(*small)[0]))   # PSNR needs no window
    with pytest.raises(ValueError, match=r"expected image batches \(N, H, W, C\)"):
        ssim(a[0], b[0])
