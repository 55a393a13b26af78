"""Which table names a stack, and which stack is the main one: the choices, said in words.

A stack's table: the first table (by priority) that lists one of the config's
model_types and knows at least one of the stack's names; failing that, the
table knowing the most of its names (a guess, reported as one, with the names
it mapped); failing that, none (raw names). Tables for towers also require the
stack name to match their `stack` pattern. The main stack (the one the seed's
JSON keys describe): the first rule of common.json's `main_stack` that a stack
name matches, else the stack with the most layers.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from ..archs.registry import Registry
from ..archs.schema import Arch
from .model import TableMatch


def text_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """The top-level config with its text_config merged in (a multimodal model's language model)."""
    cfg = dict(config or {})
    text = cfg.get("text_config")
    if isinstance(text, dict):
        cfg.update(text)
    return cfg


def model_types(config: dict[str, Any] | None) -> list[str]:
    """config.json's model_type, then text_config's and vision_config's (distinct, in that order)."""
    config = config or {}
    types = [config.get("model_type")]
    for sub in ("text_config", "vision_config"):
        if isinstance(config.get(sub), dict):
            types.append(config[sub].get("model_type"))
    return list(dict.fromkeys(t for t in types if isinstance(t, str)))


def _quoted(types: list[str]) -> str:
    return " / ".join(repr(t) for t in types)


def choose_table(reg: Registry, stack: str, rests: Iterable[str],
                 config: dict[str, Any] | None) -> tuple[Arch | None, TableMatch]:
    """The table for a stack's raw names (after `<stack>.<layer>.`), and how it was chosen."""
    types = model_types(config)
    names = sorted(set(rests))
    usable = [a for a in reg.archs if a.stack is None or re.search(a.stack, stack)]
    mapped = {a.name: [r for r in names if a.lookup(r) is not None] for a in usable}
    for arch in usable:
        hit = next((t for t in types if t in arch.model_types), None)
        if hit is not None and mapped[arch.name]:
            return arch, TableMatch(arch.name, "model_type", hit)
    listing = [a.name for a in usable if set(types) & set(a.model_types)]
    if config is None:
        reason = "no config.json"
    elif not types:
        reason = "config.json has no model_type"
    elif listing:
        reason = (f"model_type {_quoted(types)} has table{'s' if len(listing) > 1 else ''} {', '.join(listing)}, "
                  f"which know{'s' if len(listing) == 1 else ''} none of this stack's names")
    else:
        reason = f"no table lists model_type {_quoted(types)}"
    first = types[0] if types else None
    best = max(usable, key=lambda a: len(mapped[a.name]), default=None)
    if best is not None and mapped[best.name]:
        return best, TableMatch(best.name, "names", first, reason, tuple(mapped[best.name]))
    return None, TableMatch(None, "none", first, reason)


def main_stack(reg: Registry, layer_counts: dict[str, int]) -> tuple[str, str]:
    """(name, rule in words) of the stack the seed's JSON keys describe."""
    for rule in reg.common.main_stack:
        hits = [s for s in layer_counts if re.search(rule.pattern, s)]
        if hits:
            name = max(hits, key=lambda s: (layer_counts[s], -len(s)))
            return name, f"{name}, {rule.why}"
    name = max(layer_counts, key=lambda s: (layer_counts[s], not s.endswith("]"), -len(s)))
    if len(layer_counts) == 1:
        return name, f"{name}, the only stack"
    return name, f"{name}, the stack with the most layers"
