"""Fused decode + sums over raw tensor bytes: the compiled kernel, or numpy.

Every pass reduces blocks of raw tensor bytes to a few sums. Decoding to
float32 temporaries first costs more than the arithmetic (numpy: ~2.5-5 GB/s
per core); the C extension `_ckernel` decodes on the fly in registers and is
memory-bound. Both implement the same API; `KERNEL` says which one is in use,
decided at import (`LAYERDIFF_KERNEL=numpy` forces numpy, `=c` requires C).

Inputs are raw 2-D views (rows x width; rows contiguous, any row stride: a
row band or a column range of a row-major matrix; 1-D is one row) of any
dtype with the itemsize of their safetensors dtype code ("BF16", "F16",
"F32", "F64", "F8_E4M3", "F8_E5M2"). The two inputs of a pair may differ in
dtype.

Accuracy: cosines within ~4e-9 of float64 over the decoded values (bf16 and
fp8 pair/norm sums in C), else as float64. The C kernel sums bf16/fp8
products (exact in float32) in float32 lanes of at most 4 terms, then
without rounding into compensated pairs (longer float32 sums of squares are
biased low: see _ckernel.c); F16, F32, F64, mixed dtypes and all of
diff_sums go into float64 lanes. The numpy kernel decodes 64K-value chunks
to float64 and uses float64 dots. max |b-a| and the equality count are exact.

Non-finite values: inf/NaN propagate into the sums, as in float64 (callers
report non-finite sums). In the C kernel a bf16 square beyond float32 (|x| >
1.8e19) overflows its float32 lane to inf; numpy sums it in float64. max
|b-a| is NaN when a difference is NaN (inf - inf, or a NaN input), like
np.max. Equality is IEEE equality: NaN != NaN, -0 == +0.
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from types import ModuleType
from typing import Any, Protocol

import numpy as np

CODES: tuple[str, ...] = ("BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2")
ITEMSIZE: dict[str, int] = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}

PairSums = tuple[float, float, float]
NextSums = tuple[float, float]
DiffSums = tuple[float, float, float, float, int, float]


class Kernel(Protocol):
    name: str

    def pair_sums(self, a: np.ndarray, a_code: str, b: np.ndarray, b_code: str) -> PairSums: ...
    def next_sums(self, a: np.ndarray, a_code: str, b: np.ndarray, b_code: str) -> NextSums: ...
    def norm_sum(self, a: np.ndarray, a_code: str) -> float: ...
    def diff_sums(self, a: np.ndarray, a_code: str, b: np.ndarray, b_code: str) -> DiffSums: ...
    def decode(self, a: np.ndarray, a_code: str, out: np.ndarray) -> None: ...
    def isa(self) -> str: ...


# ---- the numpy kernel ------------------------------------------------------

CHUNK = 1 << 16  # elements per step: the float64 chunks of a pair stay in a 2 MB L2
CACHE = 1 << 21  # pair_sums decodes blocks up to this many values whole (16 MB of float64)


def _check(a: np.ndarray, code: str, what: str) -> np.ndarray:
    """`a` as a 2-D view of unsigned integers of the code's size."""
    if code not in ITEMSIZE:
        raise ValueError(f"unsupported dtype code {code!r} (expected one of {', '.join(CODES)})")
    if a.dtype.itemsize != ITEMSIZE[code]:
        raise ValueError(f"{what}: items of {a.dtype.itemsize} bytes, but {code} values have {ITEMSIZE[code]}")
    if a.ndim == 1:
        a = a.reshape(1, -1)
    elif a.ndim != 2:
        raise ValueError(f"{what}: expected a 1-D or 2-D array, got {a.ndim} dimensions")
    if a.shape[1] > 1 and a.strides[1] != a.dtype.itemsize:
        raise ValueError(f"{what}: the values of a row must be contiguous")
    return a.view(_UINT[a.dtype.itemsize])


def _f8_table(code: str, dtype: type) -> np.ndarray:
    """The 256 values of an fp8 format, from its definition (no ml_dtypes)."""
    u = np.arange(256, dtype=np.uint32)
    if code == "F8_E5M2":  # the top byte of an f16
        return (u << 8).astype(np.uint16).view(np.float16).astype(dtype)
    # F8_E4M3 (the "fn" variant): bias 7, subnormals at exponent 0, no inf, S.1111.111 is NaN
    e, m = (u >> 3) & 0xF, (u & 7).astype(np.float64)
    with np.errstate(invalid="ignore"):
        v = np.where(e == 0, m / 8 * 2.0**-6, (1 + m / 8) * 2.0 ** (e.astype(np.float64) - 7))
    v[(u & 0x7F) == 0x7F] = np.nan
    return np.where(u & 0x80, -v, v).astype(dtype)


class _Scratch(threading.local):
    """Per-thread chunk buffers, reused: fresh 512 KB buffers cost page faults."""

    def __init__(self) -> None:
        self.bufs: dict[tuple[str, int], np.ndarray] = {}
        # pair_sums' last b: (weakref to it, code, its float64 values, <b,b>, buffer key)
        self.last: tuple[Any, ...] | None = None

    def get(self, key: str, dtype: type, n: int = CHUNK) -> np.ndarray:
        """A buffer of at least n values (CHUNK at least), grown as needed."""
        buf = self.bufs.get((key, np.dtype(dtype).itemsize))
        if buf is None or buf.size < n:
            buf = self.bufs[(key, np.dtype(dtype).itemsize)] = np.empty(max(n, CHUNK), dtype)
        return buf


class NumpyKernel:
    """The fallback: decode 64K-value chunks into float64 buffers, then BLAS dots."""

    name = "numpy"

    def __init__(self) -> None:
        self._scratch = _Scratch()
        self._tables: dict[tuple[str, type], np.ndarray] = {}

    def isa(self) -> str:
        return "numpy"

    def _table(self, code: str, dtype: type) -> np.ndarray:
        t = self._tables.get((code, dtype))
        if t is None:
            t = self._tables[(code, dtype)] = _f8_table(code, dtype)
        return t

    def _decode_into(self, raw: np.ndarray, code: str, out: np.ndarray) -> None:
        """A raw (uint) 2-D chunk into a float32/float64 array of its shape."""
        if code == "BF16" and out.dtype == np.float32:
            np.left_shift(raw, 16, out=out.view(np.uint32), dtype=np.uint32)
        elif code == "BF16":
            f = self._scratch.get("bf16", np.float32, raw.size)[: raw.size].reshape(raw.shape)
            np.left_shift(raw, 16, out=f.view(np.uint32), dtype=np.uint32)
            np.copyto(out, f)
        elif code == "F16":
            np.copyto(out, raw.view(np.float16))
        elif code in ("F32", "F64"):
            np.copyto(out, raw.view(np.float32 if code == "F32" else np.float64), casting="unsafe")
        else:
            np.take(self._table(code, out.dtype.type), raw, out=out)

    def _chunks(self, rows: int, cols: int):
        if cols >= CHUNK:
            for r in range(rows):
                for c in range(0, cols, CHUNK):
                    yield r, r + 1, c, min(cols, c + CHUNK)
        elif cols:
            k = CHUNK // cols
            for r in range(0, rows, k):
                yield r, min(rows, r + k), 0, cols

    def _decoded(self, raw: np.ndarray, code: str, key: str) -> np.ndarray:
        """A raw 2-D chunk as flat float64 values."""
        if code == "F64":
            return raw.view(np.float64).reshape(-1)
        buf = self._scratch.get(key, np.float64)[: raw.size]
        self._decode_into(raw, code, buf.reshape(raw.shape))
        return buf

    def _sums(self, op: str, a: np.ndarray, a_code: str, b: np.ndarray, b_code: str) -> list[float]:
        a = _check(a, a_code, "a")
        b = _check(b, b_code, "b")
        if a.shape != b.shape and a.size + b.size:
            raise ValueError(f"shapes differ: {a.shape} and {b.shape}")
        # float64 throughout: a float32 dot per 64K chunk moved cosines by 2e-8
        # (float32 sums of squares are biased low, see _ckernel.c).
        aa = bb = ab = dd = mx = 0.0
        equal = 0
        with np.errstate(all="ignore"):
            for r0, r1, c0, c1 in self._chunks(*a.shape):
                x = self._decoded(a[r0:r1, c0:c1], a_code, "x")
                aa += float(np.dot(x, x))
                if op == "norm":
                    continue
                y = self._decoded(b[r0:r1, c0:c1], b_code, "y")
                bb += float(np.dot(y, y))
                ab += float(np.dot(x, y))
                if op == "diff":
                    d = self._scratch.get("d", np.float64)[: x.size]
                    np.subtract(y, x, out=d)
                    dd += float(np.dot(d, d))
                    equal += int(np.count_nonzero(x == y))
                    mx = max(mx, float(np.abs(d, out=d).max()))  # a NaN is restored from dd below
        if op == "diff" and dd != dd:  # a NaN difference (see the module docstring)
            mx = float("nan")
        return [aa, bb, ab, dd, equal, mx]

    def pair_sums(self, a: np.ndarray, a_code: str, b: np.ndarray, b_code: str) -> PairSums:
        # A chain of calls (L-1, L), (L, L+1), ...: the previous call's b comes
        # back as a. Blocks up to CACHE values are decoded whole, and b's float64
        # values and norm kept for that next call (a weak reference: no buffer
        # is kept alive): each layer is decoded once, as before the fused kernel.
        if a.size > CACHE or b.size > CACHE or a.shape != b.shape:
            aa, bb, ab, *_ = self._sums("pair", a, a_code, b, b_code)
            return aa, bb, ab
        last = self._scratch.last
        if last is not None and last[0]() is a and last[1] == a_code:
            x, aa, key = last[2], last[3], "wy" if last[4] == "wx" else "wx"  # b goes to the other buffer
        else:
            x = self._whole(a, a_code, "wx")
            aa, key = float(np.dot(x, x)), "wy"
        y = self._whole(b, b_code, key)
        bb = float(np.dot(y, y))
        ab = float(np.dot(x, y))
        self._scratch.last = (weakref.ref(b), b_code, y, bb, key)
        return aa, bb, ab

    def next_sums(self, a: np.ndarray, a_code: str, b: np.ndarray, b_code: str) -> NextSums:
        # <a,a> comes from the chain's cache, or costs a dot: no loop of its own.
        _, bb, ab = self.pair_sums(a, a_code, b, b_code)
        return bb, ab

    def _whole(self, raw: np.ndarray, code: str, key: str) -> np.ndarray:
        """All of a (small) raw block as flat float64 values, in a reused buffer."""
        r = _check(raw, code, "a")
        if code == "F64":
            return r.view(np.float64).reshape(-1)
        out = self._scratch.get(key, np.float64, r.size)[: r.size]
        with np.errstate(all="ignore"):
            self._decode_into(r, code, out.reshape(r.shape))
        return out

    def norm_sum(self, a: np.ndarray, a_code: str) -> float:
        if a.size > CACHE:
            return self._sums("norm", a, a_code, a, a_code)[0]
        x = self._whole(a, a_code, "wn")  # the same sum as pair_sums' <a,a> (not its buffers)
        return float(np.dot(x, x))

    def diff_sums(self, a: np.ndarray, a_code: str, b: np.ndarray, b_code: str) -> DiffSums:
        aa, bb, ab, dd, equal, mx = self._sums("diff", a, a_code, b, b_code)
        return aa, bb, ab, dd, int(equal), mx

    def decode(self, a: np.ndarray, a_code: str, out: np.ndarray) -> None:
        raw = _check(a, a_code, "a")
        o = _check_out(out, raw.shape)
        with np.errstate(invalid="ignore"):  # NaNs are values here
            for r0, r1, c0, c1 in self._chunks(*raw.shape):
                self._decode_into(raw[r0:r1, c0:c1], a_code, o[r0:r1, c0:c1])


def _check_out(out: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if out.dtype not in (np.float32, np.float64):
        raise ValueError("out must be float32 or float64")
    o = out.reshape(1, -1) if out.ndim == 1 else out
    if o.ndim != 2:
        raise ValueError("out must be 1-D or 2-D")
    if o.shape != shape and o.size + shape[0] * shape[1]:
        raise ValueError(f"out has shape {o.shape}, a has {shape}")
    if o.shape[1] > 1 and o.strides[1] != o.dtype.itemsize:
        raise ValueError("out: the values of a row must be contiguous")
    return o


# ---- the compiled kernel ---------------------------------------------------


def _raw(a: np.ndarray) -> np.ndarray:
    # ml_dtypes arrays (bfloat16, float8) do not export a buffer: view their bytes.
    return a if a.dtype.isbuiltin == 1 else a.view(_UINT[a.dtype.itemsize])


class CKernel:
    """The extension, behind the same API; the GIL is released in its loops."""

    name = "c"

    def __init__(self, ext: ModuleType) -> None:
        self._ext = ext

    def isa(self) -> str:
        """The instruction-set variant in use: "avx512", "avx2" or "default"."""
        return self._ext.isa()

    def pair_sums(self, a: np.ndarray, a_code: str, b: np.ndarray, b_code: str) -> PairSums:
        return self._ext.pair_sums(_raw(a), a_code, _raw(b), b_code)

    def next_sums(self, a: np.ndarray, a_code: str, b: np.ndarray, b_code: str) -> NextSums:
        return self._ext.next_sums(_raw(a), a_code, _raw(b), b_code)

    def norm_sum(self, a: np.ndarray, a_code: str) -> float:
        return self._ext.norm_sum(_raw(a), a_code)

    def diff_sums(self, a: np.ndarray, a_code: str, b: np.ndarray, b_code: str) -> DiffSums:
        return self._ext.diff_sums(_raw(a), a_code, _raw(b), b_code)

    def decode(self, a: np.ndarray, a_code: str, out: np.ndarray) -> None:
        self._ext.decode(_raw(a), a_code, out)


def _load_c() -> tuple[CKernel | None, str]:
    try:
        from . import _ckernel
    except ImportError as e:
        return None, str(e) or type(e).__name__
    return CKernel(_ckernel), ""


def kernel(name: str) -> Kernel:
    """A kernel by name ("c" or "numpy"), whatever KERNEL is (tests, benchmarks).
    Raises ImportError for "c" when the extension is not built."""
    if name == "numpy":
        return _NUMPY
    if name == "c":
        k, why = _load_c()
        if k is None:
            raise ImportError(f"the compiled kernel is not available: {why}")
        return k
    raise ValueError(f"no kernel named {name!r} (expected 'c' or 'numpy')")


def _choose() -> Kernel:
    want = os.environ.get("LAYERDIFF_KERNEL", "").strip().lower()
    if want == "numpy":
        return _NUMPY
    if want not in ("", "c"):
        print(f"layerdiff: note: LAYERDIFF_KERNEL={want} is neither c nor numpy; ignored", file=sys.stderr)
    k, why = _load_c()
    if k is not None:
        return k
    if want == "c":
        raise ImportError(f"LAYERDIFF_KERNEL=c, but the compiled kernel is not available: {why}")
    print(f"layerdiff: note: compiled kernel not available ({why}); using the numpy kernel", file=sys.stderr)
    return _NUMPY


_NUMPY = NumpyKernel()
_KERNEL = _choose()
KERNEL: str = _KERNEL.name

pair_sums = _KERNEL.pair_sums
"""(a, a_code, b, b_code) -> (<a,a>, <b,b>, <a,b>), summed in float64."""
next_sums = _KERNEL.next_sums
"""(a, a_code, b, b_code) -> (<b,b>, <a,b>): pair_sums without <a,a>, which a chain
of layers has from the previous pair (in C, a third fewer products to sum)."""
norm_sum = _KERNEL.norm_sum
"""(a, a_code) -> <a,a>."""
diff_sums = _KERNEL.diff_sums
"""(a, a_code, b, b_code) -> (<a,a>, <b,b>, <a,b>, |b-a|^2 from the differences,
number of equal positions, max |b-a|)."""
decode = _KERNEL.decode
"""(a, a_code, out): the decoded values into a float32/float64 `out` of a's shape."""
isa = _KERNEL.isa
"""The variant in use ("avx512", "avx2", "default"), or "numpy"."""
