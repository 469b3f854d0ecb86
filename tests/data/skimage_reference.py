"""Seeded picture pairs and the SSIM / PSNR scikit-image gives on them.

tests/test_image_metrics.py regenerates the pairs with `pairs()` and checks
deltasvd.image_metrics against tests/data/skimage_reference.json, which this script wrote
(numpy and scikit-image only, no torch, so it runs in a venv of its own):

    python -m venv /tmp/skv && /tmp/skv/bin/pip install scikit-image==0.26.0
    /tmp/skv/bin/python tests/data/skimage_reference.py    # rewrites the .json

The pixels come from an integer hash and basic float64 arithmetic, not from a library's
random stream (which may change between versions), so every platform makes the same bits; the
.json keeps their sha256, and the test says so if its pairs are not the ones scored here."""

import hashlib
import json
import os

import numpy as np

JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "skimage_reference.json")
M64 = 2**64 - 1


def hash_uniform(shape, seed):
    """Values in [0, 1) from splitmix64 of each element's index and the seed."""
    x = np.arange(int(np.prod(shape)), dtype=np.uint64)
    x = x + np.uint64((seed * 0x9E3779B97F4A7C15) & M64)   # wraps modulo 2^64, as intended
    x = x * np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return ((x >> np.uint64(11)).astype(np.float64) / 2.0**53).reshape(shape)


def scene(n, h, w, c, seed, low=0.1, high=0.9):
    """(n, h, w, c) pictures in [low, high] with structure at several scales: a gradient,
    three soft discs per channel, fine texture."""
    p = hash_uniform((n, c, 10), seed + 1)
    y = (np.arange(h, dtype=np.float64) / h)[:, None]
    x = (np.arange(w, dtype=np.float64) / w)[None, :]
    out = np.empty((n, h, w, c))
    for i in range(n):
        for ch in range(c):
            k = p[i, ch]
            img = k[0] * x + k[1] * y
            for d in range(3):
                cx, cy, r = k[2 + d], k[5 + d], 0.05 + 0.2 * k[8]
                img = img + 0.8 / (1.0 + ((x - cx) ** 2 + (y - cy) ** 2) / (r * r))
            out[i, :, :, ch] = img
    out = out + 0.3 * hash_uniform(out.shape, seed + 2)
    lo = out.min(axis=(1, 2, 3), keepdims=True)
    hi = out.max(axis=(1, 2, 3), keepdims=True)
    return low + (high - low) * (out - lo) / (hi - lo)


def box_blur(a):
    """3 x 3 mean of each (h, w) plane, edges repeated."""
    p = np.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = a.shape[1:3]
    return sum(p[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def noisy(a, amount, seed):
    return np.clip(a + amount * (hash_uniform(a.shape, seed) - 0.5), 0.0, 1.0)


def pairs():
    """{name: (reference, candidate)}, float64 (N, H, W, C) in [0, 1], never all zero."""
    out = {}
    ref = scene(1, 32, 48, 3, seed=10)
    out["noisy_rgb"] = (ref, noisy(ref, 0.12, seed=11))
    ref = scene(2, 24, 24, 3, seed=20)
    cand = np.concatenate([box_blur(ref[:1]), 0.85 * ref[1:] + 0.1])
    out["blurred_and_shifted"] = (ref, cand)
    ref = scene(1, 11, 17, 1, seed=30)
    out["gray_smallest"] = (ref, noisy(ref, 0.2, seed=31))
    out["unrelated_rgba"] = (scene(1, 40, 29, 4, seed=40), scene(1, 40, 29, 4, seed=41))
    ref = scene(1, 20, 20, 3, seed=50, low=0.01, high=0.06)   # dark: the constants dominate
    out["dark"] = (ref, noisy(ref, 0.02, seed=51))
    return out


def digest(reference, candidate):
    h = hashlib.sha256()
    for a in (reference, candidate):
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a, dtype="<f8").tobytes())
    return h.hexdigest()


def main():
    import skimage
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    table = {}
    for name, (ref, cand) in pairs().items():
        table[name] = {
            "sha256": digest(ref, cand),
            "ssim": [float(structural_similarity(
                a, b, channel_axis=2, gaussian_weights=True, sigma=1.5,
                use_sample_covariance=False, data_range=1.0)) for a, b in zip(ref, cand)],
            "psnr": [float(peak_signal_noise_ratio(a, b, data_range=1.0))
                     for a, b in zip(ref, cand)],
        }
    doc = {"written_by": "tests/data/skimage_reference.py",
           "scikit-image": skimage.__version__, "numpy": np.__version__,
           "call": "structural_similarity(a, b, channel_axis=2, gaussian_weights=True, "
                   "sigma=1.5, use_sample_covariance=False, data_range=1.0); "
                   "peak_signal_noise_ratio(a, b, data_range=1.0); a, b: one picture (H, W, C)",
           "pairs": table}
    with open(JSON, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {JSON}")


if __name__ == "__main__":
    main()
