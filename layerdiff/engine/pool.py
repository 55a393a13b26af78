"""One worker pool for every pass: forked processes, one BLAS thread each.

Two processes pay on two cores; two threads do not (per-call overhead, the
GIL). A pass gives a worker initialiser, which leaves its state in `STATE`,
and a function of one item; `run` yields the results as they complete. A
worker that dies (a shard truncated under its mapping gives SIGBUS) is
detected and reported, never waited on.

The pool is a few pipes and `os.fork`: each worker reads pickled items from
its own pipe and writes pickled results to another, and the parent polls the
result pipes. (concurrent.futures' process pool cost ~28 ms to import, ~6%
of a 2 GB scan.)
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import threading
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


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C while the workers are forked; raise it afterwards.

    SIGINT is blocked in this thread, so a worker, which inherits the mask,
    cannot get it before it ignores the signal. That alone is not enough: the
    kernel hands a process-wide SIGINT to any thread that does not block it
    (tqdm's monitor thread, say), and Python then raises KeyboardInterrupt in
    the main thread at once, even between a fork and the record of the child:
    that worker was left behind, idle, holding the terminal open. So the Python
    handler only notes the signal here."""
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


def _how(status: int) -> str:
    """' (killed by SIGKILL: out of memory?)': the signal in a wait status, if any."""
    if not os.WIFSIGNALED(status):
        return ""
    sig = os.WTERMSIG(status)
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    return f" (killed by {name}{': out of memory?' if name == 'SIGKILL' else ''})"


_LEN = struct.Struct("<Q")


def _send(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    view = memoryview(_LEN.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _recv(fd: int, n: int) -> bytes | None:
    """Exactly n bytes from fd, or None at end of file (the writer is gone)."""
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 24))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _message(fd: int) -> Any:
    """The next pickled object from fd (an item, or an (ok, value) result), or None at end of file."""
    head = _recv(fd, _LEN.size)
    body = _recv(fd, _LEN.unpack(head)[0]) if head is not None else None
    return None if body is None else pickle.loads(body)


class _Worker:
    """A forked process serving `fn` over a pair of pipes."""

    def __init__(self, fn: Callable[[Any], Any], init: Callable[..., None], args: tuple[Any, ...],
                 siblings: list[_Worker]) -> None:
        tasks_r, self.tasks = os.pipe()
        self.results, results_w = os.pipe()
        self.items: list[Any] = []  # sent, not yet answered, in order
        self.status: int | None = None  # its wait status, once ended
        try:
            self.pid = os.fork()
        except OSError:
            for fd in (tasks_r, self.tasks, self.results, results_w):
                os.close(fd)
            raise
        if self.pid == 0:  # the worker: never returns
            for other in siblings:
                os.close(other.tasks)
                os.close(other.results)
            os.close(self.tasks)
            os.close(self.results)
            _serve(fn, init, args, tasks_r, results_w)
        os.close(tasks_r)
        os.close(results_w)

    def send(self, item: Any) -> None:
        self.items.append(item)
        try:
            _send(self.tasks, item)
        except BrokenPipeError:  # it has ended
            raise self.failure() from None

    def failure(self) -> BaseException:
        """Why it ended early: its own error (from its initialiser, say), or its death
        while running the oldest item its pipe holds no answer to."""
        while (msg := _message(self.results)) is not None:
            if not msg[0]:
                return msg[1]
            self.items.pop(0)
        return WorkerDied(self.items[0] if self.items else None, _how(self.end(kill=True)))

    def end(self, kill: bool) -> int:
        """Close its pipes (it exits at the end of its items) or kill it; its wait status."""
        if self.status is None:
            for fd in (self.tasks, self.results):
                os.close(fd)
            if kill:
                try:
                    os.kill(self.pid, signal.SIGTERM)  # an interrupted or failed pass: do not wait for queued work
                except ProcessLookupError:
                    pass
            self.status = os.waitpid(self.pid, 0)[1]
        return self.status


def _serve(fn: Callable[[Any], Any], init: Callable[..., None], args: tuple[Any, ...], tasks: int,
           results: int) -> None:
    """A worker's life: state from `init`, then fn(item) for every item until the pipe closes."""
    STATE["worker"] = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    code = 0
    try:
        try:
            init(*args)
            ready = True
        except BaseException as e:
            _send(results, (False, e))
            ready = False
        while ready:
            msg = _message(tasks)
            if msg is None:
                break
            try:
                out: tuple[bool, Any] = (True, fn(msg))
            except BaseException as e:
                out = (False, e)
            _send(results, out)
    except BaseException:
        code = 1
    finally:
        os._exit(code)


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
    per_worker = max(1, (window or 4 * jobs) // jobs)
    workers: list[_Worker] = []
    done = False
    try:
        with _sigint_deferred():
            for _ in range(jobs):
                workers.append(_Worker(fn, init, args, workers))
        by_fd = {w.results: w for w in workers}
        for w in workers:
            for item in it:
                w.send(item)
                if len(w.items) >= per_worker:
                    break
        poller = select.poll()
        for w in workers:
            poller.register(w.results, select.POLLIN)
        while any(w.items for w in workers):
            for fd, _ in poller.poll():
                w = by_fd[fd]
                msg = _message(fd)
                if msg is None:  # it died: its exit status says how
                    raise w.failure()
                w.items.pop(0)
                ok, value = msg
                if not ok:
                    raise value
                for nxt in it:
                    w.send(nxt)
                    break
                yield value
        done = True
    finally:
        for w in workers:
            w.end(kill=not done)
