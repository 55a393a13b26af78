#!/usr/bin/env python
"""Write a deterministic synthetic Qwen3-4B-shaped bf16 checkpoint, sharded like the hub.

    python benchmarks/make_checkpoint.py --out /tmp/ck-1b --params 1B [--shard-size 2GB]
                                         [--seed 0] [--layers N] [--threads 2]
                                         [--single-file] [--reuse]

Files: model-0000K-of-0000N.safetensors (also when N = 1) + model.safetensors.index.json
(metadata.total_size, weight_map), or one model.safetensors with --single-file; config.json
(Qwen3ForCausalLM, model_type qwen3, tie_word_embeddings false, torch_dtype bfloat16);
synthetic_checkpoint.json (parameters and timings, used by --reuse).

Shapes and names are Qwen3-4B's (hidden 2560, intermediate 9728, 32 heads, 8 kv heads,
head_dim 128, q_norm/k_norm of 128, layernorms of 2560).  ``--params`` is the number of
parameters *written* (file bytes ~= 2 x params): the layer count is derived from it
(one layer = 100.9M params; the real Qwen3-4B has 36 layers and ties lm_head to the
embedding, we always write ``lm_head.weight`` separately, so 36 layers ~= 4.4B written).
Below 3.5B the vocabulary is shrunk (embedding and lm_head ~4% of the params each) so the
layers dominate.

Contents: for each weight-matrix family there is one shared "base" matrix; layer L takes
each group of 4 consecutive elements (one uint64 word of bf16 bits) from the base with
probability p(fam, L) and otherwise from fresh per-layer noise, whose std also drifts
with depth.  So cos(W_L, W_L+1) ~= p_L p_L+1 (p in 0.56-0.96; measured 0.2-0.94) and varies across
depth, and the Frobenius norms vary too.  Values are ~N(0, 0.02) (noise std 0.013-0.030);
layernorm weights are around 1.

Speed: all randomness comes from pools built once per seed (normal bf16 bits, uniform
bytes); tensors are assembled from slices of the pools at pseudo-random offsets with
np.where in the uint64 domain, on 2 threads (numpy releases the GIL), while the previous
shard is being written.  Same seed -> same bytes, independent of the shard size.  Written with safetensors.numpy.save_file, one call per shard.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:
    import ml_dtypes
except ImportError:  # pragma: no cover
    sys.exit("make_checkpoint: needs ml_dtypes (pip install ml_dtypes)")
from safetensors.numpy import save_file

from _proc import parse_params, parse_size  # noqa: F401  (light helpers shared with the benchmarks)

GENERATOR_VERSION = 1
MARKER = "synthetic_checkpoint.json"

HIDDEN = 2560
INTER = 9728
N_HEADS = 32
N_KV = 8
HEAD_DIM = 128
FULL_VOCAB = 151936

# Family name -> (suffix in the state dict, shape).  Order within a layer = state_dict order
# of transformers' Qwen3DecoderLayer (what save_pretrained shards by).
MATRIX_FAMS = [
    ("q_proj", "self_attn.q_proj.weight", (N_HEADS * HEAD_DIM, HIDDEN)),
    ("k_proj", "self_attn.k_proj.weight", (N_KV * HEAD_DIM, HIDDEN)),
    ("v_proj", "self_attn.v_proj.weight", (N_KV * HEAD_DIM, HIDDEN)),
    ("o_proj", "self_attn.o_proj.weight", (HIDDEN, N_HEADS * HEAD_DIM)),
]
NORM_FAMS_ATTN = [
    ("q_norm", "self_attn.q_norm.weight", (HEAD_DIM,)),
    ("k_norm", "self_attn.k_norm.weight", (HEAD_DIM,)),
]
MLP_FAMS = [
    ("gate_proj", "mlp.gate_proj.weight", (INTER, HIDDEN)),
    ("up_proj", "mlp.up_proj.weight", (INTER, HIDDEN)),
    ("down_proj", "mlp.down_proj.weight", (HIDDEN, INTER)),
]
NORM_FAMS_LAYER = [
    ("input_ln", "input_layernorm.weight", (HIDDEN,)),
    ("post_attn_ln", "post_attention_layernorm.weight", (HIDDEN,)),
]
LAYER_TENSORS = MATRIX_FAMS + NORM_FAMS_ATTN + MLP_FAMS + NORM_FAMS_LAYER
FAM_INDEX = {f: i for i, (f, _, _) in enumerate(LAYER_TENSORS)}
PARAMS_PER_LAYER = sum(math.prod(s) for _, _, s in LAYER_TENSORS)

# Pools (elements of bf16).  Chunks are taken from one pool segment.
SEG = 4 << 20            # elements per segment
N_NOISE_SEG = 8          # noise segments, std factors spread geometrically
CHUNK = 256 << 10        # elements per chunk (multiple of 4)
BASE_STD = 0.02
NOISE_STD = [BASE_STD * 2.0 ** ((k - 3.5) / 6.0) for k in range(N_NOISE_SEG)]  # 0.0134-0.030
MASK_POOL = 8 << 20      # uniform bytes, one per uint64 word


# ----------------------------------------------------------------------------- layout
def plan(params: int, layers: int | None = None) -> dict:
    """Vocabulary and layer count for a requested number of written parameters."""
    if params >= 3.5e9:
        vocab = FULL_VOCAB
    else:
        vocab = max(1024, min(FULL_VOCAB, int(0.04 * params / HIDDEN) // 128 * 128))
    if layers is None:
        layers = max(2, int(round((params - 2 * vocab * HIDDEN) / PARAMS_PER_LAYER)))
    total = layers * PARAMS_PER_LAYER + 2 * vocab * HIDDEN + HIDDEN
    return {"vocab": vocab, "layers": layers, "params": total, "bytes": 2 * total}


def tensor_list(p: dict):
    """(name, kind, fam, layer, shape) in transformers state_dict order."""
    out = [("model.embed_tokens.weight", "embed", "embed", -1, (p["vocab"], HIDDEN))]
    for L in range(p["layers"]):
        for fam, suffix, shape in LAYER_TENSORS:
            kind = "vec" if len(shape) == 1 else "mat"
            out.append((f"model.layers.{L}.{suffix}", kind, fam, L, shape))
    out.append(("model.norm.weight", "vec", "final_norm", p["layers"], (HIDDEN,)))
    out.append(("lm_head.weight", "embed", "lm_head", -1, (p["vocab"], HIDDEN)))
    return out


def shard_plan(tensors, shard_bytes: int):
    """Greedy like transformers' save_pretrained: start a new shard when the next tensor
    would push the current one over shard_bytes."""
    shards, cur, cur_bytes = [], [], 0
    for t in tensors:
        nb = 2 * math.prod(t[4])
        if cur and cur_bytes + nb > shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(t)
        cur_bytes += nb
    if cur:
        shards.append(cur)
    return shards


def config_json(p: dict) -> dict:
    tok = lambda t: min(t, p["vocab"] - 1)  # noqa: E731
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": tok(151643),
        "eos_token_id": tok(151645),
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTER,
        "max_position_embeddings": 40960,
        "max_window_layers": p["layers"],
        "model_type": "qwen3",
        "num_attention_heads": N_HEADS,
        "num_hidden_layers": p["layers"],
        "num_key_value_heads": N_KV,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": p["vocab"],
    }


# ----------------------------------------------------------------------------- content
def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


def _fam_key(fam: str) -> int:
    return int.from_bytes(hashlib.sha256(fam.encode()).digest()[:4], "little")


class Generator:
    def __init__(self, seed: int, n_layers: int):
        self.seed = seed
        self.n_layers = n_layers
        rng = _rng(seed, 0)
        # Pool of bf16 bits: segment 0 = base (std 0.02), segments 1.. = noise.
        stds = [BASE_STD] + NOISE_STD
        pool = np.empty(SEG * len(stds), dtype=np.uint16)
        for k, sd in enumerate(stds):
            x = rng.standard_normal(SEG, dtype=np.float32)
            x *= np.float32(sd)
            pool[k * SEG:(k + 1) * SEG] = x.astype(ml_dtypes.bfloat16).view(np.uint16)
        self.pool64 = pool.view(np.uint64)          # words of 4 bf16 values
        self.mask = np.frombuffer(rng.bytes(MASK_POOL), dtype=np.uint8)

    # depth profiles -----------------------------------------------------------
    def share(self, fam: str, L: int) -> float:
        """Probability that an element of layer L comes from the family base."""
        k = _fam_key(fam)
        phase = (k % 1000) / 1000 * 2 * math.pi
        freq = 0.6 + (k // 1000 % 100) / 100 * 1.4          # 0.6-2 half-waves over depth
        x = L / max(self.n_layers - 1, 1)
        return 0.76 + 0.2 * math.sin(math.pi * freq * x + phase)   # 0.56-0.96

    def noise_seg(self, fam: str, L: int) -> int:
        k = _fam_key(fam)
        x = L / max(self.n_layers - 1, 1)
        v = 0.5 + 0.5 * math.sin(2 * math.pi * (x * (0.5 + (k % 7) / 7) + (k % 11) / 11))
        return 1 + min(N_NOISE_SEG - 1, int(v * N_NOISE_SEG))

    # tensors ------------------------------------------------------------------
    def _offsets(self, rng, n_chunks, seg):
        hi = (SEG - CHUNK) // 4
        return seg * (SEG // 4) + rng.integers(0, hi, n_chunks)

    def matrix(self, fam: str, L: int, shape) -> np.ndarray:
        n = math.prod(shape)
        assert n % 4 == 0
        words = n // 4
        cw = CHUNK // 4
        n_chunks = -(-words // cw)
        fk = _fam_key(fam)
        base_off = self._offsets(_rng(self.seed, 1, fk), n_chunks, 0)
        noise_off = self._offsets(_rng(self.seed, 2, fk, L), n_chunks, self.noise_seg(fam, L))
        mask_off = _rng(self.seed, 3, fk, L).integers(0, MASK_POOL - cw, n_chunks)
        thr = int(round(self.share(fam, L) * 256))
        out = np.empty(words, dtype=np.uint64)
        pool, mask = self.pool64, self.mask
        for c in range(n_chunks):
            a = c * cw
            m = min(cw, words - a)
            b, z, u = int(base_off[c]), int(noise_off[c]), int(mask_off[c])
            out[a:a + m] = np.where(mask[u:u + m] < thr, pool[b:b + m], pool[z:z + m])
        return out.view(np.uint16).view(ml_dtypes.bfloat16).reshape(shape)

    def embedding(self, fam: str, shape) -> np.ndarray:
        n = math.prod(shape)
        words = n // 4
        cw = CHUNK // 4
        n_chunks = -(-words // cw)
        off = self._offsets(_rng(self.seed, 4, _fam_key(fam)), n_chunks, 1 + N_NOISE_SEG // 2)
        out = np.empty(words, dtype=np.uint64)
        for c in range(n_chunks):
            a = c * cw
            m = min(cw, words - a)
            o = int(off[c])
            out[a:a + m] = self.pool64[o:o + m]
        return out.view(np.uint16).view(ml_dtypes.bfloat16).reshape(shape)

    def vector(self, fam: str, L: int, shape) -> np.ndarray:
        """Norm weights: around 1, correlated across depth, slowly drifting scale."""
        fk = _fam_key(fam)
        base = 1.0 + 0.1 * _rng(self.seed, 5, fk).standard_normal(shape)
        r = _rng(self.seed, 6, fk, L)
        fresh = 1.0 + 0.1 * r.standard_normal(shape)
        take = r.random(shape) < self.share(fam, L)
        x = L / max(self.n_layers - 1, 1)
        scale = 0.8 + 0.4 * x + 0.1 * math.sin(3 * x + (fk % 5))
        w = np.where(take, base, fresh) * scale
        return w.astype(np.float32).astype(ml_dtypes.bfloat16)

    def make(self, t) -> np.ndarray:
        name, kind, fam, L, shape = t
        if kind == "mat":
            return self.matrix(fam, L, shape)
        if kind == "embed":
            return self.embedding(fam, shape)
        return self.vector(fam, L, shape)


# ----------------------------------------------------------------------------- driver
def existing_matches(out: str, want: dict) -> bool:
    try:
        with open(os.path.join(out, MARKER)) as f:
            have = json.load(f)
    except (OSError, ValueError):
        return False
    return all(have.get(k) == v for k, v in want.items())


def make_checkpoint(out: str, params: int, shard_size: int = 2 * 10**9, seed: int = 0,
                    layers: int | None = None, threads: int = 2, reuse: bool = False,
                    single_file: bool = False, verbose: bool = True) -> dict:
    """Write the checkpoint; return a summary dict (also stored as synthetic_checkpoint.json)."""
    p = plan(params, layers)
    desc = {"generator_version": GENERATOR_VERSION, "requested_params": params,
            "layers": p["layers"], "vocab": p["vocab"], "params": p["params"],
            "shard_size": None if single_file else shard_size, "seed": seed}
    if reuse and existing_matches(out, desc):
        with open(os.path.join(out, MARKER)) as f:
            info = json.load(f)
        if verbose:
            print(f"reusing {out} ({info['total_bytes'] / 1e9:.2f} GB, {p['layers']} layers)")
        info["reused"] = True
        return info

    os.makedirs(out, exist_ok=True)
    for fn in os.listdir(out):   # remove a previous checkpoint's files, nothing else
        if fn == MARKER or fn == "model.safetensors.index.json" or fn == "config.json" \
                or re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", fn):
            os.remove(os.path.join(out, fn))

    t0 = time.perf_counter()
    gen = Generator(seed, p["layers"])
    t_pool = time.perf_counter() - t0
    tensors = tensor_list(p)
    shards = [tensors] if single_file else shard_plan(tensors, shard_size)
    n = len(shards)
    weight_map, file_bytes, payload = {}, 0, 0
    t_gen = 0.0
    t_wait = 0.0   # time the generator waited for the writer (disk-bound part)

    def write(path, d):
        save_file(d, path, metadata={"format": "pt"})
        os.chmod(path, 0o644)          # safetensors creates 0600 files
        return os.path.getsize(path)

    # Generate shard i+1 on `threads` threads while shard i is written by another thread
    # (save_file releases the GIL); at most two shards are in memory.
    with ThreadPoolExecutor(max_workers=max(1, threads)) as ex, \
            ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if single_file else \
                f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            ta = time.perf_counter()
            arrays = list(ex.map(gen.make, shard))
            t_gen += time.perf_counter() - ta
            d = {t[0]: a for t, a in zip(shard, arrays)}
            payload += sum(a.nbytes for a in arrays)
            for t in shard:
                weight_map[t[0]] = fname
            del arrays
            if pending is not None:
                tw = time.perf_counter()
                file_bytes += pending.result()
                t_wait += time.perf_counter() - tw
            pending = writer.submit(write, os.path.join(out, fname), d)
            del d
            if verbose:
                print(f"  {fname}: {len(shard)} tensors, "
                      f"{sum(2 * math.prod(t[4]) for t in shard) / 1e9:.2f} GB", flush=True)
        tw = time.perf_counter()
        file_bytes += pending.result()
        t_wait += time.perf_counter() - tw
    if not single_file:
        index = {"metadata": {"total_size": payload},
                 "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config_json(p), f, indent=2)
        f.write("\n")
    dt = time.perf_counter() - t0
    info = dict(desc, n_shards=n, total_bytes=file_bytes, payload_bytes=payload,
                n_tensors=len(tensors), seconds=round(dt, 3),
                seconds_pool=round(t_pool, 3), seconds_generate=round(t_gen, 3),
                seconds_waiting_for_writes=round(t_wait, 3),
                generate_gb_per_s=round(payload / max(t_gen, 1e-9) / 1e9, 3),
                gb_per_s=round(file_bytes / dt / 1e9, 3))
    with open(os.path.join(out, MARKER), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    if verbose:
        print(f"wrote {out}: {p['layers']} layers, vocab {p['vocab']}, {p['params'] / 1e9:.3f}B "
              f"params, {n} shard(s), {file_bytes:,} bytes ({file_bytes / 1e9:.2f} GB)")
        print(f"time {dt:.2f} s -> {file_bytes / dt / 1e9:.2f} GB/s overall "
              f"(pools {t_pool:.2f} s; generate {t_gen:.2f} s = {info['generate_gb_per_s']:.2f} GB/s; "
              f"then waiting for the disk {t_wait:.2f} s)")
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--params", type=parse_params, default=parse_params("1B"),
                    help="parameters written: 500M, 1B, 4B, 8B ... (default 1B)")
    ap.add_argument("--shard-size", type=parse_size, default=parse_size("2GB"),
                    help="max shard size, hub style: 2GB = 2e9 bytes, 2GiB = 2^31 (default 2GB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=None, help="override the layer count")
    ap.add_argument("--threads", type=int, default=2, help="generator threads (default 2)")
    ap.add_argument("--single-file", action="store_true",
                    help="write one model.safetensors without an index (ignores --shard-size)")
    ap.add_argument("--reuse", action="store_true",
                    help="do nothing if OUT already holds the same checkpoint")
    a = ap.parse_args(argv)
    if a.layers is not None and a.layers < 2:
        ap.error("--layers must be >= 2")
    make_checkpoint(a.out, a.params, a.shard_size, a.seed, a.layers, a.threads, a.reuse,
                    a.single_file)


if __name__ == "__main__":
    main()
