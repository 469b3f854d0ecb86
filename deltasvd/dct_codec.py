"""Delta-DCT (after arXiv:2503.06676, data-free): one layer's delta coded in DCT patches with
mixed bit-widths. Host-free math (torch + numpy), vectorised: no Python loop per patch.

The layer's matrix (Linear as is, Conv as out x in*kh*kw) is zero-padded to multiples of P and
cut into P x P patches (P = 16). Per patch:

* importance: its root-mean-square sigma = ||patch||_F / P (the orthonormal DCT keeps the norm,
  so sigma is also the RMS of its coefficients);
* bit-width b in 0..8, allocated by reverse water-filling: b = round(log2(sigma) + c), clamped to
  0..8, with one offset c per layer found by bisection so that the layer's coefficient bits fit
  the budget (bits/param * d * k minus the side data below). Louder patches get more bits; a
  patch at 0 bits decodes to zero;
* the orthonormal 2-D DCT-II, C = D X D^T, D[u, n] = c_u cos(pi (2n + 1) u / 2P) with
  c_0 = sqrt(1/P), c_u = sqrt(2/P);
* every coefficient quantized with a uniform mid-rise quantizer of 2^b levels whose step is the
  Gaussian-optimal step for b bits (Max 1960) times sigma: q = clamp(floor(C / step) + 2^(b-1),
  0, 2^b - 1), decoded as (q - 2^(b-1) + 1/2) * step. At 1 bit this is sign(C) * 0.798 sigma.

Stored per layer (every bit counted in the file size, so in the reported bits per parameter):

* `dct_scales`  bfloat16 (n_patches,)  sigma of each patch, row-major patch order (bfloat16:
  a fine-tune's small patches would be subnormal or zero in float16);
* `dct_bits`    uint8, n_patches 4-bit fields (bitpack): each patch's bit-width;
* `dct_codes`   uint8: for b = 1..8, the codes of the patches of width b, in patch order, each
  patch's P*P codes row-major as b-bit fields, each width's stream padded to a whole byte.

Side data: 20 bits per patch of 256 values, 0.078 bits per parameter (plus the padding of the
layer's edge patches, which is stored like any other coefficient).
"""

import math
from contextlib import contextmanager

import numpy as np
import torch

from . import bitpack
from .limits import DCT_MAX_BITS
from .quant import GAUSS_STEP   # Max's Gaussian-optimal uniform steps, per bit-width

PATCH = 16
MAX_BITS = DCT_MAX_BITS
BITS_FIELD = 4            # width of each patch's bit-width field in `dct_bits`
SCALE_BITS = 16           # bfloat16 sigma per patch
SCALE_DTYPE = torch.bfloat16
CHUNK = 1 << 16            # values per step of the encoder loop (patch rows): stays in cache


@contextmanager
def one_thread():
    """The codec's steps are small (CHUNK values): one torch thread does them fastest. With two
    threads on a shared 2-core machine, each small op waited on the other thread (5x slower)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def dct_matrix(p, dtype=torch.float32):
    """Orthonormal DCT-II matrix D (p x p): coefficients of a vector x are D @ x."""
    n = torch.arange(p, dtype=torch.float64)
    d = torch.cos(math.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * p)) * math.sqrt(2.0 / p)
    d[0] /= math.sqrt(2.0)
    return d.to(dtype)


def grid(d, k, p=PATCH):
    """Patch rows and columns of a d x k matrix (zero-padded to multiples of p)."""
    return -(-d // p), -(-k // p)


def side_bits(n_patches):
    return n_patches * (SCALE_BITS + BITS_FIELD)


def _padded(m, p):
    d, k = m.shape
    gr, gc = grid(d, k, p)
    if (gr * p, gc * p) == (d, k):
        return m
    out = torch.zeros(gr * p, gc * p, dtype=m.dtype, device=m.device)
    out[:d, :k] = m
    return out


def dct2(m, p=PATCH):
    """Blockwise 2-D DCT of a (gr*p) x (gc*p) matrix, coefficients in place of each patch."""
    rows, cols = m.shape
    dm = dct_matrix(p, m.dtype).to(m.device)
    x = (m.reshape(rows, cols // p, p) @ dm.T).reshape(rows // p, p, cols)   # along rows
    return torch.matmul(dm, x).reshape(rows, cols)                           # along columns


def idct2(c, p=PATCH):
    """Inverse of `dct2` (D is orthogonal: X = D^T C D)."""
    rows, cols = c.shape
    dm = dct_matrix(p, c.dtype).to(c.device)
    x = (c.reshape(rows, cols // p, p) @ dm).reshape(rows // p, p, cols)
    return torch.matmul(dm.T, x).reshape(rows, cols)


def allocate_bits(sigma, budget_bits, per_patch):
    """Bit-width (0..MAX_BITS) per patch: b = clamp(round(log2(sigma) + c)), the largest offset
    c (bisection) whose total sum(b) * per_patch stays within budget_bits. Vectorised."""
    sigma = np.asarray(sigma, dtype=np.float64)
    bits = np.zeros(sigma.shape, dtype=np.int64)
    live = sigma > 0
    if budget_bits < per_patch or not live.any():
        return bits
    logs = np.log2(sigma[live])

    def total(c):
        return int(np.clip(np.rint(logs + c), 0, MAX_BITS).sum()) * per_patch

    lo, hi = -logs.max() - 1.0, MAX_BITS + 1.0 - logs.min()   # total(lo) = 0, total(hi) = max
    if total(hi) <= budget_bits:
        lo = hi
    else:
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if total(mid) <= budget_bits:
                lo = mid
            else:
                hi = mid
    bits[live] = np.clip(np.rint(logs + lo), 0, MAX_BITS)
    return bits


def _steps(scales, bits):
    step = torch.tensor([0.0] + [GAUSS_STEP[b] for b in range(1, MAX_BITS + 1)],
                        dtype=torch.float32)[bits.long()] * scales
    return torch.where(bits > 0, step, torch.ones_like(step))


def encode(m, bits_per_param, p=PATCH):
    """Code a float32 matrix at about `bits_per_param` bits per parameter (side data included).
    Returns (parts, err2, norm2): the stored tensors, ||m - decode(parts)||_F^2 and ||m||_F^2
    (float64 sums)."""
    with one_thread():
        return _encode(m, bits_per_param, p)


def _encode(m, bits_per_param, p):
    d, k = m.shape
    gr, gc = grid(d, k, p)
    n = gr * gc
    x = _padded(m.float(), p)
    norms = torch.linalg.vector_norm(x.reshape(gr, p, gc, p), dim=(1, 3)).reshape(-1)
    scales = (norms / p).to(SCALE_DTYPE)
    budget = bits_per_param * d * k - side_bits(n)
    bits = torch.from_numpy(allocate_bits(scales.double().numpy(), budget, p * p))  # 0 at scale 0
    step = _steps(scales.float(), bits).reshape(gr, gc)
    half = (2.0 ** (bits - 1).clamp(min=0)).float().reshape(gr, gc)
    e2 = torch.empty(gr, gc, dtype=torch.float64)
    codes = np.empty((gr, gc, p * p), dtype=np.uint8)
    rows = max(1, CHUNK // (p * p * gc))        # patch rows per chunk: work stays in cache
    for a in range(0, gr, rows):
        b = min(gr, a + rows)
        st = step[a:b].reshape(b - a, 1, gc, 1)
        hf = half[a:b].reshape(b - a, 1, gc, 1)
        r = dct2(x[a * p: b * p], p).reshape(b - a, p, gc, p).div_(st)   # in units of step
        q = torch.clamp(torch.floor(r).add_(hf), min=torch.zeros(()),
                        max=(2.0 * hf - 1).clamp(min=0))
        # quantization error in steps: r - (q - half + 1/2)
        e2[a:b] = torch.linalg.vector_norm(r.sub_(q).add_(hf).sub_(0.5), dim=(1, 3)).double()
        codes[a:b] = q.to(torch.uint8).permute(0, 2, 1, 3).reshape(b - a, gc, p * p).numpy()
    live = bits > 0
    err2 = torch.where(live, e2.reshape(-1) * step.reshape(-1).double(),
                       norms.double()).pow(2).sum()   # a 0-bit patch's error is itself
    if x.shape != m.shape:   # the padding is not part of the layer: decode and compare
        qt = torch.from_numpy(codes).reshape(gr, gc, p, p).permute(0, 2, 1, 3)
        err2 = (m.double() - decode_padded(qt, scales, bits, p)[:d, :k].double()).pow(2).sum()
    codes = codes.reshape(n, p * p)
    bits_np = bits.numpy()
    streams = [bitpack.pack(codes[bits_np == b], b) for b in range(1, MAX_BITS + 1)]
    parts = {"codes": torch.from_numpy(np.concatenate(streams)),
             "scales": scales,
             "bits": torch.from_numpy(bitpack.pack(bits_np.astype(np.uint8), BITS_FIELD))}
    return parts, float(err2), float(norms.double().pow(2).sum())


def decode_padded(q, scales, bits, p=PATCH):
    """The padded float32 matrix from codes q in (gr, p, gc, p) layout."""
    gr, gc = q.shape[0], q.shape[2]
    shape4 = (gr, 1, gc, 1)
    step = _steps(scales.float(), bits).reshape(shape4)
    half = (2.0 ** (bits - 1).clamp(min=0)).float().reshape(shape4)
    deq = q.float().sub(half).add_(0.5).mul_(step)
    deq = torch.where((bits > 0).reshape(shape4), deq, torch.zeros((), dtype=torch.float32))
    return idct2(deq.reshape(gr * p, gc * p), p)


def check(parts, d, k, p=PATCH):
    """ValueError unless the stored parts have the sizes a d x k layer needs."""
    gr, gc = grid(d, k, p)
    n = gr * gc
    if parts["scales"].numel() != n or parts["scales"].dtype != SCALE_DTYPE:
        raise ValueError(f"dct_scales: {parts['scales'].numel()} {parts['scales'].dtype} for "
                         f"{n} patches")
    bits = bitpack.unpack(parts["bits"].numpy().reshape(-1), n, BITS_FIELD)
    if bits.max(initial=0) > MAX_BITS:
        raise ValueError(f"dct_bits: a bit-width above {MAX_BITS}")
    want = sum(bitpack.packed_bytes(int((bits == b).sum()) * p * p, b)
               for b in range(1, MAX_BITS + 1))
    if parts["codes"].numel() != want or parts["codes"].dtype != torch.uint8:
        raise ValueError(f"dct_codes: {parts['codes'].numel()} bytes, the bit-widths need {want}")


def decode(parts, d, k, p=PATCH):
    """The float32 d x k matrix of a layer's stored parts."""
    with one_thread():
        return _decode(parts, d, k, p)


def _decode(parts, d, k, p):
    gr, gc = grid(d, k, p)
    n = gr * gc
    scales = parts["scales"].float().reshape(-1)
    bits_np = bitpack.unpack(parts["bits"].numpy(), n, BITS_FIELD).astype(np.int64)
    if scales.numel() != n:
        raise ValueError(f"{scales.numel()} DCT scales for {n} patches")
    raw = parts["codes"].numpy()
    q = np.zeros((n, p * p), dtype=np.uint8)
    offset = 0
    for b in range(1, MAX_BITS + 1):
        sel = bits_np == b
        count = int(sel.sum()) * p * p
        size = bitpack.packed_bytes(count, b)
        q[sel] = bitpack.unpack(raw[offset: offset + size], count, b).reshape(-1, p * p)
        offset += size
    if offset != raw.size:
        raise ValueError(f"{raw.size} bytes of DCT codes, the bit-widths describe {offset}")
    qt = torch.from_numpy(q).reshape(gr, gc, p, p).permute(0, 2, 1, 3)
    return decode_padded(qt, scales, torch.from_numpy(bits_np), p)[:d, :k].contiguous()
