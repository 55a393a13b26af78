"""The null test, streamed: adjacent-layer cosines, residuals and scale track.

Work is cut into items of (segment, row block), where a segment is one raw
tensor name followed through a run of consecutive layers of the same shape.
An item walks the layers in order, decodes the block of layer L once, and
combines it with the still-decoded block of layer L-1: every analysed byte is
read exactly once, and only two decoded blocks per worker are alive. Items run
in worker processes (two cores pay; two threads do not, see the notes).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from . import SCHEMA
from .errors import LayerdiffError
from .index import TensorInfo
from .kernel import padded, rowdot
from .layout import SEED_FAMILIES, Layout, Member, aggregate_raw, aggregate_sums, family_order, grid
from .reader import Reader, decode, scale_rows

MiB = 1 << 20
# Largest block (elements per layer): bigger blocks fall out of the 2 MB L2
# cache and decode more slowly, smaller ones pay per-call overhead.
MAX_BLOCK = 1 << 20
MIN_BLOCK = 1 << 14
# Resident bytes per block element, worst case: the mapped raw value (up to 8),
# two decoded buffers (current and previous layer, up to 8 each), and room for
# a temporary of the block.
BYTES_PER_ELEMENT = 32
EPS = 1e-12  # the seed's guard: a family with a smaller norm is skipped
_NONFINITE = "inf or NaN values, or squares beyond float32 (left out of the scale track)"


@dataclass(frozen=True)
class Part:
    """One family's share of a raw tensor (all of it, unless fused)."""

    family: str
    rows: tuple[tuple[int, int], ...] | None
    cols: tuple[int, int] | None


@dataclass(frozen=True)
class Segment:
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


@dataclass
class ScanOptions:
    max_memory: int = 256 * MiB
    jobs: int = 0  # 0: all cores
    stacks: tuple[str, ...] = ()
    families: tuple[str, ...] = ()
    layers: tuple[int, int] | None = None
    # Residual spectra (layerdiff.rank): None (off), "exact" (Gram matrices; fail up
    # front if they do not fit), "auto" (exact where it fits, else a sketch with
    # guaranteed bounds), "sketch" (sketch everywhere). `sketch`: its columns (0: auto).
    rank: str | None = None
    sketch: int = 0


@dataclass
class Plan:
    segments: list[Segment]
    skipped: list[dict[str, Any]]
    jobs: int
    block: int

    @property
    def bytes_total(self) -> int:
        return sum(t.nbytes for s in self.segments for t in s.tensors)

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


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _read_bytes() -> int:
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def usable_cpus() -> int:
    """The cores this process may run on (affinity and cpusets, not the whole machine)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def plan_scan(layout: Layout, options: ScanOptions) -> Plan:
    """Choose segments, worker count and block size within the memory budget."""
    segments, skipped = _segments(layout, options)
    if not segments:
        raise LayerdiffError("scan", "nothing to analyse: no floating-point layer tensors match the selection")
    jobs = options.jobs or usable_cpus()
    base = _rss_bytes()
    # A forked worker starts as a copy of this process's resident pages.
    while jobs > 1 and (options.max_memory - base * (jobs + 1)) // jobs < MIN_BLOCK * BYTES_PER_ELEMENT:
        jobs -= 1
    per_worker = base * (jobs + 1) if jobs > 1 else base
    block = (options.max_memory - per_worker) // (jobs * BYTES_PER_ELEMENT)
    if block < MIN_BLOCK:
        need = per_worker + MIN_BLOCK * BYTES_PER_ELEMENT
        raise LayerdiffError(
            "--max-memory",
            f"{options.max_memory // MiB} MiB is too small: this process already uses {base // MiB} MiB, "
            f"and a scan needs at least {-(-need // MiB)} MiB",
        )
    largest = max(grid(s.shape)[1] for s in segments)
    if largest > block:
        raise LayerdiffError(
            "--max-memory", f"{options.max_memory // MiB} MiB is too small for rows of {largest} values"
        )
    return Plan(segments, skipped, jobs, min(MAX_BLOCK, block))


def _check_selection(layout: Layout, options: ScanOptions) -> None:
    """A --stack or --family that names nothing is a typo: say what there is."""
    for name in options.stacks:
        if name not in layout.stacks:
            raise LayerdiffError("--stack", f"no stack {name!r} here; stacks: {', '.join(layout.stacks)}")
    stacks = [st for st in layout.stacks.values() if not options.stacks or st.name in options.stacks]
    known = {f for st in stacks for f in (*st.families, *st.aggregates, *st.raw.values())}
    for name in options.families:
        if name not in known:
            listed = family_order([f for st in stacks for f in (*st.families, *st.aggregates) if "experts." not in f
                                   or f in st.aggregates])
            more = f" (and {len(listed) - 24} more)" if len(listed) > 24 else ""
            raise LayerdiffError("--family", f"no family {name!r} here; families: {', '.join(listed[:24])}{more}")


def _segments(layout: Layout, options: ScanOptions) -> tuple[list[Segment], list[dict[str, Any]]]:
    _check_selection(layout, options)
    segments: list[Segment] = []
    skipped: list[dict[str, Any]] = []
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
                raise LayerdiffError(refused.example, refused.message)
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


def _runs(stack: str, raw: str, fams: dict[str, list[Member]], skipped: list[dict[str, Any]]) -> Iterator[Segment]:
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
            skipped.append({"stack": stack, "raw": raw, "layer": layer, "reason": f"{t.dtype} is not a floating-point dtype"})
            continue
        if t.numel == 0:
            skipped.append({"stack": stack, "raw": raw, "layer": layer, "reason": "empty tensor"})
            continue
        if run:
            prev_layer, prev = run[-1]
            if prev_layer + 1 != layer:
                yield from close()
            elif prev[0][1].tensor.shape != t.shape:
                skipped.append({
                    "stack": stack, "raw": raw, "L": prev_layer, "L_next": layer,
                    "reason": f"shape changes from {list(prev[0][1].tensor.shape)} to {list(t.shape)}",
                })
                yield from close()
            elif quant(prev[0][1]) != quant(ms[0][1]):
                skipped.append({
                    "stack": stack, "raw": raw, "L": prev_layer, "L_next": layer,
                    "reason": "the split or the dequantisation scales change",
                })
                yield from close()
        run.append((layer, ms))
    yield from close()


# --- the work of one item, in a worker or in-process -------------------------

_WORK: dict[str, Any] = {}


def start_pool(jobs: int, init: Callable[..., None], args: tuple[Any, ...]) -> Any:
    """Fork `jobs` workers that leave Ctrl-C to the parent.

    SIGINT is blocked while forking, so a Ctrl-C at that moment cannot reach a
    worker before it ignores the signal (a traceback per worker); the parent
    gets it as soon as the workers exist.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return multiprocessing.get_context("fork").Pool(jobs, _start_worker, (init, args))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _start_worker(init: Callable[..., None], args: tuple[Any, ...]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    init(*args)


def _init_worker(segments: list[Segment]) -> None:
    _WORK["segments"] = segments
    _WORK["reader"] = Reader()
    _limit_blas()


def _limit_blas() -> None:
    # A multi-threaded BLAS fighting the other worker for the two cores made a
    # dot 60x slower in measurements here; the kernel calls are small anyway.
    from threadpoolctl import threadpool_limits

    _WORK["blas"] = threadpool_limits(1)


def _clip(rows: tuple[tuple[int, int], ...] | None, r0: int, r1: int) -> list[tuple[int, int]]:
    if rows is None:
        return [(r0, r1)]
    return [(max(a, r0), min(b, r1)) for a, b in rows if min(b, r1) > max(a, r0)]


def _arena(dtype: type, n: int) -> np.ndarray:
    """A per-process scratch buffer, grown as needed and reused across items:
    fresh buffers per item cost a page fault per 4 KB."""
    key = f"arena-{np.dtype(dtype).name}"
    buf = _WORK.get(key)
    if buf is None or buf.size < n:
        buf = _WORK[key] = np.empty(n, dtype)
    return buf


def run_item(item: tuple[int, int, int]) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray, int, int, int]:
    """Sums |W_L|^2 and <W_L, W_L+1> over one row block of one segment."""
    seg: Segment = _WORK["segments"][item[0]]
    reader: Reader = _WORK["reader"]
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
        spans = _clip(part.rows, r0, r1)
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
    return item, norms, dots, reader.bytes_mapped - before, os.getpid(), _read_bytes()


def _chain(seg: Segment, reader: Reader, r0: int, r1: int, work: list[list[Any]], norms: np.ndarray,
           dots: np.ndarray) -> None:
    """Walk the layers of rows [r0, r1): decode each once, add its sums."""
    for i, t in enumerate(seg.tensors):
        block = reader.rows(t, r0, r1)
        scale = seg.scales[i] if seg.scales else None
        sgrid, sr0 = scale_rows(reader, scale, seg.scale_block, r0, r1) if scale is not None else (None, 0)
        for p, w in enumerate(work):
            spans, c0, c1, cur, prev = w
            decode(block, r0, spans, c0, c1, cur, sgrid, seg.scale_block or (1, 1), sr0)
            norms[p, i] = rowdot(cur, cur)
            if i:
                dots[p, i - 1] = rowdot(prev, cur)
            w[3], w[4] = prev, cur
        del block
        reader.release(t, r0, r1)


def execute(plan: Plan, progress: Callable[[int], None] | None = None) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict[str, int]]:
    """Run every item and add up its sums per segment (in float64)."""
    totals = [
        (np.zeros((len(s.parts), len(s.layers))), np.zeros((len(s.parts), max(len(s.layers) - 1, 0))))
        for s in plan.segments
    ]
    items = list(plan.items())
    pool = None
    if plan.jobs > 1:
        pool = start_pool(plan.jobs, _init_worker, (plan.segments,))
        results = pool.imap_unordered(run_item, items, chunksize=1)
    else:
        _WORK.update(segments=plan.segments, reader=Reader())
        _limit_blas()
        results = map(run_item, items)
    mapped = 0
    read_by_pid: dict[int, int] = {}
    try:
        for item, norms, dots, nbytes, pid, read_bytes in results:
            totals[item[0]][0][...] += norms
            totals[item[0]][1][...] += dots
            mapped += nbytes
            read_by_pid[pid] = max(read_by_pid.get(pid, 0), read_bytes)
            if progress:
                progress(plan.item_bytes(item))
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        else:
            # In-process: leave nothing behind for a library caller (BLAS threads, buffers).
            _WORK.pop("reader").close()
            _WORK.pop("blas").restore_original_limits()
            _WORK.clear()
    return totals, {"bytes_mapped": mapped, "read_bytes": sum(read_by_pid.values())}


def _pair_stats(cos: float, rank: dict[str, Any] | None = None) -> dict[str, Any]:
    out = {
        "cos": cos,
        "resid_norm": math.sqrt(max(2.0 - 2.0 * cos, 0.0)),
        "scalar_fit": math.sqrt(max(1.0 - cos * cos, 0.0)),
        "resid_eff_rank": None,
        "resid_spec_entropy": None,
        "resid_stable_rank": None,
    }
    if rank:  # layerdiff.rank's numbers, and its bounds or note when it has them
        out.update(rank)
    return out


def summary(cosines: list[float], entropies: list[float], eff_ranks: list[float] | None = None) -> dict[str, Any]:
    """The seed's per-family summary over adjacent pairs (and the mean effective rank)."""
    cs = np.array(cosines, dtype=np.float64)
    raw = float(np.sqrt(np.maximum(2.0 - 2.0 * cs, 0.0)).mean())
    fit = float(np.sqrt(np.maximum(1.0 - cs**2, 0.0)).mean())
    return {
        "n_pairs": len(cosines),
        "mean_cos": float(cs.mean()),
        "median_cos": float(np.median(cs)),
        "raw_resid": raw,
        "scalar_fit": fit,
        "improve_frac": (raw - fit) / max(raw, EPS),
        "mean_SE": float(np.mean(entropies)) if entropies else None,
        "mean_eff_rank": float(np.mean(eff_ranks)) if eff_ranks else None,
    }


def scale_pca(scales: dict[str, list[float | None]]) -> dict[str, Any]:
    """PCA of the log scale track, as the seed does it, over complete families.

    Families with a zero norm somewhere are left out (log 0 would poison it).
    """
    used = [f for f, v in scales.items() if v and all(x is not None and x > 0 for x in v)]
    zero = [f for f, v in scales.items() if v and all(x is not None for x in v) and f not in used]
    out: dict[str, Any] = {"fam_used": used, "left_out_zero_norm": zero}
    if not used:
        return out | {"singvals": [], "loadings": [], "scores": [], "explained": []}
    m = np.log(np.array([scales[f] for f in used], dtype=np.float64))
    u, s, vh = np.linalg.svd(m - m.mean(axis=1, keepdims=True), full_matrices=False)
    total = float((s**2).sum())
    return out | {
        "singvals": s.tolist(),
        "loadings": u.tolist(),
        "scores": (np.diag(s) @ vh).tolist(),
        "explained": [float(x**2 / max(total, 1e-20)) for x in s],
    }


def _stack_result(name: str, layout: Layout, plan: Plan, totals: list[tuple[np.ndarray, np.ndarray]],
                  ranks: dict[tuple[int, int, int], dict[str, Any]] | None = None) -> dict[str, Any]:
    norm: dict[str, dict[int, float]] = {}
    cos: dict[str, dict[int, float]] = {}
    spec: dict[str, dict[int, dict[str, Any]]] = {}  # residual spectra, from layerdiff.rank
    info: dict[str, dict[str, Any]] = {}
    skipped = [s for s in plan.skipped if s["stack"] == name]
    sq: dict[str, dict[int, float]] = {}  # raw sums, for the all-experts families
    dt: dict[str, dict[int, float]] = {}
    for si, (seg, (n2, d)) in enumerate(zip(plan.segments, totals)):
        if seg.stack != name:
            continue
        for p, part in enumerate(seg.parts):
            fam = part.family
            info.setdefault(fam, {"raw": seg.raw, "shape": list(seg.shape), "dtype": seg.tensors[0].dtype})
            sq.setdefault(fam, {}).update(zip(seg.layers, n2[p].tolist()))
            dt.setdefault(fam, {}).update(zip(seg.layers[:-1], d[p].tolist()))
            fn = np.sqrt(n2[p])
            finite = np.isfinite(fn)
            norm.setdefault(fam, {}).update(
                (L, v if ok else None) for L, v, ok in zip(seg.layers, fn.tolist(), finite.tolist())
            )
            for i in range(len(seg.layers) - 1):
                L, L_next = seg.layers[i], seg.layers[i + 1]
                if not (finite[i] and finite[i + 1] and math.isfinite(d[p, i])):
                    skipped.append({"stack": name, "family": fam, "L": L, "L_next": L_next, "reason": _NONFINITE})
                    continue
                if fn[i] < EPS or fn[i + 1] < EPS:
                    skipped.append({"stack": name, "family": fam, "L": L, "L_next": L_next, "reason": "zero norm"})
                    continue
                # sqrt of the product, not a product of sqrts: identical layers give exactly 1.
                cos.setdefault(fam, {})[L] = float(d[p, i] / math.sqrt(n2[p, i] * n2[p, i + 1]))
                if ranks and (si, p, i) in ranks:
                    spec.setdefault(fam, {})[L] = ranks[(si, p, i)]
    for agg, members in layout.stacks[name].aggregates.items():
        if not all(f in sq for f in members):  # some experts not analysed (selection)
            continue
        a2, ad = aggregate_sums(members, sq, dt)
        first = info[members[0]]
        info[agg] = {"raw": aggregate_raw(layout.stacks[name], agg), "shape": first["shape"],
                     "dtype": first["dtype"], "experts": len(members)}
        norm[agg] = {L: math.sqrt(v) if math.isfinite(v) else None for L, v in sorted(a2.items())}
        for L, v in sorted(ad.items()):
            if norm[agg][L] is None or norm[agg][L + 1] is None or not math.isfinite(v):
                skipped.append({"stack": name, "family": agg, "L": L, "L_next": L + 1, "reason": _NONFINITE})
                continue
            if norm[agg][L] < EPS or norm[agg][L + 1] < EPS:
                skipped.append({"stack": name, "family": agg, "L": L, "L_next": L + 1, "reason": "zero norm"})
                continue
            cos.setdefault(agg, {})[L] = float(v / math.sqrt(a2[L] * a2[L + 1]))
    layers = sorted({L for v in norm.values() for L in v})
    fams = family_order(list(norm))
    pairs = [
        {"L": L, "L_next": L + 1, "families": {f: _pair_stats(cos[f][L], spec.get(f, {}).get(L)) for f in fams if L in cos.get(f, {})}}
        for L in layers
        if L + 1 in layers
    ]
    scales = {f: [norm[f].get(L) for L in layers] for f in fams}
    summaries = {
        f: summary(
            [pr["families"][f]["cos"] for pr in pairs if f in pr["families"]],
            [v for pr in pairs if f in pr["families"] and (v := pr["families"][f]["resid_spec_entropy"]) is not None],
            [v for pr in pairs if f in pr["families"] and (v := pr["families"][f]["resid_eff_rank"]) is not None],
        )
        for f in fams
        if any(f in pr["families"] for pr in pairs)
    }
    stack = layout.stacks[name]
    raws = {i["raw"] for i in info.values()}
    return {
        "layers": layers,
        "families": {f: info[f] for f in fams},
        "unmapped": [u for u in stack.unmapped if u in raws],
        "pairs": pairs,
        "summary": summaries,
        "scales": scales,
        "pca": scale_pca(scales),
        "skipped": skipped,
    }


def seed_view(stack: dict[str, Any]) -> dict[str, Any]:
    """The seed script's JSON keys, holding exactly what the seed would: its families only."""
    seed_pairs = [
        {
            "L": pr["L"],
            "L_next": pr["L_next"],
            "families": {
                f: {k: pr["families"][f][k] for k in ("cos", "resid_norm", "resid_eff_rank", "resid_spec_entropy")}
                for f in SEED_FAMILIES
                if f in pr["families"]
            },
        }
        for pr in stack["pairs"]
    ]
    scales = {f: stack["scales"].get(f, [None] * len(stack["layers"])) for f in SEED_FAMILIES}
    pca = scale_pca(scales)
    return {
        "pair_results": seed_pairs,
        "scales": scales,
        "scale_pca_singvals": pca["singvals"],
        "scale_pca_loadings": pca["loadings"],
        "scale_pca_scores": pca["scores"],
        "fam_used": pca["fam_used"],
    }


def scan(
    layout: Layout,
    options: ScanOptions,
    progress: Callable[[int], None] | None = None,
    plan: Plan | None = None,
    rank_plan: Any = None,
) -> dict[str, Any]:
    """Plan, stream and summarise; returns the result document (without source)."""
    plan = plan or plan_scan(layout, options)
    started = time.perf_counter()
    ranks: dict[tuple[int, int, int], dict[str, Any]] | None = None
    rank_settings: dict[str, Any] | None = None
    if options.rank:
        # 2-D families: one pair-major pass gives norms, cosines and spectra (each
        # tensor read twice); the rest (1-D) takes the chain pass. Planned up front.
        from .rank import describe, plan_rank, run_rank

        rplan = rank_plan or plan_rank(plan, options)
        done = rplan.segments
        rest = [s for i, s in enumerate(plan.segments) if i not in done]
        part_totals, io = execute(Plan(rest, plan.skipped, plan.jobs, plan.block), progress) if rest else ([], {
            "bytes_mapped": 0, "read_bytes": 0})
        rank_totals, ranks, rank_io = run_rank(plan, rplan, progress)
        it = iter(part_totals)
        totals = [rank_totals[i] if i in done else next(it) for i in range(len(plan.segments))]
        io = io | rank_io
        rank_settings = describe(rplan)
    else:
        totals, io = execute(plan, progress)
    stacks = {name: _stack_result(name, layout, plan, totals, ranks) for name in sorted({s.stack for s in plan.segments})}
    main = layout.main_stack()
    main_name = main.name if main and main.name in stacks else next(iter(stacks))
    return {
        "schema": SCHEMA,
        "architecture": layout.arch,
        "main_stack": main_name,
        **seed_view(stacks[main_name]),
        "stacks": stacks,
        "settings": {
            "max_memory": options.max_memory,
            "jobs": plan.jobs,
            "block_elements": plan.block,
            "stacks": list(options.stacks),
            "families": list(options.families),
            "layers": list(options.layers) if options.layers else None,
            "rank": rank_settings,
        },
        "run": {
            "seconds": time.perf_counter() - started,
            "bytes_analysed": plan.bytes_total,
            **io,
        },
    }
