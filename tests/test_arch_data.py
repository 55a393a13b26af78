"""Architecture tables as data: validation of broken files, tables added from a directory with no
code change, roles per family, honest labels, and the generated docs page being current."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import layerdiff
from conftest import FIXTURES, REPO, run_cli, write_checkpoint
from layerdiff.archs import docs, registry
from layerdiff.archs.sizes import ExprError, parse_expr
from layerdiff.checkpoint.index import load_index
from layerdiff.checkpoint.sources import resolve
from layerdiff.errors import ArchitectureError, LayerdiffError
from layerdiff.layout import build_layout
from layerdiff.present.inspect import inspect_doc, inspect_text
from layerdiff.present.tables import scan_text

HF = FIXTURES / "hf"
BIG = 1 << 30


def tables(folder: Path, files: dict[str, object]) -> Path:
    """Write data files {name: JSON value or raw text} into a fresh directory."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, doc in files.items():
        (folder / f"{name}.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return folder


def load_error(tmp_path: Path, files: dict[str, object]) -> str:
    with pytest.raises(ArchitectureError) as e:
        registry.load(extra=[tables(tmp_path / "t", files)], env=False)
    assert isinstance(e.value, LayerdiffError)
    return str(e.value)


def layout_of(folder: Path, archs=None):
    source = resolve(str(folder))
    return build_layout(load_index(source.files, source.index_file), source.config, archs)


TOY = {"model_types": ["toy"], "priority": 100, "names": {"attn.wq.weight": "q_proj"}}


# --- validation -----------------------------------------------------------------------------


def test_the_packaged_tables_load_and_are_sorted_by_priority_then_name():
    reg = registry.load(env=False)
    keys = [(-a.priority, a.name) for a in reg.archs]
    assert keys == sorted(keys) and reg.archs[0].name == "qwen2_vl_vision"
    assert {"llama", "mixtral", "qwen_moe", "deepseek", "gpt_oss", "phi3", "gpt2", "gpt_bigcode", "gpt_neox",
            "falcon", "falcon_rw40b", "bert", "distilbert", "qwen2_vl_vision", "clip_vision"} <= {a.name for a in reg.archs}
    assert all(name.startswith("_") for name in reg.fragments)
    assert registry.load(env=False) is reg  # read once


def test_a_bad_size_expression_names_the_file_and_the_field(tmp_path):
    doc = json.loads((registry.DATA / "gpt2.json").read_text())
    doc["names"]["attn.c_attn.weight"]["split"][1][1] = "hidden_size*"
    msg = load_error(tmp_path, {"gpt2": doc})
    assert msg == (f"{tmp_path / 't' / 'gpt2.json'}: names.\"attn.c_attn.weight\".split[1]: "
                   f"size expression 'hidden_size*' is not valid")


@pytest.mark.parametrize("text", ["", "*", "a*", "a**b", "a b", "2+", "+a", "a-b", "(a)", "a/", "3.5"])
def test_bad_expressions_do_not_parse(text):
    with pytest.raises(ExprError):
        parse_expr(text)


def test_expressions_evaluate_left_to_right():
    get = {"a": 12, "b": 3, "c": 2, "x.y": 5}.__getitem__
    assert parse_expr("a/b*c").evaluate(get) == 8
    assert parse_expr("a/c*b + 4 + x.y").evaluate(get) == 27
    assert parse_expr("a").names == ("a",)
    with pytest.raises(ValueError, match="not divisible"):
        parse_expr("b/c").evaluate(get)


@pytest.mark.parametrize("files,expected", [
    ({"toy": {**TOY, "bias": False}}, 'toy.json: bias: unknown field (known: name, about, model_types'),
    ({"toy": {**TOY, "names": {"a.weight": {"split": [["q_proj", "1"]], "axes": "rows"}}}},
     'toy.json: names."a.weight".axes: unknown field'),
    ({"toy": {**TOY, "priority": "high"}}, "toy.json: priority: expected an integer, not a string ('high')"),
    ({"toy": {**TOY, "model_types": "toy"}}, "toy.json: model_types: expected a list of strings, not a string"),
    ({"toy": {**TOY, "biases": "yes"}}, "toy.json: biases: expected true or false"),
    ({"toy": {**TOY, "names": {"a.weight": 3}}},
     'toy.json: names."a.weight": a name maps to a family name (a string), a split (an object) or a list of '
     "split variants, not a number (3)"),
    ({"toy": {**TOY, "names": {"a.weight": ["q_proj"]}}}, 'toy.json: names."a.weight"[0]: expected an object'),
    ({"toy": {**TOY, "names": {"a.weight": {"split": [["q_proj"]]}}}},
     'toy.json: names."a.weight".split[0]: expected a pair [family, size expression]'),
    ({"toy": {**TOY, "names": {"a.weight": {"split": []}}}}, 'toy.json: names."a.weight".split: must not be empty'),
    ({"toy": {**TOY, "names": {"a.weight": {"split": [["q", "1"]], "groups": "heads*"}}}},
     "names.\"a.weight\".groups: size expression 'heads*' is not valid"),
    ({"toy": {**TOY, "names": {"a.weight": {"split": [["q", "1"]], "axis": "diagonal"}}}},
     'names."a.weight".axis: is "rows" or "cols"'),
    ({"toy": {**TOY, "names": {"a.weight": [{"split": [["q", "1"]]}, {"split": [["q", "1"]]}]}}},
     'names."a.weight"[1]: is never used: variant 0 before it has no "when"'),
    ({"toy": {**TOY, "names": {"a.weight": "experts.{E}.q"}}}, "has {E} but the name has none"),
    ({"toy": {**TOY, "names": {"a.{X}.weight": "q"}}}, "{X} is not a placeholder"),
    ({"toy": {"priority": 1, "names": {}}}, "toy.json: model_types: is required"),
    ({"toy": {**TOY, "name": "other"}}, "toy.json: name: 'other' differs from the file name 'toy'"),
    ({"toy": {**TOY, "stack": "vision("}}, "toy.json: stack: regular expression 'vision(' is not valid"),
    ({"toy": {**TOY, "roles": {"q_proj": "listens"}}}, 'toy.json: roles.q_proj: a role is "reads", "writes" or null'),
    ({"toy": {**TOY, "transposed": ["attn.wk.weight"]}}, "toy.json: transposed[0]: 'attn.wk.weight' is not one of the names"),
    ({"toy": {**TOY, "extends": ["_nothing"]}}, "toy.json: extends[0]: no architecture or fragment '_nothing'"),
    ({"_frag": {"model_types": ["toy"], "names": {}}}, "_frag.json: model_types: a fragment (a file named _*.json)"),
    ({"toy": '{"model_types": ["toy"], "priority": 1,'}, "toy.json: is not valid JSON: line 1"),
    ({"toy": '{"model_types": ["toy"], "priority": 1, "priority": 2}'}, "toy.json: is not valid JSON: key 'priority' appears twice"),
    ({"toy": [1, 2]}, "toy.json: expected an object, not a list"),
    ({"common": {}}, "common.json is read from the package only"),
    ({"families": {"families": {"q_proj": {"role": "reads", "kind": "tensor"}}}},
     "families.json: families.q_proj.kind: unknown kind 'tensor'"),
])
def test_broken_files_are_errors_naming_file_and_field(tmp_path, files, expected):
    assert expected in load_error(tmp_path, files)


def test_a_cycle_in_extends_is_named(tmp_path):
    msg = load_error(tmp_path, {"_a": {"extends": ["_b"]}, "_b": {"extends": ["_c"]}, "_c": {"extends": ["_a"]},
                                "toy": {**TOY, "extends": ["_a"]}})
    assert "extends[0]: cycle " in msg
    cycle = msg.split("cycle ", 1)[1]
    names = cycle.split(" -> ")
    assert names[0] == names[-1] and set(names) == {"_a", "_b", "_c"}
    assert "extends[0]: cycle toy -> toy" in load_error(tmp_path / "2", {"toy": {**TOY, "extends": ["toy"]}})


def test_a_missing_extra_directory_is_an_error(tmp_path):
    with pytest.raises(ArchitectureError, match="is not a directory"):
        registry.load(extra=[tmp_path / "nowhere"], env=False)


def test_the_cli_prints_a_broken_table_as_one_line(tmp_path):
    d = tables(tmp_path / "t", {"toy": {**TOY, "names": {"a.weight": {"split": [["q", "2*"]]}}}})
    proc = run_cli("inspect", str(HF / "llama"), env={**os.environ, registry.ENV: str(d)})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"layerdiff: error: {d / 'toy.json'}: names.\"a.weight\".split[0]: size expression '2*' is not valid"]


# --- an architecture from a data file, no code change -------------------------------------------------


def toy_checkpoint(folder: Path, rng: np.random.Generator, layers: int = 3) -> dict[str, np.ndarray]:
    """`blocks.L.*` names no packaged table knows: a fused [q; k; v] (k/v grouped), an MLP, a norm."""
    H, heads, kv, hd, ff = 32, 4, 2, 8, 48
    out = {}
    for L in range(layers):
        out[f"blocks.{L}.attn.wqkv.weight"] = rng.standard_normal(((heads + 2 * kv) * hd, H)).astype(np.float32)
        out[f"blocks.{L}.attn.wo.weight"] = rng.standard_normal((H, heads * hd)).astype(np.float32)
        out[f"blocks.{L}.ffn.w_in.weight"] = rng.standard_normal((ff, H)).astype(ml_dtypes.bfloat16)
        out[f"blocks.{L}.ffn.w_out.weight"] = rng.standard_normal((H, ff)).astype(ml_dtypes.bfloat16)
        out[f"blocks.{L}.ln.weight"] = (1 + 0.1 * rng.standard_normal(H)).astype(np.float32)
    config = {"model_type": "toy", "hidden_size": H, "num_attention_heads": heads, "attn_config": {"kv_n_heads": kv}}
    write_checkpoint(folder, out, config=config)
    return out


TOY_TABLE = {
    "about": "A table that exists only in a test's directory.",
    "model_types": ["toy"],
    "priority": 100,
    "config_keys": {"num_key_value_heads": ["attn_config.kv_n_heads"]},
    "roles": {"mix_proj": "writes"},
    "names": {
        "attn.wqkv.weight": {"split": [["q_proj", "num_attention_heads*head_dim"],
                                       ["k_proj", "num_key_value_heads*head_dim"],
                                       ["v_proj", "num_key_value_heads*head_dim"]], "kind": "concat rows [q; k; v]"},
        "attn.wo.weight": "o_proj",
        "ffn.w_in.weight": "up_proj",
        "ffn.w_out.weight": "mix_proj",
        "ln.weight": "input_ln",
    },
}


def test_an_architecture_added_from_a_directory_scans_with_its_family_names(tmp_path, rng, monkeypatch):
    tensors = toy_checkpoint(tmp_path / "ckpt", rng)
    d = tables(tmp_path / "archs", {"toy": TOY_TABLE})
    before = layout_of(tmp_path / "ckpt", registry.load(env=False))
    assert before.stacks["blocks"].match.how == "none" and before.stacks["blocks"].arch is None

    monkeypatch.setenv(registry.ENV, str(d))
    result = layerdiff.scan(str(tmp_path / "ckpt"), jobs=1, max_memory=BIG)
    st = result.to_dict()["stacks"]["blocks"]
    assert set(st["families"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "mix_proj", "input_ln"}
    assert st["unmapped"] == [] and result.architecture == "toy"
    assert result.labels["stacks"]["blocks"]["label"] == "table toy (matched by model_type toy)"
    # the split, sized through the nested config key, against float64 slices of the fused tensor
    q_rows, kv_rows = 4 * 8, 2 * 8
    for fam, (a, b) in {"q_proj": (0, q_rows), "k_proj": (q_rows, q_rows + kv_rows),
                        "v_proj": (q_rows + kv_rows, q_rows + 2 * kv_rows)}.items():
        for L in range(2):
            x = tensors[f"blocks.{L}.attn.wqkv.weight"][a:b].astype(np.float64)
            y = tensors[f"blocks.{L + 1}.attn.wqkv.weight"][a:b].astype(np.float64)
            cos = float((x * y).sum() / math.sqrt((x * x).sum() * (y * y).sum()))
            got = next(p for p in st["pairs"] if p["L"] == L)["families"][fam]["cos"]
            assert abs(got - cos) < 1e-6, (fam, L)

    # the same through the Python argument, without the environment variable
    monkeypatch.delenv(registry.ENV)
    layout = layout_of(tmp_path / "ckpt", registry.load(extra=[d], env=False))
    stack = layout.stacks["blocks"]
    assert stack.arch == "toy" and stack.splits["attn.wqkv.weight"].startswith("concat rows [q; k; v]")
    assert stack.role("mix_proj") == "writes" and stack.role("q_proj") == "reads"
    assert registry.load(extra=[d], env=False).get("toy").about.startswith("A table that exists")


def test_an_extra_table_with_a_higher_priority_wins_and_ties_go_by_name(tmp_path):
    names = {"self_attn.q_proj.weight": "q"}
    d = tables(tmp_path / "t", {"zz": {"model_types": ["llama"], "priority": 500, "names": names},
                                "aa": {"model_types": ["llama"], "priority": 500, "names": names}})
    reg = registry.load(extra=[d], env=False)
    assert [a.name for a in reg.archs[:2]] == ["aa", "zz"]
    stack = layout_of(HF / "llama", reg).stacks["model.layers"]
    assert stack.arch == "aa" and "q" in stack.families and "q_proj" not in stack.families


# --- roles -----------------------------------------------------------------------------------


def test_roles_come_from_the_tables():
    st = layout_of(HF / "gpt2").stacks["transformer.h"]
    assert [st.role(f) for f in ("q_proj", "k_proj", "v_proj", "up_proj")] == ["reads"] * 4  # fused parts
    assert st.role("o_proj") == st.role("down_proj") == "writes"
    assert st.role("input_ln") is None and st.role("q_proj.bias") is None and st.role("nothing") is None
    st = layout_of(HF / "mixtral").stacks["model.layers"]
    assert st.role("experts.3.down_proj") == st.role("experts.down_proj") == "writes"
    assert st.role("experts.0.gate_proj") == st.role("experts.up_proj") == st.role("router") == "reads"
    reg = registry.load(env=False)
    for fam in ("cross_q_proj", "cross_k_proj", "cross_v_proj", "shared_expert.gate_proj", "shared_expert.up_proj",
                "gate_proj", "router", "experts.{E}.gate_up_proj"):
        assert reg.role(fam) == "reads", fam
    for fam in ("cross_o_proj", "shared_expert.down_proj", "o_proj"):
        assert reg.role(fam) == "writes", fam
    for fam in ("post_attn_ln", "q_norm", "cross_attn_ln", "router.bias", "experts.{E}.down_proj.bias", "raw.weight"):
        assert reg.role(fam) is None, fam


def test_unmapped_raw_names_have_no_role(tmp_path, rng):
    toy_checkpoint(tmp_path, rng, layers=2)
    st = layout_of(tmp_path, registry.load(env=False)).stacks["blocks"]
    assert st.unmapped and all(st.role(f) is None for f in st.families)


def test_every_family_a_packaged_table_names_is_declared():
    reg = registry.load(env=False)
    for a in (*reg.archs, *reg.fragments.values()):
        for raw, entry in a.names.items():
            fams = [entry] if isinstance(entry, str) else [c for v in entry for c, _ in v.parts]
            for fam in fams:
                assert reg.family(fam, a) is not None, (a.file, raw, fam)


# --- honest labels -------------------------------------------------------------------------------


def test_mistral_is_labelled_mistral_named_by_the_llama_table():
    layout = layout_of(HF / "mistral")
    assert layout.model_type == "mistral" and layout.arch == "llama"
    match = layout.stacks["model.layers"].match
    assert (match.table, match.how, match.model_type) == ("llama", "model_type", "mistral")
    text = inspect_text(inspect_doc(*_source_index(HF / "mistral"), layout))
    assert "architecture: mistral" in text and "architecture: llama" not in text
    assert "names: table llama (matched by model_type mistral)" in text
    result = layerdiff.scan(str(HF / "mistral"), jobs=1, max_memory=BIG)
    labels = result.to_dict()["labels"]
    assert labels["model_type"] == "mistral"
    assert labels["stacks"]["model.layers"] == {"table": "llama", "matched_by": "model_type", "model_type": "mistral",
                                                "label": "table llama (matched by model_type mistral)"}
    assert labels["main_stack"]["name"] == "model.layers" and "language model" in labels["main_stack"]["rule"]
    first = scan_text(result).splitlines()[0]
    assert first.startswith("model_type mistral; main stack model.layers") and "table llama (matched by model_type mistral)" in first


def _source_index(folder: Path):
    source = resolve(str(folder))
    return source, load_index(source.files, source.index_file)


def test_an_unknown_model_type_is_said_and_the_names_guessed(tmp_path):
    shutil.copytree(HF / "gpt2", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "model_type": "mystery_gpt"}))
    layout = layout_of(tmp_path / "m")
    match = layout.stacks["transformer.h"].match
    assert layout.model_type == "mystery_gpt" and match.table == "gpt2" and match.how == "names"
    assert match.reason == "no table lists model_type 'mystery_gpt'"
    assert "attn.c_attn.weight" in match.names and "ln_1.weight" in match.names
    doc = inspect_doc(*_source_index(tmp_path / "m"), layout)
    assert doc["stacks"]["transformer.h"]["table"]["mapped_by_suffix"] == list(match.names)
    text = inspect_text(doc)
    assert "architecture: mystery_gpt" in text and "architecture: gpt2" not in text
    assert "names: table gpt2, guessed from tensor names (no table lists model_type 'mystery_gpt')" in text
    assert "mapped by the suffix rules of table gpt2: " in text
    (tmp_path / "m" / "config.json").unlink()
    layout = layout_of(tmp_path / "m")
    assert layout.model_type is None and layout.stacks["transformer.h"].match.reason == "no config.json"
    assert "architecture: unknown (no config.json)" in inspect_text(inspect_doc(*_source_index(tmp_path / "m"), layout))


def test_a_stack_no_table_knows_says_so(tmp_path, rng):
    toy_checkpoint(tmp_path, rng, layers=2)
    layout = layout_of(tmp_path, registry.load(env=False))
    match = layout.stacks["blocks"].match
    assert match.describe() == "no table: raw family names (no table lists model_type 'toy')"
    result = layerdiff.scan(str(tmp_path), jobs=1, max_memory=BIG)
    assert result.labels["stacks"]["blocks"]["matched_by"] is None


def test_the_main_stack_of_an_encoder_decoder_is_the_decoder(tmp_path, rng):
    tensors = {}
    for stack, n in (("encoder.block", 3), ("decoder.block", 2)):
        for L in range(n):
            tensors[f"{stack}.{L}.layer.0.SelfAttention.q.weight"] = rng.standard_normal((8, 8)).astype(np.float32)
    write_checkpoint(tmp_path, tensors)
    layout = layout_of(tmp_path)
    assert layout.main == "decoder.block" and layout.main_stack().name == "decoder.block"
    assert layout.main_rule.startswith("decoder.block, the decoder of an encoder-decoder model")
    st = layout_of(HF / "gpt2")
    assert st.main_rule == "transformer.h, the only stack"
    two = layout_of(FIXTURES / "st" / "two_stack")
    assert two.main == "model.language_model.layers" and "multimodal" in two.main_rule


# --- docs ----------------------------------------------------------------------------------------


def test_the_architectures_page_is_generated_from_the_current_tables():
    page = (REPO / "docs" / "ARCHITECTURES.md").read_text()
    assert page == docs.render(), "docs/ARCHITECTURES.md is stale: python -m layerdiff.archs.docs > docs/ARCHITECTURES.md"
