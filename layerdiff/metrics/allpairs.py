"""All pairs: the L x L cosine matrix of every family, from the multi-stream pass's inner products.

The adjacent entries are the same numbers the adjacent-pair metrics use (the
chain totals are read off the same matrix), so they agree exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from ..engine.plan import Plan
from ..layout import Layout
from ..result import StackResult
from .registry import EPS


def chain_totals(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(squared norms, adjacent inner products) per part, read off K x K inner products."""
    k = g.shape[1]
    return g[:, range(k), range(k)].copy(), g[:, range(k - 1), range(1, k)].copy()


def cosine_matrix(g: np.ndarray) -> list[list[float | None]]:
    """<Wi, Wj> / (|Wi| |Wj|); None where a norm is zero or a value is not finite."""
    d = np.diag(g)
    out: list[list[float | None]] = []
    for i in range(len(d)):
        row: list[float | None] = []
        for j in range(len(d)):
            ok = math.isfinite(g[i, j]) and math.isfinite(d[i] * d[j]) and min(d[i], d[j]) >= EPS * EPS
            row.append(float(g[i, j] / math.sqrt(d[i] * d[j])) if ok else None)
        out.append(row)
    return out


def with_all_pairs(st: StackResult, layout: Layout, plan: Plan, grams: list[tuple[np.ndarray, np.ndarray]],
                   gram_mats: dict[tuple[int, int], list[list[float | None]]] | None = None,
                   gram_left_out: dict[tuple[str, str], str] | None = None) -> StackResult:
    """The stack's result with `all_pairs[family] = {"layers", "cos"}` (all-experts families summed),
    and with --gram `"gram_cos"` (or `"gram_cos_left_out"`: why not) for the families that have a role."""
    per: dict[str, tuple[list[int], np.ndarray]] = {}
    for seg, (g, _) in zip(plan.segments, grams):
        if seg.stack != st.name:
            continue
        for p, part in enumerate(seg.parts):
            layers = list(seg.layers)
            if part.family in per:  # a second run of layers (a shape change between): a block of its own
                old_layers, old = per[part.family]
                merged = old_layers + layers
                m = np.full((len(merged), len(merged)), np.nan)
                m[: len(old_layers), : len(old_layers)] = old
                m[len(old_layers):, len(old_layers):] = g[p]
                per[part.family] = (merged, m)
            else:
                per[part.family] = (layers, g[p])
    for agg, members in layout.stacks[st.name].aggregates.items():
        if all(f in per for f in members) and len({tuple(per[f][0]) for f in members}) == 1:
            per[agg] = (per[members[0]][0], sum(per[f][1] for f in members))
    out: dict[str, dict[str, Any]] = {
        f: {"layers": per[f][0], "cos": cosine_matrix(per[f][1])} for f in st.families if f in per}
    for (si, p), matrix in (gram_mats or {}).items():
        seg = plan.segments[si]
        fam = seg.parts[p].family
        if seg.stack == st.name and fam in out and out[fam]["layers"] == list(seg.layers):
            out[fam]["gram_cos"] = matrix
    for (stack, fam), why in (gram_left_out or {}).items():
        if stack == st.name and fam in out:
            out[fam]["gram_cos_left_out"] = why
    return dataclasses.replace(st, all_pairs=out)
