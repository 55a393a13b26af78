"""`layerdiff inspect`: every number checked against what safetensors itself reads from the files."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from conftest import EXAMPLE, FIXTURES, qwen3_like, run_cli, write_checkpoint
from safetensors import safe_open

# Bytes per element, from numpy's own dtypes (not layerdiff's table).
ITEMSIZE = {code: np.dtype(t).itemsize for code, t in {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16, "U32": np.uint32,
    "I32": np.int32, "U64": np.uint64, "I64": np.int64, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F32": np.float32, "F64": np.float64, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}.items()}
FLOATS = {"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"}  # what counts as a parameter
LAYER = re.compile(r"^(?P<stack>.+?)\.(?P<layer>\d+)\.(?P<rest>.+)$")

FIXTURE_NAMES = {
    "hf": ["bert", "gemma", "gemma2", "gpt2", "gpt_neox", "llama", "mistral", "mixtral", "phi3", "qwen2", "qwen3",
           "qwen3_moe"],
    "st": ["dtypes", "fp8_block", "identical", "negative", "sharded_st", "two_stack", "zero_and_shape"],
}


def fixture_dirs() -> list:
    names = {f"{group}/{n}" for group, ns in FIXTURE_NAMES.items() for n in ns}
    names |= {f"{p.parent.name}/{p.name}" for group in FIXTURE_NAMES for p in (FIXTURES / group).glob("*") if p.is_dir()}
    return [pytest.param(n, id=n) for n in sorted(names)]


def expected(folder: Path) -> dict:
    """The facts inspect must report, from safetensors' own reader and the file system."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        files = sorted({folder / shard for shard in weight_map.values()})
    else:
        files = [folder / "model.safetensors"]
    tensors, shards = {}, []
    for f in files:
        with safe_open(str(f), framework="numpy") as h:
            keys = list(h.keys())
            for k in keys:
                sl = h.get_slice(k)
                dtype, shape = sl.get_dtype(), sl.get_shape()
                numel = math.prod(shape)
                tensors[k] = {"dtype": dtype, "shape": shape, "bytes": numel * ITEMSIZE[dtype], "numel": numel}
        shards.append({"file": str(f), "bytes": os.stat(f).st_size, "tensors": len(keys)})
    stacks: dict[str, dict[str, dict[int, dict]]] = {}
    nonlayer = {}
    for name, t in tensors.items():
        m = LAYER.match(name)
        if m:
            stacks.setdefault(m["stack"], {}).setdefault(m["rest"], {})[int(m["layer"])] = t
        else:
            nonlayer[name] = t
    return {
        "shards": shards,
        "stacks": stacks,
        "nonlayer": nonlayer,
        "total_params": sum(t["numel"] for t in tensors.values() if t["dtype"] in FLOATS),
        "not_params": {dt: {"tensors": sum(t["dtype"] == dt for t in tensors.values()),
                            "elements": sum(t["numel"] for t in tensors.values() if t["dtype"] == dt)}
                       for dt in sorted({t["dtype"] for t in tensors.values()} - FLOATS)},
        "total_bytes": sum(t["bytes"] for t in tensors.values()),
    }


def check(folder: Path) -> dict:
    proc = run_cli("inspect", str(folder), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    want = expected(folder)

    assert doc["source"]["root"] == str(folder)
    assert sorted(doc["shards"], key=lambda s: s["file"]) == want["shards"]
    assert doc["total_params"] == want["total_params"]
    assert doc["not_params"] == want["not_params"]
    assert doc["total_bytes"] == want["total_bytes"]
    assert {t["name"]: {"dtype": t["dtype"], "shape": t["shape"], "bytes": t["bytes"]} for t in doc["nonlayer"]} == {
        name: {k: t[k] for k in ("dtype", "shape", "bytes")} for name, t in want["nonlayer"].items()}

    assert set(doc["stacks"]) == set(want["stacks"])
    for name, st in doc["stacks"].items():
        raws = want["stacks"][name]
        layers = sorted({L for per_layer in raws.values() for L in per_layer})
        assert st["layers"] == [layers[0], layers[-1]] and st["n_layers"] == len(layers)
        by_raw: dict[str, list[dict]] = {}
        for fam in st["families"].values():
            by_raw.setdefault(fam["raw"], []).append(fam)
        # Every family is a real per-layer tensor name; only quantisation scales may ride along unlisted.
        assert set(by_raw) <= set(raws)
        assert all("scale" in raw for raw in set(raws) - set(by_raw)), set(raws) - set(by_raw)
        for raw, fams in by_raw.items():
            per_layer = raws[raw]
            first = per_layer[min(per_layer)]
            for fam in fams:
                assert fam["dtype"] == first["dtype"]
                assert fam["layers"] == len(per_layer)
                if len(fams) == 1:
                    assert fam["shape"] == first["shape"] and fam["bytes_per_layer"] == first["bytes"]
                else:  # one fused tensor split into several families: each shows the tensor, or its share
                    assert fam["shape"] == first["shape"] or math.prod(fam["shape"]) < math.prod(first["shape"])
            if len(fams) > 1 and any(f["bytes_per_layer"] != first["bytes"] for f in fams):
                assert sum(f["bytes_per_layer"] for f in fams) == first["bytes"]

    text = run_cli("inspect", str(folder))
    assert text.returncode == 0, text.stderr
    for shard in want["shards"]:
        assert shard["file"] in text.stdout
    for name, st in doc["stacks"].items():
        assert f"stack {name}: {st['n_layers']} layers ({st['layers'][0]}..{st['layers'][1]})" in text.stdout
    assert f"{doc['total_params']:,} parameters (floating-point tensors)" in text.stdout
    for dt, d in want["not_params"].items():
        assert f"{d['tensors']} {dt} tensors ({d['elements']:,} elements)" in text.stdout
    return doc


def test_example():
    doc = check(EXAMPLE)
    assert doc["source"]["kind"] == "dir" and doc["source"]["index_file"] is None


def test_sharded_checkpoint_with_config(tmp_path, rng):
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "num_hidden_layers": 5}
    folder = write_checkpoint(tmp_path / "ckpt", qwen3_like(rng, layers=5, hidden=32, ff=48), shards=3, config=config)
    doc = check(folder)
    assert doc["source"]["index_file"] == str(folder / "model.safetensors.index.json")
    assert len(doc["shards"]) == 3
    assert doc["num_hidden_layers"] == 5
    assert doc["stacks"]["model.layers"]["layers"] == [0, 4]
    assert {t["name"] for t in doc["nonlayer"]} == {"model.embed_tokens.weight", "model.norm.weight"}


@pytest.mark.parametrize("name", fixture_dirs())
def test_committed_fixture(name):
    folder = FIXTURES / name
    if not any(folder.glob("*.safetensors")):
        pytest.skip(f"fixture {name} is not present")
    check(folder)


def test_odd_layer_numbers_never_collide_or_crash(tmp_path):
    from conftest import run_cli, write_checkpoint

    t = np.ones((2, 2), np.float32)
    ckpt = write_checkpoint(tmp_path / "ckpt", {
        "model.layers.0.w": t, "model.layers.1.w": t, "model.layers.01.w": t, "model.layers.2.w": t,
        "model.layers." + "9" * 5000 + ".w": t,
    }, config={"num_hidden_layers": 1, "num_nextn_predict_layers": "1"})
    proc = run_cli("inspect", str(ckpt), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    listed = {t["name"] for t in doc["nonlayer"]}
    assert "model.layers.01.w" in listed and "model.layers." + "9" * 5000 + ".w" in listed
    # Layers past num_hidden_layers are reported apart (the string "1" is not a count: "extra", not "mtp").
    stacks = {name: tuple(st["layers"]) for name, st in doc["stacks"].items()}
    assert stacks == {"model.layers": (0, 0), "model.layers[extra]": (1, 2)}
    assert run_cli("scan", str(ckpt), "--quiet").returncode == 0
