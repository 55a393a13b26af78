"""The chain pass: adjacent-layer sums |W_L|^2 and <W_L, W_L+1>, streamed.

An item walks the layers of one row block in order, decodes the block of
layer L once, and combines it with the still-decoded block of layer L-1: every
analysed byte is read exactly once, and only two decoded blocks per worker are
alive.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from ..checkpoint.reader import Reader
from ..layout import grid
from . import pool
from .budget import read_bytes
from .kernel import padded, rowdot
from .plan import Plan, Segment, clip

Totals = list[tuple[np.ndarray, np.ndarray]]  # per segment: squared norms (parts x layers), dots (parts x pairs)


def _arena(dtype: type, n: int) -> np.ndarray:
    """A per-process scratch buffer, grown as needed and reused across items:
    fresh buffers per item cost a page fault per 4 KB."""
    key = f"arena-{np.dtype(dtype).name}"
    buf = pool.STATE.get(key)
    if buf is None or buf.size < n:
        buf = pool.STATE[key] = np.empty(n, dtype)
    return buf


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
    # Per part: where its values sit in the block, and its current/previous buffers.
    work = []
    shares = []
    for part in seg.parts:
        spans = clip(part.rows, r0, r1)
        c0, c1 = part.cols or (0, cols)
        shares.append((spans, c0, c1, sum(b - a for a, b in spans) * (c1 - c0)))
    # The parts of a fused tensor share the block: buffers for their shares, not a block each.
    arena = _arena(seg.work_dtype, 2 * sum(padded(n) for *_, n in shares))
    used = 0
    for spans, c0, c1, n in shares:
        pair = arena[used : used + 2 * padded(n)].reshape(2, padded(n))
        pair[:, n:] = 0  # the padding must not add to any sum
        used += 2 * padded(n)
        work.append([spans, c0, c1, pair[0], pair[1]])
    # inf/NaN weights give inf/NaN sums, reported as such: no warnings on stderr.
    with np.errstate(all="ignore"):
        _chain(seg, reader, r0, r1, work, norms, dots)
    return item, norms, dots, reader.bytes_mapped - before, os.getpid(), read_bytes()


def _chain(seg: Segment, reader: Reader, r0: int, r1: int, work: list[list[Any]], norms: np.ndarray,
           dots: np.ndarray) -> None:
    """Walk the layers of rows [r0, r1): decode each once, add its sums."""
    for i, t in enumerate(seg.tensors):
        with reader.block(t, r0, r1, seg.scales[i] if seg.scales else None, seg.scale_block) as block:
            for p, w in enumerate(work):
                spans, c0, c1, cur, prev = w
                block.decode(spans, c0, c1, cur)
                norms[p, i] = rowdot(cur, cur)
                if i:
                    dots[p, i - 1] = rowdot(prev, cur)
                w[3], w[4] = prev, cur


def execute(plan: Plan, progress: Callable[[int], None] | None = None) -> tuple[Totals, dict[str, int]]:
    """Run every item and add up its sums per segment (in float64)."""
    totals: Totals = [
        (np.zeros((len(s.parts), len(s.layers))), np.zeros((len(s.parts), max(len(s.layers) - 1, 0))))
        for s in plan.segments
    ]
    mapped = 0
    read_by_pid: dict[int, int] = {}
    for item, norms, dots, nbytes, pid, nread in pool.run(run_item, plan.items(), plan.jobs, pool.init_state,
                                                          (plan.segments,)):
        totals[item[0]][0][...] += norms
        totals[item[0]][1][...] += dots
        mapped += nbytes
        read_by_pid[pid] = max(read_by_pid.get(pid, 0), nread)
        if progress:
            progress(plan.item_bytes(item))
    return totals, {"bytes_mapped": mapped, "read_bytes": sum(read_by_pid.values())}
