"""Packing small unsigned integers into a uint8 stream (host-free; numpy only).

`pack(values, bits)` writes each value as a `bits`-wide field, most significant bit first,
fields back to back with no padding between them, the last byte zero-padded: exactly
ceil(n * bits / 8) bytes. `unpack` is its inverse. Both are vectorised (numpy's packbits).
"""

import numpy as np


def packed_bytes(n, bits):
    """Bytes `pack` uses for n values of `bits` bits."""
    return (int(n) * int(bits) + 7) // 8


def pack(values, bits):
    """uint8 array of ceil(len * bits / 8) bytes; values must lie in [0, 2**bits)."""
    v = np.asarray(values, dtype=np.uint8).reshape(-1)
    if bits == 0 or v.size == 0:
        return np.zeros(0, dtype=np.uint8)
    if bits == 8:
        return v.copy()
    if bits == 1:
        return np.packbits(v)
    if 8 % bits == 0:   # 2 or 4: whole fields per byte, by shifts
        per = 8 // bits
        v = np.concatenate([v, np.zeros(-v.size % per, dtype=np.uint8)]).reshape(-1, per)
        shifts = np.arange(8 - bits, -1, -bits, dtype=np.uint8)
        return np.bitwise_or.reduce(v << shifts, axis=1).astype(np.uint8)
    # (n, 8) bits of each byte, keep the low `bits` columns, most significant first
    planes = np.unpackbits(v[:, None], axis=1)[:, 8 - bits:]
    return np.packbits(planes.reshape(-1))


def unpack(data, n, bits):
    """The n `bits`-wide values `pack` wrote, as uint8."""
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    if bits == 0 or n == 0:
        return np.zeros(int(n), dtype=np.uint8)
    if data.size != packed_bytes(n, bits):
        raise ValueError(f"{data.size} bytes for {n} values of {bits} bits "
                         f"(expected {packed_bytes(n, bits)})")
    if bits == 8:
        return data.copy()
    if 8 % bits == 0:
        shifts = np.arange(8 - bits, -1, -bits, dtype=np.uint8)
        mask = np.uint8((1 << bits) - 1)
        return ((data[:, None] >> shifts) & mask).reshape(-1)[:n]
    planes = np.unpackbits(data)[: n * bits].reshape(n, bits)
    weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.uint8)
    return (planes * weights).sum(axis=1, dtype=np.uint8)
