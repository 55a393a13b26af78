"""The architectures of issue 9: seq2seq (T5 v1.1, BART, mBART, Whisper), encoders (MPNet, ViT,
DeiT, ModernBERT), two towers (CLIP), GraniteMoE's 3-D experts and Cohere.

Every fixture under tests/fixtures/hf/<name>/ was written by transformers' `save_pretrained`
(tests/fixtures/make_fixtures.py). The expected families are built here, independently of
layerdiff's tables, from the fully loaded tensors in float64: each raw module maps to its canonical
family as the model's forward code uses it, and fused tensors are sliced here the way the forward
code slices them (ModernBERT `attn.Wqkv` / `mlp.Wi`, GraniteMoE `input_linear`). A torch-backed
test checks those slices against what transformers' own modules compute. The scan's norms and
adjacent cosines are then compared with the float64 reference (cosines to 1e-6 absolute, norms to
1e-6 relative), and the canonical families present per stack are spelled out below.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import layerdiff
from conftest import FIXTURES, by_names, compare, layer_tensors, load_all, reference, stats, write_checkpoint

HF = FIXTURES / "hf"
BIG = 1 << 30  # in-process scans: the budget must not depend on what the test process imported

NEW = ("t5", "bart", "mbart", "whisper", "mpnet", "vit", "deit", "clip", "modernbert", "granitemoe", "cohere")




def cfg(name: str) -> dict:
    return json.loads((HF / name / "config.json").read_text())




# --- the reference's name tables: raw module (before .weight / .bias) -> canonical family -------------
# Read off each model's modeling code (transformers 5.24): which module a sub-layer is, and where
# its norm sits. Pre-LN models (mBART, Whisper, T5, ViT, CLIP, ModernBERT): the norm before
# attention is input_ln, the norm before the feed-forward is post_attn_ln (as Llama's
# post_attention_layernorm). Post-LN models (BART, MPNet, like BERT): the norm after the attention
# residual is post_attn_ln, the norm after the feed-forward residual is post_ffn_ln. The norm of the
# cross-attention sub-layer is cross_attn_ln in both.

_T5_SELF = {
    "layer.0.SelfAttention.q": "q_proj", "layer.0.SelfAttention.k": "k_proj", "layer.0.SelfAttention.v": "v_proj",
    "layer.0.SelfAttention.o": "o_proj", "layer.0.layer_norm": "input_ln",
    # [buckets, heads], only in block 0 of T5/mT5 (UMT5: every block): a family of its own, never paired here.
    "layer.0.SelfAttention.relative_attention_bias": "rel_attn_bias",
}
# T5DenseGatedActDense.forward: act(wi_0(x)) * wi_1(x) -> wo: wi_0 is the gate, wi_1 the up projection.
T5_ENCODER = {**_T5_SELF, "layer.1.DenseReluDense.wi_0": "gate_proj", "layer.1.DenseReluDense.wi_1": "up_proj",
              "layer.1.DenseReluDense.wo": "down_proj", "layer.1.layer_norm": "post_attn_ln"}
T5_DECODER = {**_T5_SELF,
              "layer.1.EncDecAttention.q": "cross_q_proj", "layer.1.EncDecAttention.k": "cross_k_proj",
              "layer.1.EncDecAttention.v": "cross_v_proj", "layer.1.EncDecAttention.o": "cross_o_proj",
              "layer.1.layer_norm": "cross_attn_ln",
              "layer.2.DenseReluDense.wi_0": "gate_proj", "layer.2.DenseReluDense.wi_1": "up_proj",
              "layer.2.DenseReluDense.wo": "down_proj", "layer.2.layer_norm": "post_attn_ln"}

_BART_LAYER = {
    "self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
    "self_attn.out_proj": "o_proj",
    "encoder_attn.q_proj": "cross_q_proj", "encoder_attn.k_proj": "cross_k_proj",
    "encoder_attn.v_proj": "cross_v_proj", "encoder_attn.out_proj": "cross_o_proj",
    "encoder_attn_layer_norm": "cross_attn_ln",
    "fc1": "up_proj", "fc2": "down_proj",
}
BART = {**_BART_LAYER, "self_attn_layer_norm": "post_attn_ln", "final_layer_norm": "post_ffn_ln"}  # post-LN
MBART = {**_BART_LAYER, "self_attn_layer_norm": "input_ln", "final_layer_norm": "post_attn_ln"}  # pre-LN
WHISPER = MBART  # WhisperEncoderLayer / WhisperDecoderLayer: pre-LN, as mBART

MPNET = {"attention.attn.q": "q_proj", "attention.attn.k": "k_proj", "attention.attn.v": "v_proj",
         "attention.attn.o": "o_proj", "attention.LayerNorm": "post_attn_ln", "intermediate.dense": "up_proj",
         "output.dense": "down_proj", "output.LayerNorm": "post_ffn_ln"}
VIT = {"attention.attention.query": "q_proj", "attention.attention.key": "k_proj",
       "attention.attention.value": "v_proj", "attention.output.dense": "o_proj", "intermediate.dense": "up_proj",
       "output.dense": "down_proj", "layernorm_before": "input_ln", "layernorm_after": "post_attn_ln"}
CLIP = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
        "self_attn.out_proj": "o_proj", "mlp.fc1": "up_proj", "mlp.fc2": "down_proj",
        "layer_norm1": "input_ln", "layer_norm2": "post_attn_ln"}
MODERNBERT = {"attn.Wo": "o_proj", "mlp.Wo": "down_proj", "attn_norm": "input_ln", "mlp_norm": "post_attn_ln"}
_LLAMA_ATTN = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
               "self_attn.o_proj": "o_proj", "input_layernorm": "input_ln"}
GRANITEMOE = {**_LLAMA_ATTN, "post_attention_layernorm": "post_attn_ln", "block_sparse_moe.router.layer": "router"}
COHERE = {**_LLAMA_ATTN, "self_attn.q_norm": "q_norm", "self_attn.k_norm": "k_norm",
          "mlp.gate_proj": "gate_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "down_proj"}

# fixture -> {stack: (name table, architecture table expected to match)}
STACKS: dict[str, dict[str, tuple[dict[str, str], str]]] = {
    "t5": {"encoder.block": (T5_ENCODER, "t5_encoder"), "decoder.block": (T5_DECODER, "t5")},
    "bart": {"model.encoder.layers": (BART, "bart"), "model.decoder.layers": (BART, "bart")},
    "mbart": {"model.encoder.layers": (MBART, "mbart"), "model.decoder.layers": (MBART, "mbart")},
    "whisper": {"model.encoder.layers": (WHISPER, "whisper"), "model.decoder.layers": (WHISPER, "whisper")},
    "mpnet": {"encoder.layer": (MPNET, "mpnet")},
    "vit": {"encoder.layer": (VIT, "vit")},
    "deit": {"deit.encoder.layer": (VIT, "vit")},
    "clip": {"text_model.encoder.layers": (CLIP, "clip"), "vision_model.encoder.layers": (CLIP, "clip_vision")},
    "modernbert": {"model.layers": (MODERNBERT, "modernbert")},
    "granitemoe": {"model.layers": (GRANITEMOE, "granitemoe")},
    "cohere": {"model.layers": (COHERE, "cohere")},
}
# The stack the seed's keys describe (result["main_stack"]): the decoder of a seq2seq model, the
# text tower of CLIP, the only stack otherwise.
MAIN = {"t5": "decoder.block", "bart": "model.decoder.layers", "mbart": "model.decoder.layers",
        "whisper": "model.decoder.layers", "clip": "text_model.encoder.layers"}

# The canonical families expected per stack (biases and all-experts aggregates included).
_ATTN4 = {"q_proj", "k_proj", "v_proj", "o_proj"}
_CROSS4 = {"cross_q_proj", "cross_k_proj", "cross_v_proj", "cross_o_proj"}


def _b(names: set[str]) -> set[str]:
    return {f"{n}.bias" for n in names}


_BART_ENC = _ATTN4 | {"up_proj", "down_proj"}
_EXPERTS = {f"experts.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj", "down_proj")} | {
    "experts.gate_proj", "experts.up_proj", "experts.down_proj"}
FAMILIES: dict[str, dict[str, set[str]]] = {
    "t5": {
        "encoder.block": _ATTN4 | {"rel_attn_bias", "input_ln", "post_attn_ln", "gate_proj", "up_proj", "down_proj"},
        "decoder.block": _ATTN4 | _CROSS4 | {"rel_attn_bias", "input_ln", "cross_attn_ln", "post_attn_ln",
                                             "gate_proj", "up_proj", "down_proj"},
    },
    "bart": {
        "model.encoder.layers": (_BART_ENC | {"post_attn_ln", "post_ffn_ln"}) | _b(_BART_ENC | {"post_attn_ln", "post_ffn_ln"}),
        "model.decoder.layers": (_BART_ENC | _CROSS4 | {"post_attn_ln", "cross_attn_ln", "post_ffn_ln"})
        | _b(_BART_ENC | _CROSS4 | {"post_attn_ln", "cross_attn_ln", "post_ffn_ln"}),
    },
    "mbart": {
        "model.encoder.layers": (_BART_ENC | {"input_ln", "post_attn_ln"}) | _b(_BART_ENC | {"input_ln", "post_attn_ln"}),
        "model.decoder.layers": (_BART_ENC | _CROSS4 | {"input_ln", "cross_attn_ln", "post_attn_ln"})
        | _b(_BART_ENC | _CROSS4 | {"input_ln", "cross_attn_ln", "post_attn_ln"}),
    },
    # Whisper's k_proj / encoder_attn.k_proj have no bias (nn.Linear(..., bias=False))
    "whisper": {
        "model.encoder.layers": (_BART_ENC | {"input_ln", "post_attn_ln"})
        | _b((_BART_ENC - {"k_proj"}) | {"input_ln", "post_attn_ln"}),
        "model.decoder.layers": (_BART_ENC | _CROSS4 | {"input_ln", "cross_attn_ln", "post_attn_ln"})
        | _b(((_BART_ENC | _CROSS4) - {"k_proj", "cross_k_proj"}) | {"input_ln", "cross_attn_ln", "post_attn_ln"}),
    },
    "mpnet": {"encoder.layer": (_BART_ENC | {"post_attn_ln", "post_ffn_ln"}) | _b(_BART_ENC | {"post_attn_ln", "post_ffn_ln"})},
    "vit": {"encoder.layer": (_BART_ENC | {"input_ln", "post_attn_ln"}) | _b(_BART_ENC | {"input_ln", "post_attn_ln"})},
    "deit": {"deit.encoder.layer": (_BART_ENC | {"input_ln", "post_attn_ln"}) | _b(_BART_ENC | {"input_ln", "post_attn_ln"})},
    "clip": {
        tower: (_BART_ENC | {"input_ln", "post_attn_ln"}) | _b(_BART_ENC | {"input_ln", "post_attn_ln"})
        for tower in ("text_model.encoder.layers", "vision_model.encoder.layers")
    },
    "modernbert": {"model.layers": (_BART_ENC | {"gate_proj", "input_ln", "post_attn_ln"})
                   | _b(_BART_ENC | {"gate_proj", "input_ln", "post_attn_ln"})},
    "granitemoe": {"model.layers": _ATTN4 | {"input_ln", "post_attn_ln", "router"} | _EXPERTS},
    "cohere": {"model.layers": _ATTN4 | {"gate_proj", "up_proj", "down_proj", "input_ln", "q_norm", "k_norm"}},
}




def modernbert_splits(layers: dict[int, dict[str, np.ndarray]], c: dict) -> dict[str, dict[int, np.ndarray]]:
    """ModernBertAttention.forward: Wqkv(x).view(..., 3, heads, head_dim).unbind(-3): rows [q; k; v],
    hidden_size rows each. ModernBertMLP.forward: input, gate = Wi(x).chunk(2, dim=-1);
    Wo(act(input) * gate): the first intermediate_size rows are activated (Llama's gate_proj), the
    second multiply (Llama's up_proj). Biases are sliced the same way."""
    H, inter = c["hidden_size"], c["intermediate_size"]
    out: dict[str, dict[int, np.ndarray]] = {}
    for L, ts in layers.items():
        for kind, suffix in (("weight", ""), ("bias", ".bias")):
            qkv = ts[f"attn.Wqkv.{kind}"]
            assert qkv.shape[0] == 3 * H
            for i, fam in enumerate(("q_proj", "k_proj", "v_proj")):
                out.setdefault(fam + suffix, {})[L] = qkv[i * H:(i + 1) * H]
            wi = ts[f"mlp.Wi.{kind}"]
            assert wi.shape[0] == 2 * inter
            out.setdefault("gate_proj" + suffix, {})[L] = wi[:inter]
            out.setdefault("up_proj" + suffix, {})[L] = wi[inter:]
    return out


def granite_experts(layers: dict[int, dict[str, np.ndarray]], c: dict, gate_up: str = "block_sparse_moe.input_linear.weight",
                    down: str = "block_sparse_moe.output_linear.weight") -> dict[str, dict[int, np.ndarray]]:
    """GraniteMoeExperts.forward (input_linear is loaded as experts.gate_up_proj unchanged):
    gate, up = linear(x, gate_up_proj[e]).chunk(2, dim=-1); act(gate) * up -> linear(., down_proj[e]).
    So input_linear [E, 2I, H]: per expert rows [gate (I); up (I)]; output_linear [E, H, I] is down."""
    inter, E = c["intermediate_size"], c["num_local_experts"]
    out: dict[str, dict[int, np.ndarray]] = {}
    for L, ts in layers.items():
        gu, dn = ts[gate_up], ts[down]
        assert gu.shape[:2] == (E, 2 * inter) and dn.shape[0] == E and dn.shape[2] == inter
        parts = {"gate_proj": gu[:, :inter], "up_proj": gu[:, inter:], "down_proj": dn}
        for name, t in parts.items():
            for e in range(E):
                out.setdefault(f"experts.{e}.{name}", {})[L] = t[e]
            out.setdefault(f"experts.{name}", {})[L] = t  # the family over all experts of the layer
    return out


def expected(name: str, tensors: dict[str, np.ndarray] | None = None) -> dict[str, dict[str, dict[int, np.ndarray]]]:
    """stack -> family -> layer -> float64 matrix, for one fixture."""
    tensors = load_all(HF / name) if tensors is None else tensors
    out = {}
    for stack, (names, _) in STACKS[name].items():
        layers = layer_tensors(tensors, stack)
        fams = by_names(layers, names)
        if name == "modernbert":
            fams.update(modernbert_splits(layers, cfg(name)))
        if name == "granitemoe":
            fams.update(granite_experts(layers, cfg(name)))
        out[stack] = fams
    return out




# --- the reference itself (no layerdiff table involved) ----------------------------------------------


@pytest.mark.parametrize("name", NEW)
def test_reference_covers_every_layer_tensor_and_the_expected_families(name):
    """Every tensor of every stack is a family of the reference (or part of a split one), the
    stacks are exactly those of the file, and the families are the ones spelled out above."""
    tensors = load_all(HF / name)
    stacks = {}
    for n in tensors:
        for stack in STACKS[name]:
            if n.startswith(stack + ".") and n[len(stack) + 1:].split(".", 1)[0].isdigit():
                stacks.setdefault(stack, set()).add(n)
    assert set(stacks) == set(STACKS[name])
    # nothing else in the file has a layer number after a stack-like prefix
    other = [n for n in tensors if re.search(r"\.\d+\.", n) and not any(n in s for s in stacks.values())]
    assert other == [], other
    fused = {"modernbert": {"attn.Wqkv", "mlp.Wi"},
             "granitemoe": {"block_sparse_moe.input_linear", "block_sparse_moe.output_linear"}}.get(name, set())
    exp = expected(name, tensors)
    for stack, (names, _) in STACKS[name].items():
        for L, ts in layer_tensors(tensors, stack).items():
            for rest in ts:
                module, _, kind = rest.rpartition(".")
                assert kind in ("weight", "bias") and (module in names or module in fused), (name, stack, rest)
        assert set(exp[stack]) == FAMILIES[name][stack], (stack, sorted(set(exp[stack]) ^ FAMILIES[name][stack]))


def test_seq2seq_and_tower_depths():
    """The fixtures' stacks have the depths the generator asked for (decoder shallower than the
    encoder in t5 and whisper, so "most layers" does not find the decoder)."""
    depth = {name: {s: len(layer_tensors(load_all(HF / name), s)) for s in STACKS[name]} for name in MAIN}
    assert depth["t5"] == {"encoder.block": 3, "decoder.block": 2}
    assert depth["whisper"] == {"model.encoder.layers": 3, "model.decoder.layers": 2}
    assert depth["bart"] == depth["mbart"] == {"model.encoder.layers": 2, "model.decoder.layers": 2}
    assert depth["clip"] == {"text_model.encoder.layers": 3, "vision_model.encoder.layers": 2}
    # relative_attention_bias is stored in block 0 only (T5Stack: has_relative_attention_bias=bool(i == 0))
    for stack in ("encoder.block", "decoder.block"):
        assert set(expected("t5")[stack]["rel_attn_bias"]) == {0}
    # ModernBERT layer 0 has no attn_norm (nn.Identity)
    assert set(expected("modernbert")["model.layers"]["input_ln"]) == {1, 2, 3}


def test_splits_reassemble_the_fused_tensors():
    tensors = load_all(HF / "modernbert")
    c = cfg("modernbert")
    H, inter = c["hidden_size"], c["intermediate_size"]
    exp = expected("modernbert", tensors)["model.layers"]
    for L, ts in layer_tensors(tensors, "model.layers").items():
        for kind, sfx in (("weight", ""), ("bias", ".bias")):
            q, k, v = (exp[f + sfx][L] for f in ("q_proj", "k_proj", "v_proj"))
            assert q.shape[0] == k.shape[0] == v.shape[0] == H
            assert np.array_equal(np.concatenate([q, k, v]), ts[f"attn.Wqkv.{kind}"])
            g, u = exp["gate_proj" + sfx][L], exp["up_proj" + sfx][L]
            assert g.shape[0] == u.shape[0] == inter
            assert np.array_equal(np.concatenate([g, u]), ts[f"mlp.Wi.{kind}"])
    tensors = load_all(HF / "granitemoe")
    exp = expected("granitemoe", tensors)["model.layers"]
    for L, ts in layer_tensors(tensors, "model.layers").items():
        gu = np.stack([np.concatenate([exp[f"experts.{e}.gate_proj"][L], exp[f"experts.{e}.up_proj"][L]])
                       for e in range(4)])
        assert np.array_equal(gu, ts["block_sparse_moe.input_linear.weight"])
        assert exp["experts.0.gate_proj"][L].shape == (16, 32) and exp["experts.0.down_proj"][L].shape == (32, 16)


@pytest.mark.parametrize("name", NEW)
def test_unsplit_families_agree_with_conftest_reference(name):
    """The per-family float64 statistics here equal conftest.reference's over the raw names."""
    tensors = load_all(HF / name)
    exp = expected(name, tensors)
    for stack, (names, _) in STACKS[name].items():
        norms, cos = reference(tensors, stack)
        for rest in norms:
            module, _, kind = rest.rpartition(".")
            if module not in names:
                continue
            fam = names[module] + (".bias" if kind == "bias" else "")
            n, c = stats(exp[stack][fam])
            assert n == pytest.approx(norms[rest], rel=1e-12)
            assert set(c) == set(cos.get(rest, {}))
            for L in c:
                assert c[L] == pytest.approx(cos[rest][L], abs=1e-12)


def test_correlated_fixtures_have_nontrivial_cosines():
    """rho in the generator: adjacent-layer cosines of 2-D weights are ~rho, not ~0 (bf16/f16 noise)."""
    for name, stack, fam, rho in (("t5", "encoder.block", "gate_proj", 0.8), ("t5", "decoder.block", "cross_q_proj", 0.8),
                                  ("bart", "model.decoder.layers", "cross_o_proj", 0.7),
                                  ("whisper", "model.encoder.layers", "up_proj", 0.6),
                                  ("clip", "vision_model.encoder.layers", "q_proj", 0.75),
                                  ("modernbert", "model.layers", "k_proj", 0.7),
                                  ("granitemoe", "model.layers", "experts.2.up_proj", 0.7)):
        _, cos = stats(expected(name)[stack][fam])
        assert cos and all(abs(c - rho) < 0.15 for c in cos.values()), (name, fam, cos)
    _, cos = stats(expected("mbart")["model.encoder.layers"]["q_proj"])
    assert abs(cos[0]) < 0.3  # independent layers


# --- the slices against transformers' own code (torch needed) -----------------------------------------

FORWARD_SCRIPT = textwrap.dedent('''
    """ModernBERT q/k/v and gate/up, GraniteMoE experts' gate/up/down as transformers computes them."""
    import sys
    import numpy as np
    import torch
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoModelForMaskedLM

    fixtures, out_file = sys.argv[1:3]
    CAP, out = {}, {}

    def capture(module, query, key, value, attention_mask=None, **kw):
        CAP.update(q=query, k=key, v=value)
        b, h, s, d = query.shape
        return torch.zeros(b, s, h, d, dtype=query.dtype), None

    AttentionInterface.register("capture", capture)

    def put(fam, L, m):
        out[f"{fam}|{L}"] = m.detach().double().numpy()

    # ModernBERT: attention on the identity (and zeros, for the bias) with rotary made the identity
    # (cos 1, sin 0); the captured q/k/v [batch, heads, seq, head_dim] hold Wqkv's rows after the
    # model's own view/unbind. The MLP: the activation's input is the gate, Wo's input (with the
    # activation forced to 1) is the up projection.
    model = AutoModelForMaskedLM.from_pretrained(f"{fixtures}/hf/modernbert", dtype=torch.float64,
                                                 attn_implementation="capture")
    H = model.config.hidden_size
    for L, layer in enumerate(model.model.layers):
        attn = layer.attn
        hd = attn.head_dim
        pe = (torch.ones(1, H, hd, dtype=torch.float64), torch.zeros(1, H, hd, dtype=torch.float64))
        got = []
        for x in (torch.eye(H, dtype=torch.float64)[None], torch.zeros(1, H, H, dtype=torch.float64)):
            attn(hidden_states=x, position_embeddings=pe, attention_mask=None)
            got.append({n: CAP[n][0].transpose(0, 1).reshape(H, -1) for n in "qkv"})
        for n in "qkv":
            put(f"{n}_proj", L, (got[0][n] - got[1][n]).T)
            put(f"{n}_proj.bias", L, got[1][n][0])
        mlp, seen = layer.mlp, {}
        hooks = [
            mlp.act.register_forward_hook(lambda mod, args, res: (seen.__setitem__("gate", args[0]), torch.ones_like(res))[1]),
            mlp.Wo.register_forward_pre_hook(lambda mod, args: seen.__setitem__("up", args[0])),
        ]
        for x, tag in ((torch.eye(H, dtype=torch.float64)[None], ""), (torch.zeros(1, 1, H, dtype=torch.float64), "0")):
            mlp(x)
            seen[tag + "g"], seen[tag + "u"] = seen["gate"], seen["up"]
        for h in hooks:
            h.remove()
        put("gate_proj", L, (seen["g"][0] - seen["0g"][0]).T)
        put("up_proj", L, (seen["u"][0] - seen["0u"][0]).T)
        put("gate_proj.bias", L, seen["0g"][0, 0])
        put("up_proj.bias", L, seen["0u"][0, 0])

    # GraniteMoE: each expert run alone on the identity (every token routed to it with weight 1).
    # The activation's input is the gate; with the activation forced to 1 and down_proj[e] replaced by
    # [I x I identity; 0], the output's first I columns are the up projection. down_proj as loaded.
    model = AutoModelForCausalLM.from_pretrained(f"{fixtures}/hf/granitemoe", dtype=torch.float64,
                                                 experts_implementation="eager")
    H = model.config.hidden_size
    for L, layer in enumerate(model.model.layers):
        experts = layer.block_sparse_moe.experts
        E, I = experts.num_experts, experts.intermediate_dim
        seen = {}
        hook = experts.act_fn.register_forward_hook(
            lambda mod, args, res: (seen.__setitem__("gate", args[0]), torch.ones_like(res))[1])
        down = experts.down_proj.detach().clone()
        probe = torch.zeros_like(down)
        probe[:, :I, :] = torch.eye(I, dtype=torch.float64)
        with torch.no_grad():
            experts.down_proj.copy_(probe)
            for e in range(E):
                x = torch.eye(H, dtype=torch.float64)
                y = experts(x, torch.full((H, 1), e), torch.ones(H, 1, dtype=torch.float64))
                put(f"experts.{e}.gate_proj", L, seen["gate"].T)
                put(f"experts.{e}.up_proj", L, y[:, :I].T)
                put(f"experts.{e}.down_proj", L, down[e])
            experts.down_proj.copy_(down)
        hook.remove()
        put("router", L, layer.block_sparse_moe.router.weight)
    np.savez(out_file, **out)
''')


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
    reason="torch and transformers are needed to run transformers' own split code",
)
def test_reference_slices_match_transformers_forward(tmp_path):
    # In a subprocess: importing torch here would grow this process past the scans' memory budget.
    script, out = tmp_path / "forward.py", tmp_path / "forward.npz"
    script.write_text(FORWARD_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(FIXTURES), str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = np.load(out)
    got: dict[str, dict[str, dict[int, np.ndarray]]] = {}
    for key in ref.files:
        fam, L = key.split("|")
        where = "granitemoe" if fam.startswith(("experts.", "router")) else "modernbert"
        got.setdefault(where, {}).setdefault(fam, {})[int(L)] = ref[key]
    checked = 0
    for where, fams in got.items():
        exp = expected(where)["model.layers"]
        for fam, by_layer in fams.items():
            for L, m in by_layer.items():
                assert m.shape == exp[fam][L].shape, (where, fam, L)
                np.testing.assert_allclose(m, exp[fam][L], rtol=0, atol=1e-12, err_msg=f"{where} {fam} {L}")
                checked += 1
    assert checked == 4 * (6 + 4) + 3 * (4 * 3 + 1)


# --- layerdiff against the reference ------------------------------------------------------------------


def open_layout(folder: Path):
    """The layout layerdiff builds for a checkpoint folder."""
    return layerdiff.open_model(str(folder)).layout


def scan_folder(folder: Path, **opts) -> dict:
    """The scan's JSON document (as the CLI writes it) for a checkpoint folder."""
    opts.setdefault("jobs", 1)
    opts.setdefault("max_memory", BIG)
    return layerdiff.scan(str(folder), **opts).to_dict()


@pytest.mark.parametrize("name", NEW)
def test_scan_matches_the_float64_reference(name):
    result = scan_folder(HF / name)
    assert set(result["stacks"]) == set(STACKS[name])
    assert result["main_stack"] == MAIN.get(name, next(iter(STACKS[name])))
    exp = expected(name)
    checked = 0
    for stack, (_, arch) in STACKS[name].items():
        st = result["stacks"][stack]
        assert st["unmapped"] == [], (stack, st["unmapped"])
        assert set(st["families"]) == FAMILIES[name][stack]
        checked += compare(st, exp[stack])
    want = sum(len(stats(m)[1]) for fams in exp.values() for m in fams.values())
    assert checked == want and want > 0


@pytest.mark.parametrize("name", NEW)
def test_each_stack_is_labelled_with_its_own_table(name):
    layout = open_layout(HF / name)
    for stack, (_, arch) in STACKS[name].items():
        assert layout.stacks[stack].arch == arch, (stack, layout.stacks[stack].arch)
    assert layout.arch == STACKS[name][MAIN.get(name, next(iter(STACKS[name])))][1]


def test_fused_splits_are_described():
    for name, raws in (("modernbert", ("attn.Wqkv.weight", "attn.Wqkv.bias", "mlp.Wi.weight", "mlp.Wi.bias")),
                       ("granitemoe", ("block_sparse_moe.input_linear.weight", "block_sparse_moe.output_linear.weight"))):
        stack = open_layout(HF / name).stacks["model.layers"]
        for raw in raws:
            assert raw in stack.splits, (name, raw, sorted(stack.splits))
    result = scan_folder(HF / "granitemoe")
    fams = result["stacks"]["model.layers"]["families"]
    assert fams["experts.gate_proj"]["experts"] == 4
    assert fams["router"]["raw"] == "block_sparse_moe.router.layer.weight"
    assert fams["q_proj"]["raw"] == "self_attn.q_proj.weight"


def test_granitemoe_in_transformers_fused_layout(tmp_path):
    """save_pretrained(save_original_format=False) writes GraniteMoE's in-memory names
    (conversion_mapping: input_linear -> experts.gate_up_proj, output_linear -> experts.down_proj,
    router.layer -> router): same values, so the same families."""
    tensors = load_all(HF / "granitemoe")
    renamed = {n.replace("block_sparse_moe.input_linear.weight", "block_sparse_moe.experts.gate_up_proj")
               .replace("block_sparse_moe.output_linear.weight", "block_sparse_moe.experts.down_proj")
               .replace("block_sparse_moe.router.layer.weight", "block_sparse_moe.router.weight"): t
               for n, t in tensors.items()}
    assert len(renamed) == len(tensors) and renamed != tensors
    write_checkpoint(tmp_path, renamed, config=cfg("granitemoe"))
    st = scan_folder(tmp_path)["stacks"]["model.layers"]
    assert st["unmapped"] == []
    assert compare(st, expected("granitemoe")["model.layers"]) == 2 * len(FAMILIES["granitemoe"]["model.layers"])


def test_clip_text_model_alone_as_transformers_5_writes_it(tmp_path):
    """CLIPTextModel.save_pretrained (transformers 5) drops the `text_model.` prefix: stack
    `encoder.layers`, config model_type clip_text_model with the sizes at the top level."""
    tensors = load_all(HF / "clip")
    text = {n[len("text_model."):]: t for n, t in tensors.items() if n.startswith("text_model.")}
    write_checkpoint(tmp_path, text, config={**cfg("clip")["text_config"], "model_type": "clip_text_model"})
    result = scan_folder(tmp_path)
    assert set(result["stacks"]) == {"encoder.layers"}
    st = result["stacks"]["encoder.layers"]
    assert st["unmapped"] == []
    exp = expected("clip", tensors)["text_model.encoder.layers"]
    assert compare(st, exp) == 2 * len(exp)


def test_granitemoeshared_shared_mlp_is_split_into_gate_and_up(tmp_path):
    """GraniteMoeSharedMLP.forward: input_linear(x).chunk(2): act(first) * second -> output_linear;
    input_linear [2S, H] rows [gate; up] with S = shared_intermediate_size. Names as
    GraniteMoeSharedModel's state_dict (layers.N.shared_mlp.input_linear/output_linear)."""
    rng = np.random.default_rng(9)
    tensors = dict(load_all(HF / "granitemoe"))
    c = {**cfg("granitemoe"), "model_type": "granitemoeshared", "shared_intermediate_size": 8}
    H, S = c["hidden_size"], 8
    for L in range(3):
        tensors[f"model.layers.{L}.shared_mlp.input_linear.weight"] = rng.standard_normal((2 * S, H)).astype(np.float32)
        tensors[f"model.layers.{L}.shared_mlp.output_linear.weight"] = rng.standard_normal((H, S)).astype(np.float32)
    write_checkpoint(tmp_path, tensors, config=c)
    st = scan_folder(tmp_path)["stacks"]["model.layers"]
    exp = expected("granitemoe", tensors)["model.layers"]
    layers = layer_tensors(tensors, "model.layers")
    exp["shared_expert.gate_proj"] = {L: ts["shared_mlp.input_linear.weight"][:S] for L, ts in layers.items()}
    exp["shared_expert.up_proj"] = {L: ts["shared_mlp.input_linear.weight"][S:] for L, ts in layers.items()}
    exp["shared_expert.down_proj"] = {L: ts["shared_mlp.output_linear.weight"] for L, ts in layers.items()}
    assert st["unmapped"] == []
    assert compare(st, exp) == 2 * len(exp)
