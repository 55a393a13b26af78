"""Microbenchmark of the fused kernels: GB/s of bf16 input on one core.

C and numpy side by side in one run, on the same warm arrays, with the speed
of just reading those bytes (numpy uint64 sum, the read ceiling) measured in
between, so that the ratios hold on a busy or a different machine. Each figure
is the best of --repeat rounds; rounds interleave the kernels.

    flock /tmp/bench.lock python benchmarks/kernel_speed.py [--mib 128] [--repeat 5]

Target (issue 13): >= 15 GB/s of bf16 per core.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one core: the numpy kernel's dots too
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from layerdiff.engine import fused  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=128, help="MiB per array (two arrays)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--ops", default="pair,norm,diff", help="comma list of pair, norm, diff, decode")
    ap.add_argument("--isas", action="store_true", help="also time every C variant this CPU runs")
    args = ap.parse_args()

    n = args.mib << 19  # bf16 values per array
    rng = np.random.default_rng(0)
    # Random normal bf16 bit patterns, as in a weight matrix.
    a = (rng.standard_normal(n, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    b = (rng.standard_normal(n, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    out = np.empty(n, np.float32)

    kernels: list[tuple[str, fused.Kernel, str | None]] = []
    try:
        from layerdiff.engine import _ckernel

        c = fused.kernel("c")
        for isa in _ckernel.isas() if args.isas else [_ckernel.isa()]:
            kernels.append((f"C ({isa})", c, isa))
    except ImportError as e:
        print(f"compiled kernel not available: {e}")
        _ckernel = None
    kernels.append(("numpy", fused.kernel("numpy"), None))

    ops = {
        "pair": (lambda k: k.pair_sums(a, "BF16", b, "BF16"), 2 * a.nbytes),
        "norm": (lambda k: k.norm_sum(a, "BF16"), a.nbytes),
        "diff": (lambda k: k.diff_sums(a, "BF16", b, "BF16"), 2 * a.nbytes),
        "decode": (lambda k: k.decode(a, "BF16", out), a.nbytes),
    }
    chosen = [o.strip() for o in args.ops.split(",") if o.strip()]

    def read() -> None:
        a.view(np.uint64).sum()
        b.view(np.uint64).sum()

    best: dict[str, float] = {}

    def timed(key: str, fn, nbytes: int) -> None:
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        best[key] = max(best.get(key, 0.0), nbytes / dt / 1e9)

    default_isa = _ckernel.isa() if _ckernel else None
    for _ in range(args.repeat):  # warm-up round included: best-of takes care of it
        timed("read", read, 2 * a.nbytes)
        for name, k, isa in kernels:
            if isa:
                _ckernel.set_isa(isa)
            for op in chosen:
                fn, nbytes = ops[op]
                timed(f"{op} {name}", lambda: fn(k), nbytes)
        if default_isa:
            _ckernel.set_isa(default_isa)

    ceiling = best["read"]
    print(f"kernel_speed: 2 x {args.mib} MiB of bf16, warm, one thread, best of {args.repeat}")
    print(f"  read ceiling (numpy uint64 sum over both arrays): {ceiling:6.1f} GB/s")
    for op in chosen:
        for name, _, _ in kernels:
            g = best[f"{op} {name}"]
            print(f"  {op:6s} {name:14s}: {g:6.1f} GB/s of bf16 input  ({g / ceiling:.2f} of read)")
        if _ckernel and f"{op} numpy" in best:
            cname = kernels[0][0]
            print(f"  {op:6s} {cname} / numpy: {best[f'{op} {cname}'] / best[f'{op} numpy']:.1f}x")


if __name__ == "__main__":
    main()
