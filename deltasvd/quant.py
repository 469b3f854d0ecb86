"""Quantized SVD factors (host-free math): A = U_t S_t and B = V_t^T stored as small integers.

Component i (column i of A, row i of B) gets its own bit-width, more for the leading singular
vectors than for the tail: b_i = clamp(F + round(log2(s_i / s_0)), max(MIN_BITS, F - SPREAD), F)
for `--factor-bits F`. A component's share of the error is about s_i 2^-b_i, so each halving of
s_i saves one bit (reverse water-filling: equal error per component), down to F - SPREAD bits.
With F = 8 the tail keeps 4 bits: a long, heavy tail at 2 bits would carry most of the error.

Each row (a column of A, a row of B) is quantized with its own bfloat16 step h: a uniform
mid-rise quantizer of L = 2^b levels, q = clamp(floor(x / h) + L/2, 0, L - 1), decoded as
(q - L/2 + 1/2) h. The step is chosen per row, among STEP_CANDIDATES steps spaced
geometrically from the Gaussian-optimal step for b bits (Max 1960) times the row's RMS (which
clips the largest values) up to 2 max|row| / L (which clips nothing), as the one with the least
squared error on that row: heavy-tailed singular vectors keep their peaks, Gaussian-like ones
get the finer step.

Stored per layer (all counted in the file size):

* `q_bits`      uint8 (t,)    each component's bit-width;
* `up_scales`   bfloat16 (t,) and `down_scales` bfloat16 (t,): each row's step h (bfloat16:
  the columns of A of a small delta's tail are far below float16's normal range);
* `up_codes`    uint8: for b = 8 down to 1, the components of width b in order, each column of
  A as d b-bit fields (bitpack), each width's stream padded to a whole byte;
* `down_codes`  uint8: the same for the rows of B (k fields each).
"""

import numpy as np
import torch

from . import bitpack
from .limits import FACTOR_MAX_BITS

MIN_BITS = 2
MAX_BITS = FACTOR_MAX_BITS
SPREAD = 4      # the tail gets at most this many bits fewer than the leading components


def component_bits(s, factor_bits, min_bits=None):
    """Bit-width of each component from its singular value (descending s)."""
    s = np.asarray(s, dtype=np.float64)
    if min_bits is None:
        min_bits = max(MIN_BITS, factor_bits - SPREAD)
    lo = min(min_bits, factor_bits)
    if s.size == 0 or s[0] <= 0:
        return np.full(s.size, factor_bits, dtype=np.int64)
    with np.errstate(divide="ignore"):
        drop = np.rint(np.log2(np.maximum(s, 1e-300) / s[0]))
    return np.clip(factor_bits + drop, lo, factor_bits).astype(np.int64)


# Step of the optimal uniform quantizer of a unit Gaussian with 2^b levels (Max, 1960).
GAUSS_STEP = {1: 1.596, 2: 0.9957, 3: 0.586, 4: 0.3352, 5: 0.1881, 6: 0.1041, 7: 0.0569,
              8: 0.0308}
STEP_CANDIDATES = 8
STEP_DTYPE = torch.bfloat16   # the range of float32 (A's columns can be tiny), 16 bits
_TINY = 1e-30


def _quantize(x, step, half):
    """Codes and values of x (t x n) with per-row step (t x 1) and L/2 = half (t x 1)."""
    q = torch.clamp(torch.floor(x / step) + half, min=torch.zeros(()), max=2 * half - 1)
    return q, (q - half + 0.5) * step


def quantize_rows(x, bits):
    """x (t x n) float32, bits (t,) ints -> (codes uint8 stream, bfloat16 steps, float32 x^)."""
    x = x.float()
    t, n = x.shape
    bits = np.asarray(bits, dtype=np.int64)
    half = torch.from_numpy(2.0 ** (bits - 1)).float().reshape(t, 1)
    if n == 0 or t == 0:
        return np.zeros(0, dtype=np.uint8), torch.zeros(t, dtype=STEP_DTYPE), x.clone()
    rms = x.pow(2).mean(dim=1, keepdim=True).sqrt()
    top = x.abs().amax(dim=1, keepdim=True) / half                    # clips nothing
    gauss = torch.tensor([GAUSS_STEP[int(b)] for b in bits]).reshape(t, 1) * rms
    lo = torch.minimum(gauss, top).clamp(min=_TINY)
    hi = top.clamp(min=_TINY)
    best_err = torch.full((t, 1), float("inf"))
    best = hi.clone()
    for i in range(STEP_CANDIDATES):
        step = (lo * (hi / lo) ** (i / (STEP_CANDIDATES - 1))).to(STEP_DTYPE).float()
        _, xh = _quantize(x, step, half)
        err = (x - xh).pow(2).sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, step, best)
    q, xhat = _quantize(x, best, half)
    codes = q.to(torch.uint8).numpy()
    stream = np.concatenate([bitpack.pack(codes[bits == b], b)
                             for b in range(MAX_BITS, 0, -1)])
    return stream, best.reshape(t).to(STEP_DTYPE), xhat


def dequantize_rows(stream, steps, bits, n):
    """Inverse of `quantize_rows`: float32 (t x n)."""
    bits = np.asarray(bits, dtype=np.int64)
    t = bits.size
    q = np.zeros((t, n), dtype=np.uint8)
    offset = 0
    for b in range(MAX_BITS, 0, -1):
        sel = bits == b
        count = int(sel.sum()) * n
        size = bitpack.packed_bytes(count, b)
        q[sel] = bitpack.unpack(stream[offset: offset + size], count, b).reshape(-1, n)
        offset += size
    if offset != stream.size:
        raise ValueError(f"{stream.size} bytes of factor codes, the bit-widths describe {offset}")
    half = torch.from_numpy(2.0 ** (bits - 1)).float().reshape(t, 1)
    return (torch.from_numpy(q).float() - half + 0.5) * steps.float().reshape(t, 1)


def encode_factors(a, b, s, factor_bits):
    """a (d x t), b (t x k), s the t leading singular values. Returns (parts, a^, b^)."""
    bits = component_bits(s, factor_bits)
    if bits.size and (bits.min() < 1 or bits.max() > MAX_BITS):
        raise ValueError(f"factor bits must lie in 1..{MAX_BITS}")
    up, up_scales, ahat = quantize_rows(a.float().T.contiguous(), bits)
    down, down_scales, bhat = quantize_rows(b.float(), bits)
    parts = {"q_bits": torch.from_numpy(bits.astype(np.uint8)),
             "up_codes": torch.from_numpy(up), "up_scales": up_scales,
             "down_codes": torch.from_numpy(down), "down_scales": down_scales}
    return parts, ahat.T.contiguous(), bhat


def code_bytes(bits, n):
    """Bytes of the code stream of rows of n values with these bit-widths."""
    bits = np.asarray(bits)
    return sum(bitpack.packed_bytes(int((bits == b).sum()) * n, b) for b in range(1, MAX_BITS + 1))


def check(parts, d, k):
    """ValueError unless the stored parts have the sizes a d x k layer needs."""
    bits = parts["q_bits"].numpy().astype(np.int64).reshape(-1)
    t = bits.size
    if bits.size and (bits.min() < 1 or bits.max() > MAX_BITS):
        raise ValueError(f"q_bits: bit-widths outside 1..{MAX_BITS}")
    for side, n in (("up", d), ("down", k)):
        if parts[side + "_scales"].numel() != t:
            raise ValueError(f"{side}_scales: {parts[side + '_scales'].numel()} for {t} rows")
        want = code_bytes(bits, n)
        if parts[side + "_codes"].numel() != want:
            raise ValueError(f"{side}_codes: {parts[side + '_codes'].numel()} bytes, the "
                             f"bit-widths need {want}")


def decode_factors(parts, d, k):
    """(A, B) float32 from the stored parts of a layer of d x k."""
    bits = parts["q_bits"].numpy().astype(np.int64)
    a = dequantize_rows(parts["up_codes"].numpy(), parts["up_scales"], bits, d)
    b = dequantize_rows(parts["down_codes"].numpy(), parts["down_scales"], bits, k)
    return a.T.contiguous(), b
