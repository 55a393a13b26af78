#!/usr/bin/env python
"""Speed of `layerdiff scan --rank` against the SVD route, on a ~1 GB Qwen3-shaped bf16 checkpoint.

    python benchmarks/rank_speed.py [--params 500M] [--workdir /tmp/layerdiff-bench]
                                    [--max-memory 256M] [--svd-pairs 1] [--svd-threads default,1]
                                    [--json OUT]

(a) `layerdiff scan MODEL --rank --max-memory 256M` as a measured child: wall time and the
    peak RSS of its whole process tree (sampled from /proc every 20 ms);
(b) the SVD route, the seed's step 4 as it was meant to run: for each residual, load both
    layers as float32 copies (safetensors + ml_dtypes), D = Wb/|Wb| - Wa/|Wa| in float32,
    numpy.linalg.svd(D, compute_uv=False), the seed's spec_entropy. Run as a measured child
    too, once with numpy's default BLAS threads (what the seed gets) and once pinned to one
    thread (faster on this 2-vCPU machine: LAPACK's threaded bidiagonalisation loses).
    An SVD of a 9728x2560 matrix takes ~20 s here, so by default only the first
    --svd-pairs pair(s) of every family are timed and the total is extrapolated to all
    pairs (time per family x pairs); the output says so. --svd-pairs 0 times them all.
Printed: both walls, the ratios, peak RSS against the budget, and the largest difference
between scan --rank's spectral entropies (float64 Gram eigenvalues) and the float32 SVD's on
the residuals both computed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

FAMILIES = {  # canonical -> tensor name suffix (Qwen3)
    "q_proj": "self_attn.q_proj.weight", "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight", "o_proj": "self_attn.o_proj.weight",
    "gate_proj": "mlp.gate_proj.weight", "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
}


def svd_child(argv: list[str]) -> None:
    """The SVD route for the given pairs; prints one JSON line."""
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--pairs", required=True, help="comma-separated L of the pairs (L, L+1)")
    ap.add_argument("--threads", default="default")
    a = ap.parse_args(argv)
    if a.threads != "default":
        from threadpoolctl import threadpool_limits

        threadpool_limits(int(a.threads))
    import ml_dtypes  # noqa: F401  (bf16 for safetensors' numpy loader)
    import numpy as np
    from safetensors import safe_open

    index = os.path.join(a.model, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            where = {k: os.path.join(a.model, v) for k, v in json.load(f)["weight_map"].items()}
    else:
        where = None

    def load(name: str):
        path = where[name] if where else os.path.join(a.model, "model.safetensors")
        with safe_open(path, framework="numpy") as f:
            return f.get_tensor(name).astype(np.float32)

    def spec_entropy(singvals, eps=1e-12):  # the seed's
        p = singvals**2
        p = p / max(p.sum(), eps)
        p = np.clip(p, eps, 1.0)
        return float(-(p * np.log(p)).sum())

    out = []
    for L in [int(x) for x in a.pairs.split(",")]:
        for fam, suffix in FAMILIES.items():
            t0 = time.perf_counter()
            wa, wb = load(f"model.layers.{L}.{suffix}"), load(f"model.layers.{L + 1}.{suffix}")
            t1 = time.perf_counter()
            d = wb / max(float(np.linalg.norm(wb)), 1e-12) - wa / max(float(np.linalg.norm(wa)), 1e-12)
            s = np.linalg.svd(d, compute_uv=False)
            h = spec_entropy(s)
            t2 = time.perf_counter()
            out.append({"L": L, "family": fam, "shape": list(d.shape), "load_s": t1 - t0, "svd_s": t2 - t1,
                        "entropy": h})
            del wa, wb, d
    print(json.dumps(out))


def main(argv: list[str] | None = None) -> int:
    import _proc

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="500M", help="checkpoint size in parameters (default 500M: ~1.1 GB)")
    ap.add_argument("--workdir", default="/tmp/layerdiff-bench")
    ap.add_argument("--max-memory", default="256M")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--svd-pairs", type=int, default=1, help="pairs per family to time the SVD on (0: all)")
    ap.add_argument("--svd-threads", default="default,1", help="BLAS threads for the SVD route runs")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args(argv)

    from make_checkpoint import make_checkpoint, parse_params

    model = os.path.join(a.workdir, f"ck-rank-{a.params}")
    info = make_checkpoint(model, parse_params(a.params), reuse=True, single_file=False, verbose=False)
    layers = info["layers"]
    pairs = list(range(layers - 1))
    size = sum(os.path.getsize(f) for f in _proc.shard_files(model))
    print(f"checkpoint {model}: {layers} layers, {size / 1e9:.2f} GB bf16 (Qwen3-4B shapes)")
    for f in _proc.shard_files(model):  # warm the page cache for both routes
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass

    # (a) scan --rank
    out_json = os.path.join(a.workdir, "rank_speed.json")
    r, doc = _proc.run_scan(model, out_json, max_memory=a.max_memory, jobs=a.jobs, extra=["--rank"])
    if r.returncode != 0 or doc is None:
        print("scan --rank failed:", _proc.fail_line(r))
        return 1
    budget = _parse_size(a.max_memory)
    ok_mem = r.peak_tree_rss <= budget
    rank = doc["settings"]["rank"]
    print(f"\nlayerdiff scan --rank: {r.wall:.1f} s wall (rank pass {doc['run']['rank_seconds']:.1f} s), "
          f"peak tree RSS {_proc.fmt_mib(r.peak_tree_rss)} MiB of a {budget >> 20} MiB budget "
          f"({'within' if ok_mem else 'OVER'}); {rank['families']} families x {len(pairs)} pairs exact, "
          f"{rank['tasks_at_once']} at once ({rank['blas_threads_per_task']} BLAS thread(s) each); "
          f"load average {os.getloadavg()[0]:.2f}")

    # (b) the SVD route
    timed = pairs if a.svd_pairs <= 0 else pairs[: a.svd_pairs]
    routes = {}
    for threads in a.svd_threads.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--svd-child", model, "--pairs",
               ",".join(map(str, timed)), "--threads", threads]
        rs = _proc.run_measured(cmd, capture=True)
        if rs.returncode != 0:
            print(f"SVD route ({threads} threads) failed:", _proc.fail_line(rs))
            return 1
        rows = json.loads(rs.stdout.strip().splitlines()[-1])
        per_pair = (rs.wall) / len(timed)
        total = per_pair * len(pairs)
        routes[threads] = {"wall_timed": rs.wall, "pairs_timed": len(timed), "wall_all_pairs": total,
                           "peak_rss": rs.peak_tree_rss, "rows": rows}
        note = "" if len(timed) == len(pairs) else f" (timed {len(timed)} of {len(pairs)} pairs, extrapolated)"
        print(f"SVD route, BLAS threads {threads}: {total:.1f} s for all pairs{note}, "
              f"peak RSS {_proc.fmt_mib(rs.peak_tree_rss)} MiB; per residual: "
              + ", ".join(f"{x['family']} {x['svd_s']:.1f}s" for x in rows if x["L"] == timed[0]))

    # agreement on the residuals both computed
    pairs_doc = {pr["L"]: pr["families"] for pr in doc["stacks"]["model.layers"]["pairs"]}
    worst = 0.0
    for route in routes.values():
        for x in route["rows"]:
            got = pairs_doc[x["L"]][x["family"]]["resid_spec_entropy"]
            worst = max(worst, abs(got - x["entropy"]) / x["entropy"])
    print(f"\nspectral entropy, scan --rank (float64 Gram) vs float32 SVD: max relative difference {worst:.1e} "
          f"(the float32 SVD's own error dominates)")
    print("\n| route | wall (s) | ratio SVD/scan | peak RSS (MiB) |")
    print("|---|---|---|---|")
    print(f"| layerdiff scan --rank (all {len(pairs)} pairs, exact) | {r.wall:.1f} | 1.0 | {_proc.fmt_mib(r.peak_tree_rss)} |")
    for threads, route in routes.items():
        print(f"| SVD route, BLAS threads {threads} | {route['wall_all_pairs']:.1f} | "
              f"{route['wall_all_pairs'] / r.wall:.2f} | {_proc.fmt_mib(route['peak_rss'])} |")
    best = min(route["wall_all_pairs"] for route in routes.values())
    print(f"\nscan --rank is {best / r.wall:.2f}x faster than the fastest SVD route measured "
          f"(target: >= 3x, within the {budget >> 20} MiB budget: {'yes' if ok_mem else 'NO'})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"checkpoint": info, "scan": {"wall": r.wall, "peak_tree_rss": r.peak_tree_rss,
                                                    "rank": rank, "run": doc["run"]},
                       "svd": routes, "max_rel_entropy_diff": worst, "machine": _proc.machine_info(),
                       "load": os.getloadavg()}, f, indent=2)
    return 0 if ok_mem else 1


def _parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().rstrip("IB")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--svd-child":
        svd_child(sys.argv[2:])
    else:
        sys.exit(main())
