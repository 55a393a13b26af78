"""One worker pool for every pass: forked processes, one BLAS thread each.

Two processes pay on two cores; two threads do not (per-call overhead, the
GIL). A pass gives a worker initialiser, which leaves its state in `STATE`,
and a function of one item; `run` yields the results as they complete. A
worker that dies (a shard truncated under its mapping gives SIGBUS) is
detected and reported, never waited on.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, TypeVar

from ..checkpoint.reader import Reader
from ..errors import LayerdiffError

T = TypeVar("T")
R = TypeVar("R")

# Per process: the pass's payload, a Reader, the BLAS limit. Filled by `init_state`.
STATE: dict[str, Any] = {}


def init_state(payload: Any, blas_threads: int | None = 1) -> None:
    """A process's state for a pass: its payload, a Reader, BLAS pinned.

    A multi-threaded BLAS fighting the other worker for the two cores made a
    dot 60x slower in measurements here; the kernel calls are small anyway.
    Only workers map the shards (see checkpoint/reader.py: a SIGBUS there is
    a worker's death, reported; here it would kill layerdiff)."""
    STATE.update(payload=payload, reader=Reader(mapped=STATE.get("worker", False)))
    if blas_threads is not None:
        from threadpoolctl import threadpool_limits

        STATE["blas"] = threadpool_limits(blas_threads)


def close_state() -> None:
    """Leave nothing behind for a library caller (mappings, BLAS limits, buffers)."""
    reader = STATE.pop("reader", None)
    if reader is not None:
        reader.close()
    blas = STATE.pop("blas", None)
    if blas is not None:
        blas.restore_original_limits()
    STATE.clear()


def _start_worker(init: Callable[..., None], args: tuple[Any, ...]) -> None:
    STATE["worker"] = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    init(*args)


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C while the workers are forked; raise it afterwards.

    SIGINT is blocked in this thread, so a worker, which inherits the mask,
    cannot get it before it ignores the signal. That alone is not enough: the
    kernel hands a process-wide SIGINT to any thread that does not block it
    (tqdm's monitor thread, say), and Python then raises KeyboardInterrupt in
    the main thread at once, even inside ProcessPoolExecutor between a fork and
    its record of the child: that worker was left behind, idle, holding the
    terminal open. So the Python handler only notes the signal here."""
    if threading.current_thread() is not threading.main_thread():  # signal.signal is main-thread only
        yield
        return
    caught: list[int] = []
    handler = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        signal.signal(signal.SIGINT, handler)
    if caught and callable(handler):
        handler(signal.SIGINT, None)  # the default handler raises KeyboardInterrupt


class WorkerDied(LayerdiffError):
    """A worker process ended abnormally while running `item`."""

    def __init__(self, item: Any, how: str = "") -> None:
        self.item = item
        super().__init__("scan", f"a worker process died{how}; nothing written")


def _how(pool: ProcessPoolExecutor) -> str:
    """' (killed by SIGKILL: out of memory?)': the signal that ended a worker, if one did.

    The pool terminates the other workers (SIGTERM) once one has died, and its
    thread may be reaping them right now: their exit codes can take a moment."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    deadline = time.monotonic() + 2
    while any(p.exitcode is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.01)
    codes = [p.exitcode for p in procs]
    signals = [-c for c in codes if c is not None and c < 0]
    for sig in sorted(signals, key=lambda s: s == signal.SIGTERM):
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f" (killed by {name}{': out of memory?' if name == 'SIGKILL' else ''})"
    return ""


def run(fn: Callable[[T], R], items: Iterable[T], jobs: int, init: Callable[..., None],
        args: tuple[Any, ...], window: int = 0) -> Iterator[R]:
    """fn(item) for every item, in `jobs` forked workers (in any order) or, for
    jobs <= 1, here (in order, state closed afterwards). At most `window` items
    are queued at once (default 4 per worker), so results do not pile up."""
    if jobs <= 1:
        init(*args)
        try:
            yield from map(fn, items)
        finally:
            close_state()
        return
    it = iter(items)
    window = window or 4 * jobs
    pending: dict[Future[R], T] = {}
    pool: ProcessPoolExecutor | None = None
    broken = False
    try:
        with _sigint_deferred():
            pool = ProcessPoolExecutor(jobs, multiprocessing.get_context("fork"), _start_worker, (init, args))
            for item in it:
                pending[pool.submit(fn, item)] = item
                if len(pending) >= window:
                    break
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                item = pending.pop(fut)
                try:
                    result = fut.result()
                except BrokenProcessPool:
                    broken = True
                    raise WorkerDied(item, _how(pool)) from None
                for nxt in it:
                    try:
                        pending[pool.submit(fn, nxt)] = nxt
                    except BrokenProcessPool:  # a worker died since `fut` completed
                        broken = True
                        raise WorkerDied(nxt, _how(pool)) from None
                    break
                yield result
    finally:
        # A broken pool's own thread fails every pending future; cancelling them
        # meanwhile makes that thread die of InvalidStateError with a traceback
        # (Python 3.11), so they are left to it.
        if not broken:
            for fut in pending:
                fut.cancel()
        if pool is not None:
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()  # an interrupted or failed pass: do not wait for queued work
            pool.shutdown(wait=True, cancel_futures=not broken)
