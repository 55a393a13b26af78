"""One budget computation for every pass: what this process and its workers may hold.

`--max-memory` bounds the peak resident memory of layerdiff and all its worker
processes together, file-backed pages included. A forked worker starts as a
copy of this process's resident pages, so the base RSS counts once per process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import BudgetError

MiB = 1 << 20
# Largest block (elements per layer): bigger blocks fall out of the 2 MB L2
# cache and decode more slowly, smaller ones pay per-call overhead.
MAX_BLOCK = 1 << 20
MIN_BLOCK = 1 << 14
# Without the kernel's readahead (see `paging`) each block is one read: larger
# ones keep the disk busier (8 GB under a 300 MB cap: 8.6 s vs 10.3 s).
UNREAD_AHEAD_MAX_BLOCK = 4 << 20
# Resident bytes per block element, worst case: the mapped raw value (up to 8),
# two decoded buffers (current and previous layer, up to 8 each), and room for
# a temporary of the block.
BYTES_PER_ELEMENT = 32
# Below this many bytes to read, a run is faster in one process than with forked
# workers (~30 ms each to start, against ~0.1 s per 0.5 GB of kernel work).
IN_PROCESS_BYTES = 64 * MiB


def rss_bytes() -> int:
    """This process's resident set now (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def read_bytes() -> int:
    """Bytes this process made storage read (the kernel's count; 0 where unknown)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory_cap() -> int | None:
    """The tightest memory limit of this process's cgroup and its ancestors (v1 or v2), or None."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2 unified
            root, name = "/sys/fs/cgroup", "memory.max"
        elif "memory" in controllers.split(","):
            root, name = "/sys/fs/cgroup/memory", "memory.limit_in_bytes"
        else:
            continue
        limits = []
        parts = [p for p in path.split("/") if p]
        for i in range(len(parts), -1, -1):
            try:
                with open(os.path.join(root, *parts[:i], name)) as f:
                    text = f.read().strip()
            except OSError:
                continue
            if text.isdigit() and int(text) < 1 << 62:  # v1 says "unlimited" with a huge number
                limits.append(int(text))
        if limits:
            return min(limits)
    return None


@dataclass(frozen=True)
class Paging:
    """How a run treats the page cache (see checkpoint/reader.py)."""

    drop: bool = False  # read each block and drop its file pages once consumed
    readahead: bool = True  # leave the kernel's readahead on


def paging(nbytes: int, max_memory: int, streams: int, path: str | os.PathLike[str]) -> Paging:
    """Drop file pages when a run reading `nbytes` would not fit in its cgroup's memory
    limit beside the run itself; and then also turn the kernel's readahead off when its
    windows would crowd the cap: up to two windows ahead of each of the `streams`
    tensors read in turn stay cached until read (an 8 GB, 32-layer scan under a 300 MB
    cap: the charge pinned at the cap, 37% of the bytes read twice). Within half the
    cap, readahead stays on: with it a 9-layer scan was 1.8x faster."""
    cap = memory_cap()
    if cap is None or nbytes <= cap - max_memory:
        return Paging()
    return Paging(True, streams * 2 * readahead_bytes(path) <= cap // 2)


def readahead_bytes(path: str | os.PathLike[str]) -> int:
    """The readahead window of the block device holding `path` (its queue's
    read_ahead_kb; the kernel's default, 128 KiB, where it cannot be found)."""
    dev = os.stat(path).st_dev
    where = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    for name in ("queue/read_ahead_kb", "../queue/read_ahead_kb", "bdi/read_ahead_kb"):  # a disk, a partition
        try:
            with open(os.path.join(where, name)) as f:
                return int(f.read()) * 1024
        except (OSError, ValueError):
            continue
    return 128 * 1024


def usable_cpus() -> int:
    """The cores this process may run on (affinity and cpusets, not the whole machine)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Budget:
    """Workers and elements per block that fit `max_memory`, for `streams` blocks alive per worker."""

    max_memory: int
    base: int  # this process's RSS when planned
    jobs: int
    block: int  # elements per stream per block

    @property
    def share(self) -> int:
        """Bytes one worker may hold beyond its base (0 when running in-process only)."""
        return (self.max_memory - self.base * (self.jobs + 1)) // self.jobs if self.jobs > 1 else 0


def plan_budget(max_memory: int, jobs: int, widest: int, streams: int = 2, nbytes: int | None = None,
                max_block: int | None = None) -> Budget:
    """Choose workers and block size for rows of up to `widest` values.

    `streams` is how many layers' blocks a worker holds at once (2 for adjacent
    pairs and diffs, L for all-pairs); the block shrinks as it grows. A run of
    fewer than IN_PROCESS_BYTES (`nbytes`) stays in this process unless `jobs`
    says otherwise: forking the workers costs more than they save there."""
    jobs = jobs or (1 if nbytes is not None and nbytes < IN_PROCESS_BYTES else usable_cpus())
    base = rss_bytes()
    per_element = BYTES_PER_ELEMENT * max(streams, 2) // 2
    while jobs > 1 and (max_memory - base * (jobs + 1)) // jobs < MIN_BLOCK * per_element:
        jobs -= 1
    held = base * (jobs + 1) if jobs > 1 else base
    block = (max_memory - held) // (jobs * per_element)
    at_once = f" with {streams} layers' blocks at once" if streams > 2 else ""
    if block < MIN_BLOCK:
        need = held + MIN_BLOCK * per_element
        raise BudgetError(
            "max_memory",
            f"{max_memory // MiB} MiB is too small{at_once}: this process already uses {base // MiB} MiB, "
            f"and this needs at least {-(-need // MiB)} MiB",
        )
    if widest > block:
        need = held + widest * jobs * per_element
        raise BudgetError(
            "max_memory",
            f"{max_memory // MiB} MiB is too small for rows of {widest} values{at_once}"
            f" (it needs at least {-(-need // MiB)} MiB)",
        )
    return Budget(max_memory, base, jobs, min(max_block or MAX_BLOCK, block))
