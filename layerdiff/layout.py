"""Tensor names -> (stack, layer, family), with architecture tables as data.

A stack is the name prefix before the first layer number (`model.layers`,
`transformer.h`, `visual.blocks`...); the family is the rest of the name. Known
architectures map raw families to canonical short names (the seed's `q_proj`,
`input_ln`, ...) so that reports of different models line up; anything a table
does not know keeps its raw name and is listed as unmapped, never dropped.

Everything architecture-specific is in the tables below (`ARCHS`): per
architecture family, the config `model_type`s it covers and a map from the name
after `<stack>.<layer>.` to a canonical family, or to a `Fused` split of one raw
tensor into several families (sized from config.json). The code that follows
the tables only interprets them. docs/ARCHITECTURES.md renders them for people.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Union

from .checkpoint.index import TensorIndex, TensorInfo, grid

# The seed script's families, in its order: its JSON keys and tables use these.
SEED_FAMILIES = (
    "q_proj", "k_proj", "v_proj", "o_proj",
    "gate_proj", "up_proj", "down_proj",
    "input_ln", "post_attn_ln", "q_norm", "k_norm",
)

def _positive(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def family_order(families: list[str]) -> list[str]:
    """Reports list the seed's families first, in its order, then the rest by name."""
    seed = [f for f in SEED_FAMILIES if f in families]
    return seed + sorted(set(families) - set(seed))


# A layer number: no leading zeros (".01." would collide with ".1."), at most 9 digits.
_LAYER_NAME = re.compile(r"^(?P<stack>.+?)\.(?P<layer>0|[1-9]\d{0,8})\.(?P<rest>.+)$")

# Formats read (the values analysed are these, times any scale that comes with them).
READ_DTYPES = ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2")
SUPPORTED = (
    "layerdiff reads F16, BF16, F32 and F64 weights, and F8_E4M3/F8_E5M2 weights either raw "
    "or with a weight_scale_inv (block) or weight_scale (per-tensor/per-channel/block) scale"
)


# --- the tables ---------------------------------------------------------------


@dataclass(frozen=True)
class Fused:
    """How one fused raw tensor splits into families, as views of its matrix `grid`.

    The grid's rows are cut into `groups` equal bands (heads, KV groups,
    experts; "1" = one band). With axis "rows" each band holds `parts` as
    consecutive row ranges, in order (nn.Linear [out, in] stores outputs as
    rows); with axis "cols" each part is a column range of every band (Conv1D
    [in, out] stores outputs as columns; a 1-D bias is a column, so its parts
    are row ranges). Sizes are expressions over config keys (`*`, `/`, `+`,
    integers; aliases in CONFIG_KEYS), `dimN` (the tensor's shape) and `band`
    (rows per band). A canonical name containing `{E}` gives one family per
    band (per expert), numbered from 0; otherwise a family spans all bands.
    `when` holds config conditions: the first variant of an entry that
    matches the config (or the architecture's defaults) is used.
    """

    parts: tuple[tuple[str, str], ...]
    axis: str = "rows"
    groups: str = "1"
    when: tuple[tuple[str, Any], ...] = ()
    kind: str = ""

    def describe(self) -> str:
        if self.kind:
            return self.kind
        if self.groups == "1":
            return "concat rows" if self.axis == "rows" else "concat cols"
        return f"{self.groups} bands of {'rows' if self.axis == 'rows' else 'cols'}"


Entry = Union[str, Fused, tuple[Fused, ...]]


@dataclass(frozen=True)
class Arch:
    """One architecture family's naming: name suffix after the layer number -> canonical.

    `names` keys may hold `{E}` (an expert number). `stack`, if set, is a regex
    the stack name must match (vision towers); `config` names the sub-config
    holding that stack's sizes ("vision_config"). `defaults` are config values
    the model's code assumes when config.json omits them. `ignore` lists
    per-layer buffers that are not weights (causal masks...), with the reason.
    `transposed` lists 2-D weights stored [in, out] (cosines and norms do not
    depend on it; said in inspect).
    """

    name: str
    model_types: tuple[str, ...]
    names: dict[str, Entry]
    stack: str | None = None
    config: str | None = None
    defaults: tuple[tuple[str, Any], ...] = ()
    ignore: tuple[tuple[str, str], ...] = ()
    transposed: tuple[str, ...] = ()


def _with_biases(names: dict[str, Entry]) -> dict[str, Entry]:
    """Add `X.bias` -> `<canonical>.bias` (a family of its own) for every `X.weight`."""
    out = dict(names)
    for key, entry in names.items():
        if not key.endswith(".weight"):
            continue
        bias = key[: -len("weight")] + "bias"
        if bias in out:
            continue
        if isinstance(entry, str):
            out[bias] = entry + ".bias"
        else:
            variants = entry if isinstance(entry, tuple) else (entry,)
            biased = tuple(
                Fused(tuple((f"{c}.bias", s) for c, s in v.parts), v.axis, v.groups, v.when, v.kind) for v in variants
            )
            out[bias] = biased if isinstance(entry, tuple) else biased[0]
    return out


_ATTN = {
    "self_attn.q_proj.weight": "q_proj",
    "self_attn.k_proj.weight": "k_proj",
    "self_attn.v_proj.weight": "v_proj",
    "self_attn.o_proj.weight": "o_proj",
    "self_attn.q_norm.weight": "q_norm",
    "self_attn.k_norm.weight": "k_norm",
}
_NORMS = {
    "input_layernorm.weight": "input_ln",
    "post_attention_layernorm.weight": "post_attn_ln",
    "pre_feedforward_layernorm.weight": "pre_ffn_ln",
    "post_feedforward_layernorm.weight": "post_ffn_ln",
}
_MLP = {
    "mlp.gate_proj.weight": "gate_proj",
    "mlp.up_proj.weight": "up_proj",
    "mlp.down_proj.weight": "down_proj",
}
_LLAMA_NAMES = _with_biases({**_ATTN, **_MLP, **_NORMS})

# Fused 3-D experts as transformers >= 5 holds them ([E, 2I, H] gate;up and
# [E, H, I]; written this way with save_original_format=False): one band per expert.
_FUSED_EXPERTS = {
    "mlp.experts.gate_up_proj": Fused(
        (("experts.{E}.gate_proj", "moe_intermediate_size"), ("experts.{E}.up_proj", "moe_intermediate_size")),
        groups="dim0", kind="per expert (dim0 bands), rows [gate; up]",
    ),
    "mlp.experts.down_proj": Fused((("experts.{E}.down_proj", "band"),), groups="dim0", kind="per expert (dim0 bands)"),
}
_EXPERTS = {
    "mlp.experts.{E}.gate_proj.weight": "experts.{E}.gate_proj",
    "mlp.experts.{E}.up_proj.weight": "experts.{E}.up_proj",
    "mlp.experts.{E}.down_proj.weight": "experts.{E}.down_proj",
    "mlp.gate.weight": "router",
    **_FUSED_EXPERTS,
}

_QKV_ROWS = Fused((
    ("q_proj", "num_attention_heads*head_dim"),
    ("k_proj", "num_key_value_heads*head_dim"),
    ("v_proj", "num_key_value_heads*head_dim"),
))

ARCHS: tuple[Arch, ...] = (
    # Vision towers first: they are chosen by stack name before the model's own table.
    Arch(
        "qwen2_vl_vision", ("qwen2_vl", "qwen2_5_vl"),
        _with_biases({
            # Qwen2VisionAttention: qkv(x).reshape(seq, 3, heads, -1): rows [q; k; v], equal thirds.
            "attn.qkv.weight": Fused((("q_proj", "dim0/3"), ("k_proj", "dim0/3"), ("v_proj", "dim0/3"))),
            "attn.proj.weight": "o_proj",
            "mlp.fc1.weight": "up_proj",
            "mlp.fc2.weight": "down_proj",
            **_MLP,
            "norm1.weight": "input_ln",
            "norm2.weight": "post_attn_ln",
        }),
        stack=r"(^|\.)visual\.blocks$", config="vision_config",
    ),
    Arch(
        "clip_vision", ("clip_vision_model", "siglip_vision_model"),
        _with_biases({
            "self_attn.q_proj.weight": "q_proj",
            "self_attn.k_proj.weight": "k_proj",
            "self_attn.v_proj.weight": "v_proj",
            "self_attn.out_proj.weight": "o_proj",
            "mlp.fc1.weight": "up_proj",
            "mlp.fc2.weight": "down_proj",
            "layer_norm1.weight": "input_ln",
            "layer_norm2.weight": "post_attn_ln",
        }),
        stack=r"vision", config="vision_config",
    ),
    Arch(
        "llama",
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "olmo", "olmo2",
         "granite", "smollm3", "helium", "glm", "qwen2_vl", "qwen2_5_vl", "mistral3", "llava"),
        _LLAMA_NAMES,
    ),
    Arch(
        "mixtral", ("mixtral",),
        {
            **_LLAMA_NAMES,
            "block_sparse_moe.experts.{E}.w1.weight": "experts.{E}.gate_proj",
            "block_sparse_moe.experts.{E}.w3.weight": "experts.{E}.up_proj",
            "block_sparse_moe.experts.{E}.w2.weight": "experts.{E}.down_proj",
            "block_sparse_moe.gate.weight": "router",
            **_EXPERTS,
        },
    ),
    Arch(
        "qwen_moe", ("qwen2_moe", "qwen3_moe", "olmoe"),
        {
            **_LLAMA_NAMES,
            **_EXPERTS,
            "mlp.shared_expert.gate_proj.weight": "shared_expert.gate_proj",
            "mlp.shared_expert.up_proj.weight": "shared_expert.up_proj",
            "mlp.shared_expert.down_proj.weight": "shared_expert.down_proj",
            "mlp.shared_expert_gate.weight": "shared_expert_gate",
        },
    ),
    Arch(
        "deepseek", ("deepseek_v2", "deepseek_v3", "kimi_k2"),
        {
            **_LLAMA_NAMES,
            # Multi-head latent attention: no separate k/v projections exist.
            "self_attn.q_a_proj.weight": "q_a_proj",
            "self_attn.q_a_layernorm.weight": "q_a_ln",
            "self_attn.q_b_proj.weight": "q_b_proj",
            "self_attn.kv_a_proj_with_mqa.weight": "kv_a_proj",
            "self_attn.kv_a_layernorm.weight": "kv_a_ln",
            "self_attn.kv_b_proj.weight": "kv_b_proj",
            **_EXPERTS,
            "mlp.shared_experts.gate_proj.weight": "shared_expert.gate_proj",
            "mlp.shared_experts.up_proj.weight": "shared_expert.up_proj",
            "mlp.shared_experts.down_proj.weight": "shared_expert.down_proj",
            "mlp.gate.e_score_correction_bias": "router.score_bias",
        },
    ),
    Arch(
        "gpt_oss", ("gpt_oss",),
        {
            **_LLAMA_NAMES,
            "self_attn.sinks": "attn_sinks",
            "mlp.router.weight": "router",
            "mlp.router.bias": "router.bias",
            # [E, H, 2I] with gate/up interleaved in columns (gate_up[..., ::2]): per expert only.
            "mlp.experts.gate_up_proj": Fused((("experts.{E}.gate_up_proj", "band"),), groups="dim0",
                                              kind="per expert (dim0 bands); gate/up interleaved, not split"),
            "mlp.experts.gate_up_proj_bias": Fused((("experts.{E}.gate_up_proj.bias", "band"),), groups="dim0",
                                                   kind="per expert (dim0 bands)"),
            "mlp.experts.down_proj": Fused((("experts.{E}.down_proj", "band"),), groups="dim0",
                                           kind="per expert (dim0 bands)"),
            "mlp.experts.down_proj_bias": Fused((("experts.{E}.down_proj.bias", "band"),), groups="dim0",
                                                kind="per expert (dim0 bands)"),
        },
        transposed=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    ),
    Arch(
        "phi3", ("phi3",),
        _with_biases({
            # Phi3Attention: query_pos = heads*head_dim; rows [q; k; v].
            "self_attn.qkv_proj.weight": _QKV_ROWS,
            "self_attn.o_proj.weight": "o_proj",
            # Phi3MLP: gate, up = gate_up_proj(x).chunk(2): rows [gate; up].
            "mlp.gate_up_proj.weight": Fused((("gate_proj", "intermediate_size"), ("up_proj", "intermediate_size"))),
            "mlp.down_proj.weight": "down_proj",
            **_NORMS,
        }),
    ),
    Arch(
        "gpt2", ("gpt2",),
        _with_biases({
            # Conv1D weights are [in, out]; c_attn(x).split(n_embd, dim=2): columns [q | k | v].
            "attn.c_attn.weight": Fused(
                (("q_proj", "hidden_size"), ("k_proj", "hidden_size"), ("v_proj", "hidden_size")), axis="cols",
                kind="concat cols (Conv1D [in, out])",
            ),
            "attn.c_proj.weight": "o_proj",
            "mlp.c_fc.weight": "up_proj",
            "mlp.c_proj.weight": "down_proj",
            "ln_1.weight": "input_ln",
            "ln_2.weight": "post_attn_ln",
        }),
        ignore=(("attn.bias", "causal-mask buffer, not a weight"), ("attn.masked_bias", "mask constant, not a weight")),
        transposed=("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"),
    ),
    Arch(
        "gpt_bigcode", ("gpt_bigcode",),
        _with_biases({
            # GPTBigCodeAttention.forward: nn.Linear (not Conv1D); multi-query:
            # c_attn(x).split((embed_dim, kv_dim, kv_dim)); else view(heads, 3*head_dim).split(3*[head_dim]).
            "attn.c_attn.weight": (
                Fused((("q_proj", "hidden_size"), ("k_proj", "head_dim"), ("v_proj", "head_dim")),
                      when=(("multi_query", True),), kind="concat rows (multi-query)"),
                Fused((("q_proj", "head_dim"), ("k_proj", "head_dim"), ("v_proj", "head_dim")),
                      groups="num_attention_heads", kind="interleaved per head"),
            ),
            "attn.c_proj.weight": "o_proj",
            "mlp.c_fc.weight": "up_proj",
            "mlp.c_proj.weight": "down_proj",
            "ln_1.weight": "input_ln",
            "ln_2.weight": "post_attn_ln",
        }),
        defaults=(("multi_query", True),),
    ),
    Arch(
        "gpt_neox", ("gpt_neox",),
        _with_biases({
            # GPTNeoXAttention: qkv.view(..., heads, 3*head_size).chunk(3): per head [q; k; v].
            "attention.query_key_value.weight": Fused(
                (("q_proj", "head_dim"), ("k_proj", "head_dim"), ("v_proj", "head_dim")),
                groups="num_attention_heads", kind="interleaved per head",
            ),
            "attention.dense.weight": "o_proj",
            "mlp.dense_h_to_4h.weight": "up_proj",
            "mlp.dense_4h_to_h.weight": "down_proj",
            "input_layernorm.weight": "input_ln",
            "post_attention_layernorm.weight": "post_attn_ln",
        }),
        ignore=(("attention.bias", "causal-mask buffer, not a weight"),
                ("attention.masked_bias", "mask constant, not a weight")),
    ),
    *(
        Arch(
            name, model_types,
            _with_biases({
                # FalconAttention._split_heads, by config: grouped per KV head
                # (new_decoder_architecture: view(-1, heads/kv + 2, head_dim)), multi-query
                # (view(heads + 2, head_dim): [q; k; v]), else per head (view(heads, 3, head_dim)).
                "self_attention.query_key_value.weight": (
                    Fused((("q_proj", "num_attention_heads/num_key_value_heads*head_dim"), ("k_proj", "head_dim"),
                           ("v_proj", "head_dim")),
                          groups="num_key_value_heads", when=(("new_decoder_architecture", True),),
                          kind="grouped per KV head"),
                    Fused((("q_proj", "num_attention_heads*head_dim"), ("k_proj", "head_dim"), ("v_proj", "head_dim")),
                          when=(("multi_query", True),), kind="concat rows (multi-query)"),
                    Fused((("q_proj", "head_dim"), ("k_proj", "head_dim"), ("v_proj", "head_dim")),
                          groups="num_attention_heads", kind="interleaved per head"),
                ),
                "self_attention.dense.weight": "o_proj",
                "mlp.dense_h_to_4h.weight": "up_proj",
                "mlp.dense_4h_to_h.weight": "down_proj",
                "input_layernorm.weight": "input_ln",
                "post_attention_layernorm.weight": "post_attn_ln",
                "ln_attn.weight": "input_ln",
                "ln_mlp.weight": "post_attn_ln",
            }),
            defaults=defaults,
        )
        for name, model_types, defaults in (
            ("falcon", ("falcon", "RefinedWebModel"), (("multi_query", True), ("new_decoder_architecture", False))),
            ("falcon_rw40b", ("RefinedWeb",), (("new_decoder_architecture", True),)),
        )
    ),
    Arch(
        "bert", ("bert", "roberta", "xlm-roberta", "camembert", "electra"),
        _with_biases({
            "attention.self.query.weight": "q_proj",
            "attention.self.key.weight": "k_proj",
            "attention.self.value.weight": "v_proj",
            "attention.output.dense.weight": "o_proj",
            "intermediate.dense.weight": "up_proj",
            "output.dense.weight": "down_proj",
            # Post-LN: the norm after attention feeds the FFN, the one after the FFN ends the layer.
            "attention.output.LayerNorm.weight": "post_attn_ln",
            "output.LayerNorm.weight": "post_ffn_ln",
        }),
    ),
    Arch(
        "distilbert", ("distilbert",),
        _with_biases({
            "attention.q_lin.weight": "q_proj",
            "attention.k_lin.weight": "k_proj",
            "attention.v_lin.weight": "v_proj",
            "attention.out_lin.weight": "o_proj",
            "ffn.lin1.weight": "up_proj",
            "ffn.lin2.weight": "down_proj",
            "sa_layer_norm.weight": "post_attn_ln",
            "output_layer_norm.weight": "post_ffn_ln",
        }),
    ),
)

# Buffers and quantisation metadata that are not weights, in any architecture.
IGNORED_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("rotary_emb.inv_freq", "rotary-embedding buffer, not a weight"),
    (".input_scale", "activation quantisation scale, not a weight"),
    (".k_scale", "KV-cache quantisation scale, not a weight"),
    (".v_scale", "KV-cache quantisation scale, not a weight"),
    (".q_scale", "attention quantisation scale, not a weight"),
    (".prob_scale", "attention quantisation scale, not a weight"),
)

# Scales that dequantise the `.weight` beside them: value = stored value * scale of its block.
SCALE_SUFFIXES = (".weight_scale_inv", ".weight_scale")


@dataclass(frozen=True)
class QuantFormat:
    """A storage format that cannot be read: recognised by `marker`, refused with its companions."""

    marker: str  # suffix of one tensor that identifies the format
    companions: tuple[str, ...]  # suffixes (after the base name) of every tensor it owns; "*" = prefix
    name: str
    dtypes: tuple[str, ...] = ()  # the marker's dtype must be one of these (empty: any)


QUANT_FORMATS: tuple[QuantFormat, ...] = (
    QuantFormat(".qweight", (".qweight", ".qzeros", ".scales", ".g_idx"),
                "packed int4/int8 (GPTQ/AWQ qweight/qzeros/scales)"),
    QuantFormat("_blocks", ("_blocks", "_scales"), "MXFP4 blocks (gpt-oss style _blocks/_scales)", ("U8",)),
    QuantFormat(".weight_packed", (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape",
                                   ".weight_g_idx"), "packed int4/int8 (compressed-tensors weight_packed)"),
    QuantFormat(".weight.quant_map", (".weight*",), "bitsandbytes 4-bit (NF4/FP4)"),
    QuantFormat(".weight.absmax", (".weight*",), "bitsandbytes 4-bit (NF4/FP4)"),
    QuantFormat(".SCB", (".weight", ".SCB", ".weight_format"), "bitsandbytes int8 (LLM.int8 SCB)"),
    QuantFormat(".weight_scale_2", (".weight", ".weight_scale", ".weight_scale_2", ".input_scale"),
                "NVFP4 (packed 4-bit with weight_scale/weight_scale_2)"),
)

_MARKERS = tuple(f.marker for f in QUANT_FORMATS)

# Config keys by meaning, first found wins; then DERIVED, as the models' code derives them.
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_size", "n_embd", "d_model", "embed_dim", "dim"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "num_key_value_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv", "n_kv_heads", "multi_query_group_num"),
    "head_dim": ("head_dim",),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_hidden_size", "ffn_dim"),
    "moe_intermediate_size": ("moe_intermediate_size",),
    "num_experts": ("num_local_experts", "num_experts", "n_routed_experts"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
}
DERIVED: dict[str, str] = {
    "num_key_value_heads": "num_attention_heads",
    "head_dim": "hidden_size/num_attention_heads",
    "intermediate_size": "4*hidden_size",
    "moe_intermediate_size": "intermediate_size",
}

_ROLES = {f: "reads" for f in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "router", "cross_q_proj",
                                "cross_k_proj", "cross_v_proj", "shared_expert.gate_proj", "shared_expert.up_proj")}
_ROLES |= {f: "writes" for f in ("o_proj", "down_proj", "cross_o_proj", "shared_expert.down_proj")}

_OUTPUT_HEADS = ("lm_head.weight", "embed_out.weight")
_INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight",
                     "tok_embeddings.weight")


# --- the data model -----------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One layer's tensor for a family, or the part of a fused tensor it owns.

    `rows` and `cols` select from the tensor seen as a matrix (see `grid`);
    None means all of it. `scale`, if set, dequantises the values: each is
    multiplied by the scale of its (`scale_block` rows x cols) block, the
    scale tensor being a grid of such blocks.
    """

    layer: int
    tensor: TensorInfo
    rows: tuple[tuple[int, int], ...] | None = None
    cols: tuple[int, int] | None = None
    scale: TensorInfo | None = None
    scale_block: tuple[int, int] | None = None


@dataclass(frozen=True)
class Refused:
    """A raw family stored in a format layerdiff cannot read: scanning it is an error."""

    format: str
    families: tuple[str, ...]  # the family names a --family selection would use for it
    example: str  # one full tensor name, for the message
    layers: tuple[int, ...]

    @property
    def message(self) -> str:
        return f"{self.format} is not supported: {SUPPORTED}; use --family to analyse the other families"


@dataclass
class Stack:
    name: str
    families: dict[str, list[Member]] = field(default_factory=dict)  # family -> members by layer
    raw: dict[str, str] = field(default_factory=dict)  # family -> raw family name
    unmapped: dict[str, None] = field(default_factory=dict)  # raw names no table knows (an ordered set)
    arch: str | None = None
    aggregates: dict[str, list[str]] = field(default_factory=dict)  # all-experts family -> per-expert families
    splits: dict[str, str] = field(default_factory=dict)  # fused raw family -> how it is split
    dequant: dict[str, str] = field(default_factory=dict)  # raw family -> how it is dequantised
    consumed: dict[str, str] = field(default_factory=dict)  # raw names that are no family -> why
    refused: dict[str, Refused] = field(default_factory=dict)  # raw family -> unreadable format
    transposed: list[str] = field(default_factory=list)  # raw families stored [in, out]
    notes: list[str] = field(default_factory=list)

    @property
    def layers(self) -> list[int]:
        return sorted({m.layer for ms in self.families.values() for m in ms})

    def role(self, family: str) -> str | None:
        """'reads' or 'writes' the residual stream (None: neither, or not known)."""
        base = re.sub(r"^(.*\.)?experts\.(\d+\.)?", "", family)
        if family in self.unmapped or family not in self.families and family not in self.aggregates:
            return None
        return _ROLES.get(base)


@dataclass
class Layout:
    arch: str | None
    stacks: dict[str, Stack]
    nonlayer: list[TensorInfo]
    num_hidden_layers: int | None
    tied: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def main_stack(self) -> Stack | None:
        """The stack the seed would analyse: the language model's decoder layers."""
        if not self.stacks:
            return None
        name = _main_name({n: len(s.layers) for n, s in self.stacks.items()})
        return self.stacks[name]


_PREFERRED_MAIN = ("model.layers", "model.language_model.layers", "language_model.model.layers")


def _main_name(layer_counts: dict[str, int]) -> str:
    for preferred in _PREFERRED_MAIN:
        if preferred in layer_counts:
            return preferred
    return max(layer_counts, key=lambda s: (layer_counts[s], not s.endswith("]"), -len(s)))


# --- config sizes ---------------------------------------------------------------


class _Missing(Exception):
    """A size expression needs a config key that is not there."""


_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_]\w*)|([*/+]))")


def evaluate(expr: str, get: Any) -> int:
    """A size expression (sum of products of integers and names) -> int; '/' must divide."""
    total, term, op, pos = 0, None, "*", 0
    while pos < len(expr.rstrip()):
        m = _TOKEN.match(expr, pos)
        if not m:
            raise ValueError(f"bad size expression {expr!r}")
        pos = m.end()
        if m.group(3):
            if m.group(3) == "+":
                total, term = total + (term or 0), None
                op = "*"
            else:
                op = m.group(3)
            continue
        value = int(m.group(1)) if m.group(1) else get(m.group(2))
        if term is None:
            term = value
        elif op == "*":
            term *= value
        else:
            if value == 0 or term % value:
                raise ValueError(f"{expr}: {term} is not divisible by {value}")
            term //= value
    return total + (term or 0)


def _config_get(cfg: dict[str, Any], shape: tuple[int, ...], band: int | None = None) -> Any:
    def get(name: str) -> int:
        if name == "band" and band is not None:
            return band
        m = re.fullmatch(r"dim(\d+)", name)
        if m and int(m.group(1)) < len(shape):
            return shape[int(m.group(1))]
        for key in CONFIG_KEYS.get(name, (name,)):
            v = cfg.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        if name in DERIVED:
            return evaluate(DERIVED[name], get)
        raise _Missing(name)

    return get


def config_int(cfg: dict[str, Any] | None, name: str) -> int | None:
    try:
        return _config_get(cfg or {}, ())(name)
    except (_Missing, ValueError):
        return None


def _text_config(config: dict[str, Any] | None) -> dict[str, Any]:
    cfg = dict(config or {})
    text = cfg.get("text_config")
    if isinstance(text, dict):
        cfg.update(text)
    return cfg


# --- resolving a split ------------------------------------------------------------


class _NoSplit(Exception):
    pass


def _choose(entry: Entry, cfg: dict[str, Any], defaults: dict[str, Any]) -> Fused:
    variants = entry if isinstance(entry, tuple) else (entry,)
    for v in variants:
        if all(cfg.get(k, defaults.get(k)) == want for k, want in v.when):
            return v
    raise _NoSplit("no variant of the split matches the config")


def split(fused: Fused, shape: tuple[int, ...], cfg: dict[str, Any]) -> tuple[list[tuple[str, tuple[tuple[int, int], ...] | None, tuple[int, int] | None]], str]:
    """Resolve a split for a tensor shape: [(family, rows, cols)], and how it was sized."""
    rows, cols = grid(shape)
    axis = fused.axis if len(shape) >= 2 else "rows"
    try:
        groups = evaluate(fused.groups, _config_get(cfg, shape))
    except _Missing as e:
        raise _NoSplit(f"config.json lacks {e.args[0]} (needed for {fused.groups})") from None
    except ValueError as e:
        raise _NoSplit(str(e)) from None
    if groups <= 0 or rows % groups:
        raise _NoSplit(f"{rows} rows do not divide into {groups} bands ({fused.groups})")
    band = rows // groups
    along = band if axis == "rows" else cols
    how = "config"
    try:
        get = _config_get(cfg, shape, band)
        sizes = [evaluate(s, get) for _, s in fused.parts]
    except _Missing as e:
        exprs = {s for _, s in fused.parts}
        if len(exprs) != 1 or along % len(fused.parts):
            raise _NoSplit(f"config.json lacks {e.args[0]}") from None
        sizes = [along // len(fused.parts)] * len(fused.parts)
        how = f"equal parts (config.json lacks {e.args[0]})"
    except ValueError as e:
        raise _NoSplit(str(e)) from None
    if sum(sizes) != along:
        got = " + ".join(f"{s}" for s in sizes)
        raise _NoSplit(f"parts {got} = {sum(sizes)} from the config, but the tensor has {along} per band")
    out: list[tuple[str, tuple[tuple[int, int], ...] | None, tuple[int, int] | None]] = []
    offset = 0
    for (canon, _), size in zip(fused.parts, sizes):
        if size:
            if axis == "rows":
                ranges = [(g * band + offset, g * band + offset + size) for g in range(groups)]
                col = None
            else:
                ranges = [(g * band, (g + 1) * band) for g in range(groups)]
                col = (offset, offset + size)
            if "{E}" in canon:
                out += [(canon.replace("{E}", str(g)), (r,), col) for g, r in enumerate(ranges)]
            elif axis == "cols" and groups == 1:
                out.append((canon, None, col))
            else:
                out.append((canon, tuple(ranges), col))
        offset += size
    return out, how


def describe_split(fused: Fused, shape: tuple[int, ...], how: str) -> str:
    axis = fused.axis if len(shape) >= 2 else "rows"
    parts = " | ".join(f"{c} {s}" for c, s in fused.parts)
    bands = "" if fused.groups == "1" else f"{fused.groups} bands x "
    kind = fused.describe() if axis == fused.axis else "concat (1-D, as the weight's outputs)"
    text = f"{kind}: {bands}[{parts}] along {axis}"
    return text if how == "config" else f"{text}; sized as {how}"


def aggregate_name(family: str) -> str | None:
    """`experts.7.gate_proj` -> `experts.gate_proj` (the family over all experts of a layer)."""
    m = re.fullmatch(r"(.*\bexperts)\.(?:\d+|\{E\})\.(.+)", family)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def aggregate_raw(stack: Stack, agg: str) -> str:
    """The raw name(s) of an all-experts family, with `{E}` for the expert number."""
    raws = dict.fromkeys(
        re.sub(r"\bexperts\.\d+\.", "experts.{E}.", stack.raw[f]) for f in stack.aggregates[agg] if f in stack.raw
    )
    return ", ".join(raws)


def aggregate_sums(
    members: list[str], norms2: dict[str, dict[int, float]], dots: dict[str, dict[int, float]]
) -> tuple[dict[int, float], dict[int, float]]:
    """|W|^2 and <W_L, W_L+1> of an all-experts family from its per-expert sums.

    The sum over experts of |W_E|^2 is the squared norm of all experts
    together, and the sum of <W_L,E, W_L+1,E> their inner product (expert E
    paired with expert E). A layer (pair) counts only where every expert has it.
    """
    n2: dict[int, float] = {}
    d: dict[int, float] = {}
    if not members:
        return n2, d
    for L in set.intersection(*(set(norms2.get(f, {})) for f in members)):
        n2[L] = sum(norms2[f][L] for f in members)
    for L in set.intersection(*(set(dots.get(f, {})) for f in members)):
        d[L] = sum(dots[f][L] for f in members)
    return n2, d


# --- choosing the table -------------------------------------------------------------


class _Table:
    """An Arch's names compiled for lookup: exact keys, then `{E}` patterns."""

    def __init__(self, arch: Arch) -> None:
        self.arch = arch
        self.exact = {k: v for k, v in arch.names.items() if "{E}" not in k}
        self.patterns = [
            (re.compile("^" + re.escape(k).replace(r"\{E\}", r"(?P<E>\d+)") + "$"), v)
            for k, v in arch.names.items()
            if "{E}" in k
        ]
        self.ignore = dict(arch.ignore)

    def lookup(self, rest: str) -> tuple[Entry, str | None] | None:
        """The entry for a name and the expert number it matched, if any."""
        entry = self.exact.get(rest)
        if entry is not None:
            return entry, None
        for pattern, entry in self.patterns:
            m = pattern.match(rest)
            if m:
                return entry, m.group("E")
        return None


_TABLES = {a.name: _Table(a) for a in ARCHS}


def _model_types(config: dict[str, Any] | None) -> set[str]:
    config = config or {}
    types = {config.get("model_type")}
    for sub in ("text_config", "vision_config"):
        if isinstance(config.get(sub), dict):
            types.add(config[sub].get("model_type"))
    return {t for t in types if isinstance(t, str)}


def _stack_arch(stack: str, rests: set[str], config: dict[str, Any] | None) -> Arch | None:
    """The model_type picks a table that knows at least one name of the stack;
    failing that, the table knowing the most names does."""
    types = _model_types(config)
    usable = [a for a in ARCHS if a.stack is None or re.search(a.stack, stack)]
    hits = {a.name: sum(_TABLES[a.name].lookup(r) is not None for r in rests) for a in usable}
    for arch in usable:
        if types & set(arch.model_types) and hits[arch.name]:
            return arch
    best = max(usable, key=lambda a: hits[a.name], default=None)
    return best if best is not None and hits[best.name] else None


# --- building the layout --------------------------------------------------------------


def _scale_block(wshape: tuple[int, ...], sshape: tuple[int, ...], configured: Any) -> tuple[int, int] | None:
    """Rows x cols of weight covered by one scale value, or None if the grids do not fit."""
    R, C = grid(wshape)
    sr, sc = grid(sshape) if sshape else (1, 1)
    candidates = []
    if isinstance(configured, (list, tuple)) and len(configured) == 2 and all(isinstance(x, int) and x > 0 for x in configured):
        candidates.append((configured[0], configured[1]))
    candidates.append((128, 128))
    if sr and sc:
        candidates.append((-(-R // sr), -(-C // sc)))
    for br, bc in candidates:
        if -(-R // br) == sr and -(-C // bc) == sc:
            return br, bc
    return None


def _quant_block(config: dict[str, Any]) -> Any:
    q = config.get("quantization_config")
    return q.get("weight_block_size") if isinstance(q, dict) else None


def _tied(config: dict[str, Any] | None, nonlayer: list[TensorInfo]) -> dict[str, Any]:
    cfg = _text_config(config)
    flag = cfg.get("tie_word_embeddings") if config is not None else None
    names = [t.name for t in nonlayer]
    head = next((n for n in names if n.endswith(_OUTPUT_HEADS)), None)
    embed = next((n for n in names if n.endswith(_INPUT_EMBEDDINGS)), None)
    tied = bool(flag) if isinstance(flag, bool) else (head is None and embed is not None)
    if tied:
        why = "config tie_word_embeddings=true" if flag is True else "no output head stored"
        note = f"tied: the output head reuses {embed or 'the input embedding'} ({why})"
        if head is not None:
            note += f"; {head} is stored too"
    elif head is not None:
        note = f"untied: output head {head}"
    else:
        note = "no output head stored"
    return {"tied": tied, "config": flag, "output_head": head, "input_embedding": embed, "note": note}


def build_layout(index: TensorIndex, config: dict[str, Any] | None = None) -> Layout:
    text_cfg = _text_config(config)
    n = config_int(text_cfg, "num_hidden_layers")
    # stack -> layer -> rest -> tensor
    grouped: dict[str, dict[int, dict[str, TensorInfo]]] = {}
    nonlayer: list[TensorInfo] = []
    for name, info in index.tensors.items():
        m = _LAYER_NAME.match(name)
        if m is None:
            nonlayer.append(info)
            continue
        grouped.setdefault(m.group("stack"), {}).setdefault(int(m.group("layer")), {})[m.group("rest")] = info
    nonlayer.sort(key=lambda t: t.name)
    notes: list[str] = []
    archs: dict[str, Arch | None] = {}
    if grouped:
        main = _main_name({s: len(ls) for s, ls in grouped.items()})
        beyond = sorted(L for L in grouped[main] if n is not None and L >= n)
        if beyond and len(beyond) < len(grouped[main]):
            extra = f"{main}[{'mtp' if _positive(text_cfg.get('num_nextn_predict_layers')) else 'extra'}]"
            grouped[extra] = {L: grouped[main].pop(L) for L in beyond}
            notes.append(
                f"layers {beyond[0]}..{beyond[-1]} of {main} are beyond num_hidden_layers={n}: "
                f"reported apart as stack {extra}, not paired with layer {n - 1}"
            )
        main_arch = _stack_arch(main, {r for rs in grouped[main].values() for r in rs}, config)
        for s, layers in grouped.items():
            rests = {r for rs in layers.values() for r in rs}
            archs[s] = main_arch if s.startswith(main + "[") else _stack_arch(s, rests, config)
    else:
        main_arch = None
    stacks = {
        s: _build_stack(s, grouped[s], archs[s], config) for s in sorted(grouped)
    }
    return Layout(main_arch.name if main_arch else None, stacks, nonlayer, n, _tied(config, nonlayer), notes)


def _build_stack(name: str, layers: dict[int, dict[str, TensorInfo]], arch: Arch | None,
                 config: dict[str, Any] | None) -> Stack:
    stack = Stack(name, arch=arch.name if arch else None)
    table = _TABLES[arch.name] if arch else None
    if arch and arch.config and isinstance((config or {}).get(arch.config), dict):
        cfg = dict(config[arch.config])
    else:
        cfg = _text_config(config)
    defaults = dict(arch.defaults) if arch else {}
    configured_block = _quant_block(_text_config(config))
    ignore = dict(IGNORED_SUFFIXES) | (table.ignore if table else {})
    resolved: dict[tuple[str, tuple[int, ...]], Any] = {}  # (rest, shape) -> resolution
    owner: dict[str, str] = {}  # family -> the raw family that took the name
    refused_layers: dict[str, list[int]] = {}
    blocks: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[int, int] | None] = {}
    aggregates: dict[str, str | None] = {}  # family -> its all-experts family, if per expert
    ignored: dict[str, str | None] = {}  # rest -> why it is not a weight (None: it is one)
    experts: dict[str, dict[str, None]] = {}  # all-experts family -> per-expert families (ordered set)
    for L in sorted(layers):
        tensors = layers[L]
        skip: set[str] = set()
        # 1. unreadable formats, refused with their companions
        for rest, info in tensors.items():
            if not rest.endswith(_MARKERS):
                continue
            for fmt in QUANT_FORMATS:
                if not rest.endswith(fmt.marker) or (fmt.dtypes and info.dtype not in fmt.dtypes):
                    continue
                base = rest[: -len(fmt.marker)]
                for other in tensors:
                    if any(other == base + c or (c.endswith("*") and other.startswith(base + c[:-1]))
                           for c in fmt.companions):
                        skip.add(other)
                        if other not in stack.refused:
                            stack.refused[other] = Refused(fmt.name, _would_be(table, base, other), info.name, ())
                        refused_layers.setdefault(other, []).append(L)
        # 2. scales that dequantise the weight beside them
        scales: dict[str, tuple[TensorInfo, tuple[int, int]]] = {}
        for rest, info in tensors.items():
            if rest in skip or not rest.endswith(SCALE_SUFFIXES):
                continue
            for suffix in SCALE_SUFFIXES:
                if not rest.endswith(suffix):
                    continue
                base = rest[: -len(suffix)] + ".weight"
                weight = tensors.get(base)
                if weight is None or base in skip:
                    break
                skip.add(rest)
                if not weight.is_float or weight.dtype not in READ_DTYPES or info.dtype not in READ_DTYPES:
                    skip.add(base)
                    fmt = (f"{weight.dtype} weights with a {suffix[1:]} (integer quantisation)" if not weight.is_float
                           else f"{weight.dtype} weights with a {info.dtype} {suffix[1:]}")
                    stack.refused.setdefault(base, Refused(fmt, _would_be(table, base, base), weight.name, ()))
                    refused_layers.setdefault(base, []).append(L)
                    break
                key = (weight.shape, info.shape)
                if key not in blocks:
                    blocks[key] = _scale_block(weight.shape, info.shape, configured_block)
                block = blocks[key]
                if block is None:
                    skip.add(base)
                    fmt = f"a {suffix[1:]} grid {list(info.shape)} that does not tile the weight {list(weight.shape)}"
                    stack.refused.setdefault(base, Refused(fmt, _would_be(table, base, base), weight.name, ()))
                    refused_layers.setdefault(base, []).append(L)
                    break
                scales[base] = (info, block)
                if rest not in stack.consumed:
                    stack.consumed[rest] = f"dequantisation scale of {base}"
                if base not in stack.dequant:
                    R, C = grid(weight.shape)
                    per = ("tensor" if block == (R, C) else "row (output channel)" if block == (1, C)
                           else f"{block[0]}x{block[1]} block")
                    stack.dequant[base] = f"{weight.dtype} x {suffix[1:]} {list(info.shape)} (one scale per {per})"
                break
        # 3. everything else is a family (or part of one)
        for rest in sorted(tensors):
            if rest in skip:
                continue
            info = tensors[rest]
            if rest not in ignored:
                ignored[rest] = next((r for s, r in ignore.items() if _suffix(rest, s)), None)
            why = ignored[rest]
            if why is not None:
                stack.consumed.setdefault(rest, why)
                continue
            scale, block = scales.get(rest, (None, None))
            if scale is None and info.dtype in ("F8_E4M3", "F8_E5M2"):
                stack.dequant.setdefault(rest, f"{info.dtype} without a scale: raw fp8 values analysed")
            if arch and rest in arch.transposed and rest not in stack.transposed:
                stack.transposed.append(rest)
            for family, rows, cols in _families(stack, table, cfg, defaults, rest, info, resolved):
                if owner.setdefault(family, rest) != rest:
                    stack.notes.append(f"{rest} would also be {family} (taken by {owner[family]}): kept as raw")
                    family = rest
                    owner[family] = rest
                    stack.unmapped[rest] = None
                stack.raw[family] = rest
                stack.families.setdefault(family, []).append(Member(L, info, rows, cols, scale, block))
                if family not in aggregates:
                    aggregates[family] = aggregate_name(family)
                if aggregates[family] is not None:
                    experts.setdefault(aggregates[family], {})[family] = None
    for rest, ref in stack.refused.items():
        stack.refused[rest] = Refused(ref.format, ref.families, ref.example, tuple(sorted(set(refused_layers[rest]))))
    for agg, members in experts.items():
        if agg in stack.families:  # a real family already has the name: no aggregate
            stack.notes.append(f"no all-experts family {agg}: the name is taken by {stack.raw[agg]}")
            continue
        stack.aggregates[agg] = sorted(members, key=lambda f: [int(x) if x.isdigit() else x for x in f.split(".")])
    seen: set[str] = set()
    stack.notes = [x for x in stack.notes if not (x in seen or seen.add(x))]
    for members in stack.families.values():
        members.sort(key=lambda mem: mem.layer)
    return stack


def _suffix(rest: str, suffix: str) -> bool:
    """`rest` is `suffix` or ends with it at a dot boundary."""
    suffix = suffix.lstrip(".")
    return rest == suffix or rest.endswith("." + suffix)


def _would_be(table: _Table | None, base: str, rest: str) -> tuple[str, ...]:
    """Family names a refused tensor would have had: its raw name, and the table's for its weight."""
    names = [rest]
    for key in (base + ".weight", base, rest):
        hit = table.lookup(key) if table else None
        if hit is None:
            continue
        entry, expert = hit
        if isinstance(entry, str):
            names.append(entry.replace("{E}", expert or "{E}"))
        else:
            for v in entry if isinstance(entry, tuple) else (entry,):
                names += [c for c, _ in v.parts]
        break
    names += [a for a in (aggregate_name(x) for x in names) if a]
    return tuple(dict.fromkeys(names))


def _families(stack: Stack, table: _Table | None, cfg: dict[str, Any], defaults: dict[str, Any], rest: str,
              info: TensorInfo, resolved: dict) -> list[tuple[str, tuple[tuple[int, int], ...] | None, tuple[int, int] | None]]:
    """The (family, rows, cols) parts of one raw tensor, cached per (name, shape)."""
    key = (rest, info.shape)
    hit = resolved.get(key)
    if hit is not None:
        return hit
    found = table.lookup(rest) if table else None
    if found is None:
        stack.unmapped[rest] = None
        out = [(rest, None, None)]
    elif isinstance(found[0], str):
        entry, expert = found
        out = [(entry.replace("{E}", expert) if expert is not None else entry, None, None)]
    else:
        try:
            fused = _choose(found[0], cfg, defaults)
            out, how = split(fused, info.shape, cfg)
            stack.splits.setdefault(rest, describe_split(fused, info.shape, how))
        except _NoSplit as e:
            stack.notes.append(f"{rest} {list(info.shape)} not split: {e.args[0]}; analysed whole under its raw name")
            stack.unmapped[rest] = None
            out = [(rest, None, None)]
    resolved[key] = out
    return out
