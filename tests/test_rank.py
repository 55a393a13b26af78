"""scan --rank: residual spectra against numpy.linalg.svd of the explicit float64 residual.

The reference loads every tensor with safetensors' own numpy loader (ml_dtypes
for bf16/fp8), applies the family's rows/columns and any block scale in float64,
forms D = W_L+1/|W_L+1| - W_L/|W_L| explicitly, and takes its singular values
with numpy.linalg.svd; entropy follows the seed's `spec_entropy`.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from conftest import EXAMPLE, FIXTURES, load_all, qwen3_like, reference, run_cli, write_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st
from test_scan import assert_matches_reference

import layerdiff.engine.gram as R
import layerdiff.engine.syrk as S
import layerdiff.metrics.spectra as spectra
from layerdiff.checkpoint.index import load_index
from layerdiff.layout import build_layout, grid
from conftest import scan_layout as scan
from layerdiff.engine.plan import plan_scan
from layerdiff.options import ScanOptions
from layerdiff.checkpoint.sources import resolve

REL = 1e-8


def seed_spec_entropy(singvals, eps=1e-12):
    """The seed script's function, copied here so the test does not trust layerdiff's copy."""
    p = singvals**2
    p = p / max(p.sum(), eps)
    p = np.clip(p, eps, 1.0)
    return float(-(p * np.log(p)).sum())


_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


def load_raw(folder) -> dict[str, np.ndarray]:
    """Every floating-point tensor of a checkpoint, read by hand from the files
    (safetensors' numpy loader has no fp8)."""
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        data = f.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        header.pop("__metadata__", None)
        for name, e in header.items():
            if e["dtype"] in _DTYPES:
                a, b = e["data_offsets"]
                out[name] = np.frombuffer(data[8 + n + a : 8 + n + b], dtype=_DTYPES[e["dtype"]]).reshape(e["shape"])
    return out


def open_layout(folder):
    source = resolve(str(folder))
    return build_layout(load_index(source.files, source.index_file), source.config)


def explicit(tensors, seg, i, part) -> np.ndarray:
    """Layer i's matrix of one family, in float64, from the fully loaded tensors."""
    t = seg.tensors[i]
    rows, cols = grid(t.shape)
    w = np.asarray(tensors[t.name]).astype(np.float64).reshape(rows, cols)
    scale = seg.scales[i] if seg.scales else None
    if scale is not None:
        br, bc = seg.scale_block
        s = np.asarray(tensors[scale.name]).astype(np.float64).reshape(grid(scale.shape))
        w = w * np.repeat(np.repeat(s, br, axis=0), bc, axis=1)[:rows, :cols]
    if part.rows is not None:
        w = np.concatenate([w[a:b] for a, b in part.rows])
    if part.cols is not None:
        w = w[:, part.cols[0] : part.cols[1]]
    return w


def truth(a: np.ndarray, b: np.ndarray) -> dict:
    d = b / np.linalg.norm(b) - a / np.linalg.norm(a)
    s = np.linalg.svd(d, compute_uv=False)
    h = seed_spec_entropy(s)
    return {"H": h, "eff": math.exp(h), "stable": float((s**2).sum() / s[0] ** 2), "s": s}


def check_against_svd(folder, **opts) -> int:
    """Every rank number of a scan against the SVD of the explicit residual; returns pairs checked."""
    layout = open_layout(folder)
    opts.setdefault("max_memory", 4 << 30)  # in-process: above this pytest process's own RSS
    options = ScanOptions(rank="exact", **opts)
    plan = plan_scan(layout, options)
    result = scan(layout, options, plan=plan)
    tensors = load_raw(folder)
    checked = 0
    for seg in plan.segments:
        pairs = {pr["L"]: pr["families"] for pr in result["stacks"][seg.stack]["pairs"]}
        for part in seg.parts:
            for i in range(len(seg.layers) - 1):
                got = pairs[seg.layers[i]].get(part.family)
                if len(seg.shape) < 2:
                    assert got is None or got["resid_eff_rank"] is None
                    continue
                a, b = explicit(tensors, seg, i, part), explicit(tensors, seg, i + 1, part)
                if np.linalg.norm(a) < 1e-12 or np.linalg.norm(b) < 1e-12:
                    assert got is None
                    continue
                want = truth(a, b)
                if want["s"][0] == 0:
                    assert got["resid_eff_rank"] == 0.0
                    continue
                assert got["resid_spec_entropy"] == pytest.approx(want["H"], rel=REL), (part.family, i)
                assert got["resid_eff_rank"] == pytest.approx(want["eff"], rel=REL), (part.family, i)
                assert got["resid_stable_rank"] == pytest.approx(want["stable"], rel=REL), (part.family, i)
                assert got["resid_rank_dim"] == min(a.shape)
                checked += 1
    return checked


def test_example_matches_svd_and_fills_seed_keys():
    assert check_against_svd(EXAMPLE) == 5 * 7
    result = scan(open_layout(EXAMPLE), ScanOptions(rank="exact"))
    for pr in result["pair_results"]:  # the seed's keys, now filled for its 2-D families
        for fam, r in pr["families"].items():
            filled = r["resid_eff_rank"] is not None and r["resid_spec_entropy"] is not None
            assert filled == fam.endswith("_proj"), fam
            if filled:
                assert r["resid_eff_rank"] == pytest.approx(math.exp(r["resid_spec_entropy"]), rel=1e-12)


@pytest.mark.parametrize("fixture", [
    "hf/qwen3", "hf/llama", "hf/mistral", "hf/phi3", "hf/gpt2", "hf/gpt_neox", "hf/mixtral", "hf/qwen3_moe",
    "st/fp8_block", "st/dtypes", "st/two_stack", "st/zero_and_shape", "st/negative",
])
def test_fixtures_match_svd(fixture):
    # fused tensors split into families (phi3, gpt_neox, gpt2's Conv1D columns), block-scaled
    # fp8, experts, zero norms, several stacks: every 2-D family and pair.
    assert check_against_svd(FIXTURES / fixture) > 0


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32, np.float64])
def test_dtypes_match_svd(tmp_path, rng, dtype):
    write_checkpoint(tmp_path, qwen3_like(rng, dtype=dtype))
    assert check_against_svd(tmp_path) == 3 * 7


def test_many_blocks_both_sides_numpy_fallback_and_workers(tmp_path, rng, monkeypatch):
    # Tiny blocks: row blocks (tall families) and column blocks walked in row chunks
    # (wide ones) cross many boundaries; without the direct BLAS call, numpy's
    # matmul does the Gram updates and numpy's eigvalsh the eigenvalues; in workers
    # and in-process.
    tensors = qwen3_like(rng, layers=4, hidden=96, ff=160)
    write_checkpoint(tmp_path, tensors, shards=2)
    monkeypatch.setattr(R, "BLOCK_BYTES", 8 * 96 * 7)
    monkeypatch.setattr(R, "MIN_BLOCK_ROWS", 5)
    monkeypatch.setattr(R, "ROW_CHUNK", 13)
    for direct in (False, True):
        if direct:
            S._FNS.clear()
        else:
            monkeypatch.setattr(S, "_FNS", {"syrk": None, "eig": None})
        for jobs in (1, 2):
            assert check_against_svd(tmp_path, jobs=jobs) == 3 * 7
        assert (S.blas_syrk() is not None, S.lapack_eigvalsh() is not None) == (direct, direct)


U64 = np.finfo(np.float64).eps / 2


def float64_bound(m: int, d: int, elems: int, resid: float) -> float:
    """Worst case |delta lambda_i| / |D|_F^2 of the exact path, all in float64: the syrk sums
    of m products (gamma_m |X|^T |X|, whose 2-norm is at most |X|_F^2), the eigensolver
    (backward stable, ~2 d u |G|), X = b - s a rounded per element (8 u / |D|_F) and
    s = |b|/|a| from sums of `elems` squares (2 gamma_elems / |D|_F)."""
    return (m + 2 * d + (8 + 2 * elems) / resid) * U64


def test_concurrent_tasks_match_float64_svd_within_the_bound(tmp_path, rng, monkeypatch):
    # Several families at once on threads (one BLAS thread each), LAPACK's two-stage
    # eigensolver, blocks across row and column boundaries; bf16 as stored.
    tensors = qwen3_like(rng, layers=4, hidden=96, ff=224)
    write_checkpoint(tmp_path, tensors)
    monkeypatch.setattr(R, "BLOCK_BYTES", 8 * 224 * 7)
    monkeypatch.setattr(R, "MIN_BLOCK_ROWS", 5)
    monkeypatch.setattr(R, "ROW_CHUNK", 13)
    layout = open_layout(tmp_path)
    options = ScanOptions(rank="exact", max_memory=4 << 30, jobs=2)
    plan = plan_scan(layout, options)
    assert R.plan_rank(plan, options).concurrent == 2 and S.lapack_eigvalsh() is not None
    result = scan(layout, options, plan=plan)
    worst, checked = 0.0, 0
    for pr in result["stacks"]["model.layers"]["pairs"]:
        for fam, got in pr["families"].items():
            if not fam.endswith("_proj"):
                continue
            where = "mlp" if fam in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            a, b = (tensors[f"model.layers.{L}.{where}.{fam}.weight"].astype(np.float64) for L in (pr["L"], pr["L"] + 1))
            want = truth(a, b)  # numpy's float64 SVD of the explicit residual
            lam = want["s"] ** 2
            eps = float64_bound(max(a.shape), min(a.shape), a.size, math.sqrt(lam.sum()))
            d_h = 2 * min(a.shape) * eps * (1 - math.log(spectra.SPEC_EPS))  # sum |dp_i| |1 + ln p_i|
            sr = lam.sum() / lam.max()
            assert abs(got["resid_spec_entropy"] - want["H"]) <= d_h
            assert abs(got["resid_eff_rank"] / want["eff"] - 1) <= 1.01 * d_h
            assert abs(got["resid_stable_rank"] / want["stable"] - 1) <= eps * (min(a.shape) + sr)
            worst = max(worst, abs(got["resid_spec_entropy"] - want["H"]) / d_h)
            checked += 1
    assert checked == 3 * 7
    assert worst < 1e-3, worst  # the bound is a worst case: the errors are far below it


def test_cosines_and_scales_still_match_reference(tmp_path, rng):
    # With --rank the 2-D families' norms and cosines come from the rank pass.
    tensors = qwen3_like(rng, layers=5)
    write_checkpoint(tmp_path, tensors)
    result = scan(open_layout(tmp_path), ScanOptions(rank="exact"))
    assert assert_matches_reference(result, tensors) == 4 * 11
    _, cos = reference(tensors)
    raw = {f: i["raw"] for f, i in result["stacks"]["model.layers"]["families"].items()}
    for pr in result["pair_results"]:  # float64 all the way: closer than the chain pass's 1e-6
        for fam, r in pr["families"].items():
            if fam.endswith("_proj"):
                assert abs(r["cos"] - cos[raw[fam]][pr["L"]]) < 1e-12


def _pair_checkpoint(tmp_path, a: np.ndarray, b: np.ndarray, c: np.ndarray | None = None):
    tensors = {"model.layers.0.mlp.up_proj.weight": a, "model.layers.1.mlp.up_proj.weight": b}
    if c is not None:
        tensors["model.layers.2.mlp.up_proj.weight"] = c
    return write_checkpoint(tmp_path, tensors)


def test_rank_one_residual(tmp_path, rng):
    # A Householder reflection in matrix space keeps the norm, so the residual of the
    # unit-norm matrices is exactly -2<A,E>E with E = u v^T: rank 1.
    a = rng.standard_normal((48, 32))
    a /= np.linalg.norm(a)
    u, v = rng.standard_normal(48), rng.standard_normal(32)
    e = np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v))
    b = a - 2 * np.sum(a * e) * e
    c = 3.0 * (b - 2 * np.sum(b * e) * e)  # and back (scaled): the next residual is rank 1 too
    s = np.linalg.svd(b / np.linalg.norm(b) - a, compute_uv=False)
    assert s[1] < 1e-12 * s[0]  # rank 1 in float64, as stored
    _pair_checkpoint(tmp_path, a, b, c)
    assert check_against_svd(tmp_path) == 2
    result = scan(open_layout(tmp_path), ScanOptions(rank="exact"))
    for pr in result["stacks"]["model.layers"]["pairs"]:
        r = pr["families"]["up_proj"]
        assert r["resid_eff_rank"] == pytest.approx(1.0, rel=REL)
        assert r["resid_stable_rank"] == pytest.approx(1.0, rel=REL)
        assert r["resid_spec_entropy"] < 1e-8


def test_orthogonal_layers(tmp_path, rng):
    a = rng.standard_normal((40, 56))
    b = rng.standard_normal((40, 56))
    b -= np.sum(a * b) / np.sum(a * a) * a  # cos = 0
    _pair_checkpoint(tmp_path, a, b)
    result = scan(open_layout(tmp_path), ScanOptions(rank="exact"))
    r = result["pair_results"][0]["families"]["up_proj"]
    assert abs(r["cos"]) < 1e-12 and r["resid_norm"] == pytest.approx(math.sqrt(2))
    assert check_against_svd(tmp_path) == 1


def test_identical_and_scaled_copies_have_a_zero_residual(tmp_path, rng):
    a = rng.standard_normal((24, 40)).astype(np.float32)
    _pair_checkpoint(tmp_path, a, a.copy(), 2 * a)  # equal, then equal up to a factor 2
    result = scan(open_layout(tmp_path), ScanOptions(rank="exact"))
    for pr in result["stacks"]["model.layers"]["pairs"]:
        r = pr["families"]["up_proj"]
        assert r["cos"] == 1.0 and r["resid_norm"] == 0.0
        assert (r["resid_spec_entropy"], r["resid_eff_rank"], r["resid_stable_rank"]) == (0.0, 0.0, 0.0)
        assert "zero residual" in r["resid_rank_note"]
    assert result["stacks"]["model.layers"]["summary"]["up_proj"]["mean_SE"] == 0.0


def test_nearly_identical_layers_keep_their_accuracy(tmp_path, rng):
    # cos = 1 - 1e-9: the Grams nearly cancel; the guessed ratio keeps P(s2) small.
    a = rng.standard_normal((64, 48))
    b = 1.37 * (a + 3e-5 * rng.standard_normal((64, 48)))
    c = 1.37**2 * (a + 3e-5 * rng.standard_normal((64, 48)))
    _pair_checkpoint(tmp_path, a, b, c)
    result = scan(open_layout(tmp_path), ScanOptions(rank="exact"))
    assert 1 - result["pair_results"][0]["families"]["up_proj"]["cos"] < 1e-8
    assert check_against_svd(tmp_path) == 2


def test_default_scan_has_no_rank(tmp_path, rng):
    write_checkpoint(tmp_path, qwen3_like(rng))
    result = scan(open_layout(tmp_path), ScanOptions())
    assert result["settings"]["rank"] is None and "rank_seconds" not in result["run"]
    for pr in result["stacks"]["model.layers"]["pairs"]:
        for r in pr["families"].values():
            assert r["resid_eff_rank"] is None and r["resid_spec_entropy"] is None and r["resid_stable_rank"] is None
    assert all(s["mean_SE"] is None and s["mean_eff_rank"] is None
               for s in result["stacks"]["model.layers"]["summary"].values())


def test_summary_means(tmp_path, rng):
    write_checkpoint(tmp_path, qwen3_like(rng, layers=5))
    st_ = scan(open_layout(tmp_path), ScanOptions(rank="exact"))["stacks"]["model.layers"]
    for fam, s in st_["summary"].items():
        hs = [pr["families"][fam]["resid_spec_entropy"] for pr in st_["pairs"] if fam in pr["families"]]
        ers = [pr["families"][fam]["resid_eff_rank"] for pr in st_["pairs"] if fam in pr["families"]]
        if fam.endswith("_proj"):
            assert s["mean_SE"] == pytest.approx(np.mean(hs)) and s["mean_eff_rank"] == pytest.approx(np.mean(ers))
        else:
            assert s["mean_SE"] is None and s["mean_eff_rank"] is None


def test_each_tensor_is_read_at_most_three_times(tmp_path, rng, monkeypatch):
    # Once for the norms, then as b and as a of the pairs it belongs to.
    from layerdiff.checkpoint.reader import Reader

    tensors = qwen3_like(rng, layers=5, hidden=64, ff=128)
    write_checkpoint(tmp_path, tensors)
    seen: dict[str, int] = {}
    rows = Reader.rows

    def counting(self, t, r0, r1):
        block = rows(self, t, r0, r1)
        seen[t.name] = seen.get(t.name, 0) + block.nbytes
        return block

    monkeypatch.setattr(Reader, "rows", counting)
    result = scan(open_layout(tmp_path), ScanOptions(rank="exact", jobs=1))
    sizes = {n: t.nbytes for n, t in tensors.items() if n.startswith("model.layers.")}
    assert set(seen) == set(sizes)
    for name, n in seen.items():
        layer = int(name.split(".")[2])
        times = 1 if tensors[name].ndim == 1 else 2 if layer in (0, 4) else 3  # first and last layers: one pair
        assert n == times * sizes[name], name
    matrices = sum(sizes[n] for n in sizes if tensors[n].ndim == 2 and ".0." in n)
    assert result["run"]["rank_bytes_decoded"] == (5 + 2 * 4) * matrices


# --- the sketch (--rank-approx) ------------------------------------------------


def _decaying(rng, m, n, layers, decay):
    """Layers whose residuals have a geometrically decaying spectrum."""
    base = rng.standard_normal((m, n))
    out = {}
    for L in range(layers):
        u, _ = np.linalg.qr(rng.standard_normal((m, min(m, n))))
        v, _ = np.linalg.qr(rng.standard_normal((n, min(m, n))))
        s = decay ** np.arange(min(m, n))
        base = base + 0.3 * np.linalg.norm(base) * (u * s) @ v.T / np.linalg.norm(s)
        out[f"model.layers.{L}.mlp.up_proj.weight"] = base.copy()
    return out


@pytest.mark.parametrize("decay,k", [(0.9, 8), (0.97, 16), (1.0, 16), (0.8, 40)])
def test_sketch_bounds_contain_the_truth(tmp_path, rng, decay, k):
    tensors = _decaying(rng, 90, 60, 4, decay)
    write_checkpoint(tmp_path, tensors)
    layout = open_layout(tmp_path)
    result = scan(layout, ScanOptions(rank="sketch", sketch=k))
    assert result["settings"]["rank"]["sketch"] == [k]
    for pr in result["stacks"]["model.layers"]["pairs"]:
        L = pr["L"]
        got = pr["families"]["up_proj"]
        want = truth(tensors[f"model.layers.{L}.mlp.up_proj.weight"], tensors[f"model.layers.{L + 1}.mlp.up_proj.weight"])
        b = got["resid_rank_bounds"]
        lo, hi = b["spec_entropy"]
        assert lo <= want["H"] <= hi
        assert abs(got["resid_spec_entropy"] - want["H"]) <= b["spec_entropy_err"]
        assert b["eff_rank"][0] <= want["eff"] <= b["eff_rank"][1]
        assert b["stable_rank"][0] <= want["stable"] <= b["stable_rank"][1]
        if decay == 0.8:  # a sketch that captures nearly everything is nearly exact
            assert b["captured"] > 0.99 and hi - lo < 0.1


def test_full_sketch_is_tight(tmp_path, rng):
    tensors = _decaying(rng, 50, 30, 3, 1.0)
    write_checkpoint(tmp_path, tensors)
    result = scan(open_layout(tmp_path), ScanOptions(rank="sketch", sketch=30))
    for pr in result["stacks"]["model.layers"]["pairs"]:
        lo, hi = pr["families"]["up_proj"]["resid_rank_bounds"]["spec_entropy"]
        assert hi - lo < 1e-6


@settings(max_examples=60, deadline=None, derandomize=True)
@given(d=st.integers(2, 40), k=st.integers(1, 40), decay=st.floats(0.3, 1.0), seed=st.integers(0, 2**32 - 1))
def test_nystrom_entropy_bounds_property(d, k, decay, seed):
    rng = np.random.default_rng(seed)
    k = min(k, d)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    lam = decay ** np.arange(d) * rng.uniform(0.5, 1.5, d)
    g = (q * lam) @ q.T
    omega = rng.standard_normal((d, k))
    mu, nu = spectra.nystrom_lower(g @ omega, omega)
    total = float(lam.sum())
    assert np.all(np.sort(mu)[::-1] <= np.sort(lam)[::-1][: len(mu)] + 1e-9 * total)
    h = seed_spec_entropy(np.sqrt(lam))
    s = spectra.sketch_stats(mu, total, d, k, nu + 1e-12 * total)
    lo, hi = s["resid_rank_bounds"]["spec_entropy"]
    assert lo <= h <= hi


# --- planning and the command line --------------------------------------------


@pytest.fixture
def wide_ckpt(tmp_path, rng):
    # d = 1536: a float64 Gram and the smallest blocks need 27 MiB, more than a 64 MiB budget
    # leaves (the process itself uses ~35).
    a = rng.standard_normal((1536, 1536)).astype(np.float32)
    tensors = {f"model.layers.{L}.mlp.up_proj.weight": (a + 0.5 * L * rng.standard_normal(a.shape)).astype(np.float32)
               for L in range(3)}
    tensors.update({f"model.layers.{L}.input_layernorm.weight": np.ones(1536, np.float32) for L in range(3)})
    return write_checkpoint(tmp_path / "ckpt", tensors)


def test_cli_exact_rank_that_does_not_fit_fails_up_front(wide_ckpt, tmp_path):
    out = tmp_path / "r.json"
    proc = run_cli("scan", str(wide_ckpt), "--rank", "--max-memory", "64M", "--out", str(out))
    assert proc.returncode == 1 and not out.exists()
    assert proc.stderr.startswith("layerdiff: error: --max-memory: 64 MiB is too small for the residual spectrum: up_proj")
    assert "a 1536x1536 float64 Gram matrix" in proc.stderr and "--rank-approx" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_rank_approx_uses_a_sketch_with_bounds(wide_ckpt, tmp_path):
    out = tmp_path / "r.json"
    proc = run_cli("scan", str(wide_ckpt), "--rank-approx", "--max-memory", "64M", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "=== Residual spectrum" in proc.stdout and "sketch: H within +-" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["settings"]["rank"]["mode"] == "auto" and doc["settings"]["rank"]["gram"] == 0
    tensors = load_all(wide_ckpt)
    for pr in doc["stacks"]["model.layers"]["pairs"]:
        b = pr["families"]["up_proj"]["resid_rank_bounds"]
        want = truth(tensors[f"model.layers.{pr['L']}.mlp.up_proj.weight"].astype(np.float64),
                     tensors[f"model.layers.{pr['L'] + 1}.mlp.up_proj.weight"].astype(np.float64))
        assert b["spec_entropy"][0] <= want["H"] <= b["spec_entropy"][1]
    # With the memory for it, the same command is exact.
    proc = run_cli("scan", str(wide_ckpt), "--rank-approx", "--max-memory", "256M", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["settings"]["rank"]["gram"] == 1
    assert "resid_rank_bounds" not in doc["stacks"]["model.layers"]["pairs"][0]["families"]["up_proj"]


def test_cli_rank_prints_the_spectrum_table(tmp_path, rng):
    ckpt = write_checkpoint(tmp_path / "ckpt", qwen3_like(rng), config={"model_type": "qwen3", "num_hidden_layers": 3})
    proc = run_cli("scan", str(ckpt), "--rank")
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout.split("=== Residual spectrum", 1)[1].split("\n===", 1)[0]
    assert "exact (Gram eigenvalues)" in table and "gate_proj" in table
    summary = proc.stdout.split("=== Per-family summary", 1)[1].split("\n===", 1)[0]
    assert "mean_SE" in summary
    assert run_cli("scan", str(ckpt), "--sketch", "8").returncode == 2  # --sketch needs --rank-approx


def test_rank_pass_stays_under_the_budget(wide_ckpt):
    from test_memory import peak_tree_rss

    import sys

    budget = 110 << 20  # the exact Grams fit (in-process), nothing else to spare
    peak, proc = peak_tree_rss([sys.executable, "-m", "layerdiff", "scan", str(wide_ckpt), "--rank",
                                "--max-memory", str(budget), "--quiet"])
    assert proc.returncode == 0, proc.stderr
    assert peak <= budget, (peak >> 20, budget >> 20)
