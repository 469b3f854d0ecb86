"""The OpenBLAS library numpy loaded, opened again through ctypes.

numpy has no API for its BLAS thread count, nor for the LAPACK steps `blas_threads` and
`lapack` need, but its wheels ship OpenBLAS with LAPACK inside. Where numpy uses another BLAS
(conda's MKL, a distribution's reference LAPACK) nothing is found and callers fall back to
plain numpy.
"""

import ctypes
import functools


@functools.lru_cache(maxsize=None)
def loaded_libraries():
    """ctypes handles of the OpenBLAS shared objects in this process (after numpy's import)."""
    import numpy  # noqa: F401  (loads its BLAS)
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = sorted({ln.split()[-1] for ln in maps if "openblas" in ln.lower()})
    except OSError:          # no /proc (macOS, Windows): numpy keeps its own settings
        return ()
    libs = []
    for path in paths:
        try:
            libs.append(ctypes.CDLL(path))
        except OSError:
            continue
    return tuple(libs)


def find_symbol(names):
    """(library, name) of the first of `names` any loaded OpenBLAS exports, or (None, None)."""
    for lib in loaded_libraries():
        for name in names:
            if hasattr(lib, name):
                return lib, name
    return None, None
