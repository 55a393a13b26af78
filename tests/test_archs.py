"""Architecture coverage: canonical names, fused splits, MoE, FP8, several stacks.

Every check recomputes the statistics in float64 from the fully loaded tensors,
sliced here the way transformers' modeling code slices them (the reference
never calls layerdiff's tables), and compares with `scan`: cosines within 1e-6
absolute, norms within 1e-6 relative. A last test (torch and transformers
needed, skipped otherwise) takes the q/k/v, gate/up and expert matrices from
transformers itself: it runs the attention modules on an identity input and
captures what they compute, and loads MoE experts through transformers' loader.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from conftest import FIXTURES, by_names, compare, f64, layer_tensors, load_all, run_cli, write_checkpoint

from layerdiff.errors import LayerdiffError
from layerdiff.checkpoint.index import load_index
from layerdiff.layout import SEED_FAMILIES, build_layout
from layerdiff.present.inspect import inspect_doc, inspect_text
from conftest import scan_layout as scan
from layerdiff.options import ScanOptions
from layerdiff.checkpoint.sources import resolve

# safetensors.numpy looks float8 dtypes up on the numpy module (see tests/fixtures/README.md).
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if not hasattr(np, _name):
        setattr(np, _name, getattr(ml_dtypes, _name))

HF = FIXTURES / "hf"
ST = FIXTURES / "st"
BIG = 1 << 30  # in-process scans: the budget must not depend on what the test process imported


def open_layout(folder: Path):
    source = resolve(str(folder))
    return source, load_index(source.files, source.index_file), None


def layout_of(folder: Path):
    source = resolve(str(folder))
    return build_layout(load_index(source.files, source.index_file), source.config)


def run(folder: Path, **opts) -> dict:
    opts.setdefault("jobs", 1)
    opts.setdefault("max_memory", BIG)
    return scan(layout_of(folder), ScanOptions(**opts))










# --- name tables of the reference (from the issue and transformers' module names) ----------

LLAMA = {
    "self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
    "self_attn.o_proj": "o_proj", "mlp.gate_proj": "gate_proj", "mlp.up_proj": "up_proj",
    "mlp.down_proj": "down_proj", "input_layernorm": "input_ln", "post_attention_layernorm": "post_attn_ln",
    "self_attn.q_norm": "q_norm", "self_attn.k_norm": "k_norm",
    "pre_feedforward_layernorm": "pre_ffn_ln", "post_feedforward_layernorm": "post_ffn_ln",
}
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}


def cfg(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


# --- dense decoders with the seed's names ----------------------------------------------------


@pytest.mark.parametrize("name,arch,extra", [
    ("llama", "llama", set()),
    ("qwen2", "llama", {"q_proj.bias", "k_proj.bias", "v_proj.bias"}),
    ("qwen3", "llama", {"q_norm", "k_norm"}),
    ("mistral", "llama", set()),
    ("gemma", "llama", set()),
    ("gemma2", "llama", {"pre_ffn_ln", "post_ffn_ln"}),
])
def test_llama_like_fixtures_give_the_seed_families(name, arch, extra):
    folder = HF / name
    result = run(folder)
    st = result["stacks"]["model.layers"]
    assert result["architecture"] == arch and st["unmapped"] == []
    seed = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "input_ln", "post_attn_ln"}
    assert set(st["families"]) == seed | extra
    assert list(result["scales"]) == list(SEED_FAMILIES)
    expected = by_names(layer_tensors(load_all(folder), "model.layers"), LLAMA)
    assert compare(st, expected) == (len(st["layers"]) - 1) * len(expected)
    for fam, info in st["families"].items():  # the raw name is always kept
        assert LLAMA[info["raw"].rsplit(".", 1)[0]] == fam.split(".")[0]


def test_qwen2_biases_and_tied_embeddings_are_said():
    layout = layout_of(HF / "qwen2")
    assert layout.tied["tied"] is True and layout.tied["config"] is True and layout.tied["output_head"] is None
    stack = layout.stacks["model.layers"]
    assert stack.raw["q_proj.bias"] == "self_attn.q_proj.bias"
    doc = inspect_doc(*open_layout(HF / "qwen2")[:2], layout)
    assert "tied" in inspect_text(doc).split("embeddings: ", 1)[1].splitlines()[0]
    untied = layout_of(HF / "llama").tied
    assert untied["tied"] is False and untied["output_head"] == "lm_head.weight"


# --- fused tensors -------------------------------------------------------------------------


def test_phi3_qkv_and_gate_up_are_split_by_rows():
    folder = HF / "phi3"
    c = cfg(folder)
    nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c["hidden_size"] // nh
    inter = c["intermediate_size"]
    expected = by_names(layer_tensors(load_all(folder), "model.layers"), {
        "self_attn.o_proj": "o_proj", "mlp.down_proj": "down_proj",
        "input_layernorm": "input_ln", "post_attention_layernorm": "post_attn_ln",
    })
    for L, ts in layer_tensors(load_all(folder), "model.layers").items():
        # Phi3Attention.forward: query_pos = heads * head_dim; q | k | v along the output rows.
        qkv = ts["self_attn.qkv_proj.weight"]
        q_end, k_end = nh * hd, nh * hd + nkv * hd
        for fam, part in (("q_proj", qkv[:q_end]), ("k_proj", qkv[q_end:k_end]), ("v_proj", qkv[k_end:])):
            expected.setdefault(fam, {})[L] = part
        # Phi3MLP.forward: gate, up = gate_up_proj(x).chunk(2, dim=-1).
        gu = ts["mlp.gate_up_proj.weight"]
        expected.setdefault("gate_proj", {})[L] = gu[:inter]
        expected.setdefault("up_proj", {})[L] = gu[inter:]
    st = run(folder)["stacks"]["model.layers"]
    assert compare(st, expected) == 3 * 9
    assert st["families"]["q_proj"]["raw"] == "self_attn.qkv_proj.weight"
    assert st["families"]["gate_proj"]["raw"] == "mlp.gate_up_proj.weight"


def test_gpt2_conv1d_c_attn_is_split_by_columns():
    folder = HF / "gpt2"
    E = cfg(folder)["n_embd"]
    layers = layer_tensors(load_all(folder), "transformer.h")
    expected = by_names(layers, {"attn.c_proj": "o_proj", "mlp.c_fc": "up_proj", "mlp.c_proj": "down_proj",
                                 "ln_1": "input_ln", "ln_2": "post_attn_ln"})
    for L, ts in layers.items():
        # GPT2Attention.forward: c_attn(x).split(n_embd, dim=2); Conv1D weight is [in, out].
        w, b = ts["attn.c_attn.weight"], ts["attn.c_attn.bias"]
        for i, fam in enumerate(("q_proj", "k_proj", "v_proj")):
            expected.setdefault(fam, {})[L] = w[:, i * E:(i + 1) * E]
            expected.setdefault(fam + ".bias", {})[L] = b[i * E:(i + 1) * E]
    result = run(folder)
    st = result["stacks"]["transformer.h"]
    assert result["architecture"] == "gpt2"
    assert compare(st, expected) == 3 * 16
    assert PROJECTIONS | {"input_ln", "post_attn_ln"} <= set(st["families"])


def test_gpt_neox_query_key_value_is_interleaved_per_head():
    folder = HF / "gpt_neox"
    c = cfg(folder)
    nh, H = c["num_attention_heads"], c["hidden_size"]
    hd = H // nh
    layers = layer_tensors(load_all(folder), "gpt_neox.layers")
    expected = by_names(layers, {"attention.dense": "o_proj", "mlp.dense_h_to_4h": "up_proj",
                                 "mlp.dense_4h_to_h": "down_proj", "input_layernorm": "input_ln",
                                 "post_attention_layernorm": "post_attn_ln"})
    for L, ts in layers.items():
        # GPTNeoXAttention.forward: qkv.view(..., heads, 3 * head_size).chunk(3, dim=-1).
        w = ts["attention.query_key_value.weight"].reshape(nh, 3, hd, H)
        b = ts["attention.query_key_value.bias"].reshape(nh, 3, hd)
        for i, fam in enumerate(("q_proj", "k_proj", "v_proj")):
            expected.setdefault(fam, {})[L] = w[:, i].reshape(nh * hd, H)
            expected.setdefault(fam + ".bias", {})[L] = b[:, i].reshape(-1)
    st = run(folder)["stacks"]["gpt_neox.layers"]
    assert compare(st, expected) == 3 * 16
    # the parts are views of the same raw tensor, read once: q is not the first third of the rows
    assert st["families"]["q_proj"]["raw"] == "attention.query_key_value.weight"


def test_bert_names_map_to_the_seed_families():
    folder = HF / "bert"
    expected = by_names(layer_tensors(load_all(folder), "encoder.layer"), {
        "attention.self.query": "q_proj", "attention.self.key": "k_proj", "attention.self.value": "v_proj",
        "attention.output.dense": "o_proj", "intermediate.dense": "up_proj", "output.dense": "down_proj",
        "attention.output.LayerNorm": "post_attn_ln", "output.LayerNorm": "post_ffn_ln",
    })
    result = run(folder)
    st = result["stacks"]["encoder.layer"]
    assert result["architecture"] == "bert" and st["unmapped"] == []
    assert compare(st, expected) == 4 * 16


def falcon_checkpoint(folder: Path, rng: np.random.Generator, **flags) -> tuple[dict, dict]:
    """A tiny Falcon-named checkpoint: 4 heads of 8, KV heads per the flags, 3 layers."""
    nh, hd, H = 4, 8, 32
    nkv = flags.get("num_kv_heads", nh)
    if flags.get("new_decoder_architecture"):
        out = (nh + 2 * nkv) * hd
    elif flags.get("multi_query", True):
        out = H + 2 * hd
    else:
        out = 3 * H
    tensors = {}
    for L in range(3):
        p = f"transformer.h.{L}."
        tensors[p + "self_attention.query_key_value.weight"] = rng.standard_normal((out, H)).astype(np.float32)
        tensors[p + "self_attention.query_key_value.bias"] = rng.standard_normal(out).astype(np.float32)
        tensors[p + "self_attention.dense.weight"] = rng.standard_normal((H, H)).astype(np.float32)
        tensors[p + "mlp.dense_h_to_4h.weight"] = rng.standard_normal((4 * H, H)).astype(np.float32)
        tensors[p + "mlp.dense_4h_to_h.weight"] = rng.standard_normal((H, 4 * H)).astype(np.float32)
        tensors[p + "input_layernorm.weight"] = rng.standard_normal(H).astype(np.float32)
    config = {"model_type": "falcon", "hidden_size": H, "num_attention_heads": nh, "num_hidden_layers": 3, **flags}
    write_checkpoint(folder, tensors, config=config)
    return tensors, config


@pytest.mark.parametrize("flags", [
    {"new_decoder_architecture": True, "num_kv_heads": 2},   # Falcon-40B/180B: grouped per KV head
    {"multi_query": True},                                     # Falcon-7B: one K and one V head
    {"multi_query": False},                                    # per-head interleaved, like NeoX
    {},                                                        # FalconConfig defaults: multi_query=True
])
def test_falcon_query_key_value_layouts(tmp_path, rng, flags):
    tensors, config = falcon_checkpoint(tmp_path, rng, **flags)
    nh, hd, H = 4, 8, 32
    layers = layer_tensors(tensors, "transformer.h")
    expected = by_names(layers, {"self_attention.dense": "o_proj", "mlp.dense_h_to_4h": "up_proj",
                                 "mlp.dense_4h_to_h": "down_proj", "input_layernorm": "input_ln"})
    for L, ts in layers.items():
        w, b = ts["self_attention.query_key_value.weight"], ts["self_attention.query_key_value.bias"]
        # FalconAttention._split_heads
        if flags.get("new_decoder_architecture"):
            nkv = flags["num_kv_heads"]
            split = lambda x: (x.reshape(nkv, nh // nkv + 2, hd, -1)[:, :-2], x.reshape(nkv, nh // nkv + 2, hd, -1)[:, -2],
                               x.reshape(nkv, nh // nkv + 2, hd, -1)[:, -1])
        elif flags.get("multi_query", True):
            split = lambda x: (x.reshape(nh + 2, hd, -1)[:-2], x.reshape(nh + 2, hd, -1)[-2], x.reshape(nh + 2, hd, -1)[-1])
        else:
            split = lambda x: (x.reshape(nh, 3, hd, -1)[:, 0], x.reshape(nh, 3, hd, -1)[:, 1], x.reshape(nh, 3, hd, -1)[:, 2])
        for fam, part, bias in zip(("q_proj", "k_proj", "v_proj"), split(w), split(b[:, None])):
            expected.setdefault(fam, {})[L] = part.reshape(-1, H)
            expected.setdefault(fam + ".bias", {})[L] = bias.reshape(-1)
    st = run(tmp_path)["stacks"]["transformer.h"]
    assert compare(st, expected) == 2 * 10


@pytest.mark.parametrize("multi_query", [True, False])
def test_gpt_bigcode_c_attn_is_a_linear_split_by_rows(tmp_path, rng, multi_query):
    nh, hd, H = 4, 8, 32
    out = H + 2 * hd if multi_query else 3 * H
    tensors = {}
    for L in range(3):
        tensors[f"transformer.h.{L}.attn.c_attn.weight"] = rng.standard_normal((out, H)).astype(np.float32)
        tensors[f"transformer.h.{L}.attn.c_attn.bias"] = rng.standard_normal(out).astype(np.float32)
    write_checkpoint(tmp_path, tensors, config={"model_type": "gpt_bigcode", "n_embd": H, "n_head": nh,
                                                "n_layer": 3, "multi_query": multi_query})
    expected: dict[str, dict[int, np.ndarray]] = {}
    for L, ts in layer_tensors(tensors, "transformer.h").items():
        for what, t in (("", ts["attn.c_attn.weight"]), (".bias", ts["attn.c_attn.bias"][:, None])):
            # GPTBigCodeAttention.forward
            if multi_query:  # split((embed_dim, kv_dim, kv_dim)) of the output features
                parts = (t[:H], t[H:H + hd], t[H + hd:])
            else:  # view(heads, 3 * head_dim).split(3 * [head_dim])
                r = t.reshape(nh, 3, hd, -1)
                parts = (r[:, 0], r[:, 1], r[:, 2])
            for fam, part in zip(("q_proj", "k_proj", "v_proj"), parts):
                expected.setdefault(fam + what, {})[L] = part.reshape(-1, t.shape[1]) if what == "" else part.reshape(-1)
    st = run(tmp_path)["stacks"]["transformer.h"]
    assert compare(st, expected) == 2 * 6


def test_split_that_does_not_fit_the_config_is_analysed_whole_and_said(tmp_path, rng):
    tensors, config = falcon_checkpoint(tmp_path, rng, multi_query=False)
    config["num_attention_heads"] = 5  # 96 rows are not 5 heads of 32/5
    (tmp_path / "config.json").write_text(json.dumps(config))
    layout = layout_of(tmp_path)
    stack = layout.stacks["transformer.h"]
    assert "self_attention.query_key_value.weight" in stack.families
    assert "self_attention.query_key_value.weight" in stack.unmapped
    assert any("not split" in n for n in stack.notes)
    st = scan(layout, ScanOptions(jobs=1, max_memory=BIG))["stacks"]["transformer.h"]
    raw = layer_tensors(tensors, "transformer.h")
    compare(st, {"self_attention.query_key_value.weight":
                 {L: ts["self_attention.query_key_value.weight"] for L, ts in raw.items()}}, exact=False)


# --- mixture of experts ----------------------------------------------------------------------


def experts_reference(layers: dict[int, dict[str, np.ndarray]], pattern: dict[str, str]) -> dict[str, dict[int, np.ndarray]]:
    """Per-expert families from `experts.E.<name>` tensors, and each family over all experts (stacked)."""
    out: dict[str, dict[int, np.ndarray]] = {}
    for L, ts in layers.items():
        stacked: dict[str, list[tuple[int, np.ndarray]]] = {}
        for rest, t in ts.items():
            for prefix, names in pattern.items():
                if rest.startswith(prefix) and rest.endswith(".weight"):
                    e, name = rest[len(prefix):-len(".weight")].split(".", 1)
                    if name in names:
                        out.setdefault(f"experts.{e}.{names[name]}", {})[L] = t
                        stacked.setdefault(names[name], []).append((int(e), t))
        for name, items in stacked.items():
            out.setdefault(f"experts.{name}", {})[L] = np.stack([t for _, t in sorted(items, key=lambda x: x[0])])
    return out


def test_mixtral_experts_per_expert_and_over_all_experts():
    folder = HF / "mixtral"
    layers = layer_tensors(load_all(folder), "model.layers")
    # w1 = gate, w3 = up, w2 = down (transformers' conversion: gate_up_proj = cat([w1, w3]), down_proj = w2)
    expected = experts_reference(layers, {"block_sparse_moe.experts.": {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}})
    expected.update(by_names(layers, {**LLAMA, "block_sparse_moe.gate": "router"}))
    result = run(folder)
    st = result["stacks"]["model.layers"]
    assert result["architecture"] == "mixtral"
    assert compare(st, expected) == 3 * (4 * 3 + 3 + 7)
    assert st["families"]["experts.gate_proj"]["experts"] == 4
    assert st["families"]["experts.gate_proj"]["raw"] == "block_sparse_moe.experts.{E}.w1.weight"
    assert st["families"]["router"]["raw"] == "block_sparse_moe.gate.weight"


def test_selecting_only_the_all_experts_family():
    full = run(HF / "mixtral")["stacks"]["model.layers"]
    part = run(HF / "mixtral", families=("experts.down_proj",))["stacks"]["model.layers"]
    assert part["scales"]["experts.down_proj"] == pytest.approx(full["scales"]["experts.down_proj"], rel=1e-12)
    assert [pr["families"]["experts.down_proj"]["cos"] for pr in part["pairs"]] == pytest.approx(
        [pr["families"]["experts.down_proj"]["cos"] for pr in full["pairs"]], abs=1e-12)


def test_qwen3_moe_dense_layer_is_not_paired_with_moe_layers():
    folder = HF / "qwen3_moe"
    assert cfg(folder)["mlp_only_layers"] == [0]
    layers = layer_tensors(load_all(folder), "model.layers")
    expected = experts_reference(layers, {"mlp.experts.": {"gate_proj": "gate_proj", "up_proj": "up_proj",
                                                           "down_proj": "down_proj"}})
    expected.update(by_names(layers, {**LLAMA, "mlp.gate": "router"}))
    st = run(folder)["stacks"]["model.layers"]
    compare(st, expected)
    pairs = {pr["L"]: pr["families"] for pr in st["pairs"]}
    # layer 0's dense MLP has no partner; the experts and the router pair only 1-2 and 2-3
    for fam in ("gate_proj", "up_proj", "down_proj"):
        assert st["scales"][fam][0] is not None and all(fam not in p for p in pairs.values())
    for fam in ("experts.gate_proj", "experts.3.down_proj", "router"):
        assert fam not in pairs[0] and fam in pairs[1] and fam in pairs[2]
        assert st["scales"][fam][0] is None
    assert "q_proj" in pairs[0]


def fused_experts_checkpoint(folder: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """transformers >= 5 layout (save_original_format=False): 3-D experts, layer 0 dense."""
    E, I, H = 4, 8, 16
    tensors = {}
    for L in range(4):
        p = f"model.layers.{L}."
        tensors[p + "self_attn.q_proj.weight"] = rng.standard_normal((H, H)).astype(ml_dtypes.bfloat16)
        tensors[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(H)).astype(ml_dtypes.bfloat16)
        if L == 0:
            tensors[p + "mlp.gate_proj.weight"] = rng.standard_normal((2 * I, H)).astype(ml_dtypes.bfloat16)
        else:
            tensors[p + "mlp.experts.gate_up_proj"] = rng.standard_normal((E, 2 * I, H)).astype(ml_dtypes.bfloat16)
            tensors[p + "mlp.experts.down_proj"] = rng.standard_normal((E, H, I)).astype(ml_dtypes.bfloat16)
            tensors[p + "mlp.gate.weight"] = rng.standard_normal((E, H)).astype(ml_dtypes.bfloat16)
    write_checkpoint(folder, tensors, config={"model_type": "qwen3_moe", "hidden_size": H, "num_hidden_layers": 4,
                                              "moe_intermediate_size": I, "num_experts": E, "mlp_only_layers": [0]})
    return tensors


def test_fused_3d_experts_are_split_per_expert(tmp_path, rng):
    tensors = fused_experts_checkpoint(tmp_path, rng)
    I = 8
    layers = layer_tensors(tensors, "model.layers")
    expected = by_names(layers, {**LLAMA, "mlp.gate": "router"})
    for L, ts in layers.items():
        if "mlp.experts.gate_up_proj" not in ts:
            continue
        gu, down = ts["mlp.experts.gate_up_proj"], ts["mlp.experts.down_proj"]
        # MixtralExperts.forward: gate, up = linear(x, gate_up_proj[e]).chunk(2, dim=-1)
        parts = {"gate_proj": gu[:, :I], "up_proj": gu[:, I:], "down_proj": down}
        for name, t in parts.items():
            for e in range(t.shape[0]):
                expected.setdefault(f"experts.{e}.{name}", {})[L] = t[e]
            expected.setdefault(f"experts.{name}", {})[L] = t
    st = run(tmp_path)["stacks"]["model.layers"]
    assert compare(st, expected) == 3 * 2 + 2 * (4 * 3 + 3 + 1)  # q_proj, input_ln; experts, all-experts, router


# --- quantised storage ------------------------------------------------------------------------


def fp8_dequantised(q: np.ndarray, scale: np.ndarray, block: tuple[int, int] = (128, 128)) -> np.ndarray:
    """value = fp8 value * scale of its block (DeepSeek-V3 weight_scale_inv), in float64."""
    s = np.asarray(scale, dtype=np.float64).reshape(scale.shape if scale.ndim == 2 else (-1, 1) if scale.ndim == 1 else (1, 1))
    full = np.repeat(np.repeat(s, block[0], axis=0), block[1], axis=1)[: q.shape[0], : q.shape[1]]
    return f64(q) * full


FP8_NAMES = {**LLAMA, "self_attn.kv_a_proj_with_mqa": "kv_a_proj", "self_attn.kv_b_proj": "kv_b_proj",
             "self_attn.kv_a_layernorm": "kv_a_ln"}


def fp8_expected() -> tuple[dict, dict]:
    """st/fp8_block in float64: scaled weights dequantised by their weight_scale_inv; and the raw fp8 values."""
    layers = layer_tensors(load_all(ST / "fp8_block"), "model.layers")
    expected = by_names(layers, FP8_NAMES)
    raw_fp8: dict[str, dict[int, np.ndarray]] = {}
    for L, ts in layers.items():
        for rest, scale in ts.items():
            if rest.endswith(".weight_scale_inv"):
                base = rest[: -len("_scale_inv")]
                fam = FP8_NAMES[base[: -len(".weight")]]
                expected[fam][L] = fp8_dequantised(ts[base], scale)
                raw_fp8.setdefault(fam, {})[L] = ts[base]
    return expected, raw_fp8


def test_fp8_block_scaled_weights_are_dequantised():
    expected, raw_fp8 = fp8_expected()
    assert set(raw_fp8) == {"q_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "kv_a_proj"}
    result = run(ST / "fp8_block")
    st = result["stacks"]["model.layers"]
    assert result["architecture"] == "deepseek"
    assert compare(st, expected) == 2 * 10  # kv_b_proj (F8_E5M2, no scale): its raw values
    assert not any("scale" in f for f in st["families"])  # the scales are consumed, not families
    # the dequantised cosine differs from the raw fp8 one (the fixture flips block scales each layer)
    a, b = raw_fp8["q_proj"][0], raw_fp8["q_proj"][1]
    raw_cos = float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))
    assert abs(st["pairs"][0]["families"]["q_proj"]["cos"] - raw_cos) > 0.1


def test_fp8_dequantisation_across_small_row_blocks(monkeypatch):
    import layerdiff.engine.budget as S

    monkeypatch.setattr(S, "MAX_BLOCK", 1000)  # row blocks of a few rows, crossing 128-row scale blocks
    result = run(ST / "fp8_block", jobs=2)
    assert result["settings"]["block_elements"] == 1000
    assert compare(result["stacks"]["model.layers"], fp8_expected()[0]) == 2 * 10


def test_fused_and_expert_splits_across_small_row_blocks(tmp_path, rng, monkeypatch):
    import layerdiff.engine.budget as S

    fused_experts_checkpoint(tmp_path / "moe", rng)
    whole = {name: run(folder) for name, folder in
             (("neox", HF / "gpt_neox"), ("gpt2", HF / "gpt2"), ("moe", tmp_path / "moe"))}
    monkeypatch.setattr(S, "MAX_BLOCK", 100)
    for name, folder in (("neox", HF / "gpt_neox"), ("gpt2", HF / "gpt2"), ("moe", tmp_path / "moe")):
        small = run(folder, jobs=2)
        for stack, st in whole[name]["stacks"].items():
            got = small["stacks"][stack]
            assert set(got["families"]) == set(st["families"])
            for fam, track in st["scales"].items():
                for x, y in zip(got["scales"][fam], track):
                    assert (x is None and y is None) or x == pytest.approx(y, rel=1e-7), (name, fam)
            for a, b in zip(st["pairs"], got["pairs"]):
                for fam, r in a["families"].items():
                    assert abs(b["families"][fam]["cos"] - r["cos"]) < 1e-7


@pytest.mark.parametrize("scale_shape", [(), (1,), (48, 1), (48,)])
def test_fp8_with_per_tensor_and_per_channel_weight_scale(tmp_path, rng, scale_shape):
    R, C = 48, 40
    tensors, ref = {}, {}
    for L in range(3):
        w = (rng.standard_normal((R, C)) * 100).astype(ml_dtypes.float8_e4m3fn)
        s = rng.uniform(0.001, 0.01, scale_shape).astype(np.float32)
        tensors[f"model.layers.{L}.mlp.down_proj.weight"] = w
        tensors[f"model.layers.{L}.mlp.down_proj.weight_scale"] = s
        tensors[f"model.layers.{L}.mlp.down_proj.input_scale"] = np.ones((), np.float32)
        tensors[f"model.layers.{L}.input_layernorm.weight"] = rng.standard_normal(C).astype(ml_dtypes.bfloat16)
        s64 = f64(s).reshape(-1, 1) if s.size > 1 else f64(s).reshape(1, 1)
        ref[L] = f64(w) * s64
    write_checkpoint(tmp_path, tensors, config={"model_type": "llama", "num_hidden_layers": 3})
    layout = layout_of(tmp_path)
    stack = layout.stacks["model.layers"]
    assert "mlp.down_proj.weight_scale" in stack.consumed and "mlp.down_proj.input_scale" in stack.consumed
    st = scan(layout, ScanOptions(jobs=1, max_memory=BIG))["stacks"]["model.layers"]
    assert set(st["families"]) == {"down_proj", "input_ln"}
    compare(st, {"down_proj": ref}, exact=False)


def quantised_checkpoint(folder: Path, rng: np.random.Generator, kind: str) -> None:
    H = 32
    tensors = {}
    for L in range(3):
        p = f"model.layers.{L}."
        tensors[p + "input_layernorm.weight"] = rng.standard_normal(H).astype(ml_dtypes.bfloat16)
        if kind == "gptq":
            tensors[p + "self_attn.q_proj.qweight"] = rng.integers(0, 2**31, (H // 8, H), dtype=np.int32)
            tensors[p + "self_attn.q_proj.qzeros"] = rng.integers(0, 2**31, (1, H // 8), dtype=np.int32)
            tensors[p + "self_attn.q_proj.scales"] = rng.standard_normal((1, H)).astype(np.float16)
            tensors[p + "self_attn.q_proj.g_idx"] = np.zeros(H, dtype=np.int32)
        else:  # gpt-oss MXFP4
            tensors[p + "mlp.experts.gate_up_proj_blocks"] = rng.integers(0, 255, (2, 2 * H, H // 32, 16), dtype=np.uint8)
            tensors[p + "mlp.experts.gate_up_proj_scales"] = rng.integers(0, 255, (2, 2 * H, H // 32), dtype=np.uint8)
    write_checkpoint(folder, tensors, config={"model_type": "llama" if kind == "gptq" else "gpt_oss",
                                              "num_hidden_layers": 3})


@pytest.mark.parametrize("kind,tensor,words", [
    ("gptq", "model.layers.0.self_attn.q_proj.qweight", "packed int4/int8 (GPTQ/AWQ"),
    ("mxfp4", "model.layers.0.mlp.experts.gate_up_proj_blocks", "MXFP4"),
])
def test_unreadable_quantisation_is_refused_with_a_clear_message(tmp_path, rng, kind, tensor, words):
    quantised_checkpoint(tmp_path, rng, kind)
    layout = layout_of(tmp_path)
    with pytest.raises(LayerdiffError) as e:
        scan(layout, ScanOptions(jobs=1, max_memory=BIG))
    assert e.value.where == tensor and words in e.value.problem and "not supported" in e.value.problem
    # the readable families can still be selected
    st = scan(layout, ScanOptions(jobs=1, max_memory=BIG, families=("input_ln",)))["stacks"]["model.layers"]
    assert list(st["families"]) == ["input_ln"]
    # inspect lists what is refused; the CLI gives one line and status 1
    doc = inspect_doc(*open_layout(tmp_path)[:2], layout)
    assert words in inspect_text(doc)
    proc = run_cli("scan", str(tmp_path), "--max-memory", "1G")
    assert proc.returncode == 1 and proc.stderr.startswith(f"layerdiff: error: {tensor}: ")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


# --- stacks and extras ---------------------------------------------------------------------


def test_two_stacks_are_analysed_separately():
    folder = ST / "two_stack"
    tensors = load_all(folder)
    result = run(folder)
    assert set(result["stacks"]) == {"model.language_model.layers", "model.visual.blocks"}
    assert result["main_stack"] == "model.language_model.layers"
    lm = by_names(layer_tensors(tensors, "model.language_model.layers"), LLAMA)
    assert compare(result["stacks"]["model.language_model.layers"], lm) == 3 * 11
    vis_layers = layer_tensors(tensors, "model.visual.blocks")
    vis = by_names(vis_layers, {"attn.proj": "o_proj", "mlp.fc1": "up_proj", "mlp.fc2": "down_proj",
                                "norm1": "input_ln", "norm2": "post_attn_ln"})
    for L, ts in vis_layers.items():
        # Qwen2-VL VisionAttention: qkv(x).reshape(seq, 3, heads, -1): rows [q; k; v]
        w, b = ts["attn.qkv.weight"], ts["attn.qkv.bias"]
        n = w.shape[0] // 3
        for i, fam in enumerate(("q_proj", "k_proj", "v_proj")):
            vis.setdefault(fam, {})[L] = w[i * n:(i + 1) * n]
            vis.setdefault(fam + ".bias", {})[L] = b[i * n:(i + 1) * n]
    st = result["stacks"]["model.visual.blocks"]
    assert compare(st, vis) == 2 * 12
    assert st["layers"] == [0, 1, 2] and result["stacks"]["model.language_model.layers"]["layers"] == [0, 1, 2, 3]


def test_layers_beyond_num_hidden_layers_are_reported_apart(tmp_path, rng):
    H = 16
    tensors = {}
    for L in range(4):  # layer 3 is DeepSeek's multi-token-prediction module
        p = f"model.layers.{L}."
        tensors[p + "self_attn.o_proj.weight"] = rng.standard_normal((H, H)).astype(ml_dtypes.bfloat16)
        tensors[p + "input_layernorm.weight"] = rng.standard_normal(H).astype(ml_dtypes.bfloat16)
    tensors["model.layers.3.eh_proj.weight"] = rng.standard_normal((H, 2 * H)).astype(ml_dtypes.bfloat16)
    tensors["model.layers.3.enorm.weight"] = rng.standard_normal(H).astype(ml_dtypes.bfloat16)
    write_checkpoint(tmp_path, tensors, config={"model_type": "deepseek_v3", "num_hidden_layers": 3,
                                                "num_nextn_predict_layers": 1})
    layout = layout_of(tmp_path)
    assert set(layout.stacks) == {"model.layers", "model.layers[mtp]"}
    assert any("beyond num_hidden_layers=3" in n for n in layout.notes)
    result = scan(layout, ScanOptions(jobs=1, max_memory=BIG))
    main, mtp = result["stacks"]["model.layers"], result["stacks"]["model.layers[mtp]"]
    assert result["main_stack"] == "model.layers"
    assert main["layers"] == [0, 1, 2] and [pr["L"] for pr in main["pairs"]] == [0, 1]
    assert mtp["layers"] == [3] and mtp["pairs"] == []
    assert {"o_proj", "input_ln", "eh_proj.weight", "enorm.weight"} == set(mtp["families"])
    assert "eh_proj.weight" in mtp["unmapped"]
    compare(main, by_names(layer_tensors({k: v for k, v in tensors.items() if ".3." not in k}, "model.layers"), LLAMA))


def test_unknown_tensors_are_analysed_under_their_raw_name_and_listed(tmp_path, rng):
    tensors = {}
    for L in range(3):
        tensors[f"model.layers.{L}.self_attn.q_proj.weight"] = rng.standard_normal((8, 8)).astype(np.float32)
        tensors[f"model.layers.{L}.mlp.mystery.weight"] = rng.standard_normal((4, 8)).astype(np.float32)
        tensors[f"model.layers.{L}.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    write_checkpoint(tmp_path, tensors, config={"model_type": "llama", "num_hidden_layers": 3})
    layout = layout_of(tmp_path)
    assert list(layout.stacks["model.layers"].unmapped) == ["mlp.mystery.weight"]
    assert "rotary_emb.inv_freq" in layout.stacks["model.layers"].consumed
    st = scan(layout, ScanOptions(jobs=1, max_memory=BIG))["stacks"]["model.layers"]
    assert st["unmapped"] == ["mlp.mystery.weight"]
    expected = by_names(layer_tensors(tensors, "model.layers"), {"self_attn.q_proj": "q_proj"})
    expected["mlp.mystery.weight"] = {L: f64(tensors[f"model.layers.{L}.mlp.mystery.weight"]) for L in range(3)}
    assert compare(st, expected) == 2 * 2


def test_no_config_detects_the_table_from_names_and_splits_equal_parts(tmp_path):
    import shutil

    for f in (HF / "gpt2").glob("*.safetensors*"):
        shutil.copy(f, tmp_path / f.name)
    layout = layout_of(tmp_path)  # no config.json: the names pick the GPT-2 table, c_attn splits in thirds
    assert layout.arch == "gpt2"
    stack = layout.stacks["transformer.h"]
    assert "equal parts" in stack.splits["attn.c_attn.weight"]
    assert stack.families["k_proj"][0].cols == (32, 64)


# --- inspect shows the mapping ---------------------------------------------------------------


def test_inspect_shows_architecture_mapping_splits_and_dequantisation():
    text = run_cli("inspect", str(HF / "gpt_neox")).stdout
    assert "architecture: gpt_neox" in text
    assert "q_proj" in text and "<- attention.query_key_value.weight [rows 0:8,24:32,... (4 ranges)]" in text
    assert "split attention.query_key_value.weight: interleaved per head" in text
    text = run_cli("inspect", str(HF / "mixtral")).stdout
    assert "experts.gate_proj" in text and "block_sparse_moe.experts.{E}.w1.weight  (all 4 experts" in text
    assert "router" in text
    text = run_cli("inspect", str(ST / "fp8_block")).stdout
    assert "quantised self_attn.q_proj.weight: F8_E4M3 x weight_scale_inv [2, 2] (one scale per 128x128 block)" in text
    assert "not a family: self_attn.q_proj.weight_scale_inv: dequantisation scale" in text
    assert "F8_E5M2 without a scale" in text
    text = run_cli("inspect", str(HF / "gemma")).stdout
    assert "embeddings: tied" in text
    doc = json.loads(run_cli("inspect", str(HF / "gpt2"), "--json").stdout)
    st = doc["stacks"]["transformer.h"]
    assert st["arch"] == "gpt2" and st["families"]["k_proj"]["raw"] == "attn.c_attn.weight"
    assert st["families"]["k_proj"]["part"] == "cols 32:64" and "attn.c_attn.weight" in st["splits"]
    assert "attn.c_attn.weight" in st["transposed"] and doc["embeddings"]["tied"] is True
    doc = json.loads(run_cli("inspect", str(ST / "two_stack"), "--json").stdout)
    assert doc["stacks"]["model.visual.blocks"]["arch"] == "qwen2_vl_vision"
    assert doc["stacks"]["model.language_model.layers"]["arch"] == "llama"


def test_every_known_architecture_is_in_the_table_doc():
    from layerdiff.archs import registry

    doc = (Path(__file__).resolve().parent.parent / "docs" / "ARCHITECTURES.md").read_text()
    for arch in registry.load(env=False).archs:
        assert f"`{arch.name}`" in doc, arch.name
        for model_type in arch.model_types:
            assert model_type in doc, (arch.name, model_type)


# --- the splits against transformers' own code (torch needed) ------------------------------------

REFERENCE_SCRIPT = textwrap.dedent('''
    """q/k/v, gate/up and experts as transformers computes them, saved as float64 matrices."""
    import sys
    import numpy as np
    import torch
    from transformers import AttentionInterface, AutoModelForCausalLM, FalconConfig, FalconForCausalLM

    fixtures, out_file, models = sys.argv[1:4]
    torch.manual_seed(0)
    CAP, out = {}, {}

    def capture(module, query, key, value, attention_mask=None, **kw):
        CAP.update(q=query, k=key, v=value)
        b, h, s, d = query.shape
        return torch.zeros(b, s, h, d, dtype=query.dtype), None

    AttentionInterface.register("capture", capture)

    def put(where, fam, L, m):
        out[f"{where}|{fam}|{L}"] = m.detach().double().numpy()

    # Attention modules run on the identity (and on zeros, for the bias): the captured q/k/v
    # [batch, heads, seq, head_dim] hold the weight rows, after the model's own split. Rotary
    # embeddings are made the identity (cos 1, sin 0).
    for fixture in ("gpt2", "gpt_neox", "phi3"):
        model = AutoModelForCausalLM.from_pretrained(f"{fixtures}/hf/{fixture}", dtype=torch.float64,
                                                     attn_implementation="capture")
        H = model.config.hidden_size
        layers = {"gpt2": lambda: model.transformer.h, "gpt_neox": lambda: model.gpt_neox.layers,
                  "phi3": lambda: model.model.layers}[fixture]()
        for L, layer in enumerate(layers):
            attn = {"gpt2": lambda: layer.attn, "gpt_neox": lambda: layer.attention, "phi3": lambda: layer.self_attn}[fixture]()
            hd = getattr(attn, "head_dim", None) or attn.head_size
            extra = {} if fixture == "gpt2" else {"position_embeddings": (
                torch.ones(1, H, hd, dtype=torch.float64), torch.zeros(1, H, hd, dtype=torch.float64))}
            got = []
            for x in (torch.eye(H, dtype=torch.float64)[None], torch.zeros(1, H, H, dtype=torch.float64)):
                attn(hidden_states=x, attention_mask=None, **extra)
                got.append({n: CAP[n][0].transpose(0, 1).reshape(H, -1) for n in "qkv"})
            for n in "qkv":
                put(fixture, f"{n}_proj", L, (got[0][n] - got[1][n]).T)
                if fixture != "phi3":
                    put(fixture, f"{n}_proj.bias", L, got[1][n][0])
            if fixture == "phi3":  # Phi3MLP: capture the gate at the activation, up at down_proj's input
                mlp, seen = layer.mlp, {}
                hooks = [
                    mlp.activation_fn.register_forward_hook(
                        lambda mod, args, res: (seen.__setitem__("gate", args[0]), torch.ones_like(res))[1]),
                    mlp.down_proj.register_forward_pre_hook(lambda mod, args: seen.__setitem__("up", args[0])),
                ]
                mlp(torch.eye(H, dtype=torch.float64)[None])
                for h in hooks:
                    h.remove()
                put(fixture, "gate_proj", L, seen["gate"][0].T)
                put(fixture, "up_proj", L, seen["up"][0].T)

    # Falcon: the three query_key_value layouts through FalconAttention._split_heads.
    variants = {
        "falcon_new": dict(new_decoder_architecture=True, num_kv_heads=2, bias=True),
        "falcon_mq": dict(new_decoder_architecture=False, multi_query=True, bias=False),
        "falcon_mha": dict(new_decoder_architecture=False, multi_query=False, bias=True),
    }
    for name, kw in variants.items():
        cfg = FalconConfig(vocab_size=64, hidden_size=32, num_attention_heads=4, num_hidden_layers=3, **kw)
        model = FalconForCausalLM(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        model.save_pretrained(f"{models}/{name}")
        model = model.double()
        for L, layer in enumerate(model.transformer.h):
            attn = layer.self_attention
            nh, hd, nkv, H = attn.num_heads, attn.head_dim, attn.num_kv_heads, cfg.hidden_size
            for what, t in (("", attn.query_key_value.weight), (".bias", attn.query_key_value.bias)):
                if t is None:
                    continue
                fused = t.detach().T[None] if t.dim() == 2 else t.detach()[None, None]
                q, k, v = attn._split_heads(fused)
                if attn.new_decoder_architecture:  # k/v come broadcast to every query head: one per KV group
                    k, v = (x.reshape(*x.shape[:2], nkv, nh // nkv, hd)[:, :, :, 0] for x in (k, v))
                for n, x in zip("qkv", (q, k, v)):
                    m = x[0].reshape(x.shape[1], -1).T
                    put(name, f"{n}_proj{what}", L, m if what == "" else m.reshape(-1))

    # MoE: experts as transformers' loader builds them from the legacy w1/w3/w2 (or E.gate/up/down)
    # names: gate_up_proj [E, 2I, H] (gate first), down_proj [E, H, I]; also saved in that fused layout.
    for fixture in ("mixtral", "qwen3_moe"):
        model = AutoModelForCausalLM.from_pretrained(f"{fixtures}/hf/{fixture}", dtype=torch.float64)
        for L, layer in enumerate(model.model.layers):
            if not hasattr(layer.mlp, "experts"):
                continue
            gu, down = layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj
            inter = gu.shape[1] // 2
            for e in range(gu.shape[0]):
                put(fixture, f"experts.{e}.gate_proj", L, gu[e, :inter])
                put(fixture, f"experts.{e}.up_proj", L, gu[e, inter:])
                put(fixture, f"experts.{e}.down_proj", L, down[e])
            put(fixture, "experts.gate_proj", L, gu[:, :inter])
            put(fixture, "router", L, layer.mlp.gate.weight)
        model.to(torch.bfloat16).save_pretrained(f"{models}/{fixture}_fused", save_original_format=False)
    np.savez(out_file, **out)
''')


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
    reason="torch and transformers are needed to run transformers' own split code",
)
def test_splits_match_transformers_own_code(tmp_path):
    # In a subprocess: importing torch here would grow this process past the scans' memory budget.
    script, out, models = tmp_path / "reference.py", tmp_path / "reference.npz", tmp_path / "models"
    script.write_text(REFERENCE_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(FIXTURES), str(out), str(models)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = np.load(out)
    by: dict[str, dict[str, dict[int, np.ndarray]]] = {}
    for key in ref.files:
        where, fam, L = key.split("|")
        by.setdefault(where, {}).setdefault(fam, {})[int(L)] = ref[key]
    folders = {
        "gpt2": [HF / "gpt2"], "gpt_neox": [HF / "gpt_neox"], "phi3": [HF / "phi3"],
        "falcon_new": [models / "falcon_new"], "falcon_mq": [models / "falcon_mq"], "falcon_mha": [models / "falcon_mha"],
        "mixtral": [HF / "mixtral", models / "mixtral_fused"], "qwen3_moe": [HF / "qwen3_moe", models / "qwen3_moe_fused"],
    }
    assert set(by) == set(folders)
    checked = 0
    for where, expected in by.items():
        for folder in folders[where]:
            result = run(folder)
            checked += compare(result["stacks"][result["main_stack"]], expected, exact=False)
    assert checked > 150
