"""Row-block access to tensor bytes, with page release.

Two ways, one interface. Worker processes memory-map each shard once: a block
of rows is a zero-copy numpy view of the mapping, and once decoded its pages
are dropped from the process (MADV_DONTNEED), so resident memory stays at
about one block whatever the model size; the pages stay in the page cache.
The main process never maps: it reads blocks with `preadv` into reused
buffers (a copy, ~15% more CPU per byte). A shard truncated under a mapping
kills the process touching it with SIGBUS, which no Python code can catch:
a worker's death is reported by the pool, and the shard's stamp names the
file that changed; in the main process that would be the end of layerdiff,
so there a truncated shard is a short read instead, a one-line error.

Every shard is checked against the stamp its header was read with when it is
opened, and whenever a read comes up short.

Under a memory cap smaller than what a run reads (a cgroup limit), the page
cache is charged to the cap: readahead and consumed pages fill it, and the
kernel reclaims them against the scan's own memory, 2-3x slower than uncapped.
There every process reads (workers too) and drops each block's file pages
once consumed (`POSIX_FADV_DONTNEED`); and where the kernel's readahead
windows, ahead of every tensor read in turn, would not fit beside the run,
readahead is off (`POSIX_FADV_RANDOM`) and passes ask for the blocks they read
next (`prefetch`): see `dropping` and engine/budget.py.
"""

from __future__ import annotations

import errno
import mmap
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from ..engine import fused
from ..engine.budget import Paging
from ..errors import FormatError
from .files import changed, open_regular, os_problem
from .index import TensorInfo, grid

# Blocks are views of the stored bytes as unsigned integers of the dtype's size;
# the fused kernel decodes them (no ml_dtypes: importing it costs ~0.7 s).
RAW_DTYPES: dict[str, np.dtype] = {
    "F16": np.dtype("<u2"),
    "BF16": np.dtype("<u2"),
    "F32": np.dtype("<u4"),
    "F64": np.dtype("<u8"),
    "F8_E4M3": np.dtype("u1"),
    "F8_E5M2": np.dtype("u1"),
}

_PAGE = mmap.PAGESIZE
MADV_POPULATE_READ = 22  # Linux 5.14+; Python's mmap module does not name it yet


# The page cache may map a file in 2 MiB folios: releasing only the 4 KiB pages
# of a block leaves the folios at its edges mapped, and those pile up across a
# model. Released neighbours are mapped again from the page cache if needed.
_RELEASE = 2 << 20
# Read buffers kept for reuse (a block and a scale grid are alive at once).
_KEEP = 4
# Largest single read: Linux transfers at most 0x7ffff000 bytes per call.
_CHUNK = 1 << 30
# Set by `dropping` for a run, inherited by forked workers.
_PAGING = Paging()


@contextmanager
def dropping(paging: Paging) -> Iterator[None]:
    """Readers made inside treat the page cache as `paging` says (see above)."""
    global _PAGING
    old, _PAGING = _PAGING, paging
    try:
        yield
    finally:
        _PAGING = old


def _pages(lo: int, hi: int, size: int, unit: int = _PAGE) -> tuple[int, int]:
    """Bytes [lo, hi) of a mapping of `size` bytes, widened to whole `unit`s."""
    return lo // unit * unit, min(size, -(-hi // unit) * unit)


_HUGE = 2 << 20


def _allocate(nbytes: int) -> np.ndarray:
    """A byte buffer; from 1 MiB on, in 2 MiB-aligned transparent huge pages where
    the kernel offers them: preadv copies into one twice as fast (12 vs 5.5 GB/s)."""
    if nbytes < _HUGE // 2:
        return np.empty(nbytes, np.uint8)
    size = -(-nbytes // _HUGE) * _HUGE
    region = mmap.mmap(-1, size + _HUGE)  # room to align; untouched pages cost nothing
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):  # no THP here: ordinary pages
        pass
    offset = (-np.frombuffer(region, np.uint8, count=1).ctypes.data) % _HUGE
    # Made straight from the region, so that views of it have it as their base (see _buffer).
    return np.frombuffer(region, np.uint8, count=size, offset=offset)


class Reader:
    """Opens shards on first use; counts the bytes it hands out.

    `mapped`: memory-map the shards (worker processes only, see above), unless
    pages are being dropped."""

    def __init__(self, mapped: bool = False) -> None:
        self.paging = _PAGING
        self.drop = self.paging.drop
        self.mapped = mapped and not self.drop
        self._fds: dict[Path, int] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._bufs: list[np.ndarray] = []
        self.bytes_mapped = 0  # bytes handed out as blocks, mapped or read
        self._populate = True

    def _fd(self, t: TensorInfo) -> int:
        fd = self._fds.get(t.file)
        if fd is None:
            fd = open_regular(t.file, "safetensors file")
            if t.stamp is not None:
                err = changed(t.file, t.stamp, os.fstat(fd))
                if err is not None:
                    os.close(fd)
                    raise err
            self._fds[t.file] = fd
            if not self.paging.readahead:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return fd

    def _map(self, t: TensorInfo) -> mmap.mmap:
        m = self._maps.get(t.file)
        if m is None:
            fd = self._fd(t)
            try:
                m = self._maps[t.file] = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):  # ValueError: the file is empty now
                raise self._changed(t, "cannot be mapped") from None
        return m

    def _changed(self, t: TensorInfo, what: str) -> FormatError:
        """The error for a failed read: the shard's change if it changed, else `what`."""
        try:
            err = changed(t.file, t.stamp, os.fstat(self._fds[t.file])) if t.stamp is not None else None
        except OSError:
            err = None
        return err or FormatError(t.file, what)

    def rows(self, t: TensorInfo, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of `t` as a (rows, cols) array of raw bytes (see RAW_DTYPES), viewing
        the mapping or a reused buffer: valid until `release`, or the next `rows` call once dropped."""
        _, cols = grid(t.shape)
        dtype = RAW_DTYPES[t.dtype]
        start = t.start + r0 * cols * dtype.itemsize
        count = (r1 - r0) * cols
        nbytes = count * dtype.itemsize
        self.bytes_mapped += nbytes
        if not self.mapped:
            out = self._buffer(nbytes)[:nbytes]
            self._read(t, memoryview(out), start)
            return out.view(dtype).reshape(r1 - r0, cols)
        m = self._map(t)
        if start + nbytes > len(m):  # mapped after it shrank
            raise self._changed(t, f"ends inside tensor {t.name!r}")
        if self._populate:
            # One syscall maps the block's pages, instead of a fault per 64 KB.
            lo, hi = _pages(start, start + nbytes, len(m))
            try:
                m.madvise(MADV_POPULATE_READ, lo, hi - lo)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EFAULT: pages past the end of the file, it shrank
                    raise self._changed(t, os_problem(e, "safetensors file")) from None
                self._populate = False  # kernels before 5.14
        buf = np.frombuffer(m, dtype=dtype, count=count, offset=start)
        return buf.reshape(r1 - r0, cols)

    def prefetch(self, t: TensorInfo, r0: int, r1: int) -> None:
        """Have the kernel start reading rows [r0, r1) of `t` (`POSIX_FADV_WILLNEED`),
        when its own readahead is off for this run; otherwise it needs no telling."""
        if self.paging.readahead:
            return
        _, cols = grid(t.shape)
        itemsize = RAW_DTYPES[t.dtype].itemsize
        os.posix_fadvise(self._fd(t), t.start + r0 * cols * itemsize, (r1 - r0) * cols * itemsize,
                         os.POSIX_FADV_WILLNEED)

    def release(self, t: TensorInfo, r0: int, r1: int) -> None:
        """Drop the pages of rows [r0, r1) from this process's resident set (mapped),
        or from the page cache (when dropping)."""
        if not (self.mapped or self.drop):
            return
        _, cols = grid(t.shape)
        itemsize = RAW_DTYPES[t.dtype].itemsize
        if self.drop:
            # The kernel drops only the folios wholly inside the range: start it at the
            # folio boundary before the block (the bytes before it were read already, or
            # cost a re-read); the block's last folio goes with the next block.
            lo = (t.start + r0 * cols * itemsize) // _RELEASE * _RELEASE
            hi = t.start + r1 * cols * itemsize
            os.posix_fadvise(self._fd(t), lo, hi - lo, os.POSIX_FADV_DONTNEED)
            return
        m = self._map(t)
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

    def _buffer(self, nbytes: int) -> np.ndarray:
        """A byte buffer of at least `nbytes` that no array handed out still views."""
        for i in range(len(self._bufs)):
            # The list's reference and getrefcount's argument: 2; a live view adds one.
            # (Not `for b in`: the loop variable, and enumerate's cached tuple, count too.)
            if sys.getrefcount(self._bufs[i]) <= 2:
                if self._bufs[i].size < nbytes:
                    self._bufs[i] = _allocate(nbytes)
                return self._bufs[i]
        b = _allocate(nbytes)
        if len(self._bufs) < _KEEP:
            self._bufs.append(b)
        return b

    def _read(self, t: TensorInfo, buf: memoryview, offset: int) -> None:
        """Fill `buf` from `offset` of t's shard; a short read is a FormatError naming it."""
        fd = self._fd(t)
        done = 0
        try:
            while done < len(buf):
                n = os.preadv(fd, [buf[done : done + _CHUNK]], offset + done)
                if n <= 0:
                    break
                done += n
        except OSError as e:
            raise self._changed(t, os_problem(e, "safetensors file")) from None
        if done < len(buf):
            raise self._changed(t, f"ends at byte {offset + done}, inside tensor {t.name!r}")

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a view is still alive (e.g. after Ctrl-C): the GC unmaps it
                pass
        self._maps.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._bufs.clear()


class Block:
    """A mapped row block of one tensor and the scale rows that dequantise it."""

    def __init__(self, reader: Reader, t: TensorInfo, r0: int, r1: int, scale: TensorInfo | None,
                 scale_block: tuple[int, int] | None) -> None:
        self.r0 = r0
        self.code = t.dtype  # the safetensors dtype of `raw`
        self.raw: np.ndarray | None = reader.rows(t, r0, r1)
        self.scale_block = scale_block or (1, 1)
        self.grid, self.scale_r0 = (scale_rows(reader, scale, self.scale_block, r0, r1) if scale is not None
                                    else (None, 0))

    def decode(self, spans: list[tuple[int, int]], c0: int, c1: int, out: np.ndarray) -> None:
        """Rows `spans` (absolute), columns [c0, c1) as values (dequantised) into the flat `out`."""
        assert self.raw is not None, "decode after release"
        decode(self.raw, self.code, self.r0, spans, c0, c1, out, self.grid, self.scale_block, self.scale_r0)


def decode(
    block: np.ndarray,
    code: str,
    r0: int,
    spans: list[tuple[int, int]],
    c0: int,
    c1: int,
    out: np.ndarray,
    scale: np.ndarray | None = None,
    scale_block: tuple[int, int] = (1, 1),
    scale_r0: int = 0,
) -> None:
    """Decode the rows `spans` (absolute row numbers; `block`, of safetensors
    dtype `code`, starts at row r0), columns [c0, c1), of a raw block into the
    flat float32/float64 buffer `out`. Values land in row-major order; the rest
    of `out` is untouched.

    With `scale` (rows of a scale grid from block row `scale_r0` on, see
    `scale_rows`), each value is multiplied by the scale of its
    `scale_block`-sized block: the dequantised value."""
    k = 0
    width = c1 - c0
    for a, b in spans:
        dst = out[k : k + (b - a) * width].reshape(b - a, width)
        fused.decode(block[a - r0 : b - r0, c0:c1], code, dst)
        if scale is not None:
            dequantise(dst, a, c0, c1, scale, scale_block, scale_r0)
        k += (b - a) * width


def scale_rows(reader: Reader, scale: TensorInfo, scale_block: tuple[int, int], r0: int, r1: int) -> tuple[np.ndarray, int]:
    """The rows of a scale grid covering weight rows [r0, r1), as float32, and
    the block row the first of them belongs to."""
    br = scale_block[0]
    a, b = r0 // br, (r1 - 1) // br + 1
    raw = reader.rows(scale, a, b)
    out = np.empty(raw.shape, np.float32)
    fused.decode(raw, scale.dtype, out)
    del raw
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
