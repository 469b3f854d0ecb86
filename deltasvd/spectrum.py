"""Singular values and truncated factors of one layer's delta (host-free math).

The fast route is the Gram matrix: G = M^T M (or M M^T, on the smaller side), then `eigh`.
That costs about d*k*min(d,k) flops against several times more for an SVD, but float32
squares the condition number: an eigenvalue is only known to about eps32 * ||M||_F^2, so a
singular value s_i to about min(sqrt(dl), dl / s_i). We carry that bound per value; when it
leaves the rank rule undecided (the threshold falls inside the error band, typical of deltas
with many near-zero singular values such as merged LoRAs), the layer is redone with a float64
SVD, whose values are the reference the rules are defined on.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from .ranks import is_dense, tail_bounds

# Safety factor on the float32 error model below. Measured on random layers of SD shapes
# (320..2560 x 320..11520, flat to steep spectra), the worst eigenvalue error was 2.5 eps*||M||_F^2
# and 1.5 eps*lmax*sqrt(n): the model with this factor keeps 3x or more headroom (tests).
GRAM_SAFETY = 8.0


@dataclass
class Decomposition:
    """Singular values (float64, descending), their error bounds, and the leading vectors."""
    s: np.ndarray
    err: np.ndarray
    precision: str         # what gave s: "gram32", "gram64" or "svd64"
    tall: bool             # d >= k: the basis spans the input side (V), else the output side (U)
    fro2: float = 0.0      # ||M||_F^2, accumulated in float64
    basis: torch.Tensor = None   # float32 Gram eigenvectors, descending order
    lam: np.ndarray = None       # the Gram eigenvalues behind s, and their error bound
    dl: float = 0.0


def as_matrix(delta):
    """Linear (out x in) as is; Conv (out x in x kh x kw) as out x (in*kh*kw)."""
    return delta.reshape(delta.shape[0], -1)


def gram(m, dtype):
    """(G, ||M||_F^2): G = M^T M or M M^T, whichever is smaller, in `dtype`, on m's device;
    the squared norm accumulated in float64."""
    tall = m.shape[0] >= m.shape[1]
    if m.device.type == "cpu":
        a = m.numpy().astype(np.float64 if dtype == torch.float64 else np.float32, copy=False)
        fro2 = float(np.einsum("ij,ij->", a, a, dtype=np.float64))
        return torch.from_numpy(a.T @ a if tall else a @ a.T), fro2   # numpy: BLAS syrk
    a = m.to(dtype)
    fro2 = float(torch.linalg.vector_norm(a, dtype=torch.float64) ** 2)
    return (a.T @ a if tall else a @ a.T), fro2


def gram_spectrum(m, vectors=True, dtype=torch.float32):
    """Spectrum through the Gram matrix of the smaller side, with per-value error bounds."""
    d, k = m.shape
    g, fro2 = gram(m, dtype)
    if vectors:
        lam, q = torch.linalg.eigh(g)
        q = q.flip(1)
    else:
        lam, q = torch.linalg.eigvalsh(g), None
    lam = lam.flip(0).double().cpu().numpy()
    n = lam.size
    eps = float(torch.finfo(dtype).eps)
    lam_max = max(float(lam[0]), 0.0) if n else 0.0
    # Absolute eigenvalue error of Gram + eigh: an empirical model (see GRAM_SAFETY).
    dl = GRAM_SAFETY * eps * min(fro2, lam_max * math.sqrt(n))
    s = np.sqrt(np.clip(lam, 0.0, None))
    # |sqrt(a) - sqrt(b)| <= min(sqrt(|a - b|), |a - b| / sqrt(a)).
    err = np.minimum(math.sqrt(dl), dl / np.maximum(s, 1e-300))
    return Decomposition(s=s, err=err, tall=d >= k, fro2=fro2, basis=q, lam=lam, dl=dl,
                         precision="gram32" if dtype == torch.float32 else "gram64")


def svd64_values(m):
    """The float64 reference values: exact up to float64 rounding."""
    s = torch.linalg.svdvals(m.double()).cpu().numpy()
    return s, np.zeros_like(s)


def factors(dec, m, t):
    """A (d x t) = U_t S_t and B (t x k) = V_t^T, float32, ordered by singular value."""
    q = dec.basis[:, :t]
    if dec.tall:                       # q = V_t: A = M V_t = U_t S_t
        return (m @ q).contiguous(), q.T.contiguous()
    # q = U_t: B = U_t^T M = S_t V_t^T; normalise its rows to unit length (V_t^T) and move the
    # norms (the singular values, measured on M itself) into A.
    p = q.T @ m
    norms = p.norm(dim=1).clamp_min(torch.finfo(p.dtype).tiny)
    return (q * norms).contiguous(), (p / norms[:, None]).contiguous()


def _undecided(dec, rule, d, k):
    tails = tail_bounds(dec.lam, dec.dl, dec.fro2) if dec.lam is not None else None
    lo, hi = (rule.clamp(t, min(d, k)) for t in rule.raw_range(dec.s, dec.err, tails))
    return lo != hi and not (is_dense(lo, d, k) and is_dense(hi, d, k))


def decide_rank(m, rule, vectors=True, precise=False):
    """Decompose `m` and pick its rank under `rule`, the values climbing in precision while
    the rank is undecided. Returns (decomposition, rank, dense).

    `precise`: take the float64 values whatever `rule` needs, for an analysis that later picks
    ranks under other thresholds (explorer.py) and must pick the ones `compress` would."""
    d, k = m.shape
    dec = gram_spectrum(m, vectors, torch.float32)
    if precise or _undecided(dec, rule, d, k):
        finer = gram_spectrum(m, False, torch.float64)
        dec.s, dec.err, dec.lam, dec.dl = finer.s, finer.err, finer.lam, finer.dl
        dec.precision = finer.precision
        if _undecided(dec, rule, d, k):
            dec.s, dec.err = svd64_values(m)
            dec.lam, dec.precision = None, "svd64"
    t = rule.clamp(rule.raw_rank(dec.s), min(d, k))
    return dec, t, is_dense(t, d, k)


def residual_norm(m, a, b):
    """||M - A B||_F, computed directly (the identity ||M||^2 - 2<.,.> + ... cancels badly)."""
    if a.shape[1] == 0:
        return float(m.norm())
    return float((m - a @ b).norm())
