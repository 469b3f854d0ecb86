"""Symmetric eigenvalues first, then only the eigenvectors asked for, through numpy's LAPACK.

numpy offers `eigvalsh` (all values) and `eigh` (all values and all vectors), each reducing the
matrix to tridiagonal form T = Q^T G Q on its own. The compressor needs all values (for the
rank rule) and then only the leading t vectors (t is a few percent of n): so the reduction is
done once (dsytrd, 4/3 n^3 flops, the whole cost of eigvalsh), the values come from T (dsterf,
O(n^2)), and the t vectors from T by inverse iteration on those values (dstein, O(n t); MRRR,
dstemr, for over a quarter of the vectors or where it does not converge) and back through Q
(2 n^2 t, in blocks of BACK_BLOCK reflectors: `_back_transform`). On SD1.5's layers the MRRR
and ormtr version of this took a third of what eigvalsh plus a subspace iteration did; on the
SDXL-layout pair, stein and the blocked back-transform took the vectors from 48 to 17 CPU-s
(of ~200).

`available()` is False where numpy's BLAS is not an OpenBLAS with these symbols; the spectrum
then uses numpy's eigvalsh and a subspace iteration instead. Arguments follow the Fortran
convention: everything by reference, then the hidden lengths of the character arguments.
"""

import ctypes
import functools
from dataclasses import dataclass

import numpy as np

from . import workspace
from .openblas import find_symbol

# (symbol prefix, suffix, integer type): numpy >= 2 wheels (scipy-openblas64, ILP64) first.
_FLAVOURS = (("scipy_", "_64_", ctypes.c_int64), ("scipy_", "_", ctypes.c_int32),
             ("", "_64_", ctypes.c_int64), ("", "_", ctypes.c_int32))
_CHAR_LEN = ctypes.c_size_t(1)


class LapackError(RuntimeError):
    """A routine returned info != 0 (an argument error, or no convergence)."""


@dataclass(frozen=True)
class _Binding:
    lib: ctypes.CDLL
    prefix: str
    suffix: str
    int_t: type

    def call(self, name, *args, chars=0):
        info = self.int_t(0)
        getattr(self.lib, f"{self.prefix}{name}{self.suffix}")(
            *args, ctypes.byref(info), *([_CHAR_LEN] * chars))
        if info.value != 0:
            raise LapackError(f"LAPACK {name} returned info={info.value}")

    def int(self, v):
        return ctypes.byref(self.int_t(v))


@functools.lru_cache(maxsize=None)
def _binding():
    for prefix, suffix, int_t in _FLAVOURS:
        names = [f"{prefix}{p}{r}{suffix}" for p in "ds" for r in ("sytrd", "sterf", "stemr",
                                                                  "stein", "trtrs")]
        lib, _ = find_symbol(names[:1])
        if lib is not None and all(hasattr(lib, n) for n in names):
            return _Binding(lib, prefix, suffix, int_t)
    return None


def available():
    return _binding() is not None


def _ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def _char(c):
    return ctypes.c_char_p(c.encode())


def _real(v, dtype):
    return ctypes.byref((ctypes.c_double if dtype == np.float64 else ctypes.c_float)(v))


def _name(routine, dtype):
    """LAPACK's name of `routine` ("sytrd", ...) for float64 (d...) or float32 (s...) data."""
    return ("d" if dtype == np.float64 else "s") + routine


@dataclass
class Tridiagonal:
    """G = Q T Q^T: T's diagonal and off-diagonal; Q as dsytrd leaves it, Householder vectors
    below the subdiagonal of `h` (n x n, Fortran order) with their scales `tau`."""
    h: np.ndarray
    tau: np.ndarray
    diag: np.ndarray
    off: np.ndarray
    values: np.ndarray = None     # T's eigenvalues, ascending, once `eigenvalues` has them

    @property
    def n(self):
        return self.diag.size


def tridiagonalize(g):
    """Reduce the symmetric matrix g (float64, or float32: the fast route) in place (its
    storage becomes `h`); everything after works in g's precision."""
    lp = _binding()
    n = g.shape[0]
    dt = np.float32 if g.dtype == np.float32 else np.float64
    if g.dtype == dt and g.flags.c_contiguous:
        h = g.T      # g is symmetric: its C-ordered storage read in Fortran order is g again
    else:
        h = np.asfortranarray(g, dtype=dt)
    diag, off, tau = (np.empty(m, dt) for m in (n, max(n - 1, 1), max(n - 1, 1)))
    work = np.empty(1, dt)
    for lwork in (-1, None):                       # workspace query, then the reduction
        if lwork is None:
            lwork = int(work[0])
            work = np.empty(max(lwork, 1), dt)
        lp.call(_name("sytrd", dt), _char("L"), lp.int(n), _ptr(h), lp.int(max(n, 1)),
                _ptr(diag), _ptr(off), _ptr(tau), _ptr(work), lp.int(lwork), chars=1)
    return Tridiagonal(h=h, tau=tau, diag=diag, off=off)


def eigenvalues(tri):
    """All eigenvalues of T (= those of G), ascending, in T's precision."""
    values, off = tri.diag.copy(), tri.off.copy()
    _binding().call(_name("sterf", values.dtype), _binding().int(tri.n), _ptr(values), _ptr(off))
    tri.values = values
    return values


def top_eigenvectors(tri, t):
    """The eigenvectors of G for its t largest eigenvalues, as columns in T's precision,
    largest first."""
    n = tri.n
    if t == 0:
        return np.zeros((n, 0), tri.diag.dtype)
    z = None
    if tri.values is not None and t <= INVERSE_ITERATION_SHARE * n:
        try:
            z = _inverse_iteration(tri, t)
        except LapackError:
            pass                      # a vector did not converge: MRRR instead
    if z is None:
        try:
            z = _tridiagonal_vectors(tri, t)
        except LapackError:
            if tri.diag.dtype == np.float64:
                raise
            # float32 MRRR gives up on some large clustered spectra (sstemr info=22 on
            # noise-like 3072-wide Grams): T's vectors from dstemr, back through the float32
            # reflectors, at about twice sstemr's small cost (not a float64 Gram and eigh)
            z = np.asfortranarray(_tridiagonal_vectors(_float64(tri), t), dtype=np.float32)
    _back_transform(tri, z)
    return z[:, ::-1]


def _float64(tri):
    return Tridiagonal(h=None, tau=None, diag=tri.diag.astype(np.float64),
                       off=tri.off.astype(np.float64))


# Inverse iteration re-orthogonalises each vector against the others of its cluster (values
# within 1e-3 ||T||), so deep in a flat noise bulk it costs more than MRRR. On a 3072-wide
# float32 Gram of noise plus a rank-64 part: stein 0.031 / 0.18 / 0.45 / 0.62 s for 5 / 15 /
# 25 / 30% of the vectors, sstemr 0.070 / (info=22: dstemr) / (info=22) / 0.51 s; and once
# 909 vectors 1.2 s against 0.58 s.
INVERSE_ITERATION_SHARE = 0.25


def _inverse_iteration(tri, t):
    """T's eigenvectors for its t largest eigenvalues (from `eigenvalues`), by inverse
    iteration (stein: O(n) a vector, re-orthogonalised within clusters of close values), as
    Fortran-ordered columns, smallest of them first. Where the values are known, that took a
    third of MRRR's time on 1280-wide float32 Grams; raises LapackError where a vector does not
    converge (then MRRR)."""
    lp = _binding()
    n, dt = tri.n, tri.diag.dtype
    ints = np.int64 if lp.int_t is ctypes.c_int64 else np.int32
    w = np.ascontiguousarray(tri.values[n - t:], dtype=dt)
    block, split = np.ones(t, ints), np.full(n, n, ints)   # one block: T taken whole
    z = np.empty((n, t), dt, order="F")
    work, iwork, fail = np.empty(5 * n, dt), np.empty(n, ints), np.empty(t, ints)
    lp.call(_name("stein", dt), lp.int(n), _ptr(tri.diag), _ptr(tri.off), lp.int(t), _ptr(w),
            _ptr(block), _ptr(split), _ptr(z), lp.int(n), _ptr(work), _ptr(iwork), _ptr(fail))
    return z


def _tridiagonal_vectors(tri, t):
    lp = _binding()
    n, dt = tri.n, tri.diag.dtype
    diag, off = tri.diag.copy(), np.zeros(n, dt)
    off[: n - 1] = tri.off[: n - 1]
    w, z = np.empty(n, dt), np.empty((n, t), dt, order="F")
    isuppz = np.empty(2 * t, dtype=np.int64 if lp.int_t is ctypes.c_int64 else np.int32)
    found = lp.int_t(0)
    work, iwork = np.empty(1, dt), np.empty(1, dtype=isuppz.dtype)
    for lwork in (-1, None):
        tryrac = lp.int_t(1)          # in/out: ask for full relative accuracy each time
        if lwork is None:
            lwork, liwork = int(work[0]), int(iwork[0])
            work, iwork = np.empty(lwork, dt), np.empty(liwork, dtype=isuppz.dtype)
        else:
            liwork = -1
        lp.call(_name("stemr", dt), _char("V"), _char("I"), lp.int(n), _ptr(diag), _ptr(off),
                _real(0.0, dt), _real(0.0, dt), lp.int(n - t + 1), lp.int(n),
                ctypes.byref(found), _ptr(w), _ptr(z), lp.int(n), lp.int(t), _ptr(isuppz),
                ctypes.byref(tryrac),
                _ptr(work), lp.int(lwork), _ptr(iwork), lp.int(liwork), chars=2)
    if found.value != t:
        raise LapackError(f"LAPACK {_name('stemr', dt)} found {found.value} of {t} eigenvectors")
    return z


# Reflectors applied at a time by the back-transform. LAPACK's ormtr (block 32 by ilaenv) ran
# at 7 GF/s on a 1280-wide float32 T with 62 vectors, a third of a layer's time; these blocks,
# as numpy products on z's rows, take under a third of its time (tests/test_lapack.py checks
# Q z against the reflectors applied one at a time).
BACK_BLOCK = 64


def _back_transform(tri, z):
    """z <- Q z, in place. Q = H(0) H(1) ... H(n-2), reflector i being I - tau_i v v^T with
    v[i+1] = 1 and v[i+2:] below the subdiagonal of h's column i. A block of k of them is
    I - V T V^T (the compact WY form), applied last block first; T is never formed: with
    tau_i = 2 / (v_i^T v_i), T^-1 = diag(1 / tau) + (strict upper part of V^T V), and a
    triangular solve gives T (V^T z). Works on z^T, whose rows are contiguous (stemr's z is
    Fortran ordered): a column-ordered update ran at a third of the speed."""
    n, t = z.shape
    if t == 0 or n < 2:
        return
    copied = not z.flags.f_contiguous
    zt = np.ascontiguousarray(z.T) if copied else z.T
    for s in reversed(range(0, n - 1, BACK_BLOCK)):
        e = min(s + BACK_BLOCK, n - 1)
        vt, tinv = _block(tri.h, tri.tau, s, e)
        tail = zt[:, s + 1:]                                       # (Q z)^T = z^T Q^T
        coef = _solve_upper(tinv, tail @ vt.T)                     # (T V^T z)^T, t x k
        tail -= np.matmul(coef, vt, out=workspace.array("back_vw", tail.shape, z.dtype))
    if copied:
        z[...] = zt.T


def _block(h, tau, s, e):
    """V^T of reflectors s..e-1 (C order, k x (n-s-1): row c holds reflector s+c's entries
    s+1.., zero before its unit one) and T^-1 of their compact WY form (C order). h is in
    Fortran order, so each row is a contiguous copy. A reflector with tau 0 (the identity)
    gets a zero row and a unit diagonal in T^-1."""
    k = e - s
    vt = workspace.array("back_v", (k, h.shape[0] - s - 1), h.dtype)
    np.copyto(vt, h.T[s:e, s + 1:])
    np.copyto(vt[:, :k], 0.0, where=_lower(k))
    np.fill_diagonal(vt, 1.0)
    scale = tau[s:e].copy()
    identity = scale == 0.0
    if identity.any():
        vt[identity] = 0.0
        scale[identity] = 1.0
    tinv = np.triu(vt @ vt.T, 1)
    tinv[np.diag_indices(k)] = 1.0 / scale
    return vt, tinv


@functools.lru_cache(maxsize=4)
def _lower(k):
    """Mask of a k x k matrix's diagonal and the part below it."""
    return np.tril(np.ones((k, k), dtype=bool))


def _solve_upper(u, b):
    """X = B U^-T for the C-ordered upper triangular U (k x k) and B (t x k), in B's storage:
    read in Fortran order, U's storage is U^T and B's is B^T, so LAPACK's trtrs solves
    (U^T)^T X^T = B^T there (one call: numpy's solve cost 0.1 ms of overhead a block)."""
    k, t = u.shape[0], b.shape[0]
    lp = _binding()
    lp.call(_name("trtrs", b.dtype), _char("L"), _char("T"), _char("N"), lp.int(k), lp.int(t),
            _ptr(u), lp.int(k), _ptr(b), lp.int(k), chars=3)
    return b
