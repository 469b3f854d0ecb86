"""How many threads numpy's and torch's BLAS use while a job runs, restored afterwards.

The compressor runs several layers at once, each single-threaded: the LAPACK parts (eigvalsh,
QR, small eigh) scale poorly over threads, and threaded BLAS pools that wait for each other
(OpenBLAS under numpy, MKL/OpenMP under torch) spin whenever another process shares the cores.
numpy has no API for its thread count, so the bundled OpenBLAS is asked through its C symbol;
where none is found (another BLAS), numpy keeps its own setting.
"""

from contextlib import contextmanager

import torch

from .openblas import find_symbol

_SYMBOLS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
            "openblas_set_num_threads64_", "openblas_set_num_threads")


def _openblas():
    """(set, get) of the OpenBLAS numpy loaded, or None."""
    lib, name = find_symbol(_SYMBOLS)
    getter = name.replace("set_", "get_") if lib is not None else None
    if lib is None or not hasattr(lib, getter):
        return None
    return getattr(lib, name), getattr(lib, getter)


@contextmanager
def blas_threads(n):
    """numpy's OpenBLAS and torch's intra-op pool at `n` threads inside the block."""
    blas = _openblas()
    old_torch = torch.get_num_threads()
    old_blas = blas[1]() if blas else None
    torch.set_num_threads(n)
    if blas:
        blas[0](n)
    try:
        yield
    finally:
        torch.set_num_threads(old_torch)
        if blas:
            blas[0](old_blas)
