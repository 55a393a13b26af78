"""Microbenchmark of the fused kernels: GB/s of input (bf16 by default) on one core.

C and numpy side by side in one run, on the same warm arrays, with the speed
of just reading those bytes (numpy uint64 sum, the read ceiling) measured in
between, so that the ratios hold on a busy or a different machine. Each figure
is the best of --repeat rounds; rounds interleave the kernels.

    flock /tmp/bench.lock python benchmarks/kernel_speed.py [--mib 128] [--repeat 5]
        [--ops pair,next,norm,diff,decode] [--dtype BF16|F16|F8_E4M3|F8_E5M2|F32] [--isas]

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


def weights(code: str, n: int, seed: int) -> np.ndarray:
    """n normal values (std 0.02, like weights) in `code`, as raw unsigned integers."""
    x = np.random.default_rng(seed).standard_normal(n, dtype=np.float32) * 0.02
    if code == "BF16":  # round to nearest even, without ml_dtypes
        u = x.view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    if code == "F16":
        return x.astype(np.float16).view(np.uint16)
    if code in ("F32", "F64"):
        return x.astype(np.float32 if code == "F32" else np.float64).view(np.uint32 if code == "F32" else np.uint64)
    import ml_dtypes  # fp8 encoding only; the kernels never import it

    t = ml_dtypes.float8_e4m3fn if code == "F8_E4M3" else ml_dtypes.float8_e5m2
    return (x * 100).astype(t).view(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=128, help="MiB per array (two arrays)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--ops", default="pair,next,norm,diff", help="comma list of pair, next, norm, diff, decode")
    ap.add_argument("--isas", action="store_true", help="also time every C variant this CPU runs")
    ap.add_argument("--dtype", default="BF16", choices=fused.CODES)
    args = ap.parse_args()

    code = args.dtype
    n = (args.mib << 20) // fused.ITEMSIZE[code]  # values per array
    a, b = weights(code, n, 0), weights(code, n, 1)
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
        "pair": (lambda k: k.pair_sums(a, code, b, code), 2 * a.nbytes),
        "next": (lambda k: k.next_sums(a, code, b, code), 2 * a.nbytes),
        "norm": (lambda k: k.norm_sum(a, code), a.nbytes),
        "diff": (lambda k: k.diff_sums(a, code, b, code), 2 * a.nbytes),
        "decode": (lambda k: k.decode(a, code, out), a.nbytes),
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
    print(f"kernel_speed: 2 x {args.mib} MiB of {code}, warm, one thread, best of {args.repeat}")
    print(f"  read ceiling (numpy uint64 sum over both arrays): {ceiling:6.1f} GB/s")
    for op in chosen:
        for name, _, _ in kernels:
            g = best[f"{op} {name}"]
            print(f"  {op:6s} {name:14s}: {g:6.1f} GB/s of {code} input  ({g / ceiling:.2f} of read)")
        if _ckernel and f"{op} numpy" in best:
            cname = kernels[0][0]
            print(f"  {op:6s} {cname} / numpy: {best[f'{op} {cname}'] / best[f'{op} numpy']:.1f}x")


if __name__ == "__main__":
    main()
