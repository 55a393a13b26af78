"""Sums -> a stack's results: norms, cosines, pair metrics, summaries, the scale track.

The engine hands per segment the squared norms of every layer and the inner
products of adjacent layers (float64). Here they become the registry's pair
metrics (a pair whose norms are zero or not finite is skipped with the
reason), all-experts families are added up from their experts' sums, and
every family gets its summary and scale track.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..engine.plan import Plan
from ..layout import Layout, aggregate_raw, aggregate_sums, family_order, grid, is_bias
from ..result import FamilyInfo, Pair, PairStats, Skip, StackResult
from .registry import EPS, pair_values, summarise
from .scale import scale_pca

NONFINITE = "inf or NaN values, or squares beyond float32 (left out of the scale track)"
Totals = list[tuple[np.ndarray, np.ndarray]]  # per segment: squared norms (parts x layers), dots (parts x pairs)


def _pair_cos(n2a: float, n2b: float, dot: float) -> tuple[float | None, str | None]:
    """The cosine of a pair from its sums, or why there is none."""
    if not (math.isfinite(n2a) and math.isfinite(n2b) and math.isfinite(dot)):
        return None, NONFINITE
    if math.sqrt(n2a) < EPS or math.sqrt(n2b) < EPS:
        return None, "zero norm"
    # sqrt of the product, not a product of sqrts: identical layers give exactly 1.
    return float(dot / math.sqrt(n2a * n2b)), None


def _part_shape(seg: Any, part: Any) -> tuple[int, ...] | None:
    if part.rows is None and part.cols is None:
        return None
    rows, cols = grid(seg.shape)
    m = sum(b - a for a, b in part.rows) if part.rows is not None else rows
    c0, c1 = part.cols or (0, cols)
    return (m, c1 - c0) if len(seg.shape) >= 2 else (m,)


def stack_result(name: str, layout: Layout, plan: Plan, totals: Totals,
                 ranks: dict[tuple[int, int, int], dict[str, Any]] | None = None, pca_biases: bool = False
                 ) -> StackResult:
    """One stack's typed result from the passes' sums (and the rank pass's spectra); the scale
    track's PCA over matrices and norms, and biases too with `pca_biases`."""
    norm: dict[str, dict[int, float | None]] = {}
    cos: dict[str, dict[int, float]] = {}
    spec: dict[str, dict[int, dict[str, Any]]] = {}  # residual spectra, from the rank pass
    info: dict[str, FamilyInfo] = {}
    skipped = [s for s in plan.skipped if s.stack == name]
    sq: dict[str, dict[int, float]] = {}  # raw sums, for the all-experts families
    dt: dict[str, dict[int, float]] = {}
    for si, (seg, (n2, d)) in enumerate(zip(plan.segments, totals)):
        if seg.stack != name:
            continue
        for p, part in enumerate(seg.parts):
            fam = part.family
            info.setdefault(fam, FamilyInfo(seg.raw, seg.shape, seg.tensors[0].dtype, _part_shape(seg, part)))
            sq.setdefault(fam, {}).update(zip(seg.layers, n2[p].tolist()))
            dt.setdefault(fam, {}).update(zip(seg.layers[:-1], d[p].tolist()))
            fn = np.sqrt(n2[p])
            finite = np.isfinite(fn)
            norm.setdefault(fam, {}).update(
                (L, v if ok else None) for L, v, ok in zip(seg.layers, fn.tolist(), finite.tolist())
            )
            for i in range(len(seg.layers) - 1):
                L, L_next = seg.layers[i], seg.layers[i + 1]
                c, why = _pair_cos(float(n2[p, i]), float(n2[p, i + 1]), float(d[p, i]))
                if why is not None:
                    skipped.append(Skip(name, why, family=fam, L=L, L_next=L_next))
                    continue
                cos.setdefault(fam, {})[L] = c  # type: ignore[assignment]
                if ranks and (si, p, i) in ranks:
                    spec.setdefault(fam, {})[L] = ranks[(si, p, i)]
    stack = layout.stacks[name]
    for agg, members in stack.aggregates.items():
        if not all(f in sq for f in members):  # some experts not analysed (selection)
            continue
        a2, ad = aggregate_sums(members, sq, dt)
        first = info[members[0]]
        info[agg] = FamilyInfo(aggregate_raw(stack, agg), first.shape, first.dtype, first.part_shape, len(members))
        norm[agg] = {L: math.sqrt(v) if math.isfinite(v) else None for L, v in sorted(a2.items())}
        for L, v in sorted(ad.items()):
            c, why = _pair_cos(a2[L], a2[L + 1], v)
            if why is not None:
                skipped.append(Skip(name, why, family=agg, L=L, L_next=L + 1))
                continue
            cos.setdefault(agg, {})[L] = c  # type: ignore[assignment]
    layers = sorted({L for v in norm.values() for L in v})
    fams = family_order(list(norm))
    pairs = [Pair(L, L + 1, {f: _stats(cos[f][L], spec.get(f, {}).get(L)) for f in fams if L in cos.get(f, {})})
             for L in layers if L + 1 in layers]
    scales = {f: [norm[f].get(L) for L in layers] for f in fams}
    summaries = {f: summarise([p.families[f].values for p in pairs if f in p.families])
                 for f in fams if any(f in p.families for p in pairs)}
    raws = {i.raw for i in info.values()}
    # The PCA over matrices and norms: biases' scales follow other schedules (left out, and said).
    left = [] if pca_biases else [f for f in scales if is_bias(f)]
    pca = scale_pca({f: v for f, v in scales.items() if f not in left}, drop_null=True)
    pca["left_out_biases"] = left
    return StackResult(name, layers, {f: info[f] for f in fams}, [u for u in stack.unmapped if u in raws], pairs,
                       summaries, scales, pca, skipped)


def _stats(cos: float, rank: dict[str, Any] | None) -> PairStats:
    """A pair's metrics from its cosine and, with --rank, its residual spectrum."""
    measured: dict[str, Any] = {"cos": cos, **(rank or {})}
    values = pair_values(measured)
    return PairStats(values, {k: v for k, v in measured.items() if k not in values})
