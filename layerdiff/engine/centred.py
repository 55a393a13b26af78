"""The centred Gram cosine pass: how alike two layers are up to a permutation or rotation
of their non-residual side (heads, hidden units), exactly, in float64.

For a family that reads the residual stream (q/k/v, gate/up, router) its Gram
on the residual side is G = W^T W; for one that writes it (o, down), G = W W^T
(the other way round for weights stored [in, out], as GPT-2's Conv1D). The
role comes from the architecture tables, never from the shapes.
Centred, G~ = G - (tr G / n) I with n the residual dimension, and

    gram_cos = <G~a, G~b> / (|G~a| |G~b|),   <G~a, G~b> = <Ga, Gb> - tr Ga tr Gb / n,
    |G~a|^2 = |Ga|^2 - (tr Ga)^2 / n,         tr G = |W|_F^2.

Only d x d products on the smaller side d = min(rows, cols) are accumulated:
S = X^T X from row blocks (d = cols) or X X^T from column blocks (d = rows).
When the smaller side is the residual side, <Ga, Gb> = <Sa, Sb>; otherwise
<Ga, Gb> = |Sab|^2 with the cross product Sab of the two layers (Wa Wb^T or
Wa^T Wb), and |Ga| = |Sa| either way (the two Grams share their non-zero
eigenvalues). Pairs are walked as the rank pass walks them (each layer read
as b, then as a of the next pair; S of b carried), so a family costs two or
three d x d matrices and O(rows cols d) flops per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..checkpoint.reader import Reader
from ..errors import BudgetError
from ..layout import Layout
from ..options import ScanOptions
from . import pool
from .budget import MiB, rss_bytes, usable_cpus
from .gram import (BASE_GROWTH, BLOCK_BYTES, MIN_BLOCK_ROWS, ROW_CHUNK, SLACK, itemsize_of, layer_blocks,
                   pair_blocks, part_dims)
from .plan import Plan, Segment
from .syrk import SyrkGram


@dataclass(frozen=True)
class CentredTask:
    """One family (part of a segment) of known role, through its run of layers."""

    seg: int
    part: int
    family: str
    m: int
    n: int
    side: str  # "cols": S = X^T X from row blocks (d = n); "rows": S = X X^T from column blocks (d = m)
    residual: str  # the residual side: "cols" (reads) or "rows" (writes)
    step: int
    need: int

    @property
    def d(self) -> int:
        return min(self.m, self.n)

    @property
    def cross(self) -> bool:
        return self.side != self.residual


@dataclass
class CentredPlan:
    tasks: list[CentredTask]
    jobs: int
    left_out: dict[tuple[str, str], str]  # (stack, family) -> why it has no gram_cos
    # All pairs (with all_pairs): tasks on the residual side that keep every layer's Gram,
    # and the families whose L Grams do not fit, with the size they need.
    matrix_tasks: list[CentredTask] = field(default_factory=list)
    matrix_left_out: dict[tuple[str, str], str] = field(default_factory=dict)

    def total_bytes(self, plan: Plan) -> int:
        """Progress units: both layers of every pair, decoded."""
        return sum(task_bytes(t, plan.segments[t.seg]) for t in self.tasks)

    def describe(self) -> dict[str, Any]:
        return {"families": len(self.tasks), "workers": self.jobs,
                "left_out": {f"{s} {f}": why for (s, f), why in self.left_out.items()},
                "all_pairs_left_out": {f"{s} {f}": why for (s, f), why in self.matrix_left_out.items()}}


def task_bytes(t: CentredTask, seg: Segment) -> int:
    return 2 * t.m * t.n * itemsize_of(seg) * (len(seg.layers) - 1)


def _need(m: int, n: int, side: str, cross: bool, itemsize: int) -> tuple[int, int]:
    width = n if side == "cols" else m
    length = m if side == "cols" else n
    d = min(m, n)
    step = max(MIN_BLOCK_ROWS, min(length, BLOCK_BYTES // (8 * width)))
    mats = (3 if cross else 2) * d * d * 8 + (d * d * 8 if cross else 0)  # S_a, S_b (, S_ab and its temporary)
    pages = 2 * step * (n * itemsize + 4096) if side == "cols" else 2 * ROW_CHUNK * (step * itemsize + 2 * 4096)
    return step, mats + 2 * step * width * 8 + pages + SLACK


def plan_centred(plan: Plan, layout: Layout, options: ScanOptions) -> CentredPlan:
    """Every 2-D family with a role gets a task; fails up front if one cannot fit."""
    base = rss_bytes()
    room = options.max_memory - base - BASE_GROWTH
    share = (options.max_memory - base * (plan.jobs + 1)) // plan.jobs if plan.jobs > 1 else 0
    tasks: list[CentredTask] = []
    left_out: dict[tuple[str, str], str] = {}
    for si, seg in enumerate(plan.segments):
        if len(seg.shape) < 2 or len(seg.layers) < 2:
            continue
        for pi, part in enumerate(seg.parts):
            role = layout.stacks[seg.stack].role(part.family) if seg.stack in layout.stacks else None
            if role not in ("reads", "writes"):
                left_out[(seg.stack, part.family)] = "no role in the architecture tables: the residual side is unknown"
                continue
            m, n = part_dims(seg, part)
            side = "cols" if n <= m else "rows"
            # nn.Linear stores [out, in]: a reader's input (the residual stream) is its columns;
            # a Conv1D weight stored [in, out] (GPT-2) has it the other way round.
            flipped = seg.raw in layout.stacks[seg.stack].transposed
            residual = "cols" if (role == "reads") != flipped else "rows"
            step, need = _need(m, n, side, side != residual, itemsize_of(seg))
            if need > room:
                raise BudgetError("max_memory", f"{options.max_memory // MiB} MiB is too small for gram_cos of "
                                                f"{part.family} ({m}x{n}) in {seg.stack}: it needs {-(-need // MiB)} MiB "
                                                f"and {max(room, 0) // MiB} MiB are left")
            tasks.append(CentredTask(si, pi, part.family, m, n, side, residual, step, need))
    jobs = plan.jobs if plan.jobs > 1 and all(t.need <= share for t in tasks) else 1
    cp = CentredPlan(tasks, jobs, left_out)
    if options.all_pairs:
        for t in tasks:
            seg = plan.segments[t.seg]
            d = t.n if t.residual == "cols" else t.m
            step, need = _need(t.m, t.n, t.residual, False, itemsize_of(seg))
            need += (len(seg.layers) - 1) * d * d * 8  # every layer's Gram kept
            if need <= room:
                cp.matrix_tasks.append(CentredTask(t.seg, t.part, t.family, t.m, t.n, t.residual, t.residual, step,
                                                   need))
            else:
                cp.matrix_left_out[(seg.stack, t.family)] = (
                    f"the L x L gram_cos needs {len(seg.layers)} Grams of {d}x{d}: {-(-need // MiB)} MiB, "
                    f"more than the {max(room, 0) // MiB} MiB left of --max-memory")
    return cp


def _sym_dot(a: np.ndarray, b: np.ndarray) -> float:
    """<A, B>_F of two symmetric matrices of which only the upper triangles are set."""
    total = float(np.dot(np.diagonal(a), np.diagonal(b)))
    for i in range(a.shape[0] - 1):
        total += 2.0 * float(np.dot(a[i, i + 1:], b[i, i + 1:]))
    return total


def gram_cos(inner: float, sq_a: float, sq_b: float, tr_a: float, tr_b: float, n: int) -> float | None:
    """The centred Gram cosine from <Ga, Gb>, |Ga|^2, |Gb|^2, tr Ga, tr Gb and the residual dimension."""
    num = inner - tr_a * tr_b / n
    den_a, den_b = sq_a - tr_a * tr_a / n, sq_b - tr_b * tr_b / n
    if not all(math.isfinite(x) for x in (num, den_a, den_b)) or den_a <= 0 or den_b <= 0:
        return None
    return max(-1.0, min(1.0, num / math.sqrt(den_a * den_b)))


def run_task(task: CentredTask, seg: Segment, reader: Reader) -> list[float | None]:
    """gram_cos of every adjacent pair of the task's run of layers."""
    acc = SyrkGram(task.d, task.side)
    width = task.n if task.side == "cols" else task.m
    bufa, bufb = np.empty(task.step * width), np.empty(task.step * width)
    tmp = np.empty((task.d, task.d)) if task.cross else None
    n_res = task.n if task.residual == "cols" else task.m
    out: list[float | None] = []
    sa: np.ndarray | None = None
    sq_a = 0.0
    for i in range(len(seg.layers) - 1):
        first = sa is None
        if sa is None:
            sa = acc.zeros()
        sb = acc.zeros()
        sab = acc.zeros() if task.cross else None
        tr_a = tr_b = 0.0
        for xa, xb in pair_blocks(reader, seg, task, i, i + 1, bufa, bufb):  # type: ignore[arg-type]
            if first:
                acc.add(sa, xa)
            acc.add(sb, xb)
            fa, fb = xa.reshape(-1), xb.reshape(-1)
            tr_a += float(np.dot(fa, fa))
            tr_b += float(np.dot(fb, fb))
            if sab is not None and tmp is not None:
                np.matmul(xa.T, xb, out=tmp) if task.side == "cols" else np.matmul(xa, xb.T, out=tmp)
                sab += tmp
        if first:
            sq_a = _sym_dot(sa, sa)
        sq_b = _sym_dot(sb, sb)
        inner = float(np.dot(sab.reshape(-1), sab.reshape(-1))) if sab is not None else _sym_dot(sa, sb)
        out.append(gram_cos(inner, sq_a, sq_b, tr_a, tr_b, n_res))
        sa, sq_a = sb, sq_b
    acc.close()
    return out


def gram_matrix(task: CentredTask, seg: Segment, reader: Reader) -> list[list[float | None]]:
    """gram_cos of every pair of layers: each layer's residual-side Gram kept (planned to fit)."""
    acc = SyrkGram(task.d if task.side == task.residual else max(task.m, task.n), task.side)
    d = acc.d
    width = task.n if task.side == "cols" else task.m
    buf = np.empty(task.step * width)
    grams = np.zeros((len(seg.layers), d, d))
    traces = np.zeros(len(seg.layers))
    lower = np.tril_indices(d, -1)
    for i in range(len(seg.layers)):
        for x in layer_blocks(reader, seg, task, i, buf):
            acc.add(grams[i], x)
            traces[i] += float(np.dot(x.reshape(-1), x.reshape(-1)))
        grams[i][lower] = grams[i].T[lower]  # syrk fills the upper triangle
    flat = grams.reshape(len(seg.layers), -1)
    inner = flat @ flat.T
    return [[gram_cos(float(inner[i, j]), float(inner[i, i]), float(inner[j, j]), traces[i], traces[j], d)
             for j in range(len(seg.layers))] for i in range(len(seg.layers))]


def _pool_run(i: int) -> tuple[int, list[float | None], int]:
    segments, tasks = pool.STATE["payload"]
    reader = pool.STATE["reader"]
    before = reader.bytes_mapped
    with np.errstate(all="ignore"):
        values = run_task(tasks[i], segments[tasks[i].seg], reader)
    return i, values, reader.bytes_mapped - before


def run_centred(plan: Plan, cp: CentredPlan, progress: Callable[[int], None] | None = None
                ) -> tuple[dict[tuple[int, int, int], dict[str, Any]], int]:
    """gram_cos per (segment, part, pair), and the bytes the pass's readers handed out."""
    out: dict[tuple[int, int, int], dict[str, Any]] = {}
    mapped = 0
    # One task at a time in this process: all cores' BLAS threads on it; in workers, one each.
    threads = 1 if cp.jobs > 1 else usable_cpus()
    for i, values, nbytes in pool.run(_pool_run, range(len(cp.tasks)), cp.jobs, pool.init_state,
                                      ((plan.segments, cp.tasks), threads)):
        t = cp.tasks[i]
        mapped += nbytes
        for j, v in enumerate(values):
            out[(t.seg, t.part, j)] = {"gram_cos": v}
        if progress is not None:
            progress(task_bytes(t, plan.segments[t.seg]))
    return out, mapped


def run_matrices(plan: Plan, cp: CentredPlan) -> tuple[dict[tuple[int, int], list[list[float | None]]], int]:
    """The L x L gram_cos of every family that fits, one at a time in this process (all cores' BLAS),
    and the bytes its reader handed out."""
    out: dict[tuple[int, int], list[list[float | None]]] = {}
    pool.init_state(None, blas_threads=usable_cpus())
    try:
        reader = pool.STATE["reader"]
        for t in cp.matrix_tasks:
            with np.errstate(all="ignore"):
                out[(t.seg, t.part)] = gram_matrix(t, plan.segments[t.seg], reader)
        mapped = reader.bytes_mapped
    finally:
        pool.close_state()
    return out, mapped
