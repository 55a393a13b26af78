#!/usr/bin/env python
"""`layerdiff inspect` on a checkpoint with many shards and tensors must stay fast: it reads
headers only.

    python benchmarks/inspect_speed.py [--shards 100] [--tensors 10000] [--limit 1.0]
                                       [--repeat 3] [--keep DIR]

Writes (safetensors.numpy.save_file) a synthetic Qwen3-named checkpoint of tiny bf16 tensors:
--tensors tensors spread evenly over --shards shards, plus model.safetensors.index.json and
config.json, in a temp dir.  Then times `layerdiff inspect DIR --json` as a subprocess (best
of --repeat; this includes interpreter start-up and imports) and, if importable, the same
work in-process (layerdiff.checkpoint.index.load_index, and the full resolve -> load_index ->
build_layout -> inspect_doc path when those exist).  Exit status 1 if the subprocess best
is over --limit seconds (default 1.0) or inspect fails.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import _proc

HIDDEN, HEADS, KV, HEAD_DIM, INTER, VOCAB = 16, 4, 2, 4, 32, 64
LAYER = [  # (suffix, shape)
    ("self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN)),
    ("self_attn.k_proj.weight", (KV * HEAD_DIM, HIDDEN)),
    ("self_attn.v_proj.weight", (KV * HEAD_DIM, HIDDEN)),
    ("self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM)),
    ("self_attn.q_norm.weight", (HEAD_DIM,)),
    ("self_attn.k_norm.weight", (HEAD_DIM,)),
    ("mlp.gate_proj.weight", (INTER, HIDDEN)),
    ("mlp.up_proj.weight", (INTER, HIDDEN)),
    ("mlp.down_proj.weight", (HIDDEN, INTER)),
    ("input_layernorm.weight", (HIDDEN,)),
    ("post_attention_layernorm.weight", (HIDDEN,)),
]


def write_many(out: str, n_shards: int, n_tensors: int) -> dict:
    import numpy as np
    import ml_dtypes
    from safetensors.numpy import save_file

    n_layers = (n_tensors - 1) // len(LAYER)
    names = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for L in range(n_layers):
        names += [(f"model.layers.{L}.{s}", shp) for s, shp in LAYER]
    extra = [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    names += extra[:max(0, n_tensors - len(names))]
    rng = np.random.default_rng(0)
    per = -(-len(names) // n_shards)
    weight_map, total = {}, 0
    for i in range(n_shards):
        part = names[i * per:(i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        d = {n: (rng.standard_normal(shp, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
             for n, shp in part}
        save_file(d, os.path.join(out, fname), metadata={"format": "pt"})
        total += sum(a.nbytes for a in d.values())
        weight_map.update({n: fname for n, _ in part})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                  f, indent=2)
    cfg = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": HIDDEN,
           "intermediate_size": INTER, "num_attention_heads": HEADS, "num_key_value_heads": KV,
           "head_dim": HEAD_DIM, "num_hidden_layers": n_layers, "vocab_size": VOCAB,
           "rms_norm_eps": 1e-6, "tie_word_embeddings": "lm_head.weight" not in weight_map,
           "torch_dtype": "bfloat16"}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return {"tensors": len(names), "shards": n_shards, "layers": n_layers}


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), times


def in_process(d: str, repeat: int) -> list[tuple[str, float]]:
    """Time what can be imported; skip (with a note) what cannot."""
    from pathlib import Path
    out = []
    try:
        from layerdiff.checkpoint.index import load_index
    except ImportError as e:
        print(f"  in-process: skipped (layerdiff.checkpoint.index.load_index not importable: {e})")
        return out
    files = [Path(f) for f in _proc.shard_files(d)]
    idx = Path(d) / "model.safetensors.index.json"
    try:
        best, _ = best_of(lambda: load_index(files, idx), repeat)
        out.append(("load_index(100 shards + index json)", best))
    except TypeError as e:
        print(f"  in-process load_index: skipped (signature changed? {e})")
    try:
        from layerdiff.layout import build_layout
        from layerdiff.present.inspect import inspect_doc
        from layerdiff.checkpoint.sources import resolve
    except ImportError as e:
        print(f"  in-process full path: skipped ({e})")
        return out

    def full():
        src = resolve(d, None, None)
        index = load_index(src.files, src.index_file)
        return json.dumps(inspect_doc(src, index, build_layout(index, src.config)))

    try:
        best, _ = best_of(full, repeat)
        out.append(("resolve + load_index + build_layout + inspect_doc + json", best))
    except TypeError as e:
        print(f"  in-process full path: skipped (signature changed? {e})")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--tensors", type=int, default=10000)
    ap.add_argument("--limit", type=float, default=1.0, help="max seconds for the subprocess (best of)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", metavar="DIR", default=None,
                    help="write the checkpoint to DIR and keep it (default: a temp dir, removed)")
    a = ap.parse_args(argv)

    ok, why = _proc.layerdiff_available()
    if not ok:
        sys.exit(f"inspect_speed: cannot run layerdiff ({why})")
    d = a.keep or tempfile.mkdtemp(prefix="layerdiff-inspect-")
    os.makedirs(d, exist_ok=True)
    status = 0
    try:
        t = time.perf_counter()
        info = write_many(d, a.shards, a.tensors)
        print(f"wrote {info['tensors']} tensors ({info['layers']} layers) in {info['shards']} shards "
              f"to {d} in {time.perf_counter() - t:.2f} s")
        cmd = _proc.layerdiff_cmd() + ["inspect", d, "--json"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"layerdiff inspect failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
            return 1
        try:
            json.loads(r.stdout)
        except ValueError:
            print("layerdiff inspect --json did not print JSON")
            return 1
        best, times = best_of(lambda: subprocess.run(cmd, capture_output=True, check=True), a.repeat)
        base, _ = best_of(lambda: subprocess.run(
            [sys.executable, "-c", "import layerdiff.cli"], capture_output=True, check=True), a.repeat)
        print(f"subprocess `{' '.join(cmd[-3:])}`: best {best:.3f} s of "
              f"{', '.join(f'{x:.3f}' for x in times)} (python + import layerdiff.cli alone: "
              f"{base:.3f} s)")
        for label, sec in in_process(d, a.repeat):
            print(f"  in-process {label}: best {sec * 1e3:.1f} ms")
        if best > a.limit:
            print(f"inspect_speed: FAIL ({best:.3f} s > {a.limit} s)")
            status = 1
        else:
            print(f"inspect_speed: OK ({best:.3f} s <= {a.limit} s)")
    finally:
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
