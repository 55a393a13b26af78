"""Spectra of adjacent-layer residuals: spectral entropy, effective and stable rank.

For each 2-D family and adjacent pair (a = W_L, b = W_L+1) the residual of the
unit-norm matrices is

    D = b/|b| - a/|a|,   s = singular values of D,   p = s^2 / sum s^2,
    H = -sum p ln p (the seed's `spec_entropy`, p clipped to [1e-12, 1]),
    effective rank exp(H),   stable rank |D|_F^2 / |D|_2^2.

Exact mode ("gram") never forms D in memory and never runs an SVD. It streams
row blocks (or, for wide matrices, column blocks) of both layers through the
memory maps, decodes them to float64 and accumulates d x d Gram matrices on the
smaller side d = min(rows, cols); the squared singular values of D are the
eigenvalues of D^T D (`numpy.linalg.eigvalsh`). The norms are not known while
a pair streams, so D^T D is recovered from three Grams of the quadratic
P(s) = (b - s a)^T (b - s a):

    P(0)  = b^T b          accumulated (and carried: it is a^T a of the next pair)
    P(s2) = (b - s2 a)^T (b - s2 a)   accumulated, s2 = a guess of |b|/|a|
    a^T a                  carried from the previous pair (accumulated for the first)

    |b|^2 D^T D = P(s*) = (s*/s2) P(s2) - ((s* - s2)/s2) P(0) + s*(s* - s2) a^T a,
    s* = |b|/|a|, known at the end of the pair.

Two symmetric rank-k updates (BLAS syrk) per block instead of a general product
a^T b plus one syrk: 2/3 of the flops. The guess s2 is the norm ratio of the
pair's first block; the terms that cancel in the end are scaled by its relative
miss, and when the layers are nearly equal up to scale (the case where
cancellation would hurt) the first block's ratio is right to about |D|, while
P(s2) is formed from the small difference b - s2 a directly: the result keeps
its relative accuracy (1e-8 on the entropy at cos = 1 - 1e-9 in the tests).
Every layer is read twice (as b, then as a); the norms and <a, b> come from the
same pass in float64, so the rank pass also gives the cosines and the scale
track of the families it covers, and those families skip the default chain
pass. A task that needs most of the budget runs in this process with all
cores' BLAS threads (2 threads: syrk 1.9x, eigvalsh 1.9x faster on an idle
2-vCPU machine; on a machine busy with other work, threads lose); small
families run in worker processes, one BLAS thread each.

Memory: three d x d float64 matrices per task (d = 2560: 157 MB), planned
against --max-memory up front. When they do not fit, `--rank-approx` switches
those families to a sketch ("sketch"): the same three quadratics applied to a
Gaussian test matrix O (cols x k) give G O with G = D^T D, and the Nystrom
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

import ctypes
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from ..checkpoint.reader import RAW_DTYPES, Reader
from ..errors import BudgetError
from ..layout import grid
from ..metrics.spectra import exact_stats, nystrom_lower, sketch_stats
from ..metrics.registry import EPS
from ..options import ScanOptions
from . import pool
from .budget import MiB, rss_bytes, usable_cpus
from .plan import Part, Plan, Segment, clip

# Decoded float64 bytes per layer block: large enough for efficient BLAS
# (>= 256 rows of inner dimension), small next to the Grams.
BLOCK_BYTES = 8 * MiB
MIN_BLOCK_ROWS = 64
# Rows decoded at once when walking a column block (bounds the mapped pages).
ROW_CHUNK = 256
SKETCH_MAX = 512  # default (largest) sketch size
SKETCH_MIN = 16
SLACK = 4 * MiB  # allocator slack and small temporaries, per task
COMBINE_CHUNK = 1 << 17  # values per temporary when combining the Grams
# What this process grows by between planning and the rank pass (imports, pools).
BASE_GROWTH = 12 * MiB

# --- Gram accumulation ---------------------------------------------------------

_SYRK: list[Any] = []  # [function or None], resolved once per process


def _blas_syrk() -> Any:
    """cblas_dsyrk (64-bit integers) from the OpenBLAS numpy already loaded, or None.

    numpy has no syrk that adds into an existing matrix: `G += X.T @ X` costs a
    d x d temporary and a pass over it. The direct call is checked against numpy
    on first use; anything unexpected falls back to numpy."""
    if _SYRK:
        return _SYRK[0]
    fn = None
    try:
        from threadpoolctl import threadpool_info

        for info in threadpool_info():
            if info.get("internal_api") != "openblas":
                continue
            lib = ctypes.CDLL(info["filepath"])
            for name in ("scipy_cblas_dsyrk64_", "cblas_dsyrk64_"):
                f = getattr(lib, name, None)
                if f is not None:
                    f.restype = None
                    f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                  ctypes.c_double, ctypes.c_void_p, ctypes.c_int64, ctypes.c_double,
                                  ctypes.c_void_p, ctypes.c_int64]
                    fn = f
                    break
            if fn is not None:
                break
        if fn is not None:
            x = np.random.default_rng(0).standard_normal((7, 5))
            g = np.ones((5, 5))
            _call_syrk(fn, g, x, True)
            want = np.ones((5, 5)) + x.T @ x
            y = np.ascontiguousarray(x.T)
            g2 = np.ones((5, 5))
            _call_syrk(fn, g2, y, False)
            iu = np.triu_indices(5)
            if not (np.allclose(g[iu], want[iu], rtol=1e-12) and np.allclose(g2[iu], want[iu], rtol=1e-12)):
                fn = None
    except Exception:  # noqa: BLE001 - any trouble: use numpy
        fn = None
    _SYRK.append(fn)
    return fn


def _call_syrk(fn: Any, g: np.ndarray, x: np.ndarray, trans: bool) -> None:
    """Upper triangle (row-major) of g += x^T x (trans) or x x^T; x C-contiguous."""
    d = g.shape[0]
    k = x.shape[0] if trans else x.shape[1]
    fn(101, 121, 112 if trans else 111, d, k, 1.0, x.ctypes.data, x.shape[1], 1.0, g.ctypes.data, d)


class SyrkGram:
    """G += X^T X for blocks X (exact mode); only the upper triangle is meaningful."""

    def __init__(self, d: int, side: str) -> None:
        self.d = d
        self.trans = side == "cols"  # blocks are (rows x d); else (d x cols)
        self.fn = _blas_syrk()
        self.tmp = None if self.fn is not None else np.empty((d, d))

    def zeros(self) -> np.ndarray:
        return np.zeros((self.d, self.d))

    def add(self, g: np.ndarray, x: np.ndarray) -> None:
        if self.fn is not None:
            _call_syrk(self.fn, g, x, self.trans)
        else:
            np.matmul(x.T, x, out=self.tmp) if self.trans else np.matmul(x, x.T, out=self.tmp)
            g += self.tmp

    def close(self) -> None:
        self.tmp = None


class _Sketch:
    """Y += X^T (X Omega) for row blocks X (sketch mode): Y = G Omega in the end."""

    def __init__(self, n: int, k: int, rows: int, seed: int) -> None:
        self.n, self.k = n, k
        self.omega = np.random.default_rng(seed).standard_normal((n, k))
        self.xo = np.empty(rows * k)
        self.tmp = np.empty((n, k))

    def zeros(self) -> np.ndarray:
        return np.zeros((self.n, self.k))

    def add(self, y: np.ndarray, x: np.ndarray) -> None:
        xo = self.xo[: x.shape[0] * self.k].reshape(x.shape[0], self.k)
        np.matmul(x, self.omega, out=xo)
        np.matmul(x.T, xo, out=self.tmp)
        y += self.tmp

    def close(self) -> None:
        self.tmp = self.xo = None


def _combine(ps: np.ndarray, p0: np.ndarray, ata: np.ndarray, s2: float, s: float, scale: float) -> np.ndarray:
    """In place on ps: scale * P(s) from P(s2), P(0) and a^T a (see the module docstring)."""
    c_ps = s / s2 * scale
    c_p0 = -(s - s2) / s2 * scale
    c_a = s * (s - s2) * scale
    step = max(1, COMBINE_CHUNK // max(ps.shape[1], 1))
    tmp = np.empty((min(step, ps.shape[0]), ps.shape[1]))
    for i0 in range(0, ps.shape[0], step):
        i1 = min(ps.shape[0], i0 + step)
        rows = ps[i0:i1]
        rows *= c_ps
        if c_p0 != 0.0:
            t = tmp[: i1 - i0]
            np.multiply(p0[i0:i1], c_p0, out=t)
            rows += t
            np.multiply(ata[i0:i1], c_a, out=t)
            rows += t
    return ps


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


@dataclass
class RankPlan:
    tasks: list[RankTask]
    pooled: list[int] = field(default_factory=list)  # run in `jobs` worker processes
    inproc: list[int] = field(default_factory=list)  # run one at a time in this process
    jobs: int = 1
    threads: int = 1  # BLAS threads for the in-process accumulation
    mode: str = "exact"

    @property
    def segments(self) -> set[int]:
        return {t.seg for t in self.tasks}

    def total_bytes(self, plan: Plan) -> int:
        """Progress units of a scan with this rank pass: the bytes of the chain
        pass's segments, plus both layers of every pair the rank pass decodes."""
        done = self.segments
        chain = sum(t.nbytes for i, s in enumerate(plan.segments) if i not in done for t in s.tensors)
        itemsize = {t.seg: itemsize_of(plan.segments[t.seg]) for t in self.tasks}
        return chain + sum(
            2 * t.m * t.n * itemsize[t.seg] * (len(plan.segments[t.seg].layers) - 1) for t in self.tasks
        )


def part_dims(seg: Segment, part: Part) -> tuple[int, int]:
    rows, cols = grid(seg.shape)
    m = sum(b - a for a, b in part.rows) if part.rows is not None else rows
    c0, c1 = part.cols or (0, cols)
    return m, c1 - c0


def itemsize_of(seg: Segment) -> int:
    return max(RAW_DTYPES[t.dtype].itemsize for t in seg.tensors)


def _gram_need(m: int, n: int, itemsize: int, fast: bool, room: int, delta: bool = False) -> tuple[str, int, int]:
    """(side, step, bytes) of the exact mode for an m x n part; blocks shrink
    (down to MIN_BLOCK_ROWS) when the default ones do not fit in `room`."""
    side, d, width = ("cols", n, n) if n <= m else ("rows", m, m)
    length = m if side == "cols" else n  # rows (or columns) to walk
    step = max(MIN_BLOCK_ROWS, min(length, BLOCK_BYTES // (8 * width)))
    grams = (1 if delta else 3) * d * d * 8 + (0 if fast else d * d * 8)
    while True:
        blocks = 2 * step * width * 8
        if side == "cols":  # mapped pages of two row blocks
            pages = 2 * step * (n * itemsize + 4096)
        else:  # a chunk of rows, a column block wide, at page granularity
            pages = 2 * ROW_CHUNK * (step * itemsize + 2 * 4096)
        need = grams + blocks + pages + 8 * COMBINE_CHUNK + d * 8 * 64 + SLACK
        if need <= room or step <= MIN_BLOCK_ROWS:
            return side, step, need
        step = max(MIN_BLOCK_ROWS, step // 2)


def _sketch_need(m: int, n: int, k: int, itemsize: int, room: int) -> tuple[int, int]:
    """(step, bytes) of the sketch mode (always row blocks, G = D^T D, n x n)."""
    step = max(MIN_BLOCK_ROWS, min(m, BLOCK_BYTES // (8 * n)))
    # omega, three accumulators, a temporary, and Nystrom's (y_nu, b, svd work) at the end
    arrays = 8 * n * k * 8 + 2 * k * k * 8
    while True:
        need = arrays + 2 * step * n * 8 + step * k * 8 + 2 * step * (n * itemsize + 4096) + SLACK
        if need <= room or step <= MIN_BLOCK_ROWS:
            return step, need
        step = max(MIN_BLOCK_ROWS, step // 2)


def _fit_sketch(m: int, n: int, itemsize: int, room: int, wanted: int) -> int:
    """The largest sketch (at most `wanted`, or SKETCH_MAX) that fits in `room`."""
    k = min(wanted or SKETCH_MAX, min(m, n))
    while k > SKETCH_MIN and _sketch_need(m, n, k, itemsize, room)[1] > room:
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
    cpus = usable_cpus()
    jobs = plan.jobs  # what the chain pass chose within the budget
    budget = options.max_memory
    fast = _blas_syrk() is not None
    solo_room = budget - base - BASE_GROWTH  # one task in this process, no workers alive
    share = (budget - base * (jobs + 1)) // jobs if jobs > 1 else 0  # one task per worker
    rp = RankPlan([], jobs=jobs, mode=mode, threads=min(cpus, jobs) if jobs > 0 else 1)
    too_big: list[str] = []
    at_least = 0  # the --max-memory that would fit the largest of them
    for si, seg in enumerate(plan.segments):
        if len(seg.shape) < 2 or len(seg.layers) < 2:
            continue
        itemsize = itemsize_of(seg)
        for pi, part in enumerate(seg.parts):
            m, n = part_dims(seg, part)
            if min(m, n) < 1:
                continue
            nbytes = m * n * itemsize
            side, step, need = _gram_need(m, n, itemsize, fast, solo_room, delta)
            method, k = "gram", 0
            if mode == "sketch" or (need > solo_room and mode == "auto"):
                method, side = "sketch", "cols"
                room = max(share, solo_room) if mode == "sketch" else solo_room
                k = _fit_sketch(m, n, itemsize, room, options.sketch)
                step, need = _sketch_need(m, n, k, itemsize, room)
            if need > solo_room:
                d = min(m, n)
                what = (f"three {d}x{d} float64 Gram matrices" if method == "gram"
                        else f"a sketch of {k} columns")
                too_big.append(
                    f"{part.family} ({m}x{n}) in {seg.stack} needs {what}: {-(-need // MiB)} MiB, "
                    f"and {max(solo_room, 0) // MiB} MiB are left (this process uses {base // MiB} MiB)"
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
    order = sorted(range(len(rp.tasks)), key=lambda i: -rp.tasks[i].need)
    for i in order:
        if jobs > 1 and rp.tasks[i].need <= share:
            rp.pooled.append(i)
        else:
            rp.inproc.append(i)
    if not rp.pooled:
        rp.jobs = 1
    return rp


# --- running -------------------------------------------------------------------


@dataclass
class TaskResult:
    norms: np.ndarray  # |W_L|^2 for each layer of the run
    dots: np.ndarray  # <W_L, W_L+1>
    stats: list[dict[str, Any] | None]  # per pair
    nbytes: int  # bytes decoded
    mapped: int = 0  # bytes the reader handed out (whole rows of a fused part, every column block's rows)


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


def run_task(task: RankTask, seg: Segment, reader: Reader, threads: int = 1,
             progress: Callable[[int], None] | None = None) -> TaskResult:
    """Follow one family through its layers, pair by pair (see the module docstring)."""
    from threadpoolctl import threadpool_limits

    n_layers = len(seg.layers)
    norms = np.zeros(n_layers)
    dots = np.zeros(n_layers - 1)
    stats: list[dict[str, Any] | None] = [None] * (n_layers - 1)
    itemsize = itemsize_of(seg)
    if task.method == "gram":
        acc: Any = SyrkGram(task.d, task.side)
        width = task.n if task.side == "cols" else task.m
    else:
        acc = _Sketch(task.n, task.k, task.step, seed=1_000_003 * task.n + task.k)
        width = task.n
    bufa = np.empty(task.step * width)
    bufb = np.empty(task.step * width)
    carry: np.ndarray | None = None
    s2 = 1.0  # guess of |b|/|a|
    nbytes = 0
    before = reader.bytes_mapped
    delta = task.delta  # D = b - a: one accumulator, no guess, no normalisation
    for i in range(n_layers - 1):
        ps = acc.zeros()
        ata = ps if delta else acc.zeros() if carry is None else carry
        first = carry is None and not delta
        carry = None
        p0 = ps if delta else acc.zeros()
        na = nb = nab = ndd = 0.0
        guessed = delta
        with threadpool_limits(threads):
            for xa, xb in pair_blocks(reader, seg, task, i, i + 1, bufa, bufb):
                fa, fb = xa.reshape(-1), xb.reshape(-1)
                da, db = float(np.dot(fa, fa)), float(np.dot(fb, fb))
                na += da
                nb += db
                nab += float(np.dot(fa, fb))
                if not guessed and da > 0.0 and db > 0.0:
                    # The guess of |b|/|a|: this pair's first block. When the layers are
                    # nearly equal up to scale, it is right to about |D|, so the terms that
                    # cancel in the end are small (else: the previous pair's ratio).
                    s2, guessed = math.sqrt(db / da), True
                if first:
                    acc.add(ata, xa)
                if not delta:
                    acc.add(p0, xb)
                np.multiply(xa, -s2, out=xa)
                xa += xb  # b - s2 a
                acc.add(ps, xa)
                if delta:
                    ndd += float(np.dot(fa, fa))
                if progress is not None:
                    progress(2 * xa.size * itemsize)
        nbytes += 2 * task.m * task.n * itemsize
        if first:
            norms[i] = na
        norms[i + 1], dots[i] = nb, nab
        if delta:
            stats[i] = _delta_stats(task, acc, ps, ndd, threads)
            del ata, p0, ps
            continue
        if math.isfinite(na + nb + nab) and math.sqrt(na) >= EPS and math.sqrt(nb) >= EPS:
            s = math.sqrt(nb / na)
            g = _combine(ps, p0, ata, s2, s, 1.0 / nb)
            del ata, ps  # only g (in ps's buffer) and p0 (the carry) stay alive
            if task.method == "gram":
                with threadpool_limits(threads):
                    lam = np.linalg.eigvalsh(g, UPLO="U")
                del g
                stats[i] = exact_stats(lam) | {"resid_rank_dim": task.d}
            else:
                cos = nab / math.sqrt(na * nb)
                total = max(2.0 - 2.0 * cos, 0.0)
                mu, nu = nystrom_lower(g, acc.omega)
                del g
                slack = nu + 64 * np.finfo(np.float64).eps * total
                stats[i] = sketch_stats(mu, total, task.d, task.k, slack) | {"resid_rank_dim": task.d}
            s2 = s
        else:
            del ata, ps
        carry = p0
        del p0
    acc.close()
    return TaskResult(norms, dots, stats, nbytes, reader.bytes_mapped - before)


def _delta_stats(task: RankTask, acc: Any, g: np.ndarray, total: float, threads: int) -> dict[str, Any] | None:
    """The spectrum of D = b - a from G = D^T D (or its sketch) and |D|_F^2 = `total`."""
    from threadpoolctl import threadpool_limits

    if not math.isfinite(total):
        return None
    if total == 0.0:
        return exact_stats(np.zeros(1)) | {"resid_rank_dim": task.d}
    g *= 1.0 / total  # |D / |D||_F = 1: the spectrum's scale is irrelevant, its conditioning is not
    if task.method == "gram":
        with threadpool_limits(threads):
            lam = np.linalg.eigvalsh(g, UPLO="U")
        return exact_stats(lam) | {"resid_rank_dim": task.d}
    mu, nu = nystrom_lower(g, acc.omega)
    return sketch_stats(mu, 1.0, task.d, task.k, nu + 64 * np.finfo(np.float64).eps) | {"resid_rank_dim": task.d}


def _pool_run(i: int) -> tuple[int, TaskResult]:
    segments, tasks = pool.STATE["payload"]
    task = tasks[i]
    with np.errstate(all="ignore"):  # inf/NaN weights: reported, not warned about
        return i, run_task(task, segments[task.seg], pool.STATE["reader"])


def run_rank(plan: Plan, rp: RankPlan, progress: Callable[[int], None] | None = None
             ) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], dict[tuple[int, int, int], dict[str, Any]], dict[str, Any]]:
    """Run every task. Returns per segment (squared norms, dots) shaped like the
    chain pass's totals, the per-pair statistics keyed (segment, part, pair), and
    run figures."""
    started = time.perf_counter()
    totals = {
        si: (np.zeros((len(plan.segments[si].parts), len(plan.segments[si].layers))),
             np.zeros((len(plan.segments[si].parts), len(plan.segments[si].layers) - 1)))
        for si in rp.segments
    }
    ranks: dict[tuple[int, int, int], dict[str, Any]] = {}
    decoded = mapped = 0

    def collect(i: int, res: TaskResult) -> None:
        nonlocal decoded, mapped
        t = rp.tasks[i]
        totals[t.seg][0][t.part] = res.norms
        totals[t.seg][1][t.part] = res.dots
        for j, st in enumerate(res.stats):
            if st is not None:
                ranks[(t.seg, t.part, j)] = st
        decoded += res.nbytes
        mapped += res.mapped

    if rp.pooled:
        for i, res in pool.run(_pool_run, rp.pooled, rp.jobs, pool.init_state, ((plan.segments, rp.tasks),)):
            collect(i, res)
            if progress is not None:
                progress(res.nbytes)
    if rp.inproc:
        # One task at a time in this process, with all cores' BLAS threads (run_task limits them).
        pool.init_state(None, blas_threads=None)
        try:
            for i in rp.inproc:
                t = rp.tasks[i]
                with np.errstate(all="ignore"):
                    collect(i, run_task(t, plan.segments[t.seg], pool.STATE["reader"], rp.threads, progress))
        finally:
            pool.close_state()
    info = {
        "rank_seconds": time.perf_counter() - started,
        "rank_bytes_decoded": decoded,
        "rank_bytes_mapped": mapped,
    }
    return totals, ranks, info


def describe(rp: RankPlan) -> dict[str, Any]:
    """The rank pass's settings, for the result document."""
    return {
        "mode": rp.mode,
        "families": len(rp.tasks),
        "gram": sum(t.method == "gram" for t in rp.tasks),
        "sketch": sorted({t.k for t in rp.tasks if t.method == "sketch"}),
        "workers": rp.jobs if rp.pooled else 0,
        "in_process": len(rp.inproc),
        "blas_threads_in_process": rp.threads,
        "largest_task_bytes": max((t.need for t in rp.tasks), default=0),
    }
