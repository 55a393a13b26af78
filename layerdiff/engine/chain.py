"""The chain pass: adjacent-layer sums |W_L|^2 and <W_L, W_L+1>, streamed.

An item walks the layers of one row block in order. The fused kernel
(`fused.next_sums`) reads the raw mapped bytes of layer L-1 and layer L and
returns |W_L|^2 and <W_L-1, W_L> in one pass, decoding in registers: no
decoded copies. Layer L-1's block stays mapped until it is paired with L, so
two raw blocks per worker are alive; every analysed byte is read from storage
once (the second look at L-1 comes from the page cache, usually the CPU's).
Dequantised (fp8 with block scales) layers are decoded and scaled into
float32 buffers first, and those go through the same kernel.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from typing import Any, Callable

import numpy as np

from ..checkpoint.reader import Block, Reader
from ..layout import grid
from . import fused, pool
from .budget import read_bytes
from .plan import Plan, Segment, clip

# Layers ahead whose blocks an item asks for while it works on one, where the
# kernel's readahead is off (under a cap, see engine/budget.py: paging): 8 GB under
# 300 MB took 8.5 s / 9.2 s / 11-14 s with 2 / 1 / 0 ahead (uncapped from the same cache: 5 s).
PREFETCH_LAYERS = 2

Totals = list[tuple[np.ndarray, np.ndarray]]  # per segment: squared norms (parts x layers), dots (parts x pairs)
Pieces = list[tuple[np.ndarray, str]]  # one part of a block: (2-D view, dtype code) per row span


def run_item(item: tuple[int, int, int]) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray, int, int, int]:
    """Sums |W_L|^2 and <W_L, W_L+1> over one row block of one segment."""
    seg: Segment = pool.STATE["payload"][item[0]]
    reader: Reader = pool.STATE["reader"]
    _, r0, r1 = item
    _, cols = grid(seg.shape)
    n_layers = len(seg.layers)
    norms = np.zeros((len(seg.parts), n_layers))
    dots = np.zeros((len(seg.parts), max(n_layers - 1, 0)))
    before = reader.bytes_mapped
    # Per part: where its values sit in the block (row spans, columns) and their count.
    shares = []
    for part in seg.parts:
        spans = clip(part.rows, r0, r1)
        c0, c1 = part.cols or (0, cols)
        shares.append((spans, c0, c1, sum(b - a for a, b in spans) * (c1 - c0)))
    _chain(seg, reader, r0, r1, shares, norms, dots)
    return item, norms, dots, reader.bytes_mapped - before, os.getpid(), read_bytes()


def _arena(dtype: type, n: int) -> np.ndarray:
    """A per-process scratch buffer, grown as needed and reused across items:
    fresh buffers per item cost a page fault per 4 KB."""
    key = f"arena-{np.dtype(dtype).name}"
    buf = pool.STATE.get(key)
    if buf is None or buf.size < n:
        buf = pool.STATE[key] = np.empty(n, dtype)
    return buf


def raw_pieces(block: Block, code: str, shares: list[tuple[Any, ...]], buf: np.ndarray | None) -> list[Pieces]:
    """Each part of a block as kernel inputs: views of the raw mapped rows, or,
    for a dequantised block, of its values decoded and scaled into `buf`."""
    out = []
    used = 0
    for spans, c0, c1, n in shares:
        if buf is None:
            out.append([(block.raw[a - block.r0 : b - block.r0, c0:c1], code) for a, b in spans])
            continue
        flat = buf[used : used + n]
        used += n
        block.decode(spans, c0, c1, flat)
        pieces, k = [], 0
        for a, b in spans:
            pieces.append((flat[k : k + (b - a) * (c1 - c0)].reshape(b - a, c1 - c0), "F32" if buf.dtype == np.float32 else "F64"))
            k += (b - a) * (c1 - c0)
        out.append(pieces)
    return out


def _chain(seg: Segment, reader: Reader, r0: int, r1: int, shares: list[tuple[Any, ...]], norms: np.ndarray,
           dots: np.ndarray) -> None:
    """Walk the layers of rows [r0, r1): each layer's block is paired with the
    previous one (still mapped) in one kernel call per piece, then the previous
    one is released."""
    total = sum(n for *_, n in shares)
    # Dequantised layers alternate between two halves of one scratch buffer.
    scratch = _arena(seg.work_dtype, 2 * total) if any(seg.scales) else None
    held: list[ExitStack] = []  # the open blocks: the previous layer's and this one's
    prev: list[Pieces] = []
    try:
        for i, t in enumerate(seg.tensors):
            first = i + 1 if i == 0 else i + PREFETCH_LAYERS  # all at the start, then one more per layer
            for ahead in seg.tensors[first : i + 1 + PREFETCH_LAYERS]:
                reader.prefetch(ahead, r0, r1)
            scale = seg.scales[i] if seg.scales else None
            stack = ExitStack()
            held.append(stack)
            block = stack.enter_context(reader.block(t, r0, r1, scale, seg.scale_block))
            buf = None if scale is None else scratch[(i % 2) * total : (i % 2 + 1) * total]
            cur = raw_pieces(block, t.dtype, shares, buf)
            for p, pieces in enumerate(cur):
                if i == 0:
                    norms[p, 0] = sum(fused.norm_sum(x, code) for x, code in pieces)
                    continue
                for (x, xc), (y, yc) in zip(prev[p], pieces):
                    bb, ab = fused.next_sums(x, xc, y, yc)
                    norms[p, i] += bb
                    dots[p, i - 1] += ab
            if len(held) == 2:
                held.pop(0).close()  # release the previous layer's pages
            prev = cur
    finally:
        for stack in held:
            stack.close()


def execute(plan: Plan, progress: Callable[[int], None] | None = None) -> tuple[Totals, dict[str, int]]:
    """Run every item and add up its sums per segment (in float64)."""
    totals: Totals = [
        (np.zeros((len(s.parts), len(s.layers))), np.zeros((len(s.parts), max(len(s.layers) - 1, 0))))
        for s in plan.segments
    ]
    mapped = 0
    read_by_pid: dict[int, int] = {}
    # The compiled kernel calls no BLAS: its workers skip pinning it (threadpoolctl, ~8 ms each to start).
    blas = 1 if fused.KERNEL == "numpy" else None
    for item, norms, dots, nbytes, pid, nread in pool.run(run_item, plan.items(), plan.jobs, pool.init_state,
                                                          (plan.segments, blas)):
        totals[item[0]][0][...] += norms
        totals[item[0]][1][...] += dots
        mapped += nbytes
        read_by_pid[pid] = max(read_by_pid.get(pid, 0), nread)
        if progress:
            progress(plan.item_bytes(item))
    return totals, {"bytes_mapped": mapped, "read_bytes": sum(read_by_pid.values())}
