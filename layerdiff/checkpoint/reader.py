"""Memory-mapped, row-block access to tensor bytes, with page release.

Each shard is mapped once per process. A block of rows is a zero-copy numpy
view of the mapping; once it has been decoded, its pages are dropped from this
process (MADV_DONTNEED), so resident memory stays at about one block whatever
the model size. The pages stay in the page cache: nothing is read twice.
"""

from __future__ import annotations

import mmap
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from .index import TensorInfo, grid

NUMPY_DTYPES: dict[str, np.dtype] = {
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}

_PAGE = mmap.PAGESIZE
MADV_POPULATE_READ = 22  # Linux 5.14+; Python's mmap module does not name it yet


# The page cache may map a file in 2 MiB folios: releasing only the 4 KiB pages
# of a block leaves the folios at its edges mapped, and those pile up across a
# model. Released neighbours are mapped again from the page cache if needed.
_RELEASE = 2 << 20


def _pages(lo: int, hi: int, size: int, unit: int = _PAGE) -> tuple[int, int]:
    """Bytes [lo, hi) of a mapping of `size` bytes, widened to whole `unit`s."""
    return lo // unit * unit, min(size, -(-hi // unit) * unit)


class Reader:
    """Opens shards on first use; counts the bytes it hands out."""

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}
        self.bytes_mapped = 0
        self._populate = True

    def _map(self, path: Path) -> mmap.mmap:
        m = self._maps.get(path)
        if m is None:
            with open(path, "rb") as f:
                m = self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return m

    def rows(self, t: TensorInfo, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of `t` as a (rows, cols) array viewing the mapping."""
        _, cols = grid(t.shape)
        dtype = NUMPY_DTYPES[t.dtype]
        start = t.start + r0 * cols * dtype.itemsize
        count = (r1 - r0) * cols
        self.bytes_mapped += count * dtype.itemsize
        m = self._map(t.file)
        if self._populate:
            # One syscall maps the block's pages, instead of a fault per 64 KB.
            lo, hi = _pages(start, start + count * dtype.itemsize, len(m))
            try:
                m.madvise(MADV_POPULATE_READ, lo, hi - lo)
            except OSError:  # kernels before 5.14
                self._populate = False
        buf = np.frombuffer(m, dtype=dtype, count=count, offset=start)
        return buf.reshape(r1 - r0, cols)

    def release(self, t: TensorInfo, r0: int, r1: int) -> None:
        """Drop the pages of rows [r0, r1) from this process's resident set."""
        _, cols = grid(t.shape)
        itemsize = NUMPY_DTYPES[t.dtype].itemsize
        m = self._map(t.file)
        lo, hi = _pages(t.start + r0 * cols * itemsize, t.start + r1 * cols * itemsize, len(m), _RELEASE)
        if hi > lo:
            m.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    @contextmanager
    def block(self, t: TensorInfo, r0: int, r1: int, scale: TensorInfo | None = None,
              scale_block: tuple[int, int] | None = None) -> Iterator[Block]:
        """Rows [r0, r1) of `t` to decode parts of, released afterwards: the one
        decode / dequantise / page-release path every pass uses."""
        blk = Block(self, t, r0, r1, scale, scale_block)
        try:
            yield blk
        finally:
            blk.raw = None
            self.release(t, r0, r1)

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a view is still alive (e.g. after Ctrl-C): the GC unmaps it
                pass
        self._maps.clear()


class Block:
    """A mapped row block of one tensor and the scale rows that dequantise it."""

    def __init__(self, reader: Reader, t: TensorInfo, r0: int, r1: int, scale: TensorInfo | None,
                 scale_block: tuple[int, int] | None) -> None:
        self.r0 = r0
        self.raw: np.ndarray | None = reader.rows(t, r0, r1)
        self.scale_block = scale_block or (1, 1)
        self.grid, self.scale_r0 = (scale_rows(reader, scale, self.scale_block, r0, r1) if scale is not None
                                    else (None, 0))

    def decode(self, spans: list[tuple[int, int]], c0: int, c1: int, out: np.ndarray) -> None:
        """Rows `spans` (absolute), columns [c0, c1) as values (dequantised) into the flat `out`."""
        assert self.raw is not None, "decode after release"
        decode(self.raw, self.r0, spans, c0, c1, out, self.grid, self.scale_block, self.scale_r0)


def decode(
    block: np.ndarray,
    r0: int,
    spans: list[tuple[int, int]],
    c0: int,
    c1: int,
    out: np.ndarray,
    scale: np.ndarray | None = None,
    scale_block: tuple[int, int] = (1, 1),
    scale_r0: int = 0,
) -> None:
    """Copy the rows `spans` (absolute row numbers; `block` starts at row r0),
    columns [c0, c1), of a raw block into the flat buffer `out`, converting to
    out's dtype. Values land in row-major order; the rest of `out` is untouched.

    With `scale` (rows of a scale grid from block row `scale_r0` on, see
    `scale_rows`), each value is multiplied by the scale of its
    `scale_block`-sized block: the dequantised value."""
    k = 0
    width = c1 - c0
    for a, b in spans:
        dst = out[k : k + (b - a) * width].reshape(b - a, width)
        np.copyto(dst, block[a - r0 : b - r0, c0:c1], casting="unsafe")
        if scale is not None:
            dequantise(dst, a, c0, c1, scale, scale_block, scale_r0)
        k += (b - a) * width


def scale_rows(reader: Reader, scale: TensorInfo, scale_block: tuple[int, int], r0: int, r1: int) -> tuple[np.ndarray, int]:
    """The rows of a scale grid covering weight rows [r0, r1), as float32, and
    the block row the first of them belongs to."""
    br = scale_block[0]
    a, b = r0 // br, (r1 - 1) // br + 1
    out = reader.rows(scale, a, b).astype(np.float32)
    reader.release(scale, a, b)
    return out, a


def dequantise(
    dst: np.ndarray, a: int, c0: int, c1: int, scale: np.ndarray, scale_block: tuple[int, int], scale_r0: int
) -> None:
    """Multiply `dst` (weight rows a.., columns [c0, c1)) in place by the scale of
    each value's block. Works one band of rows sharing a scale row at a time,
    with at most one row of expanded scales alive."""
    br, bc = scale_block
    n = dst.shape[0]
    lo, hi = c0 // bc, (c1 - 1) // bc  # block columns touched
    if br == 1 and lo == hi:  # per-row (per-channel) scales: one vectorised multiply
        dst *= scale[a - scale_r0 : a - scale_r0 + n, lo : lo + 1]
        return
    i = 0
    while i < n:
        blk = (a + i) // br
        j = min(n, (blk + 1) * br - a)
        srow = scale[blk - scale_r0]
        if lo == hi:
            dst[i:j] *= srow[lo]
        else:
            dst[i:j] *= np.repeat(srow[lo : hi + 1], bc)[c0 - lo * bc : c1 - lo * bc]
        i = j
