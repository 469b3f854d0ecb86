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

from .ranks import is_dense

# Safety factor on the float32 error model below. Measured on random layers of SD shapes
# (320..2560 x 320..11520, flat to steep spectra), the worst eigenvalue error was 2.5 eps*||M||_F^2
# and 1.5 eps*lmax*sqrt(n): the model with this factor keeps 3x or more headroom (tests).
GRAM_SAFETY = 8.0


@dataclass
class Decomposition:
    """Singular values (float64, descending), their error bounds, and what gives the vectors."""
    s: np.ndarray
    err: np.ndarray
    exact: bool            # float64 SVD: s is the reference itself
    precision: str         # "gram32", "gram64" or "svd64"
    tall: bool             # d >= k: the basis spans the input side (V), else the output side (U)
    basis: torch.Tensor = None   # Gram eigenvectors, descending order (float32)
    u: torch.Tensor = None       # float64 SVD factors when exact
    vh: torch.Tensor = None


def as_matrix(delta):
    """Linear (out x in) as is; Conv (out x in x kh x kw) as out x (in*kh*kw)."""
    return delta.reshape(delta.shape[0], -1)


def gram_spectrum(m, vectors=True, dtype=torch.float32):
    """Spectrum through the Gram matrix of the smaller side, with per-value error bounds."""
    d, k = m.shape
    tall = d >= k
    m = m.to(dtype)
    g = m.T @ m if tall else m @ m.T
    if vectors:
        lam, q = torch.linalg.eigh(g)
        q = q.flip(1)
    else:
        lam, q = torch.linalg.eigvalsh(g), None
    lam = lam.flip(0).double().cpu().numpy()
    n = lam.size
    eps = float(torch.finfo(dtype).eps)
    fro2 = max(float(np.sum(lam)), 0.0)
    lam_max = max(float(lam[0]), 0.0) if n else 0.0
    # Absolute eigenvalue error of Gram + eigh: an empirical model (see GRAM_SAFETY).
    dl = GRAM_SAFETY * eps * min(fro2, lam_max * math.sqrt(n))
    s = np.sqrt(np.clip(lam, 0.0, None))
    # |sqrt(a) - sqrt(b)| <= min(sqrt(|a - b|), |a - b| / sqrt(a)).
    err = np.minimum(math.sqrt(dl), dl / np.maximum(s, 1e-300))
    return Decomposition(s=s, err=err, exact=False, tall=tall, basis=q,
                         precision="gram32" if dtype == torch.float32 else "gram64")


def svd64_spectrum(m, vectors=True):
    """The float64 reference: exact up to float64 rounding."""
    m64 = m.double()
    if vectors:
        u, s, vh = torch.linalg.svd(m64, full_matrices=False)
    else:
        u, s, vh = None, torch.linalg.svdvals(m64), None
    s = s.cpu().numpy()
    return Decomposition(s=s, err=np.zeros_like(s), exact=True, tall=m.shape[0] >= m.shape[1],
                         u=u, vh=vh, precision="svd64")


def factors(dec, m, t):
    """A (d x t) = U_t S_t and B (t x k) = V_t^T, float32, ordered by singular value."""
    if dec.exact:
        a = dec.u[:, :t] * dec.vh.new_tensor(dec.s[:t])
        return a.float().contiguous(), dec.vh[:t].float().contiguous()
    q = dec.basis[:, :t]
    m = m.to(q.dtype)
    if dec.tall:                       # q = V_t: A = M V_t = U_t S_t
        return (m @ q).float().contiguous(), q.T.float().contiguous()
    # q = U_t: B = U_t^T M = S_t V_t^T; normalise its rows to unit length (V_t^T) and move the
    # norms (the singular values, measured on M itself) into A.
    p = q.T @ m
    norms = p.norm(dim=1).clamp_min(torch.finfo(p.dtype).tiny)
    return (q * norms).float().contiguous(), (p / norms[:, None]).float().contiguous()


def _undecided(dec, rule, d, k):
    lo, hi = (rule.clamp(t, min(d, k)) for t in rule.raw_range(dec.s, dec.err))
    return lo != hi and not (is_dense(lo, d, k) and is_dense(hi, d, k))


def decide_rank(m, rule, vectors=True):
    """Decompose `m` and pick its rank under `rule`, climbing in precision while undecided.

    Returns (decomposition, rank, dense)."""
    d, k = m.shape
    dec = gram_spectrum(m, vectors, torch.float32)
    if _undecided(dec, rule, d, k):
        dec = gram_spectrum(m, vectors, torch.float64)
        if _undecided(dec, rule, d, k):
            dec = svd64_spectrum(m, vectors)
    t = rule.clamp(rule.raw_rank(dec.s), min(d, k))
    return dec, t, is_dense(t, d, k)


def residual_norm(m, a, b):
    """||M - A B||_F, computed directly (the identity ||M||^2 - 2<.,.> + ... cancels badly)."""
    if a.shape[1] == 0:
        return float(m.norm())
    return float((m - a @ b).norm())
