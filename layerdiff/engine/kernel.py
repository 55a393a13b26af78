"""Pair sums <a,b>, |b|^2 over decoded blocks, exact enough for 1e-6 cosines.

Products of bf16/f16/f8 values are exact in float32; the error of a float32
dot comes from summing many terms in one accumulator. So each block is cut
into short rows of ROW elements, dotted in float32 by a batched matmul (BLAS,
vectorised), and the row results are summed in float64. This keeps the
decode-and-dot cost at about one memory pass while matching a float64
reference to ~1e-10 on cosines.
"""

from __future__ import annotations

import numpy as np

ROW = 512


def padded(n: int) -> int:
    """Buffer length for n values: a whole number of ROW-element rows."""
    return -(-n // ROW) * ROW


def rowdot(x: np.ndarray, y: np.ndarray) -> float:
    """sum(x*y) for flat buffers of equal, ROW-multiple length (tails zeroed)."""
    if x.dtype == np.float64:
        return float(np.dot(x, y))
    return float(np.matmul(x.reshape(-1, 1, ROW), y.reshape(-1, ROW, 1)).sum(dtype=np.float64))
