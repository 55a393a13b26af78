#!/usr/bin/env python
"""`layerdiff diff A B` of two synthetic Qwen3-shaped checkpoints against `cat` of both, in one run.

    python benchmarks/diff_speed.py [--params 4B] [--repeat 3] [--workdir /tmp/layerdiff-bench]
                                    [--max-memory 256M] [--jobs N] [--budget 256M]

A and B are written by make_checkpoint.py with different seeds (every tensor differs).
(a) `cat` of A's and B's shards, warm, best of --repeat: the read ceiling;
(b) `layerdiff diff A B --out r.json --quiet`, warm, --repeat times: best and median wall,
    peak RSS of the whole process tree (sampled from /proc, as memory_budget.py does).
Prints diff/cat, the bytes read per side against the bytes of each side, and exits 1 if
the peak tree RSS exceeds --budget.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import _proc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="4B")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/layerdiff-bench")
    ap.add_argument("--max-memory", default="256M")
    ap.add_argument("--budget", default="256M", help="fail when the peak tree RSS is above this")
    ap.add_argument("--jobs", type=int, default=None)
    a = ap.parse_args(argv)
    params = _proc.parse_params(a.params)
    dirs = [_proc.checkpoint_dir(a.workdir, params, seed) for seed in (0, 1)]
    for seed, d in enumerate(dirs):
        _proc.ensure_checkpoint(d, params, seed=seed, quiet=True)
    files = _proc.shard_files(dirs[0]) + _proc.shard_files(dirs[1])
    cat = _proc.cat_time(files, a.repeat)
    print(f"(a) cat {len(files)} shard(s) of A and B, {cat['bytes'] / 1e9:.2f} GB, warm: best {cat['best']:.3f} s "
          f"= {cat['gb_per_s']:.2f} GB/s")
    out = os.path.join(a.workdir, "diff.json")
    cmd = _proc.layerdiff_cmd() + ["diff", dirs[0], dirs[1], "--out", out, "--quiet", "--max-memory", a.max_memory]
    if a.jobs:
        cmd += ["--jobs", str(a.jobs)]
    runs = []
    for _ in range(max(1, a.repeat)):
        r = _proc.run_measured(cmd)
        if r.returncode != 0:
            print(f"(b) layerdiff diff failed: {_proc.fail_line(r)}")
            return 1
        runs.append(r)
    walls = [r.wall for r in runs]
    peak = max(r.peak_tree_rss for r in runs)
    with open(out) as f:
        doc = json.load(f)
    run = doc["run"]
    print(f"(b) layerdiff diff, warm: median {statistics.median(walls):.3f} s, best {min(walls):.3f} s; "
          f"peak tree RSS {_proc.fmt_mib(peak)} MiB; {len(doc['tensors'])} tensors, "
          f"{sum(not t['identical'] for t in doc['tensors'].values())} changed")
    print(f"  diff / cat wall time (best/best)        {min(walls) / cat['best']:.2f}x")
    side = sum(os.path.getsize(f) for f in _proc.shard_files(dirs[0]))
    print(f"  bytes mapped / bytes analysed (A + B)   {run['bytes_mapped'] / (run['bytes_analysed_a'] + run['bytes_analysed_b']):.3f}"
          f"  ({run['bytes_analysed_a']:,} + {run['bytes_analysed_b']:,} of {side:,} per checkpoint)")
    budget = _proc.parse_mem(a.budget)
    verdict = "within" if peak <= budget else "OVER"
    print(f"  peak tree RSS {_proc.fmt_mib(peak)} MiB vs budget {_proc.fmt_mib(budget)} MiB: {verdict}")
    return 0 if peak <= budget else 1


if __name__ == "__main__":
    sys.exit(main())
