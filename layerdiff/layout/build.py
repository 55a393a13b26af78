"""Header index + config.json -> Layout: every tensor placed in a stack, layer and family.

The tables (layerdiff/archs/data) say what the names mean; this module only
applies them: per layer it refuses unreadable formats with their companions,
pairs dequantisation scales with their weights, and maps every other tensor to
its family (or splits a fused one), keeping what no table knows under its raw
name.
"""

from __future__ import annotations

import re
from typing import Any

from ..archs import registry
from ..archs.registry import Registry
from ..archs.schema import Arch, Common, Entry
from ..archs.sizes import ConfigView, NoSplit, Parts, choose, describe_split, split
from ..checkpoint.index import TensorIndex, TensorInfo, grid
from .model import READ_DTYPES, Layout, Member, Refused, Stack, TableMatch, aggregate_name
from .select import choose_table, main_stack, model_types, text_config

# A layer number: no leading zeros (".01." would collide with ".1."), at most 9 digits.
_LAYER_NAME = re.compile(r"^(?P<stack>.+?)\.(?P<layer>0|[1-9]\d{0,8})\.(?P<rest>.+)$")


def split_name(name: str) -> tuple[str, int, str] | None:
    """`model.layers.3.mlp.up_proj.weight` -> ("model.layers", 3, "mlp.up_proj.weight"); None: not a layer tensor."""
    m = _LAYER_NAME.match(name)
    return (m.group("stack"), int(m.group("layer")), m.group("rest")) if m else None


def _positive(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


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


def _has_head(cls: str) -> bool:
    """A model class with an output head: `*For...` or `*LMHeadModel`, not a bare `*Model` base class."""
    return not cls.endswith("Model") or cls.endswith("LMHeadModel")


def _tied(common: Common, config: dict[str, Any] | None, nonlayer: list[TensorInfo]) -> dict[str, Any]:
    """Whether the output head reuses the input embedding. Tied only when the config says
    tie_word_embeddings=true and its model class has a head: an encoder or base model stores
    no head and has nothing to tie, whatever the flag (BERT's config says true)."""
    flag = text_config(config).get("tie_word_embeddings") if config is not None else None
    archs = (config or {}).get("architectures")
    classes = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    head_class = next((c for c in classes if _has_head(c)), None)
    names = [t.name for t in nonlayer]
    head = next((n for n in names if n.endswith(common.output_heads)), None)
    embed = next((n for n in names if n.endswith(common.input_embeddings)), None)
    tied = flag is True and head_class is not None
    if tied:
        note = (f"tied: the output head of {head_class} reuses {embed or 'the input embedding'} "
                "(from config.json: tie_word_embeddings=true and architectures names a class with a head)")
        if head is not None:
            note += f"; {head} is stored too"
    elif head is not None:
        note = f"untied: output head {head} is stored (matched by name)"
    else:
        none = f"no output head stored (nothing to tie): no tensor named *{', *'.join(common.output_heads)}"
        if flag is True and classes:
            note = f"{none}; {', '.join(classes)} is a base model class without one, whatever tie_word_embeddings says"
        elif flag is True:
            note = f"{none}; config tie_word_embeddings=true, but config.json names no model class (architectures)"
        elif isinstance(flag, bool):
            note = f"{none}; config tie_word_embeddings=false"
        else:
            note = f"{none}; {'config.json has no tie_word_embeddings' if config is not None else 'no config.json'}"
    return {"tied": tied, "config": flag, "architectures": classes, "head_class": head_class, "output_head": head,
            "input_embedding": embed, "note": note}


def build_layout(index: TensorIndex, config: dict[str, Any] | None = None, archs: Registry | None = None) -> Layout:
    """The layout of a checkpoint; `archs` are the tables (default: the package's and LAYERDIFF_ARCH_PATH's)."""
    reg = archs if archs is not None else registry.load()
    text_cfg = text_config(config)
    # stack -> layer -> rest -> tensor
    grouped: dict[str, dict[int, dict[str, TensorInfo]]] = {}
    nonlayer: list[TensorInfo] = []
    for name, info in index.tensors.items():
        where = split_name(name)
        if where is None:
            nonlayer.append(info)
            continue
        grouped.setdefault(where[0], {}).setdefault(where[1], {})[where[2]] = info
    nonlayer.sort(key=lambda t: t.name)
    notes: list[str] = []
    chosen: dict[str, tuple[Arch | None, TableMatch]] = {}
    n = reg.view(text_cfg, None).size("num_hidden_layers")
    if grouped:
        main, _ = main_stack(reg, {s: len(ls) for s, ls in grouped.items()})
        first, _ = choose_table(reg, main, (r for rs in grouped[main].values() for r in rs), config)
        n = reg.view(text_cfg, first).size("num_hidden_layers")
        beyond = sorted(L for L in grouped[main] if n is not None and L >= n)
        if beyond and len(beyond) < len(grouped[main]):
            extra = f"{main}[{'mtp' if _positive(text_cfg.get('num_nextn_predict_layers')) else 'extra'}]"
            grouped[extra] = {L: grouped[main].pop(L) for L in beyond}
            notes.append(
                f"layers {beyond[0]}..{beyond[-1]} of {main} are beyond num_hidden_layers={n}: "
                f"reported apart as stack {extra}, not paired with layer {n - 1}"
            )
        chosen[main] = choose_table(reg, main, (r for rs in grouped[main].values() for r in rs), config)
        for s, layers in grouped.items():
            if s not in chosen:
                chosen[s] = chosen[main] if s.startswith(main + "[") else choose_table(
                    reg, s, (r for rs in layers.values() for r in rs), config)
    stacks = {s: _build_stack(s, grouped[s], chosen[s], config, reg) for s in sorted(grouped)}
    main_name, rule = main_stack(reg, {s: len(st.layers) for s, st in stacks.items()}) if stacks else (None, "")
    types = model_types(config)
    return Layout(stacks[main_name].arch if main_name else None, stacks, nonlayer, n, _tied(reg.common, config, nonlayer),
                  notes, types[0] if types else None, main_name, rule)


def _build_stack(name: str, layers: dict[int, dict[str, TensorInfo]], chosen: tuple[Arch | None, TableMatch],
                 config: dict[str, Any] | None, reg: Registry) -> Stack:
    arch, match = chosen
    stack = Stack(name, arch=arch.name if arch else None, match=match)
    if arch and arch.config and isinstance((config or {}).get(arch.config), dict):
        cfg = dict(config[arch.config])
    else:
        cfg = text_config(config)
    view = reg.view(cfg, arch)
    common = reg.common
    markers = tuple(f.marker for f in common.refused)
    configured_block = _quant_block(text_config(config))
    ignore = dict(common.ignore) | (dict(arch.ignore) if arch else {})
    resolved: dict[tuple[str, tuple[int, ...]], Parts] = {}  # (rest, shape) -> resolution
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
            if not rest.endswith(markers):
                continue
            for fmt in common.refused:
                if not rest.endswith(fmt.marker) or (fmt.dtypes and info.dtype not in fmt.dtypes):
                    continue
                base = rest[: -len(fmt.marker)]
                for other in tensors:
                    if any(other == base + c or (c.endswith("*") and other.startswith(base + c[:-1]))
                           for c in fmt.companions):
                        skip.add(other)
                        if other not in stack.refused:
                            stack.refused[other] = Refused(fmt.name, _would_be(arch, base, other), info.name, ())
                        refused_layers.setdefault(other, []).append(L)
        # 2. scales that dequantise the weight beside them
        scales: dict[str, tuple[TensorInfo, tuple[int, int]]] = {}
        for rest, info in tensors.items():
            if rest in skip or not rest.endswith(common.scale_suffixes):
                continue
            for suffix in common.scale_suffixes:
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
                    stack.refused.setdefault(base, Refused(fmt, _would_be(arch, base, base), weight.name, ()))
                    refused_layers.setdefault(base, []).append(L)
                    break
                key = (weight.shape, info.shape)
                if key not in blocks:
                    blocks[key] = _scale_block(weight.shape, info.shape, configured_block)
                block = blocks[key]
                if block is None:
                    skip.add(base)
                    fmt = f"a {suffix[1:]} grid {list(info.shape)} that does not tile the weight {list(weight.shape)}"
                    stack.refused.setdefault(base, Refused(fmt, _would_be(arch, base, base), weight.name, ()))
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
            for family, rows, cols in _families(stack, arch, view, rest, info, resolved):
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
    for fam in [*stack.families, *stack.aggregates]:
        known = None if fam in stack.unmapped else reg.family(fam, arch)
        stack.roles[fam] = known.role if known else None
        stack.kinds[fam] = known.kind if known else None
    return stack


def _suffix(rest: str, suffix: str) -> bool:
    """`rest` is `suffix` or ends with it at a dot boundary."""
    suffix = suffix.lstrip(".")
    return rest == suffix or rest.endswith("." + suffix)


def _would_be(arch: Arch | None, base: str, rest: str) -> tuple[str, ...]:
    """Family names a refused tensor would have had: its raw name, and the table's for its weight."""
    names = [rest]
    for key in (base + ".weight", base, rest):
        hit = arch.lookup(key) if arch else None
        if hit is None:
            continue
        entry, expert = hit
        if isinstance(entry, str):
            names.append(entry.replace("{E}", expert or "{E}"))
        else:
            for v in entry:
                names += [c for c, _ in v.parts]
        break
    names += [a for a in (aggregate_name(x) for x in names) if a]
    return tuple(dict.fromkeys(names))


def _families(stack: Stack, arch: Arch | None, view: ConfigView, rest: str, info: TensorInfo,
              resolved: dict[tuple[str, tuple[int, ...]], Parts]) -> Parts:
    """The (family, rows, cols) parts of one raw tensor, cached per (name, shape)."""
    key = (rest, info.shape)
    hit = resolved.get(key)
    if hit is not None:
        return hit
    found: tuple[Entry, str | None] | None = arch.lookup(rest) if arch else None
    out: Parts
    if found is None:
        stack.unmapped[rest] = None
        out = [(rest, None, None)]
    elif isinstance(found[0], str):
        entry, expert = found
        out = [(entry.replace("{E}", expert) if expert is not None else entry, None, None)]
    else:
        try:
            fused = choose(found[0], view)
            out, how = split(fused, info.shape, view)
            stack.splits.setdefault(rest, describe_split(fused, info.shape, how))
        except NoSplit as e:
            stack.notes.append(f"{rest} {list(info.shape)} not split: {e.args[0]}; analysed whole under its raw name")
            stack.unmapped[rest] = None
            out = [(rest, None, None)]
    resolved[key] = out
    return out
