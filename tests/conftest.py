"""Shared test helpers: real-format checkpoints and an independent float64 reference."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 / float8 with numpy for safetensors)
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
EXAMPLE = REPO / "layerdiff" / "example"


def write_checkpoint(folder: Path, tensors: dict[str, np.ndarray], shards: int = 1, config: dict | None = None) -> Path:
    """Write with safetensors' own writer; several shards get a hub-style index."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        for k in range(shards):
            part = names[k::shards]
            fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, str(folder / fname))
            weight_map.update({n: fname for n in part})
        total = sum(t.nbytes for t in tensors.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
        )
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def load_all(folder: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def reference(tensors: dict[str, np.ndarray], stack: str = "model.layers") -> tuple[dict, dict]:
    """Float64 over fully loaded tensors: norms[raw][L] and cos[raw][L] for (L, L+1)."""
    norms: dict[str, dict[int, float]] = {}
    cos: dict[str, dict[int, float]] = {}
    by: dict[str, dict[int, np.ndarray]] = {}
    prefix = stack + "."
    for name, t in tensors.items():
        if not name.startswith(prefix) or t.dtype.kind not in "fV" and t.dtype.name not in ("bfloat16",):
            continue
        layer, rest = name[len(prefix):].split(".", 1)
        by.setdefault(rest, {})[int(layer)] = np.asarray(t).astype(np.float64)
    for rest, layers in by.items():
        for L, w in layers.items():
            norms.setdefault(rest, {})[L] = float(np.sqrt((w * w).sum()))
        for L, w in layers.items():
            nxt = layers.get(L + 1)
            if nxt is not None and nxt.shape == w.shape and norms[rest][L] > 1e-12 and norms[rest][L + 1] > 1e-12:
                cos.setdefault(rest, {})[L] = float((w * nxt).sum() / (norms[rest][L] * norms[rest][L + 1]))
    return norms, cos


def qwen3_like(rng: np.random.Generator, layers: int = 4, hidden: int = 64, ff: int = 96, dtype: Any = ml_dtypes.bfloat16,
               keep: float = 0.7) -> dict[str, np.ndarray]:
    """Qwen3 names and shapes at toy size; adjacent layers correlated by `keep`."""
    shapes = {
        "self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (hidden // 2, hidden),
        "self_attn.v_proj.weight": (hidden // 2, hidden), "self_attn.o_proj.weight": (hidden, hidden),
        "mlp.gate_proj.weight": (ff, hidden), "mlp.up_proj.weight": (ff, hidden), "mlp.down_proj.weight": (hidden, ff),
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_norm.weight": (16,), "self_attn.k_norm.weight": (16,),
    }
    out, prev = {}, {}
    for L in range(layers):
        for rest, shape in shapes.items():
            fresh = rng.standard_normal(shape)
            if len(shape) == 1:
                w = 1.0 + 0.1 * fresh
            else:
                w = fresh if L == 0 else keep * prev[rest] + math.sqrt(1 - keep**2) * fresh
            prev[rest] = w
            out[f"model.layers.{L}.{rest}"] = (0.02 * w if len(shape) == 2 else w).astype(dtype)
    out["model.embed_tokens.weight"] = rng.standard_normal((32, hidden)).astype(dtype)
    out["model.norm.weight"] = np.ones(hidden, dtype=dtype)
    return out


def f64(t: np.ndarray) -> np.ndarray:
    return np.asarray(t).astype(np.float64)


def layer_tensors(tensors: dict[str, np.ndarray], stack: str) -> dict[int, dict[str, np.ndarray]]:
    """stack -> {layer: {rest: float64 tensor}} for names `<stack>.<layer>.<rest>`."""
    out: dict[int, dict[str, np.ndarray]] = {}
    for name, t in tensors.items():
        if name.startswith(stack + "."):
            layer, rest = name[len(stack) + 1:].split(".", 1)
            if layer.isdigit():
                out.setdefault(int(layer), {})[rest] = f64(t)
    return out


def by_names(layers: dict[int, dict[str, np.ndarray]], names: dict[str, str]) -> dict[str, dict[int, np.ndarray]]:
    """Families from a module-name map: `<module>.weight` -> name, `<module>.bias` -> name.bias."""
    out: dict[str, dict[int, np.ndarray]] = {}
    for L, ts in layers.items():
        for rest, t in ts.items():
            module, _, kind = rest.rpartition(".")
            if module in names and kind in ("weight", "bias"):
                out.setdefault(names[module] + (".bias" if kind == "bias" else ""), {})[L] = t
    return out


def stats(mats: dict[int, np.ndarray]) -> tuple[dict[int, float], dict[int, float]]:
    """Float64 norms per layer and cosines of (L, L+1) where both exist with the same shape."""
    norms = {L: math.sqrt(float((m * m).sum())) for L, m in mats.items()}
    cos = {}
    for L, a in mats.items():
        b = mats.get(L + 1)
        if b is not None and a.shape == b.shape and norms[L] > 1e-12 and norms[L + 1] > 1e-12:
            cos[L] = float((a * b).sum()) / (norms[L] * norms[L + 1])
    return norms, cos


def compare(st: dict, expected: dict[str, dict[int, np.ndarray]], exact: bool = True) -> int:
    """A stack's scanned norms and adjacent cosines against float64 over `expected` (with `exact`,
    the same families too); returns the pairs checked."""
    if exact:
        assert set(st["families"]) == set(expected), sorted(set(st["families"]) ^ set(expected))
    layers = st["layers"]
    pairs = {pr["L"]: pr["families"] for pr in st["pairs"]}
    checked = 0
    for fam, mats in expected.items():
        assert fam in st["families"], fam
        norms, cos = stats(mats)
        for i, L in enumerate(layers):
            got = st["scales"][fam][i]
            if L in norms:
                assert got == pytest.approx(norms[L], rel=1e-6, abs=1e-12), (fam, L)
            else:
                assert got is None, (fam, L)
        for L in layers:
            if L in cos:
                got = pairs[L][fam]["cos"]
                assert abs(got - cos[L]) < 1e-6, (fam, L, got, cos[L])
                checked += 1
            elif L in pairs:
                assert fam not in pairs[L], (fam, L)
    return checked


def scan_layout(layout: Any, options: Any, plan: Any = None) -> dict:
    """The scan result document of a layout built by the test (no source)."""
    from layerdiff.api import Model, ScanJob, plan as plan_job
    from layerdiff.engine.gram import plan_rank

    if options.max_memory == type(options)().max_memory:
        # In-process, the budget is measured against this pytest process, which other tests
        # have grown (torch, matplotlib, a real model's arrays): give the default room.
        options = dataclasses.replace(options, max_memory=4 << 30)
    model = Model(layout)
    job = plan_job(model, options) if plan is None else ScanJob(
        model, options, plan, plan_rank(plan, options) if options.rank else None)
    doc = job.run().to_dict()
    del doc["model"], doc["source"]  # what the CLI adds from the MODEL argument
    return doc


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layerdiff", *args], capture_output=True, text=True, env=env)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


def big_checkpoint(folder: Path, layers: int, rows: int, cols: int) -> Path:
    """Layers of bf16 matrices; cheap to make (a tiled random block), not to scan."""
    rng = np.random.default_rng(7)
    tile = rng.standard_normal((64, cols)).astype(ml_dtypes.bfloat16)
    base = np.tile(tile, (rows // 64, 1))
    for L in range(layers):
        mats = {f"model.layers.{L}.mlp.{name}.weight": np.roll(base, 5 * L + k, axis=1) for k, name in enumerate(("up_proj", "down_proj"))}
        write_checkpoint(folder / f"part{L}", mats)
    # One index over the per-layer files, as the hub writes for sharded checkpoints.
    weight_map = {}
    for L in range(layers):
        shard = folder / f"model-{L:05d}.safetensors"
        (folder / f"part{L}" / "model.safetensors").rename(shard)
        (folder / f"part{L}").rmdir()
        weight_map.update({f"model.layers.{L}.mlp.{n}.weight": shard.name for n in ("up_proj", "down_proj")})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder
