"""Pairing for a diff: the same stored tensor name in checkpoint A and in B.

Any two layouts match (sharded vs single file, other shard boundaries) and any
two float dtypes (bf16 vs f32). What cannot be compared is said, with the
reason: names only in A or only in B, shapes that differ, non-float or
unreadable tensors. A tensor stored at the same offset of the same file (the
same inode: a hard link, a shared hub blob) is identical without being read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..checkpoint.index import TensorInfo
from ..engine.plan import Part, Segment
from ..layout import Layout


@dataclass(frozen=True)
class Placed:
    """Where a stored tensor sits in a layout: its stack, layer and families (parts)."""

    stack: str | None  # None: not a layer tensor (embeddings, head)
    layer: int | None
    parts: tuple[Part, ...]
    scale: TensorInfo | None = None
    scale_block: tuple[int, int] | None = None
    refused: str | None = None  # a storage format layerdiff cannot read


def placements(layout: Layout) -> dict[str, Placed]:
    """Every analysable or refused tensor of a layout, by stored name."""
    out: dict[str, Placed] = {}
    for st in layout.stacks.values():
        for fam, members in st.families.items():
            for m in members:
                p = out.get(m.tensor.name)
                part = Part(fam, m.rows, m.cols)
                out[m.tensor.name] = (Placed(st.name, m.layer, (part,), m.scale, m.scale_block) if p is None
                                      else Placed(p.stack, p.layer, (*p.parts, part), p.scale, p.scale_block))
        for rest, ref in st.refused.items():
            for L in ref.layers:
                out[f"{st.name}.{L}.{rest}"] = Placed(st.name, L, (), refused=ref.format)
    for t in layout.nonlayer:
        out.setdefault(t.name, Placed(None, None, (Part(t.name, None, None),)))
    return out


@dataclass(frozen=True)
class Matched:
    name: str
    placed: Placed  # from A's layout (stack, layer, families)
    a: TensorInfo
    b: TensorInfo
    a_scale: TensorInfo | None  # each side's dequantisation scale, if any
    b_scale: TensorInfo | None
    scale_block: tuple[int, int] | None
    same_bytes: bool  # the same bytes of the same file: identical without reading

    def segment(self) -> Segment:
        """The two-stream segment that reads A's and B's copies."""
        p = self.placed
        L = p.layer if p.layer is not None else 0
        return Segment(p.stack or "", self.rest, (L, L), (self.a, self.b), p.parts, (self.a_scale, self.b_scale),
                       self.scale_block)

    @property
    def rest(self) -> str:
        """The name after `<stack>.<layer>.`: the raw family (the whole name for non-layer tensors)."""
        p = self.placed
        return self.name[len(f"{p.stack}.{p.layer}."):] if p.stack is not None else self.name


@dataclass(frozen=True)
class Mismatch:
    name: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "reason": self.reason}


@dataclass(frozen=True)
class Matching:
    matched: list[Matched]
    only_in_a: list[str]
    only_in_b: list[str]
    mismatched: list[Mismatch]
    not_weights: list[str]  # in both, but no weight (dequantisation scales, buffers): compared through their weight


def _same_bytes(a: TensorInfo, b: TensorInfo) -> bool:
    try:
        sa, sb = os.stat(a.file), os.stat(b.file)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino) and a.start == b.start and a.dtype == b.dtype


def match(a_tensors: dict[str, TensorInfo], a_layout: Layout, b_tensors: dict[str, TensorInfo],
          b_layout: Layout) -> Matching:
    """Pair A's and B's tensors by name; say why the others are not compared."""
    pa, pb = placements(a_layout), placements(b_layout)
    matched: list[Matched] = []
    mismatched: list[Mismatch] = []
    not_weights: list[str] = []
    for name in sorted(set(a_tensors) & set(b_tensors)):
        ta, tb = a_tensors[name], b_tensors[name]
        where_a, where_b = pa.get(name), pb.get(name)
        if where_a is None or where_b is None:
            if where_a is None and where_b is None:
                not_weights.append(name)
            else:
                mismatched.append(Mismatch(name, f"a weight in {'B' if where_a is None else 'A'} only "
                                                 "(the other checkpoint uses it as a scale or buffer)"))
        elif ta.shape != tb.shape:
            mismatched.append(Mismatch(name, f"shape {list(ta.shape)} in A, {list(tb.shape)} in B"))
        elif not (ta.is_float and tb.is_float):
            mismatched.append(Mismatch(name, f"not floating point ({ta.dtype} in A, {tb.dtype} in B)"))
        elif where_a.refused or where_b.refused:
            mismatched.append(Mismatch(name, f"unreadable format: {where_a.refused or where_b.refused}"))
        elif where_a.scale and where_b.scale and where_a.scale_block != where_b.scale_block:
            mismatched.append(Mismatch(name, f"dequantised in blocks of {where_a.scale_block} in A, "
                                             f"{where_b.scale_block} in B"))
        else:
            scaled = where_a.scale is not None or where_b.scale is not None
            matched.append(Matched(name, where_a, ta, tb, where_a.scale, where_b.scale,
                                   where_a.scale_block or where_b.scale_block, not scaled and _same_bytes(ta, tb)))
    return Matching(matched, sorted(set(a_tensors) - set(b_tensors)), sorted(set(b_tensors) - set(a_tensors)),
                    mismatched, not_weights)
