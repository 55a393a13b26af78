"""Gram accumulators and the symmetric eigensolver of the Gram passes (rank
spectra, centred Grams), called straight from the OpenBLAS numpy already loaded.

numpy has no syrk that adds into an existing matrix (`G += X.T @ X` costs a
d x d temporary and a pass over it), and its eigvalsh copies the matrix (a
second d x d) and reduces it to tridiagonal form in one stage, half of whose
flops are memory-bound matrix-vector products. LAPACK's two-stage reduction
(dsyev_2stage: to a band with matrix-matrix products, then the band to
tridiagonal) gives the same eigenvalues about 1.4x faster here, in place.
Each direct call is checked against numpy on first use in the process;
anything unexpected falls back to numpy.
"""

from __future__ import annotations

import ctypes
from typing import Any, Callable

import numpy as np

_ROW_MAJOR, _COL_MAJOR, _UPPER, _NO_TRANS, _TRANS = 101, 102, 121, 111, 112

_FNS: dict[str, Any] = {}  # name -> function or None, resolved once per process


def _openblas() -> ctypes.CDLL | None:
    from threadpoolctl import threadpool_info

    for info in threadpool_info():
        if info.get("internal_api") == "openblas":
            return ctypes.CDLL(info["filepath"])
    return None


def _resolve(key: str, names: tuple[str, ...], restype: Any, argtypes: list[Any], works: Callable[[Any], bool]) -> Any:
    """The first of `names` in numpy's OpenBLAS, typed, once per process, if `works`
    (a check against numpy) says so; None on any trouble (the callers use numpy)."""
    if key not in _FNS:
        fn = None
        try:
            lib = _openblas()
            for name in names:
                fn = getattr(lib, name, None) if lib is not None else None
                if fn is not None:
                    fn.restype, fn.argtypes = restype, argtypes
                    break
            if fn is not None and not works(fn):
                fn = None
        except Exception:  # noqa: BLE001 - any trouble: use numpy
            fn = None
        _FNS[key] = fn
    return _FNS[key]


def _syrk_works(fn: Any) -> bool:
    x = np.random.default_rng(0).standard_normal((7, 5))
    want = np.ones((5, 5)) + 0.5 * x.T @ x
    g, g2 = np.ones((5, 5)), np.ones((5, 5))
    _call_syrk(fn, g, x, True, 0.5)
    _call_syrk(fn, g2, np.ascontiguousarray(x.T), False, 0.5)
    iu = np.triu_indices(5)
    return bool(np.allclose(g[iu], want[iu], rtol=1e-12) and np.allclose(g2[iu], want[iu], rtol=1e-12))


def blas_syrk() -> Any:
    """cblas_dsyrk (64-bit integers), or None."""
    i64, dbl, ptr = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p
    return _resolve("syrk", ("scipy_cblas_dsyrk64_", "cblas_dsyrk64_"), None,
                    [ctypes.c_int, ctypes.c_int, ctypes.c_int, i64, i64, dbl, ptr, i64, dbl, ptr, i64], _syrk_works)


def _call_syrk(fn: Any, g: np.ndarray, x: np.ndarray, trans: bool, alpha: float) -> None:
    """Upper triangle (row-major) of g += alpha x^T x (trans) or alpha x x^T; x C-contiguous."""
    d = g.shape[0]
    k = x.shape[0] if trans else x.shape[1]
    fn(_ROW_MAJOR, _UPPER, _TRANS if trans else _NO_TRANS, d, k, alpha, x.ctypes.data, x.shape[1], 1.0,
       g.ctypes.data, d)


class SyrkGram:
    """G += alpha X^T X for blocks X (exact mode); only the upper triangle is meaningful."""

    def __init__(self, d: int, side: str) -> None:
        self.d = d
        self.trans = side == "cols"  # blocks are (rows x d); else (d x cols)
        self.fn = blas_syrk()
        self.tmp = None if self.fn is not None else np.empty((d, d))

    def zeros(self) -> np.ndarray:
        return np.zeros((self.d, self.d))

    def add(self, g: np.ndarray, x: np.ndarray, alpha: float = 1.0) -> None:
        if self.fn is not None:
            _call_syrk(self.fn, g, x, self.trans, alpha)
            return
        np.matmul(x.T, x, out=self.tmp) if self.trans else np.matmul(x, x.T, out=self.tmp)
        if alpha != 1.0:
            self.tmp *= alpha
        g += self.tmp

    def close(self) -> None:
        self.tmp = None


class Sketch:
    """Y += alpha X^T (X Omega) for row blocks X (sketch mode): Y = G Omega in the end."""

    def __init__(self, n: int, k: int, rows: int, seed: int) -> None:
        self.n, self.k = n, k
        self.omega = np.random.default_rng(seed).standard_normal((n, k))
        self.xo = np.empty(rows * k)
        self.tmp = np.empty((n, k))

    def zeros(self) -> np.ndarray:
        return np.zeros((self.n, self.k))

    def add(self, y: np.ndarray, x: np.ndarray, alpha: float = 1.0) -> None:
        xo = self.xo[: x.shape[0] * self.k].reshape(x.shape[0], self.k)
        np.matmul(x, self.omega, out=xo)
        if alpha != 1.0:
            xo *= alpha
        np.matmul(x.T, xo, out=self.tmp)
        y += self.tmp

    def close(self) -> None:
        self.tmp = self.xo = None


def _eig_works(fn: Any) -> bool:
    x = np.random.default_rng(0).standard_normal((9, 6))
    g = x.T @ x
    want = np.linalg.eigvalsh(g)
    return bool(np.allclose(_call_eig(fn, np.triu(g)), want, rtol=1e-12, atol=1e-12 * want[-1]))


def lapack_eigvalsh() -> Any:
    """LAPACKE_dsyev_2stage (64-bit integers), or None."""
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    return _resolve("eig", ("scipy_LAPACKE_dsyev_2stage64_", "LAPACKE_dsyev_2stage64_"), i64,
                    [ctypes.c_int, ctypes.c_char, ctypes.c_char, i64, ptr, i64, ptr], _eig_works)


def _call_eig(fn: Any, g: np.ndarray) -> np.ndarray:
    """Eigenvalues (ascending) from g's upper triangle, row-major: the lower one of
    the column-major matrix LAPACK sees. g is overwritten."""
    d = g.shape[0]
    w = np.empty(d)
    info = fn(_COL_MAJOR, b"N", b"L", d, g.ctypes.data, d, w.ctypes.data)
    if info != 0:
        raise np.linalg.LinAlgError(f"dsyev_2stage failed (info {info})")
    return w


def eigvalsh(g: np.ndarray) -> np.ndarray:
    """Eigenvalues (ascending) of the symmetric matrix whose upper triangle is
    g's (C-contiguous float64); g is overwritten when LAPACK is called directly."""
    fn = lapack_eigvalsh()
    return _call_eig(fn, g) if fn is not None else np.linalg.eigvalsh(g, UPLO="U")


def eig_copies() -> int:
    """d x d matrices eigvalsh allocates beside g (numpy's copies it)."""
    return 0 if lapack_eigvalsh() is not None else 1
