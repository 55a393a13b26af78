"""Pairing: which tensors stream together, cut into work items.

A segment is one raw tensor name followed through a run of consecutive layers
of the same shape (and the same split and dequantisation); its parts are the
families it holds (one, unless fused). An item is one row block of a segment.
The chain pass walks an item's layers in order; other passes pair the same
segments differently (two checkpoints, all layers at once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ..checkpoint.index import TensorInfo
from ..errors import FormatError, SelectionError
from .budget import UNREAD_AHEAD_MAX_BLOCK, Paging, paging, plan_budget
from ..layout import Layout, Member, family_order, grid
from ..options import ScanOptions
from ..result import Skip


@dataclass(frozen=True)
class Part:
    """One family's share of a raw tensor (all of it, unless fused)."""

    family: str
    rows: tuple[tuple[int, int], ...] | None
    cols: tuple[int, int] | None


@dataclass(frozen=True)
class Segment:
    """One family's raw tensor across the layers of a stack: what a pass streams in row blocks."""

    stack: str
    raw: str
    layers: tuple[int, ...]
    tensors: tuple[TensorInfo, ...]
    parts: tuple[Part, ...]
    # Dequantisation: per layer the scale grid of its tensor (None: values as stored),
    # each scale covering a scale_block (rows, cols) block of the tensor's grid.
    scales: tuple[TensorInfo | None, ...] = ()
    scale_block: tuple[int, int] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.tensors[0].shape

    @property
    def work_dtype(self) -> type:
        return np.float64 if any(t.dtype == "F64" for t in self.tensors) else np.float32


def segments_bytes(segments: list[Segment]) -> int:
    """The bytes of every tensor the segments read."""
    return sum(t.nbytes for s in segments for t in s.tensors)


@dataclass
class Plan:
    """The segments a run reads, what it leaves out, and the workers and block size that fit the budget."""

    segments: list[Segment]
    skipped: list[Skip]
    jobs: int
    block: int

    @property
    def bytes_total(self) -> int:
        return segments_bytes(self.segments)

    def paging(self, nbytes: int, max_memory: int) -> Paging:
        return segments_paging(self.segments, nbytes, max_memory)

    def items(self) -> Iterator[tuple[int, int, int]]:
        for i, seg in enumerate(self.segments):
            rows, cols = grid(seg.shape)
            step = max(1, self.block // max(cols, 1))
            for r0 in range(0, rows, step):
                yield i, r0, min(rows, r0 + step)

    def item_bytes(self, item: tuple[int, int, int]) -> int:
        seg = self.segments[item[0]]
        _, cols = grid(seg.shape)
        return sum((item[2] - item[1]) * cols * t.nbytes // max(t.numel, 1) for t in seg.tensors)


def segments_paging(segments: list[Segment], nbytes: int, max_memory: int) -> Paging:
    """How a run over `segments` reading `nbytes` treats the page cache: an item
    reads a row block of each of a segment's tensors in turn."""
    if not segments:
        return Paging()
    streams = max(len(s.tensors) for s in segments)
    return paging(nbytes, max_memory, streams, segments[0].tensors[0].file)


def plan_scan(layout: Layout, options: ScanOptions) -> Plan:
    """Choose segments, worker count and block size within the memory budget."""
    segs, skipped = segments(layout, options)
    if not segs:
        raise SelectionError("scan", "nothing to analyse: no floating-point layer tensors match the selection")
    streams = max(len(s.layers) for s in segs) if options.all_pairs else 2  # all-pairs: every layer's block at once
    nbytes = segments_bytes(segs)
    unread_ahead = not segments_paging(segs, nbytes, options.max_memory).readahead
    budget = plan_budget(options.max_memory, options.jobs, max(grid(s.shape)[1] for s in segs), streams,
                         nbytes, UNREAD_AHEAD_MAX_BLOCK if unread_ahead else None)
    return Plan(segs, skipped, budget.jobs, budget.block)


def segments(layout: Layout, options: ScanOptions) -> tuple[list[Segment], list[Skip]]:
    """The segments a selection asks for, and what it leaves out, with the reason."""
    _check_selection(layout, options)
    segments: list[Segment] = []
    skipped: list[Skip] = []
    for stack in layout.stacks.values():
        if options.stacks and stack.name not in options.stacks:
            continue
        wanted = set(options.families)
        for agg, members in stack.aggregates.items():  # an all-experts family needs its experts
            if agg in wanted:
                wanted.update(members)
        for rest, refused in stack.refused.items():
            if (not wanted or wanted & set(refused.families)) and (
                not options.layers or any(options.layers[0] <= L < options.layers[1] for L in refused.layers)
            ):
                raise FormatError(refused.example, refused.message)
        groups: dict[str, dict[str, list[Member]]] = {}
        for family, members in stack.families.items():
            if wanted and family not in wanted and stack.raw[family] not in wanted:  # canonical or raw name
                continue
            if options.layers:
                a, b = options.layers
                members = [m for m in members if a <= m.layer < b]
            groups.setdefault(stack.raw[family], {})[family] = members
        for raw, fams in groups.items():
            for run in _runs(stack.name, raw, fams, skipped):
                segments.append(run)
    return segments, skipped


def _runs(stack: str, raw: str, fams: dict[str, list[Member]], skipped: list[Skip]) -> Iterator[Segment]:
    """Split one raw tensor's layers into runs of consecutive layers of one shape
    (and one way of dequantising: the parts and scale blocks come from a run's first layer)."""
    by_layer: dict[int, list[tuple[str, Member]]] = {}
    for family, members in fams.items():
        for m in members:
            by_layer.setdefault(m.layer, []).append((family, m))
    run: list[tuple[int, list[tuple[str, Member]]]] = []

    def close() -> Iterator[Segment]:
        if run:
            parts = tuple(Part(f, m.rows, m.cols) for f, m in run[0][1])
            first = run[0][1][0][1]
            yield Segment(stack, raw, tuple(L for L, _ in run), tuple(ms[0][1].tensor for _, ms in run), parts,
                          tuple(ms[0][1].scale for _, ms in run), first.scale_block)
            run.clear()

    def quant(m: Member) -> tuple[Any, ...]:
        return (m.scale.shape if m.scale else None, m.scale_block, tuple((f, x.rows, x.cols) for f, x in by_layer[m.layer]))

    for layer in sorted(by_layer):
        ms = by_layer[layer]
        t = ms[0][1].tensor
        if not t.is_float:
            skipped.append(Skip(stack, f"{t.dtype} is not a floating-point dtype", raw=raw, layer=layer))
            continue
        if t.numel == 0:
            skipped.append(Skip(stack, "empty tensor", raw=raw, layer=layer))
            continue
        if run:
            prev_layer, prev = run[-1]
            if prev_layer + 1 != layer:
                yield from close()
            elif prev[0][1].tensor.shape != t.shape:
                skipped.append(Skip(stack, f"shape changes from {list(prev[0][1].tensor.shape)} to {list(t.shape)}",
                                    raw=raw, L=prev_layer, L_next=layer))
                yield from close()
            elif quant(prev[0][1]) != quant(ms[0][1]):
                skipped.append(Skip(stack, "the split or the dequantisation scales change", raw=raw, L=prev_layer,
                                    L_next=layer))
                yield from close()
        run.append((layer, ms))
    yield from close()




def clip(rows: tuple[tuple[int, int], ...] | None, r0: int, r1: int) -> list[tuple[int, int]]:
    """The row spans of a part that fall in [r0, r1) (all of them: None)."""
    if rows is None:
        return [(r0, r1)]
    return [(max(a, r0), min(b, r1)) for a, b in rows if min(b, r1) > max(a, r0)]


def _check_selection(layout: Layout, options: ScanOptions) -> None:
    """A --stack or --family that names nothing is a typo: say what there is."""
    for name in options.stacks:
        if name not in layout.stacks:
            raise SelectionError("stack", f"no stack {name!r} here; stacks: {', '.join(layout.stacks)}")
    stacks = [st for st in layout.stacks.values() if not options.stacks or st.name in options.stacks]
    known = {f for st in stacks for f in (*st.families, *st.aggregates, *st.raw.values())}
    for name in options.families:
        if name not in known:
            listed = family_order([f for st in stacks for f in (*st.families, *st.aggregates) if "experts." not in f
                                   or f in st.aggregates])
            more = f" (and {len(listed) - 24} more)" if len(listed) > 24 else ""
            raise SelectionError("family", f"no family {name!r} here; families: {', '.join(listed[:24])}{more}")


