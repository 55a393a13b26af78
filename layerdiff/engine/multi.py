"""The multi-stream pass: K tensors of one shape streamed side by side.

Two checkpoints' copies of a tensor (diff: K = 2) or all L layers of a family
(all-pairs: K = L). Per row block, each of the K blocks is decoded once into
one row of a K x n float64 matrix X, and X X^T adds that block's share of
every inner product <W_i, W_j>; with `diff`, the difference B - A of the two
rows adds |B - A|^2 (from the differences themselves, not from the norms,
which would cancel), the count of equal values and the largest |B - A|.
Every analysed byte is read once; K blocks per worker are alive. A diff of
tensors stored without dequantisation scales goes straight from the mapped
bytes through the fused kernel (`fused.diff_sums`): no decoded copies.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterator

import numpy as np

from ..checkpoint.index import grid
from ..checkpoint.reader import Reader
from . import fused, pool
from .budget import read_bytes
from .chain import raw_pieces
from .plan import Plan, Segment, clip

# Per segment: inner products (parts x K x K), and with diff (parts x 3): |B-A|^2, equal values, max |B-A|.
MultiTotals = list[tuple[np.ndarray, np.ndarray]]
DIFF_SQ, DIFF_EQUAL, DIFF_MAX = 0, 1, 2


def _arena(k: int, n: int) -> np.ndarray:
    """A per-process K x n float64 scratch matrix, grown as needed and reused."""
    buf = pool.STATE.get("multi-arena")
    if buf is None or buf.size < k * n:
        buf = pool.STATE["multi-arena"] = np.empty(k * n)
    return buf[: k * n].reshape(k, n)


def run_item(item: tuple[int, int, int]) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray, int, int, int]:
    """The sums of one row block of one segment's K tensors."""
    segments, diff = pool.STATE["payload"]
    seg = segments[item[0]]
    reader = pool.STATE["reader"]
    _, r0, r1 = item
    _, cols = grid(seg.shape)
    k = len(seg.tensors)
    shares = []
    for part in seg.parts:
        spans = clip(part.rows, r0, r1)
        c0, c1 = part.cols or (0, cols)
        shares.append((spans, c0, c1, sum(b - a for a, b in spans) * (c1 - c0)))
    before = reader.bytes_mapped
    if diff and not any(seg.scales):
        gram, extra = _diff_raw(seg, reader, r0, r1, shares)
        return item, gram, extra, reader.bytes_mapped - before, os.getpid(), read_bytes()
    x = _arena(k, sum(n for *_, n in shares))
    for i, t in enumerate(seg.tensors):
        with reader.block(t, r0, r1, seg.scales[i] if seg.scales else None, seg.scale_block) as block:
            off = 0
            for spans, c0, c1, n in shares:
                block.decode(spans, c0, c1, x[i, off : off + n])
                off += n
    gram = np.zeros((len(shares), k, k))
    extra = np.zeros((len(shares), 3))
    off = 0
    with np.errstate(all="ignore"):  # inf/NaN weights give inf/NaN sums, reported as such
        for p, (*_, n) in enumerate(shares):
            xp = x[:, off : off + n]
            off += n
            gram[p] = xp @ xp.T
            if diff and n:
                d = xp[1] - xp[0]
                extra[p] = (float(d @ d), float(np.count_nonzero(xp[1] == xp[0])), float(np.abs(d).max()))
    return item, gram, extra, reader.bytes_mapped - before, os.getpid(), read_bytes()


# Work per task sent to a worker: a diff's row blocks are small (two tensors' blocks
# of ~2 MB), and a task per block spent more time in the pool than in the kernel.
BATCH_BYTES = 64 << 20


def batches(plan: Plan) -> Iterator[list[tuple[int, int, int]]]:
    """The plan's items in runs of about BATCH_BYTES."""
    batch: list[tuple[int, int, int]] = []
    size = 0
    for item in plan.items():
        batch.append(item)
        size += plan.item_bytes(item)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def run_batch(items: list[tuple[int, int, int]]) -> list[tuple[tuple[int, int, int], np.ndarray, np.ndarray, int, int, int]]:
    return [run_item(item) for item in items]


def _diff_raw(seg: Segment, reader: Reader, r0: int, r1: int, shares: list[tuple[Any, ...]]
              ) -> tuple[np.ndarray, np.ndarray]:
    """A and B's blocks straight from the mapped bytes through the fused kernel (no decoded copies)."""
    gram = np.zeros((len(shares), 2, 2))
    extra = np.zeros((len(shares), 3))
    (ta, tb) = seg.tensors
    with reader.block(ta, r0, r1) as block_a, reader.block(tb, r0, r1) as block_b:
        for p, (pa, pb) in enumerate(zip(raw_pieces(block_a, ta.dtype, shares, None),
                                         raw_pieces(block_b, tb.dtype, shares, None))):
            for (x, xc), (y, yc) in zip(pa, pb):
                aa, bb, ab, dd, equal, most = fused.diff_sums(x, xc, y, yc)
                gram[p] += ((aa, ab), (ab, bb))
                extra[p, DIFF_SQ] += dd
                extra[p, DIFF_EQUAL] += equal
                extra[p, DIFF_MAX] = max(extra[p, DIFF_MAX], most) if not math.isnan(most) else math.nan
    return gram, extra


def execute(plan: Plan, diff: bool = False, progress: Callable[[int], None] | None = None
            ) -> tuple[MultiTotals, dict[str, int]]:
    """Run every item; add up the inner products (and difference sums) per segment."""
    totals: MultiTotals = [
        (np.zeros((len(s.parts), len(s.tensors), len(s.tensors))), np.zeros((len(s.parts), 3)))
        for s in plan.segments
    ]
    mapped = 0
    read_by_pid: dict[int, int] = {}
    done = (r for batch in pool.run(run_batch, batches(plan), plan.jobs, pool.init_state, ((plan.segments, diff),))
            for r in batch)
    for item, gram, extra, nbytes, pid, nread in done:
        g, e = totals[item[0]]
        g += gram
        e[:, DIFF_SQ] += extra[:, DIFF_SQ]
        e[:, DIFF_EQUAL] += extra[:, DIFF_EQUAL]
        np.maximum(e[:, DIFF_MAX], extra[:, DIFF_MAX], out=e[:, DIFF_MAX])
        mapped += nbytes
        read_by_pid[pid] = max(read_by_pid.get(pid, 0), nread)
        if progress:
            progress(plan.item_bytes(item))
    return totals, {"bytes_mapped": mapped, "read_bytes": sum(read_by_pid.values())}
