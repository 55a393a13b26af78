"""inspect's document and listing: what was resolved, and how every tensor maps."""

from __future__ import annotations

from typing import Any

from ..checkpoint.index import TensorIndex, grid
from ..checkpoint.sources import Source
from ..layout import Layout, aggregate_raw, family_kind, family_order
from ..layout.build import split_name
from .escape import lines as text_lines


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def _share(members: list[Any]) -> tuple[int, int]:
    """Elements and bytes per layer of a family (its part of a fused tensor)."""
    m = members[0]
    rows, cols = grid(m.tensor.shape)
    n = (sum(b - a for a, b in m.rows) if m.rows is not None else rows) * (m.cols[1] - m.cols[0] if m.cols else cols)
    return n, m.tensor.nbytes * n // max(m.tensor.numel, 1)


def _ranges(m: Any) -> str | None:
    """Where a family sits in its fused raw tensor, in grid rows/cols."""
    out = []
    if m.rows is not None:
        if len(m.rows) <= 2:
            out.append("rows " + ",".join(f"{a}:{b}" for a, b in m.rows))
        else:
            out.append(f"rows {m.rows[0][0]}:{m.rows[0][1]},{m.rows[1][0]}:{m.rows[1][1]},... ({len(m.rows)} ranges)")
    if m.cols is not None:
        out.append(f"cols {m.cols[0]}:{m.cols[1]}")
    return " ".join(out) or None


def _tensors(index: TensorIndex, layout: Layout) -> list[dict[str, Any]]:
    """Every stored tensor: where its bytes are (the header's data_offsets, and absolute in the
    file) and what it maps to (stack, layer, the families and parts it holds; why none)."""
    data_start = {s.path: s.data_start for s in index.shards}
    mapped: dict[str, tuple[str, int, list[dict[str, Any]]]] = {}
    scales: dict[str, tuple[str, int, str]] = {}
    for name, st in layout.stacks.items():
        for fam, members in st.families.items():
            for m in members:
                mapped.setdefault(m.tensor.name, (name, m.layer, []))[2].append(
                    {"family": fam, "part": _ranges(m), "unmapped": fam in st.unmapped})
                if m.scale is not None:
                    scales[m.scale.name] = (name, m.layer, f"dequantisation scale of {m.tensor.name}")
    out = []
    for t in sorted(index.tensors.values(), key=lambda t: t.name):
        begin = t.start - data_start[t.file]
        stack, layer, fams, why = None, None, [], None
        if t.name in mapped:
            stack, layer, fams = mapped[t.name]
            why = None if t.is_float else f"{t.dtype} is not a floating-point dtype"
        elif t.name in scales:
            stack, layer, why = scales[t.name]
        elif (where := split_name(t.name)) is not None:
            stack = next((s for s in layout.stacks if s.split("[")[0] == where[0] and where[1] in layout.stacks[s].layers),
                         where[0])
            layer, st = where[1], layout.stacks.get(stack)
            refused = st.refused.get(where[2]) if st else None
            why = (st.consumed.get(where[2]) if st else None) or (f"refused: {refused.format}" if refused else None)
        else:
            why = "not a layer tensor"
        out.append({"name": t.name, "file": str(t.file), "dtype": t.dtype, "shape": list(t.shape),
                    "data_offsets": [begin, begin + t.nbytes], "file_offsets": [t.start, t.start + t.nbytes],
                    "stack": stack, "layer": layer, "families": fams, "not_analysed": why})
    return out


def inspect_doc(source: Source, index: TensorIndex, layout: Layout) -> dict[str, Any]:
    stacks = {}
    for name, st in layout.stacks.items():
        fams = {}
        for fam in sorted(family_order(list(st.families)),
                          key=lambda f: family_kind(f, len(st.families[f][0].tensor.shape))):
            members = st.families[fam]
            t = members[0].tensor
            n, nbytes = _share(members)
            raw = st.raw[fam]
            fams[fam] = {
                "raw": raw,
                "shape": list(t.shape),
                "dtype": t.dtype,
                "bytes_per_layer": nbytes,
                "layers": len(members),
                "part": _ranges(members[0]),
                "dequant": st.dequant.get(raw),
                "transposed": raw in st.transposed,
                "role": st.role(fam),
            }
        aggregates = {
            agg: {"raw": aggregate_raw(st, agg), "experts": len(ms), "families": ms,
                  "bytes_per_layer": sum(fams[f]["bytes_per_layer"] for f in ms), "role": st.role(agg)}
            for agg, ms in st.aggregates.items()
        }
        layers = st.layers
        stacks[name] = {
            "arch": st.arch,
            "table": st.match.to_dict(),
            "layers": [layers[0], layers[-1]] if layers else None,
            "n_layers": len(layers),
            "families": fams,
            "aggregates": aggregates,
            "splits": st.splits,
            "dequant": st.dequant,
            "transposed": st.transposed,
            "unmapped": list(st.unmapped),
            "consumed": st.consumed,
            "refused": {r: {"format": x.format, "example": x.example, "layers": list(x.layers), "message": x.message}
                        for r, x in st.refused.items()},
            "notes": st.notes,
        }
    return {
        "source": source.describe(),
        "architecture": layout.arch,
        "model_type": layout.model_type,
        "main_stack": {"name": layout.main, "rule": layout.main_rule},
        "num_hidden_layers": layout.num_hidden_layers,
        "shards": [{"file": str(s.path), "bytes": s.size, "tensors": len(s.tensors)} for s in index.shards],
        "stacks": stacks,
        "nonlayer": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "bytes": t.nbytes} for t in layout.nonlayer],
        "embeddings": layout.tied,
        "notes": layout.notes,
        "tensors": _tensors(index, layout),
        "total_params": index.total_params,
        "not_params": index.not_params(),
        "total_bytes": index.total_bytes,
    }


def _span(layers: list[int]) -> str:
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}..{layers[-1]}"


def inspect_text(doc: dict[str, Any]) -> str:
    src = doc["source"]
    out = [f"model: {src['spec']}  ({src['kind']}: {src['root']})"]
    if src["repo_id"]:
        out.append(f"  repo {src['repo_id']}  revision {src['revision']}  commit {src['commit']}")
    main = doc.get("main_stack") or {}
    table = (doc["stacks"].get(main.get("name")) or {}).get("table") or {}
    kind = (f"{doc['model_type']} (config.json's model_type)" if doc.get("model_type")
            else f"unknown ({table.get('reason') or 'config.json has no model_type'})")
    out.append(f"architecture: {kind}"
               + (f", num_hidden_layers={doc['num_hidden_layers']}" if doc["num_hidden_layers"] is not None else ""))
    if main.get("rule"):
        out.append(f"main stack: {main['rule']}")
    if doc.get("embeddings", {}).get("note"):
        out.append(f"embeddings: {doc['embeddings']['note']}")
    for note in doc.get("notes", []):
        out.append(f"note: {note}")
    out.append(f"shards: {len(doc['shards'])}")
    for s in doc["shards"]:
        out.append(f"  {s['file']}  {_human(s['bytes'])}  {s['tensors']} tensors")
    for name, st in doc["stacks"].items():
        span = f"{st['layers'][0]}..{st['layers'][1]}" if st["layers"] else "none analysable"
        table = st.get("table") or {}
        out.append(f"stack {name}: {st['n_layers']} layers ({span}), names: "
                   f"{table.get('label') or st.get('arch') or 'no table: raw family names'}")
        if table.get("mapped_by_suffix"):
            out.append(f"  mapped by the suffix rules of table {table['table']}: {', '.join(table['mapped_by_suffix'])}")
        per_expert = {f for a in st.get("aggregates", {}).values() for f in a["families"]}
        rows = []
        for fam, f in st["families"].items():
            if fam in per_expert:
                continue
            where = f" [{f['part']}]" if f.get("part") else ""
            raw = "" if f["raw"] == fam else f"  <- {f['raw']}{where}"
            rows.append((fam, str(f["shape"]), f["dtype"], _human(f["bytes_per_layer"]), f"x{f['layers']}{raw}"))
        for agg, a in st.get("aggregates", {}).items():
            first = st["families"][a["families"][0]]
            rows.append((agg, str(first["shape"]), first["dtype"], _human(a["bytes_per_layer"]),
                         f"x{first['layers']}  <- {a['raw']}  (all {a['experts']} experts; per expert "
                         f"{a['families'][0]} .. {a['families'][-1]})"))
        width = max([len(r[0]) for r in rows], default=8)
        for fam, shape, dtype, size, rest in rows:
            out.append(f"  {fam:<{width}}  {shape:<16} {dtype:<8} {size:>10}/layer  {rest}")
        for raw, how in st.get("splits", {}).items():
            out.append(f"  split {raw}: {how}")
        for raw, how in st.get("dequant", {}).items():
            out.append(f"  quantised {raw}: {how}")
        if st.get("transposed"):
            out.append(f"  stored [in, out] (Conv1D; cosines and norms unaffected): {', '.join(st['transposed'])}")
        if st["unmapped"]:
            out.append(f"  unmapped (analysed under their raw names): {', '.join(st['unmapped'])}")
        for raw, why in st.get("consumed", {}).items():
            out.append(f"  not a family: {raw}: {why}")
        for raw, r in st.get("refused", {}).items():
            out.append(f"  refused: {raw} ({_span(r['layers'])}): {r['format']}")
        for note in st.get("notes", []):
            out.append(f"  note: {note}")
    out.append(f"non-layer tensors: {len(doc['nonlayer'])}")
    for t in doc["nonlayer"]:
        out.append(f"  {t['name']}  {t['shape']} {t['dtype']}  {_human(t['bytes'])}")
    left = doc.get("not_params") or {}
    out.append(f"total: {doc['total_params']:,} parameters (floating-point tensors), {_human(doc['total_bytes'])}")
    if left:
        each = ", ".join(f"{d['tensors']} {dt} tensors ({d['elements']:,} elements)" for dt, d in left.items())
        out.append(f"  not counted as parameters (not floating point): {each}")
    return text_lines(out)  # names from the file: control characters escaped
