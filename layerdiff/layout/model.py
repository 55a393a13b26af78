"""What a checkpoint's tensors are: stacks of layers, families, and how each was named.

A stack is the name prefix before the first layer number (`model.layers`,
`transformer.h`, `visual.blocks`...); the family is the rest of the name, or the
canonical name a table (layerdiff/archs/data) maps it to. Anything no table
knows keeps its raw name and is listed as unmapped, never dropped. Every stack
says which table named it and why (`match`), and the layout which stack the
seed's JSON keys describe and by which rule (`main`, `main_rule`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..archs.registry import is_bias
from ..checkpoint.index import TensorInfo

# The seed script's families, in its order: its JSON keys and tables use these.
SEED_FAMILIES = (
    "q_proj", "k_proj", "v_proj", "o_proj",
    "gate_proj", "up_proj", "down_proj",
    "input_ln", "post_attn_ln", "q_norm", "k_norm",
)

# Formats read (the values analysed are these, times any scale that comes with them).
READ_DTYPES = ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2")
SUPPORTED = (
    "layerdiff reads F16, BF16, F32 and F64 weights, and F8_E4M3/F8_E5M2 weights either raw "
    "or with a weight_scale_inv (block) or weight_scale (per-tensor/per-channel/block) scale"
)


def family_order(families: list[str]) -> list[str]:
    """Reports list the seed's families first, in its order, then the rest by name."""
    seed = [f for f in SEED_FAMILIES if f in families]
    return seed + sorted(set(families) - set(seed))


# How reports group families: tables, inspect and plots list matrices, then norms, then biases.
FAMILY_KINDS = ("matrices", "norms", "biases")


def family_kind(name: str, ndim: int) -> int:
    """The family's group, an index into FAMILY_KINDS: biases (`*.bias`), matrices (2-D and
    up), norms (the other 1-D weights)."""
    return 2 if is_bias(name) else 0 if ndim >= 2 else 1


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


@dataclass(frozen=True)
class TableMatch:
    """Which table named a stack's families, and why that one.

    `how` is "model_type" (a table lists the config's model_type and knows
    some of the stack's names), "names" (guessed: the table knowing most of
    its names; `names` lists the raw names its rules mapped) or "none" (raw
    names). `reason` says why no table was matched by model_type.
    """

    table: str | None
    how: str
    model_type: str | None = None  # the model_type that matched, or that no table took
    reason: str = ""
    names: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.how == "model_type":
            return f"table {self.table} (matched by model_type {self.model_type})"
        if self.how == "names":
            return f"table {self.table}, guessed from tensor names ({self.reason})"
        return f"no table: raw family names ({self.reason})"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"table": self.table, "matched_by": self.how if self.table else None,
                             "model_type": self.model_type, "label": self.describe()}
        if self.reason:
            d["reason"] = self.reason
        if self.how == "names":
            d["mapped_by_suffix"] = list(self.names)
        return d


NO_MATCH = TableMatch(None, "none", reason="no table")


@dataclass
class Stack:
    """A stack of numbered layers (model.layers, encoder.layer, ...) and its families, by layer."""

    name: str
    families: dict[str, list[Member]] = field(default_factory=dict)  # family -> members by layer
    raw: dict[str, str] = field(default_factory=dict)  # family -> raw family name
    unmapped: dict[str, None] = field(default_factory=dict)  # raw names no table knows (an ordered set)
    arch: str | None = None  # the table's name (match.table)
    aggregates: dict[str, list[str]] = field(default_factory=dict)  # all-experts family -> per-expert families
    splits: dict[str, str] = field(default_factory=dict)  # fused raw family -> how it is split
    dequant: dict[str, str] = field(default_factory=dict)  # raw family -> how it is dequantised
    consumed: dict[str, str] = field(default_factory=dict)  # raw names that are no family -> why
    refused: dict[str, Refused] = field(default_factory=dict)  # raw family -> unreadable format
    transposed: list[str] = field(default_factory=list)  # raw families stored [in, out]
    notes: list[str] = field(default_factory=list)
    match: TableMatch = NO_MATCH
    roles: dict[str, str | None] = field(default_factory=dict)  # family (and all-experts family) -> role
    kinds: dict[str, str | None] = field(default_factory=dict)  # family -> kind (matrix, norm, ...), None: unknown

    @property
    def layers(self) -> list[int]:
        return sorted({m.layer for ms in self.families.values() for m in ms})

    def role(self, family: str) -> str | None:
        """"reads" or "writes" the residual stream, from the tables (never from shapes); None for
        norms, biases and raw names no table knows."""
        return self.roles.get(family)


@dataclass
class Layout:
    """A checkpoint's tensors arranged for analysis: its stacks, the non-layer tensors, what was tied."""

    arch: str | None  # the main stack's table
    stacks: dict[str, Stack]
    nonlayer: list[TensorInfo]
    num_hidden_layers: int | None
    tied: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    model_type: str | None = None  # config.json's (or its text_config's)
    main: str | None = None  # the stack the seed's JSON keys describe
    main_rule: str = ""  # why that one, in words

    def main_stack(self) -> Stack | None:
        """The stack the seed would analyse: the language model's (or decoder's) layers."""
        if self.main is None:
            return None
        return self.stacks[self.main]

    def labels(self, stacks: list[str] | None = None, main: str | None = None) -> dict[str, Any]:
        """What named what: model_type, each stack's table and how it was chosen, the main stack's rule.

        `stacks`: only these (a scan's); `main`: the main stack a scan reports, if not the layout's."""
        names = [s for s in self.stacks if stacks is None or s in stacks]
        rule = self.main_rule
        if main is not None and main != self.main:
            rule = f"{main}, the first stack scanned ({self.main} was not selected)"
        return {
            "model_type": self.model_type,
            "main_stack": {"name": main or self.main, "rule": rule},
            "stacks": {s: self.stacks[s].match.to_dict() for s in names},
        }


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
