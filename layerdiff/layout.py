"""Tensor names -> (stack, layer, family), with architecture tables as data.

A stack is the name prefix before the first layer number (`model.layers`,
`transformer.h`, `visual.blocks`...); the family is the rest of the name. Known
architectures map raw families to canonical short names (the seed's `q_proj`,
`input_ln`, ...) so that reports of different models line up; anything a table
does not know keeps its raw name and is listed as unmapped, never dropped.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from .index import TensorIndex, TensorInfo

# The seed script's families, in its order: its JSON keys and tables use these.
SEED_FAMILIES = (
    "q_proj", "k_proj", "v_proj", "o_proj",
    "gate_proj", "up_proj", "down_proj",
    "input_ln", "post_attn_ln", "q_norm", "k_norm",
)

_LAYER_NAME = re.compile(r"^(?P<stack>.+?)\.(?P<layer>\d+)\.(?P<rest>.+)$")


@dataclass(frozen=True)
class Arch:
    """One architecture family's naming: raw family suffix -> canonical name."""

    name: str
    model_types: tuple[str, ...]
    names: dict[str, str]


_LLAMA_NAMES = {
    "self_attn.q_proj.weight": "q_proj",
    "self_attn.k_proj.weight": "k_proj",
    "self_attn.v_proj.weight": "v_proj",
    "self_attn.o_proj.weight": "o_proj",
    "mlp.gate_proj.weight": "gate_proj",
    "mlp.up_proj.weight": "up_proj",
    "mlp.down_proj.weight": "down_proj",
    "input_layernorm.weight": "input_ln",
    "post_attention_layernorm.weight": "post_attn_ln",
    "self_attn.q_norm.weight": "q_norm",
    "self_attn.k_norm.weight": "k_norm",
    "pre_feedforward_layernorm.weight": "pre_ffn_ln",
    "post_feedforward_layernorm.weight": "post_ffn_ln",
    "self_attn.q_proj.bias": "q_proj.bias",
    "self_attn.k_proj.bias": "k_proj.bias",
    "self_attn.v_proj.bias": "v_proj.bias",
    "self_attn.o_proj.bias": "o_proj.bias",
}

ARCHS: tuple[Arch, ...] = (
    Arch(
        "llama",
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "olmo2", "granite"),
        _LLAMA_NAMES,
    ),
)


@dataclass(frozen=True)
class Member:
    """One layer's tensor for a family, or the part of a fused tensor it owns.

    `rows` and `cols` select from the tensor seen as a matrix (see `grid`);
    None means all of it.
    """

    layer: int
    tensor: TensorInfo
    rows: tuple[tuple[int, int], ...] | None = None
    cols: tuple[int, int] | None = None


def grid(shape: tuple[int, ...]) -> tuple[int, int]:
    """A tensor as a (rows, cols) matrix: leading axes flattened, 1-D as a column."""
    if len(shape) >= 2:
        cols = shape[-1]
        return (math.prod(shape) // cols if cols else 0, cols)
    return (math.prod(shape), 1)


@dataclass
class Stack:
    name: str
    families: dict[str, list[Member]] = field(default_factory=dict)  # family -> members by layer
    raw: dict[str, str] = field(default_factory=dict)  # family -> raw family name
    unmapped: list[str] = field(default_factory=list)

    @property
    def layers(self) -> list[int]:
        return sorted({m.layer for ms in self.families.values() for m in ms})


@dataclass
class Layout:
    arch: str | None
    stacks: dict[str, Stack]
    nonlayer: list[TensorInfo]
    num_hidden_layers: int | None

    def main_stack(self) -> Stack | None:
        """The stack the seed would analyse: the language model's decoder layers."""
        if not self.stacks:
            return None
        for preferred in ("model.layers", "model.language_model.layers", "language_model.model.layers"):
            if preferred in self.stacks:
                return self.stacks[preferred]
        return max(self.stacks.values(), key=lambda s: (len(s.layers), -len(s.name)))


def detect_arch(config: dict[str, Any] | None, index: TensorIndex) -> Arch | None:
    """The config's model_type decides; without one, the table matching most names."""
    model_type = (config or {}).get("model_type")
    for arch in ARCHS:
        if model_type in arch.model_types:
            return arch
    rests = [m.group("rest") for name in index.tensors if (m := _LAYER_NAME.match(name))]
    best = max(ARCHS, key=lambda a: sum(r in a.names for r in rests))
    return best if any(r in best.names for r in rests) else None


def build_layout(index: TensorIndex, config: dict[str, Any] | None = None) -> Layout:
    arch = detect_arch(config, index)
    names = arch.names if arch else {}
    stacks: dict[str, Stack] = {}
    nonlayer: list[TensorInfo] = []
    for name, info in sorted(index.tensors.items()):
        m = _LAYER_NAME.match(name)
        if m is None:
            nonlayer.append(info)
            continue
        stack = stacks.setdefault(m.group("stack"), Stack(m.group("stack")))
        rest = m.group("rest")
        family = names.get(rest, rest)
        if rest not in names and rest not in stack.unmapped:
            stack.unmapped.append(rest)
        stack.raw[family] = rest
        stack.families.setdefault(family, []).append(Member(int(m.group("layer")), info))
    for stack in stacks.values():
        for members in stack.families.values():
            members.sort(key=lambda mem: mem.layer)
    n = (config or {}).get("num_hidden_layers")
    return Layout(arch.name if arch else None, stacks, nonlayer, n if isinstance(n, int) else None)
