#!/usr/bin/env python
"""`layerdiff sweep` locally against a real dask.distributed cluster of 2 workers, on one machine.

    python benchmarks/sweep_speed.py [--count 8] [--size 1] [--max-memory 256M] [--jobs 2]
                                     [--workdir /tmp/layerdiff-bench] [--cold] [--keep]

COUNT synthetic Qwen3-shaped checkpoints of SIZE GB each (make_checkpoint.py, seeds
0..COUNT-1; reused from WORKDIR when present) are swept twice, each time into a fresh
--out-dir, drift against the first:

  local: `layerdiff sweep CK... --jobs JOBS --max-memory M`, the whole process tree's RSS
         sampled every 20 ms (_proc.run_measured);
  dask:  `dask scheduler` and 2 x `dask worker --nworkers 1 --nthreads 1` on 127.0.0.1,
         then `layerdiff sweep CK... --dask ADDRESS --max-memory M`; each worker's process
         tree (nanny + worker process) sampled from outside every 20 ms, its idle RSS
         before the sweep printed next to its peak.

Printed: wall time, read rate (every scan reads its checkpoint, every drift both sides),
peak RSS (local tree; per dask worker; the dask client), and whether the two tables are
identical (else the largest relative difference: float64 sums of row blocks added in
another order, the blocks being planned from each process's own budget). The page cache is warm
(one untimed `cat` first) unless --cold, which drops it before each run (root only).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import _proc


def sample_trees(roots: list[int], stop: threading.Event, peaks: list[int], interval: float = 0.02) -> None:
    use_cf = _proc._has_children_file()
    while not stop.is_set():
        for i, root in enumerate(roots):
            tot = sum((_proc.proc_mem(p) or {}).get("VmRSS", 0) for p in _proc.tree_pids(root, use_cf))
            peaks[i] = max(peaks[i], tot)
        time.sleep(interval)


def tree_rss(root: int) -> int:
    return sum((_proc.proc_mem(p) or {}).get("VmRSS", 0) for p in _proc.tree_pids(root))


def read_rows(path: str) -> list[tuple]:
    with open(path, newline="") as f:
        r = csv.reader(f)
        next(r)
        return [tuple(row[:8]) + (float(row[8]),) for row in r]


def compare(a: list[tuple], b: list[tuple]) -> str:
    if a == b:
        return f"identical ({len(a)} rows)"
    if [r[:8] for r in a] != [r[:8] for r in b]:
        return f"DIFFERENT rows ({len(a)} vs {len(b)})"
    worst = max(abs(x[8] - y[8]) / max(abs(y[8]), 1e-300) for x, y in zip(a, b))
    return f"same {len(a)} rows, values equal to {worst:.1e} relative (float64 summation order)"


def start_cluster(workdir: str, env: dict) -> tuple[list[subprocess.Popen], str]:
    dask = os.path.join(os.path.dirname(sys.executable), "dask")
    sched_file = os.path.join(workdir, "scheduler.json")
    if os.path.exists(sched_file):
        os.remove(sched_file)
    log = open(os.path.join(workdir, "cluster.log"), "w")
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", sched_file], stdout=log, stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)]
    deadline = time.monotonic() + 120
    while not os.path.exists(sched_file):
        if time.monotonic() > deadline or procs[0].poll() is not None:
            raise RuntimeError("the dask scheduler did not start (see cluster.log)")
        time.sleep(0.1)
    for _ in range(2):
        procs.append(subprocess.Popen([dask, "worker", "--scheduler-file", sched_file, "--nworkers", "1",
                                       "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"],
                                      stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
    from distributed import Client

    with open(sched_file) as f:
        address = json.load(f)["address"]
    with Client(address, timeout=60) as c:
        c.wait_for_workers(2, timeout=120)
    return procs, address


def stop_cluster(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--size", type=float, default=1.0, help="GB (1e9 bytes) per checkpoint")
    ap.add_argument("--max-memory", default="256M")
    ap.add_argument("--jobs", type=int, default=2, help="local worker processes")
    ap.add_argument("--workdir", default="/tmp/layerdiff-bench")
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the sweep outputs")
    a = ap.parse_args(argv)
    os.makedirs(a.workdir, exist_ok=True)
    params = int(a.size * 1e9 / 2)
    cks = []
    for seed in range(a.count):
        d = _proc.checkpoint_dir(a.workdir, params, seed)
        _proc.ensure_checkpoint(d, params, seed, quiet=True)
        cks.append(d)
    files = [f for d in cks for f in _proc.shard_files(d)]
    total = sum(os.path.getsize(f) for f in files)
    out = os.path.join(a.workdir, "sweep-bench")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    cmd = _proc.layerdiff_cmd() + ["sweep", *cks, "--max-memory", a.max_memory, "--quiet"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def warm_or_cold() -> None:
        if a.cold:
            _proc.drop_caches()
        else:
            _proc.cat_time(files, repeat=1, warm=False)

    read = total + 2 * (a.count - 1) * total / a.count  # every scan, and both sides of every drift
    print(f"sweep_speed: {a.count} checkpoints x {total / a.count / 1e9:.2f} GB = {total / 1e9:.2f} GB, "
          f"{read / 1e9:.2f} GB read (scans + both sides of {a.count - 1} drifts), --max-memory {a.max_memory}, "
          f"{'cold' if a.cold else 'warm'} page cache, {_proc.machine_info()['cores']} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    warm_or_cold()
    local = _proc.run_measured(cmd + ["--jobs", str(a.jobs), "--out-dir", f"{out}/local", "--table",
                                      f"{out}/local.csv"], env=env)
    if local.returncode:
        print(f"local: FAILED: {_proc.fail_line(local)}")
        return 1
    print(f"local (--jobs {a.jobs}):            wall {local.wall:7.1f} s  {read / local.wall / 1e9:5.2f} GB/s read  "
          f"peak tree RSS {_proc.fmt_mib(local.peak_tree_rss)} MiB")
    procs, address = start_cluster(a.workdir, env)
    try:
        time.sleep(1.0)
        workers = procs[1:]
        idle = [tree_rss(p.pid) for p in workers]
        peaks = list(idle)
        stop = threading.Event()
        t = threading.Thread(target=sample_trees, args=([p.pid for p in workers], stop, peaks), daemon=True)
        warm_or_cold()
        t.start()
        dask = _proc.run_measured(cmd + ["--dask", address, "--out-dir", f"{out}/dask", "--table",
                                         f"{out}/dask.csv"], env=env)
        stop.set()
        t.join()
    finally:
        stop_cluster(procs)
    if dask.returncode:
        print(f"dask: FAILED: {_proc.fail_line(dask)}")
        return 1
    per = ", ".join(f"{_proc.fmt_mib(p)} (idle {_proc.fmt_mib(i)})" for p, i in zip(peaks, idle))
    print(f"dask (2 workers x 1 thread):  wall {dask.wall:7.1f} s  {read / dask.wall / 1e9:5.2f} GB/s read  "
          f"peak RSS per worker {per} MiB; client {_proc.fmt_mib(dask.peak_tree_rss)} MiB")
    print(f"tables: {compare(read_rows(f'{out}/dask.csv'), read_rows(f'{out}/local.csv'))}")
    if not a.keep:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
