"""Spectra of adjacent-layer residuals: spectral entropy, effective and stable rank.

For each 2-D family and adjacent pair (a = W_L, b = W_L+1) the residual of the
unit-norm matrices is

    D = b/|b| - a/|a|,   s = singular values of D,   p = s^2 / sum s^2,
    H = -sum p ln p (the seed's `spec_entropy`, p clipped to [1e-12, 1]),
    effective rank exp(H),   stable rank |D|_F^2 / |D|_2^2.

Exact mode ("gram") never forms D in memory and never runs an SVD. It streams
row blocks (or, for wide matrices, column blocks) of both layers, decodes them
to float64 and accumulates the d x d Gram matrix on the smaller side
d = min(rows, cols); the squared singular values of D are the eigenvalues of
D^T D (LAPACK's two-stage dsyev, see `syrk`). A first pass over the family's
layers gives their norms (float64 sums, as the chain pass's), so each pair's
blocks give D itself, formed in float64:

    |b| D = b - s a,   s = |b|/|a|,   D^T D += (1/|b|^2) X^T X   (X = b - s a, syrk)

one symmetric rank-k update per block (m d^2 flops per pair). The norms read
every layer once more (cheap next to the flops: ~1 ms per MB of bf16 here),
which halves the flops of the alternative without them (the quadratic
P(s) = (b - s a)^T (b - s a) from three accumulated Grams: 2.25x the syrk
work over a run of 5 layers, three d x d matrices instead of one). Forming
b - s a before any product keeps the relative accuracy when the layers are
nearly equal up to scale (1e-8 on the entropy at cos = 1 - 1e-9 in the
tests). Every layer is read three times: for its norm, as b, as a; the norms
and <a, b> are float64 sums, so the rank pass also gives the cosines and the
scale track of the families it covers, and those families skip the default
chain pass. The pass runs in this process, in pieces (a family's norms, then
each of its pairs), as many at once as there are cores and memory for the
largest, each on its own thread with one BLAS thread (the BLAS and kernel
calls release the GIL; one BLAS thread per piece loses no flops to
synchronisation, and keeps its speed when other work shares the machine);
one piece at a time gets all cores' BLAS threads. Threads rather than worker
processes: each process would hold its own base memory again.

Memory: one d x d float64 matrix per task (d = 2560: 52 MB), planned
against --max-memory up front. When it does not fit, `--rank-approx` switches
those families to a sketch ("sketch"): the same update applied to a
Gaussian test matrix O (cols x k) gives G O with G = D^T D, and the Nystrom
approximation G_hat = (G O)(O^T G O)^+ (G O)^T satisfies 0 <= G_hat <= G. Its
eigenvalues mu_i are therefore lower bounds of the true ones, the missing mass
r = |D|_F^2 - sum mu_i is known exactly (|D|_F^2 = 2 - 2 cos), and Ky Fan's
inequality bounds every partial sum of the true spectrum by the partial sums of
mu plus r. Among all spectra meeting these constraints the entropy is smallest
when r sits on the largest value and largest when r is water-filled over the
smallest ones: both extremes are computed and reported as a guaranteed interval
(`resid_rank_bounds`); the point value is its midpoint.

A zero residual (the layers are equal up to a positive factor, D = 0 exactly)
has no spectrum: entropy, effective and stable rank are reported as 0.0 with
`resid_rank_note`. 1-D families (norm weights, biases) get no rank (None), nor
do the all-experts aggregate families (their members get theirs).
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from ..checkpoint.reader import RAW_DTYPES, Reader
from ..errors import BudgetError
from ..layout import grid
from ..metrics.spectra import exact_stats, nystrom_lower, sketch_stats
from ..metrics.registry import EPS
from ..options import ScanOptions
from .budget import MiB, rss_bytes, usable_cpus
from .plan import Part, Plan, Segment, clip
from .syrk import Sketch, SyrkGram, blas_syrk, eig_copies, eigvalsh

# Decoded float64 bytes per layer block: large enough for efficient BLAS
# (>= 256 rows of inner dimension), small next to the Grams.
BLOCK_BYTES = 8 * MiB
MIN_BLOCK_ROWS = 64
# Rows decoded at once when walking a column block (bounds the mapped pages).
ROW_CHUNK = 256
SKETCH_MAX = 512  # default (largest) sketch size
SKETCH_MIN = 16
SLACK = 4 * MiB  # allocator slack and small temporaries, per task
HUGE_PAGE = 2 * MiB  # read buffers are whole 2 MiB pages (checkpoint/reader.py)
# What this process grows by between planning and the rank pass (imports, pools).
BASE_GROWTH = 12 * MiB

# --- planning ------------------------------------------------------------------


@dataclass(frozen=True)
class RankTask:
    """One family (part of a segment) followed through its run of layers."""

    seg: int
    part: int
    family: str
    stack: str
    m: int  # rows of the part's matrix
    n: int  # columns
    side: str  # "cols": G = D^T D from row blocks; "rows": G = D D^T from column blocks
    method: str  # "gram" | "sketch"
    k: int  # sketch columns (0 for gram)
    step: int  # rows (cols side) or columns (rows side) per block
    need: int  # bytes the task holds at its peak, beyond its process's base
    nbytes: int  # bytes one layer of the part occupies in the file
    delta: bool = False  # the spectrum of D = b - a itself (diff), not of the unit-norm residual

    @property
    def d(self) -> int:
        return min(self.m, self.n)

    @property
    def width(self) -> int:
        """Values in a row of its decoded blocks (columns of a row block, rows of a column block)."""
        return self.m if self.method == "gram" and self.side != "cols" else self.n


@dataclass
class RankPlan:
    tasks: list[RankTask]  # the longest first
    threads: int = 1  # BLAS threads of a task that runs alone
    concurrent: int = 1  # tasks at once, on threads, one BLAS thread each (when > 1)
    mode: str = "exact"

    @property
    def segments(self) -> set[int]:
        return {t.seg for t in self.tasks}

    def describe(self) -> dict[str, Any]:
        """The rank pass's settings, for the result document."""
        return {
            "mode": self.mode,
            "families": len(self.tasks),
            "gram": sum(t.method == "gram" for t in self.tasks),
            "sketch": sorted({t.k for t in self.tasks if t.method == "sketch"}),
            "tasks_at_once": self.concurrent,
            "blas_threads_per_task": self.threads if self.concurrent == 1 else 1,
            "largest_task_bytes": max((t.need for t in self.tasks), default=0),
        }

    def total_bytes(self, plan: Plan) -> int:
        """Progress units of a scan with this rank pass: the bytes of the chain
        pass's segments, plus what the rank pass decodes: every layer for its
        norm (not for a delta), and both layers of every pair."""
        done = self.segments
        chain = sum(t.nbytes for i, s in enumerate(plan.segments) if i not in done for t in s.tensors)
        return chain + sum(t.m * t.n * itemsize_of(plan.segments[t.seg]) * reads(t, len(plan.segments[t.seg].layers))
                           for t in self.tasks)


def reads(task: RankTask, layers: int) -> int:
    """Layers' worth of the part the task decodes over a run of `layers`."""
    return 2 * (layers - 1) + (0 if task.delta else layers)


def part_dims(seg: Segment, part: Part) -> tuple[int, int]:
    rows, cols = grid(seg.shape)
    m = sum(b - a for a, b in part.rows) if part.rows is not None else rows
    c0, c1 = part.cols or (0, cols)
    return m, c1 - c0


def itemsize_of(seg: Segment) -> int:
    return max(RAW_DTYPES[t.dtype].itemsize for t in seg.tensors)


def _gram_need(m: int, n: int, row_bytes: int, extra: int, room: int) -> tuple[str, int, int]:
    """(side, step, bytes) of the exact mode for an m x n part of a tensor whose
    rows take `row_bytes`, with `extra` d x d temporaries beside the Gram; blocks
    shrink (down to MIN_BLOCK_ROWS) when the default ones do not fit in `room`."""
    side, d, width = ("cols", n, n) if n <= m else ("rows", m, m)
    length = m if side == "cols" else n  # rows (or columns) to walk
    step = max(MIN_BLOCK_ROWS, min(length, BLOCK_BYTES // (8 * width)))
    grams = (1 + extra) * d * d * 8 + d * 8 * 160  # LAPACK's work: 105-136 d values
    while True:
        # Two decoded blocks, and two read buffers of whole rows (in 2 MiB pages).
        read = 2 * ((step if side == "cols" else ROW_CHUNK) * row_bytes + HUGE_PAGE)
        need = grams + 2 * step * width * 8 + read + SLACK
        if need <= room or step <= MIN_BLOCK_ROWS:
            return side, step, need
        step = max(MIN_BLOCK_ROWS, step // 2)


def _sketch_need(m: int, n: int, k: int, row_bytes: int, room: int) -> tuple[int, int]:
    """(step, bytes) of the sketch mode (always row blocks, G = D^T D, n x n)."""
    step = max(MIN_BLOCK_ROWS, min(m, BLOCK_BYTES // (8 * n)))
    # omega, the accumulator, a temporary, and Nystrom's (y_nu, b, svd work) at the end, with room
    arrays = 8 * n * k * 8 + 2 * k * k * 8
    while True:
        need = arrays + 2 * step * n * 8 + step * k * 8 + 2 * (step * row_bytes + HUGE_PAGE) + SLACK
        if need <= room or step <= MIN_BLOCK_ROWS:
            return step, need
        step = max(MIN_BLOCK_ROWS, step // 2)


def _fit_sketch(m: int, n: int, row_bytes: int, room: int, wanted: int) -> int:
    """The largest sketch (at most `wanted`, or SKETCH_MAX) that fits in `room`."""
    k = min(wanted or SKETCH_MAX, min(m, n))
    while k > SKETCH_MIN and _sketch_need(m, n, k, row_bytes, room)[1] > room:
        k = max(SKETCH_MIN, k * 3 // 4)
    return min(k, min(m, n))


def plan_rank(plan: Plan, options: ScanOptions, delta: bool = False) -> RankPlan:
    """Which families get a spectrum, how, and where, within --max-memory.

    Fails up front (BudgetError) when an exact spectrum cannot fit, saying
    what it needs and suggesting --rank-approx."""
    mode = options.rank
    if mode not in ("exact", "auto", "sketch"):
        raise ValueError(f"ScanOptions.rank must be 'exact', 'auto' or 'sketch', not {mode!r}")
    base = rss_bytes()
    budget = options.max_memory
    extra = eig_copies() + int(blas_syrk() is None)  # numpy's eigvalsh copy, matmul's temporary
    room = budget - base - BASE_GROWTH  # for the tasks, in this process
    rp = RankPlan([], mode=mode, threads=max(1, min(usable_cpus(), plan.jobs)))
    too_big: list[str] = []
    at_least = 0  # the --max-memory that would fit the largest of them
    for si, seg in enumerate(plan.segments):
        if len(seg.shape) < 2 or len(seg.layers) < 2:
            continue
        itemsize = itemsize_of(seg)
        row_bytes = grid(seg.shape)[1] * itemsize
        for pi, part in enumerate(seg.parts):
            m, n = part_dims(seg, part)
            if min(m, n) < 1:
                continue
            nbytes = m * n * itemsize
            side, step, need = _gram_need(m, n, row_bytes, extra, room)
            method, k = "gram", 0
            if mode == "sketch" or (need > room and mode == "auto"):
                method, side = "sketch", "cols"
                k = _fit_sketch(m, n, row_bytes, room, options.sketch)
                step, need = _sketch_need(m, n, k, row_bytes, room)
            if need > room:
                d = min(m, n)
                what = (f"a {d}x{d} float64 Gram matrix" if method == "gram"
                        else f"a sketch of {k} columns")
                too_big.append(
                    f"{part.family} ({m}x{n}) in {seg.stack} needs {what}: {-(-need // MiB)} MiB, "
                    f"and {max(room, 0) // MiB} MiB are left (this process uses {base // MiB} MiB)"
                )
                at_least = max(at_least, need + base + BASE_GROWTH)
                continue
            rp.tasks.append(RankTask(si, pi, part.family, seg.stack, m, n, side, method, k, step, need, nbytes,
                                     delta))
    if too_big:
        hint = f"; raise --max-memory to {-(-at_least // MiB)}M or more"
        if mode == "exact":
            hint += ", or use --rank-approx (a sketch with guaranteed error bounds where the Grams do not fit)"
        raise BudgetError(
            "max_memory",
            f"{budget // MiB} MiB is too small for the residual spectrum: {too_big[0]}"
            + (f" (and {len(too_big) - 1} more)" if len(too_big) > 1 else "")
            + hint,
        )
    # The longest first (syrk m n d flops per pair, the eigensolver about 3 d^3), as many
    # at once as the largest fits.
    rp.tasks.sort(key=lambda t: -(t.m * t.n * t.d + 3 * t.d**3))
    if rp.tasks:
        rp.concurrent = max(1, min(rp.threads, len(rp.tasks), room // max(t.need for t in rp.tasks)))
    return rp


# --- running -------------------------------------------------------------------


def _decode_rows(reader: Reader, seg: Segment, i: int, r0: int, r1: int, spans: list[tuple[int, int]],
                 c0: int, c1: int, out: np.ndarray) -> None:
    """Rows `spans` (within [r0, r1)), columns [c0, c1) of layer i's tensor into `out`, as values."""
    with reader.block(seg.tensors[i], r0, r1, seg.scales[i] if seg.scales else None, seg.scale_block) as block:
        block.decode(spans, c0, c1, out)


def layer_blocks(reader: Reader, seg: Segment, task: Any, i: int, buf: np.ndarray) -> Iterator[np.ndarray]:
    """Decoded float64 blocks of layer i's part: (rows x n) row blocks on the "cols"
    side, (m x cols) column blocks on the "rows" side. `task` gives part, side, step, m."""
    part = seg.parts[task.part]
    rows, cols = grid(seg.shape)
    c0, c1 = part.cols or (0, cols)
    if task.side == "cols":
        n = c1 - c0
        for r0 in range(0, rows, task.step):
            r1 = min(rows, r0 + task.step)
            spans = clip(part.rows, r0, r1)
            cnt = sum(b - a for a, b in spans)
            if cnt:
                _decode_rows(reader, seg, i, r0, r1, spans, c0, c1, buf[: cnt * n])
                yield buf[: cnt * n].reshape(cnt, n)
    else:
        for q0 in range(c0, c1, task.step):
            w = min(c1, q0 + task.step) - q0
            k = 0
            for r0 in range(0, rows, ROW_CHUNK):
                r1 = min(rows, r0 + ROW_CHUNK)
                spans = clip(part.rows, r0, r1)
                cnt = sum(b - a for a, b in spans)
                if cnt:
                    _decode_rows(reader, seg, i, r0, r1, spans, q0, q0 + w, buf[k : k + cnt * w])
                    k += cnt * w
            yield buf[: task.m * w].reshape(task.m, w)


def pair_blocks(reader: Reader, seg: Segment, task: Any, ia: int, ib: int, bufa: np.ndarray,
                bufb: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The same blocks of layers ia and ib, side by side."""
    yield from zip(layer_blocks(reader, seg, task, ia, bufa), layer_blocks(reader, seg, task, ib, bufb))


def _accumulator(task: RankTask) -> Any:
    """The task's accumulator of the Gram matrix (or its sketch)."""
    if task.method == "gram":
        return SyrkGram(task.d, task.side)
    return Sketch(task.n, task.k, task.step, seed=1_000_003 * task.n + task.k)


def task_norms(task: RankTask, seg: Segment, reader: Reader, progress: Callable[[int], None]) -> np.ndarray:
    """|W_L|^2 of the part in every layer: float64 sums over the decoded blocks."""
    norms = np.zeros(len(seg.layers))
    buf = np.empty(task.step * task.width)
    for i in range(len(seg.layers)):
        for x in layer_blocks(reader, seg, task, i, buf):
            norms[i] += float(np.dot(x.reshape(-1), x.reshape(-1)))
            progress(x.size * itemsize_of(seg))
    return norms


def run_pair(task: RankTask, seg: Segment, reader: Reader, i: int, na: float, nb: float,
             progress: Callable[[int], None]) -> tuple[float, dict[str, Any] | None]:
    """<a, b> and the spectrum of pair (i, i+1), from the squared norms na, nb (not
    used for a delta); see the module docstring. BLAS threads are the caller's to set."""
    # X = b - s a: |b| D for the residual (s = |b|/|a|), D itself for a delta (s = 1).
    if task.delta:
        s, alpha = 1.0, 1.0
    elif math.isfinite(na + nb) and math.sqrt(na) >= EPS and math.sqrt(nb) >= EPS:
        s, alpha = math.sqrt(nb / na), 1.0 / nb
    else:
        s = alpha = 0.0  # no spectrum: the cosine only
    acc = _accumulator(task) if alpha else None
    bufa, bufb = np.empty(task.step * task.width), np.empty(task.step * task.width)
    g = acc.zeros() if acc is not None else None
    nab = ndd = 0.0
    for xa, xb in pair_blocks(reader, seg, task, i, i + 1, bufa, bufb):
        fa, fb = xa.reshape(-1), xb.reshape(-1)
        nab += float(np.dot(fa, fb))
        if g is not None:
            np.multiply(xa, -s, out=xa)
            xa += xb
            acc.add(g, xa, alpha)
            if task.delta:
                ndd += float(np.dot(fa, fa))
        progress(2 * xa.size * itemsize_of(seg))
    del bufa, bufb
    if g is None or not math.isfinite(nab):
        return nab, None
    if task.delta:
        return nab, _delta_stats(task, acc, g, ndd)
    if task.method == "gram":
        return nab, exact_stats(eigvalsh(g)) | {"resid_rank_dim": task.d}
    total = max(2.0 - 2.0 * nab / math.sqrt(na * nb), 0.0)
    mu, nu = nystrom_lower(g, acc.omega)
    slack = nu + 64 * np.finfo(np.float64).eps * total
    return nab, sketch_stats(mu, total, task.d, task.k, slack) | {"resid_rank_dim": task.d}


def _delta_stats(task: RankTask, acc: Any, g: np.ndarray, total: float) -> dict[str, Any] | None:
    """The spectrum of D = b - a from G = D^T D (or its sketch) and |D|_F^2 = `total`."""
    if not math.isfinite(total):
        return None
    if total == 0.0:
        return exact_stats(np.zeros(1)) | {"resid_rank_dim": task.d}
    g *= 1.0 / total  # |D / |D||_F = 1: the spectrum's scale is irrelevant, its conditioning is not
    if task.method == "gram":
        return exact_stats(eigvalsh(g)) | {"resid_rank_dim": task.d}
    mu, nu = nystrom_lower(g, acc.omega)
    return sketch_stats(mu, 1.0, task.d, task.k, nu + 64 * np.finfo(np.float64).eps) | {"resid_rank_dim": task.d}


class _Stopped(Exception):
    """Another piece of the pass failed, or the pass was interrupted."""


def run_rank(plan: Plan, rp: RankPlan, progress: Callable[[int], None] | None = None
             ) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], dict[tuple[int, int, int], dict[str, Any]], dict[str, Any]]:
    """Run every task. Returns per segment (squared norms, dots) shaped like the
    chain pass's totals, the per-pair statistics keyed (segment, part, pair), and
    run figures.

    Work comes in pieces: every task's norms first, then its pairs, each pair on
    its own (given the norms they are independent), the longest first, so that
    `rp.concurrent` threads (one BLAS thread each; or one thread with all
    `rp.threads`) stay busy to the end. Each piece has its own Reader: in this
    process, threads share its memory, which worker processes would each hold again."""
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    totals = {
        si: (np.zeros((len(plan.segments[si].parts), len(plan.segments[si].layers))),
             np.zeros((len(plan.segments[si].parts), len(plan.segments[si].layers) - 1)))
        for si in rp.segments
    }
    ranks: dict[tuple[int, int, int], dict[str, Any]] = {}
    lock, stop = threading.Lock(), threading.Event()
    mapped = [0]  # bytes the pieces' readers handed out (whole rows of a fused part, every column block's rows)

    def report(n: int) -> None:  # called per block: also where a piece learns to stop
        if stop.is_set():
            raise _Stopped
        if progress is not None:
            with lock:
                progress(n)

    def piece(i: int, j: int) -> tuple[int, int, Any]:
        """Task i's norms (j < 0) or its pair j."""
        t, reader = rp.tasks[i], Reader()
        seg, norms = plan.segments[t.seg], totals[t.seg][0][t.part]
        try:
            with np.errstate(all="ignore"):  # inf/NaN weights: reported, not warned about
                if j < 0:
                    return i, j, task_norms(t, seg, reader, report)
                return i, j, run_pair(t, seg, reader, j, norms[j], norms[j + 1], report)
        finally:
            with lock:
                mapped[0] += reader.bytes_mapped
            reader.close()

    def run(ex: ThreadPoolExecutor, pieces: list[tuple[int, int]]) -> Iterator[tuple[int, int, Any]]:
        futures = [ex.submit(piece, i, j) for i, j in pieces]
        try:
            for fut in as_completed(futures):
                yield fut.result()
        except BaseException:
            stop.set()
            for fut in futures:
                fut.cancel()
            raise

    layers = [len(plan.segments[t.seg].layers) for t in rp.tasks]
    with threadpool_limits(1 if rp.concurrent > 1 else rp.threads), ThreadPoolExecutor(rp.concurrent) as ex:
        for i, _, norms in run(ex, [(i, -1) for i, t in enumerate(rp.tasks) if not t.delta]):
            totals[rp.tasks[i].seg][0][rp.tasks[i].part] = norms
        for i, j, (dot, st) in run(ex, [(i, j) for i in range(len(rp.tasks)) for j in range(layers[i] - 1)]):
            t = rp.tasks[i]
            totals[t.seg][1][t.part][j] = dot
            if st is not None:
                ranks[(t.seg, t.part, j)] = st
    decoded = sum(t.m * t.n * itemsize_of(plan.segments[t.seg]) * reads(t, n) for t, n in zip(rp.tasks, layers))
    return totals, ranks, {"rank_seconds": time.perf_counter() - started, "rank_bytes_decoded": decoded,
                           "rank_bytes_mapped": mapped[0]}
