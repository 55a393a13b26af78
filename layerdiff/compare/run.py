"""`diff`: plan both checkpoints' streams within one budget, run, assemble the result.

The two copies of every matched tensor stream side by side through the
multi-stream pass (each side read once); with rank, the spectrum of D = B - A
of every 2-D tensor (or fused part) that changed comes from the Gram pass in
its delta mode (which reads those tensors again).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..api import Model, open_model, scan_options
from ..checkpoint.index import grid
from ..checkpoint.reader import dropping
from ..engine import centred, gram, multi
from ..engine.budget import Paging, plan_budget
from ..engine.plan import Plan, Segment, segments_bytes
from ..errors import SelectionError
from ..layout import family_kind, family_order
from ..metrics.registry import DIFF_METRICS, diff_values
from ..options import ScanOptions
from .match import Matched, Matching, match
from .result import TRACKED, DiffResult, TensorDiff

Progress = Callable[[int], None]
TOP = 3  # layers named per family as the ones that changed most


def _selected(m: Matched, options: ScanOptions) -> bool:
    p = m.placed
    if options.stacks and p.stack not in options.stacks:
        return False
    if options.families and not ({q.family for q in p.parts} | {m.rest}) & set(options.families):
        return False
    return not options.layers or (p.layer is not None and options.layers[0] <= p.layer < options.layers[1])


@dataclass
class DiffJob:
    """A diff planned within its budget: `total` progress units, then `run()`."""

    a: Model
    b: Model
    options: ScanOptions
    matching: Matching
    read: list[Matched]  # streamed
    unread: list[Matched]  # identical without reading (the same bytes)
    plan: Plan | None
    rank_plan: gram.RankPlan | None
    centred_plan: centred.CentredPlan | None = None

    @property
    def total(self) -> int:
        if self.plan is None:
            return 0
        return self.plan.bytes_total + (self.centred_plan.total_bytes(self.plan) if self.centred_plan else 0)

    def run(self, progress: Progress | None = None) -> DiffResult:
        with dropping(self.plan.paging(self.total, self.options.max_memory) if self.plan else Paging()):
            return self._run(progress)

    def _run(self, progress: Progress | None) -> DiffResult:
        started = time.perf_counter()
        io: dict[str, Any] = {"bytes_mapped": 0, "read_bytes": 0}
        totals: multi.MultiTotals = []
        if self.plan is not None:
            totals, io = multi.execute(self.plan, diff=True, progress=progress)
        spectra = self._spectra(totals, io) if self.rank_plan is not None else {}
        if self.centred_plan is not None and self.plan is not None:
            values, mapped = centred.run_centred(self.plan, self.centred_plan, progress)
            io["bytes_mapped"] += mapped  # every pass's reads, as scan counts them
            for (si, part, _), v in values.items():
                spectra.setdefault(si, {}).setdefault(part, {}).update(v)
        tensors = {m.name: _tensor(m, t, spectra.get(i, {})) for i, (m, t) in enumerate(zip(self.read, totals))}
        for m in self.unread:
            tensors[m.name] = _unread(m)
        tensors = dict(sorted(tensors.items()))
        layers, summary = _per_layer(tensors)
        o = self.options
        settings = {"max_memory": o.max_memory, "jobs": self.plan.jobs if self.plan else 0,
                    "block_elements": self.plan.block if self.plan else 0, "stacks": list(o.stacks),
                    "families": list(o.families), "layers": list(o.layers) if o.layers else None,
                    "rank": self.rank_plan.describe() if self.rank_plan else None,
                    "gram": self.centred_plan.describe() if self.centred_plan else None}
        side = {"a": sum(m.a.nbytes for m in self.read), "b": sum(m.b.nbytes for m in self.read)}
        run = {"seconds": time.perf_counter() - started, "bytes_analysed_a": side["a"], "bytes_analysed_b": side["b"],
               "identical_unread": len(self.unread), **io}
        mm = self.matching
        return DiffResult(_describe(self.a), _describe(self.b), tensors, mm.only_in_a, mm.only_in_b,
                          [x.to_dict() for x in mm.mismatched], mm.not_weights, layers, summary, settings, run)

    def _spectra(self, totals: multi.MultiTotals, io: dict[str, Any]) -> dict[int, dict[int, dict[str, Any]]]:
        """Spectra of B - A for the 2-D parts that changed: segment -> part -> stats."""
        assert self.plan is not None and self.rank_plan is not None
        changed = {i for i, (_, extra) in enumerate(totals) if np.any(extra[:, multi.DIFF_SQ] != 0)}
        segs = [s for i, s in enumerate(self.plan.segments) if i in changed]
        keep = [i for i in range(len(self.plan.segments)) if i in changed]
        if not segs:
            return {}
        sub = Plan(segs, [], self.plan.jobs, self.plan.block)
        rp = gram.plan_rank(sub, self.options, delta=True)
        _, ranks, rank_io = gram.run_rank(sub, rp)
        io["bytes_mapped"] += rank_io["rank_bytes_mapped"]
        io.update(rank_io)
        out: dict[int, dict[int, dict[str, Any]]] = {}
        for (si, part, _), st in ranks.items():
            out.setdefault(keep[si], {})[part] = st
        return out


def _describe(m: Model) -> dict[str, Any]:
    return m.source.describe() if m.source else {}


def _sums(gram_: np.ndarray, extra: np.ndarray, n: int) -> dict[str, float]:
    return {"aa": float(gram_[0, 0]), "bb": float(gram_[1, 1]), "ab": float(gram_[0, 1]),
            "dd": float(extra[multi.DIFF_SQ]), "equal": float(extra[multi.DIFF_EQUAL]), "n": float(n),
            "max_abs": float(extra[multi.DIFF_MAX])}


def _part_size(seg: Segment, p: int) -> int:
    part = seg.parts[p]
    rows, cols = grid(seg.shape)
    m = sum(b - a for a, b in part.rows) if part.rows is not None else rows
    c0, c1 = part.cols or (0, cols)
    return m * (c1 - c0)


def _tensor(m: Matched, totals: tuple[np.ndarray, np.ndarray], spectra: dict[int, dict[str, Any]]) -> TensorDiff:
    g, extra = totals
    seg = m.segment()
    sizes = [_part_size(seg, p) for p in range(len(seg.parts))]
    parts = {part.family: diff_values(_sums(g[p], extra[p], sizes[p]), spectra.get(p))
             for p, part in enumerate(seg.parts)}
    whole = None
    if len(seg.parts) == 1:
        whole = parts.pop(seg.parts[0].family)
    elif sum(sizes) == m.a.numel:  # the parts tile the tensor: its sums are theirs added up
        e = np.array([extra[:, 0].sum(), extra[:, 1].sum(), extra[:, 2].max()])
        whole = diff_values(_sums(g.sum(axis=0), e, m.a.numel))
    else:
        whole = {k.name: None for k in DIFF_METRICS}
    family = seg.parts[0].family if len(seg.parts) == 1 else m.rest
    return TensorDiff(m.name, m.placed.stack, m.placed.layer, family, m.a.shape, m.a.dtype, m.b.dtype, whole, parts)


def _unread(m: Matched) -> TensorDiff:
    """A tensor whose two copies are the same bytes: identical; what needs its values (norms, cos) unknown."""
    values = diff_values({"aa": math.nan, "bb": math.nan, "ab": math.nan, "dd": 0.0, "equal": 1.0, "n": 1.0,
                          "max_abs": 0.0})
    values.update(rel_change=None, norm_a=None, norm_b=None, norm_ratio=None)
    family = m.placed.parts[0].family if len(m.placed.parts) == 1 else m.rest
    return TensorDiff(m.name, m.placed.stack, m.placed.layer, family, m.a.shape, m.a.dtype, m.b.dtype, values,
                      note="identical without reading: the same bytes of the same file in A and B")


def _per_layer(tensors: dict[str, TensorDiff]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per stack and family: the per-layer arrays, and the family's summary."""
    rows: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    ndim: dict[str, int] = {}  # per family: its tensors' dimensions, for the report's grouping
    for t in tensors.values():
        if t.stack is None or t.layer is None:
            continue
        for fam, values in (t.parts or {t.family: t.values}).items():
            rows.setdefault(t.stack, {}).setdefault(fam, {})[t.layer] = values
            ndim[fam] = len(t.shape)
    layers: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for stack, fams in sorted(rows.items()):
        for fam in sorted(family_order(list(fams)), key=lambda f: family_kind(f, ndim[f])):
            by_layer = fams[fam]
            order = sorted(by_layer)
            layers.setdefault(stack, {})[fam] = {"layers": order, **{k: [by_layer[L][k] for L in order] for k in TRACKED}}
            rel = [(by_layer[L]["rel_change"], L) for L in order if by_layer[L]["rel_change"] is not None]
            moved = [(r, L) for r, L in rel if r > 0]
            summary.setdefault(stack, {})[fam] = {
                "n_layers": len(order),
                "identical": sum(bool(by_layer[L]["identical"]) for L in order),
                "mean_rel_change": float(np.mean([r for r, _ in rel])) if rel else None,
                "max_rel_change": max(r for r, _ in rel) if rel else None,
                "most_changed_layers": [L for _, L in sorted(moved, reverse=True)[:TOP]],
                "mean_cos": float(np.mean(cs)) if (cs := [by_layer[L]["cos"] for L in order
                                                          if by_layer[L]["cos"] is not None]) else None,
            }
    return layers, summary


def plan_diff(a: Model, b: Model, options: ScanOptions) -> DiffJob:
    """Match A's and B's tensors and plan both streams within one budget (fails up front)."""
    assert a.index is not None and b.index is not None, "a diff needs opened checkpoints"
    matching = match(a.index.tensors, a.layout, b.index.tensors, b.layout)
    chosen = [m for m in matching.matched if _selected(m, options)]
    if not chosen and not (options.stacks or options.families or options.layers):
        raise SelectionError("diff", "nothing to compare: A and B have no floating-point tensor in common")
    if not chosen:
        raise SelectionError("diff", "nothing to compare: no matched tensor is in the selection")
    read = [m for m in chosen if not m.same_bytes]
    unread = [m for m in chosen if m.same_bytes]
    plan = rank_plan = None
    if read:
        segs = [m.segment() for m in read]
        budget = plan_budget(options.max_memory, options.jobs, max(grid(s.shape)[1] for s in segs), streams=2,
                             nbytes=segments_bytes(segs))
        plan = Plan(segs, [], budget.jobs, budget.block)
        if options.rank:
            rank_plan = gram.plan_rank(plan, options, delta=True)  # fails here, up front, if it cannot fit
    centred_plan = centred.plan_centred(plan, a.layout, options) if options.gram and plan else None
    return DiffJob(a, b, options, matching, read, unread, plan, rank_plan, centred_plan)


def diff(a: str | Model, b: str | Model, progress: Progress | None = None, cache_dir: str | None = None,
         **options: Any) -> DiffResult:
    """What changed between two checkpoints (e.g. base and fine-tune), tensor by tensor.

    A and B are any MODEL (path, index file, hub id, `org/name@REV`); options as
    `layerdiff.scan_options` takes them (max_memory, jobs, stacks, families,
    layers, rank, sketch)."""
    ma = a if isinstance(a, Model) else open_model(a, None, cache_dir)
    mb = b if isinstance(b, Model) else open_model(b, None, cache_dir)
    return plan_diff(ma, mb, scan_options(**options)).run(progress)
