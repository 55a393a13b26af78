"""The fused kernels (layerdiff.engine.fused): C variants and numpy, against a
float64 reference on the fully decoded data and against each other."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from conftest import EXAMPLE
from layerdiff.engine import fused

try:
    from layerdiff.engine import _ckernel
except ImportError as e:  # not built: the C tests skip, the numpy ones run
    _ckernel = None
    _WHY = f"the compiled kernel is not built ({e}); pip install -e . builds it"

NP_DTYPES = {
    "BF16": ml_dtypes.bfloat16,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
NARROW = ("BF16", "F16", "F8_E4M3", "F8_E5M2")
COS_TOL = 1e-8

KERNEL_IDS = ["numpy"] + (["c:" + v for v in _ckernel.isas()] if _ckernel else ["c"])


@pytest.fixture(params=KERNEL_IDS)
def kern(request):
    """Each kernel: numpy, and every C variant this CPU runs."""
    if request.param == "numpy":
        yield fused.kernel("numpy")
        return
    if _ckernel is None:
        pytest.skip(_WHY)
    before = _ckernel.isa()
    _ckernel.set_isa(request.param[2:])
    try:
        yield fused.kernel("c")
    finally:
        _ckernel.set_isa(before)


def encode(v: np.ndarray, code: str) -> np.ndarray:
    """float64 values -> the raw bytes of `code`, as unsigned integers."""
    t = np.dtype(NP_DTYPES[code])
    return v.astype(t).view(UINT[t.itemsize])


def ref(raw: np.ndarray, code: str) -> np.ndarray:
    """Raw bytes -> float64, through ml_dtypes/numpy: the reference decode."""
    return raw.view(NP_DTYPES[code]).astype(np.float64)


def ref_sums(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    x, y = x.reshape(-1), y.reshape(-1)
    return float(np.dot(x, x)), float(np.dot(y, y)), float(np.dot(x, y))


def cos(aa: float, bb: float, ab: float) -> float:
    return ab / np.sqrt(aa * bb)


def data(kind: str, shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape)
    if kind == "random":  # correlated, cos ~ 0.6
        b = 0.6 * a + 0.8 * rng.standard_normal(shape)
    elif kind == "positive":
        a = np.abs(a) + 0.1
        b = a * rng.uniform(0.5, 1.5, shape)
    elif kind == "orthogonal":  # independent: cos ~ 1/sqrt(n)
        b = rng.standard_normal(shape)
    elif kind == "identical":  # 1 - cos ~ 1e-5, many equal positions after rounding
        b = a * (1 + 0.003 * rng.standard_normal(shape))
    elif kind == "heavy":  # heavy tails (Student t, 3 dof), nearly identical: the worst case of float32 runs
        a = rng.standard_t(3, shape)
        b = a * (1 + 0.01 * rng.standard_normal(shape))
    else:
        raise ValueError(kind)
    return a, b


def views(a: np.ndarray) -> dict[str, np.ndarray]:
    """The raw views the passes hand to the kernel (rows contiguous)."""
    rows, cols = a.shape
    return {
        "whole": a,
        "band": a[rows // 3 : rows // 3 + max(1, rows // 2)],
        "columns": a[:, cols // 5 : cols // 5 + max(1, cols // 2) + 1],
        "one-row": a[1:2],
        "flat": a.reshape(-1),
    }


# ---- accuracy against float64 ----------------------------------------------


@pytest.mark.parametrize("kind", ["random", "positive", "orthogonal", "identical", "heavy"])
@pytest.mark.parametrize("code", ["BF16", "F16", "F8_E4M3", "F32"])
def test_pair_sums_match_float64(kern, kind, code):
    a, b = data(kind, (301, 1031))
    ra, rb = encode(a, code), encode(b, code)
    for name, va in views(ra).items():
        vb = views(rb)[name]
        aa, bb, ab = kern.pair_sums(va, code, vb, code)
        raa, rbb, rab = ref_sums(ref(va, code), ref(vb, code))
        tol = 1e-6 if code in NARROW else 1e-12
        assert aa == pytest.approx(raa, rel=tol) and bb == pytest.approx(rbb, rel=tol), (name, aa, raa)
        assert abs(ab - rab) <= tol * np.sqrt(raa * rbb), (name, ab, rab)
        assert abs(cos(aa, bb, ab) - cos(raa, rbb, rab)) <= COS_TOL, (name, cos(aa, bb, ab), cos(raa, rbb, rab))
        assert kern.norm_sum(va, code) == aa


@pytest.mark.parametrize("code", ["BF16", "F16", "F8_E4M3", "F8_E5M2", "F32", "F64"])
def test_next_sums_are_pair_sums_without_aa(kern, code):
    """The chain's call: <b,b> and <a,b> bit for bit as pair_sums gives them (the
    same lanes in the same order, only <a,a> left out), also across dtypes."""
    a, b = data("heavy", (67, 389), seed=5)
    ra, rb = encode(a, code), encode(b, code)
    for name, va in views(ra).items():
        vb = views(rb)[name]
        assert kern.next_sums(va, code, vb, code) == kern.pair_sums(va, code, vb, code)[1:], name
    rf = encode(b, "F32")
    assert kern.next_sums(ra, code, rf, "F32") == kern.pair_sums(ra, code, rf, "F32")[1:]


@pytest.mark.parametrize("kind", ["positive", "orthogonal", "identical", "heavy"])
def test_cosine_over_a_large_tensor(kern, kind):
    """4M values of bf16 (chunk and run boundaries, float64 flushes)."""
    a, b = data(kind, (1024, 4099), seed=1)
    ra, rb = encode(a, "BF16"), encode(b, "BF16")
    aa, bb, ab = kern.pair_sums(ra, "BF16", rb, "BF16")
    raa, rbb, rab = ref_sums(ref(ra, "BF16"), ref(rb, "BF16"))
    assert abs(cos(aa, bb, ab) - cos(raa, rbb, rab)) <= COS_TOL
    assert aa == pytest.approx(raa, rel=1e-7) and bb == pytest.approx(rbb, rel=1e-7)


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 1023, 1024, 1025, 65535, 65537, 200003])
def test_lengths_and_tails(kern, n):
    a, b = data("random", (n,), seed=n)
    ra, rb = encode(a, "BF16"), encode(b, "BF16")
    aa, bb, ab = kern.pair_sums(ra, "BF16", rb, "BF16")
    raa, rbb, rab = ref_sums(ref(ra, "BF16"), ref(rb, "BF16"))
    assert (aa, bb) == (pytest.approx(raa, rel=1e-6), pytest.approx(rbb, rel=1e-6))
    assert abs(ab - rab) <= 1e-6 * np.sqrt(raa * rbb)
    assert kern.norm_sum(ra, "BF16") == aa


@pytest.mark.parametrize("ca, cb", [("BF16", "F32"), ("F16", "BF16"), ("F32", "F64"), ("F8_E5M2", "F16"),
                                    ("F8_E4M3", "BF16"), ("F64", "F64")])
def test_mixed_dtypes(kern, ca, cb):
    """A bf16 checkpoint against an f32 one of the same values, and so on."""
    a, b = data("identical", (77, 515), seed=3)
    ra, rb = encode(a, ca), encode(b, cb)
    for name, va in views(ra).items():
        vb = views(rb)[name]
        x, y = ref(va, ca), ref(vb, cb)
        aa, bb, ab = kern.pair_sums(va, ca, vb, cb)
        assert (aa, bb, ab) == pytest.approx(ref_sums(x, y), rel=1e-12)
        got = kern.diff_sums(va, ca, vb, cb)
        d = (y - x).reshape(-1)
        assert got[3] == pytest.approx(float(np.dot(d, d)), rel=1e-12)
        assert got[4] == int(np.count_nonzero(x == y))
        assert got[5] == float(np.max(np.abs(d), initial=0.0))


@pytest.mark.parametrize("kind", ["random", "identical"])
@pytest.mark.parametrize("code", ["BF16", "F16", "F8_E4M3", "F8_E5M2", "F32", "F64"])
def test_diff_sums(kern, kind, code):
    a, b = data(kind, (129, 1030), seed=5)
    ra, rb = encode(a, code), encode(b, code)
    for name, va in views(ra).items():
        vb = views(rb)[name]
        x, y = ref(va, code), ref(vb, code)
        aa, bb, ab, dd, equal, mx = kern.diff_sums(va, code, vb, code)
        assert (aa, bb, ab) == pytest.approx(ref_sums(x, y), rel=1e-12)  # diff sums all in float64
        d = (y - x).reshape(-1)
        assert dd == pytest.approx(float(np.dot(d, d)), rel=1e-12)
        assert equal == int(np.count_nonzero(x == y))
        assert mx == float(np.max(np.abs(d)))
        assert type(equal) is int


def test_diff_of_identical_tensors(kern):
    a, _ = data("random", (50, 333))
    r = encode(a, "BF16")
    aa, bb, ab, dd, equal, mx = kern.diff_sums(r, "BF16", r.copy(), "BF16")
    assert (dd, equal, mx) == (0.0, r.size, 0.0)
    assert aa == bb == ab


# ---- decoding ----------------------------------------------------------------


@pytest.mark.parametrize("code", ["BF16", "F16", "F8_E4M3", "F8_E5M2"])
@pytest.mark.parametrize("out_dtype", [np.float32, np.float64])
def test_decode_every_bit_pattern(kern, code, out_dtype):
    size = np.dtype(NP_DTYPES[code]).itemsize
    raw = np.arange(1 << (8 * size), dtype=UINT[size]).reshape(16, -1)
    out = np.full(raw.shape, 7.0, out_dtype)
    kern.decode(raw, code, out)
    with np.errstate(invalid="ignore"):
        want = raw.view(NP_DTYPES[code]).astype(out_dtype)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(out), nan)
    ui = UINT[np.dtype(out_dtype).itemsize]
    assert np.array_equal(out[~nan].view(ui), want[~nan].view(ui))  # bit for bit: signed zeros too


@pytest.mark.parametrize("code", ["F32", "F64"])
@pytest.mark.parametrize("out_dtype", [np.float32, np.float64])
def test_decode_wide(kern, code, out_dtype):
    a, _ = data("random", (33, 101))
    raw = encode(a * 1e3, code)
    out = np.zeros(raw.shape, out_dtype)
    kern.decode(raw, code, out)
    assert np.array_equal(out, raw.view(NP_DTYPES[code]).astype(out_dtype))


def test_decode_strided_into_strided(kern):
    a, _ = data("random", (40, 300))
    raw = encode(a, "BF16")
    big = np.zeros((40, 500), np.float32)
    kern.decode(raw[:, 10:210], "BF16", big[:, 100:300])
    assert np.array_equal(big[:, 100:300], ref(raw[:, 10:210], "BF16"))
    assert not big[:, :100].any() and not big[:, 300:].any()


def test_f8_table_matches_ml_dtypes():
    for code in ("F8_E4M3", "F8_E5M2"):
        u = np.arange(256, dtype=np.uint8)
        want = u.view(NP_DTYPES[code]).astype(np.float32)
        got = fused._f8_table(code, np.float32)
        assert np.array_equal(got, want, equal_nan=True)
        assert np.array_equal(np.signbit(got), np.signbit(want))


# ---- non-finite values ---------------------------------------------------------


def test_inf_and_nan_propagate(kern):
    a, b = data("random", (20, 100))
    a[3, 7] = np.inf
    ra, rb = encode(a, "BF16"), encode(b, "BF16")
    aa, bb, ab = kern.pair_sums(ra, "BF16", rb, "BF16")
    assert aa == np.inf and np.isfinite(bb) and abs(ab) == np.inf
    b[3, 7] = np.nan
    rb = encode(b, "BF16")
    aa, bb, ab, dd, equal, mx = kern.diff_sums(ra, "BF16", rb, "BF16")
    assert aa == np.inf and np.isnan(bb) and np.isnan(ab) and np.isnan(dd) and np.isnan(mx)
    x, y = ref(ra, "BF16"), ref(rb, "BF16")
    assert equal == int(np.count_nonzero(x == y))


def test_inf_minus_inf_is_nan_max(kern):
    a = np.array([1.0, np.inf, 2.0])
    for code in ("F16", "F32"):
        ra = encode(a, code)
        *_, dd, equal, mx = kern.diff_sums(ra, code, ra.copy(), code)
        assert np.isnan(dd) and np.isnan(mx) and equal == 3  # inf == inf


def test_nan_is_not_equal_and_zeros_are(kern):
    a = np.array([np.nan, 0.0, -0.0, 1.0])
    b = np.array([np.nan, -0.0, 0.0, 1.0])
    for code in ("BF16", "F64"):
        *_, equal, mx = kern.diff_sums(encode(a, code), code, encode(b, code), code)
        assert equal == 3 and np.isnan(mx)


def test_bf16_squares_beyond_float32(kern):
    """C sums bf16 squares in float32 lanes (inf beyond 3.4e38); numpy in float64."""
    a = np.full(10, 1e20)
    r = encode(a, "BF16")
    assert kern.norm_sum(r, "BF16") == (np.inf if kern.name == "c" else pytest.approx(1e41, rel=1e-2))
    assert kern.norm_sum(encode(a, "F32"), "F32") == pytest.approx(1e41, rel=1e-6)  # F32 sums in double


# ---- inputs ------------------------------------------------------------------


def test_ml_dtypes_arrays_and_float_views(kern):
    a, b = data("random", (10, 40))
    x, y = a.astype(ml_dtypes.bfloat16), b.astype(ml_dtypes.bfloat16)
    want = kern.pair_sums(x.view(np.uint16), "BF16", y.view(np.uint16), "BF16")
    assert kern.pair_sums(x, "BF16", y, "BF16") == want
    f = a.astype(np.float32)
    assert kern.norm_sum(f, "F32") == kern.norm_sum(f.view(np.uint32), "F32")
    assert kern.norm_sum(a.astype(np.float16), "F16") == kern.norm_sum(a.astype(np.float16).view(np.uint16), "F16")


def test_read_only_and_unaligned_inputs(kern):
    a, b = data("random", (1000,))
    ra, rb = encode(a, "BF16"), encode(b, "BF16")
    want = kern.pair_sums(ra, "BF16", rb, "BF16")
    buf = bytearray(1 + 2 * ra.size)
    buf[1:] = ra.tobytes()
    odd = np.frombuffer(bytes(buf), dtype=np.uint16, offset=1)  # read-only, odd address
    assert not odd.flags.writeable and not odd.flags.aligned
    assert kern.pair_sums(odd, "BF16", rb, "BF16") == want


@pytest.mark.parametrize(
    "call, msg",
    [
        (lambda k: k.norm_sum(np.zeros(4, np.uint32), "BF16"), "bytes"),
        (lambda k: k.norm_sum(np.zeros((4, 4), np.uint16)[:, ::2], "BF16"), "contiguous"),
        (lambda k: k.norm_sum(np.zeros((2, 2, 2), np.uint16), "BF16"), "dimensions"),
        (lambda k: k.norm_sum(np.zeros(4, np.uint16), "BF17"), "dtype code"),
        (lambda k: k.pair_sums(np.zeros(4, np.uint16), "BF16", np.zeros(5, np.uint16), "BF16"), "shape"),
        (lambda k: k.decode(np.zeros(4, np.uint16), "BF16", np.zeros(4, np.float16)), "float32 or float64"),
        (lambda k: k.decode(np.zeros(4, np.uint16), "BF16", np.zeros(5, np.float32)), "shape"),
    ],
)
def test_bad_inputs_are_value_errors(kern, call, msg):
    with pytest.raises(ValueError, match=msg):
        call(kern)


# ---- the C kernel's variants, dispatch and build -------------------------------


def needs_c():
    if _ckernel is None:
        pytest.skip(_WHY)


@pytest.mark.parametrize("code", NARROW)
def test_variants_agree_bit_for_bit(code):
    """Same 16 float32 lanes in every variant: the same sums, to the bit."""
    needs_c()
    a, b = data("random", (97, 1003), seed=7)
    ra, rb = encode(a, code), encode(b, code)
    before = _ckernel.isa()
    got = {}
    try:
        for v in _ckernel.isas():
            _ckernel.set_isa(v)
            got[v] = (_ckernel.pair_sums(ra, code, rb, code), _ckernel.next_sums(ra, code, rb, code),
                      _ckernel.diff_sums(ra[:, 1:], code, rb[:, 1:], code))
    finally:
        _ckernel.set_isa(before)
    assert len(set(got.values())) == 1, got


def test_c_and_numpy_agree():
    needs_c()
    c, n = fused.kernel("c"), fused.kernel("numpy")
    for code in ("BF16", "F16", "F8_E4M3", "F32"):
        a, b = data("random", (64, 2000), seed=11)
        ra, rb = encode(a, code), encode(b, code)
        assert c.pair_sums(ra, code, rb, code) == pytest.approx(n.pair_sums(ra, code, rb, code), rel=1e-6)
        cd, nd = c.diff_sums(ra, code, rb, code), n.diff_sums(ra, code, rb, code)
        assert cd[3] == pytest.approx(nd[3], rel=1e-12) and cd[4:] == nd[4:]


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_dispatch_picks_the_preferred_variant():
    needs_c()
    compiled = _ckernel.compiled_isas()
    assert compiled[-1] == "default"
    if platform.machine() not in ("x86_64", "AMD64"):
        assert compiled == ("default",)
        return
    assert compiled == ("avx2", "avx512", "default")  # AVX2 first: see VARIANTS in _ckernel.c
    flags = cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo")
    if {"avx2", "fma", "f16c"} <= flags:
        best = "avx2"
    elif {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"} <= flags:
        best = "avx512"
    else:
        best = "default"
    assert _ckernel.isas()[0] == best
    assert fused.KERNEL != "c" or fused.isa() == best or os.environ.get("LAYERDIFF_KERNEL") == "numpy"
    with pytest.raises(ValueError):
        _ckernel.set_isa("sse9")


def test_the_build_has_avx2_and_avx512_code():
    """Vector code really was generated for each variant (not only the names)."""
    needs_c()
    if platform.machine() != "x86_64":
        pytest.skip("x86_64 only")
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("no objdump")
    asm = subprocess.run([objdump, "-d", "--no-show-raw-insn", _ckernel.__file__], capture_output=True, text=True,
                         check=True).stdout
    assert "%zmm" in asm and "%ymm" in asm
    assert "vfmadd231ps" in asm  # float32 lanes with FMA in the avx2/avx512 loops
    assert "vcvtph2ps" in asm  # F16 converted by F16C there


def test_the_gil_is_released():
    """Python code runs in another thread while a long kernel call is in C."""
    needs_c()
    n = 1 << 25
    a = np.zeros(n, np.uint16)
    done = threading.Event()
    span = []

    def work():
        t0 = time.perf_counter()
        _ckernel.pair_sums(a, "BF16", a, "BF16")
        span.extend([t0, time.perf_counter()])
        done.set()

    ticks = []
    th = threading.Thread(target=work)
    th.start()
    while not done.is_set():
        ticks.append(time.perf_counter())
    th.join()
    t0, t1 = span
    assert any(t0 < t < t1 for t in ticks)


# ---- the facade ------------------------------------------------------------------


def run_py(code: str, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "LAYERDIFF_KERNEL"}
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=60)


def test_kernel_numpy_is_forced_quietly():
    r = run_py("from layerdiff.engine import fused; print(fused.KERNEL, fused.isa())", LAYERDIFF_KERNEL="numpy")
    assert r.returncode == 0 and r.stdout.split() == ["numpy", "numpy"] and r.stderr == ""


BLOCK_EXT = "import sys; sys.modules['layerdiff.engine._ckernel'] = None\n"


def test_missing_extension_falls_back_with_one_note():
    r = run_py(BLOCK_EXT + "from layerdiff.engine import fused\nimport importlib; importlib.reload(fused)\n"
               "print(fused.KERNEL)")
    assert r.returncode == 0 and r.stdout.split() == ["numpy"]
    notes = r.stderr.splitlines()
    assert len(notes) == 2  # one per import (the reload is a second import)
    assert notes[0].startswith("layerdiff: note: compiled kernel not available (") and "numpy kernel" in notes[0]


def test_missing_extension_with_kernel_c_is_an_error():
    r = run_py(BLOCK_EXT + "from layerdiff.engine import fused", LAYERDIFF_KERNEL="c")
    assert r.returncode != 0 and "LAYERDIFF_KERNEL=c" in r.stderr


def test_default_is_c_when_built():
    needs_c()
    r = run_py("from layerdiff.engine import fused; print(fused.KERNEL)")
    assert r.returncode == 0 and r.stdout.split() == ["c"] and r.stderr == ""


def test_no_ml_dtypes_import():
    """ml_dtypes costs ~0.7 s of start-up: the kernels never need it."""
    r = run_py("import sys\nfrom layerdiff.engine import fused\nimport numpy as np\n"
               "for k in ('numpy',) + (('c',) if fused.KERNEL == 'c' else ()):\n"
               "    kk = fused.kernel(k)\n"
               "    for code in ('BF16', 'F16', 'F8_E4M3', 'F8_E5M2'):\n"
               "        raw = np.arange(256, dtype=np.uint8 if code.startswith('F8') else np.uint16)\n"
               "        kk.pair_sums(raw, code, raw, code); kk.decode(raw, code, np.empty(256, np.float32))\n"
               "print('ml_dtypes' in sys.modules)")
    assert r.returncode == 0 and r.stdout.split() == ["False"], r.stderr


def test_a_scan_never_imports_ml_dtypes():
    """Blocks are raw unsigned views decoded by the kernel: no 0.7 s ml_dtypes import,
    also for fp8 weights with block scales."""
    fp8 = str(Path(__file__).parent / "fixtures" / "st" / "fp8_block")
    r = run_py("import sys, layerdiff\n"
               f"layerdiff.scan({str(EXAMPLE)!r}, jobs=1)\n"
               f"layerdiff.scan({fp8!r}, jobs=1)\n"
               "print('ml_dtypes' in sys.modules)")
    assert r.returncode == 0 and r.stdout.split() == ["False"], r.stderr


def test_numpy_chain_reuse_is_exact_and_safe():
    """The numpy kernel keeps the last b for a chain of pair_sums: the same sums
    as fresh calls, whatever comes in between."""
    k = fused.kernel("numpy")
    blocks = [encode(data("random", (64, 300), seed=s)[0], "BF16") for s in range(4)]
    fresh = [fused.NumpyKernel().pair_sums(x, "BF16", y, "BF16") for x, y in zip(blocks, blocks[1:])]
    got = []
    for x, y in zip(blocks, blocks[1:]):
        k.norm_sum(blocks[3], "BF16")  # other calls in between must not disturb the reuse
        k.diff_sums(blocks[0], "BF16", blocks[2], "BF16")
        got.append(k.pair_sums(x, "BF16", y, "BF16"))
    assert got == fresh
    blocks[1][0, 0] ^= 1  # a changed block that is not the same object is decoded again
    assert k.pair_sums(blocks[1].copy(), "BF16", blocks[2], "BF16") == fused.NumpyKernel().pair_sums(
        blocks[1], "BF16", blocks[2], "BF16")
