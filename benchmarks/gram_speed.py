#!/usr/bin/env python
"""`layerdiff scan --gram` against the plain scan and a plain float64 BLAS GEMM, in one run.

    python benchmarks/gram_speed.py [--params 4B] [--workdir /tmp/layerdiff-bench] [--max-memory 256M]

gram_cos costs O(rows cols min(rows, cols)) flops per layer: it is compute-bound, so its
yardstick is the GEMM rate of this machine. Prints the wall time of `scan` and of `scan
--gram` (peak RSS of the process tree for both), the flops the gram pass did (counted from
the plan: one syrk of min(m, n) per layer, plus a cross product where the smaller side is
not the residual side), the GFLOP/s achieved, and numpy's float64 GEMM GFLOP/s measured
right after with the same number of threads as layerdiff's workers.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import _proc

GEMM = """
import sys, time, numpy as np
from threadpoolctl import threadpool_limits
n = 2048
a, b = np.random.default_rng(0).standard_normal((2, n, n))
with threadpool_limits(int(sys.argv[1])):
    a @ b
    t = time.perf_counter(); reps = 0
    while time.perf_counter() - t < 3.0:
        a @ b; reps += 1
print(2 * n**3 * reps / (time.perf_counter() - t) / 1e9)
"""


def gram_flops(doc: dict) -> float:
    """Flops of the gram pass: per layer one syrk (m n d) of the part; per pair a cross product (2 m n d)
    where the smaller side is not the residual side; the first layer of a run once more (its own syrk)."""
    total = 0.0
    for st in doc["stacks"].values():
        for fam, info in st["families"].items():
            shape = info.get("part_shape") or info["shape"]
            if len(shape) != 2 or info.get("experts"):
                continue
            pairs = [p for p in st["pairs"] if p["families"].get(fam, {}).get("gram_cos") is not None]
            if not pairs:
                continue
            m, n = shape
            d = min(m, n)
            cross = fam in doc["gram_cross"]
            total += (len(pairs) + 1) * m * n * d + len(pairs) * (2 * m * n * d if cross else 0)
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="4B")
    ap.add_argument("--workdir", default="/tmp/layerdiff-bench")
    ap.add_argument("--max-memory", default="256M")
    a = ap.parse_args(argv)
    params = _proc.parse_params(a.params)
    ck = _proc.checkpoint_dir(a.workdir, params, 0)
    info, _ = _proc.ensure_checkpoint(ck, params, quiet=True)
    print(f"checkpoint {ck}: {info['total_bytes'] / 1e9:.2f} GB, {info['layers']} layers")
    plain, _ = _proc.run_scan(ck, os.path.join(a.workdir, "plain.json"), max_memory=a.max_memory)
    r, doc = _proc.run_scan(ck, os.path.join(a.workdir, "gram.json"), max_memory=a.max_memory, extra=["--gram"])
    if doc is None:
        print(f"scan --gram failed: {_proc.fail_line(r)}")
        return 1
    from layerdiff.engine.centred import plan_centred  # the cross/same choice, as the scan made it
    import layerdiff
    from layerdiff.engine.plan import plan_scan

    model = layerdiff.open_model(ck)
    opts = layerdiff.scan_options(max_memory=a.max_memory, gram=True)
    cp = plan_centred(plan_scan(model.layout, opts), model.layout, opts)
    doc["gram_cross"] = {t.family for t in cp.tasks if t.cross}
    flops = gram_flops(doc)
    workers = doc["settings"]["gram"]["workers"]
    threads = workers if workers > 1 else os.cpu_count() or 1  # in-process: all cores' BLAS threads
    gemm = float(subprocess.run([sys.executable, "-c", GEMM, str(threads)], capture_output=True, text=True,
                                check=True).stdout)
    extra = r.wall - plain.wall
    print(f"scan:        {plain.wall:.2f} s wall, peak tree RSS {_proc.fmt_mib(plain.peak_tree_rss)} MiB")
    print(f"scan --gram: {r.wall:.2f} s wall, peak tree RSS {_proc.fmt_mib(r.peak_tree_rss)} MiB "
          f"(budget {a.max_memory}); {doc['settings']['gram']['families']} family runs, {workers} worker(s)")
    print(f"gram pass: {flops / 1e9:.0f} GFLOP in about {extra:.2f} s = {flops / max(extra, 1e-9) / 1e9:.1f} GFLOP/s; "
          f"numpy float64 GEMM with {threads} thread(s): {gemm:.1f} GFLOP/s "
          f"-> {flops / max(extra, 1e-9) / 1e9 / gemm:.2f} of GEMM speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
