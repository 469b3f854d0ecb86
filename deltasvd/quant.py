"""Quantized SVD factors (host-free math): A = U_t S_t and B = V_t^T stored as small integers.

Component i (column i of A, row i of B) gets its own bit-width, more for the leading singular
vectors than for the tail: b_i = clamp(F + round(log2(s_i / s_0)), max(MIN_BITS, F - SPREAD), F)
for `--factor-bits F`. A component's share of the error is about s_i 2^-b_i, so each halving of
s_i saves one bit (reverse water-filling: equal error per component), down to F - SPREAD bits.
With F = 8 the tail keeps 4 bits: a long, heavy tail at 2 bits would carry most of the error.

Each row (a column of A, a row of B) is quantized with its own float16 scale m = max |row|:
uniform mid-rise levels over [-m, m], L = 2^b of them, step = 2m / (L - 1),
q = clamp(round(x / step + (L - 1) / 2), 0, L - 1), decoded as (q - (L - 1) / 2) * step.

Stored per layer (all counted in the file size):

* `q_bits`      uint8 (t,)    each component's bit-width;
* `up_scales`   float16 (t,)  and `down_scales` float16 (t,);
* `up_codes`    uint8: for b = 8 down to 1, the components of width b in order, each column of
  A as d b-bit fields (bitpack), each width's stream padded to a whole byte;
* `down_codes`  uint8: the same for the rows of B (k fields each).
"""

import numpy as np
import torch

from . import bitpack

MIN_BITS = 2
MAX_BITS = 8
SPREAD = 4      # the tail gets at most this many bits fewer than the leading components
_FP16_MAX = 65504.0


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


def _levels(bits):
    return (2.0 ** torch.as_tensor(bits, dtype=torch.float64)).float()


def quantize_rows(x, bits):
    """x (t x n) float32, bits (t,) ints -> (codes uint8 stream, float16 scales, float32 x^)."""
    x = x.float()
    t, n = x.shape
    scales = x.abs().amax(dim=1).clamp(max=_FP16_MAX).to(torch.float16) if n else \
        torch.zeros(t, dtype=torch.float16)
    top = (_levels(bits) - 1).reshape(t, 1)
    step = torch.where(scales > 0, 2 * scales.float(), torch.ones(())).reshape(t, 1) / top
    q = torch.clamp(torch.round(x / step + top / 2), min=torch.zeros(()), max=top)
    xhat = (q - top / 2) * step
    xhat = torch.where((scales > 0).reshape(t, 1), xhat, torch.zeros(()))
    codes = q.to(torch.uint8).numpy()
    bits = np.asarray(bits)
    stream = np.concatenate([bitpack.pack(codes[bits == b], b)
                             for b in range(MAX_BITS, 0, -1)])
    return stream, scales, xhat


def dequantize_rows(stream, scales, bits, n):
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
    top = (_levels(bits) - 1).reshape(t, 1)
    scales = scales.float().reshape(t)
    step = torch.where(scales > 0, 2 * scales, torch.ones(())).reshape(t, 1) / top
    xhat = (torch.from_numpy(q).float() - top / 2) * step
    return torch.where((scales > 0).reshape(t, 1), xhat, torch.zeros(()))


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


def check(parts, d, k):
    """ValueError unless the stored parts have the sizes a d x k layer needs."""
    bits = parts["q_bits"].numpy().astype(np.int64).reshape(-1)
    t = bits.size
    if bits.size and (bits.min() < 1 or bits.max() > MAX_BITS):
        raise ValueError(f"q_bits: bit-widths outside 1..{MAX_BITS}")
    for side, n in (("up", d), ("down", k)):
        if parts[side + "_scales"].numel() != t:
            raise ValueError(f"{side}_scales: {parts[side + '_scales'].numel()} for {t} rows")
        want = sum(bitpack.packed_bytes(int((bits == b).sum()) * n, b)
                   for b in range(1, MAX_BITS + 1))
        if parts[side + "_codes"].numel() != want:
            raise ValueError(f"{side}_codes: {parts[side + '_codes'].numel()} bytes, the "
                             f"bit-widths need {want}")


def decode_factors(parts, d, k):
    """(A, B) float32 from the stored parts of a layer of d x k."""
    bits = parts["q_bits"].numpy().astype(np.int64)
    a = dequantize_rows(parts["up_codes"].numpy(), parts["up_scales"], bits, d)
    b = dequantize_rows(parts["down_codes"].numpy(), parts["down_scales"], bits, k)
    return a.T.contiguous(), b
