"""Scan results against an independent float64 computation over fully loaded tensors."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from conftest import EXAMPLE, load_all, qwen3_like, reference, run_cli, write_checkpoint

from layerdiff.checkpoint.index import load_index
from layerdiff.layout import SEED_FAMILIES, build_layout
from conftest import scan_layout as scan
from layerdiff.options import ScanOptions
from layerdiff.checkpoint.sources import resolve

SHORT = {
    "self_attn.q_proj.weight": "q_proj", "self_attn.k_proj.weight": "k_proj", "self_attn.v_proj.weight": "v_proj",
    "self_attn.o_proj.weight": "o_proj", "mlp.gate_proj.weight": "gate_proj", "mlp.up_proj.weight": "up_proj",
    "mlp.down_proj.weight": "down_proj", "input_layernorm.weight": "input_ln",
    "post_attention_layernorm.weight": "post_attn_ln", "self_attn.q_norm.weight": "q_norm",
    "self_attn.k_norm.weight": "k_norm",
}


def run_scan(folder: Path, **opts) -> dict:
    source = resolve(str(folder))
    layout = build_layout(load_index(source.files, source.index_file), source.config)
    return scan(layout, ScanOptions(**opts))


def assert_matches_reference(result: dict, tensors: dict, stack: str = "model.layers") -> int:
    norms, cos = reference(tensors, stack)
    st = result["stacks"][stack]
    checked = 0
    for fam, info in st["families"].items():
        raw = info["raw"]
        for i, L in enumerate(st["layers"]):
            if L in norms[raw]:
                assert st["scales"][fam][i] == pytest.approx(norms[raw][L], rel=1e-6, abs=1e-12)
        for pr in st["pairs"]:
            if pr["L"] in cos.get(raw, {}):
                got = pr["families"][fam]
                want = cos[raw][pr["L"]]
                assert abs(got["cos"] - want) < 1e-6, (fam, pr["L"], got["cos"], want)
                assert got["resid_norm"] == pytest.approx(np.sqrt(max(2 - 2 * want, 0)), abs=1e-5)
                assert got["scalar_fit"] == pytest.approx(np.sqrt(max(1 - want**2, 0)), abs=1e-5)
                checked += 1
            else:
                assert fam not in pr["families"]
    return checked


def test_example_matches_float64_reference():
    result = run_scan(EXAMPLE)
    assert assert_matches_reference(result, load_all(EXAMPLE)) == 5 * 11


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32, np.float64])
def test_dtypes_match_reference(tmp_path, rng, dtype):
    tensors = qwen3_like(rng, dtype=dtype)
    write_checkpoint(tmp_path, tensors)
    assert assert_matches_reference(run_scan(tmp_path), tensors) == 3 * 11


def test_large_all_positive_family_stays_within_1e6(tmp_path, rng):
    # All-positive values are the hard case for float32 sums (errors do not cancel).
    a = rng.uniform(0.5, 1.5, (1024, 1536)).astype(ml_dtypes.bfloat16)
    b = (a.astype(np.float32) * rng.uniform(0.9, 1.1, a.shape)).astype(ml_dtypes.bfloat16)
    tensors = {"model.layers.0.mlp.up_proj.weight": a, "model.layers.1.mlp.up_proj.weight": b}
    write_checkpoint(tmp_path, tensors)
    assert assert_matches_reference(run_scan(tmp_path, jobs=1), tensors) == 1


def test_identical_layers_give_cos_one_and_zero_residual(tmp_path, rng):
    layer0 = {k: v for k, v in qwen3_like(rng, layers=1).items() if k.startswith("model.layers.0.")}
    tensors = {k.replace(".0.", f".{L}.", 1): v for L in range(4) for k, v in layer0.items()}
    write_checkpoint(tmp_path, tensors)
    result = run_scan(tmp_path)
    for pr in result["pair_results"]:
        assert set(pr["families"]) == set(SEED_FAMILIES)
        for fam, r in pr["families"].items():
            assert r["cos"] == 1.0 and r["resid_norm"] == 0.0, fam


def test_negative_cosines(tmp_path, rng):
    tensors = qwen3_like(rng, dtype=np.float32)
    for name in list(tensors):
        if ".1." in name and tensors[name].ndim == 2:
            tensors[name] = -tensors[name.replace(".1.", ".0.")] + np.float32(0.001) * rng.standard_normal(tensors[name].shape).astype(np.float32)
    write_checkpoint(tmp_path, tensors)
    result = run_scan(tmp_path)
    assert result["pair_results"][0]["families"]["q_proj"]["cos"] < -0.99
    assert_matches_reference(result, tensors)


def test_sharded_and_jobs_agree(tmp_path, rng):
    tensors = qwen3_like(rng, layers=6)
    write_checkpoint(tmp_path, tensors, shards=3)
    one = run_scan(tmp_path, jobs=1)
    two = run_scan(tmp_path, jobs=2)
    assert one["stacks"] == two["stacks"]
    assert_matches_reference(two, tensors)
    assert two["run"]["bytes_mapped"] == two["run"]["bytes_analysed"]


def test_small_blocks_cross_rows_and_layers(tmp_path, rng, monkeypatch):
    import layerdiff.engine.budget as S

    monkeypatch.setattr(S, "MAX_BLOCK", 1000)  # forces many row blocks per tensor
    tensors = qwen3_like(rng, layers=3, hidden=128, ff=320)
    write_checkpoint(tmp_path, tensors)
    result = run_scan(tmp_path, jobs=2)
    assert result["settings"]["block_elements"] == 1000
    assert_matches_reference(result, tensors)


def test_seed_keys_and_pca_match_reference(tmp_path, rng):
    tensors = qwen3_like(rng, layers=5)
    write_checkpoint(tmp_path, tensors)
    result = run_scan(tmp_path)
    norms, cos = reference(tensors)
    raw = {v: k for k, v in SHORT.items()}
    assert list(result["scales"]) == list(SEED_FAMILIES)
    assert result["fam_used"] == list(SEED_FAMILIES)
    m = np.log(np.array([[norms[raw[f]][L] for L in range(5)] for f in SEED_FAMILIES]))
    u, s, vh = np.linalg.svd(m - m.mean(axis=1, keepdims=True), full_matrices=False)
    np.testing.assert_allclose(result["scale_pca_singvals"], s, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.abs(result["scale_pca_scores"]), np.abs(np.diag(s) @ vh), rtol=1e-5, atol=1e-7)
    assert [pr["L"] for pr in result["pair_results"]] == [0, 1, 2, 3]
    for pr in result["pair_results"]:
        assert list(pr["families"]) == list(SEED_FAMILIES)
        for fam, r in pr["families"].items():
            assert set(r) == {"cos", "resid_norm", "resid_eff_rank", "resid_spec_entropy"}
            assert abs(r["cos"] - cos[raw[fam]][pr["L"]]) < 1e-6


def test_zero_norm_and_shape_change_are_skipped_and_said(tmp_path, rng):
    tensors = qwen3_like(rng, layers=4)
    tensors["model.layers.2.self_attn.o_proj.weight"][...] = 0
    tensors["model.layers.3.mlp.up_proj.weight"] = rng.standard_normal((80, 64)).astype(ml_dtypes.bfloat16)
    write_checkpoint(tmp_path, tensors)
    result = run_scan(tmp_path)
    fams = {pr["L"]: pr["families"] for pr in result["pair_results"]}
    assert "o_proj" not in fams[1] and "o_proj" not in fams[2] and "o_proj" in fams[0]
    assert "up_proj" not in fams[2] and "up_proj" in fams[1]
    reasons = {(s["family"] or s["raw"], s["L"]): s["reason"] for s in result["stacks"]["model.layers"]["skipped"]}
    assert reasons[("o_proj", 1)] == "zero norm"
    assert "shape changes" in reasons[("mlp.up_proj.weight", 2)]
    assert result["scales"]["o_proj"][2] == 0.0
    assert "o_proj" not in result["fam_used"] and "up_proj" in result["fam_used"]
    assert_matches_reference(result, tensors)


def test_selection_of_family_and_layers(tmp_path, rng):
    tensors = qwen3_like(rng, layers=6)
    write_checkpoint(tmp_path, tensors)
    result = run_scan(tmp_path, families=("q_proj", "input_ln"), layers=(2, 5))
    st = result["stacks"]["model.layers"]
    assert st["layers"] == [2, 3, 4]
    assert list(st["families"]) == ["q_proj", "input_ln"]
    assert [pr["L"] for pr in result["pair_results"]] == [2, 3]
    assert_matches_reference(result, tensors)


def test_non_float_tensors_are_listed_and_skipped(tmp_path, rng):
    tensors = qwen3_like(rng, layers=3)
    for L in range(3):
        tensors[f"model.layers.{L}.position_ids"] = np.arange(8, dtype=np.int64)
    write_checkpoint(tmp_path, tensors)
    result = run_scan(tmp_path)
    st = result["stacks"]["model.layers"]
    assert "position_ids" not in st["families"]
    assert sum("not a floating-point" in s["reason"] for s in st["skipped"]) == 3


def test_cli_scan_writes_seed_compatible_json(tmp_path, rng):
    tensors = qwen3_like(rng, layers=4)
    ckpt = write_checkpoint(tmp_path / "ckpt", tensors, config={"model_type": "qwen3", "num_hidden_layers": 4})
    out = tmp_path / "out.json"
    proc = run_cli("scan", str(ckpt), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "=== Adjacent-layer raw cos-sim per family ===" in proc.stdout
    assert "=== PCA of log-scale-track" in proc.stdout
    doc = json.loads(out.read_text())
    for key in ("model", "pair_results", "scales", "scale_pca_singvals", "scale_pca_loadings", "scale_pca_scores", "fam_used"):
        assert key in doc
    assert doc["schema"] == "layerdiff.scan/1" and doc["source"]["kind"] == "dir"
    assert not list(tmp_path.glob(".out.json.*"))


def test_cli_budget_too_small_is_a_clean_error_and_writes_nothing(tmp_path, rng):
    write_checkpoint(tmp_path / "ckpt", qwen3_like(rng))
    out = tmp_path / "out.json"
    proc = run_cli("scan", str(tmp_path / "ckpt"), "--out", str(out), "--max-memory", "8M")
    assert proc.returncode == 1
    assert proc.stderr.startswith("layerdiff: error: --max-memory: 8 MiB is too small")
    assert "Traceback" not in proc.stderr and not out.exists()


def test_cli_refuses_to_write_into_the_checkpoint(tmp_path, rng):
    ckpt = write_checkpoint(tmp_path / "ckpt", qwen3_like(rng))
    proc = run_cli("scan", str(ckpt), "--out", str(ckpt / "r.json"))
    assert proc.returncode == 1 and "refusing to write into the checkpoint" in proc.stderr
    assert not (ckpt / "r.json").exists()


def test_selection_by_raw_name_takes_every_part_of_a_fused_tensor():
    from conftest import FIXTURES

    result = run_scan(FIXTURES / "hf" / "gpt2", families=("attn.c_attn.weight",))
    assert list(result["stacks"]["transformer.h"]["families"]) == ["q_proj", "k_proj", "v_proj"]


@pytest.mark.parametrize("args, message", [
    (["--family", "qproj"], "layerdiff: error: --family: no family 'qproj' here; families: q_proj, k_proj"),
    (["--stack", "model.layer"], "layerdiff: error: --stack: no stack 'model.layer' here; stacks: model.layers"),
])
def test_cli_unknown_selection_lists_what_there_is(tmp_path, rng, args, message):
    ckpt = write_checkpoint(tmp_path / "ckpt", qwen3_like(rng, layers=2))
    proc = run_cli("scan", str(ckpt), *args, "--out", str(tmp_path / "r.json"))
    assert proc.returncode == 1 and proc.stderr.startswith(message), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("rank", [[], ["--rank"]])
def test_inf_and_nan_weights_are_skipped_and_said_and_the_json_stays_strict(tmp_path, rng, rank):
    tensors = qwen3_like(rng, layers=4, dtype=np.float32)
    tensors["model.layers.1.self_attn.q_proj.weight"][0, 0] = np.nan
    tensors["model.layers.2.mlp.up_proj.weight"][3, 3] = np.inf
    ckpt = write_checkpoint(tmp_path / "ckpt", tensors)
    out = tmp_path / "r.json"
    proc = run_cli("scan", str(ckpt), *rank, "--out", str(out))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr

    def refuse(constant):
        raise ValueError(constant)

    doc = json.loads(out.read_text(), parse_constant=refuse)  # no NaN / Infinity tokens
    st = doc["stacks"]["model.layers"]
    bad = {(s["family"], s["L"]) for s in st["skipped"] if s["reason"].startswith("inf or NaN")}
    assert bad == {("q_proj", 0), ("q_proj", 1), ("up_proj", 1), ("up_proj", 2)}
    assert st["scales"]["q_proj"][1] is None and st["scales"]["up_proj"][2] is None
    assert "q_proj" not in doc["fam_used"] and "k_proj" in doc["fam_used"]
    fams = {pr["L"]: pr["families"] for pr in doc["pair_results"]}
    assert "q_proj" in fams[2] and "up_proj" in fams[0] and "q_proj" not in fams[1]


@pytest.mark.parametrize("args, message", [
    (["--max-memory", "12Q"], "layerdiff: error: --max-memory: '12Q' is not a size like 256M or 2G"),
    (["--layers", "5"], "layerdiff: error: --layers: '5' is not a layer range like 4:12"),
    (["--layers", "5:5"], "layerdiff: error: --layers: '5:5' selects no layers"),
])
def test_cli_malformed_options_are_one_line_errors(tmp_path, rng, args, message):
    ckpt = write_checkpoint(tmp_path / "ckpt", qwen3_like(rng, layers=2))
    proc = run_cli("scan", str(ckpt), *args)
    assert proc.returncode == 1 and proc.stderr.strip() == message


def test_a_small_scan_stays_in_one_process_unless_jobs_says_otherwise(tmp_path, rng):
    """Forking workers costs more than they save for a few MB (see budget.IN_PROCESS_BYTES)."""
    from layerdiff.api import open_model, plan, scan_options

    ckpt = write_checkpoint(tmp_path / "ckpt", qwen3_like(rng, layers=4))
    room = 4 << 30  # the budget is measured against this pytest process, which other tests grew
    assert plan(open_model(str(ckpt)), scan_options(max_memory=room)).plan.jobs == 1
    assert plan(open_model(str(ckpt)), scan_options(max_memory=room, jobs=2)).plan.jobs == 2


@pytest.mark.parametrize("values", [[0.3], [0.1, 0.9], [0.5, -0.2, 0.7], [0.4, 0.1, 0.8, 0.2], [0.1, float("nan"), 0.3],
                                    [float("inf"), 0.1, 0.2]])
def test_median_cos_is_numpys_median(values):
    from layerdiff.metrics.registry import SUMMARIES

    rule = next(s.rule for s in SUMMARIES if s.name == "median_cos")
    np.testing.assert_equal(rule(np.array(values)), float(np.median(values)))
