"""Drift of a checkpoint against a reference, per layer and family: cos and rel_change.

STAND-IN for `layerdiff.diff` (the lead's `layerdiff diff A B`, not on main
yet): the same contract, `rows()` as (stack, family, L, metric, value) with
`cos` = <A, B> / (|A| |B|) and `rel_change` = |A - B| / |B| (B the reference),
but minimal. Replace it by `layerdiff.diff` once that lands; nothing outside
this file and `run.py` knows how drift is computed.

It streams like every pass: the tensor of layer L in A and in the reference
form a two-tensor segment, whose row blocks are decoded once each, in the
engine's pool, within the budget; per block the pass adds |A|^2, |B|^2,
<A, B> and |A - B|^2, the last from the decoded difference itself (not from
the other three, whose cancellation would lose the small changes of nearby
checkpoints).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..api import Model
from ..checkpoint.reader import decode, scale_rows
from ..engine import pool
from ..engine.budget import plan_budget
from ..engine.chain import _arena
from ..engine.kernel import padded, rowdot
from ..engine.plan import Plan, Segment, clip, segments
from ..errors import SelectionError
from ..layout import grid
from ..metrics.registry import EPS
from ..options import ScanOptions
from ..result import Skip

Row = tuple[str, str, int, str, float]  # stack, family, L, metric, value
Totals = list[tuple[np.ndarray]]  # per segment: (parts x 4) sums |A|^2, |B|^2, <A, B>, |A - B|^2


@dataclass(frozen=True)
class DriftResult:
    """What `diff` returns, as far as a sweep needs it."""

    rows_: list[Row]
    skipped: list[Skip] = field(default_factory=list)

    def rows(self) -> list[Row]:
        return list(self.rows_)


def _by_layer(segs: list[Segment]) -> dict[tuple[str, str, int], tuple[Segment, int]]:
    return {(s.stack, s.raw, L): (s, i) for s in segs for i, L in enumerate(s.layers)}


@dataclass
class DriftJob:
    """A drift planned within its budget: `total` bytes, `run()` or, by parts, `plan` + `result()`."""

    plan: Plan
    aggregates: dict[str, dict[str, list[str]]]  # stack -> all-experts family -> member families

    @property
    def total(self) -> int:
        return self.plan.bytes_total

    def run(self, progress: Callable[[int], None] | None = None) -> DriftResult:
        totals, io = execute(self.plan, progress)
        return self.result(totals, io)

    def result(self, totals: Totals, io: dict[str, int] | None = None) -> DriftResult:
        sums: dict[tuple[str, str, int], list[float]] = {}  # (stack, family, L) -> |A|^2, |B|^2, <A,B>, |A-B|^2
        for seg, (s4,) in zip(self.plan.segments, totals):
            for p, part in enumerate(seg.parts):
                sums[(seg.stack, part.family, seg.layers[0])] = [float(x) for x in s4[p]]
        for stack, aggs in self.aggregates.items():  # all-experts families: the experts' sums added up
            for agg, members in aggs.items():
                for L in sorted({k[2] for k in sums if k[0] == stack and k[1] in members}):
                    parts = [sums.get((stack, m, L)) for m in members]
                    if all(x is not None for x in parts):
                        sums[(stack, agg, L)] = [sum(x[j] for x in parts) for j in range(4)]  # type: ignore[index]
        rows: list[Row] = []
        skipped = list(self.plan.skipped)
        for (stack, fam, L), (a2, b2, ab, d2) in sums.items():
            if not all(math.isfinite(x) for x in (a2, b2, ab, d2)):
                skipped.append(Skip(stack, "inf or NaN values", family=fam, layer=L))
                continue
            if math.sqrt(a2) < EPS or math.sqrt(b2) < EPS:
                skipped.append(Skip(stack, "zero norm", family=fam, layer=L))
                continue
            rows.append((stack, fam, L, "cos", ab / math.sqrt(a2 * b2)))
            rows.append((stack, fam, L, "rel_change", math.sqrt(d2 / b2)))
        return DriftResult(rows, skipped)


def run_item(item: tuple[int, int, int]) -> tuple[tuple[int, int, int], np.ndarray, int]:
    """The four sums over one row block of one (A, reference) segment."""
    seg: Segment = pool.STATE["payload"][item[0]]
    reader = pool.STATE["reader"]
    _, r0, r1 = item
    _, cols = grid(seg.shape)
    out = np.zeros((len(seg.parts), 4))
    before = reader.bytes_mapped
    shares = []
    for part in seg.parts:
        spans = clip(part.rows, r0, r1)
        c0, c1 = part.cols or (0, cols)
        shares.append((spans, c0, c1, sum(b - a for a, b in spans) * (c1 - c0)))
    arena = _arena(seg.work_dtype, 2 * sum(padded(n) for *_, n in shares))
    bufs, used = [], 0
    for *_, n in shares:
        pair = arena[used: used + 2 * padded(n)].reshape(2, padded(n))
        pair[:, n:] = 0  # the padding adds nothing to any sum
        used += 2 * padded(n)
        bufs.append(pair)
    with np.errstate(all="ignore"):  # inf/NaN weights: inf/NaN sums, reported as skipped
        blocks = [reader.rows(t, r0, r1) for t in seg.tensors]
        for k, t in enumerate(seg.tensors):
            scale = seg.scales[k] if seg.scales else None
            sgrid, sr0 = scale_rows(reader, scale, seg.scale_block, r0, r1) if scale is not None else (None, 0)
            for (spans, c0, c1, _), pair in zip(shares, bufs):
                decode(blocks[k], r0, spans, c0, c1, pair[k], sgrid, seg.scale_block or (1, 1), sr0)
        for p, pair in enumerate(bufs):
            a, b = pair
            out[p, :3] = rowdot(a, a), rowdot(b, b), rowdot(a, b)
            a -= b  # A - B in place: both are spent
            out[p, 3] = rowdot(a, a)
        del blocks
        for t in seg.tensors:
            reader.release(t, r0, r1)
    return item, out, reader.bytes_mapped - before


def execute(plan: Plan, progress: Callable[[int], None] | None = None) -> tuple[Totals, dict[str, int]]:
    """Every item of a drift plan, its sums added up per segment (float64)."""
    totals: Totals = [(np.zeros((len(s.parts), 4)),) for s in plan.segments]
    mapped = 0
    for item, sums, nbytes in pool.run(run_item, plan.items(), plan.jobs, pool.init_state, (plan.segments,)):
        totals[item[0]][0][...] += sums
        mapped += nbytes
        if progress:
            progress(plan.item_bytes(item))
    return totals, {"bytes_mapped": mapped}


def plan_drift(a: Model, b: Model, options: ScanOptions) -> DriftJob:
    """Pair every analysed tensor of `a` with the same tensor (stack, raw name, layer) of `b`."""
    segs_a, skipped = segments(a.layout, options)
    segs_b, _ = segments(b.layout, options)
    in_b = _by_layer(segs_b)
    pairs: list[Segment] = []
    for seg in segs_a:
        for i, L in enumerate(seg.layers):
            found = in_b.get((seg.stack, seg.raw, L))
            why = None
            if found is None:
                why = "not in the reference"
            else:
                other, j = found
                if other.shape != seg.shape:
                    why = f"shape {list(seg.shape)} here, {list(other.shape)} in the reference"
                elif other.parts != seg.parts or (seg.scales and other.scales and other.scale_block != seg.scale_block):
                    why = "split or dequantised differently in the reference"
            if why is not None:
                skipped.append(Skip(seg.stack, why, raw=seg.raw, layer=L))
                continue
            scales = ((seg.scales[i] if seg.scales else None), (other.scales[j] if other.scales else None))
            pairs.append(Segment(seg.stack, seg.raw, (L, L), (seg.tensors[i], other.tensors[j]), seg.parts,
                                 scales if any(s is not None for s in scales) else (),
                                 seg.scale_block or other.scale_block))
    if not pairs:
        raise SelectionError("reference", "no tensor of this checkpoint has a counterpart of the same shape "
                                          "in the reference")
    budget = plan_budget(options.max_memory, options.jobs, max(grid(s.shape)[1] for s in pairs))
    aggregates = {st.name: dict(st.aggregates) for st in a.layout.stacks.values() if st.aggregates}
    return DriftJob(Plan(pairs, skipped, budget.jobs, budget.block), aggregates)


def drift(a: Model, b: Model, options: ScanOptions, progress: Callable[[int], None] | None = None) -> DriftResult:
    return plan_drift(a, b, options).run(progress)


def rows_doc(result: Any) -> dict[str, Any]:
    """A drift result as the store keeps it."""
    return {"rows": [list(r) for r in result.rows()],
            "skipped": [s.to_dict() for s in getattr(result, "skipped", [])]}
