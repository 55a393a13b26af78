"""A sweep: plan every checkpoint's scan and drift, skip what the directory holds, run the rest.

    job = plan_sweep(["org/run"], revisions=r"step\\d+", out_dir="sweep/", max_memory="1G")
    result = job.run()                        # here, or job.run(dask="tcp://host:8786")
    result.write_table("sweep.csv")

Locally the work runs one piece after another, each in the engine's process
pool within the budget (the pool already fills the cores; two pieces at once
would have to halve the budget). A drift is `layerdiff.diff(reference,
checkpoint)`. On a dask.distributed cluster each piece is a task (one per
checkpoint scan and one per drift); when there are fewer pieces than twice the
worker threads, each scan (by the chain pass alone) is cut into tasks over
groups of its segments, whose per-segment sums are added up here. A task opens its checkpoint where its
worker sees it (the same path, or its own hub cache), checks that it is the
same checkpoint (commit, or file sizes and mtimes), plans within --max-memory
in its worker process (one layerdiff task per worker process at a time, in
process: no forked pool inside a worker) and sends back sums or a result,
never weights.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator


from .. import errors
from ..api import Model, ScanJob, open_model, plan, scan_options
from ..checkpoint.index import first_line
from ..compare.result import DiffResult
from ..compare.run import DiffJob, plan_diff
from ..engine import chain
from ..engine.plan import Plan
from ..errors import LayerdiffError, SelectionError
from ..options import ScanOptions
from ..output import check_writable
from ..result import ScanResult
from . import store
from .revisions import Checkpoint, expand, split_spec
from .table import COLUMNS

REFERENCES = ("first", "previous", "last")
DASK_TIMEOUT = 5.0  # seconds to reach a scheduler, or to see a worker
Progress = Callable[[int, int], None]  # bytes done since the last call, checkpoints finished so far

TableRow = tuple[str, "str | None", "str | None", str, str, int, "int | None", str, float]


@dataclass(frozen=True)
class Entry:
    """One checkpoint of a sweep, and where its results are."""

    checkpoint: str  # the MODEL as given (or as `--revisions` expanded it)
    revision: str | None  # the hub revision (None for a local path)
    commit: str | None  # the hub commit it resolved to
    scan_file: Path
    reference: str | None  # the checkpoint it drifts from (None: it is its own reference)
    drift_file: Path | None


@dataclass(frozen=True)
class SweepResult:
    """What `layerdiff.sweep` returns: the checkpoints in order, their files, what this run computed."""

    out_dir: Path
    entries: list[Entry]
    reference: str
    computed: list[Path] = field(default_factory=list)  # files this run wrote
    reused: list[Path] = field(default_factory=list)  # files it found done

    def scan(self, checkpoint: str | int) -> ScanResult:
        """A checkpoint's scan result, by position or by name."""
        e = self._entry(checkpoint)
        return ScanResult.from_dict(store.Store(self.out_dir).load(e.scan_file, store.SCAN_DOC)["result"],  # type: ignore[index]
                                    str(e.scan_file))

    def drift(self, checkpoint: str | int) -> list[tuple[str, str, int, str, Any]]:
        """A checkpoint's drift rows (stack, family, L, metric, value), from `layerdiff.diff(reference,
        checkpoint)`: rel_change is |W - W_ref| / |W_ref|; [] for its own reference."""
        e = self._entry(checkpoint)
        if e.drift_file is None:
            return []
        doc = store.Store(self.out_dir).load(e.drift_file, store.DRIFT_DOC)
        return DiffResult.from_dict(doc["result"], str(e.drift_file)).rows() if doc else []

    def _entry(self, checkpoint: str | int) -> Entry:
        if isinstance(checkpoint, int):
            return self.entries[checkpoint]
        for e in self.entries:
            if e.checkpoint == checkpoint:
                return e
        raise SelectionError("checkpoint", f"no checkpoint {checkpoint!r} in this sweep")

    def rows(self) -> Iterator[TableRow]:
        """The tidy table, one row per value: COLUMNS. Values that could not be computed
        (zero norms, inf/NaN, a 1-D family's rank) have no row; the scan files say why."""
        for i, e in enumerate(self.entries):
            head = (e.checkpoint, e.revision, e.commit)
            for stack, fam, L, L_next, metric, value in self.scan(i).rows():
                if value is not None:
                    yield (*head, stack, fam, L, L_next, metric, value)
            for stack, fam, L, metric, value in self.drift(i):
                if value is not None:
                    yield (*head, stack, fam, L, None, f"drift_{metric}", value)

    def to_frame(self) -> Any:
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("to_frame() needs pandas: pip install 'layerdiff[frame]'") from None
        return pd.DataFrame(list(self.rows()), columns=list(COLUMNS))

    def write_table(self, path: str | Path) -> int:
        """Write the table as .csv or .parquet; returns the number of rows."""
        from .table import write_table

        return write_table(self.rows(), Path(path))


@dataclass
class Work:
    """One file to compute: a checkpoint's scan, or its drift against its reference."""

    kind: str  # "scan" or "drift"
    path: Path
    checkpoint: Checkpoint
    reference: Checkpoint | None
    identity: dict[str, Any]
    reference_identity: dict[str, Any] | None
    job: ScanJob | DiffJob
    head: dict[str, Any]  # the stored document's fields besides the result

    @property
    def splittable(self) -> bool:
        """A scan by the chain pass alone: its per-segment sums are all there is to add up."""
        j = self.job
        return isinstance(j, ScanJob) and j.rank_plan is None and j.centred_plan is None and not j.options.all_pairs

    def document(self, result: Any) -> dict[str, Any]:
        return {**self.head, "result": result.to_dict()}


@dataclass
class SweepJob:
    """A sweep planned: every checkpoint opened, references chosen, the missing work planned."""

    store: store.Store
    entries: list[Entry]
    reference: str
    works: list[Work]
    reused: list[Path]
    options: ScanOptions
    cache_dir: str | None = None

    @property
    def total(self) -> int:
        """Bytes the missing work reads (the progress bar's total)."""
        return sum(w.job.total for w in self.works)

    @property
    def done_before(self) -> int:
        pending = {w.path for w in self.works}
        return sum(1 for e in self.entries if not ({e.scan_file, e.drift_file} & pending))

    def run(self, progress: Progress | None = None, dask: str | None = None) -> SweepResult:
        self.store.prepare()
        tracker = _Tracker(self.entries, self.works, progress)
        if dask:
            _run_dask(self, dask, tracker)
        else:
            for w in self.works:
                result = w.job.run(tracker.bytes)
                self.store.save(w.path, w.document(result))
                tracker.finished(w)
        return SweepResult(self.store.folder, self.entries, self.reference, [w.path for w in self.works],
                           list(self.reused))


class _Tracker:
    """Bytes and finished checkpoints, for the one progress bar."""

    def __init__(self, entries: list[Entry], works: list[Work], progress: Progress | None) -> None:
        self.progress = progress
        self.left: dict[int, set[Path]] = {}
        by_path = {w.path for w in works}
        for i, e in enumerate(entries):
            self.left[i] = {p for p in (e.scan_file, e.drift_file) if p in by_path}
        self.done = sum(1 for v in self.left.values() if not v)

    def bytes(self, n: int) -> None:
        if self.progress:
            self.progress(n, self.done)

    def finished(self, w: Work) -> None:
        for paths in self.left.values():
            if w.path in paths:
                paths.discard(w.path)
                if not paths:
                    self.done += 1
        if self.progress:
            self.progress(0, self.done)


def _options(options: dict[str, Any]) -> ScanOptions:
    """ScanOptions from the sweep's options: any that `scan_options` takes, passed through as they are."""
    import inspect

    known = inspect.signature(scan_options).parameters
    for name in options:
        if name not in known:
            raise SelectionError(name, "this layerdiff's scan has no such option (yet)")
    return scan_options(**options)


def plan_sweep(models: str | list[str] | tuple[str, ...], *, out_dir: str | Path, revisions: str | None = None,
               reference: str = "first", cache_dir: str | None = None, **options: Any) -> SweepJob:
    """Open every checkpoint, choose its reference, and plan what DIR does not hold yet.

    `reference`: "first", "previous", "last" (of the checkpoints, in order) or a MODEL.
    Options as `scan_options` takes them (max_memory, jobs, stacks, families, layers, rank, ...)."""
    opts = _options(options)
    cks = expand([models] if isinstance(models, str) else list(models), revisions, cache_dir)
    opened: dict[str, Model] = {}

    def model(ck: Checkpoint) -> Model:
        if ck.spec not in opened:
            opened[ck.spec] = open_model(ck.model, ck.revision, cache_dir)
        return opened[ck.spec]

    refs: list[Checkpoint | None]
    if reference == "first":
        refs = [cks[0]] * len(cks)
    elif reference == "last":
        refs = [cks[-1]] * len(cks)
    elif reference == "previous":
        refs = [None, *cks[:-1]]
    elif not reference:
        raise SelectionError("reference", "give first, previous, last or a MODEL")
    else:
        given = next((c for c in cks if c.spec == reference), None)
        refs = [given or split_spec(reference)] * len(cks)

    folder = Path(out_dir)
    for ck in dict.fromkeys([*cks, *(r for r in refs if r is not None)]):  # before any work: not into a checkpoint
        check_writable(folder / "scan.json" if folder.is_dir() else folder, model(ck).source)
    st = store.Store(folder)
    idents = {ck.spec: store.identity(model(ck)) for ck in cks}
    for r in refs:
        if r is not None and r.spec not in idents:
            idents[r.spec] = store.identity(model(r))
    scan_settings = store.scan_settings(opts)
    drift_settings = {k: v for k, v in scan_settings.items() if k != "all_pairs"}  # diff has no all-pairs
    entries: list[Entry] = []
    works: dict[Path, Work] = {}
    reused: list[Path] = []
    for ck, ref in zip(cks, refs):
        ident = idents[ck.spec]
        k = store.key("scan", ident, scan_settings)
        scan_file = st.scan_path(k)
        src = model(ck).source
        revision = (src.revision if src and src.repo_id else None)
        commit = (src.commit if src and src.repo_id else None)
        if ref is not None and idents[ref.spec] == ident:
            ref = None  # its own reference: no drift
        drift_file = None
        if ref is not None:
            rk = store.key("drift", ident, idents[ref.spec], drift_settings)
            drift_file = st.drift_path(k[:10], rk)
        entries.append(Entry(ck.spec, revision, commit, scan_file, ref.spec if ref else None, drift_file))
        head = {"checkpoint": ck.spec, "identity": ident}
        for kind, path in (("scan", scan_file), ("drift", drift_file)):
            if path is None or path in works or path in reused:
                continue
            if st.load(path, store.SCAN_DOC if kind == "scan" else store.DRIFT_DOC) is not None:
                reused.append(path)
                continue
            if kind == "scan":
                job: ScanJob | DiffJob = plan(model(ck), opts)
                doc = {"schema": store.SCAN_DOC, **head, "settings": scan_settings}
                works[path] = Work(kind, path, ck, None, ident, None, job, doc)
            else:
                assert ref is not None
                job = plan_diff(model(ref), model(ck), opts)  # A = the reference: rel_change = |W - W_ref| / |W_ref|
                doc = {"schema": store.DRIFT_DOC, **head, "reference": ref.spec,
                       "reference_identity": idents[ref.spec], "settings": drift_settings}
                works[path] = Work(kind, path, ck, ref, ident, idents[ref.spec], job, doc)
    return SweepJob(st, entries, reference, list(works.values()), reused, opts, cache_dir)


def sweep(models: str | list[str] | tuple[str, ...], *, out_dir: str | Path, revisions: str | None = None,
          reference: str = "first", table: str | Path | None = None, plot: str | Path | None = None,
          dask: str | None = None, cache_dir: str | None = None, progress: Progress | None = None,
          **options: Any) -> SweepResult:
    """Scan many checkpoints (or every revision of a hub repo matching `revisions`) and
    their drift against a reference; results in `out_dir`, reused by the next sweep.

    `table`: also write the tidy table (.csv, .parquet); `plot`: the drift figure
    (.png, .svg); `dask`: a dask.distributed scheduler address to run the work on."""
    check_outputs(table, plot, dask)
    job = plan_sweep(models, out_dir=out_dir, revisions=revisions, reference=reference, cache_dir=cache_dir,
                     **options)
    result = job.run(progress, dask)
    if table is not None:
        result.write_table(table)
    if plot is not None:
        from .plot import plot_sweep

        plot_sweep(result, Path(plot))
    return result


def check_outputs(table: str | Path | None, plot: str | Path | None, dask: str | None) -> None:
    """Before any work: the table's and the plot's formats and extras, and the dask extra."""
    if table is not None:
        from .table import check_table_path

        check_table_path(Path(table))
    if plot is not None:
        from .plot import check_plot

        check_plot(Path(plot))
    if dask:
        _dask_modules()


# --- dask.distributed ------------------------------------------------------------------------------

_ONE_AT_A_TIME = threading.Lock()  # per worker process: one task's memory at a time, whatever its threads


def _dask_modules() -> Any:
    try:
        import distributed
    except ImportError:
        raise LayerdiffError("dask", "needs dask.distributed: pip install 'layerdiff[dask]'") from None
    return distributed


def remote(kind: str, ck: Checkpoint, ref: Checkpoint | None, cache_dir: str | None, options: ScanOptions,
           ident: dict[str, Any], ref_ident: dict[str, Any] | None, group: list[int] | None) -> dict[str, Any]:
    """A task on a dask worker: open the checkpoint there, plan within the budget, run
    all of the work (-> the result document's body) or a group of its segments (-> their sums).

    Errors come back as values: layerdiff's errors take two arguments, which pickle does not."""
    try:
        with _ONE_AT_A_TIME:
            return _remote(kind, ck, ref, cache_dir, replace(options, jobs=1), ident, ref_ident, group)
    except LayerdiffError as e:
        return {"error": (type(e).__name__, e.where, e.problem)}


def _remote(kind: str, ck: Checkpoint, ref: Checkpoint | None, cache_dir: str | None, options: ScanOptions,
            ident: dict[str, Any], ref_ident: dict[str, Any] | None, group: list[int] | None) -> dict[str, Any]:
    import socket

    def opened(c: Checkpoint, expected: dict[str, Any]) -> Model:
        m = open_model(c.model, c.revision, cache_dir)
        if store.identity(m) != expected:
            raise LayerdiffError(c.spec, f"the worker on {socket.gethostname()} sees other files than the client "
                                         "(another commit, or other sizes or mtimes)")
        return m

    m = opened(ck, ident)
    if kind == "drift":
        assert ref is not None and ref_ident is not None
        return {"result": plan_diff(opened(ref, ref_ident), m, options).run().to_dict()}
    job = plan(m, options)
    if group is None:
        return {"result": job.run().to_dict()}
    p = job.plan
    totals, io = chain.execute(Plan([p.segments[i] for i in group], [], 1, p.block))
    return {"segments": len(p.segments), "totals": totals, "io": io}


def _groups(p: Plan, k: int) -> list[list[int]]:
    """Segments into k groups of about equal bytes (largest first onto the lightest group)."""
    k = max(1, min(k, len(p.segments)))
    sizes = [sum(t.nbytes for t in s.tensors) for s in p.segments]
    groups: list[list[int]] = [[] for _ in range(k)]
    load = [0] * k
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        j = load.index(min(load))
        groups[j].append(i)
        load[j] += sizes[i]
    return [sorted(g) for g in groups if g]


def _raise(err: tuple[str, str, str]) -> None:
    cls = getattr(errors, err[0], LayerdiffError)
    raise cls(err[1], err[2])


def _connect(address: str) -> Any:
    distributed = _dask_modules()
    import logging

    logging.getLogger("distributed").setLevel(logging.CRITICAL)  # its own warnings would repeat our one line
    try:
        client = distributed.Client(address, timeout=DASK_TIMEOUT, set_as_default=False)
    except Exception as e:  # unreachable, refused, a malformed address: all one line
        raise LayerdiffError("dask", f"cannot reach the scheduler at {address} within {DASK_TIMEOUT:g} s "
                                     f"({first_line(e)})") from None
    try:
        client.wait_for_workers(1, timeout=DASK_TIMEOUT)
    except Exception:
        client.close()
        raise LayerdiffError("dask", f"the scheduler at {address} has no workers") from None
    return client


def _run_dask(job: SweepJob, address: str, tracker: _Tracker) -> None:
    distributed = _dask_modules()
    client = _connect(address)
    try:
        slots = max(1, sum(client.nthreads().values()))
        target = 2 * slots  # enough tasks to keep every worker thread busy to the end
        split = 1 if len(job.works) >= target else math.ceil(target / max(len(job.works), 1))
        futures: dict[Any, tuple[Work, list[int] | None]] = {}
        partial: dict[Path, dict[str, Any]] = {}
        for w in job.works:
            groups: list[list[int] | None] = [None]
            if split > 1 and w.splittable and len(w.job.plan.segments) > 1:
                groups = list(_groups(w.job.plan, split))
                partial[w.path] = {"left": len(groups), "totals": None, "io": {}}
            for g in groups:
                fut = client.submit(remote, w.kind, w.checkpoint, w.reference, job.cache_dir, job.options,
                                    w.identity, w.reference_identity, g, pure=False)
                futures[fut] = (w, g)
        started = time.perf_counter()
        try:
            with client.as_current():
                done = distributed.as_completed(list(futures))
            for fut in done:
                w, g = futures.pop(fut)
                try:
                    out = fut.result()
                except Exception as e:
                    raise LayerdiffError(w.checkpoint.spec, f"the {w.kind} task failed on a dask worker "
                                                            f"({type(e).__name__}: {first_line(e)})") from None
                if "error" in out:
                    _raise(out["error"])
                if g is None:
                    job.store.save(w.path, {**w.head, "result": out["result"]})
                    tracker.bytes(w.job.total)
                    tracker.finished(w)
                    continue
                tracker.bytes(sum(t.nbytes for i in g for t in w.job.plan.segments[i].tensors))
                part = partial[w.path]
                if out["segments"] != len(w.job.plan.segments):
                    raise LayerdiffError(w.checkpoint.spec, "a dask worker planned other segments than the client")
                if part["totals"] is None:
                    part["totals"] = [None] * len(w.job.plan.segments)
                for i, sums in zip(g, out["totals"]):  # partial sums add up (disjoint segments here)
                    have = part["totals"][i]
                    part["totals"][i] = sums if have is None else tuple(x + y for x, y in zip(have, sums))
                for name, v in out["io"].items():
                    part["io"][name] = part["io"].get(name, 0) + v
                part["left"] -= 1
                if not part["left"]:
                    assert isinstance(w.job, ScanJob)
                    result = w.job.result(part["totals"], part["io"], None, time.perf_counter() - started)
                    job.store.save(w.path, w.document(result))
                    tracker.finished(w)
        finally:
            for fut in futures:
                fut.cancel()
    finally:
        client.close()
