"""Writes layerdiff/example/: the small Qwen3-shaped checkpoint `layerdiff example` scans.

Real format (safetensors' own writer), deterministic, ~300 KB: 6 layers whose
weights drift with depth, so the tables show a recognisable pattern.
Run: python tools/make_example.py
"""

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

HIDDEN, FF, HEADS, KV, HEAD_DIM, LAYERS, VOCAB = 64, 192, 4, 2, 16, 6, 128


def main() -> None:
    out = Path(__file__).resolve().parent.parent / "layerdiff" / "example"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2024)
    shapes = {
        "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
        "self_attn.k_proj.weight": (KV * HEAD_DIM, HIDDEN),
        "self_attn.v_proj.weight": (KV * HEAD_DIM, HIDDEN),
        "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
        "mlp.gate_proj.weight": (FF, HIDDEN),
        "mlp.up_proj.weight": (FF, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, FF),
        "input_layernorm.weight": (HIDDEN,),
        "post_attention_layernorm.weight": (HIDDEN,),
        "self_attn.q_norm.weight": (HEAD_DIM,),
        "self_attn.k_norm.weight": (HEAD_DIM,),
    }
    tensors = {}
    prev = {}
    for layer in range(LAYERS):
        keep = 0.5 + 0.08 * layer  # deeper layers resemble their predecessor more
        for name, shape in shapes.items():
            fresh = rng.standard_normal(shape)
            if len(shape) == 1:
                w = 1.0 + 0.2 * layer / LAYERS + 0.1 * fresh
            else:
                w = fresh if layer == 0 else keep * prev[name] + np.sqrt(1 - keep**2) * fresh
            prev[name] = w
            scale = 0.02 * (1 + 0.1 * layer) if len(shape) == 2 else 1.0
            tensors[f"model.layers.{layer}.{name}"] = (w * scale).astype(ml_dtypes.bfloat16)
    tensors["model.embed_tokens.weight"] = (0.02 * rng.standard_normal((VOCAB, HIDDEN))).astype(ml_dtypes.bfloat16)
    tensors["model.norm.weight"] = np.ones(HIDDEN, dtype=ml_dtypes.bfloat16)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": HIDDEN,
        "intermediate_size": FF, "num_attention_heads": HEADS, "num_key_value_heads": KV,
        "head_dim": HEAD_DIM, "num_hidden_layers": LAYERS, "vocab_size": VOCAB,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    main()
